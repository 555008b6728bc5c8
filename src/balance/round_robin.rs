//! `round_robin`: every backend in turn, ignoring weights.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{scan_from, Balance};
use crate::upstream::Backend;

/// Round robin on one shared atomic counter.
///
/// A skipped backend's turn goes to the next one allowed, and the counter moves past it
/// too, so the backends left share the load evenly (one of three skipped: 50/50, not
/// 67/33 as a plain "take the next" would give).
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// A round robin starting at the first backend.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Balance for RoundRobin {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _key: u64,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let len = backends.len();
        if len == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % len;
        let Some((i, steps)) = scan_from(start, len, skip) else {
            // Give the turn back (see `Balance::pick`).
            self.next.fetch_sub(1, Ordering::Relaxed);
            return None;
        };
        if steps > 0 {
            self.next.fetch_add(steps, Ordering::Relaxed);
        }
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn equal_turns() {
        let backends = pool(&[1, 5, 1]);
        let rr = RoundRobin::new();
        assert_eq!(counts(&rr, &backends, 300, &|_| false), [100, 100, 100]);
    }

    #[test]
    fn skipped_backend_turns_are_shared_evenly() {
        let backends = pool(&[1, 1, 1]);
        let rr = RoundRobin::new();
        assert_eq!(counts(&rr, &backends, 300, &|i| i == 1), [150, 0, 150]);
        assert_eq!(counts(&rr, &backends, 300, &|i| i == 2), [150, 150, 0]);
    }

    #[test]
    fn strict_order() {
        let backends = pool(&[1, 1, 1]);
        let rr = RoundRobin::new();
        let order: Vec<_> = (0..6)
            .map(|_| rr.pick(&backends, 0, &|_| false).unwrap())
            .collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn exact_under_concurrency() {
        let backends = pool(&[1, 1, 1, 1]);
        let rr = RoundRobin::new();
        let per_thread: Vec<Vec<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| counts(&rr, &backends, 1000, &|_| false)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let total: Vec<usize> = (0..4)
            .map(|i| per_thread.iter().map(|c| c[i]).sum())
            .collect();
        assert_eq!(total, [1000, 1000, 1000, 1000]);
    }
}
