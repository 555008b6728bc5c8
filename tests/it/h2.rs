//! HTTP/2 end to end: an h2c upstream (`protocol = "h2c"`) with trailers passed through,
//! as gRPC needs.

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// An HTTP/2-only backend on a free port that answers every request with `answer`.
struct H2Backend {
    addr: SocketAddr,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
    /// Connections that ended.
    ended: Arc<AtomicUsize>,
}

async fn h2_backend<F, Fut, B>(answer: F) -> H2Backend
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let (a, e) = (accepted.clone(), ended.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            let e = e.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let answer = answer.clone();
                    async move { Ok::<_, Infallible>(answer(req).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                e.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    H2Backend {
        addr,
        accepted,
        ended,
    }
}

/// An HTTP/2-only backend answering like a gRPC server: a body, then `grpc-status` in the
/// trailers. Headers say what it saw: the HTTP version, `te`, and the request body size.
async fn grpc_like_backend() -> SocketAddr {
    h2_backend(|req: http::Request<Incoming>| async move {
        let te = req.headers().get("te").cloned();
        let version = format!("{:?}", req.version());
        let received = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        trailers.insert("grpc-message", http::HeaderValue::from_static("fine"));
        let body = Full::new(Bytes::from_static(b"\x00\x00\x00\x00\x02hi"))
            .with_trailers(async move { Some(Ok::<_, Infallible>(trailers)) });
        let mut resp = http::Response::new(body);
        let h = resp.headers_mut();
        h.insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "x-saw-version",
            http::HeaderValue::from_str(&version).expect("version"),
        );
        h.insert("x-saw-request-bytes", http::HeaderValue::from(received));
        if let Some(te) = te {
            h.insert("x-saw-te", te);
        }
        resp
    })
    .await
    .addr
}

#[tokio::test]
async fn an_h2c_upstream_passes_trailers_end_to_end() {
    let backend = grpc_like_backend().await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nupstream = \"grpc\"\n[upstreams.grpc]\nprotocol = \"h2c\"\nbackends = [{{ addr = \"{backend}\" }}]\n"
    ))
    .await;
    let client = common::h2_client();
    let req = http::Request::post(proxy.url("/helloworld.Greeter/SayHello"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\x00\x00\x00\x00\x05hello")))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-saw-version"], "HTTP/2.0");
    assert_eq!(resp.headers()["x-saw-te"], "trailers");
    assert_eq!(resp.headers()["x-saw-request-bytes"], "10");
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reached the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "fine");
    assert_eq!(&collected.to_bytes()[..], b"\x00\x00\x00\x00\x02hi");
}

#[tokio::test]
async fn a_client_body_failing_on_its_way_to_an_h2c_backend_is_the_clients_fault() {
    // A body over max_body_bytes, or one cut short, while it streamed to an h2c backend:
    // hyper's client resets the stream and reports only that. It was a 502 and a strike
    // against the backend (three such uploads ejected a healthy one); it is the client's
    // 413 or 400, as with HTTP/1.1 backends.
    let backend = h2_backend(|req: http::Request<Incoming>| async move {
        let _ = req.into_body().collect().await;
        http::Response::new(Full::new(Bytes::from_static(b"ok")))
    })
    .await;
    let proxy = Proxy::start(&format!(
        "[server.limits]\nmax_body_bytes = 1000\n[[routes]]\nupstream = \"h2\"\n[upstreams.h2]\nprotocol = \"h2c\"\nbackends = [{{ addr = \"{}\" }}]\n[upstreams.h2.passive]\nconsecutive_failures = 1\nejection = \"60s\"\n",
        backend.addr
    ))
    .await;
    let chunk = format!("{:x}\r\n{}\r\n", 600, "u".repeat(600));
    let too_large = format!(
        "POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let (answer, _) = raw_exchange(proxy.addr, too_large.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    let broken = format!(
        "POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n64\r\n{}\r\nzz\r\n",
        "u".repeat(100)
    );
    let (answer, _) = raw_exchange(proxy.addr, broken.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_eq!(
        status["upstreams"]["h2"]["backends"][0]["ejected"], false,
        "{status}"
    );
    assert_eq!(
        status["upstreams"]["h2"]["backends"][0]["failures"], 0,
        "{status}"
    );
}

/// A GET of `url` through `client`: its 200 answer, head only (the body still to read).
async fn answer_head(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    url: &str,
) -> http::Response<Incoming> {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("answer in time")
        .expect("answer");
    assert_eq!(resp.status(), 200);
    resp
}

#[tokio::test]
async fn an_http2_answer_still_streaming_is_not_cut_at_header_read() {
    // An HTTP/2 request counts as in flight until its answer's body is sent, and frames a
    // client sends meanwhile (PINGs here, WINDOW_UPDATEs) are not a slow request head.
    let echo = Echo::start("a").await;
    let cfg = single_upstream(
        &[(echo.addr, 1)],
        "[server.timeouts]\nheader_read = \"1s\"\nidle = \"10s\"",
    );
    let proxy = Proxy::start(&cfg).await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .http2_keep_alive_interval(Duration::from_millis(200))
        .build_http::<Full<Bytes>>();
    let resp = answer_head(&client, &proxy.url("/stream/25")).await;
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("the whole body, not a reset stream")
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(text.lines().count(), 25, "{text}");
    assert!(text.ends_with("chunk 24\n"), "{text}");
}

#[tokio::test]
async fn an_http2_client_that_gives_no_window_is_closed_after_idle() {
    // The client takes the answer's head and never reads its body: past its window no
    // byte may be sent, so palisade's socket writes never wait (the write-stall check
    // never saw it) and the request held its backend forever. nginx resets such a stream
    // after send_timeout; palisade closes the connection after `idle`, as for HTTP/1.1.
    let echo = Echo::start("a").await;
    let cfg = single_upstream(&[(echo.addr, 1)], "[server.timeouts]\nidle = \"1s\"");
    let proxy = Proxy::start(&cfg).await;
    let client = common::h2_client();
    let resp = answer_head(&client, &proxy.url("/bytes/100000000")).await;
    let backend = echo.addr.to_string();
    let in_flight = async || {
        let metrics = get(&proxy.admin_url("/metrics")).await.text();
        sample(
            &metrics,
            "palisade_backend_in_flight",
            &[("backend", backend.as_str())],
        )
    };
    assert_eq!(in_flight().await, Some(1.0));
    let released = eventually(Duration::from_secs(6), async || {
        in_flight().await == Some(0.0)
    })
    .await;
    assert!(released, "the stalled answer still holds its backend");
    let rest = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await;
    assert!(
        matches!(rest, Ok(Err(_))),
        "the stalled stream was not ended: {:?}",
        rest.map(|r| r.map(|c| c.to_bytes().len()))
    );
}

/// An HTTP/2-only backend that says what it saw: the request's `:authority` and how many
/// `host` fields came with it.
async fn authority_backend() -> SocketAddr {
    h2_backend(|req: http::Request<Incoming>| async move {
        let authority = req
            .uri()
            .authority()
            .map_or_else(|| "-".to_owned(), |a| a.to_string());
        let hosts = req.headers().get_all("host").iter().count();
        let mut resp = http::Response::new(Full::new(Bytes::from_static(b"ok")));
        let h = resp.headers_mut();
        h.insert(
            "x-saw-authority",
            http::HeaderValue::from_str(&authority).expect("authority"),
        );
        h.insert("x-saw-host-fields", http::HeaderValue::from(hosts));
        resp
    })
    .await
    .addr
}

#[tokio::test]
async fn an_h2c_upstream_gets_the_clients_host_as_authority_and_no_host_field() {
    // A `host` field next to `:authority` makes nginx answer 400 ("client sent duplicate
    // host header") to every request; the backend's address as `:authority` hides the
    // host the client asked for (SPEC 3: the Host header is kept).
    let backend = authority_backend().await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nupstream = \"h2\"\n[upstreams.h2]\nprotocol = \"h2c\"\nbackends = [{{ addr = \"{backend}\" }}]\n"
    ))
    .await;
    // An HTTP/1.1 client's Host.
    let answer = get_with(&proxy.url("/a"), &[("host", "app.test:8080")]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("x-saw-authority"), Some("app.test:8080"));
    assert_eq!(answer.header("x-saw-host-fields"), Some("0"));
    // An HTTP/2 client's :authority.
    let req = http::Request::get(proxy.url("/b"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = common::h2_client().request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-saw-authority"],
        proxy.addr.to_string().as_str()
    );
    assert_eq!(resp.headers()["x-saw-host-fields"], "0");
    // An HTTP/1.0 client without Host: the backend as configured (here its address), as
    // toward HTTP/1.1 backends.
    let (answer, _) = raw_exchange(
        proxy.addr,
        b"GET /c HTTP/1.0\r\n\r\n",
        std::time::Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(
        answer.contains(&format!("x-saw-authority: {backend}\r\n")),
        "{answer}"
    );
    assert!(answer.contains("x-saw-host-fields: 0\r\n"), "{answer}");
}

#[tokio::test]
async fn a_dns_h2c_backend_gets_its_name_as_authority_from_probes_and_host_less_requests() {
    // hyper-util's client, which probes went through, sent the address as `:authority`
    // and as a `host` field.
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(String, usize)>();
    let backend = h2_backend(move |req: http::Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let authority = req
                .uri()
                .authority()
                .map_or_else(|| "-".to_owned(), |a| a.to_string());
            let _ = tx.send((authority, req.headers().get_all("host").iter().count()));
            http::Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    })
    .await;
    let proxy = Proxy::start(
        "[[routes]]\nupstream = \"h2\"\n[upstreams.h2]\nprotocol = \"h2c\"\nbackends = [{ addr = \"app.internal:8080\" }]\n\
         [upstreams.h2.health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\n",
    )
    .await;
    crate::dns::resolve(&proxy, "app.internal:8080", backend.addr);
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .expect("a request reached the backend in time")
            .expect("backend running")
    };
    let name = ("app.internal:8080".to_owned(), 0);
    assert_eq!(next().await, name, "a probe");
    raw_expect(proxy.addr, b"GET /c HTTP/1.0\r\n\r\n", "HTTP/1.1 200 ").await;
    // The request, and any probe that came along meanwhile.
    assert_eq!(next().await, name);
    assert_eq!(next().await, name);
}

/// An h2c backend connection that carried no request for the upstream's `idle` is closed
/// (it stayed open until the backend closed it), but not while a response is still
/// streaming on it: requests meanwhile share it.
#[tokio::test]
async fn an_idle_h2c_connection_is_closed_but_not_while_a_response_streams() {
    let backend = h2_backend(|req: http::Request<Incoming>| async move {
        let body = if req.uri().path() == "/slow" {
            // Three chunks, 500 ms apart.
            let chunks = futures_util::stream::unfold(0u8, |n| async move {
                if n == 3 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                let frame = hyper::body::Frame::data(Bytes::from_static(b"chunk\n"));
                Some((Ok::<_, Infallible>(frame), n + 1))
            });
            http_body_util::StreamBody::new(chunks).boxed()
        } else {
            Full::new(Bytes::from_static(b"ok")).boxed()
        };
        http::Response::new(body)
    })
    .await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nupstream = \"h2\"\n[upstreams.h2]\nprotocol = \"h2c\"\nbackends = [{{ addr = \"{}\" }}]\n[upstreams.h2.timeouts]\nidle = \"300ms\"\n",
        backend.addr
    ))
    .await;
    let accepted = || backend.accepted.load(Ordering::SeqCst);
    let ended = || backend.ended.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/a")).await.text(), "ok");
    }
    assert_eq!(accepted(), 1, "the connection was not shared");
    assert!(
        eventually(Duration::from_secs(5), async || ended() == 1).await,
        "the idle connection is still open"
    );
    // A response streaming for 1.5 s, three times `idle`: a request meanwhile shares its
    // connection.
    let slow = tokio::spawn({
        let url = proxy.url("/slow");
        async move { get(&url).await.text() }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(get(&proxy.url("/b")).await.text(), "ok");
    assert_eq!(slow.await.expect("slow"), "chunk\nchunk\nchunk\n");
    assert_eq!(
        accepted(),
        2,
        "a connection was let go while a response streamed on it"
    );
}

/// An h2c backend that closes each connection gracefully (GOAWAY) right after its first
/// answer, as a backend does at its own max-requests or idle limit. palisade's kept
/// connection is then closing or closed when the next request comes: that request goes
/// on a new connection, and no request fails or counts against the backend. (Two things
/// see to it: a closed connection is not reused, and a request a closing one gives back
/// unsent is resent. With the first disabled, the second alone passes this test; with
/// both, requests fail with 502.)
#[tokio::test]
async fn an_h2c_backend_closing_its_connection_between_requests_fails_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let answered = Arc::new(tokio::sync::Notify::new());
                let notify = answered.clone();
                let service = service_fn(move |_req: http::Request<Incoming>| {
                    notify.notify_one();
                    async {
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    () = answered.notified() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
    });
    let proxy = Proxy::start(&format!(
        "[[routes]]\nupstream = \"h2\"\n[upstreams.h2]\nprotocol = \"h2c\"\nbackends = [{{ addr = \"{addr}\" }}]\n[upstreams.h2.retry]\nattempts = 0\n"
    ))
    .await;
    // In waves of four at once (each wave spans a connection's close) and one at a time.
    let url = proxy.url("/");
    for wave in 0..10 {
        let width = if wave % 2 == 0 { 4 } else { 1 };
        let answers =
            futures_util::future::join_all((0..width).map(|_| async { get(&url).await })).await;
        for answer in answers {
            assert_eq!(answer.status, 200, "wave {wave}: {}", answer.text());
        }
    }
    assert!(
        accepted.load(Ordering::SeqCst) >= 5,
        "the backend did not close its connections: {} accepted",
        accepted.load(Ordering::SeqCst)
    );
    let status = get(&proxy.admin_url("/status")).await.json();
    let backend = &status["upstreams"]["h2"]["backends"][0];
    assert_eq!(backend["failures"], 0, "{status}");
    assert_eq!(backend["requests"], 25, "{status}");
}

/// A response body that yields one frame, then none ever again; counts in `dropped` when
/// the backend's server lets it go.
struct StallsAfterFirst {
    first: Option<Bytes>,
    dropped: Arc<AtomicUsize>,
}

impl hyper::body::Body for StallsAfterFirst {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.first.take() {
            Some(bytes) => std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes)))),
            None => std::task::Poll::Pending,
        }
    }
}

impl Drop for StallsAfterFirst {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn an_h2c_backend_silent_mid_body_past_timeouts_read_is_cut_off() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let seen = dropped.clone();
    let backend = h2_backend(move |_req: http::Request<Incoming>| {
        let dropped = seen.clone();
        async move {
            http::Response::new(StallsAfterFirst {
                first: Some(Bytes::from_static(b"first")),
                dropped,
            })
        }
    })
    .await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nupstream = \"h2\"\n[upstreams.h2]\nprotocol = \"h2c\"\nbackends = [{{ addr = \"{}\" }}]\n[upstreams.h2.timeouts]\nread = \"300ms\"\n",
        backend.addr
    ))
    .await;
    let outcome = common::whole_body(&common::client(), &proxy.url("/")).await;
    assert!(outcome.is_err(), "a cut-off body looked whole: {outcome:?}");
    // The backend's stream is reset: its server lets the body go.
    assert!(
        eventually(Duration::from_secs(5), async || dropped
            .load(Ordering::SeqCst)
            == 1)
        .await,
        "the backend's stream was kept"
    );
}

/// GOAWAY, last stream 0, NO_ERROR: no stream was processed (RFC 9113 6.8). nginx sends
/// it at `keepalive_requests` to streams already on their way.
const GOAWAY_NONE_PROCESSED: &[u8] = &[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// RST_STREAM on stream 1 with REFUSED_STREAM (RFC 9113 8.7).
const REFUSED_STREAM_1: &[u8] = &[0, 0, 4, 3, 0, 0, 0, 0, 1, 0, 0, 0, 7];

/// An h2c backend that takes each connection's first request (stream 1) and answers it
/// with `refusal` (after its SETTINGS), then closes. Counts the requests it refused.
async fn refusing_backend(refusal: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let refused = Arc::new(AtomicUsize::new(0));
    let count = refused.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                // The client's preface, then frames until a HEADERS frame (type 1).
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                let headers_seen = |bytes: &[u8]| {
                    let mut at = 24;
                    while bytes.len() >= at + 9 {
                        let len = usize::from(bytes[at]) << 16
                            | usize::from(bytes[at + 1]) << 8
                            | usize::from(bytes[at + 2]);
                        if bytes[at + 3] == 1 {
                            return true;
                        }
                        at += 9 + len;
                    }
                    false
                };
                while !headers_seen(&seen) {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                // SETTINGS (empty), then the refusal.
                let mut frames = vec![0, 0, 0, 4, 0, 0, 0, 0, 0];
                frames.extend_from_slice(refusal);
                if stream.write_all(&frames).await.is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            });
        }
    });
    (addr, refused)
}

#[tokio::test]
async fn a_stream_an_h2c_backend_refuses_with_goaway_is_sent_again_whatever_its_method() {
    refused_streams_go_elsewhere(GOAWAY_NONE_PROCESSED).await;
}

#[tokio::test]
async fn a_stream_an_h2c_backend_resets_with_refused_stream_is_sent_again_whatever_its_method() {
    refused_streams_go_elsewhere(REFUSED_STREAM_1).await;
}

/// POSTs to an h2c upstream of a backend refusing with `refusal` and a good one: every
/// one is answered, by the good one, and the refusing one is not held to account.
async fn refused_streams_go_elsewhere(refusal: &'static [u8]) {
    let (closing, refused) = refusing_backend(refusal).await;
    let good = h2_backend(|_req: http::Request<Incoming>| async move {
        http::Response::new(Full::new(Bytes::from_static(b"ok")))
    })
    .await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nupstream = \"h2\"\n[upstreams.h2]\nprotocol = \"h2c\"\nbackends = [{{ addr = \"{closing}\" }}, {{ addr = \"{}\" }}]\n[upstreams.h2.passive]\nconsecutive_failures = 1\nejection = \"60s\"\n",
        good.addr
    ))
    .await;
    // POST is not idempotent: only a request the backend did not process may go again.
    for _ in 0..4 {
        let answer = post(&proxy.url("/"), b"payload".to_vec()).await;
        assert_eq!((answer.status, answer.text().as_str()), (200, "ok"));
    }
    assert!(refused.load(Ordering::SeqCst) >= 1, "no stream was refused");
    // Nothing counts against the backend that refused.
    let status = get(&proxy.admin_url("/status")).await.json();
    let backend = &status["upstreams"]["h2"]["backends"][0];
    assert_eq!(backend["failures"], 0, "{status}");
    assert_eq!(backend["ejected"], false, "{status}");
}

#[tokio::test]
async fn a_backend_waiting_for_a_slow_upload_is_not_cut_off_by_timeouts_read() {
    // Like a gRPC client stream: the backend answers its head at once, then waits for
    // the whole request body before it sends anything more. The client uploads for
    // four times `read`: the silence is the client's, and the answer arrives whole.
    let backend = h2_backend(|req: http::Request<Incoming>| async move {
        use futures_util::StreamExt;
        // `/stall`: after the total, nothing ever again.
        let stall = req.uri().path() == "/stall";
        let total = futures_util::stream::once(async move {
            let n = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(format!(
                "received {n}"
            ))))
        });
        let body = if stall {
            total.chain(futures_util::stream::pending()).boxed()
        } else {
            total.boxed()
        };
        http::Response::new(http_body_util::StreamBody::new(body))
    })
    .await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nupstream = \"h2\"\n[upstreams.h2]\nprotocol = \"h2c\"\nbackends = [{{ addr = \"{}\" }}]\n[upstreams.h2.timeouts]\nread = \"300ms\"\n",
        backend.addr
    ))
    .await;
    // Uploads 60 bytes to `path` in six pieces 200 ms apart; the answer's body, or how it
    // broke off.
    let upload = |path: &'static str| {
        let url = proxy.url(path);
        async move {
            let chunks = Box::pin(futures_util::stream::unfold(0u8, |n| async move {
                if n == 6 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let frame = hyper::body::Frame::data(Bytes::from_static(b"0123456789"));
                Some((Ok::<_, Infallible>(frame), n + 1))
            }));
            let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build_http::<http_body_util::StreamBody<_>>();
            let req = http::Request::post(url)
                .body(http_body_util::StreamBody::new(chunks))
                .expect("request");
            tokio::time::timeout(Duration::from_secs(10), async {
                let resp = client.request(req).await.expect("response head");
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.map(|b| b.to_bytes())
            })
            .await
            .expect("in time")
        }
    };
    let answer = upload("/upload").await;
    assert_eq!(
        answer.as_ref().map(|b| &b[..]).ok(),
        Some(&b"received 60"[..]),
        "{answer:?}"
    );
    // Once the upload is over, the backend's silence counts again.
    let answer = upload("/stall").await;
    assert!(answer.is_err(), "a stalled answer looked whole: {answer:?}");
}
