//! Bad input over raw HTTP, where the aws CLI cannot help (it validates some input itself):
//! malformed JSON, wrong types, unknown members, invalid names, out-of-range values, an
//! oversized body, wrong methods and unknown paths. Every answer must be an App Mesh error: a
//! JSON body with a `message` and an `x-amzn-ErrorType` header. Afterwards the server must still
//! serve (and must not have panicked).

mod common;

use common::{DevNode, Http, assert_contains};
use serde_json::{Value, json};

/// Checks an error answer: one of `statuses`, an `x-amzn-ErrorType` header and a JSON body
/// with a non-empty `message`. Returns the error type and the message.
#[track_caller]
fn check_error(r: &Http, statuses: &[u16], what: &str) -> (String, String) {
    assert!(
        statuses.contains(&r.status),
        "{what}: expected HTTP {statuses:?}, got {} (curl exit {}, {}): {}",
        r.status,
        r.curl_exit,
        r.curl_stderr.trim(),
        r.body
    );
    let kind = r
        .error_type()
        .unwrap_or_else(|| panic!("{what}: no x-amzn-ErrorType header in {:?}", r.headers))
        .to_string();
    assert!(!kind.is_empty(), "{what}: empty x-amzn-ErrorType");
    let body: Value = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {:?}", r.body));
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: error body has no string message: {body}"))
        .to_string();
    assert!(!message.trim().is_empty(), "{what}: empty message");
    (kind, message)
}

/// Checks a 400 BadRequestException; returns the message.
#[track_caller]
fn bad_request(r: &Http, what: &str) -> String {
    let (kind, message) = check_error(r, &[400], what);
    assert_eq!(kind, "BadRequestException", "{what}: {message}");
    message
}

fn send(node: &DevNode, method: &str, path: &str, body: &str) -> Http {
    node.curl(method, path, Some(body.as_bytes()))
}

/// The node still answers the CLI, lists exactly `meshes`, and logged no panic.
#[track_caller]
fn still_serving(node: &mut DevNode, meshes: &[&str]) {
    assert!(
        node.is_running(),
        "trellis dev exited:\n{}",
        node.stderr_log()
    );
    let out = node.aws_ok(&["list-meshes"]);
    let names: Vec<&str> = out["meshes"]
        .as_array()
        .unwrap_or_else(|| panic!("list-meshes: {out}"))
        .iter()
        .map(|m| m["meshName"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, meshes, "bad input must not create or lose meshes");
    let log = node.stderr_log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

/// A mesh `m` with a virtual node `target` (the routes' target), a router `vr` (http 8080) and
/// a gateway `vg` (http 8080).
fn setup(node: &DevNode) {
    node.http_ok(
        "PUT",
        "/v20190125/meshes",
        Some(&json!({"meshName": "m", "spec": {}})),
    );
    node.http_ok(
        "PUT",
        NODES,
        Some(&json!({
            "virtualNodeName": "target",
            "spec": {
                "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
                "serviceDiscovery": {"dns": {"hostname": "target.m.local"}}
            }
        })),
    );
    node.http_ok(
        "PUT",
        "/v20190125/meshes/m/virtualRouters",
        Some(&json!({
            "virtualRouterName": "vr",
            "spec": {"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]}
        })),
    );
    node.http_ok(
        "PUT",
        "/v20190125/meshes/m/virtualGateways",
        Some(&json!({
            "virtualGatewayName": "vg",
            "spec": {"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]}
        })),
    );
}

fn node_body(listener: Value) -> String {
    json!({
        "virtualNodeName": "vn",
        "spec": {
            "listeners": [listener],
            "serviceDiscovery": {"dns": {"hostname": "vn.m.local"}}
        }
    })
    .to_string()
}

fn health_check() -> Value {
    json!({
        "protocol": "http", "path": "/ping", "port": 8080,
        "healthyThreshold": 2, "unhealthyThreshold": 2,
        "timeoutMillis": 2000, "intervalMillis": 5000
    })
}

fn route_body(route: Value) -> String {
    json!({"routeName": "r", "spec": route}).to_string()
}

fn http_route(weight: i64) -> Value {
    json!({"httpRoute": {
        "match": {"prefix": "/"},
        "action": {"weightedTargets": [{"virtualNode": "target", "weight": weight}]}
    }})
}

const NODES: &str = "/v20190125/meshes/m/virtualNodes";
const ROUTES: &str = "/v20190125/meshes/m/virtualRouter/vr/routes";

#[test]
fn malformed_json_is_bad_request() {
    let mut node = DevNode::start();
    for body in [
        r#"{"meshName": "x","#,
        r#"{"meshName": "x"}}"#,
        "not json",
        "[]",
        r#""x""#,
        "null",
        "",
        "{\"meshName\": \"x\u{0}\"}",
    ] {
        bad_request(
            &send(&node, "PUT", "/v20190125/meshes", body),
            &format!("CreateMesh with body {body:?}"),
        );
    }
    // The same for an update, and for a child resource.
    node.http_ok("PUT", "/v20190125/meshes", Some(&json!({"meshName": "m"})));
    bad_request(
        &send(&node, "PUT", "/v20190125/meshes/m", r#"{"spec": {"#),
        "UpdateMesh with truncated JSON",
    );
    bad_request(
        &send(&node, "PUT", NODES, r#"{"virtualNodeName": "vn", "spec": "#),
        "CreateVirtualNode with truncated JSON",
    );
    bad_request(
        &send(
            &node,
            "PUT",
            "/v20190125/tag?resourceArn=arn%3Aaws%3Aappmesh%3Aus-east-1%3A000000000000%3Amesh%2Fm",
            "{",
        ),
        "TagResource with truncated JSON",
    );
    still_serving(&mut node, &["m"]);
}

#[test]
fn wrong_types_are_bad_request() {
    let mut node = DevNode::start();
    setup(&node);

    let body = node_body(json!({"portMapping": {"port": "abc", "protocol": "http"}}));
    let message = bad_request(&send(&node, "PUT", NODES, &body), "port \"abc\"");
    assert!(
        message.contains("port") || message.contains("abc"),
        "the message should say what is wrong: {message}"
    );
    for (what, body) in [
        ("meshName is a number", r#"{"meshName": 5}"#.to_string()),
        (
            "spec is a list",
            r#"{"meshName": "x", "spec": []}"#.to_string(),
        ),
        (
            "egressFilter.type is a number",
            r#"{"meshName": "x", "spec": {"egressFilter": {"type": 7}}}"#.to_string(),
        ),
        (
            "tags is an object",
            r#"{"meshName": "x", "tags": {"key": "a", "value": "b"}}"#.to_string(),
        ),
        (
            "tag value is a number",
            r#"{"meshName": "x", "tags": [{"key": "a", "value": 1}]}"#.to_string(),
        ),
    ] {
        bad_request(&send(&node, "PUT", "/v20190125/meshes", &body), what);
    }
    for (what, listener) in [
        (
            "port is a float",
            json!({"portMapping": {"port": 80.5, "protocol": "http"}}),
        ),
        ("listeners[0] is a string", json!("http:8080")),
        (
            "healthyThreshold is a boolean",
            json!({"portMapping": {"port": 8080, "protocol": "http"},
                   "healthCheck": {"protocol": "http", "path": "/", "healthyThreshold": true,
                                   "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 5000}}),
        ),
    ] {
        bad_request(&send(&node, "PUT", NODES, &node_body(listener)), what);
    }
    bad_request(
        &send(
            &node,
            "PUT",
            ROUTES,
            &route_body(Value::String(http_route(1).to_string())),
        ),
        "spec is a string",
    );
    still_serving(&mut node, &["m"]);
}

#[test]
fn unknown_members_are_bad_request() {
    let mut node = DevNode::start();
    setup(&node);

    let message = bad_request(
        &send(
            &node,
            "PUT",
            "/v20190125/meshes",
            r#"{"meshName": "x", "bogusMember": 1}"#,
        ),
        "unknown top-level member",
    );
    assert_contains(&message, "bogusMember");

    let body =
        node_body(json!({"portMapping": {"port": 8080, "protocol": "http", "colour": "red"}}));
    let message = bad_request(&send(&node, "PUT", NODES, &body), "unknown nested member");
    assert_contains(&message, "colour");

    let body = route_body(json!({"httpRoute": {
        "match": {"prefix": "/", "hostname": {"exact": "a.example.com"}},
        "action": {"weightedTargets": [{"virtualNode": "target", "weight": 1}]}
    }}));
    let message = bad_request(
        &send(&node, "PUT", ROUTES, &body),
        "a gateway-route member in a route",
    );
    assert_contains(&message, "hostname");

    // Nothing was created.
    assert_eq!(
        node.curl("GET", "/v20190125/meshes/m/virtualNodes/vn", None)
            .status,
        404
    );
    still_serving(&mut node, &["m"]);
}

#[test]
fn invalid_names_are_bad_request() {
    let mut node = DevNode::start();
    setup(&node);

    let long = "a".repeat(256);
    for name in ["bad/name", "bad name", long.as_str(), ""] {
        let body = json!({"meshName": name}).to_string();
        let message = bad_request(
            &send(&node, "PUT", "/v20190125/meshes", &body),
            &format!("mesh name {name:?}"),
        );
        assert_contains(&message, "meshName");
        let body = node_body(json!({"portMapping": {"port": 8080, "protocol": "http"}}))
            .replace("\"vn\"", &json!(name).to_string());
        let message = bad_request(
            &send(&node, "PUT", NODES, &body),
            &format!("virtual node name {name:?}"),
        );
        assert_contains(&message, "virtualNodeName");
    }
    // A name that is missing altogether.
    let message = bad_request(
        &send(&node, "PUT", "/v20190125/meshes", r#"{"spec": {}}"#),
        "no meshName",
    );
    assert_contains(&message, "meshName");

    // 255 characters is the longest name App Mesh allows.
    let longest = "b".repeat(255);
    let created = node.http_ok(
        "PUT",
        "/v20190125/meshes",
        Some(&json!({"meshName": longest})),
    );
    assert_eq!(created["meshName"], json!(longest));
    node.http_ok("DELETE", &format!("/v20190125/meshes/{longest}"), None);

    // Names that cannot exist, asked for in the path.
    for path in [
        "/v20190125/meshes/bad%20name",
        "/v20190125/meshes/bad%2Fname",
        &format!("/v20190125/meshes/{long}"),
    ] {
        check_error(
            &node.curl("GET", path, None),
            &[400, 404],
            &format!("GET {path}"),
        );
    }
    still_serving(&mut node, &["m"]);
}

#[test]
fn out_of_range_values_are_bad_request() {
    let mut node = DevNode::start();
    setup(&node);

    let port = |p: i64| json!({"portMapping": {"port": p, "protocol": "http"}});
    let with_hc = |field: &str, value: Value| {
        let mut hc = health_check();
        hc[field] = value;
        json!({"portMapping": {"port": 8080, "protocol": "http"}, "healthCheck": hc})
    };
    let node_cases = [
        (port(0), "spec.listeners[0].portMapping.port"),
        (port(65536), "spec.listeners[0].portMapping.port"),
        (
            with_hc("intervalMillis", json!(10)),
            "spec.listeners[0].healthCheck.intervalMillis",
        ),
        (
            with_hc("healthyThreshold", json!(1)),
            "spec.listeners[0].healthCheck.healthyThreshold",
        ),
        (
            with_hc("unhealthyThreshold", json!(11)),
            "spec.listeners[0].healthCheck.unhealthyThreshold",
        ),
        (
            with_hc("timeoutMillis", json!(1999)),
            "spec.listeners[0].healthCheck.timeoutMillis",
        ),
        (
            json!({"portMapping": {"port": 8080, "protocol": "http"},
                   "outlierDetection": {"maxServerErrors": 0, "maxEjectionPercent": 10,
                                        "interval": {"value": 10, "unit": "s"},
                                        "baseEjectionDuration": {"value": 10, "unit": "s"}}}),
            "spec.listeners[0].outlierDetection.maxServerErrors",
        ),
        (
            json!({"portMapping": {"port": 8080, "protocol": "http"},
                   "outlierDetection": {"maxServerErrors": 1, "maxEjectionPercent": 101,
                                        "interval": {"value": 10, "unit": "s"},
                                        "baseEjectionDuration": {"value": 10, "unit": "s"}}}),
            "spec.listeners[0].outlierDetection.maxEjectionPercent",
        ),
        (
            json!({"portMapping": {"port": 8080, "protocol": "http"},
                   "connectionPool": {"http": {"maxConnections": 0}}}),
            "spec.listeners[0].connectionPool.http.maxConnections",
        ),
        (
            json!({"portMapping": {"port": 8080, "protocol": "http"},
                   "timeout": {"http": {"perRequest": {"value": -1, "unit": "s"}}}}),
            "spec.listeners[0].timeout.http.perRequest.value",
        ),
    ];
    for (listener, path) in node_cases {
        let message = bad_request(&send(&node, "PUT", NODES, &node_body(listener)), path);
        assert_contains(&message, path);
    }

    // Enums and unions.
    let message = bad_request(
        &send(
            &node,
            "PUT",
            NODES,
            &node_body(json!({"portMapping": {"port": 8080, "protocol": "htp"}})),
        ),
        "protocol htp",
    );
    assert!(
        message.contains("htp") || message.contains("protocol"),
        "{message}"
    );
    let both = json!({
        "virtualNodeName": "vn",
        "spec": {
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
            "serviceDiscovery": {
                "dns": {"hostname": "vn.m.local"},
                "awsCloudMap": {"namespaceName": "m.local", "serviceName": "vn"}
            }
        }
    });
    let message = bad_request(
        &send(&node, "PUT", NODES, &both.to_string()),
        "two service discoveries",
    );
    assert_contains(&message, "spec.serviceDiscovery");

    // Routes.
    let route_cases = [
        (
            http_route(-1),
            "spec.httpRoute.action.weightedTargets[0].weight",
        ),
        (
            http_route(101),
            "spec.httpRoute.action.weightedTargets[0].weight",
        ),
        (
            json!({"httpRoute": {"match": {"prefix": "/"}, "action": {"weightedTargets": []}}}),
            "spec.httpRoute.action.weightedTargets",
        ),
        (
            json!({"priority": -1, "httpRoute": http_route(1)["httpRoute"]}),
            "spec.priority",
        ),
        (
            json!({"httpRoute": {
                "match": {"prefix": "/"},
                "action": {"weightedTargets": [{"virtualNode": "target", "weight": 1}]},
                "retryPolicy": {"maxRetries": -1, "perRetryTimeout": {"value": 1, "unit": "s"},
                                "httpRetryEvents": ["server-error"]}
            }}),
            "spec.httpRoute.retryPolicy.maxRetries",
        ),
    ];
    for (route, path) in route_cases {
        let message = bad_request(&send(&node, "PUT", ROUTES, &route_body(route)), path);
        assert_contains(&message, path);
    }

    // Tags.
    let message = bad_request(
        &send(
            &node,
            "PUT",
            "/v20190125/meshes",
            r#"{"meshName": "x", "tags": [{"key": "", "value": "v"}]}"#,
        ),
        "empty tag key",
    );
    assert_contains(&message, "tags");

    // List limits: 1–100 (1–50 for tags).
    for query in ["limit=0", "limit=101", "limit=-3", "limit=abc"] {
        let message = bad_request(
            &node.curl("GET", &format!("/v20190125/meshes?{query}"), None),
            query,
        );
        assert_contains(&message, "limit");
    }
    let arn = "arn%3Aaws%3Aappmesh%3Aus-east-1%3A000000000000%3Amesh%2Fm";
    bad_request(
        &node.curl(
            "GET",
            &format!("/v20190125/tags?resourceArn={arn}&limit=51"),
            None,
        ),
        "ListTagsForResource limit=51",
    );
    // The edges are fine.
    for query in ["limit=1", "limit=100"] {
        node.http_ok("GET", &format!("/v20190125/meshes?{query}"), None);
    }

    // None of it created anything.
    assert_eq!(node.curl("GET", &format!("{NODES}/vn"), None).status, 404);
    assert_eq!(node.curl("GET", &format!("{ROUTES}/r"), None).status, 404);
    still_serving(&mut node, &["m"]);
}

#[test]
fn oversized_body_is_refused() {
    let mut node = DevNode::start();
    setup(&node);

    // A route that is valid but for its size: the prefix has no length limit in the model.
    let prefix = format!("/{}", "a".repeat(1024 * 1024 + 64 * 1024));
    let body = route_body(json!({"httpRoute": {
        "match": {"prefix": prefix},
        "action": {"weightedTargets": [{"virtualNode": "target", "weight": 1}]}
    }}));
    assert!(body.len() > 1024 * 1024);
    let r = send(&node, "PUT", ROUTES, &body);
    let (_, message) = check_error(&r, &[413, 400], "a body over 1 MiB");
    assert!(message.len() < 4096, "the message must not echo the body");
    assert_eq!(
        node.curl("GET", &format!("{ROUTES}/r"), None).status,
        404,
        "the oversized route must not be created"
    );

    // Also for a mesh, and with a body that is not even JSON.
    let junk = "x".repeat(2 * 1024 * 1024);
    check_error(
        &send(&node, "PUT", "/v20190125/meshes", &junk),
        &[413, 400],
        "2 MiB of junk",
    );
    still_serving(&mut node, &["m"]);
}

#[test]
fn unknown_paths_and_wrong_methods() {
    let mut node = DevNode::start();
    setup(&node);

    for (method, path) in [
        ("POST", "/v20190125/meshes"),
        ("DELETE", "/v20190125/meshes"),
        ("PATCH", "/v20190125/meshes/m"),
        ("POST", "/v20190125/meshes/m/virtualNodes"),
        ("POST", "/v20190125/tag"),
        ("GET", "/v20190125/untag"),
    ] {
        check_error(
            &node.curl(method, path, None),
            &[405, 404],
            &format!("{method} {path}"),
        );
    }
    for path in [
        "/v20190125/nope",
        "/v20190125/meshes/m/virtualWidgets",
        "/v20190125/meshes/m/virtualNodes/a/b",
        "/v20190125/meshes/m/virtualRouter/vr/routes/r/extra",
        "/v20190126/meshes",
    ] {
        let (_, message) = check_error(&node.curl("GET", path, None), &[404], path);
        assert!(!message.is_empty());
    }
    // A PUT with a body to a path that does not exist.
    check_error(
        &send(&node, "PUT", "/v20190125/meshes/m/virtualWidgets", "{}"),
        &[404, 405],
        "PUT to an unknown collection",
    );
    still_serving(&mut node, &["m"]);
}
