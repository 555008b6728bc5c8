//! The JSON access log line, formatted by hand.
//!
//! Through `tracing`'s JSON formatter one access line cost about 30,000 instructions
//! (every field through `Visit` and serde_json's escaper into a fresh `String`, the
//! timestamp formatted from scratch): more than the rest of the request. Here the line is
//! written into a per-thread batch, strings are copied in runs between the rare bytes
//! JSON must escape, and the date part of the timestamp is formatted once per second.
//! Every 20 ms (while lines come: it sleeps after a second without one) a flusher thread
//! writes each thread's batch to stderr, where every other log line goes, holding
//! stderr's lock for the whole batch (so lines never interleave mid-line with the log
//! writer's): handing over each line woke the writer thread per request (a futex wake,
//! its spinning `sched_yield`s, and a `write` per line on the proxy's core), and handing
//! batches to that writer copied each of them into its queue.
//! The output is the line `tracing` wrote: the same keys in the same order.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the batches of every thread are written.
const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// A thread's batch is written at once, by that thread, when it grows past this (bounded
/// memory under a burst).
const MAX_BATCH: usize = 1 << 20;

/// One thread's lines not yet written. Its lock is taken by that thread for
/// each line and by the flusher every [`FLUSH_EVERY`]: never contended in practice, and no
/// lock shared by the request threads.
type Batch = Arc<Mutex<Vec<u8>>>;

struct Sink {
    /// Whether the log filter lets access lines through, read once at install (the
    /// filter is set once per process); None when it can change (span directives).
    enabled: Option<bool>,
    /// Every thread's batch (a thread registers on its first line).
    batches: Mutex<Vec<Batch>>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Routes access lines to stderr from now on (where the JSON log goes), and starts the
/// thread that writes the batched lines. Without it, the handler logs access lines
/// through `tracing` (text format, tests, embedders).
pub fn install(level: &str) {
    let enabled = (!level.contains('['))
        .then(|| tracing::enabled!(target: "palisade::access", tracing::Level::INFO));
    let sink = Sink {
        enabled,
        batches: Mutex::new(Vec::new()),
    };
    if SINK.set(sink).is_err() {
        return;
    }
    let started = std::thread::Builder::new()
        .name("palisade-access".into())
        .spawn(flusher);
    if let Err(e) = started {
        // Lines still reach the log: each thread's batch is handed over once it is full,
        // and at exit (`flush`).
        tracing::error!(error = %e, "cannot start the access log's flusher thread");
    }
}

/// Whether access lines pass the log filter: known once [`install`] has run with a filter
/// that cannot change (then no filter check per request); None otherwise.
pub fn enabled() -> Option<bool> {
    SINK.get().and_then(|sink| sink.enabled)
}

/// The flusher thread: writes the batches every [`FLUSH_EVERY`] while lines come, and
/// sleeps once none came for [`IDLE_ROUNDS`] rounds (with the access log off, or no
/// traffic, it would otherwise wake 50 times a second for nothing), until a line wakes it.
fn flusher() {
    let _ = FLUSHER.set(std::thread::current());
    let mut idle = 0;
    loop {
        std::thread::sleep(FLUSH_EVERY);
        if flush() {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle < IDLE_ROUNDS {
            continue;
        }
        idle = 0;
        // Said before the last look at the batches: a line added after that look (its
        // batch's lock taken after this one's) finds PARKED set and wakes the thread.
        PARKED.store(true, Ordering::SeqCst);
        if flush() {
            PARKED.store(false, Ordering::SeqCst);
            continue;
        }
        while PARKED.load(Ordering::SeqCst) {
            std::thread::park();
        }
    }
}

/// Rounds of [`FLUSH_EVERY`] with no line before the flusher sleeps (1 s).
const IDLE_ROUNDS: u32 = 50;

/// Whether the flusher sleeps until a line comes.
static PARKED: AtomicBool = AtomicBool::new(false);

/// The flusher thread, to wake.
static FLUSHER: OnceLock<std::thread::Thread> = OnceLock::new();

/// Wakes the flusher if it sleeps for want of lines: one relaxed load per line while it
/// is awake.
fn wake_flusher() {
    if PARKED.load(Ordering::Relaxed) && PARKED.swap(false, Ordering::SeqCst) {
        if let Some(flusher) = FLUSHER.get() {
            flusher.unpark();
        }
    }
}

/// Writes every thread's batched lines (every 20 ms, and at exit: the log guard calls it
/// before the log writer's own flush). Whether there were any.
pub fn flush() -> bool {
    let Some(sink) = SINK.get() else {
        return false;
    };
    let Ok(mut all) = sink.batches.lock() else {
        return false;
    };
    let mut wrote = false;
    all.retain(|batch| {
        // Checked before the batch is taken: a thread that ends after this keeps its
        // batch here for the next round; one that ended before adds nothing more, so this
        // last flush of its batch is complete and the batch is forgotten.
        let alive = Arc::strong_count(batch) > 1;
        if let Ok(mut lines) = batch.lock() {
            wrote |= !lines.is_empty();
            hand_over(&mut lines);
        }
        alive
    });
    wrote
}

/// Writes `lines` to stderr in one locked `write_all` (no other log line lands inside
/// them) and empties them, keeping their capacity for the next batch.
fn hand_over(lines: &mut Vec<u8>) {
    if !lines.is_empty() {
        // Nowhere to report a failing stderr; the lines are dropped as tracing's writer
        // would drop them.
        let _ = std::io::stderr().lock().write_all(lines);
        lines.clear();
    }
}

/// What one access line says.
pub struct Line<'a> {
    /// ASCII (checked where it is taken from the client, or made here).
    pub request_id: &'a [u8],
    pub client_ip: IpAddr,
    pub method: &'a str,
    /// The Host header's bytes or the request target's authority.
    pub host: &'a [u8],
    pub path: &'a str,
    pub status: u16,
    pub route: &'a str,
    pub upstream: &'a str,
    pub backend: &'a str,
    pub attempts: u32,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub duration: Duration,
    /// When the response head was ready (the line's timestamp).
    pub finished: Instant,
}

/// Per thread: its batch, and the date part of the last timestamp.
struct Local {
    batch: Option<Batch>,
    clock: Clock,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local {
        batch: None,
        clock: Clock::default(),
    });
}

/// Adds `line` to this thread's batch if [`install`] was called; returns false (and
/// writes nothing) if not. No system call and no allocation per line: the batch reaches
/// the log within 20 ms, each thread's lines in order.
pub fn write(line: &Line<'_>) -> bool {
    let Some(sink) = SINK.get() else {
        return false;
    };
    // `try_with`: a thread being torn down has no state left; tracing then takes the line.
    LOCAL
        .try_with(|local| {
            let Ok(mut local) = local.try_borrow_mut() else {
                return false;
            };
            let Local { batch, clock } = &mut *local;
            let batch = match batch {
                Some(batch) => batch,
                None => {
                    let new: Batch = Arc::new(Mutex::new(Vec::with_capacity(64 * 1024)));
                    match sink.batches.lock() {
                        Ok(mut all) => all.push(new.clone()),
                        Err(_) => return false,
                    }
                    batch.insert(new)
                }
            };
            let Ok(mut lines) = batch.lock() else {
                return false;
            };
            let now = clock.wall(line.finished);
            format(&mut lines, clock, now, line);
            if lines.len() >= MAX_BATCH {
                hand_over(&mut lines);
            }
            // After the batch's lock is let go (see `flusher`).
            drop(lines);
            wake_flusher();
            true
        })
        .unwrap_or(false)
}

/// Room for everything in a line but its strings: the keys, the timestamp, the longest
/// address and the longest numbers (checked by a test).
const FIXED: usize = 400;

/// The most bytes a string of `len` bytes takes in a line: a control byte is escaped to
/// `\u00XX`, six bytes; an invalid UTF-8 byte becomes U+FFFD, three.
fn json_room(len: usize) -> usize {
    len.saturating_mul(6).saturating_add(2)
}

/// Appends `line` to `buf`. The line is written into room reserved for its longest
/// possible form and cut to what it took, so each piece is a bounds check and a copy
/// instead of a `Vec` growth check and a `memcpy` call.
fn format(buf: &mut Vec<u8>, clock: &mut Clock, now: Duration, line: &Line<'_>) {
    let room = [
        line.request_id.len(),
        line.method.len(),
        line.route.len(),
        line.upstream.len(),
        line.backend.len(),
        json_room(line.host.len()),
        json_room(line.path.len()),
    ]
    .iter()
    .fold(FIXED, |total, n| total.saturating_add(*n));
    let start = buf.len();
    buf.resize(start.saturating_add(room), 0);
    let mut out = Out {
        buf: &mut buf[start..],
        at: 0,
    };
    out.put(b"{\"timestamp\":\"");
    clock.write_rfc3339(&mut out, now);
    out.put(b"\",\"level\":\"INFO\",\"message\":\"request\",\"request_id\":\"");
    // A request id is `[A-Za-z0-9._:+/=@-]` (the client's is kept only then) and a method
    // is an HTTP token: neither ever needs escaping.
    out.put(line.request_id);
    out.put(b"\",\"client_ip\":\"");
    let mut ip = [0; 64];
    out.put(crate::proxy::headers::ip_text(line.client_ip, &mut ip));
    out.put(b"\",\"method\":\"");
    out.put(line.method.as_bytes());
    out.put(b"\",\"host\":");
    out.string(line.host);
    out.put(b",\"path\":");
    out.string(line.path.as_bytes());
    out.put(b",\"status\":");
    out.integer(line.status);
    // Route and upstream names are letters, digits, `-`, `_` and `.`, backend addresses
    // host:port (both checked by `config::validate`): nothing to escape.
    out.put(b",\"route\":\"");
    out.put(line.route.as_bytes());
    out.put(b"\",\"upstream\":\"");
    out.put(line.upstream.as_bytes());
    out.put(b"\",\"backend\":\"");
    out.put(line.backend.as_bytes());
    out.put(b"\",\"attempts\":");
    out.integer(line.attempts);
    out.put(b",\"bytes_in\":");
    out.integer(line.bytes_in);
    out.put(b",\"bytes_out\":");
    out.integer(line.bytes_out);
    // Milliseconds with nanosecond digits, as a JSON number.
    out.put(b",\"duration_ms\":");
    let nanos = u64::try_from(line.duration.as_nanos()).unwrap_or(u64::MAX);
    out.integer(nanos / 1_000_000);
    out.put(b".");
    out.padded6((nanos % 1_000_000) as u32);
    out.put(b",\"target\":\"palisade::access\"}\n");
    let end = start + out.at;
    buf.truncate(end);
}

/// A line being written into the room reserved for it.
struct Out<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Out<'_> {
    /// Appends `bytes`. The room is reserved for the longest line, so they always fit; if
    /// that reckoning were ever wrong the piece would be left out, never a panic.
    #[inline(always)]
    fn put(&mut self, bytes: &[u8]) {
        let end = self.at + bytes.len();
        if let Some(room) = self.buf.get_mut(self.at..end) {
            room.copy_from_slice(bytes);
            self.at = end;
        }
    }

    fn integer(&mut self, n: impl itoa::Integer) {
        self.put(itoa::Buffer::new().format(n).as_bytes());
    }

    /// `n` (below 10^6) in exactly six digits, zero-padded.
    fn padded6(&mut self, n: u32) {
        let mut digits = itoa::Buffer::new();
        let text = digits.format(1_000_000 + n % 1_000_000).as_bytes();
        self.put(&text[1..]);
    }

    /// `bytes` as a JSON string: quoted, with `"`, `\` and control characters escaped.
    /// Text that is not UTF-8 (a Host header's obs-text) has its invalid bytes replaced
    /// by U+FFFD.
    fn string(&mut self, bytes: &[u8]) {
        self.put(b"\"");
        if first_to_escape(bytes, true).is_none() {
            self.put(bytes);
        } else {
            let text = String::from_utf8_lossy(bytes);
            let mut rest = text.as_bytes();
            while let Some(at) = first_to_escape(rest, false) {
                self.put(&rest[..at]);
                match rest[at] {
                    b'"' => self.put(b"\\\""),
                    b'\\' => self.put(b"\\\\"),
                    b'\n' => self.put(b"\\n"),
                    b'\r' => self.put(b"\\r"),
                    b'\t' => self.put(b"\\t"),
                    b => {
                        const HEX: &[u8; 16] = b"0123456789abcdef";
                        self.put(b"\\u00");
                        self.put(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
                    }
                }
                rest = &rest[at + 1..];
            }
            self.put(rest);
        }
        self.put(b"\"");
    }
}

fn must_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// The index of the first byte JSON must escape (with `or_high`, also the first byte
/// that is not ASCII, or DEL), eight bytes at a time: a path or host almost never has
/// one.
fn first_to_escape(bytes: &[u8], or_high: bool) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Bytes of `v` that are zero / below `n` (n <= 0x80) set their high bit here; a
    // byte above a flagged one may be flagged falsely, which only costs a byte scan.
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let below = |v: u64, n: u64| v.wrapping_sub(ONES * n) & !v & HIGHS;
    // Bytes >= 0x7f: their high bit, or a carry into it when adding 1.
    let high = |v: u64| (v | v.wrapping_add(ONES)) & HIGHS;
    let stop = |b: u8| must_escape(b) || (or_high && b >= 0x7f);
    let flagged = |v: u64| {
        below(v, 0x20)
            | zero(v ^ (ONES * u64::from(b'"')))
            | zero(v ^ (ONES * u64::from(b'\\')))
            | if or_high { high(v) } else { 0 }
            != 0
    };
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        if flagged(u64::from_le_bytes(word)) {
            if let Some(i) = chunk.iter().position(|&b| stop(b)) {
                return Some(offset + i);
            }
        }
        offset += 8;
    }
    let rest = chunks.remainder();
    if rest.is_empty() {
        return None;
    }
    // The last bytes as one more word: the last eight when there are eight (overlapping
    // bytes already checked), else the rest padded with spaces.
    let mut word = [b' '; 8];
    match bytes.len().checked_sub(8) {
        Some(last) => word.copy_from_slice(&bytes[last..]),
        None => word[..rest.len()].copy_from_slice(rest),
    }
    if !flagged(u64::from_le_bytes(word)) {
        return None;
    }
    rest.iter().position(|&b| stop(b)).map(|i| offset + i)
}

/// RFC 3339 UTC timestamps with microseconds; `YYYY-MM-DDTHH:MM:SS` is formatted once per
/// second.
#[derive(Default)]
struct Clock {
    second: u64,
    text: [u8; 19],
    /// A monotonic instant and the wall-clock time it was read at (since the Unix epoch),
    /// re-read every second: a line's time is derived from the instant the handler already
    /// took, instead of another clock read per line.
    base: Option<(Instant, Duration)>,
}

impl Clock {
    /// The wall-clock time of `at`, since the Unix epoch (a clock before 1970 reads as
    /// 1970: a log line is no place to fail).
    fn wall(&mut self, at: Instant) -> Duration {
        if let Some((instant, wall)) = self.base {
            if let Some(since) = at.checked_duration_since(instant) {
                if since < Duration::from_secs(1) {
                    return wall.saturating_add(since);
                }
            }
        }
        let (instant, wall) = (Instant::now(), SystemTime::now());
        let wall = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.base = Some((instant, wall));
        match instant.checked_duration_since(at) {
            Some(before) => wall.saturating_sub(before),
            None => wall.saturating_add(at.duration_since(instant)),
        }
    }

    fn write_rfc3339(&mut self, out: &mut Out<'_>, since_epoch: Duration) {
        let second = since_epoch.as_secs();
        if second != self.second || self.text[0] == 0 {
            self.second = second;
            self.text = date_time(second);
        }
        out.put(&self.text);
        out.put(b".");
        out.padded6(since_epoch.subsec_micros());
        out.put(b"Z");
    }
}

/// `YYYY-MM-DDTHH:MM:SS` for `secs` since the Unix epoch (UTC; years up to 9999).
fn date_time(secs: u64) -> [u8; 19] {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for slot in out[at..at + width].iter_mut().rev() {
            *slot = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year.min(9999));
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, rem / 3600);
    put(14, 2, rem % 3600 / 60);
    put(17, 2, rem % 60);
    out
}

/// The proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The fuzz check of the access line: the first 8 bytes of `data` are the line's numbers,
/// the 9th says where the rest splits into the Host header's bytes (any bytes) and the
/// path (made UTF-8 first, as a URI's path is). The line must land after what the batch
/// held, whole: one JSON object on one line, every value as given (the host with invalid
/// UTF-8 replaced), within the room reserved for it.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_access_line(data: &[u8]) {
    let (numbers, rest) = data.split_at(data.len().min(8));
    let mut word = [0u8; 8];
    word[..numbers.len()].copy_from_slice(numbers);
    let n = u64::from_le_bytes(word);
    let (split, rest) = rest.split_first().map_or((0, rest), |(s, r)| (*s, r));
    let (host, path) = rest.split_at(usize::from(split).min(rest.len()));
    let path = String::from_utf8_lossy(path);
    let line = Line {
        request_id: b"0123456789abcdef0123456789abcdef",
        client_ip: if n & 1 == 1 {
            IpAddr::V4(std::net::Ipv4Addr::from((n >> 32) as u32))
        } else {
            IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
            ))
        },
        method: "GET",
        host,
        path: &path,
        status: n as u16,
        route: "route-1",
        upstream: "app",
        backend: "127.0.0.1:9001",
        attempts: (n >> 16) as u32,
        bytes_in: n as i64,
        bytes_out: (n as i64).wrapping_neg(),
        duration: Duration::from_nanos(n),
        finished: Instant::now(),
    };
    let mut buf = b"an earlier line\n".to_vec();
    let since_epoch = Duration::from_secs(n % 253_402_300_800);
    format(&mut buf, &mut Clock::default(), since_epoch, &line);
    let text = buf
        .strip_prefix(b"an earlier line\n")
        .expect("the batch's earlier lines kept");
    let names = [line.method, line.route, line.upstream, line.backend];
    let room = FIXED + line.request_id.len() + names.iter().map(|n| n.len()).sum::<usize>();
    let room = room + json_room(host.len()) + json_room(path.len());
    assert!(text.len() <= room, "{} bytes, room for {room}", text.len());
    let body = text.strip_suffix(b"\n").expect("ends the line");
    assert!(!body.contains(&b'\n'), "a newline inside the line");
    let value: serde_json::Value = serde_json::from_slice(body).expect("one JSON object");
    assert_eq!(value["host"], *String::from_utf8_lossy(host));
    assert_eq!(value["path"], *path);
    assert_eq!(value["status"], n as u16);
    assert_eq!(value["bytes_in"], n as i64);
    assert_eq!(value["bytes_out"], (n as i64).wrapping_neg());
    assert_eq!(value["client_ip"], line.client_ip.to_string());
    assert_eq!(value["target"], "palisade::access");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> Line<'static> {
        Line {
            request_id: b"abc",
            client_ip: IpAddr::from([10, 0, 0, 7]),
            method: "GET",
            host: b"example.test",
            path: "/a?b=c",
            status: 200,
            route: "web",
            upstream: "app",
            backend: "127.0.0.1:9001",
            attempts: 1,
            bytes_in: -1,
            bytes_out: 3,
            duration: Duration::from_nanos(78_655_435),
            finished: Instant::now(),
        }
    }

    fn formatted(line: &Line<'_>, now: SystemTime) -> String {
        let mut buf = b"earlier lines\n".to_vec();
        let since = now.duration_since(UNIX_EPOCH).expect("after 1970");
        format(&mut buf, &mut Clock::default(), since, line);
        let text = String::from_utf8(buf).expect("utf-8");
        text.strip_prefix("earlier lines\n")
            .expect("earlier lines kept")
            .to_owned()
    }

    #[test]
    fn the_line_is_the_one_tracing_wrote() {
        // 2026-11-25T08:39:14.734851Z
        let now = UNIX_EPOCH + Duration::new(1_795_595_954, 734_851_000);
        assert_eq!(
            formatted(&line(), now),
            concat!(
                r#"{"timestamp":"2026-11-25T08:39:14.734851Z","level":"INFO","message":"request","#,
                r#""request_id":"abc","client_ip":"10.0.0.7","method":"GET","host":"example.test","#,
                r#""path":"/a?b=c","status":200,"route":"web","upstream":"app","#,
                r#""backend":"127.0.0.1:9001","attempts":1,"bytes_in":-1,"bytes_out":3,"#,
                r#""duration_ms":78.655435,"target":"palisade::access"}"#,
                "\n"
            )
        );
    }

    #[test]
    fn strings_a_client_controls_stay_valid_json() {
        let mut l = line();
        let nasty = "a\"b\\c\nd\u{1}e\u{7f}é\t";
        l.path = nasty;
        l.host = b"";
        l.client_ip = IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]);
        let text = formatted(&l, UNIX_EPOCH);
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).expect("json");
        assert_eq!(value["path"], nasty);
        assert_eq!(value["host"], "");
        assert_eq!(value["client_ip"], "2001:db8::1");
        assert_eq!(value["timestamp"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(value["duration_ms"], 78.655435);
    }

    #[test]
    fn a_host_that_is_not_utf8_is_still_valid_json() {
        let mut l = line();
        l.host = b"caf\xe9\xc3\xa9\"\x01";
        let text = formatted(&l, UNIX_EPOCH);
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).expect("json");
        assert_eq!(value["host"], "caf\u{fffd}\u{e9}\"\u{1}");
    }

    #[test]
    fn the_longest_lines_fit_the_room_reserved_for_them() {
        // Every string at its worst (each byte escaped to six), the longest address and
        // numbers: the line is whole (valid JSON with every value) and within its room.
        for len in [0, 1, 7, 8, 9, 100, 4096] {
            let escaped = "\u{1}".repeat(len);
            let invalid = vec![0xffu8; len];
            let name = "n".repeat(len);
            let l = Line {
                request_id: name.as_bytes(),
                client_ip: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
                    .parse()
                    .expect("ip"),
                method: &name,
                host: &invalid,
                path: &escaped,
                status: u16::MAX,
                route: &name,
                upstream: &name,
                backend: &name,
                attempts: u32::MAX,
                bytes_in: i64::MIN,
                bytes_out: i64::MIN,
                duration: Duration::MAX,
                finished: Instant::now(),
            };
            let text = formatted(&l, UNIX_EPOCH + Duration::from_secs(253_402_300_799));
            let room = FIXED + 5 * len + 2 * json_room(len);
            assert!(text.len() <= room, "{} > {room}", text.len());
            let value: serde_json::Value = serde_json::from_str(text.trim_end()).expect("json");
            assert_eq!(value["path"].as_str().map(str::len), Some(len));
            assert_eq!(value["host"].as_str().map(|h| h.chars().count()), Some(len));
            assert_eq!(value["bytes_out"], i64::MIN);
            assert_eq!(value["target"], "palisade::access");
            assert_eq!(value["timestamp"], "9999-12-31T23:59:59.000000Z");
        }
        // Without strings, the fixed part alone.
        let mut l = line();
        (l.request_id, l.method, l.host, l.path) = (b"", "", b"", "");
        (l.route, l.upstream, l.backend) = ("", "", "");
        assert!(formatted(&l, UNIX_EPOCH).len() <= FIXED);
    }

    #[test]
    fn every_byte_that_needs_escaping_is_found_wherever_it_is() {
        for len in 0..20 {
            for at in 0..len {
                for special in [b'"', b'\\', b'\n', 0x00, 0x1f] {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = special;
                    assert_eq!(first_to_escape(&bytes, false), Some(at), "{bytes:?}");
                    assert_eq!(first_to_escape(&bytes, true), Some(at), "{bytes:?}");
                }
                // High bytes (UTF-8) and DEL are left alone, unless asked for.
                let mut bytes = vec![0xc3; len];
                bytes[at] = 0x7f;
                assert_eq!(first_to_escape(&bytes, false), None);
                for high in [0x7f, 0x80, 0xc3, 0xff] {
                    let mut bytes = vec![b'~'; len];
                    bytes[at] = high;
                    assert_eq!(first_to_escape(&bytes, true), Some(at), "{bytes:?}");
                }
                assert_eq!(first_to_escape(&vec![b' '; len], true), None);
            }
        }
    }

    #[test]
    fn dates_agree_with_a_known_calendar() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_251_199, "2024-02-29T23:59:59"),
            (1_795_595_954, "2026-11-25T08:39:14"),
            (4_102_444_800, "2100-01-01T00:00:00"),
        ] {
            assert_eq!(std::str::from_utf8(&date_time(secs)).unwrap(), text);
        }
    }

    #[test]
    fn the_cached_date_changes_with_the_second() {
        let mut clock = Clock::default();
        let mut buf = [0; 64];
        let mut out = Out {
            buf: &mut buf,
            at: 0,
        };
        clock.write_rfc3339(&mut out, Duration::new(59, 999_999_000));
        clock.write_rfc3339(&mut out, Duration::new(60, 1_000));
        let at = out.at;
        assert_eq!(
            std::str::from_utf8(&buf[..at]).unwrap(),
            "1970-01-01T00:00:59.999999Z1970-01-01T00:01:00.000001Z"
        );
    }
}
