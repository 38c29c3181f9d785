//! `courier check`: validates a configuration the way `run` would use it, one line per check
//! with a fix on failure: config, TLS files, key match, chain, expiry, key permissions, Redis
//! (reachable, password, version) and a real mutual-TLS request to the main server.
//! This file holds the verdicts, the order of the checks and the report; each file beside it
//! holds what it checks: `tls`, `redis`, `main_server`.

mod main_server;
mod redis;
mod tls;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::{ProcessEnv, Settings};
use crate::telemetry::one_line;

use self::main_server::main_server_check;
use self::redis::redis_checks;
use self::tls::tls_checks;

/// One check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Passes.
    Pass,
    /// Passes, with something to know.
    Warn,
    /// Fails, with a fix; any failure makes `courier check` exit 1.
    Fail,
}

/// One line of `courier check`.
#[derive(Debug, Clone)]
pub(super) struct Check {
    /// What was checked ("key match", "redis acl").
    pub name: &'static str,
    /// Pass, warn or fail.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do about it: on a failure, and on some warnings.
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Warn,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// `OK    name   detail`, and a `fix:` line under a failure.
    pub(super) fn render(&self) -> String {
        let label = match self.verdict {
            Verdict::Pass => "OK  ",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        let mut line = format!("{label}  {:<14} {}", self.name, self.detail);
        if let Some(fix) = &self.fix {
            line.push_str(&format!("\n      fix: {fix}"));
        }
        line
    }
}

/// `courier check`: prints one line per check; exits 0 only when all pass.
pub(super) fn command(file: Option<PathBuf>) -> ExitCode {
    let runtime = match crate::cli::runtime(0) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let checks = runtime.block_on(run(file.as_deref()));
    for check in &checks {
        println!("{}", check.render());
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    if failed == 0 {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("{failed} check(s) failed");
        ExitCode::FAILURE
    }
}

/// Runs every check that can run; later checks that depend on a failed one are skipped.
pub(super) async fn run(file: Option<&Path>) -> Vec<Check> {
    let mut checks = Vec::new();
    let settings = match Settings::load(file, &ProcessEnv) {
        Ok(settings) => {
            let source = file.map_or("defaults and environment (no config file)".to_string(), |f| {
                f.display().to_string()
            });
            checks.push(Check::pass("config", format!("loaded {source}")));
            settings
        }
        Err(e) => {
            checks.push(Check::fail("config", one_line(&e), "correct the setting named above"));
            return checks;
        }
    };

    let tls = if settings.tls.enabled {
        tls_checks(&settings, &mut checks)
    } else {
        None
    };
    checks.extend(redis_checks(&settings).await);
    if settings.tls.enabled {
        match &tls {
            Some(tls) => checks.push(main_server_check(&settings, tls).await),
            None => checks.push(Check::fail(
                "main server",
                "not tried: the TLS files are not usable",
                "fix the TLS checks above first",
            )),
        }
    }
    checks
}
