//! The proxy's certificate: its key is made here and never leaves the data directory (0600);
//! the first certificate is bought with a join token, later ones are renewed with the current
//! certificate at two thirds of its lifetime. Certificate, key and trust bundle are kept in the
//! data directory, so a restarted proxy needs no token while its certificate is valid.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::identity::{ca, secret};
use crate::model::proxy_config::ProxyRole;
use crate::wire::identity::identity_client::IdentityClient;
use crate::wire::identity::{IssueRequest, RenewRequest, issue_request};

const KEY_FILE: &str = "key.pem";
const CERT_FILE: &str = "cert.pem";
const BUNDLE_FILE: &str = "bundle.pem";
/// Retry pace when no control node renews.
const RETRY: Duration = Duration::from_secs(5);

/// A certificate in force.
#[derive(Clone, PartialEq)]
pub struct ProxyCert {
    pub chain_pem: String,
    pub key_pem: String,
    pub bundle_pem: String,
    pub not_before: i64,
    pub not_after: i64,
    /// When this proxy got (or loaded) it: certificates are backdated for clock skew, so the
    /// useful lifetime starts here.
    pub received: i64,
}

impl std::fmt::Debug for ProxyCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyCert")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ProxyCert {
    /// When to renew: two thirds into the lifetime, counted from when it was received (the
    /// backdating would otherwise make short lifetimes renew at once, again and again).
    pub fn renew_at(&self) -> i64 {
        let start = self.not_before.max(self.received);
        start + (self.not_after - start) * 2 / 3
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no valid certificate in the data directory and no --token-file to get one")]
    NoToken,
    #[error("{0}")]
    Pki(#[from] ca::PkiError),
    #[error("control {control}: {message}")]
    Control { control: String, message: String },
    #[error("no control node answered: {0}")]
    Unreachable(String),
}

/// Where certificates come from.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub controls: Vec<String>,
    pub mesh: String,
    pub role: ProxyRole,
    pub data_dir: PathBuf,
    /// The mesh CA bundle that control nodes' certificates chain to; `None`: plaintext gRPC
    /// (dev mode on loopback).
    pub ca_bundle: Option<String>,
    pub token_file: Option<PathBuf>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The certificate kept in `dir`, if it is still valid and names this proxy's mesh and
/// virtual node or gateway: a data directory copied from, or shared with, another proxy must
/// not lend it that proxy's identity.
pub fn load(dir: &Path, mesh: &str, role: &ProxyRole) -> Option<ProxyCert> {
    let read = |f| std::fs::read_to_string(dir.join(f)).ok();
    let (chain_pem, key_pem, bundle_pem) = (read(CERT_FILE)?, read(KEY_FILE)?, read(BUNDLE_FILE)?);
    let info = ca::inspect(&chain_pem).ok()?;
    let ours = format!("/mesh/{mesh}/{}", role.resource_name());
    if !info
        .uris
        .iter()
        .any(|u| u.starts_with("spiffe://") && u.ends_with(&ours))
    {
        tracing::warn!(
            dir = %dir.display(),
            names = ?info.uris,
            want = %ours,
            "the certificate kept here is another proxy's; getting one of our own"
        );
        return None;
    }
    (info.not_after > now()).then_some(ProxyCert {
        chain_pem,
        key_pem,
        bundle_pem,
        not_before: info.not_before,
        not_after: info.not_after,
        received: now(),
    })
}

fn save(dir: &Path, cert: &ProxyCert) -> Result<(), IdentityError> {
    std::fs::create_dir_all(dir).map_err(|source| IdentityError::File {
        path: dir.to_path_buf(),
        source,
    })?;
    for (name, text, mode) in [
        (KEY_FILE, &cert.key_pem, 0o600),
        (CERT_FILE, &cert.chain_pem, 0o644),
        (BUNDLE_FILE, &cert.bundle_pem, 0o644),
    ] {
        let path = dir.join(name);
        secret::write_file(&path, text.as_bytes(), mode)
            .map_err(|source| IdentityError::File { path, source })?;
    }
    Ok(())
}

/// A gRPC endpoint for `control`: TLS pinned to the bundle (presenting `client` when given),
/// or plaintext without a bundle.
pub fn endpoint(
    control: &str,
    bundle: Option<&str>,
    client: Option<&ProxyCert>,
) -> Result<tonic::transport::Endpoint, String> {
    let scheme = if bundle.is_some() { "https" } else { "http" };
    let mut ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://{control}"))
        .map_err(|_| format!("invalid control address {control:?}"))?
        .connect_timeout(Duration::from_secs(3));
    if let Some(bundle) = bundle {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(bundle));
        if let Some(c) = client {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                &c.chain_pem,
                &c.key_pem,
            ));
        }
        ep = ep.tls_config(tls).map_err(|e| e.to_string())?;
    }
    Ok(ep)
}

/// Asks the control nodes in turn; the first answer wins.
async fn ask<F, Fut>(settings: &IdentitySettings, call: F) -> Result<ProxyCert, IdentityError>
where
    F: Fn(IdentityClient<tonic::transport::Channel>) -> Fut,
    Fut:
        Future<Output = Result<tonic::Response<crate::wire::identity::Certificate>, tonic::Status>>,
{
    let mut last = String::from("no control node configured");
    for control in &settings.controls {
        let ep = match endpoint(control, settings.ca_bundle.as_deref(), None) {
            Ok(ep) => ep,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let channel = match ep.connect().await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{control}: {e}");
                continue;
            }
        };
        match call(IdentityClient::new(channel)).await {
            Ok(r) => {
                let c = r.into_inner();
                let info = ca::inspect(&c.chain_pem)?;
                return Ok(ProxyCert {
                    chain_pem: c.chain_pem,
                    key_pem: String::new(),
                    bundle_pem: c.bundle_pem,
                    not_before: info.not_before,
                    not_after: info.not_after,
                    received: now(),
                });
            }
            // A refusal is an answer: another node would refuse too.
            Err(s) if s.code() != tonic::Code::Unavailable => {
                return Err(IdentityError::Control {
                    control: control.clone(),
                    message: format!("{}: {}", s.code(), s.message()),
                });
            }
            Err(s) => last = format!("{control}: {}", s.message()),
        }
    }
    Err(IdentityError::Unreachable(last))
}

/// Buys a certificate with the token in `--token-file`.
pub async fn obtain(settings: &IdentitySettings) -> Result<ProxyCert, IdentityError> {
    let path = settings.token_file.as_ref().ok_or(IdentityError::NoToken)?;
    let token = std::fs::read_to_string(path).map_err(|source| IdentityError::File {
        path: path.clone(),
        source,
    })?;
    let (key_pem, csr_pem) = ca::new_key_and_csr()?;
    let role = match &settings.role {
        ProxyRole::VirtualNode(n) => issue_request::Role::VirtualNode(n.clone()),
        ProxyRole::VirtualGateway(g) => issue_request::Role::VirtualGateway(g.clone()),
    };
    let request = IssueRequest {
        token: token.trim().to_string(),
        mesh: settings.mesh.clone(),
        role: Some(role),
        csr_pem,
    };
    let mut cert = ask(settings, |mut c| {
        let r = request.clone();
        async move { c.issue(r).await }
    })
    .await?;
    cert.key_pem = key_pem;
    save(&settings.data_dir, &cert)?;
    Ok(cert)
}

/// Renews `current` (same key: the CSR it signs proves possession).
pub async fn renew(
    settings: &IdentitySettings,
    current: &ProxyCert,
) -> Result<ProxyCert, IdentityError> {
    let csr_pem = ca::csr_for_key(&current.key_pem)?;
    let request = RenewRequest {
        certificate_pem: current.chain_pem.clone(),
        csr_pem,
    };
    let mut cert = ask(settings, |mut c| {
        let r = request.clone();
        async move { c.renew(r).await }
    })
    .await?;
    cert.key_pem = current.key_pem.clone();
    save(&settings.data_dir, &cert)?;
    Ok(cert)
}

/// Keeps `cert` current until `stop`: loads or obtains the first certificate (retrying while
/// no control node answers), then renews at two thirds of each lifetime.
pub async fn run(
    settings: IdentitySettings,
    cert: watch::Sender<Option<Arc<ProxyCert>>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), IdentityError> {
    let mut current = match load(&settings.data_dir, &settings.mesh, &settings.role) {
        Some(c) => c,
        None => loop {
            match obtain(&settings).await {
                Ok(c) => break c,
                Err(e @ IdentityError::Unreachable(_)) => {
                    tracing::warn!(error = %e, "no certificate yet; retrying");
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.changed() => return Ok(()),
            }
        },
    };
    tracing::info!(not_after = current.not_after, "certificate in place");
    cert.send_replace(Some(Arc::new(current.clone())));
    loop {
        let wait = (current.renew_at() - now()).max(0) as u64;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
            _ = stop.changed() => return Ok(()),
        }
        match renew(&settings, &current).await {
            Ok(c) => {
                tracing::info!(not_after = c.not_after, "certificate renewed");
                current = c;
                cert.send_replace(Some(Arc::new(current.clone())));
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewal failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_certificate_serves_only_the_proxy_it_names() {
        let root = ca::new_root(
            "trellis.local",
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let (key_pem, csr_pem) = ca::new_key_and_csr().unwrap();
        let chain_pem = ca::issue_leaf(
            &root,
            &csr_pem,
            &["spiffe://trellis.local/mesh/demo/virtualNode/red".to_string()],
            &[],
            SystemTime::now(),
            Duration::from_secs(600),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert = ProxyCert {
            chain_pem,
            key_pem,
            bundle_pem: root.cert_pem.clone(),
            not_before: 0,
            not_after: 0,
            received: 0,
        };
        save(dir.path(), &cert).unwrap();
        let red = ProxyRole::VirtualNode("red".into());
        assert!(load(dir.path(), "demo", &red).is_some());
        for (mesh, role) in [
            ("demo", ProxyRole::VirtualNode("blue".into())),
            ("demo", ProxyRole::VirtualNode("re".into())),
            ("other", red.clone()),
            ("demo", ProxyRole::VirtualGateway("red".into())),
        ] {
            assert!(load(dir.path(), mesh, &role).is_none(), "{mesh} {role:?}");
        }
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_useful_lifetime_despite_backdating() {
        let cert = |not_before, not_after, received| ProxyCert {
            chain_pem: String::new(),
            key_pem: String::new(),
            bundle_pem: String::new(),
            not_before,
            not_after,
            received,
        };
        // Issued at 1,000 for 12 s, backdated 300 s: renew at 1,008, not at once.
        assert_eq!(cert(700, 1_012, 1_000).renew_at(), 1_008);
        // A day-long certificate: two thirds of the day.
        assert_eq!(cert(0, 86_400, 0).renew_at(), 57_600);
    }
}
