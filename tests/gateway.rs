//! A virtual gateway end to end: `curl` from outside to the gateway proxy's listener, gateway
//! routes (prefix, exact path, hostname exact and suffix, header, method, query parameter,
//! priority) to virtual services, App
//! Mesh's default rewrites (Host to the service name, matched prefix to `/`) and the rewrite
//! options, then through the services' own routes and a peer proxy to `trellis echo` apps;
//! and a gRPC gateway route (service name) carrying unary calls and streams both ways.

mod common;

use std::time::Duration;

use common::echo::{Echo, Got, curl};
use common::mesh::put;
use common::proxy::Proxy;
use common::{DevNode, wait_until};
use serde_json::{Value, json};

fn setup(node: &DevNode, gw_port: u16) {
    let p = "/v20190125/meshes/demo";
    put(node, "/v20190125/meshes", json!({"meshName": "demo"}));
    for c in ["red", "blue"] {
        put(
            node,
            &format!("{p}/virtualNodes"),
            json!({"virtualNodeName": c, "spec": {
                "listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
                "serviceDiscovery": {"dns": {"hostname": format!("{c}.demo.local")}}}}),
        );
        put(
            node,
            &format!("{p}/virtualServices"),
            json!({"virtualServiceName": format!("{c}.demo.local"), "spec": {"provider": {"virtualNode": {"virtualNodeName": c}}}}),
        );
    }
    put(
        node,
        &format!("{p}/virtualGateways"),
        json!({"virtualGatewayName": "gw", "spec": {"listeners": [{"portMapping": {"port": gw_port, "protocol": "http"}}]}}),
    );
    let routes = format!("{p}/virtualGateway/gw/gatewayRoutes");
    let target = |svc: &str| json!({"target": {"virtualService": {"virtualServiceName": svc}}});
    let with = |svc: &str, rewrite: Value| {
        let mut t = target(svc);
        t["rewrite"] = rewrite;
        t
    };
    for (name, priority, m, action) in [
        (
            "red",
            None,
            json!({"prefix": "/red"}),
            target("red.demo.local"),
        ),
        (
            "blue-as-is",
            None,
            json!({"prefix": "/blue"}),
            with(
                "blue.demo.local",
                json!({"hostname": {"defaultTargetHostname": "DISABLED"},
                       "prefix": {"defaultPrefix": "DISABLED"}}),
            ),
        ),
        (
            "exact",
            None,
            json!({"path": {"exact": "/exact"}}),
            with("red.demo.local", json!({"path": {"exact": "/rewritten"}})),
        ),
        (
            "shop",
            Some(0),
            json!({"prefix": "/", "hostname": {"suffix": ".shop.example"}}),
            target("blue.demo.local"),
        ),
        (
            "canary",
            Some(1),
            json!({"prefix": "/red", "headers": [{"name": "x-canary", "match": {"exact": "yes"}}]}),
            with("blue.demo.local", json!({"prefix": {"value": "/canary/"}})),
        ),
        (
            "by-method",
            None,
            json!({"prefix": "/m", "method": "POST"}),
            target("blue.demo.local"),
        ),
        (
            "by-query",
            None,
            json!({"prefix": "/q", "queryParameters": [{"name": "v", "match": {"exact": "1"}}]}),
            target("blue.demo.local"),
        ),
        (
            "api",
            Some(2),
            json!({"prefix": "/", "hostname": {"exact": "api.example"}}),
            target("red.demo.local"),
        ),
    ] {
        let mut spec = json!({"httpRoute": {"match": m, "action": action}});
        if let Some(p) = priority {
            spec["priority"] = json!(p);
        }
        put(
            node,
            &routes,
            json!({"gatewayRouteName": name, "spec": spec}),
        );
    }
}

/// A proxy in `role` whose app (if any) listens on `ip`, advertising `ip`.
fn proxy(
    node: &DevNode,
    dir: &std::path::Path,
    role: [&str; 2],
    ip: &str,
    extra: &[&str],
) -> Proxy {
    let mut args = vec!["--no-vip-listeners", "--app-host", ip];
    args.extend(extra);
    Proxy::start_with(node.grpc_addr(), "demo", role, &dir.join(ip), ip, &args)
}

#[test]
fn gateway_routes_match_rewrite_and_reach_services() {
    const GW: &str = "127.0.0.121";
    let gw_port = common::free_port(GW);
    let node = DevNode::start();
    setup(&node, gw_port);
    let _red = Echo::start("127.0.0.122:9080", "red");
    let _blue = Echo::start("127.0.0.123:9080", "blue");
    let dir = tempfile::tempdir().unwrap();
    let start =
        |role: [&str; 2], ip: &str, extra: &[&str]| proxy(&node, dir.path(), role, ip, extra);
    let _apps = [
        start(["--virtual-node", "red"], "127.0.0.122", &[]),
        start(["--virtual-node", "blue"], "127.0.0.123", &[]),
    ];
    // The listener's port is held by another process when the gateway starts: it says so,
    // and opens the listener once the port is free, without a config change.
    let squatter = std::net::TcpListener::bind((GW, gw_port)).unwrap();
    let gw = start(["--virtual-gateway", "gw"], GW, &["--gateway-host", GW]);
    gw.wait_ready(Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(15), || gw
            .log()
            .contains("cannot open a listener; trying again every second")),
        "{}",
        gw.log()
    );
    // Once both services' instances are in the gateway's config no change is coming: the
    // listener can only open by the retry.
    assert!(wait_until(Duration::from_secs(15), || gw
        .endpoints(Some("red"))
        == 1
        && gw.endpoints(Some("blue")) == 1));
    drop(squatter);
    let get = |path: &str, headers: &[&str]| -> Got {
        let mut args: Vec<String> = Vec::new();
        for h in headers {
            args.extend(["-H".into(), h.to_string()]);
        }
        args.push(format!("http://{GW}:{gw_port}{path}"));
        curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert!(
        wait_until(Duration::from_secs(15), || get("/red/x", &[]).status == 200),
        "{:?}\n{}",
        get("/red/x", &[]),
        gw.log()
    );

    // The defaults: the matched prefix becomes `/`, Host the service's name.
    let got = get("/red/books?page=2", &["host: gw.example"]);
    let v = got.json();
    assert_eq!(got.name().as_deref(), Some("red"), "{got:?}");
    assert_eq!(v["path"], "/books");
    assert_eq!(v["query"], "page=2");
    assert_eq!(v["headers"]["host"], "red.demo.local");
    // Both rewrites disabled.
    let got = get("/blue/books", &["host: gw.example"]);
    assert_eq!(got.name().as_deref(), Some("blue"), "{got:?}");
    assert_eq!(got.json()["path"], "/blue/books");
    assert_eq!(got.json()["headers"]["host"], "gw.example");
    // An exact path with a path rewrite.
    let got = get("/exact", &[]);
    assert_eq!(
        (got.name().as_deref(), got.json()["path"].as_str()),
        (Some("red"), Some("/rewritten"))
    );
    // A hostname suffix at priority 0 wins over the longer prefix.
    let got = get("/red/x", &["host: books.shop.example"]);
    assert_eq!(got.name().as_deref(), Some("blue"), "{got:?}");
    // A header match at priority 1, with a prefix value rewrite.
    let got = get("/red/x", &["x-canary: yes"]);
    assert_eq!(got.name().as_deref(), Some("blue"), "{got:?}");
    assert_eq!(got.json()["path"], "/canary/x");
    // A method match, and its near miss.
    let got = curl(&["-X", "POST", &format!("http://{GW}:{gw_port}/m/x")]);
    assert_eq!(got.name().as_deref(), Some("blue"), "{got:?}");
    assert_eq!(got.json()["method"], "POST");
    assert_eq!(get("/m/x", &[]).status, 404);
    // A query parameter match, and its near misses.
    let got = get("/q?v=1", &[]);
    assert_eq!(got.name().as_deref(), Some("blue"), "{got:?}");
    assert_eq!(get("/q?v=2", &[]).status, 404);
    assert_eq!(get("/q", &[]).status, 404);
    // An exact hostname (any case, any port): not a suffix.
    let got = get("/nowhere", &["host: API.example:8443"]);
    assert_eq!(got.name().as_deref(), Some("red"), "{got:?}");
    assert_eq!(get("/nowhere", &["host: v1.api.example"]).status, 404);
    // Nothing matches: 404.
    assert_eq!(get("/nowhere", &[]).status, 404);
}

/// A self-signed certificate for `name` (the `openssl` CLI), as App Mesh's file certificates.
fn certificate(dir: &std::path::Path, name: &str) -> (String, String) {
    let (cert, key) = (dir.join("gw.crt"), dir.join("gw.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName=DNS:{name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{out:?}");
    (cert.display().to_string(), key.display().to_string())
}

#[test]
fn a_gateway_listener_terminates_tls_with_its_file_certificate() {
    const GW: &str = "127.0.0.126";
    let gw_port = common::free_port(GW);
    let node = DevNode::start();
    setup(&node, gw_port);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "gw.example");
    let gateway = |certificate: Value| {
        json!({"spec": {"listeners": [{
            "portMapping": {"port": gw_port, "protocol": "http"},
            "tls": {"mode": "STRICT", "certificate": certificate}}]}})
    };
    put(
        &node,
        "/v20190125/meshes/demo/virtualGateways/gw",
        gateway(json!({"file": {"certificateChain": cert, "privateKey": key}})),
    );
    let _red = Echo::start("127.0.0.127:9080", "red");
    let start =
        |role: [&str; 2], ip: &str, extra: &[&str]| proxy(&node, dir.path(), role, ip, extra);
    let _app = start(["--virtual-node", "red"], "127.0.0.127", &[]);
    let gw = start(["--virtual-gateway", "gw"], GW, &["--gateway-host", GW]);
    gw.wait_ready(Duration::from_secs(20));
    let resolve = format!("gw.example:{gw_port}:{GW}");
    let https = |path: &str| {
        curl(&[
            "--cacert",
            &cert,
            "--resolve",
            &resolve,
            &format!("https://gw.example:{gw_port}{path}"),
        ])
    };
    assert!(
        wait_until(Duration::from_secs(15), || https("/red/x").status == 200),
        "{:?}\n{}",
        https("/red/x"),
        gw.log()
    );
    let got = https("/red/books");
    assert_eq!(got.name().as_deref(), Some("red"), "{got:?}");
    assert_eq!(got.json()["path"], "/books");
    // HTTP/2 over TLS (ALPN) as well.
    let version = std::process::Command::new("curl")
        .args(["-s", "--http2", "--cacert", &cert, "--resolve", &resolve])
        .args(["-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
        .arg(format!("https://gw.example:{gw_port}/red/x"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&version.stdout), "2 200");
    // HTTP/1.1 over TLS: two requests on one kept-alive connection.
    let url = format!("https://gw.example:{gw_port}/red/x");
    let h1 = std::process::Command::new("curl")
        .args(["-s", "--http1.1", "--cacert", &cert, "--resolve", &resolve])
        .args(["-w", "%{http_version} %{http_code} %{num_connects}\n"])
        .args(["-o", "/dev/null", &url, "-o", "/dev/null", &url])
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&h1.stdout),
        "1.1 200 1\n1.1 200 0\n"
    );
    // An ambiguous length over TLS is refused with the reason, as on plaintext.
    let mut smuggle = std::process::Command::new("timeout")
        .args([
            "15",
            "openssl",
            "s_client",
            "-quiet",
            "-verify_quiet",
            "-alpn",
            "http/1.1",
        ])
        .args(["-CAfile", &cert, "-servername", "gw.example"])
        .args(["-connect", &format!("{GW}:{gw_port}")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl");
    use std::io::Write;
    smuggle
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"POST /red/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .unwrap();
    let out = smuggle.wait_with_output().unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert!(answer.contains("the length is ambiguous"), "{answer:?}");
    // STRICT: plaintext is told to use TLS.
    let plain = curl(&[&format!("http://{GW}:{gw_port}/red/x")]);
    assert_eq!(plain.status, 400, "{plain:?}");
    assert!(plain.body.contains("STRICT"), "{plain:?}");

    // An ACM certificate cannot be had off AWS: the gateway refuses that config, says why,
    // and keeps serving TLS with the one it has.
    put(
        &node,
        "/v20190125/meshes/demo/virtualGateways/gw",
        gateway(
            json!({"acm": {"certificateArn": "arn:aws:acm:us-east-1:123456789012:certificate/abc"}}),
        ),
    );
    assert!(
        wait_until(Duration::from_secs(15), || gw
            .log()
            .contains("ACM certificates exist only inside AWS")),
        "{}",
        gw.log()
    );
    assert_eq!(https("/red/x").status, 200);
}

/// A grpc listener on the gateway and a gateway route by gRPC service name: a tonic client
/// outside the mesh streams both ways to the echo app (Chat in lockstep, a 1.6 MB Count), while
/// a service the route does not name gets no route, said as gRPC (UNIMPLEMENTED).
#[test]
fn a_grpc_gateway_route_carries_streams_and_matches_the_service() {
    const GW: &str = "127.0.0.126";
    let gw_port = common::free_port(GW);
    let node = DevNode::start();
    let p = "/v20190125/meshes/demo";
    put(&node, "/v20190125/meshes", json!({"meshName": "demo"}));
    put(
        &node,
        &format!("{p}/virtualNodes"),
        json!({"virtualNodeName": "green", "spec": {
            "listeners": [{"portMapping": {"port": 9090, "protocol": "grpc"}}],
            "serviceDiscovery": {"dns": {"hostname": "green.demo.local"}}}}),
    );
    put(
        &node,
        &format!("{p}/virtualServices"),
        json!({"virtualServiceName": "green.demo.local", "spec": {"provider": {"virtualNode": {"virtualNodeName": "green"}}}}),
    );
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("gw.log");
    put(
        &node,
        &format!("{p}/virtualGateways"),
        json!({"virtualGatewayName": "gw", "spec": {
            "listeners": [{"portMapping": {"port": gw_port, "protocol": "grpc"}}],
            "logging": {"accessLog": {"file": {"path": log, "format": {"text":
                "%REQ(:PATH)% %RESPONSE_CODE% %GRPC_STATUS% %GRPC_STATUS(SNAKE_STRING)% %GRPC_STATUS_NUMBER%\n"}}}}}}),
    );
    put(
        &node,
        &format!("{p}/virtualGateway/gw/gatewayRoutes"),
        json!({"gatewayRouteName": "echo", "spec": {"grpcRoute": {
            "match": {"serviceName": "trellis.echo.v1.Echo"},
            "action": {"target": {"virtualService": {"virtualServiceName": "green.demo.local"}}}}}}),
    );
    let green = Echo::start("127.0.0.127:9090", "green");
    let dir = tempfile::tempdir().unwrap();
    let _app = proxy(
        &node,
        dir.path(),
        ["--virtual-node", "green"],
        "127.0.0.127",
        &[],
    );
    let gw = proxy(
        &node,
        dir.path(),
        ["--virtual-gateway", "gw"],
        GW,
        &["--gateway-host", GW],
    );
    gw.wait_ready(Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(15), || gw
        .endpoints(Some("green"))
        == 1));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{GW}:{gw_port}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2));
        let mut connected = None;
        for _ in 0..100 {
            match channel.connect().await {
                Ok(c) => {
                    connected = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let channel = connected.expect("the gateway's grpc listener never opened");
        common::grpc::bidirectional_and_client_streams(channel.clone(), "green").await;
        // The Health service is there on the app, but no gateway route names it.
        let before = green.served();
        let mut health = trellis::wire::health::health_client::HealthClient::new(channel);
        let ask = trellis::wire::health::HealthCheckRequest {
            service: String::new(),
        };
        // The gateway's 404 as a gRPC caller must get it (not text read as a message).
        let err = health.check(ask).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
        assert_eq!(err.message(), "trellis: no route matches");
        assert_eq!(green.served(), before, "{err}");
    });
    // The gateway's access log names each call's gRPC status: a stream's from its trailers,
    // the refused call's from its trailers-only answer.
    let mut lines = String::new();
    let logged = wait_until(Duration::from_secs(10), || {
        lines = std::fs::read_to_string(&log).unwrap_or_default();
        lines.contains("/grpc.health.v1.Health/Check")
    });
    assert!(
        logged,
        "the gateway's access log never got the calls:\n{lines}"
    );
    for want in [
        "/trellis.echo.v1.Echo/Chat 200 OK OK 0",
        "/trellis.echo.v1.Echo/Count 200 OK OK 0",
        "/grpc.health.v1.Health/Check 200 Unimplemented UNIMPLEMENTED 12",
    ] {
        assert!(
            lines.lines().any(|l| l == want),
            "no line {want:?} in the gateway's access log:\n{lines}"
        );
    }
    // Its metrics count the calls by gRPC status too (a gRPC failure is an HTTP 200): the
    // streams on the route's edge, the refused call on the listener's unrouted edge.
    let metrics = curl(&[&format!("http://{}/metrics", gw.admin())]).body;
    let calls = |status: &str, service: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("trellis_proxy_grpc_responses_total{")
                    && l.contains("direction=\"gateway\"")
                    && l.contains(&format!("grpc_status=\"{status}\""))
                    && l.contains(&format!("virtual_service=\"{service}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(calls("OK", "green.demo.local"), 2, "{metrics}");
    assert_eq!(calls("Unimplemented", ""), 1, "{metrics}");
    assert_eq!(calls("Unimplemented", "green.demo.local"), 0, "{metrics}");
    let refused = format!("port=\"{gw_port}\",virtual_service=\"\"");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("trellis_proxy_requests_total{")
                && l.contains(&refused)
                && l.contains("status_class=\"2xx\"")
                && l.ends_with(" 1")),
        "the refused call is not counted on the listener's edge:\n{metrics}"
    );
}
