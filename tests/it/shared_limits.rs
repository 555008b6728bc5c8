//! `store = "redis"`: one rate limit shared by several palisade instances, through a real
//! `redis-server` started on an ephemeral port; and the fallback to the local limit while
//! Redis is gone.

use crate::common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// A `redis-server` on 127.0.0.1:`port`, without persistence, killed when dropped.
struct Redis {
    child: Child,
}

impl Redis {
    async fn start(port: u16) -> Redis {
        Self::start_with(port, &[]).await
    }

    /// With more `redis-server` arguments.
    async fn start_with(port: u16, extra: &[&str]) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(extra)
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): `apt-get install -y redis-server` (.ci/run does)")
            });
        wait_listening(SocketAddr::from(([127, 0, 0, 1], port))).await;
        Redis { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(backend: SocketAddr, redis_port: u16) -> String {
    format!(
        r#"
[[routes]]
name = "shared"
upstream = "app"

[routes.rate_limit]
requests_per_second = 0.01
burst = 3
key = "header:x-api-key"
store = "redis"
redis_url = "redis://127.0.0.1:{redis_port}"

[upstreams.app]
backends = [{{ addr = "{backend}" }}]
"#
    )
}

async fn status(proxy: &Proxy, key: &str) -> u16 {
    get_with(&proxy.url("/"), &[("x-api-key", key)])
        .await
        .status
}

/// The value of the metric line starting with `series`, if any.
async fn metric(proxy: &Proxy, series: &str) -> Option<f64> {
    let text = get(&proxy.admin_url("/metrics")).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
}

async fn store_up(proxy: &Proxy) -> Option<f64> {
    metric(proxy, "palisade_rate_limit_store_up{route=\"shared\"}").await
}

async fn wait_store(proxy: &Proxy, up: f64) {
    let reached = eventually(Duration::from_secs(15), async || {
        store_up(proxy).await == Some(up)
    })
    .await;
    assert!(
        reached,
        "palisade_rate_limit_store_up never became {up}: {:?}",
        store_up(proxy).await
    );
}

#[tokio::test]
async fn two_instances_enforce_one_limit_not_two() {
    let port = free_port();
    let _redis = Redis::start(port).await;
    let backend = Echo::start("a").await;
    let a = Proxy::start(&config(backend.addr, port)).await;
    let b = Proxy::start(&config(backend.addr, port)).await;
    wait_store(&a, 1.0).await;
    wait_store(&b, 1.0).await;

    // Burst 3 between both instances: a, b, a pass; then neither lets the key through.
    assert_eq!(status(&a, "k1").await, 200);
    assert_eq!(status(&b, "k1").await, 200);
    assert_eq!(status(&a, "k1").await, 200);
    let refused = get_with(&b.url("/"), &[("x-api-key", "k1")]).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    let retry_after: u64 = refused
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    // 0.01 requests per second: the next token is 100 s away.
    assert!(
        (99..=100).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    assert_eq!(status(&a, "k1").await, 429);
    // Another key has its own bucket.
    assert_eq!(status(&b, "k2").await, 200);
    // Every decision went through Redis.
    assert_eq!(
        metric(&a, "palisade_rate_limit_fallbacks_total{route=\"shared\"}").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn without_redis_each_instance_limits_locally_and_shares_again_once_it_is_back() {
    let port = free_port();
    let mut redis = Redis::start(port).await;
    let backend = Echo::start("a").await;
    let a = Proxy::start(&config(backend.addr, port)).await;
    let b = Proxy::start(&config(backend.addr, port)).await;
    wait_store(&a, 1.0).await;
    wait_store(&b, 1.0).await;
    assert_eq!(status(&a, "before").await, 200);

    redis.kill();
    // Falls back to the local limit: never unlimited. Each instance has its own burst of 3
    // for the key now, so together they let 6 through, not 3 and not all.
    let mut passed = 0;
    for _ in 0..5 {
        for proxy in [&a, &b] {
            match status(proxy, "down").await {
                200 => passed += 1,
                429 => {}
                other => panic!("unexpected status {other} while Redis is down"),
            }
        }
    }
    assert_eq!(passed, 6, "two local limits of burst 3 each");
    assert_eq!(store_up(&a).await, Some(0.0));
    assert_eq!(store_up(&b).await, Some(0.0));
    let fallbacks = metric(&a, "palisade_rate_limit_fallbacks_total{route=\"shared\"}")
        .await
        .unwrap_or(0.0);
    assert!(fallbacks >= 5.0, "fallbacks counted: {fallbacks}");

    // Redis comes back (empty): both instances reconnect and share one limit again.
    let _redis = Redis::start(port).await;
    wait_store(&a, 1.0).await;
    wait_store(&b, 1.0).await;
    assert_eq!(status(&a, "after").await, 200);
    assert_eq!(status(&b, "after").await, 200);
    assert_eq!(status(&b, "after").await, 200);
    assert_eq!(status(&a, "after").await, 429);
    assert_eq!(status(&b, "after").await, 429);
}

#[tokio::test]
async fn a_redis_that_refuses_every_check_is_not_reconnected_to_on_every_request() {
    // Out of memory: Redis takes connections and loads the script, then refuses each
    // check. palisade reconnected at once after each refusal: a connection, a "store
    // unreachable" and a "store is back" line per request, and the store shown up.
    let port = free_port();
    let _redis = Redis::start_with(
        port,
        &["--maxmemory", "1", "--maxmemory-policy", "noeviction"],
    )
    .await;
    let backend = Echo::start("a").await;
    let proxy = Proxy::start(&config(backend.addr, port)).await;
    let connections = || {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "info", "stats"])
            .output()
            .expect("redis-cli (comes with redis-server)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = connections();
    // Still limited, locally: burst 3 per instance. A Redis that refuses the checks is
    // never shown up (reconnects used to show it up until the next check failed).
    let mut passed = 0;
    let mut shown_up = 0;
    for _ in 0..60 {
        if status(&proxy, "k").await == 200 {
            passed += 1;
        }
        if store_up(&proxy).await == Some(1.0) {
            shown_up += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(passed, 3, "not limited locally");
    assert_eq!(shown_up, 0, "the refusing store was shown up");
    let made = connections() - before;
    assert!(
        made <= 20,
        "{made} connections to Redis for 60 refused checks"
    );
}

#[tokio::test]
async fn a_redis_that_never_answers_still_limits_per_instance() {
    // Nothing listens on this port: the route starts on its local limit.
    let port = free_port();
    let backend = Echo::start("a").await;
    let a = Proxy::start(&config(backend.addr, port)).await;
    for _ in 0..3 {
        assert_eq!(status(&a, "k").await, 200);
    }
    assert_eq!(status(&a, "k").await, 429);
    assert_eq!(store_up(&a).await, Some(0.0));
}
