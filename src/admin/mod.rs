//! The small admin HTTP server both roles share: `/live` (the process answers), `/ready` (the
//! role says it can do its job), `/metrics` (the role's registry, OpenMetrics text). A role
//! merges its own routes into [`router`] (the proxy's `/config` and `/clusters`; the control
//! node serves these beside its API). Loopback by default, as Envoy's admin port: it shows the
//! mesh from inside.

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What `/metrics` encodes: a role's registry.
#[derive(Clone)]
pub struct Metrics(Arc<dyn AsRef<Registry> + Send + Sync>);

impl Metrics {
    pub fn new(registry: Arc<dyn AsRef<Registry> + Send + Sync>) -> Self {
        Self(registry)
    }

    /// The `/metrics` answer.
    pub fn render(&self) -> Response {
        let text = crate::telemetry::encode((*self.0).as_ref());
        (
            [(header::CONTENT_TYPE, crate::telemetry::CONTENT_TYPE)],
            text,
        )
            .into_response()
    }
}

/// `/live`, `/ready` (200 while `ready` holds true, 503 otherwise) and `/metrics`.
pub fn router(metrics: Metrics, ready: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route(
            "/ready",
            get(move || {
                let ready = *ready.borrow();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
        .route("/metrics", get(move || async move { metrics.render() }))
}

/// Serves `router` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, router: Router, mut stop: watch::Receiver<bool>) {
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(stopped)
        .await
    {
        tracing::warn!(error = %e, "admin server");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::proxy::ProxyMetrics;

    #[tokio::test]
    async fn live_ready_and_metrics_answer() {
        let m = ProxyMetrics::new("m", ("virtual_node", "n"));
        m.set_config_version(7);
        let (ready_tx, ready) = watch::channel(false);
        let (stop_tx, stop) = watch::channel(false);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(Metrics::new(m), ready);
        let server = tokio::spawn(serve(listener, app, stop));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/live").await.starts_with("HTTP/1.1 200"));
        assert!(get("/ready").await.starts_with("HTTP/1.1 503"));
        ready_tx.send_replace(true);
        assert!(get("/ready").await.starts_with("HTTP/1.1 200"));
        let metrics = get("/metrics").await;
        assert!(
            metrics.contains("trellis_proxy_config_version{mesh=\"m\",virtual_node=\"n\"} 7"),
            "{metrics}"
        );
        stop_tx.send_replace(true);
        server.await.unwrap();
    }
}
