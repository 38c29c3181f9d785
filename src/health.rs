//! What the worker tells the outside about itself: whether Redis answers, whether it drains,
//! the circuit breaker's state, and the queues as its heartbeat last read them. The worker
//! writes it; `admin` only renders it (/ready, /stats).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tracing::{error, info};

use crate::breaker::State;
use crate::metrics::Metrics;
use crate::queue::{Depths, LiveWorker, QueueError};
use crate::sync::lock;

/// What the worker tells the outside about itself.
pub struct Health {
    redis_up: AtomicBool,
    /// When the current outage was noticed, in ns since `started`.
    down_at: AtomicU64,
    connected_once: AtomicBool,
    draining: AtomicBool,
    circuit: Mutex<State>,
    started: Instant,
    metrics: Arc<Metrics>,
    /// The queues as the heartbeat last read them; `None` until it first has.
    queues: watch::Sender<Option<QueueStats>>,
    /// Fresh reads asked for by `/stats`, counted; a read answers every ask counted before it
    /// started.
    asked: AtomicU64,
    /// Wakes the heartbeat for a read asked for.
    ask: Notify,
    /// When `/stats` last had a fresh read: a flood of requests asks for one at most once per
    /// its `max_age`, and concurrent requests wait for the one read.
    last_fresh: tokio::sync::Mutex<Option<Instant>>,
}

/// The queues as one read found them, for `/stats`.
#[derive(Debug, Clone)]
pub struct QueueStats {
    /// The count of asks this read answers (`Health::asked` when it started).
    answers: u64,
    /// Each queue in the worker's order, or what stopped the read.
    pub read: Result<Vec<QueueStat>, String>,
}

/// One queue as read for `/stats`.
#[derive(Debug, Clone)]
pub struct QueueStat {
    pub queue: String,
    pub depths: Depths,
    pub workers: Vec<LiveWorker>,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Health {
        metrics.set_redis_up(false);
        Health {
            redis_up: AtomicBool::new(false),
            down_at: AtomicU64::new(0),
            connected_once: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            circuit: Mutex::new(State::Closed),
            started: Instant::now(),
            metrics,
            queues: watch::channel(None).0,
            asked: AtomicU64::new(0),
            ask: Notify::new(),
            last_fresh: tokio::sync::Mutex::new(None),
        }
    }

    /// The circuit breaker moved to `state`.
    pub fn set_circuit(&self, state: State) {
        *lock(&self.circuit) = state;
        self.metrics.set_circuit(state);
    }

    /// The circuit breaker's state.
    pub fn circuit(&self) -> State {
        *lock(&self.circuit)
    }

    /// A Redis call that started at `started` succeeded. Logs the recovery once when Redis had
    /// been unreachable; a late reply to a call that began before the outage was noticed
    /// proves nothing and is ignored.
    pub fn redis_ok(&self, started: Instant) {
        if self.redis_up.load(Ordering::Acquire) {
            return;
        }
        if self.since_start(started) < self.down_at.load(Ordering::Acquire) {
            return;
        }
        if !self.redis_up.swap(true, Ordering::AcqRel) {
            self.metrics.set_redis_up(true);
            if self.connected_once.swap(true, Ordering::AcqRel) {
                info!("Redis is reachable again; resuming");
            }
        }
    }

    /// Redis could not be reached. Logs the outage once, not once per failed call.
    pub fn redis_failed(&self, error: &QueueError) {
        if self.redis_up.swap(false, Ordering::AcqRel) {
            self.down_at.store(self.since_start(Instant::now()), Ordering::Release);
            self.metrics.set_redis_up(false);
            error!(
                error = %error,
                "Redis is unreachable; holding results and retrying with backoff"
            );
        }
    }

    fn since_start(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Acquire)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// How long this worker has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Why the worker is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.draining() {
            Some("draining")
        } else if !self.connected_once.load(Ordering::Acquire) {
            Some("connecting to Redis")
        } else if !self.redis_up() {
            Some("Redis unreachable")
        } else if self.circuit() == State::Open {
            Some("main server failing (circuit open)")
        } else {
            None
        }
    }

    /// Waits until `/stats` asks the heartbeat for a fresh read.
    pub async fn stats_wanted(&self) {
        self.ask.notified().await;
    }

    /// The asks for a fresh read so far: a read started now answers them.
    pub fn asks(&self) -> u64 {
        self.asked.load(Ordering::Acquire)
    }

    /// Publishes what the heartbeat read of the queues; `answers` is `asks()` taken before the
    /// read started.
    pub fn publish_queues(&self, answers: u64, read: Result<Vec<QueueStat>, String>) {
        self.queues.send_replace(Some(QueueStats { answers, read }));
    }

    /// The queues for `/stats`: the last read when one was fresh within `max_age`, else a
    /// read asked of the heartbeat now, waited for up to `wait`. `None` while the heartbeat
    /// has published nothing (not connected to Redis yet).
    pub async fn queue_stats(&self, max_age: Duration, wait: Duration) -> Option<QueueStats> {
        self.queues.borrow().as_ref()?;
        let mut last_fresh = self.last_fresh.lock().await;
        if last_fresh.is_some_and(|at| at.elapsed() < max_age) {
            return self.queues.borrow().clone();
        }
        let mut published = self.queues.subscribe();
        let ask = self.asked.fetch_add(1, Ordering::AcqRel) + 1;
        self.ask.notify_one();
        let answered = async {
            let stats = published
                .wait_for(|stats| stats.as_ref().is_some_and(|s| s.answers >= ask))
                .await
                .ok()?;
            (*stats).clone()
        };
        match tokio::time::timeout(wait, answered).await {
            Ok(Some(stats)) => {
                *last_fresh = Some(Instant::now());
                Some(stats)
            }
            _ => Some(QueueStats {
                answers: 0,
                read: Err(format!("Redis did not answer within {} s", wait.as_secs())),
            }),
        }
    }
}
