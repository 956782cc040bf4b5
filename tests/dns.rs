//! The control plane's DNS, asked with the real `dig`: virtual service names answer with their
//! VIPs over UDP and TCP, other names are REFUSED, answers follow deletes within a second, VIPs
//! survive a restart, and garbage on either transport does no harm.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{DevNode, wait_until};
use serde_json::json;

/// What `dig` printed: the status word and the answer section's records.
struct Dig {
    status: String,
    flags: String,
    answers: Vec<String>,
}

fn dig(dns: SocketAddr, name: &str, qtype: &str, tcp: bool) -> Dig {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", dns.ip())).args([
        "-p",
        &dns.port().to_string(),
        name,
        qtype,
        "+time=2",
        "+tries=1",
        "+norecurse",
    ]);
    if tcp {
        cmd.arg("+tcp");
    }
    let out = cmd.output().expect("dig is installed (Debian: dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status from dig:\n{text}"))
        .to_string();
    let flags = text
        .split("flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or("")
        .to_string();
    let answers = text
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|s| {
            s.lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Dig {
        status,
        flags,
        answers,
    }
}

fn a_record(dns: SocketAddr, name: &str, tcp: bool) -> Option<String> {
    let d = dig(dns, name, "A", tcp);
    if d.status != "NOERROR" {
        return None;
    }
    d.answers
        .first()
        .map(|l| l.split_whitespace().last().unwrap_or("").to_string())
}

fn setup(node: &DevNode) {
    node.http_ok(
        "PUT",
        "/v20190125/meshes",
        Some(&json!({"meshName": "demo"})),
    );
    for vs in ["colorteller.demo.local", "colorgateway.demo.local"] {
        node.http_ok(
            "PUT",
            "/v20190125/meshes/demo/virtualServices",
            Some(&json!({"virtualServiceName": vs, "spec": {}})),
        );
    }
}

#[test]
fn virtual_service_names_answer_with_their_vips() {
    let node = DevNode::start();
    setup(&node);
    let dns = node.dns_addr();

    let udp = a_record(dns, "colorteller.demo.local", false).expect("an A record over UDP");
    let tcp = a_record(dns, "colorteller.demo.local", true).expect("an A record over TCP");
    assert_eq!(udp, tcp);
    assert!(udp.starts_with("127.77."), "{udp} is in 127.77.0.0/16");
    let other =
        a_record(dns, "ColorGateway.Demo.Local.", false).expect("names are case-insensitive");
    assert_ne!(udp, other, "each service has its own VIP");

    let d = dig(dns, "colorteller.demo.local", "A", false);
    assert!(
        d.flags.split_whitespace().any(|f| f == "aa"),
        "authoritative: {}",
        d.flags
    );
    let ttl: u32 = d.answers[0]
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ttl, 5, "short TTL by default");

    let aaaa = dig(dns, "colorteller.demo.local", "AAAA", false);
    assert_eq!(
        (aaaa.status.as_str(), aaaa.answers.len()),
        ("NOERROR", 0),
        "NODATA for AAAA"
    );
    assert_eq!(dig(dns, "example.com", "A", false).status, "REFUSED");
    assert_eq!(dig(dns, "demo.local", "A", true).status, "REFUSED");

    // An update keeps the address; a delete withdraws the name within a second.
    node.http_ok(
        "PUT",
        "/v20190125/meshes/demo/virtualServices/colorteller.demo.local",
        Some(&json!({"spec": {}})),
    );
    assert_eq!(
        a_record(dns, "colorteller.demo.local", false).as_deref(),
        Some(udp.as_str())
    );
    node.http_ok(
        "DELETE",
        "/v20190125/meshes/demo/virtualServices/colorteller.demo.local",
        None,
    );
    let deleted = Instant::now();
    assert!(wait_until(Duration::from_secs(1), || dig(
        dns,
        "colorteller.demo.local",
        "A",
        false
    )
    .status
        == "REFUSED"));
    eprintln!("a deleted name left DNS after {:?}", deleted.elapsed());
}

#[test]
fn vips_survive_a_restart() {
    let mut node = DevNode::start();
    setup(&node);
    let before = a_record(node.dns_addr(), "colorteller.demo.local", false).unwrap();
    node.kill();
    let node2 = DevNode::start_in(node.data_dir());
    assert_eq!(
        a_record(node2.dns_addr(), "colorteller.demo.local", false),
        Some(before)
    );
}

#[test]
fn garbage_does_no_harm() {
    let mut node = DevNode::start();
    setup(&node);
    let dns = node.dns_addr();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut packets: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0xff; 11],
        vec![0xab; 12],
        vec![0x5a; 600],
    ];
    // A valid header that promises records the packet does not carry.
    packets.push(vec![
        0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, b'x',
    ]);
    // A name whose compression pointer points at itself.
    packets.push(vec![
        0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
    ]);
    for p in &packets {
        sock.send_to(p, dns).unwrap();
    }
    for p in &packets {
        if let Ok(mut s) = TcpStream::connect(dns) {
            let _ = s.write_all(&(p.len() as u16).to_be_bytes());
            let _ = s.write_all(p);
        }
    }
    if let Ok(mut s) = TcpStream::connect(dns) {
        // A length prefix far larger than what follows, then a hang-up.
        let _ = s.write_all(&[0xff, 0xff, 1, 2, 3]);
    }
    assert!(node.is_running(), "{}", node.stderr_log());
    assert!(a_record(dns, "colorteller.demo.local", false).is_some());
    assert!(a_record(dns, "colorteller.demo.local", true).is_some());
    assert!(
        !node.stderr_log().contains("panicked"),
        "{}",
        node.stderr_log()
    );
}
