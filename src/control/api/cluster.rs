//! The cluster half of the admin API and the API's read consistency: `GET /v1/members`,
//! `DELETE /v1/members/{id}`, the raft fault hook for tests (`PUT /v1/debug/faults`, only
//! when the node runs with `TRELLIS_FAULT_INJECTION=1`), and the layer that makes App Mesh
//! reads linearizable. A read (Describe*, List*) waits for raft's read-index first, so it
//! sees every write acknowledged before it began, on any node; `?stale` (Consul's word) or
//! `x-trellis-consistency: stale` answers from this node's state at once.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Method, Request};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::HttpError;
use super::{Shared, json_ok};
use crate::model::ApiError;

/// `GET /v1/members`.
pub async fn members(State(s): Shared) -> Response {
    let members = s.consensus.members().await;
    json_ok(json!({
        "nodeId": s.consensus.node_id(),
        "node": s.consensus.node_info(),
        "members": members,
    }))
}

/// `DELETE /v1/members/{id}`.
pub async fn remove(State(s): Shared, Path(id): Path<u64>) -> Result<Response, HttpError> {
    let known = s.consensus.node_info().members.contains_key(&id);
    if !known {
        return Err(ApiError::not_found(format!("no cluster member with id {id}")).into());
    }
    s.consensus.remove_member(id).await?;
    Ok(json_ok(json!({"removed": id})))
}

/// `PUT /v1/debug/faults` `{"cut": [ids]}`: drop raft RPCs to and from these nodes.
pub async fn faults(State(s): Shared, body: axum::body::Bytes) -> Result<Response, HttpError> {
    if std::env::var("TRELLIS_FAULT_INJECTION").as_deref() != Ok("1") {
        return Err(ApiError::not_found(
            "the fault hook is off (start the node with TRELLIS_FAULT_INJECTION=1)",
        )
        .into());
    }
    #[derive(serde::Deserialize)]
    struct Faults {
        cut: Vec<u64>,
    }
    let f: Faults = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?;
    s.consensus.faults().set(f.cut.iter().copied().collect());
    Ok(json_ok(json!({"cut": f.cut})))
}

/// What a backup file holds.
const SNAPSHOT_FORMAT: &str = "trellis-snapshot/1";

/// `GET /v1/snapshot`: a consistent point-in-time copy of the whole state (resources, VIPs,
/// registry, quotas, the CA and every secret), as of a linearizable read.
pub async fn snapshot_save(State(s): Shared) -> Result<Response, HttpError> {
    s.consensus.linearize().await?;
    let (index, state) = (
        *s.consensus.applied_index().borrow(),
        s.consensus.read(|st| st.snapshot()),
    );
    Ok(json_ok(json!({
        "format": SNAPSHOT_FORMAT,
        "appliedIndex": index,
        "resources": state.resources.len(),
        "state": state,
    })))
}

/// `PUT /v1/snapshot`: replaces the whole state with a backup, through raft.
pub async fn snapshot_restore(State(s): Shared, req: Request<Body>) -> Result<Response, HttpError> {
    let bytes = super::body::read_up_to(req.into_body(), super::body::MAX_SNAPSHOT_BYTES).await?;
    let mut backup: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("snapshot: not JSON: {e}")))?;
    if backup["format"] != SNAPSHOT_FORMAT {
        return Err(ApiError::bad_request(format!(
            "snapshot: format {} is not {SNAPSHOT_FORMAT:?}",
            backup["format"]
        ))
        .into());
    }
    // Parsed here, so a broken file is refused with its reason before anything is proposed.
    let state: crate::model::state::StateSnapshot = serde_json::from_value(backup["state"].take())
        .map_err(|e| ApiError::bad_request(format!("snapshot: state: {e}")))?;
    let snapshot_json = serde_json::to_string(&state)
        .map_err(|e| ApiError::bad_request(format!("snapshot: state: {e}")))?;
    let out = s
        .consensus
        .write(crate::model::Command::Restore { snapshot_json })
        .await??;
    Ok(json_ok(out))
}

/// Linearizable App Mesh reads unless the caller asks for stale ones.
pub async fn consistent_reads(
    State(s): Shared,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let read = req.method() == Method::GET && req.uri().path().starts_with("/v20190125/");
    let stale = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "stale" || p.starts_with("stale="))
    }) || req
        .headers()
        .get("x-trellis-consistency")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"stale"));
    if read
        && !stale
        && let Err(e) = s.consensus.linearize().await
    {
        return HttpError::from(e).into_response();
    }
    next.run(req).await
}
