//! courier: delivers JSON messages from a Redis list to a main server over mutual TLS, with
//! retries, dead letters and metrics, and loses none of them on a crash.
//!
//! `worker` composes the parts; each other module owns one concern (see DESIGN.md).

pub mod admin;
pub mod cli;
pub mod config;
pub mod delivery;
#[cfg(feature = "devtools")]
pub mod devtools;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod message;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod queue;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod worker;
