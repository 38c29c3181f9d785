//! The admin HTTP port (WORKER_METRICS_PORT): `/metrics` (Prometheus text), `/health`
//! (liveness), `/ready` (503 while Redis is unreachable, before the first connection and while
//! draining) and `/stats` (queue depths, counters, live workers, as JSON).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::queue::{Queue, QueueError};
use crate::telemetry::Summary;

/// What the worker tells the outside about itself.
pub struct Health {
    redis_up: AtomicBool,
    /// When the current outage was noticed, in ns since `started`.
    down_at: AtomicU64,
    connected_once: AtomicBool,
    draining: AtomicBool,
    /// The circuit breaker's state (`breaker::State::gauge`).
    circuit: std::sync::atomic::AtomicI64,
    started: Instant,
    metrics: Arc<Metrics>,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Health {
        metrics.set_redis_up(false);
        Health {
            redis_up: AtomicBool::new(false),
            down_at: AtomicU64::new(0),
            connected_once: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            circuit: std::sync::atomic::AtomicI64::new(0),
            started: Instant::now(),
            metrics,
        }
    }

    /// The circuit breaker moved to `state`.
    pub fn set_circuit(&self, state: crate::breaker::State) {
        self.circuit.store(state.gauge(), Ordering::Release);
        self.metrics.set_circuit(state);
    }

    /// The circuit breaker's state: closed, half_open or open.
    pub fn circuit(&self) -> &'static str {
        match self.circuit.load(Ordering::Acquire) {
            0 => "closed",
            1 => "half_open",
            _ => "open",
        }
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
            error!(error = %error, "Redis is unreachable; holding results and retrying with backoff");
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

    /// Why the worker is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.draining() {
            Some("draining")
        } else if !self.connected_once.load(Ordering::Acquire) {
            Some("connecting to Redis")
        } else if !self.redis_up() {
            Some("Redis unreachable")
        } else if self.circuit.load(Ordering::Acquire) == 2 {
            Some("main server failing (circuit open)")
        } else {
            None
        }
    }
}

/// What the admin handlers read.
pub struct AdminState {
    pub worker_id: String,
    /// The worker's queues, in its order.
    pub queue_names: Vec<String>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Set once Redis is first connected.
    pub queues: OnceLock<Vec<Queue>>,
    /// The Redis part of `/stats` and when it was read: a flood of requests reads Redis at
    /// most once per `STATS_MAX_AGE`, and concurrent requests wait for the one read.
    pub stats_cache: tokio::sync::Mutex<Option<(Instant, serde_json::Value)>>,
    /// ADMIN_TOKEN: the `/dlq` API and the `/ui` page are served only with it, and only to
    /// requests that carry it (`crate::admin_dlq`).
    pub admin_token: Option<crate::config::Secret>,
}

impl AdminState {
    pub fn new(worker_id: String, queue_names: Vec<String>, metrics: Arc<Metrics>, health: Arc<Health>) -> AdminState {
        AdminState {
            worker_id,
            queue_names,
            metrics,
            health,
            queues: OnceLock::new(),
            stats_cache: tokio::sync::Mutex::new(None),
            admin_token: None,
        }
    }

    /// Turns on the `/dlq` API and `/ui` page for requests carrying `token`.
    pub fn with_admin_token(mut self, token: Option<crate::config::Secret>) -> AdminState {
        self.admin_token = token;
        self
    }
}

/// How old the Redis figures in `/stats` may be.
const STATS_MAX_AGE: Duration = Duration::from_secs(1);

/// What one client may hold of the admin port.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// How long a client has to send a request's headers. hyper runs the same timer while a
    /// keep-alive connection waits for its next request, so this is the idle timeout too.
    pub header_timeout: Duration,
    /// The longest a connection lives, however busy: a client that trickles a body or never
    /// reads its answer is cut off here.
    pub max_lifetime: Duration,
    /// At most one log line per this interval about failed accepts, with their count.
    pub accept_error_interval: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            max_lifetime: Duration::from_secs(60),
            accept_error_interval: Duration::from_secs(10),
        }
    }
}

/// Serves until `stop` is cancelled, within `limits`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, limits: Limits, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut accept_errors = Summary::new(limits.accept_error_interval);
    let mut refused = Summary::new(limits.accept_error_interval);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    if let Some(count) = accept_errors.record(Instant::now()) {
                        warn!(error = %e, count, "Admin port could not accept connections");
                    }
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            if let Some(count) = refused.record(Instant::now()) {
                warn!(count, limit = limits.max_connections, peer = %peer, "Admin port is at its connection limit; closed new connections at once");
            }
            continue;
        };
        let state = state.clone();
        let stop = stop.clone();
        let connection = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, request).await) }
            }),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = tokio::time::sleep(limits.max_lifetime) => {}
                _ = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}

async fn route(state: &AdminState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path == "/ui" || path.starts_with("/ui/") || path == "/dlq" || path.starts_with("/dlq/") {
        let mut response = crate::admin_dlq::route(state, request).await;
        secure_headers(&mut response);
        return response;
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, state.metrics.render());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/health" => json(
            StatusCode::OK,
            serde_json::json!({
                "status": "ok",
                "worker_id": state.worker_id,
                "uptime_seconds": state.health.started.elapsed().as_secs(),
            }),
        ),
        "/ready" => match state.health.not_ready_reason() {
            None => json(
                StatusCode::OK,
                serde_json::json!({"ready": true, "worker_id": state.worker_id}),
            ),
            Some(reason) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"ready": false, "reason": reason, "worker_id": state.worker_id}),
            ),
        },
        "/stats" => json(StatusCode::OK, stats(state).await),
        "/" => text(
            StatusCode::OK,
            "courier: /metrics /health /ready /stats (and with ADMIN_TOKEN: /ui /dlq /dlq/stats)\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /health, /ready or /stats\n",
        ),
    }
}

async fn stats(state: &AdminState) -> serde_json::Value {
    let mut stats = serde_json::json!({
        "worker_id": state.worker_id,
        "queue_name": state.queue_names.first(),
        "queues": state.queue_names,
        "ready": state.health.not_ready_reason().is_none(),
        "draining": state.health.draining(),
        "redis_up": state.health.redis_up(),
        "circuit": state.health.circuit(),
        "uptime_seconds": state.health.started.elapsed().as_secs(),
        "counters": state.metrics.totals(),
    });
    let Some(queues) = state.queues.get() else {
        stats["error"] = "not connected to Redis yet".into();
        return stats;
    };
    let mut cache = state.stats_cache.lock().await;
    let fresh = cache.as_ref().filter(|(at, _)| at.elapsed() < STATS_MAX_AGE);
    let from_redis = match fresh {
        Some((_, value)) => value.clone(),
        None => {
            let value = redis_stats(queues).await;
            *cache = Some((Instant::now(), value.clone()));
            value
        }
    };
    drop(cache);
    if let (Some(stats), serde_json::Value::Object(from_redis)) = (stats.as_object_mut(), from_redis) {
        stats.extend(from_redis);
    }
    stats
}

/// The part of `/stats` read from Redis: for each queue its depths and live workers (the
/// first queue's also at the top level, as before several queues), or the error.
async fn redis_stats(queues: &[Queue]) -> serde_json::Value {
    let lookup = async {
        let mut each = Vec::with_capacity(queues.len());
        for queue in queues {
            let workers: Vec<serde_json::Value> = queue
                .workers()
                .await?
                .into_iter()
                .map(|w| serde_json::json!({"worker_id": w.id, "heartbeat_age_seconds": w.age.as_secs_f64()}))
                .collect();
            each.push(serde_json::json!({
                "queue": queue.name(),
                "depths": queue.depths().await?,
                "workers": workers,
            }));
        }
        Ok::<_, QueueError>(each)
    };
    match tokio::time::timeout(Duration::from_secs(2), lookup).await {
        Ok(Ok(each)) => {
            let first = each.first().cloned().unwrap_or_default();
            serde_json::json!({
                "depths": first.get("depths"),
                "workers": first.get("workers"),
                "queues_detail": each,
            })
        }
        Ok(Err(e)) => serde_json::json!({"error": format!("Redis: {e}")}),
        Err(_) => serde_json::json!({"error": "Redis did not answer within 2 s"}),
    }
}

/// Headers every answer of the `/dlq` API and the `/ui` page carries: only same-origin
/// scripts, styles and requests; no framing; no guessing content types.
fn secure_headers(response: &mut Response<Full<Bytes>>) {
    use hyper::header;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

pub(crate) fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = text(status, value.to_string());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
