//! Zero-downtime restarts (SPEC section 7): a new palisade process starts on the same
//! ports (SO_REUSEPORT), becomes ready, then the old one gets SIGTERM and drains; clients
//! under steady load see no failed request. Also the drain behaviour that makes it so for
//! keep-alive clients.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Linux resets the connections still queued on a listener that closes, unless
/// `net.ipv4.tcp_migrate_req` = 1 moves them to another listener of the SO_REUSEPORT
/// group (Linux 5.14+). The README's restart procedure sets it; so does this test, inside
/// a network namespace of its own so the machine's setting is left alone.
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
const IN_NETNS: &str = "PALISADE_TEST_IN_NETNS";

#[test]
fn restart_under_load_loses_no_request() {
    let migrating = std::fs::read_to_string(MIGRATE_REQ).is_ok_and(|v| v.trim() == "1");
    if migrating {
        run_scenario();
    } else {
        in_netns("restart_under_load_loses_no_request", "1");
    }
}

/// With `tcp_migrate_req` = 0 (Linux's default), the old process's queued connections are
/// not moved when its listener closes: they were reset, unless the new process took the
/// very same listening socket over (`server::handover`), which it now does.
#[test]
fn restart_under_load_loses_no_request_with_tcp_migrate_req_off() {
    in_netns(
        "restart_under_load_loses_no_request_with_tcp_migrate_req_off",
        "0",
    );
}

/// Runs the restart scenario inside a fresh network namespace (needs root, as CI is) with
/// `tcp_migrate_req` set to `migrate`: by running `test` again there.
fn in_netns(test: &str, migrate: &str) {
    if std::env::var_os(IN_NETNS).is_none() {
        let exe = std::env::current_exe().expect("test binary path");
        let status = Command::new("unshare")
            .args(["--net", "--"])
            .arg(exe)
            // The full test name: with `--exact`, a bare one matches no test (and the
            // run passes having run nothing).
            .args([&format!("restart::{test}"), "--exact", "--nocapture"])
            .env(IN_NETNS, "1")
            .status()
            .expect("run unshare (util-linux)");
        assert!(
            status.success(),
            "the restart test failed in its network namespace ({status}); it needs root to \
             create one"
        );
        return;
    }
    let lo = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("run ip (iproute2)");
    assert!(lo.success(), "cannot bring lo up in the test's namespace");
    std::fs::write(MIGRATE_REQ, migrate).expect("set tcp_migrate_req in the test's namespace");
    run_scenario();
}

fn run_scenario() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(restart_scenario());
}

/// Two restarts (A -> B -> C) during a steady load of keep-alive clients and of clients
/// that open a new connection per request.
async fn restart_scenario() {
    let backends = [
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    ];
    let port = free_port();
    let proxy: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = TempDir::new("restart");
    let instance = |name: &str| -> (PathBuf, SocketAddr) {
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let path = dir.join(format!("{name}.toml"));
        let list: Vec<String> = backends
            .iter()
            .map(|b| format!("{{ addr = \"{}\" }}", b.addr))
            .collect();
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = [\"{proxy}\"]\n[admin]\nlisten = \"{admin}\"\n\
                 [[routes]]\nname = \"all\"\nupstream = \"app\"\n\
                 [upstreams.app]\nbackends = [{}]\n",
                list.join(", ")
            ),
        )
        .expect("config");
        (path, admin)
    };

    let (path_a, admin_a) = instance("a");
    let mut old = start_ready(&path_a, admin_a).await;

    let url = format!("http://{proxy}/");
    let keep_alive = Load::start(
        &url,
        4,
        Duration::from_secs(7),
        20_000,
        Duration::from_millis(1),
    );
    let fresh = FreshLoad::start(proxy, 4, Duration::from_secs(7), 5_000);

    for name in ["b", "c"] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (path, admin) = instance(name);
        let new = start_ready(&path, admin).await;
        let served_before = keep_alive.ok() + fresh.ok();
        terminate_and_wait(old).await;
        eprintln!("restart to {name}: old instance gone after {served_before} answers");
        old = new;
    }
    let after_last = keep_alive.ok() + fresh.ok();
    let (ka_ok, ka_failed) = keep_alive.finish().await;
    let (fresh_ok, fresh_failed) = fresh.finish().await;
    eprintln!(
        "restart under load: keep-alive {ka_ok} ok / {ka_failed} failed, \
         new connections {fresh_ok} ok / {fresh_failed} failed"
    );
    assert_eq!(
        ka_failed, 0,
        "keep-alive requests failed during the restarts"
    );
    assert_eq!(
        fresh_failed, 0,
        "new-connection requests failed during the restarts"
    );
    assert!(
        ka_ok + fresh_ok > after_last + 100,
        "the last instance served too little: {after_last} before, {} after",
        ka_ok + fresh_ok
    );
    assert!(
        fresh_ok >= 500 && ka_ok >= 500,
        "too little load to prove anything"
    );
    terminate_and_wait(old).await;
}

/// Starts `palisade run -c path` and waits until it serves. Its own `/status` must say so
/// (its pid): while the old process runs, the shared admin port's `/readyz` may be
/// answered by the old one, however the new one is doing.
async fn start_ready(path: &Path, admin: SocketAddr) -> ChildGuard {
    let child = spawn_palisade(&["run", "-c", &path.to_string_lossy()]);
    wait_ready(child, path, admin).await
}

/// Waits until `child`, started with `path`, serves (see [`start_ready`]).
async fn wait_ready(mut child: ChildGuard, path: &Path, admin: SocketAddr) -> ChildGuard {
    let pid = u64::from(child.0.id());
    let ready = eventually(Duration::from_secs(20), async || {
        matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                status_pid(&format!("http://{admin}/status"))
            )
            .await,
            Ok(Some(answered)) if answered == pid
        )
    })
    .await;
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "palisade with {} exited",
        path.display()
    );
    assert!(ready, "palisade with {} never became ready", path.display());
    child
}

/// The pid in the `/status` answer at `url`.
async fn status_pid(url: &str) -> Option<u64> {
    use http_body_util::BodyExt as _;
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .ok()?;
    let answer = client().request(req).await.ok()?;
    let body = answer.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice::<serde_json::Value>(&body).ok()?["pid"].as_u64()
}

/// SIGTERM, then expects exit code 0 within 15 s.
async fn terminate_and_wait(mut child: ChildGuard) {
    let pid = child.0.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -TERM {pid}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            assert_eq!(status.code(), Some(0), "palisade {pid} exit after SIGTERM");
            return;
        }
        assert!(Instant::now() < deadline, "palisade {pid} still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clients that open a new connection for every request (`Connection: close`): the ones
/// that land in a listener's accept queue just as it closes.
struct FreshLoad {
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FreshLoad {
    fn start(addr: SocketAddr, clients: usize, duration: Duration, per_client: usize) -> Self {
        let deadline = Instant::now() + duration;
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (ok, failed) = (ok.clone(), failed.clone());
                tokio::spawn(async move {
                    for _ in 0..per_client {
                        if Instant::now() >= deadline {
                            break;
                        }
                        match tokio::time::timeout(Duration::from_secs(5), one_request(addr)).await
                        {
                            Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                            Ok(Err(e)) => {
                                eprintln!("new-connection request failed: {e}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(_) => {
                                eprintln!("new-connection request timed out");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
            })
            .collect();
        FreshLoad { ok, failed, tasks }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    async fn finish(self) -> (usize, usize) {
        for task in self.tasks {
            task.await.expect("load client");
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

async fn one_request(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: restart.test\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::with_capacity(1024);
    stream.read_to_end(&mut answer).await?;
    if answer.starts_with(b"HTTP/1.1 200 ") {
        Ok(())
    } else {
        let head = String::from_utf8_lossy(&answer[..answer.len().min(80)]).into_owned();
        Err(std::io::Error::other(format!("answer: {head:?}")))
    }
}

/// With SO_REUSEPORT alone, each process had a listening socket of its own, and the
/// connections the kernel queued on the old one were lost when it closed (unless
/// tcp_migrate_req = 1). Now the new process takes the old one's socket over: the two
/// accept from one queue, so with the old process frozen, every connection is still
/// served, by the new one. Then again one generation later (the new process has taken
/// over the hand-over name once the old one stopped).
#[tokio::test]
async fn a_replacing_process_takes_over_the_listening_socket_itself() {
    let echo = Echo::start("a").await;
    let proxy: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let dir = TempDir::new("handover");
    let instance = |name: &str| listen_config(&dir, name, &[proxy], echo.addr);
    let (path, admin) = instance("a");
    let mut old = start_ready(&path, admin).await;
    for name in ["b", "c"] {
        let (path, admin) = instance(name);
        // The old process offers its sockets once it holds the hand-over name: at once
        // for the first, within a second of its predecessor's exit for the next.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let new = start_ready(&path, admin).await;
        assert_served_with_the_old_one_frozen(&old, proxy, name).await;
        terminate_and_wait(old).await;
        old = new;
    }
    terminate_and_wait(old).await;
}

/// A running process that cannot answer the hand-over (frozen here; hung in practice)
/// must not keep a new one from starting: the new one gives up asking after 2 s, binds
/// its own socket (SO_REUSEPORT) and serves.
#[tokio::test]
async fn a_new_process_starts_even_when_the_old_one_cannot_hand_over() {
    let echo = Echo::start("a").await;
    let proxy: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let dir = TempDir::new("handover-hung");
    let instance = |name: &str| listen_config(&dir, name, &[proxy], echo.addr);
    let (path, admin) = instance("a");
    let old = start_ready(&path, admin).await;
    signal(&old, "-STOP");
    let (path, admin) = instance("b");
    let new = start_ready(&path, admin).await;
    // Its own socket: some new connections land in the frozen process's queue, but the
    // new process serves the ones that reach it.
    let served = futures_util::future::join_all(
        (0..16).map(|_| tokio::time::timeout(Duration::from_secs(3), one_request(proxy))),
    )
    .await
    .iter()
    .filter(|a| matches!(a, Ok(Ok(()))))
    .count();
    assert!(served > 0, "the new process served nothing");
    signal(&old, "-CONT");
    terminate_and_wait(old).await;
    terminate_and_wait(new).await;
}

#[tokio::test]
async fn a_keep_alive_connection_that_stays_quiet_at_drain_is_closed_after_the_grace() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&single_upstream(&[(a.addr, 1)], "")).await;
    let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
    conn.write_all(b"GET / HTTP/1.1\r\nHost: drain.test\r\n\r\n")
        .await
        .expect("write");
    let first = read_head(&mut conn).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    // Drain starts while the connection is idle, and the client sends nothing more: the
    // connection is closed once the grace (1 s) has passed, and the drain ends.
    let started = std::time::Instant::now();
    let draining = tokio::spawn(proxy.shutdown());
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
    assert!(
        eof.is_ok(),
        "a quiet connection was not closed during the drain"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the grace: {:?}",
        started.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(5), draining)
        .await
        .expect("drain finished")
        .expect("drain task");
}

#[tokio::test]
async fn a_keep_alive_connection_idle_at_drain_gets_one_more_answer_then_close() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&single_upstream(&[(a.addr, 1)], "")).await;
    let addr = proxy.addr;
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let request = b"GET / HTTP/1.1\r\nHost: drain.test\r\n\r\n";
    conn.write_all(request).await.expect("write");
    let first = read_head(&mut conn).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        !first.to_ascii_lowercase().contains("connection: close"),
        "{first}"
    );

    // Drain starts while the connection is idle.
    let draining = tokio::spawn(proxy.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The client's next request on it is still answered, with Connection: close...
    conn.write_all(request)
        .await
        .expect("write during the drain");
    let second = read_head(&mut conn).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(
        second.to_ascii_lowercase().contains("connection: close"),
        "{second}"
    );
    // ...and then the connection ends.
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(3), conn.read_to_end(&mut rest)).await;
    assert!(eof.is_ok(), "connection not closed after Connection: close");
    tokio::time::timeout(Duration::from_secs(5), draining)
        .await
        .expect("drain finished")
        .expect("drain task");
}

#[tokio::test]
async fn under_systemd_it_says_ready_once_serving_and_stopping_on_sigterm() {
    let a = Echo::start("a").await;
    let port = free_port();
    let dir = TempDir::new("notify");
    let socket_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&socket_path);
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let path = dir.write(
        "palisade.toml",
        &listening_on(port, &single_upstream(&[(a.addr, 1)], "")),
    );
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["run", "-c", &path.to_string_lossy(), "--log-level", "warn"])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn palisade");
    let child = ChildGuard(child);
    let receive = |socket: std::os::unix::net::UnixDatagram| {
        tokio::task::spawn_blocking(move || {
            let mut buf = [0u8; 256];
            let n = socket.recv(&mut buf).expect("a notification within 20 s");
            (String::from_utf8_lossy(&buf[..n]).into_owned(), socket)
        })
    };
    let (message, socket) = receive(socket).await.expect("recv task");
    assert_eq!(message, "READY=1");
    // Ready means serving: the very next request is answered.
    let answer = get(&format!("http://127.0.0.1:{port}/")).await;
    assert_eq!(answer.status, 200);
    let stopping = receive(socket);
    terminate_and_wait(child).await;
    let (message, _) = stopping.await.expect("recv task");
    assert_eq!(message, "STOPPING=1");
}

/// Sends `sig` to the process.
fn signal(child: &ChildGuard, sig: &str) {
    let pid = child.0.id().to_string();
    let sent = Command::new("kill")
        .args([sig, &pid])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill {sig} {pid}");
}

/// Freezes `old`, sends 32 requests on new connections to `addr`, thaws it again and
/// asserts that none failed (`who` names the new process in the message). None fail only
/// when every connection went to a process that still accepts, that is when the two share
/// the listening socket: a connection left in a queue only the frozen process reads never
/// gets an answer.
async fn assert_served_with_the_old_one_frozen(old: &ChildGuard, addr: SocketAddr, who: &str) {
    signal(old, "-STOP");
    // Stopped ("T" in /proc), not merely signalled.
    let stat = format!("/proc/{}/stat", old.0.id());
    let stopped = eventually(Duration::from_secs(5), async || {
        std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|state| state.trim_start().starts_with('T'))
        })
    })
    .await;
    assert!(stopped, "the old process did not stop");
    // The time limit is generous for a loaded machine.
    let answered = futures_util::future::join_all(
        (0..32).map(|_| tokio::time::timeout(Duration::from_secs(10), one_request(addr))),
    )
    .await;
    signal(old, "-CONT");
    let failed: Vec<String> = answered
        .iter()
        .filter_map(|a| match a {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("no answer in 10 s".to_owned()),
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{who}: with the old process frozen, {} of 32 connections to {addr} failed: {failed:?}",
        failed.len()
    );
}

/// A config for one instance, `name`: `listen`, an admin address of its own, one route
/// to `backend`.
fn listen_config(
    dir: &TempDir,
    name: &str,
    listen: &[SocketAddr],
    backend: SocketAddr,
) -> (PathBuf, SocketAddr) {
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let path = dir.join(format!("{name}.toml"));
    write_config(&path, listen, admin, backend);
    (path, admin)
}

fn write_config(path: &Path, listen: &[SocketAddr], admin: SocketAddr, backend: SocketAddr) {
    let listen: Vec<String> = listen.iter().map(|a| format!("\"{a}\"")).collect();
    std::fs::write(
        path,
        format!(
            "[server]\nlisten = [{}]\n[admin]\nlisten = \"{admin}\"\n\
             [[routes]]\nname = \"all\"\nupstream = \"app\"\n\
             [upstreams.app]\nbackends = [{{ addr = \"{backend}\" }}]\n",
            listen.join(", ")
        ),
    )
    .expect("config");
}

/// Two listen addresses, lowest first.
fn two_addresses() -> (SocketAddr, SocketAddr) {
    let mut ports = [free_port(), free_port()];
    ports.sort_unstable();
    (
        ([127, 0, 0, 1], ports[0]).into(),
        ([127, 0, 0, 1], ports[1]).into(),
    )
}

/// A process offers its sockets under each of its listen addresses, and a reload can add
/// a lower one: it offers under that too. Once, it kept the one name it started with, and
/// a new process whose lowest address was the reload's new one found nobody to take over
/// from and bound a socket of its own (its predecessor's queue then lost).
#[tokio::test]
async fn a_reload_that_adds_a_lower_address_moves_the_hand_over_with_it() {
    let (low, high) = two_addresses();
    reload_then_take_over("handover-reload", &[high], &[low, high], low).await;
}

/// A new process whose lowest listen address is not the running one's (it adds a lower
/// one) still takes the running one's sockets over: it asks under each of its addresses.
#[tokio::test]
async fn a_new_process_with_a_lower_address_added_still_takes_over() {
    let echo = Echo::start("a").await;
    let dir = TempDir::new("handover-added");
    let (low, high) = two_addresses();
    let (path, admin) = listen_config(&dir, "a", &[high], echo.addr);
    let old = start_ready(&path, admin).await;
    replace_and_check_the_take_over(old, &dir, &[low, high], high, echo.addr).await;
}

/// Starts a process listening on `listen` next to `old`, and checks that it took `addr`'s
/// socket over (every connection served with `old` frozen); then stops both.
async fn replace_and_check_the_take_over(
    old: ChildGuard,
    dir: &TempDir,
    listen: &[SocketAddr],
    addr: SocketAddr,
    backend: SocketAddr,
) {
    let (path, admin) = listen_config(dir, "new", listen, backend);
    let new = start_ready(&path, admin).await;
    assert_served_with_the_old_one_frozen(&old, addr, "new").await;
    terminate_and_wait(old).await;
    terminate_and_wait(new).await;
}

/// Rewrites the config at `path` to listen on `listen`, reloads it through `admin`, and
/// waits until every address of `listen` answers and none of `dropped` does.
async fn reload_listening(
    path: &Path,
    listen: &[SocketAddr],
    dropped: &[SocketAddr],
    admin: SocketAddr,
    backend: SocketAddr,
) {
    write_config(path, listen, admin, backend);
    let reloaded = post(&format!("http://{admin}/reload"), Vec::new()).await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    let opened = listen.iter().map(|&addr| (addr, true));
    for (addr, open) in opened.chain(dropped.iter().map(|&addr| (addr, false))) {
        assert!(
            eventually(Duration::from_secs(5), async || one_request(addr)
                .await
                .is_ok()
                == open)
            .await,
            "the reload did not {} {addr}",
            if open { "open" } else { "close" }
        );
    }
}

/// Three listen addresses, lowest first.
fn three_addresses() -> [SocketAddr; 3] {
    let mut ports = [free_port(), free_port(), free_port()];
    ports.sort_unstable();
    ports.map(|port| ([127, 0, 0, 1], port).into())
}

/// A running process offers its sockets under every one of its listen addresses, so a
/// new process whose config drops the running one's lowest address (and adds another)
/// still takes over the sockets of the addresses the two share. Before, the running
/// process offered under its lowest address only: the new one found nobody, bound its
/// own socket, and the connections queued on the old one's were lost.
#[tokio::test]
async fn a_new_process_without_the_old_lowest_address_still_takes_over() {
    let echo = Echo::start("a").await;
    let dir = TempDir::new("handover-dropped");
    let [a, b, c] = three_addresses();
    let (path, admin) = listen_config(&dir, "old", &[a, b], echo.addr);
    let old = start_ready(&path, admin).await;
    replace_and_check_the_take_over(old, &dir, &[b, c], b, echo.addr).await;
}

/// A reload that adds an address offers the sockets under its name too: a new process
/// listening on the added address only takes that socket over.
#[tokio::test]
async fn a_reload_that_adds_an_address_offers_under_it_too() {
    let (low, high) = two_addresses();
    reload_then_take_over("handover-reload-added", &[low], &[low, high], high).await;
}

/// Starts a process on `first`, reloads it to `then`, and checks that a process listening
/// on `addr` alone takes `addr`'s socket over ([`replace_and_check_the_take_over`]).
async fn reload_then_take_over(
    tag: &str,
    first: &[SocketAddr],
    then: &[SocketAddr],
    addr: SocketAddr,
) {
    let echo = Echo::start("a").await;
    let dir = TempDir::new(tag);
    let (path, admin) = listen_config(&dir, "a", first, echo.addr);
    let old = start_ready(&path, admin).await;
    reload_listening(&path, then, &[], admin, echo.addr).await;
    replace_and_check_the_take_over(old, &dir, &[addr], addr, echo.addr).await;
}

/// A running process that does not answer the hand-over holds a name for each of its
/// addresses; a new process sharing several of them asks under the first one only, gives
/// up once, and binds its own sockets for them all (it does not wait again per address).
#[tokio::test]
async fn a_hung_old_process_is_asked_under_one_of_its_names_only() {
    let echo = Echo::start("a").await;
    let dir = TempDir::new("handover-hung-two");
    let [a, b, c] = three_addresses();
    let (path, admin) = listen_config(&dir, "old", &[a, b, c], echo.addr);
    let old = start_ready(&path, admin).await;
    signal(&old, "-STOP");
    let (path, admin) = listen_config(&dir, "new", &[a, b, c], echo.addr);
    let log_path = dir.join("new.log");
    let child = spawn_logging_to(&path, "warn", &log_path);
    let new = wait_ready(child, &path, admin).await;
    signal(&old, "-CONT");
    terminate_and_wait(old).await;
    // Its log is complete once it has exited.
    terminate_and_wait(new).await;
    let log = std::fs::read_to_string(&log_path).expect("read the log");
    let asked = log.matches("could not take over").count();
    assert_eq!(asked, 1, "asked the hung process {asked} times:\n{log}");
}

/// A reload that drops an address stops offering under its name, so the name is free for
/// a process that listens there next: here one started on the dropped address claims it,
/// and a process started after that takes that one's socket over (were the name still
/// the reloaded process's, the second would have asked it, got no socket for the address
/// and bound one of its own).
#[tokio::test]
async fn a_reload_that_drops_an_address_releases_its_name() {
    let echo = Echo::start("a").await;
    let dir = TempDir::new("handover-reload-dropped");
    let (low, high) = two_addresses();
    let (path, admin) = listen_config(&dir, "old", &[low, high], echo.addr);
    let old = start_ready(&path, admin).await;
    reload_listening(&path, &[high], &[low], admin, echo.addr).await;
    let (path, admin) = listen_config(&dir, "first", &[low], echo.addr);
    let first = start_ready(&path, admin).await;
    replace_and_check_the_take_over(first, &dir, &[low], low, echo.addr).await;
    terminate_and_wait(old).await;
}

/// Port 0 is any free port, not an address two processes share: a palisade started on
/// port 0 beside another on port 0 binds its own socket and takes nothing over. Once,
/// both offered and asked under `127.0.0.1:0`, and the second took the first's socket.
#[tokio::test]
async fn two_processes_on_port_0_take_nothing_from_each_other() {
    let echo = Echo::start("a").await;
    let dir = TempDir::new("handover-port-0");
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    let (path, admin) = listen_config(&dir, "first", &[any], echo.addr);
    let first = start_ready(&path, admin).await;
    let (path, admin) = listen_config(&dir, "second", &[any], echo.addr);
    let log_path = dir.join("second.log");
    let child = spawn_logging_to(&path, "info", &log_path);
    let second = wait_ready(child, &path, admin).await;
    terminate_and_wait(second).await;
    terminate_and_wait(first).await;
    let log = std::fs::read_to_string(&log_path).expect("read the log");
    assert!(log.contains("listening"), "no listening line:\n{log}");
    assert!(
        !log.contains("took over"),
        "the second process took the first's socket:\n{log}"
    );
}

/// `palisade run -c path` logging at `level` to the file `log` (plain text).
fn spawn_logging_to(path: &Path, level: &str, log: &Path) -> ChildGuard {
    let log = std::fs::File::create(log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["run", "-c", &path.to_string_lossy(), "--log-level", level])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn palisade");
    ChildGuard(child)
}
