//! Several queues: strict priority, retries and dead letters kept per queue, round-robin
//! shards, and the operator commands' `--queue`.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use courier::devtools::sink::{self, Endpoint, Reply};
use courier::queue::Keys;

const QUEUES: [&str; 3] = ["jobs.high", "jobs.medium", "jobs.low"];

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn messages(ids: &[String]) -> Vec<String> {
    ids.iter().map(|id| message(id)).collect()
}

/// Every key of every queue is empty.
async fn all_empty(redis: &RedisServer, worker_id: &str) {
    for queue in QUEUES {
        for key in Keys::new(queue).all(worker_id) {
            // The live set, the id holders and the queue's clock are not messages.
            if key.ends_with(":workers") || key.ends_with(":owners") || key.ends_with(":clock") {
                continue;
            }
            assert_eq!(len(redis, &key).await, 0, "{key} is empty");
        }
    }
}

#[tokio::test]
async fn a_burst_on_the_high_queue_overtakes_a_backlog_on_the_low_one() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    // Each delivery takes a moment, so the low backlog lasts a few seconds.
    let sink = start_sink(&pki, sink::delayed(Duration::from_millis(2))).await;
    let low = ids("low", 2000);
    enqueue(&redis, "jobs.low", &messages(&low)).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-prio",
        &[("REDIS_QUEUE_NAMES", &QUEUES.join(",")), ("WORKER_CONCURRENCY", "8")],
    )
    .await;
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 200).await);
    let high = ids("high", 100);
    enqueue(&redis, "jobs.high", &messages(&high)).await;
    let lows_before_push = sink.record.delivered().len();
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == low.len() + high.len())
            .await,
        "everything delivered"
    );
    let delivered = sink.record.delivered();
    let last_high = delivered
        .iter()
        .rposition(|id| id.starts_with("high-"))
        .expect("highs delivered");
    let lows_before_last_high = delivered[..last_high]
        .iter()
        .filter(|id| id.starts_with("low-"))
        .count();
    let overtaken_by = lows_before_last_high.saturating_sub(lows_before_push);
    assert!(
        overtaken_by <= 40,
        "{overtaken_by} low messages went before the last high one after the burst"
    );
    worker.stop().await;
    all_empty(&redis, "w-prio").await;
}

#[tokio::test]
async fn each_queue_keeps_its_own_retries_and_dead_letters() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    // First attempts fail (retried on their own queue); `reject-*` is refused for good.
    let sink = start_sink(
        &pki,
        Arc::new(|call: &sink::Call| match call.endpoint {
            Endpoint::Deliver if call.message_id.starts_with("reject") => Reply::status(422),
            Endpoint::Deliver if call.attempt == 1 => Reply::status(503),
            _ => Reply::status(200),
        }),
    )
    .await;
    enqueue(&redis, "jobs.medium", &messages(&ids("medium", 20))).await;
    enqueue(&redis, "jobs.low", &messages(&ids("low", 20))).await;
    enqueue(&redis, "jobs.low", &[message("reject-low")]).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-own",
        &[
            ("REDIS_QUEUE_NAMES", &QUEUES.join(",")),
            ("WORKER_RETRY_INTERVAL", "0.5"),
            // Every first attempt fails, which the breaker would take for an outage.
            ("WORKER_BREAKER", "false"),
        ],
    )
    .await;
    // While the retries wait, each is in the retry set of the queue it came from.
    eventually(|| async {
        len(&redis, &Keys::new("jobs.medium").retry).await + len(&redis, &Keys::new("jobs.low").retry).await == 40
    })
    .await;
    assert_eq!(len(&redis, &Keys::new("jobs.medium").retry).await, 20);
    assert_eq!(len(&redis, &Keys::new("jobs.low").retry).await, 20);
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 40).await);
    let dead = dead_letters(&redis, "jobs.low").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["message_id"], "reject-low");
    assert!(dead_letters(&redis, "jobs.medium").await.is_empty());

    // Metrics and /stats carry the queue.
    let (_, metrics) = get(&worker.url("/metrics")).await;
    for (queue, n) in [("jobs.high", 0), ("jobs.medium", 20), ("jobs.low", 20)] {
        let series = format!(r#"worker_messages_delivered_total{{queue="{queue}",worker_id="w-own"}} {n}"#);
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
    assert!(metrics.contains(r#"worker_dead_letters_total{queue="jobs.low",reason="rejected",worker_id="w-own"} 1"#));
    let (_, stats) = get(&worker.url("/stats")).await;
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("JSON");
    assert_eq!(stats["queues"], serde_json::json!(QUEUES));
    let detail = stats["queues_detail"].as_array().expect("per queue");
    assert_eq!(detail.len(), 3);
    assert_eq!(detail[2]["queue"], "jobs.low");
    assert_eq!(detail[2]["depths"]["dead"], 1);

    // The operator commands take --queue; with several queues and none named, they ask.
    let vars = env(
        &redis,
        &sink.url(),
        &pki,
        "w-cli",
        &[("REDIS_QUEUE_NAMES", &QUEUES.join(","))],
    );
    let dir = pki.dir.path();
    let listed = run_courier(&vars, dir, &["dlq", "list", "--queue", "jobs.low"]).await;
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains("reject-low"));
    let ambiguous = run_courier(&vars, dir, &["dlq", "list"]).await;
    assert!(!ambiguous.status.success());
    assert!(String::from_utf8_lossy(&ambiguous.stderr).contains("--queue"));
    let requeued = run_courier(&vars, dir, &["dlq", "purge", "--all", "--yes", "--queue", "jobs.low"]).await;
    assert!(requeued.status.success());
    let stats = run_courier(&vars, dir, &["stats", "--json", "--queue", "jobs.medium"]).await;
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("stats JSON");
    assert_eq!(stats["queue"], "jobs.medium");
    worker.stop().await;
    all_empty(&redis, "w-own").await;
}

#[tokio::test]
async fn round_robin_takes_shards_in_turn() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let shards = ["orders.0", "orders.1"];
    enqueue(&redis, shards[0], &messages(&ids("zero", 300))).await;
    enqueue(&redis, shards[1], &messages(&ids("one", 300))).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-rr",
        &[
            ("REDIS_QUEUE_NAMES", &shards.join(",")),
            ("REDIS_QUEUE_ORDER", "round_robin"),
            ("WORKER_CONCURRENCY", "4"),
            ("WORKER_BATCH_SIZE", "4"),
        ],
    )
    .await;
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 600).await);
    // Both shards drain together: the first half of the deliveries holds plenty of each.
    let delivered = sink.record.delivered();
    let ones_in_first_half = delivered[..300].iter().filter(|id| id.starts_with("one-")).count();
    assert!(
        (100..=200).contains(&ones_in_first_half),
        "{ones_in_first_half} of the first 300 from the second shard"
    );
    worker.stop().await;
    for shard in shards {
        assert_eq!(len(&redis, shard).await, 0);
    }
}
