//! Fuzzes `courier::fuzzing::time_bound`: see that function for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier::fuzzing::time_bound(data));
