//! Fuzzes `courier::fuzzing::dlq_page_reply`: see that function for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier::fuzzing::dlq_page_reply(data));
