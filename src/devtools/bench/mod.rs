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
//! `measure` reads /proc and the clock, `rig` starts what a drain runs on, `report` prints.

mod measure;
mod report;
mod rig;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use redis::AsyncCommands;

use self::measure::{cpu_time, micros_now, ticks_per_second, wait_delivered};
use self::report::{median, median_drain, print_baseline, print_rounds, render_latency};
use self::rig::{baseline, signal, start_sink, stop, Drain, Network, Rig, Server, SinkProcess, CLUSTER_QUEUES};
use crate::devtools::harness::{free_port, Pki, RedisServer};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub messages: usize,
    pub concurrency: usize,
    pub batch_size: usize,
    /// Approximate size of each queued message in bytes.
    pub message_bytes: usize,
    /// Share of delivery attempts the main server answers 503.
    pub fail_share: f64,
    /// Messages per second in the latency phase (0 skips it).
    pub latency_rate: usize,
    pub latency_seconds: u64,
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
pub struct External {
    pub url: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Runs the benchmark and prints its figures.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("courier bench reads /proc and runs on Linux only");
    }
    let exe = std::env::current_exe().context("cannot find the courier binary")?;
    let work = tempfile::tempdir()?;
    let pki = Pki::write(work.path(), "worker")?;
    let (redis, cluster, redis_env, queues) = match options.cluster {
        false => {
            let redis = RedisServer::start(work.path(), &["--appendonly", "no"]).await?;
            let env = vec![
                ("REDIS_HOST", "127.0.0.1".to_string()),
                ("REDIS_PORT", redis.port.to_string()),
            ];
            (Some(redis), None, env, vec!["message_queue".to_string()])
        }
        true => {
            let cluster = crate::devtools::harness::Cluster::start(work.path(), 3, &["--appendonly", "no"]).await?;
            let queues: Vec<String> = CLUSTER_QUEUES.iter().map(|q| q.to_string()).collect();
            let env = vec![
                ("REDIS_CLUSTER_NODES", cluster.seeds()),
                ("REDIS_QUEUE_NAMES", queues.join(",")),
                ("REDIS_QUEUE_ORDER", "round_robin".to_string()),
            ];
            (None, Some(cluster), env, queues)
        }
    };
    let redis_pids: Vec<u32> = match (&redis, &cluster) {
        (Some(redis), _) => redis.pid().into_iter().collect(),
        (_, Some(cluster)) => cluster.nodes.iter().filter_map(RedisServer::pid).collect(),
        _ => Vec::new(),
    };
    let network = Network::new(options.rtt);
    let own = |sink: &SinkProcess| Server {
        url: sink.url.clone(),
        pid: sink.child.id(),
        ca: pki.ca_file.clone(),
        cert: pki.cert_file.clone(),
        key: pki.key_file.clone(),
    };
    let (mut sink, server) = match &options.main_server {
        Some(External { url, ca, cert, key }) => {
            let server = Server {
                url: url.trim_end_matches('/').to_string(),
                pid: None,
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            };
            (None, server)
        }
        None => {
            let sink = start_sink(&exe, &pki, options.fail_share, &network).await?;
            let server = own(&sink);
            (Some(sink), server)
        }
    };
    // With --paired, a clean main server for the clean drain of each pair.
    let clean = match options.paired && options.fail_share > 0.0 {
        true => Some(start_sink(&exe, &pki, 0.0, &network).await?),
        false => None,
    };
    let clean_server = clean.as_ref().map(own);
    let lookup = |name: &str| {
        redis_env
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| (name == "TLS_ENABLED").then(|| "false".to_string()))
            .or_else(|| (name == "MAIN_SERVER_URL").then(|| "http://127.0.0.1:1".to_string()))
    };
    let settings = crate::config::Settings::load(None, &lookup).map_err(|e| anyhow::anyhow!("{e}"))?;
    let conn = crate::queue::Connector::new(&settings.redis)?
        .connect(Duration::from_secs(30))
        .await?;
    crate::tls::install_default_provider();
    let mut rig = Rig {
        exe,
        redis_env,
        redis_pids,
        queues,
        conn,
        metrics_port: free_port()?,
        ticks: ticks_per_second(),
        work,
    };

    let n = options.messages as u64;
    let repeat = options.repeat.max(1);
    let mut drains = Vec::new();
    let (mut enqueue_rate, mut item_bytes) = (0.0, 0);
    let mut last = None;
    let mut baselines = Vec::new();
    for round in 0..repeat {
        if options.baseline {
            baselines.push(baseline(&options, &server, rig.work.path()).await?);
        }
        if let Some(clean) = &clean_server {
            rig.fill(options.messages, options.message_bytes).await?;
            let (figures, worker) = rig.drain(&options, clean, false).await?;
            stop(worker).await?;
            drains.push(figures);
        }
        (enqueue_rate, item_bytes) = rig.fill(options.messages, options.message_bytes).await?;
        let (figures, worker) = rig.drain(&options, &server, options.fail_share > 0.0).await?;
        drains.push(figures);
        if round + 1 == repeat {
            last = Some(worker);
        } else {
            stop(worker).await?;
        }
    }
    let worker = last.context("no drain ran")?;
    let pid = worker.id().context("worker gone")?;

    let idle_from = cpu_time(pid, rig.ticks)?;
    tokio::time::sleep(Duration::from_secs(options.idle_seconds)).await;
    let idle_cpu = cpu_time(pid, rig.ticks)? - idle_from;

    let mut latency_sent = 0u64;
    // Only the reference main server reads the payloads' timestamps.
    let latency_rate = if sink.is_some() { options.latency_rate } else { 0 };
    if latency_rate > 0 {
        // Every millisecond, the messages due by then: a steady stream, as producers make,
        // rather than bursts (20 at once every 10 ms made the burst's tail the p99).
        let mut ticker = tokio::time::interval(Duration::from_millis(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = Instant::now();
        // Exactly rate × seconds messages: stopping at a deadline instead would leave out the
        // ones due in its last tick.
        let rate = u64::try_from(latency_rate).unwrap_or(u64::MAX);
        let total = rate.saturating_mul(options.latency_seconds);
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
        wait_delivered(rig.metrics_port, n + latency_sent, Duration::from_secs(120)).await?;
    }

    stop(worker).await?;
    let mut latency = String::from("not measured");
    if let Some(sink) = &mut sink {
        signal(&sink.child, "INT")?;
        while let Ok(Some(line)) = sink.lines.next_line().await {
            if let Some(rest) = line.strip_prefix("latency_us ") {
                latency = render_latency(rest);
            }
        }
        let _ = sink.child.wait().await;
    }
    drop(clean);
    drop(redis);
    drop(cluster);

    let against = match &options.main_server {
        Some(external) => external.url.clone(),
        None => "the reference main server".to_string(),
    };
    println!(
        "courier bench: {} messages of {item_bytes} bytes into {against} over {}, concurrency {}, batch {}, {:.0}% answered 503, {}, {}",
        options.messages,
        network.describe(),
        options.concurrency,
        options.batch_size,
        options.fail_share * 100.0,
        if options.http2 { "HTTP/2" } else { "HTTP/1.1" },
        if options.cluster {
            "3-master Redis Cluster, 3 queues round-robin"
        } else {
            "one Redis, one queue"
        }
    );
    println!("  {:<22}{enqueue_rate:>10.0} msg/s", "enqueue (pipelined)");
    if drains.len() > 1 {
        print_rounds(&drains);
    }
    let failing: Vec<Drain> = drains
        .iter()
        .copied()
        .filter(|d| d.failing == (options.fail_share > 0.0))
        .collect();
    let d = median_drain(&failing);
    let of = if failing.len() > 1 {
        format!("median of {}, ", failing.len())
    } else {
        String::new()
    };
    println!(
        "  {:<22}{:>10.0} msg/s   ({of}{n} delivered in {:.2} s)",
        "drain", d.rate, d.seconds
    );
    println!(
        "  {:<22}{:>10.0} msg/s   ({of}first {} delivered in {:.2} s)",
        "first 90%",
        d.first_ninety_rate,
        n * 9 / 10,
        d.first_ninety_seconds
    );
    println!(
        "  {:<22}{:>10.1} µs/msg   ({of}{:.2} s user+system; {:.1} µs/msg of it in the kernel)",
        "worker CPU", d.cpu_us, d.cpu_seconds, d.system_us
    );
    println!(
        "  {:<22}{:>10.2} per msg (read + write system calls)",
        "worker syscalls", d.syscalls
    );
    let main_cpu = match server.pid {
        Some(_) => format!("{:.1}", d.sink_cpu_us),
        None => "not measured".to_string(),
    };
    println!(
        "  {:<22}{:>10.1} µs/msg   (main server {main_cpu}, redis-server {:.1}, all nodes)",
        "other CPU",
        d.sink_cpu_us + d.redis_cpu_us,
        d.redis_cpu_us
    );
    println!(
        "  {:<22}{:>10.1} %      (CPU time the hypervisor gave away during the drain)",
        "machine steal",
        d.steal * 100.0
    );
    println!(
        "  {:<22}{:>10.1} MB",
        "worker peak RSS",
        drains.iter().map(|d| d.rss_mb).fold(0.0, f64::max)
    );
    println!(
        "  {:<22}{:>10.2} %      (over {} s with the queue empty)",
        "worker idle CPU",
        100.0 * idle_cpu.as_secs_f64() / options.idle_seconds.max(1) as f64,
        options.idle_seconds
    );
    if latency_rate > 0 {
        println!(
            "  {:<22}{latency}   ({} msg/s for {} s)",
            "enqueue→delivery", latency_rate, options.latency_seconds
        );
    }
    if !baselines.is_empty() {
        print_baseline(&options, &baselines, &failing);
    }
    if let Some(rtt) = network.rtt() {
        // Each request holds one of the worker's slots for at least a round trip.
        let ceiling = options.concurrency as f64 / rtt.as_secs_f64();
        println!(
            "  {:<22}{ceiling:>10.0} msg/s  (concurrency / round trip; the drain reached {:.0}% of it)",
            "ceiling",
            100.0 * d.rate / ceiling
        );
    }
    if options.paired && options.fail_share > 0.0 {
        let ratios: Vec<f64> = drains
            .chunks(2)
            .filter_map(|pair| match pair {
                [clean, failing] => Some(failing.first_ninety_rate / clean.first_ninety_rate),
                _ => None,
            })
            .collect();
        let rendered: Vec<String> = ratios.iter().map(|r| format!("{:.0}%", r * 100.0)).collect();
        println!(
            "  {:<22}{:>10.0} %      (first 90% with failures / clean, per pair: {})",
            "failing vs clean",
            median(&ratios) * 100.0,
            rendered.join(" ")
        );
    }
    Ok(())
}
