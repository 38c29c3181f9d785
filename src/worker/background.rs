//! What runs beside the deliveries: the heartbeat (which also reaps dead workers, refreshes
//! the depth gauges and closes kept connections the main server closed), the promoter of due retries, the TLS watcher and its SIGHUP listener,
//! the status reporter and the systemd watchdog.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use std::collections::HashMap;

use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use super::liveness::Watch;
use super::retry::Backoff;
use super::settle::{Context, StatusReport};
use crate::breaker::State;
use crate::config::{TlsSettings, WorkerSettings};
use crate::delivery::Deliverer;
use crate::health::{Health, QueueStat};
use crate::metrics::Metrics;
use crate::queue::{Connector, Depths, LiveWorker, Queue, QueueError};
use crate::telemetry::one_line;
use crate::tls::ClientTls;

/// Most due retries moved to the front of the queue by one promoter call.
const PROMOTE_BATCH: usize = 1000;
/// Status updates waiting while the circuit is not closed, one per message; past this new
/// ones are dropped (and counted).
const STATUS_BACKLOG: usize = 4096;
/// The shortest pause between two promotions that leave retries waiting. Retries fall due
/// continuously under a steady failure rate; without a floor the promoter would wake for
/// every millisecond's one or two, a script call each. 20 ms late is nothing next to a
/// retry interval of seconds.
const PROMOTE_GAP: Duration = Duration::from_millis(20);
/// Within this long of its expiry, the client certificate draws a daily warning.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// The background tasks of a running worker.
pub(super) struct Background {
    tasks: TaskTracker,
    statuses: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

/// The TLS material to watch, when TLS is on.
pub(super) struct TlsWatch {
    pub(super) settings: TlsSettings,
    pub(super) current: ClientTls,
    pub(super) reload: Arc<Notify>,
}

impl Background {
    /// Starts every background task. `shutdown` is cancelled by the heartbeat when another
    /// process takes this worker's id; `stop` ends the tasks.
    pub(super) fn start(
        context: &Arc<Context>,
        statuses: mpsc::Receiver<StatusReport>,
        worker: &WorkerSettings,
        (tls, reload_redis): (Option<TlsWatch>, Arc<Notify>),
        shutdown: &CancellationToken,
        stop: CancellationToken,
    ) -> Background {
        let tasks = TaskTracker::new();
        tasks.spawn(
            heartbeat(
                context.clone(),
                worker.heartbeat_interval,
                worker.dead_after,
                shutdown.clone(),
                stop.clone(),
            )
            .instrument(tracing::info_span!("heartbeat")),
        );
        tasks.spawn(super::sweep::sweeper(context.clone(), stop.clone()).instrument(tracing::info_span!("sweep")));
        for q in 0..context.queues.len() {
            tasks.spawn(
                promote(
                    context.clone(),
                    q,
                    Promotion {
                        retry_interval: worker.retry_interval,
                        batch_size: worker.batch_size,
                    },
                    stop.clone(),
                )
                .instrument(tracing::info_span!("promoter")),
            );
        }
        if context.connector.tls() {
            tasks.spawn(
                reload_redis_tls(context.connector.clone(), reload_redis, stop.clone())
                    .instrument(tracing::info_span!("redis-tls")),
            );
        }
        if context.connector.master_changes().is_some() {
            let connector = context.connector.clone();
            let stop = stop.clone();
            tasks.spawn(
                async move { connector.listen_for_switches(stop).await }.instrument(tracing::info_span!("sentinel")),
            );
        }
        if let Some(TlsWatch {
            settings,
            current,
            reload,
        }) = tls
        {
            tasks.spawn(
                watch_tls(
                    context.deliverer.clone(),
                    context.metrics.clone(),
                    settings,
                    current,
                    reload,
                    stop.clone(),
                )
                .instrument(tracing::info_span!("tls")),
            );
        }
        if let Some(every) = crate::service::watchdog_interval() {
            tasks.spawn(watchdog(every, stop.clone()));
        }
        let statuses = tokio::spawn(
            report_statuses(
                context.deliverer.clone(),
                context.metrics.clone(),
                statuses,
                worker.concurrency,
                context.flow.subscribe(),
            )
            .instrument(tracing::info_span!("status")),
        );
        Background { tasks, statuses, stop }
    }

    /// Stops the heartbeat, promoter, TLS watcher and watchdog, and waits for them.
    pub(super) async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Gives the status updates still queued a moment (never the whole grace again); they
    /// end once every sender (the delivery context) is gone.
    pub(super) async fn flush_statuses(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.statuses).await;
    }
}

/// Pings the systemd watchdog at half its interval.
async fn watchdog(every: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(every / 2);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => crate::service::watchdog_ping(),
        }
    }
}

/// Sends status updates with at most `limit` under way at once. While the circuit breaker is
/// not closed (open, or probing a server that may still be down) the updates wait, one per
/// message (the latest wins), and go out when it closes; past `STATUS_BACKLOG` messages
/// waiting, new ones are dropped and counted. An update the server did not take (unreachable,
/// 5xx) waits and goes again, 1 s later, then 2, 4, ... up to a minute, at most `PUT_TRIES`
/// times, and at once when the circuit closes.
async fn report_statuses(
    deliverer: Arc<Deliverer>,
    metrics: Arc<Metrics>,
    mut reports: mpsc::Receiver<StatusReport>,
    limit: usize,
    mut circuit: watch::Receiver<State>,
) {
    let slots = Arc::new(Semaphore::new(limit));
    let tasks = TaskTracker::new();
    let mut waiting: HashMap<String, Waiting> = HashMap::new();
    let (again, mut failed) = mpsc::unbounded_channel::<Waiting>();
    let mut open_circuit = true;
    loop {
        let next_try = waiting.values().filter_map(|w| w.not_before).min();
        let (closing, closed_now) = tokio::select! {
            report = reports.recv() => match report {
                Some(report) => {
                    if waiting.len() >= STATUS_BACKLOG && !waiting.contains_key(&report.message_id) {
                        metrics.status_update("dropped");
                    } else {
                        waiting.insert(report.message_id.clone(), Waiting { report, tries: 0, not_before: None });
                    }
                    (false, false)
                }
                None => (true, false),
            },
            Some(back) = failed.recv() => {
                // Kept, unless a newer update for the message is already waiting.
                if back.tries >= PUT_TRIES || waiting.len() >= STATUS_BACKLOG {
                    metrics.status_update("dropped");
                } else {
                    waiting.entry(back.report.message_id.clone()).or_insert(back);
                }
                (false, false)
            }
            changed = circuit.changed(), if open_circuit => {
                open_circuit = changed.is_ok();
                (false, *circuit.borrow() == State::Closed)
            }
            () = sleep_until_or_forever(next_try) => (false, false),
        };
        if *circuit.borrow() != State::Closed && !closing {
            continue;
        }
        let now = tokio::time::Instant::now();
        let due: Vec<String> = waiting
            .iter()
            .filter(|(_, w)| closing || closed_now || w.not_before.is_none_or(|at| at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(mut update) = waiting.remove(&id) else {
                continue;
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let deliverer = deliverer.clone();
            let metrics = metrics.clone();
            let again = again.clone();
            tasks.spawn(async move {
                let StatusReport {
                    message_id,
                    status,
                    attempt_count,
                    error,
                    trace,
                } = &update.report;
                match deliverer.update_status(message_id, *status, *attempt_count, error, trace).await {
                    Ok(()) => metrics.status_update("ok"),
                    Err(e) => {
                        metrics.status_update("failed");
                        // Counted in worker_status_updates_total{result="failed"}; during an outage
                        // every failed delivery brings one, so they stay out of the normal log.
                        debug!(message_id = %message_id, trace_id = %trace.trace_id, status = status.as_str(), error = %e, "Status update failed; the message itself is safe");
                        if not_taken(&e) {
                            update.tries = update.tries.saturating_add(1);
                            let wait = PUT_RETRY_FIRST
                                .saturating_mul(1 << update.tries.saturating_sub(1).min(6))
                                .min(PUT_RETRY_LONGEST);
                            update.not_before = Some(tokio::time::Instant::now() + wait);
                            let _ = again.send(update);
                        }
                    }
                }
                drop(permit);
            });
        }
        if closing {
            break;
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// A status update waiting to go (again).
struct Waiting {
    report: StatusReport,
    /// Times it was sent and not taken.
    tries: u32,
    /// Not before this (after a failed try).
    not_before: Option<tokio::time::Instant>,
}

/// Tries of one status update before it is given up (counted as dropped).
const PUT_TRIES: u32 = 10;
/// The wait after the first failed try; it doubles up to `PUT_RETRY_LONGEST`.
const PUT_RETRY_FIRST: Duration = Duration::from_secs(1);
const PUT_RETRY_LONGEST: Duration = Duration::from_secs(60);

/// Whether the server did not take a status update: it could not be reached, or it failed
/// (5xx). Any other answer is final.
fn not_taken(error: &crate::delivery::DeliveryError) -> bool {
    match error {
        crate::delivery::DeliveryError::Status { status, .. } => *status >= 500 || *status == 429,
        _ => true,
    }
}

async fn sleep_until_or_forever(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Heartbeats, reaps workers whose heartbeat is older than `dead_after`, counts live workers,
/// refreshes the queue-depth gauges and closes kept connections the main server closed. Stops the worker if another process takes its id.
async fn heartbeat(
    context: Arc<Context>,
    every: Duration,
    dead_after: Duration,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watches: Vec<Watch> = context.queues.iter().map(|_| Watch::new(dead_after)).collect();
    let mut sentinels_answer = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
            () = context.health.stats_wanted() => {
                read_for_stats(&context.queues, &context.health).await;
                continue;
            }
        }
        for due in context.repeats.due(false) {
            due.log();
        }
        context.deliverer.close_idle();
        // Under Sentinel: a master replaced while it still answers is left here. Sentinels
        // that do not answer say nothing about the master: the heartbeat goes on regardless.
        match context.connector.check_master().await {
            Ok(()) if !sentinels_answer => {
                sentinels_answer = true;
                info!("The sentinels answer again");
            }
            Err(e) if sentinels_answer => {
                sentinels_answer = false;
                warn!(error = %one_line(&e), "Cannot ask the sentinels where the master is; heartbeating to the master as it was");
            }
            _ => {}
        }
        let started = Instant::now();
        let answers = context.health.asks();
        let mut read = Vec::with_capacity(context.queues.len());
        let beat = async {
            let mut kept = true;
            let mut total = (Depths::default(), 0);
            for ((q, queue), watch) in context.queues.iter().enumerate().zip(watches.iter_mut()) {
                kept &= queue.heartbeat().await?;
                let (live, workers) = reap(&context, queue, watch).await?;
                let depths = queue.depths().await?;
                read.push(QueueStat {
                    queue: queue.name().to_string(),
                    depths,
                    workers,
                });
                context.metrics.set_active_workers(q, live);
                context.metrics.set_depths(q, depths);
                total.0.ready = total.0.ready.saturating_add(depths.ready);
                total.0.processing = total.0.processing.saturating_add(depths.processing);
                total.0.retry = total.0.retry.saturating_add(depths.retry);
                total.0.dead = total.0.dead.saturating_add(depths.dead);
                total.1 = total.1.max(live);
            }
            Ok::<_, QueueError>((kept, total))
        };
        let beat = beat.await;
        context.health.publish_queues(
            answers,
            match &beat {
                Ok(_) => Ok(read),
                Err(e) => Err(format!("Redis: {e}")),
            },
        );
        match beat {
            Ok((kept, (depths, live))) => {
                context.health.redis_ok(started);
                crate::service::status(&format!(
                    "ready {} | processing {} | retry {} | dead {} | {live} live workers",
                    depths.ready, depths.processing, depths.retry, depths.dead
                ));
                if !kept && !context.id_taken.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    error!(
                        "Another process has taken worker id {}; stopping. Give each process its own WORKER_ID",
                        context.worker_id
                    );
                    shutdown.cancel();
                }
            }
            Err(e) => {
                watches.iter_mut().for_each(Watch::lost_sight);
                context.redis_error(&e, "heartbeat");
            }
        }
    }
}

/// Reaps the queue's workers whose heartbeat this worker has watched stay unchanged for
/// WORKER_DEAD_AFTER (`liveness`); returns how many are live, and the live set as read.
async fn reap(context: &Context, queue: &Queue, watch: &mut Watch) -> Result<(usize, Vec<LiveWorker>), QueueError> {
    let mut workers = queue.workers().await?;
    let look = watch.look(tokio::time::Instant::now(), &context.worker_id, &workers);
    workers.retain(|w| !look.dead.iter().any(|(id, _)| *id == w.id));
    for (id, heartbeat) in look.dead {
        if let Some(moved) = queue.reap(&id, &heartbeat).await? {
            context.metrics.reaped(moved);
            warn!(queue = queue.name(), reaped = %id, count = moved, "Reaped a dead worker (its heartbeat did not change for WORKER_DEAD_AFTER): its claimed messages are back at the front of the queue");
        }
    }
    Ok((look.live, workers))
}

/// Reads the queues for `/stats` when it asks between two beats: their depths and live sets,
/// nothing else (no heartbeat, no reaping).
async fn read_for_stats(queues: &[Queue], health: &Health) {
    let answers = health.asks();
    let read = async {
        let mut read = Vec::with_capacity(queues.len());
        for queue in queues {
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

/// Turns each SIGHUP into a reload request for the TLS watchers (the main server's and
/// Redis's, those that are on), logging it, until `stop`.
pub(super) async fn forward_hangups(
    main_server: Option<Arc<Notify>>,
    redis: Option<Arc<Notify>>,
    stop: CancellationToken,
) {
    let mut hangups = crate::shutdown::ReloadRequests::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = hangups.recv() => {}
        }
        if main_server.is_none() && redis.is_none() {
            info!("SIGHUP received: TLS is disabled, so there is nothing to reload");
            continue;
        }
        info!("SIGHUP received: the TLS files will be read again");
        for reload in [&main_server, &redis].into_iter().flatten() {
            reload.notify_one();
        }
    }
}

/// Reloads the TLS files for Redis on SIGHUP: every connection moves to new ones made with
/// them. Files that do not load are refused with an error and the connections stay.
async fn reload_redis_tls(connector: Connector, reload: Arc<Notify>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = reload.notified() => {}
        }
        match connector.reload_tls().await {
            Ok(()) => info!("Reloaded the TLS files for Redis; reconnected with them"),
            Err(e) => {
                error!(error = %one_line(&e), "Refused the new TLS files for Redis; still using the previous ones")
            }
        }
    }
}

/// Reloads the TLS files on SIGHUP and when they change (checked every `reload_interval`).
/// A set that does not load is refused with an error and the current one stays in use;
/// deliveries under way finish on their connections. Warns daily when the certificate in use
/// is within 14 days of expiry.
async fn watch_tls(
    deliverer: Arc<Deliverer>,
    metrics: Arc<Metrics>,
    settings: TlsSettings,
    current: ClientTls,
    reload: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut seen = current.snapshot.clone();
    let mut not_after = current.not_after;
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        let remaining = not_after.duration_since(SystemTime::now()).unwrap_or_default();
        if remaining < EXPIRY_WARNING && warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(86_400)) {
            warn!(
                expires = %crate::tls::rfc3339(not_after),
                days_left = remaining.as_secs() / 86_400,
                "Client certificate expires soon; install a new one and send SIGHUP"
            );
            warned = Some(tokio::time::Instant::now());
        }
        let asked = tokio::select! {
            _ = stop.cancelled() => return,
            _ = reload.notified() => true,
            _ = tokio::time::sleep(settings.reload_interval) => false,
        };
        let now_seen = crate::tls::snapshot(&settings);
        if !asked && now_seen == seen {
            continue;
        }
        seen = now_seen;
        let loaded = ClientTls::load(&settings).map_err(|e| one_line(&e)).and_then(|tls| {
            deliverer.replace_tls(&tls).map_err(|e| one_line(&e))?;
            Ok(tls)
        });
        match loaded {
            Ok(tls) => {
                metrics.set_cert_expiry(tls.not_after);
                not_after = tls.not_after;
                warned = None;
                info!(subject = %tls.subject, expires = %crate::tls::rfc3339(tls.not_after), "Reloaded the TLS files; new connections use them");
            }
            Err(e) => error!(error = %e, "Refused the new TLS files; still using the previous ones"),
        }
    }
}

/// Moves queue `q`'s due retries to the front of it, sleeping until the next one is due (at
/// most a second, so retries other workers schedule are picked up promptly). A due retry goes
/// out within its interval and a promoter's pass, not behind the whole backlog. So that after
/// an outage the retries that fell due meanwhile do not shut new messages out, each pass moves
/// at most half of what this worker claimed from the queue since the last (at least a batch):
/// claims then take retries and new messages about one for one.
async fn promote(context: Arc<Context>, q: usize, settings: Promotion, stop: CancellationToken) {
    let longest = settings.retry_interval.min(Duration::from_secs(1));
    let mut backoff = Backoff::default();
    loop {
        let budget = share_of_claims(context.claimed_since(q), settings.batch_size);
        let wait = match context.queue(q).promote_due(budget).await {
            Ok(promoted) => {
                backoff.reset();
                if promoted.moved > 0 {
                    debug!(count = promoted.moved, "Moved due retries to the front of the queue");
                }
                next_promotion(promoted.moved, budget, promoted.next_due_in, longest)
            }
            Err(e) => {
                context.redis_error(&e, "promote");
                backoff.next()
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// What the promoter paces itself by.
#[derive(Debug, Clone, Copy)]
pub(super) struct Promotion {
    pub(super) retry_interval: Duration,
    pub(super) batch_size: usize,
}

/// How many due retries one pass may move: half of what was claimed since the last, at least
/// a batch, at most `PROMOTE_BATCH`.
fn share_of_claims(claimed: usize, batch_size: usize) -> usize {
    (claimed / 2).max(batch_size).clamp(1, PROMOTE_BATCH)
}

/// How long the promoter sleeps after moving `moved` of at most `budget` retries: after a full
/// pass the gap (claims take their share first), else until the next is due, but at least
/// PROMOTE_GAP and at most `longest`.
fn next_promotion(moved: usize, budget: usize, next_due_in: Option<Duration>, longest: Duration) -> Duration {
    if moved >= budget {
        return PROMOTE_GAP.min(longest);
    }
    next_due_in.map_or(longest, |due| due.clamp(PROMOTE_GAP.min(longest), longest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_promoter_batches_retries_that_fall_due_continuously() {
        let second = Duration::from_secs(1);
        let ms = Duration::from_millis;
        assert_eq!(
            next_promotion(10, 10, Some(ms(0)), second),
            PROMOTE_GAP,
            "full pass: claims take their share, then on"
        );
        assert_eq!(
            next_promotion(2, 10, Some(ms(1)), second),
            PROMOTE_GAP,
            "one due every ms: wait the gap"
        );
        assert_eq!(
            next_promotion(0, 10, Some(ms(300)), second),
            ms(300),
            "sleeps until the next is due"
        );
        assert_eq!(
            next_promotion(0, 10, Some(ms(9_000)), second),
            second,
            "at most a second"
        );
        assert_eq!(next_promotion(0, 10, None, second), second, "nothing waiting");
        assert_eq!(
            next_promotion(0, 10, Some(ms(1)), ms(5)),
            ms(5),
            "a retry interval under the gap wins"
        );
    }

    #[test]
    fn retries_take_about_half_of_what_is_claimed() {
        assert_eq!(share_of_claims(0, 10), 10, "idle: a batch a pass");
        assert_eq!(share_of_claims(400, 10), 200);
        assert_eq!(share_of_claims(1_000_000, 10), PROMOTE_BATCH);
        assert_eq!(share_of_claims(0, 0), 1);
    }
}
