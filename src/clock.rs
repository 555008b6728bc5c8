//! A process-wide monotonic clock in nanoseconds, so time fits in an atomic `u64`.
//!
//! Live state (activity, ejections, slow start) stores timestamps from here; the decisions
//! that read them take `now` as an argument, so they are pure and tested without sleeping.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the process's epoch, plus one so that 0 can mean "never".
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos())
        .unwrap_or(u64::MAX)
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
