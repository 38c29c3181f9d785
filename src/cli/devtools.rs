//! The developer commands, built with the `devtools` feature: `courier sink` (the reference
//! main server), `courier demo` and `courier bench`.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use super::certs::read;
use super::{oneshot, runtime};
use crate::devtools::sink::{Endpoint, Reply, Sink, SinkTls};

/// Run the whole pipeline locally: throwaway certificates, a reference mTLS main server,
/// Redis (REDIS_URL, localhost, or a private redis-server), and the worker, with some
/// messages failing first. Cleans up after itself, also on Ctrl+C.
///
/// Example: courier demo --messages 5000
#[derive(Debug, clap::Args)]
pub(super) struct DemoArgs {
    /// How many messages to send.
    #[arg(long, default_value_t = 5000)]
    pub messages: usize,
    /// Share of messages whose first two attempts fail with 503.
    #[arg(long, default_value_t = 0.1)]
    pub flaky: f64,
    /// Delivery slots.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// The Redis to use when it answers (its keys are left alone but for the demo's own queue).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Port for /metrics while the demo runs (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub metrics_port: u16,
}

/// Measure throughput, CPU per message, peak RSS, idle CPU and enqueue-to-delivery latency:
/// the real worker as its own process against a private redis-server and the reference
/// mTLS main server in another process. Linux only.
///
/// Example: courier bench --messages 200000 --concurrency 64
#[derive(Debug, clap::Args)]
pub(super) struct BenchArgs {
    /// Messages to drain.
    #[arg(long, default_value_t = 200_000)]
    pub messages: usize,
    /// WORKER_CONCURRENCY for the run.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// WORKER_BATCH_SIZE for the run; without it, the worker's default (half the concurrency,
    /// at least 10).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Approximate bytes per queued message.
    #[arg(long, default_value_t = 200)]
    pub message_bytes: usize,
    /// Share of delivery attempts the main server answers 503 (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub fail_share: f64,
    /// Messages per second in the latency phase (0 skips it).
    #[arg(long, default_value_t = 2000)]
    pub latency_rate: usize,
    /// Seconds the latency phase lasts.
    #[arg(long, default_value_t = 5)]
    pub latency_seconds: u64,
    /// Seconds of idle-CPU measurement with the queue empty.
    #[arg(long, default_value_t = 5)]
    pub idle_seconds: u64,
    /// Run the worker with MAIN_SERVER_HTTP2=true (the main server offers both).
    #[arg(long)]
    http2: bool,
    /// Drain this many times (a fresh worker each time) and report each figure's median.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// With --fail-share: run a clean drain before each failing one and report the ratio
    /// of their first-90% rates, so that both halves of each pair see the same machine.
    #[arg(long)]
    pub paired: bool,
    /// Run against a local 3-master Redis Cluster (started for the run) with 3 queues taken
    /// round-robin, instead of one Redis with one queue.
    #[arg(long)]
    pub cluster: bool,
    /// Drain into this main server (an https:// URL, such as tools/nginx-main-server's)
    /// instead of the reference one; needs --ca, --cert and --key.
    #[arg(long, requires_all = ["ca", "cert", "key"], conflicts_with = "fail_share")]
    pub main_server: Option<String>,
    /// The CA that signed --main-server's certificate.
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// The client certificate the worker (and the baseline client) present.
    #[arg(long)]
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key.
    #[arg(long)]
    pub key: Option<std::path::PathBuf>,
    /// Before each drain, measure the same main server with a lean client at the same
    /// concurrency (`ab -k` from apache2-utils), and report courier's rate as a share of it.
    #[arg(long)]
    pub baseline: bool,
    /// Put the reference main server this many milliseconds of round trip away: in a network
    /// namespace behind a veth pair with tc netem (root), or else behind a delay proxy.
    #[arg(long, conflicts_with = "main_server")]
    pub rtt_ms: Option<f64>,
}

/// `courier demo`.
pub(super) fn demo(args: DemoArgs) -> ExitCode {
    let DemoArgs {
        messages,
        flaky,
        concurrency,
        redis_url,
        metrics_port,
    } = args;
    let options = crate::devtools::demo::DemoOptions {
        messages,
        flaky_share: flaky,
        concurrency: concurrency.max(1),
        redis_url,
        metrics_port,
    };
    let runtime = match runtime(0) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(crate::devtools::demo::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("courier demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `courier bench`.
pub(super) fn bench(args: BenchArgs) -> ExitCode {
    let BenchArgs {
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
        cluster,
        main_server,
        ca,
        cert,
        key,
        baseline,
        rtt_ms,
    } = args;
    let rtt = rtt_ms
        .filter(|ms| ms.is_finite() && *ms > 0.0)
        .map(|ms| std::time::Duration::from_secs_f64(ms.min(10_000.0) / 1000.0));
    let main_server = match (main_server, ca, cert, key) {
        (Some(url), Some(ca), Some(cert), Some(key)) => Some(crate::devtools::bench::External { url, ca, cert, key }),
        _ => None,
    };
    oneshot(crate::devtools::bench::run(crate::devtools::bench::BenchOptions {
        messages,
        concurrency: concurrency.max(1),
        batch_size: batch_size.map_or_else(
            || crate::config::default_batch_size(concurrency.max(1)),
            |size| size.clamp(1, 1000),
        ),
        message_bytes,
        fail_share: fail_share.clamp(0.0, 1.0),
        latency_rate,
        latency_seconds,
        idle_seconds,
        http2,
        repeat: repeat.clamp(1, 100),
        paired,
        cluster,
        main_server,
        baseline,
        rtt,
    }))
}

/// Whether this attempt falls in the failing share, decided by a hash of id and attempt so a
/// run is repeatable.
fn in_share(message_id: &str, attempt: u64, share: f64) -> bool {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (message_id, attempt).hash(&mut hasher);
    (hasher.finish() % 10_000) < (share.clamp(0.0, 1.0) * 10_000.0) as u64
}

/// `courier sink`'s options.
#[derive(Debug, clap::Args)]
pub(super) struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Server certificate (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// Server private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// CA that client certificates must chain to (PEM).
    #[arg(long)]
    pub client_ca: PathBuf,
    /// Share of delivery attempts answered 503 (0 to 1), chosen by a hash of id and attempt.
    #[arg(long, default_value_t = 0.0)]
    pub fail_share: f64,
    /// Answer the first N attempts of every message with 503.
    #[arg(long, default_value_t = 0)]
    pub fail_first: u64,
    /// Wait this many milliseconds before answering.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Offer only HTTP/1.1 in the TLS handshake, like a server without HTTP/2.
    #[arg(long)]
    pub http1_only: bool,
    /// Print nothing per call.
    #[arg(long)]
    pub quiet: bool,
    /// On exit, print enqueue-to-delivery latency percentiles (payloads from `courier bench`).
    #[arg(long)]
    pub report_latency: bool,
}

/// `courier sink`: serves until Ctrl+C.
pub(super) async fn sink(args: SinkArgs) -> anyhow::Result<()> {
    let SinkArgs {
        listen,
        cert,
        key,
        client_ca,
        fail_share,
        fail_first,
        delay_ms,
        http1_only,
        quiet,
        report_latency,
    } = args;
    if !(0.0..=1.0).contains(&fail_share) {
        bail!("--fail-share {fail_share}: give a share from 0 to 1, e.g. 0.1");
    }
    let tls = SinkTls {
        cert_pem: read(&cert, "server certificate")?,
        key_pem: read(&key, "server key")?,
        client_ca_pem: read(&client_ca, "client CA")?,
        http2: !http1_only,
    };
    let delay = Duration::from_millis(delay_ms);
    // Enqueue-to-delivery latencies, from the `t` (epoch microseconds) that `courier bench` puts
    // in each payload.
    let latencies: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let seen = latencies.clone();
    let behaviour: crate::devtools::sink::Behaviour = Arc::new(move |call| {
        let status = match call.endpoint {
            Endpoint::Deliver if call.attempt <= fail_first || in_share(&call.message_id, call.attempt, fail_share) => {
                503
            }
            _ => 200,
        };
        if report_latency && status == 200 {
            if let Some(sent) = call.body["payload"]["t"].as_u64() {
                let now = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
                crate::sync::lock(&seen).push(now.saturating_sub(sent));
            }
        }
        if !quiet {
            let what = match call.endpoint {
                Endpoint::Deliver => format!("POST deliver {} attempt={}", call.message_id, call.attempt),
                Endpoint::Status => format!(
                    "PUT status {} {} attempt_count={}",
                    call.message_id,
                    call.body["status"].as_str().unwrap_or("?"),
                    call.attempt
                ),
            };
            println!(
                "{} {what} client={} -> {status}",
                chrono::Local::now().format("%H:%M:%S%.3f"),
                call.client
            );
        }
        Reply {
            delay,
            ..Reply::status(status)
        }
    });
    let sink = Sink::start_with(listen, &tls, behaviour, false).await?;
    println!(
        "courier sink listening on https://{} (client certificates required); Ctrl+C stops",
        sink.addr
    );
    crate::shutdown::requested().await;
    if report_latency {
        let mut all = crate::sync::lock(&latencies).clone();
        all.sort_unstable();
        let at = |q: f64| {
            all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        println!(
            "latency_us n={} p50={} p99={} max={}",
            all.len(),
            at(0.5),
            at(0.99),
            all.last().copied().unwrap_or(0)
        );
    }
    println!("stopping; {} calls served", sink.record.served());
    Ok(())
}
