//! Connection pools, one set per shard (see `shard`). HTTP/2 (to peer proxies, and to an h2c
//! app; on the `h2` crate, see `h2stream`) keeps one connection per destination that every
//! request multiplexes on; HTTP/1.1 (to the app) keeps the connections that are free, takes one per
//! request and gets it back when the response body has ended. A request that a kept
//! connection never began to send, or that the app closed it under before answering (when
//! the request may be sent twice), is sent once more on a new one. HTTP/1.1 is our own codec
//! (see `h1client`), driven by the request that uses it: no task per connection.
//!
//! Why not hyper-util's pooled client: per request it built a pool key from the URI, hashed it
//! under a lock shared by every thread, cloned the client, and for HTTP/1.1 spawned a task to
//! put the connection back; here a request costs one map lookup in its own shard's pool.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;

use super::h1client::{self, AfterResponse, Exchange, H1Conn, H1Error};
use super::h2stream::{self, H2Body, StreamError};
use super::upstream::{Body, BoxError};

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made; nothing was sent.
    Connect(BoxError),
    /// The connection failed with the request on it.
    Request(BoxError),
    /// The peer refused the stream unprocessed.
    Refused(BoxError),
}

/// The pool's work on a destination: a fresh connection's transport.
pub trait Connect {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn connect(&self) -> impl Future<Output = Result<Self::Io, BoxError>> + Send;
}

/// Runs a new connection's I/O in a task of its own (on this shard) until it ends.
fn drive<E: std::fmt::Display>(
    addr: SocketAddr,
    conn: impl Future<Output = Result<(), E>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "upstream connection ended");
        }
    });
}

type H2Slot = Arc<OnceCell<h2stream::Conn>>;

/// One shared HTTP/2 connection per (address, profile); `P` is what else decides whom a
/// connection may be to (the peer TLS profile).
pub struct H2Pool<P> {
    slots: Mutex<super::RequestMap<SocketAddr, Vec<(P, H2Slot)>>>,
}

impl<P> Default for H2Pool<P> {
    fn default() -> Self {
        Self {
            slots: Mutex::default(),
        }
    }
}

impl<P: PartialEq + Clone> H2Pool<P> {
    /// Sends `req` on the connection to `addr` under `profile`, making it with `connect` when
    /// there is none (requests arriving meanwhile wait for that one connection).
    pub async fn send(
        &self,
        addr: SocketAddr,
        profile: &P,
        connect: &impl Connect,
        req: Request<Body>,
    ) -> Result<Response<H2Body>, SendError> {
        let mut fresh = false;
        let mut req = h2stream::head(req);
        loop {
            let slot = self.slot(addr, profile);
            // Boxed: connecting is rare, and inline its state would make every request's
            // future (moved whole into its task) kilobytes larger.
            let made = slot
                .get_or_try_init(|| {
                    fresh = true;
                    Box::pin(async {
                        let io = connect.connect().await.map_err(SendError::Connect)?;
                        let (tx, conn) = h2stream::builder()
                            .handshake(io)
                            .await
                            .map_err(|e| SendError::Connect(Box::new(e)))?;
                        drive(addr, conn);
                        Ok(h2stream::Conn::new(tx))
                    })
                })
                .await;
            let tx = match made {
                Ok(tx) => tx,
                Err(e) => {
                    self.forget(addr, &slot);
                    return Err(e);
                }
            };
            let (head, body) = req;
            match h2stream::send(tx, head, body).await {
                Ok(resp) => return Ok(resp),
                // Never sent: the connection was closing. Once more on a new one.
                Err(StreamError::Closed(e, back)) => {
                    self.forget(addr, &slot);
                    if fresh {
                        return Err(SendError::Connect(
                            format!("the new connection closed at once: {e}").into(),
                        ));
                    }
                    req = *back;
                }
                Err(StreamError::Rejected(e) | StreamError::Failed(e)) => {
                    return Err(SendError::Request(Box::new(e)));
                }
                Err(StreamError::Refused(e)) => return Err(SendError::Refused(Box::new(e))),
            }
        }
    }

    fn slot(&self, addr: SocketAddr, profile: &P) -> H2Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let list = slots.entry(addr).or_default();
        if let Some((_, s)) = list.iter().find(|(p, _)| p == profile) {
            return s.clone();
        }
        let s = H2Slot::default();
        list.push((profile.clone(), s.clone()));
        s
    }

    /// Drops `slot` (a closed or failed connection) unless it was replaced already.
    fn forget(&self, addr: SocketAddr, slot: &H2Slot) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = slots.get_mut(&addr) {
            list.retain(|(_, s)| !Arc::ptr_eq(s, slot));
            if list.is_empty() {
                slots.remove(&addr);
            }
        }
    }
}

/// How long a free HTTP/1.1 connection is kept (hyper-util's default): after a burst, the
/// connections it needed do not stay open for good.
const H1_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Free HTTP/1.1 connections to one address, oldest first, with when each was freed.
type Free = VecDeque<(H1Conn, Instant)>;

/// Free HTTP/1.1 connections per address.
#[derive(Default)]
pub struct H1Pool {
    idle: Mutex<super::RequestMap<SocketAddr, Free>>,
}

impl H1Pool {
    /// Sends `req` on a free connection to `addr`, or on a new one made with `connect`; the
    /// connection comes back to the pool when the response body has ended.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        connect: &impl Connect<Io = TcpStream>,
        req: Request<Body>,
    ) -> Result<Response<PooledBody>, SendError> {
        let (parts, mut body) = req.into_parts();
        loop {
            let (conn, fresh) = match self.checkout(addr) {
                Some(conn) => (conn, false),
                // Boxed: see `H2Pool::send`.
                None => (Box::pin(Self::open(connect)).await?, true),
            };
            match Box::pin(h1client::send(conn, &parts, body)).await {
                Ok((head, exchange)) => {
                    return Ok(Response::from_parts(
                        head,
                        PooledBody {
                            exchange: Some(exchange),
                            pool: self.clone(),
                            addr,
                        },
                    ));
                }
                Err(failure) => match failure.body {
                    Some(back) if failure.retry_on_new && !fresh => body = back,
                    _ => return Err(SendError::Request(Box::new(failure.error))),
                },
            }
        }
    }

    async fn open(connect: &impl Connect<Io = TcpStream>) -> Result<H1Conn, SendError> {
        let io = connect.connect().await.map_err(SendError::Connect)?;
        Ok(H1Conn::new(io))
    }

    /// The most recently freed connection that still works.
    fn checkout(&self, addr: SocketAddr) -> Option<H1Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let free = idle.get_mut(&addr)?;
        while let Some((conn, _)) = free.pop_back() {
            if conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    fn give_back(&self, addr: SocketAddr, conn: H1Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let free = idle.entry(addr).or_default();
        // The oldest free one may have been kept too long: one check per return keeps such
        // connections from piling up. (One the app closed is found out when it is taken.)
        let now = Instant::now();
        if free
            .front()
            .is_some_and(|(_, since)| now - *since > H1_IDLE_TIMEOUT)
        {
            free.pop_front();
        }
        free.push_back((conn, now));
    }
}

/// A response body from an HTTP/1.1 connection of the pool, which drives that connection while
/// it is read (the body arrives through it, and the rest of the request goes out): when both
/// have ended, the connection goes back to the pool (one dropped before its end is closed, as
/// it cannot carry more).
pub struct PooledBody {
    /// None once the exchange has ended or failed.
    exchange: Option<Exchange>,
    pool: Arc<H1Pool>,
    addr: SocketAddr,
}

impl PooledBody {
    fn release(&mut self) {
        let Some(exchange) = self.exchange.take() else {
            return;
        };
        match exchange.after_response() {
            AfterResponse::Free(conn) => self.pool.give_back(self.addr, conn),
            // Rare (an app that answers a stream before it has read it): a task of its own,
            // as nothing else drives the connection now.
            AfterResponse::Finishing(exchange) => {
                let (pool, addr) = (self.pool.clone(), self.addr);
                tokio::spawn(async move {
                    if let Some(conn) = exchange.finish_request().await {
                        pool.give_back(addr, conn);
                    }
                });
            }
            AfterResponse::Closed => {}
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = &mut *self;
        let Some(exchange) = this.exchange.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = exchange.poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Err(_))) => this.exchange = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.exchange.as_ref().is_none_or(Exchange::response_ended)
    }

    fn size_hint(&self) -> SizeHint {
        self.exchange
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Exchange::size_hint)
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (204, HEAD, Content-Length: 0) may never be polled.
        if self.exchange.as_ref().is_some_and(Exchange::response_ended) {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    use crate::proxy::upstream::full;
    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    struct Tcp(SocketAddr);

    impl Connect for Tcp {
        type Io = TcpStream;
        async fn connect(&self) -> Result<Self::Io, BoxError> {
            Ok(TcpStream::connect(self.0).await?)
        }
    }

    /// A listener on a free port whose connections `serve` gets, each with its number (from
    /// 1); and how many it has accepted.
    async fn listen<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream, usize) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(serve(tcp, n));
            }
        });
        (addr, accepted)
    }

    /// An app answering each request with the number of the connection it came on; `close`
    /// makes it end every connection after one response.
    async fn app(h2: bool, close: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        listen(move |tcp, n| async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                let _ = req.into_body().collect().await;
                let mut resp = Response::new(full(n.to_string()));
                if close {
                    resp.headers_mut()
                        .insert(http::header::CONNECTION, "close".parse().unwrap());
                }
                Ok::<_, std::convert::Infallible>(resp)
            });
            let io = TokioIo::new(tcp);
            if h2 {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            }
        })
        .await
    }

    fn get(addr: SocketAddr, h2: bool) -> Request<Body> {
        let uri = if h2 {
            format!("http://{addr}/")
        } else {
            "/".to_string()
        };
        Request::builder()
            .uri(uri)
            .header(http::header::HOST, addr.to_string())
            .body(full(""))
            .unwrap()
    }

    /// A POST whose body is what is sent on the channel, as it is sent.
    fn streamed_post(
        addr: SocketAddr,
    ) -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        Request<Body>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let chunks = tokio_stream::wrappers::ReceiverStream::new(rx);
        let req = Request::builder()
            .method(http::Method::POST)
            .uri("/")
            .header(http::header::HOST, addr.to_string())
            .body(http_body_util::StreamBody::new(chunks).boxed())
            .unwrap();
        (tx, req)
    }

    async fn text<B: hyper::body::Body>(resp: Response<B>) -> String
    where
        B::Error: std::fmt::Debug,
    {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn http1_reuses_a_free_connection_and_opens_one_per_concurrent_request() {
        let (addr, accepted) = app(false, false).await;
        let pool = Arc::new(H1Pool::default());
        for _ in 0..3 {
            let resp = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
            assert_eq!(text(resp).await, "1");
        }
        // Two at once: the second cannot wait for the first's connection.
        let a = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
        let b = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
        let (a, b) = (text(a).await, text(b).await);
        assert_eq!((a.as_str(), b.as_str()), ("1", "2"));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Both are free again: no third connection.
        let resp = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
        text(resp).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn http1_a_body_dropped_unread_does_not_return_its_connection() {
        let (addr, accepted) = app(false, false).await;
        let pool = Arc::new(H1Pool::default());
        let resp = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
        drop(resp);
        let resp = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
        assert_eq!(text(resp).await, "2");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn http1_a_connection_the_app_closed_is_replaced() {
        let (addr, accepted) = app(false, true).await;
        let pool = Arc::new(H1Pool::default());
        for want in ["1", "2", "3"] {
            let resp = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
            assert_eq!(text(resp).await, want);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// An app that closes a kept-alive connection without saying so (its idle timeout, say):
    /// nothing drives a free connection, so the close is found when it is next taken, before
    /// the request is written, and the request goes on a new one with no error.
    #[tokio::test]
    async fn http1_a_free_connection_the_app_closed_silently_is_replaced() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let close = Arc::new(tokio::sync::Notify::new());
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        let go = close.clone();
        let (addr, accepted) = listen(move |mut tcp, n| {
            let (go, closed) = (go.clone(), closed_tx.clone());
            async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    let got = tcp.read(&mut buf).await.unwrap();
                    head.extend_from_slice(&buf[..got]);
                }
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{n}");
                tcp.write_all(resp.as_bytes()).await.unwrap();
                go.notified().await;
                drop(tcp);
                let _ = closed.send(n);
            }
        })
        .await;
        let pool = Arc::new(H1Pool::default());
        let resp = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
        assert_eq!(text(resp).await, "1");
        assert_eq!(pool.idle.lock().unwrap()[&addr].len(), 1);
        // Closed while free, with no `Connection: close`.
        close.notify_one();
        assert_eq!(closed.recv().await, Some(1));
        let resp = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
        assert_eq!(text(resp).await, "2");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// An app that closes a kept connection as a request arrives on it (its idle timeout
    /// firing then): a GET goes again on a new connection; a POST, which the app may have
    /// acted on, fails instead.
    #[tokio::test]
    async fn http1_a_get_the_app_closed_under_goes_again_and_a_post_does_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, accepted) = listen(|mut tcp, n| async move {
            let mut buf = vec![0u8; 4096];
            let mut answered = 0;
            loop {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(got) => head.extend_from_slice(&buf[..got]),
                    }
                }
                // Every connection answers one request, then closes under the next.
                if answered == 1 {
                    return;
                }
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{n}");
                tcp.write_all(resp.as_bytes()).await.unwrap();
                answered += 1;
            }
        })
        .await;
        let pool = Arc::new(H1Pool::default());
        let resp = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
        assert_eq!(text(resp).await, "1");
        let resp = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
        assert_eq!(text(resp).await, "2");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let mut post = get(addr, false);
        *post.method_mut() = http::Method::POST;
        let err = pool.send(addr, &Tcp(addr), post).await;
        assert!(matches!(err, Err(SendError::Request(_))), "{:?}", err.err());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// The connection is driven by the request, then by its response body: a body the app
    /// echoes as it arrives goes both ways at once, chunk by chunk, and the connection is
    /// free again afterwards.
    async fn next_data(body: &mut PooledBody) -> Option<Bytes> {
        let frame = body.frame().await?;
        Some(frame.unwrap().into_data().unwrap())
    }

    #[tokio::test]
    async fn http1_a_request_body_and_its_echo_stream_at_once() {
        let (addr, accepted) = listen(|tcp, _| async move {
            let echo = hyper::service::service_fn(|req: Request<Incoming>| async move {
                Ok::<_, std::convert::Infallible>(Response::new(req.into_body()))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), echo)
                .await;
        })
        .await;
        let pool = Arc::new(H1Pool::default());
        let (tx, req) = streamed_post(addr);
        let exchange = async {
            tx.send(Ok(Frame::data(Bytes::from("one")))).await.unwrap();
            let mut body = pool.send(addr, &Tcp(addr), req).await.unwrap().into_body();
            // The echo of the first chunk comes back before the second is sent.
            assert_eq!(next_data(&mut body).await.unwrap(), "one");
            tx.send(Ok(Frame::data(Bytes::from("two")))).await.unwrap();
            assert_eq!(next_data(&mut body).await.unwrap(), "two");
            drop(tx);
            assert!(next_data(&mut body).await.is_none());
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("the echo stalled");
        let resp = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
        text(resp).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// An app that answers a request before reading its body (and does not refuse it): the
    /// rest of the body still goes out after the response has ended, then the connection
    /// is free for the next request.
    #[tokio::test]
    async fn http1_a_body_answered_early_is_still_sent_then_the_connection_is_free() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (rest_tx, mut rest) = tokio::sync::mpsc::unbounded_channel();
        let (addr, accepted) = listen(move |mut tcp, _| {
            let rest_tx = rest_tx.clone();
            async move {
                /// Reads until `end` has come (a head's end may come with body bytes).
                async fn read_until(tcp: &mut TcpStream, got: &mut Vec<u8>, end: &[u8]) {
                    let mut buf = [0u8; 4096];
                    while !got.windows(end.len()).any(|w| w == end) {
                        let n = tcp.read(&mut buf).await.unwrap();
                        assert!(n > 0);
                        got.extend_from_slice(&buf[..n]);
                    }
                }
                let mut got = Vec::new();
                read_until(&mut tcp, &mut got, b"\r\n\r\n").await;
                tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
                    .await
                    .unwrap();
                read_until(&mut tcp, &mut got, b"0\r\n\r\n").await;
                let _ = rest_tx.send(String::from_utf8(got).unwrap());
                let mut next = Vec::new();
                read_until(&mut tcp, &mut next, b"\r\n\r\n").await;
                tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext")
                    .await
                    .unwrap();
                std::future::pending::<()>().await;
            }
        })
        .await;
        let pool = Arc::new(H1Pool::default());
        let (tx, req) = streamed_post(addr);
        tx.send(Ok(Frame::data(Bytes::from("one")))).await.unwrap();
        let resp = pool.send(addr, &Tcp(addr), req).await.unwrap();
        assert_eq!(text(resp).await, "early");
        tx.send(Ok(Frame::data(Bytes::from("two")))).await.unwrap();
        drop(tx);
        let got = tokio::time::timeout(Duration::from_secs(10), rest.recv())
            .await
            .expect("the rest of the body never came")
            .unwrap();
        assert!(got.ends_with("3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n"), "{got}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool
            .idle
            .lock()
            .unwrap()
            .get(&addr)
            .is_none_or(VecDeque::is_empty)
        {
            assert!(Instant::now() < deadline, "the connection never came back");
            tokio::task::yield_now().await;
        }
        let resp = pool.send(addr, &Tcp(addr), get(addr, false)).await.unwrap();
        assert_eq!(text(resp).await, "next");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn http2_shares_one_connection_and_reconnects_after_it_ends() {
        let (addr, accepted) = app(true, false).await;
        let pool: H2Pool<()> = H2Pool::default();
        let tcp = Tcp(addr);
        let sends = (0..8).map(|_| pool.send(addr, &(), &tcp, get(addr, true)));
        for resp in futures_util::future::join_all(sends).await {
            assert_eq!(text(resp.unwrap()).await, "1");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // A connection that failed: the next request makes a new one.
        let slot = pool.slot(addr, &());
        pool.forget(addr, &slot);
        let resp = pool
            .send(addr, &(), &Tcp(addr), get(addr, true))
            .await
            .unwrap();
        assert_eq!(text(resp).await, "2");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let pool: H2Pool<()> = H2Pool::default();
        let err = pool.send(addr, &(), &Tcp(addr), get(addr, true)).await;
        assert!(matches!(err, Err(SendError::Connect(_))), "{err:?}");
        let h1 = Arc::new(H1Pool::default());
        let err = h1.send(addr, &Tcp(addr), get(addr, false)).await;
        assert!(matches!(err, Err(SendError::Connect(_))));
    }
}
