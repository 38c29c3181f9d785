//! The claimer: takes only as many messages as there are free delivery slots, hands each to a
//! delivery task (`pool`), and waits on Redis (claiming nothing) while the queue is empty.
//! Items the claim script dead-letters without handing them out (too large, poisoned) are
//! reported here.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use super::flow::Flow;
use super::pool::{Job, Pool};
use super::process::Delivery;
use super::shared::{QueueId, Shared};
use crate::backoff::Backoff;
use crate::config::QueueOrder;
use crate::queue::QueueError;
use crate::telemetry::Repeat;

/// The claiming role: what it needs besides the shared state.
pub(super) struct Claimer {
    pub(super) shared: Arc<Shared>,
    /// How many may be under way now (the breaker, a pause, the rate limit).
    pub(super) flow: Arc<Flow>,
    pub(super) order: QueueOrder,
    /// Delivery slots.
    pub(super) concurrency: usize,
    /// The most items one claim takes.
    pub(super) batch_size: usize,
    /// Items over this size are dead-lettered by the claim script without being read.
    pub(super) max_message_bytes: usize,
    /// Reclaims past which a message is dead-lettered as `poisoned` (0: never).
    pub(super) max_reclaims: u32,
}

/// One claimed item: its queue, the item, whether it has a reclaim count.
struct ClaimedItem {
    q: QueueId,
    raw: Vec<u8>,
    counted: bool,
}

/// What one round of claims got, and the error that stopped it, if any (what was claimed
/// before the error is still delivered).
struct Round {
    items: Vec<ClaimedItem>,
    failed: Option<QueueError>,
}

impl Claimer {
    /// Claims messages while there are free slots and hands them to `delivery`'s tasks, until
    /// shutdown.
    pub(super) async fn claim(&self, delivery: &Arc<Delivery>, deliveries: &TaskTracker, shutdown: &CancellationToken) {
        let (shared, concurrency, batch_size) = (&self.shared, self.concurrency, self.batch_size);
        let slots = Arc::new(Semaphore::new(concurrency));
        let mut backoff = Backoff::default();
        let mut waits = Waits::new(shared.queue_count());
        // Where the next claim starts looking: always the first queue in priority order, one
        // further each time in round-robin order.
        let mut start = 0;
        let mut pool = Pool::new(delivery);
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            // How many may be under way: fewer while the circuit breaker probes or a Retry-After
            // pause runs, none while it is open.
            let (limit, look_again) = self.flow.admit();
            let others = concurrency.saturating_sub(slots.available_permits() + 1);
            if others >= limit {
                drop(first);
                let wake = async {
                    match look_again {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = self.flow.changed.notified() => {}
                    _ = wake => {}
                }
                continue;
            }
            // Under a rate limit a claim takes only what the limit allows now (a token for each),
            // so no claimed message waits for its turn; the wait for the first token races
            // shutdown.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                () = self.flow.token() => {}
            }
            let wanted = batch_size.min(limit - others).max(1);
            let allowed = 1 + self.flow.take_tokens(wanted - 1);
            let mut permits = vec![first];
            while permits.len() < allowed {
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            // Not interrupted by shutdown: it is a few short scripts, and whatever they claim is
            // either delivered here or given back by the drain. What they claim is recorded as
            // held before the sweeper may look (`sweep`).
            let started = Instant::now();
            let claiming = shared.held.claiming.lock().await;
            let Round { items, failed } = self.claim_in_order(permits.len(), start).await;
            let claimed: Vec<_> = items
                .into_iter()
                .map(|ClaimedItem { q, raw, counted }| {
                    let raw = Bytes::from(raw);
                    (q, shared.held.hold(q, &raw), raw, counted)
                })
                .collect();
            drop(claiming);
            if self.order == QueueOrder::RoundRobin {
                start = (start + 1) % shared.queue_count().max(1);
            }
            // A failed claim's reply may have been lost after Redis ran it: `redis_error` asks
            // for a sweep, which finds what it claimed.
            let failed = match failed {
                Some(e) => {
                    shared.redis_error(&e, "claim");
                    true
                }
                None => {
                    shared.health.redis_ok(started);
                    backoff.reset();
                    false
                }
            };
            self.flow.refund(allowed.saturating_sub(claimed.len()));
            if claimed.is_empty() {
                drop(permits);
                if failed {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next()) => continue,
                    }
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    waited = waits.any(shared) => if let Err(e) = waited {
                        // The waits have connections of their own, which find out about an outage
                        // on their own schedule; health follows the main connection, which the
                        // next claim uses.
                        debug!(error = %e, "Waiting for messages failed; claiming again");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(backoff.next()) => {}
                        }
                    },
                }
                continue;
            }
            // Slots not filled (a claim that failed part way) are free again at once.
            let mut permits = permits.into_iter();
            for (q, held, raw, counted) in claimed {
                let Some(permit) = permits.next() else {
                    break;
                };
                pool.hand(Job {
                    q,
                    raw,
                    counted,
                    slot: permit,
                    in_flight: deliveries.token(),
                    held,
                });
            }
        }
    }

    /// Claims up to `n` messages, looking at the queues in order from `start`: the first queue's
    /// messages first, the next queue's only for slots the first could not fill.
    async fn claim_in_order(&self, n: usize, start: usize) -> Round {
        let shared = &self.shared;
        let mut items = Vec::with_capacity(n);
        for k in 0..shared.queue_count() {
            let q = shared.nth_from(start, k);
            match shared
                .queue(q)
                .claim(n - items.len(), self.max_message_bytes, self.max_reclaims)
                .await
            {
                Ok(got) => {
                    if got.too_large > 0 {
                        self.too_large(q, &got.too_large_ids);
                    }
                    if got.poisoned > 0 {
                        self.poisoned(q, &got.poisoned_ids);
                    }
                    shared.claimed(q, got.items.len());
                    items.extend(
                        got.items
                            .into_iter()
                            .zip(got.counted)
                            .map(|(raw, counted)| ClaimedItem { q, raw, counted }),
                    );
                }
                Err(e) => return Round { items, failed: Some(e) },
            }
            if items.len() >= n {
                break;
            }
        }
        Round { items, failed: None }
    }

    /// Counts and reports items the claim script moved to the dead-letter list for their size.
    /// `ids`: their message ids as the script found them ('' when it found none).
    fn too_large(&self, q: QueueId, ids: &[String]) {
        let label = "too_large";
        let error = format!(
            "over the {}-byte limit (worker.max_message_bytes)",
            self.max_message_bytes
        );
        for id in ids {
            self.shared.metrics.invalid(q.index(), label);
            self.shared.metrics.dead(q.index(), label);
            let id = if id.is_empty() { "(not read)" } else { id.as_str() };
            self.shared.repeat(Repeat::Invalid, label, id, &error, || {
                warn!(
                    message_id = id,
                    reason = label,
                    error = %error,
                    "Invalid message moved to the dead-letter list without being read"
                );
            });
        }
    }

    /// Counts and reports items the claim script dead-lettered as `poisoned`: workers kept
    /// dying while holding them.
    fn poisoned(&self, q: QueueId, ids: &[String]) {
        let label = "poisoned";
        let error = format!(
            "returned to the queue more than {} times by workers that died holding it \
             (worker.max_reclaims)",
            self.max_reclaims
        );
        for id in ids {
            self.shared.metrics.dead(q.index(), label);
            error!(
                message_id = if id.is_empty() { "(no message_id)" } else { id.as_str() },
                queue = self.shared.queue(q).name(),
                reason = label,
                error = %error,
                "A message that workers kept dying on was moved to the dead-letter list; \
                 `courier dlq show` has it"
            );
        }
    }
}

/// The blocking waits on the queues, one per queue, each on its own connection. They run as
/// tasks of their own: a wait the claimer stops listening to (another queue woke it first)
/// goes on to its end rather than leaving its connection blocked mid-command, and the claimer
/// listens to it again next time instead of starting a second one.
struct Waits {
    busy: Vec<bool>,
    done: mpsc::UnboundedSender<(QueueId, Result<bool, QueueError>)>,
    results: mpsc::UnboundedReceiver<(QueueId, Result<bool, QueueError>)>,
}

impl Waits {
    fn new(queues: usize) -> Waits {
        let (done, results) = mpsc::unbounded_channel();
        Waits {
            busy: vec![false; queues],
            done,
            results,
        }
    }

    /// Waits until any queue has something (or a wait times out or fails).
    async fn any(&mut self, shared: &Shared) -> Result<(), QueueError> {
        for (q, queue) in shared.queues() {
            if let Some(busy @ false) = self.busy.get_mut(q.index()) {
                *busy = true;
                let queue = queue.clone();
                let done = self.done.clone();
                tokio::spawn(async move {
                    let _ = done.send((q, queue.wait_for_ready().await));
                });
            }
        }
        let Some((q, result)) = self.results.recv().await else {
            return Ok(());
        };
        if let Some(busy) = self.busy.get_mut(q.index()) {
            *busy = false;
        }
        result.map(|_| ())
    }
}
