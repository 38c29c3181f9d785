//! What must hold for any outside bytes, one function per parser: the cargo-fuzz targets in
//! `fuzz/` and the property tests in `tests/it/properties.rs` call these same checks, so both
//! hunt for the same failures. Each returns normally or panics with what broke.
//! Built with the `fuzzing` feature only; nothing in the worker calls it.

use crate::config::Settings;
use crate::delivery::{idempotency_key, parse_retry_after, status_url, DeliveryError};
use crate::message::{dead_letter, parse_dead_letter, DeadReason, Envelope};
use crate::policy::{decide, Policy, Settle, MAX_RETRY_AFTER};

/// A queue item: `Envelope::parse` through to the delivery body, the retried copy (and its
/// trace context), the Idempotency-Key header and the status URL.
pub fn queue_item(data: &[u8]) {
    let envelope = match Envelope::parse(data.to_vec(), 1 << 20) {
        Ok(envelope) => envelope,
        Err((raw, _)) => {
            assert_eq!(raw, data, "a refused item comes back byte for byte");
            return;
        }
    };
    let id = envelope.message_id();
    // courier keeps unknown fields as raw bytes; serde_json's `Value` refuses some of them
    // (numbers out of f64 range), so the comparisons by value apply only when it can read them.
    let original: Option<serde_json::Value> = serde_json::from_slice(data).ok();

    let body = envelope.delivery_body("\"w\"");
    if let Some(original) = &original {
        let body: serde_json::Value = serde_json::from_slice(&body).expect("the delivery body is JSON");
        assert_eq!(body["message_id"], id, "the body carries the id");
        assert_eq!(body["attempt"], u64::from(envelope.attempt_count()) + 1);
        assert_eq!(body["worker_id"], "w");
        assert_eq!(
            body.get("payload"),
            original.get("payload"),
            "the payload is forwarded as it is"
        );
    }

    if let Some(next) = envelope.attempt_count().checked_add(1) {
        let plain = envelope.with_attempt_count(next);
        let again = Envelope::parse(plain.clone(), usize::MAX).expect("a copy with a new attempt_count parses");
        assert_eq!((again.message_id(), again.attempt_count()), (id, next));
        if let Some(original) = &original {
            let mut before = original.clone();
            let mut after: serde_json::Value = serde_json::from_slice(&plain).expect("JSON");
            for value in [&mut before, &mut after] {
                if let Some(fields) = value.as_object_mut() {
                    fields.remove("attempt_count");
                }
            }
            assert_eq!(before, after, "only attempt_count changes");
        }

        let retried = envelope.retried(next);
        let again = Envelope::parse(retried.clone(), usize::MAX).expect("a retried copy parses");
        assert_eq!((again.message_id(), again.attempt_count()), (id, next));
        assert!(again.carries_trace(), "a retried copy carries a valid traceparent");
        assert_eq!(
            again.trace_id(),
            envelope.trace_id(),
            "every attempt shares one trace id"
        );
        if envelope.carries_trace() {
            assert_eq!(again.trace(), envelope.trace(), "the producer's trace context is kept");
        }
        if let Some(original) = &original {
            let mut before = original.clone();
            let mut after: serde_json::Value = serde_json::from_slice(&retried).expect("JSON");
            for value in [&mut before, &mut after] {
                if let Some(fields) = value.as_object_mut() {
                    fields.remove("attempt_count");
                    if !envelope.carries_trace() {
                        fields.remove("traceparent");
                    }
                }
            }
            assert_eq!(
                before, after,
                "only attempt_count (and a missing or bad traceparent) changes"
            );
        }
    }

    assert_eq!(
        idempotency_key(id).as_bytes(),
        id.as_bytes(),
        "the Idempotency-Key is exactly the id"
    );
    let base = url::Url::parse("https://main.example:8000/api/").expect("base");
    let url = status_url(&base, id);
    let segments: Vec<&str> = url.path().split('/').collect();
    assert_eq!(segments.len(), 6, "one segment for the id: {}", url.path());
    assert_eq!(
        (segments[1], segments[2], segments[3], segments[5]),
        ("api", "internal", "messages", "status")
    );
    let decoded = percent_encoding::percent_decode_str(segments[4]).decode_utf8_lossy();
    assert_eq!(decoded, id, "the server reads back exactly the id");
    assert!(url.query().is_none() && url.fragment().is_none(), "{url}");
}

/// A config file's text, with a few variables set: loads or is refused with one line.
pub fn config_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| match name {
        "REDIS_PASSWORD" => Some("p\"q\\ # ${X}".to_string()),
        "SOME_VAR" => Some("value".to_string()),
        _ => None,
    };
    if let Err(e) = Settings::from_text(Some((std::path::Path::new("fuzz.yaml"), text)), &env) {
        let line = crate::telemetry::one_line(&e);
        assert!(!line.is_empty());
        assert!(!line.contains("p\"q"), "the password never shows in an error: {line}");
    }
}

/// The same bytes as each numeric worker setting and as `MAIN_SERVER_OUTCOMES`: refused with
/// one line naming the setting, or loaded as a value the code can use (the rate limit's wait,
/// the retry waits and the breaker's clock arithmetic never panic; a 2xx is always delivered).
pub fn worker_numbers(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for name in [
        "WORKER_RATE_LIMIT",
        "WORKER_RETRY_INTERVAL",
        "WORKER_RETRY_JITTER",
        "WORKER_RETRY_MAX_INTERVAL",
        "WORKER_MAX_ATTEMPTS",
        "WORKER_CONCURRENCY",
        "WORKER_BATCH_SIZE",
        "WORKER_BREAKER_FAILURE_RATE",
        "WORKER_BREAKER_MIN_ATTEMPTS",
        "WORKER_BREAKER_WINDOW",
        "WORKER_BREAKER_PROBE_MIN",
        "WORKER_BREAKER_PROBE_MAX",
        "WORKER_BREAKER_SAME_STATUS",
        "MAIN_SERVER_OUTCOMES",
    ] {
        let env = |var: &str| match var {
            "WORKER_RETRY_BACKOFF" => Some("exponential".to_string()),
            _ if var == name => Some(text.to_string()),
            _ => None,
        };
        let worker = match Settings::from_text(None, &env) {
            Ok(settings) => settings.worker,
            Err(e) => {
                let line = crate::telemetry::one_line(&e);
                assert!(line.contains(name) && !line.contains('\n'), "{line}");
                continue;
            }
        };
        if worker.rate_limit > 0.0 {
            assert!(std::time::Duration::try_from_secs_f64(1.0 / worker.rate_limit).is_ok());
        }
        let policy = Policy {
            max_attempts: worker.max_attempts,
            retry_interval: worker.retry_interval,
            max_retry_after: MAX_RETRY_AFTER,
            backoff: worker.retry_backoff,
            jitter: worker.retry_jitter,
        };
        for failures in [1, 2, 40, u32::MAX] {
            let _ = policy.interval(failures, 0.999);
        }
        let now = std::time::Instant::now();
        let mut breaker = crate::breaker::Breaker::new(worker.breaker, now);
        for i in 0..200u64 {
            let at = now + std::time::Duration::from_millis(i);
            let verdict = match i % 3 {
                0 => crate::breaker::Verdict::ServerFault,
                1 => crate::breaker::Verdict::Rejected(404),
                _ => crate::breaker::Verdict::Success,
            };
            breaker.record(verdict, i % 2 == 0, at);
            let _ = breaker.admit(worker.concurrency, at + std::time::Duration::from_secs(86_400));
        }
        for status in 100..600u16 {
            let outcome = crate::policy::Outcomes::from(&worker.outcomes).classify(&Err(DeliveryError::Status {
                status,
                retry_after: None,
                body: String::new(),
            }));
            if (200..300).contains(&status) {
                assert_eq!(outcome.kind, crate::policy::Kind::Delivered, "{status}");
            }
        }
    }
}

/// A REDIS_URL: loaded only when it is `redis[s]://[user[:password]@]host[:port][/db]` with
/// nothing after (a query or fragment would be ignored, so it is refused); refused with one
/// line naming REDIS_URL that never repeats the URL's password.
pub fn redis_url(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| match name {
        "REDIS_URL" => Some(text.to_string()),
        _ => None,
    };
    match Settings::from_text(None, &env) {
        Ok(settings) => {
            let url = url::Url::parse(text.trim()).expect("a URL that loaded parses");
            assert!(url.query().is_none() && url.fragment().is_none(), "{text:?}");
            assert_eq!(
                url.password().is_some(),
                !settings.redis.password.is_empty(),
                "{text:?}"
            );
        }
        Err(e) => {
            let line = crate::telemetry::one_line(&e);
            assert!(line.contains("REDIS_URL") && !line.contains('\n'), "{line}");
            if let Some(password) = url::Url::parse(text.trim())
                .ok()
                .and_then(|u| u.password().map(str::to_string))
            {
                assert!(
                    password.len() < 4 || !line.contains(&password),
                    "the password shows: {line}"
                );
            }
        }
    }
}

/// A Retry-After header value: parsed or ignored, and the wait it leads to is never longer
/// than the retry interval or the cap, whichever is longer.
pub fn retry_after(data: &[u8]) {
    let Ok(value) = hyper::header::HeaderValue::from_bytes(data) else {
        return;
    };
    let policy = Policy {
        max_attempts: 10,
        retry_interval: std::time::Duration::from_secs(30),
        max_retry_after: MAX_RETRY_AFTER,
        backoff: crate::policy::Backoff::Fixed,
        jitter: 0.0,
    };
    let answer = Err(DeliveryError::Status {
        status: 503,
        retry_after: parse_retry_after(&value),
        body: String::new(),
    });
    match decide(&crate::policy::Outcomes::default().classify(&answer), 0, &policy, 0.5) {
        Settle::Retry { delay, failures: 1 } => assert!(delay <= MAX_RETRY_AFTER, "{delay:?}"),
        other => panic!("a 503 is retried: {other:?}"),
    }
}

/// A dead-letter record as `courier dlq` reads it; and any item written as a record and read
/// back is the same item.
pub fn dead_letter_record(data: &[u8]) {
    let read = parse_dead_letter(data);
    if read.fields.is_null() {
        assert_eq!(read.message, data, "a foreign record is kept whole");
    }
    let record = dead_letter(data, DeadReason::Rejected, "e\n\u{1b}", "w", Some("id\n"));
    let back = parse_dead_letter(&record);
    assert_eq!(back.message, data, "the item survives a round trip");
    assert_eq!(back.fields["reason"], "rejected");
    assert!(record.len() <= data.len() + 512, "no amplification");
}

/// A dead letter's header as filters and stats read it (`read_dead_header`, the typed fast
/// path): the same fields and message as `parse_dead_letter` reads, whenever
/// `serde_json::Value` can read the header line; and the letter's accessors and JSON never
/// panic on it.
pub fn dlq_header(data: &[u8]) {
    use crate::message::{read_dead_header, DeadHeader};
    let (header, message) = read_dead_header(data);
    let slow = parse_dead_letter(data);
    let line_reads = data
        .iter()
        .position(|&b| b == b'\n')
        .is_none_or(|newline| serde_json::from_slice::<serde_json::Value>(&data[..newline]).is_ok());
    if line_reads {
        assert_eq!(
            header,
            DeadHeader::from_fields(&slow.fields),
            "the typed header reads as the JSON one"
        );
        assert_eq!(message, slow.message, "the same message");
    }
    let letter = crate::dlq::Letter::read(crate::queue::DeadSlot {
        position: 1,
        size: u64::try_from(data.len()).unwrap_or(u64::MAX),
        bytes: data.to_vec(),
        hit: true,
        sha: String::new(),
    });
    if let Some(status) = letter.status() {
        assert!(header.status.is_some() || (100..=999).contains(&status), "{status}");
    }
    let _ = letter.dead_at();
    let json = letter.to_json();
    assert_eq!(json["position"], 1);
    let filter = crate::dlq::Filter {
        reason: vec!["rejected".into()],
        status: vec![422],
        since: Some(chrono::DateTime::<chrono::Utc>::MIN_UTC),
        ..crate::dlq::Filter::default()
    };
    let _ = filter.matches(&letter, true);
    let _ = crate::dlq::fold_error(letter.error());
}

/// A time bound (`--since 2h`, `until=2025-01-15T10:00:00Z`): a time, or refused with one line
/// that says what is accepted. A duration is never in the future.
pub fn time_bound(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now = chrono::DateTime::parse_from_rfc3339("2025-01-15T12:00:00Z")
        .map(|t| t.with_timezone(&chrono::Utc))
        .expect("a fixed time");
    match crate::dlq::parse_time_bound(text, now) {
        Ok(at) => {
            if chrono::DateTime::parse_from_rfc3339(text.trim()).is_err() {
                assert!(at <= now, "a duration back from now: {text:?}");
            }
        }
        Err(e) => {
            assert!(e.contains("RFC 3339") && e.contains("duration"), "{e}");
            assert!(!e.contains('\n') || text.contains('\n'), "one line: {e}");
        }
    }
}

/// The admin API's input: the first byte picks the query string of a GET (`/dlq?reason=...`)
/// or the JSON body of a POST (`/dlq/requeue`); the rest is that input. Read or refused with a
/// message, never a panic; a POST that is read never acts on everything unasked, and its rate
/// is a usable number.
pub fn admin_input(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let now = chrono::Utc::now();
    if first & 1 == 0 {
        let Ok(query) = std::str::from_utf8(rest) else {
            return;
        };
        match crate::admin::dlq::read_query(query, now) {
            Ok((_, filter)) => assert!(filter.grep.as_deref() != Some(""), "an empty grep is no filter"),
            Err(e) => assert!(!e.is_empty()),
        }
    } else {
        match crate::admin::dlq::read_act(rest, now) {
            Ok((act, filter)) => {
                assert!(act.all || !filter.is_empty(), "everything only with \"all\"");
                if let Some(rate) = act.rate {
                    assert!(rate.is_finite() && rate > 0.0);
                    assert!(std::time::Duration::try_from_secs_f64(1.0 / rate).is_ok());
                }
            }
            Err(e) => assert!(!e.is_empty()),
        }
    }
}

/// The page script's reply as RESP bytes (what a Redis, or something posing as one, sends):
/// read into a page or an empty one, never a panic, no more slots than the reply holds; each
/// slot reads as a letter.
pub fn dlq_page_reply(data: &[u8]) {
    let Ok(value) = redis::parse_redis_value(data) else {
        return;
    };
    let items = match &value {
        redis::Value::Array(items) => items.len(),
        _ => 0,
    };
    let page = crate::queue::parse_page(value);
    assert!(page.slots.len() <= items.saturating_sub(5));
    for slot in page.slots {
        let _ = crate::dlq::Letter::read(slot).to_json();
    }
}

/// The main server's answer to a request, as `delivery::h1::Connection` reads it from a stream
/// that holds `data` after its first byte. That byte picks how many bytes each read brings (1
/// to 64) and whether the request was a HEAD. Read whole and read in pieces, the answer must
/// come out the same, whether the connection may carry another request included; and the body
/// kept is never over `MAX_RESPONSE_BODY`, and only an error's.
pub fn http_answer(data: &[u8]) {
    let Some((&first, answer)) = data.split_first() else {
        return;
    };
    let to_head = first & 0x80 != 0;
    let piece = usize::from(first & 0x3f).saturating_add(1);
    let whole = exchange_with(answer, answer.len().max(1), to_head);
    let pieces = exchange_with(answer, piece, to_head);
    assert_eq!(whole, pieces, "read {piece} bytes at a time, the answer reads the same");
    if let Ok((status, body, _)) = &whole {
        assert!(body.len() <= crate::delivery::h1::MAX_RESPONSE_BODY);
        assert!(
            body.is_empty() || !(200..300).contains(status),
            "only an error's body is kept"
        );
    }
}

/// What one exchange over `answer`, `piece` bytes a read, comes to: status, kept body and
/// whether the connection could be kept, or the failure by name. Bytes after the answer that
/// were not read yet make the connection one not to keep, as `Connection::is_open` finds on a
/// real one.
fn exchange_with(answer: &[u8], piece: usize, to_head: bool) -> Result<(u16, Vec<u8>, bool), String> {
    use crate::delivery::h1::{Connection, Failure, Outgoing};
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stream = Pieces {
        answer: answer.to_vec(),
        at: read.clone(),
        piece,
    };
    let mut connection = Connection::new(stream);
    let path = hyper::http::uri::PathAndQuery::from_static("/internal/messages/deliver");
    let headers = hyper::HeaderMap::new();
    let request = Outgoing {
        method: if to_head {
            hyper::Method::HEAD
        } else {
            hyper::Method::POST
        },
        path: &path,
        headers: &headers,
        extra: &[],
        trace: None,
        body: bytes::Bytes::from_static(b"{}"),
    };
    let host = hyper::header::HeaderValue::from_static("main");
    let mut arrived = None;
    let exchange = connection.exchange(&request, &host, &mut arrived);
    let mut exchange = std::pin::pin!(exchange);
    // The stream is always ready, so the exchange never waits: one poll finishes it.
    let Poll::Ready(result) = exchange.as_mut().poll(&mut Context::from_waker(Waker::noop())) else {
        panic!("an exchange over a ready stream waited");
    };
    match result {
        Ok(exchanged) => {
            let all_read = read.load(std::sync::atomic::Ordering::Relaxed) == answer.len();
            Ok((
                exchanged.answer.status.as_u16(),
                exchanged.answer.body,
                exchanged.reusable && all_read,
            ))
        }
        Err(Failure::Answer(e)) => Err(e.to_string()),
        Err(Failure::Unanswered(e)) => Err(format!("unanswered: {:?}", e.kind())),
        Err(Failure::Broken(e)) => Err(format!("broken: {:?}", e.kind())),
    }
}

/// A stream that takes any write and reads `answer` back `piece` bytes at a time, then ends.
struct Pieces {
    answer: Vec<u8>,
    at: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    piece: usize,
}

impl tokio::io::AsyncRead for Pieces {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let at = self.at.load(std::sync::atomic::Ordering::Relaxed);
        let rest = self.answer.get(at..).unwrap_or_default();
        let n = rest.len().min(self.piece).min(buf.remaining());
        buf.put_slice(rest.get(..n).unwrap_or_default());
        self.at
            .store(at.saturating_add(n), std::sync::atomic::Ordering::Relaxed);
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Pieces {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// How a scripted stream ends once every answer has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    Reset,
    /// The server neither answers nor closes: the request timeout ends it.
    Pending,
}

/// What one exchange came to, as both clients are compared on it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// No answer: refused, broken before its head ended, or timed out before its head.
    Failed(String),
    Answered {
        status: u16,
        /// The body read: courier's to its cap and an error's only (it keeps no success's),
        /// hyper's whole.
        body: Vec<u8>,
        /// The body was read to its end.
        complete: bool,
        /// The connection could carry the next request.
        reusable: bool,
    },
}

/// How long either client waits for a stalled stream (paused time: no real wait).
const STALL: std::time::Duration = std::time::Duration::from_secs(10);

/// The limits small enough for a fuzzer's inputs to reach.
const SMALL: crate::delivery::h1::Limits = crate::delivery::h1::Limits {
    head: 200,
    interim: 2,
    line: 24,
    framing: 96,
    body: 48,
};

/// Where one answer ends and the next begins in a differential input.
const NEXT: &[u8] = b"\0\0";

/// The same answers read by courier's HTTP/1.1 client (`delivery::h1`) and by hyper's
/// (`hyper::client::conn::http1`) over the same scripted stream must come out the same:
/// status, kept body, whether the body completed, whether the connection may carry the next
/// request. The first byte picks how many bytes a read brings (1 to 16), whether the requests
/// are HEADs, small limits, and how the stream ends after the last answer (EOF, a reset, or
/// never: the request timeout). The rest is up to four answers, separated by two NUL bytes,
/// each released when its request is written (a server answers what it was asked), so an
/// exchange that reads past its answer's framing finds nothing or the wrong answer.
///
/// Differences that are courier's choice, each allowed by `allowed` below and only there:
/// - courier's bounds (head, interim answers, chunk framing, trailers, body cap) are its own:
///   past one, courier stops where hyper may read on;
/// - a trailer line ending in a bare LF: courier refuses it as it does in chunk lines
///   (RFC 9112 section 2.2 lets a recipient accept it; hyper takes it inside the trailer);
/// - a 101: courier never asks to switch protocols, so it refuses one; hyper hands it over;
/// - courier closes where hyper may keep the connection (never the reverse): an HTTP/1.0
///   answer (courier does not offer 1.0 keep-alive), Transfer-Encoding beside
///   Content-Length (RFC 9112 section 6.3 says close), a `Connection` value hyper cannot read
///   as text (courier reads its bytes and finds `close`), a body read to the cap.
pub fn http_differential(data: &[u8]) {
    let Some((&config, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(config & 0x0f).saturating_add(1);
    let to_head = config & 0x10 != 0;
    let limits = if config & 0x20 != 0 {
        SMALL
    } else {
        crate::delivery::h1::Limits::DEFAULT
    };
    let end = match config >> 6 {
        0 => End::Eof,
        1 => End::Reset,
        _ => End::Pending,
    };
    let answers: Vec<Vec<u8>> = split(rest, NEXT).take(4).map(<[u8]>::to_vec).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let ours = runtime.block_on(courier_reads(Script::new(&answers, piece, end), to_head, limits));
    let theirs = runtime.block_on(hyper_reads(Script::new(&answers, piece, end), to_head));
    for (n, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
        let answer = answers.get(n).map_or(&[][..], Vec::as_slice);
        match allowed(ours, theirs, answer, to_head, &limits) {
            Verdict::Same => {}
            Verdict::StopHere => return,
            Verdict::Differ => {
                let shown: Vec<String> = answers.iter().map(|a| a.escape_ascii().to_string()).collect();
                panic!(
                    "answer {n} of {shown:?} (reads of {piece}, HEAD {to_head}, {end:?}, {limits:?}):\n courier {ours:?}\n hyper   {theirs:?}"
                )
            }
        }
    }
    assert!(
        ours.len() == theirs.len() || matches!(ours.last(), Some(Seen::Answered { reusable: false, .. })),
        "courier went on where hyper stopped: {ours:?} / {theirs:?}"
    );
}

/// `data` split at each `separator`.
fn split<'a>(data: &'a [u8], separator: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let now = rest?;
        match now.windows(separator.len()).position(|w| w == separator) {
            Some(at) => {
                rest = now.get(at.saturating_add(separator.len())..);
                now.get(..at)
            }
            None => {
                rest = None;
                Some(now)
            }
        }
    })
}

enum Verdict {
    Same,
    /// A listed difference: what follows on the connection is not compared.
    StopHere,
    Differ,
}

/// Whether courier's reading of one answer may differ from hyper's, by the list in
/// `http_differential`.
fn allowed(ours: &Seen, theirs: &Seen, answer: &[u8], to_head: bool, limits: &crate::delivery::h1::Limits) -> Verdict {
    use crate::delivery::h1::AnswerError;
    // Failures compare by kind alone: each client names its own.
    if ours == theirs || matches!((ours, theirs), (Seen::Failed(_), Seen::Failed(_))) {
        return Verdict::Same;
    }
    let refusal = courier_refusal(answer, to_head, limits);
    let own_bound = matches!(
        refusal,
        Some(AnswerError::HeadTooLarge | AnswerError::TooManyInterim)
            | Some(AnswerError::BadChunk(
                "a chunk size line is too long"
                    | "a trailer line is too long"
                    | "too much chunk framing"
                    | "too many trailers"
                    | "a trailer line ends in a bare LF"
            ))
    );
    match (ours, theirs) {
        (Seen::Failed(_), Seen::Answered { status: 101, .. }) if refusal == Some(AnswerError::SwitchedProtocols) => {
            Verdict::StopHere
        }
        (Seen::Failed(_), _) | (Seen::Answered { complete: false, .. }, _) if own_bound => Verdict::StopHere,
        (
            Seen::Answered {
                status,
                body,
                complete,
                reusable,
            },
            Seen::Answered {
                status: their_status,
                body: their_body,
                complete: their_complete,
                reusable: their_reusable,
            },
        ) if status == their_status => {
            // hyper's whole body is kept, so that courier's cap shows for a success too.
            let capped = their_body.len() >= limits.body;
            let kept = if (200..300).contains(status) {
                &[][..]
            } else {
                their_body.get(..their_body.len().min(limits.body)).unwrap_or_default()
            };
            if body.as_slice() != kept {
                return Verdict::Differ;
            }
            if capped {
                // courier stopped at its cap: how the rest ends is not its to say.
                return if *reusable { Verdict::Differ } else { Verdict::StopHere };
            }
            if complete != their_complete {
                return Verdict::Differ;
            }
            if reusable == their_reusable {
                return Verdict::Same;
            }
            if !*reusable && *their_reusable && hyper_keeps_what_courier_closes(answer) {
                return Verdict::StopHere;
            }
            Verdict::Differ
        }
        _ => Verdict::Differ,
    }
}

/// Why courier refuses `answer`, read on its own with the sans-IO parser: its head's error or
/// its body's, after any interim answers.
fn courier_refusal(
    answer: &[u8],
    to_head: bool,
    limits: &crate::delivery::h1::Limits,
) -> Option<crate::delivery::h1::AnswerError> {
    use crate::delivery::h1::{parse_head, BodyReader, Parsed};
    let mut at = 0usize;
    let head = loop {
        match parse_head(answer.get(at..).unwrap_or_default(), to_head, limits) {
            Err(e) => return Some(e),
            Ok(None) => return None,
            Ok(Some((used, Parsed::Interim))) => at = at.saturating_add(used),
            Ok(Some((used, Parsed::Final(head)))) => {
                at = at.saturating_add(used);
                break head;
            }
        }
    };
    let mut reader = BodyReader::new(head.framing, limits);
    let mut rest = answer.get(at..).unwrap_or_default();
    while !reader.is_done() {
        match reader.step(rest) {
            Err(e) => return Some(e),
            Ok((0, _)) => return None,
            Ok((used, _)) => rest = rest.get(used..).unwrap_or_default(),
        }
    }
    None
}

/// Whether `answer`'s final head is one courier does not keep the connection for while hyper
/// may: HTTP/1.0, Transfer-Encoding with Content-Length, a Connection value that is not text.
fn hyper_keeps_what_courier_closes(answer: &[u8]) -> bool {
    let mut at = 0usize;
    loop {
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut head = httparse::Response::new(&mut slots);
        let rest = answer.get(at..).unwrap_or_default();
        let Ok(httparse::Status::Complete(used)) = httparse::ParserConfig::default()
            .allow_obsolete_multiline_headers_in_responses(true)
            .parse_response(&mut head, rest)
        else {
            return false;
        };
        if head.code.is_some_and(|code| (100..200).contains(&code) && code != 101) {
            at = at.saturating_add(used);
            continue;
        }
        let has = |name: &str| head.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
        return head.version == Some(0)
            || (has("transfer-encoding") && has("content-length"))
            || head.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("connection")
                    && hyper::header::HeaderValue::from_bytes(h.value).is_ok_and(|v| v.to_str().is_err())
            });
    }
}

/// The request both clients send: a POST (or HEAD) of `{}`.
fn differential_request(to_head: bool) -> hyper::Method {
    if to_head {
        hyper::Method::HEAD
    } else {
        hyper::Method::POST
    }
}

async fn courier_reads(script: Script, to_head: bool, limits: crate::delivery::h1::Limits) -> Vec<Seen> {
    use crate::delivery::h1::{Connection, Failure, Outgoing};
    let answers = script.answers.len();
    let mut connection = Connection::with_limits(script, limits);
    let path = hyper::http::uri::PathAndQuery::from_static("/internal/messages/deliver");
    let headers = hyper::HeaderMap::new();
    let host = hyper::header::HeaderValue::from_static("main");
    let mut seen = Vec::new();
    for _ in 0..answers {
        let request = Outgoing {
            method: differential_request(to_head),
            path: &path,
            headers: &headers,
            extra: &[],
            trace: None,
            body: if to_head {
                bytes::Bytes::new()
            } else {
                bytes::Bytes::from_static(b"{}")
            },
        };
        let mut arrived = None;
        let result = tokio::time::timeout(STALL, connection.exchange(&request, &host, &mut arrived)).await;
        let (now, go_on) = match result {
            Ok(Ok(exchanged)) => {
                // As the pool does before it reuses a connection.
                let reusable = exchanged.reusable && connection.is_open();
                let answer = exchanged.answer;
                (
                    Seen::Answered {
                        status: answer.status.as_u16(),
                        body: answer.body,
                        complete: answer.complete,
                        reusable,
                    },
                    reusable,
                )
            }
            Ok(Err(Failure::Answer(e))) => (Seen::Failed(e.to_string()), false),
            Ok(Err(Failure::Unanswered(e) | Failure::Broken(e))) => (Seen::Failed(format!("{:?}", e.kind())), false),
            Err(_) => match arrived {
                Some(answer) => (
                    Seen::Answered {
                        status: answer.status.as_u16(),
                        body: answer.body,
                        complete: false,
                        reusable: false,
                    },
                    false,
                ),
                None => (Seen::Failed("timed out".into()), false),
            },
        };
        seen.push(now);
        if !go_on {
            break;
        }
    }
    seen
}

async fn hyper_reads(script: Script, to_head: bool) -> Vec<Seen> {
    use http_body_util::BodyExt;
    let answers = script.answers.len();
    let mut seen = Vec::new();
    let handshake = hyper::client::conn::http1::Builder::new()
        .allow_obsolete_multiline_headers_in_responses(true)
        .handshake::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(script))
        .await;
    let Ok((mut sender, connection)) = handshake else {
        return vec![Seen::Failed("handshake".into())];
    };
    tokio::spawn(connection);
    for _ in 0..answers {
        let request = hyper::Request::builder()
            .method(differential_request(to_head))
            .uri("/internal/messages/deliver")
            .header(hyper::header::HOST, "main")
            .body(http_body_util::Full::new(if to_head {
                bytes::Bytes::new()
            } else {
                bytes::Bytes::from_static(b"{}")
            }))
            .expect("a request");
        let response = match tokio::time::timeout(STALL, sender.send_request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                seen.push(Seen::Failed(e.to_string()));
                break;
            }
            Err(_) => {
                seen.push(Seen::Failed("timed out".into()));
                break;
            }
        };
        let status = response.status();
        let mut body = response.into_body();
        let mut kept = Vec::new();
        let complete = loop {
            match tokio::time::timeout(STALL, body.frame()).await {
                Ok(None) => break true,
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        kept.extend_from_slice(&data);
                    }
                }
                Ok(Some(Err(_))) | Err(_) => break false,
            }
        };
        drop(body);
        // Lets hyper's connection task run until it waits (paused time moves only then).
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        let reusable = complete && !sender.is_closed() && sender.is_ready();
        seen.push(Seen::Answered {
            status: status.as_u16(),
            body: kept,
            complete,
            reusable,
        });
        if !reusable {
            break;
        }
    }
    seen
}

/// A server's side of a connection, scripted: answer `k` is released when the `k`-th request
/// starts (each request goes out in one write), read `piece` bytes at a time; after the last,
/// the stream ends as `end` says. Writes are taken whole.
struct Script {
    answers: Vec<Vec<u8>>,
    /// Answers released (requests seen), and how far into them reading has come.
    released: usize,
    answer: usize,
    at: usize,
    piece: usize,
    end: End,
    waiting: Option<std::task::Waker>,
}

impl Script {
    fn new(answers: &[Vec<u8>], piece: usize, end: End) -> Script {
        Script {
            answers: answers.to_vec(),
            released: 0,
            answer: 0,
            at: 0,
            piece,
            end,
            waiting: None,
        }
    }
}

impl tokio::io::AsyncRead for Script {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        loop {
            if self.answer >= self.released {
                if self.answer < self.answers.len() {
                    // The server waits for the next request.
                    self.waiting = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                return match self.end {
                    End::Eof => Poll::Ready(Ok(())),
                    End::Reset => Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into())),
                    End::Pending => Poll::Pending,
                };
            }
            let (answer, at, piece) = (self.answer, self.at, self.piece);
            let rest = self.answers.get(answer).and_then(|a| a.get(at..)).unwrap_or_default();
            if rest.is_empty() {
                self.answer = answer.saturating_add(1);
                self.at = 0;
                continue;
            }
            let n = rest.len().min(piece).min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            self.at = at.saturating_add(n);
            return Poll::Ready(Ok(()));
        }
    }
}

impl tokio::io::AsyncWrite for Script {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if buf.starts_with(b"POST /") || buf.starts_with(b"HEAD /") {
            self.released = self.released.saturating_add(1).min(self.answers.len());
            if let Some(waker) = self.waiting.take() {
                waker.wake();
            }
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
