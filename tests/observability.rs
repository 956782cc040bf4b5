//! Metrics end to end with the real binaries: after N requests through two proxies the
//! counters and histogram counts of both (outbound at the caller, inbound at the target) moved
//! by exactly N; `promtool check metrics` accepts the proxies' and the control node's
//! `/metrics`; a real Prometheus scrapes a running mesh and answers the request rate back.

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

/// A free TCP port on loopback (Prometheus cannot report the one it picks for port 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        let port = free_port();
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
