//! The one way the worker retries a Redis operation: while Redis is unreachable, wait with
//! capped exponential backoff and try again; give up only on a stop request or a refusal.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::error;

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

/// Capped exponential backoff: 100 ms doubling to 5 s.
#[derive(Default)]
pub(super) struct Backoff {
    pub(super) attempts: u32,
}

impl Backoff {
    pub(super) fn next(&mut self) -> Duration {
        let delay = Duration::from_millis(100) * 2u32.saturating_pow(self.attempts.min(6));
        self.attempts += 1;
        delay.min(Duration::from_secs(5))
    }

    pub(super) fn reset(&mut self) {
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::default();
        let delays: Vec<u128> = (0..8).map(|_| b.next().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }
}
