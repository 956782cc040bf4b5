//! A small HTTP client for the control plane's admin API (`/v1/…`), used by the CLI's client
//! commands (`trellis proxies` …).

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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

/// GETs `url` and parses the JSON answer.
pub async fn get_json(url: &str) -> Result<serde_json::Value, ClientError> {
    let err = |message: String| ClientError::Request {
        url: url.to_string(),
        message,
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| err(e.to_string()))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let resp = client.get(uri).await.map_err(|e| err(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| err(e.to_string()))?
        .to_bytes();
    if status != 200 {
        return Err(ClientError::Status {
            url: url.to_string(),
            status,
            body: String::from_utf8_lossy(&body).into(),
        });
    }
    serde_json::from_slice(&body).map_err(|e| err(format!("not JSON: {e}")))
}
