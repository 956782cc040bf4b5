//! Discovery end to end with the real binaries: `trellis dev` and `trellis proxy` processes. A
//! route change reaches the connected proxy (acked) within a second; backend services bring and
//! take their VIPs; registered instances answer in DNS and leave it when their proxy stops or
//! vanishes; a proxy starts from its cache with no control plane; a refused config is nacked
//! with its reason while the old one stays; a proxy for a missing node gets a clear error.

mod common;

use std::time::{Duration, Instant};

use common::app::App;
use common::mesh::{self, put, route};
use common::proxy::Proxy;
use common::{DevNode, wait_until};
use serde_json::{Value, json};

/// The color mesh with an even split and `client` calling color (and later) services.
fn color_mesh(node: &DevNode) {
    mesh::color_mesh(node, 1, 1, client_spec(None));
}

fn client_spec(log_path: Option<&str>) -> Value {
    let mut spec = json!({"backends": [{"virtualService": {"virtualServiceName": "color.demo.local"}},
                                       {"virtualService": {"virtualServiceName": "later.demo.local"}}]});
    if let Some(p) = log_path {
        spec["logging"] = json!({"accessLog": {"file": {"path": p}}});
    }
    spec
}

fn proxies(node: &DevNode) -> Vec<Value> {
    node.http_ok("GET", "/v1/proxies", None)["proxies"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn acked(node: &DevNode, resource: &str) -> u64 {
    proxies(node)
        .iter()
        .find(|p| p["resource"] == resource)
        .and_then(|p| p["versionAcked"].as_u64())
        .unwrap_or(0)
}

fn weights(cached: &Value) -> Vec<u64> {
    cached["config"]["outbound"][0]["listeners"][0]["routes"][0]["targets"]
        .as_array()
        .map(|ts| ts.iter().map(|t| t["weight"].as_u64().unwrap()).collect())
        .unwrap_or_default()
}

fn vip(cached: &Value, service: &str) -> Value {
    cached["config"]["outbound"]
        .as_array()
        .and_then(|o| o.iter().find(|s| s["virtual_service"] == service))
        .map(|s| s["vip"].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn route_changes_reach_the_proxy_within_a_second() {
    let node = DevNode::start();
    color_mesh(&node);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(
        node.grpc_addr(),
        "demo",
        ["--virtual-node", "client"],
        dir.path(),
        "127.0.0.10",
    );
    let first = proxy.wait_ready(Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(5), || acked(
            &node,
            "virtualNode/client"
        ) >= first),
        "{}",
        proxy.log()
    );
    assert_eq!(weights(&proxy.cached().unwrap()), [1, 1]);

    let mut samples = Vec::new();
    for (red, blue) in [(3, 1), (0, 1), (1, 0), (5, 5)] {
        let before = acked(&node, "virtualNode/client");
        let start = Instant::now();
        let out = node.aws_ok(&[
            "update-route",
            "--mesh-name",
            "demo",
            "--virtual-router-name",
            "color",
            "--route-name",
            "color",
            "--spec",
            &route(red, blue).to_string(),
        ]);
        assert_eq!(out["route"]["spec"], route(red, blue));
        assert!(
            wait_until(Duration::from_secs(5), || acked(
                &node,
                "virtualNode/client"
            ) > before),
            "no ack: {}",
            proxy.log()
        );
        samples.push(start.elapsed());
        assert_eq!(weights(&proxy.cached().unwrap()), [red as u64, blue as u64]);
    }
    samples.sort();
    eprintln!("update-route → proxy ack (includes the aws CLI's own start-up): {samples:?}");
    // The aws CLI alone takes a few hundred ms to start.
    assert!(
        samples[samples.len() / 2] < Duration::from_secs(3),
        "{samples:?}"
    );

    // The push alone: UpdateRoute over raw HTTP, until the proxy's ack is visible.
    let mut push = Vec::new();
    for i in 0..10u32 {
        let before = acked(&node, "virtualNode/client");
        let start = Instant::now();
        put(
            &node,
            "/v20190125/meshes/demo/virtualRouter/color/routes/color",
            json!({"spec": route(i, 10 - i)}),
        );
        assert!(wait_until(Duration::from_secs(5), || acked(
            &node,
            "virtualNode/client"
        ) > before));
        push.push(start.elapsed());
    }
    push.sort();
    eprintln!(
        "UpdateRoute → proxy ack: p50 {:?}, max {:?}",
        push[push.len() / 2],
        push[push.len() - 1]
    );
    assert!(push[push.len() / 2] < Duration::from_secs(1), "{push:?}");
}

#[test]
fn backend_services_bring_and_take_their_vips() {
    let node = DevNode::start();
    color_mesh(&node);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(
        node.grpc_addr(),
        "demo",
        ["--virtual-node", "client"],
        dir.path(),
        "127.0.0.10",
    );
    proxy.wait_ready(Duration::from_secs(20));
    assert!(
        vip(&proxy.cached().unwrap(), "color.demo.local")
            .as_str()
            .unwrap()
            .starts_with("127.77.")
    );
    assert_eq!(
        vip(&proxy.cached().unwrap(), "later.demo.local"),
        Value::Null
    );
    put(
        &node,
        "/v20190125/meshes/demo/virtualServices",
        json!({"virtualServiceName": "later.demo.local", "spec": {}}),
    );
    assert!(wait_until(Duration::from_secs(2), || vip(
        &proxy.cached().unwrap(),
        "later.demo.local"
    )
    .is_string()));
    node.http_ok(
        "DELETE",
        "/v20190125/meshes/demo/virtualServices/later.demo.local",
        None,
    );
    assert!(wait_until(Duration::from_secs(2), || vip(
        &proxy.cached().unwrap(),
        "later.demo.local"
    )
    .is_null()));
}

fn dig_short(node: &DevNode, name: &str) -> Vec<String> {
    dig_short_type(node, name, "A")
}

fn dig_short_type(node: &DevNode, name: &str, qtype: &str) -> Vec<String> {
    common::dig_short(node.dns_addr(), name, qtype)
}

#[test]
fn instances_come_and_go_in_dns() {
    let node = DevNode::start_with_config("lease_seconds = 3\n");
    color_mesh(&node);
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Proxy::start(
        node.grpc_addr(),
        "demo",
        ["--virtual-node", "red"],
        d1.path(),
        "127.0.0.21",
    );
    let mut b = Proxy::start(
        node.grpc_addr(),
        "demo",
        ["--virtual-node", "red"],
        d2.path(),
        "127.0.0.22",
    );
    a.wait_ready(Duration::from_secs(20));
    b.wait_ready(Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(3), || dig_short(
        &node,
        "red.demo.local"
    ) == [
        "127.0.0.21",
        "127.0.0.22"
    ]));
    assert_eq!(
        dig_short(&node, "blue.demo.local"),
        Vec::<String>::new(),
        "no instances: no addresses"
    );
    // SRV: one record per instance and listener port; each target resolves to its instance.
    let srv = [
        "1 1 9080 7f000015.addr.red.demo.local.",
        "1 1 9080 7f000016.addr.red.demo.local.",
    ];
    assert_eq!(dig_short_type(&node, "red.demo.local", "SRV"), srv);
    assert_eq!(
        dig_short_type(&node, "_http._tcp.red.demo.local", "SRV"),
        srv
    );
    let dns = node.dns_addr();
    let full = std::process::Command::new("dig")
        .args([&format!("@{}", dns.ip()), "-p", &dns.port().to_string()])
        .args(["red.demo.local", "SRV", "+time=2", "+tries=1"])
        .output()
        .unwrap();
    let full = String::from_utf8_lossy(&full.stdout);
    let glue = full.split(";; ADDITIONAL SECTION:").nth(1).unwrap_or("");
    let glue = glue.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        glue.contains("7f000015.addr.red.demo.local. 5 IN A 127.0.0.21"),
        "targets come with their addresses:\n{full}"
    );
    assert_eq!(
        dig_short(&node, "7f000016.addr.red.demo.local"),
        ["127.0.0.22"]
    );
    assert_eq!(
        dig_short(&node, "7f000099.addr.red.demo.local"),
        Vec::<String>::new(),
        "not an instance"
    );

    // A clean stop says goodbye: gone at once.
    a.terminate();
    assert!(wait_until(Duration::from_secs(2), || dig_short(
        &node,
        "red.demo.local"
    ) == ["127.0.0.22"]));
    // A vanished proxy is gone within one lease (3 s) plus a sweep (1 s).
    let t = Instant::now();
    b.kill();
    assert!(wait_until(Duration::from_secs(6), || dig_short(
        &node,
        "red.demo.local"
    )
    .is_empty()));
    eprintln!(
        "a SIGKILLed proxy left DNS after {:?} (lease 3 s)",
        t.elapsed()
    );
}

#[test]
fn a_proxy_starts_from_its_cache_when_no_control_node_answers() {
    let mut node = DevNode::start();
    color_mesh(&node);
    let dir = tempfile::tempdir().unwrap();
    let grpc = node.grpc_addr();
    let version = {
        let p = Proxy::start(
            grpc,
            "demo",
            ["--virtual-node", "client"],
            dir.path(),
            "127.0.0.10",
        );
        p.wait_ready(Duration::from_secs(20))
    };
    node.kill();
    let p = Proxy::start(
        grpc,
        "demo",
        ["--virtual-node", "client"],
        dir.path(),
        "127.0.0.10",
    );
    assert_eq!(
        p.wait_ready(Duration::from_secs(10)),
        version,
        "the cached version"
    );
    assert_eq!(weights(&p.cached().unwrap()), [1, 1]);
}

#[test]
fn a_refused_config_is_nacked_and_the_old_one_stays() {
    let node = DevNode::start();
    color_mesh(&node);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(
        node.grpc_addr(),
        "demo",
        ["--virtual-node", "client"],
        dir.path(),
        "127.0.0.10",
    );
    let good = proxy.wait_ready(Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(5), || acked(
        &node,
        "virtualNode/client"
    ) >= good));
    // An access log the proxy cannot open: App Mesh's Envoy refuses such a config too.
    put(
        &node,
        "/v20190125/meshes/demo/virtualNodes/client",
        json!({"spec": client_spec(Some("/nonexistent/dir/access.log"))}),
    );
    let nack = || {
        proxies(&node)
            .iter()
            .find(|p| p["resource"] == "virtualNode/client")
            .and_then(|p| p["lastNack"].as_str().map(str::to_string))
    };
    assert!(
        wait_until(Duration::from_secs(5), || nack().is_some()),
        "{}",
        proxy.log()
    );
    let reason = nack().unwrap();
    assert!(
        reason.contains("logging.accessLog.file.path")
            && reason.contains("/nonexistent/dir/access.log"),
        "{reason}"
    );
    assert_eq!(
        acked(&node, "virtualNode/client"),
        good,
        "the old version stays in force"
    );
    assert!(
        proxy.cached().unwrap()["config"]["access_log"].is_null(),
        "the cache keeps the good config"
    );
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["proxies", "--endpoint", node.api_url()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("virtualNode/client") && table.contains("/nonexistent/dir/access.log"),
        "{table}"
    );
    // Fixing the spec heals it.
    put(
        &node,
        "/v20190125/meshes/demo/virtualNodes/client",
        json!({"spec": client_spec(None)}),
    );
    assert!(wait_until(Duration::from_secs(5), || nack().is_none()
        && acked(&node, "virtualNode/client") > good));
}

#[test]
fn a_proxy_for_a_missing_node_gets_a_clear_error() {
    let node = DevNode::start();
    color_mesh(&node);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(
        node.grpc_addr(),
        "demo",
        ["--virtual-node", "nope"],
        dir.path(),
        "127.0.0.10",
    );
    assert!(
        wait_until(Duration::from_secs(10), || proxy.log().contains(
            "VirtualNode with name nope is not present under mesh demo"
        )),
        "{}",
        proxy.log()
    );
    assert!(proxies(&node).is_empty(), "not registered");
    assert!(proxy.cached().is_none());
}

#[test]
fn a_failing_app_health_check_takes_the_instance_out_of_dns_within_two_intervals() {
    let node = DevNode::start();
    let app = App::start();
    put(&node, "/v20190125/meshes", json!({"meshName": "demo"}));
    put(
        &node,
        "/v20190125/meshes/demo/virtualNodes",
        json!({"virtualNodeName": "web", "spec": {
            "listeners": [{"portMapping": {"port": app.addr.port(), "protocol": "http"},
                "healthCheck": {"protocol": "http", "path": "/health", "intervalMillis": 5000,
                    "timeoutMillis": 2000, "healthyThreshold": 2, "unhealthyThreshold": 2}}],
            "serviceDiscovery": {"dns": {"hostname": "web.demo.local"}}}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(
        node.grpc_addr(),
        "demo",
        ["--virtual-node", "web"],
        dir.path(),
        "127.0.0.23",
    );
    proxy.wait_ready(Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(3), || dig_short(
        &node,
        "web.demo.local"
    ) == ["127.0.0.23"]));

    // Two failed probes 5 s apart: out within two intervals (10 s) plus delivery.
    let t = Instant::now();
    app.set_healthy(false);
    assert!(
        wait_until(Duration::from_secs(12), || dig_short(
            &node,
            "web.demo.local"
        )
        .is_empty()),
        "still in DNS:\n{}",
        proxy.log()
    );
    let out = t.elapsed();
    assert!(out <= Duration::from_millis(11_500), "took {out:?}");
    let listed = proxies(&node);
    assert_eq!(listed[0]["healthy"], false, "{listed:?}");

    // Two passing probes bring it back.
    let t = Instant::now();
    app.set_healthy(true);
    assert!(wait_until(Duration::from_secs(12), || dig_short(
        &node,
        "web.demo.local"
    ) == ["127.0.0.23"]));
    eprintln!(
        "unhealthy app left DNS after {out:?}; back {:?} after recovering (interval 5 s, thresholds 2)",
        t.elapsed()
    );
}
