//! A small HTTP client for the control plane's admin API (`/v1/…`), used by the CLI's client
//! commands (`trellis proxies`, `token`, `keys`, `ca`): plain HTTP or HTTPS pinned to the mesh
//! CA's bundle, requests signed with SigV4 when credentials are given (as the aws CLI signs).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::identity::{sigv4, tls};

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {message}")]
    Request { url: String, message: String },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

/// An access key to sign with.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Where the control plane is and how to talk to it.
#[derive(Clone, Default)]
pub struct Endpoint {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// The trust bundle for HTTPS (`trellis ca show > ca.pem`).
    pub ca_file: Option<PathBuf>,
    pub credentials: Option<Credentials>,
    /// The region SigV4 signs for (the control plane's `region`).
    pub region: String,
    /// Accept any server certificate: only for fetching the public trust bundle the first
    /// time (`trellis ca show` without `--ca-file`), which the operator then checks.
    pub unverified: bool,
}

impl Endpoint {
    /// An unsigned plain-HTTP endpoint (a dev control plane on loopback, or a mesh gateway).
    pub fn plain(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            credentials: None,
            region: "us-east-1".into(),
            unverified: false,
        }
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.call("GET", path, None).await
    }

    /// Sends one request and parses the JSON answer; non-2xx answers are errors carrying the
    /// server's message.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let err = |message: String| ClientError::Request {
            url: url.clone(),
            message,
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| err(e.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(err(
                    "the endpoint must start with http:// or https://".into()
                ));
            }
        };
        let host = uri.host().ok_or_else(|| err("no host".into()))?.to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| host.clone());
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let mut req = http::Request::builder()
            .method(method)
            .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(http::header::HOST, &authority)
            .body(())
            .map_err(|e| err(e.to_string()))?;
        if body.is_some() {
            req.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        if let Some(c) = &self.credentials {
            sigv4::sign(
                method,
                uri.path(),
                uri.query(),
                req.headers_mut(),
                &bytes,
                &c.access_key_id,
                &c.secret_access_key,
                &self.region,
                "appmesh",
                SystemTime::now(),
            );
        }
        let (parts, ()) = req.into_parts();
        let req = http::Request::from_parts(parts, Full::new(Bytes::from(bytes)));
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| err(format!("connect: {e}")))?;
        let resp = if https {
            let config = match &self.ca_file {
                Some(f) => {
                    let roots = std::fs::read_to_string(f)
                        .map_err(|e| err(format!("--ca-file {}: {e}", f.display())))?;
                    tls::client_config(&roots, None, &[b"http/1.1"])
                        .map_err(|e| err(e.to_string()))?
                }
                None if self.unverified => unverified_config().map_err(|e| err(e.to_string()))?,
                None => {
                    return Err(err(
                        "https needs the mesh CA bundle: pass --ca-file (trellis ca show > ca.pem)"
                            .into(),
                    ));
                }
            };
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| err(format!("server name {host}: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(Arc::clone(&config))
                .connect(name, tcp)
                .await
                .map_err(|e| err(format!("tls: {e}")))?;
            send(TokioIo::new(stream), req).await
        } else {
            send(TokioIo::new(tcp), req).await
        }
        .map_err(|e| err(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| err(e.to_string()))?
            .to_bytes();
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into());
            return Err(ClientError::Status {
                url,
                status,
                body: message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| err(format!("not JSON: {e}")))
    }
}

/// A TLS client that accepts any certificate (signatures are still checked, so the handshake
/// is real); see [`Endpoint::unverified`].
fn unverified_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    #[derive(Debug)]
    struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn send<T>(
    io: TokioIo<T>,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    // The connection task ends by itself once the answer's body has been read.
    tokio::spawn(conn);
    sender.send_request(req).await
}
