//! Fuzzes `courier::fuzzing::http_differential`: the same answer bytes read by courier's
//! HTTP/1.1 client and by hyper's must come out the same, but for the differences listed (each
//! with its reason) in that function's documentation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier::fuzzing::http_differential(data));
