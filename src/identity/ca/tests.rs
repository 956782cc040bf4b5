use std::process::Command;

use super::*;

const DAY: Duration = Duration::from_secs(86_400);

fn now() -> SystemTime {
    SystemTime::now()
}

fn greedy_csr() -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://x/mesh/other/virtualNode/b".try_into().unwrap(),
    ));
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key.serialize_pem(), csr)
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_root_is_a_ca_and_keeps_its_key_out_of_debug() {
    let root = new_root("trellis.local", now(), 10 * DAY).unwrap();
    let info = inspect(&root.cert_pem).unwrap();
    assert!(info.is_ca);
    assert!((info.not_after - epoch(now()) - 10 * 86_400).abs() < 5);
    assert!(!format!("{root:?}").contains("PRIVATE"));
}

#[test]
fn a_leaf_gets_only_the_names_it_is_given() {
    let root = new_root("td", now(), 10 * DAY).unwrap();
    let (_, csr) = greedy_csr();
    let uri = "spiffe://td/mesh/demo/virtualNode/a".to_string();
    let leaf = issue_leaf(
        &root,
        &csr,
        std::slice::from_ref(&uri),
        &["a.demo.local".into()],
        now(),
        DAY,
    )
    .unwrap();
    let info = inspect(&leaf).unwrap();
    assert_eq!(info.uris, [uri]);
    assert_eq!(info.dns_names, ["a.demo.local"]);
    assert!(!info.is_ca);
    // Capped at the root's end.
    let long = issue_leaf(&root, &csr, &[], &[], now(), 100 * DAY).unwrap();
    assert_eq!(inspect(&long).unwrap().not_after, root.not_after);

    let dir = tempfile::tempdir().unwrap();
    let (r, l) = (dir.path().join("root.pem"), dir.path().join("leaf.pem"));
    std::fs::write(&r, &root.cert_pem).unwrap();
    std::fs::write(&l, &leaf).unwrap();
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        r.to_str().unwrap(),
        l.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (_, text) = openssl(&["x509", "-in", l.to_str().unwrap(), "-noout", "-text"]);
    for want in [
        "URI:spiffe://td/mesh/demo/virtualNode/a",
        "Digital Signature",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "CA:FALSE",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    assert!(!text.contains("evil.example"), "{text}");
    assert_eq!(
        verify_leaf(&leaf, &root.cert_pem, now())
            .unwrap()
            .uris
            .len(),
        1
    );
    let other = new_root("td", now(), DAY).unwrap();
    assert!(matches!(
        verify_leaf(&leaf, &other.cert_pem, now()),
        Err(PkiError::UnknownIssuer)
    ));
    assert!(matches!(
        verify_leaf(&leaf, &root.cert_pem, now() + 2 * DAY),
        Err(PkiError::Expired)
    ));
}

#[test]
fn garbage_csrs_are_refused_without_panic() {
    let root = new_root("td", now(), DAY).unwrap();
    let (_, good) = greedy_csr();
    let mut tampered = good.clone();
    let mid = tampered.len() / 2;
    tampered.replace_range(mid..mid + 4, "AAAA");
    let rsa_like = root.cert_pem.clone();
    for bad in [
        "",
        "garbage",
        "-----BEGIN CERTIFICATE REQUEST-----\n!!\n-----END CERTIFICATE REQUEST-----\n",
        &tampered,
        &rsa_like,
    ] {
        assert!(
            issue_leaf(&root, bad, &[], &[], now(), DAY).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn renewal_needs_the_certificates_own_key() {
    let root = new_root("td", now(), DAY).unwrap();
    let (key, csr) = new_key_and_csr().unwrap();
    let leaf = issue_leaf(&root, &csr, &[], &[], now(), DAY).unwrap();
    check_possession(&leaf, &csr_for_key(&key).unwrap()).unwrap();
    let (_, other) = greedy_csr();
    assert!(matches!(
        check_possession(&leaf, &other),
        Err(PkiError::KeyMismatch)
    ));
}

#[test]
fn after_rotation_leaves_of_both_roots_chain_to_the_old_root() {
    let old = new_root("td", now(), 10 * DAY).unwrap();
    let new = new_root("td", now(), 20 * DAY).unwrap();
    let cross = cross_sign(&new, &old, now()).unwrap();
    let (_, csr) = new_key_and_csr().unwrap();
    let new_leaf = issue_leaf(&new, &csr, &[], &[], now(), DAY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str, t: &str| {
        let path = dir.path().join(n);
        std::fs::write(&path, t).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (o, c, l) = (
        p("old.pem", &old.cert_pem),
        p("cross.pem", &cross),
        p("leaf.pem", &new_leaf),
    );
    let (ok, out) = openssl(&["verify", "-CAfile", &o, "-untrusted", &c, &l]);
    assert!(ok, "{out}");
    // The cross certificate itself is signed by the old root, for the new root's name.
    verify_leaf(&cross, &old.cert_pem, now()).unwrap();
    let bundle = format!("{}{}", old.cert_pem, new.cert_pem);
    verify_leaf(&new_leaf, &bundle, now()).unwrap();
}

/// Handshakes a server and a client over an in-memory pipe; Ok when both sides accept.
async fn handshake(
    server: std::sync::Arc<rustls::ServerConfig>,
    client: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let name = rustls_pki_types::ServerName::try_from("a.demo.local").unwrap();
    let (s, c) = tokio::join!(
        tokio_rustls::TlsAcceptor::from(server).accept(a),
        tokio_rustls::TlsConnector::from(client).connect(name, b)
    );
    let (mut s, mut c) = (
        s.map_err(|e| format!("server: {e}"))?,
        c.map_err(|e| format!("client: {e}"))?,
    );
    // TLS 1.3 clients learn of a refused certificate only on the first read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (w, r) = tokio::join!(s.write_all(b"x"), async {
        let mut buf = [0u8; 1];
        c.read_exact(&mut buf).await
    });
    w.map_err(|e| format!("server write: {e}"))?;
    r.map_err(|e| format!("client read: {e}"))?;
    Ok(())
}

#[tokio::test]
async fn old_and_new_leaves_trust_each_other_across_a_rotation() {
    use crate::identity::tls::{client_config, peer_spiffe, server_config};
    let old = new_root("td", now(), 10 * DAY).unwrap();
    let new = new_root("td", now(), 20 * DAY).unwrap();
    let cross = cross_sign(&new, &old, now()).unwrap();
    let leaf = |root: &RootCa, node: &str| {
        let (key, csr) = new_key_and_csr().unwrap();
        let uri = format!("spiffe://td/mesh/demo/virtualNode/{node}");
        let cert = issue_leaf(root, &csr, &[uri], &["a.demo.local".into()], now(), DAY).unwrap();
        (cert, key)
    };
    let (old_cert, old_key) = leaf(&old, "a");
    let (new_cert, new_key) = leaf(&new, "b");
    let new_chain = format!("{new_cert}{cross}");
    let bundle = format!("{}{}", old.cert_pem, new.cert_pem);

    // A server on an old leaf that still trusts only the old root accepts a new-leaf client
    // presenting the cross certificate, and the client (trusting the bundle) accepts it.
    let server = server_config(&old_cert, &old_key, Some(&old.cert_pem), false, &[]).unwrap();
    let client = client_config(&bundle, Some((&new_chain, &new_key)), &[]).unwrap();
    handshake(server, client).await.unwrap();
    // And the other way round.
    let server = server_config(&new_chain, &new_key, Some(&bundle), false, &[]).unwrap();
    let client = client_config(&old.cert_pem, Some((&old_cert, &old_key)), &[]).unwrap();
    handshake(server, client).await.unwrap();

    // mTLS refusals: no client certificate, or one from another CA.
    let server = || server_config(&old_cert, &old_key, Some(&bundle), false, &[]).unwrap();
    let anonymous = client_config(&bundle, None, &[]).unwrap();
    assert!(handshake(server(), anonymous).await.is_err());
    let stranger = new_root("td", now(), DAY).unwrap();
    let (s_cert, s_key) = leaf(&stranger, "c");
    let foreign = client_config(&bundle, Some((&s_cert, &s_key)), &[]).unwrap();
    assert!(handshake(server(), foreign).await.is_err());

    use rustls_pki_types::pem::PemObject;
    let der: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(new_chain.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        peer_spiffe(&der).as_deref(),
        Some("spiffe://td/mesh/demo/virtualNode/b")
    );
}
