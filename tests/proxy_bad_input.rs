//! Hostile bytes at the proxy's listeners, over raw TCP: malformed requests, oversized heads,
//! too many headers, ambiguous lengths (request smuggling), a head that never completes
//! (slowloris), HTTP/2 garbage. Each gets its 400 / 431 / 408 (or a closed connection) and
//! the connection is closed; the proxy keeps serving. The same again on a kept-alive
//! connection after a good request, where another reader than the first head's meets them.

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

/// `refused`, after a good request on the same connection: its answer, then the refusal.
fn refused_after_a_good_request(
    addr: SocketAddr,
    good: &str,
    bytes: &[u8],
    status: &str,
) -> String {
    let mut sent = good.as_bytes().to_vec();
    sent.extend_from_slice(bytes);
    let (got, closed) = exchange(addr, &sent, Duration::from_secs(15));
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(60)]);
    assert!(
        got.starts_with("HTTP/1.1 200 OK\r\n"),
        "the good request first, before {shown:?}…: {got:?}"
    );
    let second = got[1..].find("HTTP/1.1 ").map(|i| &got[i + 1..]);
    assert!(
        second.is_some_and(|s| s.starts_with(&format!("HTTP/1.1 {status}"))),
        "{status} expected for {shown:?}… after a good request, got {got:?}"
    );
    assert!(closed, "the connection stayed open after {got:?}");
    got
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
    // Slowloris on a kept-alive connection, meanwhile (it takes the header timeout).
    let slow_second = std::thread::spawn(move || {
        let t = Instant::now();
        let _ = refused_after_a_good_request(
            out,
            &format!("GET /ok HTTP/1.1\r\n{host}\r\n"),
            format!("GET / HTTP/1.1\r\n{host}X-Slow: ").as_bytes(),
            "408",
        );
        t.elapsed()
    });
    let big = format!(
        "GET / HTTP/1.1\r\n{host}X-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many_headers = format!("GET / HTTP/1.1\r\n{host}{many}\r\n");
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
        refused(listener, big.as_bytes(), "431");
        refused(listener, many_headers.as_bytes(), "431");
        // HTTP/2 preface then garbage: the connection is closed.
        let (_, closed) = exchange(
            listener,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
            Duration::from_secs(15),
        );
        assert!(closed);
    }

    // The same after a good request on a kept-alive connection (the explicit listener).
    let good = format!("GET /ok HTTP/1.1\r\n{host}\r\n");
    let later: [(&[u8], &str); 6] = [
        (b"GARBAGE\r\n\r\n", "400"),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "400",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
            "400",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "400",
        ),
        (big.as_bytes(), "431"),
        (many_headers.as_bytes(), "431"),
    ];
    for (i, (bytes, status)) in later.into_iter().enumerate() {
        let got = refused_after_a_good_request(out, &good, bytes, status);
        // With the same reason as on a first head.
        if i == 1 {
            assert!(got.contains("the length is ambiguous"), "{got}");
        }
    }

    // Slowloris: half a head, then nothing; 408 after the header timeout (10 s).
    let t = Instant::now();
    refused(
        out,
        format!("GET / HTTP/1.1\r\n{host}X-Slow: ").as_bytes(),
        "408",
    );
    for waited in [t.elapsed(), slow_second.join().unwrap()] {
        assert!(
            waited >= Duration::from_secs(9) && waited < Duration::from_secs(14),
            "{waited:?}"
        );
    }

    // Still serving, still the same processes.
    assert!(ok());
    let log = client.log() + &red.log();
    assert!(!log.contains("panicked"), "{log}");
}
