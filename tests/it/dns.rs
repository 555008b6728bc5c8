//! DNS backends: a name's addresses join and leave the pool as lookups change, a failed
//! lookup keeps the last good set, real names (localhost) resolve through the system, and
//! a backend is named by its configured name, not its address, where it is named (the
//! Host of a Host-less request, of health probes; its TLS name, in tls.rs).

use crate::common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::request_headers::{lines, Recorder, OK};
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

/// Has the running proxy take `name` as resolved to `addr`, as a lookup would.
pub(crate) fn resolve(proxy: &Proxy, name: &str, addr: SocketAddr) {
    proxy
        .state
        .set_resolved(dns::Resolved::from([(name.to_owned(), vec![addr])]));
}

#[tokio::test]
async fn a_host_less_request_reaches_a_dns_backend_with_its_name_as_host() {
    // As nginx sends the proxy_pass name: a virtual-hosted backend does not know its
    // address as a host.
    let mut backend = Recorder::start(OK).await;
    let proxy = Proxy::start(
        "[[routes]]\nupstream = \"app\"\n[upstreams.app]\nbackends = [{ addr = \"app.internal:8080\" }]\n",
    )
    .await;
    resolve(&proxy, "app.internal:8080", backend.addr);
    let head = backend
        .through(proxy.addr, b"GET /x HTTP/1.0\r\n\r\n", "HTTP/1.1 200 ")
        .await;
    assert_eq!(lines(&head, "host"), ["app.internal:8080"], "{head}");
    // The backend is still listed (/status, metrics) by the address it is at.
    assert_eq!(
        *proxy.state.snapshot().upstreams[0].backends[0].addr,
        backend.addr.to_string()
    );
}

#[tokio::test]
async fn health_probes_name_a_dns_backend_by_its_name() {
    let mut backend = Recorder::start(OK).await;
    let proxy = Proxy::start(
        "[[routes]]\nupstream = \"app\"\n[upstreams.app]\nbackends = [{ addr = \"app.internal:8080\" }]\n\
         [upstreams.app.health]\npath = \"/probe\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n",
    )
    .await;
    resolve(&proxy, "app.internal:8080", backend.addr);
    let head = backend.head().await;
    assert!(head.starts_with("get /probe "), "{head}");
    assert_eq!(lines(&head, "host"), ["app.internal:8080"], "{head}");
}

/// A backend name that does not resolve (`.invalid` never does, RFC 6761) is warned about
/// once, at start, not again at every `resolve_every`: the lookups go on (at debug level).
#[tokio::test]
async fn a_name_that_does_not_resolve_is_warned_about_once() {
    let name = "palisade-test.invalid:80";
    let dir = TempDir::new("dns-fail");
    let file = dir.write(
        "dns-fail.toml",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[routes]]\nupstream = \"app\"\n[upstreams.app]\nresolve_every = \"50ms\"\n\
             backends = [{{ addr = \"{name}\" }}]\n"
        ),
    );
    let log = file.with_extension("log");
    let child = spawn_logged(&file, &log, "info,palisade::dns=debug");
    // The log lines about the name, as (level, message).
    let lines = || -> Vec<(String, String)> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["name"] == name)
            .map(|v| {
                let field = |f: &str| v[f].as_str().unwrap_or_default().to_owned();
                (field("level"), field("message"))
            })
            .collect()
    };
    // The start plus a few refreshes (each 50 ms apart).
    let looked_up = eventually(Duration::from_secs(20), async || lines().len() >= 6).await;
    let lines = lines();
    assert!(looked_up, "{lines:?}");
    let warnings: Vec<_> = lines.iter().filter(|(level, _)| level == "WARN").collect();
    assert_eq!(warnings.len(), 1, "{lines:?}");
    assert!(warnings[0].1.starts_with("DNS lookup failed"), "{lines:?}");
    assert!(
        lines[1..]
            .iter()
            .all(|(level, message)| level == "DEBUG" && message == "DNS lookup still failing"),
        "{lines:?}"
    );
    stop_gracefully(child);
}
