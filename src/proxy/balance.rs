//! Choosing where a request goes: one of a route's weighted targets (App Mesh's relative
//! weights; zero is allowed and never chosen; all zero means no target), then an endpoint of
//! that target (see `outlier`). Random numbers here only spread load (xorshift, seeded per
//! thread), never protect anything.

use std::cell::Cell;

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
