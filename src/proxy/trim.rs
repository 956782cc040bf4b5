//! Giving memory back when idle. A sidecar that has served nothing for a while calls a
//! release function once (the CLI passes `service::release_code_pages`: the binary's pages go
//! back to the page cache), so an idle proxy's resident set is what it holds of its own, not
//! the code its last burst of traffic faulted in. Envoy's periodic memory release is the same
//! idea for its allocator.
//!
//! Requests (and connections to a TCP route's VIP) mark activity with [`note_request`]: a
//! load, and a store only on the first request after each check, so the request path writes
//! nothing shared between shards while busy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Whether a request was served since the last check.
struct Activity(AtomicBool);

impl Activity {
    fn note(&self) {
        if !self.0.load(Ordering::Relaxed) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    fn take(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

static ACTIVITY: Activity = Activity(AtomicBool::new(false));

/// Marks that a request was served since the last idle check.
#[inline]
pub fn note_request() {
    ACTIVITY.note();
}

/// Checks per `idle` period: activity is looked at this often, and a release needs this many
/// quiet checks in a row after the one that saw the last request, so it comes between `idle`
/// and 5/4 of it after that request.
const CHECKS: u32 = 4;

/// Calls `release` once each time the proxy has served no request for `idle` (up to a
/// quarter more, see [`CHECKS`]); a request in between arms it again.
pub async fn run(idle: Duration, release: impl FnMut()) {
    watch(&ACTIVITY, idle, release).await
}

async fn watch(activity: &Activity, idle: Duration, mut release: impl FnMut()) {
    let every = idle / CHECKS;
    let mut quiet = 0;
    let mut released = false;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if activity.take() {
            quiet = 0;
            released = false;
            continue;
        }
        quiet += 1;
        if quiet >= CHECKS && !released {
            release();
            released = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// One release per quiet stretch: none while requests come (one every period), one about a
    /// period after the last, none more while it stays quiet, one again after the next
    /// busy-then-quiet stretch.
    #[tokio::test(start_paused = true)]
    async fn releases_once_per_quiet_stretch() {
        // A flag of its own: other tests in this binary serve requests.
        static OWN: Activity = Activity(AtomicBool::new(false));
        let note_request = || OWN.note();
        let released = Arc::new(AtomicUsize::new(0));
        let r = released.clone();
        let period = Duration::from_secs(10);
        tokio::spawn(watch(&OWN, period, move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        let count = || released.load(Ordering::SeqCst);
        // Checks fall every 2.5 s; requests come between them (at 1 s, 11 s, 21 s, 31 s).
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Busy: a request every 10 s.
        for _ in 0..4 {
            note_request();
            tokio::time::sleep(period).await;
        }
        // Now 41 s: the check at 32.5 s saw the request at 31 s; 35, 37.5 and 40 s were quiet.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(count(), 0, "released less than a period after a request");
        // The fourth quiet check (42.5 s) releases.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(count(), 1);
        tokio::time::sleep(period * 5).await;
        assert_eq!(count(), 1, "released again while nothing ran");
        // Busy again, then quiet: released once more.
        note_request();
        tokio::time::sleep(period + period / 2).await;
        assert_eq!(count(), 2);
    }
}
