//! openraft's network: append-entries, vote and install-snapshot to peer control nodes over
//! their `Cluster` gRPC service (`peers`), as JSON of openraft's own types; append-entries on
//! one stream per replication. A peer that cannot be reached is reported `Unreachable`, so
//! openraft backs off instead of spinning.
//!
//! The fault hook ([`Faults`]) drops RPCs to chosen peers: the tests cut a node off the
//! cluster with it (a partition) without network namespaces. It is reachable only through the
//! admin API of a node started with `TRELLIS_FAULT_INJECTION=1`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::TypeConfig;
use super::durable::Durable;
use super::peers::{AppendStream, CallError, Peers, Rpc};

/// Peers whose raft RPCs are dropped, both ways (this node neither sends to them nor accepts
/// from them).
#[derive(Clone, Default)]
pub struct Faults(Arc<Mutex<BTreeSet<u64>>>);

impl Faults {
    pub fn set(&self, cut: BTreeSet<u64>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = cut;
    }

    pub fn is_cut(&self, peer: u64) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&peer)
    }
}

#[derive(Clone)]
pub struct Network {
    pub peers: Peers,
    pub faults: Faults,
    /// Commit indexes sent to followers stay within this node's synced log.
    pub durable: Durable,
}

pub struct Peer {
    target: u64,
    addr: String,
    peers: Peers,
    /// This replication's AppendEntries stream to the peer.
    append: AppendStream,
    /// The peer has no `AppendStream` (an older version, during a rolling upgrade): its
    /// AppendEntries go as unary calls.
    append_unary: bool,
    faults: Faults,
    durable: Durable,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            append: AppendStream::new(&node.addr),
            append_unary: false,
            peers: self.peers.clone(),
            faults: self.faults.clone(),
            durable: self.durable.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

impl Peer {
    async fn send<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if self.faults.is_cut(self.target) {
            let cut = Failure(format!("node {} is cut off by the fault hook", self.target));
            return Err(RPCError::Unreachable(Unreachable::new(&cut)));
        }
        let body = serde_json::to_vec(req)
            .map_err(|e| RPCError::Network(NetworkError::new(&Failure(e.to_string()))))?;
        let timeout = option.hard_ttl().max(Duration::from_millis(50));
        let answer = match rpc {
            Rpc::AppendEntries if !self.append_unary => {
                match self.append.call(&self.peers, &body, timeout).await {
                    // Nothing was handled: unary, now and from now on.
                    Err(CallError::Status {
                        code: tonic::Code::Unimplemented,
                        ..
                    }) => {
                        self.append_unary = true;
                        self.peers.call(&self.addr, rpc, body, timeout).await
                    }
                    answer => answer,
                }
            }
            _ => self.peers.call(&self.addr, rpc, body, timeout).await,
        };
        let answer = answer.map_err(|e| match e {
            CallError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Status { .. } => RPCError::Network(NetworkError::new(&e)),
        })?;
        let result: Result<Resp, RaftError<u64, E>> = serde_json::from_slice(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&Failure(e.to_string()))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        rpc.leader_commit = self.durable.clamp(rpc.leader_commit);
        self.send(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.send(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.send(Rpc::Vote, &rpc, &option).await
    }
}
