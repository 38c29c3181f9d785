//! Fuzzes `courier::fuzzing::admin_input`: see that function for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier::fuzzing::admin_input(data));
