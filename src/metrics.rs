//! Prometheus metrics: one registry per running instance, with the names SPEC section 5
//! relies on.
//!
//! The request path never looks a metric up by label: per-route and per-backend handles
//! (with the common status codes already resolved) are built with each snapshot, and
//! gauges that mirror live state (health, in flight, generation, connections, panic) are
//! read from the atomics when `/metrics` is scraped, so they cost requests nothing.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::clock::now_ns;
use crate::snapshot::{ProxyState, Snapshot};

/// Status codes whose counters are resolved ahead of time; others are looked up by label.
const COMMON_CODES: [u16; 16] = [
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 413, 429, 500, 502, 503, 504,
];

/// Request-duration buckets in seconds: 1 ms to 30 s.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric of one palisade instance.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_requests: IntCounterVec,
    upstream_body_errors: IntCounterVec,
    backend_healthy: IntGaugeVec,
    backend_in_flight: IntGaugeVec,
    retries: IntCounterVec,
    rate_limited: IntCounterVec,
    denied: IntCounterVec,
    reloads: IntCounterVec,
    generation: IntGauge,
    connections: IntGauge,
    connections_refused: IntCounterVec,
    connections_evicted: IntCounter,
    health_checks: IntCounterVec,
    upstream_panic: IntGaugeVec,
    panic_picks: IntCounterVec,
    limit_store_up: IntGaugeVec,
    limit_fallbacks: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    // Names are fixed and distinct, so registration cannot collide.
    let _ = registry.register(Box::new(metric.clone()));
    metric
}

// The metric definitions below are constants of this file, never input: a bad one is a
// programming error caught by the first test run, hence `expect`.
const STATIC_DEFINITION: &str = "static metric definition is valid";

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect(STATIC_DEFINITION),
    )
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect(STATIC_DEFINITION),
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        let duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "palisade_request_duration_seconds",
                    "Time from a request's arrival to its response head, by route.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["route", "upstream"],
            )
            .expect(STATIC_DEFINITION),
        );
        let generation = register(
            &registry,
            IntGauge::new(
                "palisade_config_generation",
                "Generation of the running configuration.",
            )
            .expect(STATIC_DEFINITION),
        );
        let connections = register(
            &registry,
            IntGauge::new(
                "palisade_connections_active",
                "Client connections open now.",
            )
            .expect(STATIC_DEFINITION),
        );
        let connections_evicted = register(
            &registry,
            IntCounter::new(
                "palisade_connections_evicted_total",
                "Idle client connections (keep-alive, or no request yet) closed at max_connections to make room for a new one.",
            )
            .expect(STATIC_DEFINITION),
        );
        let m = Metrics {
            requests: counter_vec(
                &registry,
                "palisade_requests_total",
                "Client requests answered, by route, upstream and status.",
                &["route", "upstream", "code"],
            ),
            duration,
            upstream_requests: counter_vec(
                &registry,
                "palisade_upstream_requests_total",
                "Attempts sent to backends, by status (502/504 for attempts without an answer).",
                &["upstream", "backend", "code"],
            ),
            backend_healthy: gauge_vec(
                &registry,
                "palisade_backend_healthy",
                "1 when the backend is in rotation (healthy and not ejected).",
                &["upstream", "backend"],
            ),
            backend_in_flight: gauge_vec(
                &registry,
                "palisade_backend_in_flight",
                "Requests in flight to the backend.",
                &["upstream", "backend"],
            ),
            retries: counter_vec(
                &registry,
                "palisade_retries_total",
                "Retries, by upstream.",
                &["upstream"],
            ),
            rate_limited: counter_vec(
                &registry,
                "palisade_rate_limited_total",
                "Requests refused by a rate limit, by route.",
                &["route"],
            ),
            denied: counter_vec(
                &registry,
                "palisade_denied_total",
                "Requests refused by an allow/deny list, by route.",
                &["route"],
            ),
            reloads: counter_vec(
                &registry,
                "palisade_config_reloads_total",
                "Configuration reloads, by result.",
                &["result"],
            ),
            generation,
            connections,
            connections_refused: counter_vec(
                &registry,
                "palisade_connections_refused_total",
                "Client connections closed on arrival because max_connections was reached and none was idle, by listen address.",
                &["listener"],
            ),
            connections_evicted,
            health_checks: counter_vec(
                &registry,
                "palisade_health_checks_total",
                "Active health probes, by result.",
                &["upstream", "backend", "result"],
            ),
            upstream_body_errors: counter_vec(
                &registry,
                "palisade_upstream_body_errors_total",
                "Responses whose body the backend broke off (reset, closed early, bad chunking) after their head was passed on, by upstream and backend.",
                &["upstream", "backend"],
            ),
            upstream_panic: gauge_vec(
                &registry,
                "palisade_upstream_panic",
                "1 while the upstream has no healthy backend (panic mode).",
                &["upstream"],
            ),
            panic_picks: counter_vec(
                &registry,
                "palisade_panic_picks_total",
                "Backends picked in panic mode, by upstream.",
                &["upstream"],
            ),
            limit_store_up: gauge_vec(
                &registry,
                "palisade_rate_limit_store_up",
                "Routes with store = \"redis\": 1 while Redis answers, 0 while the route falls back to its local limit.",
                &["route"],
            ),
            limit_fallbacks: counter_vec(
                &registry,
                "palisade_rate_limit_fallbacks_total",
                "Rate-limit checks decided by the local limiter because Redis was unreachable, by route.",
                &["route"],
            ),
            registry,
        };
        for result in ["success", "failure"] {
            m.reloads.with_label_values(&[result]);
        }
        m
    }

    /// Drops the series of routes, upstreams and backends that `snapshot` no longer has
    /// (a reload renamed or removed them, or a backend name now resolves elsewhere), so
    /// that the label sets do not grow with every such reload. Requests still finishing
    /// on the previous snapshot count into handles that are no longer exported.
    pub fn retain(&self, snapshot: &Snapshot) {
        let routes: HashSet<(&str, &str)> = snapshot
            .config
            .routes
            .iter()
            .map(|r| (r.name.as_str(), r.upstream.as_str()))
            .collect();
        // The refusal counters are by configured route only; requests and durations are
        // also counted under route "" (requests no route took: `unrouted`).
        let route_names: HashSet<&str> = routes.iter().map(|r| r.0).collect();
        let routes: HashSet<(&str, &str)> = routes.into_iter().chain([("", "")]).collect();
        let upstreams: HashSet<&str> = snapshot.upstreams.iter().map(|u| &*u.name).collect();
        let backends: HashSet<(&str, &str)> = snapshot
            .upstreams
            .iter()
            .flat_map(|u| u.backends.iter().map(move |b| (&*u.name, &*b.addr)))
            .collect();
        let route = |v: &[&str]| routes.contains(&(v[0], v[1]));
        let named_route = |v: &[&str]| route_names.contains(v[0]);
        let upstream = |v: &[&str]| upstreams.contains(v[0]);
        let backend = |v: &[&str]| backends.contains(&(v[0], v[1]));
        prune(&self.requests, &["route", "upstream", "code"], route);
        prune(&self.duration, &["route", "upstream"], route);
        prune(
            &self.upstream_requests,
            &["upstream", "backend", "code"],
            backend,
        );
        prune(
            &self.health_checks,
            &["upstream", "backend", "result"],
            backend,
        );
        prune(
            &self.upstream_body_errors,
            &["upstream", "backend"],
            backend,
        );
        prune(&self.retries, &["upstream"], upstream);
        prune(&self.panic_picks, &["upstream"], upstream);
        prune(&self.rate_limited, &["route"], named_route);
        prune(&self.denied, &["route"], named_route);
        prune(&self.limit_store_up, &["route"], named_route);
        prune(&self.limit_fallbacks, &["route"], named_route);
    }

    /// The handles one route's requests update.
    pub fn route(&self, route: &str, upstream: &str) -> RouteMetrics {
        // Resolving the refusal counters makes their series appear at 0.
        RouteMetrics {
            answers: self.answers(route, upstream),
            rate_limited: self.rate_limited.with_label_values(&[route]),
            denied: self.denied.with_label_values(&[route]),
        }
    }

    /// The handles of requests no route took (404, and heads refused before they became
    /// requests): counted under route `""` and upstream `""`. Only routes refuse by rate
    /// limit or allow list, so there are no refusal series with route `""`.
    pub fn unrouted(&self) -> AnswerMetrics {
        self.answers("", "")
    }

    fn answers(&self, route: &str, upstream: &str) -> AnswerMetrics {
        AnswerMetrics {
            by_code: CodeCounters::new(&self.requests, &[route, upstream]),
            duration: self.duration.with_label_values(&[route, upstream]),
        }
    }

    /// The handles of a route's shared (Redis) rate-limit store: (up, fallbacks).
    pub fn limit_store(&self, route: &str) -> (IntGauge, IntCounter) {
        (
            self.limit_store_up.with_label_values(&[route]),
            self.limit_fallbacks.with_label_values(&[route]),
        )
    }

    /// The handles one backend's attempts update.
    pub fn backend(&self, upstream: &str, backend: &str) -> CodeCounters {
        CodeCounters::new(&self.upstream_requests, &[upstream, backend])
    }

    /// The counter of a backend's response bodies broken off mid-way.
    pub fn body_errors(&self, upstream: &str, backend: &str) -> IntCounter {
        self.upstream_body_errors
            .with_label_values(&[upstream, backend])
    }

    /// The retry counter of an upstream.
    pub fn retries(&self, upstream: &str) -> IntCounter {
        self.retries.with_label_values(&[upstream])
    }

    /// The probe counters of a backend: (pass, fail).
    pub fn health_checks(&self, upstream: &str, backend: &str) -> (IntCounter, IntCounter) {
        (
            self.health_checks
                .with_label_values(&[upstream, backend, "pass"]),
            self.health_checks
                .with_label_values(&[upstream, backend, "fail"]),
        )
    }

    /// The counter of connections refused at `max_connections` on `listener`.
    pub fn connections_refused(&self, listener: &str) -> IntCounter {
        self.connections_refused.with_label_values(&[listener])
    }

    /// The counter of idle connections closed at `max_connections` to make room.
    pub fn connections_evicted(&self) -> IntCounter {
        self.connections_evicted.clone()
    }

    /// Counts a reload.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
    }

    /// The Prometheus text exposition of every metric, live gauges read from `state`.
    pub fn render(&self, state: &ProxyState) -> String {
        let snapshot = state.snapshot();
        self.generation.set(snapshot.generation as i64);
        self.connections
            .set(state.connections.load(Ordering::Relaxed) as i64);
        // Backends that left the config must leave the gauges too.
        self.backend_healthy.reset();
        self.backend_in_flight.reset();
        self.upstream_panic.reset();
        let now = now_ns();
        for upstream in &snapshot.upstreams {
            let name = &*upstream.name;
            for b in &upstream.backends {
                let labels = [name, &*b.addr];
                self.backend_healthy
                    .with_label_values(&labels)
                    .set(i64::from(b.is_available(now)));
                self.backend_in_flight
                    .with_label_values(&labels)
                    .set(i64::from(b.in_flight()));
            }
            self.upstream_panic
                .with_label_values(&[name])
                .set(i64::from(upstream.in_panic()));
            let picks = self.panic_picks.with_label_values(&[name]);
            let total = upstream.panic_picks.load(Ordering::Relaxed);
            if total > picks.get() {
                picks.inc_by(total - picks.get());
            }
        }
        let mut out = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Removes the series of `vec` (whose labels are `labels`, in order) that `keep` says no
/// to, given their label values in that order.
fn prune<T: MetricVecBuilder>(vec: &MetricVec<T>, labels: &[&str], keep: impl Fn(&[&str]) -> bool) {
    let mut gone: Vec<Vec<String>> = Vec::new();
    for family in vec.collect() {
        for metric in family.get_metric() {
            let pairs = metric.get_label();
            let values: Vec<&str> = labels
                .iter()
                .map(|name| {
                    pairs
                        .iter()
                        .find(|p| p.name() == *name)
                        .map_or("", |p| p.value())
                })
                .collect();
            if !keep(&values) {
                gone.push(values.iter().map(|v| (*v).to_owned()).collect());
            }
        }
    }
    for values in gone {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let _ = vec.remove_label_values(&values);
    }
}

/// A request counter per status code, with the common codes resolved ahead of time.
#[derive(Debug, Clone)]
pub struct CodeCounters {
    common: [IntCounter; COMMON_CODES.len()],
    vec: IntCounterVec,
    labels: [String; 2],
}

impl CodeCounters {
    fn new(vec: &IntCounterVec, labels: &[&str; 2]) -> Self {
        let common = COMMON_CODES.map(|code| {
            let code = code.to_string();
            vec.with_label_values(&[labels[0], labels[1], code.as_str()])
        });
        CodeCounters {
            common,
            vec: vec.clone(),
            labels: [labels[0].to_owned(), labels[1].to_owned()],
        }
    }

    /// Counts one answer with `code`.
    pub fn inc(&self, code: u16) {
        match COMMON_CODES.iter().position(|&c| c == code) {
            Some(i) => self.common[i].inc(),
            None => {
                let code = code.to_string();
                self.vec
                    .with_label_values(&[
                        self.labels[0].as_str(),
                        self.labels[1].as_str(),
                        code.as_str(),
                    ])
                    .inc();
            }
        }
    }
}

/// The handles counting answered requests, of a route or of none.
#[derive(Debug, Clone)]
pub struct AnswerMetrics {
    /// `palisade_requests_total` by code.
    pub by_code: CodeCounters,
    /// `palisade_request_duration_seconds`.
    pub duration: Histogram,
}

/// The metric handles of one route.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// Its answered requests.
    pub answers: AnswerMetrics,
    /// `palisade_rate_limited_total`.
    pub rate_limited: IntCounter,
    /// `palisade_denied_total`.
    pub denied: IntCounter,
}
