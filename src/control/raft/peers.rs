//! Calls to other control nodes' `Cluster` service: one lazily made HTTP/2 connection per peer
//! address (every RPC to that peer is multiplexed over it, and a broken one is replaced on the
//! next call), mTLS with this node's control-node certificate when the cluster runs TLS. Both
//! the raft network and the cluster operations (forwarding, joining, read-index) call through
//! here.
//!
//! The connection is hyper's own HTTP/2 client under tonic's generated client, not a tonic
//! `Channel`: a `Channel` hands every call to a buffer task of its own before the connection
//! sees it, one more task switch on each raft round trip, which is the write path's latency.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::wire::cluster::Json;
use crate::wire::cluster::cluster_client::ClusterClient;

/// How long making a connection (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings on an idle connection, so a dead peer is noticed without a call.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

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

type Sender = http2::SendRequest<tonic::body::Body>;

#[derive(Clone)]
pub struct Peers {
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The connection to each peer address, made by the first call that needs it.
    connections: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Sender>>>>>>,
}

impl Peers {
    pub fn new(tls: Option<&PeerTls>) -> Result<Self, String> {
        let tls = match tls {
            Some(t) => Some(
                crate::identity::tls::client_config(
                    &t.ca_pem,
                    Some((&t.cert_pem, &t.key_pem)),
                    &[b"h2"],
                )
                .map_err(|e| format!("the cluster's TLS client: {e}"))?,
            ),
            None => None,
        };
        Ok(Self {
            tls,
            connections: Default::default(),
        })
    }

    /// The open connection to `addr`, made now if there is none (or it broke).
    async fn sender(&self, addr: &str) -> Result<Sender, CallError> {
        let slot = self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr.to_string())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        *slot = None;
        let unreachable = |message: String| CallError::Unreachable {
            addr: addr.to_string(),
            message,
        };
        let sender = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(addr))
            .await
            .map_err(|_| unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(unreachable)?;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    async fn connect(&self, addr: &str) -> Result<Sender, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let Some(tls) = &self.tls else {
            return handshake(tcp).await;
        };
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        handshake(stream).await
    }

    /// Sends `body` (JSON) to `addr` and returns the answer's JSON, within `timeout`.
    pub async fn call(
        &self,
        addr: &str,
        rpc: Rpc,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let call = async {
            let origin = format!(
                "{}://{addr}",
                if self.tls.is_some() { "https" } else { "http" }
            );
            let origin = origin.parse().map_err(|e| CallError::Unreachable {
                addr: addr.to_string(),
                message: format!("{e}"),
            })?;
            let mut sender = self.sender(addr).await?;
            // A connection that broke since it was last used takes nothing: unreachable.
            sender.ready().await.map_err(|e| CallError::Unreachable {
                addr: addr.to_string(),
                message: e.to_string(),
            })?;
            Ok(self
                .call_on(Connection(sender), origin, addr, rpc, body, timeout)
                .await)
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => Err(e),
            // It may have been delivered: no unreachable peer (see `call_on`).
            Err(_) => Err(CallError::Status {
                addr: addr.to_string(),
                code: tonic::Code::Cancelled,
                message: format!("no answer within {timeout:?}"),
            }),
        }
    }

    async fn call_on(
        &self,
        connection: Connection,
        origin: http::Uri,
        addr: &str,
        rpc: Rpc,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let mut client = ClusterClient::with_origin(connection, origin)
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
                // A connection that refused the request before sending it (closed, or going
                // away) delivered nothing. A call past its deadline (in `call`) may have been
                // delivered: that is no unreachable peer (openraft backs off from one for half
                // a second, and a forwarded write must not be sent again).
                let source = std::error::Error::source(&s);
                let unsent = source
                    .and_then(|e| e.downcast_ref::<hyper::Error>())
                    .is_some_and(|e| e.is_canceled() || e.is_closed());
                if unsent {
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

async fn handshake<I>(io: I) -> Result<Sender, String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection to a peer control node ended");
        }
    });
    Ok(sender)
}

/// One peer connection as the service tonic's client calls.
#[derive(Clone)]
struct Connection(Sender);

type Answer = http::Response<hyper::body::Incoming>;

impl tower::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = Answer;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}
