//! A virtual gateway's own side: its listeners take outside traffic, gateway routes pick a
//! virtual service (hostname exact or suffix, prefix, path, headers, method, query, port; gRPC
//! service and metadata; priority, then the longest prefix), App Mesh's rewrites apply (by
//! default Host becomes the target service's name and the matched prefix becomes `/`), and
//! the request then follows that service's own routes like any outbound request.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, Uri};

use super::access;
use super::dataplane::RoutingError;
use super::dataplane::Shared;
use super::gateway_tls::GatewayTls;
use super::local_reply;
use super::outbound;
use super::route::{RequestHead, RouteTable};
use super::stats;
use super::upstream::{Body, UpstreamError};
use crate::model::compile::default_retry;
use crate::model::proxy_config::{
    CompiledGatewayRoute, CompiledRoute, GatewayListener, GatewayRouteMatch, RouteMatch, Timeouts,
};
use crate::model::shapes::{
    DefaultGatewayRouteRewrite, GatewayRouteHostnameMatch, HttpGatewayRouteMatch,
    HttpGatewayRouteRewrite,
};
use crate::telemetry::proxy::{Direction, Edge, EdgeStats};

/// One gateway listener's routes, ready to match.
pub struct GatewayPort {
    /// The matchers (hostname aside), one per route, in order.
    table: RouteTable,
    routes: Vec<(Option<HostTest>, CompiledGatewayRoute)>,
    /// The listener's own TLS (`None`: plaintext).
    pub tls: Option<Arc<GatewayTls>>,
    /// Where the gateway's own refusals on this listener are counted.
    pub unrouted: Arc<EdgeStats>,
}

enum HostTest {
    Exact(String),
    Suffix(String),
}

impl HostTest {
    fn new(m: &GatewayRouteHostnameMatch) -> Option<Self> {
        match (&m.exact, &m.suffix) {
            (Some(e), _) => Some(Self::Exact(e.to_ascii_lowercase())),
            (None, Some(s)) => Some(Self::Suffix(s.to_ascii_lowercase())),
            _ => None,
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(e) => host == e,
            Self::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
        }
    }
}

/// A gateway match as a route match: the same fields under the same names, less the hostname.
/// One that does not convert is an error, never a match of everything.
fn as_route_match(route: &str, m: &GatewayRouteMatch) -> Result<RouteMatch, RoutingError> {
    fn convert<T: serde::de::DeserializeOwned>(v: impl serde::Serialize) -> Result<T, String> {
        let mut v = serde_json::to_value(v).map_err(|e| e.to_string())?;
        if let Some(fields) = v.as_object_mut() {
            fields.remove("hostname");
        }
        serde_json::from_value(v).map_err(|e| e.to_string())
    }
    let converted = match m {
        GatewayRouteMatch::Http(h) => convert(h).map(RouteMatch::Http),
        GatewayRouteMatch::Grpc(g) => convert(g).map(RouteMatch::Grpc),
    };
    converted.map_err(|why| RoutingError::GatewayMatch {
        route: route.to_string(),
        why,
    })
}

impl GatewayPort {
    pub fn new(l: &GatewayListener) -> Result<Self, RoutingError> {
        let as_routes = l
            .routes
            .iter()
            .map(|r| {
                Ok(CompiledRoute {
                    name: r.name.clone(),
                    priority: r.priority,
                    matcher: as_route_match(&r.name, &r.matcher)?,
                    targets: Vec::new(),
                    // Matching only: the target service's own routes carry the policy.
                    retry: default_retry(),
                    timeouts: Timeouts::default(),
                })
            })
            .collect::<Result<Vec<_>, RoutingError>>()?;
        let routes = l
            .routes
            .iter()
            .map(|r| {
                let host = match &r.matcher {
                    GatewayRouteMatch::Http(h) => h.hostname.as_ref(),
                    GatewayRouteMatch::Grpc(g) => g.hostname.as_ref(),
                };
                (host.and_then(HostTest::new), r.clone())
            })
            .collect();
        Ok(Self {
            table: RouteTable::new(&as_routes)?,
            routes,
            tls: GatewayTls::load(l)?,
            unrouted: Arc::new(EdgeStats::detached()),
        })
    }

    fn select(&self, head: &RequestHead<'_>, host: &str) -> Option<&CompiledGatewayRoute> {
        self.routes
            .iter()
            .enumerate()
            .find(|(i, (h, _))| {
                h.as_ref().is_none_or(|h| h.matches(host)) && self.table.matches_at(*i, head)
            })
            .map(|(_, (_, r))| r)
    }
}

/// The request's host, lower case, without a port.
pub(crate) fn host_of<B>(req: &Request<B>) -> String {
    let raw = req
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(|h| h.rsplit_once(':').map_or(h, |(h, _)| h).to_string())
        })
        .unwrap_or_default();
    raw.trim_end_matches('.').to_ascii_lowercase()
}

/// A request on gateway listener `port`.
pub async fn request(shared: &Arc<Shared>, port: u16, mut req: Request<Body>) -> Response<Body> {
    let started = Instant::now();
    let routing = shared.routing.borrow().clone();
    let gw = routing.gateway.get(&port);
    let refuse = |req: &Request<Body>, e: &UpstreamError| {
        let resp = local_reply::refuse(req, e);
        let grpc = local_reply::is_grpc(req.headers());
        let edge = match gw {
            Some(gw) => gw.unrouted.clone(),
            // The listener left the config as this request came.
            None => shared
                .metrics
                .edge(Edge::unrouted(Direction::Gateway, port)),
        };
        let resp = stats::count_unrouted(&edge, started, grpc, resp);
        // Logged (as Envoy logs its `NR`s) where the spec asks: no target port was chosen, so
        // in the gateway's own log, not a port's.
        access::answered_here(routing.access_log.as_ref(), req, resp, e.flag())
    };
    let Some(gw) = gw else {
        return refuse(&req, &UpstreamError::NoRoute);
    };
    let host = host_of(&req);
    let head = RequestHead::of(&req, port);
    let Some(route) = gw.select(&head, &host) else {
        return refuse(&req, &UpstreamError::NoRoute);
    };
    let target = match route.port {
        Some(p) => routing.by_name.get(&route.virtual_service, p),
        None => routing.by_name.first(&route.virtual_service),
    };
    let Some(target) = target.cloned() else {
        let e = UpstreamError::NoEndpoint(format!(
            "gateway route {}: virtual service {} has no listener to send to",
            route.name, route.virtual_service
        ));
        return refuse(&req, &e);
    };
    if let Err(e) = rewrite(&mut req, route) {
        return refuse(&req, &e);
    }
    outbound::forward(shared, &target, req, started).await
}

/// App Mesh's rewrites: Host to the target service's name and the matched prefix to `/` unless
/// disabled; a prefix `value` or an exact `path` instead when given.
fn rewrite<B>(req: &mut Request<B>, route: &CompiledGatewayRoute) -> Result<(), UpstreamError> {
    let none = HttpGatewayRouteRewrite {
        hostname: None,
        path: None,
        prefix: None,
    };
    let rw = route.rewrite.as_ref().unwrap_or(&none);
    let host_on = rw.hostname.as_ref().and_then(|h| h.default_target_hostname)
        != Some(DefaultGatewayRouteRewrite::Disabled);
    // Both are worked out before either is applied: a refused request is logged as it came.
    let host = host_on
        .then(|| HeaderValue::from_str(&route.virtual_service))
        .transpose()
        .map_err(|_| UpstreamError::BadRequest("target service name".into()))?;
    let uri = match &route.matcher {
        GatewayRouteMatch::Http(m) => rewritten_uri(req.uri(), m, rw)?,
        _ => None,
    };
    if let Some(v) = host {
        req.headers_mut().insert(http::header::HOST, v);
    }
    if let Some(uri) = uri {
        *req.uri_mut() = uri;
    }
    Ok(())
}

/// The path (query kept) an HTTP gateway route's rewrite makes of `uri`, if it changes it.
fn rewritten_uri(
    uri: &Uri,
    m: &HttpGatewayRouteMatch,
    rw: &HttpGatewayRouteRewrite,
) -> Result<Option<Uri>, UpstreamError> {
    let path = uri.path();
    let new_path = if let Some(exact) = rw.path.as_ref().and_then(|p| p.exact.as_ref()) {
        Some(exact.clone())
    } else if let Some(prefix) = &m.prefix {
        let rest = path.strip_prefix(prefix.as_str()).unwrap_or(path);
        match rw.prefix.as_ref() {
            Some(p) if p.value.is_some() => {
                let value = p.value.as_deref().unwrap_or("/");
                Some(join(value, rest))
            }
            Some(p) if p.default_prefix == Some(DefaultGatewayRouteRewrite::Disabled) => None,
            _ => Some(join("/", rest)),
        }
    } else {
        None
    };
    let Some(p) = new_path else {
        return Ok(None);
    };
    let pq = match uri.query() {
        Some(q) => format!("{p}?{q}"),
        None => p,
    };
    pq.parse()
        .map(Some)
        .map_err(|_| UpstreamError::BadRequest(format!("rewritten path {pq:?}")))
}

/// `value` then `rest`, with one slash between them where both have one.
fn join(value: &str, rest: &str) -> String {
    if value.ends_with('/') {
        format!("{value}{}", rest.trim_start_matches('/'))
    } else {
        format!("{value}{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::shapes::{HttpGatewayRouteMatch, HttpGatewayRoutePrefixRewrite};

    fn route(prefix: &str, rewrite: Option<HttpGatewayRouteRewrite>) -> CompiledGatewayRoute {
        let m: HttpGatewayRouteMatch =
            serde_json::from_value(serde_json::json!({"prefix": prefix})).unwrap();
        CompiledGatewayRoute {
            name: "r".into(),
            priority: None,
            matcher: GatewayRouteMatch::Http(m),
            virtual_service: "books.demo.local".into(),
            port: None,
            rewrite,
        }
    }

    fn rewritten(path: &str, r: &CompiledGatewayRoute) -> (String, String) {
        let mut req = Request::get(path)
            .header("host", "gw.example.com")
            .body(())
            .unwrap();
        rewrite(&mut req, r).unwrap();
        (
            req.uri().to_string(),
            req.headers()["host"].to_str().unwrap().to_string(),
        )
    }

    #[test]
    fn the_default_rewrites_host_and_the_matched_prefix() {
        let r = route("/chapter", None);
        assert_eq!(rewritten("/chapter/1?x=2", &r).0, "/1?x=2");
        assert_eq!(rewritten("/chapter", &r).0, "/");
        assert_eq!(rewritten("/chapter/", &r).1, "books.demo.local");
    }

    #[test]
    fn rewrites_can_be_disabled_or_given() {
        let off = HttpGatewayRouteRewrite {
            hostname: serde_json::from_value(
                serde_json::json!({"defaultTargetHostname": "DISABLED"}),
            )
            .ok(),
            path: None,
            prefix: Some(HttpGatewayRoutePrefixRewrite {
                default_prefix: Some(DefaultGatewayRouteRewrite::Disabled),
                value: None,
            }),
        };
        assert_eq!(
            rewritten("/chapter/1", &route("/chapter", Some(off))),
            ("/chapter/1".into(), "gw.example.com".into())
        );
        let value = HttpGatewayRouteRewrite {
            hostname: None,
            path: None,
            prefix: Some(HttpGatewayRoutePrefixRewrite {
                default_prefix: None,
                value: Some("/v2/".into()),
            }),
        };
        assert_eq!(
            rewritten("/chapter/1", &route("/chapter", Some(value))).0,
            "/v2/1"
        );
    }

    /// Every field of a gateway match reaches the matcher as the route match's field of the
    /// same name (the hostname is the gateway's own test).
    #[test]
    fn gateway_matches_convert_field_for_field() {
        let http = serde_json::json!({
            "prefix": "/p", "path": {"regex": "/v[0-9]+"}, "method": "PATCH", "port": 8080,
            "headers": [
                {"name": "a", "match": {"exact": "1"}},
                {"name": "b", "invert": true, "match": {"prefix": "x"}},
                {"name": "c", "match": {"suffix": "y"}},
                {"name": "d", "match": {"regex": "z+"}},
                {"name": "e", "match": {"range": {"start": 1, "end": 9}}},
            ],
            "queryParameters": [{"name": "q", "match": {"exact": "1"}}, {"name": "flag"}],
        });
        let grpc = serde_json::json!({
            "serviceName": "pkg.Svc", "port": 50051,
            "metadata": [
                {"name": "a", "match": {"exact": "1"}},
                {"name": "b", "invert": true, "match": {"prefix": "x"}},
                {"name": "c", "match": {"suffix": "y"}},
                {"name": "d", "match": {"regex": "z+"}},
                {"name": "e", "match": {"range": {"start": 1, "end": 9}}},
            ],
        });
        let with_host = |mut v: serde_json::Value| {
            v["hostname"] = serde_json::json!({"suffix": ".example"});
            v
        };
        let m = GatewayRouteMatch::Http(serde_json::from_value(with_host(http.clone())).unwrap());
        assert_eq!(
            as_route_match("r", &m).unwrap(),
            RouteMatch::Http(serde_json::from_value(http).unwrap())
        );
        let m = GatewayRouteMatch::Grpc(serde_json::from_value(with_host(grpc.clone())).unwrap());
        assert_eq!(
            as_route_match("r", &m).unwrap(),
            RouteMatch::Grpc(serde_json::from_value(grpc).unwrap())
        );
    }
}
