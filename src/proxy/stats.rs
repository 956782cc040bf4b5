//! The request path's side of `telemetry::proxy`: body byte counts and why a TLS handshake
//! failed, in a few words that make a bounded label.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;

use super::upstream::{Body, BoxError};

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
    use crate::proxy::upstream::full;

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
