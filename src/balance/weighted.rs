//! Smooth weighted round robin, as nginx does it, made lock-free.
//!
//! nginx keeps a mutable "current weight" per peer and picks the largest after adding each
//! peer's weight; that needs a lock. The sequence it produces for fixed weights is periodic
//! with period = the sum of the weights, so we compute one period at build time and walk it
//! with an atomic counter: the same order (5,1,1 -> a a b a c a a), no lock. Weights are
//! divided by their gcd; if the period is still above [`MAX_PERIOD`], weights are scaled
//! down proportionally (each stays >= 1), which keeps the shares to within about 0.1 %.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Balance;
use crate::upstream::Backend;

/// The longest precomputed sequence.
pub const MAX_PERIOD: u64 = 65_536;

/// Smooth weighted round robin over a precomputed period.
#[derive(Debug)]
pub struct Weighted {
    sequence: Vec<u32>,
    next: AtomicUsize,
}

impl Weighted {
    /// Precomputes the smooth sequence for the backends' weights.
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        let weights = reduce(
            backends
                .iter()
                .map(|b| u64::from(b.weight.max(1)))
                .collect(),
        );
        Weighted {
            sequence: smooth_sequence(&weights),
            next: AtomicUsize::new(0),
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn reduce(mut weights: Vec<u64>) -> Vec<u64> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    weights.iter_mut().for_each(|w| *w /= g);
    let total: u64 = weights.iter().sum();
    if total > MAX_PERIOD {
        weights
            .iter_mut()
            .for_each(|w| *w = (*w * MAX_PERIOD / total).max(1));
    }
    weights
}

/// nginx's algorithm run for one period.
fn smooth_sequence(weights: &[u64]) -> Vec<u32> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut sequence = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        sequence.push(best as u32);
    }
    sequence
}

impl Balance for Weighted {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _key: u64,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let len = self.sequence.len();
        if len == 0 || backends.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Walk forward from our slot; the period holds every backend at least once.
        (0..len)
            .map(|i| self.sequence[(start + i) % len] as usize)
            .find(|&i| i < backends.len() && !skip(i))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn follows_nginx_order_for_5_1_1() {
        let p = pool(&[5, 1, 1]);
        let w = Weighted::new(&p);
        let order: String = (0..14)
            .map(|_| match w.pick(&p, 0, NONE) {
                Some(0) => 'a',
                Some(1) => 'b',
                Some(2) => 'c',
                _ => '?',
            })
            .collect();
        assert_eq!(order, "aabacaaaabacaa");
    }

    #[test]
    fn shares_follow_weights() {
        let p = pool(&[3, 2, 1]);
        assert_eq!(counts(&Weighted::new(&p), &p, 600, NONE), [300, 200, 100]);
    }

    #[test]
    fn skipped_backends_leave_the_others_their_ratio() {
        let p = pool(&[3, 2, 1]);
        let c = counts(&Weighted::new(&p), &p, 600, &|i| i == 0);
        assert_eq!(c[0], 0);
        assert!(c[1] > c[2], "{c:?}");
    }

    #[test]
    fn huge_weights_are_scaled_into_a_bounded_period() {
        let p = pool(&[1_000_000, 999_999, 1]);
        let w = Weighted::new(&p);
        assert!(w.sequence.len() as u64 <= MAX_PERIOD + 2);
        let c = counts(&w, &p, w.sequence.len(), NONE);
        assert!(c[2] >= 1);
        assert!((c[0] as i64 - c[1] as i64).abs() <= 2, "{c:?}");
    }
}
