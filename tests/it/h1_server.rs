//! The client-facing HTTP/1.x server, over raw sockets: keep-alive and pipelining,
//! HTTP/1.0 and `Connection: close`, HEAD, request bodies by length and chunked,
//! `Expect: 100-continue`, how an answer of unknown length is framed for 1.1 and 1.0
//! clients, uploads refused before their body, lenient request forms, heads that are
//! too large or not HTTP at all, clients that leave mid-head, the status line and Date,
//! bodiless 204/304 answers and a large answer byte for byte. And the failure paths and
//! edge cases of palisade's own codec: upgrades with bytes already sent past the 101 from
//! either side, clients that leave mid-body, the 413 a client still sending its body
//! receives whole (lingering close), malformed chunked bodies, first bytes that look like
//! an HTTP/2 preface but are not one, a request in flight at drain, and a request that
//! arrives one byte per write.
//!
//! These tests pin behaviour the client sees, whatever codec palisade's server side runs
//! on. The clients here write bytes and parse answers themselves (RFC 9112 framing: no
//! body after HEAD, 1xx, 204 and 304; then chunked; then Content-Length; else until
//! close), in front of a raw backend whose answers are scripted byte for byte per path.
//! Every read is bounded: a server that stops answering fails the test instead of
//! hanging it.

use crate::common;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, single_upstream, Proxy};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long a client waits for the next bytes of an answer (or for the close).
const CLIENT_WAIT: Duration = Duration::from_secs(5);

/// 1 MiB: the size of `/big`.
const BIG: usize = 1 << 20;

/// `n` bytes that do not repeat with any short period, so a lost, doubled or reordered
/// piece of a large body shows.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i % 251) ^ (i >> 11)) as u8).collect()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A byte stream with a read buffer: one side of a connection, client or backend (or the
/// read half of one).
struct Wire<S = TcpStream> {
    stream: S,
    buf: Vec<u8>,
    /// The longest wait for more bytes (None: wait as long as it takes).
    limit: Option<Duration>,
}

impl<S: AsyncRead + Unpin> Wire<S> {
    /// Reads more bytes into the buffer: Ok(0) at end of stream.
    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = match self.limit {
            Some(limit) => tokio::time::timeout(limit, self.stream.read(&mut chunk))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no bytes in time"))??,
            None => self.stream.read(&mut chunk).await?,
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next head (without its blank line); None if the peer closed before sending
    /// a byte of it.
    async fn head(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return Ok(Some(String::from_utf8_lossy(&head[..end]).into_owned()));
            }
            if self.fill().await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "closed inside a head: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        }
    }

    /// Exactly `n` bytes.
    async fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed after {} of {n} bytes", self.buf.len()),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// One line, without its CRLF.
    async fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed inside a line",
                ));
            }
        }
    }

    /// A chunked body, decoded (extensions and trailer fields are read and dropped).
    async fn chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.line().await?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {line:?}"))
            })?;
            if size == 0 {
                while !self.line().await?.is_empty() {}
                return Ok(body);
            }
            body.extend_from_slice(&self.take(size).await?);
            if !self.line().await?.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no CRLF after chunk data",
                ));
            }
        }
    }

    /// Everything until the peer closes (a reset counts as the close).
    async fn rest(&mut self) -> io::Result<Vec<u8>> {
        loop {
            match self.fill().await {
                Ok(0) => return Ok(std::mem::take(&mut self.buf)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(e),
                Err(_) => return Ok(std::mem::take(&mut self.buf)),
            }
        }
    }
}

/// A parsed head: its first line and its fields in order.
#[derive(Debug)]
struct Head {
    line: String,
    fields: Vec<(String, String)>,
}

impl Head {
    fn parse(text: &str) -> Head {
        let mut lines = text.split("\r\n");
        let line = lines.next().unwrap_or_default().to_owned();
        let fields = lines
            .filter_map(|l| {
                let (name, value) = l.split_once(':')?;
                Some((name.to_ascii_lowercase(), value.trim().to_owned()))
            })
            .collect();
        Head { line, fields }
    }

    /// The first value of `name`.
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn count(&self, name: &str) -> usize {
        self.fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    /// Whether the comma-separated field `name` lists `token` (case-insensitively).
    fn lists(&self, name: &str, token: &str) -> bool {
        self.fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The status of a response head (0 if the line is not a status line).
    fn status(&self) -> u16 {
        self.line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

/// How a response body was delimited.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// No body by rule (HEAD, 1xx, 204, 304).
    Bodiless,
    Length(usize),
    Chunked,
    /// Neither length nor chunked: the body ran until the server closed.
    Close,
}

#[derive(Debug)]
struct Answer {
    head: Head,
    body: Vec<u8>,
    framing: Framing,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.x client on one connection (or on its read half, while another task
/// writes).
struct Client<S = TcpStream> {
    wire: Wire<S>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Client {
            wire: Wire {
                stream,
                buf: Vec::new(),
                limit: Some(CLIENT_WAIT),
            },
        }
    }

    async fn send(&mut self, raw: impl AsRef<[u8]>) {
        self.wire
            .stream
            .write_all(raw.as_ref())
            .await
            .expect("write");
        self.wire.stream.flush().await.expect("flush");
    }
}

impl<S: AsyncRead + Unpin> Client<S> {
    /// A client reading from `stream` (e.g. the read half of a split connection).
    fn reading(stream: S) -> Client<S> {
        Client {
            wire: Wire {
                stream,
                buf: Vec::new(),
                limit: Some(CLIENT_WAIT),
            },
        }
    }

    /// The next head, whatever it is (an interim 1xx included).
    async fn head(&mut self) -> Head {
        let text = self
            .wire
            .head()
            .await
            .expect("a response head in time")
            .expect("a response head, not a closed connection");
        Head::parse(&text)
    }

    /// The next final answer to a request with `method`, its body read by the framing
    /// rules of RFC 9112 section 6.3.
    async fn answer(&mut self, method: &str) -> Answer {
        let head = self.head().await;
        assert!(
            head.line.starts_with("HTTP/1."),
            "not a status line: {head:?}"
        );
        let status = head.status();
        let (body, framing) =
            if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
                (Vec::new(), Framing::Bodiless)
            } else if head.lists("transfer-encoding", "chunked") {
                let body = self.wire.chunked().await.expect("a whole chunked body");
                (body, Framing::Chunked)
            } else if let Some(length) = head.get("content-length") {
                let length: usize = length.parse().expect("a numeric content-length");
                let body = self.wire.take(length).await.expect("the whole body");
                (body, Framing::Length(length))
            } else {
                let body = self
                    .wire
                    .rest()
                    .await
                    .expect("a body ended by close in time");
                (body, Framing::Close)
            };
        Answer {
            head,
            body,
            framing,
        }
    }

    /// Asserts that the server closes the connection without sending anything more.
    async fn expect_closed(&mut self, what: &str) {
        match self.wire.rest().await {
            Ok(extra) => assert!(
                extra.is_empty(),
                "{what}: bytes after the answer: {:?}",
                String::from_utf8_lossy(&extra)
            ),
            Err(e) => panic!("{what}: the connection stayed open ({e})"),
        }
    }
}

/// A GET with `extra` header lines (each ending in CRLF).
fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: test\r\n{extra}\r\n")
}

/// A raw backend on 127.0.0.1 that answers by path, keeps its connections alive, and
/// records what reached it:
/// - `/upload`: the request body back, `x-framing: length N` or `chunked` (how it came)
///   and `x-expect` (the Expect field it saw, or `none`);
/// - `/chunked`: `first,second,third` in three chunks written apart, no length;
/// - `/head`: `content-length: 1234` (the body, 1234 bytes, only for GET);
/// - `/status/204`, `/status/304`: those, no body;
/// - `/big`: [`BIG`] bytes of [`pattern`];
/// - `/slow/...`: the default answer after 150 ms;
/// - anything else: `METHOD PATH` as the body, with a length.
///
/// It sends no Date field of its own.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let wire = Wire {
                    stream,
                    buf: Vec::new(),
                    limit: None,
                };
                tokio::spawn(backend_connection(wire, log.clone()));
            }
        });
        Backend { addr, seen, task }
    }

    /// The requests that reached it so far, as `METHOD PATH`.
    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("seen").clone()
    }

    async fn proxy(&self) -> Proxy {
        Proxy::start(&single_upstream(&[(self.addr, 1)], "")).await
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend_connection(mut wire: Wire, seen: Arc<Mutex<Vec<String>>>) {
    while let Ok(Some(text)) = wire.head().await {
        let head = Head::parse(&text);
        let mut parts = head.line.split(' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let expect = head.get("expect").unwrap_or("none").to_owned();
        if expect.eq_ignore_ascii_case("100-continue")
            && wire
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let (body, framing) = if head.lists("transfer-encoding", "chunked") {
            match wire.chunked().await {
                Ok(body) => (body, "chunked".to_owned()),
                Err(_) => return,
            }
        } else if let Some(length) = head.get("content-length") {
            let length: usize = length.parse().unwrap_or(0);
            match wire.take(length).await {
                Ok(body) => (body, format!("length {length}")),
                Err(_) => return,
            }
        } else {
            (Vec::new(), "none".to_owned())
        };
        seen.lock().expect("seen").push(format!("{method} {path}"));
        let head_only = method == "HEAD";
        let answer: Vec<u8> = match path.as_str() {
            "/upload" => {
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\nx-framing: {framing}\r\nx-expect: {expect}\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                out.extend_from_slice(&body);
                out
            }
            "/chunked" => {
                let pieces: [&[u8]; 5] = [
                    b"HTTP/1.1 200 OK\r\nx-from: backend\r\ntransfer-encoding: chunked\r\n\r\n",
                    b"6\r\nfirst,\r\n",
                    b"7\r\nsecond,\r\n",
                    b"5\r\nthird\r\n",
                    b"0\r\n\r\n",
                ];
                for piece in pieces {
                    if wire.stream.write_all(piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                continue;
            }
            "/head" => {
                let mut out =
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1234\r\n\r\n"
                        .to_vec();
                if !head_only {
                    out.extend_from_slice(&[b'h'; 1234]);
                }
                out
            }
            "/status/204" => b"HTTP/1.1 204 No Content\r\nx-from: backend\r\n\r\n".to_vec(),
            "/status/304" => {
                b"HTTP/1.1 304 Not Modified\r\nx-from: backend\r\netag: \"v1\"\r\n\r\n".to_vec()
            }
            "/big" => {
                let mut out =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").into_bytes();
                out.extend_from_slice(&pattern(BIG));
                out
            }
            _ => {
                if path.starts_with("/slow/") {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                let body = format!("{method} {path}");
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                if !head_only {
                    out.extend_from_slice(body.as_bytes());
                }
                out
            }
        };
        if wire.stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn three_requests_in_turn_are_answered_on_one_keep_alive_connection() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    for path in ["/one", "/two", "/three"] {
        client.send(get(path, "")).await;
        let answer = client.answer("GET").await;
        assert!(
            answer.head.line.starts_with("HTTP/1.1 200"),
            "{:?}",
            answer.head
        );
        assert_eq!(answer.text(), format!("GET {path}"));
        assert_eq!(answer.framing, Framing::Length(path.len() + 4));
        assert!(
            !answer.head.lists("connection", "close"),
            "an HTTP/1.1 answer asked to close: {:?}",
            answer.head
        );
    }
    assert_eq!(backend.seen(), ["GET /one", "GET /two", "GET /three"]);
}

#[tokio::test]
async fn pipelined_requests_in_one_write_are_answered_in_order() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    // The first is the slowest for the backend: its answer still comes first.
    let paths = ["/slow/first", "/second", "/third"];
    let burst: String = paths.iter().map(|p| get(p, "")).collect();
    client.send(burst).await;
    for path in paths {
        let answer = client.answer("GET").await;
        assert_eq!(answer.head.status(), 200, "{path}: {:?}", answer.head);
        assert_eq!(answer.text(), format!("GET {path}"));
    }
    // And the connection goes on after the burst.
    client.send(get("/fourth", "")).await;
    assert_eq!(client.answer("GET").await.text(), "GET /fourth");
}

#[tokio::test]
async fn an_http10_request_without_keep_alive_is_answered_and_the_connection_closed() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    client.send("GET /ten HTTP/1.0\r\nhost: test\r\n\r\n").await;
    let answer = client.answer("GET").await;
    // The status line says HTTP/1.1, as nginx's and HAProxy's do (RFC 9110, 6.2): the
    // highest version palisade speaks within the client's major version.
    assert!(
        answer.head.line.starts_with("HTTP/1.1 200"),
        "{:?}",
        answer.head
    );
    assert_eq!(answer.text(), "GET /ten");
    assert_eq!(answer.framing, Framing::Length(8));
    assert!(
        !answer.head.lists("connection", "keep-alive"),
        "{:?}",
        answer.head
    );
    client.expect_closed("HTTP/1.0 without keep-alive").await;
}

#[tokio::test]
async fn an_http10_request_with_keep_alive_is_answered_and_the_connection_kept() {
    // ApacheBench's -k and old clients keep HTTP/1.0 connections alive by asking: the
    // answer says `connection: keep-alive` and the connection serves the next request
    // (hyper's server closed it instead).
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("GET /ten-a HTTP/1.0\r\nhost: test\r\nconnection: keep-alive\r\n\r\n")
        .await;
    let answer = client.answer("GET").await;
    assert!(
        answer.head.line.starts_with("HTTP/1.1 200"),
        "{:?}",
        answer.head
    );
    assert_eq!(answer.framing, Framing::Length(10));
    assert_eq!(answer.text(), "GET /ten-a");
    assert!(
        answer.head.lists("connection", "keep-alive"),
        "{:?}",
        answer.head
    );
    // The next request without keep-alive is answered, and then the connection ends.
    client
        .send("GET /ten-b HTTP/1.0\r\nhost: test\r\n\r\n")
        .await;
    let answer = client.answer("GET").await;
    assert_eq!(answer.text(), "GET /ten-b");
    assert!(
        !answer.head.lists("connection", "keep-alive"),
        "{:?}",
        answer.head
    );
    client
        .expect_closed("HTTP/1.0 answered without keep-alive")
        .await;
}

#[tokio::test]
async fn connection_close_from_the_client_is_repeated_in_the_answer_and_the_connection_closed() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    client.send(get("/first", "")).await;
    assert_eq!(client.answer("GET").await.text(), "GET /first");
    client.send(get("/last", "connection: close\r\n")).await;
    let answer = client.answer("GET").await;
    assert_eq!(answer.head.status(), 200);
    assert_eq!(answer.text(), "GET /last");
    assert!(
        answer.head.lists("connection", "close"),
        "{:?}",
        answer.head
    );
    client.expect_closed("after Connection: close").await;
}

#[tokio::test]
async fn a_head_answer_carries_the_backends_length_and_no_body() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    // Pipelined: had any body bytes followed the HEAD answer, the next answer's status
    // line would not come right after its head.
    client
        .send(format!(
            "HEAD /head HTTP/1.1\r\nhost: test\r\n\r\n{}",
            get("/after-head", "")
        ))
        .await;
    let head = client.answer("HEAD").await;
    assert_eq!(head.head.status(), 200, "{:?}", head.head);
    assert_eq!(head.head.get("content-length"), Some("1234"));
    assert_eq!(head.head.get("transfer-encoding"), None);
    let next = client.answer("GET").await;
    assert!(
        next.head.line.starts_with("HTTP/1.1 200"),
        "{:?}",
        next.head
    );
    assert_eq!(next.text(), "GET /after-head");
    // The GET of the same path has the body.
    client.send(get("/head", "")).await;
    let full = client.answer("GET").await;
    assert_eq!(full.body, vec![b'h'; 1234]);
    assert_eq!(
        backend.seen(),
        ["HEAD /head", "GET /after-head", "GET /head"]
    );
}

#[tokio::test]
async fn request_bodies_by_length_and_chunked_reach_the_backend_intact_and_the_connection_is_reused(
) {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;

    // By Content-Length, larger than one read.
    let body = pattern(100_000);
    let mut post = format!(
        "POST /upload HTTP/1.1\r\nhost: test\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    post.extend_from_slice(&body);
    client.send(post).await;
    let answer = client.answer("POST").await;
    assert_eq!(answer.head.status(), 200, "{:?}", answer.head);
    // A body with a length reaches the backend with that length.
    assert_eq!(answer.head.get("x-framing"), Some("length 100000"));
    assert!(answer.body == body, "the length-delimited body changed");

    // Chunked, in separate writes: a chunk extension, chunk sizes in either case, a
    // trailer field.
    client
        .send("POST /upload HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    let pieces: [&[u8]; 5] = [
        b"5;note=first\r\nhello\r\n",
        b"1\r\n \r\n",
        b"A\r\n0123456789\r\n",
        b"b\r\nabcdefghijk\r\n",
        b"0\r\nx-checksum: 42\r\n\r\n",
    ];
    for piece in pieces {
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.send(piece).await;
    }
    let answer = client.answer("POST").await;
    assert_eq!(answer.head.status(), 200, "{:?}", answer.head);
    assert_eq!(answer.text(), "hello 0123456789abcdefghijk");

    // An empty chunked body.
    client
        .send("POST /upload HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        .await;
    let answer = client.answer("POST").await;
    assert_eq!(answer.head.status(), 200, "{:?}", answer.head);
    assert_eq!(answer.text(), "");

    // The connection carries on, with and without bodies (the codec hands the connection
    // to each body's reader and takes it back).
    client.send(get("/after-uploads", "")).await;
    assert_eq!(client.answer("GET").await.text(), "GET /after-uploads");
    client
        .send("POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 5\r\n\r\nagain")
        .await;
    assert_eq!(client.answer("POST").await.text(), "again");
    client.send(get("/last", "")).await;
    assert_eq!(client.answer("GET").await.text(), "GET /last");
    assert_eq!(
        backend.seen(),
        [
            "POST /upload",
            "POST /upload",
            "POST /upload",
            "GET /after-uploads",
            "POST /upload",
            "GET /last"
        ]
    );
}

#[tokio::test]
async fn expect_100_continue_gets_100_before_the_body_is_sent_then_the_final_answer() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("POST /upload HTTP/1.1\r\nhost: test\r\nexpect: 100-continue\r\ncontent-length: 11\r\n\r\n")
        .await;
    // Nothing of the body has been sent: the 100 must come first.
    let interim = client.head().await;
    assert!(
        interim.line.starts_with("HTTP/1.1 100"),
        "no 100 Continue before the body: {interim:?}"
    );
    client.send("hello world").await;
    // (Not pinned: today the Expect field is also passed on to the backend, which says
    // 100 itself; palisade's client skips that interim answer.)
    let answer = client.answer("POST").await;
    assert_eq!(answer.head.status(), 200, "{:?}", answer.head);
    assert_eq!(answer.text(), "hello world");
    assert_eq!(answer.head.get("x-framing"), Some("length 11"));
    // The connection carries on.
    client.send(get("/after-continue", "")).await;
    assert_eq!(client.answer("GET").await.text(), "GET /after-continue");
}

#[tokio::test]
async fn an_upload_refused_before_its_body_gets_the_final_answer_without_100_continue() {
    let backend = Backend::start().await;
    let cfg = host_route_config(
        backend.addr,
        "test",
        "[server.limits]\nmax_body_bytes = 1000\n",
    );
    let proxy = Proxy::start(&cfg).await;
    // Declared larger than max_body_bytes: 413 straight away, then the close.
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("POST /upload HTTP/1.1\r\nhost: test\r\nexpect: 100-continue\r\ncontent-length: 50000\r\n\r\n")
        .await;
    let answer = client.answer("POST").await;
    assert!(
        answer.head.line.starts_with("HTTP/1.1 413"),
        "{:?}",
        answer.head
    );
    assert_eq!(
        answer.head.get("proxy-status"),
        Some("palisade; error=http_request_error")
    );
    assert!(
        answer.head.lists("connection", "close"),
        "{:?}",
        answer.head
    );
    client.expect_closed("after 413").await;
    // No route: 404 straight away (what becomes of the connection is not pinned: hyper
    // closes it, without saying so, since the body it announced was never read).
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("POST /upload HTTP/1.1\r\nhost: elsewhere.test\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n")
        .await;
    let answer = client.answer("POST").await;
    assert!(
        answer.head.line.starts_with("HTTP/1.1 404"),
        "{:?}",
        answer.head
    );
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
}

#[tokio::test]
async fn lenient_request_forms_are_served() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    // Empty lines before a request line (RFC 9112 section 2.2) are skipped, also
    // between pipelined requests.
    client
        .send("\r\nGET /after-crlf HTTP/1.1\r\nhost: test\r\n\r\n\r\n\r\nGET /after-crlfs HTTP/1.1\r\nhost: test\r\n\r\n")
        .await;
    assert_eq!(client.answer("GET").await.text(), "GET /after-crlf");
    assert_eq!(client.answer("GET").await.text(), "GET /after-crlfs");
    // Bare LF line ends.
    client.send("GET /bare-lf HTTP/1.1\nhost: test\n\n").await;
    assert_eq!(client.answer("GET").await.text(), "GET /bare-lf");
    // An absolute-form target: the backend gets the origin form.
    client
        .send("GET http://test/absolute?q=1 HTTP/1.1\r\nhost: test\r\n\r\n")
        .await;
    assert_eq!(client.answer("GET").await.text(), "GET /absolute?q=1");
    // Header names in any case, no space after the colon, tabs around the value.
    client
        .send("GET /cases HTTP/1.1\r\nHOST:test\r\nX-Odd-Case:\tvalue\t\r\n\r\n")
        .await;
    assert_eq!(client.answer("GET").await.text(), "GET /cases");
    assert_eq!(
        backend.seen(),
        [
            "GET /after-crlf",
            "GET /after-crlfs",
            "GET /bare-lf",
            "GET /absolute?q=1",
            "GET /cases"
        ]
    );
}

#[tokio::test]
async fn an_answer_without_length_reaches_an_http11_client_chunked() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    client.send(get("/chunked", "")).await;
    let answer = client.answer("GET").await;
    assert_eq!(answer.head.status(), 200, "{:?}", answer.head);
    assert_eq!(answer.framing, Framing::Chunked, "{:?}", answer.head);
    assert_eq!(answer.head.get("content-length"), None);
    assert_eq!(answer.head.get("x-from"), Some("backend"));
    assert_eq!(answer.text(), "first,second,third");
    // A chunked answer, read to its last chunk, leaves the connection usable.
    client.send(get("/after-chunked", "")).await;
    assert_eq!(client.answer("GET").await.text(), "GET /after-chunked");
}

#[tokio::test]
async fn an_answer_without_length_reaches_an_http10_client_delimited_by_the_close() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    // With and without keep-alive asked for: an HTTP/1.0 client cannot take chunked, so
    // the body runs until the close, and the connection cannot be kept.
    for keep_alive in ["", "connection: keep-alive\r\n"] {
        let mut client = Client::connect(proxy.addr).await;
        client
            .send(format!(
                "GET /chunked HTTP/1.0\r\nhost: test\r\n{keep_alive}\r\n"
            ))
            .await;
        let answer = client.answer("GET").await;
        assert!(
            answer.head.line.starts_with("HTTP/1.1 200"),
            "{:?}",
            answer.head
        );
        assert_eq!(
            answer.framing,
            Framing::Close,
            "{keep_alive:?}: {:?}",
            answer.head
        );
        assert_eq!(answer.head.get("transfer-encoding"), None);
        assert!(
            !answer.head.lists("connection", "keep-alive"),
            "{keep_alive:?}: {:?}",
            answer.head
        );
        assert_eq!(answer.text(), "first,second,third", "{keep_alive:?}");
    }
}

#[tokio::test]
async fn a_request_head_over_max_header_bytes_gets_431_and_a_closed_connection() {
    let backend = Backend::start().await;
    let cfg = format!(
        "[server.limits]\nmax_header_bytes = 16384\n{}",
        single_upstream(&[(backend.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;

    // Under the limit (15 KiB of 16): served.
    let mut client = Client::connect(proxy.addr).await;
    let filler = "f".repeat(15 * 1024);
    client
        .send(get("/fits", &format!("x-filler: {filler}\r\n")))
        .await;
    assert_eq!(client.answer("GET").await.text(), "GET /fits");

    // Over it (a third more, in one field or in many): 431, then the close. (Not pinned:
    // the body and Proxy-Status of this answer. Today hyper writes it, empty and without
    // the Proxy-Status SPEC asks of palisade's errors; and hyper cannot use a buffer under
    // 8 KiB, so limits below 8192 act as 8192.)
    let one_field = format!("x-filler: {}\r\n", "f".repeat(22 * 1024));
    let many_fields: String = (0..220)
        .map(|i| format!("x-filler-{i:03}: {}\r\n", "f".repeat(86)))
        .collect();
    for (what, extra) in [("one field", one_field), ("many fields", many_fields)] {
        let mut client = Client::connect(proxy.addr).await;
        client.send(get("/too-big", &extra)).await;
        let answer = client.answer("GET").await;
        assert!(
            answer.head.line.starts_with("HTTP/1.1 431"),
            "{what}: {:?}",
            answer.head
        );
        assert!(
            answer.head.lists("connection", "close"),
            "{what}: {:?}",
            answer.head
        );
        client.expect_closed(what).await;
    }
    assert_eq!(
        backend.seen(),
        ["GET /fits"],
        "a head over the limit reached the backend"
    );
}

#[tokio::test]
async fn a_request_line_that_is_not_http_gets_400_and_a_closed_connection() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let cases: [(&str, &[u8]); 4] = [
        ("words", b"this is not http\r\n\r\n"),
        ("no version", b"GET /\r\nhost: test\r\n\r\n"),
        ("bad version", b"GET / HTTP/9.7\r\nhost: test\r\n\r\n"),
        ("control bytes", b"\x01\x02\x03\x04 / HTTP/1.1\r\n\r\n"),
    ];
    // (As with 431: today hyper writes these, empty and without Proxy-Status.)
    for (what, raw) in cases {
        let mut client = Client::connect(proxy.addr).await;
        client.send(raw).await;
        let answer = client.answer("GET").await;
        assert!(
            answer.head.line.starts_with("HTTP/1.1 400"),
            "{what}: {:?}",
            answer.head
        );
        assert!(
            answer.head.lists("connection", "close"),
            "{what}: {:?}",
            answer.head
        );
        client.expect_closed(what).await;
    }
    // A good request on a new connection is served, and nothing bad reached the backend.
    let mut client = Client::connect(proxy.addr).await;
    client.send(get("/fine", "")).await;
    assert_eq!(client.answer("GET").await.text(), "GET /fine");
    assert_eq!(backend.seen(), ["GET /fine"]);
}

#[tokio::test]
async fn a_client_that_sends_half_a_head_and_leaves_does_not_hurt_the_server() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let halves: [&[u8]; 4] = [
        b"GE",
        b"GET /half HTTP/1.1\r\n",
        b"GET /half HTTP/1.1\r\nhost: test\r\nx-partial: abc",
        b"POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 10\r\n\r\nabc",
    ];
    for half in halves {
        // Leaves entirely.
        let mut client = Client::connect(proxy.addr).await;
        client.send(half).await;
        drop(client);
        // Stops sending but still listens: whatever it hears, the server does not hang
        // on to the connection.
        let mut client = Client::connect(proxy.addr).await;
        client.send(half).await;
        client.wire.stream.shutdown().await.expect("shutdown");
        let _ = client.wire.rest().await.expect("the server closes in time");
    }
    let mut client = Client::connect(proxy.addr).await;
    client.send(get("/whole", "")).await;
    assert_eq!(client.answer("GET").await.text(), "GET /whole");
    drop(client);
    assert_eq!(backend.seen(), ["GET /whole"]);
    let settled = eventually(Duration::from_secs(5), async || {
        proxy.state.connections.load(Ordering::Relaxed) == 0
    })
    .await;
    assert!(settled, "connections left open after the clients went away");
}

#[tokio::test]
async fn palisades_own_answers_and_backend_answers_have_a_status_line_and_a_date() {
    let backend = Backend::start().await;
    let cfg = host_route_config(backend.addr, "known.test", "");
    let proxy = Proxy::start(&cfg).await;
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("GET /nowhere HTTP/1.1\r\nhost: unknown.test\r\n\r\n")
        .await;
    let not_found = client.answer("GET").await;
    assert!(
        not_found.head.line.starts_with("HTTP/1.1 404 "),
        "{:?}",
        not_found.head
    );
    assert_eq!(
        not_found.head.get("proxy-status"),
        Some("palisade; error=destination_not_found")
    );
    assert_eq!(not_found.head.count("date"), 1, "{:?}", not_found.head);
    // palisade's own error keeps the connection: the next request on it is served.
    client
        .send("GET /here HTTP/1.1\r\nhost: known.test\r\n\r\n")
        .await;
    let found = client.answer("GET").await;
    assert!(
        found.head.line.starts_with("HTTP/1.1 200 "),
        "{:?}",
        found.head
    );
    assert_eq!(found.text(), "GET /here");
    // The backend sent no Date: the answer has one all the same.
    assert_eq!(found.head.count("date"), 1, "{:?}", found.head);
    assert_eq!(backend.seen(), ["GET /here"]);
}

#[tokio::test]
async fn backend_204_and_304_answers_carry_no_body_and_the_connection_is_reused() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    // Pipelined: body bytes after either would break the answer after it.
    let burst = [
        get("/status/204", ""),
        get("/status/304", "if-none-match: \"v1\"\r\n"),
        get("/after-bodiless", ""),
    ]
    .concat();
    client.send(burst).await;
    let no_content = client.answer("GET").await;
    assert!(
        no_content.head.line.starts_with("HTTP/1.1 204"),
        "{:?}",
        no_content.head
    );
    assert_eq!(no_content.head.get("x-from"), Some("backend"));
    assert_eq!(no_content.head.get("transfer-encoding"), None);
    assert_eq!(no_content.head.get("content-length"), None);
    let not_modified = client.answer("GET").await;
    assert!(
        not_modified.head.line.starts_with("HTTP/1.1 304"),
        "{:?}",
        not_modified.head
    );
    assert_eq!(not_modified.head.get("etag"), Some("\"v1\""));
    assert_eq!(not_modified.head.get("transfer-encoding"), None);
    let after = client.answer("GET").await;
    assert!(
        after.head.line.starts_with("HTTP/1.1 200"),
        "{:?}",
        after.head
    );
    assert_eq!(after.text(), "GET /after-bodiless");
    // And one at a time, too.
    client.send(get("/status/204", "")).await;
    assert_eq!(client.answer("GET").await.head.status(), 204);
    client.send(get("/again", "")).await;
    assert_eq!(client.answer("GET").await.text(), "GET /again");
}

#[tokio::test]
async fn a_one_mebibyte_answer_arrives_complete_and_byte_exact() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    client.send(get("/big", "")).await;
    let answer = client.answer("GET").await;
    assert_eq!(answer.head.status(), 200, "{:?}", answer.head);
    assert_eq!(answer.framing, Framing::Length(BIG));
    assert!(
        answer.body == pattern(BIG),
        "the body differs from what the backend sent"
    );
    // And the connection carries on, twice more.
    client.send(get("/big", "")).await;
    assert!(client.answer("GET").await.body == pattern(BIG));
    client.send(get("/after-big", "")).await;
    assert_eq!(client.answer("GET").await.text(), "GET /after-big");
}

/// A raw backend that answers every request with `101 Switching Protocols` (and
/// `greeting` right after its head, in the same write), then echoes every byte it gets.
/// What it receives past the request head goes to the returned receiver, as it arrives.
async fn upgrade_backend(
    greeting: &'static [u8],
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut wire = Wire {
                    stream,
                    buf: Vec::new(),
                    limit: None,
                };
                let Ok(Some(_)) = wire.head().await else {
                    return;
                };
                let mut out = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n".to_vec();
                out.extend_from_slice(greeting);
                if wire.stream.write_all(&out).await.is_err() {
                    return;
                }
                // Whatever came in the head's read is the tunnel's first bytes.
                let mut pending = std::mem::take(&mut wire.buf);
                loop {
                    if !pending.is_empty() {
                        let _ = tx.send(pending.clone());
                        if wire.stream.write_all(&pending).await.is_err() {
                            return;
                        }
                    }
                    pending.clear();
                    let mut chunk = [0u8; 4096];
                    match wire.stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, rx, task)
}

/// Collects what the upgrade backend received until it adds up to `want` bytes.
async fn backend_received(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    want: usize,
) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        let piece = tokio::time::timeout(CLIENT_WAIT, rx.recv())
            .await
            .expect("the backend received the tunnel's bytes in time")
            .expect("the backend is still running");
        got.extend_from_slice(&piece);
    }
    got
}

#[tokio::test]
async fn bytes_sent_with_the_upgrade_request_reach_the_backend_through_the_tunnel() {
    let (addr, mut received, task) = upgrade_backend(b"").await;
    let proxy = Proxy::start(&single_upstream(&[(addr, 1)], "")).await;
    let mut client = Client::connect(proxy.addr).await;
    // The first bytes of the new protocol in the same write as the head: the codec has
    // them in its read buffer when the backend says 101.
    client
        .send(format!(
            "{}early-bytes",
            get(
                "/ws",
                "upgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-version: 13\r\n"
            )
        ))
        .await;
    let head = client.head().await;
    assert!(
        head.line.starts_with("HTTP/1.1 101"),
        "not switched: {head:?}"
    );
    assert!(head.lists("connection", "upgrade"), "{head:?}");
    assert_eq!(head.get("upgrade"), Some("websocket"));
    // The backend got them, once, and their echo comes back through the tunnel.
    assert_eq!(backend_received(&mut received, 11).await, b"early-bytes");
    assert_eq!(
        client
            .wire
            .take(11)
            .await
            .expect("the echo of the early bytes"),
        b"early-bytes"
    );
    // The tunnel carries on both ways.
    client.send("later").await;
    assert_eq!(backend_received(&mut received, 5).await, b"later");
    assert_eq!(client.wire.take(5).await.expect("the echo"), b"later");
    drop(client);
    task.abort();
}

#[tokio::test]
async fn bytes_the_backend_sends_right_after_its_101_reach_the_client() {
    let (addr, mut received, task) = upgrade_backend(b"hello-from-backend").await;
    let proxy = Proxy::start(&single_upstream(&[(addr, 1)], "")).await;
    let mut client = Client::connect(proxy.addr).await;
    // Early bytes from both sides at once.
    client
        .send(format!(
            "{}ping",
            get("/ws", "upgrade: websocket\r\nconnection: upgrade\r\n")
        ))
        .await;
    let head = client.head().await;
    assert!(
        head.line.starts_with("HTTP/1.1 101"),
        "not switched: {head:?}"
    );
    // The backend's greeting comes first (it was sent before the backend read anything
    // of the tunnel), then the echo of the client's early bytes.
    assert_eq!(
        client.wire.take(18).await.expect("the backend's greeting"),
        b"hello-from-backend"
    );
    assert_eq!(backend_received(&mut received, 4).await, b"ping");
    assert_eq!(client.wire.take(4).await.expect("the echo"), b"ping");
    client.send("pong").await;
    assert_eq!(client.wire.take(4).await.expect("the echo"), b"pong");
    drop(client);
    task.abort();
}

/// A raw backend for requests with a Content-Length body: reports each head's first line,
/// the declared length and how many body bytes arrived before the connection ended (or
/// all of them), and answers (`r` times the length) only a complete body.
async fn counting_backend() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(String, usize, usize)>,
    JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut wire = Wire {
                    stream,
                    buf: Vec::new(),
                    limit: None,
                };
                while let Ok(Some(text)) = wire.head().await {
                    let head = Head::parse(&text);
                    let declared: usize = head
                        .get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while wire.buf.len() < declared {
                        match wire.fill().await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    let got = wire.buf.len().min(declared);
                    let _ = tx.send((head.line.clone(), declared, got));
                    if got < declared {
                        return;
                    }
                    wire.buf.drain(..declared);
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {got}\r\n\r\n");
                    let mut out = answer.into_bytes();
                    out.extend(std::iter::repeat_n(b'r', got));
                    if wire.stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx, task)
}

#[tokio::test]
async fn a_client_that_leaves_mid_body_leaves_the_backend_a_truncated_body_and_the_server_unhurt() {
    let (addr, mut seen, task) = counting_backend().await;
    let proxy = Proxy::start(&single_upstream(&[(addr, 1)], "")).await;
    let post = "POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 100000\r\n\r\n0123456789";

    // Leaves entirely after 10 of 100000 bytes.
    let mut client = Client::connect(proxy.addr).await;
    client.send(post).await;
    drop(client);
    let (line, declared, got) = tokio::time::timeout(CLIENT_WAIT, seen.recv())
        .await
        .expect("the backend's connection ended in time")
        .expect("backend running");
    assert_eq!(line, "POST /upload HTTP/1.1");
    // The backend was told the client's length, and palisade closed its connection
    // before the body was complete: it never sees a whole request.
    assert_eq!(declared, 100_000);
    assert!(got < declared, "the backend got a complete body: {got}");

    // Stops sending but still listens: it hears an error answer, or just the close, and
    // the connection ends. (Not pinned: the status. Today it is 502 connection_terminated,
    // although the fault is the client's; nobody reads it but a half-closed client.)
    let mut client = Client::connect(proxy.addr).await;
    client.send(post).await;
    client.wire.stream.shutdown().await.expect("shutdown");
    let rest = client.wire.rest().await.expect("the server closes in time");
    if !rest.is_empty() {
        let text = String::from_utf8_lossy(&rest);
        let status: u16 = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(status >= 400, "not an error answer: {text:?}");
    }
    let (_, declared, got) = tokio::time::timeout(CLIENT_WAIT, seen.recv())
        .await
        .expect("the backend's connection ended in time")
        .expect("backend running");
    assert!(got < declared, "the backend got a complete body: {got}");

    // The next connection is served normally, its body whole.
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 10\r\n\r\n0123456789")
        .await;
    let answer = client.answer("POST").await;
    assert_eq!(answer.head.status(), 200, "{:?}", answer.head);
    assert_eq!(answer.body, vec![b'r'; 10]);
    let (_, declared, got) = tokio::time::timeout(CLIENT_WAIT, seen.recv())
        .await
        .expect("the backend's report in time")
        .expect("backend running");
    assert_eq!((declared, got), (10, 10));
    drop(client);
    let settled = eventually(Duration::from_secs(5), async || {
        proxy.state.connections.load(Ordering::Relaxed) == 0
    })
    .await;
    assert!(settled, "connections left open after the clients went away");
    task.abort();
}

#[tokio::test]
async fn a_chunked_upload_cut_short_by_the_client_never_reaches_the_backend_whole() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    // Mid-chunk, between chunks, and inside the last chunk's trailer section: a body cut
    // anywhere must not be ended for the backend with a last chunk palisade made up.
    let cuts = [
        "5\r\nhel",
        "5\r\nhello\r\n",
        "5\r\nhello\r\n0\r\nx-trailer: 1\r\n",
    ];
    for cut in cuts {
        for half_close in [false, true] {
            let mut client = Client::connect(proxy.addr).await;
            client
                .send(format!(
                    "POST /upload HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n{cut}"
                ))
                .await;
            if half_close {
                client.wire.stream.shutdown().await.expect("shutdown");
                let _ = client.wire.rest().await.expect("the server closes in time");
            } else {
                drop(client);
            }
        }
    }
    // The next upload is whole, and it is the only one the backend saw.
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("POST /upload HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n5\r\nwhole\r\n0\r\n\r\n")
        .await;
    let answer = client.answer("POST").await;
    assert_eq!(answer.text(), "whole");
    assert_eq!(backend.seen(), ["POST /upload"]);
    drop(client);
    let settled = eventually(Duration::from_secs(5), async || {
        proxy.state.connections.load(Ordering::Relaxed) == 0
    })
    .await;
    assert!(settled, "connections left open after the clients went away");
}

/// Writes `head` then each piece of `body` on `writer` until done or a write fails (the
/// server may stop reading and close: not this side's business); returns the bytes written.
fn keep_writing(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    head: Vec<u8>,
    body: impl Iterator<Item = Vec<u8>> + Send + 'static,
) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut written = 0;
        for piece in std::iter::once(head).chain(body) {
            match tokio::time::timeout(CLIENT_WAIT, writer.write_all(&piece)).await {
                Ok(Ok(())) => written += piece.len(),
                _ => break,
            }
        }
        written
    })
}

fn limited_config(backend: SocketAddr) -> String {
    format!(
        "[server.limits]\nmax_body_bytes = 1000\n{}",
        single_upstream(&[(backend, 1)], "")
    )
}

/// Asserts that `answer` is palisade's 413 for a body over `max_body_bytes`, closing.
fn assert_413(answer: &Answer) {
    assert!(
        answer.head.line.starts_with("HTTP/1.1 413"),
        "{:?}",
        answer.head
    );
    assert_eq!(
        answer.head.get("proxy-status"),
        Some("palisade; error=http_request_error")
    );
    assert!(
        answer.head.lists("connection", "close"),
        "{:?}",
        answer.head
    );
    assert_eq!(answer.text(), "request body too large\n");
}

#[tokio::test]
async fn an_upload_declared_too_large_without_expect_gets_its_413_whole_while_still_sending() {
    let backend = Backend::start().await;
    let proxy = Proxy::start(&limited_config(backend.addr)).await;
    // 5 MiB declared, no Expect: the body follows the head at once and keeps coming.
    let size = 5 << 20;
    let head = format!("POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: {size}\r\n\r\n");
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (read, write) = stream.into_split();
    let writer = keep_writing(
        write,
        head.clone().into_bytes(),
        (0..size / 65536).map(|_| vec![b'u'; 65536]),
    );
    // While it writes, the whole answer arrives: no reset before it (lingering close).
    let mut client = Client::reading(read);
    assert_413(&client.answer("POST").await);
    // Then the connection ends (a reset counts: the server reads and drops only so
    // much), and so does the writer.
    let _ = client.wire.rest().await.expect("the server closes in time");
    let written = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer stops once the server is gone")
        .expect("writer task");
    assert!(written > 0);

    // The same, but the client sends 256 KiB of it and then stops (half-closes): the
    // server reads and drops what came before it closes, so the end after the answer is
    // a clean close, not the reset that closing with unread bytes would send.
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (read, write) = stream.into_split();
    let head_len = head.len();
    let writer = keep_writing(write, head.into_bytes(), (0..4).map(|_| vec![b'u'; 65536]));
    let mut client = Client::reading(read);
    assert_413(&client.answer("POST").await);
    let end = client.wire.fill().await;
    assert!(
        matches!(end, Ok(0)),
        "no clean close after the answer: {end:?} {:?}",
        String::from_utf8_lossy(&client.wire.buf)
    );
    let written = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer finished")
        .expect("writer task");
    assert_eq!(written, head_len + (4 << 16), "the server stopped reading");
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
}

#[tokio::test]
async fn a_chunked_upload_that_grows_past_max_body_bytes_gets_413_and_a_closed_connection() {
    let backend = Backend::start().await;
    let proxy = Proxy::start(&limited_config(backend.addr)).await;
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (read, write) = stream.into_split();
    // No length: the limit is found while the body streams (300 bytes a chunk, past
    // 1000 at the fourth), and the client goes on sending.
    let head =
        b"POST /upload HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    let chunks = (0..200)
        .map(|_| {
            let mut chunk = b"12c\r\n".to_vec();
            chunk.extend_from_slice(&[b'c'; 300]);
            chunk.extend_from_slice(b"\r\n");
            chunk
        })
        .chain(std::iter::once(b"0\r\n\r\n".to_vec()));
    let writer = keep_writing(write, head, chunks);
    let mut client = Client::reading(read);
    assert_413(&client.answer("POST").await);
    client.expect_closed("after 413").await;
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer stops once the server is gone")
        .expect("writer task");
    // The backend saw a body cut short, never a whole request.
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
    // And a small upload on a new connection goes through.
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("POST /upload HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        .await;
    let answer = client.answer("POST").await;
    assert_eq!(answer.head.status(), 200, "{:?}", answer.head);
    assert_eq!(answer.text(), "abc");
}

#[tokio::test]
async fn a_malformed_chunk_size_ends_the_connection_and_what_follows_is_never_served() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let cases: [(&str, &str); 3] = [
        ("not hex", "zz\r\nhello\r\n0\r\n\r\n"),
        ("no CRLF after the data", "5\r\nhelloXX0\r\n\r\n"),
        ("a size line without its CR", "5\nhello\r\n0\r\n\r\n"),
    ];
    for (what, body) in cases {
        let mut client = Client::connect(proxy.addr).await;
        // A valid head, a broken body, and a request pipelined after it.
        client
            .send(format!(
                "POST /upload HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n{body}{}",
                get("/after-garbage", "")
            ))
            .await;
        // One error answer, then the close: never a second answer. (Not pinned: which
        // error. Today 502 connection_terminated, with no `connection: close` although
        // the connection closes; see the ignored test below for the 400 the module doc
        // of src/server/h1.rs promises.)
        let answer = client.answer("POST").await;
        assert!(
            (400..600).contains(&answer.head.status()),
            "{what}: {:?}",
            answer.head
        );
        let rest = client.wire.rest().await.expect("the server closes in time");
        assert!(
            rest.is_empty(),
            "{what}: the pipelined request was answered: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    // Neither the broken upload nor what followed it reached the backend whole.
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
    let mut client = Client::connect(proxy.addr).await;
    client.send(get("/fine", "")).await;
    assert_eq!(client.answer("GET").await.text(), "GET /fine");
}

#[tokio::test]
async fn a_client_that_starts_like_an_http2_preface_but_is_not_one_gets_400_or_the_close() {
    let backend = Backend::start().await;
    let cfg = format!(
        "[server.timeouts]\nheader_read = \"1s\"\n{}",
        single_upstream(&[(backend.addr, 1)], "")
    );
    let proxy = Proxy::start(&cfg).await;

    // As long as the preface: its first line, then something else.
    let mut client = Client::connect(proxy.addr).await;
    client.send("PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n").await;
    let answer = client.answer("GET").await;
    assert!(
        answer.head.line.starts_with("HTTP/1.1 400"),
        "{:?}",
        answer.head
    );
    assert!(answer.head.lists("connection", "close"));
    client.expect_closed("after a wrong preface").await;

    // A prefix of the preface, then the client stops sending (but listens): nothing to
    // answer, the connection ends.
    for prefix in ["P", "PR", "PRI * HTTP/2.0\r\n\r\n"] {
        let mut client = Client::connect(proxy.addr).await;
        client.send(prefix).await;
        client.wire.stream.shutdown().await.expect("shutdown");
        let rest = client.wire.rest().await.expect("the server closes in time");
        assert!(
            rest.is_empty() || rest.starts_with(b"HTTP/1.1 400"),
            "{prefix:?}: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    // A prefix, then silence: header_read ends it.
    let mut client = Client::connect(proxy.addr).await;
    client.send("PR").await;
    let rest = client
        .wire
        .rest()
        .await
        .expect("the server closes a silent prefix within header_read");
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );

    // Its first line with HTTP/1.1 is an HTTP/1.1 request (method PRI, asterisk-form
    // target): answered by palisade (no route has the target `*`: 404), never forwarded.
    let mut client = Client::connect(proxy.addr).await;
    client.send("PRI * HTTP/1.1\r\nhost: test\r\n\r\n").await;
    let answer = client.answer("PRI").await;
    assert!(
        (400..500).contains(&answer.head.status()),
        "{:?}",
        answer.head
    );

    // A real request that happens to start with a byte of the preface is served.
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("PUT /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 2\r\n\r\nok")
        .await;
    let answer = client.answer("PUT").await;
    assert_eq!(answer.head.status(), 200, "{:?}", answer.head);
    assert_eq!(answer.text(), "ok");
    assert_eq!(backend.seen(), ["PUT /upload"]);
}

#[tokio::test]
async fn a_request_in_flight_on_a_keep_alive_connection_at_drain_completes_with_connection_close() {
    // A backend that holds answers to `/gate/...` until released, and says when one
    // arrived: the drain surely starts while the request is in flight.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<String>();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (arrived_tx, gate) = (arrived_tx.clone(), gate.clone());
            tokio::spawn(async move {
                let mut wire = Wire {
                    stream,
                    buf: Vec::new(),
                    limit: None,
                };
                while let Ok(Some(text)) = wire.head().await {
                    let head = Head::parse(&text);
                    let path = head.line.split(' ').nth(1).unwrap_or_default().to_owned();
                    if path.starts_with("/gate/") {
                        let _ = arrived_tx.send(path.clone());
                        match gate.acquire().await {
                            Ok(permit) => permit.forget(),
                            Err(_) => return,
                        }
                    }
                    let body = format!("GET {path}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if wire.stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(&single_upstream(&[(addr, 1)], "")).await;
    let state = proxy.state.clone();
    let mut client = Client::connect(proxy.addr).await;
    client.send(get("/first", "")).await;
    let first = client.answer("GET").await;
    assert_eq!(first.text(), "GET /first");
    assert!(!first.head.lists("connection", "close"), "{:?}", first.head);

    // The second request on the same connection is at the backend when the drain starts.
    client.send(get("/gate/in-flight", "")).await;
    let path = tokio::time::timeout(CLIENT_WAIT, arrived.recv())
        .await
        .expect("the request reached the backend in time");
    assert_eq!(path.as_deref(), Some("/gate/in-flight"));
    let draining = tokio::spawn(proxy.shutdown());
    let started = eventually(CLIENT_WAIT, async || state.is_draining()).await;
    assert!(started, "the drain did not start");
    release.add_permits(1);

    // Its answer arrives whole, says the connection closes, and it does.
    let answer = client.answer("GET").await;
    assert_eq!(answer.head.status(), 200, "{:?}", answer.head);
    assert_eq!(answer.text(), "GET /gate/in-flight");
    assert!(
        answer.head.lists("connection", "close"),
        "{:?}",
        answer.head
    );
    client.expect_closed("after the answer at drain").await;
    tokio::time::timeout(Duration::from_secs(15), draining)
        .await
        .expect("drain finished")
        .expect("drain task");
    assert_eq!(state.connections.load(Ordering::Relaxed), 0);
    task.abort();
}

#[tokio::test]
async fn a_request_arriving_one_byte_per_write_is_served() {
    let backend = Backend::start().await;
    let proxy = backend.proxy().await;
    let mut client = Client::connect(proxy.addr).await;
    client.wire.stream.set_nodelay(true).expect("nodelay");
    // `P` is also how an HTTP/2 preface starts: the first byte alone decides nothing.
    let requests: [(&str, &str, &str); 3] = [
        (
            "POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 5\r\n\r\nhello",
            "POST",
            "hello",
        ),
        (
            "POST /upload HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n3\r\nabc\r\n0\r\nx-trailer: 1\r\n\r\n",
            "POST",
            "helloabc",
        ),
        ("GET /trickled HTTP/1.1\r\nhost: test\r\n\r\n", "GET", "GET /trickled"),
    ];
    for (raw, method, expected) in requests {
        for byte in raw.bytes() {
            client.send([byte]).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let answer = client.answer(method).await;
        assert_eq!(answer.head.status(), 200, "{raw:?}: {:?}", answer.head);
        assert_eq!(answer.text(), expected, "{raw:?}");
    }
    assert_eq!(
        backend.seen(),
        ["POST /upload", "POST /upload", "GET /trickled"]
    );
}

#[tokio::test]
async fn a_request_body_the_client_breaks_is_a_400_and_not_held_against_the_backend() {
    let backend = Backend::start().await;
    let proxy = Proxy::start(&single_upstream(
        &[(backend.addr, 1)],
        "[upstreams.app.passive]\nconsecutive_failures = 2\nejection = \"30s\"",
    ))
    .await;
    let mut statuses = Vec::new();
    // A malformed chunk size.
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("POST /upload HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
        .await;
    let answer = client.answer("POST").await;
    statuses.push((
        answer.head.status(),
        answer.head.get("proxy-status").map(str::to_owned),
    ));
    // A streamed body (over the 64 KiB that are read before forwarding) cut short by a
    // client that still listens. (Under 64 KiB the same cut is already a 400: "request
    // body ended early".)
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 100000\r\n\r\n0123456789")
        .await;
    client.wire.stream.shutdown().await.expect("shutdown");
    let answer = client.answer("POST").await;
    statuses.push((
        answer.head.status(),
        answer.head.get("proxy-status").map(str::to_owned),
    ));

    // The backend did nothing wrong: it is still in the pool...
    let available =
        proxy.state.snapshot().upstreams[0].backends[0].is_available(palisade::clock::now_ns());
    assert!(
        available,
        "a healthy backend was ejected for the client's broken bodies: {statuses:?}"
    );
    // ...and the client is told the fault is its own.
    let expected = (400, Some("palisade; error=http_request_error".to_owned()));
    assert_eq!(statuses, [expected.clone(), expected]);
}

#[tokio::test]
async fn an_unread_body_already_received_does_not_cost_the_connection() {
    let backend = Backend::start().await;
    let cfg = host_route_config(backend.addr, "known.test", "");
    let proxy = Proxy::start(&cfg).await;
    let mut client = Client::connect(proxy.addr).await;
    // Refused before the body is read (no route), by length and chunked: the bodies
    // arrived with their heads, so they are skipped and the connection carries on.
    client
        .send("POST /nowhere HTTP/1.1\r\nhost: unknown.test\r\ncontent-length: 5\r\n\r\nhello")
        .await;
    let answer = client.answer("POST").await;
    assert_eq!(answer.head.status(), 404, "{:?}", answer.head);
    assert!(
        !answer.head.lists("connection", "close"),
        "{:?}",
        answer.head
    );
    client
        .send("POST /nowhere HTTP/1.1\r\nhost: unknown.test\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await;
    let answer = client.answer("POST").await;
    assert_eq!(answer.head.status(), 404, "{:?}", answer.head);
    assert!(
        !answer.head.lists("connection", "close"),
        "{:?}",
        answer.head
    );
    client
        .send("GET /here HTTP/1.1\r\nhost: known.test\r\n\r\n")
        .await;
    assert_eq!(client.answer("GET").await.text(), "GET /here");
    // A body still on its way when the answer is ready: the answer says close, and the
    // connection ends after it.
    client
        .send("POST /nowhere HTTP/1.1\r\nhost: unknown.test\r\ncontent-length: 50\r\n\r\nhello")
        .await;
    let answer = client.answer("POST").await;
    assert_eq!(answer.head.status(), 404, "{:?}", answer.head);
    assert!(
        answer.head.lists("connection", "close"),
        "{:?}",
        answer.head
    );
    client
        .expect_closed("after an answer with the body unread")
        .await;
    assert_eq!(backend.seen(), ["GET /here"]);
}

/// One route for `host` to the backend, with `server` prepended (server settings).
fn host_route_config(backend: std::net::SocketAddr, host: &str, server: &str) -> String {
    format!(
        "{server}[[routes]]\nname = \"known\"\nhost = \"{host}\"\nupstream = \"app\"\n[upstreams.app]\nbackends = [{{ addr = \"{backend}\" }}]\n"
    )
}
