//! Upstream pools: the backends of one `[upstreams.NAME]`, how to pick one, how to reach it.
//!
//! Discovery (the backend list), selection (`balance`) and health (`Backend::healthy`, set by
//! the health module) are independent pieces; a pool only ties them together for a snapshot.

pub mod backend;
pub mod client;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Version};

use crate::balance::{self, Balance};
use crate::config;
pub use backend::Backend;
pub use client::HttpClient;

/// One upstream as the hot path sees it: immutable for the life of a snapshot, except for
/// the backends' atomics.
#[derive(Debug)]
pub struct Upstream {
    /// The upstream's name (the key under `[upstreams]`).
    pub name: Arc<str>,
    /// Its backends, in config order.
    pub backends: Vec<Arc<Backend>>,
    /// The selection algorithm, built for `backends`.
    pub balancer: Box<dyn Balance>,
    /// The pooled client that reaches the backends.
    pub client: HttpClient,
    /// The HTTP version of upstream requests (1.1, or 2 for h2c).
    pub version: Version,
    /// The upstream's configuration, as validated.
    pub config: config::Upstream,
}

impl Upstream {
    /// Builds the pool for `cfg`. Backends, and the client with its open connections, are
    /// carried over from `previous` (the same upstream in the running snapshot) where they
    /// are unchanged, so a reload keeps their live state.
    pub fn build(cfg: &config::Upstream, previous: Option<&Upstream>) -> Upstream {
        let backends: Vec<Arc<Backend>> = cfg
            .backends
            .iter()
            .map(|b| {
                previous
                    .and_then(|p| {
                        p.backends
                            .iter()
                            .find(|old| *old.addr == *b.addr && old.weight == b.weight)
                    })
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Backend::new(&b.addr, b.weight)))
            })
            .collect();
        let client = match previous {
            Some(p)
                if p.config.protocol == cfg.protocol
                    && p.config.timeouts.connect == cfg.timeouts.connect =>
            {
                p.client.clone()
            }
            _ => client::build(cfg.protocol, cfg.timeouts.connect),
        };
        let balancer = balance::build(algorithm(cfg.balance), &backends);
        Upstream {
            name: cfg.name.as_str().into(),
            backends,
            balancer,
            client,
            version: match cfg.protocol {
                config::Protocol::Http1 => Version::HTTP_11,
                config::Protocol::H2c => Version::HTTP_2,
            },
            config: cfg.clone(),
        }
    }

    /// Picks a backend for a request with hash key `key`, skipping unavailable ones.
    /// With none available it still picks among all of them (panic mode: trying a backend
    /// believed down beats failing every request).
    pub fn pick(&self, key: u64) -> Option<&Arc<Backend>> {
        let backends = &self.backends;
        let index = self
            .balancer
            .pick(backends, key, &|i| !backends[i].is_available())
            .or_else(|| self.balancer.pick(backends, key, &|_| false))?;
        backends.get(index)
    }

    /// The response timeout (until the response head has arrived).
    pub fn response_timeout(&self) -> Duration {
        self.config.timeouts.response
    }

    /// The hash key of a request for `consistent_hash` (0 for other algorithms, which do
    /// not read it). A missing header falls back to the client address.
    pub fn hash_key(&self, client_ip: IpAddr, headers: &HeaderMap, path: &str) -> u64 {
        if !self.balancer.needs_key() {
            return 0;
        }
        let ip_key = || match client_ip {
            IpAddr::V4(v4) => balance::hash_key(&v4.octets()),
            IpAddr::V6(v6) => balance::hash_key(&v6.octets()),
        };
        match &self.config.hash_key {
            config::HashKey::ClientIp => ip_key(),
            config::HashKey::Path => balance::hash_key(path.as_bytes()),
            config::HashKey::Header(name) => headers
                .get(name)
                .map_or_else(ip_key, |v| balance::hash_key(v.as_bytes())),
        }
    }
}

fn algorithm(balance: config::Balance) -> balance::Algorithm {
    match balance {
        config::Balance::RoundRobin => balance::Algorithm::RoundRobin,
        config::Balance::Weighted => balance::Algorithm::Weighted,
        config::Balance::LeastConn => balance::Algorithm::LeastConn,
        config::Balance::P2cEwma => balance::Algorithm::P2cEwma,
        config::Balance::Random => balance::Algorithm::Random,
        config::Balance::ConsistentHash => balance::Algorithm::ConsistentHash,
    }
}
