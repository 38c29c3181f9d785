//! A worker's handle on one of its queues (`Queue`): every move of a message the worker makes,
//! each one script or command, and its own entry in the live set.

use std::time::Duration;

use bytes::Bytes;
use redis::{AsyncCommands, Script};

use super::acks::{self, Acks};
use super::identity::{process_token, Holder, LiveWorker};
use super::scripts::{self, Scripts};
use super::time::{millis, score_ms, time_ms};
use super::{Conn, Connector, Keys, QueueError};

/// How long the idle claimer blocks in one BLMOVE before asking again.
const BLOCK_SECONDS: f64 = 5.0;

/// Depths of the queue's keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Depths {
    /// Messages waiting in the ready list.
    pub ready: u64,
    /// Messages in this worker's processing list.
    pub processing: u64,
    /// Messages waiting in the retry set.
    pub retry: u64,
    /// Records in the dead-letter list.
    pub dead: u64,
}

/// The result of one claim.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Items now in this worker's processing list, oldest first.
    pub items: Vec<Vec<u8>>,
    /// Items over the size limit, moved to the dead-letter list without leaving Redis.
    pub too_large: usize,
    /// Items returned from dead workers' hands too often, moved to the dead-letter list.
    pub poisoned: usize,
    /// The message ids of the `too_large` items ('' when unknown).
    pub too_large_ids: Vec<String>,
    /// The message ids of the `poisoned` items ('' when unknown).
    pub poisoned_ids: Vec<String>,
    /// For each of `items`: whether it has a reclaim count (a worker died holding it), to be
    /// dropped once it is settled (`Queue::forget_reclaims`).
    pub counted: Vec<bool>,
}

/// The result of one promoter pass.
#[derive(Debug, Clone, Copy)]
pub struct Promoted {
    /// Retries moved to the ready list.
    pub moved: usize,
    /// How long until the next retry is due, if any is waiting.
    pub next_due_in: Option<Duration>,
    /// The ready list was empty, so up to the fill went.
    pub filled: bool,
}

/// A worker's handle on one of its queues: a multiplexed, self-reconnecting connection for
/// ordinary commands (shared by all the worker's queues) and one of its own for the blocking
/// wait, so a BLMOVE never delays a settle.
#[derive(Clone)]
pub struct Queue {
    conn: Conn,
    blocking: Conn,
    keys: Keys,
    processing: String,
    worker_id: String,
    /// The worker id as a JSON string, for records the claim script writes.
    worker_id_json: String,
    /// This process, as recorded against its worker id (`process_token`).
    token: String,
    scripts: std::sync::Arc<Scripts>,
}

impl Queue {
    /// A handle on `queue_name` over the shared connection `conn`, with a blocking connection
    /// of its own. Fails at once if Redis cannot be reached; the caller decides whether to wait
    /// and try again.
    pub async fn connect(
        connector: &Connector,
        conn: &Conn,
        queue_name: &str,
        worker_id: &str,
    ) -> Result<Queue, QueueError> {
        // The blocking wait's replies come up to BLOCK_SECONDS late by design.
        let blocking = connector.connect(Duration::from_secs_f64(BLOCK_SECONDS + 5.0)).await?;
        let keys = Keys::for_topology(queue_name, connector.clustered());
        Ok(Queue {
            conn: conn.clone(),
            blocking,
            processing: keys.processing(worker_id),
            keys,
            worker_id: worker_id.to_string(),
            worker_id_json: serde_json::Value::from(worker_id).to_string(),
            token: process_token(),
            scripts: std::sync::Arc::new(Scripts::new()),
        })
    }

    /// The connection for ordinary commands: one per worker, shared by its queues.
    pub async fn shared_connection(connector: &Connector) -> Result<Conn, QueueError> {
        connector.connect(Duration::from_secs(10)).await
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.keys.name
    }

    /// The queue's key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The shared connection, for operator work on this queue's keys (the admin port's `/dlq`).
    pub fn connection(&self) -> Conn {
        self.conn.clone()
    }

    /// The Redis server's version, e.g. `7.0.15`.
    pub async fn server_version(&self) -> Result<String, QueueError> {
        super::server_version(&mut self.conn.clone()).await
    }

    /// Claims up to `n` messages, oldest first, into this worker's processing list. Items over
    /// `max_bytes` are moved to the dead-letter list inside Redis instead (reason `too_large`),
    /// so an oversized item costs the worker no memory; `Claimed::too_large` counts them.
    /// An item that workers dying while holding it returned to the queue more than
    /// `max_reclaims` times (0: no limit) goes to the dead-letter list as `poisoned`.
    pub async fn claim(&self, n: usize, max_bytes: usize, max_reclaims: u32) -> Result<Claimed, QueueError> {
        #[allow(clippy::type_complexity)]
        let (items, too_large, poisoned, counted, too_large_ids, poisoned_ids): (
            Vec<Vec<u8>>,
            usize,
            usize,
            Vec<usize>,
            Vec<String>,
            Vec<String>,
        ) = self
            .scripts
            .claim
            .key(&self.keys.ready)
            .key(&self.processing)
            .key(&self.keys.dead)
            .key(&self.keys.reclaims)
            .arg(n)
            .arg(max_bytes)
            .arg(&self.worker_id_json)
            .arg(crate::message::dead_at_now())
            .arg(max_reclaims)
            .invoke_async(&mut self.conn.clone())
            .await?;
        // The script gives 1-based places of the items with a reclaim count.
        let mut flags = vec![false; items.len()];
        for place in counted {
            if let Some(flag) = place.checked_sub(1).and_then(|i| flags.get_mut(i)) {
                *flag = true;
            }
        }
        Ok(Claimed {
            items,
            too_large,
            poisoned,
            too_large_ids,
            poisoned_ids,
            counted: flags,
        })
    }

    /// Waits until the ready list has something, or a few seconds pass. Claims nothing: the
    /// wait moves the rightmost item onto the same end of the same list, so abandoning it can
    /// never strand a message.
    pub async fn wait_for_ready(&self) -> Result<bool, QueueError> {
        let item: Option<Vec<u8>> = redis::cmd("BLMOVE")
            .arg(&self.keys.ready)
            .arg(&self.keys.ready)
            .arg("RIGHT")
            .arg("RIGHT")
            .arg(BLOCK_SECONDS)
            .query_async(&mut self.blocking.clone())
            .await?;
        Ok(item.is_some())
    }

    /// Starts the task that removes delivered messages from this queue's processing list
    /// (`Acks::ack`). It ends when the last `Acks` handle is dropped.
    pub fn acks(&self) -> Acks {
        acks::spawn(self.conn.clone(), self.processing.clone())
    }

    /// Moves a message from processing to the retry set as `retried`, due after `delay`.
    pub async fn retry(&self, raw: &[u8], retried: &[u8], delay: Duration) -> Result<bool, QueueError> {
        let moved: i64 = self
            .scripts
            .retry
            .key(&self.processing)
            .key(&self.keys.retry)
            .key(&self.keys.clock)
            .arg(raw)
            .arg(retried)
            .arg(millis(delay))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(moved > 0)
    }

    /// Moves a message from processing to the dead-letter list as `record`.
    pub async fn dead(&self, raw: &[u8], record: &[u8]) -> Result<bool, QueueError> {
        let moved: i64 = self
            .scripts
            .dead
            .key(&self.processing)
            .key(&self.keys.dead)
            .arg(raw)
            .arg(record)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(moved > 0)
    }

    /// Returns a message from processing to the front of the ready list unchanged: its attempt
    /// was stopped by the circuit breaker, not failed by the message.
    pub async fn release(&self, raw: &[u8]) -> Result<bool, QueueError> {
        self.back_unchanged(&self.scripts.release, raw).await
    }

    /// Returns a message from processing to the back of the ready list unchanged: a probe of
    /// the circuit breaker that the server failed, so that the next probe is another message.
    pub async fn rotate(&self, raw: &[u8]) -> Result<bool, QueueError> {
        self.back_unchanged(&self.scripts.rotate, raw).await
    }

    /// Runs one of the scripts that move a message from processing to the ready list as it was.
    async fn back_unchanged(&self, script: &Script, raw: &[u8]) -> Result<bool, QueueError> {
        let moved: i64 = script
            .key(&self.processing)
            .key(&self.keys.ready)
            .arg(raw)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(moved > 0)
    }

    /// Moves up to `limit` due retries to the front of the ready list, the longest due first;
    /// up to `when_empty` when nothing else waits there.
    pub async fn promote_due(&self, limit: usize, when_empty: usize) -> Result<Promoted, QueueError> {
        let (moved, next, filled): (usize, i64, u8) = self
            .scripts
            .promote
            .key(&self.keys.retry)
            .key(&self.keys.ready)
            .key(&self.keys.clock)
            .arg(limit)
            .arg(when_empty)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(Promoted {
            moved,
            next_due_in: u64::try_from(next).ok().map(Duration::from_millis),
            filled: filled == 1,
        })
    }

    /// Returns everything in a worker's processing list to the front of the ready list.
    /// `died`: the worker died holding them (a restart recovering its leftovers), so each
    /// message's reclaim count goes up; a drain or a sweep returns them uncounted.
    pub async fn give_back(&self, worker_id: &str, died: bool) -> Result<usize, QueueError> {
        let n: usize = self
            .scripts
            .give_back
            .key(self.keys.processing(worker_id))
            .key(&self.keys.ready)
            .key(&self.keys.reclaims)
            .arg(u8::from(died))
            .arg(scripts::MAX_RECLAIM_ENTRIES)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n)
    }

    /// Takes this worker's id. `Err(holder)` when another process holds it. `dead_holder` is
    /// a holder token known to belong to a process that no longer exists; `silent_heartbeat`
    /// a heartbeat the caller watched stay unchanged for WORKER_DEAD_AFTER: a holder still
    /// at it is passed over too.
    pub async fn register(
        &self,
        dead_holder: Option<&str>,
        silent_heartbeat: Option<&str>,
    ) -> Result<Result<(), Holder>, QueueError> {
        let reply: (i64, Option<String>, Option<String>, Option<i64>) = self
            .scripts
            .register
            .key(&self.keys.workers)
            .key(&self.keys.owners)
            .arg(&self.worker_id)
            .arg(&self.token)
            .arg(dead_holder.unwrap_or(""))
            .arg(silent_heartbeat.unwrap_or(""))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match reply {
            (1, ..) => Ok(()),
            (_, holder, beat, age) => Err(Holder::parse(
                holder.unwrap_or_default(),
                beat.unwrap_or_default(),
                age.unwrap_or(0),
            )),
        })
    }

    /// Records that this worker is alive, in Redis time. `false`: another process has taken
    /// this worker's id.
    pub async fn heartbeat(&self) -> Result<bool, QueueError> {
        Ok(self.on_own_entry(&self.scripts.heartbeat).await? == 1)
    }

    /// Runs a script on this worker's own entry: KEYS `workers`, `owners`; ARGV worker id and
    /// this process's token.
    async fn on_own_entry(&self, script: &Script) -> Result<i64, QueueError> {
        Ok(script
            .key(&self.keys.workers)
            .key(&self.keys.owners)
            .arg(&self.worker_id)
            .arg(&self.token)
            .invoke_async(&mut self.conn.clone())
            .await?)
    }

    /// Reaps `worker_id` if its heartbeat is still `heartbeat` (which the caller watched stay
    /// so for WORKER_DEAD_AFTER); returns the messages returned to the queue, `None` if another
    /// worker reaped it first or it came back.
    pub async fn reap(&self, worker_id: &str, heartbeat: &str) -> Result<Option<usize>, QueueError> {
        let moved: i64 = self
            .scripts
            .reap
            .key(&self.keys.workers)
            .key(&self.keys.owners)
            .key(self.keys.processing(worker_id))
            .key(&self.keys.ready)
            .key(&self.keys.reclaims)
            .arg(worker_id)
            .arg(heartbeat)
            .arg(scripts::MAX_RECLAIM_ENTRIES)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(usize::try_from(moved).ok())
    }

    /// Removes this worker from the live set, if the id is still this process's.
    pub async fn deregister(&self) -> Result<(), QueueError> {
        self.on_own_entry(&self.scripts.deregister).await?;
        Ok(())
    }

    /// Live workers with their last heartbeat, freshest first.
    pub async fn workers(&self) -> Result<Vec<LiveWorker>, QueueError> {
        let mut conn = self.conn.clone();
        let (time, entries): ((u64, u64), Vec<(String, String)>) = redis::pipe()
            .cmd("TIME")
            .zrevrange_withscores(&self.keys.workers, 0, -1)
            .query_async(&mut conn)
            .await?;
        let now_ms = time_ms(time);
        Ok(entries
            .into_iter()
            .map(|(id, heartbeat)| {
                let at = score_ms(heartbeat.parse().unwrap_or(0.0));
                let age = Duration::from_millis(now_ms.saturating_sub(at));
                LiveWorker { id, heartbeat, age }
            })
            .collect())
    }

    /// The oldest items of this worker's processing list (where strays are), up to `limit`.
    pub async fn processing_items(&self, limit: usize) -> Result<Vec<Bytes>, QueueError> {
        let from = -isize::try_from(limit).unwrap_or(isize::MAX);
        let items: Vec<Vec<u8>> = self.conn.clone().lrange(&self.processing, from, -1).await?;
        Ok(items.into_iter().map(Bytes::from).collect())
    }

    /// Returns `strays` (items in this worker's processing list that none of its tasks holds)
    /// to the front of the queue, one copy each; returns how many were still there.
    pub async fn return_strays(&self, strays: &[Bytes]) -> Result<usize, QueueError> {
        if strays.is_empty() {
            return Ok(0);
        }
        let mut call = self.scripts.return_strays.key(&self.processing);
        call.key(&self.keys.ready);
        for item in strays {
            call.arg(item.as_ref());
        }
        Ok(call.invoke_async(&mut self.conn.clone()).await?)
    }

    /// Drops the reclaim count of a message this worker settled: handling it killed no one.
    pub async fn forget_reclaims(&self, raw: &[u8]) -> Result<(), QueueError> {
        let _: i64 = self
            .scripts
            .forget_reclaims
            .key(&self.keys.reclaims)
            .arg(raw)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Depths of ready, this worker's processing, retry and dead, in one round trip.
    pub async fn depths(&self) -> Result<Depths, QueueError> {
        let (ready, processing, retry, dead): (u64, u64, u64, u64) = redis::pipe()
            .llen(&self.keys.ready)
            .llen(&self.processing)
            .zcard(&self.keys.retry)
            .llen(&self.keys.dead)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(Depths {
            ready,
            processing,
            retry,
            dead,
        })
    }
}
