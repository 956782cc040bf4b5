//! `trellis echo` apps for the data-plane tests.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// `trellis echo` on `addr`, killed on drop.
pub struct Echo {
    child: Child,
    pub addr: String,
}

impl Echo {
    pub fn start(addr: &str, name: &str) -> Echo {
        Self::start_with(addr, name, &[])
    }

    /// With more flags (`--status 503`).
    pub fn start_with(addr: &str, name: &str, extra: &[&str]) -> Echo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["echo", "--listen", addr, "--name", name])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("trellis echo ready"), "{line}");
        Echo {
            child,
            addr: addr.to_string(),
        }
    }

    /// How many requests it has answered, asked directly.
    pub fn served(&self) -> u64 {
        let out = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "10",
                &format!("http://{}/__echo/served", self.addr),
            ])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["served"].as_u64().expect("echo answers with served")
    }

    /// Tells its health endpoint (`/__echo/health`, and gRPC Health) to pass or fail.
    pub fn set_healthy(&self, healthy: bool) {
        let body = if healthy { "healthy" } else { "unhealthy" };
        let got = curl(&[
            "-X",
            "PUT",
            "--data",
            body,
            &format!("http://{}/__echo/health", self.addr),
        ]);
        assert_eq!(got.status, if healthy { 200 } else { 503 }, "{got:?}");
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `curl` got: status (0 when no HTTP answer), body, exit code, stderr.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub body: String,
    pub exit: i32,
    pub stderr: String,
}

impl Got {
    /// The echo app's name, when an echo app answered.
    pub fn name(&self) -> Option<String> {
        serde_json::from_str::<Value>(&self.body)
            .ok()?
            .get("name")?
            .as_str()
            .map(str::to_string)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Runs curl with `args` (`-s`, a 20 s limit and the status code are added).
pub fn curl(args: &[&str]) -> Got {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Got {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_string(),
        exit: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
