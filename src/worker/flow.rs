//! Flow control towards the main server: how many deliveries may be under way now. The
//! circuit breaker (stop while the server is failing, probe, close gradually), a pause as
//! long as a `Retry-After` on a 429 or 503, and a token-bucket rate limit.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::breaker::{Aimd, Breaker, Cause, State, Transition, Treat, Verdict};
use crate::config::WorkerSettings;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::policy::Outcome;
use crate::sync::lock;

/// The longest a `Retry-After` pauses the whole worker.
const MAX_PAUSE: Duration = Duration::from_secs(300);

pub(super) struct Flow {
    concurrency: usize,
    /// Where the breaker's state shows: `/ready`, `/stats` and `worker_circuit_state`.
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    breaker: Mutex<Breaker>,
    /// Nothing is started before this (a `Retry-After` on a 429 or 503).
    paused_until: Mutex<Option<Instant>>,
    rate: Option<Mutex<Bucket>>,
    /// Adaptive concurrency, when on.
    adaptive: Option<Mutex<Aimd>>,
    /// Woken when a delivery finishes or the state changes: the claimer looks again.
    pub(super) changed: Notify,
    state: watch::Sender<State>,
}

/// A token bucket: `rate` tokens a second, at most one second's worth saved up.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Adds the tokens earned since it was last looked at, at most one second's worth.
    fn refill(&mut self) {
        let now = Instant::now();
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.rate.max(1.0));
        self.at = now;
    }
}

impl Flow {
    pub(super) fn new(worker: &WorkerSettings, health: Arc<Health>, metrics: Arc<Metrics>) -> Flow {
        let (breaker, concurrency, rate_limit) = (worker.breaker, worker.concurrency, worker.rate_limit);
        Flow {
            concurrency,
            health,
            metrics,
            adaptive: worker.adaptive_concurrency.then(|| Mutex::new(Aimd::new(concurrency))),
            breaker: Mutex::new(Breaker::new(breaker, Instant::now().into_std())),
            paused_until: Mutex::new(None),
            rate: (rate_limit > 0.0).then(|| {
                Mutex::new(Bucket {
                    rate: rate_limit,
                    tokens: rate_limit.min(1.0),
                    at: Instant::now(),
                })
            }),
            changed: Notify::new(),
            state: watch::channel(State::Closed).0,
        }
    }

    /// Follows the breaker's state (for the status reporter).
    pub(super) fn subscribe(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    /// Records an attempt's outcome; `retried`: its message had failed before. Returns how to
    /// treat it: as classified, or as the server's failure (released unchanged while open,
    /// retried and never rejected while probing).
    pub(super) fn record(&self, outcome: &Outcome, retried: bool, elapsed: Duration) -> Treat {
        if let Some(adaptive) = &self.adaptive {
            let mut aimd = lock(adaptive);
            aimd.record(outcome, elapsed, Instant::now().into_std());
            self.metrics.set_concurrency_limit(aimd.limit());
        }
        if let (true, Some(after)) = (outcome.overload, outcome.retry_after) {
            self.pause(after);
        }
        let now = Instant::now().into_std();
        let (treat, transition) = lock(&self.breaker).record(Verdict::of(outcome), retried, now);
        if let Some(transition) = transition {
            self.moved(transition);
        }
        treat
    }

    /// The main server asked, with `Retry-After`, for a pause: nothing new starts until then.
    fn pause(&self, after: Duration) {
        let until = Instant::now() + after.min(MAX_PAUSE);
        let mut paused = lock(&self.paused_until);
        if paused.is_none_or(|at| at < until) {
            *paused = Some(until);
        }
    }

    /// How many deliveries may be under way now, and when to look again if that is fewer than
    /// the concurrency (a probe or the end of a pause falls due).
    pub(super) fn admit(&self) -> (usize, Option<Instant>) {
        let now = Instant::now();
        if let Some(until) = *lock(&self.paused_until) {
            if now < until {
                return (0, Some(until));
            }
        }
        let (limit, transition, probe) = {
            let mut breaker = lock(&self.breaker);
            let (limit, transition) = breaker.admit(self.concurrency, now.into_std());
            (limit, transition, breaker.next_probe())
        };
        if let Some(transition) = transition {
            self.moved(transition);
        }
        let limit = match &self.adaptive {
            Some(adaptive) => limit.min(lock(adaptive).limit()),
            None => limit,
        };
        (limit, probe.map(Instant::from_std))
    }

    /// Waits for a token of the rate limit, when there is one.
    pub(super) async fn token(&self) {
        let Some(bucket) = &self.rate else {
            return;
        };
        loop {
            let wait = {
                let mut bucket = lock(bucket);
                bucket.refill();
                if bucket.tokens >= 1.0 {
                    bucket.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - bucket.tokens) / bucket.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes up to `n` more tokens of the rate limit that are there now, without waiting;
    /// returns how many (all `n` when there is no limit).
    pub(super) fn take_tokens(&self, n: usize) -> usize {
        let Some(bucket) = &self.rate else {
            return n;
        };
        let mut bucket = lock(bucket);
        bucket.refill();
        // Whole tokens, fewer than `n` or `n`: the conversion cannot lose anything that counts.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let taken = (bucket.tokens.floor().max(0.0) as usize).min(n);
        #[allow(clippy::cast_precision_loss)]
        let spent = taken as f64;
        bucket.tokens -= spent;
        taken
    }

    /// Gives back tokens taken for messages a claim did not find.
    pub(super) fn refund(&self, n: usize) {
        if let (Some(bucket), 1..) = (&self.rate, n) {
            let mut bucket = lock(bucket);
            #[allow(clippy::cast_precision_loss)]
            let back = n as f64;
            bucket.tokens = (bucket.tokens + back).min(bucket.rate.max(1.0));
        }
    }

    fn moved(&self, transition: Transition) {
        self.health.set_circuit(transition.to);
        self.state.send_replace(transition.to);
        self.changed.notify_one();
        match (transition.to, transition.cause) {
            (State::Open, Some(Cause::SameStatus(status))) => error!(
                from = transition.from.as_str(),
                status,
                next_probe_in = ?transition.next_probe_in.unwrap_or_default(),
                "Main server rejecting every delivery with HTTP {status}, across different \
                 messages: a server fault (a bad deploy, a certificate or route mix-up?), not each \
                 message's. Circuit open: no new deliveries, nothing dead-lettered for {status} \
                 until a probe gets another answer. /ready answers 503 until then"
            ),
            (State::Open, _) => warn!(
                from = transition.from.as_str(),
                next_probe_in = ?transition.next_probe_in.unwrap_or_default(),
                "Main server failing: circuit open. No new deliveries; messages it fails now go \
                 back to the queue without using an attempt. /ready answers 503 until it answers \
                 again"
            ),
            (State::HalfOpen, _) => info!("Circuit half-open: probing the main server with one delivery"),
            (State::Closed, _) => info!("Main server answering again: circuit closed, full concurrency"),
        }
    }
}
