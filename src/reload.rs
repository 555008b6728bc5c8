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
    let loaded = loaded.and_then(|config| match crate::tls::build(&config) {
        Ok(tls) => Ok((tls, config)),
        Err(errors) => {
            // Files that may not be there yet (a certificate still to be issued).
            if let Ok(mut files) = state.rejected_tls_files.lock() {
                *files = tls_files(&config);
            }
            Err(errors)
        }
    });
    match loaded {
        Ok((tls, config)) => {
            state.rejected_text.store(0, Ordering::Relaxed);
            if let Ok(mut files) = state.rejected_tls_files.lock() {
                files.clear();
            }
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

/// The certificate and key files `config` names.
fn tls_files(config: &Config) -> Vec<PathBuf> {
    config
        .server
        .tls
        .iter()
        .flat_map(|t| [t.cert.clone(), t.key.clone()])
        .collect()
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
            // The file was fixed since any rejection: breaking it the same way again is
            // news (logged, counted) again, and the files it named are not awaited.
            state.rejected_text.store(0, Ordering::Relaxed);
            if let Ok(mut files) = state.rejected_tls_files.lock() {
                files.clear();
            }
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
/// replace files by a rename. A directory's watch reports only what can change a file
/// there as a whole: a file created, renamed, removed, or closed after writing (and its
/// permissions changed), not every write or open; and a busy directory's events are read
/// in batches (`READ_EVERY`): a busy log beside the config costs next to nothing. The
/// config file is watched itself for writes in place, so that one half written is not
/// read. A file reached through symbolic links is watched along the way
/// too: a Kubernetes ConfigMap (`palisade.toml -> ..data/palisade.toml`, `..data` swapped
/// by a rename) or a deploy's `current` link moved to a new release is a change of the
/// file. A burst of events reloads once, `QUIET` (200 ms) after its last event (at most
/// `MAX_BURST` (2 s) after its first). A config file written in place and not closed is read
/// only once its writer has closed it (`cmd > palisade.toml` with a slow `cmd` leaves it
/// half written for as long as `cmd` takes), or after `WRITE_WAIT` (5 s) with no further
/// event. A change of the config file reloads only when its content differs; a change of
/// a certificate always reloads. What is watched follows the running config: certificate
/// files a reload names (by any trigger) are watched within a second, as are those of a
/// config rejected because they could not be read. A watched directory removed or
/// replaced (which no event says) is found within a second, and reloaded from. Keep the
/// returned watcher alive to keep watching. Must be called within a Tokio runtime.
///
/// inotify is used directly: notify 8 (the design's first choice) subscribes every watched
/// directory to every write and open with no way to narrow it, and a program appending to
/// a file beside the config cost palisade half a core.
pub fn watch_config_file(state: Arc<ProxyState>) -> std::io::Result<ConfigWatcher> {
    let inotify = inotify::Inotify::init()?;
    let mut watch = Watch {
        watches: inotify.watches(),
        events: inotify.into_event_stream([0u8; 4096])?,
        dirs: Vec::new(),
        file: None,
        lost: false,
        wake_after: tokio::time::Instant::now(),
    };
    // What cannot be watched yet is warned about and tried again every second.
    let mut files = Files::of(&state.snapshot().config, &[]);
    refresh(&state, &mut files, &mut watch);
    Ok(ConfigWatcher {
        task: tokio::spawn(follow(state, files, watch)),
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

/// What a directory's watch reports: the events that make a file there whole, new or gone.
const DIR_EVENTS: inotify::WatchMask = inotify::WatchMask::CREATE
    .union(inotify::WatchMask::DELETE)
    .union(inotify::WatchMask::MOVED_FROM)
    .union(inotify::WatchMask::MOVED_TO)
    .union(inotify::WatchMask::CLOSE_WRITE)
    .union(inotify::WatchMask::ATTRIB);

/// What the config file's own watch reports: writes in place (it is being written), and
/// its close after writing. Its directory's watch sees the close too, unless the file
/// was written through another name (a hard link, or the host's side of a single-file
/// bind mount such as Docker's `-v ./palisade.toml:/etc/palisade/palisade.toml`).
const FILE_EVENTS: inotify::WatchMask =
    inotify::WatchMask::MODIFY.union(inotify::WatchMask::CLOSE_WRITE);

/// The inotify watches, and what each one is on.
struct Watch {
    watches: inotify::Watches,
    events: inotify::EventStream<[u8; 4096]>,
    /// The watched directories: None while one cannot be watched (it is gone).
    dirs: Vec<(PathBuf, Option<inotify::WatchDescriptor>)>,
    /// The config file's own watch, while it exists.
    file: Option<inotify::WatchDescriptor>,
    /// Events were lost since the last reload (the kernel's queue overflowed).
    lost: bool,
    /// The earliest the next wait for events may end (see [`READ_EVERY`]).
    wake_after: tokio::time::Instant,
}

/// A watcher that had to wait for events wakes at most this often: a busy directory's
/// events (a log beside the config opened and closed for every line) are read in batches
/// rather than one wake-up each. A lone change is read at once.
const READ_EVERY: Duration = Duration::from_millis(50);

impl Watch {
    /// Points the config file's own watch at the file now at its path (a rename may have
    /// put another there).
    fn watch_file(&mut self, files: &Files) {
        let (dir, name) = &files.config;
        let fresh = self.watches.add(dir.join(name), FILE_EVENTS).ok();
        if let Some(old) = self.file.take() {
            if Some(&old) != fresh.as_ref() {
                // Gone already if the old file was removed.
                let _ = self.watches.remove(old);
            }
        }
        self.file = fresh;
    }

    /// The next event for a file in a watched directory, or for the config file itself.
    /// None: the watcher failed (logged) and no more will come.
    async fn next(&mut self, files: &Files) -> Option<FileEvent> {
        use futures_util::{FutureExt, StreamExt};
        use inotify::EventMask;
        loop {
            let next = match self.events.next().now_or_never() {
                Some(queued) => queued,
                None => {
                    // Nothing queued: wait, but not past the last wake-up + READ_EVERY.
                    tokio::time::sleep_until(self.wake_after).await;
                    let next = self.events.next().await;
                    self.wake_after = tokio::time::Instant::now() + READ_EVERY;
                    next
                }
            };
            let event = match next? {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(error = %e, "the config file watcher failed; reload with SIGHUP or POST /reload");
                    return None;
                }
            };
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                // Events were lost: reload whatever is there now.
                self.lost = true;
                return Some(FileEvent {
                    kind: Seen::Lost,
                    key: files.config.clone(),
                });
            }
            if event.mask.contains(EventMask::IGNORED) {
                // The file or directory is gone (or was unwatched). A directory keeps its
                // entry: the next refresh finds it gone, or replaced, and reloads then.
                if self.file.as_ref() == Some(&event.wd) {
                    self.file = None;
                }
                continue;
            }
            if self.file.as_ref() == Some(&event.wd) {
                let kind = if event.mask.contains(EventMask::CLOSE_WRITE) {
                    Seen::Closed
                } else {
                    Seen::Written
                };
                return Some(FileEvent {
                    kind,
                    key: files.config.clone(),
                });
            }
            let Some(dir) = self
                .dirs
                .iter()
                .find(|(_, wd)| wd.as_ref() == Some(&event.wd))
            else {
                continue;
            };
            let Some(name) = event.name else {
                // About the directory itself.
                continue;
            };
            let kind = if event.mask.contains(EventMask::CREATE) {
                Seen::Created
            } else if event.mask.contains(EventMask::CLOSE_WRITE) {
                Seen::Closed
            } else if event
                .mask
                .intersects(EventMask::MOVED_FROM | EventMask::MOVED_TO)
            {
                Seen::Renamed
            } else if event.mask.contains(EventMask::DELETE) {
                Seen::Removed
            } else {
                Seen::Attributes
            };
            let key = (dir.0.clone(), name);
            if key == files.config && matches!(kind, Seen::Created | Seen::Renamed) {
                // Another file at the config's path: watch its writes from now on, not
                // only at the next refresh (it may be written for a while yet).
                self.watch_file(files);
            }
            return Some(FileEvent { kind, key });
        }
    }

    /// The next change of a watched file. None: the watcher failed.
    async fn next_change(&mut self, files: &mut Files) -> Option<Change> {
        loop {
            let event = self.next(files).await?;
            if let Some(change) = files.settle(&event) {
                return Some(change);
            }
        }
    }
}

/// Reloads on the changes the watcher reports, and keeps what it watches in step with
/// the running config.
async fn follow(state: Arc<ProxyState>, mut files: Files, mut watch: Watch) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            change = watch.next_change(&mut files) => change,
            _ = tick.tick() => {
                // A reload by SIGHUP or the admin API may name other certificate files; a
                // directory may have been replaced or removed (no event says so), and a
                // rename may have put another file at the config's path.
                if refresh(&state, &mut files, &mut watch) {
                    tracing::info!("a watched directory was replaced: reloading");
                    let _ = reload(&state);
                    refresh(&state, &mut files, &mut watch);
                }
                continue;
            }
        };
        let Some(change) = (match first {
            Some(change) => settle(change, &mut watch, &mut files).await,
            None => None,
        }) else {
            return;
        };
        if std::mem::take(&mut watch.lost) {
            tracing::warn!(
                "file events were lost (the kernel's queue of them overflowed): reloading"
            );
            let _ = reload(&state);
        } else if change.certificates {
            tracing::info!("certificate files changed: reloading");
            let _ = reload(&state);
        } else {
            tracing::info!("config file changed");
            let _ = reload_if_changed(&state);
        }
        // Links may lead elsewhere now (a swapped `..data`), and the files may be others.
        refresh(&state, &mut files, &mut watch);
    }
}

/// Gathers the rest of a burst after its first change: until no event came for
/// [`QUIET`] (at most [`MAX_BURST`] in all), and while the config file is being written,
/// until it is closed or [`WRITE_WAIT`] passes with no event (said in the log once it has
/// been open for [`QUIET`]: most writers close at once). None: the watcher is gone.
async fn settle(mut change: Change, watch: &mut Watch, files: &mut Files) -> Option<Change> {
    let started = tokio::time::Instant::now();
    let mut told = false;
    loop {
        let wait = if change.written {
            QUIET.min(MAX_BURST.saturating_sub(started.elapsed()))
        } else if told {
            WRITE_WAIT.saturating_sub(QUIET)
        } else {
            QUIET
        };
        match tokio::time::timeout(wait, watch.next_change(files)).await {
            Ok(Some(next)) => {
                change = Change {
                    certificates: change.certificates | next.certificates,
                    written: next.written,
                };
            }
            Ok(None) => return None,
            Err(_) if change.written => return Some(change),
            Err(_) if !told => {
                tracing::info!("config file is being written: reloading once it is closed");
                told = true;
            }
            Err(_) => {
                tracing::warn!(
                    "config file still open for writing {WRITE_WAIT:?} after its last change: reloading what it holds"
                );
                // What it holds is read as whole: the next change starts afresh.
                files.writing = false;
                return Some(Change {
                    written: true,
                    ..change
                });
            }
        }
    }
}

/// Points the watch at the files the running config names, along their links now.
/// Every directory is watched anew (the same watch while it is the same directory). True
/// when one that was watched has been replaced by another, or came back after it was
/// gone: files in it changed without an event.
fn refresh(state: &ProxyState, files: &mut Files, watch: &mut Watch) -> bool {
    let rejected = state
        .rejected_tls_files
        .lock()
        .map(|files| files.clone())
        .unwrap_or_default();
    let mut fresh = Files::of(&state.snapshot().config, &rejected);
    fresh.writing = files.writing;
    *files = fresh;
    let mut replaced = false;
    let mut dirs = Vec::new();
    for dir in files.dirs() {
        let before = watch.dirs.iter().find(|(d, _)| *d == dir).map(|(_, wd)| wd);
        match watch.watches.add(&dir, DIR_EVENTS) {
            Ok(wd) => {
                replaced |= before.is_some_and(|old| old.as_ref() != Some(&wd));
                dirs.push((dir, Some(wd)));
            }
            Err(e) => {
                if before.is_none_or(Option::is_some) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a directory of the config or its certificates; trying again every second");
                }
                dirs.push((dir, None));
            }
        }
    }
    // Watches no longer used (a directory dropped, or replaced: its old one); gone already
    // if the directory was removed (an old ConfigMap version).
    for (_, wd) in std::mem::replace(&mut watch.dirs, dirs) {
        if let Some(wd) = wd {
            if !watch.dirs.iter().any(|(_, now)| now.as_ref() == Some(&wd)) {
                let _ = watch.watches.remove(wd);
            }
        }
    }
    watch.watch_file(files);
    replaced
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
    /// The files `config` names, and `more` certificate files, as they resolve now.
    fn of(config: &Config, more: &[PathBuf]) -> Files {
        let (config_links, file) = resolve(&config.path);
        let certs = tls_files(config)
            .iter()
            .chain(more)
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

    /// Follows one file event; Some when it touched a watched file.
    fn settle(&mut self, event: &FileEvent) -> Option<Change> {
        if event.kind == Seen::Lost {
            // Which files changed is not known: all of them may have.
            self.writing = false;
            return Some(Change {
                certificates: true,
                written: true,
            });
        }
        let key = &event.key;
        let certificates = self.certs.contains(key);
        if self.config_links.contains(key) {
            // A link made or moved: where it leads now is a whole file.
            self.writing = false;
            return Some(Change {
                certificates,
                written: true,
            });
        }
        if *key != self.config {
            return certificates.then_some(Change {
                certificates,
                written: !self.writing,
            });
        }
        match event.kind {
            // Opened to be written (a new file, or one written in place): its writer may
            // not be done.
            Seen::Created | Seen::Written => self.writing = true,
            // Its writer closed it; or another file was renamed over it, or it is gone:
            // whatever is there now is whole.
            Seen::Closed | Seen::Renamed | Seen::Removed | Seen::Lost => self.writing = false,
            // Permissions, times: no news about its content.
            Seen::Attributes => {}
        }
        Some(Change {
            certificates,
            written: !self.writing,
        })
    }
}

/// What happened to a file in a watched directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Created,
    /// Written in place (the config file's own watch).
    Written,
    /// Closed after writing.
    Closed,
    /// Renamed from or to this name.
    Renamed,
    Removed,
    /// Permissions or times changed.
    Attributes,
    /// The kernel's queue overflowed: events were lost.
    Lost,
}

/// A file event: what, and to which file.
#[derive(Debug)]
struct FileEvent {
    kind: Seen,
    key: Key,
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

/// A burst of file events ends this long after its last event ...
const QUIET: Duration = Duration::from_millis(200);

/// ... or this long after its first, if events keep coming.
const MAX_BURST: Duration = Duration::from_secs(2);

/// How long a config file written in place and not closed is waited for before it is
/// read anyway (a writer that keeps it open).
const WRITE_WAIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &str, name: &str) -> Key {
        (PathBuf::from(dir), name.into())
    }

    fn files() -> Files {
        Files {
            config: key("/etc/p", "palisade.toml"),
            config_links: vec![key("/etc/p", "..data")],
            certs: vec![key("/etc/tls", "cert.pem")],
            writing: false,
        }
    }

    fn event(kind: Seen, key: Key) -> FileEvent {
        FileEvent { kind, key }
    }

    const WRITING: Option<Change> = Some(Change {
        certificates: false,
        written: false,
    });
    const WHOLE: Option<Change> = Some(Change {
        certificates: false,
        written: true,
    });
    const CERTS: Option<Change> = Some(Change {
        certificates: true,
        written: true,
    });

    #[test]
    fn a_config_written_in_place_is_whole_once_closed() {
        let mut files = files();
        let config = key("/etc/p", "palisade.toml");
        assert_eq!(files.settle(&event(Seen::Written, config.clone())), WRITING);
        assert_eq!(files.settle(&event(Seen::Written, config.clone())), WRITING);
        assert_eq!(
            files.settle(&event(Seen::Attributes, config.clone())),
            WRITING
        );
        assert_eq!(files.settle(&event(Seen::Closed, config.clone())), WHOLE);
        // Made anew, then renamed over: whole at the rename.
        assert_eq!(files.settle(&event(Seen::Created, config.clone())), WRITING);
        assert_eq!(files.settle(&event(Seen::Renamed, config.clone())), WHOLE);
        assert_eq!(files.settle(&event(Seen::Removed, config)), WHOLE);
    }

    #[test]
    fn links_certificates_and_lost_events_count_other_files_do_not() {
        let mut files = files();
        assert_eq!(
            files.settle(&event(Seen::Closed, key("/etc/p", "app.log"))),
            None
        );
        assert_eq!(
            files.settle(&event(Seen::Created, key("/etc/tls", "palisade.toml"))),
            None
        );
        // A swapped `..data` link: whatever it leads to now is whole.
        files.writing = true;
        assert_eq!(
            files.settle(&event(Seen::Renamed, key("/etc/p", "..data"))),
            WHOLE
        );
        assert!(!files.writing);
        assert_eq!(
            files.settle(&event(Seen::Closed, key("/etc/tls", "cert.pem"))),
            CERTS
        );
        // A certificate change while the config is being written waits for it.
        files.writing = true;
        assert_eq!(
            files.settle(&event(Seen::Renamed, key("/etc/tls", "cert.pem"))),
            Some(Change {
                certificates: true,
                written: false,
            })
        );
        // Events were lost: everything is read again.
        assert_eq!(
            files.settle(&event(Seen::Lost, key("/etc/p", "palisade.toml"))),
            CERTS
        );
    }
}
