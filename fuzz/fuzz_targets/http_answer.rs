//! Fuzzes `courier::fuzzing::http_answer`: see that function for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier::fuzzing::http_answer(data));
