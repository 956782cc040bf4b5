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

use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Request latency buckets in seconds: sub-millisecond hops to the 15 s default timeout.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    30.0,
];

pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
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
