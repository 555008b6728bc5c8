//! One request's life, in order:
//!
//! 1. load the snapshot once;
//! 2. find the route (host + path) — else 404;
//! 3. resolve the client IP and check the request against the server limits;
//! 4. prepare the request for the backends: hop-by-hop headers out, X-Forwarded-*, Via,
//!    X-Request-Id in, and a body that can be replayed where the retry rules allow;
//! 5. attempt: pick a backend (queueing when all are at their cap), send within the
//!    response timeout, judge the outcome (passive health), and retry on another backend
//!    when the rules and the retry budget allow;
//! 6. pass the response back (hop-by-hop headers removed, WebSocket upgrades tunnelled),
//!    or map the failure to palisade's own answer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Body;

use super::body::{ClientBody, ProxyBody, Replayable};
use super::error::ProxyError;
use super::headers::{self, valid_host, ClientSide, Forwarding, Seen};
use crate::health;
use crate::limit::client_ip;
use crate::route::Route;
use crate::server::tunnel::{BackendEnd, OnUpgrade};
use crate::snapshot::{ProxyState, Snapshot};
use crate::upstream::h1::RequestHead;
use crate::upstream::pool::UpstreamBody;
use crate::upstream::{Backend, PickError, Tried, Upstream};

/// Request bodies up to this size are read before forwarding, so that they can be sent
/// again on a retry (nginx buffers request bodies too). Larger bodies stream, and are
/// retried only when the failed attempt never started sending them.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

/// What the handler knows about the client connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The socket peer.
    pub peer: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The headers palisade's HTTP/1.1 codec saw in this request's head (per request;
    /// `None` for HTTP/2).
    pub seen: Option<Seen>,
}

/// What nginx logs for a request whose client went away before its answer was ready
/// ("client closed request"): its access line and `palisade_requests_total` code.
pub const CLIENT_CLOSED: u16 = 499;

/// Answers one client request: the backend's response, or palisade's own error answer.
/// A request dropped before it is answered (the client went away: an HTTP/1.x
/// connection closed, an HTTP/2 stream reset) is counted and logged with status 499.
pub async fn handle(
    state: &ProxyState,
    req: Request<ClientBody>,
    conn: &ConnInfo,
) -> Response<ProxyBody> {
    let snapshot = state.snapshot();
    // The access log needs the request line after the request has moved on: copy it only
    // when there is an access log.
    let line = snapshot
        .config
        .server
        .access_log
        .then(|| RequestLine::of(&req));
    // For the access line of a request refused before it is forwarded (403, 413, 429, a
    // 404...): the client's id (none was made for it yet). Looked up only when the codec
    // saw one.
    let sent_id = line
        .as_ref()
        .and_then(|_| headers::sent_request_id(req.headers(), conn.seen).cloned());
    let mut record = Record {
        snapshot: &snapshot,
        conn,
        line: line.as_ref(),
        sent_id,
        trace: Trace::default(),
        started: Instant::now(),
        answered: false,
    };
    let resp = match proxy(&snapshot, req, conn, &mut record.trace).await {
        Ok(resp) => resp,
        Err(err) => {
            tracing::debug!(peer = %conn.peer, error = %err, "answered by palisade");
            err.into_response()
        }
    };
    record.answered = true;
    record.finish(resp.status().as_u16(), Some(&resp));
    resp
}

/// Counts and logs a request once it is answered, or when it is dropped unanswered.
struct Record<'s> {
    snapshot: &'s Snapshot,
    conn: &'s ConnInfo,
    /// Borrowed, not moved in: it is large, and only the access log reads it.
    line: Option<&'s RequestLine>,
    /// The client's `X-Request-Id` (with the access log on), for a request that was never
    /// given one because it was refused before being forwarded.
    sent_id: Option<HeaderValue>,
    trace: Trace<'s>,
    started: Instant,
    answered: bool,
}

impl Record<'_> {
    /// Counts and logs the request with `status`; `resp`: the answer (None: there is none).
    fn finish(&mut self, status: u16, resp: Option<&Response<ProxyBody>>) {
        let finished = Instant::now();
        let elapsed = finished.saturating_duration_since(self.started);
        let metrics = self
            .trace
            .route
            .map_or(&self.snapshot.unrouted, |r| &r.metrics.answers);
        metrics.by_code.inc(status);
        metrics.duration.observe(elapsed.as_secs_f64());
        if let Some(line) = self.line {
            if self.trace.request_id.is_none() {
                self.trace.request_id = Some(headers::request_id(self.sent_id.as_ref()).0);
            }
            log_access(
                line,
                &self.trace,
                self.conn,
                status,
                resp.map_or(0, response_length),
                elapsed,
                finished,
            );
        }
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if !self.answered {
            tracing::debug!(peer = %self.conn.peer, "the client went away before its answer");
            self.finish(CLIENT_CLOSED, None);
        }
    }
}

/// What the access log says about a request beyond its request line, filled in as the
/// request moves along.
#[derive(Default)]
struct Trace<'s> {
    route: Option<&'s Route>,
    upstream: Option<&'s Upstream>,
    backend: Option<&'s Backend>,
    attempts: u32,
    client_ip: Option<std::net::IpAddr>,
    request_id: Option<headers::FieldValue>,
    /// The Host header, kept for the access log (the routing looks it up anyway).
    host: Option<http::HeaderValue>,
}

/// The parts of a request the access log prints, kept before the request moves on
/// (the Host header is kept in [`Trace`]). `Uri` shares its bytes, so keeping it copies
/// no text.
struct RequestLine {
    method: Method,
    uri: Uri,
    bytes_in: i64,
}

impl RequestLine {
    fn of(req: &Request<ClientBody>) -> Self {
        RequestLine {
            method: req.method().clone(),
            uri: req.uri().clone(),
            bytes_in: req
                .body()
                .size_hint()
                .exact()
                .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)),
        }
    }

    /// The host the client asked for: the URI authority, else the Host header.
    fn host<'a>(&'a self, header: Option<&'a http::HeaderValue>) -> &'a [u8] {
        match (self.uri.authority(), header) {
            (Some(authority), _) => authority.as_str().as_bytes(),
            (None, Some(header)) => header.as_bytes(),
            (None, None) => b"",
        }
    }

    fn path(&self) -> &str {
        self.uri
            .path_and_query()
            .map_or_else(|| self.uri.path(), |pq| pq.as_str())
    }
}

/// The declared body length, or -1 when the body streams without one.
fn content_length(headers: &HeaderMap) -> i64 {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| crate::http1::parse_decimal(v.as_bytes()))
        .and_then(|n| i64::try_from(n).ok())
        .unwrap_or(-1)
}

/// The response's declared length for the access log: the body's own exact length when it
/// has one (no header lookup), else the header (a HEAD answer's body is empty whatever its
/// Content-Length says).
fn response_length(resp: &Response<ProxyBody>) -> i64 {
    match resp.body().size_hint().exact() {
        Some(n) if n > 0 => i64::try_from(n).unwrap_or(i64::MAX),
        _ => match resp.body().raw_headers() {
            Some(raw) => raw
                .content_length()
                .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)),
            None => content_length(resp.headers()),
        },
    }
}

/// One access log line (target `palisade::access`; JSON with `--log-format json`, the
/// timestamp in RFC 3339 UTC).
fn log_access(
    line: &RequestLine,
    trace: &Trace<'_>,
    conn: &ConnInfo,
    status: u16,
    bytes_out: i64,
    elapsed: Duration,
    finished: Instant,
) {
    if !access_lines_on() {
        return;
    }
    // A request id is ASCII: checked or made by `Forwarding`.
    let request_id = trace
        .request_id
        .as_ref()
        .map_or(&b"-"[..], headers::FieldValue::as_bytes);
    let access = crate::logging::access::Line {
        request_id,
        client_ip: trace.client_ip.unwrap_or_else(|| conn.peer.ip()),
        method: line.method.as_str(),
        host: line.host(trace.host.as_ref()),
        path: line.path(),
        status,
        route: trace.route.map_or("-", |r| &*r.name),
        upstream: trace.upstream.map_or("-", |u| &*u.name),
        backend: trace.backend.map_or("-", |b| &*b.addr),
        attempts: trace.attempts,
        bytes_in: line.bytes_in,
        bytes_out,
        duration: elapsed,
        finished,
    };
    write_access(&access);
}

/// Whether access lines pass the log filter (known once per process when the JSON sink is
/// installed; otherwise asked of `tracing`).
fn access_lines_on() -> bool {
    crate::logging::access::enabled()
        .unwrap_or_else(|| tracing::enabled!(target: "palisade::access", tracing::Level::INFO))
}

/// Writes one access line (to the batched JSON sink when installed, else through `tracing`).
fn write_access(access: &crate::logging::access::Line<'_>) {
    if crate::logging::access::write(access) {
        return;
    }
    tracing::info!(
        target: "palisade::access",
        request_id = &*String::from_utf8_lossy(access.request_id),
        client_ip = %access.client_ip,
        method = %access.method,
        host = &*String::from_utf8_lossy(access.host),
        path = access.path,
        status = access.status,
        route = access.route,
        upstream = access.upstream,
        backend = access.backend,
        attempts = access.attempts,
        bytes_in = access.bytes_in,
        bytes_out = access.bytes_out,
        duration_ms = access.duration.as_secs_f64() * 1000.0,
        "request"
    );
}

/// Counts, and logs, a request head palisade's HTTP/1.x codec refused before it became a
/// request (431 over `max_header_bytes`; 400 for a malformed head), as nginx does: under
/// route `""` in `palisade_requests_total` and the duration histogram, and with an access
/// line carrying what could be read of its request line (`-` where it is not plain
/// printable ASCII). `head`: the bytes read of it; `elapsed`: since its first byte.
pub fn refused(
    state: &ProxyState,
    conn: &ConnInfo,
    resp: &Response<ProxyBody>,
    head: &[u8],
    elapsed: Duration,
) {
    let snapshot = state.snapshot();
    let metrics = &snapshot.unrouted;
    metrics.by_code.inc(resp.status().as_u16());
    metrics.duration.observe(elapsed.as_secs_f64());
    if !snapshot.config.server.access_log {
        return;
    }
    if !access_lines_on() {
        return;
    }
    let (method, path) = refused_request_line(head);
    write_access(&crate::logging::access::Line {
        request_id: b"-",
        client_ip: conn.peer.ip(),
        method,
        host: b"",
        path,
        status: resp.status().as_u16(),
        route: "-",
        upstream: "-",
        backend: "-",
        attempts: 0,
        bytes_in: -1,
        bytes_out: response_length(resp),
        duration: elapsed,
        finished: Instant::now(),
    });
}

/// The method and target of a refused head's request line, each `-` unless it is
/// printable ASCII without spaces (what reaches the log is never the client's raw bytes).
fn refused_request_line(head: &[u8]) -> (&str, &str) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut words = line.split(|&b| b == b' ');
    let mut word = || {
        words
            .next()
            .filter(|w| !w.is_empty() && w.iter().all(|b| b.is_ascii_graphic()))
            .and_then(|w| std::str::from_utf8(w).ok())
            .unwrap_or("-")
    };
    let method = word();
    let path = word();
    (method, path)
}

async fn proxy<'s>(
    snapshot: &'s Snapshot,
    mut req: Request<ClientBody>,
    conn: &ConnInfo,
    trace: &mut Trace<'s>,
) -> Result<Response<ProxyBody>, ProxyError> {
    // 1a. An HTTP/2 head over the limit (HTTP/1.x heads were measured by the codec).
    if conn.seen.is_none() && req.version() == Version::HTTP_2 {
        let limit = snapshot.config.server.limits.max_header_bytes;
        if h2_head_size(&req, conn.proto) > limit {
            return Err(ProxyError::HeadTooLarge);
        }
    }

    // 1. The request's one host, before the framing check, so that a refused request's
    // access line has it.
    let host = settle_host(&mut req, conn.seen);
    if snapshot.config.server.access_log {
        trace.host = match &host {
            Ok(host) => host.clone(),
            Err(_) => req.headers().get(HOST).cloned(),
        };
    }
    let host = host?;

    // 1b. Refuse what a backend could read differently.
    check_framing(&mut req, conn.seen)?;

    // 2. Route, by the settled host (the target's authority, when it has one, is the Host)
    // and the path as a normalising backend reads it.
    let normalised = crate::route::normalise_path(req.uri().path())
        .map_err(|_| ProxyError::BadRequest("the path climbs above the root"))?;
    let route = snapshot
        .routes
        .find(
            host.as_ref().and_then(|h| h.to_str().ok()),
            normalised.as_deref().unwrap_or(req.uri().path()),
        )
        .ok_or(ProxyError::NoRoute)?;
    trace.route = Some(route);
    let upstream = snapshot
        .upstreams
        .get(route.upstream)
        .ok_or(ProxyError::NoRoute)?;
    trace.upstream = Some(upstream);

    // 3. Client and limits.
    let config = &snapshot.config;
    let client_ip = client_ip::resolve(conn.peer.ip(), req.headers(), &snapshot.trusted_proxies);
    trace.client_ip = Some(client_ip);
    if !route.admits(client_ip) {
        route.metrics.denied.inc();
        return Err(ProxyError::Denied);
    }
    if let Some(limiter) = &route.limiter {
        if let Err(limited) = limiter.admit(client_ip, req.headers()).await {
            route.metrics.rate_limited.inc();
            let (quota, window_secs) = limiter.policy();
            return Err(ProxyError::RateLimited {
                retry_after_secs: limited.retry_after_secs,
                quota,
                window_secs,
            });
        }
    }
    let max_body = config.server.limits.max_body_bytes;
    let declared = declared_length(&req, max_body)?;

    // 4. Prepare the request for the backends.
    let key = upstream.hash_key(client_ip, req.headers(), req.uri().path());
    let client_version = req.version();
    let upgrade = wants_upgrade(&req);
    let client_upgrade = if upgrade {
        take_client_upgrade(&mut req)
    } else {
        None
    };
    let (mut parts, body) = req.into_parts();
    headers::remove_hop_by_hop(
        &mut parts.headers,
        upgrade,
        upstream.version == http::Version::HTTP_2,
    );
    if client_version == Version::HTTP_2 && upstream.version != Version::HTTP_2 {
        headers::join_cookies(&mut parts.headers);
    }
    let forwarding = Forwarding::new(
        &parts.headers,
        &ClientSide {
            ip: client_ip,
            proto: conn.proto,
            version: client_version,
            seen: conn.seen,
        },
        host,
    );
    trace.request_id = Some(forwarding.request_id.clone());
    let path_and_query = upstream_path(&parts.uri, route, normalised.as_deref())?;
    let authority = if upstream.version == Version::HTTP_2 {
        h2_authority(&mut parts.headers)?
    } else {
        None
    };
    let retries = upstream.config.retry.attempts;
    let body = replayable_body(
        body,
        declared,
        max_body,
        retries > 0,
        config.server.timeouts.idle,
    )
    .await?;
    let mut template = Template {
        scheme: upstream.scheme.clone(),
        direct: upstream.direct,
        method: parts.method,
        path_and_query,
        headers: parts.headers,
        authority,
        forwarding,
        version: upstream.version,
        response_timeout: upstream.response_timeout(),
        body_pause: config.server.timeouts.idle,
    };

    // 5. Attempt, and retry where the rules allow.
    let mut resp = attempt_until_done(upstream, &mut template, &body, key, trace).await?;

    // 6. Respond.
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            // A backend may not switch protocols the client did not ask for, nor to one
            // palisade did not forward the request as an upgrade for (`Upgrade: h2c` was
            // dropped): nothing is tunnelled, and the client gets a 502.
            return Err(ProxyError::ConnectionTerminated);
        };
        // The backend's connection now belongs to the tunnel, not to the pool; the client's
        // connection runs it once it has written the 101.
        let backend = match resp.body_mut().take_upgrade() {
            Some((socket, early)) => BackendEnd::Socket(socket, early),
            None => BackendEnd::Hyper(hyper::upgrade::on(&mut resp)),
        };
        client_upgrade.attach(backend);
        let (mut parts, _body) = resp.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers, true, false);
        return Ok(Response::from_parts(parts, ProxyBody::Empty));
    }
    let (mut parts, body) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers, false, false);
    // The client's connection keeps the version it speaks, whatever the backend spoke.
    parts.version = client_version;
    Ok(Response::from_parts(parts, ProxyBody::Upstream(body)))
}

/// The parts of the upstream request that stay the same on every attempt.
struct Template {
    scheme: Scheme,
    /// Whether requests go through palisade's own pool (origin-form URIs).
    direct: bool,
    method: Method,
    path_and_query: PathAndQuery,
    /// The client's headers, hop-by-hop ones removed (the forwarding headers are not in it).
    headers: HeaderMap,
    /// Toward an HTTP/2 backend: the `:authority` to send, the client's Host (which is
    /// then not in `headers`); `None`: the backend's configured `host:port` (as for a
    /// Host-less HTTP/1.0 request to an HTTP/1.1 backend).
    authority: Option<Authority>,
    forwarding: Forwarding,
    version: Version,
    /// The upstream's response timeout.
    response_timeout: Duration,
    /// How long the client may pause a streamed body (`server.timeouts.idle`).
    body_pause: Duration,
}

impl Template {
    /// The head palisade's own pool writes (plain HTTP/1.1 upstreams): borrowed, so a
    /// retry copies nothing.
    fn head<'a>(&'a self, backend: &'a Backend) -> RequestHead<'a> {
        RequestHead {
            method: &self.method,
            target: self.path_and_query.as_str(),
            version: self.version,
            headers: &self.headers,
            forwarding: &self.forwarding,
            default_host: backend.host.as_str(),
            response_timeout: self.response_timeout,
            body_pause: self.body_pause,
        }
    }

    /// The request for one attempt through hyper (TLS and h2c upstreams). On the last
    /// attempt that can happen the headers are moved instead of cloned.
    fn request(
        &mut self,
        backend: &Backend,
        body: ProxyBody,
        last: bool,
    ) -> Result<Request<ProxyBody>, ProxyError> {
        // Over HTTP/2 the URI's authority is the `:authority` sent (the connection goes to
        // the backend's address, see `h2::send`); through hyper-util's client (HTTP/1.1
        // over TLS) it is where to connect, and the Host goes in the headers.
        let authority = match &self.authority {
            Some(authority) => authority.clone(),
            None if self.version == Version::HTTP_2 => backend.host.clone(),
            None => backend.authority.clone(),
        };
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(authority)
            .path_and_query(self.path_and_query.clone())
            .build()
            .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = if last {
            std::mem::take(&mut self.headers)
        } else {
            self.headers.clone()
        };
        if self.version != Version::HTTP_2 && !req.headers().contains_key(HOST) {
            // A Host-less HTTP/1.0 request: the backend's name, as palisade's own pool
            // sends it (hyper-util would send the address it connects to).
            if let Ok(host) = HeaderValue::from_str(backend.host.as_str()) {
                req.headers_mut().insert(HOST, host);
            }
        }
        self.forwarding.apply(req.headers_mut());
        Ok(req)
    }
}

/// How one attempt ended.
// The answer is larger than the failure (its body carries the backend's header lines):
// boxing it would cost an allocation for every request to spare a copy of a few hundred
// bytes once per attempt.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    /// An answer to pass on.
    Answer(Response<UpstreamBody>),
    /// A failure, and whether the backend may have received the request.
    Failed { error: ProxyError, sent: bool },
}

/// Sends the request to one backend after another until an attempt succeeds or the retry
/// rules say stop:
/// - a connection failure (nothing was sent) is retried whatever the method, on any
///   backend (the same one too: it costs it nothing) and without a token from the retry
///   budget; but a backend whose TLS handshake failed (its certificate did not verify)
///   would fail the same way again, so the request goes on only to a backend it has not
///   tried, and never back to that one;
/// - after the request was sent, only idempotent requests with a buffered body are
///   retried, only after a reset, a timeout or a 502/503/504, only on a backend this
///   request has not tried (as nginx: a slow answer is not asked for again from the
///   backend that is still working on it), and each such retry needs a token from the
///   upstream's retry budget.
///
/// Every retry waits an exponential backoff with full jitter.
async fn attempt_until_done<'s>(
    upstream: &'s Upstream,
    template: &mut Template,
    body: &Replayable,
    key: u64,
    trace: &mut Trace<'s>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let policy = &upstream.config.retry;
    let idempotent = is_idempotent(&template.method);
    let mut tried = Tried::default();
    if policy.attempts > 0 {
        upstream.budget.deposit();
    }
    let mut attempt = 0u32;
    loop {
        let last = attempt >= policy.attempts;
        let outcome = attempt_once(upstream, template, body, key, &mut tried, trace, last).await?;
        // Whether the backend may have received the request, and whether it may be asked
        // again.
        let (sent, retryable, result) = match outcome {
            Outcome::Answer(resp) => {
                let retry_status = matches!(resp.status().as_u16(), 502..=504);
                let can = retry_status && idempotent && body.is_buffered();
                (true, can, Ok(resp))
            }
            Outcome::Failed { error, sent: true } => {
                let can = idempotent
                    && body.is_buffered()
                    && matches!(
                        error,
                        ProxyError::ConnectionTerminated
                            | ProxyError::ResponseTimeout
                            | ProxyError::InvalidResponse
                    );
                (true, can, Err(error))
            }
            Outcome::Failed { error, sent: false } => {
                let can = body.can_replay()
                    && (!matches!(error, ProxyError::Tls(_)) || upstream.has_untried(&tried));
                (false, can, Err(error))
            }
        };
        if !retryable
            || attempt >= policy.attempts
            || (sent && !(upstream.has_untried(&tried) && upstream.budget.try_withdraw()))
        {
            return result;
        }
        // The failed answer goes before the next attempt: its body holds its backend's
        // in-flight slot until dropped.
        drop(result);
        attempt += 1;
        upstream.retries.inc();
        // Boxed: retries are rare, and every request's future would carry the timer.
        Box::pin(tokio::time::sleep(backoff(
            policy.backoff,
            policy.backoff_max,
            attempt,
        )))
        .await;
    }
}

/// One attempt: pick a backend, send, judge.
async fn attempt_once<'s>(
    upstream: &'s Upstream,
    template: &mut Template,
    body: &Replayable,
    key: u64,
    tried: &mut Tried,
    trace: &mut Trace<'s>,
    last: bool,
) -> Result<Outcome, ProxyError> {
    let (index, in_flight) = upstream.acquire(key, tried).await.map_err(|e| match e {
        PickError::NoBackends | PickError::Barred => ProxyError::ConnectionRefused,
        PickError::QueueFull => ProxyError::QueueFull,
    })?;
    tried.push(index);
    let backend = &upstream.backends[index];
    trace.backend = Some(backend);
    trace.attempts += 1;
    // One clock read for the attempt's start and its deadline.
    let started = Instant::now();
    let deadline = deadline(started, upstream.response_timeout());
    let sent = if template.direct {
        let head = template.head(backend);
        upstream
            .send_direct(index, &head, body.attempt(), deadline)
            .await
    } else {
        let req = template.request(backend, body.attempt(), last)?;
        let sent = upstream.send_client(index, req, deadline).await;
        match sent {
            // A kept-alive connection the backend closed or reset as the request went out
            // (its idle timeout, a reload): an idempotent request held whole is sent
            // again once, on another connection, as palisade's own pool does and nginx
            // does for a cached connection. hyper-util only resends requests it had not
            // begun to write.
            Err(err)
                if err.connection_lost()
                    && !err.is_connect()
                    && is_idempotent(&template.method)
                    && body.is_buffered() =>
            {
                tracing::debug!(upstream = %upstream.name, backend = %backend.addr, error = %err, "connection lost before the answer; sending the request again");
                let req = template.request(backend, body.attempt(), last)?;
                upstream.send_client(index, req, deadline).await
            }
            sent => sent,
        }
    };
    // A stream the backend gave back unprocessed (HTTP/2 GOAWAY or REFUSED_STREAM) is no
    // failure of the backend's: not counted for it, nor against it.
    let mut blameless = false;
    let mut outcome = match sent {
        Ok(resp) => {
            backend.record_latency(started.elapsed(), crate::clock::coarse_ns());
            Outcome::Answer(resp)
        }
        Err(err) => {
            // A streaming body that failed on the client's side broke the attempt, whatever
            // the backend's client made of it (hyper's HTTP/2 client reports a stream it
            // reset itself).
            let error = body
                .client_fault()
                .unwrap_or_else(|| ProxyError::from_upstream(&err));
            if matches!(
                error,
                ProxyError::BodyTooLarge | ProxyError::BadRequest(_) | ProxyError::BodyTimeout
            ) {
                // The client's fault (its body), not the backend's: no strike, no retry.
                return Err(error);
            }
            if error == ProxyError::Exhausted {
                // palisade's own (out of descriptors or memory): no strike against the
                // backend, and no retry, which would only run into the same wall.
                warn_exhausted(&err);
                return Err(error);
            }
            if matches!(err, crate::upstream::pool::SendError::H2Refused(_)) {
                blameless = true;
                tracing::debug!(upstream = %upstream.name, backend = %backend.addr, error = %err, "backend gave the request back unprocessed; sending it again");
            } else if let (ProxyError::Tls(failure), Some(reason)) =
                (error, err.tls_handshake_error())
            {
                // It would fail the same way again: not for this request.
                tried.bar_last();
                warn_tls_failed(&upstream.name, backend, failure, reason);
            } else {
                tracing::warn!(upstream = %upstream.name, backend = %backend.addr, error = %err, "upstream request failed");
            }
            Outcome::Failed {
                sent: !err.is_connect(),
                error,
            }
        }
    };
    let code = match &outcome {
        Outcome::Answer(resp) => resp.status().as_u16(),
        Outcome::Failed { error, .. } => error.status().as_u16(),
    };
    if let Some(counters) = upstream.backend_metrics.get(index).filter(|_| !blameless) {
        counters.inc(code);
    }
    let ok = matches!(&outcome, Outcome::Answer(r) if !r.status().is_server_error());
    let mut judged_at_end = false;
    if let (Outcome::Answer(resp), Some(watches)) = (&mut outcome, upstream.body_watches.get(index))
    {
        // A body still to come may break off: a good answer is judged when its body
        // ends (a body the client abandons is not judged at all), and any answer's
        // broken body is logged and counted.
        judged_at_end = ok && !resp.body().is_end_stream();
        resp.body_mut()
            .watch(watches[usize::from(judged_at_end)].clone());
        if let Replayable::Parked { slot, .. } = body {
            resp.body_mut().waits_for_upload(slot.clone());
        }
        // The request stays in flight to the backend until its body ends.
        in_flight.hand_over();
    } else {
        drop(in_flight);
    }
    if !judged_at_end && !blameless {
        health::record_live(
            &upstream.name,
            backend,
            upstream.config.passive.as_ref(),
            ok,
        );
    }
    Ok(outcome)
}

/// Logs a failed TLS handshake with `backend`, naming it (by address, and by its
/// configured `host:port` when that differs), what failed, and rustls' reason.
fn warn_tls_failed(
    upstream: &str,
    backend: &Backend,
    failure: super::error::TlsFailure,
    reason: &rustls::Error,
) {
    let name = backend.host.as_str();
    let (open, named, close) = if name == &*backend.addr {
        ("", "", "")
    } else {
        (" (", name, ")")
    };
    tracing::warn!(
        upstream, backend = %backend.addr,
        "TLS handshake with backend {}{open}{named}{close} failed, {failure}: {reason}; not trying it again for this request",
        backend.addr
    );
}

/// Logs running out of descriptors or ports at most once a second: under such a flood
/// every request would write a line.
fn warn_exhausted(err: &crate::upstream::pool::SendError) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = crate::clock::coarse_ns();
    let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    if now.saturating_sub(last) >= 1_000_000_000
        && LAST
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        tracing::warn!(error = %err, "cannot open a backend connection: palisade is out of file descriptors or socket memory (raise its open-file limit); answering 503");
    }
}

/// `timeout` after `started`, capped at a year so that the sum cannot overflow.
fn deadline(started: Instant, timeout: Duration) -> tokio::time::Instant {
    const YEAR: Duration = Duration::from_secs(365 * 86_400);
    let at = started.checked_add(timeout.min(YEAR)).unwrap_or(started);
    tokio::time::Instant::from_std(at)
}

/// Exponential backoff with full jitter: a random wait up to `base` x 2^(attempt-1),
/// capped at `max`.
fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    Duration::from_nanos(fastrand::u64(..=crate::clock::nanos(ceiling)))
}

/// RFC 9110 idempotent methods, as the SPEC lists them.
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Turns the client's body into one the attempts can share: nothing for an empty body;
/// small bodies with a known length read into memory when retries are on; the rest
/// streamed (checked against `max_body` while they stream).
async fn replayable_body(
    body: ClientBody,
    declared: Option<u64>,
    max_body: u64,
    retries: bool,
    read_timeout: Duration,
) -> Result<Replayable, ProxyError> {
    if body.is_end_stream() {
        return Ok(Replayable::Empty);
    }
    match declared {
        Some(len) if retries && len <= REPLAY_LIMIT => {
            // Boxed: a rare path that would otherwise make every request's future larger.
            let collected = Box::pin(tokio::time::timeout(read_timeout, body.collect()))
                .await
                .map_err(|_| ProxyError::BodyTimeout)?
                .map_err(|_| ProxyError::BadRequest("request body ended early"))?;
            Ok(Replayable::Full(collected.to_bytes()))
        }
        _ => Ok(Replayable::park(body, max_body)),
    }
}

/// Refuses requests whose framing or target a backend might read differently than we do
/// (request smuggling), for HTTP/1.x and HTTP/2 alike. The HTTP/1.1 codec
/// ([`crate::server::h1`]) already refused differing or malformed Content-Lengths,
/// Transfer-Encoding in HTTP/1.0, obs-fold, invalid header names and values and bare CRs,
/// and forwards identical repeated Content-Lengths as one; it leaves both framing headers
/// in view so that this refuses them together.
fn check_framing<B>(req: &mut Request<B>, seen: Option<Seen>) -> Result<(), ProxyError> {
    let headers = req.headers_mut();
    let te = match seen {
        Some(seen) if !seen.transfer_encoding => None,
        _ => Some(headers.get_all(http::header::TRANSFER_ENCODING)),
    };
    let mut te_values = te.iter().flat_map(|te| te.iter());
    if let Some(first) = te_values.next() {
        if headers.contains_key(CONTENT_LENGTH) {
            return Err(ProxyError::BadRequest(
                "both content-length and transfer-encoding",
            ));
        }
        // Exactly one coding, chunked: other codings would reach the backend undone once
        // the hop-by-hop header is dropped, and chunked twice is invalid.
        if te_values.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(ProxyError::BadRequest(
                "transfer-encoding other than chunked",
            ));
        }
    }
    Ok(())
}

/// An HTTP/2 request head's size as HTTP/2 measures a header list (RFC 9113 6.5.2, as the
/// h2 layer counts it): each field's name and value plus 32, the pseudo-header fields
/// included. `proto` stands in for `:scheme` where the URI kept none.
fn h2_head_size<B>(req: &Request<B>, proto: &str) -> usize {
    const FIELD: usize = 32;
    let uri = req.uri();
    let path = uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    let mut size = FIELD + ":method".len() + req.method().as_str().len();
    size += FIELD + ":scheme".len() + uri.scheme_str().unwrap_or(proto).len();
    size += FIELD + ":path".len() + path;
    if let Some(authority) = uri.authority() {
        size += FIELD + ":authority".len() + authority.as_str().len();
    }
    for (name, value) in req.headers() {
        size += FIELD + name.as_str().len() + value.len();
    }
    size
}

/// Settles the request's one host, the value that routing, the allow/deny lists,
/// `X-Forwarded-Host`, the access log and the backend's Host all see, and leaves the
/// request's headers with at most that one Host (returned).
///
/// With an authority in the target (HTTP/2's `:authority`, an HTTP/1.x absolute-form
/// target) the host is that authority: an HTTP/2 `host` field that differs from it makes
/// the request malformed (RFC 9113 8.3.1), one that equals it is forwarded once; an
/// HTTP/1.x Host is replaced by the target's authority (RFC 9112 3.2.2). Without an
/// authority the host is the Host header: more than one is a 400 for every version, and an
/// HTTP/1.1 request needs exactly one.
fn settle_host<B>(
    req: &mut Request<B>,
    seen: Option<Seen>,
) -> Result<Option<HeaderValue>, ProxyError> {
    // What the codec counted, where it counted (HTTP/1.x); else a lookup (HTTP/2).
    let hosts = match seen {
        Some(seen) => usize::from(seen.hosts),
        None => req.headers().get_all(HOST).iter().count(),
    };
    let Some(authority) = req.uri().authority() else {
        if hosts > 1 || (hosts == 0 && req.version() == Version::HTTP_11) {
            return Err(ProxyError::BadRequest("HTTP/1.1 needs exactly one Host"));
        }
        if hosts == 0 {
            return Ok(None);
        }
        let host = req.headers().get(HOST).cloned();
        if host.as_ref().is_some_and(|h| !valid_host(h.as_bytes())) {
            return Err(ProxyError::BadRequest("invalid host"));
        }
        return Ok(host);
    };
    let authority = authority.as_str();
    if !valid_host(authority.as_bytes()) {
        return Err(ProxyError::BadRequest("invalid host"));
    }
    if hosts > 1 && req.version() == Version::HTTP_11 {
        return Err(ProxyError::BadRequest("HTTP/1.1 needs exactly one Host"));
    }
    if req.version() == Version::HTTP_2
        && req
            .headers()
            .get_all(HOST)
            .iter()
            .any(|h| !h.as_bytes().eq_ignore_ascii_case(authority.as_bytes()))
    {
        return Err(ProxyError::BadRequest("host differs from :authority"));
    }
    // An authority's characters are all valid in a field value.
    let host = HeaderValue::from_str(authority)
        .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    // Replaces every Host the client sent.
    req.headers_mut().insert(HOST, host.clone());
    Ok(Some(host))
}

/// The `:authority` of a request to an HTTP/2 backend: the client's Host, taken out of
/// `headers` (HTTP/2 names the host in `:authority` only; a `host` field next to it makes
/// servers such as nginx answer 400). `None` when the client sent none (HTTP/1.0).
fn h2_authority(headers: &mut HeaderMap) -> Result<Option<Authority>, ProxyError> {
    let Some(host) = headers.remove(HOST) else {
        return Ok(None);
    };
    Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(host.as_bytes()))
        .map(Some)
        .map_err(|_| ProxyError::BadRequest("invalid host"))
}

/// The body length the client declared (0 for no body); rejects one already over the limit
/// before any backend sees it. Bodies without a length are counted while they stream. The
/// codecs (palisade's HTTP/1.1, hyper's HTTP/2) checked Content-Length already: the body
/// knows it, no header lookup needed.
fn declared_length(req: &Request<ClientBody>, max_body: u64) -> Result<Option<u64>, ProxyError> {
    let Some(len) = req.body().size_hint().exact() else {
        return Ok(None);
    };
    if max_body != 0 && len > max_body {
        return Err(ProxyError::BodyTooLarge);
    }
    Ok(Some(len))
}

/// An HTTP/1.1 `Connection: upgrade` GET asking for WebSocket (the one upgrade palisade
/// forwards): palisade's HTTP/1.1 codec marks every such request with where its connection
/// will go ([`OnUpgrade`]); HTTP/2 requests never upgrade.
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET && req.extensions().get::<OnUpgrade>().is_some()
}

/// The path and query the backend sees: the client's, or with the route's prefix
/// stripped when it says so. The prefix is cut from the path the route matched: when that
/// is the `normalised` one, the backend gets it (as nginx's `proxy_pass` with a URI);
/// otherwise the client's path goes on as it was written (as nginx's without one).
fn upstream_path(
    uri: &Uri,
    route: &Route,
    normalised: Option<&str>,
) -> Result<PathAndQuery, ProxyError> {
    let Some(pq) = uri.path_and_query() else {
        return Ok(PathAndQuery::from_static("/"));
    };
    let rewritten = match normalised {
        Some(path) if route.strip_prefix => {
            let mut matched = path.to_owned();
            if let Some(query) = pq.query() {
                matched.push('?');
                matched.push_str(query);
            }
            route.rewrite_path(&matched)
        }
        _ => route.rewrite_path(pq.as_str()),
    };
    match rewritten {
        Some(rewritten) => {
            PathAndQuery::try_from(rewritten).map_err(|_| ProxyError::BadRequest("invalid path"))
        }
        None => Ok(pq.clone()),
    }
}

/// Where the backend's end of a tunnel goes (palisade's HTTP/1.1 codec puts this on every
/// WebSocket upgrade request; HTTP/2 requests never upgrade).
fn take_client_upgrade(req: &mut Request<ClientBody>) -> Option<OnUpgrade> {
    req.extensions_mut().remove::<OnUpgrade>()
}
