//! DNS backends: names among the backends are resolved at start and every
//! `resolve_every`; each address becomes a backend of its own.
//!
//! A change of the address set rebuilds the snapshot (same generation: it is not a config
//! reload), so new addresses join the pool and vanished ones leave it; backends that stay
//! keep their state. A failed lookup keeps the last good set. The lookup itself is behind
//! [`Resolve`] so tests can drive it; palisade uses the system resolver (getaddrinfo,
//! which honours /etc/hosts).

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::snapshot::ProxyState;

/// Resolved addresses by backend name (`host:port` as configured), each list sorted.
pub type Resolved = BTreeMap<String, Vec<SocketAddr>>;

/// A boxed lookup future.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Turns `host:port` into addresses.
pub trait Resolve: Send + Sync {
    /// Looks `name` (`host:port`) up.
    fn resolve<'a>(&'a self, name: &'a str) -> Lookup<'a>;
}

/// The system resolver.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> Lookup<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.collect()) })
    }
}

/// How long one round of lookups may take before the last good answers are kept.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The backend names of `config` that are not IP addresses.
pub fn names(config: &Config) -> Vec<String> {
    let mut names: Vec<String> = config
        .upstreams
        .iter()
        .flat_map(|u| u.backends.iter())
        .filter(|b| b.addr.parse::<SocketAddr>().is_err())
        .map(|b| b.addr.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// How often to look the names of `config` up: the shortest `resolve_every` of an upstream
/// that has names.
pub fn interval(config: &Config) -> Option<Duration> {
    config
        .upstreams
        .iter()
        .filter(|u| {
            u.backends
                .iter()
                .any(|b| b.addr.parse::<SocketAddr>().is_err())
        })
        .map(|u| u.resolve_every)
        .min()
}

/// Looks every name up; a name whose lookup fails or returns nothing keeps its entry from
/// `previous` (or stays unresolved).
pub async fn resolve_all(
    resolver: &dyn Resolve,
    names: &[String],
    previous: &Resolved,
) -> Resolved {
    let mut out = Resolved::new();
    for name in names {
        let found = tokio::time::timeout(LOOKUP_TIMEOUT, resolver.resolve(name)).await;
        match found {
            Ok(Ok(mut addrs)) if !addrs.is_empty() => {
                addrs.sort();
                addrs.dedup();
                out.insert(name.clone(), addrs);
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(_)) => "no addresses".to_owned(),
                    Err(_) => "timed out".to_owned(),
                };
                if let Some(last) = previous.get(name) {
                    tracing::warn!(%name, error = %why, "DNS lookup failed; keeping the last good addresses");
                    out.insert(name.clone(), last.clone());
                } else {
                    tracing::warn!(%name, error = %why, "DNS lookup failed; the name is resolved at connect time until it succeeds");
                }
            }
        }
    }
    out
}

/// Re-resolves the running config's names forever, rebuilding the snapshot when the
/// addresses change. Spawn it; it ends when the task is aborted.
pub async fn refresh_forever(state: Arc<ProxyState>, resolver: Arc<dyn Resolve>) {
    loop {
        let config = state.snapshot().config.clone();
        let Some(every) = interval(&config) else {
            // No names now; look again later in case a reload adds some.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let previous = state.resolved();
        let names = names(&config);
        let resolved = resolve_all(resolver.as_ref(), &names, &previous).await;
        if resolved != previous {
            tracing::info!(
                names = names.len(),
                "backend addresses changed; updating pools"
            );
            state.set_resolved(resolved);
        }
        tokio::time::sleep(every).await;
    }
}
