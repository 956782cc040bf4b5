//! Local health checks: the proxy probes its own app on each listener that has a `healthCheck`
//! (tcp connect, HTTP/1.1 or h2c GET expecting 200, or the gRPC Health Checking Protocol
//! expecting SERVING), applies App Mesh's thresholds, and publishes one verdict for the instance:
//! healthy while every checked listener is. The discovery stream reports each change at once, so
//! the control plane withdraws a failing instance from DNS and from peers' endpoint sets within
//! the thresholds, not a lease later.
//!
//! As in Envoy, an app that has never passed needs one success to become healthy (a booting app
//! is not kept out for `healthyThreshold` intervals); after that, `unhealthyThreshold`
//! consecutive failures mark it unhealthy and `healthyThreshold` consecutive successes bring it
//! back.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::discovery::AppliedConfig;
use crate::model::shapes::{HealthCheckPolicy, PortProtocol};
use crate::wire::health::health_check_response::ServingStatus;
use crate::wire::health::{HealthCheckRequest, health_client::HealthClient};

/// What one probe of the app found wrong.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("healthCheck.path {path:?} is not a valid request path")]
    Path { path: String },
    #[error("status {0} (200 expected)")]
    Status(u16),
    #[error("grpc: {0}")]
    Grpc(String),
    #[error("grpc health status {0:?} (SERVING expected)")]
    NotServing(ServingStatus),
}

/// One listener's check, as the config states it.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub addr: SocketAddr,
    pub policy: HealthCheckPolicy,
}

impl Check {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.policy.timeout_millis.max(1) as u64)
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.policy.interval_millis.max(1) as u64)
    }
}

/// The checks a config asks for: one per inbound listener with a `healthCheck`, against the app
/// on `app_host` at the check's port (App Mesh requires it to be the listener's).
pub fn checks(config: &crate::model::proxy_config::ProxyConfig, app_host: IpAddr) -> Vec<Check> {
    config
        .inbound
        .iter()
        .filter_map(|l| {
            let policy = l.health_check.clone()?;
            let port = policy
                .port
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(l.port);
            Some(Check {
                addr: SocketAddr::new(app_host, port),
                policy,
            })
        })
        .collect()
}

/// One probe: Ok when the app answered as healthy within the timeout.
pub async fn probe(check: &Check) -> Result<(), ProbeError> {
    let limit = check.timeout();
    match tokio::time::timeout(limit, probe_once(check)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(limit.as_millis() as u64)),
    }
}

async fn probe_once(check: &Check) -> Result<(), ProbeError> {
    let path = check.policy.path.as_deref().unwrap_or("/");
    match check.policy.protocol {
        PortProtocol::Tcp => TcpStream::connect(check.addr)
            .await
            .map(drop)
            .map_err(ProbeError::Connect),
        PortProtocol::Http => probe_http(check.addr, path, false).await,
        PortProtocol::Http2 => probe_http(check.addr, path, true).await,
        PortProtocol::Grpc => probe_grpc(check.addr).await,
    }
}

async fn probe_http(addr: SocketAddr, path: &str, h2: bool) -> Result<(), ProbeError> {
    let bad_path = || ProbeError::Path {
        path: path.to_string(),
    };
    if !path.starts_with('/') {
        return Err(bad_path());
    }
    // HTTP/2 needs the scheme and authority in the URI; HTTP/1.1 sends the path and a Host.
    let uri: http::Uri = if h2 {
        format!("http://{addr}{path}").parse()
    } else {
        path.parse()
    }
    .map_err(|_| bad_path())?;
    let request = http::Request::get(uri)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "trellis-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|_| bad_path())?;
    let io = TokioIo::new(
        TcpStream::connect(addr)
            .await
            .map_err(ProbeError::Connect)?,
    );
    let status = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        let conn = tokio::spawn(conn);
        let status = send.send_request(request).await.map(|r| r.status());
        conn.abort();
        status?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        let conn = tokio::spawn(conn);
        let status = send.send_request(request).await.map(|r| r.status());
        conn.abort();
        status?
    };
    // Envoy's (so App Mesh's) rule: only 200 is healthy.
    if status == http::StatusCode::OK {
        Ok(())
    } else {
        Err(ProbeError::Status(status.as_u16()))
    }
}

async fn probe_grpc(addr: SocketAddr) -> Result<(), ProbeError> {
    let grpc = |e: &dyn std::fmt::Display| ProbeError::Grpc(e.to_string());
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| grpc(&e))?
        .connect()
        .await
        .map_err(|e| grpc(&e))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| ProbeError::Grpc(format!("{}: {}", s.code(), s.message())))?;
    match answer.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(ProbeError::NotServing(other)),
    }
}

/// A listener's health as the thresholds make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet.
    Unknown,
    Healthy,
    Unhealthy,
}

/// Counts consecutive results against App Mesh's thresholds.
#[derive(Debug, Clone)]
pub struct Tracker {
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    state: Health,
    /// Consecutive results that disagree with `state`.
    streak: u32,
    ever_healthy: bool,
}

impl Tracker {
    pub fn new(policy: &HealthCheckPolicy) -> Self {
        Self {
            healthy_threshold: policy.healthy_threshold.max(1) as u32,
            unhealthy_threshold: policy.unhealthy_threshold.max(1) as u32,
            state: Health::Unknown,
            streak: 0,
            ever_healthy: false,
        }
    }

    pub fn state(&self) -> Health {
        self.state
    }

    /// Takes one probe result; returns the state after it.
    pub fn record(&mut self, ok: bool) -> Health {
        let (agrees, threshold, flipped) = match (self.state, ok) {
            (Health::Unknown, _) => {
                self.state = if ok {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                };
                self.ever_healthy |= ok;
                return self.state;
            }
            (Health::Healthy, true) | (Health::Unhealthy, false) => (true, 0, self.state),
            (Health::Healthy, false) => (false, self.unhealthy_threshold, Health::Unhealthy),
            (Health::Unhealthy, true) => {
                let threshold = if self.ever_healthy {
                    self.healthy_threshold
                } else {
                    1
                };
                (false, threshold, Health::Healthy)
            }
        };
        if agrees {
            self.streak = 0;
        } else {
            self.streak += 1;
            if self.streak >= threshold {
                self.state = flipped;
                self.streak = 0;
                self.ever_healthy |= flipped == Health::Healthy;
            }
        }
        self.state
    }
}

/// The instance's verdict from its listeners': unhealthy if any is, healthy when all are, and
/// unchanged while some are still unknown.
pub fn verdict(states: &[Health], previous: bool) -> bool {
    if states.contains(&Health::Unhealthy) {
        false
    } else if states.iter().all(|s| *s == Health::Healthy) {
        true
    } else {
        previous
    }
}

/// Runs the checks of the config in force (restarting them when the config's checks change)
/// and publishes the instance's health on `healthy` until `stop` is set.
pub async fn run(
    mut config: watch::Receiver<Option<Arc<AppliedConfig>>>,
    healthy: watch::Sender<bool>,
    app_host: IpAddr,
    mut stop: watch::Receiver<bool>,
) {
    let mut current: Vec<Check> = Vec::new();
    let mut states: Vec<Health> = Vec::new();
    let mut probers = JoinSet::new();
    let (tx, mut rx) = mpsc::channel::<(u64, usize, Health)>(64);
    let mut epoch = 0u64;
    loop {
        let wanted = config
            .borrow_and_update()
            .as_ref()
            .map(|c| checks(&c.config, app_host))
            .unwrap_or_default();
        if wanted != current {
            probers.abort_all();
            epoch += 1;
            current = wanted;
            states = vec![Health::Unknown; current.len()];
            for (i, check) in current.iter().cloned().enumerate() {
                probers.spawn(prober(epoch, i, check, tx.clone()));
            }
            if current.is_empty() {
                healthy.send_if_modified(|h| !std::mem::replace(h, true));
            }
        }
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            Some((at, i, state)) = rx.recv() => {
                if at == epoch && i < states.len() {
                    states[i] = state;
                    healthy.send_if_modified(|h| {
                        let now = verdict(&states, *h);
                        std::mem::replace(h, now) != now
                    });
                }
            }
            _ = stop.changed() => break,
        }
    }
    probers.abort_all();
}

/// Probes one listener every interval and reports its state whenever it changes.
async fn prober(epoch: u64, index: usize, check: Check, tx: mpsc::Sender<(u64, usize, Health)>) {
    let mut tracker = Tracker::new(&check.policy);
    let mut every = tokio::time::interval(check.interval());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let result = probe(&check).await;
        let before = tracker.state();
        let after = tracker.record(result.is_ok());
        if after != before {
            match &result {
                Ok(()) => {
                    tracing::info!(app = %check.addr, state = ?after, "app health check passing")
                }
                Err(e) => {
                    tracing::warn!(app = %check.addr, state = ?after, error = %e, "app health check failing")
                }
            }
            if tx.send((epoch, index, after)).await.is_err() {
                return;
            }
        } else if let Err(e) = &result {
            tracing::debug!(app = %check.addr, error = %e, "app health check failed");
        }
    }
}

#[cfg(test)]
mod tests;
