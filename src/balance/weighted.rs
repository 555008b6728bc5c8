//! `weighted`: nginx's smooth weighted round robin, precomputed so picks are lock-free.
//!
//! nginx keeps a mutable `current_weight` per peer under a lock. Its output is periodic,
//! with period the sum of the weights, so we run it once at build time, store the period
//! (backend indices), and index it with an atomic counter: the same interleaving (weights
//! 5,1,1 give `a a b a c a a`), one `fetch_add` per pick.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{weight_of, Balance};
use crate::upstream::Backend;

/// Longest precomputed sequence (the sum of the reduced weights).
///
/// Weights are first divided by their gcd; if the sum is still above this, each is scaled
/// to `max(1, weight * MAX_SEQUENCE / sum)`, so shares stay proportional to within a
/// rounding step and no backend drops out. The sequence is then at most
/// `MAX_SEQUENCE + backends` long (256 KiB of `u32`).
pub const MAX_SEQUENCE: u64 = 65_536;

/// Sequence positions a pick walks past skipped backends before falling back to one
/// weighted scan of the backends (which also settles "all skipped" in O(n)).
const MAX_WALK: usize = 64;

/// Smooth weighted round robin over a precomputed sequence.
///
/// On skip the pick walks forward in the sequence and moves the counter past the
/// skipped slots, so the remaining backends keep their relative weights (5,1,1 with the
/// `1` skipped serves the other two 5:1).
#[derive(Debug)]
pub struct Weighted {
    /// One period of nginx's smooth sequence, as backend indices.
    sequence: Box<[u32]>,
    /// The reduced weights the sequence was built from, for the fallback scan.
    weights: Box<[u64]>,
    next: AtomicUsize,
}

impl Weighted {
    /// Precomputes the smooth sequence for `backends` (O(sum of reduced weights × n)).
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        let weights = reduced_weights(backends);
        let sequence = smooth_sequence(&weights);
        Self {
            sequence: sequence.into_boxed_slice(),
            weights: weights.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }

    /// Weighted random choice among the allowed backends ([`super::weighted_choice`]).
    fn fallback(&self, len: usize, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        super::weighted_choice(self.weights.iter().copied().enumerate().take(len), skip)
    }
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
        let mut pos = self.next.fetch_add(1, Ordering::Relaxed) % len;
        let walk = len.min(MAX_WALK);
        for step in 0..walk {
            let i = self.sequence[pos] as usize;
            if i < backends.len() && !skip(i) {
                if step > 0 {
                    self.next.fetch_add(step, Ordering::Relaxed);
                }
                return Some(i);
            }
            pos += 1;
            if pos == len {
                pos = 0;
            }
        }
        let found = if walk == len {
            // The whole period was walked: it names every backend, all skipped.
            None
        } else {
            self.fallback(backends.len(), skip)
        };
        if found.is_none() {
            // Give the turn back (see `Balance::pick`).
            self.next.fetch_sub(1, Ordering::Relaxed);
        }
        found
    }
}

/// Weights divided by their gcd, then scaled down if their sum exceeds [`MAX_SEQUENCE`].
fn reduced_weights(backends: &[Arc<Backend>]) -> Vec<u64> {
    let mut weights: Vec<u64> = backends.iter().map(|b| weight_of(b)).collect();
    divide_by_gcd(&mut weights);
    let sum: u64 = weights.iter().sum();
    if sum > MAX_SEQUENCE {
        for w in &mut weights {
            *w = (*w * MAX_SEQUENCE / sum).max(1);
        }
        divide_by_gcd(&mut weights);
    }
    weights
}

fn divide_by_gcd(weights: &mut [u64]) {
    let g = weights.iter().fold(0, |g, &w| gcd(g, w));
    if g > 1 {
        for w in weights {
            *w /= g;
        }
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One period of nginx's smooth weighted round robin (`ngx_http_upstream_get_peer`):
/// every round each peer's current weight grows by its weight, the largest (first on
/// ties) is chosen and loses the total.
fn smooth_sequence(weights: &[u64]) -> Vec<u32> {
    let total: u64 = weights.iter().sum();
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
        current[best] -= total as i64;
        sequence.push(best as u32);
    }
    sequence
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn order(
        w: &Weighted,
        backends: &[Arc<Backend>],
        n: usize,
        skip: &dyn Fn(usize) -> bool,
    ) -> Vec<usize> {
        (0..n).map(|_| w.pick(backends, 0, skip).unwrap()).collect()
    }

    #[test]
    fn nginx_sequence() {
        let backends = pool(&[5, 1, 1]);
        let w = Weighted::new(&backends);
        let period = [0, 0, 1, 0, 2, 0, 0]; // a a b a c a a
        let expected: Vec<usize> = period.iter().copied().cycle().take(21).collect();
        assert_eq!(order(&w, &backends, 21, &|_| false), expected);
    }

    #[test]
    fn exact_shares() {
        let backends = pool(&[3, 2, 1]);
        let w = Weighted::new(&backends);
        assert_eq!(counts(&w, &backends, 600, &|_| false), [300, 200, 100]);
    }

    #[test]
    fn gcd_is_reduced() {
        let backends = pool(&[50, 10, 10]);
        let w = Weighted::new(&backends);
        assert_eq!(w.sequence.len(), 7);
        assert_eq!(order(&w, &backends, 7, &|_| false), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn skip_keeps_the_others_in_proportion() {
        let backends = pool(&[5, 1, 1]);
        let w = Weighted::new(&backends);
        assert_eq!(counts(&w, &backends, 600, &|i| i == 2), [500, 100, 0]);
        assert_eq!(counts(&w, &backends, 600, &|i| i == 0), [0, 300, 300]);
    }

    #[test]
    fn huge_weights_are_scaled_keeping_every_backend() {
        let backends = pool(&[1_000_000, 1, 500_000]);
        let w = Weighted::new(&backends);
        assert!(w.sequence.len() as u64 <= MAX_SEQUENCE + 3);
        assert!(w.sequence.contains(&1));
        let total = w.sequence.len();
        let c = counts(&w, &backends, total, &|_| false);
        assert_share(c[0], total, 2.0 / 3.0, 0.001);
        assert_share(c[2], total, 1.0 / 3.0, 0.001);
        assert_eq!(c[1], 1);
    }

    #[test]
    fn long_skipped_runs_fall_back_by_weight() {
        // 200 backends; the first 150 skipped is longer than the walk, so the fallback runs.
        let mut weights = vec![1; 200];
        weights[199] = 3;
        let backends = pool(&weights);
        let w = Weighted::new(&backends);
        let c = counts(&w, &backends, 5_300, &|i| i < 150);
        assert_eq!(c[..150].iter().sum::<usize>(), 0);
        // 49 backends of weight 1 and one of weight 3: the heavy one gets ~3/52.
        assert_share(c[199], 5_300, 3.0 / 52.0, 0.02);
        assert!(c[150..199].iter().all(|&n| n > 0));
    }
}
