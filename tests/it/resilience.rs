//! Tests that do the failing: kill -9, dead workers, Redis restarts, main-server outages, cut
//! connections, certificate rotation. Each checks that every enqueued message was delivered at
//! least once and that the queue, processing lists and retry set end empty, and prints its
//! duplicate rate (`cargo test --test resilience -- --nocapture`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use courier::devtools::sink::{self, Endpoint, Reply, Sink};
use courier::pki::{Authority, Validity};

fn messages(prefix: &str, n: usize) -> (Vec<String>, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let items = ids.iter().map(|id| message(id)).collect();
    (ids, items)
}

/// Waits until every id has been delivered at least once.
async fn all_delivered(sink: &Sink, ids: &[String]) {
    let expected: BTreeSet<String> = ids.iter().cloned().collect();
    let done = sink
        .wait_for(Duration::from_secs(60), |r| {
            let got: BTreeSet<String> = r.delivered().into_iter().collect();
            expected.is_subset(&got)
        })
        .await;
    let got: BTreeSet<String> = sink.record.delivered().into_iter().collect();
    let missing: Vec<&String> = expected.difference(&got).take(10).collect();
    assert!(
        done,
        "{} of {} never delivered, e.g. {missing:?}",
        expected.len() - expected.intersection(&got).count(),
        expected.len()
    );
}

/// Asserts nothing is left in Redis but dead letters, and reports duplicates.
async fn assert_settled(scenario: &str, redis: &RedisServer, sink: &Sink, n: usize) {
    assert_eq!(len(redis, Q).await, 0, "{scenario}: queue empty");
    assert_eq!(len(redis, &keys().retry).await, 0, "{scenario}: retry set empty");
    let mut conn = redis.conn().await;
    let processing: Vec<String> = redis::AsyncCommands::keys(&mut conn, format!("{}*", keys().processing("")))
        .await
        .expect("KEYS");
    for key in processing {
        assert_eq!(len(redis, &key).await, 0, "{scenario}: {key} empty");
    }
    assert_eq!(len(redis, &keys().dead).await, 0, "{scenario}: nothing dead-lettered");
    let deliveries = sink.record.delivered().len();
    let duplicates = deliveries - n;
    println!(
        "duplicates[{scenario}]: {duplicates} of {n} messages ({:.2}%), {} delivery attempts",
        100.0 * duplicates as f64 / n as f64,
        sink.record.deliveries().len()
    );
}

fn slow_ok(delay_ms: u64) -> sink::Behaviour {
    Arc::new(move |_| Reply {
        delay: Duration::from_millis(delay_ms),
        ..Reply::status(200)
    })
}

#[tokio::test]
async fn a_new_certificate_set_that_does_not_match_is_refused_and_the_old_one_kept() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let vars = env(&redis, &sink.url(), &pki, "w-badrot", &[("TLS_RELOAD_INTERVAL", "0.1")]);
    let mut child = spawn_worker(&vars, pki.dir.path());
    let mut out = Lines::new(&mut child);
    out.wait_for("Connected to Redis").await;

    // A key from another certificate lands next to the current certificate.
    let stranger = pki.ca.issue_client("stranger", Validity::default()).expect("cert");
    courier::pki::write_private(&pki.key_file, &stranger.key_pem).expect("write");
    let line = out.wait_for("Refused the new TLS files").await;
    assert!(
        line.contains(" - ERROR - ") && line.contains("does not match"),
        "{line}"
    );

    let (ids, items) = messages("still", 50);
    enqueue(&redis, Q, &items).await;
    all_delivered(&sink, &ids).await;
    assert!(
        sink.record.calls().iter().all(|c| c.client.contains("worker-test")),
        "the old set stayed in use"
    );
    stop_worker(child).await;
}

#[tokio::test]
async fn a_second_live_process_with_the_same_id_refuses_to_start() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let vars = env(&redis, &sink.url(), &pki, "worker-7", &[]);
    let mut first = spawn_worker(&vars, pki.dir.path());
    Lines::new(&mut first).wait_for("Connected to Redis").await;

    let output = run_courier(&vars, pki.dir.path(), &["run"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    let pid = first.id().expect("running").to_string();
    assert!(
        stderr.contains("worker-7") && stderr.contains(&pid),
        "names the id and the holder: {stderr}"
    );
    stop_worker(first).await;
}

#[tokio::test]
async fn a_certificate_near_expiry_draws_a_warning_and_its_expiry_is_exported() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let short = pki
        .ca
        .issue_client(
            "worker-test",
            Validity {
                starts_ago: 3600,
                lasts: Duration::from_secs(5 * 86_400),
            },
        )
        .expect("cert");
    std::fs::write(&pki.cert_file, &short.cert_pem).expect("write");
    courier::pki::write_private(&pki.key_file, &short.key_pem).expect("write");
    let port = free_port().to_string();
    let vars = env(
        &redis,
        &sink.url(),
        &pki,
        "w-expiring",
        &[("WORKER_METRICS_PORT", &port)],
    );
    let mut child = spawn_worker(&vars, pki.dir.path());
    let line = Lines::new(&mut child).wait_for("Client certificate expires soon").await;
    assert!(line.contains(" - WARNING - ") && line.contains("days_left=4"), "{line}");
    let (_, metrics) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
    let expiry: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"worker_client_cert_expiry_timestamp_seconds{worker_id="w-expiring"} "#))
        .and_then(|v| v.parse().ok())
        .expect("expiry gauge");
    let days = (expiry - chrono::Utc::now().timestamp() as f64) / 86_400.0;
    assert!((4.9..5.0).contains(&days), "expires in {days} days");
    stop_worker(child).await;
}

#[tokio::test]
async fn a_main_server_slower_than_the_request_timeout_is_retried() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let behaviour: sink::Behaviour = Arc::new(|call| match (call.endpoint, call.attempt) {
        (Endpoint::Deliver, 1) => Reply {
            delay: Duration::from_secs(3),
            ..Reply::status(200)
        },
        _ => Reply::status(200),
    });
    let sink = start_sink(&pki, behaviour).await;
    enqueue(&redis, Q, &[message("slowpoke")]).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-timeout",
        &[("MAIN_SERVER_REQUEST_TIMEOUT", "0.3")],
    )
    .await;
    assert!(
        sink.wait_for(WAIT, |r| r.deliveries().iter().any(|c| c.attempt == 2))
            .await,
        "a second attempt after the timeout"
    );
    let (_, metrics) = get(&worker.url("/metrics")).await;
    assert!(
        metrics.contains(
            r#"worker_messages_failed_total{queue="message_queue",reason="timeout",worker_id="w-timeout"} 1"#
        ),
        "{metrics}"
    );
    worker.stop().await;
    assert_eq!(len(&redis, &keys().retry).await + len(&redis, Q).await, 0);
}

/// Whole runs of thousands of messages, the demo and the benchmark: the bulk of the suite's
/// time. `cargo test --test it -- --skip slow::` leaves them out.
mod slow {
    use super::*;

    #[tokio::test]
    async fn a_main_server_answering_503_for_a_while_loses_and_dead_letters_nothing() {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        let down = Arc::new(AtomicBool::new(true));
        let outage = down.clone();
        let behaviour: sink::Behaviour = Arc::new(move |call| match (call.endpoint, outage.load(Ordering::Acquire)) {
            (Endpoint::Deliver, true) => Reply::status(503),
            _ => Reply::status(200),
        });
        let sink = start_sink(&pki, behaviour).await;
        let (ids, items) = messages("outage", 2000);
        enqueue(&redis, Q, &items).await;
        let worker = worker_on(
            &redis,
            &sink,
            &pki,
            "w-503",
            // The retries themselves are the subject; flow::slow has the breaker's outage.
            &[
                ("WORKER_CONCURRENCY", "16"),
                ("WORKER_MAX_ATTEMPTS", "50"),
                ("WORKER_BREAKER", "false"),
            ],
        )
        .await;

        // Down until every message has failed at least once, then back.
        assert!(sink.wait_for(WAIT, |r| r.deliveries().len() >= 2500).await);
        down.store(false, Ordering::Release);
        all_delivered(&sink, &ids).await;
        worker.stop().await;
        assert_settled("main server 503 then back", &redis, &sink, ids.len()).await;
    }

    #[tokio::test]
    async fn a_main_server_cutting_connections_without_answering_loses_nothing() {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        // Every message's first attempt has its connection cut before any answer.
        let behaviour: sink::Behaviour = Arc::new(|call| match (call.endpoint, call.attempt) {
            (Endpoint::Deliver, 1) => Reply::cut(),
            _ => Reply::status(200),
        });
        let sink = start_sink(&pki, behaviour).await;
        let (ids, items) = messages("cut", 1000);
        enqueue(&redis, Q, &items).await;
        let worker = worker_on(
            &redis,
            &sink,
            &pki,
            "w-cut",
            // Every first attempt cut looks like an outage to the breaker: the retries are
            // the subject here.
            &[("WORKER_CONCURRENCY", "16"), ("WORKER_BREAKER", "false")],
        )
        .await;
        all_delivered(&sink, &ids).await;
        worker.stop().await;
        let cut = sink.record.deliveries().iter().filter(|c| c.answered == 0).count();
        assert!(cut >= ids.len(), "every first attempt was cut ({cut})");
        assert_settled("connections cut", &redis, &sink, ids.len()).await;
    }

    #[tokio::test]
    async fn kill_9_mid_run_then_a_restart_with_the_same_id_loses_nothing() {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        let sink = start_sink(&pki, slow_ok(1)).await;
        let (ids, items) = messages("k9", 5000);
        enqueue(&redis, Q, &items).await;
        let vars = env(&redis, &sink.url(), &pki, "worker-1", &[("WORKER_CONCURRENCY", "32")]);

        let mut first = spawn_worker(&vars, pki.dir.path());
        assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 1000).await);
        first.kill().await.expect("SIGKILL");
        let in_processing = len(&redis, &keys().processing("worker-1")).await;
        assert!(in_processing > 0, "the kill left claimed messages behind");

        // systemd restarts worker@1 with the same id at once: it takes over from the dead process
        // and returns its processing list before claiming.
        let second = spawn_worker(&vars, pki.dir.path());
        all_delivered(&sink, &ids).await;
        stop_worker(second).await;
        assert_settled("kill -9 + restart", &redis, &sink, ids.len()).await;
    }

    #[tokio::test]
    async fn kill_9_of_one_of_two_workers_is_reaped_by_the_survivor() {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        let sink = start_sink(&pki, slow_ok(1)).await;
        let (ids, items) = messages("reap", 4000);
        enqueue(&redis, Q, &items).await;
        let port = free_port().to_string();
        let vars = |id: &str| {
            env(
                &redis,
                &sink.url(),
                &pki,
                id,
                &[
                    ("WORKER_CONCURRENCY", "16"),
                    ("WORKER_DEAD_AFTER", "1"),
                    ("WORKER_METRICS_PORT", "0"),
                ],
            )
        };
        let mut survivor_vars = vars("worker-b");
        survivor_vars.insert("WORKER_METRICS_PORT".into(), port.clone());

        let mut victim = spawn_worker(&vars("worker-a"), pki.dir.path());
        let survivor = spawn_worker(&survivor_vars, pki.dir.path());
        assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 800).await);
        // On a loaded machine the survivor can deliver the first 800 before the victim has
        // claimed anything: kill it only once it is at work.
        eventually(|| async { len(&redis, &keys().processing("worker-a")).await > 0 }).await;
        victim.kill().await.expect("SIGKILL");
        assert!(
            len(&redis, &keys().processing("worker-a")).await > 0,
            "the victim held messages"
        );

        all_delivered(&sink, &ids).await;
        eventually(|| async { len(&redis, &keys().workers).await == 1 }).await;
        assert_eq!(ids_in(&redis, &keys().processing("worker-a")).await.len(), 0, "reaped");
        let (_, metrics) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
        let reaped: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(r#"worker_reaped_messages_total{worker_id="worker-b"} "#))
            .and_then(|v| v.parse().ok())
            .expect("reaped counter");
        assert!(reaped > 0.0, "the survivor counted what it reaped");
        stop_worker(survivor).await;
        assert_settled("kill -9 of one of two", &redis, &sink, ids.len()).await;
    }

    #[tokio::test]
    async fn a_redis_restart_mid_run_loses_nothing_and_is_logged_once_each_way() {
        let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
        let pki = Pki::new();
        let sink = start_sink(&pki, slow_ok(1)).await;
        let (ids, items) = messages("aof", 3000);
        enqueue(&redis, Q, &items).await;
        let port = free_port().to_string();
        let vars = env(
            &redis,
            &sink.url(),
            &pki,
            "w-aof",
            &[("WORKER_CONCURRENCY", "16"), ("WORKER_METRICS_PORT", &port)],
        );
        let mut child = spawn_worker(&vars, pki.dir.path());
        let mut out = Lines::new(&mut child);

        assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 500).await);
        redis.kill().await;
        out.wait_for("Redis is unreachable").await;
        let (status, body) = get(&format!("http://127.0.0.1:{port}/ready")).await;
        assert_eq!(status, 503, "not ready while Redis is down: {body}");
        assert_eq!(
            get(&format!("http://127.0.0.1:{port}/health")).await.0,
            200,
            "still alive"
        );
        redis.restart().await;
        out.wait_for("Redis is reachable again").await;

        all_delivered(&sink, &ids).await;
        assert_eq!(get(&format!("http://127.0.0.1:{port}/ready")).await.0, 200);
        signal(&child, "TERM");
        assert!(tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("exits")
            .expect("status")
            .success());
        out.rest().await;
        let outages = out.seen.iter().filter(|l| l.contains("Redis is unreachable")).count();
        let recoveries = out
            .seen
            .iter()
            .filter(|l| l.contains("Redis is reachable again"))
            .count();
        assert_eq!(
            (outages, recoveries),
            (1, 1),
            "one line each way:\n{}",
            out.seen.join("\n")
        );
        assert_settled("Redis restart (AOF)", &redis, &sink, ids.len()).await;
    }

    #[tokio::test]
    async fn certificate_rotation_with_sighup_switches_new_connections_to_the_new_certificate() {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        let sink = start_sink(&pki, slow_ok(2)).await;
        let (ids, items) = messages("rot", 3000);
        enqueue(&redis, Q, &items).await;
        let vars = env(
            &redis,
            &sink.url(),
            &pki,
            "w-rot",
            &[("WORKER_CONCURRENCY", "8"), ("TLS_RELOAD_INTERVAL", "3600")],
        );
        let mut child = spawn_worker(&vars, pki.dir.path());
        let mut out = Lines::new(&mut child);
        assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 500).await);

        // A new client CA and certificate; from now on the server accepts only clients of the new CA.
        let new_ca = Authority::new("rotated client CA").expect("CA");
        let new_cert = new_ca
            .issue_client("worker-rotated", Validity::default())
            .expect("cert");
        std::fs::write(&pki.cert_file, &new_cert.cert_pem).expect("write");
        courier::pki::write_private(&pki.key_file, &new_cert.key_pem).expect("write");
        let mut tls = pki.sink_tls();
        tls.client_ca_pem = new_ca.cert_pem.clone();
        sink.replace_tls(&tls).expect("sink TLS");
        signal(&child, "HUP");
        out.wait_for("Reloaded the TLS files").await;
        // Connections made under the old set were closed by the swap; from here on every call
        // arrives on a connection the worker opened with the new files.
        let swapped_at = sink.record.calls().len();

        all_delivered(&sink, &ids).await;
        stop_worker(child).await;
        let after: Vec<String> = sink.record.calls()[swapped_at..]
            .iter()
            .map(|c| c.client.clone())
            .collect();
        assert!(!after.is_empty());
        let old: Vec<(usize, &String)> = after
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.contains("worker-rotated"))
            .collect();
        assert!(
            old.is_empty(),
            "after the swap only the new certificate gets through; {} of {} were old: {:?}",
            old.len(),
            after.len(),
            &old[..old.len().min(5)]
        );
        assert_settled("certificate rotation", &redis, &sink, ids.len()).await;
    }
}

#[tokio::test]
async fn a_worker_whose_id_is_taken_stops_with_its_own_exit_code() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let vars = env(&redis, &sink.url(), &pki, "worker-8", &[]);
    let mut child = spawn_worker(&vars, pki.dir.path());
    let mut out = Lines::new(&mut child);
    out.wait_for("Connected to Redis").await;
    eventually(|| async { len(&redis, &keys().workers).await == 1 }).await;
    // Another process takes the id, as a second worker started with it after this one was
    // presumed dead would.
    let _: () = redis::AsyncCommands::hset(&mut redis.conn().await, keys().owners, "worker-8", "elsewhere|1|0.0")
        .await
        .expect("HSET");
    out.wait_for("Another process has taken worker id worker-8").await;
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(status.code(), Some(75), "not the exit of a clean SIGTERM stop");
}

/// Redis's count of connected clients.
async fn clients(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    info_number(conn, "clients", "connected_clients").await
}

/// Waits until Redis counts `n` clients (it takes a new connection in its own time).
async fn clients_become(conn: &redis::aio::MultiplexedConnection, n: u64) {
    eventually(|| {
        let mut conn = conn.clone();
        async move { clients(&mut conn).await == n }
    })
    .await;
}

/// A Redis connection nobody holds any more is closed; one still held is not.
#[tokio::test]
async fn a_redis_connection_is_closed_when_its_last_handle_goes() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let pki = Pki::new();
    let settings = settings(&env(&redis, "https://127.0.0.1:1", &pki, "w", &[]));
    let connector = courier::queue::Connector::new(&settings.redis).expect("connector");
    let before = clients(&mut conn).await;

    let kept = connector.connect(Duration::from_secs(5)).await.expect("connect");
    let dropped = connector.connect(Duration::from_secs(5)).await.expect("connect");
    let clone = dropped.clone();
    clients_become(&conn, before + 2).await;
    drop(dropped);
    let mut clone_conn = clone.clone();
    let _: () = redis::cmd("PING")
        .query_async(&mut clone_conn)
        .await
        .expect("a clone still works");
    drop((clone, clone_conn));
    clients_become(&conn, before + 1).await;

    // Its place is taken by the next connection, and the one still held still works.
    let _again = connector.connect(Duration::from_secs(5)).await.expect("connect");
    clients_become(&conn, before + 2).await;
    let _: () = redis::cmd("PING").query_async(&mut kept.clone()).await.expect("PING");
}

/// A start-up attempt that fails halfway (here Redis takes the worker's first connection and
/// refuses its second) leaves no connection open: once Redis takes two more clients, the
/// next attempt connects and the worker delivers. Before, the first attempt's connection
/// stayed open, the next attempt's took the new room, and the worker never started.
#[tokio::test]
async fn a_start_up_that_failed_halfway_leaves_no_connection_behind() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let mut conn = redis.conn().await;
    // Database 1, so that every connection starts with a SELECT, and a refused one fails to
    // connect (without a first command, it would connect and reconnect later).
    let _: () = redis::cmd("SELECT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("SELECT");
    let _: () = redis::cmd("LPUSH")
        .arg(Q)
        .arg(message("after-the-refusals"))
        .query_async(&mut conn)
        .await
        .expect("LPUSH");
    let room = clients(&mut conn).await;
    let set_max = |n: u64| redis::cmd("CONFIG").arg("SET").arg("maxclients").arg(n).clone();
    let _: () = set_max(room + 1).query_async(&mut conn).await.expect("CONFIG SET");

    let worker = worker_on(&redis, &sink, &pki, "halfway", &[("REDIS_DB", "1")]).await;
    // The first attempt's second connection is refused three times (redis-rs tries it twice
    // more), which fails the attempt; a fourth refusal is the next attempt's.
    eventually(|| {
        let mut conn = conn.clone();
        async move { info_number(&mut conn, "stats", "rejected_connections").await >= 4 }
    })
    .await;
    assert!(sink.record.delivered().is_empty());
    let _: () = set_max(room + 2).query_async(&mut conn).await.expect("CONFIG SET");
    all_delivered(&sink, &["after-the-refusals".to_string()]).await;
    worker.stop().await;
}
