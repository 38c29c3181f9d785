//! `courier bench`: the real worker binary as its own process, against a private redis-server
//! and the reference mTLS main server in a third process. Three phases:
//!
//! 1. drain: N messages enqueued first, then the worker started; messages per second, the
//!    worker's CPU time per message (from /proc) and its peak RSS (VmHWM);
//! 2. idle: the worker's CPU use while the queue is empty;
//! 3. latency: messages enqueued at a steady rate while the worker runs; the main server
//!    measures enqueue-to-delivery time from a timestamp in each payload (p50, p99).
//!
//! Linux only: it reads /proc.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use redis::AsyncCommands;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::demo::{start_redis, throwaway_pki};

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
}

/// CPU time (user + system) a process has used, from /proc/PID/stat.
fn cpu_time(pid: u32, ticks_per_second: f64) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(Duration::from_secs_f64(ticks / ticks_per_second))
}

/// Peak resident set size in bytes (VmHWM).
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kb * 1024)
}

/// Read and write system calls a process has made, from /proc/PID/io.
fn syscalls(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("syscr:").or_else(|| l.strip_prefix("syscw:")))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// Busy and stolen ticks of the whole machine, from the first line of /proc/stat. Steal is time
/// the hypervisor gave this machine's CPUs to someone else; a run with much of it is noise.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let total: u64 = fields.iter().take(8).sum();
    (total, get(7))
}

fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(100.0)
}

fn micros_now() -> u64 {
    chrono::Utc::now().timestamp_micros() as u64
}

/// Reads `worker_messages_delivered_total` from the worker's /metrics.
async fn delivered(client: &reqwest::Client, url: &str) -> Option<u64> {
    let text = client.get(url).send().await.ok()?.text().await.ok()?;
    text.lines()
        .find(|l| l.starts_with("worker_messages_delivered_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Waits until the worker has delivered `target` messages.
async fn wait_delivered(client: &reqwest::Client, url: &str, target: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while delivered(client, url).await.unwrap_or(0) < target {
        if Instant::now() > deadline {
            bail!("the worker did not deliver {target} messages within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn signal(child: &Child, name: &str) -> anyhow::Result<()> {
    let pid = child.id().context("process already gone")?;
    std::process::Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()?;
    Ok(())
}

/// Runs the benchmark and prints its figures.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("courier bench reads /proc and runs on Linux only");
    }
    let exe = std::env::current_exe().context("cannot find the courier binary")?;
    let work = tempfile::tempdir()?;
    let pki = throwaway_pki(work.path())?;
    let redis = start_redis(work.path()).await?;
    let free = || -> anyhow::Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    let (sink_port, metrics_port) = (free()?, free()?);

    let mut sink = Command::new(&exe)
        .args([
            "sink",
            "--quiet",
            "--report-latency",
            "--listen",
            &format!("127.0.0.1:{sink_port}"),
        ])
        .arg("--cert")
        .arg(&pki.server_cert_file)
        .arg("--key")
        .arg(&pki.server_key_file)
        .arg("--client-ca")
        .arg(&pki.ca_file)
        .args(["--fail-share", &options.fail_share.to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the reference main server")?;
    let mut sink_out = BufReader::new(sink.stdout.take().context("sink output")?).lines();
    while let Some(line) = sink_out.next_line().await? {
        if line.contains("listening") {
            break;
        }
    }

    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}/", redis.port))?
        .get_multiplexed_async_connection()
        .await?;
    let pad = "x".repeat(options.message_bytes.saturating_sub(90));
    let started = Instant::now();
    for chunk in (0..options.messages).collect::<Vec<_>>().chunks(10_000) {
        let items: Vec<String> = chunk
            .iter()
            .map(|i| {
                format!(
                    r#"{{"message_id":"bench-{i}","payload":{{"pad":"{pad}"}},"queued_at":{}}}"#,
                    micros_now() / 1_000_000
                )
            })
            .collect();
        let _: () = conn.lpush("message_queue", items).await?;
    }
    let enqueue_time = started.elapsed();
    let first_item: Option<String> = conn.lindex("message_queue", 0).await?;
    let item_bytes = first_item.map_or(0, |i| i.len());

    let mut worker = Command::new(&exe)
        .arg("run")
        .env("REDIS_HOST", "127.0.0.1")
        .env("REDIS_PORT", redis.port.to_string())
        .env("MAIN_SERVER_URL", format!("https://localhost:{sink_port}"))
        .env("WORKER_ID", "bench")
        .env("MAIN_SERVER_HTTP2", options.http2.to_string())
        .env("WORKER_CONCURRENCY", options.concurrency.to_string())
        .env("WORKER_BATCH_SIZE", options.batch_size.to_string())
        .env("WORKER_RETRY_INTERVAL", "1")
        .env("WORKER_METRICS_PORT", metrics_port.to_string())
        .env("WORKER_METRICS_BIND", "127.0.0.1")
        .env("WORKER_CERT_PATH", &pki.cert_file)
        .env("WORKER_KEY_PATH", &pki.key_file)
        .env("CA_CERT_PATH", &pki.ca_file)
        .env("LOG_FILE_PATH", work.path().join("logs"))
        .current_dir(work.path())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the worker")?;
    let pid = worker.id().context("worker exited at once")?;
    let started = Instant::now();
    let ticks = ticks_per_second();
    let (sink_pid, redis_pid) = (sink.id().unwrap_or(0), redis.child.id().unwrap_or(0));
    let (sink_from, redis_from) = (cpu_time(sink_pid, ticks)?, cpu_time(redis_pid, ticks)?);
    let machine_from = machine_ticks();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    crate::tls::install_default_provider();
    let http = reqwest::Client::builder().no_proxy().build()?;
    let n = options.messages as u64;
    // The time to the first 90% is the rate of the messages that did not fail: with a 10%
    // failing share it leaves out the retries' wait, which the full drain includes.
    let ninety = n * 9 / 10;
    wait_delivered(&http, &metrics_url, ninety, Duration::from_secs(1800)).await?;
    let first_ninety = started.elapsed();
    wait_delivered(&http, &metrics_url, n, Duration::from_secs(1800)).await?;
    let drain = started.elapsed();
    let drain_cpu = cpu_time(pid, ticks)?;
    let drain_rss = peak_rss(pid)?;
    let drain_syscalls = syscalls(pid);
    let sink_cpu = cpu_time(sink_pid, ticks)? - sink_from;
    let redis_cpu = cpu_time(redis_pid, ticks)? - redis_from;
    let machine_to = machine_ticks();
    let steal_share = (machine_to.1 - machine_from.1) as f64 / (machine_to.0 - machine_from.0).max(1) as f64;

    let idle_from = cpu_time(pid, ticks)?;
    tokio::time::sleep(Duration::from_secs(options.idle_seconds)).await;
    let idle_cpu = cpu_time(pid, ticks)? - idle_from;

    let mut latency_sent = 0u64;
    if options.latency_rate > 0 {
        let per_tick = (options.latency_rate / 100).max(1);
        let mut ticker = tokio::time::interval(Duration::from_millis(10));
        let until = Instant::now() + Duration::from_secs(options.latency_seconds);
        while Instant::now() < until {
            ticker.tick().await;
            let items: Vec<String> = (0..per_tick)
                .map(|i| {
                    format!(
                        r#"{{"message_id":"lat-{}","payload":{{"t":{}}}}}"#,
                        latency_sent + i as u64,
                        micros_now()
                    )
                })
                .collect();
            let _: () = conn.lpush("message_queue", items).await?;
            latency_sent += per_tick as u64;
        }
        wait_delivered(&http, &metrics_url, n + latency_sent, Duration::from_secs(120)).await?;
    }

    signal(&worker, "TERM")?;
    let _ = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await;
    signal(&sink, "INT")?;
    let mut latency = String::from("not measured");
    while let Ok(Some(line)) = sink_out.next_line().await {
        if let Some(rest) = line.strip_prefix("latency_us ") {
            latency = render_latency(rest);
        }
    }
    let _ = sink.wait().await;
    drop(redis);

    let rate = n as f64 / drain.as_secs_f64();
    println!(
        "courier bench: {} messages of {item_bytes} bytes, concurrency {}, batch {}, {:.0}% answered 503, {}",
        options.messages,
        options.concurrency,
        options.batch_size,
        options.fail_share * 100.0,
        if options.http2 { "HTTP/2" } else { "HTTP/1.1" }
    );
    println!(
        "  {:<22}{:>10.0} msg/s   ({} in {:.2} s)",
        "enqueue (pipelined)",
        n as f64 / enqueue_time.as_secs_f64(),
        n,
        enqueue_time.as_secs_f64()
    );
    println!(
        "  {:<22}{rate:>10.0} msg/s   ({n} delivered in {:.2} s)",
        "drain",
        drain.as_secs_f64()
    );
    println!(
        "  {:<22}{:>10.0} msg/s   (first {ninety} delivered in {:.2} s)",
        "first 90%",
        ninety as f64 / first_ninety.as_secs_f64(),
        first_ninety.as_secs_f64()
    );
    println!(
        "  {:<22}{:>10.1} µs/msg   ({:.2} s user+system)",
        "worker CPU",
        drain_cpu.as_secs_f64() * 1e6 / n as f64,
        drain_cpu.as_secs_f64()
    );
    println!(
        "  {:<22}{:>10.2} per msg (read + write system calls)",
        "worker syscalls",
        drain_syscalls as f64 / n as f64
    );
    println!(
        "  {:<22}{:>10.1} µs/msg   (main server {:.1}, redis-server {:.1})",
        "other CPU",
        (sink_cpu + redis_cpu).as_secs_f64() * 1e6 / n as f64,
        sink_cpu.as_secs_f64() * 1e6 / n as f64,
        redis_cpu.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "  {:<22}{:>10.1} %      (CPU time the hypervisor gave away during the drain)",
        "machine steal",
        steal_share * 100.0
    );
    println!("  {:<22}{:>10.1} MB", "worker peak RSS", drain_rss as f64 / 1_048_576.0);
    println!(
        "  {:<22}{:>10.2} %      (over {} s with the queue empty)",
        "worker idle CPU",
        100.0 * idle_cpu.as_secs_f64() / options.idle_seconds.max(1) as f64,
        options.idle_seconds
    );
    if options.latency_rate > 0 {
        println!(
            "  {:<22}{latency}   ({} msg/s for {} s)",
            "enqueue→delivery", options.latency_rate, options.latency_seconds
        );
    }
    Ok(())
}

/// `n=… p50=… p99=… max=…` in µs, as the sink prints it, in milliseconds.
fn render_latency(fields: &str) -> String {
    let get = |key: &str| -> f64 {
        fields
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    format!(
        "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
        get("p50=") / 1000.0,
        get("p99=") / 1000.0,
        get("max=") / 1000.0,
        get("n=") as u64
    )
}
