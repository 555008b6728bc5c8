//! The configuration file: schema, loading and validation.
//!
//! `raw` mirrors the TOML (unknown keys are errors), `validate` turns it into the types
//! below while collecting every problem it finds, each as `PATH:LINE:COL: message`. The
//! types here are plain values, already checked: the rest of palisade never re-validates.

mod raw;
mod validate;

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::{Serialize, Serializer};

/// One problem in a config file, with its position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line; 0 when the problem is not at a position (e.g. an unreadable file).
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
    /// What is wrong and what is expected.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                self.line,
                self.col,
                self.message
            )
        }
    }
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            path: path.to_path_buf(),
            line: 0,
            col: 0,
            message: format!("cannot read the config file: {e}"),
        }]
    })?;
    parse(&text, path)
}

/// Parses and validates config `text`; `path` is used in errors and to resolve relative
/// file paths (certificates) against the config file's directory.
pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
    validate::parse(text, path)
}

/// Non-fatal remarks about a valid config (printed by `check`, logged by `run`).
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for upstream in &config.upstreams {
        if !config.routes.iter().any(|r| r.upstream == upstream.name) {
            out.push(format!(
                "upstream \"{}\" is not used by any route",
                upstream.name
            ));
        }
    }
    if !config.admin.listen.ip().is_loopback() && config.admin.token.is_none() {
        out.push(format!(
            "the admin API listens on {} without a token: anyone who can reach it can reload the config; set admin.token or admin.token_env",
            config.admin.listen
        ));
    }
    out
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// `[server]`.
    pub server: Server,
    /// `[admin]`.
    pub admin: Admin,
    /// `[[routes]]`, in file order.
    pub routes: Vec<Route>,
    /// `[upstreams.NAME]`, in file order.
    pub upstreams: Vec<Upstream>,
}

impl Config {
    /// `check`'s one-line summary: "2 routes, 1 upstreams, 3 backends".
    pub fn summary(&self) -> String {
        let backends: usize = self.upstreams.iter().map(|u| u.backends.len()).sum();
        format!(
            "{} routes, {} upstreams, {} backends",
            self.routes.len(),
            self.upstreams.len(),
            backends
        )
    }

    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Server {
    /// Plain HTTP listen addresses.
    pub listen: Vec<SocketAddr>,
    /// TLS listeners.
    pub tls: Vec<TlsListener>,
    /// Client-side timeouts.
    pub timeouts: ServerTimeouts,
    /// Client-side limits.
    pub limits: Limits,
    /// Client IP resolution.
    pub client_ip: ClientIp,
}

/// `[[server.tls]]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsListener {
    /// Listen address.
    pub listen: SocketAddr,
    /// Certificate chain (PEM), resolved against the config file's directory.
    pub cert: PathBuf,
    /// Private key (PEM), resolved against the config file's directory.
    pub key: PathBuf,
    /// Server names this certificate answers for (lowercased).
    pub sni: Vec<String>,
}

/// `[server.timeouts]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerTimeouts {
    /// A request head must arrive within this.
    #[serde(serialize_with = "ser_duration")]
    pub header_read: Duration,
    /// Keep-alive idle limit.
    #[serde(serialize_with = "ser_duration")]
    pub idle: Duration,
    /// Drain limit on SIGTERM.
    #[serde(serialize_with = "ser_duration")]
    pub shutdown: Duration,
}

/// `[server.limits]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// Open client connections at most.
    pub max_connections: usize,
    /// Largest request head, in bytes.
    pub max_header_bytes: usize,
    /// Largest request body, in bytes (0 = unlimited).
    pub max_body_bytes: u64,
}

/// `[server.client_ip]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientIp {
    /// Peers whose X-Forwarded-For is believed.
    pub trusted_proxies: Vec<IpNet>,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Admin {
    /// Listen address of the admin API.
    pub listen: SocketAddr,
    /// Bearer token required by the admin API (from `token` or `token_env`).
    #[serde(serialize_with = "ser_secret")]
    pub token: Option<String>,
}

/// `[[routes]]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    /// Unique name (default `route-N`, N its 1-based position).
    pub name: String,
    /// Host to match; None matches any.
    pub host: Option<HostMatch>,
    /// Path prefix to match; starts with '/'.
    pub path_prefix: String,
    /// The upstream's name (validated to exist).
    pub upstream: String,
    /// Remove `path_prefix` before forwarding.
    pub strip_prefix: bool,
    /// Only these client addresses (empty = everyone).
    pub allow: Vec<IpNet>,
    /// Never these client addresses.
    pub deny: Vec<IpNet>,
    /// Optional rate limit.
    pub rate_limit: Option<RateLimit>,
}

/// How a route matches the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HostMatch {
    /// This host exactly (lowercase, no port).
    Exact(String),
    /// Any host ending in this suffix, which starts with '.' (from `*.example.com`).
    Suffix(String),
}

/// `[routes.rate_limit]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimit {
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Burst size, at least 1.
    pub burst: u32,
    /// What a limit is counted per.
    pub key: LimitKey,
    /// Where the counts live.
    pub store: LimitStore,
}

/// What a rate limit is counted per.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LimitKey {
    /// The client IP.
    ClientIp,
    /// A request header (falls back to the client IP when absent).
    Header(#[serde(serialize_with = "ser_header_name")] HeaderName),
}

/// Where rate-limit counts live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LimitStore {
    /// In this process.
    Local,
    /// In Redis, shared by every instance.
    Redis {
        /// Connection URL (password redacted when printed).
        #[serde(serialize_with = "ser_url")]
        url: String,
    },
}

/// `[upstreams.NAME]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Upstream {
    /// The upstream's name.
    pub name: String,
    /// Selection algorithm.
    pub balance: Balance,
    /// Hash key for `consistent_hash`.
    pub hash_key: HashKey,
    /// Protocol spoken to the backends.
    pub protocol: Protocol,
    /// The backends, in file order.
    pub backends: Vec<BackendAddr>,
    /// How often DNS names among the backends are re-resolved.
    #[serde(serialize_with = "ser_duration")]
    pub resolve_every: Duration,
    /// Active health checks.
    pub health: Option<Health>,
    /// Passive outlier detection.
    pub passive: Option<Passive>,
    /// Retry policy (always present; `attempts = 0` turns retries off).
    pub retry: Retry,
    /// Upstream timeouts.
    pub timeouts: UpstreamTimeouts,
    /// Optional request queue.
    pub queue: Option<Queue>,
    /// Optional TLS to the backends.
    pub tls: Option<UpstreamTls>,
}

/// `balance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each backend in turn.
    RoundRobin,
    /// Smooth weighted round robin.
    Weighted,
    /// Fewest in flight.
    LeastConn,
    /// Power of two choices over latency EWMA.
    P2cEwma,
    /// Weighted random.
    Random,
    /// Hash ring over `hash_key`.
    ConsistentHash,
}

/// `hash_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HashKey {
    /// The client IP.
    ClientIp,
    /// A request header (falls back to the client IP when absent).
    Header(#[serde(serialize_with = "ser_header_name")] HeaderName),
    /// The request path.
    Path,
}

/// `protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 prior knowledge, cleartext.
    H2c,
}

/// One entry of `backends`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendAddr {
    /// `host:port` as written.
    pub addr: String,
    /// Relative weight, at least 1.
    pub weight: u32,
}

/// `[upstreams.NAME.health]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    /// Path probed with GET.
    pub path: String,
    /// Time between probes.
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// Probe timeout (shorter than `interval`).
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Passes in a row to come back.
    pub healthy_threshold: u32,
    /// Failures in a row to leave rotation.
    pub unhealthy_threshold: u32,
    /// Statuses that count as a pass.
    pub expect_status: RangeInclusive<u16>,
}

/// `[upstreams.NAME.passive]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Passive {
    /// Live failures in a row that eject a backend.
    pub consecutive_failures: u32,
    /// How long an ejection lasts (the first time).
    #[serde(serialize_with = "ser_duration")]
    pub ejection: Duration,
}

/// `[upstreams.NAME.retry]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retry {
    /// Extra tries after the first.
    pub attempts: u32,
    /// Base backoff.
    #[serde(serialize_with = "ser_duration")]
    pub backoff: Duration,
    /// Backoff cap.
    #[serde(serialize_with = "ser_duration")]
    pub backoff_max: Duration,
    /// Retries may add at most this % to the request rate.
    pub budget_percent: u32,
}

/// `[upstreams.NAME.timeouts]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamTimeouts {
    /// TCP connect.
    #[serde(serialize_with = "ser_duration")]
    pub connect: Duration,
    /// Until the response head arrives.
    #[serde(serialize_with = "ser_duration")]
    pub response: Duration,
}

/// `[upstreams.NAME.queue]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Queue {
    /// In-flight cap per backend.
    pub max_in_flight_per_backend: u32,
    /// Waiting requests at most.
    pub size: u32,
    /// Longest wait.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

/// TLS to the backends (`tls = true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTls {
    /// CA bundle to verify the backends with (default: system roots).
    pub ca_file: Option<PathBuf>,
    /// Name to verify and send as SNI (default: the backend's host).
    pub server_name: Option<String>,
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&validate::format_duration(*d))
}

fn ser_secret<S: Serializer>(token: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match token {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

fn ser_header_name<S: Serializer>(name: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(name.as_str())
}

/// `redis://user:secret@host` -> `redis://user:<redacted>@host`.
fn ser_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            s.serialize_str(&format!(
                "{}{}:<redacted>{}",
                &url[..scheme_end + 3],
                user,
                &url[at..]
            ))
        }
        _ => s.serialize_str(url),
    }
}
