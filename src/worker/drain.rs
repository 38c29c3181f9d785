//! The drain on shutdown: no new claims, in-flight deliveries get the grace period, what is
//! left goes back to the front of the queue, and the worker leaves the live set.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::background::Background;
use super::process::Delivery;
use super::shared::Shared;

/// Drains and leaves. The order matters: the heartbeat stops before the worker leaves the
/// live set (a late tick would rejoin it), and it leaves only once nothing is left in its
/// processing list (a worker that has left is never reaped).
pub(super) async fn drain(
    shared: Arc<Shared>,
    delivery: Arc<Delivery>,
    deliveries: TaskTracker,
    grace: Duration,
    background: Background,
) {
    crate::service::stopping();
    shared.health.set_draining();
    deliveries.close();
    info!(
        in_flight = deliveries.len(),
        grace = ?grace,
        "Stopping: no new claims; finishing in-flight deliveries"
    );
    if tokio::time::timeout(grace, deliveries.wait()).await.is_err() {
        warn!(
            in_flight = deliveries.len(),
            "Grace period over; returning unfinished messages to the queue"
        );
    }
    shared.log_summaries(true);
    // Anything still in processing goes back to the front of the queue. A delivery still
    // under way that settles after this finds its message gone and changes nothing. Not when
    // another process has taken this id: the processing list is its now, in flight there.
    let given_back = if shared.id_taken() {
        Ok(0)
    } else {
        shared.give_back_all().await
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
                "Could not return unfinished messages; they stay in processing until a worker with \
                 this id starts or a live worker reaps this one"
            );
            false
        }
    };
    background.stop().await;
    if returned {
        for (_, queue) in shared.queues() {
            if let Err(e) = queue.deregister().await {
                warn!(
                    queue = queue.name(),
                    error = %e,
                    "Could not remove this worker from the live set; it will be reaped"
                );
            }
        }
    }
    // The status updates end once their last sender, the settler, is gone.
    drop((shared, delivery));
    background.flush_statuses().await;
}
