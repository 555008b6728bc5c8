//! Log output: text for people at a terminal, JSON lines for machines.

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
pub fn init(format: LogFormat, level: &str) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(level).map_err(|e| format!("invalid --log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Timestamps are RFC 3339 in UTC. JSON lines carry their target, so access lines
    // (`palisade::access`) can be told from the rest.
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
    // Already installed (tests, or a second call): keep the first one.
    let _ = result;
    Ok(())
}
