//! The inbound listener: peers' requests for this node's app. A connection that opens with a
//! TLS handshake is served over mTLS (the caller must present a certificate chaining to the
//! mesh bundle, or to a listener's `validation.trust`); otherwise it is plaintext. Each request
//! names its app port (`x-trellis-target-port`), and that listener's rules apply in this order:
//! its TLS mode (STRICT, and the mesh default when this proxy has a certificate, refuse
//! plaintext), its SAN rules, App Mesh's access model (the caller's virtual node must list a
//! virtual service that routes here among its backends), its connection pool (503 when full),
//! then the app.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::access::{AccessLogger, Downstream, Pending, Served};
use super::dataplane::{Shared, http_builder};
use super::guard;
use super::idle;
use super::local_reply;
use super::shard::Shards;
use super::stats;
use super::tls::{self, Caller};
use super::tunnel;
use super::upstream::{Body, Hop, TARGET_PORT, UpstreamError, incoming};
use crate::model::proxy_config::{InboundListener, ProxyConfig, ProxyRole, Timeouts};
use crate::model::shapes::{ListenerTlsMode, PortProtocol, VirtualNodeConnectionPool};
use crate::telemetry::proxy::{
    ConnectionGuard, Direction, Edge, EdgeStats, ListenerKind, ProxyMetrics,
};
use crate::telemetry::trace::ActiveSpan;
use prometheus_client::metrics::counter::Counter;

/// One of the node's listeners, as the inbound side applies it.
pub struct InboundPort {
    pub protocol: PortProtocol,
    pub timeouts: Timeouts,
    pub tls_mode: Option<ListenerTlsMode>,
    /// The caller's certificate must carry one of these SANs (empty: any).
    pub client_sans: Vec<String>,
    pub pool: Option<Arc<Pool>>,
    /// Per allowed caller; `others` for plaintext callers and refused ones (a bounded label).
    callers: super::RequestMap<ProxyRole, Arc<EdgeStats>>,
    others: Arc<EdgeStats>,
    overflows: Counter,
    access_log: Option<Arc<AccessLogger>>,
}

impl InboundPort {
    pub fn new(
        l: &InboundListener,
        previous: Option<&InboundPort>,
        config: &ProxyConfig,
        metrics: &ProxyMetrics,
        access_log: Option<Arc<AccessLogger>>,
    ) -> Self {
        let edge = |caller: String| {
            metrics.edge(Edge {
                direction: Direction::Inbound,
                port: l.port,
                virtual_service: String::new(),
                route: String::new(),
                target_virtual_node: String::new(),
                caller,
            })
        };
        let limits = l.connection_pool.as_ref().map(PoolLimits::from);
        // The counters carry over while the limits stay.
        let pool = limits.map(|limits| match previous.and_then(|p| p.pool.as_ref()) {
            Some(p) if p.limits == limits => p.clone(),
            _ => Arc::new(Pool::new(limits)),
        });
        Self {
            protocol: l.protocol,
            timeouts: l.timeouts,
            tls_mode: l.tls.as_ref().map(|t| t.mode),
            client_sans: l
                .tls
                .as_ref()
                .and_then(|t| t.validation.as_ref())
                .and_then(|v| v.subject_alternative_names.as_ref())
                .map(|s| s.r#match.exact.clone())
                .unwrap_or_default(),
            pool,
            callers: config
                .allowed_callers
                .iter()
                .map(|c| (c.clone(), edge(c.resource_name())))
                .collect(),
            others: edge(String::new()),
            overflows: metrics.pool_overflows(l.port),
            access_log,
        }
    }

    /// The counters of requests from `caller`.
    fn stats(&self, caller: &Caller) -> &Arc<EdgeStats> {
        caller
            .role
            .as_ref()
            .and_then(|(_, role)| self.callers.get(role))
            .unwrap_or(&self.others)
    }
}

/// The listeners' extra trust roots (`validation.trust.file`).
pub fn client_roots(config: &ProxyConfig) -> Vec<String> {
    config
        .inbound
        .iter()
        .filter_map(|l| l.tls.as_ref()?.validation.as_ref()?.trust.file.as_ref())
        .map(|f| f.certificate_chain.clone())
        .collect()
}

/// App Mesh's connection pool of a listener, as limits on requests to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Requests in progress at once (HTTP/1: connections to the app).
    pub active: usize,
    /// Requests that may wait for one (HTTP/1 only; HTTP/2 and gRPC queue none).
    pub pending: usize,
}

impl From<&VirtualNodeConnectionPool> for PoolLimits {
    fn from(p: &VirtualNodeConnectionPool) -> Self {
        let n = |v: i64| usize::try_from(v).unwrap_or(usize::MAX).max(1);
        if let Some(h) = &p.http {
            PoolLimits {
                active: n(h.max_connections),
                pending: h.max_pending_requests.map_or(usize::MAX, n),
            }
        } else if let Some(h) = &p.http2 {
            PoolLimits {
                active: n(h.max_requests),
                pending: 0,
            }
        } else if let Some(g) = &p.grpc {
            PoolLimits {
                active: n(g.max_requests),
                pending: 0,
            }
        } else if let Some(t) = &p.tcp {
            PoolLimits {
                active: n(t.max_connections),
                pending: 0,
            }
        } else {
            PoolLimits {
                active: usize::MAX >> 4,
                pending: 0,
            }
        }
    }
}

pub struct Pool {
    limits: PoolLimits,
    active: Arc<Semaphore>,
    waiting: AtomicUsize,
}

impl Pool {
    fn new(limits: PoolLimits) -> Self {
        Self {
            limits,
            active: Arc::new(Semaphore::new(limits.active.min(Semaphore::MAX_PERMITS))),
            waiting: AtomicUsize::new(0),
        }
    }

    /// A slot for one request, waiting in the pending queue if there is room in it.
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, UpstreamError> {
        if let Ok(p) = self.active.clone().try_acquire_owned() {
            return Ok(p);
        }
        let waiting = self.waiting.fetch_add(1, Ordering::AcqRel);
        let result = if waiting < self.limits.pending {
            self.active
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| UpstreamError::Overloaded("the connection pool is closed".into()))
        } else {
            Err(UpstreamError::Overloaded(format!(
                "the listener's connection pool is full ({} active, {} pending)",
                self.limits.active, self.limits.pending
            )))
        };
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        result
    }
}

/// Accepts peers' connections until aborted.
pub async fn serve(shards: Shards<Shared>, listener: TcpListener) {
    let connections = shards.first().metrics.connections(ListenerKind::Inbound);
    loop {
        let (tcp, from) = super::dataplane::accept(&listener).await;
        let open = ConnectionGuard::new(connections.clone());
        shards.place(tcp, move |shared, tcp| async move {
            connection(shared, tcp, from).await;
            drop(open);
        });
    }
}

async fn connection(shared: Arc<Shared>, tcp: TcpStream, from: SocketAddr) {
    let Some(is_tls) = tls::starts_tls(&tcp).await else {
        return;
    };
    if !is_tls {
        if let guard::Verdict::Refuse(status, why) =
            guard::first_head(&tcp, super::dataplane::HEADER_READ_TIMEOUT).await
        {
            guard::refuse(tcp, status, &why).await;
            return;
        }
        let downstream = shared.downstream(&tcp, from, None);
        let caller = Caller::default();
        if guard::starts_h2(&tcp).await {
            serve_h2(&shared, tcp, &caller, downstream).await;
        } else {
            serve_http(shared, TokioIo::new(tcp), Arc::new(caller), downstream).await;
        }
        return;
    }
    let config = match shared.upstreams.identity().server_config() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%from, error = %e, "TLS from a peer, but no server certificate");
            return;
        }
    };
    let stream = match tls::accept(config, tcp).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%from, error = %e, "mTLS handshake refused");
            shared
                .metrics
                .tls_handshake_failed(Direction::Inbound, stats::tls_failure_reason(&e));
            return;
        }
    };
    let (tcp, session) = stream.get_ref();
    let caller = Caller::from_certs(session.peer_certificates().unwrap_or_default());
    let sni = session.server_name().map(str::to_string);
    let h2 = session.alpn_protocol() == Some(tls::ALPN_H2);
    let downstream = shared.downstream(tcp, from, sni);
    if h2 {
        serve_h2(&shared, stream, &caller, downstream).await;
    } else {
        serve_http(shared, TokioIo::new(stream), Arc::new(caller), downstream).await;
    }
}

/// A peer's pooled HTTP/2 connection: each stream is answered inside the connection's task,
/// borrowing its state (see `h2server`).
async fn serve_h2<I>(shared: &Shared, io: I, caller: &Caller, downstream: Option<Downstream>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(watch) = shared.drain.watch() else {
        return;
    };
    let answer = |mut req: Request<Body>| {
        super::trim::note_request();
        Downstream::attach(&downstream, &mut req);
        request(shared, caller, req)
    };
    if let Err(e) = super::h2server::serve(io, watch, answer).await {
        tracing::debug!(error = %e, "peer connection");
    }
}

/// HTTP/1.1: upgrades and TCP tunnels, and callers that speak no HTTP/2.
async fn serve_http<I>(
    shared: Arc<Shared>,
    io: I,
    caller: Arc<Caller>,
    downstream: Option<Downstream>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let drain = shared.drain.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        super::trim::note_request();
        Downstream::attach(&downstream, &mut req);
        let shared = shared.clone();
        let caller = caller.clone();
        // Boxed: hyper moves the request's future through its stages; a pointer moves for
        // nothing, the future itself is kilobytes.
        Box::pin(
            async move { Ok::<_, Infallible>(request(&shared, &caller, req.map(incoming)).await) },
        )
    });
    let conn = http_builder()
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    drain.serve(conn, |c| c.graceful_shutdown()).await;
}

async fn request(shared: &Shared, caller: &Caller, mut req: Request<Body>) -> http::Response<Body> {
    let started = std::time::Instant::now();
    let span = shared
        .tracer
        .as_ref()
        .and_then(|_| ActiveSpan::begin(&mut req));
    let routing = shared.routing.borrow().clone();
    let grpc = local_reply::is_grpc(req.headers());
    let (resp, stats, log) = to_app(shared, &routing, caller, req).await;
    let resp = local_reply::for_caller(grpc, resp);
    let stats = stats.unwrap_or_else(|| shared.unrouted_inbound.clone());
    stats.answered(resp.status().as_u16(), started.elapsed());
    if let (Some(tracer), Some(span)) = (&shared.tracer, span) {
        let me = routing
            .role
            .as_ref()
            .map(|r| r.resource_name())
            .unwrap_or_default();
        let name = format!("{} {me} (inbound)", span.method);
        let attributes = vec![("appmesh.caller", caller.describe())];
        tracer.record(span.end(name, true, resp.status().as_u16(), attributes));
    }
    let resp = stats::count_response(resp, &stats, grpc);
    match log {
        Some((pending, served)) => pending.finish(resp, served),
        None => resp,
    }
}

/// An inbound request's access-log line in the making, and what was done with it.
type InboundLog = Option<(Pending, Served<'static>)>;

/// The phases of an inbound request; the counters of its listener and caller, once known.
async fn to_app(
    shared: &Shared,
    routing: &super::dataplane::Routing,
    caller: &Caller,
    mut req: Request<Body>,
) -> (http::Response<Body>, Option<Arc<EdgeStats>>, InboundLog) {
    let port = req
        .headers_mut()
        .remove(TARGET_PORT)
        .and_then(|v| v.to_str().ok().and_then(|s| s.parse::<u16>().ok()));
    let Some(port) = port else {
        let e = UpstreamError::BadRequest(format!("missing or invalid {TARGET_PORT}"));
        return (e.response(), None, None);
    };
    let Some(listener) = routing.inbound.get(&port) else {
        let e = UpstreamError::NoEndpoint(format!("this node has no listener on port {port}"));
        return (e.response(), None, None);
    };
    let stats = listener.stats(caller).clone();
    let addr = SocketAddr::new(shared.settings.app_host, port);
    let mut log = listener.access_log.as_ref().map(|l| {
        let served = Served {
            cluster: format!("app:{port}").into(),
            upstream: Some(addr),
            ..Served::default()
        };
        (l.begin(&req), served)
    });
    let failed = |e: UpstreamError, stats, mut log: InboundLog| {
        if let Some((_, served)) = &mut log {
            served.failed(&e);
        }
        (e.response(), Some(stats), log)
    };
    if let Err(e) = admit(shared, routing, listener, port, caller) {
        tracing::info!(caller = %caller.describe(), port, error = %e, "inbound request refused");
        return failed(e, stats, log);
    }
    let slot = match &listener.pool {
        Some(pool) => match pool.admit().await {
            Ok(p) => Some(p),
            Err(e) => {
                listener.overflows.inc();
                return failed(e, stats, log);
            }
        },
        None => None,
    };
    if let Some((_, served)) = &mut log {
        served.attempts = 1;
    }
    if tunnel::is_upgrade(&req) {
        // Boxed, as every rare path here: inline, its state would grow every request's future.
        return match Box::pin(upgrade_to_app(listener, addr, req, slot)).await {
            Ok(resp) => (resp, Some(stats), log),
            Err(e) => failed(e, stats, log),
        };
    }
    if listener.protocol == PortProtocol::Tcp {
        let e = UpstreamError::BadRequest(format!(
            "port {port} is a TCP listener: only tunnels reach it"
        ));
        return failed(e, stats, log);
    }
    let h2 = matches!(listener.protocol, PortProtocol::Http2 | PortProtocol::Grpc);
    let req = req.map(|b| {
        let body = stats::count_body(b, stats.request_bytes());
        match &log {
            Some((pending, _)) => pending.request_body(body),
            None => body,
        }
    });
    match shared.upstreams.send(Hop::App { addr, h2 }, req).await {
        Ok(resp) => (
            resp.map(|body| idle::limit(body, listener.timeouts.idle(), &stats.idle_timeouts)),
            Some(stats),
            log,
        ),
        Err(e) => failed(e, stats, log),
    }
}

/// A TCP tunnel (to a `tcp` listener) or an upgrade such as WebSocket (on an `http` one), on
/// a connection of its own to the app. A tunnel holds its pool slot while it lasts.
async fn upgrade_to_app(
    listener: &InboundPort,
    addr: SocketAddr,
    mut req: Request<Body>,
    slot: Option<OwnedSemaphorePermit>,
) -> Result<http::Response<Body>, UpstreamError> {
    let tcp = tunnel::protocol(&req) == Some(tunnel::TCP_UPGRADE);
    let want = if tcp {
        PortProtocol::Tcp
    } else {
        PortProtocol::Http
    };
    if listener.protocol != want {
        return Err(UpstreamError::BadRequest(format!(
            "port {} is a {} listener; {} upgrades need {}",
            addr.port(),
            listener.protocol.as_str(),
            tunnel::protocol(&req).unwrap_or_default(),
            want.as_str()
        )));
    }
    let idle = listener.timeouts.idle();
    let downstream = hyper::upgrade::on(&mut req);
    let app = TcpStream::connect(addr)
        .await
        .map_err(|e| UpstreamError::Connect {
            addr,
            message: e.to_string(),
        })?;
    let _ = app.set_nodelay(true);
    if !tcp {
        return tunnel::upgrade(TokioIo::new(app), addr, req, downstream, idle).await;
    }
    tokio::spawn(async move {
        let _slot = slot;
        if let Ok(io) = downstream.await {
            tunnel::splice(TokioIo::new(io), app, idle).await;
        }
    });
    let mut r = http::Response::new(super::upstream::full(""));
    *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static(tunnel::TCP_UPGRADE),
    );
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    Ok(r)
}

/// The listener's TLS mode, SAN rules and the access model.
fn admit(
    shared: &Shared,
    routing: &super::dataplane::Routing,
    listener: &InboundPort,
    port: u16,
    caller: &Caller,
) -> Result<(), UpstreamError> {
    let strict = match listener.tls_mode {
        Some(ListenerTlsMode::Strict) => Some("STRICT"),
        None if shared.upstreams.identity().has_certificate() => Some("the mesh default, mTLS"),
        _ => None,
    };
    if !caller.tls {
        return match strict {
            Some(mode) => Err(UpstreamError::Forbidden(format!(
                "port {port} accepts only mTLS (listener tls mode: {mode}); plaintext refused"
            ))),
            // PERMISSIVE, DISABLED, or a proxy without a certificate: no identity to check.
            None => Ok(()),
        };
    }
    if !listener.client_sans.is_empty()
        && !caller.sans.iter().any(|s| listener.client_sans.contains(s))
    {
        return Err(UpstreamError::Forbidden(format!(
            "the caller's certificate names {:?}; listener {port} tls.validation.subjectAlternativeNames accepts {:?}",
            caller.sans, listener.client_sans
        )));
    }
    match &caller.role {
        Some((mesh, role)) if *mesh == routing.mesh && routing.allowed_callers.contains(role) => {
            Ok(())
        }
        Some((mesh, role)) => {
            let me = routing
                .role
                .as_ref()
                .map_or_else(String::new, |r| r.resource_name());
            Err(UpstreamError::Forbidden(format!(
                "{} of mesh {mesh} may not call {me}: it does not list a virtual service that routes to {me} among its backends",
                role.resource_name()
            )))
        }
        None => Err(UpstreamError::Forbidden(format!(
            "{} is not a virtual node or gateway of mesh {}",
            caller.describe(),
            routing.mesh
        ))),
    }
}
