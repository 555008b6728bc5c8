//! Least connections: the backend with the fewest requests in flight relative to its weight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Balance;
use crate::upstream::Backend;

/// Fewest in-flight requests per unit of weight; ties go to a rotating start point, so
/// equally loaded backends share the load evenly. O(n) per pick, as in nginx and HAProxy.
#[derive(Debug, Default)]
pub struct LeastConn {
    rotate: AtomicUsize,
}

impl LeastConn {
    /// A new balancer.
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
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.rotate.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, u64, u64)> = None; // (index, in_flight, weight)
        for i in (0..n).map(|i| (start + i) % n) {
            if skip(i) {
                continue;
            }
            let b = &backends[i];
            let (load, weight) = (u64::from(b.in_flight()), u64::from(b.weight.max(1)));
            // load_i / weight_i < load_best / weight_best, without division.
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * weight) {
                best = Some((i, load, weight));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn picks_the_least_loaded() {
        let p = pool(&[1, 1, 1]);
        p[0].in_flight.store(5, Ordering::Relaxed);
        p[1].in_flight.store(1, Ordering::Relaxed);
        p[2].in_flight.store(3, Ordering::Relaxed);
        assert_eq!(counts(&LeastConn::new(), &p, 30, NONE), [0, 30, 0]);
    }

    #[test]
    fn weights_scale_the_load() {
        let p = pool(&[4, 1]);
        p[0].in_flight.store(6, Ordering::Relaxed); // 6/4 = 1.5
        p[1].in_flight.store(2, Ordering::Relaxed); // 2/1 = 2
        assert_eq!(LeastConn::new().pick(&p, 0, NONE), Some(0));
    }

    #[test]
    fn ties_rotate_evenly() {
        let p = pool(&[1, 1, 1]);
        assert_eq!(counts(&LeastConn::new(), &p, 300, NONE), [100, 100, 100]);
    }

    #[test]
    fn picks_track_in_flight_as_it_grows() {
        let p = pool(&[1, 1]);
        let lc = LeastConn::new();
        let mut guards = Vec::new();
        for _ in 0..10 {
            let i = lc.pick(&p, 0, NONE).unwrap_or(0);
            guards.push(p[i].start());
        }
        assert_eq!((p[0].in_flight(), p[1].in_flight()), (5, 5));
    }
}
