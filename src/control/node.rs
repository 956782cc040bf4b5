//! Starts a control-plane node: opens the store, starts raft, makes the cluster's quotas match
//! the config, and serves the API until told to stop. `trellis control` and `trellis dev` both
//! come through here, and so do the tests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::api::{self, ApiState};
use super::dns::{DnsError, DnsServer};
use super::raft::{Consensus, RaftSettings, StartError};
use super::store::Store;
use super::xds::Xds;
use crate::config::ControlConfig;
use crate::model::{Command, Owner};

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
}

/// A started node, before it serves.
pub struct ControlNode {
    pub consensus: Consensus,
    pub api_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    listener: TcpListener,
    grpc: TcpListener,
    xds: Xds,
    dns: DnsServer,
    owner: Owner,
}

impl ControlNode {
    /// Opens storage, starts raft and binds the API listener (port 0 picks a free port).
    pub async fn start(cfg: &ControlConfig) -> Result<Self, NodeError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| NodeError::DataDir {
            path: cfg.data_dir.display().to_string(),
            source,
        })?;
        let store = Store::open(&cfg.data_dir).map_err(|e| NodeError::Store {
            path: cfg.data_dir.display().to_string(),
            message: e.to_string(),
        })?;
        let advertise = cfg.advertise_addr.unwrap_or(cfg.grpc_addr).to_string();
        let consensus =
            Consensus::start(cfg.node_id, &advertise, store, RaftSettings::default()).await?;
        if consensus.read(|s| s.quotas() != &cfg.quotas) {
            let out = consensus
                .write(Command::SetQuotas(cfg.quotas.clone()))
                .await
                .map_err(|e| NodeError::Quotas(e.to_string()))?;
            out.map_err(|e| NodeError::Quotas(e.to_string()))?;
        }
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
        let owner = Owner {
            region: cfg.region.clone(),
            account: cfg.account_id.clone(),
        };
        let dns = DnsServer::start(cfg.dns_addr, consensus.clone(), cfg.dns_ttl).await?;
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
        let xds = Xds::new(
            consensus.clone(),
            std::time::Duration::from_secs(u64::from(cfg.lease_seconds)),
        );
        Ok(Self {
            consensus,
            api_addr,
            dns_addr: dns.addr,
            grpc_addr,
            listener,
            grpc,
            xds,
            dns,
            owner,
        })
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
            proxies: self.xds.proxies(),
        });
        let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
        let grpc = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(self.xds.into_service())
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(self.grpc),
                    async {
                        let _ = grpc_stopped.await;
                    },
                ),
        );
        let app = api::router(state);
        let res = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        let _ = stop_grpc.send(());
        match grpc.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "grpc server"),
            Err(e) => tracing::warn!(error = %e, "grpc server task"),
            Ok(Ok(())) => {}
        }
        self.dns.shutdown().await;
        self.consensus.shutdown().await;
        res.map_err(NodeError::Serve)
    }
}
