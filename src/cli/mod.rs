//! The command line: every command's options and what runs it. `main.rs` only parses and
//! hands over to `main` here. One file per command family: `run` (the worker), `check`,
//! `certs`, `enqueue`, `stats`, `dlq`, `where` (`locate`), and, with the `devtools` feature,
//! `devtools` (the reference main server, the demo and the benchmark).

mod certs;
mod check;
#[cfg(feature = "devtools")]
mod devtools;
mod dlq;
mod enqueue;
mod locate;
mod run;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{ProcessEnv, RedisSettings, Settings};
use crate::queue::{Conn, Keys};
use crate::telemetry::one_line;

pub use self::dlq::printable;

/// sysexits.h EX_CONFIG: the configuration is wrong; restarting will not help.
pub const EXIT_CONFIG: u8 = 78;
/// sysexits.h EX_TEMPFAIL: another process took this worker's id while it ran. A restart
/// waits for that process to go quiet, and refuses (78) if it does not.
pub const EXIT_ID_TAKEN: u8 = 75;

/// `courier`'s command line.
#[derive(Parser)]
#[command(
    name = "courier",
    version,
    about = "Delivers JSON messages from a Redis list to a main server over mutual TLS, losing none"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The commands; each variant's doc comment is its `--help` text.
#[derive(Subcommand)]
enum Command {
    /// Run the worker: claim messages from Redis and deliver them to the main server.
    ///
    /// Settings come from the Python worker's environment variables (REDIS_HOST, MAIN_SERVER_URL,
    /// WORKER_ID, WORKER_CONCURRENCY, ...) over config.yaml over the defaults.
    ///
    /// Example: WORKER_ID=worker-1 MAIN_SERVER_URL=https://main:8000 courier run
    /// --config config.yaml
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
    #[cfg(feature = "devtools")]
    Demo(devtools::DemoArgs),
    /// Measure throughput, CPU per message, peak RSS, idle CPU and enqueue-to-delivery latency:
    /// the real worker as its own process against a private redis-server and the reference
    /// mTLS main server in another process. Linux only.
    ///
    /// Example: courier bench --messages 200000 --concurrency 64
    #[cfg(feature = "devtools")]
    Bench(devtools::BenchArgs),
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
    /// Example: courier sink --listen 127.0.0.1:8443 --cert certs/server.crt --key
    /// certs/server.key --client-ca certs/ca.crt --fail-share 0.1
    #[cfg(feature = "devtools")]
    Sink(devtools::SinkArgs),
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
        /// After pushing, wait until this many replicas have the messages (Redis WAIT), so a
        /// failover cannot lose them; fails when fewer acknowledge within --wait-timeout-ms.
        #[arg(long, default_value_t = 0)]
        wait_replicas: u32,
        /// How long --wait-replicas waits.
        #[arg(long, default_value_t = 5000)]
        wait_timeout_ms: u64,
        #[command(flatten)]
        queue: QueueArg,
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
        #[command(flatten)]
        queue: QueueArg,
    },
    /// Inspect and requeue dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Say where a message is now, in every configured queue (or the one named): ready at
    /// position N, in a worker's processing list, due for retry at T, or dead (reason, time,
    /// trace id). Exits 1 when it is in none of them (delivered, or never queued).
    ///
    /// Example: courier where order-42
    Where {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        queue: QueueArg,
        /// The message_id.
        id: String,
    },
}

/// The queue an operator command acts on.
#[derive(clap::Args)]
struct QueueArg {
    /// The queue to act on: one of REDIS_QUEUE_NAMES (or any queue name). Without it, the
    /// configured queue; with several configured, `stats` shows each and the others ask for one.
    #[arg(long, value_name = "NAME")]
    queue: Option<String>,
}

impl QueueArg {
    /// The one queue to act on: `--queue`, or the only configured one.
    fn one(self, settings: &mut Settings) -> Result<String, ExitCode> {
        match self.queue {
            Some(name) => {
                settings.redis.queues = vec![name.clone()];
                Ok(name)
            }
            None if settings.redis.queues.len() > 1 => {
                eprintln!(
                    "courier: several queues are configured ({}); name one with --queue",
                    settings.redis.queue_list()
                );
                Err(ExitCode::from(2))
            }
            None => Ok(settings.redis.first_queue().to_string()),
        }
    }
}

/// The configuration file option shared by commands that read settings.
#[derive(clap::Args)]
struct ConfigArg {
    /// The config file; without it, ./config.yaml is read when present.
    #[arg(long, short, env = "COURIER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Runs the command. Errors are one line on stderr; a configuration error exits 78.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config, instance } => run::run(config, instance),
        #[cfg(feature = "devtools")]
        Command::Demo(args) => devtools::demo(args),
        #[cfg(feature = "devtools")]
        Command::Bench(args) => devtools::bench(args),
        #[cfg(feature = "devtools")]
        Command::Sink(args) => oneshot(devtools::sink(args)),
        Command::Check { config } => check::command(config.config.or_else(Settings::default_file)),
        Command::Certs(command) => match certs::certs(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("courier: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Enqueue {
            config,
            id,
            count,
            prefix,
            payload,
            wait_replicas,
            wait_timeout_ms,
            queue,
        } => match settings_for(config, queue) {
            Ok(settings) => oneshot(async move {
                let replicas = enqueue::Replicas {
                    count: wait_replicas,
                    timeout_ms: wait_timeout_ms,
                };
                let n = enqueue::enqueue(&settings.redis, id, count, &prefix, payload.as_deref(), replicas).await?;
                println!("enqueued {n} message(s) on {}", settings.redis.first_queue());
                Ok(())
            }),
            Err(code) => code,
        },
        Command::Stats {
            config,
            json,
            watch,
            queue,
        } => match settings(config) {
            Ok(mut settings) => {
                if let Some(name) = queue.queue {
                    settings.redis.queues = vec![name];
                }
                oneshot(stats::command(settings, json, watch))
            }
            Err(code) => code,
        },
        Command::Dlq(command) => dlq::command(command),
        Command::Where { config, queue, id } => match settings(config) {
            Ok(mut settings) => {
                if let Some(name) = queue.queue {
                    settings.redis.queues = vec![name];
                }
                oneshot(async move {
                    let found = locate::locate(&settings.redis, &id).await?;
                    for (queue, place) in &found {
                        println!("{}", locate::describe(queue, place));
                    }
                    if found.is_empty() {
                        anyhow::bail!(
                            "message_id {} is in none of {} (delivered, or never queued)",
                            printable(&format!("{id:?}"), 600),
                            settings.redis.queue_list()
                        );
                    }
                    Ok(())
                })
            }
            Err(code) => code,
        },
    }
}

/// The tokio runtime, built in this one place: on the current thread for `threads == 1`, one
/// thread per core for 0, else that many threads.
fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    let runtime = match threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    runtime.map_err(|e| {
        eprintln!("courier: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

/// Runs a one-shot command on a fresh runtime; its error is one line, exit 1.
fn oneshot<F: std::future::Future<Output = anyhow::Result<()>>>(work: F) -> ExitCode {
    let runtime = match runtime(0) {
        Ok(runtime) => runtime,
        Err(code) => return code,
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
    Settings::load(file.as_deref(), &ProcessEnv).map_err(|e| config_error(one_line(&e)))
}

/// Settings for a command on one queue (`--queue`, or the only one configured).
fn settings_for(config: ConfigArg, queue: QueueArg) -> Result<Settings, ExitCode> {
    let mut settings = settings(config)?;
    queue.one(&mut settings)?;
    Ok(settings)
}

/// Connects for a one-shot command, with an error that says where and what to check.
/// Also returns the keys of the first queue in the settings (the one the command acts on).
async fn connect(settings: &RedisSettings) -> anyhow::Result<(Conn, Keys)> {
    let (conn, clustered) = connect_clustered(settings).await?;
    let keys = Keys::for_topology(settings.first_queue(), clustered);
    Ok((conn, keys))
}

/// `connect` without the keys: the connection, and whether it is to a cluster.
async fn connect_clustered(settings: &RedisSettings) -> anyhow::Result<(Conn, bool)> {
    crate::queue::connect_once(settings).await.map_err(|e| {
        if e.is_tls_files() {
            anyhow::anyhow!("{}", one_line(&e))
        } else if e.is_auth() {
            anyhow::anyhow!(
                "{} refused the credentials ({e}); check REDIS_USERNAME and REDIS_PASSWORD (or \
                 the user in REDIS_URL)",
                settings.describe()
            )
        } else {
            anyhow::anyhow!(
                "cannot reach {} ({e}); is it running? check {}",
                settings.describe(),
                settings.where_settings()
            )
        }
    })
}

/// Prints a configuration error on stderr; returns the exit code for it, 78 (`EXIT_CONFIG`).
fn config_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("courier: configuration error: {message}");
    ExitCode::from(EXIT_CONFIG)
}

/// `courier certs`: its two steps.
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

/// Which dead letters: every option narrows the selection.
#[derive(clap::Args, Debug, Clone, Default)]
struct FilterArgs {
    /// Only these reasons (comma-separated or repeated): rejected, exhausted, invalid_json,
    /// invalid_message_id, invalid_attempt_count, poisoned, too_large, internal_error.
    #[arg(long, value_delimiter = ',')]
    reason: Vec<String>,
    /// Only these HTTP statuses of the main server's answer (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    status: Vec<u16>,
    /// Only those dead at or after this time: RFC 3339 (2025-01-15T10:00:00Z) or a duration
    /// back from now (90s, 30m, 2h, 7d).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Only those dead before this time (same forms as --since).
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Only those whose record contains this text (in the message or the error), as is.
    #[arg(long, value_name = "TEXT")]
    grep: Option<String>,
}

/// `courier dlq`: what it does with dead letters.
#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, newest first, optionally filtered.
    ///
    /// Examples: courier dlq list --limit 20
    ///           courier dlq list --reason rejected --status 422 --since 2h --grep order-
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        queue: QueueArg,
        #[command(flatten)]
        filter: FilterArgs,
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON lines (header fields, message, position, size).
        #[arg(long)]
        json: bool,
    },
    /// Dead letters grouped by reason, HTTP status and error (ids, numbers and times in the
    /// error folded, so that one cause is one row), with count, oldest and newest.
    ///
    /// Example: courier dlq stats --since 1d
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        queue: QueueArg,
        #[command(flatten)]
        filter: FilterArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the dead letters of one message id in full.
    ///
    /// Example: courier dlq show order-42
    Show {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        queue: QueueArg,
        /// The message_id.
        id: String,
    },
    /// Move dead letters back to the queue with attempt_count reset to 0, oldest first, one
    /// at a time (each copied to the queue before it leaves the dead list). Needs ids, a
    /// filter or --all.
    ///
    /// Examples: courier dlq requeue order-42 order-43
    ///           courier dlq requeue --reason rejected --status 503 --since 2h --dry-run
    ///           courier dlq requeue --reason exhausted --rate 50 --front
    ///           courier dlq requeue --all
    Requeue {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        queue: QueueArg,
        /// Message ids to requeue.
        ids: Vec<String>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Requeue every dead letter (needed when no id or filter is given).
        #[arg(long)]
        all: bool,
        /// Only say what would move, and how many.
        #[arg(long)]
        dry_run: bool,
        /// At most this many per second.
        #[arg(long, value_name = "N")]
        rate: Option<f64>,
        /// Put them at the front of the queue (delivered next) instead of the back.
        #[arg(long)]
        front: bool,
        /// Requeue at most this many (the oldest).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Delete dead letters for good: those a filter selects, or --all. Needs --yes (or
    /// --dry-run).
    ///
    /// Examples: courier dlq purge --reason invalid_json --dry-run
    ///           courier dlq purge --reason invalid_json --yes
    ///           courier dlq purge --all --yes
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        queue: QueueArg,
        #[command(flatten)]
        filter: FilterArgs,
        /// Delete every dead letter (needed when no filter is given).
        #[arg(long)]
        all: bool,
        /// Only say what would be deleted, and how many.
        #[arg(long)]
        dry_run: bool,
        /// Really delete them.
        #[arg(long)]
        yes: bool,
        /// Delete at most this many (the oldest).
        #[arg(long)]
        limit: Option<u64>,
    },
}
