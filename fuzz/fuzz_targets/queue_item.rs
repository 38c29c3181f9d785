//! Fuzzes `courier::fuzzing::queue_item`: see that function for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier::fuzzing::queue_item(data));
