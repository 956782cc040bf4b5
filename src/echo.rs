//! `trellis echo`: the built-in test server. It answers every HTTP/1.1 or h2c request with a
//! JSON description of what it received (its own name, method, path, query, protocol version,
//! headers, body size), and can be told to misbehave per request: `x-echo-status: 503` answers
//! with that status, `x-echo-delay-ms: 250` waits first; `--status` sets the status of every
//! answer that asks for none. Each answer carries `served`, how many requests this server has
//! answered (this one included), so a test can count the attempts that reached it. For the
//! demo, for tests, and for users debugging a mesh.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::json;
use tokio::net::TcpListener;

/// Longest delay a request may ask for.
const MAX_DELAY: Duration = Duration::from_secs(60);

/// A running echo server.
pub struct Echo {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    /// Binds `addr` (port 0 picks one) and serves until dropped; answers `status` unless a
    /// request asks for another.
    pub async fn start(addr: SocketAddr, name: &str, status: u16) -> std::io::Result<Echo> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let status = http::StatusCode::from_u16(status).map_err(std::io::Error::other)?;
        let name = Arc::new(Server {
            name: name.to_string(),
            status,
            served: AtomicU64::new(0),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| answer(name.clone(), req));
                    let _ = Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Ok(Echo { addr, task })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Server {
    name: String,
    status: http::StatusCode,
    served: AtomicU64,
}

async fn answer(
    server: Arc<Server>,
    req: http::Request<Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let header = |k: &str| {
        req.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let status = header("x-echo-status")
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| http::StatusCode::from_u16(s).ok())
        .unwrap_or(server.status);
    let served = server.served.fetch_add(1, Ordering::Relaxed) + 1;
    let name = &server.name;
    let delay = header("x-echo-delay-ms").map(Duration::from_millis);
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(String::from_utf8_lossy(v.as_bytes()))))
        .collect();
    let (method, path, query, version) = (
        req.method().to_string(),
        req.uri().path().to_string(),
        req.uri().query().map(str::to_string),
        format!("{:?}", req.version()),
    );
    let body_bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    if let Some(d) = delay {
        tokio::time::sleep(d.min(MAX_DELAY)).await;
    }
    let body = json!({
        "name": name,
        "served": served,
        "method": method,
        "path": path,
        "query": query,
        "protocol": version,
        "headers": headers,
        "bodyBytes": body_bytes,
    });
    let mut resp = http::Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = http::HeaderValue::from_str(name) {
        resp.headers_mut().insert("x-echo-name", v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        h2: bool,
    ) -> (u16, serde_json::Value) {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = http::Request::get(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(http_body_util::Empty::<Bytes>::new()).unwrap();
        let resp = if h2 {
            let (mut s, c) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(c);
            s.send_request(req).await.unwrap()
        } else {
            let (mut s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(c);
            s.send_request(req).await.unwrap()
        };
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn it_says_what_it_received_and_misbehaves_on_request() {
        let echo = Echo::start("127.0.0.1:0".parse().unwrap(), "red", 200)
            .await
            .unwrap();
        let (status, body) = get(echo.addr, "/color?x=1", &[("x-trace", "abc")], false).await;
        assert_eq!(status, 200);
        assert_eq!(body["name"], "red");
        assert_eq!(body["path"], "/color");
        assert_eq!(body["query"], "x=1");
        assert_eq!(body["protocol"], "HTTP/1.1");
        assert_eq!(body["headers"]["x-trace"], "abc");
        let (_, body) = get(echo.addr, "/", &[], true).await;
        assert_eq!(body["protocol"], "HTTP/2.0");
        let (status, _) = get(echo.addr, "/", &[("x-echo-status", "503")], false).await;
        assert_eq!(status, 503);
        let t = std::time::Instant::now();
        get(echo.addr, "/", &[("x-echo-delay-ms", "100")], false).await;
        assert!(t.elapsed() >= Duration::from_millis(100));
    }
}
