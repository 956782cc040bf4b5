//! The proxy's admin server (127.0.0.1:9901 by default, as Envoy's): the shared `/live`,
//! `/ready` and `/metrics`, plus `/config` (the config in force, with its version) and
//! `/clusters` (each target's hosts: ejection state, errors in a row, requests in flight).
//! Ready means a config is applied and, where the proxy has an identity, a certificate is in
//! place. The config holds no secrets (private keys stay in the identity directory; TLS files
//! appear as paths), so it is shown whole.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::routing::get;
use tokio::sync::watch;

use super::dataplane::Routing;
use super::discovery::AppliedConfig;
use super::identity::ProxyCert;
use crate::telemetry::proxy::ProxyMetrics;

/// The admin router of a proxy.
pub fn router(
    metrics: Arc<ProxyMetrics>,
    config: watch::Receiver<Option<Arc<AppliedConfig>>>,
    routing: watch::Receiver<Arc<Routing>>,
    ready: watch::Receiver<bool>,
) -> Router {
    let shared = crate::admin::router(crate::admin::Metrics::new(metrics), ready);
    shared
        .route(
            "/config",
            get(move || {
                let applied = config.borrow().clone();
                async move {
                    Json(match applied {
                        Some(a) => serde_json::json!({"version": a.version, "config": a.config}),
                        None => serde_json::json!({"version": null, "config": null}),
                    })
                }
            }),
        )
        .route(
            "/clusters",
            get(move || {
                let view = routing.borrow().clusters_view();
                async move { Json(view) }
            }),
        )
}

/// Keeps `ready` true while a config is applied and, when `cert` is given, a certificate is
/// held; returns when both inputs close.
pub async fn track_readiness(
    mut config: watch::Receiver<Option<Arc<AppliedConfig>>>,
    mut cert: Option<watch::Receiver<Option<Arc<ProxyCert>>>>,
    ready: watch::Sender<bool>,
) {
    loop {
        let has_config = config.borrow_and_update().is_some();
        let has_cert = cert
            .as_mut()
            .is_none_or(|c| c.borrow_and_update().is_some());
        ready.send_if_modified(|r| {
            let now = has_config && has_cert;
            std::mem::replace(r, now) != now
        });
        let cert_changed = async {
            match cert.as_mut() {
                Some(c) => c.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = config.changed() => if changed.is_err() { return },
            alive = cert_changed => if !alive { cert = None },
        }
    }
}
