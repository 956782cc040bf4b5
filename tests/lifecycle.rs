//! The proxy's lifecycle under traffic, with real binaries over mTLS: route changes swap in
//! while requests flow and none is lost; certificates renew under load and none is lost;
//! SIGTERM lets requests in flight finish (on the caller's and the callee's side).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::echo::Echo;
use common::mesh::{self, put};
use common::proxy::{self, Proxy};
use common::{DevNode, wait_until};
use http_body_util::{BodyExt, Empty};
use serde_json::json;

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// GET /color through the explicit listener `out` (routed by Host): status and echo name.
async fn get(c: &Client, out: SocketAddr, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req =
        http::Request::get(format!("http://{out}/color")).header("host", "color.demo.local:9080");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    match c.request(req.body(Empty::new()).unwrap()).await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.into_body().collect().await.map(|b| b.to_bytes());
            let v: serde_json::Value = body
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            (status, v["name"].as_str().unwrap_or("").to_string())
        }
        Err(e) => (0, e.to_string()),
    }
}

struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<(u16, String)>>>,
    stop: Arc<AtomicBool>,
    names: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the workers, waits for their last requests, and asserts none failed; returns
    /// the names that answered.
    fn finish(
        mut self,
        rt: &tokio::runtime::Runtime,
        what: &str,
    ) -> std::collections::BTreeSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        for w in std::mem::take(&mut self.workers) {
            rt.block_on(w).unwrap();
        }
        let ok = self.answered();
        let failed = self.failed.lock().unwrap().clone();
        eprintln!("{what}: {ok} requests answered, {} failed", failed.len());
        assert!(
            failed.is_empty(),
            "{} of {} failed: {:?}",
            failed.len(),
            ok,
            &failed[..failed.len().min(5)]
        );
        assert!(ok > 200, "too little load: {ok}");
        self.names.lock().unwrap().clone()
    }
}

/// `workers` loops of requests until stopped.
fn load(rt: &tokio::runtime::Runtime, out: SocketAddr, workers: usize) -> Load {
    let mut l = Load {
        ok: Arc::default(),
        failed: Arc::default(),
        stop: Arc::default(),
        names: Arc::default(),
        workers: Vec::new(),
    };
    for _ in 0..workers {
        let (ok, failed, stop, names) = (
            l.ok.clone(),
            l.failed.clone(),
            l.stop.clone(),
            l.names.clone(),
        );
        l.workers.push(rt.spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let (status, name) = get(&c, out, &[]).await;
                if status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                    names.lock().unwrap().insert(name);
                } else {
                    failed.lock().unwrap().push((status, name));
                }
            }
        }));
    }
    l
}

struct Mesh {
    node: DevNode,
    red: Proxy,
    blue: Proxy,
    client: Proxy,
    out: SocketAddr,
    dir: tempfile::TempDir,
    apps: [Echo; 2],
}

/// The color mesh over mTLS: red and blue apps with their proxies, and a client proxy.
fn start(config: &str, base: u8) -> Mesh {
    let node = DevNode::start_with_config(config);
    let backends =
        json!({"backends": [{"virtualService": {"virtualServiceName": "color.demo.local"}}]});
    mesh::color_mesh(&node, 50, 50, backends);
    let ip = |i: u8| format!("127.0.0.{}", base + i);
    let apps = [
        Echo::start(&format!("{}:9080", ip(0)), "red"),
        Echo::start(&format!("{}:9080", ip(1)), "blue"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let proxy = |vn: &str, ip: &str| {
        proxy::with_certificate(
            node.grpc_addr(),
            node.api_url(),
            vn,
            ip,
            dir.path(),
            &["--drain-time", "20s"],
        )
    };
    let red = proxy("red", &ip(0));
    let blue = proxy("blue", &ip(1));
    let client = proxy("client", &ip(2));
    client.wait_ready(Duration::from_secs(20));
    let out = client.listening().1;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = client_for_wait();
    assert!(
        wait_until(Duration::from_secs(15), || {
            let names: std::collections::BTreeSet<String> =
                (0..10).map(|_| rt.block_on(get(&c, out, &[])).1).collect();
            names.contains("red") && names.contains("blue")
        }),
        "the mesh never answered from both colors:\n{}",
        client.log()
    );
    Mesh {
        node,
        red,
        blue,
        client,
        out,
        dir,
        apps,
    }
}

fn client_for_wait() -> Client {
    client()
}

#[test]
fn config_swaps_under_load_lose_no_request() {
    let m = start("", 130);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let l = load(&rt, m.out, 8);
    let probe = client();
    let all_go_to = |name: &str| {
        wait_until(Duration::from_secs(10), || {
            (0..5).all(|_| rt.block_on(get(&probe, m.out, &[])).1 == name)
        })
    };
    for (i, (r, b)) in [(100, 0), (0, 100), (50, 50), (1, 99), (99, 1)]
        .iter()
        .cycle()
        .take(20)
        .enumerate()
    {
        put(
            &m.node,
            "/v20190125/meshes/demo/virtualRouter/color/routes/color",
            json!({"spec": mesh::route(*r, *b)}),
        );
        // A route of its own comes and goes too.
        let canary = "/v20190125/meshes/demo/virtualRouter/color/routes";
        if i % 2 == 0 {
            put(
                &m.node,
                canary,
                json!({"routeName": format!("canary{i}"), "spec": {"priority": 0, "httpRoute": {
                    "match": {"prefix": "/", "headers": [{"name": "x-canary", "match": {"exact": "yes"}}]},
                    "action": {"weightedTargets": [{"virtualNode": "blue", "weight": 1}]}}}}),
            );
        }
        // Each swap takes effect (where one target has all the weight, every answer says so).
        match (r, b) {
            (100, 0) => assert!(all_go_to("red"), "swap {i} to all red"),
            (0, 100) => assert!(all_go_to("blue"), "swap {i} to all blue"),
            _ => {}
        }
        // Some requests go through each config before the next swap.
        let seen = l.answered();
        assert!(wait_until(Duration::from_secs(10), || l.answered() >= seen + 50));
    }
    l.finish(&rt, "config swaps under load");
    drop(m.client);
}

#[test]
fn certificates_renew_under_load_and_no_request_is_lost() {
    let m = start("proxy_cert_seconds = 10\n", 140);
    let cert = m.dir.path().join("client/identity/cert.pem");
    let first = std::fs::read_to_string(&cert).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let l = load(&rt, m.out, 8);
    // Two renewals (at two thirds of 10 s) under load.
    let started = Instant::now();
    let mut previous = first;
    for n in 1..=2 {
        assert!(
            wait_until(Duration::from_secs(20), || std::fs::read_to_string(&cert)
                .is_ok_and(
                    |c| c != previous && c.trim_end().ends_with("-----END CERTIFICATE-----")
                )),
            "no renewal {n}"
        );
        previous = std::fs::read_to_string(&cert).unwrap();
        eprintln!("renewal {n} after {:?}", started.elapsed());
    }
    let names = l.finish(&rt, "renewals under load");
    assert!(names.contains("red") && names.contains("blue"), "{names:?}");
}

#[test]
fn sigterm_drains_requests_in_flight() {
    let mut m = start("", 150);
    put(
        &m.node,
        "/v20190125/meshes/demo/virtualRouter/color/routes/color",
        json!({"spec": mesh::route(100, 0)}),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = client();
    assert!(wait_until(Duration::from_secs(10), || {
        (0..5).all(|_| rt.block_on(get(&c, m.out, &[])).1 == "red")
    }));
    // The callee: red's proxy is told to stop while a 2 s request is inside it.
    let red_before = m.apps[0].served();
    let slow = rt.spawn({
        let c = c.clone();
        let out = m.out;
        async move { get(&c, out, &[("x-echo-delay-ms", "2000")]).await }
    });
    // Inside the app, that is.
    assert!(wait_until(Duration::from_secs(10), || m.apps[0].served() > red_before));
    m.red.signal_term();
    let (status, name) = rt.block_on(slow).unwrap();
    assert_eq!((status, name.as_str()), (200, "red"));
    assert!(
        m.red.wait_exit(Duration::from_secs(10)),
        "red's proxy did not exit"
    );
    assert_eq!(m.red.exit_code(), Some(0), "{}", m.red.log());
    // The caller: the client proxy stops with a request in flight.
    put(
        &m.node,
        "/v20190125/meshes/demo/virtualRouter/color/routes/color",
        json!({"spec": mesh::route(0, 100)}),
    );
    assert!(wait_until(Duration::from_secs(10), || {
        rt.block_on(get(&c, m.out, &[])).1 == "blue"
    }));
    let blue_before = m.apps[1].served();
    let slow = rt.spawn({
        let out = m.out;
        async move { get(&client(), out, &[("x-echo-delay-ms", "2000")]).await }
    });
    assert!(wait_until(Duration::from_secs(10), || m.apps[1].served() > blue_before));
    let t = Instant::now();
    m.client.signal_term();
    let (status, name) = rt.block_on(slow).unwrap();
    assert_eq!((status, name.as_str()), (200, "blue"));
    assert!(m.client.wait_exit(Duration::from_secs(10)));
    assert_eq!(m.client.exit_code(), Some(0), "{}", m.client.log());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Its listener is closed.
    assert!(std::net::TcpStream::connect(m.out).is_err());
    drop(m.blue);
}
