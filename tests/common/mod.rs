//! Test harness shared by the integration tests: runs the real `trellis dev` binary on ephemeral
//! ports with a temporary data directory, and talks to it the way users do, through the `aws`
//! CLI (`DevNode::aws`) and through raw HTTP with `curl` (`DevNode::curl`).
//!
//! Nothing here sleeps for a fixed time or uses a fixed port: readiness is the `trellis dev ready:`
//! line on stdout, and `wait_until` polls a condition against a deadline.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod app;
pub mod cluster;
pub mod echo;
pub mod grpc;
pub mod mesh;
pub mod proxy;

/// The account trellis puts in ARNs and owner fields by default.
pub const ACCOUNT: &str = "000000000000";
/// The region trellis puts in ARNs by default.
pub const REGION: &str = "us-east-1";

/// How long `trellis dev` may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One `trellis dev` process. The process is killed when the value is dropped.
pub struct DevNode {
    child: Option<Child>,
    api: String,
    data_dir: PathBuf,
    /// The data directory, when this node owns it (`start`); removed on drop.
    _owned_data: Option<tempfile::TempDir>,
    /// Holds the process's stderr log (and scratch files for `curl`).
    scratch: tempfile::TempDir,
    /// Every stdout line the process printed so far.
    stdout: Arc<Mutex<Vec<String>>>,
    /// How the process ended, once `is_running` saw it end.
    exit: Option<std::process::ExitStatus>,
}

/// What one `aws` CLI run produced.
#[derive(Debug)]
pub struct AwsOut {
    /// The exit status (255 for a service error, 252 for a client-side parameter error).
    pub status: i32,
    /// stdout parsed as JSON; `Value::Null` when stdout was empty.
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

/// One raw HTTP exchange made with `curl`.
#[derive(Debug)]
pub struct Http {
    /// The HTTP status; 0 when curl got no response at all.
    pub status: u16,
    /// Response headers with lower-cased names, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// curl's exit code and stderr, for diagnostics.
    pub curl_exit: i32,
    pub curl_stderr: String,
}

// === impl DevNode ===

impl DevNode {
    /// Starts `trellis dev` on a fresh temporary data directory.
    pub fn start() -> DevNode {
        let data = tempfile::Builder::new()
            .prefix("trellis-data-")
            .tempdir()
            .expect("create data tempdir");
        let dir = data.path().to_path_buf();
        let mut node = Self::spawn(&dir, &[]);
        node._owned_data = Some(data);
        node
    }

    /// Starts `trellis dev` on a fresh data directory with `control.toml` settings (quotas,
    /// region, account) given as TOML text.
    pub fn start_with_config(toml: &str) -> DevNode {
        let data = tempfile::Builder::new()
            .prefix("trellis-data-")
            .tempdir()
            .expect("create data tempdir");
        let config = data.path().join("control.toml");
        std::fs::write(&config, toml).expect("write control.toml");
        let dir = data.path().join("state");
        let mut node = Self::spawn(&dir, &["--config".into(), config.display().to_string()]);
        node._owned_data = Some(data);
        node
    }

    /// Starts `trellis dev` on an existing data directory with extra flags.
    pub fn start_in_with(dir: &Path, extra: &[String]) -> DevNode {
        Self::spawn(dir, extra)
    }

    /// Starts `trellis dev` on an existing data directory (e.g. to restart a node that was
    /// `kill`ed). The directory is left in place when the node is dropped.
    pub fn start_in(dir: &Path) -> DevNode {
        Self::spawn(dir, &[])
    }

    /// Starts `trellis dev --demo` (it keeps its state in a temporary directory of its own)
    /// with extra flags.
    pub fn start_demo(extra: &[String]) -> DevNode {
        Self::spawn_args(None, extra)
    }

    fn spawn(dir: &Path, extra: &[String]) -> DevNode {
        Self::spawn_args(Some(dir), extra)
    }

    fn spawn_args(dir: Option<&Path>, extra: &[String]) -> DevNode {
        let scratch = tempfile::Builder::new()
            .prefix("trellis-test-")
            .tempdir()
            .expect("create scratch tempdir");
        let log_path = scratch.path().join("stderr.log");
        let log = std::fs::File::create(&log_path).expect("create stderr log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis"));
        cmd.env_clear_trellis().arg("dev");
        match dir {
            Some(dir) => cmd.arg("--data-dir").arg(dir),
            None => cmd.arg("--demo"),
        };
        let mut child = cmd
            .args([
                "--api-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
                "--dns-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn trellis dev");

        // Drain stdout for the life of the process so the pipe never fills; hand each line to
        // the waiting test until the ready line has been seen.
        let stdout = child.stdout.take().expect("stdout is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        {
            let lines = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line.clone());
                    // The receiver is gone once the node is ready; keep draining anyway.
                    let _ = tx.send(line);
                }
            });
        }

        let deadline = Instant::now() + READY_TIMEOUT;
        let api = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(api) = parse_ready_line(&line) {
                        break api;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "trellis dev printed no ready line within {READY_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                        lines.lock().unwrap().join("\n"),
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = child.wait();
                    panic!(
                        "trellis dev exited before it was ready ({status:?})\nstdout:\n{}\nstderr:\n{}",
                        lines.lock().unwrap().join("\n"),
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
            }
        };

        DevNode {
            child: Some(child),
            api,
            data_dir: dir.map(Path::to_path_buf).unwrap_or_default(),
            _owned_data: None,
            scratch,
            stdout: lines,
            exit: None,
        }
    }

    /// The API base URL, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn api_url(&self) -> &str {
        &self.api
    }

    /// The DNS listener from the ready line (`dns=IP:PORT`).
    pub fn dns_addr(&self) -> std::net::SocketAddr {
        self.ready_field("dns=")
    }

    /// The gRPC listener (proxies' config streams) from the ready line (`grpc=IP:PORT`).
    pub fn grpc_addr(&self) -> std::net::SocketAddr {
        self.ready_field("grpc=")
    }

    fn ready_field(&self, prefix: &str) -> std::net::SocketAddr {
        self.stdout_lines()
            .iter()
            .filter_map(|l| l.trim().strip_prefix("trellis dev ready:"))
            .flat_map(|rest| rest.split_whitespace())
            .find_map(|w| w.strip_prefix(prefix))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("the ready line names {prefix}"))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.scratch.path().join("stderr.log")).unwrap_or_default()
    }

    /// Kills the process with SIGKILL and waits for it. The data directory stays (if this node
    /// owns it, until the node is dropped), so `DevNode::start_in(node.data_dir())` can restart
    /// on it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                self.exit = Some(status);
                self.child = None;
                false
            }
            _ => self.child.is_some(),
        }
    }

    /// The exit code once `is_running` saw the process end (None: running, or a signal).
    pub fn exit_code(&self) -> Option<i32> {
        self.exit.and_then(|s| s.code())
    }

    /// The process id (0 once it has ended).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Runs `aws appmesh ARGS…` against this node and returns what it produced.
    pub fn aws(&self, args: &[&str]) -> AwsOut {
        self.aws_as(args, None, None)
    }

    /// Runs `aws appmesh ARGS…` signed with `key` (id, secret) when given (else unsigned),
    /// trusting the CA bundle file `ca` for https when given.
    pub fn aws_as(&self, args: &[&str], key: Option<(&str, &str)>, ca: Option<&Path>) -> AwsOut {
        let mut cmd = Command::new(aws_binary());
        cmd.args(["--endpoint-url", &self.api]);
        if key.is_none() {
            cmd.arg("--no-sign-request");
        }
        let (id, secret) = key.unwrap_or(("x", "x"));
        cmd.env_remove("AWS_CA_BUNDLE");
        if let Some(ca) = ca {
            cmd.env("AWS_CA_BUNDLE", ca);
        }
        let out = cmd
            .args(["--region", REGION, "--output", "json"])
            .arg("appmesh")
            .args(args)
            .env("AWS_ACCESS_KEY_ID", id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_PAGER", "")
            .env("AWS_MAX_ATTEMPTS", "1")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_DEFAULT_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_APP_MESH")
            .env_remove("AWS_DEFAULT_OUTPUT")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", aws_binary().display()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let json = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).unwrap_or_else(|e| {
                panic!(
                    "aws appmesh {args:?}: stdout is not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"
                )
            })
        };
        AwsOut {
            status: out.status.code().unwrap_or(-1),
            json,
            stdout,
            stderr,
        }
    }

    /// Runs `aws appmesh ARGS…`, which must succeed; returns its JSON output.
    pub fn aws_ok(&self, args: &[&str]) -> Value {
        let out = self.aws(args);
        assert_eq!(
            out.status, 0,
            "aws appmesh {args:?} failed (exit {}):\n{}",
            out.status, out.stderr
        );
        out.json
    }

    /// Runs `aws appmesh ARGS…`, which must fail with the service error `code` (exit 255 and
    /// `(code)` on stderr); returns stderr.
    pub fn aws_err(&self, args: &[&str], code: &str) -> String {
        let out = self.aws(args);
        assert_eq!(
            out.status, 255,
            "aws appmesh {args:?}: expected {code} (exit 255), got exit {}\nstdout:\n{}\nstderr:\n{}",
            out.status, out.stdout, out.stderr
        );
        assert!(
            out.stderr.contains(&format!("({code})")),
            "aws appmesh {args:?}: expected {code}, stderr:\n{}",
            out.stderr
        );
        out.stderr
    }

    /// Like `aws_err`, for cases where any of `codes` is a correct answer; returns stderr.
    pub fn aws_err_any(&self, args: &[&str], codes: &[&str]) -> String {
        let out = self.aws(args);
        assert_eq!(
            out.status, 255,
            "aws appmesh {args:?}: expected one of {codes:?} (exit 255), got exit {}\nstdout:\n{}\nstderr:\n{}",
            out.status, out.stdout, out.stderr
        );
        assert!(
            codes.iter().any(|c| out.stderr.contains(&format!("({c})"))),
            "aws appmesh {args:?}: expected one of {codes:?}, stderr:\n{}",
            out.stderr
        );
        out.stderr
    }

    /// Sends one raw HTTP request with curl. `path` is appended to the API URL; a `body` is sent
    /// with `Content-Type: application/json`.
    pub fn curl(&self, method: &str, path: &str, body: Option<&[u8]>) -> Http {
        self.curl_with(method, path, body, &["Content-Type: application/json"])
    }

    /// Like `curl`, with the given request headers (sent only with a body) instead of the JSON
    /// content type.
    pub fn curl_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        body_headers: &[&str],
    ) -> Http {
        let files = tempfile::Builder::new()
            .prefix("curl-")
            .tempdir_in(self.scratch.path())
            .expect("curl tempdir");
        let hdr = files.path().join("headers");
        let out = files.path().join("body");
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-S", "--max-time", "60", "-X", method])
            // No `Expect: 100-continue` round trip for large bodies.
            .args(["-H", "Expect:"])
            .arg("-D")
            .arg(&hdr)
            .arg("-o")
            .arg(&out)
            .args(["-w", "%{http_code}"]);
        if let Some(body) = body {
            let req = files.path().join("request");
            std::fs::write(&req, body).expect("write request body");
            for h in body_headers {
                cmd.args(["-H", h]);
            }
            cmd.arg("--data-binary").arg(format!("@{}", req.display()));
        }
        cmd.arg(format!("{}{}", self.api, path));
        let res = cmd
            .stdin(Stdio::null())
            .output()
            .expect("run curl (is it installed?)");
        let code = String::from_utf8_lossy(&res.stdout).trim().to_string();
        let status = code.parse::<u16>().unwrap_or(0);
        let headers = parse_headers(&std::fs::read_to_string(&hdr).unwrap_or_default());
        let body = std::fs::read(&out)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        Http {
            status,
            headers,
            body,
            curl_exit: res.status.code().unwrap_or(-1),
            curl_stderr: String::from_utf8_lossy(&res.stderr).into_owned(),
        }
    }

    /// Sends a JSON request that must answer 200; returns the response body as JSON (`Null`
    /// when empty).
    pub fn http_ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let r = self.curl(method, path, bytes.as_deref());
        assert_eq!(
            r.status, 200,
            "{method} {path} answered {}: {}{}",
            r.status, r.body, r.curl_stderr
        );
        if r.body.trim().is_empty() {
            Value::Null
        } else {
            r.json()
        }
    }
}

impl Drop for DevNode {
    fn drop(&mut self) {
        self.kill();
    }
}

// === impl Http ===

impl Http {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}: {:?}",
                self.status, self.body
            )
        })
    }

    /// The App Mesh error class from `x-amzn-ErrorType` (the part before any `:`).
    pub fn error_type(&self) -> Option<&str> {
        self.header("x-amzn-errortype")
            .map(|v| v.split(':').next().unwrap_or("").trim())
    }
}

/// `api=http://…` from `trellis dev ready: api=http://127.0.0.1:PORT dns=… grpc=…`.
fn parse_ready_line(line: &str) -> Option<String> {
    let rest = line.trim().strip_prefix("trellis dev ready:")?;
    rest.split_whitespace()
        .find_map(|w| w.strip_prefix("api="))
        .map(|u| u.trim_end_matches('/').to_string())
}

/// Headers of the last response in a `curl -D` dump (there may be a `100 Continue` first).
fn parse_headers(dump: &str) -> Vec<(String, String)> {
    let blocks: Vec<&str> = dump
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .collect();
    let Some(last) = blocks.last() else {
        return Vec::new();
    };
    last.lines()
        .skip(1)
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect()
}

/// The aws CLI: the project's venv (made by scripts/test), else `$TRELLIS_AWS`, else `aws`.
pub fn aws_binary() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/aws");
    if venv.exists() {
        return venv;
    }
    if let Some(p) = std::env::var_os("TRELLIS_AWS").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    PathBuf::from("aws")
}

/// Polls `f` (with a short, growing pause) until it returns true or `timeout` passes; returns
/// whether it became true.
/// `dig @dns name qtype +short`: the answers, sorted (none when it failed).
pub fn dig_short(dns: std::net::SocketAddr, name: &str, qtype: &str) -> Vec<String> {
    let out = Command::new("dig")
        .args([
            &format!("@{}", dns.ip()),
            "-p",
            &dns.port().to_string(),
            name,
            qtype,
            "+short",
            "+time=2",
            "+tries=1",
        ])
        .output()
        .expect("dig is installed (Debian: dnsutils)");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// A port free on `ip` now, for the few listeners whose port must be known before they start
/// (it goes into a spec or a peer's config); tests give such listeners an address of their own.
///
/// Taken below the kernel's ephemeral range: a port handed back by a bind to port 0 may be
/// given again to any socket that binds port 0 (a proxy's inbound listener, an outgoing
/// connection) before the process it was meant for binds it; a port under the range is never
/// handed out that way.
pub fn free_port(ip: &str) -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16.min(ephemeral_low / 2);
    let span = u64::from(ephemeral_low - low);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32);
    for _ in 0..1000 {
        // splitmix64 over the seed and a per-process count: different in every process and call.
        let mut x = seed.wrapping_add(
            DRAWS
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        let port = low + (x % span) as u16;
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip} below {ephemeral_low}")
}

/// Keeps the test runner's environment from steering a child: its log filter, a notify
/// socket, and trellis's own variables.
pub trait CleanEnv {
    fn env_clear_trellis(&mut self) -> &mut Self;
}

impl CleanEnv for Command {
    fn env_clear_trellis(&mut self) -> &mut Self {
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("TRELLIS_") || k == "RUST_LOG" || k == "NOTIFY_SOCKET" {
                self.env_remove(&k);
            }
        }
        self
    }
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// A JSON value as a CLI argument.
pub fn js(v: &Value) -> String {
    v.to_string()
}

/// Asserts that `haystack` contains `needle`, showing both when it does not.
#[track_caller]
pub fn assert_contains(haystack: &str, needle: &str) {
    assert!(
        haystack.contains(needle),
        "expected to find {needle:?} in:\n{haystack}"
    );
}

/// An epoch-seconds timestamp as the CLI v1 prints it (a JSON number; a numeric string is
/// accepted too).
#[track_caller]
pub fn epoch(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().expect("finite timestamp"),
        Value::String(s) => s
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("timestamp is not epoch seconds: {s:?}")),
        other => panic!("timestamp is not a number: {other}"),
    }
}

#[cfg(test)]
mod harness_tests {
    use super::*;

    #[test]
    fn ready_line_parses() {
        assert_eq!(
            parse_ready_line(
                "trellis dev ready: api=http://127.0.0.1:40123 dns=127.0.0.1:5353 grpc=127.0.0.1:40124"
            )
            .as_deref(),
            Some("http://127.0.0.1:40123")
        );
        assert_eq!(parse_ready_line("starting raft"), None);
    }

    #[test]
    fn last_header_block_wins() {
        let h = parse_headers(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Payload Too Large\r\nx-amzn-ErrorType: BadRequestException:http://x\r\ncontent-length: 2\r\n\r\n",
        );
        assert_eq!(h[0].0, "x-amzn-errortype");
        assert_eq!(h.len(), 2);
    }
}
