//! Hostile input and hostile peers: queue items, main-server answers and signals that must not
//! panic the worker, steer a request, balloon its memory or strand a message.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use courier::devtools::sink::{self, Endpoint, Reply};
use redis::AsyncCommands;

#[tokio::test]
async fn absurd_queue_times_and_a_panicking_task_strand_nothing() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let panicking = r#"{"message_id":"courier-test-panic-1","payload":{"keep":"these bytes"}}"#;
    let items = [
        r#"{"message_id":"t-1e20","queued_at":1e20}"#.to_string(),
        r#"{"message_id":"t-1e308","queued_at":1e308}"#.to_string(),
        r#"{"message_id":"t-neg","queued_at":-5}"#.to_string(),
        r#"{"message_id":"t-year","queued_at":"9999-12-31T23:59:59Z"}"#.to_string(),
        panicking.to_string(),
        message("after-the-panic"),
    ];
    enqueue(&redis, Q, &items).await;
    let worker = worker_on(&redis, &sink, &pki, "w-panic", &[]).await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == 5).await,
        "every message but the panicking one is delivered"
    );
    let mut delivered = sink.record.delivered();
    delivered.sort();
    assert_eq!(delivered, ["after-the-panic", "t-1e20", "t-1e308", "t-neg", "t-year"]);

    eventually(|| async { len(&redis, &keys().dead).await == 1 }).await;
    let dead = raw_dead_letters(&redis, Q).await;
    assert_eq!(dead[0].fields["reason"], "internal_error");
    assert_eq!(dead[0].fields["message_id"], "courier-test-panic-1");
    assert_eq!(dead[0].message, panicking.as_bytes(), "the original bytes");
    assert_eq!(
        len(&redis, &keys().processing("w-panic")).await,
        0,
        "nothing sits in processing"
    );
    let (_, metrics) = get(&worker.url("/metrics")).await;
    assert!(
        metrics.contains(
            r#"worker_dead_letters_total{queue="message_queue",reason="internal_error",worker_id="w-panic"} 1"#
        ),
        "{metrics}"
    );
    // The worker goes on after the panic.
    enqueue(&redis, Q, &[message("later")]).await;
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 6).await);
    worker.stop().await;
}

#[tokio::test]
async fn message_ids_cannot_steer_the_status_request() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    // Every first attempt fails, so every message gets a status PUT naming its id in the path.
    let sink = start_sink(&pki, sink::fail_first(1, 503)).await;
    let steering = ["a/b", "%2e%2e", "..%2f..", "?x=1", "#frag", "...", "a\\b", "x y"];
    let mut items: Vec<String> = steering
        .iter()
        .map(|id| serde_json::json!({ "message_id": id }).to_string())
        .collect();
    items.push(r#"{"message_id":".."}"#.to_string());
    items.push(r#"{"message_id":"."}"#.to_string());
    enqueue(&redis, Q, &items).await;
    let worker = worker_on(&redis, &sink, &pki, "w-ids", &[]).await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == steering.len()
            && r.statuses().len() == steering.len())
            .await,
        "each id delivered after one failure, with one status update"
    );
    worker.stop().await;

    for call in sink.record.statuses() {
        let segments: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
        assert_eq!(segments.len(), 4, "one segment for the id: {}", call.path);
        assert_eq!(
            (segments[0], segments[1], segments[3]),
            ("internal", "messages", "status")
        );
        let decoded = percent_encoding::percent_decode_str(segments[2]).decode_utf8_lossy();
        assert_eq!(decoded, call.message_id, "the server reads back the id exactly");
    }
    let mut seen: Vec<String> = sink.record.statuses().into_iter().map(|c| c.message_id).collect();
    seen.sort();
    let mut expected: Vec<String> = steering.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(seen, expected);
    assert!(
        sink.record
            .calls()
            .iter()
            .all(|c| c.path.starts_with("/internal/messages/")),
        "no request left /internal/messages/"
    );
    let dead = dead_letters(&redis, Q).await;
    assert_eq!(dead.len(), 2, "`.` and `..` are refused");
    for record in dead {
        assert_eq!(record["reason"], "invalid_message_id");
    }
}

/// Peak resident memory of a process, from /proc (Linux).
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

#[tokio::test]
async fn a_10_mib_item_and_a_200_mb_answer_keep_the_worker_under_100_mb() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let huge_answer = 200 << 20;
    let behaviour: sink::Behaviour = Arc::new(move |call| match (call.endpoint, call.message_id.as_str()) {
        (Endpoint::Deliver, "big-answer") => Reply {
            body_len: huge_answer,
            ..Reply::status(200)
        },
        (Endpoint::Deliver, "big-error") if call.attempt == 1 => Reply {
            body_len: huge_answer,
            ..Reply::status(500)
        },
        _ => Reply::status(200),
    });
    let sink = start_sink(&pki, behaviour).await;
    // Control bytes: JSON-escaped, each would become six.
    let item: Vec<u8> = (0..10 << 20).map(|i| (i % 31 + 1) as u8).collect();
    let mut conn = redis.conn().await;
    let _: () = conn.lpush(Q, &item).await.expect("LPUSH");
    enqueue(&redis, Q, &[message("big-answer"), message("big-error")]).await;

    let vars = env(&redis, &sink.url(), &pki, "w-mem", &[]);
    let mut child = spawn_worker(&vars, pki.dir.path());
    let mut out = Lines::new(&mut child);
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == 2).await,
        "both delivered despite their answers"
    );
    let failed = sink
        .record
        .deliveries()
        .iter()
        .any(|c| c.message_id == "big-error" && c.answered == 500);
    assert!(failed, "the 200 MB error answer was sent");
    out.wait_for("without being read").await;
    let peak = peak_rss_bytes(child.id().expect("running"));
    stop_worker(child).await;
    eprintln!(
        "peak RSS with a 10 MiB item and a 200 MB answer: {:.1} MB",
        peak as f64 / 1048576.0
    );
    assert!(peak < 100 << 20, "peak RSS {} MB", peak >> 20);

    // The dead letter keeps the item as it was, unescaped, and requeue restores it exactly.
    let records: Vec<Vec<u8>> = conn.lrange(keys().dead, 0, -1).await.expect("LRANGE");
    assert_eq!(records.len(), 1);
    assert!(
        records[0].len() < item.len() + 1024,
        "record is {} bytes",
        records[0].len()
    );
    let record = courier::message::parse_dead_letter(&records[0]);
    assert_eq!(record.fields["reason"], "too_large");
    assert_eq!(record.message, item);
    let requeued = courier(&vars, pki.dir.path())
        .args(["dlq", "requeue", "--all"])
        .output()
        .await
        .expect("dlq requeue runs");
    assert!(requeued.status.success(), "{requeued:?}");
    let back: Vec<Vec<u8>> = conn.lrange(Q, 0, -1).await.expect("LRANGE");
    assert_eq!(back, vec![item], "restored byte for byte");
}

/// Starts the binary, waits for `state` in its output, sends SIGHUP, waits for `answer` (the
/// worker saying it took it), then stops it and expects a clean exit.
async fn survives_sighup(
    vars: &std::collections::HashMap<String, String>,
    dir: &std::path::Path,
    state: &str,
    answer: &str,
) {
    let mut child = spawn_worker(vars, dir);
    let mut out = Lines::new(&mut child);
    out.wait_for(state).await;
    signal(&child, "HUP");
    out.wait_for(answer).await;
    stop_worker(child).await;
}

#[tokio::test]
async fn sighup_is_handled_while_connecting_waiting_for_the_id_running_and_with_tls_off() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let dir = pki.dir.path();

    // Connecting: nothing listens on the Redis port.
    let mut vars = env(&redis, &sink.url(), &pki, "w-hup", &[]);
    vars.insert("REDIS_PORT".into(), free_port().to_string());
    survives_sighup(&vars, dir, "Cannot connect to Redis", "SIGHUP received: the TLS files").await;

    // Running.
    let vars = env(&redis, &sink.url(), &pki, "w-hup", &[]);
    survives_sighup(&vars, dir, "Connected to Redis", "Reloaded the TLS files").await;

    // Waiting for the id: a live holder on another host.
    let mut conn = redis.conn().await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.expect("TIME");
    let now_ms = secs * 1000 + micros / 1000;
    let _: () = conn
        .hset(keys().owners, "w-held", "elsewhere|1|0.0")
        .await
        .expect("HSET");
    let _: () = conn.zadd(keys().workers, "w-held", now_ms).await.expect("ZADD");
    let vars = env(&redis, &sink.url(), &pki, "w-held", &[("WORKER_DEAD_AFTER", "60")]);
    survives_sighup(
        &vars,
        dir,
        "is held by another process",
        "SIGHUP received: the TLS files",
    )
    .await;

    // TLS off, against a plain-HTTP address (nothing needs to answer there).
    let plain = format!("http://127.0.0.1:{}", free_port());
    let vars = env(&redis, &plain, &pki, "w-plain", &[("TLS_ENABLED", "false")]);
    survives_sighup(
        &vars,
        dir,
        "Connected to Redis",
        "TLS is disabled, so there is nothing to reload",
    )
    .await;
}

#[tokio::test]
async fn sighup_while_draining_changes_nothing() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let behaviour: sink::Behaviour = Arc::new(|_| Reply {
        delay: Duration::from_secs(2),
        ..Reply::status(200)
    });
    let sink = start_sink(&pki, behaviour).await;
    enqueue(&redis, Q, &[message("slow")]).await;
    let vars = env(&redis, &sink.url(), &pki, "w-drain", &[]);
    let mut child = spawn_worker(&vars, pki.dir.path());
    let mut out = Lines::new(&mut child);
    out.wait_for("Connected to Redis").await;
    eventually(|| async { len(&redis, &keys().processing("w-drain")).await == 1 }).await;
    signal(&child, "TERM");
    out.wait_for("finishing in-flight deliveries").await;
    signal(&child, "HUP");
    out.wait_for("SIGHUP received").await;
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status}");
    assert_eq!(sink.record.delivered(), ["slow"], "the delivery in flight finished");
}

#[tokio::test]
async fn stats_and_the_shipped_config_take_hostile_values() {
    // A password no YAML quoting survives when it is pasted into the text before parsing.
    let password = "quote\"and # and\\";
    let redis = RedisServer::start_with(&["--appendonly", "no", "--requirepass", password]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, include_str!("../../config.yaml")).expect("write config");
    let vars = std::collections::HashMap::from([
        ("REDIS_HOST".to_string(), "127.0.0.1".to_string()),
        ("REDIS_PORT".to_string(), redis.port.to_string()),
        ("REDIS_PASSWORD".to_string(), password.to_string()),
    ]);
    let mut conn = redis::Client::open(
        redis::IntoConnectionInfo::into_connection_info(redis::ConnectionAddr::Tcp("127.0.0.1".into(), redis.port))
            .expect("address")
            .set_redis_settings(redis::RedisConnectionInfo::default().set_password(password)),
    )
    .expect("client")
    .get_multiplexed_async_connection()
    .await
    .expect("connect with the password");
    // The oldest item claims to have been queued in the far future of float range.
    let _: () = conn
        .lpush(Q, r#"{"message_id":"p","queued_at":1e308}"#)
        .await
        .expect("LPUSH");
    let out = courier(&vars, dir.path())
        .args(["stats", "--json", "--config"])
        .arg(&config)
        .output()
        .await
        .expect("stats runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let stats: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(stats["ready"], 1);
    assert!(stats["oldest_ready_age_seconds"].is_null(), "an absurd time is no age");
}

/// An admin port of its own, on a free port, serving within `limits`.
async fn admin_port(limits: courier::admin::Limits) -> std::net::SocketAddr {
    let metrics = Arc::new(courier::metrics::Metrics::new("w-admin", &[Q.to_string()]));
    let health = Arc::new(courier::health::Health::new(metrics.clone()));
    let state = Arc::new(courier::admin::AdminState::new(
        "w-admin".into(),
        vec![Q.to_string()],
        metrics,
        health,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(courier::admin::serve(
        listener,
        state,
        limits,
        tokio_util::sync::CancellationToken::new(),
    ));
    addr
}

/// Reads until the server closes the connection; panics if it is still open after WAIT.
async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server closed the connection");
    seen
}

async fn half_sent(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    stream
}

#[tokio::test]
async fn the_admin_port_closes_connections_over_its_cap_at_once() {
    let addr = admin_port(courier::admin::Limits {
        max_connections: 8,
        header_timeout: Duration::from_secs(600),
        ..Default::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(half_sent(addr).await);
    }
    // The ninth is closed although its headers could still come: no slot is free.
    for _ in 0..20 {
        let mut extra = half_sent(addr).await;
        assert!(closed_by_server(&mut extra).await.is_empty(), "closed unanswered");
    }
    // A slot frees when a held connection goes; then requests are served again.
    drop(held.pop());
    let served = tokio::time::timeout(WAIT, async {
        loop {
            use tokio::io::AsyncWriteExt;
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let answer = closed_by_server(&mut stream).await;
            if !answer.is_empty() {
                return answer;
            }
        }
    })
    .await
    .expect("served once a slot is free");
    assert!(
        served.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&served)
    );
}

#[tokio::test]
async fn the_admin_port_times_out_slow_headers_and_idle_keep_alive() {
    use tokio::io::AsyncWriteExt;
    let addr = admin_port(courier::admin::Limits {
        header_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let mut slow = half_sent(addr).await;
    closed_by_server(&mut slow).await;

    let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let answer = closed_by_server(&mut idle).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "answered, then closed when idle");
}

#[tokio::test]
async fn a_flood_of_stats_requests_reads_redis_about_once_a_second() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-stats",
        &[("WORKER_HEARTBEAT_INTERVAL", "3600"), ("WORKER_DEAD_AFTER", "7200")],
    )
    .await;
    let zcard_calls = || async {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut redis.conn().await)
            .await
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_zcard:calls="))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // The worker's first heartbeat reads the depths once; wait for it.
    eventually(|| async { zcard_calls().await >= 1 }).await;
    let before = zcard_calls().await;
    let started = std::time::Instant::now();
    // Ten scrapers at a time on keep-alive connections, within the connection cap.
    let url = worker.url("/stats");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let requests: Vec<_> = (0..10).map(|_| client.get(&url).send()).collect();
        for response in futures_util::future::join_all(requests).await {
            let response = response.expect("admin port answers");
            assert_eq!(response.status(), 200);
            let body = response.text().await.expect("body");
            assert!(body.contains("\"depths\""), "{body}");
        }
    }
    let seconds = started.elapsed().as_secs() + 1;
    let reads = zcard_calls().await - before;
    assert!(
        reads <= seconds + 1,
        "{reads} Redis reads for 200 requests in about {seconds} s"
    );
    worker.stop().await;
}

#[tokio::test]
async fn operator_commands_show_hostile_text_escaped_and_cut_by_characters() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let vars = std::collections::HashMap::from([
        ("REDIS_HOST".to_string(), "127.0.0.1".to_string()),
        ("REDIS_PORT".to_string(), redis.port.to_string()),
    ]);
    let mut conn = redis.conn().await;
    // An error text with a two-byte character across byte 77, and escape sequences everywhere.
    let error = format!("{}é\x1b]0;owned\x07{}", "x".repeat(76), "y".repeat(40));
    let record = courier::message::dead_letter(
        b"{\"message_id\":\"evil\\u001b[2J\"}",
        courier::message::DeadReason::Rejected,
        &error,
        "w\x1b[31m",
        Some("evil\x1b[2J"),
    );
    let _: () = conn.lpush(keys().dead, record).await.expect("LPUSH");
    let _: () = conn
        .lpush(keys().processing("w\x1b[2Jx"), message("held"))
        .await
        .expect("LPUSH");
    let _: () = conn.zadd(keys().workers, "w\x1b[2Jx", 1).await.expect("ZADD");

    for args in [
        &["dlq", "list"][..],
        &["dlq", "list", "--json"],
        &["dlq", "show", "evil\x1b[2J"],
        &["stats"],
        &["stats", "--json"],
    ] {
        let out = run_courier(&vars, dir.path(), args).await;
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(
            !out.stdout.contains(&0x1b) && !out.stdout.contains(&0x07),
            "{args:?} printed a raw control character: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let list = run_courier(&vars, dir.path(), &["dlq", "list"]).await;
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("evil\\u{1b}[2J"), "{list}");
    assert!(list.contains("...") && list.contains('é'), "cut after the é: {list}");
}

#[cfg(unix)]
#[tokio::test]
async fn certs_issue_force_writes_0600_keys_without_following_symlinks() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let none = std::collections::HashMap::new();
    let d = dir.path();
    assert!(run_courier(&none, d, &["certs", "init", "--out", "pki"])
        .await
        .status
        .success());
    let key = d.join("pki/w1.key");
    std::fs::write(&key, "old").expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let target = d.join("not-a-key");
    std::fs::write(&target, "precious").expect("write");
    std::os::unix::fs::symlink(&target, d.join("pki/w1.crt")).expect("symlink");

    let issue = ["certs", "issue", "--ca", "pki", "--client", "w1", "--out", "pki"];
    let refused = run_courier(&none, d, &issue).await;
    assert!(!refused.status.success(), "a symlink counts as an existing file");
    let mut forced = issue.to_vec();
    forced.push("--force");
    let out = run_courier(&none, d, &forced).await;
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the old 0644 does not survive");
    assert_eq!(std::fs::read_to_string(&target).expect("target"), "precious");
    assert!(std::fs::read_to_string(d.join("pki/w1.crt"))
        .expect("cert")
        .contains("BEGIN CERTIFICATE"));
}

#[tokio::test]
async fn check_names_the_tls_failure_by_what_went_wrong() {
    use courier::pki::{Authority, Validity};
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let day = Duration::from_secs(86_400);
    let serve = |server: courier::pki::Issued, client_ca: String| async move {
        let tls = courier::devtools::sink::SinkTls {
            cert_pem: server.cert_pem,
            key_pem: server.key_pem,
            client_ca_pem: client_ca,
            http2: false,
        };
        courier::devtools::sink::Sink::start("127.0.0.1:0".parse().expect("addr"), &tls, sink::always_ok())
            .await
            .expect("sink starts")
    };
    let wrong_name = serve(
        pki.ca
            .issue_server(&["elsewhere.example"], Validity::default())
            .expect("cert"),
        pki.ca.cert_pem.clone(),
    )
    .await;
    let expired = serve(
        pki.ca
            .issue_server(
                &["localhost"],
                Validity {
                    starts_ago: 3 * 86_400,
                    lasts: day,
                },
            )
            .expect("cert"),
        pki.ca.cert_pem.clone(),
    )
    .await;
    let other_ca = Authority::new("someone else's CA").expect("CA");
    let refuses_us = serve(
        pki.ca.issue_server(&["localhost"], Validity::default()).expect("cert"),
        other_ca.cert_pem.clone(),
    )
    .await;
    // The README installs the key 0640 root:courier: that passes.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pki.key_file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    }
    for (sink, expected) in [
        (&wrong_name, "does not name localhost"),
        (&expired, "has expired"),
        (&refuses_us, "refused the worker certificate"),
    ] {
        let vars = env(&redis, &sink.url(), &pki, "w-check", &[]);
        let out = run_courier(&vars, pki.dir.path(), &["check"]).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{stdout}");
        assert!(stdout.contains(expected), "{expected}:\n{stdout}");
        assert!(
            stdout.lines().any(|l| l.starts_with("OK    key access")),
            "mode 640 passes:\n{stdout}"
        );
    }
}

/// Whole runs of thousands of messages, the demo and the benchmark: the bulk of the suite's
/// time. `cargo test --test it -- --skip slow::` leaves them out.
mod slow {
    use super::*;

    #[tokio::test]
    async fn five_thousand_failures_write_a_few_lines_not_megabytes() {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        let sink = start_sink(&pki, Arc::new(|_| Reply::status(503))).await;
        let all: Vec<String> = (0..2500).map(|i| message(&format!("out-{i}"))).collect();
        enqueue(&redis, Q, &all).await;
        // Each message fails twice: a retry, then a dead letter. 5,000 failed attempts in all.
        let vars = env(
            &redis,
            &sink.url(),
            &pki,
            "w-outage",
            &[
                ("WORKER_CONCURRENCY", "64"),
                ("WORKER_MAX_ATTEMPTS", "2"),
                ("WORKER_RETRY_INTERVAL", "0.05"),
                // Every attempt failing would open the breaker: the log of 5,000 failures is
                // the subject here.
                ("WORKER_BREAKER", "false"),
            ],
        );
        let mut child = spawn_worker(&vars, pki.dir.path());
        let mut out = Lines::new(&mut child);
        out.wait_for("Connected to Redis").await;
        eventually(|| async { len(&redis, &keys().dead).await == 2500 }).await;
        signal(&child, "TERM");
        out.rest().await;
        let status = child.wait().await.expect("status");
        assert!(status.success(), "{status}");
        assert_eq!(sink.record.deliveries().len(), 5000);

        let count = |needle: &str| -> u64 {
            out.seen
                .iter()
                .filter(|l| l.contains(needle))
                .map(|l| {
                    l.split(" count=")
                        .nth(1)
                        .and_then(|c| c.split(' ').next())
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(1)
                })
                .sum()
        };
        assert_eq!(count("Delivery failed"), 2500, "every retry is counted in the log");
        assert_eq!(
            count("dead-letter list"),
            2500,
            "every dead letter is counted in the log"
        );
        assert!(
            !out.seen.iter().any(|l| l.contains("Status update failed")),
            "status failures are DEBUG"
        );
        let stdout: usize = out.seen.iter().map(|l| l.len() + 1).sum();
        let files: u64 = std::fs::read_dir(pki.dir.path().join("logs"))
            .expect("log dir")
            .flatten()
            .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(stdout < 16 * 1024, "{stdout} bytes on stdout:\n{}", out.seen.join("\n"));
        assert!(files < 16 * 1024, "{files} bytes in the log files");
    }
}
