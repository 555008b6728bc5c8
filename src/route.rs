//! The route table: which route a request belongs to.
//!
//! Routes match on host (exact, or `*.suffix`; the port is ignored; case-insensitive) and
//! path prefix, and the first match in file order wins. The table is compiled once per
//! config: routes are indexed by exact host and by wildcard suffix, so a lookup touches only
//! the routes that could match the request's host, plus the host-less ones, and allocates
//! nothing.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{self, HostMatch};
use crate::limit::cidr::CidrSet;
use crate::limit::rate::RateLimiter;
use crate::metrics::{Metrics, RouteMetrics};

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    /// The route's name (metrics and logs).
    pub name: Arc<str>,
    /// Position in the file: lower wins.
    order: u32,
    /// The path prefix it matches.
    pub path_prefix: Box<str>,
    /// Whether `path_prefix` is removed from the upstream request's path.
    pub strip_prefix: bool,
    /// Index of its upstream in the snapshot's upstream list.
    pub upstream: usize,
    /// The route's configuration, as validated.
    pub config: config::Route,
    /// The route's metric handles.
    pub metrics: RouteMetrics,
    /// Only these client addresses (empty: everyone).
    pub allow: CidrSet,
    /// Never these client addresses.
    pub deny: CidrSet,
    /// The route's rate limiter, shared with the previous snapshot when its limit did not
    /// change.
    pub limiter: Option<Arc<RateLimiter>>,
}

/// All routes of a config, indexed for lookup.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Exact host -> its routes.
    by_host: HashMap<Box<str>, PrefixList>,
    /// Wildcard suffix (".example.com") -> its routes.
    by_suffix: HashMap<Box<str>, PrefixList>,
    /// Routes without a host.
    any_host: PrefixList,
}

/// Lists longer than this become a trie.
const SCAN_LIMIT: usize = 8;

/// Routes that share a host, matched by path prefix: a short list is scanned in file
/// order; a long one is a byte trie over the prefixes, walked once along the path, so a
/// lookup costs the path's length, not the number of routes.
#[derive(Debug)]
enum PrefixList {
    /// Route indices in file order, with their prefixes.
    Scan(Vec<(u32, Box<[u8]>)>),
    /// The same, compiled.
    Trie(PrefixTrie),
}

impl Default for PrefixList {
    fn default() -> Self {
        PrefixList::Scan(Vec::new())
    }
}

impl PrefixList {
    fn push(&mut self, order: u32, prefix: &str) {
        if let PrefixList::Scan(list) = self {
            list.push((order, prefix.as_bytes().into()));
        }
    }

    fn compile(&mut self) {
        if let PrefixList::Scan(list) = self {
            if list.len() > SCAN_LIMIT {
                let mut trie = PrefixTrie::default();
                for (order, prefix) in list.iter() {
                    trie.insert(prefix, *order);
                }
                *self = PrefixList::Trie(trie);
            }
        }
    }

    /// The lowest route index (first in file order) whose prefix starts `path`.
    fn first_match(&self, path: &str) -> Option<u32> {
        match self {
            PrefixList::Scan(list) => list
                .iter()
                .find(|(_, prefix)| path.as_bytes().starts_with(prefix))
                .map(|(order, _)| *order),
            PrefixList::Trie(trie) => trie.first_match(path.as_bytes()),
        }
    }
}

/// A byte trie of path prefixes; each node keeps the lowest route index whose prefix ends
/// there.
#[derive(Debug)]
struct PrefixTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Default)]
struct TrieNode {
    /// (byte, child node), sorted by byte.
    children: Vec<(u8, u32)>,
    /// Lowest route index ending here (u32::MAX: none).
    first: u32,
}

impl Default for PrefixTrie {
    fn default() -> Self {
        PrefixTrie {
            nodes: vec![TrieNode {
                children: Vec::new(),
                first: u32::MAX,
            }],
        }
    }
}

impl PrefixTrie {
    fn insert(&mut self, prefix: &[u8], order: u32) {
        let mut node = 0usize;
        for &b in prefix {
            node = match self.nodes[node].children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => self.nodes[node].children[i].1 as usize,
                Err(i) => {
                    let child = self.nodes.len() as u32;
                    self.nodes.push(TrieNode {
                        children: Vec::new(),
                        first: u32::MAX,
                    });
                    self.nodes[node].children.insert(i, (b, child));
                    child as usize
                }
            };
        }
        let first = &mut self.nodes[node].first;
        *first = (*first).min(order);
    }

    fn first_match(&self, path: &[u8]) -> Option<u32> {
        let mut node = 0usize;
        let mut best = self.nodes[0].first;
        for &b in path {
            let children = &self.nodes[node].children;
            match children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => node = children[i].1 as usize,
                Err(_) => break,
            }
            best = best.min(self.nodes[node].first);
        }
        (best != u32::MAX).then_some(best)
    }
}

/// The longest host name we index (DNS names are at most 253 bytes).
const MAX_HOST: usize = 256;

impl RouteTable {
    /// Compiles `routes`; `upstream_index` maps an upstream name to its index (validation
    /// guarantees every route's upstream exists; a route whose upstream is missing is skipped).
    pub fn build(
        routes: &[config::Route],
        upstream_index: impl Fn(&str) -> Option<usize>,
        metrics: &Metrics,
        limiter_for: impl Fn(&config::Route) -> Option<Arc<RateLimiter>>,
    ) -> Self {
        let mut table = RouteTable::default();
        for cfg in routes {
            let Some(upstream) = upstream_index(&cfg.upstream) else {
                continue;
            };
            let order = table.routes.len() as u32;
            let prefix = cfg.path_prefix.as_str();
            match &cfg.host {
                None => table.any_host.push(order, prefix),
                Some(HostMatch::Exact(host)) => table
                    .by_host
                    .entry(host.as_str().into())
                    .or_default()
                    .push(order, prefix),
                Some(HostMatch::Suffix(suffix)) => table
                    .by_suffix
                    .entry(suffix.as_str().into())
                    .or_default()
                    .push(order, prefix),
            }
            table.routes.push(Route {
                name: cfg.name.as_str().into(),
                order,
                path_prefix: cfg.path_prefix.as_str().into(),
                strip_prefix: cfg.strip_prefix,
                upstream,
                config: cfg.clone(),
                metrics: metrics.route(&cfg.name, &cfg.upstream),
                allow: CidrSet::new(&cfg.allow),
                deny: CidrSet::new(&cfg.deny),
                limiter: limiter_for(cfg),
            });
        }
        table.any_host.compile();
        table.by_host.values_mut().for_each(PrefixList::compile);
        table.by_suffix.values_mut().for_each(PrefixList::compile);
        table
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The first route, in file order, that matches `host` (a Host header or URI authority,
    /// port allowed) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let mut best: Option<u32> = self.any_host.first_match(path);

        let mut buf = [0u8; MAX_HOST];
        if let Some(host) = host.and_then(|h| normalise_host(h, &mut buf)) {
            if !self.by_host.is_empty() {
                if let Some(list) = self.by_host.get(host) {
                    best = min_some(best, list.first_match(path));
                }
            }
            if !self.by_suffix.is_empty() {
                // Every proper suffix starting at a dot: "a.b.c" -> ".b.c", ".c".
                for (i, _) in host.match_indices('.') {
                    if let Some(list) = self.by_suffix.get(&host[i..]) {
                        best = min_some(best, list.first_match(path));
                    }
                }
            }
        }
        best.and_then(|i| self.routes.get(i as usize))
    }

    /// All routes in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}

/// A path whose `..` segments climb above the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the path climbs above the root")]
pub struct AboveRoot;

/// The path as a backend that normalises paths reads it, for routing and the route's
/// lists: percent-escapes of printable ASCII decoded (`%61` is `a`, `%2F` is `/`, `%2E`
/// is `.`), empty segments merged (`//`), `.` and `..` segments resolved, as nginx
/// matches its locations. Without this, `/x/../admin/`, `//admin/` or `/%61dmin/` missed
/// a route `/admin/` and its deny list while such a backend served them as `/admin/`.
/// `Ok(None)`: nothing to change (a scan for `%`, `//` and `/.`: nearly every request).
/// `Err`: a `..` climbs above the root.
pub fn normalise_path(path: &str) -> Result<Option<String>, AboveRoot> {
    let raw = path.as_bytes();
    let slash_dot = raw
        .windows(2)
        .any(|w| w[0] == b'/' && (w[1] == b'/' || w[1] == b'.'));
    if !slash_dot && !raw.contains(&b'%') {
        return Ok(None);
    }
    let hex = |c: u8| (c as char).to_digit(16);
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let escaped = match (raw[i], raw.get(i + 1), raw.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match escaped {
            // Printable ASCII only: the result stays text, and other bytes stay escaped.
            // So do `%`, `?` and `#`: decoded, they would end the path or start an escape
            // in what a stripped prefix leaves for the backend.
            Some(byte) if byte.is_ascii_graphic() && !matches!(byte, b'%' | b'?' | b'#') => {
                decoded.push(byte);
                i += 3;
            }
            _ => {
                decoded.push(raw[i]);
                i += 1;
            }
        }
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    for segment in decoded.split(|&c| c == b'/') {
        trailing = false;
        match segment {
            b"" => trailing = true,
            b"." => trailing = true,
            b".." => {
                segments.pop().ok_or(AboveRoot)?;
                trailing = true;
            }
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        // Only ASCII was decoded, and a path is ASCII: always text.
        out.push_str(std::str::from_utf8(segment).map_err(|_| AboveRoot)?);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    Ok((out != path).then_some(out))
}

impl Route {
    /// The path (and query) the backend sees: with `strip_prefix` the prefix is removed and
    /// the result still starts with '/'. Returns None when nothing changes.
    pub fn rewrite_path(&self, path_and_query: &str) -> Option<String> {
        if !self.strip_prefix || self.path_prefix.len() <= 1 {
            return None;
        }
        let rest = path_and_query.get(self.path_prefix.len()..)?;
        Some(if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("/{rest}")
        })
    }

    /// Whether a client at `ip` may use this route: not denied, and allowed when there is
    /// an allow list (deny wins).
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        if !self.deny.is_empty() && self.deny.contains(ip) {
            return false;
        }
        self.allow.is_empty() || self.allow.contains(ip)
    }

    /// Position in the config file (0-based).
    pub fn order(&self) -> u32 {
        self.order
    }
}

fn min_some(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Lowercases `host` into `buf` without its port and trailing dot. None for hosts that are
/// empty, too long or not UTF-8 after lowercasing (impossible for ASCII input).
fn normalise_host<'a>(host: &str, buf: &'a mut [u8; MAX_HOST]) -> Option<&'a str> {
    let host = if let Some(rest) = host.strip_prefix('[') {
        // "[::1]:8080" -> "[::1]"
        let end = rest.find(']')?;
        &host[..end + 2]
    } else {
        match host.rfind(':') {
            Some(i) => &host[..i],
            None => host,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > MAX_HOST {
        return None;
    }
    let out = &mut buf[..host.len()];
    out.copy_from_slice(host.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_for_routing_as_a_normalising_backend_reads_them() {
        let n = |p: &str| normalise_path(p);
        for plain in [
            "/", "/api/x", "/a.b/c.d", "/a/b/", "/a%20b", "/%C3%A9", "/a/.b",
        ] {
            assert_eq!(n(plain), Ok(None), "{plain}");
        }
        assert_eq!(n("/x/../admin/"), Ok(Some("/admin/".into())));
        assert_eq!(n("//admin/"), Ok(Some("/admin/".into())));
        assert_eq!(n("/./admin"), Ok(Some("/admin".into())));
        assert_eq!(n("/%61dmin/"), Ok(Some("/admin/".into())));
        assert_eq!(n("/%2e%2E/x"), Err(AboveRoot));
        assert_eq!(n("/a/%2e%2e/admin"), Ok(Some("/admin".into())));
        assert_eq!(n("/admin%2Fsecret"), Ok(Some("/admin/secret".into())));
        assert_eq!(n("/a/."), Ok(Some("/a/".into())));
        assert_eq!(n("/a/.."), Ok(Some("/".into())));
        assert_eq!(n("/.."), Err(AboveRoot));
        assert_eq!(n("/a%20b%2"), Ok(None));
        assert_eq!(n("/%41%20"), Ok(Some("/A%20".into())));
        assert_eq!(n("/%61%3F%23%25"), Ok(Some("/a%3F%23%25".into())));
    }

    fn route(name: &str, host: Option<HostMatch>, prefix: &str, strip: bool) -> config::Route {
        config::Route {
            name: name.into(),
            host,
            path_prefix: prefix.into(),
            upstream: "app".into(),
            strip_prefix: strip,
            allow: vec![],
            deny: vec![],
            rate_limit: None,
        }
    }

    fn table(routes: &[config::Route]) -> RouteTable {
        RouteTable::build(routes, |_| Some(0), &Metrics::new(), |_| None)
    }

    fn name<'a>(t: &'a RouteTable, host: Option<&str>, path: &str) -> Option<&'a str> {
        t.find(host, path).map(|r| &*r.name)
    }

    #[test]
    fn first_match_in_file_order_wins() {
        let t = table(&[
            route("api", None, "/api", false),
            route("api-v2", None, "/api/v2", false),
            route("root", None, "/", false),
        ]);
        assert_eq!(name(&t, None, "/api/v2/x"), Some("api"));
        assert_eq!(name(&t, None, "/other"), Some("root"));
    }

    #[test]
    fn hosts_match_exactly_or_by_wildcard_ignoring_port_and_case() {
        let t = table(&[
            route(
                "exact",
                Some(HostMatch::Exact("api.example.com".into())),
                "/",
                false,
            ),
            route(
                "wild",
                Some(HostMatch::Suffix(".example.com".into())),
                "/",
                false,
            ),
            route("tail", None, "/only", false),
        ]);
        assert_eq!(name(&t, Some("API.Example.com:8080"), "/"), Some("exact"));
        assert_eq!(name(&t, Some("www.example.com"), "/"), Some("wild"));
        assert_eq!(name(&t, Some("a.b.example.com."), "/"), Some("wild"));
        // "*.example.com" does not match the bare domain (as in nginx and Envoy).
        assert_eq!(name(&t, Some("example.com"), "/"), None);
        assert_eq!(name(&t, Some("other.org"), "/only/x"), Some("tail"));
        assert_eq!(name(&t, None, "/"), None);
    }

    #[test]
    fn a_host_less_route_earlier_in_the_file_beats_a_later_host_route() {
        let t = table(&[
            route("any", None, "/", false),
            route("exact", Some(HostMatch::Exact("a.com".into())), "/", false),
        ]);
        assert_eq!(name(&t, Some("a.com"), "/"), Some("any"));
    }

    #[test]
    fn the_trie_agrees_with_a_scan_in_file_order() {
        // Many overlapping prefixes, so lists become tries; then random paths.
        let mut routes = Vec::new();
        // No bare "/": then every path would match route 0 and the comparison be trivial.
        let prefixes = [
            "/a", "/a/", "/ab", "/a/b", "/b", "/b/c/d", "/api", "/api/v1", "/api/v2", "/x", "/zz",
        ];
        for i in 0..200 {
            let prefix = format!(
                "{}{}",
                prefixes[i % prefixes.len()],
                if i % 3 == 0 { "" } else { "z" }.repeat(i % 4)
            );
            routes.push(route(&format!("r{i}"), None, &prefix, false));
        }
        let t = table(&routes);
        assert!(matches!(t.any_host, PrefixList::Trie(_)));
        let mut outcomes = std::collections::HashSet::new();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..5000 {
            // A known prefix, cut or extended at random, or a random path.
            let base = if rng.bool() {
                prefixes[rng.usize(..prefixes.len())]
            } else {
                "/"
            };
            let cut = rng.usize(..=base.len());
            let tail: String = (0..rng.usize(..5))
                .map(|_| ['/', 'a', 'b', 'z', 'p', 'i', 'v', '1'][rng.usize(..8)])
                .collect();
            let path = format!("{}{tail}", &base[..cut.max(1)]);
            let linear = routes.iter().position(|r| path.starts_with(&r.path_prefix));
            let found = t.find(None, &path).map(|r| r.order() as usize);
            assert_eq!(found, linear, "{path}");
            outcomes.insert(found);
        }
        assert!(
            outcomes.len() >= 5 && outcomes.contains(&None),
            "too few distinct outcomes: {outcomes:?}"
        );
    }

    #[test]
    fn ipv6_hosts_drop_their_port() {
        let t = table(&[route(
            "v6",
            Some(HostMatch::Exact("[::1]".into())),
            "/",
            false,
        )]);
        assert_eq!(name(&t, Some("[::1]:8080"), "/"), Some("v6"));
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash_and_the_query() {
        let t = table(&[route("api", None, "/api", true)]);
        let r = t.find(None, "/api/users").expect("route");
        assert_eq!(
            r.rewrite_path("/api/users?x=1").as_deref(),
            Some("/users?x=1")
        );
        assert_eq!(r.rewrite_path("/api").as_deref(), Some("/"));
        assert_eq!(r.rewrite_path("/api?x=1").as_deref(), Some("/?x=1"));
        let t = table(&[route("root", None, "/", true)]);
        let r = t.find(None, "/x").expect("route");
        assert_eq!(r.rewrite_path("/x"), None);
    }
}
