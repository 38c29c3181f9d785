//! Following one message: W3C trace context in and out, JSON log lines, and `courier where`.

use courier::devtools::sink::{self, Call, Endpoint, Reply};
use redis::AsyncCommands;

use crate::common::*;

const Q: &str = "message_queue";
const PRODUCER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// (trace id, parent id, flags) of a call's traceparent; panics when it is missing or malformed.
fn sent(call: &Call) -> (String, String, String) {
    let value = call
        .traceparent
        .as_deref()
        .unwrap_or_else(|| panic!("no traceparent on {call:?}"));
    assert!(
        courier::trace::parse_traceparent(value.as_bytes()).is_some(),
        "courier sent a valid traceparent: {value}"
    );
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!((parts.len(), parts[0]), (4, "00"), "{value}");
    (parts[1].to_string(), parts[2].to_string(), parts[3].to_string())
}

#[tokio::test]
async fn traceparent_is_forwarded_with_a_new_parent_id_and_the_same_trace_id_across_retries() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    // HTTP/1.1 writes the trace headers into the request's head itself; HTTP/2 gives them to
    // hyper as header values.
    for (http2, version) in [("false", hyper::Version::HTTP_11), ("true", hyper::Version::HTTP_2)] {
        let sink = start_sink(&pki, sink::fail_first(2, 503)).await;
        let item = format!(
            r#"{{"message_id":"traced-{http2}","traceparent":"{PRODUCER}","tracestate":"congo=t61rcWkgMzE","payload":1}}"#
        );
        enqueue(&redis, Q, &[item]).await;
        let worker = worker_on(
            &redis,
            &sink,
            &pki,
            &format!("w-trace-{http2}"),
            &[("MAIN_SERVER_HTTP2", http2)],
        )
        .await;
        assert!(
            sink.wait_for(WAIT, |r| r.delivered().len() == 1 && r.statuses().len() == 2)
                .await
        );
        worker.stop().await;

        let calls = sink.record.calls();
        assert_eq!(calls.len(), 5, "three POSTs, two PUTs");
        let mut parents = std::collections::HashSet::new();
        for call in &calls {
            assert_eq!(call.version, version, "MAIN_SERVER_HTTP2={http2}");
            let (trace, parent, flags) = sent(call);
            assert_eq!(
                trace, "4bf92f3577b34da6a3ce929d0e0e4736",
                "the producer's trace: {call:?}"
            );
            assert_eq!(flags, "01", "the producer's flags");
            assert_ne!(parent, "00f067aa0ba902b7", "the parent id is courier's own");
            parents.insert(parent);
            assert_eq!(call.tracestate.as_deref(), Some("congo=t61rcWkgMzE"), "{call:?}");
        }
        assert_eq!(parents.len(), 5, "a new parent id for every request");
    }
}

#[tokio::test]
async fn a_message_without_traceparent_gets_one_trace_id_for_every_attempt_and_its_dead_letter() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    // Two 503s, then a 400: retried twice, then dead.
    let sink = sink::Sink::start(
        "127.0.0.1:0".parse().unwrap(),
        &pki.sink_tls(),
        std::sync::Arc::new(|call: &Call| match call.endpoint {
            Endpoint::Deliver if call.attempt <= 2 => Reply::status(503),
            Endpoint::Deliver => Reply::status(400),
            Endpoint::Status => Reply::status(200),
        }),
    )
    .await
    .unwrap();
    enqueue(&redis, Q, &[message("untraced")]).await;
    let worker = worker_on(&redis, &sink, &pki, "w-untraced", &[]).await;
    assert!(
        sink.wait_for(WAIT, |r| r.deliveries().len() == 3 && r.statuses().len() == 3)
            .await
    );
    eventually(|| async { len(&redis, &keys().dead).await == 1 }).await;
    worker.stop().await;

    let calls = sink.record.calls();
    let traces: std::collections::HashSet<String> = calls.iter().map(|c| sent(c).0).collect();
    assert_eq!(traces.len(), 1, "one trace for every attempt and status: {traces:?}");
    let trace = traces.into_iter().next().unwrap();
    assert_ne!(trace, "0".repeat(32));
    assert!(calls.iter().all(|c| c.tracestate.is_none()), "no tracestate was given");
    let parents: std::collections::HashSet<String> = calls.iter().map(|c| sent(c).1).collect();
    assert_eq!(parents.len(), calls.len(), "a new parent id per request");

    let dead = dead_letters(&redis, Q).await;
    assert_eq!(dead[0]["trace_id"], trace.as_str(), "the dead letter names the trace");
    let kept: serde_json::Value = serde_json::from_str(dead[0]["message"].as_str().unwrap()).unwrap();
    assert!(kept["traceparent"].as_str().unwrap().contains(&trace), "{kept}");
    assert_eq!(kept["payload"]["n"], "untraced", "the rest of the item is kept");

    // `dlq show` prints it.
    let vars = env(&redis, &sink.url(), &pki, "w-cli", &[]);
    let out = run_courier(&vars, pki.dir.path(), &["dlq", "show", "untraced"]).await;
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains(&format!("\"trace_id\": \"{trace}\"")), "{shown}");
}

#[tokio::test]
async fn malformed_traceparents_are_replaced_never_forwarded_and_never_fail_the_delivery() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let bad = [
        ("short", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0"),
        ("long", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"),
        ("version-ff", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("zero-trace", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        ("zero-parent", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
        ("upper-case", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"),
    ];
    let items: Vec<String> = bad
        .iter()
        .map(|(id, tp)| format!(r#"{{"message_id":"{id}","traceparent":"{tp}","tracestate":"vendor=secret"}}"#))
        .chain([r#"{"message_id":"not-a-string","traceparent":42}"#.to_string()])
        .collect();
    enqueue(&redis, Q, &items).await;
    let worker = worker_on(&redis, &sink, &pki, "w-bad-trace", &[]).await;
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == items.len()).await);
    worker.stop().await;
    for call in sink.record.deliveries() {
        let (trace, parent, _) = sent(&call);
        assert_ne!(
            trace, "4bf92f3577b34da6a3ce929d0e0e4736",
            "a new trace for {}",
            call.message_id
        );
        assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736".to_uppercase());
        assert_ne!(parent, "00f067aa0ba902b7");
        assert_eq!(call.tracestate, None, "a bad traceparent's tracestate is dropped too");
    }
    assert_eq!(len(&redis, &keys().dead).await, 0, "none failed for it");
}

#[tokio::test]
async fn trace_context_off_sends_no_trace_headers() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::fail_first(1, 503)).await;
    let item = format!(r#"{{"message_id":"quiet","traceparent":"{PRODUCER}","tracestate":"a=b"}}"#);
    enqueue(&redis, Q, &[item]).await;
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-quiet",
        &[("MAIN_SERVER_TRACE_CONTEXT", "false")],
    )
    .await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == 1 && r.statuses().len() == 1)
            .await
    );
    worker.stop().await;
    let calls = sink.record.calls();
    assert_eq!(calls.len(), 3);
    for call in calls {
        assert_eq!((call.traceparent, call.tracestate), (None, None), "{:?}", call.endpoint);
    }
}

/// Every line of a whole run, on stdout and in the log file, is one JSON object with the
/// common keys; the lines about a retry, a dead letter, an invalid item, the circuit and the
/// shutdown carry their fields as keys.
#[tokio::test]
async fn json_logs_are_one_valid_object_per_line_for_a_whole_run() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    // "retry-*" fail once; "reject" is refused; the first six deliveries of "down-*" fail,
    // which opens the circuit, and the probe after them closes it.
    let down = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let sink = sink::Sink::start(
        "127.0.0.1:0".parse().unwrap(),
        &pki.sink_tls(),
        std::sync::Arc::new(move |call: &Call| match call.endpoint {
            Endpoint::Status => Reply::status(200),
            _ if call.message_id == "reject" => Reply::status(400),
            _ if call.message_id.starts_with("retry") && call.attempt == 1 => Reply::status(503),
            _ if call.message_id.starts_with("down") && down.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 6 => {
                Reply::status(503)
            }
            _ => Reply::status(200),
        }),
    )
    .await
    .unwrap();
    let mut items = vec![message("retry-1"), message("reject"), "not json".to_string()];
    items.extend((0..6).map(|n| message(&format!("down-{n}"))));
    enqueue(&redis, Q, &items).await;
    let vars = env(
        &redis,
        &sink.url(),
        &pki,
        "w-json",
        &[
            ("LOG_FORMAT", "json"),
            ("WORKER_CONCURRENCY", "1"),
            ("WORKER_BREAKER_MIN_ATTEMPTS", "3"),
            ("WORKER_BREAKER_PROBE_MIN", "0.05"),
            ("WORKER_BREAKER_PROBE_MAX", "0.1"),
            ("WORKER_RETRY_INTERVAL", "0.05"),
        ],
    );
    let mut child = spawn_worker(&vars, pki.dir.path());
    let mut lines = Lines::new(&mut child);
    lines.wait_for("circuit closed").await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == 7).await,
        "retry-1 and six down-*"
    );
    signal(&child, "TERM");
    lines.rest().await;
    let status = tokio::time::timeout(WAIT, child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");

    let mut file_lines = Vec::new();
    for entry in std::fs::read_dir(pki.dir.path().join("logs")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        file_lines.extend(text.lines().map(str::to_string));
    }
    assert_eq!(file_lines, lines.seen, "the file holds the same lines as stdout");
    let parsed: Vec<serde_json::Value> = lines
        .seen
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    for line in &parsed {
        let ts = line["ts"].as_str().unwrap_or_else(|| panic!("no ts: {line}"));
        assert!(ts.len() == 24 && ts.ends_with('Z'), "RFC 3339 UTC with ms: {ts}");
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
        assert!(
            ["INFO", "WARNING", "ERROR"].contains(&line["level"].as_str().unwrap_or("")),
            "{line}"
        );
        assert_eq!(line["worker_id"], "w-json");
        assert!(line["message"].is_string(), "{line}");
    }
    let find = |needle: &str| {
        parsed
            .iter()
            .find(|l| l["message"].as_str().unwrap_or("").contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{}", lines.seen.join("\n")))
    };
    let retry = find("will retry");
    assert_eq!(retry["message_id"], "retry-1");
    assert_eq!(retry["attempt"], 1);
    assert_eq!(retry["trace_id"].as_str().map(str::len), Some(32), "{retry}");
    assert!(retry["error"].as_str().unwrap().contains("503"), "{retry}");
    let dead = find("moved to the dead-letter list");
    assert_eq!(
        (&dead["message_id"], &dead["reason"]),
        (&"reject".into(), &"rejected".into())
    );
    assert_eq!(
        dead["trace_id"],
        dead_letters(&redis, Q)
            .await
            .iter()
            .find(|d| d["message_id"] == "reject")
            .unwrap()["trace_id"]
    );
    let invalid = find("Invalid message");
    assert_eq!(invalid["reason"], "invalid_json");
    assert!(invalid["error"].is_string());
    let open = find("circuit open");
    assert_eq!(open["level"], "WARNING");
    assert!(open["from"].is_string() && open["next_probe_in"].is_string(), "{open}");
    find("circuit closed");
    find("Shutdown requested");
}

#[tokio::test]
async fn where_finds_a_message_in_each_place() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let k = keys();
    let mut conn = redis.conn().await;
    let other = courier::queue::Keys::new("second");
    // Ready: pushed at the head, claimed from the tail, so "r-a" (pushed first) is next.
    let _: () = conn.lpush(&k.ready, message("r-a")).await.unwrap();
    let _: () = conn.lpush(&k.ready, message("r-b")).await.unwrap();
    // 600 more items, so the list is read in several pages.
    let filler: Vec<String> = (0..600).map(|n| message(&format!("filler-{n}"))).collect();
    let _: () = conn.lpush(&k.ready, &filler).await.unwrap();
    // In a worker's processing list (the worker is known by its heartbeat entry).
    let _: () = conn.zadd(&k.workers, "w-holder", 1).await.unwrap();
    let _: () = conn.lpush(k.processing("w-holder"), message("held")).await.unwrap();
    // Due for retry in about an hour, after 3 attempts.
    let now_ms = chrono::Utc::now().timestamp_millis();
    let retried = r#"{"attempt_count":3,"message_id":"later","payload":1}"#;
    let _: () = conn.zadd(&k.retry, retried, now_ms + 3_600_000).await.unwrap();
    // Dead, in the second queue.
    let record = courier::message::dead_letter_traced(
        message("gone").as_bytes(),
        courier::message::DeadReason::Rejected,
        "main server answered HTTP 400: no",
        "w-x",
        Some("gone"),
        courier::trace::parse_traceparent(PRODUCER.as_bytes()).map(|(id, _)| id),
    );
    let _: () = conn.lpush(&other.dead, record).await.unwrap();

    let sink = start_sink(&pki, sink::always_ok()).await;
    let vars = env(
        &redis,
        &sink.url(),
        &pki,
        "w-cli",
        &[("REDIS_QUEUE_NAMES", "message_queue,second")],
    );
    let run = |id: &'static str| {
        let vars = vars.clone();
        let dir = pki.dir.path().to_path_buf();
        async move {
            let out = run_courier(&vars, &dir, &["where", id]).await;
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            )
        }
    };
    let (code, out, _) = run("r-a").await;
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "message_queue: ready, position 1 (1 is claimed next)")
    );
    let (_, out, _) = run("r-b").await;
    assert_eq!(out, "message_queue: ready, position 2 (1 is claimed next)");
    let (_, out, _) = run("filler-0").await;
    assert_eq!(
        out, "message_queue: ready, position 3 (1 is claimed next)",
        "found past the first page"
    );
    let (_, out, _) = run("held").await;
    assert_eq!(
        out,
        "message_queue: processing, claimed by worker w-holder and not yet settled"
    );
    let (_, out, _) = run("later").await;
    assert!(out.starts_with("message_queue: retry due at 20"), "{out}");
    assert!(out.contains("(in 3599.") || out.contains("(in 3600.0 s)"), "{out}");
    assert!(out.ends_with("attempt_count 3"), "{out}");
    let (_, out, _) = run("gone").await;
    assert!(out.starts_with("second: dead since 20"), "{out}");
    assert!(
        out.contains("reason rejected, trace_id 4bf92f3577b34da6a3ce929d0e0e4736: main server answered HTTP 400: no"),
        "{out}"
    );
    let (code, out, err) = run("nowhere").await;
    assert_eq!((code, out.as_str()), (Some(1), ""));
    assert!(err.contains("\"nowhere\" is in none of message_queue,second"), "{err}");
}
