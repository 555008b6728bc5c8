//! What a backend sees of a client's request head, over real sockets: one Host, the same
//! one routing and the allow/deny lists used (HTTP/2 `:authority` against `host` fields,
//! HTTP/1.1 absolute-form targets).
//!
//! HTTP/2 requests are sent with the `h2` crate, which writes the pseudo-headers and
//! fields exactly as a test asks (hyper's client would not send a `host` field next to
//! `:authority`, nor leave `:authority` out). Backends are raw sockets that report each
//! request head byte for byte.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{raw_exchange, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A backend that sends every request head it reads (lower-cased) to `heads`, and answers
/// each with `answer`.
pub(crate) struct Recorder {
    pub(crate) addr: SocketAddr,
    heads: mpsc::UnboundedReceiver<String>,
    task: JoinHandle<()>,
}

pub(crate) const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

impl Recorder {
    pub(crate) async fn start(answer: &'static [u8]) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, heads) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(head) = request_head(&mut stream).await {
                        let _ = tx.send(head.to_ascii_lowercase());
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Recorder { addr, heads, task }
    }

    /// The next request head the backend read.
    pub(crate) async fn head(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(5), self.heads.recv())
            .await
            .expect("a request reached the backend in time")
            .expect("backend running")
    }

    /// Sends `raw` to the proxy at `proxy`, checks that its answer starts with `answer`,
    /// and returns the request head that reached the backend.
    pub(crate) async fn through(&mut self, proxy: SocketAddr, raw: &[u8], answer: &str) -> String {
        common::raw_expect(proxy, raw, answer).await;
        self.head().await
    }

    /// Whether no request reached the backend.
    fn saw_nothing(&mut self) -> bool {
        self.heads.try_recv().is_err()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head (bytes up to the blank line); `None` once the peer closed.
async fn request_head(stream: &mut TcpStream) -> Option<String> {
    common::request_head_bytes(stream)
        .await
        .map(|head| String::from_utf8_lossy(&head).into_owned())
}

/// The values of every `name:` line in `head`, in order.
pub(crate) fn lines<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n == name).then(|| v.trim())
        })
        .collect()
}

/// A route `admin` for host `admin.test` that denies 127.0.0.0/8 (every test client), and
/// a route `public` for every other host, both to `backend`.
fn admin_and_public(backend: SocketAddr) -> String {
    format!(
        "[[routes]]\nname = \"admin\"\nhost = \"admin.test\"\ndeny = [\"127.0.0.0/8\"]\nupstream = \"app\"\n\
         [[routes]]\nname = \"public\"\nupstream = \"app\"\n\
         [upstreams.app]\nbackends = [{{ addr = \"{backend}\" }}]\n"
    )
}

/// An HTTP/2 answer: status, headers, body.
struct H2Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

/// Sends `req` as the only request of a new HTTP/2 (prior knowledge) connection to `addr`.
/// Its URI's authority, if any, becomes `:authority`; its headers are sent as they are
/// (`host` fields included). A request with version HTTP/1.1 and an origin-form URI goes
/// without `:authority` (the h2 crate's way to say so).
async fn h2_request(addr: SocketAddr, req: http::Request<()>) -> H2Answer {
    tokio::time::timeout(Duration::from_secs(10), async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(conn);
        let (resp, _) = client.send_request(req, true).expect("send request");
        let resp = resp.await.expect("response");
        let (parts, mut body) = resp.into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("body");
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        H2Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: Bytes::from(data),
        }
    })
    .await
    .expect("answer in time")
}

fn h2_get(uri: &str, version: http::Version, hosts: &[&str]) -> http::Request<()> {
    let mut req = http::Request::get(uri).version(version);
    for host in hosts {
        req = req.header("host", *host);
    }
    req.body(()).expect("request")
}

#[tokio::test]
async fn an_http2_host_field_that_differs_from_the_authority_is_refused_not_routed() {
    let mut backend = Recorder::start(OK).await;
    let proxy = Proxy::start(&admin_and_public(backend.addr)).await;
    let url = |host: &str| format!("http://{host}/x");

    // :authority www.test (route public) with host admin.test: malformed (RFC 9113 8.3.1).
    let answer = h2_request(
        proxy.addr,
        h2_get(&url("www.test"), http::Version::HTTP_2, &["admin.test"]),
    )
    .await;
    assert_eq!(answer.status, 400, "{:?}", answer.body);
    assert_eq!(
        answer.headers["proxy-status"],
        "palisade; error=http_request_error"
    );
    assert!(!answer.body.is_empty());
    assert!(
        backend.saw_nothing(),
        "the refused request reached a backend"
    );

    // A host equal to the authority (any case) goes on once: the backend sees one Host,
    // the authority, and X-Forwarded-Host says the same.
    let answer = h2_request(
        proxy.addr,
        h2_get(&url("www.test"), http::Version::HTTP_2, &["WWW.test"]),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let head = backend.head().await;
    assert_eq!(lines(&head, "host"), ["www.test"], "{head}");
    assert_eq!(lines(&head, "x-forwarded-host"), ["www.test"], "{head}");

    // The admin host, however it is named, meets the admin route's deny list.
    let by_authority = h2_request(
        proxy.addr,
        h2_get(&url("admin.test"), http::Version::HTTP_2, &[]),
    )
    .await;
    assert_eq!(by_authority.status, 403);
    let by_host = h2_request(
        proxy.addr,
        h2_get("/x", http::Version::HTTP_11, &["admin.test"]),
    )
    .await;
    assert_eq!(by_host.status, 403);

    // No :authority and two host fields: as for HTTP/1.1, a 400.
    let answer = h2_request(
        proxy.addr,
        h2_get("/x", http::Version::HTTP_11, &["www.test", "admin.test"]),
    )
    .await;
    assert_eq!(answer.status, 400, "{:?}", answer.body);
    assert_eq!(
        answer.headers["proxy-status"],
        "palisade; error=http_request_error"
    );

    // One host field and no :authority: that host, once.
    let answer = h2_request(
        proxy.addr,
        h2_get("/x", http::Version::HTTP_11, &["www.test"]),
    )
    .await;
    assert_eq!(answer.status, 200);
    let head = backend.head().await;
    assert_eq!(lines(&head, "host"), ["www.test"], "{head}");
    assert_eq!(lines(&head, "x-forwarded-host"), ["www.test"], "{head}");
    assert!(backend.saw_nothing());
}

#[tokio::test]
async fn an_http1_absolute_form_target_replaces_the_host_header() {
    // RFC 9112 3.2.2: a proxy uses the target's authority and replaces the Host header
    // with it, so the backend sees the host the request was routed (and allowed) by.
    let mut backend = Recorder::start(OK).await;
    let proxy = Proxy::start(&admin_and_public(backend.addr)).await;
    let head = backend
        .through(
            proxy.addr,
            b"GET http://www.test/x HTTP/1.1\r\nHost: admin.test\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 200 ",
        )
        .await;
    assert_eq!(lines(&head, "host"), ["www.test"], "{head}");
    assert_eq!(lines(&head, "x-forwarded-host"), ["www.test"], "{head}");

    // And the other way round: the admin route's deny list applies.
    let (answer, _) = raw_exchange(
        proxy.addr,
        b"GET http://admin.test/x HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");

    // Two Host lines are a 400 for HTTP/1.0 as for HTTP/1.1.
    let (answer, _) = raw_exchange(
        proxy.addr,
        b"GET /x HTTP/1.0\r\nHost: www.test\r\nHost: admin.test\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.contains("proxy-status: palisade; error=http_request_error"),
        "{answer}"
    );
    assert!(backend.saw_nothing());
}

#[tokio::test]
async fn connection_cannot_strip_host_and_a_second_request_id_is_not_smuggled_through() {
    let mut backend = Recorder::start(OK).await;
    let proxy = Proxy::start(&admin_and_public(backend.addr)).await;
    let send = async |head: &str| {
        let (answer, _) = raw_exchange(proxy.addr, head.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    };

    // `Connection: host` named Host as hop-by-hop: the backend got its own address as
    // Host, while palisade had routed (and would have checked) by www.test.
    send("GET /x HTTP/1.1\r\nHost: www.test\r\nConnection: host, close\r\n\r\n").await;
    let head = backend.head().await;
    assert_eq!(lines(&head, "host"), ["www.test"], "{head}");

    // A valid id, then an invalid one: only the first was checked, both went on (and the
    // log named the first). Two lines are replaced by one new id.
    send("GET /x HTTP/1.1\r\nHost: www.test\r\nX-Request-Id: a\r\nX-Request-Id: <script>\r\nConnection: close\r\n\r\n").await;
    let head = backend.head().await;
    let ids = lines(&head, "x-request-id");
    assert_eq!(ids.len(), 1, "{head}");
    assert!(ids[0] != "a" && !ids[0].contains('<'), "{head}");
    // One valid id is kept as it is.
    send("GET /x HTTP/1.1\r\nHost: www.test\r\nX-Request-Id: trace-7\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(lines(&backend.head().await, "x-request-id"), ["trace-7"]);

    // palisade answers `Expect: 100-continue` itself: the backend is not asked again.
    let (answer, _) = raw_exchange(
        proxy.addr,
        b"POST /x HTTP/1.1\r\nHost: www.test\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "),
        "{answer}"
    );
    let head = backend.head().await;
    assert!(lines(&head, "expect").is_empty(), "{head}");
}

#[tokio::test]
async fn hosts_a_backend_could_read_otherwise_are_refused() {
    // A Host with a space, a slash, userinfo or `..` is not one host: palisade routed and
    // checked it as one string, a backend may split it another way (nginx answers 400).
    let mut backend = Recorder::start(OK).await;
    let proxy = Proxy::start(&admin_and_public(backend.addr)).await;
    for head in [
        "GET /x HTTP/1.1\r\nHost: www.test admin.test\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: www.test/admin.test\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: www.test@admin.test\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: ..\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: www.test:80x\r\n\r\n",
        "GET http://www.test@admin.test/x HTTP/1.1\r\nHost: admin.test\r\n\r\n",
    ] {
        let (answer, _) = raw_exchange(proxy.addr, head.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{head:?}: {answer}");
        assert!(
            answer.contains("proxy-status: palisade; error=http_request_error"),
            "{answer}"
        );
    }
    // HTTP/2: userinfo in the :authority.
    let answer = h2_request(
        proxy.addr,
        h2_get("http://www.test@admin.test/x", http::Version::HTTP_2, &[]),
    )
    .await;
    assert_eq!(answer.status, 400, "{:?}", answer.body);
    assert!(backend.saw_nothing());

    // What RFC 9110 allows goes on: a port, an IP literal, an empty Host (matching
    // host-less routes only).
    for (head, seen) in [
        (
            "GET /x HTTP/1.1\r\nHost: WWW.test:8080\r\nConnection: close\r\n\r\n",
            "www.test:8080",
        ),
        (
            "GET /x HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n",
            "[::1]:8080",
        ),
        ("GET /x HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n", ""),
    ] {
        let (answer, _) = raw_exchange(proxy.addr, head.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{head:?}: {answer}");
        assert_eq!(lines(&backend.head().await, "host"), [seen]);
    }
}

#[tokio::test]
async fn request_trailers_cannot_override_what_palisade_checked_or_set() {
    // A backend that merges trailers into the header section (RFC 9110 6.5.1 lets it)
    // would take a trailer's Host, X-Forwarded-For or Authorization as the request's.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, mut requests) = mpsc::unbounded_channel();
    let backend = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
                let text = String::from_utf8_lossy(&seen);
                if text.contains("\r\n0\r\n") && text.ends_with("\r\n\r\n") {
                    let _ = tx.send(text.to_ascii_lowercase());
                    let _ = stream.write_all(OK).await;
                    break;
                }
            }
        }
    });
    let proxy = Proxy::start(&admin_and_public(addr)).await;
    let (answer, _) = raw_exchange(
        proxy.addr,
        b"POST /x HTTP/1.1\r\nHost: www.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n0\r\nX-Checksum: 5d41\r\nHost: admin.test\r\nContent-Length: 99\r\n\
          X-Forwarded-For: 10.0.0.1\r\nAuthorization: Bearer forged\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let request = tokio::time::timeout(Duration::from_secs(5), requests.recv())
        .await
        .expect("the request reached the backend")
        .expect("backend running");
    let (_, trailers) = request.split_once("\r\n0\r\n").expect("a chunked body");
    assert_eq!(trailers, "x-checksum: 5d41\r\n\r\n", "{request}");
    backend.abort();
}

/// A request asking to upgrade to `upgrade` (with the h2c upgrade's settings header).
fn upgrade_request(upgrade: &str) -> Vec<u8> {
    format!(
        "GET /up HTTP/1.1\r\nHost: www.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         Upgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn only_websocket_upgrades_are_forwarded_and_a_101_for_anything_else_is_not_tunnelled() {
    // h2c smuggling: an `Upgrade: h2c` request the backend accepts would give the client a
    // tunnel past every route and allow/deny list. It goes on as a plain request.
    let mut backend = Recorder::start(OK).await;
    let proxy = Proxy::start(&admin_and_public(backend.addr)).await;
    for upgrade in ["h2c", "websocket, h2c", "h2c, websocket"] {
        let (answer, _) = raw_exchange(
            proxy.addr,
            &upgrade_request(upgrade),
            Duration::from_millis(500),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{upgrade}: {answer}");
        let head = backend.head().await;
        assert!(lines(&head, "upgrade").is_empty(), "{upgrade}: {head}");
        assert!(
            lines(&head, "http2-settings").is_empty(),
            "{upgrade}: {head}"
        );
        assert!(lines(&head, "connection").is_empty(), "{upgrade}: {head}");
    }
    // A WebSocket upgrade, in any case, still goes on as one.
    let (_answer, _) = raw_exchange(
        proxy.addr,
        b"GET /ws HTTP/1.1\r\nHost: www.test\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    let head = backend.head().await;
    assert_eq!(lines(&head, "upgrade"), ["websocket"], "{head}");
    assert_eq!(lines(&head, "connection"), ["upgrade"], "{head}");

    // A backend that switches protocols whatever it is asked: not tunnelled, a 502.
    let switcher = Recorder::start(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    let proxy = Proxy::start(&admin_and_public(switcher.addr)).await;
    let (answer, _) = raw_exchange(
        proxy.addr,
        &upgrade_request("h2c"),
        Duration::from_millis(500),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    assert!(
        answer.contains("proxy-status: palisade; error=connection_terminated"),
        "{answer}"
    );
    assert!(!answer.contains(" 101 "), "{answer}");
}

#[tokio::test]
async fn an_http2_clients_cookie_fields_reach_an_http1_backend_as_one_header() {
    let mut backend = Recorder::start(OK).await;
    let proxy = Proxy::start(&admin_and_public(backend.addr)).await;
    let req = http::Request::get("http://www.test/c")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(())
        .expect("request");
    let answer = h2_request(proxy.addr, req).await;
    assert_eq!(answer.status, 200);
    let head = backend.head().await;
    assert_eq!(lines(&head, "cookie"), ["a=1; b=2; c=3"], "{head}");
}

#[tokio::test]
async fn an_http2_head_over_max_header_bytes_gets_palisades_own_431() {
    // As for HTTP/1.1: Proxy-Status and a body, not the h2 layer's bare 431.
    let mut backend = Recorder::start(OK).await;
    let proxy = Proxy::start(&format!(
        "[server.limits]\nmax_header_bytes = 4096\n{}",
        admin_and_public(backend.addr)
    ))
    .await;
    let with_value_of = |n: usize| {
        http::Request::get("http://www.test/big")
            .header("x-big", "a".repeat(n))
            .body(())
            .expect("request")
    };
    // HTTP/2's measure (RFC 9113 6.5.2): name + value + 32 per field, pseudo-headers
    // included. :method GET 42, :scheme http 43, :path /big 41, :authority www.test 50,
    // x-big 37 + its value: 213 + the value.
    let answer = h2_request(proxy.addr, with_value_of(4096 - 213)).await;
    assert_eq!(answer.status, 200, "a head of exactly the limit is taken");
    backend.head().await;
    for n in [4096 - 213 + 1, 6000] {
        let answer = h2_request(proxy.addr, with_value_of(n)).await;
        assert_eq!(answer.status, 431, "value of {n}");
        assert_eq!(
            answer.headers["proxy-status"],
            "palisade; error=http_request_error"
        );
        assert!(!answer.body.is_empty());
    }
    assert!(backend.saw_nothing());
}
