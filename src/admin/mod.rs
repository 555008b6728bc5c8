//! The admin API (SPEC section 5) on its own listener: liveness, readiness, status,
//! the running config, reloads, metrics and a live dashboard.
//!
//! With `admin.token` set, every path but `/healthz` and `/readyz` needs
//! `Authorization: Bearer TOKEN` (compared in constant time), else 401.

mod dashboard;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::clock::now_ns;
use crate::reload;
use crate::snapshot::ProxyState;

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                // A request head must arrive within `header_read`, or the connection
                // closes (hyper's timer, which also closes keep-alive connections idle
                // that long: fine for the admin API). Without it a client that never
                // finishes a head held its connection, and a file descriptor of the
                // proxy's process, for ever.
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(state.snapshot().config.server.timeouts.header_read);
                let state = state.clone();
                let mut stop = stop_rx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(route(&state, req)) }
                    });
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                        }
                    }
                });
            }
        }
    }
    let _ = stop_tx.send(true);
}

fn route(state: &ProxyState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = req.method();
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if state.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        _ if !authorized(state, &req) => {
            let mut resp = text(
                StatusCode::UNAUTHORIZED,
                "unauthorized: send Authorization: Bearer TOKEN\n",
            );
            resp.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static("Bearer realm=\"palisade admin\""),
            );
            resp
        }
        (&Method::GET | &Method::HEAD, "/status") => json_response(StatusCode::OK, &status(state)),
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(state.metrics.render(state))));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET | &Method::HEAD, "/config") => {
            let snapshot = state.snapshot();
            json_response(
                StatusCode::OK,
                &serde_json::to_value(&*snapshot.config).unwrap_or(Value::Null),
            )
        }
        (&Method::POST, "/reload") => match reload::reload(state) {
            Ok(generation) => json_response(StatusCode::OK, &json!({ "generation": generation })),
            Err(errors) => {
                let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": all.first().cloned().unwrap_or_default(), "errors": all }),
                )
            }
        },
        (&Method::GET | &Method::HEAD, "/") => {
            let mut resp = Response::new(Full::new(Bytes::from_static(dashboard::HTML.as_bytes())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
        // RFC 9110 15.5.6: a 405 says which methods the resource takes.
        (_, "/healthz" | "/readyz" | "/status" | "/metrics" | "/config" | "/reload" | "/") => {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            let allow = if path == "/reload" {
                "POST"
            } else {
                "GET, HEAD"
            };
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Whether the request carries the admin token (always, when none is configured).
fn authorized<B>(state: &ProxyState, req: &Request<B>) -> bool {
    let snapshot = state.snapshot();
    let Some(token) = snapshot.config.admin.token.as_deref() else {
        return true;
    };
    // The scheme is case-insensitive (RFC 9110 11.1): `bearer TOKEN` is as good.
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim_start_matches(' '));
    constant_time_eq(given.as_bytes(), token.as_bytes())
}

/// Compares without an early exit, so the time taken does not tell how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (i, &x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

/// The `/status` document.
pub fn status(state: &ProxyState) -> Value {
    let snapshot = state.snapshot();
    let now = now_ns();
    let mut upstreams = serde_json::Map::new();
    for u in &snapshot.upstreams {
        let backends: Vec<Value> = u
            .backends
            .iter()
            .map(|b| {
                json!({
                    "addr": &*b.addr,
                    "healthy": b.is_healthy(),
                    "ejected": b.is_ejected(now),
                    "in_flight": b.in_flight(),
                    "weight": b.weight(),
                    "requests": b.requests.load(Ordering::Relaxed),
                    "failures": b.failures.load(Ordering::Relaxed),
                    "ewma_ms": b.ewma_ns() as f64 / 1e6,
                })
            })
            .collect();
        upstreams.insert(
            u.name.to_string(),
            json!({
                "balance": u.config.balance,
                "panic": u.in_panic(),
                "queued": u.queued.load(Ordering::Relaxed),
                "backends": backends,
            }),
        );
    }
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "generation": snapshot.generation,
        "uptime_seconds": state.started().elapsed().as_secs_f64(),
        "draining": state.is_draining(),
        "connections": state.connections.load(Ordering::Relaxed),
        "reloads": {
            "success": state.reloads_ok.load(Ordering::Relaxed),
            "failure": state.reloads_failed.load(Ordering::Relaxed),
            "last": last_reload(state),
        },
        "upstreams": upstreams,
    })
}

/// The last reload as JSON: how long ago, and its generation or its first error.
fn last_reload(state: &ProxyState) -> Value {
    let last = state.last_reload.lock().ok().and_then(|l| l.clone());
    match last {
        None => Value::Null,
        Some((at, Ok(generation))) => json!({
            "seconds_ago": at.elapsed().as_secs_f64(),
            "ok": true,
            "generation": generation,
        }),
        Some((at, Err(error))) => json!({
            "seconds_ago": at.elapsed().as_secs_f64(),
            "ok": false,
            "error": error,
        }),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(constant_time_eq(b"", b""));
    }
}
