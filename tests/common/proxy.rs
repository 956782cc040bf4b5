//! Runs the real `trellis proxy` binary for the tests: ready line, logs, SIGTERM and SIGKILL.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::Value;

use super::{CleanEnv, wait_until};

pub struct Proxy {
    child: Option<Child>,
    data_dir: PathBuf,
    log: tempfile::NamedTempFile,
    stdout: Arc<Mutex<Vec<String>>>,
    /// How the process ended, once it has.
    exit: Option<std::process::ExitStatus>,
}

impl Proxy {
    /// Starts a proxy for `role` (`--virtual-node NAME` or `--virtual-gateway NAME`).
    pub fn start(
        control: SocketAddr,
        mesh: &str,
        role: [&str; 2],
        data_dir: &Path,
        advertise: &str,
    ) -> Proxy {
        // Tests run side by side, each with its own control plane handing out the same VIPs.
        Self::start_with(
            control,
            mesh,
            role,
            data_dir,
            advertise,
            &["--no-vip-listeners"],
        )
    }

    /// Like `start`, with more flags (`--ca-file`, `--token-file` …), and the backends' VIP
    /// listeners bound unless `extra` says `--no-vip-listeners`.
    pub fn start_with(
        control: SocketAddr,
        mesh: &str,
        role: [&str; 2],
        data_dir: &Path,
        advertise: &str,
        extra: &[&str],
    ) -> Proxy {
        let mut args: Vec<String> = [
            "--control",
            &control.to_string(),
            "--mesh",
            mesh,
            role[0],
            role[1],
            "--data-dir",
            &data_dir.display().to_string(),
            "--advertise-addr",
            advertise,
            "--inbound-addr",
            &format!("{advertise}:0"),
            "--outbound-addr",
            &format!("{advertise}:0"),
            "--admin-addr",
            &format!("{advertise}:0"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(&args, &[], data_dir)
    }

    /// `trellis proxy ARGS…` with `envs` added to its environment; `data_dir` is where the
    /// args put its data.
    pub fn spawn(args: &[String], envs: &[(&str, &str)], data_dir: &Path) -> Proxy {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .env_clear_trellis()
            .arg("proxy")
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.reopen().unwrap()))
            .spawn()
            .expect("spawn trellis proxy");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        Proxy {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            log,
            stdout: lines,
            exit: None,
        }
    }

    /// Waits for `trellis proxy ready: version=N` and returns N.
    pub fn wait_ready(&self, timeout: Duration) -> u64 {
        let mut version = None;
        let ok = wait_until(timeout, || {
            version = self
                .stdout
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| l.strip_prefix("trellis proxy ready: version="))
                .and_then(|v| v.trim().parse().ok());
            version.is_some()
        });
        assert!(ok, "proxy not ready:\n{}", self.log());
        version.unwrap()
    }

    /// The (inbound, explicit outbound) addresses the proxy bound.
    pub fn listening(&self) -> (SocketAddr, SocketAddr) {
        let mut found = None;
        let ok = wait_until(Duration::from_secs(20), || {
            found = self.stdout.lock().unwrap().iter().find_map(|l| {
                let rest = l.strip_prefix("trellis proxy listening: inbound=")?;
                let (inbound, outbound) = rest.split_once(" outbound=")?;
                Some((inbound.parse().ok()?, outbound.trim().parse().ok()?))
            });
            found.is_some()
        });
        assert!(ok, "proxy never listened:\n{}", self.log());
        found.unwrap()
    }

    /// The admin server's address (`/metrics`, `/ready`, `/clusters` …).
    pub fn admin(&self) -> SocketAddr {
        let mut found = None;
        let ok = wait_until(Duration::from_secs(20), || {
            found = self.stdout.lock().unwrap().iter().find_map(|l| {
                l.strip_prefix("trellis proxy admin: http://")?
                    .trim()
                    .parse()
                    .ok()
            });
            found.is_some()
        });
        assert!(ok, "no admin server:\n{}", self.log());
        found.unwrap()
    }

    /// How many endpoints the cached config has for virtual node `node` (all nodes: `None`).
    pub fn endpoints(&self, node: Option<&str>) -> usize {
        self.cached().map_or(0, |c| {
            c["config"]["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|cl| node.is_none_or(|n| cl["virtual_node"] == n))
                .map(|cl| cl["endpoints"].as_array().map_or(0, Vec::len))
                .sum()
        })
    }

    /// The config the proxy cached (its last good one).
    pub fn cached(&self) -> Option<Value> {
        let bytes = std::fs::read(self.data_dir.join("config.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// SIGTERM: the proxy says goodbye and exits.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
    }

    /// Waits up to `timeout` for the process to exit; true when it has.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let Some(c) = self.child.as_mut() else {
            return true;
        };
        let mut status = None;
        let exited = wait_until(timeout, || {
            status = c.try_wait().ok().flatten();
            status.is_some()
        });
        if exited {
            self.child = None;
            self.exit = status;
        }
        exited
    }

    /// The exit code, once `wait_exit` saw the process end (None: still running, or killed
    /// by a signal).
    pub fn exit_code(&self) -> Option<i32> {
        self.exit.and_then(|s| s.code())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the proxy vanishes without a word.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A join token for virtual node `vn` of mesh demo, written to `<dir>/<vn>.token`.
pub fn token(api: &str, vn: &str, dir: &Path) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["token", "create", "--endpoint", api])
        .args(["--mesh", "demo", "--virtual-node", vn])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join(format!("{vn}.token"));
    std::fs::write(&path, String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    path
}

/// A proxy for virtual node `vn` of mesh demo with a certificate (a join token), its app on
/// `ip`, its data in `<dir>/<vn>`, no VIP listeners, and `extra` flags.
pub fn with_certificate(
    control: SocketAddr,
    api: &str,
    vn: &str,
    ip: &str,
    dir: &Path,
    extra: &[&str],
) -> Proxy {
    let token = token(api, vn, dir);
    let mut args = vec![
        "--no-vip-listeners",
        "--app-host",
        ip,
        "--token-file",
        token.to_str().unwrap(),
    ];
    args.extend(extra);
    Proxy::start_with(
        control,
        "demo",
        ["--virtual-node", vn],
        &dir.join(vn),
        ip,
        &args,
    )
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}
