//! When to build a raft snapshot (and so compact the log): after `snapshot_every` applied
//! entries, or, on a state larger than that, after as many entries as the state held records at
//! the last snapshot.
//!
//! A snapshot writes the whole state, so its cost grows with the mesh; a fixed interval made a
//! large mesh pay it ever more often per write (100k virtual nodes: a second of CPU on every node
//! at once, every 20,000 writes). Tying the interval to the state's size, as Redis rewrites its
//! append-only file once it has grown by the size it had at the last rewrite, keeps the
//! snapshot's share of each write's cost constant, and the log about as long (in entries; an
//! entry may batch several commands) as the state has resources. openraft's own policy knows
//! only a fixed count, so the node runs with `SnapshotPolicy::Never` and this triggers the
//! builds.

/// Decides, from what the node has applied, when the next snapshot is due.
#[derive(Debug)]
pub struct Compaction {
    snapshot_every: u64,
    /// The log index of the last snapshot seen, and the records the state held then.
    last: Option<(u64, usize)>,
}

impl Compaction {
    pub fn new(snapshot_every: u64) -> Self {
        Self {
            snapshot_every,
            last: None,
        }
    }

    /// Whether a snapshot is due now that the node has applied up to `applied`, with its last
    /// snapshot at `snapshot` (0: none yet). `records` counts the state's resources; it is
    /// asked only when a snapshot appears (to remember its size).
    pub fn due(&mut self, applied: u64, snapshot: u64, records: impl FnOnce() -> usize) -> bool {
        let mut records = Some(records);
        let mut count = || records.take().map_or(0, |f| f());
        let at_last = match self.last {
            Some((index, at)) if index == snapshot => at,
            _ => {
                // A snapshot built, installed or restored since: the state now is its size,
                // give or take the entries applied since it was taken.
                let at = count();
                self.last = Some((snapshot, at));
                at
            }
        };
        let since = applied.saturating_sub(snapshot);
        since >= self.snapshot_every && since >= at_last as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_state_snapshots_every_fixed_interval() {
        let mut c = Compaction::new(100);
        assert!(!c.due(99, 0, || 10));
        assert!(c.due(100, 0, || panic!("counted once, at the first look")));
        assert!(!c.due(150, 100, || 20));
        assert!(c.due(200, 100, || panic!("the same snapshot")));
    }

    #[test]
    fn a_large_state_waits_for_as_many_entries_as_it_had_records() {
        let mut c = Compaction::new(100);
        // A mesh that grows by one record per write: the intervals double, so the total
        // snapshot work stays proportional to the writes.
        let mut snapshot = 0;
        let mut taken = vec![];
        for applied in 1..=3200u64 {
            if c.due(applied, snapshot, || snapshot as usize) {
                snapshot = applied;
                taken.push(applied);
            }
        }
        assert_eq!(taken, vec![100, 200, 400, 800, 1600, 3200]);
    }

    #[test]
    fn the_fixed_interval_is_the_floor() {
        let mut c = Compaction::new(1000);
        assert!(!c.due(500, 0, || 10));
        assert!(!c.due(1999, 1000, || 400));
        assert!(c.due(2000, 1000, || 0));
    }
}
