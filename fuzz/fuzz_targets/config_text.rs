//! Fuzzes `courier::fuzzing::config_text`: see that function for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier::fuzzing::config_text(data));
