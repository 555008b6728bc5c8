//! palisade's own keep-alive pool for plain HTTP/1.1 backends.
//!
//! Each [`Backend`] keeps a stack of idle connections, spoken to with palisade's own
//! HTTP/1.1 client codec ([`super::h1`]). A request takes the newest idle connection
//! (LIFO: the warm ones stay in use and the cold ones age out), or opens a new one; the
//! response body gives the connection back when it has been read to the end
//! ([`h1::ResponseBody`]). Compared with hyper-util's generic
//! client this skips hashing a `(scheme, authority)` key twice per request, the global pool
//! lock, the race between checkout and connect, and the task spawned per response to wait
//! for the connection to become idle again. The lock is per backend and held only for a
//! push or a pop.
//!
//! TLS and h2c upstreams keep hyper-util's client (see [`super::client`]).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Frame, SizeHint};
use hyper::body::{Body, Incoming};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::h1::{self, Conn};
use super::Backend;
use crate::clock;
use crate::proxy::body::{BoxError, ProxyBody};

/// How long an unused connection stays open: the default of the upstream's
/// `timeouts.idle` (nginx's upstream `keepalive_timeout` is 60 s; backends that close
/// sooner are noticed, but a request can meet the close: set `idle` below the backend's
/// own timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per backend; more are closed when they are given back (nginx's
/// `keepalive` directive plays this role).
pub const MAX_IDLE: usize = 1024;

/// TCP keep-alive probes on backend connections start after this long without traffic.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

struct Idle {
    conn: Conn,
    /// When it was given back ([`clock::coarse_ns`]).
    since: u64,
}

impl Idle {
    /// Idle for less than `limit` nanoseconds at `now` ([`clock::coarse_ns`]).
    fn is_fresh(&self, now: u64, limit: u64) -> bool {
        now.saturating_sub(self.since) < limit
    }
}

/// How long a connection may have been idle to carry a request that cannot be sent again
/// ([`Pool::take`]): under the shortest keep-alive timeout common among backends.
const RECENT: Duration = Duration::from_secs(1);
const RECENT_NS: u64 = RECENT.as_nanos() as u64;

/// The idle connections of one backend.
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    /// How long a connection may stay idle, in nanoseconds (the upstream's
    /// `timeouts.idle`, set again on every reload; 0: none is kept).
    limit: AtomicU64,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            idle: Mutex::default(),
            limit: AtomicU64::new(clock::nanos(IDLE_TIMEOUT)),
        }
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl Pool {
    /// Idle connections right now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map_or(0, |v| v.len())
    }

    /// Sets how long a connection may stay idle (zero: none is kept).
    pub fn set_idle_limit(&self, limit: Duration) {
        self.limit.store(clock::nanos(limit), Ordering::Relaxed);
    }

    /// How long a connection may stay idle.
    pub fn idle_limit(&self) -> Duration {
        Duration::from_nanos(self.limit.load(Ordering::Relaxed))
    }

    /// The newest idle connection that is still open and not too old; with `recent`,
    /// only one idle for less than [`RECENT`] (None leaves the older ones for requests
    /// that can be sent again).
    fn take(&self, recent: bool) -> Option<Conn> {
        let now = clock::coarse_ns();
        let limit = self.limit.load(Ordering::Relaxed);
        let limit = if recent { limit.min(RECENT_NS) } else { limit };
        loop {
            let idle = {
                let mut stack = self.idle.lock().ok()?;
                // The stack is newest on top: when the top is too old, all are.
                if recent && stack.last().is_some_and(|top| !top.is_fresh(now, limit)) {
                    return None;
                }
                stack.pop()?
            };
            if idle.is_fresh(now, limit) && idle.conn.is_open() {
                return Some(idle.conn);
            }
            // Closed by the backend, or idle too long: dropping it closes it.
        }
    }

    /// Gives a connection back for the next request (closing it when the pool is full).
    pub(super) fn put(&self, conn: Conn) {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 {
            return;
        }
        let now = clock::coarse_ns();
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        // The oldest connection sits at the bottom of the stack; retire it once it aged.
        if idle.first().is_some_and(|old| !old.is_fresh(now, limit)) {
            idle.remove(0);
        }
        if idle.len() < MAX_IDLE {
            idle.push(Idle { conn, since: now });
        }
    }

    /// Closes the connections that were idle for the idle limit or that the backend
    /// closed (run every few seconds, so that an unused pool does not hold sockets open).
    pub fn sweep(&self) {
        let now = clock::coarse_ns();
        let limit = self.limit.load(Ordering::Relaxed);
        let stale: Vec<Idle> = match self.idle.lock() {
            Ok(mut idle) => {
                let (keep, stale) = std::mem::take(&mut *idle)
                    .into_iter()
                    .partition(|i| i.is_fresh(now, limit) && i.conn.is_open());
                *idle = keep;
                stale
            }
            Err(_) => return,
        };
        // Closed outside the lock.
        drop(stale);
    }

    /// Closes every idle connection (the upstream stopped using this pool).
    pub fn clear(&self) {
        let all = self.idle.lock().map(|mut v| std::mem::take(&mut *v));
        drop(all);
    }
}

/// Why a request to a backend failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be opened (refused, unreachable, or timed out).
    Connect(io::Error),
    /// The HTTP exchange failed on an open connection.
    Exchange(h1::ProtoError),
    /// hyper-util's client failed (TLS upstreams).
    Client(hyper_util::client::legacy::Error),
    /// No HTTP/2 connection could be opened, or a new one took nothing (h2c upstreams).
    H2Connect(crate::proxy::body::BoxError),
    /// The HTTP/2 exchange failed (h2c upstreams).
    H2(hyper::Error),
    /// The backend's HTTP/2 connection gave the stream back unprocessed: a graceful
    /// GOAWAY whose last stream is below it, or REFUSED_STREAM (RFC 9113 8.7: safe to
    /// send again, whatever the method). Nothing reached the application, so it counts
    /// like a connection that could not be made, and against no backend.
    H2Refused(hyper::Error),
    /// The response head had not arrived by the response deadline.
    TimedOut,
}

impl SendError {
    /// Whether hyper-util's client lost its connection before the answer was complete:
    /// closed ("connection closed before message completed"; over TLS also without
    /// close_notify), reset, or broken. Safe to send again only for an idempotent request.
    pub fn connection_lost(&self) -> bool {
        let SendError::Client(e) = self else {
            return false;
        };
        std::iter::successors(e.source(), |&cause| cause.source()).any(|cause| {
            cause
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_incomplete_message)
                || cause.downcast_ref::<io::Error>().is_some_and(|io| {
                    matches!(
                        io.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::BrokenPipe
                    )
                })
        })
    }

    /// The TLS error that ended the handshake with the backend, when that is why no
    /// connection could be made (rustls reports it inside the connector's `io::Error`).
    pub fn tls_handshake_error(&self) -> Option<&rustls::Error> {
        if !self.is_connect() {
            return None;
        }
        std::iter::successors(self.source(), |&cause| cause.source()).find_map(rustls_error)
    }

    /// Whether the request never reached the backend.
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) | SendError::H2Connect(_) | SendError::H2Refused(_) => true,
            SendError::Exchange(_) | SendError::H2(_) | SendError::TimedOut => false,
            SendError::Client(e) => e.is_connect(),
        }
    }
}

/// The rustls error `cause` is, or wraps in (layers of) `io::Error`: hyper-rustls wraps
/// tokio-rustls' `io::Error` in another, and `io::Error::source` skips the error it wraps.
fn rustls_error<'a>(mut cause: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    loop {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = cause.downcast_ref::<io::Error>()?.get_ref()?;
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Exchange(e) => write!(f, "{e}"),
            SendError::Client(e) => match e.source() {
                Some(cause) => write!(f, "{e}: {cause}"),
                None => write!(f, "{e}"),
            },
            SendError::H2Connect(e) => write!(f, "connect (HTTP/2): {e}"),
            SendError::H2(e) => match e.source() {
                Some(cause) => write!(f, "{e}: {cause}"),
                None => write!(f, "{e}"),
            },
            SendError::H2Refused(e) => match e.source() {
                Some(cause) => write!(f, "refused unprocessed (HTTP/2): {cause}"),
                None => write!(f, "refused unprocessed (HTTP/2): {e}"),
            },
            SendError::TimedOut => f.write_str("no response head before the response timeout"),
        }
    }
}

impl StdError for SendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            SendError::Connect(e) => Some(e),
            SendError::Exchange(e) => Some(e),
            SendError::Client(e) => Some(e),
            SendError::H2Connect(e) => Some(&**e),
            SendError::H2(e) | SendError::H2Refused(e) => Some(e),
            SendError::TimedOut => None,
        }
    }
}

/// Sends a request (`head` and `body`) to `backend` over an idle connection of its pool or
/// a new one, and waits for the response head until `deadline`. A pooled connection that
/// turns out to be closed before the request was written is discarded and the request
/// goes on the next one, so a backend closing idle connections costs no failed request.
pub async fn send(
    backend: &Arc<Backend>,
    head: &h1::RequestHead<'_>,
    mut body: ProxyBody,
    connect_timeout: Duration,
    deadline: tokio::time::Instant,
) -> Result<Response<UpstreamBody>, SendError> {
    // A request that could not go on another connection if this one turns out closed (a
    // body that streams, a method that is not idempotent) takes only a recently used one:
    // backends close idle connections on their own schedule (gunicorn after 2 s, Node.js
    // and uvicorn after 5 s), and a request sent as they do is lost.
    let idempotent = crate::proxy::handler::is_idempotent(head.method);
    let recent = !(idempotent && body.is_in_memory());
    // Sent again once after a pooled connection closed unanswered; then only on a new
    // connection (a request that itself brings its backend down is not tried on every
    // pooled connection in turn).
    let mut resent = false;
    loop {
        let pooled = if resent {
            None
        } else {
            backend.pool.take(recent)
        };
        let (conn, pooled) = match pooled {
            Some(conn) => (conn, true),
            // Boxed: connecting is the rare path, and its state would otherwise sit in
            // every request's future.
            None => (
                Box::pin(connect(&backend.addr, connect_timeout, deadline)).await?,
                false,
            ),
        };
        match h1::exchange(conn, head, body, backend, deadline).await {
            Ok(resp) => return Ok(resp.map(UpstreamBody::own)),
            // Not written: the connection was gone already. Try the next one.
            Err(h1::Failure::NotSent(back, _)) if pooled => body = back,
            Err(h1::Failure::NotSent(_, e)) => return Err(SendError::Connect(e)),
            // Written, and the pooled connection closed without a byte of answer: the
            // backend closed it as idle while the request was on its way (or it failed
            // on this request). An idempotent request may be sent again (RFC 9112
            // 9.3.1), on the next connection; on a fresh one this is a failure.
            Err(h1::Failure::Unanswered(back, _)) if pooled && idempotent => {
                body = back;
                resent = true;
            }
            Err(h1::Failure::Unanswered(_, e)) => return Err(SendError::Exchange(e)),
            Err(h1::Failure::Failed(e)) => return Err(SendError::Exchange(e)),
            Err(h1::Failure::TimedOut) => return Err(SendError::TimedOut),
        }
    }
}

/// Opens a connection to `addr` (`host:port`) within `timeout`, and before the response
/// `deadline` (`SendError::TimedOut` when that comes first).
async fn connect(
    addr: &str,
    timeout: Duration,
    deadline: tokio::time::Instant,
) -> Result<Conn, SendError> {
    let limit = tokio::time::Instant::now()
        .checked_add(timeout)
        .map_or(deadline, |at| at.min(deadline));
    let stream = match tokio::time::timeout_at(limit, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(SendError::Connect(e)),
        Err(_) if limit == deadline => return Err(SendError::TimedOut),
        Err(_) => {
            return Err(SendError::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                "connect timed out",
            )))
        }
    };
    // Best effort: a socket option that cannot be set changes performance, not behaviour.
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
    Ok(Conn::new(stream))
}

/// A backend's response body: read by palisade's own codec straight off a pooled
/// connection (plain HTTP/1.1), or hyper's (TLS and h2c upstreams).
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Inner,
    /// Told how the body ends (taken then, so told once); brings the upstream's
    /// `timeouts.read`.
    watch: Option<Arc<super::BodyWatch>>,
    /// The backend's silence mid-body, timed from the first time the body waits on it
    /// (or the request has a streaming upload): bodies that arrive with their head never
    /// make one, and it costs the others one pointer while they move.
    silence: Option<Box<Silence>>,
}

/// How long the backend has kept a body waiting.
#[derive(Debug)]
struct Silence {
    /// The upstream's `timeouts.read` (zero: no limit).
    limit: Duration,
    /// Made the first time the body waits, moved on each time it waits again after
    /// bytes arrived.
    timer: Option<Pin<Box<Sleep>>>,
    quiet: Quiet,
    /// The request's streaming body, when it has one: while an attempt still sends it,
    /// the backend may be waiting for the rest before it answers on (a gRPC client
    /// stream, an upload whose progress it reports), and its silence is not counted.
    upload: Option<Arc<crate::proxy::body::Parked>>,
}

/// Where the backend's silence stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quiet {
    /// Bytes arrived since the last wait (or nothing was awaited yet).
    Talking,
    /// The body waits on the backend, and nothing has arrived since the timer was set.
    Silent,
    /// The backend stayed silent past the limit: the body ended in an error.
    TimedOut,
}

/// The backend went silent in the middle of its response body for longer than the
/// upstream's `timeouts.read`.
#[derive(Debug, thiserror::Error)]
#[error("the backend sent nothing for {0:?} in the middle of its response body")]
pub struct BodyReadTimeout(pub Duration);

#[derive(Debug)]
enum Inner {
    /// Boxed: a response is moved through several layers of async functions on its way
    /// to the client, and the codec's body state is most of its size.
    Own(Box<h1::ResponseBody>),
    Hyper(Incoming),
}

impl UpstreamBody {
    /// A body read by palisade's own codec.
    pub fn own(body: h1::ResponseBody) -> Self {
        Self::with(Inner::Own(Box::new(body)))
    }

    /// A body from hyper-util's client.
    pub fn hyper(body: Incoming) -> Self {
        Self::with(Inner::Hyper(body))
    }

    fn with(inner: Inner) -> Self {
        UpstreamBody {
            inner,
            watch: None,
            silence: None,
        }
    }

    /// Reports how the body ends to `watch`: a failure always, and with the watch's
    /// `judged_at_end` the exchange's verdict for passive health (failed or good). A body
    /// dropped before its end (the client left) reports nothing. Either way its end, or
    /// its drop, ends the request's in-flight count, which the caller handed over
    /// ([`super::InFlight::hand_over`]).
    /// The watch also brings the upstream's limit on the backend's silence mid-body.
    pub fn watch(&mut self, watch: Arc<super::BodyWatch>) {
        self.watch = Some(watch);
    }

    /// The request's streaming body: the backend's silence counts only once it is sent
    /// (after [`UpstreamBody::watch`], which brings the limit).
    pub fn waits_for_upload(&mut self, upload: Arc<crate::proxy::body::Parked>) {
        if let Some(silence) = self.silence_mut() {
            silence.upload = Some(upload);
        }
    }

    /// The silence state, made on first use; `None` without a limit.
    fn silence_mut(&mut self) -> Option<&mut Silence> {
        if self.silence.is_none() {
            let limit = self
                .watch
                .as_ref()
                .map_or(Duration::ZERO, |w| w.read_timeout);
            if limit.is_zero() {
                return None;
            }
            self.silence = Some(Box::new(Silence {
                limit,
                timer: None,
                quiet: Quiet::Talking,
                upload: None,
            }));
        }
        self.silence.as_deref_mut()
    }

    /// The body waits on the backend: starts timing its silence if it was talking, and
    /// tells whether the silence has lasted past the limit (the waker is then registered
    /// with the timer too).
    fn silent_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(silence) = self.silence_mut() else {
            return false;
        };
        let limit = silence.limit;
        if silence.quiet == Quiet::Talking {
            let Some(at) = Instant::now().checked_add(limit) else {
                return false;
            };
            match &mut silence.timer {
                Some(timer) => timer.as_mut().reset(at),
                None => silence.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            silence.quiet = Quiet::Silent;
        }
        let Some(timer) = silence.timer.as_mut() else {
            return false;
        };
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        // While the request body is on its way the silence may be the client's: it counts
        // from the body's end.
        let more = match &silence.upload {
            Some(upload) if upload.is_sending() => limit,
            Some(upload) => {
                let since = clock::coarse_ns().saturating_sub(upload.stopped_at());
                limit.saturating_sub(Duration::from_nanos(since))
            }
            None => Duration::ZERO,
        };
        if more.is_zero() {
            silence.quiet = Quiet::TimedOut;
            silence.timer = None;
            return true;
        }
        match Instant::now().checked_add(more) {
            Some(at) => {
                timer.as_mut().reset(at);
                timer.as_mut().poll(cx).is_ready()
            }
            None => false,
        }
    }

    /// Tells the watch, if any, how the body ended, and ends its request's count.
    fn ended(&mut self, error: Option<&BoxError>) {
        let Some(watch) = self.watch.take() else {
            return;
        };
        match error {
            Some(error) => watch.broke_off(error, watch.judged_at_end),
            None if watch.judged_at_end => watch.completed(),
            None => {}
        }
        watch.release();
    }

    /// The header lines palisade's own codec kept as the backend wrote them.
    pub fn raw_headers(&self) -> Option<&h1::RawHeaders> {
        match &self.inner {
            Inner::Own(body) => body.raw_headers(),
            Inner::Hyper(_) => None,
        }
    }

    /// Takes the header lines kept as written.
    pub fn take_raw_headers(&mut self) -> Option<h1::RawHeaders> {
        match &mut self.inner {
            Inner::Own(body) => body.take_raw_headers(),
            Inner::Hyper(_) => None,
        }
    }

    /// After a 101 on a plain HTTP/1.1 connection: the backend's socket, and the bytes it
    /// already sent past the head. `None` for hyper's bodies (use `hyper::upgrade::on`).
    pub fn take_upgrade(&mut self) -> Option<(TcpStream, Bytes)> {
        match &mut self.inner {
            Inner::Own(body) => body.take_upgrade(),
            Inner::Hyper(_) => None,
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.release();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self
            .silence
            .as_ref()
            .is_some_and(|s| s.quiet == Quiet::TimedOut)
        {
            return Poll::Ready(None);
        }
        let mut polled = match &mut self.inner {
            Inner::Own(body) => Pin::new(&mut **body).poll_frame(cx),
            Inner::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        };
        match polled {
            Poll::Pending if self.silent_too_long(cx) => {
                let limit = self.silence.as_ref().map_or(Duration::ZERO, |s| s.limit);
                polled = Poll::Ready(Some(Err(Box::new(BodyReadTimeout(limit)))));
            }
            Poll::Pending => {}
            Poll::Ready(_) => {
                if let Some(silence) = self.silence.as_deref_mut() {
                    silence.quiet = Quiet::Talking;
                }
            }
        }
        if let Poll::Ready(Some(Ok(frame))) = &mut polled {
            if let Some(trailers) = frame.trailers_mut() {
                crate::proxy::headers::filter_trailers(trailers);
            }
        }
        match &polled {
            Poll::Ready(Some(Err(error))) => self.ended(Some(error)),
            Poll::Ready(None) => self.ended(None),
            Poll::Ready(Some(Ok(_))) if self.watch.is_some() && self.is_end_stream() => {
                self.ended(None)
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Own(body) => body.is_end_stream(),
            Inner::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Own(body) => body.size_hint(),
            Inner::Hyper(body) => body.size_hint(),
        }
    }
}
