//! Connections that stop being HTTP requests: upgrades (WebSocket) on `http` listeners, TCP
//! routes, and CONNECT on the explicit listener. Between proxies each rides an HTTP/1.1
//! connection of its own (mTLS like the rest): an upgrade request naming the app port,
//! answered 101 by the peer, then bytes flow both ways until a side closes or the listener's
//! idle timeout passes without traffic.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{CONNECTION, HOST, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::upstream::{
    Body, TARGET_PORT, UpstreamError, boxed, empty, error_chain, strip_hop_by_hop,
};

/// The upgrade protocol of a TCP tunnel between proxies.
pub const TCP_UPGRADE: &str = "trellis-tcp";

/// Whether an HTTP/1.1 request asks to switch protocols.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The request's Upgrade protocol.
pub fn protocol<B>(req: &Request<B>) -> Option<&str> {
    req.headers().get(UPGRADE).and_then(|v| v.to_str().ok())
}

async fn handshake<I>(
    io: I,
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, UpstreamError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| UpstreamError::Connect {
            addr,
            message: error_chain(&e),
        })?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// Sends the upgrade request `req` on `io`, a connection of its own to `addr`; on 101 the
/// caller's connection (`downstream`) and the upstream one are spliced.
pub async fn upgrade<I>(
    io: I,
    addr: SocketAddr,
    req: Request<Body>,
    downstream: OnUpgrade,
    idle: Option<Duration>,
) -> Result<Response<Body>, UpstreamError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut sender = handshake(io, addr).await?;
    let (mut parts, body) = req.into_parts();
    let upgrade = parts.headers.get(UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = upgrade {
        parts.headers.insert(UPGRADE, u);
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = path
        .parse()
        .map_err(|_| UpstreamError::BadRequest(format!("request target {path:?}")))?;
    let mut resp = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| UpstreamError::Reset {
            addr,
            message: error_chain(&e),
        })?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::join!(downstream, upstream) {
                (Ok(d), Ok(u)) => splice(TokioIo::new(d), TokioIo::new(u), idle).await,
                (d, u) => tracing::debug!(?d, ?u, "upgrade did not complete"),
            }
        });
    }
    let (mut parts, body) = resp.into_parts();
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(&mut parts.headers);
    }
    Ok(Response::from_parts(parts, boxed(body)))
}

/// Opens a TCP tunnel, on `io` to the peer proxy at `addr`, to its app's port `port`.
pub async fn open_tcp<I>(io: I, addr: SocketAddr, port: u16) -> Result<Upgraded, UpstreamError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut sender = handshake(io, addr).await?;
    let req = Request::get("/")
        .header(HOST, addr.to_string())
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, TCP_UPGRADE)
        .header(TARGET_PORT, port)
        .body(empty())
        .map_err(|e| UpstreamError::BadRequest(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| UpstreamError::Reset {
            addr,
            message: error_chain(&e),
        })?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let text = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        let message = format!("the peer answered {status}: {text}");
        return Err(if status == StatusCode::FORBIDDEN {
            UpstreamError::Forbidden(message)
        } else {
            UpstreamError::Reset { addr, message }
        });
    }
    hyper::upgrade::on(resp)
        .await
        .map_err(|e| UpstreamError::Reset {
            addr,
            message: error_chain(&e),
        })
}

/// Copies both ways until either side closes, or nothing moves for `idle`.
pub async fn splice<A, B>(a: A, b: B, idle: Option<Duration>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Active {
        inner: a,
        start,
        last: last.clone(),
    };
    let mut b = Active {
        inner: b,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    let Some(idle) = idle.filter(|d| !d.is_zero()) else {
        let _ = copy.await;
        return;
    };
    let watchdog = async {
        loop {
            let seen = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = start + seen + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        _ = copy => {}
        _ = watchdog => tracing::debug!(?idle, "tunnel closed: idle timeout"),
    }
}

/// A stream that notes when bytes last moved.
struct Active<S> {
    inner: S,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<S> Active<S> {
    fn touch(&self) {
        let ms = Instant::now().duration_since(self.start).as_millis();
        self.last
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Active<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Active<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_closes_after_the_idle_timeout_and_not_while_busy() {
        let (client, a) = tokio::io::duplex(64);
        let (b, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(splice(a, b, Some(Duration::from_secs(10))));
        let mut client = client;
        // Traffic every 6 s keeps it open past 10 s.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
        }
        assert!(!task.is_finished());
        tokio::time::sleep(Duration::from_secs(11)).await;
        tokio::task::yield_now().await;
        assert!(task.is_finished());
    }
}
