//! Keeping a request so a retry can send it again. A body of known size up to the limit is
//! read first (the client has committed to sending it all); any other body streams to the
//! first attempt as it arrives, with a copy kept on the side (Envoy's way: a client stream
//! that waits for answers is never held back). A retry may go only when the copy is whole:
//! the body ended within the limit.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body as _, Frame, SizeHint};

use super::upstream::{Body, BoxError, TARGET_PORT, UpstreamError, full};

/// Bodies up to this size are kept for a retry (Envoy's default buffer); a larger one is not
/// retried.
pub const MAX_REPLAY_BYTES: u64 = 1 << 20;
/// The header that tells the app which attempt this is (1 for the first).
pub const ATTEMPT: http::HeaderName = http::HeaderName::from_static("x-trellis-attempt");

/// What every attempt sends: the head, and the body (or its copy).
pub struct Replayable {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    kept: Kept,
}

enum Kept {
    /// Read in full before the first attempt.
    Whole(Bytes),
    /// Streaming to the first attempt (until taken), copied as it goes.
    Teed {
        body: Option<Body>,
        copy: Arc<Mutex<Copy>>,
    },
    /// Streaming, not kept (no retries planned).
    Once(Option<Body>),
}

#[derive(Default)]
struct Copy {
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: u64,
    ended: bool,
    overflow: bool,
}

impl Replayable {
    /// `keep`: retries are possible, so keep the body.
    pub async fn new(req: Request<Body>, keep: bool) -> Result<Self, UpstreamError> {
        let (parts, body) = req.into_parts();
        let kept = if body.is_end_stream() {
            Kept::Whole(Bytes::new())
        } else if !keep {
            Kept::Once(Some(body))
        } else if body
            .size_hint()
            .exact()
            .is_some_and(|s| s <= MAX_REPLAY_BYTES)
        {
            Kept::Whole(read_whole(body).await?)
        } else {
            Kept::Teed {
                body: Some(body),
                copy: Arc::default(),
            }
        };
        Ok(Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            kept,
        })
    }

    /// Whether another attempt can carry the whole body, checked when it is due.
    pub fn can_replay(&self) -> impl Fn() -> bool + use<> {
        let copy = match &self.kept {
            Kept::Whole(_) => None,
            Kept::Teed { copy, .. } => Some(Some(copy.clone())),
            Kept::Once(_) => Some(None),
        };
        move || match &copy {
            None => true,
            Some(Some(c)) => {
                let c = c.lock().unwrap_or_else(|e| e.into_inner());
                c.ended && !c.overflow
            }
            Some(None) => false,
        }
    }

    /// The request for attempt `n` (1-based), to the app port `target_port`; `None` when the
    /// body cannot be sent again.
    pub fn attempt(&mut self, n: u32, target_port: u16) -> Option<Request<Body>> {
        let body = match &mut self.kept {
            Kept::Whole(b) => full(b.clone()),
            Kept::Once(b) => b.take()?,
            Kept::Teed { body, copy } => match body.take() {
                Some(inner) => Tee {
                    inner,
                    copy: copy.clone(),
                }
                .boxed(),
                None => replay(&copy.lock().unwrap_or_else(|e| e.into_inner()))?,
            },
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req.headers_mut()
            .insert(TARGET_PORT, http::HeaderValue::from(target_port));
        req.headers_mut()
            .insert(ATTEMPT, http::HeaderValue::from(n));
        Some(req)
    }
}

fn replay(copy: &Copy) -> Option<Body> {
    if !copy.ended || copy.overflow {
        return None;
    }
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = copy
        .data
        .iter()
        .cloned()
        .map(|d| Ok(Frame::data(d)))
        .collect();
    if let Some(t) = &copy.trailers {
        frames.push(Ok(Frame::trailers(t.clone())));
    }
    Some(StreamBody::new(futures_util::stream::iter(frames)).boxed())
}

/// A body of declared size, read in full (never more than the replay limit). Not `Limited`:
/// its `Into<BoxError>` bound on a boxed body trips rustc's higher-ranked Send check in the
/// request path's futures.
async fn read_whole(mut body: Body) -> Result<Bytes, UpstreamError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| UpstreamError::BadRequest(format!("reading the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if (buf.len() + data.len()) as u64 > MAX_REPLAY_BYTES {
                return Err(UpstreamError::BadRequest(
                    "the request body is larger than its declared length".into(),
                ));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// The first attempt's body: passes frames on and copies them.
struct Tee {
    inner: Body,
    copy: Arc<Mutex<Copy>>,
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = self.inner.is_end_stream();
        let mut c = self.copy.lock().unwrap_or_else(|e| e.into_inner());
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    c.size += d.len() as u64;
                    if c.size > MAX_REPLAY_BYTES {
                        c.overflow = true;
                        c.data.clear();
                    } else if !c.overflow {
                        c.data.push(d.clone());
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    c.trailers = Some(t.clone());
                }
                // The sender may stop polling once the body says it has ended.
                c.ended |= ended;
            }
            Poll::Ready(None) => c.ended = true,
            _ => {}
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
