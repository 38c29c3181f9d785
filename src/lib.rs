//! courier: delivers JSON messages from a Redis list to a main server over mutual TLS, with
//! retries, dead letters and metrics, and loses none of them on a crash.
//!
//! `worker` composes the parts; each other module owns one concern (see DESIGN.md).

pub mod admin;
pub mod bench;
pub mod check;
pub mod config;
pub mod delivery;
pub mod demo;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod message;
pub mod metrics;
pub mod ops;
pub mod pki;
pub mod policy;
pub mod queue;
pub mod service;
pub mod shutdown;
pub mod sink;
pub mod telemetry;
pub mod tls;
pub mod worker;
