//! Reloading the configuration: read -> parse -> validate -> build -> swap, or keep the
//! running one. SIGHUP, `POST /reload` and the file watcher all come through here.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, ConfigError};
use crate::snapshot::ProxyState;

/// Reloads the config from the file the running one came from. On success the new
/// snapshot is swapped in and its generation returned; on failure the running config
/// stays untouched and the errors are returned (and logged).
pub fn reload(state: &ProxyState) -> Result<u64, Vec<ConfigError>> {
    let path = state.snapshot().config.path.clone();
    // Certificates are re-read on every reload; a broken one rejects the reload.
    let loaded = config::load(&path).and_then(|config| Ok((crate::tls::build(&config)?, config)));
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
    match config::load(&current.config.path) {
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
/// replace files by a rename; only create, modify and remove events for those files count
/// (notify also reports plain opens, which a reload causes), and bursts are debounced. A
/// change of the config file reloads only when its content differs; a change of a
/// certificate always reloads. Keep the returned watcher alive to keep watching.
pub fn watch_config_file(
    state: Arc<ProxyState>,
) -> notify::Result<
    notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
> {
    use notify::{EventKind, RecursiveMode};
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
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let (config_match, certs_match) = (config_file.clone(), cert_files.clone());
    let mut debouncer = new_debouncer(WATCH_DEBOUNCE, None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let mut config_changed = false;
        let mut cert_changed = false;
        for event in &events {
            if !matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            ) {
                continue;
            }
            for path in &event.paths {
                let key = watched(path);
                config_changed |= key == config_match;
                cert_changed |= certs_match.contains(&key);
            }
        }
        if cert_changed {
            let _ = tx.send(true);
        } else if config_changed {
            let _ = tx.send(false);
        }
    })?;
    let mut dirs: Vec<&PathBuf> = std::iter::once(&config_file.0)
        .chain(cert_files.iter().map(|c| &c.0))
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        debouncer.watch(dir, RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(async move {
        while let Some(certificates) = rx.recv().await {
            if certificates {
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
