//! Telling a dead worker from one that only looks old, for the reaper. A worker is judged by
//! what this worker itself saw, on its own monotonic clock: another worker is dead when the
//! heartbeat value it keeps in Redis has not changed for WORKER_DEAD_AFTER while this worker
//! was watching without a gap. Never by comparing the heartbeat with a clock: a Redis host
//! whose clock steps forward would make every worker look dead at once. And an outage that
//! every worker shared (Redis down, restarted, failed over) starts every watch again, so it
//! reaps nobody.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::queue::LiveWorker;

/// What this worker has seen of the other workers of one queue.
#[derive(Debug)]
pub(super) struct Watch {
    dead_after: Duration,
    /// Worker id -> the heartbeat last seen and since when it has been seen unchanged.
    seen: HashMap<String, (String, Instant)>,
    /// When this worker last read the live set.
    last_look: Option<Instant>,
}

/// One look at the live set.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Look {
    /// Workers seen alive or not yet watched long enough to tell.
    pub(super) live: usize,
    /// Workers whose heartbeat stayed as it is for WORKER_DEAD_AFTER: (id, that heartbeat).
    pub(super) dead: Vec<(String, String)>,
}

impl Watch {
    pub(super) fn new(dead_after: Duration) -> Watch {
        Watch {
            dead_after,
            seen: HashMap::new(),
            last_look: None,
        }
    }

    /// This worker could not read the live set (Redis unreachable): what it saw before says
    /// nothing about what happens meanwhile, so every watch starts again.
    pub(super) fn lost_sight(&mut self) {
        self.seen.clear();
        self.last_look = None;
    }

    /// Takes one look at the live set at `now`. `own_id` is this worker, always live.
    pub(super) fn look(&mut self, now: Instant, own_id: &str, workers: &[LiveWorker]) -> Look {
        // A look that comes longer than WORKER_DEAD_AFTER after the previous one (this process
        // was stopped, or starved) did not watch in between.
        if self
            .last_look
            .is_some_and(|last| now.saturating_duration_since(last) >= self.dead_after)
        {
            self.seen.clear();
        }
        self.last_look = Some(now);
        self.seen.retain(|id, _| workers.iter().any(|w| &w.id == id));
        let mut look = Look {
            live: 0,
            dead: Vec::new(),
        };
        for worker in workers {
            if worker.id == own_id {
                look.live += 1;
                continue;
            }
            match self.seen.get(&worker.id) {
                Some((beat, since)) if *beat == worker.heartbeat => {
                    if now.saturating_duration_since(*since) >= self.dead_after {
                        look.dead.push((worker.id.clone(), worker.heartbeat.clone()));
                        continue;
                    }
                }
                _ => {
                    self.seen.insert(worker.id.clone(), (worker.heartbeat.clone(), now));
                }
            }
            look.live += 1;
        }
        look
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(id: &str, heartbeat: u64) -> LiveWorker {
        LiveWorker {
            id: id.to_string(),
            heartbeat: heartbeat.to_string(),
            // The age by Redis's clock: never read. A clock step makes it anything.
            age: Duration::from_secs(3600),
        }
    }

    const DEAD_AFTER: Duration = Duration::from_secs(30);

    #[test]
    fn a_heartbeat_unchanged_for_dead_after_of_our_own_time_is_dead() {
        let start = Instant::now();
        let mut watch = Watch::new(DEAD_AFTER);
        let s = Duration::from_secs;
        assert_eq!(watch.look(start, "me", &[live("me", 1), live("b", 5)]).live, 2);
        // Unchanged, but only 20 s watched.
        assert!(watch.look(start + s(20), "me", &[live("b", 5)]).dead.is_empty());
        let look = watch.look(start + s(30), "me", &[live("me", 9), live("b", 5)]);
        assert_eq!(look.dead, vec![("b".to_string(), "5".to_string())]);
        assert_eq!(look.live, 1);
    }

    #[test]
    fn a_changing_heartbeat_is_alive_whatever_its_age_by_the_clock() {
        let start = Instant::now();
        let mut watch = Watch::new(DEAD_AFTER);
        for k in 0..20u64 {
            // Heartbeats that go backwards (the Redis clock stepped back) still change.
            let beat = 1_000_000 - k * 7;
            let look = watch.look(start + Duration::from_secs(k * 10), "me", &[live("b", beat)]);
            assert!(look.dead.is_empty(), "look {k}");
        }
    }

    #[test]
    fn an_outage_everybody_shared_reaps_nobody() {
        let start = Instant::now();
        let s = Duration::from_secs;
        let mut watch = Watch::new(DEAD_AFTER);
        watch.look(start, "me", &[live("b", 5)]);
        // Redis down for 90 s: the looks fail.
        watch.lost_sight();
        // Back: b has not heartbeated yet (it is reconnecting too).
        assert!(watch.look(start + s(90), "me", &[live("b", 5)]).dead.is_empty());
        assert!(watch.look(start + s(100), "me", &[live("b", 6)]).dead.is_empty());
        // A watcher that was itself stopped (no failed look, just no look) starts again too.
        assert!(watch.look(start + s(200), "me", &[live("b", 6)]).dead.is_empty());
        // But b silent for 30 s of watching without a gap is dead.
        let mut t = start + s(200);
        for _ in 0..3 {
            t += s(10);
            watch.look(t, "me", &[live("b", 6)]);
        }
        assert_eq!(watch.look(t, "me", &[live("b", 6)]).dead.len(), 1);
    }

    #[test]
    fn workers_that_left_are_forgotten() {
        let start = Instant::now();
        let mut watch = Watch::new(DEAD_AFTER);
        watch.look(start, "me", &[live("b", 5)]);
        watch.look(start + Duration::from_secs(10), "me", &[]);
        // b came back with the same value: watched from now, not from before.
        let later = start + Duration::from_secs(35);
        assert!(watch.look(later, "me", &[live("b", 5)]).dead.is_empty());
    }
}
