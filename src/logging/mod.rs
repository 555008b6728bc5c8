//! Log output: text for people at a terminal, JSON lines for machines.

pub mod access;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// Text on a terminal, JSON otherwise (the SPEC's default).
    pub fn detect() -> Self {
        if std::io::stderr().is_terminal() {
            LogFormat::Text
        } else {
            LogFormat::Json
        }
    }
}

/// Installs the global subscriber writing to stderr. `level` is a tracing filter such as
/// `info` or `palisade=debug,hyper=info`; an invalid one is an error for the CLI to report.
///
/// Lines are formatted on the thread that logs and written by a background thread
/// through a buffer, one `write` per batch instead of one per line: with the access log
/// on, a request no longer waits for a system call on stderr. Nothing is dropped (a full
/// queue makes the logging thread wait). The returned guard flushes what is queued when
/// dropped: hold it until the process exits.
pub fn init(format: LogFormat, level: &str) -> Result<Option<LogGuard>, String> {
    check_directives(level).map_err(|e| format!("invalid --log-level {level:?}: {e}"))?;
    let filter = EnvFilter::try_new(with_quiet_tls(level))
        .map_err(|e| format!("invalid --log-level {level:?}: {e}"))?;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("palisade-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // Timestamps are RFC 3339 in UTC. JSON lines carry their target, so access lines
    // (`palisade::access`) can be told from the rest.
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        // Colours only for a terminal: escape codes in a file or a pipe are noise.
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // Already installed (tests, or a second call): keep the first one.
    if result.is_err() {
        return Ok(None);
    }
    // JSON access lines skip tracing's formatter (see `access`); text ones, for people,
    // keep it.
    if format == LogFormat::Json {
        access::install(level);
    }
    Ok(Some(LogGuard { _worker: guard }))
}

/// Refuses what tracing's filter syntax would take for something else: a bare word that is
/// not a level (`garbage`, `7`) is a target name to tracing, so `--log-level garbage`
/// would log nothing at all, errors included. Every directive is a level, or names one
/// after `=`.
fn check_directives(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in level.split(',').map(str::trim) {
        if directive.is_empty() {
            return Err(
                "an empty directive: expected a level (trace, debug, info, warn, \
                 error, off) or TARGET=LEVEL"
                    .to_owned(),
            );
        }
        if !directive.contains('=') && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive)) {
            return Err(format!(
                "{directive:?} is not a level: expected trace, debug, info, warn, error, off \
                 or TARGET=LEVEL (e.g. {directive}=debug)"
            ));
        }
    }
    Ok(())
}

/// `level`, with rustls held to errors unless it names rustls itself: rustls warns about
/// what a peer does (an IP address as SNI, a TLS alert, an unexpected message), once per
/// handshake, so any client could fill the log; palisade logs failed handshakes at debug.
/// `--log-level debug,rustls=debug` shows them.
fn with_quiet_tls(level: &str) -> String {
    if level.contains("rustls") {
        level.to_owned()
    } else {
        format!("{level},rustls=error")
    }
}

/// Flushes the batched access lines, then (its field dropping) the writer's queue.
pub struct LogGuard {
    _worker: tracing_appender::non_blocking::WorkerGuard,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        access::flush();
    }
}
