//! One dead letter as read from the list: its position, its header fields (typed, for filters
//! and stats) and its message, and what `courier dlq` and the API make of it.

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use chrono::{DateTime, Utc};

use crate::message::{parse_dead_letter, read_dead_header, DeadHeader, Envelope};
use crate::queue::DeadSlot;

/// One dead letter as read: where it is, its header fields and (the start of) its message.
#[derive(Debug, Clone)]
pub(crate) struct Letter {
    /// Its position from the tail when read: the cursor of one letter.
    pub position: u64,
    /// The whole record's size in bytes.
    pub size: u64,
    /// The record's SHA-1, when read for a move.
    pub sha: String,
    /// The record (or its first `PREVIEW_BYTES`).
    pub record: Vec<u8>,
    /// Whether `record` is only the start.
    pub truncated: bool,
    /// The header fields filters and stats read (typed: no `serde_json::Value` per record).
    pub header: DeadHeader,
    /// The original item (or its start).
    pub message: Vec<u8>,
}

impl Letter {
    /// The letter in a slot the page script read.
    pub(crate) fn read(slot: DeadSlot) -> Letter {
        let (header, message) = read_dead_header(&slot.bytes);
        Letter {
            position: slot.position,
            truncated: slot.size > u64::try_from(slot.bytes.len()).unwrap_or(u64::MAX),
            size: slot.size,
            sha: slot.sha,
            record: slot.bytes,
            header,
            message,
        }
    }

    /// Every header field (`reason`, `error`, `dead_at`, `message_id`, `trace_id`, ...) as
    /// JSON, parsed on demand (`Null`: not a record courier wrote).
    pub(crate) fn fields(&self) -> serde_json::Value {
        parse_dead_letter(&self.record).fields
    }

    /// The header's `reason` (`unknown` without one).
    pub(crate) fn reason(&self) -> &str {
        self.header.reason.as_deref().unwrap_or("unknown")
    }

    /// The header's `error` (empty without one).
    pub(crate) fn error(&self) -> &str {
        self.header.error.as_deref().unwrap_or("")
    }

    /// The header's `message_id`, if it has one.
    pub(crate) fn message_id(&self) -> Option<&str> {
        self.header.message_id.as_deref()
    }

    /// The HTTP status of the main server's answer: the record's `status`, or the one its
    /// error names (`main server answered HTTP 422: ...`).
    pub(crate) fn status(&self) -> Option<u16> {
        if let Some(status) = self.header.status {
            return u16::try_from(status).ok();
        }
        let error = self.error();
        let at = error.find("answered HTTP ")? + "answered HTTP ".len();
        let digits: String = error[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok().filter(|s| (100..=999).contains(s))
    }

    /// When it was dead-lettered: the header's `dead_at`, if that reads as RFC 3339.
    pub(crate) fn dead_at(&self) -> Option<DateTime<Utc>> {
        let text = self.header.dead_at.as_deref()?;
        DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
    }

    /// As one JSON object: the header fields, the message (`message`, or `message_base64`
    /// when not UTF-8; cut at `PREVIEW_BYTES` when `truncated`), `position`, `size`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let mut json = match self.fields() {
            fields @ serde_json::Value::Object(_) => fields,
            _ => serde_json::json!({}),
        };
        match std::str::from_utf8(&self.message) {
            Ok(text) => json["message"] = text.into(),
            // A cut may split a character: show the valid part.
            Err(e) if self.truncated && e.error_len().is_none() => {
                json["message"] = String::from_utf8_lossy(&self.message[..e.valid_up_to()]).into();
            }
            Err(_) => json["message_base64"] = BASE64.encode(&self.message).into(),
        }
        json["position"] = self.position.into();
        json["size"] = self.size.into();
        json["truncated"] = self.truncated.into();
        if let Some(status) = self.status() {
            json["status"] = status.into();
        }
        json
    }

    /// The message as it goes back to the queue: `attempt_count` reset to 0 when it is a valid
    /// message that has failed attempts, otherwise the original bytes unchanged. Needs the
    /// whole record.
    pub(crate) fn requeued(&self) -> Vec<u8> {
        match Envelope::parse(self.message.clone(), usize::MAX) {
            Ok(envelope) if envelope.attempt_count() > 0 => envelope.with_attempt_count(0),
            _ => self.message.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_comes_from_the_field_or_the_error() {
        let letter = |header: &str| {
            Letter::read(DeadSlot {
                position: 1,
                size: 0,
                bytes: format!("{header}\n{{}}").into_bytes(),
                hit: true,
                sha: String::new(),
            })
        };
        assert_eq!(
            letter(r#"{"reason":"rejected","error":"main server answered HTTP 422: no"}"#).status(),
            Some(422)
        );
        assert_eq!(
            letter(r#"{"reason":"rejected","status":409,"error":"x"}"#).status(),
            Some(409)
        );
        assert_eq!(
            letter(r#"{"reason":"exhausted","error":"answered HTTP 99999999999"}"#).status(),
            None
        );
        assert_eq!(letter(r#"{"reason":"exhausted","error":"timeout"}"#).status(), None);
    }
}
