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
    let (text, loaded) = load(&path);
    apply(state, &path, text, loaded)
}

/// Builds the TLS configs of `loaded` (certificates are re-read on every reload; a broken
/// one rejects the reload) and swaps it in, or rejects it, remembering the `text` hash.
fn apply(
    state: &ProxyState,
    path: &Path,
    text: Option<u64>,
    loaded: Result<Config, Vec<ConfigError>>,
) -> Result<u64, Vec<ConfigError>> {
    let loaded = loaded.and_then(|config| Ok((crate::tls::build(&config)?, config)));
    match loaded {
        Ok((tls, config)) => {
            state.rejected_text.store(0, Ordering::Relaxed);
            state.set_tls(tls);
            let generation = state.apply(config);
            state.reloads_ok.fetch_add(1, Ordering::Relaxed);
            state.metrics.reload(true);
            remember(state, Ok(generation));
            tracing::info!(generation, path = %path.display(), "configuration reloaded");
            Ok(generation)
        }
        Err(errors) => {
            rejected(state, text, &errors);
            Err(errors)
        }
    }
}

/// Reads and validates the config file for a reload: a hash of the text read (None when
/// it could not be read), and the config or its errors. A file with no setting in it (empty,
/// or only comments) is refused: replacing a running config by the defaults (no routes,
/// the default listen addresses) is never what a reload means; it is a file caught while
/// being written, or one a failed generator left empty.
fn load(path: &Path) -> (Option<u64>, Result<Config, Vec<ConfigError>>) {
    let text = match config::read(path) {
        Ok(text) => text,
        Err(errors) => return (None, Err(errors)),
    };
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut hasher);
        // 0 means "none".
        hasher.finish().max(1)
    };
    if config::is_blank(&text) {
        return (
            Some(hash),
            Err(vec![ConfigError {
                path: path.to_path_buf(),
                line: 0,
                col: 0,
                message: "the config file is empty: a reload never applies an empty file".into(),
            }]),
        );
    }
    (Some(hash), config::parse(&text, path))
}

fn rejected(state: &ProxyState, text: Option<u64>, errors: &[ConfigError]) {
    state
        .rejected_text
        .store(text.unwrap_or(0), Ordering::Relaxed);
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
/// parses to the same configuration: a save without changes, or a touch; and does not
/// reject again the very text the last rejected reload read (a `POST /reload` or SIGHUP of
/// a broken file, then the watcher seeing the same write: one failure, counted once).
pub fn reload_if_changed(state: &ProxyState) -> Result<Option<u64>, Vec<ConfigError>> {
    let current = state.snapshot();
    let path = current.config.path.clone();
    let (text, loaded) = load(&path);
    match loaded {
        Ok(config) if config == *current.config => {
            tracing::info!(
                generation = current.generation,
                "config file unchanged in meaning: not reloaded"
            );
            Ok(None)
        }
        Err(_) if text.is_some_and(|t| t == state.rejected_text.load(Ordering::Relaxed)) => {
            tracing::info!("config file is the one last rejected: not reloaded again");
            Ok(None)
        }
        loaded => apply(state, &path, text, loaded).map(Some),
    }
}

/// Watches the config file, and the certificate and key files it names, and reloads when
/// one changes. Directories are watched, since editors, `sed -i` and certificate renewers
/// replace files by a rename; only create, modify, close-after-write and remove events for
/// those files count (notify also reports plain opens, which a reload causes). A file
/// reached through symbolic links is watched along the way too: a Kubernetes ConfigMap
/// (`palisade.toml -> ..data/palisade.toml`, `..data` swapped by a rename) or a deploy's
/// `current` link moved to a new release is a change of the file. A burst of events
/// reloads once, [`QUIET`] after its last event (at most [`MAX_BURST`] after its first).
/// A config file written in place and not closed is read only once its writer has closed
/// it (`cmd > palisade.toml` with a slow `cmd` leaves it half written for as long as `cmd`
/// takes), or after [`WRITE_WAIT`] with no further event. A change of the config file
/// reloads only when its content differs; a change of a certificate always reloads. What
/// is watched follows the running config: certificate files a reload names (by any
/// trigger) are watched within a second. Keep the returned watcher alive to keep
/// watching.
pub fn watch_config_file(state: Arc<ProxyState>) -> notify::Result<ConfigWatcher> {
    use notify_debouncer_full::{new_debouncer, DebounceEventResult};

    let files = Arc::new(std::sync::Mutex::new(Files::of(&state.snapshot().config)));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Change>();
    let seen = files.clone();
    let debouncer = new_debouncer(WATCH_DEBOUNCE, None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let change = match seen.lock() {
            Ok(mut files) => files.settle(&events),
            Err(_) => return,
        };
        if let Some(change) = change {
            let _ = tx.send(change);
        }
    })?;
    let mut watch = Watch {
        debouncer,
        dirs: Vec::new(),
    };
    let dirs = lock_files(&files).map(|f| f.dirs()).unwrap_or_default();
    for dir in &dirs {
        watch
            .debouncer
            .watch(dir, notify::RecursiveMode::NonRecursive)?;
    }
    watch.dirs = dirs;
    Ok(ConfigWatcher {
        task: tokio::spawn(follow(state, rx, files, watch)),
    })
}

/// Keeps the config file watched; dropping it stops the watching.
#[derive(Debug)]
pub struct ConfigWatcher {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The file watcher and the directories it watches.
struct Watch {
    debouncer: notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
    dirs: Vec<PathBuf>,
}

fn lock_files(files: &std::sync::Mutex<Files>) -> Option<std::sync::MutexGuard<'_, Files>> {
    files.lock().ok()
}

/// Reloads on the changes the watcher reports, and keeps what it watches in step with
/// the running config.
async fn follow(
    state: Arc<ProxyState>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Change>,
    files: Arc<std::sync::Mutex<Files>>,
    mut watch: Watch,
) {
    let mut generation = state.snapshot().generation;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            change = rx.recv() => change,
            _ = tick.tick() => {
                // A reload by SIGHUP or the admin API may name other certificate files.
                if state.snapshot().generation != generation {
                    generation = state.snapshot().generation;
                    refresh(&state, &files, &mut watch);
                }
                continue;
            }
        };
        let Some(change) = (match first {
            Some(change) => settle(change, &mut rx).await,
            None => None,
        }) else {
            return;
        };
        if change.certificates {
            tracing::info!("certificate files changed: reloading");
            let _ = reload(&state);
        } else {
            tracing::info!("config file changed");
            let _ = reload_if_changed(&state);
        }
        // Links may lead elsewhere now (a swapped `..data`), and the files may be others.
        generation = state.snapshot().generation;
        refresh(&state, &files, &mut watch);
    }
}

/// Gathers the rest of a burst after its first change: until no event came for
/// [`QUIET`] (at most [`MAX_BURST`] in all), and while the config file is being written,
/// until it is closed or [`WRITE_WAIT`] passes with no event. None: the watcher is gone.
async fn settle(
    mut change: Change,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Change>,
) -> Option<Change> {
    let started = tokio::time::Instant::now();
    if !change.written {
        tracing::info!("config file is being written: reloading once it is closed");
    }
    loop {
        let wait = if change.written {
            QUIET.min(MAX_BURST.saturating_sub(started.elapsed()))
        } else {
            WRITE_WAIT
        };
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(next)) => {
                if !next.written && change.written {
                    tracing::info!("config file is being written: reloading once it is closed");
                }
                change = Change {
                    certificates: change.certificates | next.certificates,
                    written: next.written,
                };
            }
            Ok(None) => return None,
            Err(_) if change.written => return Some(change),
            Err(_) => {
                tracing::warn!(
                    "config file still open for writing {WRITE_WAIT:?} after its last change: reloading what it holds"
                );
                return Some(Change {
                    written: true,
                    ..change
                });
            }
        }
    }
}

/// Points the watch at the files the running config names, along their links now.
fn refresh(state: &ProxyState, files: &std::sync::Mutex<Files>, watch: &mut Watch) {
    let mut fresh = Files::of(&state.snapshot().config);
    let dirs = fresh.dirs();
    if let Some(mut current) = lock_files(files) {
        fresh.writing = current.writing;
        *current = fresh;
    }
    for dir in dirs.iter().filter(|d| !watch.dirs.contains(d)) {
        if let Err(e) = watch
            .debouncer
            .watch(dir, notify::RecursiveMode::NonRecursive)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a directory of the config or its certificates");
        }
    }
    for dir in watch.dirs.iter().filter(|d| !dirs.contains(d)) {
        // A directory removed since (an old ConfigMap version) is unwatched already.
        let _ = watch.debouncer.unwatch(dir);
    }
    watch.dirs = dirs;
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

/// A file as (its directory, made absolute where possible, and its name).
type Key = (PathBuf, std::ffi::OsString);

/// The watched files, and whether the config file is being written.
struct Files {
    /// The config file itself (where its links lead).
    config: Key,
    /// The symbolic links on the way to it.
    config_links: Vec<Key>,
    /// Certificate and key files, and the links on the way to them.
    certs: Vec<Key>,
    /// The config file was created or written since it was last closed or replaced.
    writing: bool,
}

impl Files {
    /// The files `config` names, as they resolve now.
    fn of(config: &Config) -> Files {
        let (config_links, file) = resolve(&config.path);
        let certs = config
            .server
            .tls
            .iter()
            .flat_map(|t| [&t.cert, &t.key])
            .flat_map(|path| {
                let (mut keys, file) = resolve(path);
                keys.push(file);
                keys
            })
            .collect();
        Files {
            config: file,
            config_links,
            certs,
            writing: false,
        }
    }

    /// The directories to watch: every one holding a watched file or link.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::iter::once(&self.config)
            .chain(&self.config_links)
            .chain(&self.certs)
            .map(|(dir, _)| dir.clone())
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

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
            let mut link = false;
            for path in &event.paths {
                let key = watched(path);
                config |= key == self.config;
                link |= self.config_links.contains(&key);
                certificates |= self.certs.contains(&key);
            }
            if link {
                // A link made or moved: where it leads now is a whole file.
                config_changed = true;
                self.writing = false;
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

/// Resolves `path` as the kernel would, noting every symbolic link met on the way (the
/// file's own, or a directory's, like a ConfigMap's `..data` or a deploy's `current`):
/// the links, and the file they lead to. A part that does not exist ends the walk.
fn resolve(path: &Path) -> (Vec<Key>, Key) {
    use std::path::Component;

    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut todo: Vec<std::ffi::OsString> = absolute
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut at = PathBuf::from("/");
    let mut links = Vec::new();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            at.pop();
            continue;
        }
        let next = at.join(&part);
        let target = match std::fs::symlink_metadata(&next) {
            Ok(meta) if meta.file_type().is_symlink() && hops < 40 => {
                std::fs::read_link(&next).ok()
            }
            _ => None,
        };
        let Some(target) = target else {
            if todo.is_empty() {
                return (links, (at, part));
            }
            at = next;
            continue;
        };
        hops += 1;
        links.push((at.clone(), part));
        if target.is_absolute() {
            at = PathBuf::from("/");
        }
        todo.extend(target.components().rev().filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        }));
    }
    // The path was the root, or only links to it.
    (links, watched(&absolute))
}

/// A file as (its directory, made absolute where possible, and its name), so the paths
/// in events (absolute) compare with the configured ones (often relative).
fn watched(path: &std::path::Path) -> Key {
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
const WATCH_DEBOUNCE: Duration = Duration::from_millis(50);

/// A burst of file events ends this long after its last event ...
const QUIET: Duration = Duration::from_millis(200);

/// ... or this long after its first, if events keep coming.
const MAX_BURST: Duration = Duration::from_secs(2);

/// How long a config file written in place and not closed is waited for before it is
/// read anyway (a writer that keeps it open).
const WRITE_WAIT: Duration = Duration::from_secs(5);
