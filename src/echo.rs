//! `trellis echo`: the built-in test server. It answers every HTTP/1.1 or h2c request with a
//! JSON description of what it received (its own name, method, path, query, protocol version,
//! headers, body size), and can be told to misbehave per request: `x-echo-status: 503` answers
//! with that status, `x-echo-delay-ms: 250` waits first; `--status` sets the status of every
//! answer that asks for none. Each answer carries `served`, how many requests this server has
//! answered (this one included; `GET /__echo/served` asks without counting), so a test can
//! count the attempts that reached it; `/__echo/health` is a health endpoint that can be told
//! to fail ([`HEALTH_PATH`]). For the
//! demo, for tests, and for users debugging a mesh.
//!
//! It also speaks gRPC: the Health service (`Check` answers SERVING, or UNAVAILABLE for the
//! service name `unavailable`; `Watch` streams five answers, 50 ms apart, then ends) and
//! `trellis.echo.v1.Echo` (`Chat` answers each message of a stream as it arrives, `Count`
//! counts a client's stream); every answer names the server in `x-echo-name`. And
//! WebSocket (an upgrade on any path; text and binary messages come back as sent).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::echo::echo_server::{Echo as EchoService, EchoServer};
use crate::wire::echo::{EchoCount, EchoMessage};
use crate::wire::health::health_check_response::ServingStatus;
use crate::wire::health::health_server::{Health, HealthServer};
use crate::wire::health::{HealthCheckRequest, HealthCheckResponse};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::json;
use tokio::net::TcpListener;

/// A request here reports `served` without counting itself.
pub const SERVED_PATH: &str = "/__echo/served";

/// A health endpoint, not counted either: `GET` answers 200 while healthy and 503 when not;
/// `PUT` with the body `unhealthy` or `healthy` flips it (gRPC Health `Check` then answers
/// NOT_SERVING or SERVING), so a listener's `healthCheck` can be seen to fail and recover
/// while the app keeps serving.
pub const HEALTH_PATH: &str = "/__echo/health";

/// gRPC answers name the server in this header.
pub const NAME_HEADER: &str = "x-echo-name";

/// Longest delay a request may ask for.
const MAX_DELAY: Duration = Duration::from_secs(60);

/// A running echo server.
pub struct Echo {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    /// Binds `addr` (port 0 picks one) and serves until dropped; answers `status` after
    /// `delay` unless a request asks for another.
    pub async fn start(
        addr: SocketAddr,
        name: &str,
        status: u16,
        delay: Duration,
    ) -> std::io::Result<Echo> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let status = http::StatusCode::from_u16(status).map_err(std::io::Error::other)?;
        let name = Arc::new(Server {
            name: name.to_string(),
            status,
            delay,
            served: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let name = name.clone();
                        async move {
                            if is_grpc(&req) {
                                use tower::Service;
                                let mut resp = if req.uri().path().starts_with(ECHO_SERVICE) {
                                    EchoServer::new(EchoStreams(name.clone())).call(req).await
                                } else {
                                    HealthServer::new(EchoHealth(name.clone())).call(req).await
                                }
                                .unwrap_or_else(|e| match e {});
                                // gRPC answers carry no JSON, so the name rides in a header.
                                if let Ok(v) = http::HeaderValue::from_str(&name.name) {
                                    resp.headers_mut().insert(NAME_HEADER, v);
                                }
                                Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
                            } else if is_websocket(&req) {
                                Ok(websocket(req))
                            } else if req.uri().path() == HEALTH_PATH {
                                Ok(health(&name, req).await)
                            } else {
                                answer(name, req).await
                            }
                        }
                    });
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
    delay: Duration,
    served: AtomicU64,
    healthy: AtomicBool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type EchoBody = UnsyncBoxBody<Bytes, BoxError>;

fn full(b: impl Into<Bytes>) -> EchoBody {
    Full::new(b.into()).map_err(|n| match n {}).boxed_unsync()
}

fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| crate::model::grpc::is_grpc_content_type(v.as_bytes()))
}

fn is_websocket<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

struct EchoHealth(Arc<Server>);

#[tonic::async_trait]
impl Health for EchoHealth {
    async fn check(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.0.served.fetch_add(1, Ordering::Relaxed);
        if req.get_ref().service == "unavailable" {
            return Err(tonic::Status::unavailable(format!(
                "{} was asked to be unavailable",
                self.0.name
            )));
        }
        let status = if self.0.healthy.load(Ordering::Relaxed) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        Ok(tonic::Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }

    type WatchStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>,
    >;

    async fn watch(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        self.0.served.fetch_add(1, Ordering::Relaxed);
        let stream = futures_util::stream::unfold(0u32, |n| async move {
            if n == WATCH_ANSWERS {
                return None;
            }
            if n > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let answer = HealthCheckResponse {
                status: ServingStatus::Serving as i32,
            };
            Some((Ok(answer), n + 1))
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// The path prefix of `trellis.echo.v1.Echo`'s methods.
const ECHO_SERVICE: &str = "/trellis.echo.v1.Echo/";

struct EchoStreams(Arc<Server>);

#[tonic::async_trait]
impl EchoService for EchoStreams {
    type ChatStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<EchoMessage, tonic::Status>> + Send>,
    >;

    async fn chat(
        &self,
        req: tonic::Request<tonic::Streaming<EchoMessage>>,
    ) -> Result<tonic::Response<Self::ChatStream>, tonic::Status> {
        use futures_util::StreamExt;
        self.0.served.fetch_add(1, Ordering::Relaxed);
        let from = self.0.name.clone();
        let answers = req.into_inner().map(move |m| {
            m.map(|m| EchoMessage {
                text: m.text,
                from: from.clone(),
            })
        });
        Ok(tonic::Response::new(Box::pin(answers)))
    }

    async fn count(
        &self,
        req: tonic::Request<tonic::Streaming<EchoMessage>>,
    ) -> Result<tonic::Response<EchoCount>, tonic::Status> {
        self.0.served.fetch_add(1, Ordering::Relaxed);
        let mut stream = req.into_inner();
        let mut count = EchoCount {
            from: self.0.name.clone(),
            ..EchoCount::default()
        };
        while let Some(m) = stream.message().await? {
            count.messages += 1;
            count.bytes += m.text.len() as u64;
        }
        Ok(tonic::Response::new(count))
    }
}

/// How many answers a `Watch` streams.
pub const WATCH_ANSWERS: u32 = 5;

/// RFC 6455's accept key for a client's `Sec-WebSocket-Key`.
pub fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

fn websocket(mut req: http::Request<Incoming>) -> http::Response<EchoBody> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut r = http::Response::new(full("missing Sec-WebSocket-Key\n"));
        *r.status_mut() = http::StatusCode::BAD_REQUEST;
        return r;
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(io) = upgrade.await {
            let _ = echo_frames(TokioIo::new(io)).await;
        }
    });
    let mut r = http::Response::new(full(""));
    *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&websocket_accept(key.as_bytes())) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

/// Reads client frames (masked) and sends their payloads back unmasked, until a close frame.
async fn echo_frames<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> std::io::Result<()> {
    loop {
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await?;
        let opcode = head[0] & 0x0f;
        let len = match head[1] & 0x7f {
            126 => u64::from(io.read_u16().await?),
            127 => io.read_u64().await?,
            n => u64::from(n),
        };
        if len > 1 << 20 {
            return Ok(());
        }
        let mut mask = [0u8; 4];
        if head[1] & 0x80 != 0 {
            io.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        io.read_exact(&mut payload).await?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&payload);
        io.write_all(&out).await?;
        if opcode == 0x8 {
            return Ok(());
        }
    }
}

/// [`HEALTH_PATH`]: the state, or (`PUT`) a new one.
async fn health(server: &Server, req: http::Request<Incoming>) -> http::Response<EchoBody> {
    let reply = |status: http::StatusCode, text: &str| {
        let mut r = http::Response::new(full(format!("{text}\n")));
        *r.status_mut() = status;
        r
    };
    if req.method() == http::Method::PUT {
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let healthy = match body.as_deref().map(<[u8]>::trim_ascii) {
            Ok(b"healthy") => true,
            Ok(b"unhealthy") => false,
            _ => {
                return reply(
                    http::StatusCode::BAD_REQUEST,
                    "PUT /__echo/health wants the body `healthy` or `unhealthy`",
                );
            }
        };
        server.healthy.store(healthy, Ordering::Relaxed);
    }
    if server.healthy.load(Ordering::Relaxed) {
        reply(http::StatusCode::OK, "healthy")
    } else {
        reply(http::StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    }
}

async fn answer(
    server: Arc<Server>,
    req: http::Request<Incoming>,
) -> Result<http::Response<EchoBody>, Infallible> {
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
    // Asking for the count is not counted.
    let served = if req.uri().path() == SERVED_PATH {
        server.served.load(Ordering::Relaxed)
    } else {
        server.served.fetch_add(1, Ordering::Relaxed) + 1
    };
    let name = &server.name;
    let delay = header("x-echo-delay-ms")
        .map(Duration::from_millis)
        .unwrap_or(server.delay);
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
    if !delay.is_zero() {
        tokio::time::sleep(delay.min(MAX_DELAY)).await;
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
    let mut resp = http::Response::new(full(body.to_string()));
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
        let echo = Echo::start("127.0.0.1:0".parse().unwrap(), "red", 200, Duration::ZERO)
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

    /// One HTTP/1.1 request; the status and body.
    async fn send(addr: SocketAddr, method: &str, path: &str, body: &'static str) -> (u16, String) {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(c);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "echo")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let resp = s.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn its_health_endpoint_can_be_told_to_fail_and_recover() {
        use crate::wire::health::health_client::HealthClient;
        let echo = Echo::start("127.0.0.1:0".parse().unwrap(), "red", 200, Duration::ZERO)
            .await
            .unwrap();
        let mut grpc = HealthClient::connect(format!("http://{}", echo.addr))
            .await
            .unwrap();
        let mut grpc_status = async || {
            let ask = HealthCheckRequest {
                service: String::new(),
            };
            grpc.check(ask).await.unwrap().into_inner().status()
        };
        assert_eq!(send(echo.addr, "GET", HEALTH_PATH, "").await.0, 200);
        assert_eq!(grpc_status().await, ServingStatus::Serving);
        let (status, said) = send(echo.addr, "PUT", HEALTH_PATH, "sick").await;
        assert_eq!(status, 400);
        assert!(said.contains("`healthy` or `unhealthy`"), "{said}");
        assert_eq!(
            send(echo.addr, "PUT", HEALTH_PATH, "unhealthy\n").await.0,
            503
        );
        assert_eq!(send(echo.addr, "GET", HEALTH_PATH, "").await.0, 503);
        assert_eq!(grpc_status().await, ServingStatus::NotServing);
        // The app itself still answers; the health endpoint is not counted.
        let (status, body) = get(echo.addr, "/", &[], false).await;
        assert_eq!((status, body["served"].as_u64()), (200, Some(3)));
        assert_eq!(send(echo.addr, "PUT", HEALTH_PATH, "healthy").await.0, 200);
        assert_eq!(grpc_status().await, ServingStatus::Serving);
    }
}
