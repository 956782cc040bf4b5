//! Golden signals with nothing else installed: the traffic summaries connected proxies send on
//! their config streams (cumulative counts per edge), kept per proxy with the report before,
//! and served as `GET /v1/traffic` (what `trellis top` shows): per edge and per virtual
//! service, requests so far, requests per second, success rate (answers that are not 5xx) and
//! latency percentiles over the last reporting interval. A node knows the proxies connected to
//! it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::telemetry::{LATENCY_BUCKETS, quantile};
use crate::wire::discovery::EdgeTraffic;

/// The traffic of the proxies connected to this node, by proxy id.
pub type TrafficTable = Arc<Mutex<HashMap<String, ProxyTraffic>>>;

/// One proxy's last two reports.
#[derive(Debug, Clone)]
pub struct ProxyTraffic {
    pub mesh: String,
    /// `virtualNode/<name>` or `virtualGateway/<name>`.
    pub resource: String,
    previous: Option<(Instant, Vec<EdgeTraffic>)>,
    current: (Instant, Vec<EdgeTraffic>),
}

/// Keeps `edges` as `proxy_id`'s latest report.
pub fn record(
    table: &TrafficTable,
    proxy_id: &str,
    mesh: &str,
    resource: &str,
    edges: Vec<EdgeTraffic>,
) {
    let now = Instant::now();
    let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
    match t.get_mut(proxy_id) {
        Some(p) => {
            let before = std::mem::replace(&mut p.current, (now, edges));
            p.previous = Some(before);
        }
        None => {
            t.insert(
                proxy_id.to_string(),
                ProxyTraffic {
                    mesh: mesh.to_string(),
                    resource: resource.to_string(),
                    previous: None,
                    current: (now, edges),
                },
            );
        }
    }
}

/// One edge (or service) as `/v1/traffic` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Signals {
    pub requests: u64,
    /// Per second over the last interval (0 until a proxy has reported twice).
    pub rps: f64,
    /// Answers that were not 5xx, over the last interval (over all when it had none).
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeRow {
    pub mesh: String,
    /// The reporting proxy's resource.
    pub source: String,
    pub direction: String,
    pub port: u32,
    pub virtual_service: String,
    pub route: String,
    pub target_virtual_node: String,
    pub caller: String,
    #[serde(flatten)]
    pub signals: Signals,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRow {
    pub mesh: String,
    pub virtual_service: String,
    #[serde(flatten)]
    pub signals: Signals,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    pub proxies: usize,
    /// Calls to virtual services, summed over their callers (outbound and gateway edges).
    pub services: Vec<ServiceRow>,
    pub edges: Vec<EdgeRow>,
}

/// Counts over an interval (or since the start), added up across edges.
#[derive(Debug, Clone, Default)]
struct Window {
    total: u64,
    /// Answers in the interval, for the rate.
    in_interval: u64,
    by_class: [u64; 5],
    latency: Vec<u64>,
    seconds: f64,
    /// The counts are over an interval (not since the start).
    interval: bool,
}

impl Window {
    fn add(&mut self, other: &Window) {
        // Counts come from proxies over the network: saturate, never overflow.
        self.total = self.total.saturating_add(other.total);
        self.in_interval = self.in_interval.saturating_add(other.in_interval);
        for (a, b) in self.by_class.iter_mut().zip(other.by_class) {
            *a = a.saturating_add(b);
        }
        if self.latency.len() < other.latency.len() {
            self.latency.resize(other.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a = a.saturating_add(*b);
        }
        self.seconds = self.seconds.max(other.seconds);
        self.interval |= other.interval;
    }

    fn signals(&self) -> Signals {
        let answered = sum(&self.by_class);
        let ms = |q| quantile(&self.latency, q).map(|s| (s * 1e6).round() / 1e3);
        Signals {
            requests: self.total,
            rps: if self.interval && self.seconds > 0.0 {
                (self.in_interval as f64 / self.seconds * 100.0).round() / 100.0
            } else {
                0.0
            },
            success_rate: (answered > 0).then(|| 1.0 - self.by_class[4] as f64 / answered as f64),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
        }
    }
}

fn sum(counts: &[u64]) -> u64 {
    counts.iter().fold(0, |a, b| a.saturating_add(*b))
}

fn key(e: &EdgeTraffic) -> (&str, u32, &str, &str, &str, &str) {
    (
        &e.direction,
        e.port,
        &e.virtual_service,
        &e.route,
        &e.target_virtual_node,
        &e.caller,
    )
}

/// What the table says now.
pub fn summary(table: &TrafficTable) -> Traffic {
    let t = table.lock().unwrap_or_else(|e| e.into_inner());
    let mut edges = Vec::new();
    let mut services: BTreeMap<(String, String), Window> = BTreeMap::new();
    for p in t.values() {
        let (now, current) = &p.current;
        // By key: a proxy with thousands of edges, looked up per edge, under the table's lock.
        let previous: HashMap<_, _> = p
            .previous
            .iter()
            .flat_map(|(then, prev)| {
                let secs = now.duration_since(*then).as_secs_f64();
                prev.iter().map(move |x| (key(x), (secs, x)))
            })
            .collect();
        for e in current {
            let before = previous.get(&key(e)).copied();
            let window = window(e, before);
            // Answers that took no route (a gateway's refusals, egress) name no service.
            if e.direction != "inbound" && !e.virtual_service.is_empty() {
                services
                    .entry((p.mesh.clone(), e.virtual_service.clone()))
                    .or_default()
                    .add(&window);
            }
            edges.push(EdgeRow {
                mesh: p.mesh.clone(),
                source: p.resource.clone(),
                direction: e.direction.clone(),
                port: e.port,
                virtual_service: e.virtual_service.clone(),
                route: e.route.clone(),
                target_virtual_node: e.target_virtual_node.clone(),
                caller: e.caller.clone(),
                signals: window.signals(),
            });
        }
    }
    edges.sort_by(|a, b| {
        (
            &a.mesh,
            &a.source,
            &a.direction,
            &a.virtual_service,
            &a.route,
            &a.target_virtual_node,
        )
            .cmp(&(
                &b.mesh,
                &b.source,
                &b.direction,
                &b.virtual_service,
                &b.route,
                &b.target_virtual_node,
            ))
    });
    Traffic {
        proxies: t.len(),
        services: services
            .into_iter()
            .map(|((mesh, virtual_service), w)| ServiceRow {
                mesh,
                virtual_service,
                signals: w.signals(),
            })
            .collect(),
        edges,
    }
}

/// An edge's counts over the last interval when there was a report before (with traffic in
/// it), else since the proxy started; `total` is always since the start.
fn window(e: &EdgeTraffic, before: Option<(f64, &EdgeTraffic)>) -> Window {
    let total = sum(&e.by_class);
    let class = |v: &[u64]| -> [u64; 5] {
        let mut out = [0u64; 5];
        for (o, x) in out.iter_mut().zip(v) {
            *o = *x;
        }
        out
    };
    let now = class(&e.by_class);
    let mut latency = e.latency_buckets.clone();
    latency.resize(LATENCY_BUCKETS.len() + 1, 0);
    match before {
        Some((seconds, b)) => {
            let then = class(&b.by_class);
            let by_class = std::array::from_fn(|i| now[i].saturating_sub(then[i]));
            let delta: Vec<u64> = latency
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(b.latency_buckets.get(i).copied().unwrap_or(0)))
                .collect();
            let in_interval = sum(&by_class);
            // A quiet interval says nothing about success or latency: keep the long view.
            let quiet = in_interval == 0;
            Window {
                total,
                in_interval,
                by_class: if quiet { now } else { by_class },
                latency: if quiet { latency } else { delta },
                seconds,
                interval: true,
            }
        }
        None => Window {
            total,
            in_interval: 0,
            by_class: now,
            latency,
            seconds: 0.0,
            interval: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(ok: u64, failed: u64, fast: u64) -> EdgeTraffic {
        let mut latency = vec![0u64; LATENCY_BUCKETS.len() + 1];
        latency[1] = fast; // ≤ 1 ms
        latency[5] = ok + failed - fast; // ≤ 25 ms
        EdgeTraffic {
            direction: "outbound".into(),
            port: 9080,
            virtual_service: "color.demo.local".into(),
            route: "color".into(),
            target_virtual_node: "red".into(),
            caller: String::new(),
            by_class: vec![0, ok, 0, 0, failed],
            latency_buckets: latency,
        }
    }

    #[test]
    fn reports_become_totals_rates_success_and_percentiles() {
        let table = TrafficTable::default();
        record(
            &table,
            "p1",
            "demo",
            "virtualNode/client",
            vec![edge(90, 10, 100)],
        );
        let s = summary(&table);
        assert_eq!(s.proxies, 1);
        let e = &s.edges[0].signals;
        assert_eq!(e.requests, 100);
        assert_eq!(e.rps, 0.0);
        assert_eq!(e.success_rate, Some(0.9));
        assert!(e.p99_ms.is_some_and(|p| p <= 1.0), "{e:?}");
        // The next report: 100 more, all slow and fine.
        record(
            &table,
            "p1",
            "demo",
            "virtualNode/client",
            vec![edge(190, 10, 100)],
        );
        let s = summary(&table);
        let e = &s.edges[0].signals;
        assert_eq!(e.requests, 200);
        assert!(e.rps > 0.0);
        assert_eq!(e.success_rate, Some(1.0));
        assert!(e.p50_ms.is_some_and(|p| p > 10.0 && p <= 25.0), "{e:?}");
        assert_eq!(s.services[0].virtual_service, "color.demo.local");
        assert_eq!(s.services[0].signals.requests, 200);
        // Nothing moved since: no rate; success and latency keep the long view.
        record(
            &table,
            "p1",
            "demo",
            "virtualNode/client",
            vec![edge(190, 10, 100)],
        );
        let e = &summary(&table).edges[0].signals;
        assert_eq!((e.requests, e.rps), (200, 0.0));
        assert_eq!(e.success_rate, Some(0.95));
        assert!(e.p50_ms.is_some());
        // Nonsense counts from a proxy do not take the summary down.
        let mut wild = edge(1, 0, 1);
        wild.by_class = vec![u64::MAX, u64::MAX, 1, 0, 0];
        wild.latency_buckets = vec![u64::MAX; 17];
        record(&table, "p2", "demo", "virtualNode/other", vec![wild]);
        assert_eq!(summary(&table).services[0].signals.requests, u64::MAX);
        table.lock().unwrap().remove("p2");
        // Answers that took no route are edges, not a service.
        let mut refused = edge(0, 0, 0);
        refused.virtual_service = String::new();
        refused.by_class = vec![0, 0, 0, 3, 0];
        refused.latency_buckets[1] = 3;
        record(&table, "p3", "demo", "virtualNode/other", vec![refused]);
        let s = summary(&table);
        assert_eq!(s.edges.len(), 2);
        assert_eq!(s.services.len(), 1, "{:?}", s.services);
        table.lock().unwrap().remove("p3");
        // A proxy that leaves takes its edges along.
        table.lock().unwrap().remove("p1");
        assert!(summary(&table).edges.is_empty());
    }
}
