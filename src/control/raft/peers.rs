//! Calls to other control nodes' `Cluster` service: one lazily connected gRPC channel per peer
//! address (HTTP/2 multiplexes every RPC to that peer over it), mTLS with this node's
//! control-node certificate when the cluster runs TLS. Both the raft network and the cluster
//! operations (forwarding, joining, read-index) call through here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::wire::cluster::Json;
use crate::wire::cluster::cluster_client::ClusterClient;

/// The TLS material of a clustered control node: the cluster CA that every control node's
/// certificate chains to, and this node's own certificate.
#[derive(Clone)]
pub struct PeerTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Peers must present `spiffe://<trust_domain>/control/<id>`.
    pub trust_domain: String,
}

/// The RPCs of the `Cluster` service.
#[derive(Debug, Clone, Copy)]
pub enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    Hello,
    Join,
    Forward,
    ReadIndex,
    Remove,
    TimeoutNow,
}

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing was delivered (no connection): the call can be retried elsewhere or later.
    #[error("{addr} is unreachable: {message}")]
    Unreachable { addr: String, message: String },
    /// The peer answered with an error status.
    #[error("{addr} answered {code:?}: {message}")]
    Status {
        addr: String,
        code: tonic::Code,
        message: String,
    },
}

impl CallError {
    /// Whether the request never reached the peer's handler.
    pub fn not_delivered(&self) -> bool {
        match self {
            CallError::Unreachable { .. } => true,
            CallError::Status { code, .. } => *code == tonic::Code::Unavailable,
        }
    }
}

#[derive(Clone)]
pub struct Peers {
    tls: Option<ClientTlsConfig>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Peers {
    pub fn new(tls: Option<&PeerTls>) -> Self {
        let tls = tls.map(|t| {
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&t.ca_pem))
                .identity(Identity::from_pem(&t.cert_pem, &t.key_pem))
        });
        Self {
            tls,
            channels: Default::default(),
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, CallError> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let unreachable = |message: String| CallError::Unreachable {
            addr: addr.to_string(),
            message,
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            ep = ep
                .tls_config(tls.clone())
                .map_err(|e| unreachable(e.to_string()))?;
        }
        let channel = ep.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Sends `body` (JSON) to `addr` and returns the answer's JSON, within `timeout`.
    pub async fn call(
        &self,
        addr: &str,
        rpc: Rpc,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let mut client = ClusterClient::new(self.channel(addr)?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let mut req = tonic::Request::new(Json { json: body });
        req.set_timeout(timeout);
        let answer = match rpc {
            Rpc::AppendEntries => client.append_entries(req).await,
            Rpc::Vote => client.vote(req).await,
            Rpc::InstallSnapshot => client.install_snapshot(req).await,
            Rpc::Hello => client.hello(req).await,
            Rpc::Join => client.join(req).await,
            Rpc::Forward => client.forward(req).await,
            Rpc::ReadIndex => client.read_index(req).await,
            Rpc::Remove => client.remove(req).await,
            Rpc::TimeoutNow => client.timeout_now(req).await,
        };
        match answer {
            Ok(r) => Ok(r.into_inner().json),
            Err(s) => {
                // tonic reports a failed connect as Unavailable with a transport source, and
                // its deadline as Cancelled with one too. A call past its deadline may have
                // been delivered: that is no unreachable peer (openraft backs off from one for
                // half a second, and a forwarded write must not be sent again).
                let source = std::error::Error::source(&s);
                let transport = source.is_some_and(|e| e.is::<tonic::transport::Error>());
                let timed_out = std::iter::successors(source, |e| e.source())
                    .any(|e| e.is::<tonic::TimeoutExpired>());
                if transport && !timed_out {
                    Err(CallError::Unreachable {
                        addr: addr.to_string(),
                        message: s.message().to_string(),
                    })
                } else {
                    Err(CallError::Status {
                        addr: addr.to_string(),
                        code: s.code(),
                        message: s.message().to_string(),
                    })
                }
            }
        }
    }
}
