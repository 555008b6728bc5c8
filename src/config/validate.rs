//! From the raw file to a checked [`Config`], collecting every problem in one pass.
//!
//! Syntax errors come from the TOML parser and stop there (one error); each unknown key
//! is reported and taken out, each value of the wrong type is reported and replaced by
//! a placeholder of the right type (an empty string, false, 0, an empty list; later
//! errors at its position are the same mistake and not repeated), or taken out where
//! a table was expected, and the rest is read again (a required table taken out ends the
//! list); everything else is checked here and reported all together, sorted by position,
//! each at the span of the offending value. A value that fails a check is replaced by its
//! default so the rest of the file is still checked, and a cross-check (health timeout
//! against interval, backoff against backoff_max, hash_key against balance) only runs
//! when the values it compares are themselves valid, so one mistake gives one error.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::Path;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::raw::*;
use super::*;

/// Unknown keys and values of the wrong type listed at most: each one found costs a
/// reading of the whole document.
const MAX_SCHEMA_ERRORS: usize = 50;

/// Parses and validates `text`; errors are sorted by line and column.
pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
    let mut v = Validator {
        text,
        lines: Lines::new(text),
        path,
        errors: Vec::new(),
        replaced: Vec::new(),
        ignored: Vec::new(),
    };
    let mut table = match toml::de::DeTable::parse(text) {
        Ok(table) => table,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim_end();
            let message = match message {
                // The parser does not say which key.
                "duplicate key" => duplicate_key(text, span.start),
                _ => message.to_owned(),
            };
            v.error(&span, message);
            return Err(v.errors);
        }
    };
    // Every unknown key and every value of the wrong type is an error of its own: each one
    // serde stops at is reported and taken out of the document (a value of the wrong type
    // replaced by a placeholder of the right one where it can be), which is read again,
    // so that `check` lists them all, and then every problem with the rest. A required
    // table taken out that way ends the list (its "missing field" would be the same
    // mistake twice), as does anything else serde reports.
    let mut taken: Vec<String> = Vec::new();
    let raw = loop {
        match RawConfig::deserialize(toml::de::Deserializer::from(table.clone())) {
            Ok(raw) => break raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let message = e.message().trim_end();
                let again = taken
                    .iter()
                    .any(|name| message.starts_with(&format!("missing field `{name}`")));
                let expected = Expected::of(message);
                if !again {
                    v.error(&span, expected.plain_words(message));
                }
                if v.errors.len() >= MAX_SCHEMA_ERRORS {
                    // Each one costs a reading of the whole document: a file that is
                    // mostly wrong (another program's config, a merge gone bad) would
                    // take minutes to list in full.
                    v.errors.sort_by_key(|e| (e.line, e.col));
                    v.errors.push(ConfigError::at(
                        v.path,
                        Pos::default(),
                        format!(
                            "stopped after {MAX_SCHEMA_ERRORS} errors: fix these, then check again"
                        ),
                    ));
                    return Err(v.errors);
                }
                // Each value is replaced once at most: the loop ends.
                let fresh = !v.replaced.contains(&span.start);
                if fresh && message.starts_with("invalid type") && e.span().is_some() {
                    if let Some(with) = expected.placeholder() {
                        if replace_at(table.get_mut(), span.start, &with) {
                            v.replaced.push(span.start);
                            continue;
                        }
                    }
                }
                let removable = message.starts_with("unknown field")
                    || message.starts_with("invalid type")
                    || message.starts_with("invalid value");
                let removed = if removable && !again && e.span().is_some() {
                    remove_at(table.get_mut(), span.start)
                } else {
                    None
                };
                match removed {
                    Some(name) => taken.push(name),
                    None => {
                        v.errors.sort_by_key(|e| (e.line, e.col));
                        return Err(v.errors);
                    }
                }
            }
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

/// The TOML parser's "duplicate key" error with the key it is at (byte `at`) and, in a
/// table header, what the header clashes with.
fn duplicate_key(text: &str, at: usize) -> String {
    let Some((key, key_end)) = key_at(text, at) else {
        return "duplicate key".to_owned();
    };
    let line_start = text
        .get(..at)
        .and_then(|t| t.rfind('\n'))
        .map_or(0, |i| i + 1);
    let line = text
        .get(line_start..)
        .and_then(|t| t.lines().next())
        .unwrap_or("");
    let opening = line.trim_start();
    let header_start = line_start + (line.len() - opening.len());
    // The header as written between its brackets: the clashing key is its last part.
    let header = |open: usize| {
        let close = text.get(key_end..)?.find(']')? + key_end;
        text.get(header_start + open..close).map(str::trim)
    };
    if opening.starts_with("[[") {
        if let Some(h) = header(2) {
            return format!("duplicate key `{key}`: {h} is already a table, so [[{h}]] cannot add an entry to it");
        }
    } else if opening.starts_with('[') {
        if let Some(h) = header(1) {
            let array = format!("[[{h}]]");
            let before = text.get(..line_start).unwrap_or("");
            return if before.lines().any(|l| l.trim_start().starts_with(&array)) {
                format!("duplicate key `{key}`: [{h}] after {array}: write {array} for every entry")
            } else {
                format!("duplicate key `{key}`: table [{h}] is defined twice")
            };
        }
    }
    format!("duplicate key `{key}`")
}

/// The TOML key written at byte `at` (bare or quoted), unquoted, and where it ends.
fn key_at(text: &str, at: usize) -> Option<(String, usize)> {
    let rest = text.get(at..)?;
    let bytes = rest.as_bytes();
    match bytes.first()? {
        &quote @ (b'"' | b'\'') => {
            let mut i = 1;
            while i < bytes.len() && bytes[i] != quote && bytes[i] != b'\n' {
                i += if quote == b'"' && bytes[i] == b'\\' {
                    2
                } else {
                    1
                };
            }
            let written = rest.get(..=i)?;
            let value = toml::de::DeValue::parse(written).ok()?;
            let key = value.get_ref().as_str()?.to_owned();
            Some((key, at + written.len()))
        }
        _ => {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .unwrap_or(rest.len());
            (len > 0).then(|| (rest[..len].to_owned(), at + len))
        }
    }
}

/// Takes out of `table` (at any depth) the entry that byte `at` belongs to: the key
/// written there, the value written there, or the array (of values) with an item there;
/// returns that entry's key, None when there is none.
fn remove_at(table: &mut toml::de::DeTable<'_>, at: usize) -> Option<String> {
    // A key inside a nested table, or inside a table in an array, first.
    for (_, value) in table.iter_mut() {
        let inner = match value.get_mut() {
            toml::de::DeValue::Table(inner) => remove_at(inner, at),
            toml::de::DeValue::Array(items) => {
                items.iter_mut().find_map(|item| match item.get_mut() {
                    toml::de::DeValue::Table(inner) => remove_at(inner, at),
                    _ => None,
                })
            }
            _ => None,
        };
        if inner.is_some() {
            return inner;
        }
    }
    let found = table
        .iter()
        .find(|(key, value)| {
            key.span().start == at
                || (!matches!(value.get_ref(), toml::de::DeValue::Table(_))
                    && value.span().contains(&at))
        })
        .map(|(key, _)| key.clone());
    let key = found?;
    table.remove(&key);
    Some(key.into_inner().into_owned())
}

/// What serde's `..., expected X` error asks for, as the raw config's types spell it.
#[derive(Clone, Copy)]
enum Expected {
    Text,
    Boolean,
    Integer,
    Number,
    List,
    Table,
    /// Anything else, or no type at all.
    Other,
}

impl Expected {
    fn of(message: &str) -> Self {
        match message.rsplit_once(", expected ").map(|(_, e)| e) {
            Some("a string") => Expected::Text,
            Some("a boolean") => Expected::Boolean,
            Some("i64" | "u64" | "u32") => Expected::Integer,
            Some("a number") => Expected::Number,
            Some("a sequence") => Expected::List,
            Some(e) if e.starts_with("struct Raw") || e == "a map" => Expected::Table,
            _ => Expected::Other,
        }
    }

    /// serde's message with Rust's type names in words: "expected i64" is "expected an
    /// integer", "expected struct RawBackend" is "expected a table".
    fn plain_words(self, message: &str) -> String {
        let words = match self {
            Expected::Integer => "an integer",
            Expected::Table => "a table",
            _ => return message.to_owned(),
        };
        match message.rsplit_once(", expected ") {
            Some((found, _)) => format!("{found}, expected {words}"),
            None => message.to_owned(),
        }
    }

    /// A value of this type to stand in for one of the wrong type; None for a table (its
    /// required keys would be missing) and for what the raw config does not use.
    fn placeholder(self) -> Option<toml::de::DeValue<'static>> {
        let text = match self {
            Expected::Text => "\"\"",
            Expected::Boolean => "false",
            Expected::Integer | Expected::Number => "0",
            Expected::List => "[]",
            Expected::Table | Expected::Other => return None,
        };
        toml::de::DeValue::parse(text).ok().map(|v| v.into_inner())
    }
}

/// Replaces the value written at byte `at` in `table` (at any depth, in arrays too) by
/// `with`, keeping its span; false when no value starts there.
fn replace_at(
    table: &mut toml::de::DeTable<'_>,
    at: usize,
    with: &toml::de::DeValue<'static>,
) -> bool {
    table
        .iter_mut()
        .any(|(_, value)| replace_in(value, at, with))
}

fn replace_in(
    value: &mut Spanned<toml::de::DeValue<'_>>,
    at: usize,
    with: &toml::de::DeValue<'static>,
) -> bool {
    // A table's span need not cover its keys (those under a later `[a.b]` header), so
    // every table and array is searched.
    let span = value.span();
    let inside = match value.get_mut() {
        toml::de::DeValue::Table(inner) => replace_at(inner, at, with),
        toml::de::DeValue::Array(items) => items.iter_mut().any(|item| replace_in(item, at, with)),
        _ => false,
    };
    if !inside && span.start == at {
        *value = Spanned::new(span, with.clone());
        return true;
    }
    inside
}

/// Defaults, as documented in config/palisade.toml.
mod default {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub const LISTEN: SocketAddr = SocketAddr::new(super::LOCALHOST, 8080);
    pub const ADMIN_LISTEN: SocketAddr = SocketAddr::new(super::LOCALHOST, 9901);
    pub const HEADER_READ: Duration = Duration::from_secs(10);
    pub const IDLE: Duration = Duration::from_secs(60);
    pub const SHUTDOWN: Duration = Duration::from_secs(30);
    pub const MAX_CONNECTIONS: i64 = 10_000;
    pub const MAX_HEADER_BYTES: i64 = 65_536;
    pub const MAX_BODY_BYTES: i64 = 10_485_760;
    pub const PATH_PREFIX: &str = "/";
    pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);
    pub const HEALTH_PATH: &str = "/health";
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
    pub const HEALTHY_THRESHOLD: i64 = 2;
    pub const UNHEALTHY_THRESHOLD: i64 = 2;
    pub const EXPECT_STATUS: std::ops::RangeInclusive<u16> = 200..=399;
    pub const CONSECUTIVE_FAILURES: i64 = 5;
    pub const EJECTION: Duration = Duration::from_secs(10);
    pub const RETRY_ATTEMPTS: i64 = 2;
    pub const BACKOFF: Duration = Duration::from_millis(25);
    pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
    pub const BUDGET_PERCENT: i64 = 20;
    pub const CONNECT: Duration = Duration::from_secs(1);
    pub const RESPONSE: Duration = Duration::from_secs(30);
    /// A backend's longest silence mid-body: nginx's `proxy_read_timeout`.
    pub const READ: Duration = Duration::from_secs(60);
    /// The pool's own default, so that the two cannot drift apart.
    pub const UPSTREAM_IDLE: Duration = crate::upstream::pool::IDLE_TIMEOUT;
    pub const QUEUE_IN_FLIGHT: i64 = 100;
    pub const QUEUE_SIZE: i64 = 1000;
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
}

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Longer durations are typos ("10h" for "10s"); a week is more than any timeout needs.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most retries one request may make; more only multiplies load on a failing pool.
const MAX_ATTEMPTS: i64 = 100;

/// Whether a zero duration is meaningful for a key.
#[derive(Clone, Copy, PartialEq)]
enum Zero {
    /// `shutdown = "0s"` (exit at once), `backoff = "0s"` (retry at once), an
    /// upstream's `idle = "0s"` (no idle backend connection kept) and `read = "0s"` (no
    /// limit on a backend's silence mid-body).
    Allowed,
    /// Every other duration: zero would disable the feature or fail every request.
    Rejected,
}

struct Validator<'a> {
    text: &'a str,
    /// Where `text`'s lines start.
    lines: Lines,
    path: &'a Path,
    errors: Vec<ConfigError>,
    /// Where values of the wrong type were replaced by placeholders (already reported:
    /// errors about the placeholder are not).
    replaced: Vec<usize>,
    /// Keys that are valid but have no effect where they are (warnings), by position.
    ignored: Vec<((usize, usize), String)>,
}

impl Validator<'_> {
    /// Where `span` starts.
    fn pos(&self, span: &Range<usize>) -> Pos {
        let (line, col) = self.lines.line_col(self.text, span.start);
        Pos { line, col }
    }

    fn error(&mut self, span: &Range<usize>, message: String) {
        if self.replaced.contains(&span.start) {
            return;
        }
        let at = self.pos(span);
        self.errors.push(ConfigError::at(self.path, at, message));
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let (server, listen_spans) = self.server(raw.server);
        let admin = self.admin(raw.admin, &server, &listen_spans);
        let mut upstreams: Vec<(usize, Upstream)> = raw
            .upstreams
            .into_iter()
            .map(|(name, u)| (name.span().start, self.upstream(name, u.into_inner())))
            .collect();
        upstreams.sort_by_key(|(start, _)| *start);
        let upstreams: Vec<Upstream> = upstreams.into_iter().map(|(_, u)| u).collect();
        let mut names = HashSet::new();
        let defined: HashSet<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
        let routes = raw
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| self.route(i, r, &upstreams, &defined, &mut names))
            .collect();
        Config {
            path: self.path.to_path_buf(),
            server,
            admin,
            routes,
            upstreams,
            ignored: {
                self.ignored.sort();
                self.ignored.drain(..).map(|(_, warning)| warning).collect()
            },
        }
    }

    /// A file the config names: a relative path is relative to the config file's
    /// directory, or, when nothing is there but the path names a file from the working
    /// directory, that file (SPEC's example, meant to be run from the repository, names
    /// `config/certs/localhost.pem`). Errors about a file found in neither place name
    /// the first.
    /// The working directory's file is a warning (it may not be the file meant); a
    /// `ca_file` is never taken from there (trusting a stray CA would fail open).
    fn file_path(&mut self, span: &Range<usize>, written: &str, fallback: bool) -> PathBuf {
        let beside = self.path.parent().unwrap_or(Path::new(".")).join(written);
        let here = Path::new(written);
        if fallback && here.is_relative() && !beside.exists() && here.is_file() {
            if let Ok(cwd) = std::env::current_dir() {
                let used = cwd.join(here);
                self.ignored(
                    span,
                    &format!(
                        "{} is not there; using {} from the working directory",
                        beside.display(),
                        used.display()
                    ),
                );
                return used;
            }
        }
        beside
    }

    /// A key at `span` that is valid but has no effect there: a warning, not an error
    /// (SPEC's own example sets such keys, with comments saying where they apply).
    fn ignored(&mut self, span: &Range<usize>, message: &str) {
        let at = self.pos(span);
        let warning = format!("{}:{}:{}: {message}", self.path.display(), at.line, at.col);
        self.ignored.push(((at.line, at.col), warning));
    }

    // ---- [server] ----

    /// The server section, and where each listen address (plain or TLS) is first written.
    fn server(&mut self, raw: RawServer) -> (Server, Vec<(SocketAddr, Range<usize>)>) {
        let mut listen_spans = Vec::new();
        let listen = match raw.listen {
            None => vec![default::LISTEN],
            Some(list) => {
                let span = list.span();
                let list = list.into_inner();
                if list.is_empty() {
                    self.error(
                        &span,
                        "server.listen is empty: expected at least one address, like \"127.0.0.1:8080\"".into(),
                    );
                }
                let mut out = Vec::new();
                for raw_addr in &list {
                    let Some(addr) = self.socket_addr(raw_addr) else {
                        continue;
                    };
                    // Port 0 (any free port, as tests use) never clashes.
                    if addr.port() != 0 && out.contains(&addr) {
                        self.error(
                            &raw_addr.span(),
                            format!("listen address {addr} appears twice"),
                        );
                    } else {
                        out.push(addr);
                        listen_spans.push((addr, raw_addr.span()));
                    }
                }
                out
            }
        };
        let tls = self.tls_listeners(raw.tls, &listen, &mut listen_spans);
        let t = raw.timeouts;
        let timeouts = ServerTimeouts {
            header_read: self.duration_or(t.header_read, default::HEADER_READ, Zero::Rejected),
            idle: self.duration_or(t.idle, default::IDLE, Zero::Rejected),
            shutdown: self.duration_or(t.shutdown, default::SHUTDOWN, Zero::Allowed),
        };
        let l = raw.limits;
        let limits = Limits {
            max_connections: self.int_or(
                l.max_connections,
                default::MAX_CONNECTIONS,
                1..=i64::from(u32::MAX),
                "max_connections",
            ) as usize,
            // hyper reads at least 8 KiB of a head anyway; below 1 KiB no browser gets in.
            max_header_bytes: self.int_or(
                l.max_header_bytes,
                default::MAX_HEADER_BYTES,
                1024..=i64::from(u32::MAX),
                "max_header_bytes",
            ) as usize,
            max_body_bytes: self.int_or(
                l.max_body_bytes,
                default::MAX_BODY_BYTES,
                0..=i64::MAX,
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
        let server = Server {
            listen,
            tls,
            timeouts,
            limits,
            client_ip,
            access_log: raw.access_log.unwrap_or(true),
        };
        (server, listen_spans)
    }

    /// `[[server.tls]]`: entries may share a listen address, then they pick by SNI, so
    /// on one address a name may appear once and at most one entry may omit `sni` (the
    /// certificate for clients that send no or an unknown name).
    /// Adds where each TLS listen address is first written to `listen_spans`.
    fn tls_listeners(
        &mut self,
        raw: Vec<Spanned<RawTls>>,
        plain: &[SocketAddr],
        listen_spans: &mut Vec<(SocketAddr, Range<usize>)>,
    ) -> Vec<TlsListener> {
        let mut names_by_listen: HashMap<SocketAddr, HashSet<String>> = HashMap::new();
        let mut default_by_listen: HashSet<SocketAddr> = HashSet::new();
        let mut out = Vec::new();
        for entry in raw {
            let span = entry.span();
            let raw = entry.into_inner();
            let listen = self.socket_addr(&raw.listen);
            if let Some(addr) = listen {
                if addr.port() != 0 && plain.contains(&addr) {
                    self.error(
                        &raw.listen.span(),
                        format!("listen address {addr} is already a plain HTTP listener in server.listen"),
                    );
                } else if !listen_spans.iter().any(|(a, _)| *a == addr) {
                    listen_spans.push((addr, raw.listen.span()));
                }
            }
            for file in [&raw.cert, &raw.key] {
                if file.get_ref().is_empty() {
                    self.error(&file.span(), "empty file path: expected a PEM file".into());
                }
            }
            let mut sni = Vec::new();
            for name in &raw.sni {
                let Some(n) = normalise_server_name(name.get_ref()) else {
                    self.error(
                        &name.span(),
                        format!("invalid server name {:?}: expected a name like \"example.com\" or \"*.example.com\"", name.get_ref()),
                    );
                    continue;
                };
                let taken = listen.is_some_and(|addr| {
                    !names_by_listen.entry(addr).or_default().insert(n.clone())
                });
                if taken {
                    self.error(
                        &name.span(),
                        format!(
                            "server name {n:?} already has a certificate on {}",
                            raw.listen.get_ref()
                        ),
                    );
                }
                sni.push(n);
            }
            let second_default =
                listen.is_some_and(|addr| raw.sni.is_empty() && !default_by_listen.insert(addr));
            if second_default {
                self.error(
                    &span,
                    format!("a second [[server.tls]] entry on {} without sni: at most one per address may be the default certificate", raw.listen.get_ref()),
                );
            }
            out.push(TlsListener {
                listen: listen.unwrap_or(default::LISTEN),
                cert: self.file_path(&raw.cert.span(), raw.cert.get_ref(), true),
                key: self.file_path(&raw.key.span(), raw.key.get_ref(), true),
                cert_at: self.pos(&raw.cert.span()),
                key_at: self.pos(&raw.key.span()),
                sni,
            });
        }
        out
    }

    // ---- [admin] ----

    /// `listen_spans`: where each proxy listen address is written, to report a clash.
    fn admin(
        &mut self,
        raw: RawAdmin,
        server: &Server,
        listen_spans: &[(SocketAddr, Range<usize>)],
    ) -> Admin {
        let listen = match &raw.listen {
            Some(addr) => self.socket_addr(addr),
            None => Some(default::ADMIN_LISTEN),
        };
        // The admin API must not answer on a proxy address: the same address, or the same
        // port where either side is a wildcard covering the other (both bind with
        // SO_REUSEPORT, so the kernel would not refuse it).
        let taken = listen.and_then(|addr| {
            let plain = server.listen.iter().map(|&a| (a, "server.listen"));
            let tls = server.tls.iter().map(|t| (t.listen, "server.tls"));
            let all: Vec<(SocketAddr, &str)> = plain
                .chain(tls)
                .filter(|&(a, _)| overlap(addr, a))
                .collect();
            // The exact address first: its message is the plainer one.
            all.iter()
                .find(|(a, _)| *a == addr)
                .or(all.first())
                .map(|&(proxy, setting)| (addr, proxy, setting))
        });
        if let Some((addr, proxy, setting)) = taken {
            let same = addr == proxy;
            match &raw.listen {
                Some(admin) if same => self.error(
                    &admin.span(),
                    format!("admin.listen {addr} is also a proxy listen address"),
                ),
                Some(admin) => self.error(
                    &admin.span(),
                    format!("admin.listen {addr} overlaps the proxy listen address {proxy} ({setting}): same port, and a wildcard address covers the other, so the admin API would answer on the proxy's port; use another port"),
                ),
                // Both defaults differ, so the proxy address was written somewhere.
                None => {
                    if let Some((_, span)) = listen_spans.iter().find(|(a, _)| *a == proxy) {
                        let message = if same {
                            format!("listen address {addr} is the admin API's default: choose another or set admin.listen")
                        } else {
                            format!("listen address {proxy} covers the admin API's default {addr}: choose another port or set admin.listen")
                        };
                        self.error(span, message);
                    }
                }
            }
        }
        // `token = ""` is the documented "no token", so it does not conflict with token_env.
        let token = raw.token.as_ref().filter(|t| !t.get_ref().is_empty());
        let token = match (token, &raw.token_env) {
            (Some(t), Some(_)) => {
                self.error(
                    &t.span(),
                    "set admin.token or admin.token_env, not both".into(),
                );
                None
            }
            (Some(t), None) => match token_problem(t.get_ref()) {
                Some(problem) => {
                    self.error(&t.span(), format!("admin.token {problem}"));
                    None
                }
                None => Some(t.get_ref().clone()),
            },
            (None, Some(var)) => self.token_from_env(var),
            (None, None) => None,
        };
        Admin {
            listen: listen.unwrap_or(default::ADMIN_LISTEN),
            token,
        }
    }

    /// The admin token from the environment variable `admin.token_env` names.
    fn token_from_env(&mut self, var: &Spanned<String>) -> Option<String> {
        let name = var.get_ref();
        // std::env::var may panic on such names, and none can be set.
        let problem = if name.is_empty() {
            Some("admin.token_env is empty: expected an environment variable name".to_owned())
        } else if name.contains(['=', '\0']) {
            Some(format!(
                "admin.token_env {name:?} is not an environment variable name (no '=' or NUL)"
            ))
        } else {
            match std::env::var(name) {
                Ok(t) if t.is_empty() => Some(format!(
                    "environment variable {name} (admin.token_env) is empty"
                )),
                Ok(t) => match token_problem(&t) {
                    // The value is a secret: it is not echoed.
                    Some(problem) => Some(format!("admin.token_env: ${name} {problem}")),
                    None => return Some(t),
                },
                Err(std::env::VarError::NotUnicode(_)) => Some(format!(
                    "admin.token_env: ${name} holds a character other than printable ASCII: no Authorization header can carry it, so every request would get 401"
                )),
                Err(std::env::VarError::NotPresent) => Some(format!(
                    "environment variable {name} (admin.token_env) is not set"
                )),
            }
        };
        if let Some(message) = problem {
            self.error(&var.span(), message);
        }
        None
    }

    // ---- [[routes]] ----

    fn route(
        &mut self,
        index: usize,
        raw: Spanned<RawRoute>,
        upstreams: &[Upstream],
        defined: &HashSet<&str>,
        names: &mut HashSet<String>,
    ) -> Route {
        let span = raw.span();
        let raw = raw.into_inner();
        let name = match &raw.name {
            Some(n) => {
                self.name(n, "route");
                n.get_ref().clone()
            }
            None => format!("route-{}", index + 1),
        };
        if !names.insert(name.clone()) {
            let at = raw.name.as_ref().map_or(span, |n| n.span());
            self.error(&at, format!("duplicate route name \"{name}\""));
        }
        let host = raw.host.as_ref().and_then(|h| self.host_match(h));
        let path_prefix = match &raw.path_prefix {
            Some(p) if !p.get_ref().starts_with('/') => {
                self.error(
                    &p.span(),
                    format!("path_prefix {:?} must start with '/'", p.get_ref()),
                );
                default::PATH_PREFIX.to_owned()
            }
            Some(p) => p.get_ref().clone(),
            None => default::PATH_PREFIX.to_owned(),
        };
        let upstream = raw.upstream.get_ref().clone();
        if !defined.contains(upstream.as_str()) {
            let defined: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
            let defined = if defined.is_empty() {
                "none is defined".to_owned()
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
        let rate_limit = raw.rate_limit.map(|r| self.rate_limit(r.into_inner()));
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

    fn rate_limit(&mut self, raw: RawRateLimit) -> RateLimit {
        let rps = raw.requests_per_second.get_ref().0;
        if !(rps.is_finite() && rps > 0.0) {
            self.error(
                &raw.requests_per_second.span(),
                format!("requests_per_second must be a number greater than 0, not {rps}"),
            );
        }
        let burst = self.int(&raw.burst, 1..=i64::from(u32::MAX), "burst") as u32;
        let key = match &raw.key {
            None => LimitKey::ClientIp,
            Some(k) => match self.request_key(k, false) {
                Some(RequestKey::Header(h)) => LimitKey::Header(h),
                _ => LimitKey::ClientIp,
            },
        };
        let store = match raw.store.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("local", _)) => {
                if let Some(url) = &raw.redis_url {
                    self.ignored(
                        &url.span(),
                        "redis_url is ignored: the limit's store is \"local\" (redis_url is for store = \"redis\")",
                    );
                }
                LimitStore::Local
            }
            Some(("redis", store_span)) => match &raw.redis_url {
                Some(url) if valid_redis_url(url.get_ref()) => LimitStore::Redis {
                    url: url.get_ref().clone(),
                },
                // The URL is not echoed: it may hold a password.
                Some(url) => {
                    self.error(
                        &url.span(),
                        "invalid redis_url: expected redis://[user:password@]host:port[/db] or rediss://...".into(),
                    );
                    LimitStore::Local
                }
                None => {
                    self.error(
                        &store_span,
                        "store = \"redis\" needs redis_url, like \"redis://127.0.0.1:6379\"".into(),
                    );
                    LimitStore::Local
                }
            },
            Some((other, store_span)) => {
                let message = format!("invalid store {other:?}: expected \"local\" or \"redis\"");
                self.error(&store_span, message);
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

    fn upstream(&mut self, name: Spanned<String>, raw: RawUpstream) -> Upstream {
        self.name(&name, "upstream");
        let name = name.into_inner();
        let balance = match &raw.balance {
            None => Some(Balance::RoundRobin),
            Some(b) => match b.get_ref().as_str() {
                "round_robin" => Some(Balance::RoundRobin),
                "weighted" => Some(Balance::Weighted),
                "least_conn" => Some(Balance::LeastConn),
                "p2c_ewma" => Some(Balance::P2cEwma),
                "random" => Some(Balance::Random),
                "consistent_hash" => Some(Balance::ConsistentHash),
                other => {
                    self.error(&b.span(), format!("unknown balance {other:?}: expected round_robin, weighted, least_conn, p2c_ewma, random or consistent_hash"));
                    None
                }
            },
        };
        let hash_key = match &raw.hash_key {
            None => HashKey::ClientIp,
            Some(k) => {
                if balance.is_some_and(|b| b != Balance::ConsistentHash) {
                    self.ignored(
                        &k.span(),
                        "hash_key is ignored: it is for balance = \"consistent_hash\"",
                    );
                }
                match self.request_key(k, true) {
                    Some(RequestKey::Header(h)) => HashKey::Header(h),
                    Some(RequestKey::Path) => HashKey::Path,
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
        let backends = self.backends(&name, raw.backends);
        let resolve_every =
            self.duration_or(raw.resolve_every, default::RESOLVE_EVERY, Zero::Rejected);
        let health = raw.health.map(|h| self.health(h.into_inner()));
        let passive = raw.passive.map(|p| {
            let p = p.into_inner();
            Passive {
                consecutive_failures: self.int_or(
                    p.consecutive_failures,
                    default::CONSECUTIVE_FAILURES,
                    1..=i64::from(u32::MAX),
                    "consecutive_failures",
                ) as u32,
                ejection: self.duration_or(p.ejection, default::EJECTION, Zero::Rejected),
            }
        });
        let retry = self.retry(raw.retry.unwrap_or_default());
        let t = raw.timeouts.unwrap_or_default();
        let timeouts = UpstreamTimeouts {
            connect: self.duration_or(t.connect, default::CONNECT, Zero::Rejected),
            response: self.duration_or(t.response, default::RESPONSE, Zero::Rejected),
            idle: self.duration_or(t.idle, default::UPSTREAM_IDLE, Zero::Allowed),
            read: self.duration_or(t.read, default::READ, Zero::Allowed),
        };
        let queue = raw.queue.map(|q| Queue {
            max_in_flight_per_backend: self.int_or(
                q.max_in_flight_per_backend,
                default::QUEUE_IN_FLIGHT,
                1..=i64::from(u32::MAX),
                "max_in_flight_per_backend",
            ) as u32,
            // size = 0: no waiting room, only the in-flight cap.
            size: self.int_or(q.size, default::QUEUE_SIZE, 0..=i64::from(u32::MAX), "size") as u32,
            timeout: self.duration_or(q.timeout, default::QUEUE_TIMEOUT, Zero::Rejected),
        });
        let tls = self.upstream_tls(&raw.tls, &raw.ca_file, &raw.server_name);
        Upstream {
            name,
            balance: balance.unwrap_or(Balance::RoundRobin),
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

    fn backends(
        &mut self,
        upstream: &str,
        raw: Spanned<Vec<Spanned<RawBackend>>>,
    ) -> Vec<BackendAddr> {
        let list_span = raw.span();
        let list = raw.into_inner();
        if list.is_empty() {
            self.error(
                &list_span,
                format!("upstream \"{upstream}\" has no backends: expected at least one {{ addr = \"host:port\" }}"),
            );
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for b in list {
            let b = b.into_inner();
            let addr = b.addr.get_ref().clone();
            if !valid_backend_addr(&addr) {
                self.error(&b.addr.span(), format!("invalid backend address {addr:?}: expected host:port with a port 1-65535, like \"127.0.0.1:9001\" or \"app.internal:80\""));
            } else if !seen.insert(addr.to_ascii_lowercase()) {
                self.error(
                    &b.addr.span(),
                    format!("backend {addr} appears twice in upstream \"{upstream}\""),
                );
            }
            let weight = match &b.weight {
                None => 1,
                Some(w) => self.int(w, 1..=1_000_000, "weight") as u32,
            };
            out.push(BackendAddr { addr, weight });
        }
        out
    }

    fn upstream_tls(
        &mut self,
        tls: &Option<Spanned<bool>>,
        ca_file: &Option<Spanned<String>>,
        server_name: &Option<Spanned<String>>,
    ) -> Option<UpstreamTls> {
        if !tls.as_ref().is_some_and(|t| *t.get_ref()) {
            for key in [ca_file, server_name].into_iter().flatten() {
                self.error(
                    &key.span(),
                    "ca_file and server_name need tls = true".into(),
                );
            }
            return None;
        }
        if let Some(f) = ca_file.as_ref().filter(|f| f.get_ref().is_empty()) {
            self.error(&f.span(), "empty file path: expected a PEM file".into());
        }
        if let Some(n) = server_name {
            if n.get_ref().parse::<IpAddr>().is_err() && !valid_dns_name(n.get_ref()) {
                self.error(
                    &n.span(),
                    format!(
                        "invalid server_name {:?}: expected a DNS name or an IP address",
                        n.get_ref()
                    ),
                );
            }
        }
        Some(UpstreamTls {
            ca_file: ca_file
                .as_ref()
                .map(|f| self.file_path(&f.span(), f.get_ref(), false)),
            ca_file_at: ca_file
                .as_ref()
                .map(|f| self.pos(&f.span()))
                .unwrap_or_default(),
            server_name: server_name
                .as_ref()
                .map(|s| s.get_ref().to_ascii_lowercase()),
        })
    }

    fn health(&mut self, raw: RawHealth) -> Health {
        let path = match &raw.path {
            Some(p) if !p.get_ref().starts_with('/') => {
                self.error(
                    &p.span(),
                    format!("health path {:?} must start with '/'", p.get_ref()),
                );
                default::HEALTH_PATH.to_owned()
            }
            Some(p) if http::uri::PathAndQuery::try_from(p.get_ref().as_str()).is_err() => {
                self.error(
                    &p.span(),
                    format!(
                        "health path {:?} is not a valid request target: no spaces or control \
                         characters (percent-encode them)",
                        p.get_ref()
                    ),
                );
                default::HEALTH_PATH.to_owned()
            }
            Some(p) => p.get_ref().clone(),
            None => default::HEALTH_PATH.to_owned(),
        };
        let interval = self.duration(
            raw.interval.as_ref(),
            default::HEALTH_INTERVAL,
            Zero::Rejected,
        );
        let timeout = self.duration(
            raw.timeout.as_ref(),
            default::HEALTH_TIMEOUT,
            Zero::Rejected,
        );
        if let (Some(interval), Some(timeout)) = (interval, timeout) {
            if timeout >= interval {
                // At the key that was written (one of them was: the defaults agree).
                if let Some(span) = raw
                    .timeout
                    .as_ref()
                    .or(raw.interval.as_ref())
                    .map(|s| s.span())
                {
                    self.error(
                        &span,
                        format!(
                            "health timeout ({}) must be shorter than interval ({})",
                            format_duration(timeout),
                            format_duration(interval)
                        ),
                    );
                }
            }
        }
        let expect_status = match &raw.expect_status {
            None => default::EXPECT_STATUS,
            Some(s) => match parse_status_range(s.get_ref()) {
                Some(r) => r,
                None => {
                    self.error(&s.span(), format!("invalid expect_status {:?}: expected a status like \"200\" or a range like \"200-399\" within 100-599", s.get_ref()));
                    default::EXPECT_STATUS
                }
            },
        };
        Health {
            path,
            interval: interval.unwrap_or(default::HEALTH_INTERVAL),
            timeout: timeout.unwrap_or(default::HEALTH_TIMEOUT),
            healthy_threshold: self.int_or(
                raw.healthy_threshold,
                default::HEALTHY_THRESHOLD,
                1..=i64::from(u32::MAX),
                "healthy_threshold",
            ) as u32,
            unhealthy_threshold: self.int_or(
                raw.unhealthy_threshold,
                default::UNHEALTHY_THRESHOLD,
                1..=i64::from(u32::MAX),
                "unhealthy_threshold",
            ) as u32,
            expect_status,
        }
    }

    fn retry(&mut self, raw: RawRetry) -> Retry {
        let backoff = self.duration(raw.backoff.as_ref(), default::BACKOFF, Zero::Allowed);
        let backoff_max = self.duration(
            raw.backoff_max.as_ref(),
            default::BACKOFF_MAX,
            Zero::Allowed,
        );
        if let (Some(backoff), Some(backoff_max)) = (backoff, backoff_max) {
            if backoff > backoff_max {
                if let Some(span) = raw
                    .backoff
                    .as_ref()
                    .or(raw.backoff_max.as_ref())
                    .map(|s| s.span())
                {
                    self.error(
                        &span,
                        format!(
                            "backoff ({}) is larger than backoff_max ({})",
                            format_duration(backoff),
                            format_duration(backoff_max)
                        ),
                    );
                }
            }
        }
        Retry {
            attempts: self.int_or(
                raw.attempts,
                default::RETRY_ATTEMPTS,
                0..=MAX_ATTEMPTS,
                "attempts",
            ) as u32,
            backoff: backoff.unwrap_or(default::BACKOFF),
            backoff_max: backoff_max.unwrap_or(default::BACKOFF_MAX),
            budget_percent: self.int_or(
                raw.budget_percent,
                default::BUDGET_PERCENT,
                0..=100,
                "budget_percent",
            ) as u32,
        }
    }

    // ---- values ----

    /// Route and upstream names end up in metric labels, logs and the admin API.
    fn name(&mut self, raw: &Spanned<String>, what: &str) {
        let text = raw.get_ref();
        let ok = !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            self.error(
                &raw.span(),
                format!("invalid {what} name {text:?}: expected letters, digits, '-', '_' or '.'"),
            );
        }
    }

    /// `client_ip`, `header:NAME` and, where `path_ok`, `path`.
    fn request_key(&mut self, raw: &Spanned<String>, path_ok: bool) -> Option<RequestKey> {
        let text = raw.get_ref();
        if text == "client_ip" {
            return Some(RequestKey::ClientIp);
        }
        if path_ok && text == "path" {
            return Some(RequestKey::Path);
        }
        if let Some(name) = text.strip_prefix("header:") {
            if let Ok(h) = HeaderName::from_bytes(name.trim().as_bytes()) {
                return Some(RequestKey::Header(h));
            }
        }
        let expected = if path_ok {
            "client_ip, path or header:NAME"
        } else {
            "client_ip or header:NAME"
        };
        self.error(
            &raw.span(),
            format!("invalid key {text:?}: expected {expected} with a valid header name"),
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
            // Kept as written (host bits and all): it means its network either way, and
            // `check` warns when host bits are set.
            return Some(net);
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Some(IpNet::from(ip));
        }
        self.error(&raw.span(), format!("invalid CIDR {text:?}: expected an address or a network, like \"10.0.0.0/8\" or \"::1\""));
        None
    }

    /// The duration written at `raw`, `default` when absent, None (and an error) when bad.
    fn duration(
        &mut self,
        raw: Option<&Spanned<String>>,
        default: Duration,
        zero: Zero,
    ) -> Option<Duration> {
        let Some(raw) = raw else {
            return Some(default);
        };
        let text = raw.get_ref();
        let message = match parse_duration(text) {
            Some(d) if d.is_zero() && zero == Zero::Rejected => {
                format!("duration {text:?} must be greater than zero")
            }
            Some(d) if d > MAX_DURATION => {
                format!("duration {text:?} is too long: at most 168h (a week)")
            }
            Some(d) => return Some(d),
            None => format!(
                "invalid duration {text:?}: expected a number with a unit ms, s, m or h, like \"250ms\""
            ),
        };
        self.error(&raw.span(), message);
        None
    }

    fn duration_or(
        &mut self,
        raw: Option<Spanned<String>>,
        default: Duration,
        zero: Zero,
    ) -> Duration {
        self.duration(raw.as_ref(), default, zero)
            .unwrap_or(default)
    }

    fn int(&mut self, raw: &Spanned<i64>, range: RangeInclusive<i64>, what: &str) -> i64 {
        let v = *raw.get_ref();
        if range.contains(&v) {
            return v;
        }
        let (min, max) = (*range.start(), *range.end());
        let message = if v < min && max >= i64::from(u32::MAX) {
            format!("{what} must be at least {min}, not {v}")
        } else {
            format!("{what} must be between {min} and {max}, not {v}")
        };
        self.error(&raw.span(), message);
        v.clamp(min, max)
    }

    fn int_or(
        &mut self,
        raw: Option<Spanned<i64>>,
        default: i64,
        range: RangeInclusive<i64>,
        what: &str,
    ) -> i64 {
        match raw {
            Some(r) => self.int(&r, range, what),
            None => default,
        }
    }
}

/// What a rate limit or a hash ring is keyed on, before it becomes `LimitKey`/`HashKey`.
enum RequestKey {
    ClientIp,
    Header(HeaderName),
    Path,
}

/// Why a client could never send `token` in `Authorization: Bearer TOKEN`, if it could
/// not: HTTP strips whitespace around a header value, and the admin API reads only
/// printable ASCII (and tabs) there, so such a token would answer every request 401.
fn token_problem(token: &str) -> Option<&'static str> {
    if token.trim() != token {
        Some("has leading or trailing whitespace: HTTP strips it from the Authorization header, so every request would get 401")
    } else if !token
        .bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        Some("holds a character other than printable ASCII: no Authorization header can carry it, so every request would get 401")
    } else {
        None
    }
}

/// Whether listeners on `a` and `b` would take the same connections: the same port (not
/// 0, which is any free port) and the same address, or a wildcard covering the other.
/// 0.0.0.0 covers every IPv4 address; [::] every IPv6 address and, as Linux binds it
/// dual-stack unless `net.ipv6.bindv6only` is set, every IPv4 address too.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers =
        |wild: IpAddr, other: IpAddr| wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4());
    let (ia, ib) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() == b.port() && a.port() != 0 && (ia == ib || covers(ia, ib) || covers(ib, ia))
}

/// Where each line of a text starts, so that an error's position costs a binary search
/// and a scan of its own line, not of everything before it (20,000 errors in a 1 MB file
/// took minutes).
struct Lines {
    /// Byte offsets of line starts; the first is 0.
    starts: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Self {
        let after_newlines = text.match_indices('\n').map(|(i, _)| i + 1);
        Lines {
            starts: std::iter::once(0).chain(after_newlines).collect(),
        }
    }

    /// 1-based line and column (in characters) of byte `offset` in `text`, the text these
    /// lines are of.
    fn line_col(&self, text: &str, offset: usize) -> (usize, usize) {
        let offset = offset.min(text.len());
        // At least 1: the first start is 0.
        let line = self.starts.partition_point(|&start| start <= offset);
        let start = self.starts.get(line.wrapping_sub(1)).copied().unwrap_or(0);
        let col = text.get(start..offset).map_or(0, |s| s.chars().count()) + 1;
        (line, col)
    }
}

/// Parses an integer or decimal number with a unit ms, s, m or h ("250ms", "1.5s",
/// "1m"), exactly (no float rounding); None when it is not one.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let unit_ns: u128 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let bad_frac = number.contains('.') && (frac.is_empty() || frac.contains('.'));
    // Bounds keep the arithmetic below in range; MAX_DURATION is checked by the caller.
    if whole.is_empty() || bad_frac || whole.len() > 12 || frac.len() > 9 {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let ns = whole * unit_ns + frac_value * unit_ns / 10u128.pow(frac.len() as u32);
    u64::try_from(ns).ok().map(Duration::from_nanos)
}

/// The shortest exact text for a duration: "250ms", "2s", "1m", "0.5ms".
pub fn format_duration(d: Duration) -> String {
    const UNITS: [(u128, &str); 4] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
    ];
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".to_owned();
    }
    for (size, unit) in UNITS {
        if ns.is_multiple_of(size) {
            return format!("{}{unit}", ns / size);
        }
    }
    let frac = format!("{:06}", ns % 1_000_000);
    format!("{}.{}ms", ns / 1_000_000, frac.trim_end_matches('0'))
}

/// "200" or "200-399", both ends within 100-599, in order.
fn parse_status_range(text: &str) -> Option<RangeInclusive<u16>> {
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
    if let Some(rest) = text.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        inner.parse::<std::net::Ipv6Addr>().ok()?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok());
        return port_ok.then(|| format!("[{}]", inner.to_ascii_lowercase()));
    }
    let host = match text.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        Some(_) => return None,
        None => text,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (host.parse::<IpAddr>().is_ok() || valid_dns_name(host)).then(|| host.to_ascii_lowercase())
}

/// A TLS server name: a DNS name, optionally with a leading "*." wildcard, lowercased.
fn normalise_server_name(text: &str) -> Option<String> {
    let (wildcard, rest) = match text.strip_prefix("*.") {
        Some(rest) => ("*.", rest),
        None => ("", text),
    };
    let rest = rest.strip_suffix('.').unwrap_or(rest);
    valid_dns_name(rest).then(|| format!("{wildcard}{}", rest.to_ascii_lowercase()))
}

/// Letters, digits, '-' and '_' in labels of 1-63 bytes; the last label not all digits,
/// so a mistyped IPv4 address ("10.0.0.256") is not taken for a name.
fn valid_dns_name(host: &str) -> bool {
    let labels_ok = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    let numeric_tld = host
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()));
    !host.is_empty() && host.len() <= 253 && labels_ok && !numeric_tld
}

/// `host:port` with port 1-65535, host an IPv4 address, a bracketed IPv6 address or a DNS
/// name.
fn valid_backend_addr(addr: &str) -> bool {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return sa.port() != 0;
    }
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !port.starts_with('+')
                && port.parse::<u16>().is_ok_and(|p| p != 0)
                && valid_dns_name(host)
        }
        None => false,
    }
}

/// A `redis://` or `rediss://` URL the Redis client accepts (host, port in range, a
/// numeric database): checked as the client will parse it, without connecting.
fn valid_redis_url(url: &str) -> bool {
    use redis::IntoConnectionInfo;
    ["redis://", "rediss://"].iter().any(|scheme| {
        url.strip_prefix(scheme)
            .is_some_and(|rest| !rest.is_empty())
    }) && url.into_connection_info().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error of `text`, as `check` prints them (without the "error: " prefix).
    fn errors(text: &str) -> Vec<String> {
        match parse(text, Path::new("t.toml")) {
            Ok(_) => vec![],
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn ok(text: &str) -> Config {
        match parse(text, Path::new("conf/t.toml")) {
            Ok(c) => c,
            Err(e) => panic!("{e:?}"),
        }
    }

    const APP: &str = "[upstreams.app]\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n";
    const X: &str = "[upstreams.x]\nbackends = [{ addr = \"a:1\" }]\n";

    #[test]
    fn each_mistake_is_one_error_at_its_value() {
        let cases: Vec<(String, &str)> = vec![
            (
                format!("[[routes]]\nname = \"api\"\nupstream = \"ap\"\n{APP}"),
                "t.toml:3:12: route \"api\" uses upstream \"ap\", which is not defined (defined: app)",
            ),
            (
                "[[routes]]\nupstream = \"app\"\n".into(),
                "t.toml:2:12: route \"route-1\" uses upstream \"app\", which is not defined (none is defined)",
            ),
            (
                format!("[[routes]]\nname = \"a\"\nupstream = \"app\"\n[[routes]]\nname = \"a\"\nupstream = \"app\"\n{APP}"),
                "t.toml:5:8: duplicate route name \"a\"",
            ),
            (
                format!("[[routes]]\nname = \"route-2\"\nupstream = \"app\"\n[[routes]]\nupstream = \"app\"\n{APP}"),
                "t.toml:4:1: duplicate route name \"route-2\"",
            ),
            (
                format!("[[routes]]\nname = \"my api\"\nupstream = \"app\"\n{APP}"),
                "t.toml:2:8: invalid route name \"my api\": expected letters, digits, '-', '_' or '.'",
            ),
            (
                "[upstreams.\"my app\"]\nbackends = [{ addr = \"a:1\" }]\n".into(),
                "t.toml:1:12: invalid upstream name \"my app\": expected letters, digits, '-', '_' or '.'",
            ),
            (
                "[upstreams.x]\nbackends = []\n".into(),
                "t.toml:2:12: upstream \"x\" has no backends: expected at least one { addr = \"host:port\" }",
            ),
            (
                "[upstreams.x]\nbackends = [{ addr = \"a:1\", weight = 0 }]\n".into(),
                "t.toml:2:38: weight must be between 1 and 1000000, not 0",
            ),
            (
                "[upstreams.x]\nbackends = [{ addr = \"a:1\" }, { addr = \"A:1\" }]\n".into(),
                "t.toml:2:40: backend A:1 appears twice in upstream \"x\"",
            ),
            (
                "[upstreams.x]\nbackends = [{ addr = \"nohostport\" }]\n".into(),
                "t.toml:2:22: invalid backend address \"nohostport\": expected host:port with a port 1-65535, like \"127.0.0.1:9001\" or \"app.internal:80\"",
            ),
            (
                "[upstreams.x]\nbackends = [{ addr = \"app:0\" }]\n".into(),
                "t.toml:2:22: invalid backend address \"app:0\": expected host:port with a port 1-65535, like \"127.0.0.1:9001\" or \"app.internal:80\"",
            ),
            (
                "[server.client_ip]\ntrusted_proxies = [\"10.0.0.0/33\"]\n".into(),
                "t.toml:2:20: invalid CIDR \"10.0.0.0/33\": expected an address or a network, like \"10.0.0.0/8\" or \"::1\"",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\ndeny = [\"::1\", \"10.0.0\"]\n{APP}"),
                "t.toml:3:16: invalid CIDR \"10.0.0\": expected an address or a network, like \"10.0.0.0/8\" or \"::1\"",
            ),
            (
                "[server.timeouts]\nidle = \"5 sec\"\n".into(),
                "t.toml:2:8: invalid duration \"5 sec\": expected a number with a unit ms, s, m or h, like \"250ms\"",
            ),
            (
                "[server.timeouts]\nheader_read = \"10\"\n".into(),
                "t.toml:2:15: invalid duration \"10\": expected a number with a unit ms, s, m or h, like \"250ms\"",
            ),
            (
                format!("{X}[upstreams.x.timeouts]\nconnect = \"0s\"\n"),
                "t.toml:4:11: duration \"0s\" must be greater than zero",
            ),
            (
                "[server.timeouts]\nidle = \"200h\"\n".into(),
                "t.toml:2:8: duration \"200h\" is too long: at most 168h (a week)",
            ),
            (
                "[server]\nlisten = [\"localhost:80\"]\n".into(),
                "t.toml:2:11: invalid listen address \"localhost:80\": expected IP:PORT, like \"127.0.0.1:8080\" or \"[::1]:8080\"",
            ),
            (
                "[server]\nlisten = []\n".into(),
                "t.toml:2:10: server.listen is empty: expected at least one address, like \"127.0.0.1:8080\"",
            ),
            (
                "[server]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n".into(),
                "t.toml:2:26: listen address 127.0.0.1:1 appears twice",
            ),
            (
                "[server.limits]\nmax_header_bytes = 100\n".into(),
                "t.toml:2:20: max_header_bytes must be at least 1024, not 100",
            ),
            (
                "[[server.tls]]\nlisten = \"127.0.0.1:8080\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n".into(),
                "t.toml:2:10: listen address 127.0.0.1:8080 is already a plain HTTP listener in server.listen",
            ),
            (
                "[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"a.pem\"\nkey = \"a.key\"\n[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"b.pem\"\nkey = \"b.key\"\n".into(),
                "t.toml:5:1: a second [[server.tls]] entry on 127.0.0.1:8443 without sni: at most one per address may be the default certificate",
            ),
            (
                "[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"a.pem\"\nkey = \"a.key\"\nsni = [\"a.test\"]\n[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"b.pem\"\nkey = \"b.key\"\nsni = [\"b.test\", \"A.test\"]\n".into(),
                "t.toml:10:18: server name \"a.test\" already has a certificate on 127.0.0.1:8443",
            ),
            (
                "[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"a.pem\"\nkey = \"\"\n".into(),
                "t.toml:4:7: empty file path: expected a PEM file",
            ),
            (
                "[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"a.pem\"\nkey = \"a.key\"\nsni = [\"a..test\"]\n".into(),
                "t.toml:5:8: invalid server name \"a..test\": expected a name like \"example.com\" or \"*.example.com\"",
            ),
            (
                "[admin]\nlisten = \"127.0.0.1:8080\"\n".into(),
                "t.toml:2:10: admin.listen 127.0.0.1:8080 is also a proxy listen address",
            ),
            (
                "[server]\nlisten = [\"127.0.0.1:9901\"]\n".into(),
                "t.toml:2:11: listen address 127.0.0.1:9901 is the admin API's default: choose another or set admin.listen",
            ),
            (
                "[admin]\nlisten = \"127.0.0.1:8443\"\n[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"a.pem\"\nkey = \"a.key\"\n".into(),
                "t.toml:2:10: admin.listen 127.0.0.1:8443 is also a proxy listen address",
            ),
            (
                "[server]\nlisten = [\"127.0.0.1:23080\"]\n[admin]\nlisten = \"0.0.0.0:23080\"\n".into(),
                "t.toml:4:10: admin.listen 0.0.0.0:23080 overlaps the proxy listen address 127.0.0.1:23080 (server.listen): same port, and a wildcard address covers the other, so the admin API would answer on the proxy's port; use another port",
            ),
            (
                "[server]\nlisten = [\"127.0.0.1:23080\"]\n[admin]\nlisten = \"[::]:23080\"\n".into(),
                "t.toml:4:10: admin.listen [::]:23080 overlaps the proxy listen address 127.0.0.1:23080 (server.listen): same port, and a wildcard address covers the other, so the admin API would answer on the proxy's port; use another port",
            ),
            (
                "[server]\nlisten = [\"[::]:23080\"]\n[admin]\nlisten = \"127.0.0.1:23080\"\n".into(),
                "t.toml:4:10: admin.listen 127.0.0.1:23080 overlaps the proxy listen address [::]:23080 (server.listen): same port, and a wildcard address covers the other, so the admin API would answer on the proxy's port; use another port",
            ),
            (
                "[server]\nlisten = [\"0.0.0.0:23080\"]\n[admin]\nlisten = \"[::]:23080\"\n".into(),
                "t.toml:4:10: admin.listen [::]:23080 overlaps the proxy listen address 0.0.0.0:23080 (server.listen): same port, and a wildcard address covers the other, so the admin API would answer on the proxy's port; use another port",
            ),
            (
                "[admin]\nlisten = \"0.0.0.0:8443\"\n[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"a.pem\"\nkey = \"a.key\"\n".into(),
                "t.toml:2:10: admin.listen 0.0.0.0:8443 overlaps the proxy listen address 127.0.0.1:8443 (server.tls): same port, and a wildcard address covers the other, so the admin API would answer on the proxy's port; use another port",
            ),
            (
                "[server]\nlisten = [\"0.0.0.0:9901\"]\n".into(),
                "t.toml:2:11: listen address 0.0.0.0:9901 covers the admin API's default 127.0.0.1:9901: choose another port or set admin.listen",
            ),
            (
                "[admin]\nlisten = \"localhost:9901\"\n".into(),
                "t.toml:2:10: invalid listen address \"localhost:9901\": expected IP:PORT, like \"127.0.0.1:8080\" or \"[::1]:8080\"",
            ),
            (
                "[admin]\ntoken = \"a\"\ntoken_env = \"B\"\n".into(),
                "t.toml:2:9: set admin.token or admin.token_env, not both",
            ),
            (
                "[admin]\ntoken = \"abc \"\n".into(),
                "t.toml:2:9: admin.token has leading or trailing whitespace: HTTP strips it from the Authorization header, so every request would get 401",
            ),
            (
                "[admin]\ntoken = \" \"\n".into(),
                "t.toml:2:9: admin.token has leading or trailing whitespace: HTTP strips it from the Authorization header, so every request would get 401",
            ),
            (
                "[admin]\ntoken = \"s\u{e9}cret\"\n".into(),
                "t.toml:2:9: admin.token holds a character other than printable ASCII: no Authorization header can carry it, so every request would get 401",
            ),
            (
                "[admin]\ntoken_env = \"\"\n".into(),
                "t.toml:2:13: admin.token_env is empty: expected an environment variable name",
            ),
            (
                "[admin]\ntoken_env = \"A=B\"\n".into(),
                "t.toml:2:13: admin.token_env \"A=B\" is not an environment variable name (no '=' or NUL)",
            ),
            (
                "[admin]\ntoken_env = \"A\\u0000B\"\n".into(),
                "t.toml:2:13: admin.token_env \"A\\0B\" is not an environment variable name (no '=' or NUL)",
            ),
            (
                "[admin]\ntoken_env = \"PALISADE_TEST_SURELY_UNSET_VAR\"\n".into(),
                "t.toml:2:13: environment variable PALISADE_TEST_SURELY_UNSET_VAR (admin.token_env) is not set",
            ),
            (
                "[upstreams.x]\nbalance = \"consistent_hash\"\nhash_key = \"header:\"\nbackends = [{ addr = \"a:1\" }]\n".into(),
                "t.toml:3:12: invalid key \"header:\": expected client_ip, path or header:NAME with a valid header name",
            ),
            (
                "[upstreams.x]\nbalance = \"fastest\"\nbackends = [{ addr = \"a:1\" }]\n".into(),
                "t.toml:2:11: unknown balance \"fastest\": expected round_robin, weighted, least_conn, p2c_ewma, random or consistent_hash",
            ),
            (
                "[upstreams.x]\nprotocol = \"h2\"\nbackends = [{ addr = \"a:1\" }]\n".into(),
                "t.toml:2:12: unknown protocol \"h2\": expected \"http1\" or \"h2c\"",
            ),
            (
                format!("{X}[upstreams.x.health]\nhealthy_threshold = 0\n"),
                "t.toml:4:21: healthy_threshold must be at least 1, not 0",
            ),
            (
                format!("{X}[upstreams.x.health]\nunhealthy_threshold = -1\n"),
                "t.toml:4:23: unhealthy_threshold must be at least 1, not -1",
            ),
            (
                format!("{X}[upstreams.x.health]\ninterval = \"1s\"\ntimeout = \"1s\"\n"),
                "t.toml:5:11: health timeout (1s) must be shorter than interval (1s)",
            ),
            (
                format!("{X}[upstreams.x.health]\ninterval = \"400ms\"\n"),
                "t.toml:4:12: health timeout (500ms) must be shorter than interval (400ms)",
            ),
            (
                format!("{X}[upstreams.x.health]\nexpect_status = \"399-200\"\n"),
                "t.toml:4:17: invalid expect_status \"399-200\": expected a status like \"200\" or a range like \"200-399\" within 100-599",
            ),
            (
                format!("{X}[upstreams.x.health]\nexpect_status = \"200-600\"\n"),
                "t.toml:4:17: invalid expect_status \"200-600\": expected a status like \"200\" or a range like \"200-399\" within 100-599",
            ),
            (
                format!("{X}[upstreams.x.health]\npath = \"health\"\n"),
                "t.toml:4:8: health path \"health\" must start with '/'",
            ),
            (
                format!("{X}[upstreams.x.health]\npath = \"/h ealth\"\n"),
                "t.toml:4:8: health path \"/h ealth\" is not a valid request target: no spaces or control characters (percent-encode them)",
            ),
            (
                format!("{X}[upstreams.x.passive]\nconsecutive_failures = 0\n"),
                "t.toml:4:24: consecutive_failures must be at least 1, not 0",
            ),
            (
                format!("{X}[upstreams.x.retry]\nbackoff = \"2s\"\nbackoff_max = \"1s\"\n"),
                "t.toml:4:11: backoff (2s) is larger than backoff_max (1s)",
            ),
            (
                format!("{X}[upstreams.x.retry]\nbackoff_max = \"10ms\"\n"),
                "t.toml:4:15: backoff (25ms) is larger than backoff_max (10ms)",
            ),
            (
                format!("{X}[upstreams.x.retry]\nbudget_percent = 101\n"),
                "t.toml:4:18: budget_percent must be between 0 and 100, not 101",
            ),
            (
                format!("{X}[upstreams.x.retry]\nattempts = 1000\n"),
                "t.toml:4:12: attempts must be between 0 and 100, not 1000",
            ),
            (
                format!("{X}[upstreams.x.queue]\ntimeout = \"0ms\"\n"),
                "t.toml:4:11: duration \"0ms\" must be greater than zero",
            ),
            (
                "[upstreams.x]\nca_file = \"ca.pem\"\nbackends = [{ addr = \"a:1\" }]\n".into(),
                "t.toml:2:11: ca_file and server_name need tls = true",
            ),
            (
                "[upstreams.x]\ntls = true\nserver_name = \"bad name\"\nbackends = [{ addr = \"a:1\" }]\n".into(),
                "t.toml:3:15: invalid server_name \"bad name\": expected a DNS name or an IP address",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\nhost = \"bad host\"\n{APP}"),
                "t.toml:3:8: invalid host \"bad host\": expected a name like \"api.example.com\" or \"*.example.com\"",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\npath_prefix = \"api\"\n{APP}"),
                "t.toml:3:15: path_prefix \"api\" must start with '/'",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 0\nburst = 1\n{APP}"),
                "t.toml:4:23: requests_per_second must be a number greater than 0, not 0",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = -2.5\nburst = 1\n{APP}"),
                "t.toml:4:23: requests_per_second must be a number greater than 0, not -2.5",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1.0\nburst = 0\n{APP}"),
                "t.toml:5:9: burst must be at least 1, not 0",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1\nburst = 1\nkey = \"path\"\n{APP}"),
                "t.toml:6:7: invalid key \"path\": expected client_ip or header:NAME with a valid header name",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1\nburst = 1\nkey = \"header:X Api\"\n{APP}"),
                "t.toml:6:7: invalid key \"header:X Api\": expected client_ip or header:NAME with a valid header name",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1\nburst = 1\nstore = \"redis\"\n{APP}"),
                "t.toml:6:9: store = \"redis\" needs redis_url, like \"redis://127.0.0.1:6379\"",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1\nburst = 1\nstore = \"redis\"\nredis_url = \"http://u:pw@r\"\n{APP}"),
                "t.toml:7:13: invalid redis_url: expected redis://[user:password@]host:port[/db] or rediss://...",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1\nburst = 1\nstore = \"redis\"\nredis_url = \"redis://r:6379/abc\"\n{APP}"),
                "t.toml:7:13: invalid redis_url: expected redis://[user:password@]host:port[/db] or rediss://...",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1\nburst = 1\nstore = \"redis\"\nredis_url = \"redis://:99999\"\n{APP}"),
                "t.toml:7:13: invalid redis_url: expected redis://[user:password@]host:port[/db] or rediss://...",
            ),
            (
                format!("[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 1\nburst = 1\nstore = \"memcached\"\n{APP}"),
                "t.toml:6:9: invalid store \"memcached\": expected \"local\" or \"redis\"",
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter(|(text, want)| errors(text) != [*want])
            .map(|(text, want)| format!("for:\n{text}\nwant {want:?}\ngot  {:?}", errors(text)))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    }

    #[test]
    fn three_mistakes_make_exactly_three_errors_in_file_order() {
        let e = errors(
            "[server.timeouts]\nidle = \"5 sec\"\n\n[[routes]]\nname = \"api\"\nupstream = \"missing\"\n\n[upstreams.app]\nbackends = [{ addr = \"127.0.0.1:9001\", weight = 0 }]\n",
        );
        assert_eq!(
            e,
            [
                "t.toml:2:8: invalid duration \"5 sec\": expected a number with a unit ms, s, m or h, like \"250ms\"",
                "t.toml:6:12: route \"api\" uses upstream \"missing\", which is not defined (defined: app)",
                "t.toml:9:49: weight must be between 1 and 1000000, not 0",
            ]
        );
    }

    #[test]
    fn a_file_of_unknown_keys_is_listed_up_to_a_limit() {
        // Each error listed costs a reading of the document: 2,000 unknown keys took 71 s.
        let mut text = String::from("[server]\n");
        for i in 0..200 {
            text.push_str(&format!("key{i} = 1\n"));
        }
        let e = errors(&text);
        assert_eq!(e.len(), MAX_SCHEMA_ERRORS + 1, "{e:#?}");
        assert!(
            e[0].starts_with("t.toml:2:1: unknown field `key0`"),
            "{e:#?}"
        );
        assert_eq!(
            e[MAX_SCHEMA_ERRORS],
            format!(
                "t.toml: stopped after {MAX_SCHEMA_ERRORS} errors: fix these, then check again"
            )
        );
        // Values of the wrong type too (each is replaced by a placeholder and the
        // document read again).
        let list: Vec<String> = (0..200).map(|i| format!("{{ addr = {i} }}")).collect();
        let e = errors(&format!(
            "[[routes]]\nupstream = \"a\"\n[upstreams.a]\nbackends = [{}]\n",
            list.join(", ")
        ));
        assert_eq!(e.len(), MAX_SCHEMA_ERRORS + 1, "{e:#?}");
        assert!(e[MAX_SCHEMA_ERRORS].contains("stopped after"), "{e:#?}");
    }

    #[test]
    fn every_unknown_key_is_reported_with_the_other_mistakes() {
        let e = errors(
            "[server]\naaa = 1\nzzz = 2\n\n[[routes]]\nupstream = \"missing\"\nfoo = 1\n\n[upstreams.app]\nbackends = [{ addr = \"127.0.0.1:9001\", bogus = 3 }]\n[server.extra]\nx = 1\n",
        );
        // Where each error is: FILE:LINE:COL.
        let at = |e: &[String]| -> Vec<String> {
            e.iter()
                .map(|m| m.split(": ").next().unwrap_or("").to_owned())
                .collect()
        };
        assert_eq!(
            at(&e),
            [
                "t.toml:2:1",
                "t.toml:3:1",
                "t.toml:6:12",
                "t.toml:7:1",
                "t.toml:10:40",
                "t.toml:11:9"
            ],
            "{e:#?}"
        );
        assert!(e[0].contains("unknown field `aaa`"), "{e:#?}");
        assert!(e[2].contains("upstream \"missing\""), "{e:#?}");
        assert!(e[4].contains("unknown field `bogus`"), "{e:#?}");
        // Values of the wrong type too (an array's item too), each once.
        let e = errors("[server]\naaa = 1\naccess_log = \"yes\"\nlisten = [1]\nzzz = 2\n");
        assert_eq!(
            at(&e),
            ["t.toml:2:1", "t.toml:3:14", "t.toml:4:11", "t.toml:5:1"],
            "{e:#?}"
        );
        assert!(
            e[1].contains("invalid type: string \"yes\", expected a boolean"),
            "{e:#?}"
        );
        // A required key of the wrong type: one error (no "missing field", no "upstream
        // \"\" is not defined" for its placeholder).
        let e = errors("[[routes]]\nupstream = 5\n");
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(
            e[0].starts_with("t.toml:2:12: invalid type: integer `5`"),
            "{e:#?}"
        );
        // ... and the list goes on past it: every mistyped value once, required or not,
        // at any depth, in arrays too, and the other problems after them.
        let e = errors(concat!(
            "[server]\nlisten = 5\naccess_log = \"x\"\n",
            "[server.limits]\nmax_connections = \"x\"\n",
            "[[routes]]\nupstream = 5\n",
            "[routes.rate_limit]\nrequests_per_second = \"x\"\nburst = \"x\"\n",
            "[upstreams.a]\nbackends = [{ addr = 9001 }, { addr = \"b\" }]\n",
            "[upstreams.b]\nbackends = 5\n",
            "[upstreams.c]\nbalance = \"nope\"\nbackends = [{ addr = \"c:1\", weight = \"1\" }]\n",
        ));
        assert_eq!(
            at(&e),
            [
                "t.toml:2:10",
                "t.toml:3:14",
                "t.toml:5:19",
                "t.toml:7:12",
                "t.toml:9:23",
                "t.toml:10:9",
                "t.toml:12:22",
                "t.toml:12:39",
                "t.toml:14:12",
                "t.toml:16:11",
                "t.toml:17:38",
            ],
            "{e:#?}"
        );
        assert!(e[1].contains("expected a boolean"), "{e:#?}");
        assert!(e[7].contains("invalid backend address \"b\""), "{e:#?}");
        assert!(e[9].contains("unknown balance"), "{e:#?}");
        assert!(e[10].contains("expected an integer"), "{e:#?}");
        // A required table of the wrong type ends the list; Rust's type names stay out.
        let e = errors("[upstreams.a]\nbackends = [5]\n[server]\nlisten = 3\n");
        assert_eq!(
            e,
            [
                "t.toml:2:13: invalid type: integer `5`, expected a table",
                "t.toml:4:10: invalid type: integer `3`, expected a sequence"
            ],
            "{e:#?}"
        );
    }

    #[test]
    fn a_bad_value_does_not_cause_a_second_error() {
        // A bad interval must not also trip "timeout >= interval"; a bad balance must not
        // also trip "hash_key needs consistent_hash".
        let e = errors(&format!(
            "{X}[upstreams.x.health]\ninterval = \"fast\"\ntimeout = \"2s\"\n"
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        let e = errors("[upstreams.x]\nbalance = \"hashed\"\nhash_key = \"path\"\nbackends = [{ addr = \"a:1\" }]\n");
        assert_eq!(e.len(), 1, "{e:?}");
    }

    #[test]
    fn defaults_apply() {
        let c = ok(&format!("[[routes]]\nupstream = \"app\"\n{APP}"));
        let s = &c.server;
        assert_eq!(s.listen, [SocketAddr::from(([127, 0, 0, 1], 8080))]);
        assert!(s.tls.is_empty());
        assert_eq!(
            s.timeouts,
            ServerTimeouts {
                header_read: Duration::from_secs(10),
                idle: Duration::from_secs(60),
                shutdown: Duration::from_secs(30),
            }
        );
        assert_eq!(
            s.limits,
            Limits {
                max_connections: 10_000,
                max_header_bytes: 65_536,
                max_body_bytes: 10_485_760,
            }
        );
        assert!(s.client_ip.trusted_proxies.is_empty());
        assert_eq!(
            c.admin,
            Admin {
                listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
                token: None,
            }
        );
        let r = &c.routes[0];
        assert_eq!((r.name.as_str(), r.path_prefix.as_str()), ("route-1", "/"));
        assert_eq!((r.host.is_none(), r.strip_prefix), (true, false));
        assert!(r.allow.is_empty() && r.deny.is_empty() && r.rate_limit.is_none());
        let u = &c.upstreams[0];
        assert_eq!(u.balance, Balance::RoundRobin);
        assert_eq!(u.hash_key, HashKey::ClientIp);
        assert_eq!(u.protocol, Protocol::Http1);
        assert_eq!(u.backends[0].weight, 1);
        assert_eq!(u.resolve_every, Duration::from_secs(30));
        assert!(u.health.is_none() && u.passive.is_none() && u.queue.is_none() && u.tls.is_none());
        assert_eq!(
            u.retry,
            Retry {
                attempts: 2,
                backoff: Duration::from_millis(25),
                backoff_max: Duration::from_secs(1),
                budget_percent: 20,
            }
        );
        assert_eq!(
            u.timeouts,
            UpstreamTimeouts {
                connect: Duration::from_secs(1),
                response: Duration::from_secs(30),
                idle: Duration::from_secs(60),
                read: Duration::from_secs(60),
            }
        );
    }

    #[test]
    fn defaults_apply_inside_empty_tables() {
        let c = ok(&format!(
            "{APP}[upstreams.app.health]\n[upstreams.app.passive]\n[upstreams.app.queue]\n[[routes]]\nupstream = \"app\"\n[routes.rate_limit]\nrequests_per_second = 10\nburst = 20\n"
        ));
        let u = &c.upstreams[0];
        assert_eq!(
            u.health,
            Some(Health {
                path: "/health".into(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                healthy_threshold: 2,
                unhealthy_threshold: 2,
                expect_status: 200..=399,
            })
        );
        assert_eq!(
            u.passive,
            Some(Passive {
                consecutive_failures: 5,
                ejection: Duration::from_secs(10),
            })
        );
        assert_eq!(
            u.queue,
            Some(Queue {
                max_in_flight_per_backend: 100,
                size: 1000,
                timeout: Duration::from_secs(5),
            })
        );
        assert_eq!(
            c.routes[0].rate_limit,
            Some(RateLimit {
                requests_per_second: 10.0,
                burst: 20,
                key: LimitKey::ClientIp,
                store: LimitStore::Local,
            })
        );
    }

    #[test]
    fn zero_is_accepted_where_it_means_something() {
        let c = ok(&format!(
            "[server.timeouts]\nshutdown = \"0s\"\n[server.limits]\nmax_body_bytes = 0\n{APP}[upstreams.app.retry]\nattempts = 0\nbackoff = \"0ms\"\nbackoff_max = \"0s\"\nbudget_percent = 0\n[upstreams.app.queue]\nsize = 0\n"
        ));
        assert_eq!(c.server.timeouts.shutdown, Duration::ZERO);
        assert_eq!(c.server.limits.max_body_bytes, 0);
        assert_eq!(c.upstreams[0].retry.backoff_max, Duration::ZERO);
        assert_eq!(c.upstreams[0].queue.as_ref().map(|q| q.size), Some(0));
    }

    #[test]
    fn hosts_cidrs_and_keys_are_normalised() {
        let c = ok(&format!(
            "[[routes]]\nupstream = \"app\"\nhost = \"*.Example.com:8080\"\nallow = [\"127.0.0.1\", \"10.1.2.3/8\", \"::1\"]\n[routes.rate_limit]\nrequests_per_second = 5.5\nburst = 10\nkey = \"header:X-Api-Key\"\n[[routes]]\nupstream = \"app\"\nhost = \"API.example.com.:443\"\n[[routes]]\nupstream = \"app\"\nhost = \"[::1]:8080\"\n{APP}"
        ));
        let r = &c.routes[0];
        assert_eq!(r.host, Some(HostMatch::Suffix(".example.com".into())));
        // Addresses become networks; a network keeps its host bits as written (check warns
        // about them, and lookups use the network).
        let allow: Vec<String> = r.allow.iter().map(|n| n.to_string()).collect();
        assert_eq!(allow, ["127.0.0.1/32", "10.1.2.3/8", "::1/128"]);
        let set = crate::limit::cidr::CidrSet::new(&r.allow);
        assert!(set.contains("10.200.0.1".parse().expect("ip")));
        let limit = r
            .rate_limit
            .as_ref()
            .map(|r| (r.requests_per_second, r.key.clone()));
        assert_eq!(
            limit,
            Some((5.5, LimitKey::Header(HeaderName::from_static("x-api-key"))))
        );
        assert_eq!(
            c.routes[1].host,
            Some(HostMatch::Exact("api.example.com".into()))
        );
        assert_eq!(c.routes[2].host, Some(HostMatch::Exact("[::1]".into())));
    }

    #[test]
    fn hash_keys_and_balances() {
        let c = ok("[upstreams.a]\nbalance = \"consistent_hash\"\nhash_key = \"header:X-User\"\nbackends = [{ addr = \"a:1\" }]\n[upstreams.b]\nbalance = \"consistent_hash\"\nhash_key = \"path\"\nprotocol = \"h2c\"\nbackends = [{ addr = \"b:1\", weight = 3 }]\n");
        assert_eq!(
            c.upstreams[0].hash_key,
            HashKey::Header(HeaderName::from_static("x-user"))
        );
        assert_eq!(c.upstreams[1].hash_key, HashKey::Path);
        assert_eq!(c.upstreams[1].protocol, Protocol::H2c);
        assert_eq!(c.upstreams[1].backends[0].weight, 3);
    }

    #[test]
    fn admin_and_proxy_on_one_port_are_fine_when_no_address_overlaps() {
        // Different addresses, a wildcard of the other family, or port 0.
        ok("[server]\nlisten = [\"127.0.0.1:23080\"]\n[admin]\nlisten = \"127.0.0.2:23080\"\n");
        ok("[server]\nlisten = [\"0.0.0.0:23080\"]\n[admin]\nlisten = \"[::1]:23080\"\n");
        ok("[server]\nlisten = [\"0.0.0.0:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n");
        // Proxy wildcards over proxy addresses are the kernel's to sort out (as nginx).
        ok("[server]\nlisten = [\"0.0.0.0:23080\", \"127.0.0.1:23080\"]\n");
        let mapped = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x7f00, 1);
        assert!(overlap(
            SocketAddr::from((mapped, 1)),
            SocketAddr::from(([127, 0, 0, 1], 1))
        ));
        assert!(!overlap(
            SocketAddr::from((mapped, 1)),
            SocketAddr::from(([127, 0, 0, 2], 1))
        ));
    }

    #[test]
    fn port_zero_never_clashes() {
        let c = ok("[server]\nlisten = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n");
        assert_eq!(c.server.listen.len(), 2);
    }

    #[test]
    fn upstreams_keep_file_order() {
        let c = ok("[upstreams.zeta]\nbackends = [{ addr = \"a:1\" }]\n[upstreams.alpha]\nbackends = [{ addr = \"b:1\" }]\n");
        let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha"]);
    }

    #[test]
    fn tls_paths_resolve_against_the_config_directory() {
        let c = ok(&format!(
            "[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"certs/a.pem\"\nkey = \"/abs/a.key\"\nsni = [\"A.test\", \"*.b.test\"]\n[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"c.pem\"\nkey = \"c.key\"\n{APP}tls = true\nca_file = \"ca.pem\"\nserver_name = \"App.Internal\"\n"
        ));
        let t = &c.server.tls[0];
        assert_eq!(t.cert, Path::new("conf/certs/a.pem"));
        assert_eq!(t.key, Path::new("/abs/a.key"));
        assert_eq!(t.sni, ["a.test", "*.b.test"]);
        assert!(c.server.tls[1].sni.is_empty());
        assert_eq!(
            c.upstreams[0].tls,
            Some(UpstreamTls {
                ca_file: Some("conf/ca.pem".into()),
                ca_file_at: Pos::default(),
                server_name: Some("app.internal".into()),
            })
        );
    }

    #[test]
    fn admin_token_sources() {
        std::env::set_var("PALISADE_TEST_TOKEN_VAR", "s3cret");
        let c = ok("[admin]\ntoken_env = \"PALISADE_TEST_TOKEN_VAR\"\n");
        assert_eq!(c.admin.token.as_deref(), Some("s3cret"));
        // The example's `token = ""` (no token) may stay when token_env is added.
        let c = ok("[admin]\ntoken = \"\"\ntoken_env = \"PALISADE_TEST_TOKEN_VAR\"\n");
        assert_eq!(c.admin.token.as_deref(), Some("s3cret"));
        assert_eq!(ok("[admin]\ntoken = \"\"\n").admin.token, None);
        assert_eq!(
            ok("[admin]\ntoken = \"t\"\n").admin.token.as_deref(),
            Some("t")
        );
        // A value as `$(cat token-file)` or a secret mount gives it, with its newline.
        std::env::set_var("PALISADE_TEST_NEWLINE_TOKEN_VAR", "s3cret\n");
        assert_eq!(
            errors("[admin]\ntoken_env = \"PALISADE_TEST_NEWLINE_TOKEN_VAR\"\n"),
            ["t.toml:2:13: admin.token_env: $PALISADE_TEST_NEWLINE_TOKEN_VAR has leading or trailing whitespace: HTTP strips it from the Authorization header, so every request would get 401"]
        );
        // Spaces inside are fine: a client can send them.
        assert_eq!(
            ok("[admin]\ntoken = \"a b\"\n").admin.token.as_deref(),
            Some("a b")
        );
        std::env::set_var("PALISADE_TEST_EMPTY_TOKEN_VAR", "");
        assert_eq!(
            errors("[admin]\ntoken_env = \"PALISADE_TEST_EMPTY_TOKEN_VAR\"\n"),
            ["t.toml:2:13: environment variable PALISADE_TEST_EMPTY_TOKEN_VAR (admin.token_env) is empty"]
        );
    }

    #[test]
    fn durations_parse_exactly() {
        let cases = [
            ("250ms", Duration::from_millis(250)),
            ("2s", Duration::from_secs(2)),
            ("1.5s", Duration::from_millis(1500)),
            ("0.3s", Duration::from_millis(300)),
            ("1m", Duration::from_secs(60)),
            ("2h", Duration::from_secs(7200)),
            ("0.5ms", Duration::from_micros(500)),
            ("0s", Duration::ZERO),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Some(want), "{text}");
        }
        for bad in [
            "", "5", "5 s", " 5s", "s", "-1s", "1.s", ".5s", "1..5s", "1d", "1S", "1e3ms",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn durations_format_shortest() {
        let cases = [
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_micros(500), "0.5ms"),
            (Duration::ZERO, "0s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want);
            assert_eq!(parse_duration(want), Some(d));
        }
    }

    #[test]
    fn line_col_counts_characters() {
        let line_col = |text: &str, offset| Lines::new(text).line_col(text, offset);
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
        assert_eq!(line_col("éx", 2), (1, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
        assert_eq!(line_col("ab\n", 3), (2, 1));
        assert_eq!(line_col("ab\ncd", 2), (1, 3));
        assert_eq!(line_col("", 0), (1, 1));
    }

    #[test]
    fn backend_addresses() {
        for good in [
            "127.0.0.1:80",
            "[::1]:8080",
            "app.internal:80",
            "localhost:65535",
        ] {
            assert!(valid_backend_addr(good), "{good}");
        }
        for bad in [
            "127.0.0.1",
            "app:0",
            "app:99999",
            "app:+80",
            ":80",
            "a b:80",
            "[::1]",
            "::1:80",
            "10.0.0.256:80",
            "-app:80",
        ] {
            assert!(!valid_backend_addr(bad), "{bad}");
        }
    }

    #[test]
    fn status_ranges() {
        assert_eq!(parse_status_range("200"), Some(200..=200));
        assert_eq!(parse_status_range("200-399"), Some(200..=399));
        for bad in ["99", "600", "399-200", "200-", "abc", "200-600"] {
            assert_eq!(parse_status_range(bad), None, "{bad}");
        }
    }
}
