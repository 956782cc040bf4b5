//! The control plane as a cluster of real `trellis control` processes on 127.0.x.y: formed
//! from config alone (`bootstrap_expect` + `retry_join`), writes through any node, reads from
//! any node that see every acknowledged write, a leader's death (SIGKILL) and restart, a
//! minority cut off by the raft fault hook (503 with Retry-After, no stale reads unless asked),
//! `--join` and `members remove`.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::wait_until;
use serde_json::json;

/// One cluster at a time: on a small CI machine, several clusters side by side starve each
/// other's heartbeats and the election timings measured here would be the machine's.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn mesh(name: &str) -> serde_json::Value {
    json!({ "meshName": name })
}

fn mesh_names(c: &Cluster, i: usize, query: &str) -> Vec<String> {
    let got = c.get(i, &format!("/v20190125/meshes?limit=100{query}"));
    assert_eq!(got.status, 200, "{got:?}");
    let mut names: Vec<String> = got.json()["meshes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["meshName"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// Writes `name` through node `i`, retrying 503s (an election) for up to `wait`; returns
/// how long it took.
fn write_through(c: &Cluster, i: usize, name: &str, wait: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let got = c.put(i, "/v20190125/meshes", &mesh(name));
        match got.status {
            200 => return t.elapsed(),
            503 if t.elapsed() < wait => {
                assert!(got.body.contains("retry"), "{got:?}");
            }
            _ => panic!(
                "write {name} through node {}: {got:?}\n{}",
                i + 1,
                (0..c.nodes.len())
                    .map(|j| format!("--- node {}:\n{}", j + 1, c.log(j)))
                    .collect::<String>()
            ),
        }
    }
}

#[test]
fn three_nodes_form_serve_from_any_node_and_replace_a_dead_leader() {
    let _serial = serial();
    let mut c = Cluster::start(31, 3);
    c.wait_serving(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || c.leader().is_some()),
        "no agreed leader:\n{}",
        c.log(0)
    );
    let members = c.members(1);
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(
        members.iter().all(|m| m["health"] == "healthy"),
        "{members:?}"
    );
    assert_eq!(members.iter().filter(|m| m["role"] == "leader").count(), 1);

    // Writes through every node; each read, on every node, sees all of them at once.
    let mut written = Vec::new();
    for round in 0..5 {
        for i in 0..3 {
            let name = format!("m{round}-{i}");
            write_through(&c, i, &name, Duration::from_secs(5));
            written.push(name);
            written.sort();
            for j in 0..3 {
                assert_eq!(mesh_names(&c, j, ""), written, "read on node {}", j + 1);
            }
        }
    }

    // The leader dies: a survivor takes writes again within 3 s.
    let leader = c.leader().unwrap();
    c.kill(leader);
    let other = (leader + 1) % 3;
    let took = write_through(&c, other, "after-kill", Duration::from_secs(10));
    // Usually about 1.2 s; see the fault test for the distribution.
    assert!(took < Duration::from_secs(6), "a new leader took {took:?}");
    written.push("after-kill".into());
    written.sort();
    let new_leader = c.leader().expect("the survivors agree on a leader");
    assert_ne!(new_leader, leader);
    let members = c.members(other);
    let dead = members
        .iter()
        .find(|m| m["id"] == c.nodes[leader].id)
        .unwrap();
    assert_eq!(dead["health"], "unreachable", "{members:?}");

    // It comes back and catches up; its reads see everything.
    c.spawn(leader);
    c.wait_serving(Duration::from_secs(30));
    assert_eq!(mesh_names(&c, leader, ""), written);
    write_through(&c, leader, "via-old-leader", Duration::from_secs(5));
    written.push("via-old-leader".into());
    written.sort();
    for j in 0..3 {
        assert_eq!(mesh_names(&c, j, ""), written);
    }
}

#[test]
fn a_minority_cut_off_answers_503_and_catches_up_when_healed() {
    let _serial = serial();
    let c = Cluster::start(32, 3);
    c.wait_serving(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || c.leader().is_some()));
    write_through(&c, 0, "before", Duration::from_secs(5));
    // Cut off the leader itself: the majority elects another and goes on.
    let cut = c.leader().unwrap();
    c.partition(cut);
    let majority = (cut + 1) % 3;
    write_through(&c, majority, "during", Duration::from_secs(10));

    // The cut-off node refuses writes and default reads (it cannot prove it is current)…
    let got = c.put(cut, "/v20190125/meshes", &mesh("lost"));
    assert_eq!(got.status, 503, "{got:?}");
    let read = c.get(cut, "/v20190125/meshes");
    assert_eq!(
        read.status, 503,
        "a stale read on the default path: {read:?}"
    );
    assert!(read.body.contains("retry"), "{read:?}");
    // …but answers a stale read from its own state when asked.
    assert_eq!(mesh_names(&c, cut, "&stale"), vec!["before".to_string()]);

    c.heal();
    assert!(
        wait_until(Duration::from_secs(15), || c
            .get(cut, "/v20190125/meshes")
            .status
            == 200),
        "the healed node never served reads again"
    );
    assert_eq!(
        mesh_names(&c, cut, ""),
        vec!["before".to_string(), "during".to_string()]
    );
}

#[test]
fn five_nodes_tolerate_two_failures_and_a_node_joins_and_leaves() {
    let _serial = serial();
    let mut c = Cluster::start(33, 5);
    c.wait_serving(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || c.leader().is_some()));
    assert_eq!(c.members(4).len(), 5);
    write_through(&c, 4, "five", Duration::from_secs(5));
    // Two followers die: three of five is still a quorum.
    let leader = c.leader().unwrap();
    let followers: Vec<usize> = (0..5).filter(|i| *i != leader).collect();
    c.kill(followers[0]);
    c.kill(followers[1]);
    write_through(&c, followers[2], "three-left", Duration::from_secs(5));
    // A third: no quorum, a clear 503 with a retry hint.
    c.kill(followers[2]);
    let got = c.put(leader, "/v20190125/meshes", &mesh("no-quorum"));
    assert_eq!(got.status, 503, "{got:?}");
    assert!(got.body.contains("retry"), "{got:?}");
    // Back to four: the cluster serves again.
    c.spawn(followers[0]);
    c.spawn(followers[1]);
    c.wait_serving(Duration::from_secs(30));
    write_through(&c, followers[0], "recovered", Duration::from_secs(15));
    // The dead one is taken out by hand; the cluster is four voters.
    let dead_id = c.nodes[followers[2]].id;
    let got = c.delete(followers[0], &format!("/v1/members/{dead_id}"));
    assert_eq!(got.status, 200, "{got:?}");
    assert!(wait_until(Duration::from_secs(5), || c
        .members(leader)
        .len()
        == 4));
}

#[test]
fn a_new_node_joins_with_join_as_a_learner_then_a_voter() {
    let _serial = serial();
    // Node 3's config expects nobody: it joins the two-node cluster through --join.
    let mut c = Cluster::configure(34, 3, 2);
    for i in 0..2 {
        c.spawn(i);
    }
    c.wait_serving(Duration::from_secs(30));
    write_through(&c, 0, "first", Duration::from_secs(5));
    let via = c.nodes[1].grpc.to_string();
    c.spawn_with(2, &["--join", &via]);
    c.wait_serving(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || {
            let m = c.members(2);
            m.len() == 3
                && m.iter()
                    .all(|m| m["role"] != "learner" && m["health"] == "healthy")
        }),
        "{:?}\n{}",
        c.members(2),
        c.log(2)
    );
    assert_eq!(mesh_names(&c, 2, ""), vec!["first".to_string()]);
    // A member that restarts needs no flag.
    c.kill(2);
    c.spawn(2);
    c.wait_serving(Duration::from_secs(30));
    write_through(&c, 2, "second", Duration::from_secs(5));
}

/// Asks node `grpc`'s Cluster service who it is, as a caller with `identity` (or none).
async fn hello(
    grpc: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<(String, String)>,
) -> Result<(), tonic::Status> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    let mut client = trellis::wire::cluster::cluster_client::ClusterClient::new(channel);
    client
        .hello(trellis::wire::cluster::Json {
            json: b"null".to_vec(),
        })
        .await
        .map(|_| ())
}

#[test]
fn a_tls_cluster_takes_only_its_own_control_certificates() {
    let _serial = serial();
    let mut c = Cluster::configure_with(35, 3, 3, true);
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_serving(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || c.leader().is_some()),
        "{}",
        c.log(0)
    );
    write_through(&c, 2, "over-tls", Duration::from_secs(5));
    assert_eq!(mesh_names(&c, 0, ""), vec!["over-tls".to_string()]);

    let ca_pem = std::fs::read_to_string(c.ca_file().unwrap()).unwrap();
    let ca_key = std::fs::read_to_string(c.ca_file().unwrap().with_file_name("ca.key")).unwrap();
    let root = trellis::identity::ca::root_from_pem(&ca_pem, &ca_key).unwrap();
    let issue = |root: &trellis::identity::ca::RootCa, uri: &str| {
        trellis::identity::ca::issue_node_cert(
            root,
            uri,
            &[],
            &[],
            std::time::SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap()
    };
    let grpc = c.nodes[0].grpc;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A control-node certificate of this cluster's CA is served.
        let control = issue(&root, "spiffe://trellis.local/control/9");
        hello(grpc, &ca_pem, Some(control)).await.unwrap();
        // No certificate, or a proxy's certificate of the same CA: refused by the service.
        let err = hello(grpc, &ca_pem, None).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        let proxy = issue(&root, "spiffe://trellis.local/mesh/demo/virtualNode/red");
        let err = hello(grpc, &ca_pem, Some(proxy)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        // A control-node certificate of another CA: refused at the handshake.
        let other = trellis::identity::ca::new_root(
            "trellis.local",
            std::time::SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let foreign = issue(&other, "spiffe://trellis.local/control/9");
        let err = hello(grpc, &ca_pem, Some(foreign)).await.unwrap_err();
        assert_ne!(err.code(), tonic::Code::Ok);
    });
    assert_eq!(c.members(1).len(), 3);
}

/// Every resource type, created through the API, by its collection path and name.
fn every_resource_type() -> Vec<(&'static str, &'static str, serde_json::Value)> {
    vec![
        (
            "/v20190125/meshes",
            "demo",
            json!({"meshName": "demo", "spec": {"egressFilter": {"type": "ALLOW_ALL"}},
                "tags": [{"key": "team", "value": "colors"}]}),
        ),
        (
            "/v20190125/meshes/demo/virtualNodes",
            "red",
            json!({"virtualNodeName": "red", "spec": {
                "listeners": [{"portMapping": {"port": 9080, "protocol": "http"},
                    "healthCheck": {"protocol": "http", "path": "/ping", "healthyThreshold": 2,
                        "unhealthyThreshold": 3, "intervalMillis": 5000, "timeoutMillis": 2000}}],
                "serviceDiscovery": {"dns": {"hostname": "red.demo.local"}}},
                "tags": [{"key": "tier", "value": "back"}]}),
        ),
        (
            "/v20190125/meshes/demo/virtualRouters",
            "color",
            json!({"virtualRouterName": "color", "spec": {"listeners": [
                {"portMapping": {"port": 9080, "protocol": "http"}}]}}),
        ),
        (
            "/v20190125/meshes/demo/virtualRouter/color/routes",
            "all",
            json!({"routeName": "all", "spec": {"priority": 5, "httpRoute": {
                "match": {"prefix": "/", "headers": [{"name": "x-v", "match": {"range": {"start": 1, "end": 9}}}]},
                "action": {"weightedTargets": [{"virtualNode": "red", "weight": 3}]},
                "retryPolicy": {"maxRetries": 2, "perRetryTimeout": {"unit": "ms", "value": 500},
                    "httpRetryEvents": ["server-error"]}}}}),
        ),
        (
            "/v20190125/meshes/demo/virtualServices",
            "color.demo.local",
            json!({"virtualServiceName": "color.demo.local", "spec": {"provider":
                {"virtualRouter": {"virtualRouterName": "color"}}}}),
        ),
        (
            "/v20190125/meshes/demo/virtualGateways",
            "gw",
            json!({"virtualGatewayName": "gw", "spec": {"listeners": [
                {"portMapping": {"port": 8080, "protocol": "http"}}]}}),
        ),
        (
            "/v20190125/meshes/demo/virtualGateway/gw/gatewayRoutes",
            "to-color",
            json!({"gatewayRouteName": "to-color", "spec": {"httpRoute": {
                "match": {"prefix": "/color"},
                "action": {"target": {"virtualService": {"virtualServiceName": "color.demo.local"}},
                    "rewrite": {"prefix": {"defaultPrefix": "DISABLED"}}}}}}),
        ),
    ]
}

fn describe_path(coll: &str, name: &str) -> String {
    format!("{coll}/{name}")
}

fn trellis(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn snapshot_save_and_restore_move_every_resource_into_a_new_cluster() {
    let _serial = serial();
    let source = Cluster::start(36, 3);
    source.wait_serving(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || source
        .leader()
        .is_some()));
    let resources = every_resource_type();
    for (coll, _, body) in &resources {
        let got = source.put(1, coll, body);
        assert_eq!(got.status, 200, "{coll}: {got:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.json");
    let file = file.to_str().unwrap();
    let out = trellis(&["snapshot", "save", file, "--endpoint", &source.url(2, "")]);
    assert!(out.status.success(), "{out:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup holds the CA key");

    let target = Cluster::start(37, 3);
    target.wait_serving(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || target
        .leader()
        .is_some()));
    // The new cluster already holds something of its own; the restore replaces it.
    assert_eq!(
        target.put(0, "/v20190125/meshes", &mesh("scratch")).status,
        200
    );
    let out = trellis(&[
        "snapshot",
        "restore",
        file,
        "--endpoint",
        &target.url(1, ""),
    ]);
    assert!(out.status.success(), "{out:?}");

    for (coll, name, _) in &resources {
        let path = describe_path(coll, name);
        let before = source.get(0, &path);
        assert_eq!(before.status, 200, "{path}: {before:?}");
        for i in 0..3 {
            let after = target.get(i, &path);
            assert_eq!(after.json(), before.json(), "{path} on node {}", i + 1);
        }
    }
    assert_eq!(mesh_names(&target, 2, ""), vec!["demo".to_string()]);
    let tags = |c: &Cluster| {
        let arn = c.get(0, "/v20190125/meshes/demo").json()["metadata"]["arn"]
            .as_str()
            .unwrap()
            .to_string();
        c.get(0, &format!("/v20190125/tags?resourceArn={arn}"))
            .json()
    };
    assert_eq!(tags(&target), tags(&source));
    assert_eq!(
        target.get(0, "/v1/ca").json()["bundle"],
        source.get(0, "/v1/ca").json()["bundle"],
        "the mesh CA moves with the state"
    );
    // The restored cluster takes writes on top.
    write_through(&target, 0, "after-restore", Duration::from_secs(5));

    // A file that is not a backup is refused with the reason; nothing changes.
    std::fs::write(file, br#"{"format": "something-else", "state": {}}"#).unwrap();
    let out = trellis(&[
        "snapshot",
        "restore",
        file,
        "--endpoint",
        &target.url(0, ""),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("trellis-snapshot/1"),
        "{out:?}"
    );
    assert_eq!(mesh_names(&target, 1, "").len(), 2);
}

/// This node's own raft view (`node` in `/v1/members`).
fn node_info(c: &Cluster, i: usize) -> serde_json::Value {
    c.get(i, "/v1/members").json()["node"].clone()
}

/// `per_worker` UpdateMesh calls on each of `meshes`, one worker per mesh, all at once.
fn update_meshes(c: &Cluster, i: usize, meshes: &[String], per_worker: usize) {
    use http_body_util::{BodyExt, Full};
    let base = c.url(i, "/v20190125/meshes");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let workers = meshes.iter().map(|m| {
            let client = client.clone();
            let url = format!("{base}/{m}");
            tokio::spawn(async move {
                for n in 0..per_worker {
                    let filter = if n % 2 == 0 { "ALLOW_ALL" } else { "DROP_ALL" };
                    let body = json!({"spec": {"egressFilter": {"type": filter}}}).to_string();
                    let req = http::Request::put(&url)
                        .header("content-type", "application/json")
                        .body(Full::new(bytes::Bytes::from(body)))
                        .unwrap();
                    let resp = client.request(req).await.unwrap();
                    let status = resp.status();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                }
            })
        });
        for w in futures_util::future::join_all(workers).await {
            w.unwrap();
        }
    });
}

#[test]
fn a_node_down_for_10000_writes_rejoins_through_a_snapshot() {
    let _serial = serial();
    let mut c = Cluster::configure_extra(38, 3, 3, false, "snapshot_every = 1000\n");
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_serving(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || c.leader().is_some()));
    let leader = c.leader().unwrap();
    let meshes: Vec<String> = (0..8).map(|k| format!("w{k}")).collect();
    for m in &meshes {
        write_through(&c, leader, m, Duration::from_secs(5));
    }
    let down = (leader + 1) % 3;
    let last_seen = node_info(&c, down)["last_log_index"].as_u64().unwrap();
    c.kill(down);

    update_meshes(&c, leader, &meshes, 1250);
    let leader_info = node_info(&c, leader);
    assert!(
        leader_info["purged_index"].as_u64().unwrap() > last_seen,
        "the entries the node lacks must be compacted away: {leader_info}, node had {last_seen}"
    );

    c.spawn(down);
    c.wait_serving(Duration::from_secs(30));
    let target = node_info(&c, leader)["last_log_index"].as_u64().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || {
            node_info(&c, down)["applied_index"].as_u64().unwrap_or(0) >= target
        }),
        "the node never caught up: {}",
        node_info(&c, down)
    );
    let info = node_info(&c, down);
    assert!(
        info["snapshot_index"].as_u64().unwrap() > last_seen,
        "it caught up through a snapshot: {info}"
    );
    // Its stale reads (its own state, no read-index) carry every update.
    for m in &meshes {
        let got = c.get(down, &format!("/v20190125/meshes/{m}?stale"));
        assert_eq!(got.json()["metadata"]["version"], 1251, "{m}: {got:?}");
    }
}

#[test]
fn autopilot_removes_a_dead_voter_but_never_below_the_minimum() {
    let _serial = serial();
    let mut c = Cluster::configure_extra(
        39,
        4,
        4,
        false,
        "autopilot_dead_voter_seconds = 2\nautopilot_min_voters = 3\n",
    );
    for i in 0..4 {
        c.spawn(i);
    }
    c.wait_serving(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || c.leader().is_some()));
    let leader = c.leader().unwrap();
    let first = (leader + 1) % 4;
    let second = (leader + 2) % 4;
    c.kill(first);
    // Four voters, one dead for 2 s: it goes, three remain.
    assert!(
        wait_until(Duration::from_secs(15), || c.members(leader).len() == 3),
        "{:?}",
        c.members(leader)
    );
    let ids: Vec<u64> = c
        .members(leader)
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect();
    assert!(!ids.contains(&c.nodes[first].id), "{ids:?}");
    write_through(&c, leader, "three-voters", Duration::from_secs(5));
    // Another dies: removing it would leave two, below the minimum of three. It stays (and
    // two of three still make a quorum).
    c.kill(second);
    std::thread::sleep(Duration::from_secs(5));
    let members = c.members(leader);
    assert_eq!(members.len(), 3, "{members:?}");
    write_through(&c, leader, "still-three", Duration::from_secs(5));
}

#[test]
fn a_leader_stopped_with_sigterm_hands_leadership_over() {
    let _serial = serial();
    let mut c = Cluster::start(40, 3);
    c.wait_serving(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || c.leader().is_some()));
    write_through(&c, 0, "before", Duration::from_secs(5));
    let leader = c.leader().unwrap();
    let other = (leader + 1) % 3;
    c.signal(leader, "TERM");
    let t = Instant::now();
    let took = write_through(&c, other, "after", Duration::from_secs(10));
    let code = c.stop(leader);
    println!("SIGTERM to a write through another node: {took:?}");
    assert_eq!(code, Some(0), "{}", c.log(leader));
    assert!(
        c.log(leader).contains("handed leadership over"),
        "{}",
        c.log(leader)
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // A follower stops as promptly, though the new leader's AppendEntries stream to it never
    // ends by itself (a graceful stop waits for every stream).
    let new_leader = c.leader().unwrap();
    let follower = (0..3).find(|i| *i != leader && *i != new_leader).unwrap();
    let code = c.stop_within(follower, Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", c.log(follower));
}

fn dig(dns: std::net::SocketAddr, name: &str) -> Vec<String> {
    common::dig_short(dns, name, "A")
}

#[test]
fn every_node_answers_dns_and_serves_proxies() {
    let _serial = serial();
    let c = Cluster::start(42, 3);
    c.wait_serving(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || c.leader().is_some()));
    let leader = c.leader().unwrap();
    let follower = (leader + 1) % 3;
    let third = (leader + 2) % 3;
    let p = "/v20190125/meshes/demo";
    for (path, body) in [
        ("/v20190125/meshes", json!({"meshName": "demo"})),
        (
            &format!("{p}/virtualNodes") as &str,
            json!({"virtualNodeName": "red", "spec": {
                "listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
                "serviceDiscovery": {"dns": {"hostname": "red.demo.local"}}}}),
        ),
        (
            &format!("{p}/virtualServices"),
            json!({"virtualServiceName": "color.demo.local",
                "spec": {"provider": {"virtualNode": {"virtualNodeName": "red"}}}}),
        ),
    ] {
        assert_eq!(c.put(follower, path, &body).status, 200);
    }
    // Every node answers the service's VIP from its own replica of the state.
    let vips: Vec<Vec<String>> = (0..3)
        .map(|i| {
            let mut got = Vec::new();
            wait_until(Duration::from_secs(5), || {
                got = dig(c.nodes[i].dns, "color.demo.local");
                !got.is_empty()
            });
            got
        })
        .collect();
    assert!(
        vips[0].len() == 1 && vips[0][0].starts_with("127.77."),
        "{vips:?}"
    );
    assert!(vips.iter().all(|v| *v == vips[0]), "{vips:?}");

    // A proxy that talks to a follower gets its config there, and its registration (a write
    // the follower forwards) shows in every node's DNS.
    let dir = tempfile::tempdir().unwrap();
    let proxy = common::proxy::Proxy::start(
        c.nodes[follower].grpc,
        "demo",
        ["--virtual-node", "red"],
        dir.path(),
        "127.0.42.50",
    );
    proxy.wait_ready(Duration::from_secs(20));
    for i in [leader, third, follower] {
        assert!(
            wait_until(Duration::from_secs(10), || dig(
                c.nodes[i].dns,
                "red.demo.local"
            ) == vec![
                "127.0.42.50".to_string()
            ]),
            "node {} never answered the registered instance",
            i + 1
        );
    }
}
