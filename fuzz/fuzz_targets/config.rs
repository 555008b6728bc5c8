#![no_main]
//! A config file: parsed and validated, and when valid, its warnings, its summary and the
//! snapshot the proxy would serve (built fresh, then again as a reload of itself). Bad
//! input must be errors, never a panic.

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use palisade::config;
use palisade::metrics::Metrics;
use palisade::snapshot::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(text, Path::new("/fuzz/palisade.toml")) {
        Ok(config) => {
            let _ = config::warnings(&config);
            let _ = config.summary();
            let metrics = Metrics::new();
            let resolved = Default::default();
            let first = Snapshot::build(config.clone(), None, &resolved, &metrics);
            let _ = Snapshot::build(config, Some(&first), &resolved, &metrics);
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "an error without a message");
            for e in errors {
                let _ = e.to_string();
            }
        }
    }
});
