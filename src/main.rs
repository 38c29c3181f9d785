//! The `courier` binary: parses the command line and hands it to `courier::cli`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before anything else: SIGHUP (`systemctl reload`) must never kill the process, whatever
    // state it is in. The worker's own listener takes over once its runtime runs.
    courier::shutdown::ignore_hangup();
    courier::cli::main(courier::cli::Cli::parse())
}
