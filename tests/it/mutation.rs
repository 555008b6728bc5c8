//! Garbage in from both sides, through the real binary: requests mutated from valid ones
//! (bytes flipped, inserted, cut, repeated; framing headers added; pipelined followers;
//! sent in pieces) from several clients at once, to a backend that answers with mutated
//! responses (split, cut short, closed at random). Every client must get a well-formed
//! status line or a close within the timeouts (no hang, no garbage passed off as an
//! answer), the process must not panic, and it must still serve and stop cleanly after.
//! The same seed gives the same inputs, so a failure can be replayed.

use crate::common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SEED: u64 = 0x5eed_f0ba_15ad_e001;
const CLIENTS: u64 = 8;
const CASES_PER_CLIENT: usize = 40;

const REQUESTS: [&[u8]; 10] = [
    b"GET /m HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /m HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
    b"GET /m HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /m HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"PUT /m HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nxyz",
    b"GET /m HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: x-y\r\nX-Y: 1\r\n\r\n",
    b"HEAD /m HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://a/m?q=1 HTTP/1.1\r\nHost: a\r\n\r\n",
];

const RESPONSES: [&[u8]; 9] = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nDate: x\r\n\r\nok\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nServer: s\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: t\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: x-foo\r\nX-Foo: 1\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nServer: s\r\n\r\nuntil close",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndown",
];

const TOKENS: [&[u8]; 22] = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b",",
    b";",
    b"0",
    b"f",
    b"\x00",
    b"\xff",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Connection: close\r\n",
    b"Host: x\r\n",
    b"0\r\n\r\n",
    b"HTTP/1.0",
    b"ffffffffffffffff\r\n",
    b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n",
];

/// xorshift64*: a fixed sequence per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn mutate(rng: &mut Rng, template: &[u8], edits: usize) -> Vec<u8> {
    let mut b = template.to_vec();
    for _ in 0..edits {
        let at = rng.below(b.len() + 1);
        match rng.below(6) {
            0 if !b.is_empty() => {
                let token = TOKENS[rng.below(TOKENS.len())];
                let last = b.len() - 1;
                b[at.min(last)] = token[0];
            }
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                b.splice(at..at, token.iter().copied());
            }
            2 => {
                let end = (at + 1 + rng.below(12)).min(b.len());
                b.drain(at.min(end)..end);
            }
            3 => {
                let end = (at + 1 + rng.below(30)).min(b.len());
                let piece = b[at.min(end)..end].to_vec();
                b.splice(at..at, piece);
            }
            4 => b.truncate(at),
            _ => {
                let byte = (rng.next() & 0xff) as u8;
                b.insert(at, byte);
            }
        }
    }
    b
}

/// Answers whatever arrives with a mutated response, sometimes in two writes, sometimes
/// closing after; each connection draws from its own seed.
async fn backend(listener: TcpListener) {
    let next = Arc::new(AtomicU64::new(0));
    while let Ok((mut stream, _)) = listener.accept().await {
        let n = next.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut rng = Rng::new(SEED ^ (n + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut buf = vec![0u8; 65536];
            loop {
                let read = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf));
                match read.await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
                let mut answer = RESPONSES[rng.below(RESPONSES.len())].to_vec();
                if rng.chance(60) {
                    let edits = 1 + rng.below(3);
                    answer = mutate(&mut rng, &answer, edits);
                }
                if rng.chance(20) {
                    let cut = rng.below(answer.len() + 1);
                    if stream.write_all(&answer[..cut]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(rng.below(30) as u64)).await;
                    answer.drain(..cut);
                }
                if stream.write_all(&answer).await.is_err() || rng.chance(20) {
                    return;
                }
            }
        });
    }
}

/// What one client saw: `Ok(status)`, `Ok(0)` for a close without an answer, or what
/// was wrong.
async fn one_case(proxy: std::net::SocketAddr, rng: &mut Rng) -> Result<u16, String> {
    let template = REQUESTS[rng.below(REQUESTS.len())];
    let request = if rng.chance(80) {
        let edits = 1 + rng.below(3);
        mutate(rng, template, edits)
    } else {
        template.to_vec()
    };
    let describe = |what: &str| format!("{what} for {:?}", String::from_utf8_lossy(&request));
    let mut stream = TcpStream::connect(proxy)
        .await
        .map_err(|e| describe(&format!("connect: {e}")))?;
    let split = rng.chance(30) && request.len() > 2;
    let pipelined = rng.chance(30).then(|| REQUESTS[rng.below(REQUESTS.len())]);
    let cut = if split {
        1 + rng.below(request.len() - 1)
    } else {
        request.len()
    };
    // Write errors are fine: the proxy may answer and close before taking it all.
    let _ = stream.write_all(&request[..cut]).await;
    if split {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let _ = stream.write_all(&request[cut..]).await;
    }
    if let Some(next) = pipelined {
        let _ = stream.write_all(next).await;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        // Everything is bounded by a timeout of 1-2 s (header_read, idle, response), so
        // 6 s of silence on an open connection is a hang.
        let wait = if got.is_empty() { 6000 } else { 300 };
        match tokio::time::timeout(Duration::from_millis(wait), stream.read(&mut buf)).await {
            Err(_) if got.is_empty() => return Err(describe("no answer and no close in 6 s")),
            Err(_) | Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
        if got.len() > 1 << 20 {
            break;
        }
    }
    if got.is_empty() {
        return Ok(0);
    }
    let line = &got[..got.len().min(13)];
    let well_formed = line.starts_with(b"HTTP/1.1 ")
        && line.len() == 13
        && line[9..12].iter().all(u8::is_ascii_digit)
        && line[12] == b' ';
    if !well_formed {
        return Err(describe(&format!(
            "not a status line: {:?}",
            String::from_utf8_lossy(&got[..got.len().min(80)])
        )));
    }
    let status = std::str::from_utf8(&line[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_and_answers_get_status_lines_or_closes_and_no_panic() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend_addr = listener.local_addr().expect("addr");
    let backend_task = tokio::spawn(backend(listener));
    let port = free_port();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [server.timeouts]\nheader_read = \"1s\"\nidle = \"2s\"\nshutdown = \"2s\"\n\
         [server.limits]\nmax_header_bytes = 4096\nmax_body_bytes = 100000\n\
         [admin]\nlisten = \"127.0.0.1:{}\"\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n\
         [upstreams.app]\nbackends = [{{ addr = \"{backend_addr}\" }}]\n\
         [upstreams.app.timeouts]\nconnect = \"500ms\"\nresponse = \"1s\"\n",
        free_port()
    );
    let dir = TempDir::new("mutation");
    let file = dir.write("palisade.toml", &config);
    let log = dir.write("palisade.log", "");
    let child = spawn_logged(&file, &log, "warn");
    let proxy: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_listening(proxy).await;

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        clients.push(tokio::spawn(async move {
            let mut rng = Rng::new(SEED.wrapping_add(c));
            let mut seen = Vec::new();
            for _ in 0..CASES_PER_CLIENT {
                seen.push(one_case(proxy, &mut rng).await);
            }
            seen
        }));
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut wrong = Vec::new();
    for client in clients {
        for outcome in client.await.expect("client") {
            match outcome {
                Ok(status) => *statuses.entry(status).or_default() += 1,
                Err(e) => wrong.push(e),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} cases went wrong: {wrong:#?}",
        wrong.len()
    );
    // The mix shows that the inputs reached every side: refusals of bad requests,
    // backends' answers passed on, and palisade's own gateway errors.
    assert!(statuses.contains_key(&400), "{statuses:?}");
    assert!(
        statuses.keys().any(|s| (200..300).contains(s)),
        "{statuses:?}"
    );
    assert!(statuses.contains_key(&502), "{statuses:?}");

    // Still serving a plain request (the backend's answer is random: any status line),
    // then a clean stop, and nothing panicked along the way.
    let (answer, _) = raw_exchange(
        proxy,
        b"GET /m HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 "), "{answer:?}");
    stop_gracefully(child);
    backend_task.abort();
    let log = std::fs::read_to_string(&log).expect("read log");
    assert!(!log.contains("panicked"), "{log}");
}
