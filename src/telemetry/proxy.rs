//! The data plane's metrics: requests by direction, port, virtual service, route, target
//! virtual node, caller and status class, with latency; gRPC calls by `grpc-status` (a gRPC
//! failure is an HTTP 200, so the status class cannot show it); retries and budget exhaustion;
//! timeouts; ejections; connection-pool overflows; TLS handshake failures; open connections;
//! bytes. Every series carries the proxy's mesh and virtual node (or gateway), as App Mesh's
//! Envoy stats tags did. The request path holds [`EdgeStats`] resolved when a config is
//! compiled, so counting a request is a few atomic adds.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{LatencyHistogram, StatusClass, label_value};

/// Which way a request goes through this proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the local app to a backend.
    Outbound,
    /// From a peer proxy to the local app.
    Inbound,
    /// Into the mesh through a virtual gateway.
    Gateway,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
            Self::Gateway => "gateway",
        }
    }
}
label_value!(Direction);

/// Where a request went. Outbound and gateway requests name the backend (`virtual_service`,
/// `port`), the route and the target; inbound ones the listener `port` and the `caller` (the
/// calling virtual node or gateway, once admitted). Empty where it does not apply.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Edge {
    pub direction: Direction,
    pub port: u16,
    pub virtual_service: String,
    pub route: String,
    pub target_virtual_node: String,
    pub caller: String,
}

impl Edge {
    /// Where requests go that took no route: only the way and the port are known.
    pub fn unrouted(direction: Direction, port: u16) -> Self {
        Self {
            direction,
            port,
            virtual_service: String::new(),
            route: String::new(),
            target_virtual_node: String::new(),
            caller: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EdgeStatus {
    #[prometheus(flatten)]
    edge: Edge,
    status_class: StatusClass,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EdgeGrpc {
    #[prometheus(flatten)]
    edge: Edge,
    /// The code's name as Envoy's `%GRPC_STATUS%` and gRPC's own Prometheus middleware write
    /// it (`OK`, `Unavailable`).
    grpc_status: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TimeoutLabels {
    #[prometheus(flatten)]
    edge: Edge,
    kind: TimeoutKind,
}

/// Which timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutKind {
    /// The route's perRequest timeout (all attempts).
    PerRequest,
    /// The retry policy's perRetryTimeout (one attempt).
    PerRetry,
    /// The route's or listener's idle timeout (a response body that stalled).
    Idle,
}

impl TimeoutKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerRequest => "per_request",
            Self::PerRetry => "per_retry",
            Self::Idle => "idle",
        }
    }
}
label_value!(TimeoutKind);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TargetLabels {
    target_virtual_node: String,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PortLabels {
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TlsLabels {
    direction: Direction,
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabels {
    listener: ListenerKind,
}

/// The kinds of listener a proxy has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// Peers' mTLS connections.
    Inbound,
    /// The explicit outbound listener (`HTTP_PROXY`).
    Outbound,
    /// A backend's VIP:port.
    Vip,
    /// A virtual gateway's listener.
    Gateway,
}

impl ListenerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
            Self::Vip => "vip",
            Self::Gateway => "gateway",
        }
    }
}
label_value!(ListenerKind);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BytesLabels {
    direction: Direction,
    /// `request` (received from the caller) or `response` (sent back to it).
    flow: &'static str,
}

/// The metric families of one proxy, registered on its registry.
pub struct ProxyMetrics {
    registry: Registry,
    requests: Family<EdgeStatus, Counter>,
    grpc: Family<EdgeGrpc, Counter>,
    latency: Family<Edge, LatencyHistogram>,
    retries: Family<Edge, Counter>,
    budget_exhausted: Family<Edge, Counter>,
    timeouts: Family<TimeoutLabels, Counter>,
    ejections: Family<TargetLabels, Counter>,
    pool_overflows: Family<PortLabels, Counter>,
    tls_failures: Family<TlsLabels, Counter>,
    connections: Family<ListenerLabels, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    config_version: Gauge,
    access_log_dropped: Counter,
    spans_dropped: Counter,
    /// Every edge resolved so far, for the traffic summaries.
    edges: std::sync::Mutex<std::collections::HashMap<Edge, Arc<EdgeStats>>>,
    /// Set when requests are not counted ([`ProxyMetrics::counting_nothing`]): every edge
    /// gets this one, which counts nothing.
    off: Option<Arc<EdgeStats>>,
}

impl AsRef<Registry> for ProxyMetrics {
    fn as_ref(&self) -> &Registry {
        &self.registry
    }
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyMetrics").finish_non_exhaustive()
    }
}

impl ProxyMetrics {
    /// The metrics of the proxy for `resource` (`virtual_node` or `virtual_gateway`, and its
    /// name) in `mesh`.
    pub fn new(mesh: &str, resource: (&'static str, &str)) -> Arc<Self> {
        Self::with_requests_counted(mesh, resource, true)
    }

    /// Like `new`; with `count` false requests are not counted (Envoy's `stats_matcher:
    /// reject_all`): no per-edge series and no traffic summaries, so what metrics cost can be
    /// measured against it.
    pub fn with_requests_counted(
        mesh: &str,
        resource: (&'static str, &str),
        count: bool,
    ) -> Arc<Self> {
        let labels = [
            (Cow::Borrowed("mesh"), Cow::Owned(mesh.to_string())),
            (
                Cow::Borrowed(resource.0),
                Cow::Owned(resource.1.to_string()),
            ),
        ];
        let mut registry = Registry::with_prefix_and_labels("trellis_proxy", labels.into_iter());
        let m = Self {
            requests: Family::default(),
            grpc: Family::default(),
            latency: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            timeouts: Family::default(),
            ejections: Family::default(),
            pool_overflows: Family::default(),
            tls_failures: Family::default(),
            connections: Family::default(),
            bytes: Family::default(),
            config_version: Gauge::default(),
            access_log_dropped: Counter::default(),
            spans_dropped: Counter::default(),
            edges: Default::default(),
            off: (!count).then(|| {
                let mut off = EdgeStats::detached();
                off.on = false;
                Arc::new(off)
            }),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by edge and status class (answers the proxy made itself included)",
            m.requests.clone(),
        );
        registry.register(
            "grpc_responses",
            "gRPC calls answered, by edge and grpc-status (from the response head, else mapped from a failed HTTP status, else from the trailers; Unknown without one, a reset's code, Canceled when the caller left before the end)",
            m.grpc.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response head, by edge",
            m.latency.clone(),
        );
        registry.register(
            "retries",
            "Attempts sent again under a route's retry policy",
            m.retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries the policy allowed and the retry budget refused",
            m.budget_exhausted.clone(),
        );
        registry.register(
            "timeouts",
            "Requests (per_request), attempts (per_retry) and stalled responses (idle) cut by a timeout",
            m.timeouts.clone(),
        );
        registry.register(
            "ejections",
            "Hosts ejected by outlier detection",
            m.ejections.clone(),
        );
        registry.register(
            "pool_overflows",
            "Inbound requests answered 503 because the listener's connection pool was full",
            m.pool_overflows.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "mTLS handshakes that failed, by direction and reason",
            m.tls_failures.clone(),
        );
        registry.register(
            "connections_active",
            "Connections open on the proxy's listeners",
            m.connections.clone(),
        );
        registry.register(
            "bytes",
            "Body bytes received with requests and sent with responses",
            m.bytes.clone(),
        );
        registry.register(
            "config_version",
            "The version of the config in force",
            m.config_version.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer was behind",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "spans_dropped",
            "Trace spans dropped because the OTLP exporter was behind",
            m.spans_dropped.clone(),
        );
        Arc::new(Self { registry, ..m })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The handles of one edge, to keep for as long as the config that names it (the same
    /// ones each time it is asked for).
    pub fn edge(&self, edge: Edge) -> Arc<EdgeStats> {
        if let Some(off) = &self.off {
            return off.clone();
        }
        let mut edges = self.edges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = edges.get(&edge) {
            return e.clone();
        }
        let stats = self.new_edge(edge.clone());
        edges.insert(edge, stats.clone());
        stats
    }

    /// Every edge with traffic, and its counters now.
    pub fn traffic(&self) -> Vec<(Edge, [u64; 5], Vec<u64>)> {
        let edges = self.edges.lock().unwrap_or_else(|e| e.into_inner());
        edges
            .iter()
            .filter(|(_, s)| s.by_class.iter().any(|c| c.get() > 0))
            .map(|(e, s)| {
                (
                    e.clone(),
                    s.by_class.each_ref().map(Counter::get),
                    s.latency.buckets(),
                )
            })
            .collect()
    }

    fn new_edge(&self, edge: Edge) -> Arc<EdgeStats> {
        let by_class = StatusClass::ALL.map(|status_class| {
            self.requests.get_or_create_owned(&EdgeStatus {
                edge: edge.clone(),
                status_class,
            })
        });
        let timeout = |kind| {
            self.timeouts.get_or_create_owned(&TimeoutLabels {
                edge: edge.clone(),
                kind,
            })
        };
        Arc::new(EdgeStats {
            by_class,
            latency: self.latency.get_or_create_owned(&edge),
            retries: self.retries.get_or_create_owned(&edge),
            budget_exhausted: self.budget_exhausted.get_or_create_owned(&edge),
            per_request_timeouts: timeout(TimeoutKind::PerRequest),
            per_retry_timeouts: timeout(TimeoutKind::PerRetry),
            idle_timeouts: timeout(TimeoutKind::Idle),
            request_bytes: self.bytes_counter(edge.direction, "request"),
            response_bytes: self.bytes_counter(edge.direction, "response"),
            grpc: Some(GrpcCounters {
                family: self.grpc.clone(),
                edge,
                by_code: Default::default(),
            }),
            on: true,
        })
    }

    fn bytes_counter(&self, direction: Direction, flow: &'static str) -> Counter {
        self.bytes
            .get_or_create_owned(&BytesLabels { direction, flow })
    }

    /// The ejection counter of one target (virtual node and port).
    pub fn ejections(&self, target_virtual_node: &str, port: u16) -> Counter {
        self.ejections.get_or_create_owned(&TargetLabels {
            target_virtual_node: target_virtual_node.to_string(),
            port,
        })
    }

    pub fn pool_overflows(&self, port: u16) -> Counter {
        self.pool_overflows
            .get_or_create_owned(&PortLabels { port })
    }

    pub fn tls_handshake_failed(&self, direction: Direction, reason: &str) {
        self.tls_failures
            .get_or_create(&TlsLabels {
                direction,
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The gauge of open connections on one kind of listener.
    pub fn connections(&self, listener: ListenerKind) -> Gauge {
        self.connections
            .get_or_create_owned(&ListenerLabels { listener })
    }

    pub fn spans_dropped(&self) -> Counter {
        self.spans_dropped.clone()
    }

    pub fn access_log_dropped(&self) -> Counter {
        self.access_log_dropped.clone()
    }

    pub fn set_config_version(&self, version: u64) {
        self.config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }
}

/// The counters of one edge (a route's target, an inbound listener and caller).
#[derive(Debug)]
pub struct EdgeStats {
    by_class: [Counter; 5],
    latency: LatencyHistogram,
    pub retries: Counter,
    pub budget_exhausted: Counter,
    pub per_request_timeouts: Counter,
    pub per_retry_timeouts: Counter,
    pub idle_timeouts: Counter,
    pub request_bytes: Counter,
    pub response_bytes: Counter,
    grpc: Option<GrpcCounters>,
    /// False when requests are not counted.
    pub on: bool,
}

/// An edge's gRPC series, each made on its first call: an edge that carries no gRPC shows none.
#[derive(Debug)]
struct GrpcCounters {
    family: Family<EdgeGrpc, Counter>,
    edge: Edge,
    by_code: [OnceLock<Counter>; 17],
}

impl GrpcCounters {
    fn inc(&self, code: u32) {
        use crate::model::grpc;
        // A code gRPC does not define is Unknown to its clients, and a label value a peer
        // could pick freely would make series without end.
        let (code, name) = match grpc::camel_name(code) {
            Some(name) => (code, name),
            None => (grpc::UNKNOWN, "Unknown"),
        };
        let Some(slot) = self.by_code.get(code as usize) else {
            return;
        };
        slot.get_or_init(|| {
            self.family.get_or_create_owned(&EdgeGrpc {
                edge: self.edge.clone(),
                grpc_status: name,
            })
        })
        .inc();
    }
}

impl EdgeStats {
    /// Counters registered nowhere (tests, and requests before any config).
    pub fn detached() -> Self {
        Self {
            by_class: Default::default(),
            latency: LatencyHistogram::default(),
            retries: Counter::default(),
            budget_exhausted: Counter::default(),
            per_request_timeouts: Counter::default(),
            per_retry_timeouts: Counter::default(),
            idle_timeouts: Counter::default(),
            request_bytes: Counter::default(),
            response_bytes: Counter::default(),
            grpc: None,
            on: true,
        }
    }

    /// One answered request: its status and how long its response head took.
    pub fn answered(&self, status: u16, took: Duration) {
        if !self.on {
            return;
        }
        self.by_class[StatusClass::of(status).index()].inc();
        self.latency.observe(took);
    }

    /// One gRPC call's end: the `grpc-status` its caller got.
    pub fn grpc_answered(&self, code: u32) {
        if let (true, Some(g)) = (self.on, &self.grpc) {
            g.inc(code);
        }
    }

    /// Whether gRPC calls are counted here (not when requests are not counted).
    pub fn counts_grpc(&self) -> bool {
        self.on && self.grpc.is_some()
    }

    /// The counter of request body bytes (`None` when requests are not counted).
    pub fn request_bytes(&self) -> Option<&Counter> {
        self.on.then_some(&self.request_bytes)
    }

    pub fn response_bytes(&self) -> Option<&Counter> {
        self.on.then_some(&self.response_bytes)
    }

    /// Requests answered with a status of `class`.
    pub fn count(&self, class: StatusClass) -> u64 {
        self.by_class[class.index()].get()
    }
}

/// A guard that counts one open connection while it lives.
pub struct ConnectionGuard(Gauge);

impl ConnectionGuard {
    pub fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edge_counts_by_class_and_the_text_carries_mesh_and_node() {
        let m = ProxyMetrics::new("demo", ("virtual_node", "front"));
        let edge = Edge {
            direction: Direction::Outbound,
            port: 9080,
            virtual_service: "color.demo.local".into(),
            route: "r1".into(),
            target_virtual_node: "red".into(),
            caller: String::new(),
        };
        let e = m.edge(edge.clone());
        for _ in 0..3 {
            e.answered(200, Duration::from_millis(2));
        }
        e.answered(503, Duration::from_millis(1));
        e.retries.inc();
        assert_eq!(e.count(StatusClass::Success), 3);
        let text = super::super::encode(m.registry());
        let line = text
            .lines()
            .find(|l| l.starts_with("trellis_proxy_requests_total{") && l.contains("2xx"))
            .unwrap_or_default();
        assert!(line.contains("mesh=\"demo\""), "{line}");
        assert!(line.contains("virtual_node=\"front\""), "{line}");
        assert!(line.contains("target_virtual_node=\"red\""), "{line}");
        assert!(line.ends_with(" 3"), "{line}");
        assert!(
            text.contains("trellis_proxy_request_duration_seconds_count{"),
            "{text}"
        );
        // The same edge resolved again shares the counters.
        let again = m.edge(edge);
        assert_eq!(again.count(StatusClass::Success), 3);
    }

    #[test]
    fn counting_nothing_leaves_no_request_series() {
        let m = ProxyMetrics::with_requests_counted("demo", ("virtual_node", "front"), false);
        let e = m.edge(Edge {
            direction: Direction::Inbound,
            port: 9080,
            virtual_service: String::new(),
            route: String::new(),
            target_virtual_node: String::new(),
            caller: String::new(),
        });
        e.answered(200, Duration::from_millis(1));
        assert_eq!(e.count(StatusClass::Success), 0);
        assert!(e.response_bytes().is_none());
        assert!(m.traffic().is_empty());
        let text = super::super::encode(m.registry());
        assert!(!text.contains("trellis_proxy_requests_total{"), "{text}");
    }
}
