//! DNS backends: a name's addresses join and leave the pool as lookups change, a failed
//! lookup keeps the last good set, and real names (localhost) resolve through the system.

use crate::common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use palisade::dns::{self, Lookup, Resolve};

/// A resolver whose answers the test sets; `None` makes lookups fail.
#[derive(Default)]
struct Scripted(Mutex<Option<Vec<SocketAddr>>>);

impl Scripted {
    fn answer(&self, addrs: Option<Vec<SocketAddr>>) {
        *self.0.lock().expect("lock") = addrs;
    }
}

impl Resolve for Scripted {
    fn resolve<'a>(&'a self, _name: &'a str) -> Lookup<'a> {
        let answer = self.0.lock().expect("lock").clone();
        Box::pin(async move {
            answer.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "scripted failure")
            })
        })
    }
}

async fn backends_seen(proxy: &Proxy, requests: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..requests {
        let answer = get(&proxy.url("/")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        *seen.entry(answer.backend()).or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn addresses_join_and_leave_and_failed_lookups_keep_the_last_set() {
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let proxy = Proxy::start(
        "[[routes]]\nupstream = \"app\"\n[upstreams.app]\nresolve_every = \"50ms\"\nbackends = [{ addr = \"app.internal:80\" }]\n",
    )
    .await;
    let resolver = Arc::new(Scripted::default());
    resolver.answer(Some(vec![a.addr]));
    let refresh = tokio::spawn(dns::refresh_forever(proxy.state.clone(), resolver.clone()));
    let generation = proxy.state.snapshot().generation;

    let pool = || -> Vec<String> {
        proxy.state.snapshot().upstreams[0]
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(3), async || pool()
            == [a.addr.to_string()])
        .await,
        "{:?}",
        pool()
    );
    assert_eq!(
        backends_seen(&proxy, 4).await,
        HashMap::from([("a".into(), 4)])
    );

    // A second address joins.
    resolver.answer(Some(vec![a.addr, b.addr]));
    assert!(eventually(Duration::from_secs(3), async || pool().len() == 2).await);
    let kept = proxy.state.snapshot().upstreams[0].backends.clone();
    assert_eq!(backends_seen(&proxy, 6).await.len(), 2);

    // The lookup fails: the last good set stays.
    resolver.answer(None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool().len(), 2);

    // The first address disappears; the remaining backend keeps its state (same object).
    resolver.answer(Some(vec![b.addr]));
    assert!(
        eventually(Duration::from_secs(3), async || pool()
            == [b.addr.to_string()])
        .await,
        "{:?}",
        pool()
    );
    let now = proxy.state.snapshot().upstreams[0].backends[0].clone();
    assert!(
        kept.iter().any(|k| Arc::ptr_eq(k, &now)),
        "backend b was rebuilt instead of kept"
    );
    assert_eq!(
        backends_seen(&proxy, 4).await,
        HashMap::from([("b".into(), 4)])
    );
    // Address changes are not config reloads.
    assert_eq!(proxy.state.snapshot().generation, generation);
    refresh.abort();
}

#[tokio::test]
async fn localhost_resolves_through_the_system_resolver() {
    let a = Echo::start("a").await;
    let name = format!("localhost:{}", a.addr.port());
    let resolved = dns::resolve_all(
        &dns::SystemResolver,
        std::slice::from_ref(&name),
        &Default::default(),
    )
    .await;
    let addrs = resolved.get(&name).cloned().unwrap_or_default();
    assert!(addrs.contains(&a.addr), "{addrs:?}");
}
