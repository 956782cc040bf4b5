//! SigV4 on every API request (App Mesh's and `/v1/…` alike, except reading `/v1/health` and
//! the public trust bundle `/v1/ca`): the
//! signature must verify with a known access key for this region and service `appmesh`, within
//! the clock-skew window, over the exact body; read-only keys may only read (GET). Anything
//! else is a 403 ForbiddenException saying what was wrong, never which secret was expected.

use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::HttpError;
use super::{Shared, body};
use crate::identity::sigv4;
use crate::model::ApiError;

/// What a signed request must match.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub region: String,
    pub max_skew: Duration,
}

fn forbidden(message: impl Into<String>) -> Response {
    HttpError::from(ApiError::forbidden(message)).into_response()
}

pub async fn authenticate(State(s): Shared, req: Request<Body>, next: Next) -> Response {
    let Some(settings) = &s.auth else {
        return next.run(req).await;
    };
    // Load balancers and systemd probe health without keys, and the trust bundle is public:
    // it is how a client learns what to pin. Metrics name no mesh resource (operations,
    // response codes, raft figures), and Prometheus scrapes without signing, as etcd's.
    if req.method() == Method::GET
        && matches!(req.uri().path(), "/v1/health" | "/v1/ca" | "/metrics")
    {
        return next.run(req).await;
    }
    // SigV4 signs the path with dot segments resolved and empty ones dropped: one signature
    // would fit several raw paths that route differently. Refuse those paths outright.
    let odd = req
        .uri()
        .path()
        .split('/')
        .skip(1)
        .any(|seg| seg.is_empty() || seg == "." || seg == "..");
    if odd && req.uri().path() != "/" {
        return HttpError::from(ApiError::bad_request(
            "request path: empty, '.' and '..' segments are not accepted on a signed API",
        ))
        .into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match body::read_up_to(body, body::limit_for(parts.uri.path())).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let auth = match sigv4::parse_authorization(&parts.headers) {
        Ok(a) => a,
        Err(e) => return forbidden(e.to_string()),
    };
    let key = s.consensus.read(|st| {
        st.security()
            .key(&auth.access_key_id)
            .map(|k| (k.secret.clone(), k.read_only))
    });
    let Some((secret, read_only)) = key else {
        return forbidden(sigv4::SigV4Error::UnknownKey(auth.access_key_id.clone()).to_string());
    };
    // Over HTTP/2 the host travels as `:authority`, which hyper keeps in the URI; only then
    // is a copy of the headers needed.
    let mut parts = parts;
    if !parts.headers.contains_key(http::header::HOST)
        && let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    let request = sigv4::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        body: &bytes,
    };
    let expect = sigv4::Expect {
        region: &settings.region,
        service: "appmesh",
        now: SystemTime::now(),
        max_skew: settings.max_skew,
    };
    if let Err(e) = sigv4::verify(&request, &auth, &secret, &expect) {
        tracing::info!(access_key_id = %auth.access_key_id, error = %e, "api request refused");
        return forbidden(e.to_string());
    }
    // A backup holds the CA key and every secret: reading it is not a read-only matter.
    if read_only && (parts.method != Method::GET || parts.uri.path() == "/v1/snapshot") {
        return forbidden(format!(
            "access key {} is read-only: it may only Describe and List",
            auth.access_key_id
        ));
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
