//! App Mesh's rules that span several members (the generated shapes check each member alone):
//! health-check ports, protocol agreement between a listener and its pool / timeout, route and
//! gateway-route match rules, reserved gateway prefixes, retry events, names.

use std::collections::HashSet;

use super::resource::{ResourceKind, Spec};
use super::shapes::*;
use super::validate::Validator;

/// The HTTP retry events App Mesh documents (the model leaves them free strings).
pub const HTTP_RETRY_EVENTS: [&str; 4] = [
    "server-error",
    "gateway-error",
    "client-error",
    "stream-error",
];

/// Checks a resource name: App Mesh's 1–255 characters, and only characters that are safe in an
/// ARN, a URI path segment and a DNS label (letters, digits, `-`, `_`, `.`).
pub fn check_name(v: &mut Validator, member: &str, name: &str) {
    v.field(member, |v| {
        v.length(name, 1, 255);
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            v.error(format!(
                "may contain only letters, digits, '-', '_' and '.', got {c:?} in {name:?}"
            ));
        }
    });
}

/// The virtual node or router a virtual service's provider names.
pub fn provider_of(spec: &Spec) -> Option<(ResourceKind, &str)> {
    let Spec::VirtualService(vs) = spec else {
        return None;
    };
    let p = vs.provider.as_ref()?;
    if let Some(n) = &p.virtual_node {
        return Some((ResourceKind::VirtualNode, &n.virtual_node_name));
    }
    p.virtual_router
        .as_ref()
        .map(|r| (ResourceKind::VirtualRouter, r.virtual_router_name.as_str()))
}

/// Cross-field rules of a spec that need nothing but the spec. `v` is rooted at `spec`.
pub fn check_spec(spec: &Spec, v: &mut Validator) {
    match spec {
        Spec::Mesh(_) | Spec::VirtualService(_) => {}
        Spec::VirtualNode(s) => virtual_node(s, v),
        Spec::VirtualRouter(s) => {
            if let Some(ls) = &s.listeners {
                v.field("listeners", |v| {
                    unique_ports(v, ls.iter().map(|l| l.port_mapping.port));
                });
            }
        }
        Spec::Route(s) => route(s, v),
        Spec::VirtualGateway(s) => virtual_gateway(s, v),
        Spec::GatewayRoute(s) => gateway_route(s, v),
    }
}

fn unique_ports(v: &mut Validator, ports: impl Iterator<Item = i64>) {
    let mut seen = HashSet::new();
    for (i, p) in ports.enumerate() {
        if !seen.insert(p) {
            v.index(i, |v| {
                v.field("portMapping", |v| {
                    v.error_at("port", format!("port {p} is used by another listener"))
                })
            });
        }
    }
}

fn protocol_name(p: PortProtocol) -> &'static str {
    p.as_str()
}

fn virtual_node(s: &VirtualNodeSpec, v: &mut Validator) {
    let listeners = s.listeners.as_deref().unwrap_or_default();
    if !listeners.is_empty() && s.service_discovery.is_none() {
        v.error_at(
            "serviceDiscovery",
            "is required when the virtual node has listeners",
        );
    }
    v.field("listeners", |v| {
        unique_ports(v, listeners.iter().map(|l| l.port_mapping.port));
        for (i, l) in listeners.iter().enumerate() {
            v.index(i, |v| listener(l, v));
        }
    });
    if let Some(backends) = &s.backends {
        let mut seen = HashSet::new();
        v.field("backends", |v| {
            for (i, b) in backends.iter().enumerate() {
                if let Some(vs) = &b.virtual_service
                    && !seen.insert(vs.virtual_service_name.as_str())
                {
                    v.index(i, |v| {
                        v.field("virtualService", |v| {
                            v.error_at(
                                "virtualServiceName",
                                format!("duplicate backend {}", vs.virtual_service_name),
                            )
                        })
                    });
                }
            }
        });
    }
    if let Some(log) = &s.logging {
        v.field("logging", |v| {
            if let Some(al) = &log.access_log {
                v.field("accessLog", |v| {
                    if let Some(f) = &al.file {
                        v.field("file", |v| access_log_file(&f.path, f.format.as_ref(), v));
                    }
                });
            }
        });
    }
}

fn access_log_file(path: &str, format: Option<&LoggingFormat>, v: &mut Validator) {
    if !path.starts_with('/') {
        v.error_at(
            "path",
            format!("must be an absolute path (e.g. /dev/stdout), got {path:?}"),
        );
    }
    if let Some(LoggingFormat {
        text: Some(text), ..
    }) = format
        && let Err(e) = super::access_log::parse(text)
    {
        v.field("format", |v| v.error_at("text", e.to_string()));
    }
    if let Some(LoggingFormat {
        json: Some(items), ..
    }) = format
    {
        v.field("format", |v| {
            v.field("json", |v| {
                if items.is_empty() {
                    v.error("must have at least 1 item, got 0");
                }
                let mut seen = HashSet::new();
                for (i, item) in items.iter().enumerate() {
                    if !seen.insert(item.key.as_str()) {
                        v.index(i, |v| {
                            v.error_at("key", format!("duplicate key {:?}", item.key))
                        });
                    }
                    if let Err(e) = super::access_log::parse(&item.value) {
                        v.index(i, |v| v.error_at("value", e.to_string()));
                    }
                }
            })
        });
    }
}

fn listener(l: &Listener, v: &mut Validator) {
    let proto = l.port_mapping.protocol;
    let port = l.port_mapping.port;
    if let Some(hc) = &l.health_check {
        v.field("healthCheck", |v| {
            health_check(
                v,
                port,
                hc.port,
                hc.path.as_deref(),
                protocol_name(hc.protocol),
                hc.timeout_millis,
                hc.interval_millis,
            )
        });
    }
    if let Some(t) = &l.timeout {
        let given = [
            ("http", t.http.is_some()),
            ("http2", t.http2.is_some()),
            ("grpc", t.grpc.is_some()),
            ("tcp", t.tcp.is_some()),
        ];
        v.field("timeout", |v| {
            matching_protocol(v, &given, protocol_name(proto), port)
        });
    }
    if let Some(cp) = &l.connection_pool {
        let given = [
            ("http", cp.http.is_some()),
            ("http2", cp.http2.is_some()),
            ("grpc", cp.grpc.is_some()),
            ("tcp", cp.tcp.is_some()),
        ];
        v.field("connectionPool", |v| {
            matching_protocol(v, &given, protocol_name(proto), port)
        });
    }
    if let Some(od) = &l.outlier_detection {
        v.field("outlierDetection", |v| {
            if proto == PortProtocol::Tcp {
                v.error("applies to http, http2 and grpc listeners only; this listener is tcp");
            }
            duration_positive(v, "interval", &od.interval);
            duration_positive(v, "baseEjectionDuration", &od.base_ejection_duration);
        });
    }
}

/// A union member named after a protocol must name the listener's protocol.
fn matching_protocol(v: &mut Validator, given: &[(&str, bool)], proto: &str, port: i64) {
    for (name, set) in given {
        if *set && *name != proto {
            v.error_at(
                name,
                format!(
                    "protocol {name} does not match the listener's protocol {proto} (port {port})"
                ),
            );
        }
    }
}

fn duration_positive(v: &mut Validator, member: &str, d: &Duration) {
    v.field(member, |v| {
        if d.unit.is_none() {
            v.error_at("unit", "is required");
        }
        if d.value.is_none() {
            v.error_at("value", "is required");
        }
        if d.value == Some(0) {
            v.error_at("value", "must be greater than 0");
        }
    });
}

fn health_check(
    v: &mut Validator,
    listener_port: i64,
    port: Option<i64>,
    path: Option<&str>,
    protocol: &str,
    timeout_millis: i64,
    interval_millis: i64,
) {
    if let Some(p) = port
        && p != listener_port
    {
        v.error_at(
            "port",
            format!("must equal the listener port {listener_port}, got {p}"),
        );
    }
    match (protocol, path) {
        ("http" | "http2", None) => {
            v.error_at("path", format!("is required for {protocol} health checks"))
        }
        ("http" | "http2", Some(p)) if !p.starts_with('/') => {
            v.error_at("path", format!("must start with '/', got {p:?}"))
        }
        ("tcp" | "grpc", Some(_)) => v.error_at(
            "path",
            format!("is not used by {protocol} health checks; remove it"),
        ),
        _ => {}
    }
    if timeout_millis > interval_millis {
        v.error_at(
            "timeoutMillis",
            format!("must not exceed intervalMillis ({interval_millis}), got {timeout_millis}"),
        );
    }
}

fn virtual_gateway(s: &VirtualGatewaySpec, v: &mut Validator) {
    v.field("listeners", |v| {
        if s.listeners.is_empty() {
            v.error("must have at least 1 item, got 0");
        }
        unique_ports(v, s.listeners.iter().map(|l| l.port_mapping.port));
        for (i, l) in s.listeners.iter().enumerate() {
            v.index(i, |v| {
                let port = l.port_mapping.port;
                let proto = l.port_mapping.protocol.as_str();
                if let Some(hc) = &l.health_check {
                    v.field("healthCheck", |v| {
                        health_check(
                            v,
                            port,
                            hc.port,
                            hc.path.as_deref(),
                            hc.protocol.as_str(),
                            hc.timeout_millis,
                            hc.interval_millis,
                        )
                    });
                }
                if let Some(cp) = &l.connection_pool {
                    let given = [
                        ("http", cp.http.is_some()),
                        ("http2", cp.http2.is_some()),
                        ("grpc", cp.grpc.is_some()),
                    ];
                    v.field("connectionPool", |v| {
                        matching_protocol(v, &given, proto, port)
                    });
                }
            });
        }
    });
    if let Some(log) = &s.logging
        && let Some(al) = &log.access_log
        && let Some(f) = &al.file
    {
        v.field("logging", |v| {
            v.field("accessLog", |v| {
                v.field("file", |v| access_log_file(&f.path, f.format.as_ref(), v))
            })
        });
    }
}

fn route(s: &RouteSpec, v: &mut Validator) {
    let given = [
        ("httpRoute", s.http_route.is_some()),
        ("http2Route", s.http2_route.is_some()),
        ("grpcRoute", s.grpc_route.is_some()),
        ("tcpRoute", s.tcp_route.is_some()),
    ];
    v.union(&given.map(|g| g.0), &given.map(|g| g.1));
    if let Some(r) = &s.http_route {
        v.field("httpRoute", |v| http_route(r, v));
    }
    if let Some(r) = &s.http2_route {
        v.field("http2Route", |v| http_route(r, v));
    }
    if let Some(r) = &s.grpc_route {
        v.field("grpcRoute", |v| {
            let m = &r.r#match;
            v.field("match", |v| {
                if m.method_name.is_some() && m.service_name.is_none() {
                    v.error_at("methodName", "requires serviceName");
                }
                if let Some(md) = &m.metadata {
                    v.field("metadata", |v| {
                        for (i, h) in md.iter().enumerate() {
                            v.index(i, |v| {
                                if let Some(mm) = &h.r#match {
                                    v.field("match", |v| {
                                        header_match(v, mm.regex.as_deref(), mm.range.as_ref())
                                    });
                                }
                            });
                        }
                    });
                }
            });
            weighted_targets(&r.action.weighted_targets, v);
            if let Some(p) = &r.retry_policy {
                v.field("retryPolicy", |v| {
                    let events = p.http_retry_events.as_ref().map_or(0, Vec::len)
                        + p.tcp_retry_events.as_ref().map_or(0, Vec::len)
                        + p.grpc_retry_events.as_ref().map_or(0, Vec::len);
                    if events == 0 {
                        v.error("must list at least one of grpcRetryEvents, httpRetryEvents, tcpRetryEvents");
                    }
                    http_events(v, p.http_retry_events.as_deref());
                    duration_positive(v, "perRetryTimeout", &p.per_retry_timeout);
                });
            }
        });
    }
    if let Some(r) = &s.tcp_route {
        v.field("tcpRoute", |v| {
            weighted_targets(&r.action.weighted_targets, v)
        });
    }
}

fn http_events(v: &mut Validator, events: Option<&[String]>) {
    let Some(events) = events else { return };
    v.field("httpRetryEvents", |v| {
        let mut seen = HashSet::new();
        for (i, e) in events.iter().enumerate() {
            v.index(i, |v| {
                if !HTTP_RETRY_EVENTS.contains(&e.as_str()) {
                    v.error(format!(
                        "must be one of {}, got {e:?}",
                        HTTP_RETRY_EVENTS.join(", ")
                    ));
                } else if !seen.insert(e.as_str()) {
                    v.error(format!("duplicate event {e:?}"));
                }
            });
        }
    });
}

fn http_route(r: &HttpRoute, v: &mut Validator) {
    let m = &r.r#match;
    v.field("match", |v| {
        http_path_match(v, m.prefix.as_deref(), m.path.as_ref(), true);
        if let Some(hs) = &m.headers {
            headers(v, hs.iter().map(|h| (h.r#match.as_ref(), h.name.as_str())));
        }
    });
    weighted_targets(&r.action.weighted_targets, v);
    if let Some(p) = &r.retry_policy {
        v.field("retryPolicy", |v| {
            if p.http_retry_events.as_ref().map_or(0, Vec::len)
                + p.tcp_retry_events.as_ref().map_or(0, Vec::len)
                == 0
            {
                v.error("must list at least one of httpRetryEvents, tcpRetryEvents");
            }
            http_events(v, p.http_retry_events.as_deref());
            duration_positive(v, "perRetryTimeout", &p.per_retry_timeout);
        });
    }
}

/// Exactly one of prefix or path; prefixes start with `/`; path regexes compile.
fn http_path_match(
    v: &mut Validator,
    prefix: Option<&str>,
    path: Option<&HttpPathMatch>,
    required: bool,
) {
    match (prefix, path) {
        (Some(_), Some(_)) => v.error("must set exactly one of: prefix, path; got prefix and path"),
        (None, None) if required => v.error("must set exactly one of: prefix, path"),
        _ => {}
    }
    if let Some(p) = prefix
        && !p.starts_with('/')
    {
        v.error_at("prefix", format!("must start with '/', got {p:?}"));
    }
    if let Some(p) = path {
        v.field("path", |v| {
            match (&p.exact, &p.regex) {
                (Some(_), Some(_)) => {
                    v.error("must set exactly one of: exact, regex; got exact and regex")
                }
                (None, None) => v.error("must set exactly one of: exact, regex"),
                _ => {}
            }
            if let Some(e) = &p.exact
                && !e.starts_with('/')
            {
                v.error_at("exact", format!("must start with '/', got {e:?}"));
            }
            if let Some(re) = &p.regex {
                regex_compiles(v, "regex", re);
            }
        });
    }
}

fn regex_compiles(v: &mut Validator, member: &str, re: &str) {
    if let Err(e) = regex::Regex::new(re) {
        let first = e
            .to_string()
            .lines()
            .last()
            .unwrap_or("invalid")
            .trim()
            .to_string();
        v.error_at(
            member,
            format!("is not a valid regular expression ({first}): {re:?}"),
        );
    }
}

fn header_match(v: &mut Validator, regex: Option<&str>, range: Option<&MatchRange>) {
    if let Some(re) = regex {
        regex_compiles(v, "regex", re);
    }
    if let Some(r) = range
        && r.start >= r.end
    {
        v.error_at(
            "range",
            format!("start ({}) must be less than end ({})", r.start, r.end),
        );
    }
}

fn headers<'a>(
    v: &mut Validator,
    hs: impl Iterator<Item = (Option<&'a HeaderMatchMethod>, &'a str)>,
) {
    v.field("headers", |v| {
        for (i, (m, name)) in hs.enumerate() {
            v.index(i, |v| {
                if name.starts_with(':') {
                    v.error_at(
                        "name",
                        format!("pseudo-headers cannot be matched, got {name:?}"),
                    );
                }
                if let Some(m) = m {
                    v.field("match", |v| {
                        header_match(v, m.regex.as_deref(), m.range.as_ref())
                    });
                }
            });
        }
    });
}

fn weighted_targets(ts: &[WeightedTarget], v: &mut Validator) {
    v.field("action", |v| {
        v.field("weightedTargets", |v| {
            let mut seen = HashSet::new();
            for (i, t) in ts.iter().enumerate() {
                if !seen.insert((t.virtual_node.as_str(), t.port)) {
                    v.index(i, |v| {
                        v.error_at(
                            "virtualNode",
                            format!("duplicate weighted target {}", t.virtual_node),
                        )
                    });
                }
            }
        })
    });
}

const RESERVED_PREFIXES: [&str; 2] = ["/aws-appmesh", "/aws-app-mesh"];
const RESERVED_GRPC: [&str; 2] = ["aws.appmesh", "aws.app-mesh"];

fn gateway_route(s: &GatewayRouteSpec, v: &mut Validator) {
    let given = [
        ("httpRoute", s.http_route.is_some()),
        ("http2Route", s.http2_route.is_some()),
        ("grpcRoute", s.grpc_route.is_some()),
    ];
    v.union(&given.map(|g| g.0), &given.map(|g| g.1));
    for (member, r) in [("httpRoute", &s.http_route), ("http2Route", &s.http2_route)] {
        let Some(r) = r else { continue };
        v.field(member, |v| {
            let m = &r.r#match;
            v.field("match", |v| {
                http_path_match(v, m.prefix.as_deref(), m.path.as_ref(), m.hostname.is_none());
                for p in [m.prefix.as_deref(), m.path.as_ref().and_then(|p| p.exact.as_deref())].into_iter().flatten() {
                    if RESERVED_PREFIXES.iter().any(|r| p.starts_with(r)) {
                        let member = if m.prefix.is_some() { "prefix" } else { "path" };
                        v.error_at(member, format!("{p:?} is reserved (prefixes /aws-appmesh and /aws-app-mesh)"));
                    }
                }
                if let Some(h) = &m.hostname {
                    v.field("hostname", |v| hostname_match(v, h));
                }
                if let Some(hs) = &m.headers {
                    headers(v, hs.iter().map(|h| (h.r#match.as_ref(), h.name.as_str())));
                }
            });
            if let Some(rw) = &r.action.rewrite {
                v.field("action", |v| {
                    v.field("rewrite", |v| {
                        if let Some(p) = &rw.prefix {
                            v.field("prefix", |v| {
                                if m.prefix.is_none() {
                                    v.error("applies only to routes that match a prefix");
                                }
                                match (&p.default_prefix, &p.value) {
                                    (Some(_), Some(_)) => v.error("must set exactly one of: defaultPrefix, value; got defaultPrefix and value"),
                                    (None, None) => v.error("must set exactly one of: defaultPrefix, value"),
                                    _ => {}
                                }
                                if let Some(val) = &p.value
                                    && !(val.starts_with('/') && val.ends_with('/'))
                                {
                                    v.error_at("value", format!("must start and end with '/', got {val:?}"));
                                }
                            });
                        }
                        if let Some(p) = &rw.path {
                            v.field("path", |v| {
                                if m.path.as_ref().and_then(|p| p.exact.as_ref()).is_none() {
                                    v.error("applies only to routes that match an exact path");
                                }
                                if let Some(e) = &p.exact
                                    && !e.starts_with('/')
                                {
                                    v.error_at("exact", format!("must start with '/', got {e:?}"));
                                }
                            });
                        }
                    })
                });
            }
        });
    }
    if let Some(r) = &s.grpc_route {
        v.field("grpcRoute", |v| {
            v.field("match", |v| {
                let m = &r.r#match;
                if let Some(sn) = &m.service_name
                    && RESERVED_GRPC.iter().any(|r| sn.starts_with(r))
                {
                    v.error_at(
                        "serviceName",
                        format!("{sn:?} is reserved (aws.appmesh and aws.app-mesh)"),
                    );
                }
                if let Some(h) = &m.hostname {
                    v.field("hostname", |v| hostname_match(v, h));
                }
            });
        });
    }
}

fn hostname_match(v: &mut Validator, h: &GatewayRouteHostnameMatch) {
    match (&h.exact, &h.suffix) {
        (Some(_), Some(_)) => {
            v.error("must set exactly one of: exact, suffix; got exact and suffix")
        }
        (None, None) => v.error("must set exactly one of: exact, suffix"),
        _ => {}
    }
    if let Some(e) = &h.exact
        && e.starts_with('*')
    {
        v.error_at(
            "exact",
            format!("must be a full hostname without wildcards, got {e:?}"),
        );
    }
}

/// Which route member a listener protocol takes.
fn route_member_for(proto: &str) -> &'static str {
    match proto {
        "http" => "httpRoute",
        "http2" => "http2Route",
        "grpc" => "grpcRoute",
        _ => "tcpRoute",
    }
}

/// A route's port must name one of the router's listeners (and is required when there are
/// several), and its type must match that listener's protocol.
pub fn route_fits_listeners(
    r: &RouteSpec,
    vr: &VirtualRouterSpec,
    router: &str,
) -> Result<(), String> {
    let listeners: Vec<(i64, &str)> = vr
        .listeners
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|l| (l.port_mapping.port, l.port_mapping.protocol.as_str()))
        .collect();
    let (member, port) = if let Some(x) = &r.http_route {
        ("httpRoute", x.r#match.port)
    } else if let Some(x) = &r.http2_route {
        ("http2Route", x.r#match.port)
    } else if let Some(x) = &r.grpc_route {
        ("grpcRoute", x.r#match.port)
    } else if let Some(x) = &r.tcp_route {
        ("tcpRoute", x.r#match.as_ref().and_then(|m| m.port))
    } else {
        return Ok(());
    };
    fits(&listeners, member, port, &format!("VirtualRouter {router}"))
}

/// The same rule for a gateway route and its virtual gateway's listeners.
pub fn gateway_route_fits_listeners(
    r: &GatewayRouteSpec,
    vg: &VirtualGatewaySpec,
    gateway: &str,
) -> Result<(), String> {
    let listeners: Vec<(i64, &str)> = vg
        .listeners
        .iter()
        .map(|l| (l.port_mapping.port, l.port_mapping.protocol.as_str()))
        .collect();
    let (member, port) = if let Some(x) = &r.http_route {
        ("httpRoute", x.r#match.port)
    } else if let Some(x) = &r.http2_route {
        ("http2Route", x.r#match.port)
    } else if let Some(x) = &r.grpc_route {
        ("grpcRoute", x.r#match.port)
    } else {
        return Ok(());
    };
    fits(
        &listeners,
        member,
        port,
        &format!("VirtualGateway {gateway}"),
    )
}

fn fits(
    listeners: &[(i64, &str)],
    member: &str,
    port: Option<i64>,
    owner: &str,
) -> Result<(), String> {
    if listeners.is_empty() {
        return Ok(());
    }
    let listener = match port {
        Some(p) => listeners.iter().find(|(lp, _)| *lp == p).ok_or_else(|| {
            let ports: Vec<String> = listeners.iter().map(|(p, _)| p.to_string()).collect();
            format!(
                "spec.{member}.match.port: {owner} has no listener on port {p} (listeners: {})",
                ports.join(", ")
            )
        })?,
        None if listeners.len() > 1 => {
            return Err(format!(
                "spec.{member}.match.port: is required because {owner} has {} listeners",
                listeners.len()
            ));
        }
        None => &listeners[0],
    };
    let want = route_member_for(listener.1);
    if want != member {
        return Err(format!(
            "spec.{member}: {owner} listens with protocol {} on port {}; use {want}",
            listener.1, listener.0
        ));
    }
    Ok(())
}
