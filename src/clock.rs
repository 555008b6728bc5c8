//! A process-wide monotonic clock in nanoseconds, so time fits in an atomic `u64`.
//!
//! Live state (activity, ejections, slow start) stores timestamps from here; the decisions
//! that read them take `now` as an argument, so they are pure and tested without sleeping.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::time::ClockId;

/// The process's epoch: as an `Instant`, and as the monotonic clock's own nanoseconds
/// (read back to back), so that [`coarse_ns`] counts from the same moment.
struct Epoch {
    instant: Instant,
    monotonic_ns: u64,
}

fn epoch_pair() -> &'static Epoch {
    static EPOCH: OnceLock<Epoch> = OnceLock::new();
    EPOCH.get_or_init(|| Epoch {
        instant: Instant::now(),
        monotonic_ns: raw_ns(ClockId::Monotonic),
    })
}

fn epoch() -> Instant {
    epoch_pair().instant
}

fn raw_ns(clock: ClockId) -> u64 {
    let ts = rustix::time::clock_gettime(clock);
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Nanoseconds since the process's epoch, plus one so that 0 can mean "never".
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// [`now_ns`] from the kernel's coarse monotonic clock: the time of the last timer tick
/// (at most a tick, 1-4 ms, behind [`now_ns`], never ahead), read from the vDSO without
/// the time-stamp counter and its conversion. For the stamps taken on every request whose
/// deadlines are seconds away (a connection's last activity, a pooled connection's age,
/// a backend's availability): a deadline computed from one comes due at most a tick
/// early.
pub fn coarse_ns() -> u64 {
    let epoch = epoch_pair();
    raw_ns(ClockId::MonotonicCoarse)
        .saturating_sub(epoch.monotonic_ns)
        .saturating_add(1)
}

/// The `Instant` of a timestamp from [`now_ns`].
pub fn instant_at(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

/// A duration in nanoseconds, saturating.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_counts_from_the_same_epoch_and_never_runs_ahead() {
        for _ in 0..1000 {
            let before = now_ns();
            let coarse = coarse_ns();
            let after = now_ns();
            assert!(coarse >= 1);
            assert!(coarse <= after, "coarse {coarse} ahead of {after}");
            // A tick is 1-10 ms; the bound leaves room for a descheduled test thread.
            assert!(
                before.saturating_sub(coarse) < 100_000_000,
                "coarse {coarse} far behind {before}"
            );
        }
    }
}
