//! The outbound request path, in a fixed order of phases: find the backend (by VIP:port, or
//! by Host on the explicit listener, where the egress filter decides about the rest), match a
//! route, pick a weighted target, then attempt: pick a host that is not ejected (another one on
//! a retry), send over the peer pool, classify the outcome, record it for outlier detection,
//! and retry while the route's policy and the retry budget allow. The route's per-request
//! timeout bounds all attempts (504); a per-retry timeout bounds each.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response, Uri};

use super::balance::random_u64;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

use std::borrow::Cow;

use super::access::{self, Pending, Served};
use super::dataplane::{Cluster, OutboundPort, PeerTlsChoice, RouteTargets, Shared};
use super::idle;
use super::local_reply;
use super::outlier::EndpointSet;
use super::replay::Replayable;
use super::retry::RetryBudget;
use super::retry::{Outcome, retryable};
use super::route::{RequestHead, SentScheme};
use super::shard::Shards;
use super::stats;
use super::tls::PeerTls;
use super::tunnel;
use super::upstream::{Body, Hop, PeerStream, TARGET_PORT, UpstreamError, full, incoming};
use crate::model::proxy_config::{CompiledRoute, RetryPolicy, Target};
use crate::model::shapes::{EgressFilterType, PortProtocol};
use crate::telemetry::access_log::ResponseFlag;
use crate::telemetry::proxy::{Direction, Edge, EdgeStats};
use crate::telemetry::trace::ActiveSpan;

/// A request to a backend's VIP:port.
pub async fn vip(shared: &Shared, local: SocketAddr, req: Request<Body>) -> Response<Body> {
    let started = Instant::now();
    let routing = shared.routing.borrow().clone();
    match routing.outbound.get(&local) {
        Some(port) => forward(shared, port, req, started).await,
        // The port left the config as this request came.
        None => {
            let grpc = local_reply::is_grpc(req.headers());
            let resp = local_reply::refuse(&req, &UpstreamError::NoRoute);
            let edge = shared
                .metrics
                .edge(Edge::unrouted(Direction::Outbound, local.port()));
            stats::count_unrouted(&edge, started, grpc, resp)
        }
    }
}

/// A request on the explicit listener: absolute-form (`HTTP_PROXY`) or with a Host naming a
/// backend virtual service.
pub async fn explicit(shared: &Arc<Shared>, mut req: Request<Body>) -> Response<Body> {
    let started = Instant::now();
    if req.method() == Method::CONNECT {
        let resp = Box::pin(connect(shared, req)).await;
        return match resp {
            Connected::Mesh(resp) => resp,
            Connected::Egress(resp) => {
                stats::count_unrouted(&shared.unrouted_egress, started, false, resp)
            }
        };
    }
    let Some((host, port)) = authority(&req) else {
        let e =
            UpstreamError::BadRequest("the request names no host (absolute URI or Host)".into());
        let grpc = local_reply::is_grpc(req.headers());
        let resp = local_reply::refuse(&req, &e);
        return stats::count_unrouted(&shared.unrouted_egress, started, grpc, resp);
    };
    // Origin-form from here on: the route sees the path, the peer the Host.
    if let Some(scheme) = SentScheme::of(req.uri()) {
        req.extensions_mut().insert(scheme);
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        if let Ok(uri) = path.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
        if let Ok(v) = http::HeaderValue::from_str(&host_header(&host, port)) {
            req.headers_mut().insert(http::header::HOST, v);
        }
    }
    let routing = shared.routing.borrow().clone();
    if let Some(p) = routing.by_authority(&host, port) {
        return forward(shared, p, req, started).await;
    }
    // Not a backend: answered here or sent as it is, and counted as egress.
    let grpc = local_reply::is_grpc(req.headers());
    let count = |resp| stats::count_unrouted(&shared.unrouted_egress, started, grpc, resp);
    match routing.egress {
        Some(EgressFilterType::AllowAll) => {
            let addr = match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(mut a) => a.next(),
                Err(_) => None,
            };
            let Some(addr) = addr else {
                let e = UpstreamError::NoEndpoint(format!("{host}:{port} (no address)"));
                return count(local_reply::for_caller(grpc, e.response()));
            };
            let resp = shared
                .upstreams
                .send(Hop::App { addr, h2: false }, req)
                .await
                .unwrap_or_else(|e| local_reply::for_caller(grpc, e.response()));
            count(resp)
        }
        _ => {
            let resp = local_reply::for_caller(grpc, egress_denied(&routing, &host, port));
            let resp = count(resp);
            access::answered_here(
                routing.access_log.as_ref(),
                &req,
                resp,
                ResponseFlag::Denied,
            )
        }
    }
}

fn host_header(host: &str, port: u16) -> String {
    if port == 80 {
        host.to_string()
    } else {
        format!("{host}:{port}")
    }
}

/// Host and port from the absolute URI, else from Host (`:authority` in HTTP/2).
pub(crate) fn authority<B>(req: &Request<B>) -> Option<(String, u16)> {
    let host_and_port =
        |a: &http::uri::Authority| (a.host().to_string(), a.port_u16().unwrap_or(80));
    if let Some(a) = req.uri().authority() {
        return Some(host_and_port(a));
    }
    let host = req.headers().get(http::header::HOST)?;
    /// A Host header's bytes (copied: a slice of the connection's read buffer would pin that
    /// buffer) and what they parsed to.
    type LastHost = Option<(Vec<u8>, Option<(String, u16)>)>;
    // An app sends the same Host request after request: the last one's answer is kept per
    // thread, as parsing it (a copy, a validating scan, two allocations) cost 3 % of a request.
    thread_local! {
        static LAST: std::cell::RefCell<LastHost> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        if let Some((h, parsed)) = &*last.borrow()
            && h.as_slice() == host.as_bytes()
        {
            return parsed.clone();
        }
        let parsed = host
            .to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .map(|a| host_and_port(&a));
        *last.borrow_mut() = Some((host.as_bytes().to_vec(), parsed.clone()));
        parsed
    })
}

/// One request to a backend port: route, target, attempts; counted on the edge it took, its
/// latency from `started` (when the listener took it).
pub async fn forward(
    shared: &Shared,
    port: &OutboundPort,
    req: Request<Body>,
    started: Instant,
) -> Response<Body> {
    let mut req = req;
    let span = shared
        .tracer
        .as_ref()
        .and_then(|_| ActiveSpan::begin(&mut req));
    let log = port.access_log.as_ref().map(|l| l.begin(&req));
    let mut served = Served::default();
    let grpc = local_reply::is_grpc(req.headers());
    let (resp, stats) = route_and_send(shared, port, req, log.as_ref(), &mut served).await;
    // Counted and logged as sent: a gRPC caller's failure is a grpc-status (as in Envoy).
    let resp = local_reply::for_caller(grpc, resp);
    stats.answered(resp.status().as_u16(), started.elapsed());
    if let (Some(tracer), Some(span)) = (&shared.tracer, span) {
        let name = format!("{} {}:{}", span.method, port.service, port.port);
        let attributes = vec![
            ("appmesh.virtual_service", port.service.clone()),
            ("appmesh.route", served.route.to_string()),
            ("appmesh.target", served.cluster.to_string()),
            (
                "server.address",
                served.upstream.map(|a| a.to_string()).unwrap_or_default(),
            ),
        ];
        tracer.record(span.end(name, false, resp.status().as_u16(), attributes));
    }
    let resp = stats::count_response(resp, &stats, grpc);
    match log {
        Some(pending) => pending.finish(resp, served),
        None => resp,
    }
}

async fn route_and_send<'p>(
    shared: &Shared,
    port: &'p OutboundPort,
    mut req: Request<Body>,
    log: Option<&Pending>,
    served: &mut Served<'p>,
) -> (Response<Body>, Arc<EdgeStats>) {
    let failed = |e: UpstreamError, served: &mut Served<'p>| {
        served.failed(&e);
        e.response()
    };
    if port.protocol == PortProtocol::Tcp {
        let e = UpstreamError::BadRequest(format!(
            "{}:{} is a TCP port: send a CONNECT, or connect to its VIP",
            port.service, port.port
        ));
        return (failed(e, served), port.unrouted.clone());
    }
    let head = RequestHead::of(&req, port.port);
    let Some(i) = port.table.select_index(&head) else {
        return (
            failed(UpstreamError::NoRoute, served),
            port.unrouted.clone(),
        );
    };
    let (Some(route), Some(targets)) = (port.table.route(i), port.targets.get(i)) else {
        return (
            failed(UpstreamError::NoRoute, served),
            port.unrouted.clone(),
        );
    };
    served.route = Cow::Borrowed(&route.name);
    let (target, cluster, stats) = match pick_target(route, targets) {
        Ok((target, cluster, stats)) => (target, cluster, stats.clone()),
        Err(e) => return (failed(e, served), port.unrouted.clone()),
    };
    served.cluster = Cow::Borrowed(&cluster.name);
    if tunnel::is_upgrade(&req) {
        let downstream = hyper::upgrade::on(&mut req);
        // Boxed: a rare path whose state would otherwise grow every request's future.
        let resp = match Box::pin(upgrade(
            shared,
            cluster,
            target.port,
            route,
            req,
            downstream,
        ))
        .await
        {
            Ok(resp) => resp,
            Err(e) => failed(e, served),
        };
        return (resp, stats);
    }
    port.budget.request();
    let limit = route.timeouts.per_request_ms;
    let req = req.map(|b| {
        let body = stats::count_body(b, stats.request_bytes());
        match log {
            Some(pending) => pending.request_body(body),
            None => body,
        }
    });
    let result = {
        let target = (cluster, target.port);
        // Pinned where it is made: wrapping it in the timeout would move kilobytes.
        let attempts = std::pin::pin!(attempts(shared, port, route, target, &stats, req, served));
        per_request(limit, &stats, attempts).await
    };
    let resp = match result {
        Ok(resp) => resp.map(|body| idle::limit(body, route.timeouts.idle(), &stats.idle_timeouts)),
        Err(e) => failed(e, served),
    };
    (resp, stats)
}

/// The route's perRequest timeout (ms; 0: none) over all of a request's `attempts`: past it
/// they are dropped (an attempt in flight is reset) and the answer is 504.
async fn per_request<F>(
    limit: u64,
    stats: &EdgeStats,
    attempts: F,
) -> Result<Response<Body>, UpstreamError>
where
    F: Future<Output = Result<Response<Body>, UpstreamError>>,
{
    if limit == 0 {
        return attempts.await;
    }
    tokio::time::timeout(Duration::from_millis(limit), attempts)
        .await
        .unwrap_or_else(|_| {
            stats.per_request_timeouts.inc();
            Err(UpstreamError::Timeout(limit))
        })
}

/// The request's attempts at the target `(cluster, app port)`.
async fn attempts(
    shared: &Shared,
    port: &OutboundPort,
    route: &CompiledRoute,
    (cluster, target_port): (&Arc<Cluster>, u16),
    stats: &EdgeStats,
    req: Request<Body>,
    served: &mut Served<'_>,
) -> Result<Response<Body>, UpstreamError> {
    let mut replay = Replayable::new(req, route.retry.max_retries > 0).await?;
    let tls = peer_tls(shared, cluster)?;
    let can_replay = replay.can_replay();
    let send = |addr: SocketAddr, n: u32| {
        let req = replay.attempt(n, target_port)?;
        // Boxed: inline, its state (kilobytes) would be part of every future above it, each
        // copied as it is made and moved into place; a box is made once per attempt.
        Some(Box::pin(shared.upstreams.send(
            Hop::Peer {
                addr,
                tls: tls.clone(),
            },
            req,
        )))
    };
    retry_loop(
        &route.retry,
        &port.budget,
        &cluster.endpoints,
        stats,
        served,
        can_replay,
        send,
    )
    .await
}

/// Attempts until one is final: a host per attempt (another one on a retry), each within the
/// per-retry timeout, each outcome recorded for outlier detection, retried while the policy,
/// the replay buffer (`can_replay`: the whole body is kept) and the budget allow.
pub async fn retry_loop<F, Fut>(
    policy: &RetryPolicy,
    budget: &RetryBudget,
    endpoints: &EndpointSet,
    stats: &EdgeStats,
    served: &mut Served<'_>,
    can_replay: impl Fn() -> bool,
    mut send: F,
) -> Result<Response<Body>, UpstreamError>
where
    F: FnMut(SocketAddr, u32) -> Option<Fut>,
    Fut: Future<Output = Result<Response<Body>, UpstreamError>>,
{
    let mut previous = None;
    let mut n = 1;
    loop {
        let Some(picked) = endpoints.pick(previous) else {
            return Err(UpstreamError::NoEndpoint(format!(
                "{} hosts, all ejected or none",
                endpoints.len()
            )));
        };
        let addr = picked.addr;
        served.upstream = Some(addr);
        served.attempts = n;
        let Some(attempt) = send(addr, n) else {
            return Err(UpstreamError::Reset {
                addr,
                message: "the request body was already sent".into(),
            });
        };
        let result = match policy.per_retry_timeout_ms {
            0 => attempt.await,
            ms => tokio::time::timeout(Duration::from_millis(ms), attempt)
                .await
                .unwrap_or_else(|_| {
                    stats.per_retry_timeouts.inc();
                    Err(UpstreamError::Timeout(ms))
                }),
        };
        let outcome = outcome(&result);
        endpoints.record(picked, outcome.is_server_error());
        let retryable = retryable(policy, outcome);
        let wanted = n <= policy.max_retries && retryable && can_replay();
        if !wanted {
            if retryable && n > policy.max_retries && policy.max_retries > 0 {
                served.flag = Some(ResponseFlag::UpstreamRetryLimitExceeded);
            }
            return result;
        }
        if !budget.try_retry() {
            stats.budget_exhausted.inc();
            served.flag = Some(ResponseFlag::UpstreamRetryLimitExceeded);
            return result;
        }
        stats.retries.inc();
        tracing::debug!(%addr, ?outcome, attempt = n, "retrying");
        tokio::time::sleep(backoff(n)).await;
        previous = Some(addr);
        n += 1;
    }
}

/// How to reach `cluster` now: mTLS when this proxy has a certificate, unless the target is
/// plaintext; without one, plaintext unless TLS is required.
fn peer_tls(shared: &Shared, cluster: &Cluster) -> Result<Option<Arc<PeerTls>>, UpstreamError> {
    match &cluster.tls {
        PeerTlsChoice::Plain => Ok(None),
        PeerTlsChoice::Mtls { peer, required } => {
            if shared.upstreams.identity().has_certificate() {
                Ok(Some(peer.clone()))
            } else if *required {
                Err(UpstreamError::Forbidden(format!(
                    "{} requires mTLS and this proxy has no certificate (start it with --ca-file and --token-file)",
                    cluster.name
                )))
            } else {
                Ok(None)
            }
        }
    }
}

/// An upgrade (WebSocket): one attempt, on a connection of its own to one host.
async fn upgrade(
    shared: &Shared,
    cluster: &Cluster,
    target_port: u16,
    route: &CompiledRoute,
    req: Request<Body>,
    downstream: hyper::upgrade::OnUpgrade,
) -> Result<Response<Body>, UpstreamError> {
    let (addr, io) = connect_one(shared, cluster).await?;
    let mut req = req;
    req.headers_mut()
        .insert(TARGET_PORT, http::HeaderValue::from(target_port));
    tunnel::upgrade(io, addr, req, downstream, route.timeouts.idle()).await
}

/// One of the route's weighted targets, its cluster and its counters.
fn pick_target<'a>(
    route: &'a CompiledRoute,
    targets: &'a RouteTargets,
) -> Result<(&'a Target, &'a Arc<Cluster>, &'a Arc<EdgeStats>), UpstreamError> {
    let t = targets.picker.pick();
    match t.map(|t| {
        (
            route.targets.get(t),
            targets.clusters.get(t),
            targets.stats.get(t),
        )
    }) {
        Some((Some(target), Some(Some(cluster)), Some(stats))) => Ok((target, cluster, stats)),
        _ => Err(UpstreamError::NoEndpoint(format!("route {}", route.name))),
    }
}

/// A connection of its own to one host of `cluster` (upgrades and tunnels: no retry), the
/// outcome recorded for outlier detection.
async fn connect_one(
    shared: &Shared,
    cluster: &Cluster,
) -> Result<(SocketAddr, TokioIo<PeerStream>), UpstreamError> {
    let tls = peer_tls(shared, cluster)?;
    let picked = cluster
        .endpoints
        .pick(None)
        .ok_or_else(|| UpstreamError::NoEndpoint(cluster.name.clone()))?;
    let addr = picked.addr;
    let io = shared.upstreams.connect_peer(addr, tls.as_ref()).await;
    cluster.endpoints.record(picked, io.is_err());
    Ok((addr, io?))
}

/// A TCP connection to a backend port (its VIP, or a CONNECT): the first route (TCP routes
/// match every connection), a weighted target, a host; then a tunnel to its proxy.
pub async fn tcp_to_mesh<S>(shared: &Shared, port: &OutboundPort, downstream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let r = async {
        let route = port.table.route(0).ok_or(UpstreamError::NoRoute)?;
        let targets = port.targets.first().ok_or(UpstreamError::NoRoute)?;
        let (target, cluster, _) = pick_target(route, targets)?;
        let (addr, io) = connect_one(shared, cluster).await?;
        let upstream = tunnel::open_tcp(io, addr, target.port).await?;
        Ok::<_, UpstreamError>((upstream, route.timeouts.idle()))
    };
    match r.await {
        Ok((upstream, idle)) => tunnel::splice(downstream, TokioIo::new(upstream), idle).await,
        Err(e) => {
            tracing::info!(service = %port.service, port = port.port, error = %e, "TCP connection refused")
        }
    }
}

/// Accepts connections on a TCP backend's VIP:port.
pub async fn serve_tcp(
    shards: Shards<Shared>,
    listener: tokio::net::TcpListener,
    local: SocketAddr,
) {
    loop {
        let (tcp, _) = super::dataplane::accept(&listener).await;
        super::trim::note_request();
        shards.place(tcp, move |shared, tcp| async move {
            let port = shared.routing.borrow().outbound.get(&local).cloned();
            if let Some(port) = port {
                tcp_to_mesh(&shared, &port, tcp).await;
            }
        });
    }
}

/// CONNECT on the explicit listener: a TCP backend is tunnelled through the mesh; on an HTTP
/// backend the tunnel carries HTTP that is routed like any other request; anything else is
/// the egress filter's to decide.
async fn connect(shared: &Arc<Shared>, mut req: Request<Body>) -> Connected {
    let Some((host, port)) = authority(&req) else {
        return Connected::Egress(
            UpstreamError::BadRequest("CONNECT needs host:port".into()).response(),
        );
    };
    let routing = shared.routing.borrow().clone();
    let backend = routing.by_authority(&host, port).cloned();
    let to_mesh = backend.is_some();
    let downstream = hyper::upgrade::on(&mut req);
    let tunnel: Box<dyn FnOnce(Upgraded) -> BoxFuture + Send> = match backend {
        Some(p) if p.protocol == PortProtocol::Tcp => {
            let shared = shared.clone();
            Box::new(move |io| {
                Box::pin(async move { tcp_to_mesh(&shared, &p, TokioIo::new(io)).await })
            })
        }
        Some(p) => {
            let shared = shared.clone();
            Box::new(move |io| {
                Box::pin(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (shared, p) = (shared.clone(), p.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                forward(&shared, &p, req.map(incoming), Instant::now()).await,
                            )
                        }
                    });
                    let _ = super::dataplane::http_builder()
                        .serve_connection_with_upgrades(io, service)
                        .await;
                })
            })
        }
        None if routing.egress == Some(EgressFilterType::AllowAll) => {
            let upstream = match tokio::net::TcpStream::connect((host.as_str(), port)).await {
                Ok(t) => {
                    let _ = t.set_nodelay(true);
                    t
                }
                Err(e) => {
                    let e = UpstreamError::NoEndpoint(format!("{host}:{port}: {e}"));
                    return Connected::Egress(e.response());
                }
            };
            Box::new(move |io| {
                Box::pin(async move { tunnel::splice(TokioIo::new(io), upstream, None).await })
            })
        }
        None => return Connected::Egress(egress_denied(&routing, &host, port)),
    };
    tokio::spawn(async move {
        match downstream.await {
            Ok(io) => tunnel(io).await,
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade"),
        }
    });
    let resp = Response::new(full(""));
    if to_mesh {
        Connected::Mesh(resp)
    } else {
        Connected::Egress(resp)
    }
}

/// A CONNECT's answer, and whether it counts as egress: a tunnel into the mesh is counted by
/// the requests it carries, one out of it (or its refusal) on the egress edge.
enum Connected {
    Mesh(Response<Body>),
    Egress(Response<Body>),
}

type BoxFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

fn egress_denied(routing: &super::dataplane::Routing, host: &str, port: u16) -> Response<Body> {
    let me = routing
        .role
        .as_ref()
        .map_or_else(String::new, |r| r.resource_name());
    UpstreamError::Forbidden(format!(
        "egress filter DROP_ALL: {host}:{port} is not a backend of {me} (mesh {})",
        routing.mesh
    ))
    .response()
}

fn outcome(result: &Result<Response<Body>, UpstreamError>) -> Outcome {
    // A `HeaderName`: a `&str` name is parsed on every lookup.
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    match result {
        Ok(r) => Outcome::Response {
            status: r.status().as_u16(),
            grpc: r
                .headers()
                .get(GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        },
        Err(UpstreamError::Connect { .. }) => Outcome::ConnectFailed,
        Err(UpstreamError::Refused { .. }) => Outcome::Refused,
        Err(UpstreamError::Timeout(_)) => Outcome::PerTryTimeout,
        Err(UpstreamError::Reset { .. }) => Outcome::Reset,
        Err(e) => Outcome::Response {
            status: e.status().as_u16(),
            grpc: None,
        },
    }
}

/// Envoy's: 25 ms doubling per retry, at most 250 ms, fully jittered.
fn backoff(retry: u32) -> Duration {
    let cap = (25u64 << retry.min(4)).min(250);
    Duration::from_millis(random_u64() % cap + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compile::default_retry;
    use crate::proxy::balance::Balancer;
    use crate::proxy::retry::BudgetSettings;
    use std::sync::Mutex;

    /// The per-thread memo of the last Host answers exactly what parsing it would, whatever
    /// the order of hosts; an absolute URI wins over Host.
    #[test]
    fn authority_is_read_from_the_uri_or_host_alike_on_every_call() {
        let with_host = |h: &'static str| {
            Request::builder()
                .uri("/")
                .header("host", h)
                .body(())
                .unwrap()
        };
        let cases = [
            ("app.local:8080", Some(("app.local".to_string(), 8080))),
            ("app.local", Some(("app.local".to_string(), 80))),
            ("app.local:8080", Some(("app.local".to_string(), 8080))),
            ("bad host:1", None),
            ("[::1]:9090", Some(("[::1]".to_string(), 9090))),
            ("bad host:1", None),
            ("app.local:8080", Some(("app.local".to_string(), 8080))),
        ];
        for (host, want) in cases {
            assert_eq!(authority(&with_host(host)), want, "Host: {host}");
        }
        let absolute = Request::builder()
            .uri("http://svc.local:9000/x")
            .header("host", "app.local:8080")
            .body(())
            .unwrap();
        assert_eq!(authority(&absolute), Some(("svc.local".to_string(), 9000)));
    }

    fn hosts(n: u8) -> EndpointSet {
        EndpointSet::new(
            (1..=n).map(|i| SocketAddr::from(([127, 0, 0, i], 15000))),
            None,
            Balancer::RoundRobin,
            None,
        )
    }

    fn status(s: u16) -> Result<Response<Body>, UpstreamError> {
        let mut r = Response::new(full(""));
        *r.status_mut() = http::StatusCode::from_u16(s).unwrap();
        Ok(r)
    }

    /// Runs the loop against answers given per attempt; returns the final status and the
    /// hosts tried.
    async fn run(
        policy: &RetryPolicy,
        budget: &RetryBudget,
        endpoints: &EndpointSet,
        stats: &EdgeStats,
        answers: Vec<(u16, Duration)>,
    ) -> (u16, Vec<SocketAddr>) {
        let tried = Mutex::new(Vec::new());
        let answers = Mutex::new(answers.into_iter());
        let result = retry_loop(
            policy,
            budget,
            endpoints,
            stats,
            &mut Served::default(),
            || true,
            |addr, _| {
                tried.lock().unwrap().push(addr);
                let (s, delay) = answers
                    .lock()
                    .unwrap()
                    .next()
                    .unwrap_or((200, Duration::ZERO));
                Some(async move {
                    tokio::time::sleep(delay).await;
                    status(s)
                })
            },
        )
        .await;
        let code = result.map_or_else(|e| e.status().as_u16(), |r| r.status().as_u16());
        (code, tried.into_inner().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn retries_fire_on_the_policys_events_up_to_max_retries_on_other_hosts() {
        let stats = EdgeStats::detached();
        let budget = RetryBudget::new(BudgetSettings::default());
        let set = hosts(3);
        let p = default_retry();
        let zero = Duration::ZERO;
        // 503 twice, then 200: three attempts, three different hosts.
        let (code, tried) = run(&p, &budget, &set, &stats, vec![(503, zero), (503, zero)]).await;
        assert_eq!(code, 200);
        assert_eq!(tried.len(), 3);
        assert!(tried[0] != tried[1] && tried[1] != tried[2], "{tried:?}");
        // 503 three times: max_retries 2, the third answer stands.
        let (code, tried) = run(&p, &budget, &set, &stats, vec![(503, zero); 5]).await;
        assert_eq!((code, tried.len()), (503, 3));
        // 500 is not in the default policy.
        let (code, tried) = run(&p, &budget, &set, &stats, vec![(500, zero); 5]).await;
        assert_eq!((code, tried.len()), (500, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_per_retry_timeout_bounds_each_attempt_and_the_last_answers_504() {
        let stats = EdgeStats::detached();
        let budget = RetryBudget::new(BudgetSettings::default());
        let set = hosts(2);
        let mut p = default_retry();
        p.http_statuses = vec![502, 503, 504];
        p.per_retry_timeout_ms = 100;
        p.max_retries = 3;
        let slow = (200, Duration::from_secs(10));
        let start = tokio::time::Instant::now();
        let (code, tried) = run(&p, &budget, &set, &stats, vec![slow; 4]).await;
        assert_eq!((code, tried.len()), (504, 4));
        // Four 100 ms attempts plus back-offs of at most 50 + 100 + 200 ms.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(800),
            "{took:?}"
        );
        // A slow answer within the per-retry timeout is fine.
        let (code, tried) = run(
            &p,
            &budget,
            &set,
            &stats,
            vec![(200, Duration::from_millis(99))],
        )
        .await;
        assert_eq!((code, tried.len()), (200, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_per_request_timeout_covers_all_attempts() {
        let stats = EdgeStats::detached();
        let budget = RetryBudget::new(BudgetSettings::default());
        let set = hosts(2);
        let mut p = default_retry();
        p.per_retry_timeout_ms = 0;
        // Each attempt answers 503 after 400 ms: the default policy retries twice.
        let tried = Mutex::new(0);
        let attempts = || {
            let (p, budget, set, stats, tried) = (&p, &budget, &set, &stats, &tried);
            async move {
                let send = |_, _| {
                    *tried.lock().unwrap() += 1;
                    Some(async {
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        status(503)
                    })
                };
                let mut served = Served::default();
                retry_loop(p, budget, set, stats, &mut served, || true, send).await
            }
        };
        let start = tokio::time::Instant::now();
        let err = per_request(1000, &stats, attempts()).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
        assert_eq!(err.status(), http::StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(stats.per_request_timeouts.get(), 1);
        // The third attempt was under way (400 + 400 ms and two back-offs of at most 50 ms).
        assert_eq!(std::mem::take(&mut *tried.lock().unwrap()), 3);
        // 0: no limit; all three attempts run to their end.
        let start = tokio::time::Instant::now();
        let resp = per_request(0, &stats, attempts()).await.unwrap();
        assert_eq!(resp.status(), 503);
        assert!(start.elapsed() >= Duration::from_millis(1200));
        assert_eq!(stats.per_request_timeouts.get(), 1);
        assert_eq!(*tried.lock().unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_budget() {
        let stats = EdgeStats::detached();
        let budget = RetryBudget::new(BudgetSettings {
            ratio: 0.2,
            min_per_second: 0,
            window: Duration::from_secs(10),
        });
        let set = hosts(2);
        let p = default_retry();
        let (mut attempts, mut all_retried) = (0, 0);
        for _ in 0..100 {
            budget.request();
            let n = run(&p, &budget, &set, &stats, vec![(503, Duration::ZERO); 3])
                .await
                .1
                .len();
            attempts += n;
            all_retried += u64::from(n == 3);
        }
        // 100 requests, 20 % of them as retries: 120 attempts, not 300.
        assert!((118..=120).contains(&attempts), "{attempts}");
        // The metrics say the same: each retry counted; each request that wanted another
        // retry (all did, up to 2) and was refused counted once as budget exhaustion.
        assert_eq!(stats.retries.get() as usize, attempts - 100);
        assert_eq!(stats.budget_exhausted.get(), 100 - all_retried);
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_body_is_never_sent_twice() {
        let stats = EdgeStats::detached();
        let budget = RetryBudget::new(BudgetSettings::default());
        let set = hosts(2);
        let calls = Mutex::new(0);
        let r = retry_loop(
            &default_retry(),
            &budget,
            &set,
            &stats,
            &mut Served::default(),
            || false,
            |_, _| {
                *calls.lock().unwrap() += 1;
                Some(async { status(503) })
            },
        )
        .await;
        assert_eq!(r.unwrap().status(), 503);
        assert_eq!(*calls.lock().unwrap(), 1);
    }
}
