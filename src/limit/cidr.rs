//! A set of CIDR networks with O(log n) membership, for allow/deny lists and trusted
//! proxies.
//!
//! Every network becomes a range in one 128-bit address space (IPv4 as IPv4-mapped IPv6),
//! ranges are sorted and merged at build time, and a lookup is one binary search — so ten
//! thousand networks cost about as much as ten.
//!
//! An IPv6 network matches IPv6 clients only, as in nginx: `::/0` or `::/64` would
//! otherwise cover the IPv4-mapped block, that is every IPv4 client (`deny = ["::/0"]`
//! refused them all). Only a network written inside that block (`::ffff:10.0.0.0/104`)
//! means IPv4 addresses.

use std::net::IpAddr;

use ipnet::IpNet;

/// Networks, compiled for lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrSet {
    /// Disjoint, sorted, non-adjacent inclusive ranges.
    ranges: Vec<(u128, u128)>,
}

/// Where IPv4 addresses sit in the 128-bit space: `::ffff:0:0/96`.
const MAPPED: (u128, u128) = (0xffff_0000_0000, 0xffff_ffff_ffff);

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl CidrSet {
    /// Compiles `nets`.
    pub fn new(nets: &[IpNet]) -> Self {
        let mut ranges: Vec<(u128, u128)> = Vec::with_capacity(nets.len());
        for net in nets {
            let (start, end) = (to_u128(net.network()), to_u128(net.broadcast()));
            let over_mapped = matches!(net, IpNet::V6(_))
                && start <= MAPPED.1
                && end >= MAPPED.0
                && !(start >= MAPPED.0 && end <= MAPPED.1);
            if !over_mapped {
                ranges.push((start, end));
                continue;
            }
            // The IPv6 network, less the IPv4 block inside it.
            if start < MAPPED.0 {
                ranges.push((start, MAPPED.0 - 1));
            }
            if end > MAPPED.1 {
                ranges.push((MAPPED.1 + 1, end));
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        merged.shrink_to_fit();
        CidrSet { ranges: merged }
    }

    /// Whether `ip` is in one of the networks (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let x = to_u128(ip);
        let i = self.ranges.partition_point(|&(start, _)| start <= x);
        i > 0 && self.ranges[i - 1].1 >= x
    }

    /// Whether the set has no networks.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The number of disjoint ranges after merging.
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nets: &[&str]) -> CidrSet {
        let nets: Vec<IpNet> = nets.iter().filter_map(|n| n.parse().ok()).collect();
        CidrSet::new(&nets)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn membership_for_ipv4_and_ipv6() {
        let s = set(&[
            "10.0.0.0/8",
            "192.168.1.0/24",
            "2001:db8::/32",
            "127.0.0.1/32",
        ]);
        for yes in [
            "10.1.2.3",
            "10.255.255.255",
            "192.168.1.7",
            "2001:db8::1",
            "127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(s.contains(ip(yes)), "{yes}");
        }
        for no in [
            "11.0.0.0",
            "192.168.2.1",
            "2001:db9::1",
            "127.0.0.2",
            "::1",
            "9.255.255.255",
        ] {
            assert!(!s.contains(ip(no)), "{no}");
        }
    }

    #[test]
    fn overlapping_and_adjacent_networks_merge() {
        let s = set(&["10.0.0.0/9", "10.128.0.0/9", "10.1.0.0/16", "10.0.0.0/8"]);
        assert_eq!(s.ranges(), 1);
        assert!(s.contains(ip("10.200.0.1")));
    }

    #[test]
    fn ipv6_networks_do_not_cover_ipv4_clients_unless_written_as_mapped() {
        for nets in [&["::/0"][..], &["::/64"], &["::/80"], &["::/95"]] {
            let v6 = set(nets);
            assert!(!v6.contains(ip("127.0.0.1")), "{nets:?}");
            assert!(!v6.contains(ip("::ffff:127.0.0.1")), "{nets:?}");
            assert!(v6.contains(ip("::1")), "{nets:?}");
        }
        assert!(set(&["::/0"]).contains(ip("2001:db8::1")));
        assert!(set(&["::/0"]).contains(ip("::1:0:0:0")));
        let mapped = set(&["::ffff:10.0.0.0/104"]);
        assert!(mapped.contains(ip("10.1.2.3")) && !mapped.contains(ip("11.0.0.1")));
    }

    #[test]
    fn empty_sets_contain_nothing_and_everything_sets_contain_all() {
        assert!(!set(&[]).contains(ip("1.2.3.4")));
        let all = set(&["0.0.0.0/0", "::/0"]);
        assert!(all.contains(ip("1.2.3.4")) && all.contains(ip("::1")));
    }

    #[test]
    fn ten_thousand_networks_agree_with_a_linear_scan() {
        let nets: Vec<IpNet> = (0..10_000u32)
            .map(|i| {
                IpNet::new(IpAddr::from((i * 7919).to_be_bytes()), 24 + (i % 9) as u8)
                    .map(|n| n.trunc())
            })
            .filter_map(Result::ok)
            .collect();
        let s = CidrSet::new(&nets);
        for i in 0..20_000u32 {
            let probe = IpAddr::from((i.wrapping_mul(2_654_435_761)).to_be_bytes());
            let linear = nets.iter().any(|n| n.contains(&probe));
            assert_eq!(s.contains(probe), linear, "{probe}");
        }
    }
}
