//! `least_conn`: the backend with the fewest requests in flight relative to its weight.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{weight_of, Balance};
use crate::upstream::Backend;

/// A tie-break turn of a weight-1 backend, in virtual time; a weight-`w` one takes `1/w`
/// of it, so tied backends take turns in proportion to their weights.
const TURN: u64 = 1 << 32;

/// Virtual-time distance beyond which a backend's tag counts as stale and is brought up
/// to the present (long before the wrapping comparison could misread it).
const STALE: u64 = 1 << 62;

/// Least connections, weighted: backend `a` beats `b` when
/// `in_flight_a * weight_b < in_flight_b * weight_a` (exact integer cross-multiplication).
///
/// Ties (equal in flight per unit of weight, which is every pick under light load) are
/// broken as nginx breaks them, by weighted round robin among the tied backends only:
/// weights 3 and 1 share sequential requests 3:1, and a backend busy with a long request
/// leaves its turns to the other tied backends evenly, not to its successor. The round
/// robin is start-time fair queueing: each backend carries the virtual time its next turn
/// starts at, the earliest among the tied wins and moves its own tag on by
/// `TURN / weight`; a backend that was not among the tied joins at the present virtual
/// time, so it gets no burst of turns for the ones it missed. One scan of the backends
/// (O(n), the one algorithm allowed to) and two atomic stores per pick.
#[derive(Debug)]
pub struct LeastConn {
    /// Per backend: the virtual time its next tie-break turn starts at.
    tags: Box<[AtomicU64]>,
    /// Per backend: how far a turn moves its tag (`TURN / weight`).
    strides: Box<[u64]>,
    /// The virtual time: the start tag of the latest pick (wrapping).
    now: AtomicU64,
}

impl LeastConn {
    /// A least-connections balancer for `backends`; its only input beyond the weights is
    /// the backends' live in-flight counts.
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        Self {
            tags: backends.iter().map(|_| AtomicU64::new(0)).collect(),
            strides: backends
                .iter()
                .map(|b| (TURN / weight_of(b)).max(1))
                .collect(),
            now: AtomicU64::new(0),
        }
    }
}

/// Whether virtual time `a` is before `b` (wrapping, as TCP sequence numbers).
fn before(a: u64, b: u64) -> bool {
    (a.wrapping_sub(b) as i64) < 0
}

impl Balance for LeastConn {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _key: u64,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let now = self.now.load(Ordering::Relaxed);
        // (index, in_flight, weight, start tag) of the best so far.
        let mut best: Option<(usize, u64, u64, u64)> = None;
        for (i, (backend, slot)) in backends.iter().zip(self.tags.iter()).enumerate() {
            let mut tag = slot.load(Ordering::Relaxed);
            if now.wrapping_sub(tag) > STALE && !before(now, tag) {
                // Left far behind (skipped for billions of picks): rejoin at the present.
                slot.store(now, Ordering::Relaxed);
                tag = now;
            }
            if skip(i) {
                continue;
            }
            let start = if before(tag, now) { now } else { tag };
            let load = u64::from(backend.in_flight());
            let weight = weight_of(backend);
            let better = match best {
                None => true,
                Some((_, best_load, best_weight, best_start)) => {
                    let (mine, theirs) = (load * best_weight, best_load * weight);
                    mine < theirs || (mine == theirs && before(start, best_start))
                }
            };
            if better {
                best = Some((i, load, weight, start));
            }
        }
        let (i, _, _, start) = best?;
        self.tags[i].store(start.wrapping_add(self.strides[i]), Ordering::Relaxed);
        if before(now, start) {
            self.now.store(start, Ordering::Relaxed);
        }
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::super::test_util::*;
    use super::*;

    fn set_in_flight(backends: &[Arc<Backend>], loads: &[u32]) {
        for (b, &l) in backends.iter().zip(loads) {
            b.in_flight.store(l, Relaxed);
        }
    }

    #[test]
    fn picks_the_fewest_in_flight() {
        let backends = pool(&[1, 1, 1, 1]);
        set_in_flight(&backends, &[5, 2, 7, 3]);
        let lc = LeastConn::new(&backends);
        assert_eq!(counts(&lc, &backends, 100, &|_| false), [0, 100, 0, 0]);
        // Skipping the least loaded gives the next least loaded.
        assert_eq!(counts(&lc, &backends, 100, &|i| i == 1), [0, 0, 0, 100]);
    }

    #[test]
    fn weights_scale_the_load() {
        // 6 in flight at weight 3 (2 per unit) beats 3 in flight at weight 1.
        let backends = pool(&[3, 1]);
        set_in_flight(&backends, &[6, 3]);
        let lc = LeastConn::new(&backends);
        assert_eq!(counts(&lc, &backends, 10, &|_| false), [10, 0]);
        // 9 at weight 3 (3 per unit) vs 2 at weight 1: the light one wins.
        set_in_flight(&backends, &[9, 2]);
        assert_eq!(counts(&lc, &backends, 10, &|_| false), [0, 10]);
    }

    #[test]
    fn ties_rotate_evenly() {
        let backends = pool(&[1, 1, 1]);
        let lc = LeastConn::new(&backends);
        assert_eq!(counts(&lc, &backends, 300, &|_| false), [100, 100, 100]);
        set_in_flight(&backends, &[4, 4, 4]);
        assert_eq!(counts(&lc, &backends, 300, &|_| false), [100, 100, 100]);
        // Weighted ties: 2/2 and 1/1 are equal per unit of weight, and the turns among
        // them follow the weights.
        let backends = pool(&[2, 1]);
        let lc = LeastConn::new(&backends);
        set_in_flight(&backends, &[2, 1]);
        assert_eq!(counts(&lc, &backends, 99, &|_| false), [66, 33]);
    }

    #[test]
    fn ties_under_light_load_follow_the_weights() {
        // The audit: weights 3 and 1, sequential requests (nothing in flight at each
        // pick) went 20:20; nginx gives 30:10, interleaved.
        let backends = pool(&[3, 1]);
        let lc = LeastConn::new(&backends);
        let picks: Vec<usize> = (0..40)
            .map(|_| lc.pick(&backends, 0, &|_| false).expect("a backend"))
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 30, "{picks:?}");
        for window in picks.chunks(4) {
            assert_eq!(window.iter().filter(|&&i| i == 1).count(), 1, "{picks:?}");
        }
    }

    #[test]
    fn a_busy_backend_leaves_its_turns_to_the_tied_evenly() {
        // The audit: b0 holds one long request; b1 and b2 are tied at 0 and went
        // b1 b2 b1 b1 b2 b1 (20:10): the scan's rotation gave b0's turn to its successor.
        let backends = pool(&[1, 1, 1]);
        let lc = LeastConn::new(&backends);
        set_in_flight(&backends, &[1, 0, 0]);
        assert_eq!(counts(&lc, &backends, 30, &|_| false), [0, 15, 15]);
        // Once free again it rejoins the rotation without a burst of missed turns: in
        // any 3 picks in a row, each backend has at most 2.
        set_in_flight(&backends, &[0, 0, 0]);
        let next: Vec<usize> = (0..30)
            .map(|_| lc.pick(&backends, 0, &|_| false).expect("a backend"))
            .collect();
        for window in next.windows(3) {
            assert!(window[0] != window[1] || window[1] != window[2], "{next:?}");
        }
        let zeros = next.iter().filter(|&&i| i == 0).count();
        assert!((9..=11).contains(&zeros), "{next:?}");
    }

    #[test]
    fn stale_tags_rejoin_at_the_present() {
        // A backend skipped for so long that the virtual time ran 2^62 past its tag
        // would read as far in the future after the wrap; it is brought up instead.
        let backends = pool(&[1, 1]);
        let lc = LeastConn::new(&backends);
        lc.now.store(STALE + 5, Relaxed);
        lc.tags[1].store(STALE + 5, Relaxed);
        assert_eq!(lc.pick(&backends, 0, &|_| false), Some(0));
        assert_eq!(counts(&lc, &backends, 10, &|_| false), [5, 5]);
    }

    #[test]
    fn tracking_in_flight_balances_by_weight() {
        // Requests that never finish: least_conn fills backends in proportion to weight.
        let backends = pool(&[1, 2, 3]);
        let lc = LeastConn::new(&backends);
        for _ in 0..600 {
            let i = lc.pick(&backends, 0, &|_| false).unwrap();
            backends[i].in_flight.fetch_add(1, Relaxed);
        }
        let loads: Vec<u32> = backends.iter().map(|b| b.in_flight()).collect();
        assert_eq!(loads, [100, 200, 300]);
    }
}
