//! The baseline a drain is compared with: `ab -k`, a lean HTTP client, against the same main
//! server at the same concurrency, with its CPU time from wait4.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};

use super::main_server::Server;
use super::measure::wait_with_usage;
use super::BenchOptions;

/// What the lean client made of the main server in one run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Baseline {
    pub(super) rate: f64,
    pub(super) cpu_us: f64,
    /// The part of `cpu_us` spent in the kernel.
    pub(super) system_us: f64,
}

/// `ab -k` (apache2-utils) at the worker's concurrency, as many POSTs as the drain has
/// messages, each with a delivery body of the drain's size, over the same mutual TLS; its CPU
/// time comes from wait4's resource usage.
pub(super) async fn baseline(options: &BenchOptions, server: &Server, work: &Path) -> anyhow::Result<Baseline> {
    if which("ab").is_none() {
        bail!("--baseline needs ab: apt-get install apache2-utils");
    }
    // ab takes the client certificate and key in one file.
    let identity = work.join("ab-identity.pem");
    let mut pem = std::fs::read(&server.cert).with_context(|| format!("cannot read {}", server.cert.display()))?;
    pem.extend(std::fs::read(&server.key).with_context(|| format!("cannot read {}", server.key.display()))?);
    std::fs::write(&identity, pem)?;
    let pad = "x".repeat(options.message_bytes.saturating_sub(90));
    let body = work.join("ab-body.json");
    std::fs::write(
        &body,
        format!(r#"{{"message_id":"bench-0","worker_id":"bench","attempt":1,"payload":{{"pad":"{pad}"}}}}"#),
    )?;
    let output = work.join("ab-output.txt");
    let child = std::process::Command::new("ab")
        .args([
            "-q",
            "-k",
            "-c",
            &options.concurrency.to_string(),
            "-n",
            &options.messages.to_string(),
        ])
        .arg("-E")
        .arg(&identity)
        .arg("-p")
        .arg(&body)
        .args(["-T", "application/json"])
        .arg(format!("{}/internal/messages/deliver", server.url))
        .stdout(std::fs::File::create(&output)?)
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start ab")?;
    let pid = child.id();
    let (status, user, system) = tokio::task::spawn_blocking(move || wait_with_usage(pid)).await??;
    let text = std::fs::read_to_string(&output)?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let rate = field("Requests per second:").filter(|_| status == 0);
    let Some(rate) = rate else {
        bail!("ab failed (exit {status}):\n{text}");
    };
    // ab counts an answer whose length differs from the first as failed ("Length"): a server
    // that puts a time in its answers is not failing.
    let length = text
        .split(", Length: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    let failed = field("Failed requests:").unwrap_or(0.0) - length + field("Non-2xx responses:").unwrap_or(0.0);
    if failed > 0.0 {
        let detail: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("Failed requests") || l.contains("(Connect") || l.contains("Non-2xx"))
            .map(str::trim)
            .collect();
        bail!(
            "ab saw {failed} failed requests ({}); is {} a main server that answers 200?",
            detail.join(" "),
            server.url
        );
    }
    let per_request = |d: Duration| d.as_secs_f64() * 1e6 / options.messages.max(1) as f64;
    Ok(Baseline {
        rate,
        cpu_us: per_request(user + system),
        system_us: per_request(system),
    })
}

/// The path of a program on PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}
