//! The one body type that crosses palisade in both directions.
//!
//! Upstream requests carry the client's streaming body (optionally capped at
//! `server.limits.max_body_bytes`), client responses carry the backend's streaming body or a
//! small body palisade made itself. An enum instead of a boxed trait object keeps the hot
//! path free of a per-request allocation, and nothing here ever buffers a whole body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::{Body, Incoming};

/// The error type of [`ProxyBody`]: whatever the inner stream failed with, or [`BodyTooLarge`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body grew past `server.limits.max_body_bytes` while it was streamed.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    /// The configured limit in bytes.
    pub limit: u64,
}

/// A streaming HTTP body: empty, one chunk in memory, or a peer's stream passed through.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body at all.
    Empty,
    /// One chunk, yielded once (palisade's own answers).
    Full(Option<Bytes>),
    /// A peer's body, streamed through as it arrives.
    Stream(Incoming),
    /// A client's body, streamed through, failing once more than `remaining` bytes arrive.
    Limited {
        /// The client's body.
        inner: Incoming,
        /// Bytes still allowed.
        remaining: u64,
        /// The configured limit, for the error.
        limit: u64,
    },
}

impl ProxyBody {
    /// A body of one static chunk: no allocation.
    pub fn from_static(text: &'static str) -> Self {
        ProxyBody::Full(Some(Bytes::from_static(text.as_bytes())))
    }

    /// Streams `inner`, failing with [`BodyTooLarge`] past `limit` bytes (0 = unlimited).
    pub fn limited(inner: Incoming, limit: u64) -> Self {
        if limit == 0 {
            ProxyBody::Stream(inner)
        } else {
            ProxyBody::Limited {
                inner,
                remaining: limit,
                limit,
            }
        }
    }
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        ProxyBody::Full(Some(bytes))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(chunk) => Poll::Ready(chunk.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            ProxyBody::Limited {
                inner,
                remaining,
                limit,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let len = data.len() as u64;
                        if len > *remaining {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                                limit: *limit,
                            }))));
                        }
                        *remaining -= len;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                other => other.map_err(Into::into),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(chunk) => chunk.is_none(),
            ProxyBody::Stream(inner) | ProxyBody::Limited { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(chunk) => {
                SizeHint::with_exact(chunk.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Stream(inner) | ProxyBody::Limited { inner, .. } => inner.size_hint(),
        }
    }
}
