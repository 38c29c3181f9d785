//! A queue item, from `Envelope::parse` to what goes out: the delivery body, the copies made
//! for a retry, the Idempotency-Key header and the status URL.

use serde_json::Value;

use crate::delivery::{idempotency_key, status_url};
use crate::message::Envelope;

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
    let original: Option<Value> = serde_json::from_slice(data).ok();

    let body = envelope.delivery_body("\"w\"");
    if let Some(original) = &original {
        let body: Value = serde_json::from_slice(&body).expect("the delivery body is JSON");
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
        let again = Envelope::parse(plain.clone(), usize::MAX);
        let again = again.expect("a copy with a new attempt_count parses");
        assert_eq!((again.message_id(), again.attempt_count()), (id, next));
        if let Some(original) = &original {
            let mut before = original.clone();
            let mut after: Value = serde_json::from_slice(&plain).expect("JSON");
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
            let mut after: Value = serde_json::from_slice(&retried).expect("JSON");
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
