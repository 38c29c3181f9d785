//! "Redis unavailable", each class made for real: a server that answers but cannot take the
//! command now (NOREPLICAS, READONLY inside a script, MASTERDOWN, LOADING) is an outage, not a
//! refusal: the settle is held and retried, `/ready` answers 503, and nothing is lost. The
//! cluster classes (CLUSTERDOWN, a node the client cannot reach) are in `cluster.rs`.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use courier::devtools::sink;
use courier::queue::{self, Queue, QueueError};

/// A queue handle for `worker_id` on the Redis at `port`.
async fn queue_at(port: u16, worker_id: &str) -> Queue {
    let pki = Pki::new();
    let settings = settings(&env_at(port, "https://127.0.0.1:1", &pki, worker_id, &[]));
    let connector = queue::Connector::new(&settings.redis).expect("connector");
    let conn = Queue::shared_connection(&connector).await.expect("connect");
    Queue::connect(&connector, &conn, Q, worker_id).await.expect("connect")
}

/// The error a claim meets, which must be an outage, with `code` in its text.
async fn claim_error(queue: &Queue, code: &str) -> QueueError {
    let error = queue.claim(10, 1 << 20, 5).await.expect_err("the claim is refused");
    let QueueError::Redis(redis_error) = &error else {
        panic!("{error}");
    };
    assert_eq!(redis_error.code(), Some(code), "{error}");
    assert!(error.is_unavailable(), "{code} is an outage: {error}");
    error
}

#[tokio::test]
async fn noreplicas_in_a_script_and_in_the_ack_pipeline_is_unavailable() {
    let redis = RedisServer::start().await;
    let queue = queue_at(redis.port, "w-noreplicas").await;
    enqueue(&redis, Q, &[message("m")]).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("min-replicas-to-write")
        .arg(1)
        .query_async(&mut redis.conn().await)
        .await
        .expect("CONFIG SET");
    claim_error(&queue, "NOREPLICAS").await;
    // A settle's LREM goes in a pipeline: redis-rs reports a pipeline's errors apart.
    let error = queue
        .acks()
        .ack(&bytes::Bytes::from(message("m")))
        .await
        .expect_err("the ack is refused");
    assert!(error.is_unavailable(), "NOREPLICAS in a pipeline is an outage: {error}");
}

#[tokio::test]
async fn readonly_inside_a_script_on_a_replica_is_unavailable() {
    let master = RedisServer::start().await;
    let port = master.port.to_string();
    let replica = RedisServer::start_with(&["--appendonly", "no", "--replicaof", "127.0.0.1", &port]).await;
    enqueue(&master, Q, &[message("m")]).await;
    eventually(|| async { len(&replica, Q).await == 1 }).await;
    let queue = queue_at(replica.port, "w-readonly").await;
    claim_error(&queue, "READONLY").await;
}

#[tokio::test]
async fn masterdown_on_a_replica_cut_off_from_its_master_is_unavailable() {
    let nowhere = free_port().to_string();
    let replica = RedisServer::start_with(&[
        "--appendonly",
        "no",
        "--replicaof",
        "127.0.0.1",
        &nowhere,
        "--replica-serve-stale-data",
        "no",
    ])
    .await;
    let queue = queue_at(replica.port, "w-masterdown").await;
    claim_error(&queue, "MASTERDOWN").await;
}

#[tokio::test]
async fn loading_after_a_restart_is_unavailable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let spawn = |extra: &[&str]| {
        tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--logfile", ""])
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server")
    };
    let url = format!("redis://127.0.0.1:{port}/");
    let connect = || async {
        redis::Client::open(url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
    };
    // A dataset big enough that, loaded at a millisecond a key, it takes a few seconds.
    let mut first = spawn(&[]);
    let mut conn = loop {
        if let Ok(conn) = connect().await {
            break conn;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _: () = redis::cmd("EVAL")
        .arg("for i = 1, 5000 do redis.call('SET', 'filler:' .. i, i) end")
        .arg(0)
        .query_async(&mut conn)
        .await
        .expect("fill");
    let _: () = redis::cmd("SAVE").query_async(&mut conn).await.expect("SAVE");
    first.kill().await.expect("kill");
    let _loading = spawn(&[
        "--key-load-delay",
        "1000",
        "--loading-process-events-interval-bytes",
        "1024",
    ]);
    // The server answers while it loads: connect as soon as it listens.
    let queue = loop {
        let attempt = async {
            let pki = Pki::new();
            let settings = settings(&env_at(port, "https://127.0.0.1:1", &pki, "w-loading", &[]));
            let connector = queue::Connector::new(&settings.redis).expect("connector");
            let conn = Queue::shared_connection(&connector).await?;
            Queue::connect(&connector, &conn, Q, "w-loading").await
        };
        if let Ok(queue) = attempt.await {
            break queue;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    claim_error(&queue, "LOADING").await;
}

/// A worker whose settles meet NOREPLICAS (the master lost its replicas while deliveries were
/// under way) holds them, reports not ready, and settles every message once Redis takes
/// writes again: each delivered exactly once, nothing dead, nothing left.
#[tokio::test]
async fn settles_refused_with_noreplicas_are_held_until_redis_takes_writes_again() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    // Answers take a second: time enough to take the replicas away while they are held.
    let sink = start_sink(&pki, sink::delayed(Duration::from_secs(1))).await;
    let ids: BTreeSet<String> = (0..8).map(|i| format!("held-{i}")).collect();
    let items: Vec<String> = ids.iter().map(|id| message(id)).collect();
    enqueue(&redis, Q, &items).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-held",
        &[("WORKER_CONCURRENCY", "8"), ("WORKER_BREAKER", "false")],
    )
    .await;
    let processing = keys().processing("w-held");
    eventually(|| async { len(&redis, &processing).await == ids.len() }).await;
    let set = |n: &str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("min-replicas-to-write")
            .arg(n)
            .clone()
    };
    let mut conn = redis.conn().await;
    let _: () = set("1").query_async(&mut conn).await.expect("CONFIG SET");
    assert!(
        sink.record.delivered().is_empty(),
        "no answer came before the replicas were taken away: the test proves nothing otherwise"
    );
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == ids.len()).await);

    eventually(|| async { get(&worker.url("/ready")).await.0 == 503 }).await;
    assert_eq!(
        len(&redis, &processing).await,
        ids.len(),
        "every delivered message is held in processing, none lost"
    );

    let _: () = set("0").query_async(&mut conn).await.expect("CONFIG SET");
    eventually(|| async { len(&redis, &processing).await == 0 }).await;
    eventually(|| async { get(&worker.url("/ready")).await.0 == 200 }).await;
    worker.stop().await;
    let delivered = sink.record.delivered();
    assert_eq!(delivered.len(), ids.len(), "each delivered once: {delivered:?}");
    assert_eq!(delivered.into_iter().collect::<BTreeSet<_>>(), ids);
    for key in [Q.to_string(), keys().retry, keys().dead] {
        assert_eq!(len(&redis, &key).await, 0, "{key} ends empty");
    }
}
