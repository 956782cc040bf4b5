//! The proxy's side of the config stream: connect to one of the control nodes (moving to the
//! next on failure, with exponential backoff and jitter), say Hello, apply each config that
//! arrives (checked first; refused ones are nacked and the previous config stays), write the
//! last good one to the data directory, and heartbeat with the local app's health (at once
//! when it changes). At start the cached config is served until a control node answers.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::identity::{self, ProxyCert};
use crate::model::proxy_config::{ProxyConfig, ProxyRole};
use crate::telemetry::proxy::ProxyMetrics;
use crate::wire::discovery::discovery_client::DiscoveryClient;
use crate::wire::discovery::{
    Ack, EdgeTraffic, Goodbye, Heartbeat, Hello, Nack, ProxyMessage, Traffic, control_message,
    proxy_message,
};
use crate::wire::{decode_config, role_to_hello};

const CACHE_FILE: &str = "config.json";
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the proxy reports its traffic for `trellis top` (also when nothing moved: the
/// control node's rates then fall to zero).
const TRAFFIC_EVERY: Duration = Duration::from_secs(2);

/// Who this proxy is and where the control plane is.
#[derive(Debug, Clone)]
pub struct DiscoverySettings {
    /// Control nodes' gRPC addresses (`host:port`), tried in turn.
    pub controls: Vec<String>,
    pub mesh: String,
    pub role: ProxyRole,
    /// Unique per process; a reconnect keeps it.
    pub proxy_id: String,
    /// The address peers use to reach this proxy.
    pub advertise: IpAddr,
    pub inbound_port: u16,
    /// Where the last good config is kept.
    pub data_dir: PathBuf,
    /// The mesh CA bundle control nodes' certificates chain to; `None`: plaintext (dev).
    pub ca_bundle: Option<String>,
    /// This proxy's certificate, presented on the stream (mTLS) when `ca_bundle` is set.
    pub cert: Option<watch::Receiver<Option<Arc<ProxyCert>>>>,
    /// Where the traffic summaries sent on the stream come from.
    pub traffic: Option<Arc<ProxyMetrics>>,
}

/// The proxy's traffic per edge, as the stream carries it.
fn traffic(metrics: &ProxyMetrics) -> Vec<EdgeTraffic> {
    let mut edges: Vec<EdgeTraffic> = metrics
        .traffic()
        .into_iter()
        .map(|(e, by_class, latency)| EdgeTraffic {
            direction: e.direction.as_str().to_string(),
            port: u32::from(e.port),
            virtual_service: e.virtual_service,
            route: e.route,
            target_virtual_node: e.target_virtual_node,
            caller: e.caller,
            by_class: by_class.to_vec(),
            latency_buckets: latency,
        })
        .collect();
    edges.sort_by(|a, b| {
        (
            &a.direction,
            a.port,
            &a.virtual_service,
            &a.route,
            &a.target_virtual_node,
            &a.caller,
        )
            .cmp(&(
                &b.direction,
                b.port,
                &b.virtual_service,
                &b.route,
                &b.target_virtual_node,
                &b.caller,
            ))
    });
    edges
}

/// A config in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedConfig {
    pub version: u64,
    pub config: ProxyConfig,
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum RejectReason {
    #[error("the config is for {got}, this proxy serves {want}")]
    WrongProxy { got: String, want: String },
    #[error("logging.accessLog.file.path: cannot open {path}: {error}")]
    AccessLog { path: String, error: std::io::Error },
    #[error("{0}")]
    Decode(String),
    #[error("{0}")]
    Route(#[from] super::dataplane::RoutingError),
}

/// Reads the cached config, if a usable one is there.
pub fn load_cache(dir: &Path) -> Option<AppliedConfig> {
    let bytes = std::fs::read(dir.join(CACHE_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_cache(dir: &Path, applied: &AppliedConfig) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{CACHE_FILE}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(applied).map_err(std::io::Error::other)?,
    )?;
    // A rename is atomic: a crash leaves the old cache or the new one, never half of either.
    std::fs::rename(tmp, dir.join(CACHE_FILE))
}

/// Checks what the proxy must be able to do with a config before it takes it.
pub fn check(settings: &DiscoverySettings, config: &ProxyConfig) -> Result<(), RejectReason> {
    if config.mesh != settings.mesh || config.role != settings.role {
        return Err(RejectReason::WrongProxy {
            got: format!("{}/{:?}", config.mesh, config.role),
            want: format!("{}/{:?}", settings.mesh, settings.role),
        });
    }
    if let Some(log) = &config.access_log
        && log.path != "/dev/stdout"
        && log.path != "/dev/stderr"
    {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log.path)
            .map_err(|error| RejectReason::AccessLog {
                path: log.path.clone(),
                error,
            })?;
    }
    super::dataplane::Routing::check(config)?;
    Ok(())
}

/// Keeps `current` up to date from the control plane until `stop` is set; then says goodbye.
pub async fn run(
    settings: DiscoverySettings,
    current: watch::Sender<Option<Arc<AppliedConfig>>>,
    mut health: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    if let Some(cached) = load_cache(&settings.data_dir)
        && check(&settings, &cached.config).is_ok()
    {
        tracing::info!(
            version = cached.version,
            "serving the cached config until a control node answers"
        );
        current.send_replace(Some(Arc::new(cached)));
    }
    let mut backoff = MIN_BACKOFF;
    let mut next = 0usize;
    loop {
        let control = settings.controls[next % settings.controls.len()].clone();
        next += 1;
        match session(&settings, &control, &current, &mut health, &mut stop).await {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Lost) => backoff = MIN_BACKOFF,
            Err(e) => {
                tracing::warn!(control = %control, error = %e, "config stream failed");
            }
        }
        let wait = backoff + jitter(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Up to half of `d`, from the clock's low bits: enough to spread reconnects apart.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

enum Ended {
    Stopped,
    /// The stream ended after working: reconnect quickly.
    Lost,
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("{0}")]
    Address(String),
    #[error("waiting for this proxy's certificate")]
    NoCertificate,
}

async fn session(
    settings: &DiscoverySettings,
    control: &str,
    current: &watch::Sender<Option<Arc<AppliedConfig>>>,
    health: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Ended, StreamError> {
    let cert = settings.cert.as_ref().and_then(|c| c.borrow().clone());
    if settings.ca_bundle.is_some() && cert.is_none() {
        return Err(StreamError::NoCertificate);
    }
    let endpoint = identity::endpoint(control, settings.ca_bundle.as_deref(), cert.as_deref())
        .map_err(StreamError::Address)?;
    let mut client = DiscoveryClient::new(endpoint.connect().await?);
    let (out, rx) = mpsc::channel(16);
    let have_version = current.borrow().as_ref().map_or(0, |c| c.version);
    let hello = Hello {
        proxy_id: settings.proxy_id.clone(),
        mesh: settings.mesh.clone(),
        role: Some(role_to_hello(&settings.role)),
        advertise_address: settings.advertise.to_string(),
        inbound_port: u32::from(settings.inbound_port),
        have_version,
        healthy: *health.borrow_and_update(),
    };
    let send = |kind| ProxyMessage { kind: Some(kind) };
    let _ = out.send(send(proxy_message::Kind::Hello(hello))).await;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(control = %control, "config stream open");
    let mut lease = Duration::from_secs(15);
    let mut health_open = true;
    let mut beat = tokio::time::interval(lease / 3);
    beat.tick().await;
    let mut report = tokio::time::interval(TRAFFIC_EVERY);
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Some(msg) = msg? else { return Ok(Ended::Lost) };
                let Some(control_message::Kind::Config(c)) = msg.kind else { continue };
                let verdict = decode_config(&c)
                    .map_err(|e| RejectReason::Decode(e.to_string()))
                    .and_then(|config| check(settings, &config).map(|()| config));
                match verdict {
                    Ok(config) => {
                        let applied = AppliedConfig { version: c.version, config };
                        if let Err(e) = write_cache(&settings.data_dir, &applied) {
                            tracing::warn!(error = %e, "could not cache the config");
                        }
                        current.send_replace(Some(Arc::new(applied)));
                        tracing::info!(version = c.version, "config applied");
                        if c.lease_seconds > 0 && Duration::from_secs(u64::from(c.lease_seconds)) != lease {
                            lease = Duration::from_secs(u64::from(c.lease_seconds));
                            beat = tokio::time::interval(lease / 3);
                            beat.tick().await;
                        }
                        let _ = out.send(send(proxy_message::Kind::Ack(Ack { version: c.version }))).await;
                    }
                    Err(reason) => {
                        tracing::warn!(version = c.version, %reason, "config refused; the previous one stays");
                        let nack = Nack { version: c.version, reason: reason.to_string() };
                        let _ = out.send(send(proxy_message::Kind::Nack(nack))).await;
                    }
                }
            }
            changed = health.changed(), if health_open => {
                health_open = changed.is_ok();
                // A change is reported now, not at the next beat: DNS and peers follow it at once.
                let healthy = *health.borrow_and_update();
                let _ = out.send(send(proxy_message::Kind::Heartbeat(Heartbeat { healthy }))).await;
            }
            _ = beat.tick() => {
                let healthy = *health.borrow();
                let _ = out.send(send(proxy_message::Kind::Heartbeat(Heartbeat { healthy }))).await;
            }
            _ = report.tick(), if settings.traffic.is_some() => {
                let edges = settings.traffic.as_ref().map(|m| traffic(m)).unwrap_or_default();
                if !edges.is_empty() {
                    let _ = out.send(send(proxy_message::Kind::Traffic(Traffic { edges }))).await;
                }
            }
            _ = stop.changed() => {
                let _ = out.send(send(proxy_message::Kind::Goodbye(Goodbye {}))).await;
                drop(out);
                // The control node ends the stream once it has the goodbye.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                return Ok(Ended::Stopped);
            }
        }
    }
}
