//! Listeners, the accept loop, connection limits and graceful shutdown.
//!
//! [`serve`] takes already-bound listeners and a shutdown future (mini-redis style), so
//! tests bind port 0, start it, and stop it deterministically. Each connection runs in its
//! own task: HTTP/1.x through palisade's codec ([`h1`]), HTTP/2 (ALPN or a prior-knowledge
//! preface) through hyper. A watchdog around either enforces `header_read` (a request head
//! must arrive within it once its first byte has) and `idle` (a connection with no request
//! in flight and no bytes moving is closed). On
//! shutdown the listeners close first, then every connection finishes gracefully:
//! in-flight HTTP/1 requests complete with `Connection: close`, HTTP/2 connections get
//! GOAWAY, and idle HTTP/1 keep-alive connections get [`DRAIN_GRACE`] to send one more
//! request (answered with `Connection: close`) so that a client mid-send does not race the
//! close. `serve` returns once all are gone or `server.timeouts.shutdown` has passed.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::clock::{coarse_ns, instant_at, nanos, now_ns};

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod h1;
pub mod handover;
pub mod tunnel;
use crate::proxy::{self, ConnInfo};
use crate::snapshot::ProxyState;

/// While draining, how long an idle HTTP/1 keep-alive connection stays open for the
/// client's next request (answered with `Connection: close`) before it is closed.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// How often a listen address that a reload asked for, but that could not be bound (the
/// port still taken), is tried again.
pub const REBIND_EVERY: Duration = Duration::from_secs(1);

/// The open connections of one server, for evicting idle ones at `max_connections`.
type Registry = Arc<std::sync::Mutex<HashMap<u64, Arc<Activity>>>>;

/// Asks the connection with no request in flight that has been quiet longest to close.
/// Returns false when every connection is busy.
fn evict_oldest_idle(registry: &Registry) -> bool {
    let Ok(conns) = registry.lock() else {
        return false;
    };
    let oldest = conns
        .values()
        .filter(|a| {
            a.in_flight.load(Ordering::Relaxed) == 0
                && !a.tunnel.load(Ordering::Relaxed)
                && !a.evicted.load(Ordering::Relaxed)
        })
        .min_by_key(|a| a.last_io.load(Ordering::Relaxed));
    match oldest {
        Some(activity) => {
            activity.evicted.store(true, Ordering::Relaxed);
            activity.evict.notify_one();
            true
        }
        None => false,
    }
}

/// Binds a listener with SO_REUSEADDR and SO_REUSEPORT, so a new palisade process can start
/// on the same port while the old one drains.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_with(addr, true)
}

/// Binds a listener without SO_REUSEPORT: a port another process holds is an error
/// ("Address already in use"), for `demo` and `echo`, which have no restart to make
/// room for (a second demo used to share every port with the first, silently).
pub fn bind_exclusive(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_with(addr, false)
}

fn bind_with(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if let SocketAddr::V6(v6) = addr {
        // `[::]` takes IPv4 clients too, whatever the host's `net.ipv6.bindv6only` says
        // (HAProxy's and Linux's usual default; nginx and Envoy need `ipv6only=off`).
        if v6.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// A bound listener, plain or TLS.
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    pub socket: TcpListener,
    /// For a TLS listener: the `[[server.tls]]` listen address its certificates are
    /// configured under (the socket may be bound elsewhere, e.g. port 0 in tests).
    pub tls: Option<SocketAddr>,
}

impl Listener {
    /// A plain HTTP listener.
    pub fn plain(socket: TcpListener) -> Self {
        Listener { socket, tls: None }
    }
}

/// Serves proxy traffic on `listeners` until `shutdown` resolves, then drains.
pub async fn serve(
    listeners: Vec<TcpListener>,
    state: Arc<ProxyState>,
    shutdown: impl Future<Output = ()>,
) {
    let listeners = listeners.into_iter().map(Listener::plain).collect();
    serve_inner(listeners, state, shutdown, Mode::Fixed).await;
}

/// Serves plain and TLS listeners until `shutdown` resolves, then drains.
pub async fn serve_listeners(
    listeners: Vec<Listener>,
    state: Arc<ProxyState>,
    shutdown: impl Future<Output = ()>,
) {
    serve_inner(listeners, state, shutdown, Mode::Fixed).await;
}

/// Like [`serve_listeners`], and the plain listeners follow `server.listen`: a reload that
/// adds an address opens it, one that removes an address closes it (its open connections
/// carry on). TLS listeners stay as started; their certificates follow reloads. The
/// listeners are offered to a replacing process under `offers` ([`handover`]: one name
/// per listen address), and the names follow reloads that add and remove addresses.
pub async fn serve_managed(
    listeners: Vec<Listener>,
    state: Arc<ProxyState>,
    offers: Vec<handover::Offer>,
    shutdown: impl Future<Output = ()>,
) {
    serve_inner(listeners, state, shutdown, Mode::Managed(offers)).await;
}

/// Whether the listeners follow the config ([`serve_managed`]).
enum Mode {
    /// The listeners given, until the end.
    Fixed,
    /// Listeners follow `server.listen` and are offered for hand-over, first under these.
    Managed(Vec<handover::Offer>),
}

async fn serve_inner(
    listeners: Vec<Listener>,
    state: Arc<ProxyState>,
    shutdown: impl Future<Output = ()>,
    mode: Mode,
) {
    let (managed, first_offers) = match mode {
        Mode::Managed(offers) => (true, offers),
        Mode::Fixed => (false, Vec::new()),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone of `done_tx`; when all are dropped, `recv`
    // returns None: all connections are gone.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    // Keyed by the configured address and whether it is a TLS one: a reload opens and
    // closes both kinds.
    let mut accept_tasks: HashMap<(SocketAddr, bool), JoinHandle<()>> = HashMap::new();
    let registry: Registry = Arc::default();
    // The listening sockets a replacing process may take over (see `handover`).
    let offered: handover::Offered = Arc::default();
    let spawn = |socket: TcpListener, tls: Option<SocketAddr>| {
        let socket = Arc::new(socket);
        if managed {
            if let (Ok(addr), Ok(mut offered)) = (socket.local_addr(), offered.lock()) {
                offered.insert((tls.unwrap_or(addr), tls.is_some()), socket.clone());
            }
        }
        tokio::spawn(accept_loop(
            socket,
            state.clone(),
            stop_rx.clone(),
            done_tx.clone(),
            registry.clone(),
            tls,
        ))
    };
    for listener in listeners {
        let Ok(addr) = listener.socket.local_addr() else {
            continue;
        };
        let key = (listener.tls.unwrap_or(addr), listener.tls.is_some());
        accept_tasks.insert(key, spawn(listener.socket, listener.tls));
    }
    // Offered under every listen address, which a reload may add and remove: one task
    // per name.
    let handed_over = Arc::new(AtomicBool::new(false));
    let offer = |offer: handover::Offer| {
        let name = offer.name().to_owned();
        let task = handover::serve(offer, offered.clone(), stop_rx.clone(), handed_over.clone());
        (name, tokio::spawn(task))
    };
    let mut offering: HashMap<String, JoinHandle<()>> =
        first_offers.into_iter().map(offer).collect();
    let mut changes = state.subscribe();
    // Addresses a reload asked for that could not be bound (each logged once): tried
    // again every REBIND_EVERY, since a reload that changes nothing else is skipped.
    let mut unbound: HashSet<(SocketAddr, bool)> = HashSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            changed = changes.changed(), if managed => {
                if changed.is_err() {
                    continue;
                }
            }
            () = tokio::time::sleep(REBIND_EVERY), if !unbound.is_empty() => {}
        }
        let wanted: HashSet<(SocketAddr, bool)> = {
            let snapshot = state.snapshot();
            let server = &snapshot.config.server;
            let plain = server.listen.iter().map(|&addr| (addr, false));
            plain
                .chain(server.tls.iter().map(|t| (t.listen, true)))
                .collect()
        };
        accept_tasks.retain(|&(addr, tls), task| {
            let keep = wanted.contains(&(addr, tls));
            if !keep {
                tracing::info!(%addr, tls, "listen address removed: closing the listener");
                task.abort();
                if let Ok(mut offered) = offered.lock() {
                    offered.remove(&(addr, tls));
                }
            }
            keep
        });
        unbound.retain(|key| wanted.contains(key));
        for (addr, tls) in wanted {
            if accept_tasks.contains_key(&(addr, tls)) {
                continue;
            }
            match bind(addr) {
                Ok(listener) => {
                    // The address bound: port 0 becomes the port the kernel chose.
                    match listener.local_addr() {
                        Ok(bound) => {
                            tracing::info!(addr = %bound, tls, "listen address added: listening")
                        }
                        Err(_) => tracing::info!(%addr, tls, "listen address added: listening"),
                    }
                    accept_tasks.insert((addr, tls), spawn(listener, tls.then_some(addr)));
                    unbound.remove(&(addr, tls));
                }
                Err(e) => {
                    if unbound.insert((addr, tls)) {
                        tracing::error!(%addr, tls, error = %e, "cannot listen on the new address; trying again every second");
                    }
                }
            }
        }
        if managed {
            let names: HashSet<String> = handover::names(&state.snapshot().config)
                .into_iter()
                .collect();
            // A dropped address releases its name: aborting the task closes its socket.
            offering.retain(|name, task| {
                let keep = names.contains(name);
                if !keep {
                    task.abort();
                }
                keep
            });
            for name in names {
                if !offering.contains_key(&name) {
                    let (name, task) = offer(handover::Offer::claim(name));
                    offering.insert(name, task);
                }
            }
        }
    }
    drop(done_tx);

    state.start_draining();
    let _ = stop_tx.send(true);
    // The hand-over stops first: a process that took the sockets over keeps them open.
    for task in offering.into_values() {
        let _ = task.await;
    }
    if let Ok(mut offered) = offered.lock() {
        offered.clear();
    }
    // Only where a replacing instance could take the queued connections: fixed listeners
    // (the demo's, bound alone) have none, and the advice would be noise there.
    if managed && !handed_over.load(Ordering::Relaxed) {
        warn_if_queued_connections_would_reset();
    }
    for task in accept_tasks.into_values() {
        task.abort();
        let _ = task.await;
    }
    let limit = state.snapshot().config.server.timeouts.shutdown;
    let open = state.connections.load(Ordering::Relaxed);
    tracing::info!(open_connections = open, "draining");
    if tokio::time::timeout(limit, done_rx.recv()).await.is_err() {
        tracing::warn!(
            open_connections = state.connections.load(Ordering::Relaxed),
            "shutdown timeout reached; closing the remaining connections"
        );
    }
}

/// Linux resets the connections still waiting in a closing listener's accept queue unless
/// `net.ipv4.tcp_migrate_req` = 1 hands them to another SO_REUSEPORT listener on the same
/// port (the instance that replaces this one). Says so (at info: a plain Ctrl-C needs no
/// warning) when it matters: at the drain of `run` ([`serve_managed`]), whose listeners
/// share their ports with a replacing instance; not for the demo.
fn warn_if_queued_connections_would_reset() {
    const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    if let Ok(value) = std::fs::read_to_string(SYSCTL) {
        if value.trim() == "0" {
            tracing::info!(
                "net.ipv4.tcp_migrate_req = 0: connections queued on the closing listeners \
                 are reset, not handed to a replacing instance; for zero-downtime restarts \
                 set it to 1 (see README, Running several instances)"
            );
        }
    }
}

async fn accept_loop(
    listener: Arc<TcpListener>,
    state: Arc<ProxyState>,
    stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
    registry: Registry,
    tls: Option<SocketAddr>,
) {
    let mut next_id: u64 = 0;
    // The connection settings follow reloads: rebuilt when the generation changes.
    let mut generation = 0;
    let mut builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    // Connections refused at max_connections since the last warning, and when that was:
    // one warning a second at most (a flood would otherwise write a line per connection).
    let mut refused: u64 = 0;
    let mut warned: Option<Instant> = None;
    // The same for failed accepts.
    let mut accept_failures: u64 = 0;
    let mut accept_warned: Option<Instant> = None;
    let evictions = state.metrics.connections_evicted();
    let refusals = state.metrics.connections_refused(
        &listener
            .local_addr()
            .map_or_else(|_| String::new(), |a| a.to_string()),
    );
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning, and say so
                // once a second at most (a line per retry would flood the log).
                accept_failures += 1;
                if accept_warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(error = %e, failures = accept_failures, "accept failed; retrying every 50ms (out of file descriptors? raise the open-file limit)");
                    accept_warned = Some(Instant::now());
                    accept_failures = 0;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // An IPv4 client of a dual-stack `[::]` listener arrives as `::ffff:a.b.c.d`: it is
        // that IPv4 address everywhere (logs, X-Forwarded-For, allow lists, rate limits).
        let peer = SocketAddr::new(crate::limit::client_ip::normalise(peer.ip()), peer.port());
        let snapshot = state.snapshot();
        if snapshot.generation != generation {
            generation = snapshot.generation;
            builder = Arc::new(connection_builder(&snapshot.config));
        }
        let limits = ConnLimits::of(&snapshot.config);
        drop(snapshot);
        let open = state.connections.fetch_add(1, Ordering::Relaxed);
        // At the cap, the longest-idle connection makes room; with none idle, the new
        // connection is refused.
        let room = open < limits.max_connections || {
            let evicted = evict_oldest_idle(&registry);
            if evicted {
                evictions.inc();
            }
            evicted
        };
        if !room {
            state.connections.fetch_sub(1, Ordering::Relaxed);
            drop(stream);
            refusals.inc();
            refused += 1;
            let now = Instant::now();
            if warned.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1)) {
                tracing::warn!(
                    %peer, open, refused,
                    "max_connections reached and none idle; closing new connections (this warning: at most once a second, `refused` counts them since the last; palisade_connections_refused_total counts all)"
                );
                warned = Some(now);
                refused = 0;
            }
            continue;
        }
        next_id += 1;
        let _ = stream.set_nodelay(true);
        // Known to eviction from now on, not only once its task runs (or, for TLS, once
        // its handshake ends): a connection counted against the cap but unknown here
        // could not make room, and a new one was refused while it sent nothing.
        let activity = Arc::new(Activity::new());
        if let Ok(mut conns) = registry.lock() {
            conns.insert(next_id, activity.clone());
        }
        let registered = Registered {
            state: state.clone(),
            registry: registry.clone(),
            id: next_id,
            activity,
        };
        tokio::spawn(serve_connection(
            stream,
            peer,
            limits,
            Shared {
                state: state.clone(),
                builder: builder.clone(),
                stop: stop.clone(),
                done: done.clone(),
            },
            registered,
            tls,
        ));
    }
}

/// Concurrent streams an HTTP/2 client may open on one connection (nginx's
/// `http2_max_concurrent_streams`; Envoy recommends 100).
const H2_MAX_STREAMS: u32 = 128;

/// Bytes of an answer hyper buffers per HTTP/2 stream beyond what the client's window
/// lets out (hyper's default is 400 KiB). A client that opens every stream and reads
/// nothing pins this much per stream, plus the one chunk in hand (up to 64 KiB): with
/// hyper's default and 256 streams one such connection held about 190 MB; with these
/// settings about 18 MB (nginx: about 6 MB). Downloads are no slower: h2load with 32
/// concurrent 1 MiB answers moved 550-700 MB/s either way.
const H2_SEND_BUFFER: usize = 16 * 1024;

/// hyper's connection settings for `config` (HTTP/2 only: HTTP/1.x is palisade's codec).
///
/// The h2 layer takes request heads up to twice `max_header_bytes`: it would refuse one
/// over the limit itself with a bare 431 (no `Proxy-Status`, no body, no access line), so
/// the handler checks the limit instead and gives palisade's own 431
/// ([`crate::proxy::handler`]). Only heads over twice the limit still get h2's answer.
fn connection_builder(config: &crate::config::Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let limits = &config.server.limits;
    let h2_limit = limits.max_header_bytes.saturating_mul(2);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(h2_limit).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_send_buf_size(H2_SEND_BUFFER);
    builder
}

/// The per-connection limits, read from the snapshot when the connection is accepted.
#[derive(Debug, Clone, Copy)]
struct ConnLimits {
    max_connections: usize,
    header_read: Duration,
    idle: Duration,
    /// The largest HTTP/1 request head.
    max_head: usize,
}

impl ConnLimits {
    fn of(config: &crate::config::Config) -> Self {
        let server = &config.server;
        ConnLimits {
            max_connections: server.limits.max_connections,
            header_read: server.timeouts.header_read,
            idle: server.timeouts.idle,
            max_head: server.limits.max_header_bytes,
        }
    }
}

/// What every connection of one server shares.
struct Shared {
    state: Arc<ProxyState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stop: watch::Receiver<bool>,
    /// Held until the connection ends (drain waits for all of them).
    done: mpsc::Sender<()>,
}

/// A connection as the server knows it (counted, and in the registry), until dropped
/// however the connection ends.
struct Registered {
    state: Arc<ProxyState>,
    registry: Registry,
    id: u64,
    activity: Arc<Activity>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut conns) = self.registry.lock() {
            conns.remove(&self.id);
        }
        self.state.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    limits: ConnLimits,
    shared: Shared,
    registered: Registered,
    tls: Option<SocketAddr>,
) {
    match tls {
        None => {
            serve_io(
                ClientIo::Plain(stream),
                peer,
                "http",
                limits,
                shared,
                registered,
                false,
            )
            .await
        }
        // Boxed: a TLS connection's state (the handshake, rustls' connection) is larger
        // than a plain one's, and unboxed every plain connection's task would be that size.
        Some(tls_addr) => {
            Box::pin(serve_tls(
                stream, peer, limits, shared, registered, tls_addr,
            ))
            .await
        }
    }
}

async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    limits: ConnLimits,
    shared: Shared,
    registered: Registered,
    tls_addr: SocketAddr,
) {
    let activity = &registered.activity;
    let Some(config) = shared.state.tls_config(tls_addr) else {
        tracing::warn!(%peer, addr = %tls_addr, "no TLS configuration for this listener; closing");
        return;
    };
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    // A connection still shaking hands has sent no request: at max_connections it makes
    // room like an idle one.
    let outcome = tokio::select! {
        done = tokio::time::timeout(limits.header_read, handshake) => done,
        () = activity.evict.notified() => {
            tracing::debug!(%peer, "closing a connection in its TLS handshake to make room under max_connections");
            return;
        }
    };
    match outcome {
        Ok(Ok(tls_stream)) => {
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let io = ClientIo::Tls(Box::new(tls_stream));
            // The request head is owed within header_read of the handshake's end.
            activity.handshake_done();
            serve_io(io, peer, "https", limits, shared, registered, h2).await
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake not finished within header_read"),
    }
}

/// Serves one connection: HTTP/1.x with palisade's codec ([`h1`]), HTTP/2 (ALPN `h2`, or
/// a prior-knowledge preface) with hyper; and watches it for the timeouts and the drain.
async fn serve_io(
    stream: ClientIo,
    peer: SocketAddr,
    proto: &'static str,
    limits: ConnLimits,
    shared: Shared,
    registered: Registered,
    alpn_h2: bool,
) {
    let activity = registered.activity.clone();
    let Shared {
        state,
        builder,
        mut stop,
        done: _done,
    } = shared;
    let io = TrackedIo {
        inner: stream,
        activity: activity.clone(),
    };
    let info = ConnInfo {
        peer,
        proto,
        seen: None,
    };
    let conn = serve_protocols(
        io,
        info,
        state.clone(),
        activity.clone(),
        builder,
        alpn_h2,
        limits.max_head,
    );
    tokio::pin!(conn);

    // `draining`: the server is stopping; `closing`: the connection was asked to close
    // gracefully.
    let mut draining = *stop.borrow();
    let mut closing = false;
    let watchdog = tokio::time::sleep(limits.idle.min(limits.header_read));
    tokio::pin!(watchdog);
    // Accepted just before the listener closed: its request is on its way (closing now
    // would reset it), so it gets the grace an idle keep-alive connection gets. Boxed, and
    // only when draining: it would otherwise add 112 bytes to every connection's task.
    let mut grace: Option<Pin<Box<tokio::time::Sleep>>> =
        draining.then(|| Box::pin(tokio::time::sleep(DRAIN_GRACE)));
    // Made once and polled until they fire: a `changed()` or `notified()` made anew for
    // every poll registered with, and then left, a waiter list under its lock each time,
    // and the shutdown watch's lists are shared by every connection.
    let stop_changed = stop.changed();
    tokio::pin!(stop_changed);
    let evicted = activity.evict.notified();
    tokio::pin!(evicted);
    // The watchers are polled with a waker of their own, and only after it was woken:
    // the connection's task wakes a few times per request for its I/O, and polling the
    // watchers each time cost about 1k instructions per request.
    let watch = Arc::new(WatchWaker {
        woken: AtomicBool::new(true),
        task: std::sync::Mutex::new(Waker::noop().clone()),
    });
    let watch_waker = Waker::from(watch.clone());
    let mut task_waker: Option<Waker> = None;
    std::future::poll_fn(|cx| {
        if conn.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if !task_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            task_waker = Some(cx.waker().clone());
            if let Ok(mut task) = watch.task.lock() {
                task.clone_from(cx.waker());
            }
            watch.woken.store(true, Ordering::Release);
        }
        let mut wcx = Context::from_waker(&watch_waker);
        // Loaded first: most polls find nothing woken, and a load is not a locked
        // read-modify-write (two per request, ~6 ns each here).
        while watch.woken.load(Ordering::Acquire) && watch.woken.swap(false, Ordering::AcqRel) {
            // Not polled again once it has fired: `draining` stays set.
            let stopped = if draining {
                Poll::Pending
            } else {
                stop_changed.as_mut().poll(&mut wcx)
            };
            if let Poll::Ready(changed) = stopped {
                draining = true;
                let busy = activity.h2.load(Ordering::Relaxed)
                    || activity.tunnel.load(Ordering::Relaxed)
                    || activity.in_flight.load(Ordering::Relaxed) > 0;
                if changed.is_ok() && busy {
                    // HTTP/2 says GOAWAY (race-free by design); an HTTP/1 request in
                    // flight gets `Connection: close` on its answer.
                    closing = true;
                    if activity.request_close() {
                        return Poll::Ready(());
                    }
                } else if changed.is_ok() {
                    // An idle HTTP/1 connection: closing it now races a client that is
                    // sending its next request. Its next answer says `Connection: close`;
                    // one that stays quiet is closed after DRAIN_GRACE.
                    grace = Some(Box::pin(tokio::time::sleep(DRAIN_GRACE)));
                    watch.woken.store(true, Ordering::Release);
                }
            }
            if grace
                .as_mut()
                .is_some_and(|g| g.as_mut().poll(&mut wcx).is_ready())
            {
                grace = None;
                if !closing {
                    closing = true;
                    if activity.request_close() {
                        return Poll::Ready(());
                    }
                }
            }
            if evicted.as_mut().poll(&mut wcx).is_ready() {
                tracing::debug!(%peer, "closing an idle connection to make room under max_connections");
                return Poll::Ready(());
            }
            if watchdog.as_mut().poll(&mut wcx).is_ready() {
                match activity.check(limits) {
                    Verdict::Fine(next) => watchdog.as_mut().reset(next.into()),
                    Verdict::HeadTooSlow => {
                        tracing::debug!(%peer, "request head not received within header_read; closing");
                        return Poll::Ready(());
                    }
                    Verdict::NotReading => {
                        tracing::debug!(%peer, "the client took none of its answer within idle; closing");
                        return Poll::Ready(());
                    }
                    Verdict::TunnelIdle => {
                        tracing::debug!(%peer, "no bytes through the tunnel within idle; closing");
                        return Poll::Ready(());
                    }
                    Verdict::Idle => {
                        tracing::debug!(%peer, "idle timeout; closing");
                        if closing {
                            return Poll::Ready(());
                        }
                        closing = true;
                        if activity.request_close() {
                            return Poll::Ready(());
                        }
                        // A graceful close that does not finish within another `idle` is
                        // forced.
                        watchdog.as_mut().reset((Instant::now() + limits.idle).into());
                    }
                }
                // Polled again, so that the timer holds the waker for its new deadline.
                watch.woken.store(true, Ordering::Release);
            }
        }
        Poll::Pending
    })
    .await;
    drop(registered);
}

/// The waker a connection's watchers (drain, eviction, timers) are polled with: it notes
/// that one of them may have fired, then wakes the connection's task.
struct WatchWaker {
    woken: AtomicBool,
    /// The connection task's waker.
    task: std::sync::Mutex<Waker>,
}

impl std::task::Wake for WatchWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Ok(task) = self.task.lock() {
            task.wake_by_ref();
        }
    }
}

/// HTTP/2 on a connection, by hyper: from the start (ALPN `h2`), or after the codec saw
/// the prior-knowledge preface (`read`: the bytes it had read).
async fn serve_protocols(
    io: TrackedIo<ClientIo>,
    info: ConnInfo,
    state: Arc<ProxyState>,
    activity: Arc<Activity>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    alpn_h2: bool,
    max_head: usize,
) {
    let (io, read) = if alpn_h2 {
        (io, bytes::Bytes::new())
    } else {
        let ctx = h1::Connection {
            state: state.clone(),
            activity: activity.clone(),
            info,
            max_head,
        };
        match h1::serve(io, ctx).await {
            h1::Outcome::Closed => return,
            h1::Outcome::H2(io, read) => (io, read),
        }
    };
    // Boxed: hyper's HTTP/2 connection state is large, and unboxed every HTTP/1
    // connection's task would be that size.
    Box::pin(serve_h2(io, read, info, state, activity, builder)).await;
}

/// HTTP/2 by hyper on `io`, whose first bytes `read` were already read.
async fn serve_h2(
    io: TrackedIo<ClientIo>,
    read: bytes::Bytes,
    info: ConnInfo,
    state: Arc<ProxyState>,
    activity: Arc<Activity>,
    builder: Arc<auto::Builder<TokioExecutor>>,
) {
    activity.h2.store(true, Ordering::Relaxed);
    let service = {
        let activity = activity.clone();
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let state = state.clone();
            let activity = activity.clone();
            // Boxed: hyper keeps the service future inside the connection.
            Box::pin(async move {
                // Owned: hyper holds the answer's body (and so the guard) past this call.
                let request = RequestGuard::new(activity);
                let req = req.map(crate::proxy::body::ClientBody::Hyper);
                let resp = proxy::handle(&state, req, &info).await;
                // hyper's HTTP/2 server writes headers from the map only.
                let (mut parts, mut body) = resp.into_parts();
                body.move_raw_headers(&mut parts.headers);
                // The request is in flight until its answer's body is sent (or the stream
                // ends otherwise), not only until the answer's head is ready.
                let body = InFlightBody::new(body, request);
                Ok::<_, Infallible>(http::Response::from_parts(parts, body))
            })
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(Rewind { read, io }), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = activity.shutdown.notified() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %info.peer, error = %e, "connection ended with an error");
    }
}

/// An HTTP/2 answer's body, holding its request's place in the connection's count of
/// requests in flight until hyper drops it (sent whole, or the stream reset), and telling
/// the connection's watchdog whether hyper keeps asking for it (see `Activity::h2_owed`).
struct InFlightBody {
    body: crate::proxy::ProxyBody,
    request: RequestGuard,
    /// Counted in `h2_owed`: handed over, and hyper has not asked for the next frame.
    owed: bool,
}

impl InFlightBody {
    fn new(body: crate::proxy::ProxyBody, request: RequestGuard) -> Self {
        // Until hyper first asks: with no window at all it never does.
        let owed = !hyper::body::Body::is_end_stream(&body);
        if owed {
            // From now: the last answer asked for may be long ago on a connection that
            // was quiet between requests.
            let activity = &request.activity;
            activity.h2_progress.store(coarse_ns(), Ordering::Relaxed);
            activity.h2_owed.fetch_add(1, Ordering::Relaxed);
        }
        InFlightBody {
            body,
            request,
            owed,
        }
    }
}

impl Drop for InFlightBody {
    fn drop(&mut self) {
        if self.owed {
            self.request
                .activity
                .h2_owed
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl hyper::body::Body for InFlightBody {
    type Data = bytes::Bytes;
    type Error = <crate::proxy::ProxyBody as hyper::body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let activity = &this.request.activity;
        activity.h2_progress.store(coarse_ns(), Ordering::Relaxed);
        // A frame handed over: hyper sends it once the window allows, then asks again.
        let owed = matches!(polled, Poll::Ready(Some(Ok(_))));
        if owed != this.owed {
            this.owed = owed;
            if owed {
                activity.h2_owed.fetch_add(1, Ordering::Relaxed);
            } else {
                activity.h2_owed.fetch_sub(1, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A client socket, plain or TLS.
pub enum ClientIo {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS (boxed: rustls' state is large, and most connections are plain).
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ClientIo {
    /// Ready when a read would find something (or the connection closed). A TLS stream
    /// is always "ready": its records may hold more than one read's worth.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ClientIo::Plain(s) => s.poll_read_ready(cx),
            ClientIo::Tls(_) => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write(cx, data),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Plain(s) => s.is_write_vectored(),
            ClientIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A socket whose first bytes were already read: they are read again first.
struct Rewind<S> {
    read: bytes::Bytes,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            let head = self.read.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What a connection has been doing, updated by its IO and its requests.
#[derive(Debug)]
pub(crate) struct Activity {
    /// Requests being handled right now.
    in_flight: AtomicU32,
    /// When bytes last moved either way.
    last_io: AtomicU64,
    /// Since when writes to the client have been waiting for room in its socket (0: they
    /// are not): a client that stops reading its answer.
    write_stalled: AtomicU64,
    /// When the first byte of a request head arrived on an otherwise quiet connection
    /// (0: not reading a head).
    head_started: AtomicU64,
    /// Asked to close once the request in flight is answered.
    close_requested: std::sync::atomic::AtomicBool,
    /// Wakes an HTTP/2 connection to say GOAWAY.
    shutdown: tokio::sync::Notify,
    /// Has carried an HTTP/2 request.
    h2: std::sync::atomic::AtomicBool,
    /// Asked to close to make room under `max_connections`.
    evict: tokio::sync::Notify,
    /// Already asked (so it is not picked twice).
    evicted: std::sync::atomic::AtomicBool,
    /// Carries a WebSocket tunnel: busy until either side closes (a drain waits for it up
    /// to `shutdown`), never evicted, closed after `idle` with no byte either way.
    tunnel: std::sync::atomic::AtomicBool,
    /// HTTP/2: answers whose body has a frame out that hyper has not asked past yet (it
    /// waits for the client's flow-control window, or the socket).
    h2_owed: AtomicU32,
    /// HTTP/2: when hyper last asked any answer's body for its next frame.
    h2_progress: AtomicU64,
}

enum Verdict {
    /// Nothing to do; look again at this time.
    Fine(Instant),
    /// A request head has been arriving for longer than `header_read`.
    HeadTooSlow,
    /// Nothing happened for `idle`.
    Idle,
    /// The client has not taken any of its answer for `idle`.
    NotReading,
    /// No byte went through a tunnel, either way, for `idle`.
    TunnelIdle,
}

impl Activity {
    fn new() -> Self {
        let now = coarse_ns();
        Activity {
            in_flight: AtomicU32::new(0),
            last_io: AtomicU64::new(now),
            write_stalled: AtomicU64::new(0),
            // A new connection owes us a request head right away.
            head_started: AtomicU64::new(now),
            close_requested: std::sync::atomic::AtomicBool::new(false),
            shutdown: tokio::sync::Notify::new(),
            h2: std::sync::atomic::AtomicBool::new(false),
            evict: tokio::sync::Notify::new(),
            evicted: std::sync::atomic::AtomicBool::new(false),
            tunnel: std::sync::atomic::AtomicBool::new(false),
            h2_owed: AtomicU32::new(0),
            h2_progress: AtomicU64::new(now),
        }
    }

    /// The TLS handshake ended: the request head is owed from now, and the connection was
    /// last active now.
    fn handshake_done(&self) {
        let now = coarse_ns();
        self.head_started.store(now, Ordering::Relaxed);
        self.last_io.store(now, Ordering::Relaxed);
    }

    /// The connection now carries a WebSocket tunnel (set before its request's guard is
    /// dropped, so that it never looks idle).
    pub(crate) fn tunnel_started(&self) {
        self.tunnel.store(true, Ordering::Relaxed);
        self.last_io.store(coarse_ns(), Ordering::Relaxed);
    }

    /// Asks the connection to close gracefully. True when it can simply be dropped now:
    /// an HTTP/1 connection with no request in flight and none arriving.
    fn request_close(&self) -> bool {
        self.close_requested.store(true, Ordering::Relaxed);
        if self.h2.load(Ordering::Relaxed) {
            self.shutdown.notify_one();
            return false;
        }
        // A tunnel has no point at which to close gracefully: it runs until either side
        // closes it, `idle` passes with no byte, or a drain's `shutdown` timeout ends it.
        if self.tunnel.load(Ordering::Relaxed) {
            return false;
        }
        self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
    }

    /// Whether the connection was asked to close.
    fn close_requested(&self) -> bool {
        self.close_requested.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard is dropped. Borrowed: an HTTP/1
    /// connection's requests end before the connection does (no reference count to move).
    fn request_started(&self) -> RequestGuard<&Self> {
        RequestGuard::new(self)
    }

    fn on_read(&self) {
        let now = coarse_ns();
        self.last_io.store(now, Ordering::Relaxed);
        // On HTTP/2 a read between requests is as likely a PING, a WINDOW_UPDATE or a
        // SETTINGS ack as the start of a request: only the first request (the connection
        // opened owing one) is held to `header_read`; after that, `idle` applies.
        if self.in_flight.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
            && !self.tunnel.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            // A load and a store, not a compare-and-swap: on HTTP/1 this field is written
            // only by the connection's own task (here, and when a request starts).
            self.head_started.store(now, Ordering::Relaxed);
        }
    }

    /// When the request head being read began to arrive (None: not reading one).
    pub(crate) fn head_started_at(&self) -> Option<Instant> {
        match self.head_started.load(Ordering::Relaxed) {
            0 => None,
            at => Some(instant_at(at)),
        }
    }

    fn on_write(&self) {
        self.last_io.store(coarse_ns(), Ordering::Relaxed);
        if self.write_stalled.load(Ordering::Relaxed) != 0 {
            self.write_stalled.store(0, Ordering::Relaxed);
        }
    }

    /// A write found no room in the client's socket.
    fn on_write_blocked(&self) {
        let _ = self.write_stalled.compare_exchange(
            0,
            coarse_ns(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn check(&self, limits: ConnLimits) -> Verdict {
        let now = now_ns();
        let header_read = nanos(limits.header_read);
        let idle = nanos(limits.idle);
        if self.tunnel.load(Ordering::Relaxed) {
            // Bytes either way pass through the client's socket, so `last_io` sees them
            // all; a client that stops reading stalls the backend's side too.
            let stalled = self.write_stalled.load(Ordering::Relaxed);
            let since = if stalled != 0 {
                stalled
            } else {
                self.last_io.load(Ordering::Relaxed)
            };
            let deadline = since.saturating_add(idle);
            if now >= deadline {
                return Verdict::TunnelIdle;
            }
            return Verdict::Fine(instant_at(deadline));
        }
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            // A request waiting for its backend may take as long as the backend's
            // response timeout; a client that takes none of its answer gets `idle`.
            let stalled = self.write_stalled.load(Ordering::Relaxed);
            if stalled != 0 {
                let deadline = stalled.saturating_add(idle);
                if now >= deadline {
                    return Verdict::NotReading;
                }
                return Verdict::Fine(instant_at(deadline));
            }
            // HTTP/2: an answer has a frame out, and hyper asked no answer for more: the
            // client gives no flow-control window (its socket may even have room, so the
            // write stall above never shows it). It holds its backends' requests.
            if self.h2_owed.load(Ordering::Relaxed) > 0 {
                let deadline = self
                    .h2_progress
                    .load(Ordering::Relaxed)
                    .saturating_add(idle);
                if now >= deadline {
                    return Verdict::NotReading;
                }
                return Verdict::Fine(instant_at(deadline.min(now.saturating_add(idle))));
            }
            return Verdict::Fine(instant_at(now.saturating_add(idle)));
        }
        let head_started = self.head_started.load(Ordering::Relaxed);
        if head_started != 0 {
            let deadline = head_started.saturating_add(header_read);
            if now >= deadline {
                return Verdict::HeadTooSlow;
            }
            return Verdict::Fine(instant_at(deadline));
        }
        let deadline = self.last_io.load(Ordering::Relaxed).saturating_add(idle);
        if now >= deadline {
            return Verdict::Idle;
        }
        Verdict::Fine(instant_at(deadline))
    }
}

/// Ends a request's count on its connection, also when the client goes away mid-request.
struct RequestGuard<A: Deref<Target = Activity> = Arc<Activity>> {
    activity: A,
}

impl<A: Deref<Target = Activity>> RequestGuard<A> {
    fn new(activity: A) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity.head_started.store(0, Ordering::Relaxed);
        RequestGuard { activity }
    }
}

impl<A: Deref<Target = Activity>> Drop for RequestGuard<A> {
    fn drop(&mut self) {
        self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.activity.last_io.store(coarse_ns(), Ordering::Relaxed);
    }
}

/// A client socket that reports its reads and writes to the connection's `Activity`.
pub struct TrackedIo<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for TrackedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.on_read();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TrackedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        match result {
            Poll::Ready(Ok(n)) if n > 0 => self.activity.on_write(),
            Poll::Pending => self.activity.on_write_blocked(),
            _ => {}
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        match result {
            Poll::Ready(Ok(n)) if n > 0 => self.activity.on_write(),
            Poll::Pending => self.activity.on_write_blocked(),
            _ => {}
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
