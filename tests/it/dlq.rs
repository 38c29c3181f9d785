//! Dead-letter triage against a real Redis: filters, stats, requeue and purge by filter (dry
//! run, refusal, --front, --limit, --rate), a requeue killed half way and run again, big
//! records read one at a time, the claim script's message ids, and the admin port's /dlq API.

use std::collections::{BTreeSet, HashMap};
use std::process::Output;

use crate::common::*;
use courier::message::{dead_letter, DeadReason};
use redis::AsyncCommands;

fn vars(redis: &RedisServer) -> HashMap<String, String> {
    HashMap::from([
        ("REDIS_HOST".into(), "127.0.0.1".into()),
        ("REDIS_PORT".into(), redis.port.to_string()),
    ])
}

fn out(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A dead letter as courier writes it, with `dead_at` set to `at`.
fn record(id: &str, reason: DeadReason, error: &str, at: &str) -> Vec<u8> {
    let raw = format!(r#"{{"message_id":"{id}","attempt_count":3,"payload":{{"id":"{id}"}}}}"#);
    let record = dead_letter(raw.as_bytes(), reason, error, "w", Some(id));
    let text = String::from_utf8(record).expect("UTF-8");
    let (header, message) = text.split_once('\n').expect("header");
    let mut header: serde_json::Value = serde_json::from_str(header).expect("JSON");
    header["dead_at"] = at.into();
    format!("{header}\n{message}").into_bytes()
}

/// Six dead letters, oldest first: two rejected 422 (one of them an hour later), a rejected
/// 409, an exhausted 503, an invalid_json, and one whose error mentions `needle`.
async fn seed(redis: &RedisServer) {
    let mut conn = redis.conn().await;
    let records = [
        record(
            "r-1",
            DeadReason::Rejected,
            "main server answered HTTP 422: order 11 invalid",
            "2025-01-15T10:00:00.000Z",
        ),
        record(
            "r-2",
            DeadReason::Rejected,
            "main server answered HTTP 422: order 12 invalid",
            "2025-01-15T11:00:00.000Z",
        ),
        record(
            "c-1",
            DeadReason::Rejected,
            "main server answered HTTP 409: duplicate",
            "2025-01-15T11:30:00.000Z",
        ),
        record(
            "e-1",
            DeadReason::Exhausted,
            "main server answered HTTP 503: busy",
            "2025-01-15T12:00:00.000Z",
        ),
        record(
            "j-1",
            DeadReason::Malformed("invalid_json"),
            "not JSON",
            "2025-01-15T12:30:00.000Z",
        ),
        record(
            "g-1",
            DeadReason::Exhausted,
            "timeout near the needle",
            "2025-01-15T13:00:00.000Z",
        ),
    ];
    for r in &records {
        let _: () = conn.lpush(keys().dead, r).await.expect("LPUSH");
    }
}

async fn ids_listed(vars: &HashMap<String, String>, dir: &std::path::Path, args: &[&str]) -> Vec<String> {
    let mut all = vec!["dlq", "list", "--json"];
    all.extend_from_slice(args);
    let output = run_courier(vars, dir, &all).await;
    assert!(output.status.success(), "{all:?}: {}", out(&output));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            v["message_id"].as_str().unwrap_or("").to_string()
        })
        .collect()
}

#[tokio::test]
async fn every_filter_selects_what_it_names() {
    let redis = RedisServer::start().await;
    seed(&redis).await;
    let (vars, dir) = (vars(&redis), tempfile::tempdir().expect("dir"));
    let d = dir.path();
    assert_eq!(
        ids_listed(&vars, d, &[]).await,
        ["g-1", "j-1", "e-1", "c-1", "r-2", "r-1"]
    );
    assert_eq!(
        ids_listed(&vars, d, &["--reason", "rejected"]).await,
        ["c-1", "r-2", "r-1"]
    );
    assert_eq!(
        ids_listed(&vars, d, &["--reason", "exhausted,invalid_json"]).await,
        ["g-1", "j-1", "e-1"]
    );
    assert_eq!(ids_listed(&vars, d, &["--status", "422"]).await, ["r-2", "r-1"]);
    assert_eq!(
        ids_listed(&vars, d, &["--status", "409", "--status", "503"]).await,
        ["e-1", "c-1"]
    );
    assert_eq!(
        ids_listed(
            &vars,
            d,
            &["--since", "2025-01-15T11:00:00Z", "--until", "2025-01-15T12:00:00Z"]
        )
        .await,
        ["c-1", "r-2"]
    );
    assert_eq!(ids_listed(&vars, d, &["--grep", "needle"]).await, ["g-1"]);
    assert_eq!(
        ids_listed(&vars, d, &["--grep", "\"id\":\"r-2\""]).await,
        ["r-2"],
        "text in the message"
    );
    assert_eq!(
        ids_listed(&vars, d, &["--reason", "rejected", "--limit", "1"]).await,
        ["c-1"]
    );
    assert!(
        ids_listed(&vars, d, &["--since", "1h"]).await.is_empty(),
        "all older than an hour"
    );
    let bad = run_courier(&vars, d, &["dlq", "list", "--since", "yesterday"]).await;
    assert!(!bad.status.success() && out(&bad).contains("--since"), "{}", out(&bad));
}

#[tokio::test]
async fn stats_give_one_row_per_cause() {
    let redis = RedisServer::start().await;
    seed(&redis).await;
    let (vars, dir) = (vars(&redis), tempfile::tempdir().expect("dir"));
    let output = run_courier(&vars, dir.path(), &["dlq", "stats", "--json"]).await;
    assert!(output.status.success(), "{}", out(&output));
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(stats["total"], 6);
    let groups = stats["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 5, "{groups:?}");
    let first = &groups[0];
    assert_eq!(
        first["count"], 2,
        "the two 422s with different order numbers are one cause: {first}"
    );
    assert_eq!(first["reason"], "rejected");
    assert_eq!(first["status"], 422);
    assert_eq!(first["oldest"], "2025-01-15T10:00:00.000Z");
    assert_eq!(first["newest"], "2025-01-15T11:00:00.000Z");
    let table = run_courier(&vars, dir.path(), &["dlq", "stats"]).await;
    let table = out(&table);
    assert!(
        table.contains("6 dead letter(s)") && table.contains("HTTP N: order N invalid"),
        "{table}"
    );
}

#[tokio::test]
async fn requeue_and_purge_by_filter_with_dry_run_refusal_front_and_limit() {
    let redis = RedisServer::start().await;
    seed(&redis).await;
    let (vars, dir) = (vars(&redis), tempfile::tempdir().expect("dir"));
    let d = dir.path();
    let mut conn = redis.conn().await;
    let _: () = conn.lpush(Q, message("waiting")).await.expect("LPUSH");

    for refused in [&["dlq", "requeue"][..], &["dlq", "purge", "--yes"]] {
        let output = run_courier(&vars, d, refused).await;
        assert!(
            !output.status.success() && out(&output).contains("--all"),
            "{}",
            out(&output)
        );
    }
    assert_eq!(len(&redis, &keys().dead).await, 6);

    let dry = run_courier(&vars, d, &["dlq", "requeue", "--reason", "rejected", "--dry-run"]).await;
    assert!(out(&dry).contains("3 of 6"), "{}", out(&dry));
    assert_eq!(len(&redis, &keys().dead).await, 6, "a dry run moves nothing");
    assert_eq!(len(&redis, Q).await, 1);

    // Oldest first, to the back: r-1 is delivered before r-2.
    let output = run_courier(&vars, d, &["dlq", "requeue", "--status", "422"]).await;
    assert!(output.status.success(), "{}", out(&output));
    let ready: Vec<String> = conn.lrange(Q, 0, -1).await.expect("LRANGE");
    assert_eq!(ready.len(), 3);
    assert!(
        ready[0].contains("r-2") && ready[1].contains("r-1") && ready[2].contains("waiting"),
        "{ready:?}"
    );
    assert!(ready[1].contains("\"attempt_count\":0"), "attempts reset: {}", ready[1]);

    // --front: delivered next (the right end).
    let output = run_courier(
        &vars,
        d,
        &["dlq", "requeue", "--reason", "exhausted", "--front", "--limit", "1"],
    )
    .await;
    assert!(output.status.success(), "{}", out(&output));
    let next: Option<String> = conn.lindex(Q, -1).await.expect("LINDEX");
    assert!(
        next.expect("item").contains("e-1"),
        "the oldest exhausted only, at the front"
    );
    assert_eq!(len(&redis, &keys().dead).await, 3);

    let output = run_courier(&vars, d, &["dlq", "purge", "--reason", "invalid_json", "--yes"]).await;
    assert!(output.status.success(), "{}", out(&output));
    assert_eq!(ids_listed(&vars, d, &[]).await, ["g-1", "c-1"]);
    let dead: Vec<Vec<u8>> = conn.lrange(keys().dead, 0, -1).await.expect("LRANGE");
    assert!(dead.iter().all(|r| r.first() != Some(&0)), "no tombstone left behind");
}

#[tokio::test]
async fn a_requeue_killed_half_way_and_run_again_loses_and_doubles_nothing() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let n = 400;
    let records: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            record(
                &format!("k-{i}"),
                DeadReason::Rejected,
                "main server answered HTTP 422: x",
                "2025-01-15T10:00:00.000Z",
            )
        })
        .collect();
    let _: () = conn.lpush(keys().dead, &records).await.expect("LPUSH");
    let (vars, dir) = (vars(&redis), tempfile::tempdir().expect("dir"));
    let mut child = courier(&vars, dir.path())
        .args(["dlq", "requeue", "--all", "--rate", "400"])
        .spawn()
        .expect("spawn");
    eventually(|| async { len(&redis, Q).await >= 100 }).await;
    child.start_kill().expect("kill");
    let _ = child.wait().await;
    let moved = len(&redis, Q).await;
    assert!(moved < n, "killed part way ({moved} of {n})");
    let output = run_courier(&vars, dir.path(), &["dlq", "requeue", "--all"]).await;
    assert!(output.status.success(), "{}", out(&output));
    let ready: Vec<String> = conn.lrange(Q, 0, -1).await.expect("LRANGE");
    let unique: BTreeSet<&String> = ready.iter().collect();
    assert_eq!(
        ready.len(),
        n,
        "each exactly once: killed between scripts doubles nothing"
    );
    assert_eq!(unique.len(), n);
    assert_eq!(
        len(&redis, &keys().dead).await,
        0,
        "tombstones of the killed run swept too"
    );
    // Oldest first throughout: k-0 is delivered first.
    let first: Option<String> = conn.lindex(Q, -1).await.expect("LINDEX");
    assert!(first.expect("item").contains("\"k-0\""));
}

#[tokio::test]
async fn big_dead_letters_are_read_one_at_a_time() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let big = vec![b'x'; 4 << 20];
    for i in 0..12 {
        let r = dead_letter(
            &big,
            DeadReason::Malformed("too_large"),
            "big",
            "w",
            Some(&format!("big-{i}")),
        );
        let _: () = conn.lpush(keys().dead, r).await.expect("LPUSH");
    }
    let peak = |conn: redis::aio::MultiplexedConnection| async move {
        let mut conn = conn;
        info_number(&mut conn, "memory", "used_memory_peak").await
    };
    let before = peak(redis.conn().await).await;
    let (vars, dir) = (vars(&redis), tempfile::tempdir().expect("dir"));
    let output = run_courier(&vars, dir.path(), &["dlq", "list", "--limit", "1"]).await;
    assert!(
        output.status.success() && out(&output).contains("big-11"),
        "{}",
        out(&output)
    );
    let stats = run_courier(&vars, dir.path(), &["dlq", "stats", "--json"]).await;
    assert!(out(&stats).contains("\"total\":12"), "{}", out(&stats));
    let after = peak(redis.conn().await).await;
    let grown = after.saturating_sub(before);
    eprintln!(
        "Redis peak memory grew {:.1} MB for 96 MB of dead letters",
        grown as f64 / 1048576.0
    );
    assert!(
        grown < 40 << 20,
        "Redis peak grew {} MB: more than a record or two at a time",
        grown >> 20
    );
}

#[tokio::test]
async fn the_claim_script_records_message_ids_of_too_large_and_poisoned_items() {
    let redis = RedisServer::start().await;
    let pki = Pki::new();
    let vars = env(&redis, "https://127.0.0.1:1", &pki, "w-ids", &[]);
    let settings = settings(&vars);
    let connector = courier::queue::Connector::new(&settings.redis).expect("connector");
    let conn = courier::queue::Queue::shared_connection(&connector)
        .await
        .expect("connect");
    let queue = courier::queue::Queue::connect(&connector, &conn, Q, "w-ids")
        .await
        .expect("queue");
    let big = format!(r#"{{"payload":"{}","message_id":"huge-1"}}"#, "x".repeat(500));
    enqueue(&redis, Q, &[big]).await;
    let claimed = queue.claim(10, 300, 1).await.expect("claim");
    assert_eq!(claimed.too_large_ids, ["huge-1"]);
    let dead = dead_letters(&redis, Q).await;
    assert_eq!(dead[0]["message_id"], "huge-1", "{:?}", dead[0]);
    let shown = run_courier(&vars, pki.dir.path(), &["dlq", "show", "huge-1"]).await;
    assert!(
        shown.status.success() && out(&shown).contains("too_large"),
        "{}",
        out(&shown)
    );
}

async fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let mut request = match method {
        "POST" => client.post(url),
        _ => client.get(url),
    };
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    if let Some(body) = body {
        request = request
            .header("Content-Type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.expect("admin port answers");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

const TOKEN: &str = "test-token-0123456789abcdef";

#[tokio::test]
async fn the_dlq_api_needs_the_token_filters_pages_requeues_and_purges() {
    let redis = RedisServer::start().await;
    let pki = Pki::new();
    let sink = start_sink(&pki, courier::devtools::sink::always_ok()).await;
    // Without ADMIN_TOKEN the API is off.
    let off = worker_on(&redis, &sink, &pki, "w-off", &[]).await;
    assert_eq!(call("GET", &off.url("/dlq"), Some(TOKEN), None).await.0, 404);
    assert_eq!(call("GET", &off.url("/ui"), None, None).await.0, 404);
    off.stop().await;
    seed(&redis).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-api",
        &[("ADMIN_TOKEN", TOKEN), ("WORKER_CONCURRENCY", "1")],
    )
    .await;
    for (method, path) in [
        ("GET", "/dlq"),
        ("GET", "/dlq/stats"),
        ("POST", "/dlq/requeue"),
        ("POST", "/dlq/purge"),
    ] {
        let body = (method == "POST").then(|| serde_json::json!({"all": true}));
        assert_eq!(
            call(method, &worker.url(path), None, body.clone()).await.0,
            401,
            "{path} without a token"
        );
        assert_eq!(
            call(method, &worker.url(path), Some("wrong-token-0123456789abcde"), body)
                .await
                .0,
            401
        );
    }
    assert_eq!(len(&redis, &keys().dead).await, 6, "nothing changed without the token");
    assert_eq!(get(&worker.url("/metrics")).await.0, 200, "/metrics stays open");
    assert_eq!(get(&worker.url("/ready")).await.0, 200);

    // /ready can answer before the admin port has the queues' handles: wait for those.
    let url = worker.url("/dlq?limit=1");
    eventually(|| async { call("GET", &url, Some(TOKEN), None).await.0 == 200 }).await;
    let (status, page) = call("GET", &worker.url("/dlq?reason=rejected&limit=2"), Some(TOKEN), None).await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["message_id"].as_str())
        .collect();
    assert_eq!(ids, ["c-1", "r-2"]);
    let cursor = page["next_cursor"].as_u64().expect("a cursor");
    let (_, rest) = call(
        "GET",
        &worker.url(&format!("/dlq?reason=rejected&cursor={cursor}")),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(rest["items"][0]["message_id"], "r-1");
    assert!(rest["next_cursor"].is_null());
    let (status, bad) = call("GET", &worker.url("/dlq?since=soon"), Some(TOKEN), None).await;
    assert!(
        status == 400 && bad["error"].as_str().unwrap_or("").contains("since"),
        "{bad}"
    );

    let (_, stats) = call("GET", &worker.url("/dlq/stats"), Some(TOKEN), None).await;
    assert_eq!(stats["total"], 6);
    assert_eq!(stats["groups"][0]["count"], 2);

    let (status, refused) = call(
        "POST",
        &worker.url("/dlq/requeue"),
        Some(TOKEN),
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    let body = serde_json::json!({"filter": {"status": "422"}, "dry_run": true});
    let (_, dry) = call("POST", &worker.url("/dlq/requeue"), Some(TOKEN), Some(body)).await;
    assert_eq!(dry["outcome"]["matched"], 2, "{dry}");
    assert_eq!(len(&redis, &keys().dead).await, 6);
    let body = serde_json::json!({"filter": {"reason": "invalid_json"}});
    let (_, purged) = call("POST", &worker.url("/dlq/purge"), Some(TOKEN), Some(body)).await;
    assert_eq!(purged["outcome"]["done"], 1, "{purged}");
    let body = serde_json::json!({"filter": {"status": "422"}});
    let (_, requeued) = call("POST", &worker.url("/dlq/requeue"), Some(TOKEN), Some(body)).await;
    assert_eq!(requeued["outcome"]["done"], 2, "{requeued}");
    // The worker delivers them.
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 2).await);
    assert_eq!(len(&redis, &keys().dead).await, 3);
    let (_, ui) = call("GET", &worker.url("/ui"), None, None).await;
    assert!(
        ui.as_str().unwrap_or("").contains("/ui/app.js"),
        "the page is served without the token"
    );
    worker.stop().await;
}

/// The page in Debian's headless Chromium, driven by tests/browser/ui.mjs (playwright-core).
/// In CI (CI set) the tools must be there (.ci/run installs them); elsewhere a missing tool
/// skips this test with a loud line.
#[tokio::test]
async fn the_page_in_headless_chromium_shows_depths_text_only_and_requeues_a_group() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/browser/ui.mjs");
    let missing: Vec<&str> = [
        ("/usr/bin/chromium", std::path::Path::new("/usr/bin/chromium").exists()),
        (
            "node",
            std::process::Command::new("node").arg("--version").output().is_ok(),
        ),
        (
            "tests/browser/node_modules (npm ci --prefix tests/browser)",
            root.join("tests/browser/node_modules/playwright-core").exists(),
        ),
    ]
    .into_iter()
    .filter(|(_, there)| !there)
    .map(|(what, _)| what)
    .collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the browser test; missing: {missing:?}"
        );
        eprintln!("\n*** SKIPPED the browser test: missing {missing:?} (bash .ci/run installs them) ***\n");
        return;
    }
    let redis = RedisServer::start().await;
    let pki = Pki::new();
    let sink = start_sink(&pki, courier::devtools::sink::always_ok()).await;
    seed(&redis).await;
    let hostile = "<img src=x onerror=alert(1)><script>alert(2)</script>";
    let evil = dead_letter(hostile.as_bytes(), DeadReason::Exhausted, hostile, "w", Some("evil"));
    let _: () = redis.conn().await.lpush(keys().dead, evil).await.expect("LPUSH");
    let worker = worker_on(&redis, &sink, &pki, "w-ui", &[("ADMIN_TOKEN", TOKEN)]).await;
    let base = worker.url("");
    let shot = root.join("target/ui-screenshot.png");
    let output = tokio::process::Command::new("node")
        .arg(&script)
        .arg(&base)
        .arg(TOKEN)
        .arg(&shot)
        .output()
        .await
        .expect("node runs");
    let said = out(&output);
    assert!(output.status.success(), "{said}");
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    eprintln!("the page showed: {seen}\nscreenshot: {}", shot.display());
    assert_eq!(seen["dead_shown"], "7", "the dead count set up");
    assert_eq!(seen["hostile_text"], hostile, "shown as text, exactly");
    assert_eq!(seen["dialogs"], 0);
    assert_eq!(seen["filtered"], serde_json::json!(["c-1", "r-2", "r-1"]));
    assert!(
        seen["confirm"]
            .as_str()
            .unwrap_or("")
            .starts_with("Requeue 3 dead letter(s)"),
        "{seen}"
    );
    // Back in the queue, and so delivered by the worker.
    assert!(
        sink.wait_for(WAIT, |r| {
            let d = r.delivered();
            ["c-1", "r-1", "r-2"].iter().all(|id| d.iter().any(|x| x == id))
        })
        .await
    );
    assert_eq!(
        len(&redis, &keys().dead).await,
        4,
        "only the rejected group left the dead list"
    );
    worker.stop().await;
}

/// The scale benchmark (docs/performance.md): a million dead letters, one in ten rejected
/// (422) spread through the list, the rest exhausted (503); times and peak RSS of `dlq stats`,
/// filtered `dlq list`s and `dlq requeue --reason rejected` (100,000). Prints figures; asserts
/// only that the work was done.
/// Run: cargo test --test it -- --ignored --nocapture dlq_benchmark_a_million_dead_letters
#[tokio::test]
#[ignore = "a benchmark: prints figures, takes a minute"]
async fn dlq_benchmark_a_million_dead_letters() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let n = 1_000_000;
    for batch in 0..n / 10_000 {
        let _: () = redis::cmd("EVAL")
        .arg(
            r#"for i = tonumber(ARGV[2]) + 1, tonumber(ARGV[2]) + tonumber(ARGV[1]) do
                 local rejected = i % 10 == 0
                 local header = '{"reason":"' .. (rejected and 'rejected' or 'exhausted')
                   .. '","error":"main server answered HTTP ' .. (rejected and '422: order ' .. i .. ' invalid' or '503: busy')
                   .. '","worker_id":"w","dead_at":"2025-01-15T' .. string.format('%02d:%02d:%02d', math.floor(i / 360000) % 24, math.floor(i / 6000) % 60, math.floor(i / 100) % 60)
                   .. '.000Z","message_id":"m-' .. i .. '","size":120}'
                 redis.call('LPUSH', KEYS[1], header .. '\n{"message_id":"m-' .. i .. '","attempt_count":3,"payload":{"order":' .. i .. ',"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}')
               end
               return 1"#,
        )
        .arg(1)
        .arg(keys().dead)
        .arg(10_000)
        .arg(batch * 10_000)
        .query_async(&mut conn)
        .await
        .expect("load");
    }
    let used = info_number(&mut conn, "memory", "used_memory").await;
    eprintln!(
        "loaded {n} dead letters: Redis used_memory {:.0} MB",
        used as f64 / 1048576.0
    );
    let (vars, dir) = (vars(&redis), tempfile::tempdir().expect("dir"));
    let exe = env!("CARGO_BIN_EXE_courier");
    for args in [
        &["dlq", "stats"][..],
        &["dlq", "list", "--reason", "rejected", "--limit", "50"],
        &["dlq", "list", "--grep", "no such text", "--limit", "1"],
        &["dlq", "list", "--status", "404", "--limit", "1"],
        &["dlq", "requeue", "--reason", "rejected", "--dry-run"],
        &["dlq", "requeue", "--reason", "rejected"],
    ] {
        let started = std::time::Instant::now();
        let output = tokio::process::Command::new("/usr/bin/time")
            .arg("-f")
            .arg("peak RSS %M kB")
            .arg(exe)
            .args(args)
            .envs(&vars)
            .current_dir(dir.path())
            .output()
            .await
            .expect("runs");
        let took = started.elapsed();
        let said = out(&output);
        let rss = said
            .lines()
            .find(|l| l.starts_with("peak RSS"))
            .unwrap_or("")
            .to_string();
        let first = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
        eprintln!(
            "courier {}: {:.2} s, {rss}; {first}",
            args.join(" "),
            took.as_secs_f64()
        );
        assert!(output.status.success(), "{said}");
    }
    assert_eq!(len(&redis, Q).await, n / 10, "every rejected one requeued once");
    assert_eq!(len(&redis, &keys().dead).await, n - n / 10);
}
