//! Every metric courier exports, declared once with its help text. The Python worker's names come first;
//! every series carries a `worker_id` label. Code records events through the small methods here.

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

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
];
const INVALID_REASONS: &[&str] = &[
    "invalid_json",
    "invalid_message_id",
    "invalid_attempt_count",
    "too_large",
];
const STATUS_CLASSES: &[&str] = &["1xx", "2xx", "3xx", "4xx", "5xx"];
const QUEUES: &[&str] = &["ready", "processing", "retry", "dead"];

/// The worker's metrics.
pub struct Metrics {
    registry: Registry,
    processed: IntCounter,
    delivered: IntCounter,
    failed: IntCounterVec,
    retried: IntCounter,
    delivery_duration: Histogram,
    queue_wait: Histogram,
    active_workers: IntGauge,
    processing: IntGauge,
    queue_depth: IntGaugeVec,
    responses: IntCounterVec,
    invalid: IntCounterVec,
    dead_letters: IntCounterVec,
    status_updates: IntCounterVec,
    redis_up: IntGauge,
    reaped: IntCounter,
    cert_expiry: Gauge,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("metric names are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
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

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("metric names are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let metric =
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("metric names are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

impl Metrics {
    pub fn new(worker_id: &str) -> Metrics {
        let labels = HashMap::from([("worker_id".to_string(), worker_id.to_string())]);
        let registry = Registry::new_custom(None, Some(labels)).expect("the worker_id label is valid");
        let r = &registry;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "worker_queue_depth",
                "Messages in each Redis key of the queue (processing: this worker's)",
            ),
            &["queue"],
        )
        .expect("metric names are valid");
        registry
            .register(Box::new(queue_depth.clone()))
            .expect("each metric is registered once");
        for queue in QUEUES {
            queue_depth.with_label_values(&[queue]);
        }
        let cert_expiry = Gauge::new(
            "worker_client_cert_expiry_timestamp_seconds",
            "When the client certificate in use expires, in seconds since the epoch",
        )
        .expect("metric names are valid");
        registry
            .register(Box::new(cert_expiry.clone()))
            .expect("each metric is registered once");
        Metrics {
            processed: counter(
                r,
                "worker_messages_processed_total",
                "Total messages processed (taken off the queue and settled)",
            ),
            delivered: counter(
                r,
                "worker_messages_delivered_total",
                "Total messages delivered successfully",
            ),
            failed: counter_vec(
                r,
                "worker_messages_failed_total",
                "Total failed delivery attempts, by reason",
                "reason",
                FAILURE_REASONS,
            ),
            retried: counter(r, "worker_messages_retried_total", "Total retries scheduled"),
            delivery_duration: histogram(
                r,
                "worker_delivery_duration_seconds",
                "Message delivery time (one POST to the main server)",
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            ),
            queue_wait: histogram(
                r,
                "worker_queue_wait_seconds",
                "Time in queue before processing (queued_at to first claim)",
                &[
                    0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                ],
            ),
            active_workers: gauge(
                r,
                "worker_active_workers",
                "Number of active workers (live heartbeats on this queue)",
            ),
            processing: gauge(r, "worker_processing_messages", "Currently processing messages"),
            queue_depth,
            responses: counter_vec(
                r,
                "worker_responses_total",
                "Main-server responses to deliveries, by status class",
                "class",
                STATUS_CLASSES,
            ),
            invalid: counter_vec(
                r,
                "worker_invalid_messages_total",
                "Queue items that were not valid messages, by reason",
                "reason",
                INVALID_REASONS,
            ),
            dead_letters: counter_vec(
                r,
                "worker_dead_letters_total",
                "Messages moved to the dead-letter list, by reason",
                "reason",
                DEAD_REASONS,
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
            cert_expiry,
            registry,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8192);
        // Encoding into a Vec cannot fail for registered, valid metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    pub fn delivered(&self, elapsed: Duration) {
        self.delivered.inc();
        self.processed.inc();
        self.delivery_duration.observe(elapsed.as_secs_f64());
        self.responses.with_label_values(&["2xx"]).inc();
    }

    /// A failed attempt: `class` is the HTTP status class when the server answered.
    pub fn failed(&self, reason: &str, class: Option<&str>, elapsed: Duration) {
        self.failed.with_label_values(&[reason]).inc();
        self.delivery_duration.observe(elapsed.as_secs_f64());
        if let Some(class) = class {
            self.responses.with_label_values(&[class]).inc();
        }
    }

    pub fn retried(&self) {
        self.retried.inc();
        self.processed.inc();
    }

    pub fn dead(&self, reason: &str) {
        self.dead_letters.with_label_values(&[reason]).inc();
        self.processed.inc();
    }

    pub fn invalid(&self, reason: &str) {
        self.invalid.with_label_values(&[reason]).inc();
    }

    pub fn queue_wait(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// Counts a message as in flight until the guard is dropped.
    pub fn processing(&self) -> ProcessingGuard {
        self.processing.inc();
        ProcessingGuard(self.processing.clone())
    }

    pub fn status_update(&self, result: &str) {
        self.status_updates.with_label_values(&[result]).inc();
    }

    pub fn set_depths(&self, depths: Depths) {
        let Depths {
            ready,
            processing,
            retry,
            dead,
        } = depths;
        for (queue, value) in [
            ("ready", ready),
            ("processing", processing),
            ("retry", retry),
            ("dead", dead),
        ] {
            self.queue_depth
                .with_label_values(&[queue])
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    pub fn set_active_workers(&self, n: usize) {
        self.active_workers.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.set(i64::from(up));
    }

    pub fn reaped(&self, n: usize) {
        self.reaped.inc_by(n as u64);
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
            values.iter().map(|v| vec.with_label_values(&[v]).get()).sum()
        };
        serde_json::json!({
            "processed": self.processed.get(),
            "delivered": self.delivered.get(),
            "failed_attempts": sum(&self.failed, FAILURE_REASONS),
            "retried": self.retried.get(),
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
