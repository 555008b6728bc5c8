//! Backend selection: which backend of an upstream gets the next request.
//!
//! Each algorithm is a small type behind one trait, [`Balance`], built once per upstream
//! from its backend list (on config load or reload) and then shared by every request.
//! `pick` is lock-free (atomics and a thread-local RNG only) and never allocates. Live
//! per-backend state (in-flight count, latency EWMA) stays on [`Backend`]; balancers hold
//! only what they precompute from the list (weights, a smooth sequence, a hash ring) plus
//! a rotation counter (least_conn: each backend's place in the tie-break rotation), so
//! rebuilding one on reload loses nothing that matters.
//!
//! Callers exclude backends with `skip` (unhealthy, ejected, or already tried by this
//! request); every algorithm honours it and spreads load over the rest, and a pick that
//! finds every backend skipped leaves the rotation where it was.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `round_robin`: each backend in turn, ignoring weights.
    RoundRobin,
    /// `weighted`: nginx's smooth weighted round robin.
    Weighted,
    /// `least_conn`: fewest requests in flight relative to weight.
    LeastConn,
    /// `p2c_ewma`: power of two choices on a decaying peak latency EWMA times load.
    P2cEwma,
    /// `random`: weighted random.
    Random,
    /// `consistent_hash`: ketama-style ring on the request's hash key.
    ConsistentHash,
}

impl Algorithm {
    /// Every algorithm, in the order the config documents them.
    pub const ALL: [Algorithm; 6] = [
        Algorithm::RoundRobin,
        Algorithm::Weighted,
        Algorithm::LeastConn,
        Algorithm::P2cEwma,
        Algorithm::Random,
        Algorithm::ConsistentHash,
    ];

    /// The config spelling (`"round_robin"`, `"p2c_ewma"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::Weighted => "weighted",
            Algorithm::LeastConn => "least_conn",
            Algorithm::P2cEwma => "p2c_ewma",
            Algorithm::Random => "random",
            Algorithm::ConsistentHash => "consistent_hash",
        }
    }

    /// Parses the config spelling; `None` for anything else.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// A backend selection algorithm, built from one upstream's backend list.
pub trait Balance: Send + Sync + std::fmt::Debug {
    /// Picks the index of a backend in `backends` (the same slice, same order, the balancer was built from),
    /// never one for which `skip(i)` is true; None only when every backend is skipped.
    /// `key` is the request's hash key (only consistent_hash reads it; others ignore it).
    ///
    /// A pick that finds nothing uses up no turn: callers ask again with fewer backends
    /// skipped (fresh, then tried, then panic mode), and the pick that answers must get
    /// the turn the rotation owes, else a fixed number of empty picks per request would
    /// walk the rotation in steps of that number and land on the same backend each time.
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        key: u64,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize>;

    /// Whether pick reads `key` (so callers compute the hash only when needed).
    fn needs_key(&self) -> bool {
        false
    }

    /// Whether a backend back in rotation should ramp up (slow start) under this
    /// algorithm: callers then skip it at random for part of its share. True unless
    /// skipping moves keys (consistent_hash).
    fn slow_start(&self) -> bool {
        true
    }
}

/// Builds the balancer for `algorithm` over `backends`; pass the same slice to every `pick`.
pub fn build(algorithm: Algorithm, backends: &[Arc<Backend>]) -> Box<dyn Balance> {
    match algorithm {
        Algorithm::RoundRobin => Box::new(RoundRobin::new()),
        Algorithm::Weighted => Box::new(Weighted::new(backends)),
        Algorithm::LeastConn => Box::new(LeastConn::new(backends)),
        Algorithm::P2cEwma => Box::new(P2cEwma::new()),
        Algorithm::Random => Box::new(Random::new(backends)),
        Algorithm::ConsistentHash => Box::new(ConsistentHash::new(backends)),
    }
}

/// Stable 64-bit hash of a key (client IP bytes, a header value, a path): the same on every
/// run, platform and palisade instance (no random seed), and well mixed in every bit.
///
/// FNV-1a 64 over the bytes, then the murmur3 `fmix64` finaliser, which FNV alone needs:
/// its high bits mix poorly for short keys that differ only at the end.
pub fn hash_key(bytes: &[u8]) -> u64 {
    fmix64(fnv1a(FNV_OFFSET, bytes))
}

/// `hash_key` of the concatenation `a ++ b`, without building it.
pub(crate) fn hash_concat(a: &[u8], b: &[u8]) -> u64 {
    fmix64(fnv1a(fnv1a(FNV_OFFSET, a), b))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// A backend's weight as the algorithms use it: the configured one, at least 1.
fn weight_of(backend: &Backend) -> u64 {
    u64::from(backend.weight().max(1))
}

/// First index at or after `start` (wrapping) that `skip` allows, with the steps taken.
/// O(len) only while it meets skipped backends.
/// Weighted random choice among the `(index, weight)` candidates `skip` allows, in one
/// pass with no allocation: candidate `i` is kept with probability
/// `weight_i / weight seen so far` (reservoir sampling), so each wins by its share of the
/// allowed weight. None when every candidate is skipped.
fn weighted_choice(
    candidates: impl Iterator<Item = (usize, u64)>,
    skip: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    let mut seen = 0u64;
    let mut chosen = None;
    for (i, weight) in candidates {
        if skip(i) {
            continue;
        }
        seen += weight;
        if fastrand::u64(..seen) < weight {
            chosen = Some(i);
        }
    }
    chosen
}

pub(crate) fn scan_from(
    start: usize,
    len: usize,
    skip: &dyn Fn(usize) -> bool,
) -> Option<(usize, usize)> {
    let mut i = start;
    for step in 0..len {
        if !skip(i) {
            return Some((i, step));
        }
        i += 1;
        if i == len {
            i = 0;
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Pools and pick counters shared by the algorithms' tests.

    use super::*;

    /// Backends `10.0.0.{i}:80` with the given weights.
    pub fn pool(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Arc::new(Backend::new(&format!("10.0.0.{i}:80"), w)))
            .collect()
    }

    /// How often each backend is picked over `picks` picks (keys 0, 1, 2, ... hashed).
    pub fn counts(
        balancer: &dyn Balance,
        backends: &[Arc<Backend>],
        picks: usize,
        skip: &dyn Fn(usize) -> bool,
    ) -> Vec<usize> {
        let mut counts = vec![0; backends.len()];
        for n in 0..picks {
            let key = hash_key(&(n as u64).to_le_bytes());
            let i = balancer.pick(backends, key, skip).expect("a backend");
            assert!(!skip(i), "picked skipped backend {i}");
            counts[i] += 1;
        }
        counts
    }

    /// Asserts `count / total` is within `tolerance` of `expected`.
    pub fn assert_share(count: usize, total: usize, expected: f64, tolerance: f64) {
        let share = count as f64 / total as f64;
        assert!(
            (share - expected).abs() <= tolerance,
            "share {share:.4} not within {tolerance} of {expected:.4}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn every_backend_skipped_gives_none() {
        for algorithm in Algorithm::ALL {
            let backends = pool(&[1, 2, 3, 4]);
            let balancer = build(algorithm, &backends);
            for key in 0..50 {
                assert_eq!(
                    balancer.pick(&backends, key, &|_| true),
                    None,
                    "{algorithm:?}"
                );
            }
        }
    }

    #[test]
    fn a_pick_that_finds_nothing_uses_up_no_turn() {
        // The upstream asks with every backend skipped a few times before a pick that
        // answers (no healthy backend, then panic mode): the answers must still rotate.
        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::Weighted,
            Algorithm::LeastConn,
        ] {
            for len in 2..=4 {
                let backends = pool(&vec![1; len]);
                let balancer = build(algorithm, &backends);
                let picks: Vec<usize> = (0..2 * len)
                    .map(|_| {
                        for _ in 0..3 {
                            assert_eq!(balancer.pick(&backends, 0, &|_| true), None);
                        }
                        balancer.pick(&backends, 0, &|_| false).expect("a backend")
                    })
                    .collect();
                let expected: Vec<usize> = (0..2 * len).map(|n| n % len).collect();
                assert_eq!(picks, expected, "{algorithm:?} over {len}");
            }
        }
    }

    #[test]
    fn empty_pool_gives_none() {
        for algorithm in Algorithm::ALL {
            let balancer = build(algorithm, &[]);
            assert_eq!(balancer.pick(&[], 7, &|_| false), None, "{algorithm:?}");
        }
    }

    #[test]
    fn single_backend_is_always_picked() {
        for algorithm in Algorithm::ALL {
            let backends = pool(&[3]);
            let balancer = build(algorithm, &backends);
            for key in 0..100 {
                let key = hash_key(&u64::to_le_bytes(key));
                assert_eq!(
                    balancer.pick(&backends, key, &|_| false),
                    Some(0),
                    "{algorithm:?}"
                );
            }
        }
    }

    #[test]
    fn large_pool_with_most_skipped_finds_the_survivors() {
        for algorithm in Algorithm::ALL {
            let backends = pool(&[1; 1000]);
            let balancer = build(algorithm, &backends);
            let skip = |i: usize| i != 17 && i != 900;
            let counts = counts(balancer.as_ref(), &backends, 2000, &skip);
            assert_eq!(counts[17] + counts[900], 2000, "{algorithm:?}");
            assert!(
                counts[17] > 0 && counts[900] > 0,
                "{algorithm:?}: {}/{}",
                counts[17],
                counts[900]
            );
        }
    }

    #[test]
    fn only_consistent_hash_needs_the_key_and_skips_slow_start() {
        for algorithm in Algorithm::ALL {
            let balancer = build(algorithm, &pool(&[1, 1]));
            assert_eq!(balancer.needs_key(), algorithm == Algorithm::ConsistentHash);
            assert_eq!(
                balancer.slow_start(),
                algorithm != Algorithm::ConsistentHash
            );
        }
    }

    #[test]
    fn algorithm_names_round_trip() {
        for algorithm in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(algorithm.name()), Some(algorithm));
        }
        assert_eq!(Algorithm::from_name("roundrobin"), None);
    }

    #[test]
    fn hash_key_is_stable_and_mixed() {
        // Pinned values: changing the hash would remap every consistent_hash key in a fleet.
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c); // published FNV-1a vector
        assert_eq!(hash_key(b""), PINNED_EMPTY);
        assert_eq!(hash_key(b"127.0.0.1"), PINNED_LOOPBACK);
        assert_eq!(hash_concat(b"127.0.", b"0.1"), hash_key(b"127.0.0.1"));
        // Keys differing in one trailing byte differ in about half the bits.
        for n in 0u8..=255 {
            let a = hash_key(&[10, 0, 0, n]);
            let b = hash_key(&[10, 0, 0, n.wrapping_add(1)]);
            let flipped = (a ^ b).count_ones();
            assert!((16..=48).contains(&flipped), "{n}: {flipped} bits");
        }
    }

    const PINNED_EMPTY: u64 = 17_280_346_270_528_514_342;
    const PINNED_LOOPBACK: u64 = 14_906_417_390_966_373_154;
}
