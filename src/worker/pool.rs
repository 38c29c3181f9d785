//! The delivery tasks. Each one delivers claimed messages one at a time and, between them,
//! waits to be handed the next: a message costs one wake-up of a task that already exists.
//! Spawning a task per message cost an allocation of the task's 2.5 KB state and several copies
//! of it, a tenth of a delivery's instructions. Tasks are started as the load first needs
//! them, so there are never more than the most deliveries ever under way at once.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures_util::FutureExt as _;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::settle::{panic_text, Context};

/// One claimed message for a delivery task: its queue, the item as claimed, the slot it
/// holds and the drain's count of deliveries under way.
pub(super) struct Job {
    pub(super) q: usize,
    pub(super) raw: Bytes,
    pub(super) slot: OwnedSemaphorePermit,
    pub(super) in_flight: TaskTrackerToken,
}

/// The delivery tasks, owned by the claimer. They end when it drops this, each after the
/// message it is delivering.
pub(super) struct Pool {
    context: Arc<Context>,
    /// Each task's hand-off; a task's number is its place here.
    tasks: Vec<mpsc::Sender<Job>>,
    /// The numbers of the tasks waiting for a message.
    idle: Arc<Mutex<Vec<usize>>>,
}

impl Pool {
    pub(super) fn new(context: &Arc<Context>) -> Pool {
        Pool {
            context: context.clone(),
            tasks: Vec::new(),
            idle: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Hands a message to a waiting task, or to a new one when none waits. A task is back
    /// among the waiting before it frees its slot, so while slots bound the deliveries under
    /// way, tasks are started only while the load grows.
    pub(super) fn hand(&mut self, job: Job) {
        let waiting = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
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
        tokio::spawn(serve(self.context.clone(), number, self.idle.clone(), jobs, job));
    }
}

/// A delivery task: the first message, then each one it is handed, until the pool is dropped.
async fn serve(
    context: Arc<Context>,
    number: usize,
    idle: Arc<Mutex<Vec<usize>>>,
    mut jobs: mpsc::Receiver<Job>,
    first: Job,
) {
    let mut next = Some(first);
    while let Some(Job {
        q,
        raw,
        slot,
        in_flight,
    }) = next
    {
        // A panic anywhere in the delivery must not leave the message in processing with no
        // task to settle it: catch it here and dead-letter the message.
        let outcome = AssertUnwindSafe(context.process(q, raw.clone())).catch_unwind().await;
        if let Err(panic) = outcome {
            context.internal_error(q, &raw, &panic_text(panic.as_ref())).await;
        }
        idle.lock().unwrap_or_else(PoisonError::into_inner).push(number);
        drop((slot, in_flight));
        context.flow.changed.notify_one();
        next = jobs.recv().await;
    }
}
