//! The mesh PKI as pure functions on PEM (rcgen to make, x509-parser to read): ECDSA P-256
//! roots, their cross-signed successors for rotation, proxy leaves from CSRs (only the CSR's
//! key is taken; names come from the caller), control-node certificates, and the checks
//! renewal needs (a leaf of this CA, a CSR signed by that leaf's key). Key material never
//! enters an error message or a Debug output.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// Leaves are valid from a little before now: peers' clocks differ.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("csr: not a valid PEM certificate request, or its signature does not verify")]
    Csr,
    #[error("csr: the key must be ECDSA P-256")]
    CsrKey,
    #[error("certificate: not a valid PEM certificate")]
    Certificate,
    #[error("certificate: not issued by this mesh CA")]
    UnknownIssuer,
    #[error("certificate: expired or not yet valid")]
    Expired,
    #[error("the CSR's key is not the certificate's key")]
    KeyMismatch,
    #[error("certificate: not a CA certificate")]
    NotCa,
    #[error("the CA key is not the key of the CA certificate")]
    CaKeyMismatch,
    #[error("the CA key could not be read")]
    CaKey,
    #[error("a name is not valid in a certificate: {0}")]
    Name(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// One mesh root (certificate and key), as the replicated state keeps it.
pub use crate::model::security::CaRoot as RootCa;

/// What a certificate says, for the checks and for display.
#[derive(Debug, Clone, PartialEq)]
pub struct CertInfo {
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
}

fn epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn datetime(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| PkiError::Sign("no randomness".into()))?;
    // Positive, as DER integers for serials must be.
    b[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&b))
}

fn sign_err(e: rcgen::Error) -> PkiError {
    PkiError::Sign(e.to_string())
}

fn root_params(
    trust_domain: &str,
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    let serial = random_serial()?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "trellis");
    // Each root its own name, so chains through a cross-signed root stay unambiguous.
    let id: String = serial.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dn.push(
        DnType::CommonName,
        format!("trellis mesh root {trust_domain} {id}"),
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = datetime(not_before);
    p.not_after = datetime(not_after);
    p.serial_number = Some(serial);
    Ok(p)
}

/// A new root for `trust_domain`, valid from now for `lifetime`.
pub fn new_root(
    trust_domain: &str,
    now: SystemTime,
    lifetime: Duration,
) -> Result<RootCa, PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
    let not_before = epoch(now) - BACKDATE.as_secs() as i64;
    let not_after = epoch(now) + lifetime.as_secs() as i64;
    let cert = root_params(trust_domain, not_before, not_after)?
        .self_signed(&key)
        .map_err(sign_err)?;
    Ok(RootCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// A root from files made outside (`trellis ca create`, or an operator's own CA): the
/// certificate must be a CA and the key must be its key.
pub fn root_from_pem(cert_pem: &str, key_pem: &str) -> Result<RootCa, PkiError> {
    let der = parse_pem(cert_pem)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|_| PkiError::Certificate)?;
    let info = info_of(&cert);
    if !info.is_ca {
        return Err(PkiError::NotCa);
    }
    let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::CaKey)?;
    if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
        return Err(PkiError::CaKeyMismatch);
    }
    Ok(RootCa {
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        not_after: info.not_after,
    })
}

fn issuer(ca: &RootCa) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(&ca.key_pem).map_err(|_| PkiError::CaKey)?;
    Issuer::from_ca_cert_pem(&ca.cert_pem, key).map_err(|_| PkiError::Certificate)
}

fn parse_pem(pem: &str) -> Result<Vec<u8>, PkiError> {
    let (_, p) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| PkiError::Certificate)?;
    if p.label != "CERTIFICATE" {
        return Err(PkiError::Certificate);
    }
    Ok(p.contents)
}

/// Every certificate in a PEM bundle, as DER.
fn parse_all(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

/// The new root's certificate (same name and key) signed by `old`: leaves of the new root
/// then chain to the old root too, so peers that only know the old one still trust them.
pub fn cross_sign(new: &RootCa, old: &RootCa, now: SystemTime) -> Result<String, PkiError> {
    let der = parse_pem(&new.cert_pem)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|_| PkiError::Certificate)?;
    let mut params = root_params(
        "",
        epoch(now) - BACKDATE.as_secs() as i64,
        new.not_after.min(old.not_after),
    )?;
    // The same subject, encoded as `root_params` encodes it (rcgen does not read names back).
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .ok_or(PkiError::Certificate)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "trellis");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let new_key = KeyPair::from_pem(&new.key_pem).map_err(|_| PkiError::CaKey)?;
    let cert = params
        .signed_by(&new_key, &issuer(old)?)
        .map_err(sign_err)?;
    Ok(cert.pem())
}

fn leaf_params(
    sans: Vec<SanType>,
    ca: &RootCa,
    now: SystemTime,
    lifetime: Duration,
) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "trellis");
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.not_before = datetime(epoch(now) - BACKDATE.as_secs() as i64);
    p.not_after = datetime((epoch(now) + lifetime.as_secs() as i64).min(ca.not_after));
    p.serial_number = Some(random_serial()?);
    Ok(p)
}

fn uri_san(uri: &str) -> Result<SanType, PkiError> {
    Ok(SanType::URI(
        uri.try_into()
            .map_err(|_| PkiError::Name(uri.to_string()))?,
    ))
}

fn dns_san(name: &str) -> Result<SanType, PkiError> {
    Ok(SanType::DnsName(
        name.try_into()
            .map_err(|_| PkiError::Name(name.to_string()))?,
    ))
}

/// The verified public key of a CSR (a P-256 key whose signature checks); nothing else in
/// it is read. x509-parser does the parsing: rcgen's CSR parser refuses unknown extensions
/// and its name parser can panic on hostile input.
pub fn check_csr(csr_pem: &str) -> Result<SubjectPublicKeyInfo, PkiError> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|_| PkiError::Csr)?;
    if pem.label != "CERTIFICATE REQUEST" {
        return Err(PkiError::Csr);
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(&pem.contents).map_err(|_| PkiError::Csr)?;
    if !rest.is_empty() {
        return Err(PkiError::Csr);
    }
    csr.verify_signature().map_err(|_| PkiError::Csr)?;
    let key = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|_| PkiError::CsrKey)?;
    if rcgen::PublicKeyData::algorithm(&key) != &PKCS_ECDSA_P256_SHA256 {
        return Err(PkiError::CsrKey);
    }
    Ok(key)
}

/// A proxy leaf for the CSR's key: SANs are exactly `uris` and `dns_names` (whatever the CSR
/// asked for), digitalSignature, serverAuth + clientAuth, at most until the root's end.
pub fn issue_leaf(
    ca: &RootCa,
    csr_pem: &str,
    uris: &[String],
    dns_names: &[String],
    now: SystemTime,
    lifetime: Duration,
) -> Result<String, PkiError> {
    let key = check_csr(csr_pem)?;
    let mut sans = uris
        .iter()
        .map(|u| uri_san(u))
        .collect::<Result<Vec<_>, _>>()?;
    for d in dns_names {
        sans.push(dns_san(d)?);
    }
    let params = leaf_params(sans, ca, now, lifetime)?;
    let cert = params.signed_by(&key, &issuer(ca)?).map_err(sign_err)?;
    Ok(cert.pem())
}

/// A control node's certificate and its new key (PEM).
pub fn issue_node_cert(
    ca: &RootCa,
    uri: &str,
    dns_names: &[String],
    ips: &[IpAddr],
    now: SystemTime,
    lifetime: Duration,
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
    let mut sans = vec![uri_san(uri)?];
    for d in dns_names {
        sans.push(dns_san(d)?);
    }
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let params = leaf_params(sans, ca, now, lifetime)?;
    let cert = params.signed_by(&key, &issuer(ca)?).map_err(sign_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// For a proxy: a fresh P-256 key and a CSR for it (PEM).
pub fn new_key_and_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
    let csr = csr_for_key(&key.serialize_pem())?;
    Ok((key.serialize_pem(), csr))
}

/// A CSR signed by an existing key (renewal proves possession with it).
pub fn csr_for_key(key_pem: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::CaKey)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(sign_err)?;
    csr.pem().map_err(sign_err)
}

fn info_of(cert: &X509Certificate<'_>) -> CertInfo {
    let mut info = CertInfo {
        uris: Vec::new(),
        dns_names: Vec::new(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca: cert.is_ca(),
    };
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(u) => info.uris.push(u.to_string()),
                    GeneralName::DNSName(d) => info.dns_names.push(d.to_string()),
                    _ => {}
                }
            }
        }
    }
    info
}

/// What the first certificate of a PEM chain says.
pub fn inspect(cert_pem: &str) -> Result<CertInfo, PkiError> {
    let der = parse_pem(cert_pem)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|_| PkiError::Certificate)?;
    Ok(info_of(&cert))
}

/// Checks that the first certificate of `cert_pem` was signed by a certificate of `bundle`
/// (a root, or a cross-signed root) and is valid at `now`.
pub fn verify_leaf(cert_pem: &str, bundle: &str, now: SystemTime) -> Result<CertInfo, PkiError> {
    let der = parse_pem(cert_pem)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|_| PkiError::Certificate)?;
    let signed_by_bundle = parse_all(bundle).iter().any(|ca_der| {
        X509Certificate::from_der(ca_der).is_ok_and(|(_, ca)| {
            ca.subject() == cert.issuer() && cert.verify_signature(Some(ca.public_key())).is_ok()
        })
    });
    if !signed_by_bundle {
        return Err(PkiError::UnknownIssuer);
    }
    let info = info_of(&cert);
    let t = epoch(now);
    if t < info.not_before || t > info.not_after {
        return Err(PkiError::Expired);
    }
    Ok(info)
}

/// Checks that `csr_pem` is validly signed and carries the same key as `cert_pem`.
pub fn check_possession(cert_pem: &str, csr_pem: &str) -> Result<(), PkiError> {
    use rcgen::PublicKeyData;
    let key = check_csr(csr_pem)?;
    let der = parse_pem(cert_pem)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|_| PkiError::Certificate)?;
    if cert.public_key().subject_public_key.data.as_ref() == key.der_bytes() {
        Ok(())
    } else {
        Err(PkiError::KeyMismatch)
    }
}

#[cfg(test)]
mod tests;
