//! The `courier` binary: parses the command line and hands it to `courier::cli`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before anything else: SIGHUP (`systemctl reload`) must never kill the process, whatever
    // state it is in. The worker's own listener takes over once its runtime runs.
    courier::shutdown::ignore_hangup();
    courier::cli::main(courier::cli::Cli::parse())
}

/// mimalloc rather than glibc's malloc: its per-size free lists keep up with 64 deliveries
/// under way, where glibc's thread cache holds 7 blocks a size and the rest take its slow paths
/// (7% less CPU per message, 5% fewer instructions; docs/performance.md). Its arenas are
/// committed as used (`.cargo/config.toml`), which keeps peak RSS near glibc's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
