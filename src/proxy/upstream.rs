//! Sending a request on: to a peer proxy's inbound listener (pooled HTTP/2, so many requests
//! share a few connections) or to the local app (HTTP/1.1 or h2c, as its listener's protocol
//! says), over the shard's pools (see `pool`). Peer connections are mTLS when the target's
//! profile asks (see `tls`). Hop-by-hop headers never cross a hop; the answer streams back as
//! it arrives.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::local_reply::LocalReply;
use super::pool::{Connect, H1Pool, H2Pool, SendError};
use super::stats::tls_failure_reason;
use super::tls::{ALPN_H1, ALPN_H2, PeerIdentity, PeerTls};
use crate::telemetry::proxy::{Direction, ProxyMetrics};

/// The body every hop carries. Its error is boxed: hops add errors of their own (an idle
/// timeout) that are not hyper's.
pub type Body = BoxBody<Bytes, BoxError>;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Any body as a hop's [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// A request body as it arrived, as a hop's [`Body`]. Not generic: inside the request path's
/// futures, `boxed`'s `Into<BoxError>` bound trips rustc's higher-ranked Send check.
pub fn incoming(body: hyper::body::Incoming) -> Body {
    body.map_err(|e| -> BoxError { Box::new(e) }).boxed()
}

/// The header that tells a peer's inbound listener which of its app's ports a request is for.
/// A `HeaderName`, not a `&str`: a string name is parsed and checked on every use.
pub const TARGET_PORT: HeaderName = HeaderName::from_static("x-trellis-target-port");

/// Where a failure came from, with the status the caller gets (Envoy's choices) and whether
/// the request may be sent again.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no route matches")]
    NoRoute,
    #[error("no healthy endpoint for {0}")]
    NoEndpoint(String),
    /// No connection could be made (App Mesh's connection-error); nothing was sent.
    #[error("upstream connect error {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    /// The peer refused the stream before processing it (stream-error); nothing was processed.
    #[error("upstream {addr} refused the stream: {message}")]
    Refused { addr: SocketAddr, message: String },
    /// The connection or stream broke after the request went out.
    #[error("upstream {addr} reset before the response: {message}")]
    Reset { addr: SocketAddr, message: String },
    #[error("upstream request timeout ({0} ms)")]
    Timeout(u64),
    /// A connection pool limit of the listener is reached.
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::NoEndpoint(_)
            | Self::Connect { .. }
            | Self::Refused { .. }
            | Self::Reset { .. }
            | Self::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// A plain-text answer saying what failed, marked as the proxy's own (see `local_reply`:
    /// a gRPC caller gets it as gRPC).
    pub fn response(&self) -> Response<Body> {
        let text = Bytes::from(format!("trellis: {self}\n"));
        let mut r = Response::new(full(text.clone()));
        *r.status_mut() = self.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        r.extensions_mut().insert(LocalReply(text));
        r
    }
}

/// An empty body (no allocation: the box holds nothing).
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

pub fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Connection pools (see `pool`): HTTP/2 to peers (a connection per peer and TLS profile,
/// since the profile decides whom a connection may be to), h2c or HTTP/1.1 to the local app.
pub struct Upstreams {
    identity: Arc<PeerIdentity>,
    metrics: Arc<ProxyMetrics>,
    peers: H2Pool<Option<Arc<PeerTls>>>,
    app_h2: H2Pool<()>,
    app_h1: Arc<H1Pool>,
}

/// How long a new connection (TCP) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP without Nagle, within [`CONNECT_TIMEOUT`].
async fn tcp_connect(addr: SocketAddr) -> Result<TcpStream, BoxError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect timed out after {CONNECT_TIMEOUT:?}"))??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

impl Upstreams {
    pub fn new(identity: Arc<PeerIdentity>, metrics: Arc<ProxyMetrics>) -> Self {
        Self {
            identity,
            metrics,
            peers: H2Pool::default(),
            app_h2: H2Pool::default(),
            app_h1: Arc::default(),
        }
    }

    pub fn identity(&self) -> &Arc<PeerIdentity> {
        &self.identity
    }

    fn peer_connect<'a>(
        &'a self,
        addr: SocketAddr,
        tls: Option<&'a Arc<PeerTls>>,
        alpn: &'static [u8],
    ) -> PeerConnect<'a> {
        PeerConnect {
            addr,
            tls,
            alpn,
            identity: &self.identity,
            metrics: &self.metrics,
        }
    }

    /// A connection of its own to a peer's inbound listener, for HTTP/1.1 (upgrades and
    /// tunnels).
    pub async fn connect_peer(
        &self,
        addr: SocketAddr,
        tls: Option<&Arc<PeerTls>>,
    ) -> Result<TokioIo<PeerStream>, UpstreamError> {
        self.peer_connect(addr, tls, ALPN_H1)
            .connect()
            .await
            .map(TokioIo::new)
            .map_err(|e| UpstreamError::Connect {
                addr,
                message: error_chain(e.as_ref()),
            })
    }
}

/// TCP to a peer, then TLS when the profile asks for it.
struct PeerConnect<'a> {
    addr: SocketAddr,
    tls: Option<&'a Arc<PeerTls>>,
    alpn: &'static [u8],
    identity: &'a Arc<PeerIdentity>,
    /// Where failed handshakes are counted.
    metrics: &'a ProxyMetrics,
}

impl Connect for PeerConnect<'_> {
    type Io = PeerStream;

    async fn connect(&self) -> Result<Self::Io, BoxError> {
        let tcp = tcp_connect(self.addr).await?;
        let Some(peer) = self.tls else {
            return Ok(PeerStream::Plain(tcp));
        };
        let config = self.identity.client_config(peer, self.alpn)?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(self.addr.ip().into()), tcp)
            .await
            .inspect_err(|e| {
                self.metrics
                    .tls_handshake_failed(Direction::Outbound, tls_failure_reason(e))
            })?;
        Ok(PeerStream::Tls(Box::new(stream)))
    }
}

/// Plain TCP to the local app.
struct AppConnect(SocketAddr);

impl Connect for AppConnect {
    type Io = TcpStream;

    async fn connect(&self) -> Result<Self::Io, BoxError> {
        tcp_connect(self.0).await
    }
}

/// A connection to a peer proxy.
pub enum PeerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1); `te` too,
/// though `te: trailers` is put back.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `te`'s place in [`HOP_BY_HOP`]: `te: trailers` is put back.
const TE_INDEX: usize = 5;

/// Where a name is in [`HOP_BY_HOP`]. Matched as a string: a match on a name's length and
/// bytes costs less than comparing it with each `HeaderName`, and it runs on every header of
/// every request and response, both ways.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => TE_INDEX,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// Removes hop-by-hop headers; `te: trailers` stays (gRPC needs it end to end).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the message's few names notes which fixed ones are there; only those are
    // removed (a hashed removal each). Most messages carry none, or only an HTTP/1.1
    // `Connection: keep-alive`.
    let present = headers
        .keys()
        .filter_map(|n| hop_by_hop_index(n.as_str()))
        .fold(0u16, |mask, i| mask | (1 << i));
    if present == 0 {
        return;
    }
    let trailers = present & (1 << TE_INDEX) != 0
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Headers named in Connection are hop-by-hop too; a token such as `keep-alive` that is
    // already one of the fixed names needs no name of its own (so the usual list is empty,
    // and allocates nothing).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| hop_by_hop_index(t).is_none())
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// The next hop of a request.
#[derive(Debug, Clone)]
pub enum Hop {
    /// A peer proxy's inbound listener: HTTP/2 (over mTLS with a profile), the Host header
    /// kept for the app behind it (our own inbound reads it; `:authority` names the peer).
    Peer {
        addr: SocketAddr,
        tls: Option<Arc<PeerTls>>,
    },
    /// The local app, over HTTP/2 (h2c) or HTTP/1.1.
    App { addr: SocketAddr, h2: bool },
}

impl Upstreams {
    /// Sends `req` to the hop, keeping its path and query.
    pub async fn send(
        &self,
        hop: Hop,
        req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let (addr, h2) = match &hop {
            Hop::Peer { addr, .. } => (*addr, true),
            Hop::App { addr, h2 } => (*addr, *h2),
        };
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if h2 {
            // HTTP/2 carries scheme and authority as pseudo-headers, taken from the URI. To
            // the app a Host header must agree with :authority or go; a peer reads it for
            // routing and the log.
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = Some(authority(addr)?);
            if uri.path_and_query.is_none() {
                uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            parts.uri =
                Uri::from_parts(uri).map_err(|e| UpstreamError::BadRequest(e.to_string()))?;
            parts.version = http::Version::HTTP_2;
            if matches!(hop, Hop::App { .. }) {
                parts.headers.remove(header::HOST);
            }
        } else {
            // Origin-form; the Host the client sent stays (the app's virtual hosts).
            let path = parts.uri.path_and_query().cloned();
            parts.uri =
                Uri::from(path.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
            parts.version = http::Version::HTTP_11;
            if !parts.headers.contains_key(header::HOST) {
                let host = http::HeaderValue::try_from(addr.to_string())
                    .map_err(|e| UpstreamError::BadRequest(e.to_string()))?;
                parts.headers.insert(header::HOST, host);
            }
        }
        let req = Request::from_parts(parts, body);
        let resp = match &hop {
            Hop::Peer { tls, .. } => {
                let connect = self.peer_connect(addr, tls.as_ref(), ALPN_H2);
                self.peers
                    .send(addr, tls, &connect, req)
                    .await
                    .map(|r| r.map(boxed))
            }
            Hop::App { .. } if h2 => self
                .app_h2
                .send(addr, &(), &AppConnect(addr), req)
                .await
                .map(|r| r.map(boxed)),
            Hop::App { .. } => self
                .app_h1
                .send(addr, &AppConnect(addr), req)
                .await
                .map(|r| r.map(boxed)),
        }
        .map_err(|e| classify(addr, e))?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

/// `addr` as a URI authority. Kept per thread: formatting and parsing the address cost about
/// 4 % of the client proxy's instructions per request, more than all the hop's header work.
fn authority(addr: SocketAddr) -> Result<http::uri::Authority, UpstreamError> {
    use std::cell::RefCell;
    /// Peers come and go with config; past this many the cache starts again.
    const MAX: usize = 4096;
    thread_local! {
        static AUTHORITIES: RefCell<super::RequestMap<SocketAddr, http::uri::Authority>> =
            RefCell::default();
    }
    AUTHORITIES.with(|cache| {
        if let Some(a) = cache.borrow().get(&addr) {
            return Ok(a.clone());
        }
        let a = http::uri::Authority::try_from(addr.to_string())
            .map_err(|e| UpstreamError::BadRequest(format!("authority {addr}: {e}")))?;
        let mut cache = cache.borrow_mut();
        if cache.len() >= MAX {
            cache.clear();
        }
        cache.insert(addr, a.clone());
        Ok(a)
    })
}

fn classify(addr: SocketAddr, e: SendError) -> UpstreamError {
    match e {
        SendError::Connect(e) => UpstreamError::Connect {
            addr,
            message: error_chain(e.as_ref()),
        },
        SendError::Refused(e) => UpstreamError::Refused {
            addr,
            message: error_chain(e.as_ref()),
        },
        SendError::Request(e) => UpstreamError::Reset {
            addr,
            message: error_chain(e.as_ref()),
        },
    }
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_static(n),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    /// RFC 9110 §7.6.1: the fixed hop-by-hop names and those a Connection header lists go;
    /// end-to-end headers, and `te: trailers` (gRPC), stay.
    #[test]
    fn hop_by_hop_headers_are_stripped_and_end_to_end_ones_kept() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("trailer", "grpc-status"),
            ("te", "trailers"),
            ("x-private", "hop"),
            ("x-request-id", "abc"),
            ("content-type", "application/grpc"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "content-type: application/grpc",
                "te: trailers",
                "x-request-id: abc"
            ]
        );

        // `close` names a header too (a reserved name, but the rule is every name listed).
        let mut h = headers(&[("connection", "Close"), ("close", "x"), ("x-keep", "y")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-keep"]);

        // The usual response from an app: `Connection: keep-alive` and nothing else hop-by-hop.
        let mut h = headers(&[("connection", "keep-alive"), ("content-length", "5")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["content-length"]);
        // Connection alone again, but naming a header that is there.
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("x-private", "hop"),
            ("x-keep", "y"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-keep"]);

        let mut te = headers(&[("te", "gzip"), ("host", "a")]);
        strip_hop_by_hop(&mut te);
        assert_eq!(te.len(), 1);
        assert!(te.contains_key(header::HOST));

        let plain = headers(&[("host", "a"), ("accept", "*/*"), ("x-keep-alive", "1")]);
        let mut h = plain.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, plain);
    }
}
