//! Backend selection: one small type per algorithm behind the [`Balance`] trait.
//!
//! A balancer is built once per snapshot for a fixed backend list and then only reads
//! atomics: picking takes no lock and allocates nothing. Callers pass `skip` to exclude
//! backends that are out of rotation or were already tried by this request; every
//! algorithm honours it and spreads load sensibly over the rest.

mod consistent_hash;
mod least_conn;
mod p2c_ewma;
mod random;
mod round_robin;
mod weighted;

use std::sync::Arc;

use crate::upstream::Backend;

pub use consistent_hash::ConsistentHash;
pub use least_conn::LeastConn;
pub use p2c_ewma::P2cEwma;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use weighted::Weighted;

/// Which algorithm; mirrors the config's `balance` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Each backend in turn.
    RoundRobin,
    /// Smooth weighted round robin (nginx's).
    Weighted,
    /// Fewest in-flight requests relative to weight.
    LeastConn,
    /// Power of two random choices over latency EWMA x in-flight.
    P2cEwma,
    /// Weighted random.
    Random,
    /// Ketama-style hash ring over the request's hash key.
    ConsistentHash,
}

/// A backend selection algorithm for one fixed backend list.
pub trait Balance: Send + Sync + std::fmt::Debug {
    /// Picks the index of a backend in `backends` (the same slice, same order, the balancer
    /// was built from), never one for which `skip(i)` is true; None only when every backend
    /// is skipped. `key` is the request's hash key (only consistent_hash reads it).
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        key: u64,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize>;

    /// Whether `pick` reads `key` (so callers compute the hash only when needed).
    fn needs_key(&self) -> bool {
        false
    }
}

/// Builds the balancer for `backends`.
pub fn build(algorithm: Algorithm, backends: &[Arc<Backend>]) -> Box<dyn Balance> {
    match algorithm {
        Algorithm::RoundRobin => Box::new(RoundRobin::new()),
        Algorithm::Weighted => Box::new(Weighted::new(backends)),
        Algorithm::LeastConn => Box::new(LeastConn::new()),
        Algorithm::P2cEwma => Box::new(P2cEwma::new()),
        Algorithm::Random => Box::new(Random::new(backends)),
        Algorithm::ConsistentHash => Box::new(ConsistentHash::new(backends)),
    }
}

/// Stable 64-bit hash of a key (client IP bytes, a header value, a path): the same on every
/// run and every palisade instance (no random seed). FNV-1a, then the splitmix64 finaliser
/// so that similar keys land far apart.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finaliser: a bijective avalanche of 64 bits.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The first index at or after `start` (wrapping) that is not skipped.
pub(crate) fn next_available(
    n: usize,
    start: usize,
    skip: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    (0..n).map(|i| (start + i) % n).find(|&i| !skip(i))
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn pool(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Arc::new(Backend::new(&format!("10.0.0.{}:80", i + 1), w)))
            .collect()
    }

    pub fn counts(
        b: &dyn Balance,
        pool: &[Arc<Backend>],
        n: usize,
        skip: &dyn Fn(usize) -> bool,
    ) -> Vec<usize> {
        let mut counts = vec![0; pool.len()];
        for i in 0..n {
            let key = hash_key(&(i as u64).to_le_bytes());
            if let Some(idx) = b.pick(pool, key, skip) {
                counts[idx] += 1;
            }
        }
        counts
    }

    pub const NONE: &dyn Fn(usize) -> bool = &|_| false;
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    const ALL: [Algorithm; 6] = [
        Algorithm::RoundRobin,
        Algorithm::Weighted,
        Algorithm::LeastConn,
        Algorithm::P2cEwma,
        Algorithm::Random,
        Algorithm::ConsistentHash,
    ];

    #[test]
    fn every_algorithm_returns_none_when_all_are_skipped_or_empty() {
        for alg in ALL {
            let p = pool(&[1, 1, 1]);
            let b = build(alg, &p);
            assert_eq!(b.pick(&p, 7, &|_| true), None, "{alg:?}");
            let empty: Vec<Arc<Backend>> = vec![];
            let b = build(alg, &empty);
            assert_eq!(b.pick(&empty, 7, NONE), None, "{alg:?}");
        }
    }

    #[test]
    fn every_algorithm_picks_the_only_backend_and_honours_skip() {
        for alg in ALL {
            let p = pool(&[1]);
            let b = build(alg, &p);
            for k in 0..50 {
                assert_eq!(b.pick(&p, k, NONE), Some(0), "{alg:?}");
            }
            let p = pool(&[1, 1, 1]);
            let b = build(alg, &p);
            let c = counts(b.as_ref(), &p, 300, &|i| i == 1);
            assert_eq!(c[1], 0, "{alg:?} picked a skipped backend");
            assert!(c[0] > 0 && c[2] > 0, "{alg:?} {c:?}");
        }
    }

    #[test]
    fn hash_key_is_stable_and_spreads() {
        assert_eq!(hash_key(b"abc"), hash_key(b"abc"));
        assert_ne!(hash_key(b"abc"), hash_key(b"abd"));
        // Pinned: the same on every instance and every run.
        assert_eq!(hash_key(b""), mix(0xcbf2_9ce4_8422_2325));
    }
}
