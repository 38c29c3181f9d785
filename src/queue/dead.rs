//! The dead-letter list by position, for `courier dlq` and the admin port's `/dlq`: pages read
//! in one script call each, requeue and drop checked against each record's SHA-1 (leaving
//! tombstones), many at once in one pipeline, the tombstones swept, the list purged.

use super::scripts::{self, DLQ_TOMBSTONE};
use super::{Conn, Keys, QueueError};

/// One dead-letter record as `dead_page` reads it.
#[derive(Debug, Clone)]
pub struct DeadSlot {
    /// Its position counted from the tail of the list (1 = the oldest).
    pub position: u64,
    /// Its whole size in bytes.
    pub size: u64,
    /// The record, or its first `cap` bytes.
    pub bytes: Vec<u8>,
    /// Whether it contains the `grep` text.
    pub hit: bool,
    /// Its SHA-1 (hex), when asked for.
    pub sha: String,
}

/// A page of the dead-letter list, from `dead_page`.
#[derive(Debug, Clone, Default)]
pub struct DeadPage {
    /// Where the next page starts (0 or past LLEN: the walk is over).
    pub next: u64,
    /// The chunk size to start the next call with.
    pub chunk: u64,
    /// LLEN when the page was read.
    pub len: u64,
    /// Tombstones (`DLQ_TOMBSTONE`) passed.
    pub tombstones: u64,
    /// Records passed that do not contain the `grep` text.
    pub misses: u64,
    /// The records read that contain it.
    pub slots: Vec<DeadSlot>,
}

/// How `dead_page` reads.
#[derive(Debug, Clone)]
pub struct PageRequest<'a> {
    /// The position to start at (0 with `newer: false`: the newest).
    pub from: u64,
    /// Toward the newer records (up from the tail), or the older.
    pub newer: bool,
    /// Stop after this many records.
    pub max_records: u64,
    /// Stop once the records read add up to this many bytes (at least one is read).
    pub max_bytes: u64,
    /// The first LRANGE's size.
    pub chunk: u64,
    /// Cut each record to this many bytes; 0: whole.
    pub cap: u64,
    /// Plain text to look for; empty: none.
    pub grep: &'a str,
    /// Whether to compute each record's SHA-1 (for requeue and drop).
    pub sha: bool,
    /// Only each record's first line (the header).
    pub header_only: bool,
}

/// Reads a page of the dead-letter list by position from the tail, in one script call whose
/// memory is bounded by `max_bytes` (plus one chunk: see `scripts::dlq_page`).
pub async fn dead_page(conn: &mut Conn, keys: &Keys, request: &PageRequest<'_>) -> Result<DeadPage, QueueError> {
    let reply: redis::Value = scripts::dlq_page()
        .key(&keys.dead)
        .arg(request.from)
        .arg(if request.newer { 1 } else { -1 })
        .arg(request.max_records)
        .arg(request.max_bytes)
        .arg(request.chunk.max(1))
        .arg(request.cap)
        .arg(request.grep)
        .arg(if request.sha { "1" } else { "0" })
        .arg(DLQ_TOMBSTONE)
        .arg(if request.header_only { "1" } else { "0" })
        .invoke_async(conn)
        .await?;
    Ok(parse_page(reply))
}

/// Reads `scripts::dlq_page`'s reply; anything else is an empty page.
pub(crate) fn parse_page(reply: redis::Value) -> DeadPage {
    let number = |v: &redis::Value| match v {
        redis::Value::Int(n) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    let bytes = |v: redis::Value| match v {
        redis::Value::BulkString(b) => b,
        redis::Value::SimpleString(s) => s.into_bytes(),
        _ => Vec::new(),
    };
    let redis::Value::Array(items) = reply else {
        return DeadPage::default();
    };
    let mut items = items.into_iter();
    let mut head = || items.next().as_ref().map_or(0, number);
    let (next, chunk, len, tombstones, misses) = (head(), head(), head(), head(), head());
    let slots = items
        .filter_map(|slot| match slot {
            redis::Value::Array(fields) if fields.len() == 5 => {
                let mut fields = fields.into_iter();
                let position = fields.next().as_ref().map_or(0, number);
                let size = fields.next().as_ref().map_or(0, number);
                let record = fields.next().map(bytes).unwrap_or_default();
                let hit = fields.next().as_ref().map_or(0, number) == 1;
                let sha = String::from_utf8(fields.next().map(bytes).unwrap_or_default()).unwrap_or_default();
                Some(DeadSlot {
                    position,
                    size,
                    bytes: record,
                    hit,
                    sha,
                })
            }
            _ => None,
        })
        .collect();
    DeadPage {
        next,
        chunk,
        len,
        tombstones,
        misses,
        slots,
    }
}

/// Moves the dead letter at `position` (from the tail), if it is still the record with SHA-1
/// `sha`, to the queue as `message`: to its front (delivered next) or back. Copies, then puts
/// a tombstone in its place (`sweep_dead` removes those). `false`: another record is there now.
pub async fn requeue_dead_at(
    conn: &mut Conn,
    keys: &Keys,
    position: u64,
    sha: &str,
    message: &[u8],
    front: bool,
) -> Result<bool, QueueError> {
    let moved: i64 = scripts::dlq_requeue()
        .key(&keys.dead)
        .key(&keys.ready)
        .arg(position)
        .arg(sha)
        .arg(message)
        .arg(if front { "1" } else { "0" })
        .arg(DLQ_TOMBSTONE)
        .invoke_async(conn)
        .await?;
    Ok(moved == 1)
}

/// Deletes the dead letter at `position` if it is still the record with SHA-1 `sha` (leaving
/// a tombstone for `sweep_dead`). `false`: another record is there now.
pub async fn drop_dead_at(conn: &mut Conn, keys: &Keys, position: u64, sha: &str) -> Result<bool, QueueError> {
    let dropped: i64 = scripts::dlq_drop()
        .key(&keys.dead)
        .arg(position)
        .arg(sha)
        .arg(DLQ_TOMBSTONE)
        .invoke_async(conn)
        .await?;
    Ok(dropped == 1)
}

/// One record for `move_dead_many`: its position, its SHA-1 when read, and the message to
/// requeue (ignored by a purge).
#[derive(Debug, Clone)]
pub struct DeadMove {
    /// Its position from the tail.
    pub position: u64,
    /// The SHA-1 it had when read: it moves only if it still has it.
    pub sha: String,
    /// The message to put on the queue.
    pub message: Vec<u8>,
}

/// `requeue_dead_at` (with `requeue: Some(front)`) or `drop_dead_at` (`None`) for many records
/// in one round trip: the same scripts, one call per record, each still checking the SHA-1,
/// copying and only then setting the tombstone, sent as `EVALSHA` in one pipeline once the
/// script is loaded. Killed or cut off half way, the calls Redis ran are done and the others
/// not; run again, the done ones are tombstones (skipped), so nothing is lost or doubled.
/// Returns, in order, whether each record moved.
pub async fn move_dead_many(
    conn: &mut Conn,
    keys: &Keys,
    moves: &[DeadMove],
    requeue: Option<bool>,
) -> Result<Vec<bool>, QueueError> {
    if moves.is_empty() {
        return Ok(Vec::new());
    }
    let script = match requeue {
        Some(_) => scripts::dlq_requeue(),
        None => scripts::dlq_drop(),
    };
    // Loaded before each batch, so a script cache flushed meanwhile (a restart, a failover)
    // costs a round trip, not a NOSCRIPT error.
    let _: String = script.prepare_invoke().load_async(conn).await?;
    let mut pipe = redis::pipe();
    for one in moves {
        let call = pipe.cmd("EVALSHA").arg(script.get_hash());
        match requeue {
            Some(front) => call
                .arg(2)
                .arg(&keys.dead)
                .arg(&keys.ready)
                .arg(one.position)
                .arg(&one.sha)
                .arg(&one.message)
                .arg(if front { "1" } else { "0" })
                .arg(DLQ_TOMBSTONE),
            None => call
                .arg(1)
                .arg(&keys.dead)
                .arg(one.position)
                .arg(&one.sha)
                .arg(DLQ_TOMBSTONE),
        };
    }
    let moved: Vec<i64> = pipe.query_async(conn).await?;
    Ok(moved.into_iter().map(|m| m == 1).collect())
}

/// Removes up to `count` tombstones, searching from the tail (where a walk from the oldest
/// left them); returns how many went.
pub async fn sweep_dead(conn: &mut Conn, keys: &Keys, count: u64) -> Result<u64, QueueError> {
    if count == 0 {
        return Ok(0);
    }
    let count = -i64::try_from(count).unwrap_or(i64::MAX);
    let removed: u64 = redis::cmd("LREM")
        .arg(&keys.dead)
        .arg(count)
        .arg(DLQ_TOMBSTONE)
        .query_async(conn)
        .await?;
    Ok(removed)
}

/// Deletes the dead-letter list; returns how many records it held.
pub async fn purge_dead(conn: &mut Conn, keys: &Keys) -> Result<u64, QueueError> {
    let (n, _): (u64, i64) = redis::pipe()
        .atomic()
        .llen(&keys.dead)
        .del(&keys.dead)
        .query_async(conn)
        .await?;
    Ok(n)
}
