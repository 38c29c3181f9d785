//! Events that can repeat for every message (a retry, a dead letter, an invalid item) logged
//! without a line per message: the first in full, then a summary per cause and interval.

use std::time::{Duration, Instant};

use crate::sync::lock;
use tracing::{error, warn};

/// Counts repeated events and says when to log them: the first at once, then at most one line
/// per interval with how many happened since the last line.
#[derive(Debug)]
pub struct Summary {
    every: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl Summary {
    pub fn new(every: Duration) -> Summary {
        Summary {
            every,
            last: None,
            unlogged: 0,
        }
    }

    /// Events recorded and not yet covered by a line, when the interval since the last line is
    /// over (or at once with `all`); they count as logged from then.
    pub fn take_due(&mut self, now: Instant, all: bool) -> Option<u64> {
        let over = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.every);
        if self.unlogged == 0 || !(over || all) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }

    /// Records one event at `now`; `Some(n)` when a line is due, covering `n` events.
    pub fn record(&mut self, now: Instant) -> Option<u64> {
        self.unlogged = self.unlogged.saturating_add(1);
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Repeated log lines of one kind per cause, summarised: the first in full at once, then at
/// most one line per interval with how many there were and the latest in full. The metrics
/// count every event; the log says what is going on without writing a line per message.
pub struct Repeats {
    every: Duration,
    causes: std::sync::Mutex<std::collections::HashMap<(Repeat, &'static str), Pending>>,
}

/// The kinds of line that can repeat for every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Repeat {
    /// A failed delivery that will be retried.
    Retry,
    /// A message moved to the dead-letter list.
    DeadLetter,
    /// A queue item that is not a message.
    Invalid,
}

struct Pending {
    summary: Summary,
    /// The latest event not yet logged: its message id and error.
    latest: (String, String),
}

/// A summary line that is due: how many events, and the latest one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub kind: Repeat,
    pub cause: &'static str,
    pub count: u64,
    pub message_id: String,
    pub error: String,
}

impl Repeats {
    pub fn new(every: Duration) -> Repeats {
        Repeats {
            every,
            causes: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Records one event; `Some(count)` when a line is due now (1: log it in full).
    pub fn record(&self, kind: Repeat, cause: &'static str, message_id: &str, error: &str) -> Option<u64> {
        let mut causes = lock(&self.causes);
        let pending = causes.entry((kind, cause)).or_insert_with(|| Pending {
            summary: Summary::new(self.every),
            latest: (String::new(), String::new()),
        });
        let due = pending.summary.record(Instant::now());
        if due.is_none() {
            pending.latest = (message_id.to_string(), error.to_string());
        }
        due
    }

    /// Lines for events not yet logged whose interval is over (all of them with `all`, at stop).
    pub fn due(&self, all: bool) -> Vec<Due> {
        let mut causes = lock(&self.causes);
        let now = Instant::now();
        causes
            .iter_mut()
            .filter_map(|(&(kind, cause), pending)| {
                let count = pending.summary.take_due(now, all)?;
                let (message_id, error) = std::mem::take(&mut pending.latest);
                Some(Due {
                    kind,
                    cause,
                    count,
                    message_id,
                    error,
                })
            })
            .collect()
    }
}

impl Due {
    /// One summary line for events counted since the last line of their kind and cause.
    pub fn log(&self) {
        let Due {
            kind,
            cause,
            count,
            message_id,
            error,
        } = self;
        match kind {
            Repeat::Retry => {
                warn!(
                    cause,
                    count,
                    latest_message_id = %message_id,
                    latest_error = %error,
                    "Delivery failed {count} more times ({cause}) since the last report; each will \
                     be retried"
                )
            }
            Repeat::DeadLetter => {
                error!(
                    reason = cause,
                    count,
                    latest_message_id = %message_id,
                    latest_error = %error,
                    "{count} more messages moved to the dead-letter list ({cause}) since the last \
                     report"
                )
            }
            Repeat::Invalid => {
                warn!(
                    reason = cause,
                    count,
                    latest_error = %error,
                    "{count} more invalid messages moved to the dead-letter list ({cause}) since \
                     the last report"
                )
            }
        }
    }
}

/// The text a panic was raised with, when it was a string.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_events_make_one_line_per_interval_with_a_count() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut summary = Summary::new(Duration::from_secs(10));
        assert_eq!(summary.record(at(0)), Some(1), "the first at once");
        for ms in 1..=99 {
            assert_eq!(summary.record(at(ms * 100)), None, "quiet within the interval");
        }
        assert_eq!(summary.record(at(10_000)), Some(100), "then one line for all of them");
        assert_eq!(summary.record(at(10_001)), None);
        assert_eq!(summary.record(at(25_000)), Some(2));
    }

    #[test]
    fn a_quiet_spell_reports_what_is_left_and_stop_reports_everything() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut summary = Summary::new(Duration::from_secs(10));
        assert_eq!(summary.record(at(0)), Some(1));
        assert_eq!(summary.record(at(1)), None);
        assert_eq!(summary.take_due(at(5_000), false), None, "interval not over");
        assert_eq!(summary.take_due(at(10_000), false), Some(1));
        assert_eq!(summary.take_due(at(30_000), false), None, "nothing left");
        assert_eq!(summary.record(at(30_001)), Some(1));
        assert_eq!(summary.record(at(30_002)), None);
        assert_eq!(summary.take_due(at(30_003), true), Some(1), "at stop");
    }
}
