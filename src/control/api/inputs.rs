//! From an App Mesh request body to what a command needs: the new resource's name, its typed
//! spec, tags and clientToken, validated member by member and across members.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::body::parse;
use crate::model::command::{Idempotency, fingerprint};
use crate::model::rules;
use crate::model::shapes::*;
use crate::model::state::MAX_TAGS;
use crate::model::validate::{Validate, Validator};
use crate::model::{ApiError, ErrorKind, ResourceKind, Spec};

/// A parsed and validated Create or Update body.
pub struct Parsed {
    /// The new resource's name (Create only).
    pub name: Option<String>,
    pub spec: Spec,
    pub tags: Vec<TagRef>,
    pub idempotency: Option<Idempotency>,
}

fn body<T: DeserializeOwned + Validate + Serialize>(bytes: &[u8]) -> Result<(T, Value), ApiError> {
    let input: T = parse(bytes)?;
    let mut canonical =
        serde_json::to_value(&input).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut v = Validator::default();
    if let Some(tags) = canonical.get("tags").and_then(Value::as_array)
        && tags.len() > MAX_TAGS
    {
        return Err(ApiError::new(
            ErrorKind::TooManyTags,
            format!(
                "tags: a resource can have at most {MAX_TAGS} tags, got {}; no tags were applied",
                tags.len()
            ),
        ));
    }
    input.validate(&mut v);
    v.finish()?;
    if let Some(o) = canonical.as_object_mut() {
        o.remove("clientToken");
    }
    Ok((input, canonical))
}

fn idempotency(
    token: Option<String>,
    canonical: &Value,
    path: &str,
) -> Result<Option<Idempotency>, ApiError> {
    let Some(token) = token else { return Ok(None) };
    let mut v = Validator::default();
    v.field("clientToken", |v| {
        v.length(&token, 1, 36);
        if token
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            v.error("may contain only letters, digits, hyphens and underscores");
        }
    });
    v.finish()?;
    // The resource path is part of the request: the same body sent to another mesh differs.
    let fp = fingerprint(&serde_json::json!([path, canonical]));
    Ok(Some(Idempotency {
        token,
        fingerprint: fp,
    }))
}

fn check_spec(name: Option<(&str, &str)>, spec: &Spec) -> Result<(), ApiError> {
    let mut v = Validator::default();
    if let Some((member, name)) = name {
        rules::check_name(&mut v, member, name);
    }
    v.field("spec", |v| rules::check_spec(spec, v));
    v.finish().map_err(Into::into)
}

/// Parses a Create body for `kind` sent to `path`.
pub fn create(kind: ResourceKind, bytes: &[u8], path: &str) -> Result<Parsed, ApiError> {
    macro_rules! create {
        ($input:ty, $name:ident, $variant:ident, $spec:expr) => {{
            let (i, canonical): ($input, Value) = body(bytes)?;
            #[allow(clippy::redundant_closure_call)]
            let spec = Spec::$variant(($spec)(i.spec));
            check_spec(Some((kind.name_member(), &i.$name)), &spec)?;
            Parsed {
                idempotency: idempotency(i.client_token, &canonical, path)?,
                name: Some(i.$name),
                spec,
                tags: i.tags.unwrap_or_default(),
            }
        }};
    }
    Ok(match kind {
        ResourceKind::Mesh => create!(CreateMeshInput, mesh_name, Mesh, |s: Option<MeshSpec>| s
            .unwrap_or_default()),
        ResourceKind::VirtualNode => create!(
            CreateVirtualNodeInput,
            virtual_node_name,
            VirtualNode,
            |s| s
        ),
        ResourceKind::VirtualService => create!(
            CreateVirtualServiceInput,
            virtual_service_name,
            VirtualService,
            |s| s
        ),
        ResourceKind::VirtualRouter => create!(
            CreateVirtualRouterInput,
            virtual_router_name,
            VirtualRouter,
            |s| s
        ),
        ResourceKind::Route => create!(CreateRouteInput, route_name, Route, |s| s),
        ResourceKind::VirtualGateway => create!(
            CreateVirtualGatewayInput,
            virtual_gateway_name,
            VirtualGateway,
            |s| s
        ),
        ResourceKind::GatewayRoute => create!(
            CreateGatewayRouteInput,
            gateway_route_name,
            GatewayRoute,
            |s| s
        ),
    })
}

/// Parses an Update body for `kind` sent to `path`.
pub fn update(kind: ResourceKind, bytes: &[u8], path: &str) -> Result<Parsed, ApiError> {
    macro_rules! update {
        ($input:ty, $variant:ident, $spec:expr) => {{
            let (i, canonical): ($input, Value) = body(bytes)?;
            #[allow(clippy::redundant_closure_call)]
            let spec = Spec::$variant(($spec)(i.spec));
            check_spec(None, &spec)?;
            Parsed {
                idempotency: idempotency(i.client_token, &canonical, path)?,
                name: None,
                spec,
                tags: Vec::new(),
            }
        }};
    }
    Ok(match kind {
        ResourceKind::Mesh => update!(UpdateMeshInput, Mesh, |s: Option<MeshSpec>| s
            .unwrap_or_default()),
        ResourceKind::VirtualNode => update!(UpdateVirtualNodeInput, VirtualNode, |s| s),
        ResourceKind::VirtualService => update!(UpdateVirtualServiceInput, VirtualService, |s| s),
        ResourceKind::VirtualRouter => update!(UpdateVirtualRouterInput, VirtualRouter, |s| s),
        ResourceKind::Route => update!(UpdateRouteInput, Route, |s| s),
        ResourceKind::VirtualGateway => update!(UpdateVirtualGatewayInput, VirtualGateway, |s| s),
        ResourceKind::GatewayRoute => update!(UpdateGatewayRouteInput, GatewayRoute, |s| s),
    })
}

/// Parses a TagResource body.
pub fn tags(bytes: &[u8]) -> Result<Vec<TagRef>, ApiError> {
    let (i, _): (TagResourceInput, Value) = body(bytes)?;
    Ok(i.tags)
}

/// Parses an UntagResource body.
pub fn tag_keys(bytes: &[u8]) -> Result<Vec<String>, ApiError> {
    let (i, _): (UntagResourceInput, Value) = body(bytes)?;
    Ok(i.tag_keys)
}
