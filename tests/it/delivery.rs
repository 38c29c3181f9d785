//! Claim, deliver and settle, against a real redis-server and the real mTLS reference server.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use courier::devtools::sink::{self, Endpoint, Reply};

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

#[tokio::test]
async fn delivers_a_batch_in_fifo_order_with_the_contract_body_and_headers() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let expected = ids("fifo", 40);
    enqueue(&redis, Q, &expected.iter().map(|id| message(id)).collect::<Vec<_>>()).await;

    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-fifo",
        &[("WORKER_CONCURRENCY", "1"), ("WORKER_BATCH_SIZE", "10")],
    )
    .await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == 40).await,
        "all 40 delivered"
    );
    assert_eq!(sink.record.delivered(), expected, "delivered in the order enqueued");

    let first = &sink.record.deliveries()[0];
    assert_eq!(first.idempotency_key.as_deref(), Some("fifo-0000"));
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.body["worker_id"], "w-fifo");
    assert_eq!(first.body["attempt"], 1);
    assert_eq!(first.body["payload"], serde_json::json!({"n": "fifo-0000"}));
    assert!(
        first.client.contains("worker-test"),
        "the worker presented its certificate: {}",
        first.client
    );
    assert!(sink.record.statuses().is_empty(), "no status update after a success");

    worker.stop().await;
    assert_eq!(len(&redis, Q).await, 0);
    assert_eq!(
        len(&redis, &keys().processing("w-fifo")).await,
        0,
        "every delivered message was acked"
    );
}

#[tokio::test]
async fn never_claims_more_than_there_are_free_slots() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    // Each delivery is held 2 s by the server, so while three are held no slot is free.
    let slow: sink::Behaviour = Arc::new(move |call| {
        let _ = arrived.send(call.message_id.clone());
        Reply {
            delay: Duration::from_secs(2),
            ..Reply::status(200)
        }
    });
    let sink = start_sink(&pki, slow).await;
    enqueue(
        &redis,
        Q,
        &ids("slot", 10).iter().map(|id| message(id)).collect::<Vec<_>>(),
    )
    .await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-slots",
        &[("WORKER_CONCURRENCY", "3"), ("WORKER_BATCH_SIZE", "10")],
    )
    .await;

    for _ in 0..3 {
        tokio::time::timeout(WAIT, arrivals.recv())
            .await
            .expect("a delivery arrives");
    }
    assert_eq!(
        len(&redis, &keys().processing("w-slots")).await,
        3,
        "claimed only as many as there are slots"
    );
    assert_eq!(len(&redis, Q).await, 7, "the rest wait in the queue, not in the worker");
    worker.stop().await;
    assert_eq!(sink.record.delivered().len() + len(&redis, Q).await, 10);
}

#[tokio::test]
async fn retries_503_then_delivers_with_attempt_counts_and_status_updates() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::fail_first(2, 503)).await;
    enqueue(&redis, Q, &[message("retry-me")]).await;
    let worker = worker_on(&redis, &sink, &pki, "w-retry", &[]).await;

    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == 1 && r.statuses().len() == 2)
            .await
    );
    let attempts: Vec<u64> = sink.record.deliveries().iter().map(|c| c.attempt).collect();
    assert_eq!(
        attempts,
        [1, 2, 3],
        "attempt_count was incremented in Redis between tries"
    );
    let statuses: Vec<(String, u64, String)> = sink
        .record
        .statuses()
        .iter()
        .map(|c| {
            (
                c.body["status"].as_str().unwrap_or("").to_string(),
                c.attempt,
                c.body["error_message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(statuses[0].0, "queued");
    assert_eq!(statuses[0].1, 1);
    assert!(
        statuses[0].2.contains("503"),
        "error message names the status: {}",
        statuses[0].2
    );
    assert_eq!((statuses[1].0.as_str(), statuses[1].1), ("queued", 2));
    assert!(sink.record.statuses().iter().all(|c| c.message_id == "retry-me"));

    worker.stop().await;
    assert_eq!(len(&redis, &keys().retry).await, 0);
    assert_eq!(len(&redis, &keys().dead).await, 0);
}

#[tokio::test]
async fn a_longer_retry_after_wins_over_the_retry_interval() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let behaviour: sink::Behaviour = Arc::new(|call| match call.attempt {
        1 => Reply {
            retry_after: Some(1),
            ..Reply::status(429)
        },
        _ => Reply::status(200),
    });
    let sink = start_sink(&pki, behaviour).await;
    enqueue(&redis, Q, &[message("later")]).await;
    let worker = worker_on(&redis, &sink, &pki, "w-later", &[]).await;

    assert!(sink.wait_for(WAIT, |r| !r.deliveries().is_empty()).await);
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 1).await);
    let attempts = sink.record.deliveries();
    // Arrival times taken by the server itself: the retry was due 1 s after the first answer.
    let gap = attempts[1].arrived - attempts[0].arrived;
    assert!(
        gap >= Duration::from_secs(1),
        "waited {gap:?}, Retry-After said 1 s (interval 0.2 s)"
    );
    worker.stop().await;
}

#[tokio::test]
async fn dead_letters_at_max_attempts_keeping_every_other_byte() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, Arc::new(|_| Reply::status(503))).await;
    let original = r#"{"message_id":"doomed", "extra": [1.50, "x"],  "payload":{"k":true}}"#;
    enqueue(&redis, Q, &[original.to_string()]).await;
    let worker = worker_on(&redis, &sink, &pki, "w-max", &[("WORKER_MAX_ATTEMPTS", "3")]).await;

    assert!(
        sink.wait_for(WAIT, |r| r.statuses().iter().any(|c| c.body["status"] == "failed"))
            .await
    );
    assert_eq!(sink.record.deliveries().len(), 3, "exactly max_attempts tries");
    let statuses: Vec<(String, u64)> = sink
        .record
        .statuses()
        .iter()
        .map(|c| (c.body["status"].as_str().unwrap_or("").to_string(), c.attempt))
        .collect();
    // The server fails the status updates too: after the first, they wait for a probe, and
    // the latest status of the message wins (attempt 2's "queued" gave way to "failed").
    assert_eq!(statuses, [("queued".to_string(), 1), ("failed".to_string(), 3)]);

    worker.stop().await;
    let dead = dead_letters(&redis, Q).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["reason"], "exhausted");
    assert_eq!(dead[0]["message_id"], "doomed");
    assert!(dead[0]["error"].as_str().unwrap_or("").contains("503"));
    // The retried copies carry the trace courier started for the message, in the dead letter too.
    let kept: serde_json::Value = serde_json::from_str(dead[0]["message"].as_str().unwrap()).unwrap();
    let traceparent = kept["traceparent"].as_str().unwrap_or_default();
    assert!(traceparent.contains(dead[0]["trace_id"].as_str().unwrap()), "{kept}");
    assert_eq!(
        dead[0]["message"],
        format!(
            r#"{{"attempt_count":3,"traceparent":"{traceparent}",{}"#,
            &original[1..]
        ),
        "only attempt_count changed, and a traceparent was added"
    );
    assert_eq!(len(&redis, &keys().retry).await + len(&redis, Q).await, 0);
}

#[tokio::test]
async fn dead_letters_a_400_at_once() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, Arc::new(|_| Reply::status(400))).await;
    enqueue(&redis, Q, &[message("bad-request")]).await;
    let worker = worker_on(&redis, &sink, &pki, "w-400", &[]).await;

    assert!(sink.wait_for(WAIT, |r| r.statuses().len() == 1).await);
    let status = &sink.record.statuses()[0];
    assert_eq!(status.body["status"], "failed");
    assert_eq!(status.body["attempt_count"], 1);
    worker.stop().await;
    assert_eq!(sink.record.deliveries().len(), 1, "a permanent 4xx is not retried");
    let dead = dead_letters(&redis, Q).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["reason"], "rejected");
    assert!(dead[0]["error"].as_str().unwrap_or("").contains("400"));
}

#[tokio::test]
async fn malformed_items_are_dead_lettered_while_good_ones_keep_flowing() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let huge = format!(r#"{{"message_id":"huge","payload":"{}"}}"#, "x".repeat(2000));
    let bad = [
        "not json at all".to_string(),
        r#"{"id":"no-message-id"}"#.to_string(),
        huge.clone(),
    ];
    let mut items = Vec::new();
    for (i, id) in ids("good", 9).iter().enumerate() {
        items.push(message(id));
        if i % 3 == 0 {
            items.push(bad[i / 3].clone());
        }
    }
    enqueue(&redis, Q, &items).await;
    let worker = worker_on(&redis, &sink, &pki, "w-bad", &[("WORKER_MAX_MESSAGE_BYTES", "1024")]).await;

    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == 9).await,
        "good messages all delivered"
    );
    worker.stop().await;
    // Oversized items are moved aside by the claim itself, so they may die before items
    // claimed ahead of them: compare in the order of `bad`.
    let mut dead = dead_letters(&redis, Q).await;
    let order = |d: &serde_json::Value| bad.iter().position(|b| d["message"].as_str() == Some(b.as_str()));
    dead.sort_by_key(order);
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap_or("")).collect();
    assert_eq!(reasons, ["invalid_json", "invalid_message_id", "too_large"]);
    for (record, original) in dead.iter().zip(&bad) {
        assert_eq!(
            record["message"].as_str(),
            Some(original.as_str()),
            "original bytes kept"
        );
        assert!(!record["error"].as_str().unwrap_or("").is_empty());
    }
    assert_eq!(len(&redis, &keys().processing("w-bad")).await, 0);
}

#[tokio::test]
async fn metrics_expose_the_seed_names_with_values_from_a_known_run() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let behaviour: sink::Behaviour = Arc::new(|call| match (call.endpoint, call.message_id.as_str(), call.attempt) {
        (Endpoint::Deliver, "flaky", 1) => Reply::status(503),
        (Endpoint::Deliver, "refused", _) => Reply::status(400),
        _ => Reply::status(200),
    });
    let sink = start_sink(&pki, behaviour).await;
    let mut items: Vec<String> = ids("ok", 5).iter().map(|id| message(id)).collect();
    items.push(message("flaky"));
    items.push(message("refused"));
    items.push("garbage".to_string());
    enqueue(&redis, Q, &items).await;
    let worker = worker_on(&redis, &sink, &pki, "w-metrics", &[]).await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == 6 && r.statuses().len() == 2)
            .await
    );
    eventually(|| async { len(&redis, &keys().dead).await == 2 }).await;

    let (status, text) = get(&worker.url("/metrics")).await;
    assert_eq!(status, 200);
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    };
    let w = r#"worker_id="w-metrics""#;
    let q = r#"queue="message_queue""#;
    assert_eq!(value(&format!("worker_messages_delivered_total{{{q},{w}}}")), 6.0);
    assert_eq!(value(&format!("worker_messages_retried_total{{{q},{w}}}")), 1.0);
    assert_eq!(
        value(&format!(r#"worker_messages_failed_total{{{q},reason="http_5xx",{w}}}"#)),
        1.0
    );
    assert_eq!(
        value(&format!(r#"worker_messages_failed_total{{{q},reason="http_4xx",{w}}}"#)),
        1.0
    );
    assert_eq!(
        value(&format!("worker_messages_processed_total{{{q},{w}}}")),
        9.0,
        "6 delivered + 1 retried + 2 dead"
    );
    assert_eq!(
        value(&format!("worker_delivery_duration_seconds_count{{{q},{w}}}")),
        8.0
    );
    assert_eq!(
        value(&format!("worker_queue_wait_seconds_count{{{q},{w}}}")),
        7.0,
        "first attempts of messages with queued_at"
    );
    assert_eq!(value(&format!("worker_processing_messages{{{w}}}")), 0.0);
    assert_eq!(
        value(&format!(r#"worker_dead_letters_total{{{q},reason="rejected",{w}}}"#)),
        1.0
    );
    assert_eq!(
        value(&format!(
            r#"worker_dead_letters_total{{{q},reason="invalid_json",{w}}}"#
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            r#"worker_invalid_messages_total{{{q},reason="invalid_json",{w}}}"#
        )),
        1.0
    );
    assert_eq!(value(&format!(r#"worker_responses_total{{class="2xx",{q},{w}}}"#)), 6.0);
    assert_eq!(value(&format!(r#"worker_responses_total{{class="5xx",{q},{w}}}"#)), 1.0);
    assert_eq!(value(&format!(r#"worker_responses_total{{class="4xx",{q},{w}}}"#)), 1.0);
    assert_eq!(value(&format!("worker_redis_up{{{w}}}")), 1.0);
    assert_eq!(value(&format!("worker_active_workers{{{q},{w}}}")), 1.0);
    for (name, kind) in [
        ("worker_messages_processed_total", "counter"),
        ("worker_messages_delivered_total", "counter"),
        ("worker_messages_failed_total", "counter"),
        ("worker_messages_retried_total", "counter"),
        ("worker_delivery_duration_seconds", "histogram"),
        ("worker_queue_wait_seconds", "histogram"),
        ("worker_active_workers", "gauge"),
        ("worker_processing_messages", "gauge"),
        ("worker_queue_depth", "gauge"),
        ("worker_client_cert_expiry_timestamp_seconds", "gauge"),
    ] {
        assert!(text.contains(&format!("# TYPE {name} {kind}")), "{name} is a {kind}");
    }
    assert!(
        value(&format!("worker_client_cert_expiry_timestamp_seconds{{{w}}}")) > chrono::Utc::now().timestamp() as f64
    );

    let (status, stats) = get(&worker.url("/stats")).await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats is JSON");
    assert_eq!(stats["depths"]["dead"], 2);
    assert_eq!(stats["depths"]["ready"], 0);
    assert_eq!(stats["counters"]["delivered"], 6);
    assert_eq!(stats["workers"][0]["worker_id"], "w-metrics");
    let (status, health) = get(&worker.url("/health")).await;
    assert_eq!(status, 200);
    assert!(health.contains(r#""status":"ok""#));
    assert_eq!(get(&worker.url("/ready")).await.0, 200);
    assert_eq!(get(&worker.url("/nope")).await.0, 404);
    worker.stop().await;
}

#[tokio::test]
async fn ready_is_503_until_redis_answers_and_health_stays_200() {
    let pki = Pki::new();
    let sink = start_sink(&pki, sink::always_ok()).await;
    let mut redis = RedisServer::start().await;
    redis.kill().await;
    let worker = worker_on(&redis, &sink, &pki, "w-noredis", &[]).await;
    let (status, body) = get(&worker.url("/ready")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("Redis"), "{body}");
    assert_eq!(get(&worker.url("/health")).await.0, 200);

    redis.restart().await;
    enqueue(&redis, Q, &[message("after-redis")]).await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == 1).await,
        "the worker connected on its own"
    );
    assert_eq!(get(&worker.url("/ready")).await.0, 200);
    worker.stop().await;
}

#[tokio::test]
async fn disabling_metrics_opens_no_port() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-nometrics",
        &[("WORKER_METRICS_ENABLED", "false")],
    )
    .await;
    assert!(worker.admin.is_none());
    enqueue(&redis, Q, &[message("still-works")]).await;
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 1).await);
    worker.stop().await;
}

#[tokio::test]
async fn speaks_http2_only_when_asked_and_the_server_offers_it() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let offers_both = start_sink(&pki, sink::always_ok()).await;
    let http1_only = sink::Sink::start(
        "127.0.0.1:0".parse().unwrap(),
        &sink::SinkTls {
            http2: false,
            ..pki.sink_tls()
        },
        sink::always_ok(),
    )
    .await
    .expect("sink");

    // (server, MAIN_SERVER_HTTP2, the protocol the deliveries must arrive in)
    let cases = [
        (&offers_both, "false", hyper::Version::HTTP_11),
        (&offers_both, "true", hyper::Version::HTTP_2),
        (&http1_only, "true", hyper::Version::HTTP_11),
    ];
    for (n, (server, http2, expected)) in cases.into_iter().enumerate() {
        let before = server.record.delivered().len();
        let batch = ids(&format!("h{n}"), 20);
        enqueue(&redis, Q, &batch.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
        let worker = worker_on(
            &redis,
            server,
            &pki,
            &format!("w-h{n}"),
            &[("WORKER_CONCURRENCY", "8"), ("MAIN_SERVER_HTTP2", http2)],
        )
        .await;
        assert!(
            server.wait_for(WAIT, |r| r.delivered().len() == before + 20).await,
            "case {n}: all 20 delivered"
        );
        worker.stop().await;
        let versions: Vec<_> = server.record.deliveries()[before..].iter().map(|c| c.version).collect();
        assert!(
            versions.iter().all(|v| *v == expected),
            "case {n}: MAIN_SERVER_HTTP2={http2} gave {versions:?}, expected {expected:?}"
        );
    }
}

/// A kept connection that the server has closed since its last answer is not used for the
/// next message: every message is delivered at its first attempt, with no failure reported.
/// Over HTTP/1.1 (a pool of connections) and HTTP/2 (one shared connection).
#[tokio::test]
async fn a_kept_connection_the_server_closed_costs_no_attempt() {
    for http2 in ["false", "true"] {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        let sink = start_sink(&pki, sink::always_ok()).await;
        let first = ids("before", 20);
        enqueue(&redis, Q, &first.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
        let settings = [("WORKER_CONCURRENCY", "4"), ("MAIN_SERVER_HTTP2", http2)];
        let worker = worker_on(&redis, &sink, &pki, "w-kept", &settings).await;
        assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 20).await);

        // The server closes every open connection (as one does after its keep-alive timeout).
        sink.replace_tls(&pki.sink_tls()).expect("same TLS");
        let second = ids("after", 20);
        enqueue(&redis, Q, &second.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
        assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 40).await);

        let deliveries = sink.record.deliveries();
        let attempts: Vec<u64> = deliveries
            .iter()
            .map(|d| d.body["attempt"].as_u64().unwrap_or(0))
            .collect();
        assert!(
            attempts.iter().all(|a| *a == 1),
            "HTTP/2 {http2}: every delivery a first attempt: {attempts:?}"
        );
        assert_eq!(
            attempts.len(),
            40,
            "HTTP/2 {http2}: no delivery failed on a closed connection"
        );
        assert!(
            sink.record.statuses().is_empty(),
            "HTTP/2 {http2}: no failure to report"
        );
        let expected = if http2 == "true" {
            hyper::Version::HTTP_2
        } else {
            hyper::Version::HTTP_11
        };
        assert!(deliveries.iter().all(|d| d.version == expected), "HTTP/2 {http2}");
        worker.stop().await;
    }
}
