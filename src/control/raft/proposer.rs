//! Batches concurrent writes into one raft entry. openraft appends, flushes and applies each
//! `client_write` on its own, so under concurrent clients the per-entry overhead, not the disk,
//! bounds throughput. The proposer keeps one entry in flight and packs every command that
//! arrived meanwhile into the next one (up to [`MAX_BATCH`]); a lone writer waits for nothing.

use openraft::Raft;
use openraft::error::ClientWriteError;
use tokio::sync::{mpsc, oneshot};

use super::{Proposal, TypeConfig, WriteError};
use crate::model::{Command, Outcome};

/// How long one entry may take to commit before its writers are told the outcome is unknown
/// (and the next entry is proposed).
const COMMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most commands in one raft entry.
pub const MAX_BATCH: usize = 256;

pub struct Pending {
    pub cmd: Command,
    pub answer: oneshot::Sender<Result<Outcome, WriteError>>,
}

/// Runs until every sender is gone.
pub async fn run(raft: Raft<TypeConfig>, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut cmds = vec![first.cmd];
        let mut answers = vec![first.answer];
        while cmds.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => {
                    cmds.push(p.cmd);
                    answers.push(p.answer);
                }
                Err(_) => break,
            }
        }
        let err = match raft
            .client_write_ff(Proposal(std::sync::Arc::new(cmds)))
            .await
        {
            Ok(committed) => match tokio::time::timeout(COMMIT_WAIT, committed).await {
                Ok(Ok(Ok(resp))) => {
                    let mut outcomes = resp.data.0.into_iter();
                    for answer in answers {
                        let out = outcomes.next().ok_or_else(|| {
                            WriteError::Fatal(
                                "the state machine answered fewer commands than proposed".into(),
                            )
                        });
                        let _ = answer.send(out);
                    }
                    continue;
                }
                Ok(Ok(Err(ClientWriteError::ForwardToLeader(f)))) => match f.leader_id {
                    Some(leader) => WriteError::NotLeader {
                        leader: Some(leader),
                    },
                    None => WriteError::NoLeader,
                },
                Ok(Ok(Err(e))) => WriteError::Fatal(e.to_string()),
                Ok(Err(_)) => WriteError::Fatal("raft dropped the write".into()),
                // A leader cut off from its quorum never commits; it may later, if the
                // partition heals before another leader is elected.
                Err(_) => WriteError::Unknown(format!(
                    "not committed within {COMMIT_WAIT:?}: this leader may have lost its quorum"
                )),
            },
            Err(e) => WriteError::Fatal(e.to_string()),
        };
        for answer in answers {
            let _ = answer.send(Err(err.clone()));
        }
    }
}
