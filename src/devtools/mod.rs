//! Tools for developing and trying courier, built with the `devtools` feature (on by
//! default; `--no-default-features` leaves them out of the production binary): `sink`, the
//! reference main server; `demo`, the whole pipeline on one machine; `bench`, the benchmark;
//! `harness`, the private redis-server and throwaway PKI that these and the integration tests
//! run against.

pub(crate) mod bench;
pub(crate) mod demo;
pub mod harness;
mod netem;
pub mod sink;
