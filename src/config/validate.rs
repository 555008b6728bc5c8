//! From the raw file to a checked [`Config`], collecting every problem in one pass.
//!
//! Syntax errors and unknown keys come from the TOML parser and stop there (one error);
//! everything else is checked here and reported all together, each at the span of the
//! offending value.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use toml::Spanned;

use super::raw::*;
use super::*;

/// Parses and validates `text`.
pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
    let mut v = Validator {
        text,
        path,
        errors: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            v.error(&span, e.message().trim_end().to_owned());
            return Err(v.errors);
        }
    };
    let config = v.config(raw);
    if v.errors.is_empty() {
        Ok(config)
    } else {
        v.errors.sort_by_key(|e| (e.line, e.col));
        Err(v.errors)
    }
}

struct Validator<'a> {
    text: &'a str,
    path: &'a Path,
    errors: Vec<ConfigError>,
}

/// Defaults, as documented in config/palisade.toml.
mod default {
    use std::time::Duration;
    pub const LISTEN: &str = "127.0.0.1:8080";
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9901";
    pub const HEADER_READ: Duration = Duration::from_secs(10);
    pub const IDLE: Duration = Duration::from_secs(60);
    pub const SHUTDOWN: Duration = Duration::from_secs(30);
    pub const MAX_CONNECTIONS: i64 = 10_000;
    pub const MAX_HEADER_BYTES: i64 = 65_536;
    pub const MAX_BODY_BYTES: i64 = 10_485_760;
    pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
    pub const CONSECUTIVE_FAILURES: i64 = 5;
    pub const EJECTION: Duration = Duration::from_secs(10);
    pub const RETRY_ATTEMPTS: i64 = 2;
    pub const BACKOFF: Duration = Duration::from_millis(25);
    pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
    pub const BUDGET_PERCENT: i64 = 20;
    pub const CONNECT: Duration = Duration::from_secs(1);
    pub const RESPONSE: Duration = Duration::from_secs(30);
    pub const QUEUE_IN_FLIGHT: i64 = 100;
    pub const QUEUE_SIZE: i64 = 1000;
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
}

impl Validator<'_> {
    fn error(&mut self, span: &Range<usize>, message: String) {
        let (line, col) = line_col(self.text, span.start);
        self.errors.push(ConfigError {
            path: self.path.to_path_buf(),
            line,
            col,
            message,
        });
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let server = self.server(raw.server);
        let admin = self.admin(raw.admin);
        let mut upstreams: Vec<(usize, Upstream)> = raw
            .upstreams
            .into_iter()
            .map(|(name, u)| (u.span().start, self.upstream(name, u.into_inner())))
            .collect();
        upstreams.sort_by_key(|(start, _)| *start);
        let upstreams: Vec<Upstream> = upstreams.into_iter().map(|(_, u)| u).collect();
        let mut names = HashSet::new();
        let routes = raw
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| self.route(i, r, &upstreams, &mut names))
            .collect();
        Config {
            path: self.path.to_path_buf(),
            server,
            admin,
            routes,
            upstreams,
        }
    }

    // ---- [server] ----

    fn server(&mut self, raw: RawServer) -> Server {
        let listen = match raw.listen {
            None => vec![default::LISTEN
                .parse()
                .unwrap_or(([127, 0, 0, 1], 8080).into())],
            Some(list) => {
                let span = list.span();
                let list = list.into_inner();
                if list.is_empty() {
                    self.error(&span, "server.listen is empty: give at least one address, like \"127.0.0.1:8080\"".into());
                }
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                for addr in list {
                    if let Some(a) = self.socket_addr(&addr) {
                        if !seen.insert(a) {
                            self.error(&addr.span(), format!("listen address {a} appears twice"));
                        }
                        out.push(a);
                    }
                }
                out
            }
        };
        let tls = raw.tls.into_iter().map(|t| self.tls(t)).collect();
        let t = raw.timeouts;
        let timeouts = ServerTimeouts {
            header_read: self.duration_or(t.header_read, default::HEADER_READ, false),
            idle: self.duration_or(t.idle, default::IDLE, false),
            shutdown: self.duration_or(t.shutdown, default::SHUTDOWN, true),
        };
        let l = raw.limits;
        let limits = Limits {
            max_connections: self.int_or(
                l.max_connections,
                default::MAX_CONNECTIONS,
                1,
                "max_connections",
            ) as usize,
            max_header_bytes: self.int_or(
                l.max_header_bytes,
                default::MAX_HEADER_BYTES,
                1024,
                "max_header_bytes",
            ) as usize,
            max_body_bytes: self.int_or(
                l.max_body_bytes,
                default::MAX_BODY_BYTES,
                0,
                "max_body_bytes",
            ) as u64,
        };
        let client_ip = ClientIp {
            trusted_proxies: raw
                .client_ip
                .trusted_proxies
                .iter()
                .filter_map(|c| self.cidr(c))
                .collect(),
        };
        Server {
            listen,
            tls,
            timeouts,
            limits,
            client_ip,
        }
    }

    fn tls(&mut self, raw: Spanned<RawTls>) -> TlsListener {
        let raw = raw.into_inner();
        let listen = self
            .socket_addr(&raw.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let base = self.path.parent().unwrap_or(Path::new("."));
        let file = |s: &Spanned<String>| -> PathBuf { base.join(s.get_ref()) };
        for f in [&raw.cert, &raw.key] {
            if f.get_ref().is_empty() {
                self.error(&f.span(), "empty file path".into());
            }
        }
        let mut sni = Vec::new();
        for name in &raw.sni {
            match normalise_host(name.get_ref()) {
                Some(h) => sni.push(h),
                None => self.error(
                    &name.span(),
                    format!("invalid server name {:?}", name.get_ref()),
                ),
            }
        }
        TlsListener {
            listen,
            cert: file(&raw.cert),
            key: file(&raw.key),
            sni,
        }
    }

    // ---- [admin] ----

    fn admin(&mut self, raw: RawAdmin) -> Admin {
        let listen = match &raw.listen {
            Some(addr) => self.socket_addr(addr),
            None => None,
        }
        .unwrap_or_else(|| {
            default::ADMIN_LISTEN
                .parse()
                .unwrap_or(([127, 0, 0, 1], 9901).into())
        });
        let token = match (&raw.token, &raw.token_env) {
            (Some(t), Some(_)) => {
                self.error(
                    &t.span(),
                    "set admin.token or admin.token_env, not both".into(),
                );
                None
            }
            (Some(t), None) => Some(t.get_ref().clone()).filter(|t| !t.is_empty()),
            (None, Some(var)) => match std::env::var(var.get_ref()) {
                Ok(t) if !t.is_empty() => Some(t),
                Ok(_) => {
                    self.error(
                        &var.span(),
                        format!("environment variable {} is empty", var.get_ref()),
                    );
                    None
                }
                Err(_) => {
                    self.error(
                        &var.span(),
                        format!("environment variable {} is not set", var.get_ref()),
                    );
                    None
                }
            },
            (None, None) => None,
        };
        Admin { listen, token }
    }

    // ---- [[routes]] ----

    fn route(
        &mut self,
        index: usize,
        raw: Spanned<RawRoute>,
        upstreams: &[Upstream],
        names: &mut HashSet<String>,
    ) -> Route {
        let span = raw.span();
        let raw = raw.into_inner();
        let name = match &raw.name {
            Some(n) if n.get_ref().trim().is_empty() => {
                self.error(&n.span(), "route name is empty".into());
                format!("route-{}", index + 1)
            }
            Some(n) => n.get_ref().clone(),
            None => format!("route-{}", index + 1),
        };
        if !names.insert(name.clone()) {
            let at = raw.name.as_ref().map_or(span.clone(), |n| n.span());
            self.error(&at, format!("duplicate route name \"{name}\""));
        }
        let host = raw.host.as_ref().and_then(|h| self.host_match(h));
        let path_prefix = match &raw.path_prefix {
            Some(p) if !p.get_ref().starts_with('/') => {
                self.error(
                    &p.span(),
                    format!("path_prefix {:?} must start with '/'", p.get_ref()),
                );
                "/".to_owned()
            }
            Some(p) => p.get_ref().clone(),
            None => "/".to_owned(),
        };
        let upstream = raw.upstream.get_ref().clone();
        if !upstreams.iter().any(|u| u.name == upstream) {
            let defined: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
            let defined = if defined.is_empty() {
                "none are defined".to_owned()
            } else {
                format!("defined: {}", defined.join(", "))
            };
            self.error(
                &raw.upstream.span(),
                format!("route \"{name}\" uses upstream \"{upstream}\", which is not defined ({defined})"),
            );
        }
        let allow = raw.allow.iter().filter_map(|c| self.cidr(c)).collect();
        let deny = raw.deny.iter().filter_map(|c| self.cidr(c)).collect();
        let rate_limit = raw.rate_limit.map(|r| self.rate_limit(r));
        Route {
            name,
            host,
            path_prefix,
            upstream,
            strip_prefix: raw.strip_prefix,
            allow,
            deny,
            rate_limit,
        }
    }

    fn host_match(&mut self, raw: &Spanned<String>) -> Option<HostMatch> {
        let text = raw.get_ref();
        let (wildcard, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        match normalise_host(rest) {
            Some(host) if wildcard => Some(HostMatch::Suffix(format!(".{host}"))),
            Some(host) => Some(HostMatch::Exact(host)),
            None => {
                self.error(
                    &raw.span(),
                    format!("invalid host {text:?}: expected a name like \"api.example.com\" or \"*.example.com\""),
                );
                None
            }
        }
    }

    fn rate_limit(&mut self, raw: Spanned<RawRateLimit>) -> RateLimit {
        let raw = raw.into_inner();
        let rps = *raw.requests_per_second.get_ref();
        if !(rps.is_finite() && rps > 0.0) {
            self.error(
                &raw.requests_per_second.span(),
                format!("requests_per_second must be a positive number, not {rps}"),
            );
        }
        let burst = self.int(&raw.burst, 1, u32::MAX as i64, "burst") as u32;
        let key = match &raw.key {
            None => LimitKey::ClientIp,
            Some(k) => match self.header_key(k, false) {
                Some(KeyChoice::ClientIp) | None => LimitKey::ClientIp,
                Some(KeyChoice::Header(h)) => LimitKey::Header(h),
                Some(KeyChoice::Path) => LimitKey::ClientIp,
            },
        };
        let store = match raw.store.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("local") => {
                if let Some(url) = &raw.redis_url {
                    self.error(
                        &url.span(),
                        "redis_url is only used with store = \"redis\"".into(),
                    );
                }
                LimitStore::Local
            }
            Some("redis") => match &raw.redis_url {
                Some(url)
                    if url.get_ref().starts_with("redis://")
                        || url.get_ref().starts_with("rediss://") =>
                {
                    LimitStore::Redis {
                        url: url.get_ref().clone(),
                    }
                }
                Some(url) => {
                    self.error(
                        &url.span(),
                        format!(
                            "invalid redis_url {:?}: expected redis://host:port",
                            url.get_ref()
                        ),
                    );
                    LimitStore::Local
                }
                None => {
                    if let Some(s) = &raw.store {
                        self.error(&s.span(), "store = \"redis\" needs redis_url".into());
                    }
                    LimitStore::Local
                }
            },
            Some(other) => {
                let other = other.to_owned();
                if let Some(s) = &raw.store {
                    self.error(
                        &s.span(),
                        format!("invalid store {other:?}: expected \"local\" or \"redis\""),
                    );
                }
                LimitStore::Local
            }
        };
        RateLimit {
            requests_per_second: rps,
            burst,
            key,
            store,
        }
    }

    // ---- [upstreams.NAME] ----

    fn upstream(&mut self, name: String, raw: RawUpstream) -> Upstream {
        let balance = match &raw.balance {
            None => Balance::RoundRobin,
            Some(b) => match b.get_ref().as_str() {
                "round_robin" => Balance::RoundRobin,
                "weighted" => Balance::Weighted,
                "least_conn" => Balance::LeastConn,
                "p2c_ewma" => Balance::P2cEwma,
                "random" => Balance::Random,
                "consistent_hash" => Balance::ConsistentHash,
                other => {
                    self.error(&b.span(), format!("unknown balance {other:?}: expected round_robin, weighted, least_conn, p2c_ewma, random or consistent_hash"));
                    Balance::RoundRobin
                }
            },
        };
        let hash_key = match &raw.hash_key {
            None => HashKey::ClientIp,
            Some(k) => {
                if balance != Balance::ConsistentHash {
                    self.error(
                        &k.span(),
                        "hash_key is only used with balance = \"consistent_hash\"".into(),
                    );
                }
                match self.header_key(k, true) {
                    Some(KeyChoice::Header(h)) => HashKey::Header(h),
                    Some(KeyChoice::Path) => HashKey::Path,
                    _ => HashKey::ClientIp,
                }
            }
        };
        let protocol = match &raw.protocol {
            None => Protocol::Http1,
            Some(p) => match p.get_ref().as_str() {
                "http1" => Protocol::Http1,
                "h2c" => Protocol::H2c,
                other => {
                    self.error(
                        &p.span(),
                        format!("unknown protocol {other:?}: expected \"http1\" or \"h2c\""),
                    );
                    Protocol::Http1
                }
            },
        };
        let list_span = raw.backends.span();
        let list = raw.backends.into_inner();
        if list.is_empty() {
            self.error(&list_span, format!("upstream \"{name}\" has no backends"));
        }
        let mut seen = HashSet::new();
        let mut backends = Vec::new();
        for b in list {
            let b = b.into_inner();
            let addr = b.addr.get_ref().clone();
            if !valid_backend_addr(&addr) {
                self.error(&b.addr.span(), format!("invalid backend address {addr:?}: expected host:port, like \"127.0.0.1:9001\" or \"app.internal:80\""));
            } else if !seen.insert(addr.to_ascii_lowercase()) {
                self.error(
                    &b.addr.span(),
                    format!("backend {addr} appears twice in upstream \"{name}\""),
                );
            }
            let weight = match &b.weight {
                None => 1,
                Some(w) => self.int(w, 1, 1_000_000, "weight") as u32,
            };
            backends.push(BackendAddr { addr, weight });
        }
        let resolve_every = self.duration_or(raw.resolve_every, default::RESOLVE_EVERY, false);
        let health = raw.health.map(|h| self.health(h));
        let passive = raw.passive.map(|p| {
            let p = p.into_inner();
            Passive {
                consecutive_failures: self.int_or(
                    p.consecutive_failures,
                    default::CONSECUTIVE_FAILURES,
                    1,
                    "consecutive_failures",
                ) as u32,
                ejection: self.duration_or(p.ejection, default::EJECTION, false),
            }
        });
        let retry = self.retry(raw.retry);
        let timeouts = match raw.timeouts {
            None => UpstreamTimeouts {
                connect: default::CONNECT,
                response: default::RESPONSE,
            },
            Some(t) => UpstreamTimeouts {
                connect: self.duration_or(t.connect, default::CONNECT, false),
                response: self.duration_or(t.response, default::RESPONSE, false),
            },
        };
        let queue = raw.queue.map(|q| Queue {
            max_in_flight_per_backend: self.int_or(
                q.max_in_flight_per_backend,
                default::QUEUE_IN_FLIGHT,
                1,
                "max_in_flight_per_backend",
            ) as u32,
            size: self.int_or(q.size, default::QUEUE_SIZE, 0, "size") as u32,
            timeout: self.duration_or(q.timeout, default::QUEUE_TIMEOUT, false),
        });
        let tls_on = raw.tls.as_ref().is_some_and(|t| *t.get_ref());
        let tls = if tls_on {
            let base = self.path.parent().unwrap_or(Path::new("."));
            Some(UpstreamTls {
                ca_file: raw.ca_file.as_ref().map(|f| base.join(f.get_ref())),
                server_name: raw.server_name.as_ref().map(|s| s.get_ref().clone()),
            })
        } else {
            for key in [&raw.ca_file, &raw.server_name].into_iter().flatten() {
                self.error(
                    &key.span(),
                    "ca_file and server_name need tls = true".into(),
                );
            }
            None
        };
        Upstream {
            name,
            balance,
            hash_key,
            protocol,
            backends,
            resolve_every,
            health,
            passive,
            retry,
            timeouts,
            queue,
            tls,
        }
    }

    fn health(&mut self, raw: Spanned<RawHealth>) -> Health {
        let raw = raw.into_inner();
        let path = match &raw.path {
            Some(p) if !p.get_ref().starts_with('/') => {
                self.error(
                    &p.span(),
                    format!("health path {:?} must start with '/'", p.get_ref()),
                );
                "/health".to_owned()
            }
            Some(p) => p.get_ref().clone(),
            None => "/health".to_owned(),
        };
        let interval = self.duration_or(raw.interval, default::HEALTH_INTERVAL, false);
        let timeout_span = raw.timeout.as_ref().map(|t| t.span());
        let timeout = self.duration_or(raw.timeout, default::HEALTH_TIMEOUT, false);
        if timeout >= interval {
            let span = timeout_span.unwrap_or(0..0);
            self.error(
                &span,
                format!(
                    "health timeout ({}) must be shorter than interval ({})",
                    format_duration(timeout),
                    format_duration(interval)
                ),
            );
        }
        let expect_status = match &raw.expect_status {
            None => 200..=399,
            Some(s) => match parse_status_range(s.get_ref()) {
                Some(r) => r,
                None => {
                    self.error(&s.span(), format!("invalid expect_status {:?}: expected a status like \"200\" or a range like \"200-399\" within 100-599", s.get_ref()));
                    200..=399
                }
            },
        };
        Health {
            path,
            interval,
            timeout,
            healthy_threshold: self.int_or(raw.healthy_threshold, 2, 1, "healthy_threshold") as u32,
            unhealthy_threshold: self.int_or(raw.unhealthy_threshold, 2, 1, "unhealthy_threshold")
                as u32,
            expect_status,
        }
    }

    fn retry(&mut self, raw: Option<RawRetry>) -> Retry {
        let Some(raw) = raw else {
            return Retry {
                attempts: default::RETRY_ATTEMPTS as u32,
                backoff: default::BACKOFF,
                backoff_max: default::BACKOFF_MAX,
                budget_percent: default::BUDGET_PERCENT as u32,
            };
        };
        let backoff_span = raw.backoff.as_ref().map(|b| b.span());
        let backoff = self.duration_or(raw.backoff, default::BACKOFF, true);
        let backoff_max = self.duration_or(raw.backoff_max, default::BACKOFF_MAX, true);
        if backoff > backoff_max {
            self.error(
                &backoff_span.unwrap_or(0..0),
                format!(
                    "backoff ({}) is larger than backoff_max ({})",
                    format_duration(backoff),
                    format_duration(backoff_max)
                ),
            );
        }
        Retry {
            attempts: self
                .int_or(raw.attempts, default::RETRY_ATTEMPTS, 0, "attempts")
                .min(100) as u32,
            backoff,
            backoff_max,
            budget_percent: match raw.budget_percent {
                Some(b) => self.int(&b, 0, 100, "budget_percent") as u32,
                None => default::BUDGET_PERCENT as u32,
            },
        }
    }

    // ---- values ----

    fn header_key(&mut self, raw: &Spanned<String>, allow_path: bool) -> Option<KeyChoice> {
        let text = raw.get_ref();
        if text == "client_ip" {
            return Some(KeyChoice::ClientIp);
        }
        if allow_path && text == "path" {
            return Some(KeyChoice::Path);
        }
        if let Some(name) = text.strip_prefix("header:") {
            if let Ok(h) = HeaderName::from_bytes(name.trim().as_bytes()) {
                return Some(KeyChoice::Header(h));
            }
        }
        let expected = if allow_path {
            "client_ip, path or header:NAME"
        } else {
            "client_ip or header:NAME"
        };
        self.error(
            &raw.span(),
            format!("invalid key {text:?}: expected {expected}"),
        );
        None
    }

    fn socket_addr(&mut self, raw: &Spanned<String>) -> Option<SocketAddr> {
        match raw.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(&raw.span(), format!("invalid listen address {:?}: expected IP:PORT, like \"127.0.0.1:8080\" or \"[::1]:8080\"", raw.get_ref()));
                None
            }
        }
    }

    fn cidr(&mut self, raw: &Spanned<String>) -> Option<IpNet> {
        let text = raw.get_ref().trim();
        if let Ok(net) = text.parse::<IpNet>() {
            return Some(net.trunc());
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Some(IpNet::from(ip));
        }
        self.error(&raw.span(), format!("invalid CIDR {text:?}: expected an address or a network, like \"10.0.0.0/8\" or \"::1\""));
        None
    }

    fn duration_or(
        &mut self,
        raw: Option<Spanned<String>>,
        default: Duration,
        zero_ok: bool,
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match parse_duration(raw.get_ref()) {
            Some(d) if d.is_zero() && !zero_ok => {
                self.error(
                    &raw.span(),
                    format!("duration {:?} must be greater than zero", raw.get_ref()),
                );
                default
            }
            Some(d) => d,
            None => {
                self.error(&raw.span(), format!("invalid duration {:?}: expected a number with a unit ms, s, m or h, like \"250ms\"", raw.get_ref()));
                default
            }
        }
    }

    fn int(&mut self, raw: &Spanned<i64>, min: i64, max: i64, what: &str) -> i64 {
        let v = *raw.get_ref();
        if v < min || v > max {
            let message = if min >= 1 && v < min {
                format!("{what} must be at least {min}, not {v}")
            } else {
                format!("{what} must be between {min} and {max}, not {v}")
            };
            self.error(&raw.span(), message);
            return min.max(v.min(max));
        }
        v
    }

    fn int_or(&mut self, raw: Option<Spanned<i64>>, default: i64, min: i64, what: &str) -> i64 {
        match raw {
            Some(r) => self.int(&r, min, i64::from(u32::MAX).max(min), what),
            None => default,
        }
    }
}

enum KeyChoice {
    ClientIp,
    Header(HeaderName),
    Path,
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// Parses "250ms", "2s", "1.5s", "1m", "1h" (also "0s").
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return None,
    };
    // A week is more than any timeout here needs; larger values are typos.
    if !(0.0..=604_800.0).contains(&secs) {
        return None;
    }
    Some(Duration::from_secs_f64(secs))
}

/// The shortest exact text for a duration: "250ms", "2s", "1m".
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn parse_status_range(text: &str) -> Option<std::ops::RangeInclusive<u16>> {
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (lo.trim().parse().ok()?, hi.trim().parse().ok()?),
        None => {
            let s: u16 = text.trim().parse().ok()?;
            (s, s)
        }
    };
    ((100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi).then_some(lo..=hi)
}

/// Lowercase host without port or trailing dot; None when it is not a DNS name or IP.
fn normalise_host(text: &str) -> Option<String> {
    let text = text.trim();
    let host = if text.starts_with('[') {
        let end = text.find(']')?;
        let inner = &text[1..end];
        inner.parse::<std::net::Ipv6Addr>().ok()?;
        return Some(format!("[{}]", inner.to_ascii_lowercase()));
    } else {
        match text.rsplit_once(':') {
            Some((h, port)) if port.parse::<u16>().is_ok() => h,
            Some(_) => return None,
            None => text,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    valid_dns_name(host).then(|| host.to_ascii_lowercase())
}

fn valid_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `host:port` with port 1-65535, host an IPv4 address, a bracketed IPv6 address or a DNS
/// name.
fn valid_backend_addr(addr: &str) -> bool {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return sa.port() != 0;
    }
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok_and(|p| p != 0)
                && !host.starts_with('[')
                && host.parse::<IpAddr>().is_err()
                && valid_dns_name(host)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse(text, Path::new("t.toml")) {
            Ok(_) => vec![],
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn one_error(text: &str) -> String {
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        e.into_iter().next().unwrap_or_default()
    }

    const UPSTREAM: &str = "[upstreams.app]\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n";

    fn ok(text: &str) -> Config {
        match parse(text, Path::new("t.toml")) {
            Ok(c) => c,
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn the_example_config_is_valid() {
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
    }

    #[test]
    fn defaults_apply() {
        let c = ok(&format!("[[routes]]\nupstream = \"app\"\n{UPSTREAM}"));
        assert_eq!(
            c.server.listen,
            vec!["127.0.0.1:8080".parse().unwrap_or(([0, 0, 0, 0], 0).into())]
        );
        assert_eq!(c.server.timeouts.header_read, Duration::from_secs(10));
        assert_eq!(c.server.timeouts.idle, Duration::from_secs(60));
        assert_eq!(c.server.limits.max_body_bytes, 10_485_760);
        assert_eq!(c.admin.listen.port(), 9901);
        let r = &c.routes[0];
        assert_eq!((r.name.as_str(), r.path_prefix.as_str()), ("route-1", "/"));
        let u = &c.upstreams[0];
        assert_eq!(u.balance, Balance::RoundRobin);
        assert_eq!(u.retry.attempts, 2);
        assert_eq!(u.timeouts.connect, Duration::from_secs(1));
        assert_eq!(u.backends[0].weight, 1);
        assert!(u.health.is_none());
    }

    #[test]
    fn three_mistakes_three_errors_in_file_order() {
        let e = errors(
            "[server.timeouts]\nidle = \"5 sec\"\n\n[[routes]]\nname = \"api\"\nupstream = \"missing\"\n\n[upstreams.app]\nbackends = [{ addr = \"127.0.0.1:9001\", weight = 0 }]\n",
        );
        assert_eq!(e.len(), 3, "{e:?}");
        assert_eq!(e[0], "t.toml:2:8: invalid duration \"5 sec\": expected a number with a unit ms, s, m or h, like \"250ms\"");
        assert_eq!(e[1], "t.toml:6:12: route \"api\" uses upstream \"missing\", which is not defined (defined: app)");
        assert!(
            e[2].starts_with("t.toml:9:49: weight must be at least 1, not 0"),
            "{}",
            e[2]
        );
    }

    #[test]
    fn unknown_keys_and_syntax_errors_have_positions() {
        let e = one_error("[server]\nlsten = [\"127.0.0.1:8080\"]\n");
        assert!(e.starts_with("t.toml:2:1: unknown field `lsten`"), "{e}");
        let e = one_error("[server\nlisten = 1\n");
        assert!(e.starts_with("t.toml:1:"), "{e}");
    }

    #[test]
    fn each_semantic_check_reports_its_problem() {
        let cases: &[(&str, &str)] = &[
            ("[[routes]]\nname = \"a\"\nupstream = \"app\"\n[[routes]]\nname = \"a\"\nupstream = \"app\"\n", "duplicate route name \"a\""),
            ("[upstreams.x]\nbackends = []\n", "upstream \"x\" has no backends"),
            ("[server.client_ip]\ntrusted_proxies = [\"10.0.0.0/33\"]\n", "invalid CIDR \"10.0.0.0/33\""),
            ("[server]\nlisten = [\"localhost:80\"]\n", "invalid listen address \"localhost:80\""),
            ("[server]\nlisten = []\n", "server.listen is empty"),
            ("[server]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n", "appears twice"),
            ("[upstreams.x]\nhash_key = \"path\"\nbackends = [{ addr = \"a:1\" }]\n", "hash_key is only used with balance = \"consistent_hash\""),
            ("[upstreams.x]\nbackends = [{ addr = \"nohostport\" }]\n", "invalid backend address \"nohostport\""),
            ("[upstreams.x]\nbackends = [{ addr = \"a:1\" }, { addr = \"a:1\" }]\n", "backend a:1 appears twice"),
            ("[upstreams.x]\nbalance = \"fastest\"\nbackends = [{ addr = \"a:1\" }]\n", "unknown balance \"fastest\""),
            ("[upstreams.x]\nbackends = [{ addr = \"a:1\" }]\n[upstreams.x.health]\nunhealthy_threshold = 0\n", "unhealthy_threshold must be at least 1, not 0"),
            ("[upstreams.x]\nbackends = [{ addr = \"a:1\" }]\n[upstreams.x.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n", "health timeout (2s) must be shorter than interval (1s)"),
            ("[upstreams.x]\nbackends = [{ addr = \"a:1\" }]\n[upstreams.x.health]\nexpect_status = \"399-200\"\n", "invalid expect_status \"399-200\""),
            ("[upstreams.x]\nbackends = [{ addr = \"a:1\" }]\n[upstreams.x.retry]\nbackoff = \"2s\"\nbackoff_max = \"1s\"\n", "backoff (2s) is larger than backoff_max (1s)"),
            ("[upstreams.x]\nbackends = [{ addr = \"a:1\" }]\n[upstreams.x.retry]\nbudget_percent = 101\n", "budget_percent must be between 0 and 100, not 101"),
            ("[upstreams.x]\nbackends = [{ addr = \"a:1\" }]\n[upstreams.x.timeouts]\nconnect = \"0s\"\n", "duration \"0s\" must be greater than zero"),
            ("[upstreams.x]\nca_file = \"ca.pem\"\nbackends = [{ addr = \"a:1\" }]\n", "ca_file and server_name need tls = true"),
            ("[[routes]]\nupstream = \"app\"\nhost = \"bad host\"\n", "invalid host \"bad host\""),
            ("[[routes]]\nupstream = \"app\"\npath_prefix = \"api\"\n", "path_prefix \"api\" must start with '/'"),
            ("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 0.0\nburst = 1\n", "requests_per_second must be a positive number"),
            ("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1.0\nburst = 0\n", "burst must be at least 1, not 0"),
            ("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1.0\nburst = 1\nkey = \"cookie\"\n", "invalid key \"cookie\": expected client_ip or header:NAME"),
            ("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1.0\nburst = 1\nstore = \"redis\"\n", "store = \"redis\" needs redis_url"),
            ("[admin]\ntoken = \"a\"\ntoken_env = \"B\"\n", "set admin.token or admin.token_env, not both"),
            ("[admin]\ntoken_env = \"PALISADE_TEST_SURELY_UNSET_VAR\"\n", "environment variable PALISADE_TEST_SURELY_UNSET_VAR is not set"),
        ];
        for (body, want) in cases {
            let text = format!("{body}\n{UPSTREAM}");
            let e = errors(&text);
            assert!(
                e.iter().any(|e| e.contains(want)),
                "want {want:?} for:\n{text}\ngot {e:?}"
            );
            assert!(
                e.iter().all(|e| e.starts_with("t.toml:")
                    && e.split(':')
                        .nth(1)
                        .is_some_and(|l| l.parse::<usize>().is_ok_and(|l| l > 0))),
                "{e:?}"
            );
        }
    }

    #[test]
    fn hosts_cidrs_and_keys_are_normalised() {
        let c = ok(&format!(
            "[[routes]]\nupstream = \"app\"\nhost = \"*.Example.com:8080\"\nallow = [\"127.0.0.1\", \"10.1.2.3/8\", \"::1\"]\n[routes.rate_limit]\nrequests_per_second = 5.0\nburst = 10\nkey = \"header:X-Api-Key\"\n{UPSTREAM}"
        ));
        let r = &c.routes[0];
        assert_eq!(r.host, Some(HostMatch::Suffix(".example.com".into())));
        let allow: Vec<String> = r.allow.iter().map(|n| n.to_string()).collect();
        assert_eq!(allow, ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]);
        let rl = r.rate_limit.as_ref().map(|r| r.key.clone());
        assert_eq!(
            rl,
            Some(LimitKey::Header(HeaderName::from_static("x-api-key")))
        );
    }

    #[test]
    fn upstreams_keep_file_order() {
        let c = ok("[upstreams.zeta]\nbackends = [{ addr = \"a:1\" }]\n[upstreams.alpha]\nbackends = [{ addr = \"b:1\" }]\n");
        let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha"]);
    }

    #[test]
    fn token_env_is_read_and_redacted_in_json() {
        std::env::set_var("PALISADE_TEST_TOKEN_VAR", "s3cret");
        let c = ok("[admin]\ntoken_env = \"PALISADE_TEST_TOKEN_VAR\"\n");
        assert_eq!(c.admin.token.as_deref(), Some("s3cret"));
        let json = serde_json::to_string(&c).unwrap_or_default();
        assert!(
            !json.contains("s3cret") && json.contains("<redacted>"),
            "{json}"
        );
    }

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        for bad in ["", "5", "5 s", "s", "-1s", "1.s", "1d", "9999999h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
        assert_eq!(line_col("éx", 2), (1, 2));
    }

    #[test]
    fn backend_addresses() {
        for good in [
            "127.0.0.1:80",
            "[::1]:8080",
            "app.internal:80",
            "localhost:1",
        ] {
            assert!(valid_backend_addr(good), "{good}");
        }
        for bad in [
            "127.0.0.1",
            "app:0",
            "app:99999",
            ":80",
            "a b:80",
            "[::1]",
            "1.2.3.4.5:80x",
        ] {
            assert!(!valid_backend_addr(bad), "{bad}");
        }
    }
}
