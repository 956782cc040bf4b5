//! The compiler on App Mesh's example meshes: the color app (router with weighted, prioritised
//! routes, retries and timeouts; a virtual-node provider), multiple listeners, and a virtual
//! gateway with hostname and prefix matches and rewrites.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::*;
use crate::model::command::Command;
use crate::model::resource::Owner;
use crate::model::shapes::*;

struct Registry(HashMap<String, Vec<Endpoint>>);

impl Instances for Registry {
    fn endpoints(&self, _mesh: &str, node: &str) -> Vec<Endpoint> {
        self.0.get(node).cloned().unwrap_or_default()
    }
}

fn create(state: &mut MeshState, key: ResourceKey, spec: Value) {
    let spec = match key.kind {
        ResourceKind::Mesh => Spec::Mesh(serde_json::from_value(spec).unwrap()),
        ResourceKind::VirtualNode => Spec::VirtualNode(serde_json::from_value(spec).unwrap()),
        ResourceKind::VirtualService => Spec::VirtualService(serde_json::from_value(spec).unwrap()),
        ResourceKind::VirtualRouter => Spec::VirtualRouter(serde_json::from_value(spec).unwrap()),
        ResourceKind::Route => Spec::Route(serde_json::from_value(spec).unwrap()),
        ResourceKind::VirtualGateway => Spec::VirtualGateway(serde_json::from_value(spec).unwrap()),
        ResourceKind::GatewayRoute => Spec::GatewayRoute(serde_json::from_value(spec).unwrap()),
    };
    let cmd = Command::Create {
        key,
        spec,
        tags: vec![],
        idempotency: None,
        uid: "u".into(),
        owner: Owner {
            region: "us-east-1".into(),
            account: "000000000000".into(),
        },
        now: 1.0,
    };
    state.apply(&cmd).unwrap();
}

fn vn(name: &str) -> ResourceKey {
    ResourceKey::in_mesh(ResourceKind::VirtualNode, "color", name)
}
fn vs(name: &str) -> ResourceKey {
    ResourceKey::in_mesh(ResourceKind::VirtualService, "color", name)
}
fn vr(name: &str) -> ResourceKey {
    ResourceKey::in_mesh(ResourceKind::VirtualRouter, "color", name)
}
fn route(router: &str, name: &str) -> ResourceKey {
    ResourceKey::child(ResourceKind::Route, "color", router, name)
}

fn teller(color: &str) -> Value {
    json!({
        "listeners": [{"portMapping": {"port": 9080, "protocol": "http"},
            "outlierDetection": {"maxServerErrors": 5, "interval": {"unit": "s", "value": 10},
                                 "baseEjectionDuration": {"unit": "s", "value": 30}, "maxEjectionPercent": 50}}],
        "serviceDiscovery": {"dns": {"hostname": format!("colorteller-{color}.color.local")}}
    })
}

fn color_app() -> MeshState {
    let mut s = MeshState::default();
    create(
        &mut s,
        ResourceKey::mesh("color"),
        json!({"egressFilter": {"type": "ALLOW_ALL"}}),
    );
    for c in ["red", "blue", "white"] {
        create(&mut s, vn(c), teller(c));
    }
    create(
        &mut s,
        vr("colorteller"),
        json!({"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}]}),
    );
    create(
        &mut s,
        route("colorteller", "color-route"),
        json!({"httpRoute": {
        "match": {"prefix": "/"},
        "action": {"weightedTargets": [{"virtualNode": "red", "weight": 1}, {"virtualNode": "blue", "weight": 1},
                                       {"virtualNode": "white", "weight": 0}]},
        "retryPolicy": {"maxRetries": 3, "perRetryTimeout": {"unit": "ms", "value": 500},
                        "httpRetryEvents": ["gateway-error"], "tcpRetryEvents": ["connection-error"]},
        "timeout": {"perRequest": {"unit": "s", "value": 5}}}}),
    );
    create(
        &mut s,
        route("colorteller", "blue-header"),
        json!({"priority": 1, "httpRoute": {
        "match": {"prefix": "/", "headers": [{"name": "x-color", "match": {"exact": "blue"}}]},
        "action": {"weightedTargets": [{"virtualNode": "blue", "weight": 1}]}}}),
    );
    create(
        &mut s,
        vs("colorteller.color.local"),
        json!({"provider": {"virtualRouter": {"virtualRouterName": "colorteller"}}}),
    );
    create(
        &mut s,
        vs("red.color.local"),
        json!({"provider": {"virtualNode": {"virtualNodeName": "red"}}}),
    );
    create(
        &mut s,
        vn("colorgateway"),
        json!({
            "listeners": [{"portMapping": {"port": 9080, "protocol": "http"},
                           "timeout": {"http": {"perRequest": {"unit": "s", "value": 0}}}}],
            "serviceDiscovery": {"dns": {"hostname": "colorgateway.color.local"}},
            "backendDefaults": {"clientPolicy": {"tls": {"validation": {"trust": {"file": {"certificateChain": "/default.pem"}}}}}},
            "backends": [
                {"virtualService": {"virtualServiceName": "colorteller.color.local",
                  "clientPolicy": {"tls": {"validation": {"trust": {"file": {"certificateChain": "/ca.pem"}}}}}}},
                {"virtualService": {"virtualServiceName": "red.color.local"}},
                {"virtualService": {"virtualServiceName": "missing.color.local"}}
            ],
            "logging": {"accessLog": {"file": {"path": "/dev/stdout"}}}
        }),
    );
    s
}

fn registry() -> Registry {
    let ep = |a: &str| Endpoint {
        address: a.parse().unwrap(),
    };
    Registry(HashMap::from([
        (
            "red".to_string(),
            vec![ep("127.0.0.3:15000"), ep("127.0.0.2:15000")],
        ),
        ("blue".to_string(), vec![ep("127.0.0.4:15000")]),
    ]))
}

#[test]
fn color_app_gateway_node() {
    let state = color_app();
    let role = ProxyRole::VirtualNode("colorgateway".into());
    let c = compile(&state, "color", &role, &registry()).unwrap();
    assert_eq!(c.egress_filter, EgressFilterType::AllowAll);
    assert_eq!(c.inbound.len(), 1);
    assert_eq!(
        c.inbound[0].timeouts,
        Timeouts {
            per_request_ms: 0,
            idle_ms: DEFAULT_IDLE_MS
        },
        "0 disables"
    );
    assert_eq!(c.access_log.as_ref().unwrap().path, "/dev/stdout");

    let names: Vec<&str> = c
        .outbound
        .iter()
        .map(|o| o.virtual_service.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "colorteller.color.local",
            "red.color.local",
            "missing.color.local"
        ]
    );
    let teller = &c.outbound[0];
    assert_eq!(teller.vip, state.service_vip("colorteller.color.local"));
    let trust = |p: &Option<ClientPolicy>| {
        p.as_ref()
            .unwrap()
            .tls
            .as_ref()
            .unwrap()
            .validation
            .trust
            .file
            .as_ref()
            .unwrap()
            .certificate_chain
            .clone()
    };
    assert_eq!(
        trust(&teller.client_policy),
        "/ca.pem",
        "the backend's own policy wins"
    );
    assert_eq!(
        trust(&c.outbound[1].client_policy),
        "/default.pem",
        "else the node's default"
    );
    assert!(
        c.outbound[2].listeners.is_empty() && c.outbound[2].vip.is_none(),
        "a missing service has no routes"
    );

    let l = &teller.listeners[0];
    assert_eq!((l.port, l.protocol), (9080, PortProtocol::Http));
    let order: Vec<&str> = l.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        order,
        ["blue-header", "color-route"],
        "priority 1 before no priority"
    );
    let cr = &l.routes[1];
    let weights: Vec<(&str, u16, u32)> = cr
        .targets
        .iter()
        .map(|t| (t.virtual_node.as_str(), t.port, t.weight))
        .collect();
    assert_eq!(
        weights,
        [("red", 9080, 1), ("blue", 9080, 1), ("white", 9080, 0)]
    );
    assert_eq!(cr.timeouts.per_request_ms, 5000);
    assert_eq!(cr.retry.max_retries, 3);
    assert_eq!(cr.retry.per_retry_timeout_ms, 500);
    assert_eq!(cr.retry.http_statuses, [502, 503, 504]);
    assert!(cr.retry.on_reset && cr.retry.on_connection_error && !cr.retry.is_default);
    let bh = &l.routes[0];
    assert!(bh.retry.is_default && bh.retry.max_retries == 2 && bh.retry.http_statuses == [503]);
    assert_eq!(bh.timeouts, Timeouts::default(), "App Mesh's 15 s");

    let red = &c.outbound[1].listeners[0];
    assert_eq!(red.routes[0].name, "virtualNode/red");
    assert_eq!(red.routes[0].matcher, RouteMatch::Any);

    let clusters: Vec<(&str, u16, usize)> = c
        .clusters
        .iter()
        .map(|k| (k.virtual_node.as_str(), k.port, k.endpoints.len()))
        .collect();
    assert_eq!(
        clusters,
        [("blue", 9080, 1), ("red", 9080, 2), ("white", 9080, 0)]
    );
    let red = &c.clusters[1];
    assert_eq!(red.hostname.as_deref(), Some("colorteller-red.color.local"));
    assert_eq!(red.outlier_detection.as_ref().unwrap().max_server_errors, 5);
    assert_eq!(
        red.endpoints[0].address.to_string(),
        "127.0.0.2:15000",
        "sorted, so versions compare equal"
    );
    assert_eq!(
        compile(&state, "color", &role, &registry()).unwrap(),
        c,
        "deterministic"
    );
}

#[test]
fn multiple_listeners_route_by_port() {
    let mut s = color_app();
    create(
        &mut s,
        vn("multi"),
        json!({
        "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}, {"portMapping": {"port": 8081, "protocol": "grpc"}}],
        "serviceDiscovery": {"dns": {"hostname": "multi.color.local"}}}),
    );
    create(
        &mut s,
        vr("multi"),
        json!({"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}},
                                                     {"portMapping": {"port": 8081, "protocol": "grpc"}}]}),
    );
    create(
        &mut s,
        route("multi", "web"),
        json!({"httpRoute": {"match": {"prefix": "/", "port": 8080},
        "action": {"weightedTargets": [{"virtualNode": "multi", "weight": 1}]}}}),
    );
    create(
        &mut s,
        route("multi", "rpc"),
        json!({"grpcRoute": {"match": {"serviceName": "color.Teller", "port": 8081},
        "action": {"weightedTargets": [{"virtualNode": "multi", "weight": 1, "port": 8081}]},
        "retryPolicy": {"maxRetries": 1, "perRetryTimeout": {"unit": "s", "value": 1}, "grpcRetryEvents": ["unavailable", "cancelled"]}}}),
    );
    create(
        &mut s,
        vs("multi.color.local"),
        json!({"provider": {"virtualRouter": {"virtualRouterName": "multi"}}}),
    );
    create(
        &mut s,
        vn("client"),
        json!({"backends": [{"virtualService": {"virtualServiceName": "multi.color.local"}}]}),
    );
    let c = compile(
        &s,
        "color",
        &ProxyRole::VirtualNode("client".into()),
        &NoInstances,
    )
    .unwrap();
    let ls = &c.outbound[0].listeners;
    assert_eq!(ls.len(), 2);
    assert_eq!(
        (
            ls[0].port,
            ls[0].routes.len(),
            ls[0].routes[0].name.as_str()
        ),
        (8080, 1, "web")
    );
    assert_eq!(
        (
            ls[1].port,
            ls[1].routes.len(),
            ls[1].routes[0].name.as_str()
        ),
        (8081, 1, "rpc")
    );
    assert_eq!(
        ls[0].routes[0].targets[0].port, 8080,
        "no port on the target: the router's"
    );
    assert_eq!(
        ls[1].routes[0].retry.grpc_events,
        ["unavailable", "cancelled"]
    );
    let clusters: Vec<(&str, u16, Option<PortProtocol>)> = c
        .clusters
        .iter()
        .map(|k| (k.virtual_node.as_str(), k.port, k.protocol))
        .collect();
    assert_eq!(
        clusters,
        [
            ("multi", 8080, Some(PortProtocol::Http)),
            ("multi", 8081, Some(PortProtocol::Grpc))
        ]
    );
    assert!(c.inbound.is_empty());
}

#[test]
fn gateway_routes_in_app_mesh_order() {
    let mut s = color_app();
    let gw = ResourceKey::in_mesh(ResourceKind::VirtualGateway, "color", "gw");
    create(
        &mut s,
        gw,
        json!({
        "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
        "backendDefaults": {"clientPolicy": {"tls": {"enforce": true, "validation": {"trust": {"file": {"certificateChain": "/gw.pem"}}}}}}}),
    );
    let gr = |n: &str| ResourceKey::child(ResourceKind::GatewayRoute, "color", "gw", n);
    create(
        &mut s,
        gr("root"),
        json!({"httpRoute": {"match": {"prefix": "/"},
        "action": {"target": {"virtualService": {"virtualServiceName": "red.color.local"}}}}}),
    );
    create(
        &mut s,
        gr("color"),
        json!({"httpRoute": {"match": {"prefix": "/color/", "hostname": {"suffix": ".example.com"}},
        "action": {"target": {"virtualService": {"virtualServiceName": "colorteller.color.local"}},
                   "rewrite": {"prefix": {"value": "/v2/"}}}}}),
    );
    create(
        &mut s,
        gr("health"),
        json!({"httpRoute": {"match": {"path": {"exact": "/health"}},
        "action": {"target": {"virtualService": {"virtualServiceName": "red.color.local"}},
                   "rewrite": {"path": {"exact": "/ping"}}}}}),
    );
    let c = compile(
        &s,
        "color",
        &ProxyRole::VirtualGateway("gw".into()),
        &registry(),
    )
    .unwrap();
    let g = c.gateway.as_ref().unwrap();
    let order: Vec<&str> = g.listeners[0]
        .routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        order,
        ["health", "color", "root"],
        "exact path, then the longest prefix"
    );
    let color = &g.listeners[0].routes[1];
    assert_eq!(
        color
            .rewrite
            .as_ref()
            .unwrap()
            .prefix
            .as_ref()
            .unwrap()
            .value
            .as_deref(),
        Some("/v2/")
    );
    let names: Vec<&str> = c
        .outbound
        .iter()
        .map(|o| o.virtual_service.as_str())
        .collect();
    assert_eq!(names, ["colorteller.color.local", "red.color.local"]);
    let policy = c.outbound[0]
        .client_policy
        .as_ref()
        .unwrap()
        .tls
        .as_ref()
        .unwrap();
    assert_eq!(
        policy
            .validation
            .trust
            .file
            .as_ref()
            .unwrap()
            .certificate_chain,
        "/gw.pem"
    );
    assert_eq!(c.clusters.len(), 3, "red, blue, white");
}

#[test]
fn unknown_proxies_are_not_found() {
    let s = color_app();
    let e = compile(
        &s,
        "color",
        &ProxyRole::VirtualNode("nope".into()),
        &NoInstances,
    )
    .unwrap_err();
    assert_eq!(e.kind, crate::model::ErrorKind::NotFound);
    assert!(e.message.contains("nope"), "{}", e.message);
    let e = compile(
        &s,
        "other",
        &ProxyRole::VirtualGateway("gw".into()),
        &NoInstances,
    )
    .unwrap_err();
    assert!(e.message.contains("Mesh with name other"), "{}", e.message);
}
