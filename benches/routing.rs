//! Route matching cost as the table grows: 10 and 10,000 routes, looked up by exact host,
//! by wildcard host, and by path prefix among host-less routes (the worst case: a linear
//! walk of the host-less list).

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use palisade::route::RouteTable;

fn config_with(routes: usize) -> palisade::config::Config {
    let mut toml = String::new();
    for i in 0..routes {
        // A third exact hosts, a third wildcard hosts, a third host-less path prefixes.
        match i % 3 {
            0 => toml.push_str(&format!(
                "[[routes]]\nname = \"r{i}\"\nhost = \"host{i}.example.com\"\nupstream = \"app\"\n"
            )),
            1 => toml.push_str(&format!(
                "[[routes]]\nname = \"r{i}\"\nhost = \"*.zone{i}.example.org\"\nupstream = \"app\"\n"
            )),
            _ => toml.push_str(&format!(
                "[[routes]]\nname = \"r{i}\"\npath_prefix = \"/svc{i}/\"\nupstream = \"app\"\n"
            )),
        }
    }
    toml.push_str("[upstreams.app]\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n");
    match palisade::config::parse(&toml, Path::new("bench.toml")) {
        Ok(config) => config,
        Err(errors) => panic!("bench config invalid: {errors:?}"),
    }
}

fn route_matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_find");
    for n in [10usize, 10_000] {
        let config = config_with(n);
        let table = RouteTable::build(
            &config.routes,
            |_| Some(0),
            &palisade::metrics::Metrics::new(),
            |_| None,
        );
        let exact = format!("host{}.example.com", (n / 2) / 3 * 3);
        let wild = format!("api.zone{}.example.org", ((n / 2) / 3) * 3 + 1);
        let last_path = format!("/svc{}/items/42", (n - 1) / 3 * 3 + 2);
        group.bench_with_input(BenchmarkId::new("exact_host", n), &n, |b, _| {
            b.iter(|| black_box(table.find(Some(black_box(&exact)), "/x")))
        });
        group.bench_with_input(BenchmarkId::new("wildcard_host", n), &n, |b, _| {
            b.iter(|| black_box(table.find(Some(black_box(&wild)), "/x")))
        });
        group.bench_with_input(BenchmarkId::new("last_path_prefix", n), &n, |b, _| {
            b.iter(|| black_box(table.find(Some("other.net"), black_box(&last_path))))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = route_matching
}
criterion_main!(benches);
