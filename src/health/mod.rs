//! Health: whether a backend may take traffic.
//!
//! Two independent sources flip a backend's state, both stored in the backend's atomics
//! and read by every balancer through `Backend::is_available`:
//! - active checks (`active`): a probe every `interval`; `unhealthy_threshold` failures in
//!   a row take the backend out of rotation, `healthy_threshold` passes bring it back;
//! - passive outlier detection (here): `consecutive_failures` live failures in a row
//!   eject the backend for `ejection` (SPEC: "A passive ejection lasts `ejection`"; Envoy
//!   doubles a repeated one, which the SPEC rules out).
//!
//! A backend that comes back ramps up over [`SLOW_START`] instead of taking a full share
//! at once. The decisions are pure functions of the counters and a clock value, tested
//! without sockets or sleeps.

pub mod active;

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::clock::{nanos, now_ns};
use crate::config::{Health, Passive};
use crate::upstream::Backend;

/// How long a backend that came back takes to ramp up to its full share (HAProxy's
/// `slowstart`).
pub const SLOW_START: Duration = Duration::from_secs(5);

/// A change of a backend's state worth logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Active checks took it out of rotation.
    Down,
    /// Active checks brought it back.
    Up,
    /// Passive detection ejected it for this long.
    Ejected(Duration),
}

/// Records one active probe result at clock time `now`.
pub fn on_probe(backend: &Backend, passed: bool, cfg: &Health, now: u64) -> Option<Transition> {
    if passed {
        backend.probe_failures.store(0, Ordering::Relaxed);
        let passes = backend
            .probe_passes
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if !backend.is_healthy() && passes >= cfg.healthy_threshold {
            backend.healthy.store(true, Ordering::Relaxed);
            backend.returned_at.store(now, Ordering::Relaxed);
            return Some(Transition::Up);
        }
    } else {
        backend.probe_passes.store(0, Ordering::Relaxed);
        let failures = backend
            .probe_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if backend.is_healthy() && failures >= cfg.unhealthy_threshold {
            backend.healthy.store(false, Ordering::Relaxed);
            return Some(Transition::Down);
        }
    }
    None
}

/// Records one live exchange with a backend at clock time `now` (a failure is a connect
/// error, a reset, a timeout or a 5xx from the backend).
pub fn on_live_result(backend: &Backend, ok: bool, cfg: &Passive, now: u64) -> Option<Transition> {
    if ok {
        if backend.live_failures.load(Ordering::Relaxed) != 0 {
            backend.live_failures.store(0, Ordering::Relaxed);
        }
        return None;
    }
    let failures = backend
        .live_failures
        .fetch_add(1, Ordering::Relaxed)
        .saturating_add(1);
    if failures < cfg.consecutive_failures || backend.is_ejected(now) {
        return None;
    }
    backend.live_failures.store(0, Ordering::Relaxed);
    let length = cfg.ejection;
    backend
        .ejected_until
        .store(now.saturating_add(nanos(length)), Ordering::Relaxed);
    // Slow start begins when the ejection ends.
    backend
        .returned_at
        .store(now.saturating_add(nanos(length)), Ordering::Relaxed);
    Some(Transition::Ejected(length))
}

/// Counts one live exchange of `upstream` with `backend`: a failure in its `failures`,
/// and, with `passive` outlier detection, in its streak (logging an ejection). The one
/// place the request path and the response bodies report what a backend did.
pub fn record_live(upstream: &str, backend: &Backend, passive: Option<&Passive>, ok: bool) {
    if !ok {
        backend.record_failure();
    }
    let Some(passive) = passive else {
        return;
    };
    if let Some(Transition::Ejected(length)) = on_live_result(backend, ok, passive, now_ns()) {
        tracing::warn!(
            upstream, backend = %backend.addr, ejection = ?length,
            "backend failed {} requests in a row; ejected", passive.consecutive_failures
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn health() -> Health {
        Health {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expect_status: 200..=399,
        }
    }

    fn passive() -> Passive {
        Passive {
            consecutive_failures: 3,
            ejection: Duration::from_secs(10),
        }
    }

    #[test]
    fn probes_take_a_backend_out_after_the_threshold_and_back_after_theirs() {
        let b = Backend::new("10.0.0.1:80", 1);
        let cfg = health();
        assert_eq!(on_probe(&b, false, &cfg, S), None);
        assert_eq!(on_probe(&b, false, &cfg, 2 * S), None);
        // A pass in between resets the failure streak.
        assert_eq!(on_probe(&b, true, &cfg, 3 * S), None);
        assert_eq!(on_probe(&b, false, &cfg, 4 * S), None);
        assert_eq!(on_probe(&b, false, &cfg, 5 * S), None);
        assert_eq!(on_probe(&b, false, &cfg, 6 * S), Some(Transition::Down));
        assert!(!b.is_available(6 * S));
        assert_eq!(on_probe(&b, true, &cfg, 7 * S), None);
        assert_eq!(on_probe(&b, true, &cfg, 8 * S), Some(Transition::Up));
        assert!(b.is_available(8 * S));
        // Back in slow start: a small share at first, the full share after SLOW_START.
        let window = nanos(SLOW_START);
        assert!(b.slow_start_share(8 * S, window) < 1024);
        assert_eq!(b.slow_start_share(8 * S + window, window), 1024);
    }

    #[test]
    fn consecutive_live_failures_eject_for_the_ejection_time() {
        let b = Backend::new("10.0.0.1:80", 1);
        let cfg = passive();
        assert_eq!(on_live_result(&b, false, &cfg, S), None);
        assert_eq!(on_live_result(&b, false, &cfg, S), None);
        // A success resets the streak.
        assert_eq!(on_live_result(&b, true, &cfg, S), None);
        assert_eq!(on_live_result(&b, false, &cfg, S), None);
        assert_eq!(on_live_result(&b, false, &cfg, S), None);
        assert_eq!(
            on_live_result(&b, false, &cfg, S),
            Some(Transition::Ejected(Duration::from_secs(10)))
        );
        assert!(!b.is_available(5 * S));
        assert!(b.is_available(11 * S + 1));
    }

    #[test]
    fn every_ejection_lasts_ejection_however_soon_it_follows_the_last() {
        let b = Backend::new("10.0.0.1:80", 1);
        let cfg = passive();
        let eject = |at: u64| {
            let mut last = None;
            for _ in 0..3 {
                last = on_live_result(&b, false, &cfg, at);
            }
            last
        };
        let ten = Some(Transition::Ejected(Duration::from_secs(10)));
        assert_eq!(eject(S), ten);
        // Back at 11 s, failing again at 12 s: 10 s again (Envoy would double it).
        assert_eq!(eject(12 * S), ten);
        assert!(!b.is_available(21 * S));
        assert!(b.is_available(22 * S + 1));
    }
}
