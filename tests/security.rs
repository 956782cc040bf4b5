//! Identity and security end to end, with real clients: the aws CLI with access keys against a
//! TLS control plane (SigV4 refusals: wrong secret, skewed dates, tampered bodies, unsigned
//! requests, read-only keys), join tokens trading CSRs for certificates (`openssl` checks
//! them), the config stream over mTLS, renewal, CA rotation, and no key material in logs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::DevNode;
use common::proxy::Proxy;
use serde_json::json;
use trellis::identity::sigv4;
use trellis::wire::identity::identity_client::IdentityClient;
use trellis::wire::identity::{IssueRequest, RenewRequest, issue_request};

const SECURE: &str = "tls = true\nauth = \"sigv4\"\n";

fn trellis(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A secure node with its bundle (fetched with `trellis ca show`) and admin key.
struct Secure {
    node: DevNode,
    ca: PathBuf,
    admin: PathBuf,
    _dir: tempfile::TempDir,
}

impl Secure {
    fn start(extra: &str) -> Secure {
        let node = DevNode::start_with_config(&format!("{SECURE}{extra}"));
        assert!(node.api_url().starts_with("https://"), "{}", node.api_url());
        let dir = tempfile::tempdir().unwrap();
        let (code, bundle, err) = trellis(&["ca", "show", "--endpoint", node.api_url()]);
        assert_eq!(code, 0, "{err}");
        assert!(bundle.contains("BEGIN CERTIFICATE"), "{bundle}");
        assert!(err.contains("without verification"), "{err}");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &bundle).unwrap();
        assert_eq!(
            std::fs::read_to_string(node.data_dir().join("ca.pem")).unwrap(),
            bundle,
            "the node's ca.pem is what ca show fetched"
        );
        let admin = node.data_dir().join("admin-credentials");
        Secure {
            node,
            ca,
            admin,
            _dir: dir,
        }
    }

    fn admin_key(&self) -> (String, String) {
        read_key(&std::fs::read_to_string(&self.admin).unwrap())
    }

    /// `trellis ARGS… --endpoint … --ca-file … --credentials <admin>`.
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "--endpoint",
            self.node.api_url(),
            "--ca-file",
            self.ca.to_str().unwrap(),
            "--credentials",
            self.admin.to_str().unwrap(),
        ]);
        trellis(&all)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "trellis {args:?}: {err}");
        out
    }

    fn grpc_url(&self) -> String {
        format!("https://{}", self.node.grpc_addr())
    }
}

fn read_key(text: &str) -> (String, String) {
    let value = |k: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(key, _)| key.trim() == k)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {k} in {text}"))
    };
    (value("aws_access_key_id"), value("aws_secret_access_key"))
}

/// Sends a request signed by trellis's signer (at `when`, over `signed_body`) with `curl`,
/// sending `sent_body`; returns (status, body).
fn curl_signed(
    s: &Secure,
    key: &(String, String),
    when: SystemTime,
    signed_body: &str,
    sent_body: &str,
) -> (u16, String) {
    let url: http::Uri = s.node.api_url().parse().unwrap();
    let authority = url.authority().unwrap().to_string();
    let path = "/v20190125/meshes";
    let mut headers = http::HeaderMap::new();
    headers.insert("host", authority.parse().unwrap());
    headers.insert("content-type", "application/json".parse().unwrap());
    sigv4::sign(
        "PUT",
        path,
        None,
        &mut headers,
        signed_body.as_bytes(),
        &key.0,
        &key.1,
        "us-east-1",
        "appmesh",
        when,
    );
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", "PUT"])
        .arg("--cacert")
        .arg(&s.ca)
        .args(["--data-binary", sent_body]);
    for (k, v) in &headers {
        if k != "host" {
            cmd.arg("-H").arg(format!("{k}: {}", v.to_str().unwrap()));
        }
    }
    let out = cmd
        .arg(format!("{}{path}", s.node.api_url()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn the_aws_cli_signs_with_access_keys_against_a_tls_control_plane() {
    let s = Secure::start("");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&s.admin), 0o600, "admin credentials");
    assert_eq!(mode(s.node.data_dir()), 0o700, "data dir");
    let admin = s.admin_key();
    let admin_ref = Some((admin.0.as_str(), admin.1.as_str()));

    let out = s.node.aws_as(
        &["create-mesh", "--mesh-name", "demo"],
        admin_ref,
        Some(&s.ca),
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    let out = s.node.aws_as(&["list-meshes"], admin_ref, Some(&s.ca));
    assert_eq!(out.json["meshes"][0]["meshName"], "demo", "{}", out.stderr);

    // Without the bundle the aws CLI refuses the server: the certificate is the mesh CA's.
    let out = s.node.aws_as(&["list-meshes"], admin_ref, None);
    assert_ne!(out.status, 0);
    assert!(
        out.stderr.contains("SSL") || out.stderr.contains("certificate"),
        "{}",
        out.stderr
    );

    let forbidden = |args: &[&str], k: Option<(&str, &str)>, why: &str| {
        let out = s.node.aws_as(args, k, Some(&s.ca));
        assert_eq!(out.status, 255, "{why}: {}", out.stderr);
        assert!(
            out.stderr.contains("(ForbiddenException)"),
            "{why}: {}",
            out.stderr
        );
        out.stderr
    };
    let err = forbidden(
        &["list-meshes"],
        Some((&admin.0, "wrong-secret")),
        "wrong secret",
    );
    assert!(err.contains("signature"), "{err}");
    assert!(!err.contains(&admin.1), "the secret is never echoed");
    forbidden(&["list-meshes"], None, "unsigned");
    forbidden(
        &["list-meshes"],
        Some(("TRKNOSUCHKEY00000000", "x")),
        "unknown key",
    );

    // A read-only key reads and cannot write.
    let out = s.cli_ok(&["keys", "create", "--read-only", "--description", "reader"]);
    let reader = read_key(&out);
    let out = s
        .node
        .aws_as(&["list-meshes"], Some((&reader.0, &reader.1)), Some(&s.ca));
    assert_eq!(out.status, 0, "{}", out.stderr);
    let err = forbidden(
        &["create-mesh", "--mesh-name", "other"],
        Some((&reader.0, &reader.1)),
        "read-only",
    );
    assert!(err.contains("read-only"), "{err}");
    let listed = s.cli_ok(&["keys", "list"]);
    assert!(
        listed.contains(&reader.0) && !listed.contains(&reader.1),
        "{listed}"
    );

    // Dates outside the skew window, and bodies that are not what was signed.
    let body = json!({"meshName": "signed"}).to_string();
    let now = SystemTime::now();
    let (code, text) = curl_signed(&s, &admin, now, &body, &body);
    assert_eq!(code, 200, "{text}");
    for (when, what) in [
        (now - Duration::from_secs(900), "an expired X-Amz-Date"),
        (now + Duration::from_secs(900), "a future X-Amz-Date"),
    ] {
        let (code, text) = curl_signed(&s, &admin, when, &body, &body);
        assert_eq!(code, 403, "{what}: {text}");
        assert!(text.contains("skew"), "{what}: {text}");
    }
    let tampered = json!({"meshName": "tampered"}).to_string();
    let (code, text) = curl_signed(&s, &admin, now, &body, &tampered);
    assert_eq!(code, 403, "tampered body: {text}");

    // Paths SigV4 would normalize (dot or empty segments) are refused before anything else.
    let out = Command::new("curl")
        .args([
            "-s",
            "--path-as-is",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(&s.ca)
        .arg(format!("{}/v20190125/meshes/x/../signed", s.node.api_url()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("\n400") && text.contains("'..'"), "{text}");

    // A deleted key stops working.
    s.cli_ok(&["keys", "delete", &reader.0]);
    forbidden(
        &["list-meshes"],
        Some((&reader.0, &reader.1)),
        "deleted key",
    );

    let logs = s.node.stderr_log();
    assert!(
        !logs.contains(&admin.1) && !logs.contains(&reader.1),
        "secrets in logs"
    );
    assert!(!logs.contains("PRIVATE KEY"), "key material in logs");
}

fn setup_mesh(s: &Secure) {
    let admin = s.admin_key();
    let k = Some((admin.0.as_str(), admin.1.as_str()));
    for args in [
        vec!["create-mesh", "--mesh-name", "demo"],
        vec![
            "create-virtual-node",
            "--mesh-name",
            "demo",
            "--virtual-node-name",
            "a",
            "--spec",
            r#"{"listeners":[{"portMapping":{"port":8080,"protocol":"http"}}],"serviceDiscovery":{"dns":{"hostname":"a.demo.local"}}}"#,
        ],
        vec![
            "create-virtual-node",
            "--mesh-name",
            "demo",
            "--virtual-node-name",
            "b",
            "--spec",
            "{}",
        ],
    ] {
        let out = s.node.aws_as(&args, k, Some(&s.ca));
        assert_eq!(out.status, 0, "{args:?}: {}", out.stderr);
    }
}

fn token(s: &Secure, node: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", "--mesh", "demo", "--virtual-node", node];
    args.extend(extra);
    s.cli_ok(&args).trim().to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// A gRPC channel to the node, trusting its bundle, presenting `client` (chain, key) if given.
async fn channel(s: &Secure, client: Option<(&str, &str)>) -> tonic::transport::Channel {
    let bundle = std::fs::read_to_string(&s.ca).unwrap();
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(bundle));
    if let Some((chain, key)) = client {
        tls = tls.identity(tonic::transport::Identity::from_pem(chain, key));
    }
    tonic::transport::Endpoint::from_shared(s.grpc_url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn identity_client(s: &Secure) -> IdentityClient<tonic::transport::Channel> {
    IdentityClient::new(channel(s, None).await)
}

fn issue(s: &Secure, token: &str, node: &str, csr: &str) -> Result<String, tonic::Status> {
    runtime().block_on(async {
        let mut c = identity_client(s).await;
        c.issue(IssueRequest {
            token: token.to_string(),
            mesh: "demo".into(),
            role: Some(issue_request::Role::VirtualNode(node.into())),
            csr_pem: csr.to_string(),
        })
        .await
        .map(|r| r.into_inner().chain_pem)
    })
}

/// A CSR asking for SANs it should not get.
fn greedy_csr() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://trellis.local/mesh/demo/virtualNode/b"
            .try_into()
            .unwrap(),
    ));
    let csr = params.serialize_request(&key).unwrap();
    (key.serialize_pem(), csr.pem().unwrap())
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn permission_denied(r: Result<String, tonic::Status>, want: &str) {
    let e = r.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(want), "want {want:?}: {}", e.message());
}

#[test]
fn join_tokens_buy_certificates_for_their_own_node_only() {
    let s = Secure::start("");
    setup_mesh(&s);
    let t = token(&s, "a", &["--uses", "1"]);
    assert!(t.starts_with("trellis-"), "{t}");
    let (_, csr) = greedy_csr();

    permission_denied(issue(&s, &t, "b", &csr), "is for virtualNode/a");
    for garbage in [
        "",
        "not a csr",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let e = issue(&s, &t, "a", garbage).expect_err("garbage refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }
    let leaf = issue(&s, &t, "a", &csr).expect("the token buys a certificate for a");
    permission_denied(issue(&s, &t, "a", &csr), "used up");

    let dir = tempfile::tempdir().unwrap();
    let leaf_path = dir.path().join("leaf.pem");
    std::fs::write(&leaf_path, &leaf).unwrap();
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        s.ca.to_str().unwrap(),
        leaf_path.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (_, text) = openssl(&[
        "x509",
        "-in",
        leaf_path.to_str().unwrap(),
        "-noout",
        "-text",
    ]);
    assert!(
        text.contains("URI:spiffe://trellis.local/mesh/demo/virtualNode/a"),
        "{text}"
    );
    assert!(text.contains("DNS:a.demo.local"), "{text}");
    assert!(
        !text.contains("evil.example") && !text.contains("virtualNode/b"),
        "{text}"
    );
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    let info = trellis::identity::ca::inspect(&leaf).unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (info.not_after - now - 86_400).abs() < 60,
        "24 h by default: {info:?}"
    );

    // Revoked and expired tokens buy nothing.
    let revoked = token(&s, "a", &[]);
    let id = revoked
        .trim_start_matches("trellis-")
        .split('.')
        .next()
        .unwrap()
        .to_string();
    s.cli_ok(&["token", "revoke", &id]);
    permission_denied(issue(&s, &revoked, "a", &csr), "revoked");
    let short = token(&s, "a", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    permission_denied(issue(&s, &short, "a", &csr), "expired");
    permission_denied(
        issue(&s, "trellis-nope.0123456789abcdef0123", "a", &csr),
        "unknown",
    );
    let listed = s.cli_ok(&["token", "list"]);
    assert!(
        listed.contains(&id) && !listed.contains(revoked.split('.').nth(1).unwrap()),
        "{listed}"
    );

    // The server is still fine after all that.
    let ok = issue(&s, &token(&s, "b", &[]), "b", &csr);
    assert!(ok.is_ok(), "{ok:?}");
    let logs = s.node.stderr_log();
    assert!(
        !logs.contains("PRIVATE KEY") && !logs.contains(t.split('.').nth(1).unwrap()),
        "secrets in logs"
    );
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    assert!(
        common::wait_until(timeout, &mut f),
        "timed out waiting for {what}"
    );
}

fn cert_not_after(dir: &Path) -> Option<String> {
    let (ok, out) = openssl(&[
        "x509",
        "-in",
        dir.join("identity/cert.pem").to_str()?,
        "-noout",
        "-enddate",
    ]);
    ok.then_some(out)
}

#[test]
fn proxies_stream_over_mtls_renew_and_follow_a_rotation() {
    let s = Secure::start("proxy_cert_seconds = 12\n");
    setup_mesh(&s);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token(&s, "a", &[])).unwrap();
    let data = dir.path().join("proxy");
    let proxy = Proxy::start_with(
        s.node.grpc_addr(),
        "demo",
        ["--virtual-node", "a"],
        &data,
        "127.0.0.31",
        &[
            "--no-vip-listeners",
            "--ca-file",
            s.ca.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    proxy.wait_ready(Duration::from_secs(20));
    let meta = std::fs::metadata(data.join("identity/key.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // Renewal at two thirds of 12 s.
    let first = cert_not_after(&data).unwrap();
    wait_for("a renewed certificate", Duration::from_secs(15), || {
        cert_not_after(&data).is_some_and(|n| n != first)
    });

    // A certificate for a cannot stream as b.
    let bundle = std::fs::read_to_string(&s.ca).unwrap();
    let chain = std::fs::read_to_string(data.join("identity/cert.pem")).unwrap();
    let key = std::fs::read_to_string(data.join("identity/key.pem")).unwrap();
    let refused = runtime().block_on(async {
        use trellis::wire::discovery::discovery_client::DiscoveryClient;
        use trellis::wire::discovery::{Hello, ProxyMessage, hello, proxy_message};
        let channel = channel(&s, Some((&chain, &key))).await;
        let hello = ProxyMessage {
            kind: Some(proxy_message::Kind::Hello(Hello {
                proxy_id: "impostor".into(),
                mesh: "demo".into(),
                role: Some(hello::Role::VirtualNode("b".into())),
                advertise_address: "127.0.0.32".into(),
                inbound_port: 15000,
                have_version: 0,
                healthy: true,
            })),
        };
        DiscoveryClient::new(channel)
            .stream(tokio_stream::iter(vec![hello]))
            .await
            .map(|_| ())
    });
    let e = refused.expect_err("a's certificate cannot stream b's config");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Renewal needs a CSR signed by the certificate's own key.
    let (_, csr) = greedy_csr();
    let renewed = runtime().block_on(async {
        identity_client(&s)
            .await
            .renew(RenewRequest {
                certificate_pem: chain.clone(),
                csr_pem: csr,
            })
            .await
    });
    let e = renewed.expect_err("someone else's CSR");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("csr"), "{e:?}");

    // Rotation: the proxy's config carries both roots; leaves of either root verify.
    s.cli_ok(&["ca", "rotate"]);
    wait_for(
        "the new bundle at the proxy",
        Duration::from_secs(10),
        || {
            proxy.cached().is_some_and(|c| {
                c["config"]["trust_bundle"]
                    .as_str()
                    .is_some_and(|b| b.matches("BEGIN CERTIFICATE").count() >= 3)
            })
        },
    );
    wait_for(
        "a certificate from the new root",
        Duration::from_secs(15),
        || {
            std::fs::read_to_string(data.join("identity/cert.pem"))
                .is_ok_and(|c| c.matches("BEGIN CERTIFICATE").count() == 2)
        },
    );
    let old_bundle = dir.path().join("old.pem");
    std::fs::write(&old_bundle, &bundle).unwrap();
    let leaf = data.join("identity/cert.pem");
    let chain_text = std::fs::read_to_string(&leaf).unwrap();
    let cross = dir.path().join("cross.pem");
    let second = chain_text
        .find("-----BEGIN CERTIFICATE-----")
        .and_then(|first| {
            chain_text[first + 1..]
                .find("-----BEGIN CERTIFICATE-----")
                .map(|i| i + first + 1)
        });
    std::fs::write(&cross, &chain_text[second.unwrap()..]).unwrap();
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        old_bundle.to_str().unwrap(),
        "-untrusted",
        cross.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(
        ok,
        "a new-root leaf chains to the old root through the cross certificate: {out}"
    );

    // Revoking the token stops renewal.
    let listed = s.cli_ok(&["token", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let id = v["tokens"][0]["id"].as_str().unwrap().to_string();
    s.cli_ok(&["token", "revoke", &id]);
    wait_for("a refused renewal", Duration::from_secs(15), || {
        proxy.log().contains("was revoked")
    });
    let logs = format!("{}{}", s.node.stderr_log(), proxy.log());
    assert!(!logs.contains("PRIVATE KEY"), "key material in logs");
}
