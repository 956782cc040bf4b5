use serde_json::{Value, json};

use super::*;
use crate::model::compile::default_retry;
use crate::model::proxy_config::Timeouts;

fn route(name: &str, m: RouteMatch) -> CompiledRoute {
    CompiledRoute {
        name: name.into(),
        priority: None,
        matcher: m,
        targets: vec![],
        retry: default_retry(),
        timeouts: Timeouts::default(),
    }
}

fn http(name: &str, m: Value) -> CompiledRoute {
    route(name, RouteMatch::Http(serde_json::from_value(m).unwrap()))
}

fn grpc(name: &str, m: Value) -> CompiledRoute {
    route(name, RouteMatch::Grpc(serde_json::from_value(m).unwrap()))
}

struct Req {
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
    scheme: &'static str,
    port: u16,
}

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Req {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    Req {
        method: method.parse().unwrap(),
        uri: uri.parse().unwrap(),
        headers: h,
        scheme: "http",
        port: 8080,
    }
}

fn pick<'a>(t: &'a RouteTable, r: &Req) -> Option<&'a str> {
    let head = RequestHead {
        method: &r.method,
        path: r.uri.path(),
        query: r.uri.query(),
        headers: &r.headers,
        scheme: r.scheme,
        port: r.port,
    };
    t.select(&head).map(|c| c.name.as_str())
}

#[test]
fn paths_prefix_exact_and_whole_regex() {
    let t = RouteTable::new(&[
        http("exact", json!({"path": {"exact": "/a/b"}})),
        http("regex", json!({"path": {"regex": "/items/[0-9]+"}})),
        http("prefix", json!({"prefix": "/a"})),
    ])
    .unwrap();
    assert_eq!(pick(&t, &req("GET", "/a/b", &[])), Some("exact"));
    assert_eq!(
        pick(&t, &req("GET", "/a/b?x=1", &[])),
        Some("exact"),
        "the query is not the path"
    );
    assert_eq!(pick(&t, &req("GET", "/a/bc", &[])), Some("prefix"));
    assert_eq!(pick(&t, &req("GET", "/items/42", &[])), Some("regex"));
    assert_eq!(
        pick(&t, &req("GET", "/items/42/x", &[])),
        None,
        "regexes match the whole path"
    );
    assert_eq!(pick(&t, &req("GET", "/b", &[])), None);
}

#[test]
fn headers_with_every_match_kind_and_invert() {
    let h = |name: &str, m: Value, invert: bool| {
        http(
            name,
            json!({"prefix": "/", "headers": [{"name": "X-Test", "match": m, "invert": invert}]}),
        )
    };
    let cases = [
        (json!({"exact": "v1"}), "v1", "v10"),
        (json!({"prefix": "v1"}), "v10", "x1"),
        (json!({"suffix": "-beta"}), "2-beta", "beta-2"),
        (json!({"regex": "v[0-9]"}), "v7", "v77"),
        (json!({"range": {"start": 10, "end": 20}}), "19", "20"),
    ];
    for (m, yes, no) in cases {
        let t = RouteTable::new(&[h("hit", m.clone(), false)]).unwrap();
        assert_eq!(
            pick(&t, &req("GET", "/", &[("x-test", yes)])),
            Some("hit"),
            "{m} {yes}"
        );
        assert_eq!(
            pick(&t, &req("GET", "/", &[("x-test", no)])),
            None,
            "{m} {no}"
        );
        assert_eq!(pick(&t, &req("GET", "/", &[])), None, "{m}: missing header");
        let inv = RouteTable::new(&[h("inv", m.clone(), true)]).unwrap();
        assert_eq!(
            pick(&inv, &req("GET", "/", &[("x-test", no)])),
            Some("inv"),
            "{m} inverted"
        );
        assert_eq!(
            pick(&inv, &req("GET", "/", &[("x-test", yes)])),
            None,
            "{m} inverted"
        );
        assert_eq!(
            pick(&inv, &req("GET", "/", &[])),
            None,
            "{m}: missing never matches"
        );
    }
    // A name alone means "present"; inverted, "absent". Several values are joined by ",".
    let present = RouteTable::new(&[http(
        "p",
        json!({"prefix": "/", "headers": [{"name": "x-a"}]}),
    )])
    .unwrap();
    assert_eq!(pick(&present, &req("GET", "/", &[("x-a", "")])), Some("p"));
    assert_eq!(pick(&present, &req("GET", "/", &[])), None);
    let absent = RouteTable::new(&[http(
        "a",
        json!({"prefix": "/", "headers": [{"name": "x-a", "invert": true}]}),
    )])
    .unwrap();
    assert_eq!(pick(&absent, &req("GET", "/", &[])), Some("a"));
    let joined = RouteTable::new(&[h("j", json!({"exact": "a,b"}), false)]).unwrap();
    assert_eq!(
        pick(
            &joined,
            &req("GET", "/", &[("x-test", "a"), ("x-test", "b")])
        ),
        Some("j")
    );
}

#[test]
fn method_scheme_port_and_query_parameters() {
    let t = RouteTable::new(&[
        http("post", json!({"prefix": "/", "method": "POST"})),
        http("https", json!({"prefix": "/", "scheme": "https"})),
        http("port", json!({"prefix": "/", "port": 9090})),
        http(
            "query",
            json!({"prefix": "/", "queryParameters": [
            {"name": "color", "match": {"exact": "dark blue"}}, {"name": "debug"}]}),
        ),
    ])
    .unwrap();
    assert_eq!(pick(&t, &req("POST", "/", &[])), Some("post"));
    let mut tls = req("GET", "/", &[]);
    tls.scheme = "https";
    assert_eq!(pick(&t, &tls), Some("https"));
    let mut p = req("GET", "/", &[]);
    p.port = 9090;
    assert_eq!(pick(&t, &p), Some("port"));
    assert_eq!(
        pick(&t, &req("GET", "/?debug&color=dark%20blue", &[])),
        Some("query")
    );
    assert_eq!(
        pick(&t, &req("GET", "/?color=dark+blue&debug=1", &[])),
        Some("query")
    );
    assert_eq!(
        pick(&t, &req("GET", "/?color=dark%20blue", &[])),
        None,
        "debug is required"
    );
    assert_eq!(pick(&t, &req("GET", "/?debug&color=blue", &[])), None);
}

#[test]
fn grpc_service_method_and_metadata() {
    let t = RouteTable::new(&[
        grpc(
            "method",
            json!({"serviceName": "demo.Color", "methodName": "Get"}),
        ),
        grpc(
            "meta",
            json!({"serviceName": "demo.Color", "metadata": [
            {"name": "tenant", "match": {"prefix": "acme"}}]}),
        ),
        grpc("service", json!({"serviceName": "demo.Color"})),
    ])
    .unwrap();
    assert_eq!(
        pick(&t, &req("POST", "/demo.Color/Get", &[])),
        Some("method")
    );
    assert_eq!(
        pick(&t, &req("POST", "/demo.Color/Set", &[("tenant", "acme-1")])),
        Some("meta")
    );
    assert_eq!(
        pick(&t, &req("POST", "/demo.Color/Set", &[])),
        Some("service")
    );
    assert_eq!(pick(&t, &req("POST", "/other.Svc/Get", &[])), None);
}

#[test]
fn the_first_matching_route_in_order_wins_and_tcp_matches_everything() {
    let t = RouteTable::new(&[
        http("first", json!({"prefix": "/api"})),
        http("second", json!({"prefix": "/"})),
    ])
    .unwrap();
    assert_eq!(pick(&t, &req("GET", "/api/x", &[])), Some("first"));
    assert_eq!(pick(&t, &req("GET", "/web", &[])), Some("second"));
    let tcp = RouteTable::new(&[route("tcp", RouteMatch::Any)]).unwrap();
    assert_eq!(pick(&tcp, &req("GET", "/anything", &[])), Some("tcp"));
}

#[test]
fn a_bad_regex_refuses_the_config_naming_the_route_and_field() {
    let e = RouteTable::new(&[http(
        "broken",
        json!({"prefix": "/", "headers": [{"name": "x", "match": {"regex": "("}}]}),
    )])
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("route broken: match.headers[0].match.regex: invalid regex \"(\""),
        "{e}"
    );
    let e = RouteTable::new(&[http("p", json!({"path": {"regex": "[z-a]"}}))]).unwrap_err();
    assert!(e.to_string().contains("match.path.regex"), "{e}");
}

#[test]
fn query_components_decode() {
    assert_eq!(decode("a%20b+c%2"), "a b c%2");
    assert_eq!(decode("%zz"), "%zz");
}
