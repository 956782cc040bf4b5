//! HTTP/1.1 to the local app, on a codec of our own. A request's head goes out in one write
//! together with the body bytes already there; the response head is parsed by httparse into
//! the `http` types, its header values slices of the one buffer it was read into; both bodies
//! then stream on the connection at once, driven by the request and then by its response body
//! (no task per connection, see `pool`). A response whose framing is unclear (two lengths, a
//! bad chunk, a head past [`MAX_HEAD_BYTES`]) fails its request and closes the connection: the app
//! is local, but a proxy believes no server's framing blindly (RFC 9112 §6.3).
//!
//! Why not hyper's client connection: per request it crossed a channel from its handle to the
//! connection and another from the connection to the body, and its dispatcher and parser
//! were 28 % of the app proxy's instructions per request.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version, request, response};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::guard::MAX_HEAD_BYTES;
pub use super::h1chunk::ChunkDecoder;
use super::upstream::{Body, BoxError};

/// The most header fields in a response head, or in a chunked body's trailers.
pub(super) const MAX_HEADERS: usize = 128;
/// How long the rest of a request body may take once its response has ended.
const FINISH_REQUEST_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);
/// How much is read at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Request bytes queued for the connection before the request body is read further: a slow
/// app slows the caller instead of filling memory.
const MAX_QUEUED: usize = 64 * 1024;

/// Why an exchange with the app failed. The connection is closed after any of these.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("HTTP/1.1 connection")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection before {0}")]
    Closed(&'static str),
    #[error("invalid HTTP/1.1 response: {0}")]
    Invalid(String),
    #[error("the request body failed")]
    RequestBody(#[source] BoxError),
    #[error("the request body is {0} than its Content-Length")]
    RequestLength(&'static str),
    #[error("the request's Content-Length is not a number")]
    RequestContentLength,
}

pub(super) fn invalid(what: impl std::fmt::Display) -> H1Error {
    H1Error::Invalid(what.to_string())
}

/// A connection to the app, with the bytes read from it and not yet used (between exchanges
/// there are none).
pub struct H1Conn {
    io: TcpStream,
    read: BytesMut,
}

impl H1Conn {
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            read: BytesMut::new(),
        }
    }

    /// Whether a free connection can take a request: the app has neither closed it nor sent
    /// anything unasked. Costs no syscall while the socket is known not to be readable.
    pub fn is_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Reads more into `read`; `Ok(0)` at the app's end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
            self.read.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }
}

/// How a request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RequestFraming {
    /// Content-Length: this many bytes are still to come.
    Length(u64),
    Chunked,
}

/// How the response body is framed, and how far it has come.
#[derive(Debug)]
pub enum ResponseFraming {
    /// Content-Length: this many bytes are still to come.
    Length(u64),
    Chunked(ChunkDecoder),
    /// Until the app closes the connection.
    UntilClose,
    Ended,
}

/// Why a request failed, and whether it may go again on another connection.
pub struct Failure {
    pub error: H1Error,
    /// The request body, when it was never read (so the request can be sent again).
    pub body: Option<Body>,
    /// Whether the request, sent on a kept connection, may go again on a new one: no byte
    /// of it was written and its body was never read (a body with bytes ready is read before
    /// the first write, so in practice a request without one); or it is a GET, HEAD or
    /// OPTIONS without a body and no byte of any response came. Either way the app closed
    /// the connection as the request went out (its idle timeout): the rule of Go's
    /// `net/http` Transport. (The pool never retries on a new connection.)
    pub retry_on_new: bool,
}

/// One request and its response on a connection; the response body reads from it.
pub struct Exchange {
    conn: H1Conn,
    /// Request bytes not yet written, in order.
    queued: VecDeque<Bytes>,
    queued_len: usize,
    /// The request body until it has ended.
    body: Option<Body>,
    /// A request body known to be empty: never read, kept to hand back for a retry.
    empty_body: Option<Body>,
    body_read: bool,
    framing: RequestFraming,
    response: ResponseFraming,
    /// Whether the connection may carry another request once both messages are complete.
    keep_alive: bool,
    wrote: bool,
    /// Why writing the request stopped early, if it did.
    write_error: Option<std::io::Error>,
    /// Whether any byte of a response has come (an informational one too).
    answered: bool,
    /// Whether the rest of the request body is still wanted once the response has ended:
    /// not after an error status, nor when the connection closes.
    finish_request: bool,
}

/// Sends a request on `conn` and reads its response head. The request's parts are borrowed,
/// so a caller can send them again after a [`Failure`] that allows it.
pub async fn send(
    conn: H1Conn,
    parts: &request::Parts,
    body: Body,
) -> Result<(response::Parts, Exchange), Failure> {
    let mut exchange = match Exchange::start(conn, parts, body) {
        Ok(e) => e,
        Err((error, body)) => {
            return Err(Failure {
                error,
                body: Some(body),
                retry_on_new: false,
            });
        }
    };
    let head =
        std::future::poll_fn(|cx| exchange.poll_head(cx, parts.method == Method::HEAD)).await;
    match head {
        Ok(head) => Ok((head, exchange)),
        Err(error) => {
            let replayable = !exchange.answered
                && !exchange.body_read
                && matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS)
                && matches!(error, H1Error::Closed(_) | H1Error::Io(_));
            let retry_on_new = !exchange.wrote || replayable;
            let body = match exchange.empty_body.take() {
                Some(empty) => Some(empty),
                None if !exchange.body_read => exchange.body.take(),
                None => None,
            };
            Err(Failure {
                error,
                body,
                retry_on_new,
            })
        }
    }
}

impl Exchange {
    /// Queues the request head; the body's framing is its Content-Length when the request
    /// has one or its length is known, else chunked.
    fn start(conn: H1Conn, parts: &request::Parts, body: Body) -> Result<Self, (H1Error, Body)> {
        let empty = body.is_end_stream() || body.size_hint().exact() == Some(0);
        let declared = match parts.headers.get(header::CONTENT_LENGTH) {
            Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(n) => Some(n),
                None => return Err((H1Error::RequestContentLength, body)),
            },
            None => None,
        };
        let (framing, framing_header): (_, Option<Bytes>) = match declared {
            Some(n) => (RequestFraming::Length(n), None),
            None if empty => {
                // A POST or PUT says it has no body: some servers answer 411 otherwise.
                let says = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
                (
                    RequestFraming::Length(0),
                    says.then(|| Bytes::from_static(b"content-length: 0\r\n")),
                )
            }
            None => match body.size_hint().exact() {
                Some(n) => (
                    RequestFraming::Length(n),
                    Some(Bytes::from(format!("content-length: {n}\r\n"))),
                ),
                None => (
                    RequestFraming::Chunked,
                    Some(Bytes::from_static(b"transfer-encoding: chunked\r\n")),
                ),
            },
        };
        let (body, empty_body) = if empty && declared.is_none_or(|n| n == 0) {
            (None, Some(body))
        } else {
            (Some(body), None)
        };
        let head = encode_head(parts, framing_header.as_deref());
        let mut queued = VecDeque::with_capacity(4);
        let queued_len = head.len();
        queued.push_back(head);
        Ok(Self {
            conn,
            queued,
            queued_len,
            body,
            empty_body,
            body_read: false,
            framing,
            response: ResponseFraming::Ended,
            keep_alive: true,
            wrote: false,
            write_error: None,
            answered: false,
            finish_request: false,
        })
    }

    /// Writes the request while its body has bytes ready; `Ready(Ok)` once all of it is
    /// written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        loop {
            while self.queued_len < MAX_QUEUED
                && let Some(body) = self.body.as_mut()
            {
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        self.body_read = true;
                        self.queue_frame(frame)?;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        self.body_read = true;
                        return Poll::Ready(Err(H1Error::RequestBody(e)));
                    }
                    Poll::Ready(None) => {
                        self.body = None;
                        self.queue_end()?;
                    }
                    Poll::Pending => break,
                }
            }
            if self.queued.is_empty() {
                return match self.body {
                    None => Poll::Ready(Ok(())),
                    Some(_) => Poll::Pending,
                };
            }
            let mut slices = [IoSlice::new(&[]); 8];
            let n = self.queued.len().min(slices.len());
            for (slice, bytes) in slices.iter_mut().zip(&self.queued) {
                *slice = IoSlice::new(bytes);
            }
            let written =
                ready!(Pin::new(&mut self.conn.io).poll_write_vectored(cx, &slices[..n]))?;
            if written == 0 {
                return Poll::Ready(Err(
                    std::io::Error::from(std::io::ErrorKind::WriteZero).into()
                ));
            }
            self.wrote = true;
            self.queued_len -= written;
            let mut left = written;
            while left > 0 {
                let Some(front) = self.queued.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    self.queued.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
    }

    fn queue(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.queued_len += bytes.len();
            self.queued.push_back(bytes);
        }
    }

    fn queue_frame(&mut self, frame: Frame<Bytes>) -> Result<(), H1Error> {
        let frame = match frame.into_data() {
            Ok(data) if data.is_empty() => return Ok(()),
            Ok(data) => {
                match &mut self.framing {
                    RequestFraming::Length(left) => {
                        let len = data.len() as u64;
                        if len > *left {
                            return Err(H1Error::RequestLength("longer"));
                        }
                        *left -= len;
                        self.queue(data);
                    }
                    RequestFraming::Chunked => {
                        self.queue(Bytes::from(format!("{:x}\r\n", data.len())));
                        self.queue(data);
                        self.queue(Bytes::from_static(b"\r\n"));
                    }
                }
                return Ok(());
            }
            Err(frame) => frame,
        };
        // Trailers end the body. They are not passed on, as hyper's client did not: an app
        // may merge them into the headers, and a caller could smuggle fields (a Host, a
        // Content-Length) that way.
        if frame.is_trailers() {
            self.body = None;
            self.queue_end()?;
        }
        Ok(())
    }

    /// The request body has ended.
    fn queue_end(&mut self) -> Result<(), H1Error> {
        match self.framing {
            RequestFraming::Length(0) => Ok(()),
            RequestFraming::Length(_) => Err(H1Error::RequestLength("shorter")),
            RequestFraming::Chunked => {
                self.queue(Bytes::from_static(b"0\r\n\r\n"));
                Ok(())
            }
        }
    }

    /// Writes the request while reading until a final response head has come (informational
    /// ones are passed over, as hyper does).
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<response::Parts, H1Error>> {
        self.drive_write(cx)?;
        loop {
            if let Some((head, framing, keep_alive)) =
                parse_head(&mut self.conn.read, head_request)?
            {
                self.response = framing;
                self.keep_alive &= keep_alive;
                self.finish_request = head.status.as_u16() < 400;
                return Poll::Ready(Ok(head));
            }
            if self.conn.read.len() > MAX_HEAD_BYTES {
                return Poll::Ready(Err(invalid(format!(
                    "its head is larger than {MAX_HEAD_BYTES} bytes"
                ))));
            }
            if ready!(self.conn.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(match self.write_error.take() {
                    Some(e) => H1Error::Io(e),
                    None => H1Error::Closed("the response"),
                }));
            }
            self.answered = true;
        }
    }

    /// Writes what it can of the request. A connection that the app stopped reading (it
    /// answered early, say a 413, and closed) ends the writing but not the reading: its
    /// answer may be waiting there.
    fn drive_write(&mut self, cx: &mut Context<'_>) -> Result<(), H1Error> {
        if self.body.is_none() && self.queued.is_empty() {
            return Ok(());
        }
        match self.poll_write(cx) {
            Poll::Ready(Err(H1Error::Io(e))) => {
                self.body = None;
                self.queued.clear();
                self.queued_len = 0;
                self.keep_alive = false;
                self.write_error = Some(e);
                Ok(())
            }
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// The response body's next frame; what is left of the request is written meanwhile.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        if let Err(e) = self.drive_write(cx) {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            let read = &mut self.conn.read;
            match &mut self.response {
                ResponseFraming::Ended => return Poll::Ready(None),
                ResponseFraming::Length(left) if !read.is_empty() => {
                    let take = read.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= take as u64;
                    if *left == 0 {
                        self.response = ResponseFraming::Ended;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(read.split_to(take).freeze()))));
                }
                ResponseFraming::UntilClose if !read.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(read.split().freeze()))));
                }
                ResponseFraming::Chunked(decoder) => match decoder.decode(read)? {
                    Some(frame) => {
                        if decoder.is_done() {
                            self.response = ResponseFraming::Ended;
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    None if decoder.is_done() => {
                        self.response = ResponseFraming::Ended;
                        return Poll::Ready(None);
                    }
                    None => {}
                },
                _ => {}
            }
            if ready!(self.conn.poll_fill(cx))? == 0 {
                if matches!(self.response, ResponseFraming::UntilClose) {
                    self.response = ResponseFraming::Ended;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(H1Error::Closed("the end of the response body"))));
            }
        }
    }

    /// Whether the response has ended (the request may still be going out).
    pub fn response_ended(&self) -> bool {
        matches!(self.response, ResponseFraming::Ended)
    }

    fn request_written(&self) -> bool {
        self.body.is_none() && self.queued.is_empty()
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.response {
            ResponseFraming::Ended => SizeHint::with_exact(0),
            ResponseFraming::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    /// What becomes of the connection once the response has ended.
    pub fn after_response(self) -> AfterResponse {
        if !self.keep_alive || !self.response_ended() || !self.conn.read.is_empty() {
            AfterResponse::Closed
        } else if self.request_written() {
            AfterResponse::Free(self.conn)
        } else if self.finish_request {
            AfterResponse::Finishing(self)
        } else {
            AfterResponse::Closed
        }
    }

    /// Writes the rest of the request (the response came before its body had all gone), up
    /// to [`FINISH_REQUEST_WITHIN`]; then the connection is free.
    pub async fn finish_request(mut self) -> Option<H1Conn> {
        let written = std::future::poll_fn(|cx| self.poll_write(cx));
        match tokio::time::timeout(FINISH_REQUEST_WITHIN, written).await {
            Ok(Ok(())) => match self.after_response() {
                AfterResponse::Free(conn) => Some(conn),
                _ => None,
            },
            _ => None,
        }
    }
}

/// What becomes of a connection once its response has ended.
pub enum AfterResponse {
    /// It can carry the next request.
    Free(H1Conn),
    /// The app answered before the request body had all gone, with a status that does not
    /// refuse it: the rest is still to be written (as hyper's client did), then it is free.
    Finishing(Exchange),
    Closed,
}

/// A final response head from the front of `read` (taking its bytes, and those of any
/// informational head before it), with its body's framing and whether the connection may be
/// kept after it; None until all of it has come.
pub fn parse_head(
    read: &mut BytesMut,
    head_request: bool,
) -> Result<Option<(response::Parts, ResponseFraming, bool)>, H1Error> {
    loop {
        if read.is_empty() {
            return Ok(None);
        }
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let buf = &read[..];
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(invalid(format!("its head: {e}"))),
        };
        let code = parsed.code.unwrap_or_default();
        let status = StatusCode::from_u16(code).map_err(invalid)?;
        if status.is_informational() && code != 101 {
            read.advance(len);
            continue;
        }
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Header values are slices of the head, so the offsets are noted while the parser
        // still borrows it.
        let base = buf.as_ptr() as usize;
        let mut fields_at = Vec::with_capacity(parsed.headers.len());
        for field in parsed.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(invalid)?;
            let start = field.value.as_ptr() as usize - base;
            fields_at.push((name, start, start + field.value.len()));
        }
        let head = read.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(fields_at.len());
        for (name, start, end) in fields_at {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end)).map_err(invalid)?;
            headers.append(name, value);
        }
        let mut keep_alive = true;
        let framing = framing_of(status, version, &mut headers, head_request, &mut keep_alive)?;
        let mut parts = response::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some((parts, framing, keep_alive)));
    }
}

/// The response body's framing (RFC 9112 §6.3), and whether the connection may be kept.
fn framing_of(
    status: StatusCode,
    version: Version,
    headers: &mut HeaderMap,
    head_request: bool,
    keep_alive: &mut bool,
) -> Result<ResponseFraming, H1Error> {
    let says = |token: &[u8]| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    };
    *keep_alive = if version == Version::HTTP_11 {
        !says(b"close")
    } else {
        says(b"keep-alive")
    };
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // Never asked for on this path: the connection is not HTTP any more.
        *keep_alive = false;
        return Ok(ResponseFraming::Ended);
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(ResponseFraming::Ended);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            // HTTP/1.0 has no chunked coding: such framing is faulty (RFC 9112 §6.1).
            return Err(invalid("an HTTP/1.0 response has a Transfer-Encoding"));
        }
        // Transfer-Encoding wins over Content-Length, which must not pass on with it; a
        // message that had both is not trusted with the connection afterwards.
        if headers.remove(header::CONTENT_LENGTH).is_some() {
            *keep_alive = false;
        }
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
            .map(<[u8]>::trim_ascii);
        if last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) {
            return Ok(ResponseFraming::Chunked(ChunkDecoder::default()));
        }
        *keep_alive = false;
        return Ok(ResponseFraming::UntilClose);
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = super::guard::content_length(part.trim_ascii())
                .ok_or_else(|| invalid("its Content-Length is not a number"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("it has two different Content-Lengths"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => ResponseFraming::Ended,
        Some(n) => ResponseFraming::Length(n),
        None => {
            *keep_alive = false;
            ResponseFraming::UntilClose
        }
    })
}

/// The request head: origin-form target, the headers as they are (lowercase, as HTTP/2 has
/// them), then the framing header chosen for the body.
fn encode_head(parts: &request::Parts, framing: Option<&[u8]>) -> Bytes {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let fields: usize = parts
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut head = Vec::with_capacity(
        parts.method.as_str().len() + target.len() + fields + framing.map_or(0, <[u8]>::len) + 16,
    );
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(framing) = framing {
        head.extend_from_slice(framing);
    }
    head.extend_from_slice(b"\r\n");
    Bytes::from(head)
}

#[cfg(test)]
mod tests;
