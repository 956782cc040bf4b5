//! Retries, the retry budget, outlier ejection and connection pools, end to end through two
//! proxies to `trellis echo` apps, counting the attempts that reach each app.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::echo::{Echo, Got, curl};
use common::mesh::put;
use common::proxy::Proxy;
use common::{DevNode, wait_until};
use serde_json::{Value, json};

fn node(name: &str, listener_extra: Value) -> Value {
    let mut listener = json!({"portMapping": {"port": 9080, "protocol": "http"}});
    for (k, v) in listener_extra.as_object().into_iter().flatten() {
        listener[k] = v.clone();
    }
    json!({"virtualNodeName": name, "spec": {"listeners": [listener],
        "serviceDiscovery": {"dns": {"hostname": format!("{name}.demo.local")}}}})
}

fn route(name: &str, priority: i64, prefix: &str, target: &str, retry: Option<Value>) -> Value {
    let mut http = json!({"match": {"prefix": prefix},
        "action": {"weightedTargets": [{"virtualNode": target, "weight": 1}]}});
    if let Some(r) = retry {
        http["retryPolicy"] = r;
    }
    json!({"routeName": name, "spec": {"priority": priority, "httpRoute": http}})
}

fn setup(node_: &DevNode) {
    let p = "/v20190125/meshes/demo";
    put(node_, "/v20190125/meshes", json!({"meshName": "demo"}));
    put(
        node_,
        &format!("{p}/virtualNodes"),
        node(
            "red",
            json!({"connectionPool": {"http": {"maxConnections": 1, "maxPendingRequests": 1}}}),
        ),
    );
    put(
        node_,
        &format!("{p}/virtualNodes"),
        node(
            "blue",
            json!({"outlierDetection": {"maxServerErrors": 3, "maxEjectionPercent": 50,
                "interval": {"unit": "s", "value": 1},
                "baseEjectionDuration": {"unit": "s", "value": 300}}}),
        ),
    );
    put(
        node_,
        &format!("{p}/virtualRouters"),
        json!({"virtualRouterName": "color", "spec": {"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}]}}),
    );
    let routes = format!("{p}/virtualRouter/color/routes");
    let server_error = |max: i64| {
        json!({"maxRetries": max, "httpRetryEvents": ["server-error"],
            "perRetryTimeout": {"unit": "s", "value": 5}})
    };
    put(
        node_,
        &routes,
        route("retry", 1, "/retry", "red", Some(server_error(3))),
    );
    put(
        node_,
        &routes,
        route("pool", 2, "/pool", "red", Some(server_error(0))),
    );
    put(node_, &routes, route("blue", 3, "/blue", "blue", None));
    put(node_, &routes, route("default", 9, "/", "red", None));
    service_and_client(
        node_,
        json!({"virtualRouter": {"virtualRouterName": "color"}}),
    );
}

fn get(out: SocketAddr, path: &str, headers: &[&str]) -> Got {
    let mut args = vec!["-x".to_string(), format!("http://{out}")];
    for h in headers {
        args.extend(["-H".to_string(), h.to_string()]);
    }
    args.push(format!("http://color.demo.local:9080{path}"));
    curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A proxy for `vn` whose app listens on `ip` (and which advertises `ip`).
fn proxy(dev: &DevNode, dir: &std::path::Path, vn: &str, ip: &str, extra: &[&str]) -> Proxy {
    let mut args = vec!["--no-vip-listeners", "--app-host", ip];
    args.extend(extra);
    Proxy::start_with(
        dev.grpc_addr(),
        "demo",
        ["--virtual-node", vn],
        &dir.join(ip),
        ip,
        &args,
    )
}

/// `color.demo.local` served by `provider` (a spec's `provider`), and a `client` node whose
/// backend it is.
fn service_and_client(dev: &DevNode, provider: Value) {
    let p = "/v20190125/meshes/demo";
    put(
        dev,
        &format!("{p}/virtualServices"),
        json!({"virtualServiceName": "color.demo.local", "spec": {"provider": provider}}),
    );
    put(
        dev,
        &format!("{p}/virtualNodes"),
        json!({"virtualNodeName": "client", "spec": {"backends": [{"virtualService": {"virtualServiceName": "color.demo.local"}}]}}),
    );
}

#[test]
fn retries_budgets_ejection_and_pools_behave_as_configured() {
    let dev = DevNode::start();
    setup(&dev);
    let red = Echo::start("127.0.0.91:9080", "red");
    let blue1 = Echo::start("127.0.0.92:9080", "blue1");
    let blue2 = Echo::start_with("127.0.0.93:9080", "blue2", &["--status", "503"]);
    let dir = tempfile::tempdir().unwrap();
    let start = |vn: &str, ip: &str, extra: &[&str]| proxy(&dev, dir.path(), vn, ip, extra);
    // A small floor, so the budget shows within a few hundred requests.
    let client = start(
        "client",
        "127.0.0.94",
        &["--retry-budget-min-per-second", "1"],
    );
    let _proxies = [
        start("red", "127.0.0.91", &[]),
        start("blue", "127.0.0.92", &[]),
        start("blue", "127.0.0.93", &[]),
    ];
    client.wait_ready(Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(15), || client.endpoints(Some("red"))
            == 1
            && client.endpoints(Some("blue")) == 2),
        "{:?}",
        client.cached()
    );
    let (_, out) = client.listening();
    assert!(wait_until(Duration::from_secs(10), || get(out, "/", &[])
        .status
        == 200));

    // server-error, maxRetries 3: a 500 is tried four times, the app sees attempt 4 last.
    let before = red.served();
    let got = get(out, "/retry", &["x-echo-status: 500"]);
    assert_eq!(got.status, 500, "{got:?}");
    assert_eq!(got.json()["headers"]["x-trellis-attempt"], "4");
    assert_eq!(red.served() - before, 4);
    // A 409 is not a server error: one attempt.
    let before = red.served();
    assert_eq!(get(out, "/retry", &["x-echo-status: 409"]).status, 409);
    assert_eq!(red.served() - before, 1);
    // No policy: App Mesh's default retries a 503 twice and a 500 never.
    let before = red.served();
    assert_eq!(get(out, "/", &["x-echo-status: 503"]).status, 503);
    assert_eq!(red.served() - before, 3);
    let before = red.served();
    assert_eq!(get(out, "/", &["x-echo-status: 500"]).status, 500);
    assert_eq!(red.served() - before, 1);

    // Outlier detection: blue2 always answers 503; after three in a row it is ejected (for
    // 300 s) and gets nothing, while retries on the other host keep every answer a 200.
    for _ in 0..12 {
        assert_eq!(get(out, "/blue", &[]).status, 200);
    }
    let b2 = blue2.served();
    assert!(b2 >= 3, "blue2 got {b2} requests before its ejection");
    let b1 = blue1.served();
    for _ in 0..30 {
        let got = get(out, "/blue", &[]);
        assert_eq!(got.name().as_deref(), Some("blue1"), "{got:?}");
    }
    assert_eq!(blue2.served(), b2, "an ejected host got traffic");
    assert_eq!(blue1.served() - b1, 30);

    // The connection pool: one request at a time to red, one waiting; a third is turned away.
    let handles: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || get(out, "/pool", &["x-echo-delay-ms: 1500"])))
        .collect();
    let results: Vec<Got> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut statuses: Vec<u16> = results.iter().map(|g| g.status).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503], "{results:?}");
    let refused = results.iter().find(|g| g.status == 503).unwrap();
    assert!(
        refused.body.contains("connection pool is full"),
        "{refused:?}"
    );

    // The budget: 200 requests that all fail with 503 (two retries each under the default
    // policy) may add only 20 % plus the floor of 1 per second.
    let t = Instant::now();
    let before = red.served();
    for _ in 0..200 {
        assert_eq!(get(out, "/", &["x-echo-status: 503"]).status, 503);
    }
    let attempts = red.served() - before;
    let secs = t.elapsed().as_secs_f64();
    let bound = 200.0 + 0.2 * 220.0 + secs + 10.0 + 2.0;
    assert!(
        (attempts as f64) <= bound && attempts >= 220,
        "{attempts} attempts in {secs:.1} s (budget bound {bound:.0}, 600 without one)"
    );
}

#[test]
fn a_failing_health_check_takes_an_instance_out_of_traffic() {
    let dev = DevNode::start();
    let p = "/v20190125/meshes/demo";
    put(&dev, "/v20190125/meshes", json!({"meshName": "demo"}));
    put(
        &dev,
        &format!("{p}/virtualNodes"),
        node(
            "green",
            json!({"healthCheck": {"protocol": "tcp", "healthyThreshold": 2, "unhealthyThreshold": 2,
                "timeoutMillis": 2000, "intervalMillis": 5000}}),
        ),
    );
    service_and_client(&dev, json!({"virtualNode": {"virtualNodeName": "green"}}));
    let green1 = Echo::start("127.0.0.171:9080", "green1");
    let green2 = Echo::start("127.0.0.172:9080", "green2");
    let dir = tempfile::tempdir().unwrap();
    let start = |vn: &str, ip: &str| proxy(&dev, dir.path(), vn, ip, &[]);
    let _greens = [start("green", "127.0.0.171"), start("green", "127.0.0.172")];
    let client = start("client", "127.0.0.173");
    let out = ready_with_endpoints(&client, "green", 2);
    let names: std::collections::BTreeSet<String> =
        (0..10).filter_map(|_| get(out, "/", &[]).name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // green2's app goes away: its proxy's tcp check fails twice (5 s apart) and the instance
    // leaves the client's endpoints; every request then goes to green1.
    drop(green2);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || client.endpoints(Some("green"))
            == 1),
        "{:?}",
        client.cached()
    );
    eprintln!("instance withdrawn after {:?}", t.elapsed());
    let before = green1.served();
    for _ in 0..20 {
        let got = get(out, "/", &[]);
        assert_eq!(got.name().as_deref(), Some("green1"), "{got:?}");
    }
    assert_eq!(green1.served() - before, 20);
}

/// The app stays up but fails its check: first an http2 check of `/__echo/health` fails on
/// green2 and it leaves the client's endpoints; then the check becomes grpc (a config change
/// the instances' proxies follow), green1 reports NOT_SERVING and green2 recovers (two passes),
/// and the traffic moves over.
#[test]
fn http2_and_grpc_checks_follow_the_app_and_thresholds() {
    let dev = DevNode::start();
    let p = "/v20190125/meshes/demo";
    put(&dev, "/v20190125/meshes", json!({"meshName": "demo"}));
    let check = |protocol: &str| {
        json!({"healthCheck": {"protocol": protocol, "path": "/__echo/health",
            "healthyThreshold": 2, "unhealthyThreshold": 2,
            "timeoutMillis": 2000, "intervalMillis": 5000}})
    };
    put(
        &dev,
        &format!("{p}/virtualNodes"),
        node("green", check("http2")),
    );
    service_and_client(&dev, json!({"virtualNode": {"virtualNodeName": "green"}}));
    let green1 = Echo::start("127.0.0.191:9080", "green1");
    let green2 = Echo::start("127.0.0.192:9080", "green2");
    let dir = tempfile::tempdir().unwrap();
    let start = |vn: &str, ip: &str| proxy(&dev, dir.path(), vn, ip, &[]);
    let _greens = [start("green", "127.0.0.191"), start("green", "127.0.0.192")];
    let client = start("client", "127.0.0.193");
    let out = ready_with_endpoints(&client, "green", 2);
    let answered_by =
        |name: &str| (0..10).all(|_| get(out, "/", &[]).name().as_deref() == Some(name));

    green2.set_healthy(false);
    assert!(
        wait_until(Duration::from_secs(25), || client.endpoints(Some("green"))
            == 1
            && answered_by("green1")),
        "{:?}",
        client.cached()
    );

    let mut spec = node("green", check("grpc"));
    spec["spec"]["listeners"][0]["healthCheck"]
        .as_object_mut()
        .unwrap()
        .remove("path");
    put(
        &dev,
        &format!("{p}/virtualNodes/green"),
        json!({"spec": spec["spec"]}),
    );
    // gRPC Checks count as served (the http2 check's GETs do not), and green2 gets no traffic:
    // its count rising shows the proxy probing it with the new protocol.
    let probed = green2.served();
    assert!(wait_until(Duration::from_secs(15), || green2.served() > probed));
    green1.set_healthy(false);
    green2.set_healthy(true);
    assert!(
        wait_until(Duration::from_secs(35), || client.endpoints(Some("green"))
            == 1
            && answered_by("green2")),
        "{:?}",
        client.cached()
    );
}

/// Waits until `client` is ready and knows `n` endpoints of `vn`; its explicit listener.
fn ready_with_endpoints(client: &Proxy, vn: &str, n: usize) -> SocketAddr {
    client.wait_ready(Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(15), || client.endpoints(Some(vn)) == n),
        "{:?}",
        client.cached()
    );
    client.listening().1
}

#[test]
fn p2c_over_ewma_sends_little_to_a_slow_instance() {
    let dev = DevNode::start();
    let p = "/v20190125/meshes/demo";
    put(&dev, "/v20190125/meshes", json!({"meshName": "demo"}));
    put(&dev, &format!("{p}/virtualNodes"), node("teal", json!({})));
    service_and_client(&dev, json!({"virtualNode": {"virtualNodeName": "teal"}}));
    let fast = Echo::start("127.0.0.181:9080", "fast");
    let slow = Echo::start_with("127.0.0.182:9080", "slow", &["--delay", "150ms"]);
    let dir = tempfile::tempdir().unwrap();
    let start = |vn: &str, ip: &str, extra: &[&str]| proxy(&dev, dir.path(), vn, ip, extra);
    let _teals = [
        start("teal", "127.0.0.181", &[]),
        start("teal", "127.0.0.182", &[]),
    ];
    let client = start("client", "127.0.0.183", &["--balancer", "p2c-ewma"]);
    let out = ready_with_endpoints(&client, "teal", 2);
    assert!(wait_until(Duration::from_secs(10), || get(out, "/", &[])
        .status
        == 200));
    // Round robin would give the slow instance 30 of 60. Peak EWMA learns its 150 ms from
    // one answer; after that two choices always find the fast one cheaper (the slow one's
    // estimate takes ~45 s of silence to decay below the fast one's).
    let before = (fast.served(), slow.served());
    for _ in 0..60 {
        assert_eq!(get(out, "/", &[]).status, 200);
    }
    let to_slow = slow.served() - before.1;
    assert_eq!(fast.served() - before.0 + to_slow, 60);
    assert!(to_slow <= 3, "the slow instance got {to_slow} of 60");
}

/// An app that answers the head and one chunk, then stalls (holding the connection open).
fn stalling_app(addr: &str) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nhello\n\r\n",
            );
            held.push(conn);
        }
    })
}

#[test]
fn a_response_that_stalls_past_the_route_idle_timeout_is_reset() {
    let dev = DevNode::start();
    let p = "/v20190125/meshes/demo";
    put(&dev, "/v20190125/meshes", json!({"meshName": "demo"}));
    put(&dev, &format!("{p}/virtualNodes"), node("slate", json!({})));
    put(
        &dev,
        &format!("{p}/virtualRouters"),
        json!({"virtualRouterName": "color", "spec": {"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}]}}),
    );
    let mut r = route("idle", 1, "/", "slate", None);
    r["spec"]["httpRoute"]["timeout"] = json!({"idle": {"unit": "s", "value": 1}});
    put(&dev, &format!("{p}/virtualRouter/color/routes"), r);
    service_and_client(
        &dev,
        json!({"virtualRouter": {"virtualRouterName": "color"}}),
    );
    let _app = stalling_app("127.0.0.186:9080");
    let dir = tempfile::tempdir().unwrap();
    let start = |vn: &str, ip: &str| proxy(&dev, dir.path(), vn, ip, &[]);
    let _slate = start("slate", "127.0.0.186");
    let client = start("client", "127.0.0.187");
    client.wait_ready(Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(15), || client
        .endpoints(Some("slate"))
        == 1));
    let (_, out) = client.listening();
    // The head and the first chunk arrive; then nothing for 1 s, and the stream is reset.
    let t = Instant::now();
    let got = get(out, "/", &[]);
    let took = t.elapsed();
    assert_eq!(got.status, 200, "{got:?}");
    assert!(got.body.starts_with("hello"), "{got:?}");
    assert_ne!(got.exit, 0, "curl saw the body cut: {got:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "reset after {took:?} (route idle 1 s; curl gives up at 20 s)"
    );
}
