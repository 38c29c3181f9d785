//! The claimer: takes only as many messages as there are free delivery slots, hands each to a
//! delivery task (`pool`), and waits on Redis (claiming nothing) while the queue is empty.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::pool::{Job, Pool};
use super::retry::Backoff;
use super::settle::Context;
use crate::config::QueueOrder;
use crate::queue::{Queue, QueueError};

/// Claims messages while there are free slots, until shutdown.
pub(super) async fn claim(
    context: &Arc<Context>,
    deliveries: &TaskTracker,
    concurrency: usize,
    batch_size: usize,
    shutdown: &CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut backoff = Backoff::default();
    let mut waits = Waits::new(context.queues.len());
    // Where the next claim starts looking: always the first queue in priority order, one
    // further each time in round-robin order.
    let mut start = 0;
    let mut pool = Pool::new(context);
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
        let (limit, look_again) = context.flow.admit();
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
                _ = context.flow.changed.notified() => {}
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
            () = context.flow.token() => {}
        }
        let wanted = batch_size.min(limit - others).max(1);
        let allowed = 1 + context.flow.take_tokens(wanted - 1);
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
        let claiming = context.held.claiming.lock().await;
        let (claimed, failed) = claim_in_order(context, permits.len(), start).await;
        let claimed: Vec<_> = claimed
            .into_iter()
            .map(|(q, raw, counted)| {
                let raw = Bytes::from(raw);
                (q, context.held.hold(q, &raw), raw, counted)
            })
            .collect();
        drop(claiming);
        if context.order == QueueOrder::RoundRobin {
            start = (start + 1) % context.queues.len().max(1);
        }
        // A failed claim's reply may have been lost after Redis ran it: `redis_error` asks
        // for a sweep, which finds what it claimed.
        let failed = match failed {
            Some(e) => {
                context.redis_error(&e, "claim");
                true
            }
            None => {
                context.health.redis_ok(started);
                backoff.reset();
                false
            }
        };
        context.flow.refund(allowed.saturating_sub(claimed.len()));
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
                waited = waits.any(&context.queues) => if let Err(e) = waited {
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
/// messages first, the next queue's only for slots the first could not fill. Returns what was
/// claimed with each item's queue, and the error that stopped it, if any (what was claimed
/// before the error is still delivered).
async fn claim_in_order(
    context: &Context,
    n: usize,
    start: usize,
) -> (Vec<(usize, Vec<u8>, bool)>, Option<QueueError>) {
    let count = context.queues.len();
    let mut claimed = Vec::with_capacity(n);
    for k in 0..count {
        let q = (start + k) % count;
        match context
            .queue(q)
            .claim(n - claimed.len(), context.max_message_bytes, context.max_reclaims)
            .await
        {
            Ok(got) => {
                if got.too_large > 0 {
                    context.too_large(q, &got.too_large_ids);
                }
                if got.poisoned > 0 {
                    context.poisoned(q, &got.poisoned_ids);
                }
                context.claimed(q, got.items.len());
                claimed.extend(
                    got.items
                        .into_iter()
                        .zip(got.counted)
                        .map(|(raw, counted)| (q, raw, counted)),
                );
            }
            Err(e) => return (claimed, Some(e)),
        }
        if claimed.len() >= n {
            break;
        }
    }
    (claimed, None)
}

/// Returns everything in this worker's processing lists to their queues.
pub(super) async fn give_back_all(context: &Context) -> Result<usize, QueueError> {
    let mut total = 0;
    for queue in &context.queues {
        total += queue.give_back(&context.worker_id, false).await?;
    }
    Ok(total)
}

/// The blocking waits on the queues, one per queue, each on its own connection. They run as
/// tasks of their own: a wait the claimer stops listening to (another queue woke it first)
/// goes on to its end rather than leaving its connection blocked mid-command, and the claimer
/// listens to it again next time instead of starting a second one.
struct Waits {
    busy: Vec<bool>,
    done: mpsc::UnboundedSender<(usize, Result<bool, QueueError>)>,
    results: mpsc::UnboundedReceiver<(usize, Result<bool, QueueError>)>,
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
    async fn any(&mut self, queues: &[Queue]) -> Result<(), QueueError> {
        for (q, queue) in queues.iter().enumerate() {
            if let Some(busy @ false) = self.busy.get_mut(q) {
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
        if let Some(busy) = self.busy.get_mut(q) {
            *busy = false;
        }
        result.map(|_| ())
    }
}
