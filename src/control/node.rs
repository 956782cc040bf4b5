//! Starts a control-plane node: opens the store, starts raft, makes the cluster's quotas match
//! the config, makes sure the mesh CA (and, with SigV4, an admin key) exists, and serves the
//! API, gRPC (config streams, certificates) and DNS until told to stop — over TLS with a
//! certificate of the mesh CA unless `tls = false`. `trellis control` and `trellis dev` both
//! come through here, and so do the tests.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::api::{self, ApiState, AuthSettings};
use super::ca::{self, CaError};
use super::certs::Certs;
use super::dns::{DnsError, DnsServer};
use super::raft::{
    Autopilot, ClusterService, Consensus, Membership, PeerTls, RaftSettings, StartError,
};
use super::store::Store;
use super::xds::Xds;
use crate::config::{AuthMode, ControlConfig};
use crate::identity::tls;
use crate::model::{Command, Owner};
use crate::telemetry::control::ControlMetrics;

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data_dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("opening the store in {path}: {message}")]
    Store { path: String, message: String },
    #[error("{0}")]
    Raft(#[from] StartError),
    #[error("api_addr {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("setting quotas: {0}")]
    Quotas(String),
    #[error("{0}")]
    Dns(#[from] DnsError),
    #[error("api server: {0}")]
    Serve(std::io::Error),
    #[error("mesh CA: {0}")]
    Ca(#[from] CaError),
    #[error("tls: {0}")]
    Tls(String),
}

/// This node's certificate, for the API and gRPC listeners.
struct NodeTls {
    chain_pem: String,
    key_pem: String,
    bundle_pem: String,
}

/// A started node, before it serves.
pub struct ControlNode {
    pub consensus: Consensus,
    pub api_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    listener: TcpListener,
    grpc: GrpcServer,
    dns: DnsServer,
    owner: Owner,
    tls: Option<NodeTls>,
    auth: Option<AuthSettings>,
    /// The admin key created at this start (bootstrap), to show once.
    pub admin_key: Option<(String, String)>,
    metrics: Arc<ControlMetrics>,
}

impl ControlNode {
    /// Opens storage, starts raft and binds the API listener (port 0 picks a free port).
    pub async fn start(cfg: &ControlConfig) -> Result<Self, NodeError> {
        // The store holds the CA key and access keys: only the service user may look inside.
        let private = |d: &std::path::Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(d)?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
        };
        private(&cfg.data_dir).map_err(|source| NodeError::DataDir {
            path: cfg.data_dir.display().to_string(),
            source,
        })?;
        let store = Store::open(&cfg.data_dir).map_err(|e| NodeError::Store {
            path: cfg.data_dir.display().to_string(),
            message: e.to_string(),
        })?;
        let advertise = cfg.advertise_addr.unwrap_or(cfg.grpc_addr).to_string();
        let membership = Membership {
            bootstrap_expect: cfg.bootstrap_expect,
            retry_join: cfg.retry_join.clone(),
            join: cfg.join.clone(),
        };
        let clustered = membership.clustered();
        let listener = TcpListener::bind(cfg.api_addr)
            .await
            .map_err(|source| NodeError::Bind {
                addr: cfg.api_addr,
                source,
            })?;
        let api_addr = listener.local_addr().map_err(|source| NodeError::Bind {
            addr: cfg.api_addr,
            source,
        })?;
        let grpc = TcpListener::bind(cfg.grpc_addr)
            .await
            .map_err(|source| NodeError::Bind {
                addr: cfg.grpc_addr,
                source,
            })?;
        let grpc_addr = grpc.local_addr().map_err(|source| NodeError::Bind {
            addr: cfg.grpc_addr,
            source,
        })?;
        let (names, ips) = certificate_names(cfg, api_addr, grpc_addr);
        // The cluster CA from files: this node's certificate comes from it before raft runs,
        // so it can prove itself to peers while the cluster forms.
        let file_root = match (&cfg.ca_cert_file, &cfg.ca_key_file) {
            (Some(c), Some(k)) if cfg.tls => Some(ca::root_from_files(c, k)?),
            _ => None,
        };
        let early_tls = match &file_root {
            Some(root) => {
                let (chain_pem, key_pem) =
                    ca::node_certificate_from(root, &cfg.trust_domain, cfg.node_id, &names, &ips)?;
                Some(NodeTls {
                    chain_pem,
                    key_pem,
                    bundle_pem: root.cert_pem.clone(),
                })
            }
            None if clustered && cfg.tls => {
                return Err(NodeError::Tls(
                    "a cluster with tls = true needs ca_cert_file and ca_key_file".into(),
                ));
            }
            None => None,
        };
        let peer_tls = early_tls.as_ref().map(|t| PeerTls {
            ca_pem: t.bundle_pem.clone(),
            cert_pem: t.chain_pem.clone(),
            key_pem: t.key_pem.clone(),
            trust_domain: cfg.trust_domain.clone(),
        });
        let consensus = Consensus::start(
            cfg.node_id,
            &advertise,
            store,
            RaftSettings {
                snapshot_every: cfg.snapshot_every,
                logs_kept_after_snapshot: (cfg.snapshot_every / 5).max(50),
                ..RaftSettings::default()
            },
            clustered,
            peer_tls.as_ref(),
        )
        .await?;
        let metrics = ControlMetrics::new(cfg.node_id);
        let xds = Xds::new(
            consensus.clone(),
            std::time::Duration::from_secs(u64::from(cfg.lease_seconds)),
            cfg.tls,
            metrics.clone(),
        );
        let certs = Certs::new(
            consensus.clone(),
            Duration::from_secs(cfg.proxy_cert_seconds),
            metrics.clone(),
        );
        // A clustered node serves raft before it belongs to a cluster: its peers must reach
        // it to form one. A lone node without CA files serves once its own new CA has issued
        // it a certificate.
        let grpc = if clustered {
            let server = GrpcServer::spawn(
                grpc,
                early_tls.as_ref(),
                &cfg.trust_domain,
                xds,
                certs,
                &consensus,
            )?;
            consensus.form(&membership).await?;
            Grpc::Serving(server)
        } else {
            Grpc::Waiting(Box::new((grpc, xds, certs)))
        };
        if cfg.autopilot_dead_voter_seconds > 0 {
            consensus.start_autopilot(Autopilot {
                dead_after: Duration::from_secs(cfg.autopilot_dead_voter_seconds),
                min_voters: cfg.autopilot_min_voters,
            });
        }
        if consensus.read(|s| s.quotas() != &cfg.quotas) {
            let out = consensus
                .write(Command::SetQuotas(cfg.quotas.clone()))
                .await
                .map_err(|e| NodeError::Quotas(e.to_string()))?;
            out.map_err(|e| NodeError::Quotas(e.to_string()))?;
        }
        ca::ensure_root(&consensus, &cfg.trust_domain, file_root.as_ref()).await?;
        ca::write_bundle(&consensus, &cfg.data_dir)?;
        let admin_key = match cfg.auth {
            AuthMode::Sigv4 => ca::ensure_admin_key(&consensus, &cfg.data_dir).await?,
            AuthMode::None => None,
        };
        let owner = Owner {
            region: cfg.region.clone(),
            account: cfg.account_id.clone(),
        };
        let dns = DnsServer::start(
            cfg.dns_addr,
            consensus.clone(),
            cfg.dns_ttl,
            metrics.clone(),
        )
        .await?;
        let auth = (cfg.auth == AuthMode::Sigv4).then(|| AuthSettings {
            region: cfg.region.clone(),
            max_skew: Duration::from_secs(cfg.sigv4_max_skew_seconds),
        });
        let tls = match early_tls {
            Some(t) => Some(t),
            None if cfg.tls => {
                let (chain_pem, key_pem) =
                    ca::node_certificate(&consensus, cfg.node_id, &names, &ips)?;
                metrics.certificate_issued("node");
                let bundle_pem = consensus.read(|s| s.security().bundle_pem());
                Some(NodeTls {
                    chain_pem,
                    key_pem,
                    bundle_pem,
                })
            }
            None => None,
        };
        let grpc = match grpc {
            Grpc::Serving(server) => server,
            Grpc::Waiting(waiting) => {
                let (listener, xds, certs) = *waiting;
                GrpcServer::spawn(
                    listener,
                    tls.as_ref(),
                    &cfg.trust_domain,
                    xds,
                    certs,
                    &consensus,
                )?
            }
        };
        Ok(Self {
            consensus,
            api_addr,
            dns_addr: dns.addr,
            grpc_addr,
            listener,
            grpc,
            dns,
            owner,
            tls,
            auth,
            admin_key,
            metrics,
        })
    }

    /// Whether the API and gRPC listeners speak TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves the API (DNS is already serving) until `shutdown` resolves, then stops DNS and
    /// raft.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let state = Arc::new(ApiState {
            consensus: self.consensus.clone(),
            owner: self.owner,
            proxies: self.grpc.proxies.clone(),
            traffic: self.grpc.traffic.clone(),
            auth: self.auth.clone(),
            metrics: self.metrics.clone(),
        });
        let app = api::router(state);
        let res = match &self.tls {
            Some(t) => {
                let config = tls::server_config(
                    &t.chain_pem,
                    &t.key_pem,
                    None,
                    false,
                    &[b"h2", b"http/1.1"],
                )
                .map_err(|e| NodeError::Tls(e.to_string()))?;
                api::serve_tls(self.listener, app, config, shutdown).await
            }
            None => {
                use axum::serve::ListenerExt;
                let listener = self.listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
        };
        self.grpc.stop().await;
        self.dns.shutdown().await;
        self.consensus.shutdown().await;
        res.map_err(NodeError::Serve)
    }
}

/// The gRPC listener during start-up: served at once by a clustered node (its peers need raft
/// to form the cluster), or waiting for the certificate a lone node's new CA issues it.
enum Grpc {
    Serving(GrpcServer),
    Waiting(Box<(TcpListener, Xds, Certs)>),
}

/// The gRPC server (raft and cluster RPCs, proxy config streams, certificates), running.
struct GrpcServer {
    proxies: super::xds::ProxyTable,
    traffic: super::traffic::TrafficTable,
    stop: tokio::sync::oneshot::Sender<()>,
    /// Ends the streams that would otherwise hold a graceful stop forever (a leader's
    /// AppendEntries stream to this node).
    closing: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl GrpcServer {
    fn spawn(
        listener: TcpListener,
        tls: Option<&NodeTls>,
        trust_domain: &str,
        xds: Xds,
        certs: Certs,
        consensus: &Consensus,
    ) -> Result<Self, NodeError> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (closing, closed) = tokio::sync::watch::channel(false);
        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = tls {
            // Proxies without a certificate yet must reach Identity.Issue: client certificates
            // are optional at the handshake and required by the services that need them.
            let config = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(
                    &t.chain_pem,
                    &t.key_pem,
                ))
                .client_ca_root(tonic::transport::Certificate::from_pem(&t.bundle_pem))
                .client_auth_optional(true);
            builder = builder
                .tls_config(config)
                .map_err(|e| NodeError::Tls(e.to_string()))?;
        }
        let proxies = xds.proxies();
        let traffic = xds.traffic();
        let trust_domain = tls.map(|_| trust_domain.to_string());
        let task = tokio::spawn(
            builder
                .add_service(ClusterService::server(
                    consensus.clone(),
                    trust_domain,
                    closed,
                ))
                .add_service(xds.into_service())
                .add_service(certs.into_service())
                .serve_with_incoming_shutdown(
                    // Without TCP_NODELAY an answer to a raft RPC could wait for the caller's
                    // delayed ACK (40 ms): a stall every half second at one client.
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        Ok(Self {
            proxies,
            traffic,
            stop,
            closing,
            task,
        })
    }

    async fn stop(self) {
        self.closing.send_replace(true);
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "grpc server"),
            Err(e) => tracing::warn!(error = %e, "grpc server task"),
            Ok(Ok(())) => {}
        }
    }
}

/// The names and addresses a node's certificate carries: localhost, 127.0.0.1, the IPs it
/// listens and advertises on, and `tls_names`.
fn certificate_names(
    cfg: &ControlConfig,
    api_addr: SocketAddr,
    grpc_addr: SocketAddr,
) -> (Vec<String>, Vec<IpAddr>) {
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1]), api_addr.ip(), grpc_addr.ip()];
    ips.extend(cfg.advertise_addr.map(|a| a.ip()));
    let mut names = vec!["localhost".to_string()];
    for n in &cfg.tls_names {
        match n.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => names.push(n.clone()),
        }
    }
    ips.retain(|ip| !ip.is_unspecified());
    ips.sort();
    ips.dedup();
    (names, ips)
}
