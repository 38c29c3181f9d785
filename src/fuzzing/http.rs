//! The main server's answer as courier's HTTP/1.1 client reads it, whole and in pieces, and
//! the Retry-After header it may carry.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::http::uri::PathAndQuery;
use hyper::{HeaderMap, Method};

use super::{Pieces, Stream};
use crate::delivery::h1::{Connection, Failure, Outgoing, MAX_RESPONSE_BODY};
use crate::delivery::{parse_retry_after, DeliveryError};
use crate::policy::{decide, Backoff, Outcomes, Policy, Settle, MAX_RETRY_AFTER};

/// A Retry-After header value: parsed or ignored, and the wait it leads to is never longer
/// than the retry interval or the cap, whichever is longer.
pub fn retry_after(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let policy = Policy {
        max_attempts: 10,
        retry_interval: Duration::from_secs(30),
        max_retry_after: MAX_RETRY_AFTER,
        backoff: Backoff::Fixed,
        jitter: 0.0,
    };
    let answer = Err(DeliveryError::Status {
        status: 503,
        retry_after: parse_retry_after(&value),
        body: String::new(),
    });
    let outcome = Outcomes::default().classify(&answer);
    match decide(&outcome, 0, &policy, 0.5) {
        Settle::Retry { delay, failures: 1 } => assert!(delay <= MAX_RETRY_AFTER, "{delay:?}"),
        other => panic!("a 503 is retried: {other:?}"),
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
        assert!(body.len() <= MAX_RESPONSE_BODY);
        assert!(
            body.is_empty() || !(200..300).contains(status),
            "only an error's body is kept"
        );
    }
}

/// What one exchange came to: status, kept body and whether the connection could be kept, or
/// the failure by name.
type Reading = Result<(u16, Vec<u8>, bool), String>;

/// What one exchange over `answer`, `piece` bytes a read, comes to. Bytes after the answer
/// that were not read yet make the connection one not to keep, as `Connection::is_open` finds
/// on a real one.
fn exchange_with(answer: &[u8], piece: usize, to_head: bool) -> Reading {
    let read = Arc::new(AtomicUsize::new(0));
    let stream = Stream(Pieces {
        answer: answer.to_vec(),
        at: read.clone(),
        piece,
    });
    let mut connection = Connection::new(stream);
    let path = PathAndQuery::from_static("/internal/messages/deliver");
    let headers = HeaderMap::new();
    let request = Outgoing {
        method: if to_head { Method::HEAD } else { Method::POST },
        path: &path,
        headers: &headers,
        extra: &[],
        trace: None,
        body: bytes::Bytes::from_static(b"{}"),
    };
    let host = HeaderValue::from_static("main");
    let mut arrived = None;
    let exchange = connection.exchange(&request, &host, &mut arrived);
    let mut exchange = std::pin::pin!(exchange);
    // The stream is always ready, so the exchange never waits: one poll finishes it.
    let mut cx = Context::from_waker(Waker::noop());
    let Poll::Ready(result) = exchange.as_mut().poll(&mut cx) else {
        panic!("an exchange over a ready stream waited");
    };
    match result {
        Ok(exchanged) => {
            let all_read = read.load(Ordering::Relaxed) == answer.len();
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
