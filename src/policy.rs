//! The retry policy: what the result of one delivery attempt means for the message. Pure: no
//! I/O, no clock; `worker` carries out the decision and records it.
//!
//! | result of the POST | decision |
//! |---|---|
//! | 2xx | `Ack` |
//! | connect, timeout, TLS, other transport errors, 3xx, 408, 425, 429, 5xx | `Retry` after the interval (a longer `Retry-After`, up to the cap, wins) |
//! | other 4xx | `Dead(rejected)` |
//! | any failure that brings the count to `max_attempts` | `Dead(exhausted)` |
//!
//! The wait before a retry is the interval (fixed, or doubling with each failure up to a cap),
//! spread by the jitter fraction when one is set; a longer `Retry-After` always wins.

use std::time::Duration;

use crate::delivery::DeliveryError;
use crate::message::DeadReason;

/// The settings the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Attempts before a message is dead-lettered as `exhausted`.
    pub max_attempts: u32,
    /// The wait before the next attempt.
    pub retry_interval: Duration,
    /// The longest `Retry-After` honoured; a longer one is cut to this.
    pub max_retry_after: Duration,
    /// Fixed, or doubling with each failure.
    pub backoff: Backoff,
    /// Spread of the wait: each is the interval times a factor drawn from `1 ± jitter`.
    /// 0 keeps the old worker's exact interval.
    pub jitter: f64,
}

/// How the wait grows with the failures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Backoff {
    /// Always `retry_interval`.
    Fixed,
    /// `retry_interval × 2^(failures − 1)`, at most `max_interval`.
    Exponential { max_interval: Duration },
}

impl Policy {
    /// The wait before the retry that follows failure number `failures` (1-based), before any
    /// `Retry-After`; `sample` is a uniform draw from [0, 1) for the jitter.
    pub fn interval(&self, failures: u32, sample: f64) -> Duration {
        let base = match self.backoff {
            Backoff::Fixed => self.retry_interval,
            Backoff::Exponential { max_interval } => {
                let doublings = failures.saturating_sub(1).min(40);
                self.retry_interval
                    .checked_mul(1u32 << doublings.min(31))
                    .unwrap_or(Duration::MAX)
                    .min(max_interval.max(self.retry_interval))
            }
        };
        if self.jitter <= 0.0 || !self.jitter.is_finite() {
            return base;
        }
        let jitter = self.jitter.min(1.0);
        let factor = 1.0 + jitter * (2.0 * sample.clamp(0.0, 1.0) - 1.0);
        Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(base)
    }
}

/// The longest `Retry-After` courier honours unless told otherwise.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What to do with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Delivered: remove it from processing.
    Ack,
    /// Try again after `delay`, with `failures` as its new `attempt_count`.
    Retry { delay: Duration, failures: u32 },
    /// Give up: dead-letter it with `failures` as its final `attempt_count`.
    Dead { reason: DeadReason, failures: u32 },
}

/// Before an attempt: a message whose `attempt_count` is already at `max_attempts` is
/// dead-lettered without one.
pub fn before_attempt(attempt_count: u32, policy: &Policy) -> Option<Settle> {
    (attempt_count >= policy.max_attempts).then_some(Settle::Dead {
        reason: DeadReason::Exhausted,
        failures: attempt_count,
    })
}

/// After an attempt of a message that had failed `attempt_count` times before. `sample` is a
/// uniform draw from [0, 1) for the jitter (any value when there is none).
pub fn decide(result: &Result<(), DeliveryError>, attempt_count: u32, policy: &Policy, sample: f64) -> Settle {
    let Err(error) = result else {
        return Settle::Ack;
    };
    let failures = attempt_count.saturating_add(1);
    let retry_after = match error {
        DeliveryError::Status { status, .. } if is_permanent(*status) => {
            return Settle::Dead {
                reason: DeadReason::Rejected,
                failures,
            }
        }
        DeliveryError::Status { retry_after, .. } => *retry_after,
        _ => None,
    };
    if failures >= policy.max_attempts {
        return Settle::Dead {
            reason: DeadReason::Exhausted,
            failures,
        };
    }
    let interval = policy.interval(failures, sample);
    let delay = retry_after.map_or(interval, |after| after.min(policy.max_retry_after).max(interval));
    Settle::Retry { delay, failures }
}

/// A 4xx the main server will answer the same way however often it is asked. 408 (timeout),
/// 425 (too early) and 429 (too many requests) are about the moment, not the message.
fn is_permanent(status: u16) -> bool {
    (400..=499).contains(&status) && !matches!(status, 408 | 425 | 429)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        max_attempts: 5,
        retry_interval: Duration::from_secs(30),
        max_retry_after: MAX_RETRY_AFTER,
        backoff: Backoff::Fixed,
        jitter: 0.0,
    };

    fn status(status: u16, retry_after: Option<u64>) -> Result<(), DeliveryError> {
        Err(DeliveryError::Status {
            status,
            retry_after: retry_after.map(Duration::from_secs),
            body: String::new(),
        })
    }

    fn retry(seconds: u64, failures: u32) -> Settle {
        Settle::Retry {
            delay: Duration::from_secs(seconds),
            failures,
        }
    }

    fn dead(reason: DeadReason, failures: u32) -> Settle {
        Settle::Dead { reason, failures }
    }

    /// One row per line of the README's outcomes table, and the edges around them.
    #[test]
    fn every_outcome_in_the_readme_table() {
        use DeadReason::{Exhausted, Rejected};
        let transport = |kind: fn(crate::delivery::Cause) -> DeliveryError, text: &str| {
            Err::<(), _>(kind(std::sync::Arc::new(std::io::Error::other(text.to_string()))))
        };
        let rows: Vec<(&str, Result<(), DeliveryError>, u32, Settle)> = vec![
            ("2xx", Ok(()), 0, Settle::Ack),
            ("2xx on the last attempt", Ok(()), 4, Settle::Ack),
            (
                "connection refused",
                transport(DeliveryError::Connect, "refused"),
                0,
                retry(30, 1),
            ),
            ("timeout", transport(DeliveryError::Timeout, "slow"), 1, retry(30, 2)),
            ("TLS failure", transport(DeliveryError::Tls, "bad"), 0, retry(30, 1)),
            (
                "other transport error",
                transport(DeliveryError::Other, "reset"),
                0,
                retry(30, 1),
            ),
            ("302", status(302, None), 0, retry(30, 1)),
            ("408", status(408, None), 0, retry(30, 1)),
            ("425", status(425, None), 0, retry(30, 1)),
            ("429", status(429, None), 2, retry(30, 3)),
            ("500", status(500, None), 0, retry(30, 1)),
            ("503", status(503, None), 0, retry(30, 1)),
            ("503, longer Retry-After wins", status(503, Some(120)), 0, retry(120, 1)),
            ("429, shorter Retry-After loses", status(429, Some(5)), 0, retry(30, 1)),
            (
                "503, Retry-After over the cap",
                status(503, Some(86_400)),
                0,
                retry(3600, 1),
            ),
            ("400", status(400, None), 0, dead(Rejected, 1)),
            ("401", status(401, None), 3, dead(Rejected, 4)),
            ("404", status(404, None), 0, dead(Rejected, 1)),
            ("422", status(422, None), 0, dead(Rejected, 1)),
            ("422 with Retry-After", status(422, Some(60)), 0, dead(Rejected, 1)),
            (
                "503 bringing the count to max",
                status(503, None),
                4,
                dead(Exhausted, 5),
            ),
            (
                "timeout bringing the count to max",
                transport(DeliveryError::Timeout, "t"),
                4,
                dead(Exhausted, 5),
            ),
            (
                "400 on the last attempt is still rejected",
                status(400, None),
                4,
                dead(Rejected, 5),
            ),
            (
                "count beyond any limit",
                status(503, None),
                u32::MAX,
                dead(Exhausted, u32::MAX),
            ),
        ];
        for (name, result, attempt_count, expected) in rows {
            assert_eq!(decide(&result, attempt_count, &POLICY, 0.9), expected, "{name}");
        }
    }

    #[test]
    fn a_message_already_at_max_attempts_is_dead_without_an_attempt() {
        assert_eq!(before_attempt(4, &POLICY), None);
        assert_eq!(before_attempt(5, &POLICY), Some(dead(DeadReason::Exhausted, 5)));
        assert_eq!(before_attempt(9, &POLICY), Some(dead(DeadReason::Exhausted, 9)));
    }

    #[test]
    fn a_retry_interval_longer_than_the_cap_still_applies() {
        let policy = Policy {
            retry_interval: Duration::from_secs(7200),
            ..POLICY
        };
        assert_eq!(decide(&status(503, Some(60)), 0, &policy, 0.5), retry(7200, 1));
    }

    #[test]
    fn exponential_backoff_doubles_up_to_its_cap_and_retry_after_still_wins() {
        let policy = Policy {
            retry_interval: Duration::from_secs(30),
            backoff: Backoff::Exponential {
                max_interval: Duration::from_secs(600),
            },
            ..POLICY
        };
        let waits: Vec<u64> = (1..=7).map(|f| policy.interval(f, 0.5).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(policy.interval(u32::MAX, 0.5), Duration::from_secs(600));
        assert_eq!(decide(&status(503, None), 2, &policy, 0.5), retry(120, 3));
        assert_eq!(decide(&status(503, Some(900)), 0, &policy, 0.5), retry(900, 1));
    }

    #[test]
    fn jitter_spreads_the_wait_within_its_fraction() {
        let policy = Policy { jitter: 0.2, ..POLICY };
        assert_eq!(policy.interval(1, 0.0), Duration::from_secs(24));
        assert_eq!(policy.interval(1, 0.5), Duration::from_secs(30));
        assert_eq!(policy.interval(1, 0.999_999).as_secs(), 35);
        let none = Policy {
            jitter: f64::NAN,
            ..POLICY
        };
        assert_eq!(none.interval(1, 0.0), Duration::from_secs(30));
        // A Retry-After is never shortened by the jitter.
        assert_eq!(decide(&status(503, Some(60)), 0, &policy, 0.0), retry(60, 1));
    }
}
