//! The bench's report: the figures of the drains (each one's median over the rounds), one
//! line per round, the comparison with the baseline, and the latency as the sink measured it.

use super::rig::{Baseline, Drain};
use super::BenchOptions;

/// The baseline's medians and courier's rate as a share of it, per round.
pub(super) fn print_baseline(options: &BenchOptions, baselines: &[Baseline], drains: &[Drain]) {
    let rate = median(&baselines.iter().map(|b| b.rate).collect::<Vec<_>>());
    let cpu = median(&baselines.iter().map(|b| b.cpu_us).collect::<Vec<_>>());
    let system = median(&baselines.iter().map(|b| b.system_us).collect::<Vec<_>>());
    println!(
        "  {:<22}{rate:>10.0} req/s  (ab -k -c {}, median of {}; {cpu:.1} µs/req CPU, {system:.1} of it in the kernel)",
        "baseline",
        options.concurrency,
        baselines.len()
    );
    let shares: Vec<f64> = baselines.iter().zip(drains).map(|(b, d)| d.rate / b.rate).collect();
    let rendered: Vec<String> = shares.iter().map(|r| format!("{:.2}", r)).collect();
    println!(
        "  {:<22}{:>10.2}        (courier's drain rate / the baseline's, per round: {})",
        "courier vs baseline",
        median(&shares),
        rendered.join(" ")
    );
    // The CPU each spends on a message, compared on the same machine in the same round: the
    // measure that travels between machines, where µs per message do not.
    let costs: Vec<f64> = baselines
        .iter()
        .zip(drains)
        .filter(|(b, _)| b.cpu_us > 0.0)
        .map(|(b, d)| d.cpu_us / b.cpu_us)
        .collect();
    if !costs.is_empty() {
        let rendered: Vec<String> = costs.iter().map(|r| format!("{:.2}", r)).collect();
        println!(
            "  {:<22}{:>10.2} x      (courier's CPU per message / the baseline's per request, per round: {})",
            "CPU vs baseline",
            median(&costs),
            rendered.join(" ")
        );
    }
}

/// One line per drain, for --repeat and --paired.
pub(super) fn print_rounds(drains: &[Drain]) {
    println!(
        "  {:<8}{:>10}{:>12}{:>10}{:>10}{:>9}",
        "run", "msg/s", "first 90%", "µs/msg", "other", "steal"
    );
    for (i, d) in drains.iter().enumerate() {
        println!(
            "  {:<8}{:>10.0}{:>12.0}{:>10.1}{:>10.1}{:>8.1}%",
            format!("{}{}", i + 1, if d.failing { " 503" } else { "" }),
            d.rate,
            d.first_ninety_rate,
            d.cpu_us,
            d.sink_cpu_us + d.redis_cpu_us,
            d.steal * 100.0
        );
    }
}

pub(super) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Each figure's median over the drains.
pub(super) fn median_drain(drains: &[Drain]) -> Drain {
    let of = |f: fn(&Drain) -> f64| median(&drains.iter().map(f).collect::<Vec<_>>());
    Drain {
        failing: drains.first().is_some_and(|d| d.failing),
        rate: of(|d| d.rate),
        first_ninety_rate: of(|d| d.first_ninety_rate),
        seconds: of(|d| d.seconds),
        first_ninety_seconds: of(|d| d.first_ninety_seconds),
        cpu_us: of(|d| d.cpu_us),
        system_us: of(|d| d.system_us),
        cpu_seconds: of(|d| d.cpu_seconds),
        syscalls: of(|d| d.syscalls),
        sink_cpu_us: of(|d| d.sink_cpu_us),
        redis_cpu_us: of(|d| d.redis_cpu_us),
        steal: of(|d| d.steal),
        rss_mb: of(|d| d.rss_mb),
    }
}

/// `n=… p50=… p99=… max=…` in µs, as the sink prints it, in milliseconds.
pub(super) fn render_latency(fields: &str) -> String {
    let get = |key: &str| -> f64 {
        fields
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    format!(
        "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
        get("p50=") / 1000.0,
        get("p99=") / 1000.0,
        get("max=") / 1000.0,
        get("n=") as u64
    )
}
