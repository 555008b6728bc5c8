//! palisade's own keep-alive pool for plain HTTP/1.1 backends.
//!
//! Each [`Backend`] keeps a stack of idle connections (`hyper::client::conn::http1`
//! senders). A request takes the newest idle connection (LIFO: the warm ones stay in use
//! and the cold ones age out), or opens a new one; the response body gives the connection
//! back when it has been read to the end ([`Checkin`]). Compared with hyper-util's generic
//! client this skips hashing a `(scheme, authority)` key twice per request, the global pool
//! lock, the race between checkout and connect, and the task spawned per response to wait
//! for the connection to become idle again. The lock is per backend and held only for a
//! push or a pop.
//!
//! TLS and h2c upstreams keep hyper-util's client (see [`super::client`]).

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Backend;
use crate::proxy::body::ProxyBody;

/// How long an unused connection stays open (nginx's `keepalive_timeout` is 60 s; backends
/// usually close sooner, which the pool notices).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per backend; more are closed when they are given back (nginx's
/// `keepalive` directive plays this role).
pub const MAX_IDLE: usize = 1024;

/// TCP keep-alive probes on backend connections start after this long without traffic.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

type Sender = http1::SendRequest<ProxyBody>;

struct Idle {
    tx: Sender,
    since: Instant,
}

/// The idle connections of one backend.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
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

    /// The newest idle connection that is still open and not too old.
    fn take(&self, now: Instant) -> Option<Sender> {
        loop {
            let idle = self.idle.lock().ok()?.pop()?;
            if !idle.tx.is_closed() && now.saturating_duration_since(idle.since) < IDLE_TIMEOUT {
                return Some(idle.tx);
            }
            // Closed by the backend, or idle too long: dropping the sender closes it.
        }
    }

    /// Gives a connection back for the next request (closing it when the pool is full).
    fn put(&self, tx: Sender) {
        if tx.is_closed() {
            return;
        }
        let now = Instant::now();
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        // The oldest connection sits at the bottom of the stack; retire it once it aged.
        if idle
            .first()
            .is_some_and(|old| now.saturating_duration_since(old.since) >= IDLE_TIMEOUT)
        {
            idle.remove(0);
        }
        if idle.len() < MAX_IDLE {
            idle.push(Idle { tx, since: now });
        }
    }

    /// Closes the connections that were idle for [`IDLE_TIMEOUT`] or that the backend
    /// closed (run every few seconds, so that an unused pool does not hold sockets open).
    pub fn sweep(&self) {
        let now = Instant::now();
        let stale: Vec<Idle> = match self.idle.lock() {
            Ok(mut idle) => {
                let (keep, stale) = std::mem::take(&mut *idle).into_iter().partition(|i| {
                    !i.tx.is_closed() && now.saturating_duration_since(i.since) < IDLE_TIMEOUT
                });
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
    Http(hyper::Error),
    /// hyper-util's client failed (TLS and h2c upstreams).
    Client(hyper_util::client::legacy::Error),
}

impl SendError {
    /// Whether the request never reached the backend.
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) => true,
            SendError::Http(_) => false,
            SendError::Client(e) => e.is_connect(),
        }
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Http(e) => write!(f, "{e}"),
            SendError::Client(e) => match e.source() {
                Some(cause) => write!(f, "{e}: {cause}"),
                None => write!(f, "{e}"),
            },
        }
    }
}

impl StdError for SendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            SendError::Connect(e) => Some(e),
            SendError::Http(e) => Some(e),
            SendError::Client(e) => Some(e),
        }
    }
}

/// Sends `req` (origin-form URI, Host header set) to `backend` over an idle connection of
/// its pool or a new one. A pooled connection that turns out to be closed before the
/// request was written is discarded and the request goes on the next one, so a backend
/// closing idle connections costs no failed request.
pub async fn send(
    backend: &Arc<Backend>,
    mut req: Request<ProxyBody>,
    connect_timeout: Duration,
) -> Result<Response<UpstreamBody>, SendError> {
    let now = Instant::now();
    loop {
        let (mut tx, pooled) = match backend.pool.take(now) {
            Some(tx) => (tx, true),
            // Boxed: connecting is the rare path, and its state would otherwise sit in
            // every request's future.
            None => (
                Box::pin(connect(&backend.addr, connect_timeout)).await?,
                false,
            ),
        };
        if tx.ready().await.is_err() {
            if pooled {
                continue;
            }
            return Err(SendError::Connect(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection closed before the first request",
            )));
        }
        match tx.try_send_request(req).await {
            Ok(resp) => {
                let checkin = Checkin {
                    tx,
                    backend: backend.clone(),
                };
                return Ok(resp.map(|inner| UpstreamBody::new(inner, Some(checkin))));
            }
            Err(mut e) => match e.take_message() {
                // Not written: the connection was gone already. Try the next one.
                Some(back) if pooled => req = back,
                _ => return Err(SendError::Http(e.into_error())),
            },
        }
    }
}

/// Opens a connection to `addr` (`host:port`) and starts its HTTP/1.1 driver task.
async fn connect(addr: &str, timeout: Duration) -> Result<Sender, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(SendError::Connect(e)),
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
    let (tx, conn) = http1::Builder::new()
        .handshake::<_, ProxyBody>(TokioIo::new(stream))
        .await
        .map_err(SendError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "backend connection ended with an error");
        }
    });
    Ok(tx)
}

/// A connection lent to one request, given back when its response body was read to the end.
pub struct Checkin {
    tx: Sender,
    backend: Arc<Backend>,
}

impl fmt::Debug for Checkin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkin")
            .field("backend", &self.backend.addr)
            .finish()
    }
}

/// A backend's response body; gives its connection back to the pool once read to the end.
/// A body dropped before its end takes the connection with it (hyper closes it: the rest
/// of the response is still on the wire).
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    checkin: Option<Checkin>,
}

impl UpstreamBody {
    /// Wraps a response body; `checkin` is the connection it came on, if pooled.
    pub fn new(inner: Incoming, checkin: Option<Checkin>) -> Self {
        UpstreamBody { inner, checkin }
    }

    fn give_back(&mut self) {
        if let Some(c) = self.checkin.take() {
            c.backend.pool.put(c.tx);
        }
    }

    /// Drops the connection instead of giving it back (after a protocol switch, the
    /// connection belongs to the tunnel).
    pub fn forget_connection(&mut self) {
        self.checkin = None;
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.checkin = None,
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

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body with nothing left (e.g. Content-Length: 0, 304, HEAD) is never polled.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}
