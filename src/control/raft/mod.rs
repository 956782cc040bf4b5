//! Consensus for the control plane: openraft over the sled `Store`. This module is the only one
//! that sees openraft types; the rest of the control plane proposes `model::Command`s through
//! [`Consensus::write`] and reads the applied `model::MeshState` through [`Consensus::read`].
//!
//! Layout follows openraft's examples: `log_store` (the raft log on `Store`), `state_machine`
//! (applies commands, builds and installs snapshots), `network` (RPCs to peers); `compaction`
//! says when to snapshot, `outrun` cuts the tail of election times.

mod autopilot;
mod compaction;
mod durable;
mod forming;
mod log_store;
mod network;
mod outrun;
mod peers;
mod proposer;
mod service;
mod state_machine;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::control::store::Store;
use crate::model::{Command, MeshState, Outcome};

pub use autopilot::Autopilot;
pub use network::Faults;
pub use peers::PeerTls;
pub use service::ClusterService;
pub use state_machine::Applied;

use peers::{Peers, Rpc};

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

/// One raft entry's payload: commands applied in order (see `proposer`). Shared, so the log
/// store's copies of recent entries cost no deep clone.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Proposal(pub Arc<Vec<Command>>);

/// What applying one entry answered, one outcome per command (none for blank and membership
/// entries).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Response(pub Vec<Outcome>);

/// Why a write (or a linearizable read) did not produce an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// No leader is known right now (an election is under way, or there is no quorum).
    #[error(
        "no raft leader is available (an election is under way or there is no quorum); retry shortly"
    )]
    NoLeader,
    /// This node is not the leader; the leader is `leader`.
    #[error("this node is not the raft leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// The leader took the write but did not answer: it may or may not have been applied.
    #[error(
        "the raft leader did not answer ({0}); the write may have been applied; retry with the same clientToken"
    )]
    Unknown(String),
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
    /// Build a snapshot (and compact the log) after this many applied entries, or after as many
    /// as the state had records at the last one, where that is more (see `compaction`).
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, so a briefly lagging follower can catch up
    /// from the log instead of a whole snapshot.
    pub logs_kept_after_snapshot: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            // openraft 0.9 starts an election only after its leader lease
            // (election_timeout_max) plus this node's randomized timeout have passed without a
            // heartbeat, so 300–600 ms detects a dead leader in 0.9–1.2 s while heartbeats
            // would have to stall for 0.9 s to set off a needless one.
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
            snapshot_every: 20_000,
            logs_kept_after_snapshot: 1000,
        }
    }
}

/// How this node comes to belong to a cluster.
#[derive(Debug, Clone, Default)]
pub struct Membership {
    /// Voters to wait for before forming a new cluster (1: this node alone).
    pub bootstrap_expect: usize,
    /// Peers' gRPC addresses to find at start, to form a cluster with or to join.
    pub retry_join: Vec<String>,
    /// A one-off join through this peer (`trellis control --join`).
    pub join: Option<String>,
}

impl Membership {
    /// Whether this node forms or joins a cluster (rather than bootstrapping alone).
    pub fn clustered(&self) -> bool {
        self.bootstrap_expect > 1 || !self.retry_join.is_empty() || self.join.is_some()
    }
}

/// A node asks to join: its id and the address of its gRPC listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub node_id: u64,
    pub addr: String,
}

/// What a node says about itself (`Hello`, and the rows of `trellis members`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: u64,
    pub addr: String,
    /// `leader`, `follower`, `candidate` or `learner`.
    pub state: String,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    /// The last entry this node knows committed (older nodes do not say: 0).
    #[serde(default)]
    pub committed_index: u64,
    /// The last entry of this node's latest snapshot (built here or installed from the
    /// leader).
    pub snapshot_index: u64,
    /// Entries up to here are gone from this node's log (compacted behind a snapshot).
    pub purged_index: u64,
    pub leader: Option<u64>,
    /// When this node last became leader (Unix ms; 0: never).
    pub leader_since_ms: u64,
    /// The cluster as this node knows it: id → (address, voter); empty before it belongs to
    /// one.
    pub members: BTreeMap<u64, (String, bool)>,
}

/// One row of `trellis members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    pub addr: String,
    /// `leader`, `voter` or `learner`.
    pub role: String,
    /// The term the member reports (none when it did not answer).
    pub term: Option<u64>,
    pub last_log_index: Option<u64>,
    /// Entries behind the leader's last log index.
    pub lag: Option<u64>,
    /// `healthy` (answered), `unreachable`, or `lagging` (answered, far behind).
    pub health: String,
}

/// A running raft member and its applied state.
#[derive(Clone)]
pub struct Consensus {
    node_id: u64,
    addr: String,
    raft: Raft<TypeConfig>,
    applied: Arc<std::sync::RwLock<Applied>>,
    applied_index: watch::Receiver<u64>,
    proposals: mpsc::Sender<proposer::Pending>,
    proposer: tokio::task::AbortHandle,
    peers: Peers,
    faults: Faults,
    /// When this node last became leader (Unix ms; 0: never), for election timings.
    leader_since: Arc<std::sync::atomic::AtomicU64>,
    /// The commit index as raft last saved it (`LogStore::save_committed`).
    committed: Arc<std::sync::atomic::AtomicU64>,
    /// When an AppendEntries or snapshot chunk last came: whether this node still hears a
    /// leader.
    contact: Arc<outrun::Contact>,
}

/// How long a write or read waits for a leader before answering 503.
const LEADER_WAIT: Duration = Duration::from_secs(5);
/// Calls to the leader on a client's behalf.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

// === impl Consensus ===

impl Consensus {
    /// Starts raft on `store`. A node whose store was never initialized and that is not
    /// `clustered` bootstraps a one-voter cluster of itself (advertised at `addr`) and returns
    /// once it leads; a restarted node recovers from its snapshot and log. A clustered node
    /// returns at once: serve its `Cluster` service, then call [`Consensus::form`].
    pub async fn start(
        node_id: u64,
        addr: &str,
        store: Store,
        settings: RaftSettings,
        clustered: bool,
        tls: Option<&PeerTls>,
    ) -> Result<Self, StartError> {
        let config = Config {
            cluster_name: "trellis".into(),
            heartbeat_interval: settings.heartbeat_interval.as_millis() as u64,
            election_timeout_min: settings.election_timeout.0.as_millis() as u64,
            election_timeout_max: settings.election_timeout.1.as_millis() as u64,
            // Built when `compaction` says so: openraft's policy knows only a fixed count.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: settings.logs_kept_after_snapshot,
            // A new or lagging node gets the snapshot in few large chunks, each of which may
            // take a while on a busy node: openraft's 200 ms default made a follower that fell
            // behind a large state (100k virtual nodes) ask for chunks that never arrived in time.
            snapshot_max_chunk_size: 4 << 20,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        };
        let config = Arc::new(
            config
                .validate()
                .map_err(|e| StartError::Config(e.to_string()))?,
        );
        let durable = durable::Durable::default();
        let (sm, applied, applied_index) =
            state_machine::StateMachine::open(node_id, store.clone(), durable.clone())
                .map_err(|e| StartError::Storage(e.to_string()))?;
        let log = log_store::LogStore::new(store, node_id, durable.clone());
        let committed = log.committed();
        let peers = Peers::new(tls).map_err(StartError::Config)?;
        let faults = Faults::default();
        let network = network::Network {
            peers: peers.clone(),
            faults: faults.clone(),
            durable,
        };
        let raft = Raft::new(node_id, config, network, log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if !initialized && !clustered {
            let members = BTreeMap::from([(node_id, BasicNode::new(addr))]);
            raft.initialize(members)
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?;
        }
        let (proposals, rx) = mpsc::channel(4 * proposer::MAX_BATCH);
        let proposer = tokio::spawn(proposer::run(raft.clone(), rx)).abort_handle();
        let leader_since = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let contact = Arc::new(outrun::Contact::new(settings.election_timeout.1));
        tokio::spawn(watch_metrics(
            raft.clone(),
            leader_since.clone(),
            compaction::Compaction::new(settings.snapshot_every),
            applied.clone(),
        ));
        let c = Self {
            node_id,
            addr: addr.to_string(),
            raft,
            applied,
            applied_index,
            proposals,
            proposer,
            peers,
            faults,
            leader_since,
            committed,
            contact,
        };
        if !clustered {
            c.wait_for_leader(Duration::from_secs(30)).await?;
        }
        Ok(c)
    }

    /// Starts dead-voter cleanup (it acts only while this node leads).
    pub fn start_autopilot(&self, settings: Autopilot) {
        tokio::spawn(autopilot::run(self.clone(), settings));
    }

    /// Forms or joins the cluster `membership` describes, then waits for a leader. Returns at
    /// once for a node that already belongs to one (a restart).
    pub async fn form(&self, membership: &Membership) -> Result<(), StartError> {
        forming::form(self, membership).await
    }

    /// Waits until a leader is known.
    pub async fn wait_for_leader(&self, wait: Duration) -> Result<(), StartError> {
        self.raft
            .wait(Some(wait))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map(|_| ())
            .map_err(|_| StartError::NoLeader(wait))
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// An AppendEntries or a snapshot chunk came (from whichever leader).
    fn heard_leader(&self) {
        self.contact.heard();
    }

    /// A vote this node refused; see [`outrun::outrun`].
    fn outrun(
        &self,
        candidate_term: u64,
        candidate_log: Option<openraft::LogId<u64>>,
        answer: &openraft::raft::VoteResponse<u64>,
    ) {
        outrun::outrun(
            &self.raft,
            &self.contact,
            candidate_term,
            candidate_log,
            answer,
        );
    }

    /// The fault-injection hook of the raft network (tests only).
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.current_leader == Some(self.node_id) && m.state == ServerState::Leader
    }

    /// The address of node `id`, from the membership this node knows.
    fn addr_of(&self, id: u64) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config
            .nodes()
            .find(|(n, _)| **n == id)
            .map(|(_, node)| node.addr.clone())
    }

    /// Proposes `cmd` on whichever node leads, waits until it is committed and applied there,
    /// and returns its answer. A follower forwards the command to the leader; without a leader
    /// it waits up to [`LEADER_WAIT`] for one.
    pub async fn write(&self, cmd: Command) -> Result<Outcome, WriteError> {
        self.on_leader(
            || self.write_here(cmd.clone()),
            |leader| self.forward_write(leader, &cmd),
        )
        .await
    }

    /// Runs `here` on this node, or `there` with the leader's id where another node leads.
    /// Through an election (no leader, or one that just stepped down) it tries again for up
    /// to [`LEADER_WAIT`], then answers `NoLeader`. Every operation that only the leader may
    /// perform goes through here: writes, read-index, joins and removals.
    async fn on_leader<T, Here, There>(
        &self,
        here: impl Fn() -> Here,
        there: impl Fn(u64) -> There,
    ) -> Result<T, WriteError>
    where
        Here: std::future::Future<Output = Result<T, WriteError>>,
        There: std::future::Future<Output = Result<T, WriteError>>,
    {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let err = match here().await {
                Ok(v) => return Ok(v),
                Err(WriteError::NotLeader {
                    leader: Some(leader),
                }) if leader != self.node_id => match there(leader).await {
                    Ok(v) => return Ok(v),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            match err {
                WriteError::NoLeader | WriteError::NotLeader { .. }
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                WriteError::NotLeader { .. } => return Err(WriteError::NoLeader),
                e => return Err(e),
            }
        }
    }

    /// `Ok` on the leader; else where the leader is, as an error.
    fn lead_here(&self) -> Result<(), WriteError> {
        if self.is_leader() {
            return Ok(());
        }
        Err(match self.raft.metrics().borrow().current_leader {
            Some(leader) => WriteError::NotLeader {
                leader: Some(leader),
            },
            None => WriteError::NoLeader,
        })
    }

    /// Proposes `cmd` here; `NotLeader` when this node does not lead.
    async fn write_here(&self, cmd: Command) -> Result<Outcome, WriteError> {
        let (answer, rx) = oneshot::channel();
        let stopped = || WriteError::Fatal("raft is shutting down".into());
        self.proposals
            .send(proposer::Pending { cmd, answer })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    async fn forward_write(&self, leader: u64, cmd: &Command) -> Result<Outcome, WriteError> {
        let body = serde_json::to_vec(cmd).map_err(|e| WriteError::Fatal(e.to_string()))?;
        self.call_leader(leader, Rpc::Forward, body, FORWARD_TIMEOUT)
            .await
    }

    /// Calls `rpc` on the leader. Not delivered: `NoLeader` (retry); the callee no longer
    /// leads: `NotLeader`; anything else after delivery: `Unknown`.
    async fn call_leader<T: serde::de::DeserializeOwned>(
        &self,
        leader: u64,
        rpc: Rpc,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<T, WriteError> {
        let addr = self.addr_of(leader).ok_or(WriteError::NoLeader)?;
        match self.peers.call(&addr, rpc, body, timeout).await {
            Ok(answer) => {
                serde_json::from_slice(&answer).map_err(|e| WriteError::Fatal(e.to_string()))
            }
            Err(e) if e.not_delivered() => Err(WriteError::NoLeader),
            Err(peers::CallError::Status {
                code: tonic::Code::FailedPrecondition,
                ..
            }) => Err(WriteError::NotLeader { leader: None }),
            Err(e) => Err(WriteError::Unknown(e.to_string())),
        }
    }

    /// Waits until this node has applied everything committed before the call (raft's
    /// read-index: the leader confirms its leadership with a quorum and names its commit
    /// index; this node waits to apply up to it). A read after this sees every write
    /// acknowledged before it started.
    pub async fn linearize(&self) -> Result<(), WriteError> {
        let index = self
            .on_leader(
                || self.read_index_here(),
                |leader| self.forward_read_index(leader),
            )
            .await?;
        let mut applied = self.applied_index.clone();
        let reached = tokio::time::timeout(LEADER_WAIT, applied.wait_for(|i| *i >= index)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(WriteError::NoLeader),
        }
    }

    /// On the leader: confirms leadership and returns the index reads must wait for.
    async fn read_index_here(&self) -> Result<u64, WriteError> {
        let confirmed = tokio::time::timeout(LEADER_WAIT, self.raft.get_read_log_id()).await;
        let Ok(confirmed) = confirmed else {
            return Err(WriteError::NoLeader);
        };
        match confirmed {
            Ok((read, _)) => Ok(read.map_or(0, |l| l.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(match f.leader_id {
                    Some(leader) => WriteError::NotLeader {
                        leader: Some(leader),
                    },
                    None => WriteError::NoLeader,
                })
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                Err(WriteError::NoLeader)
            }
            Err(e) => Err(WriteError::Fatal(e.to_string())),
        }
    }

    async fn forward_read_index(&self, leader: u64) -> Result<u64, WriteError> {
        // A read has no side effect: whatever went wrong, the caller may ask again.
        match self
            .call_leader(leader, Rpc::ReadIndex, b"null".to_vec(), FORWARD_TIMEOUT)
            .await
        {
            Err(WriteError::Unknown(e)) => {
                tracing::debug!(error = %e, "read-index from the leader failed");
                Err(WriteError::NoLeader)
            }
            other => other,
        }
    }

    /// On the leader: adds `join` as a learner, waits for it to catch up, then makes it a
    /// voter. Elsewhere: passes the request to the leader.
    async fn admit(&self, join: JoinRequest) -> Result<(), WriteError> {
        let body = serde_json::to_vec(&join).map_err(|e| WriteError::Fatal(e.to_string()))?;
        self.on_leader(
            || self.admit_here(&join),
            |leader| self.call_leader(leader, Rpc::Join, body.clone(), JOIN_TIMEOUT),
        )
        .await
    }

    async fn admit_here(&self, join: &JoinRequest) -> Result<(), WriteError> {
        self.lead_here()?;
        let voter = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .voter_ids()
            .any(|v| v == join.node_id);
        if voter {
            return Ok(());
        }
        let to_write = |e: RaftError<u64, _>| WriteError::Fatal(e.to_string());
        tracing::info!(node = join.node_id, addr = %join.addr, "adding a learner");
        self.raft
            .add_learner(join.node_id, BasicNode::new(&join.addr), true)
            .await
            .map_err(to_write)?;
        tracing::info!(
            node = join.node_id,
            "the learner caught up; making it a voter"
        );
        let change = ChangeMembers::AddVoterIds([join.node_id].into());
        self.raft
            .change_membership(change, false)
            .await
            .map_err(to_write)?;
        Ok(())
    }

    /// What this node knows about itself and its cluster.
    pub fn node_info(&self) -> NodeInfo {
        let m = self.raft.metrics();
        let m = m.borrow();
        let voters: Vec<u64> = m.membership_config.voter_ids().collect();
        let members = m
            .membership_config
            .nodes()
            .map(|(id, n)| (*id, (n.addr.clone(), voters.contains(id))))
            .collect();
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Follower => "follower",
            ServerState::Shutdown => "shutdown",
        };
        NodeInfo {
            node_id: self.node_id,
            addr: self.addr.clone(),
            state: state.into(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            committed_index: self.committed.load(std::sync::atomic::Ordering::Relaxed),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            leader: m.current_leader,
            leader_since_ms: self.leader_since.load(std::sync::atomic::Ordering::Relaxed),
            members,
        }
    }

    /// Asks the node at `addr` who it is; `None` when it does not answer within `timeout`.
    async fn hello(&self, addr: &str, timeout: Duration) -> Option<NodeInfo> {
        match self
            .peers
            .call(addr, Rpc::Hello, b"null".to_vec(), timeout)
            .await
        {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(e) => {
                tracing::debug!(error = %e, "no answer to Hello");
                None
            }
        }
    }

    /// Every member with its role, term, last log index, lag behind the leader and health;
    /// each is asked over the network (1 s), so a dead one shows as unreachable.
    pub async fn members(&self) -> Vec<Member> {
        let me = self.node_info();
        let asks = me.members.iter().map(|(id, (addr, _))| {
            let (id, addr) = (*id, addr.clone());
            let me = &me;
            async move {
                if id == self.node_id {
                    return (id, Some(me.clone()));
                }
                (id, self.hello(&addr, Duration::from_secs(1)).await)
            }
        });
        let answers: BTreeMap<u64, Option<NodeInfo>> = futures_util::future::join_all(asks)
            .await
            .into_iter()
            .collect();
        let leader = me.leader;
        let leader_last = leader
            .and_then(|l| answers.get(&l).cloned().flatten())
            .map(|i| i.last_log_index);
        me.members
            .iter()
            .map(|(id, (addr, voter))| {
                let info = answers.get(id).cloned().flatten();
                let lag = match (&info, leader_last) {
                    (Some(i), Some(last)) => Some(last.saturating_sub(i.last_log_index)),
                    _ => None,
                };
                let role = if Some(*id) == leader {
                    "leader"
                } else if *voter {
                    "voter"
                } else {
                    "learner"
                };
                let health = match (&info, lag) {
                    (None, _) => "unreachable",
                    (Some(_), Some(l)) if l > LAGGING => "lagging",
                    _ => "healthy",
                };
                Member {
                    id: *id,
                    addr: addr.clone(),
                    role: role.into(),
                    term: info.as_ref().map(|i| i.term),
                    last_log_index: info.as_ref().map(|i| i.last_log_index),
                    lag,
                    health: health.into(),
                }
            })
            .collect()
    }

    /// Takes node `id` out of the cluster (on the leader, or forwarded to it).
    pub async fn remove_member(&self, id: u64) -> Result<(), WriteError> {
        let body = serde_json::to_vec(&id).map_err(|e| WriteError::Fatal(e.to_string()))?;
        self.on_leader(
            || self.remove_here(id),
            |leader| self.call_leader(leader, Rpc::Remove, body.clone(), JOIN_TIMEOUT),
        )
        .await
    }

    /// On the leader: takes node `id` out of the cluster.
    async fn remove_here(&self, id: u64) -> Result<(), WriteError> {
        self.lead_here()?;
        let change = ChangeMembers::RemoveVoters([id].into());
        self.raft
            .change_membership(change, false)
            .await
            .map(|_| ())
            .map_err(|e| WriteError::Fatal(e.to_string()))
    }

    /// Reads the applied state (this node's; call [`Consensus::linearize`] first for a read
    /// that sees every acknowledged write).
    pub fn read<T>(&self, f: impl FnOnce(&MeshState) -> T) -> T {
        let guard = self.applied.read().unwrap_or_else(|e| e.into_inner());
        f(&guard.state)
    }

    /// The index of the last applied log entry; changes whenever the state does.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied_index.clone()
    }

    /// Stops raft; the store stays consistent for the next start. A leader first hands its
    /// leadership to the most up-to-date voter, so a planned restart does not wait for an
    /// election timeout.
    pub async fn shutdown(&self) {
        self.proposer.abort();
        if self.is_leader() {
            forming::transfer_leadership(self).await;
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

/// Records when this node becomes leader; ends with raft.
/// Follows the node's raft metrics: notes when it became leader, and triggers a snapshot when
/// `compaction` says one is due.
async fn watch_metrics(
    raft: Raft<TypeConfig>,
    since: Arc<std::sync::atomic::AtomicU64>,
    mut compaction: compaction::Compaction,
    applied: Arc<std::sync::RwLock<Applied>>,
) {
    let mut metrics = raft.metrics();
    let mut leading = false;
    // A build takes a while and the metrics change meanwhile: ask once per snapshot, and again
    // only after a pause, in case a request was dropped (openraft ignores one while a build
    // runs, as while an installed snapshot arrives).
    let mut asked: Option<(u64, std::time::Instant)> = None;
    loop {
        let (now_leading, applied_index, snapshot_index) = {
            let m = metrics.borrow_and_update();
            (
                m.state == ServerState::Leader,
                m.last_applied.map_or(0, |l| l.index),
                m.snapshot.map_or(0, |l| l.index),
            )
        };
        if now_leading && !leading {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            since.store(ms, std::sync::atomic::Ordering::Relaxed);
        }
        leading = now_leading;
        let records = || {
            let a = applied.read().unwrap_or_else(|e| e.into_inner());
            a.state.len()
        };
        if compaction.due(applied_index, snapshot_index, records)
            && asked.is_none_or(|(at, t)| at != snapshot_index || t.elapsed() >= SNAPSHOT_ASK_AGAIN)
        {
            asked = Some((snapshot_index, std::time::Instant::now()));
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// How long a snapshot request may go unanswered before it is made again.
const SNAPSHOT_ASK_AGAIN: Duration = Duration::from_secs(5);

/// A member further behind the leader than this many entries is reported `lagging`.
const LAGGING: u64 = 1000;
/// Joining waits for the learner to catch up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use openraft::StorageError;
    use openraft::testing::{StoreBuilder, Suite};

    use super::log_store::LogStore;
    use super::state_machine::StateMachine;
    use super::*;
    use crate::model::{Owner, Quotas, ResourceKey, Spec};

    struct SledBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
            let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
            let store = Store::open(dir.path()).map_err(|e| openraft::StorageIOError::write(&e))?;
            let durable = super::durable::Durable::default();
            let (sm, _, _) = StateMachine::open(1, store.clone(), durable.clone())
                .map_err(|e| openraft::StorageIOError::read(&e))?;
            Ok((dir, LogStore::new(store, 1, durable), sm))
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
            let node = Consensus::start(
                1,
                "127.0.0.1:0",
                store.clone(),
                settings.clone(),
                false,
                None,
            )
            .await
            .unwrap();
            node.write(Command::SetQuotas(quotas.clone()))
                .await
                .unwrap()
                .unwrap();
            // A small state (20 meshes) under many writes: a snapshot every 50 entries.
            for i in 0..400 {
                let cmd = if i < 20 {
                    mesh(&format!("m{i:03}"))
                } else {
                    Command::SetQuotas(quotas.clone())
                };
                node.write(cmd).await.unwrap().unwrap();
            }
            let mut applied = node.applied_index();
            // Compaction runs in the background after the snapshot; wait for it.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while store.log_len() > 50 + 10 + 10 && std::time::Instant::now() < deadline {
                let _ = tokio::time::timeout(Duration::from_millis(100), applied.changed()).await;
            }
            assert!(
                store.get_snapshot().unwrap().is_some(),
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
        // Off this (single) thread: the last snapshot build may still hold the store for a
        // moment, and `open` waits for its lock by sleeping.
        let path = dir.path().to_path_buf();
        let store = tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .unwrap()
            .unwrap();
        let node = Consensus::start(1, "127.0.0.1:0", store, settings, false, None)
            .await
            .unwrap();
        let after = node.read(|s| s.snapshot().resources);
        assert_eq!(after.len(), 20);
        assert_eq!(after, before);
        assert_eq!(node.read(|s| s.quotas().clone()), quotas);
        node.shutdown().await;
    }
}
