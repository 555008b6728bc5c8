#![no_main]
//! The access line for any host bytes, path and numbers. See
//! `palisade::logging::access::fuzz_access_line`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    palisade::logging::access::fuzz_access_line(data);
});
