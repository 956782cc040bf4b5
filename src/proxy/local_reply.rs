//! The proxy's own answers (Envoy's local replies: no route, no healthy endpoint, a timeout, a
//! full pool, a refused caller) as a gRPC caller must get them. Such an answer is plain text
//! with an HTTP status, marked with [`LocalReply`]; for a gRPC request it is remade as Envoy
//! remakes it: HTTP 200, no body (trailers-only), `grpc-status` from the HTTP status by gRPC's
//! own mapping (doc/http-grpc-status-mapping.md) and `grpc-message` saying what failed. A gRPC
//! client given the text instead reads it as a message frame and reports a protocol error
//! (tonic: "invalid compression flag") where UNAVAILABLE or UNIMPLEMENTED was meant.
//!
//! Answers from the app, or from a peer proxy (which remade its own), pass untouched.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};

use super::upstream::{Body, UpstreamError, empty};
use crate::model::grpc;

/// Marks an answer the proxy made itself, with the text it says (the body's bytes, shared).
#[derive(Clone, Debug)]
pub struct LocalReply(pub Bytes);

/// Whether a request speaks gRPC: `application/grpc`, or it with `+proto`, `+json`, `;…`.
#[inline]
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| grpc::is_grpc_content_type(v.as_bytes()))
}

/// The `grpc-status` in a head or trailers.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    grpc::parse_status(headers.get("grpc-status")?.as_bytes())
}

/// `e`'s answer as the caller of `req` gets it.
pub fn refuse<B>(req: &Request<B>, e: &UpstreamError) -> Response<Body> {
    for_caller(is_grpc(req.headers()), e.response())
}

/// `resp` as the caller gets it: remade as gRPC when the request was gRPC and the proxy made
/// the answer itself; else as it is.
#[inline]
pub fn for_caller(grpc: bool, resp: Response<Body>) -> Response<Body> {
    if grpc && let Some(LocalReply(text)) = resp.extensions().get::<LocalReply>() {
        return as_grpc(resp.status(), text);
    }
    resp
}

#[cold]
fn as_grpc(status: StatusCode, text: &[u8]) -> Response<Body> {
    let mut r = Response::new(empty());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        "grpc-status",
        HeaderValue::from(grpc::from_http_status(status.as_u16())),
    );
    if let Ok(v) = HeaderValue::from_str(&percent_encode(text)) {
        h.insert("grpc-message", v);
    }
    r
}

/// `grpc-message`'s encoding: printable ASCII but `%` as it is, every other byte `%XX`.
fn percent_encode(text: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(text.len());
    for &b in text.trim_ascii_end() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Body as _;

    fn grpc_headers(content_type: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        h
    }

    #[test]
    fn grpc_requests_are_told_by_their_content_type() {
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;x=1",
        ] {
            assert!(is_grpc(&grpc_headers(yes)), "{yes}");
        }
        for no in ["application/grpcx", "application/json", "text/plain"] {
            assert!(!is_grpc(&grpc_headers(no)), "{no}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn the_proxys_own_answers_become_grpc_for_grpc_callers_only() {
        let cases = [
            (UpstreamError::NoRoute, "12"),
            (UpstreamError::NoEndpoint("color.demo.local".into()), "14"),
            (UpstreamError::Timeout(15000), "14"),
            (UpstreamError::Forbidden("not a backend".into()), "7"),
            (UpstreamError::BadRequest("bad".into()), "13"),
        ];
        for (e, code) in cases {
            let r = for_caller(true, e.response());
            assert_eq!(r.status(), StatusCode::OK, "{e}");
            assert!(r.body().is_end_stream(), "{e}: trailers-only");
            assert_eq!(r.headers()["content-type"], "application/grpc");
            assert_eq!(r.headers()["grpc-status"], code, "{e}");
            assert_eq!(
                r.headers()["grpc-message"].to_str().unwrap(),
                format!("trellis: {e}").replace('%', "%25"),
            );
            // Not gRPC: the text answer as it was.
            let r = for_caller(false, e.response());
            assert_eq!(r.status(), e.status());
            assert_eq!(r.headers()["content-type"], "text/plain");
        }
        // The app's (or a peer's) answer is never remade.
        let mut app = Response::new(empty());
        *app.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(
            for_caller(true, app).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("50% of é\n".as_bytes()), "50%25 of %C3%A9");
    }
}
