//! The drain on shutdown: no new claims, in-flight deliveries get the grace period, what is
//! left goes back to the front of the queue, and the worker leaves the live set.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::background::Background;
use super::settle::Context;

/// Drains and leaves. The order matters: the heartbeat stops before the worker leaves the
/// live set (a late tick would rejoin it), and it leaves only once nothing is left in its
/// processing list (a worker that has left is never reaped).
pub(super) async fn drain(context: Arc<Context>, deliveries: TaskTracker, grace: Duration, background: Background) {
    crate::service::stopping();
    context.health.set_draining();
    deliveries.close();
    info!(in_flight = deliveries.len(), grace = ?grace, "Stopping: no new claims; finishing in-flight deliveries");
    if tokio::time::timeout(grace, deliveries.wait()).await.is_err() {
        warn!(
            in_flight = deliveries.len(),
            "Grace period over; returning unfinished messages to the queue"
        );
    }
    for due in context.repeats.due(true) {
        due.log();
    }
    // Anything still in processing goes back to the front of the queue. A delivery still
    // under way that settles after this finds its message gone and changes nothing. Not when
    // another process has taken this id: the processing list is its now, in flight there.
    let taken = context.id_taken.load(std::sync::atomic::Ordering::Acquire);
    let given_back = if taken {
        Ok(0)
    } else {
        super::claim::give_back_all(&context).await
    };
    let returned = match given_back {
        Ok(n) => {
            if n > 0 {
                info!(count = n, "Returned unfinished messages to the queue");
            }
            true
        }
        Err(e) => {
            error!(
                error = %e,
                "Could not return unfinished messages; they stay in processing until a worker with this id starts or a live worker reaps this one"
            );
            false
        }
    };
    background.stop().await;
    if returned {
        for queue in &context.queues {
            if let Err(e) = queue.deregister().await {
                warn!(queue = queue.name(), error = %e, "Could not remove this worker from the live set; it will be reaped");
            }
        }
    }
    drop(context);
    background.flush_statuses().await;
}
