#![no_main]
//! One client connection through the proxy to its echo backend, over loopback sockets.
//! The input's first 8 bytes say where the client's writes split it; the rest is what
//! the client sends. See `palisade::server::fuzz::fuzz_connection`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // A Rust `main` ignores SIGPIPE (a write to a closed socket is an error, not the
        // end of the process); libFuzzer's `main` does not.
        // SAFETY: setting a signal's disposition to SIG_IGN before any thread relies on it.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    },
    |data: &[u8]| {
        palisade::server::fuzz::fuzz_connection(data);
    }
);
