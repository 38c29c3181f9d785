//! Operator work on a queue, for the command line (`enqueue`, `stats`): a connection of its
//! own, pushing messages, waiting for replicas, and a snapshot of the queue's keys.

use std::time::Duration;

use redis::AsyncCommands;

use super::time::{score_ms, time_ms};
use super::{Conn, Connector, Keys, QueueError};
use crate::config::RedisSettings;

/// A connection for one-shot operator commands (`enqueue`, `stats`, `dlq`), and whether the
/// queues are in a cluster (their keys then carry hash tags).
pub async fn connect_once(settings: &RedisSettings) -> Result<(Conn, bool), QueueError> {
    let connector = Connector::new(settings)?;
    Ok((connector.connect(Duration::from_secs(30)).await?, connector.clustered()))
}

/// Pushes messages onto the ready list in order (the first is delivered first), pipelined.
pub async fn enqueue(conn: &mut Conn, keys: &Keys, items: &[Vec<u8>]) -> Result<usize, QueueError> {
    for chunk in items.chunks(1000) {
        let _: usize = conn.lpush(&keys.ready, chunk).await?;
    }
    Ok(items.len())
}

/// Waits until `replicas` replicas have this connection's writes (Redis WAIT) or `timeout_ms`
/// passes; returns how many have them. In a cluster it asks the node holding the queue.
pub async fn wait_replicas(conn: &mut Conn, keys: &Keys, replicas: u32, timeout_ms: u64) -> Result<u64, QueueError> {
    let mut wait = redis::cmd("WAIT");
    wait.arg(replicas).arg(timeout_ms);
    Ok(conn.query_on_node_of(&keys.ready, &wait).await?)
}

/// Everything `courier stats` shows, read in a few round trips.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Snapshot {
    /// Messages waiting in the ready list.
    pub ready: u64,
    /// The next message in line (the oldest), if any.
    pub oldest_ready: Option<Vec<u8>>,
    /// Worker id -> messages it has claimed.
    pub processing: Vec<(String, u64)>,
    /// Messages waiting in the retry set.
    pub retry: u64,
    /// How long until the next retry is due (negative: overdue).
    pub next_retry_in_ms: Option<i64>,
    /// Records in the dead-letter list.
    pub dead_total: u64,
    /// Worker id -> heartbeat age in ms.
    pub workers: Vec<(String, u64)>,
}

/// The pipelined reply `snapshot` reads: TIME, the clock's offset, LLEN, LINDEX, ZCARD, ZRANGE,
/// LLEN, ZRANGE.
type SnapshotReply = (
    (u64, u64),
    Option<u64>,
    u64,
    Option<Vec<u8>>,
    u64,
    Vec<(Vec<u8>, f64)>,
    u64,
    Vec<(String, f64)>,
);

/// Reads a snapshot of the queue's keys (no dead-letter records: `crate::dlq` pages through those).
pub async fn snapshot(conn: &mut Conn, keys: &Keys) -> Result<Snapshot, QueueError> {
    let ((secs, micros), offset, ready, oldest, retry, next, dead_total, workers): SnapshotReply = redis::pipe()
        .cmd("TIME")
        .hget(&keys.clock, "offset")
        .llen(&keys.ready)
        .lindex(&keys.ready, -1)
        .zcard(&keys.retry)
        .zrange_withscores(&keys.retry, 0, 0)
        .llen(&keys.dead)
        .zrange_withscores(&keys.workers, 0, -1)
        .query_async(conn)
        .await?;
    let now_ms = time_ms((secs, micros));
    // Retries are due in the queue's clock, which runs ahead of TIME after TIME stepped back.
    let queue_now = now_ms.saturating_add(offset.unwrap_or(0));
    // The processing lists of the workers the queue knows (live set and id holders): no SCAN,
    // which in a cluster would have to visit every node.
    let owners: Vec<String> = conn.hkeys(&keys.owners).await?;
    let mut ids: Vec<String> = workers.iter().map(|(id, _)| id.clone()).chain(owners).collect();
    ids.sort();
    ids.dedup();
    let mut processing = Vec::new();
    for id in ids {
        let n: u64 = conn.llen(keys.processing(&id)).await?;
        processing.push((id, n));
    }
    Ok(Snapshot {
        ready,
        oldest_ready: oldest,
        processing,
        retry,
        next_retry_in_ms: next.first().map(|(_, due)| {
            let due = score_ms(*due);
            if due >= queue_now {
                i64::try_from(due - queue_now).unwrap_or(i64::MAX)
            } else {
                i64::try_from(queue_now - due).map_or(i64::MIN, |late| -late)
            }
        }),
        dead_total,
        workers: workers
            .into_iter()
            .map(|(id, at)| (id, now_ms.saturating_sub(score_ms(at))))
            .collect(),
    })
}
