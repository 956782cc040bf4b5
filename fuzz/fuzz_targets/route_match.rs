//! Route tables and request heads built from arbitrary bytes, matched (see `trellis::proxy::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis::proxy::fuzz::route_match(data));
