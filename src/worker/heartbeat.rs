//! The heartbeat: keeps this worker in the live set, reaps workers it watched fall silent
//! (`liveness`), refreshes the depth gauges and the queues `/stats` shows, closes kept
//! connections the main server closed, and stops the worker if another process takes its id.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::liveness::Watch;
use super::shared::Shared;
use crate::delivery::Deliverer;
use crate::health::QueueStat;
use crate::queue::{Depths, LiveWorker, Queue, QueueError};
use crate::telemetry::one_line;

/// Heartbeats, reaps workers whose heartbeat is older than `dead_after`, counts live workers,
/// refreshes the queue-depth gauges and the queues `/stats` shows, and closes kept
/// connections the main server closed. Stops the worker if another process takes its id.
pub(super) async fn heartbeat(
    shared: Arc<Shared>,
    deliverer: Arc<Deliverer>,
    every: Duration,
    dead_after: Duration,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watches: Vec<Watch> = shared.queues().map(|_| Watch::new(dead_after)).collect();
    let mut sentinels_answer = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
            () = shared.health.stats_wanted() => {
                read_for_stats(&shared).await;
                continue;
            }
        }
        shared.log_summaries(false);
        deliverer.close_idle();
        // Under Sentinel: a master replaced while it still answers is left here. Sentinels
        // that do not answer say nothing about the master: the heartbeat goes on regardless.
        match shared.connector.check_master().await {
            Ok(()) if !sentinels_answer => {
                sentinels_answer = true;
                info!("The sentinels answer again");
            }
            Err(e) if sentinels_answer => {
                sentinels_answer = false;
                warn!(
                    error = %one_line(&e),
                    "Cannot ask the sentinels where the master is; heartbeating to the master as \
                     it was"
                );
            }
            _ => {}
        }
        let started = Instant::now();
        let answers = shared.health.asks();
        let mut read = Vec::with_capacity(shared.queue_count());
        let beat = async {
            let mut kept = true;
            let mut total = (Depths::default(), 0);
            for ((q, queue), watch) in shared.queues().zip(watches.iter_mut()) {
                kept &= queue.heartbeat().await?;
                let (live, workers) = reap(&shared, queue, watch).await?;
                let depths = queue.depths().await?;
                read.push(QueueStat {
                    queue: queue.name().to_string(),
                    depths,
                    workers,
                });
                shared.metrics.set_active_workers(q.index(), live);
                shared.metrics.set_depths(q.index(), depths);
                total.0.ready = total.0.ready.saturating_add(depths.ready);
                total.0.processing = total.0.processing.saturating_add(depths.processing);
                total.0.retry = total.0.retry.saturating_add(depths.retry);
                total.0.dead = total.0.dead.saturating_add(depths.dead);
                total.1 = total.1.max(live);
            }
            Ok::<_, QueueError>((kept, total))
        };
        let beat = beat.await;
        shared.health.publish_queues(
            answers,
            match &beat {
                Ok(_) => Ok(read),
                Err(e) => Err(format!("Redis: {e}")),
            },
        );
        match beat {
            Ok((kept, (depths, live))) => {
                shared.health.redis_ok(started);
                crate::service::status(&format!(
                    "ready {} | processing {} | retry {} | dead {} | {live} live workers",
                    depths.ready, depths.processing, depths.retry, depths.dead
                ));
                if !kept && !shared.id_taken.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    error!(
                        "Another process has taken worker id {}; stopping. Give each process its \
                         own WORKER_ID",
                        shared.worker_id
                    );
                    shutdown.cancel();
                }
            }
            Err(e) => {
                watches.iter_mut().for_each(Watch::lost_sight);
                shared.redis_error(&e, "heartbeat");
            }
        }
    }
}

/// Reaps the queue's workers whose heartbeat this worker has watched stay unchanged for
/// WORKER_DEAD_AFTER (`liveness`); returns how many are live, and the live set as read.
async fn reap(shared: &Shared, queue: &Queue, watch: &mut Watch) -> Result<(usize, Vec<LiveWorker>), QueueError> {
    let mut workers = queue.workers().await?;
    let look = watch.look(tokio::time::Instant::now(), &shared.worker_id, &workers);
    workers.retain(|w| !look.dead.iter().any(|(id, _)| *id == w.id));
    for (id, heartbeat) in look.dead {
        if let Some(moved) = queue.reap(&id, &heartbeat).await? {
            shared.metrics.reaped(moved);
            warn!(
                queue = queue.name(),
                reaped = %id,
                count = moved,
                "Reaped a dead worker (its heartbeat did not change for WORKER_DEAD_AFTER): its \
                 claimed messages are back at the front of the queue"
            );
        }
    }
    Ok((look.live, workers))
}

/// Reads the queues for `/stats` when it asks between two beats: their depths and live sets,
/// nothing else (no heartbeat, no reaping).
async fn read_for_stats(shared: &Shared) {
    let health = &shared.health;
    let answers = health.asks();
    let read = async {
        let mut read = Vec::with_capacity(shared.queue_count());
        for (_, queue) in shared.queues() {
            read.push(QueueStat {
                queue: queue.name().to_string(),
                depths: queue.depths().await?,
                workers: queue.workers().await?,
            });
        }
        Ok::<_, QueueError>(read)
    };
    health.publish_queues(answers, read.await.map_err(|e| format!("Redis: {e}")));
}
