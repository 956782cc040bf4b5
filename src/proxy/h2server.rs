//! Peers' HTTP/2 connections to the inbound listener, served on the `h2` crate directly: each
//! stream runs as a future inside its connection's task, its response head goes out from
//! there, a body of more than one frame is pumped with flow control (`h2stream`'s pump), and a
//! caller's reset drops the stream's work (the request to the app with it).
//!
//! Why not hyper's HTTP/2 server: per request it spawned a task for the stream, removed the
//! connection-specific names from the response (six hashed lookups; `upstream` has already
//! dropped the hop-by-hop ones), looked for a Date to add and watched the stream through its
//! own glue; the app proxy ran about 4 % more instructions per request (callgrind). Streams
//! inside the connection's task also borrow the connection's state instead of cloning it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use http::{Request, Response, header};
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite};

use super::drain::DrainWatch;
use super::h2stream::{H2Body, poll_pump};
use super::upstream::{Body, boxed};

/// hyper's server defaults, which this replaced: 1 MiB windows, 200 streams at once.
fn builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 20)
        .max_frame_size(16 << 10)
        .max_concurrent_streams(200)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(400 << 10)
        .max_local_error_reset_streams(Some(1024));
    b
}

/// Serves HTTP/2 on `io` until the peer closes it, or until the drain has started (GOAWAY) and
/// the streams in flight have ended. `answer` makes each request's response.
pub async fn serve<I, F, Fut>(io: I, mut drain: DrainWatch, answer: F) -> Result<(), h2::Error>
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Request<Body>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    // A drain that starts during the handshake is seen by the loop's first pass: the peer gets
    // a GOAWAY, and a request already on its way is still served.
    let mut conn = builder().handshake::<_, Bytes>(io).await?;
    let mut streams = FuturesUnordered::new();
    let mut draining = false;
    // Polling the drain's future on every wakeup takes a lock; a clone of its watch says for
    // an atomic load whether the drain has moved since, and the future (polled once, so it
    // wakes this task) is only polled again then. Unconstrained: out of coop budget, a first
    // poll would return without registering to be woken.
    let probe = drain.probe();
    let mut started = pin!(tokio::task::coop::unconstrained(drain.started()));
    let mut armed = false;
    std::future::poll_fn(|cx| {
        loop {
            // Streams first: a response they send goes out in the connection's poll below.
            while let Poll::Ready(Some(ended)) = streams.poll_next_unpin(cx) {
                if let Err(_panic) = ended {
                    tracing::error!("a stream's handler panicked; the stream was reset");
                }
            }
            if !draining && (!armed || probe.has_changed()) {
                armed = true;
                if started.as_mut().poll(cx).is_ready() {
                    draining = true;
                    conn.graceful_shutdown();
                }
            }
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    let (parts, recv) = req.into_parts();
                    let length = if recv.is_end_stream() {
                        Some(0)
                    } else {
                        parts
                            .headers
                            .get(header::CONTENT_LENGTH)
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                    };
                    let body = boxed(H2Body::new(recv, length));
                    // Boxed where it is made: the answer's future is kilobytes, and each move
                    // into the stream's future and its task would copy it.
                    let answering = Box::pin(answer(Request::from_parts(parts, body)));
                    // A panic ends its stream (h2 resets a stream whose handle is dropped), not
                    // every stream of the connection.
                    streams.push(AssertUnwindSafe(stream(answering, respond)).catch_unwind());
                }
                // The peer is gone or closed the connection: streams still running can send
                // nothing more, and dropping them cancels their work.
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// One stream: the answer, unless the caller resets the stream first; then its body.
async fn stream<Fut>(mut answer: Pin<Box<Fut>>, mut respond: h2::server::SendResponse<Bytes>)
where
    Fut: Future<Output = Response<Body>>,
{
    let answered = std::future::poll_fn(|cx| {
        if let Poll::Ready(resp) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        match respond.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    // The finished answer's allocation goes now, not when a long body ends.
    drop(answer);
    let Some(resp) = answered else {
        return;
    };
    let (mut parts, mut body) = resp.into_parts();
    let eos = body.is_end_stream();
    if !eos
        && let Some(len) = body.size_hint().exact()
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
    let mut send = match respond.send_response(Response::from_parts(parts, ()), eos) {
        Ok(s) => s,
        Err(e) => {
            // A head h2 will not send (a connection-specific header): nothing else can go.
            tracing::debug!(error = %e, "response head not sent");
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            return;
        }
    };
    if eos {
        return;
    }
    let mut held = None;
    let pumped =
        std::future::poll_fn(|cx: &mut Context<'_>| poll_pump(&mut body, &mut send, &mut held, cx))
            .await;
    if let Err(e) = pumped {
        tracing::debug!(error = %e, "response body not sent whole");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::drain::Drain;
    use crate::proxy::h2stream;
    use crate::proxy::upstream::full;
    use http::HeaderMap;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::net::{TcpListener, TcpStream};

    /// A server on `answer` and a client connection to it (h2stream's, as the client proxy's).
    /// The server finishes when `drain` starts or is dropped.
    async fn connect<F, Fut>(drain: &Drain, answer: F) -> h2stream::Conn
    where
        F: Fn(Request<Body>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let watch = drain.watch().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = serve(tcp, watch, answer).await;
        });
        let (tx, conn) = h2stream::builder()
            .handshake(TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        tokio::spawn(conn);
        h2stream::Conn::new(tx)
    }

    fn post(body: Body) -> (Request<()>, Body) {
        h2stream::head(Request::post("http://peer/").body(body).unwrap())
    }

    #[tokio::test]
    async fn bodies_larger_than_the_windows_and_trailers_cross_both_ways() {
        let drain = Drain::default();
        // Echoes the body (3 MiB: past both 1 MiB windows) and its trailers.
        let conn = connect(&drain, |req: Request<Body>| async move {
            Response::new(req.into_body())
        })
        .await;
        let chunk = Bytes::from(vec![7u8; 64 << 10]);
        let mut frames: Vec<Result<Frame<Bytes>, crate::proxy::upstream::BoxError>> =
            (0..48).map(|_| Ok(Frame::data(chunk.clone()))).collect();
        let mut t = HeaderMap::new();
        t.insert("x-sum", "48".parse().unwrap());
        frames.push(Ok(Frame::trailers(t)));
        let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)));
        let (head, body) = post(body);
        let resp = h2stream::send(&conn, head, body).await.unwrap();
        let got = resp.into_body().collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["x-sum"], "48");
        assert_eq!(got.to_bytes().len(), 48 * (64 << 10));
    }

    #[tokio::test]
    async fn a_whole_response_gets_its_length_and_a_request_body_its_size() {
        let drain = Drain::default();
        let conn = connect(&drain, |req: Request<Body>| async move {
            let hint = req.body().size_hint().exact();
            Response::new(full(format!("{hint:?}")))
        })
        .await;
        let (head, body) = post(full("four"));
        let resp = h2stream::send(&conn, head, body).await.unwrap();
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "7");
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, "Some(4)");
    }

    #[tokio::test]
    async fn a_handler_that_panics_fails_its_stream_only() {
        let drain = Drain::default();
        let conn = connect(&drain, |req: Request<Body>| async move {
            assert_ne!(req.uri().path(), "/panic", "the handler's bug");
            Response::new(full("fine"))
        })
        .await;
        let get = |path: &str| {
            h2stream::head(
                Request::get(format!("http://peer{path}"))
                    .body(full(""))
                    .unwrap(),
            )
        };
        let (head, body) = get("/panic");
        assert!(h2stream::send(&conn, head, body).await.is_err());
        let (head, body) = get("/after");
        let resp = h2stream::send(&conn, head, body).await.unwrap();
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, "fine");
    }

    /// Counts the answers dropped before they finished.
    struct Dropped(Arc<AtomicUsize>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_cancels_the_answer() {
        let drain = Drain::default();
        let dropped = Arc::new(AtomicUsize::new(0));
        let conn = connect(&drain, {
            let dropped = dropped.clone();
            move |_req: Request<Body>| {
                let guard = Dropped(dropped.clone());
                async move {
                    std::future::pending::<()>().await;
                    drop(guard);
                    Response::new(full(""))
                }
            }
        })
        .await;
        let (head, body) = post(full(""));
        let gave_up = tokio::time::timeout(
            Duration::from_millis(100),
            h2stream::send(&conn, head, body),
        );
        assert!(gave_up.await.is_err());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while dropped.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "answer still running"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_drain_lets_the_stream_in_flight_finish_then_ends_the_connection() {
        let drain = Drain::default();
        let (release, released) = tokio::sync::watch::channel(false);
        let (arrived, mut arrival) = tokio::sync::mpsc::unbounded_channel();
        let conn = connect(&drain, move |_req: Request<Body>| {
            let (mut released, arrived) = (released.clone(), arrived.clone());
            async move {
                let _ = arrived.send(());
                let _ = released.wait_for(|r| *r).await;
                Response::new(full("done"))
            }
        })
        .await;
        let conn = Arc::new(conn);
        let in_flight = tokio::spawn({
            let conn = conn.clone();
            async move {
                let (head, body) = post(full(""));
                let resp = h2stream::send(&conn, head, body).await.unwrap();
                resp.into_body().collect().await.unwrap().to_bytes()
            }
        });
        arrival.recv().await.unwrap();
        let drained = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drain(Duration::from_secs(5)).await }
        });
        // Not drained while the stream is in flight; the connection takes no new stream.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!drained.is_finished());
        release.send(true).unwrap();
        assert_eq!(in_flight.await.unwrap(), "done");
        assert!(drained.await.unwrap(), "the connection outlived the drain");
        let (head, body) = post(full(""));
        assert!(h2stream::send(&conn, head, body).await.is_err());
    }
}
