//! openraft's log storage on the `Store`: entries (in its log files) and the vote (in sled),
//! as JSON, fsynced before openraft is told they are durable.
#![allow(clippy::result_large_err)] // openraft's StorageError is large; these are its own signatures.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::TypeConfig;
use crate::control::store::{Store, keys};

#[derive(Clone)]
pub struct LogStore {
    store: Store,
    /// The last commit index raft saved, for the node's metrics.
    committed: Arc<AtomicU64>,
}

impl LogStore {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            committed: Arc::default(),
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
        let last = match self
            .store
            .last_entry()
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            Some((_, bytes)) => {
                let e: Entry<TypeConfig> =
                    serde_json::from_slice(&bytes).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(e.log_id)
            }
            None => last_purged,
        };
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
        self.write_meta(keys::VOTE, vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        self.read_meta(keys::VOTE)
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
        let mut batch = Vec::new();
        for e in entries {
            let bytes = serde_json::to_vec(&e)
                .map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?;
            batch.push((e.log_id.index, bytes));
        }
        // openraft may treat the entries as durable only once the group commit has flushed them.
        let done: crate::control::store::OnDurable =
            Box::new(move |r| callback.log_io_completed(r.map_err(std::io::Error::other)));
        self.store
            .append(batch, done)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.store
            .truncate_from(log_id.index)
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mark = serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write(&e))?;
        self.store
            .purge_upto(log_id.index, mark)
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
