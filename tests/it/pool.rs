//! palisade's own upstream connection pool (plain HTTP/1.1 backends): connections are
//! reused across requests, given back only when a response was read to its end, a
//! connection the backend closed while idle costs no failed request, and one unused for
//! the upstream's `timeouts.idle` is closed.

use crate::common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, get, single_upstream, Proxy};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A raw HTTP/1.1 backend that counts the connections it accepted. What it answers
/// depends on the path:
/// - `/cl`: "hello" with Content-Length;
/// - `/chunked`: "hello" chunked;
/// - `/big`: 4 MiB with Content-Length;
/// - `/stall`: a head promising 4 MiB, 1 KiB of it, then nothing until the peer hangs up;
/// - `/empty`: 204 without a body;
/// - `/once`: "hello", then it closes the connection without saying so (as a backend whose
///   keep-alive timeout expired does);
/// - a HEAD request: the headers of "hello" and no body.
struct RawBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// Connections that ended (the peer closed, or the backend did).
    ended: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawBackend {
    async fn start() -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (a, r, e) = (accepted.clone(), requests.clone(), ended.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (r, e) = (r.clone(), e.clone());
                tokio::spawn(async move {
                    serve(stream, r).await;
                    e.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        RawBackend {
            addr,
            accepted,
            requests,
            ended,
            task,
        }
    }

    fn ended(&self) -> usize {
        self.ended.load(Ordering::SeqCst)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, requests: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        requests.fetch_add(1, Ordering::SeqCst);
        let mut words = head.split_whitespace();
        let method = words.next().unwrap_or_default();
        let path = words.next().unwrap_or_default();
        let (answer, close): (Vec<u8>, bool) = if method == "HEAD" {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec(),
                false,
            )
        } else {
            match path {
                "/chunked" => (
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"
                        .to_vec(),
                    false,
                ),
                "/big" => {
                    let mut v = b"HTTP/1.1 200 OK\r\ncontent-length: 4194304\r\n\r\n".to_vec();
                    v.resize(v.len() + 4 * 1024 * 1024, b'x');
                    (v, false)
                }
                "/empty" => (b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), false),
                "/once" => (
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
                    true,
                ),
                _ => (
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
                    false,
                ),
            }
        };
        if path == "/stall" {
            let mut v = b"HTTP/1.1 200 OK\r\ncontent-length: 4194304\r\n\r\n".to_vec();
            v.resize(v.len() + 1024, b'x');
            if stream.write_all(&v).await.is_ok() {
                while matches!(stream.read(&mut chunk).await, Ok(n) if n > 0) {}
            }
            return;
        }
        if stream.write_all(&answer).await.is_err() {
            return;
        }
        if close {
            return;
        }
    }
}

async fn proxy_for(backend: &RawBackend) -> Proxy {
    Proxy::start(&single_upstream(&[(backend.addr, 1)], "")).await
}

/// A proxy for `backend` whose upstream keeps idle connections for `idle`.
async fn proxy_with_idle(backend: &RawBackend, idle: &str) -> Proxy {
    let extra = format!("[upstreams.app.timeouts]\nidle = \"{idle}\"\n");
    Proxy::start(&single_upstream(&[(backend.addr, 1)], &extra)).await
}

#[tokio::test]
async fn sequential_requests_share_one_backend_connection() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for(&backend).await;
    for path in ["/cl", "/chunked"] {
        for _ in 0..20 {
            let a = get(&proxy.url(path)).await;
            assert_eq!(a.status, 200);
            assert_eq!(a.text(), "hello");
        }
    }
    assert_eq!(backend.requests(), 40);
    assert_eq!(
        backend.accepted(),
        1,
        "every request after the first should reuse the pooled connection"
    );
}

#[tokio::test]
async fn bodiless_answers_give_the_connection_back_too() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let client = common::client();
    for _ in 0..10 {
        let req = http::Request::head(proxy.url("/cl"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = client.request(req).await.expect("HEAD");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-length"], "5");
        let a = get(&proxy.url("/empty")).await;
        assert_eq!(a.status, 204);
    }
    assert_eq!(backend.requests(), 20);
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn concurrent_requests_open_no_more_connections_than_they_need() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = proxy.url("/cl");
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                assert_eq!(get(&url).await.text(), "hello");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(backend.requests(), 100);
    assert!(
        (1..=4).contains(&backend.accepted()),
        "4 concurrent clients used {} backend connections",
        backend.accepted()
    );
}

#[tokio::test]
async fn a_response_abandoned_midway_never_puts_its_connection_back() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for(&backend).await;
    // Read the head and the first chunk of a body the backend never finishes, then hang
    // up. (Abandoning a body the backend does finish is no test: loopback socket buffers
    // can take all of it before the client hangs up, and then the connection is clean.)
    {
        let resp = common::client()
            .request(
                http::Request::get(proxy.url("/stall"))
                    .body(Full::new(Bytes::new()))
                    .expect("request"),
            )
            .await
            .expect("head");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    }
    // The rest of that body is still on the first connection: the next request must not
    // be sent there, and must get a whole, correct answer.
    for _ in 0..5 {
        let a = get(&proxy.url("/cl")).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.text(), "hello");
    }
    let whole = get(&proxy.url("/big")).await;
    assert_eq!(whole.body.len(), 4 * 1024 * 1024);
    assert!(backend.accepted() >= 2, "the stalled connection was reused");
}

#[tokio::test]
async fn a_connection_the_backend_closed_while_idle_costs_no_failed_request() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for(&backend).await;
    for i in 0..20 {
        let a = get(&proxy.url("/once")).await;
        assert_eq!(a.status, 200, "request {i}: {}", a.text());
        assert_eq!(a.text(), "hello");
        // Give the close time to arrive, as an idle keep-alive timeout would.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.requests(), 20);
    assert_eq!(backend.accepted(), 20);
}

/// A pooled connection unused for the upstream's `timeouts.idle` is closed even when no
/// request comes to find it stale (it stayed open until the backend closed it, 60 s at
/// the earliest from palisade's side, with no setting).
#[tokio::test]
async fn a_connection_idle_for_the_upstreams_idle_timeout_is_closed() {
    let backend = RawBackend::start().await;
    let proxy = proxy_with_idle(&backend, "300ms").await;
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/cl")).await.text(), "hello");
    }
    assert_eq!(backend.accepted(), 1, "the connection was not reused");
    assert!(
        eventually(Duration::from_secs(5), async || backend.ended() == 1).await,
        "the idle connection is still open"
    );
    // The next request opens a new one and is served.
    assert_eq!(get(&proxy.url("/cl")).await.text(), "hello");
    assert_eq!(backend.accepted(), 2);
}

/// `idle = "0s"`: no connection is kept, every request opens its own (nginx without
/// `keepalive`).
#[tokio::test]
async fn idle_zero_keeps_no_backend_connection() {
    let backend = RawBackend::start().await;
    let proxy = proxy_with_idle(&backend, "0s").await;
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/cl")).await.text(), "hello");
    }
    assert_eq!(backend.accepted(), 3);
    assert!(
        eventually(Duration::from_secs(5), async || backend.ended() == 3).await,
        "{} of 3 connections ended",
        backend.ended()
    );
}
