//! Fuzzes `courier::fuzzing::retry_after`: see that function for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier::fuzzing::retry_after(data));
