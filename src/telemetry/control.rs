//! The control plane's metrics: raft (term, leader, log, commit and applied index, apply
//! lag), API requests by App Mesh operation and status with latency, connected proxies, config
//! push latency, certificates issued, DNS queries by response code. Raft's figures are read
//! from the node when scraped ([`RaftFigures`]); the rest are counted as they happen.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{LatencyHistogram, StatusClass};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
    status_class: StatusClass,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OperationOnly {
    operation: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RcodeLabels {
    rcode: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// What raft says about this node, read at each scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct RaftFigures {
    pub term: u64,
    /// The leader's node id (0: none known).
    pub leader: u64,
    pub is_leader: bool,
    pub last_log_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    pub members: u64,
}

pub struct ControlMetrics {
    registry: Registry,
    term: Gauge,
    leader: Gauge,
    is_leader: Gauge,
    last_log: Gauge,
    committed: Gauge,
    applied: Gauge,
    apply_lag: Gauge,
    members: Gauge,
    api_requests: Family<OperationLabels, Counter>,
    api_latency: Family<OperationOnly, LatencyHistogram>,
    proxies: Gauge,
    push_latency: LatencyHistogram,
    certificates: Family<KindLabels, Counter>,
    dns: Family<RcodeLabels, Counter>,
}

impl AsRef<Registry> for ControlMetrics {
    fn as_ref(&self) -> &Registry {
        &self.registry
    }
}

impl ControlMetrics {
    pub fn new(node_id: u64) -> Arc<Self> {
        let labels = [(Cow::Borrowed("node_id"), Cow::Owned(node_id.to_string()))];
        let mut registry = Registry::with_prefix_and_labels("trellis_control", labels.into_iter());
        let m = Self {
            registry: Registry::default(),
            term: Gauge::default(),
            leader: Gauge::default(),
            is_leader: Gauge::default(),
            last_log: Gauge::default(),
            committed: Gauge::default(),
            applied: Gauge::default(),
            apply_lag: Gauge::default(),
            members: Gauge::default(),
            api_requests: Family::default(),
            api_latency: Family::default(),
            proxies: Gauge::default(),
            push_latency: LatencyHistogram::default(),
            certificates: Family::default(),
            dns: Family::default(),
        };
        let gauges: [(&str, &str, &Gauge); 8] = [
            ("raft_term", "The raft term this node is in", &m.term),
            (
                "raft_leader",
                "The node id of the leader (0: none known)",
                &m.leader,
            ),
            ("raft_is_leader", "1 while this node leads", &m.is_leader),
            (
                "raft_last_log_index",
                "The last entry in this node's log",
                &m.last_log,
            ),
            (
                "raft_commit_index",
                "The last entry known committed",
                &m.committed,
            ),
            (
                "raft_applied_index",
                "The last entry applied to the state",
                &m.applied,
            ),
            (
                "raft_apply_lag",
                "Committed entries not yet applied on this node",
                &m.apply_lag,
            ),
            (
                "raft_members",
                "Members of the cluster as this node knows it",
                &m.members,
            ),
        ];
        for (name, help, g) in gauges {
            registry.register(name, help, g.clone());
        }
        registry.register(
            "api_requests",
            "App Mesh API and admin requests, by operation and status class",
            m.api_requests.clone(),
        );
        registry.register(
            "api_request_duration_seconds",
            "App Mesh API and admin request latency, by operation",
            m.api_latency.clone(),
        );
        registry.register(
            "proxies_connected",
            "Proxies with a config stream open to this node",
            m.proxies.clone(),
        );
        registry.register(
            "config_push_duration_seconds",
            "From a change applied on this node to a connected proxy acknowledging the config that carries it",
            m.push_latency.clone(),
        );
        registry.register(
            "certificates_issued",
            "Certificates this node signed, by kind (proxy, node)",
            m.certificates.clone(),
        );
        registry.register(
            "dns_queries",
            "DNS queries answered, by response code",
            m.dns.clone(),
        );
        Arc::new(Self { registry, ..m })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Refreshes the raft gauges (before a scrape).
    pub fn set_raft(&self, f: RaftFigures) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.term.set(g(f.term));
        self.leader.set(g(f.leader));
        self.is_leader.set(i64::from(f.is_leader));
        self.last_log.set(g(f.last_log_index));
        self.committed.set(g(f.committed_index));
        self.applied.set(g(f.applied_index));
        self.apply_lag
            .set(g(f.committed_index.saturating_sub(f.applied_index)));
        self.members.set(g(f.members));
    }

    pub fn api_request(&self, operation: &str, status: u16, took: Duration) {
        self.api_requests
            .get_or_create(&OperationLabels {
                operation: operation.to_string(),
                status_class: StatusClass::of(status),
            })
            .inc();
        self.api_latency
            .get_or_create(&OperationOnly {
                operation: operation.to_string(),
            })
            .observe(took);
    }

    pub fn set_proxies(&self, n: usize) {
        self.proxies.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn config_pushed(&self, took: Duration) {
        self.push_latency.observe(took);
    }

    pub fn certificate_issued(&self, kind: &'static str) {
        self.certificates.get_or_create(&KindLabels { kind }).inc();
    }

    /// One DNS answer, by its response code (`NoError`, `NXDomain`, `Refused` …).
    pub fn dns_query(&self, rcode: &str) {
        self.dns
            .get_or_create(&RcodeLabels {
                rcode: rcode.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_figures_and_api_counts_reach_the_text() {
        let m = ControlMetrics::new(3);
        m.set_raft(RaftFigures {
            term: 4,
            leader: 3,
            is_leader: true,
            last_log_index: 12,
            committed_index: 12,
            applied_index: 10,
            members: 3,
        });
        m.api_request("CreateMesh", 200, Duration::from_millis(3));
        m.api_request("CreateMesh", 409, Duration::from_millis(1));
        m.dns_query("NoError");
        let text = super::super::encode(m.registry());
        for want in [
            "trellis_control_raft_term{node_id=\"3\"} 4",
            "trellis_control_raft_apply_lag{node_id=\"3\"} 2",
            "trellis_control_api_requests_total{node_id=\"3\",operation=\"CreateMesh\",status_class=\"4xx\"} 1",
            "trellis_control_api_request_duration_seconds_count{node_id=\"3\",operation=\"CreateMesh\"} 2",
            "trellis_control_dns_queries_total{node_id=\"3\",rcode=\"NoError\"} 1",
        ] {
            assert!(text.contains(want), "{want} not in:\n{text}");
        }
    }
}
