//! The fuzz check of a whole client connection: the fuzzer's bytes go, over a real
//! loopback socket, to the proxy (its HTTP/1.1 codec, the handler, the backend codec and
//! pool) in front of the echo backend, and what comes back must be a well-formed run of
//! responses, ended within a bounded time after the client stops sending. A panic
//! anywhere (the fuzzer aborts on one, whichever thread it is on) is a finding too.
//!
//! The parse targets (`request_head`, `response_head`, `chunked`, `body_writer`) reach
//! the codecs' parsers; this one reaches what only a live connection does: pipelining,
//! request bodies the handler reads or leaves, `Expect: 100-continue`, upgrades, HTTP/2
//! prior knowledge, retries, the rate limit, and the answers palisade makes itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than anything the configuration below lets a connection last once the client
/// has stopped sending (its timeouts are 1 s).
const HANG: Duration = Duration::from_secs(5);

/// How long the client reads answers with nothing arriving before it stops sending.
const QUIET: Duration = Duration::from_millis(20);

/// Responses past this many bytes are not checked (the echo backend streams as much as
/// it is asked for where the routes below let it).
const MAX_OUTPUT: u64 = 1 << 20;

/// The proxy under test. Short timeouts (a stalled connection ends quickly), small limits
/// (431 and 413 are reachable), a rate limit that trips, retries onto a refusing backend,
/// an HTTP/2 upstream. The echo backend's endless answers (`/bytes/N`, `/stream/N`,
/// `/delay/MS`) are routed to a backend that refuses connections.
const CONFIG: &str = r#"
[server]
listen = ["127.0.0.1:1"]
access_log = false
[server.timeouts]
header_read = "1s"
idle = "1s"
[server.limits]
max_header_bytes = 1024
max_body_bytes = 2048

[[routes]]
name = "endless"
path_prefix = "/bytes"
upstream = "refusing"
[[routes]]
name = "stream"
path_prefix = "/stream"
upstream = "refusing"
[[routes]]
name = "delay"
path_prefix = "/delay"
upstream = "refusing"
[[routes]]
name = "limited"
path_prefix = "/limited"
upstream = "echo"
[routes.rate_limit]
requests_per_second = 1.0
burst = 1
[[routes]]
name = "h2"
path_prefix = "/h2"
upstream = "echo-h2"
[[routes]]
name = "all"
upstream = "echo"

[upstreams.echo]
backends = [{ addr = "ECHO" }, { addr = "127.0.0.1:1" }]
[upstreams.echo.retry]
attempts = 1
backoff = "1ms"
budget_percent = 100
[upstreams.echo.timeouts]
connect = "200ms"
response = "1s"

[upstreams.echo-h2]
protocol = "h2c"
backends = [{ addr = "ECHO" }]
[upstreams.echo-h2.timeouts]
response = "1s"

[upstreams.refusing]
backends = [{ addr = "127.0.0.1:1" }]
[upstreams.refusing.retry]
attempts = 0
"#;

/// The proxy and its backend, started once per process.
struct World {
    runtime: tokio::runtime::Runtime,
    proxy: SocketAddr,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let proxy = runtime.block_on(async {
            let echo = super::bind("127.0.0.1:0".parse().expect("address")).expect("bind echo");
            let echo_addr = echo.local_addr().expect("echo address");
            tokio::spawn(crate::echo::serve(
                echo,
                "echo".into(),
                std::future::pending(),
            ));
            let text = CONFIG.replace("ECHO", &echo_addr.to_string());
            let config = crate::config::parse(&text, std::path::Path::new("fuzz.toml"))
                .unwrap_or_else(|e| panic!("the fuzz configuration: {e:?}"));
            let state = Arc::new(crate::snapshot::ProxyState::new(config));
            let listener = super::bind("127.0.0.1:0".parse().expect("address")).expect("bind");
            let proxy = listener.local_addr().expect("proxy address");
            tokio::spawn(super::serve(vec![listener], state, std::future::pending()));
            proxy
        });
        World { runtime, proxy }
    })
}

/// One client connection: the input's first 8 bytes say where its writes split it (as
/// for the parse targets), each write a moment after the last so that most arrive as
/// reads of their own; the rest is what the client sends. The client reads answers until
/// none arrives for [`QUIET`], then shuts its sending side and reads the rest.
///
/// Panics (a finding) if the connection is still open [`HANG`] after the client
/// finished, or if what came back is not a run of HTTP/1.x responses (unless the input
/// opened with the HTTP/2 preface), each whole and
/// framed as its headers say, nothing after one that said `Connection: close`, and
/// anything after a 101 left alone. Every 64th input, a fresh connection must still get
/// a 200 from the echo backend (no state left broken).
pub fn fuzz_connection(data: &[u8]) {
    static INPUTS: AtomicU64 = AtomicU64::new(0);
    let world = world();
    let (mut cuts, mut rest) = crate::http1::fuzz_split(data);
    // HTTP/2 with prior knowledge is answered in frames, by hyper: only the hang and
    // panic checks apply.
    let h2 = rest.starts_with(super::h1::H2_PREFACE);
    let out = world.runtime.block_on(async {
        let mut client = TcpStream::connect(world.proxy).await.expect("connect");
        let mut first = true;
        while !rest.is_empty() {
            if !first {
                std::thread::sleep(Duration::from_micros(100));
            }
            first = false;
            let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
            // The proxy may have closed already (a refused head): then read its answer.
            if client.write_all(&rest[..n]).await.is_err() {
                break;
            }
            rest = &rest[n..];
        }
        // The answers that come soon are read before the client shuts its sending side:
        // palisade drops a request whose client closes (half-closes too) before its
        // answer, as nginx does, and most answers would otherwise never be made.
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while (out.len() as u64) < MAX_OUTPUT {
            match tokio::time::timeout(QUIET, client.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let _ = client.shutdown().await;
        let mut capped = (&mut client).take(MAX_OUTPUT.saturating_sub(out.len() as u64));
        match tokio::time::timeout(HANG, capped.read_to_end(&mut out)).await {
            Err(_) => panic!(
                "the connection was still open {HANG:?} after the client finished; it had \
                 answered {:?}",
                String::from_utf8_lossy(&out)
            ),
            // Reset after an answer (the proxy closed with unread request bytes): what
            // arrived before is checked.
            Ok(_) => out,
        }
    });
    if !h2 && (out.len() as u64) < MAX_OUTPUT {
        if let Err(problem) = check_responses(&out) {
            panic!("{problem}: {:?}", String::from_utf8_lossy(&out));
        }
    }
    if INPUTS.fetch_add(1, Ordering::Relaxed).is_multiple_of(64) {
        let answer = world.runtime.block_on(probe(world.proxy));
        assert!(
            answer.starts_with(b"HTTP/1.1 200 "),
            "a fresh connection after the input got {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
}

/// A plain request on a new connection; the answer's bytes.
async fn probe(proxy: SocketAddr) -> Vec<u8> {
    let exchange = async {
        let mut client = TcpStream::connect(proxy).await.expect("connect");
        client
            .write_all(b"GET /probe HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n")
            .await
            .expect("send the probe");
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        out
    };
    tokio::time::timeout(HANG, exchange)
        .await
        .unwrap_or_else(|_| panic!("a fresh connection got no answer within {HANG:?}"))
}

/// Whether `out` is a run of whole HTTP/1.x responses (see [`fuzz_connection`]). A
/// response with a Content-Length may also have no body (the answer to a HEAD, which
/// this check cannot see): both readings are tried.
fn check_responses(out: &[u8]) -> Result<(), String> {
    if out.is_empty() {
        return Ok(());
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(out) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("a response head cut short".into()),
        Err(e) => return Err(format!("not a response head ({e})")),
    };
    let status = response.code.unwrap_or(0);
    if !(100..=599).contains(&status) {
        return Err(format!("status {status}"));
    }
    if status == 101 {
        return Ok(());
    }
    let rest = &out[head_len..];
    if status < 200 {
        return check_responses(rest);
    }
    let values = |name: &'static str| {
        response
            .headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let closes = values("connection").any(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    let lengths: Vec<&[u8]> = values("content-length").collect();
    let chunked = values("transfer-encoding").next().is_some();
    let after_body = |rest: &[u8]| match (closes, rest.is_empty()) {
        (_, true) => Ok(()),
        (true, false) => Err("bytes after a response that said Connection: close".to_string()),
        (false, false) => check_responses(rest),
    };
    if matches!(status, 204 | 304) {
        return after_body(rest);
    }
    match (lengths.as_slice(), chunked) {
        ([], false) => Ok(()), // The body runs to the close.
        ([], true) => match chunked_len(rest) {
            Some(n) => after_body(&rest[n..]),
            None => Err("a chunked body cut short or malformed".into()),
        },
        ([length], false) => {
            let n = std::str::from_utf8(length)
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or_else(|| format!("Content-Length {length:?}"))?;
            let with_body = rest
                .get(n..)
                .ok_or_else(|| "a body shorter than its Content-Length".to_string())
                .and_then(after_body);
            // The answer to a HEAD request: no body follows.
            with_body.or_else(|e| after_body(rest).map_err(|_| e))
        }
        _ => Err("Content-Length twice, or with Transfer-Encoding".into()),
    }
}

/// The length of the chunked body at the start of `bytes` (trailers included), if it is
/// whole and well-formed.
fn chunked_len(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line_end = at + bytes.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let line = &bytes[at..line_end];
        let size_text = line.split(|&b| b == b';').next()?;
        let size = usize::from_str_radix(std::str::from_utf8(size_text).ok()?, 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailer lines, then an empty line.
            loop {
                let end = at + bytes.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some(at);
                }
            }
        }
        at = at.checked_add(size)?;
        if bytes.get(at..at + 2)? != b"\r\n" {
            return None;
        }
        at += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_check_tells_whole_runs_from_broken_ones() {
        let ok: [&[u8]; 6] = [
            b"",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;x\r\nhi\r\n0\r\nt: 1\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nHTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\nanything at all",
        ];
        for out in ok {
            assert_eq!(
                check_responses(out),
                Ok(()),
                "{}",
                String::from_utf8_lossy(out)
            );
        }
        let broken: [&[u8]; 6] = [
            b"HTTP/1.1 200 OK\r\ncontent-le",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhi",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhi\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nhi",
        ];
        for out in broken {
            assert!(
                check_responses(out).is_err(),
                "{}",
                String::from_utf8_lossy(out)
            );
        }
    }
}
