//! The Redis scripts on their own, against a real redis-server: races the worker cannot stage.

use std::collections::BTreeSet;

use crate::common::*;
use courier::queue::{self, Queue};
use redis::AsyncCommands;

async fn queue_for(redis: &RedisServer, worker_id: &str) -> Queue {
    let pki = Pki::new();
    let settings = settings(&env(redis, "https://127.0.0.1:1", &pki, worker_id, &[]));
    let connector = queue::Connector::new(&settings.redis).expect("connector");
    let conn = Queue::shared_connection(&connector).await.expect("connect");
    Queue::connect(&connector, &conn, Q, worker_id).await.expect("connect")
}

#[tokio::test]
async fn racing_reapers_return_each_message_exactly_once() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let items: Vec<String> = (0..200).map(|i| message(&format!("held-{i}"))).collect();
    let _: () = conn
        .lpush(keys().processing("dead-worker"), &items)
        .await
        .expect("LPUSH");
    // A heartbeat the reapers watched stay at 1000.
    let _: () = conn.zadd(keys().workers, "dead-worker", 1_000).await.expect("ZADD");

    let mut reapers = Vec::new();
    for i in 0..8 {
        let queue = queue_for(&redis, &format!("reaper-{i}")).await;
        reapers.push(tokio::spawn(async move {
            queue.reap("dead-worker", "1000").await.expect("reap")
        }));
    }
    let mut results = Vec::new();
    for reaper in reapers {
        results.push(reaper.await.expect("task"));
    }
    let winners: Vec<usize> = results.iter().flatten().copied().collect();
    assert_eq!(
        winners,
        [200],
        "one reaper moved everything, the others nothing: {results:?}"
    );

    let ready: Vec<String> = conn.lrange(Q, 0, -1).await.expect("LRANGE");
    assert_eq!(ready.len(), 200, "no message duplicated");
    assert_eq!(ready.iter().collect::<BTreeSet<_>>().len(), 200);
    // Oldest claim (rightmost in processing) is first in line (rightmost in the queue).
    assert_eq!(ready.last(), items.first());
    let workers: Vec<String> = conn.zrange(keys().workers, 0, -1).await.expect("ZRANGE");
    assert!(workers.is_empty());
}

#[tokio::test]
async fn a_live_worker_is_not_reaped() {
    let redis = RedisServer::start().await;
    let live = queue_for(&redis, "alive").await;
    assert_eq!(live.register(None, None).await.expect("register"), Ok(()));
    let _: () = redis
        .conn()
        .await
        .lpush(keys().processing("alive"), message("mine"))
        .await
        .expect("LPUSH");
    let other = queue_for(&redis, "other").await;
    let seen = other.workers().await.expect("workers");
    let beat = seen.iter().find(|w| w.id == "alive").expect("listed").heartbeat.clone();
    // It heartbeats after the reaper looked: the value it watched is gone, so no reap.
    live.heartbeat().await.expect("heartbeat");
    let _: () = redis
        .conn()
        .await
        .zincr(keys().workers, "alive", 1)
        .await
        .expect("ZINCRBY");
    assert_eq!(other.reap("alive", &beat).await.expect("reap"), None);
    assert_eq!(len(&redis, &keys().processing("alive")).await, 1);
}

#[tokio::test]
async fn an_id_held_by_a_live_process_is_refused_and_a_dead_holder_can_be_taken_over() {
    let redis = RedisServer::start().await;
    let first = queue_for(&redis, "worker-1").await;
    let second = queue_for(&redis, "worker-1").await;
    assert_eq!(first.register(None, None).await.expect("register"), Ok(()));
    let holder = second
        .register(None, None)
        .await
        .expect("register")
        .expect_err("refused");
    assert_eq!(holder.host, queue::this_host());
    assert_eq!(holder.pid, std::process::id());
    assert!(holder.to_string().contains("heartbeat"));
    // Told the holder is dead, the second takes the id; the first then learns it lost it.
    assert_eq!(
        second.register(Some(&holder.token), None).await.expect("register"),
        Ok(())
    );
    assert!(
        !first.heartbeat().await.expect("heartbeat"),
        "the first sees its id taken"
    );
    assert!(second.heartbeat().await.expect("heartbeat"));
}

/// Just after the Redis host's clock stepped back 90 s, the queue's clock has read 90 s
/// further than `TIME` now does. A retry due 2 s after that must still go out about 2 s later,
/// not 92 s.
#[tokio::test]
async fn a_step_back_of_the_redis_clock_does_not_hold_a_waiting_retry() {
    let redis = RedisServer::start().await;
    let queue = queue_for(&redis, "w-clock").await;
    let mut conn = redis.conn().await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.expect("TIME");
    let before_step = secs * 1000 + micros / 1000 + 90_000;
    let _: () = conn.hset(keys().clock, "last", before_step).await.expect("HSET");
    let _: () = conn
        .zadd(keys().retry, message("stepped"), before_step + 2_000)
        .await
        .expect("ZADD");
    let started = std::time::Instant::now();
    let first = queue.promote_due(100, 100).await.expect("promote");
    assert_eq!(first.moved, 0);
    let wait = first.next_due_in.expect("one waiting");
    assert!(wait <= std::time::Duration::from_secs(2), "due in {wait:?}, not 92 s");
    // Waiting is the subject here: the promoter sleeps until the due time it was told.
    tokio::time::sleep(wait).await;
    let moved = queue.promote_due(100, 100).await.expect("promote").moved;
    assert_eq!(moved, 1, "promoted {:?} after the step", started.elapsed());
    assert_eq!(ids_in(&redis, Q).await.into_iter().collect::<Vec<_>>(), ["stepped"]);
}

/// The dead letters the claim script writes itself (too large, poisoned) keep their bytes: the
/// header's fields in their order, the numbers, the message id as the script encodes it (or
/// none), then the item exactly as it was.
#[tokio::test]
async fn the_claim_script_writes_its_dead_letters_byte_for_byte_as_always() {
    let redis = RedisServer::start().await;
    let queue = queue_for(&redis, "w-bytes").await;
    let mut conn = redis.conn().await;
    let big_with_id = format!(r#"{{"message_id":"huge/1","payload":"{}"}}"#, "x".repeat(400));
    let big = format!(r#"{{"payload":"{}"}}"#, "y".repeat(400));
    let poison_with_id = r#"{"message_id":"poison/2","payload":"boom"}"#.to_string();
    let poison = r#"{"payload":"no id"}"#.to_string();
    for item in [&poison_with_id, &poison] {
        let sha = redis_sha1(&mut conn, item).await;
        let _: () = conn.hset(keys().reclaims, sha, 2).await.expect("HSET");
    }
    let items = [big_with_id.clone(), big.clone(), poison_with_id.clone(), poison.clone()];
    enqueue(&redis, Q, &items).await;
    let claimed = queue.claim(10, 300, 1).await.expect("claim");
    assert!(claimed.items.is_empty(), "{:?}", claimed.items);

    let records: Vec<Vec<u8>> = conn.lrange(keys().dead, 0, -1).await.expect("LRANGE");
    let at = courier::message::parse_dead_letter(&records[0]).fields["dead_at"]
        .as_str()
        .expect("dead_at")
        .to_string();
    let too_large = |item: &str, id: &str| {
        let n = item.len();
        format!(
            "{{\"reason\":\"too_large\",\"error\":\"message is {n} bytes, over the 300-byte limit \
             (worker.max_message_bytes)\",\"worker_id\":\"w-bytes\",\"dead_at\":\"{at}\"{id},\
             \"size\":{n}}}\n{item}"
        )
    };
    let poisoned = |item: &str, id: &str| {
        let n = item.len();
        format!(
            "{{\"reason\":\"poisoned\",\"error\":\"returned to the queue 2 times by the restart or \
             reaping of workers that died holding it, over the limit of 1 (worker.max_reclaims)\",\
             \"worker_id\":\"w-bytes\",\"dead_at\":\"{at}\"{id},\"reclaims\":2,\"size\":{n}}}\n{item}"
        )
    };
    // Newest first; the script encodes ids as cjson does (`/` as `\/`).
    let expected = [
        poisoned(&poison, ""),
        poisoned(&poison_with_id, r#","message_id":"poison\/2""#),
        too_large(&big, ""),
        too_large(&big_with_id, r#","message_id":"huge\/1""#),
    ];
    let records: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert_eq!(records, expected);
}
