#![no_main]
//! Frames and writes interleaved as the input says. See
//! `palisade::http1::fuzz_body_writer`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    palisade::http1::fuzz_body_writer(data);
});
