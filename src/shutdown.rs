//! Signals, portably: SIGTERM and SIGINT on Unix; Ctrl+C, Ctrl+Break, console close and system
//! shutdown on Windows (what NSSM sends a console application it is stopping). SIGHUP (Unix
//! only) asks for the TLS files to be read again; Windows relies on the periodic check.

/// Sets SIGHUP to be ignored, for the moments before the worker listens for it: its default
/// action ends the process. A no-op on Windows, which has no SIGHUP.
pub fn ignore_hangup() {
    #[cfg(unix)]
    // SAFETY: SIG_IGN is a valid disposition for SIGHUP, and `signal` is called from `main`
    // before any other thread exists. tokio installs its own handler over it later.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// Requests to reload the TLS files: SIGHUP on Unix; never on Windows.
pub struct ReloadRequests {
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl ReloadRequests {
    pub fn new() -> ReloadRequests {
        ReloadRequests {
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// Waits for the next request.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(hangup) = &mut self.hangup {
            if hangup.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

impl Default for ReloadRequests {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits for the first request to stop and returns its name.
pub async fn requested() -> &'static str {
    imp::requested().await
}

#[cfg(unix)]
mod imp {
    use tokio::signal::unix::{signal, SignalKind};

    pub(super) async fn requested() -> &'static str {
        // Installing a handler only fails when the OS refuses; then Ctrl+C via tokio still works.
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
}

#[cfg(windows)]
mod imp {
    use tokio::signal::windows;

    pub(super) async fn requested() -> &'static str {
        match (
            windows::ctrl_c(),
            windows::ctrl_break(),
            windows::ctrl_close(),
            windows::ctrl_shutdown(),
        ) {
            (Ok(mut c), Ok(mut b), Ok(mut close), Ok(mut shutdown)) => tokio::select! {
                _ = c.recv() => "Ctrl+C",
                _ = b.recv() => "Ctrl+Break",
                _ = close.recv() => "console close",
                _ = shutdown.recv() => "system shutdown",
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                "Ctrl+C"
            }
        }
    }
}
