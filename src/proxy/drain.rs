//! Stopping without cutting requests: every served connection holds a [`DrainWatch`]; a drain
//! tells each to finish (HTTP/1.1: after the request in progress; HTTP/2: GOAWAY, the streams
//! in flight complete) and waits until every watch is dropped, up to a deadline.
//!
//! hyper-util's `GracefulShutdown` is the same idea, but it only takes hyper's connections;
//! the inbound HTTP/2 server is the `h2` crate's (see `h2server`).

use std::fmt::Display;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// The served connections of one data plane; clones share them.
#[derive(Clone)]
pub struct Drain(Arc<watch::Sender<bool>>);

impl Default for Drain {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

/// A connection's place in the drain: the drain waits for it until it is dropped.
pub struct DrainWatch(watch::Receiver<bool>);

/// A look at whether the drain has moved since it was taken, without a lock or a waker.
pub struct DrainProbe(watch::Receiver<bool>);

impl DrainProbe {
    pub fn has_changed(&self) -> bool {
        // An error is the drain gone, which the watch's `started` reports too.
        self.0.has_changed().unwrap_or(true)
    }
}

impl DrainWatch {
    /// A probe that sees the drain start (or go) after this call.
    pub fn probe(&self) -> DrainProbe {
        DrainProbe(self.0.clone())
    }

    /// Resolves once the drain has started.
    pub async fn started(&mut self) {
        // An error is the drain itself gone: nothing waits any more, so finish too.
        let _ = self.0.wait_for(|draining| *draining).await;
    }

    /// [`started`](Self::started) without borrowing the watch, which can then be passed on
    /// while this is still waited on.
    pub fn until_started(&self) -> impl Future<Output = ()> + use<> {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|draining| *draining).await;
        }
    }

    /// Serves `conn` to its end; once draining starts, `finish` asks it to end gracefully.
    /// `conn` is polled first, so what it already holds (a request read before the drain)
    /// is under way before it is asked to finish.
    pub async fn serve<C, E>(mut self, conn: C, finish: impl FnOnce(Pin<&mut C>))
    where
        C: Future<Output = Result<(), E>>,
        E: Display,
    {
        let mut conn = pin!(conn);
        let ended = tokio::select! {
            biased;
            ended = conn.as_mut() => ended,
            () = self.started() => {
                finish(conn.as_mut());
                conn.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "connection");
        }
    }
}

impl Drain {
    /// A watch for a new connection; `None` once draining, when it should not be served.
    pub fn watch(&self) -> Option<DrainWatch> {
        let rx = self.0.subscribe();
        let draining = *rx.borrow();
        (!draining).then_some(DrainWatch(rx))
    }

    /// Serves `conn` to its end; once draining starts, `finish` asks it to end gracefully.
    pub async fn serve<C, E>(&self, conn: C, finish: impl FnOnce(Pin<&mut C>))
    where
        C: Future<Output = Result<(), E>>,
        E: Display,
    {
        if let Some(watch) = self.watch() {
            watch.serve(conn, finish).await;
        }
    }

    /// Asks every connection to finish and waits up to `within`; false when some were cut.
    pub async fn drain(&self, within: Duration) -> bool {
        self.0.send_replace(true);
        tokio::time::timeout(within, self.0.closed()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_waits_for_its_watches_and_refuses_new_ones() {
        let drain = Drain::default();
        let mut watch = drain.watch().unwrap();
        let draining = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drain(Duration::from_secs(5)).await }
        });
        watch.started().await;
        assert!(drain.watch().is_none(), "a new connection during a drain");
        assert!(!draining.is_finished());
        drop(watch);
        assert!(draining.await.unwrap());
        // A watch never dropped: the drain gives up at its deadline.
        let drain = Drain::default();
        let _held = drain.watch().unwrap();
        assert!(!drain.drain(Duration::from_millis(20)).await);
    }
}
