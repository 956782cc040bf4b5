//! The App Mesh REST API (`/v20190125/…`), wire-compatible with the `aws appmesh` CLI: one
//! generic set of handlers serves the seven resource kinds (list, create, describe, update,
//! delete), plus the three tag operations. Writes go through raft; reads come from the applied
//! state. Every request is authenticated with SigV4 (`auth`) unless the node runs without it
//! (dev); `serve` carries the router over TLS.

mod admin;
mod auth;
mod body;
mod cluster;
mod error;
mod inputs;
mod serve;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use base64::Engine;
use serde_json::{Value, json};

pub use auth::AuthSettings;
pub use body::MAX_BODY_BYTES;
use error::HttpError;
pub use serve::serve_tls;

use crate::control::raft::Consensus;
use crate::model::resource::{Status, parse_arn};
use crate::model::validate::Validator;
use crate::model::{ApiError, Command, Owner, ResourceKey, ResourceKind};
use crate::telemetry::control::{ControlMetrics, RaftFigures};

/// What the API handlers share.
pub struct ApiState {
    pub consensus: Consensus,
    /// Region and account of the resources this control plane creates.
    pub owner: Owner,
    /// The proxies connected to this node.
    pub proxies: crate::control::xds::ProxyTable,
    /// Their traffic summaries (`/v1/traffic`, `trellis top`).
    pub traffic: crate::control::traffic::TrafficTable,
    /// SigV4 settings; `None`: every caller is admin (dev mode, loopback only).
    pub auth: Option<AuthSettings>,
    pub metrics: Arc<ControlMetrics>,
}

type Shared = State<Arc<ApiState>>;
type Params = HashMap<String, String>;

/// The names in the URI path; a malformed one (e.g. bad percent-encoding) is a BadRequest in
/// App Mesh's error format rather than axum's plain-text answer.
struct Names(Params);

impl<S: Send + Sync> FromRequestParts<S> for Names {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<Params>::from_request_parts(parts, state).await {
            Ok(Path(p)) => Ok(Names(p)),
            Err(e) => Err(ApiError::bad_request(format!("request path: {}", e.body_text())).into()),
        }
    }
}

/// The query string (`limit`, `nextToken`, `meshOwner`, `resourceArn`), same treatment.
struct QueryParams(Params);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<Params>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(QueryParams(q)),
            Err(e) => Err(ApiError::bad_request(format!("query string: {}", e.body_text())).into()),
        }
    }
}

/// The URL collection segment of each kind (`/meshes/{mesh}/virtualNodes`).
fn collection_path(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Mesh => "/v20190125/meshes",
        ResourceKind::VirtualNode => "/v20190125/meshes/{meshName}/virtualNodes",
        ResourceKind::VirtualService => "/v20190125/meshes/{meshName}/virtualServices",
        ResourceKind::VirtualRouter => "/v20190125/meshes/{meshName}/virtualRouters",
        ResourceKind::Route => "/v20190125/meshes/{meshName}/virtualRouter/{parentName}/routes",
        ResourceKind::VirtualGateway => "/v20190125/meshes/{meshName}/virtualGateways",
        ResourceKind::GatewayRoute => {
            "/v20190125/meshes/{meshName}/virtualGateway/{parentName}/gatewayRoutes"
        }
    }
}

/// The list body's member for each kind.
fn list_member(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Mesh => "meshes",
        ResourceKind::VirtualNode => "virtualNodes",
        ResourceKind::VirtualService => "virtualServices",
        ResourceKind::VirtualRouter => "virtualRouters",
        ResourceKind::Route => "routes",
        ResourceKind::VirtualGateway => "virtualGateways",
        ResourceKind::GatewayRoute => "gatewayRoutes",
    }
}

/// The App Mesh API router.
pub fn router(state: Arc<ApiState>) -> Router {
    let mut r = Router::new();
    for kind in ResourceKind::ALL {
        let coll = collection_path(kind);
        let item = if kind == ResourceKind::Mesh {
            "/v20190125/meshes/{meshName}".to_string()
        } else {
            format!("{coll}/{{name}}")
        };
        r = r
            .route(
                coll,
                get(move |s: Shared, p: Names, q: QueryParams| list(s, kind, p, q)).put(
                    move |s: Shared, p: Names, q: QueryParams, req: Request<Body>| {
                        create(s, kind, p, q, req)
                    },
                ),
            )
            .route(
                &item,
                get(move |s: Shared, p: Names, q: QueryParams| describe(s, kind, p, q))
                    .put(
                        move |s: Shared, p: Names, q: QueryParams, req: Request<Body>| {
                            update(s, kind, p, q, req)
                        },
                    )
                    .delete(move |s: Shared, p: Names, q: QueryParams| delete(s, kind, p, q)),
            );
    }
    r.route("/v20190125/tag", put(tag_resource))
        .route("/v20190125/untag", put(untag_resource))
        .route("/v20190125/tags", get(list_tags))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/proxies", get(proxies))
        .route("/v1/traffic", get(traffic))
        .route("/v1/members", get(cluster::members))
        .route("/v1/members/{id}", axum::routing::delete(cluster::remove))
        .route("/v1/debug/faults", put(cluster::faults))
        .route(
            "/v1/snapshot",
            get(cluster::snapshot_save).put(cluster::snapshot_restore),
        )
        .route("/v1/ca", get(admin::ca_show))
        .route("/v1/ca/rotate", axum::routing::post(admin::ca_rotate))
        .route(
            "/v1/tokens",
            get(admin::token_list).post(admin::token_create),
        )
        .route(
            "/v1/tokens/{id}",
            axum::routing::delete(admin::token_revoke),
        )
        .route("/v1/keys", get(admin::key_list).post(admin::key_create))
        .route("/v1/keys/{id}", axum::routing::delete(admin::key_delete))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cluster::consistent_reads,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(axum::middleware::from_fn(request_id))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Counts every request by its App Mesh operation (or admin path) and status, with latency.
async fn observe(State(s): Shared, req: Request<Body>, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let op = operation(
        req.method(),
        req.extensions()
            .get::<axum::extract::MatchedPath>()
            .map(|m| m.as_str()),
    );
    let resp = next.run(req).await;
    s.metrics
        .api_request(&op, resp.status().as_u16(), started.elapsed());
    resp
}

/// The App Mesh operation a method and route template stand for (`CreateVirtualNode`,
/// `ListMeshes` …); admin routes by method and template; `unmatched` for the rest, so the
/// label stays bounded whatever clients send.
fn operation(method: &Method, template: Option<&str>) -> String {
    let Some(t) = template else {
        return "unmatched".into();
    };
    for kind in ResourceKind::ALL {
        let seg = kind.arn_segment();
        let name = format!("{}{}", seg[..1].to_ascii_uppercase(), &seg[1..]);
        let coll = collection_path(kind);
        let is_item = if kind == ResourceKind::Mesh {
            t == "/v20190125/meshes/{meshName}"
        } else {
            t.strip_prefix(coll) == Some("/{name}")
        };
        let op = match (t == coll, is_item, method.as_str()) {
            (true, _, "GET") if kind == ResourceKind::Mesh => "ListMeshes".to_string(),
            (true, _, "GET") => format!("List{name}s"),
            (true, _, "PUT") => format!("Create{name}"),
            (_, true, "GET") => format!("Describe{name}"),
            (_, true, "PUT") => format!("Update{name}"),
            (_, true, "DELETE") => format!("Delete{name}"),
            _ => continue,
        };
        return op;
    }
    match t {
        "/v20190125/tag" => "TagResource".into(),
        "/v20190125/untag" => "UntagResource".into(),
        "/v20190125/tags" => "ListTagsForResource".into(),
        // Clients may send any method: only the standard ones name a label value.
        _ => match *method {
            Method::GET
            | Method::PUT
            | Method::POST
            | Method::DELETE
            | Method::HEAD
            | Method::PATCH
            | Method::OPTIONS => format!("{method} {t}"),
            _ => format!("other {t}"),
        },
    }
}

/// The node's metrics, raft's figures and the connected proxies read now.
async fn metrics(State(s): Shared) -> Response {
    let info = s.consensus.node_info();
    s.metrics.set_raft(RaftFigures {
        term: info.term,
        leader: info.leader.unwrap_or(0),
        is_leader: info.leader == Some(info.node_id),
        last_log_index: info.last_log_index,
        committed_index: info.committed_index,
        applied_index: info.applied_index,
        members: info.members.len() as u64,
    });
    let proxies = s.proxies.lock().unwrap_or_else(|e| e.into_inner()).len();
    s.metrics.set_proxies(proxies);
    crate::admin::Metrics::new(s.metrics.clone()).render()
}

/// Every answer carries `x-amzn-RequestId` (botocore copies it into ResponseMetadata).
async fn request_id(req: Request<Body>, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut resp = next.run(req).await;
    let id = uuid::Uuid::new_v4().to_string();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-amzn-requestid", v);
    }
    tracing::debug!(%method, %path, status = resp.status().as_u16(), request_id = %id, "api request");
    resp
}

async fn not_found(method: Method, uri: Uri) -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        "NotFoundException",
        format!("no App Mesh operation at {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> HttpError {
    HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "BadRequestException",
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

async fn health(State(s): Shared) -> Response {
    let resources = s.consensus.read(|st| st.len());
    json_ok(json!({"status": "ok", "nodeId": s.consensus.node_id(), "resources": resources}))
}

/// The proxies connected to this node, with the config versions sent and acknowledged.
async fn proxies(State(s): Shared) -> Response {
    let list: Vec<Value> = s
        .proxies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|p| serde_json::to_value(p).unwrap_or(Value::Null))
        .collect();
    json_ok(json!({ "proxies": list }))
}

/// Per virtual service and per edge: requests, rate, success rate and latency percentiles, from
/// the summaries of the proxies connected to this node.
async fn traffic(State(s): Shared) -> Response {
    let t = crate::control::traffic::summary(&s.traffic);
    json_ok(serde_json::to_value(t).unwrap_or(Value::Null))
}

fn json_ok(v: Value) -> Response {
    let mut resp = (StatusCode::OK, v.to_string()).into_response();
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Checks the names in the URI and builds the key of the collection's parent.
fn names(kind: ResourceKind, p: &Params) -> Result<(String, String), ApiError> {
    let mesh = p.get("meshName").cloned().unwrap_or_default();
    let parent = p.get("parentName").cloned().unwrap_or_default();
    let mut v = Validator::default();
    if kind != ResourceKind::Mesh || p.contains_key("meshName") {
        crate::model::rules::check_name(&mut v, "meshName", &mesh);
    }
    if let Some(pk) = kind.parent() {
        crate::model::rules::check_name(&mut v, pk.name_member(), &parent);
    }
    if let Some(name) = p.get("name") {
        crate::model::rules::check_name(&mut v, kind.name_member(), name);
    }
    v.finish()?;
    Ok((mesh, parent))
}

fn item_key(kind: ResourceKind, p: &Params) -> Result<ResourceKey, ApiError> {
    let (mesh, parent) = names(kind, p)?;
    let name = p.get("name").cloned().unwrap_or_default();
    Ok(match kind {
        ResourceKind::Mesh => ResourceKey::mesh(&mesh),
        _ => ResourceKey::child(kind, &mesh, &parent, &name),
    })
}

/// `meshOwner` names the account that owns the mesh; here every mesh is this account's.
fn check_mesh_owner(s: &ApiState, q: &Params, mesh: &str) -> Result<(), ApiError> {
    let Some(owner) = q.get("meshOwner") else {
        return Ok(());
    };
    if owner.len() != 12 || !owner.chars().all(|c| c.is_ascii_digit()) {
        return Err(ApiError::bad_request(format!(
            "meshOwner: must be a 12-digit account id, got {owner:?}"
        )));
    }
    let actual = s.consensus.read(|st| {
        st.get(&ResourceKey::mesh(mesh))
            .map(|m| m.metadata.mesh_owner.clone())
    });
    match actual {
        Some(a) if a != *owner => Err(ApiError::not_found(format!(
            "Mesh with name {mesh} and owner {owner} not found"
        ))),
        _ => Ok(()),
    }
}

/// Missing parents answer NotFound before anything else.
fn check_parents(s: &ApiState, key: &ResourceKey) -> Result<(), ApiError> {
    if key.kind == ResourceKind::Mesh {
        return Ok(());
    }
    s.consensus.read(|st| st.find_parent(key).map(|_| ()))
}

async fn write(s: &ApiState, cmd: Command) -> Result<Response, HttpError> {
    let outcome = s.consensus.write(cmd).await?;
    Ok(json_ok(outcome?))
}

fn limit(q: &Params, max: i64) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(100),
        Some(l) => {
            let n: i64 = l.parse().map_err(|_| {
                ApiError::bad_request(format!("limit: must be an integer, got {l:?}"))
            })?;
            if !(1..=max).contains(&n) {
                return Err(ApiError::bad_request(format!(
                    "limit: must be between 1 and {max}, got {n}"
                )));
            }
            Ok(n as usize)
        }
    }
}

/// nextToken is an opaque encoding of the last name returned; listing resumes after it.
fn encode_token(after: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json!({ "after": after }).to_string())
}

fn decode_token(q: &Params) -> Result<Option<String>, ApiError> {
    let Some(t) = q.get("nextToken") else {
        return Ok(None);
    };
    let bad = || ApiError::bad_request("nextToken: is not a token this API returned");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    v.get("after")
        .and_then(Value::as_str)
        .map(|s| Some(s.to_string()))
        .ok_or_else(bad)
}

async fn list(
    State(s): Shared,
    kind: ResourceKind,
    Names(p): Names,
    QueryParams(q): QueryParams,
) -> Result<Response, HttpError> {
    let (mesh, parent) = names(kind, &p)?;
    let limit = limit(&q, 100)?;
    let after = decode_token(&q)?;
    if kind != ResourceKind::Mesh {
        check_parents(&s, &ResourceKey::child(kind, &mesh, &parent, ""))?;
        check_mesh_owner(&s, &q, &mesh)?;
    }
    let body = s.consensus.read(|st| {
        let page = st.list(kind, &mesh, &parent, after.as_deref(), limit);
        let items: Vec<Value> = page.items.iter().map(|r| r.to_ref()).collect();
        let mut body = serde_json::Map::new();
        body.insert(list_member(kind).into(), Value::Array(items));
        if let Some(a) = page.more_after {
            body.insert("nextToken".into(), Value::String(encode_token(&a)));
        }
        Value::Object(body)
    });
    Ok(json_ok(body))
}

async fn describe(
    State(s): Shared,
    kind: ResourceKind,
    Names(p): Names,
    QueryParams(q): QueryParams,
) -> Result<Response, HttpError> {
    let key = item_key(kind, &p)?;
    check_parents(&s, &key)?;
    check_mesh_owner(&s, &q, &key.mesh)?;
    let data = s
        .consensus
        .read(|st| st.find(&key).map(|r| r.to_data(Status::Active)))?;
    Ok(json_ok(data))
}

async fn create(
    State(s): Shared,
    kind: ResourceKind,
    Names(p): Names,
    QueryParams(q): QueryParams,
    req: Request<Body>,
) -> Result<Response, HttpError> {
    let path = req.uri().path().to_string();
    let (mesh, parent) = names(kind, &p)?;
    let bytes = body::read(req.into_body()).await?;
    let parsed = inputs::create(kind, &bytes, &path)?;
    let name = parsed.name.unwrap_or_default();
    let key = match kind {
        ResourceKind::Mesh => ResourceKey::mesh(&name),
        _ => ResourceKey::child(kind, &mesh, &parent, &name),
    };
    if kind != ResourceKind::Mesh {
        check_mesh_owner(&s, &q, &mesh)?;
    }
    let cmd = Command::Create {
        key,
        spec: parsed.spec,
        tags: parsed.tags,
        idempotency: parsed.idempotency,
        uid: uuid::Uuid::new_v4().to_string(),
        owner: s.owner.clone(),
        now: now(),
    };
    write(&s, cmd).await
}

async fn update(
    State(s): Shared,
    kind: ResourceKind,
    Names(p): Names,
    QueryParams(q): QueryParams,
    req: Request<Body>,
) -> Result<Response, HttpError> {
    let path = req.uri().path().to_string();
    let key = item_key(kind, &p)?;
    let bytes = body::read(req.into_body()).await?;
    let parsed = inputs::update(kind, &bytes, &path)?;
    check_mesh_owner(&s, &q, &key.mesh)?;
    write(
        &s,
        Command::Update {
            key,
            spec: parsed.spec,
            idempotency: parsed.idempotency,
            now: now(),
        },
    )
    .await
}

async fn delete(
    State(s): Shared,
    kind: ResourceKind,
    Names(p): Names,
    QueryParams(q): QueryParams,
) -> Result<Response, HttpError> {
    let key = item_key(kind, &p)?;
    check_mesh_owner(&s, &q, &key.mesh)?;
    write(&s, Command::Delete { key, now: now() }).await
}

/// Resolves `resourceArn` to a stored resource of this control plane.
fn arn_key(s: &ApiState, q: &Params) -> Result<ResourceKey, ApiError> {
    let arn = q
        .get("resourceArn")
        .ok_or_else(|| ApiError::bad_request("resourceArn: is required"))?;
    let (owner, key) = parse_arn(arn).ok_or_else(|| {
        ApiError::bad_request(format!("resourceArn: is not an App Mesh ARN: {arn:?}"))
    })?;
    let exists = s
        .consensus
        .read(|st| st.get(&key).is_some_and(|r| r.metadata.arn == *arn));
    if owner.region != s.owner.region || !exists {
        return Err(ApiError::not_found(format!("no resource with ARN {arn}")));
    }
    Ok(key)
}

async fn tag_resource(
    State(s): Shared,
    QueryParams(q): QueryParams,
    req: Request<Body>,
) -> Result<Response, HttpError> {
    let key = arn_key(&s, &q)?;
    let bytes = body::read(req.into_body()).await?;
    let tags = inputs::tags(&bytes)?;
    write(&s, Command::Tag { key, tags }).await
}

async fn untag_resource(
    State(s): Shared,
    QueryParams(q): QueryParams,
    req: Request<Body>,
) -> Result<Response, HttpError> {
    let key = arn_key(&s, &q)?;
    let bytes = body::read(req.into_body()).await?;
    let tag_keys = inputs::tag_keys(&bytes)?;
    write(&s, Command::Untag { key, tag_keys }).await
}

async fn list_tags(State(s): Shared, QueryParams(q): QueryParams) -> Result<Response, HttpError> {
    let key = arn_key(&s, &q)?;
    let limit = limit(&q, 50)?;
    let after = decode_token(&q)?;
    let body = s.consensus.read(|st| {
        let r = st.find(&key)?;
        let mut tags: Vec<Value> = r
            .tags
            .iter()
            .filter(|(k, _)| after.as_deref().is_none_or(|a| k.as_str() > a))
            .take(limit + 1)
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let mut body = serde_json::Map::new();
        let next = if tags.len() > limit {
            tags.truncate(limit);
            tags.last()
                .and_then(|t| t["key"].as_str())
                .map(encode_token)
        } else {
            None
        };
        body.insert("tags".into(), Value::Array(tags));
        if let Some(n) = next {
            body.insert("nextToken".into(), Value::String(n));
        }
        Ok::<_, ApiError>(Value::Object(body))
    })?;
    Ok(json_ok(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_app_mesh_names_and_a_bounded_set() {
        let op = |m: &str, t: &str| operation(&Method::from_bytes(m.as_bytes()).unwrap(), Some(t));
        assert_eq!(op("PUT", "/v20190125/meshes"), "CreateMesh");
        assert_eq!(op("GET", "/v20190125/meshes"), "ListMeshes");
        assert_eq!(
            op("PUT", "/v20190125/meshes/{meshName}/virtualNodes"),
            "CreateVirtualNode"
        );
        assert_eq!(
            op(
                "DELETE",
                "/v20190125/meshes/{meshName}/virtualRouter/{parentName}/routes/{name}"
            ),
            "DeleteRoute"
        );
        assert_eq!(op("GET", "/v1/health"), "GET /v1/health");
        // Made-up methods share one label value, whatever clients send.
        assert_eq!(op("RND12345", "/v1/health"), "other /v1/health");
        assert_eq!(operation(&Method::GET, None), "unmatched");
    }
}
