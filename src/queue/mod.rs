//! Redis: every key name and every script lives here. Each move of a message between keys is one
//! command or one Lua script, so a crash at any instant leaves every message in exactly one key
//! (or, around a crash, two: a duplicate, never a loss). Every script is safe to run twice.

pub mod acl;
mod connect;
mod keys;
mod locate;
mod scripts;

use std::time::Duration;

use bytes::Bytes;

use redis::{AsyncCommands, Script};

pub use self::connect::{Conn, Connector};
pub use self::keys::{cluster_safe_name, hash_tag, slot_part, Keys};
pub use self::locate::{locate, Place};
use self::scripts::Scripts;
use crate::config::RedisSettings;

/// How long the idle claimer blocks in one BLMOVE before asking again.
const BLOCK_SECONDS: f64 = 5.0;

/// A failed Redis call, with the question the caller asks of it answered.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// The files for TLS to Redis could not be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl QueueError {
    /// True when the error is about reaching Redis (down, restarting, cut off, timed out, or
    /// not able to take writes right now) rather than about the command: the same call will
    /// succeed once Redis is back. See `unavailable`.
    pub fn is_unavailable(&self) -> bool {
        match self {
            QueueError::Redis(e) => unavailable(e),
            QueueError::Tls(_) => false,
        }
    }

    /// True when Redis refused our credentials: a configuration problem, not an outage.
    pub fn is_auth(&self) -> bool {
        let QueueError::Redis(e) = self else {
            return false;
        };
        matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
            || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    }

    /// True when the TLS files for Redis are at fault: a configuration problem.
    pub fn is_tls_files(&self) -> bool {
        matches!(self, QueueError::Tls(_))
    }
}

/// Server error codes that mean "not now": loading its data (`LOADING`), a script running
/// too long (`BUSY`), a slot moving or the cluster incomplete (`TRYAGAIN`, `CLUSTERDOWN`),
/// a replica cut off from its master or one that was a master a moment ago (`MASTERDOWN`,
/// `READONLY`), too few replicas for `min-replicas-to-write` (`NOREPLICAS`).
const UNAVAILABLE_CODES: &[&str] = &[
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "NOREPLICAS",
];

/// The one reading of "Redis is unavailable": the settle is held and tried again, `/ready`
/// answers 503, and under Sentinel the master is looked up again. redis-rs's own reading comes
/// first (I/O, a cluster node it cannot reach, `retry_method` wait-and-retry or refresh-slots);
/// then the codes it does not know (`NOREPLICAS`, `BUSY`), in every command of a failed
/// pipeline, and the code Redis 6.2 wraps inside a script's error
/// (`ERR Error running script … -READONLY …`).
pub(crate) fn unavailable(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, RetryMethod};
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        return true;
    }
    if matches!(e.kind(), ErrorKind::ClusterConnectionNotFound)
        || matches!(
            e.retry_method(),
            RetryMethod::WaitAndRetry | RetryMethod::RefreshSlotsAndRetry
        )
    {
        return true;
    }
    e.clone().into_server_errors().is_some_and(|errors| {
        errors
            .iter()
            .any(|(_, error)| unavailable_code(error.code(), error.details()))
    })
}

fn unavailable_code(code: &str, details: Option<&str>) -> bool {
    UNAVAILABLE_CODES.contains(&code)
        || (code == "ERR"
            && details
                .and_then(wrapped_code)
                .is_some_and(|c| UNAVAILABLE_CODES.contains(&c)))
}

/// The code of the error a Redis 6.2 script met, from the text it wraps it in:
/// `Error running script (call to f_…): @user_script:1: -READONLY You can't write …`.
fn wrapped_code(details: &str) -> Option<&str> {
    if !details.starts_with("Error running script") {
        return None;
    }
    details
        .split_whitespace()
        .filter_map(|word| word.strip_prefix('-'))
        .find(|code| !code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase()))
}

/// Depths of the queue's keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Depths {
    pub ready: u64,
    pub processing: u64,
    pub retry: u64,
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
    /// The message ids of the `too_large` and `poisoned` items ('' when unknown).
    pub too_large_ids: Vec<String>,
    pub poisoned_ids: Vec<String>,
    /// For each of `items`: whether it has a reclaim count (a worker died holding it), to be
    /// dropped once it is settled (`Queue::forget_reclaims`).
    pub counted: Vec<bool>,
}

/// The result of one promoter pass.
#[derive(Debug, Clone, Copy)]
pub struct Promoted {
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
    /// This process, as recorded against its worker id: `host|pid|started_ms`.
    token: String,
    scripts: std::sync::Arc<Scripts>,
}

/// The most acks sent in one pipeline.
const MAX_ACK_BATCH: usize = 256;

/// A delivered message to remove from processing, and where to say whether it was there.
type AckRequest = (Bytes, tokio::sync::oneshot::Sender<Result<bool, QueueError>>);

/// Acknowledgements for one queue, gathered: every LREM the delivery tasks ask for while the
/// previous batch is on its way, or in the runtime's next turn, goes out in the next pipeline,
/// one write and one read for all of them instead of one each. Each caller still learns
/// whether its message was there, and a batch that fails fails each of its callers, who try
/// again as before.
///
/// Every LREM that settles a message (here and in the retry, dead-letter and release
/// scripts) searches from the tail of the processing list: claims are pushed at the head, so
/// the tail holds the oldest, which are the deliveries most likely to be finishing. From the
/// head, Redis compared each ack against most of the list (64 messages at concurrency 64).
#[derive(Clone)]
pub struct Acks {
    tx: tokio::sync::mpsc::UnboundedSender<AckRequest>,
}

impl Acks {
    /// Removes a delivered message from the processing list; true when it was there.
    pub async fn ack(&self, raw: &Bytes) -> Result<bool, QueueError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || {
            QueueError::Redis(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the acknowledging task has stopped",
            )))
        };
        self.tx.send((raw.clone(), reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Who holds a worker id, from `register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// The boot and PID namespace the holder runs in (`this_machine`); empty when it did not
    /// say (an older courier).
    pub machine: String,
    pub token: String,
    /// Its last heartbeat, as Redis holds it: the value a watcher sees change or not.
    pub heartbeat: String,
    pub heartbeat_age: Duration,
}

impl Holder {
    fn parse(token: String, heartbeat: String, age_ms: i64) -> Holder {
        let mut parts = token.splitn(4, '|');
        let host = parts.next().unwrap_or_default().to_string();
        let pid = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let machine = parts.nth(1).unwrap_or_default().to_string();
        Holder {
            host,
            pid,
            machine,
            token,
            heartbeat,
            heartbeat_age: Duration::from_millis(u64::try_from(age_ms).unwrap_or(0)),
        }
    }

    /// Whether the holder runs on this machine, in this boot and PID namespace, so that its
    /// pid can be looked up here. A host name alone is not enough: containers and cloned VMs
    /// share them.
    pub fn on_this_machine(&self) -> bool {
        !self.machine.is_empty() && self.host == this_host() && self.machine == this_machine()
    }
}

/// A live worker as the queue's live set holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveWorker {
    pub id: String,
    /// Its last heartbeat, as Redis holds it (ms since the epoch, in Redis's clock).
    pub heartbeat: String,
    /// How old that heartbeat is by Redis's clock: for display only, never to judge liveness.
    pub age: Duration,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on host {} (heartbeat {:.1} s ago)",
            self.pid,
            self.host,
            self.heartbeat_age.as_secs_f64()
        )
    }
}

/// The token identifying this handle against its worker id: host, pid, start time, and a
/// counter so that two handles made in the same millisecond still differ.
pub fn process_token() -> String {
    static HANDLES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = HANDLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!(
        "{}|{}|{started}.{n}|{}",
        this_host(),
        std::process::id(),
        this_machine()
    )
}

/// This boot of this machine and this process's PID namespace, e.g.
/// `6f1c…-boot/pid:[4026531836]`: two processes see each other's pids only when this is the
/// same. Empty where it cannot be told (then no holder counts as on this machine).
pub fn this_machine() -> String {
    #[cfg(target_os = "linux")]
    {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let namespace = std::fs::read_link("/proc/self/ns/pid").unwrap_or_default();
        let (boot, namespace) = (boot.trim(), namespace.to_string_lossy());
        if boot.is_empty() || namespace.is_empty() {
            return String::new();
        }
        format!("{boot}/{namespace}").replace('|', "_")
    }
    #[cfg(not(target_os = "linux"))]
    {
        String::new()
    }
}

/// This machine's host name.
pub fn this_host() -> String {
    gethostname::gethostname().to_string_lossy().replace('|', "_")
}

/// The oldest Redis courier runs on: LMOVE, BLMOVE and RPOP with a count need 6.2.
pub const MIN_REDIS: (u32, u32) = (6, 2);

/// The version a Redis server reports in `INFO server`, e.g. `7.0.15`; in a cluster (which
/// answers for every master) the oldest.
pub async fn server_version(conn: &mut impl redis::aio::ConnectionLike) -> Result<String, QueueError> {
    let info: redis::Value = redis::cmd("INFO").arg("server").query_async(conn).await?;
    let mut texts = Vec::new();
    collect_texts(&info, &mut texts);
    let version = |text: &String| {
        text.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_string()
    };
    Ok(texts
        .iter()
        .map(version)
        .min_by_key(|v| version_key(v))
        .unwrap_or_else(|| "unknown".to_string()))
}

/// The text answers of `COMMAND ARG` (e.g. `INFO memory`, `CLUSTER INFO`): one per node in a
/// cluster, where the command goes to every master. Empty when it is refused.
pub async fn info_texts(conn: &mut Conn, command: &str, arg: &str) -> Vec<String> {
    let mut texts = Vec::new();
    if let Ok(reply) = redis::cmd(command).arg(arg).query_async::<redis::Value>(conn).await {
        collect_texts(&reply, &mut texts);
    }
    texts
}

/// Every text in a reply, however nested (a cluster answers INFO with one per node).
fn collect_texts(value: &redis::Value, into: &mut Vec<String>) {
    match value {
        redis::Value::BulkString(bytes) => into.push(String::from_utf8_lossy(bytes).into_owned()),
        redis::Value::SimpleString(text) => into.push(text.clone()),
        redis::Value::VerbatimString { text, .. } => into.push(text.clone()),
        redis::Value::Array(items) | redis::Value::Set(items) => items.iter().for_each(|v| collect_texts(v, into)),
        redis::Value::Map(pairs) => pairs.iter().for_each(|(_, v)| collect_texts(v, into)),
        _ => {}
    }
}

fn version_key(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Whether `version` (`major.minor...`) is at least `MIN_REDIS`.
pub fn supported_version(version: &str) -> bool {
    version_key(version) >= MIN_REDIS
}

/// Redis `TIME` (seconds, microseconds) in ms since the epoch.
fn time_ms((secs, micros): (u64, u64)) -> u64 {
    secs.saturating_mul(1000).saturating_add(micros / 1000)
}

/// A sorted-set score that holds ms since the epoch. Anyone with write access can put any
/// score there: NaN and negatives count as 0, and huge values as the far future.
fn score_ms(score: f64) -> u64 {
    if score.is_nan() || score <= 0.0 {
        0
    } else if score >= 1.8e19 {
        u64::MAX
    } else {
        // In range and whole after `trunc`: the conversion is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ms = score.trunc() as u64;
        ms
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
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

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The shared connection, for operator work on this queue's keys (the admin port's `/dlq`).
    pub fn connection(&self) -> Conn {
        self.conn.clone()
    }

    /// The Redis server's version, e.g. `7.0.15`.
    pub async fn server_version(&self) -> Result<String, QueueError> {
        server_version(&mut self.conn.clone()).await
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
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<AckRequest>();
        let (mut conn, key) = (self.conn.clone(), self.processing.clone());
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_ACK_BATCH);
            while rx.recv_many(&mut batch, MAX_ACK_BATCH).await > 0 {
                // One more turn of the runtime before sending: the answers that arrive with the
                // next poll of the network go in the same pipeline.
                tokio::task::yield_now().await;
                while batch.len() < MAX_ACK_BATCH {
                    match rx.try_recv() {
                        Ok(ack) => batch.push(ack),
                        Err(_) => break,
                    }
                }
                // Each command sized up front: growing them argument by argument costs more
                // than the rest of the acknowledgement.
                let mut pipe = redis::Pipeline::with_capacity(batch.len());
                for (raw, _) in &batch {
                    let size = "LREM".len() + key.len() + "-1".len() + raw.len();
                    let mut lrem = redis::Cmd::with_capacity(4, size);
                    lrem.arg("LREM").arg(&key).arg("-1").arg(raw.as_ref());
                    pipe.add_command(lrem);
                }
                match pipe.query_async::<Vec<i64>>(&mut conn).await {
                    Ok(removed) => {
                        let mut removed = removed.into_iter();
                        for (_, reply) in batch.drain(..) {
                            let _ = reply.send(Ok(removed.next().unwrap_or(0) > 0));
                        }
                    }
                    Err(e) => {
                        for (_, reply) in batch.drain(..) {
                            let _ = reply.send(Err(QueueError::Redis(e.clone())));
                        }
                    }
                }
            }
        });
        Acks { tx }
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
    pub ready: u64,
    /// The next message in line (the oldest), if any.
    pub oldest_ready: Option<Vec<u8>>,
    /// Worker id -> messages it has claimed.
    pub processing: Vec<(String, u64)>,
    pub retry: u64,
    /// How long until the next retry is due (negative: overdue).
    pub next_retry_in_ms: Option<i64>,
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
    pub max_records: u64,
    /// Stop once the records read add up to this many bytes (at least one is read).
    pub max_bytes: u64,
    /// The first LRANGE's size.
    pub chunk: u64,
    /// Cut each record to this many bytes; 0: whole.
    pub cap: u64,
    /// Plain text to look for; empty: none.
    pub grep: &'a str,
    pub sha: bool,
    /// Only each record's first line (the header).
    pub header_only: bool,
}

pub use self::scripts::DLQ_TOMBSTONE;

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
    pub position: u64,
    pub sha: String,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_versions_compare_numerically() {
        assert!(supported_version("7.0.15"));
        assert!(supported_version("6.2.0"));
        assert!(supported_version("10.0"));
        assert!(!supported_version("6.0.9"));
        assert!(!supported_version("5.0.7"));
        assert!(!supported_version("unknown"));
    }

    #[test]
    fn a_script_error_that_wraps_an_outage_is_an_outage() {
        let error = |reply: &str| match redis::parse_redis_value(reply.as_bytes()) {
            Ok(redis::Value::ServerError(e)) => QueueError::Redis(e.into()),
            other => panic!("{other:?}"),
        };
        // Redis 6.2's words for a write inside a script on a replica, and on too few replicas.
        for wrapped in [
            "-ERR Error running script (call to f_8144b9d19a9245450524fb3d7cc9251f67976e88): @user_script:1: @user_script: 1: -READONLY You can't write against a read only replica.\r\n",
            "-ERR Error running script (call to f_1): @user_script:5: -NOREPLICAS Not enough good replicas to write.\r\n",
        ] {
            assert!(error(wrapped).is_unavailable(), "{wrapped}");
        }
        for refused in [
            "-ERR Error running script (call to f_1): @user_script:1: -WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
            "-NOPERM this user has no permissions to run the 'expire' command\r\n",
            "-ERR Error running script: -1 is not a count\r\n",
            "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        ] {
            assert!(!error(refused).is_unavailable(), "{refused}");
        }
        for code in UNAVAILABLE_CODES {
            assert!(error(&format!("-{code} now\r\n")).is_unavailable(), "{code}");
        }
    }

    #[test]
    fn foreign_scores_and_times_never_overflow() {
        assert_eq!(score_ms(f64::NAN), 0);
        assert_eq!(score_ms(-5.0), 0);
        assert_eq!(score_ms(f64::INFINITY), u64::MAX);
        assert_eq!(score_ms(1_700_000_000_123.9), 1_700_000_000_123);
        assert_eq!(time_ms((u64::MAX, 999_999)), u64::MAX);
        assert_eq!(time_ms((2, 5_000)), 2_005);
    }
}
