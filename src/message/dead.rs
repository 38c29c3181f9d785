//! Dead-letter records: the header line (why, when, who, the message's id) and the item exactly
//! as it was, written by `dead_letter` and read back by `parse_dead_letter` (any shape courier
//! ever wrote, or none) and, cheaply for walks over many records, by `read_dead_header`.

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::trace::TraceId;

/// Why a message went to the dead-letter list. The label is a bounded metric label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// Not a message at all; carries the `Malformed` label.
    Malformed(&'static str),
    /// The main server answered with a permanent 4xx.
    Rejected,
    /// `attempt_count` reached `max_attempts`.
    Exhausted,
    /// courier itself failed while handling the message (a bug): kept here, never lost.
    InternalError,
}

impl DeadReason {
    pub fn label(self) -> &'static str {
        match self {
            DeadReason::Malformed(label) => label,
            DeadReason::Rejected => "rejected",
            DeadReason::Exhausted => "exhausted",
            DeadReason::InternalError => "internal_error",
        }
    }
}

/// A dead-letter record: one line of JSON with the reason, the error, who and when, then a
/// newline, then the original item exactly as it was. The item is stored as it is, not
/// escaped into the JSON, so a record is never much larger than the message it keeps (JSON
/// escaping can make control bytes six times their size). `parse_dead_letter` reads it back.
pub fn dead_letter(raw: &[u8], reason: DeadReason, error: &str, worker_id: &str, message_id: Option<&str>) -> Vec<u8> {
    dead_letter_traced(raw, reason, error, worker_id, message_id, None)
}

/// `dead_letter` with the message's trace id in the header (`trace_id`), for `dlq show` and
/// for finding the message's spans.
pub fn dead_letter_traced(
    raw: &[u8],
    reason: DeadReason,
    error: &str,
    worker_id: &str,
    message_id: Option<&str>,
    trace_id: Option<TraceId>,
) -> Vec<u8> {
    // By name: the order these fields have always had (they came from a sorted map), so that
    // a record's bytes stay what they were.
    let mut header = Header::new();
    header.text("dead_at", &dead_at_now());
    header.text("error", error);
    if let Some(id) = message_id {
        header.text("message_id", id);
    }
    header.text("reason", reason.label());
    header.number("size", raw.len());
    if let Some(trace_id) = trace_id {
        header.text("trace_id", &trace_id.to_string());
    }
    header.text("worker_id", worker_id);
    let header = header.line();
    let mut record = Vec::with_capacity(header.len() + 1 + raw.len());
    record.extend_from_slice(header.as_bytes());
    record.push(b'\n');
    record.extend_from_slice(raw);
    record
}

/// The headers of the dead letters the claim script writes itself, so that the item never
/// leaves Redis: one over the size limit, and one that workers dying while holding it returned
/// to the queue too often. `Header` writes them as it writes `dead_letter`'s, in the order
/// these have always had, with `$name$` holes for what only the script knows, which it fills
/// (`scripts.rs`, `fill`): `size` and `reclaims` (numbers), `limit` and `max` (the limits it
/// was given), `worker` (the worker id as JSON), `at` (`dead_at`), and `id` (the whole
/// `,"message_id":...` field, or nothing when the item has no id).
#[derive(Debug, Clone)]
pub(crate) struct ClaimHeaders {
    /// Reason `too_large`: over `worker.max_message_bytes`.
    pub(crate) too_large: String,
    /// Reason `poisoned`: returned more than `worker.max_reclaims` times.
    pub(crate) poisoned: String,
}

/// The claim script's headers (`ClaimHeaders`).
pub(crate) fn claim_headers() -> ClaimHeaders {
    let mut too_large = Header::new();
    too_large.text("reason", "too_large");
    too_large.text(
        "error",
        "message is $size$ bytes, over the $limit$-byte limit (worker.max_message_bytes)",
    );
    too_large.hole("worker_id", "worker");
    too_large.text("dead_at", "$at$");
    too_large.optional("id");
    too_large.hole("size", "size");
    let mut poisoned = Header::new();
    poisoned.text("reason", "poisoned");
    poisoned.text(
        "error",
        "returned to the queue $reclaims$ times by the restart or reaping of workers that died \
         holding it, over the limit of $max$ (worker.max_reclaims)",
    );
    poisoned.hole("worker_id", "worker");
    poisoned.text("dead_at", "$at$");
    poisoned.optional("id");
    poisoned.hole("reclaims", "reclaims");
    poisoned.hole("size", "size");
    ClaimHeaders {
        too_large: too_large.line(),
        poisoned: poisoned.line(),
    }
}

/// A dead letter's header line, written field by field in the order given, as compact JSON
/// (`{"name":value,...}`): the one writer of headers, for `dead_letter` and `claim_headers`.
/// Compact JSON escapes every newline inside strings, so the first newline of a record ends
/// its header.
struct Header(String);

impl Header {
    fn new() -> Header {
        Header(String::from("{"))
    }

    /// Starts a field: the comma before it (but the first) and its name.
    fn name(&mut self, name: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push_str(&serde_json::Value::from(name).to_string());
        self.0.push(':');
    }

    /// A field whose value is text.
    fn text(&mut self, name: &str, value: &str) {
        self.name(name);
        self.0.push_str(&serde_json::Value::from(value).to_string());
    }

    /// A field whose value is a number.
    fn number(&mut self, name: &str, value: usize) {
        self.name(name);
        self.0.push_str(&value.to_string());
    }

    /// A field whose value the claim script writes, as JSON, in place of `$hole$`.
    fn hole(&mut self, name: &str, hole: &str) {
        self.name(name);
        self.0.push_str(&format!("${hole}$"));
    }

    /// A place between fields where the claim script writes a whole field (its comma
    /// included) or nothing, in place of `$hole$`.
    fn optional(&mut self, hole: &str) {
        self.0.push_str(&format!("${hole}$"));
    }

    /// The header line, closed.
    fn line(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// The time a dead letter is written, as it appears in its `dead_at`.
pub fn dead_at_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A dead-letter record read back: its header fields and the original item.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadRecord {
    /// `reason`, `error`, `worker_id`, `dead_at`, `message_id`, ...; `Null` when the record
    /// is not one courier wrote.
    pub fields: serde_json::Value,
    /// The queue item exactly as it was when it died.
    pub message: Vec<u8>,
}

/// Reads a dead-letter record of any shape: the header-and-item form courier writes now, the
/// all-JSON form earlier versions wrote (`message`, or `message_base64` when the item was not
/// UTF-8), or anything else, which is kept whole as the message. Never fails, never panics.
pub fn parse_dead_letter(record: &[u8]) -> DeadRecord {
    let is_record = |v: &serde_json::Value| v.get("reason").is_some_and(serde_json::Value::is_string);
    if let Some(newline) = record.iter().position(|&b| b == b'\n') {
        if let Ok(fields) = serde_json::from_slice::<serde_json::Value>(&record[..newline]) {
            if is_record(&fields) {
                return DeadRecord {
                    fields,
                    message: record[newline + 1..].to_vec(),
                };
            }
        }
    }
    if let Ok(fields) = serde_json::from_slice::<serde_json::Value>(record) {
        if is_record(&fields) {
            let message = match (&fields["message"], &fields["message_base64"]) {
                (serde_json::Value::String(text), _) => Some(text.as_bytes().to_vec()),
                (_, serde_json::Value::String(b64)) => BASE64.decode(b64).ok(),
                _ => None,
            };
            if let Some(message) = message {
                return DeadRecord { fields, message };
            }
        }
    }
    DeadRecord {
        fields: serde_json::Value::Null,
        message: record.to_vec(),
    }
}

/// The header fields of a dead letter that filters and stats read. What `DeadRecord::fields`
/// holds for them (a field absent or of another type: `None`), read without building a
/// `serde_json::Value` of the header when the record is in the form courier writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadHeader {
    pub reason: Option<String>,
    pub error: Option<String>,
    pub dead_at: Option<String>,
    pub message_id: Option<String>,
    /// `status`, when it is a number that fits a `u64`.
    pub status: Option<u64>,
}

impl DeadHeader {
    /// The same fields out of a parsed header (the slow path, and the reference for the fast).
    pub fn from_fields(fields: &serde_json::Value) -> DeadHeader {
        let text = |name: &str| fields[name].as_str().map(str::to_string);
        DeadHeader {
            reason: text("reason"),
            error: text("error"),
            dead_at: text("dead_at"),
            message_id: text("message_id"),
            status: fields["status"].as_u64(),
        }
    }
}

/// The header line as serde reads it, borrowing the strings that need no unescaping. Unknown
/// fields are skipped; a field of another type or given twice fails the parse, and the caller
/// falls back to `parse_dead_letter` (which reads those as `serde_json::Value` does).
#[derive(Deserialize)]
struct HeaderLine<'a> {
    #[serde(borrow, default)]
    reason: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    error: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    dead_at: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    message_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    status: Option<&'a RawValue>,
}

/// Reads a dead letter's header fields and its message: the same as `parse_dead_letter`
/// followed by `DeadHeader::from_fields`, but the header of a record in the form courier
/// writes is read into a typed struct (no `serde_json::Value` tree), which is what makes
/// `dlq stats` and filtered walks over a million records cheap. Never fails, never panics.
pub fn read_dead_header(record: &[u8]) -> (DeadHeader, Vec<u8>) {
    if let Some(newline) = record.iter().position(|&b| b == b'\n') {
        let (line, rest) = record.split_at(newline);
        if let Ok(head) = serde_json::from_slice::<HeaderLine<'_>>(line) {
            // `parse_dead_letter` takes the header form only when `reason` is a string. (One
            // difference stays: a number out of f64 range in a field not read here makes
            // `serde_json::Value` refuse the line, so `parse_dead_letter` keeps such a record
            // whole, while this reads its header. courier never writes one.)
            if head.reason.is_some() {
                let owned = |text: Option<std::borrow::Cow<'_, str>>| text.map(std::borrow::Cow::into_owned);
                let status = head
                    .status
                    .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok())
                    .and_then(|value| value.as_u64());
                let header = DeadHeader {
                    reason: owned(head.reason),
                    error: owned(head.error),
                    dead_at: owned(head.dead_at),
                    message_id: owned(head.message_id),
                    status,
                };
                return (header, rest.get(1..).unwrap_or_default().to_vec());
            }
        }
    }
    let DeadRecord { fields, message } = parse_dead_letter(record);
    (DeadHeader::from_fields(&fields), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes a record is written with, pinned: the header's fields in the order they have
    /// always had (by name), escaped as serde_json escapes.
    #[test]
    fn a_dead_letter_is_written_byte_for_byte_as_always() {
        let dead_at = |record: &[u8]| parse_dead_letter(record).fields["dead_at"].as_str().map(str::to_string);
        let (trace_id, _) = crate::trace::parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("traceparent");
        let raw = b"{\"message_id\":\"m/1\"}\n\x00\xff";
        let error = "422 \"bad\"\n\u{1}\u{7f}\u{e9}/\\";
        let record = dead_letter_traced(raw, DeadReason::Rejected, error, "w-1", Some("m/1"), Some(trace_id));
        let at = dead_at(&record).expect("dead_at");
        let mut expected = format!(
            r#"{{"dead_at":"{at}","error":"422 \"bad\"\n\u0001{}{}/\\","message_id":"m/1","reason":"rejected","size":{},"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","worker_id":"w-1"}}"#,
            '\u{7f}',
            '\u{e9}',
            raw.len()
        )
        .into_bytes();
        expected.push(b'\n');
        expected.extend_from_slice(raw);
        assert_eq!(String::from_utf8_lossy(&record), String::from_utf8_lossy(&expected));
        assert_eq!(record, expected);

        let record = dead_letter(b"x", DeadReason::Malformed("invalid_json"), "e", "w", None);
        let at = dead_at(&record).expect("dead_at");
        let expected = format!(
            "{{\"dead_at\":\"{at}\",\"error\":\"e\",\"reason\":\"invalid_json\",\
             \"size\":1,\"worker_id\":\"w\"}}\nx"
        );
        assert_eq!(String::from_utf8_lossy(&record), expected);
    }

    #[test]
    fn dead_letters_keep_the_original_exactly() {
        for raw in [
            &b"not json"[..],
            b"\xff\x00a",
            b"{\"message_id\":\"m\"}\n\n\x01\x1b[31m",
        ] {
            let record = dead_letter(raw, DeadReason::Malformed("invalid_json"), "boom\nline", "w", Some("m"));
            let read = parse_dead_letter(&record);
            assert_eq!(read.message, raw);
            assert_eq!(read.fields["reason"], "invalid_json");
            assert_eq!(read.fields["error"], "boom\nline");
            assert_eq!(read.fields["size"], raw.len());
        }
    }

    #[test]
    fn dead_letters_are_not_amplified_by_escaping() {
        let raw = vec![1u8; 100_000];
        let record = dead_letter(&raw, DeadReason::Malformed("too_large"), "e", "w", None);
        assert!(record.len() < raw.len() + 300, "{} bytes", record.len());
    }

    #[test]
    fn earlier_all_json_records_and_foreign_items_still_read() {
        let old = br#"{"reason":"exhausted","error":"e","message":"{\"message_id\":\"x\"}"}"#;
        let read = parse_dead_letter(old);
        assert_eq!(read.message, br#"{"message_id":"x"}"#);
        assert_eq!(read.fields["reason"], "exhausted");
        let old = br#"{"reason":"invalid_json","message_base64":"/wBh"}"#;
        assert_eq!(parse_dead_letter(old).message, b"\xff\x00a");
        for foreign in [&b"garbage"[..], b"{\"a\":1}\nrest", b"", b"\n"] {
            let read = parse_dead_letter(foreign);
            assert_eq!(read.message, foreign);
            assert!(read.fields.is_null());
        }
    }
}
