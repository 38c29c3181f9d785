//! Where one message is now, for `courier where`: every key of a queue read in pages, so a
//! queue of millions is searched in bounded memory. Items are JSON, so a list cannot be asked
//! for an id (LPOS compares whole items): each page is parsed and its ids compared.
//!
//! Lists are read from the head (index 0), where producers push: items claimed from the tail
//! meanwhile do not move the ones not yet read, and pushes only move read ones again, so a
//! message that stays in a list is never skipped (it may be seen twice, and then is reported
//! once). The retry set is read with ZSCAN, which returns every member present throughout.

use redis::AsyncCommands;

use super::time::{score_ms, time_ms};
use super::{Conn, Keys, QueueError};
use crate::message::{parse_dead_letter, Envelope};

/// Items read per round trip.
const PAGE: usize = 256;

/// One place a message was found.
#[derive(Debug, Clone, PartialEq)]
pub enum Place {
    /// Waiting in the queue; position 1 is claimed next.
    Ready { position: u64 },
    /// Claimed by this worker and not yet settled.
    Processing { worker_id: String },
    /// In the retry set: due in `due_in_ms` (negative: overdue, waiting to be moved back),
    /// at `due_at_ms` (ms since the epoch, this machine's reading of Redis's clock), after
    /// `attempt_count` failed attempts.
    Retry {
        due_in_ms: i64,
        due_at_ms: u64,
        attempt_count: u32,
    },
    /// In the dead-letter list, with its header's fields (`reason`, `dead_at`, `error`,
    /// `trace_id`, ...).
    Dead { fields: serde_json::Value },
}

/// Whether a queue item is the message `id`.
fn is(item: &[u8], id: &str) -> Option<Envelope> {
    if id.is_empty() {
        return None;
    }
    // Cheap refusal first: an item holds its id's text unless the id is escaped in it.
    let plain = !id.contains(['"', '\\', '/']) && id.is_ascii();
    if plain && !item.windows(id.len()).any(|w| w == id.as_bytes()) {
        return None;
    }
    Envelope::parse(item.to_vec(), usize::MAX)
        .ok()
        .filter(|e| e.message_id() == id)
}

/// Every place in `keys`'s queue where the message `id` is now.
pub async fn locate(conn: &mut Conn, keys: &Keys, id: &str) -> Result<Vec<Place>, QueueError> {
    let mut found = Vec::new();

    let mut seen_ready = std::collections::HashSet::new();
    scan_list(conn, &keys.ready, |index, len, item| {
        if is(item, id).is_some() && seen_ready.insert(item.to_vec()) {
            // Claims take from the tail: the last item is next.
            found.push(Place::Ready {
                position: len.saturating_sub(index),
            });
        }
    })
    .await?;

    // The processing lists of the workers the queue knows, as `snapshot` finds them.
    let live: Vec<String> = conn.zrange(&keys.workers, 0, -1).await?;
    let owners: Vec<String> = conn.hkeys(&keys.owners).await?;
    let mut workers: Vec<String> = live.into_iter().chain(owners).collect();
    workers.sort();
    workers.dedup();
    for worker_id in workers {
        let mut here = false;
        scan_list(conn, &keys.processing(&worker_id), |_, _, item| {
            here |= is(item, id).is_some();
        })
        .await?;
        if here {
            found.push(Place::Processing { worker_id });
        }
    }

    let ((secs, micros), offset): ((u64, u64), Option<u64>) = redis::pipe()
        .cmd("TIME")
        .hget(&keys.clock, "offset")
        .query_async(conn)
        .await?;
    let now_ms = time_ms((secs, micros));
    // Due times are in the queue's clock, which runs ahead of TIME after TIME stepped back.
    let queue_now = now_ms.saturating_add(offset.unwrap_or(0));
    let mut cursor = 0u64;
    let mut retries = Vec::new();
    loop {
        let (next, page): (u64, Vec<(Vec<u8>, f64)>) = redis::cmd("ZSCAN")
            .arg(&keys.retry)
            .arg(cursor)
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await?;
        for (item, score) in page {
            if let Some(envelope) = is(&item, id) {
                if !retries.contains(&item) {
                    let due = score_ms(score);
                    let due_in_ms = if due >= queue_now {
                        i64::try_from(due - queue_now).unwrap_or(i64::MAX)
                    } else {
                        i64::try_from(queue_now - due).map_or(i64::MIN, |late| -late)
                    };
                    found.push(Place::Retry {
                        due_in_ms,
                        due_at_ms: now_ms.saturating_add_signed(due_in_ms),
                        attempt_count: envelope.attempt_count(),
                    });
                    retries.push(item);
                }
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }

    let mut seen_dead = std::collections::HashSet::new();
    scan_list(conn, &keys.dead, |_, _, record| {
        let letter = parse_dead_letter(record);
        let named = letter.fields["message_id"].as_str() == Some(id) || is(&letter.message, id).is_some();
        if named && seen_dead.insert(record.to_vec()) {
            found.push(Place::Dead { fields: letter.fields });
        }
    })
    .await?;
    Ok(found)
}

/// Calls `each(index, length, item)` for every item of the list `key`, head first, a page per
/// round trip; `length` is the list's length when that page was read.
async fn scan_list(conn: &mut Conn, key: &str, mut each: impl FnMut(u64, u64, &[u8])) -> Result<(), QueueError> {
    let mut start = 0usize;
    loop {
        let stop = start.saturating_add(PAGE - 1);
        let (len, page): (u64, Vec<Vec<u8>>) = redis::pipe()
            .llen(key)
            .lrange(
                key,
                isize::try_from(start).unwrap_or(isize::MAX),
                isize::try_from(stop).unwrap_or(isize::MAX),
            )
            .query_async(conn)
            .await?;
        for (offset, item) in page.iter().enumerate() {
            let index = u64::try_from(start.saturating_add(offset)).unwrap_or(u64::MAX);
            each(index, len, item);
        }
        if page.len() < PAGE {
            return Ok(());
        }
        start = start.saturating_add(PAGE);
    }
}
