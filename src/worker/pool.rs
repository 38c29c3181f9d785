//! The delivery tasks. Each one delivers claimed messages one at a time and, between them,
//! waits to be handed the next: a message costs one wake-up of a task that already exists.
//! Spawning a task per message cost an allocation of the task's 2.5 KB state and several copies
//! of it, a tenth of a delivery's instructions. Tasks are started as the load first needs
//! them, so there are never more than the most deliveries ever under way at once.

use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::shared::QueueId;
use super::sweep::HeldItem;
use crate::sync::lock;

/// One claimed message for a delivery task: its queue, the item as claimed, whether it has a
/// reclaim count, the slot it holds, the drain's count of deliveries under way and its place
/// among the items held (which the sweeper leaves alone).
pub(super) struct Job {
    pub(super) q: QueueId,
    pub(super) raw: Bytes,
    pub(super) counted: bool,
    pub(super) slot: OwnedSemaphorePermit,
    pub(super) in_flight: TaskTrackerToken,
    pub(super) held: HeldItem,
}

/// What a delivery task does with each message it is handed.
pub(super) trait Deliver: Send + Sync + 'static {
    /// Delivers and settles one message; `counted`: it has a reclaim count to drop once settled.
    fn deliver(&self, q: QueueId, raw: Bytes, counted: bool) -> impl Future<Output = ()> + Send;
    /// Called once the message's slot is free again.
    fn finished(&self);
}

/// The delivery tasks, owned by the claimer. They end when it drops this, each after the
/// message it is delivering.
pub(super) struct Pool<D: Deliver> {
    deliverer: Arc<D>,
    /// Each task's hand-off; a task's number is its place here.
    tasks: Vec<mpsc::Sender<Job>>,
    /// The numbers of the tasks waiting for a message.
    idle: Arc<Mutex<Vec<usize>>>,
}

impl<D: Deliver> Pool<D> {
    pub(super) fn new(deliverer: &Arc<D>) -> Pool<D> {
        Pool {
            deliverer: deliverer.clone(),
            tasks: Vec::new(),
            idle: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Hands a message to a waiting task, or to a new one when none waits. A task is back
    /// among the waiting before it frees its slot, so while slots bound the deliveries under
    /// way, tasks are started only while the load grows.
    pub(super) fn hand(&mut self, job: Job) {
        let waiting = lock(&self.idle).pop();
        let job = match waiting.and_then(|task| self.tasks.get(task)) {
            Some(task) => match task.try_send(job) {
                Ok(()) => return,
                // The task is gone (it panicked outside the delivery's own guard): another
                // one takes its place for this message.
                Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) => job,
            },
            None => job,
        };
        let (hand, jobs) = mpsc::channel(1);
        let number = self.tasks.len();
        self.tasks.push(hand);
        tokio::spawn(serve(self.deliverer.clone(), number, self.idle.clone(), jobs, job));
    }
}

/// A delivery task: the first message, then each one it is handed, until the pool is dropped.
async fn serve<D: Deliver>(
    deliverer: Arc<D>,
    number: usize,
    idle: Arc<Mutex<Vec<usize>>>,
    mut jobs: mpsc::Receiver<Job>,
    first: Job,
) {
    let mut next = Some(first);
    while let Some(Job {
        q,
        raw,
        counted,
        slot,
        in_flight,
        held,
    }) = next
    {
        deliverer.deliver(q, raw, counted).await;
        lock(&idle).push(number);
        drop((slot, in_flight, held));
        deliverer.finished();
        next = jobs.recv().await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use tokio::sync::Semaphore;
    use tokio_util::task::TaskTracker;

    use super::*;

    /// Records which task delivered each message; a message `die` panics its task outside any
    /// guard, as a bug in the settling code would.
    #[derive(Default)]
    struct Probe {
        tasks: Mutex<HashSet<tokio::task::Id>>,
        delivered: Mutex<Vec<Bytes>>,
    }

    impl Deliver for Probe {
        async fn deliver(&self, _q: QueueId, raw: Bytes, _counted: bool) {
            // Gives every other task a turn, so that deliveries overlap as they do over a
            // network.
            tokio::task::yield_now().await;
            assert!(raw.as_ref() != b"die", "a delivery task dies");
            self.tasks.lock().unwrap().insert(tokio::task::id());
            self.delivered.lock().unwrap().push(raw);
        }

        fn finished(&self) {}
    }

    /// Delivers `items` through a new pool with `slots` slots, handing each as the claimer
    /// does: only once a slot is free. Returns what the probe saw and the pool.
    async fn deliver_all(slots: usize, items: &[&'static [u8]]) -> (Arc<Probe>, Pool<Probe>) {
        let probe = Arc::new(Probe::default());
        let mut pool = Pool::new(&probe);
        let slots = Arc::new(Semaphore::new(slots));
        let tracker = TaskTracker::new();
        let held = Arc::new(super::super::sweep::Held::default());
        for item in items {
            let slot = slots.clone().acquire_owned().await.unwrap();
            let raw = Bytes::from_static(item);
            pool.hand(Job {
                q: QueueId::nth(0),
                held: held.hold(QueueId::nth(0), &raw),
                raw,
                counted: false,
                slot,
                in_flight: tracker.token(),
            });
        }
        tracker.close();
        tracker.wait().await;
        (probe, pool)
    }

    #[tokio::test]
    async fn one_slot_is_served_by_one_task_however_many_messages() {
        let (probe, _pool) = deliver_all(1, &[&b"m"[..]; 50]).await;
        assert_eq!(probe.delivered.lock().unwrap().len(), 50);
        assert_eq!(probe.tasks.lock().unwrap().len(), 1, "the task is reused");
    }

    #[tokio::test]
    async fn never_more_tasks_than_slots() {
        let (probe, pool) = deliver_all(4, &[&b"m"[..]; 200]).await;
        assert_eq!(probe.delivered.lock().unwrap().len(), 200);
        let tasks = probe.tasks.lock().unwrap().len();
        assert!((2..=4).contains(&tasks), "{tasks} tasks for 4 slots");
        assert_eq!(pool.tasks.len(), tasks, "no task was started that did not deliver");
    }

    #[tokio::test]
    async fn a_task_that_died_is_replaced_and_the_next_message_still_goes_out() {
        let (probe, pool) = deliver_all(1, &[b"first", b"die", b"after", b"last"]).await;
        let delivered = probe.delivered.lock().unwrap().clone();
        assert_eq!(delivered, [&b"first"[..], b"after", b"last"]);
        assert_eq!(pool.tasks.len(), 2, "one task died and one replaced it");
    }
}
