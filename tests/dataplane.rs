//! Traffic through the mesh with the real binaries: an app calls a virtual service's VIP,
//! its proxy routes (weights, header matches, priority) to peer proxies' inbound listeners,
//! which hand the requests to `trellis echo` apps; a TCP service's VIP carries bytes to its
//! app; per-request timeouts answer 504, a chunked upload behind `Expect: 100-continue`
//! arrives whole, and a target without instances 503.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::echo::{Echo, curl};
use common::mesh::{self, put};
use common::proxy::Proxy;
use common::{DevNode, wait_until};
use http_body_util::{BodyExt, Empty};
use serde_json::{Value, json};

fn mesh(node: &DevNode) {
    let client = json!({"backends": [
        {"virtualService": {"virtualServiceName": "color.demo.local"}},
        {"virtualService": {"virtualServiceName": "raw.demo.local"}}]});
    mesh::color_mesh(node, 80, 20, client);
    // A TCP service, its virtual node the provider (no router).
    put(
        node,
        "/v20190125/meshes/demo/virtualNodes",
        json!({"virtualNodeName": "raw", "spec": {
            "listeners": [{"portMapping": {"port": 7000, "protocol": "tcp"}}],
            "serviceDiscovery": {"dns": {"hostname": "raw.demo.local"}}}}),
    );
    put(
        node,
        "/v20190125/meshes/demo/virtualServices",
        json!({"virtualServiceName": "raw.demo.local",
            "spec": {"provider": {"virtualNode": {"virtualNodeName": "raw"}}}}),
    );
}

/// The VIP:`port` the client's proxy listens on for `service`.
fn vip_of(client: &Proxy, service: &str, port: u16) -> SocketAddr {
    let config = client.cached().unwrap();
    let vip = config["config"]["outbound"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["virtual_service"] == service)
        .and_then(|o| o["vip"].as_str())
        .unwrap_or_else(|| panic!("no VIP for {service}: {config}"));
    format!("{vip}:{port}").parse().unwrap()
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

/// GET `http://vip/…` with `headers`: (status, echo's name or the body).
async fn get(client: &Client, vip: SocketAddr, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = http::Request::get(format!("http://{vip}/color"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = match client.request(req.body(Empty::new()).unwrap()).await {
        Ok(r) => r,
        Err(e) => return (0, e.to_string()),
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    let name = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["name"].as_str().map(str::to_string))
        .unwrap_or(text);
    (status, name)
}

#[test]
fn requests_follow_routes_weights_and_timeouts_through_two_proxies() {
    let node = DevNode::start();
    mesh(&node);
    let _red_app = Echo::start("127.0.0.61:9080", "red");
    let _blue_app = Echo::start("127.0.0.62:9080", "blue");
    let _raw_app = Echo::start("127.0.0.64:7000", "raw");
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let start = |i: usize, role: &str, ip: &str| {
        Proxy::start_with(
            node.grpc_addr(),
            "demo",
            ["--virtual-node", role],
            dirs[i].path(),
            ip,
            &["--app-host", ip],
        )
    };
    let red = start(0, "red", "127.0.0.61");
    let mut blue = start(1, "blue", "127.0.0.62");
    let client = start(2, "client", "127.0.0.63");
    let raw = start(3, "raw", "127.0.0.64");
    for p in [&red, &blue, &client, &raw] {
        p.wait_ready(Duration::from_secs(20));
    }
    assert!(
        wait_until(Duration::from_secs(10), || ["red", "blue", "raw"]
            .iter()
            .all(|n| client.endpoints(Some(n)) == 1)),
        "endpoints never reached the client: {:?}",
        client.cached()
    );
    let vip = vip_of(&client, "color.demo.local", 9080);

    // A TCP route on its VIP: the bytes go through both proxies (mTLS between) to the app,
    // which happens to speak HTTP.
    let raw_vip = vip_of(&client, "raw.demo.local", 7000);
    let exchange = || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&raw_vip, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /raw HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n")?;
        let mut got = String::new();
        s.read_to_string(&mut got)?;
        Ok(got)
    };
    let mut answer = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            answer = exchange().unwrap_or_else(|e| e.to_string());
            answer.contains("\"name\":\"raw\"")
        }),
        "{answer}"
    );
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("\"path\":\"/raw\""), "{answer}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let http: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(&http, vip, &[]).await.0 != 200 {
            assert!(Instant::now() < deadline, "the VIP never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // An 80/20 split over 10,000 requests, within ±3 %.
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..10_000 {
            let (status, name) = get(&http, vip, &[]).await;
            assert_eq!(status, 200, "{name}");
            *counts.entry(name).or_default() += 1;
        }
        let red_share = counts.get("red").copied().unwrap_or(0);
        assert!((7_700..=8_300).contains(&red_share), "{counts:?}");
    });

    // A header match at priority 0 sends canaries to blue, with a 300 ms per-request timeout.
    put(
        &node,
        "/v20190125/meshes/demo/virtualRouter/color/routes",
        json!({"routeName": "canary", "spec": {"priority": 0, "httpRoute": {
            "match": {"prefix": "/", "headers": [{"name": "x-canary", "match": {"exact": "yes"}}]},
            "action": {"weightedTargets": [{"virtualNode": "blue", "weight": 1}]},
            "timeout": {"perRequest": {"unit": "ms", "value": 300}}}}}),
    );
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut all_blue = true;
            for _ in 0..20 {
                all_blue &= get(&http, vip, &[("x-canary", "yes")]).await == (200, "blue".into());
            }
            if all_blue {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the canary route never took effect"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t = Instant::now();
        let (status, body) = get(
            &http,
            vip,
            &[("x-canary", "yes"), ("x-echo-delay-ms", "3000")],
        )
        .await;
        assert_eq!(status, 504, "{body}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    });

    // A chunked upload that waits for 100 Continue crosses both proxies whole.
    let upload = dirs[2].path().join("upload");
    std::fs::write(&upload, "x".repeat(300_000)).unwrap();
    let got = curl(&[
        "-v",
        "-H",
        "Expect: 100-continue",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("http://{vip}/upload"),
    ]);
    assert_eq!(got.status, 200, "{got:?}");
    assert!(
        got.stderr.contains("< HTTP/1.1 100 Continue"),
        "{}",
        got.stderr
    );
    assert_eq!(got.json()["bodyBytes"], 300_000, "{got:?}");
    // A small POST (its body comes with its head: the proxy's own codec) crosses whole.
    let got = curl(&[
        "--data-binary",
        "a small body",
        &format!("http://{vip}/small"),
    ]);
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.json()["method"], "POST", "{got:?}");
    assert_eq!(got.json()["bodyBytes"], 12, "{got:?}");

    // Blue goes away: canaries get 503 (no endpoint) once the registry says so.
    blue.terminate();
    assert!(wait_until(Duration::from_secs(10), || client
        .endpoints(Some("blue"))
        == 0));
    rt.block_on(async {
        let (status, body) = get(&http, vip, &[("x-canary", "yes")]).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("no healthy endpoint"), "{body}");
        // The 80/20 route still reaches red; its blue share has nowhere to go (Envoy's 503).
        let mut statuses = Vec::new();
        for _ in 0..20 {
            statuses.push(get(&http, vip, &[]).await.0);
        }
        assert!(statuses.contains(&200), "{statuses:?}");
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 503),
            "{statuses:?}"
        );
    });
    drop((red, raw));
}
