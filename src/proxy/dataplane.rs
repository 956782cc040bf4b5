//! The data plane of a virtual node's proxy: its listeners and the compiled `Routing` that
//! requests read. Outbound, apps reach a backend on its VIP:port, or through the explicit
//! listener (`HTTP_PROXY`, routed by Host); `outbound` does the rest. Inbound, peers' requests
//! arrive on one listener (mTLS, see `inbound`) and go to the app. Each config is compiled
//! into a new `Routing` that requests take a reference to, so a swap never disturbs requests in
//! flight; per-host outlier state, retry budgets and pool counters carry over. VIP listeners
//! come and go with the backends.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::access::{AccessLogger, Downstream};
use super::balance::Balancer;
use super::balance::WeightedPicker;
use super::discovery::AppliedConfig;
use super::drain::{Drain, DrainWatch};
use super::gateway::GatewayPort;
use super::gateway_tls::{self, GatewayTlsError};
use super::guard;
use super::h1server;
use super::inbound::{self, InboundPort};
use super::outbound;
use super::outlier::{EndpointSet, OutlierSettings};
use super::retry::{BudgetSettings, RetryBudget};
use super::route::{MatcherError, RouteTable};
use super::shard::Shards;
use super::tls::{PeerIdentity, PeerTls};
use super::upstream::{Body, Upstreams, incoming};
use super::{RequestMap, RequestSet};
use crate::model::proxy_config::{AccessLog, OutboundService, ProxyConfig, ProxyRole};
use crate::model::shapes::{EgressFilterType, ListenerTlsMode, PortProtocol};
use crate::telemetry::access_log::{AccessLogFormat, AccessLogWriter};
use crate::telemetry::proxy::{
    ConnectionGuard, Direction, Edge, EdgeStats, ListenerKind, ProxyMetrics,
};
use crate::telemetry::trace::Tracer;
use prometheus_client::metrics::gauge::Gauge;

/// One port of a backend virtual service.
pub struct OutboundPort {
    pub service: String,
    pub port: u16,
    pub protocol: PortProtocol,
    pub table: RouteTable,
    /// One per route of `table`, same order.
    pub targets: Vec<RouteTargets>,
    pub budget: Arc<RetryBudget>,
    /// Requests that matched no route (or found no target).
    pub unrouted: Arc<EdgeStats>,
    pub access_log: Option<Arc<AccessLogger>>,
}

/// A route's weighted targets, resolved to their clusters when the config is built so a
/// request only picks.
pub struct RouteTargets {
    pub picker: WeightedPicker,
    /// Per target; `None` when the config has no cluster for it.
    pub clusters: Vec<Option<Arc<Cluster>>>,
    /// Per target.
    pub stats: Vec<Arc<EdgeStats>>,
}

/// Where a weighted target leads, as this caller reaches it.
pub struct Cluster {
    /// `virtualNode:port`, for messages.
    pub name: String,
    pub endpoints: EndpointSet,
    pub tls: PeerTlsChoice,
}

/// How to reach a target's proxies.
pub enum PeerTlsChoice {
    /// The target listener's TLS is DISABLED (and no client policy enforces TLS).
    Plain,
    /// mTLS when this proxy has a certificate; plaintext otherwise, unless `required`.
    Mtls {
        peer: Arc<PeerTls>,
        /// A client policy enforces TLS, or the target listener is STRICT.
        required: bool,
    },
}

/// Everything a request needs, compiled from one config.
#[derive(Default)]
pub struct Routing {
    pub mesh: String,
    pub role: Option<ProxyRole>,
    /// By VIP:port.
    pub outbound: RequestMap<SocketAddr, Arc<OutboundPort>>,
    /// By virtual service name and port, for the explicit listener and gateway routes.
    pub by_name: ByName,
    pub egress: Option<EgressFilterType>,
    /// The node's listeners by app port.
    pub inbound: RequestMap<u16, InboundPort>,
    pub allowed_callers: RequestSet<ProxyRole>,
    /// A virtual gateway's listeners by port.
    pub gateway: RequestMap<u16, GatewayPort>,
    clusters: HashMap<(String, u16), Arc<Cluster>>,
    /// The spec's `logging.accessLog`, if any.
    pub access_log: Option<Arc<AccessLogger>>,
}

impl Routing {
    /// Whether a config's matchers compile (a bad regex refuses it), without building the rest.
    pub fn check(config: &ProxyConfig) -> Result<(), RoutingError> {
        for l in config.outbound.iter().flat_map(|s| &s.listeners) {
            RouteTable::new(&l.routes)?;
        }
        for l in config.gateway.iter().flat_map(|g| &g.listeners) {
            GatewayPort::new(l)?;
        }
        if let Some(al) = &config.access_log {
            AccessLogFormat::new(al.format.as_ref())
                .map_err(|e| RoutingError::AccessLog(format!("format: {e}")))?;
        }
        Ok(())
    }

    /// Compiles a config; a route that cannot be matched (a bad regex) refuses it. State that
    /// outlives configs (outlier records, budgets, pools) comes from `previous`.
    pub fn build(
        config: &ProxyConfig,
        previous: &Routing,
        budget: BudgetSettings,
        balancer: Balancer,
        metrics: &ProxyMetrics,
    ) -> Result<Routing, RoutingError> {
        let direction = match config.role {
            ProxyRole::VirtualGateway(_) => Direction::Gateway,
            ProxyRole::VirtualNode(_) => Direction::Outbound,
        };
        let access_log = match &config.access_log {
            Some(al) => Some(Arc::new(access_logger(al, previous, metrics)?)),
            None => None,
        };
        let mut r = Routing {
            mesh: config.mesh.clone(),
            role: Some(config.role.clone()),
            egress: Some(config.egress_filter),
            allowed_callers: config.allowed_callers.iter().cloned().collect(),
            access_log: access_log.clone(),
            ..Routing::default()
        };
        let policies: HashMap<(String, u16), &OutboundService> = config
            .outbound
            .iter()
            .flat_map(|s| {
                s.listeners
                    .iter()
                    .flat_map(|l| &l.routes)
                    .map(move |rt| (s, rt))
            })
            .flat_map(|(s, rt)| {
                rt.targets
                    .iter()
                    .map(move |t| ((t.virtual_node.clone(), t.port), s))
            })
            .collect();
        for c in &config.clusters {
            let key = (c.virtual_node.clone(), c.port);
            let outlier = c.outlier_detection.as_ref().map(OutlierSettings::from);
            let old = previous.clusters.get(&key).map(|c| &c.endpoints);
            let policy = policies.get(&key).and_then(|s| s.client_policy.as_ref());
            r.clusters.insert(
                key,
                Arc::new(Cluster {
                    name: format!("{}:{}", c.virtual_node, c.port),
                    endpoints: EndpointSet::new(
                        c.endpoints.iter().map(|e| e.address),
                        outlier,
                        balancer,
                        old,
                    )
                    .counting_ejections(metrics.ejections(&c.virtual_node, c.port)),
                    tls: tls_choice(config, c, policy),
                }),
            );
        }
        for svc in &config.outbound {
            for l in &svc.listeners {
                let table = RouteTable::new(&l.routes)?;
                let edge = |route: &str, target: &str| {
                    metrics.edge(Edge {
                        direction,
                        port: l.port,
                        virtual_service: svc.virtual_service.clone(),
                        route: route.to_string(),
                        target_virtual_node: target.to_string(),
                        caller: String::new(),
                    })
                };
                let targets = table
                    .routes()
                    .map(|route| RouteTargets {
                        picker: WeightedPicker::new(route.targets.iter().map(|t| t.weight)),
                        clusters: route
                            .targets
                            .iter()
                            .map(|t| r.clusters.get(&(t.virtual_node.clone(), t.port)).cloned())
                            .collect(),
                        stats: route
                            .targets
                            .iter()
                            .map(|t| edge(&route.name, &t.virtual_node))
                            .collect(),
                    })
                    .collect();
                let budget = previous
                    .by_name
                    .get(&svc.virtual_service, l.port)
                    .map(|p| p.budget.clone())
                    .unwrap_or_else(|| Arc::new(RetryBudget::new(budget)));
                let port = Arc::new(OutboundPort {
                    service: svc.virtual_service.clone(),
                    port: l.port,
                    protocol: l.protocol,
                    table,
                    targets,
                    budget,
                    unrouted: edge("", ""),
                    access_log: access_log.clone(),
                });
                if let Some(vip) = svc.vip {
                    r.outbound
                        .insert(SocketAddr::new(IpAddr::V4(vip), l.port), port.clone());
                }
                r.by_name.insert(&svc.virtual_service, l.port, port);
            }
        }
        for l in config.gateway.iter().flat_map(|g| &g.listeners) {
            let mut port = GatewayPort::new(l)?;
            port.unrouted = metrics.edge(Edge::unrouted(Direction::Gateway, l.port));
            r.gateway.insert(l.port, port);
        }
        for l in &config.inbound {
            r.inbound.insert(
                l.port,
                InboundPort::new(
                    l,
                    previous.inbound.get(&l.port),
                    config,
                    metrics,
                    access_log.clone(),
                ),
            );
        }
        Ok(r)
    }

    /// The listeners this config wants: backends' VIP:ports (when `vips`) and a gateway's
    /// ports on `gateway_host`.
    fn listeners(&self, vips: bool, gateway_host: IpAddr) -> Vec<(SocketAddr, Kind)> {
        let mut out: Vec<(SocketAddr, Kind)> = Vec::new();
        if vips {
            out.extend(self.outbound.iter().map(|(a, p)| {
                let kind = if p.protocol == PortProtocol::Tcp {
                    Kind::Tcp
                } else {
                    Kind::Http
                };
                (*a, kind)
            }));
        }
        out.extend(
            self.gateway
                .keys()
                .map(|p| (SocketAddr::new(gateway_host, *p), Kind::Gateway(*p))),
        );
        out
    }

    /// Every target's hosts, for the admin server's `/clusters`.
    pub fn clusters_view(&self) -> serde_json::Value {
        let mut clusters: Vec<_> = self
            .clusters
            .values()
            .map(|c| {
                serde_json::json!({
                    "name": c.name,
                    "tls": match &c.tls {
                        PeerTlsChoice::Plain => "plaintext",
                        PeerTlsChoice::Mtls { required: true, .. } => "mtls",
                        PeerTlsChoice::Mtls { required: false, .. } => "mtls-when-possible",
                    },
                    "hosts": c.endpoints.view(),
                })
            })
            .collect();
        clusters.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        serde_json::json!({ "clusters": clusters })
    }

    /// A backend by the name and port a request carries (`Host`), or by its VIP.
    pub fn by_authority(&self, host: &str, port: u16) -> Option<&Arc<OutboundPort>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.outbound.get(&SocketAddr::new(ip, port));
        }
        self.by_name.get(host, port)
    }
}

/// Outbound ports by virtual service name, then port (a service has one or a few), so a lookup
/// by a request's Host borrows it instead of building a key.
pub struct ByName<T = Arc<OutboundPort>>(RequestMap<String, Vec<(u16, T)>>);

impl<T> Default for ByName<T> {
    fn default() -> Self {
        Self(RequestMap::default())
    }
}

impl<T> ByName<T> {
    /// By a name as a Host header carries it: any case (DNS names are case-insensitive),
    /// perhaps with the root's trailing dot.
    pub fn get(&self, host: &str, port: u16) -> Option<&T> {
        let ports = self.ports(host)?;
        ports.iter().find(|(p, _)| *p == port).map(|(_, t)| t)
    }

    /// The service's first listener in config order (a gateway route that names no port).
    pub fn first(&self, service: &str) -> Option<&T> {
        self.ports(service)?.first().map(|(_, t)| t)
    }

    fn ports(&self, name: &str) -> Option<&Vec<(u16, T)>> {
        let name = name.trim_end_matches('.');
        // Names are lowercase already nearly always: no copy then.
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.0.get(&name.to_ascii_lowercase())
        } else {
            self.0.get(name)
        }
    }

    fn insert(&mut self, service: &str, port: u16, value: T) {
        let key = service.trim_end_matches('.').to_ascii_lowercase();
        let ports = self.0.entry(key).or_default();
        match ports.iter_mut().find(|(p, _)| *p == port) {
            Some(slot) => slot.1 = value,
            None => ports.push((port, value)),
        }
    }
}

/// The spec's access log; the writer (and its open file) carries over while the path stays.
fn access_logger(
    al: &AccessLog,
    previous: &Routing,
    metrics: &ProxyMetrics,
) -> Result<AccessLogger, RoutingError> {
    let format = AccessLogFormat::new(al.format.as_ref())
        .map_err(|e| RoutingError::AccessLog(format!("format: {e}")))?;
    let writer = match &previous.access_log {
        Some(p) if p.writer.path() == al.path => p.writer.clone(),
        _ => Arc::new(
            AccessLogWriter::open(&al.path, metrics.access_log_dropped())
                .map_err(|e| RoutingError::AccessLog(format!("{}: {e}", al.path)))?,
        ),
    };
    Ok(AccessLogger { format, writer })
}

/// App Mesh's rules: a client policy that applies to the port enforces TLS (with its SAN and
/// trust rules); a DISABLED target listener is plaintext; otherwise mesh mTLS.
fn tls_choice(
    config: &ProxyConfig,
    cluster: &crate::model::proxy_config::Cluster,
    policy: Option<&crate::model::shapes::ClientPolicy>,
) -> PeerTlsChoice {
    let tls = policy.and_then(|p| p.tls.as_ref()).filter(|t| {
        t.enforce != Some(false)
            && t.ports
                .as_ref()
                .is_none_or(|ps| ps.is_empty() || ps.iter().any(|p| *p == i64::from(cluster.port)))
    });
    if tls.is_none() && cluster.tls_mode == Some(ListenerTlsMode::Disabled) {
        return PeerTlsChoice::Plain;
    }
    let validation = tls.map(|t| &t.validation);
    let peer = PeerTls {
        sans: validation
            .and_then(|v| v.subject_alternative_names.as_ref())
            .map(|s| s.r#match.exact.clone())
            .unwrap_or_default(),
        mesh: config.mesh.clone(),
        virtual_node: cluster.virtual_node.clone(),
        trust_file: validation
            .and_then(|v| v.trust.file.as_ref())
            .map(|f| f.certificate_chain.clone()),
        certificate_file: tls
            .and_then(|t| t.certificate.as_ref())
            .and_then(|c| c.file.as_ref())
            .map(|f| (f.certificate_chain.clone(), f.private_key.clone())),
    };
    PeerTlsChoice::Mtls {
        peer: Arc::new(peer),
        required: tls.is_some() || cluster.tls_mode == Some(ListenerTlsMode::Strict),
    }
}

/// What a listener the config asks for serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A backend's HTTP (or HTTP/2, gRPC) VIP:port.
    Http,
    /// A backend's TCP VIP:port.
    Tcp,
    /// A virtual gateway listener.
    Gateway(u16),
}

/// Why a config cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Matcher(#[from] MatcherError),
    #[error(transparent)]
    GatewayTls(#[from] GatewayTlsError),
    #[error("logging.accessLog.file: {0}")]
    AccessLog(String),
    #[error("gateway route {route}: spec.*Route.match: {why}")]
    GatewayMatch { route: String, why: String },
}

/// How the data plane is placed on this host.
#[derive(Debug, Clone)]
pub struct DataplaneSettings {
    /// Where the app listens (its listener ports on this address).
    pub app_host: IpAddr,
    /// Whether to bind the backends' VIP:ports (off when several proxies share a host).
    pub vip_listeners: bool,
    pub budget: BudgetSettings,
    /// How an endpoint of a target is chosen.
    pub balancer: Balancer,
    /// Where a virtual gateway's listeners are bound (their ports come from its spec).
    pub gateway_host: IpAddr,
    /// How long a stopping proxy lets requests in flight finish.
    pub drain: Duration,
}

pub struct Shared {
    pub routing: watch::Receiver<Arc<Routing>>,
    pub metrics: Arc<ProxyMetrics>,
    /// Inbound requests that name no listener of this node.
    pub unrouted_inbound: Arc<EdgeStats>,
    /// Requests on the explicit listener for destinations that are not backends (refused by
    /// the egress filter or passed through), as Envoy's one BlackHole / Passthrough cluster:
    /// one edge, port 0, whatever the destination.
    pub unrouted_egress: Arc<EdgeStats>,
    pub tracer: Option<Tracer>,
    pub upstreams: Upstreams,
    pub settings: DataplaneSettings,
    pub drain: Drain,
}

impl Shared {
    /// The connection to attach to requests, while the config in force has access logs.
    pub fn downstream(
        &self,
        tcp: &tokio::net::TcpStream,
        remote: SocketAddr,
        server_name: Option<String>,
    ) -> Option<Downstream> {
        self.routing
            .borrow()
            .access_log
            .is_some()
            .then(|| Downstream {
                remote,
                local: tcp.local_addr().ok(),
                server_name,
            })
    }
}

/// The sockets the data plane serves, bound by the caller (so port 0 can be reported).
pub struct Listeners {
    pub inbound: TcpListener,
    /// The explicit outbound listener (`HTTP_PROXY`).
    pub outbound: Option<TcpListener>,
}

/// What the data plane reports to the admin server: its metrics, and the routing in force
/// (for `/clusters`).
pub struct Reporting {
    pub metrics: Arc<ProxyMetrics>,
    pub routing: watch::Sender<Arc<Routing>>,
    /// Where spans go (OTLP), when tracing is on.
    pub tracer: Option<Tracer>,
}

/// Serves the listeners and the VIP listeners of each config in force until `stop`.
/// Connections are served on shard 0 (this runtime) and on `workers` (see `shard`).
pub async fn run(
    settings: DataplaneSettings,
    listeners: Listeners,
    identity: Arc<PeerIdentity>,
    mut config: watch::Receiver<Option<Arc<AppliedConfig>>>,
    mut stop: watch::Receiver<bool>,
    reporting: Reporting,
    workers: Vec<Handle>,
) {
    let Reporting {
        metrics,
        routing: routing_tx,
        tracer,
    } = reporting;
    let unrouted_inbound = metrics.edge(Edge::unrouted(Direction::Inbound, 0));
    let unrouted_egress = metrics.edge(Edge::unrouted(Direction::Outbound, 0));
    let drain = Drain::default();
    let shards = Shards::new(&workers, || Shared {
        tracer: tracer.clone(),
        routing: routing_tx.subscribe(),
        unrouted_inbound: unrouted_inbound.clone(),
        unrouted_egress: unrouted_egress.clone(),
        upstreams: Upstreams::new(identity.clone(), metrics.clone()),
        metrics: metrics.clone(),
        settings: settings.clone(),
        drain: drain.clone(),
    });
    let shared = shards.first().clone();
    let mut tasks =
        vec![tokio::spawn(inbound::serve(shards.clone(), listeners.inbound)).abort_handle()];
    if let Some(l) = listeners.outbound {
        let connections = shared.metrics.connections(ListenerKind::Outbound);
        let task = tokio::spawn(serve(shards.clone(), l, connections, |s, req| async move {
            Ok::<_, Infallible>(outbound::explicit(&s, req).await)
        }));
        tasks.push(task.abort_handle());
    }
    let mut vips: HashMap<SocketAddr, AbortHandle> = HashMap::new();
    // The listeners the config asks for, and those of them that could not be opened yet.
    let mut wanted = Vec::new();
    let mut failing = HashSet::new();
    'configs: loop {
        let applied = config.borrow_and_update().clone();
        if let Some(applied) = applied {
            let previous = shared.routing.borrow().clone();
            match Routing::build(
                &applied.config,
                &previous,
                shared.settings.budget,
                shared.settings.balancer,
                &shared.metrics,
            ) {
                Ok(r) => {
                    wanted =
                        r.listeners(shared.settings.vip_listeners, shared.settings.gateway_host);
                    identity.set_trust(
                        &applied.config.trust_bundle,
                        inbound::client_roots(&applied.config),
                    );
                    routing_tx.send_replace(Arc::new(r));
                    shared.metrics.set_config_version(applied.version);
                    reconcile(&shards, &mut vips, &wanted, &mut failing).await;
                }
                // `discovery::check` refuses such configs; a cached one may still be bad.
                Err(e) => tracing::warn!(error = %e, "config not applied to the data plane"),
            }
        }
        // Until the next config: a port in use (another process, one not yet gone) is tried
        // again every second, rather than left closed until the config changes.
        loop {
            tokio::select! {
                changed = config.changed() => if changed.is_err() { break 'configs } else { break },
                _ = stop.changed() => break 'configs,
                () = tokio::time::sleep(LISTENER_RETRY), if !failing.is_empty() => {
                    reconcile(&shards, &mut vips, &wanted, &mut failing).await;
                }
            }
        }
    }
    // Stop accepting, then let what is in flight finish.
    for (_, h) in vips {
        h.abort();
    }
    for t in tasks {
        t.abort();
    }
    let within = shared.settings.drain;
    if shared.drain.drain(within).await {
        tracing::info!("drained: every connection finished");
    } else {
        tracing::warn!(
            ?within,
            "drain time over; closing the connections still open"
        );
    }
}

/// How often a listener that could not be opened is tried again.
const LISTENER_RETRY: Duration = Duration::from_secs(1);

/// Binds new VIP and gateway listeners and stops the ones no longer wanted (their open
/// connections finish).
async fn reconcile(
    shards: &Shards<Shared>,
    vips: &mut HashMap<SocketAddr, AbortHandle>,
    wanted: &[(SocketAddr, Kind)],
    failing: &mut HashSet<SocketAddr>,
) {
    failing.retain(|addr| wanted.iter().any(|(a, _)| a == addr));
    vips.retain(|addr, h| {
        let keep = wanted.iter().any(|(a, _)| a == addr);
        if !keep {
            h.abort();
            tracing::info!(%addr, "listener closed");
        }
        keep
    });
    for (addr, kind) in wanted {
        if vips.contains_key(addr) {
            continue;
        }
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                let shards = shards.clone();
                let local = *addr;
                let task = match *kind {
                    Kind::Tcp => tokio::spawn(outbound::serve_tcp(shards, listener, local)),
                    Kind::Http => {
                        let connections = shards.first().metrics.connections(ListenerKind::Vip);
                        tokio::spawn(serve(
                            shards,
                            listener,
                            connections,
                            move |s, req| async move {
                                Ok::<_, Infallible>(outbound::vip(&s, local, req).await)
                            },
                        ))
                    }
                    Kind::Gateway(port) => tokio::spawn(gateway_tls::serve(shards, listener, port)),
                };
                vips.insert(*addr, task.abort_handle());
                failing.remove(addr);
                tracing::info!(%addr, ?kind, "listener open");
            }
            // Said once; the retries every second are quiet.
            Err(e) if failing.insert(*addr) => {
                tracing::warn!(%addr, error = %e, "cannot open a listener; trying again every second");
            }
            Err(e) => tracing::debug!(%addr, error = %e, "cannot open a listener"),
        }
    }
}

/// How long a client may take to send a request head (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP server settings every listener shares.
pub fn http_builder() -> Builder<TokioExecutor> {
    let mut b = Builder::new(TokioExecutor::new());
    // The header-read deadline is armed before every request head: a timer with slack, one
    // per connection (see `timer`), makes that a comparison, not a timer-wheel move.
    b.http1()
        .timer(super::timer::SlackTimer::default())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(guard::MAX_HEAD_BYTES);
    b.http2().timer(TokioTimer::new());
    b
}

/// The next connection (no Nagle); accept errors (out of descriptors) pause briefly.
pub async fn accept(listener: &TcpListener) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, from)) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, from);
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accepts connections and serves each (HTTP/1.1 or h2c) in its own task on a shard, counted
/// on `connections` while open; requests carry their connection while access logs are on.
pub async fn serve<F, Fut>(
    shards: Shards<Shared>,
    listener: TcpListener,
    connections: Gauge,
    handler: F,
) where
    F: Fn(Arc<Shared>, Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    loop {
        let (tcp, from) = accept(&listener).await;
        let open = ConnectionGuard::new(connections.clone());
        let handler = handler.clone();
        shards.place(tcp, move |shared, tcp| async move {
            let downstream = shared.downstream(&tcp, from, None);
            let drain = shared.drain.clone();
            let handler = move |mut req: Request<Body>| {
                Downstream::attach(&downstream, &mut req);
                handler(shared.clone(), req)
            };
            serve_plain(drain, tcp, handler).await;
            drop(open);
        });
    }
}

/// A plaintext HTTP connection: the request-head guard, then HTTP/1.1 or h2c.
pub async fn serve_plain<F, Fut>(drain: Drain, tcp: tokio::net::TcpStream, handler: F)
where
    F: Fn(Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    if let guard::Verdict::Refuse(status, why) = guard::first_head(&tcp, HEADER_READ_TIMEOUT).await
    {
        guard::refuse(tcp, status, &why).await;
        return;
    }
    serve_http1(drain, tcp, handler).await;
}

/// HTTP/1.1 (or h2c, which hyper finds) on `io`: plain requests on our own codec; the first
/// that is not, and all after it, on hyper's.
pub async fn serve_http1<S, F, Fut>(drain: Drain, io: S, handler: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let Some(watch) = drain.watch() else {
        return;
    };
    if let Some((rest, watch)) = h1server::serve(io, watch, &handler).await {
        serve_watched(watch, TokioIo::new(rest), handler).await;
    }
}

/// HTTP/1.1 or HTTP/2 on `io` (plain or TLS), until it ends or the drain ends it.
pub async fn serve_connection<I, F, Fut>(drain: Drain, io: I, handler: F)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    F: Fn(Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    if let Some(watch) = drain.watch() {
        serve_watched(watch, io, handler).await;
    }
}

/// [`serve_connection`] for a connection already in the drain.
async fn serve_watched<I, F, Fut>(watch: DrainWatch, io: I, handler: F)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    F: Fn(Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    // Boxed: hyper moves a request's future into place (HTTP/1.1) or into a task of its own
    // (HTTP/2); a pointer moves for nothing, the future itself is kilobytes.
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        super::trim::note_request();
        Box::pin(handler(req.map(incoming)))
    });
    let conn = http_builder()
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    watch.serve(conn, |c| c.graceful_shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::ByName;

    #[test]
    fn by_name_finds_a_host_in_any_case_with_or_without_the_root_dot() {
        let mut m = ByName::default();
        m.insert("app.mesh.local", 80, 1);
        m.insert("App.Mesh.Local", 9090, 2);
        m.insert("app.mesh.local", 80, 3);
        for host in ["app.mesh.local", "App.Mesh.LOCAL", "app.mesh.local."] {
            assert_eq!(m.get(host, 80), Some(&3), "{host}");
            assert_eq!(m.get(host, 9090), Some(&2), "{host}");
        }
        assert_eq!(m.get("app.mesh.local", 81), None);
        assert_eq!(m.get("other.mesh.local", 80), None);
        assert_eq!(m.first("APP.mesh.local"), Some(&3));
        assert_eq!(m.first("other.mesh.local"), None);
    }
}
