//! `consistent_hash`: a ketama-style ring, so a key keeps its backend while the pool changes.
//!
//! Each backend owns points on a 64-bit ring, hashed from its address and the point's
//! number; a key belongs to the first point at or after its hash (clockwise). Points
//! depend only on the backend's own address and weight, so when a backend leaves, the
//! other backends' points stay put and only the keys that were on it move.

use std::sync::Arc;

use super::{hash_concat, weight_of, Balance};
use crate::upstream::Backend;

/// Ring points per unit of weight, as in ketama (160 = 40 MD5 digests × 4).
pub const POINTS_PER_WEIGHT: u64 = 160;

/// Ring size above which fewer points per unit of weight are used (12 bytes a point,
/// so at most ~3 MiB per upstream).
///
/// Points per unit of weight halve (160, 80, 40, ... 1) until the ring fits, so the count
/// changes only when the total weight crosses a power-of-two step (1,638, 3,276, ...
/// with 160 → 80 at the first). Within a step a departing backend moves only its own
/// keys; a change that crosses a step remaps more. If even 1 point per unit is too many,
/// each backend gets `max(1, weight * MAX_RING_POINTS / total weight)` points.
pub const MAX_RING_POINTS: u64 = 1 << 18;

/// Ring points walked past skipped backends before checking, in one O(n) scan, that
/// some backend is allowed at all (so "all skipped" costs O(n), not O(ring)).
const WALK_BEFORE_CHECK: usize = 64;

/// Consistent hashing on a sorted ring of `(point hash, backend index)`.
///
/// A pick is a binary search; on skip it walks clockwise to the next point of an allowed
/// backend, which is exactly where the key would land on a ring rebuilt without the
/// skipped backends, so ejecting a backend and removing it agree.
#[derive(Debug)]
pub struct ConsistentHash {
    /// Point hashes, ascending (kept apart from `owners` so the search touches less memory).
    points: Box<[u64]>,
    /// `owners[k]` is the index of the backend that owns `points[k]`.
    owners: Box<[u32]>,
}

impl ConsistentHash {
    /// Builds the ring for `backends` (O(p log p) for p points).
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        let total_weight: u64 = backends.iter().map(|b| weight_of(b)).sum();
        let mut per_weight = POINTS_PER_WEIGHT;
        while per_weight > 1 && total_weight * per_weight > MAX_RING_POINTS {
            per_weight /= 2;
        }
        let points_of = |w: u64| {
            if total_weight * per_weight <= MAX_RING_POINTS {
                w * per_weight
            } else {
                (w * MAX_RING_POINTS / total_weight).max(1)
            }
        };
        let mut ring: Vec<(u64, u32)> = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            for point in 0..points_of(weight_of(b)) {
                // Fixed-width point number: (addr, point) -> bytes is injective.
                let hash = hash_concat(b.addr.as_bytes(), &(point as u32).to_le_bytes());
                ring.push((hash, i as u32));
            }
        }
        // Ties (equal addresses) go to the lower index, deterministically.
        ring.sort_unstable();
        Self {
            points: ring.iter().map(|&(h, _)| h).collect(),
            owners: ring.iter().map(|&(_, i)| i).collect(),
        }
    }
}

impl Balance for ConsistentHash {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        key: u64,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let len = self.points.len();
        if len == 0 || backends.is_empty() {
            return None;
        }
        let mut pos = self.points.partition_point(|&p| p < key);
        for step in 0..len {
            if pos == len {
                pos = 0;
            }
            let i = self.owners[pos] as usize;
            if i < backends.len() && !skip(i) {
                return Some(i);
            }
            if step == WALK_BEFORE_CHECK && (0..backends.len()).all(skip) {
                return None;
            }
            pos += 1;
        }
        None
    }

    fn needs_key(&self) -> bool {
        true
    }

    /// No slow start, as in nginx (`slow_start` cannot be used with `hash`) and Envoy
    /// (slow start is for round robin and least request only): a ramping backend is
    /// skipped at random, and a skipped backend's keys go to the next point on the ring,
    /// so ramping moved keys back and forth for the whole window, and every backend's
    /// keys when all came back together (from panic mode). A returning backend takes its
    /// own keys back at once; no other key moves.
    fn slow_start(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::super::hash_key;
    use super::super::test_util::*;
    use super::*;

    fn key(n: usize) -> u64 {
        hash_key(format!("client-{n}").as_bytes())
    }

    /// The address each of `keys` keys maps to.
    fn assignment(
        backends: &[Arc<Backend>],
        skip: &dyn Fn(usize) -> bool,
        keys: usize,
    ) -> Vec<Box<str>> {
        let ring = ConsistentHash::new(backends);
        (0..keys)
            .map(|n| {
                backends[ring.pick(backends, key(n), skip).unwrap()]
                    .addr
                    .clone()
            })
            .collect()
    }

    #[test]
    fn same_key_same_backend() {
        let backends = pool(&[1, 1, 1, 1, 1]);
        let ring = ConsistentHash::new(&backends);
        let again = ConsistentHash::new(&backends);
        for n in 0..1_000 {
            let first = ring.pick(&backends, key(n), &|_| false);
            for _ in 0..3 {
                assert_eq!(ring.pick(&backends, key(n), &|_| false), first);
            }
            assert_eq!(again.pick(&backends, key(n), &|_| false), first);
        }
    }

    #[test]
    fn keys_spread_over_backends() {
        let backends = pool(&[1, 1, 1, 1, 1]);
        let ring = ConsistentHash::new(&backends);
        let c = counts(&ring, &backends, 10_000, &|_| false);
        for n in c {
            assert!((1_000..=3_000).contains(&n), "{n} of 10000");
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let backends = pool(&[1, 1, 1, 1, 1]);
        let before = assignment(&backends, &|_| false, 10_000);
        for gone in 0..backends.len() {
            let mut rest = backends.clone();
            let removed = rest.remove(gone);
            let after = assignment(&rest, &|_| false, 10_000);
            let mut moved = 0;
            for (b, a) in before.iter().zip(&after) {
                if b != a {
                    assert_eq!(*b, removed.addr, "a key moved off a backend that stayed");
                    moved += 1;
                } else {
                    assert_ne!(*a, removed.addr);
                }
            }
            let on_removed = before.iter().filter(|a| **a == removed.addr).count();
            assert_eq!(moved, on_removed);
        }
    }

    #[test]
    fn skipping_matches_removing() {
        let backends = pool(&[1, 2, 1, 3, 1]);
        let before = assignment(&backends, &|_| false, 10_000);
        for gone in 0..backends.len() {
            let skipped = assignment(&backends, &|i| i == gone, 10_000);
            let mut rest = backends.clone();
            rest.remove(gone);
            assert_eq!(skipped, assignment(&rest, &|_| false, 10_000));
            for (b, s) in before.iter().zip(&skipped) {
                assert!(b == s || *b == backends[gone].addr);
            }
        }
    }

    #[test]
    fn adding_a_backend_takes_keys_only_for_itself() {
        let backends = pool(&[1, 1, 1, 1, 1, 1]);
        let before = assignment(&backends[..5], &|_| false, 10_000);
        let after = assignment(&backends, &|_| false, 10_000);
        for (b, a) in before.iter().zip(&after) {
            assert!(b == a || *a == backends[5].addr);
        }
    }

    #[test]
    fn weights_shift_the_share() {
        let backends = pool(&[1, 1, 3]);
        let ring = ConsistentHash::new(&backends);
        let c = counts(&ring, &backends, 20_000, &|_| false);
        assert_share(c[2], 20_000, 3.0 / 5.0, 0.06);
        assert_share(c[0], 20_000, 1.0 / 5.0, 0.06);
    }

    #[test]
    fn large_pools_are_capped() {
        let backends = pool(&[1; 2_000]);
        let ring = ConsistentHash::new(&backends);
        assert_eq!(ring.points.len(), 2_000 * 80);
        let heavy = pool(&[u32::MAX, 1]);
        let ring = ConsistentHash::new(&heavy);
        assert!(ring.points.len() as u64 <= MAX_RING_POINTS + 2);
        assert!(ring.owners.contains(&1));
    }
}
