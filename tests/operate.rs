//! Running trellis the way systemd and a newcomer do: readiness told over a (fake) notify
//! socket only once a role is ready, SIGHUP changing the log level of a running process,
//! SIGTERM exiting 0, config files driving both roles, and `trellis dev --demo` bringing up
//! the color app whose split follows an `aws appmesh update-route`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::echo::curl;
use common::mesh::put;
use common::proxy::Proxy;
use common::{CleanEnv, DevNode, free_port, wait_until};
use serde_json::json;

/// A stand-in for systemd's notify socket: a datagram socket in a temp dir.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            path,
            _dir: dir,
        }
    }

    fn env(&self) -> (&'static str, &str) {
        ("NOTIFY_SOCKET", self.path.to_str().unwrap())
    }

    /// Every message that arrives within `window`.
    fn received_within(&self, window: Duration) -> Vec<String> {
        let mut got = Vec::new();
        let end = Instant::now() + window;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return got;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0u8; 4096];
            match self.sock.recv(&mut buf) {
                Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(_) => return got,
            }
        }
    }

    /// The messages up to and including the first holding `line` (e.g. `READY=1`); panics
    /// when none comes within `timeout`.
    fn wait_for(&self, line: &str, timeout: Duration) -> Vec<String> {
        let mut got = Vec::new();
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {line} within {timeout:?}; got {got:?}");
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == line);
                got.push(msg);
                if done {
                    return got;
                }
            }
        }
    }
}

fn has_line(messages: &[String], line: &str) -> bool {
    messages.iter().any(|m| m.lines().any(|l| l == line))
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A proxy.toml for red without `control`, which the command line gives (`--control`): a
/// reload must not need what only flags complete.
fn proxy_toml(data_dir: &Path, log: &str) -> String {
    format!(
        "mesh = \"demo\"\nvirtual_node = \"red\"\ndata_dir = \"{}\"\n\
         advertise_addr = \"127.0.0.81\"\ninbound_addr = \"127.0.0.81:0\"\noutbound_addr = \"off\"\n\
         admin_addr = \"127.0.0.81:0\"\napp_host = \"127.0.0.81\"\nvip_listeners = false\nlog = \"{log}\"\n",
        data_dir.display()
    )
}

/// Creates virtual node red, or (`update`) changes its listener port.
fn red_node(node: &DevNode, port: u16, update: bool) {
    let spec = json!({"listeners": [{"portMapping": {"port": port, "protocol": "http"}}],
                      "serviceDiscovery": {"dns": {"hostname": "red.demo.local"}}});
    if update {
        put(
            node,
            "/v20190125/meshes/demo/virtualNodes/red",
            json!({"spec": spec}),
        );
    } else {
        put(
            node,
            "/v20190125/meshes/demo/virtualNodes",
            json!({"virtualNodeName": "red", "spec": spec}),
        );
    }
}

#[test]
fn a_proxy_is_ready_for_systemd_only_with_a_config_and_reloads_its_log_level_on_sighup() {
    let node = DevNode::start();
    put(&node, "/v20190125/meshes", json!({"meshName": "demo"}));
    let dir = tempfile::tempdir().unwrap();
    // log = "warn": the info line a config change writes stays out of the log.
    let config = write(
        dir.path(),
        "proxy.toml",
        &proxy_toml(&dir.path().join("data"), "warn"),
    );
    let notify = NotifySocket::new();
    let args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--control".to_string(),
        node.grpc_addr().to_string(),
    ];
    let mut proxy = Proxy::spawn(&args, &[notify.env()], &dir.path().join("data"));
    // Its virtual node does not exist yet: the control node refuses its stream, so it has no
    // config and is not ready, on either channel.
    let admin = proxy.admin();
    let ready = || curl(&[&format!("http://{admin}/ready")]).status;
    assert!(
        wait_until(Duration::from_secs(20), || proxy
            .log()
            .contains("VirtualNode with name red is not present")),
        "{}",
        proxy.log()
    );
    assert_eq!(ready(), 503);
    let early = notify.received_within(Duration::from_millis(300));
    assert!(!has_line(&early, "READY=1"), "{early:?}");

    red_node(&node, 9080, false);
    notify.wait_for("READY=1", Duration::from_secs(20));
    assert_eq!(ready(), 200, "{}", proxy.log());
    assert!(
        !proxy.log().contains("config applied"),
        "info lines logged under log = \"warn\":\n{}",
        proxy.log()
    );

    // SIGHUP rereads `log` from the file: the next config change is logged, same process.
    let pid = proxy.pid().unwrap();
    write(
        dir.path(),
        "proxy.toml",
        &proxy_toml(&dir.path().join("data"), "info"),
    );
    signal(pid, "HUP");
    let reload = notify.wait_for("READY=1", Duration::from_secs(10));
    assert!(has_line(&reload, "RELOADING=1"), "{reload:?}");
    red_node(&node, 9081, true);
    assert!(
        wait_until(Duration::from_secs(10), || proxy
            .log()
            .contains("config applied")),
        "no info line after SIGHUP set log = \"info\":\n{}",
        proxy.log()
    );
    assert_eq!(proxy.pid(), Some(pid));

    signal(pid, "TERM");
    notify.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(proxy.wait_exit(Duration::from_secs(15)), "{}", proxy.log());
    assert_eq!(proxy.exit_code(), Some(0), "{}", proxy.log());
}

/// A `trellis control --config` child with a notify socket; stdout is collected for its
/// ready line.
struct Control {
    child: Child,
    log: PathBuf,
    out: PathBuf,
}

impl Control {
    fn start(config: &Path, dir: &Path, notify_socket: &str) -> Control {
        let log = dir.join("stderr.log");
        let out = dir.join("stdout.log");
        let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .env_clear_trellis()
            .args(["control", "--config", config.to_str().unwrap()])
            .env("NOTIFY_SOCKET", notify_socket)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Control { child, log, out }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The API URL from `trellis control ready: api=URL …` (waited for).
    fn api(&self) -> String {
        let url = || {
            let out = std::fs::read_to_string(&self.out).unwrap_or_default();
            out.lines()
                .find_map(|l| l.strip_prefix("trellis control ready: api="))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
        };
        assert!(
            wait_until(Duration::from_secs(30), || url().is_some()),
            "no ready line:\n{}",
            self.log()
        );
        url().unwrap_or_default()
    }

    fn rotate_ca(&self) {
        let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["ca", "rotate", "--endpoint", &self.api()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_control_node_is_ready_once_serving_reloads_its_log_level_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let toml = |log: &str| {
        format!(
            "data_dir = \"{}\"\napi_addr = \"127.0.0.1:0\"\ngrpc_addr = \"127.0.0.1:0\"\n\
             dns_addr = \"127.0.0.1:0\"\ntls = false\nauth = \"none\"\nlog = \"{log}\"\n",
            dir.path().join("data").display()
        )
    };
    let config = write(dir.path(), "control.toml", &toml("warn"));
    let notify = NotifySocket::new();
    let mut control = Control::start(&config, dir.path(), notify.env().1);
    let got = notify.wait_for("READY=1", Duration::from_secs(30));
    assert!(got[0].starts_with("STATUS=starting"), "{got:?}");
    // Ready means serving: the API answers at once.
    let health = curl(&[&format!("{}/v1/health", control.api())]);
    assert_eq!(health.status, 200, "{health:?}");

    // Under log = "warn" a CA rotation logs nothing; after SIGHUP with "info" it does.
    control.rotate_ca();
    assert!(!control.log().contains("rotated the mesh CA root"));
    write(dir.path(), "control.toml", &toml("info"));
    signal(control.child.id(), "HUP");
    let reload = notify.wait_for("READY=1", Duration::from_secs(10));
    assert!(has_line(&reload, "RELOADING=1"), "{reload:?}");
    control.rotate_ca();
    assert!(
        wait_until(Duration::from_secs(5), || control
            .log()
            .contains("rotated the mesh CA root")),
        "{}",
        control.log()
    );

    // A file that no longer parses changes nothing and stops nothing.
    write(dir.path(), "control.toml", "log = [\n");
    signal(control.child.id(), "HUP");
    notify.wait_for("READY=1", Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || control
            .log()
            .contains("config not reread")),
        "{}",
        control.log()
    );
    assert_eq!(curl(&[&format!("{}/v1/health", control.api())]).status, 200);

    signal(control.child.id(), "TERM");
    notify.wait_for("STOPPING=1", Duration::from_secs(10));
    let mut status = None;
    assert!(wait_until(Duration::from_secs(20), || {
        status = control.child.try_wait().unwrap();
        status.is_some()
    }));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", control.log());
}

#[test]
fn a_notify_socket_nobody_listens_on_is_logged_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "control.toml",
        &format!(
            "data_dir = \"{}\"\napi_addr = \"127.0.0.1:0\"\ngrpc_addr = \"127.0.0.1:0\"\n\
             dns_addr = \"127.0.0.1:0\"\ntls = false\nauth = \"none\"\n",
            dir.path().join("data").display()
        ),
    );
    let nobody = dir.path().join("no-manager-here");
    let control = Control::start(&config, dir.path(), nobody.to_str().unwrap());
    assert!(
        wait_until(Duration::from_secs(30), || control
            .log()
            .contains("cannot notify the service manager")),
        "{}",
        control.log()
    );
    let health = curl(&[&format!("{}/v1/health", control.api())]);
    assert_eq!(health.status, 200, "{health:?}");
}

#[test]
fn a_cluster_member_is_ready_only_once_the_cluster_has_formed() {
    let mut c = Cluster::configure(43, 3, 3);
    let notify = NotifySocket::new();
    c.spawn_env(0, &[], &[notify.env()]);
    notify.wait_for(
        "STATUS=starting: opening the state, forming or joining the cluster",
        Duration::from_secs(20),
    );
    // Alone, it waits for its peers, and says so; systemd hears nothing more.
    assert!(
        wait_until(Duration::from_secs(20), || c
            .log(0)
            .contains("waiting to form or join a cluster")),
        "{}",
        c.log(0)
    );
    let alone = notify.received_within(Duration::from_millis(300));
    assert!(!has_line(&alone, "READY=1"), "{alone:?}\n{}", c.log(0));
    c.spawn(1);
    c.spawn(2);
    notify.wait_for("READY=1", Duration::from_secs(30));
    let members = c.get(0, "/v1/members");
    assert_eq!(members.status, 200, "{members:?}");
    let voters = members.json()["members"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["role"] != "learner").count());
    assert_eq!(voters, Some(3), "{}", members.body);
}

/// Colors answered for `n` requests through the gateway (one curl, one connection).
fn split(gateway: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let url = format!("http://{gateway}/color");
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "%header{x-echo-name}\\n"]);
    for _ in 0..n {
        cmd.args(["-o", "/dev/null", &url]);
    }
    let out = cmd.output().unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        *counts.entry(name.to_string()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn the_demo_splits_by_weight_and_follows_a_weight_change_from_the_aws_cli() {
    // The gateway's port goes into its spec, so it cannot be 0: an address of its own.
    let gateway = format!("127.0.0.93:{}", free_port("127.0.0.93"));
    let mut node = DevNode::start_demo(&["--demo-gateway-addr".into(), gateway.clone()]);
    assert!(
        wait_until(Duration::from_secs(60), || node.stdout_lines().iter().any(
            |l| l == &format!("trellis dev demo ready: gateway=http://{gateway}")
        )),
        "{}\n{}",
        node.stdout_lines().join("\n"),
        node.stderr_log()
    );
    // It tells the newcomer what to run.
    let out = node.stdout_lines().join("\n");
    assert!(out.contains("aws appmesh update-route"), "{out}");

    // mTLS between all of them: red's proxy refuses a caller without a certificate.
    let red = node.aws_ok(&[
        "describe-virtual-node",
        "--mesh-name",
        "colorapp",
        "--virtual-node-name",
        "colorteller-red",
    ]);
    let port = red["virtualNode"]["spec"]["listeners"][0]["portMapping"]["port"].clone();
    let proxies = node.http_ok("GET", "/v1/proxies", None);
    let inbound = proxies["proxies"]
        .as_array()
        .and_then(|ps| {
            ps.iter()
                .find(|p| p["resource"].as_str() == Some("virtualNode/colorteller-red"))
        })
        .and_then(|p| p["address"].as_str())
        .unwrap_or_else(|| panic!("red's proxy is not connected: {proxies}"))
        .to_string();
    let plain = curl(&[
        "-H",
        &format!("x-trellis-target-port: {port}"),
        &format!("http://{inbound}/color"),
    ]);
    assert_eq!(plain.status, 403, "{plain:?}");
    assert!(plain.body.contains("plaintext refused"), "{}", plain.body);

    // The route starts at red 2, blue 1, white 1.
    let n = 800;
    let got = split(&gateway, n);
    assert_eq!(got.values().sum::<usize>(), n, "{got:?}");
    let share = |c: &str, got: &std::collections::BTreeMap<String, usize>| {
        *got.get(c).unwrap_or(&0) as f64 / n as f64
    };
    for (color, want) in [("red", 0.5), ("blue", 0.25), ("white", 0.25)] {
        let have = share(color, &got);
        assert!((have - want).abs() < 0.07, "{color}: {have} of {got:?}");
    }

    // The aws CLI changes the weights: red 0, blue 1, white 3.
    let spec = json!({"httpRoute": {"match": {"prefix": "/"}, "action": {"weightedTargets": [
        {"virtualNode": "colorteller-red", "weight": 0},
        {"virtualNode": "colorteller-blue", "weight": 1},
        {"virtualNode": "colorteller-white", "weight": 3}]}}});
    node.aws_ok(&[
        "update-route",
        "--mesh-name",
        "colorapp",
        "--virtual-router-name",
        "colorteller",
        "--route-name",
        "color",
        "--spec",
        &spec.to_string(),
    ]);
    assert!(
        wait_until(Duration::from_secs(10), || !split(&gateway, 20)
            .contains_key("red")),
        "red still answers after its weight went to 0"
    );
    let got = split(&gateway, n);
    assert_eq!(got.values().sum::<usize>(), n, "{got:?}");
    assert_eq!(share("red", &got), 0.0, "{got:?}");
    for (color, want) in [("blue", 0.25), ("white", 0.75)] {
        let have = share(color, &got);
        assert!((have - want).abs() < 0.07, "{color}: {have} of {got:?}");
    }

    // Ctrl-C stops everything: the process exits 0 and the gateway port is free again.
    signal(node.pid(), "INT");
    assert!(
        wait_until(Duration::from_secs(20), || !node.is_running()),
        "trellis dev --demo did not stop:\n{}",
        node.stderr_log()
    );
    assert_eq!(node.exit_code(), Some(0), "{}", node.stderr_log());
    assert!(std::net::TcpListener::bind(&gateway).is_ok());
}

#[test]
fn the_readme_runs_the_demo_this_file_tests() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let run = readme
        .split("## Run it")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.lines().next())
        .unwrap_or_default();
    // The test above runs the binary that command builds, with the same subcommand and flag.
    assert_eq!(run, "cargo run --release -- dev --demo");
    assert!(readme.contains("trellis dev demo ready: gateway=http://127.0.0.1:8080"));
}
