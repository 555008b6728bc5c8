//! Active health checks: a GET of `health.path` on every backend every `interval`.
//!
//! One task per backend, started with a random offset within the interval so that checks
//! of many backends do not fire in step. Probes use their own client without connection
//! reuse, so each one also proves the backend still accepts connections. Results go
//! through [`super::on_probe`]; the backend's atomics are what the balancers read.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST, USER_AGENT};
use http::{Request, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::task::JoinHandle;

use super::{on_probe, Transition};
use crate::clock::now_ns;
use crate::config::Health;
use crate::metrics::Metrics;
use crate::upstream::{Backend, Upstream};
use prometheus::IntCounter;

type ProbeClient = Client<crate::upstream::client::Connector, Empty<Bytes>>;

/// Starts the checkers of every backend of `upstream` (none when it has no `health`).
pub fn spawn_checks(upstream: &Upstream, metrics: &Metrics) -> Vec<JoinHandle<()>> {
    let Some(cfg) = upstream.config.health.clone() else {
        return Vec::new();
    };
    let client: ProbeClient = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(0)
        .http2_only(upstream.config.protocol == crate::config::Protocol::H2c)
        .build(crate::upstream::client::connector(
            &upstream.config,
            cfg.timeout,
        ));
    upstream
        .backends
        .iter()
        .map(|backend| {
            tokio::spawn(check_loop(
                upstream.name.clone(),
                backend.clone(),
                cfg.clone(),
                client.clone(),
                upstream.scheme.clone(),
                metrics.health_checks(&upstream.name, &backend.addr),
            ))
        })
        .collect()
}

async fn check_loop(
    upstream: Arc<str>,
    backend: Arc<Backend>,
    cfg: Health,
    client: ProbeClient,
    scheme: http::uri::Scheme,
    (passes, failures): (IntCounter, IntCounter),
) {
    let jitter = Duration::from_nanos(fastrand::u64(..=crate::clock::nanos(cfg.interval)));
    tokio::time::sleep(jitter).await;
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let (passed, detail) = probe(&client, &backend, &cfg, &scheme).await;
        if passed {
            passes.inc()
        } else {
            failures.inc()
        }
        match on_probe(&backend, passed, &cfg, now_ns()) {
            Some(Transition::Down) => tracing::warn!(
                upstream = %upstream, backend = %backend.addr, %detail,
                "backend failed its health checks; out of rotation"
            ),
            Some(Transition::Up) => tracing::info!(
                upstream = %upstream, backend = %backend.addr,
                "backend passed its health checks; back in rotation"
            ),
            _ => {
                tracing::trace!(upstream = %upstream, backend = %backend.addr, passed, %detail, "health probe")
            }
        }
    }
}

/// One probe: whether it passed, and why not.
async fn probe(
    client: &ProbeClient,
    backend: &Backend,
    cfg: &Health,
    scheme: &http::uri::Scheme,
) -> (bool, String) {
    let uri = match Uri::builder()
        .scheme(scheme.clone())
        .authority(backend.authority.clone())
        .path_and_query(cfg.path.as_str())
        .build()
    {
        Ok(uri) => uri,
        Err(e) => return (false, format!("invalid probe URI: {e}")),
    };
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    if let Ok(host) = HeaderValue::from_str(backend.authority.as_str()) {
        headers.insert(HOST, host);
    }
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static("palisade-health-check"),
    );
    match tokio::time::timeout(cfg.timeout, client.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            (
                cfg.expect_status.contains(&status),
                format!("status {status}"),
            )
        }
        Ok(Err(e)) => (false, format!("{e}")),
        Err(_) => (false, format!("no answer within {:?}", cfg.timeout)),
    }
}
