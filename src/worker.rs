//! The worker: a claimer that takes only as many messages as there are free delivery slots, a
//! pool of delivery tasks that settle each outcome atomically in Redis, a promoter that moves
//! due retries back to the queue, a heartbeat, and an orderly drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt as _;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::admin::{self, AdminState, Health};
use crate::config::{Settings, TlsSettings, WorkerSettings};
use crate::delivery::{Deliverer, Status};
use crate::message::{dead_letter, DeadReason, Envelope};
use crate::metrics::Metrics;
use crate::policy::{self, Policy, Settle};
use crate::queue::{self, Queue, QueueError};
use crate::telemetry::{Due, Repeat, Repeats};
use crate::tls::ClientTls;

/// Most due retries moved back to the queue by one promoter call.
const PROMOTE_BATCH: usize = 1000;
/// The shortest pause between two promotions that leave retries waiting. Retries fall due
/// continuously under a steady failure rate; without a floor the promoter would wake for
/// every millisecond's one or two, a script call each. 20 ms late is nothing next to a
/// retry interval of seconds.
const PROMOTE_GAP: Duration = Duration::from_millis(20);
/// At most one summary line per cause in this long (the first occurrence is logged at once).
const LOG_SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// Status updates waiting to be sent; past this they are dropped (and counted).
const STATUS_BACKLOG: usize = 4096;

/// Why the worker could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Fixing the configuration is the only remedy (exit 78).
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Fatal(String),
}

/// A status update for the main server, sent in the background.
struct StatusReport {
    message_id: String,
    status: Status,
    attempt_count: u32,
    error: String,
}

/// What every delivery task needs.
struct Context {
    worker_id: String,
    queue: Queue,
    deliverer: Arc<Deliverer>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    status: mpsc::Sender<StatusReport>,
    /// Retry, dead-letter and invalid-message lines, summarised per cause.
    repeats: Repeats,
    /// What each attempt's result means.
    policy: Policy,
    max_message_bytes: usize,
}

/// Within this long of its expiry, the client certificate draws a daily warning.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// A started worker: its admin port is listening; `run` does the work.
pub struct Worker {
    settings: Settings,
    tls: Option<ClientTls>,
    deliverer: Arc<Deliverer>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    admin: Arc<AdminState>,
    admin_addr: Option<SocketAddr>,
    /// Cancelled by the caller: stop claiming and drain.
    shutdown: CancellationToken,
    /// Cancelled by the worker itself once drained: stops the admin port and background tasks.
    background: CancellationToken,
    /// Notified on SIGHUP: read the TLS files again.
    reload: Arc<Notify>,
}

impl Worker {
    /// Builds the HTTP client and opens the admin port. Nothing touches Redis yet.
    pub async fn start(
        settings: Settings,
        tls: Option<ClientTls>,
        shutdown: CancellationToken,
    ) -> Result<Worker, RunError> {
        let worker_id = settings.worker.id.clone();
        let metrics = Arc::new(Metrics::new(&worker_id));
        if let Some(tls) = &tls {
            metrics.set_cert_expiry(tls.not_after);
        }
        let deliverer = Deliverer::new(
            &settings.main_server,
            tls.as_ref(),
            &worker_id,
            settings.worker.concurrency,
        )
        .map_err(|e| RunError::Config(format!("main_server: {e}")))?;
        // SIGHUP is ours from here in every state (connecting, waiting for the id, running,
        // draining): a reload request is remembered until the TLS watcher takes it.
        let reload = Arc::new(Notify::new());
        let background = CancellationToken::new();
        tokio::spawn(forward_hangups(reload.clone(), tls.is_some(), background.clone()));
        let health = Arc::new(Health::new(metrics.clone()));
        let admin = Arc::new(AdminState::new(
            worker_id.clone(),
            settings.redis.queue_name.clone(),
            metrics.clone(),
            health.clone(),
        ));
        let mut admin_addr = None;
        if settings.metrics.enabled {
            let listener = admin::bind(SocketAddr::new(settings.metrics.bind, settings.metrics.port))
                .await
                .map_err(RunError::Config)?;
            let addr = listener.local_addr().map_err(|e| RunError::Fatal(e.to_string()))?;
            info!(address = %addr, "Prometheus metrics server started on port {}", addr.port());
            tokio::spawn(
                admin::serve(listener, admin.clone(), admin::Limits::default(), background.clone())
                    .instrument(tracing::info_span!("admin")),
            );
            admin_addr = Some(addr);
        }
        Ok(Worker {
            settings,
            tls,
            deliverer: Arc::new(deliverer),
            metrics,
            health,
            admin,
            admin_addr,
            shutdown,
            background,
            reload,
        })
    }

    /// Where `/metrics` and friends are served, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Connects to Redis (waiting for it if need be), recovers this worker's leftovers, then
    /// claims and delivers until `shutdown` is cancelled, and drains.
    pub async fn run(self) -> Result<(), RunError> {
        let Worker {
            settings,
            tls,
            deliverer,
            metrics,
            health,
            admin,
            admin_addr: _,
            shutdown,
            background,
            reload,
        } = self;
        let Settings {
            redis,
            worker,
            tls: tls_settings,
            ..
        } = settings;
        info!(
            queue = %redis.queue_name,
            concurrency = worker.concurrency,
            batch_size = worker.batch_size,
            retry_interval = ?worker.retry_interval,
            max_attempts = worker.max_attempts,
            "Worker {} starting...", worker.id
        );

        let client = queue::client(&redis).map_err(|e| RunError::Config(format!("redis: {e}")))?;
        let Some(queue) = connect(&client, &redis.queue_name, &worker.id, &health, &shutdown).await? else {
            background.cancel();
            return Ok(());
        };
        info!("Connected to Redis at {}:{}", redis.host, redis.port);
        let _ = admin.queue.set(queue.clone());
        if !take_id(&queue, &worker, &health, &shutdown).await? {
            background.cancel();
            return Ok(());
        }

        let recovered = retry_redis(&health, &shutdown, || queue.give_back(&worker.id))
            .await
            .unwrap_or(0);
        if recovered > 0 {
            warn!(
                count = recovered,
                "Returned messages left in this worker's processing list to the queue"
            );
        }

        let (status_tx, status_rx) = mpsc::channel(STATUS_BACKLOG);
        let context = Arc::new(Context {
            worker_id: worker.id.clone(),
            queue: queue.clone(),
            deliverer: deliverer.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            status: status_tx,
            repeats: Repeats::new(LOG_SUMMARY_EVERY),
            policy: Policy {
                max_attempts: worker.max_attempts,
                retry_interval: worker.retry_interval,
                max_retry_after: policy::MAX_RETRY_AFTER,
            },
            max_message_bytes: worker.max_message_bytes,
        });

        let background_tasks = TaskTracker::new();
        background_tasks.spawn(
            heartbeat(
                context.clone(),
                worker.heartbeat_interval,
                worker.dead_after,
                shutdown.clone(),
                background.clone(),
            )
            .instrument(tracing::info_span!("heartbeat")),
        );
        background_tasks.spawn(
            promote(context.clone(), worker.retry_interval, background.clone())
                .instrument(tracing::info_span!("promoter")),
        );
        if let Some(tls) = tls {
            background_tasks.spawn(
                watch_tls(
                    deliverer.clone(),
                    metrics.clone(),
                    tls_settings,
                    tls,
                    reload,
                    background.clone(),
                )
                .instrument(tracing::info_span!("tls")),
            );
        }
        let statuses = tokio::spawn(
            report_statuses(deliverer, metrics.clone(), status_rx, worker.concurrency)
                .instrument(tracing::info_span!("status")),
        );

        if let Some(every) = crate::service::watchdog_interval() {
            let stop = background.clone();
            background_tasks.spawn(async move {
                let mut ticker = tokio::time::interval(every / 2);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = ticker.tick() => crate::service::watchdog_ping(),
                    }
                }
            });
        }
        crate::service::ready(&format!("Delivering from {} as {}", redis.queue_name, worker.id));

        let deliveries = TaskTracker::new();
        claim(&context, &deliveries, worker.concurrency, worker.batch_size, &shutdown).await;

        // Draining: no new claims; in-flight deliveries finish within the grace period.
        crate::service::stopping();
        health.set_draining();
        deliveries.close();
        info!(in_flight = deliveries.len(), grace = ?worker.shutdown_grace, "Stopping: no new claims; finishing in-flight deliveries");
        if tokio::time::timeout(worker.shutdown_grace, deliveries.wait())
            .await
            .is_err()
        {
            warn!(
                in_flight = deliveries.len(),
                "Grace period over; returning unfinished messages to the queue"
            );
        }
        for due in context.repeats.due(true) {
            log_summary(&due);
        }
        // Anything still in processing goes back to the front of the queue. A delivery still
        // under way that settles after this finds its message gone and changes nothing.
        let returned = match queue.give_back(&worker.id).await {
            Ok(n) => {
                if n > 0 {
                    info!(count = n, "Returned unfinished messages to the queue");
                }
                true
            }
            Err(e) => {
                error!(
                    error = %e,
                    "Could not return unfinished messages; they stay in processing until a worker with this id starts or a live worker reaps this one"
                );
                false
            }
        };
        // Stop the heartbeat before leaving the live set, or a late tick would rejoin it.
        background.cancel();
        background_tasks.close();
        background_tasks.wait().await;
        // Leave only once nothing is left in processing: a worker that has left is never reaped.
        if returned {
            if let Err(e) = queue.deregister().await {
                warn!(error = %e, "Could not remove this worker from the live set; it will be reaped");
            }
        }
        drop(context);
        // Best effort: give queued status updates a moment, never the whole grace again.
        let _ = tokio::time::timeout(Duration::from_secs(2), statuses).await;
        info!("Worker {} stopped", worker.id);
        Ok(())
    }
}

/// Connects to Redis, waiting with backoff while it is unreachable. `None`: shut down first.
async fn connect(
    client: &redis::Client,
    queue_name: &str,
    worker_id: &str,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<Option<Queue>, RunError> {
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        match Queue::connect(client, queue_name, worker_id).await {
            Ok(queue) => {
                let version = queue
                    .server_version()
                    .await
                    .map_err(|e| RunError::Fatal(format!("Redis: {e}")))?;
                if !queue::supported_version(&version) {
                    return Err(RunError::Config(format!(
                        "redis: server version {version} is too old; courier needs Redis 6.2 or newer (LMOVE, BLMOVE)"
                    )));
                }
                health.redis_ok(started);
                return Ok(Some(queue));
            }
            Err(e) if e.is_auth() => {
                return Err(RunError::Config(format!(
                    "redis.password (REDIS_PASSWORD): Redis refused the credentials ({e}); set the right password"
                )))
            }
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

/// Takes this worker's id in Redis. A live process holding it is given `dead_after` to go
/// quiet (a crashed holder elsewhere does); a holder on this host whose process is gone is
/// taken over at once. `false`: shut down while waiting.
async fn take_id(
    queue: &Queue,
    worker: &WorkerSettings,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<bool, RunError> {
    let mut waited_since: Option<tokio::time::Instant> = None;
    let mut dead_holder: Option<String> = None;
    loop {
        let Some(taken) = retry_redis(health, shutdown, || {
            queue.register(worker.dead_after, dead_holder.as_deref())
        })
        .await
        else {
            return Ok(false);
        };
        let holder = match taken {
            Ok(()) => return Ok(true),
            Err(holder) => holder,
        };
        if holder.host == queue::this_host() && !process_alive(holder.pid) {
            info!(holder = %holder, "Taking over worker id {} from a process that no longer runs", worker.id);
            dead_holder = Some(holder.token);
            continue;
        }
        let since = *waited_since.get_or_insert_with(|| {
            warn!(holder = %holder, "Worker id {} is held by another process; waiting up to {:?} for it to go quiet", worker.id, worker.dead_after);
            tokio::time::Instant::now()
        });
        if since.elapsed() >= worker.dead_after {
            return Err(RunError::Config(format!(
                "worker.id (WORKER_ID) = {}: already in use by a live worker, {holder}; give each process its own WORKER_ID",
                worker.id
            )));
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

/// Claims messages while there are free slots, until shutdown.
async fn claim(
    context: &Arc<Context>,
    deliveries: &TaskTracker,
    concurrency: usize,
    batch_size: usize,
    shutdown: &CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut backoff = Backoff::default();
    // Set when a claim failed: its reply may have been lost after Redis ran it, leaving claimed
    // messages in processing that no task holds. Once every slot is free, anything left in
    // processing is such an orphan and goes back to the queue.
    let mut sweep = false;
    loop {
        if sweep {
            let all = tokio::select! {
                _ = shutdown.cancelled() => return,
                permits = slots.clone().acquire_many_owned(concurrency as u32) => match permits {
                    Ok(permits) => permits,
                    Err(_) => return,
                },
            };
            match context.queue.give_back(&context.worker_id).await {
                Ok(n) => {
                    sweep = false;
                    if n > 0 {
                        warn!(count = n, "Returned messages whose claim reply was lost to the queue");
                    }
                }
                Err(e) => {
                    context.redis_error(&e, "sweep");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next()) => {}
                    }
                }
            }
            drop(all);
            continue;
        }
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let mut permits = vec![first];
        while permits.len() < batch_size {
            match slots.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        // Not interrupted by shutdown: it is one short script, and whatever it claims is either
        // delivered here or given back by the drain.
        let started = Instant::now();
        let claimed = match context.queue.claim(permits.len(), context.max_message_bytes).await {
            Ok(claimed) => {
                context.health.redis_ok(started);
                backoff.reset();
                if claimed.too_large > 0 {
                    context.too_large(claimed.too_large);
                }
                claimed.items
            }
            Err(e) => {
                drop(permits);
                sweep = true;
                context.redis_error(&e, "claim");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next()) => continue,
                }
            }
        };
        if claimed.is_empty() {
            drop(permits);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                waited = context.queue.wait_for_ready() => if let Err(e) = waited {
                    // The wait has a connection of its own, which finds out about an outage on
                    // its own schedule; health follows the main connection, which the next
                    // claim uses.
                    debug!(error = %e, "Waiting for messages failed; claiming again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next()) => {}
                    }
                },
            }
            continue;
        }
        for (raw, permit) in claimed.into_iter().zip(permits) {
            let context = context.clone();
            let raw = Bytes::from(raw);
            deliveries.spawn(
                async move {
                    // A panic anywhere in the delivery must not leave the message in processing
                    // with no task to settle it: catch it here and dead-letter the message.
                    let outcome = AssertUnwindSafe(context.process(raw.clone())).catch_unwind().await;
                    if let Err(panic) = outcome {
                        context.internal_error(&raw, &panic_text(panic.as_ref())).await;
                    }
                    drop(permit);
                }
                .instrument(tracing::debug_span!("message")),
            );
        }
    }
}

impl Context {
    fn redis_error(&self, error: &QueueError, during: &str) {
        if error.is_unavailable() {
            self.health.redis_failed(error);
        } else {
            error!(error = %error, during, "Redis refused a command");
        }
    }

    /// Counts and reports items the claim script moved to the dead-letter list for their size.
    fn too_large(&self, count: usize) {
        let label = "too_large";
        let error = format!(
            "over the {}-byte limit (worker.max_message_bytes)",
            self.max_message_bytes
        );
        for _ in 0..count {
            self.metrics.invalid(label);
            self.metrics.dead(label);
            self.repeat(Repeat::Invalid, label, "(not read)", &error, || {
                warn!(reason = label, error = %error, "Invalid message moved to the dead-letter list without being read");
            });
        }
    }

    /// Logs an event that can repeat for every message through the summary: `full` logs the
    /// first in full; later ones within the interval are counted and reported together.
    fn repeat(&self, kind: Repeat, cause: &'static str, message_id: &str, error: &str, full: impl FnOnce()) {
        match self.repeats.record(kind, cause, message_id, error) {
            Some(1) => full(),
            Some(count) => log_summary(&Due {
                kind,
                cause,
                count,
                message_id: message_id.to_string(),
                error: error.to_string(),
            }),
            None => {}
        }
    }

    /// Delivers one claimed item and settles the outcome.
    async fn process(&self, raw: Bytes) {
        #[cfg(feature = "fault-injection")]
        if raw.starts_with(b"{\"message_id\":\"courier-test-panic") {
            panic!("fault injection: a delivery task panics");
        }
        let envelope = match Envelope::parse(raw, self.max_message_bytes) {
            Ok(envelope) => envelope,
            Err((raw, malformed)) => {
                let reason = DeadReason::Malformed(malformed.label());
                self.metrics.invalid(malformed.label());
                let record = dead_letter(&raw, reason, &malformed.to_string(), &self.worker_id, None);
                if self.settle(|| self.queue.dead(&raw, &record)).await {
                    self.metrics.dead(reason.label());
                }
                let error = malformed.to_string();
                self.repeat(Repeat::Invalid, reason.label(), "(invalid)", &error, || {
                    warn!(reason = reason.label(), error = %error, "Invalid message moved to the dead-letter list");
                });
                return;
            }
        };
        if let Some(settle) = policy::before_attempt(envelope.attempt_count(), &self.policy) {
            let error = format!(
                "attempt_count {} is already at max_attempts {}",
                envelope.attempt_count(),
                self.policy.max_attempts
            );
            self.carry_out(&envelope, settle, "", &error).await;
            return;
        }
        if envelope.attempt_count() == 0 {
            if let Some(waited) = envelope.waited(SystemTime::now()) {
                self.metrics.queue_wait(waited);
            }
        }

        let _processing = self.metrics.processing();
        let id = envelope.message_id();
        debug!(
            message_id = id,
            "Processing message {id} (attempt {}/{})",
            u64::from(envelope.attempt_count()) + 1,
            self.policy.max_attempts
        );
        let attempt = self.deliverer.deliver(&envelope).await;
        let (cause, error) = match &attempt.result {
            Ok(()) => {
                self.metrics.delivered(attempt.elapsed);
                ("", String::new())
            }
            Err(e) => {
                self.metrics.failed(e.label(), e.status_class(), attempt.elapsed);
                (e.label(), e.to_string())
            }
        };
        let settle = policy::decide(&attempt.result, envelope.attempt_count(), &self.policy);
        self.carry_out(&envelope, settle, cause, &error).await;
    }

    /// Carries out a decision: the one place that settles a message in Redis, records what was
    /// decided in the metrics, writes the log line and queues the status update. `cause` is
    /// the failure's metric label, `error` its text.
    async fn carry_out(&self, envelope: &Envelope, settle: Settle, cause: &'static str, error: &str) {
        let id = envelope.message_id();
        match settle {
            Settle::Ack => {
                self.settle(|| self.queue.ack(envelope.raw())).await;
                debug!(message_id = id, "Message {id} delivered successfully");
            }
            Settle::Retry { delay, failures } => {
                let retried = envelope.with_attempt_count(failures);
                if self.settle(|| self.queue.retry(envelope.raw(), &retried, delay)).await {
                    self.metrics.retried();
                }
                self.repeat(Repeat::Retry, cause, id, error, || {
                    warn!(message_id = id, attempt = failures, max_attempts = self.policy.max_attempts, retry_in = ?delay, error, "Delivery failed; will retry");
                });
                self.report(id, Status::Queued, failures, error.to_string());
            }
            Settle::Dead { reason, failures } => {
                let record = dead_letter(
                    &envelope.with_attempt_count(failures),
                    reason,
                    error,
                    &self.worker_id,
                    Some(id),
                );
                if self.settle(|| self.queue.dead(envelope.raw(), &record)).await {
                    self.metrics.dead(reason.label());
                }
                self.repeat(Repeat::DeadLetter, reason.label(), id, error, || {
                    error!(
                        message_id = id,
                        reason = reason.label(),
                        attempts = failures,
                        error,
                        "Message {id} moved to the dead-letter list"
                    );
                });
                self.report(id, Status::Failed, failures, error.to_string());
            }
        }
    }

    /// The second line of defence: a delivery task panicked. The message goes to the
    /// dead-letter list exactly as it was claimed, with reason `internal_error`.
    async fn internal_error(&self, raw: &Bytes, panic: &str) {
        let reason = DeadReason::InternalError;
        // Whatever panicked may be the parser itself: ask it again only behind a guard.
        let id = std::panic::catch_unwind(|| {
            Envelope::parse(raw.clone(), usize::MAX)
                .ok()
                .map(|e| e.message_id().to_string())
        })
        .ok()
        .flatten();
        let error = format!("courier failed while handling this message: {panic}");
        let record = dead_letter(raw, reason, &error, &self.worker_id, id.as_deref());
        if self.settle(|| self.queue.dead(raw, &record)).await {
            self.metrics.dead(reason.label());
        }
        error!(
            message_id = id.as_deref().unwrap_or("(unreadable)"),
            reason = reason.label(),
            error = %error,
            "A delivery task failed unexpectedly; message moved to the dead-letter list. Please report this as a bug"
        );
    }

    /// Runs a settle until Redis has recorded it. While Redis is unreachable the outcome is held
    /// here (and the slot with it, so no new work is claimed). Returns whether the message was
    /// still ours to settle.
    async fn settle<F, Fut>(&self, op: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<bool, QueueError>>,
    {
        let mut backoff = Backoff::default();
        loop {
            let started = Instant::now();
            match op().await {
                Ok(found) => {
                    self.health.redis_ok(started);
                    if !found {
                        debug!("Message was no longer in this worker's processing list; another worker has it");
                    }
                    return found;
                }
                Err(e) if e.is_unavailable() => {
                    self.health.redis_failed(&e);
                    tokio::time::sleep(backoff.next()).await;
                }
                Err(e) => {
                    error!(error = %e, "Redis refused to record an outcome; the message stays in processing and returns to the queue at the next start");
                    return false;
                }
            }
        }
    }

    /// Queues a best-effort status update; never waits.
    fn report(&self, message_id: &str, status: Status, attempt_count: u32, error: String) {
        let report = StatusReport {
            message_id: message_id.to_string(),
            status,
            attempt_count,
            error,
        };
        if self.status.try_send(report).is_err() {
            self.metrics.status_update("dropped");
        }
    }
}

/// Runs a Redis call until it succeeds or shutdown; `None` on shutdown or a non-transient error.
async fn retry_redis<T, F, Fut>(health: &Health, shutdown: &CancellationToken, op: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, QueueError>>,
{
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        match op().await {
            Ok(value) => {
                health.redis_ok(started);
                return Some(value);
            }
            Err(e) if e.is_unavailable() => {
                health.redis_failed(&e);
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff.next()) => {}
                }
            }
            Err(e) => {
                error!(error = %e, "Redis refused a command");
                return None;
            }
        }
    }
}

/// Sends status updates with at most `limit` under way at once.
async fn report_statuses(
    deliverer: Arc<Deliverer>,
    metrics: Arc<Metrics>,
    mut reports: mpsc::Receiver<StatusReport>,
    limit: usize,
) {
    let slots = Arc::new(Semaphore::new(limit));
    let tasks = TaskTracker::new();
    while let Some(report) = reports.recv().await {
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
            } = report;
            match deliverer.update_status(&message_id, status, attempt_count, &error).await {
                Ok(()) => metrics.status_update("ok"),
                Err(e) => {
                    metrics.status_update("failed");
                    // Counted in worker_status_updates_total{result="failed"}; during an outage
                    // every failed delivery brings one, so they stay out of the normal log.
                    debug!(message_id = %message_id, status = status.as_str(), error = %e, "Status update failed; the message itself is safe");
                }
            }
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// Heartbeats, reaps workers whose heartbeat is older than `dead_after`, counts live workers
/// and refreshes the queue-depth gauges. Stops the worker if another process takes its id.
async fn heartbeat(
    context: Arc<Context>,
    every: Duration,
    dead_after: Duration,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for due in context.repeats.due(false) {
            log_summary(&due);
        }
        let queue = &context.queue;
        let started = Instant::now();
        let beat = async {
            let kept = queue.heartbeat().await?;
            let workers = queue.workers().await?;
            let mut live = 0;
            for (id, age) in &workers {
                if *age < dead_after || *id == context.worker_id {
                    live += 1;
                } else if let Some(moved) = queue.reap(id, dead_after).await? {
                    context.metrics.reaped(moved);
                    warn!(reaped = %id, count = moved, heartbeat_age = ?age, "Reaped a dead worker: its claimed messages are back at the front of the queue");
                }
            }
            let depths = queue.depths().await?;
            Ok::<_, QueueError>((kept, live, depths))
        };
        match beat.await {
            Ok((kept, live, depths)) => {
                context.health.redis_ok(started);
                context.metrics.set_active_workers(live);
                context.metrics.set_depths(depths);
                crate::service::status(&format!(
                    "ready {} | processing {} | retry {} | dead {} | {live} live workers",
                    depths.ready, depths.processing, depths.retry, depths.dead
                ));
                if !kept && !shutdown.is_cancelled() {
                    error!(
                        "Another process has taken worker id {}; stopping. Give each process its own WORKER_ID",
                        context.worker_id
                    );
                    shutdown.cancel();
                }
            }
            Err(e) => context.redis_error(&e, "heartbeat"),
        }
    }
}

/// Turns each SIGHUP into a reload request for the TLS watcher, logging it, until `stop`.
async fn forward_hangups(reload: Arc<Notify>, tls: bool, stop: CancellationToken) {
    let mut hangups = crate::shutdown::ReloadRequests::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = hangups.recv() => {}
        }
        if tls {
            info!("SIGHUP received: the TLS files will be read again");
            reload.notify_one();
        } else {
            info!("SIGHUP received: TLS is disabled, so there is nothing to reload");
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
        let loaded = ClientTls::load(&settings).map_err(|e| e.to_string()).and_then(|tls| {
            deliverer.replace_tls(&tls).map_err(|e| e.to_string())?;
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

/// Moves due retries back to the queue, sleeping until the next one is due (at most a second,
/// so retries other workers schedule are picked up promptly).
async fn promote(context: Arc<Context>, retry_interval: Duration, stop: CancellationToken) {
    let longest = retry_interval.min(Duration::from_secs(1));
    let mut backoff = Backoff::default();
    loop {
        let wait = match context.queue.promote_due(PROMOTE_BATCH).await {
            Ok(promoted) => {
                backoff.reset();
                if promoted.moved > 0 {
                    debug!(count = promoted.moved, "Moved due retries back to the queue");
                }
                next_promotion(promoted.moved, promoted.next_due_in, longest)
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

/// One summary line for events counted since the last line of their kind and cause.
fn log_summary(due: &Due) {
    let Due {
        kind,
        cause,
        count,
        message_id,
        error,
    } = due;
    match kind {
        Repeat::Retry => {
            warn!(cause, count, latest_message_id = %message_id, latest_error = %error, "Delivery failed {count} more times ({cause}) since the last report; each will be retried")
        }
        Repeat::DeadLetter => {
            error!(reason = cause, count, latest_message_id = %message_id, latest_error = %error, "{count} more messages moved to the dead-letter list ({cause}) since the last report")
        }
        Repeat::Invalid => {
            warn!(reason = cause, count, latest_error = %error, "{count} more invalid messages moved to the dead-letter list ({cause}) since the last report")
        }
    }
}

/// The text a panic was raised with, when it was a string.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".to_string())
}

/// Capped exponential backoff: 100 ms doubling to 5 s.
#[derive(Default)]
struct Backoff {
    attempts: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = Duration::from_millis(100) * 2u32.saturating_pow(self.attempts.min(6));
        self.attempts += 1;
        delay.min(Duration::from_secs(5))
    }

    fn reset(&mut self) {
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }

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
