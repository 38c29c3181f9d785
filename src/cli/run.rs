//! `courier run`: the worker, with its settings, TLS files, logging and runtime, until a stop
//! signal; a second signal exits at once.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{config_error, runtime, EXIT_ID_TAKEN};
use crate::config::{InstanceEnv, ProcessEnv, Settings};
use crate::telemetry::one_line;
use crate::tls::ClientTls;
use crate::worker::{RunError, Worker};

pub(super) fn run(config: Option<PathBuf>, instance: Option<u32>) -> ExitCode {
    let file = config.or_else(Settings::default_file);
    let loaded = match instance {
        Some(instance) => Settings::load(
            file.as_deref(),
            &InstanceEnv {
                instance,
                env: ProcessEnv,
            },
        ),
        None => Settings::load(file.as_deref(), &ProcessEnv),
    };
    let settings = match loaded {
        Ok(settings) => settings,
        Err(e) => return config_error(one_line(&e)),
    };
    let tls = match settings.tls.enabled {
        true => match ClientTls::load(&settings.tls) {
            Ok(tls) => Some(tls),
            Err(e) => return config_error(one_line(&e)),
        },
        false => None,
    };
    let _logs = match crate::telemetry::init(
        settings.logging.level,
        settings.logging.format,
        &settings.logging.file_path,
        settings.logging.max_file_bytes,
        &settings.worker.id,
    ) {
        Ok(guards) => guards,
        Err(e) => return config_error(one_line(&e)),
    };
    // One thread by default: on a machine shared with Redis and the main server, cross-thread
    // wake-ups cost more than a second thread gains (README, "Performance").
    let runtime = match runtime(settings.worker.threads) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    if let Some(tls) = &tls {
        info!(
            subject = %tls.subject,
            expires = %crate::tls::rfc3339(tls.not_after),
            "Client certificate loaded"
        );
    }
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let worker = Worker::start(settings, tls, shutdown.clone()).await?;
        crate::admin::open(worker.settings(), crate::admin::Served::of(&worker))
            .await
            .map_err(|crate::admin::PortError { addr, source }| RunError::AdminPort { addr, source })?;
        tokio::spawn(async move {
            let signal = crate::shutdown::requested().await;
            info!(signal, "Shutdown requested; draining");
            shutdown.cancel();
            let again = crate::shutdown::requested().await;
            warn!(
                signal = again,
                "Second stop request: exiting now; unfinished messages stay in processing and \
                 return to the queue at the next start"
            );
            std::process::exit(1);
        });
        worker.run().await
    });
    let error = match result {
        Ok(()) => return ExitCode::SUCCESS,
        Err(error) => error,
    };
    // The error and its causes, on one line.
    let (config, taken) = (error.is_config(), matches!(error, RunError::IdTaken { .. }));
    let line = one_line(&error);
    if config {
        tracing::error!("Configuration error: {line}");
        return config_error(line);
    }
    tracing::error!("{line}");
    eprintln!("courier: {line}");
    if taken {
        ExitCode::from(EXIT_ID_TAKEN)
    } else {
        ExitCode::FAILURE
    }
}
