//! Elections without a tail. openraft 0.9 makes a candidate that learns of a longer log wait
//! twice the longest election timeout before it tries again, and has no pre-vote: the voter
//! with the longer log could lose a round to that candidate and hold an election up past 3 s.
//! Here a voter that no longer hears a leader campaigns as soon as such a candidate asks it
//! for a vote ([`outrun`]); [`Contact`] is how it knows it hears none.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use openraft::raft::VoteResponse;
use openraft::{LogId, Raft, ServerState};

use super::TypeConfig;

/// The most terms a node skips to outrun a candidate with a shorter log.
const MAX_OUTRUN: u64 = 3;
/// How long one of those campaigns may take to move the term before the rest are given up.
const OUTRUN_STEP: Duration = Duration::from_millis(200);

/// When this node last heard from a leader.
#[derive(Debug)]
pub struct Contact {
    started: Instant,
    /// Milliseconds after `started`.
    last: AtomicU64,
    /// Silence longer than this (openraft's leader lease, the longest election timeout) means
    /// the leader is gone.
    lease: Duration,
    /// A campaign to outrun a candidate is under way.
    outrunning: AtomicBool,
}

impl Contact {
    pub fn new(lease: Duration) -> Self {
        Self {
            started: Instant::now(),
            last: AtomicU64::new(0),
            lease,
            outrunning: AtomicBool::new(false),
        }
    }

    /// An AppendEntries or a snapshot chunk came (from whichever leader).
    pub fn heard(&self) {
        self.last.store(self.now(), Ordering::Relaxed);
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn silent(&self) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        self.now().saturating_sub(last) > self.lease.as_millis() as u64
    }
}

/// This node refused its vote to a candidate (of `candidate_term`) whose log is shorter
/// than its own (`answer`). That candidate cannot win here, and openraft makes it wait
/// twice the longest election timeout before it tries again (it saw a longer log), while
/// this node, whose own timer may fire in the term the candidate already holds, can lose
/// a round to it: the tail of the election times. Where this node no longer hears a
/// leader either, and is still in an older term than the candidate's, it campaigns now, to
/// a term past the candidate's, so the node that can win is the one that tries. A node that
/// hears its leader, leads, or has moved to the candidate's term (it voted there, perhaps
/// for the leader about to be, or campaigns itself) leaves things alone.
pub fn outrun(
    raft: &Raft<TypeConfig>,
    contact: &Arc<Contact>,
    candidate_term: u64,
    candidate_log: Option<LogId<u64>>,
    answer: &VoteResponse<u64>,
) {
    if answer.vote_granted || answer.last_log_id <= candidate_log || !contact.silent() {
        return;
    }
    let target = candidate_term + 1;
    let Some(term) = follower_term_below(raft, candidate_term) else {
        return;
    };
    // Each campaign is one term past the last; a candidate far ahead is left to time out.
    if target - term > MAX_OUTRUN || contact.outrunning.swap(true, Ordering::AcqRel) {
        return;
    }
    tracing::info!(
        candidate_term,
        term,
        "a candidate with a shorter log asked for a vote and no leader is heard: campaigning"
    );
    let (raft, contact) = (raft.clone(), contact.clone());
    tokio::spawn(async move {
        while let Some(term) = follower_term_below(&raft, target) {
            if !contact.silent() || raft.trigger().elect().await.is_err() {
                break;
            }
            // The trigger is queued to the raft task: see the term move before the next.
            let moved = raft
                .wait(Some(OUTRUN_STEP))
                .metrics(|m| m.current_term > term, "the term moved")
                .await;
            if moved.is_err() {
                break;
            }
        }
        contact.outrunning.store(false, Ordering::Release);
    });
}

/// This node's term, where it does not lead and the term is below `limit`.
fn follower_term_below(raft: &Raft<TypeConfig>, limit: u64) -> Option<u64> {
    let m = raft.metrics();
    let m = m.borrow();
    (m.state != ServerState::Leader && m.current_term < limit).then_some(m.current_term)
}
