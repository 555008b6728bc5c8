//! The immutable, compiled form of a config that the hot path reads.
//!
//! A request loads the current snapshot once and uses it to the end, so a reload never shows
//! it half of two configs. Building is pure: no I/O, no sockets; state that must survive a
//! reload (backends with their counters and health, connection pools) is carried over from
//! the previous snapshot by identity, not rebuilt.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::dns::Resolved;
use crate::limit::cidr::CidrSet;
use crate::limit::rate::{self, RateLimiter};
use crate::metrics::{AnswerMetrics, Metrics};
use crate::route::RouteTable;
use crate::upstream::Upstream;

/// One generation of the running configuration, compiled.
#[derive(Debug)]
pub struct Snapshot {
    /// Starts at 1 and grows by one with each successful reload.
    pub generation: u64,
    /// The configuration this snapshot was built from.
    pub config: Arc<Config>,
    /// The route table.
    pub routes: RouteTable,
    /// The upstream pools, in config order (routes refer to them by index).
    pub upstreams: Vec<Upstream>,
    /// Metric handles for requests no route matched.
    pub unrouted: AnswerMetrics,
    /// `server.client_ip.trusted_proxies`, compiled.
    pub trusted_proxies: CidrSet,
}

impl Snapshot {
    /// Compiles `config` as the next generation after `previous`, carrying live state over
    /// where it still applies; backend names are expanded with the `resolved` addresses.
    pub fn build(
        config: Config,
        previous: Option<&Snapshot>,
        resolved: &Resolved,
        metrics: &Metrics,
    ) -> Snapshot {
        let generation = previous.map_or(1, |p| p.generation + 1);
        Self::build_generation(config, previous, resolved, metrics, generation)
    }

    fn build_generation(
        config: Config,
        previous: Option<&Snapshot>,
        resolved: &Resolved,
        metrics: &Metrics,
        generation: u64,
    ) -> Snapshot {
        let upstreams: Vec<Upstream> = config
            .upstreams
            .iter()
            .map(|cfg| {
                let old = previous.and_then(|p| p.upstream(&cfg.name));
                Upstream::build(cfg, old, resolved, metrics)
            })
            .collect();
        let routes = RouteTable::build(
            &config.routes,
            |name| upstreams.iter().position(|u| &*u.name == name),
            metrics,
            |route| {
                let limit = route.rate_limit.as_ref()?;
                // Keep the running limiter (its buckets) when the route's limit is unchanged.
                let kept = previous.and_then(|p| {
                    p.routes
                        .iter()
                        .find(|r| *r.name == *route.name)
                        .and_then(|r| r.limiter.clone())
                        .filter(|l| l.config == *limit)
                });
                Some(kept.unwrap_or_else(|| {
                    Arc::new(RateLimiter::for_route(
                        &route.name,
                        limit,
                        rate::MAX_KEYS,
                        metrics,
                    ))
                }))
            },
        );
        let trusted_proxies = CidrSet::new(&config.server.client_ip.trusted_proxies);
        Snapshot {
            generation,
            config: Arc::new(config),
            routes,
            upstreams,
            unrouted: metrics.unrouted(),
            trusted_proxies,
        }
    }

    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| &*u.name == name)
    }
}

/// How often rate limiters drop the keys whose buckets are full again.
const LIMITER_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// How often idle upstream connections are checked for age and closure.
const POOL_SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The shortest time between two sweeps (upstreams with a short or zero `idle`).
const MIN_POOL_SWEEP: Duration = Duration::from_millis(100);

/// What every connection and request of one palisade instance shares.
#[derive(Debug)]
pub struct ProxyState {
    snapshot: ArcSwap<Snapshot>,
    draining: AtomicBool,
    /// Client connections open right now.
    pub connections: AtomicUsize,
    /// Successful reloads.
    pub reloads_ok: AtomicU64,
    /// Rejected reloads.
    pub reloads_failed: AtomicU64,
    /// A hash of the config file text the last rejected reload read (0: none since the
    /// last success): the watcher does not reject the same text again.
    pub rejected_text: AtomicU64,
    /// The certificate and key files of the last config rejected for its TLS files (none
    /// since the last success): the watcher watches them too, so that the reload goes
    /// through once they are there.
    pub rejected_tls_files: Mutex<Vec<std::path::PathBuf>>,
    /// The outcome of the last reload: when, and the generation or the first error.
    pub last_reload: Mutex<Option<(Instant, Result<u64, String>)>>,
    started: Instant,
    /// The health checkers of the current snapshot (not on the request path).
    checkers: Mutex<Vec<JoinHandle<()>>>,
    /// The last good addresses of the backend names.
    resolved: Mutex<Resolved>,
    /// This instance's metrics.
    pub metrics: Metrics,
    /// Announces every new snapshot (its generation) to whoever follows config changes.
    changes: tokio::sync::watch::Sender<u64>,
    /// TLS server configs by `[[server.tls]]` listen address (re-read on every reload).
    tls: ArcSwap<crate::tls::TlsConfigs>,
}

impl ProxyState {
    /// State serving `config` as generation 1. Health checks start when called inside a
    /// tokio runtime.
    pub fn new(config: Config) -> Self {
        Self::with_resolved(config, Resolved::new())
    }

    /// Like [`ProxyState::new`], with backend names already resolved.
    pub fn with_resolved(config: Config, resolved: Resolved) -> Self {
        let metrics = Metrics::new();
        let state = ProxyState {
            snapshot: ArcSwap::from_pointee(Snapshot::build(config, None, &resolved, &metrics)),
            draining: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            rejected_text: AtomicU64::new(0),
            rejected_tls_files: Mutex::new(Vec::new()),
            last_reload: Mutex::new(None),
            started: Instant::now(),
            checkers: Mutex::new(Vec::new()),
            resolved: Mutex::new(resolved),
            metrics,
            changes: tokio::sync::watch::Sender::new(1),
            tls: ArcSwap::from_pointee(crate::tls::TlsConfigs::new()),
        };
        match crate::tls::build(&state.snapshot.load().config) {
            Ok(tls) => state.set_tls(tls),
            Err(errors) => {
                for e in errors {
                    tracing::error!(error = %e, "TLS configuration failed; those listeners refuse connections");
                }
            }
        }
        state.restart_checkers(&state.snapshot.load());
        state
    }

    /// Replaces the running health checkers with those of `snapshot`. Their state lives in
    /// the backends, so a backend kept by a reload keeps its health.
    fn restart_checkers(&self, snapshot: &Snapshot) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let Ok(mut checkers) = self.checkers.lock() else {
            return;
        };
        for task in checkers.drain(..) {
            task.abort();
        }
        for upstream in &snapshot.upstreams {
            checkers.extend(crate::health::active::spawn_checks(upstream, &self.metrics));
        }
        // Backends whose connections palisade keeps itself (plain HTTP/1.1 pools, h2c).
        let own_pools = || {
            snapshot
                .upstreams
                .iter()
                .filter(|u| u.direct || u.version == http::Version::HTTP_2)
        };
        let pooled: Vec<Arc<crate::upstream::Backend>> = own_pools()
            .flat_map(|u| u.backends.iter().cloned())
            .collect();
        // Often enough that no connection outstays its upstream's `idle` by more than half.
        let sweep_every = own_pools()
            .map(|u| u.config.timeouts.idle / 2)
            .fold(POOL_SWEEP_EVERY, Duration::min)
            .max(MIN_POOL_SWEEP);
        if !pooled.is_empty() {
            checkers.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(sweep_every).await;
                    for backend in &pooled {
                        backend.pool.sweep();
                        backend
                            .h2
                            .sweep(backend.in_flight(), backend.pool.idle_limit());
                    }
                }
            }));
        }
        let limiters: Vec<Arc<RateLimiter>> = snapshot
            .routes
            .iter()
            .filter_map(|r| r.limiter.clone())
            .collect();
        for limiter in &limiters {
            limiter.start();
        }
        if !limiters.is_empty() {
            checkers.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(LIMITER_PRUNE_EVERY).await;
                    for limiter in &limiters {
                        limiter.prune();
                    }
                }
            }));
        }
    }

    /// The current snapshot; hold it for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Builds a snapshot of `config` from the current one and swaps it in; returns its
    /// generation. In-flight requests finish on the snapshot they started with.
    pub fn apply(&self, config: Config) -> u64 {
        // Held from build to store: a reload and a DNS change building from the same
        // snapshot at once would otherwise store one and lose the other.
        let resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.snapshot.load();
        let next = Snapshot::build(config, Some(&current), &resolved, &self.metrics);
        let generation = next.generation;
        self.restart_checkers(&next);
        self.metrics.retain(&next);
        self.snapshot.store(Arc::new(next));
        drop(resolved);
        self.changes.send_replace(generation);
        generation
    }

    /// A receiver that sees every configuration change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The TLS server config for connections on the `[[server.tls]]` address `addr`.
    pub fn tls_config(&self, addr: SocketAddr) -> Option<Arc<rustls::ServerConfig>> {
        self.tls.load().get(&addr).cloned()
    }

    /// Installs new TLS server configs (certificates re-read by a reload).
    pub fn set_tls(&self, tls: crate::tls::TlsConfigs) {
        self.tls.store(Arc::new(tls));
    }

    /// The last good addresses of the backend names.
    pub fn resolved(&self) -> Resolved {
        self.resolved.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Takes new backend addresses: the running config is rebuilt with them, keeping its
    /// generation (it is not a reload) and the state of every backend that stays.
    pub fn set_resolved(&self, resolved: Resolved) {
        // Held from build to store, as in `apply`.
        let mut guard = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        *guard = resolved;
        let current = self.snapshot.load_full();
        let config = (*current.config).clone();
        let next = Snapshot::build_generation(
            config,
            Some(&current),
            &guard,
            &self.metrics,
            current.generation,
        );
        self.restart_checkers(&next);
        self.metrics.retain(&next);
        self.snapshot.store(Arc::new(next));
    }

    /// Marks the instance as draining (readiness turns false).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the instance is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// When this instance started.
    pub fn started(&self) -> Instant {
        self.started
    }
}

impl Drop for ProxyState {
    fn drop(&mut self) {
        if let Ok(checkers) = self.checkers.get_mut() {
            for task in checkers.drain(..) {
                task.abort();
            }
        }
    }
}
