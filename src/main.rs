//! The `courier` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use courier::config::{InstanceEnv, ProcessEnv, Settings};
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
        /// Instance number N of a systemd template unit (worker@N): WORKER_ID defaults to
        /// worker-N and WORKER_METRICS_PORT to 9100+N-1 (the variables override both).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=55000))]
        instance: Option<u32>,
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
    /// Measure throughput, CPU per message, peak RSS, idle CPU and enqueue-to-delivery latency:
    /// the real worker as its own process against a private redis-server and the reference
    /// mTLS main server in another process. Linux only.
    ///
    /// Example: courier bench --messages 200000 --concurrency 64
    Bench {
        /// Messages to drain.
        #[arg(long, default_value_t = 200_000)]
        messages: usize,
        /// WORKER_CONCURRENCY for the run.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// WORKER_BATCH_SIZE for the run.
        #[arg(long, default_value_t = 10)]
        batch_size: usize,
        /// Approximate bytes per queued message.
        #[arg(long, default_value_t = 200)]
        message_bytes: usize,
        /// Share of delivery attempts the main server answers 503 (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        fail_share: f64,
        /// Messages per second in the latency phase (0 skips it).
        #[arg(long, default_value_t = 2000)]
        latency_rate: usize,
        /// Seconds the latency phase lasts.
        #[arg(long, default_value_t = 5)]
        latency_seconds: u64,
        /// Seconds of idle-CPU measurement with the queue empty.
        #[arg(long, default_value_t = 5)]
        idle_seconds: u64,
        /// Run the worker with MAIN_SERVER_HTTP2=true (the main server offers both).
        #[arg(long)]
        http2: bool,
        /// Drain this many times (a fresh worker each time) and report each figure's median.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// With --fail-share: run a clean drain before each failing one and report the ratio
        /// of their first-90% rates, so that both halves of each pair see the same machine.
        #[arg(long)]
        paired: bool,
    },
    /// Check a configuration: TLS files, key match, chain, expiry, key permissions, Redis,
    /// and a real mutual-TLS request to the main server. Exits 0 only when all pass.
    ///
    /// Example: WORKER_ID=worker-1 courier check --config /etc/courier/config.yaml
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Make certificates: a CA, server certificates and worker client certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the reference main server (mutual TLS, the two endpoints), printing each call.
    /// Failure injection for smoke tests: a share of 503s, failing first attempts, delays.
    ///
    /// Example: courier sink --listen 127.0.0.1:8443 --cert certs/server.crt --key certs/server.key --client-ca certs/ca.crt --fail-share 0.1
    Sink(commands::SinkArgs),
    /// Push messages onto the queue in the documented format.
    ///
    /// Examples: courier enqueue --id order-42 --payload '{"total": 12.5}'
    ///           courier enqueue --count 10000 --prefix load
    Enqueue {
        #[command(flatten)]
        config: ConfigArg,
        /// The message_id of one message.
        #[arg(long, conflicts_with = "count")]
        id: Option<String>,
        /// How many messages to generate (ids PREFIX-0, PREFIX-1, ...).
        #[arg(long, required_unless_present = "id")]
        count: Option<usize>,
        /// Prefix of generated ids.
        #[arg(long, default_value = "msg")]
        prefix: String,
        /// The payload, as JSON.
        #[arg(long)]
        payload: Option<String>,
    },
    /// Show the queue: ready (and the oldest's age), processing per worker, retry (next due),
    /// dead by reason, live workers with heartbeat age.
    ///
    /// Example: courier stats --watch
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every two seconds until Ctrl+C.
        #[arg(long)]
        watch: bool,
    },
    /// Inspect and requeue dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

/// The configuration file option shared by commands that read settings.
#[derive(clap::Args)]
struct ConfigArg {
    /// The config file; without it, ./config.yaml is read when present.
    #[arg(long, short, env = "COURIER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a new CA: DIR/ca.crt and DIR/ca.key (0600).
    ///
    /// Example: courier certs init --out certs
    Init {
        /// Directory to write to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "courier CA")]
        name: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a server certificate (--server NAMES) or a worker client certificate (--client NAME)
    /// from the CA in --ca DIR.
    ///
    /// Examples: courier certs issue --ca certs --server main.internal,10.0.0.5 --out certs
    ///           courier certs issue --ca certs --client worker-1 --out certs
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// Server DNS names and IP addresses, comma-separated; writes server.crt and server.key.
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present = "client",
            conflicts_with = "client"
        )]
        server: Vec<String>,
        /// Worker name; writes NAME.crt and NAME.key.
        #[arg(long)]
        client: Option<String>,
        /// Directory to write to.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 825)]
        days: u64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, newest first.
    ///
    /// Example: courier dlq list --limit 20
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON lines (the stored records).
        #[arg(long)]
        json: bool,
    },
    /// Show the dead letters of one message id in full.
    ///
    /// Example: courier dlq show order-42
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// The message_id.
        id: String,
    },
    /// Move dead letters back to the queue with attempt_count reset to 0 and the reason dropped.
    ///
    /// Examples: courier dlq requeue order-42 order-43
    ///           courier dlq requeue --all
    Requeue {
        #[command(flatten)]
        config: ConfigArg,
        /// Message ids to requeue.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Requeue every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete every dead letter. Needs --yes.
    ///
    /// Example: courier dlq purge --yes
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        /// Really delete them.
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> ExitCode {
    // Before anything else: SIGHUP (`systemctl reload`) must never kill the process, whatever
    // state it is in. The worker's own listener takes over once its runtime runs.
    courier::shutdown::ignore_hangup();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, instance } => run(config, instance),
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
        Command::Bench {
            messages,
            concurrency,
            batch_size,
            message_bytes,
            fail_share,
            latency_rate,
            latency_seconds,
            idle_seconds,
            http2,
            repeat,
            paired,
        } => oneshot(courier::bench::run(courier::bench::BenchOptions {
            messages,
            concurrency: concurrency.max(1),
            batch_size: batch_size.clamp(1, 1000),
            message_bytes,
            fail_share: fail_share.clamp(0.0, 1.0),
            latency_rate,
            latency_seconds,
            idle_seconds,
            http2,
            repeat: repeat.clamp(1, 100),
            paired,
        })),
        Command::Check { config } => {
            let file = config.config.or_else(Settings::default_file);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("courier: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let checks = runtime.block_on(courier::check::run(file.as_deref()));
            for check in &checks {
                println!("{}", check.render());
            }
            let failed = checks
                .iter()
                .filter(|c| c.verdict == courier::check::Verdict::Fail)
                .count();
            if failed == 0 {
                println!("all checks passed");
                ExitCode::SUCCESS
            } else {
                println!("{failed} check(s) failed");
                ExitCode::FAILURE
            }
        }
        Command::Certs(command) => match commands::certs(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("courier: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Sink(args) => oneshot(commands::sink(args)),
        Command::Enqueue {
            config,
            id,
            count,
            prefix,
            payload,
        } => match settings(config) {
            Ok(settings) => oneshot(async move {
                let n = courier::ops::enqueue(&settings.redis, id, count, &prefix, payload.as_deref()).await?;
                println!("enqueued {n} message(s) on {}", settings.redis.queue_name);
                Ok(())
            }),
            Err(code) => code,
        },
        Command::Stats { config, json, watch } => match settings(config) {
            Ok(settings) => oneshot(commands::stats(settings, json, watch)),
            Err(code) => code,
        },
        Command::Dlq(command) => commands::dlq(command),
    }
}

/// Runs a one-shot command on a fresh runtime; its error is one line, exit 1.
fn oneshot<F: std::future::Future<Output = anyhow::Result<()>>>(work: F) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("courier: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("courier: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads settings for an operator command; a bad configuration exits 78.
fn settings(config: ConfigArg) -> Result<Settings, ExitCode> {
    let file = config.config.or_else(Settings::default_file);
    Settings::load(file.as_deref(), &ProcessEnv).map_err(config_error)
}

fn config_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("courier: configuration error: {message}");
    ExitCode::from(EXIT_CONFIG)
}

fn run(config: Option<PathBuf>, instance: Option<u32>) -> ExitCode {
    let file = config.or_else(Settings::default_file);
    let loaded = match instance {
        Some(instance) => Settings::load(
            file.as_deref(),
            &InstanceEnv {
                instance,
                env: ProcessEnv,
            },
        ),
        None => Settings::load(file.as_deref(), &ProcessEnv),
    };
    let settings = match loaded {
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
    let _logs = match courier::telemetry::init(
        settings.logging.level,
        &settings.logging.file_path,
        settings.logging.max_file_bytes,
        &settings.worker.id,
    ) {
        Ok(guards) => guards,
        Err(e) => return config_error(e),
    };
    // One thread by default: on a machine shared with Redis and the main server, cross-thread
    // wake-ups cost more than a second thread gains (README, "Performance").
    let runtime = match settings.worker.threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
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

mod commands;
