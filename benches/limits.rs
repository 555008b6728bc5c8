//! Client-protection costs: a rate-limit check with 1 and 1,000,000 tracked keys (and the
//! memory those keys take), and an allow-list lookup with 10 and 10,000 CIDRs.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ipnet::IpNet;
use palisade::config::{LimitKey, LimitStore, RateLimit};
use palisade::limit::cidr::CidrSet;
use palisade::limit::rate::{Key, RateLimiter, MAX_KEYS};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn ip(i: u32) -> Key {
    Key::Ip(IpAddr::from((0x0a00_0000 | i).to_be_bytes()))
}

fn limiter_checks(c: &mut Criterion) {
    let config = RateLimit {
        // Never trips: the cost measured is the check, not the refusal.
        requests_per_second: 1e9,
        burst: 1_000_000,
        key: LimitKey::ClientIp,
        store: LimitStore::Local,
    };
    let mut group = c.benchmark_group("rate_limit_check");
    for keys in [1u32, 1_000_000] {
        let before = rss_kib();
        let limiter = RateLimiter::new(&config, MAX_KEYS);
        for i in 0..keys {
            let _ = limiter.check(&ip(i));
        }
        let after = rss_kib();
        println!(
            "rate limiter with {keys} keys: {} keys tracked, about {} KiB ({} bytes per key)",
            limiter.len(),
            after.saturating_sub(before),
            after.saturating_sub(before) * 1024 / u64::from(keys.max(1))
        );
        let mut i = 0u32;
        group.bench_with_input(BenchmarkId::new("keys", keys), &keys, |b, &keys| {
            b.iter(|| {
                i = (i + 7919) % keys;
                black_box(limiter.check(&ip(i)))
            })
        });
    }
    group.finish();
}

fn acl_lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("acl_contains");
    for n in [10u32, 10_000] {
        let nets: Vec<IpNet> = (0..n)
            .filter_map(|i| {
                IpNet::new(
                    IpAddr::from((i.wrapping_mul(2_654_435_761)).to_be_bytes()),
                    24,
                )
                .ok()
            })
            .map(|net| net.trunc())
            .collect();
        let set = CidrSet::new(&nets);
        let mut probe = 0u32;
        group.bench_with_input(BenchmarkId::new("cidrs", n), &n, |b, _| {
            b.iter(|| {
                probe = probe.wrapping_add(0x9e37_79b9);
                black_box(set.contains(IpAddr::from(probe.to_be_bytes())))
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = limiter_checks, acl_lookups
}
criterion_main!(benches);
