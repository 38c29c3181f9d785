//! `courier dlq list|show|requeue|purge`: dead letters, read in any shape, printed with
//! control characters escaped, and moved back to the queue one script each.

use std::process::ExitCode;

use anyhow::bail;
use base64::{engine::general_purpose::STANDARD as BASE64, Engine};

use super::{connect, oneshot, settings_for, DlqCommand};
use crate::config::RedisSettings;
use crate::message::{parse_dead_letter, DeadRecord, Envelope};
use crate::queue;

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
    let (mut conn, keys) = connect(settings).await?;
    let records = queue::dead_letters(&mut conn, &keys).await?;
    Ok(records.into_iter().map(DeadLetter::parse).collect())
}

/// Requeues the dead letters with these message ids (all of them when `ids` is empty and
/// `all`), oldest first so they keep their order. Each moves atomically; an interrupted run
/// leaves every record either still dead or back in the queue. Returns (requeued, not found).
pub async fn requeue(settings: &RedisSettings, ids: &[String], all: bool) -> anyhow::Result<(usize, Vec<String>)> {
    let letters = dead_letters(settings).await?;
    let (mut conn, keys) = connect(settings).await?;
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
    let (mut conn, keys) = connect(settings).await?;
    Ok(queue::purge_dead(&mut conn, &keys).await?)
}

/// `courier dlq ...`.
pub(super) fn command(command: DlqCommand) -> ExitCode {
    match command {
        DlqCommand::List {
            config,
            queue,
            limit,
            json,
        } => match settings_for(config, queue) {
            Ok(settings) => oneshot(async move {
                let letters = dead_letters(&settings.redis).await?;
                if !json {
                    println!(
                        "{} dead letter(s) on {}:dead, newest first",
                        letters.len(),
                        settings.redis.first_queue()
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
        DlqCommand::Show { config, queue, id } => match settings_for(config, queue) {
            Ok(settings) => oneshot(async move {
                let letters = dead_letters(&settings.redis).await?;
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
        DlqCommand::Requeue {
            config,
            queue,
            ids,
            all,
        } => match settings_for(config, queue) {
            Ok(settings) => oneshot(async move {
                let (moved, missing) = requeue(&settings.redis, &ids, all).await?;
                println!(
                    "requeued {moved} message(s) onto {} with attempt_count 0",
                    settings.redis.first_queue()
                );
                if !missing.is_empty() {
                    bail!("not in the dead-letter list: {}", missing.join(", "));
                }
                Ok(())
            }),
            Err(code) => code,
        },
        DlqCommand::Purge { config, queue, yes } => {
            if !yes {
                eprintln!("courier: purge deletes every dead letter for good; pass --yes to do it");
                return ExitCode::FAILURE;
            }
            match settings_for(config, queue) {
                Ok(settings) => oneshot(async move {
                    let n = purge(&settings.redis).await?;
                    println!("deleted {n} dead letter(s) from {}:dead", settings.redis.first_queue());
                    Ok(())
                }),
                Err(code) => code,
            }
        }
    }
}
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
