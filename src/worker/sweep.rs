//! Strays: items in this worker's own processing list that none of its tasks holds. A claim
//! whose reply was lost (or that a cluster client sent again after a dropped connection), an
//! ack or a retry move that a failover or an `everysec` AOF tail lost, a settle Redis refused:
//! each leaves such an item, which nothing would deliver until the worker restarts. The
//! sweeper returns them to the queue on a timer, after any Redis error and after a Sentinel
//! failover.
//!
//! Telling a stray from a claim under way: the claimer claims and records what it claimed in
//! `Held` under one lock, and the sweeper holds the same lock while it compares. A task drops
//! its item from `Held` only after Redis has recorded its settle, so an item in Redis and not
//! in `Held` is no task's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::shared::{QueueId, Shared};
use crate::sync::lock;

/// How often the processing lists are swept without being asked.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// The shortest time between two sweeps: an outage asks for one at every failed command.
const SWEEP_GAP: Duration = Duration::from_secs(1);
/// The most items of one processing list compared in one sweep (the oldest, where strays
/// gather); the next sweep takes the rest.
const SWEEP_LIMIT: usize = 10_000;

/// The items this worker's tasks hold, by queue.
#[derive(Default)]
pub(super) struct Held {
    items: Mutex<Slab>,
    /// Held by the claimer from a claim until what it claimed is recorded here, and by the
    /// sweeper while it compares.
    pub(super) claiming: tokio::sync::Mutex<()>,
    /// Asks for a sweep now.
    pub(super) wake: Notify,
}

/// Held items in numbered places, reused: recording and dropping one costs no hashing.
#[derive(Default)]
struct Slab {
    places: Vec<Option<(QueueId, Bytes)>>,
    free: Vec<usize>,
}

/// One held item; dropping it says its task has settled it.
pub(super) struct HeldItem {
    held: Arc<Held>,
    place: usize,
}

impl Held {
    fn slab(&self) -> std::sync::MutexGuard<'_, Slab> {
        lock(&self.items)
    }

    /// Records that a task holds `raw`, claimed from queue `q`.
    pub(super) fn hold(self: &Arc<Self>, q: QueueId, raw: &Bytes) -> HeldItem {
        let mut slab = self.slab();
        let place = match slab.free.pop() {
            Some(place) => {
                if let Some(slot) = slab.places.get_mut(place) {
                    *slot = Some((q, raw.clone()));
                }
                place
            }
            None => {
                slab.places.push(Some((q, raw.clone())));
                slab.places.len() - 1
            }
        };
        HeldItem {
            held: self.clone(),
            place,
        }
    }

    /// How many copies of each item of queue `q` the tasks hold.
    fn counts(&self, q: QueueId) -> HashMap<Bytes, usize> {
        let mut counts = HashMap::new();
        for (_, raw) in self.slab().places.iter().flatten().filter(|(at, _)| *at == q) {
            *counts.entry(raw.clone()).or_insert(0) += 1;
        }
        counts
    }
}

impl Drop for HeldItem {
    fn drop(&mut self) {
        let mut slab = self.held.slab();
        if let Some(slot) = slab.places.get_mut(self.place) {
            *slot = None;
            slab.free.push(self.place);
        }
    }
}

/// The items of `listed` (a processing list) beyond the copies `held` accounts for.
fn strays(listed: Vec<Bytes>, mut held: HashMap<Bytes, usize>) -> Vec<Bytes> {
    listed
        .into_iter()
        .filter(|item| match held.get_mut(item) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .collect()
}

/// Sweeps every `SWEEP_EVERY`, when asked (`Held::wake`) and when the Sentinel master
/// changed, until `stop`.
pub(super) async fn sweeper(shared: Arc<Shared>, stop: CancellationToken) {
    let mut master_changes = shared.connector.master_changes();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = shared.held.wake.notified() => {}
            _ = changed(&mut master_changes) => {}
        }
        // Another process took this id: the processing lists are its, their items in its
        // hands, not strays.
        if shared.id_taken() {
            return;
        }
        for (q, queue) in shared.queues() {
            let swept = async {
                let _claiming = shared.held.claiming.lock().await;
                let held = shared.held.counts(q);
                let listed = queue.processing_items(SWEEP_LIMIT).await?;
                queue.return_strays(&strays(listed, held)).await
            };
            match swept.await {
                Ok(0) => {}
                Ok(n) => {
                    shared.metrics.strays_returned(n);
                    warn!(
                        queue = queue.name(),
                        count = n,
                        "Returned messages no task of this worker held from its processing list to \
                         the queue"
                    );
                }
                Err(e) if e.is_unavailable() => {
                    debug!(error = %e, "Sweep failed; Redis is unreachable");
                }
                Err(e) => warn!(
                    error = %e,
                    "Redis refused the sweep of this worker's processing list"
                ),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_GAP) => {}
        }
    }
}

/// Resolves when the Sentinel master changed; never without Sentinel.
async fn changed(changes: &mut Option<watch::Receiver<u64>>) {
    match changes {
        Some(receiver) => {
            if receiver.changed().await.is_err() {
                *changes = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(text: &'static str) -> Bytes {
        Bytes::from_static(text.as_bytes())
    }

    #[test]
    fn only_copies_beyond_those_held_are_strays() {
        let held = Arc::new(Held::default());
        let _a = held.hold(QueueId::nth(0), &b("a"));
        let _a_again = held.hold(QueueId::nth(0), &b("a"));
        let other_queue = held.hold(QueueId::nth(1), &b("c"));
        let listed = vec![b("a"), b("b"), b("a"), b("a"), b("c")];
        assert_eq!(
            strays(listed.clone(), held.counts(QueueId::nth(0))),
            vec![b("b"), b("a"), b("c")]
        );
        drop(other_queue);
        assert!(
            held.counts(QueueId::nth(1)).is_empty(),
            "a dropped item is no longer held"
        );
        assert_eq!(strays(vec![b("a")], held.counts(QueueId::nth(0))), Vec::<Bytes>::new());
    }

    #[test]
    fn places_are_reused() {
        let held = Arc::new(Held::default());
        for _ in 0..100 {
            let _item = held.hold(QueueId::nth(0), &b("x"));
        }
        assert_eq!(held.slab().places.len(), 1);
    }
}
