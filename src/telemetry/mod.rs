//! What the roles tell their operators: the Prometheus registry each serves at `/metrics` and
//! the metric sets on it (`proxy` for the data plane, `control` for the control plane), with
//! the shared pieces: latency buckets, status classes, the text encoding. Metrics are handles
//! (atomics behind an `Arc`) that the request path resolves once per config, not per request;
//! label values come from the mesh's own resource names, so cardinality is bounded by the
//! config.

pub mod access_log;
pub mod control;
pub mod proxy;
pub mod trace;

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Request latency buckets in seconds: sub-millisecond hops to the 15 s default timeout.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    30.0,
];

/// The latency histogram of both roles, over [`LATENCY_BUCKETS`], made of atomics: no lock on
/// the request path (prometheus-client's takes one per observation), and its buckets can be
/// read back for the traffic summaries proxies report.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram(std::sync::Arc<LatencyInner>);

#[derive(Debug, Default)]
struct LatencyInner {
    /// Per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, took: std::time::Duration) {
        let secs = took.as_secs_f64();
        let i = LATENCY_BUCKETS.partition_point(|b| secs > *b);
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The count in each bucket (not cumulative; the last is +Inf).
    pub fn buckets(&self) -> Vec<u64> {
        self.0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    pub fn count(&self) -> u64 {
        self.buckets().iter().sum()
    }
}

/// The `q` quantile (0..1) of per-bucket counts over [`LATENCY_BUCKETS`], in seconds,
/// interpolated within its bucket as Prometheus's `histogram_quantile` does; `None` without
/// observations.
pub fn quantile(buckets: &[u64], q: f64) -> Option<f64> {
    // Counts may come from other processes (proxies' reports): saturate, never overflow.
    let total = buckets.iter().fold(0u64, |a, b| a.saturating_add(*b));
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        if *n > 0 && seen.saturating_add(*n) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
            let Some(upper) = LATENCY_BUCKETS.get(i) else {
                // Beyond the last bound: the last bound is all that is known.
                return LATENCY_BUCKETS.last().copied();
            };
            let into = (rank - seen as f64) / *n as f64;
            return Some(lower + (upper - lower) * into);
        }
        seen = seen.saturating_add(*n);
    }
    LATENCY_BUCKETS.last().copied()
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.buckets();
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied())
            .collect();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The content type of [`encode`]'s output: Prometheus's classic text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry in Prometheus's classic text format, which every scraper and `promtool check
/// metrics` read. prometheus-client writes OpenMetrics, which names a counter family without
/// its `_total` suffix in HELP and TYPE; the classic format names it as its samples are named,
/// and has no `# EOF`.
pub fn encode(registry: &Registry) -> String {
    let mut open_metrics = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut open_metrics, registry);
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 64 * counters.len());
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(kind);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// An HTTP status by its first digit, as App Mesh's Envoy stats group them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
}

/// A label value spelled by `as_str` (the derive spells variant names as written).
macro_rules! label_value {
    ($t:ty) => {
        impl prometheus_client::encoding::EncodeLabelValue for $t {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder,
            ) -> Result<(), std::fmt::Error> {
                use std::fmt::Write;
                encoder.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use label_value;

label_value!(StatusClass);

impl StatusClass {
    pub const ALL: [StatusClass; 5] = [
        Self::Informational,
        Self::Success,
        Self::Redirection,
        Self::ClientError,
        Self::ServerError,
    ];

    pub fn of(status: u16) -> Self {
        match status {
            0..=199 => Self::Informational,
            200..=299 => Self::Success,
            300..=399 => Self::Redirection,
            400..=499 => Self::ClientError,
            _ => Self::ServerError,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Informational => "1xx",
            Self::Success => "2xx",
            Self::Redirection => "3xx",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
        }
    }

    /// Its position in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_their_suffix_in_help_and_type() {
        let mut r = Registry::with_prefix("t");
        let c: prometheus_client::metrics::counter::Counter = Default::default();
        c.inc();
        r.register("hits", "Hits", c);
        let text = encode(&r);
        assert_eq!(
            text,
            "# HELP t_hits_total Hits.\n# TYPE t_hits_total counter\nt_hits_total 1\n"
        );
    }

    #[test]
    fn latency_histograms_bucket_encode_and_give_quantiles() {
        let h = LatencyHistogram::default();
        for ms in [1, 2, 2, 3, 40] {
            h.observe(std::time::Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 5);
        let mut r = Registry::default();
        r.register("lat", "Latency", h.clone());
        let text = encode(&r);
        assert!(text.contains("lat_count 5\n"), "{text}");
        assert!(text.contains("lat_bucket{le=\"0.0025\"} 3\n"), "{text}");
        assert!(text.contains("lat_bucket{le=\"+Inf\"} 5\n"), "{text}");
        // Three of five at or under 2.5 ms: the median lies in (1 ms, 2.5 ms].
        let p50 = quantile(&h.buckets(), 0.5).unwrap();
        assert!(p50 > 0.001 && p50 <= 0.0025, "{p50}");
        let p99 = quantile(&h.buckets(), 0.99).unwrap();
        assert!(p99 > 0.025 && p99 <= 0.05, "{p99}");
        assert_eq!(quantile(&[0; 17], 0.5), None);
    }

    #[test]
    fn status_classes_by_first_digit() {
        assert_eq!(StatusClass::of(200), StatusClass::Success);
        assert_eq!(StatusClass::of(101), StatusClass::Informational);
        assert_eq!(StatusClass::of(504), StatusClass::ServerError);
        assert_eq!(StatusClass::of(404).index(), 3);
        for (i, c) in StatusClass::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }
}
