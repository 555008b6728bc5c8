//! `least_conn`: the backend with the fewest requests in flight relative to its weight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{weight_of, Balance};
use crate::upstream::Backend;

/// Least connections, weighted: backend `a` beats `b` when
/// `in_flight_a * weight_b < in_flight_b * weight_a` (exact integer cross-multiplication).
///
/// Scans every allowed backend (O(n), the one algorithm allowed to), stopping early at an
/// idle one since nothing beats zero. Ties go to the first met, and each pick starts the
/// scan one backend further on (an atomic counter), so equally loaded backends share
/// requests evenly instead of the first one taking every tie.
#[derive(Debug, Default)]
pub struct LeastConn {
    next: AtomicUsize,
}

impl LeastConn {
    /// A least-connections balancer; all its input is the backends' live counters.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Balance for LeastConn {
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
        let mut i = self.next.fetch_add(1, Ordering::Relaxed) % len;
        // (index, in_flight, weight) of the best so far.
        let mut best: Option<(usize, u64, u64)> = None;
        for _ in 0..len {
            if !skip(i) {
                let load = u64::from(backends[i].in_flight());
                let weight = weight_of(&backends[i]);
                let better = match best {
                    None => true,
                    Some((_, best_load, best_weight)) => load * best_weight < best_load * weight,
                };
                if better {
                    best = Some((i, load, weight));
                    if load == 0 {
                        break;
                    }
                }
            }
            i += 1;
            if i == len {
                i = 0;
            }
        }
        if best.is_none() {
            // Give the turn back (see `Balance::pick`).
            self.next.fetch_sub(1, Ordering::Relaxed);
        }
        best.map(|(i, _, _)| i)
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
        let lc = LeastConn::new();
        assert_eq!(counts(&lc, &backends, 100, &|_| false), [0, 100, 0, 0]);
        // Skipping the least loaded gives the next least loaded.
        assert_eq!(counts(&lc, &backends, 100, &|i| i == 1), [0, 0, 0, 100]);
    }

    #[test]
    fn weights_scale_the_load() {
        // 6 in flight at weight 3 (2 per unit) beats 3 in flight at weight 1.
        let backends = pool(&[3, 1]);
        set_in_flight(&backends, &[6, 3]);
        let lc = LeastConn::new();
        assert_eq!(counts(&lc, &backends, 10, &|_| false), [10, 0]);
        // 9 at weight 3 (3 per unit) vs 2 at weight 1: the light one wins.
        set_in_flight(&backends, &[9, 2]);
        assert_eq!(counts(&lc, &backends, 10, &|_| false), [0, 10]);
    }

    #[test]
    fn ties_rotate_evenly() {
        let backends = pool(&[1, 1, 1]);
        let lc = LeastConn::new();
        assert_eq!(counts(&lc, &backends, 300, &|_| false), [100, 100, 100]);
        set_in_flight(&backends, &[4, 4, 4]);
        assert_eq!(counts(&lc, &backends, 300, &|_| false), [100, 100, 100]);
        // Weighted ties: 2/2 and 1/1 are equal per unit of weight.
        let backends = pool(&[2, 1]);
        set_in_flight(&backends, &[2, 1]);
        assert_eq!(counts(&lc, &backends, 100, &|_| false), [50, 50]);
    }

    #[test]
    fn tracking_in_flight_balances_by_weight() {
        // Requests that never finish: least_conn fills backends in proportion to weight.
        let backends = pool(&[1, 2, 3]);
        let lc = LeastConn::new();
        for _ in 0..600 {
            let i = lc.pick(&backends, 0, &|_| false).unwrap();
            backends[i].in_flight.fetch_add(1, Relaxed);
        }
        let loads: Vec<u32> = backends.iter().map(|b| b.in_flight()).collect();
        assert_eq!(loads, [100, 200, 300]);
    }
}
