//! `courier bench`: the real worker binary as its own process, against a private redis-server
//! and the reference mTLS main server in a third process. Three phases:
//!
//! 1. drain: N messages enqueued first, then the worker started; messages per second, the
//!    worker's CPU time per message (from /proc) and its peak RSS (VmHWM);
//! 2. idle: the worker's CPU use while the queue is empty;
//! 3. latency: messages enqueued at a steady rate while the worker runs; the main server
//!    measures enqueue-to-delivery time from a timestamp in each payload (p50, p99).
//!
//! With `--repeat N` the drain runs N times (a fresh worker each time) and each figure is the
//! median; with `--paired` and a failing share, a clean drain against a second main server
//! precedes each failing one, and the ratio of their rates is reported per pair. Runs on this
//! kind of machine differ by a third from one minute to the next (the hypervisor's steal is
//! printed), so pairs compare like with like.
//!
//! Linux only: it reads /proc.
//!
//! `run` reads as those steps. Beside it: `measure` (/proc, wait4, the clock), the rig
//! (`rig`: Redis and the worker; `main_server`: the main server and the network in front of
//! it; `baseline`: `ab -k`), and `report`, which prints.

mod baseline;
mod main_server;
mod measure;
mod report;
mod rig;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use redis::AsyncCommands;

use tokio::process::Child;

use self::baseline::{baseline, Baseline};
use self::main_server::{MainServers, Network};
use self::measure::{cpu_time, micros_now, wait_delivered};
use self::report::Report;
use self::rig::{stop, Drain, Redis, Rig};
use crate::devtools::harness::Pki;

/// What to measure.
#[derive(Debug, Clone)]
pub(crate) struct BenchOptions {
    /// Messages each drain delivers.
    pub messages: usize,
    /// The worker's WORKER_CONCURRENCY (and `ab -c` for the baseline).
    pub concurrency: usize,
    /// The worker's WORKER_BATCH_SIZE.
    pub batch_size: usize,
    /// Approximate size of each queued message in bytes.
    pub message_bytes: usize,
    /// Share of delivery attempts the main server answers 503.
    pub fail_share: f64,
    /// Messages per second in the latency phase (0 skips it).
    pub latency_rate: usize,
    /// How long the latency phase enqueues.
    pub latency_seconds: u64,
    /// How long the idle phase measures the worker with its queue empty.
    pub idle_seconds: u64,
    /// The worker offers HTTP/2 (MAIN_SERVER_HTTP2), which the main server takes.
    pub http2: bool,
    /// Drains to run; figures are the median.
    pub repeat: usize,
    /// With a failing share: before each failing drain, a clean one, and the ratio of their
    /// first-90% rates.
    pub paired: bool,
    /// Run against a local 3-master Redis Cluster with 3 queues (round-robin) instead of one
    /// Redis with one queue.
    pub cluster: bool,
    /// Drain into this main server instead of the reference one.
    pub main_server: Option<External>,
    /// Before each drain, measure the main server with `ab -k` at the same concurrency.
    pub baseline: bool,
    /// Put the reference main server this far away (round trip).
    pub rtt: Option<Duration>,
}

/// A main server the bench did not start (nginx, say), and the files to reach it with.
#[derive(Debug, Clone)]
pub(crate) struct External {
    /// Its https:// URL.
    pub url: String,
    /// The CA that signed its certificate.
    pub ca: PathBuf,
    /// The client certificate the worker and `ab` present.
    pub cert: PathBuf,
    /// That certificate's private key.
    pub key: PathBuf,
}

/// Runs the benchmark and prints its figures.
pub(crate) async fn run(options: BenchOptions) -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("courier bench reads /proc and runs on Linux only");
    }
    let exe = std::env::current_exe().context("cannot find the courier binary")?;
    let work = tempfile::tempdir()?;
    let pki = Pki::write(work.path(), "worker")?;
    let redis = Redis::start(work.path(), options.cluster).await?;
    let network = Network::new(options.rtt);
    let servers = MainServers::start(&options, &exe, &pki, &network).await?;
    let mut rig = Rig::new(exe, work, &redis).await?;

    let Rounds {
        drains,
        baselines,
        enqueue_rate,
        item_bytes,
        worker,
    } = drain_rounds(&mut rig, &options, &servers).await?;
    let idle_cpu = idle_cpu(&worker, rig.ticks, options.idle_seconds).await?;
    // Only the reference main server reads the payloads' timestamps.
    let latency_rate = if servers.measures_latency() {
        options.latency_rate
    } else {
        0
    };
    if latency_rate > 0 {
        let drained = options.messages as u64;
        latency_phase(&mut rig, latency_rate, options.latency_seconds, drained).await?;
    }
    stop(worker).await?;

    let main_server_cpu = servers.server.pid.is_some();
    let latency = servers.stop().await?;
    drop(redis);
    report::print(&Report {
        options: &options,
        network: &network,
        enqueue_rate,
        item_bytes,
        drains: &drains,
        baselines: &baselines,
        main_server_cpu,
        idle_cpu,
        latency_rate,
        latency: latency.as_deref(),
    });
    Ok(())
}

/// What the rounds of drains left behind.
struct Rounds {
    /// Every drain's figures, in order (with --paired, clean and failing in turn).
    drains: Vec<Drain>,
    /// One `ab -k` run before each round, with --baseline.
    baselines: Vec<Baseline>,
    /// The rate of the last fill, and the size of one item it queued.
    enqueue_rate: f64,
    item_bytes: usize,
    /// The worker of the last drain, still running.
    worker: Child,
}

/// `--repeat` rounds, each: the baseline (with --baseline), a clean drain (with --paired),
/// then the measured drain, each into a queue filled for it and by a fresh worker.
async fn drain_rounds(rig: &mut Rig, options: &BenchOptions, servers: &MainServers) -> anyhow::Result<Rounds> {
    let repeat = options.repeat.max(1);
    let mut drains = Vec::new();
    let (mut enqueue_rate, mut item_bytes) = (0.0, 0);
    let mut last = None;
    let mut baselines = Vec::new();
    for round in 0..repeat {
        if options.baseline {
            baselines.push(baseline(options, &servers.server, rig.work.path()).await?);
        }
        if let Some(clean) = &servers.clean_server {
            rig.fill(options.messages, options.message_bytes).await?;
            let (figures, worker) = rig.drain(options, clean, false).await?;
            stop(worker).await?;
            drains.push(figures);
        }
        (enqueue_rate, item_bytes) = rig.fill(options.messages, options.message_bytes).await?;
        let (figures, worker) = rig.drain(options, &servers.server, options.fail_share > 0.0).await?;
        drains.push(figures);
        if round + 1 == repeat {
            last = Some(worker);
        } else {
            stop(worker).await?;
        }
    }
    Ok(Rounds {
        drains,
        baselines,
        enqueue_rate,
        item_bytes,
        worker: last.context("no drain ran")?,
    })
}

/// The CPU time the worker uses over `seconds` with its queue empty.
async fn idle_cpu(worker: &Child, ticks: f64, seconds: u64) -> anyhow::Result<Duration> {
    let pid = worker.id().context("worker gone")?;
    let idle_from = cpu_time(pid, ticks)?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    Ok(cpu_time(pid, ticks)? - idle_from)
}

/// Enqueues `rate` messages a second for `seconds` while the worker runs, each with its
/// enqueue time for the reference main server to measure; waits until the worker has
/// delivered them too (after the `drained` ones).
async fn latency_phase(rig: &mut Rig, rate: usize, seconds: u64, drained: u64) -> anyhow::Result<()> {
    let mut latency_sent = 0u64;
    // Every millisecond, the messages due by then: a steady stream, as producers make,
    // rather than bursts (20 at once every 10 ms made the burst's tail the p99).
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    // Exactly rate × seconds messages: stopping at a deadline instead would leave out the
    // ones due in its last tick.
    let rate = u64::try_from(rate).unwrap_or(u64::MAX);
    let total = rate.saturating_mul(seconds);
    while latency_sent < total {
        ticker.tick().await;
        let due = started.elapsed().as_micros().saturating_mul(u128::from(rate)) / 1_000_000;
        let due = u64::try_from(due).unwrap_or(u64::MAX).min(total);
        if due <= latency_sent {
            continue;
        }
        let items: Vec<String> = (latency_sent..due)
            .map(|i| format!(r#"{{"message_id":"lat-{i}","payload":{{"t":{}}}}}"#, micros_now()))
            .collect();
        let queue = &rig.queues[latency_sent as usize % rig.queues.len()];
        let _: () = rig.conn.lpush(queue, items).await?;
        latency_sent = due;
    }
    wait_delivered(rig.metrics_port, drained + latency_sent, Duration::from_secs(120)).await
}
