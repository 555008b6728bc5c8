//! palisade's own HTTP/1.1 client codec (plain upstreams), against raw backends that
//! answer byte for byte what each test scripts: chunked bodies split anywhere, trailers,
//! close-delimited bodies, interim 1xx answers, ambiguous framing, early answers to
//! uploads, oversized heads and bodies cut short.

use crate::common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{get, send, single_upstream, Proxy};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A backend that hands each accepted connection to `script`.
struct Scripted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Scripted {
    async fn start<F, Fut>(script: F) -> Scripted
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(script(stream));
            }
        });
        Scripted {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Scripted {
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

/// Writes `parts` one after another with a short pause between them, so that the proxy
/// reads them in separate pieces.
async fn write_in_pieces(stream: &mut TcpStream, parts: &[&[u8]]) -> bool {
    for part in parts {
        if stream.write_all(part).await.is_err() {
            return false;
        }
        let _ = stream.flush().await;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    true
}

/// GET `url` and read the whole body: the body, or the error the request or the body
/// ended with (within 10 s).
async fn get_whole_body(url: &str) -> Result<Bytes, common::BoxError> {
    common::whole_body(&common::client(), url).await
}

async fn proxy_for(backend: &Scripted) -> Proxy {
    Proxy::start(&single_upstream(&[(backend.addr, 1)], "")).await
}

#[tokio::test]
async fn a_chunked_body_split_anywhere_arrives_whole_and_the_connection_is_reused() {
    let backend = Scripted::start(|mut stream| async move {
        while request_head(&mut stream).await.is_some() {
            // Every boundary lands mid-token: inside the size line, its extension, the
            // data, the CRLF after the data, the last chunk and the trailer section.
            let pieces: [&[u8]; 9] = [
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-kind: chunked\r\n\r\n",
                b"5;na",
                b"me=value\r\nhel",
                b"lo\r",
                b"\n6\r\n wor",
                b"ld\r\n0",
                b"\r\nx-checksum: abc",
                b"\r\n",
                b"\r\n",
            ];
            if !write_in_pieces(&mut stream, &pieces).await {
                return;
            }
        }
    })
    .await;
    let proxy = proxy_for(&backend).await;
    for _ in 0..3 {
        let answer = get(&proxy.url("/")).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), "hello world");
        assert_eq!(answer.header("x-kind"), Some("chunked"));
    }
    assert_eq!(
        backend.accepted(),
        1,
        "a fully read chunked body keeps its connection"
    );
}

#[tokio::test]
async fn trailers_of_a_chunked_response_reach_an_http2_client_without_controlling_fields() {
    // (An HTTP/1.1 client gets none: SPEC drops the hop-by-hop `Trailer` header, and
    // without it hyper sends no trailer fields on HTTP/1.1.) Fields a trailer must not
    // carry (RFC 9110 6.5.1: framing, cookies, caching) are dropped on the way.
    let backend = Scripted::start(|mut stream| async move {
        if request_head(&mut stream).await.is_some() {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                      3\r\nabc\r\n0\r\nx-checksum: 42\r\ncontent-length: 99\r\n\
                      set-cookie: session=stolen\r\ncache-control: public\r\n\r\n",
                )
                .await;
            let mut rest = [0u8; 64];
            let _ = stream.read(&mut rest).await;
        }
    })
    .await;
    let proxy = proxy_for(&backend).await;
    let client = common::h2_client();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(
            http::Request::get(proxy.url("/"))
                .header("te", "trailers")
                .body(Full::new(Bytes::new()))
                .expect("request"),
        ),
    )
    .await
    .expect("in time")
    .expect("response");
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"abc"));
    let trailers = trailers.expect("the trailer section was passed on");
    assert_eq!(trailers["x-checksum"], "42");
    assert_eq!(trailers.len(), 1, "{trailers:?}");
}

#[tokio::test]
async fn a_body_without_length_runs_until_close_and_its_connection_is_not_reused() {
    let backend = Scripted::start(|mut stream| async move {
        if request_head(&mut stream).await.is_some() {
            let pieces: [&[u8]; 3] = [
                b"HTTP/1.1 200 OK\r\nx-kind: eof\r\n\r\nuntil ",
                b"the ",
                b"end",
            ];
            write_in_pieces(&mut stream, &pieces).await;
        }
        // Dropping the stream closes it: that is the end of the body.
    })
    .await;
    let proxy = proxy_for(&backend).await;
    for _ in 0..2 {
        let answer = get(&proxy.url("/")).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), "until the end");
    }
    assert_eq!(
        backend.accepted(),
        2,
        "a close-delimited body ends its connection"
    );
}

#[tokio::test]
async fn interim_100_continue_is_skipped_and_the_final_answer_passed_on() {
    let backend = Scripted::start(|mut stream| async move {
        while request_head(&mut stream).await.is_some() {
            let pieces: [&[u8]; 3] = [
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n",
                b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone",
            ];
            if !write_in_pieces(&mut stream, &pieces).await {
                return;
            }
        }
    })
    .await;
    let proxy = proxy_for(&backend).await;
    let answer = get(&proxy.url("/")).await;
    assert_eq!(answer.status, 201);
    assert_eq!(answer.text(), "done");
    assert_eq!(
        answer.header("link"),
        None,
        "headers of an interim answer leaked"
    );
}

#[tokio::test]
async fn ambiguous_or_broken_answers_are_502_never_guessed_at() {
    // An answer that is not valid HTTP is a protocol error (it was reported as the
    // backend hanging up); one cut off inside its head is the backend hanging up.
    let invalid = "palisade; error=http_protocol_error";
    let cases: [(&str, &'static [u8], &str); 5] = [
        (
            "content-length and transfer-encoding",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            invalid,
        ),
        (
            "differing content-lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
            invalid,
        ),
        ("not HTTP", b"SSH-2.0-OpenSSH_9.2\r\n\r\n", invalid),
        (
            "invalid status",
            b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n",
            invalid,
        ),
        (
            "closed inside the head",
            b"HTTP/1.1 200 OK\r\ncontent-len",
            "palisade; error=connection_terminated",
        ),
    ];
    for (what, raw, expected) in cases {
        let backend = Scripted::start(move |mut stream| async move {
            if request_head(&mut stream).await.is_some() {
                let _ = stream.write_all(raw).await;
            }
        })
        .await;
        let proxy = proxy_for(&backend).await;
        let answer = get(&proxy.url("/")).await;
        assert_eq!(answer.status, 502, "{what}");
        assert_eq!(answer.header("proxy-status"), Some(expected), "{what}");
    }
}

#[tokio::test]
async fn a_response_head_over_64_kib_is_502() {
    let backend = Scripted::start(|mut stream| async move {
        if request_head(&mut stream).await.is_some() {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..100 {
                head.extend_from_slice(format!("x-filler-{i}: ").as_bytes());
                head.extend_from_slice(&[b'f'; 1000]);
                head.extend_from_slice(b"\r\n");
            }
            head.extend_from_slice(b"content-length: 0\r\n\r\n");
            let _ = stream.write_all(&head).await;
        }
    })
    .await;
    let proxy = proxy_for(&backend).await;
    let answer = get(&proxy.url("/")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(
        answer.header("proxy-status"),
        Some("palisade; error=http_protocol_error")
    );
}

#[tokio::test]
async fn a_body_cut_short_aborts_the_client_response_and_the_next_request_is_fine() {
    let backend = Scripted::start(|mut stream| async move {
        if let Some(head) = request_head(&mut stream).await {
            if head.starts_with("GET /short") {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..")
                    .await;
                return;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            let mut rest = [0u8; 64];
            let _ = stream.read(&mut rest).await;
        }
    })
    .await;
    let proxy = proxy_for(&backend).await;
    // However the client learns (the connection closes before or after the head), a
    // truncated body must never look complete.
    let outcome = get_whole_body(&proxy.url("/short")).await;
    assert!(
        outcome.is_err(),
        "a truncated body looked complete: {outcome:?}"
    );
    assert_eq!(get(&proxy.url("/")).await.text(), "ok");
}

#[tokio::test]
async fn a_malformed_chunk_aborts_the_client_response_and_retires_the_connection() {
    // A good chunk, then a size line that is not hex: the head is already on its way to
    // the client, so the body must end in an error, and the connection, its framing
    // lost, must not carry the next request.
    let backend = Scripted::start(|mut stream| async move {
        while let Some(head) = request_head(&mut stream).await {
            let answer: &[u8] = if head.starts_with("GET /bad") {
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\nxx\r\n0\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            };
            if stream.write_all(answer).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = proxy_for(&backend).await;
    let outcome = get_whole_body(&proxy.url("/bad")).await;
    assert!(
        outcome.is_err(),
        "a malformed body looked complete: {outcome:?}"
    );
    assert_eq!(get(&proxy.url("/")).await.text(), "ok");
    assert_eq!(
        backend.accepted(),
        2,
        "the connection with the bad chunk was reused"
    );
}

/// Uploads `size` bytes to `/upload` while reading the answer, until `marker` has
/// arrived, the connection ends, or 10 s pass (`false`); returns what arrived.
async fn upload_until(proxy: SocketAddr, size: usize, marker: &[u8]) -> (Vec<u8>, bool) {
    let mut client = TcpStream::connect(proxy).await.expect("connect");
    client
        .write_all(
            format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("head");
    let (mut reader, mut writer) = client.into_split();
    let upload = tokio::spawn(async move {
        let chunk = vec![b'u'; 64 * 1024];
        for _ in 0..size / chunk.len() {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        while !got.windows(marker.len()).any(|w| w == marker) {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    upload.abort();
    (got, answered.is_ok())
}

#[tokio::test]
async fn an_early_answer_to_an_upload_reaches_the_client() {
    // The backend refuses after the head and never reads the body (as a server enforcing
    // its own size limit does).
    let backend = Scripted::start(|mut stream| async move {
        if request_head(&mut stream).await.is_some() {
            let _ = stream
                .write_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo much")
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
    .await;
    let proxy = Proxy::start(&format!(
        "[server.limits]\nmax_body_bytes = 0\n{}",
        single_upstream(&[(backend.addr, 1)], "")
    ))
    .await;
    // 64 MiB: far more than the socket buffers between palisade and the backend hold.
    let (got, answered) = upload_until(proxy.addr, 64 << 20, b"too much").await;
    assert!(answered, "no answer while the upload was still going");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

/// A backend that answers `200 early` (closing) right after a request's head, then
/// closes at once (`read_body` false) or reads the body to its end first.
async fn early_answer_backend(read_body: bool) -> Scripted {
    Scripted::start(move |mut stream| async move {
        if request_head(&mut stream).await.is_some() {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nearly",
                )
                .await;
            let mut sink = [0u8; 16 * 1024];
            while read_body && matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    })
    .await
}

#[tokio::test]
async fn an_early_answer_from_a_backend_that_then_closes_reaches_the_client() {
    // The backend answers after the head and closes at once, with the body unread: its
    // kernel resets the connection, and palisade's next body write fails (EPIPE or a
    // reset). The answer was already on palisade's side: it is what the client gets, not
    // a 502. Ten uploads, since which write fails first is a race.
    let backend = early_answer_backend(false).await;
    let proxy = proxy_for(&backend).await;
    for round in 0..10 {
        // 4 MiB, well over the 64 KiB palisade reads before forwarding: it streams.
        let (got, _) = upload_until(proxy.addr, 4 << 20, b"\r\n\r\n").await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "round {round}: {text}");
    }
}

#[tokio::test]
async fn a_client_that_uploads_on_after_an_early_answer_is_not_reset() {
    // curl uploads its whole body before it looks at an answer that is not an error: the
    // connection must take what it still sends after the early answer (lingering close),
    // not reset it after the first MiB, or the client's send fails and it never reads the
    // answer. The backend answers after the head and then reads the body to its end.
    let backend = early_answer_backend(true).await;
    let proxy = proxy_for(&backend).await;
    // 8 MiB: under the default max_body_bytes, far over what palisade used to drop.
    let size = 8 << 20;
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
    let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n");
    let chunk = vec![b'u'; 64 * 1024];
    let sent = tokio::time::timeout(Duration::from_secs(30), async {
        client.write_all(head.as_bytes()).await?;
        for _ in 0..size / chunk.len() {
            client.write_all(&chunk).await?;
        }
        client.shutdown().await
    })
    .await
    .expect("the upload ends in time");
    assert!(sent.is_ok(), "the upload was cut off: {sent:?}");
    let mut answer = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
        .await
        .expect("the connection closes");
    let text = String::from_utf8_lossy(&answer);
    assert!(end.is_ok(), "{end:?}: {text}");
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("early"),
        "{text}"
    );
}

#[tokio::test]
async fn header_lines_are_limited_to_128_each_way() {
    // HAProxy allows 101 header lines, Envoy 100; palisade 128, whatever their size: a
    // request with more gets 431, an answer with more a 502 (and no retry: with one
    // backend there is none to try).
    let backend = Scripted::start(|mut stream| async move {
        while let Some(head) = request_head(&mut stream).await {
            let lines = head
                .lines()
                .find_map(|l| l.strip_prefix("x-answer-lines: "))
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let mut answer = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
            for i in 1..lines {
                answer.push_str(&format!("x-h{i}: v\r\n"));
            }
            answer.push_str("\r\nok");
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = proxy_for(&backend).await;
    let request = |lines: usize, answer_lines: usize| {
        let mut raw = format!("GET / HTTP/1.1\r\nhost: x\r\nx-answer-lines: {answer_lines}\r\n");
        for i in 3..lines {
            raw.push_str(&format!("x-r{i}: v\r\n"));
        }
        raw.push_str("connection: close\r\n\r\n");
        raw
    };
    let answer = async |raw: String| {
        common::raw_exchange(proxy.addr, raw.as_bytes(), Duration::from_secs(5))
            .await
            .0
    };
    // 128 request lines and 128 answer lines pass.
    assert!(answer(request(128, 120)).await.starts_with("HTTP/1.1 200"));
    assert!(answer(request(4, 128)).await.starts_with("HTTP/1.1 200"));
    // One more: palisade's own answers.
    let refused = answer(request(129, 1)).await;
    assert!(
        refused.starts_with("HTTP/1.1 431")
            && refused.contains("proxy-status: palisade; error=http_request_error"),
        "{refused}"
    );
    let bad = answer(request(4, 129)).await;
    assert!(
        bad.starts_with("HTTP/1.1 502")
            && bad.contains("proxy-status: palisade; error=http_protocol_error"),
        "{bad}"
    );
}

#[tokio::test]
async fn request_bodies_are_framed_for_the_backend_as_they_arrive() {
    // The backend answers with what it received: the framing headers and the raw body.
    let backend = Scripted::start(|mut stream| async move {
        while let Some(head) = request_head(&mut stream).await {
            let lower = head.to_ascii_lowercase();
            let length = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let mut body = Vec::new();
            if let Some(length) = length {
                body.resize(length, 0);
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
            } else if lower.contains("transfer-encoding: chunked") {
                let mut byte = [0u8; 1];
                while !body.ends_with(b"0\r\n\r\n") {
                    if !matches!(stream.read(&mut byte).await, Ok(1)) {
                        return;
                    }
                    body.push(byte[0]);
                }
            }
            let framing = if length.is_some() {
                format!("length {}", length.unwrap_or_default())
            } else if lower.contains("transfer-encoding: chunked") {
                "chunked".to_owned()
            } else {
                "none".to_owned()
            };
            let answer = format!(
                "HTTP/1.1 200 OK\r\nx-framing: {framing}\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            if stream.write_all(answer.as_bytes()).await.is_err()
                || stream.write_all(&body).await.is_err()
            {
                return;
            }
        }
    })
    .await;
    let proxy = proxy_for(&backend).await;

    let post = send(
        http::Request::post(proxy.url("/"))
            .body(Full::new(Bytes::from_static(b"twelve bytes")))
            .expect("request"),
    )
    .await;
    assert_eq!(post.header("x-framing"), Some("length 12"));
    assert_eq!(post.text(), "twelve bytes");

    let empty_post = send(
        http::Request::post(proxy.url("/"))
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await;
    assert_eq!(empty_post.header("x-framing"), Some("length 0"));

    let get_answer = get(&proxy.url("/")).await;
    assert_eq!(get_answer.header("x-framing"), Some("none"));

    // A chunked upload stays chunked (its length is unknown up front), re-framed by
    // palisade: the backend sees the same bytes in well-formed chunks.
    let mut raw = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    raw.extend_from_slice(b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n");
    let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
    conn.write_all(&raw).await.expect("write");
    let head = common::read_head(&mut conn).await;
    assert!(
        head.to_ascii_lowercase().contains("x-framing: chunked"),
        "{head}"
    );
    assert_eq!(
        backend.accepted(),
        1,
        "every request reused the one connection"
    );
}

/// A backend answer with mixed-case names, padded values, repeated fields, its own Date
/// and hop-by-hop lines scattered among the others.
const DECORATED: &[u8] = b"HTTP/1.1 200 OK\r\n\
    Server: Scripted\r\n\
    Keep-Alive: timeout=5\r\n\
    X-Mixed-Case:  padded value \t\r\n\
    Connection: keep-alive\r\n\
    Set-Cookie: a=1\r\n\
    Content-Length: 2\r\n\
    Date: Tue, 01 Dec 2026 00:00:00 GMT\r\n\
    Set-Cookie: b=2\r\n\
    \r\nok";

/// A backend that answers every request on a connection with `answer`.
async fn answering(answer: &'static [u8]) -> Scripted {
    Scripted::start(move |mut stream| async move {
        while request_head(&mut stream).await.is_some() {
            if stream.write_all(answer).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn an_http1_client_gets_the_backends_header_lines_as_written_minus_hop_by_hop() {
    let backend = answering(DECORATED).await;
    let proxy = proxy_for(&backend).await;
    let (answer, _) = common::raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
    assert_eq!(body, "ok");
    let lines: Vec<&str> = head.split("\r\n").collect();
    assert_eq!(lines[0], "HTTP/1.1 200 OK");
    // In order, spelled as the backend spelled them; the hop-by-hop lines are gone, and
    // the codec adds only its own Connection: close (the client asked for it).
    assert_eq!(
        &lines[1..7],
        [
            "Server: Scripted",
            "X-Mixed-Case:  padded value \t",
            "Set-Cookie: a=1",
            "Content-Length: 2",
            "Date: Tue, 01 Dec 2026 00:00:00 GMT",
            "Set-Cookie: b=2",
        ],
        "{head}"
    );
    assert_eq!(lines[7..], ["connection: close"], "{head}");
}

#[tokio::test]
async fn an_http2_client_gets_the_same_headers_as_fields() {
    let backend = answering(DECORATED).await;
    let proxy = proxy_for(&backend).await;
    let client = common::h2_client();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(
            http::Request::get(proxy.url("/"))
                .body(Full::new(Bytes::new()))
                .expect("request"),
        ),
    )
    .await
    .expect("in time")
    .expect("response");
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["server"], "Scripted");
    assert_eq!(h["x-mixed-case"], "padded value");
    assert_eq!(h["date"], "Tue, 01 Dec 2026 00:00:00 GMT");
    let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert!(
        h.get("keep-alive").is_none() && h.get("connection").is_none(),
        "{h:?}"
    );
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, Bytes::from_static(b"ok"));
}

#[tokio::test]
async fn headers_a_backends_connection_header_names_are_not_passed_on() {
    let backend = answering(
        b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\n\
          X-Hop: secret\r\nX-Stay: yes\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let proxy = proxy_for(&backend).await;
    for _ in 0..2 {
        let answer = get(&proxy.url("/")).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), "ok");
        assert_eq!(answer.header("x-stay"), Some("yes"));
        assert_eq!(answer.header("x-hop"), None);
        assert_eq!(answer.header("connection"), None);
    }
    assert_eq!(backend.accepted(), 1, "the connection was kept");
}

/// A backend that answers each connection's first request, then reads the next and
/// closes without a byte, as if its keep-alive timeout ran out as the request came.
async fn closing_on_the_second_request() -> Scripted {
    Scripted::start(|mut stream| async move {
        if request_head(&mut stream).await.is_some() {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            let _ = request_head(&mut stream).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_pooled_connection_closed_without_an_answer_gets_an_idempotent_request_again() {
    // The backend answers a connection's first request, then reads the next and closes
    // without a byte (a keep-alive timeout racing the next request does this). A GET on
    // that pooled connection went wrong 1 % of the time in an audit (nginx: never); it
    // goes on a fresh connection. A POST is not sent twice.
    let backend = closing_on_the_second_request().await;
    let proxy = proxy_for(&backend).await;
    for i in 0..3 {
        let answer = get(&proxy.url("/")).await;
        assert_eq!(
            answer.status,
            200,
            "GET {i}: {:?}",
            answer.header("proxy-status")
        );
    }
    // Three GETs: the first on a new connection, each next one tried on the pooled one
    // first and sent again on a new one.
    assert_eq!(backend.accepted(), 3);
    // So is a PUT whose body is held in memory, beyond what goes out with the head.
    let put = common::send(
        http::Request::put(proxy.url("/"))
            .body(Full::new(Bytes::from(vec![b'p'; 20 * 1024])))
            .expect("request"),
    )
    .await;
    assert_eq!(put.status, 200, "{:?}", put.header("proxy-status"));
    assert_eq!(backend.accepted(), 4);
    // The PUT's connection is pooled: a POST on it is not sent again.
    let resp = common::post(&proxy.url("/"), b"x".to_vec()).await;
    assert_eq!(resp.status, 502);
    assert_eq!(
        resp.header("proxy-status"),
        Some("palisade; error=connection_terminated")
    );
}

#[tokio::test]
async fn a_request_that_cannot_be_sent_again_does_not_go_on_a_connection_idle_over_a_second() {
    // Backends close idle connections on their own schedule (uvicorn and Node.js after
    // 5 s): a POST sent on one just as it closes was lost (about 1 % of uploads after 5 s
    // pauses in an audit). This backend closes every connection on its second request,
    // as if its keep-alive timeout had run out; a POST after a pause gets a new one.
    let backend = closing_on_the_second_request().await;
    let proxy = proxy_for(&backend).await;
    assert_eq!(get(&proxy.url("/")).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let answer = common::post(&proxy.url("/"), b"x".to_vec()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.header("proxy-status"));
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn a_request_closed_on_unanswered_is_sent_again_once_then_on_a_new_connection() {
    // A request that itself brings its worker down looks like a connection closed as
    // idle: it is sent again once, then on a new connection, not on every pooled one.
    let heads = Arc::new(AtomicUsize::new(0));
    let seen = heads.clone();
    let backend = Scripted::start(move |mut stream| {
        let seen = seen.clone();
        async move {
            if request_head(&mut stream).await.is_some() {
                seen.fetch_add(1, Ordering::SeqCst);
                // Slow enough that three requests at once need three connections.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                if request_head(&mut stream).await.is_some() {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    })
    .await;
    let proxy = proxy_for(&backend).await;
    let url = proxy.url("/");
    let (a, b, c) = tokio::join!(get(&url), get(&url), get(&url));
    assert_eq!([a.status, b.status, c.status], [200, 200, 200]);
    assert_eq!(backend.accepted(), 3);
    // Three pooled connections, each closing on its next request: one is tried, then a
    // new connection answers.
    assert_eq!(get(&url).await.status, 200);
    assert_eq!(backend.accepted(), 4);
    assert_eq!(heads.load(Ordering::SeqCst), 5);
}

/// A backend that answers `/silent` with a head and 10 bytes of a 100-byte body, then
/// sends nothing more (counting in `closed` when palisade closes that connection), and
/// `/trickle` with a chunked body of ten chunks, one every 100 ms.
async fn silent_mid_body(closed: Arc<AtomicUsize>) -> Scripted {
    Scripted::start(move |mut stream| {
        let closed = closed.clone();
        async move {
            let Some(head) = request_head(&mut stream).await else {
                return;
            };
            if head.starts_with("GET /silent") {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst ten.")
                    .await;
                let mut rest = [0u8; 64];
                while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if stream.write_all(b"1\r\nx\r\n").await.is_err() {
                    return;
                }
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
    })
    .await
}

#[tokio::test]
async fn a_backend_silent_mid_body_past_timeouts_read_is_cut_off_and_counted() {
    let closed = Arc::new(AtomicUsize::new(0));
    let backend = silent_mid_body(closed.clone()).await;
    let proxy = Proxy::start(&single_upstream(
        &[(backend.addr, 1)],
        "[upstreams.app.timeouts]\nread = \"300ms\"\n",
    ))
    .await;
    // The client learns that the body broke off (the head went out with 200), for
    // HTTP/1.1 and HTTP/2 clients alike, instead of waiting forever.
    let outcome = get_whole_body(&proxy.url("/silent")).await;
    assert!(outcome.is_err(), "a cut-off body looked whole: {outcome:?}");
    let h2 = common::whole_body(&common::h2_client(), &proxy.url("/silent")).await;
    assert!(
        h2.is_err(),
        "a cut-off body looked whole over HTTP/2: {h2:?}"
    );
    // Both backend connections are closed, not kept for good.
    let both = common::eventually(Duration::from_secs(5), async || {
        closed.load(Ordering::SeqCst) == 2
    })
    .await;
    assert!(both, "closed {} of 2", closed.load(Ordering::SeqCst));
    let metrics = get(&format!("http://{}/metrics", proxy.admin)).await.text();
    let series = format!(
        "palisade_upstream_body_errors_total{{backend=\"{}\",upstream=\"app\"}} 2",
        backend.addr
    );
    assert!(metrics.lines().any(|l| l == series), "{metrics}");

    // The limit is on silence, not on the whole body: a body that takes a second in
    // steps of 100 ms arrives whole.
    let trickled = get_whole_body(&proxy.url("/trickle"))
        .await
        .expect("a trickling body arrives whole");
    assert_eq!(&trickled[..], b"xxxxxxxxxx");
}

#[tokio::test]
async fn time_a_client_takes_to_read_never_counts_against_timeouts_read() {
    // 32 MiB answered at once: the sockets fill, the backend waits on palisade and
    // palisade on the client, which reads nothing for three times `read`.
    const SIZE: usize = 32 << 20;
    let backend = Scripted::start(|mut stream| async move {
        if request_head(&mut stream).await.is_some() {
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {SIZE}\r\n\r\n");
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&vec![b'x'; SIZE]).await;
        }
    })
    .await;
    let proxy = Proxy::start(&single_upstream(
        &[(backend.addr, 1)],
        "[upstreams.app.timeouts]\nread = \"300ms\"\n",
    ))
    .await;
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
    client
        .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("request");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut got = Vec::with_capacity(SIZE + 1024);
    tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut got))
        .await
        .expect("the answer arrives in time")
        .expect("read");
    let body_at = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    assert!(got.starts_with(b"HTTP/1.1 200"));
    assert_eq!(got.len() - body_at, SIZE, "the body was cut short");
}
