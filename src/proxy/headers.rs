//! Header rewriting between the client and the backend.
//!
//! Hop-by-hop headers stay on their own hop (RFC 9110 7.6.1); the upstream request gains the
//! `X-Forwarded-*`, `Via` and `X-Request-Id` headers; the Host header is kept. Everything
//! here edits the existing `HeaderMap` in place and formats into stack buffers, so a request
//! without an incoming `X-Forwarded-For` costs two small header values and no map rebuild.

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, COOKIE, EXPECT, HOST, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE, VIA,
};
use http::Version;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// The request id header, kept when valid and generated otherwise.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one hop, never forwarded (besides those `Connection` names).
/// `Expect` is not hop-by-hop by RFC 9110, but palisade answers `100-continue` itself
/// (HTTP/1.x clients get their `100 Continue` when the body is first wanted): the backend
/// is not asked again, as nginx does not.
const HOP_BY_HOP: [&HeaderName; 8] = [
    &EXPECT,
    &CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &TE,
    &TRAILER,
    &TRANSFER_ENCODING,
    &UPGRADE,
];

/// Whether `name` is a hop-by-hop header by itself (besides those `Connection` names).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// [`is_hop_by_hop`] for a name as written on the wire (any case).
pub(crate) fn is_hop_by_hop_name(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// Whether a request's Upgrade header asks for WebSocket and nothing else: one protocol,
/// `websocket` in any case. Only such an upgrade is forwarded and tunnelled (SPEC 3); any
/// other (`h2c`, a list of protocols the backend could pick from) is a hop-by-hop header
/// like the rest, dropped, and the request goes on as a plain one.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let mut protocols = headers
        .get_all(UPGRADE)
        .iter()
        .flat_map(|v| crate::http1::items(v.as_bytes()));
    matches!(
        (protocols.next(), protocols.next()),
        (Some(protocol), None) if protocol.eq_ignore_ascii_case(b"websocket")
    )
}

/// Which headers palisade's HTTP/1.1 codec saw in a request head while parsing it, so
/// that the handler looks up only headers that are there (each lookup hashes the name).
/// Where no codec counted (HTTP/2 requests, through hyper) there is none: look them up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// Host lines (saturating).
    pub hosts: u8,
    /// Any Transfer-Encoding line.
    pub transfer_encoding: bool,
    /// Any X-Request-Id line.
    pub request_id: bool,
    /// Any X-Forwarded-For line.
    pub forwarded_for: bool,
}

impl Seen {
    /// Counts one header name.
    pub fn see(&mut self, name: &HeaderName) {
        if *name == HOST {
            self.hosts = self.hosts.saturating_add(1);
        } else if *name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
        } else if *name == X_REQUEST_ID {
            self.request_id = true;
        } else if *name == X_FORWARDED_FOR {
            self.forwarded_for = true;
        }
    }
}

/// What the upstream request needs to know about the client side.
#[derive(Debug, Clone, Copy)]
pub struct ClientSide {
    /// The client's address as palisade resolved it.
    pub ip: IpAddr,
    /// `http` or `https`: the scheme the client used.
    pub proto: &'static str,
    /// The HTTP version the client spoke.
    pub version: Version,
    /// The headers the codec saw, when it counted them.
    pub seen: Option<Seen>,
}

/// Removes hop-by-hop headers, including every header the `Connection` header names.
/// With `upgrade`, `Upgrade` is kept and `Connection: upgrade` set, so a WebSocket handshake
/// reaches the backend. With `te_trailers` (a request to an HTTP/2 backend), `TE: trailers`
/// is kept: gRPC needs it, and it is the one value HTTP/2 allows; to an HTTP/1.1 backend
/// TE is dropped like the others (SPEC 3).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool, te_trailers: bool) {
    // One pass over the names (comparisons, no hashing) finds whether there is anything to
    // do; most requests carry no hop-by-hop header, and seven removals would cost seven
    // hash lookups each. An upgrade always has `Connection`, so it never returns here.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        // Names listed in Connection are hop-by-hop too; collect them first since we
        // cannot remove while borrowing. Typical values ("keep-alive", "close") are short.
        let listed: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            // Host is never hop-by-hop: `Connection: host` must not make the backend see
            // another host than the one the request was routed and checked by.
            let kept = name == HOST || (upgrade && name == UPGRADE) || (te_trailers && name == TE);
            if !kept {
                headers.remove(&name);
            }
        }
    }
    let keep_te = te_trailers
        && headers
            .get(TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let upgrade_value = if upgrade {
        headers.remove(UPGRADE)
    } else {
        None
    };
    for name in HOP_BY_HOP {
        if !(keep_te && *name == TE) {
            headers.remove(name);
        }
    }
    if let Some(value) = upgrade_value {
        headers.insert(UPGRADE, value);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether `host` (a Host field or a target's authority) is one a backend reads the way
/// palisade routed it: `uri-host [":" port]` of RFC 9110 4.2.3 / RFC 3986 3.2.2, without
/// userinfo. A reg-name is unreserved, percent-encoded and sub-delim characters (no space,
/// `/`, `\`, `@`, `?`, `#`, quotes or controls), and holds no `..` (nginx refuses it too: a
/// backend that builds a file path from its host would climb out of its directory); an
/// IP-literal is bracketed; a port is digits. An empty value is valid (RFC 9112 3.2: an
/// authority-less target sends `Host:` empty) and matches host-less routes only.
pub fn valid_host(host: &[u8]) -> bool {
    let name = match host.split_first() {
        Some((b'[', rest)) => {
            // An IP-literal: unreserved, sub-delim and `:` characters up to `]`.
            let Some(end) = rest.iter().position(|&b| b == b']') else {
                return false;
            };
            let literal = &rest[..end];
            if literal.is_empty() || !literal.iter().all(|&b| b == b':' || reg_name_byte(b)) {
                return false;
            }
            return valid_port(&rest[end + 1..]);
        }
        _ => host,
    };
    // One pass over a reg-name (every request's host goes through here).
    let mut dot = false;
    for (i, &b) in name.iter().enumerate() {
        if reg_name_byte(b) {
            if b == b'.' {
                if dot {
                    return false;
                }
                dot = true;
            } else {
                dot = false;
            }
        } else {
            return valid_port(&name[i..]);
        }
    }
    true
}

/// Nothing, or `:` and digits (an empty port is valid, RFC 3986 3.2.3).
fn valid_port(port: &[u8]) -> bool {
    match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// The bytes of a reg-name: unreserved, `%` and sub-delims (RFC 3986 2.1-2.3).
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~%!$&'()*+,;=";
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
};

fn reg_name_byte(b: u8) -> bool {
    REG_NAME[usize::from(b)]
}

/// Whether a trailer field named `name` may go on to the next hop. RFC 9110 6.5.1: a
/// trailer must not carry what frames, routes, authenticates or controls the message, nor
/// what says how to read its content; a recipient that merges trailers into the header
/// section (RFC 9110 6.5.1 allows it) would otherwise let a client's trailer override a
/// header palisade checked or set: Content-Length, Host, Authorization, the
/// `X-Forwarded-*` and `X-Request-Id` palisade writes. Such fields are dropped, in either
/// direction, with the hop-by-hop ones.
pub fn trailer_forwarded(name: &HeaderName) -> bool {
    !is_hop_by_hop(name)
        && !matches!(
            name.as_str(),
            "content-length"
                | "content-type"
                | "content-encoding"
                | "content-range"
                | "host"
                | "authorization"
                | "proxy-authorization"
                | "proxy-authenticate"
                | "www-authenticate"
                | "cookie"
                | "set-cookie"
                | "cache-control"
                | "expires"
                | "age"
                | "date"
                | "location"
                | "retry-after"
                | "vary"
                | "range"
                | "if-match"
                | "if-none-match"
                | "if-modified-since"
                | "if-unmodified-since"
                | "if-range"
                | "max-forwards"
                | "forwarded"
                | "via"
                | "x-forwarded-for"
                | "x-forwarded-proto"
                | "x-forwarded-host"
                | "x-real-ip"
                | "x-request-id"
        )
}

/// Drops from `trailers` the fields [`trailer_forwarded`] keeps off the next hop.
pub fn filter_trailers(trailers: &mut HeaderMap) {
    if trailers.keys().all(trailer_forwarded) {
        return;
    }
    let dropped: Vec<HeaderName> = trailers
        .keys()
        .filter(|name| !trailer_forwarded(name))
        .cloned()
        .collect();
    for name in dropped {
        trailers.remove(name);
    }
}

/// Joins several `Cookie` fields into one, `; ` between them, in order: HTTP/2 clients may
/// send each cookie as a field of its own, and a request going on over HTTP/1.1 must carry
/// them as one (RFC 9113 8.2.3). One field or none: nothing changes, nothing is allocated.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = Vec::with_capacity(first.len() * 4);
    for (i, value) in headers.get_all(COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    // Valid: field values joined with bytes that are valid in one.
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(COOKIE, value);
    }
}

/// The forwarding headers of one request: `X-Forwarded-For` (client IP appended to any
/// existing list, as one line), `X-Forwarded-Proto`, `X-Forwarded-Host`, `Via`, and a
/// valid `X-Request-Id` (the client's, or a new one). Computed once per request and
/// written by whichever client sends it: palisade's own HTTP/1.1 codec writes
/// [`Forwarding::each`] straight into the request head after the client's headers (no
/// header-map inserts, no map growth, nothing cloned per attempt); hyper's client gets
/// them inserted into the map ([`Forwarding::apply`]).
#[derive(Debug, Clone)]
pub struct Forwarding {
    forwarded_for: Option<FieldValue>,
    proto: HeaderValue,
    forwarded_host: Option<HeaderValue>,
    via: HeaderValue,
    /// The request id sent upstream.
    pub request_id: FieldValue,
    /// The client sent no valid id: ours replaces whatever it sent.
    new_request_id: bool,
}

impl Forwarding {
    /// The forwarding headers for a request with `headers`, whose one Host header `host`
    /// the caller settled already (for HTTP/2 clients: the `:authority`, put into
    /// `headers` as their Host), so that `X-Forwarded-Host` names the host the request was
    /// routed by.
    pub fn new(headers: &HeaderMap, client: &ClientSide, host: Option<HeaderValue>) -> Self {
        let seen = client.seen;
        let (request_id, new_request_id) = request_id(sent_request_id(headers, seen));
        let chain = seen.is_none_or(|seen| seen.forwarded_for);
        Forwarding {
            forwarded_for: forwarded_for(headers, client.ip, chain),
            proto: HeaderValue::from_static(client.proto),
            forwarded_host: host,
            // Always 1.1, whatever the client spoke: the contract's exact value (SPEC 3).
            via: HeaderValue::from_static("1.1 palisade"),
            request_id,
            new_request_id,
        }
    }

    /// Each header this adds, in the order they are written. `Via` is added to the
    /// client's hops; every other name replaces the client's ([`Forwarding::replaces`]).
    pub fn each(&self, mut f: impl FnMut(&'static HeaderName, &[u8])) {
        if let Some(value) = &self.forwarded_for {
            f(&X_FORWARDED_FOR, value.as_bytes());
        }
        f(&X_FORWARDED_PROTO, self.proto.as_bytes());
        if let Some(host) = &self.forwarded_host {
            f(&X_FORWARDED_HOST, host.as_bytes());
        }
        f(&VIA, self.via.as_bytes());
        if self.new_request_id {
            f(&X_REQUEST_ID, self.request_id.as_bytes());
        }
    }

    /// Whether a header of the client's is replaced by one of these (and so must not be
    /// passed on next to it).
    pub fn replaces(&self, name: &HeaderName) -> bool {
        *name == X_FORWARDED_FOR
            || *name == X_FORWARDED_PROTO
            || *name == X_FORWARDED_HOST
            || (self.new_request_id && *name == X_REQUEST_ID)
    }

    /// Puts the headers into `headers` (for hyper's client).
    pub fn apply(&self, headers: &mut HeaderMap) {
        // Up to five new names: grow the map once, not once per insert.
        headers.reserve(5);
        // A claim of the client's that this has no value for goes too.
        if self.forwarded_for.is_none() {
            headers.remove(&X_FORWARDED_FOR);
        }
        if self.forwarded_host.is_none() {
            headers.remove(&X_FORWARDED_HOST);
        }
        self.each(|name, value| {
            // Valid values by construction (checked, or made of digits and address text).
            let Ok(value) = HeaderValue::from_bytes(value) else {
                return;
            };
            if *name == VIA {
                headers.append(name, value);
            } else {
                headers.insert(name, value);
            }
        });
    }
}

/// Adds the forwarding headers to `headers` (see [`Forwarding`]); returns the request id
/// as sent upstream.
pub fn add_forwarding(headers: &mut HeaderMap, client: &ClientSide) -> FieldValue {
    let host = headers.get(HOST).cloned();
    let forwarding = Forwarding::new(headers, client, host);
    forwarding.apply(headers);
    forwarding.request_id
}

/// The longest value kept inline: a full IPv6 address as text is 45 bytes.
const INLINE_MAX: usize = 46;

/// A forwarding header's value: the client's (sharing its request head's bytes), or one
/// made for this request and kept inline (a request id, an address), so that making one
/// allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldValue {
    /// The client's value, or a longer one made from it.
    Shared(HeaderValue),
    /// A short value made here.
    Inline { len: u8, bytes: [u8; INLINE_MAX] },
}

impl FieldValue {
    /// `text` kept inline; `None` when it is longer than the inline room.
    fn inline(text: &[u8]) -> Option<Self> {
        let mut bytes = [0u8; INLINE_MAX];
        bytes.get_mut(..text.len())?.copy_from_slice(text);
        Some(FieldValue::Inline {
            len: text.len() as u8,
            bytes,
        })
    }

    /// The value's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            FieldValue::Shared(value) => value.as_bytes(),
            FieldValue::Inline { len, bytes } => &bytes[..usize::from(*len)],
        }
    }
}

impl PartialEq<&str> for FieldValue {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<FieldValue> for HeaderValue {
    fn eq(&self, other: &FieldValue) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

/// `ip` as text in `buf`: IPv4 by hand (core::fmt costs more than the rest of
/// `set_forwarded_for`), IPv6 through `Display`.
pub(crate) fn ip_text(ip: IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    // "255.255.255.255" / a full IPv6 address (at most 45 bytes) fits in 64 bytes.
    let len = match ip {
        IpAddr::V4(v4) => write_ipv4(buf, v4.octets()),
        IpAddr::V6(_) => {
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            // Cannot fail: the text fits.
            let _ = write!(cursor, "{ip}");
            cursor.position() as usize
        }
    };
    &buf[..len]
}

/// The `X-Forwarded-For` value: the client's list (several lines folded into one, the
/// order kept) with `ip` appended; just `ip` without `chain` (the client sent none).
fn forwarded_for(headers: &HeaderMap, ip: IpAddr, chain: bool) -> Option<FieldValue> {
    let mut buf = [0u8; 64];
    let ip_text = ip_text(ip, &mut buf);
    let len = ip_text.len();
    if !chain {
        return FieldValue::inline(ip_text);
    }

    let existing = headers.get_all(&X_FORWARDED_FOR);
    let mut values = existing.iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return FieldValue::inline(ip_text),
        (Some(one), None) => {
            let mut joined = Vec::with_capacity(one.len() + 2 + len);
            joined.extend_from_slice(one.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(ip_text);
            HeaderValue::from_maybe_shared(bytes::Bytes::from(joined))
        }
        (Some(_), Some(_)) => {
            let mut joined = Vec::new();
            for v in headers.get_all(&X_FORWARDED_FOR) {
                joined.extend_from_slice(v.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(ip_text);
            HeaderValue::from_maybe_shared(bytes::Bytes::from(joined))
        }
    };
    value.ok().map(FieldValue::Shared)
}

/// Writes `a.b.c.d` into `buf` (at least 15 bytes); returns the length.
fn write_ipv4(buf: &mut [u8; 64], octets: [u8; 4]) -> usize {
    let mut len = 0;
    for (i, octet) in octets.into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            buf[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            buf[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        buf[len] = b'0' + octet % 10;
        len += 1;
    }
    len
}

/// A client-sent request id is kept when it is 1 to 128 characters of `[A-Za-z0-9._:+/=@-]`
/// (covers UUIDs, ULIDs, trace ids and base64); anything else is replaced.
/// The client's `X-Request-Id`, if it sent one (looked up only when palisade's codec saw
/// one; `seen` is None for HTTP/2).
/// Two or more `X-Request-Id` lines count as none: which one the backend would take is its
/// own guess, and the log would name another; a new id replaces them all.
pub fn sent_request_id(headers: &HeaderMap, seen: Option<Seen>) -> Option<&HeaderValue> {
    match seen {
        Some(seen) if !seen.request_id => None,
        _ => {
            let mut all = headers.get_all(&X_REQUEST_ID).iter();
            let first = all.next()?;
            all.next().is_none().then_some(first)
        }
    }
}

/// The request's id: the client's when it is a valid one, else a new one (true: new,
/// so it is added to the request).
pub fn request_id(sent: Option<&HeaderValue>) -> (FieldValue, bool) {
    match sent {
        Some(id) if is_valid_request_id(id.as_bytes()) => (FieldValue::Shared(id.clone()), false),
        _ => (new_request_id(), true),
    }
}

pub fn is_valid_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._:+/=@-".contains(b))
}

/// A fresh random request id: 32 lowercase hex digits (128 bits from a thread-local RNG).
pub fn new_request_id() -> FieldValue {
    let mut bytes = [0u8; INLINE_MAX];
    bytes[..16].copy_from_slice(&hex_digits(fastrand::u64(..)));
    bytes[16..32].copy_from_slice(&hex_digits(fastrand::u64(..)));
    FieldValue::Inline { len: 32, bytes }
}

/// The 16 nibbles of `bits` as lowercase hex digits, all at once (8 bytes at a time
/// instead of a table lookup per digit). The digits come out in an order of their own,
/// which is all a random id needs.
fn hex_digits(bits: u64) -> [u8; 16] {
    const LOW_NIBBLES: u64 = 0x0f0f_0f0f_0f0f_0f0f;
    const ONES: u64 = 0x0101_0101_0101_0101;
    let hex = |nibbles: u64| {
        // Bytes 0..=15; those above 9 get b'a' - b'0' - 10 more on top of b'0'.
        let over_nine = ((nibbles + 6 * ONES) >> 4) & ONES;
        (nibbles + b'0' as u64 * ONES + over_nine * u64::from(b'a' - b'0' - 10)).to_le_bytes()
    };
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hex(bits & LOW_NIBBLES));
    out[8..].copy_from_slice(&hex((bits >> 4) & LOW_NIBBLES));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn hosts_are_valid_as_rfc_3986_authorities_without_userinfo() {
        for host in [
            "",
            "www.test",
            "WWW.Test.:8080",
            "127.0.0.1",
            "[::1]",
            "[::1]:443",
            "a-b_c~d",
            "xn--caf-dma.test",
            "host:",
            "[fe80::1%25eth0]",
        ] {
            assert!(valid_host(host.as_bytes()), "{host}");
        }
        for host in [
            "a b",
            "a/b",
            "a\\b",
            "user@host",
            "a/b@c",
            "host:80a",
            "host:80:90",
            "[::1",
            "[]",
            "[::1]x",
            "[::1]:x",
            "a..b",
            "..",
            "a?b",
            "a#b",
            "caf\u{e9}",
            "a\tb",
            "a\"b",
            "a<b>",
        ] {
            assert!(!valid_host(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn trailers_that_frame_route_or_authenticate_are_dropped() {
        let mut trailers = HeaderMap::new();
        for (name, value) in [
            ("grpc-status", "0"),
            ("content-length", "5"),
            ("host", "admin.test"),
            ("x-forwarded-for", "10.0.0.1"),
            ("authorization", "Bearer x"),
            ("transfer-encoding", "chunked"),
            ("x-checksum", "abc"),
        ] {
            trailers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        filter_trailers(&mut trailers);
        let mut kept: Vec<&str> = trailers.keys().map(HeaderName::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["grpc-status", "x-checksum"]);
    }

    #[test]
    fn ipv4_written_by_hand_matches_display() {
        for octets in [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [10, 1, 20, 103],
            [127, 0, 0, 1],
            [9, 99, 100, 200],
        ] {
            let mut buf = [0u8; 64];
            let len = write_ipv4(&mut buf, octets);
            assert_eq!(
                std::str::from_utf8(&buf[..len]).expect("ascii"),
                std::net::Ipv4Addr::from(octets).to_string()
            );
        }
    }

    fn client() -> ClientSide {
        ClientSide {
            ip: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            proto: "http",
            version: Version::HTTP_11,
            seen: None,
        }
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(*k, HeaderValue::from_static(v));
        }
        headers
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn te_trailers_survives_only_to_http2_backends_and_websocket_upgrade_survives() {
        let headers = map(&[
            ("connection", "Upgrade, TE"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        for te_trailers in [false, true] {
            let mut h = headers.clone();
            remove_hop_by_hop(&mut h, true, te_trailers);
            assert_eq!(h["upgrade"], "websocket");
            assert_eq!(h["connection"], "upgrade");
            assert_eq!(h.contains_key("te"), te_trailers, "{h:?}");
        }
        let mut h = map(&[("te", "gzip, trailers")]);
        remove_hop_by_hop(&mut h, false, true);
        assert!(!h.contains_key("te"), "only exactly `trailers` goes on");
    }

    #[test]
    fn forwarding_headers_are_added_and_host_kept() {
        let mut h = map(&[("host", "api.example.com:8080")]);
        let id = add_forwarding(&mut h, &client());
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com:8080");
        assert_eq!(h["host"], "api.example.com:8080");
        assert_eq!(h["via"], "1.1 palisade");
        assert_eq!(h["x-request-id"], id);
        assert_eq!(id.as_bytes().len(), 32);
    }

    #[test]
    fn the_longest_ipv6_text_is_kept_whole() {
        let ip: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe".parse().unwrap();
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, &ClientSide { ip, ..client() });
        assert_eq!(
            h["x-forwarded-for"],
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
        );
        let mut h = map(&[("x-forwarded-for", "1.1.1.1")]);
        add_forwarding(&mut h, &ClientSide { ip, ..client() });
        assert_eq!(
            h["x-forwarded-for"],
            "1.1.1.1, ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
        );
    }

    #[test]
    fn existing_forwarded_for_lines_are_folded_into_one() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        add_forwarding(&mut h, &client());
        let all: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["1.1.1.1, 2.2.2.2, 10.1.2.3"]);
    }

    #[test]
    fn valid_request_ids_are_kept_and_invalid_ones_replaced() {
        let mut h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(add_forwarding(&mut h, &client()), "abc-123");
        let mut h = map(&[("x-request-id", "has space")]);
        let id = add_forwarding(&mut h, &client());
        assert_ne!(id, "has space");
        assert_eq!(h["x-request-id"], id);
        assert!(!is_valid_request_id(&[b'a'; 129]));
        assert!(!is_valid_request_id(b""));
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn hex_digits_cover_every_nibble_exactly() {
        // Every nibble value appears once in this number, so every digit once.
        let digits = hex_digits(0xfedc_ba98_7654_3210);
        let mut sorted = digits;
        sorted.sort_unstable();
        assert_eq!(&sorted, b"0123456789abcdef");
        assert_eq!(&hex_digits(0), b"0000000000000000");
        assert_eq!(&hex_digits(u64::MAX), b"ffffffffffffffff");
        let id = new_request_id();
        assert!(id.as_bytes().len() == 32 && id.as_bytes().iter().all(u8::is_ascii_hexdigit));
    }
}
