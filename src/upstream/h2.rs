//! HTTP/2 to the backends of `protocol = "h2c"` upstreams (prior knowledge, or over TLS
//! with `tls = true`): one multiplexed connection per backend, opened on first use and
//! opened again once it has closed. A connection that carried no request for the upstream's
//! `timeouts.idle` is closed by the pool sweeper, as idle HTTP/1.1 ones are.
//!
//! palisade keeps these connections itself instead of in hyper-util's pooled client
//! because that client takes a request URI's authority both as the address to connect to
//! and as the `:authority` it sends. The backend must get the client's host as
//! `:authority` (SPEC 3: the Host header is kept; HTTP/2 has no other place for it, and a
//! `host` field next to a differing `:authority` is malformed, RFC 9113 8.3.1), while the
//! connection goes to the backend's own address.

use std::fmt;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service as _;

use super::client::Connector;
use super::pool::SendError;
use super::Backend;
use crate::clock;
use crate::proxy::body::ProxyBody;

/// A backend's HTTP/2 connection, while one is open. Read on every request without a
/// lock (requests on several cores share it).
#[derive(Default)]
pub struct H2Conn {
    conn: ArcSwapOption<SendRequest<ProxyBody>>,
    /// When a request last went out ([`clock::coarse_ns`]).
    used: AtomicU64,
}

impl fmt::Debug for H2Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Conn")
            .field("open", &self.is_open())
            .finish()
    }
}

impl H2Conn {
    /// Lets go of the connection (it closes once its streams are done); the next request
    /// opens a new one.
    pub fn clear(&self) {
        self.conn.store(None);
    }

    /// Whether a connection is open.
    fn is_open(&self) -> bool {
        self.conn.load().as_deref().is_some_and(|c| !c.is_closed())
    }

    /// Lets go of the connection once the backend closed it, or once it had nothing in
    /// flight for `limit` (as far as these sweeps saw: a sweep that finds requests
    /// `in_flight` counts as use). Requests still holding it finish first; hyper closes
    /// it after the last one.
    pub fn sweep(&self, in_flight: u32, limit: Duration) {
        let current = self.conn.load_full();
        let Some(conn) = current.as_deref() else {
            return;
        };
        let now = clock::coarse_ns();
        if in_flight > 0 {
            self.used.store(now, Ordering::Relaxed);
        }
        let unused = now.saturating_sub(self.used.load(Ordering::Relaxed));
        if conn.is_closed() || (in_flight == 0 && unused >= clock::nanos(limit)) {
            // Only this connection: one a request opened meanwhile stays.
            self.conn.compare_and_swap(&current, None);
        }
    }

    /// The connection, if one is open.
    fn open(&self) -> Option<SendRequest<ProxyBody>> {
        self.conn
            .load()
            .as_deref()
            .filter(|c| !c.is_closed())
            .cloned()
    }

    fn keep(&self, sender: &SendRequest<ProxyBody>) {
        self.conn.store(Some(Arc::new(sender.clone())));
    }
}

/// Sends `req` (an absolute URI whose authority is the host the backend is to see) to
/// `backend` over its connection, or a new one through `connector` (`scheme` says whether
/// TLS). A request that a reused connection gave back unsent (it was closing) goes on a
/// new connection.
pub async fn send(
    backend: &Backend,
    connector: &Connector,
    scheme: &Scheme,
    mut req: Request<ProxyBody>,
) -> Result<Response<Incoming>, SendError> {
    loop {
        backend.h2.used.store(clock::coarse_ns(), Ordering::Relaxed);
        let (mut sender, reused) = match backend.h2.open() {
            Some(sender) => (sender, true),
            // Boxed: connecting is the rare path.
            None => {
                let sender = Box::pin(connect(backend, connector, scheme)).await?;
                backend.h2.keep(&sender);
                (sender, false)
            }
        };
        match sender.try_send_request(req).await {
            Ok(resp) => return Ok(resp),
            Err(mut failed) => match failed.take_message() {
                Some(unsent) if reused => {
                    backend.h2.clear();
                    req = unsent;
                }
                // Nothing was sent: as good as a connection that could not be made.
                Some(_) => return Err(SendError::H2Connect(failed.into_error().into())),
                None => {
                    let error = failed.into_error();
                    if refused_unprocessed(&error) {
                        // The connection is closing: the next request opens a new one.
                        backend.h2.clear();
                        return Err(SendError::H2Refused(error));
                    }
                    return Err(SendError::H2(error));
                }
            },
        }
    }
}

/// Whether the backend gave the stream back without processing it: a graceful GOAWAY
/// (NO_ERROR) names a last stream below this one (h2 reports exactly those streams so;
/// streams it goes on processing end normally, or with an I/O error if the connection
/// drops), or the stream was reset with REFUSED_STREAM. A GOAWAY with an error code is
/// not taken as proof: h2 reports it to every stream left when the connection ends.
fn refused_unprocessed(error: &hyper::Error) -> bool {
    std::iter::successors(std::error::Error::source(error), |&cause| cause.source())
        .find_map(|cause| cause.downcast_ref::<h2::Error>())
        .is_some_and(|h2| {
            h2.is_remote()
                && match h2.reason() {
                    Some(h2::Reason::NO_ERROR) => h2.is_go_away(),
                    Some(h2::Reason::REFUSED_STREAM) => h2.is_reset(),
                    _ => false,
                }
        })
}

/// Opens an HTTP/2 connection to `backend` (to its address; requests name the host in
/// their URI). Health probes open theirs here too.
pub async fn connect<B>(
    backend: &Backend,
    connector: &Connector,
    scheme: &Scheme,
) -> Result<SendRequest<B>, SendError>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let target = Uri::builder()
        .scheme(scheme.clone())
        .authority(backend.authority.clone())
        .path_and_query(PathAndQuery::from_static("/"))
        .build()
        .map_err(|e| SendError::H2Connect(e.into()))?;
    let mut connector = connector.clone();
    poll_fn(|cx| connector.poll_ready(cx))
        .await
        .map_err(SendError::H2Connect)?;
    let io = connector.call(target).await.map_err(SendError::H2Connect)?;
    let (sender, connection) = Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(io)
        .await
        .map_err(|e| SendError::H2Connect(e.into()))?;
    let addr = backend.addr.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(backend = %addr, error = %e, "HTTP/2 connection to the backend ended");
        }
    });
    Ok(sender)
}
