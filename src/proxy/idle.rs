//! HTTP stream idle timeouts (App Mesh's `timeout.http.idle` on routes and listeners, 300 s by
//! default): a response body that yields nothing for that long is ended with an error, which
//! resets the stream downstream (HTTP/2 RST_STREAM, HTTP/1.1 a closed connection) instead of
//! holding a connection and a pool slot forever. Time waiting for the response head is the
//! per-request timeout's business.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::upstream::{Body, BoxError};
use prometheus_client::metrics::counter::Counter;

/// The error a body ends with when it stalls.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?} (the idle timeout)")]
pub struct IdleTimeout(pub Duration);

/// `body`, ended with [`IdleTimeout`] after `idle` without a frame (`None` or zero: no limit).
/// Each reset is counted on `resets`.
pub fn limit(body: Body, idle: Option<Duration>, resets: &Counter) -> Body {
    match idle.filter(|d| !d.is_zero()) {
        // An empty body has nothing to wait for.
        Some(idle) if !body.is_end_stream() => IdleBody {
            inner: body,
            idle,
            timer: None,
            stale: false,
            resets: resets.clone(),
        }
        .boxed(),
        _ => body,
    }
}

/// The timer is armed only when the body first makes its reader wait, and re-armed lazily
/// after frames: most bodies arrive whole with their head and never need one.
struct IdleBody {
    inner: Body,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// A frame came since the timer was armed.
    stale: bool,
    resets: Counter,
}

impl HttpBody for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Every field is Unpin (the timer is boxed).
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.stale = true;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let timer = match &mut this.timer {
                    Some(t) => {
                        if this.stale {
                            t.as_mut().reset(Instant::now() + this.idle);
                        }
                        t
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep(this.idle))),
                };
                this.stale = false;
                ready!(timer.as_mut().poll(cx));
                tracing::info!(idle = ?this.idle, "stream reset: idle timeout");
                this.resets.inc();
                Poll::Ready(Some(Err(IdleTimeout(this.idle).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    fn trickle(gaps_ms: &[u64]) -> Body {
        let gaps = gaps_ms.to_vec();
        let stream = futures_util::stream::unfold(gaps.into_iter(), |mut gaps| async move {
            let gap = gaps.next()?;
            tokio::time::sleep(Duration::from_millis(gap)).await;
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))),
                gaps,
            ))
        });
        StreamBody::new(stream).boxed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_flowing_is_not_cut_however_long_it_lasts() {
        let resets = Counter::default();
        let body = limit(trickle(&[900; 10]), Some(Duration::from_secs(1)), &resets);
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected.len(), 10);
        assert_eq!(resets.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_ends_with_the_idle_timeout_at_the_deadline() {
        let start = Instant::now();
        let resets = Counter::default();
        let mut body = limit(
            trickle(&[100, 100, 5_000]),
            Some(Duration::from_secs(1)),
            &resets,
        );
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.frame().await.unwrap().is_ok());
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<IdleTimeout>(), "{err}");
        assert_eq!(start.elapsed(), Duration::from_millis(1_200));
        assert_eq!(resets.get(), 1, "the reset is counted");
        // No limit: the slow frame arrives.
        let mut body = limit(trickle(&[5_000]), None, &resets);
        assert!(body.frame().await.unwrap().is_ok());
    }
}
