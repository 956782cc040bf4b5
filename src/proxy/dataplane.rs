//! The request path of a virtual node's proxy, for HTTP/1.1 and HTTP/2 (h2c) so far:
//! outbound, the app calls a backend's VIP:port; the proxy matches the listener's routes,
//! picks a weighted target and one of its endpoints (round robin) and sends the request to
//! that peer's inbound listener over pooled HTTP/2, within the route's per-request timeout.
//! Inbound, a peer's request names the app port it is for (`x-trellis-target-port`) and goes
//! to the app on that port. Each config is compiled into a `Routing` that requests take a
//! reference to, so a swap never disturbs requests in flight; VIP listeners come and go with
//! the backends.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::balance::{RoundRobin, WeightedPicker};
use super::discovery::AppliedConfig;
use super::route::{MatcherError, RequestHead, RouteTable};
use super::upstream::{Body, Hop, TARGET_PORT, UpstreamError, Upstreams};
use crate::model::proxy_config::ProxyConfig;
use crate::model::shapes::PortProtocol;

/// One outbound VIP:port.
struct OutboundPort {
    table: RouteTable,
    /// One per route of `table`, same order.
    targets: Vec<RouteTargets>,
}

/// A route's weighted targets, resolved to their clusters when the config is built so a
/// request only picks.
struct RouteTargets {
    picker: WeightedPicker,
    /// Per target; `None` when the config has no cluster for it.
    clusters: Vec<Option<Arc<Cluster>>>,
}

struct Cluster {
    endpoints: Vec<SocketAddr>,
    next: RoundRobin,
}

/// Everything a request needs, compiled from one config.
#[derive(Default)]
pub struct Routing {
    outbound: HashMap<SocketAddr, OutboundPort>,
    /// The node's listeners: app port → protocol.
    inbound: HashMap<u16, PortProtocol>,
}

impl Routing {
    /// Compiles a config; a route that cannot be matched (a bad regex) refuses it.
    pub fn build(config: &ProxyConfig) -> Result<Routing, MatcherError> {
        let mut r = Routing::default();
        let mut clusters: HashMap<(String, u16), Arc<Cluster>> = HashMap::new();
        for c in &config.clusters {
            clusters.insert(
                (c.virtual_node.clone(), c.port),
                Arc::new(Cluster {
                    endpoints: c.endpoints.iter().map(|e| e.address).collect(),
                    next: RoundRobin::default(),
                }),
            );
        }
        for svc in &config.outbound {
            let Some(vip) = svc.vip else { continue };
            for l in &svc.listeners {
                if l.protocol == PortProtocol::Tcp {
                    continue;
                }
                let table = RouteTable::new(&l.routes)?;
                let targets = table
                    .routes()
                    .map(|route| RouteTargets {
                        picker: WeightedPicker::new(route.targets.iter().map(|t| t.weight)),
                        clusters: route
                            .targets
                            .iter()
                            .map(|t| clusters.get(&(t.virtual_node.clone(), t.port)).cloned())
                            .collect(),
                    })
                    .collect();
                r.outbound.insert(
                    SocketAddr::new(IpAddr::V4(vip), l.port),
                    OutboundPort { table, targets },
                );
            }
        }
        for l in &config.inbound {
            r.inbound.insert(l.port, l.protocol);
        }
        Ok(r)
    }

    /// The VIP:ports the proxy listens on for this config.
    fn vip_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.outbound.keys().copied()
    }
}

/// How the data plane is placed on this host.
#[derive(Debug, Clone)]
pub struct DataplaneSettings {
    /// Where the app listens (its listener ports on this address).
    pub app_host: IpAddr,
    /// Whether to bind the backends' VIP:ports (off when several proxies share a host).
    pub vip_listeners: bool,
}

struct Shared {
    routing: watch::Receiver<Arc<Routing>>,
    upstreams: Upstreams,
    settings: DataplaneSettings,
}

/// Serves `inbound` and the VIP listeners of each config in force until `stop`.
pub async fn run(
    settings: DataplaneSettings,
    inbound: TcpListener,
    mut config: watch::Receiver<Option<Arc<AppliedConfig>>>,
    mut stop: watch::Receiver<bool>,
) {
    let (routing_tx, routing) = watch::channel(Arc::new(Routing::default()));
    let shared = Arc::new(Shared {
        routing,
        upstreams: Upstreams::default(),
        settings,
    });
    let inbound_task = {
        let shared = shared.clone();
        tokio::spawn(serve(inbound, move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(inbound_request(&shared, req).await) }
        }))
    };
    let mut vips: HashMap<SocketAddr, AbortHandle> = HashMap::new();
    loop {
        let applied = config.borrow_and_update().clone();
        if let Some(applied) = applied {
            match Routing::build(&applied.config) {
                Ok(r) => {
                    let wanted: Vec<SocketAddr> = if shared.settings.vip_listeners {
                        r.vip_addrs().collect()
                    } else {
                        Vec::new()
                    };
                    routing_tx.send_replace(Arc::new(r));
                    reconcile(&shared, &mut vips, &wanted).await;
                }
                // `discovery::check` refuses such configs; a cached one may still be bad.
                Err(e) => tracing::warn!(error = %e, "config not applied to the data plane"),
            }
        }
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            _ = stop.changed() => break,
        }
    }
    for (_, h) in vips {
        h.abort();
    }
    inbound_task.abort();
}

/// Binds new VIP listeners and stops the ones no longer wanted (their open connections
/// finish).
async fn reconcile(
    shared: &Arc<Shared>,
    vips: &mut HashMap<SocketAddr, AbortHandle>,
    wanted: &[SocketAddr],
) {
    vips.retain(|addr, h| {
        let keep = wanted.contains(addr);
        if !keep {
            h.abort();
            tracing::info!(%addr, "outbound listener closed");
        }
        keep
    });
    for addr in wanted {
        if vips.contains_key(addr) {
            continue;
        }
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                let shared = shared.clone();
                let local = *addr;
                let task = tokio::spawn(serve(listener, move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(outbound_request(&shared, local, req).await) }
                }));
                vips.insert(*addr, task.abort_handle());
                tracing::info!(%addr, "outbound listener open");
            }
            Err(e) => tracing::warn!(%addr, error = %e, "cannot open an outbound listener"),
        }
    }
}

/// Accepts connections and serves each (HTTP/1.1 or h2c) in its own task.
async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(handler);
            if let Err(e) = Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .await
            {
                tracing::debug!(error = %e, "connection");
            }
        });
    }
}

async fn outbound_request(
    shared: &Shared,
    local: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let routing = shared.routing.borrow().clone();
    let Some(port) = routing.outbound.get(&local) else {
        return UpstreamError::NoRoute.response();
    };
    let head = RequestHead {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
        scheme: "http",
        port: local.port(),
    };
    let Some(i) = port.table.select_index(&head) else {
        return UpstreamError::NoRoute.response();
    };
    let (Some(route), Some(targets)) = (port.table.route(i), port.targets.get(i)) else {
        return UpstreamError::NoRoute.response();
    };
    let Some(t) = targets.picker.pick() else {
        return UpstreamError::NoEndpoint(format!("route {}", route.name)).response();
    };
    let (Some(target), Some(cluster)) = (route.targets.get(t), targets.clusters.get(t)) else {
        return UpstreamError::NoEndpoint(format!("route {}", route.name)).response();
    };
    let endpoint = cluster
        .as_ref()
        .and_then(|c| c.next.pick(&c.endpoints))
        .copied();
    let Some(endpoint) = endpoint else {
        return UpstreamError::NoEndpoint(format!("{}:{}", target.virtual_node, target.port))
            .response();
    };
    req.headers_mut()
        .insert(TARGET_PORT, http::HeaderValue::from(target.port));
    let send = shared.upstreams.send(Hop::Peer(endpoint), req);
    let limit = route.timeouts.per_request_ms;
    let result = if limit == 0 {
        send.await
    } else {
        match tokio::time::timeout(Duration::from_millis(limit), send).await {
            Ok(r) => r,
            Err(_) => return timeout_response(limit),
        }
    };
    result.unwrap_or_else(|e| e.response())
}

fn timeout_response(ms: u64) -> Response<Body> {
    let mut r = Response::new(super::upstream::full(format!(
        "trellis: upstream request timeout ({ms} ms)\n"
    )));
    *r.status_mut() = http::StatusCode::GATEWAY_TIMEOUT;
    r
}

async fn inbound_request(shared: &Shared, mut req: Request<Incoming>) -> Response<Body> {
    let port = req
        .headers_mut()
        .remove(TARGET_PORT)
        .and_then(|v| v.to_str().ok().and_then(|s| s.parse::<u16>().ok()));
    let Some(port) = port else {
        return UpstreamError::BadRequest(format!("missing or invalid {TARGET_PORT}")).response();
    };
    let protocol = shared.routing.borrow().inbound.get(&port).copied();
    let Some(protocol) = protocol else {
        return UpstreamError::NoEndpoint(format!("this node has no listener on port {port}"))
            .response();
    };
    let h2 = matches!(protocol, PortProtocol::Http2 | PortProtocol::Grpc);
    let addr = SocketAddr::new(shared.settings.app_host, port);
    shared
        .upstreams
        .send(Hop::App { addr, h2 }, req)
        .await
        .unwrap_or_else(|e| e.response())
}
