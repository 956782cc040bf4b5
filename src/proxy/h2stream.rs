//! One request as a stream of an HTTP/2 client connection, on the `h2` crate directly: the
//! head sent from the caller's own task, the request body pumped with flow control, the
//! response body handed back with its window released as it is read, trailers included.
//!
//! Why not hyper's HTTP/2 client: per request it sent the request through a channel to a
//! dispatch task, spawned a task to await the response and answered through a oneshot, so a
//! request woke three tasks besides the connection's. Here the caller's task opens the stream
//! and awaits the answer itself; only a request body of more than one frame gets a task.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::FutureExt;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Method, Request, Response, header};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::sync::oneshot;

use super::upstream::{Body, BoxError};

/// The settings hyper's HTTP/2 client used, which this replaced: larger windows than the
/// protocol's 64 KiB (a peer hop carries many streams), no server push.
pub fn builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_max_send_streams(100)
        .initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .max_frame_size(16 << 10)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(1 << 20)
        .max_local_error_reset_streams(Some(1024))
        .enable_push(false);
    b
}

/// Why a stream gave no response.
#[derive(Debug)]
pub enum StreamError {
    /// The connection takes no more streams (closed, or going away); nothing was sent, and
    /// the request comes back to be sent elsewhere (boxed: a rare path that would otherwise
    /// widen every request's result).
    Closed(h2::Error, Box<(Request<()>, Body)>),
    /// h2 would not open the stream (a head it cannot send); nothing was sent.
    Rejected(h2::Error),
    /// The peer refused the stream unprocessed (REFUSED_STREAM, or above a graceful GOAWAY's
    /// last stream): safe to send again.
    Refused(h2::Error),
    /// The request went out and then failed.
    Failed(h2::Error),
}

/// The head of a request to send: what hyper's client adds, a length when the body's is known.
pub fn head(req: Request<Body>) -> (Request<()>, Body) {
    let (mut parts, body) = req.into_parts();
    if let Some(len) = body.size_hint().exact() {
        // RFC 9110 §8.6: no Content-Length: 0 on a method that defines no body.
        let defines_body = !matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::CONNECT
        );
        if (len != 0 || defines_body) && !parts.headers.contains_key(header::CONTENT_LENGTH) {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, http::HeaderValue::from(len));
        }
    }
    (Request::from_parts(parts, ()), body)
}

/// A connection's request handle, shared by every request on it and taken in turn. At most
/// one stream waits inside h2 for a slot under the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`
/// (as with hyper's dispatcher): the next request's `poll_ready` waits for it under the lock,
/// so later requests wait here, where a caller that gives up never reaches the peer. Clones
/// of the handle would each queue a stream in h2, sent once a slot frees, after its caller
/// may have retried elsewhere.
pub type Conn = tokio::sync::Mutex<SendRequest<Bytes>>;

/// Sends `head` and `body` as a new stream on `conn`; the answer once its head has arrived.
/// `head` and `body` come back in [`StreamError::Closed`] when nothing was sent.
pub async fn send(
    conn: &Conn,
    head: Request<()>,
    body: Body,
) -> Result<Response<H2Body>, StreamError> {
    let eos = body.is_end_stream();
    let (response, stream) = {
        let mut tx = conn.lock().await;
        if let Err(e) = std::future::poll_fn(|cx| tx.poll_ready(cx)).await {
            return Err(StreamError::Closed(e, Box::new((head, body))));
        }
        tx.send_request(head, eos).map_err(StreamError::Rejected)?
    };
    let mut cancel = (!eos).then(|| pump(body, stream));
    let answer = response.await;
    if let Some(c) = cancel.as_mut() {
        c.disarm();
    }
    match answer {
        Ok(resp) => Ok(resp.map(|recv| H2Body::new(recv, None))),
        Err(e) if refused(&e) => Err(StreamError::Refused(e)),
        Err(e) => Err(StreamError::Failed(e)),
    }
}

fn refused(e: &h2::Error) -> bool {
    e.reason() == Some(Reason::REFUSED_STREAM)
        || (e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR))
}

/// Sends `body` on `stream`: inline when it is in one frame, else from a task of its own
/// (a new stream has no window until the connection's task opens it). The stream is reset if
/// what this returns is dropped armed (the caller gave up before the answer came); once
/// disarmed, the body goes on until it ends or the peer resets.
fn pump(body: Body, stream: SendStream<Bytes>) -> CancelOnDrop {
    let (cancel, cancelled) = oneshot::channel();
    let mut pumping = Box::pin(pump_body(body, stream, cancelled));
    if (&mut pumping).now_or_never().is_none() {
        tokio::spawn(pumping);
    }
    CancelOnDrop(Some(cancel))
}

struct CancelOnDrop(Option<oneshot::Sender<()>>);

impl CancelOnDrop {
    /// The answer is in: the pump sees its sender gone without a value and carries on.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

async fn pump_body(
    mut body: Body,
    mut stream: SendStream<Bytes>,
    mut cancelled: oneshot::Receiver<()>,
) {
    let mut watching = true;
    let mut held = None;
    let result = std::future::poll_fn(|cx| {
        if watching {
            match Pin::new(&mut cancelled).poll(cx) {
                Poll::Ready(Ok(())) => {
                    stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(_)) => watching = false,
                Poll::Pending => {}
            }
        }
        poll_pump(&mut body, &mut stream, &mut held, cx)
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "request body not sent whole");
    }
}

/// The pump in hyper's order: watch for a reset; send the chunk in hand (`held`) once the
/// window has room for some of it (h2 buffers the rest, so at most one chunk waits beyond the
/// window); then the next frame. The body's last chunk goes at once, so a body in one frame
/// (a replay buffer's) is sent without a task.
pub fn poll_pump(
    body: &mut Body,
    stream: &mut SendStream<Bytes>,
    held: &mut Option<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>> {
    loop {
        if let Poll::Ready(reason) = stream.poll_reset(cx)? {
            return Poll::Ready(Err(format!("the peer reset the stream: {reason:?}").into()));
        }
        if let Some(data) = held.take() {
            while stream.capacity() == 0 {
                match stream.poll_capacity(cx) {
                    Poll::Pending => {
                        *held = Some(data);
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(Ok(_))) => {}
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                    Poll::Ready(None) => return Poll::Ready(Err("the stream closed".into())),
                }
            }
            stream.send_data(data, false)?;
            continue;
        }
        let Some(frame) = ready!(Pin::new(&mut *body).poll_frame(cx)) else {
            stream.send_data(Bytes::new(), true)?;
            return Poll::Ready(Ok(()));
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                stream.send_reset(reset_reason(&*e));
                return Poll::Ready(Err(e));
            }
        };
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                if eos || data.is_empty() {
                    stream.send_data(data, eos)?;
                    if eos {
                        return Poll::Ready(Ok(()));
                    }
                } else {
                    // A claim of one byte, not the chunk: reserving it all would pin the
                    // connection's window for a stream that cannot use it yet (hyper #4003).
                    stream.reserve_capacity(1);
                    *held = Some(data);
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.reserve_capacity(0);
                    stream.send_trailers(trailers)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// The reset that passes on a body's failure: the reason of an HTTP/2 error behind it (a
/// stream the other side cancelled stays CANCEL, which gRPC reads as CANCELLED), else
/// INTERNAL_ERROR. hyper's pipe does the same.
pub(crate) fn reset_reason(e: &(dyn std::error::Error + 'static)) -> Reason {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(reason) = e.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        cause = e.source();
    }
    Reason::INTERNAL_ERROR
}

/// A body arriving on an HTTP/2 stream: a response's here, a request's in `h2server`.
#[derive(Debug)]
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    /// Its length when known from the head: no DATA to come, or a Content-Length (h2 resets a
    /// stream whose DATA disagree).
    length: Option<u64>,
}

impl H2Body {
    pub fn new(recv: RecvStream, length: Option<u64>) -> Self {
        Self {
            recv,
            data_done: false,
            length,
        }
    }
}

impl hyper::body::Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // RFC 9113 §8.1: RST_STREAM(NO_ERROR) after a whole response only says the
                // request body is no longer wanted.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t: HeaderMap| Ok(Frame::trailers(t)))),
            Err(e) if e.reason() == Some(Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.length.map(SizeHint::with_exact).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{StreamExt, stream};
    use http_body_util::{BodyExt, StreamBody};
    use std::time::Duration;
    use tokio::net::{TcpListener, TcpStream};

    /// An h2 server running `answer` on each request; the client end of a connection to it.
    async fn connect<F, Fut>(answer: F) -> Conn
    where
        F: Fn(Request<RecvStream>, h2::server::SendResponse<Bytes>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        connect_to(h2::server::Builder::new(), answer).await
    }

    async fn connect_to<F, Fut>(server: h2::server::Builder, answer: F) -> Conn
    where
        F: Fn(Request<RecvStream>, h2::server::SendResponse<Bytes>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = server.handshake(tcp).await.unwrap();
            while let Some(Ok((req, respond))) = conn.accept().await {
                tokio::spawn(answer(req, respond));
            }
        });
        let (tx, conn) = builder()
            .handshake(TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        tokio::spawn(conn);
        Conn::new(tx)
    }

    fn post(body: Body) -> (Request<()>, Body) {
        let req = Request::post("http://peer/").body(body).unwrap();
        head(req)
    }

    fn streamed(chunks: Vec<Frame<Bytes>>, then_wait: bool) -> Body {
        let frames = stream::iter(chunks.into_iter().map(Ok::<_, BoxError>));
        if then_wait {
            BodyExt::boxed(StreamBody::new(frames.chain(stream::pending())))
        } else {
            BodyExt::boxed(StreamBody::new(frames))
        }
    }

    #[tokio::test]
    async fn a_body_larger_than_the_window_and_its_trailers_cross_both_ways() {
        // The server's window is h2's default 64 KiB: 3 MiB needs WINDOW_UPDATEs all along.
        let tx = connect(|req, mut respond| async move {
            let mut body = req.into_body();
            let mut n = 0;
            while let Some(data) = body.data().await {
                let data = data.unwrap();
                n += data.len();
                body.flow_control().release_capacity(data.len()).unwrap();
            }
            let trailer = body.trailers().await.unwrap().unwrap()["x-sum"].clone();
            let mut out = respond.send_response(Response::new(()), false).unwrap();
            out.send_data(Bytes::from(n.to_string()), false).unwrap();
            let mut t = HeaderMap::new();
            t.insert("x-echo", trailer);
            out.send_trailers(t).unwrap();
        })
        .await;
        let chunk = Bytes::from(vec![7u8; 64 << 10]);
        let mut frames: Vec<_> = (0..48).map(|_| Frame::data(chunk.clone())).collect();
        let mut t = HeaderMap::new();
        t.insert("x-sum", "48".parse().unwrap());
        frames.push(Frame::trailers(t));
        let (head, body) = post(streamed(frames, false));
        let resp = send(&tx, head, body).await.unwrap();
        let got = resp.into_body().collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["x-echo"], "48");
        assert_eq!(got.to_bytes(), (48 * (64 << 10)).to_string());
    }

    #[test]
    fn a_body_failure_resets_with_the_reason_behind_it() {
        let cancelled: BoxError = Box::new(h2::Error::from(Reason::CANCEL));
        assert_eq!(reset_reason(&*cancelled), Reason::CANCEL);
        let other: BoxError = Box::new(std::io::Error::other("app went away"));
        assert_eq!(reset_reason(&*other), Reason::INTERNAL_ERROR);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_before_the_answer_resets_the_stream() {
        let (seen, mut saw) = tokio::sync::mpsc::unbounded_channel();
        let tx = connect(move |req, _respond| {
            let seen = seen.clone();
            async move {
                let mut body = req.into_body();
                // The first chunk, then the end: the client's reset.
                let first = body.data().await.map(|d| d.is_ok());
                let end = body.data().await.map(|d| d.map_err(|e| e.reason()));
                let _ = seen.send((first, end));
            }
        })
        .await;
        let (head, body) = post(streamed(vec![Frame::data(Bytes::from("x"))], true));
        let gave_up = tokio::time::timeout(Duration::from_millis(200), send(&tx, head, body));
        assert!(gave_up.await.is_err());
        let (first, end) = tokio::time::timeout(Duration::from_secs(5), saw.recv())
            .await
            .expect("the server saw no reset")
            .unwrap();
        assert_eq!(first, Some(true));
        assert_eq!(end, Some(Err(Some(Reason::CANCEL))));
    }

    #[tokio::test]
    async fn a_refused_stream_is_told_apart_from_a_failed_one() {
        let tx = connect(|req, mut respond| async move {
            let reason = if req.uri().path() == "/refuse" {
                Reason::REFUSED_STREAM
            } else {
                Reason::INTERNAL_ERROR
            };
            respond.send_reset(reason);
        })
        .await;
        for (path, refused) in [("/refuse", true), ("/fail", false)] {
            let req = Request::get(format!("http://peer{path}"))
                .body(crate::proxy::upstream::full(""))
                .unwrap();
            let (head, body) = head(req);
            let e = send(&tx, head, body).await.unwrap_err();
            assert_eq!(
                matches!(e, StreamError::Refused(_)),
                refused,
                "{path}: {e:?}"
            );
            assert_eq!(
                matches!(e, StreamError::Failed(_)),
                !refused,
                "{path}: {e:?}"
            );
        }
    }

    #[tokio::test]
    async fn past_the_peers_stream_limit_a_caller_that_gave_up_never_reaches_it() {
        // The peer takes one stream at a time and holds "/slow" until told.
        let (release, released) = tokio::sync::watch::channel(false);
        let (seen, mut saw) = tokio::sync::mpsc::unbounded_channel();
        let mut server = h2::server::Builder::new();
        server.max_concurrent_streams(1);
        let tx = connect_to(server, move |req, mut respond| {
            let (seen, mut released) = (seen.clone(), released.clone());
            async move {
                let path = req.uri().path().to_string();
                let _ = seen.send(path.clone());
                if path == "/slow" {
                    let _ = released.wait_for(|r| *r).await;
                }
                let _ = respond.send_response(Response::new(()), true);
            }
        })
        .await;
        let get = |path: &str| {
            head(
                Request::get(format!("http://peer{path}"))
                    .body(crate::proxy::upstream::full(""))
                    .unwrap(),
            )
        };
        let tx = std::sync::Arc::new(tx);
        let slow = tokio::spawn({
            let tx = tx.clone();
            let (h, b) = get("/slow");
            async move { send(&tx, h, b).await.map(|r| r.status()) }
        });
        assert_eq!(saw.recv().await.as_deref(), Some("/slow"));
        // No slot: the first request past the limit is queued in h2, as hyper's dispatcher
        // left one, and goes out once a slot frees even though its caller gave up; a later
        // one waits for that before it is sent, and its caller gives up first.
        for path in ["/queued", "/gave-up"] {
            let (h, b) = get(path);
            let r = tokio::time::timeout(Duration::from_millis(100), send(&tx, h, b)).await;
            assert!(r.is_err(), "{path}");
        }
        release.send(true).unwrap();
        assert_eq!(slow.await.unwrap().unwrap(), 200);
        let (h, b) = get("/next");
        let r = send(&tx, h, b).await.unwrap();
        assert_eq!(r.status(), 200);
        let mut paths = Vec::new();
        while let Ok(p) = saw.try_recv() {
            paths.push(p);
        }
        assert!(paths.contains(&"/next".to_string()), "{paths:?}");
        assert!(!paths.contains(&"/gave-up".to_string()), "{paths:?}");
    }
}
