//! The admin HTTP port (WORKER_METRICS_PORT): `/metrics` (Prometheus text), `/health`
//! (liveness), `/ready` (503 while Redis is unreachable, before the first connection and while
//! draining) and `/stats` (queue depths, counters, live workers, as JSON).

pub(crate) mod dlq;

use std::convert::Infallible;
use std::net::SocketAddr;
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
use tracing::{info, warn, Instrument};

use crate::health::{Health, QueueStats};
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::telemetry::Summary;

/// What the admin handlers read.
pub struct AdminState {
    pub worker_id: String,
    /// The worker's queues, in its order.
    pub queue_names: Vec<String>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// The worker's queues once it has joined them, for the `/dlq` API.
    pub queues: Arc<OnceLock<Vec<Queue>>>,
    /// ADMIN_TOKEN: the `/dlq` API and the `/ui` page are served only with it, and only to
    /// requests that carry it (`dlq`).
    pub admin_token: Option<crate::config::Secret>,
}

impl AdminState {
    pub fn new(worker_id: String, queue_names: Vec<String>, metrics: Arc<Metrics>, health: Arc<Health>) -> AdminState {
        AdminState {
            worker_id,
            queue_names,
            metrics,
            health,
            queues: Arc::default(),
            admin_token: None,
        }
    }

    /// Turns on the `/dlq` API and `/ui` page for requests carrying `token`.
    pub fn with_admin_token(mut self, token: Option<crate::config::Secret>) -> AdminState {
        self.admin_token = token;
        self
    }

    /// Acts on `queues` (the worker's, once joined) for the `/dlq` API.
    pub fn with_queues(mut self, queues: Arc<OnceLock<Vec<Queue>>>) -> AdminState {
        self.queues = queues;
        self
    }
}

/// How old the Redis figures in `/stats` may be: a flood of requests has the heartbeat read
/// Redis at most once in this long.
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

/// The admin port could not be opened.
#[derive(Debug)]
pub struct PortError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// What the admin port serves of a worker: its counts, its health, its queues once joined (for
/// the `/dlq` API), and when it has stopped.
pub struct Served {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub queues: Arc<OnceLock<Vec<Queue>>>,
    pub stop: CancellationToken,
}

impl Served {
    /// All of that from a running worker, which itself knows nothing of the admin port.
    pub fn of(worker: &crate::worker::Worker) -> Served {
        Served {
            metrics: worker.metrics(),
            health: worker.health(),
            queues: worker.queues(),
            stop: worker.stopped(),
        }
    }
}

/// Opens the admin port when `settings.metrics.enabled` and serves a worker on it until
/// `served.stop`; returns where it listens.
pub async fn open(settings: &crate::config::Settings, served: Served) -> Result<Option<SocketAddr>, PortError> {
    let Served {
        metrics,
        health,
        queues,
        stop,
    } = served;
    if !settings.metrics.enabled {
        return Ok(None);
    }
    let addr = SocketAddr::new(settings.metrics.bind, settings.metrics.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| PortError { addr, source })?;
    let addr = listener.local_addr().map_err(|source| PortError { addr, source })?;
    info!(address = %addr, "Prometheus metrics server started on port {}", addr.port());
    let state = AdminState::new(
        settings.worker.id.clone(),
        settings.redis.queues.clone(),
        metrics,
        health,
    )
    .with_admin_token(settings.metrics.admin_token.clone())
    .with_queues(queues);
    tokio::spawn(serve(listener, Arc::new(state), Limits::default(), stop).instrument(tracing::info_span!("admin")));
    Ok(Some(addr))
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
                warn!(
                    count,
                    limit = limits.max_connections,
                    peer = %peer,
                    "Admin port is at its connection limit; closed new connections at once"
                );
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
        let mut response = dlq::route(state, request).await;
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
                "uptime_seconds": state.health.uptime().as_secs(),
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
        "circuit": state.health.circuit().as_str(),
        "uptime_seconds": state.health.uptime().as_secs(),
        "counters": state.metrics.totals(),
    });
    let Some(QueueStats { read, .. }) = state.health.queue_stats(STATS_MAX_AGE, Duration::from_secs(2)).await else {
        stats["error"] = "not connected to Redis yet".into();
        return stats;
    };
    if let (Some(stats), serde_json::Value::Object(from_redis)) = (stats.as_object_mut(), redis_stats(read)) {
        stats.extend(from_redis);
    }
    stats
}

/// The part of `/stats` the heartbeat read from Redis: for each queue its depths and live
/// workers (the first queue's also at the top level, as before several queues), or the error.
fn redis_stats(read: Result<Vec<crate::health::QueueStat>, String>) -> serde_json::Value {
    match read {
        Ok(queues) => {
            let each: Vec<serde_json::Value> = queues
                .into_iter()
                .map(|queue| {
                    let workers: Vec<serde_json::Value> = queue
                        .workers
                        .into_iter()
                        .map(|w| serde_json::json!({"worker_id": w.id, "heartbeat_age_seconds": w.age.as_secs_f64()}))
                        .collect();
                    serde_json::json!({"queue": queue.queue, "depths": queue.depths, "workers": workers})
                })
                .collect();
            let first = each.first().cloned().unwrap_or_default();
            serde_json::json!({
                "depths": first.get("depths"),
                "workers": first.get("workers"),
                "queues_detail": each,
            })
        }
        Err(e) => serde_json::json!({"error": e}),
    }
}

/// Headers every answer of the `/dlq` API and the `/ui` page carries: only same-origin
/// scripts, styles and requests; no framing; no guessing content types.
fn secure_headers(response: &mut Response<Full<Bytes>>) {
    use hyper::header;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
             form-action 'none'",
        ),
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
