//! The rig a benchmark runs on: the reference main server (`SinkProcess`) and the network in
//! front of it, the main server a drain delivers to (`Server`), Redis and the worker
//! (`Rig`, whose `drain` measures one run), and the `ab -k` baseline against the same server.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use redis::AsyncCommands;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::measure::{
    cpu_time, cpu_times, machine_ticks, micros_now, peak_rss, syscalls, wait_delivered, wait_with_usage,
};
use super::BenchOptions;
use crate::devtools::harness::{free_port, Pki};

/// The main server a drain delivers to.
pub(super) struct Server {
    pub(super) url: String,
    /// Its process, when the bench started it: its CPU time is counted.
    pub(super) pid: Option<u32>,
    pub(super) ca: PathBuf,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

/// The queues of a cluster run: three, spread over the masters by their names' slots.
pub(super) const CLUSTER_QUEUES: [&str; 3] = ["bench.0", "bench.1", "bench.2"];

pub(super) fn signal(child: &Child, name: &str) -> anyhow::Result<()> {
    let pid = child.id().context("process already gone")?;
    std::process::Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()?;
    Ok(())
}

/// A reference main server process.
pub(super) struct SinkProcess {
    pub(super) child: Child,
    pub(super) lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// Where the worker reaches it.
    pub(super) url: String,
}

/// What lies between the worker and the reference main server.
pub(super) enum Network {
    Loopback,
    /// A network namespace behind a veth pair with netem delay.
    Netem(crate::devtools::netem::Namespace, Duration),
    /// A delay proxy in this process, where netem could not be set up.
    Proxy(Duration),
}

impl Network {
    /// Netem when it can be set up, else the delay proxy (saying why); loopback without `rtt`.
    pub(super) fn new(rtt: Option<Duration>) -> Network {
        let Some(rtt) = rtt else {
            return Network::Loopback;
        };
        match crate::devtools::netem::Namespace::create(rtt) {
            Ok(namespace) => Network::Netem(namespace, rtt),
            Err(e) => {
                println!("netem is not available here ({e:#}); using a delay proxy instead");
                Network::Proxy(rtt)
            }
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Network::Loopback => "loopback".to_string(),
            Network::Netem(_, rtt) => format!("{:.1} ms round trip (netem)", rtt.as_secs_f64() * 1000.0),
            Network::Proxy(rtt) => format!("{:.1} ms round trip (delay proxy)", rtt.as_secs_f64() * 1000.0),
        }
    }

    pub(super) fn rtt(&self) -> Option<Duration> {
        match self {
            Network::Loopback => None,
            Network::Netem(_, rtt) | Network::Proxy(rtt) => Some(*rtt),
        }
    }
}

pub(super) async fn start_sink(
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
            (command, crate::devtools::netem::SERVER_IP)
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
            let proxy = crate::devtools::netem::delay_proxy(([127, 0, 0, 1], port).into(), *rtt).await?;
            format!("https://localhost:{proxy}")
        }
    };
    Ok(SinkProcess { child, lines, url })
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
    pub(super) exe: std::path::PathBuf,
    pub(super) work: tempfile::TempDir,
    /// The worker's Redis settings beyond the defaults (where Redis is, which queues).
    pub(super) redis_env: Vec<(&'static str, String)>,
    /// The redis-server processes, whose CPU time counts.
    pub(super) redis_pids: Vec<u32>,
    pub(super) queues: Vec<String>,
    pub(super) conn: crate::queue::Conn,
    pub(super) metrics_port: u16,
    pub(super) ticks: f64,
}

impl Rig {
    /// CPU time of every redis-server together.
    pub(super) fn redis_cpu(&self) -> anyhow::Result<Duration> {
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

/// Stops a worker and waits for it to exit.
pub(super) async fn stop(mut worker: Child) -> anyhow::Result<()> {
    signal(&worker, "TERM")?;
    let _ = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await;
    Ok(())
}

/// What the lean client made of the main server in one run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Baseline {
    pub(super) rate: f64,
    pub(super) cpu_us: f64,
    /// The part of `cpu_us` spent in the kernel.
    pub(super) system_us: f64,
}

/// `ab -k` (apache2-utils) at the worker's concurrency, as many POSTs as the drain has
/// messages, each with a delivery body of the drain's size, over the same mutual TLS; its CPU
/// time comes from wait4's resource usage.
pub(super) async fn baseline(
    options: &BenchOptions,
    server: &Server,
    work: &std::path::Path,
) -> anyhow::Result<Baseline> {
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

/// The path of a program on PATH.
pub(super) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}
