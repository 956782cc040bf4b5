//! How a node comes to belong to a cluster, Consul's way: with `bootstrap_expect = N` and
//! `retry_join`, nodes find each other and, once N have met, the one with the lowest id
//! initializes raft with all of them; a node that finds an existing cluster (a replacement, a
//! fifth node, `--join`) asks it to be admitted and the leader adds it as a learner, lets it
//! catch up, then makes it a voter. A restarted member skips all of this.
//!
//! Also the other end of a node's life: leadership transfer before a leader stops.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use openraft::BasicNode;

use super::peers::Rpc;
use super::{Consensus, JOIN_TIMEOUT, JoinRequest, Membership, NodeInfo, StartError};

/// Between rounds of looking for peers.
const RETRY: Duration = Duration::from_millis(500);
/// Progress is logged this often while a node waits for its peers.
const LOG_EVERY: Duration = Duration::from_secs(10);

pub async fn form(c: &Consensus, m: &Membership) -> Result<(), StartError> {
    let peers: Vec<String> = m
        .retry_join
        .iter()
        .chain(m.join.iter())
        .filter(|a| **a != c.addr)
        .cloned()
        .collect();
    // The first wait is logged at once (an operator watching a node start sees why it is not
    // ready), then every LOG_EVERY.
    let mut logged: Option<Instant> = None;
    loop {
        let (known, leader) = {
            let metrics = c.raft.metrics();
            let metrics = metrics.borrow();
            let known = metrics
                .membership_config
                .nodes()
                .any(|(id, _)| *id == c.node_id);
            (known, metrics.current_leader)
        };
        if known && leader.is_some() {
            return Ok(());
        }
        if !known {
            round(c, m, &peers).await;
        }
        if logged.is_none_or(|l| l.elapsed() >= LOG_EVERY) {
            logged = Some(Instant::now());
            tracing::info!(
                expect = m.bootstrap_expect,
                peers = ?peers,
                "waiting to form or join a cluster"
            );
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// One look at the peers: join a cluster that exists, or initialize one when enough nodes
/// have met and this one has the lowest id.
async fn round(c: &Consensus, m: &Membership, peers: &[String]) {
    let asks = peers.iter().map(|addr| async move {
        c.hello(addr, Duration::from_secs(1))
            .await
            .map(|i| (addr, i))
    });
    let infos: Vec<(&String, NodeInfo)> = futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    if let Some((addr, info)) = infos.iter().find(|(_, i)| !i.members.is_empty()) {
        tracing::info!(via = %addr, leader = ?info.leader, "found a cluster; asking to join");
        let join = JoinRequest {
            node_id: c.node_id,
            addr: c.addr.clone(),
        };
        let Ok(body) = serde_json::to_vec(&join) else {
            return;
        };
        match c.peers.call(addr, Rpc::Join, body, JOIN_TIMEOUT).await {
            Ok(_) => tracing::info!("joined the cluster"),
            Err(e) => tracing::warn!(error = %e, "join failed; retrying"),
        }
        return;
    }
    if m.join.is_some() || m.bootstrap_expect <= 1 {
        return;
    }
    let mut met: BTreeMap<u64, String> = BTreeMap::from([(c.node_id, c.addr.clone())]);
    for (addr, info) in &infos {
        if let Some(other) = met.get(&info.node_id) {
            tracing::error!(
                node_id = info.node_id,
                first = %other,
                second = %addr,
                "two control nodes use the same node_id; give each a unique one"
            );
            return;
        }
        met.insert(info.node_id, info.addr.clone());
    }
    let lowest = met.keys().next().copied();
    if met.len() < m.bootstrap_expect || lowest != Some(c.node_id) {
        return;
    }
    let members: BTreeMap<u64, BasicNode> = met
        .into_iter()
        .map(|(id, addr)| (id, BasicNode::new(addr)))
        .collect();
    tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "forming the cluster");
    if let Err(e) = c.raft.initialize(members).await {
        tracing::warn!(error = %e, "initializing the cluster");
    }
}

/// Hands leadership to the most up-to-date voter (Raft's TimeoutNow). openraft 0.9's
/// followers refuse any vote for a leader lease (`election_timeout_max`) after the last
/// heartbeat they saw, so the leader stops its heartbeats, lets the lease run out, and then asks
/// the voter to stand at once: the cluster has a leader about one lease after the stop, where
/// a leader that vanished leaves it a lease plus a randomized election timeout.
pub async fn transfer_leadership(c: &Consensus) {
    let (last, target) = {
        let metrics = c.raft.metrics();
        let metrics = metrics.borrow();
        let Some(replication) = metrics.replication.clone() else {
            return;
        };
        let best = metrics
            .membership_config
            .voter_ids()
            .filter(|v| *v != c.node_id)
            .filter_map(|v| {
                let matched = replication.get(&v).cloned().flatten()?;
                Some((matched.index, v))
            })
            .max();
        (metrics.last_log_index, best)
    };
    let Some((matched, target)) = target else {
        return;
    };
    if Some(matched) != last {
        tracing::info!(
            target,
            "no voter is fully caught up; leaving it to an election"
        );
        return;
    }
    let Some(addr) = c.addr_of(target) else {
        return;
    };
    c.raft.runtime_config().heartbeat(false);
    let lease = Duration::from_millis(c.raft.config().election_timeout_max);
    tokio::time::sleep(lease + Duration::from_millis(20)).await;
    match c
        .peers
        .call(
            &addr,
            Rpc::TimeoutNow,
            b"null".to_vec(),
            Duration::from_secs(1),
        )
        .await
    {
        Ok(_) => tracing::info!(target, "handed leadership over"),
        Err(e) => tracing::warn!(target, error = %e, "leadership transfer"),
    }
}
