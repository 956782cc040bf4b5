//! gRPC (unary, server, client and bidirectional streaming, trailers, a retried UNAVAILABLE, the
//! proxy's own 404 as UNIMPLEMENTED), WebSocket and TCP routes
//! through two proxies over mTLS, end to end: a tonic client, a raw WebSocket handshake and
//! `curl --proxytunnel` (CONNECT) against the client proxy's explicit listener, and
//! `trellis echo` apps behind grpc, http and tcp listeners.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::echo::{Echo, curl};
use common::mesh::put;
use common::proxy;
use common::{DevNode, wait_until};
use serde_json::json;
use trellis::wire::health::HealthCheckRequest;
use trellis::wire::health::health_client::HealthClient;

fn setup(node: &DevNode) {
    let p = "/v20190125/meshes/demo";
    put(node, "/v20190125/meshes", json!({"meshName": "demo"}));
    for (name, port, proto) in [
        ("grpc-app", 9090, "grpc"),
        ("ws-app", 9080, "http"),
        ("tcp-app", 7000, "tcp"),
    ] {
        put(
            node,
            &format!("{p}/virtualNodes"),
            json!({"virtualNodeName": name, "spec": {
                "listeners": [{"portMapping": {"port": port, "protocol": proto}}],
                "serviceDiscovery": {"dns": {"hostname": format!("{name}.demo.local")}}}}),
        );
    }
    for (router, port, proto) in [("grpcr", 9090, "grpc"), ("tcpr", 7000, "tcp")] {
        put(
            node,
            &format!("{p}/virtualRouters"),
            json!({"virtualRouterName": router, "spec": {"listeners": [{"portMapping": {"port": port, "protocol": proto}}]}}),
        );
    }
    for (route, service) in [
        ("health", "grpc.health.v1.Health"),
        ("echo", "trellis.echo.v1.Echo"),
    ] {
        put(
            node,
            &format!("{p}/virtualRouter/grpcr/routes"),
            json!({"routeName": route, "spec": {"grpcRoute": {
                "match": {"serviceName": service},
                "action": {"weightedTargets": [{"virtualNode": "grpc-app", "weight": 1}]}}}}),
        );
    }
    put(
        node,
        &format!("{p}/virtualRouter/tcpr/routes"),
        json!({"routeName": "tcp", "spec": {"tcpRoute": {
            "action": {"weightedTargets": [{"virtualNode": "tcp-app", "weight": 1}]}}}}),
    );
    for (svc, provider) in [
        (
            "grpc.demo.local",
            json!({"virtualRouter": {"virtualRouterName": "grpcr"}}),
        ),
        (
            "tcp.demo.local",
            json!({"virtualRouter": {"virtualRouterName": "tcpr"}}),
        ),
        (
            "ws.demo.local",
            json!({"virtualNode": {"virtualNodeName": "ws-app"}}),
        ),
    ] {
        put(
            node,
            &format!("{p}/virtualServices"),
            json!({"virtualServiceName": svc, "spec": {"provider": provider}}),
        );
    }
    let backends: Vec<_> = ["grpc.demo.local", "tcp.demo.local", "ws.demo.local"]
        .iter()
        .map(|s| json!({"virtualService": {"virtualServiceName": s}}))
        .collect();
    put(
        node,
        &format!("{p}/virtualNodes"),
        json!({"virtualNodeName": "client", "spec": {"backends": backends}}),
    );
}

/// A WebSocket handshake through the explicit listener, then one text message each way.
fn websocket_echo(out: SocketAddr, text: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(out).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET http://ws.demo.local:9080/chat HTTP/1.1\r\nHost: ws.demo.local:9080\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).map_err(|e| e.to_string())?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(head);
    }
    // RFC 6455's own example key and answer.
    if !head
        .to_ascii_lowercase()
        .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=")
    {
        return Err(format!("wrong accept key: {head}"));
    }
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).map_err(|e| e.to_string())?;
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).map_err(|e| e.to_string())?;
    if reply[0] != 0x81 || reply[1] & 0x80 != 0 {
        return Err(format!("unexpected frame head {reply:?}"));
    }
    let mut payload = vec![0u8; usize::from(reply[1] & 0x7f)];
    s.read_exact(&mut payload).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&payload).into_owned())
}

#[test]
fn grpc_websocket_and_tcp_cross_the_mesh() {
    let node = DevNode::start();
    setup(&node);
    let grpc_app = Echo::start("127.0.0.101:9090", "grpc-app");
    let _ws_app = Echo::start("127.0.0.102:9080", "ws-app");
    let _tcp_app = Echo::start("127.0.0.103:7000", "tcp-app");
    let dir = tempfile::tempdir().unwrap();
    let start = |vn: &str, ip: &str| {
        proxy::with_certificate(node.grpc_addr(), node.api_url(), vn, ip, dir.path(), &[])
    };
    let _apps = [
        start("grpc-app", "127.0.0.101"),
        start("ws-app", "127.0.0.102"),
        start("tcp-app", "127.0.0.103"),
    ];
    let client = start("client", "127.0.0.104");
    client.wait_ready(Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(15), || client.endpoints(None) == 3),
        "{:?}",
        client.cached()
    );
    let (_, out) = client.listening();

    // gRPC: unary, a retried UNAVAILABLE (App Mesh's default policy: two retries), and a
    // server stream that ends with its trailers.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{out}"))
            .unwrap()
            .origin("http://grpc.demo.local:9090".parse().unwrap())
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        let ask = |service: &str| HealthCheckRequest {
            service: service.into(),
        };
        let mut ok = None;
        for _ in 0..100 {
            match health.check(ask("")).await {
                Ok(r) => {
                    ok = Some(r.into_inner());
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert_eq!(ok.expect("gRPC check never answered").status, 1);
        let before = grpc_app.served();
        let err = health.check(ask("unavailable")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(err.message().contains("grpc-app"), "{err}");
        assert_eq!(grpc_app.served() - before, 3);
        let mut stream = health.watch(ask("")).await.unwrap().into_inner();
        let mut answers = 0;
        while let Some(m) = stream.message().await.unwrap() {
            assert_eq!(m.status, 1);
            answers += 1;
        }
        assert_eq!(answers, trellis::echo::WATCH_ANSWERS);
        // A service no route names: the client proxy's 404, as gRPC.
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let err = grpc
            .unary::<HealthCheckRequest, trellis::wire::health::HealthCheckResponse, _>(
                tonic::Request::new(ask("")),
                "/trellis.nothing.v1.Nothing/Call".parse().unwrap(),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
        assert_eq!(err.message(), "trellis: no route matches");
        common::grpc::bidirectional_and_client_streams(channel, "grpc-app").await;
    });

    // WebSocket through the explicit listener (an absolute-form upgrade).
    assert_eq!(
        websocket_echo(out, "hello, mesh").as_deref(),
        Ok("hello, mesh")
    );

    // TCP: curl CONNECTs to the TCP service and speaks HTTP to the app through the tunnel.
    let got = curl(&[
        "-p",
        "-x",
        &format!("http://{out}"),
        "http://tcp.demo.local:7000/raw",
    ]);
    assert_eq!(got.name().as_deref(), Some("tcp-app"), "{got:?}");
    assert_eq!(got.json()["path"], "/raw");
    // CONNECT to an HTTP service: the tunnel's requests are routed like any other.
    let got = curl(&[
        "-p",
        "-x",
        &format!("http://{out}"),
        "http://ws.demo.local:9080/x",
    ]);
    assert_eq!(got.name().as_deref(), Some("ws-app"), "{got:?}");
    // CONNECT to what is not a backend: the egress filter answers.
    let got = curl(&[
        "-p",
        "-x",
        &format!("http://{out}"),
        "http://127.0.0.103:7000/",
    ]);
    assert_ne!(got.exit, 0, "{got:?}");
    assert!(got.stderr.contains("403"), "{got:?}");
}
