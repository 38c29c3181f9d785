//! Fuzzes `courier::fuzzing::config_text`, and the same bytes as a REDIS_URL
//! (`courier::fuzzing::redis_url`): see those functions for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    courier::fuzzing::config_text(data);
    courier::fuzzing::redis_url(data);
});
