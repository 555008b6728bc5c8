//! The configuration file: schema, loading and validation.
//!
//! `raw` mirrors the TOML (unknown keys are errors), `validate` turns it into the types
//! below while collecting every problem it finds, each as `PATH:LINE:COL: message`. The
//! types here are plain values, already checked and with every default filled in: the
//! rest of palisade never re-validates. They serialise to JSON for the admin API's
//! `/config` with secrets redacted and durations written as in the file ("250ms").

mod raw;
mod validate;

use std::collections::HashMap;
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

/// Where a value is written in the config file (1-based line and column; 0: unknown), for
/// errors found after validation, when the files it names are read. Never part of a
/// config's meaning: any two positions compare equal.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pos {
    /// Line.
    pub line: usize,
    /// Column.
    pub col: usize,
}

impl PartialEq for Pos {
    fn eq(&self, _: &Pos) -> bool {
        true
    }
}

impl Eq for Pos {}

impl ConfigError {
    /// An error about the config at `path`, positioned at `at`.
    pub fn at(path: &Path, at: Pos, message: String) -> ConfigError {
        ConfigError {
            path: path.to_path_buf(),
            line: at.line,
            col: at.col,
            message,
        }
    }
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

/// Reads and validates the config file at `path`; an unreadable file is one error at
/// line 0. `Err` always holds at least one error.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    parse(&read(path)?, path)
}

/// The largest config file read (a config with 100,000 routes is about 10 MiB).
const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// The largest PEM file read (certificate chains, keys, CA bundles: the whole Mozilla
/// bundle is about 250 KiB).
pub const MAX_PEM_BYTES: u64 = 16 << 20;

/// Reads the config file at `path`; an unreadable file is one error at line 0.
pub fn read(path: &Path) -> Result<String, Vec<ConfigError>> {
    let error = |message: String| {
        vec![ConfigError {
            path: path.to_path_buf(),
            line: 0,
            col: 0,
            message,
        }]
    };
    let bytes = read_file(path, MAX_CONFIG_BYTES)
        .map_err(|e| error(format!("cannot read the config file: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        let before = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = before
            .rsplit(|&b| b == b'\n')
            .next()
            .map_or(0, |l| String::from_utf8_lossy(l).chars().count())
            + 1;
        vec![ConfigError {
            path: path.to_path_buf(),
            line,
            col,
            message: "the config file is not UTF-8 text".to_owned(),
        }]
    })
}

/// Reads a whole file of at most `max` bytes. Only regular files (or links to one) are
/// read: a FIFO, a device such as `/dev/zero` or a directory would block forever, never
/// end or fail obscurely, so it is an error up front, as is a file over `max`.
pub fn read_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, Read};
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking open: opening a FIFO for reading would wait for a writer. Reads from a
    // regular file ignore the flag.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(Error::other("it is a directory"));
    }
    if !meta.is_file() {
        return Err(Error::other("not a regular file"));
    }
    if meta.len() > max {
        return Err(Error::other(format!(
            "{} bytes, more than the {} MiB read",
            meta.len(),
            max >> 20
        )));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // A file that grows while it is read still stops at the limit.
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(Error::other(format!(
            "more than the {} MiB read",
            max >> 20
        )));
    }
    Ok(bytes)
}

/// Whether `text` holds no setting at all: only blank lines and comments.
pub fn is_blank(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#')
    })
}

/// Parses and validates config `text`; `path` is used in errors and to resolve relative
/// file paths (certificates, CA bundles) against the config file's directory. Does no
/// I/O except reading `admin.token_env`. `Err` holds every problem, sorted by position:
/// every unknown key and every value of the wrong type is an error of its own; a TOML
/// syntax error, or a required table of the wrong type, ends the list.
pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
    validate::parse(text, path)
}

/// Non-fatal remarks about a valid config (printed by `check`, logged by `run`): no
/// routes, unused upstreams, weights a round-robin upstream ignores, routes that an
/// earlier route always matches first, an admin API open to the network without a token.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = config.ignored.clone();
    if config.routes.is_empty() {
        out.push("no routes: every request gets 404".to_owned());
    }
    let lists = std::iter::once((
        "server.client_ip.trusted_proxies".to_owned(),
        &config.server.client_ip.trusted_proxies,
    ))
    .chain(config.routes.iter().flat_map(|r| {
        [
            (format!("route \"{}\" allow", r.name), &r.allow),
            (format!("route \"{}\" deny", r.name), &r.deny),
        ]
    }));
    for (list, nets) in lists {
        for net in nets.iter().filter(|n| n.addr() != n.network()) {
            out.push(format!(
                "{list}: {net} has host bits set; it means {} (nginx warns the same)",
                net.trunc()
            ));
        }
    }
    let used: std::collections::HashSet<&str> =
        config.routes.iter().map(|r| r.upstream.as_str()).collect();
    for upstream in &config.upstreams {
        if !used.contains(upstream.name.as_str()) {
            out.push(format!(
                "upstream \"{}\" is not used by any route",
                upstream.name
            ));
        }
        // Every other balance weighs its backends.
        if upstream.balance == Balance::RoundRobin
            && upstream.backends.iter().any(|b| b.weight != 1)
        {
            out.push(format!(
                "upstreams.{}: weight is ignored by balance = round_robin (use weighted)",
                upstream.name
            ));
        }
    }
    for (later, earlier) in config.routes.iter().zip(first_shadowing(&config.routes)) {
        if let Some(earlier) = earlier.and_then(|i| config.routes.get(i)) {
            out.push(format!(
                "route \"{}\" never matches: route \"{}\" before it matches all its requests",
                later.name, earlier.name
            ));
        }
    }
    if !crate::limit::client_ip::normalise(config.admin.listen.ip()).is_loopback()
        && config.admin.token.is_none()
    {
        out.push(format!(
            "the admin API listens on {} without a token: anyone who can reach it can reload the config; set admin.token or admin.token_env",
            config.admin.listen
        ));
    }
    out
}

/// For each route, the index of the first route before it that matches all its requests
/// ([`Route::shadows`]), if any. One pass, linear in the total length of the prefixes
/// (comparing every pair took 11 s at 20,000 routes): the routes seen so far are kept in
/// one trie of path segments per host (None: any host), and a route looks up only the
/// prefixes that can shadow it, which are its own segment prefixes, each also with a
/// trailing '/'.
fn first_shadowing(routes: &[Route]) -> Vec<Option<usize>> {
    /// The routes whose prefix is this node's path; `first` the earliest of them.
    #[derive(Default)]
    struct Node<'a> {
        first: Option<usize>,
        children: HashMap<&'a str, Node<'a>>,
    }
    let mut tries: HashMap<Option<&HostMatch>, Node<'_>> = HashMap::new();
    let mut out = Vec::with_capacity(routes.len());
    for (i, route) in routes.iter().enumerate() {
        let segments: Vec<&str> = route.path_prefix.split('/').collect();
        // An earlier route for any host shadows, and one for this very host.
        let hosts = [None, route.host.as_ref()];
        let hosts = if route.host.is_some() {
            &hosts[..]
        } else {
            &hosts[..1]
        };
        let mut first: Option<usize> = None;
        for host in hosts {
            let Some(mut node) = tries.get(host) else {
                continue;
            };
            for (k, segment) in segments.iter().enumerate() {
                let Some(next) = node.children.get(segment) else {
                    break;
                };
                node = next;
                // The first k+1 segments: the whole prefix, or one the rest of it
                // continues with '/'.
                let mut candidates = [node.first, None];
                // The same with a trailing '/', which the rest of the prefix continues.
                if k + 1 < segments.len() {
                    candidates[1] = node.children.get("").and_then(|n| n.first);
                }
                for c in candidates.into_iter().flatten() {
                    first = Some(first.map_or(c, |f| f.min(c)));
                }
            }
        }
        out.push(first);
        let mut node = tries.entry(route.host.as_ref()).or_default();
        for segment in segments {
            node = node.children.entry(segment).or_default();
        }
        node.first.get_or_insert(i);
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
    /// Keys that have no effect where they are set (`hash_key` without consistent_hash,
    /// `redis_url` with a local store), as `check` warns of them: `PATH:LINE:COL: ...`.
    #[serde(skip)]
    pub ignored: Vec<String>,
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
    /// One log line per request (default true; an extension of the SPEC).
    pub access_log: bool,
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
    /// Where `cert` and `key` are written, for errors found when the files are read.
    #[serde(skip)]
    pub cert_at: Pos,
    #[serde(skip)]
    pub key_at: Pos,
    /// Server names this certificate answers for (lowercased, may start with "*."); empty:
    /// the default certificate of its listen address.
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
    /// Unique name of letters, digits, '-', '_', '.' (default `route-N`, N its 1-based
    /// position).
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

impl Route {
    /// Whether every request `later` matches is matched by `self` first. Conservative:
    /// true only when it holds whether prefixes match by string or by path segment. The
    /// definition [`first_shadowing`] computes for all routes at once.
    #[cfg(test)]
    fn shadows(&self, later: &Route) -> bool {
        let host = self.host.is_none() || self.host == later.host;
        let p = &self.path_prefix;
        let prefix = p == "/"
            || *p == later.path_prefix
            || later
                .path_prefix
                .strip_prefix(p.as_str())
                .is_some_and(|rest| p.ends_with('/') || rest.starts_with('/'));
        host && prefix
    }
}

/// How a route matches the host; serialises as written ("api.example.com", "*.example.com").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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

/// What a rate limit is counted per; serialises as written ("client_ip", "header:x-api-key").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The client IP.
    ClientIp,
    /// A request header, lowercased (falls back to the client IP when absent).
    Header(HeaderName),
}

/// Where rate-limit counts live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
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
    /// The upstream's name: letters, digits, '-', '_', '.'.
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

/// `hash_key`; serialises as written ("client_ip", "path", "header:x-user").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client IP.
    ClientIp,
    /// A request header, lowercased (falls back to the client IP when absent).
    Header(HeaderName),
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
    /// How long a backend connection with nothing to do is kept for the next request
    /// (zero: none is kept). An extension of the SPEC, like nginx's upstream
    /// `keepalive_timeout`.
    #[serde(serialize_with = "ser_duration")]
    pub idle: Duration,
    /// The longest a backend may go silent in the middle of a response body, then the
    /// response is cut off (zero: no limit). An extension of the SPEC, like nginx's
    /// `proxy_read_timeout` (60 s) once the head is in.
    #[serde(serialize_with = "ser_duration")]
    pub read: Duration,
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
    /// Where `ca_file` is written, for errors found when it is read.
    #[serde(skip)]
    pub ca_file_at: Pos,
    /// Name to verify and send as SNI, lowercased (default: the backend's host).
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

impl Serialize for HostMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HostMatch::Exact(host) => s.serialize_str(host),
            HostMatch::Suffix(suffix) => s.serialize_str(&format!("*{suffix}")),
        }
    }
}

impl Serialize for LimitKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LimitKey::ClientIp => s.serialize_str("client_ip"),
            LimitKey::Header(name) => s.serialize_str(&format!("header:{name}")),
        }
    }
}

impl Serialize for HashKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HashKey::ClientIp => s.serialize_str("client_ip"),
            HashKey::Header(name) => s.serialize_str(&format!("header:{name}")),
            HashKey::Path => s.serialize_str("path"),
        }
    }
}

fn ser_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

/// `redis://user:secret@host` -> `redis://user:<redacted>@host`; a lone userinfo
/// (`redis://secret@host`) may be a password too, so it goes whole.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    // rfind: a password may hold an unescaped '@' or '/'; a redis URL's path (/db) never does.
    let Some(at) = url[scheme_end..].rfind('@').map(|i| scheme_end + i) else {
        return url.to_owned();
    };
    let redacted = match url[scheme_end..at].split_once(':') {
        Some((user, _)) => format!("{user}:<redacted>"),
        None => "<redacted>".to_owned(),
    };
    format!("{}{redacted}{}", &url[..scheme_end], &url[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Config {
        match parse(text, Path::new("t.toml")) {
            Ok(c) => c,
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn the_example_config_is_valid_and_complete() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/palisade.toml");
        let config = match load(&path) {
            Ok(c) => c,
            Err(e) => panic!(
                "{}",
                e.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        };
        assert_eq!(config.summary(), "2 routes, 1 upstreams, 3 backends");
        assert_eq!(warnings(&config), Vec::<String>::new());
        let app = config.upstream("app");
        assert!(app.is_some_and(|u| u.health.is_some() && u.passive.is_some() && u.queue.is_some()));
        assert!(config.upstream("nope").is_none());
        assert!(config.routes[0].rate_limit.is_some());
    }

    #[test]
    fn an_unreadable_file_is_one_error_without_position() {
        let e = match load(Path::new("/nonexistent/palisade.toml")) {
            Ok(_) => panic!("loaded a missing file"),
            Err(e) => e,
        };
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].col), (0, 0));
        let shown = e[0].to_string();
        assert!(
            shown.starts_with("/nonexistent/palisade.toml: cannot read the config file: "),
            "{shown}"
        );
    }

    #[test]
    fn errors_print_as_path_line_col_message() {
        let e = ConfigError {
            path: "config/palisade.toml".into(),
            line: 3,
            col: 12,
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "config/palisade.toml:3:12: bad");
    }

    #[test]
    fn warnings_name_unused_upstreams_shadowed_routes_and_open_admin() {
        let c = ok("[admin]\nlisten = \"0.0.0.0:9901\"\n\
            [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"a\"\n\
            [[routes]]\nname = \"users\"\npath_prefix = \"/api/users\"\nupstream = \"a\"\n\
            [[routes]]\nname = \"apix\"\npath_prefix = \"/apix\"\nupstream = \"a\"\n\
            [[routes]]\nname = \"other-host\"\nhost = \"b.test\"\nupstream = \"a\"\n\
            [[routes]]\nname = \"all\"\nupstream = \"a\"\n\
            [[routes]]\nname = \"late\"\nhost = \"c.test\"\npath_prefix = \"/c\"\nupstream = \"a\"\n\
            [upstreams.a]\nbackends = [{ addr = \"a:1\" }]\n[upstreams.unused]\nbackends = [{ addr = \"b:1\" }]\n");
        assert_eq!(
            warnings(&c),
            [
                "upstream \"unused\" is not used by any route",
                "route \"users\" never matches: route \"api\" before it matches all its requests",
                "route \"late\" never matches: route \"all\" before it matches all its requests",
                "the admin API listens on 0.0.0.0:9901 without a token: anyone who can reach it can reload the config; set admin.token or admin.token_env",
            ]
        );
    }

    #[test]
    fn networks_written_with_host_bits_are_a_warning() {
        let c = ok(
            "[server.client_ip]\ntrusted_proxies = [\"2001:db8::1/32\", \"10.0.0.0/8\"]\n\
            [[routes]]\nname = \"r\"\nupstream = \"a\"\nallow = [\"10.1.2.3/8\", \"10.1.2.3\"]\n\
            [upstreams.a]\nbackends = [{ addr = \"a:1\" }]\n",
        );
        assert_eq!(
            warnings(&c),
            [
                "server.client_ip.trusted_proxies: 2001:db8::1/32 has host bits set; it means 2001:db8::/32 (nginx warns the same)",
                "route \"r\" allow: 10.1.2.3/8 has host bits set; it means 10.0.0.0/8 (nginx warns the same)",
            ]
        );
    }

    #[test]
    fn an_admin_api_on_an_ipv4_mapped_loopback_address_is_loopback() {
        let c = ok("[admin]\nlisten = \"[::ffff:127.0.0.1]:9901\"\n\
            [[routes]]\nupstream = \"a\"\n[upstreams.a]\nbackends = [{ addr = \"a:1\" }]\n");
        assert!(warnings(&c).is_empty(), "{:?}", warnings(&c));
    }

    #[test]
    fn keys_that_have_no_effect_where_they_are_set_are_warnings() {
        // SPEC's example sets both, with comments saying where they apply: it must load.
        let c = ok("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1\nburst = 1\nstore = \"local\"\nredis_url = \"redis://127.0.0.1:6379\"\n[upstreams.app]\nbalance = \"round_robin\"\nhash_key = \"client_ip\"\nbackends = [{ addr = \"a:1\" }]\n");
        assert_eq!(
            warnings(&c),
            [
                "t.toml:7:13: redis_url is ignored: the limit's store is \"local\" (redis_url is for store = \"redis\")",
                "t.toml:10:12: hash_key is ignored: it is for balance = \"consistent_hash\"",
            ]
        );
        assert_eq!(
            c.routes[0].rate_limit.as_ref().map(|r| &r.store),
            Some(&LimitStore::Local)
        );
    }

    #[test]
    fn the_example_config_of_the_spec_loads() {
        // A copy of SPEC.md's example, kept in the repository; SPEC.md lives beside it.
        let example = include_str!("../../tests/fixtures/spec_example.toml");
        let spec =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/SPEC.md"));
        if let Ok(spec) = spec {
            let current = spec
                .split("```toml\n")
                .nth(1)
                .and_then(|rest| rest.split("```").next());
            assert_eq!(current, Some(example), "SPEC.md's example changed: copy it");
        }
        // Its TLS listener's certificate files are read when the config is used, not
        // here.
        let c = ok(example);
        assert_eq!(c.upstreams.len(), 1);
        // The two keys that apply elsewhere (the file is read as `t.toml`, so its
        // certificate paths are the repository's own).
        assert_eq!(warnings(&c).len(), 2, "{:?}", warnings(&c));
    }

    #[test]
    fn weights_that_round_robin_ignores_are_a_warning() {
        let c = ok("[upstreams.rr]\nbackends = [{ addr = \"a:1\", weight = 3 }, { addr = \"b:1\" }]\n\
            [upstreams.rr1]\nbackends = [{ addr = \"a:1\", weight = 1 }]\n\
            [upstreams.w]\nbalance = \"weighted\"\nbackends = [{ addr = \"a:1\", weight = 3 }]\n\
            [upstreams.lc]\nbalance = \"least_conn\"\nbackends = [{ addr = \"a:1\", weight = 3 }]\n\
            [upstreams.p2c]\nbalance = \"p2c_ewma\"\nbackends = [{ addr = \"a:1\", weight = 3 }]\n\
            [upstreams.rnd]\nbalance = \"random\"\nbackends = [{ addr = \"a:1\", weight = 3 }]\n\
            [upstreams.ch]\nbalance = \"consistent_hash\"\nbackends = [{ addr = \"a:1\", weight = 3 }]\n\
            [[routes]]\npath_prefix = \"/rr\"\nupstream = \"rr\"\n[[routes]]\npath_prefix = \"/rr1\"\nupstream = \"rr1\"\n[[routes]]\npath_prefix = \"/w\"\nupstream = \"w\"\n\
            [[routes]]\npath_prefix = \"/lc\"\nupstream = \"lc\"\n[[routes]]\npath_prefix = \"/p2c\"\nupstream = \"p2c\"\n[[routes]]\npath_prefix = \"/rnd\"\nupstream = \"rnd\"\n\
            [[routes]]\npath_prefix = \"/ch\"\nupstream = \"ch\"\n");
        assert_eq!(
            warnings(&c),
            ["upstreams.rr: weight is ignored by balance = round_robin (use weighted)"]
        );
    }

    #[test]
    fn shadowing_in_one_pass_finds_what_comparing_every_pair_finds() {
        let prefixes = [
            "/", "/a", "/a/", "/ab", "/a/b", "/a/b/", "/a//b", "/a//", "//", "/ab/c", "/b",
        ];
        let hosts = [
            None,
            Some(HostMatch::Exact("x.test".into())),
            Some(HostMatch::Exact("y.test".into())),
            Some(HostMatch::Suffix(".x.test".into())),
        ];
        let route = |n: u64| Route {
            name: format!("r{n}"),
            host: hosts[(n / 16 % 4) as usize].clone(),
            path_prefix: prefixes[(n % 11) as usize].to_owned(),
            upstream: "a".into(),
            strip_prefix: false,
            allow: vec![],
            deny: vec![],
            rate_limit: None,
        };
        // A fixed pseudo-random sequence of short route lists.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let len = next() % 9;
            let routes: Vec<Route> = (0..len).map(|_| route(next())).collect();
            let naive: Vec<Option<usize>> = routes
                .iter()
                .enumerate()
                .map(|(i, later)| routes[..i].iter().position(|r| r.shadows(later)))
                .collect();
            let shown: Vec<(Option<&HostMatch>, &str)> = routes
                .iter()
                .map(|r| (r.host.as_ref(), r.path_prefix.as_str()))
                .collect();
            assert_eq!(first_shadowing(&routes), naive, "{shown:?}");
        }
    }

    #[test]
    fn twenty_thousand_routes_validate_with_their_warnings() {
        // Every 1000th route repeats the prefix of one for the same host 50 routes before
        // (shadowed), every 5000th is under such an earlier prefix (shadowed by it).
        let mut text = String::from("[upstreams.a]\nbackends = [{ addr = \"a:1\" }]\n");
        for i in 0..20_000 {
            let prefix = match i {
                i if i % 5000 == 4999 => format!("/p{}/deeper", i - 4050),
                i if i % 1000 == 999 => format!("/p{}", i - 50),
                i => format!("/p{i}"),
            };
            text.push_str(&format!(
                "[[routes]]\nname = \"r{i}\"\nhost = \"h{}.test\"\npath_prefix = \"{prefix}\"\nupstream = \"a\"\n",
                i % 50
            ));
        }
        let c = ok(&text);
        assert_eq!(c.routes.len(), 20_000);
        let mut want = Vec::new();
        for i in 0..20_000 {
            let earlier = match i {
                i if i % 5000 == 4999 => i - 4050,
                i if i % 1000 == 999 => i - 50,
                _ => continue,
            };
            want.push(format!(
                "route \"r{i}\" never matches: route \"r{earlier}\" before it matches all its requests"
            ));
        }
        assert_eq!(want.len(), 20);
        assert_eq!(warnings(&c), want);
    }

    #[test]
    fn json_redacts_secrets_and_writes_durations_as_in_the_file() {
        let c = ok("[admin]\ntoken = \"s3cret\"\n[[routes]]\nupstream = \"a\"\n[routes.rate_limit]\nrequests_per_second = 1\nburst = 1\nstore = \"redis\"\nredis_url = \"redis://u:pa55@r:6379/0\"\n[upstreams.a]\nbackends = [{ addr = \"a:1\" }]\n[upstreams.a.health]\ntimeout = \"250ms\"\n");
        let json = serde_json::to_string(&c).unwrap_or_default();
        assert!(!json.contains("s3cret") && !json.contains("pa55"), "{json}");
        assert!(json.contains("\"token\":\"<redacted>\""), "{json}");
        assert!(json.contains("redis://u:<redacted>@r:6379/0"), "{json}");
        assert!(json.contains("\"timeout\":\"250ms\""), "{json}");
        assert!(json.contains("\"key\":\"client_ip\""), "{json}");
        assert!(json.contains("\"hash_key\":\"client_ip\""), "{json}");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://r:6379"), "redis://r:6379");
        assert_eq!(redact_url("redis://:pw@r"), "redis://:<redacted>@r");
        assert_eq!(
            redact_url("rediss://u:p@ss@r/1"),
            "rediss://u:<redacted>@r/1"
        );
        assert_eq!(redact_url("redis://secret@r"), "redis://<redacted>@r");
    }
}
