//! The process's side of running under a service manager: readiness, reload and stopping
//! announced over systemd's notify socket (`Type=notify`), the process log whose filter a
//! SIGHUP can change without a restart, and the signals that stop or reload a role.
//!
//! The notify protocol is a datagram of `KEY=VALUE` lines to the unix socket named by
//! `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); without the variable every
//! announcement is a no-op, so the same binary runs in a terminal, in tests and under systemd.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// The environment variable systemd names its notify socket in.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (e.g. `READY=1`) to the service manager, if there is one. Returns whether a
/// manager was told. Failures are logged, never fatal: a service must not die because its
/// manager stopped listening.
pub fn notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return false;
    };
    match notify_to(Path::new(&socket), state) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(socket = ?socket, error = %e, "cannot notify the service manager");
            false
        }
    }
}

/// Sends `state` to the notify socket at `socket` (`@name` is an abstract socket). Never
/// blocks: a manager whose queue is full loses the message rather than stall the caller.
pub fn notify_to(socket: &Path, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    #[cfg(target_os = "linux")]
    if let Some(name) = socket.as_os_str().as_encoded_bytes().strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
        return Ok(());
    }
    sock.send_to(state.as_bytes(), socket)?;
    Ok(())
}

/// The process log (stderr, which systemd hands to journald) with a filter that can be
/// replaced while running.
#[derive(Clone)]
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    /// Whether `RUST_LOG` set the filter: then it wins over config files, also on reload.
    from_env: bool,
}

/// A log filter that does not parse (`RUST_LOG` syntax).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadFilter(String);

impl Logging {
    /// Installs the process log with `filter` (`RUST_LOG` syntax; `RUST_LOG` in the
    /// environment overrides it). `TRELLIS_LOG_FORMAT=json` writes one JSON object per line,
    /// for log shippers. Returns `None` when a log is already installed (tests that start
    /// several roles in one process).
    pub fn init(filter: &str) -> Option<Self> {
        let env = std::env::var("RUST_LOG").ok();
        let from_env = env.is_some();
        let filter = env.unwrap_or_else(|| filter.to_string());
        let (filter, handle) = reload::Layer::new(EnvFilter::new(filter));
        let json = std::env::var("TRELLIS_LOG_FORMAT").as_deref() == Ok("json");
        let fmt = if json {
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(io::stderr)
                .boxed()
        } else {
            tracing_subscriber::fmt::layer()
                .with_writer(io::stderr)
                .boxed()
        };
        Registry::default()
            .with(filter)
            .with(fmt)
            .try_init()
            .ok()
            .map(|()| Self {
                filter: handle,
                from_env,
            })
    }

    /// Replaces the filter (a reload). `RUST_LOG`, when set, still wins; the old filter
    /// stays when the new one does not parse.
    pub fn set_filter(&self, filter: &str) -> Result<(), BadFilter> {
        if self.from_env {
            return Ok(());
        }
        let parsed =
            EnvFilter::try_new(filter).map_err(|e| BadFilter(format!("{filter:?}: {e}")))?;
        self.filter
            .reload(parsed)
            .map_err(|e| BadFilter(e.to_string()))
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, and tells the service manager the role is
/// stopping.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    notify("STOPPING=1");
}

/// SIGHUP, caught from the moment this is made: before it, a SIGHUP would end the process
/// (its default action), also while a control node waits minutes for its peers.
pub struct Reloads {
    hangups: Option<tokio::signal::unix::Signal>,
}

impl Reloads {
    /// Catches SIGHUP from now on (inside a runtime).
    pub fn catch() -> Self {
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        if let Err(e) = &hangups {
            tracing::warn!(error = %e, "cannot catch SIGHUP; reload needs a restart");
        }
        Self {
            hangups: hangups.ok(),
        }
    }

    /// Calls `reload` on every SIGHUP (also on those caught before this runs). Once `ready`
    /// says the role has told the service manager it is ready, each reload is bracketed by
    /// RELOADING=1 / READY=1; before that a reload is told nothing, so that it cannot pass
    /// for the first READY=1. Runs until the process ends.
    pub async fn run(mut self, ready: impl Fn() -> bool, mut reload: impl FnMut()) {
        let Some(hangups) = self.hangups.as_mut() else {
            return std::future::pending().await;
        };
        while hangups.recv().await.is_some() {
            let told = ready();
            if told {
                notify("RELOADING=1");
            }
            reload();
            if told {
                notify("READY=1");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        notify_to(&path, "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn notifies_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("trellis-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(Path::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        assert!(notify_to(&dir.path().join("nobody"), "READY=1").is_err());
    }
}

/// Unmaps this process's view of its own binary where it holds nothing of its own (its code,
/// and read-only data never relocated), so pages it no longer runs (argument parsing,
/// certificate issuance and config checks after startup; the request path after traffic
/// stops) stop counting in its resident set. The bytes stay in the page cache, shared with
/// every other trellis process, and what runs next is mapped again on its first fault. A
/// sidecar calls this once it is ready and again whenever it goes idle (`proxy::trim`): its
/// resident set then reflects what it is using. Returns the bytes unmapped.
/// The crate's one `unsafe` block: `madvise` takes a raw range.
#[allow(unsafe_code)]
pub fn release_code_pages() -> io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for (start, end) in clean_file_mappings(&smaps, &exe.to_string_lossy()) {
        // SAFETY: the range is a private, read-only mapping of the binary's file with no
        // anonymous (copied-on-write) page: every page is the file's bytes, and read-only
        // means none can become anything else. Relocated data (RELRO) has anonymous pages and
        // is never picked. Dropping the pages loses nothing: the next access maps the same
        // bytes from the file; threads running code in the range just fault.
        unsafe {
            rustix::mm::madvise(
                start as *mut std::ffi::c_void,
                end - start,
                rustix::mm::Advice::LinuxDontNeed,
            )?;
        }
        released += end - start;
    }
    Ok(released)
}

/// `(start, end)` of the read-only (`r--p`, `r-xp`) mappings of `path` without anonymous
/// pages, in a `/proc/<pid>/smaps` text.
fn clean_file_mappings(smaps: &str, path: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            // A mapping's header line: range, perms, offset, device, inode, path.
            let perms = fields.next();
            let file = fields.nth(3);
            current = (matches!(perms, Some("r--p" | "r-xp")) && file == Some(path))
                .then_some((start, end));
        } else if first == "Anonymous:"
            && let Some(range) = current.take()
            && fields.next() == Some("0")
        {
            found.push(range);
        }
    }
    found
}

#[cfg(test)]
mod code_tests {
    use super::*;

    #[test]
    fn only_the_binarys_read_only_pages_without_copies_are_picked() {
        let smaps = "\
5600a000-5600b000 r--p 00000000 fd:01 123 /usr/bin/trellis
Rss:                 100 kB
Anonymous:             0 kB
5600b000-5610b000 r-xp 00001000 fd:01 123 /usr/bin/trellis
Anonymous:             0 kB
5610b000-5611b000 r--p 00101000 fd:01 123 /usr/bin/trellis
Anonymous:            64 kB
5611b000-5611c000 rw-p 00111000 fd:01 123 /usr/bin/trellis
Anonymous:             0 kB
7f000000-7f100000 r-xp 00000000 fd:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f200000-7f300000 rw-p 00000000 00:00 0 
Anonymous:            12 kB
";
        assert_eq!(
            clean_file_mappings(smaps, "/usr/bin/trellis"),
            vec![(0x5600a000, 0x5600b000), (0x5600b000, 0x5610b000)]
        );
    }

    /// The process keeps running the code, and reading the constants, it just unmapped.
    #[test]
    fn code_still_runs_after_it_is_released() {
        let released = release_code_pages().unwrap();
        assert!(released > 0);
        let v: Vec<u64> = (0..1000).map(|i| i * 3).collect();
        assert_eq!(v.iter().sum::<u64>(), 1_498_500);
        assert_eq!(format!("{:?}", Some("text")), "Some(\"text\")");
    }
}
