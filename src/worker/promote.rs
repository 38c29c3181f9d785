//! The promoter: moves a queue's due retries to its front, paced by what this worker claims.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::shared::{QueueId, Shared};
use crate::backoff::Backoff;

/// Most due retries moved to the front of the queue by one promoter call.
const PROMOTE_BATCH: usize = 1000;
/// Due retries moved to an empty queue in one call: when no new message waits they go at up
/// to this many per `PROMOTE_GAP`, and a message arriving then waits behind at most this many.
const PROMOTE_FILL: usize = 100;
/// The shortest pause between two promotions that leave retries waiting. Retries fall due
/// continuously under a steady failure rate; without a floor the promoter would wake for
/// every millisecond's one or two, a script call each. 20 ms late is nothing next to a
/// retry interval of seconds.
const PROMOTE_GAP: Duration = Duration::from_millis(20);

/// Moves queue `q`'s due retries to the front of it, sleeping until the next one is due (at
/// most a second, so retries other workers schedule are picked up promptly). A due retry goes
/// out within its interval and a promoter's pass, not behind the whole backlog. So that after
/// an outage the retries that fell due meanwhile do not shut new messages out, each pass moves
/// at most half of what this worker claimed from the queue since the last (at least a batch):
/// claims then take retries and new messages about one for one.
pub(super) async fn promote(shared: Arc<Shared>, q: QueueId, settings: Promotion, stop: CancellationToken) {
    let longest = settings.retry_interval.min(Duration::from_secs(1));
    let mut backoff = Backoff::default();
    loop {
        let budget = share_of_claims(shared.claimed_since(q), settings.batch_size);
        let wait = match shared.queue(q).promote_due(budget.0, PROMOTE_FILL).await {
            Ok(promoted) => {
                backoff.reset();
                if promoted.moved > 0 {
                    debug!(count = promoted.moved, "Moved due retries to the front of the queue");
                }
                match promoted.filled {
                    // Nothing else waited: look again soon, and fill again if they went.
                    true if promoted.moved > 0 => PROMOTE_GAP.min(longest),
                    _ => next_promotion(promoted.moved, budget, promoted.next_due_in, longest),
                }
            }
            Err(e) => {
                shared.redis_error(&e, "promote");
                backoff.next()
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// What the promoter paces itself by.
#[derive(Debug, Clone, Copy)]
pub(super) struct Promotion {
    pub(super) retry_interval: Duration,
    pub(super) batch_size: usize,
}

/// How many due retries one pass may move: half of what was claimed since the last, at least
/// a batch, at most `PROMOTE_BATCH`; and whether the floor (not the claims) set it.
fn share_of_claims(claimed: usize, batch_size: usize) -> (usize, bool) {
    let half = claimed / 2;
    (half.max(batch_size).clamp(1, PROMOTE_BATCH), half < batch_size)
}

/// How long the promoter sleeps after moving `moved` of at most `budget` retries. After a full
/// pass set by the claims, the gap (claims take their share first); after a full pass at the
/// floor (few claims: an open circuit, a slow worker), `longest`, so the floor is a batch a
/// second and new messages are not shut out; else until the next is due, but at least
/// PROMOTE_GAP and at most `longest`.
fn next_promotion(
    moved: usize,
    (budget, floor): (usize, bool),
    next_due_in: Option<Duration>,
    longest: Duration,
) -> Duration {
    if moved >= budget {
        return if floor { longest } else { PROMOTE_GAP.min(longest) };
    }
    next_due_in.map_or(longest, |due| due.clamp(PROMOTE_GAP.min(longest), longest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_promoter_batches_retries_that_fall_due_continuously() {
        let second = Duration::from_secs(1);
        let ms = Duration::from_millis;
        assert_eq!(
            next_promotion(10, (10, false), Some(ms(0)), second),
            PROMOTE_GAP,
            "full pass set by the claims: they take their share, then on"
        );
        assert_eq!(
            next_promotion(10, (10, true), Some(ms(0)), second),
            second,
            "full pass at the floor: a batch a second"
        );
        assert_eq!(
            next_promotion(2, (10, false), Some(ms(1)), second),
            PROMOTE_GAP,
            "one due every ms: wait the gap"
        );
        assert_eq!(
            next_promotion(0, (10, false), Some(ms(300)), second),
            ms(300),
            "sleeps until the next is due"
        );
        assert_eq!(
            next_promotion(0, (10, false), Some(ms(9_000)), second),
            second,
            "at most a second"
        );
        assert_eq!(next_promotion(0, (10, false), None, second), second, "nothing waiting");
        assert_eq!(
            next_promotion(0, (10, false), Some(ms(1)), ms(5)),
            ms(5),
            "a retry interval under the gap wins"
        );
    }

    #[test]
    fn retries_take_about_half_of_what_is_claimed() {
        assert_eq!(share_of_claims(0, 10), (10, true), "idle: a batch a pass");
        assert_eq!(share_of_claims(400, 10), (200, false));
        assert_eq!(share_of_claims(1_000_000, 10), (PROMOTE_BATCH, false));
        assert_eq!(share_of_claims(0, 0), (1, false));
    }
}
