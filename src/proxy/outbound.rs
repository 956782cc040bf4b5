//! The outbound request path, in a fixed order of phases: find the backend (by VIP:port, or
//! by Host on the explicit listener, where the egress filter decides about the rest), match a
//! route, pick a weighted target, then attempt: pick a host that is not ejected (another one on
//! a retry), send over the peer pool, classify the outcome, record it for outlier detection,
//! and retry while the route's policy and the retry budget allow. The route's per-request
//! timeout bounds all attempts (504); a per-retry timeout bounds each.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};

use super::balance::random_u64;
use super::dataplane::{Cluster, OutboundPort, PeerTlsChoice, Shared};
use super::outlier::EndpointSet;
use super::retry::RetryBudget;
use super::retry::{Outcome, retryable};
use super::route::RequestHead;
use super::upstream::{Body, Hop, TARGET_PORT, UpstreamError, full};
use crate::model::proxy_config::{CompiledRoute, RetryPolicy};
use crate::model::shapes::EgressFilterType;

/// Bodies up to this size are kept so a retry can send them again (Envoy's default buffer);
/// larger or unsized ones stream through and are not retried.
pub const MAX_REPLAY_BYTES: u64 = 1 << 20;
/// The header that tells the app which attempt this is (1 for the first).
pub const ATTEMPT: &str = "x-trellis-attempt";

/// A request to a backend's VIP:port.
pub async fn vip(shared: &Shared, local: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let routing = shared.routing.borrow().clone();
    match routing.outbound.get(&local) {
        Some(port) => forward(shared, port, req).await,
        None => UpstreamError::NoRoute.response(),
    }
}

/// A request on the explicit listener: absolute-form (`HTTP_PROXY`) or with a Host naming a
/// backend virtual service.
pub async fn explicit(shared: &Shared, mut req: Request<Incoming>) -> Response<Body> {
    if req.method() == Method::CONNECT {
        return UpstreamError::BadRequest(
            "CONNECT tunnels are not supported on this listener yet".into(),
        )
        .response();
    }
    let Some((host, port)) = authority(&req) else {
        return UpstreamError::BadRequest(
            "the request names no host (absolute URI or Host)".into(),
        )
        .response();
    };
    // Origin-form from here on: the route sees the path, the peer the Host.
    if req.uri().scheme().is_some() {
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
        return forward(shared, p, req).await;
    }
    match routing.egress {
        Some(EgressFilterType::AllowAll) => {
            let addr = match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(mut a) => a.next(),
                Err(_) => None,
            };
            let Some(addr) = addr else {
                return UpstreamError::NoEndpoint(format!("{host}:{port} (no address)")).response();
            };
            shared
                .upstreams
                .send(Hop::App { addr, h2: false }, req.map(|b| b.boxed()))
                .await
                .unwrap_or_else(|e| e.response())
        }
        _ => {
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
fn authority<B>(req: &Request<B>) -> Option<(String, u16)> {
    let from_uri = req.uri().authority().cloned();
    let a = match from_uri {
        Some(a) => a,
        None => req
            .headers()
            .get(http::header::HOST)?
            .to_str()
            .ok()?
            .parse::<http::uri::Authority>()
            .ok()?,
    };
    Some((a.host().to_string(), a.port_u16().unwrap_or(80)))
}

/// One request to a backend port: route, target, attempts.
pub async fn forward(
    shared: &Shared,
    port: &OutboundPort,
    req: Request<Incoming>,
) -> Response<Body> {
    let head = RequestHead {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
        scheme: "http",
        port: port.port,
    };
    let Some(i) = port.table.select_index(&head) else {
        return UpstreamError::NoRoute.response();
    };
    let (Some(route), Some(targets)) = (port.table.route(i), port.targets.get(i)) else {
        return UpstreamError::NoRoute.response();
    };
    let no_target = || UpstreamError::NoEndpoint(format!("route {}", route.name)).response();
    let Some(t) = targets.picker.pick() else {
        return no_target();
    };
    let (Some(target), Some(Some(cluster))) = (route.targets.get(t), targets.clusters.get(t))
    else {
        return no_target();
    };
    port.budget.request();
    let limit = route.timeouts.per_request_ms;
    let attempts = attempts(shared, port, route, cluster, target.port, req);
    let result = if limit == 0 {
        attempts.await
    } else {
        tokio::time::timeout(Duration::from_millis(limit), attempts)
            .await
            .unwrap_or(Err(UpstreamError::Timeout(limit)))
    };
    result.unwrap_or_else(|e| e.response())
}

/// What every attempt sends: the head, and the body kept for replay when it is small enough.
struct Replayable {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Option<Bytes>,
    /// The body of the first attempt when it streams (not kept).
    streaming: Option<Incoming>,
}

impl Replayable {
    async fn new(req: Request<Incoming>, keep: bool) -> Result<Self, UpstreamError> {
        let (parts, body) = req.into_parts();
        let size = body.size_hint().upper();
        let (body, streaming) = if body.is_end_stream() {
            (Some(Bytes::new()), None)
        } else if keep && size.is_some_and(|s| s <= MAX_REPLAY_BYTES) {
            let bytes = Limited::new(body, MAX_REPLAY_BYTES as usize)
                .collect()
                .await
                .map_err(|e| UpstreamError::BadRequest(format!("reading the request body: {e}")))?
                .to_bytes();
            (Some(bytes), None)
        } else {
            (None, Some(body))
        };
        Ok(Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            body,
            streaming,
        })
    }

    /// The request for attempt `n` (1-based); `None` once a streamed body is spent.
    fn attempt(&mut self, n: u32, target_port: u16) -> Option<Request<Body>> {
        let body = match (&self.body, self.streaming.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(s)) => s.boxed(),
            (None, None) => return None,
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req.headers_mut()
            .insert(TARGET_PORT, http::HeaderValue::from(target_port));
        req.headers_mut()
            .insert(ATTEMPT, http::HeaderValue::from(n));
        Some(req)
    }
}

async fn attempts(
    shared: &Shared,
    port: &OutboundPort,
    route: &CompiledRoute,
    cluster: &Arc<Cluster>,
    target_port: u16,
    req: Request<Incoming>,
) -> Result<Response<Body>, UpstreamError> {
    let mut replay = Replayable::new(req, route.retry.max_retries > 0).await?;
    let tls = match &cluster.tls {
        PeerTlsChoice::Plain => None,
        PeerTlsChoice::Mtls { peer, required } => {
            if shared.upstreams.identity().has_certificate() {
                Some(peer.clone())
            } else if *required {
                return Err(UpstreamError::Forbidden(format!(
                    "{} requires mTLS and this proxy has no certificate (start it with --ca-file and --token-file)",
                    cluster.name
                )));
            } else {
                None
            }
        }
    };
    let replayable = replay.body.is_some();
    let send = |addr: SocketAddr, n: u32| {
        let req = replay.attempt(n, target_port)?;
        Some(shared.upstreams.send(
            Hop::Peer {
                addr,
                tls: tls.clone(),
            },
            req,
        ))
    };
    retry_loop(
        &route.retry,
        &port.budget,
        &cluster.endpoints,
        replayable,
        send,
    )
    .await
}

/// Attempts until one is final: a host per attempt (another one on a retry), each within the
/// per-retry timeout, each outcome recorded for outlier detection, retried while the policy,
/// the replay buffer and the budget allow.
pub async fn retry_loop<F, Fut>(
    policy: &RetryPolicy,
    budget: &RetryBudget,
    endpoints: &EndpointSet,
    replayable: bool,
    mut send: F,
) -> Result<Response<Body>, UpstreamError>
where
    F: FnMut(SocketAddr, u32) -> Option<Fut>,
    Fut: Future<Output = Result<Response<Body>, UpstreamError>>,
{
    let mut previous = None;
    let mut n = 1;
    loop {
        let Some(addr) = endpoints.pick(previous) else {
            return Err(UpstreamError::NoEndpoint(format!(
                "{} hosts, all ejected or none",
                endpoints.len()
            )));
        };
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
                .unwrap_or(Err(UpstreamError::Timeout(ms))),
        };
        let outcome = outcome(&result);
        endpoints.record(addr, outcome.is_server_error());
        let again = n <= policy.max_retries
            && replayable
            && retryable(policy, outcome)
            && budget.try_retry();
        if !again {
            return result;
        }
        tracing::debug!(%addr, ?outcome, attempt = n, "retrying");
        tokio::time::sleep(backoff(n)).await;
        previous = Some(addr);
        n += 1;
    }
}

fn outcome(result: &Result<Response<Body>, UpstreamError>) -> Outcome {
    match result {
        Ok(r) => Outcome::Response {
            status: r.status().as_u16(),
            grpc: r
                .headers()
                .get("grpc-status")
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
    use crate::proxy::retry::BudgetSettings;
    use std::sync::Mutex;

    fn hosts(n: u8) -> EndpointSet {
        EndpointSet::new(
            (1..=n).map(|i| SocketAddr::from(([127, 0, 0, i], 15000))),
            None,
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
        answers: Vec<(u16, Duration)>,
    ) -> (u16, Vec<SocketAddr>) {
        let tried = Mutex::new(Vec::new());
        let answers = Mutex::new(answers.into_iter());
        let result = retry_loop(policy, budget, endpoints, true, |addr, _| {
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
        })
        .await;
        let code = result.map_or_else(|e| e.status().as_u16(), |r| r.status().as_u16());
        (code, tried.into_inner().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn retries_fire_on_the_policys_events_up_to_max_retries_on_other_hosts() {
        let budget = RetryBudget::new(BudgetSettings::default());
        let set = hosts(3);
        let p = default_retry();
        let zero = Duration::ZERO;
        // 503 twice, then 200: three attempts, three different hosts.
        let (code, tried) = run(&p, &budget, &set, vec![(503, zero), (503, zero)]).await;
        assert_eq!(code, 200);
        assert_eq!(tried.len(), 3);
        assert!(tried[0] != tried[1] && tried[1] != tried[2], "{tried:?}");
        // 503 three times: max_retries 2, the third answer stands.
        let (code, tried) = run(&p, &budget, &set, vec![(503, zero); 5]).await;
        assert_eq!((code, tried.len()), (503, 3));
        // 500 is not in the default policy.
        let (code, tried) = run(&p, &budget, &set, vec![(500, zero); 5]).await;
        assert_eq!((code, tried.len()), (500, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_per_retry_timeout_bounds_each_attempt_and_the_last_answers_504() {
        let budget = RetryBudget::new(BudgetSettings::default());
        let set = hosts(2);
        let mut p = default_retry();
        p.http_statuses = vec![502, 503, 504];
        p.per_retry_timeout_ms = 100;
        p.max_retries = 3;
        let slow = (200, Duration::from_secs(10));
        let start = tokio::time::Instant::now();
        let (code, tried) = run(&p, &budget, &set, vec![slow; 4]).await;
        assert_eq!((code, tried.len()), (504, 4));
        // Four 100 ms attempts plus back-offs of at most 50 + 100 + 200 ms.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(800),
            "{took:?}"
        );
        // A slow answer within the per-retry timeout is fine.
        let (code, tried) = run(&p, &budget, &set, vec![(200, Duration::from_millis(99))]).await;
        assert_eq!((code, tried.len()), (200, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_per_request_timeout_covers_all_attempts() {
        let budget = RetryBudget::new(BudgetSettings::default());
        let set = hosts(2);
        let mut p = default_retry();
        p.per_retry_timeout_ms = 0;
        let slow = vec![(503, Duration::from_millis(400)); 3];
        let r =
            tokio::time::timeout(Duration::from_millis(1000), run(&p, &budget, &set, slow)).await;
        assert!(r.is_err(), "three 400 ms attempts cannot finish in 1 s");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_budget() {
        let budget = RetryBudget::new(BudgetSettings {
            ratio: 0.2,
            min_per_second: 0,
            window: Duration::from_secs(10),
        });
        let set = hosts(2);
        let p = default_retry();
        let mut attempts = 0;
        for _ in 0..100 {
            budget.request();
            attempts += run(&p, &budget, &set, vec![(503, Duration::ZERO); 3])
                .await
                .1
                .len();
        }
        // 100 requests, 20 % of them as retries: 120 attempts, not 300.
        assert!((118..=120).contains(&attempts), "{attempts}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_body_is_never_sent_twice() {
        let budget = RetryBudget::new(BudgetSettings::default());
        let set = hosts(2);
        let calls = Mutex::new(0);
        let r = retry_loop(&default_retry(), &budget, &set, false, |_, _| {
            *calls.lock().unwrap() += 1;
            Some(async { status(503) })
        })
        .await;
        assert_eq!(r.unwrap().status(), 503);
        assert_eq!(*calls.lock().unwrap(), 1);
    }
}
