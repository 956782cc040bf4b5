//! The App Mesh "color" example most end-to-end tests use, created through the API.

use serde_json::{Value, json};

use super::DevNode;

pub fn put(node: &DevNode, path: &str, body: Value) {
    node.http_ok("PUT", path, Some(&body));
}

/// The `color` route's spec: red and blue with these weights.
pub fn route(red: u32, blue: u32) -> Value {
    json!({"httpRoute": {"match": {"prefix": "/"}, "action": {"weightedTargets": [
        {"virtualNode": "red", "weight": red}, {"virtualNode": "blue", "weight": blue}]}}})
}

/// mesh demo: virtual nodes red and blue (http 9080, hostnames `<color>.demo.local`) behind
/// router color (route `color` with `route(red, blue)`), service color.demo.local, and virtual
/// node `client` with `client_spec`.
pub fn color_mesh(node: &DevNode, red: u32, blue: u32, client_spec: Value) {
    put(node, "/v20190125/meshes", json!({"meshName": "demo"}));
    for c in ["red", "blue"] {
        put(
            node,
            "/v20190125/meshes/demo/virtualNodes",
            json!({"virtualNodeName": c, "spec": {
            "listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
            "serviceDiscovery": {"dns": {"hostname": format!("{c}.demo.local")}}}}),
        );
    }
    put(
        node,
        "/v20190125/meshes/demo/virtualRouters",
        json!({"virtualRouterName": "color", "spec": {"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}]}}),
    );
    put(
        node,
        "/v20190125/meshes/demo/virtualRouter/color/routes",
        json!({"routeName": "color", "spec": route(red, blue)}),
    );
    put(
        node,
        "/v20190125/meshes/demo/virtualServices",
        json!({"virtualServiceName": "color.demo.local", "spec": {"provider": {"virtualRouter": {"virtualRouterName": "color"}}}}),
    );
    put(
        node,
        "/v20190125/meshes/demo/virtualNodes",
        json!({"virtualNodeName": "client", "spec": client_spec}),
    );
}
