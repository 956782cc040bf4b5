//! Every App Mesh route match kind, end to end: a client's proxy routes requests from curl,
//! hyper (HTTP/2 with `:scheme`) and tonic (gRPC) over mTLS to the `red` or `blue` virtual
//! node, and `trellis echo` behind each says which one answered. Each kind is checked with a
//! request that matches (blue) and a near miss that falls through to the catch-all (red).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::echo::{Echo, curl};
use common::mesh::put;
use common::proxy;
use common::{DevNode, wait_until};
use http_body_util::{BodyExt, Empty};
use serde_json::{Value, json};
use trellis::wire::health::HealthCheckRequest;
use trellis::wire::health::health_client::HealthClient;

const RED: &str = "127.0.0.111";
const BLUE: &str = "127.0.0.112";
const CLIENT: &str = "127.0.0.113";

/// An HTTP route on router port 9080 that sends what `m` matches to blue.
fn to_blue(name: &str, priority: i64, member: &str, mut m: Value, port: i64) -> Value {
    m["port"] = json!(port);
    let target_port = if member == "httpRoute" { 9080 } else { port };
    json!({"routeName": name, "spec": {"priority": priority, member: {"match": m,
        "action": {"weightedTargets": [{"virtualNode": "blue", "weight": 1, "port": target_port}]}}}})
}

fn to_red(name: &str, member: &str, m: Value, port: i64) -> Value {
    let mut r = to_blue(name, 100, member, m, port);
    r["spec"][member]["action"]["weightedTargets"][0]["virtualNode"] = json!("red");
    r
}

fn header(name: &str, m: Value, invert: bool) -> Value {
    json!([{"name": name, "match": m, "invert": invert}])
}

fn setup(node: &DevNode) {
    let p = "/v20190125/meshes/demo";
    put(node, "/v20190125/meshes", json!({"meshName": "demo"}));
    let listeners = json!([
        {"portMapping": {"port": 9080, "protocol": "http"}},
        {"portMapping": {"port": 9082, "protocol": "http2"}},
        {"portMapping": {"port": 9090, "protocol": "grpc"}}]);
    for c in ["red", "blue"] {
        put(
            node,
            &format!("{p}/virtualNodes"),
            json!({"virtualNodeName": c, "spec": {"listeners": listeners,
                "serviceDiscovery": {"dns": {"hostname": format!("{c}.demo.local")}}}}),
        );
    }
    put(
        node,
        &format!("{p}/virtualRouters"),
        json!({"virtualRouterName": "color", "spec": {"listeners": [
            {"portMapping": {"port": 9080, "protocol": "http"}},
            {"portMapping": {"port": 9081, "protocol": "http"}},
            {"portMapping": {"port": 9082, "protocol": "http2"}},
            {"portMapping": {"port": 9090, "protocol": "grpc"}}]}}),
    );
    let h = "httpRoute";
    let routes = [
        to_blue("exact", 1, h, json!({"path": {"exact": "/exact"}}), 9080),
        to_blue(
            "regex",
            2,
            h,
            json!({"path": {"regex": "/items/[0-9]+"}}),
            9080,
        ),
        to_blue(
            "h-exact",
            3,
            h,
            json!({"prefix": "/h/exact", "headers": header("x-v", json!({"exact": "yes"}), false)}),
            9080,
        ),
        to_blue(
            "h-prefix",
            4,
            h,
            json!({"prefix": "/h/prefix", "headers": header("x-v", json!({"prefix": "ab"}), false)}),
            9080,
        ),
        to_blue(
            "h-suffix",
            5,
            h,
            json!({"prefix": "/h/suffix", "headers": header("x-v", json!({"suffix": "yz"}), false)}),
            9080,
        ),
        to_blue(
            "h-regex",
            6,
            h,
            json!({"prefix": "/h/regex", "headers": header("x-v", json!({"regex": "v[0-9]+"}), false)}),
            9080,
        ),
        to_blue(
            "h-range",
            7,
            h,
            json!({"prefix": "/h/range",
                "headers": header("x-v", json!({"range": {"start": 10, "end": 20}}), false)}),
            9080,
        ),
        to_blue(
            "h-invert",
            8,
            h,
            json!({"prefix": "/h/invert", "headers": header("x-v", json!({"exact": "no"}), true)}),
            9080,
        ),
        to_blue(
            "method",
            9,
            h,
            json!({"prefix": "/m", "method": "POST"}),
            9080,
        ),
        to_blue(
            "query",
            10,
            h,
            json!({"prefix": "/q", "queryParameters": [{"name": "v", "match": {"exact": "2"}}]}),
            9080,
        ),
        to_red("rest", h, json!({"prefix": "/"}), 9080),
        to_blue("port", 1, h, json!({"prefix": "/"}), 9081),
        to_blue(
            "scheme",
            1,
            "http2Route",
            json!({"prefix": "/", "scheme": "https"}),
            9082,
        ),
        to_red("rest-h2", "http2Route", json!({"prefix": "/"}), 9082),
        // Above every other gRPC route: were the service name ignored, all would go blue.
        to_blue(
            "grpc-other-service",
            0,
            "grpcRoute",
            json!({"serviceName": "grpc.health.v1.Healthy"}),
            9090,
        ),
        to_blue(
            "grpc-method",
            1,
            "grpcRoute",
            json!({"serviceName": "grpc.health.v1.Health", "methodName": "Watch"}),
            9090,
        ),
        to_blue(
            "grpc-metadata",
            2,
            "grpcRoute",
            json!({"serviceName": "grpc.health.v1.Health", "metadata": [
                {"name": "x-exact", "match": {"exact": "yes"}},
                {"name": "x-prefix", "match": {"prefix": "ab"}},
                {"name": "x-suffix", "match": {"suffix": "yz"}},
                {"name": "x-regex", "match": {"regex": "v[0-9]+"}},
                {"name": "x-range", "match": {"range": {"start": 10, "end": 20}}},
                {"name": "x-invert", "invert": true, "match": {"exact": "no"}}]}),
            9090,
        ),
        to_red("rest-grpc", "grpcRoute", json!({}), 9090),
    ];
    for r in routes {
        put(node, &format!("{p}/virtualRouter/color/routes"), r);
    }
    put(
        node,
        &format!("{p}/virtualServices"),
        json!({"virtualServiceName": "color.demo.local",
            "spec": {"provider": {"virtualRouter": {"virtualRouterName": "color"}}}}),
    );
    put(
        node,
        &format!("{p}/virtualNodes"),
        json!({"virtualNodeName": "client", "spec": {"backends": [
            {"virtualService": {"virtualServiceName": "color.demo.local"}}]}}),
    );
}

/// Who answered `curl -x out … http://color.demo.local:PORT/PATH` (or the status and body).
fn who(out: SocketAddr, port: u16, path: &str, extra: &[&str]) -> String {
    let proxy = format!("http://{out}");
    let url = format!("http://color.demo.local:{port}{path}");
    let mut args = vec!["-x", proxy.as_str()];
    args.extend(extra);
    args.push(&url);
    let got = curl(&args);
    got.name()
        .unwrap_or_else(|| format!("{} {}", got.status, got.body))
}

/// Who answered an HTTP/2 request with `:scheme` `scheme`, sent with prior knowledge.
async fn who_h2(out: SocketAddr, scheme: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(out).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("{scheme}://color.demo.local:9082/s"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["name"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{status} {}", String::from_utf8_lossy(&body)))
}

#[test]
fn every_route_match_kind_picks_its_target() {
    let node = DevNode::start();
    setup(&node);
    let _apps: Vec<Echo> = [(RED, "red"), (BLUE, "blue")]
        .iter()
        .flat_map(|(ip, name)| {
            [9080, 9082, 9090].map(|port| Echo::start(&format!("{ip}:{port}"), name))
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let start = |vn: &str, ip: &str| {
        proxy::with_certificate(node.grpc_addr(), node.api_url(), vn, ip, dir.path(), &[])
    };
    let _red = start("red", RED);
    let _blue = start("blue", BLUE);
    let client = start("client", CLIENT);
    client.wait_ready(Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(15), || client.endpoints(None) >= 2),
        "{:?}",
        client.cached()
    );
    let (_, out) = client.listening();
    assert!(
        wait_until(Duration::from_secs(15), || who(out, 9080, "/", &[])
            == "red"),
        "the catch-all never reached red: {}",
        who(out, 9080, "/", &[])
    );

    // (port, path, curl flags, who must answer)
    let cases: &[(u16, &str, &[&str], &str)] = &[
        (9080, "/exact", &[], "blue"),
        (9080, "/exact/more", &[], "red"),
        (9080, "/items/42", &[], "blue"),
        (9080, "/items/4x", &[], "red"),
        // A regex matches the whole path.
        (9080, "/items/42/more", &[], "red"),
        (9080, "/h/exact", &["-H", "x-v: yes"], "blue"),
        (9080, "/h/exact", &["-H", "x-v: yess"], "red"),
        (9080, "/h/exact", &[], "red"),
        (9080, "/h/prefix", &["-H", "x-v: abc"], "blue"),
        (9080, "/h/prefix", &["-H", "x-v: xab"], "red"),
        (9080, "/h/suffix", &["-H", "x-v: xyz"], "blue"),
        (9080, "/h/suffix", &["-H", "x-v: yzx"], "red"),
        (9080, "/h/regex", &["-H", "x-v: v12"], "blue"),
        (9080, "/h/regex", &["-H", "x-v: v12a"], "red"),
        // Envoy's range is [start, end).
        (9080, "/h/range", &["-H", "x-v: 10"], "blue"),
        (9080, "/h/range", &["-H", "x-v: 19"], "blue"),
        (9080, "/h/range", &["-H", "x-v: 20"], "red"),
        (9080, "/h/range", &["-H", "x-v: ten"], "red"),
        (9080, "/h/invert", &["-H", "x-v: yes"], "blue"),
        (9080, "/h/invert", &["-H", "x-v: no"], "red"),
        // A missing header never matches, inverted or not.
        (9080, "/h/invert", &[], "red"),
        (9080, "/m", &["-X", "POST"], "blue"),
        (9080, "/m", &[], "red"),
        (9080, "/q?v=2", &[], "blue"),
        (9080, "/q?a=1&v=2", &[], "blue"),
        (9080, "/q?v=3", &[], "red"),
        (9080, "/q", &[], "red"),
        // The router's second listener has its own route.
        (9081, "/", &[], "blue"),
        (9081, "/exact/more", &[], "blue"),
    ];
    let mut wrong = Vec::new();
    for (port, path, flags, want) in cases {
        let got = who(out, *port, path, flags);
        if got != *want {
            wrong.push(format!("{port}{path} {flags:?}: {got}, want {want}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_eq!(who_h2(out, "https").await, "blue");
        assert_eq!(who_h2(out, "http").await, "red");

        let channel = tonic::transport::Endpoint::from_shared(format!("http://{out}"))
            .unwrap()
            .origin("http://color.demo.local:9090".parse().unwrap())
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        let name = |md: &tonic::metadata::MetadataMap| {
            md.get(trellis::echo::NAME_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string()
        };
        let all = [
            ("x-exact", "yes"),
            ("x-prefix", "abc"),
            ("x-suffix", "xyz"),
            ("x-regex", "v12"),
            ("x-range", "15"),
            ("x-invert", "yes"),
        ];
        let check = |metadata: &[(&'static str, &'static str)]| {
            let mut req = tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            });
            for (k, v) in metadata {
                req.metadata_mut().insert(*k, v.parse().unwrap());
            }
            req
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let answered = loop {
            match health.check(check(&all)).await {
                Ok(r) => break name(r.metadata()),
                Err(e) => {
                    assert!(Instant::now() < deadline, "gRPC never answered: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        // Every metadata rule holds: blue.
        assert_eq!(answered, "blue");
        // Any one rule broken: red.
        let near_misses = [
            ("x-exact", "yess"),
            ("x-prefix", "xab"),
            ("x-suffix", "yzx"),
            ("x-regex", "v12a"),
            ("x-range", "20"),
            ("x-invert", "no"),
        ];
        for miss in near_misses {
            let md: Vec<_> = all
                .iter()
                .map(|&(k, v)| if k == miss.0 { miss } else { (k, v) })
                .collect();
            let r = health.check(check(&md)).await.unwrap();
            assert_eq!(name(r.metadata()), "red", "{miss:?}");
        }
        let md: Vec<_> = all
            .iter()
            .copied()
            .filter(|(k, _)| *k != "x-invert")
            .collect();
        let r = health.check(check(&md)).await.unwrap();
        assert_eq!(name(r.metadata()), "red", "x-invert missing");
        // The method name: Watch goes to blue without any metadata.
        let r = health.watch(check(&[])).await.unwrap();
        assert_eq!(name(r.metadata()), "blue");
        let r = health.check(check(&[])).await.unwrap();
        assert_eq!(name(r.metadata()), "red");
    });
}
