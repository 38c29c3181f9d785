//! Reloading TLS material: SIGHUP forwarded to the watchers, the main server's client
//! certificate watched for changes and expiry, Redis's TLS files reloaded on request.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::TlsSettings;
use crate::delivery::Deliverer;
use crate::metrics::Metrics;
use crate::queue::Connector;
use crate::telemetry::one_line;
use crate::tls::ClientTls;

/// Within this long of its expiry, the client certificate draws a daily warning.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// What SIGHUP reloads: the main server's TLS material (when TLS is on) and Redis's.
pub(super) struct Reloads {
    pub(super) tls: Option<TlsWatch>,
    pub(super) redis: Arc<Notify>,
}

/// The TLS material to watch, when TLS is on.
pub(super) struct TlsWatch {
    pub(super) settings: TlsSettings,
    pub(super) current: ClientTls,
    pub(super) reload: Arc<Notify>,
}

/// Turns each SIGHUP into a reload request for the TLS watchers (the main server's and
/// Redis's, those that are on), logging it, until `stop`.
pub(super) async fn forward_hangups(
    main_server: Option<Arc<Notify>>,
    redis: Option<Arc<Notify>>,
    stop: CancellationToken,
) {
    let mut hangups = crate::shutdown::ReloadRequests::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = hangups.recv() => {}
        }
        if main_server.is_none() && redis.is_none() {
            info!("SIGHUP received: TLS is disabled, so there is nothing to reload");
            continue;
        }
        info!("SIGHUP received: the TLS files will be read again");
        for reload in [&main_server, &redis].into_iter().flatten() {
            reload.notify_one();
        }
    }
}

/// Reloads the TLS files for Redis on SIGHUP: every connection moves to new ones made with
/// them. Files that do not load are refused with an error and the connections stay.
pub(super) async fn reload_redis_tls(connector: Connector, reload: Arc<Notify>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = reload.notified() => {}
        }
        match connector.reload_tls().await {
            Ok(()) => info!("Reloaded the TLS files for Redis; reconnected with them"),
            Err(e) => {
                error!(
                    error = %one_line(&e),
                    "Refused the new TLS files for Redis; still using the previous ones"
                )
            }
        }
    }
}

/// Reloads the TLS files on SIGHUP and when they change (checked every `reload_interval`).
/// A set that does not load is refused with an error and the current one stays in use;
/// deliveries under way finish on their connections. Warns daily when the certificate in use
/// is within 14 days of expiry.
pub(super) async fn watch_tls(
    deliverer: Arc<Deliverer>,
    metrics: Arc<Metrics>,
    settings: TlsSettings,
    current: ClientTls,
    reload: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut seen = current.snapshot.clone();
    let mut not_after = current.not_after;
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        let remaining = not_after.duration_since(SystemTime::now()).unwrap_or_default();
        if remaining < EXPIRY_WARNING && warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(86_400)) {
            warn!(
                expires = %crate::tls::rfc3339(not_after),
                days_left = remaining.as_secs() / 86_400,
                "Client certificate expires soon; install a new one and send SIGHUP"
            );
            warned = Some(tokio::time::Instant::now());
        }
        let asked = tokio::select! {
            _ = stop.cancelled() => return,
            _ = reload.notified() => true,
            _ = tokio::time::sleep(settings.reload_interval) => false,
        };
        let now_seen = crate::tls::snapshot(&settings);
        if !asked && now_seen == seen {
            continue;
        }
        seen = now_seen;
        let loaded = ClientTls::load(&settings).map_err(|e| one_line(&e)).and_then(|tls| {
            deliverer.replace_tls(&tls).map_err(|e| one_line(&e))?;
            Ok(tls)
        });
        match loaded {
            Ok(tls) => {
                metrics.set_cert_expiry(tls.not_after);
                not_after = tls.not_after;
                warned = None;
                info!(
                    subject = %tls.subject,
                    expires = %crate::tls::rfc3339(tls.not_after),
                    "Reloaded the TLS files; new connections use them"
                );
            }
            Err(e) => error!(
                error = %e,
                "Refused the new TLS files; still using the previous ones"
            ),
        }
    }
}
