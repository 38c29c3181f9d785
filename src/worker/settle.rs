//! Settling a message: carrying out what `policy` decided (ack, retry, dead letter) in Redis,
//! the metrics and the log, and queueing the status update for the main server. A task that
//! fails unexpectedly still settles its message, as `internal_error`.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use super::retry::until_answered;
use super::shared::{QueueId, Shared};
use crate::delivery::Status;
use crate::message::{dead_letter, dead_letter_traced, DeadReason, Envelope, Malformed};
use crate::policy::{Policy, Settle};
use crate::queue::{Acks, QueueError};
use crate::telemetry::Repeat;

/// A status update for the main server, sent in the background.
pub(super) struct StatusReport {
    pub(super) message_id: String,
    pub(super) status: Status,
    pub(super) attempt_count: u32,
    pub(super) error: String,
    /// The message's trace, for the PUT's `traceparent`.
    pub(super) trace: crate::trace::TraceContext,
}

/// Carries out decisions: the one role that settles messages in Redis.
pub(super) struct Settler {
    pub(super) shared: Arc<Shared>,
    /// What each attempt's result means.
    pub(super) policy: Policy,
    /// Each queue's acknowledgements, gathered into pipelines.
    acks: Vec<Acks>,
    status: mpsc::Sender<StatusReport>,
}

impl Settler {
    pub(super) fn new(shared: Arc<Shared>, policy: Policy, status: mpsc::Sender<StatusReport>) -> Settler {
        Settler {
            acks: shared.queues().map(|(_, queue)| queue.acks()).collect(),
            shared,
            policy,
            status,
        }
    }

    /// Moves an item that is not a message to the dead-letter list, exactly as it was.
    pub(super) async fn invalid(&self, q: QueueId, raw: &Bytes, malformed: &Malformed) {
        let shared = &self.shared;
        let reason = DeadReason::Malformed(malformed.label());
        shared.metrics.invalid(q.index(), malformed.label());
        let record = dead_letter(raw, reason, &malformed.to_string(), &shared.worker_id, None);
        if self.settle(|| shared.queue(q).dead(raw, &record)).await {
            shared.metrics.dead(q.index(), reason.label());
        }
        let error = malformed.to_string();
        shared.repeat(Repeat::Invalid, reason.label(), "(invalid)", &error, || {
            warn!(
                reason = reason.label(),
                error = %error,
                "Invalid message moved to the dead-letter list"
            );
        });
    }

    /// Carries out a decision: the one place that settles a message in Redis, records what was
    /// decided in the metrics, writes the log line and queues the status update. `cause` is
    /// the failure's metric label, `error` its text.
    pub(super) async fn carry_out(
        &self,
        q: QueueId,
        envelope: &Envelope,
        settle: Settle,
        cause: &'static str,
        error: &str,
    ) {
        let id = envelope.message_id();
        let trace_id = envelope.trace_id();
        let queue = self.shared.queue(q);
        match settle {
            Settle::Ack => {
                self.settle(|| self.acks[q.index()].ack(envelope.raw())).await;
                debug!(
                    message_id = id,
                    trace_id = %trace_id,
                    "Message {id} delivered successfully"
                );
            }
            Settle::Retry { delay, failures } => {
                let retried = envelope.retried(failures);
                if self.settle(|| queue.retry(envelope.raw(), &retried, delay)).await {
                    self.shared.metrics.retried(q.index());
                }
                self.shared.repeat(Repeat::Retry, cause, id, error, || {
                    warn!(
                        message_id = id,
                        trace_id = %trace_id,
                        attempt = failures,
                        max_attempts = self.policy.max_attempts,
                        retry_in = ?delay,
                        error,
                        "Delivery failed; will retry"
                    );
                });
                self.report(envelope, Status::Queued, failures, error.to_string());
            }
            Settle::Dead { reason, failures } => {
                let record = dead_letter_traced(
                    &envelope.with_attempt_count(failures),
                    reason,
                    error,
                    &self.shared.worker_id,
                    Some(id),
                    Some(trace_id),
                );
                if self.settle(|| queue.dead(envelope.raw(), &record)).await {
                    self.shared.metrics.dead(q.index(), reason.label());
                }
                self.shared.repeat(Repeat::DeadLetter, reason.label(), id, error, || {
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
    pub(super) async fn internal_error(&self, q: QueueId, raw: &Bytes, panic: &str) {
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
        let record = dead_letter_traced(raw, reason, &error, &self.shared.worker_id, id.as_deref(), trace_id);
        if self.settle(|| self.shared.queue(q).dead(raw, &record)).await {
            self.shared.metrics.dead(q.index(), reason.label());
        }
        error!(
            message_id = id.as_deref().unwrap_or("(unreadable)"),
            reason = reason.label(),
            error = %error,
            "A delivery task failed unexpectedly; message moved to the dead-letter list. Please \
             report this as a bug"
        );
    }

    /// Runs a settle until Redis has recorded it. While Redis is unreachable the outcome is held
    /// here (and the slot with it, so no new work is claimed). Returns whether the message was
    /// still ours to settle.
    pub(super) async fn settle<F, Fut>(&self, op: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<bool, QueueError>>,
    {
        let refused = "Redis refused to record an outcome; the message stays in processing, \
                       and the next sweep (within 10 s) returns it to the queue";
        let found = until_answered(&self.shared.health, None, refused, op)
            .await
            .unwrap_or(false);
        if !found {
            debug!(
                "Message was not settled here: no longer in this worker's processing list, or \
                 Redis refused"
            );
        }
        found
    }

    /// Drops a settled message's reclaim count (best effort: the hash is bounded and expires).
    pub(super) async fn forget_reclaims(&self, q: QueueId, raw: &[u8]) {
        if let Err(e) = self.shared.queue(q).forget_reclaims(raw).await {
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
            self.shared.metrics.status_update("dropped");
        }
    }
}
