//! Fuzzes `courier::fuzzing::config_text`, the same bytes as a REDIS_URL
//! (`courier::fuzzing::redis_url`) and as each numeric worker setting and the outcome table
//! (`courier::fuzzing::worker_numbers`): see those functions for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    courier::fuzzing::config_text(data);
    courier::fuzzing::redis_url(data);
    courier::fuzzing::worker_numbers(data);
});
