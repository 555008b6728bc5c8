//! Consistent hashing on a ketama-style ring.
//!
//! Each backend owns points on a 64-bit ring (160 per unit of weight, fewer for huge
//! pools), hashed from its address, so the ring depends only on the backend set. A key
//! belongs to the first point clockwise from its hash. When a backend leaves — removed
//! from the config or skipped as unhealthy — only its keys move (to the next points
//! clockwise); every other key keeps its backend.

use std::sync::Arc;

use super::{hash_key, mix, Balance};
use crate::upstream::Backend;

/// Points per unit of weight (ketama's 160).
const POINTS_PER_WEIGHT: u64 = 160;
/// The most points on one ring, so that huge pools and weights stay cheap to build.
const MAX_POINTS: u64 = 1 << 20;

/// A ring of (hash, backend index) points, sorted by hash.
#[derive(Debug)]
pub struct ConsistentHash {
    ring: Vec<(u64, u32)>,
}

impl ConsistentHash {
    /// Builds the ring for the backends' addresses and weights.
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        let total_weight: u64 = backends.iter().map(|b| u64::from(b.weight.max(1))).sum();
        let per_weight = if total_weight * POINTS_PER_WEIGHT > MAX_POINTS {
            (MAX_POINTS / total_weight.max(1)).max(1)
        } else {
            POINTS_PER_WEIGHT
        };
        let mut ring = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            let base = hash_key(b.addr.as_bytes());
            for point in 0..u64::from(b.weight.max(1)) * per_weight {
                ring.push((mix(base ^ mix(point)), i as u32));
            }
        }
        ring.sort_unstable();
        ConsistentHash { ring }
    }
}

impl Balance for ConsistentHash {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        key: u64,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let len = self.ring.len();
        if len == 0 || backends.is_empty() {
            return None;
        }
        let start = self.ring.partition_point(|&(h, _)| h < key);
        // Walk clockwise past skipped backends; bounded by the ring's size.
        (0..len)
            .map(|i| self.ring[(start + i) % len].1 as usize)
            .find(|&i| i < backends.len() && !skip(i))
    }

    fn needs_key(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn owners(
        ch: &ConsistentHash,
        p: &[Arc<Backend>],
        skip: &dyn Fn(usize) -> bool,
    ) -> Vec<String> {
        (0..10_000u64)
            .map(|k| {
                let i = ch
                    .pick(p, hash_key(&k.to_le_bytes()), skip)
                    .unwrap_or(usize::MAX);
                p.get(i).map_or_else(String::new, |b| b.addr.to_string())
            })
            .collect()
    }

    #[test]
    fn same_key_same_backend_and_even_spread() {
        let p = pool(&[1, 1, 1, 1, 1]);
        let ch = ConsistentHash::new(&p);
        assert_eq!(owners(&ch, &p, NONE), owners(&ch, &p, NONE));
        let c = counts(&ch, &p, 10_000, NONE);
        for n in c {
            assert!((1000..=3000).contains(&n), "{n}");
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let p = pool(&[1, 1, 1, 1, 1]);
        let before = owners(&ConsistentHash::new(&p), &p, NONE);
        let fewer: Vec<_> = p
            .iter()
            .filter(|b| &*b.addr != "10.0.0.3:80")
            .cloned()
            .collect();
        let after = owners(&ConsistentHash::new(&fewer), &fewer, NONE);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(b, "10.0.0.3:80", "a key moved off a backend that stayed");
                moved += 1;
            }
        }
        assert!(moved > 1000, "{moved}");
    }

    #[test]
    fn skipping_a_backend_moves_only_its_keys() {
        let p = pool(&[1, 1, 1, 1, 1]);
        let ch = ConsistentHash::new(&p);
        let before = owners(&ch, &p, NONE);
        let after = owners(&ch, &p, &|i| i == 1);
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(b, "10.0.0.2:80");
            }
        }
    }

    #[test]
    fn weights_shift_the_share() {
        let p = pool(&[3, 1]);
        let c = counts(&ConsistentHash::new(&p), &p, 10_000, NONE);
        assert!(c[0] > 6500 && c[0] < 8500, "{c:?}");
    }
}
