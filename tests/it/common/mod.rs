//! Test harness: real palisade servers and echo backends on ephemeral 127.0.0.1 ports,
//! stopped when dropped, plus small HTTP helpers over real sockets.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use palisade::snapshot::ProxyState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An echo backend serving on an ephemeral port until dropped.
pub struct Echo {
    pub addr: SocketAddr,
    pub name: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Echo {
    pub async fn start(name: &str) -> Echo {
        Self::start_at(name, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// An echo backend on `addr` (e.g. where a backend the proxy knows was down).
    pub async fn start_at(name: &str, addr: SocketAddr) -> Echo {
        let listener = TcpListener::bind(addr).await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(palisade::echo::serve(listener, Arc::from(name), async {
            let _ = rx.await;
        }));
        Echo {
            addr,
            name: name.to_owned(),
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the backend and waits until it no longer accepts connections.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// `body` (routes and upstreams) for a palisade run as its own process: listening on
/// 127.0.0.1:`port`, its admin API on a free port.
pub fn listening_on(port: u16, body: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n[admin]\nlisten = \"127.0.0.1:{}\"\n{body}",
        free_port()
    )
}

/// A directory of the test's own under the system temp dir, removed with everything in it
/// when dropped. Unique per test (process id + a counter): every test shares one process.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("palisade-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// Writes `text` to `name` in this directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A palisade proxy (and its admin API) served in-process on ephemeral ports until dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state: Arc<ProxyState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    admin_task: JoinHandle<()>,
    extra: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Proxy {
    /// Starts palisade with `toml` (its listen addresses are ignored: the proxy and the
    /// admin API listen on ephemeral ports).
    pub async fn start(toml: &str) -> Proxy {
        let config = palisade::config::parse(toml, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("test config invalid: {e:?}\n{toml}"));
        Self::serve(config)
    }

    /// Starts palisade with the config file at `path` (so reloads re-read it).
    pub async fn start_file(path: &Path) -> Proxy {
        let config =
            palisade::config::load(path).unwrap_or_else(|e| panic!("test config invalid: {e:?}"));
        Self::serve(config)
    }

    /// Starts palisade with the config file at `path`, serving its TLS listen addresses on
    /// ephemeral ports too; returns the proxy and, per configured TLS address, where it
    /// really listens.
    pub async fn start_with_tls(
        path: &Path,
    ) -> (Proxy, std::collections::HashMap<SocketAddr, SocketAddr>) {
        let config =
            palisade::config::load(path).unwrap_or_else(|e| panic!("test config invalid: {e:?}"));
        let mut map = std::collections::HashMap::new();
        let mut listeners = Vec::new();
        for tls in &config.server.tls {
            if map.contains_key(&tls.listen) {
                continue;
            }
            let socket =
                palisade::server::bind("127.0.0.1:0".parse().expect("addr")).expect("bind tls");
            map.insert(tls.listen, socket.local_addr().expect("tls addr"));
            listeners.push(palisade::server::Listener {
                socket,
                tls: Some(tls.listen),
            });
        }
        let mut proxy = Self::serve(config);
        let state = proxy.state.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let tls_task = tokio::spawn(palisade::server::serve_listeners(listeners, state, async {
            let _ = rx.await;
        }));
        proxy.extra.push((tx, tls_task));
        (proxy, map)
    }

    fn serve(config: palisade::config::Config) -> Proxy {
        let listener = palisade::server::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("proxy addr");
        let admin_listener =
            palisade::server::bind("127.0.0.1:0".parse().expect("addr")).expect("bind admin");
        let admin = admin_listener.local_addr().expect("admin addr");
        let state = Arc::new(ProxyState::new(config));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(palisade::server::serve(
            vec![listener],
            state.clone(),
            async {
                let _ = rx.await;
            },
        ));
        let admin_task = tokio::spawn(palisade::admin::serve(
            admin_listener,
            state.clone(),
            std::future::pending(),
        ));
        Proxy {
            addr,
            admin,
            state,
            stop: Some(tx),
            task: Some(task),
            admin_task,
            extra: Vec::new(),
        }
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Asks the proxy to drain and waits until `serve` returns.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("proxy drained in time")
                .expect("serve task");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.admin_task.abort();
    }
}

/// A config with one catch-all route to one upstream over `backends`, plus `extra` lines
/// in the upstream table (e.g. `balance = "weighted"`).
pub fn single_upstream(backends: &[(SocketAddr, u32)], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ addr = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        r#"
[[routes]]
name = "all"
upstream = "app"

[upstreams.app]
backends = [{}]
{extra}
"#,
        list.join(", ")
    )
}

/// A plain response, body collected.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The echo backend that answered (its `backend` field).
    pub fn backend(&self) -> String {
        self.json()["backend"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client that speaks HTTP/2 with prior knowledge (h2c) to plain-HTTP URLs.
pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends `req` with a fresh client and collects the answer.
pub async fn send(req: http::Request<Full<Bytes>>) -> Answer {
    let resp = tokio::time::timeout(Duration::from_secs(20), client().request(req))
        .await
        .expect("answer in time")
        .expect("request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// An error a request or its body ended with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// GET `url` through `client` and read the whole body: the body, or the error the
/// request or the body ended with (within 10 s, else the test fails).
pub async fn whole_body(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
) -> Result<Bytes, BoxError> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let resp = client
            .request(
                http::Request::get(url)
                    .body(Full::new(Bytes::new()))
                    .expect("request"),
            )
            .await?;
        Ok(resp.into_body().collect().await?.to_bytes())
    })
    .await
    .expect("the client learns in time")
}

pub async fn get(url: &str) -> Answer {
    send(
        http::Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await
}

pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = http::Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(req.body(Full::new(Bytes::new())).expect("request")).await
}

/// Reads one response head and its Content-Length body; returns the head.
/// Reads one request head, byte by byte (nothing past it), from any stream: `None` once
/// the peer closed first.
pub async fn request_head_bytes<S>(stream: &mut S) -> Option<Vec<u8>>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}

pub async fn read_head(conn: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(3), conn.read(&mut byte))
            .await
            .expect("response in time")
            .expect("read");
        assert!(
            n == 1,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await.expect("body");
    head
}

/// Writes `raw` to a new connection and reads until the peer closes or `limit` passes.
/// Returns what was read and whether the peer closed the connection.
pub async fn raw_exchange(addr: SocketAddr, raw: &[u8], limit: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// Sends `raw` on a new connection to `addr` and returns what comes back within 5 s,
/// which must start with `start`.
pub async fn raw_expect(addr: SocketAddr, raw: &[u8], start: &str) -> String {
    let (answer, _) = raw_exchange(addr, raw, Duration::from_secs(5)).await;
    assert!(answer.starts_with(start), "{answer}");
    answer
}

/// Polls `check` until it returns true or `limit` passes.
pub async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port on 127.0.0.1 that nothing listens on, for a server a test starts there later.
///
/// Taken from below the kernel's ephemeral range when there is room. A port from inside
/// it (what binding port 0 gives) can meanwhile become the local port of one of the
/// thousands of outgoing connections the other tests make; once that connection closes,
/// its TIME_WAIT keeps the port from being bound for a minute, SO_REUSEADDR or not (CI
/// once saw the admin API unable to move to such a port). Ports outside the range are
/// never picked for outgoing connections; each call here hands out a different one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FLOOR: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(0);
    if low > FLOOR + 1_000 && low <= 65_536 {
        let span = low - FLOOR;
        // Runs one after another start at different places.
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let port = FLOOR + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process killed (SIGKILL) when dropped unless it already exited.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the palisade binary with `args`, stderr captured to a file in the temp dir.
pub fn spawn_palisade(args: &[&str]) -> ChildGuard {
    let child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .arg("--log-level")
        .arg("warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn palisade");
    ChildGuard(child)
}

/// Sends SIGTERM and expects a clean exit (code 0) within a few seconds.
pub fn stop_gracefully(mut child: ChildGuard) {
    let pid = child.0.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            assert_eq!(status.code(), Some(0), "exit after SIGTERM");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Runs `palisade run -c config` with JSON logs at `level` written to the file `log`.
pub fn spawn_logged(config: &Path, log: &Path, level: &str) -> ChildGuard {
    let child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args([
            "run",
            "-c",
            &config.to_string_lossy(),
            "--log-format",
            "json",
        ])
        .args(["--log-level", level])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn palisade");
    ChildGuard(child)
}

/// The lines of a JSON `log` whose message contains `text`.
pub fn log_lines_saying(log: &str, text: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(text)))
        .collect()
}

/// Waits until something accepts connections on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    let up = eventually(Duration::from_secs(20), async || {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;
    assert!(up, "nothing listens on {addr}");
}

/// A backend that answers every request with `status` (after `delay`, if started with
/// one) and counts what it received.
pub struct Counter {
    pub addr: SocketAddr,
    pub hits: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Counter {
    pub async fn start(status: u16) -> Counter {
        Self::start_after(status, Duration::ZERO).await
    }

    /// Counts each request as it arrives, and answers it `delay` later.
    pub async fn start_after(status: u16, delay: Duration) -> Counter {
        use hyper::service::service_fn;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind counter");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let counted = counted.clone();
                        async move {
                            let _ = req.into_body().collect().await;
                            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            let mut resp =
                                http::Response::new(Full::new(Bytes::from_static(b"counted\n")));
                            *resp.status_mut() =
                                http::StatusCode::from_u16(status).expect("status");
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Counter { addr, hits, task }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend that reads a whole request (head and Content-Length body), counts it, then
/// resets the connection without answering.
pub struct Resetter {
    pub addr: SocketAddr,
    pub hits: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Resetter {
    pub async fn start() -> Resetter {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind resetter");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut data = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        data.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&data).to_ascii_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length: usize = text[..end]
                                .lines()
                                .find_map(|l| {
                                    l.strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap_or(0))
                                })
                                .unwrap_or(0);
                            if data.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    drop(stream);
                });
            }
        });
        Resetter { addr, hits, task }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Resetter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// POSTs `body` to `url` with a fresh client.
pub async fn post(url: &str, body: Vec<u8>) -> Answer {
    send(
        http::Request::post(url)
            .body(Full::new(Bytes::from(body)))
            .expect("request"),
    )
    .await
}

/// A steady load: `clients` tasks each GET `url` in a loop until `duration` has passed
/// (at most `per_client` requests each, pausing `pause` between them). `counts` gets
/// (answered 200, anything else) and may be read while the load runs.
pub struct Load {
    pub ok: Arc<std::sync::atomic::AtomicUsize>,
    pub failed: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(
        url: &str,
        clients: usize,
        duration: Duration,
        per_client: usize,
        pause: Duration,
    ) -> Load {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let deadline = Instant::now() + duration;
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = (0..clients)
            .map(|_| {
                let (url, ok, failed) = (url.to_owned(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let client = client();
                    for _ in 0..per_client {
                        if Instant::now() >= deadline {
                            break;
                        }
                        let req = http::Request::get(&url)
                            .body(Full::new(Bytes::new()))
                            .expect("req");
                        match tokio::time::timeout(Duration::from_secs(5), client.request(req))
                            .await
                        {
                            Ok(Ok(resp)) if resp.status() == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Load { ok, failed, tasks }
    }

    pub fn ok(&self) -> usize {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits for every client to finish; returns (ok, failed).
    pub async fn finish(self) -> (usize, usize) {
        for task in self.tasks {
            task.await.expect("load client");
        }
        (
            self.ok.load(std::sync::atomic::Ordering::Relaxed),
            self.failed.load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

/// The value of the sample `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let have: Vec<(String, String)> = rest
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            labels
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
                .then(|| value.parse().ok())?
        })
}
