//! The claimer: takes only as many messages as there are free delivery slots, hands each to a
//! delivery task of its own, and waits on Redis (claiming nothing) while the queue is empty.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::retry::Backoff;
use super::settle::{panic_text, Context};

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
            // No span per message: the log format does not print spans, and every event about
            // a message carries its message_id already.
            deliveries.spawn(async move {
                // A panic anywhere in the delivery must not leave the message in processing
                // with no task to settle it: catch it here and dead-letter the message.
                let outcome = AssertUnwindSafe(context.process(raw.clone())).catch_unwind().await;
                if let Err(panic) = outcome {
                    context.internal_error(&raw, &panic_text(panic.as_ref())).await;
                }
                drop(permit);
            });
        }
    }
}
