//! Per-route rate limits: GCRA (governor), keyed by client IP or by a request header.
//!
//! Memory stays bounded under a flood of distinct keys. Keys whose bucket is back to full
//! are pruned on a timer ([`RateLimiter::prune`]), and the number of keys is capped at
//! [`MAX_KEYS`]: once the cap is reached, keys the limiter has not seen yet share one
//! overflow bucket with the route's quota, while keys it already tracks keep their own.
//! A flood from a million addresses therefore gets one route-sized limit between them,
//! and clients that were there before the flood are not punished for it.

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use governor::Quota;
use http::HeaderMap;

use crate::config::{LimitKey, LimitStore, RateLimit};

use super::shared::SharedLimit;

/// The most keys one route's limiter tracks.
pub const MAX_KEYS: usize = 1_000_000;

/// What a request is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// A client address.
    Ip(IpAddr),
    /// A header value, hashed with a per-process random seed.
    Header(u64),
    /// The bucket shared by new keys once the limiter is full.
    Overflow,
}

/// A DashMap store that sends unseen keys to [`Key::Overflow`] once it holds `cap` keys.
///
/// Hashed with foldhash (randomly seeded per store; hashbrown's default) rather than
/// SipHash: two hashes per check (shard, then slot) were 700 of the ~2,000 instructions a
/// rate-limited request adds. Keys are addresses or already-seeded hashes of header
/// values, and the key count is capped, so a client cannot grow a collision chain at will.
#[derive(Debug)]
pub struct CappedStore {
    inner: DashMapStateStore<Key, foldhash::quality::RandomState>,
    cap: usize,
    /// Whether the store was at its cap when last counted. Counting locks every shard, so
    /// each thread recounts every [`RECOUNT_EVERY`] checks (every check for small caps):
    /// a flood overshoots the cap by at most that many keys per thread.
    full: std::sync::atomic::AtomicBool,
}

/// How many checks a thread makes between two counts of a large store.
const RECOUNT_EVERY: u32 = 256;

impl CappedStore {
    fn is_full(&self) -> bool {
        thread_local! {
            static CHECKS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        }
        let n = CHECKS.with(|c| {
            let n = c.get().wrapping_add(1);
            c.set(n);
            n
        });
        if self.cap < 65_536 || n.is_multiple_of(RECOUNT_EVERY) {
            let full = self.inner.len() >= self.cap;
            self.full.store(full, std::sync::atomic::Ordering::Relaxed);
            return full;
        }
        self.full.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl StateStore for CappedStore {
    type Key = Key;

    fn measure_and_replace<T, F, E>(&self, key: &Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let key = if self.is_full() && !self.inner.contains_key(key) {
            &Key::Overflow
        } else {
            key
        };
        self.inner.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<Key> for CappedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&self.inner, drop_below);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&self.inner);
    }

    fn len(&self) -> usize {
        self.inner.len()
    }

    fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

/// A refusal: how long until the client may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Whole seconds, at least 1.
    pub retry_after_secs: u64,
}

/// One route's limiter.
#[derive(Debug)]
pub struct RateLimiter {
    limiter: governor::RateLimiter<Key, CappedStore, DefaultClock>,
    key: LimitKey,
    seed: std::collections::hash_map::RandomState,
    /// The configuration it was built from (a reload keeps the limiter when this is equal).
    pub config: RateLimit,
    /// With `store = "redis"`: the limit every instance shares; the local limiter above
    /// decides while Redis is unreachable.
    shared: Option<std::sync::Arc<SharedLimit>>,
}

impl RateLimiter {
    /// A limiter for `config`, tracking at most `cap` keys.
    pub fn new(config: &RateLimit, cap: usize) -> Self {
        let period = Duration::from_secs_f64(1.0 / config.requests_per_second.max(1e-9));
        let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        let store = CappedStore {
            inner: DashMapStateStore::with_hasher(foldhash::quality::RandomState::default()),
            cap: cap.max(1),
            full: std::sync::atomic::AtomicBool::new(false),
        };
        RateLimiter {
            limiter: governor::RateLimiter::new(quota, store, DefaultClock::default()),
            key: config.key.clone(),
            seed: std::collections::hash_map::RandomState::new(),
            config: config.clone(),
            shared: None,
        }
    }

    /// The limiter of route `route`: with `store = "redis"`, shared through Redis (its
    /// connection opens in the background once [`RateLimiter::start`] runs), with this
    /// instance's local limiter as the fallback.
    pub fn for_route(
        route: &str,
        config: &RateLimit,
        cap: usize,
        metrics: &crate::metrics::Metrics,
    ) -> Self {
        let mut limiter = RateLimiter::new(config, cap);
        if let LimitStore::Redis { url } = &config.store {
            match SharedLimit::new(route, config, url, metrics.limit_store(route)) {
                Ok(shared) => limiter.shared = Some(std::sync::Arc::new(shared)),
                // Validation accepts only redis:// and rediss:// URLs; one the client
                // still refuses leaves the route limited per instance, loudly.
                Err(e) => {
                    tracing::error!(route, error = %e, "rate limit store unusable; limiting per instance")
                }
            }
        }
        limiter
    }

    /// Starts the background work of a shared limit (connecting to Redis). Idempotent.
    pub fn start(&self) {
        if let Some(shared) = &self.shared {
            shared.start();
        }
    }

    /// The shared (Redis) part of this limiter, if it has one.
    pub fn shared(&self) -> Option<&SharedLimit> {
        self.shared.as_deref()
    }

    /// Counts one request of `client_ip` with `headers`: in Redis when the limit is
    /// shared and Redis answers, else in this instance.
    pub async fn admit(&self, client_ip: IpAddr, headers: &HeaderMap) -> Result<(), Limited> {
        if let Some(shared) = &self.shared {
            // Boxed: only Redis-backed routes pay for the Redis call's state.
            let key = shared.key(client_ip, headers);
            if let Some(verdict) = Box::pin(shared.check(&key)).await {
                return verdict;
            }
        }
        self.check(&self.key(client_ip, headers))
    }

    /// The key of a request: its client IP, or its header value (the client IP when the
    /// header is absent).
    pub fn key(&self, client_ip: IpAddr, headers: &HeaderMap) -> Key {
        match &self.key {
            LimitKey::ClientIp => Key::Ip(client_ip),
            LimitKey::Header(name) => headers.get(name).map_or(Key::Ip(client_ip), |v| {
                Key::Header(self.seed.hash_one(v.as_bytes()))
            }),
        }
    }

    /// Counts one request for `key`, or says how long to wait.
    pub fn check(&self, key: &Key) -> Result<(), Limited> {
        self.limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            // Round up: a client that waits Retry-After seconds must pass.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Limited {
                retry_after_secs: secs.max(1),
            }
        })
    }

    /// Drops keys whose bucket is full again (indistinguishable from a new key).
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys tracked right now.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }

    /// The `RateLimit-Policy` value (IETF draft-ietf-httpapi-ratelimit-headers):
    /// the burst as quota over the window in which it refills.
    pub fn policy(&self) -> (u32, u64) {
        let window = (f64::from(self.config.burst) / self.config.requests_per_second).ceil();
        (self.config.burst, (window as u64).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rps: f64, burst: u32) -> RateLimit {
        RateLimit {
            requests_per_second: rps,
            burst,
            key: LimitKey::ClientIp,
            store: crate::config::LimitStore::Local,
        }
    }

    fn ip(last: u8) -> Key {
        Key::Ip(IpAddr::from([127, 0, 0, last]))
    }

    #[test]
    fn a_burst_passes_then_the_next_waits_about_a_period() {
        let l = RateLimiter::new(&config(0.5, 3), MAX_KEYS);
        for _ in 0..3 {
            assert_eq!(l.check(&ip(1)), Ok(()));
        }
        // 0.5 rps: the next token in 2 s.
        assert_eq!(
            l.check(&ip(1)),
            Err(Limited {
                retry_after_secs: 2
            })
        );
        // Another client is not affected.
        assert_eq!(l.check(&ip(2)), Ok(()));
    }

    #[test]
    fn header_keys_fall_back_to_the_client_ip() {
        let mut cfg = config(1.0, 1);
        cfg.key = LimitKey::Header(http::HeaderName::from_static("x-api-key"));
        let l = RateLimiter::new(&cfg, MAX_KEYS);
        let mut h = HeaderMap::new();
        assert_eq!(
            l.key(IpAddr::from([1, 2, 3, 4]), &h),
            Key::Ip(IpAddr::from([1, 2, 3, 4]))
        );
        h.insert("x-api-key", http::HeaderValue::from_static("k1"));
        let k1 = l.key(IpAddr::from([1, 2, 3, 4]), &h);
        assert!(matches!(k1, Key::Header(_)));
        assert_eq!(
            k1,
            l.key(IpAddr::from([9, 9, 9, 9]), &h),
            "the key follows the header, not the IP"
        );
    }

    #[test]
    fn at_the_cap_new_keys_share_one_bucket_and_known_keys_keep_theirs() {
        let l = RateLimiter::new(&config(0.001, 2), 3);
        for i in 1..=3 {
            assert_eq!(l.check(&ip(i)), Ok(()));
        }
        assert_eq!(l.len(), 3);
        // New keys 4.. share the overflow bucket: burst 2 between all of them.
        assert_eq!(l.check(&ip(4)), Ok(()));
        assert_eq!(l.check(&ip(5)), Ok(()));
        assert!(l.check(&ip(6)).is_err());
        assert!(l.check(&ip(7)).is_err());
        // Known key 1 still has the second token of its own burst.
        assert_eq!(l.check(&ip(1)), Ok(()));
        // Bounded: the three keys plus the overflow bucket.
        assert!(l.len() <= 4);
    }

    #[test]
    fn pruning_drops_full_buckets() {
        let l = RateLimiter::new(&config(1_000_000.0, 1), MAX_KEYS);
        for i in 0..100u8 {
            let _ = l.check(&ip(i));
        }
        assert_eq!(l.len(), 100);
        std::thread::sleep(Duration::from_millis(5));
        l.prune();
        assert_eq!(l.len(), 0);
    }
}
