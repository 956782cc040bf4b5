//! A response to an HTTP/1.1 caller of `h1server`, on the wire: the head with hyper's framing
//! rules (a length when the body's is known, chunked when not, none for HEAD, 1xx, 204 and
//! 304; a Date), then the body, with what is ready gathered into one write, and flushed.

use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::Poll;

use bytes::BytesMut;
use http::StatusCode;
use http::header;
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::h1server::fill;
use super::upstream::Body;

/// Response bytes gathered before they are written even though more are ready.
const WRITE_BATCH: usize = 64 * 1024;

/// How the response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// Content-Length: this many bytes are still to come.
    Length(u64),
    Chunked,
}

/// Writes the status line and header fields with the framing (hyper's rules: a length when
/// known, else chunked; none for HEAD, 1xx, 204 and 304) and a Date; returns the framing.
/// `keep_alive` turns false when the response says `connection: close`.
pub(super) fn encode_head(
    parts: &http::response::Parts,
    body: &Body,
    head_request: bool,
    keep_alive: &mut bool,
    out: &mut Vec<u8>,
) -> Framing {
    let status = parts.status;
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut length = None;
    let mut date = false;
    let mut close_said = false;
    for (name, value) in &parts.headers {
        match *name {
            // Framing is this hop's to choose.
            header::TRANSFER_ENCODING => continue,
            header::CONTENT_LENGTH => {
                if bodiless || length.is_some() {
                    continue;
                }
                match value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                {
                    Some(n) => length = Some(n),
                    None => continue,
                }
            }
            header::CONNECTION => {
                let close = value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                if close {
                    *keep_alive = false;
                    close_said = true;
                }
            }
            header::DATE => date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = if bodiless {
        Framing::None
    } else {
        // A HEAD answer's empty body says nothing of the resource's length (hyper's rule).
        let implied = body
            .size_hint()
            .exact()
            .filter(|&n| !(head_request && n == 0));
        match length.or(implied) {
            Some(n) => {
                if length.is_none() {
                    let _ = write!(out, "content-length: {n}\r\n");
                }
                if head_request {
                    Framing::None
                } else {
                    Framing::Length(n)
                }
            }
            None if head_request => Framing::None,
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        }
    };
    if !*keep_alive && !close_said {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !date {
        out.extend_from_slice(b"date: ");
        http_date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// Sends `out` (the head) and the body in `framing`, gathering what is ready into one write;
/// while the body has nothing ready, reads from the caller (pipelined requests go to `read`;
/// a closed connection ends this with an error, which drops the body and so its upstream).
pub(super) async fn write_body<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    read: &mut BytesMut,
    mut out: Vec<u8>,
    framing: Framing,
    body: Body,
) -> io::Result<()> {
    let mut remaining = match framing {
        Framing::None => {
            drop(body);
            return send(io, &out).await;
        }
        Framing::Length(n) => n,
        Framing::Chunked => 0,
    };
    let mut body = body;
    let aborted = |why: &str| io::Error::other(format!("response body {why}"));
    loop {
        let frame = if body.is_end_stream() {
            None
        } else {
            let ready = std::future::poll_fn(|cx| {
                Poll::Ready(match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Ready(frame) => Some(frame),
                    Poll::Pending => None,
                })
            })
            .await;
            match ready {
                Some(frame) => frame,
                None => {
                    if !out.is_empty() {
                        send(io, &out).await?;
                        out.clear();
                    }
                    loop {
                        tokio::select! {
                            biased;
                            frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => break frame,
                            r = fill(io, read), if read.is_empty() => match r {
                                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                                Err(e) => return Err(e),
                                Ok(_) => {}
                            },
                        }
                    }
                }
            }
        };
        match frame {
            None => {
                match framing {
                    Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
                    _ if remaining > 0 => {
                        let _ = send(io, &out).await;
                        return Err(aborted("ended before its Content-Length"));
                    }
                    _ => {}
                }
                return send(io, &out).await;
            }
            Some(Err(_)) => {
                // Cut short: the caller sees the connection close mid-body, as with hyper.
                let _ = send(io, &out).await;
                return Err(aborted("failed"));
            }
            Some(Ok(frame)) => {
                // Trailers have no place in this framing (the request did not offer TE).
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                match framing {
                    Framing::Chunked => {
                        let _ = write!(out, "{:x}\r\n", data.len());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    }
                    _ => {
                        let n = data.len() as u64;
                        if n > remaining {
                            let _ = send(io, &out).await;
                            return Err(aborted("is longer than its Content-Length"));
                        }
                        remaining -= n;
                        out.extend_from_slice(&data);
                    }
                }
                if out.len() >= WRITE_BATCH {
                    send(io, &out).await?;
                    out.clear();
                }
            }
        }
    }
}

/// Writes `bytes` and flushes them (a TLS stream may hold what it took; a socket holds nothing).
async fn send<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// Today's IMF-fixdate, formatted once a second per thread.
fn http_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(c.1.as_bytes());
    });
}
