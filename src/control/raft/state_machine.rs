//! The raft state machine: applies committed `model::Command`s to the in-memory `MeshState` and
//! keeps it recoverable through snapshots persisted in the `Store` (openraft replays the log
//! after the snapshot on start). Readers share the state through an `RwLock`.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError,
    StorageIOError, StoredMembership,
};
use tokio::sync::watch;

use super::durable::Durable;
use super::{Response, TypeConfig};
use crate::control::store::{Store, StoreError};
use crate::model::MeshState;
use crate::model::state::StateSnapshot;

/// The applied state and the raft bookkeeping that goes with it.
#[derive(Debug, Default)]
pub struct Applied {
    pub last_applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, BasicNode>,
    pub state: MeshState,
}

pub struct StateMachine {
    /// This node: only entries it proposed as leader have a caller waiting for their answer.
    node_id: u64,
    store: Store,
    applied: Arc<RwLock<Applied>>,
    applied_tx: watch::Sender<u64>,
    snapshot_writer: SnapshotWriter,
    /// Entries the leader acknowledged before its sync apply only after it.
    durable: Durable,
}

/// Serializes snapshot writes: openraft builds snapshots on a task of their own while an
/// installed one may arrive, and the older must never overwrite the newer. Holds the last log
/// id of the stored snapshot, so the check needs no read of it.
type SnapshotWriter = Arc<tokio::sync::Mutex<Option<LogId<u64>>>>;

type Shared = (StateMachine, Arc<RwLock<Applied>>, watch::Receiver<u64>);

impl StateMachine {
    /// Opens the state machine, restoring the last persisted snapshot.
    pub fn open(node_id: u64, store: Store, durable: Durable) -> Result<Shared, StoreError> {
        let mut applied = Applied::default();
        let mut stored = None;
        if let Some(bytes) = store.get_snapshot()? {
            let (meta, data) = decode(&bytes).map_err(StoreError::Corrupt)?;
            let snap: StateSnapshot =
                serde_json::from_slice(&data).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            applied.last_applied = meta.last_log_id;
            stored = meta.last_log_id;
            applied.membership = meta.last_membership;
            applied.state = MeshState::from_snapshot(snap);
        }
        let index = applied.last_applied.map_or(0, |l| l.index);
        let (tx, rx) = watch::channel(index);
        let applied = Arc::new(RwLock::new(applied));
        Ok((
            StateMachine {
                node_id,
                store,
                applied: applied.clone(),
                applied_tx: tx,
                snapshot_writer: Arc::new(tokio::sync::Mutex::new(stored)),
                durable,
            },
            applied,
            rx,
        ))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stores `meta` + `data` as the snapshot unless the stored one is newer.
async fn persist(
    store: &Store,
    writer: &SnapshotWriter,
    meta: &SnapshotMeta<u64, BasicNode>,
    data: &[u8],
) -> Result<(), StorageError<u64>> {
    let err = |e: &dyn std::fmt::Display| {
        StorageIOError::write_snapshot(
            Some(meta.signature()),
            &std::io::Error::other(e.to_string()),
        )
    };
    let mut stored = writer.lock().await;
    if *stored > meta.last_log_id {
        return Ok(());
    }
    let bytes = encode(meta, data).map_err(|e| err(&e))?;
    store.put_snapshot(bytes).await.map_err(|e| err(&e))?;
    *stored = meta.last_log_id;
    Ok(())
}

/// A persisted snapshot: 8-byte big-endian length of the JSON meta, the meta, then the data.
fn encode(meta: &SnapshotMeta<u64, BasicNode>, data: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let m = serde_json::to_vec(meta)?;
    let mut out = Vec::with_capacity(8 + m.len() + data.len());
    out.extend_from_slice(&(m.len() as u64).to_be_bytes());
    out.extend_from_slice(&m);
    out.extend_from_slice(data);
    Ok(out)
}

fn decode(bytes: &[u8]) -> Result<(SnapshotMeta<u64, BasicNode>, Vec<u8>), String> {
    let len: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("snapshot header truncated")?;
    let len = u64::from_be_bytes(len) as usize;
    let end = 8usize
        .checked_add(len)
        .ok_or("snapshot meta length overflows")?;
    let meta = bytes.get(8..end).ok_or("snapshot meta truncated")?;
    let meta = serde_json::from_slice(meta).map_err(|e| e.to_string())?;
    Ok((meta, bytes[end..].to_vec()))
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let a = self.read();
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        if let Some(last) = entries.last() {
            self.durable
                .wait_applicable(last.log_id.index)
                .await
                .map_err(|e| StorageIOError::apply(last.log_id, &std::io::Error::other(e)))?;
        }
        let mut out = Vec::with_capacity(entries.len());
        let last = {
            let mut a = self.write();
            for entry in entries {
                a.last_applied = Some(entry.log_id);
                let r = match entry.payload {
                    EntryPayload::Blank => Vec::new(),
                    // Another leader's entry: the answer went to its caller there, so none is
                    // rendered here (a resource's description costs more than applying it).
                    EntryPayload::Normal(proposal)
                        if entry.log_id.leader_id.node_id != self.node_id =>
                    {
                        proposal
                            .0
                            .iter()
                            .map(|cmd| a.state.apply_unanswered(cmd))
                            .collect()
                    }
                    EntryPayload::Normal(proposal) => {
                        proposal.0.iter().map(|cmd| a.state.apply(cmd)).collect()
                    }
                    EntryPayload::Membership(m) => {
                        a.membership = StoredMembership::new(Some(entry.log_id), m);
                        Vec::new()
                    }
                };
                out.push(Response(r));
            }
            a.last_applied.map_or(0, |l| l.index)
        };
        self.applied_tx.send_replace(last);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            snapshot_writer: self.snapshot_writer.clone(),
            store: self.store.clone(),
            applied: self.applied.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        let snap: StateSnapshot = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        persist(&self.store, &self.snapshot_writer, meta, &data).await?;
        let index = {
            let mut a = self.write();
            a.last_applied = meta.last_log_id;
            a.membership = meta.last_membership.clone();
            let mut state = MeshState::from_snapshot(snap);
            state.continue_generation(&a.state);
            a.state = state;
            a.last_applied.map_or(0, |l| l.index)
        };
        self.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let bytes = self
            .store
            .get_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let Some(bytes) = bytes else { return Ok(None) };
        let (meta, data) = decode(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(None, &std::io::Error::other(e)))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// The nice value a snapshot is serialized at: about a tenth of a normal thread's CPU share
/// when they compete, all of an idle CPU otherwise.
const SNAPSHOT_NICE: i32 = 10;

pub struct SnapshotBuilder {
    store: Store,
    applied: Arc<RwLock<Applied>>,
    snapshot_writer: SnapshotWriter,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        // Copy under the lock, serialize outside it: apply() waits for the lock, not for JSON.
        let (meta, state) = {
            let a = self.applied.read().unwrap_or_else(|e| e.into_inner());
            let state = a.state.snapshot();
            let last = a.last_applied;
            let snapshot_id = match last {
                Some(l) => format!(
                    "{}-{}-{}",
                    l.leader_id,
                    l.index,
                    uuid::Uuid::new_v4().simple()
                ),
                None => format!("none-{}", uuid::Uuid::new_v4().simple()),
            };
            (
                SnapshotMeta {
                    last_log_id: last,
                    last_membership: a.membership.clone(),
                    snapshot_id,
                },
                state,
            )
        };
        // Off the runtime's workers, on a thread of its own at a lower CPU priority (RocksDB
        // runs its compactions so): a large mesh takes a second or more to write out, and the
        // write path (every node builds at about the same entry) must not wait behind it.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("raft-snapshot".into())
            .spawn(move || {
                // Best effort: where the nice value cannot change, it builds at the usual one.
                let _ = rustix::process::setpriority_process(None, SNAPSHOT_NICE);
                let _ = tx.send(serde_json::to_vec(&state));
            })
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let data = rx
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &std::io::Error::other(e)))?
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        persist(&self.store, &self.snapshot_writer, &meta, &data).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
