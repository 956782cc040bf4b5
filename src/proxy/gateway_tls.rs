//! TLS on a virtual gateway's listeners (App Mesh's `tls` there): the gateway presents its own
//! certificate to clients outside the mesh. STRICT takes only TLS, PERMISSIVE both (told apart
//! by the first byte), DISABLED plaintext. `validation` asks clients for a certificate that
//! chains to the trust file and, with `subjectAlternativeNames`, carries one of them.
//! Certificates come from files; ACM and SDS sources do not exist off AWS and refuse the
//! config with a message that says so (the proxy keeps the config it has). HTTP/2 (as ALPN
//! agrees) is hyper's; HTTP/1.1 goes through `h1server` as on plaintext, whose own deadline
//! (408) and length rules (400) stand in for `guard`, which cannot peek through TLS.

use std::convert::Infallible;
use std::sync::Arc;

use http::Request;
use rustls::ServerConfig;
use tokio::net::TcpListener;

use super::access::Downstream;
use super::dataplane::{self, Shared};
use super::shard::Shards;
use super::tls::{self, ALPN_H1, ALPN_H2, Caller};
use super::{gateway, guard, stats};
use crate::identity::tls as pki;
use crate::model::proxy_config::GatewayListener;
use crate::model::shapes::VirtualGatewayListenerTlsMode as Mode;
use crate::telemetry::proxy::{ConnectionGuard, Direction, ListenerKind};

/// A gateway listener's TLS, loaded.
pub struct GatewayTls {
    pub mode: Mode,
    config: Arc<ServerConfig>,
    /// A client certificate must carry one of these SANs (empty: any that chains).
    client_sans: Vec<String>,
}

/// Why a gateway listener's `tls` cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("virtualGateway listener {port}: tls.{field}: {message}")]
pub struct GatewayTlsError {
    pub port: u16,
    pub field: &'static str,
    pub message: String,
}

impl GatewayTls {
    /// Loads the listener's certificate (and trust) from their files; `None` without `tls`.
    pub fn load(l: &GatewayListener) -> Result<Option<Arc<Self>>, GatewayTlsError> {
        let Some(tls) = &l.tls else { return Ok(None) };
        let err = |field: &'static str, message: String| GatewayTlsError {
            port: l.port,
            field,
            message,
        };
        let read = |field: &'static str, path: &str| {
            std::fs::read_to_string(path).map_err(|e| err(field, format!("{path}: {e}")))
        };
        let file = match (&tls.certificate.file, &tls.certificate.acm) {
            (Some(f), _) => f,
            (None, Some(_)) => {
                return Err(err(
                    "certificate.acm",
                    "ACM certificates exist only inside AWS: give the certificate as a file".into(),
                ));
            }
            (None, None) => {
                return Err(err(
                    "certificate.sds",
                    "no SDS agent serves trellis proxies: give the certificate as a file".into(),
                ));
            }
        };
        let chain = read("certificate.file.certificateChain", &file.certificate_chain)?;
        let key = read("certificate.file.privateKey", &file.private_key)?;
        let (roots, client_sans) = match &tls.validation {
            None => (None, Vec::new()),
            Some(v) => {
                let Some(trust) = &v.trust.file else {
                    return Err(err(
                        "validation.trust.sds",
                        "no SDS agent serves trellis proxies: give the trust as a file".into(),
                    ));
                };
                let roots = read(
                    "validation.trust.file.certificateChain",
                    &trust.certificate_chain,
                )?;
                let sans = v
                    .subject_alternative_names
                    .as_ref()
                    .map(|s| s.r#match.exact.clone())
                    .unwrap_or_default();
                (Some(roots), sans)
            }
        };
        let config = pki::server_config(&chain, &key, roots.as_deref(), false, &[ALPN_H2, ALPN_H1])
            .map_err(|e| err("certificate.file", e.to_string()))?;
        Ok(Some(Arc::new(Self {
            mode: tls.mode,
            config,
            client_sans,
        })))
    }
}

/// Serves a gateway listener on `port` until aborted, with the TLS its config says at the time
/// each connection arrives.
pub async fn serve(shards: Shards<Shared>, listener: TcpListener, port: u16) {
    let connections = shards.first().metrics.connections(ListenerKind::Gateway);
    loop {
        let (tcp, from) = dataplane::accept(&listener).await;
        let open = ConnectionGuard::new(connections.clone());
        shards.place(tcp, move |shared, tcp| async move {
            let _open = open;
            let tls = shared
                .routing
                .borrow()
                .gateway
                .get(&port)
                .and_then(|g| g.tls.clone())
                .filter(|t| t.mode != Mode::Disabled);
            let drain = shared.drain.clone();
            let metrics = shared.metrics.clone();
            let downstream = shared.downstream(&tcp, from, None);
            let handler = move |mut req: Request<super::upstream::Body>| {
                Downstream::attach(&downstream, &mut req);
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(gateway::request(&shared, port, req).await) }
            };
            let Some(tls) = tls else {
                return dataplane::serve_plain(drain, tcp, handler).await;
            };
            let Some(is_tls) = tls::starts_tls(&tcp).await else {
                return;
            };
            if !is_tls {
                if tls.mode == Mode::Permissive {
                    return dataplane::serve_plain(drain, tcp, handler).await;
                }
                let why = format!("gateway listener {port} is STRICT: connect with TLS (https)");
                return guard::refuse(tcp, 400, &why).await;
            }
            let stream = match tls::accept(tls.config.clone(), tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%from, port, error = %e, "gateway TLS handshake refused");
                    metrics.tls_handshake_failed(Direction::Gateway, stats::tls_failure_reason(&e));
                    return;
                }
            };
            if !tls.client_sans.is_empty() {
                let caller =
                    Caller::from_certs(stream.get_ref().1.peer_certificates().unwrap_or_default());
                if !caller.sans.iter().any(|s| tls.client_sans.contains(s)) {
                    tracing::info!(%from, port, sans = ?caller.sans, "gateway client certificate has none of the required SANs");
                    return;
                }
            }
            if stream.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
                let io = hyper_util::rt::TokioIo::new(stream);
                dataplane::serve_connection(drain, io, handler).await;
            } else {
                dataplane::serve_http1(drain, stream, handler).await;
            }
        });
    }
}
