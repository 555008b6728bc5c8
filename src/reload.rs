//! Reloading the configuration: read -> parse -> validate -> build -> swap, or keep the
//! running one. SIGHUP, `POST /reload` (and the file watcher) all come through here.

use std::sync::atomic::Ordering;

use crate::config::{self, ConfigError};
use crate::snapshot::ProxyState;

/// Reloads the config from the file the running one came from. On success the new
/// snapshot is swapped in and its generation returned; on failure the running config
/// stays untouched and the errors are returned (and logged).
pub fn reload(state: &ProxyState) -> Result<u64, Vec<ConfigError>> {
    let path = state.snapshot().config.path.clone();
    match config::load(&path) {
        Ok(config) => {
            let generation = state.apply(config);
            state.reloads_ok.fetch_add(1, Ordering::Relaxed);
            state.metrics.reload(true);
            tracing::info!(generation, path = %path.display(), "configuration reloaded");
            Ok(generation)
        }
        Err(errors) => {
            state.reloads_failed.fetch_add(1, Ordering::Relaxed);
            state.metrics.reload(false);
            for e in &errors {
                tracing::error!(error = %e, "reload rejected; the running configuration stays");
            }
            Err(errors)
        }
    }
}
