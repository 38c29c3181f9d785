//! Copy before remove: every script that moves messages, stopped half way by a command the ACL
//! denies (each of its commands in turn, as a denied command, WRONGTYPE, OOM or READONLY would
//! stop it), leaves every message in at least one place in Redis.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use courier::queue::{self, Queue};
use redis::AsyncCommands;

/// The worker whose lists the scripts move between, and a dead one to reap.
const W: &str = "w-scripts";
const DEAD_W: &str = "w-dead";
/// Claims take items over this many bytes straight to the dead list.
const MAX_BYTES: usize = 300;

/// Each script, run as a user denied `command`, as the worker runs it.
async fn run(script: &str, queue: &Queue, conn: &mut queue::Conn) -> Result<(), queue::QueueError> {
    let raw = item("p-1");
    match script {
        "claim" => queue.claim(10, MAX_BYTES, 1).await.map(drop),
        "retry" => {
            let retried = raw.replace("p-1\"", "p-1\",\"attempt_count\":1");
            queue
                .retry(raw.as_bytes(), retried.as_bytes(), Duration::from_secs(1))
                .await
                .map(drop)
        }
        "dead" => queue
            .dead(raw.as_bytes(), dead_record("p-1").as_bytes())
            .await
            .map(drop),
        "release" => queue.release(raw.as_bytes()).await.map(drop),
        "rotate" => queue.rotate(raw.as_bytes()).await.map(drop),
        "promote" => queue.promote_due(100, 100).await.map(drop),
        "give_back" => queue.give_back(W, true).await.map(drop),
        "reap" => queue.reap(DEAD_W, "1000").await.map(drop),
        "return_strays" => {
            let strays = [item("p-1").into(), item("p-2").into()];
            queue.return_strays(&strays).await.map(drop)
        }
        "dlq_requeue" => {
            let sha = sha1(conn, &dead_record("x-1")).await;
            queue::requeue_dead_at(conn, &keys(), 1, &sha, item("x-1").as_bytes(), false)
                .await
                .map(drop)
        }
        other => panic!("no script {other}"),
    }
}

/// The commands each script runs on the way to its last write, in the state `fill` makes.
const SCRIPTS: &[(&str, &[&str])] = &[
    ("claim", &["lrange", "exists", "hget", "lpush", "ltrim", "hdel"]),
    ("retry", &["lpos", "time", "hmget", "hset", "zadd", "lrem"]),
    ("dead", &["lpos", "lpush", "lrem"]),
    ("release", &["lpos", "rpush", "lrem"]),
    ("rotate", &["lpos", "lpush", "lrem"]),
    (
        "promote",
        &["time", "hmget", "hset", "zrangebyscore", "rpush", "zrem", "zrange"],
    ),
    ("give_back", &["lmove", "hlen", "hincrby", "expire"]),
    (
        "reap",
        &["zscore", "lmove", "hlen", "hincrby", "expire", "zrem", "hdel"],
    ),
    ("return_strays", &["lpos", "rpush", "lrem"]),
    ("dlq_requeue", &["lindex", "lpush", "lset"]),
];

/// The SHA-1 of `text`, as Redis computes it.
async fn sha1(conn: &mut queue::Conn, text: &str) -> String {
    redis::cmd("EVAL")
        .arg("return redis.sha1hex(ARGV[1])")
        .arg(0)
        .arg(text)
        .query_async(conn)
        .await
        .expect("sha1")
}

/// A queued item; the same bytes each time, as the scripts find items by their bytes.
fn item(id: &str) -> String {
    format!(r#"{{"message_id":"{id}","payload":{{"n":1}}}}"#)
}

fn dead_record(id: &str) -> String {
    format!("{{\"reason\":\"rejected\",\"message_id\":\"{id}\"}}\n{}", item(id))
}

/// Puts messages in every place a script reads from: ready (one too large, one poisoned, one
/// counted once), this worker's processing list, a dead worker's, the retry set (one due, one
/// not) and the dead list. Returns every id placed.
async fn fill(redis: &RedisServer) -> BTreeSet<String> {
    let mut conn = redis.conn().await;
    let k = keys();
    let big = item("r-big").replace("}}", &format!("}},\"pad\":\"{}\"}}", "x".repeat(MAX_BYTES)));
    let (poisoned, counted) = (item("r-poison"), item("r-counted"));
    let ready = [item("r-1"), big, poisoned.clone(), counted.clone(), item("r-2")];
    let _: () = conn.lpush(&k.ready, &ready).await.expect("LPUSH");
    for (item, count) in [(&poisoned, 5), (&counted, 1)] {
        let sha = redis_sha1(&mut conn, item).await;
        let _: () = conn.hset(&k.reclaims, sha, count).await.expect("HSET");
    }
    let _: () = conn
        .lpush(k.processing(W), &[item("p-1"), item("p-2")])
        .await
        .expect("LPUSH");
    let _: () = conn
        .lpush(k.processing(DEAD_W), &[item("d-1"), item("d-2")])
        .await
        .expect("LPUSH");
    let _: () = conn.zadd(&k.workers, DEAD_W, 1000).await.expect("ZADD");
    let _: () = conn.zadd(&k.retry, item("t-due"), 0).await.expect("ZADD");
    let _: () = conn.zadd(&k.retry, item("t-later"), 1e15).await.expect("ZADD");
    let _: () = conn.lpush(&k.dead, dead_record("x-1")).await.expect("LPUSH");
    [
        "r-1",
        "r-big",
        "r-poison",
        "r-counted",
        "r-2",
        "p-1",
        "p-2",
        "d-1",
        "d-2",
        "t-due",
        "t-later",
        "x-1",
    ]
    .into_iter()
    .map(str::to_string)
    .collect()
}

/// Every item of every list and sorted set of the database, with its key.
async fn contents(redis: &RedisServer) -> BTreeSet<(String, String)> {
    let mut conn = redis.conn().await;
    let keys: Vec<String> = conn.keys("*").await.expect("KEYS");
    let mut all = BTreeSet::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.expect("TYPE");
        let items: Vec<String> = match kind.as_str() {
            "list" => conn.lrange(&key, 0, -1).await.expect("LRANGE"),
            "zset" => conn.zrange(&key, 0, -1).await.expect("ZRANGE"),
            _ => continue,
        };
        all.extend(items.into_iter().map(|item| (key.clone(), item)));
    }
    all
}

/// The message ids in `contents`, dead-letter records included.
fn ids(contents: &BTreeSet<(String, String)>) -> BTreeSet<String> {
    contents
        .iter()
        // A dead-letter record is a header line, then the item.
        .filter_map(|(_, item)| serde_json::from_str::<serde_json::Value>(item.rsplit('\n').next()?).ok())
        .filter_map(|value| value["message_id"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn a_script_stopped_at_any_command_leaves_every_message_somewhere() {
    let redis = RedisServer::start().await;
    let pki = Pki::new();
    for (script, commands) in SCRIPTS {
        // None first: the script runs whole, and the state `fill` makes reaches every command.
        for denied in std::iter::once(None).chain(commands.iter().copied().map(Some)) {
            let _: () = redis::cmd("FLUSHALL")
                .query_async(&mut redis.conn().await)
                .await
                .expect("FLUSHALL");
            let placed = fill(&redis).await;
            let user = format!("u-{script}-{}", denied.unwrap_or("none"));
            let mut rules = vec!["on", ">pw", "~*", "&*", "+@all"];
            let minus = denied.map(|c| format!("-{c}"));
            rules.extend(minus.as_deref());
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg(&user)
                .arg(&rules)
                .query_async(&mut redis.conn().await)
                .await
                .expect("ACL SETUSER");
            let vars = env(
                &redis,
                "https://127.0.0.1:1",
                &pki,
                W,
                &[("REDIS_USERNAME", &user), ("REDIS_PASSWORD", "pw")],
            );
            let settings = settings(&vars);
            let connector = queue::Connector::new(&settings.redis).expect("connector");
            let mut conn = Queue::shared_connection(&connector).await.expect("connect");
            let queue = Queue::connect(&connector, &conn, Q, W).await.expect("connect");
            let before = contents(&redis).await;
            let result = run(script, &queue, &mut conn).await;
            let after = contents(&redis).await;
            match denied {
                None => {
                    assert!(result.is_ok(), "{script} runs whole: {result:?}");
                    assert_ne!(before, after, "{script} moved something");
                }
                Some(command) => {
                    // Only `command` is denied, so the refusal is its: the script reached it.
                    let error = format!("{:?}", result.expect_err("the denied command stops the script"));
                    assert!(
                        error.contains("can't run this command"),
                        "{script} stopped at {command}: {error}"
                    );
                }
            }
            let found = ids(&after);
            let lost: Vec<_> = placed.difference(&found).collect();
            assert!(lost.is_empty(), "{script} denied {denied:?} lost {lost:?}");
        }
    }
}
