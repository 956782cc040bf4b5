//! Dead-voter cleanup, Consul autopilot's idea: the leader asks every other voter who it is
//! each second; a voter that has not answered for the configured time is taken out of the
//! cluster, one at a time, and never when that would leave fewer voters than the minimum.
//! Raft's quorum shrinks with it, so a dead node stops counting against elections and writes.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::ChangeMembers;
use tokio::time::Instant;

use super::Consensus;

/// When to remove a dead voter.
#[derive(Debug, Clone, Copy)]
pub struct Autopilot {
    /// A voter silent this long is removed.
    pub dead_after: Duration,
    /// Never shrink the cluster below this many voters.
    pub min_voters: usize,
}

const EVERY: Duration = Duration::from_secs(1);

/// Runs until raft stops.
pub async fn run(c: Consensus, settings: Autopilot) {
    let mut last_answer: BTreeMap<u64, Instant> = BTreeMap::new();
    loop {
        tokio::time::sleep(EVERY).await;
        if c.raft.metrics().borrow().running_state.is_err() {
            return;
        }
        if !c.is_leader() {
            last_answer.clear();
            continue;
        }
        let voters: Vec<(u64, String)> = {
            let m = c.raft.metrics();
            let m = m.borrow();
            let ids: Vec<u64> = m.membership_config.voter_ids().collect();
            m.membership_config
                .nodes()
                .filter(|(id, _)| ids.contains(id) && **id != c.node_id)
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect()
        };
        let now = Instant::now();
        for (id, addr) in &voters {
            let answered = c.hello(addr, Duration::from_millis(500)).await.is_some();
            // A voter first seen now gets the whole grace period.
            let seen = last_answer.entry(*id).or_insert(now);
            if answered {
                *seen = Instant::now();
            }
        }
        last_answer.retain(|id, _| voters.iter().any(|(v, _)| v == id));
        let total = voters.len() + 1;
        let dead = last_answer
            .iter()
            .find(|(_, t)| now.duration_since(**t) >= settings.dead_after)
            .map(|(id, _)| *id);
        let Some(dead) = dead else {
            continue;
        };
        if total - 1 < settings.min_voters {
            tracing::warn!(
                node = dead,
                voters = total,
                min = settings.min_voters,
                "a voter is dead, but removing it would leave too few voters"
            );
            continue;
        }
        tracing::warn!(node = dead, after = ?settings.dead_after, "removing a dead voter");
        let change = ChangeMembers::RemoveVoters([dead].into());
        match c.raft.change_membership(change, false).await {
            Ok(_) => {
                last_answer.remove(&dead);
            }
            Err(e) => tracing::warn!(node = dead, error = %e, "removing a dead voter"),
        }
    }
}
