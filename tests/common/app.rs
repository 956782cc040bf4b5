//! A stand-in for the app beside a proxy: a plain HTTP/1.1 server on 127.0.0.1 whose
//! `/health` answers 200 or 503 as the test says.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

pub struct App {
    pub addr: SocketAddr,
    healthy: Arc<AtomicBool>,
}

impl App {
    /// Listens on a free port of 127.0.0.1, healthy.
    pub fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let h = h.clone();
                thread::spawn(move || {
                    let mut reader = BufReader::new(&stream);
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    // Skip the headers.
                    let mut header = String::new();
                    while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                        header.clear();
                    }
                    let ok = h.load(Ordering::SeqCst) && line.starts_with("GET /health ");
                    let status = if ok {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                    let _ = (&stream).write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    );
                });
            }
        });
        App { addr, healthy }
    }

    pub fn set_healthy(&self, up: bool) {
        self.healthy.store(up, Ordering::SeqCst);
    }
}
