use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::StatusCode;
use tokio::net::TcpListener;

use super::*;
use crate::model::proxy_config::{InboundListener, ProxyConfig, ProxyRole, Timeouts};
use crate::model::shapes::EgressFilterType;
use crate::wire::health::HealthCheckResponse;
use crate::wire::health::health_server::{Health as HealthService, HealthServer};

fn policy(protocol: PortProtocol, path: Option<&str>) -> HealthCheckPolicy {
    HealthCheckPolicy {
        healthy_threshold: 2,
        unhealthy_threshold: 3,
        interval_millis: 5000,
        path: path.map(str::to_string),
        port: None,
        protocol,
        timeout_millis: 2000,
    }
}

fn check(addr: SocketAddr, protocol: PortProtocol, path: Option<&str>) -> Check {
    Check {
        addr,
        policy: policy(protocol, path),
    }
}

/// An app on a free port answering GET /health with 200 while `up` is set, else 503; over
/// HTTP/1.1 and h2c alike.
async fn http_app(up: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            let up = up.clone();
            async move {
                if up.load(Ordering::SeqCst) {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[test]
fn one_success_makes_a_new_app_healthy_then_thresholds_apply() {
    let mut t = Tracker::new(&policy(PortProtocol::Tcp, None));
    assert_eq!(t.state(), Health::Unknown);
    assert_eq!(t.record(false), Health::Unhealthy);
    assert_eq!(t.record(false), Health::Unhealthy);
    // Never healthy yet: one pass is enough.
    assert_eq!(t.record(true), Health::Healthy);
    // unhealthyThreshold 3: two failures are not enough, and a success resets the count.
    assert_eq!(t.record(false), Health::Healthy);
    assert_eq!(t.record(false), Health::Healthy);
    assert_eq!(t.record(true), Health::Healthy);
    assert_eq!(t.record(false), Health::Healthy);
    assert_eq!(t.record(false), Health::Healthy);
    assert_eq!(t.record(false), Health::Unhealthy);
    // healthyThreshold 2 from now on.
    assert_eq!(t.record(true), Health::Unhealthy);
    assert_eq!(t.record(false), Health::Unhealthy);
    assert_eq!(t.record(true), Health::Unhealthy);
    assert_eq!(t.record(true), Health::Healthy);
}

#[test]
fn the_instance_is_healthy_only_when_every_listener_is() {
    use Health::*;
    assert!(verdict(&[], false));
    assert!(verdict(&[Healthy, Healthy], false));
    assert!(!verdict(&[Healthy, Unhealthy], true));
    assert!(!verdict(&[Unknown, Unhealthy], true));
    // Unknown listeners keep the previous verdict.
    assert!(verdict(&[Healthy, Unknown], true));
    assert!(!verdict(&[Healthy, Unknown], false));
}

#[tokio::test]
async fn tcp_probe_passes_on_a_listening_port_and_fails_on_a_closed_one() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = listener.local_addr().unwrap();
    probe(&check(open, PortProtocol::Tcp, None)).await.unwrap();
    drop(listener);
    let err = probe(&check(open, PortProtocol::Tcp, None))
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Connect(_)), "{err}");
}

#[tokio::test]
async fn http_and_h2c_probes_want_200() {
    let up = Arc::new(AtomicBool::new(true));
    let addr = http_app(up.clone()).await;
    for protocol in [PortProtocol::Http, PortProtocol::Http2] {
        probe(&check(addr, protocol, Some("/health")))
            .await
            .unwrap();
        let err = probe(&check(addr, protocol, Some("/missing")))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Status(404)), "{err}");
    }
    up.store(false, Ordering::SeqCst);
    let err = probe(&check(addr, PortProtocol::Http, Some("/health")))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "status 503 (200 expected)");
    let err = probe(&check(addr, PortProtocol::Http, Some("health")))
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Path { .. }), "{err}");
}

#[tokio::test]
async fn a_probe_that_gets_no_answer_times_out() {
    // Accepts connections (the kernel does) but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut c = check(listener.local_addr().unwrap(), PortProtocol::Http, None);
    c.policy.timeout_millis = 100;
    let err = probe(&c).await.unwrap_err();
    assert_eq!(err.to_string(), "no answer within 100 ms");
}

struct GrpcApp(Arc<AtomicBool>);

#[tonic::async_trait]
impl HealthService for GrpcApp {
    async fn check(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let status = if self.0.load(Ordering::SeqCst) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        Ok(tonic::Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }

    type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, tonic::Status>>;

    async fn watch(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("no watching here"))
    }
}

#[tokio::test]
async fn grpc_probe_speaks_the_grpc_health_protocol() {
    let up = Arc::new(AtomicBool::new(true));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(HealthServer::new(GrpcApp(up.clone())))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    probe(&check(addr, PortProtocol::Grpc, None)).await.unwrap();
    up.store(false, Ordering::SeqCst);
    let err = probe(&check(addr, PortProtocol::Grpc, None))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProbeError::NotServing(ServingStatus::NotServing)),
        "{err}"
    );
}

fn config_checking(port: u16, mut policy: HealthCheckPolicy) -> AppliedConfig {
    policy.interval_millis = 20;
    policy.timeout_millis = 500;
    AppliedConfig {
        version: 1,
        config: ProxyConfig {
            mesh: "m".into(),
            role: ProxyRole::VirtualNode("n".into()),
            egress_filter: EgressFilterType::DropAll,
            inbound: vec![InboundListener {
                port,
                protocol: PortProtocol::Http,
                timeouts: Timeouts::default(),
                connection_pool: None,
                health_check: Some(policy),
                tls: None,
            }],
            outbound: vec![],
            clusters: vec![],
            access_log: None,
            gateway: None,
            trust_bundle: String::new(),
            allowed_callers: Vec::new(),
        },
    }
}

async fn wait_for(rx: &mut watch::Receiver<bool>, want: bool) {
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|h| *h == want))
        .await
        .unwrap_or_else(|_| panic!("health never became {want}"))
        .unwrap();
}

#[tokio::test]
async fn run_follows_the_app_and_the_config() {
    let up = Arc::new(AtomicBool::new(true));
    let addr = http_app(up.clone()).await;
    let (config_tx, config_rx) = watch::channel(None);
    let (healthy_tx, mut healthy) = watch::channel(true);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(config_rx, healthy_tx, addr.ip(), stop_rx));

    config_tx.send_replace(Some(Arc::new(config_checking(
        addr.port(),
        policy(PortProtocol::Http, Some("/health")),
    ))));
    up.store(false, Ordering::SeqCst);
    wait_for(&mut healthy, false).await;
    up.store(true, Ordering::SeqCst);
    wait_for(&mut healthy, true).await;

    // A config whose check fails (wrong path) turns it unhealthy; one without checks, healthy.
    config_tx.send_replace(Some(Arc::new(config_checking(
        addr.port(),
        policy(PortProtocol::Http, Some("/nope")),
    ))));
    wait_for(&mut healthy, false).await;
    let mut plain = config_checking(addr.port(), policy(PortProtocol::Tcp, None));
    plain.config.inbound[0].health_check = None;
    config_tx.send_replace(Some(Arc::new(plain)));
    wait_for(&mut healthy, true).await;

    stop_tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
