//! Client protection over raw sockets: malformed requests are refused and the connection
//! closed before any backend sees them; allow/deny lists, trusted proxies and rate limits
//! are told apart per client address (127.0.0.1 and 127.0.0.2, by binding the client
//! socket); idle connections cannot crowd out real requests.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `addr` from `source` (any port).
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind source address");
    socket.connect(addr).await.expect("connect")
}

/// One GET from `source` with extra header lines; returns the response head.
async fn get_from(source: [u8; 4], addr: SocketAddr, path: &str, headers: &str) -> String {
    let mut stream = connect_from(source, addr).await;
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n{headers}\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}

fn status(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn malformed_requests_get_400_and_a_closed_connection_and_never_reach_a_backend() {
    let backend = Counter::start(200).await;
    let proxy = Proxy::start(&single_upstream(&[(backend.addr, 1)], "")).await;
    let cases: &[(&str, &[u8])] = &[
        (
            "Content-Length and Transfer-Encoding",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "differing duplicate Content-Length",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        ),
        (
            "Transfer-Encoding not ending in chunked",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding other than chunked",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
        ),
        ("obs-fold", b"GET / HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n  b\r\n\r\n"),
        ("invalid header name", b"GET / HTTP/1.1\r\nhost: x\r\nbad(name): 1\r\n\r\n"),
        ("space before the colon", b"GET / HTTP/1.1\r\nhost: x\r\nx-a : 1\r\n\r\n"),
        ("control character in a value", b"GET / HTTP/1.1\r\nhost: x\r\nx-a: a\x01b\r\n\r\n"),
        ("bare CR in a value", b"GET / HTTP/1.1\r\nhost: x\r\nx-a: a\rb\r\n\r\n"),
        ("bare CR as a line end", b"GET / HTTP/1.1\rhost: x\r\n\r\n"),
        ("invalid Content-Length", b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: +5\r\n\r\nhello"),
        ("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\nx-a: 1\r\n\r\n"),
        ("two Hosts", b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n"),
        (
            "a coding before chunked",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "chunked twice",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        ("Transfer-Encoding in HTTP/1.0", b"POST / HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
    ];
    for (name, raw) in cases {
        let (text, closed) = raw_exchange(proxy.addr, raw, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{name}: {text:?}");
        assert!(closed, "{name}: connection left open");
        // Every one is palisade's own answer (SPEC: Proxy-Status and a short text body),
        // whether the codec or the handler refused it.
        assert!(
            text.to_ascii_lowercase()
                .contains("proxy-status: palisade; error=http_request_error"),
            "{name}: {text}"
        );
        assert!(text.ends_with("bad request\n"), "{name}: {text:?}");
    }
    assert_eq!(backend.hits(), 0, "a malformed request reached the backend");

    // Identical duplicate Content-Lengths are one length: forwarded once.
    let echo = Echo::start("e").await;
    let proxy = Proxy::start(&single_upstream(&[(echo.addr, 1)], "")).await;
    let (text, _) = raw_exchange(
        proxy.addr,
        b"POST / HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"content-length\":\"5\""), "{text}");
    assert!(text.contains("\"body_bytes\":5"), "{text}");
}

fn acl_config(backend: SocketAddr, route_extra: &str, server_extra: &str) -> String {
    format!(
        "[server.client_ip]\n{server_extra}\n[[routes]]\nname = \"guarded\"\nupstream = \"app\"\n{route_extra}\n[upstreams.app]\nbackends = [{{ addr = \"{backend}\" }}]\n"
    )
}

#[tokio::test]
async fn allow_and_deny_lists_are_per_client_address_and_cannot_be_spoofed() {
    let a = Echo::start("a").await;
    // Allow list: only 127.0.0.1.
    let proxy = Proxy::start(&acl_config(a.addr, "allow = [\"127.0.0.1/32\"]", "")).await;
    assert_eq!(
        status(&get_from([127, 0, 0, 1], proxy.addr, "/", "").await),
        200
    );
    let refused = get_from([127, 0, 0, 2], proxy.addr, "/", "").await;
    assert_eq!(status(&refused), 403);
    assert_eq!(
        header(&refused, "proxy-status"),
        Some("palisade; error=http_request_denied")
    );
    // A spoofed X-Forwarded-For from an untrusted peer changes nothing.
    let spoofed = get_from(
        [127, 0, 0, 2],
        proxy.addr,
        "/",
        "x-forwarded-for: 127.0.0.1\r\n",
    )
    .await;
    assert_eq!(status(&spoofed), 403);

    // Deny list: 127.0.0.2 refused, deny wins over allow.
    let proxy = Proxy::start(&acl_config(
        a.addr,
        "allow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.2\"]",
        "",
    ))
    .await;
    assert_eq!(
        status(&get_from([127, 0, 0, 1], proxy.addr, "/", "").await),
        200
    );
    assert_eq!(
        status(&get_from([127, 0, 0, 2], proxy.addr, "/", "").await),
        403
    );
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("palisade_denied_total{route=\"guarded\"} 1"),
        "{metrics}"
    );

    // An IPv6 network is no IPv4 network: `::/0` covered the IPv4-mapped block, so it
    // refused (or would have allowed, or trusted) every IPv4 client.
    let proxy = Proxy::start(&acl_config(a.addr, "deny = [\"::/0\"]", "")).await;
    assert_eq!(
        status(&get_from([127, 0, 0, 1], proxy.addr, "/", "").await),
        200
    );
}

#[tokio::test]
async fn a_path_written_differently_is_routed_as_a_normalising_backend_reads_it() {
    // `/x/../admin/`, `//admin/`, `/%61dmin/`: a backend that normalises paths serves each
    // as /admin/, and they missed the route `/admin/` and its deny list.
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"admin\"\npath_prefix = \"/admin/\"\ndeny = [\"127.0.0.0/8\"]\nupstream = \"app\"\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api/\"\nstrip_prefix = true\nupstream = \"app\"\n\
         [[routes]]\nname = \"rest\"\nupstream = \"app\"\n\
         [upstreams.app]\nbackends = [{{ addr = \"{}\" }}]\n",
        a.addr
    ))
    .await;
    for path in [
        "/admin/",
        "/x/../admin/",
        "//admin/",
        "/./admin/x",
        "/%61dmin/",
        "/admin%2Fx",
        "/a/%2e%2e/admin/",
    ] {
        let head = get_from([127, 0, 0, 1], proxy.addr, path, "").await;
        assert_eq!(status(&head), 403, "{path}: {head}");
    }
    let head = get_from([127, 0, 0, 1], proxy.addr, "/../admin/", "").await;
    assert_eq!(status(&head), 400, "{head}");

    // Elsewhere the client's path goes on as written...
    let answer = get(&format!("http://{}/docs/./a", proxy.addr)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["path"], "/docs/./a");
    // ...unless a prefix is stripped: it is cut from the path the route matched.
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(b"GET /x/../api/v1?q=1 HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"path\":\"/v1?q=1\""), "{text}");
}

#[tokio::test]
async fn a_trusted_proxy_can_vouch_for_a_client_and_an_untrusted_one_cannot() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&acl_config(
        a.addr,
        "allow = [\"203.0.113.7/32\"]",
        "trusted_proxies = [\"127.0.0.2/32\"]",
    ))
    .await;
    let vouched = "x-forwarded-for: 203.0.113.7\r\n";
    // 127.0.0.2 is a trusted proxy: its X-Forwarded-For is believed.
    assert_eq!(
        status(&get_from([127, 0, 0, 2], proxy.addr, "/", vouched).await),
        200
    );
    // 127.0.0.1 is not: the same header is ignored, and 127.0.0.1 is not allowed.
    assert_eq!(
        status(&get_from([127, 0, 0, 1], proxy.addr, "/", vouched).await),
        403
    );
    // A trusted proxy cannot launder a client by prepending: the right-most untrusted
    // entry is the client.
    let laundered = "x-forwarded-for: 203.0.113.7, 198.51.100.1\r\n";
    assert_eq!(
        status(&get_from([127, 0, 0, 2], proxy.addr, "/", laundered).await),
        403
    );
}

#[tokio::test]
async fn a_burst_then_429_with_a_retry_after_that_is_enough() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&acl_config(
        a.addr,
        "[routes.rate_limit]\nrequests_per_second = 1.0\nburst = 3",
        "",
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(
            status(&get_from([127, 0, 0, 1], proxy.addr, "/", "").await),
            200
        );
    }
    let limited = get_from([127, 0, 0, 1], proxy.addr, "/", "").await;
    assert_eq!(status(&limited), 429, "{limited}");
    assert_eq!(
        header(&limited, "proxy-status"),
        Some("palisade; error=http_request_denied")
    );
    let retry_after: u64 = header(&limited, "retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(
        header(&limited, "ratelimit-policy"),
        Some("\"route\";q=3;w=3")
    );
    assert!(header(&limited, "ratelimit").is_some_and(|v| v.contains("r=0")));

    // Another client address has its own budget.
    assert_eq!(
        status(&get_from([127, 0, 0, 2], proxy.addr, "/", "").await),
        200
    );

    // Waiting exactly Retry-After is enough.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(
        status(&get_from([127, 0, 0, 1], proxy.addr, "/", "").await),
        200
    );
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("palisade_rate_limited_total{route=\"guarded\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn rate_limits_keyed_by_header_follow_the_key_not_the_address() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&acl_config(
        a.addr,
        "[routes.rate_limit]\nrequests_per_second = 0.1\nburst = 2\nkey = \"header:x-api-key\"",
        "",
    ))
    .await;
    let key = "x-api-key: team-a\r\n";
    assert_eq!(
        status(&get_from([127, 0, 0, 1], proxy.addr, "/", key).await),
        200
    );
    assert_eq!(
        status(&get_from([127, 0, 0, 2], proxy.addr, "/", key).await),
        200
    );
    // The key's burst is spent, from whichever address.
    assert_eq!(
        status(&get_from([127, 0, 0, 1], proxy.addr, "/", key).await),
        429
    );
    // Another key is fine.
    assert_eq!(
        status(&get_from([127, 0, 0, 1], proxy.addr, "/", "x-api-key: team-b\r\n").await),
        200
    );
}

#[tokio::test]
async fn limiter_state_survives_a_reload_that_keeps_the_limit() {
    let a = Echo::start("a").await;
    let limit = "[routes.rate_limit]\nrequests_per_second = 0.1\nburst = 2";
    let dir = TempDir::new("limit-reload");
    let path = dir.join("palisade.toml");
    std::fs::write(&path, acl_config(a.addr, limit, "")).expect("write");
    let proxy = Proxy::start_file(&path).await;
    for _ in 0..2 {
        assert_eq!(
            status(&get_from([127, 0, 0, 1], proxy.addr, "/", "").await),
            200
        );
    }
    // Same limit, another change (an extra allow entry): the bucket stays spent.
    std::fs::write(
        &path,
        acl_config(a.addr, &format!("allow = [\"127.0.0.0/8\"]\n{limit}"), ""),
    )
    .expect("write");
    palisade::reload::reload(&proxy.state).expect("reload");
    assert_eq!(
        status(&get_from([127, 0, 0, 1], proxy.addr, "/", "").await),
        429
    );
    // A changed limit starts afresh.
    std::fs::write(
        &path,
        acl_config(
            a.addr,
            "[routes.rate_limit]\nrequests_per_second = 0.1\nburst = 5",
            "",
        ),
    )
    .expect("write");
    palisade::reload::reload(&proxy.state).expect("reload");
    assert_eq!(
        status(&get_from([127, 0, 0, 1], proxy.addr, "/", "").await),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_stop_a_real_request() {
    let a = Echo::start("a").await;
    let cfg = format!(
        "[server.limits]\nmax_connections = 100\n{}",
        single_upstream(&[(a.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;
    let started = Instant::now();
    let mut idle = Vec::with_capacity(2000);
    for i in 0..2000u32 {
        let source = [127, 0, 1 + (i % 200) as u8, 1 + (i / 200) as u8];
        idle.push(connect_from(source, proxy.addr).await);
    }
    eprintln!("2000 idle connections opened in {:?}", started.elapsed());
    let answer = get_from([127, 0, 0, 9], proxy.addr, "/health", "").await;
    assert_eq!(status(&answer), 200, "{answer}");
    // Evicted connections close asynchronously; the count settles at the cap.
    let capped = eventually(Duration::from_secs(3), async || {
        proxy
            .state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            <= 100
    })
    .await;
    assert!(capped, "more than 100 connections stayed open");
    drop(idle);
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408() {
    let backend = Counter::start(200).await;
    let cfg = format!(
        "[server.timeouts]\nidle = \"300ms\"\n{}",
        single_upstream(&[(backend.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;
    let started = Instant::now();
    // Promises 10 bytes, sends 3, then stalls.
    let (text, closed) = raw_exchange(
        proxy.addr,
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc",
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("proxy-status: palisade; error=http_request_error"),
        "{text}"
    );
    assert!(closed, "the connection stayed open");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(backend.hits(), 0, "a partial body reached the backend");
}
