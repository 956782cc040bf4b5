//! Clusters of real `trellis control` processes for the tests: node i listens on its own
//! loopback address 127.0.<net>.<i> (ports probed free on that address), every node's
//! `control.toml` names the others in `retry_join`, and the harness kills (SIGKILL), stops
//! (SIGTERM), pauses (SIGSTOP) and restarts nodes on the same data directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::echo::{Got, curl};
use super::{CleanEnv, wait_until};

pub struct ClusterNode {
    pub id: u64,
    pub api: SocketAddr,
    pub grpc: SocketAddr,
    pub dns: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    dir: tempfile::TempDir,
    /// With TLS: the cluster CA the API is checked against.
    ca: Option<PathBuf>,
}

impl Cluster {
    /// `n` nodes with `bootstrap_expect = n`, on 127.0.`net`.1…n, all started.
    pub fn start(net: u8, n: u64) -> Cluster {
        let mut c = Self::configure(net, n, n as usize);
        for i in 0..c.nodes.len() {
            c.spawn(i);
        }
        c
    }

    /// Writes the configs without starting anything.
    pub fn configure(net: u8, n: u64, expect: usize) -> Cluster {
        Self::configure_with(net, n, expect, false)
    }

    /// With `tls`: a cluster CA made by `trellis ca create`, `tls = true` and the CA files in
    /// every config; the API is then https.
    pub fn configure_with(net: u8, n: u64, expect: usize, tls: bool) -> Cluster {
        Self::configure_extra(net, n, expect, tls, "")
    }

    /// Like `configure_with`, with more top-level `control.toml` lines.
    pub fn configure_extra(net: u8, n: u64, expect: usize, tls: bool, extra: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("trellis-cluster-")
            .tempdir()
            .unwrap();
        let addrs: Vec<(SocketAddr, SocketAddr, SocketAddr)> = (1..=n)
            .map(|i| {
                let ip = format!("127.0.{net}.{i}");
                let port = || SocketAddr::new(ip.parse().unwrap(), super::free_port(&ip));
                (port(), port(), port())
            })
            .collect();
        let peers: Vec<String> = addrs.iter().map(|(_, g, _)| format!("\"{g}\"")).collect();
        let ca_dir = dir.path().join("ca");
        let tls_toml = if tls {
            let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
                .args(["ca", "create", "--out"])
                .arg(&ca_dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            format!(
                "tls = true\nca_cert_file = \"{}\"\nca_key_file = \"{}\"\n",
                ca_dir.join("ca.pem").display(),
                ca_dir.join("ca.key").display()
            )
        } else {
            "tls = false\n".to_string()
        };
        let nodes = addrs
            .iter()
            .enumerate()
            .map(|(i, (api, grpc, dns))| {
                let id = i as u64 + 1;
                let config = dir.path().join(format!("n{id}.toml"));
                let toml = format!(
                    "node_id = {id}\ndata_dir = \"{data}\"\napi_addr = \"{api}\"\n\
                     grpc_addr = \"{grpc}\"\ndns_addr = \"{dns}\"\n{tls_toml}auth = \"none\"\n\
                     bootstrap_expect = {expect}\nretry_join = [{peers}]\n{extra}\
                     log = \"info,openraft=warn,sled=warn\"\n[quotas]\nmeshes = 1000\n",
                    data = dir.path().join(format!("n{id}")).display(),
                    peers = peers.join(", ")
                );
                std::fs::write(&config, toml).unwrap();
                ClusterNode {
                    id,
                    api: *api,
                    grpc: *grpc,
                    dns: *dns,
                    config,
                    log: dir.path().join(format!("n{id}.log")),
                    child: None,
                }
            })
            .collect();
        let ca = tls.then(|| ca_dir.join("ca.pem"));
        Cluster { nodes, dir, ca }
    }

    /// Starts node `i` (0-based) on its data directory, with `extra` flags.
    pub fn spawn_with(&mut self, i: usize, extra: &[&str]) {
        self.spawn_env(i, extra, &[]);
    }

    /// Starts node `i` with `extra` flags and `envs` added to its environment.
    pub fn spawn_env(&mut self, i: usize, extra: &[&str], envs: &[(&str, &str)]) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .arg("control")
            .arg("--config")
            .arg(&node.config)
            .args(extra)
            .env("TRELLIS_FAULT_INJECTION", "1")
            .env_clear_trellis()
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn trellis control");
        node.child = Some(child);
    }

    pub fn spawn(&mut self, i: usize) {
        self.spawn_with(i, &[]);
    }

    /// Waits until every running node answers its health check.
    pub fn wait_serving(&self, timeout: Duration) {
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child.is_none() {
                continue;
            }
            let ok = wait_until(timeout, || self.get(i, "/v1/health").status == 200);
            assert!(ok, "node {} never served:\n{}", n.id, self.log(i));
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.nodes[i].api)
    }

    /// The cluster CA (TLS clusters).
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.ca.as_deref()
    }

    fn curl(&self, args: &[&str]) -> Got {
        let mut all: Vec<&str> = Vec::new();
        let ca = self.ca.as_ref().map(|p| p.display().to_string());
        if let Some(ca) = &ca {
            all.extend(["--cacert", ca.as_str()]);
        }
        all.extend(args);
        curl(&all)
    }

    pub fn get(&self, i: usize, path: &str) -> Got {
        self.curl(&["-m", "15", &self.url(i, path)])
    }

    pub fn delete(&self, i: usize, path: &str) -> Got {
        self.curl(&["-m", "15", "-X", "DELETE", &self.url(i, path)])
    }

    /// `PUT path` with a JSON body through node `i`.
    pub fn put(&self, i: usize, path: &str, body: &Value) -> Got {
        let body = body.to_string();
        self.curl(&[
            "-m",
            "15",
            "-X",
            "PUT",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            &self.url(i, path),
        ])
    }

    /// The members as node `i` reports them.
    pub fn members(&self, i: usize) -> Vec<Value> {
        let got = self.get(i, "/v1/members");
        got.json()["members"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The index of the node every running node agrees leads, if they do.
    pub fn leader(&self) -> Option<usize> {
        let mut seen = None;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child.is_none() {
                continue;
            }
            let m = self.members(i);
            let leader = m
                .iter()
                .find(|m| m["role"] == "leader")
                .and_then(|m| m["id"].as_u64())?;
            if seen.is_some_and(|s| s != leader) {
                return None;
            }
            seen = Some(leader);
        }
        let id = seen?;
        self.nodes.iter().position(|n| n.id == id)
    }

    pub fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.nodes[i].child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(&mut self, i: usize) -> Option<i32> {
        self.signal(i, "TERM");
        let mut c = self.nodes[i].child.take()?;
        c.wait().ok().and_then(|s| s.code())
    }

    /// Sends SIGTERM to node `i` and waits up to `within` for it to exit: its exit code, or
    /// `None` if it is still running (then it is killed).
    pub fn stop_within(&mut self, i: usize, within: Duration) -> Option<i32> {
        self.signal(i, "TERM");
        let mut c = self.nodes[i].child.take()?;
        let mut code = None;
        let exited = wait_until(within, || match c.try_wait() {
            Ok(Some(status)) => {
                code = status.code();
                true
            }
            _ => false,
        });
        if !exited {
            let _ = c.kill();
            let _ = c.wait();
        }
        code
    }

    /// Cuts node `i` off from the others: every node drops raft RPCs across the cut.
    pub fn partition(&self, i: usize) {
        let id = self.nodes[i].id;
        for (j, n) in self.nodes.iter().enumerate() {
            if n.child.is_none() {
                continue;
            }
            let cut: Vec<u64> = if j == i {
                self.nodes
                    .iter()
                    .map(|n| n.id)
                    .filter(|x| *x != id)
                    .collect()
            } else {
                vec![id]
            };
            let got = self.put(j, "/v1/debug/faults", &serde_json::json!({ "cut": cut }));
            assert_eq!(got.status, 200, "{got:?}");
        }
    }

    pub fn heal(&self) {
        for (j, n) in self.nodes.iter().enumerate() {
            if n.child.is_some() {
                self.put(j, "/v1/debug/faults", &serde_json::json!({ "cut": [] }));
            }
        }
    }

    pub fn data_root(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.signal(i, "CONT");
            self.kill(i);
        }
    }
}
