//! Delivering one claimed message and settling the outcome: parse, ask the main server, let
//! `policy` decide, and carry the decision out in Redis, the metrics, the log and a status
//! update. A task that fails unexpectedly still settles its message, as `internal_error`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use super::retry::until_answered;
use crate::breaker::Treat;
use crate::config::{QueueOrder, WorkerSettings};
use crate::delivery::{Deliverer, Status};
use crate::health::Health;
use crate::message::{dead_letter, dead_letter_traced, DeadReason, Envelope};
use crate::metrics::Metrics;
use crate::policy::{self, Kind, Outcomes, Policy, Settle};
use crate::queue::{Connector, Queue, QueueError};
use crate::telemetry::{Due, Repeat, Repeats};

/// At most one summary line per cause in this long (the first occurrence is logged at once).
const LOG_SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// A status update for the main server, sent in the background.
pub(super) struct StatusReport {
    pub(super) message_id: String,
    pub(super) status: Status,
    pub(super) attempt_count: u32,
    pub(super) error: String,
    /// The message's trace, for the PUT's `traceparent`.
    pub(super) trace: crate::trace::TraceContext,
}

/// What every delivery task needs.
pub(super) struct Context {
    pub(super) worker_id: String,
    /// The worker's queues, in the configured order; a claimed message carries its index.
    pub(super) queues: Vec<Queue>,
    /// How the queues were reached, for following a Sentinel master.
    pub(super) connector: Connector,
    pub(super) order: QueueOrder,
    pub(super) deliverer: Arc<Deliverer>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    pub(super) status: mpsc::Sender<StatusReport>,
    /// Retry, dead-letter and invalid-message lines, summarised per cause.
    pub(super) repeats: Repeats,
    /// What each attempt's result means.
    pub(super) policy: Policy,
    /// The statuses whose outcome the operator set.
    pub(super) outcomes: Outcomes,
    pub(super) max_message_bytes: usize,
    /// Reclaims past which a message is dead-lettered as `poisoned` (0: never).
    pub(super) max_reclaims: u32,
    /// The circuit breaker, the pause on Retry-After and the rate limit.
    pub(super) flow: super::flow::Flow,
    /// Each queue's acknowledgements, gathered into pipelines.
    pub(super) acks: Vec<crate::queue::Acks>,
    /// Set by the heartbeat when another process has taken this worker's id.
    pub(super) id_taken: std::sync::atomic::AtomicBool,
    /// What the delivery tasks hold, for telling strays in the processing lists (`sweep`).
    pub(super) held: Arc<super::sweep::Held>,
    /// Items claimed from each queue since its promoter last looked (it paces itself by them).
    claimed: Vec<std::sync::atomic::AtomicUsize>,
}

impl Context {
    pub(super) fn new(
        worker: &WorkerSettings,
        (connector, queues, order): (Connector, Vec<Queue>, QueueOrder),
        deliverer: Arc<Deliverer>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        status: mpsc::Sender<StatusReport>,
    ) -> Context {
        let flow = super::flow::Flow::new(worker, health.clone(), metrics.clone());
        let queue_count = queues.len();
        Context {
            worker_id: worker.id.clone(),
            acks: queues.iter().map(Queue::acks).collect(),
            queues,
            connector,
            order,
            deliverer,
            metrics,
            health,
            status,
            repeats: Repeats::new(LOG_SUMMARY_EVERY),
            policy: Policy {
                max_attempts: worker.max_attempts,
                retry_interval: worker.retry_interval,
                max_retry_after: policy::MAX_RETRY_AFTER,
                backoff: worker.retry_backoff,
                jitter: worker.retry_jitter,
            },
            outcomes: worker.outcomes.clone(),
            max_message_bytes: worker.max_message_bytes,
            max_reclaims: worker.max_reclaims,
            flow,
            id_taken: std::sync::atomic::AtomicBool::new(false),
            held: Arc::default(),
            claimed: (0..queue_count)
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect(),
        }
    }

    /// Records a failed Redis call: an outage in `health`, a refusal in the log. Either way
    /// the call may have run without its reply arriving, so the sweeper is asked to look for
    /// strays.
    pub(super) fn redis_error(&self, error: &QueueError, during: &str) {
        self.held.wake.notify_one();
        if error.is_unavailable() {
            self.health.redis_failed(error);
        } else {
            error!(error = %error, during, "Redis refused a command");
        }
    }

    /// Counts items claimed from queue `q`, for its promoter.
    pub(super) fn claimed(&self, q: usize, count: usize) {
        if let Some(claimed) = self.claimed.get(q) {
            claimed.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Items claimed from queue `q` since the last call.
    pub(super) fn claimed_since(&self, q: usize) -> usize {
        self.claimed
            .get(q)
            .map_or(0, |claimed| claimed.swap(0, std::sync::atomic::Ordering::Relaxed))
    }

    /// Queue `q` of this worker. Indexes come only from the claimer, which takes them from
    /// this list.
    pub(super) fn queue(&self, q: usize) -> &Queue {
        &self.queues[q]
    }

    /// Counts and reports items the claim script moved to the dead-letter list for their size.
    pub(super) fn too_large(&self, q: usize, count: usize) {
        let label = "too_large";
        let error = format!(
            "over the {}-byte limit (worker.max_message_bytes)",
            self.max_message_bytes
        );
        for _ in 0..count {
            self.metrics.invalid(q, label);
            self.metrics.dead(q, label);
            self.repeat(Repeat::Invalid, label, "(not read)", &error, || {
                warn!(reason = label, error = %error, "Invalid message moved to the dead-letter list without being read");
            });
        }
    }

    /// Counts and reports items the claim script dead-lettered as `poisoned`: workers kept
    /// dying while holding them.
    pub(super) fn poisoned(&self, q: usize, count: usize) {
        let label = "poisoned";
        let error = format!(
            "returned to the queue more than {} times by workers that died holding it (worker.max_reclaims)",
            self.max_reclaims
        );
        for _ in 0..count {
            self.metrics.dead(q, label);
            error!(
                queue = self.queue(q).name(),
                reason = label,
                error = %error,
                "A message that workers kept dying on was moved to the dead-letter list; `courier dlq show` has it"
            );
        }
    }

    /// Logs an event that can repeat for every message through the summary: `full` logs the
    /// first in full; later ones within the interval are counted and reported together.
    fn repeat(&self, kind: Repeat, cause: &'static str, message_id: &str, error: &str, full: impl FnOnce()) {
        match self.repeats.record(kind, cause, message_id, error) {
            Some(1) => full(),
            Some(count) => Due {
                kind,
                cause,
                count,
                message_id: message_id.to_string(),
                error: error.to_string(),
            }
            .log(),
            None => {}
        }
    }

    /// Delivers one item claimed from queue `q` and settles the outcome.
    pub(super) async fn process(&self, q: usize, raw: Bytes) {
        #[cfg(feature = "fault-injection")]
        if raw.starts_with(b"{\"message_id\":\"courier-test-panic") {
            panic!("fault injection: a delivery task panics");
        }
        let envelope = match Envelope::parse(raw, self.max_message_bytes) {
            Ok(envelope) => envelope,
            Err((raw, malformed)) => {
                let reason = DeadReason::Malformed(malformed.label());
                self.metrics.invalid(q, malformed.label());
                let record = dead_letter(&raw, reason, &malformed.to_string(), &self.worker_id, None);
                if self.settle(|| self.queue(q).dead(&raw, &record)).await {
                    self.metrics.dead(q, reason.label());
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
            self.carry_out(q, &envelope, settle, "", &error).await;
            return;
        }
        if envelope.attempt_count() == 0 {
            if let Some(waited) = envelope.waited(SystemTime::now()) {
                self.metrics.queue_wait(q, waited);
            }
        }

        let _processing = self.metrics.processing();
        let id = envelope.message_id();
        debug!(
            message_id = id,
            trace_id = %envelope.trace_id(),
            "Processing message {id} (attempt {}/{})",
            u64::from(envelope.attempt_count()) + 1,
            self.policy.max_attempts
        );
        let attempt = self.deliverer.deliver(&envelope).await;
        let outcome = self.outcomes.classify(&attempt.result);
        match self
            .flow
            .record(&outcome, envelope.attempt_count() > 0, attempt.elapsed)
        {
            Treat::AsClassified => {}
            // The server failed as the circuit opened: not the message's doing. It goes back to
            // the front of its queue as it was, no attempt used, no status update.
            Treat::Release => {
                if let Err(e) = &attempt.result {
                    self.metrics.failed(q, e.label(), e.status_class(), attempt.elapsed);
                }
                if self.settle(|| self.queue(q).release(envelope.raw())).await {
                    self.metrics.released(q);
                }
                return;
            }
            // A probe the server failed: to the back of the queue as it was, so the next
            // probe is another message.
            Treat::Rotate => {
                if let Err(e) = &attempt.result {
                    self.metrics.failed(q, e.label(), e.status_class(), attempt.elapsed);
                }
                if self.settle(|| self.queue(q).rotate(envelope.raw())).await {
                    self.metrics.released(q);
                }
                return;
            }
        }
        let (cause, error) = match (&attempt.result, outcome.kind) {
            (Ok(()), _) => {
                self.metrics.delivered(q, attempt.elapsed);
                ("", String::new())
            }
            (Err(e), Kind::Delivered) => {
                // The operator counts this status as delivered (MAIN_SERVER_OUTCOMES).
                self.metrics.delivered(q, attempt.elapsed);
                debug!(message_id = id, error = %crate::telemetry::one_line(e), "Counted as delivered (MAIN_SERVER_OUTCOMES)");
                ("", String::new())
            }
            (Err(e), _) => {
                self.metrics.failed(q, e.label(), e.status_class(), attempt.elapsed);
                (e.label(), crate::telemetry::one_line(e))
            }
        };
        let settle = policy::decide(&outcome, envelope.attempt_count(), &self.policy, fastrand::f64());
        self.carry_out(q, &envelope, settle, cause, &error).await;
    }

    /// Carries out a decision: the one place that settles a message in Redis, records what was
    /// decided in the metrics, writes the log line and queues the status update. `cause` is
    /// the failure's metric label, `error` its text.
    async fn carry_out(&self, q: usize, envelope: &Envelope, settle: Settle, cause: &'static str, error: &str) {
        let id = envelope.message_id();
        let trace_id = envelope.trace_id();
        let queue = self.queue(q);
        match settle {
            Settle::Ack => {
                self.settle(|| self.acks[q].ack(envelope.raw())).await;
                debug!(message_id = id, trace_id = %trace_id, "Message {id} delivered successfully");
            }
            Settle::Retry { delay, failures } => {
                let retried = envelope.retried(failures);
                if self.settle(|| queue.retry(envelope.raw(), &retried, delay)).await {
                    self.metrics.retried(q);
                }
                self.repeat(Repeat::Retry, cause, id, error, || {
                    warn!(message_id = id, trace_id = %trace_id, attempt = failures, max_attempts = self.policy.max_attempts, retry_in = ?delay, error, "Delivery failed; will retry");
                });
                self.report(envelope, Status::Queued, failures, error.to_string());
            }
            Settle::Dead { reason, failures } => {
                let record = dead_letter_traced(
                    &envelope.with_attempt_count(failures),
                    reason,
                    error,
                    &self.worker_id,
                    Some(id),
                    Some(trace_id),
                );
                if self.settle(|| queue.dead(envelope.raw(), &record)).await {
                    self.metrics.dead(q, reason.label());
                }
                self.repeat(Repeat::DeadLetter, reason.label(), id, error, || {
                    error!(
                        message_id = id,
                        trace_id = %trace_id,
                        reason = reason.label(),
                        attempts = failures,
                        error,
                        "Message {id} moved to the dead-letter list"
                    );
                });
                self.report(envelope, Status::Failed, failures, error.to_string());
            }
        }
    }

    /// The second line of defence: a delivery task panicked. The message goes to the
    /// dead-letter list exactly as it was claimed, with reason `internal_error`.
    pub(super) async fn internal_error(&self, q: usize, raw: &Bytes, panic: &str) {
        let reason = DeadReason::InternalError;
        // Whatever panicked may be the parser itself: ask it again only behind a guard.
        let (id, trace_id) = std::panic::catch_unwind(|| {
            Envelope::parse(raw.clone(), usize::MAX)
                .ok()
                .map(|e| (e.message_id().to_string(), e.carries_trace().then(|| e.trace_id())))
        })
        .ok()
        .flatten()
        .unzip();
        let trace_id = trace_id.flatten();
        let error = format!("courier failed while handling this message: {panic}");
        let record = dead_letter_traced(raw, reason, &error, &self.worker_id, id.as_deref(), trace_id);
        if self.settle(|| self.queue(q).dead(raw, &record)).await {
            self.metrics.dead(q, reason.label());
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
        Fut: std::future::Future<Output = Result<bool, QueueError>>,
    {
        let refused = "Redis refused to record an outcome; the message stays in processing, and the next sweep (within 10 s) returns it to the queue";
        let found = until_answered(&self.health, None, refused, op).await.unwrap_or(false);
        if !found {
            debug!("Message was not settled here: no longer in this worker's processing list, or Redis refused");
        }
        found
    }

    /// Drops a settled message's reclaim count (best effort: the hash is bounded and expires).
    pub(super) async fn forget_reclaims(&self, q: usize, raw: &[u8]) {
        if let Err(e) = self.queue(q).forget_reclaims(raw).await {
            debug!(error = %e, "Could not drop a settled message's reclaim count");
        }
    }

    /// Queues a best-effort status update; never waits.
    fn report(&self, envelope: &Envelope, status: Status, attempt_count: u32, error: String) {
        let report = StatusReport {
            message_id: envelope.message_id().to_string(),
            status,
            attempt_count,
            error,
            trace: envelope.trace().clone(),
        };
        if self.status.try_send(report).is_err() {
            self.metrics.status_update("dropped");
        }
    }
}
