//! Arbitrary bytes as a request head on a listener (see `trellis::proxy::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis::proxy::fuzz::request_head(data));
