//! One backend and its live state.
//!
//! Everything a request touches here is an atomic, so picking and counting take no lock.
//! A `Backend` is shared (`Arc`) by every snapshot that contains it: a reload that keeps the
//! backend keeps its counters and health.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;

/// One backend of an upstream with its live counters (shared by all requests, lock-free).
#[derive(Debug)]
pub struct Backend {
    /// The address as configured: `host:port`.
    pub addr: Box<str>,
    /// Relative share of traffic, at least 1.
    pub weight: u32,
    /// The authority of upstream request URIs, parsed once.
    pub authority: Authority,
    /// Requests currently sent to this backend and not yet answered.
    pub in_flight: AtomicU32,
    /// Response-time EWMA in nanoseconds; 0 = no sample yet.
    pub ewma_ns: AtomicU64,
    /// Requests sent to this backend, ever.
    pub requests: AtomicU64,
    /// Requests to this backend that failed (connect error, reset, timeout).
    pub failures: AtomicU64,
    /// False while the backend is out of rotation (health checks, outlier ejection).
    pub healthy: AtomicBool,
}

impl Backend {
    /// A backend for `addr` (`host:port`, as validated by the config), healthy and idle.
    pub fn new(addr: &str, weight: u32) -> Self {
        let authority = Authority::from_maybe_shared(Bytes::copy_from_slice(addr.as_bytes()))
            // Config validation guarantees host:port; an address that slipped through
            // still fails cleanly at connect time instead of panicking here.
            .unwrap_or_else(|_| Authority::from_static("invalid.invalid:1"));
        Backend {
            addr: addr.into(),
            weight: weight.max(1),
            authority,
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
        }
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The response-time EWMA in nanoseconds (0 before the first sample).
    pub fn ewma_ns(&self) -> u64 {
        self.ewma_ns.load(Ordering::Relaxed)
    }

    /// Whether balancers may pick this backend.
    pub fn is_available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Counts a request as sent; the guard counts it as finished when dropped.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight { backend: self }
    }

    /// Counts a failed exchange.
    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Folds one response time into the EWMA (weight 1/8 for the new sample, like TCP's SRTT).
    /// Concurrent updates may overwrite each other; an EWMA tolerates the lost sample.
    pub fn record_latency(&self, elapsed: Duration) {
        let sample = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX).max(1);
        let old = self.ewma_ns.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.ewma_ns.store(new.max(1), Ordering::Relaxed);
    }
}

/// A request in flight to a backend; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight<'a> {
    backend: &'a Backend,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
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

    #[test]
    fn ewma_starts_at_the_first_sample_and_moves_an_eighth() {
        let b = Backend::new("127.0.0.1:9001", 1);
        b.record_latency(Duration::from_nanos(800));
        assert_eq!(b.ewma_ns(), 800);
        b.record_latency(Duration::from_nanos(1600));
        assert_eq!(b.ewma_ns(), 900);
    }

    #[test]
    fn authority_is_parsed_once() {
        let b = Backend::new("app.internal:80", 0);
        assert_eq!(b.authority.as_str(), "app.internal:80");
        assert_eq!(b.weight, 1);
    }
}
