//! When a request is sent again: the route's retry policy (App Mesh's events, resolved by the
//! compiler) says which outcomes are retryable, and a retry budget (Linkerd's: retries may add
//! at most a fraction of the requests, plus a small floor per second, over a sliding window)
//! keeps retries from multiplying an outage.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::model::proxy_config::RetryPolicy;

/// What one attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response: its status and, for gRPC, the `grpc-status` in its headers.
    Response { status: u16, grpc: Option<u32> },
    /// No connection could be made.
    ConnectFailed,
    /// The peer refused the stream.
    Refused,
    /// The connection or stream broke after sending.
    Reset,
    /// The per-retry timeout fired.
    PerTryTimeout,
}

impl Outcome {
    /// Whether outlier detection counts it as a server error: a 5xx, or a gRPC status that
    /// Envoy's grpcToHttpStatus makes one (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
    /// INTERNAL, UNAVAILABLE, DATA_LOSS; a gRPC failure is an HTTP 200), or no response.
    pub fn is_server_error(self) -> bool {
        match self {
            Self::Response { status, grpc } => {
                status >= 500 || grpc.is_some_and(|g| matches!(g, 2 | 4 | 12 | 13 | 14 | 15))
            }
            _ => true,
        }
    }
}

/// gRPC status codes by App Mesh's event names.
fn grpc_code(event: &str) -> Option<u32> {
    Some(match event {
        "cancelled" => 1,
        "deadline-exceeded" => 4,
        "resource-exhausted" => 8,
        "internal" => 13,
        "unavailable" => 14,
        _ => return None,
    })
}

/// Whether `policy` retries `outcome`.
pub fn retryable(policy: &RetryPolicy, outcome: Outcome) -> bool {
    match outcome {
        Outcome::Response { status, grpc } => {
            policy.http_statuses.contains(&status)
                || grpc.is_some_and(|g| policy.grpc_events.iter().any(|e| grpc_code(e) == Some(g)))
        }
        Outcome::ConnectFailed => policy.on_connection_error || policy.on_reset,
        Outcome::Refused => policy.on_refused_stream || policy.on_reset,
        Outcome::Reset => policy.on_reset,
        // Envoy treats an expired per-try timeout as a 504 from the upstream.
        Outcome::PerTryTimeout => policy.http_statuses.contains(&504) || policy.on_reset,
    }
}

/// Settings of the retry budget (Linkerd's defaults: 20 %, 10 per second, 10 s).
#[derive(Debug, Clone, Copy)]
pub struct BudgetSettings {
    /// Retries may add this fraction of the requests.
    pub ratio: f64,
    /// Retries always allowed per second, whatever the traffic.
    pub min_per_second: u32,
    /// How far back requests and retries are counted.
    pub window: Duration,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Requests and retries in one-second buckets over the window.
pub struct RetryBudget {
    settings: BudgetSettings,
    buckets: Mutex<VecDeque<Bucket>>,
}

struct Bucket {
    start: Instant,
    requests: u64,
    retries: u64,
}

const BUCKET: Duration = Duration::from_secs(1);

impl RetryBudget {
    pub fn new(settings: BudgetSettings) -> Self {
        Self {
            settings,
            buckets: Mutex::new(VecDeque::new()),
        }
    }

    fn with_bucket<T>(&self, f: impl FnOnce(&mut VecDeque<Bucket>) -> T) -> T {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        while b
            .front()
            .is_some_and(|x| now.duration_since(x.start) >= self.settings.window)
        {
            b.pop_front();
        }
        if b.back()
            .is_none_or(|x| now.duration_since(x.start) >= BUCKET)
        {
            b.push_back(Bucket {
                start: now,
                requests: 0,
                retries: 0,
            });
        }
        f(&mut b)
    }

    /// Counts a request (not its retries).
    pub fn request(&self) {
        self.with_bucket(|b| {
            if let Some(last) = b.back_mut() {
                last.requests += 1;
            }
        });
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_retry(&self) -> bool {
        let s = self.settings;
        self.with_bucket(|b| {
            let requests: u64 = b.iter().map(|x| x.requests).sum();
            let retries: u64 = b.iter().map(|x| x.retries).sum();
            let allowed =
                s.ratio * requests as f64 + f64::from(s.min_per_second) * s.window.as_secs_f64();
            if (retries as f64) < allowed {
                if let Some(last) = b.back_mut() {
                    last.retries += 1;
                }
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compile::default_retry;

    fn response(status: u16) -> Outcome {
        Outcome::Response { status, grpc: None }
    }

    #[test]
    fn the_default_policy_retries_503_and_connection_trouble_only() {
        let p = default_retry();
        assert!(retryable(&p, response(503)));
        for s in [200, 404, 500, 502, 504] {
            assert!(!retryable(&p, response(s)), "{s}");
        }
        assert!(retryable(&p, Outcome::ConnectFailed));
        assert!(retryable(&p, Outcome::Reset));
        assert!(retryable(
            &p,
            Outcome::Response {
                status: 200,
                grpc: Some(14)
            }
        ));
        assert!(!retryable(
            &p,
            Outcome::Response {
                status: 200,
                grpc: Some(13)
            }
        ));
    }

    /// A gRPC failure arrives as HTTP 200 with its grpc-status: the server-side ones count
    /// towards ejection as a 5xx would, the caller's own (NOT_FOUND, INVALID_ARGUMENT) do not.
    #[test]
    fn server_errors_for_outlier_detection_include_grpc_ones() {
        let grpc = |g| Outcome::Response {
            status: 200,
            grpc: Some(g),
        };
        for g in [2, 4, 12, 13, 14, 15] {
            assert!(grpc(g).is_server_error(), "grpc-status {g}");
        }
        for g in [0, 1, 3, 5, 7, 8, 16] {
            assert!(!grpc(g).is_server_error(), "grpc-status {g}");
        }
        assert!(response(503).is_server_error());
        assert!(!response(404).is_server_error());
        assert!(Outcome::Reset.is_server_error());
    }

    #[test]
    fn a_policy_retries_its_events_and_nothing_else() {
        let mut p = default_retry();
        p.http_statuses = vec![409];
        p.on_reset = false;
        p.on_refused_stream = true;
        p.on_connection_error = false;
        p.grpc_events = vec!["deadline-exceeded".into()];
        assert!(retryable(&p, response(409)));
        assert!(!retryable(&p, response(503)));
        assert!(retryable(&p, Outcome::Refused));
        assert!(!retryable(&p, Outcome::Reset));
        assert!(!retryable(&p, Outcome::ConnectFailed));
        assert!(!retryable(&p, Outcome::PerTryTimeout));
        assert!(retryable(
            &p,
            Outcome::Response {
                status: 200,
                grpc: Some(4)
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_the_floor_then_a_fraction_of_requests() {
        let budget = RetryBudget::new(BudgetSettings {
            ratio: 0.2,
            min_per_second: 1,
            window: Duration::from_secs(10),
        });
        // No traffic: the floor, 1/s over 10 s.
        let floor = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(floor, 10);
        // 100 requests add 20 retries.
        for _ in 0..100 {
            budget.request();
        }
        assert_eq!((0..100).filter(|_| budget.try_retry()).count(), 20);
        // Once the window has passed, the spent retries are forgotten, and so are the
        // requests: the floor again.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!((0..100).filter(|_| budget.try_retry()).count(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_bucket_by_bucket() {
        let budget = RetryBudget::new(BudgetSettings {
            ratio: 0.5,
            min_per_second: 0,
            window: Duration::from_secs(3),
        });
        for _ in 0..10 {
            budget.request();
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!((0..10).filter(|_| budget.try_retry()).count(), 5);
        // The first second's requests leave the window; the retries of the third stay.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!budget.try_retry());
    }
}
