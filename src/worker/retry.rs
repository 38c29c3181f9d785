//! The one way the worker retries a Redis operation: while Redis is unreachable, wait with
//! capped exponential backoff and try again; give up only on a stop request or a refusal.

use std::future::Future;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::backoff::Backoff;
use crate::health::Health;
use crate::queue::QueueError;

/// Runs `op` until Redis answers it. While Redis is unreachable the outage is recorded in
/// `health` and the call is tried again after a backoff. `None` when `stop` (if any) is
/// cancelled first, or when Redis refuses the command (logged here as `refused`).
pub(super) async fn until_answered<T, F, Fut>(
    health: &Health,
    stop: Option<&CancellationToken>,
    refused: &str,
    op: F,
) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, QueueError>>,
{
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        match op().await {
            Ok(value) => {
                health.redis_ok(started);
                return Some(value);
            }
            Err(e) if e.is_unavailable() => {
                health.redis_failed(&e);
                let wait = tokio::time::sleep(backoff.next());
                match stop {
                    Some(stop) => tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = wait => {}
                    },
                    None => wait.await,
                }
            }
            Err(e) => {
                error!(error = %e, "{refused}");
                return None;
            }
        }
    }
}
