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
use super::settle::{log_summary, Context, StatusReport};
use crate::breaker::State;
use crate::config::{TlsSettings, WorkerSettings};
use crate::delivery::Deliverer;
use crate::metrics::Metrics;
use crate::queue::{Connector, Depths, Queue, QueueError};
use crate::telemetry::one_line;
use crate::tls::ClientTls;

/// Most due retries moved back to the queue by one promoter call.
const PROMOTE_BATCH: usize = 1000;
/// Due retries join the ready list only while it holds fewer than this: after an outage they
/// do not flood the queue (or the main server) at once.
const PROMOTE_HIGH_WATER: usize = 1000;
/// How long the promoter waits when it held due retries back for a full ready list.
const HELD_BACK_PAUSE: Duration = Duration::from_millis(250);
/// Status updates waiting while the circuit is open, one per message; past this new ones are
/// dropped (and counted).
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
                promote(context.clone(), q, worker.retry_interval, stop.clone())
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
/// open the updates wait, one per message (the latest wins), and go out when the main server
/// answers again; past `STATUS_BACKLOG` messages waiting, new ones are dropped and counted.
async fn report_statuses(
    deliverer: Arc<Deliverer>,
    metrics: Arc<Metrics>,
    mut reports: mpsc::Receiver<StatusReport>,
    limit: usize,
    mut circuit: watch::Receiver<State>,
) {
    let slots = Arc::new(Semaphore::new(limit));
    let tasks = TaskTracker::new();
    let mut waiting: HashMap<String, StatusReport> = HashMap::new();
    let mut open_circuit = true;
    loop {
        let closing = tokio::select! {
            report = reports.recv() => match report {
                Some(report) => {
                    if waiting.len() >= STATUS_BACKLOG && !waiting.contains_key(&report.message_id) {
                        metrics.status_update("dropped");
                    } else {
                        waiting.insert(report.message_id.clone(), report);
                    }
                    false
                }
                None => true,
            },
            changed = circuit.changed(), if open_circuit => {
                open_circuit = changed.is_ok();
                false
            }
        };
        let open = *circuit.borrow() == State::Open;
        if open && !closing {
            continue;
        }
        for (_, report) in waiting.drain() {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let deliverer = deliverer.clone();
            let metrics = metrics.clone();
            tasks.spawn(async move {
                let StatusReport {
                    message_id,
                    status,
                    attempt_count,
                    error,
                    trace,
                } = report;
                match deliverer.update_status(&message_id, status, attempt_count, &error, &trace).await {
                    Ok(()) => metrics.status_update("ok"),
                    Err(e) => {
                        metrics.status_update("failed");
                        // Counted in worker_status_updates_total{result="failed"}; during an outage
                        // every failed delivery brings one, so they stay out of the normal log.
                        debug!(message_id = %message_id, trace_id = %trace.trace_id, status = status.as_str(), error = %e, "Status update failed; the message itself is safe");
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
        }
        for due in context.repeats.due(false) {
            log_summary(&due);
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
        let beat = async {
            let mut kept = true;
            let mut total = (Depths::default(), 0);
            for ((q, queue), watch) in context.queues.iter().enumerate().zip(watches.iter_mut()) {
                kept &= queue.heartbeat().await?;
                let live = reap(&context, queue, watch).await?;
                let depths = queue.depths().await?;
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
        match beat.await {
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
/// WORKER_DEAD_AFTER (`liveness`); returns how many are live.
async fn reap(context: &Context, queue: &Queue, watch: &mut Watch) -> Result<usize, QueueError> {
    let workers = queue.workers().await?;
    let look = watch.look(tokio::time::Instant::now(), &context.worker_id, &workers);
    for (id, heartbeat) in look.dead {
        if let Some(moved) = queue.reap(&id, &heartbeat).await? {
            context.metrics.reaped(moved);
            warn!(queue = queue.name(), reaped = %id, count = moved, "Reaped a dead worker (its heartbeat did not change for WORKER_DEAD_AFTER): its claimed messages are back at the front of the queue");
        }
    }
    Ok(look.live)
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

/// Moves queue `q`'s due retries back to it, sleeping until the next one is due (at most a
/// second, so retries other workers schedule are picked up promptly).
async fn promote(context: Arc<Context>, q: usize, retry_interval: Duration, stop: CancellationToken) {
    let longest = retry_interval.min(Duration::from_secs(1));
    let mut backoff = Backoff::default();
    loop {
        let wait = match context.queue(q).promote_due(PROMOTE_BATCH, PROMOTE_HIGH_WATER).await {
            Ok(promoted) => {
                backoff.reset();
                if promoted.moved > 0 {
                    debug!(count = promoted.moved, "Moved due retries back to the queue");
                }
                if promoted.held_back {
                    HELD_BACK_PAUSE
                } else {
                    next_promotion(promoted.moved, promoted.next_due_in, longest)
                }
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

/// How long the promoter sleeps after moving `moved` retries: not at all after a full batch
/// (more are due), else until the next is due, but at least PROMOTE_GAP and at most `longest`.
fn next_promotion(moved: usize, next_due_in: Option<Duration>, longest: Duration) -> Duration {
    if moved == PROMOTE_BATCH {
        return Duration::ZERO;
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
            next_promotion(PROMOTE_BATCH, Some(ms(0)), second),
            Duration::ZERO,
            "full batch: go on"
        );
        assert_eq!(
            next_promotion(2, Some(ms(1)), second),
            PROMOTE_GAP,
            "one due every ms: wait the gap"
        );
        assert_eq!(
            next_promotion(0, Some(ms(300)), second),
            ms(300),
            "sleeps until the next is due"
        );
        assert_eq!(next_promotion(0, Some(ms(9_000)), second), second, "at most a second");
        assert_eq!(next_promotion(0, None, second), second, "nothing waiting");
        assert_eq!(
            next_promotion(0, Some(ms(1)), ms(5)),
            ms(5),
            "a retry interval under the gap wins"
        );
    }
}
