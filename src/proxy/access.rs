//! The request path's side of access logs (`telemetry::access_log` formats and writes): what
//! a request leaves when it arrives (time, protocol, the headers the format reads), what the
//! proxy did with it ([`Served`]), and a response body that writes the line when it ends, since
//! only then are the bytes sent and the duration known. A client that goes away ends it too.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::{Buf, Bytes};
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;

use super::upstream::{Body, BoxError, UpstreamError};
use super::{local_reply, stats};
use crate::telemetry::access_log::{AccessLogFormat, AccessLogWriter, Entry, ResponseFlag};

/// A config's access log: its format and the writer of its file.
pub struct AccessLogger {
    pub format: AccessLogFormat,
    pub writer: Arc<AccessLogWriter>,
}

/// The connection a request came on, attached to requests while access logs are on (at the
/// time the connection arrived) for `%DOWNSTREAM_*%` and `%REQUESTED_SERVER_NAME%`.
#[derive(Debug, Clone)]
pub struct Downstream {
    pub remote: SocketAddr,
    pub local: Option<SocketAddr>,
    /// The TLS SNI, on TLS connections.
    pub server_name: Option<String>,
}

impl Downstream {
    /// Attaches the connection to `req` when there is one to attach.
    pub fn attach<B>(this: &Option<Downstream>, req: &mut Request<B>) {
        if let Some(d) = this {
            req.extensions_mut().insert(d.clone());
        }
    }
}

/// What the proxy did with a request, for its line. Names are borrowed from the routing in
/// force: recording them costs nothing on requests that are not logged.
#[derive(Debug, Default)]
pub struct Served<'a> {
    pub route: Cow<'a, str>,
    /// The target (`virtualNode:port`) or the local app.
    pub cluster: Cow<'a, str>,
    /// The host of the last attempt.
    pub upstream: Option<SocketAddr>,
    pub attempts: u32,
    pub flag: Option<ResponseFlag>,
}

impl Served<'_> {
    /// Records why a request failed, unless a more precise reason is already known.
    pub fn failed(&mut self, e: &UpstreamError) {
        self.flag.get_or_insert(e.flag());
    }
}

impl UpstreamError {
    /// Envoy's response flag for this failure.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            Self::NoRoute => ResponseFlag::NoRoute,
            Self::NoEndpoint(_) => ResponseFlag::NoHealthyUpstream,
            Self::Connect { .. } | Self::Refused { .. } => ResponseFlag::UpstreamConnectionFailure,
            Self::Reset { .. } => ResponseFlag::UpstreamConnectionTermination,
            Self::Timeout(_) => ResponseFlag::UpstreamRequestTimeout,
            Self::Overloaded(_) => ResponseFlag::UpstreamOverflow,
            Self::Forbidden(_) => ResponseFlag::Denied,
            Self::BadRequest(_) => ResponseFlag::DownstreamProtocolError,
        }
    }
}

/// `resp`, an answer the proxy made before any port's log applied (no gateway route, a
/// destination the egress filter refuses), with its line in the spec's own log when it has
/// one: the request as it came, and `flag` for why.
pub fn answered_here<B>(
    log: Option<&Arc<AccessLogger>>,
    req: &Request<B>,
    resp: Response<Body>,
    flag: ResponseFlag,
) -> Response<Body> {
    match log {
        Some(l) => l.begin(req).finish(
            resp,
            Served {
                flag: Some(flag),
                ..Served::default()
            },
        ),
        None => resp,
    }
}

/// A request being served, with its line half written. The line is written once: when the
/// response body ends, or when this is dropped (a caller that went away: `DC`).
pub struct Pending {
    logger: Arc<AccessLogger>,
    entry: Option<Entry>,
    started: Instant,
    received: Counter,
    sent: u64,
}

impl AccessLogger {
    /// Starts the line of `req`: its time, protocol and the headers the format reads.
    pub fn begin<B>(self: &Arc<Self>, req: &Request<B>) -> Pending {
        let value = |h: &str| -> Option<String> {
            match h {
                ":method" => Some(req.method().to_string()),
                ":path" => req.uri().path_and_query().map(|p| p.to_string()),
                ":authority" => req
                    .uri()
                    .authority()
                    .map(|a| a.to_string())
                    .or_else(|| header(req.headers(), "host")),
                ":scheme" => Some(req.uri().scheme_str().unwrap_or("http").to_string()),
                h => header(req.headers(), h),
            }
        };
        let request_headers = self
            .format
            .request_headers()
            .iter()
            .map(|h| value(h))
            .collect();
        let received = Counter::default();
        if let Some(n) = req.body_size_hint_exact() {
            received.inc_by(n);
        }
        let downstream = req.extensions().get::<Downstream>();
        Pending {
            entry: Some(Entry {
                start: SystemTime::now(),
                protocol: protocol(req.version()),
                request_headers,
                response_headers: Vec::new(),
                status: 0,
                flag: None,
                details: String::new(),
                bytes_received: 0,
                bytes_sent: 0,
                duration: std::time::Duration::ZERO,
                response_duration: None,
                upstream_host: None,
                upstream_cluster: String::new(),
                attempts: 0,
                route: String::new(),
                downstream_remote: downstream.map(|d| d.remote),
                downstream_local: downstream.and_then(|d| d.local),
                server_name: downstream.and_then(|d| d.server_name.clone()),
                grpc: local_reply::is_grpc(req.headers()),
                grpc_status: None,
            }),
            logger: self.clone(),
            started: Instant::now(),
            received,
            sent: 0,
        }
    }
}

/// The exact size of a request body, when its head says.
trait ExactSize {
    fn body_size_hint_exact(&self) -> Option<u64>;
}

impl<B> ExactSize for Request<B> {
    fn body_size_hint_exact(&self) -> Option<u64> {
        self.headers()
            .get(http::header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }
}

fn header(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

impl Pending {
    /// The request body, counted for `%BYTES_RECEIVED%` when its length was not declared.
    pub fn request_body(&self, body: Body) -> Body {
        if body.size_hint().exact().is_some() {
            body
        } else {
            stats::count_body(body, Some(&self.received))
        }
    }

    /// Adds the answer and what the proxy did; the line is written when the response body
    /// ends.
    pub fn finish(mut self, resp: Response<Body>, served: Served<'_>) -> Response<Body> {
        if let Some(e) = &mut self.entry {
            e.status = resp.status().as_u16();
            if e.grpc {
                e.grpc_status = local_reply::grpc_status(resp.headers());
            }
            e.response_headers = self
                .logger
                .format
                .response_headers()
                .iter()
                .map(|h| header(resp.headers(), h))
                .collect();
            e.response_duration = Some(self.started.elapsed());
            e.flag = served.flag;
            e.upstream_host = served.upstream;
            e.upstream_cluster = served.cluster.into_owned();
            e.attempts = served.attempts;
            e.route = served.route.into_owned();
        }
        resp.map(|body| {
            LoggedBody {
                inner: body,
                pending: self,
            }
            .boxed()
        })
    }

    fn write(&mut self) {
        let Some(mut e) = self.entry.take() else {
            return;
        };
        e.bytes_sent = self.sent;
        e.bytes_received = self.received.get();
        e.duration = self.started.elapsed();
        let line = self.logger.format.render(&e);
        self.logger.writer.log(line);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(e) = &mut self.entry
            && e.status == 0
        {
            e.flag
                .get_or_insert(ResponseFlag::DownstreamConnectionTermination);
        }
        self.write();
    }
}

struct LoggedBody {
    inner: Body,
    pending: Pending,
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.pending.sent += d.remaining() as u64;
                } else if let Some(t) = frame.trailers_ref()
                    && let Some(e) = &mut this.pending.entry
                    && e.grpc
                {
                    // A gRPC answer's status is in its trailers, unless it had no body.
                    e.grpc_status = local_reply::grpc_status(t).or(e.grpc_status);
                }
                if this.inner.is_end_stream() {
                    this.pending.write();
                }
            }
            Poll::Ready(None) => this.pending.write(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(e) = &mut this.pending.entry {
                    e.details = "upstream_reset_after_response_started".into();
                }
                this.pending.write();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // Not read to its end: the caller went away (an empty body has nothing to read).
        if !self.inner.is_end_stream()
            && let Some(e) = &mut self.pending.entry
        {
            e.details = "downstream_remote_disconnect".into();
        }
    }
}
