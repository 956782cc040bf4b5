//! The request path's side of `telemetry::proxy`: body byte counts, the `grpc-status` a gRPC
//! call ended with, and why a TLS handshake failed, in a few words that make a bounded label.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;

use super::local_reply::grpc_status;
use super::upstream::{Body, BoxError};
use crate::model::grpc;
use crate::telemetry::proxy::EdgeStats;

/// `body`, its bytes added to `counter`: at once when its length is known (most bodies), else
/// frame by frame as they pass; as it is when `counter` is `None` (requests not counted).
pub fn count_body(body: Body, counter: Option<&Counter>) -> Body {
    let Some(counter) = counter else {
        return body;
    };
    if let Some(n) = body.size_hint().exact() {
        counter.inc_by(n);
        return body;
    }
    Counted {
        inner: body,
        counter: counter.clone(),
    }
    .boxed()
}

struct Counted {
    inner: Body,
    counter: Counter,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.counter.inc_by(data.remaining() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `resp`, an answer given outside any route (a gateway's refusal, the egress filter's, a
/// destination outside the mesh), counted on `stats` (an unrouted edge) as a routed answer is
/// on its edge.
pub fn count_unrouted(
    stats: &Arc<EdgeStats>,
    started: std::time::Instant,
    grpc: bool,
    resp: http::Response<Body>,
) -> http::Response<Body> {
    stats.answered(resp.status().as_u16(), started.elapsed());
    count_response(resp, stats, grpc)
}

/// `resp` with what its body carries counted on `stats` as it passes: its bytes, and for the
/// answer to a gRPC call its `grpc-status` ([`count_grpc`]).
pub fn count_response(
    resp: http::Response<Body>,
    stats: &Arc<EdgeStats>,
    grpc: bool,
) -> http::Response<Body> {
    let resp = resp.map(|body| count_body(body, stats.response_bytes()));
    if grpc { count_grpc(resp, stats) } else { resp }
}

/// `resp`, the answer to a gRPC call, with its `grpc-status` counted on `stats` when known: at
/// once when the head has it (a trailers-only answer, the proxy's own) or cannot get it (an
/// HTTP failure, an empty body: the code gRPC maps it to), else from the trailers as they pass.
/// What the caller's gRPC library reports otherwise: Unknown for a body that ends without a
/// status, the reset's code for one that fails (Canceled, Internal …), Canceled for one
/// dropped before its end (the caller went away).
pub fn count_grpc(resp: http::Response<Body>, stats: &Arc<EdgeStats>) -> http::Response<Body> {
    if !stats.counts_grpc() {
        return resp;
    }
    if let Some(code) = grpc_status(resp.headers()) {
        stats.grpc_answered(code);
        return resp;
    }
    if resp.status() != http::StatusCode::OK || resp.body().is_end_stream() {
        stats.grpc_answered(grpc::from_http_status(resp.status().as_u16()));
        return resp;
    }
    let stats = stats.clone();
    resp.map(|inner| {
        GrpcCounted {
            inner,
            stats: Some(stats),
        }
        .boxed()
    })
}

struct GrpcCounted {
    inner: Body,
    /// Taken when the call is counted, so it is counted once.
    stats: Option<Arc<EdgeStats>>,
}

impl GrpcCounted {
    fn count(&mut self, code: u32) {
        if let Some(stats) = self.stats.take() {
            stats.grpc_answered(code);
        }
    }
}

impl HttpBody for GrpcCounted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    this.count(grpc_status(t).unwrap_or(grpc::UNKNOWN));
                } else if this.inner.is_end_stream() {
                    this.count(grpc::UNKNOWN);
                }
            }
            Poll::Ready(None) => this.count(grpc::UNKNOWN),
            Poll::Ready(Some(Err(e))) => {
                let reason = super::h2stream::reset_reason(e.as_ref());
                this.count(grpc::from_http2_reset(u32::from(reason)));
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GrpcCounted {
    fn drop(&mut self) {
        // Ended but never read to its end (a server that sends a finished body's head and
        // stops): no status came.
        let code = if self.inner.is_end_stream() {
            grpc::UNKNOWN
        } else {
            grpc::CANCELLED
        };
        self.count(code);
    }
}

/// A handshake error as a label: what a peer got wrong, in rustls's terms.
pub fn tls_failure_reason(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "io";
    };
    use rustls::CertificateError as C;
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "unknown_ca",
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidForName | C::NotValidForNameContext { .. } => "name_mismatch",
            C::Revoked => "revoked",
            _ => "bad_certificate",
        },
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::NoApplicationProtocol => "no_alpn_match",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::InvalidMessage(_) | rustls::Error::PeerMisbehaved(_) => "protocol",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::upstream::{empty, full};

    #[tokio::test]
    async fn bodies_count_their_bytes_known_length_or_streamed() {
        let c = Counter::default();
        let b = count_body(full("hello"), Some(&c));
        assert_eq!(c.get(), 5);
        assert_eq!(b.collect().await.unwrap().to_bytes(), "hello");
        let stream = http_body_util::StreamBody::new(futures_util::stream::iter(
            ["ab", "cde"].map(|s| Ok::<_, BoxError>(Frame::data(Bytes::from(s)))),
        ));
        let b = count_body(stream.boxed(), Some(&c));
        assert_eq!(b.collect().await.unwrap().to_bytes(), "abcde");
        assert_eq!(c.get(), 10);
    }

    /// The gRPC series of `m`, as `grpc_status count` pairs.
    fn grpc_counts(m: &crate::telemetry::proxy::ProxyMetrics) -> Vec<String> {
        let text = crate::telemetry::encode(m.registry());
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("trellis_proxy_grpc_responses_total{"))
            .map(|l| {
                let status = l.split("grpc_status=\"").nth(1).unwrap_or_default();
                let status = status.split('"').next().unwrap_or_default();
                format!("{status} {}", l.rsplit(' ').next().unwrap_or_default())
            })
            .collect();
        lines.sort();
        lines
    }

    fn edge(m: &crate::telemetry::proxy::ProxyMetrics) -> Arc<EdgeStats> {
        m.edge(crate::telemetry::proxy::Edge {
            direction: crate::telemetry::proxy::Direction::Inbound,
            port: 50051,
            virtual_service: String::new(),
            route: String::new(),
            target_virtual_node: String::new(),
            caller: "front".into(),
        })
    }

    fn streamed(frames: Vec<Frame<Bytes>>) -> Body {
        http_body_util::StreamBody::new(futures_util::stream::iter(
            frames.into_iter().map(Ok::<_, BoxError>),
        ))
        .boxed()
    }

    fn trailers(status: &str) -> Frame<Bytes> {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", status.parse().unwrap());
        Frame::trailers(t)
    }

    /// A gRPC call is counted once, by the status its caller got: from the trailers, from a
    /// trailers-only head, mapped from an HTTP failure, Unknown without one, a reset's code
    /// for a failed body, Canceled when the caller left first. Nothing is counted before the
    /// trailers pass.
    #[tokio::test]
    async fn grpc_calls_are_counted_by_the_status_the_caller_got() {
        let m = crate::telemetry::proxy::ProxyMetrics::new("demo", ("virtual_node", "back"));
        let stats = edge(&m);
        let answer =
            |status: u16, body: Body| http::Response::builder().status(status).body(body).unwrap();
        let read = |resp: http::Response<Body>| async move {
            let _ = resp.into_body().collect().await;
        };

        let resp = count_grpc(
            answer(
                200,
                streamed(vec![Frame::data(Bytes::from("x")), trailers("0")]),
            ),
            &stats,
        );
        let mut body = resp.into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert!(grpc_counts(&m).is_empty(), "counted before the trailers");
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
        assert_eq!(grpc_counts(&m), ["OK 1"]);
        drop(body);
        assert_eq!(grpc_counts(&m), ["OK 1"], "counted again when dropped");

        let mut head = answer(200, empty());
        head.headers_mut()
            .insert("grpc-status", "12".parse().unwrap());
        drop(count_grpc(head, &stats));
        read(count_grpc(answer(503, full("no healthy upstream")), &stats)).await;
        read(count_grpc(
            answer(200, streamed(vec![trailers("5")])),
            &stats,
        ))
        .await;
        assert_eq!(
            grpc_counts(&m),
            ["NotFound 1", "OK 1", "Unavailable 1", "Unimplemented 1"]
        );

        // Unknown: a body that ends without trailers (seen at its last data frame, and at its
        // end), an empty 200, trailers without a status, a code gRPC does not define.
        read(count_grpc(answer(200, full("x")), &stats)).await;
        read(count_grpc(
            answer(200, streamed(vec![Frame::data(Bytes::from("x"))])),
            &stats,
        ))
        .await;
        drop(count_grpc(answer(200, empty()), &stats));
        read(count_grpc(
            answer(200, streamed(vec![Frame::trailers(http::HeaderMap::new())])),
            &stats,
        ))
        .await;
        read(count_grpc(
            answer(200, streamed(vec![trailers("99")])),
            &stats,
        ))
        .await;
        assert!(
            grpc_counts(&m).contains(&"Unknown 5".to_string()),
            "{:?}",
            grpc_counts(&m)
        );

        // A failed body: the reset its caller gets.
        let failed = |e: BoxError| {
            let frames = futures_util::stream::iter([Ok(Frame::data(Bytes::from("x"))), Err(e)]);
            answer(200, http_body_util::StreamBody::new(frames).boxed())
        };
        read(count_grpc(
            failed(h2::Error::from(h2::Reason::CANCEL).into()),
            &stats,
        ))
        .await;
        read(count_grpc(
            failed("the app's connection broke".into()),
            &stats,
        ))
        .await;
        // The caller went away mid-stream.
        drop(count_grpc(
            answer(
                200,
                streamed(vec![Frame::data(Bytes::from("x")), trailers("0")]),
            ),
            &stats,
        ));
        assert_eq!(
            grpc_counts(&m),
            [
                "Canceled 2",
                "Internal 1",
                "NotFound 1",
                "OK 1",
                "Unavailable 1",
                "Unimplemented 1",
                "Unknown 5"
            ]
        );

        // Not counted where requests are not counted.
        let off = crate::telemetry::proxy::ProxyMetrics::with_requests_counted(
            "demo",
            ("virtual_node", "back"),
            false,
        );
        let mut head = answer(200, empty());
        head.headers_mut()
            .insert("grpc-status", "0".parse().unwrap());
        drop(count_grpc(head, &edge(&off)));
        assert!(grpc_counts(&off).is_empty());
    }

    #[test]
    fn handshake_errors_become_bounded_reasons() {
        let unknown = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(tls_failure_reason(&unknown), "unknown_ca");
        let none = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::NoCertificatesPresented,
        );
        assert_eq!(tls_failure_reason(&none), "no_client_certificate");
        assert_eq!(
            tls_failure_reason(&std::io::ErrorKind::TimedOut.into()),
            "timeout"
        );
    }
}
