//! courier: delivers JSON messages from a Redis list to a main server over mutual TLS, with
//! retries, dead letters and metrics, and loses none of them on a crash.
//!
//! How a message moves through the modules:
//!
//! 1. `config` turns config.yaml and the environment into typed `Settings`, once. It imports
//!    no other module; no module of `src/` is in a cycle (docs/design.md, "The map of the code").
//! 2. `worker` composes the rest. Its claimer asks `queue` (which alone knows key names and
//!    Lua, and how to reach one Redis, a Sentinel master or a cluster) to move items from
//!    the worker's queues to its processing lists, one script a batch.
//! 3. `message` parses each item into an `Envelope` (or names why it is not a message).
//! 4. `delivery` POSTs it to the main server over the client `tls` set up from the PEM files,
//!    with the message's W3C trace context (`trace`).
//! 5. `policy` decides, purely, what the result means: `Ack`, `Retry { delay }` or `Dead`;
//!    `breaker` (pure too) judges whether the main server is down or only struggling.
//! 6. `worker` (a `Claimer`, delivery tasks, a `Settler`, each holding only what it uses)
//!    carries that out through `queue` (ack, retry set, dead-letter list, its header written
//!    by `message`), records it in `metrics` and the log (`telemetry`), and queues the
//!    status PUT.
//! 7. Beside each worker: a heartbeat that reaps workers it watched fall silent
//!    (`worker::liveness`), a promoter of due retries, and a sweeper that returns items of its
//!    own processing lists that no task holds (`worker::sweep`).
//!
//! Beside the pipeline: `health` holds what the worker tells the outside (Redis up,
//! draining, the circuit, the queues as the heartbeat read them), which `admin` serves as
//! /metrics, /health, /ready and /stats (and `dlq`, dead-letter triage, as /dlq and /ui);
//! `shutdown` and `service` speak signals and systemd; `pki` makes certificates; `cli` is the
//! command line; `devtools` (a feature) holds the reference main server, the demo and the
//! benchmark, and `fuzzing` (a feature) the invariants the fuzz targets check.
//!
//! The big modules are folders split by concern (`config/`, `queue/` with `connect/`,
//! `dlq/`, `cli/check/`, ...; docs/design.md has the table). What only the crate uses is
//! `pub(crate)`, with `unreachable_pub` on; `breaker`, `policy`, `dlq` and `service` are
//! private. The Redis key protocol and why no message is lost: docs/design.md.

pub mod admin;
mod backoff;
mod breaker;
pub mod cli;
pub mod config;
pub mod delivery;
#[cfg(feature = "devtools")]
pub mod devtools;
mod dlq;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod health;
pub mod message;
pub mod metrics;
pub mod pki;
mod policy;
pub mod queue;
mod service;
pub mod shutdown;
mod sync;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod worker;
