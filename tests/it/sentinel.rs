//! Sentinel: a master, a replica and three sentinels; the master is SIGKILLed mid-run and the
//! worker follows the promoted replica without a restart, losing nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use courier::devtools::harness;
use courier::devtools::sink;

struct TestSentinels {
    set: harness::Sentinels,
    _dir: tempfile::TempDir,
}

async fn start_sentinels() -> TestSentinels {
    let dir = tempfile::tempdir().expect("temp dir");
    let set = harness::Sentinels::start(dir.path(), 1, 3, &["--appendonly", "no"])
        .await
        .unwrap_or_else(|e| panic!("sentinels: {e:#}"));
    TestSentinels { set, _dir: dir }
}

/// Settings for a worker that finds its master through these sentinels, with `extra`.
fn sentinel_env(
    sentinels: &TestSentinels,
    sink: &sink::Sink,
    pki: &Pki,
    worker_id: &str,
    extra: &[(&str, &str)],
) -> std::collections::HashMap<String, String> {
    let mut vars = env_at(1, &sink.url(), pki, worker_id, extra);
    vars.insert("REDIS_SENTINELS".to_string(), sentinels.set.addresses());
    vars
}

async fn node(port: u16) -> redis::aio::MultiplexedConnection {
    // WAIT blocks for seconds: longer than the default response timeout.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(15)));
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .expect("url")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect")
}

/// The sentinels' count of connections ever received, summed.
async fn connections_received(sentinels: &TestSentinels) -> u64 {
    let mut total = 0;
    for sentinel in &sentinels.set.sentinels {
        total += info_number(&mut node(sentinel.port).await, "stats", "total_connections_received").await;
    }
    total
}

/// The heartbeat asks the sentinels where the master is every interval, on the connection
/// it kept from the last time: 20 heartbeats open no new connection to a sentinel.
#[tokio::test]
async fn heartbeats_ask_the_sentinels_on_one_kept_connection() {
    let (sentinels, pki) = (start_sentinels().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let vars = sentinel_env(
        &sentinels,
        &sink,
        &pki,
        "w-kept",
        &[("WORKER_HEARTBEAT_INTERVAL", "0.05")],
    );
    let mut master = node(sentinels.set.master.port).await;
    let _: () = redis::AsyncCommands::lpush(&mut master, Q, message("through-sentinel"))
        .await
        .expect("LPUSH");
    let worker = start_worker(&vars).await;
    assert!(sink.wait_for(WAIT, |r| !r.delivered().is_empty()).await);

    let score = |mut master: redis::aio::MultiplexedConnection| async move {
        let score: Option<f64> = redis::AsyncCommands::zscore(&mut master, keys().workers, "w-kept")
            .await
            .expect("ZSCORE");
        score.expect("the worker's heartbeat")
    };
    let before = connections_received(&sentinels).await;
    let first = score(master.clone()).await;
    // A second at 50 ms: 20 heartbeats.
    eventually(|| {
        let master = master.clone();
        async move { score(master).await >= first + 1_000.0 }
    })
    .await;
    let after = connections_received(&sentinels).await;
    // Each count includes the INFO connection that read it (3 sentinels, one each).
    assert!(
        after - before <= 3 + 1,
        "{} new connections to the sentinels over 20 heartbeats",
        after - before
    );
    worker.stop().await;
}

/// Every sentinel down for three times WORKER_DEAD_AFTER while the master is fine: the workers
/// go on heartbeating to the master and delivering, and nobody is reaped.
#[tokio::test]
async fn sentinels_down_longer_than_dead_after_reap_nobody() {
    let (mut sentinels, pki) = (start_sentinels().await, Pki::new());
    let sink = start_sink(&pki, sink::delayed(Duration::from_millis(20))).await;
    let ids: BTreeSet<String> = (0..2000).map(|i| format!("quiet-{i}")).collect();
    let items: Vec<String> = ids.iter().map(|id| message(id)).collect();
    let mut master = node(sentinels.set.master.port).await;
    let _: () = redis::AsyncCommands::lpush(&mut master, Q, &items)
        .await
        .expect("LPUSH");
    let extra = [
        ("WORKER_CONCURRENCY", "4"),
        ("WORKER_HEARTBEAT_INTERVAL", "0.5"),
        ("WORKER_DEAD_AFTER", "3"),
    ];
    let mut children = Vec::new();
    let mut outs = Vec::new();
    for id in ["w-s1", "w-s2"] {
        let mut child = spawn_worker(&sentinel_env(&sentinels, &sink, &pki, id, &extra), pki.dir.path());
        let mut out = Lines::new(&mut child);
        out.wait_for("through Sentinel").await;
        outs.push(out);
        children.push(child);
    }
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 100).await);
    for sentinel in &mut sentinels.set.sentinels {
        sentinel.kill().await;
    }
    let during = sink.record.delivered().len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        sink.record.delivered().len() > during + 100,
        "deliveries go on while the sentinels are down"
    );
    for sentinel in &mut sentinels.set.sentinels {
        sentinel.restart().await.expect("sentinel restarts");
    }
    let everything = sink
        .wait_for(Duration::from_secs(60), |r| {
            ids.is_subset(&r.delivered().into_iter().collect())
        })
        .await;
    assert!(everything, "all delivered");
    for child in children {
        stop_worker(child).await;
    }
    for out in &mut outs {
        out.rest().await;
        assert!(
            !out.seen.iter().any(|l| l.contains("Reaped")),
            "nobody reaped: {}",
            out.seen.join("\n")
        );
    }
    assert_eq!(sink.record.delivered().len(), ids.len(), "no duplicate");
}

/// The README's Sentinel users, exactly: the data user on the master (no `ROLE`: the worker
/// learns the role from `INFO replication`) and the sentinel user on every sentinel. The
/// worker finds the master through them and delivers; `courier check` passes with them.
#[tokio::test]
async fn the_documented_sentinel_users_find_the_master_and_deliver() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let set = harness::Sentinels::start(dir.path(), 0, 2, &["--appendonly", "no"])
        .await
        .unwrap_or_else(|e| panic!("sentinels: {e:#}"));
    let sentinels = TestSentinels { set, _dir: dir };
    set_acl_user(sentinels.set.master.port, "courier", &readme_acl("sentinel", "data-pw")).await;
    for sentinel in &sentinels.set.sentinels {
        set_acl_user(
            sentinel.port,
            "courier-sentinel",
            &readme_acl("sentinel-user", "sentinel-pw"),
        )
        .await;
    }
    let sink = start_sink(&pki, sink::fail_first(1, 503)).await;
    let vars = sentinel_env(
        &sentinels,
        &sink,
        &pki,
        "w-sentinel-acl",
        &[
            ("REDIS_USERNAME", "courier"),
            ("REDIS_PASSWORD", "data-pw"),
            ("REDIS_SENTINEL_USERNAME", "courier-sentinel"),
            ("REDIS_SENTINEL_PASSWORD", "sentinel-pw"),
            ("WORKER_BREAKER", "false"),
        ],
    );
    let ids: BTreeSet<String> = (0..30).map(|i| format!("sentinel-acl-{i}")).collect();
    let items: Vec<String> = ids.iter().map(|id| message(id)).collect();
    let mut master = node(sentinels.set.master.port).await;
    let _: () = redis::AsyncCommands::lpush(&mut master, Q, &items)
        .await
        .expect("LPUSH");

    let worker = start_worker(&vars).await;
    let delivered = sink
        .wait_for(WAIT, |r| {
            let seen: BTreeSet<String> = r.delivered().into_iter().collect();
            seen == ids
        })
        .await;
    assert!(delivered, "every message delivered through the documented users");
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut master)
        .await
        .expect("CLIENT LIST");
    assert!(clients.contains("user=courier "), "{clients}");

    let check = run_courier(&vars, pki.dir.path(), &["check"]).await;
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(report.contains("OK    redis acl      user courier may run"), "{report}");
    assert!(report.contains("OK    redis sentinel"), "{report}");
    // SENTINEL REPLICAS answered the sentinel user (none are up in this set).
    assert!(report.contains("WARN  redis replicas"), "{report}");
    worker.stop().await;
    let left: Vec<String> = redis::AsyncCommands::keys(&mut master, "*").await.expect("KEYS");
    assert_eq!(left, [keys().clock], "every key but the queue's clock ends empty");
}

/// Whole runs of thousands of messages, seconds each: `--skip slow::` leaves them out.
mod slow {
    use super::*;

    #[tokio::test]
    async fn the_worker_follows_a_failover_and_loses_nothing() {
        let (sentinels, pki) = (start_sentinels().await, Pki::new());
        let sink = start_sink(&pki, sink::delayed(Duration::from_millis(3))).await;
        let replica_port = sentinels.set.replicas[0].port;
        let vars = sentinel_env(&sentinels, &sink, &pki, "w-sentinel", &[("WORKER_CONCURRENCY", "8")]);
        let dir = pki.dir.path();
        // A producer that cannot afford to lose a push waits for the replica.
        let ids: BTreeSet<String> = (0..1500).map(|i| format!("failover-{i}")).collect();
        let items: Vec<String> = ids.iter().map(|id| message(id)).collect();
        let mut master = node(sentinels.set.master.port).await;
        let _: () = redis::AsyncCommands::lpush(&mut master, Q, &items)
            .await
            .expect("LPUSH");
        let replicated: u64 = redis::cmd("WAIT")
            .arg(1)
            .arg(10_000)
            .query_async(&mut master)
            .await
            .expect("WAIT");
        assert_eq!(replicated, 1);

        let check = run_courier(&vars, dir, &["check"]).await;
        let report = String::from_utf8_lossy(&check.stdout);
        let master_port = sentinels.set.master.port;
        assert!(
            report.contains(&format!("names 127.0.0.1:{master_port} as the master")),
            "{report}"
        );
        assert!(report.contains("1 healthy replica(s)"), "{report}");

        let mut worker = spawn_worker(&vars, dir);
        let mut out = Lines::new(&mut worker);
        out.wait_for("through Sentinel").await;
        assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 200).await);
        let mut sentinels = sentinels;
        sentinels.set.master.kill().await;

        let line = out.wait_for("Redis master changed").await;
        assert!(line.contains(&format!("127.0.0.1:{replica_port}")), "{line}");
        let everything = sink
            .wait_for(Duration::from_secs(60), |r| {
                let seen: BTreeSet<String> = r.delivered().into_iter().collect();
                ids.is_subset(&seen)
            })
            .await;
        assert!(everything, "every message delivered at least once across the failover");

        // With its only replica promoted, the new master has none: check says so.
        let check = run_courier(&vars, dir, &["check"]).await;
        let report = String::from_utf8_lossy(&check.stdout);
        assert!(
            report.contains(&format!("names 127.0.0.1:{replica_port} as the master")),
            "{report}"
        );
        assert!(report.contains("no healthy replica"), "{report}");

        stop_worker(worker).await;
        let left: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut node(replica_port).await)
            .await
            .expect("KEYS");
        assert_eq!(
            left,
            [keys().clock],
            "every key but the queue's clock ends empty on the new master"
        );
    }
}
