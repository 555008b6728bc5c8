//! `p2c_ewma`: power of two choices on latency × load.
//!
//! Two distinct allowed backends are drawn at random and the cheaper one wins, where
//! cost = response-time estimate × (in flight + 1) / weight. Comparing only two keeps
//! picks O(1) and avoids the herd that "always the global best" causes when every proxy
//! instance sees the same best backend.
//!
//! The estimate is a peak EWMA, as in Finagle and Linkerd ([`Backend::record_latency`]):
//! a slow answer raises it at once, and it decays toward zero with time
//! ([`crate::upstream::backend::EWMA_DECAY`]), computed here at pick time from when it
//! was last updated. The decay is what brings a backend back: the estimate only moves on
//! answers, so without it a backend that had one slow answer, and then lost every
//! comparison, would never answer again and stay avoided for good.

use std::sync::Arc;

use super::{weight_of, Balance};
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
        self.pick_at(backends, skip, crate::clock::coarse_ns())
    }
}

impl P2cEwma {
    /// [`Balance::pick`] at clock time `now` (the estimates are decayed to it).
    pub(crate) fn pick_at(
        &self,
        backends: &[Arc<Backend>],
        skip: &dyn Fn(usize) -> bool,
        now: u64,
    ) -> Option<usize> {
        let len = backends.len();
        let a = candidate(len, None, skip)?;
        let Some(b) = candidate(len, Some(a), skip) else {
            return Some(a);
        };
        Some(if cheaper(&backends[b], &backends[a], now) {
            b
        } else {
            a
        })
    }
}

/// A uniformly drawn allowed index other than `exclude`: up to [`DRAWS`] draws, then one
/// pass choosing uniformly among the allowed (reservoir sampling; a scan from a random
/// start would favour the backend after a run of skipped ones).
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
    let mut seen = 0;
    let mut chosen = None;
    for i in 0..len {
        if Some(i) == exclude || skip(i) {
            continue;
        }
        seen += 1;
        if fastrand::usize(..seen) == 0 {
            chosen = Some(i);
        }
    }
    chosen
}

/// Whether `x` costs strictly less than `y` at `now`: `ewma × (in_flight + 1) / weight`,
/// compared by cross-multiplication in u128 so nothing truncates or overflows.
fn cheaper(x: &Backend, y: &Backend, now: u64) -> bool {
    let (ex, ey) = match (x.ewma_ns_at(now), y.ewma_ns_at(now)) {
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
    use std::time::Duration;

    use super::super::test_util::*;
    use super::*;

    const MS: u64 = 1_000_000;

    /// Sets the estimates as if just measured (so the real clock's picks see them as set).
    fn set_ewma(backends: &[Arc<Backend>], ewma_ms: &[u64]) {
        let now = crate::clock::coarse_ns();
        for (b, &ms) in backends.iter().zip(ewma_ms) {
            b.ewma_ns.store(ms * MS, Relaxed);
            b.ewma_at.store(now, Relaxed);
        }
    }

    /// Sequential requests on a simulated clock, one every millisecond: each is picked at
    /// its start and answered `latency(backend, n)` later (nothing else in flight), as
    /// light load looks. Returns the picks, in order.
    fn sequential(
        backends: &[Arc<Backend>],
        start: u64,
        requests: usize,
        mut latency: impl FnMut(usize, usize) -> Duration,
    ) -> Vec<usize> {
        let p2c = P2cEwma::new();
        let mut now = start;
        (0..requests)
            .map(|n| {
                let i = p2c.pick_at(backends, &|_| false, now).expect("a backend");
                let took = latency(i, n);
                now += crate::clock::nanos(took).max(MS);
                backends[i].record_latency(took, now);
                i
            })
            .collect()
    }

    fn tally(picks: &[usize], len: usize) -> Vec<usize> {
        let mut c = vec![0; len];
        for &i in picks {
            c[i] += 1;
        }
        c
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
    fn a_backend_with_one_slow_answer_is_tried_again_once_its_estimate_decays() {
        // The audit's case: backend 2 answered one request in 1 s, the others answer in
        // 1 ms. Its estimate decays while it is not picked (to 1 ms after ~70 s), so
        // it is tried again and, answering fast now, takes its share back.
        let backends = pool(&[1, 1, 1]);
        let start = 1_000 * MS;
        backends[2].record_latency(Duration::from_secs(1), start);
        let picks = sequential(&backends, start, 150_000, |_, _| Duration::from_millis(1));
        let first_again = picks.iter().position(|&i| i == 2);
        assert!(first_again.is_some(), "backend 2 never picked again");
        let last_minute = tally(&picks[90_000..], 3);
        for &n in &last_minute {
            assert_share(n, 60_000, 1.0 / 3.0, 0.1);
        }
    }

    #[test]
    fn sequential_light_load_spreads_over_every_backend_from_a_cold_start() {
        // First answers carry a connection setup (one of them 0.5 ms slower than the
        // rest), later ones 1 ms with up to 0.5 ms of jitter: no backend is locked out.
        let backends = pool(&[1, 1, 1]);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut first = [true; 3];
        let picks = sequential(&backends, MS, 60_000, |i, _| {
            let base = if std::mem::take(&mut first[i]) {
                [2_000_000, 2_500_000, 2_100_000][i]
            } else {
                1_000_000
            };
            Duration::from_nanos(base + rng.u64(..500_000))
        });
        for n in tally(&picks, 3) {
            assert_share(n, 60_000, 1.0 / 3.0, 0.1);
        }
        // And already over the first 10 s.
        for n in tally(&picks[..10_000], 3) {
            assert!(n >= 1_000, "{:?}", tally(&picks[..10_000], 3));
        }
    }

    #[test]
    fn skip_is_honoured_and_spreads() {
        let backends = pool(&[1, 1, 1, 1]);
        let c = counts(&P2cEwma::new(), &backends, 40_000, &|i| i == 2);
        assert_eq!(c[2], 0);
        for i in [0, 1, 3] {
            assert_share(c[i], 40_000, 1.0 / 3.0, 0.02);
        }
        // A run of skipped backends does not favour the one after it.
        let backends = pool(&[1, 1, 1, 1, 1]);
        let c = counts(&P2cEwma::new(), &backends, 60_000, &|i| i < 3);
        assert_share(c[3], 60_000, 0.5, 0.015);
        // One backend left: it is returned without a rival.
        assert_eq!(counts(&P2cEwma::new(), &backends, 100, &|i| i != 3)[3], 100);
    }
}
