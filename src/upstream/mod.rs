//! Upstream pools: the backends of one `[upstreams.NAME]`, how to pick one, how to reach it.
//!
//! Discovery (the backend list), selection (`balance`) and health (`Backend::healthy`, set by
//! the health module) are independent pieces; a pool only ties them together for a snapshot.

pub mod backend;
pub mod budget;
pub mod client;
pub mod h1;
pub mod h2;
pub mod pool;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Version};
use tokio::sync::Notify;

use crate::balance::{self, Balance};
use crate::config;
use crate::dns::Resolved;
use crate::metrics::{CodeCounters, Metrics};
pub use backend::{Backend, InFlight};
pub use budget::RetryBudget;
pub use client::HttpClient;

/// One upstream as the hot path sees it: immutable for the life of a snapshot, except for
/// the backends' atomics.
#[derive(Debug)]
pub struct Upstream {
    /// The upstream's name (the key under `[upstreams]`).
    pub name: Arc<str>,
    /// Its backends, in config order.
    pub backends: Vec<Arc<Backend>>,
    /// The selection algorithm, built for `backends`.
    pub balancer: Box<dyn Balance>,
    /// hyper-util's pooled client, for HTTPS upstreams.
    pub client: HttpClient,
    /// How the client and the h2c connections ([`h2`]) reach a backend.
    pub connector: client::Connector,
    /// The TLS names of the backends' addresses, which `connector` asks (shared with it).
    pub server_names: client::ServerNames,
    /// Plain HTTP/1.1: requests go through the backends' own pools ([`pool`]) instead of
    /// `client`, with origin-form URIs.
    pub direct: bool,
    /// The HTTP version of upstream requests (1.1, or 2 for h2c).
    pub version: Version,
    /// `https` with `tls = true`, else `http`.
    pub scheme: http::uri::Scheme,
    /// The upstream's configuration, as validated.
    pub config: config::Upstream,
    /// Limits retries to a share of the request rate (carried over reloads).
    pub budget: Arc<RetryBudget>,
    /// Per-backend in-flight cap (u32::MAX without a queue).
    cap: u32,
    /// Woken when a backend drops below its cap (queue only).
    slot_freed: Arc<Notify>,
    /// Requests waiting in the queue right now.
    pub queued: AtomicU32,
    /// Whether the last pick found no healthy backend: the log says when a pick enters
    /// or leaves panic mode (`/status` and metrics read [`Upstream::in_panic`] instead).
    panic_logged: AtomicBool,
    /// Picks made in panic mode, ever.
    pub panic_picks: AtomicU64,
    /// `palisade_upstream_requests_total` handles, one per backend (same order).
    pub backend_metrics: Vec<CodeCounters>,
    /// `palisade_retries_total` for this upstream.
    pub retries: prometheus::IntCounter,
    /// What a response body reports to when it breaks off, one per backend (same order).
    pub body_watches: Vec<[Arc<BodyWatch>; 2]>,
}

/// Where a backend's response body reports a failure after the head was passed on (a
/// reset, an early close, a chunked body cut short): the backend, its upstream's passive
/// health settings and the counter. Built with the snapshot, so a response carries it
/// for the price of one reference count.
#[derive(Debug)]
pub struct BodyWatch {
    upstream: Arc<str>,
    backend: Arc<Backend>,
    passive: Option<config::Passive>,
    errors: prometheus::IntCounter,
    /// The upstream's queue, woken when a body ends and frees its backend's slot.
    slot_freed: Option<Arc<Notify>>,
    /// Whether the exchange's passive-health verdict waits for the body's end (one watch
    /// of each kind per backend, so a response carries a single pointer).
    pub judged_at_end: bool,
    /// The upstream's `timeouts.read`: the longest the backend may go silent in the
    /// middle of a response body (zero: no limit).
    pub read_timeout: std::time::Duration,
}

impl BodyWatch {
    /// The backend broke off its response body with `error`: one warning, one in
    /// `palisade_upstream_body_errors_total`, and unless its answer was judged a failure
    /// already (a 5xx), one failure for passive health and `/status`. Only the backend's
    /// side ends a body in an error: a client that leaves drops the body unread, which
    /// reports nothing.
    pub fn broke_off(&self, error: &dyn std::fmt::Display, count_failure: bool) {
        self.errors.inc();
        tracing::warn!(
            upstream = %self.upstream, backend = %self.backend.addr, %error,
            "backend broke off its response body; the client got a truncated response"
        );
        if count_failure {
            crate::health::record_live(&self.upstream, &self.backend, self.passive.as_ref(), false);
        }
    }

    /// The response's body ended (read whole, broken off, or dropped): its request is no
    /// longer in flight to the backend (least_conn, the queue's cap and
    /// `palisade_backend_in_flight` count a request until then, as nginx and HAProxy do).
    pub fn release(&self) {
        self.backend.finished();
        if let Some(queue) = &self.slot_freed {
            queue.notify_one();
        }
    }

    /// A good answer's body arrived whole: the exchange counts as a success.
    pub fn completed(&self) {
        crate::health::record_live(&self.upstream, &self.backend, self.passive.as_ref(), true);
    }
}

/// Why no backend could be had for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// The upstream has no backends at all.
    NoBackends,
    /// Every backend is at its in-flight cap and the queue is full, or the wait timed out.
    QueueFull,
    /// The backends with room are all barred to this request (their TLS handshakes
    /// failed): no backend it may use is reachable.
    Barred,
}

/// A request's place in an upstream's queue: counted in when taken (the caller adds it),
/// counted out when dropped.
struct QueuePlace<'a>(&'a AtomicU32);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The backends a request already tried (the first [`Tried::REMEMBERED`] different ones
/// are remembered), and those it may not try again (as many again).
#[derive(Debug, Clone, Copy)]
pub struct Tried {
    list: [u32; Tried::REMEMBERED],
    len: u8,
    /// The backend tried last ([`NONE`] before the first attempt).
    last: u32,
    /// Backends whose TLS handshake failed: they would fail again.
    barred: [u32; Tried::REMEMBERED],
    barred_len: u8,
}

/// No backend.
const NONE: u32 = u32::MAX;

impl Default for Tried {
    fn default() -> Tried {
        Tried {
            list: [NONE; Tried::REMEMBERED],
            len: 0,
            last: NONE,
            barred: [NONE; Tried::REMEMBERED],
            barred_len: 0,
        }
    }
}

impl Tried {
    /// How many different backends are remembered as tried, and as barred.
    pub const REMEMBERED: usize = 8;

    /// Remembers backend `i` (once, however often it is tried) as the one tried last.
    pub fn push(&mut self, i: usize) {
        let i = i as u32;
        self.last = i;
        let len = usize::from(self.len);
        if len < self.list.len() && !self.list[..len].contains(&i) {
            self.list[len] = i;
            self.len += 1;
        }
    }

    /// Whether backend `i` was tried.
    pub fn contains(&self, i: usize) -> bool {
        self.list[..usize::from(self.len)].contains(&(i as u32))
    }

    /// The backend tried last.
    pub fn last(&self) -> Option<usize> {
        (self.last != NONE).then_some(self.last as usize)
    }

    /// Bars the backend tried last: no later attempt of the request goes to it.
    pub fn bar_last(&mut self) {
        let len = usize::from(self.barred_len);
        if self.last != NONE && len < self.barred.len() && !self.is_barred(self.last as usize) {
            self.barred[len] = self.last;
            self.barred_len += 1;
        }
    }

    /// Whether any backend is barred.
    pub fn any_barred(&self) -> bool {
        self.barred_len != 0
    }

    /// Whether backend `i` is barred.
    pub fn is_barred(&self, i: usize) -> bool {
        self.barred_len != 0 && self.barred[..usize::from(self.barred_len)].contains(&(i as u32))
    }
}

impl Upstream {
    /// Builds the pool for `cfg`. Backends, and the client with its open connections, are
    /// carried over from `previous` (the same upstream in the running snapshot) where they
    /// are unchanged, so a reload keeps their live state.
    /// Backend names with an entry in `resolved` become one backend per address.
    pub fn build(
        cfg: &config::Upstream,
        previous: Option<&Upstream>,
        resolved: &Resolved,
        metrics: &Metrics,
    ) -> Upstream {
        let mut backends: Vec<Arc<Backend>> = Vec::with_capacity(cfg.backends.len());
        for b in &cfg.backends {
            let addrs: Vec<String> = match resolved.get(&b.addr) {
                Some(list) if !list.is_empty() => list.iter().map(|a| a.to_string()).collect(),
                _ => vec![b.addr.clone()],
            };
            for addr in addrs {
                if backends.iter().any(|x| *x.addr == *addr) {
                    continue;
                }
                // Kept only under the same name too: the name is its Host and TLS name.
                // A new weight is no new backend: it keeps its counters, health and
                // requests in flight (SPEC: backends that stay keep their state).
                let kept = previous.and_then(|p| {
                    p.backends
                        .iter()
                        .find(|old| *old.addr == *addr && old.host.as_str() == b.addr)
                });
                backends.push(match kept {
                    Some(old) => {
                        // Only snapshots about to serve are built: the old one's requests
                        // may see the new weight too, which is harmless.
                        old.weight.store(b.weight.max(1), Ordering::Relaxed);
                        old.clone()
                    }
                    None => Arc::new(Backend::named(&addr, &b.addr, b.weight)),
                });
            }
        }
        for b in &backends {
            b.pool.set_idle_limit(cfg.timeouts.idle);
        }
        let (client, connector, server_names) = match previous {
            Some(p)
                if p.config.protocol == cfg.protocol
                    && p.config.timeouts.connect == cfg.timeouts.connect
                    && p.config.timeouts.idle == cfg.timeouts.idle
                    && p.config.tls == cfg.tls =>
            {
                let client = if renames_an_address(cfg, p, &backends) {
                    // hyper-util's pool is keyed by the address alone: its idle
                    // connections there were opened (SNI, verified name) for the old name.
                    client::build(cfg, p.connector.clone())
                } else {
                    p.client.clone()
                };
                (client, p.connector.clone(), p.server_names.clone())
            }
            _ => {
                // Connections opened under the old transport settings are not reused.
                for b in &backends {
                    b.pool.clear();
                    b.h2.clear();
                }
                let names = client::ServerNames::default();
                let connector = client::connector(cfg, cfg.timeouts.connect, &names);
                (client::build(cfg, connector.clone()), connector, names)
            }
        };
        // The connector may be the previous snapshot's: its table follows the addresses.
        server_names.update(&backends);
        let balancer = balance::build(algorithm(cfg.balance), &backends);
        let slot_freed = Arc::new(Notify::new());
        let budget = match previous {
            Some(p) if p.config.retry.budget_percent == cfg.retry.budget_percent => {
                p.budget.clone()
            }
            _ => Arc::new(RetryBudget::new(cfg.retry.budget_percent)),
        };
        Upstream {
            name: cfg.name.as_str().into(),
            balancer,
            client,
            connector,
            server_names,
            direct: cfg.protocol == config::Protocol::Http1 && cfg.tls.is_none(),
            scheme: if cfg.tls.is_some() {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            version: match cfg.protocol {
                config::Protocol::Http1 => Version::HTTP_11,
                config::Protocol::H2c => Version::HTTP_2,
            },
            config: cfg.clone(),
            budget,
            cap: cfg
                .queue
                .as_ref()
                .map_or(u32::MAX, |q| q.max_in_flight_per_backend),
            slot_freed: slot_freed.clone(),
            queued: AtomicU32::new(0),
            panic_logged: AtomicBool::new(false),
            panic_picks: AtomicU64::new(0),
            backend_metrics: backends
                .iter()
                .map(|b| metrics.backend(&cfg.name, &b.addr))
                .collect(),
            retries: metrics.retries(&cfg.name),
            body_watches: backends
                .iter()
                .map(|b| {
                    let upstream: Arc<str> = cfg.name.as_str().into();
                    let errors = metrics.body_errors(&cfg.name, &b.addr);
                    [false, true].map(|judged_at_end| {
                        Arc::new(BodyWatch {
                            upstream: upstream.clone(),
                            backend: b.clone(),
                            passive: cfg.passive.clone(),
                            errors: errors.clone(),
                            slot_freed: cfg.queue.as_ref().map(|_| slot_freed.clone()),
                            judged_at_end,
                            read_timeout: cfg.timeouts.read,
                        })
                    })
                })
                .collect(),
            backends,
        }
    }

    /// Picks a backend for a request with hash key `key` and counts it in flight.
    ///
    /// In order of preference: an available backend this request has not tried (with
    /// backends in slow start picked only for their share, unless the balancer does
    /// without slow start); an available one it has tried, unless barred;
    /// and with none available, any backend (panic mode: trying a backend believed down
    /// beats failing every request), first attempts by the balancer over all of them and
    /// retries on the next backend along not tried yet. Backends at their in-flight cap
    /// are never picked; when all are, the request waits in the queue for a slot.
    pub async fn acquire(
        &self,
        key: u64,
        tried: &Tried,
    ) -> Result<(usize, InFlight<'_>), PickError> {
        if self.backends.is_empty() {
            return Err(PickError::NoBackends);
        }
        let mut deadline = None;
        loop {
            if let Some(index) = self.pick(key, tried) {
                if let Some(guard) = self.backends[index].try_start(self.cap, self.notify()) {
                    return Ok((index, guard));
                }
                // Lost a race for the last slot: pick again.
                continue;
            }
            // Nothing picked though a backend has room: those with room are barred to
            // this request, and waiting for a slot would not change that.
            if tried.any_barred() && self.backends.iter().any(|b| b.in_flight() < self.cap) {
                return Err(PickError::Barred);
            }
            // Every backend is at its cap: queue, if there is a queue.
            let Some(queue) = &self.config.queue else {
                return Err(PickError::QueueFull);
            };
            let deadline =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + queue.timeout);
            // Counted out when the wait ends however it ends: a client that leaves while
            // its request waits drops this future mid-await.
            let place = QueuePlace(&self.queued);
            if self.queued.fetch_add(1, Ordering::Relaxed) >= queue.size {
                return Err(PickError::QueueFull);
            }
            // Boxed: queueing is rare, and every request's future would carry the timer.
            let woken = Box::pin(tokio::time::timeout_at(
                deadline,
                self.slot_freed.notified(),
            ))
            .await;
            drop(place);
            if woken.is_err() {
                return Err(PickError::QueueFull);
            }
        }
    }

    /// Whether a retry would find a backend this request has not tried yet: an available
    /// one with room, or in panic mode (none available) any with room.
    pub fn has_untried(&self, tried: &Tried) -> bool {
        let now = crate::clock::coarse_ns();
        let mut panic = true;
        let mut untried = false;
        for (i, backend) in self.backends.iter().enumerate() {
            let available = backend.is_available(now);
            panic &= !available;
            if tried.contains(i) || backend.in_flight() >= self.cap {
                continue;
            }
            if available {
                return true;
            }
            untried = true;
        }
        panic && untried
    }

    fn notify(&self) -> Option<&Notify> {
        self.config.queue.as_ref().map(|_| &*self.slot_freed)
    }

    fn pick(&self, key: u64, tried: &Tried) -> Option<usize> {
        let backends = &self.backends;
        // Coarse: availability and slow start move in seconds; one tick late is nothing.
        let now = crate::clock::coarse_ns();
        let window = crate::clock::nanos(crate::health::SLOW_START);
        let cap = self.cap;
        let open = |i: usize| backends[i].in_flight() < cap;
        let slow_start = self.balancer.slow_start();
        let ramping = |i: usize| {
            if !slow_start {
                return false;
            }
            let share = backends[i].slow_start_share(now, window);
            share < 1024 && fastrand::u32(..1024) >= share
        };
        let fresh = |i: usize| backends[i].is_available(now) && !tried.contains(i) && open(i);
        let found = self
            .balancer
            .pick(backends, key, &|i| !fresh(i) || ramping(i))
            .or_else(|| self.balancer.pick(backends, key, &|i| !fresh(i)))
            .or_else(|| {
                self.balancer.pick(backends, key, &|i| {
                    !(backends[i].is_available(now) && open(i)) || tried.is_barred(i)
                })
            });
        if found.is_some() {
            // Read before writing: every request passes here, and a store to the shared
            // flag on each would bounce its cache line between cores.
            if self.panic_logged.load(Ordering::Relaxed)
                && self.panic_logged.swap(false, Ordering::Relaxed)
            {
                tracing::info!(upstream = %self.name, "healthy backends are back; panic mode over");
            }
            return found;
        }
        // Panic mode: none available. A retry takes the next backend along that this
        // request has not tried (one that is back before its ejection or its health checks
        // end may be among them) without turning the balancer's rotation: first attempts
        // alone turn it, so they keep spreading over every backend instead of starting
        // where the previous request's retries stopped. (A retry also comes here when the
        // only available backends are barred to it: then it fares as in panic mode.)
        let len = backends.len();
        let untried = tried.last().and_then(|last| {
            let next = if last + 1 >= len { 0 } else { last + 1 };
            balance::scan_from(next, len, &|i| !open(i) || tried.contains(i)).map(|(i, _)| i)
        });
        let any = untried.or_else(|| {
            self.balancer
                .pick(backends, key, &|i| !open(i) || tried.is_barred(i))
        });
        // Available backends barred to this request are no panic: it fares as in one,
        // but neither the metric nor the log says so.
        if any.is_some() && !backends.iter().any(|b| b.is_available(now)) {
            self.panic_picks.fetch_add(1, Ordering::Relaxed);
            if !self.panic_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(upstream = %self.name, "no healthy backend left; panic mode: trying all of them");
            }
        }
        any
    }

    /// Whether the upstream is in panic mode: it has backends and none is available
    /// (every one unhealthy or ejected) right now. Computed from the backends' state
    /// when asked, so `/status` and the metrics follow health checks and ejections as
    /// they happen, with or without traffic.
    pub fn in_panic(&self) -> bool {
        let now = crate::clock::now_ns();
        !self.backends.is_empty() && !self.backends.iter().any(|b| b.is_available(now))
    }

    /// Sends one request to backend `index` through its own pool (plain HTTP/1.1
    /// upstreams, [`Upstream::direct`]), waiting for the response head until `deadline`.
    pub async fn send_direct(
        &self,
        index: usize,
        head: &h1::RequestHead<'_>,
        body: crate::proxy::body::ProxyBody,
        deadline: tokio::time::Instant,
    ) -> Result<http::Response<pool::UpstreamBody>, pool::SendError> {
        pool::send(
            &self.backends[index],
            head,
            body,
            self.config.timeouts.connect,
            deadline,
        )
        .await
    }

    /// Sends one request (absolute URI) to backend `index` through hyper: over its
    /// HTTP/2 connection (h2c upstreams; the URI's authority is the `:authority` sent), or
    /// through hyper-util's client (HTTPS upstreams; the URI's authority is the backend's).
    /// Waits for the response head until `deadline`.
    pub async fn send_client(
        &self,
        index: usize,
        req: http::Request<crate::proxy::body::ProxyBody>,
        deadline: tokio::time::Instant,
    ) -> Result<http::Response<pool::UpstreamBody>, pool::SendError> {
        let sent = if self.version == Version::HTTP_2 {
            let sending = h2::send(&self.backends[index], &self.connector, &self.scheme, req);
            tokio::time::timeout_at(deadline, sending).await
        } else {
            let sending = self.client.request(req);
            match tokio::time::timeout_at(deadline, sending).await {
                Ok(sent) => Ok(sent.map_err(pool::SendError::Client)),
                Err(elapsed) => Err(elapsed),
            }
        };
        match sent {
            Ok(Ok(resp)) => Ok(resp.map(pool::UpstreamBody::hyper)),
            Ok(Err(e)) => Err(e),
            Err(_elapsed) => Err(pool::SendError::TimedOut),
        }
    }

    /// The response timeout (until the response head has arrived).
    pub fn response_timeout(&self) -> Duration {
        self.config.timeouts.response
    }

    /// The hash key of a request for `consistent_hash` (0 for other algorithms, which do
    /// not read it). A missing header falls back to the client address.
    pub fn hash_key(&self, client_ip: IpAddr, headers: &HeaderMap, path: &str) -> u64 {
        if !self.balancer.needs_key() {
            return 0;
        }
        let ip_key = || match client_ip {
            IpAddr::V4(v4) => balance::hash_key(&v4.octets()),
            IpAddr::V6(v6) => balance::hash_key(&v6.octets()),
        };
        match &self.config.hash_key {
            config::HashKey::ClientIp => ip_key(),
            config::HashKey::Path => balance::hash_key(path.as_bytes()),
            config::HashKey::Header(name) => headers
                .get(name)
                .map_or_else(ip_key, |v| balance::hash_key(v.as_bytes())),
        }
    }
}

/// Whether an address of `backends` belonged to a backend of another name in `previous`
/// (a reload renamed the backend, or DNS moved the address to another name) in an upstream
/// whose TLS name is each backend's own (`tls = true` without `server_name`).
fn renames_an_address(
    cfg: &config::Upstream,
    previous: &Upstream,
    backends: &[Arc<Backend>],
) -> bool {
    cfg.tls
        .as_ref()
        .is_some_and(|tls| tls.server_name.is_none())
        && backends.iter().any(|b| {
            previous
                .backends
                .iter()
                .any(|old| old.addr == b.addr && old.host != b.host)
        })
}

fn algorithm(balance: config::Balance) -> balance::Algorithm {
    match balance {
        config::Balance::RoundRobin => balance::Algorithm::RoundRobin,
        config::Balance::Weighted => balance::Algorithm::Weighted,
        config::Balance::LeastConn => balance::Algorithm::LeastConn,
        config::Balance::P2cEwma => balance::Algorithm::P2cEwma,
        config::Balance::Random => balance::Algorithm::Random,
        config::Balance::ConsistentHash => balance::Algorithm::ConsistentHash,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(backends: &str) -> Upstream {
        let toml =
            format!("[[routes]]\nupstream = \"app\"\n[upstreams.app]\nbackends = [{backends}]\n");
        let config = match config::parse(&toml, std::path::Path::new("t.toml")) {
            Ok(config) => config,
            Err(e) => panic!("{e:?}"),
        };
        Upstream::build(
            &config.upstreams[0],
            None,
            &Resolved::new(),
            &Metrics::new(),
        )
    }

    #[test]
    fn the_backend_barred_is_the_one_tried_last_however_many_attempts_came_before() {
        let mut tried = Tried::default();
        assert_eq!(tried.last(), None);
        // The same backend again and again takes one place among those remembered.
        for _ in 0..20 {
            tried.push(3);
        }
        for i in 0..Tried::REMEMBERED + 2 {
            tried.push(i);
        }
        assert_eq!(tried.last(), Some(Tried::REMEMBERED + 1));
        tried.bar_last();
        assert!(tried.is_barred(Tried::REMEMBERED + 1));
        assert!((0..=Tried::REMEMBERED).all(|i| !tried.is_barred(i)));
        assert!(tried.contains(Tried::REMEMBERED - 1) && tried.contains(3));
        // Barring twice takes no second place.
        tried.bar_last();
        tried.push(0);
        tried.bar_last();
        assert!(tried.is_barred(0) && tried.is_barred(Tried::REMEMBERED + 1));
    }

    #[test]
    fn a_barred_backend_is_never_picked_again() {
        let up = upstream("{ addr = \"127.0.0.1:1\" }, { addr = \"127.0.0.1:2\" }");
        let mut tried = Tried::default();
        tried.push(0);
        assert!(!tried.is_barred(0));
        // Tried but not barred: picked again once the other one is out of rotation.
        up.backends[1].healthy.store(false, Ordering::Relaxed);
        assert_eq!(up.pick(0, &tried), Some(0));
        // Barred: no retry is begun for it in this state (no available backend left to
        // try); one begun before the other went out of rotation (during its backoff) gets
        // that one, out of rotation as it is, rather than the barred one.
        tried.bar_last();
        assert!(tried.is_barred(0) && !tried.is_barred(1));
        assert!(!up.has_untried(&tried));
        for _ in 0..8 {
            assert_eq!(up.pick(0, &tried), Some(1));
        }
        // A healthy backend is there, barred to this request only: no panic mode.
        assert_eq!(up.panic_picks.load(Ordering::Relaxed), 0);
        // Nothing left but the barred one: nothing to pick.
        tried.push(1);
        tried.bar_last();
        assert!(!up.has_untried(&tried));
        assert_eq!(up.pick(0, &tried), None);
    }

    #[tokio::test]
    async fn with_every_backend_barred_a_request_is_not_told_the_queue_is_full() {
        let up = upstream("{ addr = \"127.0.0.1:1\" }, { addr = \"127.0.0.1:2\" }");
        let mut tried = Tried::default();
        for i in 0..2 {
            tried.push(i);
            tried.bar_last();
        }
        // Both have room: it is the barring, not the cap (a 502, not a 503).
        assert!(matches!(
            up.acquire(0, &tried).await,
            Err(PickError::Barred)
        ));
    }
}
