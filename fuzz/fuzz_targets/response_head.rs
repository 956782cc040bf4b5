//! Arbitrary bytes as an app's HTTP/1.1 response to the proxy (see `trellis::proxy::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis::proxy::fuzz::response_head(data));
