//! Connection pools, one set per shard (see `shard`). HTTP/2 (to peer proxies, and to an h2c
//! app; on the `h2` crate, see `h2stream`) keeps one connection per destination that every
//! request multiplexes on; HTTP/1.1 (to the app) keeps the connections that are free, takes one per
//! request and gets it back when the response body has ended. A request that a connection
//! never began to send (it closed first) is sent once more on a new one. HTTP/1.1 is hyper's
//! client connection, driven by the request that uses it (see `H1Conn`).
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
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::OnceCell;

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

/// An HTTP/1.1 connection to the app: the handle requests go in by, and the connection's I/O,
/// which the request using it drives (there is no task per connection). So a request is
/// written to the app as soon as its own task has routed it, not when a connection task's
/// turn comes after every other task that was ready; and no wakeup crosses tasks.
struct H1Conn {
    tx: http1::SendRequest<Body>,
    /// Boxed: the connection's state (its buffers) is large, and it moves in and out of the
    /// pool and into the response body with every request.
    io: Box<H1Io>,
}

type H1Io = http1::Connection<TokioIo<TcpStream>, Body>;

impl H1Conn {
    fn poll_io(&mut self, cx: &mut Context<'_>, addr: SocketAddr) -> Poll<()> {
        poll_h1_io(&mut self.io, cx, addr)
    }
}

/// Drives an HTTP/1.1 connection's I/O; `Ready` once it has ended (it cannot be polled again).
fn poll_h1_io(io: &mut H1Io, cx: &mut Context<'_>, addr: SocketAddr) -> Poll<()> {
    Pin::new(io).poll(cx).map(|ended| {
        if let Err(e) = ended {
            tracing::debug!(%addr, error = %e, "upstream connection ended");
        }
    })
}

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
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, SendError> {
        loop {
            let (conn, fresh) = match self.checkout(addr).await {
                Some(conn) => (conn, false),
                // Boxed: see `H2Pool::send`.
                None => (Box::pin(Self::open(connect)).await?, true),
            };
            let H1Conn { mut tx, io } = conn;
            let mut io = Some(io);
            let mut response = std::pin::pin!(tx.try_send_request(req));
            // The I/O first, so the request is written before this task waits. Once the
            // connection has ended it is dropped, which answers a request still queued on it
            // (with the request back when it was never sent).
            let sent = std::future::poll_fn(|cx| {
                if io
                    .as_mut()
                    .is_some_and(|io| poll_h1_io(io, cx, addr).is_ready())
                {
                    io = None;
                }
                response.as_mut().poll(cx)
            })
            .await;
            match sent {
                Ok(resp) => {
                    let conn = io.map(|io| H1Conn { tx, io });
                    return Ok(resp.map(|inner| PooledBody {
                        inner,
                        conn,
                        pool: self.clone(),
                        addr,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: the app closed the kept connection. Once more on a new one.
                    Some(back) if !fresh => req = back,
                    _ => return Err(SendError::Request(Box::new(e.into_error()))),
                },
            }
        }
    }

    async fn open(connect: &impl Connect<Io = TcpStream>) -> Result<H1Conn, SendError> {
        let io = connect.connect().await.map_err(SendError::Connect)?;
        let (tx, io) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect(Box::new(e)))?;
        Ok(H1Conn {
            tx,
            io: Box::new(io),
        })
    }

    /// The most recently freed connection that still works.
    async fn checkout(&self, addr: SocketAddr) -> Option<H1Conn> {
        loop {
            let mut conn = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.get_mut(&addr)?.pop_back()?.0
            };
            // Nothing drove it while it was free: this reads what came meanwhile (the app
            // closing it, say) and finishes the last exchange, after which the connection
            // asks for the next request. One that is still busy (a request body not yet
            // all written) is waited for, as a task of its own would have been.
            let usable = std::future::poll_fn(|cx| {
                if conn.poll_io(cx, addr).is_ready() {
                    return Poll::Ready(false);
                }
                conn.tx.poll_ready(cx).map(|ready| ready.is_ok())
            })
            .await;
            if usable {
                return Some(conn);
            }
        }
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
/// it is read (the body arrives through it): when it has ended, the connection goes back to
/// the pool (one dropped before its end is closed, as it cannot carry more).
pub struct PooledBody {
    inner: Incoming,
    /// None once the connection has ended or failed, or has gone back to the pool.
    conn: Option<H1Conn>,
    pool: Arc<H1Pool>,
    addr: SocketAddr,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.give_back(self.addr, conn);
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.inner).poll_frame(cx);
        // The body asked for more above; the connection reads it now (and writes what is left
        // of the request), then the body has it.
        if polled.is_pending()
            && let Some(conn) = this.conn.as_mut()
        {
            if conn.poll_io(cx, this.addr).is_ready() {
                this.conn = None;
            }
            polled = Pin::new(&mut this.inner).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
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

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (204, HEAD, Content-Length: 0) may never be polled.
        if hyper::body::Body::is_end_stream(&self.inner) {
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
    use hyper_util::rt::TokioExecutor;

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
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let chunks = tokio_stream::wrappers::ReceiverStream::new(rx);
        let req = Request::builder()
            .method(http::Method::POST)
            .uri("/")
            .header(http::header::HOST, addr.to_string())
            .body(http_body_util::StreamBody::new(chunks).boxed())
            .unwrap();
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
