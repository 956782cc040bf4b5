//! Data-plane shards, Envoy's worker threads: `--concurrency N` runs N single-threaded
//! runtimes, and each accepted connection lives its whole life on one of them, with that
//! shard's own state (its connection pools). A request never changes threads, so the request
//! path takes no cross-thread wakeups and the HTTP/2 connections to peers are driven on the
//! thread that uses them; routing, metrics and outlier records stay shared (atomics).
//!
//! Why not a work-stealing runtime: on the two-proxy benchmark it cost about 40 % more CPU
//! per request. Why more than one thread: a single one moved bursts through the pipeline as
//! a whole, so client, proxies and app took turns and the CPUs sat idle a quarter of the time.
//!
//! Shard 0 is the runtime the listeners run on; the others are threads of their own
//! ([`Workers`]). A connection goes to the shard with the fewest open connections.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::watch;

/// The shards a data plane serves connections on, each with its own `S`.
pub struct Shards<S> {
    shards: Arc<[Shard<S>]>,
}

impl<S> Clone for Shards<S> {
    fn clone(&self) -> Self {
        Self {
            shards: self.shards.clone(),
        }
    }
}

struct Shard<S> {
    /// `None` for shard 0: the runtime the caller runs on.
    handle: Option<Handle>,
    state: Arc<S>,
    open: Arc<AtomicUsize>,
}

impl<S: Send + Sync + 'static> Shards<S> {
    /// Shard 0 on the current runtime, then one per worker; `state` makes each its own.
    pub fn new(workers: &[Handle], mut state: impl FnMut() -> S) -> Self {
        let shards = std::iter::once(None)
            .chain(workers.iter().cloned().map(Some))
            .map(|handle| Shard {
                handle,
                state: Arc::new(state()),
                open: Arc::new(AtomicUsize::new(0)),
            })
            .collect();
        Self { shards }
    }

    /// Shard 0's state: for what is not per connection (config swaps, listeners).
    pub fn first(&self) -> &Arc<S> {
        &self.shards[0].state
    }

    /// Open connections per shard.
    pub fn open(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|s| s.open.load(Ordering::Relaxed))
            .collect()
    }

    /// Serves `tcp` on the shard with the fewest open connections: `serve` runs there, in a
    /// task of its own, with that shard's state. Must be called on shard 0's runtime.
    pub fn place<F, Fut>(&self, tcp: TcpStream, serve: F)
    where
        F: FnOnce(Arc<S>, TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(shard) = self
            .shards
            .iter()
            .min_by_key(|s| s.open.load(Ordering::Relaxed))
        else {
            return;
        };
        let open = OpenConnection::new(&shard.open);
        let state = shard.state.clone();
        let Some(handle) = &shard.handle else {
            tokio::spawn(async move {
                serve(state, tcp).await;
                drop(open);
            });
            return;
        };
        // A socket belongs to the reactor it was registered with: hand it over unregistered,
        // or every readiness event would still go through shard 0.
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "handing a connection to a shard");
                return;
            }
        };
        handle.spawn(async move {
            match TcpStream::from_std(std) {
                Ok(tcp) => serve(state, tcp).await,
                Err(e) => tracing::warn!(error = %e, "taking a connection on a shard"),
            }
            drop(open);
        });
    }
}

/// Counts a connection on its shard while it is open.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The threads that run shards 1.., each a single-threaded runtime; they stop, and the
/// connections still on them close, when this is dropped.
pub struct Workers {
    handles: Vec<Handle>,
    _stop: watch::Sender<()>,
}

impl Workers {
    /// Starts `n` worker threads (none for `n == 0`).
    pub fn start(n: usize) -> io::Result<Self> {
        let (stop, stopped) = watch::channel(());
        let mut handles = Vec::with_capacity(n);
        for i in 1..=n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || {
                    // Ends when the sender is dropped.
                    rt.block_on(async move { while stopped.changed().await.is_ok() {} });
                })?;
        }
        Ok(Self {
            handles,
            _stop: stop,
        })
    }

    /// The workers' runtimes, for [`Shards::new`].
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

/// How many shards a proxy runs when not told: one per CPU it may use, as Envoy.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Each connection is served on a thread of its own shard, spread evenly, and the open
    /// counts fall back when the connections close.
    #[tokio::test]
    async fn connections_spread_over_shards_and_are_served_there() {
        let workers = Workers::start(2).unwrap();
        let shards = Shards::new(workers.handles(), || ());
        assert_eq!(shards.open().len(), 3);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..6 {
            let client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel();
            shards.place(server, move |_, mut tcp| async move {
                let _ = tx.send(std::thread::current().id());
                let mut b = [0u8; 4];
                // Echo until the client closes: the socket works on the shard's reactor.
                while let Ok(n) = tcp.read(&mut b).await {
                    if n == 0 || tcp.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                }
            });
            threads.push(rx.await.unwrap());
            clients.push(client);
        }
        assert_eq!(shards.open(), vec![2, 2, 2]);
        let distinct: std::collections::HashSet<_> = threads.iter().collect();
        assert_eq!(distinct.len(), 3, "{threads:?}");
        for c in &mut clients {
            c.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            c.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"ping");
        }
        drop(clients);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while shards.open() != vec![0, 0, 0] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                shards.open()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
