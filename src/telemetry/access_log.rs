//! Access logs as App Mesh's `logging.accessLog.file` asks: a line per request in the spec's
//! text format (Envoy's default when none) or a JSON object per line, written by a thread of
//! its own so the request path never waits on the disk. The writer gathers lines for
//! [`GATHER`] before writing them, so a busy proxy wakes it and writes its file a few dozen
//! times a second rather than every few requests. A full queue drops the line and counts it
//! (`trellis_proxy_access_log_dropped_total`) rather than slow a request.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;

use crate::model::access_log::{self, FormatError, GrpcStatusFormat, Operator, Piece};
use crate::model::grpc;
use crate::model::shapes::LoggingFormat;

/// Lines waiting for the writer; beyond this they are dropped (over 800,000 lines a second
/// with [`GATHER`]).
const QUEUE: usize = 16 * 1024;

/// How long the writer lets lines gather after the first before it writes them. Woken for
/// every few lines, as it was when it wrote as soon as any came, the writer cost each request
/// a futex call and a context switch, and each few lines a write: logging took about 40 % of a
/// busy sidecar's CPU. A line reaches the file within this (Envoy flushes every 10 s).
const GATHER: Duration = Duration::from_millis(20);

/// Envoy's response flags: why a request did not get an upstream's answer as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    /// NR: no route matched.
    NoRoute,
    /// UH: no healthy upstream host.
    NoHealthyUpstream,
    /// UF: the upstream connection failed.
    UpstreamConnectionFailure,
    /// UC: the upstream connection or stream ended before the response.
    UpstreamConnectionTermination,
    /// UT: a timeout (per request, or the last attempt's).
    UpstreamRequestTimeout,
    /// UO: a connection pool was full.
    UpstreamOverflow,
    /// URX: the answer stands because retries ran out (policy or budget).
    UpstreamRetryLimitExceeded,
    /// RBAC: refused by the access rules (mesh access model, TLS mode, egress filter).
    Denied,
    /// DPE: the request was malformed.
    DownstreamProtocolError,
    /// DC: the caller went away before the answer.
    DownstreamConnectionTermination,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRoute => "NR",
            Self::NoHealthyUpstream => "UH",
            Self::UpstreamConnectionFailure => "UF",
            Self::UpstreamConnectionTermination => "UC",
            Self::UpstreamRequestTimeout => "UT",
            Self::UpstreamOverflow => "UO",
            Self::UpstreamRetryLimitExceeded => "URX",
            Self::Denied => "RBAC",
            Self::DownstreamProtocolError => "DPE",
            Self::DownstreamConnectionTermination => "DC",
        }
    }
}

/// What one request leaves for its log line.
#[derive(Debug, Clone)]
pub struct Entry {
    pub start: SystemTime,
    pub protocol: &'static str,
    /// The values of [`AccessLogFormat::request_headers`], in order.
    pub request_headers: Vec<Option<String>>,
    /// The values of [`AccessLogFormat::response_headers`], in order.
    pub response_headers: Vec<Option<String>>,
    /// 0 when no response was sent.
    pub status: u16,
    pub flag: Option<ResponseFlag>,
    pub details: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// To the end of the response.
    pub duration: Duration,
    /// To the response head.
    pub response_duration: Option<Duration>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: String,
    pub attempts: u32,
    pub route: String,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub server_name: Option<String>,
    /// Whether the request was gRPC (its content-type).
    pub grpc: bool,
    /// The `grpc-status` of the trailers, else of the response head.
    pub grpc_status: Option<u32>,
}

/// A compiled format: text pieces, or JSON keys with their pieces; and the headers it reads,
/// so a request copies only those.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogFormat {
    layout: Layout,
    request_headers: Vec<String>,
    response_headers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Layout {
    Text(Vec<Piece>),
    Json(Vec<(String, Vec<Piece>)>),
}

impl AccessLogFormat {
    /// The spec's format; Envoy's default text line when none.
    pub fn new(format: Option<&LoggingFormat>) -> Result<Self, FormatError> {
        let layout = match format {
            Some(LoggingFormat {
                json: Some(items), ..
            }) => Layout::Json(
                items
                    .iter()
                    .map(|i| Ok((i.key.clone(), access_log::parse(&i.value)?)))
                    .collect::<Result<_, FormatError>>()?,
            ),
            Some(LoggingFormat { text: Some(t), .. }) => Layout::Text(access_log::parse(t)?),
            _ => Layout::Text(access_log::parse(access_log::DEFAULT_TEXT)?),
        };
        let mut f = Self {
            layout,
            request_headers: Vec::new(),
            response_headers: Vec::new(),
        };
        let pieces: Vec<&Piece> = match &f.layout {
            Layout::Text(p) => p.iter().collect(),
            Layout::Json(items) => items.iter().flat_map(|(_, p)| p).collect(),
        };
        for p in pieces {
            let (list, names) = match p {
                Piece::Op(Operator::Req(h, alt), _) => {
                    (&mut f.request_headers, [Some(h), alt.as_ref()])
                }
                Piece::Op(Operator::Resp(h, alt), _) => {
                    (&mut f.response_headers, [Some(h), alt.as_ref()])
                }
                _ => continue,
            };
            for n in names.into_iter().flatten() {
                if !list.contains(n) {
                    list.push(n.clone());
                }
            }
        }
        Ok(f)
    }

    /// The request headers the format reads (lower case; `:method`, `:path`, `:authority`,
    /// `:scheme` for the pseudo-headers).
    pub fn request_headers(&self) -> &[String] {
        &self.request_headers
    }

    pub fn response_headers(&self) -> &[String] {
        &self.response_headers
    }

    /// The entry's line, newline-terminated.
    pub fn render(&self, e: &Entry) -> String {
        let mut out = String::with_capacity(256);
        match &self.layout {
            Layout::Text(pieces) => {
                for p in pieces {
                    match p {
                        Piece::Text(t) => out.push_str(t),
                        Piece::Op(op, max) => {
                            let v = self.value(op, e);
                            out.push_str(truncate(v.as_deref().unwrap_or("-"), *max));
                        }
                    }
                }
                if !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            Layout::Json(items) => {
                let mut map = serde_json::Map::new();
                for (key, pieces) in items {
                    map.insert(key.clone(), self.json_value(pieces, e));
                }
                out.push_str(&serde_json::Value::Object(map).to_string());
                out.push('\n');
            }
        }
        out
    }

    /// A JSON value: a lone numeric operator stays a number, a missing lone value is null,
    /// anything else is a string.
    fn json_value(&self, pieces: &[Piece], e: &Entry) -> serde_json::Value {
        if let [Piece::Op(op, max)] = pieces {
            let v = self.value(op, e);
            return match v {
                None => serde_json::Value::Null,
                Some(s) if op.numeric() && max.is_none() => s
                    .parse::<u64>()
                    .map_or(serde_json::Value::String(s), serde_json::Value::from),
                Some(s) => serde_json::Value::String(truncate(&s, *max).to_string()),
            };
        }
        let mut s = String::new();
        for p in pieces {
            match p {
                Piece::Text(t) => s.push_str(t),
                Piece::Op(op, max) => {
                    s.push_str(truncate(self.value(op, e).as_deref().unwrap_or("-"), *max))
                }
            }
        }
        serde_json::Value::String(s)
    }

    fn value(&self, op: &Operator, e: &Entry) -> Option<String> {
        let header = |names: &[String], values: &[Option<String>], h: &String| {
            names
                .iter()
                .position(|n| n == h)
                .and_then(|i| values.get(i).cloned().flatten())
        };
        let ms = |d: Duration| d.as_millis().to_string();
        match op {
            Operator::StartTime(fmt) => Some(format_time(e.start, fmt.as_deref())),
            Operator::Req(h, alt) => {
                header(&self.request_headers, &e.request_headers, h).or_else(|| {
                    alt.as_ref()
                        .and_then(|a| header(&self.request_headers, &e.request_headers, a))
                })
            }
            Operator::Resp(h, alt) => header(&self.response_headers, &e.response_headers, h)
                .or_else(|| {
                    alt.as_ref()
                        .and_then(|a| header(&self.response_headers, &e.response_headers, a))
                }),
            Operator::Protocol => Some(e.protocol.to_string()),
            Operator::ResponseCode => Some(e.status.to_string()),
            Operator::ResponseFlags => e.flag.map(|f| f.as_str().to_string()),
            Operator::ResponseCodeDetails => (!e.details.is_empty()).then(|| e.details.clone()),
            Operator::BytesReceived => Some(e.bytes_received.to_string()),
            Operator::BytesSent => Some(e.bytes_sent.to_string()),
            Operator::Duration => Some(ms(e.duration)),
            Operator::ResponseDuration => e.response_duration.map(ms),
            Operator::UpstreamHost => e.upstream_host.map(|a| a.to_string()),
            Operator::UpstreamCluster => {
                (!e.upstream_cluster.is_empty()).then(|| e.upstream_cluster.clone())
            }
            Operator::UpstreamRequestAttemptCount => Some(e.attempts.to_string()),
            Operator::RouteName => (!e.route.is_empty()).then(|| e.route.clone()),
            Operator::DownstreamRemoteAddress => e.downstream_remote.map(|a| a.to_string()),
            Operator::DownstreamRemoteAddressWithoutPort => {
                e.downstream_remote.map(|a| a.ip().to_string())
            }
            Operator::DownstreamLocalAddress => e.downstream_local.map(|a| a.to_string()),
            Operator::RequestedServerName => e.server_name.clone(),
            Operator::Hostname => hostname(),
            Operator::GrpcStatus(format) => {
                // As Envoy's: a gRPC request's status, inferred from the HTTP status when the
                // answer carried none (a proxy's 503, a stream cut short: UNKNOWN).
                if !e.grpc {
                    return None;
                }
                let code = e
                    .grpc_status
                    .or_else(|| (e.status != 0).then(|| grpc::from_http_status(e.status)))?;
                let name = match format {
                    GrpcStatusFormat::Camel => grpc::camel_name(code),
                    GrpcStatusFormat::Snake => grpc::snake_name(code),
                    GrpcStatusFormat::Number => None,
                };
                Some(name.map_or_else(|| code.to_string(), str::to_string))
            }
        }
    }
}

fn truncate(s: &str, max: Option<usize>) -> &str {
    match max {
        Some(n) if s.len() > n => {
            let mut end = n;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            &s[..end]
        }
        _ => s,
    }
}

/// Read once: rendering runs on the request path.
fn hostname() -> Option<String> {
    static HOSTNAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    HOSTNAME
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .clone()
}

/// RFC 3339 in UTC with milliseconds (Envoy's default), or the given strftime subset.
pub fn format_time(t: SystemTime, format: Option<&str>) -> String {
    let dt = time::OffsetDateTime::from(t);
    let Some(f) = format else {
        return format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second(),
            dt.millisecond()
        );
    };
    let mut out = String::new();
    let mut chars = f.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&format!("{:04}", dt.year())),
            Some('m') => out.push_str(&format!("{:02}", u8::from(dt.month()))),
            Some('d') => out.push_str(&format!("{:02}", dt.day())),
            Some('H') => out.push_str(&format!("{:02}", dt.hour())),
            Some('M') => out.push_str(&format!("{:02}", dt.minute())),
            Some('S') => out.push_str(&format!("{:02}", dt.second())),
            Some('s') => out.push_str(&dt.unix_timestamp().to_string()),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(d @ ('3' | '6' | '9')) => {
                chars.next();
                let digits = usize::from(d as u8 - b'0');
                let nanos = format!("{:09}", dt.nanosecond());
                out.push_str(&nanos[..digits]);
            }
            Some(x) => {
                out.push('%');
                out.push(x);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Bumped by [`reopen_files`]; each writer reopens its file when it sees a new value.
static REOPEN: AtomicU64 = AtomicU64::new(0);

/// Asks every access-log writer to reopen its file before its next line (SIGHUP, after
/// logrotate moved the old file away).
pub fn reopen_files() {
    REOPEN.fetch_add(1, Ordering::Relaxed);
}

/// Where a proxy's lines go: a queue to a writer thread that owns the file. Dropped, it tells
/// the thread to write what is queued and end (at once, not after gathering); the process
/// waits for that with [`finish_writing`] before it exits.
pub struct AccessLogWriter {
    path: String,
    lines: SyncSender<String>,
    writer: std::thread::Thread,
    dropped: Counter,
}

/// Writer threads still running, and their ends announced.
static RUNNING: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// How long an exiting process waits for its access logs' last lines (a blocked stdout pipe
/// must not hold it forever).
const FINISH: Duration = Duration::from_secs(2);

/// Waits until every dropped writer has written its queued lines (at most [`FINISH`]):
/// called once the runtime that held the writers is gone, so an exiting process loses no line.
pub fn finish_writing() {
    let (running, ended) = &RUNNING;
    let running = running.lock().unwrap_or_else(|e| e.into_inner());
    let _ = ended.wait_timeout_while(running, FINISH, |n| *n > 0);
}

impl AccessLogWriter {
    /// Opens `path` for appending (`/dev/stdout` and `/dev/stderr` write to the process's
    /// own) and starts its writer.
    pub fn open(path: &str, dropped: Counter) -> std::io::Result<Self> {
        let sink = Sink::open(path)?;
        let (lines, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let count = |change: fn(&mut usize)| {
            let (running, ended) = &RUNNING;
            change(&mut running.lock().unwrap_or_else(|e| e.into_inner()));
            ended.notify_all();
        };
        count(|n| *n += 1);
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                write_lines(rx, sink);
                count(|n| *n -= 1);
            });
        let writer = match writer {
            Ok(w) => w.thread().clone(),
            Err(e) => {
                count(|n| *n -= 1);
                return Err(e);
            }
        };
        Ok(Self {
            path: path.to_string(),
            lines,
            writer,
            dropped,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Queues a line; drops it (and counts) when the writer is behind.
    pub fn log(&self, line: String) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.lines.try_send(line)
        {
            self.dropped.inc();
        }
    }
}

impl Drop for AccessLogWriter {
    fn drop(&mut self) {
        // Unparked, the writer stops gathering and writes at once; the queue's sender, dropped
        // right after this, tells it to end once the queue is empty. Not joined: this may run
        // on a shard, and a file (or a stdout pipe) can block.
        self.writer.unpark();
    }
}

/// An access log's destination: the process's stdout or stderr, or a file appended to.
struct Sink {
    path: String,
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    /// The [`REOPEN`] value the file was opened at.
    opened_at: u64,
}

impl Sink {
    fn open(path: &str) -> std::io::Result<Self> {
        let opened_at = REOPEN.load(Ordering::Relaxed);
        let out: Box<dyn Write + Send> = match path {
            "/dev/stdout" => Box::new(std::io::stdout()),
            "/dev/stderr" => Box::new(std::io::stderr()),
            p => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        Ok(Self {
            path: path.to_string(),
            out: std::io::BufWriter::with_capacity(64 * 1024, out),
            opened_at,
        })
    }

    /// Reopens the file if a reopen was asked for since it was opened; on failure the old
    /// file keeps the lines.
    fn reopen_if_asked(&mut self) {
        if REOPEN.load(Ordering::Relaxed) == self.opened_at || self.path.starts_with("/dev/std") {
            return;
        }
        let _ = self.out.flush();
        match Sink::open(&self.path) {
            Ok(new) => *self = new,
            Err(e) => {
                self.opened_at = REOPEN.load(Ordering::Relaxed);
                tracing::warn!(path = %self.path, error = %e, "access log: cannot reopen; keeping the old file");
            }
        }
    }
}

/// Waits for a line, lets more gather for [`GATHER`], writes them all and flushes; ends when
/// the queue's sender is gone, after writing what it held.
fn write_lines(rx: Receiver<String>, mut sink: Sink) {
    while let Ok(line) = rx.recv() {
        // Parked, not blocked on the queue: a sender finds no waiting receiver to wake. The
        // writer's owner unparks it when it goes away; a spurious wake only writes early.
        std::thread::park_timeout(GATHER);
        sink.reopen_if_asked();
        let out = &mut sink.out;
        let mut result = out.write_all(line.as_bytes());
        while let Ok(more) = rx.try_recv() {
            result = result.and_then(|()| out.write_all(more.as_bytes()));
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "access log: write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::shapes::JsonFormatRef;

    fn entry(f: &AccessLogFormat) -> Entry {
        let req = |h: &str| match h {
            ":method" => Some("GET".to_string()),
            ":path" => Some("/color?x=1".to_string()),
            ":authority" => Some("color.demo.local:9080".to_string()),
            "user-agent" => Some("curl/8".to_string()),
            "x-request-id" => Some("abc".to_string()),
            _ => None,
        };
        Entry {
            // 2026-11-24T01:02:03.456Z
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_482_123_456),
            protocol: "HTTP/1.1",
            request_headers: f.request_headers().iter().map(|h| req(h)).collect(),
            response_headers: vec![None; f.response_headers().len()],
            status: 503,
            flag: Some(ResponseFlag::UpstreamRetryLimitExceeded),
            details: String::new(),
            bytes_received: 0,
            bytes_sent: 19,
            duration: Duration::from_millis(42),
            response_duration: Some(Duration::from_millis(41)),
            upstream_host: Some("127.0.0.61:15000".parse().unwrap()),
            upstream_cluster: "red:9080".into(),
            attempts: 3,
            route: "color".into(),
            downstream_remote: None,
            downstream_local: None,
            server_name: None,
            grpc: false,
            grpc_status: None,
        }
    }

    #[test]
    fn the_default_line_is_envoys() {
        let f = AccessLogFormat::new(None).unwrap();
        let line = f.render(&entry(&f));
        assert_eq!(
            line,
            "[2026-11-24T01:02:03.456Z] \"GET /color?x=1 HTTP/1.1\" 503 URX 0 19 42 - \"-\" \"curl/8\" \"abc\" \"color.demo.local:9080\" \"127.0.0.61:15000\"\n"
        );
    }

    #[test]
    fn text_and_json_formats_render_field_for_field() {
        let text = LoggingFormat {
            json: None,
            text: Some(
                "%START_TIME(%s)% %RESPONSE_CODE% %ROUTE_NAME% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %REQ(X-MISSING?USER-AGENT):4%"
                    .into(),
            ),
        };
        let f = AccessLogFormat::new(Some(&text)).unwrap();
        assert_eq!(f.render(&entry(&f)), "1795482123 503 color 3 curl\n");
        let json = LoggingFormat {
            text: None,
            json: Some(vec![
                JsonFormatRef {
                    key: "code".into(),
                    value: "%RESPONSE_CODE%".into(),
                },
                JsonFormatRef {
                    key: "flags".into(),
                    value: "%RESPONSE_FLAGS%".into(),
                },
                JsonFormatRef {
                    key: "missing".into(),
                    value: "%RESP(X-NONE)%".into(),
                },
                JsonFormatRef {
                    key: "what".into(),
                    value: "%REQ(:METHOD)% %REQ(:PATH)%".into(),
                },
            ]),
        };
        let f = AccessLogFormat::new(Some(&json)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&f.render(&entry(&f))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": 503, "flags": "URX", "missing": null, "what": "GET /color?x=1"})
        );
    }

    #[test]
    fn grpc_status_comes_from_the_answer_else_the_http_status_and_only_for_grpc() {
        let text = LoggingFormat {
            json: None,
            text: Some(
                "%GRPC_STATUS% %GRPC_STATUS(SNAKE_STRING)% %GRPC_STATUS(NUMBER)% %GRPC_STATUS_NUMBER%"
                    .into(),
            ),
        };
        let f = AccessLogFormat::new(Some(&text)).unwrap();
        let mut e = entry(&f);
        assert_eq!(f.render(&e), "- - - -\n", "not a gRPC request");
        e.grpc = true;
        assert_eq!(
            f.render(&e),
            "Unavailable UNAVAILABLE 14 14\n",
            "from the 503"
        );
        e.status = 200;
        e.grpc_status = Some(1);
        assert_eq!(f.render(&e), "Canceled CANCELLED 1 1\n");
        e.grpc_status = Some(42);
        assert_eq!(f.render(&e), "42 42 42 42\n", "a code gRPC does not name");
        e.grpc_status = None;
        assert_eq!(
            f.render(&e),
            "Unknown UNKNOWN 2 2\n",
            "200 without a status"
        );
        e.status = 0;
        assert_eq!(f.render(&e), "- - - -\n", "no answer at all");
        let json = LoggingFormat {
            text: None,
            json: Some(vec![
                JsonFormatRef {
                    key: "grpc".into(),
                    value: "%GRPC_STATUS_NUMBER%".into(),
                },
                JsonFormatRef {
                    key: "name".into(),
                    value: "%GRPC_STATUS%".into(),
                },
            ]),
        };
        let f = AccessLogFormat::new(Some(&json)).unwrap();
        let mut e = entry(&f);
        e.grpc = true;
        e.status = 200;
        e.grpc_status = Some(0);
        let v: serde_json::Value = serde_json::from_str(&f.render(&e)).unwrap();
        assert_eq!(v, serde_json::json!({"grpc": 0, "name": "OK"}));
    }

    #[test]
    fn a_writer_appends_lines_to_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let w = AccessLogWriter::open(path.to_str().unwrap(), Counter::default()).unwrap();
        for i in 0..100 {
            w.log(format!("line {i}\n"));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 100 {
                assert!(text.starts_with("line 0\nline 1\n"));
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A proxy that stops (its writer dropped, then `finish_writing`) loses no queued line.
    #[test]
    fn a_dropped_writer_writes_every_queued_line_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let w = AccessLogWriter::open(path.to_str().unwrap(), Counter::default()).unwrap();
        w.log("first\n".into());
        // The writer is gathering now (the first line woke it): these wait in the queue.
        for i in 0..1000 {
            w.log(format!("line {i}\n"));
        }
        drop(w);
        finish_writing();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1001);
        assert!(text.starts_with("first\nline 0\n") && text.ends_with("line 999\n"));
    }

    fn wait_for_lines(path: &std::path::Path, n: usize) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() >= n {
                return text;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_reopen_moves_lines_to_a_new_file_after_logrotate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let rotated = dir.path().join("access.log.1");
        let w = AccessLogWriter::open(path.to_str().unwrap(), Counter::default()).unwrap();
        w.log("before\n".into());
        wait_for_lines(&path, 1);
        std::fs::rename(&path, &rotated).unwrap();
        reopen_files();
        w.log("after\n".into());
        assert_eq!(wait_for_lines(&path, 1), "after\n");
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "before\n");
    }
}
