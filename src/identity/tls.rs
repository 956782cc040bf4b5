//! rustls configurations from the mesh CA's PEMs, always on the ring provider (one crypto
//! provider in the binary): servers present a chain and may require client certificates that
//! chain to the bundle; clients trust only the bundle and may present their own.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::ca::PkiError;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| PkiError::Certificate)?;
    if certs.is_empty() {
        return Err(PkiError::Certificate);
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::CaKey)
}

/// A root store of every certificate in `pem`.
pub fn root_store(pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut store = RootCertStore::empty();
    for c in certs(pem)? {
        store.add(c).map_err(|_| PkiError::Certificate)?;
    }
    Ok(Arc::new(store))
}

fn tls_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Sign(format!("tls config: {e}"))
}

/// A server presenting `chain_pem`; with `client_roots`, clients must (or, with
/// `client_auth_optional`, may) present a certificate chaining to them.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    client_roots: Option<&str>,
    client_auth_optional: bool,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, PkiError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?;
    let builder = match client_roots {
        Some(r) => {
            let mut v = WebPkiClientVerifier::builder_with_provider(root_store(r)?, provider());
            if client_auth_optional {
                v = v.allow_unauthenticated();
            }
            builder.with_client_cert_verifier(v.build().map_err(tls_err)?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs(chain_pem)?, key(key_pem)?)
        .map_err(tls_err)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client trusting the roots in `roots_pem`, presenting `client` (chain, key) when given.
pub fn client_config(
    roots_pem: &str,
    client: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, PkiError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(root_store(roots_pem)?);
    let mut config = match client {
        Some((chain, k)) => builder
            .with_client_auth_cert(certs(chain)?, key(k)?)
            .map_err(tls_err)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The SPIFFE id in a peer's leaf certificate.
pub fn peer_spiffe(certs: &[CertificateDer<'_>]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};
    let (_, leaf) = X509Certificate::from_der(certs.first()?.as_ref()).ok()?;
    leaf.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                san.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
                    _ => None,
                })
            }
            _ => None,
        })
}
