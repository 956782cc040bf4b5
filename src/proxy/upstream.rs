//! Sending a request on: to a peer proxy's inbound listener (pooled HTTP/2, so many requests
//! share a few connections) or to the local app (HTTP/1.1 or h2c, as its listener's protocol
//! says). Hop-by-hop headers never cross a hop; the answer streams back as it arrives.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The body every hop carries.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The header that tells a peer's inbound listener which of its app's ports a request is for.
pub const TARGET_PORT: &str = "x-trellis-target-port";

/// Where a failure came from, with the status the caller gets (Envoy's choices).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no route matches")]
    NoRoute,
    #[error("no healthy endpoint for {0}")]
    NoEndpoint(String),
    #[error("upstream {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::NoEndpoint(_) | Self::Connect { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// A plain-text answer saying what failed.
    pub fn response(&self) -> Response<Body> {
        let mut r = Response::new(full(format!("trellis: {self}\n")));
        *r.status_mut() = self.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        r
    }
}

pub fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Connection pools: HTTP/2 to peers and h2c apps, HTTP/1.1 to HTTP/1 apps.
#[derive(Clone)]
pub struct Upstreams {
    h2: Client<HttpConnector, Incoming>,
    h1: Client<HttpConnector, Incoming>,
}

impl Default for Upstreams {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        Self {
            h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector.clone()),
            h1: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// The next hop of a request.
#[derive(Debug, Clone, Copy)]
pub enum Hop {
    /// A peer proxy's inbound listener: HTTP/2, the Host header kept for the app behind it
    /// (our own inbound reads it; `:authority` names the peer).
    Peer(SocketAddr),
    /// The local app, over HTTP/2 (h2c) or HTTP/1.1.
    App { addr: SocketAddr, h2: bool },
}

impl Upstreams {
    /// Sends `req` to the hop, keeping its path and query.
    pub async fn send(
        &self,
        hop: Hop,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, UpstreamError> {
        let (addr, h2, keep_host) = match hop {
            Hop::Peer(addr) => (addr, true, true),
            Hop::App { addr, h2 } => (addr, h2, !h2),
        };
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = format!("http://{addr}{path}")
            .parse()
            .map_err(|_| UpstreamError::BadRequest(format!("request target {path:?}")))?;
        strip_hop_by_hop(&mut parts.headers);
        // The HTTP version is the client's business per hop.
        parts.version = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        if !keep_host {
            // HTTP/2 carries the authority in :authority; a Host header must agree or go.
            parts.headers.remove(header::HOST);
        }
        let client = if h2 { &self.h2 } else { &self.h1 };
        let resp = client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|e| UpstreamError::Connect {
                addr,
                message: error_chain(&e),
            })?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
