//! Metrics and access logs end to end with the real binaries: after N requests through two
//! proxies the counters and histogram counts of both (outbound at the caller, inbound at the
//! target) moved by exactly N; `promtool check metrics` accepts the proxies' and the control
//! node's `/metrics`; a real Prometheus scrapes a running mesh and answers the request rate
//! back; access-log lines follow their text and JSON formats field for field.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::echo::{Echo, curl};
use common::mesh;
use common::proxy::{self, Proxy};
use common::{DevNode, wait_until};
use serde_json::json;

/// The sum of the samples of `name` whose labels contain every one of `with`.
fn sum(text: &str, name: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn scrape(url: &str) -> String {
    let got = curl(&[url]);
    assert_eq!(got.status, 200, "{url}: {got:?}");
    got.body
}

/// `promtool check metrics` on `text`: no errors and no lint problems.
fn promtool(what: &str, text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool refused the {what} metrics:\n{}{}\n--- metrics:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mesh where `client` calls color.demo.local, whose route sends everything to `red`;
/// proxies for both on `ips` (red, client).
struct Mesh {
    node: DevNode,
    _app: Echo,
    red: Proxy,
    client: Proxy,
    _dir: tempfile::TempDir,
}

impl Mesh {
    fn start(red_ip: &str, client_ip: &str) -> Mesh {
        let node = DevNode::start();
        let client =
            json!({"backends": [{"virtualService": {"virtualServiceName": "color.demo.local"}}]});
        mesh::color_mesh(&node, 1, 0, client);
        let app = Echo::start(&format!("{red_ip}:9080"), "red");
        // With certificates (join tokens): peers are mTLS, so the target knows its caller.
        let dir = tempfile::tempdir().unwrap();
        let start = |role: &str, ip: &str| {
            proxy::with_certificate(node.grpc_addr(), node.api_url(), role, ip, dir.path(), &[])
        };
        let red = start("red", red_ip);
        let client = start("client", client_ip);
        for p in [&red, &client] {
            p.wait_ready(Duration::from_secs(20));
        }
        assert!(
            wait_until(Duration::from_secs(10), || client.endpoints(Some("red"))
                == 1),
            "red's endpoint never reached the client"
        );
        let m = Mesh {
            node,
            _app: app,
            red,
            client,
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(10), || m.get().status == 200),
            "the mesh never answered: {:?}",
            m.get()
        );
        m
    }

    fn get(&self) -> common::echo::Got {
        let out: SocketAddr = self.client.listening().1;
        curl(&[
            "-H",
            "Host: color.demo.local:9080",
            &format!("http://{out}/color"),
        ])
    }
}

#[test]
fn counters_move_by_exactly_the_requests_sent_and_promtool_accepts_both_roles() {
    let m = Mesh::start("127.0.0.131", "127.0.0.132");
    let client_metrics = format!("http://{}/metrics", m.client.admin());
    let red_metrics = format!("http://{}/metrics", m.red.admin());
    let outbound = [
        "direction=\"outbound\"",
        "virtual_service=\"color.demo.local\"",
        "route=\"color\"",
        "target_virtual_node=\"red\"",
        "mesh=\"demo\"",
        "virtual_node=\"client\"",
    ];
    let inbound = [
        "direction=\"inbound\"",
        "caller=\"virtualNode/client\"",
        "virtual_node=\"red\"",
        "port=\"9080\"",
    ];
    let ok = "status_class=\"2xx\"";
    let (c0, r0) = (scrape(&client_metrics), scrape(&red_metrics));
    // `trellis top` agrees with the proxies' own counters (the warm-up included) ...
    let top_requests = |json: &serde_json::Value, direction: &str| -> u64 {
        json["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["direction"] == direction)
            .map(|e| e["requests"].as_u64().unwrap_or(0))
            .sum()
    };
    let all_outbound = |text: &str| {
        sum(
            text,
            "trellis_proxy_requests_total",
            &["direction=\"outbound\""],
        ) as u64
    };
    let before = all_outbound(&c0);
    // The two proxies report on their own clocks: wait for both.
    let before_in = sum(
        &r0,
        "trellis_proxy_requests_total",
        &["direction=\"inbound\""],
    ) as u64;
    let mut t0 = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(15), || {
            t0 = top(&m.node);
            top_requests(&t0, "outbound") == before && top_requests(&t0, "inbound") == before_in
        }),
        "trellis top {t0} never showed the client's {before} and red's {before_in} requests"
    );

    const N: usize = 37;
    for _ in 0..N {
        let got = m.get();
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.name().as_deref(), Some("red"));
    }

    let (c1, r1) = (scrape(&client_metrics), scrape(&red_metrics));
    let delta =
        |a: &str, b: &str, name: &str, with: &[&str]| sum(b, name, with) - sum(a, name, with);
    let with_ok = |base: &[&'static str]| {
        let mut v = base.to_vec();
        v.push(ok);
        v
    };
    assert_eq!(
        delta(
            &c0,
            &c1,
            "trellis_proxy_requests_total",
            &with_ok(&outbound)
        ),
        N as f64,
        "outbound requests at the caller:\n{c1}"
    );
    assert_eq!(
        delta(
            &c0,
            &c1,
            "trellis_proxy_request_duration_seconds_count",
            &outbound
        ),
        N as f64
    );
    assert_eq!(
        delta(&r0, &r1, "trellis_proxy_requests_total", &with_ok(&inbound)),
        N as f64,
        "inbound requests at the target:\n{r1}"
    );
    assert_eq!(
        delta(
            &r0,
            &r1,
            "trellis_proxy_request_duration_seconds_count",
            &inbound
        ),
        N as f64
    );
    // Echo's answers are JSON of some hundred bytes each, counted at both ends alike.
    let sent = delta(
        &c0,
        &c1,
        "trellis_proxy_bytes_total",
        &["flow=\"response\""],
    );
    assert!(sent >= (N * 100) as f64, "{sent}");
    assert_eq!(
        sent,
        delta(
            &r0,
            &r1,
            "trellis_proxy_bytes_total",
            &["flow=\"response\""]
        )
    );
    assert_eq!(
        sum(
            &c1,
            "trellis_proxy_connections_active",
            &["listener=\"outbound\""]
        ),
        0.0
    );
    assert!(sum(&c1, "trellis_proxy_config_version", &[]) > 0.0);

    // ... and moves by exactly N, at the caller and at the target, per edge and per service.
    let mut t1 = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(15), || {
            t1 = top(&m.node);
            top_requests(&t1, "outbound") == before + N as u64
                && top_requests(&t1, "inbound") == before_in + N as u64
        }),
        "trellis top {t1} never reached {} outbound and {} inbound requests",
        before + N as u64,
        before_in + N as u64
    );
    let service = &t1["services"][0];
    assert_eq!(service["virtualService"], "color.demo.local", "{t1}");
    assert_eq!(service["requests"].as_u64(), Some(before + N as u64));
    assert_eq!(service["successRate"].as_f64(), Some(1.0), "{t1}");
    assert!(service["p99Ms"].as_f64().is_some_and(|p| p > 0.0), "{t1}");
    let table = trellis_top_table(&m.node);
    assert!(
        table.contains("demo/color.demo.local")
            && table.contains(&format!("{}", before + N as u64)),
        "{table}"
    );

    // A request no route matches: 404, counted with an empty route.
    m.node.http_ok(
        "PUT",
        "/v20190125/meshes/demo/virtualRouter/color/routes/color",
        Some(&json!({"spec": {"httpRoute": {"match": {"prefix": "/color"}, "action": {"weightedTargets": [
            {"virtualNode": "red", "weight": 1}]}}}})),
    );
    let out = m.client.listening().1;
    let other = || {
        curl(&[
            "-H",
            "Host: color.demo.local:9080",
            &format!("http://{out}/elsewhere"),
        ])
        .status
    };
    assert!(wait_until(Duration::from_secs(10), || other() == 404));
    let c2 = scrape(&client_metrics);
    assert!(
        sum(
            &c2,
            "trellis_proxy_requests_total",
            &[
                "route=\"\"",
                "status_class=\"4xx\"",
                "direction=\"outbound\""
            ]
        ) >= 1.0,
        "{c2}"
    );

    promtool("proxy (caller)", &c2);
    promtool("proxy (target)", &scrape(&red_metrics));
    let control = scrape(&format!("{}/metrics", m.node.api_url()));
    promtool("control node", &control);
    for want in [
        "trellis_control_raft_term{",
        "trellis_control_raft_commit_index{",
        "trellis_control_raft_applied_index{",
    ] {
        assert!(control.contains(want), "{want} missing:\n{control}");
    }
    assert_eq!(sum(&control, "trellis_control_raft_is_leader", &[]), 1.0);
    assert_eq!(sum(&control, "trellis_control_proxies_connected", &[]), 2.0);
    assert_eq!(
        sum(
            &control,
            "trellis_control_api_requests_total",
            &["operation=\"CreateMesh\"", "status_class=\"2xx\""]
        ),
        1.0,
        "{control}"
    );
    assert_eq!(
        sum(
            &control,
            "trellis_control_api_requests_total",
            &["operation=\"UpdateRoute\"", "status_class=\"2xx\""]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &control,
            "trellis_control_certificates_issued_total",
            &["kind=\"proxy\""]
        ),
        2.0
    );
    // DNS answers by response code: the mesh's names answer, others are refused.
    let dns = m.node.dns_addr();
    let dig = |name: &str| {
        Command::new("dig")
            .args([
                &format!("@{}", dns.ip()),
                "-p",
                &dns.port().to_string(),
                name,
                "+short",
            ])
            .output()
            .unwrap()
    };
    dig("color.demo.local");
    dig("example.com");
    let control = scrape(&format!("{}/metrics", m.node.api_url()));
    assert!(
        sum(
            &control,
            "trellis_control_dns_queries_total",
            &["rcode=\"NoError\""]
        ) >= 1.0
    );
    assert!(
        sum(
            &control,
            "trellis_control_dns_queries_total",
            &["rcode=\"Refused\""]
        ) >= 1.0,
        "{control}"
    );
    // Each proxy acknowledged at least its first config and the route change.
    assert!(
        sum(
            &control,
            "trellis_control_config_push_duration_seconds_count",
            &[]
        ) >= 3.0
    );

    // The admin server's other pages.
    let clusters = curl(&[&format!("http://{}/clusters", m.client.admin())]).json();
    let hosts = &clusters["clusters"][0]["hosts"];
    assert_eq!(clusters["clusters"][0]["name"], "red:9080", "{clusters}");
    assert_eq!(hosts[0]["ejected"], false, "{clusters}");
    let config = curl(&[&format!("http://{}/config", m.client.admin())]).json();
    assert_eq!(config["config"]["mesh"], "demo", "{config}");
    assert_eq!(
        curl(&[&format!("http://{}/ready", m.client.admin())]).status,
        200
    );
    assert_eq!(
        curl(&[&format!("http://{}/live", m.client.admin())]).status,
        200
    );
}

/// `trellis top --once --json` against the node.
fn top(node: &DevNode) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["top", "--once", "--json", "--endpoint", node.api_url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `trellis top --once`: the tables.
fn trellis_top_table(node: &DevNode) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["top", "--once", "--endpoint", node.api_url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(targets: &[(&str, &str)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let jobs: String = targets
            .iter()
            .map(|(job, addr)| {
                format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n")
            })
            .collect();
        let config = format!("global:\n  scrape_interval: 1s\nscrape_configs:\n{jobs}");
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        // Prometheus cannot report the port it picks for port 0.
        let port = common::free_port("127.0.0.1");
        let log = dir.path().join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("prometheus (Debian package prometheus; scripts/test installs it)");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
            log,
        }
    }

    /// The value of an instant query's single result, if it has one.
    fn query(&self, q: &str) -> Option<f64> {
        let got = curl(&[
            "-G",
            &format!("{}/api/v1/query", self.url),
            "--data-urlencode",
            &format!("query={q}"),
        ]);
        let v = got.json();
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[test]
fn a_real_prometheus_scrapes_the_mesh_and_answers_the_request_rate() {
    let m = Mesh::start("127.0.0.133", "127.0.0.134");
    let admin = m.client.admin().to_string();
    let api = m.node.api_url().trim_start_matches("http://").to_string();
    let prom = Prometheus::start(&[("client_proxy", &admin), ("control", &api)]);
    let total = "sum(trellis_proxy_requests_total{direction=\"outbound\",status_class=\"2xx\"})";
    assert!(
        wait_until(Duration::from_secs(60), || prom.query(total).is_some()),
        "Prometheus never scraped the proxy:\n{}",
        prom.log()
    );
    for _ in 0..50 {
        assert_eq!(m.get().status, 200);
    }
    // Prometheus holds what the proxy counts, and sees traffic in the last minute.
    let proxy_total = sum(
        &scrape(&format!("http://{admin}/metrics")),
        "trellis_proxy_requests_total",
        &["direction=\"outbound\"", "status_class=\"2xx\""],
    );
    assert!(proxy_total >= 50.0);
    assert!(
        wait_until(Duration::from_secs(30), || prom.query(total)
            == Some(proxy_total)),
        "Prometheus has {:?}, the proxy {proxy_total}",
        prom.query(total)
    );
    let rate = "sum(rate(trellis_proxy_requests_total{direction=\"outbound\"}[1m]))";
    let r = prom.query(rate);
    assert!(r.is_some_and(|r| r > 0.0), "rate: {r:?}");
    // The control node's metrics reach it too.
    assert!(
        wait_until(Duration::from_secs(30), || {
            prom.query("trellis_control_raft_is_leader") == Some(1.0)
        }),
        "{}",
        prom.log()
    );
}

/// The lines of an access log with `tag` in them, once there are `n`.
fn lines_with(path: &std::path::Path, tag: &str, n: usize) -> Vec<String> {
    let mut found = Vec::new();
    let ok = wait_until(Duration::from_secs(10), || {
        found = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(tag))
            .map(str::to_string)
            .collect();
        found.len() >= n
    });
    assert!(
        ok,
        "{n} lines with {tag:?} never came in {}:\n{}",
        path.display(),
        std::fs::read_to_string(path).unwrap_or_default()
    );
    found
}

#[test]
fn access_log_lines_follow_their_formats_for_success_retry_timeout_and_refusal() {
    let node = DevNode::start();
    let logs = tempfile::tempdir().unwrap();
    let client_log = logs.path().join("client.log");
    let red_log = logs.path().join("red.log");
    let text = "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %ROUTE_NAME% %UPSTREAM_CLUSTER% %REQ(X-CASE)% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%\n";
    let client = json!({
        "backends": [{"virtualService": {"virtualServiceName": "color.demo.local"}}],
        "logging": {"accessLog": {"file": {"path": client_log, "format": {"text": text}}}}
    });
    mesh::color_mesh(&node, 1, 0, client);
    put_red_with_json_log(&node, &red_log);
    // Requests get 500 ms; App Mesh's default retry policy (2 retries on 503) applies.
    node.http_ok(
        "PUT",
        "/v20190125/meshes/demo/virtualRouter/color/routes/color",
        Some(&json!({"spec": {"httpRoute": {"match": {"prefix": "/"},
            "action": {"weightedTargets": [{"virtualNode": "red", "weight": 1}]},
            "timeout": {"perRequest": {"unit": "ms", "value": 500}}}}})),
    );
    let _app = Echo::start("127.0.0.135:9080", "red");
    let dir = tempfile::tempdir().unwrap();
    let red = proxy::with_certificate(
        node.grpc_addr(),
        node.api_url(),
        "red",
        "127.0.0.135",
        dir.path(),
        &[],
    );
    let client = proxy::with_certificate(
        node.grpc_addr(),
        node.api_url(),
        "client",
        "127.0.0.136",
        dir.path(),
        &[],
    );
    red.wait_ready(Duration::from_secs(20));
    client.wait_ready(Duration::from_secs(20));
    let out = client.listening().1;
    let get = |case: &str, extra: &[&str]| {
        let mut args = vec![
            "-H".to_string(),
            "Host: color.demo.local:9080".to_string(),
            "-H".to_string(),
            format!("x-case: {case}"),
        ];
        for e in extra {
            args.extend(["-H".to_string(), e.to_string()]);
        }
        args.push(format!("http://{out}/color"));
        curl(&args.iter().map(String::as_str).collect::<Vec<_>>()).status
    };
    assert!(
        wait_until(Duration::from_secs(10), || get("warmup", &[]) == 200),
        "the mesh never answered"
    );

    assert_eq!(get("success", &[]), 200);
    assert_eq!(
        lines_with(&client_log, "success", 1),
        ["GET /color 200 - 1 color red:9080 success 127.0.0.1"]
    );
    assert_eq!(get("retry", &["x-echo-status: 503"]), 503);
    assert_eq!(
        lines_with(&client_log, " retry", 1),
        ["GET /color 503 URX 3 color red:9080 retry 127.0.0.1"]
    );
    assert_eq!(get("timeout", &["x-echo-delay-ms: 3000"]), 504);
    assert_eq!(
        lines_with(&client_log, "timeout", 1),
        ["GET /color 504 UT 1 color red:9080 timeout 127.0.0.1"]
    );
    // The egress filter (DROP_ALL) refuses what is not a backend.
    let refused = curl(&[
        "-H",
        "x-case: egress",
        "-H",
        "Host: elsewhere.example:80",
        &format!("http://{out}/x"),
    ]);
    assert_eq!(refused.status, 403);
    assert_eq!(
        lines_with(&client_log, "egress", 1),
        ["GET /x 403 RBAC 0 - - egress 127.0.0.1"]
    );
    // So is a CONNECT to it (what HTTPS through HTTP_PROXY sends).
    curl(&[
        "-p",
        "-x",
        &format!("http://{out}"),
        "http://elsewhere.example:443/",
    ]);
    // Both are counted as egress (one edge, port 0, no service): a refusal is traffic too.
    let metrics = curl(&[&format!("http://{}/metrics", client.admin())]).body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("trellis_proxy_requests_total{")
                && l.contains("direction=\"outbound\",port=\"0\",virtual_service=\"\"")
                && l.contains("status_class=\"4xx\"")
                && l.ends_with(" 2")),
        "the egress refusals are not counted:\n{metrics}"
    );

    // The target's JSON lines, key for key: numbers stay numbers, missing values are null.
    let json_lines = |case: &str, n: usize| -> Vec<serde_json::Value> {
        lines_with(&red_log, &format!("\"case\":\"{case}\""), n)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let ok = &json_lines("success", 1)[0];
    assert_eq!(ok["code"], 200, "{ok}");
    assert_eq!(ok["flags"], serde_json::Value::Null, "{ok}");
    assert_eq!(ok["path"], "/color");
    assert_eq!(ok["upstream"], "127.0.0.135:9080");
    assert!(ok["sent"].as_u64().is_some_and(|n| n > 50), "{ok}");
    // The caller's proxy connection's address (on loopback the kernel picks 127.0.0.1 as the
    // source); no SNI: peers dial by IP.
    assert!(
        ok["from"]
            .as_str()
            .is_some_and(|a| a.parse::<std::net::IpAddr>().is_ok()),
        "{ok}"
    );
    assert_eq!(ok["sni"], serde_json::Value::Null, "{ok}");
    let tries = json_lines("retry", 3);
    assert_eq!(tries.len(), 3, "one line per attempt: {tries:?}");
    assert!(tries.iter().all(|t| t["code"] == 503), "{tries:?}");
    // The caller gave up after 500 ms: the target logs the stream its caller dropped.
    let gone = &json_lines("timeout", 1)[0];
    assert_eq!(gone["code"], 0, "{gone}");
    assert_eq!(gone["flags"], "DC", "{gone}");
    // Plaintext to an mTLS listener is refused at the target.
    let plaintext = curl(&[
        "-H",
        "x-trellis-target-port: 9080",
        "-H",
        "x-case: plaintext",
        &format!("http://{}/color", red.listening().0),
    ]);
    assert_eq!(plaintext.status, 403);
    let denied = &json_lines("plaintext", 1)[0];
    assert_eq!(denied["code"], 403, "{denied}");
    assert_eq!(denied["flags"], "RBAC", "{denied}");
}

/// Virtual node red as `color_mesh` makes it, with a JSON access log at `path`.
fn put_red_with_json_log(node: &DevNode, path: &std::path::Path) {
    node.http_ok(
        "PUT",
        "/v20190125/meshes/demo/virtualNodes/red",
        Some(&json!({"spec": {
            "listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
            "serviceDiscovery": {"dns": {"hostname": "red.demo.local"}},
            "logging": {"accessLog": {"file": {"path": path, "format": {"json": [
                {"key": "case", "value": "%REQ(X-CASE)%"},
                {"key": "code", "value": "%RESPONSE_CODE%"},
                {"key": "flags", "value": "%RESPONSE_FLAGS%"},
                {"key": "path", "value": "%REQ(:PATH)%"},
                {"key": "upstream", "value": "%UPSTREAM_HOST%"},
                {"key": "sent", "value": "%BYTES_SENT%"},
                {"key": "from", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"},
                {"key": "sni", "value": "%REQUESTED_SERVER_NAME%"}
            ]}}}}
        }})),
    );
}

/// A test OTLP/gRPC receiver: keeps every span it is sent.
mod otlp_receiver {
    use std::sync::{Arc, Mutex};

    use trellis::wire::otlp::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use trellis::wire::otlp::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use trellis::wire::otlp::trace::v1::Span;

    /// A span with the string attributes of its resource.
    pub type Received = (Vec<(String, String)>, Span);

    #[derive(Clone, Default)]
    pub struct Receiver(pub Arc<Mutex<Vec<Received>>>);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            use trellis::wire::otlp::common::v1::any_value::Value;
            for rs in req.into_inner().resource_spans {
                let resource: Vec<(String, String)> = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
                        _ => None,
                    })
                    .collect();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        self.0.lock().unwrap().push((resource.clone(), s));
                    }
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Serves on a port of its own in a thread; returns its address and the spans.
    pub fn start() -> (std::net::SocketAddr, Receiver) {
        let receiver = Receiver::default();
        let served = receiver.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(served))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
                    .unwrap();
            });
        });
        (addr, receiver)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_trace_context_continues_through_both_proxies_and_spans_reach_an_otlp_receiver() {
    let (otlp, received) = otlp_receiver::start();
    let node = DevNode::start();
    let client =
        json!({"backends": [{"virtualService": {"virtualServiceName": "color.demo.local"}}]});
    mesh::color_mesh(&node, 1, 0, client);
    let _app = Echo::start("127.0.0.137:9080", "red");
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{otlp}");
    let start = |vn: &str, ip: &str| {
        proxy::with_certificate(
            node.grpc_addr(),
            node.api_url(),
            vn,
            ip,
            dir.path(),
            &["--otlp-endpoint", &endpoint],
        )
    };
    let red = start("red", "127.0.0.137");
    let client = start("client", "127.0.0.138");
    red.wait_ready(Duration::from_secs(20));
    client.wait_ready(Duration::from_secs(20));
    let out = client.listening().1;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let callers_span = "00f067aa0ba902b7";
    let get = || {
        curl(&[
            "-H",
            "Host: color.demo.local:9080",
            "-H",
            &format!("traceparent: 00-{trace_id}-{callers_span}-01"),
            &format!("http://{out}/color"),
        ])
    };
    let mut got = get();
    assert!(
        wait_until(Duration::from_secs(10), || {
            got = get();
            got.status == 200
        }),
        "{got:?}"
    );
    // The app sees the same trace, with a parent of the proxies' making, and a request id.
    let headers = &got.json()["headers"];
    let tp = headers["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{headers}");
    assert_eq!(parts[1], trace_id);
    assert_ne!(parts[2], callers_span);
    assert_eq!(parts[3], "01");
    assert!(
        headers["x-request-id"]
            .as_str()
            .is_some_and(|id| id.len() == 36),
        "{headers}"
    );

    // Both proxies' spans of that request arrive: the client's continues the caller's span,
    // the target's continues the client's, and the app's parent is the target's span.
    let spans_of_trace =
        || -> Vec<(Vec<(String, String)>, trellis::wire::otlp::trace::v1::Span)> {
            received
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, s)| hex(&s.trace_id) == trace_id)
                .cloned()
                .collect()
        };
    let app_parent = parts[2].to_string();
    let chain_arrived = || {
        let spans = spans_of_trace();
        spans
            .iter()
            .find(|(_, s)| hex(&s.span_id) == app_parent)
            .is_some_and(|(_, inbound)| {
                spans
                    .iter()
                    .any(|(_, s)| s.span_id == inbound.parent_span_id)
            })
    };
    assert!(
        wait_until(Duration::from_secs(15), chain_arrived),
        "spans: {:?}\nclient log:\n{}",
        spans_of_trace(),
        client.log()
    );
    let spans = spans_of_trace();
    let inbound = spans
        .iter()
        .find(|(_, s)| hex(&s.span_id) == app_parent)
        .unwrap_or_else(|| panic!("no span is the app's parent {app_parent}: {spans:?}"));
    assert_eq!(inbound.1.kind, 2, "SERVER");
    assert!(
        inbound
            .0
            .contains(&("appmesh.virtual_node".into(), "red".into())),
        "{:?}",
        inbound.0
    );
    let outbound = spans
        .iter()
        .find(|(_, s)| s.span_id == inbound.1.parent_span_id)
        .unwrap_or_else(|| panic!("the inbound span's parent is not the client's: {spans:?}"));
    assert_eq!(outbound.1.kind, 3, "CLIENT");
    assert!(
        outbound
            .0
            .contains(&("appmesh.virtual_node".into(), "client".into()))
    );
    assert!(
        spans
            .iter()
            .any(|(_, s)| s.kind == 3 && hex(&s.parent_span_id) == callers_span),
        "no client span continues the caller's: {spans:?}"
    );
    assert!(outbound.1.end_time_unix_nano >= outbound.1.start_time_unix_nano);
    assert_eq!(outbound.1.name, "GET color.demo.local:9080");
}
