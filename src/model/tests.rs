//! Table tests of the pure core: App Mesh example specs round-trip byte for byte, every
//! cross-field rule names its field, and the state machine enforces App Mesh's lifecycle.

use serde_json::{Value, json};

use super::command::{Command, Idempotency};
use super::resource::{Owner, ResourceKey, ResourceKind as K, Spec};
use super::rules::check_spec;
use super::state::MeshState;
use super::validate::{Validate, Validator};
use super::{ErrorKind, Quotas};

fn owner() -> Owner {
    Owner {
        region: "us-east-1".into(),
        account: "123456789012".into(),
    }
}

/// Parses `v` as kind's spec and runs both the generated and the cross-field checks.
fn errors(kind: K, v: Value) -> Vec<String> {
    let spec = parse_spec(kind, v);
    let mut val = Validator::at("spec");
    match &spec {
        Spec::Mesh(s) => s.validate(&mut val),
        Spec::VirtualNode(s) => s.validate(&mut val),
        Spec::VirtualService(s) => s.validate(&mut val),
        Spec::VirtualRouter(s) => s.validate(&mut val),
        Spec::Route(s) => s.validate(&mut val),
        Spec::VirtualGateway(s) => s.validate(&mut val),
        Spec::GatewayRoute(s) => s.validate(&mut val),
    }
    check_spec(&spec, &mut val);
    val.finish()
        .map(|_| vec![])
        .unwrap_or_else(|e| e.0.iter().map(|e| e.to_string()).collect())
}

fn parse_spec(kind: K, v: Value) -> Spec {
    match kind {
        K::Mesh => Spec::Mesh(serde_json::from_value(v).unwrap()),
        K::VirtualNode => Spec::VirtualNode(serde_json::from_value(v).unwrap()),
        K::VirtualService => Spec::VirtualService(serde_json::from_value(v).unwrap()),
        K::VirtualRouter => Spec::VirtualRouter(serde_json::from_value(v).unwrap()),
        K::Route => Spec::Route(serde_json::from_value(v).unwrap()),
        K::VirtualGateway => Spec::VirtualGateway(serde_json::from_value(v).unwrap()),
        K::GatewayRoute => Spec::GatewayRoute(serde_json::from_value(v).unwrap()),
    }
}

fn color_node() -> Value {
    json!({
        "backendDefaults": {"clientPolicy": {"tls": {"enforce": true, "ports": [9080],
            "certificate": {"file": {"certificateChain": "/certs/chain.pem", "privateKey": "/certs/key.pem"}},
            "validation": {"subjectAlternativeNames": {"match": {"exact": ["colorteller.demo.local"]}},
                           "trust": {"file": {"certificateChain": "/certs/ca.pem"}}}}}},
        "backends": [{"virtualService": {"virtualServiceName": "colorteller.demo.local"}}],
        "listeners": [{
            "connectionPool": {"http": {"maxConnections": 100, "maxPendingRequests": 10}},
            "healthCheck": {"healthyThreshold": 2, "intervalMillis": 5000, "path": "/ping", "port": 9080,
                            "protocol": "http", "timeoutMillis": 2000, "unhealthyThreshold": 2},
            "outlierDetection": {"baseEjectionDuration": {"unit": "s", "value": 10},
                                 "interval": {"unit": "s", "value": 30}, "maxEjectionPercent": 50, "maxServerErrors": 5},
            "portMapping": {"port": 9080, "protocol": "http"},
            "timeout": {"http": {"idle": {"unit": "s", "value": 300}, "perRequest": {"unit": "s", "value": 15}}},
            "tls": {"certificate": {"file": {"certificateChain": "/c.pem", "privateKey": "/k.pem"}}, "mode": "STRICT",
                    "validation": {"trust": {"file": {"certificateChain": "/ca.pem"}}}}
        }],
        "logging": {"accessLog": {"file": {"format": {"json": [{"key": "code", "value": "%RESPONSE_CODE%"}]}, "path": "/dev/stdout"}}},
        "serviceDiscovery": {"dns": {"hostname": "colorteller-red.demo.local", "responseType": "ENDPOINTS"}}
    })
}

fn color_route() -> Value {
    json!({
        "httpRoute": {
            "action": {"weightedTargets": [{"virtualNode": "red", "weight": 1}, {"virtualNode": "blue", "weight": 1},
                                           {"virtualNode": "white", "weight": 0}]},
            "match": {"headers": [{"invert": false, "match": {"range": {"end": 200, "start": 100}}, "name": "x-n"},
                                  {"match": {"regex": "^b.*"}, "name": "color"}],
                      "method": "GET", "prefix": "/color", "queryParameters": [{"match": {"exact": "1"}, "name": "q"}]},
            "retryPolicy": {"httpRetryEvents": ["server-error", "gateway-error"], "maxRetries": 2,
                            "perRetryTimeout": {"unit": "ms", "value": 2000}, "tcpRetryEvents": ["connection-error"]},
            "timeout": {"idle": {"unit": "s", "value": 60}, "perRequest": {"unit": "s", "value": 5}}
        },
        "priority": 10
    })
}

fn gateway_route() -> Value {
    json!({
        "httpRoute": {
            "action": {"rewrite": {"hostname": {"defaultTargetHostname": "DISABLED"}, "prefix": {"value": "/v2/"}},
                       "target": {"port": 9080, "virtualService": {"virtualServiceName": "colorteller.demo.local"}}},
            "match": {"hostname": {"suffix": ".example.com"}, "prefix": "/color/"}
        },
        "priority": 1
    })
}

/// Sorted-key JSON of a value: what trellis writes for any accepted input.
fn canonical(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<_> = m.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sort(&m[k]))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            x => x.clone(),
        }
    }
    sort(v).to_string()
}

#[test]
fn example_specs_round_trip_byte_for_byte() {
    for (kind, v) in [
        (K::VirtualNode, color_node()),
        (K::Route, color_route()),
        (K::GatewayRoute, gateway_route()),
    ] {
        let text = canonical(&v);
        let back = match parse_spec(kind, serde_json::from_str(&text).unwrap()) {
            Spec::VirtualNode(s) => serde_json::to_string(&s),
            Spec::Route(s) => serde_json::to_string(&s),
            Spec::GatewayRoute(s) => serde_json::to_string(&s),
            _ => unreachable!(),
        }
        .unwrap();
        assert_eq!(back, text, "{kind}");
        assert!(errors(kind, v).is_empty(), "{kind}");
    }
}

#[test]
fn cross_field_rules_name_the_field() {
    let cases: Vec<(K, Value, &str)> = vec![
        (
            K::VirtualNode,
            with(color_node(), "/listeners/0/healthCheck/port", json!(8080)),
            "spec.listeners[0].healthCheck.port: must equal the listener port 9080, got 8080",
        ),
        (
            K::VirtualNode,
            with(
                color_node(),
                "/listeners/0/healthCheck/intervalMillis",
                json!(10),
            ),
            "spec.listeners[0].healthCheck.intervalMillis: must be between 5000 and 300000, got 10",
        ),
        (
            K::VirtualNode,
            with(
                color_node(),
                "/listeners/0/connectionPool",
                json!({"http2": {"maxRequests": 5}}),
            ),
            "spec.listeners[0].connectionPool.http2: protocol http2 does not match the listener's protocol http (port 9080)",
        ),
        (
            K::VirtualNode,
            with(color_node(), "/listeners/0/timeout", json!({"grpc": {}})),
            "spec.listeners[0].timeout.grpc: protocol grpc does not match the listener's protocol http (port 9080)",
        ),
        (
            K::VirtualNode,
            with(
                color_node(),
                "/listeners/0/connectionPool",
                json!({"http": {"maxConnections": 1}, "tcp": {"maxConnections": 1}}),
            ),
            "spec.listeners[0].connectionPool: must set exactly one of: grpc, http, http2, tcp; got http and tcp",
        ),
        (
            K::VirtualNode,
            with(
                color_node(),
                "/backends/1",
                json!({"virtualService": {"virtualServiceName": "colorteller.demo.local"}}),
            ),
            "spec.backends[1].virtualService.virtualServiceName: duplicate backend colorteller.demo.local",
        ),
        (
            K::VirtualNode,
            with(color_node(), "/serviceDiscovery", Value::Null),
            "spec.serviceDiscovery: is required when the virtual node has listeners",
        ),
        (
            K::VirtualNode,
            with(
                color_node(),
                "/listeners/1",
                json!({"portMapping": {"port": 9080, "protocol": "tcp"}}),
            ),
            "spec.listeners[1].portMapping.port: port 9080 is used by another listener",
        ),
        (
            K::VirtualNode,
            with(color_node(), "/listeners/0/portMapping/port", json!(70000)),
            "spec.listeners[0].portMapping.port: must be between 1 and 65535, got 70000",
        ),
        (
            K::Route,
            with(color_route(), "/httpRoute/match/prefix", json!("color")),
            "spec.httpRoute.match.prefix: must start with '/', got \"color\"",
        ),
        (
            K::Route,
            with(
                color_route(),
                "/httpRoute/retryPolicy/httpRetryEvents/0",
                json!("server-eror"),
            ),
            "spec.httpRoute.retryPolicy.httpRetryEvents[0]: must be one of server-error, gateway-error, client-error, stream-error, got \"server-eror\"",
        ),
        (
            K::Route,
            with(
                color_route(),
                "/httpRoute/match/headers/0/match/range/start",
                json!(500),
            ),
            "spec.httpRoute.match.headers[0].match.range: start (500) must be less than end (200)",
        ),
        (
            K::Route,
            with(
                color_route(),
                "/httpRoute/action/weightedTargets/0/weight",
                json!(101),
            ),
            "spec.httpRoute.action.weightedTargets[0].weight: must be between 0 and 100, got 101",
        ),
        (
            K::Route,
            with(
                color_route(),
                "/tcpRoute",
                json!({"action": {"weightedTargets": [{"virtualNode": "a", "weight": 1}]}}),
            ),
            "spec: must set exactly one of: httpRoute, http2Route, grpcRoute, tcpRoute; got httpRoute and tcpRoute",
        ),
        (
            K::Route,
            json!({"grpcRoute": {"action": {"weightedTargets": [{"virtualNode": "a", "weight": 1}]}, "match": {"methodName": "Get"}}}),
            "spec.grpcRoute.match.methodName: requires serviceName",
        ),
        (
            K::GatewayRoute,
            with(
                gateway_route(),
                "/httpRoute/match/prefix",
                json!("/aws-appmesh/x"),
            ),
            "spec.httpRoute.match.prefix: \"/aws-appmesh/x\" is reserved (prefixes /aws-appmesh and /aws-app-mesh)",
        ),
        (
            K::GatewayRoute,
            with(
                gateway_route(),
                "/httpRoute/action/rewrite/prefix/value",
                json!("v2"),
            ),
            "spec.httpRoute.action.rewrite.prefix.value: must start and end with '/', got \"v2\"",
        ),
        (
            K::GatewayRoute,
            json!({"grpcRoute": {"action": {"target": {"virtualService": {"virtualServiceName": "s"}}}, "match": {"serviceName": "aws.appmesh.Health"}}}),
            "spec.grpcRoute.match.serviceName: \"aws.appmesh.Health\" is reserved (aws.appmesh and aws.app-mesh)",
        ),
        (
            K::VirtualGateway,
            json!({"listeners": [{"portMapping": {"port": 8080, "protocol": "http"},
            "healthCheck": {"healthyThreshold": 2, "intervalMillis": 5000, "path": "/", "port": 8081, "protocol": "http", "timeoutMillis": 2000, "unhealthyThreshold": 2}}]}),
            "spec.listeners[0].healthCheck.port: must equal the listener port 8080, got 8081",
        ),
    ];
    for (kind, spec, want) in cases {
        let got = errors(kind, spec);
        assert!(
            got.iter().any(|g| g == want),
            "{kind}: want {want:?}\n got {got:#?}"
        );
    }
}

/// `v` with the member at JSON pointer `ptr` set to `x` (`null` removes it; `/list/N` appends).
fn with(mut v: Value, ptr: &str, x: Value) -> Value {
    let (parent, last) = ptr.rsplit_once('/').unwrap();
    let target = v.pointer_mut(parent).unwrap();
    match target {
        Value::Object(m) if x.is_null() => {
            m.remove(last);
        }
        Value::Object(m) => {
            m.insert(last.into(), x);
        }
        Value::Array(a) => {
            let i: usize = last.parse().unwrap();
            if i < a.len() { a[i] = x } else { a.push(x) }
        }
        _ => panic!("{ptr}"),
    }
    v
}

struct Harness {
    state: MeshState,
    now: f64,
}

impl Harness {
    fn new() -> Self {
        Self {
            state: MeshState::default(),
            now: 1_700_000_000.0,
        }
    }
    fn create(&mut self, key: ResourceKey, spec: Value) -> Result<Value, ErrorKind> {
        self.create_with(key, spec, None)
    }
    fn create_with(
        &mut self,
        key: ResourceKey,
        spec: Value,
        idem: Option<(&str, u64)>,
    ) -> Result<Value, ErrorKind> {
        self.now += 1.0;
        let spec = parse_spec(key.kind, spec);
        let idempotency = idem.map(|(t, f)| Idempotency {
            token: t.into(),
            fingerprint: f,
        });
        let cmd = Command::Create {
            key,
            spec,
            tags: vec![],
            idempotency,
            uid: format!("uid-{}", self.now),
            owner: owner(),
            now: self.now,
        };
        self.state.apply(&cmd).map_err(|e| e.kind)
    }
    fn delete(&mut self, key: ResourceKey) -> Result<Value, ErrorKind> {
        self.state
            .apply(&Command::Delete { key, now: self.now })
            .map_err(|e| e.kind)
    }
}

fn vn(name: &str) -> ResourceKey {
    ResourceKey::in_mesh(K::VirtualNode, "m", name)
}

#[test]
fn lifecycle_follows_app_mesh() {
    let mut h = Harness::new();
    assert_eq!(
        h.create(vn("a"), json!({})),
        Err(ErrorKind::NotFound),
        "no mesh yet"
    );
    h.create(ResourceKey::mesh("m"), json!({})).unwrap();
    assert_eq!(
        h.create(ResourceKey::mesh("m"), json!({})),
        Err(ErrorKind::Conflict)
    );
    let a = h.create(vn("a"), json!({})).unwrap();
    assert_eq!(
        a["metadata"]["arn"],
        "arn:aws:appmesh:us-east-1:123456789012:mesh/m/virtualNode/a"
    );
    assert_eq!(a["metadata"]["version"], 1);
    let vs = ResourceKey::in_mesh(K::VirtualService, "m", "a.local");
    assert_eq!(
        h.create(
            vs.clone(),
            json!({"provider": {"virtualNode": {"virtualNodeName": "nope"}}})
        ),
        Err(ErrorKind::NotFound)
    );
    h.create(
        vs.clone(),
        json!({"provider": {"virtualNode": {"virtualNodeName": "a"}}}),
    )
    .unwrap();
    assert_eq!(
        h.delete(vn("a")),
        Err(ErrorKind::ResourceInUse),
        "provider of a.local"
    );
    assert_eq!(
        h.delete(ResourceKey::mesh("m")),
        Err(ErrorKind::ResourceInUse)
    );
    let vr = ResourceKey::in_mesh(K::VirtualRouter, "m", "vr");
    h.create(vr.clone(), json!({"listeners": [{"portMapping": {"port": 80, "protocol": "http"}}, {"portMapping": {"port": 81, "protocol": "grpc"}}]})).unwrap();
    let route = ResourceKey::child(K::Route, "m", "vr", "r");
    let http = |port: Option<i64>| {
        let mut m = json!({"prefix": "/"});
        if let Some(p) = port {
            m["port"] = json!(p);
        }
        json!({"httpRoute": {"match": m, "action": {"weightedTargets": [{"virtualNode": "a", "weight": 1}]}}})
    };
    assert_eq!(
        h.create(route.clone(), http(None)),
        Err(ErrorKind::BadRequest),
        "port required with two listeners"
    );
    assert_eq!(
        h.create(route.clone(), http(Some(81))),
        Err(ErrorKind::BadRequest),
        "81 is grpc"
    );
    assert_eq!(
        h.create(route.clone(), http(Some(99))),
        Err(ErrorKind::BadRequest),
        "no listener on 99"
    );
    h.create(route.clone(), http(Some(80))).unwrap();
    assert_eq!(
        h.delete(vr.clone()),
        Err(ErrorKind::ResourceInUse),
        "router has routes"
    );
    let deleted = h.delete(route).unwrap();
    assert_eq!(deleted["status"]["status"], "DELETED");
    h.delete(vr).unwrap();
    h.delete(vs).unwrap();
    h.delete(vn("a")).unwrap();
    h.delete(ResourceKey::mesh("m")).unwrap();
    assert!(h.state.is_empty());
}

#[test]
fn client_tokens_replay_or_conflict() {
    let mut h = Harness::new();
    h.create(ResourceKey::mesh("m"), json!({})).unwrap();
    let first = h.create_with(vn("a"), json!({}), Some(("t1", 7))).unwrap();
    let again = h.create_with(vn("a"), json!({}), Some(("t1", 7))).unwrap();
    assert_eq!(
        first, again,
        "same token and body replays the stored answer"
    );
    assert_eq!(
        h.create_with(vn("a"), json!({}), Some(("t1", 8))),
        Err(ErrorKind::Conflict)
    );
    assert_eq!(
        h.create_with(vn("a"), json!({}), Some(("t2", 7))),
        Err(ErrorKind::Conflict),
        "name taken"
    );
}

#[test]
fn quotas_and_paging() {
    let mut h = Harness::new();
    h.state
        .apply(&Command::SetQuotas(Quotas {
            virtual_nodes_per_mesh: 30,
            ..Quotas::default()
        }))
        .unwrap();
    h.create(ResourceKey::mesh("m"), json!({})).unwrap();
    for i in 0..30 {
        h.create(vn(&format!("n{i:02}")), json!({})).unwrap();
    }
    assert_eq!(
        h.create(vn("n99"), json!({})),
        Err(ErrorKind::LimitExceeded)
    );
    h.delete(vn("n29")).unwrap();
    h.create(vn("n29"), json!({})).unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = h.state.list(K::VirtualNode, "m", "", after.as_deref(), 7);
        seen.extend(page.items.iter().map(|r| r.key.name.clone()));
        let more = page.more_after;
        if more.is_none() {
            break;
        }
        // Writes between pages must not disturb the listing of what stays.
        let listed = seen.len();
        h.delete(vn(&seen[listed - 1])).unwrap();
        h.create(vn(&format!("a-new{listed}")), json!({})).unwrap();
        match more {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    let want: Vec<String> = (0..30).map(|i| format!("n{i:02}")).collect();
    assert_eq!(seen, want);
}

#[test]
fn snapshot_restores_everything() {
    let mut h = Harness::new();
    h.create(ResourceKey::mesh("m"), json!({})).unwrap();
    h.create_with(vn("a"), color_node(), Some(("tok", 1)))
        .unwrap();
    let json = serde_json::to_string(&h.state.snapshot()).unwrap();
    let mut restored = MeshState::from_snapshot(serde_json::from_str(&json).unwrap());
    assert_eq!(restored.get(&vn("a")), h.state.get(&vn("a")));
    let cmd = Command::Create {
        key: vn("a"),
        spec: parse_spec(K::VirtualNode, color_node()),
        tags: vec![],
        idempotency: Some(Idempotency {
            token: "tok".into(),
            fingerprint: 1,
        }),
        uid: "x".into(),
        owner: owner(),
        now: 0.0,
    };
    assert_eq!(
        restored.apply(&cmd).unwrap()["metadata"]["uid"],
        h.state.get(&vn("a")).unwrap().metadata.uid.as_str(),
        "tokens survive snapshots"
    );
}

#[test]
fn a_token_says_nothing_once_its_resource_is_gone() {
    let mut h = Harness::new();
    h.create(ResourceKey::mesh("m"), json!({})).unwrap();
    let first = h.create_with(vn("a"), json!({}), Some(("t", 1))).unwrap();
    h.delete(vn("a")).unwrap();
    let again = h.create_with(vn("a"), json!({}), Some(("t", 1))).unwrap();
    assert_ne!(
        again["metadata"]["uid"], first["metadata"]["uid"],
        "created anew, not replayed"
    );
    assert!(h.state.get(&vn("a")).is_some());
}

#[test]
fn router_updates_cannot_strand_routes() {
    let mut h = Harness::new();
    h.create(ResourceKey::mesh("m"), json!({})).unwrap();
    let vr = ResourceKey::in_mesh(K::VirtualRouter, "m", "vr");
    let http = json!({"listeners": [{"portMapping": {"port": 80, "protocol": "http"}}]});
    h.create(vr.clone(), http.clone()).unwrap();
    let route = json!({"httpRoute": {"match": {"prefix": "/"},
        "action": {"weightedTargets": [{"virtualNode": "a", "weight": 1}]}}});
    h.create(ResourceKey::child(K::Route, "m", "vr", "r"), route)
        .unwrap();
    let tcp = parse_spec(
        K::VirtualRouter,
        json!({"listeners": [{"portMapping": {"port": 80, "protocol": "tcp"}}]}),
    );
    let err = h
        .state
        .apply(&Command::Update {
            key: vr.clone(),
            spec: tcp,
            idempotency: None,
            now: 0.0,
        })
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::BadRequest);
    assert!(
        err.message
            .starts_with("spec.listeners: Route r would no longer fit"),
        "{}",
        err.message
    );
    let same = parse_spec(K::VirtualRouter, http);
    let ok = h
        .state
        .apply(&Command::Update {
            key: vr,
            spec: same,
            idempotency: None,
            now: 0.0,
        })
        .unwrap();
    assert_eq!(ok["metadata"]["version"], 2);
}

#[test]
fn virtual_services_get_stable_vips() {
    let mut h = Harness::new();
    h.create(ResourceKey::mesh("m"), json!({})).unwrap();
    let vs = |n: &str| ResourceKey::in_mesh(K::VirtualService, "m", n);
    h.create(vs("a.local"), json!({})).unwrap();
    h.create(vs("b.local"), json!({})).unwrap();
    assert_eq!(
        h.state.service_vip("A.Local"),
        Some("127.77.0.1".parse().unwrap()),
        "any case"
    );
    assert_eq!(
        h.state.service_vip("b.local"),
        Some("127.77.0.2".parse().unwrap())
    );
    assert_eq!(h.state.service_vip("c.local"), None);
    let spec = parse_spec(K::VirtualService, json!({}));
    h.state
        .apply(&Command::Update {
            key: vs("a.local"),
            spec,
            idempotency: None,
            now: 0.0,
        })
        .unwrap();
    assert_eq!(
        h.state.service_vip("a.local"),
        Some("127.77.0.1".parse().unwrap()),
        "kept across updates"
    );
    let body = h.delete(vs("a.local")).unwrap();
    assert!(
        body.get("vip").is_none() && !body.to_string().contains("127.77"),
        "not in App Mesh's shape"
    );
    assert_eq!(
        h.state.service_vip("a.local"),
        None,
        "freed with the service"
    );
    let restored = MeshState::from_snapshot(
        serde_json::from_str(&serde_json::to_string(&h.state.snapshot()).unwrap()).unwrap(),
    );
    assert_eq!(
        restored.service_vip("b.local"),
        h.state.service_vip("b.local")
    );
    h.state = restored;
    h.create(vs("a.local"), json!({})).unwrap();
    assert_eq!(
        h.state.service_vip("a.local"),
        Some("127.77.0.3".parse().unwrap()),
        "the cursor survives snapshots"
    );
    assert_eq!(h.state.vips_in_use(), 2);
}

#[test]
fn node_hostnames_resolve_to_healthy_instances() {
    use super::proxy_config::ProxyRole;
    use super::registry::{Instance, RegistryUpdate};
    let mut h = Harness::new();
    h.create(ResourceKey::mesh("m"), json!({})).unwrap();
    let spec = |host: &str| {
        json!({"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
                                   "serviceDiscovery": {"dns": {"hostname": host}}})
    };
    h.create(vn("red"), spec("red.m.local")).unwrap();
    assert_eq!(
        h.state.hostname_addresses("RED.m.local."),
        Some(vec![]),
        "known name, no instances yet"
    );
    assert_eq!(h.state.hostname_addresses("blue.m.local"), None);
    let inst = |id: &str, ip: &str, healthy| Instance {
        proxy_id: id.into(),
        mesh: "m".into(),
        role: ProxyRole::VirtualNode("red".into()),
        address: ip.parse().unwrap(),
        inbound_port: 15000,
        healthy,
        expires_at: 100.0,
    };
    let update = RegistryUpdate {
        now: 1.0,
        upserts: vec![inst("a", "10.0.0.2", true), inst("b", "10.0.0.3", false)],
        removals: vec![],
    };
    assert_eq!(
        h.state.apply(&Command::Registry(update)).unwrap()["changed"],
        true
    );
    assert_eq!(
        h.state.hostname_addresses("red.m.local"),
        Some(vec!["10.0.0.2".parse().unwrap()])
    );
    assert_eq!(
        h.state.hostname_instances("red.m.local"),
        Some(vec![("10.0.0.2".parse().unwrap(), vec![9080])]),
        "with the node's listener ports, for SRV"
    );
    use super::compile::Instances;
    assert_eq!(h.state.endpoints("m", "red").len(), 1);
    // A hostname change moves the name; the snapshot keeps both the index and the registry.
    let new = parse_spec(K::VirtualNode, spec("rouge.m.local"));
    h.state
        .apply(&Command::Update {
            key: vn("red"),
            spec: new,
            idempotency: None,
            now: 2.0,
        })
        .unwrap();
    assert_eq!(h.state.hostname_addresses("red.m.local"), None);
    let restored = MeshState::from_snapshot(
        serde_json::from_str(&serde_json::to_string(&h.state.snapshot()).unwrap()).unwrap(),
    );
    assert_eq!(
        restored.hostname_addresses("rouge.m.local"),
        Some(vec!["10.0.0.2".parse().unwrap()])
    );
    let expire = RegistryUpdate {
        now: 101.0,
        upserts: vec![],
        removals: vec![],
    };
    h.state.apply(&Command::Registry(expire)).unwrap();
    assert_eq!(
        h.state.hostname_addresses("rouge.m.local"),
        Some(vec![]),
        "leases end"
    );
}

/// A follower applies its leader's entries unanswered: the same state, no descriptions, except
/// a clientToken's answer, which any later leader may have to replay.
#[test]
fn unanswered_commands_change_the_state_alike() {
    let mut answered = Harness::new();
    let mut quiet = Harness::new();
    let cmds = |token: Option<&str>| {
        let create = |key: ResourceKey, spec: Value, uid: &str| Command::Create {
            spec: parse_spec(key.kind, spec),
            key,
            tags: vec![],
            idempotency: token.map(|t| Idempotency {
                token: t.into(),
                fingerprint: 7,
            }),
            uid: uid.into(),
            owner: owner(),
            now: 1.0,
        };
        vec![
            create(ResourceKey::mesh("m"), json!({}), "u1"),
            create(vn("a"), color_node(), "u2"),
            Command::Update {
                key: vn("a"),
                spec: parse_spec(K::VirtualNode, json!({})),
                idempotency: None,
                now: 2.0,
            },
            Command::Delete {
                key: vn("a"),
                now: 3.0,
            },
        ]
    };
    for cmd in cmds(None) {
        let loud = answered.state.apply(&cmd).unwrap();
        assert!(loud["metadata"]["arn"].is_string(), "{loud}");
        assert_eq!(quiet.state.apply_unanswered(&cmd).unwrap(), Value::Null);
    }
    assert_eq!(
        serde_json::to_value(answered.state.snapshot()).unwrap(),
        serde_json::to_value(quiet.state.snapshot()).unwrap()
    );
    assert_eq!(answered.state.generation(), quiet.state.generation());
    // With a clientToken the answer is kept, so it is rendered on every node alike.
    let create = cmds(Some("tok")).swap_remove(1);
    let loud = answered.state.apply(&create).unwrap();
    assert_eq!(quiet.state.apply_unanswered(&create).unwrap(), loud);
    assert_eq!(
        serde_json::to_value(answered.state.snapshot()).unwrap(),
        serde_json::to_value(quiet.state.snapshot()).unwrap()
    );
    // An error is an error either way.
    assert_eq!(
        quiet
            .state
            .apply_unanswered(&cmds(None)[0])
            .unwrap_err()
            .kind,
        ErrorKind::Conflict
    );
}
