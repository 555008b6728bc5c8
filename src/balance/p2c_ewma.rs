//! `p2c_ewma`: power of two choices on latency × load.
//!
//! Two distinct allowed backends are drawn at random and the cheaper one wins, where
//! cost = EWMA response time × (in flight + 1) / weight. Comparing only two keeps picks
//! O(1) and avoids the herd that "always the global best" causes when every proxy
//! instance sees the same best backend.

use std::sync::Arc;

use super::{scan_from, weight_of, Balance};
use crate::upstream::Backend;

/// Draws per candidate before scanning from a random start for an allowed backend.
const DRAWS: usize = 3;

/// Power of two choices on EWMA cost; stateless apart from the thread-local RNG.
///
/// A backend with no latency sample yet (EWMA 0) is costed with the other candidate's
/// EWMA, i.e. as "as fast as its rival", then compared on in-flight and weight. A fixed
/// default would either starve it (default above the pool's real latency: it never wins,
/// so never gets the sample that would fix it) or flood it (default below). When neither
/// candidate has a sample the comparison is on in-flight and weight alone.
#[derive(Debug, Default)]
pub struct P2cEwma;

impl P2cEwma {
    /// A p2c_ewma balancer; all its input is the backends' live counters.
    pub fn new() -> Self {
        Self
    }
}

impl Balance for P2cEwma {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _key: u64,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let len = backends.len();
        let a = candidate(len, None, skip)?;
        let Some(b) = candidate(len, Some(a), skip) else {
            return Some(a);
        };
        Some(if cheaper(&backends[b], &backends[a]) {
            b
        } else {
            a
        })
    }
}

/// A uniformly drawn allowed index other than `exclude`, or, after [`DRAWS`] misses,
/// the first allowed one from a random start.
fn candidate(len: usize, exclude: Option<usize>, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
    let choices = len - usize::from(exclude.is_some());
    if choices == 0 {
        return None;
    }
    for _ in 0..DRAWS {
        let mut i = fastrand::usize(..choices);
        if exclude.is_some_and(|x| i >= x) {
            i += 1;
        }
        if !skip(i) {
            return Some(i);
        }
    }
    let skip_or_excluded = |i: usize| Some(i) == exclude || skip(i);
    scan_from(fastrand::usize(..len), len, &skip_or_excluded).map(|(i, _)| i)
}

/// Whether `x` costs strictly less than `y`: `ewma × (in_flight + 1) / weight`, compared
/// by cross-multiplication in u128 so nothing truncates or overflows.
fn cheaper(x: &Backend, y: &Backend) -> bool {
    let (ex, ey) = match (x.ewma_ns(), y.ewma_ns()) {
        (0, 0) => (1, 1),
        (0, e) | (e, 0) => (e, e),
        (ex, ey) => (ex, ey),
    };
    let cost = |ewma: u64, b: &Backend, other_weight: u64| {
        u128::from(ewma) * u128::from(u64::from(b.in_flight()) + 1) * u128::from(other_weight)
    };
    cost(ex, x, weight_of(y)) < cost(ey, y, weight_of(x))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::Ordering::Relaxed;

    use super::super::test_util::*;
    use super::*;

    fn set_ewma(backends: &[Arc<Backend>], ewma_ms: &[u64]) {
        for (b, &ms) in backends.iter().zip(ewma_ms) {
            b.ewma_ns.store(ms * 1_000_000, Relaxed);
        }
    }

    /// Picks `picks` requests with `concurrency` outstanding: each pick adds one in-flight
    /// to its backend, and the oldest request completes once `concurrency` are open.
    fn simulate(backends: &[Arc<Backend>], picks: usize, concurrency: usize) -> Vec<usize> {
        let p2c = P2cEwma::new();
        let mut open = VecDeque::new();
        let mut counts = vec![0; backends.len()];
        for _ in 0..picks {
            let i = p2c.pick(backends, 0, &|_| false).unwrap();
            counts[i] += 1;
            backends[i].in_flight.fetch_add(1, Relaxed);
            open.push_back(i);
            if open.len() > concurrency {
                let done = open.pop_front().unwrap();
                backends[done].in_flight.fetch_sub(1, Relaxed);
            }
        }
        counts
    }

    #[test]
    fn slow_backend_gets_far_fewer_picks() {
        let backends = pool(&[1, 1, 1, 1]);
        set_ewma(&backends, &[100, 10, 10, 10]);
        let c = simulate(&backends, 20_000, 12);
        assert!(c[0] < 20_000 / 10, "slow backend got {c:?}");
        for &n in &c[1..] {
            assert_share(n, 20_000, 1.0 / 3.0, 0.05);
        }
    }

    #[test]
    fn unsampled_backend_still_gets_traffic() {
        let backends = pool(&[1, 1, 1]);
        set_ewma(&backends, &[10, 10, 0]);
        let c = simulate(&backends, 30_000, 6);
        assert_share(c[2], 30_000, 1.0 / 3.0, 0.05);
        // Idle pool, all unsampled: picks spread evenly.
        let backends = pool(&[1, 1, 1]);
        let c = counts(&P2cEwma::new(), &backends, 30_000, &|_| false);
        for n in c {
            assert_share(n, 30_000, 1.0 / 3.0, 0.02);
        }
    }

    #[test]
    fn in_flight_counts() {
        // Same latency; backend 0 busy: it loses every comparison.
        let backends = pool(&[1, 1, 1]);
        set_ewma(&backends, &[10, 10, 10]);
        backends[0].in_flight.store(5, Relaxed);
        let c = counts(&P2cEwma::new(), &backends, 3_000, &|_| false);
        assert_eq!(c[0], 0);
        assert_share(c[1], 3_000, 0.5, 0.05);
        // Twice as fast but 4x as busy: costs 5 * 5 vs 10 * 1, so the idle one wins.
        set_ewma(&backends, &[5, 10, 10]);
        backends[0].in_flight.store(4, Relaxed);
        assert_eq!(counts(&P2cEwma::new(), &backends, 3_000, &|_| false)[0], 0);
    }

    #[test]
    fn weight_divides_cost() {
        // Equal latency and load, weight 4 vs 1: the heavy backend wins whenever drawn.
        let backends = pool(&[4, 1, 1]);
        set_ewma(&backends, &[10, 10, 10]);
        for b in &backends {
            b.in_flight.store(2, Relaxed);
        }
        let c = counts(&P2cEwma::new(), &backends, 30_000, &|_| false);
        // Drawn in 2 of the 3 equally likely pairs.
        assert_share(c[0], 30_000, 2.0 / 3.0, 0.02);
    }

    #[test]
    fn skip_is_honoured_and_spreads() {
        let backends = pool(&[1, 1, 1, 1]);
        let c = counts(&P2cEwma::new(), &backends, 40_000, &|i| i == 2);
        assert_eq!(c[2], 0);
        for i in [0, 1, 3] {
            assert_share(c[i], 40_000, 1.0 / 3.0, 0.02);
        }
        // One backend left: it is returned without a rival.
        assert_eq!(counts(&P2cEwma::new(), &backends, 100, &|i| i != 3)[3], 100);
    }
}
