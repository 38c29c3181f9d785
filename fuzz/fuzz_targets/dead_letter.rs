//! Fuzzes `courier::fuzzing::dead_letter_record`: see that function for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier::fuzzing::dead_letter_record(data));
