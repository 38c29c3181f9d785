//! One message's way through a delivery task: parse it, ask the main server, let `flow` see
//! the result and `policy` decide, and have the `Settler` carry the decision out.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::FutureExt as _;
use tracing::debug;

use super::flow::Flow;
use super::pool::Deliver;
use super::settle::Settler;
use super::shared::QueueId;
use crate::breaker::Treat;
use crate::delivery::Deliverer;
use crate::message::Envelope;
use crate::policy::{self, Kind, Outcomes};
use crate::telemetry::panic_text;

/// What a delivery task holds: the main server, how to read its answers, the flow control
/// and the settler.
pub(super) struct Delivery {
    pub(super) settler: Settler,
    pub(super) deliverer: Arc<Deliverer>,
    /// The statuses whose outcome the operator set.
    pub(super) outcomes: Outcomes,
    /// The circuit breaker, the pause on Retry-After and the rate limit.
    pub(super) flow: Arc<Flow>,
    pub(super) max_message_bytes: usize,
}

impl Deliver for Delivery {
    async fn deliver(&self, q: QueueId, raw: Bytes, counted: bool) {
        // A panic anywhere in the delivery must not leave the message in processing with no
        // task to settle it: catch it here and dead-letter the message.
        let outcome = AssertUnwindSafe(self.process(q, raw.clone())).catch_unwind().await;
        if let Err(panic) = outcome {
            self.settler.internal_error(q, &raw, &panic_text(panic.as_ref())).await;
        }
        if counted {
            self.settler.forget_reclaims(q, &raw).await;
        }
    }

    fn finished(&self) {
        self.flow.changed.notify_one();
    }
}

impl Delivery {
    /// Delivers one item claimed from queue `q` and settles the outcome.
    async fn process(&self, q: QueueId, raw: Bytes) {
        let shared = &self.settler.shared;
        #[cfg(feature = "fault-injection")]
        if raw.starts_with(b"{\"message_id\":\"courier-test-panic") {
            panic!("fault injection: a delivery task panics");
        }
        let envelope = match Envelope::parse(raw, self.max_message_bytes) {
            Ok(envelope) => envelope,
            Err((raw, malformed)) => {
                self.settler.invalid(q, &raw, &malformed).await;
                return;
            }
        };
        if let Some(settle) = policy::before_attempt(envelope.attempt_count(), &self.settler.policy) {
            let error = format!(
                "attempt_count {} is already at max_attempts {}",
                envelope.attempt_count(),
                self.settler.policy.max_attempts
            );
            self.settler.carry_out(q, &envelope, settle, "", &error).await;
            return;
        }
        if envelope.attempt_count() == 0 {
            if let Some(waited) = envelope.waited(SystemTime::now()) {
                shared.metrics.queue_wait(q.index(), waited);
            }
        }

        let _processing = shared.metrics.processing();
        let id = envelope.message_id();
        debug!(
            message_id = id,
            trace_id = %envelope.trace_id(),
            "Processing message {id} (attempt {}/{})",
            u64::from(envelope.attempt_count()) + 1,
            self.settler.policy.max_attempts
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
                    shared
                        .metrics
                        .failed(q.index(), e.label(), e.status_class(), attempt.elapsed);
                }
                if self.settler.settle(|| shared.queue(q).release(envelope.raw())).await {
                    shared.metrics.released(q.index());
                }
                return;
            }
            // A probe the server failed: to the back of the queue as it was, so the next
            // probe is another message.
            Treat::Rotate => {
                if let Err(e) = &attempt.result {
                    shared
                        .metrics
                        .failed(q.index(), e.label(), e.status_class(), attempt.elapsed);
                }
                if self.settler.settle(|| shared.queue(q).rotate(envelope.raw())).await {
                    shared.metrics.released(q.index());
                }
                return;
            }
        }
        let (cause, error) = match (&attempt.result, outcome.kind) {
            (Ok(()), _) => {
                shared.metrics.delivered(q.index(), attempt.elapsed);
                ("", String::new())
            }
            (Err(e), Kind::Delivered) => {
                // The operator counts this status as delivered (MAIN_SERVER_OUTCOMES).
                shared.metrics.delivered(q.index(), attempt.elapsed);
                debug!(
                    message_id = id,
                    error = %crate::telemetry::one_line(e),
                    "Counted as delivered (MAIN_SERVER_OUTCOMES)"
                );
                ("", String::new())
            }
            (Err(e), _) => {
                shared
                    .metrics
                    .failed(q.index(), e.label(), e.status_class(), attempt.elapsed);
                (e.label(), crate::telemetry::one_line(e))
            }
        };
        let settle = policy::decide(
            &outcome,
            envelope.attempt_count(),
            &self.settler.policy,
            fastrand::f64(),
        );
        self.settler.carry_out(q, &envelope, settle, cause, &error).await;
    }
}
