//! App Mesh API conformance through the real `aws` CLI: all 38 operations of the 2019-01-25 API,
//! driven with the color app from the App Mesh examples, with every output field checked the
//! way App Mesh answers (names, spec round-trip, ARN, version, status, owners, timestamps),
//! list paging, tags, client tokens, and every error class.
//!
//! Each test starts its own `trellis dev`, so tests run in parallel. Setup that is not the
//! subject of a test (e.g. the 200 virtual nodes of the quota test) goes through raw HTTP with
//! curl, because one CLI call costs about half a second.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{ACCOUNT, AwsOut, DevNode, REGION, assert_contains, epoch, js};
use serde_json::{Value, json};

// === resources ===

/// The seven App Mesh resource kinds, with the names the CLI, the wire and ARNs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Mesh,
    VirtualNode,
    VirtualService,
    VirtualRouter,
    Route,
    VirtualGateway,
    GatewayRoute,
}

impl Kind {
    /// The member the CLI wraps a `*Data` in, which is also the ARN segment.
    fn member(self) -> &'static str {
        match self {
            Kind::Mesh => "mesh",
            Kind::VirtualNode => "virtualNode",
            Kind::VirtualService => "virtualService",
            Kind::VirtualRouter => "virtualRouter",
            Kind::Route => "route",
            Kind::VirtualGateway => "virtualGateway",
            Kind::GatewayRoute => "gatewayRoute",
        }
    }

    /// `create-<this>`, `describe-<this>`, …
    fn cli(self) -> &'static str {
        match self {
            Kind::Mesh => "mesh",
            Kind::VirtualNode => "virtual-node",
            Kind::VirtualService => "virtual-service",
            Kind::VirtualRouter => "virtual-router",
            Kind::Route => "route",
            Kind::VirtualGateway => "virtual-gateway",
            Kind::GatewayRoute => "gateway-route",
        }
    }

    fn name_member(self) -> &'static str {
        match self {
            Kind::Mesh => "meshName",
            Kind::VirtualNode => "virtualNodeName",
            Kind::VirtualService => "virtualServiceName",
            Kind::VirtualRouter => "virtualRouterName",
            Kind::Route => "routeName",
            Kind::VirtualGateway => "virtualGatewayName",
            Kind::GatewayRoute => "gatewayRouteName",
        }
    }

    fn name_flag(self) -> &'static str {
        match self {
            Kind::Mesh => "--mesh-name",
            Kind::VirtualNode => "--virtual-node-name",
            Kind::VirtualService => "--virtual-service-name",
            Kind::VirtualRouter => "--virtual-router-name",
            Kind::Route => "--route-name",
            Kind::VirtualGateway => "--virtual-gateway-name",
            Kind::GatewayRoute => "--gateway-route-name",
        }
    }

    /// The list output member (`meshes`, `virtualNodes`, …); also the URI collection.
    fn plural(self) -> &'static str {
        match self {
            Kind::Mesh => "meshes",
            Kind::VirtualNode => "virtualNodes",
            Kind::VirtualService => "virtualServices",
            Kind::VirtualRouter => "virtualRouters",
            Kind::Route => "routes",
            Kind::VirtualGateway => "virtualGateways",
            Kind::GatewayRoute => "gatewayRoutes",
        }
    }

    fn list_cli(self) -> &'static str {
        match self {
            Kind::Mesh => "list-meshes",
            Kind::VirtualNode => "list-virtual-nodes",
            Kind::VirtualService => "list-virtual-services",
            Kind::VirtualRouter => "list-virtual-routers",
            Kind::Route => "list-routes",
            Kind::VirtualGateway => "list-virtual-gateways",
            Kind::GatewayRoute => "list-gateway-routes",
        }
    }

    fn parent(self) -> Option<Kind> {
        match self {
            Kind::Route => Some(Kind::VirtualRouter),
            Kind::GatewayRoute => Some(Kind::VirtualGateway),
            _ => None,
        }
    }
}

/// One resource: its kind, mesh, parent (router or gateway, for routes) and name.
#[derive(Clone, Debug)]
struct Res {
    kind: Kind,
    mesh: String,
    parent: String,
    name: String,
}

impl Res {
    fn new(kind: Kind, mesh: &str, parent: &str, name: &str) -> Res {
        Res {
            kind,
            mesh: mesh.into(),
            parent: parent.into(),
            name: name.into(),
        }
    }
    fn mesh(name: &str) -> Res {
        Res::new(Kind::Mesh, name, "", name)
    }
    fn vn(mesh: &str, name: &str) -> Res {
        Res::new(Kind::VirtualNode, mesh, "", name)
    }
    fn vs(mesh: &str, name: &str) -> Res {
        Res::new(Kind::VirtualService, mesh, "", name)
    }
    fn vr(mesh: &str, name: &str) -> Res {
        Res::new(Kind::VirtualRouter, mesh, "", name)
    }
    fn vg(mesh: &str, name: &str) -> Res {
        Res::new(Kind::VirtualGateway, mesh, "", name)
    }
    fn route(mesh: &str, router: &str, name: &str) -> Res {
        Res::new(Kind::Route, mesh, router, name)
    }
    fn gateway_route(mesh: &str, gateway: &str, name: &str) -> Res {
        Res::new(Kind::GatewayRoute, mesh, gateway, name)
    }

    fn arn(&self) -> String {
        let mut s = format!("arn:aws:appmesh:{REGION}:{ACCOUNT}:mesh/{}", self.mesh);
        if let Some(p) = self.kind.parent() {
            s.push_str(&format!("/{}/{}", p.member(), self.parent));
        }
        if self.kind != Kind::Mesh {
            s.push_str(&format!("/{}/{}", self.kind.member(), self.name));
        }
        s
    }

    /// CLI arguments naming where the resource lives (for create and list).
    fn parent_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.kind != Kind::Mesh {
            a.push("--mesh-name".to_string());
            a.push(self.mesh.clone());
        }
        if let Some(p) = self.kind.parent() {
            a.push(p.name_flag().to_string());
            a.push(self.parent.clone());
        }
        a
    }

    /// CLI arguments naming the resource itself.
    fn id_args(&self) -> Vec<String> {
        let mut a = self.parent_args();
        a.push(self.kind.name_flag().to_string());
        a.push(self.name.clone());
        a
    }

    /// The name members every `*Data` and `*Ref` of this resource carries.
    fn names(&self) -> Vec<(&'static str, String)> {
        let mut n = vec![("meshName", self.mesh.clone())];
        if let Some(p) = self.kind.parent() {
            n.push((p.name_member(), self.parent.clone()));
        }
        if self.kind != Kind::Mesh {
            n.push((self.kind.name_member(), self.name.clone()));
        }
        n
    }

    /// The REST collection the resource is created in.
    fn collection_path(&self) -> String {
        match self.kind {
            Kind::Mesh => "/v20190125/meshes".to_string(),
            Kind::Route => format!(
                "/v20190125/meshes/{}/virtualRouter/{}/routes",
                self.mesh, self.parent
            ),
            Kind::GatewayRoute => format!(
                "/v20190125/meshes/{}/virtualGateway/{}/gatewayRoutes",
                self.mesh, self.parent
            ),
            k => format!("/v20190125/meshes/{}/{}", self.mesh, k.plural()),
        }
    }

    /// The REST path of the resource itself.
    fn path(&self) -> String {
        format!("{}/{}", self.collection_path(), self.name)
    }
}

// === CLI and raw-HTTP operations ===

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `aws appmesh <op>-<kind> <ids> <extra>`.
fn run(node: &DevNode, op: &str, res: &Res, extra: &[&str]) -> AwsOut {
    let mut args = vec![format!("{op}-{}", res.kind.cli())];
    args.extend(res.id_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    node.aws(&strs(&args))
}

#[track_caller]
fn run_ok(node: &DevNode, op: &str, res: &Res, extra: &[&str]) -> Value {
    let out = run(node, op, res, extra);
    assert_eq!(
        out.status,
        0,
        "{op}-{} {}: exit {}\n{}",
        res.kind.cli(),
        res.name,
        out.status,
        out.stderr
    );
    out.json.get(res.kind.member()).cloned().unwrap_or_else(|| {
        panic!(
            "{op}-{} printed no {:?} member: {}",
            res.kind.cli(),
            res.kind.member(),
            out.json
        )
    })
}

/// Runs `<op>-<kind>`, which must fail with `code`; returns stderr.
#[track_caller]
fn run_err(node: &DevNode, op: &str, res: &Res, extra: &[&str], code: &str) -> String {
    let mut args = vec![format!("{op}-{}", res.kind.cli())];
    args.extend(res.id_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    node.aws_err(&strs(&args), code)
}

#[track_caller]
fn create(node: &DevNode, res: &Res, spec: &Value) -> Value {
    run_ok(node, "create", res, &["--spec", &js(spec)])
}

#[track_caller]
fn create_tagged(node: &DevNode, res: &Res, spec: &Value, tags: &Value) -> Value {
    run_ok(
        node,
        "create",
        res,
        &["--spec", &js(spec), "--tags", &js(tags)],
    )
}

#[track_caller]
fn describe(node: &DevNode, res: &Res) -> Value {
    run_ok(node, "describe", res, &[])
}

#[track_caller]
fn update(node: &DevNode, res: &Res, spec: &Value) -> Value {
    run_ok(node, "update", res, &["--spec", &js(spec)])
}

#[track_caller]
fn delete(node: &DevNode, res: &Res) -> Value {
    run_ok(node, "delete", res, &[])
}

/// `list-<kind>s` for the collection `res` lives in (the CLI follows every page).
#[track_caller]
fn list(node: &DevNode, res: &Res, extra: &[&str]) -> Vec<Value> {
    let mut args = vec![res.kind.list_cli().to_string()];
    args.extend(res.parent_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = node.aws_ok(&strs(&args));
    assert!(
        out.get("nextToken").is_none() && out.get("NextToken").is_none(),
        "{} returned a token although every page was followed: {out}",
        res.kind.list_cli()
    );
    out[res.kind.plural()]
        .as_array()
        .unwrap_or_else(|| {
            panic!(
                "{} printed no {} list: {out}",
                res.kind.list_cli(),
                res.kind.plural()
            )
        })
        .clone()
}

/// The names in a list of `*Ref`s, in the order returned.
fn ref_names(items: &[Value], kind: Kind) -> Vec<String> {
    items
        .iter()
        .map(|r| {
            r[kind.name_member()]
                .as_str()
                .unwrap_or_else(|| panic!("ref without {}: {r}", kind.name_member()))
                .to_string()
        })
        .collect()
}

/// Creates a resource over raw HTTP (for setup that is not under test); returns the body.
#[track_caller]
fn raw_create(node: &DevNode, res: &Res, spec: &Value) -> Value {
    let mut body = json!({ "spec": spec });
    body[res.kind.name_member()] = json!(res.name);
    node.http_ok("PUT", &res.collection_path(), Some(&body))
}

// === checks ===

/// Metadata values carried from one answer to the next.
#[derive(Debug, Clone)]
struct Meta {
    uid: String,
    created: f64,
    updated: f64,
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-3
}

/// Checks a `*Data` as the CLI prints it: names, spec exactly as sent, status, and metadata.
#[track_caller]
fn check_data(data: &Value, res: &Res, spec: &Value, version: i64, status: &str) -> Meta {
    for (member, want) in res.names() {
        assert_eq!(data[member], json!(want), "{member} in {data}");
    }
    assert_eq!(
        &data["spec"],
        spec,
        "spec of {} {} must come back exactly as sent",
        res.kind.member(),
        res.name
    );
    assert_eq!(data["status"]["status"], json!(status), "status in {data}");
    let md = &data["metadata"];
    assert_eq!(md["arn"], json!(res.arn()), "arn in {md}");
    assert_eq!(md["version"].as_i64(), Some(version), "version in {md}");
    assert_eq!(md["meshOwner"], json!(ACCOUNT), "meshOwner in {md}");
    assert_eq!(md["resourceOwner"], json!(ACCOUNT), "resourceOwner in {md}");
    let uid = md["uid"]
        .as_str()
        .unwrap_or_else(|| panic!("uid must be a string: {md}"))
        .to_string();
    assert!(!uid.is_empty(), "uid must not be empty");
    let created = epoch(&md["createdAt"]);
    let updated = epoch(&md["lastUpdatedAt"]);
    assert!(created > 1.5e9, "createdAt {created} is not epoch seconds");
    assert!(
        updated >= created,
        "lastUpdatedAt {updated} < createdAt {created}"
    );
    Meta {
        uid,
        created,
        updated,
    }
}

/// Checks a `*Ref` list item: names, arn, owners, version, timestamps, and no `*Data`-only
/// members.
#[track_caller]
fn check_ref(item: &Value, res: &Res, version: i64) -> Meta {
    for (member, want) in res.names() {
        assert_eq!(item[member], json!(want), "{member} in {item}");
    }
    assert_eq!(item["arn"], json!(res.arn()), "arn in {item}");
    assert_eq!(item["meshOwner"], json!(ACCOUNT), "meshOwner in {item}");
    assert_eq!(
        item["resourceOwner"],
        json!(ACCOUNT),
        "resourceOwner in {item}"
    );
    assert_eq!(item["version"].as_i64(), Some(version), "version in {item}");
    let created = epoch(&item["createdAt"]);
    let updated = epoch(&item["lastUpdatedAt"]);
    assert!(updated >= created, "lastUpdatedAt < createdAt in {item}");
    for member in ["spec", "status", "metadata", "uid"] {
        assert!(item.get(member).is_none(), "a *Ref has no {member}: {item}");
    }
    Meta {
        uid: String::new(),
        created,
        updated,
    }
}

/// The item named `name` in a list.
#[track_caller]
fn find<'a>(items: &'a [Value], kind: Kind, name: &str) -> &'a Value {
    items
        .iter()
        .find(|r| r[kind.name_member()] == json!(name))
        .unwrap_or_else(|| panic!("{name} is not in the list: {items:?}"))
}

/// The full life of one resource short of deletion, through the CLI: create (with tags),
/// describe, update, describe again, list. Checks every field at every step and returns the
/// metadata after the update.
#[track_caller]
fn lifecycle(node: &DevNode, res: &Res, spec: &Value, updated_spec: &Value) -> Meta {
    let tags = json!([{"key": "app", "value": "color"}]);
    let created = create_tagged(node, res, spec, &tags);
    let m1 = check_data(&created, res, spec, 1, "ACTIVE");

    let described = describe(node, res);
    let d1 = check_data(&described, res, spec, 1, "ACTIVE");
    assert_eq!(d1.uid, m1.uid, "describe must show the uid create returned");
    assert!(close(d1.created, m1.created), "createdAt changed");
    assert!(close(d1.updated, m1.updated), "lastUpdatedAt changed");

    let updated = update(node, res, updated_spec);
    let m2 = check_data(&updated, res, updated_spec, 2, "ACTIVE");
    assert_eq!(m2.uid, m1.uid, "an update keeps the uid");
    assert!(close(m2.created, m1.created), "an update keeps createdAt");
    assert!(
        m2.updated >= m1.updated,
        "lastUpdatedAt went backwards on update"
    );

    let described = describe(node, res);
    let d2 = check_data(&described, res, updated_spec, 2, "ACTIVE");
    assert_eq!(d2.uid, m1.uid);
    assert!(close(d2.created, m1.created));
    assert!(close(d2.updated, m2.updated));

    let items = list(node, res, &[]);
    let r = check_ref(find(&items, res.kind, &res.name), res, 2);
    assert!(close(r.created, m1.created), "list createdAt differs");
    assert!(close(r.updated, m2.updated), "list lastUpdatedAt differs");

    m2
}

/// Deletes through the CLI and checks the answer (status DELETED, last spec and version), that
/// describe now answers NotFoundException and that the list no longer holds it. (The follow-up
/// reads go over raw HTTP: the CLI's side of them is covered elsewhere, and it is slow.)
#[track_caller]
fn delete_checked(node: &DevNode, res: &Res, spec: &Value, version: i64) {
    let data = delete(node, res);
    check_data(&data, res, spec, version, "DELETED");
    let r = node.curl("GET", &res.path(), None);
    assert_eq!(
        (r.status, r.error_type()),
        (404, Some("NotFoundException")),
        "describe after delete: {}",
        r.body
    );
    assert!(
        !raw_list_names(node, res).contains(&res.name),
        "{} is still listed after delete",
        res.name
    );
}

/// Every name in the collection `res` lives in, over raw HTTP, following `nextToken`.
#[track_caller]
fn raw_list_names(node: &DevNode, res: &Res) -> Vec<String> {
    let base = res.collection_path();
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            None => base.clone(),
            Some(t) => format!("{base}?nextToken={}", urlencode(t)),
        };
        let page = node.http_ok("GET", &path, None);
        let items = page[res.kind.plural()]
            .as_array()
            .unwrap_or_else(|| panic!("GET {path}: no {} list: {page}", res.kind.plural()));
        names.extend(ref_names(items, res.kind));
        match page.get("nextToken") {
            Some(Value::String(t)) => token = Some(t.clone()),
            _ => return names,
        }
    }
}

/// Creates a mesh with the CLI, checked.
#[track_caller]
fn make_mesh(node: &DevNode, name: &str) -> Res {
    let mesh = Res::mesh(name);
    let data = run_ok(node, "create", &mesh, &[]);
    assert_eq!(data["meshName"], json!(name));
    mesh
}

/// Creates a mesh over raw HTTP.
#[track_caller]
fn raw_mesh(node: &DevNode, name: &str) -> Res {
    let mesh = Res::mesh(name);
    node.http_ok(
        "PUT",
        "/v20190125/meshes",
        Some(&json!({"meshName": name, "spec": {}})),
    );
    mesh
}

// === the color app ===

const MESH: &str = "color";

/// A colorteller virtual node: one http listener on 9080 with health check, outlier detection,
/// connection pool and timeouts, found through DNS.
fn teller_spec(color: &str) -> Value {
    json!({
        "listeners": [{
            "portMapping": {"port": 9080, "protocol": "http"},
            "healthCheck": {
                "protocol": "http",
                "path": "/ping",
                "port": 9080,
                "healthyThreshold": 2,
                "unhealthyThreshold": 3,
                "timeoutMillis": 2000,
                "intervalMillis": 5000
            },
            "outlierDetection": {
                "maxServerErrors": 5,
                "interval": {"value": 10, "unit": "s"},
                "baseEjectionDuration": {"value": 30, "unit": "s"},
                "maxEjectionPercent": 50
            },
            "connectionPool": {"http": {"maxConnections": 100, "maxPendingRequests": 200}},
            "timeout": {"http": {
                "perRequest": {"value": 15, "unit": "s"},
                "idle": {"value": 300, "unit": "s"}
            }}
        }],
        "serviceDiscovery": {"dns": {"hostname": format!("colorteller-{color}.color.local")}},
        "logging": {"accessLog": {"file": {"path": "/dev/stdout"}}}
    })
}

/// The colorgateway virtual node: calls colorteller.color.local over mTLS with file
/// certificates and a SAN match.
fn gateway_node_spec() -> Value {
    json!({
        "listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
        "serviceDiscovery": {"dns": {"hostname": "colorgateway.color.local", "responseType": "LOADBALANCER"}},
        "backends": [{"virtualService": {
            "virtualServiceName": "colorteller.color.local",
            "clientPolicy": {"tls": {
                "enforce": true,
                "ports": [9080],
                "certificate": {"file": {
                    "certificateChain": "/keys/colorgateway_cert_chain.pem",
                    "privateKey": "/keys/colorgateway_key.pem"
                }},
                "validation": {
                    "trust": {"file": {"certificateChain": "/keys/ca_cert.pem"}},
                    "subjectAlternativeNames": {"match": {"exact": ["colorteller.color.local"]}}
                }
            }}
        }}],
        "backendDefaults": {"clientPolicy": {"tls": {
            "validation": {"trust": {"file": {"certificateChain": "/keys/ca_cert.pem"}}}
        }}},
        "logging": {"accessLog": {"file": {"path": "/dev/stdout"}}}
    })
}

/// A virtual node with two listeners: http on 8080 and grpc on 8081.
fn multi_node_spec() -> Value {
    json!({
        "listeners": [
            {
                "portMapping": {"port": 8080, "protocol": "http"},
                "healthCheck": {
                    "protocol": "http", "path": "/health", "port": 8080,
                    "healthyThreshold": 2, "unhealthyThreshold": 2,
                    "timeoutMillis": 2000, "intervalMillis": 10000
                },
                "timeout": {"http": {"perRequest": {"value": 30, "unit": "s"}}}
            },
            {
                "portMapping": {"port": 8081, "protocol": "grpc"},
                "healthCheck": {
                    "protocol": "grpc", "port": 8081,
                    "healthyThreshold": 3, "unhealthyThreshold": 2,
                    "timeoutMillis": 3000, "intervalMillis": 10000
                },
                "connectionPool": {"grpc": {"maxRequests": 512}},
                "timeout": {"grpc": {
                    "perRequest": {"value": 0, "unit": "s"},
                    "idle": {"value": 600, "unit": "s"}
                }}
            }
        ],
        "serviceDiscovery": {"dns": {"hostname": "colorteller-multi.color.local", "responseType": "ENDPOINTS"}}
    })
}

/// A virtual node whose listener requires TLS (STRICT) with a file certificate, and checks
/// clients against a trust file and a SAN list.
fn secure_node_spec() -> Value {
    json!({
        "listeners": [{
            "portMapping": {"port": 9443, "protocol": "http2"},
            "tls": {
                "mode": "STRICT",
                "certificate": {"file": {
                    "certificateChain": "/keys/colorteller_cert_chain.pem",
                    "privateKey": "/keys/colorteller_key.pem"
                }},
                "validation": {
                    "trust": {"file": {"certificateChain": "/keys/ca_cert.pem"}},
                    "subjectAlternativeNames": {"match": {"exact": ["colorgateway.color.local"]}}
                }
            },
            "connectionPool": {"http2": {"maxRequests": 256}}
        }],
        "serviceDiscovery": {"dns": {"hostname": "colorteller-secure.color.local"}}
    })
}

fn router_spec(port: u16, protocol: &str) -> Value {
    json!({"listeners": [{"portMapping": {"port": port, "protocol": protocol}}]})
}

/// The colorteller route: weighted red 1 / blue 1 / white 0, retries, timeouts, and header,
/// method and query matches.
fn color_route_spec(red: u32, blue: u32, white: u32) -> Value {
    json!({
        "priority": 10,
        "httpRoute": {
            "match": {
                "prefix": "/",
                "method": "GET",
                "headers": [
                    {"name": "x-color-canary", "invert": false, "match": {"exact": "true"}},
                    {"name": "x-color-weight", "match": {"range": {"start": 1, "end": 100}}},
                    {"name": "user-agent", "invert": true, "match": {"regex": ".*bot.*"}}
                ],
                "queryParameters": [{"name": "color", "match": {"exact": "any"}}]
            },
            "action": {"weightedTargets": [
                {"virtualNode": "colorteller-red", "weight": red},
                {"virtualNode": "colorteller-blue", "weight": blue},
                {"virtualNode": "colorteller-white", "weight": white}
            ]},
            "retryPolicy": {
                "maxRetries": 3,
                "perRetryTimeout": {"value": 2000, "unit": "ms"},
                "httpRetryEvents": ["server-error", "gateway-error"],
                "tcpRetryEvents": ["connection-error"]
            },
            "timeout": {
                "perRequest": {"value": 10, "unit": "s"},
                "idle": {"value": 60, "unit": "s"}
            }
        }
    })
}

/// A router with two listeners: http on 8080 and grpc on 8081.
fn multi_router_spec() -> Value {
    json!({"listeners": [
        {"portMapping": {"port": 8080, "protocol": "http"}},
        {"portMapping": {"port": 8081, "protocol": "grpc"}}
    ]})
}

fn multi_http_route_spec() -> Value {
    json!({
        "httpRoute": {
            "match": {"prefix": "/color", "port": 8080},
            "action": {"weightedTargets": [{"virtualNode": "colorteller-multi", "weight": 100, "port": 8080}]}
        }
    })
}

fn grpc_route_spec(max_retries: u32) -> Value {
    json!({
        "priority": 0,
        "grpcRoute": {
            "match": {
                "serviceName": "color.ColorService",
                "methodName": "GetColor",
                "port": 8081,
                "metadata": [
                    {"name": "x-tenant", "match": {"prefix": "blue"}},
                    {"name": "x-debug", "invert": true, "match": {"exact": "1"}}
                ]
            },
            "action": {"weightedTargets": [{"virtualNode": "colorteller-multi", "weight": 1, "port": 8081}]},
            "retryPolicy": {
                "maxRetries": max_retries,
                "perRetryTimeout": {"value": 1, "unit": "s"},
                "grpcRetryEvents": ["unavailable", "deadline-exceeded", "resource-exhausted"],
                "httpRetryEvents": ["stream-error"],
                "tcpRetryEvents": ["connection-error"]
            },
            "timeout": {"perRequest": {"value": 5, "unit": "s"}, "idle": {"value": 120, "unit": "s"}}
        }
    })
}

fn tcp_route_spec(idle_s: u32) -> Value {
    json!({
        "tcpRoute": {
            "match": {"port": 7000},
            "action": {"weightedTargets": [
                {"virtualNode": "colorteller-white", "weight": 9},
                {"virtualNode": "colorteller-red", "weight": 1}
            ]},
            "timeout": {"idle": {"value": idle_s, "unit": "s"}}
        }
    })
}

/// The color app's ingress gateway: http on 8080 with a health check and connection pool, JSON
/// access logs to stdout, TLS to backends.
fn ingress_spec(max_connections: u32) -> Value {
    json!({
        "listeners": [{
            "portMapping": {"port": 8080, "protocol": "http"},
            "healthCheck": {
                "protocol": "http", "path": "/health", "port": 8080,
                "healthyThreshold": 2, "unhealthyThreshold": 3,
                "timeoutMillis": 2000, "intervalMillis": 5000
            },
            "connectionPool": {"http": {"maxConnections": max_connections, "maxPendingRequests": 512}}
        }],
        "logging": {"accessLog": {"file": {
            "path": "/dev/stdout",
            "format": {"json": [
                {"key": "start_time", "value": "%START_TIME%"},
                {"key": "method", "value": "%REQ(:METHOD)%"},
                {"key": "path", "value": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"},
                {"key": "status", "value": "%RESPONSE_CODE%"}
            ]}
        }}},
        "backendDefaults": {"clientPolicy": {"tls": {
            "enforce": true,
            "validation": {"trust": {"file": {"certificateChain": "/keys/ca_cert.pem"}}}
        }}}
    })
}

/// A gateway with an http2 listener (TLS STRICT) on 8443 and a grpc listener on 9090.
fn multi_gateway_spec() -> Value {
    json!({
        "listeners": [
            {
                "portMapping": {"port": 8443, "protocol": "http2"},
                "tls": {
                    "mode": "STRICT",
                    "certificate": {"file": {
                        "certificateChain": "/keys/ingress_cert_chain.pem",
                        "privateKey": "/keys/ingress_key.pem"
                    }},
                    "validation": {
                        "trust": {"file": {"certificateChain": "/keys/client_ca.pem"}},
                        "subjectAlternativeNames": {"match": {"exact": ["partner.example.com"]}}
                    }
                },
                "connectionPool": {"http2": {"maxRequests": 1000}}
            },
            {
                "portMapping": {"port": 9090, "protocol": "grpc"},
                "healthCheck": {
                    "protocol": "grpc", "port": 9090,
                    "healthyThreshold": 2, "unhealthyThreshold": 2,
                    "timeoutMillis": 2000, "intervalMillis": 5000
                }
            }
        ],
        "logging": {"accessLog": {"file": {
            "path": "/dev/stdout",
            "format": {"text": "[%START_TIME%] %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE%\n"}
        }}}
    })
}

/// Hostname suffix + prefix match, rewritten to another prefix.
fn host_route_spec(value: &str) -> Value {
    json!({
        "priority": 5,
        "httpRoute": {
            "match": {
                "prefix": "/paint/",
                "hostname": {"suffix": ".color.example.com"}
            },
            "action": {
                "target": {"virtualService": {"virtualServiceName": "colorteller.color.local"}},
                "rewrite": {
                    "prefix": {"value": value},
                    "hostname": {"defaultTargetHostname": "ENABLED"}
                }
            }
        }
    })
}

/// Exact path match, rewritten to another exact path.
fn exact_route_spec() -> Value {
    json!({
        "httpRoute": {
            "match": {
                "path": {"exact": "/legacy/color"},
                "method": "GET",
                "queryParameters": [{"name": "format", "match": {"exact": "json"}}],
                "headers": [{"name": "x-legacy", "match": {"prefix": "v1"}}]
            },
            "action": {
                "target": {"virtualService": {"virtualServiceName": "colorteller.color.local"}},
                "rewrite": {"path": {"exact": "/color"}}
            }
        }
    })
}

fn h2_gateway_route_spec() -> Value {
    json!({
        "http2Route": {
            "match": {
                "prefix": "/",
                "port": 8443,
                "hostname": {"exact": "color.example.com"},
                "headers": [{"name": "x-partner", "match": {"suffix": "-blue"}}]
            },
            "action": {
                "target": {"virtualService": {"virtualServiceName": "colorteller.color.local"}, "port": 9080},
                "rewrite": {"prefix": {"defaultPrefix": "DISABLED"}}
            }
        }
    })
}

fn grpc_gateway_route_spec() -> Value {
    json!({
        "priority": 1,
        "grpcRoute": {
            "match": {
                "serviceName": "color.ColorService",
                "port": 9090,
                "hostname": {"suffix": ".color.example.com"},
                "metadata": [{"name": "x-tenant", "match": {"exact": "blue"}}]
            },
            "action": {
                "target": {"virtualService": {"virtualServiceName": "colorteller-multi.color.local"}},
                "rewrite": {"hostname": {"defaultTargetHostname": "DISABLED"}}
            }
        }
    })
}

fn vs_router_spec(router: &str) -> Value {
    json!({"provider": {"virtualRouter": {"virtualRouterName": router}}})
}

fn vs_node_spec(node: &str) -> Value {
    json!({"provider": {"virtualNode": {"virtualNodeName": node}}})
}

/// The color app's mesh, nodes and router (raw HTTP), for tests about other resources.
fn color_base(node: &DevNode) {
    raw_mesh(node, MESH);
    for color in ["red", "blue", "white"] {
        raw_create(
            node,
            &Res::vn(MESH, &format!("colorteller-{color}")),
            &teller_spec(color),
        );
    }
    raw_create(
        node,
        &Res::vn(MESH, "colorteller-multi"),
        &multi_node_spec(),
    );
    raw_create(node, &Res::vn(MESH, "colorgateway"), &gateway_node_spec());
    raw_create(
        node,
        &Res::vr(MESH, "colorteller-vr"),
        &router_spec(9080, "http"),
    );
}

// === meshes ===

#[test]
fn mesh_operations() {
    let node = DevNode::start();
    assert_eq!(
        node.aws_ok(&["list-meshes"]),
        json!({"meshes": []}),
        "a new node has no meshes"
    );

    let color = Res::mesh(MESH);
    let spec = json!({
        "egressFilter": {"type": "ALLOW_ALL"},
        "serviceDiscovery": {"ipPreference": "IPv4_PREFERRED"}
    });
    let spec2 = json!({"egressFilter": {"type": "DROP_ALL"}});
    let m = lifecycle(&node, &color, &spec, &spec2);

    // A mesh created without a spec answers with an empty spec: nothing is filled in.
    let plain = Res::mesh("color-plain");
    let data = run_ok(&node, "create", &plain, &[]);
    let p = check_data(&data, &plain, &json!({}), 1, "ACTIVE");
    assert_ne!(p.uid, m.uid, "uids are unique");

    // list-meshes: name order, refs complete, also one item per page.
    for extra in [&[][..], &["--page-size", "1"][..]] {
        let items = list(&node, &color, extra);
        assert_eq!(ref_names(&items, Kind::Mesh), ["color", "color-plain"]);
        check_ref(&items[0], &color, 2);
        check_ref(&items[1], &plain, 1);
    }

    // A third update bumps the version again.
    let data = update(&node, &color, &spec);
    let m3 = check_data(&data, &color, &spec, 3, "ACTIVE");
    assert_eq!(m3.uid, m.uid);
    assert!(close(m3.created, m.created));
    assert!(m3.updated >= m.updated);

    delete_checked(&node, &color, &spec, 3);
    assert_eq!(
        ref_names(&list(&node, &plain, &[]), Kind::Mesh),
        ["color-plain"]
    );

    // Re-creating a deleted name makes a new resource (new uid, version 1).
    let data = run_ok(&node, "create", &color, &["--spec", &js(&spec2)]);
    let again = check_data(&data, &color, &spec2, 1, "ACTIVE");
    assert_ne!(again.uid, m.uid, "a re-created mesh gets a new uid");

    delete_checked(&node, &color, &spec2, 1);
    delete_checked(&node, &plain, &json!({}), 1);
    assert_eq!(node.aws_ok(&["list-meshes"]), json!({"meshes": []}));
}

// === virtual nodes ===

#[test]
fn virtual_node_operations() {
    let node = DevNode::start();
    make_mesh(&node, MESH);

    // colorteller-red: the full create/describe/update/list cycle.
    let red = Res::vn(MESH, "colorteller-red");
    let mut red2 = teller_spec("red");
    red2["listeners"][0]["outlierDetection"]["maxServerErrors"] = json!(10);
    red2["listeners"][0]["timeout"]["http"]["perRequest"] = json!({"value": 30000, "unit": "ms"});
    red2["backends"] =
        json!([{"virtualService": {"virtualServiceName": "colorteller.color.local"}}]);
    lifecycle(&node, &red, &teller_spec("red"), &red2);

    // The other color app nodes, each checked field by field.
    let others = [
        (Res::vn(MESH, "colorteller-blue"), teller_spec("blue")),
        (Res::vn(MESH, "colorteller-white"), teller_spec("white")),
        (Res::vn(MESH, "colorgateway"), gateway_node_spec()),
        (Res::vn(MESH, "colorteller-multi"), multi_node_spec()),
        (Res::vn(MESH, "colorteller-secure"), secure_node_spec()),
        (
            Res::vn(MESH, "colorteller-cloudmap"),
            json!({
                "listeners": [{"portMapping": {"port": 7000, "protocol": "tcp"},
                               "timeout": {"tcp": {"idle": {"value": 900, "unit": "s"}}},
                               "connectionPool": {"tcp": {"maxConnections": 64}}}],
                "serviceDiscovery": {"awsCloudMap": {
                    "namespaceName": "color.local",
                    "serviceName": "colorteller-cloudmap",
                    "attributes": [{"key": "ECS_TASK_DEFINITION_FAMILY", "value": "colorteller"}],
                    "ipPreference": "IPv4_ONLY"
                }}
            }),
        ),
        // A node with no listeners (a pure client): no service discovery needed.
        (
            Res::vn(MESH, "color-client"),
            json!({"backends": [{"virtualService": {"virtualServiceName": "colorgateway.color.local"}}]}),
        ),
    ];
    let mut uids = BTreeSet::new();
    for (res, spec) in &others {
        let m = check_data(&create(&node, res, spec), res, spec, 1, "ACTIVE");
        let d = check_data(&describe(&node, res), res, spec, 1, "ACTIVE");
        assert_eq!(d.uid, m.uid);
        assert!(uids.insert(m.uid), "uids are unique");
    }

    // The raw body is the bare VirtualNodeData, and the spec has no member the CLI would hide.
    let raw = node.http_ok("GET", &others[2].0.path(), None);
    assert_eq!(raw["virtualNodeName"], json!("colorgateway"));
    assert_eq!(
        raw["spec"], others[2].1,
        "raw spec must be exactly what was sent"
    );
    assert!(raw.get("virtualNode").is_none(), "the body is not wrapped");

    let items = list(&node, &red, &[]);
    let mut want: Vec<String> = others.iter().map(|(r, _)| r.name.clone()).collect();
    want.push(red.name.clone());
    want.sort();
    assert_eq!(ref_names(&items, Kind::VirtualNode), want, "name order");
    for (res, _) in &others {
        check_ref(find(&items, Kind::VirtualNode, &res.name), res, 1);
    }
    check_ref(find(&items, Kind::VirtualNode, "colorteller-red"), &red, 2);

    // Paging through one item at a time gives the same list.
    let paged = list(&node, &red, &["--page-size", "2"]);
    assert_eq!(ref_names(&paged, Kind::VirtualNode), want);

    delete_checked(&node, &red, &red2, 2);
    for (res, spec) in &others {
        delete_checked(&node, res, spec, 1);
    }
    assert!(list(&node, &red, &[]).is_empty());
}

// === virtual routers and routes ===

#[test]
fn virtual_router_and_route_operations() {
    let node = DevNode::start();
    raw_mesh(&node, MESH);
    for color in ["red", "blue", "white"] {
        raw_create(
            &node,
            &Res::vn(MESH, &format!("colorteller-{color}")),
            &teller_spec(color),
        );
    }
    raw_create(
        &node,
        &Res::vn(MESH, "colorteller-multi"),
        &multi_node_spec(),
    );

    // The colorteller router: created on 8080, moved to 9080.
    let vr = Res::vr(MESH, "colorteller-vr");
    lifecycle(
        &node,
        &vr,
        &router_spec(8080, "http"),
        &router_spec(9080, "http"),
    );

    // The weighted route: red 1 / blue 1 / white 0, then shifted to blue and white.
    let route = Res::route(MESH, "colorteller-vr", "colorteller-route");
    lifecycle(
        &node,
        &route,
        &color_route_spec(1, 1, 0),
        &color_route_spec(0, 1, 1),
    );

    // A router with two listeners: its routes name their port.
    let multi = Res::vr(MESH, "colorteller-multi-vr");
    check_data(
        &create(&node, &multi, &multi_router_spec()),
        &multi,
        &multi_router_spec(),
        1,
        "ACTIVE",
    );
    let http = Res::route(MESH, "colorteller-multi-vr", "multi-http");
    check_data(
        &create(&node, &http, &multi_http_route_spec()),
        &http,
        &multi_http_route_spec(),
        1,
        "ACTIVE",
    );
    let grpc = Res::route(MESH, "colorteller-multi-vr", "multi-grpc");
    lifecycle(&node, &grpc, &grpc_route_spec(2), &grpc_route_spec(4));

    // Without a port the route is ambiguous on a two-listener router.
    let mut no_port = multi_http_route_spec();
    no_port["httpRoute"]["match"]
        .as_object_mut()
        .unwrap()
        .remove("port");
    let stderr = run_err(
        &node,
        "create",
        &Res::route(MESH, "colorteller-multi-vr", "no-port"),
        &["--spec", &js(&no_port)],
        "BadRequestException",
    );
    assert_contains(&stderr, "spec.httpRoute.match.port");

    // A TCP router and route.
    let tcp = Res::vr(MESH, "colorteller-tcp-vr");
    check_data(
        &create(&node, &tcp, &router_spec(7000, "tcp")),
        &tcp,
        &router_spec(7000, "tcp"),
        1,
        "ACTIVE",
    );
    let tcp_route = Res::route(MESH, "colorteller-tcp-vr", "tcp-route");
    lifecycle(
        &node,
        &tcp_route,
        &tcp_route_spec(600),
        &tcp_route_spec(900),
    );

    // An http2 route on its own router.
    let h2 = Res::vr(MESH, "colorteller-h2-vr");
    create(&node, &h2, &router_spec(9443, "http2"));
    let h2_route = Res::route(MESH, "colorteller-h2-vr", "h2-route");
    let h2_spec = json!({
        "http2Route": {
            "match": {"path": {"regex": "^/color/(red|blue)$"}, "scheme": "https", "method": "POST"},
            "action": {"weightedTargets": [{"virtualNode": "colorteller-blue", "weight": 100}]},
            "retryPolicy": {"maxRetries": 1, "perRetryTimeout": {"value": 500, "unit": "ms"},
                            "httpRetryEvents": ["stream-error", "client-error"]}
        }
    });
    check_data(
        &create(&node, &h2_route, &h2_spec),
        &h2_route,
        &h2_spec,
        1,
        "ACTIVE",
    );

    // Lists: routers and each router's routes, in name order.
    let routers = list(&node, &vr, &[]);
    assert_eq!(
        ref_names(&routers, Kind::VirtualRouter),
        [
            "colorteller-h2-vr",
            "colorteller-multi-vr",
            "colorteller-tcp-vr",
            "colorteller-vr"
        ]
    );
    check_ref(
        find(&routers, Kind::VirtualRouter, "colorteller-vr"),
        &vr,
        2,
    );
    check_ref(
        find(&routers, Kind::VirtualRouter, "colorteller-multi-vr"),
        &multi,
        1,
    );
    let routes = list(&node, &http, &["--page-size", "1"]);
    assert_eq!(
        ref_names(&routes, Kind::Route),
        ["multi-grpc", "multi-http"]
    );
    check_ref(&routes[0], &grpc, 2);
    check_ref(&routes[1], &http, 1);
    let routes = list(&node, &route, &[]);
    assert_eq!(ref_names(&routes, Kind::Route), ["colorteller-route"]);
    check_ref(&routes[0], &route, 2);

    // Delete routes, then routers.
    delete_checked(&node, &route, &color_route_spec(0, 1, 1), 2);
    delete_checked(&node, &http, &multi_http_route_spec(), 1);
    delete_checked(&node, &grpc, &grpc_route_spec(4), 2);
    delete_checked(&node, &tcp_route, &tcp_route_spec(900), 2);
    delete_checked(&node, &h2_route, &h2_spec, 1);
    delete_checked(&node, &vr, &router_spec(9080, "http"), 2);
    delete_checked(&node, &multi, &multi_router_spec(), 1);
    delete_checked(&node, &tcp, &router_spec(7000, "tcp"), 1);
    delete_checked(&node, &h2, &router_spec(9443, "http2"), 1);
    assert!(list(&node, &vr, &[]).is_empty());
}

// === virtual services ===

#[test]
fn virtual_service_operations() {
    let node = DevNode::start();
    color_base(&node);

    // colorteller.color.local: provided by the router, then by a node directly.
    let teller = Res::vs(MESH, "colorteller.color.local");
    lifecycle(
        &node,
        &teller,
        &vs_router_spec("colorteller-vr"),
        &vs_node_spec("colorteller-red"),
    );
    // And back to the router.
    let data = update(&node, &teller, &vs_router_spec("colorteller-vr"));
    check_data(
        &data,
        &teller,
        &vs_router_spec("colorteller-vr"),
        3,
        "ACTIVE",
    );

    let gw = Res::vs(MESH, "colorgateway.color.local");
    check_data(
        &create(&node, &gw, &vs_node_spec("colorgateway")),
        &gw,
        &vs_node_spec("colorgateway"),
        1,
        "ACTIVE",
    );
    // A virtual service with no provider yet.
    let multi = Res::vs(MESH, "colorteller-multi.color.local");
    check_data(
        &create(&node, &multi, &json!({})),
        &multi,
        &json!({}),
        1,
        "ACTIVE",
    );
    assert_eq!(
        describe(&node, &multi)["metadata"]["arn"],
        json!(format!(
            "arn:aws:appmesh:{REGION}:{ACCOUNT}:mesh/color/virtualService/colorteller-multi.color.local"
        ))
    );

    // A provider that does not exist is refused, and nothing is created.
    let ghost = Res::vs(MESH, "ghost.color.local");
    let out = run(
        &node,
        "create",
        &ghost,
        &["--spec", &js(&vs_node_spec("no-such-node"))],
    );
    assert_eq!(out.status, 255, "{}", out.stderr);
    assert!(
        out.stderr.contains("(NotFoundException)") || out.stderr.contains("(BadRequestException)"),
        "{}",
        out.stderr
    );
    assert_contains(&out.stderr, "no-such-node");
    run_err(&node, "describe", &ghost, &[], "NotFoundException");

    let items = list(&node, &teller, &[]);
    assert_eq!(
        ref_names(&items, Kind::VirtualService),
        [
            "colorgateway.color.local",
            "colorteller-multi.color.local",
            "colorteller.color.local"
        ]
    );
    check_ref(&items[0], &gw, 1);
    check_ref(&items[1], &multi, 1);
    check_ref(&items[2], &teller, 3);

    delete_checked(&node, &teller, &vs_router_spec("colorteller-vr"), 3);
    delete_checked(&node, &gw, &vs_node_spec("colorgateway"), 1);
    delete_checked(&node, &multi, &json!({}), 1);
    assert!(list(&node, &teller, &[]).is_empty());
}

// === virtual gateways and gateway routes ===

#[test]
fn virtual_gateway_and_gateway_route_operations() {
    let node = DevNode::start();
    color_base(&node);
    raw_create(
        &node,
        &Res::vs(MESH, "colorteller.color.local"),
        &vs_router_spec("colorteller-vr"),
    );
    raw_create(
        &node,
        &Res::vs(MESH, "colorteller-multi.color.local"),
        &vs_node_spec("colorteller-multi"),
    );

    let ingress = Res::vg(MESH, "color-ingress");
    lifecycle(&node, &ingress, &ingress_spec(1024), &ingress_spec(2048));

    // Hostname suffix + prefix match with a prefix rewrite.
    let by_host = Res::gateway_route(MESH, "color-ingress", "color-by-host");
    lifecycle(
        &node,
        &by_host,
        &host_route_spec("/color/"),
        &host_route_spec("/"),
    );
    // Exact path match with a path rewrite.
    let exact = Res::gateway_route(MESH, "color-ingress", "color-exact");
    check_data(
        &create(&node, &exact, &exact_route_spec()),
        &exact,
        &exact_route_spec(),
        1,
        "ACTIVE",
    );
    check_data(
        &describe(&node, &exact),
        &exact,
        &exact_route_spec(),
        1,
        "ACTIVE",
    );

    // A gateway with http2 and grpc listeners, and a route of each kind naming its port.
    let multi = Res::vg(MESH, "color-ingress-multi");
    check_data(
        &create(&node, &multi, &multi_gateway_spec()),
        &multi,
        &multi_gateway_spec(),
        1,
        "ACTIVE",
    );
    let h2 = Res::gateway_route(MESH, "color-ingress-multi", "color-h2");
    check_data(
        &create(&node, &h2, &h2_gateway_route_spec()),
        &h2,
        &h2_gateway_route_spec(),
        1,
        "ACTIVE",
    );
    let grpc = Res::gateway_route(MESH, "color-ingress-multi", "color-grpc");
    check_data(
        &create(&node, &grpc, &grpc_gateway_route_spec()),
        &grpc,
        &grpc_gateway_route_spec(),
        1,
        "ACTIVE",
    );
    check_data(
        &describe(&node, &grpc),
        &grpc,
        &grpc_gateway_route_spec(),
        1,
        "ACTIVE",
    );

    // Raw describe: the bare GatewayRouteData with the spec exactly as sent.
    let raw = node.http_ok("GET", &by_host.path(), None);
    assert_eq!(raw["gatewayRouteName"], json!("color-by-host"));
    assert_eq!(raw["virtualGatewayName"], json!("color-ingress"));
    assert_eq!(raw["spec"], host_route_spec("/"));

    let gateways = list(&node, &ingress, &[]);
    assert_eq!(
        ref_names(&gateways, Kind::VirtualGateway),
        ["color-ingress", "color-ingress-multi"]
    );
    check_ref(&gateways[0], &ingress, 2);
    check_ref(&gateways[1], &multi, 1);
    let routes = list(&node, &by_host, &[]);
    assert_eq!(
        ref_names(&routes, Kind::GatewayRoute),
        ["color-by-host", "color-exact"]
    );
    check_ref(&routes[0], &by_host, 2);
    check_ref(&routes[1], &exact, 1);
    let routes = list(&node, &h2, &["--page-size", "1"]);
    assert_eq!(
        ref_names(&routes, Kind::GatewayRoute),
        ["color-grpc", "color-h2"]
    );
    check_ref(&routes[0], &grpc, 1);
    check_ref(&routes[1], &h2, 1);

    delete_checked(&node, &by_host, &host_route_spec("/"), 2);
    delete_checked(&node, &exact, &exact_route_spec(), 1);
    delete_checked(&node, &h2, &h2_gateway_route_spec(), 1);
    delete_checked(&node, &grpc, &grpc_gateway_route_spec(), 1);
    delete_checked(&node, &ingress, &ingress_spec(2048), 2);
    delete_checked(&node, &multi, &multi_gateway_spec(), 1);
    assert!(list(&node, &ingress, &[]).is_empty());
}

// === tags ===

/// All tags of a resource, through list-tags-for-resource with the given extra arguments.
#[track_caller]
fn tags_of(node: &DevNode, arn: &str, extra: &[&str]) -> BTreeMap<String, String> {
    let mut args = vec!["list-tags-for-resource", "--resource-arn", arn];
    args.extend_from_slice(extra);
    let out = node.aws_ok(&args);
    let items = out["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("list-tags-for-resource printed no tags: {out}"));
    let mut tags = BTreeMap::new();
    for t in items {
        let k = t["key"].as_str().expect("tag key").to_string();
        let v = t["value"].as_str().expect("tag value").to_string();
        assert!(
            tags.insert(k.clone(), v).is_none(),
            "tag {k} listed twice: {out}"
        );
    }
    tags
}

fn tag_list(pairs: impl IntoIterator<Item = (String, String)>) -> Value {
    Value::Array(
        pairs
            .into_iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect(),
    )
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn tag_operations() {
    let node = DevNode::start();
    let mesh = Res::mesh(MESH);
    let arn = mesh.arn();
    run_ok(
        &node,
        "create",
        &mesh,
        &[
            "--tags",
            r#"[{"key": "team", "value": "color"}, {"key": "env", "value": "dev"}]"#,
        ],
    );
    assert_eq!(
        tags_of(&node, &arn, &[]),
        map(&[("team", "color"), ("env", "dev")])
    );

    // tag-resource adds and overwrites; the tags it does not name stay.
    let mut add: Vec<(String, String)> = (0..10)
        .map(|i| (format!("k{i:02}"), format!("v{i}")))
        .collect();
    add.push(("env".into(), "prod".into()));
    let out = node.aws_ok(&[
        "tag-resource",
        "--resource-arn",
        &arn,
        "--tags",
        &js(&tag_list(add.clone())),
    ]);
    assert!(
        out.is_null() || out == json!({}),
        "tag-resource prints nothing: {out}"
    );
    let mut want = map(&[("team", "color")]);
    want.extend(add.iter().cloned());
    assert_eq!(want.len(), 12);
    assert_eq!(tags_of(&node, &arn, &[]), want);
    // Paged three at a time, each tag exactly once.
    assert_eq!(tags_of(&node, &arn, &["--page-size", "3"]), want);
    // The server honours the limit and hands out a token.
    let page = node.http_ok(
        "GET",
        &format!("/v20190125/tags?resourceArn={}&limit=3", urlencode(&arn)),
        None,
    );
    assert_eq!(page["tags"].as_array().map(Vec::len), Some(3), "{page}");
    assert!(page["nextToken"].is_string(), "{page}");

    // untag-resource removes the named keys; unknown keys are ignored.
    let out = node.aws_ok(&[
        "untag-resource",
        "--resource-arn",
        &arn,
        "--tag-keys",
        "k00",
        "k01",
        "no-such-key",
    ]);
    assert!(out.is_null() || out == json!({}), "{out}");
    want.remove("k00");
    want.remove("k01");
    assert_eq!(tags_of(&node, &arn, &[]), want);
    assert_eq!(want.len(), 10);

    // Going over 50 tags fails as a whole: none of the request's tags are applied.
    let too_many: Vec<(String, String)> = (0..41)
        .map(|i| (format!("extra-{i:02}"), "x".to_string()))
        .collect();
    node.aws_err(
        &[
            "tag-resource",
            "--resource-arn",
            &arn,
            "--tags",
            &js(&tag_list(too_many)),
        ],
        "TooManyTagsException",
    );
    assert_eq!(
        tags_of(&node, &arn, &[]),
        want,
        "a refused tag-resource applies nothing"
    );
    // Exactly 50 is fine.
    let fill: Vec<(String, String)> = (0..40)
        .map(|i| (format!("extra-{i:02}"), "x".to_string()))
        .collect();
    node.aws_ok(&[
        "tag-resource",
        "--resource-arn",
        &arn,
        "--tags",
        &js(&tag_list(fill.clone())),
    ]);
    want.extend(fill);
    assert_eq!(want.len(), 50);
    assert_eq!(tags_of(&node, &arn, &["--page-size", "7"]), want);
    // Overwriting an existing key at 50 is fine; one new key is not.
    node.aws_ok(&[
        "tag-resource",
        "--resource-arn",
        &arn,
        "--tags",
        r#"[{"key": "team", "value": "colour"}]"#,
    ]);
    want.insert("team".into(), "colour".into());
    node.aws_err(
        &[
            "tag-resource",
            "--resource-arn",
            &arn,
            "--tags",
            r#"[{"key": "team", "value": "paint"}, {"key": "one-more", "value": "x"}]"#,
        ],
        "TooManyTagsException",
    );
    assert_eq!(tags_of(&node, &arn, &[]), want);

    // Child resources are tagged through their ARNs too.
    color_base_children(&node);
    let vn = Res::vn(MESH, "colorteller-red");
    create_tagged(
        &node,
        &vn,
        &teller_spec("red"),
        &json!([{"key": "color", "value": "red"}]),
    );
    assert_eq!(tags_of(&node, &vn.arn(), &[]), map(&[("color", "red")]));
    let route = Res::route(MESH, "colorteller-vr", "colorteller-route");
    create(&node, &route, &color_route_spec(1, 0, 0));
    assert!(tags_of(&node, &route.arn(), &[]).is_empty());
    node.aws_ok(&[
        "tag-resource",
        "--resource-arn",
        &route.arn(),
        "--tags",
        r#"[{"key": "rollout", "value": "canary"}]"#,
    ]);
    assert_eq!(
        tags_of(&node, &route.arn(), &[]),
        map(&[("rollout", "canary")])
    );
    // Tags belong to one resource.
    assert_eq!(tags_of(&node, &vn.arn(), &[]), map(&[("color", "red")]));

    // A resource that does not exist.
    let ghost = Res::vn(MESH, "ghost").arn();
    node.aws_err(
        &["list-tags-for-resource", "--resource-arn", &ghost],
        "NotFoundException",
    );
    node.aws_err(
        &[
            "tag-resource",
            "--resource-arn",
            &ghost,
            "--tags",
            r#"[{"key": "a", "value": "b"}]"#,
        ],
        "NotFoundException",
    );
    node.aws_err(
        &[
            "untag-resource",
            "--resource-arn",
            &ghost,
            "--tag-keys",
            "a",
        ],
        "NotFoundException",
    );

    // Create with more than 50 tags is refused and creates nothing.
    let fifty_one: Vec<(String, String)> = (0..51)
        .map(|i| (format!("t{i:02}"), "x".to_string()))
        .collect();
    let big = Res::mesh("color-tagged");
    let out = run(
        &node,
        "create",
        &big,
        &["--tags", &js(&tag_list(fifty_one))],
    );
    assert_eq!(out.status, 255, "{}", out.stderr);
    assert!(
        out.stderr.contains("(TooManyTagsException)")
            || out.stderr.contains("(BadRequestException)"),
        "{}",
        out.stderr
    );
    run_err(&node, "describe", &big, &[], "NotFoundException");

    // Tags go with their resource: a re-created name starts with none.
    delete(&node, &route);
    run_ok(
        &node,
        "create",
        &route,
        &["--spec", &js(&color_route_spec(1, 0, 0))],
    );
    assert!(
        tags_of(&node, &route.arn(), &[]).is_empty(),
        "a re-created route must not inherit the old tags"
    );
}

/// The router and nodes the tag test hangs child resources on (raw HTTP).
fn color_base_children(node: &DevNode) {
    for color in ["blue", "white"] {
        raw_create(
            node,
            &Res::vn(MESH, &format!("colorteller-{color}")),
            &teller_spec(color),
        );
    }
    raw_create(
        node,
        &Res::vr(MESH, "colorteller-vr"),
        &router_spec(9080, "http"),
    );
}

/// Percent-encodes a query value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// === client tokens ===

#[test]
fn client_token_replays_and_conflicts() {
    let node = DevNode::start();
    let mesh = Res::mesh("idem");
    let spec_a = json!({"egressFilter": {"type": "ALLOW_ALL"}});
    let spec_b = json!({"egressFilter": {"type": "DROP_ALL"}});
    let a = js(&spec_a);
    let b = js(&spec_b);

    // The same create with the same token replays the first answer.
    let first = run_ok(
        &node,
        "create",
        &mesh,
        &["--spec", &a, "--client-token", "create-token-1"],
    );
    let m1 = check_data(&first, &mesh, &spec_a, 1, "ACTIVE");
    let again = run_ok(
        &node,
        "create",
        &mesh,
        &["--spec", &a, "--client-token", "create-token-1"],
    );
    let m2 = check_data(&again, &mesh, &spec_a, 1, "ACTIVE");
    assert_eq!(m2.uid, m1.uid, "a replay answers with the same uid");
    assert!(close(m2.created, m1.created));
    assert_eq!(ref_names(&list(&node, &mesh, &[]), Kind::Mesh), ["idem"]);

    // The same token with another body is a conflict.
    run_err(
        &node,
        "create",
        &mesh,
        &["--spec", &b, "--client-token", "create-token-1"],
        "ConflictException",
    );

    // Updates: a replay does not bump the version again.
    let u1 = run_ok(
        &node,
        "update",
        &mesh,
        &["--spec", &b, "--client-token", "update-token-1"],
    );
    check_data(&u1, &mesh, &spec_b, 2, "ACTIVE");
    let u2 = run_ok(
        &node,
        "update",
        &mesh,
        &["--spec", &b, "--client-token", "update-token-1"],
    );
    let mu = check_data(&u2, &mesh, &spec_b, 2, "ACTIVE");
    assert_eq!(mu.uid, m1.uid);
    check_data(&describe(&node, &mesh), &mesh, &spec_b, 2, "ACTIVE");

    // Reusing the update token with a different spec: conflict, and nothing changes.
    let stderr = run_err(
        &node,
        "update",
        &mesh,
        &["--spec", &a, "--client-token", "update-token-1"],
        "ConflictException",
    );
    assert!(stderr.contains("UpdateMesh"), "{stderr}");
    check_data(&describe(&node, &mesh), &mesh, &spec_b, 2, "ACTIVE");

    // A fresh token applies.
    let u3 = run_ok(
        &node,
        "update",
        &mesh,
        &["--spec", &a, "--client-token", "update-token-2"],
    );
    check_data(&u3, &mesh, &spec_a, 3, "ACTIVE");

    // The same for a child resource.
    let vn = Res::vn("idem", "colorteller-red");
    let spec = js(&teller_spec("red"));
    let c1 = run_ok(
        &node,
        "create",
        &vn,
        &["--spec", &spec, "--client-token", "vn-token"],
    );
    let c2 = run_ok(
        &node,
        "create",
        &vn,
        &["--spec", &spec, "--client-token", "vn-token"],
    );
    assert_eq!(c1["metadata"]["uid"], c2["metadata"]["uid"]);
    assert_eq!(c2["metadata"]["version"], json!(1));
    run_err(
        &node,
        "create",
        &vn,
        &[
            "--spec",
            &js(&teller_spec("blue")),
            "--client-token",
            "vn-token",
        ],
        "ConflictException",
    );
    check_data(&describe(&node, &vn), &vn, &teller_spec("red"), 1, "ACTIVE");
}

// === error classes ===

#[test]
fn not_found_errors() {
    let node = DevNode::start();
    color_base(&node);
    raw_create(&node, &Res::vg(MESH, "color-ingress"), &ingress_spec(1024));

    // A mesh that does not exist, and resources under it.
    let ghost_mesh = Res::mesh("no-such-mesh");
    for op in ["describe", "delete"] {
        run_err(&node, op, &ghost_mesh, &[], "NotFoundException");
    }
    run_err(
        &node,
        "update",
        &ghost_mesh,
        &["--spec", "{}"],
        "NotFoundException",
    );
    let stderr = run_err(
        &node,
        "describe",
        &Res::vn("no-such-mesh", "colorteller-red"),
        &[],
        "NotFoundException",
    );
    assert_contains(&stderr, "DescribeVirtualNode");
    run_err(
        &node,
        "create",
        &Res::vn("no-such-mesh", "colorteller-red"),
        &["--spec", &js(&teller_spec("red"))],
        "NotFoundException",
    );
    node.aws_err(
        &["list-virtual-nodes", "--mesh-name", "no-such-mesh"],
        "NotFoundException",
    );

    // Missing resources of each kind in an existing mesh.
    let missing = [
        Res::vn(MESH, "colorteller-green"),
        Res::vs(MESH, "green.color.local"),
        Res::vr(MESH, "green-vr"),
        Res::route(MESH, "colorteller-vr", "green-route"),
        Res::vg(MESH, "green-ingress"),
        Res::gateway_route(MESH, "color-ingress", "green-route"),
    ];
    for res in &missing {
        for op in ["describe", "delete"] {
            run_err(&node, op, res, &[], "NotFoundException");
        }
    }
    let updates = [
        (&missing[0], teller_spec("green")),
        (&missing[1], vs_node_spec("colorteller-red")),
        (&missing[2], router_spec(9080, "http")),
        (&missing[3], color_route_spec(1, 1, 1)),
        (&missing[4], ingress_spec(10)),
        (&missing[5], host_route_spec("/")),
    ];
    for (res, spec) in updates {
        run_err(
            &node,
            "update",
            res,
            &["--spec", &js(&spec)],
            "NotFoundException",
        );
    }

    // A missing parent router or gateway.
    let orphan = Res::route(MESH, "no-such-vr", "colorteller-route");
    run_err(
        &node,
        "create",
        &orphan,
        &["--spec", &js(&color_route_spec(1, 1, 0))],
        "NotFoundException",
    );
    run_err(&node, "describe", &orphan, &[], "NotFoundException");
    node.aws_err(
        &[
            "list-routes",
            "--mesh-name",
            MESH,
            "--virtual-router-name",
            "no-such-vr",
        ],
        "NotFoundException",
    );
    let orphan = Res::gateway_route(MESH, "no-such-vg", "color-by-host");
    run_err(
        &node,
        "create",
        &orphan,
        &["--spec", &js(&host_route_spec("/"))],
        "NotFoundException",
    );
    node.aws_err(
        &[
            "list-gateway-routes",
            "--mesh-name",
            MESH,
            "--virtual-gateway-name",
            "no-such-vg",
        ],
        "NotFoundException",
    );

    // Nothing was created by any of these.
    assert_eq!(
        ref_names(&list(&node, &Res::mesh(MESH), &[]), Kind::Mesh),
        [MESH]
    );
    assert!(list(&node, &Res::vs(MESH, "x"), &[]).is_empty());
}

#[test]
fn conflict_errors() {
    let node = DevNode::start();
    color_base(&node);
    raw_create(&node, &Res::vg(MESH, "color-ingress"), &ingress_spec(1024));
    let route = Res::route(MESH, "colorteller-vr", "colorteller-route");
    raw_create(&node, &route, &color_route_spec(1, 1, 0));
    let vs = Res::vs(MESH, "colorteller.color.local");
    raw_create(&node, &vs, &vs_router_spec("colorteller-vr"));
    let gw_route = Res::gateway_route(MESH, "color-ingress", "color-by-host");
    raw_create(&node, &gw_route, &host_route_spec("/"));

    // Creating any existing name is a conflict, and leaves the resource as it was.
    let cases = [
        (
            Res::mesh(MESH),
            json!({"egressFilter": {"type": "ALLOW_ALL"}}),
        ),
        (Res::vn(MESH, "colorteller-red"), teller_spec("blue")),
        (vs.clone(), vs_node_spec("colorteller-red")),
        (Res::vr(MESH, "colorteller-vr"), router_spec(8080, "http")),
        (route.clone(), color_route_spec(0, 0, 1)),
        (Res::vg(MESH, "color-ingress"), ingress_spec(5)),
        (gw_route.clone(), host_route_spec("/color/")),
    ];
    for (res, spec) in &cases {
        run_err(
            &node,
            "create",
            res,
            &["--spec", &js(spec)],
            "ConflictException",
        );
        let data = describe(&node, res);
        assert_eq!(data["metadata"]["version"], json!(1), "{data}");
        assert_ne!(
            &data["spec"], spec,
            "a refused create must not change the spec"
        );
    }
    // The same name in another mesh is a different resource.
    raw_mesh(&node, "color-2");
    create(
        &node,
        &Res::vn("color-2", "colorteller-red"),
        &teller_spec("red"),
    );
    // The same route name under another router is a different resource.
    raw_create(
        &node,
        &Res::vr(MESH, "colorteller-vr-2"),
        &router_spec(9080, "http"),
    );
    create(
        &node,
        &Res::route(MESH, "colorteller-vr-2", "colorteller-route"),
        &color_route_spec(1, 1, 0),
    );
}

#[test]
fn resource_in_use_errors() {
    let node = DevNode::start();
    color_base(&node);
    let route = Res::route(MESH, "colorteller-vr", "colorteller-route");
    raw_create(&node, &route, &color_route_spec(1, 1, 0));
    let vs_router = Res::vs(MESH, "colorteller.color.local");
    raw_create(&node, &vs_router, &vs_router_spec("colorteller-vr"));
    let vs_node = Res::vs(MESH, "colorgateway.color.local");
    raw_create(&node, &vs_node, &vs_node_spec("colorgateway"));
    let vg = Res::vg(MESH, "color-ingress");
    raw_create(&node, &vg, &ingress_spec(1024));
    let gw_route = Res::gateway_route(MESH, "color-ingress", "color-by-host");
    raw_create(&node, &gw_route, &host_route_spec("/"));
    // A router with no routes that provides a service.
    let spare = Res::vr(MESH, "colorteller-spare-vr");
    raw_create(&node, &spare, &router_spec(9080, "http"));
    let vs_spare = Res::vs(MESH, "spare.color.local");
    raw_create(&node, &vs_spare, &vs_router_spec("colorteller-spare-vr"));

    let busy = [
        Res::mesh(MESH),                 // still has resources
        Res::vn(MESH, "colorgateway"),   // provider of colorgateway.color.local
        Res::vr(MESH, "colorteller-vr"), // has a route
        spare.clone(),                   // provider of spare.color.local
        vg.clone(),                      // has a gateway route
    ];
    for res in &busy {
        run_err(&node, "delete", res, &[], "ResourceInUseException");
        let data = describe(&node, res);
        assert_eq!(data["status"]["status"], json!("ACTIVE"), "{data}");
    }

    // Once the dependants are gone, each delete goes through.
    delete(&node, &vs_spare);
    delete(&node, &spare);
    delete(&node, &gw_route);
    delete(&node, &vg);
    delete(&node, &vs_node);
    delete(&node, &Res::vn(MESH, "colorgateway"));
    // The router still provides colorteller.color.local after its route is gone.
    delete(&node, &route);
    run_err(
        &node,
        "delete",
        &Res::vr(MESH, "colorteller-vr"),
        &[],
        "ResourceInUseException",
    );
    // Pointing the service at a node frees the router, and makes the node busy instead.
    update(&node, &vs_router, &vs_node_spec("colorteller-red"));
    delete(&node, &Res::vr(MESH, "colorteller-vr"));
    run_err(
        &node,
        "delete",
        &Res::vn(MESH, "colorteller-red"),
        &[],
        "ResourceInUseException",
    );
    run_err(
        &node,
        "delete",
        &Res::mesh(MESH),
        &[],
        "ResourceInUseException",
    );
}

#[test]
fn bad_request_errors() {
    let node = DevNode::start();
    color_base(&node);
    raw_create(&node, &Res::vg(MESH, "color-ingress"), &ingress_spec(1024));
    raw_create(
        &node,
        &Res::vs(MESH, "colorteller.color.local"),
        &vs_router_spec("colorteller-vr"),
    );

    // Each case: a resource, an invalid spec, and the field path the message must name.
    let mut hc_port = teller_spec("green");
    hc_port["listeners"][0]["healthCheck"]["port"] = json!(9081);
    let mut second_listener = multi_node_spec();
    second_listener["listeners"][1]["healthCheck"]["port"] = json!(8080);
    second_listener["serviceDiscovery"]["dns"]["hostname"] = json!("colorteller-green.color.local");
    let mut pool = teller_spec("green");
    pool["listeners"][0]["connectionPool"] = json!({"http2": {"maxRequests": 10}});
    let mut interval = teller_spec("green");
    interval["listeners"][0]["healthCheck"]["intervalMillis"] = json!(400000);
    let mut timeout = teller_spec("green");
    timeout["listeners"][0]["timeout"] = json!({"grpc": {"perRequest": {"value": 1, "unit": "s"}}});
    let mut dup_backends = gateway_node_spec();
    dup_backends["backends"] = json!([
        {"virtualService": {"virtualServiceName": "colorteller.color.local"}},
        {"virtualService": {"virtualServiceName": "colorteller.color.local"}}
    ]);
    dup_backends["serviceDiscovery"]["dns"]["hostname"] = json!("colorgateway-2.color.local");
    let mut weight = color_route_spec(1, 1, 0);
    weight["httpRoute"]["action"]["weightedTargets"][0]["weight"] = json!(101);
    let mut priority = color_route_spec(1, 1, 0);
    priority["priority"] = json!(1001);
    let mut reserved = host_route_spec("/");
    reserved["httpRoute"]["match"]["prefix"] = json!("/aws-appmesh/x");
    reserved["httpRoute"]["action"]
        .as_object_mut()
        .unwrap()
        .remove("rewrite");

    let cases = [
        (
            Res::vn(MESH, "colorteller-green"),
            hc_port,
            "spec.listeners[0].healthCheck.port",
        ),
        (
            Res::vn(MESH, "colorteller-green"),
            second_listener,
            "spec.listeners[1].healthCheck.port",
        ),
        (
            Res::vn(MESH, "colorteller-green"),
            pool,
            "spec.listeners[0].connectionPool.http2",
        ),
        (
            Res::vn(MESH, "colorteller-green"),
            interval,
            "spec.listeners[0].healthCheck.intervalMillis",
        ),
        (
            Res::vn(MESH, "colorteller-green"),
            timeout,
            "spec.listeners[0].timeout.grpc",
        ),
        (
            Res::vn(MESH, "colorgateway-2"),
            dup_backends,
            "spec.backends[1]",
        ),
        (
            Res::route(MESH, "colorteller-vr", "heavy"),
            weight,
            "spec.httpRoute.action.weightedTargets[0].weight",
        ),
        (
            Res::route(MESH, "colorteller-vr", "urgent"),
            priority,
            "spec.priority",
        ),
        (
            Res::gateway_route(MESH, "color-ingress", "reserved"),
            reserved,
            "spec.httpRoute.match.prefix",
        ),
    ];
    for (res, spec, path) in &cases {
        let stderr = run_err(
            &node,
            "create",
            res,
            &["--spec", &js(spec)],
            "BadRequestException",
        );
        assert_contains(&stderr, path);
        run_err(&node, "describe", res, &[], "NotFoundException");
    }

    // An update with an invalid spec changes nothing.
    let red = Res::vn(MESH, "colorteller-red");
    let mut bad = teller_spec("red");
    bad["listeners"][0]["healthCheck"]["port"] = json!(1234);
    let stderr = run_err(
        &node,
        "update",
        &red,
        &["--spec", &js(&bad)],
        "BadRequestException",
    );
    assert_contains(&stderr, "spec.listeners[0].healthCheck.port");
    check_data(
        &describe(&node, &red),
        &red,
        &teller_spec("red"),
        1,
        "ACTIVE",
    );

    // A route whose type does not match the router's listener.
    let stderr = run_err(
        &node,
        "create",
        &Res::route(MESH, "colorteller-vr", "wrong-type"),
        &["--spec", &js(&grpc_route_spec(1))],
        "BadRequestException",
    );
    assert_contains(&stderr, "spec.grpcRoute");
}

// === quotas ===

#[test]
fn limit_meshes() {
    let node = DevNode::start();
    for i in 0..15 {
        raw_mesh(&node, &format!("mesh-{i:02}"));
    }
    let stderr = run_err(
        &node,
        "create",
        &Res::mesh("mesh-15"),
        &[],
        "LimitExceededException",
    );
    assert_contains(&stderr, "CreateMesh");
    run_err(
        &node,
        "describe",
        &Res::mesh("mesh-15"),
        &[],
        "NotFoundException",
    );
    let names = ref_names(
        &list(&node, &Res::mesh("x"), &["--page-size", "4"]),
        Kind::Mesh,
    );
    let want: Vec<String> = (0..15).map(|i| format!("mesh-{i:02}")).collect();
    assert_eq!(names, want);

    // Room again after a delete.
    delete(&node, &Res::mesh("mesh-00"));
    run_ok(&node, "create", &Res::mesh("mesh-15"), &[]);
}

#[test]
fn limit_virtual_gateways_and_gateway_routes() {
    let node = DevNode::start();
    raw_mesh(&node, MESH);
    // The service the gateway routes target (no provider needed).
    raw_create(&node, &Res::vs(MESH, "colorteller.color.local"), &json!({}));
    for i in 0..3 {
        raw_create(
            &node,
            &Res::vg(MESH, &format!("ingress-{i}")),
            &ingress_spec(100),
        );
    }
    run_err(
        &node,
        "create",
        &Res::vg(MESH, "ingress-3"),
        &["--spec", &js(&ingress_spec(100))],
        "LimitExceededException",
    );
    // The quota is per mesh.
    raw_mesh(&node, "color-2");
    create(&node, &Res::vg("color-2", "ingress-3"), &ingress_spec(100));

    for i in 0..10 {
        let mut spec = host_route_spec("/");
        spec["httpRoute"]["match"]["prefix"] = json!(format!("/paint-{i}/"));
        raw_create(
            &node,
            &Res::gateway_route(MESH, "ingress-0", &format!("route-{i:02}")),
            &spec,
        );
    }
    let eleventh = Res::gateway_route(MESH, "ingress-0", "route-10");
    run_err(
        &node,
        "create",
        &eleventh,
        &["--spec", &js(&host_route_spec("/"))],
        "LimitExceededException",
    );
    run_err(&node, "describe", &eleventh, &[], "NotFoundException");
    assert_eq!(list(&node, &eleventh, &["--page-size", "3"]).len(), 10);
    // The quota is per gateway.
    create(
        &node,
        &Res::gateway_route(MESH, "ingress-1", "route-10"),
        &host_route_spec("/"),
    );
}

#[test]
fn limit_routes_per_router() {
    let node = DevNode::start();
    raw_mesh(&node, MESH);
    for color in ["red", "blue", "white"] {
        raw_create(
            &node,
            &Res::vn(MESH, &format!("colorteller-{color}")),
            &teller_spec(color),
        );
    }
    for vr in ["colorteller-vr", "colorteller-vr-2"] {
        raw_create(&node, &Res::vr(MESH, vr), &router_spec(9080, "http"));
    }
    for i in 0..50 {
        let mut spec = color_route_spec(1, 1, 0);
        spec["httpRoute"]["match"]["prefix"] = json!(format!("/r{i}"));
        raw_create(
            &node,
            &Res::route(MESH, "colorteller-vr", &format!("route-{i:02}")),
            &spec,
        );
    }
    let fifty_first = Res::route(MESH, "colorteller-vr", "route-50");
    run_err(
        &node,
        "create",
        &fifty_first,
        &["--spec", &js(&color_route_spec(1, 1, 0))],
        "LimitExceededException",
    );
    let names = ref_names(
        &list(&node, &fifty_first, &["--page-size", "9"]),
        Kind::Route,
    );
    let want: Vec<String> = (0..50).map(|i| format!("route-{i:02}")).collect();
    assert_eq!(names, want);
    // The quota is per router.
    create(
        &node,
        &Res::route(MESH, "colorteller-vr-2", "route-50"),
        &color_route_spec(1, 1, 0),
    );
}

/// A minimal virtual node for bulk setup.
fn small_node_spec(name: &str) -> Value {
    json!({
        "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
        "serviceDiscovery": {"dns": {"hostname": format!("{name}.load.local")}}
    })
}

#[test]
fn limit_virtual_nodes_and_list_paging() {
    let node = DevNode::start();
    raw_mesh(&node, "load");
    // Created in a scrambled order, so that name order is the server's doing.
    let order: Vec<usize> = (0..200).map(|i| (i * 7 + 3) % 200).collect();
    assert_eq!(order.iter().collect::<BTreeSet<_>>().len(), 200);
    for i in &order {
        let name = format!("vn-{i:03}");
        raw_create(&node, &Res::vn("load", &name), &small_node_spec(&name));
    }
    let want: Vec<String> = (0..200).map(|i| format!("vn-{i:03}")).collect();

    // The 201st node is over the quota.
    let extra = Res::vn("load", "vn-200");
    let stderr = run_err(
        &node,
        "create",
        &extra,
        &["--spec", &js(&small_node_spec("vn-200"))],
        "LimitExceededException",
    );
    assert_contains(&stderr, "CreateVirtualNode");
    run_err(&node, "describe", &extra, &[], "NotFoundException");
    // The quota is per mesh.
    raw_mesh(&node, "load-2");
    create(
        &node,
        &Res::vn("load-2", "vn-200"),
        &small_node_spec("vn-200"),
    );

    // The CLI, seven per page: every node exactly once, in name order.
    let items = list(&node, &extra, &["--page-size", "7"]);
    assert_eq!(ref_names(&items, Kind::VirtualNode), want);
    for (item, name) in items.iter().zip(&want) {
        check_ref(item, &Res::vn("load", name), 1);
    }

    // The server's pages: exactly `limit` items and a token, until the last page.
    let base = "/v20190125/meshes/load/virtualNodes";
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &token {
            None => format!("{base}?limit=7"),
            Some(t) => format!("{base}?limit=7&nextToken={}", urlencode(t)),
        };
        let page = node.http_ok("GET", &path, None);
        pages += 1;
        let items = page["virtualNodes"]
            .as_array()
            .expect("virtualNodes")
            .clone();
        seen.extend(ref_names(&items, Kind::VirtualNode));
        match page.get("nextToken") {
            Some(Value::String(t)) => {
                assert_eq!(items.len(), 7, "a page before the last is full");
                token = Some(t.clone());
            }
            None | Some(Value::Null) => {
                assert_eq!(items.len(), 200 % 7, "the last page holds the rest");
                break;
            }
            Some(other) => panic!("nextToken must be a string: {other}"),
        }
        assert!(pages <= 29, "more pages than 200 items need");
    }
    assert_eq!(pages, 29);
    assert_eq!(seen, want);

    // Without a limit the server answers 100 and a token.
    let page = node.http_ok("GET", base, None);
    assert_eq!(page["virtualNodes"].as_array().map(Vec::len), Some(100));
    assert!(page["nextToken"].is_string(), "{}", page["nextToken"]);

    // --max-items stops early and hands out a token the CLI can resume from.
    let first = node.aws_ok(&[
        "list-virtual-nodes",
        "--mesh-name",
        "load",
        "--page-size",
        "7",
        "--max-items",
        "10",
    ]);
    let head = ref_names(first["virtualNodes"].as_array().unwrap(), Kind::VirtualNode);
    assert_eq!(head, want[..10]);
    let resume = first["NextToken"]
        .as_str()
        .unwrap_or_else(|| panic!("no NextToken after --max-items: {first}"))
        .to_string();
    let rest = node.aws_ok(&[
        "list-virtual-nodes",
        "--mesh-name",
        "load",
        "--page-size",
        "7",
        "--starting-token",
        &resume,
    ]);
    let tail = ref_names(rest["virtualNodes"].as_array().unwrap(), Kind::VirtualNode);
    assert_eq!(tail, want[10..]);

    // Virtual services page the same way.
    for i in 0..50 {
        let name = format!("svc-{i:02}.load.local");
        raw_create(
            &node,
            &Res::vs("load", &name),
            &vs_node_spec(&format!("vn-{i:03}")),
        );
    }
    let services = list(&node, &Res::vs("load", "x"), &["--page-size", "7"]);
    let want: Vec<String> = (0..50).map(|i| format!("svc-{i:02}.load.local")).collect();
    assert_eq!(ref_names(&services, Kind::VirtualService), want);
}

// === the whole color app, torn down in dependency order ===

#[test]
fn color_app_deletes_in_dependency_order() {
    let node = DevNode::start();
    color_base(&node);
    raw_create(
        &node,
        &Res::vn(MESH, "colorteller-secure"),
        &secure_node_spec(),
    );
    let route = Res::route(MESH, "colorteller-vr", "colorteller-route");
    raw_create(&node, &route, &color_route_spec(1, 1, 0));
    let multi_vr = Res::vr(MESH, "colorteller-multi-vr");
    raw_create(&node, &multi_vr, &multi_router_spec());
    let multi_http = Res::route(MESH, "colorteller-multi-vr", "multi-http");
    raw_create(&node, &multi_http, &multi_http_route_spec());
    let multi_grpc = Res::route(MESH, "colorteller-multi-vr", "multi-grpc");
    raw_create(&node, &multi_grpc, &grpc_route_spec(2));
    let services = [
        (
            Res::vs(MESH, "colorteller.color.local"),
            vs_router_spec("colorteller-vr"),
        ),
        (
            Res::vs(MESH, "colorgateway.color.local"),
            vs_node_spec("colorgateway"),
        ),
        (
            Res::vs(MESH, "colorteller-multi.color.local"),
            vs_router_spec("colorteller-multi-vr"),
        ),
    ];
    for (res, spec) in &services {
        raw_create(&node, res, spec);
    }
    let vg = Res::vg(MESH, "color-ingress");
    raw_create(&node, &vg, &ingress_spec(1024));
    let gw_routes = [
        (
            Res::gateway_route(MESH, "color-ingress", "color-by-host"),
            host_route_spec("/color/"),
        ),
        (
            Res::gateway_route(MESH, "color-ingress", "color-exact"),
            exact_route_spec(),
        ),
    ];
    for (res, spec) in &gw_routes {
        raw_create(&node, res, spec);
    }

    // The wrong order is refused at every level.
    run_err(
        &node,
        "delete",
        &Res::mesh(MESH),
        &[],
        "ResourceInUseException",
    );
    run_err(&node, "delete", &vg, &[], "ResourceInUseException");
    run_err(&node, "delete", &multi_vr, &[], "ResourceInUseException");

    // The right order: gateway routes, gateways, services, routes, routers, nodes, mesh.
    for (res, spec) in &gw_routes {
        delete_checked(&node, res, spec, 1);
    }
    delete_checked(&node, &vg, &ingress_spec(1024), 1);
    for (res, spec) in &services {
        delete_checked(&node, res, spec, 1);
    }
    delete_checked(&node, &route, &color_route_spec(1, 1, 0), 1);
    delete_checked(&node, &multi_http, &multi_http_route_spec(), 1);
    delete_checked(&node, &multi_grpc, &grpc_route_spec(2), 1);
    delete_checked(
        &node,
        &Res::vr(MESH, "colorteller-vr"),
        &router_spec(9080, "http"),
        1,
    );
    delete_checked(&node, &multi_vr, &multi_router_spec(), 1);
    let nodes = [
        ("colorteller-red", teller_spec("red")),
        ("colorteller-blue", teller_spec("blue")),
        ("colorteller-white", teller_spec("white")),
        ("colorteller-multi", multi_node_spec()),
        ("colorgateway", gateway_node_spec()),
        ("colorteller-secure", secure_node_spec()),
    ];
    for (name, spec) in &nodes {
        delete_checked(&node, &Res::vn(MESH, name), spec, 1);
    }
    delete_checked(&node, &Res::mesh(MESH), &json!({}), 1);
    assert_eq!(node.aws_ok(&["list-meshes"]), json!({"meshes": []}));
}

/// The issue's paging check at its full size: 250 virtual nodes (over App Mesh's default quota
/// of 200, raised through `--config`) listed with `--page-size 7` come back each exactly once.
#[test]
fn list_250_virtual_nodes_with_page_size_7() {
    let node = DevNode::start_with_config("[quotas]\nvirtual_nodes_per_mesh = 300\n");
    raw_mesh(&node, "big");
    let order: Vec<usize> = (0..250).map(|i| (i * 11 + 5) % 250).collect();
    assert_eq!(order.iter().collect::<BTreeSet<_>>().len(), 250);
    for i in &order {
        let name = format!("vn-{i:03}");
        raw_create(&node, &Res::vn("big", &name), &small_node_spec(&name));
    }
    let items = list(&node, &Res::vn("big", "vn-000"), &["--page-size", "7"]);
    let names = ref_names(&items, Kind::VirtualNode);
    let want: Vec<String> = (0..250).map(|i| format!("vn-{i:03}")).collect();
    assert_eq!(names, want, "each node exactly once, in name order");
}

#[test]
fn access_log_formats_are_checked_when_a_spec_is_written() {
    let node = DevNode::start();
    node.aws_ok(&["create-mesh", "--mesh-name", "logs"]);
    let create = |format: &str| {
        node.aws_err(
            &[
                "create-virtual-node",
                "--mesh-name",
                "logs",
                "--virtual-node-name",
                "a",
                "--spec",
                &format!(r#"{{"logging": {{"accessLog": {{"file": {{"path": "/dev/stdout", "format": {format}}}}}}}}}"#),
            ],
            "BadRequestException",
        )
    };
    let err = create(r#"{"text": "%START_TIME% %NOPE%\n"}"#);
    assert!(
        err.contains("spec.logging.accessLog.file.format.text")
            && err.contains("unknown command operator %NOPE%")
            && err.contains("at byte 13"),
        "{err}"
    );
    let err = create(
        r#"{"json": [{"key": "code", "value": "%RESPONSE_CODE%"}, {"key": "ua", "value": "%REQ%"}]}"#,
    );
    assert!(
        err.contains("spec.logging.accessLog.file.format.json[1].value")
            && err.contains("needs a header"),
        "{err}"
    );
    // Nothing was stored; a good format is taken.
    let listed = node.aws_ok(&["list-virtual-nodes", "--mesh-name", "logs"]);
    assert_eq!(listed["virtualNodes"], json!([]));
    node.aws_ok(&[
        "create-virtual-node",
        "--mesh-name",
        "logs",
        "--virtual-node-name",
        "a",
        "--spec",
        r#"{"logging": {"accessLog": {"file": {"path": "/dev/stdout", "format": {"text": "%START_TIME(%s)% %REQ(:METHOD)% %RESPONSE_CODE% 100%%\n"}}}}}"#,
    ]);
}
