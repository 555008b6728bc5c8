//! One backend and its live state.
//!
//! Everything a request touches here is an atomic, so picking and counting take no lock.
//! A `Backend` is shared (`Arc`) by every snapshot that contains it: a reload that keeps the
//! backend keeps its counters and health.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use tokio::sync::Notify;

/// One backend of an upstream with its live counters (shared by all requests, lock-free).
#[derive(Debug)]
pub struct Backend {
    /// The address connections go to: `host:port` as configured, or one address a
    /// configured name resolved to (`ip:port`).
    pub addr: Box<str>,
    /// Relative share of traffic, at least 1; a reload that changes only the weight sets
    /// it here, so the backend keeps its live state. Read it through [`Backend::weight`].
    pub weight: AtomicU32,
    /// `addr` as the authority of upstream request URIs (where to connect), parsed once.
    pub authority: Authority,
    /// The backend as configured (`host:port`, the name when `addr` is one of its
    /// addresses; else the same as `authority`): the Host of requests that came without
    /// one and of health probes, and the TLS name to verify. Parsed once.
    pub host: Authority,
    /// Requests currently sent to this backend and not yet answered.
    pub in_flight: AtomicU32,
    /// Response-time estimate (peak EWMA) in nanoseconds as of `ewma_at`; 0 = no sample
    /// yet. Read it through [`Backend::ewma_ns_at`], which decays it to the present.
    pub ewma_ns: AtomicU64,
    /// Clock time ([`crate::clock::coarse_ns`]) `ewma_ns` was last updated at.
    pub ewma_at: AtomicU64,
    /// Requests sent to this backend, ever.
    pub requests: AtomicU64,
    /// Requests to this backend that failed (connect error, reset, timeout).
    pub failures: AtomicU64,
    /// False while active health checks hold the backend out of rotation.
    pub healthy: AtomicBool,
    /// Active checks passed in a row.
    pub(crate) probe_passes: AtomicU32,
    /// Active checks failed in a row.
    pub(crate) probe_failures: AtomicU32,
    /// Live requests failed in a row (passive outlier detection).
    pub(crate) live_failures: AtomicU32,
    /// Ejected until this clock time (0: not ejected).
    pub(crate) ejected_until: AtomicU64,
    /// When the backend last came back into rotation (0: never left); slow start runs
    /// from here.
    pub(crate) returned_at: AtomicU64,
    /// Idle keep-alive connections (plain HTTP/1.1 upstreams).
    pub pool: super::pool::Pool,
    /// The HTTP/2 connection (h2c upstreams).
    pub h2: super::h2::H2Conn,
}

impl Backend {
    /// A backend for `addr` (`host:port`, as validated by the config), healthy and idle.
    pub fn new(addr: &str, weight: u32) -> Self {
        Self::named(addr, addr, weight)
    }

    /// A backend at `addr` (an address the configured `host`, `host:port`, resolved to),
    /// healthy and idle.
    pub fn named(addr: &str, host: &str, weight: u32) -> Self {
        let authority = parse_authority(addr);
        let host = if host == addr {
            authority.clone()
        } else {
            parse_authority(host)
        };
        Backend {
            addr: addr.into(),
            weight: AtomicU32::new(weight.max(1)),
            authority,
            host,
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(0),
            ewma_at: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            probe_passes: AtomicU32::new(0),
            probe_failures: AtomicU32::new(0),
            live_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            returned_at: AtomicU64::new(0),
            pool: super::pool::Pool::default(),
            h2: super::h2::H2Conn::default(),
        }
    }

    /// Relative share of traffic, at least 1.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The response-time estimate in nanoseconds now (0 before the first sample).
    pub fn ewma_ns(&self) -> u64 {
        self.ewma_ns_at(crate::clock::coarse_ns())
    }

    /// The response-time estimate at clock time `now`: the stored one decayed toward zero
    /// by `exp(-elapsed / EWMA_DECAY)` for the time since it was last updated (0 before
    /// the first sample, at least 1 after). Computed on read, so a backend that gets no
    /// traffic still has its estimate fall, and is tried again once it is below the
    /// others'; nothing is written, so readers on every core share the cache line.
    pub fn ewma_ns_at(&self, now: u64) -> u64 {
        let ewma = self.ewma_ns.load(Ordering::Relaxed);
        if ewma == 0 {
            return 0;
        }
        let at = self.ewma_at.load(Ordering::Relaxed);
        decayed(ewma, now.saturating_sub(at))
    }

    /// Whether active health checks currently hold the backend in rotation.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether passive outlier detection has the backend ejected at clock time `now`.
    pub fn is_ejected(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now < until
    }

    /// Whether balancers may pick this backend at clock time `now`.
    pub fn is_available(&self, now: u64) -> bool {
        self.is_healthy() && !self.is_ejected(now)
    }

    /// The share of its full weight the backend gets at `now` while it ramps up after
    /// coming back (slow start), in 1/1024ths; 1024 outside slow start.
    pub fn slow_start_share(&self, now: u64, window: u64) -> u32 {
        let returned = self.returned_at.load(Ordering::Relaxed);
        if returned == 0 || window == 0 || now >= returned.saturating_add(window) {
            return 1024;
        }
        let elapsed = now.saturating_sub(returned);
        // At least a trickle from the start, so the backend proves itself.
        (elapsed.saturating_mul(1024) / window).clamp(64, 1024) as u32
    }

    /// Counts a request as sent; the guard counts it as finished when dropped.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            backend: self,
            notify: None,
        }
    }

    /// Like [`Backend::start`], but only while fewer than `cap` requests are in flight;
    /// the guard wakes one queued request through `notify` when dropped.
    pub fn try_start<'a>(&'a self, cap: u32, notify: Option<&'a Notify>) -> Option<InFlight<'a>> {
        self.in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            backend: self,
            notify,
        })
    }

    /// Ends the count of a request [`InFlight::hand_over`] handed over.
    pub fn finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a failed exchange.
    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Folds one response time, answered at clock time `now`, into the estimate, as
    /// Finagle's and Linkerd's peak EWMA do: a sample above the (decayed) estimate
    /// replaces it at once (a backend that slows down is avoided from its first slow
    /// answer); one below pulls it down by `1 - exp(-elapsed / EWMA_DECAY)`, the
    /// weight of the time since the last update.
    ///
    /// Concurrent updates may overwrite each other (two atomics, no lock); an estimate
    /// tolerates the lost sample.
    pub fn record_latency(&self, elapsed: Duration, now: u64) {
        let sample = crate::clock::nanos(elapsed).max(1);
        let old = self.ewma_ns.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            let since = now.saturating_sub(self.ewma_at.load(Ordering::Relaxed));
            let current = decayed(old, since);
            if sample >= current {
                sample
            } else {
                // current * w + sample * (1 - w), with w = exp(-since / tau).
                let pull = decayed(current - sample, since);
                sample + pull
            }
        };
        self.ewma_ns.store(new.max(1), Ordering::Relaxed);
        self.ewma_at.store(now, Ordering::Relaxed);
    }
}

/// `host:port` as an authority. Config validation guarantees the form; one that slipped
/// through still fails cleanly at connect time instead of panicking here.
fn parse_authority(text: &str) -> Authority {
    Authority::from_maybe_shared(Bytes::copy_from_slice(text.as_bytes()))
        .unwrap_or_else(|_| Authority::from_static("invalid.invalid:1"))
}

/// How fast a backend's response-time estimate forgets: it falls by a factor `e` over
/// this long without a sample (Finagle's and Linkerd's default decay, 10 s). A 1 s
/// answer among 1 ms ones is forgotten (back under 1 ms) after about 70 s; one twice as
/// slow as its peers after about 7 s.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);

/// `ns` decayed over `elapsed` nanoseconds: `ns * exp(-elapsed / EWMA_DECAY)`, at least 1.
fn decayed(ns: u64, elapsed: u64) -> u64 {
    if elapsed == 0 {
        return ns;
    }
    let tau = EWMA_DECAY.as_nanos() as f64;
    let factor = (-(elapsed as f64) / tau).exp();
    // f64 -> u64 saturates and maps NaN to 0; the max keeps "sampled" distinct from 0.
    ((ns as f64 * factor) as u64).max(1)
}

/// A request in flight to a backend; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight<'a> {
    backend: &'a Backend,
    notify: Option<&'a Notify>,
}

impl InFlight<'_> {
    /// Keeps the request counted past this guard: whoever it is handed to calls
    /// [`Backend::finished`] (and wakes the queue) exactly once.
    pub fn hand_over(self) {
        std::mem::forget(self);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(notify) = self.notify {
            notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_until_the_guard_drops() {
        let b = Backend::new("127.0.0.1:9001", 1);
        let g1 = b.start();
        let g2 = b.start();
        assert_eq!(b.in_flight(), 2);
        drop(g1);
        assert_eq!(b.in_flight(), 1);
        drop(g2);
        assert_eq!(b.in_flight(), 0);
        assert_eq!(b.requests.load(Ordering::Relaxed), 2);
    }

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    #[test]
    fn ewma_starts_at_the_first_sample_and_jumps_to_a_higher_one() {
        let b = Backend::new("127.0.0.1:9001", 1);
        b.record_latency(Duration::from_nanos(800), S);
        assert_eq!(b.ewma_ns_at(S), 800);
        b.record_latency(Duration::from_nanos(1600), S);
        assert_eq!(b.ewma_ns_at(S), 1600);
    }

    #[test]
    fn ewma_decays_without_samples_and_lower_samples_pull_by_elapsed_time() {
        let b = Backend::new("127.0.0.1:9001", 1);
        b.record_latency(Duration::from_millis(1000), S);
        // e^-1 after one decay time, with no sample in between: a backend no longer
        // picked is not stuck at its one slow answer.
        let after_tau = b.ewma_ns_at(S + 10 * S);
        assert!((367 * MS..=369 * MS).contains(&after_tau), "{after_tau}");
        assert!(b.ewma_ns_at(S + 100 * S) < MS);
        assert!(
            b.ewma_ns_at(S + 1000 * S) >= 1,
            "sampled stays distinct from unsampled"
        );
        // A faster answer 10 s later pulls the decayed estimate (368 ms) toward itself
        // by 1 - e^-1: 100 + 268 / e.
        b.record_latency(Duration::from_millis(100), 11 * S);
        let now = b.ewma_ns_at(11 * S);
        assert!((198 * MS..=199 * MS).contains(&now), "{now}");
        // The clock going backwards (stamps from two threads) does not blow it up.
        assert_eq!(b.ewma_ns_at(S), now);
    }

    #[test]
    fn authority_is_parsed_once() {
        let b = Backend::new("app.internal:80", 0);
        assert_eq!(b.authority.as_str(), "app.internal:80");
        assert_eq!(b.host.as_str(), "app.internal:80");
        assert_eq!(b.weight(), 1);
        let named = Backend::named("10.1.2.3:8080", "app.internal:8080", 1);
        assert_eq!(named.authority.as_str(), "10.1.2.3:8080");
        assert_eq!(named.host.as_str(), "app.internal:8080");
    }
}
