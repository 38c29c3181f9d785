//! Dead letters and the ways operators reach them: a dead-letter record and its header as
//! filters and stats read them, a time bound, the admin API's input and the reply of the
//! script that reads a page of the dead-letter list.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::admin::dlq::{read_act, read_query};
use crate::dlq::{fold_error, parse_time_bound, Filter, Letter};
use crate::message::{dead_letter, parse_dead_letter, read_dead_header, DeadHeader, DeadReason};
use crate::queue::{parse_page, DeadSlot};

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
    let (header, message) = read_dead_header(data);
    let slow = parse_dead_letter(data);
    let line_reads = data
        .iter()
        .position(|&b| b == b'\n')
        .is_none_or(|newline| serde_json::from_slice::<Value>(&data[..newline]).is_ok());
    if line_reads {
        assert_eq!(
            header,
            DeadHeader::from_fields(&slow.fields),
            "the typed header reads as the JSON one"
        );
        assert_eq!(message, slow.message, "the same message");
    }
    let letter = Letter::read(DeadSlot {
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
    let filter = Filter {
        reason: vec!["rejected".into()],
        status: vec![422],
        since: Some(DateTime::<Utc>::MIN_UTC),
        ..Filter::default()
    };
    let _ = filter.matches(&letter, true);
    let _ = fold_error(letter.error());
}

/// A time bound (`--since 2h`, `until=2025-01-15T10:00:00Z`): a time, or refused with one line
/// that says what is accepted. A duration is never in the future.
pub fn time_bound(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now = DateTime::parse_from_rfc3339("2025-01-15T12:00:00Z")
        .map(|t| t.with_timezone(&Utc))
        .expect("a fixed time");
    match parse_time_bound(text, now) {
        Ok(at) => {
            if DateTime::parse_from_rfc3339(text.trim()).is_err() {
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
    let now = Utc::now();
    if first & 1 == 0 {
        let Ok(query) = std::str::from_utf8(rest) else {
            return;
        };
        match read_query(query, now) {
            Ok((_, filter)) => {
                assert!(filter.grep.as_deref() != Some(""), "an empty grep is no filter");
            }
            Err(e) => assert!(!e.is_empty()),
        }
    } else {
        match read_act(rest, now) {
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
    let page = parse_page(value);
    assert!(page.slots.len() <= items.saturating_sub(5));
    for slot in page.slots {
        let _ = Letter::read(slot).to_json();
    }
}
