//! Operator commands that read or change the queue: `enqueue`, `stats` and `dlq`. They print
//! for people (or JSON with `--json`) and go through `queue.rs` for every key.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use base64::{engine::general_purpose::STANDARD as BASE64, Engine};

use crate::config::RedisSettings;
use crate::message::{parse_dead_letter, DeadRecord, Envelope};
use crate::queue::{self, Keys};

/// Connects for a one-shot command, with an error that says where and what to check.
pub async fn connect(settings: &RedisSettings) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    queue::connect_once(settings).await.map_err(|e| {
        if e.is_auth() {
            anyhow::anyhow!(
                "Redis at {}:{} refused the password ({e}); check REDIS_PASSWORD",
                settings.host,
                settings.port
            )
        } else {
            anyhow::anyhow!(
                "cannot reach Redis at {}:{} ({e}); is it running? check REDIS_HOST and REDIS_PORT",
                settings.host,
                settings.port
            )
        }
    })
}

/// `courier enqueue`: one message with `id`, or `count` generated ones named `prefix-N`.
pub async fn enqueue(
    settings: &RedisSettings,
    id: Option<String>,
    count: Option<usize>,
    prefix: &str,
    payload: Option<&str>,
) -> anyhow::Result<usize> {
    let payload = match payload {
        Some(text) => Some(serde_json::from_str::<serde_json::Value>(text).with_context(|| {
            format!("--payload is not valid JSON: {text:?}; quote it for the shell, e.g. --payload '{{\"k\":1}}'")
        })?),
        None => None,
    };
    let ids: Vec<String> = match (id, count) {
        (Some(id), None) => vec![id],
        (None, Some(n)) => (0..n).map(|i| format!("{prefix}-{i}")).collect(),
        _ => bail!("give either --id ID or --count N"),
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let items: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            let mut message = serde_json::json!({"message_id": id, "queued_at": now});
            if let Some(payload) = &payload {
                message["payload"] = payload.clone();
            }
            message.to_string().into_bytes()
        })
        .collect();
    let mut conn = connect(settings).await?;
    Ok(queue::enqueue(&mut conn, &Keys::new(&settings.queue_name), &items).await?)
}

/// `courier stats`: the queue at a glance, as JSON.
pub async fn stats(settings: &RedisSettings) -> anyhow::Result<serde_json::Value> {
    let mut conn = connect(settings).await?;
    let keys = Keys::new(&settings.queue_name);
    let snapshot = queue::snapshot(&mut conn, &keys, 100_000).await?;
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for record in &snapshot.dead {
        let reason = parse_dead_letter(record).fields["reason"]
            .as_str()
            .map_or_else(|| "unknown".to_string(), str::to_string);
        *by_reason.entry(reason).or_default() += 1;
    }
    let oldest_age = snapshot.oldest_ready.as_ref().and_then(|raw| {
        let envelope = Envelope::parse(raw.clone(), usize::MAX).ok()?;
        envelope.waited(SystemTime::now()).map(|d| d.as_secs_f64())
    });
    Ok(serde_json::json!({
        "queue": settings.queue_name,
        "ready": snapshot.ready,
        "oldest_ready_age_seconds": oldest_age,
        "processing": snapshot.processing.iter().map(|(w, n)| (w.clone(), *n)).collect::<BTreeMap<_, _>>(),
        "retry": snapshot.retry,
        "next_retry_in_seconds": snapshot.next_retry_in_ms.map(|ms| ms as f64 / 1000.0),
        "dead": snapshot.dead_total,
        "dead_by_reason": by_reason,
        "workers": snapshot.workers.iter().map(|(w, age)| serde_json::json!({"worker_id": w, "heartbeat_age_seconds": *age as f64 / 1000.0})).collect::<Vec<_>>(),
    }))
}

/// The human form of `stats`.
pub fn render_stats(stats: &serde_json::Value) -> String {
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

/// Text from Redis or the main server made safe for a terminal: control characters (escape
/// sequences among them) shown escaped as `\u{1b}`, `\n` and so on, and at most `max`
/// characters, with `...` when cut. Cuts between characters, never inside one.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max.saturating_mul(4)));
    let mut shown = 0usize;
    for c in text.chars() {
        let piece: String = if c.is_control() {
            c.escape_debug().collect()
        } else {
            c.to_string()
        };
        let width = piece.chars().count();
        if shown + width > max {
            let keep = max.saturating_sub(3);
            while out.chars().count() > keep {
                out.pop();
            }
            out.push_str("...");
            return out;
        }
        shown += width;
        out.push_str(&piece);
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

/// One dead letter, decoded.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The record exactly as stored (needed to remove it).
    pub record: Vec<u8>,
    pub fields: serde_json::Value,
    /// The original queue item.
    pub message: Vec<u8>,
}

impl DeadLetter {
    fn parse(record: Vec<u8>) -> DeadLetter {
        let DeadRecord { fields, message } = parse_dead_letter(&record);
        DeadLetter {
            record,
            fields,
            message,
        }
    }

    /// The record as one JSON object for `--json` and `dlq show`: the header fields and the
    /// original item as `message` (or `message_base64` when it is not UTF-8). JSON escapes
    /// every control character, so this is safe to print.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = match &self.fields {
            serde_json::Value::Object(fields) => serde_json::Value::Object(fields.clone()),
            _ => serde_json::json!({}),
        };
        match std::str::from_utf8(&self.message) {
            Ok(text) => json["message"] = text.into(),
            Err(_) => json["message_base64"] = BASE64.encode(&self.message).into(),
        }
        json
    }

    pub fn message_id(&self) -> Option<&str> {
        self.fields["message_id"].as_str()
    }

    /// The message as it goes back to the queue: `attempt_count` reset to 0 when it is a valid
    /// message that has failed attempts, otherwise the original bytes unchanged.
    pub fn requeued(&self) -> Vec<u8> {
        match Envelope::parse(self.message.clone(), usize::MAX) {
            Ok(envelope) if envelope.attempt_count() > 0 => envelope.with_attempt_count(0),
            _ => self.message.clone(),
        }
    }
}

/// Every dead letter, newest first.
pub async fn dead_letters(settings: &RedisSettings) -> anyhow::Result<Vec<DeadLetter>> {
    let mut conn = connect(settings).await?;
    let records = queue::dead_letters(&mut conn, &Keys::new(&settings.queue_name)).await?;
    Ok(records.into_iter().map(DeadLetter::parse).collect())
}

/// Requeues the dead letters with these message ids (all of them when `ids` is empty and
/// `all`), oldest first so they keep their order. Each moves atomically; an interrupted run
/// leaves every record either still dead or back in the queue. Returns (requeued, not found).
pub async fn requeue(settings: &RedisSettings, ids: &[String], all: bool) -> anyhow::Result<(usize, Vec<String>)> {
    let letters = dead_letters(settings).await?;
    let mut conn = connect(settings).await?;
    let keys = Keys::new(&settings.queue_name);
    let mut moved = 0;
    let mut found = std::collections::HashSet::new();
    for letter in letters.iter().rev() {
        let wanted = all || letter.message_id().is_some_and(|id| ids.iter().any(|w| w == id));
        if !wanted {
            continue;
        }
        if queue::requeue_dead(&mut conn, &keys, &letter.record, &letter.requeued()).await? {
            moved += 1;
            if let Some(id) = letter.message_id() {
                found.insert(id.to_string());
            }
        }
    }
    let missing = ids.iter().filter(|id| !found.contains(*id)).cloned().collect();
    Ok((moved, missing))
}

/// Deletes every dead letter.
pub async fn purge(settings: &RedisSettings) -> anyhow::Result<u64> {
    let mut conn = connect(settings).await?;
    Ok(queue::purge_dead(&mut conn, &Keys::new(&settings.queue_name)).await?)
}

/// Waits between `stats --watch` refreshes.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_control_characters_and_cuts_between_characters() {
        assert_eq!(printable("plain", 10), "plain");
        assert_eq!(printable("a\x1b[31mred\x07", 40), "a\\u{1b}[31mred\\u{7}");
        assert_eq!(printable("line\nnext", 40), "line\\nnext");
        // A multi-byte character straddling the cut: the old byte truncation panicked here.
        let text = format!("{}é{}", "x".repeat(76), "y".repeat(10));
        let cut = printable(&text, 80);
        assert_eq!(cut.chars().count(), 80);
        assert!(cut.ends_with("..."));
        assert_eq!(printable(&"é".repeat(100), 10), format!("{}...", "é".repeat(7)));
    }
}
