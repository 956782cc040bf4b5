//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz), kept in the crate so the unit
//! tests run them over seeds and random bytes on stable and they cannot rot. Each takes
//! arbitrary bytes and must never panic.
//!
//! - `route_match`: the bytes build a route table (paths prefix / exact / regex, header tests
//!   of every kind, methods, query parameters) and a request head, which is then matched.
//! - `request_head`: the bytes are a request head as it arrives on a listener: the smuggling
//!   and size guard, `h1server`'s own parsing of plain requests, then the parsing and the
//!   lookups the proxy does on a head (authority, gateway host, upgrade, route selection).
//! - `response_head`: the bytes are what an app (or, on the egress passthrough, any server)
//!   answers a proxy's HTTP/1.1 request with: the head's parsing and framing rules, then a
//!   chunked body's decoding.

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use serde_json::json;

use super::route::{RequestHead, RouteTable};
use crate::model::proxy_config::{CompiledRoute, RouteMatch};

/// Reads the fuzzer's bytes as small choices and strings.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn text(&mut self) -> String {
        let n = usize::from(self.byte() % 24).min(self.0.len());
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8_lossy(s).into_owned()
    }
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

fn route_from(b: &mut Bytes<'_>, i: usize) -> Option<CompiledRoute> {
    let mut m = serde_json::Map::new();
    let path = b.text();
    match b.byte() % 3 {
        0 => m.insert("prefix".into(), json!(format!("/{path}"))),
        1 => m.insert("path".into(), json!({"exact": format!("/{path}")})),
        _ => m.insert("path".into(), json!({"regex": path})),
    };
    let headers: Vec<_> = (0..b.byte() % 3)
        .map(|_| {
            let name = b.text();
            let value = b.text();
            let test = match b.byte() % 5 {
                0 => json!({"exact": value}),
                1 => json!({"prefix": value}),
                2 => json!({"suffix": value}),
                3 => json!({"regex": value}),
                _ => json!({"range": {"start": i64::from(b.byte()), "end": i64::from(b.byte())}}),
            };
            json!({"name": name, "invert": b.byte().is_multiple_of(2), "match": test})
        })
        .collect();
    if !headers.is_empty() {
        m.insert("headers".into(), json!(headers));
    }
    if b.byte().is_multiple_of(2) {
        let q = b.text();
        m.insert(
            "queryParameters".into(),
            json!([{"name": q, "match": {"exact": b.text()}}]),
        );
    }
    if b.byte().is_multiple_of(3) {
        m.insert(
            "method".into(),
            json!(METHODS[usize::from(b.byte()) % METHODS.len()]),
        );
    }
    let matcher = serde_json::from_value(serde_json::Value::Object(m)).ok()?;
    Some(CompiledRoute {
        name: format!("r{i}"),
        priority: None,
        matcher: RouteMatch::Http(matcher),
        targets: Vec::new(),
        retry: crate::model::compile::default_retry(),
        timeouts: Default::default(),
    })
}

/// Builds a table and a request from `data` and matches them.
pub fn route_match(data: &[u8]) {
    let mut b = Bytes(data);
    let routes: Vec<CompiledRoute> = (0..usize::from(b.byte() % 4) + 1)
        .filter_map(|i| route_from(&mut b, i))
        .collect();
    // A bad regex refuses the config; that is an answer, not a failure.
    let Ok(table) = RouteTable::new(&routes) else {
        return;
    };
    let method = Method::from_bytes(METHODS[usize::from(b.byte()) % METHODS.len()].as_bytes())
        .unwrap_or(Method::GET);
    let path = format!("/{}", b.text());
    let query = b.text();
    let mut headers = HeaderMap::new();
    for _ in 0..b.byte() % 4 {
        let (name, value) = (b.text(), b.text());
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.append(n, v);
        }
    }
    let head = RequestHead {
        method: &method,
        path: &path,
        query: Some(&query),
        headers: &headers,
        scheme: "http",
        port: 9080,
    };
    let first = table.select_index(&head);
    // Matching is a pure function of the head.
    assert_eq!(first, table.select_index(&head));
    if let Some(i) = first {
        assert!(table.matches_at(i, &head));
        assert!((0..i).all(|j| !table.matches_at(j, &head)));
    }
}

/// Treats `data` as a request head arriving on a listener.
/// `h1server`'s reading of the bytes: a plain request takes exactly its head and its body
/// (the bytes after the head, as many as its length says) off the buffer and is what httparse
/// read; anything else leaves every byte where it was, for hyper; the end of a head that
/// parses is always seen by the scan that decides when to parse again.
fn plain_head(data: &[u8]) {
    use super::h1server::{Parsed, ends_head, parse_head};
    let mut read = bytes::BytesMut::from(data);
    let complete = {
        let mut fields = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut fields);
        match req.parse(data) {
            Ok(httparse::Status::Complete(len)) => Some((
                len,
                req.method.map(str::to_owned),
                req.path.map(str::to_owned),
            )),
            _ => None,
        }
    };
    if complete.is_some() {
        assert!(ends_head(data, 0));
    }
    match parse_head(&mut read) {
        Parsed::Plain(req, _) => {
            use futures_util::FutureExt;
            use http_body_util::BodyExt;
            let (len, method, path) = complete.expect("a plain request is a complete head");
            assert_eq!(method.as_deref(), Some(req.method().as_str()));
            let uri: http::Uri = path.expect("a path").parse().expect("the URI it took");
            assert_eq!(&uri, req.uri());
            let body = req
                .into_body()
                .collect()
                .now_or_never()
                .expect("a plain request's body is all in hand")
                .expect("and cannot fail")
                .to_bytes();
            assert_eq!(&body[..], &data[len..len + body.len()]);
            assert_eq!(&read[..], &data[len + body.len()..]);
        }
        Parsed::Other | Parsed::Partial => assert_eq!(&read[..], data),
    }
}

pub fn request_head(data: &[u8]) {
    plain_head(data);
    if let super::guard::Verdict::Refuse(status, _) = super::guard::check(data) {
        assert!(status == 400);
        return;
    }
    let mut parsed = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut parsed);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return;
    };
    let mut builder = Request::builder().method(method).uri(path);
    for h in req.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    let _ = super::outbound::authority(&request);
    let _ = super::gateway::host_of(&request);
    let _ = super::tunnel::is_upgrade(&request);
    let routes: Vec<CompiledRoute> = serde_json::from_value::<Vec<_>>(json!([
        {"prefix": "/"},
        {"path": {"regex": "/v[0-9]+/.*"}, "headers": [{"name": "x-canary", "match": {"suffix": "yes"}}]},
    ]))
    .into_iter()
    .flatten()
    .enumerate()
    .map(|(i, m)| CompiledRoute {
        name: format!("r{i}"),
        priority: None,
        matcher: RouteMatch::Http(m),
        targets: Vec::new(),
        retry: crate::model::compile::default_retry(),
        timeouts: Default::default(),
    })
    .collect();
    if let Ok(table) = RouteTable::new(&routes) {
        let head = RequestHead::of(&request, 80);
        let _ = table.select(&head);
    }
}

/// Treats `data` as an HTTP/1.1 response arriving from an app, to a GET and to a HEAD.
pub fn response_head(data: &[u8]) {
    use super::h1client::{ChunkDecoder, ResponseFraming, parse_head};
    for head_request in [false, true] {
        let mut read = bytes::BytesMut::from(data);
        if let Ok(Some((_, framing, _))) = parse_head(&mut read, head_request)
            && let ResponseFraming::Chunked(mut decoder) = framing
        {
            while let Ok(Some(_)) = decoder.decode(&mut read) {}
        }
    }
    // And as a chunked body on its own.
    let mut read = bytes::BytesMut::from(data);
    let mut decoder = ChunkDecoder::default();
    while let Ok(Some(_)) = decoder.decode(&mut read) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALPHABET: &[u8] = b" /:\r\nGETabc[]()*+?.^$|\\{}0123456789-";

    /// A few seeds, then pseudo-random bytes.
    fn inputs() -> Vec<Vec<u8>> {
        let mut all: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: color.demo.local:9080\r\n\r\n".to_vec(),
            b"POST /v2/x?a=b HTTP/1.1\r\nHost: [::1]:80\r\nContent-Length: 3\r\nx-canary: yes\r\n\r\n".to_vec(),
            // Bodies: whole and pipelined, a value that does not convert (put back), a GET's.
            b"POST /v2/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n".to_vec(),
            b"POST http://a:99999/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
            b"GET / HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi".to_vec(),
            b"GET http://a:99999/ HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
                .to_vec(),
            vec![3, 5, b'a', b'b', b'(', b'[', 2, 1, 0, 0],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x\r\nhello\r\n0\r\nx-t: 1\r\n\r\n"
                .to_vec(),
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\ncontent-length: 3, 3\r\n\r\nabc".to_vec(),
            b"GET /x?y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /y HTTP/1.1\r\n".to_vec(),
            b"GET http://a:8080/b?c HTTP/1.1\r\nx: \xff\r\n\r\n".to_vec(),
            b"DELETE /z HTTP/1.1\ncontent-length: 0\nHost: a\n\n".to_vec(),
            b"GET /\x7f HTTP/1.1\r\n\r\n".to_vec(),
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for n in 0..3000 {
            let len = n % 97;
            all.push(
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Mostly printable, so heads and regexes get somewhere.
                        if x.is_multiple_of(5) {
                            (x >> 8) as u8
                        } else {
                            ALPHABET[(x >> 16) as usize % ALPHABET.len()]
                        }
                    })
                    .collect(),
            );
        }
        all
    }

    #[test]
    fn the_fuzz_targets_survive_seeds_and_random_bytes() {
        for input in inputs() {
            route_match(&input);
            request_head(&input);
            response_head(&input);
        }
    }
}
