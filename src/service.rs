//! Telling the service manager how the worker is doing. Under systemd (`Type=notify`): READY
//! once claiming starts, STATUS lines, STOPPING on drain, and watchdog pings while the runtime
//! runs. Elsewhere (no NOTIFY_SOCKET, Windows) every call does nothing.

use std::time::Duration;

/// The worker is connected and claiming.
pub(crate) fn ready(status: &str) {
    #[cfg(unix)]
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
    #[cfg(not(unix))]
    let _ = status;
}

/// A line for `systemctl status`.
pub(crate) fn status(status: &str) {
    #[cfg(unix)]
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(status)]);
    #[cfg(not(unix))]
    let _ = status;
}

/// The worker has begun to drain.
pub(crate) fn stopping() {
    #[cfg(unix)]
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// How often the service manager expects a watchdog ping, when it expects any.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    #[cfg(unix)]
    return sd_notify::watchdog_enabled();
    #[cfg(not(unix))]
    None
}

/// One watchdog ping.
pub(crate) fn watchdog_ping() {
    #[cfg(unix)]
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
}
