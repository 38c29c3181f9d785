//! `courier stats`: the queue at a glance, once or every two seconds, for people or as JSON.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::{connect, printable};
use crate::config::{RedisSettings, Settings};
use crate::message::Envelope;
use crate::queue;

/// `dead_by_reason` counts the newest this many dead letters.
const REASONS_OF: u64 = 100_000;

/// Waits between `stats --watch` refreshes.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// `courier stats`: the queue at a glance, as JSON.
async fn stats(settings: &RedisSettings) -> anyhow::Result<serde_json::Value> {
    let (mut conn, keys) = connect(settings).await?;
    let snapshot = queue::snapshot(&mut conn, &keys).await?;
    // The newest REASONS_OF dead letters, read in pages of headers; `dlq stats` counts them all.
    let by_reason = crate::dlq::reasons(&mut conn, &keys, REASONS_OF).await?;
    let oldest_age = snapshot.oldest_ready.as_ref().and_then(|raw| {
        let envelope = Envelope::parse(raw.clone(), usize::MAX).ok()?;
        envelope.waited(SystemTime::now()).map(|d| d.as_secs_f64())
    });
    Ok(serde_json::json!({
        "queue": keys.name,
        "ready": snapshot.ready,
        "oldest_ready_age_seconds": oldest_age,
        "processing": snapshot.processing.iter().map(|(w, n)| (w.clone(), *n)).collect::<BTreeMap<_, _>>(),
        "retry": snapshot.retry,
        "next_retry_in_seconds": snapshot.next_retry_in_ms.map(|ms| ms as f64 / 1000.0),
        "dead": snapshot.dead_total,
        "dead_by_reason": by_reason,
        "workers": snapshot
            .workers
            .iter()
            .map(|(w, age)| serde_json::json!({
                "worker_id": w,
                "heartbeat_age_seconds": *age as f64 / 1000.0
            }))
            .collect::<Vec<_>>(),
    }))
}

/// The human form of `stats`.
fn render_stats(stats: &serde_json::Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, value: String| out.push_str(&format!("{label:<26}{value}\n"));
    let safe = |v: &serde_json::Value| printable(v.as_str().unwrap_or(""), 64);
    line(&mut out, "queue", safe(&stats["queue"]));
    let age = stats["oldest_ready_age_seconds"]
        .as_f64()
        .map(|a| format!(" (oldest waited {})", human(a)))
        .unwrap_or_default();
    line(&mut out, "ready", format!("{}{age}", stats["ready"]));
    let processing = stats["processing"].as_object().cloned().unwrap_or_default();
    let total: u64 = processing.values().filter_map(|v| v.as_u64()).sum();
    line(&mut out, "processing", total.to_string());
    for (worker, n) in &processing {
        line(&mut out, &format!("  {}", printable(worker, 64)), n.to_string());
    }
    let next = stats["next_retry_in_seconds"]
        .as_f64()
        .map(|s| format!(" (next due in {})", human(s.max(0.0))))
        .unwrap_or_default();
    line(&mut out, "retry", format!("{}{next}", stats["retry"]));
    line(&mut out, "dead", stats["dead"].to_string());
    for (reason, n) in stats["dead_by_reason"].as_object().cloned().unwrap_or_default() {
        line(&mut out, &format!("  {}", printable(&reason, 64)), n.to_string());
    }
    let workers = stats["workers"].as_array().cloned().unwrap_or_default();
    line(&mut out, "workers", workers.len().to_string());
    for w in workers {
        let age = w["heartbeat_age_seconds"].as_f64().unwrap_or(0.0);
        line(
            &mut out,
            &format!("  {}", safe(&w["worker_id"])),
            format!("heartbeat {} ago", human(age)),
        );
    }
    out
}

fn human(seconds: f64) -> String {
    match seconds {
        s if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

/// `courier stats`, once or every two seconds.
pub(super) async fn command(settings: Settings, json: bool, watch: bool) -> anyhow::Result<()> {
    loop {
        let stats = stats(&settings.redis).await?;
        if json {
            println!("{stats}");
        } else {
            if watch {
                // Clear the screen and go home, like `watch`.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render_stats(&stats));
        }
        if !watch {
            return Ok(());
        }
        tokio::select! {
            _ = crate::shutdown::requested() => return Ok(()),
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
    }
}
