//! The first request head on a plaintext HTTP/1 connection, looked at (peeked, not read)
//! before hyper serves the connection, for what hyper would otherwise let through quietly:
//! a head that never completes (slowloris: 408), one larger than the limit (431), and a
//! message whose length is ambiguous (request smuggling: Content-Length with
//! Transfer-Encoding, or Content-Lengths that disagree: 400, as Envoy answers). Each is
//! answered and the connection closed. Later requests on a kept-alive connection meet hyper's
//! own limits (the same size, the header read timeout); hyper closes a connection after any
//! request that carried both lengths, so nothing can be smuggled behind one.

use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Largest head accepted: a request's from a caller, and a response's (or a chunked body's
/// trailers) from an app (Envoy's default is 60 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// How often to look again while a head is incomplete.
const REPEEK: Duration = Duration::from_millis(5);

/// What to do with a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to hyper (which answers what it finds malformed with 400).
    Serve,
    /// Answer with this status and reason, then close.
    Refuse(u16, String),
}

/// Looks at the first head arriving on `tcp` within `timeout`.
pub async fn first_head(tcp: &TcpStream, timeout: Duration) -> Verdict {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_HEAD_BYTES + 1];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Err(_) => return timed_out(seen),
            Ok(Err(_)) | Ok(Ok(0)) => return Verdict::Serve,
            Ok(Ok(n)) => n,
        };
        let got = &buf[..n];
        if got.starts_with(b"PRI ") {
            // HTTP/2 with prior knowledge (h2c): hyper's to serve.
            if n >= H2_PREFACE.len() {
                return Verdict::Serve;
            }
        } else if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            return check(&got[..end + 4]);
        } else if n > MAX_HEAD_BYTES {
            return Verdict::Refuse(
                431,
                format!("the request head is larger than {MAX_HEAD_BYTES} bytes"),
            );
        }
        if n == seen
            && tokio::time::timeout_at(deadline, tokio::time::sleep(REPEEK))
                .await
                .is_err()
        {
            return timed_out(seen);
        }
        seen = n;
    }
}

/// Whether a connection [`first_head`] let through opens with HTTP/2's preface (h2c with
/// prior knowledge) rather than an HTTP/1 head.
pub async fn starts_h2(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 4];
    matches!(tcp.peek(&mut buf).await, Ok(4)) && buf == H2_PREFACE[..4]
}

fn timed_out(seen: usize) -> Verdict {
    if seen == 0 {
        // Nothing sent at all: an idle connection, closed without a word.
        Verdict::Refuse(0, String::new())
    } else {
        Verdict::Refuse(408, "the request head did not arrive in time".into())
    }
}

/// One Content-Length value: digits only (no sign, space or list), as RFC 9110 §8.6 has it.
pub fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The length rules of RFC 9112 §6, strictly.
pub fn check(head: &[u8]) -> Verdict {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(head).is_err() {
        return Verdict::Serve;
    }
    let mut lengths = Vec::new();
    let mut te = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths.push(String::from_utf8_lossy(h.value).trim().to_string());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = Some(String::from_utf8_lossy(h.value).to_ascii_lowercase());
        }
    }
    let refuse = |why: &str| Verdict::Refuse(400, why.to_string());
    if te.is_some() && !lengths.is_empty() {
        return refuse("both Content-Length and Transfer-Encoding: the length is ambiguous");
    }
    if lengths
        .iter()
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1
    {
        return refuse("Content-Length values disagree");
    }
    if let Some(te) = te
        && te.rsplit(',').next().map(str::trim) != Some("chunked")
    {
        return refuse("Transfer-Encoding must end with chunked");
    }
    Verdict::Serve
}

/// Sends the refusal (if it has a status) and closes.
pub async fn refuse<S: AsyncWrite + Unpin>(mut io: S, status: u16, reason: &str) {
    if status != 0 {
        let phrase = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        let body = format!("trellis: {reason}\n");
        let resp = format!(
            "HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = io.write_all(resp.as_bytes()).await;
    }
    let _ = io.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_lengths_are_refused() {
        let both = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(check(both), Verdict::Refuse(400, _)));
        let two = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert!(matches!(check(two), Verdict::Refuse(400, _)));
        let same = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(check(same), Verdict::Serve);
        let gzip = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
        assert!(matches!(check(gzip), Verdict::Refuse(400, _)));
        let ok = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(check(ok), Verdict::Serve);
        assert_eq!(check(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Verdict::Serve);
    }

    #[tokio::test]
    async fn slow_and_oversized_heads_are_refused() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        let v = first_head(&server, Duration::from_millis(200)).await;
        assert!(matches!(v, Verdict::Refuse(408, _)), "{v:?}");

        let mut big = TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let head = format!(
            "GET / HTTP/1.1\r\nX-Big: {}\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        tokio::spawn(async move {
            let _ = big.write_all(head.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let v = first_head(&server, Duration::from_secs(5)).await;
        assert!(matches!(v, Verdict::Refuse(431, _)), "{v:?}");

        let mut h2 = TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            first_head(&server, Duration::from_secs(5)).await,
            Verdict::Serve
        );
    }
}
