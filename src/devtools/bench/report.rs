//! The bench's report: what ran, the figures of the drains (each one's median over the
//! rounds), one line per round, the idle CPU and the latency as the sink measured it, and the
//! comparisons: with the baseline, with the round trip's ceiling, failing with clean.

use std::time::Duration;

use super::baseline::Baseline;
use super::main_server::Network;
use super::rig::Drain;
use super::BenchOptions;

/// What a run measured, for the report.
pub(super) struct Report<'a> {
    pub(super) options: &'a BenchOptions,
    pub(super) network: &'a Network,
    /// The rate of the last fill, and the size of one item it queued.
    pub(super) enqueue_rate: f64,
    pub(super) item_bytes: usize,
    /// Every drain, in order (with --paired, clean and failing in turn).
    pub(super) drains: &'a [Drain],
    pub(super) baselines: &'a [Baseline],
    /// Whether the bench started the main server, and so counted its CPU time.
    pub(super) main_server_cpu: bool,
    /// The worker's CPU time over `options.idle_seconds` with the queue empty.
    pub(super) idle_cpu: Duration,
    /// Messages per second of the latency phase; 0 when it did not run.
    pub(super) latency_rate: usize,
    /// The fields of the sink's `latency_us` line, when it printed one.
    pub(super) latency: Option<&'a str>,
}

/// Prints the report.
pub(super) fn print(report: &Report) {
    let Report {
        options,
        network,
        drains,
        baselines,
        ..
    } = *report;
    print_header(report);
    if drains.len() > 1 {
        print_rounds(drains);
    }
    // The drains the figures are of: the failing ones when there is a failing share (with
    // --paired, the clean ones in between only give the ratio).
    let failing: Vec<Drain> = drains
        .iter()
        .copied()
        .filter(|d| d.failing == (options.fail_share > 0.0))
        .collect();
    let d = median_drain(&failing);
    print_figures(report, &d, failing.len());
    if !baselines.is_empty() {
        print_baseline(options, baselines, &failing);
    }
    if let Some(rtt) = network.rtt() {
        print_ceiling(options.concurrency, rtt, d.rate);
    }
    if options.paired && options.fail_share > 0.0 {
        print_pairs(drains);
    }
}

/// What ran: messages, main server, network, worker settings, Redis; and the enqueue rate.
fn print_header(report: &Report) {
    let Report {
        options,
        network,
        enqueue_rate,
        item_bytes,
        ..
    } = *report;
    let against = match &options.main_server {
        Some(external) => external.url.clone(),
        None => "the reference main server".to_string(),
    };
    println!(
        "courier bench: {} messages of {item_bytes} bytes into {against} over {}, concurrency {}, \
         batch {}, {:.0}% answered 503, {}, {}",
        options.messages,
        network.describe(),
        options.concurrency,
        options.batch_size,
        options.fail_share * 100.0,
        if options.http2 { "HTTP/2" } else { "HTTP/1.1" },
        if options.cluster {
            "3-master Redis Cluster, 3 queues round-robin"
        } else {
            "one Redis, one queue"
        }
    );
    println!("  {:<22}{enqueue_rate:>10.0} msg/s", "enqueue (pipelined)");
}

/// The figures of `d`, the median of `of` drains; then idle CPU and latency.
fn print_figures(report: &Report, d: &Drain, of: usize) {
    let Report {
        options,
        drains,
        main_server_cpu,
        idle_cpu,
        latency_rate,
        latency,
        ..
    } = *report;
    let n = options.messages as u64;
    let of = if of > 1 {
        format!("median of {of}, ")
    } else {
        String::new()
    };
    println!(
        "  {:<22}{:>10.0} msg/s   ({of}{n} delivered in {:.2} s)",
        "drain", d.rate, d.seconds
    );
    println!(
        "  {:<22}{:>10.0} msg/s   ({of}first {} delivered in {:.2} s)",
        "first 90%",
        d.first_ninety_rate,
        n * 9 / 10,
        d.first_ninety_seconds
    );
    println!(
        "  {:<22}{:>10.1} µs/msg   ({of}{:.2} s user+system; {:.1} µs/msg of it in the kernel)",
        "worker CPU", d.cpu_us, d.cpu_seconds, d.system_us
    );
    println!(
        "  {:<22}{:>10.2} per msg (read + write system calls)",
        "worker syscalls", d.syscalls
    );
    let main_cpu = match main_server_cpu {
        true => format!("{:.1}", d.sink_cpu_us),
        false => "not measured".to_string(),
    };
    println!(
        "  {:<22}{:>10.1} µs/msg   (main server {main_cpu}, redis-server {:.1}, all nodes)",
        "other CPU",
        d.sink_cpu_us + d.redis_cpu_us,
        d.redis_cpu_us
    );
    println!(
        "  {:<22}{:>10.1} %      (CPU time the hypervisor gave away during the drain)",
        "machine steal",
        d.steal * 100.0
    );
    println!(
        "  {:<22}{:>10.1} MB",
        "worker peak RSS",
        drains.iter().map(|d| d.rss_mb).fold(0.0, f64::max)
    );
    println!(
        "  {:<22}{:>10.2} %      (over {} s with the queue empty)",
        "worker idle CPU",
        100.0 * idle_cpu.as_secs_f64() / options.idle_seconds.max(1) as f64,
        options.idle_seconds
    );
    if latency_rate > 0 {
        let latency = latency.map_or_else(|| "not measured".to_string(), render_latency);
        println!(
            "  {:<22}{latency}   ({} msg/s for {} s)",
            "enqueue→delivery", latency_rate, options.latency_seconds
        );
    }
}

/// The most a worker with `concurrency` slots can deliver over `rtt`, and the share of it the
/// drain reached.
fn print_ceiling(concurrency: usize, rtt: Duration, rate: f64) {
    // Each request holds one of the worker's slots for at least a round trip.
    let ceiling = concurrency as f64 / rtt.as_secs_f64();
    println!(
        "  {:<22}{ceiling:>10.0} msg/s  (concurrency / round trip; the drain reached {:.0}% of it)",
        "ceiling",
        100.0 * rate / ceiling
    );
}

/// With --paired: each pair's failing rate over its clean one, and their median.
fn print_pairs(drains: &[Drain]) {
    let ratios: Vec<f64> = drains
        .chunks(2)
        .filter_map(|pair| match pair {
            [clean, failing] => Some(failing.first_ninety_rate / clean.first_ninety_rate),
            _ => None,
        })
        .collect();
    let rendered: Vec<String> = ratios.iter().map(|r| format!("{:.0}%", r * 100.0)).collect();
    println!(
        "  {:<22}{:>10.0} %      (first 90% with failures / clean, per pair: {})",
        "failing vs clean",
        median(&ratios) * 100.0,
        rendered.join(" ")
    );
}

/// The baseline's medians and courier's rate as a share of it, per round.
fn print_baseline(options: &BenchOptions, baselines: &[Baseline], drains: &[Drain]) {
    let rate = median(&baselines.iter().map(|b| b.rate).collect::<Vec<_>>());
    let cpu = median(&baselines.iter().map(|b| b.cpu_us).collect::<Vec<_>>());
    let system = median(&baselines.iter().map(|b| b.system_us).collect::<Vec<_>>());
    println!(
        "  {:<22}{rate:>10.0} req/s  (ab -k -c {}, median of {}; {cpu:.1} µs/req CPU, {system:.1} \
         of it in the kernel)",
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
            "  {:<22}{:>10.2} x      (courier's CPU per message / the baseline's per request, per \
             round: {})",
            "CPU vs baseline",
            median(&costs),
            rendered.join(" ")
        );
    }
}

/// One line per drain, for --repeat and --paired.
fn print_rounds(drains: &[Drain]) {
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

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Each figure's median over the drains.
fn median_drain(drains: &[Drain]) -> Drain {
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
fn render_latency(fields: &str) -> String {
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
