//! The `worker` section: the worker's id and pace, its liveness timings, retries and their
//! backoff, the circuit breaker on the main server and the delivery rate.

use std::time::Duration;

use super::{default_batch_size, ConfigError, OutcomeRules, Source};

/// The worker (`worker`, and `main_server.outcomes`).
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Unique among the workers of one Redis; part of its processing list's key.
    pub id: String,
    /// Delivery slots: messages delivered at once.
    pub concurrency: usize,
    /// The wait before a failed message is tried again (the first wait, when exponential).
    pub retry_interval: Duration,
    /// Attempts before a message is dead-lettered.
    pub max_attempts: u32,
    /// The most messages claimed in one Redis call.
    pub batch_size: usize,
    /// How long deliveries under way get on shutdown.
    pub shutdown_grace: Duration,
    /// Larger items are dead-lettered as `too_large`.
    pub max_message_bytes: usize,
    /// Time between heartbeats (and gauge refreshes).
    pub heartbeat_interval: Duration,
    /// A worker whose heartbeat stayed unchanged this long counts as gone.
    pub dead_after: Duration,
    /// Runtime threads: 1 (one thread), N, or 0 for one per core.
    pub threads: usize,
    /// Fixed (the old worker's) or exponential waits between attempts.
    pub retry_backoff: Backoff,
    /// Spread of each wait, a fraction (0: none).
    pub retry_jitter: f64,
    /// A message returned from dead workers' hands more often is dead-lettered (0: never).
    pub max_reclaims: u32,
    /// The circuit breaker on the main server.
    pub breaker: BreakerSettings,
    /// Deliveries per second at most (0: no limit).
    pub rate_limit: f64,
    /// An AIMD limit on deliveries under way, between 1 and `concurrency`.
    pub adaptive_concurrency: bool,
    /// Statuses whose outcome the operator set over the default table
    /// (`main_server.outcomes`, `MAIN_SERVER_OUTCOMES`).
    pub outcomes: OutcomeRules,
}

// Plain types and rules that the configured modules read: config imports none of them, so it
// can be read and tested alone (docs/design.md, "The map of the code").

/// The breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Off: the worker never stops claiming (the old worker's behaviour).
    pub enabled: bool,
    /// The share of server faults among the recent attempts that opens the breaker.
    pub failure_rate: f64,
    /// How many of the most recent attempts are judged.
    pub min_attempts: u32,
    /// Attempts older than this are forgotten.
    pub window: Duration,
    /// The first probe's wait after opening; it doubles after each failed probe.
    pub probe_min: Duration,
    /// The longest wait between probes.
    pub probe_max: Duration,
    /// Rejections in a row with one status, across messages, that open it (0: never).
    pub same_status: u32,
    /// How long a delivered retry keeps first attempts' failures from opening it.
    pub retry_grace: Duration,
}

/// How the wait grows with the failures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Backoff {
    /// Always `retry_interval`.
    Fixed,
    /// `retry_interval × 2^(failures − 1)`, at most `max_interval`.
    Exponential {
        /// The longest wait.
        max_interval: Duration,
    },
}

impl Source<'_> {
    /// The `worker` section, and `main_server.outcomes`, which the worker's deliveries apply.
    pub(super) fn worker(&self) -> Result<WorkerSettings, ConfigError> {
        let id = self.worker_id()?;
        let retry_interval = self.seconds("worker.retry_interval", 0.01, 86_400.0)?;
        let heartbeat_interval = self.seconds("worker.heartbeat_interval", 0.05, 3_600.0)?;
        let dead_after = self.seconds("worker.dead_after", 0.1, 86_400.0)?;
        if dead_after < heartbeat_interval * 2 {
            return Err(self.invalid(
                "worker.dead_after",
                "must be at least twice worker.heartbeat_interval, or live workers would be reaped",
            ));
        }
        let concurrency = self.number("worker.concurrency", 1, 10_000)?;
        let (probe_min, probe_max) = self.probe_waits()?;
        Ok(WorkerSettings {
            id,
            concurrency,
            retry_interval,
            max_attempts: self.number("worker.max_attempts", 1, u32::MAX)?,
            batch_size: match self.text("worker.batch_size")?.trim() {
                "" => default_batch_size(concurrency),
                _ => self.number("worker.batch_size", 1, 1_000)?,
            },
            shutdown_grace: self.seconds("worker.shutdown_grace", 0.0, 3_600.0)?,
            max_message_bytes: self.number("worker.max_message_bytes", 64, 512 * 1024 * 1024)?,
            heartbeat_interval,
            dead_after,
            threads: self.number("worker.threads", 0, 1024)?,
            retry_backoff: self.backoff()?,
            max_reclaims: self.number("worker.max_reclaims", 0, 1_000_000)?,
            breaker: self.breaker(retry_interval, probe_min, probe_max)?,
            adaptive_concurrency: self.flag("worker.adaptive_concurrency")?,
            outcomes: OutcomeRules::parse(&self.text("main_server.outcomes")?)
                .map_err(|e| self.invalid("main_server.outcomes", &e))?,
            rate_limit: self.real(
                "worker.rate_limit",
                "expected deliveries per second from 0.001 (one in 1,000 s) to 1000000, \
                 or 0 for no limit",
                |rate| rate == 0.0 || (0.001..=1e6).contains(&rate),
            )?,
            retry_jitter: self.real(
                "worker.retry_jitter",
                "expected a fraction from 0 to 1 (0.1 spreads each wait by up to 10% either way)",
                |jitter| (0.0..=1.0).contains(&jitter),
            )?,
        })
    }

    /// WORKER_ID, or `worker-<pid>` when it is empty; it becomes part of Redis keys.
    fn worker_id(&self) -> Result<String, ConfigError> {
        let id = self.text("worker.id")?.trim().to_string();
        let id = if id.is_empty() {
            format!("worker-{}", std::process::id())
        } else {
            id
        };
        if id.len() > 200 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c)) {
            return Err(self.invalid(
                "worker.id",
                "expected up to 200 letters, digits or - _ . : @ (it becomes part of a Redis key)",
            ));
        }
        Ok(id)
    }

    /// The breaker's first and longest waits between probes; the first may not be the longer.
    fn probe_waits(&self) -> Result<(Duration, Duration), ConfigError> {
        let (probe_min, probe_max) = (
            self.seconds("worker.breaker_probe_min", 0.01, 86_400.0)?,
            self.seconds("worker.breaker_probe_max", 0.01, 86_400.0)?,
        );
        if probe_min > probe_max {
            return Err(self.invalid(
                "worker.breaker_probe_min",
                "must not be longer than worker.breaker_probe_max (WORKER_BREAKER_PROBE_MAX)",
            ));
        }
        Ok((probe_min, probe_max))
    }

    /// Fixed waits between attempts, or exponential ones up to WORKER_RETRY_MAX_INTERVAL.
    fn backoff(&self) -> Result<Backoff, ConfigError> {
        match self.text("worker.retry_backoff")?.trim().to_ascii_lowercase().as_str() {
            "fixed" => Ok(Backoff::Fixed),
            "exponential" => Ok(Backoff::Exponential {
                max_interval: self.seconds("worker.retry_max_interval", 0.01, 7.0 * 86_400.0)?,
            }),
            _ => Err(self.invalid("worker.retry_backoff", "expected fixed or exponential")),
        }
    }

    /// The circuit breaker's settings, around the probe waits `probe_waits` read.
    fn breaker(
        &self,
        retry_interval: Duration,
        probe_min: Duration,
        probe_max: Duration,
    ) -> Result<BreakerSettings, ConfigError> {
        Ok(BreakerSettings {
            enabled: self.flag("worker.breaker")?,
            failure_rate: self.real(
                "worker.breaker_failure_rate",
                "expected a fraction above 0 and at most 1 (0.5: half the attempts)",
                |rate| rate > 0.0 && rate <= 1.0,
            )?,
            min_attempts: self.number("worker.breaker_min_attempts", 1, 100_000)?,
            window: self.seconds("worker.breaker_window", 0.1, 86_400.0)?,
            probe_min,
            probe_max,
            same_status: self.number("worker.breaker_same_status", 0, 100_000)?,
            // First attempts failing do not open the breaker while retries get through:
            // for as long as two retry intervals, at most 2 s (longer would let a server
            // that died after one delivered retry take a retry interval of failures).
            retry_grace: retry_interval.saturating_mul(2).min(Duration::from_secs(2)),
        })
    }
}
