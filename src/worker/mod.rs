//! The worker: the life of one worker process, from joining the queue to leaving it.
//!
//! `startup` connects, takes the worker id and recovers leftovers. Then each role holds only
//! what it uses, beside the `Shared` state (id, queues, metrics, health, log summaries):
//!
//! - the `Claimer` (`claim`) takes messages while delivery slots are free (`flow` says how
//!   many) and hands them to `pool`'s delivery tasks;
//! - a delivery task runs `process` for each message: parse, ask the main server, let `flow`
//!   and `policy` decide, and have the `Settler` (`settle`) carry it out in Redis, the
//!   metrics and the log, and hand the status update to `status`;
//! - beside them (`background`): the `heartbeat` (with reaping by `liveness`), a `promote`r
//!   of due retries per queue, the `sweep`er of strays, the TLS watchers (`reload`) and the
//!   `status` reporter;
//! - `drain` finishes in-flight work on shutdown; `retry` is the one way a Redis operation
//!   is retried.

mod background;
mod claim;
mod drain;
mod flow;
mod heartbeat;
mod liveness;
mod pool;
mod process;
mod promote;
mod reload;
mod retry;
mod settle;
mod shared;
mod startup;
mod status;
mod sweep;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use self::background::Background;
use self::claim::Claimer;
use self::flow::Flow;
use self::process::Delivery;
use self::reload::{forward_hangups, Reloads, TlsWatch};
use self::settle::Settler;
use self::shared::Shared;
use self::status::Statuses;
use crate::config::Settings;
use crate::delivery::Deliverer;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::policy::{self, Outcomes, Policy};
use crate::queue::{self, Queue};
use crate::tls::ClientTls;

/// Why the worker could not start or run. Each variant keeps its cause as `source()`; the
/// command line renders the chain as one line.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("main_server: the HTTP client cannot be built")]
    MainServer(#[source] crate::delivery::DeliveryError),
    /// The admin port (`admin::open`) could not listen.
    #[error(
        "metrics.port (WORKER_METRICS_PORT) = {}: pick a free port or set \
         WORKER_METRICS_ENABLED=false; cannot listen on {addr}",
        addr.port()
    )]
    AdminPort {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("redis: the connection settings are not usable")]
    RedisSettings(#[source] queue::QueueError),
    #[error(
        "redis.username and redis.password (REDIS_USERNAME, REDIS_PASSWORD, or the user in \
         REDIS_URL): Redis refused the credentials; set the right user and password"
    )]
    RedisAuth(#[source] queue::QueueError),
    #[error(
        "redis: server version {version} is too old; courier needs Redis 6.2 or newer \
         (LMOVE, BLMOVE)"
    )]
    RedisVersion { version: String },
    #[error(
        "redis.username (REDIS_USERNAME) = {user}: Redis's ACL denies this user {missing}; grant \
         them (README, \"The Redis courier runs on\", has the list for each topology)"
    )]
    RedisPermissions { user: String, missing: String },
    #[error(
        "worker.id (WORKER_ID) = {worker_id}: already in use by a live worker, {holder}; give each \
         process its own WORKER_ID"
    )]
    IdInUse { worker_id: String, holder: queue::Holder },
    /// Another process took this worker's id while it ran (exit 75); it stopped and drained.
    #[error("another process has taken worker id {worker_id}; give each process its own WORKER_ID")]
    IdTaken { worker_id: String },
    #[error("Redis failed")]
    Redis(#[source] queue::QueueError),
    #[error("the admin port failed")]
    Io(#[source] std::io::Error),
}

impl RunError {
    /// Only fixing the configuration helps (exit 78): restarting would fail the same way.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            RunError::MainServer(_)
                | RunError::AdminPort { .. }
                | RunError::RedisSettings(_)
                | RunError::RedisAuth(_)
                | RunError::RedisVersion { .. }
                | RunError::RedisPermissions { .. }
                | RunError::IdInUse { .. }
        )
    }
}

/// A started worker: `run` does the work; `admin::open` serves its health and metrics.
pub struct Worker {
    settings: Settings,
    tls: Option<ClientTls>,
    deliverer: Arc<Deliverer>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Its queues, once joined.
    joined: Arc<OnceLock<Vec<Queue>>>,
    /// Cancelled by the caller: stop claiming and drain.
    shutdown: CancellationToken,
    /// Cancelled by the worker itself once drained: stops the background tasks (and the admin
    /// port, given `stopped()`).
    background: CancellationToken,
    /// Notified on SIGHUP: read the TLS files again.
    reload: Arc<Notify>,
    /// Notified on SIGHUP when Redis is reached over TLS: read its TLS files again.
    reload_redis: Arc<Notify>,
}

impl Worker {
    /// Builds the HTTP client. Nothing touches Redis yet.
    pub async fn start(
        settings: Settings,
        tls: Option<ClientTls>,
        shutdown: CancellationToken,
    ) -> Result<Worker, RunError> {
        let worker_id = settings.worker.id.clone();
        let metrics = Arc::new(Metrics::new(&worker_id, &settings.redis.queues));
        if let Some(tls) = &tls {
            metrics.set_cert_expiry(tls.not_after);
        }
        let deliverer = Deliverer::new(
            &settings.main_server,
            tls.as_ref(),
            &worker_id,
            settings.worker.concurrency,
        )
        .map_err(RunError::MainServer)?
        .with_resend_hook({
            let metrics = metrics.clone();
            Arc::new(move |reason| metrics.resent(reason))
        });
        // SIGHUP is ours from here in every state (connecting, waiting for the id, running,
        // draining): a reload request is remembered until the TLS watcher takes it.
        let reload = Arc::new(Notify::new());
        let reload_redis = Arc::new(Notify::new());
        let background = CancellationToken::new();
        tokio::spawn(forward_hangups(
            tls.is_some().then(|| reload.clone()),
            settings.redis.tls.is_some().then(|| reload_redis.clone()),
            background.clone(),
        ));
        let health = Arc::new(Health::new(metrics.clone()));
        Ok(Worker {
            settings,
            tls,
            deliverer: Arc::new(deliverer),
            metrics,
            health,
            joined: Arc::default(),
            shutdown,
            background,
            reload,
            reload_redis,
        })
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What it counts, for `/metrics`.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// What it tells the outside, for `/ready` and `/stats`.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Cancelled once the worker has drained and left.
    pub fn stopped(&self) -> CancellationToken {
        self.background.clone()
    }

    /// Its queues, set once it has joined them (for the admin port's `/dlq` API).
    pub fn queues(&self) -> Arc<OnceLock<Vec<Queue>>> {
        self.joined.clone()
    }

    /// The life of a worker: join the queue, recover what this id left claimed, start the
    /// background tasks, claim and deliver until `shutdown` is cancelled, then drain and leave.
    pub async fn run(self) -> Result<(), RunError> {
        let Worker {
            settings,
            tls,
            deliverer,
            metrics,
            health,
            joined,
            shutdown,
            background,
            reload,
            reload_redis,
        } = self;
        let Settings {
            redis,
            worker,
            tls: tls_settings,
            ..
        } = settings;

        let Some(joined) = startup::join(&redis, &worker, &health, &joined, &shutdown).await? else {
            background.cancel();
            return Ok(());
        };
        let shared = Arc::new(Shared::new(worker.id.clone(), joined, metrics.clone(), health.clone()));
        let (status_tx, status_rx) = status::channel();
        let flow = Arc::new(Flow::new(&worker, health, metrics));
        let policy = Policy {
            max_attempts: worker.max_attempts,
            retry_interval: worker.retry_interval,
            max_retry_after: policy::MAX_RETRY_AFTER,
            backoff: worker.retry_backoff,
            jitter: worker.retry_jitter,
        };
        let delivery = Arc::new(Delivery {
            settler: Settler::new(shared.clone(), policy, status_tx),
            deliverer: deliverer.clone(),
            outcomes: Outcomes::from(&worker.outcomes),
            flow: flow.clone(),
            max_message_bytes: worker.max_message_bytes,
        });
        let reloads = Reloads {
            tls: tls.map(|current| TlsWatch {
                settings: tls_settings,
                current,
                reload,
            }),
            redis: reload_redis,
        };
        let statuses = Statuses {
            reports: status_rx,
            circuit: flow.subscribe(),
        };
        let tasks = Background::start(&shared, &deliverer, statuses, &worker, reloads, &shutdown, background);
        crate::service::ready(&format!("Delivering from {} as {}", redis.queue_list(), worker.id));

        let deliveries = TaskTracker::new();
        let claimer = Claimer {
            shared: shared.clone(),
            flow,
            order: redis.order,
            concurrency: worker.concurrency,
            batch_size: worker.batch_size,
            max_message_bytes: worker.max_message_bytes,
            max_reclaims: worker.max_reclaims,
        };
        claimer.claim(&delivery, &deliveries, &shutdown).await;
        drop(claimer);
        let id_taken = shared.id_taken();
        drain::drain(shared, delivery, deliveries, worker.shutdown_grace, tasks).await;
        info!("Worker {} stopped", worker.id);
        match id_taken {
            true => Err(RunError::IdTaken { worker_id: worker.id }),
            false => Ok(()),
        }
    }
}
