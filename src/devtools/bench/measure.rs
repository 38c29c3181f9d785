//! What the bench measures a process and the machine by: CPU time, peak memory and system
//! calls from /proc, the machine's busy and stolen ticks, a child's resource usage from
//! wait4, the worker's delivered count from its /metrics, and the clock payloads carry.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// CPU time (user + system) a process has used, from /proc/PID/stat.
pub(super) fn cpu_time(pid: u32, ticks_per_second: f64) -> anyhow::Result<Duration> {
    let (user, system) = cpu_times(pid, ticks_per_second)?;
    Ok(user + system)
}

/// The user and the system CPU time a process has used, from /proc/PID/stat.
pub(super) fn cpu_times(pid: u32, ticks_per_second: f64) -> anyhow::Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let time = |field: usize| {
        let ticks = fields.get(field).and_then(|t| t.parse::<f64>().ok()).unwrap_or(0.0);
        Duration::from_secs_f64(ticks / ticks_per_second)
    };
    Ok((time(11), time(12)))
}

/// Peak resident set size in bytes (VmHWM).
pub(super) fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kb * 1024)
}

/// Read and write system calls a process has made, from /proc/PID/io.
pub(super) fn syscalls(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("syscr:").or_else(|| l.strip_prefix("syscw:")))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// Busy and stolen ticks of the whole machine, from the first line of /proc/stat. Steal is time
/// the hypervisor gave this machine's CPUs to someone else; a run with much of it is noise.
pub(super) fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let total: u64 = fields.iter().take(8).sum();
    (total, get(7))
}

pub(super) fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(100.0)
}

pub(super) fn micros_now() -> u64 {
    chrono::Utc::now().timestamp_micros() as u64
}

/// Reads `worker_messages_delivered_total` from the worker's /metrics on `port`.
pub(super) async fn delivered(port: u16) -> Option<u64> {
    let text = admin_get(port, "/metrics").await.ok()?;
    // One series per queue: their sum.
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with("worker_messages_delivered_total{"))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    Some(total as u64)
}

/// A GET on the worker's admin port (plain HTTP on 127.0.0.1), HTTP/1.0 so that the server
/// closes the connection after the answer; returns the answer, head and body.
pub(super) async fn admin_get(port: u16, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// Waits until the worker has delivered `target` messages.
pub(super) async fn wait_delivered(port: u16, target: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while delivered(port).await.unwrap_or(0) < target {
        if Instant::now() > deadline {
            bail!("the worker did not deliver {target} messages within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits for a child process and returns its exit status and CPU time, user and system.
#[cfg(unix)]
pub(super) fn wait_with_usage(pid: u32) -> anyhow::Result<(i32, Duration, Duration)> {
    let pid = libc::pid_t::try_from(pid).context("process id out of range")?;
    let mut status = 0;
    // SAFETY: wait4 writes into the two locals, which outlive the call.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        bail!("cannot wait for process {pid}: {}", std::io::Error::last_os_error());
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok((code, time(usage.ru_utime), time(usage.ru_stime)))
}

#[cfg(not(unix))]
pub(super) fn wait_with_usage(_pid: u32) -> anyhow::Result<(i32, Duration, Duration)> {
    bail!("--baseline runs on Linux only")
}
