//! Redis faults that must lose and strand nothing, with the worker running: strays in a live
//! worker's own processing list, outages longer than WORKER_DEAD_AFTER, ids held elsewhere,
//! reclaim counts that must not only grow.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use redis::AsyncCommands;

use crate::common::*;
use courier::devtools::sink;

/// How often the sink delivered each id.
fn delivery_counts(sink: &sink::Sink) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for id in sink.record.delivered() {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn strays_in_a_running_workers_processing_list_are_delivered_without_a_restart() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let worker = worker_on(&redis, &sink, &pki, "w-strays", &[]).await;
    eventually(|| async { len(&redis, &keys().workers).await == 1 }).await;
    // As a claim whose reply was lost, or an ack a failover lost, would leave them.
    let ids: Vec<String> = (0..5).map(|i| format!("stray-{i}")).collect();
    let strays: Vec<String> = ids.iter().map(|id| message(id)).collect();
    let _: () = redis
        .conn()
        .await
        .lpush(keys().processing("w-strays"), &strays)
        .await
        .expect("LPUSH");
    // The sweeper runs every 10 s.
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() >= 5).await,
        "strays delivered while the worker runs"
    );
    // Counted once the sweep's script has answered, which may be after a fast claimer has
    // delivered what it returned.
    eventually(|| async {
        let (_, metrics) = get(&worker.url("/metrics")).await;
        metrics
            .lines()
            .any(|l| l.starts_with("worker_strays_returned_total") && l.ends_with(" 5"))
    })
    .await;
    worker.stop().await;
    let counts = delivery_counts(&sink);
    assert_eq!(counts.keys().cloned().collect::<Vec<_>>(), ids);
    assert!(counts.values().all(|n| *n == 1), "each once: {counts:?}");
    assert_eq!(len(&redis, &keys().processing("w-strays")).await, 0);
}

#[tokio::test]
async fn a_settled_message_takes_its_reclaim_count_with_it() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    // A previous process with this id died holding eight messages.
    let ids: Vec<String> = (0..8).map(|i| format!("left-{i}")).collect();
    let items: Vec<String> = ids.iter().map(|id| message(id)).collect();
    let _: () = redis
        .conn()
        .await
        .lpush(keys().processing("w-reclaims"), &items)
        .await
        .expect("LPUSH");
    let worker = worker_on(&redis, &sink, &pki, "w-reclaims", &[]).await;
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 8).await);
    // Each was counted once when the restart returned it, and the count went with the
    // delivery: the hash does not grow with every crash.
    eventually(|| async { len(&redis, &keys().reclaims).await == 0 }).await;
    worker.stop().await;
}

#[tokio::test]
async fn reclaim_counts_stay_bounded() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    // 100,000 counts already: the cap. Ten scripts of 10,000, each well within the client's
    // reply timeout on a loaded machine.
    for from in (0..100_000).step_by(10_000) {
        let _: () = redis::cmd("EVAL")
            .arg("for i = ARGV[1] + 1, ARGV[1] + 10000 do redis.call('HSET', KEYS[1], 'h' .. i, 1) end")
            .arg(1)
            .arg(keys().reclaims)
            .arg(from)
            .query_async(&mut conn)
            .await
            .expect("EVAL");
    }
    let _: () = conn
        .lpush(keys().processing("w-gone"), message("new-one"))
        .await
        .expect("LPUSH");
    let pki = Pki::new();
    let sink = start_sink(&pki, sink::always_ok()).await;
    let worker = worker_on(&redis, &sink, &pki, "w-gone", &[("WORKER_MAX_RECLAIMS", "1")]).await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == 1).await,
        "returned and delivered"
    );
    worker.stop().await;
    assert_eq!(len(&redis, &keys().reclaims).await, 100_000, "not counted past the cap");
}

/// A holder of `id` that the test keeps alive by changing its heartbeat, as a live worker in
/// another PID namespace with the same host name and a pid that is free here would.
async fn foreign_holder(redis: &RedisServer, id: &str, beat: u64) {
    let mut conn = redis.conn().await;
    // The pid of no process here, on this host name, but another boot / PID namespace.
    let token = format!("{}|999999|0.0|another-boot/pid:[1]", courier::queue::this_host());
    let _: () = conn.hset(keys().owners, id, token).await.expect("HSET");
    let _: () = conn.zadd(keys().workers, id, beat).await.expect("ZADD");
}

#[tokio::test]
async fn an_id_held_from_another_pid_namespace_is_refused_while_its_holder_heartbeats() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    enqueue(&redis, Q, &[message("not-yours")]).await;
    foreign_holder(&redis, "w-shared", 1_000).await;
    let vars = env(&redis, &sink.url(), &pki, "w-shared", &[]);
    let mut child = spawn_worker(&vars, pki.dir.path());
    let mut out = Lines::new(&mut child);
    out.wait_for("is held by another process").await;
    // The holder heartbeats while it is watched.
    let _: () = redis
        .conn()
        .await
        .zadd(keys().workers, "w-shared", 2_000)
        .await
        .expect("ZADD");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits")
        .expect("status");
    out.rest().await;
    assert_ne!(status.code(), Some(0), "refused: {}", out.seen.join("\n"));
    assert!(
        out.seen.iter().any(|l| l.contains("already in use by a live worker")),
        "{}",
        out.seen.join("\n")
    );
    assert_eq!(sink.record.delivered().len(), 0, "nothing taken from the live holder");
}

#[tokio::test]
async fn an_id_whose_holder_went_silent_is_taken_after_dead_after() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    foreign_holder(&redis, "w-silent", 1_000).await;
    let _: () = redis
        .conn()
        .await
        .lpush(keys().processing("w-silent"), message("left-behind"))
        .await
        .expect("LPUSH");
    let vars = env(&redis, &sink.url(), &pki, "w-silent", &[]);
    let mut child = spawn_worker(&vars, pki.dir.path());
    let mut out = Lines::new(&mut child);
    out.wait_for("its holder has not heartbeated").await;
    assert!(sink.wait_for(WAIT, |r| r.delivered() == ["left-behind"]).await);
    stop_worker(child).await;
}

mod slow {
    use super::*;

    /// Two workers as real processes with deliveries under way; Redis stopped for three times
    /// WORKER_DEAD_AFTER and started again from its AOF.
    #[tokio::test]
    async fn an_outage_longer_than_dead_after_reaps_nobody_and_loses_nothing() {
        let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
        let pki = Pki::new();
        let sink = start_sink(
            &pki,
            std::sync::Arc::new(|_| sink::Reply {
                delay: Duration::from_millis(20),
                ..sink::Reply::status(200)
            }),
        )
        .await;
        let ids: Vec<String> = (0..3000).map(|i| format!("out-{i}")).collect();
        enqueue(&redis, Q, &ids.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
        let dead_after = 3;
        let mut children = Vec::new();
        let mut outs = Vec::new();
        for id in ["w-a", "w-b"] {
            let vars = env(
                &redis,
                &sink.url(),
                &pki,
                id,
                &[
                    ("WORKER_CONCURRENCY", "8"),
                    ("WORKER_HEARTBEAT_INTERVAL", "0.5"),
                    ("WORKER_DEAD_AFTER", &dead_after.to_string()),
                ],
            );
            let mut child = spawn_worker(&vars, pki.dir.path());
            outs.push(Lines::new(&mut child));
            children.push(child);
        }
        assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 300).await);
        redis.kill().await;
        for out in &mut outs {
            out.wait_for("Redis is unreachable").await;
        }
        tokio::time::sleep(Duration::from_secs(3 * dead_after)).await;
        redis.restart().await;
        let expected: BTreeSet<String> = ids.iter().cloned().collect();
        assert!(
            sink.wait_for(Duration::from_secs(90), |r| {
                expected.is_subset(&r.delivered().into_iter().collect())
            })
            .await,
            "all delivered"
        );
        for child in children {
            stop_worker(child).await;
        }
        for out in &mut outs {
            out.rest().await;
            let reaped: Vec<&String> = out.seen.iter().filter(|l| l.contains("Reaped")).collect();
            assert!(reaped.is_empty(), "nobody reaped: {reaped:?}");
        }
        let counts = delivery_counts(&sink);
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "no duplicate: {twice:?}");
        assert_eq!(len(&redis, Q).await, 0);
        assert_eq!(len(&redis, &keys().dead).await, 0);
        assert_eq!(len(&redis, &keys().reclaims).await, 0, "nobody counted as dead");
    }
}
