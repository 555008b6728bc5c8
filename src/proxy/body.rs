//! The one body type that crosses palisade in both directions.
//!
//! Upstream requests carry the client's streaming body (optionally capped at
//! `server.limits.max_body_bytes`), client responses carry the backend's streaming body or a
//! small body palisade made itself. An enum instead of a boxed trait object keeps the hot
//! path free of a per-request allocation, and nothing here ever buffers a whole body.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::{Body, Incoming};

use crate::upstream::h1::RawHeaders;
use crate::upstream::pool::UpstreamBody;

/// The error type of [`ProxyBody`]: whatever the inner stream failed with, or [`BodyTooLarge`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body grew past `server.limits.max_body_bytes` while it was streamed.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    /// The configured limit in bytes.
    pub limit: u64,
}

/// A client's request body: read by palisade's HTTP/1.1 codec, or by hyper (HTTP/2).
#[derive(Debug)]
pub enum ClientBody {
    /// The request has no body.
    Empty,
    /// Read off an HTTP/1.1 connection by palisade's codec.
    Own(crate::server::h1::RequestBody),
    /// Read by hyper (HTTP/2).
    Hyper(Incoming),
}

/// Reading the client's request body failed (cut short, malformed chunking, the socket):
/// the client's fault, never held against a backend.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct ClientBodyError(#[source] pub BoxError);

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut polled = match self.get_mut() {
            ClientBody::Empty => return Poll::Ready(None),
            ClientBody::Own(body) => Pin::new(body).poll_frame(cx),
            ClientBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        };
        if let Poll::Ready(Some(Ok(frame))) = &mut polled {
            if let Some(trailers) = frame.trailers_mut() {
                super::headers::filter_trailers(trailers);
            }
        }
        polled.map_err(|e| Box::new(ClientBodyError(e)) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Own(body) => body.is_end_stream(),
            ClientBody::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Own(body) => body.size_hint(),
            ClientBody::Hyper(body) => body.size_hint(),
        }
    }
}

/// A streaming HTTP body: empty, one chunk in memory, or a peer's stream passed through.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body at all.
    Empty,
    /// One chunk, yielded once (palisade's own answers).
    Full(Option<Bytes>),
    /// A client's body, streamed through as it arrives.
    Stream(ClientBody),
    /// A backend's response body, streamed through; gives its pooled connection back at
    /// the end.
    Upstream(UpstreamBody),
    /// A parked client body, taken by the attempt sending it: its failure is noted in
    /// the slot, where the attempt's outcome is judged.
    Taken {
        /// The body, limited or not.
        inner: Box<ProxyBody>,
        /// The slot it came from, marked as sending until the body ends or is dropped.
        slot: Sending,
    },
    /// A client's body, streamed through, failing once more than `remaining` bytes arrive.
    Limited {
        /// The client's body.
        inner: ClientBody,
        /// Bytes still allowed.
        remaining: u64,
        /// The configured limit, for the error.
        limit: u64,
    },
    /// A client's body parked in a shared slot until the first poll takes it: an attempt
    /// whose connection failed never polled it, so a retry can still send it.
    Deferred {
        /// Where the body waits.
        slot: Arc<Parked>,
        /// Bytes still allowed (u64::MAX: unlimited).
        remaining: u64,
        /// The configured limit, for the error.
        limit: u64,
    },
}

/// A streaming client body waiting for the attempt that sends it, and what became of it.
#[derive(Debug)]
pub struct Parked {
    body: Mutex<Option<ClientBody>>,
    /// How reading it failed, if it did: [`NO_FAULT`], [`TOO_LARGE`] or [`BROKEN`].
    fault: std::sync::atomic::AtomicU8,
    /// An attempt is sending the body and has not reached its end: the backend may wait
    /// for the rest before it answers on (its silence is then not its own).
    sending: std::sync::atomic::AtomicBool,
    /// When the last attempt stopped sending it ([`crate::clock::coarse_ns`]; 0: never).
    stopped_at: std::sync::atomic::AtomicU64,
}

/// A parked body's slot while an attempt sends the body: marks it as sending, until the
/// body's end or the attempt's drop.
#[derive(Debug)]
pub struct Sending(Arc<Parked>);

impl Sending {
    fn start(slot: Arc<Parked>) -> Self {
        slot.sending
            .store(true, std::sync::atomic::Ordering::Release);
        Sending(slot)
    }

    fn stop(&self) {
        if self
            .0
            .sending
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            self.0.stopped_at.store(
                crate::clock::coarse_ns(),
                std::sync::atomic::Ordering::Release,
            );
        }
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.stop();
    }
}

const NO_FAULT: u8 = 0;
const TOO_LARGE: u8 = 1;
const BROKEN: u8 = 2;

impl Parked {
    /// Whether an attempt is still sending the body (started, not ended nor dropped).
    pub fn is_sending(&self) -> bool {
        self.sending.load(std::sync::atomic::Ordering::Acquire)
    }

    /// When the body stopped being sent ([`crate::clock::coarse_ns`]; 0: never started).
    pub fn stopped_at(&self) -> u64 {
        self.stopped_at.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Notes a failure of the client's body (too large, cut short, malformed), so that
    /// the attempt it broke is not held against its backend, whatever that backend's
    /// client reported (hyper's HTTP/2 client only says it reset the stream).
    fn note(&self, error: &BoxError) {
        let fault = if error.is::<BodyTooLarge>() {
            TOO_LARGE
        } else if error.is::<ClientBodyError>() {
            BROKEN
        } else {
            return;
        };
        self.fault
            .store(fault, std::sync::atomic::Ordering::Release);
    }
}

/// A request body that can be sent more than once: empty, in memory, or parked until the
/// first attempt that actually sends it.
#[derive(Debug, Clone)]
pub enum Replayable {
    /// No body.
    Empty,
    /// The whole body, in memory (small bodies are read before forwarding).
    Full(Bytes),
    /// A streaming body; replayable only until an attempt started sending it.
    Parked {
        /// The slot shared by every attempt.
        slot: Arc<Parked>,
        /// The body limit (0 = unlimited).
        limit: u64,
    },
}

impl Replayable {
    /// Parks a streaming body.
    pub fn park(body: ClientBody, limit: u64) -> Self {
        Replayable::Parked {
            slot: Arc::new(Parked {
                body: Mutex::new(Some(body)),
                fault: std::sync::atomic::AtomicU8::new(NO_FAULT),
                sending: std::sync::atomic::AtomicBool::new(false),
                stopped_at: std::sync::atomic::AtomicU64::new(0),
            }),
            limit,
        }
    }

    /// The body for one attempt.
    pub fn attempt(&self) -> ProxyBody {
        match self {
            Replayable::Empty => ProxyBody::Empty,
            Replayable::Full(bytes) => ProxyBody::Full(Some(bytes.clone())),
            Replayable::Parked { slot, limit } => ProxyBody::Deferred {
                slot: slot.clone(),
                remaining: if *limit == 0 { u64::MAX } else { *limit },
                limit: *limit,
            },
        }
    }

    /// Whether another attempt can still send the whole body: always for bodies in
    /// memory, and for a streaming body only while no attempt has started reading it.
    pub fn can_replay(&self) -> bool {
        match self {
            Replayable::Empty | Replayable::Full(_) => true,
            Replayable::Parked { slot, .. } => {
                slot.body.lock().map(|s| s.is_some()).unwrap_or(false)
            }
        }
    }

    /// The client's fault, if reading its streaming body failed: an attempt that failed
    /// meanwhile failed because of it.
    pub fn client_fault(&self) -> Option<crate::proxy::error::ProxyError> {
        use crate::proxy::error::ProxyError;
        let Replayable::Parked { slot, .. } = self else {
            return None;
        };
        match slot.fault.load(std::sync::atomic::Ordering::Acquire) {
            TOO_LARGE => Some(ProxyError::BodyTooLarge),
            BROKEN => Some(ProxyError::BadRequest(
                "request body ended early or malformed",
            )),
            _ => None,
        }
    }

    /// Whether the body is in memory (or absent), so it can be sent again even after a
    /// backend received it.
    pub fn is_buffered(&self) -> bool {
        matches!(self, Replayable::Empty | Replayable::Full(_))
    }
}

impl ProxyBody {
    /// Whether the body is all in memory (none, or one chunk): it can be sent again.
    pub fn is_in_memory(&self) -> bool {
        matches!(self, ProxyBody::Empty | ProxyBody::Full(_))
    }

    /// A backend's header lines kept as it wrote them (palisade's HTTP/1.1 client codec),
    /// when this is such a backend's response body: the response's header map holds the
    /// rest (usually nothing).
    pub fn raw_headers(&self) -> Option<&RawHeaders> {
        match self {
            ProxyBody::Upstream(body) => body.raw_headers(),
            _ => None,
        }
    }

    /// Moves header lines kept as written into `headers`, for a sender that needs a map
    /// (hyper's HTTP/2 server).
    pub fn move_raw_headers(&mut self, headers: &mut http::HeaderMap) {
        if let ProxyBody::Upstream(body) = self {
            if let Some(raw) = body.take_raw_headers() {
                raw.into_map(headers);
            }
        }
    }

    /// A body of one static chunk: no allocation.
    pub fn from_static(text: &'static str) -> Self {
        ProxyBody::Full(Some(Bytes::from_static(text.as_bytes())))
    }

    /// Streams `inner`, failing with [`BodyTooLarge`] past `limit` bytes (0 = unlimited).
    pub fn limited(inner: ClientBody, limit: u64) -> Self {
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

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(chunk) => Poll::Ready(chunk.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream(inner) => Pin::new(inner).poll_frame(cx),
            ProxyBody::Upstream(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            ProxyBody::Taken { inner, slot } => {
                let polled = Pin::new(&mut **inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Err(e))) => {
                        slot.0.note(e);
                        slot.stop();
                    }
                    Poll::Ready(None) => slot.stop(),
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => slot.stop(),
                    _ => {}
                }
                polled
            }
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
                other => other,
            },
            ProxyBody::Deferred {
                slot,
                remaining,
                limit,
            } => {
                // First poll: take the body out of the slot and stream it from here on.
                let taken = slot.body.lock().ok().and_then(|mut s| s.take());
                match taken {
                    Some(inner) => {
                        let (remaining, limit) = (*remaining, *limit);
                        let inner = Box::new(if remaining == u64::MAX {
                            ProxyBody::Stream(inner)
                        } else {
                            ProxyBody::Limited {
                                inner,
                                remaining,
                                limit,
                            }
                        });
                        let slot = Sending::start(slot.clone());
                        let this = self.get_mut();
                        *this = ProxyBody::Taken { inner, slot };
                        Pin::new(this).poll_frame(cx)
                    }
                    None => Poll::Ready(Some(Err("request body already consumed".into()))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(chunk) => chunk.is_none(),
            ProxyBody::Stream(inner) | ProxyBody::Limited { inner, .. } => inner.is_end_stream(),
            ProxyBody::Upstream(inner) => inner.is_end_stream(),
            ProxyBody::Taken { inner, .. } => inner.is_end_stream(),
            ProxyBody::Deferred { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(chunk) => {
                SizeHint::with_exact(chunk.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Stream(inner) | ProxyBody::Limited { inner, .. } => inner.size_hint(),
            ProxyBody::Upstream(inner) => inner.size_hint(),
            ProxyBody::Taken { inner, .. } => inner.size_hint(),
            ProxyBody::Deferred { slot, .. } => slot
                .body
                .lock()
                .ok()
                .and_then(|s| s.as_ref().map(|b| b.size_hint()))
                .unwrap_or_default(),
        }
    }
}
