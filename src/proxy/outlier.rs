//! The endpoints of one target (virtual node, port) as a caller sees them: round robin over
//! those not ejected, and App Mesh's outlier detection (Envoy's consecutive-5xx): after
//! `maxServerErrors` server errors in a row a host is ejected for `baseEjectionDuration` times
//! the number of times it has been ejected; at most `maxEjectionPercent` of the hosts are out
//! at once, though at least one may always be ejected. An ejected host comes back when its time
//! is up, checked at the next `interval`. Per-host state outlives config swaps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::model::compile::millis;
use crate::model::shapes::OutlierDetection;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierSettings {
    pub max_server_errors: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl From<&OutlierDetection> for OutlierSettings {
    fn from(o: &OutlierDetection) -> Self {
        Self {
            max_server_errors: u32::try_from(o.max_server_errors)
                .unwrap_or(u32::MAX)
                .max(1),
            interval: Duration::from_millis(millis(&o.interval)),
            base_ejection: Duration::from_millis(millis(&o.base_ejection_duration)),
            max_ejection_percent: u32::try_from(o.max_ejection_percent).unwrap_or(100),
        }
    }
}

/// One host's record.
#[derive(Debug, Default)]
pub struct HostState {
    consecutive_errors: AtomicU32,
    ejection: Mutex<Ejection>,
}

#[derive(Debug, Default)]
struct Ejection {
    since: Option<Instant>,
    times: u32,
}

/// The hosts of one target.
pub struct EndpointSet {
    hosts: Vec<(SocketAddr, Arc<HostState>)>,
    next: AtomicUsize,
    outlier: Option<OutlierSettings>,
}

impl EndpointSet {
    /// `previous` carries each host's record across a config swap.
    pub fn new(
        addrs: impl IntoIterator<Item = SocketAddr>,
        outlier: Option<OutlierSettings>,
        previous: Option<&EndpointSet>,
    ) -> Self {
        let old: HashMap<SocketAddr, Arc<HostState>> = previous
            .map(|p| p.hosts.iter().cloned().collect())
            .unwrap_or_default();
        Self {
            hosts: addrs
                .into_iter()
                .map(|a| (a, old.get(&a).cloned().unwrap_or_default()))
                .collect(),
            next: AtomicUsize::new(0),
            outlier,
        }
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    fn ejected(&self, host: &HostState, now: Instant) -> bool {
        let Some(o) = self.outlier else { return false };
        let mut e = host.ejection.lock().unwrap_or_else(|e| e.into_inner());
        let Some(since) = e.since else { return false };
        // Back at the first interval tick after the ejection time is up.
        let out_for = o.base_ejection * e.times;
        let ticks = if o.interval.is_zero() {
            out_for
        } else {
            let n = out_for.as_nanos().div_ceil(o.interval.as_nanos()).max(1);
            o.interval * u32::try_from(n).unwrap_or(u32::MAX)
        };
        if now.duration_since(since) >= ticks {
            e.since = None;
            host.consecutive_errors.store(0, Ordering::Relaxed);
            false
        } else {
            true
        }
    }

    /// The next host in turn that is not ejected, avoiding `avoid` (a retry's previous host)
    /// when another is available.
    pub fn pick(&self, avoid: Option<SocketAddr>) -> Option<SocketAddr> {
        let n = self.hosts.len();
        if n == 0 {
            return None;
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for k in 0..n {
            let (addr, host) = &self.hosts[(start + k) % n];
            if self.ejected(host, now) {
                continue;
            }
            if Some(*addr) == avoid {
                fallback = Some(*addr);
                continue;
            }
            return Some(*addr);
        }
        fallback
    }

    /// Records an attempt's result on `addr`.
    pub fn record(&self, addr: SocketAddr, server_error: bool) {
        let Some(o) = self.outlier else { return };
        let Some((_, host)) = self.hosts.iter().find(|(a, _)| *a == addr) else {
            return;
        };
        if !server_error {
            host.consecutive_errors.store(0, Ordering::Relaxed);
            return;
        }
        let errors = host.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
        if errors < o.max_server_errors {
            return;
        }
        let now = Instant::now();
        let out = self
            .hosts
            .iter()
            .filter(|(_, h)| self.ejected(h, now))
            .count();
        let cap = (self.hosts.len() * o.max_ejection_percent as usize / 100).max(1);
        if out >= cap {
            return;
        }
        let mut e = host.ejection.lock().unwrap_or_else(|e| e.into_inner());
        if e.since.is_none() {
            e.since = Some(now);
            e.times += 1;
            tracing::info!(%addr, times = e.times, "host ejected (outlier detection)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([127, 0, 0, i], 15000)))
            .collect()
    }

    fn settings(percent: u32) -> Option<OutlierSettings> {
        Some(OutlierSettings {
            max_server_errors: 3,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: percent,
        })
    }

    fn picks(set: &EndpointSet, n: usize) -> Vec<SocketAddr> {
        (0..n).filter_map(|_| set.pick(None)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_errors_eject_for_base_times_ejections() {
        let a = addrs(3);
        let set = EndpointSet::new(a.clone(), settings(50), None);
        for _ in 0..2 {
            set.record(a[0], true);
        }
        // A success in between resets the count.
        set.record(a[0], false);
        set.record(a[0], true);
        set.record(a[0], true);
        assert!(picks(&set, 9).contains(&a[0]));
        set.record(a[0], true);
        assert!(!picks(&set, 9).contains(&a[0]));
        // 30 s out, back at the 30 s tick.
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!picks(&set, 9).contains(&a[0]));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(picks(&set, 9).contains(&a[0]));
        // The second ejection lasts twice as long.
        for _ in 0..3 {
            set.record(a[0], true);
        }
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!picks(&set, 9).contains(&a[0]));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(picks(&set, 9).contains(&a[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_stop_at_the_percentage_but_one_is_always_allowed() {
        let a = addrs(4);
        let set = EndpointSet::new(a.clone(), settings(10), None);
        for h in &a {
            for _ in 0..3 {
                set.record(*h, true);
            }
        }
        // 10 % of 4 rounds to 0; one host may still go.
        let seen: std::collections::BTreeSet<_> = picks(&set, 20).into_iter().collect();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(!seen.contains(&a[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn the_ejection_ends_at_an_interval_tick() {
        let a = addrs(2);
        let set = EndpointSet::new(
            a.clone(),
            Some(OutlierSettings {
                max_server_errors: 1,
                interval: Duration::from_secs(10),
                base_ejection: Duration::from_secs(15),
                max_ejection_percent: 100,
            }),
            None,
        );
        set.record(a[1], true);
        tokio::time::advance(Duration::from_secs(19)).await;
        assert_eq!(picks(&set, 4), vec![a[0]; 4]);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(picks(&set, 4).contains(&a[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn state_survives_a_config_swap_and_retries_avoid_the_last_host() {
        let a = addrs(3);
        let old = EndpointSet::new(a.clone(), settings(100), None);
        for _ in 0..3 {
            old.record(a[2], true);
        }
        let new = EndpointSet::new(a.clone(), settings(100), Some(&old));
        assert!(!picks(&new, 9).contains(&a[2]));
        for _ in 0..10 {
            assert_ne!(new.pick(Some(a[0])), Some(a[0]));
        }
        // With one host left, a retry goes back to it.
        let one = EndpointSet::new([a[0]], None, None);
        assert_eq!(one.pick(Some(a[0])), Some(a[0]));
    }
}
