//! The seven App Mesh resource kinds as the control plane stores them: a key (mesh, parent, name),
//! a typed spec, tags and metadata. Builds App Mesh's `*Data` and `*Ref` bodies and ARNs.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::shapes::{
    GatewayRouteSpec, MeshSpec, RouteSpec, VirtualGatewaySpec, VirtualNodeSpec, VirtualRouterSpec,
    VirtualServiceSpec,
};

/// The kinds of App Mesh resource, ordered as the store keys them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ResourceKind {
    Mesh,
    VirtualNode,
    VirtualService,
    VirtualRouter,
    Route,
    VirtualGateway,
    GatewayRoute,
}

// === impl ResourceKind ===

impl ResourceKind {
    pub const ALL: [ResourceKind; 7] = [
        Self::Mesh,
        Self::VirtualNode,
        Self::VirtualService,
        Self::VirtualRouter,
        Self::Route,
        Self::VirtualGateway,
        Self::GatewayRoute,
    ];

    /// App Mesh's name for the kind, as in ARNs and messages (`virtualNode`).
    pub fn arn_segment(self) -> &'static str {
        match self {
            Self::Mesh => "mesh",
            Self::VirtualNode => "virtualNode",
            Self::VirtualService => "virtualService",
            Self::VirtualRouter => "virtualRouter",
            Self::Route => "route",
            Self::VirtualGateway => "virtualGateway",
            Self::GatewayRoute => "gatewayRoute",
        }
    }

    /// The member naming the resource in its `*Data` and `*Ref` shapes.
    pub fn name_member(self) -> &'static str {
        match self {
            Self::Mesh => "meshName",
            Self::VirtualNode => "virtualNodeName",
            Self::VirtualService => "virtualServiceName",
            Self::VirtualRouter => "virtualRouterName",
            Self::Route => "routeName",
            Self::VirtualGateway => "virtualGatewayName",
            Self::GatewayRoute => "gatewayRouteName",
        }
    }

    /// The kind of the parent a resource lives under (besides its mesh).
    pub fn parent(self) -> Option<ResourceKind> {
        match self {
            Self::Route => Some(Self::VirtualRouter),
            Self::GatewayRoute => Some(Self::VirtualGateway),
            _ => None,
        }
    }

    /// App Mesh's type name, as in error messages (`VirtualNode`).
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Mesh => "Mesh",
            Self::VirtualNode => "VirtualNode",
            Self::VirtualService => "VirtualService",
            Self::VirtualRouter => "VirtualRouter",
            Self::Route => "Route",
            Self::VirtualGateway => "VirtualGateway",
            Self::GatewayRoute => "GatewayRoute",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.type_name())
    }
}

/// Where a resource lives. Orders by kind, then mesh, parent and name, so that a range over one
/// prefix lists one collection in name order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    pub kind: ResourceKind,
    pub mesh: String,
    /// The virtual router of a route or the virtual gateway of a gateway route; empty otherwise.
    pub parent: String,
    /// The resource's own name; empty for a mesh (its name is `mesh`).
    pub name: String,
}

// === impl ResourceKey ===

impl ResourceKey {
    pub fn mesh(mesh: &str) -> Self {
        Self {
            kind: ResourceKind::Mesh,
            mesh: mesh.into(),
            parent: String::new(),
            name: String::new(),
        }
    }

    pub fn in_mesh(kind: ResourceKind, mesh: &str, name: &str) -> Self {
        Self {
            kind,
            mesh: mesh.into(),
            parent: String::new(),
            name: name.into(),
        }
    }

    pub fn child(kind: ResourceKind, mesh: &str, parent: &str, name: &str) -> Self {
        Self {
            kind,
            mesh: mesh.into(),
            parent: parent.into(),
            name: name.into(),
        }
    }

    /// The resource's own name.
    pub fn name(&self) -> &str {
        if self.kind == ResourceKind::Mesh {
            &self.mesh
        } else {
            &self.name
        }
    }

    /// The key of the parent resource (the mesh, or the router / gateway of a route).
    pub fn parent_key(&self) -> Option<ResourceKey> {
        match self.kind {
            ResourceKind::Mesh => None,
            k => match k.parent() {
                Some(pk) => Some(ResourceKey::in_mesh(pk, &self.mesh, &self.parent)),
                None => Some(ResourceKey::mesh(&self.mesh)),
            },
        }
    }

    /// The path part of the ARN after the account: `mesh/m/virtualRouter/r/route/x`.
    pub fn arn_resource(&self) -> String {
        let mut s = format!("mesh/{}", self.mesh);
        if let Some(pk) = self.kind.parent() {
            s.push_str(&format!("/{}/{}", pk.arn_segment(), self.parent));
        }
        if self.kind != ResourceKind::Mesh {
            s.push_str(&format!("/{}/{}", self.kind.arn_segment(), self.name));
        }
        s
    }

    /// Names the resource for messages: `VirtualNode with name vn in mesh m`,
    /// `Route with name r under VirtualRouter vr in mesh m`.
    pub fn describe(&self) -> String {
        match self.kind {
            ResourceKind::Mesh => format!("Mesh with name {}", self.mesh),
            k => match k.parent() {
                Some(p) => format!(
                    "{k} with name {} under {p} {} in mesh {}",
                    self.name, self.parent, self.mesh
                ),
                None => format!("{k} with name {} in mesh {}", self.name, self.mesh),
            },
        }
    }
}

/// Who owns a resource and where it lives, for ARNs and `meshOwner` / `resourceOwner`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The partition-local region in ARNs, e.g. `us-east-1`.
    pub region: String,
    /// The 12-digit account id.
    pub account: String,
}

impl Owner {
    pub fn arn(&self, key: &ResourceKey) -> String {
        format!(
            "arn:aws:appmesh:{}:{}:{}",
            self.region,
            self.account,
            key.arn_resource()
        )
    }
}

/// Parses an App Mesh ARN into the key it names; `None` when it is not one.
pub fn parse_arn(arn: &str) -> Option<(Owner, ResourceKey)> {
    let rest = arn.strip_prefix("arn:aws:appmesh:")?;
    let mut parts = rest.splitn(3, ':');
    let region = parts.next()?.to_string();
    let account = parts.next()?.to_string();
    let segs: Vec<&str> = parts.next()?.split('/').collect();
    if segs.len() < 2 || segs[0] != "mesh" || segs.iter().any(|s| s.is_empty()) {
        return None;
    }
    let mesh = segs[1];
    let key = match &segs[2..] {
        [] => ResourceKey::mesh(mesh),
        [kind, name] => {
            let kind = ResourceKind::ALL.into_iter().find(|k| {
                k.arn_segment() == *kind && k.parent().is_none() && *k != ResourceKind::Mesh
            })?;
            ResourceKey::in_mesh(kind, mesh, name)
        }
        [pkind, parent, kind, name] => {
            let kind = ResourceKind::ALL.into_iter().find(|k| {
                k.arn_segment() == *kind && k.parent().map(|p| p.arn_segment()) == Some(*pkind)
            })?;
            ResourceKey::child(kind, mesh, parent, name)
        }
        _ => return None,
    };
    Some((Owner { region, account }, key))
}

/// A resource's spec, typed by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Spec {
    Mesh(MeshSpec),
    VirtualNode(VirtualNodeSpec),
    VirtualService(VirtualServiceSpec),
    VirtualRouter(VirtualRouterSpec),
    Route(RouteSpec),
    VirtualGateway(VirtualGatewaySpec),
    GatewayRoute(GatewayRouteSpec),
}

impl Spec {
    pub fn kind(&self) -> ResourceKind {
        match self {
            Spec::Mesh(_) => ResourceKind::Mesh,
            Spec::VirtualNode(_) => ResourceKind::VirtualNode,
            Spec::VirtualService(_) => ResourceKind::VirtualService,
            Spec::VirtualRouter(_) => ResourceKind::VirtualRouter,
            Spec::Route(_) => ResourceKind::Route,
            Spec::VirtualGateway(_) => ResourceKind::VirtualGateway,
            Spec::GatewayRoute(_) => ResourceKind::GatewayRoute,
        }
    }

    fn to_json(&self) -> Value {
        let v = match self {
            Spec::Mesh(s) => serde_json::to_value(s),
            Spec::VirtualNode(s) => serde_json::to_value(s),
            Spec::VirtualService(s) => serde_json::to_value(s),
            Spec::VirtualRouter(s) => serde_json::to_value(s),
            Spec::Route(s) => serde_json::to_value(s),
            Spec::VirtualGateway(s) => serde_json::to_value(s),
            Spec::GatewayRoute(s) => serde_json::to_value(s),
        };
        // Plain data structs with string keys always serialize.
        v.unwrap_or(Value::Null)
    }
}

/// App Mesh's ResourceMetadata, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub arn: String,
    pub uid: String,
    pub version: i64,
    /// Epoch seconds (App Mesh's wire format for timestamps).
    pub created_at: f64,
    pub last_updated_at: f64,
    pub mesh_owner: String,
    pub resource_owner: String,
}

/// One stored resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub key: ResourceKey,
    pub metadata: Metadata,
    pub spec: Spec,
    /// Tags by key; sorted so tag listing pages are stable.
    pub tags: BTreeMap<String, String>,
    /// A virtual service's VIP (not part of App Mesh's shapes; served by DNS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<std::net::Ipv4Addr>,
}

/// The `status.status` a body reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Deleted,
}

// === impl Record ===

impl Record {
    fn names(&self, m: &mut BTreeMap<&'static str, Value>) {
        let k = &self.key;
        m.insert("meshName", Value::String(k.mesh.clone()));
        if let Some(pk) = k.kind.parent() {
            m.insert(pk.name_member(), Value::String(k.parent.clone()));
        }
        if k.kind != ResourceKind::Mesh {
            m.insert(k.kind.name_member(), Value::String(k.name.clone()));
        }
    }

    /// The `*Data` body App Mesh returns from Create/Describe/Update/Delete.
    pub fn to_data(&self, status: Status) -> Value {
        let md = &self.metadata;
        let mut m: BTreeMap<&'static str, Value> = BTreeMap::new();
        self.names(&mut m);
        let mut meta: BTreeMap<&'static str, Value> = BTreeMap::new();
        meta.insert("arn", Value::String(md.arn.clone()));
        meta.insert("createdAt", json_time(md.created_at));
        meta.insert("lastUpdatedAt", json_time(md.last_updated_at));
        meta.insert("meshOwner", Value::String(md.mesh_owner.clone()));
        meta.insert("resourceOwner", Value::String(md.resource_owner.clone()));
        meta.insert("uid", Value::String(md.uid.clone()));
        meta.insert("version", Value::from(md.version));
        m.insert("metadata", ordered(meta));
        m.insert("spec", self.spec.to_json());
        let status = match status {
            Status::Active => "ACTIVE",
            Status::Deleted => "DELETED",
        };
        let mut st = Map::new();
        st.insert("status".into(), Value::String(status.into()));
        m.insert("status", Value::Object(st));
        ordered(m)
    }

    /// The `*Ref` item App Mesh returns in list bodies.
    pub fn to_ref(&self) -> Value {
        let md = &self.metadata;
        let mut m: BTreeMap<&'static str, Value> = BTreeMap::new();
        self.names(&mut m);
        m.insert("arn", Value::String(md.arn.clone()));
        m.insert("createdAt", json_time(md.created_at));
        m.insert("lastUpdatedAt", json_time(md.last_updated_at));
        m.insert("meshOwner", Value::String(md.mesh_owner.clone()));
        m.insert("resourceOwner", Value::String(md.resource_owner.clone()));
        m.insert("version", Value::from(md.version));
        ordered(m)
    }
}

fn ordered(m: BTreeMap<&'static str, Value>) -> Value {
    Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// Epoch seconds with millisecond precision, as botocore parses them.
fn json_time(t: f64) -> Value {
    let ms = (t * 1000.0).round() / 1000.0;
    serde_json::Number::from_f64(ms)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns_round_trip_for_every_kind() {
        let owner = Owner {
            region: "us-west-2".into(),
            account: "123456789012".into(),
        };
        let keys = [
            ResourceKey::mesh("m"),
            ResourceKey::in_mesh(ResourceKind::VirtualNode, "m", "vn"),
            ResourceKey::in_mesh(ResourceKind::VirtualService, "m", "svc.local"),
            ResourceKey::in_mesh(ResourceKind::VirtualRouter, "m", "vr"),
            ResourceKey::child(ResourceKind::Route, "m", "vr", "r"),
            ResourceKey::in_mesh(ResourceKind::VirtualGateway, "m", "gw"),
            ResourceKey::child(ResourceKind::GatewayRoute, "m", "gw", "gr"),
        ];
        for k in keys {
            let arn = owner.arn(&k);
            assert_eq!(parse_arn(&arn), Some((owner.clone(), k)), "{arn}");
        }
        assert_eq!(
            owner.arn(&ResourceKey::child(ResourceKind::Route, "m", "vr", "r")),
            "arn:aws:appmesh:us-west-2:123456789012:mesh/m/virtualRouter/vr/route/r"
        );
        for bad in [
            "arn:aws:s3:::b",
            "arn:aws:appmesh:r:a:mesh",
            "arn:aws:appmesh:r:a:mesh/m/route/x",
            "arn:aws:appmesh:r:a:mesh/m/virtualNode/",
        ] {
            assert_eq!(parse_arn(bad), None, "{bad}");
        }
    }
}
