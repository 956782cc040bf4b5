//! Hostile bytes at the proxy's listeners, over raw TCP: malformed requests, oversized heads,
//! too many headers, ambiguous lengths (request smuggling), a head that never completes
//! (slowloris), HTTP/2 garbage. Each gets its 400 / 431 / 408 (or a closed connection) and
//! the connection is closed; the proxy keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::echo::{Echo, curl};
use common::mesh;
use common::proxy::Proxy;
use common::{DevNode, wait_until};
use serde_json::json;

/// Sends `bytes`, then reads until the proxy closes the connection: (what came back, whether
/// it closed within `limit`).
fn exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn refused(addr: SocketAddr, bytes: &[u8], status: &str) {
    let (got, closed) = exchange(addr, bytes, Duration::from_secs(15));
    assert!(
        got.starts_with(&format!("HTTP/1.1 {status}")),
        "{status} expected for {:?}…, got {got:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(60)])
    );
    assert!(closed, "the connection stayed open after {got:?}");
}

#[test]
fn hostile_requests_get_clear_refusals_and_the_proxy_keeps_serving() {
    let node = DevNode::start();
    let backends =
        json!({"backends": [{"virtualService": {"virtualServiceName": "color.demo.local"}}]});
    mesh::color_mesh(&node, 100, 0, backends);
    let _red_app = Echo::start("127.0.0.161:9080", "red");
    let dir = tempfile::tempdir().unwrap();
    let start = |vn: &str, ip: &str| {
        Proxy::start_with(
            node.grpc_addr(),
            "demo",
            ["--virtual-node", vn],
            &dir.path().join(vn),
            ip,
            &["--no-vip-listeners", "--app-host", ip],
        )
    };
    let red = start("red", "127.0.0.161");
    let client = start("client", "127.0.0.162");
    client.wait_ready(Duration::from_secs(20));
    let (_, out) = client.listening();
    let (red_in, _) = red.listening();
    let ok = || {
        curl(&[
            "-x",
            &format!("http://{out}"),
            "http://color.demo.local:9080/ok",
        ])
        .name()
            == Some("red".into())
    };
    assert!(wait_until(Duration::from_secs(15), ok));

    let host = "Host: color.demo.local:9080\r\n";
    for listener in [out, red_in] {
        // Not HTTP at all.
        refused(listener, b"GARBAGE\r\n\r\n", "400");
        refused(listener, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", "400");
        // Request smuggling: two lengths, or lengths that disagree.
        refused(
            listener,
            format!("POST / HTTP/1.1\r\n{host}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n{host}\r\n").as_bytes(),
            "400",
        );
        refused(
            listener,
            format!("POST / HTTP/1.1\r\n{host}Content-Length: 4\r\nContent-Length: 40\r\n\r\nabcd")
                .as_bytes(),
            "400",
        );
        refused(
            listener,
            format!("POST / HTTP/1.1\r\n{host}Transfer-Encoding: chunked, identity\r\n\r\n")
                .as_bytes(),
            "400",
        );
        // Oversized heads: one huge header, or too many.
        let big = format!(
            "GET / HTTP/1.1\r\n{host}X-Big: {}\r\n\r\n",
            "a".repeat(70_000)
        );
        refused(listener, big.as_bytes(), "431");
        let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
        refused(
            listener,
            format!("GET / HTTP/1.1\r\n{host}{many}\r\n").as_bytes(),
            "431",
        );
        // HTTP/2 preface then garbage: the connection is closed.
        let (_, closed) = exchange(
            listener,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
            Duration::from_secs(15),
        );
        assert!(closed);
    }

    // Slowloris: half a head, then nothing; 408 after the header timeout (10 s).
    let t = Instant::now();
    refused(
        out,
        format!("GET / HTTP/1.1\r\n{host}X-Slow: ").as_bytes(),
        "408",
    );
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(14),
        "{waited:?}"
    );

    // Still serving, still the same processes.
    assert!(ok());
    let log = client.log() + &red.log();
    assert!(!log.contains("panicked"), "{log}");
}
