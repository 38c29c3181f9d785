//! `courier where <message_id>`: where one message is now, in every queue of the
//! configuration (ready, a worker's processing list, the retry set, the dead-letter list).

use super::{connect_clustered, printable};
use crate::config::RedisSettings;
use crate::queue::{self, Keys, Place};

/// One line per place the message is in, for a person. Everything that came from Redis is
/// escaped and cut before it reaches the terminal.
pub(super) fn describe(queue: &str, place: &Place) -> String {
    let queue = printable(queue, 64);
    match place {
        Place::Ready { position } => {
            format!("{queue}: ready, position {position} (1 is claimed next)")
        }
        Place::Processing { worker_id } => format!(
            "{queue}: processing, claimed by worker {} and not yet settled",
            printable(worker_id, 64)
        ),
        Place::Retry {
            due_in_ms,
            due_at_ms,
            attempt_count,
        } => {
            let at = i64::try_from(*due_at_ms)
                .ok()
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map_or_else(
                    || "the far future".to_string(),
                    |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                );
            let when = if *due_in_ms >= 0 {
                format!("in {:.1} s", *due_in_ms as f64 / 1000.0)
            } else {
                format!(
                    "{:.1} s overdue, next promotion moves it",
                    due_in_ms.unsigned_abs() as f64 / 1000.0
                )
            };
            format!("{queue}: retry due at {at} ({when}), attempt_count {attempt_count}")
        }
        Place::Dead { fields } => {
            let field = |name: &str, max: usize| printable(fields[name].as_str().unwrap_or("?"), max);
            let trace = fields["trace_id"]
                .as_str()
                .map(|t| format!(", trace_id {}", printable(t, 32)))
                .unwrap_or_default();
            format!(
                "{queue}: dead since {}, reason {}{trace}: {}",
                field("dead_at", 32),
                field("reason", 32),
                field("error", 200),
            )
        }
    }
}

/// The places of message `id` in every configured queue, as (queue name, place).
pub(super) async fn locate(settings: &RedisSettings, id: &str) -> anyhow::Result<Vec<(String, Place)>> {
    let (mut conn, clustered) = connect_clustered(settings).await?;
    let mut found = Vec::new();
    for name in &settings.queues {
        let keys = Keys::for_topology(name, clustered);
        for place in queue::locate(&mut conn, &keys, id).await? {
            found.push((name.clone(), place));
        }
    }
    Ok(found)
}
