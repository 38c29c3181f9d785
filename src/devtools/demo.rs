//! `courier demo`: the whole pipeline on one machine. A throwaway PKI, the reference main server
//! with mutual TLS, a Redis (the one at REDIS_URL / localhost, or a private redis-server), a
//! few thousand messages of which some fail first, and the real worker. Touches only keys of
//! its own, uniquely named queue, and removes them (and anything it started) at the end.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::devtools::harness::{Pki, RedisServer};
use crate::devtools::sink::{self, Endpoint, Reply, Sink};
use crate::tls::ClientTls;
use crate::worker::Worker;

/// What the demo does.
#[derive(Debug, Clone)]
pub(crate) struct DemoOptions {
    pub messages: usize,
    /// Share of messages whose first two attempts fail with 503.
    pub flaky_share: f64,
    pub concurrency: usize,
    /// Where to look for Redis first; a private redis-server is started when it does not answer.
    pub redis_url: Option<String>,
    pub metrics_port: u16,
}

/// Runs the demo until every message is delivered or dead-lettered, or Ctrl+C.
pub(crate) async fn run(options: DemoOptions) -> anyhow::Result<()> {
    // Listen for Ctrl+C from the start, so an early one still cleans up.
    let interrupted = CancellationToken::new();
    let on_signal = interrupted.clone();
    tokio::spawn(async move {
        crate::shutdown::requested().await;
        on_signal.cancel();
    });
    let work = tempfile::tempdir().context("Failed to make a temporary directory")?;
    let (redis_host, redis_port, own_redis) = find_or_start_redis(options.redis_url.as_deref(), work.path()).await?;
    let queue = format!("courier-demo-{}", std::process::id());
    println!(
        "courier demo: {} messages on queue {queue} at redis {redis_host}:{redis_port}",
        options.messages
    );

    let pki = Pki::write(work.path(), "worker")?;
    let flaky_every = if options.flaky_share > 0.0 {
        (1.0 / options.flaky_share).round().max(1.0) as u64
    } else {
        0
    };
    let behaviour: sink::Behaviour = Arc::new(move |call| {
        let n: u64 = call
            .message_id
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        match call.endpoint {
            Endpoint::Deliver if n % 500 == 499 => Reply::status(422),
            Endpoint::Deliver if flaky_every > 0 && n % flaky_every == 0 && call.attempt <= 2 => Reply::status(503),
            _ => Reply::status(200),
        }
    });
    let sink = Sink::start("127.0.0.1:0".parse()?, &pki.sink_tls(), behaviour).await?;
    println!("reference main server (mTLS): {}", sink.url());

    let vars: HashMap<&str, String> = HashMap::from([
        ("REDIS_HOST", redis_host.clone()),
        ("REDIS_PORT", redis_port.to_string()),
        ("REDIS_QUEUE_NAME", queue.clone()),
        ("MAIN_SERVER_URL", sink.url()),
        ("WORKER_ID", "demo".to_string()),
        ("WORKER_CONCURRENCY", options.concurrency.to_string()),
        ("WORKER_RETRY_INTERVAL", "1".to_string()),
        ("WORKER_CERT_PATH", pki.cert_file.display().to_string()),
        ("WORKER_KEY_PATH", pki.key_file.display().to_string()),
        ("CA_CERT_PATH", pki.ca_file.display().to_string()),
        ("WORKER_METRICS_PORT", options.metrics_port.to_string()),
        ("LOG_FILE_PATH", work.path().join("logs").display().to_string()),
    ]);
    let lookup = |name: &str| vars.get(name).cloned();
    let settings = Settings::load(None, &lookup)?;
    let tls = ClientTls::load(&settings.tls)?;

    let redis = redis::Client::open(format!("redis://{redis_host}:{redis_port}/"))?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let result = drive(&options, &queue, settings, tls, &sink, &mut conn, &interrupted).await;

    // Leave nothing behind: our queue's keys, and the redis-server if we started it.
    let _: Result<(), _> = conn.del(crate::queue::Keys::new(&queue).all("demo")).await;
    if let Some(mut own) = own_redis {
        own.kill().await;
        println!("stopped the private redis-server on port {}", own.port);
    }
    result
}

async fn drive(
    options: &DemoOptions,
    queue: &str,
    settings: Settings,
    tls: ClientTls,
    sink: &Sink,
    conn: &mut redis::aio::MultiplexedConnection,
    interrupt: &CancellationToken,
) -> anyhow::Result<()> {
    let total = options.messages;
    let now = chrono::Utc::now().timestamp();
    let items: Vec<String> = (0..total)
        .map(|i| {
            format!(
                r#"{{"message_id":"demo-{i}","payload":{{"order":{i},"text":"hello from courier"}},"queued_at":{now}}}"#
            )
        })
        .collect();
    for chunk in items.chunks(1000) {
        let _: () = conn.lpush(queue, chunk).await?;
    }

    let shutdown = CancellationToken::new();
    let worker = Worker::start(settings, Some(tls), shutdown.clone()).await?;
    let metrics_url = crate::admin::open(worker.settings(), crate::admin::Served::of(&worker))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {}", e.addr, e.source))?
        .map(|a| format!("http://127.0.0.1:{}/metrics", a.port()));
    if let Some(url) = &metrics_url {
        println!("worker metrics while it runs: {url}");
    }
    let running = tokio::spawn(worker.run());
    let started = Instant::now();
    let dead_key = format!("{queue}:dead");
    let retry_key = format!("{queue}:retry");

    // A live line on a terminal; a plain line every two seconds in a log.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut ticker = tokio::time::interval(Duration::from_millis(if terminal { 250 } else { 2000 }));
    let interrupted = loop {
        tokio::select! {
            _ = interrupt.cancelled() => break true,
            _ = ticker.tick() => {}
        }
        let delivered = sink.record.delivered().len();
        let (retrying, dead): (usize, usize) = redis::pipe()
            .zcard(&retry_key)
            .llen(&dead_key)
            .query_async(conn)
            .await?;
        let rate = delivered as f64 / started.elapsed().as_secs_f64().max(0.001);
        let done = (delivered + dead) * 30 / total.max(1);
        let bar: String = (0..30).map(|i| if i < done { '#' } else { '.' }).collect();
        let line = format!(
            "  [{bar}] delivered {delivered:>7}/{total}  retrying {retrying:>5}  dead {dead:>4}  \
             {rate:>8.0} msg/s "
        );
        if terminal {
            print!("\r{line}");
            let _ = std::io::stdout().flush();
        } else {
            println!("{line}");
        }
        if delivered + dead >= total {
            break false;
        }
    };
    println!();
    shutdown.cancel();
    running.await??;

    let elapsed = started.elapsed();
    let delivered = sink.record.delivered();
    let unique: std::collections::HashSet<&String> = delivered.iter().collect();
    let dead: usize = conn.llen(&dead_key).await?;
    let attempts = sink.record.deliveries().len();
    println!("\n  {:<28}{:>10}", "messages enqueued", total);
    println!("  {:<28}{:>10}", "delivered", unique.len());
    println!("  {:<28}{:>10}", "dead-lettered (HTTP 422)", dead);
    println!("  {:<28}{:>10}", "delivery attempts", attempts);
    println!("  {:<28}{:>10}", "duplicates", delivered.len() - unique.len());
    println!("  {:<28}{:>10.2}", "seconds", elapsed.as_secs_f64());
    if let Some(url) = metrics_url {
        println!("\n  metrics were served at {url} while the demo ran");
    }
    if interrupted {
        bail!("interrupted; cleaned up");
    }
    Ok(())
}

/// Uses the Redis at `url` (or localhost:6379) when it answers PING, else starts a private
/// redis-server on a free port in `dir`.
async fn find_or_start_redis(url: Option<&str>, dir: &Path) -> anyhow::Result<(String, u16, Option<RedisServer>)> {
    let url = url.unwrap_or("redis://127.0.0.1:6379/");
    if let Ok(client) = redis::Client::open(url) {
        let ping = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), ping).await {
            if let redis::ConnectionAddr::Tcp(host, port) = client.get_connection_info().addr() {
                return Ok((host.clone(), *port, None));
            }
        }
    }
    let own = RedisServer::start(dir, &["--appendonly", "no"]).await.context(
        "No Redis answered and none could be started; \
         install redis-server or set REDIS_URL",
    )?;
    let port = own.port;
    println!("no Redis answered at {url}; started a private redis-server on port {port}");
    Ok(("127.0.0.1".into(), port, Some(own)))
}
