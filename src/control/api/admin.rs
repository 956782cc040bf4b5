//! The identity half of the admin API (`/v1/…`, the same keys and TLS as App Mesh's):
//! the mesh CA's trust bundle and rotation, join tokens (created, listed, revoked; the secret is
//! shown once and only its hash is stored) and access keys (created, listed, deleted; the
//! secret is shown once).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::Request;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::HttpError;
use super::{Shared, body, json_ok, now};
use crate::identity::secret;
use crate::model::ApiError;
use crate::model::Command;
use crate::model::proxy_config::ProxyRole;
use crate::model::security::{AccessKey, JoinToken, SecurityCommand};

/// Longest a join token may live: 30 days.
const MAX_TOKEN_TTL_SECONDS: u64 = 30 * 24 * 3600;

async fn propose(s: &super::ApiState, cmd: SecurityCommand) -> Result<Value, HttpError> {
    Ok(s.consensus.write(Command::Security(cmd)).await??)
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, HttpError> {
    let bytes = if bytes.is_empty() { b"{}" } else { bytes };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("request body: {e}")).into())
}

fn random_error(e: secret::SecretError) -> HttpError {
    ApiError::new(crate::model::ErrorKind::InternalServerError, e.to_string()).into()
}

/// `GET /v1/ca`: the trust bundle (every root still valid, and the cross-signed certificates).
pub async fn ca_show(State(s): Shared) -> Response {
    let (trust_domain, bundle, roots) = s.consensus.read(|st| {
        let sec = st.security();
        let roots: Vec<Value> = sec
            .roots()
            .iter()
            .map(|r| json!({"notAfter": r.not_after}))
            .collect();
        (sec.trust_domain.clone(), sec.bundle_pem(), roots)
    });
    json_ok(json!({"trustDomain": trust_domain, "bundle": bundle, "roots": roots}))
}

/// `POST /v1/ca/rotate`: a new root, cross-signed by the current one.
pub async fn ca_rotate(State(s): Shared) -> Result<Response, HttpError> {
    let out = crate::control::ca::rotate(&s.consensus)
        .await
        .map_err(|e| ApiError::new(crate::model::ErrorKind::InternalServerError, e.to_string()))?;
    Ok(json_ok(out))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    mesh_name: String,
    virtual_node_name: Option<String>,
    virtual_gateway_name: Option<String>,
    /// Default 24 h.
    ttl_seconds: Option<u64>,
    /// Default unlimited until expiry.
    uses: Option<u32>,
}

/// `POST /v1/tokens`: a join token for one virtual node or gateway; the token is in this
/// answer only.
pub async fn token_create(State(s): Shared, req: Request<Body>) -> Result<Response, HttpError> {
    let r: TokenRequest = parse(&body::read(req.into_body()).await?)?;
    let role = match (r.virtual_node_name, r.virtual_gateway_name) {
        (Some(n), None) => ProxyRole::VirtualNode(n),
        (None, Some(g)) => ProxyRole::VirtualGateway(g),
        _ => {
            return Err(ApiError::bad_request(
                "name exactly one of virtualNodeName and virtualGatewayName",
            )
            .into());
        }
    };
    let ttl = r.ttl_seconds.unwrap_or(24 * 3600);
    if !(1..=MAX_TOKEN_TTL_SECONDS).contains(&ttl) {
        return Err(ApiError::bad_request(format!(
            "ttlSeconds: must be between 1 and {MAX_TOKEN_TTL_SECONDS}, got {ttl}"
        ))
        .into());
    }
    if r.uses == Some(0) {
        return Err(ApiError::bad_request("uses: must be at least 1").into());
    }
    let new = secret::new_token().map_err(random_error)?;
    let t = now();
    let token = JoinToken {
        id: new.id.clone(),
        hash: new.hash,
        mesh: r.mesh_name,
        role,
        created_at: t,
        expires_at: t + ttl as f64,
        uses_left: r.uses,
        revoked: false,
    };
    let view = token_view(&token);
    propose(&s, SecurityCommand::TokenCreate(token)).await?;
    let mut answer = view;
    answer["token"] = json!(new.token);
    Ok(json_ok(answer))
}

fn token_view(t: &JoinToken) -> Value {
    json!({
        "id": t.id,
        "meshName": t.mesh,
        "resource": t.role.resource_name(),
        "createdAt": t.created_at,
        "expiresAt": t.expires_at,
        "usesLeft": t.uses_left,
        "revoked": t.revoked,
    })
}

/// `GET /v1/tokens`: every token, without secrets or hashes.
pub async fn token_list(State(s): Shared) -> Response {
    let tokens: Vec<Value> = s
        .consensus
        .read(|st| st.security().tokens().map(token_view).collect());
    json_ok(json!({ "tokens": tokens }))
}

/// `DELETE /v1/tokens/{id}`: revoke; certificates it bought stop renewing.
pub async fn token_revoke(State(s): Shared, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(json_ok(
        propose(&s, SecurityCommand::TokenRevoke { id }).await?,
    ))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KeyRequest {
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    description: String,
}

/// `POST /v1/keys`: a new access key; the secret is in this answer only.
pub async fn key_create(State(s): Shared, req: Request<Body>) -> Result<Response, HttpError> {
    let r: KeyRequest = parse(&body::read(req.into_body()).await?)?;
    if r.description.len() > 256 {
        return Err(ApiError::bad_request("description: at most 256 characters").into());
    }
    let (id, secret) = secret::new_access_key().map_err(random_error)?;
    let key = AccessKey {
        id: id.clone(),
        secret: secret.clone(),
        read_only: r.read_only,
        created_at: now(),
        description: r.description,
    };
    let view = key_view(&key);
    propose(&s, SecurityCommand::KeyCreate(key)).await?;
    let mut answer = view;
    answer["secretAccessKey"] = json!(secret);
    Ok(json_ok(answer))
}

fn key_view(k: &AccessKey) -> Value {
    json!({
        "accessKeyId": k.id,
        "readOnly": k.read_only,
        "createdAt": k.created_at,
        "description": k.description,
    })
}

/// `GET /v1/keys`: every key, without secrets.
pub async fn key_list(State(s): Shared) -> Response {
    let keys: Vec<Value> = s
        .consensus
        .read(|st| st.security().keys().map(key_view).collect());
    json_ok(json!({ "keys": keys }))
}

/// `DELETE /v1/keys/{id}`.
pub async fn key_delete(State(s): Shared, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(json_ok(
        propose(&s, SecurityCommand::KeyDelete { id }).await?,
    ))
}
