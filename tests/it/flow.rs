//! When the main server struggles: retries spread out, the circuit breaker, rate limits and
//! poison messages.

use crate::common::*;
use courier::devtools::sink;
use redis::AsyncCommands;

/// The spread of due times (ms) in the retry set once `n` messages wait there.
async fn due_spread(redis: &RedisServer, n: usize) -> f64 {
    eventually(|| async { len(redis, &keys().retry).await == n }).await;
    let due: Vec<(String, f64)> = redis
        .conn()
        .await
        .zrange_withscores(keys().retry, 0, -1)
        .await
        .expect("ZRANGE");
    let (min, max) = due
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), (_, at)| (lo.min(*at), hi.max(*at)));
    max - min
}

#[tokio::test]
async fn jitter_spreads_the_due_times_of_a_batch_that_failed_together() {
    for (jitter, worker_id) in [("0", "w-nojitter"), ("0.5", "w-jitter")] {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        let sink = start_sink(&pki, sink::fail_first(1, 503)).await;
        let items: Vec<String> = (0..50).map(|i| message(&format!("j-{i}"))).collect();
        enqueue(&redis, Q, &items).await;
        let worker = start_worker(&env(
            &redis,
            &sink.url(),
            &pki,
            worker_id,
            &[
                ("WORKER_RETRY_INTERVAL", "20"),
                ("WORKER_RETRY_JITTER", jitter),
                ("WORKER_CONCURRENCY", "50"),
                ("WORKER_BATCH_SIZE", "50"),
            ],
        ))
        .await;
        let spread = due_spread(&redis, 50).await;
        worker.stop().await;
        if jitter == "0" {
            assert!(spread < 2_000.0, "without jitter the batch stays together: {spread} ms");
        } else {
            // ±50% of 20 s: 50 draws spread over far more than 4 s.
            assert!(spread > 4_000.0, "with jitter 0.5 the batch spreads: {spread} ms");
        }
    }
}

#[tokio::test]
async fn a_message_the_worker_dies_on_is_dead_lettered_as_poisoned_after_max_reclaims() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    // The main server holds the poison message's request; while it does, the test kills the
    // worker, as a message that crashes the process would.
    let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
    let seen = arrived.clone();
    let sink = start_sink(
        &pki,
        std::sync::Arc::new(move |call: &sink::Call| {
            if call.message_id == "poison" && call.endpoint == sink::Endpoint::Deliver {
                seen.notify_one();
                return sink::Reply {
                    delay: std::time::Duration::from_secs(600),
                    ..sink::Reply::status(200)
                };
            }
            sink::Reply::status(200)
        }),
    )
    .await;
    enqueue(&redis, Q, &[message("poison"), message("fine-1"), message("fine-2")]).await;
    let vars = env(
        &redis,
        &sink.url(),
        &pki,
        "w-poison",
        &[
            ("WORKER_MAX_RECLAIMS", "2"),
            ("WORKER_CONCURRENCY", "1"),
            ("WORKER_BATCH_SIZE", "1"),
        ],
    );
    // Killed holding it three times: each restart returns it, counted.
    for _ in 0..3 {
        let mut worker = spawn_worker(&vars, pki.dir.path());
        tokio::time::timeout(WAIT, arrived.notified())
            .await
            .expect("the poison message arrives");
        worker.kill().await.expect("SIGKILL");
    }
    let worker = spawn_worker(&vars, pki.dir.path());
    eventually(|| async { len(&redis, &keys().dead).await == 1 }).await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == 2).await,
        "the others are delivered"
    );
    stop_worker(worker).await;
    let dead = dead_letters(&redis, Q).await;
    assert_eq!(dead[0]["reason"], "poisoned");
    assert_eq!(dead[0]["reclaims"], 3);
    let raw = raw_dead_letters(&redis, Q).await;
    assert_eq!(raw[0].message, message("poison").as_bytes(), "kept byte for byte");
    for key in [
        Q.to_string(),
        keys().retry,
        keys().processing("w-poison"),
        keys().reclaims,
    ] {
        assert_eq!(len(&redis, &key).await, 0, "{key} ends empty");
    }
}
