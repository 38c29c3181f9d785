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
        let worker = worker_on(
            &redis,
            &sink,
            &pki,
            worker_id,
            &[
                ("WORKER_RETRY_INTERVAL", "20"),
                ("WORKER_RETRY_JITTER", jitter),
                // Every first attempt fails: the breaker would take it for an outage.
                ("WORKER_BREAKER", "false"),
                ("WORKER_CONCURRENCY", "50"),
                ("WORKER_BATCH_SIZE", "50"),
            ],
        )
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
    let poison = message("poison");
    enqueue(&redis, Q, &[poison.clone(), message("fine-1"), message("fine-2")]).await;
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
    assert_eq!(raw[0].message, poison.as_bytes(), "kept byte for byte");
    for key in [
        Q.to_string(),
        keys().retry,
        keys().processing("w-poison"),
        keys().reclaims,
    ] {
        assert_eq!(len(&redis, &key).await, 0, "{key} ends empty");
    }
}

mod slow {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::common::*;
    use courier::devtools::sink::{self, Reply};

    #[tokio::test]
    async fn a_forty_second_outage_costs_few_requests_and_no_attempts_or_messages() {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        let down = Arc::new(AtomicBool::new(true));
        let answer = down.clone();
        let sink = start_sink(
            &pki,
            Arc::new(move |_: &sink::Call| match answer.load(Ordering::Acquire) {
                true => Reply::status(503),
                false => Reply::status(200),
            }),
        )
        .await;
        let ids: Vec<String> = (0..2000).map(|i| format!("outage-{i}")).collect();
        enqueue(&redis, Q, &ids.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
        let outage = Instant::now();
        let worker = worker_on(
            &redis,
            &sink,
            &pki,
            "w-outage",
            &[
                ("WORKER_RETRY_INTERVAL", "1"),
                ("WORKER_MAX_ATTEMPTS", "20"),
                ("WORKER_CONCURRENCY", "16"),
            ],
        )
        .await;
        // The breaker opens: /ready says so, and the gauge.
        eventually(|| async {
            let (status, body) = get(&worker.url("/ready")).await;
            status == 503 && body.contains("circuit open")
        })
        .await;
        let (_, metrics) = get(&worker.url("/metrics")).await;
        assert!(
            metrics.contains(r#"worker_circuit_state{worker_id="w-outage"} 2"#),
            "{metrics}"
        );
        tokio::time::sleep(Duration::from_secs(40).saturating_sub(outage.elapsed())).await;
        down.store(false, Ordering::Release);
        let during = sink.record.calls().len();
        eprintln!("outage[requests during 40 s: {during}]");
        assert!(during <= 300, "{during} requests reached the failing server");

        // A probe finds the server back; everything is delivered, nothing used up its attempts.
        assert!(
            sink.wait_for(Duration::from_secs(90), |r| {
                let seen: std::collections::BTreeSet<String> = r.delivered().into_iter().collect();
                seen.len() == ids.len()
            })
            .await,
            "every message delivered after the outage"
        );
        let (_, metrics) = get(&worker.url("/metrics")).await;
        assert!(
            metrics.contains(r#"worker_circuit_state{worker_id="w-outage"} 0"#),
            "{metrics}"
        );
        assert_eq!(get(&worker.url("/ready")).await.0, 200);
        worker.stop().await;
        assert!(dead_letters(&redis, Q).await.is_empty(), "nothing dead");
        for key in [Q.to_string(), keys().retry, keys().processing("w-outage")] {
            assert_eq!(len(&redis, &key).await, 0, "{key} ends empty");
        }
        let most_attempts = sink.record.deliveries().iter().map(|c| c.attempt).max().unwrap_or(0);
        eprintln!("outage[highest attempt: {most_attempts}]");
        assert!(
            most_attempts <= 3,
            "the outage used at most a couple of attempts: {most_attempts}"
        );
    }

    #[tokio::test]
    async fn the_rate_limit_holds_within_ten_percent_over_five_seconds() {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        let sink = start_sink(&pki, sink::always_ok()).await;
        let items: Vec<String> = (0..900).map(|i| message(&format!("rate-{i}"))).collect();
        enqueue(&redis, Q, &items).await;
        let worker = worker_on(
            &redis,
            &sink,
            &pki,
            "w-rate",
            &[("WORKER_RATE_LIMIT", "100"), ("WORKER_CONCURRENCY", "32")],
        )
        .await;
        assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 700).await);
        worker.stop().await;
        let arrivals: Vec<std::time::Instant> = sink.record.deliveries().iter().map(|c| c.arrived).collect();
        let first = *arrivals.iter().min().expect("deliveries");
        // Five seconds, starting one second in (past the bucket's first token).
        let from = first + std::time::Duration::from_secs(1);
        let to = from + std::time::Duration::from_secs(5);
        let in_window = arrivals.iter().filter(|at| **at >= from && **at < to).count();
        eprintln!("rate[{in_window} deliveries in 5 s at WORKER_RATE_LIMIT=100]");
        assert!(
            (450..=550).contains(&in_window),
            "{in_window} in 5 s, expected 500 ± 10%"
        );
    }
}

#[tokio::test]
async fn adaptive_concurrency_backs_off_on_429s_and_delivers_everything() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    // Every tenth message's first attempt is refused as too many requests.
    let sink = start_sink(
        &pki,
        std::sync::Arc::new(|call: &sink::Call| match call.endpoint {
            sink::Endpoint::Deliver if call.attempt == 1 && call.message_id.ends_with('0') => sink::Reply::status(429),
            _ => sink::Reply::status(200),
        }),
    )
    .await;
    // 1,000 good answers alone would take the limit from 8 to the full 32.
    let items: Vec<String> = (0..1000).map(|i| message(&format!("aimd-{i}"))).collect();
    enqueue(&redis, Q, &items).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-aimd",
        &[("WORKER_ADAPTIVE_CONCURRENCY", "true"), ("WORKER_CONCURRENCY", "32")],
    )
    .await;
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 1000).await);
    let (_, metrics) = get(&worker.url("/metrics")).await;
    let limit: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"worker_concurrency_limit{worker_id="w-aimd"} "#))
        .and_then(|v| v.parse().ok())
        .expect("the limit is exported");
    worker.stop().await;
    assert!(
        (1.0..32.0).contains(&limit),
        "the 429s kept it under the concurrency: {limit}"
    );
}

#[tokio::test]
async fn a_503_with_retry_after_pauses_the_whole_worker_not_only_that_message() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(
        &pki,
        std::sync::Arc::new(|call: &sink::Call| match call.endpoint {
            sink::Endpoint::Deliver if call.message_id == "slow-down" && call.attempt == 1 => sink::Reply {
                retry_after: Some(2),
                ..sink::Reply::status(503)
            },
            _ => sink::Reply::status(200),
        }),
    )
    .await;
    let mut items = vec![message("slow-down")];
    items.extend((0..10).map(|i| message(&format!("after-{i}"))));
    enqueue(&redis, Q, &items).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-pause",
        &[("WORKER_CONCURRENCY", "1"), ("WORKER_BATCH_SIZE", "1")],
    )
    .await;
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 11).await);
    worker.stop().await;
    let calls = sink.record.deliveries();
    let refused = calls.iter().find(|c| c.answered == 503).expect("the 503").arrived;
    let next = calls
        .iter()
        .filter(|c| c.arrived > refused)
        .map(|c| c.arrived)
        .min()
        .expect("deliveries after it");
    let gap = next.duration_since(refused);
    assert!(
        gap >= std::time::Duration::from_millis(1900),
        "the next delivery came {gap:?} after the Retry-After: 2"
    );
}
