//! The client's IP address: the socket peer, unless that peer is a trusted proxy.
//!
//! When the peer is in `server.client_ip.trusted_proxies`, the client is the right-most
//! `X-Forwarded-For` entry that is not itself trusted (nginx's `real_ip_recursive on`).
//! Entries left of an untrusted one are never believed: a client can write anything there.

use std::net::IpAddr;

use http::HeaderMap;

use super::cidr::CidrSet;

/// Resolves the client address of a request that arrived from `peer`.
pub fn resolve(peer: IpAddr, headers: &HeaderMap, trusted: &CidrSet) -> IpAddr {
    let peer = normalise(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    // Walk the lines from the last, and each line's entries from the right.
    for line in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(line) = line.to_str() else {
            return client;
        };
        for entry in line.rsplit(',') {
            let Some(ip) = parse_entry(entry.trim()) else {
                // Garbage in the chain: stop at the last address we could vouch for.
                return client;
            };
            client = ip;
            if !is_trusted(ip, trusted) {
                return ip;
            }
        }
    }
    client
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) become plain IPv4.
pub fn normalise(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn is_trusted(ip: IpAddr, trusted: &CidrSet) -> bool {
    !trusted.is_empty() && trusted.contains(ip)
}

/// An X-Forwarded-For entry: an address, optionally with a port ("1.2.3.4:5678",
/// "[::1]:80").
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(normalise(ip));
    }
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok().map(normalise);
    }
    entry.split(':').next()?.parse().ok().map(normalise)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", http::HeaderValue::from_static(v));
        }
        h
    }

    fn nets(list: &[&str]) -> CidrSet {
        let nets: Vec<ipnet::IpNet> = list.iter().filter_map(|n| n.parse().ok()).collect();
        CidrSet::new(&nets)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn untrusted_peers_cannot_spoof() {
        let h = headers(&["6.6.6.6"]);
        assert_eq!(
            resolve(ip("10.0.0.1"), &h, &CidrSet::default()),
            ip("10.0.0.1")
        );
        assert_eq!(
            resolve(ip("10.0.0.1"), &h, &nets(&["192.168.0.0/16"])),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn trusted_peers_yield_the_rightmost_untrusted_entry() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["6.6.6.6, 1.2.3.4", "10.0.0.7"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
    }

    #[test]
    fn an_all_trusted_chain_yields_the_leftmost() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["10.0.0.9, 10.0.0.8"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.9"));
    }

    #[test]
    fn garbage_stops_the_walk_and_ports_are_allowed() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["1.1.1.1, nonsense, 10.0.0.3"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.3"));
        let h = headers(&["[2001:db8::1]:443"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("2001:db8::1"));
        let h = headers(&["1.2.3.4:80"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
    }

    #[test]
    fn mapped_ipv6_is_normalised() {
        assert_eq!(
            resolve(
                ip("::ffff:127.0.0.1"),
                &HeaderMap::new(),
                &CidrSet::default()
            ),
            ip("127.0.0.1")
        );
    }
}
