//! The retry policy: what the result of one delivery attempt means for the message. Pure: no
//! I/O, no clock; `worker` carries out the decision and records it.
//!
//! `classify` reads an attempt's result once, into an `Outcome` that the policy, the circuit
//! breaker, the adaptive limit and the metrics all read. By default (the old worker's table):
//!
//! | result of the POST | outcome | server fault | overload |
//! |---|---|---|---|
//! | 2xx | delivered | | |
//! | connect, TLS, other transport errors | retry | yes | |
//! | timeout | retry | yes | yes |
//! | 502, 504 | retry | yes | |
//! | 503 | retry | yes | yes |
//! | 429 | retry | | yes |
//! | 3xx, 408, 425, 500, other 5xx | retry | | |
//! | other 4xx | rejected | | |
//!
//! `MAIN_SERVER_OUTCOMES` (`Outcomes`) maps statuses or ranges to delivered, retry or reject
//! over that table. `decide` turns an outcome into what happens to the message:
//!
//! | outcome | decision |
//! |---|---|
//! | delivered | `Ack` |
//! | retry | `Retry` after the interval (a longer `Retry-After`, up to the cap, wins) |
//! | rejected | `Dead(rejected)` |
//! | any failure that brings the count to `max_attempts` | `Dead(exhausted)` |
//!
//! The wait before a retry is the interval (fixed, or doubling with each failure up to a cap),
//! spread by the jitter fraction when one is set; a longer `Retry-After` always wins.

pub(crate) use crate::config::Backoff;
use crate::config::{OutcomeRules, StatusOutcome};
use std::time::Duration;

use crate::delivery::DeliveryError;
use crate::message::DeadReason;

/// The settings the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Policy {
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

impl Policy {
    /// The wait before the retry that follows failure number `failures` (1-based), before any
    /// `Retry-After`; `sample` is a uniform draw from [0, 1) for the jitter.
    pub(crate) fn interval(&self, failures: u32, sample: f64) -> Duration {
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
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What to do with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Delivered: remove it from processing.
    Ack,
    /// Try again after `delay`, with `failures` as its new `attempt_count`.
    Retry { delay: Duration, failures: u32 },
    /// Give up: dead-letter it with `failures` as its final `attempt_count`.
    Dead { reason: DeadReason, failures: u32 },
}

/// Before an attempt: a message whose `attempt_count` is already at `max_attempts` is
/// dead-lettered without one.
pub(crate) fn before_attempt(attempt_count: u32, policy: &Policy) -> Option<Settle> {
    (attempt_count >= policy.max_attempts).then_some(Settle::Dead {
        reason: DeadReason::Exhausted,
        failures: attempt_count,
    })
}

/// After an attempt of a message that had failed `attempt_count` times before. `sample` is a
/// uniform draw from [0, 1) for the jitter (any value when there is none).
pub(crate) fn decide(outcome: &Outcome, attempt_count: u32, policy: &Policy, sample: f64) -> Settle {
    let failures = attempt_count.saturating_add(1);
    match outcome.kind {
        Kind::Delivered => return Settle::Ack,
        Kind::Rejected => {
            return Settle::Dead {
                reason: DeadReason::Rejected,
                failures,
            }
        }
        Kind::Retry => {}
    }
    if failures >= policy.max_attempts {
        return Settle::Dead {
            reason: DeadReason::Exhausted,
            failures,
        };
    }
    let interval = policy.interval(failures, sample);
    let delay = outcome
        .retry_after
        .map_or(interval, |after| after.min(policy.max_retry_after).max(interval));
    Settle::Retry { delay, failures }
}

/// What an attempt's result means for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The main server has it.
    Delivered,
    /// It will answer the same however often it is asked: dead-letter the message.
    Rejected,
    /// Ask again later.
    Retry,
}

/// One attempt's result, read once: what it means for the message, and what it says about the
/// main server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub kind: Kind,
    /// The HTTP status, when the server answered.
    pub status: Option<u16>,
    /// The server could not be reached, failed TLS, timed out, or answered 502, 503 or 504:
    /// a sign that the server, not the message, is failing (the circuit breaker counts these).
    pub server_fault: bool,
    /// 429, 503 or a timeout: the server is overloaded (the adaptive limit backs off).
    pub overload: bool,
    /// The wait the server asked for, on a retry.
    pub retry_after: Option<Duration>,
}

/// Statuses whose outcome the operator set (`MAIN_SERVER_OUTCOMES`), over the default table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Outcomes {
    /// Inclusive ranges, in the order given; the first that holds a status decides.
    rules: Vec<(u16, u16, Kind)>,
}

impl From<&OutcomeRules> for Outcomes {
    fn from(rules: &OutcomeRules) -> Outcomes {
        Outcomes {
            rules: rules
                .rules
                .iter()
                .map(|&(first, last, outcome)| {
                    let kind = match outcome {
                        StatusOutcome::Delivered => Kind::Delivered,
                        StatusOutcome::Retry => Kind::Retry,
                        StatusOutcome::Reject => Kind::Rejected,
                    };
                    (first, last, kind)
                })
                .collect(),
        }
    }
}

impl Outcomes {
    /// Reads `409=delivered,404=retry,500-599=reject` (`config::OutcomeRules::parse`).
    #[cfg(test)]
    pub(crate) fn parse(text: &str) -> Result<Outcomes, String> {
        OutcomeRules::parse(text).map(|rules| Outcomes::from(&rules))
    }

    /// What an attempt's result means: the one reading of a `DeliveryError` that the policy,
    /// the breaker, the adaptive limit and the metrics share.
    pub(crate) fn classify(&self, result: &Result<(), DeliveryError>) -> Outcome {
        let transport = |overload| Outcome {
            kind: Kind::Retry,
            status: None,
            server_fault: true,
            overload,
            retry_after: None,
        };
        match result {
            Ok(()) => Outcome {
                kind: Kind::Delivered,
                status: None,
                server_fault: false,
                overload: false,
                retry_after: None,
            },
            Err(DeliveryError::Timeout(_)) => transport(true),
            Err(DeliveryError::Connect(_) | DeliveryError::Tls(_) | DeliveryError::Other(_)) => transport(false),
            Err(DeliveryError::Status {
                status, retry_after, ..
            }) => {
                let status = *status;
                let set = self
                    .rules
                    .iter()
                    .find(|(first, last, _)| (*first..=*last).contains(&status))
                    .map(|rule| rule.2);
                let kind = match status {
                    // The server has the message, whatever else is set.
                    200..=299 => Kind::Delivered,
                    _ => set.unwrap_or(if is_permanent(status) {
                        Kind::Rejected
                    } else {
                        Kind::Retry
                    }),
                };
                let retrying = kind == Kind::Retry;
                Outcome {
                    kind,
                    status: Some(status),
                    server_fault: retrying && matches!(status, 502..=504),
                    overload: retrying && matches!(status, 429 | 503),
                    retry_after: if retrying { *retry_after } else { None },
                }
            }
        }
    }
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

    /// The default table, then the decision.
    fn judge(result: &Result<(), DeliveryError>, attempt_count: u32, policy: &Policy, sample: f64) -> Settle {
        decide(&Outcomes::default().classify(result), attempt_count, policy, sample)
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
            assert_eq!(judge(&result, attempt_count, &POLICY, 0.9), expected, "{name}");
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
        assert_eq!(judge(&status(503, Some(60)), 0, &policy, 0.5), retry(7200, 1));
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
        assert_eq!(judge(&status(503, None), 2, &policy, 0.5), retry(120, 3));
        assert_eq!(judge(&status(503, Some(900)), 0, &policy, 0.5), retry(900, 1));
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
        assert_eq!(judge(&status(503, Some(60)), 0, &policy, 0.0), retry(60, 1));
    }

    /// The one reading of a result: every row of the module's table, what each says about the
    /// server, and the operator's overrides on top.
    #[test]
    fn classify_reads_every_result_once() {
        let transport = |kind: fn(crate::delivery::Cause) -> DeliveryError| {
            Err::<(), _>(kind(std::sync::Arc::new(std::io::Error::other("x"))))
        };
        let table = Outcomes::default();
        // (result, kind, server fault, overload, Retry-After kept)
        type Row = (&'static str, Result<(), DeliveryError>, Kind, bool, bool, bool);
        let rows: Vec<Row> = vec![
            ("2xx", Ok(()), Kind::Delivered, false, false, false),
            (
                "connect",
                transport(DeliveryError::Connect),
                Kind::Retry,
                true,
                false,
                false,
            ),
            ("tls", transport(DeliveryError::Tls), Kind::Retry, true, false, false),
            (
                "timeout",
                transport(DeliveryError::Timeout),
                Kind::Retry,
                true,
                true,
                false,
            ),
            (
                "other",
                transport(DeliveryError::Other),
                Kind::Retry,
                true,
                false,
                false,
            ),
            ("302", status(302, None), Kind::Retry, false, false, false),
            ("400", status(400, None), Kind::Rejected, false, false, false),
            ("404", status(404, None), Kind::Rejected, false, false, false),
            ("408", status(408, None), Kind::Retry, false, false, false),
            ("421", status(421, None), Kind::Rejected, false, false, false),
            (
                "422 with Retry-After",
                status(422, Some(9)),
                Kind::Rejected,
                false,
                false,
                false,
            ),
            ("425", status(425, None), Kind::Retry, false, false, false),
            ("429", status(429, Some(9)), Kind::Retry, false, true, true),
            ("500", status(500, None), Kind::Retry, false, false, false),
            ("501", status(501, None), Kind::Retry, false, false, false),
            ("502", status(502, None), Kind::Retry, true, false, false),
            ("503", status(503, Some(9)), Kind::Retry, true, true, true),
            ("504", status(504, None), Kind::Retry, true, false, false),
        ];
        for (name, result, kind, fault, overload, after) in rows {
            let outcome = table.classify(&result);
            assert_eq!(
                (
                    outcome.kind,
                    outcome.server_fault,
                    outcome.overload,
                    outcome.retry_after.is_some()
                ),
                (kind, fault, overload, after),
                "{name}"
            );
        }
        let set = Outcomes::parse("409=delivered, 404=retry,422=reject,500-503=reject,503-504=retry").unwrap();
        let kind = |s| set.classify(&status(s, Some(5))).kind;
        assert_eq!(kind(409), Kind::Delivered);
        assert_eq!(kind(404), Kind::Retry);
        assert_eq!(kind(422), Kind::Rejected);
        assert_eq!(kind(503), Kind::Rejected, "the earlier range wins");
        assert_eq!(kind(400), Kind::Rejected, "the rest keep the default");
        assert_eq!(kind(429), Kind::Retry);
        let rejected_503 = set.classify(&status(503, Some(5)));
        assert!(!rejected_503.server_fault && rejected_503.retry_after.is_none());
        assert_eq!(judge(&Ok(()), 0, &POLICY, 0.5), Settle::Ack);
        assert_eq!(decide(&set.classify(&status(409, None)), 3, &POLICY, 0.5), Settle::Ack);
        assert_eq!(decide(&set.classify(&status(404, None)), 0, &POLICY, 0.5), retry(30, 1));
    }

    #[test]
    fn outcome_settings_are_read_strictly() {
        assert_eq!(Outcomes::parse("").unwrap(), Outcomes::default());
        assert!(Outcomes::parse(" 409 = Delivered ,").is_ok());
        for (text, says) in [
            ("409", "no '='"),
            ("409=maybe", "delivered, retry or reject"),
            ("99=retry", "not an HTTP status"),
            ("600=retry", "not an HTTP status"),
            ("4o4=retry", "not an HTTP status"),
            ("499-400=retry", "backwards"),
            ("200=retry", "2xx is always delivered"),
            ("100-599=reject", "2xx is always delivered"),
            ("-1=retry", "not an HTTP status"),
            ("500-599=delivered", "only a 4xx can count as delivered"),
            ("302=delivered", "only a 4xx can count as delivered"),
            ("404=retry,404=reject", "an earlier entry"),
            ("400-499=retry,404=reject", "an earlier entry"),
        ] {
            let err = Outcomes::parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
