//! Each balancer's pick at 3 and 1,000 backends (nothing skipped), and the hash of a
//! 16-byte key. Picks must stay O(1) or O(log n), except least_conn's scan.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use palisade::balance::{self, Algorithm};
use palisade::upstream::Backend;

fn pool(n: usize) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            let b = Backend::new(
                &format!("10.{}.{}.{}:80", i >> 16, (i >> 8) & 255, i & 255),
                1 + (i % 3) as u32,
            );
            b.ewma_ns.store(
                1_000_000 + i as u64 * 1000,
                std::sync::atomic::Ordering::Relaxed,
            );
            Arc::new(b)
        })
        .collect()
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("balance_pick");
    let algorithms = [
        ("round_robin", Algorithm::RoundRobin),
        ("weighted", Algorithm::Weighted),
        ("least_conn", Algorithm::LeastConn),
        ("p2c_ewma", Algorithm::P2cEwma),
        ("random", Algorithm::Random),
        ("consistent_hash", Algorithm::ConsistentHash),
    ];
    for n in [3usize, 1000] {
        let backends = pool(n);
        for (name, algorithm) in algorithms {
            let balancer = balance::build(algorithm, &backends);
            let mut key = 0u64;
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    black_box(balancer.pick(&backends, key, &|_| false))
                })
            });
        }
    }
    group.finish();
    c.bench_function("hash_key_16_bytes", |b| {
        let key = *b"203.0.113.77:443";
        b.iter(|| black_box(balance::hash_key(black_box(&key))))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = picks
}
criterion_main!(benches);
