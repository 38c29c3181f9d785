//! A main server between 0% and 100%: partly failing, failing first attempts, dying after heavy
//! success, rejecting everything after a bad deploy, failing one message forever. The breaker
//! must stop for a dead server and keep delivering to a struggling one; nothing is lost and
//! nothing dies that the server would have taken.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use courier::devtools::sink::{self, Behaviour, Call, Endpoint, Reply};

/// What one run of a worker until every message was delivered came to.
struct Drained {
    took: Duration,
    dead: usize,
    /// Messages delivered more than once.
    duplicates: usize,
}

/// Counts deliveries the sink answered 200, so a long run waits on a number, not on a scan
/// of every call.
fn counting(behaviour: Behaviour) -> (Behaviour, Arc<AtomicUsize>) {
    let delivered = Arc::new(AtomicUsize::new(0));
    let count = delivered.clone();
    let counted: Behaviour = Arc::new(move |call: &Call| {
        let reply = behaviour(call);
        if call.endpoint == Endpoint::Deliver && reply.status == 200 {
            count.fetch_add(1, Ordering::Relaxed);
        }
        reply
    });
    (counted, delivered)
}

/// Enqueues `n` messages, runs one worker with `extra` until all are delivered (at most
/// `limit`), and checks every key ends empty.
async fn drain(name: &str, behaviour: Behaviour, n: usize, extra: &[(&str, &str)], limit: Duration) -> Drained {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let (behaviour, delivered) = counting(behaviour);
    let sink = start_sink(&pki, behaviour).await;
    let ids: Vec<String> = (0..n).map(|i| format!("{name}-{i}")).collect();
    enqueue(&redis, Q, &ids.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
    let started = Instant::now();
    let worker = worker_on(&redis, &sink, &pki, name, extra).await;
    let all = sink.wait_for(limit, |_| delivered.load(Ordering::Relaxed) >= n).await;
    let took = started.elapsed();
    worker.stop().await;
    assert!(
        all,
        "{name}: {} of {n} delivered in {limit:?}",
        delivered.load(Ordering::Relaxed)
    );
    let seen: BTreeSet<String> = sink.record.delivered().into_iter().collect();
    assert_eq!(seen.len(), n, "{name}: every message delivered");
    for key in [Q.to_string(), keys().retry, keys().processing(name)] {
        assert_eq!(len(&redis, &key).await, 0, "{name}: {key} ends empty");
    }
    Drained {
        took,
        dead: dead_letters(&redis, Q).await.len(),
        duplicates: sink.record.delivered().len() - seen.len(),
    }
}

/// The settings of the runs: concurrency 16, retry interval 1 s.
const STRUGGLING: &[(&str, &str)] = &[
    ("WORKER_RETRY_INTERVAL", "1"),
    ("WORKER_MAX_ATTEMPTS", "40"),
    ("WORKER_CONCURRENCY", "16"),
];

/// Runs the same load with the default breaker and without one, side by side (they share the
/// machine equally), and returns both.
async fn with_and_without_breaker(name: &str, behaviour: fn() -> Behaviour, n: usize) -> (Drained, Drained) {
    let off: Vec<(&str, &str)> = STRUGGLING
        .iter()
        .copied()
        .chain([("WORKER_BREAKER", "false")])
        .collect();
    let limit = Duration::from_secs(120);
    let (on_name, off_name) = (format!("{name}-on"), format!("{name}-off"));
    let (on, off) = tokio::join!(
        drain(&on_name, behaviour(), n, STRUGGLING, limit),
        drain(&off_name, behaviour(), n, &off, limit),
    );
    eprintln!(
        "{name}[breaker on: {:.1} s, off: {:.1} s, ratio {:.2}; dead {}/{}]",
        on.took.as_secs_f64(),
        off.took.as_secs_f64(),
        on.took.as_secs_f64() / off.took.as_secs_f64(),
        on.dead,
        off.dead
    );
    for run in [&on, &off] {
        assert_eq!(
            (run.dead, run.duplicates),
            (0, 0),
            "{name}: nothing dead, nothing twice"
        );
    }
    (on, off)
}

mod slow {
    use super::*;

    /// One of two backends down behind a load balancer: 60% of attempts answered 503 at random.
    /// The 40% the server does answer must keep flowing: no full stop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sixty_percent_503s_drain_as_fast_with_the_breaker_as_without() {
        fn random_503s() -> Behaviour {
            Arc::new(|call: &Call| match (call.endpoint, fastrand::f64() < 0.6) {
                (Endpoint::Deliver, true) => Reply::status(503),
                _ => Reply::status(200),
            })
        }
        let (on, off) = with_and_without_breaker("random", random_503s, 2000).await;
        assert!(
            on.took.as_secs_f64() <= 1.5 * off.took.as_secs_f64(),
            "with the breaker {:?}, without {:?}",
            on.took,
            off.took
        );
    }

    /// Every message's first attempt answered 503, its second 200: the server is not dead,
    /// and the retries that get through must keep the circuit closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_first_attempt_failing_drains_as_fast_with_the_breaker_as_without() {
        let (on, off) = with_and_without_breaker("first", || sink::fail_first(1, 503), 3000).await;
        assert!(
            on.took.as_secs_f64() <= 1.5 * off.took.as_secs_f64(),
            "with the breaker {:?}, without {:?}",
            on.took,
            off.took
        );
    }

    /// 2 s of success, then 40 s of 503 for everything: whatever the 2 s held, the circuit
    /// opens within a few dozen attempts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_after_heavy_success_opens_the_circuit_within_150_requests() {
        const OK: u8 = 0;
        const DOWN: u8 = 1;
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        let phase = Arc::new(AtomicU8::new(OK));
        let during = Arc::new(AtomicU64::new(0));
        let (seen_phase, count) = (phase.clone(), during.clone());
        let (behaviour, delivered) = counting(Arc::new(move |_: &Call| {
            if seen_phase.load(Ordering::Acquire) == DOWN {
                count.fetch_add(1, Ordering::Relaxed);
                Reply::status(503)
            } else {
                Reply::status(200)
            }
        }));
        let sink = start_sink(&pki, behaviour).await;
        let n = 20_000;
        let ids: Vec<String> = (0..n).map(|i| format!("heavy-{i}")).collect();
        enqueue(&redis, Q, &ids.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
        let worker = worker_on(
            &redis,
            &sink,
            &pki,
            "w-heavy",
            &[
                ("WORKER_RETRY_INTERVAL", "1"),
                ("WORKER_MAX_ATTEMPTS", "20"),
                ("WORKER_CONCURRENCY", "16"),
            ],
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = delivered.load(Ordering::Relaxed);
        phase.store(DOWN, Ordering::Release);
        assert!(
            len(&redis, Q).await > 0,
            "the queue still holds messages when the outage starts"
        );
        tokio::time::sleep(Duration::from_secs(40)).await;
        phase.store(OK, Ordering::Release);
        let requests = during.load(Ordering::Relaxed);
        eprintln!("heavy[delivered before the outage: {before}; requests during 40 s: {requests}]");
        assert!(before > 200, "real traffic before the outage: {before}");
        assert!(requests <= 150, "{requests} requests reached the failing server");
        assert!(
            sink.wait_for(Duration::from_secs(120), |_| delivered.load(Ordering::Relaxed) >= n)
                .await,
            "every message delivered after the outage: {}",
            delivered.load(Ordering::Relaxed)
        );
        worker.stop().await;
        assert!(dead_letters(&redis, Q).await.is_empty(), "nothing dead");
        for key in [Q.to_string(), keys().retry, keys().processing("w-heavy")] {
            assert_eq!(len(&redis, &key).await, 0, "{key} ends empty");
        }
    }

    /// A bad deploy: every delivery answered 404 for 20 s, then 200. A worker that believes
    /// each 404 dead-letters the whole queue; this one pauses after a few.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_misdeployed_server_does_not_empty_the_queue_into_the_dead_list() {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        let deployed = Instant::now();
        let (behaviour, _) = counting(Arc::new(move |call: &Call| {
            match (call.endpoint, deployed.elapsed() < Duration::from_secs(20)) {
                (Endpoint::Deliver, true) => Reply::status(404),
                _ => Reply::status(200),
            }
        }));
        let sink = start_sink(&pki, behaviour).await;
        let n = 2000;
        let ids: Vec<String> = (0..n).map(|i| format!("deploy-{i}")).collect();
        enqueue(&redis, Q, &ids.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
        let worker = worker_on(
            &redis,
            &sink,
            &pki,
            "w-deploy",
            &[("WORKER_RETRY_INTERVAL", "1"), ("WORKER_CONCURRENCY", "16")],
        )
        .await;
        // The pause shows on /ready while the 404s last.
        eventually(|| async {
            let (status, body) = get(&worker.url("/ready")).await;
            status == 503 && body.contains("circuit open")
        })
        .await;
        // Then the queue empties (the 404s end after 20 s; the probe after that finds 200s).
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let mut left = 0;
            for key in [Q.to_string(), keys().retry, keys().processing("w-deploy")] {
                left += len(&redis, &key).await;
            }
            if left == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{left} messages still waiting after 90 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        worker.stop().await;
        let dead: BTreeSet<String> = dead_letters(&redis, Q)
            .await
            .iter()
            .filter_map(|d| d["message_id"].as_str().map(str::to_string))
            .collect();
        let seen: BTreeSet<String> = sink.record.delivered().into_iter().collect();
        eprintln!("deploy[dead-lettered: {}, delivered: {}]", dead.len(), seen.len());
        assert!(dead.len() <= 50, "{} dead-lettered", dead.len());
        let all: BTreeSet<String> = dead.union(&seen).cloned().collect();
        assert_eq!(
            all,
            ids.into_iter().collect(),
            "every message delivered or dead, none lost"
        );
        assert!(dead.is_disjoint(&seen));
    }
}

/// After an outage, one message whose own delivery keeps failing (504 for it alone) must not
/// be the probe every time and hold the queue: a probe the server fails goes to the back, and
/// the others go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_failing_is_not_the_probe_forever() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let (behaviour, delivered) = counting(Arc::new(move |call: &Call| {
        match (call.endpoint, call.message_id.as_str()) {
            (Endpoint::Deliver, "stuck") => Reply::status(504),
            _ => Reply::status(200),
        }
    }));
    let sink = start_sink(&pki, behaviour).await;
    // Alone in the queue, the failing message opens the circuit (4 of 4 attempts failed).
    enqueue(&redis, Q, &[message("stuck")]).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-stuck",
        &[
            ("WORKER_RETRY_INTERVAL", "0.5"),
            ("WORKER_MAX_ATTEMPTS", "1000"),
            ("WORKER_BREAKER_MIN_ATTEMPTS", "4"),
            ("WORKER_BREAKER_PROBE_MAX", "2"),
        ],
    )
    .await;
    eventually(|| async { get(&worker.url("/ready")).await.0 == 503 }).await;
    // Then the others arrive, behind it.
    let others: Vec<String> = (0..51).map(|i| message(&format!("other-{i}"))).collect();
    enqueue(&redis, Q, &others).await;
    let all = sink
        .wait_for(Duration::from_secs(30), |_| delivered.load(Ordering::Relaxed) >= 51)
        .await;
    let stuck_probes = sink
        .record
        .deliveries()
        .iter()
        .filter(|c| c.message_id == "stuck")
        .count();
    worker.stop().await;
    assert!(
        all,
        "the other 51 are delivered: {} (the failing message was tried {stuck_probes} times)",
        delivered.load(Ordering::Relaxed)
    );
    assert_eq!(get_stuck(&redis).await, 1, "the failing message is still there, once");
}

/// Where the failing message is: in the queue, the retry set or processing, counted.
async fn get_stuck(redis: &RedisServer) -> usize {
    let mut found = 0;
    for key in [Q.to_string(), keys().retry, keys().processing("w-stuck")] {
        found += usize::from(ids_in(redis, &key).await.contains("stuck"));
    }
    found
}

/// Under a steady backlog (a producer keeping 1,500 ready, a worker limited to 50 a second) a
/// retry due in 1 s goes out about 1 s later, not once the backlog is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_retry_goes_out_under_a_steady_backlog() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(
        &pki,
        Arc::new(
            |call: &Call| match (call.endpoint, call.message_id.as_str(), call.attempt) {
                (Endpoint::Deliver, "late", 1) => Reply::status(503),
                _ => Reply::status(200),
            },
        ),
    )
    .await;
    let mut items = vec![message("late")];
    items.extend((0..1500).map(|i| message(&format!("backlog-{i}"))));
    enqueue(&redis, Q, &items).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-backlog",
        &[("WORKER_RETRY_INTERVAL", "1"), ("WORKER_RATE_LIMIT", "50")],
    )
    .await;
    // The producer tops the backlog up as the worker takes from it.
    let producer = {
        let mut conn = redis.conn().await;
        tokio::spawn(async move {
            for round in 0.. {
                let more: Vec<String> = (0..5).map(|i| message(&format!("more-{round}-{i}"))).collect();
                let _: Result<(), _> = redis::AsyncCommands::lpush(&mut conn, Q, more).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let attempts = |r: &sink::Record| {
        r.deliveries()
            .into_iter()
            .filter(|c| c.message_id == "late")
            .map(|c| c.arrived)
            .collect::<Vec<_>>()
    };
    let retried = sink.wait_for(Duration::from_secs(20), |r| attempts(r).len() >= 2).await;
    producer.abort();
    worker.stop().await;
    assert!(retried, "the retry went out within 20 s under the backlog");
    let at = attempts(&sink.record);
    let gap = at[1].duration_since(at[0]);
    eprintln!("backlog[retry due in 1 s went out after {gap:?}]");
    assert!(gap < Duration::from_secs(5), "{gap:?}");
}

/// `WORKER_RATE_LIMIT=0.2` with a batch of 10: SIGTERM is heard at once, not after the claimer
/// has paced a claimed batch through the limit (46 s, past the 40 s systemd gives). Nothing
/// claimed and not delivered is lost: it is back in the queue.
#[tokio::test]
async fn sigterm_is_heard_at_once_under_a_slow_rate_limit() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let ids: Vec<String> = (0..50).map(|i| format!("slow-{i}")).collect();
    enqueue(&redis, Q, &ids.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
    let vars = env(
        &redis,
        &sink.url(),
        &pki,
        "w-slow",
        &[("WORKER_RATE_LIMIT", "0.2"), ("WORKER_BATCH_SIZE", "10")],
    );
    let mut child = spawn_worker(&vars, pki.dir.path());
    assert!(sink.wait_for(WAIT, |r| !r.delivered().is_empty()).await, "one delivery");
    let asked = Instant::now();
    signal(&child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops within 20 s")
        .expect("status");
    let took = asked.elapsed();
    eprintln!("rate[stopped {took:?} after SIGTERM]");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    let delivered: BTreeSet<String> = sink.record.delivered().into_iter().collect();
    let waiting = ids_in(&redis, Q).await;
    assert_eq!(
        delivered.union(&waiting).cloned().collect::<BTreeSet<_>>(),
        ids.into_iter().collect(),
        "every message delivered or back in the queue"
    );
    assert_eq!(len(&redis, &keys().processing("w-slow")).await, 0);
}

/// Status updates meet a server that is down: none is sent while the circuit is open or
/// probing, and each one the server did not take goes again once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_updates_wait_for_the_circuit_to_close_and_are_kept_until_taken() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let outage = down.clone();
    let sink = start_sink(
        &pki,
        Arc::new(move |_: &Call| match outage.load(Ordering::Acquire) {
            true => Reply::status(503),
            false => Reply::status(200),
        }),
    )
    .await;
    let ids: Vec<String> = (0..30).map(|i| format!("put-{i}")).collect();
    enqueue(&redis, Q, &ids.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-put",
        &[
            ("WORKER_RETRY_INTERVAL", "0.5"),
            ("WORKER_MAX_ATTEMPTS", "100"),
            ("WORKER_BREAKER_MIN_ATTEMPTS", "8"),
            ("WORKER_BREAKER_PROBE_MAX", "1"),
        ],
    )
    .await;
    eventually(|| async { get(&worker.url("/ready")).await.0 == 503 }).await;
    let opened = Instant::now();
    // Several probes meet the server still down.
    assert!(
        sink.wait_for(WAIT, |r| r
            .deliveries()
            .iter()
            .filter(|c| c.arrived > opened + Duration::from_millis(500))
            .count()
            >= 10)
            .await,
        "probes go on during the outage"
    );
    let back = Instant::now();
    down.store(false, Ordering::Release);
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() >= ids.len()).await,
        "every message delivered"
    );
    // Give the held updates their turn: they go out as the circuit closes.
    let not_taken = |r: &sink::Record| -> BTreeSet<String> {
        let statuses = r.statuses();
        let failed: BTreeSet<String> = statuses
            .iter()
            .filter(|c| c.answered == 503)
            .map(|c| c.message_id.clone())
            .collect();
        let taken: BTreeSet<String> = statuses
            .iter()
            .filter(|c| c.answered == 200)
            .map(|c| c.message_id.clone())
            .collect();
        failed.difference(&taken).cloned().collect()
    };
    let all_taken = sink.wait_for(WAIT, |r| not_taken(r).is_empty()).await;
    worker.stop().await;
    let during: Vec<_> = sink
        .record
        .statuses()
        .into_iter()
        .filter(|c| c.arrived > opened + Duration::from_millis(500) && c.arrived < back)
        .collect();
    assert!(
        during.is_empty(),
        "{} status updates went into the outage",
        during.len()
    );
    assert!(
        all_taken,
        "updates the server did not take were sent again: {:?}",
        not_taken(&sink.record)
    );
}

/// `MAIN_SERVER_OUTCOMES` decides what a status means: a 409 counted as delivered, a 404
/// retried; the rest keep the default (a 422 dead-lettered as rejected).
#[tokio::test]
async fn the_operator_sets_the_outcome_of_a_status() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(
        &pki,
        Arc::new(
            |call: &Call| match (call.endpoint, call.message_id.as_str(), call.attempt) {
                (Endpoint::Deliver, "duplicate", _) => Reply::status(409),
                (Endpoint::Deliver, "not-yet", 1) => Reply::status(404),
                (Endpoint::Deliver, "invalid", _) => Reply::status(422),
                _ => Reply::status(200),
            },
        ),
    )
    .await;
    enqueue(
        &redis,
        Q,
        &[message("duplicate"), message("not-yet"), message("invalid")],
    )
    .await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-outcomes",
        &[("MAIN_SERVER_OUTCOMES", "409=delivered,404=retry")],
    )
    .await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().contains(&"not-yet".to_string()))
            .await
    );
    eventually(|| async { dead_letters(&redis, Q).await.len() == 1 }).await;
    let (_, metrics) = get(&worker.url("/metrics")).await;
    worker.stop().await;
    let dead = dead_letters(&redis, Q).await;
    assert_eq!(
        (dead[0]["message_id"].as_str(), dead[0]["reason"].as_str()),
        (Some("invalid"), Some("rejected"))
    );
    let tries = |id: &str| sink.record.deliveries().iter().filter(|c| c.message_id == id).count();
    assert_eq!(tries("duplicate"), 1, "a 409 counted as delivered is not tried again");
    assert_eq!(tries("not-yet"), 2, "a 404 retried");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("worker_messages_delivered_total{") && l.ends_with(" 2")),
        "the 409 counts as delivered: {metrics}"
    );
    for key in [Q.to_string(), keys().retry, keys().processing("w-outcomes")] {
        assert_eq!(len(&redis, &key).await, 0, "{key} ends empty");
    }
}

/// A main server that takes deliveries but fails every status update is not asked again and
/// again: after the first failures, one update at a time probes it, further apart each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_failing_status_updates_gets_one_probe_at_a_time() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(
        &pki,
        Arc::new(|call: &Call| match (call.endpoint, call.attempt) {
            (Endpoint::Deliver, 1) => Reply::status(503),
            (Endpoint::Deliver, _) => Reply::status(200),
            (Endpoint::Status, _) => Reply::status(503),
        }),
    )
    .await;
    let ids: Vec<String> = (0..200).map(|i| format!("put-{i}")).collect();
    enqueue(&redis, Q, &ids.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-puts",
        &[("WORKER_RETRY_INTERVAL", "0.2"), ("WORKER_BREAKER", "false")],
    )
    .await;
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 200).await);
    let first = sink.record.statuses().len();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let later = sink.record.statuses().len() - first;
    worker.stop().await;
    eprintln!("puts[{first} status updates until delivered, {later} in the next 6 s]");
    // 1 s, 2 s, 4 s apart: three or four probes, not 200 updates each sent again.
    assert!(later <= 5, "{later} status updates in 6 s into a server failing them");
}

/// After an outage 1,000 retries fall due at once; a message that arrives then is claimed
/// about one for one with them, not after all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_work_is_not_shut_out_by_a_stampede_of_due_retries() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    // 1,000 retries, all due now.
    let mut conn = redis.conn().await;
    for i in 0..1000 {
        let item = message(&format!("retry-{i}")).replace("\"payload\"", "\"attempt_count\":1,\"payload\"");
        let _: () = redis::AsyncCommands::zadd(&mut conn, keys().retry, item, 0)
            .await
            .expect("ZADD");
    }
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-stampede",
        &[("WORKER_RETRY_INTERVAL", "1"), ("WORKER_RATE_LIMIT", "100")],
    )
    .await;
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 50).await);
    enqueue(&redis, Q, &[message("newcomer")]).await;
    let arrived = sink.record.delivered().len();
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().contains(&"newcomer".to_string()))
            .await,
        "the newcomer is delivered"
    );
    let before = sink
        .record
        .delivered()
        .iter()
        .position(|id| id == "newcomer")
        .unwrap_or(usize::MAX);
    worker.stop().await;
    eprintln!("stampede[newcomer enqueued after {arrived} deliveries, delivered as number {before}]");
    assert!(
        // Behind at most a fill (100) and a pass's share, not the 950 left.
        before < arrived + 250,
        "newcomer waited behind {} retries",
        before - arrived
    );
}
