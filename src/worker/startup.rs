//! Joining the queue: connect to Redis (waiting while it is down), take this worker's id (or
//! wait for a holder to go quiet), and return what a previous process with this id left
//! claimed.

use std::sync::OnceLock;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::retry::until_answered;
use super::RunError;
use crate::backoff::Backoff;
use crate::config::{RedisSettings, Topology, WorkerSettings};
use crate::health::Health;
use crate::queue::{self, Connector, Queue};

/// The queues joined, and how they were reached.
pub(super) struct Joined {
    pub(super) connector: Connector,
    pub(super) queues: Vec<Queue>,
}

/// Joins the queues: connects (waiting while Redis is down), takes this worker's id on each
/// (waiting for a live holder to go quiet) and returns what this id left claimed to each
/// queue. `None`: asked to stop first.
pub(super) async fn join(
    redis: &RedisSettings,
    worker: &WorkerSettings,
    health: &Health,
    joined: &OnceLock<Vec<Queue>>,
    shutdown: &CancellationToken,
) -> Result<Option<Joined>, RunError> {
    info!(
        queues = %redis.queue_list(),
        order = ?redis.order,
        concurrency = worker.concurrency,
        batch_size = worker.batch_size,
        retry_interval = ?worker.retry_interval,
        max_attempts = worker.max_attempts,
        "Worker {} starting...", worker.id
    );
    let connector = Connector::new(redis).map_err(RunError::RedisSettings)?;
    let Some(queues) = connect(&connector, &redis.queues, &worker.id, health, shutdown).await? else {
        return Ok(None);
    };
    match &redis.topology {
        Topology::Single => info!("Connected to Redis at {}:{}", redis.host, redis.port),
        Topology::Sentinel { master, .. } => info!("Connected to Redis master {master} through Sentinel"),
        Topology::Cluster { .. } => info!("Connected to the Redis Cluster"),
    }
    // Permissions first: a user denied INFO could not even say which version it runs.
    permissions(&queues, redis).await?;
    for queue in &queues {
        let version = queue.server_version().await.map_err(RunError::Redis)?;
        if !queue::supported_version(&version) {
            return Err(RunError::RedisVersion { version });
        }
    }
    let _ = joined.set(queues.clone());
    for queue in &queues {
        if !take_id(queue, worker, health, shutdown).await? {
            return Ok(None);
        }
    }
    for queue in &queues {
        recover(queue, &worker.id, health, shutdown).await;
    }
    Ok(Some(Joined { connector, queues }))
}

/// Refuses to start when Redis says the user lacks a command the worker needs (a script
/// stopped halfway by a denied command is how messages get lost); goes on, saying so, when
/// Redis cannot be asked (before 7, or a user that may not run `ACL DRYRUN`).
async fn permissions(queues: &[Queue], redis: &RedisSettings) -> Result<(), RunError> {
    match queue::acl::check_queues(queues, &redis.topology).await {
        queue::acl::Permissions::Granted { user, commands } => {
            info!(user, commands, "The Redis user may run every command courier needs");
            Ok(())
        }
        queue::acl::Permissions::Denied { user, missing } => Err(RunError::RedisPermissions {
            user,
            missing: missing.join("; "),
        }),
        queue::acl::Permissions::Unknown { reason } => {
            warn!(
                reason,
                "Could not check the Redis user's permissions; README, \
                 \"The Redis courier runs on\", lists what courier needs"
            );
            Ok(())
        }
    }
}

/// Messages a previous process with this id left in its processing list go back to the front
/// of the queue before anything is claimed.
async fn recover(queue: &Queue, worker_id: &str, health: &Health, shutdown: &CancellationToken) {
    let recovered = until_answered(
        health,
        Some(shutdown),
        "Redis refused to return leftover messages",
        || queue.give_back(worker_id, true),
    )
    .await
    .unwrap_or(0);
    if recovered > 0 {
        warn!(
            queue = queue.name(),
            count = recovered,
            "Returned messages left in this worker's processing list to the queue"
        );
    }
}

/// Connects to Redis, waiting with backoff while it is unreachable. `None`: shut down first.
async fn connect(
    connector: &Connector,
    queue_names: &[String],
    worker_id: &str,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<Queue>>, RunError> {
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        let connected = async {
            let conn = Queue::shared_connection(connector).await?;
            let mut queues = Vec::with_capacity(queue_names.len());
            for name in queue_names {
                queues.push(Queue::connect(connector, &conn, name, worker_id).await?);
            }
            Ok::<_, queue::QueueError>(queues)
        };
        match connected.await {
            Ok(queues) => {
                health.redis_ok(started);
                return Ok(Some(queues));
            }
            Err(e) if e.is_auth() => return Err(RunError::RedisAuth(e)),
            Err(e) => {
                if backoff.attempts == 0 {
                    error!(error = %e, "Cannot connect to Redis; will keep trying");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(backoff.next()) => {}
                }
            }
        }
    }
}

/// Takes this worker's id in Redis. A holder whose process is gone from this machine (same
/// boot, same PID namespace) is taken over at once: a restart recovers at once. Any other
/// holder is watched: if its heartbeat stays unchanged for `dead_after` of this process's own
/// time, it is dead wherever it ran, and the id is taken; if its heartbeat changes while
/// watched, it is alive, and this process refuses to start. `false`: shut down while waiting.
async fn take_id(
    queue: &Queue,
    worker: &WorkerSettings,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<bool, RunError> {
    let mut dead_holder: Option<String> = None;
    // The holder's token and heartbeat as last seen, and since when they are unchanged.
    let mut watched: Option<(String, String, tokio::time::Instant)> = None;
    let mut silent: Option<String> = None;
    loop {
        let Some(taken) = until_answered(health, Some(shutdown), "Redis refused to register this worker", || {
            queue.register(dead_holder.as_deref(), silent.as_deref())
        })
        .await
        else {
            return Ok(false);
        };
        let holder = match taken {
            Ok(()) => return Ok(true),
            Err(holder) => holder,
        };
        if holder.on_this_machine() && !process_alive(holder.pid) {
            info!(
                holder = %holder,
                "Taking over worker id {} from a process that no longer runs",
                worker.id
            );
            dead_holder = Some(holder.token);
            continue;
        }
        let now = tokio::time::Instant::now();
        match &watched {
            Some((token, beat, since)) if *token == holder.token && *beat == holder.heartbeat => {
                if now.saturating_duration_since(*since) >= worker.dead_after {
                    info!(
                        holder = %holder,
                        "Taking over worker id {}: its holder has not heartbeated for {:?}",
                        worker.id,
                        worker.dead_after
                    );
                    silent = Some(holder.heartbeat);
                    continue;
                }
            }
            Some(_) => {
                // The holder heartbeated while watched: it is alive.
                return Err(RunError::IdInUse {
                    worker_id: worker.id.clone(),
                    holder,
                });
            }
            None => {
                warn!(
                    holder = %holder,
                    "Worker id {} is held by another process; waiting up to {:?} for it to go \
                     quiet",
                    worker.id,
                    worker.dead_after
                );
                watched = Some((holder.token.clone(), holder.heartbeat.clone(), now));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(worker.heartbeat_interval) => {}
        }
    }
}

/// Whether a process with this pid runs on this machine. Where that cannot be told, assume it
/// does: the caller then waits for its heartbeat to go stale instead.
fn process_alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        true
    }
}
