//! Proxy-to-proxy mTLS and App Mesh's access model, end to end with real binaries: proxies
//! with certificates from join tokens carry traffic over mTLS; `curl` and `openssl` play the
//! callers that must be refused (plaintext to a STRICT listener, a certificate from another
//! CA, a mesh certificate whose virtual node does not list the service among its backends);
//! listener TLS modes, client-policy SAN rules and the egress filter do what App Mesh says.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::echo::{Echo, curl};
use common::mesh::{self, put};
use common::proxy;
use common::{DevNode, wait_until};
use serde_json::{Value, json};

fn node_spec(name: &str, tls: Option<Value>, backends: Value) -> Value {
    let mut listener = json!({"portMapping": {"port": 9080, "protocol": "http"}});
    if let Some(t) = tls {
        listener["tls"] = t;
    }
    json!({"listeners": [listener], "backends": backends,
           "serviceDiscovery": {"dns": {"hostname": format!("{name}.demo.local")}}})
}

/// A GET through the client proxy's explicit listener.
fn via(outbound: std::net::SocketAddr, url: &str) -> common::echo::Got {
    curl(&["-x", &format!("http://{outbound}"), url])
}

/// A GET straight at a proxy's inbound listener for its app port 9080: plaintext, or TLS
/// presenting (cert, key) without checking the server.
fn direct(inbound: std::net::SocketAddr, cert: Option<(&Path, &Path)>) -> common::echo::Got {
    let mut args: Vec<String> = vec!["-H".into(), "x-trellis-target-port: 9080".into()];
    let scheme = match cert {
        Some((c, k)) => {
            args.extend(["-k".into(), "--cert".into(), c.display().to_string()]);
            args.extend(["--key".into(), k.display().to_string()]);
            "https"
        }
        None => "http",
    };
    args.push(format!("{scheme}://{inbound}/color"));
    curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn proxies_speak_mtls_and_refuse_callers_the_mesh_does_not_allow() {
    let node = DevNode::start();
    let client_backends = json!([{"virtualService": {"virtualServiceName": "color.demo.local"}}]);
    mesh::color_mesh(&node, 100, 0, json!({"backends": client_backends}));
    put(
        &node,
        "/v20190125/meshes/demo/virtualNodes",
        json!({"virtualNodeName": "outsider", "spec": node_spec("outsider", None, json!([]))}),
    );
    let _red_app = Echo::start("127.0.0.71:9080", "red");
    let _blue_app = Echo::start("127.0.0.72:9080", "blue");
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str, ip: &str| {
        proxy::with_certificate(node.grpc_addr(), node.api_url(), name, ip, dir.path(), &[])
    };
    let red = start("red", "127.0.0.71");
    let _blue = start("blue", "127.0.0.72");
    let client = start("client", "127.0.0.73");
    let outsider = start("outsider", "127.0.0.74");
    for p in [&red, &client, &outsider] {
        p.wait_ready(Duration::from_secs(20));
    }
    assert!(
        wait_until(Duration::from_secs(10), || client.endpoints(Some("red"))
            == 1),
        "red never reached the client: {:?}",
        client.cached()
    );
    let (red_in, _) = red.listening();
    let (_, client_out) = client.listening();
    let (_, outsider_out) = outsider.listening();
    let url = "http://color.demo.local:9080/color";
    assert!(
        wait_until(Duration::from_secs(10), || via(client_out, url).status
            == 200),
        "{:?}\n{}",
        via(client_out, url),
        red.log()
    );
    let got = via(client_out, url);
    assert_eq!(got.name().as_deref(), Some("red"), "{got:?}");
    assert_eq!(got.json()["headers"]["host"], "color.demo.local:9080");

    // Plaintext to a proxy with a certificate: the mesh default is mTLS.
    let got = direct(red_in, None);
    assert_eq!(got.status, 403, "{got:?}");
    assert!(got.body.contains("plaintext refused"), "{}", got.body);

    // A mesh certificate whose node lists no backend that leads to red.
    let id = dir.path().join("outsider/identity");
    let cert = id.join("cert.pem");
    let key = id.join("key.pem");
    let got = direct(red_in, Some((&cert, &key)));
    assert_eq!(got.status, 403, "{got:?}");
    assert!(
        got.body
            .contains("virtualNode/outsider of mesh demo may not call virtualNode/red"),
        "{}",
        got.body
    );
    // The client's own certificate is let in.
    let client_id = dir.path().join("client/identity");
    let got = direct(
        red_in,
        Some((&client_id.join("cert.pem"), &client_id.join("key.pem"))),
    );
    assert_eq!(got.name().as_deref(), Some("red"), "{got:?}");

    // A certificate from another CA, naming the client: the handshake fails.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=impostor"])
        .args([
            "-addext",
            "subjectAltName=URI:spiffe://trellis.local/mesh/demo/virtualNode/client",
        ])
        .arg("-keyout")
        .arg(other.join("key.pem"))
        .arg("-out")
        .arg(other.join("cert.pem"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let got = direct(
        red_in,
        Some((&other.join("cert.pem"), &other.join("key.pem"))),
    );
    assert_eq!(got.status, 0, "{got:?}");
    assert_ne!(got.exit, 0);
    // The refused handshake is counted with its reason (this self-signed certificate is a CA
    // certificate: rustls calls it a bad certificate before asking who issued it).
    let metrics = common::echo::curl(&[&format!("http://{}/metrics", red.admin())]).body;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("trellis_proxy_tls_handshake_failures_total{")
                && l.contains("direction=\"inbound\"")
                && (l.contains("reason=\"unknown_ca\"")
                    || l.contains("reason=\"bad_certificate\""))
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );

    // Egress: DROP_ALL (the default) refuses what is not a backend, naming it.
    let got = via(outsider_out, url);
    assert_eq!(got.status, 403, "{got:?}");
    assert!(got.body.contains("egress filter DROP_ALL"), "{}", got.body);
    let blue_direct = "http://127.0.0.72:9080/x";
    assert_eq!(via(outsider_out, blue_direct).status, 403);
    // ALLOW_ALL passes undeclared destinations through.
    put(
        &node,
        "/v20190125/meshes/demo",
        json!({"spec": {"egressFilter": {"type": "ALLOW_ALL"}}}),
    );
    assert!(
        wait_until(Duration::from_secs(10), || via(outsider_out, blue_direct)
            .name()
            .as_deref()
            == Some("blue")),
        "{:?}",
        via(outsider_out, blue_direct)
    );

    // Listener modes: PERMISSIVE takes plaintext and mTLS; DISABLED takes plaintext, and
    // callers send it so.
    let file_cert = json!({"file": {"certificateChain": "/dev/null", "privateKey": "/dev/null"}});
    for mode in ["PERMISSIVE", "DISABLED"] {
        put(
            &node,
            "/v20190125/meshes/demo/virtualNodes/red",
            json!({"spec": node_spec("red", Some(json!({"mode": mode, "certificate": file_cert})), json!([]))}),
        );
        assert!(
            wait_until(Duration::from_secs(10), || direct(red_in, None).status
                == 200),
            "{mode}: {:?}",
            direct(red_in, None)
        );
        assert_eq!(via(client_out, url).status, 200, "{mode}");
    }
    // STRICT refuses plaintext again.
    put(
        &node,
        "/v20190125/meshes/demo/virtualNodes/red",
        json!({"spec": node_spec("red", Some(json!({"mode": "STRICT", "certificate": file_cert})), json!([]))}),
    );
    assert!(wait_until(Duration::from_secs(10), || direct(red_in, None)
        .status
        == 403));
    assert_eq!(via(client_out, url).status, 200);

    // A client policy whose SANs the server's certificate lacks: the caller refuses it.
    let ca = node.data_dir().join("ca.pem");
    let policy = |san: &str| {
        json!([{"virtualService": {"virtualServiceName": "color.demo.local", "clientPolicy": {"tls": {
            "validation": {"trust": {"file": {"certificateChain": ca.to_str().unwrap()}},
                           "subjectAlternativeNames": {"match": {"exact": [san]}}}}}}}])
    };
    put(
        &node,
        "/v20190125/meshes/demo/virtualNodes/client",
        json!({"spec": node_spec("client", None, policy("spiffe://trellis.local/mesh/demo/virtualNode/somebody"))}),
    );
    assert!(
        wait_until(Duration::from_secs(10), || via(client_out, url).status
            == 503),
        "{:?}",
        via(client_out, url)
    );
    let got = via(client_out, url);
    assert!(got.body.contains("expected one of"), "{}", got.body);
    put(
        &node,
        "/v20190125/meshes/demo/virtualNodes/client",
        json!({"spec": node_spec("client", None, policy("red.demo.local"))}),
    );
    assert!(
        wait_until(Duration::from_secs(10), || via(client_out, url).status
            == 200),
        "{:?}",
        via(client_out, url)
    );
}
