//! HTTP/1.1 from callers, on a codec of our own for the common case: a plain request (HTTP/1.1;
//! no Upgrade, CONNECT, Expect, TE or Transfer-Encoding) with no body, or with one
//! Content-Length whose body came in the same read as its head (an app's small POST). Its
//! head is parsed by httparse into the `http` types, header values and body slices of the one
//! buffer it was read into; the response head goes out in one write with the body bytes
//! already there. Anything else, a head that does not parse and a body still on its way
//! included, hands the connection to hyper for the rest of its life, with the bytes read so
//! far ([`Handover`]), so hyper's answers (400, 431, 100-continue, upgrades, streamed request
//! bodies) stay as they were.
//!
//! What hyper's server did and this keeps: a header-read deadline before every head (an idle
//! connection past it is closed; a partial head gets 408, as `guard` answers on the first),
//! keep-alive and pipelining (no reading ahead while a request is buffered, so a caller that
//! half-closes after pipelining still gets its answers),
//! `connection: close` when asked or draining (an idle connection closes when the drain
//! starts), a Date header, a length when the body's is known and chunked framing when not,
//! no body for HEAD, 204 and 304, and a request dropped (its upstream stream cancelled)
//! when the caller closes the connection.
//!
//! It serves plaintext listeners after `guard` has looked at the first head, and HTTP/1.1
//! over TLS on gateway listeners, where nothing can be peeked: there its own deadline (408)
//! and length rules (400) are the first head's guard as well.
//!
//! Why: on the client's proxy, hyper's dispatcher, parser and encoder were about a fifth of
//! the instructions per request (callgrind), for requests that are nearly all this shape.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::drain::DrainWatch;
use super::guard::{self, MAX_HEAD_BYTES, Verdict};
use super::h1response::{encode_head, write_body};
use super::upstream::Body;

/// The most header fields in a request head (hyper's limit: past it, hyper answers 431).
const MAX_HEADERS: usize = 100;
/// How much is read at a time.
const READ_CHUNK: usize = 8 * 1024;

/// A connection handed to hyper: the bytes read from it and not yet used come first.
pub struct Handover<S> {
    read: Bytes,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Handover<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Handover<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What the buffered bytes hold.
// Unboxed: one is made and taken apart per request; a box would be an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(super) enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A plain request, and whether the caller lets the connection be kept.
    Plain(Request<Body>, bool),
    /// Something for hyper.
    Other,
}

/// Serves `io` (its first head already past `guard`) until it ends, or until a request that
/// is not plain: then the connection is returned for hyper to serve, with the watch, so a
/// request that arrived before a drain is still answered.
pub async fn serve<S, F, Fut>(
    io: S,
    watch: DrainWatch,
    handler: &F,
) -> Option<(Handover<S>, DrainWatch)>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Request<Body>) -> Fut,
    Fut: Future<Output = Result<Response<Body>, Infallible>>,
{
    let mut io = io;
    let mut read = BytesMut::with_capacity(READ_CHUNK);
    // One timer per connection, re-armed per head only when it would fire too early or late
    // (see `timer`): a deadline per request is otherwise a timer-wheel insert and removal.
    let mut head_timer = Box::pin(tokio::time::sleep(Duration::ZERO));
    let mut drained = pin!(watch.until_started());
    let mut draining = false;
    loop {
        let deadline =
            tokio::time::Instant::now().into_std() + super::dataplane::HEADER_READ_TIMEOUT;
        super::timer::arm(&mut head_timer, deadline);
        // How much of `read` is known to hold no end of a head: httparse runs again only when
        // new bytes may complete it, so a head trickled in small pieces is parsed once.
        let mut scanned = 0;
        let (req, mut keep_alive) = loop {
            let parsed = if scanned == 0 || ends_head(&read, scanned) {
                parse_head(&mut read)
            } else {
                Parsed::Partial
            };
            match parsed {
                Parsed::Plain(req, keep_alive) => break (req, keep_alive),
                Parsed::Other => {
                    // The length rules `guard` applies to a connection's first head, with its
                    // reasons, on later ones too (hyper would refuse them with a bare 400).
                    if let Verdict::Refuse(status, why) = guard::check(&read) {
                        guard::refuse(io, status, &why).await;
                        return None;
                    }
                    return Some((handover(read, io), watch));
                }
                // hyper answers 431.
                Parsed::Partial if read.len() >= MAX_HEAD_BYTES => {
                    return Some((handover(read, io), watch));
                }
                Parsed::Partial => scanned = read.len(),
            }
            let idle = read.is_empty();
            if idle && draining {
                return None;
            }
            tokio::select! {
                biased;
                r = fill(&mut io, &mut read) => match r {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                },
                () = head_timer.as_mut() => {
                    if !idle {
                        guard::refuse(io, 408, "the request head did not arrive in time").await;
                    }
                    return None;
                }
                () = drained.as_mut(), if !draining => draining = true,
            }
        };
        super::trim::note_request();
        let head_request = req.method() == Method::HEAD;
        let resp = {
            let mut answer = pin!(handler(req));
            loop {
                tokio::select! {
                    biased;
                    Ok(resp) = answer.as_mut() => break resp,
                    // The caller gone: dropping the request cancels its upstream stream.
                    r = fill(&mut io, &mut read), if read.is_empty() => match r {
                        Ok(0) | Err(_) => return None,
                        Ok(_) => {}
                    },
                    () = drained.as_mut(), if !draining => draining = true,
                }
            }
        };
        keep_alive &= !draining;
        let resp = if resp.status().is_informational() {
            // An interim answer as the final one (an app's 101 to a request that asked for no
            // upgrade): the caller would take the next answer for this request's.
            keep_alive = false;
            let mut bad = Response::new(super::upstream::full(
                "trellis: the upstream's final answer was an interim (1xx) one\n",
            ));
            *bad.status_mut() = StatusCode::BAD_GATEWAY;
            bad
        } else {
            resp
        };
        let (parts, body) = resp.into_parts();
        let mut out = Vec::with_capacity(256);
        let framing = encode_head(&parts, &body, head_request, &mut keep_alive, &mut out);
        if write_body(&mut io, &mut read, out, framing, body)
            .await
            .is_err()
        {
            return None;
        }
        if !keep_alive {
            let _ = io.shutdown().await;
            return None;
        }
    }
}

fn handover<S>(read: BytesMut, io: S) -> Handover<S> {
    Handover {
        read: read.freeze(),
        io,
    }
}

/// A request's Content-Length value ([`guard::content_length`]), up to 15 digits: a length
/// to hold in memory.
fn content_length(v: &[u8]) -> Option<usize> {
    if v.len() > 15 {
        return None;
    }
    usize::try_from(guard::content_length(v)?).ok()
}

/// Whether `read`, of which the first `scanned` bytes hold no end of a head, now holds one
/// (a blank line; httparse takes a bare LF too).
pub(super) fn ends_head(read: &[u8], scanned: usize) -> bool {
    let new = &read[scanned.saturating_sub(2)..];
    new.windows(2).any(|w| w == b"\n\n") || new.windows(3).any(|w| w == b"\n\r\n")
}

/// Reads more into `read`; `Ok(0)` at the caller's end of the stream.
pub(super) async fn fill<S: AsyncRead + Unpin>(
    io: &mut S,
    read: &mut BytesMut,
) -> io::Result<usize> {
    if read.capacity() - read.len() < READ_CHUNK / 4 {
        read.reserve(READ_CHUNK);
    }
    io.read_buf(read).await
}

/// A request head from the front of `read`, taken out of it when it is plain.
pub(super) fn parse_head(read: &mut BytesMut) -> Parsed {
    if read.is_empty() {
        return Parsed::Partial;
    }
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let buf = &read[..];
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut fields,
    ) {
        // hyper answers 431.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => return Parsed::Other,
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if parsed.version != Some(1) {
        return Parsed::Other;
    }
    let Some(Ok(method)) = parsed.method.map(|m| Method::from_bytes(m.as_bytes())) else {
        return Parsed::Other;
    };
    if method == Method::CONNECT {
        return Parsed::Other;
    }
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let Some(path) = parsed.path.map(|p| at(p.as_bytes())) else {
        return Parsed::Other;
    };
    // Header values are slices of the head, so the offsets are noted while the parser still
    // borrows it.
    let mut keep_alive = true;
    let mut body_len = None;
    let mut fields_at = Vec::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Parsed::Other;
        };
        match name {
            header::TRANSFER_ENCODING | header::EXPECT | header::UPGRADE | header::TE => {
                return Parsed::Other;
            }
            // One valid length, or hyper (after `guard`'s length rules) judges the head.
            header::CONTENT_LENGTH => match (body_len, content_length(field.value)) {
                (None, Some(n)) => body_len = Some(n),
                _ => return Parsed::Other,
            },
            header::CONNECTION => {
                for token in field.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Parsed::Other;
                    }
                }
            }
            _ => {}
        }
        fields_at.push((name, at(field.value)));
    }
    let body_len = body_len.unwrap_or(0);
    // A body not all here yet streams, which is hyper's to do.
    if buf.len() - len < body_len {
        return Parsed::Other;
    }
    let head = read.split_to(len).freeze();
    // What does not convert is hyper's to answer, from the bytes as they came.
    let put_back = |read: &mut BytesMut| {
        let mut back = BytesMut::from(&head[..]);
        back.extend_from_slice(read);
        *read = back;
        Parsed::Other
    };
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path)) else {
        return put_back(read);
    };
    // Room for what the request path adds (the target port, tracing): growing the map
    // would move every entry.
    let mut headers = HeaderMap::with_capacity(fields_at.len() + 4);
    for (name, value) in fields_at {
        let Ok(value) = HeaderValue::from_maybe_shared(head.slice(value)) else {
            return put_back(read);
        };
        headers.append(name, value);
    }
    let body = if body_len == 0 {
        super::upstream::empty()
    } else {
        super::upstream::full(read.split_to(body_len).freeze())
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Parsed::Plain(req, keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::drain::Drain;
    use crate::proxy::upstream::{BoxError, full};
    use http_body_util::BodyExt;
    use hyper::body::Frame;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    /// Answers by path: a known length, an unknown one (chunked), 204, and one that never
    /// comes (noting when the request is dropped).
    async fn answer(
        req: Request<Body>,
        dropped: Arc<AtomicBool>,
    ) -> Result<Response<Body>, Infallible> {
        let body = match req.uri().path() {
            "/len" => full(format!("{} {}", req.method(), req.uri())),
            "/chunked" => {
                let frames =
                    ["ab", "", "cde"].map(|s| Ok::<_, BoxError>(Frame::data(Bytes::from(s))));
                http_body_util::StreamBody::new(tokio_stream::iter(frames)).boxed()
            }
            "/empty" => full(""),
            "/body" => {
                let got = req.into_body().collect().await.unwrap().to_bytes();
                full(got)
            }
            "/101" => {
                let mut r = Response::new(full(""));
                *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                return Ok(r);
            }
            "/204" => {
                let mut r = Response::new(full(""));
                *r.status_mut() = StatusCode::NO_CONTENT;
                return Ok(r);
            }
            _ => {
                struct OnDrop(Arc<AtomicBool>);
                impl Drop for OnDrop {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::SeqCst);
                    }
                }
                let _noted = OnDrop(dropped);
                std::future::pending::<()>().await;
                unreachable!()
            }
        };
        Ok(Response::new(body))
    }

    /// A connection served by [`serve`], and what it returned.
    type Served = JoinHandle<Option<(Handover<TcpStream>, DrainWatch)>>;

    async fn start(drain: &Drain) -> (TcpStream, Served, Arc<AtomicBool>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let dropped = Arc::new(AtomicBool::new(false));
        let watch = drain.watch().unwrap();
        let d = dropped.clone();
        let served = tokio::spawn(async move {
            let handler = move |req| answer(req, d.clone());
            serve(tcp, watch, &handler).await
        });
        (client, served, dropped)
    }

    /// Everything the server sends until it closes, with any date blanked.
    async fn read_all(client: &mut TcpStream) -> String {
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        blank_dates(&String::from_utf8(got).unwrap())
    }

    fn blank_dates(s: &str) -> String {
        s.split("\r\n")
            .map(|l| {
                if l.starts_with("date: ") {
                    "date: -"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    #[tokio::test]
    async fn pipelined_plain_requests_are_answered_in_order_with_hyper_s_framing() {
        let drain = Drain::default();
        let (mut client, served, _) = start(&drain).await;
        client
            .write_all(
                b"GET /len?a=1 HTTP/1.1\r\nHost: a\r\n\r\n\
                  GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n\
                  HEAD /len HTTP/1.1\r\nHost: a\r\n\r\n\
                  DELETE /204 HTTP/1.1\r\nHost: a\r\ncontent-length: 0\r\n\r\n\
                  GET /len HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n",
            )
            .await
            .unwrap();
        let got = read_all(&mut client).await;
        assert_eq!(
            got,
            "HTTP/1.1 200 OK\r\ncontent-length: 12\r\ndate: -\r\n\r\nGET /len?a=1\
             HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: -\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: 9\r\ndate: -\r\n\r\n\
             HTTP/1.1 204 No Content\r\ndate: -\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\ndate: -\r\n\r\nGET /len"
        );
        assert!(served.await.unwrap().is_none());
    }

    /// A request with a body (or anything else not plain) goes to hyper with every byte of
    /// it, after the plain ones before it were answered here.
    #[tokio::test]
    async fn the_first_request_that_is_not_plain_hands_the_connection_over_intact() {
        let drain = Drain::default();
        for other in [
            // A body still on its way, and lengths that are not one plain number.
            &b"POST /len HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"[..],
            b"POST /len HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            b"POST /len HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
        ] {
            let (mut client, served, _) = start(&drain).await;
            let mut sent = b"GET /len HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
            sent.extend_from_slice(other);
            client.write_all(&sent).await.unwrap();
            let (mut handover, _watch) = served.await.unwrap().expect("handed over");
            let mut got = vec![0; other.len()];
            handover.read_exact(&mut got).await.unwrap();
            assert_eq!(got, other, "{}", String::from_utf8_lossy(other));
            // The plain one before it was answered.
            let mut answer = [0u8; 17];
            client.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"HTTP/1.1 200 OK\r\n");
        }
    }

    /// A body that came with its head is served here, and the connection stays: later heads
    /// keep their deadline (408), which hyper's would not answer.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_came_with_its_head_is_served_here() {
        let drain = Drain::default();
        let (mut client, served, _) = start(&drain).await;
        client
            .write_all(
                b"POST /body HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
                  PUT /body HTTP/1.1\r\nHost: a\r\ncontent-length: 0\r\n\r\n\
                  POST /body HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
                  GET / HTTP/1.1\r\n",
            )
            .await
            .unwrap();
        // Handed over, the connection would stay open with no one serving it.
        let got = tokio::time::timeout(Duration::from_secs(60), read_all(&mut client))
            .await
            .expect("the connection was neither answered whole nor closed");
        assert_eq!(
            got,
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: -\r\n\r\nhello\
             HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: -\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: 3\r\ndate: -\r\n\r\nabc\
             HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\n\
             content-length: 49\r\n\r\ntrellis: the request head did not arrive in time\n"
        );
        assert!(served.await.unwrap().is_none(), "never handed over");
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b"1234"), Some(1234));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b" 1",
            b"1,1",
            b"0x10",
            b"1234567890123456",
        ] {
            assert_eq!(content_length(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_caller_that_closes_drops_its_request() {
        let drain = Drain::default();
        let (mut client, served, dropped) = start(&drain).await;
        client
            .write_all(b"GET /never HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        drop(client);
        assert!(served.await.unwrap().is_none());
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_head_gets_408_and_an_idle_connection_is_closed_silently() {
        let drain = Drain::default();
        let (mut client, served, _) = start(&drain).await;
        client
            .write_all(b"GET /len HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n")
            .await
            .unwrap();
        let got = read_all(&mut client).await;
        assert!(got.contains("HTTP/1.1 200 OK"), "{got}");
        assert!(
            got.ends_with("\r\n\r\ntrellis: the request head did not arrive in time\n"),
            "{got}"
        );
        assert!(got.contains("HTTP/1.1 408 Request Timeout"), "{got}");
        assert!(served.await.unwrap().is_none());

        let (mut client, served, _) = start(&drain).await;
        assert_eq!(read_all(&mut client).await, "");
        assert!(served.await.unwrap().is_none());
    }

    /// A drain closes an idle connection, and one with a request in flight after its answer,
    /// which says `connection: close`.
    #[tokio::test]
    async fn a_drain_closes_idle_connections_and_ends_busy_ones_after_their_answer() {
        let drain = Drain::default();
        let (mut idle, idle_served, _) = start(&drain).await;
        let (mut busy, busy_served, _) = start(&drain).await;
        busy.write_all(b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\nGET /len HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        // The first answer is out: the second request's head is incomplete.
        let mut first = vec![0; 10];
        busy.read_exact(&mut first).await.unwrap();
        let draining = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drain(Duration::from_secs(10)).await }
        });
        assert_eq!(read_all(&mut idle).await, "");
        assert!(idle_served.await.unwrap().is_none());
        busy.write_all(b"\r\n").await.unwrap();
        let rest = read_all(&mut busy).await;
        assert!(rest.ends_with("HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\ndate: -\r\n\r\nGET /len"), "{rest}");
        assert!(busy_served.await.unwrap().is_none());
        assert!(draining.await.unwrap());
    }

    /// hyper's rules kept: a HEAD answer with an empty body states no length (the resource's
    /// is unknown), and an interim status as the final answer is the upstream's fault.
    #[tokio::test]
    async fn head_answers_invent_no_length_and_a_final_1xx_is_a_bad_gateway() {
        let drain = Drain::default();
        let (mut client, served, _) = start(&drain).await;
        client
            .write_all(
                b"HEAD /empty HTTP/1.1\r\nHost: a\r\n\r\n\
                  GET /empty HTTP/1.1\r\nHost: a\r\n\r\n\
                  GET /101 HTTP/1.1\r\nHost: a\r\n\r\n\
                  GET /len HTTP/1.1\r\nHost: a\r\n\r\n",
            )
            .await
            .unwrap();
        let got = read_all(&mut client).await;
        let reason = "trellis: the upstream's final answer was an interim (1xx) one\n";
        assert_eq!(
            got,
            format!(
                "HTTP/1.1 200 OK\r\ndate: -\r\n\r\n\
                 HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: -\r\n\r\n\
                 HTTP/1.1 502 Bad Gateway\r\ncontent-length: {}\r\nconnection: close\r\ndate: -\r\n\r\n{reason}",
                reason.len()
            )
        );
        assert!(served.await.unwrap().is_none());
    }

    /// A request that is not plain, completed after a drain began, is handed over with the
    /// connection's watch and answered by hyper, which then closes (the drain waits for it).
    #[tokio::test]
    async fn a_request_for_hyper_that_arrives_as_a_drain_starts_is_still_answered() {
        let drain = Drain::default();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let served = tokio::spawn({
            let drain = drain.clone();
            async move {
                let handler = move |req| answer(req, Arc::default());
                crate::proxy::dataplane::serve_plain(drain, tcp, handler).await
            }
        });
        client
            .write_all(b"GET /len HTTP/1.1\r\nHost: a\r\n\r\nPOST /len HTTP/1.1\r\n")
            .await
            .unwrap();
        let first = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\ndate: ";
        let mut got = vec![0; first.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, first);
        let draining = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drain(Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        client
            .write_all(b"Host: a\r\nContent-Length: 3\r\n\r\nabc")
            .await
            .unwrap();
        let rest = read_all(&mut client).await;
        assert!(rest.ends_with("\r\n\r\nPOST /len"), "{rest}");
        assert!(rest.contains("HTTP/1.1 200 OK\r\n"), "{rest}");
        served.await.unwrap();
        assert!(draining.await.unwrap());
    }

    #[test]
    fn the_end_of_a_head_is_found_in_new_bytes_only() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        // Split anywhere, the end is seen once the last piece is in.
        for cut in 1..head.len() {
            assert!(!ends_head(&head[..cut], 0) || cut == head.len(), "{cut}");
            assert!(ends_head(head, cut), "{cut}");
        }
        assert!(ends_head(b"GET / HTTP/1.1\nHost: a\n\n", 20));
        assert!(!ends_head(b"GET / HTTP/1.1\r\nHost: a\r\n", 10));
    }
}
