//! Distributed tracing for proxied requests: the trace context a request carries (W3C
//! `traceparent`, or B3 as `x-b3-*` headers or the single `b3` header) continues through the
//! proxy with a span of its own. The request leaves with the same trace id and the proxy's span
//! as its parent, and the span is exported over OTLP/gRPC. Without an exporter the headers pass
//! untouched: a parent that is never reported would break the trace. Spans queue to a task that
//! sends them in batches; a full queue drops them (counted) rather than slow a request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::wire::otlp::collector::trace::v1::ExportTraceServiceRequest;
use crate::wire::otlp::collector::trace::v1::trace_service_client::TraceServiceClient;
use crate::wire::otlp::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use crate::wire::otlp::resource::v1::Resource;
use crate::wire::otlp::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};

/// Spans waiting for the exporter; beyond this they are dropped.
const QUEUE: usize = 8192;
/// Spans per export call.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const LINGER: Duration = Duration::from_secs(1);

/// Where a request's trace stands when it reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of the proxy's.
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
    pub format: Format,
}

/// How the context travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Multi,
    B3Single,
}

impl TraceContext {
    /// The context in `headers`: `traceparent` first, then B3.
    pub fn extract(headers: &HeaderMap) -> Option<Self> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(tp) = text("traceparent") {
            return parse_traceparent(tp);
        }
        // B3 may carry only a sampling decision (`b3: 0`, `x-b3-sampled: 0` without ids): a
        // caller that asks for no trace gets none started.
        let declined = || Self {
            trace_id: [0; 16],
            parent: None,
            sampled: false,
            format: Format::B3Multi,
        };
        if let Some(b3) = text("b3") {
            if b3.trim() == "0" {
                return Some(declined());
            }
            return parse_b3_single(b3);
        }
        let Some(trace_id) = text("x-b3-traceid") else {
            return matches!(text("x-b3-sampled"), Some("0" | "false")).then(declined);
        };
        let trace_id = parse_trace_id(trace_id)?;
        let parent = text("x-b3-spanid").and_then(hex_array::<8>);
        let sampled = text("x-b3-sampled").is_none_or(|s| s == "1" || s == "true")
            || text("x-b3-flags") == Some("1");
        Some(Self {
            trace_id,
            parent,
            sampled,
            format: Format::B3Multi,
        })
    }

    /// A new trace (the request came without one).
    pub fn root() -> Self {
        Self {
            trace_id: *uuid::Uuid::new_v4().as_bytes(),
            parent: None,
            sampled: true,
            format: Format::W3c,
        }
    }

    /// Writes the context with `span` as the parent the next hop sees.
    pub fn inject(&self, span: [u8; 8], headers: &mut HeaderMap) {
        let trace = hex(&self.trace_id);
        let id = hex(&span);
        let sampled = if self.sampled { "1" } else { "0" };
        let mut set = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        };
        match self.format {
            Format::W3c => set(
                "traceparent",
                format!("00-{trace}-{id}-{}", if self.sampled { "01" } else { "00" }),
            ),
            Format::B3Single => set("b3", format!("{trace}-{id}-{sampled}")),
            Format::B3Multi => {
                set("x-b3-traceid", trace);
                set("x-b3-spanid", id);
                if let Some(p) = self.parent {
                    set("x-b3-parentspanid", hex(&p));
                }
                set("x-b3-sampled", sampled.to_string());
            }
        }
    }
}

fn parse_traceparent(tp: &str) -> Option<TraceContext> {
    let mut parts = tp.trim().split('-');
    let version = parts.next()?;
    let trace_id = hex_array::<16>(parts.next()?)?;
    let parent = hex_array::<8>(parts.next()?)?;
    let flags = u8::from_str_radix(parts.next()?, 16).ok()?;
    if version.len() != 2 || version == "ff" || trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some(TraceContext {
        trace_id,
        parent: Some(parent),
        sampled: flags & 1 == 1,
        format: Format::W3c,
    })
}

fn parse_b3_single(b3: &str) -> Option<TraceContext> {
    let mut parts = b3.trim().split('-');
    let trace_id = parse_trace_id(parts.next()?)?;
    let parent = hex_array::<8>(parts.next()?)?;
    let sampled = parts.next().is_none_or(|s| s == "1" || s == "d");
    Some(TraceContext {
        trace_id,
        parent: Some(parent),
        sampled,
        format: Format::B3Single,
    })
}

/// A B3 trace id: 32 hex digits, or 16 (a 64-bit id, left-padded).
fn parse_trace_id(s: &str) -> Option<[u8; 16]> {
    if s.len() == 16 {
        let low = hex_array::<8>(s)?;
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&low);
        return Some(id);
    }
    hex_array::<16>(s).filter(|id| *id != [0; 16])
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new span id.
pub fn span_id() -> [u8; 8] {
    let u = uuid::Uuid::new_v4();
    let mut id = [0u8; 8];
    id.copy_from_slice(&u.as_bytes()[..8]);
    id
}

/// One proxied request, as it ends up in the trace.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub context: TraceContext,
    pub span_id: [u8; 8],
    pub name: String,
    /// Outbound and gateway requests: the proxy is the client of the next hop; inbound: the
    /// server of the caller.
    pub server: bool,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, String)>,
    pub status: u16,
}

impl SpanRecord {
    fn to_otlp(&self) -> Span {
        let nanos = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        };
        let mut attributes: Vec<KeyValue> = self
            .attributes
            .iter()
            .map(|(k, v)| string_kv(k, v))
            .collect();
        attributes.push(KeyValue {
            key: "http.response.status_code".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(i64::from(self.status))),
            }),
        });
        Span {
            trace_id: self.context.trace_id.to_vec(),
            span_id: self.span_id.to_vec(),
            parent_span_id: self.context.parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags: u32::from(self.context.sampled),
            name: self.name.clone(),
            kind: if self.server {
                span::SpanKind::Server
            } else {
                span::SpanKind::Client
            } as i32,
            start_time_unix_nano: nanos(self.start),
            end_time_unix_nano: nanos(self.end),
            attributes,
            status: Some(Status {
                message: String::new(),
                // OpenTelemetry's HTTP conventions: 5xx is an error; a client span also
                // counts 4xx.
                code: if self.status >= 500 || self.status == 0 {
                    status::StatusCode::Error
                } else {
                    status::StatusCode::Unset
                } as i32,
            }),
            ..Span::default()
        }
    }
}

fn string_kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.to_string())),
        }),
    }
}

/// Where spans go: a queue to the exporter task.
#[derive(Clone)]
pub struct Tracer {
    spans: mpsc::Sender<SpanRecord>,
    dropped: Counter,
}

impl Tracer {
    /// Starts exporting to the OTLP/gRPC `endpoint` (`http://host:4317`), with `resource`
    /// attributes (service name, mesh, virtual node …) on every batch.
    pub fn start(
        endpoint: &str,
        resource: Vec<(&'static str, String)>,
        dropped: Counter,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        let (spans, rx) = mpsc::channel(QUEUE);
        tokio::spawn(export(TraceServiceClient::new(channel), rx, resource));
        Ok(Self { spans, dropped })
    }

    pub fn record(&self, span: SpanRecord) {
        if self.spans.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// Sends spans in batches of up to [`BATCH`], at most [`LINGER`] after the first of a batch.
async fn export(
    mut client: TraceServiceClient<tonic::transport::Channel>,
    mut rx: mpsc::Receiver<SpanRecord>,
    resource: Vec<(&'static str, String)>,
) {
    let resource = Resource {
        attributes: resource.iter().map(|(k, v)| string_kv(k, v)).collect(),
        dropped_attributes_count: 0,
    };
    let scope = InstrumentationScope {
        name: "trellis-proxy".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..InstrumentationScope::default()
    };
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first.to_otlp()];
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s.to_otlp()),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len();
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope.clone()),
                    spans: batch,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        if let Err(e) = client.export(request).await {
            tracing::warn!(spans = n, error = %e, "OTLP export failed; spans dropped");
        }
    }
}

/// A span begun: the context it continues and its own id, with what names it.
pub struct ActiveSpan {
    pub context: TraceContext,
    pub span_id: [u8; 8],
    pub start: SystemTime,
    pub method: String,
    pub path: String,
    pub request_id: Option<String>,
}

impl ActiveSpan {
    /// Continues the request's trace (or starts one) with a new span, written into its
    /// headers for the next hop; `None` when the caller asked for no sampling (the headers
    /// then pass as they came).
    pub fn begin<B>(req: &mut http::Request<B>) -> Option<Self> {
        let context = TraceContext::extract(req.headers()).unwrap_or_else(TraceContext::root);
        if !context.sampled {
            return None;
        }
        let span_id = span_id();
        context.inject(span_id, req.headers_mut());
        let request_id = ensure_request_id(req.headers_mut());
        Some(Self {
            context,
            span_id,
            start: SystemTime::now(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            request_id,
        })
    }

    /// The finished span, named `name`, with `attributes` beside the request's own.
    pub fn end(
        self,
        name: String,
        server: bool,
        status: u16,
        mut attributes: Vec<(&'static str, String)>,
    ) -> SpanRecord {
        attributes.push(("http.request.method", self.method));
        attributes.push(("url.path", self.path));
        if let Some(id) = self.request_id {
            attributes.push(("guid:x-request-id", id));
        }
        SpanRecord {
            context: self.context,
            span_id: self.span_id,
            name,
            server,
            start: self.start,
            end: SystemTime::now(),
            attributes,
            status,
        }
    }
}

/// Makes sure the request carries an `x-request-id` (a new UUID when it has none), as Envoy
/// does at the edge; returns it.
pub fn ensure_request_id(headers: &mut HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        return Some(v.to_string());
    }
    let id = uuid::Uuid::new_v4().to_string();
    let v = HeaderValue::from_str(&id).ok()?;
    headers.insert("x-request-id", v);
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_continues_with_the_same_trace_and_a_new_parent() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let ctx = TraceContext::extract(&h).unwrap();
        assert!(ctx.sampled);
        assert_eq!(hex(&ctx.parent.unwrap()), "00f067aa0ba902b7");
        let mine = [1, 2, 3, 4, 5, 6, 7, 8];
        ctx.inject(mine, &mut h);
        assert_eq!(
            h["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
    }

    #[test]
    fn b3_multi_and_single_headers_continue_too() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-b3-traceid",
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7"),
        );
        h.insert("x-b3-spanid", HeaderValue::from_static("e457b5a2e4d86bd1"));
        h.insert("x-b3-sampled", HeaderValue::from_static("1"));
        let ctx = TraceContext::extract(&h).unwrap();
        assert_eq!(ctx.format, Format::B3Multi);
        ctx.inject([9; 8], &mut h);
        assert_eq!(h["x-b3-traceid"], "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(h["x-b3-spanid"], "0909090909090909");
        assert_eq!(h["x-b3-parentspanid"], "e457b5a2e4d86bd1");

        let mut h = HeaderMap::new();
        h.insert(
            "b3",
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        );
        let ctx = TraceContext::extract(&h).unwrap();
        ctx.inject([9; 8], &mut h);
        assert_eq!(
            h["b3"],
            "80f198ee56343ba864fe8b2a57d3eff7-0909090909090909-1"
        );
        // A 64-bit B3 trace id is left-padded to 128 bits.
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", HeaderValue::from_static("64fe8b2a57d3eff7"));
        let ctx = TraceContext::extract(&h).unwrap();
        assert_eq!(hex(&ctx.trace_id), "000000000000000064fe8b2a57d3eff7");
    }

    #[test]
    fn a_b3_decision_not_to_sample_starts_no_trace() {
        for (name, value) in [("b3", "0"), ("x-b3-sampled", "0")] {
            let mut req = http::Request::new(());
            req.headers_mut()
                .insert(name, HeaderValue::from_static(value));
            assert!(ActiveSpan::begin(&mut req).is_none(), "{name}: {value}");
            assert!(!req.headers().contains_key("traceparent"));
        }
        let mut req = http::Request::new(());
        assert!(
            ActiveSpan::begin(&mut req).is_some(),
            "no context: a new trace"
        );
        assert!(req.headers().contains_key("traceparent"));
    }

    #[test]
    fn malformed_contexts_are_ignored() {
        for tp in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f35-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", HeaderValue::from_static(tp));
            assert_eq!(TraceContext::extract(&h), None, "{tp}");
        }
    }

    #[test]
    fn a_request_id_is_added_once() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h).unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(ensure_request_id(&mut h), Some(id));
    }
}
