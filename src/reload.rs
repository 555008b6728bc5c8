//! Reloading the configuration: read -> parse -> validate -> build -> swap, or keep the
//! running one. SIGHUP, `POST /reload` and the file watcher all come through here.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, Config, ConfigError};
use crate::snapshot::ProxyState;

/// Reloads the config from the file the running one came from. On success the new
/// snapshot is swapped in and its generation returned; on failure the running config
/// stays untouched and the errors are returned (and logged).
pub fn reload(state: &ProxyState) -> Result<u64, Vec<ConfigError>> {
    let path = state.snapshot().config.path.clone();
    // Certificates are re-read on every reload; a broken one rejects the reload.
    let loaded = load(&path).and_then(|config| Ok((crate::tls::build(&config)?, config)));
    match loaded {
        Ok((tls, config)) => {
            state.set_tls(tls);
            let generation = state.apply(config);
            state.reloads_ok.fetch_add(1, Ordering::Relaxed);
            state.metrics.reload(true);
            remember(state, Ok(generation));
            tracing::info!(generation, path = %path.display(), "configuration reloaded");
            Ok(generation)
        }
        Err(errors) => {
            rejected(state, &errors);
            Err(errors)
        }
    }
}

/// Reads and validates the config file for a reload. A file with no setting in it (empty,
/// or only comments) is refused: replacing a running config by the defaults (no routes,
/// the default listen addresses) is never what a reload means; it is a file caught while
/// being written, or one a failed generator left empty.
fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let text = config::read(path)?;
    if config::is_blank(&text) {
        return Err(vec![ConfigError {
            path: path.to_path_buf(),
            line: 0,
            col: 0,
            message: "the config file is empty: a reload never applies an empty file".into(),
        }]);
    }
    config::parse(&text, path)
}

fn rejected(state: &ProxyState, errors: &[ConfigError]) {
    state.reloads_failed.fetch_add(1, Ordering::Relaxed);
    state.metrics.reload(false);
    for e in errors {
        tracing::error!(error = %e, "reload rejected; the running configuration stays");
    }
    remember(
        state,
        Err(errors.first().map(|e| e.to_string()).unwrap_or_default()),
    );
}

fn remember(state: &ProxyState, outcome: Result<u64, String>) {
    if let Ok(mut last) = state.last_reload.lock() {
        *last = Some((std::time::Instant::now(), outcome));
    }
}

/// Like [`reload`], but leaves the running config alone (no new generation) when the file
/// parses to the same configuration: a save without changes, or a touch.
pub fn reload_if_changed(state: &ProxyState) -> Result<Option<u64>, Vec<ConfigError>> {
    let current = state.snapshot();
    match load(&current.config.path) {
        Ok(config) if config == *current.config => Ok(None),
        Ok(_) => reload(state).map(Some),
        Err(errors) => {
            rejected(state, &errors);
            Err(errors)
        }
    }
}

/// Watches the config file, and the certificate and key files it names, and reloads when
/// one changes. Directories are watched, since editors, `sed -i` and certificate renewers
/// replace files by a rename; only create, modify, close-after-write and remove events for
/// those files count (notify also reports plain opens, which a reload causes), and bursts
/// are debounced. A config file written in place is read only once its writer has closed
/// it (`cmd > palisade.toml` with a slow `cmd` leaves it half written for as long as `cmd`
/// takes), or after [`WRITE_WAIT`] with no further event. A change of the config file
/// reloads only when its content differs; a change of a certificate always reloads. Keep
/// the returned watcher alive to keep watching.
pub fn watch_config_file(
    state: Arc<ProxyState>,
) -> notify::Result<
    notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
> {
    use notify_debouncer_full::{new_debouncer, DebounceEventResult};

    let snapshot = state.snapshot();
    let config_file = watched(&snapshot.config.path);
    let cert_files: Vec<(PathBuf, std::ffi::OsString)> = snapshot
        .config
        .server
        .tls
        .iter()
        .flat_map(|t| [watched(&t.cert), watched(&t.key)])
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Change>();
    let mut files = Files {
        config: config_file.clone(),
        certs: cert_files.clone(),
        writing: false,
    };
    let mut debouncer = new_debouncer(WATCH_DEBOUNCE, None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        if let Some(change) = files.settle(&events) {
            let _ = tx.send(change);
        }
    })?;
    let mut dirs: Vec<&PathBuf> = std::iter::once(&config_file.0)
        .chain(cert_files.iter().map(|c| &c.0))
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        debouncer.watch(dir, notify::RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(async move {
        let mut pending: Option<Change> = None;
        loop {
            let next = match &pending {
                Some(_) => match tokio::time::timeout(WRITE_WAIT, rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => {
                        tracing::warn!(
                            "config file still open for writing {WRITE_WAIT:?} after its last change: reloading what it holds"
                        );
                        pending.take().map(|change| Change {
                            written: true,
                            ..change
                        })
                    }
                },
                None => rx.recv().await,
            };
            let Some(mut change) = next else { break };
            if let Some(earlier) = pending.take() {
                change.certificates |= earlier.certificates;
            }
            if !change.written {
                tracing::info!("config file is being written: reloading once it is closed");
                pending = Some(change);
            } else if change.certificates {
                tracing::info!("certificate files changed: reloading");
                let _ = reload(&state);
            } else {
                tracing::info!("config file changed: reloading");
                let _ = reload_if_changed(&state);
            }
        }
    });
    Ok(debouncer)
}

/// What a settled burst of file events asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Change {
    /// A certificate or key file changed (always reload; otherwise only if the config's
    /// content differs).
    certificates: bool,
    /// The config file is not being written: nothing wrote it since it was last closed
    /// or replaced.
    written: bool,
}

/// The watched files, and whether the config file is being written.
struct Files {
    config: (PathBuf, std::ffi::OsString),
    certs: Vec<(PathBuf, std::ffi::OsString)>,
    /// The config file was created or written since it was last closed or replaced.
    writing: bool,
}

impl Files {
    /// Follows a settled burst of events; Some when one touched a watched file.
    fn settle(&mut self, events: &[notify_debouncer_full::DebouncedEvent]) -> Option<Change> {
        use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};

        let mut config_changed = false;
        let mut certificates = false;
        for event in events {
            let relevant = matches!(
                event.kind,
                EventKind::Create(_)
                    | EventKind::Modify(_)
                    | EventKind::Remove(_)
                    | EventKind::Access(AccessKind::Close(AccessMode::Write))
            );
            if !relevant {
                continue;
            }
            let mut config = false;
            for path in &event.paths {
                let key = watched(path);
                config |= key == self.config;
                certificates |= self.certs.contains(&key);
            }
            if !config {
                continue;
            }
            config_changed = true;
            match event.kind {
                // Opened to be written (a new file, or one truncated or written in
                // place): its writer may not be done.
                EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                    self.writing = true
                }
                // Its writer closed it; or another file was renamed over it, or it is
                // gone: whatever is there now is whole.
                EventKind::Access(_)
                | EventKind::Modify(ModifyKind::Name(_))
                | EventKind::Remove(_) => self.writing = false,
                // Permissions, times: no news about its content.
                _ => {}
            }
        }
        (config_changed || certificates).then_some(Change {
            certificates,
            written: !self.writing,
        })
    }
}

/// A file as (its directory, made absolute where possible, and its name), so the paths
/// in events (absolute) compare with the configured ones (often relative).
fn watched(path: &std::path::Path) -> (PathBuf, std::ffi::OsString) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    (
        dir,
        path.file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default(),
    )
}

/// How long the watcher waits for a burst of file events to settle.
const WATCH_DEBOUNCE: Duration = Duration::from_millis(200);

/// How long a config file written in place and not closed is waited for before it is
/// read anyway (a writer that keeps it open).
const WRITE_WAIT: Duration = Duration::from_secs(5);
