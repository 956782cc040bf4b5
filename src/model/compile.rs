//! The compiler: a pure function from the mesh state (plus the healthy instances of each
//! virtual node) to one proxy's `ProxyConfig`. It resolves what App Mesh leaves implicit: a
//! virtual service's provider (router routes, or a virtual node's implicit route), route order,
//! target ports, the default retry policy, timeouts and client policies.

use std::collections::BTreeSet;

use super::ApiError;
use super::proxy_config::*;
use super::resource::{Record, ResourceKey, ResourceKind, Spec};
use super::shapes::{
    ClientPolicy, Duration, DurationUnit, EgressFilterType, GrpcRetryPolicy, HttpRetryPolicy,
    HttpRouteMatch, HttpTimeout, Listener, PortProtocol, RouteSpec, VirtualGatewaySpec,
    VirtualNodeSpec,
};
use super::state::{MeshState, not_found};

/// The healthy instances of virtual node `node` in `mesh` (the registry's view).
pub trait Instances {
    fn endpoints(&self, mesh: &str, node: &str) -> Vec<Endpoint>;
}

/// No instances at all (a mesh without registered proxies).
pub struct NoInstances;

impl Instances for NoInstances {
    fn endpoints(&self, _: &str, _: &str) -> Vec<Endpoint> {
        Vec::new()
    }
}

/// Compiles the config of the proxy serving `role` in `mesh`.
pub fn compile(
    state: &MeshState,
    mesh: &str,
    role: &ProxyRole,
    instances: &dyn Instances,
) -> Result<ProxyConfig, ApiError> {
    let mesh_key = ResourceKey::mesh(mesh);
    let mesh_rec = state.get(&mesh_key).ok_or_else(|| not_found(&mesh_key))?;
    let egress_filter = match &mesh_rec.spec {
        Spec::Mesh(m) => m
            .egress_filter
            .as_ref()
            .map_or(EgressFilterType::DropAll, |e| e.r#type),
        _ => EgressFilterType::DropAll,
    };
    let c = Compiler { state, mesh };
    let mut config = match role {
        ProxyRole::VirtualNode(name) => {
            let key = ResourceKey::in_mesh(ResourceKind::VirtualNode, mesh, name);
            let Spec::VirtualNode(spec) = &state.find(&key)?.spec else {
                return Err(not_found(&key));
            };
            c.virtual_node(spec, role, egress_filter)
        }
        ProxyRole::VirtualGateway(name) => {
            let key = ResourceKey::in_mesh(ResourceKind::VirtualGateway, mesh, name);
            let Spec::VirtualGateway(spec) = &state.find(&key)?.spec else {
                return Err(not_found(&key));
            };
            c.virtual_gateway(name, spec, role, egress_filter)
        }
    };
    let targets: BTreeSet<(String, u16)> = config
        .outbound
        .iter()
        .flat_map(|s| &s.listeners)
        .flat_map(|l| &l.routes)
        .flat_map(|r| &r.targets)
        .map(|t| (t.virtual_node.clone(), t.port))
        .collect();
    config.clusters = targets
        .into_iter()
        .map(|(vn, port)| c.cluster(&vn, port, instances))
        .collect();
    config.trust_bundle = state.security().bundle_pem();
    if let ProxyRole::VirtualNode(name) = role {
        config.allowed_callers = c.callers_of(name);
    }
    Ok(config)
}

struct Compiler<'a> {
    state: &'a MeshState,
    mesh: &'a str,
}

impl Compiler<'_> {
    fn record(&self, kind: ResourceKind, name: &str) -> Option<&Record> {
        self.state.get(&ResourceKey::in_mesh(kind, self.mesh, name))
    }

    fn node_spec(&self, name: &str) -> Option<&VirtualNodeSpec> {
        match &self.record(ResourceKind::VirtualNode, name)?.spec {
            Spec::VirtualNode(s) => Some(s),
            _ => None,
        }
    }

    fn virtual_node(
        &self,
        spec: &VirtualNodeSpec,
        role: &ProxyRole,
        egress_filter: EgressFilterType,
    ) -> ProxyConfig {
        let inbound = spec.listeners.iter().flatten().map(inbound).collect();
        let default_policy = spec
            .backend_defaults
            .as_ref()
            .and_then(|d| d.client_policy.clone());
        let outbound = spec
            .backends
            .iter()
            .flatten()
            .filter_map(|b| b.virtual_service.as_ref())
            .map(|b| {
                self.service(
                    &b.virtual_service_name,
                    b.client_policy.clone().or_else(|| default_policy.clone()),
                )
            })
            .collect();
        let access_log = spec
            .logging
            .as_ref()
            .and_then(|l| l.access_log.as_ref())
            .and_then(|a| a.file.as_ref())
            .map(|f| AccessLog {
                path: f.path.clone(),
                format: f.format.clone(),
            });
        ProxyConfig {
            mesh: self.mesh.to_string(),
            role: role.clone(),
            egress_filter,
            inbound,
            outbound,
            clusters: Vec::new(),
            access_log,
            gateway: None,
            trust_bundle: String::new(),
            allowed_callers: Vec::new(),
        }
    }

    fn virtual_gateway(
        &self,
        name: &str,
        spec: &VirtualGatewaySpec,
        role: &ProxyRole,
        egress_filter: EgressFilterType,
    ) -> ProxyConfig {
        // The gateway's client policy has the same shape as a node's under another name.
        let policy: Option<ClientPolicy> = spec
            .backend_defaults
            .as_ref()
            .and_then(|d| d.client_policy.as_ref())
            .and_then(|p| serde_json::to_value(p).ok())
            .and_then(|v| serde_json::from_value(v).ok());
        let routes: Vec<&Record> = self
            .state
            .records()
            .filter(|r| {
                r.key.kind == ResourceKind::GatewayRoute
                    && r.key.mesh == self.mesh
                    && r.key.parent == name
            })
            .collect();
        let single = spec.listeners.len() == 1;
        let listeners = spec
            .listeners
            .iter()
            .map(|l| {
                let port = port16(l.port_mapping.port);
                let proto = l.port_mapping.protocol.as_str();
                let mut compiled: Vec<CompiledGatewayRoute> = routes
                    .iter()
                    .filter_map(|r| match &r.spec {
                        Spec::GatewayRoute(g) => gateway_route(&r.key.name, g, proto, port, single),
                        _ => None,
                    })
                    .collect();
                compiled.sort_by_key(gateway_route_order);
                GatewayListener {
                    port,
                    protocol: match l.port_mapping.protocol.as_str() {
                        "http2" => PortProtocol::Http2,
                        "grpc" => PortProtocol::Grpc,
                        _ => PortProtocol::Http,
                    },
                    connection_pool: l.connection_pool.clone(),
                    health_check: l.health_check.clone(),
                    tls: l.tls.clone(),
                    routes: compiled,
                }
            })
            .collect::<Vec<_>>();
        let services: BTreeSet<&str> = listeners
            .iter()
            .flat_map(|l| &l.routes)
            .map(|r| r.virtual_service.as_str())
            .collect();
        let outbound = services
            .into_iter()
            .map(|s| self.service(s, policy.clone()))
            .collect();
        let access_log = spec
            .logging
            .as_ref()
            .and_then(|l| l.access_log.as_ref())
            .and_then(|a| a.file.as_ref())
            .map(|f| AccessLog {
                path: f.path.clone(),
                format: f.format.clone(),
            });
        ProxyConfig {
            mesh: self.mesh.to_string(),
            role: role.clone(),
            egress_filter,
            inbound: Vec::new(),
            outbound,
            clusters: Vec::new(),
            access_log,
            gateway: Some(GatewayConfig { listeners }),
            trust_bundle: String::new(),
            allowed_callers: Vec::new(),
        }
    }

    /// A virtual service as a caller sees it: its VIP and, per port, the routes of its provider.
    fn service(&self, name: &str, client_policy: Option<ClientPolicy>) -> OutboundService {
        let rec = self.record(ResourceKind::VirtualService, name);
        let provider = rec.and_then(|r| match &r.spec {
            Spec::VirtualService(s) => s.provider.as_ref(),
            _ => None,
        });
        let listeners = match provider {
            Some(p) if p.virtual_router.is_some() => {
                let router = p
                    .virtual_router
                    .as_ref()
                    .map(|r| r.virtual_router_name.as_str())
                    .unwrap_or_default();
                self.router_listeners(router)
            }
            Some(p) if p.virtual_node.is_some() => {
                let node = p
                    .virtual_node
                    .as_ref()
                    .map(|n| n.virtual_node_name.as_str())
                    .unwrap_or_default();
                self.node_provider_listeners(node)
            }
            _ => Vec::new(),
        };
        OutboundService {
            virtual_service: name.to_string(),
            vip: rec.and_then(|r| r.vip),
            client_policy,
            listeners,
        }
    }

    fn router_listeners(&self, router: &str) -> Vec<OutboundListener> {
        let Some(Spec::VirtualRouter(vr)) = self
            .record(ResourceKind::VirtualRouter, router)
            .map(|r| &r.spec)
        else {
            return Vec::new();
        };
        let listeners = vr.listeners.as_deref().unwrap_or_default();
        let single = listeners.len() == 1;
        let routes: Vec<&Record> = self
            .state
            .records()
            .filter(|r| {
                r.key.kind == ResourceKind::Route
                    && r.key.mesh == self.mesh
                    && r.key.parent == router
            })
            .collect();
        listeners
            .iter()
            .map(|l| {
                let port = port16(l.port_mapping.port);
                let protocol = l.port_mapping.protocol;
                let mut compiled: Vec<CompiledRoute> = routes
                    .iter()
                    .filter_map(|r| match &r.spec {
                        Spec::Route(spec) => self.route(&r.key.name, spec, protocol, port, single),
                        _ => None,
                    })
                    .collect();
                compiled.sort_by_key(route_order);
                OutboundListener {
                    port,
                    protocol,
                    routes: compiled,
                }
            })
            .collect()
    }

    /// A virtual-node provider: every port of the node, everything to the node.
    fn node_provider_listeners(&self, node: &str) -> Vec<OutboundListener> {
        let Some(spec) = self.node_spec(node) else {
            return Vec::new();
        };
        spec.listeners
            .iter()
            .flatten()
            .map(|l| {
                let port = port16(l.port_mapping.port);
                OutboundListener {
                    port,
                    protocol: l.port_mapping.protocol,
                    routes: vec![CompiledRoute {
                        name: format!("virtualNode/{node}"),
                        priority: None,
                        matcher: RouteMatch::Any,
                        targets: vec![Target {
                            virtual_node: node.to_string(),
                            port,
                            weight: 1,
                        }],
                        retry: default_retry(),
                        timeouts: listener_timeouts(l),
                    }],
                }
            })
            .collect()
    }

    /// The route as it applies on a router listener, if it applies there.
    fn route(
        &self,
        name: &str,
        spec: &RouteSpec,
        protocol: PortProtocol,
        port: u16,
        single: bool,
    ) -> Option<CompiledRoute> {
        let on_port = |p: Option<i64>| match p {
            Some(p) => port16(p) == port,
            None => single,
        };
        let (matcher, targets, retry, timeouts) = match protocol {
            PortProtocol::Http | PortProtocol::Http2 => {
                let r = if protocol == PortProtocol::Http {
                    spec.http_route.as_ref()
                } else {
                    spec.http2_route.as_ref()
                }?;
                if !on_port(r.r#match.port) {
                    return None;
                }
                (
                    RouteMatch::Http(r.r#match.clone()),
                    &r.action.weighted_targets,
                    r.retry_policy
                        .as_ref()
                        .map_or_else(default_retry, http_retry),
                    http_timeouts(r.timeout.as_ref()),
                )
            }
            PortProtocol::Grpc => {
                let r = spec.grpc_route.as_ref()?;
                if !on_port(r.r#match.port) {
                    return None;
                }
                let t = r.timeout.as_ref();
                (
                    RouteMatch::Grpc(r.r#match.clone()),
                    &r.action.weighted_targets,
                    r.retry_policy
                        .as_ref()
                        .map_or_else(default_retry, grpc_retry),
                    timeouts(
                        t.and_then(|t| t.per_request.as_ref()),
                        t.and_then(|t| t.idle.as_ref()),
                    ),
                )
            }
            PortProtocol::Tcp => {
                let r = spec.tcp_route.as_ref()?;
                if !on_port(r.r#match.as_ref().and_then(|m| m.port)) {
                    return None;
                }
                let idle = r.timeout.as_ref().and_then(|t| t.idle.as_ref());
                (
                    RouteMatch::Any,
                    &r.action.weighted_targets,
                    default_retry(),
                    Timeouts {
                        per_request_ms: 0,
                        ..timeouts(None, idle)
                    },
                )
            }
        };
        let targets = targets
            .iter()
            .map(|t| Target {
                virtual_node: t.virtual_node.clone(),
                port: t
                    .port
                    .map(port16)
                    .unwrap_or_else(|| self.target_port(&t.virtual_node, port)),
                weight: u32::try_from(t.weight).unwrap_or(0),
            })
            .collect();
        Some(CompiledRoute {
            name: name.to_string(),
            priority: spec.priority,
            matcher,
            targets,
            retry,
            timeouts,
        })
    }

    /// The virtual nodes and gateways whose backends (or gateway routes) include a virtual
    /// service that routes to `node`.
    fn callers_of(&self, node: &str) -> Vec<ProxyRole> {
        let leads_here: BTreeSet<&str> = self
            .state
            .records()
            .filter(|r| r.key.kind == ResourceKind::VirtualService && r.key.mesh == self.mesh)
            .filter(|r| {
                self.service(&r.key.name, None)
                    .listeners
                    .iter()
                    .flat_map(|l| &l.routes)
                    .flat_map(|r| &r.targets)
                    .any(|t| t.virtual_node == node)
            })
            .map(|r| r.key.name.as_str())
            .collect();
        let mut callers = BTreeSet::new();
        for r in self.state.records().filter(|r| r.key.mesh == self.mesh) {
            match &r.spec {
                Spec::VirtualNode(spec) => {
                    let calls = spec
                        .backends
                        .iter()
                        .flatten()
                        .filter_map(|b| b.virtual_service.as_ref())
                        .any(|b| leads_here.contains(b.virtual_service_name.as_str()));
                    if calls {
                        callers.insert(ProxyRole::VirtualNode(r.key.name.clone()));
                    }
                }
                Spec::GatewayRoute(g) => {
                    let target = [
                        g.http_route.as_ref().map(|h| &h.action.target),
                        g.http2_route.as_ref().map(|h| &h.action.target),
                    ]
                    .into_iter()
                    .flatten()
                    .map(|t| t.virtual_service.virtual_service_name.as_str())
                    .chain(g.grpc_route.as_ref().map(|h| {
                        h.action
                            .target
                            .virtual_service
                            .virtual_service_name
                            .as_str()
                    }))
                    .any(|s| leads_here.contains(s));
                    if target {
                        callers.insert(ProxyRole::VirtualGateway(r.key.parent.clone()));
                    }
                }
                _ => {}
            }
        }
        callers.into_iter().collect()
    }

    /// A target without a port uses the node's only listener, else the router's port.
    fn target_port(&self, node: &str, router_port: u16) -> u16 {
        match self.node_spec(node).and_then(|s| s.listeners.as_deref()) {
            Some([only]) => port16(only.port_mapping.port),
            _ => router_port,
        }
    }

    fn cluster(&self, node: &str, port: u16, instances: &dyn Instances) -> Cluster {
        let spec = self.node_spec(node);
        let listener = spec
            .and_then(|s| s.listeners.as_ref())
            .and_then(|ls| ls.iter().find(|l| port16(l.port_mapping.port) == port));
        let mut endpoints = instances.endpoints(self.mesh, node);
        endpoints.sort();
        Cluster {
            virtual_node: node.to_string(),
            port,
            protocol: listener.map(|l| l.port_mapping.protocol),
            tls_mode: listener.and_then(|l| l.tls.as_ref()).map(|t| t.mode),
            hostname: spec
                .and_then(|s| s.service_discovery.as_ref())
                .and_then(|d| d.dns.as_ref())
                .map(|d| d.hostname.clone()),
            outlier_detection: listener.and_then(|l| l.outlier_detection.clone()),
            health_check: listener.and_then(|l| l.health_check.clone()),
            endpoints,
        }
    }
}

fn port16(p: i64) -> u16 {
    u16::try_from(p).unwrap_or(0)
}

fn inbound(l: &Listener) -> InboundListener {
    InboundListener {
        port: port16(l.port_mapping.port),
        protocol: l.port_mapping.protocol,
        timeouts: listener_timeouts(l),
        connection_pool: l.connection_pool.clone(),
        health_check: l.health_check.clone(),
        tls: l.tls.clone(),
    }
}

fn listener_timeouts(l: &Listener) -> Timeouts {
    let Some(t) = &l.timeout else {
        return if l.port_mapping.protocol == PortProtocol::Tcp {
            Timeouts {
                per_request_ms: 0,
                ..Timeouts::default()
            }
        } else {
            Timeouts::default()
        };
    };
    match l.port_mapping.protocol {
        PortProtocol::Http => http_timeouts(t.http.as_ref()),
        PortProtocol::Http2 => http_timeouts(t.http2.as_ref()),
        PortProtocol::Grpc => {
            let g = t.grpc.as_ref();
            timeouts(
                g.and_then(|g| g.per_request.as_ref()),
                g.and_then(|g| g.idle.as_ref()),
            )
        }
        PortProtocol::Tcp => Timeouts {
            per_request_ms: 0,
            ..timeouts(None, t.tcp.as_ref().and_then(|t| t.idle.as_ref()))
        },
    }
}

fn http_timeouts(t: Option<&HttpTimeout>) -> Timeouts {
    timeouts(
        t.and_then(|t| t.per_request.as_ref()),
        t.and_then(|t| t.idle.as_ref()),
    )
}

fn timeouts(per_request: Option<&Duration>, idle: Option<&Duration>) -> Timeouts {
    let d = Timeouts::default();
    Timeouts {
        per_request_ms: per_request.map_or(d.per_request_ms, millis),
        idle_ms: idle.map_or(d.idle_ms, millis),
    }
}

/// A Duration in milliseconds (seconds when the unit is missing).
pub fn millis(d: &Duration) -> u64 {
    let v = u64::try_from(d.value.unwrap_or(0)).unwrap_or(0);
    match d.unit {
        Some(DurationUnit::Ms) => v,
        _ => v.saturating_mul(1000),
    }
}

/// App Mesh's implicit policy for routes without one: two retries on 503, resets, refused
/// streams, connection failures and gRPC `unavailable`.
pub fn default_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        per_retry_timeout_ms: 0,
        http_statuses: vec![503],
        on_reset: true,
        on_refused_stream: true,
        on_connection_error: true,
        grpc_events: vec!["unavailable".into()],
        is_default: true,
    }
}

fn http_events(p: &mut RetryPolicy, events: Option<&Vec<String>>, tcp: bool) {
    for e in events.into_iter().flatten() {
        match e.as_str() {
            "server-error" => {
                p.http_statuses
                    .extend([500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511]);
                p.on_reset = true;
            }
            "gateway-error" => {
                p.http_statuses.extend([502, 503, 504]);
                p.on_reset = true;
            }
            "client-error" => p.http_statuses.push(409),
            "stream-error" => p.on_refused_stream = true,
            _ => {}
        }
    }
    p.on_connection_error = tcp;
    p.http_statuses.sort_unstable();
    p.http_statuses.dedup();
}

fn http_retry(r: &HttpRetryPolicy) -> RetryPolicy {
    let mut p = empty_retry(r.max_retries, &r.per_retry_timeout);
    http_events(
        &mut p,
        r.http_retry_events.as_ref(),
        r.tcp_retry_events.as_ref().is_some_and(|e| !e.is_empty()),
    );
    p
}

fn grpc_retry(r: &GrpcRetryPolicy) -> RetryPolicy {
    let mut p = empty_retry(r.max_retries, &r.per_retry_timeout);
    http_events(
        &mut p,
        r.http_retry_events.as_ref(),
        r.tcp_retry_events.as_ref().is_some_and(|e| !e.is_empty()),
    );
    p.grpc_events = r
        .grpc_retry_events
        .iter()
        .flatten()
        .map(|e| e.as_str().to_string())
        .collect();
    p
}

fn empty_retry(max_retries: i64, per_retry: &Duration) -> RetryPolicy {
    RetryPolicy {
        max_retries: u32::try_from(max_retries).unwrap_or(u32::MAX),
        per_retry_timeout_ms: millis(per_retry),
        http_statuses: Vec::new(),
        on_reset: false,
        on_refused_stream: false,
        on_connection_error: false,
        grpc_events: Vec::new(),
        is_default: false,
    }
}

/// Route order: explicit priority first (0 is highest), then the most specific match (an
/// exact path, a regex, the longest prefix; headers and other conditions break ties), then name.
fn route_order(r: &CompiledRoute) -> (i64, i64, String) {
    let specificity = match &r.matcher {
        RouteMatch::Http(m) => http_specificity(m),
        RouteMatch::Grpc(m) => {
            (m.service_name.is_some() as i64) * 1000
                + (m.method_name.is_some() as i64) * 100
                + m.metadata.as_ref().map_or(0, |v| v.len() as i64)
        }
        RouteMatch::Any => 0,
    };
    (r.priority.unwrap_or(1001), -specificity, r.name.clone())
}

fn http_specificity(m: &HttpRouteMatch) -> i64 {
    let path = match (&m.path, &m.prefix) {
        (Some(p), _) if p.exact.is_some() => 1_000_000,
        (Some(_), _) => 500_000,
        (None, Some(prefix)) => prefix.len() as i64 * 100,
        (None, None) => 0,
    };
    path + m.headers.as_ref().map_or(0, |h| h.len() as i64) * 10
        + m.query_parameters.as_ref().map_or(0, |q| q.len() as i64) * 10
        + m.method.is_some() as i64
}

fn gateway_route(
    name: &str,
    spec: &super::shapes::GatewayRouteSpec,
    protocol: &str,
    port: u16,
    single: bool,
) -> Option<CompiledGatewayRoute> {
    let on_port = |p: Option<i64>| match p {
        Some(p) => port16(p) == port,
        None => single,
    };
    let (matcher, target, rewrite, match_port) = match protocol {
        "grpc" => {
            let r = spec.grpc_route.as_ref()?;
            let rewrite =
                r.action
                    .rewrite
                    .as_ref()
                    .map(|rw| super::shapes::HttpGatewayRouteRewrite {
                        hostname: rw.hostname.clone(),
                        path: None,
                        prefix: None,
                    });
            (
                GatewayRouteMatch::Grpc(r.r#match.clone()),
                &r.action.target,
                rewrite,
                r.r#match.port,
            )
        }
        p => {
            let r = if p == "http2" {
                spec.http2_route.as_ref()
            } else {
                spec.http_route.as_ref()
            }?;
            (
                GatewayRouteMatch::Http(r.r#match.clone()),
                &r.action.target,
                r.action.rewrite.clone(),
                r.r#match.port,
            )
        }
    };
    if !on_port(match_port) {
        return None;
    }
    Some(CompiledGatewayRoute {
        name: name.to_string(),
        priority: spec.priority,
        matcher,
        virtual_service: target.virtual_service.virtual_service_name.clone(),
        port: target.port.map(port16),
        rewrite,
    })
}

/// Gateway routes: explicit priority first, then the longest prefix (App Mesh: "the longest
/// prefix wins"), exact paths and hostnames before suffixes, then name.
fn gateway_route_order(r: &CompiledGatewayRoute) -> (i64, i64, String) {
    let specificity = match &r.matcher {
        GatewayRouteMatch::Http(m) => {
            let path = match (&m.path, &m.prefix) {
                (Some(p), _) if p.exact.is_some() => 1_000_000,
                (Some(_), _) => 500_000,
                (None, Some(prefix)) => prefix.len() as i64 * 100,
                (None, None) => 0,
            };
            let host = m
                .hostname
                .as_ref()
                .map_or(0, |h| if h.exact.is_some() { 50 } else { 25 });
            path + host + m.headers.as_ref().map_or(0, |h| h.len() as i64)
        }
        GatewayRouteMatch::Grpc(m) => {
            (m.service_name.is_some() as i64) * 100
                + m.hostname
                    .as_ref()
                    .map_or(0, |h| if h.exact.is_some() { 50 } else { 25 })
        }
    };
    (r.priority.unwrap_or(1001), -specificity, r.name.clone())
}

#[cfg(test)]
#[path = "compile_tests.rs"]
mod tests;
