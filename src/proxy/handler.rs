//! One request's life, in order:
//!
//! 1. load the snapshot once;
//! 2. find the route (host + path) — else 404;
//! 3. resolve the client IP and check the request against the server limits;
//! 4. pick a backend from the route's upstream;
//! 5. rewrite the request for the backend (hop-by-hop headers, X-Forwarded-*, Via,
//!    X-Request-Id, URI);
//! 6. forward it, streaming the body, within the response timeout;
//! 7. pass the response back (hop-by-hop headers removed, WebSocket upgrades tunnelled),
//!    or map the failure to palisade's own answer.

use std::net::SocketAddr;
use std::time::Instant;

use http::header::{CONNECTION, CONTENT_LENGTH, UPGRADE};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::ProxyBody;
use super::error::ProxyError;
use super::headers::{self, ClientSide};
use crate::limit::client_ip;
use crate::route::Route;
use crate::snapshot::{ProxyState, Snapshot};
use crate::upstream::Backend;

/// What the handler knows about the client connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The socket peer.
    pub peer: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
}

/// Answers one client request: the backend's response, or palisade's own error answer.
pub async fn handle(
    state: &ProxyState,
    req: Request<Incoming>,
    conn: &ConnInfo,
) -> Response<ProxyBody> {
    let snapshot = state.snapshot();
    let method = req.method().clone();
    match proxy(&snapshot, req, conn).await {
        Ok(resp) => resp,
        Err(err) => {
            tracing::debug!(peer = %conn.peer, %method, error = %err, "answered by palisade");
            err.into_response()
        }
    }
}

async fn proxy(
    snapshot: &Snapshot,
    mut req: Request<Incoming>,
    conn: &ConnInfo,
) -> Result<Response<ProxyBody>, ProxyError> {
    // 2. Route.
    let route = snapshot
        .routes
        .find(request_host(&req), req.uri().path())
        .ok_or(ProxyError::NoRoute)?;

    // 3. Client and limits.
    let config = &snapshot.config;
    let client_ip = client_ip::resolve(
        conn.peer.ip(),
        req.headers(),
        &config.server.client_ip.trusted_proxies,
    );
    let max_body = config.server.limits.max_body_bytes;
    check_declared_length(&req, max_body)?;

    // 4. Backend.
    let upstream = snapshot
        .upstreams
        .get(route.upstream)
        .ok_or(ProxyError::NoRoute)?;
    let key = upstream.hash_key(client_ip, req.headers(), req.uri().path());
    let backend = upstream.pick(key).ok_or(ProxyError::ConnectionRefused)?;

    // 5. Rewrite for the backend.
    let client_version = req.version();
    let upgrade = wants_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers, upgrade);
    let authority = parts.uri.authority().map(|a| a.as_str());
    headers::add_forwarding(
        &mut parts.headers,
        &ClientSide {
            ip: client_ip,
            proto: conn.proto,
            version: client_version,
        },
        authority,
    );
    parts.uri = upstream_uri(&parts.uri, route, backend)?;
    parts.version = upstream.version;
    let upstream_req = Request::from_parts(parts, ProxyBody::limited(body, max_body));

    // 6. Forward.
    let in_flight = backend.start();
    let started = Instant::now();
    let sent = tokio::time::timeout(
        upstream.response_timeout(),
        upstream.client.request(upstream_req),
    )
    .await;
    let mut resp = match sent {
        Ok(Ok(resp)) => resp,
        Ok(Err(err)) => {
            let mapped = ProxyError::from_upstream(&err);
            if mapped != ProxyError::BodyTooLarge {
                backend.record_failure();
                tracing::warn!(upstream = %upstream.name, backend = %backend.addr, error = %err, "upstream request failed");
            }
            return Err(mapped);
        }
        Err(_elapsed) => {
            backend.record_failure();
            tracing::warn!(upstream = %upstream.name, backend = %backend.addr, "upstream response timed out");
            return Err(ProxyError::ResponseTimeout);
        }
    };
    backend.record_latency(started.elapsed());
    drop(in_flight);

    // 7. Respond.
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            // A backend may not switch protocols the client did not ask for.
            return Err(ProxyError::ConnectionTerminated);
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(client_upgrade, upstream_upgrade));
        let (mut parts, _body) = resp.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers, true);
        return Ok(Response::from_parts(parts, ProxyBody::Empty));
    }
    let (mut parts, body) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers, false);
    // The client's connection keeps the version it speaks, whatever the backend spoke.
    parts.version = client_version;
    Ok(Response::from_parts(parts, ProxyBody::Stream(body)))
}

/// The host a request is for: the URI authority (HTTP/2, absolute-form) or the Host header.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
}

/// Rejects a body whose declared length is already over the limit, before any backend
/// sees it. Bodies without a length are counted while they stream (see `ProxyBody`).
fn check_declared_length<B>(req: &Request<B>, max_body: u64) -> Result<(), ProxyError> {
    if max_body == 0 {
        return Ok(());
    }
    match req.headers().get(CONTENT_LENGTH) {
        Some(value) => {
            let len = value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(ProxyError::BadRequest("invalid content-length"))?;
            if len > max_body {
                return Err(ProxyError::BodyTooLarge);
            }
            Ok(())
        }
        None => Ok(()),
    }
}

/// An HTTP/1.1 `Connection: upgrade` request naming a protocol (WebSocket and the like).
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() == Method::GET
        && req.headers().contains_key(UPGRADE)
        && req.headers().get_all(CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// The backend's URI: its address as authority, the client's path (prefix stripped when the
/// route says so) and query.
fn upstream_uri(uri: &Uri, route: &Route, backend: &Backend) -> Result<Uri, ProxyError> {
    let path_and_query = match uri.path_and_query() {
        Some(pq) => match route.rewrite_path(pq.as_str()) {
            Some(rewritten) => PathAndQuery::try_from(rewritten)
                .map_err(|_| ProxyError::BadRequest("invalid path"))?,
            None => pq.clone(),
        },
        None => PathAndQuery::from_static("/"),
    };
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(backend.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| ProxyError::BadRequest("invalid request target"))
}

/// Copies bytes both ways between an upgraded client connection and an upgraded backend
/// connection until either side closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade) {
    let (client, backend) = match tokio::join!(client, backend) {
        (Ok(c), Ok(b)) => (c, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        tracing::debug!(error = %e, "tunnel closed");
    }
}
