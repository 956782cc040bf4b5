//! The control side of the mesh CA: creates the root at bootstrap (the first proposal wins,
//! so every node agrees on one), the admin access key, this node's own TLS certificate,
//! root rotation, and proxy certificates — bought with a join token (spent through raft, so a
//! token's uses hold across nodes) or renewed with the current certificate (proof of
//! possession: the CSR is signed by the certificate's key).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::raft::Consensus;
use crate::identity::ca;
use crate::identity::{secret, spiffe};
use crate::model::proxy_config::ProxyRole;
use crate::model::security::{AccessKey, SecurityCommand};
use crate::model::{ApiError, Command, ErrorKind};

/// Roots live ten years; rotation is an operator's choice, not a deadline.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Control nodes make themselves a new certificate at every start.
const NODE_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// The admin key's credentials file, in the data directory.
pub const ADMIN_CREDENTIALS: &str = "admin-credentials";
/// The URI SAN that ties a proxy certificate to the token that bought it (for revocation).
const TOKEN_URN: &str = "urn:trellis:token:";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}")]
    Pki(#[from] crate::identity::ca::PkiError),
    #[error("{0}")]
    Secret(#[from] secret::SecretError),
    #[error("proposing to raft: {0}")]
    Raft(String),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the mesh CA has no root yet")]
    NoRoot,
    #[error("ca_cert_file: this cluster already has a CA root, and it is not this one")]
    ForeignRoot,
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn propose(consensus: &Consensus, cmd: SecurityCommand) -> Result<Value, CaError> {
    consensus
        .write(Command::Security(cmd))
        .await
        .map_err(|e| CaError::Raft(e.to_string()))?
        .map_err(|e| CaError::Raft(e.message))
}

/// Creates the mesh root if the cluster has none: `given` (the cluster CA from files) or a new
/// one. A cluster that has a root already must have `given` among its roots.
pub async fn ensure_root(
    consensus: &Consensus,
    trust_domain: &str,
    given: Option<&ca::RootCa>,
) -> Result<(), CaError> {
    let roots: Vec<String> = consensus.read(|s| {
        s.security()
            .roots()
            .iter()
            .map(|r| r.cert_pem.clone())
            .collect()
    });
    if !roots.is_empty() {
        return match given {
            Some(g) if !roots.contains(&g.cert_pem) => Err(CaError::ForeignRoot),
            _ => Ok(()),
        };
    }
    let root = match given {
        Some(g) => g.clone(),
        None => ca::new_root(trust_domain, SystemTime::now(), ROOT_LIFETIME)?,
    };
    propose(
        consensus,
        SecurityCommand::CaInit {
            trust_domain: trust_domain.to_string(),
            root,
        },
    )
    .await?;
    tracing::info!(
        trust_domain,
        from_files = given.is_some(),
        "the mesh CA root is in place"
    );
    Ok(())
}

/// Reads the cluster CA from `cert` and `key` (PEM files).
pub fn root_from_files(cert: &Path, key: &Path) -> Result<ca::RootCa, CaError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| CaError::File {
            path: p.to_path_buf(),
            source,
        })
    };
    Ok(ca::root_from_pem(&read(cert)?, &read(key)?)?)
}

/// A new cluster CA for `trellis ca create`: certificate and key PEM.
pub fn create_root(trust_domain: &str) -> Result<ca::RootCa, CaError> {
    Ok(ca::new_root(
        trust_domain,
        SystemTime::now(),
        ROOT_LIFETIME,
    )?)
}

/// This node's control-node certificate from `root` directly (no raft needed): what a
/// clustered node presents to its peers before it belongs to a cluster.
pub fn node_certificate_from(
    root: &ca::RootCa,
    trust_domain: &str,
    node_id: u64,
    names: &[String],
    ips: &[IpAddr],
) -> Result<(String, String), CaError> {
    let uri = spiffe::control_id(trust_domain, node_id);
    Ok(ca::issue_node_cert(
        root,
        &uri,
        names,
        ips,
        SystemTime::now(),
        NODE_CERT_LIFETIME,
    )?)
}

/// With SigV4 on and no access key yet, creates the admin key and writes it (0600) to
/// `<data_dir>/admin-credentials`; returns it so the caller can print it once.
pub async fn ensure_admin_key(
    consensus: &Consensus,
    data_dir: &Path,
) -> Result<Option<(String, String)>, CaError> {
    if consensus.read(|s| s.security().keys().next().is_some()) {
        return Ok(None);
    }
    let (id, secret) = secret::new_access_key()?;
    let path = data_dir.join(ADMIN_CREDENTIALS);
    let text = format!(
        "# trellis admin key (created at bootstrap)\n[trellis]\naws_access_key_id = {id}\naws_secret_access_key = {secret}\n"
    );
    secret::write_file(&path, text.as_bytes(), 0o600).map_err(|source| CaError::File {
        path: path.clone(),
        source,
    })?;
    propose(
        consensus,
        SecurityCommand::KeyCreate(AccessKey {
            id: id.clone(),
            secret: secret.clone(),
            read_only: false,
            created_at: epoch(SystemTime::now()),
            description: "admin (bootstrap)".into(),
        }),
    )
    .await?;
    Ok(Some((id, secret)))
}

/// The trust bundle's file in the data directory (public; for operators to compare with what
/// `trellis ca show` fetched).
pub const BUNDLE_FILE: &str = "ca.pem";

/// Writes the current trust bundle to `<data_dir>/ca.pem`.
pub fn write_bundle(consensus: &Consensus, data_dir: &Path) -> Result<(), CaError> {
    let bundle = consensus.read(|s| s.security().bundle_pem());
    let path = data_dir.join(BUNDLE_FILE);
    std::fs::write(&path, bundle).map_err(|source| CaError::File { path, source })
}

/// This node's TLS certificate and key (PEM), from the signing root, for the API and gRPC.
pub fn node_certificate(
    consensus: &Consensus,
    node_id: u64,
    names: &[String],
    ips: &[IpAddr],
) -> Result<(String, String), CaError> {
    let (root, trust_domain) = consensus.read(|s| {
        let sec = s.security();
        (sec.signing_root().cloned(), sec.trust_domain.clone())
    });
    let root = root.ok_or(CaError::NoRoot)?;
    let uri = spiffe::control_id(&trust_domain, node_id);
    let (cert, key) = ca::issue_node_cert(
        &root,
        &uri,
        names,
        ips,
        SystemTime::now(),
        NODE_CERT_LIFETIME,
    )?;
    Ok((cert, key))
}

/// Rotates the root: a new one signs from now on, cross-signed by the current one.
pub async fn rotate(consensus: &Consensus) -> Result<Value, CaError> {
    let (old, trust_domain) = consensus.read(|s| {
        let sec = s.security();
        (sec.signing_root().cloned(), sec.trust_domain.clone())
    });
    let old = old.ok_or(CaError::NoRoot)?;
    let now = SystemTime::now();
    let new = ca::new_root(&trust_domain, now, ROOT_LIFETIME)?;
    let cross = ca::cross_sign(&new, &old, now)?;
    let out = propose(
        consensus,
        SecurityCommand::CaRotate {
            root: new,
            cross_cert_pem: cross,
            now: epoch(now),
        },
    )
    .await?;
    tracing::info!("rotated the mesh CA root");
    Ok(out)
}

/// A proxy certificate and what the proxy needs beside it.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, then (after a rotation) the cross-signed certificate of its root.
    pub chain_pem: String,
    pub bundle_pem: String,
    pub not_after: i64,
}

/// Trades a join token and a CSR for a certificate of `role` in `mesh`.
pub async fn issue_with_token(
    consensus: &Consensus,
    token: &str,
    mesh: &str,
    role: &ProxyRole,
    csr_pem: &str,
    lifetime: Duration,
) -> Result<Issued, ApiError> {
    let (_, hash) = secret::token_hash(token).map_err(|e| ApiError::forbidden(e.to_string()))?;
    // Refuse a bad CSR before spending a use of the token.
    ca::check_csr(csr_pem).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let redeemed = consensus
        .write(Command::Security(SecurityCommand::TokenRedeem {
            hash,
            mesh: mesh.to_string(),
            role: role.clone(),
            now: epoch(SystemTime::now()),
        }))
        .await
        .map_err(|e| ApiError::new(ErrorKind::ServiceUnavailable, e.to_string()))??;
    let token_id = redeemed["id"].as_str().unwrap_or_default().to_string();
    sign(consensus, mesh, role, &token_id, csr_pem, lifetime)
}

/// Renews a proxy certificate: `cert_pem` must be a current certificate of this CA and the CSR
/// must be signed by its key; the token that bought it must not be revoked and the node must
/// still exist.
pub fn renew(
    consensus: &Consensus,
    cert_pem: &str,
    csr_pem: &str,
    lifetime: Duration,
) -> Result<Issued, ApiError> {
    let bundle = consensus.read(|s| s.security().bundle_pem());
    let info = ca::verify_leaf(cert_pem, &bundle, SystemTime::now())
        .map_err(|e| ApiError::forbidden(format!("certificate: {e}")))?;
    ca::check_possession(cert_pem, csr_pem)
        .map_err(|e| ApiError::forbidden(format!("csr: {e}")))?;
    let Some(spiffe::Identity::Proxy { mesh, role, .. }) =
        info.uris.iter().find_map(|u| spiffe::parse(u))
    else {
        return Err(ApiError::forbidden(
            "certificate: not a proxy certificate of this mesh",
        ));
    };
    let token_id = info
        .uris
        .iter()
        .find_map(|u| u.strip_prefix(TOKEN_URN))
        .unwrap_or_default()
        .to_string();
    let (revoked, exists) = consensus.read(|s| {
        let revoked = s.security().tokens().any(|t| t.id == token_id && t.revoked);
        (revoked, s.find_role(&mesh, &role))
    });
    if revoked {
        return Err(ApiError::forbidden(format!(
            "token {token_id} was revoked: the certificate cannot be renewed"
        )));
    }
    if !exists {
        return Err(ApiError::forbidden(format!(
            "{} in mesh {mesh} no longer exists",
            role.resource_name()
        )));
    }
    sign(consensus, &mesh, &role, &token_id, csr_pem, lifetime)
}

fn sign(
    consensus: &Consensus,
    mesh: &str,
    role: &ProxyRole,
    token_id: &str,
    csr_pem: &str,
    lifetime: Duration,
) -> Result<Issued, ApiError> {
    let (root, trust_domain, bundle, cross, hostname) = consensus.read(|s| {
        let sec = s.security();
        (
            sec.signing_root().cloned(),
            sec.trust_domain.clone(),
            sec.bundle_pem(),
            sec.cross_certs().last().cloned(),
            s.role_hostname(mesh, role),
        )
    });
    let root =
        root.ok_or_else(|| ApiError::new(ErrorKind::ServiceUnavailable, "no CA root yet"))?;
    let uris = [
        spiffe::proxy_id(&trust_domain, mesh, role),
        format!("{TOKEN_URN}{token_id}"),
    ];
    let dns: Vec<String> = hostname.into_iter().collect();
    let leaf = ca::issue_leaf(&root, csr_pem, &uris, &dns, SystemTime::now(), lifetime)
        .map_err(|e| ApiError::bad_request(format!("csr: {e}")))?;
    let info = ca::inspect(&leaf).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut chain_pem = leaf;
    if let Some(c) = cross {
        chain_pem.push_str(&c);
    }
    Ok(Issued {
        chain_pem,
        bundle_pem: bundle,
        not_after: info.not_after,
    })
}
