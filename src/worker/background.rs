//! What runs beside the deliveries, started and stopped together: the heartbeat, the
//! sweeper, a promoter per queue, the TLS watchers, the Sentinel listener, the systemd
//! watchdog and the status reporter.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::heartbeat::heartbeat;
use super::promote::{promote, Promotion};
use super::reload::{reload_redis_tls, watch_tls, Reloads, TlsWatch};
use super::shared::Shared;
use super::status::{report_statuses, Statuses};
use crate::config::WorkerSettings;
use crate::delivery::Deliverer;

/// The background tasks of a running worker.
pub(super) struct Background {
    tasks: TaskTracker,
    statuses: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Background {
    /// Starts every background task. `shutdown` is cancelled by the heartbeat when another
    /// process takes this worker's id; `stop` ends the tasks.
    pub(super) fn start(
        shared: &Arc<Shared>,
        deliverer: &Arc<Deliverer>,
        statuses: Statuses,
        worker: &WorkerSettings,
        reloads: Reloads,
        shutdown: &CancellationToken,
        stop: CancellationToken,
    ) -> Background {
        let Reloads {
            tls,
            redis: reload_redis,
        } = reloads;
        let tasks = TaskTracker::new();
        tasks.spawn(
            heartbeat(
                shared.clone(),
                deliverer.clone(),
                worker.heartbeat_interval,
                worker.dead_after,
                shutdown.clone(),
                stop.clone(),
            )
            .instrument(tracing::info_span!("heartbeat")),
        );
        tasks.spawn(super::sweep::sweeper(shared.clone(), stop.clone()).instrument(tracing::info_span!("sweep")));
        for (q, _) in shared.queues() {
            tasks.spawn(
                promote(
                    shared.clone(),
                    q,
                    Promotion {
                        retry_interval: worker.retry_interval,
                        batch_size: worker.batch_size,
                    },
                    stop.clone(),
                )
                .instrument(tracing::info_span!("promoter")),
            );
        }
        if shared.connector.tls() {
            tasks.spawn(
                reload_redis_tls(shared.connector.clone(), reload_redis, stop.clone())
                    .instrument(tracing::info_span!("redis-tls")),
            );
        }
        if shared.connector.master_changes().is_some() {
            let connector = shared.connector.clone();
            let stop = stop.clone();
            tasks.spawn(
                async move { connector.listen_for_switches(stop).await }.instrument(tracing::info_span!("sentinel")),
            );
        }
        if let Some(TlsWatch {
            settings,
            current,
            reload,
        }) = tls
        {
            tasks.spawn(
                watch_tls(
                    deliverer.clone(),
                    shared.metrics.clone(),
                    settings,
                    current,
                    reload,
                    stop.clone(),
                )
                .instrument(tracing::info_span!("tls")),
            );
        }
        if let Some(every) = crate::service::watchdog_interval() {
            tasks.spawn(watchdog(every, stop.clone()));
        }
        let statuses = tokio::spawn(
            report_statuses(deliverer.clone(), shared.metrics.clone(), statuses, worker.concurrency)
                .instrument(tracing::info_span!("status")),
        );
        Background { tasks, statuses, stop }
    }

    /// Stops the heartbeat, promoter, TLS watcher and watchdog, and waits for them.
    pub(super) async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Gives the status updates still queued a moment (never the whole grace again); they
    /// end once every sender (the settler) is gone.
    pub(super) async fn flush_statuses(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.statuses).await;
    }
}

/// Pings the systemd watchdog at half its interval.
async fn watchdog(every: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(every / 2);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => crate::service::watchdog_ping(),
        }
    }
}
