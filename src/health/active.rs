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
use crate::upstream::client::Connector;
use crate::upstream::{h2, Backend, Upstream};
use prometheus::IntCounter;

type ProbeClient = Client<Connector, Empty<Bytes>>;

/// How probes reach a backend: each probe on a new connection, to the backend's address,
/// naming its configured `host:port`. HTTP/1.1 goes through hyper-util's client (the URI
/// says where to connect, the Host header names the backend); h2c opens its own HTTP/2
/// connection, as requests do ([`crate::upstream::h2`]): hyper-util's client would send
/// the address as `:authority`, and a `host` field next to it is malformed.
#[derive(Clone)]
enum Prober {
    Http1(Box<ProbeClient>),
    H2(Connector),
}

/// Starts the checkers of every backend of `upstream` (none when it has no `health`).
pub fn spawn_checks(upstream: &Upstream, metrics: &Metrics) -> Vec<JoinHandle<()>> {
    let Some(cfg) = upstream.config.health.clone() else {
        return Vec::new();
    };
    let connector =
        crate::upstream::client::connector(&upstream.config, cfg.timeout, &upstream.server_names);
    let prober = match upstream.config.protocol {
        crate::config::Protocol::H2c => Prober::H2(connector),
        crate::config::Protocol::Http1 => Prober::Http1(Box::new(
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_max_idle_per_host(0)
                .build(connector),
        )),
    };
    upstream
        .backends
        .iter()
        .map(|backend| {
            tokio::spawn(check_loop(
                upstream.name.clone(),
                backend.clone(),
                cfg.clone(),
                prober.clone(),
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
    prober: Prober,
    scheme: http::uri::Scheme,
    (passes, failures): (IntCounter, IntCounter),
) {
    let jitter = Duration::from_nanos(fastrand::u64(..=crate::clock::nanos(cfg.interval)));
    tokio::time::sleep(jitter).await;
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let (passed, detail) = probe(&prober, &backend, &cfg, &scheme).await;
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
    prober: &Prober,
    backend: &Backend,
    cfg: &Health,
    scheme: &http::uri::Scheme,
) -> (bool, String) {
    match tokio::time::timeout(cfg.timeout, send_probe(prober, backend, cfg, scheme)).await {
        Ok(Ok(status)) => (
            cfg.expect_status.contains(&status),
            format!("status {status}"),
        ),
        Ok(Err(e)) => (false, e),
        Err(_) => (false, format!("no answer within {:?}", cfg.timeout)),
    }
}

/// Sends one probe; the answer's status.
async fn send_probe(
    prober: &Prober,
    backend: &Backend,
    cfg: &Health,
    scheme: &http::uri::Scheme,
) -> Result<u16, String> {
    // HTTP/1.1: the URI says where to connect; HTTP/2: what `:authority` to send.
    let authority = match prober {
        Prober::Http1(_) => backend.authority.clone(),
        Prober::H2(_) => backend.host.clone(),
    };
    let uri = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority)
        .path_and_query(cfg.path.as_str())
        .build()
        .map_err(|e| format!("invalid probe URI: {e}"))?;
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static("palisade-health-check"),
    );
    let resp = match prober {
        Prober::Http1(client) => {
            if let Ok(host) = HeaderValue::from_str(backend.host.as_str()) {
                headers.insert(HOST, host);
            }
            client.request(req).await.map_err(|e| e.to_string())?
        }
        Prober::H2(connector) => {
            *req.version_mut() = http::Version::HTTP_2;
            let mut sender = h2::connect(backend, connector, scheme)
                .await
                .map_err(|e| e.to_string())?;
            // The connection closes once the sender and the answer are dropped.
            sender.send_request(req).await.map_err(|e| e.to_string())?
        }
    };
    Ok(resp.status().as_u16())
}
