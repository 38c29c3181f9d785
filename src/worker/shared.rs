//! What every task of a worker shares: who it is, its queues and how they were reached, what
//! it counts and tells the outside, its log summaries, what its tasks hold, and whether
//! another process has taken its id. Each role (claimer, delivery tasks, heartbeat,
//! promoter, sweeper, drain) holds this and its own few fields besides.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::error;

use super::sweep::Held;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::queue::{Connector, Queue, QueueError};
use crate::telemetry::{Due, Repeat, Repeats};

/// At most one summary line per cause in this long (the first occurrence is logged at once).
const LOG_SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// One of this worker's queues, by its place in the configured order. Only `Shared` makes
/// them, from its own list, so every one names a queue that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct QueueId(usize);

impl QueueId {
    /// Its place in the configured order (the metrics' queue index).
    pub(super) fn index(self) -> usize {
        self.0
    }

    /// The queue at place `n`, for tests of the parts that only carry it.
    #[cfg(test)]
    pub(super) fn nth(n: usize) -> QueueId {
        QueueId(n)
    }
}

/// What every task of the worker shares.
pub(super) struct Shared {
    pub(super) worker_id: String,
    /// The worker's queues, in the configured order.
    queues: Vec<Queue>,
    /// How the queues were reached, for following a Sentinel master.
    pub(super) connector: Connector,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    /// Retry, dead-letter and invalid-message lines, summarised per cause.
    repeats: Repeats,
    /// Set by the heartbeat when another process has taken this worker's id.
    pub(super) id_taken: AtomicBool,
    /// What the delivery tasks hold, for telling strays in the processing lists (`sweep`).
    pub(super) held: Arc<Held>,
    /// Items claimed from each queue since its promoter last looked (it paces itself by them).
    claimed: Vec<AtomicUsize>,
}

impl Shared {
    pub(super) fn new(
        worker_id: String,
        joined: super::startup::Joined,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Shared {
        let super::startup::Joined { connector, queues } = joined;
        Shared {
            worker_id,
            claimed: queues.iter().map(|_| AtomicUsize::new(0)).collect(),
            queues,
            connector,
            metrics,
            health,
            repeats: Repeats::new(LOG_SUMMARY_EVERY),
            id_taken: AtomicBool::new(false),
            held: Arc::default(),
        }
    }

    /// The worker's queues with their ids, in the configured order.
    pub(super) fn queues(&self) -> impl ExactSizeIterator<Item = (QueueId, &Queue)> + '_ {
        self.queues.iter().enumerate().map(|(q, queue)| (QueueId(q), queue))
    }

    /// How many queues the worker takes from.
    pub(super) fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The queue at `offset` places after `start` in the configured order, wrapping round.
    pub(super) fn nth_from(&self, start: usize, offset: usize) -> QueueId {
        QueueId((start + offset) % self.queues.len().max(1))
    }

    /// Queue `q` of this worker.
    pub(super) fn queue(&self, q: QueueId) -> &Queue {
        &self.queues[q.0]
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
    pub(super) fn claimed(&self, q: QueueId, count: usize) {
        if let Some(claimed) = self.claimed.get(q.0) {
            claimed.fetch_add(count, Ordering::Relaxed);
        }
    }

    /// Items claimed from queue `q` since the last call.
    pub(super) fn claimed_since(&self, q: QueueId) -> usize {
        self.claimed
            .get(q.0)
            .map_or(0, |claimed| claimed.swap(0, Ordering::Relaxed))
    }

    /// Whether another process has taken this worker's id.
    pub(super) fn id_taken(&self) -> bool {
        self.id_taken.load(Ordering::Acquire)
    }

    /// Logs an event that can repeat for every message through the summary: `full` logs the
    /// first in full; later ones within the interval are counted and reported together.
    pub(super) fn repeat(&self, kind: Repeat, cause: &'static str, message_id: &str, error: &str, full: impl FnOnce()) {
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

    /// Logs the summaries whose interval is over (all of them with `all`, at stop).
    pub(super) fn log_summaries(&self, all: bool) {
        for due in self.repeats.due(all) {
            due.log();
        }
    }

    /// Returns everything in this worker's processing lists to their queues.
    pub(super) async fn give_back_all(&self) -> Result<usize, QueueError> {
        let mut total = 0;
        for queue in &self.queues {
            total += queue.give_back(&self.worker_id, false).await?;
        }
        Ok(total)
    }
}
