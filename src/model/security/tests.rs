use super::*;

fn root(n: i64) -> CaRoot {
    CaRoot {
        cert_pem: format!("CERT{n}\n"),
        key_pem: format!("SECRET-KEY-{n}"),
        not_after: n,
    }
}

fn token(id: &str, uses: Option<u32>) -> JoinToken {
    JoinToken {
        id: id.into(),
        hash: format!("hash-{id}"),
        mesh: "m".into(),
        role: ProxyRole::VirtualNode("a".into()),
        created_at: 0.0,
        expires_at: 100.0,
        uses_left: uses,
        revoked: false,
    }
}

fn redeem(id: &str, node: &str, now: f64) -> SecurityCommand {
    SecurityCommand::TokenRedeem {
        hash: format!("hash-{id}"),
        mesh: "m".into(),
        role: ProxyRole::VirtualNode(node.into()),
        now,
    }
}

fn exists(_: &str, r: &ProxyRole) -> bool {
    *r != ProxyRole::VirtualNode("gone".into())
}

fn message(r: Result<Value, ApiError>) -> String {
    let e = r.unwrap_err();
    assert_eq!(e.kind, super::super::ErrorKind::Forbidden, "{e:?}");
    e.message
}

#[test]
fn the_first_root_wins_and_rotation_keeps_the_old_until_it_expires() {
    let mut s = Security::default();
    let init = |n| SecurityCommand::CaInit {
        trust_domain: "td".into(),
        root: root(n),
    };
    assert_eq!(s.apply(&init(1000), exists).unwrap()["created"], true);
    assert_eq!(s.apply(&init(2000), exists).unwrap()["created"], false);
    assert_eq!(s.signing_root().unwrap().not_after, 1000);
    let rotate = |n, now| SecurityCommand::CaRotate {
        root: root(n),
        cross_cert_pem: format!("CROSS{n}\n"),
        now,
    };
    s.apply(&rotate(3000, 10.0), exists).unwrap();
    assert_eq!(s.roots().len(), 2);
    assert_eq!(s.bundle_pem(), "CERT1000\nCERT3000\nCROSS3000\n");
    // Past the first root's end, the next rotation drops it and its cross certificate.
    s.apply(&rotate(5000, 1500.0), exists).unwrap();
    assert_eq!(s.bundle_pem(), "CERT3000\nCERT5000\nCROSS5000\n");
    assert!(
        !format!("{s:?}").contains("SECRET-KEY"),
        "keys never in Debug"
    );
}

#[test]
fn tokens_are_refused_when_used_up_expired_revoked_or_for_another_node() {
    let mut s = Security::default();
    s.apply(&SecurityCommand::TokenCreate(token("t1", Some(1))), exists)
        .unwrap();
    s.apply(&SecurityCommand::TokenCreate(token("t2", None)), exists)
        .unwrap();
    let mut gone = token("t3", None);
    gone.role = ProxyRole::VirtualNode("gone".into());
    assert_eq!(
        s.apply(&SecurityCommand::TokenCreate(gone), exists)
            .unwrap_err()
            .kind,
        super::super::ErrorKind::NotFound
    );

    assert!(message(s.apply(&redeem("t1", "b", 1.0), exists)).contains("is for virtualNode/a"));
    s.apply(&redeem("t1", "a", 1.0), exists).unwrap();
    assert!(message(s.apply(&redeem("t1", "a", 2.0), exists)).contains("used up"));
    assert!(message(s.apply(&redeem("t2", "a", 100.0), exists)).contains("expired"));
    assert!(message(s.apply(&redeem("nope", "a", 1.0), exists)).contains("unknown"));
    s.apply(&SecurityCommand::TokenRevoke { id: "t2".into() }, exists)
        .unwrap();
    assert!(message(s.apply(&redeem("t2", "a", 1.0), exists)).contains("revoked"));
}

#[test]
fn a_token_for_a_deleted_node_is_refused() {
    let mut s = Security::default();
    let mut t = token("t", None);
    t.role = ProxyRole::VirtualNode("gone".into());
    s.tokens.insert(t.id.clone(), t);
    assert!(message(s.apply(&redeem("t", "gone", 1.0), exists)).contains("no longer exists"));
}

#[test]
fn access_keys_come_and_go_and_never_show_their_secret() {
    let mut s = Security::default();
    let key = AccessKey {
        id: "TRKEXAMPLE".into(),
        secret: "very-secret".into(),
        read_only: true,
        created_at: 0.0,
        description: String::new(),
    };
    s.apply(&SecurityCommand::KeyCreate(key.clone()), exists)
        .unwrap();
    assert!(s.apply(&SecurityCommand::KeyCreate(key), exists).is_err());
    assert!(s.key("TRKEXAMPLE").unwrap().read_only);
    assert!(!format!("{s:?}").contains("very-secret"));
    s.apply(
        &SecurityCommand::KeyDelete {
            id: "TRKEXAMPLE".into(),
        },
        exists,
    )
    .unwrap();
    assert!(s.key("TRKEXAMPLE").is_none());
}
