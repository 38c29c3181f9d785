//! The `courier` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use courier::config::{ProcessEnv, Settings};
use courier::tls::ClientTls;
use courier::worker::{RunError, Worker};

/// sysexits.h EX_CONFIG: the configuration is wrong; restarting will not help.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "courier",
    version,
    about = "Delivers JSON messages from a Redis list to a main server over mutual TLS, losing none"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: claim messages from Redis and deliver them to the main server.
    ///
    /// Settings come from the seed's environment variables (REDIS_HOST, MAIN_SERVER_URL,
    /// WORKER_ID, WORKER_CONCURRENCY, ...) over config.yaml over the defaults.
    ///
    /// Example: WORKER_ID=worker-1 MAIN_SERVER_URL=https://main:8000 courier run --config config.yaml
    Run {
        /// The config file; without it, ./config.yaml is read when present.
        #[arg(long, short, env = "COURIER_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run the whole pipeline locally: throwaway certificates, a reference mTLS main server,
    /// Redis (REDIS_URL, localhost, or a private redis-server), and the worker, with some
    /// messages failing first. Cleans up after itself, also on Ctrl+C.
    ///
    /// Example: courier demo --messages 5000
    Demo {
        /// How many messages to send.
        #[arg(long, default_value_t = 5000)]
        messages: usize,
        /// Share of messages whose first two attempts fail with 503.
        #[arg(long, default_value_t = 0.1)]
        flaky: f64,
        /// Delivery slots.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// The Redis to use when it answers (its keys are left alone but for the demo's own queue).
        #[arg(long, env = "REDIS_URL")]
        redis_url: Option<String>,
        /// Port for /metrics while the demo runs (0: any free port).
        #[arg(long, default_value_t = 0)]
        metrics_port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::Demo {
            messages,
            flaky,
            concurrency,
            redis_url,
            metrics_port,
        } => {
            let options = courier::demo::DemoOptions {
                messages,
                flaky_share: flaky,
                concurrency: concurrency.max(1),
                redis_url,
                metrics_port,
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("courier: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(courier::demo::run(options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("courier demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("courier: configuration error: {message}");
    ExitCode::from(EXIT_CONFIG)
}

fn run(config: Option<PathBuf>) -> ExitCode {
    let file = config.or_else(Settings::default_file);
    let settings = match Settings::load(file.as_deref(), &ProcessEnv) {
        Ok(settings) => settings,
        Err(e) => return config_error(e),
    };
    let tls = match settings.tls.enabled {
        true => match ClientTls::load(&settings.tls) {
            Ok(tls) => Some(tls),
            Err(e) => return config_error(e),
        },
        false => None,
    };
    let _logs = match courier::telemetry::init(settings.logging.level, &settings.logging.file_path, &settings.worker.id)
    {
        Ok(guards) => guards,
        Err(e) => return config_error(e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("courier: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(tls) = &tls {
        info!(subject = %tls.subject, expires = %courier::tls::rfc3339(tls.not_after), "Client certificate loaded");
    }
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let worker = Worker::start(settings, tls, shutdown.clone()).await?;
        tokio::spawn(async move {
            let signal = courier::shutdown::requested().await;
            info!(signal, "Shutdown requested; draining");
            shutdown.cancel();
            let again = courier::shutdown::requested().await;
            warn!(signal = again, "Second stop request: exiting now; unfinished messages stay in processing and return to the queue at the next start");
            std::process::exit(1);
        });
        worker.run().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Config(e)) => {
            tracing::error!("Configuration error: {e}");
            config_error(e)
        }
        Err(RunError::Fatal(e)) => {
            tracing::error!("Fatal: {e}");
            eprintln!("courier: {e}");
            ExitCode::FAILURE
        }
    }
}
