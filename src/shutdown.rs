//! Signals, portably: SIGTERM and SIGINT on Unix; Ctrl+C, Ctrl+Break, console close and system
//! shutdown on Windows (what NSSM sends a console application it is stopping).

/// Waits for the first request to stop and returns its name.
pub async fn requested() -> &'static str {
    imp::requested().await
}

#[cfg(unix)]
mod imp {
    use tokio::signal::unix::{signal, SignalKind};

    pub async fn requested() -> &'static str {
        // Installing a handler only fails when the OS refuses; then Ctrl+C via tokio still works.
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
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

    pub async fn requested() -> &'static str {
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
