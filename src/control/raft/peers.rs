//! Calls to other control nodes' `Cluster` service: one lazily made HTTP/2 connection per peer
//! address (every RPC to that peer is multiplexed over it, and a broken one is replaced on the
//! next call), mTLS with this node's control-node certificate when the cluster runs TLS. Both
//! the raft network and the cluster operations (forwarding, joining, read-index) call through
//! here.
//!
//! The calls are made on the `h2` crate directly, not through tonic's client and `Channel` or
//! hyper's client: a `Channel` hands every call to a buffer task of its own before the
//! connection sees it, tonic's request body takes three writes (so three wake-ups of the peer)
//! and hyper's two (HEADERS, then DATA from a task it spawns once the stream has flow-control
//! capacity), where one will do: here HEADERS and the whole DATA are queued together and leave
//! in one write. Each wake-up is time on every raft round trip, which is the write path's
//! latency.
//!
//! AppendEntries, two per write for each follower (the entry, then the commit index), goes on
//! one long-lived stream per replication ([`AppendStream`]): a DATA frame each way per call, no
//! request headers, trailers, HPACK work or task on the follower.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, Bytes, BytesMut};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::wire::cluster::Json;

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

/// A connection to a peer: its request handle, and whether it has ended.
#[derive(Clone)]
struct Sender {
    requests: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Sender {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// A peer's connection, if made; callers wait on the lock while one is being made.
type Slot = Arc<tokio::sync::Mutex<Option<Sender>>>;

#[derive(Clone)]
pub struct Peers {
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The connection to each peer address, made by the first call that needs it.
    connections: Arc<Mutex<HashMap<String, Slot>>>,
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
        if let Some(s) = slot.lock().await.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        // Made in a task of its own, which stores it: a caller that gives up (a heartbeat
        // allows 100 ms) must not cancel a connection that takes longer to make, TLS over a
        // slow link, or no call would ever find one made.
        let peers = self.clone();
        let to = addr.to_string();
        let made = tokio::spawn(async move {
            let mut slot = slot.lock_owned().await;
            if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
                return Ok(s.clone());
            }
            *slot = None;
            let sender = tokio::time::timeout(CONNECT_TIMEOUT, peers.connect(&to))
                .await
                .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))??;
            *slot = Some(sender.clone());
            Ok(sender)
        });
        made.await
            .map_err(|e| e.to_string())
            .and_then(|made| made)
            .map_err(|message| CallError::Unreachable {
                addr: addr.to_string(),
                message,
            })
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

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Sends `body` (JSON) to `addr` and returns the answer's JSON, within `timeout`.
    pub async fn call(
        &self,
        addr: &str,
        rpc: Rpc,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let scheme = self.scheme();
        let deadline = tokio::time::Instant::now() + timeout;
        // Nothing is sent before there is a connection: running out of time here is
        // unreachable, which a caller may retry elsewhere.
        let sender = tokio::time::timeout_at(deadline, self.sender(addr))
            .await
            .map_err(|_| CallError::Unreachable {
                addr: addr.to_string(),
                message: format!("no connection within {timeout:?}"),
            })??;
        let call = async {
            let uri = format!(
                "{scheme}://{addr}/trellis.cluster.v1.Cluster/{}",
                rpc.method()
            );
            unary(sender.requests, &uri, body, timeout)
                .await
                .map_err(|e| e.at(addr))
        };
        match tokio::time::timeout_at(deadline, call).await {
            Ok(answer) => answer,
            // It may have been delivered: no unreachable peer (see `Failure`).
            Err(_) => Err(CallError::Status {
                addr: addr.to_string(),
                code: tonic::Code::Cancelled,
                message: format!("no answer within {timeout:?}"),
            }),
        }
    }
}

/// A long-lived `AppendStream` call to one peer, carrying one replication's AppendEntries: one
/// request at a time, each answered in order before the next is sent. Opened by the first call;
/// a failure, a timeout or a call dropped before its answer drops it (a late answer can then
/// never be taken for the next one's), and the next call opens another.
pub struct AppendStream {
    addr: String,
    open: Option<OpenStream>,
}

struct OpenStream {
    requests: h2::SendStream<Bytes>,
    answers: Answers,
    /// Answer bytes read but not yet a whole message.
    buf: BytesMut,
    /// The connection it runs on: once that ends, so has the stream.
    connection: Sender,
}

enum Answers {
    /// The answer's head has not come yet (it comes with, or before, the first answer).
    Head(h2::client::ResponseFuture),
    Body(h2::RecvStream),
}

impl AppendStream {
    pub fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            open: None,
        }
    }

    /// Sends one AppendEntries (`json`) on the stream, opening it first if need be, and returns
    /// the answer's JSON, within `timeout`. Errors mean what [`Peers::call`]'s do.
    pub async fn call(
        &mut self,
        peers: &Peers,
        json: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let framed = grpc_frame(json).map_err(|f| f.at(&self.addr))?;
        let mut fresh = false;
        let mut open = loop {
            let mut open = match self.open.take().filter(|o| !o.connection.is_closed()) {
                Some(open) => open,
                None => {
                    // Nothing is sent before there is a connection (see `Peers::call`).
                    let connection = tokio::time::timeout_at(deadline, peers.sender(&self.addr))
                        .await
                        .map_err(|_| CallError::Unreachable {
                            addr: self.addr.clone(),
                            message: format!("no connection within {timeout:?}"),
                        })??;
                    fresh = true;
                    let start = OpenStream::start(connection, peers.scheme(), &self.addr);
                    tokio::time::timeout_at(deadline, start)
                        .await
                        .map_err(|_| CallError::Unreachable {
                            addr: self.addr.clone(),
                            message: format!("no stream within {timeout:?}"),
                        })?
                        .map_err(|f| f.at(&self.addr))?
                }
            };
            match open.requests.send_data(framed.clone(), false) {
                Ok(()) => break open,
                Err(e) if fresh => return Err(sent_failure(&e).at(&self.addr)),
                // A stream that ended since its last answer took nothing of this request:
                // once more on a new one.
                Err(_) => continue,
            }
        };
        // Held here, not in `self`, until the answer is in: if this call is dropped first
        // (openraft times its RPCs out too) the stream goes with it, and no later call can
        // read this one's answer as its own.
        match tokio::time::timeout_at(deadline, open.next_answer()).await {
            Ok(Ok(answer)) => {
                self.open = Some(open);
                Ok(answer)
            }
            Ok(Err(f)) => Err(f.at(&self.addr)),
            // It may have been delivered (see `Failure`).
            Err(_) => Err(CallError::Status {
                addr: self.addr.clone(),
                code: tonic::Code::Cancelled,
                message: format!("no answer within {timeout:?}"),
            }),
        }
    }
}

impl OpenStream {
    async fn start(connection: Sender, scheme: &str, addr: &str) -> Result<Self, Failure> {
        let req = http::Request::post(format!(
            "{scheme}://{addr}/trellis.cluster.v1.Cluster/AppendStream"
        ))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())
        .map_err(|e| Failure::Status(tonic::Code::Internal, e.to_string()))?;
        let mut requests = connection
            .requests
            .clone()
            .ready()
            .await
            .map_err(|e| Failure::Unsent(e.to_string()))?;
        let (answer, stream) = requests
            .send_request(req, false)
            .map_err(|e| Failure::Unsent(e.to_string()))?;
        Ok(Self {
            requests: stream,
            answers: Answers::Head(answer),
            buf: BytesMut::new(),
            connection,
        })
    }

    async fn next_answer(&mut self) -> Result<Vec<u8>, Failure> {
        loop {
            let body = match &mut self.answers {
                Answers::Head(head) => {
                    let (head, body) = head.await.map_err(|e| sent_failure(&e))?.into_parts();
                    check_head(&head)?;
                    self.answers = Answers::Body(body);
                    continue;
                }
                Answers::Body(body) => body,
            };
            if let Some(message) = take_message(&mut self.buf)? {
                return Ok(message);
            }
            match body.data().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(|e| sent_failure(&e))?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                // The peer ended the stream: its trailers say why.
                None => {
                    let trailers = body.trailers().await.map_err(|e| sent_failure(&e))?;
                    return Err(match trailers.as_ref().and_then(grpc_status) {
                        Some((tonic::Code::Ok, _)) | None => Failure::Status(
                            tonic::Code::Unknown,
                            "the peer ended the append stream".into(),
                        ),
                        Some((code, message)) => Failure::Status(code, message),
                    });
                }
            }
        }
    }
}

impl Rpc {
    fn method(self) -> &'static str {
        match self {
            Rpc::AppendEntries => "AppendEntries",
            Rpc::Vote => "Vote",
            Rpc::InstallSnapshot => "InstallSnapshot",
            Rpc::Hello => "Hello",
            Rpc::Join => "Join",
            Rpc::Forward => "Forward",
            Rpc::ReadIndex => "ReadIndex",
            Rpc::Remove => "Remove",
            Rpc::TimeoutNow => "TimeoutNow",
        }
    }
}

/// A failed unary call, before it is told which peer it was for.
enum Failure {
    /// The connection refused the request before sending it (closed, or going away).
    Unsent(String),
    /// Anything after that may have been delivered: no unreachable peer (openraft backs off
    /// from one for half a second, and a forwarded write must not be sent again).
    Status(tonic::Code, String),
}

impl Failure {
    fn at(self, addr: &str) -> CallError {
        let addr = addr.to_string();
        match self {
            Failure::Unsent(message) => CallError::Unreachable { addr, message },
            Failure::Status(code, message) => CallError::Status {
                addr,
                code,
                message,
            },
        }
    }
}

/// One unary gRPC call of the `Cluster` service (whose messages are all `Json`): HEADERS and
/// the one DATA frame (which ends the stream) are queued before the connection writes, so they
/// leave in one write.
async fn unary(
    requests: h2::client::SendRequest<Bytes>,
    uri: &str,
    json: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, Failure> {
    let framed = grpc_frame(&json)?;
    let req = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header("grpc-timeout", format!("{}m", timeout.as_millis().max(1)))
        .body(())
        .map_err(|e| Failure::Status(tonic::Code::Internal, e.to_string()))?;
    // A connection that broke, or is going away, takes nothing: unsent.
    let mut requests = requests
        .ready()
        .await
        .map_err(|e| Failure::Unsent(e.to_string()))?;
    let (answer, mut stream) = requests
        .send_request(req, false)
        .map_err(|e| Failure::Unsent(e.to_string()))?;
    // Queued whatever the stream's flow-control window: h2 sends it as the window allows.
    stream
        .send_data(framed, true)
        .map_err(|e| sent_failure(&e))?;
    let answer = answer.await.map_err(|e| sent_failure(&e))?;
    let (head, mut body) = answer.into_parts();
    check_head(&head)?;
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| sent_failure(&e))?;
        // Read is read: the peer may send more.
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(|e| sent_failure(&e))?;
    match trailers.as_ref().and_then(grpc_status) {
        Some((tonic::Code::Ok, _)) => {}
        Some((code, message)) => return Err(Failure::Status(code, message)),
        None => {
            return Err(Failure::Status(
                tonic::Code::Internal,
                "the answer ended without a grpc-status".into(),
            ));
        }
    }
    match take_message(&mut data)? {
        Some(message) if data.is_empty() => Ok(message),
        _ => Err(Failure::Status(
            tonic::Code::Internal,
            "a malformed answer".into(),
        )),
    }
}

/// `Json { json }` as one length-prefixed gRPC message.
fn grpc_frame(json: &[u8]) -> Result<Bytes, Failure> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

    // The message is its one field: key, length, bytes (written here, not through a `Json`,
    // so the caller keeps its bytes).
    let message_len = 1 + encoded_len_varint(json.len() as u64) + json.len();
    let len = u32::try_from(message_len)
        .map_err(|_| Failure::Status(tonic::Code::Internal, "request over 4 GiB".into()))?;
    let mut framed = Vec::with_capacity(5 + message_len);
    framed.push(0);
    framed.extend_from_slice(&len.to_be_bytes());
    encode_key(1, WireType::LengthDelimited, &mut framed);
    encode_varint(json.len() as u64, &mut framed);
    framed.extend_from_slice(json);
    Ok(Bytes::from(framed))
}

/// The next whole gRPC message in `buf` (taken out of it), if there is one yet.
fn take_message(buf: &mut BytesMut) -> Result<Option<Vec<u8>>, Failure> {
    use prost::Message;

    let Some(head) = buf.get(..5) else {
        return Ok(None);
    };
    if head[0] != 0 {
        return Err(Failure::Status(
            tonic::Code::Internal,
            "a compressed answer (none was asked for)".into(),
        ));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    let message = buf.split_to(len);
    Json::decode(message.freeze())
        .map(|m| Some(m.json))
        .map_err(|e| Failure::Status(tonic::Code::Internal, e.to_string()))
}

/// An answer's head: 200, and no grpc-status (a trailers-only answer is an error's).
fn check_head(head: &http::response::Parts) -> Result<(), Failure> {
    if head.status != http::StatusCode::OK {
        return Err(Failure::Status(
            tonic::Code::Unknown,
            format!("HTTP status {}", head.status),
        ));
    }
    match grpc_status(&head.headers) {
        Some((code, message)) => Err(Failure::Status(code, message)),
        None => Ok(()),
    }
}

/// A `grpc-status` and its message, where `h` has one.
fn grpc_status(h: &http::HeaderMap) -> Option<(tonic::Code, String)> {
    h.get("grpc-status").map(|code| {
        let code = code.to_str().ok().and_then(|c| c.parse::<i32>().ok());
        let message = h
            .get("grpc-message")
            .map(|m| percent_decode(m.as_bytes()))
            .unwrap_or_default();
        (tonic::Code::from(code.unwrap_or(2)), message)
    })
}

/// gRPC's `grpc-message` is percent-encoded.
fn percent_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (raw[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A failure once the request may have gone out. A refused stream was not processed
/// (RFC 9113 §8.7): unsent. Anything else may have reached the handler: Unknown, never the
/// Unavailable that means "not delivered" (a forwarded write must not be sent twice).
fn sent_failure(e: &h2::Error) -> Failure {
    if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        Failure::Unsent(e.to_string())
    } else {
        Failure::Status(tonic::Code::Unknown, e.to_string())
    }
}

/// HTTP/2 on `io`, driven by a task of its own, which pings the peer after [`KEEP_ALIVE`]
/// without a frame from it and closes the connection when the pong does not come within
/// another [`KEEP_ALIVE`]: a dead peer is noticed without a call.
async fn handshake<I>(io: I) -> Result<Sender, String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // hyper's client windows: a snapshot chunk or a large forwarded answer is megabytes.
    let (requests, mut connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let closed = Arc::new(AtomicBool::new(false));
    let pings = connection.ping_pong();
    let ended = closed.clone();
    tokio::spawn(async move {
        let alive = async {
            let Some(mut pings) = pings else {
                return std::future::pending().await;
            };
            loop {
                tokio::time::sleep(KEEP_ALIVE).await;
                let pong = tokio::time::timeout(KEEP_ALIVE, pings.ping(h2::Ping::opaque()));
                match pong.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return e.to_string(),
                    Err(_) => return format!("no pong within {KEEP_ALIVE:?}"),
                }
            }
        };
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection to a peer control node ended");
                }
            }
            why = alive => tracing::debug!(%why, "a peer control node stopped answering pings"),
        }
        ended.store(true, Ordering::Release);
    });
    Ok(Sender { requests, closed })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that runs out of time while the connection is still being made reports the
    /// peer unreachable (nothing was sent, so it may go elsewhere), on time.
    #[tokio::test]
    async fn a_call_timing_out_while_connecting_was_not_delivered() {
        // A listener whose accept queue is full drops the next SYN: that connect hangs.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(c)) =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
            {
                queued.push(c);
            }
        }
        let peers = Peers::new(None).unwrap();
        let started = std::time::Instant::now();
        let err = peers
            .call(
                &addr.to_string(),
                Rpc::Hello,
                b"{}".to_vec(),
                Duration::from_millis(100),
            )
            .await
            .unwrap_err();
        assert!(err.not_delivered(), "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        drop(listener);
    }

    /// A gRPC peer that answers each message of a stream with the same message, after 300 ms
    /// for `slow`, and ends the stream with Unavailable at `end`; it counts the streams. An
    /// `old` peer has no AppendStream method (tonic's trailers-only Unimplemented).
    async fn echo_peer(old: bool) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = streams.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        counted.fetch_add(1, Ordering::SeqCst);
                        if old && req.uri().path().ends_with("/AppendStream") {
                            let head = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "12")
                                .body(())
                                .unwrap();
                            let _ = respond.send_response(head, true);
                            continue;
                        }
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            let head = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap();
                            let mut send = respond.send_response(head, false).unwrap();
                            let mut buf = BytesMut::new();
                            while let Some(Ok(chunk)) = body.data().await {
                                let _ = body.flow_control().release_capacity(chunk.len());
                                buf.extend_from_slice(&chunk);
                                while let Ok(Some(msg)) = take_message(&mut buf) {
                                    if msg == b"end" {
                                        let mut t = http::HeaderMap::new();
                                        t.insert("grpc-status", "14".parse().unwrap());
                                        t.insert("grpc-message", "going%20away".parse().unwrap());
                                        let _ = send.send_trailers(t);
                                        return;
                                    }
                                    if msg == b"slow" {
                                        tokio::time::sleep(Duration::from_millis(300)).await;
                                    }
                                    let framed = grpc_frame(&msg).ok().unwrap();
                                    let _ = send.send_data(framed, false);
                                }
                            }
                        });
                    }
                });
            }
        });
        (addr, streams)
    }

    /// Calls share one stream; one that fails (the peer ended the stream, no answer in time,
    /// or the call was dropped) drops it, and the next call opens another, so a late answer is
    /// never taken for the next call's.
    #[tokio::test]
    async fn the_append_stream_answers_in_order_and_reopens_after_a_failure() {
        let (addr, streams) = echo_peer(false).await;
        let peers = Peers::new(None).unwrap();
        let mut stream = AppendStream::new(&addr);
        let wait = Duration::from_secs(5);
        for m in ["one", "two", "three"] {
            let answer = stream.call(&peers, m.as_bytes(), wait).await.unwrap();
            assert_eq!(answer, m.as_bytes());
        }
        assert_eq!(
            streams.load(Ordering::SeqCst),
            1,
            "one stream for every call"
        );

        let err = stream.call(&peers, b"end", wait).await.unwrap_err();
        assert!(
            matches!(&err, CallError::Status { code: tonic::Code::Unavailable, message, .. } if message == "going away"),
            "{err}"
        );
        assert_eq!(stream.call(&peers, b"four", wait).await.unwrap(), b"four");
        assert_eq!(streams.load(Ordering::SeqCst), 2);

        let short = Duration::from_millis(100);
        let err = stream.call(&peers, b"slow", short).await.unwrap_err();
        assert!(
            matches!(
                &err,
                CallError::Status {
                    code: tonic::Code::Cancelled,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.not_delivered(), "it may have been delivered: {err}");
        assert_eq!(stream.call(&peers, b"five", wait).await.unwrap(), b"five");
        assert_eq!(streams.load(Ordering::SeqCst), 3);

        // A call dropped before its answer (openraft's own timeout) takes its stream along.
        let dropped = tokio::time::timeout(short, stream.call(&peers, b"slow", wait));
        assert!(dropped.await.is_err());
        let six = stream.call(&peers, b"six", wait).await.unwrap();
        assert_eq!(six, b"six");
        assert_eq!(streams.load(Ordering::SeqCst), 4);
    }

    /// A peer of an older version answers Unimplemented, which the raft network takes as its
    /// cue to send AppendEntries unary (see `network::Peer`).
    #[tokio::test]
    async fn a_peer_without_the_append_stream_answers_unimplemented() {
        let (addr, _) = echo_peer(true).await;
        let peers = Peers::new(None).unwrap();
        let mut stream = AppendStream::new(&addr);
        let err = stream
            .call(&peers, b"one", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                CallError::Status {
                    code: tonic::Code::Unimplemented,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(
            percent_decode(b"no%20leader%3A%20retry"),
            "no leader: retry"
        );
        assert_eq!(percent_decode(b"100%"), "100%");
        assert_eq!(percent_decode(b"%zz%C3%A9"), "%zz\u{e9}");
    }
}
