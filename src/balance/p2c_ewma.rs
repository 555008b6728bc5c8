//! Power of two choices over a latency EWMA (Finagle's and Linkerd's "p2c + peak EWMA").
//!
//! Two distinct random candidates; the one with the lower cost wins, where
//! cost = EWMA latency x (in-flight + 1) / weight. Two random choices avoid the herd
//! behaviour of always picking the global minimum, at O(1) per pick.

use std::sync::Arc;

use super::Balance;
use crate::upstream::Backend;

/// The latency assumed for a backend without a sample yet: low enough that new backends
/// get tried, so they get a sample.
const DEFAULT_EWMA_NS: u64 = 1_000_000;

/// Power of two choices, cheaper cost wins.
#[derive(Debug, Default)]
pub struct P2cEwma;

impl P2cEwma {
    /// A new balancer.
    pub fn new() -> Self {
        P2cEwma
    }
}

fn cost(b: &Backend) -> u128 {
    let ewma = match b.ewma_ns() {
        0 => DEFAULT_EWMA_NS,
        e => e,
    };
    u128::from(ewma) * u128::from(b.in_flight() + 1) * 1024 / u128::from(b.weight.max(1))
}

impl Balance for P2cEwma {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _key: u64,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        // Two random non-skipped candidates; after a few misses fall back to a scan, so a
        // mostly-skipped pool still finds its available backends.
        let mut candidates = [None, None];
        let mut found = 0;
        for _ in 0..8 {
            let i = fastrand::usize(..n);
            if !skip(i) && candidates[0] != Some(i) {
                candidates[found] = Some(i);
                found += 1;
                if found == 2 {
                    break;
                }
            }
        }
        if found < 2 {
            let start = fastrand::usize(..n);
            for i in (0..n).map(|i| (start + i) % n) {
                if found == 2 {
                    break;
                }
                if !skip(i) && candidates[0] != Some(i) {
                    candidates[found] = Some(i);
                    found += 1;
                }
            }
        }
        match candidates {
            [Some(a), Some(b)] => Some(if cost(&backends[b]) < cost(&backends[a]) {
                b
            } else {
                a
            }),
            [Some(a), None] => Some(a),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_slow_backend_gets_far_fewer_picks() {
        let p = pool(&[1, 1, 1]);
        p[0].ewma_ns.store(10_000_000, Ordering::Relaxed);
        p[1].ewma_ns.store(1_000_000, Ordering::Relaxed);
        p[2].ewma_ns.store(1_000_000, Ordering::Relaxed);
        let c = counts(&P2cEwma::new(), &p, 3000, NONE);
        // With distinct candidates the slow backend always loses to a fast one; it is only
        // picked when the draw fell back to it alone, which three backends make rare.
        assert!(c[0] < 300, "{c:?}");
        assert!(c[1] > 1000 && c[2] > 1000, "{c:?}");
    }

    #[test]
    fn unsampled_backends_still_get_traffic() {
        let p = pool(&[1, 1]);
        p[0].ewma_ns.store(5_000_000, Ordering::Relaxed);
        let c = counts(&P2cEwma::new(), &p, 100, NONE);
        assert!(c[1] > 50, "{c:?}");
    }

    #[test]
    fn in_flight_counts_against_a_backend() {
        let p = pool(&[1, 1]);
        p[0].ewma_ns.store(1_000_000, Ordering::Relaxed);
        p[1].ewma_ns.store(1_000_000, Ordering::Relaxed);
        p[0].in_flight.store(10, Ordering::Relaxed);
        let c = counts(&P2cEwma::new(), &p, 100, NONE);
        assert_eq!(c, [0, 100]);
    }
}
