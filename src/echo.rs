//! The built-in test backend (`palisade echo`): an HTTP/1.1 + h2c server that answers every
//! request with a JSON description of what it received, plus a few routes that let tests and
//! benchmarks shape the answer (`/health`, `/status/CODE`, `/delay/MS`, `/bytes/N`,
//! `/stream/N`) and a minimal WebSocket echo. Beyond SPEC section 6, `POST /health/down` makes
//! `/health` answer 503 until `POST /health/up`, so failover can be tried by hand and tested.
//! Request bodies are counted while streaming and response bodies are generated on the fly, so
//! gigabyte transfers cost no memory.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE,
    SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{request, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

/// How long in-flight connections may keep running once shutdown starts.
const GRACE_PERIOD: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const MAX_DELAY_MS: u64 = 60_000;
const MAX_STREAM_CHUNKS: u64 = 10_000;
const STREAM_INTERVAL: Duration = Duration::from_millis(100);
/// Largest WebSocket message (after reassembling fragments) the echo accepts.
const MAX_WS_MESSAGE: usize = 1 << 20;
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";
const X_BACKEND: HeaderName = HeaderName::from_static("x-backend");

/// The source every `/bytes/N` body is sliced from.
static FILLER: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// Serves the echo backend on an already-bound listener until `shutdown` resolves; then stops
/// accepting and lets in-flight connections finish (bounded: give them at most ~1 s, then
/// return). Fails at once with `InvalidInput` if `name` cannot be sent as a header value.
pub async fn serve(
    listener: TcpListener,
    name: Arc<str>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let header = HeaderValue::from_str(&name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "backend name is not a valid header value",
        )
    })?;
    let backend = Arc::new(Backend {
        name,
        header,
        healthy: AtomicBool::new(true),
    });
    let builder = Arc::new(Builder::new(TokioExecutor::new()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok((stream, _peer)) => {
                // Small JSON answers must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                let conn =
                    serve_connection(stream, builder.clone(), backend.clone(), stop_rx.clone());
                connections.spawn(conn);
            }
            Err(error) => {
                tracing::warn!(%error, "echo: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(GRACE_PERIOD, async {
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::debug!(
            left = connections.len(),
            "echo: grace period over, aborting"
        );
    }
    connections.shutdown().await;
    Ok(())
}

/// What every response needs to know about the backend answering it.
struct Backend {
    name: Arc<str>,
    header: HeaderValue,
    /// What `/health` reports; flipped by `POST /health/down` and `POST /health/up`.
    healthy: AtomicBool,
}

/// Where a WebSocket handshake leaves the pending upgrade for its connection task, so the
/// echo runs inside that task and is covered by the same shutdown and abort.
type UpgradeSlot = Arc<Mutex<Option<OnUpgrade>>>;

async fn serve_connection(
    stream: TcpStream,
    builder: Arc<Builder<TokioExecutor>>,
    backend: Arc<Backend>,
    mut stop: watch::Receiver<bool>,
) {
    let slot = UpgradeSlot::default();
    let service = {
        let slot = slot.clone();
        service_fn(move |req| handle(req, backend.clone(), slot.clone()))
    };
    let mut conn = pin!(builder.serve_connection_with_upgrades(TokioIo::new(stream), service));
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "echo: connection ended with an error");
    }
    let pending = slot.lock().ok().and_then(|mut slot| slot.take());
    if let Some(on_upgrade) = pending {
        match on_upgrade.await {
            Ok(upgraded) => websocket_echo(TokioIo::new(upgraded), stop).await,
            Err(error) => tracing::debug!(%error, "echo: WebSocket upgrade failed"),
        }
    }
}

/// Resolves once shutdown has started (or `serve` is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|&stopping| stopping).await;
}

async fn handle(
    req: Request<Incoming>,
    backend: Arc<Backend>,
    slot: UpgradeSlot,
) -> Result<Response<EchoBody>, Infallible> {
    let mut response = route(req, &backend, &slot).await;
    response
        .headers_mut()
        .insert(X_BACKEND, backend.header.clone());
    Ok(response)
}

/// One request, top to bottom: refuse what we cannot honour, hand WebSocket handshakes off,
/// count the body, then answer according to the path.
async fn route(
    mut req: Request<Incoming>,
    backend: &Backend,
    slot: &UpgradeSlot,
) -> Response<EchoBody> {
    if req.method() == Method::CONNECT {
        return text(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n");
    }
    if has_token(req.headers(), CONNECTION, "upgrade")
        && has_token(req.headers(), UPGRADE, "websocket")
    {
        return accept_websocket(&mut req, slot);
    }
    let route = Route::parse(req.method(), req.uri().path());
    let (parts, body) = req.into_parts();
    let Ok(body_bytes) = count_body(body).await else {
        return text(StatusCode::BAD_REQUEST, "could not read the request body\n");
    };
    let status = match route {
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
        Ok(Route::Health) if backend.healthy.load(Ordering::Relaxed) => {
            return text(StatusCode::OK, "ok");
        }
        Ok(Route::Health) => return text(StatusCode::SERVICE_UNAVAILABLE, "down"),
        Ok(Route::SetHealth(healthy)) => {
            backend.healthy.store(healthy, Ordering::Relaxed);
            return text(StatusCode::OK, "ok");
        }
        Ok(Route::Bytes(n)) => {
            let mut response = respond(
                StatusCode::OK,
                "application/octet-stream",
                EchoBody::Filler { remaining: n },
            );
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(n));
            return response;
        }
        Ok(Route::Stream(total)) => return respond(StatusCode::OK, TEXT, EchoBody::chunks(total)),
        Ok(Route::Status(status)) if matches!(status.as_u16(), 204 | 304) => {
            // These statuses must not carry a body.
            return respond_empty(status);
        }
        Ok(Route::Status(status)) => status,
        Ok(Route::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            StatusCode::OK
        }
        Ok(Route::Echo) => StatusCode::OK,
    };
    respond(
        status,
        JSON,
        EchoBody::full(echo_json(backend, &parts, body_bytes)),
    )
}

/// What the path asks for; a malformed argument is an `Err` with the text to answer 400 with.
enum Route {
    Echo,
    Health,
    SetHealth(bool),
    Status(StatusCode),
    Delay(Duration),
    Bytes(u64),
    Stream(u64),
}

impl Route {
    fn parse(method: &Method, path: &str) -> Result<Route, &'static str> {
        match (method, path) {
            (_, "/health") => return Ok(Route::Health),
            (&Method::POST, "/health/up") => return Ok(Route::SetHealth(true)),
            (&Method::POST, "/health/down") => return Ok(Route::SetHealth(false)),
            _ => {}
        }
        if let Some(arg) = path.strip_prefix("/status/") {
            let status = arg
                .parse::<u16>()
                .ok()
                .filter(|code| (200..=599).contains(code));
            let status = status.and_then(|code| StatusCode::from_u16(code).ok());
            return status
                .map(Route::Status)
                .ok_or("/status/CODE needs a CODE from 200 to 599\n");
        }
        if let Some(arg) = path.strip_prefix("/delay/") {
            let ms = arg.parse::<u64>();
            let ms = ms.map_err(|_| "/delay/MS needs MS as a number of milliseconds\n")?;
            return Ok(Route::Delay(Duration::from_millis(ms.min(MAX_DELAY_MS))));
        }
        if let Some(arg) = path.strip_prefix("/bytes/") {
            return arg
                .parse()
                .map(Route::Bytes)
                .map_err(|_| "/bytes/N needs N as a number of bytes\n");
        }
        if let Some(arg) = path.strip_prefix("/stream/") {
            let n = arg.parse::<u64>();
            let n = n.map_err(|_| "/stream/N needs N as a number of chunks\n")?;
            return Ok(Route::Stream(n.min(MAX_STREAM_CHUNKS)));
        }
        Ok(Route::Echo)
    }
}

/// Reads the body to its end frame by frame, keeping only the count.
async fn count_body(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            total += data.len() as u64;
        }
    }
    Ok(total)
}

fn echo_json(backend: &Backend, parts: &request::Parts, body_bytes: u64) -> Bytes {
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<_> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        headers.insert(name.as_str().to_owned(), values.join(", ").into());
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |pq| pq.as_str());
    let json = serde_json::json!({
        "backend": &*backend.name,
        "method": parts.method.as_str(),
        "path": path,
        "headers": headers,
        "body_bytes": body_bytes,
    });
    Bytes::from(json.to_string())
}

fn respond(status: StatusCode, content_type: &'static str, body: EchoBody) -> Response<EchoBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn respond_empty(status: StatusCode) -> Response<EchoBody> {
    let mut response = Response::new(EchoBody::Full(None));
    *response.status_mut() = status;
    response
}

fn text(status: StatusCode, message: &'static str) -> Response<EchoBody> {
    respond(
        status,
        TEXT,
        EchoBody::full(Bytes::from_static(message.as_bytes())),
    )
}

/// Every response body the echo produces; each variant generates its data on demand.
enum EchoBody {
    /// A body already in memory (JSON, short texts), or nothing.
    Full(Option<Bytes>),
    /// `/bytes/N`: `remaining` bytes sliced from [`FILLER`].
    Filler { remaining: u64 },
    /// `/stream/N`: one line per chunk, the first at once, the rest `STREAM_INTERVAL` apart.
    Chunks {
        sent: u64,
        total: u64,
        tick: Pin<Box<Sleep>>,
    },
}

impl EchoBody {
    fn full(data: Bytes) -> Self {
        EchoBody::Full(Some(data))
    }

    fn chunks(total: u64) -> Self {
        let tick = Box::pin(tokio::time::sleep(STREAM_INTERVAL));
        EchoBody::Chunks {
            sent: 0,
            total,
            tick,
        }
    }
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let chunk = match self.get_mut() {
            EchoBody::Full(data) => data.take(),
            EchoBody::Filler { remaining } if *remaining == 0 => None,
            EchoBody::Filler { remaining } => {
                let len = usize::try_from(*remaining).map_or(FILLER.len(), |r| r.min(FILLER.len()));
                *remaining -= len as u64;
                Some(Bytes::from_static(&FILLER[..len]))
            }
            EchoBody::Chunks { sent, total, .. } if sent == total => None,
            EchoBody::Chunks { sent, tick, .. } => {
                if *sent > 0 {
                    ready!(tick.as_mut().poll(cx));
                }
                tick.as_mut().reset(Instant::now() + STREAM_INTERVAL);
                *sent += 1;
                Some(Bytes::from(format!("chunk {}\n", *sent - 1)))
            }
        };
        Poll::Ready(chunk.map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EchoBody::Full(data) => data.is_none(),
            EchoBody::Filler { remaining } => *remaining == 0,
            EchoBody::Chunks { sent, total, .. } => sent == total,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EchoBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            EchoBody::Filler { remaining } => SizeHint::with_exact(*remaining),
            EchoBody::Chunks { .. } => SizeHint::default(),
        }
    }
}

/// True if any comma-separated element of any `name` header equals `token` (ignoring case).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    let mut values = headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok());
    values.any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Validates an RFC 6455 handshake and answers 101, leaving the upgrade in `slot`.
fn accept_websocket(req: &mut Request<Incoming>, slot: &UpgradeSlot) -> Response<EchoBody> {
    if req.method() != Method::GET {
        return text(
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake must use GET\n",
        );
    }
    if req
        .headers()
        .get(SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v != "13")
    {
        let mut response = text(
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is supported\n",
        );
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    }
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    if BASE64
        .decode(key.as_bytes())
        .map_or(true, |nonce| nonce.len() != 16)
    {
        return text(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be 16 bytes in base64\n",
        );
    }
    let Ok(accept) = HeaderValue::try_from(websocket_accept(key.as_bytes())) else {
        return text(StatusCode::BAD_REQUEST, "invalid Sec-WebSocket-Key\n");
    };
    let Ok(mut pending) = slot.lock() else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "connection state unavailable\n",
        );
    };
    *pending = Some(hyper::upgrade::on(req));
    let mut response = respond_empty(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key + GUID)).
fn websocket_accept(key: &[u8]) -> String {
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key);
    sha1.update(WS_GUID);
    BASE64.encode(sha1.digest().bytes())
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_INVALID_DATA: u16 = 1007;
const CLOSE_TOO_BIG: u16 = 1009;

/// A client frame, already unmasked.
struct WsFrame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// Why the echo stops reading: the peer went away, or it broke the protocol (close code).
enum WsError {
    Io,
    Close(u16),
}

impl From<io::Error> for WsError {
    fn from(_: io::Error) -> Self {
        WsError::Io
    }
}

/// Echoes text and binary messages (fragments reassembled), answers ping and close, and
/// sends "going away" when the server shuts down.
async fn websocket_echo<S: AsyncRead + AsyncWrite + Unpin>(io: S, mut stop: watch::Receiver<bool>) {
    let mut io = BufReader::new(io);
    // The opcode and data of a fragmented message still waiting for its final frame.
    let mut partial: Option<(u8, Vec<u8>)> = None;
    loop {
        let frame = tokio::select! {
            frame = read_ws_frame(&mut io) => frame,
            () = stopped(&mut stop) => return close(&mut io, CLOSE_GOING_AWAY).await,
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(WsError::Io) => return,
            Err(WsError::Close(code)) => return close(&mut io, code).await,
        };
        let message = match (frame.opcode, partial.as_mut()) {
            (OP_PING, _) => {
                if send_ws_frame(&mut io, OP_PONG, &frame.payload)
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            (OP_PONG, _) => continue,
            (OP_CLOSE, _) => {
                // Echo the peer's status code (the first two bytes), if it sent one.
                let code = frame.payload.get(..2).unwrap_or_default();
                let _ = send_ws_frame(&mut io, OP_CLOSE, code).await;
                let _ = io.shutdown().await;
                return;
            }
            (OP_TEXT | OP_BINARY, None) if frame.fin => (frame.opcode, frame.payload),
            (OP_TEXT | OP_BINARY, None) => {
                partial = Some((frame.opcode, frame.payload));
                continue;
            }
            (OP_CONTINUATION, Some((_, data))) => {
                if data.len() + frame.payload.len() > MAX_WS_MESSAGE {
                    return close(&mut io, CLOSE_TOO_BIG).await;
                }
                data.extend_from_slice(&frame.payload);
                if !frame.fin {
                    continue;
                }
                match partial.take() {
                    Some(message) => message,
                    None => continue,
                }
            }
            _ => return close(&mut io, CLOSE_PROTOCOL_ERROR).await,
        };
        if message.0 == OP_TEXT && std::str::from_utf8(&message.1).is_err() {
            return close(&mut io, CLOSE_INVALID_DATA).await;
        }
        if send_ws_frame(&mut io, message.0, &message.1).await.is_err() {
            return;
        }
    }
}

/// Reads one client frame; lengths may be 7, 16 or 64 bits; client frames must be masked.
async fn read_ws_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<WsFrame, WsError> {
    let mut head = [0u8; 2];
    reader.read_exact(&mut head).await?;
    let (fin, opcode, masked) = (head[0] & 0x80 != 0, head[0] & 0x0F, head[1] & 0x80 != 0);
    if head[0] & 0x70 != 0 || !masked {
        return Err(WsError::Close(CLOSE_PROTOCOL_ERROR));
    }
    let len = match head[1] & 0x7F {
        126 => u64::from(reader.read_u16().await?),
        127 => reader.read_u64().await?,
        len => u64::from(len),
    };
    if opcode >= OP_CLOSE && (!fin || len > 125) {
        return Err(WsError::Close(CLOSE_PROTOCOL_ERROR));
    }
    // Check before allocating: the length is whatever the client claims.
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len <= MAX_WS_MESSAGE);
    let len = len.ok_or(WsError::Close(CLOSE_TOO_BIG))?;
    let mut mask = [0u8; 4];
    reader.read_exact(&mut mask).await?;
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
    Ok(WsFrame {
        fin,
        opcode,
        payload,
    })
}

/// Writes one final, unmasked server frame.
async fn send_ws_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    opcode: u8,
    payload: &[u8],
) -> io::Result<()> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x80 | opcode);
    match payload.len() {
        len if len < 126 => frame.push(len as u8),
        len if len <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    writer.write_all(&frame).await?;
    writer.flush().await
}

/// Sends a close frame with `code` and ends our side of the connection.
async fn close<W: AsyncWrite + Unpin>(writer: &mut W, code: u16) {
    let _ = send_ws_frame(writer, OP_CLOSE, &code.to_be_bytes()).await;
    let _ = writer.shutdown().await;
}
