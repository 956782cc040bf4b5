//! Consensus for the control plane: openraft over the sled `Store`. This module is the only one
//! that sees openraft types; the rest of the control plane proposes `model::Command`s through
//! [`Consensus::write`] and reads the applied `model::MeshState` through [`Consensus::read`].
//!
//! Layout follows openraft's examples: `log_store` (the raft log on `Store`), `state_machine`
//! (applies commands, builds and installs snapshots), `network` (RPCs to peers).

mod log_store;
mod network;
mod proposer;
mod state_machine;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, watch};

use crate::control::store::Store;
use crate::model::{Command, MeshState, Outcome};

pub use state_machine::Applied;

openraft::declare_raft_types!(
    /// trellis's raft types: model commands in, App Mesh answers out.
    pub TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// One raft entry's payload: commands applied in order (see `proposer`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Proposal(pub Vec<Command>);

/// What applying one entry answered, one outcome per command (none for blank and membership
/// entries).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Response(pub Vec<Outcome>);

/// Why a write did not produce an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// No leader is known right now (an election is under way, or there is no quorum).
    #[error("no raft leader is available; retry shortly")]
    NoLeader,
    /// This node is not the leader; the leader is `leader` (forwarding comes with clustering).
    #[error("this node is not the raft leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("raft: {0}")]
    Fatal(String),
}

/// Why the consensus module could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid raft config: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("no leader elected within {0:?}")]
    NoLeader(Duration),
}

/// Tuning for the raft node.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub heartbeat_interval: Duration,
    pub election_timeout: (Duration, Duration),
    /// Build a snapshot (and compact the log) after this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, so a briefly lagging follower can catch up
    /// from the log instead of a whole snapshot.
    pub logs_kept_after_snapshot: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(150),
            election_timeout: (Duration::from_millis(500), Duration::from_millis(1000)),
            snapshot_every: 5000,
            logs_kept_after_snapshot: 1000,
        }
    }
}

/// A running raft member and its applied state.
#[derive(Clone)]
pub struct Consensus {
    node_id: u64,
    raft: Raft<TypeConfig>,
    applied: Arc<std::sync::RwLock<Applied>>,
    applied_index: watch::Receiver<u64>,
    proposals: mpsc::Sender<proposer::Pending>,
    proposer: tokio::task::AbortHandle,
}

// === impl Consensus ===

impl Consensus {
    /// Starts raft on `store`. A node whose store was never initialized bootstraps a one-voter
    /// cluster of itself (advertised at `addr`); a restarted node recovers from its snapshot and
    /// log. Returns once this node knows a leader.
    pub async fn start(
        node_id: u64,
        addr: &str,
        store: Store,
        settings: RaftSettings,
    ) -> Result<Self, StartError> {
        let config = Config {
            cluster_name: "trellis".into(),
            heartbeat_interval: settings.heartbeat_interval.as_millis() as u64,
            election_timeout_min: settings.election_timeout.0.as_millis() as u64,
            election_timeout_max: settings.election_timeout.1.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
            max_in_snapshot_log_to_keep: settings.logs_kept_after_snapshot,
            ..Default::default()
        };
        let config = Arc::new(
            config
                .validate()
                .map_err(|e| StartError::Config(e.to_string()))?,
        );
        let (sm, applied, applied_index) = state_machine::StateMachine::open(store.clone())
            .map_err(|e| StartError::Storage(e.to_string()))?;
        let log = log_store::LogStore::new(store);
        let raft = Raft::new(node_id, config, network::Network, log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if !raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?
        {
            let members = BTreeMap::from([(node_id, BasicNode::new(addr))]);
            raft.initialize(members)
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?;
        }
        let wait = Duration::from_secs(30);
        raft.wait(Some(wait))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map_err(|_| StartError::NoLeader(wait))?;
        let (proposals, rx) = mpsc::channel(4 * proposer::MAX_BATCH);
        let proposer = tokio::spawn(proposer::run(raft.clone(), rx)).abort_handle();
        Ok(Self {
            node_id,
            raft,
            applied,
            applied_index,
            proposals,
            proposer,
        })
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Proposes `cmd`, waits until it is committed and applied here, and returns its answer.
    pub async fn write(&self, cmd: Command) -> Result<Outcome, WriteError> {
        let (answer, rx) = oneshot::channel();
        let stopped = || WriteError::Fatal("raft is shutting down".into());
        self.proposals
            .send(proposer::Pending { cmd, answer })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Reads the applied state.
    pub fn read<T>(&self, f: impl FnOnce(&MeshState) -> T) -> T {
        let guard = self.applied.read().unwrap_or_else(|e| e.into_inner());
        f(&guard.state)
    }

    /// The index of the last applied log entry; changes whenever the state does.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied_index.clone()
    }

    /// Stops raft; the store stays consistent for the next start.
    pub async fn shutdown(&self) {
        self.proposer.abort();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::StorageError;
    use openraft::testing::{StoreBuilder, Suite};

    use super::log_store::LogStore;
    use super::state_machine::StateMachine;
    use super::*;
    use crate::control::store::keys;
    use crate::model::{Owner, Quotas, ResourceKey, Spec};

    struct SledBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
            let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
            let store = Store::open(dir.path()).map_err(|e| openraft::StorageIOError::write(&e))?;
            let (sm, _, _) = StateMachine::open(store.clone())
                .map_err(|e| openraft::StorageIOError::read(&e))?;
            Ok((dir, LogStore::new(store), sm))
        }
    }

    /// openraft's own conformance suite for log storage and state machines, on the sled store.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(SledBuilder).unwrap();
    }

    fn mesh(name: &str) -> Command {
        Command::Create {
            key: ResourceKey::mesh(name),
            spec: Spec::Mesh(Default::default()),
            tags: vec![],
            idempotency: None,
            uid: format!("uid-{name}"),
            owner: Owner {
                region: "us-east-1".into(),
                account: "000000000000".into(),
            },
            now: 1.0,
        }
    }

    /// Snapshots are built every `snapshot_every` entries, the log is compacted behind them,
    /// and a restarted node rebuilds the same state from snapshot plus log.
    #[tokio::test]
    async fn snapshots_compact_the_log_and_restore_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        let settings = RaftSettings {
            snapshot_every: 50,
            logs_kept_after_snapshot: 10,
            ..RaftSettings::default()
        };
        let quotas = Quotas {
            meshes: 1000,
            ..Quotas::default()
        };
        let before;
        {
            let store = Store::open(dir.path()).unwrap();
            let node = Consensus::start(1, "127.0.0.1:0", store.clone(), settings.clone())
                .await
                .unwrap();
            node.write(Command::SetQuotas(quotas.clone()))
                .await
                .unwrap()
                .unwrap();
            for i in 0..400 {
                node.write(mesh(&format!("m{i:03}")))
                    .await
                    .unwrap()
                    .unwrap();
            }
            let mut applied = node.applied_index();
            // Compaction runs in the background after the snapshot; wait for it.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while store.log_len() > 50 + 10 + 10 && std::time::Instant::now() < deadline {
                let _ = tokio::time::timeout(Duration::from_millis(100), applied.changed()).await;
            }
            assert!(
                store.get_meta(keys::SNAPSHOT).unwrap().is_some(),
                "a snapshot was persisted"
            );
            assert!(
                store.log_len() <= 70,
                "the log is compacted: {} entries",
                store.log_len()
            );
            assert!(
                store.entries(..=300).unwrap().is_empty(),
                "the log head was purged"
            );
            before = node.read(|s| s.snapshot().resources);
            node.shutdown().await;
        }
        let store = Store::open(dir.path()).unwrap();
        let node = Consensus::start(1, "127.0.0.1:0", store, settings)
            .await
            .unwrap();
        let after = node.read(|s| s.snapshot().resources);
        assert_eq!(after.len(), 400);
        assert_eq!(after, before);
        assert_eq!(node.read(|s| s.quotas().clone()), quotas);
        node.shutdown().await;
    }
}
