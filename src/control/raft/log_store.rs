//! openraft's log storage on the `Store`: entries (in its log files) and the vote (in sled),
//! as JSON. Entries are fsynced before openraft is told they are durable, except a leader's
//! own normal entries, which go out to the followers while they sync ([`super::durable`]).
#![allow(clippy::result_large_err)] // openraft's StorageError is large; these are its own signatures.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::TypeConfig;
use super::durable::Durable;
use crate::control::store::{Store, index_span, keys};

#[derive(Clone)]
pub struct LogStore {
    store: Store,
    node_id: u64,
    /// The vote as last saved: whether an append is this node's own, as leader.
    vote: Arc<std::sync::Mutex<Option<Vote<u64>>>>,
    durable: Durable,
    /// The last entries appended, consecutive, so that replicating and applying what was just
    /// written reads no file and parses no JSON.
    recent: Arc<std::sync::Mutex<VecDeque<Entry<TypeConfig>>>>,
    /// The last commit index raft saved, for the node's metrics.
    committed: Arc<AtomicU64>,
}

/// How many recent entries the log store keeps parsed.
const RECENT: usize = 256;

impl LogStore {
    pub fn new(store: Store, node_id: u64, durable: Durable) -> Self {
        Self {
            store,
            node_id,
            vote: Arc::default(),
            durable,
            recent: Arc::default(),
            committed: Arc::default(),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry<TypeConfig>>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `entries`, just written, as the newest recent ones.
    fn remember(&self, entries: Vec<Entry<TypeConfig>>) {
        let consecutive = entries
            .windows(2)
            .all(|w| w[1].log_id.index == w[0].log_id.index + 1);
        let mut recent = self.recent();
        let follows = match (recent.back(), entries.first()) {
            (Some(back), Some(first)) => first.log_id.index == back.log_id.index + 1,
            _ => true,
        };
        if !consecutive || !follows {
            recent.clear();
        }
        if consecutive {
            recent.extend(entries);
            let over = recent.len().saturating_sub(RECENT);
            recent.drain(..over);
        }
    }

    /// The entries in `from..to`, if the recent ones hold all of them.
    fn recent_range(&self, from: u64, to: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let recent = self.recent();
        let first = recent.front()?.log_id.index;
        let last = recent.back()?.log_id.index;
        if from < first || to > last.saturating_add(1) {
            return None;
        }
        let skip = usize::try_from(from - first).ok()?;
        let take = usize::try_from(to.saturating_sub(from)).ok()?;
        Some(recent.iter().skip(skip).take(take).cloned().collect())
    }

    fn set_vote(&self, vote: Option<Vote<u64>>) {
        *self.vote.lock().unwrap_or_else(|e| e.into_inner()) = vote;
    }

    /// Whether `entries` are normal entries this node made as the leader it is now.
    fn own_normal_entries(&self, entries: &[Entry<TypeConfig>]) -> bool {
        let vote = *self.vote.lock().unwrap_or_else(|e| e.into_inner());
        vote.is_some_and(|v| leads(&v, self.node_id, entries))
    }

    fn last_log_id(&self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        match self
            .store
            .last_entry()
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            Some((_, bytes)) => {
                let e: Entry<TypeConfig> =
                    serde_json::from_slice(&bytes).map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(Some(e.log_id))
            }
            None => Ok(None),
        }
    }

    /// The commit index as last saved (0 before the first).
    pub fn committed(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError<u64>> {
        let bytes = self
            .store
            .get_meta(key)
            .map_err(|e| StorageIOError::read(&e))?;
        match bytes {
            Some(b) => Ok(Some(
                serde_json::from_slice(&b).map_err(|e| StorageIOError::read(&e))?,
            )),
            None => Ok(None),
        }
    }

    async fn write_meta<T: Serialize>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), StorageError<u64>> {
        let bytes = serde_json::to_vec(value).map_err(|e| StorageIOError::write(&e))?;
        self.store
            .put_meta(key, bytes)
            .await
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let (from, to) = index_span(&range);
        if let Some(entries) = self.recent_range(from, to) {
            return Ok(entries);
        }
        let raw = self
            .store
            .entries(range)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        raw.into_iter()
            .map(|(_, bytes)| {
                serde_json::from_slice(&bytes).map_err(|e| StorageIOError::read_logs(&e).into())
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let last_purged: Option<LogId<u64>> = self.read_meta(keys::LAST_PURGED)?;
        let last_entry = self.last_log_id()?;
        // Opening the log synced it: everything in it is on disk.
        if let Some(l) = last_entry {
            self.durable.synced(self.durable.generation(), l);
        }
        let last = last_entry.or(last_purged);
        // A purge past the end of the log leaves no entry behind its mark.
        let last = last.max(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        // Entries this node acknowledged early as leader must be on disk before it answers a
        // candidate or another leader with its log.
        self.store
            .sync_log()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.write_meta(keys::VOTE, vote).await?;
        self.set_vote(Some(*vote));
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        let mut vote: Option<Vote<u64>> = self.read_meta(keys::VOTE)?;
        // A node that led when it stopped must not lead that term again: entries it had
        // acknowledged early may have been lost with the machine, and a new entry would reuse
        // their log ids, which a follower holding the old ones would take as matching. So it
        // comes back as a candidate of that term and leads only after winning a new election.
        if let Some(v) = vote.as_mut()
            && v.committed
            && v.leader_id.node_id == self.node_id
        {
            *v = Vote::new(v.leader_id.term, self.node_id);
        }
        self.set_vote(vote);
        Ok(vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        // A hint for faster recovery, not needed for safety: a lost value only means openraft
        // re-derives the commit point after the next election. So no fsync per commit.
        if let Some(c) = committed {
            self.committed.store(c.index, Ordering::Relaxed);
        }
        // Recovery re-applies up to this hint without asking anyone: never past the disk.
        let committed = self.durable.clamp(committed);
        let bytes = serde_json::to_vec(&committed).map_err(|e| StorageIOError::write(&e))?;
        self.store
            .put_meta_lazy(keys::COMMITTED, bytes)
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        let committed = self
            .read_meta::<Option<LogId<u64>>>(keys::COMMITTED)?
            .flatten();
        if let Some(c) = committed {
            self.committed.store(c.index, Ordering::Relaxed);
        }
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let early = self.own_normal_entries(&entries);
        let mut batch = Vec::with_capacity(entries.len());
        for e in &entries {
            let bytes = serde_json::to_vec(e)
                .map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?;
            batch.push((e.log_id.index, bytes));
        }
        let durable = self.durable.clone();
        let generation = durable.generation();
        let synced = move |r: &Result<(), String>| match r {
            Ok(()) => durable.synced(generation, last),
            Err(e) => durable.failed(e.clone()),
        };
        if early {
            self.durable.acknowledged_early(last.index);
            self.store
                .append(batch, Box::new(move |r| synced(&r)))
                .map_err(|e| StorageIOError::write_logs(&e))?;
            self.remember(entries);
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        let res = self.store.append_synced(batch).map_err(|e| e.to_string());
        if res.is_ok() {
            self.remember(entries);
        }
        synced(&res);
        callback.log_io_completed(res.map_err(std::io::Error::other));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.recent().retain(|e| e.log_id.index < log_id.index);
        self.store
            .truncate_from(log_id.index)
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.durable.truncated(self.last_log_id()?);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mark = serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write(&e))?;
        self.recent().retain(|e| e.log_id.index > log_id.index);
        self.store
            .purge_upto(log_id.index, mark)
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// Whether `vote` makes `node` the leader that made all of `entries`, all of them normal: a
/// leader appends its own entries only, and another leader's never carry its id and term.
fn leads(vote: &Vote<u64>, node: u64, entries: &[Entry<TypeConfig>]) -> bool {
    vote.committed
        && vote.leader_id.node_id == node
        && entries.iter().all(|e| {
            e.log_id.leader_id == vote.leader_id && matches!(e.payload, EntryPayload::Normal(_))
        })
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Membership};

    use super::*;
    use crate::control::raft::Proposal;

    fn entry(
        term: u64,
        node: u64,
        index: u64,
        payload: EntryPayload<TypeConfig>,
    ) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, node), index),
            payload,
        }
    }

    fn normal(term: u64, node: u64, index: u64) -> Entry<TypeConfig> {
        entry(
            term,
            node,
            index,
            EntryPayload::Normal(Proposal(Arc::default())),
        )
    }

    #[tokio::test]
    async fn a_node_that_led_comes_back_a_candidate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut log = LogStore::new(store.clone(), 1, Durable::default());
        log.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        log.save_vote(&Vote::new_committed(4, 2)).await.unwrap();
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new_committed(4, 2))
        );
    }

    #[test]
    fn only_a_leaders_own_normal_entries_skip_the_wait() {
        let leader = Vote::new_committed(3, 1);
        assert!(leads(&leader, 1, &[normal(3, 1, 7), normal(3, 1, 8)]));
        // A follower of node 2, or node 1 before it won its election.
        assert!(!leads(&Vote::new_committed(3, 2), 1, &[normal(3, 2, 7)]));
        assert!(!leads(&Vote::new(3, 1), 1, &[normal(3, 1, 7)]));
        // Node 1's entries from an earlier term, sent back by a later leader.
        assert!(!leads(&Vote::new_committed(4, 2), 1, &[normal(3, 1, 7)]));
        assert!(!leads(&leader, 1, &[normal(2, 1, 6), normal(3, 1, 7)]));
        // Blank and membership entries are synced first.
        assert!(!leads(&leader, 1, &[entry(3, 1, 7, EntryPayload::Blank)]));
        let members = Membership::new(vec![std::collections::BTreeSet::from([1u64])], None);
        assert!(!leads(
            &leader,
            1,
            &[
                normal(3, 1, 7),
                entry(3, 1, 8, EntryPayload::Membership(members))
            ]
        ));
    }
}
