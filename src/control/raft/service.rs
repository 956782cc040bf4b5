//! The `Cluster` gRPC service every control node serves on its gRPC port: openraft's RPCs
//! handed to the local raft, and the cluster operations the leader performs for others
//! (join, forwarded writes, read-index, removal, leadership transfer). With TLS on, a caller
//! must present a control-node certificate of this cluster (`spiffe://<td>/control/<id>`):
//! a proxy's certificate, or none, is refused.
//!
//! AppendEntries comes on a long-lived stream per leader (`AppendStream`, see `peers`): a
//! follower gets two per write (the entry, then the new commit index), and on a stream each
//! costs a DATA frame, not a request's headers, trailers and task.

use std::pin::Pin;

use futures_util::Stream;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status, Streaming};

use super::{Consensus, JoinRequest, TypeConfig, WriteError};
use crate::identity::spiffe::{self, Identity};
use crate::model::Command;
use crate::wire::cluster::Json;
use crate::wire::cluster::cluster_server::{Cluster, ClusterServer};

pub struct ClusterService {
    consensus: Consensus,
    /// With TLS: the trust domain callers' control-node certificates must name.
    trust_domain: Option<String>,
    /// Turns true when the server stops: append streams end then (a graceful stop waits for
    /// every stream, and a leader's would never end by itself).
    closing: tokio::sync::watch::Receiver<bool>,
}

impl ClusterService {
    pub fn server(
        consensus: Consensus,
        trust_domain: Option<String>,
        closing: tokio::sync::watch::Receiver<bool>,
    ) -> ClusterServer<Self> {
        ClusterServer::new(Self {
            consensus,
            trust_domain,
            closing,
        })
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
    }

    fn check_caller<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(td) = &self.trust_domain else {
            return Ok(());
        };
        let uri = req
            .peer_certs()
            .and_then(|certs| crate::identity::tls::peer_spiffe(&certs));
        match uri.as_deref().and_then(spiffe::parse) {
            Some(Identity::Control {
                trust_domain,
                node_id: _,
            }) if trust_domain == *td => Ok(()),
            _ => Err(Status::permission_denied(format!(
                "the Cluster service takes only control-node certificates of {td} (caller: {})",
                uri.as_deref().unwrap_or("no certificate")
            ))),
        }
    }

    fn cut(&self, from: u64) -> Result<(), Status> {
        cut(&self.consensus, from)
    }
}

/// The fault-injection hook (tests): RPCs from a node cut off are refused.
fn cut(consensus: &Consensus, from: u64) -> Result<(), Status> {
    if consensus.faults.is_cut(from) {
        return Err(Status::unavailable(format!(
            "node {from} is cut off by the fault hook"
        )));
    }
    Ok(())
}

/// Resolves once the server stops (never, if its sender is gone without saying so).
async fn stopping(closing: &mut tokio::sync::watch::Receiver<bool>) {
    if closing.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The answers of an `AppendStream`, in the order of its requests.
type AppendAnswers = Pin<Box<dyn Stream<Item = Result<Json, Status>> + Send>>;

/// One AppendEntries from a stream, handed to the local raft; `None` once the stream ended.
async fn append_one(
    consensus: &Consensus,
    incoming: &mut Streaming<Json>,
) -> Result<Option<Json>, Status> {
    let Some(msg) = incoming.message().await? else {
        return Ok(None);
    };
    let rpc: AppendEntriesRequest<TypeConfig> = serde_json::from_slice(&msg.json)
        .map_err(|e| Status::invalid_argument(format!("malformed message: {e}")))?;
    cut(consensus, rpc.vote.leader_id.node_id)?;
    consensus.heard_leader();
    let answer = consensus.raft.append_entries(rpc).await;
    serde_json::to_vec(&answer)
        .map(|json| Some(Json { json }))
        .map_err(|e| Status::internal(e.to_string()))
}

fn decode<T: DeserializeOwned>(req: Request<Json>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().json)
        .map_err(|e| Status::invalid_argument(format!("malformed message: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Response<Json>, Status> {
    serde_json::to_vec(v)
        .map(|json| Response::new(Json { json }))
        .map_err(|e| Status::internal(e.to_string()))
}

/// A write error as a status the caller can tell apart: Unavailable (not delivered, retry
/// anywhere), FailedPrecondition (not the leader: ask again), Internal.
pub fn write_status(e: WriteError) -> Status {
    match e {
        WriteError::NoLeader => Status::unavailable(e.to_string()),
        WriteError::NotLeader { .. } => Status::failed_precondition(e.to_string()),
        WriteError::Unknown(_) | WriteError::Fatal(_) => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn append_entries(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        self.check_caller(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        self.cut(rpc.vote.leader_id.node_id)?;
        self.consensus.heard_leader();
        encode(&self.consensus.raft.append_entries(rpc).await)
    }

    type AppendStreamStream = AppendAnswers;

    /// Answered in the task that serves the stream (no task per message): each answer is made
    /// when the connection asks for the next one.
    async fn append_stream(
        &self,
        req: Request<Streaming<Json>>,
    ) -> Result<Response<AppendAnswers>, Status> {
        self.check_caller(&req)?;
        let state = Some((
            self.consensus.clone(),
            req.into_inner(),
            self.closing.clone(),
        ));
        let answers = futures_util::stream::unfold(state, |state| async move {
            let (consensus, mut incoming, mut closing) = state?;
            let answer = tokio::select! {
                answer = append_one(&consensus, &mut incoming) => answer,
                _ = stopping(&mut closing) => Err(Status::unavailable("this node is stopping")),
            };
            match answer {
                Ok(Some(answer)) => Some((Ok(answer), Some((consensus, incoming, closing)))),
                Ok(None) => None,
                // An error ends the stream; the leader opens another.
                Err(status) => Some((Err(status), None)),
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn vote(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        self.check_caller(&req)?;
        let rpc: VoteRequest<u64> = decode(req)?;
        self.cut(rpc.vote.leader_id.node_id)?;
        let (term, log) = (rpc.vote.leader_id.term, rpc.last_log_id);
        let answer = self.consensus.raft.vote(rpc).await;
        if let Ok(refused) = &answer {
            self.consensus.outrun(term, log, refused);
        }
        encode(&answer)
    }

    async fn install_snapshot(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        self.check_caller(&req)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req)?;
        self.cut(rpc.vote.leader_id.node_id)?;
        self.consensus.heard_leader();
        encode(&self.consensus.raft.install_snapshot(rpc).await)
    }

    async fn hello(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        self.check_caller(&req)?;
        encode(&self.consensus.node_info())
    }

    async fn join(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        self.check_caller(&req)?;
        let join: JoinRequest = decode(req)?;
        self.consensus
            .admit(join)
            .await
            .map_err(write_status)
            .and_then(|()| encode(&()))
    }

    async fn forward(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        self.check_caller(&req)?;
        let cmd: Command = decode(req)?;
        let outcome = self.consensus.write_here(cmd).await.map_err(write_status)?;
        encode(&outcome)
    }

    async fn read_index(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        self.check_caller(&req)?;
        let index = self
            .consensus
            .read_index_here()
            .await
            .map_err(write_status)?;
        encode(&index)
    }

    async fn remove(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        self.check_caller(&req)?;
        let id: u64 = decode(req)?;
        self.consensus
            .remove_here(id)
            .await
            .map_err(write_status)
            .and_then(|()| encode(&()))
    }

    async fn timeout_now(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        self.check_caller(&req)?;
        self.consensus
            .raft
            .trigger()
            .elect()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        encode(&())
    }
}
