#![no_main]
//! The input's first 8 bytes say where the reads split it; the rest is the bytes that
//! arrive. See `palisade::upstream::h1::fuzz_response_heads`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    palisade::upstream::h1::fuzz_response_heads(data);
});
