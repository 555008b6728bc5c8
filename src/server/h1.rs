//! palisade's own HTTP/1.1 server codec: client connections.
//!
//! hyper's server kept a 16 KiB read and an 8 KiB write buffer in every idle keep-alive
//! connection (no setting shrinks them), and built each request through its dispatcher
//! and a channel-fed body. Here the connection's task parses each head with `httparse`
//! (header values are slices of the read buffer, not copies), calls the handler, and
//! writes the answer's head with the first body bytes in one write. An idle plain
//! connection holds no read buffer at all: the next one is allocated when the socket
//! becomes readable.
//!
//! The connection ([`Wire`]: socket, read buffer, where the request body stands) sits
//! behind a mutex shared with the request body, so the body reads the socket directly
//! wherever it is polled (the handler's task, or hyper's client task for TLS backends)
//! while this task writes the answer. The mutex is never held across an await: each poll
//! takes it and lets it go.
//!
//! Framing follows RFC 9112 and refuses what a backend could read differently (request
//! smuggling): Transfer-Encoding in HTTP/1.0, differing or malformed Content-Lengths and
//! malformed chunking are a 400 from here; a head with both Content-Length and
//! Transfer-Encoding, or with a Transfer-Encoding other than exactly `chunked`, reaches
//! the handler (which refuses it with its own 400 and an access-log line) with no body,
//! and the connection closes after the answer. A head larger than
//! `server.limits.max_header_bytes` gets 431.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING,
};
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::tunnel::{self, OnUpgrade};
use super::{Activity, ClientIo, TrackedIo};
use crate::http1::{
    content_length, decode_chunk, header_line, parse_decimal, span, BodyWriter, Chunk,
    ConnectionTokens, Decoded, Framing, InvalidChunk, WriteError, MAX_HEADERS, MAX_READ,
};
use crate::proxy::body::{BoxError, ClientBody, ProxyBody};
use crate::proxy::headers::Seen;
use crate::proxy::{self, ConnInfo, ProxyError};
use crate::snapshot::ProxyState;

/// The client connection's socket as the codec sees it.
pub type Io = TrackedIo<ClientIo>;

/// The read buffer a new request head starts in (grown up to the head limit).
const HEAD_BUF: usize = 1024;

/// The HTTP/2 connection preface (prior knowledge, RFC 9113 3.4).
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// After an answer that leaves part of a request body unread, the connection keeps
/// reading (and discarding) what the client still sends before it closes, so that the
/// client receives the answer instead of a reset (nginx's lingering close): for at most
/// this long in all (nginx's `lingering_time`) ...
const LINGER_TIME: Duration = Duration::from_secs(30);

/// ... and until the client has sent nothing for this long (nginx's `lingering_timeout`).
/// A client that uploads on after an early answer (curl does, unless the answer is an
/// error) must not be reset: it would fail its send and never read the answer.
const LINGER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long closing waits for the last answer's bytes to be flushed.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// A client connection: its socket (gone once handed to a tunnel), its read buffer, and
/// where the current request's body stands.
pub struct Wire {
    io: Option<Io>,
    buf: BytesMut,
    body: BodyState,
}

/// The connection, shared by its task and the current request's body.
pub type SharedWire = Arc<Mutex<Wire>>;

impl Wire {
    /// A wire with no socket, left behind while the real one moves.
    fn detached() -> Wire {
        Wire {
            io: None,
            buf: BytesMut::new(),
            body: BodyState::Done,
        }
    }
}

/// The connection as its task holds it: its own while no request body is being read,
/// shared behind a lock with the body's reader while one is (the reader may run on
/// another task: an HTTP/2 backend connection's). A request without a body, nearly every
/// one, takes no lock: the lock cost 14 locked instructions per request (callgrind), each
/// about 6 ns here. Boxed, as the shared one is: an idle connection's task stays as small.
enum Slot {
    Own(Box<Wire>),
    Shared(SharedWire),
    /// Nothing: only for the instant the wire moves between the two, or after a body
    /// reader panicked with the lock held (the connection ends).
    Gone,
}

impl Slot {
    /// Runs `f` on the wire; None: there is none (a body reader panicked).
    fn with<R>(&mut self, f: impl FnOnce(&mut Wire) -> R) -> Option<R> {
        match self {
            Slot::Own(w) => Some(f(w)),
            Slot::Shared(s) => s.lock().ok().map(|mut w| f(&mut w)),
            Slot::Gone => None,
        }
    }

    /// The wire, shared from now on (for a request body's reader).
    fn share(&mut self) -> SharedWire {
        let shared = match std::mem::replace(self, Slot::Gone) {
            Slot::Own(w) => Arc::new(Mutex::new(*w)),
            Slot::Shared(s) => s,
            Slot::Gone => Arc::new(Mutex::new(Wire::detached())),
        };
        *self = Slot::Shared(shared.clone());
        shared
    }

    /// Takes the wire back once no body reader holds it any more.
    fn reclaim(&mut self) {
        if !matches!(self, Slot::Shared(s) if Arc::strong_count(s) == 1) {
            return;
        }
        if let Slot::Shared(s) = std::mem::replace(self, Slot::Gone) {
            *self = match Arc::try_unwrap(s) {
                Ok(m) => match m.into_inner() {
                    Ok(w) => Slot::Own(Box::new(w)),
                    // Poisoned (a body reader panicked): its socket is dropped, and
                    // the connection ends.
                    Err(_) => Slot::Gone,
                },
                Err(s) => Slot::Shared(s),
            };
        }
    }
}

/// Where a request body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    /// Read to its end, or there was none.
    Done,
    /// This many bytes still to come.
    Length(u64),
    /// Chunked.
    Chunked(Chunk),
    /// Reading it failed: the connection cannot carry another request.
    Failed,
}

/// How the connection ended its first read: HTTP/1 (served here) or an HTTP/2 preface.
pub enum Outcome {
    /// The connection is over.
    Closed,
    /// The client speaks HTTP/2 with prior knowledge: the socket and what was read.
    H2(Io, Bytes),
}

/// What the codec needs from its connection.
pub(crate) struct Connection {
    /// The proxy.
    pub(crate) state: Arc<ProxyState>,
    /// The connection's activity, for the watchdog.
    pub(crate) activity: Arc<Activity>,
    /// The client's address and scheme.
    pub(crate) info: ConnInfo,
    /// The largest request head accepted.
    pub(crate) max_head: usize,
}

/// A parsed request head.
struct Head {
    request: Request<()>,
    body: BodyState,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
    /// Which headers the handler would otherwise look up are there.
    seen: Seen,
}

/// Serves HTTP/1.x requests on `io` until the connection closes (or an HTTP/2 preface
/// arrives first).
pub(crate) async fn serve(io: Io, ctx: Connection) -> Outcome {
    let mut wire = Slot::Own(Box::new(Wire {
        io: Some(io),
        buf: BytesMut::new(),
        body: BodyState::Done,
    }));
    let mut first = true;
    loop {
        // 1. The next head.
        let head = match poll_fn(|cx| poll_head(&mut wire, cx, ctx.max_head, first)).await {
            Ok(Some(Parsed::Head(head))) => head,
            Ok(Some(Parsed::H2)) => return into_h2(wire),
            Ok(None) => return Outcome::Closed,
            Err(Failed::Head(err)) => {
                tracing::debug!(peer = %ctx.info.peer, error = %err, "refused a request head");
                // Boxed, like every way out below: their state would otherwise size every
                // connection's task.
                Box::pin(refuse(&mut wire, err, &ctx)).await;
                return Outcome::Closed;
            }
            Err(Failed::Io(e)) => {
                tracing::debug!(peer = %ctx.info.peer, error = %e, "connection failed");
                return Outcome::Closed;
            }
        };
        first = false;
        // Boxed, and allocated first and written in place: this request's state (its
        // handler's above all, 4 KiB) exists only while a request is in flight, and unboxed
        // it would sit in every idle connection's task. (`Box::pin(future)` built the
        // future on the stack and copied all of it into the box: ~430 instructions.)
        let request = Box::into_pin(Box::write(
            Box::new_uninit(),
            exchange(&mut wire, &ctx, head),
        ));
        if !request.await {
            return Outcome::Closed;
        }
    }
}

/// One request on the connection, from its parsed head to its answer written. `false`:
/// the connection is over.
async fn exchange(wire: &mut Slot, ctx: &Connection, head: Box<Head>) -> bool {
    let in_flight = ctx.activity.request_started();

    // 2. The handler's answer.
    let Head {
        request,
        body,
        mut keep_alive,
        expect_continue,
        upgrade,
        seen,
    } = *head;
    let (parts, ()) = request.into_parts();
    let version = parts.version;
    let head_request = parts.method == Method::HEAD;
    if parts.method == Method::CONNECT {
        keep_alive = false;
    }
    let mut continue_rx = None;
    let client_body = if body == BodyState::Done {
        ClientBody::Empty
    } else {
        let expect = expect_continue.then(|| {
            let (tx, rx) = oneshot::channel();
            continue_rx = Some(rx);
            tx
        });
        ClientBody::Own(RequestBody {
            wire: wire.share(),
            expect,
        })
    };
    let mut req = Request::from_parts(parts, client_body);
    let mut on_upgrade = None;
    if upgrade {
        let slot = OnUpgrade::default();
        req.extensions_mut().insert(slot.clone());
        on_upgrade = Some(slot);
    }
    let info = ConnInfo {
        seen: Some(seen),
        ..ctx.info
    };
    // Not boxed on its own: this whole exchange is (see `serve`).
    let mut answer = std::pin::pin!(proxy::handle(&ctx.state, req, &info));
    // While the answer is coming, the client is watched: one that closes its
    // connection gets nothing, and its request is dropped (the backend's connection
    // closed, the request logged as 499), as nginx does.
    // `100 Continue` is written through the shared wire (there is a body to ask for),
    // while `answered` holds the connection's own handle.
    let continue_wire = continue_rx.as_ref().map(|_| wire.share());
    let mut answered = poll_fn(|cx| {
        if let Poll::Ready(resp) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        match poll_client_gone(wire, cx, ctx.max_head) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    });
    let resp = match (continue_rx, continue_wire) {
        (Some(mut rx), Some(shared)) => {
            let mut asked = false;
            loop {
                tokio::select! {
                    biased;
                    resp = &mut answered => break resp,
                    Ok(()) = &mut rx, if !asked => {
                        asked = true;
                        let mut sink = Slot::Shared(shared.clone());
                        if write_all(&mut sink, b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                            return false;
                        }
                    }
                }
            }
        }
        _ => (&mut answered).await,
    };
    drop(answered);
    let Some(resp) = resp else {
        tracing::debug!(peer = %ctx.info.peer, "the client closed its connection before its answer");
        return false;
    };

    // 3. The answer, on the wire.
    let (parts, body) = resp.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(backend) = on_upgrade.as_ref().and_then(OnUpgrade::take) {
            let mut out = Vec::with_capacity(256);
            status_line(&mut out, parts.status);
            for (name, value) in &parts.headers {
                header_line(&mut out, name, value.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            if write_all(wire, &out).await.is_err() {
                return false;
            }
            let Some((io, early)) = take_io(wire) else {
                return false;
            };
            // The connection is the tunnel's now (see `tunnel`): it stays counted
            // and drained, and `idle` applies to it.
            ctx.activity.tunnel_started();
            drop(in_flight);
            if let Err(e) = Box::pin(tunnel::run(io, early, backend)).await {
                tracing::debug!(peer = %ctx.info.peer, error = %e, "tunnel closed");
            }
            return false;
        }
    }
    if ctx.state.is_draining() || ctx.activity.close_requested() {
        keep_alive = false;
    }
    // A request body not read to its end (the answer came first, or reading it failed)
    // ends the connection, unless the rest of it is already in the buffer; the answer
    // says so.
    if wire.with(skip_buffered_body) != Some(true) {
        keep_alive = false;
    }
    let (out, framing, keep_alive) = encode_head(&parts, &body, version, head_request, keep_alive);
    drop(parts);
    let mut writer = BodyWriter::new(body, framing, false).with_head(out);
    if let Err(e) = send(wire, &mut writer).await {
        tracing::debug!(peer = %ctx.info.peer, error = %e, "writing the answer failed");
        Box::pin(close(wire, false, &ctx.state)).await;
        return false;
    }
    drop(writer);

    // 4. Another request, or the end.
    let body_read = wire.with(|w| {
        let read = w.body == BodyState::Done;
        if read && keep_alive && w.buf.is_empty() {
            // Nothing pipelined: an idle connection keeps no buffer.
            w.buf = BytesMut::new();
        }
        read
    }) == Some(true);
    if !keep_alive || !body_read {
        Box::pin(close(wire, !body_read, &ctx.state)).await;
        return false;
    }
    // The body's reader is done with the wire (dropped with the request): the next
    // request starts without the lock.
    wire.reclaim();
    true
}

enum Parsed {
    Head(Box<Head>),
    H2,
}

enum Failed {
    /// Refused: 400 or 431.
    Head(ProxyError),
    Io(io::Error),
}

impl From<io::Error> for Failed {
    fn from(e: io::Error) -> Self {
        Failed::Io(e)
    }
}

/// Reads until a whole head is in the buffer. `Ok(None)`: the client closed between
/// requests.
fn poll_head(
    wire: &mut Slot,
    cx: &mut Context<'_>,
    max_head: usize,
    first: bool,
) -> Poll<Result<Option<Parsed>, Failed>> {
    wire.with(|w| poll_head_on(w, cx, max_head, first))
        .unwrap_or_else(|| Poll::Ready(Err(Failed::Io(poisoned()))))
}

fn poll_head_on(
    w: &mut Wire,
    cx: &mut Context<'_>,
    max_head: usize,
    first: bool,
) -> Poll<Result<Option<Parsed>, Failed>> {
    loop {
        if !w.buf.is_empty() {
            if first && w.buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&w.buf) {
                // Could still be an HTTP/2 preface: wait for more.
            } else if first && w.buf.starts_with(H2_PREFACE) {
                return Poll::Ready(Ok(Some(Parsed::H2)));
            } else {
                match parse_head(&mut w.buf, max_head) {
                    Ok(Some(head)) => {
                        // Where the request's body stands, set under this same lock.
                        w.body = head.body;
                        return Poll::Ready(Ok(Some(Parsed::Head(Box::new(head)))));
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(Failed::Head(e))),
                }
            }
        }
        let Some(io) = w.io.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        if w.buf.capacity() == 0 {
            // An idle connection holds no buffer until the socket has something to read.
            ready!(io.inner.poll_read_ready(cx))?;
        }
        let spare = w.buf.capacity() - w.buf.len();
        if spare < 512 {
            let want = if w.buf.capacity() == 0 {
                HEAD_BUF
            } else {
                w.buf.capacity().min(max_head)
            };
            w.buf.reserve(want);
        }
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut w.buf))?;
        if n == 0 {
            // Closed: between requests that is the normal end; inside a head, too (there
            // is no one left to answer).
            return Poll::Ready(Ok(None));
        }
    }
}

fn poisoned() -> io::Error {
    io::Error::other("connection state poisoned")
}

/// Parses a request head at the start of `buf`, consuming it. `Ok(None)`: not complete
/// (and shorter than `max_head`).
fn parse_head(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, ProxyError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    // Only the first `max_head` bytes are looked at, however many have arrived: which
    // error a long head gets (too large, or malformed past the limit) must not depend on
    // how its bytes were split into reads (found by fuzzing).
    let window = &buf[..buf.len().min(max_head)];
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        window,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if window.len() == max_head => {
            return Err(ProxyError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ProxyError::HeadTooLarge),
        Err(_) => return Err(ProxyError::BadRequest("malformed head")),
    };
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Err(ProxyError::BadRequest("malformed request line"));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| ProxyError::BadRequest("invalid method"))?;
    let whole = &buf[..len];
    let target = span(whole, target.as_bytes());
    // Where each header's name and value sit, so the values can be slices of one shared
    // buffer instead of copies.
    // An ArrayVec: a zeroed array of 128 slots cost more than parsing the head, a Vec an
    // allocation.
    let mut spans = arrayvec::ArrayVec::<(usize, usize, usize, usize), MAX_HEADERS>::new();
    for h in parsed.headers.iter() {
        let (ns, nl) = span(whole, h.name.as_bytes());
        let (vs, vl) = span(whole, h.value);
        spans.push((ns, nl, vs, vl));
    }
    let count = spans.len();
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1))
        .map_err(|_| ProxyError::BadRequest("invalid request target"))?;

    let mut headers = HeaderMap::with_capacity(count);
    let mut length: Option<u64> = None;
    let mut encodings = 0usize;
    let mut chunked = false;
    let mut connection = ConnectionTokens::default();
    let mut expect_continue = false;
    let mut seen = Seen::default();
    for &(ns, nl, vs, vl) in &spans {
        let name = HeaderName::from_bytes(&head[ns..ns + nl])
            .map_err(|_| ProxyError::BadRequest("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
            .map_err(|_| ProxyError::BadRequest("invalid header value"))?;
        seen.see(&name);
        if name == CONTENT_LENGTH {
            // A list of identical values is one value (RFC 9110 8.6): forwarded once.
            let repeated = length.is_some();
            let n = content_length(value.as_bytes(), length).map_err(ProxyError::BadRequest)?;
            length = Some(n);
            if repeated {
                continue;
            }
            if memchr::memchr(b',', value.as_bytes()).is_some() {
                headers.append(CONTENT_LENGTH, HeaderValue::from(n));
                continue;
            }
        } else if name == TRANSFER_ENCODING {
            if version == Version::HTTP_10 {
                return Err(ProxyError::BadRequest("transfer-encoding in HTTP/1.0"));
            }
            encodings += 1;
            chunked = value.as_bytes().eq_ignore_ascii_case(b"chunked");
        } else if name == CONNECTION {
            connection.see(value.as_bytes());
        } else if name == EXPECT {
            expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        }
        headers.append(name, value);
    }
    let mut keep_alive = connection.keep_alive(version);
    let body = if encodings > 0 {
        if encodings == 1 && chunked && length.is_none() {
            BodyState::Chunked(Chunk::Size)
        } else {
            // Ambiguous framing: the handler refuses the request (with both headers in
            // view), and since where its body ends is unknown, the connection closes.
            keep_alive = false;
            BodyState::Done
        }
    } else {
        match length {
            Some(0) | None => BodyState::Done,
            Some(n) => BodyState::Length(n),
        }
    };
    // Only a WebSocket upgrade is tunnelled (SPEC 3): `Upgrade: h2c` and the like are
    // dropped with the other hop-by-hop headers and the request goes on as a plain one.
    let upgrade = connection.upgrade
        && version == Version::HTTP_11
        && crate::proxy::headers::is_websocket_upgrade(&headers);
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        body,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
        upgrade,
        seen,
    }))
}

/// The answer's head, how its body is framed, and whether the connection stays open.
fn encode_head(
    parts: &http::response::Parts,
    body: &ProxyBody,
    version: Version,
    head_request: bool,
    mut keep_alive: bool,
) -> (Vec<u8>, Framing, bool) {
    let raw = body.raw_headers();
    let mut out =
        Vec::with_capacity(128 + parts.headers.len() * 48 + raw.map_or(0, |raw| raw.byte_len()));
    let status = parts.status;
    status_line(&mut out, status);
    let mut length = None;
    let mut has_connection = false;
    let mut has_date = false;
    // A backend's lines as it wrote them (hop-by-hop ones already left out by the client
    // codec), then whatever the map holds.
    if let Some(raw) = raw {
        raw.write_to(&mut out);
        length = raw.content_length();
        has_date = raw.has_date();
    }
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH {
            length = parse_decimal(value.as_bytes());
        } else if name == CONNECTION {
            has_connection = true;
            let mut tokens = ConnectionTokens::default();
            tokens.see(value.as_bytes());
            keep_alive &= !tokens.close;
        } else if name == TRANSFER_ENCODING {
            // The codec frames the body itself.
            continue;
        } else if name == DATE {
            has_date = true;
        }
        header_line(&mut out, name, value.as_bytes());
    }
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Framing::None
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
        Framing::Length(n)
    } else if version == Version::HTTP_11 {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    } else {
        keep_alive = false;
        Framing::Close
    };
    if !has_connection {
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    if !has_date {
        date_line(&mut out);
    }
    out.extend_from_slice(b"\r\n");
    (out, framing, keep_alive)
}

/// The status line. It says HTTP/1.1 to HTTP/1.0 clients too, as nginx, HAProxy and
/// Apache do: a server sends the highest version it conforms to within the client's major
/// version (RFC 9110, section 6.2). What an HTTP/1.0 client cannot take (chunked framing,
/// a connection kept without asking) follows the request's version, not this line's.
fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `date: <now>\r\n`, formatted at most once a second per thread.
fn date_line(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                cached.1.copy_from_slice(text.as_bytes());
                cached.0 = secs;
            }
        }
        if cached.0 == secs {
            out.extend_from_slice(b"date: ");
            out.extend_from_slice(&cached.1);
            out.extend_from_slice(b"\r\n");
        }
    });
}

/// Whether the client has closed its connection (or it failed) while its answer is on the
/// way. Watched only once the request body has been read to its end (before that, the
/// body's reader sees the close); bytes that arrive meanwhile (a pipelined request) are
/// kept in the buffer, up to a head's worth, and then the watch stops reading.
fn poll_client_gone(wire: &mut Slot, cx: &mut Context<'_>, max_head: usize) -> Poll<()> {
    wire.with(|w| client_gone(w, cx, max_head))
        .unwrap_or(Poll::Pending)
}

fn client_gone(w: &mut Wire, cx: &mut Context<'_>, max_head: usize) -> Poll<()> {
    loop {
        if w.body != BodyState::Done || w.buf.len() >= max_head {
            return Poll::Pending;
        }
        let Some(io) = w.io.as_mut() else {
            return Poll::Pending;
        };
        // Readiness first: while the client is quiet (nearly always) that is all it takes,
        // without a read through the connection's layers.
        if ready!(io.inner.poll_read_ready(cx)).is_err() {
            return Poll::Ready(());
        }
        if w.buf.capacity() == w.buf.len() {
            w.buf.reserve(HEAD_BUF);
        }
        match ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut w.buf)) {
            Ok(0) | Err(_) => return Poll::Ready(()),
            Ok(_) => {}
        }
    }
}

/// Answers a head the codec refused with palisade's own error (Proxy-Status, a short text
/// body), then closes.
async fn refuse(wire: &mut Slot, err: ProxyError, ctx: &Connection) {
    let resp = err.into_response();
    let elapsed = ctx
        .activity
        .head_started_at()
        .map_or(Duration::ZERO, |at| at.elapsed());
    wire.with(|w| proxy::handler::refused(&ctx.state, &ctx.info, &resp, &w.buf, elapsed));
    let (parts, body) = resp.into_parts();
    let (out, framing, _) = encode_head(&parts, &body, Version::HTTP_11, false, false);
    let _ = send(
        wire,
        &mut BodyWriter::new(body, framing, false).with_head(out),
    )
    .await;
    close(wire, true, &ctx.state).await;
}

/// Writes an answer: its head and the body frames ready now in one write, then the rest.
async fn send(wire: &mut Slot, writer: &mut BodyWriter) -> Result<(), WriteError> {
    poll_fn(|cx| {
        writer.prime(cx);
        Poll::Ready(())
    })
    .await;
    let mut sink = WireWriter(wire);
    poll_fn(|cx| writer.poll_write(cx, &mut sink)).await?;
    sink.flush().await?;
    Ok(())
}

/// Hands the socket and what was read to HTTP/2.
fn into_h2(mut wire: Slot) -> Outcome {
    match take_io(&mut wire) {
        Some((io, read)) => Outcome::H2(io, read),
        None => Outcome::Closed,
    }
}

/// Takes the socket and the bytes read but not consumed off the connection (an upgrade,
/// or HTTP/2): the codec is done with it.
fn take_io(wire: &mut Slot) -> Option<(Io, Bytes)> {
    wire.with(|w| {
        let io = w.io.take()?;
        Some((io, std::mem::take(&mut w.buf).freeze()))
    })?
}

/// Writes all of `bytes` to the client.
async fn write_all(wire: &mut Slot, bytes: &[u8]) -> io::Result<()> {
    WireWriter(wire).write_all(bytes).await
}

/// Ends the connection: FIN after the last answer; with `linger`, the rest of what the
/// client is sending is read and dropped for a while (see [`LINGER_TIME`]), so that
/// closing with unread bytes does not reset the connection before the client has read
/// the answer. A drain cuts the lingering short at the client's next bytes.
async fn close(wire: &mut Slot, linger: bool, state: &ProxyState) {
    let mut sink = WireWriter(wire);
    let _ = tokio::time::timeout(CLOSE_FLUSH, sink.shutdown()).await;
    if !linger {
        return;
    }
    // On the heap: an array here would sit in every connection's task, since the codec's
    // future holds this one's state.
    let mut scratch = vec![0u8; 16 * 1024];
    let end = tokio::time::Instant::now() + LINGER_TIME;
    let mut last_read = tokio::time::Instant::now();
    let mut quiet = std::pin::pin!(tokio::time::sleep_until(
        (last_read + LINGER_TIMEOUT).min(end)
    ));
    poll_fn(|cx| loop {
        let read = wire.with(|w| {
            w.buf.clear();
            let Some(io) = w.io.as_mut() else {
                return Poll::Ready(None);
            };
            let mut rb = tokio::io::ReadBuf::new(&mut scratch);
            match ready!(Pin::new(io).poll_read(cx, &mut rb)) {
                Ok(()) => Poll::Ready(Some(rb.filled().len())),
                Err(_) => Poll::Ready(None),
            }
        });
        match read {
            Some(Poll::Ready(Some(n))) if n > 0 && !state.is_draining() => {
                last_read = tokio::time::Instant::now();
            }
            Some(Poll::Pending) => {
                // One timer, moved only when the client sent something since it was set.
                let due = (last_read + LINGER_TIMEOUT).min(end);
                if quiet.deadline() != due {
                    quiet.as_mut().reset(due);
                }
                return quiet.as_mut().poll(cx);
            }
            _ => return Poll::Ready(()),
        }
    })
    .await;
}

/// Writes to the client's socket (taking the connection's lock for each write while a
/// request body's reader shares it).
struct WireWriter<'a>(&'a mut Slot);

impl WireWriter<'_> {
    fn with<T>(
        &mut self,
        f: impl FnOnce(Pin<&mut Io>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        self.0
            .with(|w| match w.io.as_mut() {
                Some(io) => f(Pin::new(io)),
                None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            })
            .unwrap_or_else(|| Poll::Ready(Err(poisoned())))
    }
}

impl AsyncWrite for WireWriter<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(|io| io.poll_write(cx, data))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.with(|io| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|io| io.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|io| io.poll_shutdown(cx))
    }
}

/// A client's request body, read off the connection as whoever forwards it polls it.
pub struct RequestBody {
    wire: SharedWire,
    /// Asks the connection to send `100 Continue` (once, on the first poll).
    expect: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody").finish_non_exhaustive()
    }
}

/// Why reading a request body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client closed the connection before the end of the body.
    #[error("the client closed the connection before the end of its request body")]
    Truncated,
    /// The chunked encoding is malformed.
    #[error("invalid chunked encoding in the request body")]
    InvalidChunk,
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(tx) = self.expect.take() {
            let _ = tx.send(());
        }
        let Ok(mut guard) = self.wire.lock() else {
            return Poll::Ready(Some(Err(poisoned().into())));
        };
        let w = &mut *guard;
        let result = poll_body(w, cx);
        if let Poll::Ready(Some(Err(_))) = &result {
            w.body = BodyState::Failed;
        }
        result.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.wire
            .lock()
            .is_ok_and(|w| matches!(w.body, BodyState::Done | BodyState::Length(0)))
    }

    fn size_hint(&self) -> SizeHint {
        match self.wire.lock().map(|w| w.body) {
            Ok(BodyState::Length(n)) => SizeHint::with_exact(n),
            Ok(BodyState::Done) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

type BodyPoll = Poll<Option<Result<Frame<Bytes>, BodyError>>>;

fn poll_body(w: &mut Wire, cx: &mut Context<'_>) -> BodyPoll {
    loop {
        if w.body == BodyState::Failed {
            return Poll::Ready(None);
        }
        match buffered_piece(w) {
            Err(e) => return Poll::Ready(Some(Err(e))),
            Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
            Ok(Decoded::End(trailers)) => {
                return Poll::Ready((!trailers.is_empty()).then(|| Ok(Frame::trailers(trailers))))
            }
            Ok(Decoded::Again) => {}
            Ok(Decoded::NeedMore(want)) => match ready!(poll_fill(w, cx, want)) {
                Ok(0) => return Poll::Ready(Some(Err(BodyError::Truncated))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            },
        }
    }
}

/// Consumes what is left of an unread request body when all of it is already in the
/// buffer, so that the connection can carry the next request. True when the body is done.
fn skip_buffered_body(w: &mut Wire) -> bool {
    if w.body == BodyState::Done {
        return true;
    }
    loop {
        if w.body == BodyState::Failed {
            return false;
        }
        match buffered_piece(w) {
            Ok(Decoded::Data(_) | Decoded::Again) => {}
            Ok(Decoded::End(_)) => return true,
            Ok(Decoded::NeedMore(_)) => return false,
            Err(_) => {
                w.body = BodyState::Failed;
                return false;
            }
        }
    }
}

/// The next piece of the request body from what is already in the buffer (no reading):
/// both the body's reader and [`skip_buffered_body`] go through here.
fn buffered_piece(w: &mut Wire) -> Result<Decoded, BodyError> {
    match w.body {
        BodyState::Done | BodyState::Failed => Ok(Decoded::End(HeaderMap::new())),
        BodyState::Length(0) => {
            w.body = BodyState::Done;
            Ok(Decoded::End(HeaderMap::new()))
        }
        BodyState::Length(left) => {
            if w.buf.is_empty() {
                return Ok(Decoded::NeedMore(
                    usize::try_from(left).unwrap_or(MAX_READ).min(MAX_READ),
                ));
            }
            let n = w.buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let data = w.buf.split_to(n).freeze();
            let left = left - n as u64;
            w.body = if left == 0 {
                BodyState::Done
            } else {
                BodyState::Length(left)
            };
            Ok(Decoded::Data(data))
        }
        BodyState::Chunked(mut chunk) => {
            let step = decode_chunk(&mut chunk, &mut w.buf);
            w.body = BodyState::Chunked(chunk);
            match step {
                Err(InvalidChunk) => Err(BodyError::InvalidChunk),
                Ok(Decoded::End(trailers)) => {
                    w.body = BodyState::Done;
                    Ok(Decoded::End(trailers))
                }
                Ok(other) => Ok(other),
            }
        }
    }
}

/// Reads more of the body into the buffer, asking for about `want` bytes.
fn poll_fill(w: &mut Wire, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
    let Some(io) = w.io.as_mut() else {
        return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
    };
    w.buf.reserve(want);
    tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut w.buf)
}

/// For the fuzz targets (`fuzz/`, built with the `fuzzing` feature): parses the input as
/// request heads the way a connection reads them, once with all of it in the buffer and
/// once arriving in pieces ([`crate::http1::fuzz_split`]), and panics when the two
/// disagree or when a head says something inconsistent (its framing, or which headers the
/// handler may skip looking up).
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_request_heads(input: &[u8]) {
    // Smaller than the inputs can be, so that the limit is exercised too.
    const MAX_HEAD: usize = 1024;
    let (mut sizes, raw) = crate::http1::fuzz_split(input);
    let whole = crate::http1::fuzz_read(raw, &mut std::iter::once(raw.len()), |buf| {
        read_head(buf, MAX_HEAD)
    });
    let pieces = crate::http1::fuzz_read(raw, &mut sizes, |buf| read_head(buf, MAX_HEAD));
    assert_eq!(whole, pieces, "whole vs in pieces");
}

/// One head as [`poll_head`] reads it (the size limit included), described for comparison.
#[cfg(any(test, feature = "fuzzing"))]
fn read_head(buf: &mut BytesMut, max_head: usize) -> Option<String> {
    match parse_head(buf, max_head) {
        Ok(Some(head)) => {
            check_head(&head);
            Some(format!(
                "{:?} {:?} keep_alive={} continue={} upgrade={} {:?}",
                head.request,
                head.body,
                head.keep_alive,
                head.expect_continue,
                head.upgrade,
                head.seen,
            ))
        }
        Ok(None) => None,
        Err(e) => Some(format!("error: {e:?}")),
    }
}

/// What the handler relies on in a parsed head.
#[cfg(any(test, feature = "fuzzing"))]
fn check_head(head: &Head) {
    use http::header::HOST;
    let headers = head.request.headers();
    let count = |name| headers.get_all(name).iter().count();
    assert_eq!(
        usize::from(head.seen.hosts),
        count(HOST).min(255),
        "host lines"
    );
    assert_eq!(
        head.seen.transfer_encoding,
        headers.contains_key(TRANSFER_ENCODING)
    );
    assert_eq!(
        head.seen.request_id,
        headers.contains_key(&crate::proxy::headers::X_REQUEST_ID)
    );
    assert_eq!(
        head.seen.forwarded_for,
        headers.contains_key("x-forwarded-for")
    );
    assert!(count(CONTENT_LENGTH) <= 1, "one content-length forwarded");
    match head.body {
        BodyState::Chunked(Chunk::Size) => {
            assert_eq!(count(TRANSFER_ENCODING), 1);
            assert!(!headers.contains_key(CONTENT_LENGTH));
        }
        BodyState::Length(n) => {
            assert!(n > 0);
            assert!(!headers.contains_key(TRANSFER_ENCODING));
        }
        BodyState::Done => {}
        other => panic!("a new head's body is {other:?}"),
    }
    if headers.contains_key(TRANSFER_ENCODING) && head.body == BodyState::Done {
        assert!(!head.keep_alive, "refused framing closes the connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<Head>, ProxyError> {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, 64 * 1024)
    }

    #[test]
    fn a_head_past_the_limit_is_too_large_whatever_follows() {
        let limit = 1024;
        let mut raw = b"GET / HTTP/1.1\r\nhost: x\r\nx-long: ".to_vec();
        raw.resize(limit + 100, b'a');
        // Malformed only past the limit: too large, as when the bytes come in small reads
        // (it was "malformed" when they all arrived in one).
        raw.extend_from_slice(b"\x01\r\n\r\n");
        for arrived in [raw.len(), limit] {
            let mut buf = BytesMut::from(&raw[..arrived]);
            assert!(
                matches!(parse_head(&mut buf, limit), Err(ProxyError::HeadTooLarge)),
                "{arrived} bytes"
            );
        }
        let mut buf = BytesMut::from(&raw[..limit - 1]);
        assert!(matches!(parse_head(&mut buf, limit), Ok(None)));
    }

    #[test]
    fn request_framing_follows_rfc_9112() {
        let cases: [(&[u8], BodyState, bool); 7] = [
            (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", BodyState::Done, true),
            (
                b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\n",
                BodyState::Length(5),
                true,
            ),
            (
                b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5, 5\r\n\r\n",
                BodyState::Length(5),
                true,
            ),
            (
                b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
                BodyState::Chunked(Chunk::Size),
                true,
            ),
            // Left for the handler to refuse; the connection closes after.
            (
                b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
                BodyState::Done,
                false,
            ),
            (b"GET / HTTP/1.0\r\n\r\n", BodyState::Done, false),
            (
                b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
                BodyState::Done,
                true,
            ),
        ];
        for (raw, body, keep_alive) in cases {
            let head = parse(raw)
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(raw)));
            assert_eq!(head.body, body, "{}", String::from_utf8_lossy(raw));
            assert_eq!(
                head.keep_alive,
                keep_alive,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let head =
            parse(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n")
                .ok()
                .flatten()
                .map(|h| h.request.headers().get_all(CONTENT_LENGTH).iter().count());
        assert_eq!(head, Some(1), "identical lengths are forwarded once");
    }

    #[test]
    fn empty_header_values_are_kept_empty() {
        let head = parse(b"GET / HTTP/1.1\r\nhost: x\r\nx-empty:\r\nx-also: \r\n\r\n")
            .ok()
            .flatten()
            .map(|h| h.request);
        let Some(request) = head else {
            panic!("not parsed");
        };
        assert_eq!(request.headers()["x-empty"], "");
        assert_eq!(request.headers()["x-also"], "");
        assert_eq!(request.headers()["host"], "x");
    }

    #[test]
    fn ambiguous_heads_are_refused() {
        let cases: [&[u8]; 4] = [
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: +5\r\n\r\n",
            b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-a : 1\r\n\r\n",
        ];
        for raw in cases {
            assert!(parse(raw).is_err(), "{}", String::from_utf8_lossy(raw));
        }
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nhost: x\r\n"), Ok(None)));
    }
}
