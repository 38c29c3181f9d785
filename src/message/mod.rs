//! Queue items: parsing raw bytes from Redis into an `Envelope` once, the delivery body, the
//! retried copy (only `attempt_count` changes, and a `traceparent` is written when the item had
//! no valid one; every other byte is kept), and dead-letter records (`dead.rs`).

use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

mod dead;

pub(crate) use self::dead::{claim_headers, ClaimHeaders};
pub use self::dead::{
    dead_at_now, dead_letter, dead_letter_traced, parse_dead_letter, read_dead_header, DeadHeader, DeadReason,
    DeadRecord,
};
use crate::trace::{parse_traceparent, parse_tracestate, TraceContext, TraceId};

/// A queue item that is a valid message.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The item exactly as claimed; cheap to clone, so the worker can keep a handle on it for
    /// dead-lettering should the delivery task fail in a way nobody foresaw.
    raw: Bytes,
    message_id: String,
    /// The message id as JSON text (quoted, escapes kept), for building bodies without re-escaping.
    id_json: Range<usize>,
    attempt_count: u32,
    /// Where the `attempt_count` value stands in `raw`, if it is there.
    attempt_span: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    queued_at: Option<SystemTime>,
    /// The item's trace: from its valid `traceparent`, else a new one.
    trace: TraceContext,
    /// Where the `traceparent` value stands in `raw`, when there is one (valid or not).
    traceparent_span: Option<Range<usize>>,
    /// Whether `raw` carries a valid `traceparent`; if not, the retried copy gets one.
    traceparent_valid: bool,
}

/// Why a queue item is not a message. The label is a bounded metric label value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("message is {size} bytes, over the {limit}-byte limit (worker.max_message_bytes)")]
    TooLarge { size: usize, limit: usize },
    #[error("message is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("message has no message_id string")]
    MissingId,
    #[error("message_id is invalid: {0}")]
    InvalidId(String),
    #[error("attempt_count is invalid: {0}")]
    InvalidAttemptCount(String),
}

impl Malformed {
    /// The reason label for metrics and dead letters.
    pub fn label(&self) -> &'static str {
        match self {
            Malformed::TooLarge { .. } => "too_large",
            Malformed::InvalidJson(_) => "invalid_json",
            Malformed::MissingId | Malformed::InvalidId(_) => "invalid_message_id",
            Malformed::InvalidAttemptCount(_) => "invalid_attempt_count",
        }
    }
}

/// The fields courier reads; everything else is skipped and kept byte-for-byte in `raw`.
/// `None` means absent; a JSON `null` is `Some("null")`, so that its place in `raw` is known
/// (a plain `Option` would read `null` as absent, and the retried copy would then carry a
/// second `attempt_count`, which no longer parses).
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    message_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    attempt_count: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    queued_at: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    traceparent: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    tracestate: Option<&'a RawValue>,
}

/// A field that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as Deserialize>::deserialize(deserializer).map(Some)
}

impl Envelope {
    /// Parses a raw queue item. On failure the raw bytes come back with the reason, so nothing
    /// is lost.
    pub fn parse(raw: impl Into<Bytes>, max_bytes: usize) -> Result<Envelope, (Bytes, Malformed)> {
        let raw = raw.into();
        if raw.len() > max_bytes {
            let size = raw.len();
            return Err((raw, Malformed::TooLarge { size, limit: max_bytes }));
        }
        match Self::fields(&raw) {
            Ok(parts) => Ok(Envelope { raw, ..parts }),
            Err(reason) => Err((raw, reason)),
        }
    }

    fn fields(raw: &[u8]) -> Result<Envelope, Malformed> {
        let text = std::str::from_utf8(raw).map_err(|e| Malformed::InvalidJson(format!("not UTF-8 ({e})")))?;
        if !text.trim_start().starts_with('{') {
            return Err(Malformed::InvalidJson("not a JSON object".into()));
        }
        let fields: Fields = serde_json::from_str(text).map_err(|e| Malformed::InvalidJson(e.to_string()))?;
        let span = |value: &RawValue| {
            let start = value.get().as_ptr() as usize - text.as_ptr() as usize;
            start..start + value.get().len()
        };

        let id_raw = fields.message_id.ok_or(Malformed::MissingId)?;
        let message_id: String = serde_json::from_str(id_raw.get()).map_err(|_| Malformed::MissingId)?;
        if message_id.is_empty() {
            return Err(Malformed::InvalidId("it is empty".into()));
        }
        if message_id.len() > 512 {
            return Err(Malformed::InvalidId("it is longer than 512 bytes".into()));
        }
        if message_id.chars().any(char::is_control) {
            // It travels in the Idempotency-Key header, where control characters are not allowed.
            return Err(Malformed::InvalidId("it contains control characters".into()));
        }
        if message_id == "." || message_id == ".." {
            // As a path segment of the status URL these would be resolved away by the URL parser
            // or the main server, steering the PUT to another path. Every other id is
            // percent-encoded into exactly one segment.
            return Err(Malformed::InvalidId(format!(
                "{message_id:?} cannot be one segment of a URL path"
            )));
        }

        let attempt_count = match fields.attempt_count {
            None => 0,
            Some(value) if value.get() == "null" => 0,
            Some(value) => serde_json::from_str::<u32>(value.get())
                .map_err(|_| Malformed::InvalidAttemptCount(format!("{} is not a whole number >= 0", value.get())))?,
        };
        let queued_at = fields
            .queued_at
            .filter(|value| value.get() != "null")
            .and_then(|value| parse_time(value.get()));
        // A malformed traceparent is replaced, never an error: tracing must not cost a message.
        let producer = fields
            .traceparent
            .and_then(|value| json_string(value.get()))
            .and_then(|text| parse_traceparent(text.as_bytes()));
        let trace = match producer {
            Some((trace_id, flags)) => TraceContext {
                trace_id,
                flags,
                state: fields
                    .tracestate
                    .and_then(|value| json_string(value.get()))
                    .and_then(|text| parse_tracestate(&text)),
            },
            None => TraceContext::start(),
        };

        Ok(Envelope {
            raw: Bytes::new(),
            message_id,
            id_json: span(id_raw),
            attempt_count,
            attempt_span: fields.attempt_count.map(span),
            payload: fields.payload.map(span),
            queued_at,
            traceparent_valid: producer.is_some(),
            traceparent_span: fields.traceparent.map(span),
            trace,
        })
    }

    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// Failed attempts so far.
    pub fn attempt_count(&self) -> u32 {
        self.attempt_count
    }

    /// The message's trace: the producer's, or the one courier started for it.
    pub fn trace(&self) -> &TraceContext {
        &self.trace
    }

    /// The message's trace id, for log lines and its dead letter.
    pub fn trace_id(&self) -> TraceId {
        self.trace.trace_id
    }

    /// Whether the item itself carries a valid `traceparent` (from its producer, or written
    /// into an earlier attempt's retried copy).
    pub fn carries_trace(&self) -> bool {
        self.traceparent_valid
    }

    /// How long the message waited between `queued_at` and `now`, when it says when it was queued.
    pub fn waited(&self, now: SystemTime) -> Option<Duration> {
        now.duration_since(self.queued_at?).ok()
    }

    /// The POST body: `{"message_id","worker_id","attempt","payload"?}`. `worker_id_json` is the
    /// worker id already encoded as a JSON string.
    pub fn delivery_body(&self, worker_id_json: &str) -> Vec<u8> {
        const OPEN: &[u8] = b"{\"message_id\":";
        const WORKER: &[u8] = b",\"worker_id\":";
        const ATTEMPT: &[u8] = b",\"attempt\":";
        const PAYLOAD: &[u8] = b",\"payload\":";
        const CLOSE: &[u8] = b"}";
        let id = &self.raw[self.id_json.clone()];
        let payload = self.payload.clone().map(|r| &self.raw[r]);
        let mut attempt = itoa::Buffer::new();
        let attempt = attempt.format(u64::from(self.attempt_count) + 1).as_bytes();
        // Exactly as long as it will be: a body that fills its allocation becomes the request's
        // bytes without another.
        let length = OPEN.len()
            + id.len()
            + WORKER.len()
            + worker_id_json.len()
            + ATTEMPT.len()
            + attempt.len()
            + payload.map_or(0, |p| PAYLOAD.len() + p.len())
            + CLOSE.len();
        let mut body = Vec::with_capacity(length);
        body.extend_from_slice(OPEN);
        body.extend_from_slice(id);
        body.extend_from_slice(WORKER);
        body.extend_from_slice(worker_id_json.as_bytes());
        body.extend_from_slice(ATTEMPT);
        body.extend_from_slice(attempt);
        if let Some(payload) = payload {
            body.extend_from_slice(PAYLOAD);
            body.extend_from_slice(payload);
        }
        body.extend_from_slice(CLOSE);
        body
    }

    /// The same message with `attempt_count` set to `count`; every other byte is unchanged.
    pub fn with_attempt_count(&self, count: u32) -> Vec<u8> {
        self.rewrite(count, false)
    }

    /// The retried copy: `with_attempt_count`, plus, when the item had no valid
    /// `traceparent`, one naming the trace courier started for it, so every attempt shares
    /// one trace id. Every other byte is unchanged.
    pub fn retried(&self, count: u32) -> Vec<u8> {
        self.rewrite(count, true)
    }

    fn rewrite(&self, count: u32, keep_trace: bool) -> Vec<u8> {
        let mut number = itoa::Buffer::new();
        let count = number.format(count).as_bytes();
        let traceparent = (keep_trace && !self.traceparent_valid).then(|| {
            let mut quoted = [b'"'; crate::trace::TRACEPARENT_LEN + 2];
            quoted[1..=crate::trace::TRACEPARENT_LEN].copy_from_slice(&self.trace.traceparent());
            quoted
        });
        // `parse` saw an object with a message_id, so there is a `{` and a field after it:
        // new fields go right after the `{`, each followed by a comma.
        const NONE: &[u8] = b"";
        const ATTEMPT_KEY: &[u8] = b"\"attempt_count\":";
        const TRACE_KEY: &[u8] = b"\"traceparent\":";
        let open = self.raw.iter().position(|&b| b == b'{').map_or(0, |i| i + 1);
        let mut edits: [(Range<usize>, &[u8], &[u8]); 2] = [(open..open, NONE, NONE), (open..open, NONE, NONE)];
        edits[0] = match &self.attempt_span {
            Some(span) => (span.clone(), NONE, count),
            None => (open..open, ATTEMPT_KEY, count),
        };
        if let Some(value) = &traceparent {
            edits[1] = match &self.traceparent_span {
                Some(span) => (span.clone(), NONE, &value[..]),
                None => (open..open, TRACE_KEY, &value[..]),
            };
        }
        edits.sort_by_key(|(span, _, _)| (span.start, span.end));
        let mut out = Vec::with_capacity(self.raw.len() + count.len() + 80);
        let mut at = 0;
        for (span, key, value) in &edits {
            if key.is_empty() && value.is_empty() {
                continue;
            }
            out.extend_from_slice(&self.raw[at..span.start]);
            out.extend_from_slice(key);
            out.extend_from_slice(value);
            if span.is_empty() {
                out.push(b',');
            }
            at = span.end;
        }
        out.extend_from_slice(&self.raw[at..]);
        out
    }
}

/// A JSON string value's text; `None` for any other JSON value.
fn json_string(json: &str) -> Option<std::borrow::Cow<'_, str>> {
    match json.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) if !inner.contains(['\\', '"']) => Some(std::borrow::Cow::Borrowed(inner)),
        _ => serde_json::from_str::<String>(json).ok().map(std::borrow::Cow::Owned),
    }
}

/// `queued_at` as epoch seconds (integer or fraction) or an RFC 3339 string. A value that is
/// not a time this machine can represent (negative, `1e308`, NaN) is `None`: the message is
/// delivered as usual and only left out of the queue-wait metric.
fn parse_time(json: &str) -> Option<SystemTime> {
    if let Ok(seconds) = json.parse::<f64>() {
        let since_epoch = Duration::try_from_secs_f64(seconds).ok()?;
        return UNIX_EPOCH.checked_add(since_epoch);
    }
    let text: String = serde_json::from_str(json).ok()?;
    let time = chrono::DateTime::parse_from_rfc3339(&text).ok()?;
    let nanos = time.timestamp_nanos_opt()?;
    UNIX_EPOCH.checked_add(Duration::from_nanos(u64::try_from(nanos).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Envelope {
        Envelope::parse(text.as_bytes().to_vec(), 1 << 20).unwrap_or_else(|(_, e)| panic!("{text}: {e}"))
    }

    fn reason(bytes: &[u8]) -> Malformed {
        Envelope::parse(bytes.to_vec(), 64).unwrap_err().1
    }

    #[test]
    fn reads_id_attempts_payload_and_queue_time() {
        let e = parse(r#"{"message_id":"m-1","attempt_count":3,"payload":{"a":[1,2]},"queued_at":1700000000.5}"#);
        assert_eq!(e.message_id(), "m-1");
        assert_eq!(e.attempt_count(), 3);
        let waited = e.waited(UNIX_EPOCH + Duration::from_secs(1_700_000_010)).unwrap();
        assert_eq!(waited, Duration::from_millis(9_500));
        let raw = e.delivery_body("\"w-1\"");
        assert_eq!(raw.len(), raw.capacity(), "the body fills its allocation exactly");
        let body: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"message_id":"m-1","worker_id":"w-1","attempt":4,"payload":{"a":[1,2]}})
        );
        let without = parse(r#"{"message_id":"m-2","attempt_count":99999}"#).delivery_body("\"w\"");
        assert_eq!(without.len(), without.capacity());
        assert_eq!(without, br#"{"message_id":"m-2","worker_id":"w","attempt":100000}"#);
    }

    #[test]
    fn rfc3339_queue_times_are_understood() {
        let e = parse(r#"{"message_id":"m","queued_at":"2025-01-15T10:30:45Z"}"#);
        assert_eq!(
            e.waited(UNIX_EPOCH + Duration::from_secs(1_736_937_046)),
            Some(Duration::from_secs(1))
        );
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn retried_copy_changes_only_the_attempt_count() {
        let original = format!(
            "{{ \"message_id\" : \"m\\u0041\",\"attempt_count\": 7 , \"x\": 1.50e3, \
             \"y\":\"\\n\", \"traceparent\":\"{TP}\" }}"
        );
        let e = parse(&original);
        assert_eq!(e.message_id(), "mA");
        let again = String::from_utf8(e.with_attempt_count(8)).unwrap();
        assert_eq!(again, original.replace(": 7 ,", ": 8 ,"));

        let original = format!(r#"  {{"message_id":"m","x":1.50e3,"traceparent":"{TP}"}}"#);
        let e = parse(&original);
        let again = String::from_utf8(e.with_attempt_count(1)).unwrap();
        assert_eq!(again, original.replacen('{', r#"{"attempt_count":1,"#, 1));
        assert_eq!(parse(&again).attempt_count(), 1);
    }

    #[test]
    fn a_retried_copy_carries_the_trace_every_attempt_shares() {
        // No traceparent: one is written beside attempt_count, naming the trace started now.
        let e = parse(r#"{"message_id":"m","x":1}"#);
        assert!(!e.carries_trace());
        assert_eq!(
            e.with_attempt_count(1),
            br#"{"attempt_count":1,"message_id":"m","x":1}"#,
            "a dead letter's copy"
        );
        let again = String::from_utf8(e.retried(1)).unwrap();
        let tp = format!("00-{}-", e.trace_id());
        assert!(
            again.starts_with(&format!(r#"{{"attempt_count":1,"traceparent":"{tp}"#)),
            "{again}"
        );
        assert!(again.ends_with(r#"-01","message_id":"m","x":1}"#), "{again}");
        let next = parse(&again);
        assert!(next.carries_trace());
        assert_eq!(next.trace_id(), e.trace_id(), "the next attempt has the same trace");
        assert_eq!(next.retried(2), again.replace(":1,", ":2,").into_bytes());

        // A malformed one is replaced where it stands, its tracestate kept in the item but
        // not forwarded.
        let bad = r#"{"message_id":"m","traceparent":"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01","tracestate":"a=b","attempt_count":3}"#;
        let e = parse(bad);
        assert!(!e.carries_trace());
        assert_eq!(e.trace().state, None);
        assert_ne!(e.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let again = String::from_utf8(e.retried(4)).unwrap();
        let next = parse(&again);
        assert_eq!((next.trace_id(), next.attempt_count()), (e.trace_id(), 4));
        assert!(again.contains(r#""tracestate":"a=b","attempt_count":4}"#), "{again}");
        for odd in ["null", "42", "{}", r#""""#] {
            let e = parse(&format!(r#"{{"message_id":"m","traceparent":{odd}}}"#));
            assert!(
                parse(&String::from_utf8(e.retried(1)).unwrap()).carries_trace(),
                "{odd}"
            );
        }

        // A valid one is kept, with its tracestate, and its escapes are understood.
        let good = format!(
            r#"{{"message_id":"m","traceparent":"\u0030{}","tracestate":"congo=t61rcWkgMzE"}}"#,
            &TP[1..]
        );
        let e = parse(&good);
        assert!(e.carries_trace());
        assert_eq!(e.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            e.trace().state.as_ref().map(|v| v.as_bytes()),
            Some(&b"congo=t61rcWkgMzE"[..])
        );
    }

    #[test]
    fn a_null_attempt_count_is_replaced_in_place() {
        let original = format!(r#"{{"message_id":"m","attempt_count":  null,"payload":null,"traceparent":"{TP}"}}"#);
        let e = parse(&original);
        assert_eq!(e.attempt_count(), 0);
        let again = String::from_utf8(e.with_attempt_count(1)).unwrap();
        assert_eq!(again, original.replace("  null", "  1"));
        let body: serde_json::Value = serde_json::from_slice(&e.delivery_body("\"w\"")).unwrap();
        assert_eq!(
            body.get("payload"),
            Some(&serde_json::Value::Null),
            "a null payload is forwarded"
        );
    }

    #[test]
    fn malformed_items_are_named() {
        assert_eq!(reason(b"not json").label(), "invalid_json");
        assert_eq!(reason(b"[1,2]").label(), "invalid_json");
        assert_eq!(reason(b"\xff\xfe{}").label(), "invalid_json");
        assert_eq!(reason(br#"{"id":"x"}"#), Malformed::MissingId);
        assert_eq!(reason(br#"{"message_id":42}"#), Malformed::MissingId);
        assert_eq!(reason(br#"{"message_id":""}"#).label(), "invalid_message_id");
        assert_eq!(reason(br#"{"message_id":"a\u0000"}"#).label(), "invalid_message_id");
        assert_eq!(
            reason(br#"{"message_id":"a","attempt_count":-1}"#).label(),
            "invalid_attempt_count"
        );
        assert_eq!(reason(&[b'x'; 65]), Malformed::TooLarge { size: 65, limit: 64 });
    }

    #[test]
    fn malformed_items_come_back_byte_for_byte() {
        let (raw, _) = Envelope::parse(b"\x00\xffjunk".to_vec(), 64).unwrap_err();
        assert_eq!(&raw[..], b"\x00\xffjunk");
    }

    #[test]
    fn absurd_queue_times_are_ignored_not_fatal() {
        for t in [
            "1e20",
            "1e308",
            "-1",
            "\"NaN\"",
            "18446744073709551616",
            "\"9999-12-31T23:59:59Z\"",
        ] {
            let e = parse(&format!(r#"{{"message_id":"p","queued_at":{t}}}"#));
            let _ = e.waited(SystemTime::now());
        }
        let e = parse(r#"{"message_id":"p","queued_at":1e20}"#);
        assert_eq!(e.waited(SystemTime::now()), None);
    }

    #[test]
    fn dot_segments_are_not_message_ids() {
        assert_eq!(reason(br#"{"message_id":"."}"#).label(), "invalid_message_id");
        assert_eq!(reason(br#"{"message_id":".."}"#).label(), "invalid_message_id");
        assert_eq!(
            reason(br#"{"message_id":"\u002e\u002e"}"#).label(),
            "invalid_message_id"
        );
        assert_eq!(parse(r#"{"message_id":"..."}"#).message_id(), "...");
    }
}
