//! mTLS between proxies. Both ends present the proxy's own certificate (renewed by
//! `identity`; each new handshake takes the current one, open connections keep theirs) and
//! trust the mesh CA's bundle. A caller checks the server by SAN, not by host name: the target
//! virtual node's SPIFFE id, or the client policy's `subjectAlternativeNames`; the inbound side
//! requires a client certificate and reads the caller's identity from it for the access check.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::identity::ProxyCert;
use crate::identity::ca::PkiError;
use crate::identity::{spiffe, tls};
use crate::model::proxy_config::ProxyRole;

/// ALPN for pooled HTTP/2 between proxies and for one-off HTTP/1.1 (upgrades, tunnels).
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_H1: &[u8] = b"http/1.1";

/// How long a new connection may take to send its first byte, and then its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a new connection opens with a TLS handshake (its first byte, peeked: 0x16);
/// `None` when it sends nothing in time or is gone.
pub async fn starts_tls(tcp: &TcpStream) -> Option<bool> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1)) => Some(first[0] == 0x16),
        _ => None,
    }
}

/// The server side of a TLS handshake, within [`HANDSHAKE_TIMEOUT`].
pub async fn accept(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, accept)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Why a TLS context could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("this proxy has no certificate (start it with --ca-file and --token-file)")]
    NoCertificate,
    #[error("{what} {path}: {error}")]
    File {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("{0}")]
    Pki(#[from] PkiError),
}

/// What a caller demands of one target's certificate (from the backend's client policy).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerTls {
    /// The server must carry one of these SANs; empty: the target node's SPIFFE id.
    pub sans: Vec<String>,
    /// The target (mesh, virtual node), for its SPIFFE id.
    pub mesh: String,
    pub virtual_node: String,
    /// Extra roots (client policy `validation.trust.file`), beside the mesh bundle.
    pub trust_file: Option<String>,
    /// A certificate to present instead of the mesh one (client policy `certificate.file`):
    /// (chain, key) paths.
    pub certificate_file: Option<(String, String)>,
}

/// Who called, as its certificate says.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// Over TLS with a verified client certificate.
    pub tls: bool,
    /// Every SAN of the certificate (URIs and DNS names).
    pub sans: Vec<String>,
    /// The caller's (mesh, role) when its SPIFFE id names one.
    pub role: Option<(String, ProxyRole)>,
}

impl Caller {
    pub fn from_certs(certs: &[CertificateDer<'_>]) -> Caller {
        let sans = certs.first().map(|c| sans(c.as_ref())).unwrap_or_default();
        let role = match tls::peer_spiffe(certs).and_then(|id| spiffe::parse(&id)) {
            Some(spiffe::Identity::Proxy { mesh, role, .. }) => Some((mesh, role)),
            _ => None,
        };
        Caller {
            tls: true,
            sans,
            role,
        }
    }

    /// The SPIFFE id, or what else names the caller, for messages.
    pub fn describe(&self) -> String {
        self.sans
            .iter()
            .find(|s| s.starts_with("spiffe://"))
            .or(self.sans.first())
            .cloned()
            .unwrap_or_else(|| "a caller without a certificate".into())
    }
}

/// The SANs (URI and DNS) of a DER certificate.
pub fn sans(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    cert.extensions()
        .iter()
        .filter_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(&san.general_names),
            _ => None,
        })
        .flatten()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

/// The proxy's TLS material: its certificate (from `identity`) and the mesh bundle (from the
/// config in force).
pub struct PeerIdentity {
    cert: watch::Receiver<Option<Arc<ProxyCert>>>,
    bundle: Mutex<String>,
    /// Extra roots inbound callers may chain to (listener `validation.trust.file`).
    client_roots: Mutex<Vec<String>>,
    server: Mutex<Option<(ServerKey, Arc<ServerConfig>)>>,
}

type ServerKey = (i64, String, Vec<String>);

impl PeerIdentity {
    pub fn new(cert: watch::Receiver<Option<Arc<ProxyCert>>>) -> Self {
        Self {
            cert,
            bundle: Mutex::new(String::new()),
            client_roots: Mutex::new(Vec::new()),
            server: Mutex::new(None),
        }
    }

    /// The bundle and extra client roots of a new config.
    pub fn set_trust(&self, bundle: &str, client_roots: Vec<String>) {
        *lock(&self.bundle) = bundle.to_string();
        *lock(&self.client_roots) = client_roots;
    }

    pub fn has_certificate(&self) -> bool {
        self.cert.borrow().is_some()
    }

    fn current(&self) -> Result<(Arc<ProxyCert>, String), TlsError> {
        let cert = self.cert.borrow().clone().ok_or(TlsError::NoCertificate)?;
        let bundle = lock(&self.bundle).clone();
        // Before the first config, the bundle that came with the certificate.
        let bundle = if bundle.is_empty() {
            cert.bundle_pem.clone()
        } else {
            bundle
        };
        Ok((cert, bundle))
    }

    fn trust_domain(cert: &ProxyCert) -> Option<String> {
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert.chain_pem.as_bytes()).ok();
        let id = tls::peer_spiffe(&[der?])?;
        match spiffe::parse(&id)? {
            spiffe::Identity::Proxy { trust_domain, .. }
            | spiffe::Identity::Control { trust_domain, .. } => Some(trust_domain),
        }
    }

    /// The inbound side: this proxy's certificate, client certificates required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let (cert, bundle) = self.current()?;
        let extra = lock(&self.client_roots).clone();
        let key: ServerKey = (cert.not_before, bundle.clone(), extra.clone());
        let mut cached = lock(&self.server);
        if let Some((k, c)) = cached.as_ref()
            && *k == key
        {
            return Ok(c.clone());
        }
        let mut roots = bundle;
        for path in &extra {
            roots.push_str(&read(path, "listener tls.validation.trust.file")?);
        }
        let config = tls::server_config(
            &cert.chain_pem,
            &cert.key_pem,
            Some(&roots),
            false,
            &[ALPN_H2, ALPN_H1],
        )?;
        *cached = Some((key, config.clone()));
        Ok(config)
    }

    /// A caller's config for one target.
    pub fn client_config(
        &self,
        peer: &PeerTls,
        alpn: &[u8],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let (cert, mut roots) = self.current()?;
        if let Some(path) = &peer.trust_file {
            roots.push_str(&read(path, "client policy tls.validation.trust.file")?);
        }
        let own;
        let presented = match &peer.certificate_file {
            Some((chain, key)) => {
                own = (
                    read(chain, "client policy tls.certificate.file.certificateChain")?,
                    read(key, "client policy tls.certificate.file.privateKey")?,
                );
                (own.0.as_str(), own.1.as_str())
            }
            None => (cert.chain_pem.as_str(), cert.key_pem.as_str()),
        };
        let base = tls::client_config(&roots, Some(presented), &[alpn])?;
        let accept = if peer.sans.is_empty() {
            let td = Self::trust_domain(&cert).unwrap_or_default();
            vec![spiffe::proxy_id(
                &td,
                &peer.mesh,
                &ProxyRole::VirtualNode(peer.virtual_node.clone()),
            )]
        } else {
            peer.sans.clone()
        };
        let roots = tls::root_store(&roots)?;
        let inner = WebPkiServerVerifier::builder_with_provider(roots, tls::provider())
            .build()
            .map_err(|e| PkiError::Sign(format!("tls verifier: {e}")))?;
        let mut config = (*base).clone();
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(SanVerifier { inner, accept }));
        Ok(Arc::new(config))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read(path: &str, what: &'static str) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|error| TlsError::File {
        what,
        path: path.to_string(),
        error,
    })
}

use rustls_pki_types::pem::PemObject;

/// The chain must reach the trusted roots (webpki); the name check is ours: one of `accept`
/// among the certificate's SANs, since peers are named by identity, not by address.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<WebPkiServerVerifier>,
    accept: Vec<String>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // webpki checks the chain before the name: a name mismatch means the chain is good.
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let have = sans(end_entity.as_ref());
        if self.accept.iter().any(|a| have.contains(a)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the peer's certificate names {have:?}, expected one of {:?}",
                self.accept
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
