//! The integration tests, one crate: each module drives the real thing (a redis-server of its
//! own, certificates made at test time, the reference mTLS main server, the worker in-process
//! or as the real binary). Tests in a `slow` module (kill runs of thousands of messages, the
//! demo, the benchmark) take most of the time; `cargo test --test it -- --skip slow::` runs
//! the rest in well under a minute.

// A test crate has no public surface: `pub` in its modules only shares helpers between them.
#![allow(unreachable_pub)]

mod common;

mod binary;
mod cli;
mod cluster;
mod delivery;
mod dlq;
mod flow;
mod hostile;
mod http1;
mod layout;

mod production_redis;
mod properties;
mod queue;
mod queues;
mod redis_faults;
mod resend;
mod resilience;
mod scripts;
mod sentinel;
mod struggling;
mod trace;
mod unavailable;
