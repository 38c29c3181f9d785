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

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use redis::AsyncCommands;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

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

/// The main server a drain delivers to.
struct Server {
    url: String,
    /// Its process, when the bench started it: its CPU time is counted.
    pid: Option<u32>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// The queues of a cluster run: three, spread over the masters by their names' slots.
const CLUSTER_QUEUES: [&str; 3] = ["bench.0", "bench.1", "bench.2"];

/// CPU time (user + system) a process has used, from /proc/PID/stat.
fn cpu_time(pid: u32, ticks_per_second: f64) -> anyhow::Result<Duration> {
    let (user, system) = cpu_times(pid, ticks_per_second)?;
    Ok(user + system)
}

/// The user and the system CPU time a process has used, from /proc/PID/stat.
fn cpu_times(pid: u32, ticks_per_second: f64) -> anyhow::Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let time = |field: usize| {
        let ticks = fields.get(field).and_then(|t| t.parse::<f64>().ok()).unwrap_or(0.0);
        Duration::from_secs_f64(ticks / ticks_per_second)
    };
    Ok((time(11), time(12)))
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

/// Reads `worker_messages_delivered_total` from the worker's /metrics on `port`.
async fn delivered(port: u16) -> Option<u64> {
    let text = admin_get(port, "/metrics").await.ok()?;
    // One series per queue: their sum.
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with("worker_messages_delivered_total{"))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    Some(total as u64)
}

/// A GET on the worker's admin port (plain HTTP on 127.0.0.1), HTTP/1.0 so that the server
/// closes the connection after the answer; returns the answer, head and body.
async fn admin_get(port: u16, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// Waits until the worker has delivered `target` messages.
async fn wait_delivered(port: u16, target: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while delivered(port).await.unwrap_or(0) < target {
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

/// A reference main server process.
struct SinkProcess {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// Where the worker reaches it.
    url: String,
}

/// What lies between the worker and the reference main server.
enum Network {
    Loopback,
    /// A network namespace behind a veth pair with netem delay.
    Netem(super::netem::Namespace, Duration),
    /// A delay proxy in this process, where netem could not be set up.
    Proxy(Duration),
}

impl Network {
    /// Netem when it can be set up, else the delay proxy (saying why); loopback without `rtt`.
    fn new(rtt: Option<Duration>) -> Network {
        let Some(rtt) = rtt else {
            return Network::Loopback;
        };
        match super::netem::Namespace::create(rtt) {
            Ok(namespace) => Network::Netem(namespace, rtt),
            Err(e) => {
                println!("netem is not available here ({e:#}); using a delay proxy instead");
                Network::Proxy(rtt)
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Network::Loopback => "loopback".to_string(),
            Network::Netem(_, rtt) => format!("{:.1} ms round trip (netem)", rtt.as_secs_f64() * 1000.0),
            Network::Proxy(rtt) => format!("{:.1} ms round trip (delay proxy)", rtt.as_secs_f64() * 1000.0),
        }
    }

    fn rtt(&self) -> Option<Duration> {
        match self {
            Network::Loopback => None,
            Network::Netem(_, rtt) | Network::Proxy(rtt) => Some(*rtt),
        }
    }
}

async fn start_sink(
    exe: &std::path::Path,
    pki: &Pki,
    fail_share: f64,
    network: &Network,
) -> anyhow::Result<SinkProcess> {
    let port = free_port()?;
    let (mut command, host) = match network {
        Network::Netem(namespace, _) => {
            let [ip, netns, exec, name] = namespace.exec();
            let mut command = Command::new(ip);
            command.args([netns, exec, name]).arg(exe);
            (command, super::netem::SERVER_IP)
        }
        _ => (Command::new(exe), "127.0.0.1"),
    };
    let mut child = command
        .args([
            "sink",
            "--quiet",
            "--report-latency",
            "--listen",
            &format!("{host}:{port}"),
        ])
        .arg("--cert")
        .arg(&pki.server_cert_file)
        .arg("--key")
        .arg(&pki.server_key_file)
        .arg("--client-ca")
        .arg(&pki.ca_file)
        .args(["--fail-share", &fail_share.to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the reference main server")?;
    let mut lines = BufReader::new(child.stdout.take().context("sink output")?).lines();
    while let Some(line) = lines.next_line().await? {
        if line.contains("listening") {
            break;
        }
    }
    let url = match network {
        Network::Loopback => format!("https://localhost:{port}"),
        Network::Netem(..) => format!("https://{host}:{port}"),
        Network::Proxy(rtt) => {
            let proxy = super::netem::delay_proxy(([127, 0, 0, 1], port).into(), *rtt).await?;
            format!("https://localhost:{proxy}")
        }
    };
    Ok(SinkProcess { child, lines, url })
}

/// What one drain measured.
#[derive(Debug, Clone, Copy)]
struct Drain {
    /// Whether the main server answered a share 503 in this drain.
    failing: bool,
    rate: f64,
    first_ninety_rate: f64,
    seconds: f64,
    first_ninety_seconds: f64,
    cpu_us: f64,
    /// The part of `cpu_us` spent in the kernel.
    system_us: f64,
    cpu_seconds: f64,
    syscalls: f64,
    sink_cpu_us: f64,
    redis_cpu_us: f64,
    steal: f64,
    rss_mb: f64,
}

/// The parts every drain uses.
struct Rig {
    exe: std::path::PathBuf,
    work: tempfile::TempDir,
    /// The worker's Redis settings beyond the defaults (where Redis is, which queues).
    redis_env: Vec<(&'static str, String)>,
    /// The redis-server processes, whose CPU time counts.
    redis_pids: Vec<u32>,
    queues: Vec<String>,
    conn: crate::queue::Conn,
    metrics_port: u16,
    ticks: f64,
}

impl Rig {
    /// CPU time of every redis-server together.
    fn redis_cpu(&self) -> anyhow::Result<Duration> {
        let mut total = Duration::ZERO;
        for pid in &self.redis_pids {
            total += cpu_time(*pid, self.ticks)?;
        }
        Ok(total)
    }

    /// Enqueues `n` messages of about `bytes` bytes; returns the rate and one item's size.
    async fn fill(&mut self, n: usize, bytes: usize) -> anyhow::Result<(f64, usize)> {
        let pad = "x".repeat(bytes.saturating_sub(90));
        let started = Instant::now();
        for (c, chunk) in (0..n).collect::<Vec<_>>().chunks(10_000).enumerate() {
            let items: Vec<String> = chunk
                .iter()
                .map(|i| {
                    format!(
                        r#"{{"message_id":"bench-{i}","payload":{{"pad":"{pad}"}},"queued_at":{}}}"#,
                        micros_now() / 1_000_000
                    )
                })
                .collect();
            let queue = &self.queues[c % self.queues.len()];
            let _: () = self.conn.lpush(queue, items).await?;
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        let first: Option<String> = self.conn.lindex(&self.queues[0], 0).await?;
        Ok((rate, first.map_or(0, |i| i.len())))
    }

    /// Starts a worker against `server` and waits until it has delivered all `n` queued messages.
    /// Returns the figures and the worker, still running.
    async fn drain(&self, options: &BenchOptions, server: &Server, failing: bool) -> anyhow::Result<(Drain, Child)> {
        let worker = Command::new(&self.exe)
            .arg("run")
            .envs(self.redis_env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("MAIN_SERVER_URL", &server.url)
            .env("WORKER_ID", "bench")
            .env("MAIN_SERVER_HTTP2", options.http2.to_string())
            .env("WORKER_CONCURRENCY", options.concurrency.to_string())
            .env("WORKER_BATCH_SIZE", options.batch_size.to_string())
            .env("WORKER_RETRY_INTERVAL", "1")
            .env("WORKER_METRICS_PORT", self.metrics_port.to_string())
            .env("WORKER_METRICS_BIND", "127.0.0.1")
            .env("WORKER_CERT_PATH", &server.cert)
            .env("WORKER_KEY_PATH", &server.key)
            .env("CA_CERT_PATH", &server.ca)
            .env("LOG_FILE_PATH", self.work.path().join("logs"))
            .current_dir(self.work.path())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the worker")?;
        let pid = worker.id().context("worker exited at once")?;
        let started = Instant::now();
        let ticks = self.ticks;
        let server_cpu = || server.pid.map_or(Ok(Duration::ZERO), |pid| cpu_time(pid, ticks));
        let (sink_from, redis_from) = (server_cpu()?, self.redis_cpu()?);
        let machine_from = machine_ticks();
        let n = options.messages as u64;
        // The time to the first 90% is the rate of the messages that did not fail: with a 10%
        // failing share it leaves out the retries' wait, which the full drain includes.
        let ninety = n * 9 / 10;
        wait_delivered(self.metrics_port, ninety, Duration::from_secs(1800)).await?;
        let first_ninety = started.elapsed();
        wait_delivered(self.metrics_port, n, Duration::from_secs(1800)).await?;
        let seconds = started.elapsed().as_secs_f64();
        let (user, system) = cpu_times(pid, ticks)?;
        let cpu = user + system;
        let sink_cpu = server_cpu()? - sink_from;
        let redis_cpu = self.redis_cpu()? - redis_from;
        let machine_to = machine_ticks();
        let per_message = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        let figures = Drain {
            failing,
            rate: n as f64 / seconds,
            first_ninety_rate: ninety as f64 / first_ninety.as_secs_f64(),
            seconds,
            first_ninety_seconds: first_ninety.as_secs_f64(),
            cpu_us: per_message(cpu),
            system_us: per_message(system),
            cpu_seconds: cpu.as_secs_f64(),
            syscalls: syscalls(pid) as f64 / n as f64,
            sink_cpu_us: per_message(sink_cpu),
            redis_cpu_us: per_message(redis_cpu),
            steal: (machine_to.1 - machine_from.1) as f64 / (machine_to.0 - machine_from.0).max(1) as f64,
            rss_mb: peak_rss(pid)? as f64 / 1_048_576.0,
        };
        Ok((figures, worker))
    }
}

/// Stops a worker and waits for it to exit.
async fn stop(mut worker: Child) -> anyhow::Result<()> {
    signal(&worker, "TERM")?;
    let _ = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await;
    Ok(())
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
            let cluster = super::harness::Cluster::start(work.path(), 3, &["--appendonly", "no"]).await?;
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

/// What the lean client made of the main server in one run.
#[derive(Debug, Clone, Copy)]
struct Baseline {
    rate: f64,
    cpu_us: f64,
    /// The part of `cpu_us` spent in the kernel.
    system_us: f64,
}

/// `ab -k` (apache2-utils) at the worker's concurrency, as many POSTs as the drain has
/// messages, each with a delivery body of the drain's size, over the same mutual TLS; its CPU
/// time comes from wait4's resource usage.
async fn baseline(options: &BenchOptions, server: &Server, work: &std::path::Path) -> anyhow::Result<Baseline> {
    if which("ab").is_none() {
        bail!("--baseline needs ab: apt-get install apache2-utils");
    }
    // ab takes the client certificate and key in one file.
    let identity = work.join("ab-identity.pem");
    let mut pem = std::fs::read(&server.cert).with_context(|| format!("cannot read {}", server.cert.display()))?;
    pem.extend(std::fs::read(&server.key).with_context(|| format!("cannot read {}", server.key.display()))?);
    std::fs::write(&identity, pem)?;
    let pad = "x".repeat(options.message_bytes.saturating_sub(90));
    let body = work.join("ab-body.json");
    std::fs::write(
        &body,
        format!(r#"{{"message_id":"bench-0","worker_id":"bench","attempt":1,"payload":{{"pad":"{pad}"}}}}"#),
    )?;
    let output = work.join("ab-output.txt");
    let child = std::process::Command::new("ab")
        .args([
            "-q",
            "-k",
            "-c",
            &options.concurrency.to_string(),
            "-n",
            &options.messages.to_string(),
        ])
        .arg("-E")
        .arg(&identity)
        .arg("-p")
        .arg(&body)
        .args(["-T", "application/json"])
        .arg(format!("{}/internal/messages/deliver", server.url))
        .stdout(std::fs::File::create(&output)?)
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start ab")?;
    let pid = child.id();
    let (status, user, system) = tokio::task::spawn_blocking(move || wait_with_usage(pid)).await??;
    let text = std::fs::read_to_string(&output)?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let rate = field("Requests per second:").filter(|_| status == 0);
    let Some(rate) = rate else {
        bail!("ab failed (exit {status}):\n{text}");
    };
    // ab counts an answer whose length differs from the first as failed ("Length"): a server
    // that puts a time in its answers is not failing.
    let length = text
        .split(", Length: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    let failed = field("Failed requests:").unwrap_or(0.0) - length + field("Non-2xx responses:").unwrap_or(0.0);
    if failed > 0.0 {
        let detail: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("Failed requests") || l.contains("(Connect") || l.contains("Non-2xx"))
            .map(str::trim)
            .collect();
        bail!(
            "ab saw {failed} failed requests ({}); is {} a main server that answers 200?",
            detail.join(" "),
            server.url
        );
    }
    let per_request = |d: Duration| d.as_secs_f64() * 1e6 / options.messages.max(1) as f64;
    Ok(Baseline {
        rate,
        cpu_us: per_request(user + system),
        system_us: per_request(system),
    })
}

/// Waits for a child process and returns its exit status and CPU time, user and system.
#[cfg(unix)]
fn wait_with_usage(pid: u32) -> anyhow::Result<(i32, Duration, Duration)> {
    let pid = libc::pid_t::try_from(pid).context("process id out of range")?;
    let mut status = 0;
    // SAFETY: wait4 writes into the two locals, which outlive the call.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        bail!("cannot wait for process {pid}: {}", std::io::Error::last_os_error());
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok((code, time(usage.ru_utime), time(usage.ru_stime)))
}

#[cfg(not(unix))]
fn wait_with_usage(_pid: u32) -> anyhow::Result<(i32, Duration, Duration)> {
    bail!("--baseline runs on Linux only")
}

/// The path of a program on PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// The baseline's medians and courier's rate as a share of it, per round.
fn print_baseline(options: &BenchOptions, baselines: &[Baseline], drains: &[Drain]) {
    let rate = median(&baselines.iter().map(|b| b.rate).collect::<Vec<_>>());
    let cpu = median(&baselines.iter().map(|b| b.cpu_us).collect::<Vec<_>>());
    let system = median(&baselines.iter().map(|b| b.system_us).collect::<Vec<_>>());
    println!(
        "  {:<22}{rate:>10.0} req/s  (ab -k -c {}, median of {}; {cpu:.1} µs/req CPU, {system:.1} of it in the kernel)",
        "baseline",
        options.concurrency,
        baselines.len()
    );
    let shares: Vec<f64> = baselines.iter().zip(drains).map(|(b, d)| d.rate / b.rate).collect();
    let rendered: Vec<String> = shares.iter().map(|r| format!("{:.2}", r)).collect();
    println!(
        "  {:<22}{:>10.2}        (courier's drain rate / the baseline's, per round: {})",
        "courier vs baseline",
        median(&shares),
        rendered.join(" ")
    );
    // The CPU each spends on a message, compared on the same machine in the same round: the
    // measure that travels between machines, where µs per message do not.
    let costs: Vec<f64> = baselines
        .iter()
        .zip(drains)
        .filter(|(b, _)| b.cpu_us > 0.0)
        .map(|(b, d)| d.cpu_us / b.cpu_us)
        .collect();
    if !costs.is_empty() {
        let rendered: Vec<String> = costs.iter().map(|r| format!("{:.2}", r)).collect();
        println!(
            "  {:<22}{:>10.2} x      (courier's CPU per message / the baseline's per request, per round: {})",
            "CPU vs baseline",
            median(&costs),
            rendered.join(" ")
        );
    }
}

/// One line per drain, for --repeat and --paired.
fn print_rounds(drains: &[Drain]) {
    println!(
        "  {:<8}{:>10}{:>12}{:>10}{:>10}{:>9}",
        "run", "msg/s", "first 90%", "µs/msg", "other", "steal"
    );
    for (i, d) in drains.iter().enumerate() {
        println!(
            "  {:<8}{:>10.0}{:>12.0}{:>10.1}{:>10.1}{:>8.1}%",
            format!("{}{}", i + 1, if d.failing { " 503" } else { "" }),
            d.rate,
            d.first_ninety_rate,
            d.cpu_us,
            d.sink_cpu_us + d.redis_cpu_us,
            d.steal * 100.0
        );
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Each figure's median over the drains.
fn median_drain(drains: &[Drain]) -> Drain {
    let of = |f: fn(&Drain) -> f64| median(&drains.iter().map(f).collect::<Vec<_>>());
    Drain {
        failing: drains.first().is_some_and(|d| d.failing),
        rate: of(|d| d.rate),
        first_ninety_rate: of(|d| d.first_ninety_rate),
        seconds: of(|d| d.seconds),
        first_ninety_seconds: of(|d| d.first_ninety_seconds),
        cpu_us: of(|d| d.cpu_us),
        system_us: of(|d| d.system_us),
        cpu_seconds: of(|d| d.cpu_seconds),
        syscalls: of(|d| d.syscalls),
        sink_cpu_us: of(|d| d.sink_cpu_us),
        redis_cpu_us: of(|d| d.redis_cpu_us),
        steal: of(|d| d.steal),
        rss_mb: of(|d| d.rss_mb),
    }
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
