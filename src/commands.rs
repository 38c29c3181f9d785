//! Glue between the command line and the library for the operator commands.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};

use courier::config::Settings;
use courier::ops::printable;
use courier::pki::{write_private, write_replacing, Authority, Validity};
use courier::sink::{Endpoint, Reply, Sink, SinkTls};

use crate::{oneshot, settings, CertsCommand, DlqCommand};

/// Writes a file, refusing to overwrite unless `force`.
fn write_new(path: &Path, text: &str, private: bool, force: bool) -> anyhow::Result<()> {
    // symlink_metadata: a symlink counts as existing, even one that points nowhere.
    if std::fs::symlink_metadata(path).is_ok() && !force {
        bail!("{} exists; pass --force to overwrite it", path.display());
    }
    if private {
        write_private(path, text)
    } else {
        write_replacing(path, text.as_bytes(), 0o644)
    }
    .with_context(|| format!("Failed to write {}", path.display()))?;
    println!("wrote {}{}", path.display(), if private { " (mode 0600)" } else { "" });
    Ok(())
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// `courier certs init|issue`.
pub fn certs(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init { out, name, force } => {
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let ca = Authority::new(&name).context("Failed to make the CA")?;
            write_new(&out.join("ca.crt"), &ca.cert_pem, false, force)?;
            write_new(&out.join("ca.key"), &ca.key_pem, true, force)?;
            println!("keep ca.key offline; give ca.crt to workers (CA_CERT_PATH) and to the main server");
            Ok(())
        }
        CertsCommand::Issue {
            ca,
            server,
            client,
            out,
            days,
            force,
        } => {
            let authority = Authority::from_pem(
                &read(&ca.join("ca.crt"), "CA certificate")?,
                &read(&ca.join("ca.key"), "CA key")?,
            )
            .context("the files in --ca are not a CA certificate and its key")?;
            let validity = Validity {
                starts_ago: 3600,
                lasts: Duration::from_secs(days.saturating_mul(86_400)),
            };
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let (name, issued) = match client {
                Some(name) => {
                    if name.is_empty() || name.contains(['/', '\\']) {
                        bail!("--client {name:?}: give a plain name such as worker-1");
                    }
                    let issued = authority
                        .issue_client(&name, validity)
                        .context("Failed to issue the client certificate")?;
                    (name, issued)
                }
                None => {
                    let names: Vec<&str> = server.iter().map(String::as_str).filter(|n| !n.is_empty()).collect();
                    if names.is_empty() {
                        bail!("--server needs at least one DNS name or IP address");
                    }
                    let issued = authority
                        .issue_server(&names, validity)
                        .with_context(|| format!("Failed to issue a server certificate for {names:?}"))?;
                    ("server".to_string(), issued)
                }
            };
            write_new(&out.join(format!("{name}.crt")), &issued.cert_pem, false, force)?;
            write_new(&out.join(format!("{name}.key")), &issued.key_pem, true, force)?;
            Ok(())
        }
    }
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
pub struct SinkArgs {
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
pub async fn sink(args: SinkArgs) -> anyhow::Result<()> {
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
    let behaviour: courier::sink::Behaviour = Arc::new(move |call| {
        let status = match call.endpoint {
            Endpoint::Deliver if call.attempt <= fail_first || in_share(&call.message_id, call.attempt, fail_share) => {
                503
            }
            _ => 200,
        };
        if report_latency && status == 200 {
            if let Some(sent) = call.body["payload"]["t"].as_u64() {
                let now = chrono::Utc::now().timestamp_micros() as u64;
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(now.saturating_sub(sent));
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
    let sink = Sink::start_with(listen, &tls, behaviour, false)
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "courier sink listening on https://{} (client certificates required); Ctrl+C stops",
        sink.addr
    );
    courier::shutdown::requested().await;
    if report_latency {
        let mut all = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
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

/// `courier stats`, once or every two seconds.
pub async fn stats(settings: Settings, json: bool, watch: bool) -> anyhow::Result<()> {
    loop {
        let stats = courier::ops::stats(&settings.redis).await?;
        if json {
            println!("{stats}");
        } else {
            if watch {
                // Clear the screen and go home, like `watch`.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", courier::ops::render_stats(&stats));
        }
        if !watch {
            return Ok(());
        }
        tokio::select! {
            _ = courier::shutdown::requested() => return Ok(()),
            _ = tokio::time::sleep(courier::ops::WATCH_EVERY) => {}
        }
    }
}

/// `courier dlq ...`.
pub fn dlq(command: DlqCommand) -> ExitCode {
    match command {
        DlqCommand::List { config, limit, json } => match settings(config) {
            Ok(settings) => oneshot(async move {
                let letters = courier::ops::dead_letters(&settings.redis).await?;
                if !json {
                    println!(
                        "{} dead letter(s) on {}:dead, newest first",
                        letters.len(),
                        settings.redis.queue_name
                    );
                }
                for letter in letters.iter().take(limit) {
                    if json {
                        println!("{}", letter.to_json());
                        continue;
                    }
                    // Everything here came from a queue item or the main server: escaped and
                    // cut by characters before it reaches the terminal.
                    let f = &letter.fields;
                    let field = |name: &str, max: usize| printable(f[name].as_str().unwrap_or(""), max);
                    println!(
                        "{:<24} {:<20} {:<25} {}",
                        printable(letter.message_id().unwrap_or("(no message_id)"), 64),
                        field("reason", 32),
                        field("dead_at", 32),
                        field("error", 80),
                    );
                }
                Ok(())
            }),
            Err(code) => code,
        },
        DlqCommand::Show { config, id } => match settings(config) {
            Ok(settings) => oneshot(async move {
                let letters = courier::ops::dead_letters(&settings.redis).await?;
                let matching: Vec<_> = letters.iter().filter(|l| l.message_id() == Some(id.as_str())).collect();
                if matching.is_empty() {
                    bail!("no dead letter with message_id {id:?}; `courier dlq list` shows what there is");
                }
                for letter in matching {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&letter.to_json()).unwrap_or_default()
                    );
                }
                Ok(())
            }),
            Err(code) => code,
        },
        DlqCommand::Requeue { config, ids, all } => match settings(config) {
            Ok(settings) => oneshot(async move {
                let (moved, missing) = courier::ops::requeue(&settings.redis, &ids, all).await?;
                println!(
                    "requeued {moved} message(s) onto {} with attempt_count 0",
                    settings.redis.queue_name
                );
                if !missing.is_empty() {
                    bail!("not in the dead-letter list: {}", missing.join(", "));
                }
                Ok(())
            }),
            Err(code) => code,
        },
        DlqCommand::Purge { config, yes } => {
            if !yes {
                eprintln!("courier: purge deletes every dead letter for good; pass --yes to do it");
                return ExitCode::FAILURE;
            }
            match settings(config) {
                Ok(settings) => oneshot(async move {
                    let n = courier::ops::purge(&settings.redis).await?;
                    println!("deleted {n} dead letter(s) from {}:dead", settings.redis.queue_name);
                    Ok(())
                }),
                Err(code) => code,
            }
        }
    }
}
