//! The core proxy over real sockets: routing, balancing, forwarding headers, streaming,
//! WebSocket tunnelling, HTTP/2 and palisade's own error answers.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};

/// Echo backends `a`, `b` and `c` with these weights behind one upstream (`extra`: more
/// lines of its table, e.g. its balance), and the proxy in front.
async fn three_behind(weights: [u32; 3], extra: &str) -> ([Echo; 3], Proxy) {
    let echoes = [
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    ];
    let backends: Vec<_> = echoes
        .iter()
        .zip(weights)
        .map(|(e, w)| (e.addr, w))
        .collect();
    let proxy = Proxy::start(&single_upstream(&backends, extra)).await;
    (echoes, proxy)
}

#[tokio::test]
async fn round_robin_spreads_six_requests_two_per_backend() {
    let (_echoes, proxy) = three_behind([1, 1, 1], "").await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..6 {
        let answer = get(&proxy.url("/")).await;
        assert_eq!(answer.status, 200);
        let backend = answer.backend();
        *seen.entry(backend).or_default() += 1;
    }
    assert_eq!(
        seen,
        HashMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 2)])
    );
}

#[tokio::test]
async fn weighted_balancing_follows_the_weights_through_the_proxy() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let cfg = single_upstream(&[(a.addr, 3), (b.addr, 1)], r#"balance = "weighted""#);
    let proxy = Proxy::start(&cfg).await;
    let mut count_a = 0;
    for _ in 0..40 {
        if get(&proxy.url("/")).await.json()["backend"] == "a" {
            count_a += 1;
        }
    }
    assert_eq!(count_a, 30);
}

/// The audit's least_conn tie: under light load every pick is a tie (nothing in flight),
/// and ties ignored the weights: 3 and 1 went 20:20. nginx breaks ties by weight: 30:10.
#[tokio::test]
async fn least_conn_ties_follow_the_weights_under_light_load() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let cfg = single_upstream(&[(a.addr, 3), (b.addr, 1)], r#"balance = "least_conn""#);
    let proxy = Proxy::start(&cfg).await;
    let mut count_a = 0;
    for _ in 0..40 {
        if get(&proxy.url("/")).await.backend() == "a" {
            count_a += 1;
        }
    }
    assert_eq!(count_a, 30);
}

/// The audit's least_conn rotation: with one backend busy on a long request, its turns
/// among the tied went to its successor (b2 b3 b2 b2 b3 b2, 20:10); they are shared evenly.
#[tokio::test]
async fn least_conn_shares_a_busy_backends_turns_evenly() {
    let (_echoes, proxy) = three_behind([1, 1, 1], r#"balance = "least_conn""#).await;
    let long_url = proxy.url("/delay/2000");
    let long = tokio::spawn(async move { get(&long_url).await });
    let busy = eventually(Duration::from_secs(3), async || {
        let status = get(&proxy.admin_url("/status")).await.json();
        status["upstreams"]["app"]["backends"]
            .as_array()
            .is_some_and(|list| list.iter().any(|b| b["in_flight"] == 1))
    })
    .await;
    assert!(busy, "the long request never started");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        *seen
            .entry(get(&proxy.url("/")).await.backend())
            .or_default() += 1;
    }
    let long = long.await.expect("the long request").backend();
    assert_eq!(seen.get(&long), None, "{seen:?}");
    let mut shares: Vec<usize> = seen.values().copied().collect();
    shares.sort_unstable();
    assert_eq!(shares, [15, 15], "{seen:?} with {long} busy");
}

/// The audit's random case: with a heavy backend down, its share went to the backend
/// after it (weights 50,1,1 with the 50 down: about 63:37); the rest share by weight.
#[tokio::test]
async fn random_splits_a_down_backends_share_by_weight() {
    let ([a, _b, _c], proxy) = three_behind([50, 1, 1], "balance = \"random\"\n[upstreams.app.health]\ninterval = \"100ms\"\ntimeout = \"50ms\"\nunhealthy_threshold = 1").await;
    let answer = post(&format!("http://{}/health/down", a.addr), vec![]).await;
    assert_eq!(answer.status, 200);
    let down = eventually(Duration::from_secs(3), async || {
        !proxy.state.snapshot().upstreams[0].backends[0].is_healthy()
    })
    .await;
    assert!(down, "backend a never left rotation");
    let mut seen: HashMap<String, i64> = HashMap::new();
    for _ in 0..600 {
        *seen
            .entry(get(&proxy.url("/")).await.backend())
            .or_default() += 1;
    }
    let (to_b, to_c) = (seen.get("b").copied(), seen.get("c").copied());
    let (to_b, to_c) = (to_b.unwrap_or(0), to_c.unwrap_or(0));
    assert_eq!(to_b + to_c, 600, "{seen:?}");
    // 1:1 expected; 90 is over 3.5 standard deviations of the difference.
    assert!((to_b - to_c).abs() <= 90, "{seen:?}");
}

/// `ewma_ms` and `requests` of the backend at `addr` of upstream `app`, from `/status`.
async fn backend_status(proxy: &Proxy, addr: std::net::SocketAddr) -> (f64, u64) {
    let status = get(&proxy.admin_url("/status")).await.json();
    let addr = addr.to_string();
    status["upstreams"]["app"]["backends"]
        .as_array()
        .and_then(|list| list.iter().find(|b| b["addr"] == addr.as_str()))
        .map(|b| {
            (
                b["ewma_ms"].as_f64().unwrap_or(f64::NAN),
                b["requests"].as_u64().unwrap_or(0),
            )
        })
        .unwrap_or_else(|| panic!("{addr} not in /status: {status}"))
}

/// The audit's p2c_ewma starvation: the latency estimate moved only on answers, so a
/// backend with one slow answer lost every comparison, never answered again and kept its
/// estimate for good. Now the estimate is a peak EWMA that decays with time, so it falls
/// while the backend gets no traffic (and it is tried again once below the others').
#[tokio::test]
async fn p2c_ewma_lets_a_slow_answer_fade_while_the_backend_gets_no_traffic() {
    let ([a, b, c], proxy) = three_behind([1, 1, 1], r#"balance = "p2c_ewma""#).await;
    // Every backend sampled first, so none is costed as "as fast as its rival".
    for _ in 0..30 {
        assert_eq!(get(&proxy.url("/")).await.status, 200);
    }
    let slow = match get(&proxy.url("/delay/500")).await.backend().as_str() {
        "a" => a.addr,
        "b" => b.addr,
        _ => c.addr,
    };
    let (peak, requests) = backend_status(&proxy, slow).await;
    assert!(
        peak >= 400.0,
        "a 500 ms answer left the estimate at {peak} ms"
    );
    let faded = eventually(Duration::from_secs(10), async || {
        for _ in 0..10 {
            assert_eq!(get(&proxy.url("/")).await.status, 200);
        }
        backend_status(&proxy, slow).await.0 < peak * 0.8
    })
    .await;
    let (now, requests_now) = backend_status(&proxy, slow).await;
    assert!(faded, "estimate stuck: {peak} ms, then {now} ms");
    // The fall is the decay, not new answers: the others kept winning meanwhile.
    assert_eq!(requests_now, requests);
}

#[tokio::test]
async fn consistent_hash_on_a_header_sticks_to_one_backend() {
    let (_echoes, proxy) = three_behind(
        [1, 1, 1],
        "balance = \"consistent_hash\"\nhash_key = \"header:x-user\"",
    )
    .await;
    let mut owners = HashMap::new();
    for user in 0..20 {
        let user = format!("user-{user}");
        let first = get_with(&proxy.url("/"), &[("x-user", &user)]).await.json()["backend"].clone();
        for _ in 0..3 {
            let again =
                get_with(&proxy.url("/"), &[("x-user", &user)]).await.json()["backend"].clone();
            assert_eq!(first, again, "{user} moved");
        }
        owners.insert(user, first);
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert!(
        distinct.len() >= 2,
        "20 users all hashed to one backend: {owners:?}"
    );
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_headers_dropped() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&single_upstream(&[(a.addr, 1)], "")).await;
    let answer = get_with(
        &proxy.url("/headers?q=1"),
        &[
            ("host", "shop.example.com"),
            ("x-forwarded-for", "203.0.113.9"),
            // Claims palisade replaces, never passes on beside its own.
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "spoofed.example"),
            ("via", "1.1 edge"),
            ("connection", "keep-alive, x-drop-me"),
            ("x-drop-me", "secret"),
            ("keep-alive", "timeout=5"),
            // Dropped toward an HTTP/1.1 backend, even `trailers` (SPEC 3).
            ("te", "trailers"),
            ("x-kept", "yes"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200);
    let json = answer.json();
    let h = &json["headers"];
    assert_eq!(json["path"], "/headers?q=1");
    assert_eq!(h["host"], "shop.example.com");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example.com");
    // Via is a list: the client's hops, then ours.
    assert_eq!(h["via"], "1.1 edge, 1.1 palisade");
    assert_eq!(h["x-kept"], "yes");
    assert!(h.get("x-drop-me").is_none(), "{h}");
    assert!(h.get("keep-alive").is_none(), "{h}");
    assert!(h.get("te").is_none(), "{h}");
    let id = h["x-request-id"].as_str().unwrap_or_default();
    assert_eq!(id.len(), 32, "generated request id: {id:?}");

    let kept = get_with(&proxy.url("/"), &[("x-request-id", "req-42")])
        .await
        .json();
    assert_eq!(kept["headers"]["x-request-id"], "req-42");
    let replaced = get_with(&proxy.url("/"), &[("x-request-id", "bad id!")])
        .await
        .json();
    assert_ne!(replaced["headers"]["x-request-id"], "bad id!");
    assert_eq!(
        replaced["headers"]["x-request-id"].as_str().map(str::len),
        Some(32),
        "the invalid id was passed on beside the new one"
    );
}

#[tokio::test]
async fn routes_match_host_and_prefix_in_file_order_and_strip_prefix() {
    let (api, web, wild) = (
        Echo::start("api").await,
        Echo::start("web").await,
        Echo::start("wild").await,
    );
    let cfg = format!(
        r#"
[[routes]]
name = "api"
host = "api.example.com"
path_prefix = "/v1"
strip_prefix = true
upstream = "api"

[[routes]]
name = "wild"
host = "*.example.com"
upstream = "wild"

[[routes]]
name = "web"
path_prefix = "/site"
upstream = "web"

[upstreams.api]
backends = [{{ addr = "{}" }}]
[upstreams.web]
backends = [{{ addr = "{}" }}]
[upstreams.wild]
backends = [{{ addr = "{}" }}]
"#,
        api.addr, web.addr, wild.addr
    );
    let proxy = Proxy::start(&cfg).await;

    let a = get_with(
        &proxy.url("/v1/users?id=7"),
        &[("host", "API.example.com:8080")],
    )
    .await
    .json();
    assert_eq!(
        (a["backend"].as_str(), a["path"].as_str()),
        (Some("api"), Some("/users?id=7"))
    );
    let w = get_with(&proxy.url("/v1/x"), &[("host", "www.example.com")])
        .await
        .json();
    assert_eq!(w["backend"], "wild");
    let s = get_with(&proxy.url("/site/page"), &[("host", "other.org")])
        .await
        .json();
    assert_eq!(
        (s["backend"].as_str(), s["path"].as_str()),
        (Some("web"), Some("/site/page"))
    );

    let miss = get_with(&proxy.url("/nothing"), &[("host", "other.org")]).await;
    assert_eq!(miss.status, 404);
    assert_eq!(
        miss.header("proxy-status"),
        Some("palisade; error=destination_not_found")
    );
}

#[tokio::test]
async fn a_dead_backend_gives_502_connection_refused() {
    let port = free_port();
    let cfg = single_upstream(
        &[(format!("127.0.0.1:{port}").parse().expect("addr"), 1)],
        "",
    );
    let proxy = Proxy::start(&cfg).await;
    let answer = get(&proxy.url("/")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(
        answer.header("proxy-status"),
        Some("palisade; error=connection_refused")
    );
    assert!(!answer.text().is_empty());
}

#[tokio::test]
async fn a_backend_that_closes_without_answering_gives_502_connection_terminated() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let rude = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let proxy = Proxy::start(&single_upstream(&[(addr, 1)], "")).await;
    let answer = get(&proxy.url("/")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(
        answer.header("proxy-status"),
        Some("palisade; error=connection_terminated")
    );
    rude.abort();
}

#[tokio::test]
async fn a_slow_backend_gives_504_after_the_response_timeout() {
    let a = Echo::start("slow").await;
    let cfg = single_upstream(
        &[(a.addr, 1)],
        "[upstreams.app.timeouts]\nresponse = \"300ms\"",
    );
    let proxy = Proxy::start(&cfg).await;
    let started = Instant::now();
    let answer = get(&proxy.url("/delay/3000")).await;
    assert_eq!(answer.status, 504);
    assert_eq!(
        answer.header("proxy-status"),
        Some("palisade; error=http_response_timeout")
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // A fast answer on the same upstream still passes.
    assert_eq!(get(&proxy.url("/delay/10")).await.status, 200);
}

#[tokio::test]
async fn the_response_timeout_counts_from_each_request_on_a_kept_connection() {
    // A pooled connection keeps one timer and moves its deadline on for each request.
    let a = Echo::start("kept").await;
    let cfg = single_upstream(
        &[(a.addr, 1)],
        "[upstreams.app.timeouts]\nresponse = \"400ms\"",
    );
    let proxy = Proxy::start(&cfg).await;
    // One after another on the pooled connection: together far past the timeout, each
    // well within it.
    for _ in 0..6 {
        assert_eq!(get(&proxy.url("/delay/150")).await.status, 200);
    }
    // Idle past the last request's deadline: its timer fires with no request waiting.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get(&proxy.url("/delay/10")).await.status, 200);
    // And the next slow answer is still cut at the timeout.
    let started = Instant::now();
    let answer = get(&proxy.url("/delay/3000")).await;
    assert_eq!(answer.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(get(&proxy.url("/delay/10")).await.status, 200);
}

/// A backend that never completes a connection: its listener's accept queue (backlog 0)
/// is full, so the kernel drops further SYNs and connecting to it hangs. The listener and
/// the connection filling its queue must live as long as the test.
fn unanswering_backend() -> (tokio::net::TcpListener, std::net::TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let filler = std::net::TcpStream::connect(addr).expect("fill the accept queue");
    (listener, filler)
}

/// Asks once through a proxy whose only backend never completes a connection, with the
/// given connect and response timeouts and no retries: the answer must be `status` with
/// `error` in Proxy-Status, well before the longer of the two timeouts (10 s).
async fn ask_an_unanswering_backend(connect: &str, response: &str, status: u16, error: &str) {
    let (listener, _filler) = unanswering_backend();
    let addr = listener.local_addr().expect("addr");
    let cfg = single_upstream(
        &[(addr, 1)],
        &format!(
            "[upstreams.app.timeouts]\nconnect = \"{connect}\"\nresponse = \"{response}\"\n\
             [upstreams.app.retry]\nattempts = 0"
        ),
    );
    let proxy = Proxy::start(&cfg).await;
    let started = Instant::now();
    let answer = get(&proxy.url("/")).await;
    assert_eq!(answer.status, status);
    assert_eq!(
        answer.header("proxy-status"),
        Some(format!("palisade; error={error}").as_str())
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_backend_that_never_accepts_gives_502_after_the_connect_timeout() {
    ask_an_unanswering_backend("300ms", "10s", 502, "connection_timeout").await;
}

#[tokio::test]
async fn the_response_timeout_also_bounds_connecting() {
    // The response deadline runs from the attempt's start, connecting included: when it
    // comes before the connect timeout, the answer is the response timeout's 504.
    ask_an_unanswering_backend("10s", "300ms", 504, "http_response_timeout").await;
}

#[tokio::test]
async fn the_response_timeout_bounds_sending_a_body_the_backend_never_reads() {
    // The backend accepts and then reads nothing (a small receive buffer), while the client
    // streams a body far larger than every socket buffer between them: the proxy stays
    // stuck writing until the response deadline, which must end the attempt as it ends
    // waiting for a head.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(16).expect("listen");
    let backend = listener.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            kept.push(stream);
        }
    });
    let cfg = single_upstream(
        &[(backend, 1)],
        "[upstreams.app.timeouts]\nresponse = \"400ms\"\n[upstreams.app.retry]\nattempts = 0\n\
         [server.limits]\nmax_body_bytes = 0",
    );
    let proxy = Proxy::start(&cfg).await;
    let addr = proxy.addr;
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        let total: usize = 256 << 20;
        let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {total}\r\n\r\n");
        client.write_all(head.as_bytes()).expect("head");
        let mut writer = client.try_clone().expect("clone");
        // Streams until the proxy stops taking it (it answers, then closes) or all is sent.
        let feeder = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0;
            while sent < total && writer.write_all(&chunk).is_ok() {
                sent += chunk.len();
            }
            sent
        });
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let started = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let waited = started.elapsed();
        let _ = client.shutdown(std::net::Shutdown::Both);
        let sent = feeder.join().expect("feeder");
        (
            String::from_utf8_lossy(&got).into_owned(),
            waited,
            sent,
            total,
        )
    })
    .await
    .expect("client");
    let (head, waited, sent, total) = answer;
    assert!(
        head.starts_with("HTTP/1.1 504 "),
        "got {head:?} after {waited:?}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("proxy-status: palisade; error=http_response_timeout"),
        "{head}"
    );
    assert!(waited < Duration::from_secs(3), "took {waited:?}");
    assert!(
        sent < total,
        "the body was not stuck: all {sent} bytes went"
    );
    held.abort();
}

/// Sends a POST of `total` bytes to `addr` in `piece`-byte writes `gap` apart, stopping
/// after `stop_after` bytes (then waiting for the answer without sending the rest);
/// returns the answer's head and body, and how long after the last write it came.
fn upload(
    addr: std::net::SocketAddr,
    total: usize,
    piece: usize,
    gap: Duration,
    stop_after: usize,
) -> (String, Duration) {
    use std::io::{Read, Write};
    let mut client = std::net::TcpStream::connect(addr).expect("connect");
    let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {total}\r\n\r\n");
    client.write_all(head.as_bytes()).expect("head");
    let mut sent = 0;
    while sent < stop_after.min(total) {
        let n = piece.min(total - sent);
        client.write_all(&vec![b'u'; n]).expect("body");
        sent += n;
        std::thread::sleep(gap);
    }
    let last_write = Instant::now();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&got);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|n| got.len() >= end + 4 + n) {
                break;
            }
        }
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        last_write.elapsed(),
    )
}

#[tokio::test]
async fn an_upload_slower_than_the_response_timeout_is_not_cut_short() {
    // The response timeout is the backend's time to answer: it runs from the end of the
    // request body, not while the client is still sending it. A 192 KiB upload over
    // about 1.8 s, behind a 400 ms response timeout, is answered by the backend.
    let a = Echo::start("a").await;
    let cfg = single_upstream(
        &[(a.addr, 1)],
        "[upstreams.app.timeouts]\nresponse = \"400ms\"\n[upstreams.app.retry]\nattempts = 0",
    );
    let proxy = Proxy::start(&cfg).await;
    let addr = proxy.addr;
    let total = 192 * 1024;
    let (answer, _) = tokio::task::spawn_blocking(move || {
        upload(addr, total, 16 * 1024, Duration::from_millis(150), total)
    })
    .await
    .expect("client");
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(
        answer.contains(&format!("\"body_bytes\":{total}")),
        "{answer}"
    );
}

#[tokio::test]
async fn a_client_that_pauses_its_upload_gets_408_and_the_backend_no_strike() {
    // The client stops sending its streamed body: that is the client's doing, bounded by
    // server.timeouts.idle (408), not a backend failure (504, a passive-health strike).
    let a = Echo::start("a").await;
    let cfg = single_upstream(
        &[(a.addr, 1)],
        "[upstreams.app.timeouts]\nresponse = \"5s\"\n[upstreams.app.retry]\nattempts = 0\n\
         [upstreams.app.passive]\nconsecutive_failures = 1\nejection = \"30s\"\n\
         [server.timeouts]\nidle = \"700ms\"",
    );
    let proxy = Proxy::start(&cfg).await;
    let addr = proxy.addr;
    let (answer, waited) = tokio::task::spawn_blocking(move || {
        upload(addr, 100_000, 10, Duration::from_millis(10), 10)
    })
    .await
    .expect("client");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(waited < Duration::from_secs(4), "took {waited:?}");
    let status = get(&proxy.admin_url("/status")).await.json();
    let backend = &status["upstreams"]["app"]["backends"][0];
    assert_eq!(backend["failures"], 0, "{status}");
    assert_eq!(backend["ejected"], false, "{status}");
    assert_eq!(get(&proxy.url("/")).await.status, 200);
}

#[tokio::test]
async fn backend_statuses_and_bodies_pass_through() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&single_upstream(&[(a.addr, 1)], "")).await;
    let answer = get(&proxy.url("/status/503")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(
        answer.header("proxy-status"),
        None,
        "a backend's error is not palisade's"
    );
    let bytes = get(&proxy.url("/bytes/300000")).await;
    assert_eq!(bytes.body.len(), 300_000);

    let post = send(
        http::Request::post(proxy.url("/upload"))
            .body(Full::new(Bytes::from(vec![7u8; 12345])))
            .expect("request"),
    )
    .await;
    assert_eq!(post.json()["body_bytes"], 12345);
    assert_eq!(post.json()["method"], "POST");
}

#[tokio::test]
async fn responses_stream_chunk_by_chunk() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&single_upstream(&[(a.addr, 1)], "")).await;
    let resp = client()
        .request(
            http::Request::get(proxy.url("/stream/5"))
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("response");
    let started = Instant::now();
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    let first_at = started.elapsed();
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    let mut chunks = 1;
    while let Some(frame) = body.frame().await {
        if frame.expect("frame").data_ref().is_some() {
            chunks += 1;
        }
    }
    let total = started.elapsed();
    assert!(chunks >= 2, "the stream came in one piece");
    // The first chunk arrived well before the whole stream (5 chunks, 100 ms apart).
    assert!(
        first_at + Duration::from_millis(250) < total,
        "first {first_at:?}, total {total:?}"
    );
}

#[tokio::test]
async fn requests_over_the_body_limit_get_413() {
    let a = Echo::start("a").await;
    let cfg = format!(
        "[server.limits]\nmax_body_bytes = 1000\n{}",
        single_upstream(&[(a.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;
    let declared = send(
        http::Request::post(proxy.url("/"))
            .body(Full::new(Bytes::from(vec![0u8; 1001])))
            .expect("request"),
    )
    .await;
    assert_eq!(declared.status, 413);
    assert_eq!(
        declared.header("proxy-status"),
        Some("palisade; error=http_request_error")
    );

    // Chunked: no length up front, so the limit is enforced while streaming.
    let mut raw = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        raw.extend_from_slice(b"1f4\r\n");
        raw.extend_from_slice(&[b'z'; 500]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let (text, _) = raw_exchange(proxy.addr, &raw, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    let ok = send(
        http::Request::post(proxy.url("/"))
            .body(Full::new(Bytes::from(vec![0u8; 1000])))
            .expect("request"),
    )
    .await;
    assert_eq!(ok.json()["body_bytes"], 1000);
}

#[tokio::test]
async fn h2c_prior_knowledge_clients_are_served() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&single_upstream(&[(a.addr, 1)], "")).await;
    let client = h2_client();
    let resp = client
        .request(
            http::Request::get(proxy.url("/h2?x=1"))
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("h2 response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["path"], "/h2?x=1");
    assert_eq!(
        json["headers"]["via"], "1.1 palisade",
        "SPEC 3's exact value"
    );
    // HTTP/2 carries the host in :authority; the backend still gets a Host header.
    assert_eq!(json["headers"]["host"], proxy.addr.to_string());
}

#[tokio::test]
async fn websocket_upgrades_are_tunnelled_both_ways() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&single_upstream(&[(a.addr, 1)], "")).await;
    let mut ws = ws_connect(&proxy).await;
    for text in ["hello", "through", "palisade"] {
        ws_echo(&mut ws, text).await;
    }
    ws.close(None).await.expect("close");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket connection to the echo behind `proxy`.
async fn ws_connect(proxy: &Proxy) -> Ws {
    let url = format!("ws://{}/ws", proxy.addr);
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends `text` and expects it back: the tunnel is open both ways.
async fn ws_echo(ws: &mut Ws, text: &str) {
    ws.send(tokio_tungstenite::tungstenite::Message::text(text))
        .await
        .expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("a message")
        .expect("ok message");
    assert_eq!(echoed.into_text().expect("text").as_str(), text);
}

/// A tunnel was a task of its own, outside the connection: not in connections_active, not
/// under max_connections, and a drain did not wait for it (SIGTERM cut it at once).
#[tokio::test]
async fn a_websocket_tunnel_is_a_connection_max_connections_counts_and_a_drain_waits_for() {
    let a = Echo::start("a").await;
    let cfg = format!(
        "[server.limits]\nmax_connections = 1\n[server.timeouts]\nshutdown = \"8s\"\n{}",
        single_upstream(&[(a.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;
    let mut ws = ws_connect(&proxy).await;
    ws_echo(&mut ws, "open").await;
    let state = proxy.state.clone();
    let count = || state.connections.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(count(), 1, "the tunnel's connection is not counted");
    // The one slot is the tunnel's, and a tunnel is never evicted as idle.
    let (text, closed) = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(closed && text.is_empty(), "served over the cap: {text}");
    ws_echo(&mut ws, "still open").await;

    // A drain waits for the tunnel, which keeps working meanwhile.
    let draining = tokio::spawn(proxy.shutdown());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !draining.is_finished(),
        "the drain did not wait for the tunnel"
    );
    ws_echo(&mut ws, "during the drain").await;
    ws.close(None).await.expect("close");
    tokio::time::timeout(Duration::from_secs(5), draining)
        .await
        .expect("the drain ends once the tunnel closes")
        .expect("drain task");
    assert_eq!(count(), 0);
}

/// Tunnels had no timeout at all; now `idle` with no byte either way closes one (nginx's
/// proxy_read_timeout), and one that carries bytes lives on.
#[tokio::test]
async fn a_websocket_tunnel_closes_after_idle_with_no_bytes_and_lives_while_bytes_flow() {
    let a = Echo::start("a").await;
    let cfg = format!(
        "[server.timeouts]\nidle = \"1s\"\nheader_read = \"500ms\"\n{}",
        single_upstream(&[(a.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;
    let mut ws = ws_connect(&proxy).await;
    // Busy for 3 x idle: never cut (nor by header_read, though the client keeps sending).
    for i in 0..12 {
        ws_echo(&mut ws, &format!("message {i}")).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Quiet: closed after about `idle`.
    let quiet = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an idle tunnel was never closed");
    assert!(
        !matches!(
            end,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_)))
        ),
        "{end:?}"
    );
    let lived = quiet.elapsed();
    assert!(
        lived >= Duration::from_millis(700),
        "closed after {lived:?}"
    );
    assert!(
        eventually(Duration::from_secs(3), async || proxy
            .state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0)
        .await
    );
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off_by_header_read() {
    let a = Echo::start("a").await;
    let cfg = format!(
        "[server.timeouts]\nheader_read = \"300ms\"\n{}",
        single_upstream(&[(a.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;
    let started = Instant::now();
    // Half a request head, never finished.
    let (_, closed) = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(closed, "slow head not cut off");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_close_after_idle_but_not_before() {
    let a = Echo::start("a").await;
    let cfg = format!(
        "[server.timeouts]\nheader_read = \"200ms\"\nidle = \"1s\"\n{}",
        single_upstream(&[(a.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;
    let started = Instant::now();
    let (text, closed) = raw_exchange(
        proxy.addr,
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(closed, "idle connection never closed");
    let lived = started.elapsed();
    // Kept open past header_read (200 ms) while idle, closed around idle (1 s).
    assert!(
        lived >= Duration::from_millis(900),
        "closed after {lived:?}"
    );
    assert!(lived < Duration::from_secs(4), "closed after {lived:?}");
}

/// hyper's own header-read timer (30 s unless told otherwise) also ran on idle
/// keep-alive connections and closed them at 30 s, whatever `idle` said (60 s by default).
#[tokio::test]
async fn idle_keep_alive_lasts_as_configured_past_hypers_own_30_s_timer() {
    let a = Echo::start("a").await;
    let cfg = format!(
        "[server.timeouts]\nidle = \"45s\"\n{}",
        single_upstream(&[(a.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;
    let mut conn = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let req = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut conn, req)
        .await
        .expect("write");
    assert!(read_head(&mut conn).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_secs(32)).await;
    tokio::io::AsyncWriteExt::write_all(&mut conn, req)
        .await
        .expect("write after 32 s idle");
    let again = read_head(&mut conn).await;
    assert!(
        again.starts_with("HTTP/1.1 200"),
        "after 32 s idle: {again}"
    );
}

#[tokio::test]
async fn oversized_request_heads_get_431() {
    let a = Echo::start("a").await;
    // 2,048 is the limit exactly (hyper's server could not go below 8 KiB).
    let cfg = format!(
        "[server.limits]\nmax_header_bytes = 2048\n{}",
        single_upstream(&[(a.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;
    for size in [3_000, 20_000] {
        let big = "x".repeat(size);
        let raw = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
        let (text, closed) = raw_exchange(proxy.addr, raw.as_bytes(), Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 431"), "{size}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("proxy-status: palisade; error=http_request_error"),
            "{size}: {text}"
        );
        assert!(closed, "{size}");
    }
    // Just under the limit is served.
    let fits = "x".repeat(1_500);
    let raw = format!("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-fits: {fits}\r\n\r\n");
    let (text, _) = raw_exchange(proxy.addr, raw.as_bytes(), Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&single_upstream(&[(a.addr, 1)], "")).await;
    let url = proxy.url("/delay/500");
    let slow = tokio::spawn(async move { get(&url).await.status });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let addr = proxy.addr;
    assert!(!proxy.state.is_draining());
    proxy.shutdown().await;
    assert_eq!(slow.await.expect("task"), 200, "in-flight request was cut");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after drain"
    );
}

#[tokio::test]
async fn at_max_connections_the_oldest_idle_connection_makes_room() {
    let a = Echo::start("a").await;
    let cfg = format!(
        "[server.limits]\nmax_connections = 2\n{}",
        single_upstream(&[(a.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;
    let count = || {
        proxy
            .state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut oldest = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("c1");
    assert!(eventually(Duration::from_secs(5), async || count() == 1).await);
    let _younger = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("c2");
    assert!(eventually(Duration::from_secs(5), async || count() == 2).await);
    // A third connection is served; the oldest idle one is closed for it.
    let (text, _) = raw_exchange(
        proxy.addr,
        b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut oldest, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the oldest idle connection was not closed"
    );
    // Counted as an eviction (the connections were idle: none was refused).
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert_eq!(
        sample(&metrics, "palisade_connections_evicted_total", &[]),
        Some(1.0),
        "{metrics}"
    );
    let listener = proxy.addr.to_string();
    let refused = [("listener", listener.as_str())];
    assert_eq!(
        sample(&metrics, "palisade_connections_refused_total", &refused),
        Some(0.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn at_max_connections_with_none_idle_a_new_connection_is_refused() {
    let a = Echo::start("a").await;
    let cfg = format!(
        "[server.limits]\nmax_connections = 2\n{}",
        single_upstream(&[(a.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let url = proxy.url("/delay/1500");
            tokio::spawn(async move { get(&url).await.status })
        })
        .collect();
    let count = || {
        proxy
            .state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(eventually(Duration::from_secs(5), async || count() == 2).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (text, closed) = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(closed && text.is_empty(), "served over the cap: {text}");
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    let listener = proxy.addr.to_string();
    assert_eq!(
        sample(
            &metrics,
            "palisade_connections_refused_total",
            &[("listener", &listener)]
        ),
        Some(1.0),
        "{metrics}"
    );
    for b in busy {
        assert_eq!(b.await.expect("busy"), 200, "a busy connection was evicted");
    }
}

#[tokio::test]
async fn http2_requests_get_the_same_forwarding_headers() {
    // HTTP/2 requests come through hyper, not palisade's HTTP/1.1 codec, so nothing says
    // in advance which headers they carry: the handler looks each one up.
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&single_upstream(&[(a.addr, 1)], "")).await;
    let client = h2_client();
    let ask = |headers: &[(&'static str, &'static str)]| {
        let mut req = http::Request::get(proxy.url("/headers"));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::default()).expect("request");
        let client = client.clone();
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                .await
                .expect("in time")
                .expect("response");
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body).expect("json")
        }
    };
    let json = ask(&[
        ("x-forwarded-for", "203.0.113.9"),
        ("x-request-id", "req-42"),
    ])
    .await;
    let h = &json["headers"];
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-request-id"], "req-42");
    assert_eq!(h["via"], "1.1 palisade", "SPEC 3's exact value");
    let json = ask(&[]).await;
    let h = &json["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-request-id"].as_str().map(str::len), Some(32));
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_closed_after_idle() {
    // A client that asks for a large answer and then reads none of it: once the socket
    // buffers between them are full, nothing moves. Its connection (and the backend
    // connection feeding it) must not be held for ever; nginx's send_timeout does this.
    let a = Echo::start("a").await;
    let cfg = single_upstream(&[(a.addr, 1)], "[server.timeouts]\nidle = \"1s\"");
    let proxy = Proxy::start(&cfg).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut client = socket.connect(proxy.addr).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut client,
        b"GET /bytes/100000000 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .expect("request");
    let open = || proxy.state.connections.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(2), async || open() == 1).await,
        "the connection never counted"
    );
    let closed = eventually(Duration::from_secs(8), async || open() == 0).await;
    assert!(closed, "a client reading nothing kept its connection");
    drop(client);
}

/// A backend that reads each request head, never answers, and reports how long after
/// the head its connection was closed by palisade (None: not within 10 s).
async fn silent_backend() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::Receiver<Option<Duration>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::io::AsyncReadExt::read(&mut conn, &mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = Instant::now();
                let closed = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::io::AsyncReadExt::read(&mut conn, &mut buf),
                )
                .await;
                let _ = tx
                    .send(matches!(closed, Ok(Ok(0) | Err(_))).then(|| head.elapsed()))
                    .await;
            });
        }
    });
    (addr, rx)
}

/// A client whose `request` has been waiting for its answer for 300 ms.
async fn waiting_client(proxy: std::net::SocketAddr, request: &[u8]) -> tokio::net::TcpStream {
    let mut client = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut client, request)
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
}

/// An HTTP/1.1 client that closed its connection while its request waited for the
/// backend went unnoticed until the response timeout (30 s by default): the backend kept
/// working for nobody and nothing was logged. Now, as nginx does, the request is dropped
/// at once (the backend's connection closed) and counted as 499; so is one whose client
/// only half-closes, and an HTTP/2 stream the client resets.
#[tokio::test]
async fn a_request_whose_client_leaves_is_dropped_at_once_and_counted_499() {
    let (backend, mut closed) = silent_backend().await;
    let cfg = single_upstream(&[(backend, 1)], "retry = { attempts = 0 }");
    let proxy = Proxy::start(&cfg).await;
    let request = b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n";
    let backend_closed = async |closed: &mut tokio::sync::mpsc::Receiver<Option<Duration>>| {
        let after = tokio::time::timeout(Duration::from_secs(12), closed.recv())
            .await
            .expect("the backend's connection ended")
            .expect("backend running");
        let after = after.expect("the backend's connection was never closed");
        assert!(
            after < Duration::from_secs(3),
            "closed {after:?} after the request"
        );
    };

    // The client closes its connection.
    let client = waiting_client(proxy.addr, request).await;
    drop(client);
    backend_closed(&mut closed).await;

    // The client stops sending but listens: it gets no answer, and the connection ends.
    let mut client = waiting_client(proxy.addr, request).await;
    tokio::io::AsyncWriteExt::shutdown(&mut client)
        .await
        .expect("shutdown");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut rest),
    )
    .await
    .expect("the connection ended in time");
    assert!(read.is_err() || rest.is_empty(), "{rest:?}");
    backend_closed(&mut closed).await;

    // An HTTP/2 client gives up on its request (hyper resets the stream).
    let h2 = h2_client();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        h2.request(
            http::Request::get(proxy.url("/slow"))
                .body(Full::new(Bytes::new()))
                .expect("request"),
        ),
    )
    .await;
    assert!(gave_up.is_err(), "answered: {gave_up:?}");
    backend_closed(&mut closed).await;

    let metrics = get(&format!("http://{}/metrics", proxy.admin)).await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("palisade_requests_total{")
                && l.contains("route=\"all\"")
                && l.contains("code=\"499\"")
                && l.ends_with(" 3")),
        "{metrics}"
    );
}
