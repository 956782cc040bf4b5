//! Durability: SIGKILL the control node in the middle of a stream of concurrent writes, restart
//! it on the same data directory, and check that every acknowledged write is there with (at
//! least) the version it was acknowledged with, and that nothing appears that was never written.
//! Three kill/restart rounds on one directory.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::DevNode;
use serde_json::{Value, json};

/// A keep-alive HTTP/1.1 connection; enough of a client to drive writes quickly.
struct Conn {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Conn {
    fn open(api: &str) -> std::io::Result<Conn> {
        let host = api.trim_start_matches("http://").to_string();
        let s = TcpStream::connect(&host)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(Conn {
            stream: BufReader::new(s),
            host,
        })
    }

    /// Sends one request; `Err` when the connection broke (the node died).
    fn send(&mut self, method: &str, path: &str, body: &Value) -> std::io::Result<(u16, Value)> {
        let body = body.to_string();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(req.as_bytes())?;
        let mut status_line = String::new();
        if self.stream.read_line(&mut status_line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut buf = vec![0; len];
        self.stream.read_exact(&mut buf)?;
        Ok((status, serde_json::from_slice(&buf).unwrap_or(Value::Null)))
    }
}

/// What the writers were told, per virtual node: the highest acknowledged version, and every
/// name a writer tried to create.
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<String, i64>,
    attempted: BTreeSet<String>,
}

fn spec(i: usize) -> Value {
    json!({"listeners": [{"portMapping": {"port": 8000 + (i % 1000) as i64, "protocol": "http"}}],
           "serviceDiscovery": {"dns": {"hostname": format!("n{i}.d.local")}}})
}

/// Each writer creates its own virtual nodes and updates each twice, until the connection dies.
fn writer(
    api: String,
    round: usize,
    id: usize,
    ledger: Arc<Mutex<Ledger>>,
    acks: Arc<AtomicUsize>,
) {
    let Ok(mut conn) = Conn::open(&api) else {
        return;
    };
    // Four writers stay under App Mesh's quota of 200 virtual nodes per mesh: a writer that
    // got this far before the kill just stops.
    for i in 0..45 {
        let name = format!("r{round}-w{id}-n{i:05}");
        ledger.lock().unwrap().attempted.insert(name.clone());
        let create = json!({"virtualNodeName": name, "spec": spec(i)});
        match conn.send("PUT", "/v20190125/meshes/d/virtualNodes", &create) {
            Ok((200, body)) => {
                assert_eq!(body["metadata"]["version"], 1);
                ledger.lock().unwrap().acked.insert(name.clone(), 1);
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Ok((status, body)) => panic!("create {name}: {status} {body}"),
            Err(_) => return,
        }
        for _ in 0..2 {
            let path = format!("/v20190125/meshes/d/virtualNodes/{name}");
            match conn.send("PUT", &path, &json!({"spec": spec(i + 1)})) {
                Ok((200, body)) => {
                    let v = body["metadata"]["version"].as_i64().unwrap();
                    ledger.lock().unwrap().acked.insert(name.clone(), v);
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                Ok((status, body)) => panic!("update {name}: {status} {body}"),
                Err(_) => return,
            }
        }
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let data = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    {
        let node = DevNode::start_in(data.path());
        node.http_ok("PUT", "/v20190125/meshes", Some(&json!({"meshName": "d"})));
    }
    for round in 0..3 {
        let mut node = DevNode::start_in(data.path());
        let acks = Arc::new(AtomicUsize::new(0));
        let writers: Vec<_> = (0..4)
            .map(|id| {
                let (api, ledger, acks) =
                    (node.api_url().to_string(), ledger.clone(), acks.clone());
                thread::spawn(move || writer(api, round, id, ledger, acks))
            })
            .collect();
        // Kill at a different point each round, always while writes are in flight: watched
        // every millisecond (a fast node makes hundreds of writes in wait_until's pauses).
        let kill_after = 150 + round * 97;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while acks.load(Ordering::SeqCst) < kill_after {
            assert!(
                std::time::Instant::now() < deadline,
                "writers made no progress: {}",
                node.stderr_log()
            );
            thread::sleep(Duration::from_millis(1));
        }
        node.kill();
        for w in writers {
            w.join().expect("writer panicked");
        }

        let node = DevNode::start_in(data.path());
        let stored: BTreeMap<String, i64> =
            node.aws_ok(&["list-virtual-nodes", "--mesh-name", "d"])["virtualNodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["virtualNodeName"].as_str().unwrap().to_string(),
                        r["version"].as_i64().unwrap(),
                    )
                })
                .collect();
        let mut book = ledger.lock().unwrap();
        for (name, version) in &book.acked {
            let got = stored
                .get(name)
                .unwrap_or_else(|| panic!("round {round}: acknowledged {name} is gone"));
            assert!(
                got >= version,
                "round {round}: {name} acknowledged at version {version}, stored {got}"
            );
            assert!(
                *got <= 3,
                "round {round}: {name} has version {got}, more than was written"
            );
        }
        for name in stored.keys() {
            assert!(
                book.attempted.contains(name),
                "round {round}: {name} was never written"
            );
        }
        assert!(book.acked.len() >= kill_after / 3);
        eprintln!(
            "round {round}: {} acknowledged writes, {} nodes stored",
            acks.load(Ordering::SeqCst),
            stored.len()
        );
        // The quota of 200 virtual nodes per mesh would stop the next round: start from empty.
        for name in stored.keys() {
            node.http_ok(
                "DELETE",
                &format!("/v20190125/meshes/d/virtualNodes/{name}"),
                None,
            );
        }
        book.acked.clear();
    }
}
