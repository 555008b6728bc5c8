//! palisade's own HTTP/1.1 client codec for plain backends.
//!
//! hyper's client connection runs in a task of its own and talks to the request through
//! channels: every proxied request woke that task twice and crossed three channels (the
//! request, the response, the body). Here the request's own task does the whole exchange
//! on the socket it borrowed from the pool: it writes the head (and a small body in the
//! same write), reads and parses the response head with `httparse`, and the response body
//! reads the socket directly as the client connection polls it. When the body has been
//! read to its end on a connection that may be kept, the connection goes back to the pool
//! ([`super::pool`]).
//!
//! Framing follows RFC 9112: no body for HEAD, 1xx, 204 and 304; chunked when
//! Transfer-Encoding ends in chunked; else Content-Length; else until the backend closes.
//! A response with both Content-Length and Transfer-Encoding, differing Content-Lengths, or
//! malformed chunking is an error (502), never guessed at, and such a connection is never
//! reused. Interim 1xx responses are skipped; a 101 hands the socket to the tunnel.

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arrayvec::ArrayVec;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::Backend;
use crate::http1::Chunk;
use crate::http1::{
    content_length, decode_chunk, header_line, items, span, trim, BodyWriter, ConnectionTokens,
    Decoded, Framing, InvalidChunk, WriteError, MAX_HEADERS, MAX_READ,
};
use crate::proxy::body::{BoxError, ProxyBody};
use crate::proxy::headers::{self, Forwarding};

/// The largest response head accepted (hyper's client allows about 400 KiB; nginx's
/// `proxy_buffer_size` default is one page, and answers 502 beyond it).
const MAX_HEAD: usize = 64 * 1024;

/// Read buffer for a response head: large enough that a 16 KiB answer arrives with its
/// head in one read (8 KiB took a second `recvfrom` for it). Only requests in flight
/// hold one, and only the pages a read fills are touched.
const HEAD_BUF: usize = 32 * 1024;

/// A request body up to this size with a known length goes in the head's write.
const INLINE_BODY: u64 = 16 * 1024;

/// One open connection to a backend.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    /// The response deadline, made once per connection and moved on for each request:
    /// moving a registered deadline later is one atomic operation, where a timer made per
    /// request took the timer wheel's lock to register it and again to cancel it.
    timer: Pin<Box<Sleep>>,
}

impl Conn {
    /// Wraps a connected socket (inside the runtime: the timer needs its time driver).
    pub fn new(io: TcpStream) -> Self {
        Conn {
            io,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
        }
    }

    /// Whether an idle connection can carry a request: the backend has not closed it and
    /// sent nothing unasked. Costs no system call unless the socket became readable.
    pub fn is_open(&self) -> bool {
        // `try_read` reads only when tokio has seen the socket become readable, and then
        // finds it closed (a read gives 0), unasked bytes, or only a stale readiness from
        // the last read having filled its buffer exactly (WouldBlock, which clears it).
        // Not readable: WouldBlock at once, from one atomic load. (`poll_read_ready` with
        // a no-op waker did the same but stored the waker under the socket's lock: four
        // atomic operations per request.)
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Why an exchange failed once the request could have reached the backend.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The connection ended before a response head arrived.
    #[error("the backend closed the connection without answering")]
    ClosedBeforeResponse,
    /// The connection ended inside the response head.
    #[error("the backend closed the connection inside its response head")]
    ClosedInHead,
    /// The response head is not valid HTTP/1.x.
    #[error("invalid response head from the backend: {0}")]
    InvalidHead(&'static str),
    /// The response head did not end within 64 KiB.
    #[error("the backend's response head exceeds {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The chunked response body is malformed.
    #[error("invalid chunked encoding in the backend's response body")]
    InvalidChunk,
    /// The connection ended before the response body did.
    #[error("the backend closed the connection before the end of its response body")]
    Truncated,
    /// The request body's length differs from the one its head declared.
    #[error("the request body's length differs from its declared length")]
    RequestBodyLength,
    /// Reading the client's request body failed (or it grew past the limit).
    #[error("request body: {0}")]
    RequestBody(#[source] BoxError),
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl From<WriteError> for ProtoError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Length => ProtoError::RequestBodyLength,
            WriteError::Body(e) => ProtoError::RequestBody(e),
            WriteError::Io(e) => ProtoError::Io(e),
        }
    }
}

/// How an exchange failed.
pub enum Failure {
    /// The request head could not be written, so nothing reached the backend: the body
    /// comes back for another connection.
    NotSent(ProxyBody, io::Error),
    /// The request may have reached the backend.
    Failed(ProtoError),
    /// The request was written whole (it had no body to stream), and the connection
    /// closed or reset before a single byte of answer: on a pooled connection, most
    /// likely the backend closing it as idle while the request was on its way. The body
    /// comes back, so that an idempotent request can go on a fresh connection.
    Unanswered(ProxyBody, ProtoError),
    /// The response head had not arrived by the deadline (the request may have reached
    /// the backend).
    TimedOut,
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NotSent(_, e) => f.debug_tuple("NotSent").field(e).finish(),
            Failure::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
            Failure::Unanswered(_, e) => f.debug_tuple("Unanswered").field(e).finish(),
            Failure::TimedOut => f.write_str("TimedOut"),
        }
    }
}

/// Whether `e` ends an exchange the backend never answered: the connection closed, or was
/// reset, before any byte of a response.
fn unanswered(e: &ProtoError) -> bool {
    match e {
        ProtoError::ClosedBeforeResponse => true,
        ProtoError::Io(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        ),
        _ => false,
    }
}

/// What the codec writes as a request head; borrowed, so that a retry sends the same
/// head again without a copy of the header map.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The origin-form target (path and query).
    pub target: &'a str,
    /// HTTP/1.1, or HTTP/1.0 for a backend that speaks only that.
    pub version: Version,
    /// The client's headers, hop-by-hop ones removed.
    pub headers: &'a HeaderMap,
    /// The forwarding headers, written after the client's (replacing theirs).
    pub forwarding: &'a Forwarding,
    /// The Host to send when `headers` has none (an HTTP/1.0 client may send none).
    pub default_host: &'a str,
    /// The upstream's response timeout: from the end of a streamed body to the response
    /// head, and the longest the backend may go without taking body bytes before that.
    pub response_timeout: Duration,
    /// The longest the client may pause its streamed body (`server.timeouts.idle`): then
    /// the request fails as the client's (408), never the backend's.
    pub body_pause: Duration,
}

/// The client paused its request body longer than `server.timeouts.idle` while it was
/// being sent to a backend.
#[derive(Debug, thiserror::Error)]
#[error("the client paused its request body for longer than {0:?}")]
pub struct ClientBodyTimeout(pub Duration);

/// Sends a request with `head` and `body` on `conn` and reads the response head, which
/// must arrive by `deadline`. The response body keeps the connection and gives it back to
/// `backend`'s pool once read to its end.
pub async fn exchange(
    mut conn: Conn,
    head: &RequestHead<'_>,
    mut body: ProxyBody,
    backend: &Arc<Backend>,
    deadline: Instant,
) -> Result<Response<ResponseBody>, Failure> {
    let framing = if body.is_end_stream() {
        Framing::None
    } else {
        match body.size_hint().exact() {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        }
    };
    let mut out = encode_head(head, framing);
    // A small body whose length is known goes out with the head, in one write.
    let mut inlined = None;
    if let (Framing::Length(n), ProxyBody::Full(chunk)) = (framing, &mut body) {
        if n <= INLINE_BODY {
            if let Some(bytes) = chunk.take() {
                out.extend_from_slice(&bytes);
                inlined = Some(bytes);
            }
        }
    }
    conn.timer.as_mut().reset(deadline);
    let Conn { io, timer } = &mut conn;
    match within(timer.as_mut(), io.write_all(&out)).await {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            // A head cut short is never acted on: the request can go elsewhere.
            if let (Some(bytes), ProxyBody::Full(chunk)) = (inlined, &mut body) {
                *chunk = Some(bytes);
            }
            return Err(Failure::NotSent(body, e));
        }
        None => return Err(Failure::TimedOut),
    }
    drop(out);

    let head_request = *head.method == Method::HEAD;
    // A body held in memory can be sent again if the backend never answers (a reference
    // to its bytes: no copy).
    let replay = match (&inlined, &body) {
        (Some(bytes), _) | (None, ProxyBody::Full(Some(bytes))) => Some(bytes.clone()),
        _ => None,
    };
    let mut writer = if inlined.is_some() {
        BodyWriter::finished()
    } else {
        BodyWriter::new(body, framing, true)
    };
    let mut buf = BytesMut::with_capacity(HEAD_BUF);
    // While a body streams, the timer is the backend's only while it is the one holding
    // things up: each time bytes move it restarts, with the response timeout while the
    // backend has body bytes to take (or, once the body is written, the response head to
    // send), and with the client's pause limit while the writer waits for the client.
    let mut moved = None;
    let mut client_turn = false;
    // Writing the body failed: the backend may have answered and closed without reading
    // it all (EPIPE, or a reset after its answer). What it sent is read first; only when
    // there is no answer is this the failure.
    let mut write_failed: Option<ProtoError> = None;
    let parsing = poll_fn(|cx| {
        // The body is written while the response is awaited: a backend may answer early
        // (413, 401, a redirect) without reading the whole body.
        if write_failed.is_none() && (!writer.done() || moved.is_some()) {
            if !writer.done() {
                match writer.poll_write(cx, io) {
                    // Only the socket's failure waits for what the backend sent; the
                    // client's body failing (cut short, too large, malformed) is the
                    // request's failure at once.
                    Poll::Ready(Err(WriteError::Io(e))) => write_failed = Some(ProtoError::Io(e)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Failed(e.into()))),
                    _ => {}
                }
            }
            let done = writer.done();
            if done || moved != Some(writer.moved()) {
                moved = (!done).then(|| writer.moved());
                client_turn = !done && writer.awaits_body();
                let limit = if client_turn {
                    head.body_pause
                } else {
                    head.response_timeout
                };
                if let Some(at) = Instant::now().checked_add(limit) {
                    timer.as_mut().reset(at);
                }
            }
        }
        loop {
            if let Some(head) =
                parse_head(&mut buf, head_request, MAX_HEAD).map_err(Failure::Failed)?
            {
                return Poll::Ready(Ok(head));
            }
            buf.reserve(HEAD_BUF);
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut buf);
            let n = match read {
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(Failure::Failed(
                        write_failed.take().unwrap_or_else(|| e.into()),
                    )))
                }
                Poll::Ready(Ok(n)) => n,
                Poll::Pending => break,
            };
            if let (0, Some(e)) = (n, write_failed.take()) {
                return Poll::Ready(Err(Failure::Failed(e)));
            }
            if n == 0 {
                return Poll::Ready(Err(Failure::Failed(if buf.is_empty() {
                    ProtoError::ClosedBeforeResponse
                } else {
                    ProtoError::ClosedInHead
                })));
            }
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(if client_turn {
            Failure::Failed(ProtoError::RequestBody(Box::new(ClientBodyTimeout(
                head.body_pause,
            ))))
        } else {
            Failure::TimedOut
        }))
    });
    let parsed = match parsing.await {
        Ok(parsed) => parsed,
        Err(Failure::Failed(e)) if buf.is_empty() && unanswered(&e) => {
            // Sent from memory: it can be sent again as it was.
            return Err(match (framing, replay) {
                (Framing::None, _) => Failure::Unanswered(ProxyBody::Empty, e),
                (_, Some(bytes)) => Failure::Unanswered(ProxyBody::Full(Some(bytes)), e),
                _ => Failure::Failed(e),
            });
        }
        Err(failure) => return Err(failure),
    };
    // The timer stays registered until its deadline (moved on by the next request): poll
    // it once with a waker that does nothing, so that it no longer holds this request's
    // task.
    let _ = timer
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()));

    // A body not written to its end leaves the connection unusable.
    let reuse = parsed.keep_alive && writer.done();
    drop(writer);
    let (map, raw) = match parsed.headers {
        Headers::Raw(raw) => (HeaderMap::new(), Some(raw)),
        Headers::Map(map) => (map, None),
    };
    let mut body = ResponseBody {
        raw,
        state: parsed.framing,
        lent: Some(Lent {
            conn,
            backend: backend.clone(),
        }),
        buf,
        reuse,
    };
    if body.state == State::Length(0) || body.state == State::Done {
        body.finish();
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = parsed.status;
    *resp.version_mut() = parsed.version;
    *resp.headers_mut() = map;
    Ok(resp)
}

/// Polls `fut`, and `timer` while `fut` is pending: `None` when the timer fires first.
async fn within<F: Future>(mut timer: Pin<&mut Sleep>, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(out) => Poll::Ready(Some(out)),
        Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
    })
    .await
}

/// The request head, ready to write.
fn encode_head(head: &RequestHead<'_>, framing: Framing) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + head.headers.len() * 48);
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(if head.version == Version::HTTP_10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let mut declared_length = false;
    let mut has_host = false;
    for (name, value) in head.headers {
        // The framing headers are this codec's to write, from the body it really sends.
        if name == CONTENT_LENGTH {
            declared_length = true;
            continue;
        }
        if name == TRANSFER_ENCODING || head.forwarding.replaces(name) {
            continue;
        }
        has_host |= name == HOST;
        header_line(&mut out, name, value.as_bytes());
    }
    if !has_host {
        header_line(&mut out, &HOST, head.default_host.as_bytes());
    }
    head.forwarding
        .each(|name, value| header_line(&mut out, name, value));
    match framing {
        Framing::None => {
            // RFC 9110 8.6: a request whose method defines a body says it has none.
            let wants_length = declared_length
                || matches!(*head.method, Method::POST | Method::PUT | Method::PATCH);
            if wants_length {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        }
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // Never chosen for a request (its end would be ambiguous).
        Framing::Close => {}
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A parsed final response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: Headers,
    framing: State,
    keep_alive: bool,
}

/// Parses a response head at the start of `buf`, consuming it. Interim (1xx) responses
/// other than 101 are consumed and skipped. `Ok(None)`: the head is not complete yet (and
/// shorter than `limit`).
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    limit: usize,
) -> Result<Option<Head>, ProtoError> {
    loop {
        // Uninitialised slots: filling 128 of them for every response cost more than
        // parsing the head.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        // Only the first `limit` bytes are looked at: whether a long head is accepted
        // must not depend on how its bytes were split into reads (found by fuzzing).
        let window = &buf[..buf.len().min(limit)];
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            window,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if window.len() == limit => {
                return Err(ProtoError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ProtoError::InvalidHead("too many header lines"))
            }
            Err(_) => return Err(ProtoError::InvalidHead("malformed")),
        };
        let code = parsed.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| ProtoError::InvalidHead("invalid status"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Where each header's name and value sit in the head, so that the values can be
        // slices of one shared buffer instead of copies.
        let whole = &buf[..len];
        // Built in place: collecting into an ArrayVec moves its 4 KiB, a Vec allocates.
        let mut spans = arrayvec::ArrayVec::<(usize, usize, usize, usize), MAX_HEADERS>::new();
        for h in parsed.headers.iter() {
            let (ns, nl) = span(whole, h.name.as_bytes());
            let (vs, vl) = span(whole, h.value);
            spans.push((ns, nl, vs, vl));
        }
        let head = buf.split_to(len).freeze();
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        // Which lines the client may see. Hop-by-hop headers end here (the handler would
        // remove them again, at a hash lookup each): only a Connection header naming
        // other headers stays, so that the handler removes those too. A 101 keeps them
        // all for the tunnel's answer.
        let mut framing = HeadFraming::new(version);
        let mut keep = [false; MAX_HEADERS];
        let mut date = false;
        let mut names_others = false;
        for (i, &(ns, nl, vs, vl)) in spans.iter().enumerate() {
            let name = &head[ns..ns + nl];
            let line = framing.see(name, &head[vs..vs + vl])?;
            keep[i] = switching || line != Line::HopByHop;
            names_others |= line == Line::NamesOthers;
            date |= name.eq_ignore_ascii_case(b"date");
        }
        let raw = if switching || names_others {
            None
        } else {
            RawHeaders::new(&head, &spans, &keep, date, framing.length)
        };
        let headers = match raw {
            Some(raw) => Headers::Raw(raw),
            None => {
                let mut map = HeaderMap::with_capacity(spans.len());
                for (&(ns, nl, vs, vl), _) in spans.iter().zip(keep).filter(|(_, k)| *k) {
                    let name = HeaderName::from_bytes(&head[ns..ns + nl])
                        .map_err(|_| ProtoError::InvalidHead("invalid header name"))?;
                    let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
                        .map_err(|_| ProtoError::InvalidHead("invalid header value"))?;
                    map.append(name, value);
                }
                Headers::Map(map)
            }
        };
        let state = if switching {
            State::Upgrade
        } else if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            State::Done
        } else if framing.chunked {
            State::Chunked(Chunk::Size)
        } else if framing.other_coding {
            State::Eof
        } else if let Some(n) = framing.length {
            State::Length(n)
        } else {
            State::Eof
        };
        // A body that runs until the close, and a 101, end the connection's HTTP life.
        let keep_alive =
            framing.connection.keep_alive(version) && state != State::Eof && !switching;
        return Ok(Some(Head {
            status,
            version,
            headers,
            framing: state,
            keep_alive,
        }));
    }
}

/// How many runs of consecutive kept lines a response head may have for its lines to be
/// passed on as the backend wrote them; more (hop-by-hop lines scattered among the
/// others) and it is parsed into a header map instead.
const RAW_RUNS: usize = 4;

/// A response's header lines as the backend wrote them, hop-by-hop lines left out.
/// palisade's HTTP/1.1 server codec copies them into its answer as they are (a few slices
/// of one buffer): no header map is built, hashed, walked and dropped for each response.
/// Used when the response is not a 101, every line ends in CRLF and no Connection header
/// names other headers; otherwise the response carries a header map as before. An HTTP/2
/// client's answer turns them into a map first ([`RawHeaders::into_map`]).
#[derive(Debug)]
pub struct RawHeaders {
    /// The whole response head.
    head: Bytes,
    /// Byte ranges of `head` to copy, each whole lines ending in CRLF.
    runs: ArrayVec<(u32, u32), RAW_RUNS>,
    date: bool,
    length: Option<u64>,
}

impl RawHeaders {
    /// The kept lines of `head` (`keep[i]` for the header at `spans[i]`), or `None` when
    /// they cannot be passed on as they are.
    fn new(
        head: &Bytes,
        spans: &[(usize, usize, usize, usize)],
        keep: &[bool],
        date: bool,
        length: Option<u64>,
    ) -> Option<Self> {
        if !spans.is_empty() && !head.ends_with(b"\r\n\r\n") {
            return None;
        }
        let mut runs = ArrayVec::new();
        let mut open: Option<u32> = None;
        for (i, &(ns, ..)) in spans.iter().enumerate() {
            // Every line, the status line included, must end in CRLF (httparse takes a
            // bare LF too).
            if ns < 2 || &head[ns - 2..ns] != b"\r\n" {
                return None;
            }
            let start = u32::try_from(ns).ok()?;
            match (keep[i], open) {
                (true, None) => open = Some(start),
                (false, Some(from)) => {
                    runs.try_push((from, start)).ok()?;
                    open = None;
                }
                _ => {}
            }
        }
        if let Some(from) = open {
            let end = u32::try_from(head.len() - 2).ok()?;
            runs.try_push((from, end)).ok()?;
        }
        Some(RawHeaders {
            head: head.clone(),
            runs,
            date,
            length,
        })
    }

    /// Appends the lines, each ending in CRLF.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for &(from, to) in &self.runs {
            out.extend_from_slice(&self.head[from as usize..to as usize]);
        }
    }

    /// How many bytes [`RawHeaders::write_to`] appends.
    pub fn byte_len(&self) -> usize {
        self.runs.iter().map(|&(f, t)| (t - f) as usize).sum()
    }

    /// Whether there is a Date line.
    pub fn has_date(&self) -> bool {
        self.date
    }

    /// The Content-Length the backend declared.
    pub fn content_length(&self) -> Option<u64> {
        self.length
    }

    /// Appends the lines to `map` as headers (names lower-cased, values sharing the head's
    /// bytes).
    pub fn into_map(self, map: &mut HeaderMap) {
        for &(from, to) in &self.runs {
            let mut at = from as usize;
            let to = to as usize;
            while at < to {
                let end = memchr::memmem::find(&self.head[at..to], b"\r\n").map_or(to, |i| at + i);
                let line = &self.head[at..end];
                if let Some(colon) = memchr::memchr(b':', line) {
                    let value = trim(&line[colon + 1..]);
                    let (vs, vl) = span(&self.head, value);
                    let name = HeaderName::from_bytes(&line[..colon]);
                    let value = HeaderValue::from_maybe_shared(self.head.slice(vs..vs + vl));
                    // httparse checked both already.
                    if let (Ok(name), Ok(value)) = (name, value) {
                        map.append(name, value);
                    }
                }
                at = end + 2;
            }
        }
    }
}

/// A final response head's headers: as written (the usual case), or a map.
enum Headers {
    Raw(RawHeaders),
    Map(HeaderMap),
}

/// What a header line of a response head is to the client side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Passed on.
    Keep,
    /// Hop-by-hop: not passed on.
    HopByHop,
    /// A Connection header naming other headers: kept, for the handler to remove those.
    NamesOthers,
}

/// What a response head's headers say about its framing and its connection.
struct HeadFraming {
    version: Version,
    length: Option<u64>,
    chunked: bool,
    /// Transfer-Encoding ends in a coding other than chunked: the body runs until close.
    other_coding: bool,
    connection: ConnectionTokens,
}

impl HeadFraming {
    fn new(version: Version) -> Self {
        HeadFraming {
            version,
            length: None,
            chunked: false,
            other_coding: false,
            connection: ConnectionTokens::default(),
        }
    }

    /// Takes in one header line (`name` in any case).
    fn see(&mut self, name: &[u8], value: &[u8]) -> Result<Line, ProtoError> {
        let version = self.version;
        if name.eq_ignore_ascii_case(b"content-length") {
            if self.chunked || self.other_coding {
                return Err(ProtoError::InvalidHead(
                    "both content-length and transfer-encoding",
                ));
            }
            self.length =
                Some(content_length(value, self.length).map_err(ProtoError::InvalidHead)?);
            Ok(Line::Keep)
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if self.length.is_some() {
                return Err(ProtoError::InvalidHead(
                    "both content-length and transfer-encoding",
                ));
            }
            if version == Version::HTTP_10 {
                return Err(ProtoError::InvalidHead("transfer-encoding in HTTP/1.0"));
            }
            // Only the last coding decides; chunked anywhere but last is an error.
            for item in items(value) {
                if self.chunked {
                    return Err(ProtoError::InvalidHead("chunked is not the last coding"));
                }
                if item.eq_ignore_ascii_case(b"chunked") {
                    self.chunked = true;
                    self.other_coding = false;
                } else {
                    self.other_coding = true;
                }
            }
            Ok(Line::HopByHop)
        } else if name.eq_ignore_ascii_case(b"connection") {
            // Kept only when it names other headers, for the handler to remove them too.
            Ok(if self.connection.see(value) {
                Line::NamesOthers
            } else {
                Line::HopByHop
            })
        } else if headers::is_hop_by_hop_name(name) {
            Ok(Line::HopByHop)
        } else {
            Ok(Line::Keep)
        }
    }
}

/// Where a response body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes still to come.
    Length(u64),
    /// Chunked.
    Chunked(Chunk),
    /// Until the backend closes.
    Eof,
    /// Read to its end (or there was none).
    Done,
    /// A 101: the connection belongs to the tunnel.
    Upgrade,
}

/// The connection a response body reads from, and the pool it goes back to.
#[derive(Debug)]
struct Lent {
    conn: Conn,
    backend: Arc<Backend>,
}

/// A backend's response body read straight off its connection. Read to its end on a
/// connection that may be kept, it gives the connection back to the pool; dropped earlier,
/// it closes the connection (the rest of the response is still on the wire).
#[derive(Debug)]
pub struct ResponseBody {
    /// The response's header lines as the backend wrote them (else they are in the
    /// response's header map).
    raw: Option<RawHeaders>,
    state: State,
    lent: Option<Lent>,
    /// Bytes read and not yet yielded.
    buf: BytesMut,
    reuse: bool,
}

impl ResponseBody {
    /// The body is over: the connection goes back to the pool when it can be kept.
    fn finish(&mut self) {
        self.state = State::Done;
        let lent = self.lent.take();
        if let Some(lent) = lent {
            if self.reuse && self.buf.is_empty() {
                lent.backend.pool.put(lent.conn);
            }
        }
    }

    /// The response's header lines as the backend wrote them, when they were kept so.
    pub fn raw_headers(&self) -> Option<&RawHeaders> {
        self.raw.as_ref()
    }

    /// Takes the header lines kept as written (to turn them into a map).
    pub fn take_raw_headers(&mut self) -> Option<RawHeaders> {
        self.raw.take()
    }

    /// After a 101: the backend's socket and any bytes it already sent past the head.
    pub fn take_upgrade(&mut self) -> Option<(TcpStream, Bytes)> {
        if self.state != State::Upgrade {
            return None;
        }
        self.state = State::Done;
        let lent = self.lent.take()?;
        Some((lent.conn.io, std::mem::take(&mut self.buf).freeze()))
    }

    /// Reads more of the body into `buf`, asking for about `want` bytes.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<Result<usize, ProtoError>> {
        let Some(lent) = self.lent.as_mut() else {
            return Poll::Ready(Err(ProtoError::Truncated));
        };
        // One byte more than needed: a read that comes back short tells tokio the socket
        // is drained, so the pool's check of an idle connection costs no system call.
        self.buf.reserve(want.saturating_add(1));
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut lent.conn.io),
            cx,
            &mut self.buf
        ))?;
        Poll::Ready(Ok(n))
    }

    fn fail(&mut self, e: ProtoError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        self.lent = None;
        Poll::Ready(Some(Err(e.into())))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.state {
                State::Done | State::Upgrade => return Poll::Ready(None),
                State::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                State::Length(left) => {
                    if !this.buf.is_empty() {
                        let n = this
                            .buf
                            .len()
                            .min(usize::try_from(left).unwrap_or(usize::MAX));
                        let data = this.buf.split_to(n).freeze();
                        let left = left - n as u64;
                        this.state = State::Length(left);
                        if left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let want = usize::try_from(left).unwrap_or(MAX_READ).min(MAX_READ);
                    match ready!(this.poll_fill(cx, want)) {
                        Ok(0) => return this.fail(ProtoError::Truncated),
                        Ok(_) => {}
                        Err(e) => return this.fail(e),
                    }
                }
                State::Eof => {
                    if !this.buf.is_empty() {
                        let data = this.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(this.poll_fill(cx, MAX_READ / 4)) {
                        Ok(0) => {
                            this.state = State::Done;
                            this.lent = None;
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(e) => return this.fail(e),
                    }
                }
                State::Chunked(mut chunk) => {
                    let step = decode_chunk(&mut chunk, &mut this.buf);
                    this.state = State::Chunked(chunk);
                    match step {
                        Err(InvalidChunk) => return this.fail(ProtoError::InvalidChunk),
                        Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Ok(Decoded::End(trailers)) => {
                            this.finish();
                            return Poll::Ready(
                                (!trailers.is_empty()).then(|| Ok(Frame::trailers(trailers))),
                            );
                        }
                        Ok(Decoded::Again) => {}
                        Ok(Decoded::NeedMore(want)) => match ready!(this.poll_fill(cx, want)) {
                            Ok(0) => return this.fail(ProtoError::Truncated),
                            Ok(_) => {}
                            Err(e) => return this.fail(e),
                        },
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Upgrade | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done | State::Upgrade => SizeHint::with_exact(0),
            State::Chunked(_) | State::Eof => SizeHint::default(),
        }
    }
}

/// For the fuzz targets (`fuzz/`, built with the `fuzzing` feature): parses the input as
/// response heads (to a HEAD request when its first byte is odd) the way an exchange
/// reads them, once with all of it in the buffer and once arriving in pieces
/// ([`crate::http1::fuzz_split`]), and panics when the two disagree, or when header lines
/// passed on as written are not exactly the head's end-to-end lines.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_response_heads(input: &[u8]) {
    // Smaller than the inputs can be, so that the limit is exercised too.
    const LIMIT: usize = 1024;
    let head_request = input.first().is_some_and(|b| b & 1 == 1);
    let (mut sizes, raw) = crate::http1::fuzz_split(input);
    let step = |buf: &mut BytesMut| match parse_head(buf, head_request, LIMIT) {
        Ok(Some(head)) => Some(describe(head)),
        Ok(None) => None,
        Err(e) => Some(format!("error: {e:?}")),
    };
    let whole = crate::http1::fuzz_read(raw, &mut std::iter::once(raw.len()), step);
    let pieces = crate::http1::fuzz_read(raw, &mut sizes, step);
    assert_eq!(whole, pieces, "whole vs in pieces");
}

/// A parsed response head, checked and described for comparison (its headers as the map
/// an HTTP/2 client's answer would get).
#[cfg(any(test, feature = "fuzzing"))]
fn describe(head: Head) -> String {
    let mut map = HeaderMap::new();
    match head.headers {
        Headers::Map(m) => map = m,
        Headers::Raw(raw) => {
            check_raw(&raw);
            raw.into_map(&mut map);
        }
    }
    format!(
        "{} {:?} {:?} keep_alive={} {map:?}",
        head.status, head.version, head.framing, head.keep_alive
    )
}

/// The lines a [`RawHeaders`] writes are whole CRLF lines, and exactly the head's header
/// lines that are not hop-by-hop, as written; its map has the same fields.
#[cfg(any(test, feature = "fuzzing"))]
fn check_raw(raw: &RawHeaders) {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    assert!(
        matches!(response.parse(&raw.head), Ok(httparse::Status::Complete(n)) if n == raw.head.len()),
        "the kept head parses whole"
    );
    let expected: Vec<(Vec<u8>, Vec<u8>)> = response
        .headers
        .iter()
        .filter(|h| !headers::is_hop_by_hop_name(h.name.as_bytes()))
        .map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec()))
        .collect();
    let mut out = Vec::new();
    raw.write_to(&mut out);
    assert_eq!(out.len(), raw.byte_len());
    out.extend_from_slice(b"\r\n");
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let written: Vec<(Vec<u8>, Vec<u8>)> = match httparse::parse_headers(&out, &mut slots) {
        Ok(httparse::Status::Complete((n, fields))) if n == out.len() => fields
            .iter()
            .map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec()))
            .collect(),
        other => panic!("written lines do not parse: {other:?}"),
    };
    assert_eq!(written, expected, "lines passed on as written");
    assert!(
        !out[..out.len() - 2]
            .windows(2)
            .any(|w| w[1] == b'\n' && w[0] != b'\r'),
        "a bare LF passed on"
    );
    assert_eq!(
        raw.has_date(),
        expected
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(b"date"))
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &[u8], head_request: bool) -> Result<Option<Head>, ProtoError> {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, head_request, MAX_HEAD)
    }

    #[test]
    fn a_head_past_the_limit_is_refused_however_it_arrives() {
        let mut raw = b"HTTP/1.1 200 OK\r\nx-long: ".to_vec();
        raw.resize(MAX_HEAD + 100, b'a');
        raw.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
        // All of it in one read (it used to be accepted when it arrived so) and only the
        // first MAX_HEAD bytes of it.
        for arrived in [raw.len(), MAX_HEAD] {
            let mut buf = BytesMut::from(&raw[..arrived]);
            assert!(
                matches!(
                    parse_head(&mut buf, false, MAX_HEAD),
                    Err(ProtoError::HeadTooLarge)
                ),
                "{arrived} bytes"
            );
        }
        let mut buf = BytesMut::from(&raw[..MAX_HEAD - 1]);
        assert!(matches!(parse_head(&mut buf, false, MAX_HEAD), Ok(None)));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let cases: [(&[u8], bool, State, bool); 9] = [
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                false,
                State::Length(5),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
                false,
                State::Length(5),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false,
                State::Chunked(Chunk::Size),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                false,
                State::Eof,
                false,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", false, State::Eof, false),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false, State::Done, true),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                true,
                State::Done,
                true,
            ),
            (
                b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n",
                false,
                State::Length(5),
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 5\r\n\r\n",
                false,
                State::Length(5),
                true,
            ),
        ];
        for (raw, head_request, state, keep) in cases {
            let parsed = head(raw, head_request)
                .unwrap_or_else(|e| panic!("{e} for {}", String::from_utf8_lossy(raw)))
                .unwrap_or_else(|| panic!("incomplete: {}", String::from_utf8_lossy(raw)));
            assert_eq!(parsed.framing, state, "{}", String::from_utf8_lossy(raw));
            assert_eq!(parsed.keep_alive, keep, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn ambiguous_framing_is_an_error_not_a_guess() {
        let cases: [&[u8]; 6] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
        ];
        for raw in cases {
            assert!(
                head(raw, false).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn interim_responses_are_skipped_and_partial_heads_wait() {
        let parsed = head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
            false,
        )
        .ok()
        .flatten()
        .map(|h| h.status);
        assert_eq!(parsed, Some(StatusCode::CREATED));
        assert!(matches!(
            head(b"HTTP/1.1 200 OK\r\ncontent-le", false),
            Ok(None)
        ));
    }

    fn lines_of(raw: &[u8]) -> Option<String> {
        match head(raw, false).ok()??.headers {
            Headers::Raw(raw) => {
                let mut out = Vec::new();
                raw.write_to(&mut out);
                Some(String::from_utf8_lossy(&out).into_owned())
            }
            Headers::Map(_) => None,
        }
    }

    #[test]
    fn header_lines_pass_as_written_when_they_can() {
        let written = lines_of(
            b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive\r\nA:  1 \r\n\
              Transfer-Encoding: chunked\r\nDate: d\r\n\r\n",
        );
        assert_eq!(
            written.as_deref(),
            Some("Server: x\r\nA:  1 \r\nDate: d\r\n")
        );
        assert_eq!(
            lines_of(b"HTTP/1.1 204 No Content\r\n\r\n").as_deref(),
            Some("")
        );
        // Bare LF line ends, a Connection header naming other headers, more runs than
        // RAW_RUNS, and a 101: a header map instead.
        let mapped: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\nServer: x\n\n",
            b"HTTP/1.1 200 OK\r\nConnection: x-a\r\nX-A: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\na: 1\r\nte: x\r\nb: 1\r\nte: x\r\nc: 1\r\nte: x\r\n\
              d: 1\r\nte: x\r\ne: 1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
        ];
        for raw in mapped {
            let parsed = head(raw, false).ok().flatten();
            assert!(
                matches!(parsed.map(|h| h.headers), Some(Headers::Map(_))),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let Some(Headers::Map(map)) = head(mapped[2], false).ok().flatten().map(|h| h.headers)
        else {
            panic!("mapped");
        };
        let names: Vec<&str> = map.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn lines_kept_as_written_become_a_map_for_http2() {
        let Some(Headers::Raw(raw)) = head(
            b"HTTP/1.1 200 OK\r\nServer: x\r\nKeep-Alive: 5\r\nX-Pad:\t 1 2 \r\n\
              Set-Cookie: a\r\nEmpty:\r\nSet-Cookie: b\r\n\r\n",
            false,
        )
        .ok()
        .flatten()
        .map(|h| h.headers) else {
            panic!("raw");
        };
        let mut map = HeaderMap::new();
        raw.into_map(&mut map);
        assert_eq!(map.len(), 5, "{map:?}");
        assert_eq!(map["server"], "x");
        assert_eq!(map["x-pad"], "1 2");
        assert_eq!(map["empty"], "");
        let cookies: Vec<_> = map.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a", "b"]);
    }
}
