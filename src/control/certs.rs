//! The `Identity` gRPC service every control node serves: proxies buy their first certificate
//! with a join token and renew it with the current one (see `ca`). Refusals are
//! PERMISSION_DENIED (token or certificate) or INVALID_ARGUMENT (request or CSR), with the
//! reason.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::ca;
use super::raft::Consensus;
use crate::model::proxy_config::ProxyRole;
use crate::model::{ApiError, ErrorKind};
use crate::telemetry::control::ControlMetrics;
use crate::wire::identity::identity_server::{Identity, IdentityServer};
use crate::wire::identity::{Certificate, IssueRequest, RenewRequest, issue_request};

/// Largest CSR or certificate accepted, in bytes: a P-256 CSR is well under 1 KiB.
const MAX_PEM: usize = 16 * 1024;

#[derive(Clone)]
pub struct Certs {
    consensus: Consensus,
    lifetime: Duration,
    metrics: Arc<ControlMetrics>,
}

impl Certs {
    pub fn new(consensus: Consensus, lifetime: Duration, metrics: Arc<ControlMetrics>) -> Self {
        Self {
            consensus,
            lifetime,
            metrics,
        }
    }

    pub fn into_service(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }
}

fn status(e: ApiError) -> Status {
    match e.kind {
        ErrorKind::Forbidden => Status::permission_denied(e.message),
        ErrorKind::NotFound => Status::not_found(e.message),
        ErrorKind::ServiceUnavailable => Status::unavailable(e.message),
        _ => Status::invalid_argument(e.message),
    }
}

fn answer(issued: ca::Issued) -> Response<Certificate> {
    Response::new(Certificate {
        chain_pem: issued.chain_pem,
        bundle_pem: issued.bundle_pem,
        not_after: issued.not_after,
    })
}

fn check_size(field: &str, pem: &str) -> Result<(), Status> {
    if pem.is_empty() || pem.len() > MAX_PEM {
        return Err(Status::invalid_argument(format!(
            "{field}: must be 1 to {MAX_PEM} bytes of PEM"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Identity for Certs {
    async fn issue(&self, req: Request<IssueRequest>) -> Result<Response<Certificate>, Status> {
        let r = req.into_inner();
        check_size("csr_pem", &r.csr_pem)?;
        let role = match r.role {
            Some(issue_request::Role::VirtualNode(n)) => ProxyRole::VirtualNode(n),
            Some(issue_request::Role::VirtualGateway(g)) => ProxyRole::VirtualGateway(g),
            None => {
                return Err(Status::invalid_argument(
                    "role: name a virtual_node or a virtual_gateway",
                ));
            }
        };
        let issued = ca::issue_with_token(
            &self.consensus,
            &r.token,
            &r.mesh,
            &role,
            &r.csr_pem,
            self.lifetime,
        )
        .await
        .map_err(status)?;
        tracing::info!(mesh = %r.mesh, role = ?role, "issued a proxy certificate");
        self.metrics.certificate_issued("proxy");
        Ok(answer(issued))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<Certificate>, Status> {
        let r = req.into_inner();
        check_size("certificate_pem", &r.certificate_pem)?;
        check_size("csr_pem", &r.csr_pem)?;
        let issued = ca::renew(
            &self.consensus,
            &r.certificate_pem,
            &r.csr_pem,
            self.lifetime,
        )
        .map_err(status)?;
        self.metrics.certificate_issued("proxy_renewal");
        Ok(answer(issued))
    }
}
