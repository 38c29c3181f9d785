//! The operator commands, each run as the real binary: certs, enqueue, stats, dlq, check, sink,
//! demo, and what they say about bad input.

use std::collections::HashMap;
use std::process::{Output, Stdio};
use std::time::Duration;

use crate::common::*;
use courier::devtools::sink;
use courier::message::{dead_letter, DeadReason};
use redis::AsyncCommands;

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

fn redis_vars(redis: &RedisServer) -> HashMap<String, String> {
    HashMap::from([
        ("REDIS_HOST".into(), "127.0.0.1".into()),
        ("REDIS_PORT".into(), redis.port.to_string()),
    ])
}

#[tokio::test]
async fn certs_init_and_issue_make_a_set_the_worker_and_server_accept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let none = HashMap::new();
    for args in [
        vec!["certs", "init", "--out", "pki"],
        vec![
            "certs",
            "issue",
            "--ca",
            "pki",
            "--server",
            "localhost,127.0.0.1",
            "--out",
            "pki",
        ],
        vec!["certs", "issue", "--ca", "pki", "--client", "worker-1", "--out", "pki"],
    ] {
        let output = run_courier(&none, d, &args).await;
        assert!(output.status.success(), "{args:?}: {:?}", text(&output));
    }
    #[cfg(unix)]
    for key in ["ca.key", "server.key", "worker-1.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("pki").join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    // The worker loads the client set, and the reference server accepts it with the server set.
    let tls = courier::tls::ClientTls::load(&courier::config::TlsSettings {
        enabled: true,
        reload_interval: Duration::from_secs(60),
        cert_file: d.join("pki/worker-1.crt"),
        key_file: d.join("pki/worker-1.key"),
        ca_file: d.join("pki/ca.crt"),
    })
    .expect("the issued client set loads");
    assert!(tls.subject.contains("worker-1"));
    let read = |f: &str| std::fs::read_to_string(d.join("pki").join(f)).unwrap();
    let server_tls = sink::SinkTls {
        cert_pem: read("server.crt"),
        key_pem: read("server.key"),
        client_ca_pem: read("ca.crt"),
        http2: true,
    };
    let server = sink::Sink::start("127.0.0.1:0".parse().unwrap(), &server_tls, sink::always_ok())
        .await
        .expect("server set works");
    let settings = courier::config::MainServerSettings {
        url: server.url().parse().unwrap(),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        http2: true,
        trace_context: true,
    };
    let client = courier::delivery::Client::new(&settings, Some(&tls), 1).unwrap();
    let answer = courier::delivery::probe(&client, &settings.url)
        .await
        .expect("mutual TLS works");
    assert_eq!(answer.status, 404);

    let again = run_courier(&none, d, &["certs", "init", "--out", "pki"]).await;
    let (_, err) = text(&again);
    assert!(
        !again.status.success() && err.contains("exists") && err.contains("--force"),
        "{err}"
    );
}

#[tokio::test]
async fn enqueue_and_stats_show_every_part_of_the_queue() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = redis_vars(&redis);
    let out = run_courier(
        &vars,
        dir.path(),
        &["enqueue", "--count", "5", "--prefix", "load", "--payload", r#"{"k":1}"#],
    )
    .await;
    assert!(out.status.success(), "{:?}", text(&out));
    let out = run_courier(&vars, dir.path(), &["enqueue", "--id", "single"]).await;
    assert!(out.status.success());
    let mut conn = redis.conn().await;
    let first: String = conn.lindex(Q, -1).await.unwrap();
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["message_id"], "load-0");
    assert_eq!(first["payload"], serde_json::json!({"k": 1}));
    assert!(first["queued_at"].as_f64().is_some());

    let _: () = conn
        .lpush(keys().processing("worker-9"), message("claimed"))
        .await
        .unwrap();
    let _: () = conn
        .zadd(keys().retry, message("later"), 99_999_999_999_999i64)
        .await
        .unwrap();
    for reason in [DeadReason::Exhausted, DeadReason::Rejected, DeadReason::Rejected] {
        let _: () = conn
            .lpush(keys().dead, dead_letter(b"{}", reason, "e", "w", Some("d")))
            .await
            .unwrap();
    }
    let _: () = conn
        .zadd(keys().workers, "worker-9", chrono::Utc::now().timestamp_millis())
        .await
        .unwrap();

    let out = run_courier(&vars, dir.path(), &["stats", "--json"]).await;
    let stats: serde_json::Value = serde_json::from_str(&text(&out).0).expect("JSON");
    assert_eq!(stats["ready"], 6);
    assert!(stats["oldest_ready_age_seconds"].as_f64().is_some());
    assert_eq!(stats["processing"]["worker-9"], 1);
    assert_eq!(stats["retry"], 1);
    assert!(stats["next_retry_in_seconds"].as_f64().unwrap() > 1e9);
    assert_eq!(stats["dead"], 3);
    assert_eq!(
        stats["dead_by_reason"],
        serde_json::json!({"exhausted": 1, "rejected": 2})
    );
    assert_eq!(stats["workers"][0]["worker_id"], "worker-9");

    let out = run_courier(&vars, dir.path(), &["stats"]).await;
    let (human, _) = text(&out);
    for needle in [
        "ready                     6",
        "  worker-9",
        "  rejected                2",
        "heartbeat",
    ] {
        assert!(human.contains(needle), "{needle:?} in\n{human}");
    }
}

#[tokio::test]
async fn dlq_lists_shows_requeues_with_attempts_reset_and_purges_only_with_yes() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = redis_vars(&redis);
    let mut conn = redis.conn().await;
    let exhausted = r#"{"attempt_count":5,"message_id":"tired", "payload":{"x":1}}"#;
    let records = [
        dead_letter(
            exhausted.as_bytes(),
            DeadReason::Exhausted,
            "HTTP 503",
            "w",
            Some("tired"),
        ),
        dead_letter(
            br#"{"message_id":"nope"}"#,
            DeadReason::Rejected,
            "HTTP 422",
            "w",
            Some("nope"),
        ),
        dead_letter(b"garbage", DeadReason::Malformed("invalid_json"), "not JSON", "w", None),
    ];
    for record in &records {
        let _: () = conn.lpush(keys().dead, record).await.unwrap();
    }

    let (list, _) = text(&run_courier(&vars, dir.path(), &["dlq", "list"]).await);
    assert!(list.starts_with("3 of 3 dead letter(s)"), "{list}");
    assert!(
        list.contains("tired") && list.contains("exhausted") && list.contains("(no message_id)"),
        "{list}"
    );
    let (show, _) = text(&run_courier(&vars, dir.path(), &["dlq", "show", "tired"]).await);
    assert!(show.contains("\"reason\": \"exhausted\""), "{show}");
    let missing = run_courier(&vars, dir.path(), &["dlq", "show", "ghost"]).await;
    assert!(!missing.status.success() && text(&missing).1.contains("ghost"));

    let out = run_courier(&vars, dir.path(), &["dlq", "requeue", "tired"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let ready: Vec<String> = conn.lrange(Q, 0, -1).await.unwrap();
    assert_eq!(
        ready,
        [exhausted.replace(":5,", ":0,")],
        "attempt_count reset, every other byte kept"
    );
    assert_eq!(len(&redis, &keys().dead).await, 2);

    let out = run_courier(&vars, dir.path(), &["dlq", "requeue", "--all"]).await;
    assert!(out.status.success());
    let ready: Vec<String> = conn.lrange(Q, 0, -1).await.unwrap();
    assert_eq!(ready.len(), 3);
    assert!(
        ready.contains(&"garbage".to_string()),
        "a malformed original goes back as it was"
    );
    assert_eq!(len(&redis, &keys().dead).await, 0);

    let _: () = conn.lpush(keys().dead, &records[1]).await.unwrap();
    let refused = run_courier(&vars, dir.path(), &["dlq", "purge"]).await;
    assert!(!refused.status.success() && text(&refused).1.contains("--yes"));
    assert_eq!(len(&redis, &keys().dead).await, 1);
    let everything = run_courier(&vars, dir.path(), &["dlq", "purge", "--yes"]).await;
    assert!(!everything.status.success() && text(&everything).1.contains("--all"));
    assert_eq!(len(&redis, &keys().dead).await, 1);
    assert!(run_courier(&vars, dir.path(), &["dlq", "purge", "--all", "--yes"])
        .await
        .status
        .success());
    assert_eq!(len(&redis, &keys().dead).await, 0);
    let out = run_courier(&vars, dir.path(), &["dlq", "requeue", "ghost"]).await;
    assert!(!out.status.success() && text(&out).1.contains("ghost"));
}

#[tokio::test]
async fn check_passes_on_a_good_setup_and_names_each_failure_with_a_fix() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let vars = env(&redis, &sink.url(), &pki, "w-check", &[]);
    let out = run_courier(&vars, pki.dir.path(), &["check"]).await;
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "{stdout}");
    for name in [
        "config",
        "certificate",
        "CA",
        "key",
        "key access",
        "key match",
        "chain",
        "expiry",
        "redis",
        "main server",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with("OK") && l[6..].starts_with(name)),
            "{name} passes:\n{stdout}"
        );
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pki.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = run_courier(&vars, pki.dir.path(), &["check"]).await;
        let (stdout, _) = text(&out);
        assert!(!out.status.success());
        assert!(
            stdout.contains("FAIL  key access") && stdout.contains("chmod 600"),
            "{stdout}"
        );
        std::fs::set_permissions(&pki.key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    // A main server that is not TLS, and a Redis that is not there.
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_port = plain.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = plain.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let mut broken = vars.clone();
    broken.insert("MAIN_SERVER_URL".into(), format!("https://localhost:{plain_port}"));
    broken.insert("REDIS_PORT".into(), free_port().to_string());
    let out = run_courier(&broken, pki.dir.path(), &["check"]).await;
    let (stdout, _) = text(&out);
    assert!(!out.status.success());
    assert!(
        stdout.contains("FAIL  redis") && stdout.contains("REDIS_PORT"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAIL  main server") && stdout.contains("does not speak TLS"),
        "{stdout}"
    );
    assert!(stdout.contains("2 check(s) failed"), "{stdout}");
}

#[tokio::test]
async fn the_sink_command_serves_a_worker_and_prints_each_call() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let (cert, key) = (
        pki.write("server.crt", &pki.server.cert_pem),
        pki.write("server.key", &pki.server.key_pem),
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "sink",
        "--listen",
        &listen,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--client-ca",
        pki.ca_file.to_str().unwrap(),
        "--fail-first",
        "1",
    ];
    let mut child = courier(&HashMap::new(), pki.dir.path())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = Lines::new(&mut child);
    out.wait_for("listening on").await;

    enqueue(&redis, Q, &[message("via-cli-sink")]).await;
    let worker = start_worker(&env(&redis, &format!("https://localhost:{port}"), &pki, "w-sink", &[])).await;
    let first = out.wait_for("POST deliver via-cli-sink attempt=1").await;
    assert!(first.ends_with("-> 503") && first.contains("worker-test"), "{first}");
    out.wait_for("PUT status via-cli-sink queued attempt_count=1").await;
    let second = out.wait_for("POST deliver via-cli-sink attempt=2").await;
    assert!(second.ends_with("-> 200"), "{second}");
    worker.stop().await;
    signal(&child, "INT");
    assert!(tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap()
        .success());
}

#[tokio::test]
async fn bad_input_gets_one_line_and_a_non_zero_exit() {
    let redis = RedisServer::start_with(&["--requirepass", "sesame"]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut vars = redis_vars(&redis);
    vars.insert("REDIS_PASSWORD".into(), "wrong".into());
    let cases: [(&[&str], &str); 4] = [
        (&["stats"], "REDIS_PASSWORD"),
        (&["enqueue", "--id", "x", "--payload", "{oops"], "not valid JSON"),
        (
            &["certs", "issue", "--ca", "/nonexistent", "--client", "w"],
            "/nonexistent",
        ),
        (
            &["sink", "--cert", "/nonexistent.crt", "--key", "k", "--client-ca", "c"],
            "/nonexistent.crt",
        ),
    ];
    for (args, needle) in cases {
        let out = run_courier(&vars, dir.path(), args).await;
        let (_, err) = text(&out);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(
            err.contains(needle) && !err.contains("panicked") && !err.contains("wrong"),
            "{args:?}: {err}"
        );
    }
    vars.insert("REDIS_PORT".into(), free_port().to_string());
    let (_, err) = text(&run_courier(&vars, dir.path(), &["dlq", "list"]).await);
    assert!(
        err.contains("cannot reach Redis") && err.trim().lines().count() == 1,
        "{err}"
    );
    let out = run_courier(&vars, dir.path(), &["stats", "--bogus"]).await;
    assert_eq!(out.status.code(), Some(2), "clap refuses unknown flags");
    assert!(text(&out).1.contains("--bogus"));
}

/// Whole runs of thousands of messages, the demo and the benchmark: the bulk of the suite's
/// time. `cargo test --test it -- --skip slow::` leaves them out.
mod slow {
    use super::*;

    /// Runs `courier bench` with `args` in `dir` and returns what it printed; it must succeed
    /// within two minutes.
    async fn bench(dir: &std::path::Path, args: &[&str]) -> String {
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            courier(&HashMap::new(), dir).args(args).output(),
        )
        .await
        .expect("finishes")
        .expect("runs");
        let (stdout, stderr) = text(&output);
        assert!(output.status.success(), "{stdout}\n{stderr}");
        stdout
    }

    /// A CPU line's total and the part of it in the kernel: the figures just before `total`
    /// and before `kernel` in the line that starts with `line`.
    fn cpu_and_kernel(stdout: &str, line: &str, total: &str, kernel: &str) -> (f64, f64) {
        let text = stdout
            .lines()
            .map(str::trim_start)
            .find(|l| l.starts_with(line) && l.contains(total))
            .unwrap_or_else(|| panic!("{line} in:\n{stdout}"));
        let number_before = |marker: &str| -> f64 {
            let before = text.split(marker).next().unwrap_or_default();
            let word = before.split_whitespace().last().unwrap_or_default();
            word.trim_start_matches(['(', ',', ';'])
                .parse()
                .unwrap_or_else(|_| panic!("{marker} in {text}"))
        };
        (number_before(total), number_before(kernel))
    }

    /// Asserts that the bench printed a line for each figure.
    fn has_lines(stdout: &str, figures: &[&str]) {
        for figure in figures {
            assert!(
                stdout.lines().any(|l| l.trim_start().starts_with(figure)),
                "{figure} in:\n{stdout}"
            );
        }
    }

    /// The bench against a main server it did not start, measured first with `ab -k` (which
    /// CI installs): both clients' requests reach that server, and the comparison is printed.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_bench_drains_into_an_external_main_server_and_compares_with_ab() {
        let pki = Pki::new();
        let sink = start_sink(&pki, sink::always_ok()).await;
        let path = |p: &std::path::Path| p.to_string_lossy().to_string();
        let (url, ca, cert, key) = (
            sink.url(),
            path(&pki.ca_file),
            path(&pki.cert_file),
            path(&pki.key_file),
        );
        let args = [
            "bench",
            "--messages",
            "1000",
            "--concurrency",
            "8",
            "--latency-rate",
            "0",
            "--idle-seconds",
            "0",
            "--main-server",
            &url,
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "--baseline",
        ];
        let stdout = bench(pki.dir.path(), &args).await;
        assert!(stdout.contains(&format!("into {url}")), "{stdout}");
        has_lines(&stdout, &["drain", "worker CPU", "baseline", "courier vs baseline"]);
        // Each CPU figure with its kernel part, which is part of it. (A 1,000-message run is a
        // few clock ticks of CPU, too few to say more about the split.)
        for (line, total, kernel) in [
            ("worker CPU", " µs/msg", " µs/msg of it in the kernel"),
            ("baseline", " µs/req CPU", " of it in the kernel"),
        ] {
            let (total, kernel) = cpu_and_kernel(&stdout, line, total, kernel);
            assert!(
                (0.0..=total).contains(&kernel),
                "{line}: {kernel} of {total} in:\n{stdout}"
            );
        }
        // The CPU comparison is the worker's figure over the baseline's (one round: no median
        // between them), to the rounding of the printed figures.
        let worker = cpu_and_kernel(&stdout, "worker CPU", " µs/msg", " µs/msg of it").0;
        let baseline = cpu_and_kernel(&stdout, "baseline", " µs/req CPU", " of it in").0;
        if baseline >= 1.0 {
            let (ratio, _) = cpu_and_kernel(&stdout, "CPU vs baseline", " x ", " x ");
            let expected = worker / baseline;
            assert!(
                (ratio - expected).abs() <= 0.02 + expected * 0.1,
                "CPU vs baseline {ratio}, expected {expected:.2}, in:\n{stdout}"
            );
        }
        // ab's 1,000 POSTs carry the id bench-0; the worker's are the 1,000 queued messages.
        let delivered = sink.record.delivered();
        let from_ab = delivered.iter().filter(|id| *id == "bench-0").count();
        assert!(from_ab >= 1000, "ab's requests reached the server: {from_ab}");
        let from_courier: std::collections::BTreeSet<&String> = delivered.iter().collect();
        assert_eq!(
            from_courier.len(),
            1000,
            "every queued message was delivered once at least"
        );
    }

    /// `--rtt-ms` puts the main server a round trip away: the drain cannot beat concurrency /
    /// round trip, which loopback would beat many times over.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_bench_with_a_round_trip_stays_under_its_ceiling() {
        let dir = tempfile::tempdir().unwrap();
        let args = [
            "bench",
            "--messages",
            "800",
            "--concurrency",
            "4",
            "--latency-rate",
            "0",
            "--idle-seconds",
            "0",
            "--rtt-ms",
            "10",
        ];
        let stdout = bench(dir.path(), &args).await;
        assert!(stdout.contains("10.0 ms round trip"), "{stdout}");
        let reached: f64 = stdout
            .lines()
            .find_map(|l| l.split("the drain reached ").nth(1))
            .and_then(|rest| rest.split('%').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a ceiling line in:\n{stdout}"));
        // 4 slots over 10 ms: at most 400 msg/s.
        assert!(
            reached > 10.0 && reached <= 105.0,
            "{reached}% of the ceiling:\n{stdout}"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_bench_reports_every_figure() {
        let dir = tempfile::tempdir().unwrap();
        let args = [
            "bench",
            "--messages",
            "2000",
            "--concurrency",
            "8",
            "--latency-rate",
            "200",
            "--latency-seconds",
            "1",
            "--idle-seconds",
            "1",
            "--fail-share",
            "0.1",
            "--paired",
            "--repeat",
            "2",
        ];
        let stdout = bench(dir.path(), &args).await;
        has_lines(
            &stdout,
            &[
                "drain",
                "first 90%",
                "worker CPU",
                "worker syscalls",
                "other CPU",
                "machine steal",
                "worker peak RSS",
                "worker idle CPU",
                "enqueue→delivery",
            ],
        );
        assert!(stdout.contains("(median of 2, 2000 delivered in"), "{stdout}");
        // Two pairs: a clean drain, then one with failures, each on its own line.
        let runs: Vec<&str> = stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .collect();
        assert_eq!(runs.len(), 4, "{stdout}");
        assert!(
            runs[1].contains(" 503") && runs[3].contains(" 503") && !runs[0].contains(" 503"),
            "{stdout}"
        );
        let ratio = stdout
            .lines()
            .find(|l| l.trim_start().starts_with("failing vs clean"))
            .unwrap_or_else(|| panic!("a failing-vs-clean ratio in:\n{stdout}"));
        assert!(ratio.contains("per pair:"), "{ratio}");
        assert!(
            stdout.contains("(n=200)"),
            "200 latencies were measured (200 a second for a second): {stdout}"
        );
    }

    #[tokio::test]
    async fn the_demo_runs_end_to_end_and_leaves_nothing_behind() {
        let redis = RedisServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let vars = HashMap::from([("REDIS_URL".to_string(), redis.url())]);
        let out = run_courier(&vars, dir.path(), &["demo", "--messages", "600"]).await;
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("delivered                          599"), "{stdout}");
        assert!(stdout.contains("dead-lettered (HTTP 422)             1"), "{stdout}");
        let keys: Vec<String> = redis.conn().await.keys("*").await.unwrap();
        assert!(keys.is_empty(), "the demo removed its keys: {keys:?}");
    }

    #[tokio::test]
    async fn the_demo_cleans_up_on_ctrl_c() {
        let redis = RedisServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let vars = HashMap::from([("REDIS_URL".to_string(), redis.url())]);
        let mut child = courier(&vars, dir.path())
            .args(["demo", "--messages", "500000"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut out = Lines::new(&mut child);
        out.wait_for("reference main server").await;
        signal(&child, "INT");
        let status = tokio::time::timeout(WAIT, child.wait()).await.unwrap().unwrap();
        assert!(!status.success(), "an interrupted demo says so");
        let keys: Vec<String> = redis.conn().await.keys("*").await.unwrap();
        assert!(keys.is_empty(), "the demo removed its keys: {keys:?}");
    }
}
