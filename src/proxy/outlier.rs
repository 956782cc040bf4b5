//! The endpoints of one target (virtual node, port) as a caller sees them: round robin (or, as
//! an option, power of two choices over peak-EWMA latency, see `balance`) over those not
//! ejected, and App Mesh's outlier detection (Envoy's consecutive-5xx): after
//! `maxServerErrors` server errors in a row a host is ejected for `baseEjectionDuration` times
//! the number of times it has been ejected; at most `maxEjectionPercent` of the hosts are out
//! at once, though at least one may always be ejected. An ejected host comes back when its time
//! is up, checked at the next `interval`. Per-host state outlives config swaps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use super::balance::{Balancer, PeakEwma, random_u64};
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
    /// Requests sent to the host and not answered yet.
    in_flight: AtomicU32,
    latency: Mutex<PeakEwma>,
}

/// A host chosen for one attempt. It counts as in flight on the host until dropped; hand it
/// back with [`EndpointSet::record`] so its latency and outcome count.
#[derive(Debug)]
pub struct Picked {
    pub addr: SocketAddr,
    host: Arc<HostState>,
    started: Instant,
}

impl Picked {
    fn new(addr: SocketAddr, host: &Arc<HostState>, now: Instant) -> Self {
        host.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            addr,
            host: host.clone(),
            started: now,
        }
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.host.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
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
    balancer: Balancer,
    ejections: Counter,
}

/// One host as `/clusters` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostView {
    pub address: SocketAddr,
    pub ejected: bool,
    pub times_ejected: u32,
    pub consecutive_server_errors: u32,
    pub active_requests: u32,
}

impl EndpointSet {
    /// `previous` carries each host's record across a config swap.
    pub fn new(
        addrs: impl IntoIterator<Item = SocketAddr>,
        outlier: Option<OutlierSettings>,
        balancer: Balancer,
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
            balancer,
            ejections: Counter::default(),
        }
    }

    /// Ejections are also counted on `counter` (the target's metric).
    pub fn counting_ejections(mut self, counter: Counter) -> Self {
        self.ejections = counter;
        self
    }

    /// Each host's state now.
    pub fn view(&self) -> Vec<HostView> {
        let now = Instant::now();
        self.hosts
            .iter()
            .map(|(addr, h)| HostView {
                address: *addr,
                ejected: self.ejected(h, now),
                times_ejected: h.ejection.lock().unwrap_or_else(|e| e.into_inner()).times,
                consecutive_server_errors: h.consecutive_errors.load(Ordering::Relaxed),
                active_requests: h.in_flight.load(Ordering::Relaxed),
            })
            .collect()
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

    /// A host that is not ejected, avoiding `avoid` (a retry's previous host) when another is
    /// available: the next in turn, or with P2C the less loaded of two chosen at random.
    pub fn pick(&self, avoid: Option<SocketAddr>) -> Option<Picked> {
        let n = self.hosts.len();
        if n == 0 {
            return None;
        }
        let now = Instant::now();
        let usable = |k: usize| {
            let (addr, host) = &self.hosts[k];
            Some(*addr) != avoid && !self.ejected(host, now)
        };
        let chosen = match self.balancer {
            Balancer::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&k| usable(k))
            }
            Balancer::P2cEwma => self.two_choices(n, usable, now),
        };
        let k = match chosen {
            Some(k) => k,
            // Only the host to avoid is left (or nothing): a retry goes back to it.
            None => self
                .hosts
                .iter()
                .position(|(a, h)| Some(*a) == avoid && !self.ejected(h, now))?,
        };
        let (addr, host) = &self.hosts[k];
        Some(Picked::new(*addr, host, now))
    }

    /// Two distinct usable hosts at random; the one whose latency estimate times its requests
    /// in flight (plus one) is lower. Allocation-free: hosts are few, so it counts the usable
    /// ones and walks to the chosen ordinals.
    fn two_choices(&self, n: usize, usable: impl Fn(usize) -> bool, now: Instant) -> Option<usize> {
        let count = (0..n).filter(|&k| usable(k)).count();
        let nth = |i: usize| (0..n).filter(|&k| usable(k)).nth(i);
        match count {
            0 => None,
            1 => nth(0),
            _ => {
                let r = random_u64();
                let i = (r % count as u64) as usize;
                let mut j = ((r >> 32) % (count as u64 - 1)) as usize;
                if j >= i {
                    j += 1;
                }
                let (a, b) = (nth(i)?, nth(j)?);
                let cost = |k: usize| {
                    let host = &self.hosts[k].1;
                    let pending = host.in_flight.load(Ordering::Relaxed);
                    let latency = host.latency.lock().unwrap_or_else(|e| e.into_inner());
                    latency.cost(now, pending)
                };
                Some(if cost(b) < cost(a) { b } else { a })
            }
        }
    }

    /// Takes back a picked host: its latency feeds the estimate (P2C only), its outcome
    /// outlier detection.
    pub fn record(&self, picked: Picked, server_error: bool) {
        if self.balancer == Balancer::P2cEwma {
            let now = Instant::now();
            picked
                .host
                .latency
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe(now, now.duration_since(picked.started));
        }
        self.record_outcome(&picked.host, picked.addr, server_error);
    }

    /// Records an attempt's result on `host` for outlier detection.
    fn record_outcome(&self, host: &HostState, addr: SocketAddr, server_error: bool) {
        let Some(o) = self.outlier else { return };
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
            self.ejections.inc();
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

    /// An attempt's outcome on `addr`, without a pick.
    fn outcome(set: &EndpointSet, addr: SocketAddr, server_error: bool) {
        let (_, host) = set.hosts.iter().find(|(a, _)| *a == addr).unwrap();
        set.record_outcome(host, addr, server_error);
    }

    fn picks(set: &EndpointSet, n: usize) -> Vec<SocketAddr> {
        (0..n)
            .filter_map(|_| set.pick(None).map(|p| p.addr))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_errors_eject_for_base_times_ejections() {
        let a = addrs(3);
        let set = EndpointSet::new(a.clone(), settings(50), Balancer::RoundRobin, None);
        for _ in 0..2 {
            outcome(&set, a[0], true);
        }
        // A success in between resets the count.
        outcome(&set, a[0], false);
        outcome(&set, a[0], true);
        outcome(&set, a[0], true);
        assert!(picks(&set, 9).contains(&a[0]));
        outcome(&set, a[0], true);
        assert!(!picks(&set, 9).contains(&a[0]));
        // 30 s out, back at the 30 s tick.
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!picks(&set, 9).contains(&a[0]));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(picks(&set, 9).contains(&a[0]));
        // The second ejection lasts twice as long.
        for _ in 0..3 {
            outcome(&set, a[0], true);
        }
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!picks(&set, 9).contains(&a[0]));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(picks(&set, 9).contains(&a[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_stop_at_the_percentage_but_one_is_always_allowed() {
        let a = addrs(4);
        let set = EndpointSet::new(a.clone(), settings(10), Balancer::RoundRobin, None);
        for h in &a {
            for _ in 0..3 {
                outcome(&set, *h, true);
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
            Balancer::RoundRobin,
            None,
        );
        outcome(&set, a[1], true);
        tokio::time::advance(Duration::from_secs(19)).await;
        assert_eq!(picks(&set, 4), vec![a[0]; 4]);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(picks(&set, 4).contains(&a[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn state_survives_a_config_swap_and_retries_avoid_the_last_host() {
        let a = addrs(3);
        let old = EndpointSet::new(a.clone(), settings(100), Balancer::RoundRobin, None);
        for _ in 0..3 {
            outcome(&old, a[2], true);
        }
        let new = EndpointSet::new(a.clone(), settings(100), Balancer::RoundRobin, Some(&old));
        assert!(!picks(&new, 9).contains(&a[2]));
        for _ in 0..10 {
            assert_ne!(new.pick(Some(a[0])).unwrap().addr, a[0]);
        }
        // With one host left, a retry goes back to it.
        let one = EndpointSet::new([a[0]], None, Balancer::RoundRobin, None);
        assert_eq!(one.pick(Some(a[0])).unwrap().addr, a[0]);
    }

    fn serve(set: &EndpointSet, slow: SocketAddr, n: usize) -> usize {
        let mut to_slow = 0;
        for _ in 0..n {
            let p = set.pick(None).unwrap();
            let rtt = if p.addr == slow { 200 } else { 2 };
            to_slow += usize::from(p.addr == slow);
            // The clock stands still between pick and record, so feed the latency by hand.
            p.host
                .latency
                .lock()
                .unwrap()
                .observe(Instant::now(), Duration::from_millis(rtt));
            outcome(set, p.addr, false);
        }
        to_slow
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_over_ewma_sends_little_to_a_slow_host_and_probes_it_again_later() {
        let a = addrs(3);
        let set = EndpointSet::new(a.clone(), None, Balancer::P2cEwma, None);
        // Until the slow host has shown itself it gets its share; after that, only the
        // rounds where it is drawn against nothing faster than itself (never, with three).
        serve(&set, a[0], 30);
        let later = serve(&set, a[0], 300);
        assert!(later <= 3, "the slow host got {later} of 300");
        // Unpicked, its estimate decays (tau 10 s), so it is tried again.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(serve(&set, a[0], 30) > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_the_host_with_fewer_requests_in_flight() {
        let a = addrs(2);
        let set = EndpointSet::new(a.clone(), None, Balancer::P2cEwma, None);
        // Equal latency: the host with requests outstanding loses every draw.
        let busy: Vec<Picked> = (0..3)
            .map(|_| Picked::new(a[1], &set.hosts[1].1, Instant::now()))
            .collect();
        for _ in 0..20 {
            assert_eq!(set.pick(None).unwrap().addr, a[0]);
        }
        drop(busy);
        assert_eq!(set.hosts[1].1.in_flight.load(Ordering::Relaxed), 0);
    }
}
