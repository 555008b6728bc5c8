//! Rate limits shared by every palisade instance: the same GCRA as the local limiter,
//! decided atomically in Redis by one Lua script per check (one round trip).
//!
//! Redis holds one key per client key, `palisade:ratelimit:{route}:{key}`, whose value is
//! the bucket's theoretical arrival time (TAT) in microseconds of Redis's own clock
//! (`TIME`), so instances with skewed clocks still agree. A key expires when its bucket
//! is full again, so Redis's memory follows the active clients only.
//!
//! While Redis is unreachable (refused, reset, or slower than [`CHECK_TIMEOUT`]) the route
//! falls back to its local limiter: never unlimited. The switch is logged once, shown by
//! `palisade_rate_limit_store_up{route}` = 0 and counted per check in
//! `palisade_rate_limit_fallbacks_total{route}`; a background task reconnects with
//! exponential backoff and jitter, and checks return to Redis as soon as it answers again.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderMap;
use prometheus::{IntCounter, IntGauge};
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

use crate::config::{LimitKey, RateLimit};

use super::rate::Limited;

/// The longest a request waits for Redis before its limit is decided locally.
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(100);

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// First and longest wait between two reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A connection lost sooner than this after it was made counts as flapping.
const FLAPPING: Duration = Duration::from_secs(10);

/// GCRA in one step. KEYS[1]: the bucket. ARGV[1]: emission interval in microseconds
/// (1 / rate). ARGV[2]: burst. Returns {1, 0} when the request passes, {0, wait_us}
/// when it must wait.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - tolerance - now
if wait > 0 then return {0, math.ceil(wait)} end
local ttl = math.max(1, math.ceil((new_tat - now) / 1000))
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl)
return {1, 0}
";

/// One route's limit in Redis.
pub struct SharedLimit {
    client: redis::Client,
    script: redis::Script,
    /// `palisade:ratelimit:{route}:`.
    prefix: String,
    interval_us: u64,
    burst: u32,
    key: LimitKey,
    /// The live connection; `None` while Redis is unreachable.
    conn: ArcSwapOption<MultiplexedConnection>,
    /// Wakes the connector when a check loses the connection.
    lost: Arc<Notify>,
    started: AtomicBool,
    connector: Mutex<Option<tokio::task::JoinHandle<()>>>,
    up: IntGauge,
    fallbacks: IntCounter,
    /// The URL with its password redacted, for the log.
    url: String,
}

impl std::fmt::Debug for SharedLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimit")
            .field("prefix", &self.prefix)
            .field("url", &self.url)
            .field("connected", &self.conn.load().is_some())
            .finish()
    }
}

impl Drop for SharedLimit {
    fn drop(&mut self) {
        if let Ok(mut connector) = self.connector.lock() {
            if let Some(task) = connector.take() {
                task.abort();
            }
        }
    }
}

impl SharedLimit {
    /// The shared limit of `route` in the Redis at `url`, with its metric handles. Opens
    /// no connection: [`SharedLimit::start`] does, in the background.
    pub fn new(
        route: &str,
        config: &RateLimit,
        url: &str,
        (up, fallbacks): (IntGauge, IntCounter),
    ) -> Result<Self, String> {
        let client = redis::Client::open(url)
            .map_err(|e| format!("redis_url {}: {e}", crate::config::redact_url(url)))?;
        let interval = 1_000_000.0 / config.requests_per_second.max(1e-9);
        up.set(0);
        Ok(SharedLimit {
            client,
            script: redis::Script::new(GCRA),
            prefix: format!("palisade:ratelimit:{route}:"),
            interval_us: (interval.round() as u64).max(1),
            burst: config.burst.max(1),
            key: config.key.clone(),
            conn: ArcSwapOption::empty(),
            lost: Arc::new(Notify::new()),
            started: AtomicBool::new(false),
            connector: Mutex::new(None),
            up,
            fallbacks,
            url: crate::config::redact_url(url),
        })
    }

    /// Starts the background connector (once; later calls do nothing). Needs a Tokio
    /// runtime.
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let task = tokio::spawn(connect_loop(Arc::downgrade(self), self.lost.clone()));
        if let Ok(mut connector) = self.connector.lock() {
            *connector = Some(task);
        }
    }

    /// Whether checks go to Redis right now.
    pub fn is_connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// The Redis key of a request: its client IP, or a digest of its header value (the
    /// same in every instance; the value itself never reaches Redis).
    pub fn key(&self, client_ip: IpAddr, headers: &HeaderMap) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 42);
        key.push_str(&self.prefix);
        let header = match &self.key {
            LimitKey::ClientIp => None,
            LimitKey::Header(name) => headers.get(name),
        };
        match header {
            Some(value) => {
                let digest = sha1_smol::Sha1::from(value.as_bytes()).digest().bytes();
                key.push_str("h:");
                for b in &digest[..12] {
                    let _ = write!(key, "{b:02x}");
                }
            }
            None => {
                let _ = write!(key, "{client_ip}");
            }
        }
        key
    }

    /// Counts one request in Redis. `None` when Redis could not decide (unreachable, or
    /// slower than [`CHECK_TIMEOUT`]): the caller decides locally, and this is counted.
    pub async fn check(&self, key: &str) -> Option<Result<(), Limited>> {
        let Some(conn) = self.conn.load_full() else {
            self.fallbacks.inc();
            return None;
        };
        let mut conn = MultiplexedConnection::clone(&conn);
        let mut invocation = self.script.key(key);
        invocation.arg(self.interval_us).arg(self.burst);
        let answer = tokio::time::timeout(
            CHECK_TIMEOUT,
            invocation.invoke_async::<(i64, i64)>(&mut conn),
        )
        .await;
        match answer {
            Ok(Ok((1, _))) => Some(Ok(())),
            Ok(Ok((_, wait_us))) => {
                let wait_us = u64::try_from(wait_us).unwrap_or(0);
                let secs = wait_us.div_ceil(1_000_000).max(1);
                Some(Err(Limited {
                    retry_after_secs: secs,
                }))
            }
            Ok(Err(e)) => {
                self.lose(&e.to_string());
                None
            }
            Err(_) => {
                self.lose("no answer within 100ms");
                None
            }
        }
    }

    /// Drops the connection (once, however many checks fail together) and wakes the
    /// connector.
    fn lose(&self, why: &str) {
        self.fallbacks.inc();
        if self.conn.swap(None).is_some() {
            self.up.set(0);
            tracing::warn!(
                redis = %self.url,
                limit = %self.prefix,
                error = why,
                "rate limit store unreachable; limiting per instance until it is back"
            );
            self.lost.notify_one();
        }
    }

    async fn connect(&self) -> redis::RedisResult<MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // Load the script now, so the first check is one round trip (EVALSHA).
        self.script
            .prepare_invoke()
            .load_async(&mut conn)
            .await
            .map(|_: String| ())?;
        // And run it once on a key no client has (header values cannot hold NUL): a Redis
        // that takes connections but refuses the checks (out of memory, read-only) is
        // not up. Taking it for up made a "back" and an "unreachable" line, and the store
        // shown up, on every reconnect.
        let mut probe = self.script.key(format!("{}\0probe", self.prefix));
        probe.arg(self.interval_us).arg(self.burst);
        probe.invoke_async::<(i64, i64)>(&mut conn).await?;
        Ok(conn)
    }
}

/// Keeps a connection to Redis: connects, and reconnects with exponential backoff (full
/// jitter) whenever a check loses it. Ends when the limit is dropped.
async fn connect_loop(limit: Weak<SharedLimit>, lost: Arc<Notify>) {
    let mut backoff = BACKOFF_MIN;
    let mut ever_connected = false;
    let mut logged_down = false;
    let mut connected_at = std::time::Instant::now();
    loop {
        let Some(this) = limit.upgrade() else { return };
        if this.conn.load().is_some() {
            drop(this);
            lost.notified().await;
            // Lost soon after it was made: Redis answers but refuses the checks (out of
            // memory, a script error). Reconnecting at once made a lost/back pair of log
            // lines per request and showed the store up; wait, longer each time.
            if connected_at.elapsed() < FLAPPING {
                let jittered = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
                tokio::time::sleep(jittered).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            } else {
                backoff = BACKOFF_MIN;
            }
            continue;
        }
        match this.connect().await {
            Ok(conn) => {
                this.conn.store(Some(Arc::new(conn)));
                this.up.set(1);
                if ever_connected || logged_down {
                    tracing::info!(redis = %this.url, limit = %this.prefix, "rate limit store is back; limits are shared again");
                }
                ever_connected = true;
                logged_down = false;
                connected_at = std::time::Instant::now();
            }
            Err(e) => {
                if !ever_connected && !logged_down {
                    tracing::warn!(redis = %this.url, limit = %this.prefix, error = %e, "rate limit store unreachable; limiting per instance until it is back");
                } else {
                    tracing::debug!(redis = %this.url, error = %e, "reconnecting to the rate limit store");
                }
                logged_down = true;
                drop(this);
                let jittered = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
                tokio::time::sleep(jittered).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
