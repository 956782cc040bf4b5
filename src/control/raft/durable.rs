//! How far this node's raft log is on disk, and the rule that lets a leader send entries to
//! its followers while its own fsync runs (the Raft thesis, §10.2.1: "the leader can write to
//! its disk in parallel with replicating to the followers and them writing to their disks").
//!
//! openraft 0.9 waits until a leader's own append is flushed before it replicates the entries,
//! so the leader's fsync and the followers' round trip (with theirs) add up on every write.
//! So the log store tells openraft that a leader's own normal entries are flushed as soon as
//! they are written (they then survive the process, not yet the machine) and syncs them in
//! the background. openraft may then count them committed early, but nothing that makes a
//! commit visible happens before the leader's sync:
//! - the state machine applies such an entry (and so answers its writer, or a read that waits
//!   for it) only once it is synced ([`Durable::wait_applicable`]);
//! - followers learn a commit index no higher than what the leader has synced
//!   ([`Durable::clamp`] on every append-entries), so none applies an entry the leader could
//!   still lose;
//! - the commit hint kept for recovery is clamped the same way;
//! - before this node votes for or follows another, its log is synced (`save_vote`), so what it
//!   then reports as matching a new leader's log is on its disk.
//!
//! When any of that happens, an entry is on the leader's disk and on the disks of the followers
//! whose acknowledgements committed it: a majority, exactly as without the shortcut. Followers'
//! appends, and blank and membership entries, are still reported flushed only after the sync.

use std::sync::Arc;

use openraft::LogId;
use tokio::sync::watch;

/// The node's log durability, shared by its log store, state machine and network.
#[derive(Clone, Default)]
pub struct Durable(Arc<watch::Sender<State>>);

#[derive(Clone, Debug, Default)]
struct State {
    /// The last log id known to be on disk, with everything before it.
    synced: Option<LogId<u64>>,
    /// The last index openraft was told was flushed before it was.
    early: Option<u64>,
    /// Bumped by a truncation: syncs of appends made before it report nothing.
    generation: u64,
    /// A sync failed: nothing acknowledged early may ever be applied.
    failed: Option<String>,
}

impl Durable {
    pub fn generation(&self) -> u64 {
        self.0.borrow().generation
    }

    /// Entries up to `index` were reported flushed to openraft before their sync.
    pub fn acknowledged_early(&self, index: u64) {
        self.0.send_modify(|s| s.early = s.early.max(Some(index)));
    }

    /// The appends of `generation` up to `upto` are on disk.
    pub fn synced(&self, generation: u64, upto: LogId<u64>) {
        self.0.send_if_modified(|s| {
            let newer = s.synced.is_none_or(|l| l.index < upto.index);
            let take = s.generation == generation && newer;
            if take {
                s.synced = Some(upto);
            }
            take
        });
    }

    pub fn failed(&self, error: String) {
        self.0.send_modify(|s| s.failed = Some(error));
    }

    /// The log was cut back to `last`, and what is left of it synced.
    pub fn truncated(&self, last: Option<LogId<u64>>) {
        self.0.send_modify(|s| {
            s.generation += 1;
            s.synced = last;
            s.early = None;
        });
    }

    /// `commit`, lowered to what this node has on disk: the commit index a follower may learn.
    pub fn clamp(&self, commit: Option<LogId<u64>>) -> Option<LogId<u64>> {
        let synced = self.0.borrow().synced;
        match (commit, synced) {
            (Some(c), Some(s)) if s.index < c.index => Some(s),
            (Some(_), None) => None,
            (c, _) => c,
        }
    }

    /// Waits until the entry at `index` may be applied: it was never acknowledged early, or
    /// its sync is done. Fails if a sync failed.
    pub async fn wait_applicable(&self, index: u64) -> Result<(), String> {
        let mut rx = self.0.subscribe();
        let state = rx
            .wait_for(|s| s.failed.is_some() || applicable(s, index))
            .await
            .map_err(|_| "the log store is gone".to_string())?;
        match &state.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

fn applicable(s: &State, index: u64) -> bool {
    match s.early {
        None => true,
        Some(early) => s.synced.is_some_and(|l| l.index >= index.min(early)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openraft::CommittedLeaderId;

    use super::*;

    fn id(index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    async fn applicable_now(d: &Durable, index: u64) -> bool {
        tokio::time::timeout(Duration::from_millis(20), d.wait_applicable(index))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn an_early_entry_applies_only_once_synced() {
        let d = Durable::default();
        assert!(applicable_now(&d, 5).await, "nothing acknowledged early");
        d.synced(0, id(4));
        d.acknowledged_early(6);
        assert!(applicable_now(&d, 4).await);
        assert!(!applicable_now(&d, 5).await);
        let waiting = tokio::spawn({
            let d = d.clone();
            async move { d.wait_applicable(6).await }
        });
        d.synced(0, id(5));
        assert!(applicable_now(&d, 5).await);
        assert!(!applicable_now(&d, 6).await);
        d.synced(0, id(6));
        assert_eq!(waiting.await.ok(), Some(Ok(())));
        // Later entries came through the synced path: nothing to wait for.
        assert!(applicable_now(&d, 9).await);
    }

    #[tokio::test]
    async fn followers_learn_no_commit_past_the_synced_log() {
        let d = Durable::default();
        assert_eq!(d.clamp(Some(id(3))), None);
        assert_eq!(d.clamp(None), None);
        d.synced(0, id(3));
        assert_eq!(d.clamp(Some(id(2))), Some(id(2)));
        assert_eq!(d.clamp(Some(id(7))), Some(id(3)));
    }

    #[tokio::test]
    async fn a_sync_from_before_a_truncation_counts_for_nothing() {
        let d = Durable::default();
        let before = d.generation();
        d.acknowledged_early(8);
        d.truncated(Some(id(5)));
        d.synced(before, id(8));
        assert_eq!(d.clamp(Some(id(8))), Some(id(5)));
        assert!(
            applicable_now(&d, 8).await,
            "the truncation synced what is left"
        );
        d.acknowledged_early(7);
        assert!(!applicable_now(&d, 7).await);
        d.synced(d.generation(), id(7));
        assert!(applicable_now(&d, 7).await);
    }

    #[tokio::test]
    async fn a_failed_sync_fails_the_apply() {
        let d = Durable::default();
        d.acknowledged_early(2);
        d.failed("disk gone".into());
        assert_eq!(d.wait_applicable(2).await, Err("disk gone".to_string()));
    }
}
