//! The JSON access log line, formatted by hand.
//!
//! Through `tracing`'s JSON formatter one access line cost about 30,000 instructions
//! (every field through `Visit` and serde_json's escaper into a fresh `String`, the
//! timestamp formatted from scratch): more than the rest of the request. Here the line is
//! written into a per-thread batch, strings are copied in runs between the rare bytes
//! JSON must escape, and the date part of the timestamp is formatted once per second.
//! Every 20 ms a flusher thread writes each thread's batch to stderr, where every other
//! log line goes, holding stderr's lock for the whole batch (so lines never interleave
//! mid-line with the log writer's): handing over each line woke the writer thread per
//! request (a futex wake, its spinning `sched_yield`s, and a `write` per line on the
//! proxy's core), and handing batches to that writer copied each of them into its queue.
//! The output is the line `tracing` wrote: the same keys in the same order.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::IpAddr;
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
        .spawn(|| loop {
            std::thread::sleep(FLUSH_EVERY);
            flush();
        });
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

/// Writes every thread's batched lines (every 20 ms, and at exit: the log guard calls it
/// before the log writer's own flush).
pub fn flush() {
    let Some(sink) = SINK.get() else {
        return;
    };
    let Ok(mut all) = sink.batches.lock() else {
        return;
    };
    all.retain(|batch| {
        // Checked before the batch is taken: a thread that ends after this keeps its
        // batch here for the next round; one that ended before adds nothing more, so this
        // last flush of its batch is complete and the batch is forgotten.
        let alive = Arc::strong_count(batch) > 1;
        if let Ok(mut lines) = batch.lock() {
            hand_over(&mut lines);
        }
        alive
    });
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
    pub request_id: &'a str,
    pub client_ip: IpAddr,
    pub method: &'a str,
    pub host: &'a str,
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
            true
        })
        .unwrap_or(false)
}

fn format(buf: &mut Vec<u8>, clock: &mut Clock, now: SystemTime, line: &Line<'_>) {
    buf.extend_from_slice(b"{\"timestamp\":\"");
    clock.write_rfc3339(buf, now);
    buf.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\",\"request_id\":");
    // A request id is `[A-Za-z0-9._:+/=@-]` (the client's is kept only then) and a method
    // is an HTTP token: neither ever needs escaping.
    clean_string(buf, line.request_id);
    buf.extend_from_slice(b",\"client_ip\":\"");
    buf.extend_from_slice(crate::proxy::headers::ip_text(line.client_ip, &mut [0; 64]));
    buf.extend_from_slice(b"\",\"method\":");
    clean_string(buf, line.method);
    buf.extend_from_slice(b",\"host\":");
    string(buf, line.host);
    buf.extend_from_slice(b",\"path\":");
    string(buf, line.path);
    buf.extend_from_slice(b",\"status\":");
    integer(buf, line.status);
    // Route and upstream names are letters, digits, `-`, `_` and `.`, backend addresses
    // host:port (both checked by `config::validate`): nothing to escape.
    buf.extend_from_slice(b",\"route\":");
    clean_string(buf, line.route);
    buf.extend_from_slice(b",\"upstream\":");
    clean_string(buf, line.upstream);
    buf.extend_from_slice(b",\"backend\":");
    clean_string(buf, line.backend);
    buf.extend_from_slice(b",\"attempts\":");
    integer(buf, line.attempts);
    buf.extend_from_slice(b",\"bytes_in\":");
    integer(buf, line.bytes_in);
    buf.extend_from_slice(b",\"bytes_out\":");
    integer(buf, line.bytes_out);
    // Milliseconds with nanosecond digits, as a JSON number.
    buf.extend_from_slice(b",\"duration_ms\":");
    let nanos = u64::try_from(line.duration.as_nanos()).unwrap_or(u64::MAX);
    integer(buf, nanos / 1_000_000);
    buf.push(b'.');
    let fraction = (nanos % 1_000_000) as u32;
    push_padded(buf, fraction, 6);
    buf.extend_from_slice(b",\"target\":\"palisade::access\"}\n");
}

fn integer(buf: &mut Vec<u8>, n: impl itoa::Integer) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `n` in exactly `width` decimal digits, zero-padded (`n` < 10^width).
fn push_padded(buf: &mut Vec<u8>, mut n: u32, width: usize) {
    let start = buf.len();
    buf.resize(start + width, b'0');
    for slot in buf[start..].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// `s` as a JSON string when it is known to need no escaping.
fn clean_string(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    buf.extend_from_slice(s.as_bytes());
    buf.push(b'"');
}

/// `s` as a JSON string: quotes, and escapes only for `"`, `\` and control characters.
fn string(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    let mut rest = s.as_bytes();
    while let Some(at) = first_to_escape(rest) {
        buf.extend_from_slice(&rest[..at]);
        match rest[at] {
            b'"' => buf.extend_from_slice(b"\\\""),
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            b => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                buf.extend_from_slice(b"\\u00");
                buf.push(HEX[usize::from(b >> 4)]);
                buf.push(HEX[usize::from(b & 0xf)]);
            }
        }
        rest = &rest[at + 1..];
    }
    buf.extend_from_slice(rest);
    buf.push(b'"');
}

fn must_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// The index of the first byte JSON must escape, eight bytes at a time: a path or host
/// almost never has one.
fn first_to_escape(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Bytes of `v` that are zero / below `n` (n <= 0x80) set their high bit here; a
    // byte above a flagged one may be flagged falsely, which only costs a byte scan.
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let below = |v: u64, n: u64| v.wrapping_sub(ONES * n) & !v & HIGHS;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let v = u64::from_le_bytes(word);
        if below(v, 0x20) | zero(v ^ (ONES * u64::from(b'"'))) | zero(v ^ (ONES * u64::from(b'\\')))
            != 0
        {
            if let Some(i) = chunk.iter().position(|&b| must_escape(b)) {
                return Some(offset + i);
            }
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| must_escape(b))
        .map(|i| offset + i)
}

/// RFC 3339 UTC timestamps with microseconds; `YYYY-MM-DDTHH:MM:SS` is formatted once per
/// second.
#[derive(Default)]
struct Clock {
    second: u64,
    text: [u8; 19],
    /// A monotonic instant and the wall-clock time it was read at, re-read every second:
    /// a line's time is derived from the instant the handler already took, instead of
    /// another clock read per line.
    base: Option<(Instant, SystemTime)>,
}

impl Clock {
    /// The wall-clock time of `at`.
    fn wall(&mut self, at: Instant) -> SystemTime {
        if let Some((instant, wall)) = self.base {
            if let Some(since) = at.checked_duration_since(instant) {
                if since < Duration::from_secs(1) {
                    return wall + since;
                }
            }
        }
        let (instant, wall) = (Instant::now(), SystemTime::now());
        self.base = Some((instant, wall));
        match instant.checked_duration_since(at) {
            Some(before) => wall.checked_sub(before).unwrap_or(wall),
            None => wall + at.duration_since(instant),
        }
    }

    fn write_rfc3339(&mut self, buf: &mut Vec<u8>, now: SystemTime) {
        // A clock before 1970 prints as 1970: a log line is no place to fail.
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if second != self.second || self.text[0] == 0 {
            self.second = second;
            self.text = date_time(second);
        }
        buf.extend_from_slice(&self.text);
        buf.push(b'.');
        push_padded(buf, since.subsec_micros(), 6);
        buf.push(b'Z');
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> Line<'static> {
        Line {
            request_id: "abc",
            client_ip: IpAddr::from([10, 0, 0, 7]),
            method: "GET",
            host: "example.test",
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
        let mut buf = Vec::new();
        format(&mut buf, &mut Clock::default(), now, line);
        String::from_utf8(buf).expect("utf-8")
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
        l.host = "";
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
    fn every_byte_that_needs_escaping_is_found_wherever_it_is() {
        for len in 0..20 {
            for at in 0..len {
                for special in [b'"', b'\\', b'\n', 0x00, 0x1f] {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = special;
                    assert_eq!(first_to_escape(&bytes), Some(at), "{bytes:?}");
                }
                // High bytes (UTF-8) and DEL are left alone.
                let mut bytes = vec![0xc3; len];
                bytes[at] = 0x7f;
                assert_eq!(first_to_escape(&bytes), None);
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
        let mut buf = Vec::new();
        clock.write_rfc3339(&mut buf, UNIX_EPOCH + Duration::new(59, 999_999_000));
        clock.write_rfc3339(&mut buf, UNIX_EPOCH + Duration::new(60, 1_000));
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "1970-01-01T00:00:59.999999Z1970-01-01T00:01:00.000001Z"
        );
    }
}
