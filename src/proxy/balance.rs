//! Choosing where a request goes: one of a route's weighted targets (App Mesh's relative
//! weights; zero is allowed and never chosen; all zero means no target), then an endpoint of
//! that target (see `outlier`): round robin, or power of two choices over a peak-EWMA latency
//! estimate (Finagle's and Linkerd's balancer). Random numbers here only spread load
//! (xorshift, seeded per thread), never protect anything.

use std::cell::Cell;
use std::time::Duration;

use tokio::time::Instant;

/// How a target's endpoint is chosen (`trellis proxy --balancer`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balancer {
    /// Each host in turn (Envoy's and App Mesh's default).
    #[default]
    RoundRobin,
    /// The less loaded of two hosts drawn at random, load being the peak-EWMA latency times
    /// the requests in flight plus one: slow or busy hosts get less.
    P2cEwma,
}

/// How fast a latency estimate forgets (Linkerd's default decay).
const DECAY: Duration = Duration::from_secs(10);
/// The estimate of a host never measured: neither favoured over measured hosts nor shunned.
const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// A host's latency estimate: jumps up to any slower answer at once (peak), drifts down
/// exponentially with faster ones, and decays towards zero while the host gets no traffic,
/// so a host that was slow once is tried again.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    rtt_ns: f64,
    /// The last observation, or the estimate's creation: a host never measured decays from
    /// the default like any other, so a new host gets tried while its peers are busy.
    at: Instant,
    measured: bool,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self {
            rtt_ns: DEFAULT_RTT.as_nanos() as f64,
            at: Instant::now(),
            measured: false,
        }
    }
}

impl PeakEwma {
    fn weight(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_nanos() as f64;
        (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    fn decayed(&self, now: Instant) -> f64 {
        self.rtt_ns * self.weight(now)
    }

    /// A new answer: a slower one than the estimate replaces it; a faster one is averaged in,
    /// the old estimate keeping weight e^(-elapsed/decay). The first answer replaces the
    /// default.
    pub fn observe(&mut self, now: Instant, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let w = if self.measured { self.weight(now) } else { 0.0 };
        self.rtt_ns = if rtt > self.rtt_ns {
            rtt
        } else {
            self.rtt_ns * w + rtt * (1.0 - w)
        };
        self.at = now;
        self.measured = true;
    }

    /// The load of a host with `pending` requests in flight.
    pub fn cost(&self, now: Instant, pending: u32) -> f64 {
        self.decayed(now) * f64::from(pending + 1)
    }
}

/// Picks an index with probability proportional to its weight.
#[derive(Debug, Clone)]
pub struct WeightedPicker {
    /// Running sums of the weights.
    cumulative: Vec<u64>,
}

impl WeightedPicker {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let mut sum = 0u64;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                sum += u64::from(w);
                sum
            })
            .collect();
        Self { cumulative }
    }

    /// The index for the random number `r`; `None` when every weight is zero.
    pub fn pick_with(&self, r: u64) -> Option<usize> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let x = r % total;
        // The first running sum above x: zero weights never own a slot.
        Some(self.cumulative.partition_point(|&c| c <= x))
    }

    pub fn pick(&self) -> Option<usize> {
        self.pick_with(random_u64())
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let here = &t as *const u64 as u64;
    (t ^ here.rotate_left(32)) | 1
}

/// xorshift64*: fast and well spread, for load balancing only.
pub fn random_u64() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_80_20_split_holds_within_3_percent_over_10000_picks() {
        let p = WeightedPicker::new([80, 20]);
        let mut counts = [0u32; 2];
        for _ in 0..10_000 {
            counts[p.pick().unwrap()] += 1;
        }
        assert!((7_700..=8_300).contains(&counts[0]), "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_to_peaks_and_drifts_down() {
        let mut e = PeakEwma::default();
        let ms = |e: &PeakEwma| e.cost(Instant::now(), 0) / 1e6;
        e.observe(Instant::now(), Duration::from_millis(100));
        assert!((ms(&e) - 100.0).abs() < 0.01);
        // A faster answer right away barely moves it; one a decay later weighs 1 - 1/e.
        e.observe(Instant::now(), Duration::from_millis(10));
        assert!(ms(&e) > 99.0);
        tokio::time::advance(DECAY).await;
        e.observe(Instant::now(), Duration::from_millis(10));
        let expected = 100.0 / std::f64::consts::E + 10.0 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((ms(&e) - expected).abs() < 1.0, "{} vs {expected}", ms(&e));
        // Pending requests multiply the cost.
        assert!((e.cost(Instant::now(), 2) / e.cost(Instant::now(), 0) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn zero_weights_are_never_chosen_and_all_zero_is_none() {
        let p = WeightedPicker::new([0, 3, 0, 1, 0]);
        for r in 0..400 {
            let i = p.pick_with(r).unwrap();
            assert!(i == 1 || i == 3, "{i}");
        }
        assert_eq!(p.pick_with(0), Some(1));
        assert_eq!(p.pick_with(3), Some(3));
        assert_eq!(WeightedPicker::new([0, 0]).pick(), None);
        assert_eq!(WeightedPicker::new([]).pick(), None);
    }
}
