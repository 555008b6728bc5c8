//! The echo backend over real sockets: HTTP/1.1 by hand and through hyper's client, h2c,
//! a WebSocket round-trip, and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade::echo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running echo backend; dropping it without `stop` just leaves the task to the runtime.
struct Echo {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Echo {
    async fn start(name: &str) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(echo::serve(listener, Arc::from(name), async {
            let _ = rx.await;
        }));
        Echo {
            addr,
            stop: Some(tx),
            task,
        }
    }

    /// Starts shutdown and waits (bounded) for `serve` to return.
    async fn stop(mut self) -> Duration {
        let started = Instant::now();
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("serve did not return after shutdown")
            .unwrap()
            .unwrap();
        started.elapsed()
    }
}

/// Sends raw HTTP/1.1 bytes (which should ask for `Connection: close`) and returns the
/// status line, the header block and the (undecoded) body.
async fn raw(addr: SocketAddr, request: &[u8]) -> (String, String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(response[..split].to_vec()).unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        response[split + 4..].to_vec(),
    )
}

async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(addr: SocketAddr, path: &str) -> (http::response::Parts, Bytes) {
    let mut client = h1_client(addr).await;
    let request = Request::get(path)
        .header("host", "echo.test")
        .body(Full::default())
        .unwrap();
    let (parts, body) = client.send_request(request).await.unwrap().into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

#[tokio::test]
async fn json_describes_the_request() {
    let echo = Echo::start("app-1").await;
    let mut client = h1_client(echo.addr).await;
    let request = Request::post("/some/path?a=1&b=two")
        .header("host", "echo.test")
        .header("x-custom", "hello")
        .body(Full::new(Bytes::from(vec![7u8; 12345])))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-backend"], "app-1");
    let body = json(&response.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(body["backend"], "app-1");
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/some/path?a=1&b=two");
    assert_eq!(body["headers"]["host"], "echo.test");
    assert_eq!(body["headers"]["x-custom"], "hello");
    assert_eq!(body["headers"]["content-length"], "12345");
    assert_eq!(body["body_bytes"], 12345);
    echo.stop().await;
}

#[tokio::test]
async fn chunked_upload_and_repeated_headers() {
    let echo = Echo::start("app-2").await;
    let request = b"PUT /upload HTTP/1.1\r\nHost: echo.test\r\nX-Multi: a\r\nX-Multi: b\r\n\
        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
        5\r\nhello\r\n6\r\n world\r\n1000\r\n";
    let mut request = request.to_vec();
    request.extend_from_slice(&[b'z'; 0x1000]);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    let (status, headers, body) = raw(echo.addr, &request).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("x-backend: app-2"), "{headers}");
    let body = json(&body);
    assert_eq!(body["method"], "PUT");
    assert_eq!(body["headers"]["x-multi"], "a, b");
    assert_eq!(body["headers"]["transfer-encoding"], "chunked");
    assert_eq!(body["body_bytes"], 11 + 0x1000);
    echo.stop().await;
}

#[tokio::test]
async fn health_status_and_errors() {
    let echo = Echo::start("app").await;
    let (parts, body) = get(echo.addr, "/health").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(&body[..], b"ok");

    let (parts, body) = get(echo.addr, "/status/503").await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["path"], "/status/503");

    let (parts, body) = get(echo.addr, "/status/204").await;
    assert_eq!(parts.status, StatusCode::NO_CONTENT);
    assert!(body.is_empty());

    for bad in [
        "/status/abc",
        "/status/150",
        "/status/600",
        "/status/",
        "/delay/soon",
        "/bytes/-1",
        "/stream/x",
    ] {
        let (parts, body) = get(echo.addr, bad).await;
        assert_eq!(parts.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(parts.headers["x-backend"], "app");
        assert!(!body.is_empty(), "{bad}");
    }
    echo.stop().await;
}

#[tokio::test]
async fn health_can_be_failed_on_purpose() {
    let echo = Echo::start("app").await;
    let mut client = h1_client(echo.addr).await;
    for (method, path, status, body) in [
        ("POST", "/health/down", 200, "ok"),
        ("GET", "/health", 503, "down"),
        ("POST", "/health/up", 200, "ok"),
        ("GET", "/health", 200, "ok"),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "x");
        let response = client
            .send_request(request.body(Full::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            body
        );
    }
    echo.stop().await;
}

#[tokio::test]
async fn delay_waits() {
    let echo = Echo::start("app").await;
    let started = Instant::now();
    let (parts, body) = get(echo.addr, "/delay/200").await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(json(&body)["path"], "/delay/200");
    echo.stop().await;
}

#[tokio::test]
async fn bytes_returns_exactly_n() {
    let echo = Echo::start("app").await;
    let (parts, body) = get(echo.addr, "/bytes/100000").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["content-length"], "100000");
    assert_eq!(body.len(), 100_000);
    let (_, body) = get(echo.addr, "/bytes/0").await;
    assert!(body.is_empty());
    echo.stop().await;
}

#[tokio::test]
async fn stream_sends_spaced_chunks() {
    let echo = Echo::start("app").await;
    let mut client = h1_client(echo.addr).await;
    let request = Request::get("/stream/3")
        .header("host", "echo.test")
        .body(Full::default())
        .unwrap();
    let started = Instant::now();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    assert!(response.headers().get("content-length").is_none());
    let mut body = response.into_body();
    let mut chunks = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            chunks.push(String::from_utf8(data.to_vec()).unwrap());
        }
    }
    assert_eq!(chunks, ["chunk 0\n", "chunk 1\n", "chunk 2\n"]);
    assert!(started.elapsed() >= Duration::from_millis(200));
    echo.stop().await;
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let echo = Echo::start("app-h2").await;
    let stream = TcpStream::connect(echo.addr).await.unwrap();
    let (mut client, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let uri = format!("http://{}/over/h2?x=1", echo.addr);
    let request = Request::post(uri)
        .body(Full::new(Bytes::from_static(b"abc")))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.headers()["x-backend"], "app-h2");
    let body = json(&response.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(body["path"], "/over/h2?x=1");
    assert_eq!(body["body_bytes"], 3);
    // A second stream on the same connection.
    let uri = format!("http://{}/bytes/70000", echo.addr);
    let response = client
        .send_request(Request::get(uri).body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .len(),
        70_000
    );
    drop(client);
    echo.stop().await;
}

/// Frames `payload` as a masked client frame.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads one server frame: (fin, opcode, payload), checking that it is not masked.
async fn server_frame(stream: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(head[1] & 0x80, 0, "server frames must not be masked");
    let len = match head[1] & 0x7f {
        126 => u64::from(stream.read_u16().await.unwrap()),
        127 => stream.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mut payload = vec![0; len as usize];
    stream.read_exact(&mut payload).await.unwrap();
    (head[0] & 0x80 != 0, head[0] & 0x0f, payload)
}

#[tokio::test]
async fn websocket_round_trip() {
    let echo = Echo::start("app-ws").await;
    let mut stream = TcpStream::connect(echo.addr).await.unwrap();
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: echo.test\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    // The example from RFC 6455 section 1.3.
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{head}"
    );
    assert!(head.contains("x-backend: app-ws\r\n"), "{head}");

    stream
        .write_all(&client_frame(true, 0x1, b"Hello"))
        .await
        .unwrap();
    assert_eq!(
        server_frame(&mut stream).await,
        (true, 0x1, b"Hello".to_vec())
    );

    // Fragmented text with a ping in between.
    stream
        .write_all(&client_frame(false, 0x1, b"frag"))
        .await
        .unwrap();
    stream
        .write_all(&client_frame(true, 0x9, b"are you there"))
        .await
        .unwrap();
    stream
        .write_all(&client_frame(true, 0x0, b"mented"))
        .await
        .unwrap();
    assert_eq!(
        server_frame(&mut stream).await,
        (true, 0xA, b"are you there".to_vec())
    );
    assert_eq!(
        server_frame(&mut stream).await,
        (true, 0x1, b"fragmented".to_vec())
    );

    // 16-bit and 64-bit lengths.
    for len in [300usize, 70_000] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        stream
            .write_all(&client_frame(true, 0x2, &payload))
            .await
            .unwrap();
        assert_eq!(server_frame(&mut stream).await, (true, 0x2, payload));
    }

    stream
        .write_all(&client_frame(true, 0x8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(
        server_frame(&mut stream).await,
        (true, 0x8, 1000u16.to_be_bytes().to_vec())
    );
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    echo.stop().await;
}

#[tokio::test]
async fn websocket_too_big_and_bad_handshake() {
    let echo = Echo::start("app").await;
    let mut stream = TcpStream::connect(echo.addr).await.unwrap();
    stream
        .write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    // Claim a 2 MiB frame: refused with 1009 before any payload is read.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(2u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[0; 4]);
    stream.write_all(&frame).await.unwrap();
    assert_eq!(
        server_frame(&mut stream).await,
        (true, 0x8, 1009u16.to_be_bytes().to_vec())
    );

    let (status, _, body) = raw(
        echo.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade, close\r\n\r\n",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    assert!(String::from_utf8(body)
        .unwrap()
        .contains("Sec-WebSocket-Key"));
    echo.stop().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let echo = Echo::start("app").await;
    let mut client = h1_client(echo.addr).await;
    let request = Request::get("/stream/4")
        .header("host", "echo.test")
        .body(Full::default())
        .unwrap();
    let mut body = client.send_request(request).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"chunk 0\n");
    // The request is in flight; shutdown must wait for its remaining 300 ms.
    let stopping = tokio::spawn(echo.stop());
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"chunk 1\nchunk 2\nchunk 3\n");
    stopping.await.unwrap();
}

#[tokio::test]
async fn shutdown_is_bounded() {
    let echo = Echo::start("app").await;
    let addr = echo.addr;
    let mut client = h1_client(addr).await;
    let request = Request::get("/stream/10000")
        .header("host", "echo.test")
        .body(Full::default())
        .unwrap();
    let mut body = client.send_request(request).await.unwrap().into_body();
    body.frame().await.unwrap().unwrap();
    // An idle keep-alive connection must not hold shutdown up either.
    let _idle = TcpStream::connect(addr).await.unwrap();
    let took = echo.stop().await;
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}
