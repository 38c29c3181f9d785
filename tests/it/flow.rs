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
