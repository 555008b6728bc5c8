//! DNS backends: names among the backends are resolved at start and every
//! `resolve_every`; each address becomes a backend of its own.
//!
//! A change of the address set rebuilds the snapshot (same generation: it is not a config
//! reload), so new addresses join the pool and vanished ones leave it; backends that stay
//! keep their state. A failed lookup keeps the last good set; a name's failure is logged
//! once while it lasts ([`Lookups`]). The lookup itself is behind
//! [`Resolve`] so tests can drive it; palisade uses the system resolver (getaddrinfo,
//! which honours /etc/hosts).

use std::collections::{BTreeMap, BTreeSet};
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
/// `previous` (or stays unresolved). Every failure is logged as a warning: for lookups
/// repeated over time, [`Lookups`] says once when a name starts failing.
pub async fn resolve_all(
    resolver: &dyn Resolve,
    names: &[String],
    previous: &Resolved,
) -> Resolved {
    Lookups::default()
        .resolve_all(resolver, names, previous)
        .await
}

/// Lookups of the same names over time, remembering which names are failing so that a
/// name that does not resolve is not logged as a warning every `resolve_every`: a warning
/// (with the error) when it starts failing, debug lines while it keeps failing, an info
/// line when it resolves again (what nginx and HAProxy users expect of a resolver).
#[derive(Debug, Default)]
pub struct Lookups {
    /// The names whose last lookup failed.
    failing: BTreeSet<String>,
}

impl Lookups {
    /// [`resolve_all`], logging each name's failure once while it lasts.
    pub async fn resolve_all(
        &mut self,
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
                    if self.failing.remove(name) {
                        tracing::info!(%name, addresses = addrs.len(), "DNS lookup succeeds again");
                    }
                    out.insert(name.clone(), addrs);
                }
                outcome => {
                    let why = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(_)) => "no addresses".to_owned(),
                        Err(_) => "timed out".to_owned(),
                    };
                    let kept = previous.get(name);
                    if let Some(last) = kept {
                        out.insert(name.clone(), last.clone());
                    }
                    if self.failing.insert(name.clone()) {
                        if kept.is_some() {
                            tracing::warn!(%name, error = %why, "DNS lookup failed; keeping the last good addresses (while it keeps failing: at debug level; when it succeeds again: at info)");
                        } else {
                            tracing::warn!(%name, error = %why, "DNS lookup failed; the name is resolved at connect time until it succeeds (while it keeps failing: at debug level; when it succeeds again: at info)");
                        }
                    } else {
                        tracing::debug!(%name, error = %why, kept = kept.is_some(), "DNS lookup still failing");
                    }
                }
            }
        }
        // A name the config no longer has at this lookup is forgotten: if it comes back,
        // so does its warning (not when it left and came back between two lookups).
        self.failing.retain(|name| names.contains(name));
        out
    }
}

/// Re-resolves the running config's names forever, rebuilding the snapshot when the
/// addresses change. Spawn it; it ends when the task is aborted.
pub async fn refresh_forever(state: Arc<ProxyState>, resolver: Arc<dyn Resolve>) {
    refresh_from(state, resolver, Lookups::default()).await;
}

/// [`refresh_forever`], continuing `lookups` (those made at start): a name that failed
/// then is not warned about again while it keeps failing.
pub async fn refresh_from(
    state: Arc<ProxyState>,
    resolver: Arc<dyn Resolve>,
    mut lookups: Lookups,
) {
    loop {
        let config = state.snapshot().config.clone();
        let Some(every) = interval(&config) else {
            // No names now; look again later in case a reload adds some (a failing one
            // is then warned about again).
            lookups = Lookups::default();
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let previous = state.resolved();
        let names = names(&config);
        let resolved = lookups
            .resolve_all(resolver.as_ref(), &names, &previous)
            .await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tracing::field::{Field, Visit};
    use tracing::Level;
    use tracing_subscriber::layer::{Context, SubscriberExt};

    /// A resolver whose answer the test sets; `None` makes lookups fail.
    #[derive(Default)]
    struct Scripted(Mutex<Option<Vec<SocketAddr>>>);

    impl Scripted {
        fn answer(&self, addrs: Option<Vec<SocketAddr>>) {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = addrs;
        }
    }

    impl Resolve for Scripted {
        fn resolve<'a>(&'a self, _name: &'a str) -> Lookup<'a> {
            let answer = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Box::pin(async move {
                answer.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "scripted failure"))
            })
        }
    }

    /// The level and message of every event logged by this module.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<(Level, String)>>>);

    impl Captured {
        fn count(&self, level: Level, message_start: &str) -> usize {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|(l, m)| *l == level && m.starts_with(message_start))
                .count()
        }
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            struct Message(String);
            impl Visit for Message {
                fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            if event.metadata().target() != "palisade::dns" {
                return;
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((*event.metadata().level(), message.0));
        }
    }

    #[tokio::test]
    async fn a_failing_name_is_warned_about_once_while_it_fails_and_its_recovery_at_info() {
        let captured = Captured::default();
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(captured.clone()));
        let resolver = Scripted::default();
        let names = ["app.internal:80".to_owned()];
        let addr: SocketAddr = ([127, 0, 0, 1], 80).into();
        let mut lookups = Lookups::default();
        let mut resolved = Resolved::new();
        let mut round = async |lookups: &mut Lookups, answer: Option<Vec<SocketAddr>>| {
            resolver.answer(answer);
            resolved = lookups.resolve_all(&resolver, &names, &resolved).await;
            resolved.clone()
        };
        let failed = "DNS lookup failed";
        // Failing from the start: one warning, then debug lines only.
        for _ in 0..3 {
            assert!(round(&mut lookups, None).await.is_empty());
        }
        assert_eq!(captured.count(Level::WARN, failed), 1);
        assert_eq!(captured.count(Level::DEBUG, "DNS lookup still failing"), 2);
        // It resolves: said at info, once.
        for _ in 0..2 {
            round(&mut lookups, Some(vec![addr])).await;
        }
        assert_eq!(captured.count(Level::INFO, "DNS lookup succeeds again"), 1);
        // It fails again: a new warning (the last good set is kept), once.
        for _ in 0..3 {
            assert_eq!(round(&mut lookups, None).await[&names[0]], [addr]);
        }
        assert_eq!(captured.count(Level::WARN, failed), 2);
        assert_eq!(captured.count(Level::DEBUG, "DNS lookup still failing"), 4);
        // A name the config drops is forgotten: back and still failing, it is warned about.
        round_without(&mut lookups, &resolver).await;
        assert_eq!(round(&mut lookups, None).await.len(), 1);
        assert_eq!(captured.count(Level::WARN, failed), 3);
    }

    async fn round_without(lookups: &mut Lookups, resolver: &Scripted) {
        lookups.resolve_all(resolver, &[], &Resolved::new()).await;
    }
}
