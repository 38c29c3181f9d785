//! The rig a benchmark runs on: a private Redis (one server, or a 3-master cluster), and the
//! worker binary started against it for each drain (`Rig::drain` measures one).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::AsyncCommands;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::main_server::Server;
use super::measure::{
    cpu_time, cpu_times, machine_ticks, micros_now, peak_rss, syscalls, ticks_per_second, wait_delivered,
};
use super::BenchOptions;
use crate::devtools::harness::{free_port, Cluster, RedisServer};

/// The queues of a cluster run: three, spread over the masters by their names' slots.
const CLUSTER_QUEUES: [&str; 3] = ["bench.0", "bench.1", "bench.2"];

/// The private Redis of a run, without persistence; it stops when dropped.
pub(super) enum Redis {
    /// One redis-server with one queue.
    One(Box<RedisServer>),
    /// A 3-master cluster with `CLUSTER_QUEUES`, taken round-robin.
    Cluster(Cluster),
}

impl Redis {
    /// Starts a cluster when `cluster`, else one server, in `dir`.
    pub(super) async fn start(dir: &std::path::Path, cluster: bool) -> anyhow::Result<Redis> {
        let args = ["--appendonly", "no"];
        Ok(match cluster {
            false => Redis::One(Box::new(RedisServer::start(dir, &args).await?)),
            true => Redis::Cluster(Cluster::start(dir, 3, &args).await?),
        })
    }

    /// The queues the worker takes from.
    fn queues(&self) -> Vec<String> {
        match self {
            Redis::One(_) => vec!["message_queue".to_string()],
            Redis::Cluster(_) => CLUSTER_QUEUES.iter().map(|q| q.to_string()).collect(),
        }
    }

    /// The worker's Redis settings beyond the defaults (where Redis is, which queues).
    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Redis::One(redis) => vec![
                ("REDIS_HOST", "127.0.0.1".to_string()),
                ("REDIS_PORT", redis.port.to_string()),
            ],
            Redis::Cluster(cluster) => vec![
                ("REDIS_CLUSTER_NODES", cluster.seeds()),
                ("REDIS_QUEUE_NAMES", self.queues().join(",")),
                ("REDIS_QUEUE_ORDER", "round_robin".to_string()),
            ],
        }
    }

    /// The redis-server processes, whose CPU time counts.
    fn pids(&self) -> Vec<u32> {
        match self {
            Redis::One(redis) => redis.pid().into_iter().collect(),
            Redis::Cluster(cluster) => cluster.nodes.iter().filter_map(RedisServer::pid).collect(),
        }
    }
}

/// What one drain measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct Drain {
    /// Whether the main server answered a share 503 in this drain.
    pub(super) failing: bool,
    pub(super) rate: f64,
    pub(super) first_ninety_rate: f64,
    pub(super) seconds: f64,
    pub(super) first_ninety_seconds: f64,
    pub(super) cpu_us: f64,
    /// The part of `cpu_us` spent in the kernel.
    pub(super) system_us: f64,
    pub(super) cpu_seconds: f64,
    pub(super) syscalls: f64,
    pub(super) sink_cpu_us: f64,
    pub(super) redis_cpu_us: f64,
    pub(super) steal: f64,
    pub(super) rss_mb: f64,
}

/// The parts every drain uses.
pub(super) struct Rig {
    exe: PathBuf,
    pub(super) work: TempDir,
    /// The worker's Redis settings beyond the defaults (where Redis is, which queues).
    redis_env: Vec<(&'static str, String)>,
    /// The redis-server processes, whose CPU time counts.
    redis_pids: Vec<u32>,
    pub(super) queues: Vec<String>,
    pub(super) conn: crate::queue::Conn,
    pub(super) metrics_port: u16,
    pub(super) ticks: f64,
}

impl Rig {
    /// The rig for the worker binary `exe`, working in `work`, against `redis`; connects to
    /// Redis for the bench's own enqueues.
    pub(super) async fn new(exe: PathBuf, work: TempDir, redis: &Redis) -> anyhow::Result<Rig> {
        let redis_env = redis.env();
        // The settings the worker reads from that environment, for the bench's own
        // connection, which needs neither TLS files nor a main server.
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
        Ok(Rig {
            exe,
            redis_env,
            redis_pids: redis.pids(),
            queues: redis.queues(),
            conn,
            metrics_port: free_port()?,
            ticks: ticks_per_second(),
            work,
        })
    }

    /// CPU time of every redis-server together.
    fn redis_cpu(&self) -> anyhow::Result<Duration> {
        let mut total = Duration::ZERO;
        for pid in &self.redis_pids {
            total += cpu_time(*pid, self.ticks)?;
        }
        Ok(total)
    }

    /// Enqueues `n` messages of about `bytes` bytes; returns the rate and one item's size.
    pub(super) async fn fill(&mut self, n: usize, bytes: usize) -> anyhow::Result<(f64, usize)> {
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
    pub(super) async fn drain(
        &self,
        options: &BenchOptions,
        server: &Server,
        failing: bool,
    ) -> anyhow::Result<(Drain, Child)> {
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

/// Sends the signal `name` (TERM, INT) to a child process.
pub(super) fn signal(child: &Child, name: &str) -> anyhow::Result<()> {
    let pid = child.id().context("process already gone")?;
    std::process::Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()?;
    Ok(())
}

/// Stops a worker and waits for it to exit.
pub(super) async fn stop(mut worker: Child) -> anyhow::Result<()> {
    signal(&worker, "TERM")?;
    let _ = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await;
    Ok(())
}
