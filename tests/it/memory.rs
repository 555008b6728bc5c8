//! Bodies stream: a 1 GiB download and a 1 GiB upload through a palisade process keep its
//! peak RSS (VmHWM) under 64 MiB. palisade and the echo backend run as separate processes,
//! so the number is the proxy's alone.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GIB: u64 = 1 << 30;
const RSS_LIMIT_KIB: u64 = 64 * 1024;

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Reads one HTTP/1.1 response head, then exactly its Content-Length of body; the body is
/// returned when it is small (up to 1 MiB), counted and discarded otherwise.
async fn read_response(stream: &mut TcpStream) -> (String, u64, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.expect("read head");
        assert_eq!(
            n,
            1,
            "closed in the head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let length: u64 = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut left = length;
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = stream.read(&mut buf[..want]).await.expect("read body");
        assert!(n > 0, "closed with {left} bytes left");
        if length <= 1 << 20 {
            kept.extend_from_slice(&buf[..n]);
        }
        left -= n as u64;
    }
    (head, length, kept)
}

/// Its own processes: an echo backend, and palisade in front of it, the `server` and
/// `upstream` lines added to its config's tables. Returns what keeps them (the echo
/// process and the config's directory), palisade's process and its address.
async fn behind_palisade(
    tag: &str,
    server: &str,
    upstream: &str,
) -> ((ChildGuard, TempDir), ChildGuard, SocketAddr) {
    let echo_port = free_port();
    let echo = spawn_palisade(&[
        "echo",
        "--listen",
        &format!("127.0.0.1:{echo_port}"),
        "--name",
        "big",
    ]);
    let proxy_port = free_port();
    let dir = TempDir::new(tag);
    let config = dir.write(
        "palisade.toml",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:{proxy_port}\"]\n{server}[admin]\nlisten = \"127.0.0.1:{}\"\n\
             [[routes]]\nupstream = \"big\"\n[upstreams.big]\nbackends = [{{ addr = \"127.0.0.1:{echo_port}\" }}]\n{upstream}",
            free_port()
        ),
    );
    let proxy = spawn_palisade(&["run", "-c", &config.to_string_lossy()]);
    let addr: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().expect("addr");
    wait_listening(format!("127.0.0.1:{echo_port}").parse().expect("addr")).await;
    wait_listening(addr).await;
    ((echo, dir), proxy, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_streams_in_bounded_memory() {
    let (_processes, proxy, addr) = behind_palisade(
        "mem",
        "[server.limits]\nmax_body_bytes = 0\n",
        "[upstreams.big.timeouts]\nresponse = \"120s\"\n",
    )
    .await;

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // Download.
    stream
        .write_all(format!("GET /bytes/{GIB} HTTP/1.1\r\nhost: big\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (head, length, _) =
        tokio::time::timeout(Duration::from_secs(240), read_response(&mut stream))
            .await
            .expect("download in time");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(length, GIB);

    // Upload, on the same keep-alive connection.
    stream
        .write_all(
            format!("POST /upload HTTP/1.1\r\nhost: big\r\ncontent-length: {GIB}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write head");
    let chunk = vec![b'u'; 256 * 1024];
    let upload = async {
        let mut sent = 0u64;
        while sent < GIB {
            stream.write_all(&chunk).await.expect("write body");
            sent += chunk.len() as u64;
        }
        read_response(&mut stream).await
    };
    let (head, _, body) = tokio::time::timeout(Duration::from_secs(240), upload)
        .await
        .expect("upload in time");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let json: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
    assert_eq!(
        json["body_bytes"], GIB,
        "the backend did not get the whole upload"
    );

    let peak = peak_rss_kib(proxy.0.id());
    eprintln!("palisade peak RSS after 1 GiB each way: {peak} KiB");
    assert!(
        peak < RSS_LIMIT_KIB,
        "peak RSS {peak} KiB >= {RSS_LIMIT_KIB} KiB"
    );
}

/// One HTTP/2 frame: length, type, flags, stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_opens_every_stream_and_reads_nothing_pins_little_memory() {
    // It grants huge windows, asks for 50 MB on every stream it may open, and never
    // reads its socket: what palisade buffers per stream beyond the socket is all it can
    // pin. With hyper's defaults (256 streams, 400 KiB each) one such connection held
    // about 190 MB.
    let (_processes, proxy, addr) = behind_palisade("mem-h2", "", "").await;
    let before = peak_rss_kib(proxy.0.id());

    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stream = socket.connect(addr).await.expect("connect");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE 16 MiB; the connection window to its maximum.
    let mut settings = 4u16.to_be_bytes().to_vec();
    settings.extend_from_slice(&(16u32 << 20).to_be_bytes());
    out.extend(h2_frame(4, 0, 0, &settings));
    out.extend(h2_frame(
        8,
        0,
        0,
        &((1u32 << 31) - 1 - 65_535).to_be_bytes(),
    ));
    // GET /bytes/52428800 (HPACK: :method GET, :scheme http indexed; :path and
    // :authority literal with an indexed name), END_STREAM | END_HEADERS.
    let path = b"/bytes/52428800";
    let mut block = vec![0x82, 0x86, 0x04, u8::try_from(path.len()).expect("short")];
    block.extend_from_slice(path);
    block.extend_from_slice(&[0x01, 0x01, b't']);
    for i in 0..200u32 {
        out.extend(h2_frame(1, 0x05, 1 + 2 * i, &block));
    }
    stream.write_all(&out).await.expect("send");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let peak = peak_rss_kib(proxy.0.id());
    eprintln!(
        "palisade peak RSS: {before} KiB before, {peak} KiB with one non-reading HTTP/2 client"
    );
    drop(stream);
    assert!(
        peak < before + 40 * 1024,
        "one HTTP/2 connection pinned {} KiB",
        peak - before
    );
}
