//! Requeue and purge of the dead letters a filter selects, one script a record (why a kill
//! loses nothing: the `dlq` module's doc), paced by a rate or pipelined a page at a time.

use std::time::{Duration, Instant};

use super::pages::{walk, AsyncPageFn};
use super::{Filter, Letter};
use crate::queue::{self, Conn, Keys, QueueError};

/// What a requeue or purge does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Back to the queue: to its front (delivered next) or back.
    Requeue {
        /// To the front, rather than the back.
        front: bool,
    },
    /// Deleted.
    Purge,
}

/// How a requeue or purge runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    /// Only count what would be acted on.
    pub dry_run: bool,
    /// At most this many.
    pub limit: Option<u64>,
    /// At most this many per second.
    pub rate: Option<f64>,
}

/// Whether `rate` (dead letters per second) is one a requeue can keep: finite and at least
/// 1e-18, so the wait between two moves is a `Duration` (at 1e-45 it is not, and the wait
/// became "forever").
pub(crate) fn usable_rate(rate: f64) -> bool {
    rate.is_finite() && rate >= 1e-18
}

/// What a requeue or purge did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Outcome {
    /// Records read.
    pub scanned: u64,
    /// Records the filter selected (with `dry_run`: what would move).
    pub matched: u64,
    /// Records moved (or deleted).
    pub done: u64,
    /// Selected records another client moved or removed first.
    pub changed: u64,
    /// The message ids acted on (or that would be), at most `MAX_IDS`.
    pub ids: Vec<String>,
}

/// The most ids an `Outcome` lists.
const MAX_IDS: usize = 1000;

struct MovePage<'a, P> {
    filter: &'a Filter,
    action: Action,
    options: &'a Options,
    outcome: Outcome,
    progress: P,
    started: Instant,
}

impl<P: FnMut(&Outcome)> AsyncPageFn for MovePage<'_, P> {
    async fn call(
        &mut self,
        conn: &mut Conn,
        keys: &Keys,
        page: Vec<(Letter, bool)>,
    ) -> Result<(u64, bool), QueueError> {
        let mut replaced = 0;
        self.outcome.scanned += u64::try_from(page.len()).unwrap_or(0);
        // Without a rate the page's moves go in one pipeline (each still its own script).
        let rate = self.options.rate.filter(|r| *r > 0.0);
        let mut batch = Vec::new();
        let mut stop = false;
        for (letter, hit) in page {
            if self.options.limit.is_some_and(|limit| self.outcome.matched >= limit) {
                stop = true;
                break;
            }
            if !self.filter.matches(&letter, hit) {
                continue;
            }
            self.outcome.matched += 1;
            if self.outcome.ids.len() < MAX_IDS {
                if let Some(id) = letter.message_id() {
                    self.outcome.ids.push(id.to_string());
                }
            }
            if self.options.dry_run {
                continue;
            }
            let one = queue::DeadMove {
                position: letter.position,
                message: match self.action {
                    Action::Requeue { .. } => letter.requeued(),
                    Action::Purge => Vec::new(),
                },
                sha: letter.sha,
            };
            let Some(rate) = rate else {
                batch.push(one);
                continue;
            };
            // The n-th move waits until n / rate seconds after the start.
            #[allow(clippy::cast_precision_loss)]
            let due = self.outcome.done as f64 / rate;
            let due = Duration::try_from_secs_f64(due).unwrap_or(Duration::MAX);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let queue::DeadMove { position, message, sha } = one;
            let moved = match self.action {
                Action::Requeue { front } => {
                    queue::requeue_dead_at(conn, keys, position, &sha, &message, front).await?
                }
                Action::Purge => queue::drop_dead_at(conn, keys, position, &sha).await?,
            };
            replaced += self.count(moved);
            if self.outcome.done % 500 == 0 {
                (self.progress)(&self.outcome);
            }
        }
        let requeue = match self.action {
            Action::Requeue { front } => Some(front),
            Action::Purge => None,
        };
        for moved in queue::move_dead_many(conn, keys, &batch, requeue).await? {
            replaced += self.count(moved);
        }
        (self.progress)(&self.outcome);
        Ok((replaced, stop))
    }
}

impl<P> MovePage<'_, P> {
    /// Counts one move's outcome; 1 when it left a tombstone.
    fn count(&mut self, moved: bool) -> u64 {
        if moved {
            self.outcome.done += 1;
            1
        } else {
            self.outcome.changed += 1;
            0
        }
    }
}

/// Requeues or purges the dead letters `filter` selects, oldest first (so requeued messages
/// keep their order), one script each. `progress` hears how far it got now and then.
pub(crate) async fn act(
    conn: &mut Conn,
    keys: &Keys,
    filter: &Filter,
    action: Action,
    options: &Options,
    progress: impl FnMut(&Outcome),
) -> Result<Outcome, QueueError> {
    let mut page = MovePage {
        filter,
        action,
        options,
        outcome: Outcome::default(),
        progress,
        started: Instant::now(),
    };
    // Requeue makes the message from the whole record; purge needs only the header.
    let cap = match action {
        Action::Requeue { .. } if !options.dry_run => 0,
        _ => 4096,
    };
    let header_only = cap != 0;
    walk(
        conn,
        keys,
        filter.grep_text(),
        cap,
        !options.dry_run,
        header_only,
        &mut page,
    )
    .await?;
    Ok(page.outcome)
}

/// Deletes the whole dead-letter list; returns how many records it held.
pub(crate) async fn purge_all(conn: &mut Conn, keys: &Keys) -> Result<u64, QueueError> {
    queue::purge_dead(conn, keys).await
}
