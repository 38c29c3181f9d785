//! Every metric courier exports, declared once with its help text. The Python worker's names
//! come first; every series carries a `worker_id` label. Code records events through the small
//! methods here.

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::delivery::Resend;
use crate::queue::Depths;

/// Label values for `worker_messages_failed_total{reason}`.
pub const FAILURE_REASONS: &[&str] = &[
    "connect",
    "tls",
    "timeout",
    "http_429",
    "http_5xx",
    "http_4xx",
    "http_other",
    "other",
];
/// Label values for dead letters and invalid messages.
pub const DEAD_REASONS: &[&str] = &[
    "exhausted",
    "rejected",
    "invalid_json",
    "invalid_message_id",
    "invalid_attempt_count",
    "too_large",
    "internal_error",
    "poisoned",
];
const INVALID_REASONS: &[&str] = &[
    "invalid_json",
    "invalid_message_id",
    "invalid_attempt_count",
    "too_large",
];
const STATUS_CLASSES: &[&str] = &["1xx", "2xx", "3xx", "4xx", "5xx"];
const KEYS: &[&str] = &["ready", "processing", "retry", "dead"];

/// The worker's metrics. Everything about messages carries a `queue` label (the queue's name);
/// methods take the queue's index in the worker's list.
pub struct Metrics {
    registry: Registry,
    queues: Vec<String>,
    /// The per-message series of each queue, looked up once.
    per_queue: Vec<QueueSeries>,
    processed: IntCounterVec,
    delivered: IntCounterVec,
    failed: IntCounterVec,
    retried: IntCounterVec,
    active_workers: IntGaugeVec,
    processing: IntGauge,
    queue_depth: IntGaugeVec,
    responses: IntCounterVec,
    invalid: IntCounterVec,
    dead_letters: IntCounterVec,
    status_updates: IntCounterVec,
    redis_up: IntGauge,
    reaped: IntCounter,
    strays: IntCounter,
    cert_expiry: Gauge,
    circuit_state: IntGauge,
    released: IntCounterVec,
    concurrency_limit: IntGauge,
    resent: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("metric names are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

/// One queue's series that every message touches.
struct QueueSeries {
    processed: IntCounter,
    delivered: IntCounter,
    retried: IntCounter,
    delivery_duration: Histogram,
    queue_wait: Histogram,
    responses_2xx: IntCounter,
}

/// A counter with one label, every value pre-created so it exports 0 before the first event.
fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str, values: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), &[label]).expect("metric names are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    for value in values {
        metric.with_label_values(&[value]);
    }
    metric
}

/// A counter with a `queue` label and optionally a second one, every combination pre-created.
fn queue_counter(
    registry: &Registry,
    name: &str,
    help: &str,
    queues: &[String],
    label: Option<(&str, &[&str])>,
) -> IntCounterVec {
    let labels: Vec<&str> = std::iter::once("queue").chain(label.map(|(l, _)| l)).collect();
    let metric = IntCounterVec::new(Opts::new(name, help), &labels).expect("metric names are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    for queue in queues {
        match label {
            Some((_, values)) => values.iter().for_each(|v| {
                metric.with_label_values(&[queue.as_str(), v]);
            }),
            None => {
                metric.with_label_values(&[queue.as_str()]);
            }
        }
    }
    metric
}

fn queue_histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> HistogramVec {
    let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &["queue"])
        .expect("metric names are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("metric names are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

impl Metrics {
    /// The metrics of a worker taking messages from `queues`.
    pub fn new(worker_id: &str, queues: &[String]) -> Metrics {
        let labels = HashMap::from([("worker_id".to_string(), worker_id.to_string())]);
        let registry = Registry::new_custom(None, Some(labels)).expect("the worker_id label is valid");
        let r = &registry;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "worker_queue_depth",
                "Messages in each Redis key of a queue (processing: this worker's)",
            ),
            &["queue", "key"],
        )
        .expect("metric names are valid");
        registry
            .register(Box::new(queue_depth.clone()))
            .expect("each metric is registered once");
        let active_workers = IntGaugeVec::new(
            Opts::new(
                "worker_active_workers",
                "Number of active workers (live heartbeats on the queue)",
            ),
            &["queue"],
        )
        .expect("metric names are valid");
        registry
            .register(Box::new(active_workers.clone()))
            .expect("each metric is registered once");
        for queue in queues {
            active_workers.with_label_values(&[queue.as_str()]);
            for key in KEYS {
                queue_depth.with_label_values(&[queue.as_str(), key]);
            }
        }
        let cert_expiry = Gauge::new(
            "worker_client_cert_expiry_timestamp_seconds",
            "When the client certificate in use expires, in seconds since the epoch",
        )
        .expect("metric names are valid");
        registry
            .register(Box::new(cert_expiry.clone()))
            .expect("each metric is registered once");
        let processed = queue_counter(
            r,
            "worker_messages_processed_total",
            "Total messages processed (taken off the queue and settled)",
            queues,
            None,
        );
        let delivered = queue_counter(
            r,
            "worker_messages_delivered_total",
            "Total messages delivered successfully",
            queues,
            None,
        );
        let retried = queue_counter(
            r,
            "worker_messages_retried_total",
            "Total retries scheduled",
            queues,
            None,
        );
        let delivery_duration = queue_histogram(
            r,
            "worker_delivery_duration_seconds",
            "Message delivery time (one POST to the main server)",
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        );
        let queue_wait = queue_histogram(
            r,
            "worker_queue_wait_seconds",
            "Time in queue before processing (queued_at to first claim)",
            &[
                0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            ],
        );
        let responses = queue_counter(
            r,
            "worker_responses_total",
            "Main-server responses to deliveries, by status class",
            queues,
            Some(("class", STATUS_CLASSES)),
        );
        let per_queue = queues
            .iter()
            .map(|q| QueueSeries {
                processed: processed.with_label_values(&[q.as_str()]),
                delivered: delivered.with_label_values(&[q.as_str()]),
                retried: retried.with_label_values(&[q.as_str()]),
                delivery_duration: delivery_duration.with_label_values(&[q.as_str()]),
                queue_wait: queue_wait.with_label_values(&[q.as_str()]),
                responses_2xx: responses.with_label_values(&[q.as_str(), "2xx"]),
            })
            .collect();
        Metrics {
            queues: queues.to_vec(),
            per_queue,
            processed,
            delivered,
            failed: queue_counter(
                r,
                "worker_messages_failed_total",
                "Total failed delivery attempts, by reason",
                queues,
                Some(("reason", FAILURE_REASONS)),
            ),
            retried,
            active_workers,
            processing: gauge(r, "worker_processing_messages", "Currently processing messages"),
            queue_depth,
            responses,
            invalid: queue_counter(
                r,
                "worker_invalid_messages_total",
                "Queue items that were not valid messages, by reason",
                queues,
                Some(("reason", INVALID_REASONS)),
            ),
            dead_letters: queue_counter(
                r,
                "worker_dead_letters_total",
                "Messages moved to the dead-letter list, by reason",
                queues,
                Some(("reason", DEAD_REASONS)),
            ),
            status_updates: counter_vec(
                r,
                "worker_status_updates_total",
                "Status updates sent to the main server, by result",
                "result",
                &["ok", "failed", "dropped"],
            ),
            redis_up: gauge(r, "worker_redis_up", "1 while Redis answers, 0 while it is unreachable"),
            reaped: counter(
                r,
                "worker_reaped_messages_total",
                "Messages returned to the queue from dead workers' processing lists",
            ),
            strays: counter(
                r,
                "worker_strays_returned_total",
                "Messages found in this worker's own processing list that none of its tasks held \
                 (a lost claim reply, an ack a failover lost), returned to the queue",
            ),
            cert_expiry,
            circuit_state: gauge(
                r,
                "worker_circuit_state",
                "The circuit breaker on the main server: 0 closed, 1 half-open (probing), 2 open \
                 (not claiming)",
            ),
            concurrency_limit: gauge(
                r,
                "worker_concurrency_limit",
                "Deliveries allowed under way at once by adaptive concurrency \
                 (WORKER_ADAPTIVE_CONCURRENCY)",
            ),
            released: queue_counter(
                r,
                "worker_released_messages_total",
                "Messages returned to their queue without using an attempt: the main server failed \
                 while the circuit was open",
                queues,
                None,
            ),
            resent: counter_vec(
                r,
                "worker_requests_resent_total",
                "Requests to the main server sent once more on a new connection without counting \
                 as an attempt, by reason: the server provably never processed them (close_race, \
                 goaway, refused_stream) or answered 421 (misdirected)",
                "reason",
                &Resend::ALL.map(Resend::label),
            ),
            registry,
        }
    }

    /// A request the delivery client sent once more (`delivery::Resend`).
    pub fn resent(&self, reason: Resend) {
        self.resent.with_label_values(&[reason.label()]).inc();
    }

    pub fn set_circuit(&self, state: crate::breaker::State) {
        self.circuit_state.set(state.gauge());
    }

    pub fn set_concurrency_limit(&self, limit: usize) {
        self.concurrency_limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    pub fn released(&self, q: usize) {
        self.released.with_label_values(&[self.queue_name(q)]).inc();
    }

    /// The series of queue `q`; an index past the list (never handed out) counts on the first.
    fn series(&self, q: usize) -> Option<&QueueSeries> {
        self.per_queue.get(q).or_else(|| self.per_queue.first())
    }

    fn queue_name(&self, q: usize) -> &str {
        self.queues
            .get(q)
            .or_else(|| self.queues.first())
            .map_or("", String::as_str)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8192);
        // Encoding into a Vec cannot fail for registered, valid metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    pub fn delivered(&self, q: usize, elapsed: Duration) {
        if let Some(series) = self.series(q) {
            series.delivered.inc();
            series.processed.inc();
            series.delivery_duration.observe(elapsed.as_secs_f64());
            series.responses_2xx.inc();
        }
    }

    /// A failed attempt: `class` is the HTTP status class when the server answered.
    pub fn failed(&self, q: usize, reason: &str, class: Option<&str>, elapsed: Duration) {
        let queue = self.queue_name(q);
        self.failed.with_label_values(&[queue, reason]).inc();
        if let Some(series) = self.series(q) {
            series.delivery_duration.observe(elapsed.as_secs_f64());
        }
        if let Some(class) = class {
            self.responses.with_label_values(&[queue, class]).inc();
        }
    }

    pub fn retried(&self, q: usize) {
        if let Some(series) = self.series(q) {
            series.retried.inc();
            series.processed.inc();
        }
    }

    pub fn dead(&self, q: usize, reason: &str) {
        self.dead_letters.with_label_values(&[self.queue_name(q), reason]).inc();
        if let Some(series) = self.series(q) {
            series.processed.inc();
        }
    }

    pub fn invalid(&self, q: usize, reason: &str) {
        self.invalid.with_label_values(&[self.queue_name(q), reason]).inc();
    }

    pub fn queue_wait(&self, q: usize, waited: Duration) {
        if let Some(series) = self.series(q) {
            series.queue_wait.observe(waited.as_secs_f64());
        }
    }

    /// Counts a message as in flight until the guard is dropped.
    pub fn processing(&self) -> ProcessingGuard {
        self.processing.inc();
        ProcessingGuard(self.processing.clone())
    }

    pub fn status_update(&self, result: &str) {
        self.status_updates.with_label_values(&[result]).inc();
    }

    pub fn set_depths(&self, q: usize, depths: Depths) {
        let queue = self.queue_name(q);
        let Depths {
            ready,
            processing,
            retry,
            dead,
        } = depths;
        for (key, value) in [
            ("ready", ready),
            ("processing", processing),
            ("retry", retry),
            ("dead", dead),
        ] {
            self.queue_depth
                .with_label_values(&[queue, key])
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    pub fn set_active_workers(&self, q: usize, n: usize) {
        self.active_workers
            .with_label_values(&[self.queue_name(q)])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.set(i64::from(up));
    }

    pub fn reaped(&self, n: usize) {
        self.reaped.inc_by(n as u64);
    }

    /// Strays the sweep returned to the queue.
    pub fn strays_returned(&self, n: usize) {
        self.strays.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub fn set_cert_expiry(&self, at: std::time::SystemTime) {
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.cert_expiry.set(secs);
    }

    /// Counter totals for `/stats`.
    pub fn totals(&self) -> serde_json::Value {
        let sum = |vec: &IntCounterVec, values: &[&str]| -> u64 {
            let queues = self.queues.iter();
            queues
                .flat_map(|q| {
                    values
                        .iter()
                        .map(move |v| vec.with_label_values(&[q.as_str(), v]).get())
                })
                .sum()
        };
        let total = |vec: &IntCounterVec| -> u64 {
            self.queues
                .iter()
                .map(|q| vec.with_label_values(&[q.as_str()]).get())
                .sum()
        };
        serde_json::json!({
            "processed": total(&self.processed),
            "delivered": total(&self.delivered),
            "failed_attempts": sum(&self.failed, FAILURE_REASONS),
            "retried": total(&self.retried),
            "dead_lettered": sum(&self.dead_letters, DEAD_REASONS),
            "invalid": sum(&self.invalid, INVALID_REASONS),
            "processing": self.processing.get(),
        })
    }
}

/// Decrements `worker_processing_messages` when dropped.
pub struct ProcessingGuard(IntGauge);

impl Drop for ProcessingGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
