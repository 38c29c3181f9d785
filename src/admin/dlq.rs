//! The admin port's dead-letter API and the page that uses it, served only when ADMIN_TOKEN
//! is set, each request carrying `Authorization: Bearer <ADMIN_TOKEN>` (the page's files
//! excepted: they hold no data). Dead letters hold message bodies: reading them needs the
//! token too.
//!
//! - `GET /dlq?reason=&status=&since=&until=&grep=&limit=&cursor=&queue=`: a page of dead
//!   letters, newest first, and `next_cursor` for the next page.
//! - `GET /dlq/letter?position=N&queue=`: one dead letter, whole up to `LETTER_BYTES`.
//! - `GET /dlq/stats?<filter>&queue=`: dead letters grouped by cause.
//! - `POST /dlq/requeue`, `POST /dlq/purge` with a JSON body `{"filter": {...}, "ids": [...],
//!   "all": bool, "dry_run": bool, "front": bool, "limit": N, "rate": N, "queue": "..."}`.
//! - `GET /ui` (and `/ui/app.js`, `/ui/app.css`): the page, embedded in the binary.

// The error of each step is the answer to send, made once per request: boxing it buys nothing.
#![allow(clippy::result_large_err)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};

use super::{json, text, AdminState};
use crate::dlq::{self, Action, Filter, FilterText, Options};
use crate::queue::Queue;

const PAGE_HTML: &str = include_str!("ui/index.html");
const PAGE_JS: &str = include_str!("ui/app.js");
const PAGE_CSS: &str = include_str!("ui/app.css");

/// The largest request body accepted.
const MAX_BODY: usize = 64 << 10;
/// The most letters one `GET /dlq` returns.
const MAX_LIMIT: usize = 500;
/// How much of one letter `GET /dlq/letter` returns.
const LETTER_BYTES: u64 = 1 << 20;
/// Records one `GET /dlq` reads at most before answering with a cursor to go on from.
const SCAN_PER_REQUEST: u64 = 200_000;

/// Whether `given` is the token, in time that does not depend on where they differ.
fn same(given: &[u8], token: &[u8]) -> bool {
    if given.len() != token.len() {
        return false;
    }
    let diff = given.iter().zip(token).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

fn authorized(state: &AdminState, request: &Request<Incoming>) -> Result<(), Response<Full<Bytes>>> {
    let Some(token) = &state.admin_token else {
        return Err(text(
            StatusCode::NOT_FOUND,
            "the dead-letter API and page are off: set ADMIN_TOKEN to turn them on\n",
        ));
    };
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or(b"");
    if same(given, token.expose().as_bytes()) {
        Ok(())
    } else {
        let mut response = json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "send Authorization: Bearer <ADMIN_TOKEN>"}),
        );
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"courier\""));
        Err(response)
    }
}

fn bad_request(message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({"error": message.to_string()}),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::OK, body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Routes `/ui*` and `/dlq*`.
pub(crate) async fn route(state: &AdminState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if state.admin_token.is_none() {
        if let Err(response) = authorized(state, &request) {
            return response;
        }
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    match (method, path.as_str()) {
        (Method::GET, "/ui" | "/ui/") => asset("text/html; charset=utf-8", PAGE_HTML),
        (Method::GET, "/ui/app.js") => asset("text/javascript; charset=utf-8", PAGE_JS),
        (Method::GET, "/ui/app.css") => asset("text/css; charset=utf-8", PAGE_CSS),
        (Method::GET, "/dlq" | "/dlq/letter" | "/dlq/stats") | (Method::POST, "/dlq/requeue" | "/dlq/purge") => {
            if let Err(response) = authorized(state, &request) {
                return response;
            }
            match api(state, request).await {
                Ok(response) => response,
                Err(response) => response,
            }
        }
        (_, "/dlq" | "/dlq/letter" | "/dlq/stats" | "/dlq/requeue" | "/dlq/purge") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /dlq, /dlq/letter and /dlq/stats; POST /dlq/requeue and /dlq/purge\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found: try /ui, /dlq or /dlq/stats\n"),
    }
}

/// Query parameters of the GET calls.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Query {
    reason: Option<String>,
    status: Option<String>,
    since: Option<String>,
    until: Option<String>,
    grep: Option<String>,
    limit: Option<usize>,
    cursor: Option<u64>,
    position: Option<u64>,
    queue: Option<String>,
}

/// The body of the POST calls.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Act {
    filter: FilterText,
    ids: Vec<String>,
    pub(crate) all: bool,
    dry_run: bool,
    front: bool,
    limit: Option<u64>,
    pub(crate) rate: Option<f64>,
    queue: Option<String>,
}

fn queue<'a>(state: &'a AdminState, name: Option<&str>) -> Result<&'a Queue, Response<Full<Bytes>>> {
    let Some(queues) = state.queues.get() else {
        return Err(json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "not connected to Redis yet"}),
        ));
    };
    match name.filter(|n| !n.is_empty()) {
        None => queues.first(),
        Some(name) => queues.iter().find(|q| q.name() == name),
    }
    .ok_or_else(|| {
        bad_request(format!(
            "queue: not one of this worker's queues ({})",
            state.queue_names.join(", ")
        ))
    })
}

fn redis_error(e: &crate::queue::QueueError) -> Response<Full<Bytes>> {
    let status = if e.is_unavailable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::BAD_GATEWAY
    };
    json(status, serde_json::json!({"error": format!("Redis: {e}")}))
}

async fn api(state: &AdminState, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
    let now = chrono::Utc::now();
    if request.method() == Method::POST {
        let path = request.uri().path().to_string();
        let body = Limited::new(request.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|_| bad_request(format!("the body must be JSON of at most {MAX_BODY} bytes")))?
            .to_bytes();
        let (act, filter) = read_act(&body, now).map_err(bad_request)?;
        let action = if path == "/dlq/purge" {
            Action::Purge
        } else {
            Action::Requeue { front: act.front }
        };
        let queue = queue(state, act.queue.as_deref())?;
        let options = Options {
            dry_run: act.dry_run,
            limit: act.limit,
            rate: act.rate,
        };
        let (mut conn, keys) = (queue.connection(), queue.keys().clone());
        // In a task of its own: a client that goes away does not stop a move half way
        // through a page (stopping would be safe, but leave the work half done).
        let work = tokio::spawn(async move { dlq::act(&mut conn, &keys, &filter, action, &options, |_| {}).await });
        let outcome = match work.await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => return Err(redis_error(&e)),
            Err(_) => {
                return Err(json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({"error": "the task failed"}),
                ))
            }
        };
        return Ok(json(
            StatusCode::OK,
            serde_json::json!({"queue": queue.name(), "dry_run": act.dry_run, "outcome": outcome}),
        ));
    }
    let (query, filter) = read_query(request.uri().query().unwrap_or(""), now).map_err(bad_request)?;
    let queue = queue(state, query.queue.as_deref())?;
    let (mut conn, keys) = (queue.connection(), queue.keys());
    match request.uri().path() {
        "/dlq/stats" => {
            let stats = dlq::stats(&mut conn, keys, &filter)
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(json(
                StatusCode::OK,
                serde_json::json!({"queue": queue.name(), "total": stats.total, "groups": stats.groups}),
            ))
        }
        "/dlq/letter" => {
            let position = query.position.ok_or_else(|| bad_request("position: required"))?;
            let letter = dlq::at(&mut conn, keys, position, LETTER_BYTES)
                .await
                .map_err(|e| redis_error(&e))?;
            match letter {
                Some(letter) => Ok(json(StatusCode::OK, letter.to_json())),
                None => Err(json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": "no dead letter at that position now"}),
                )),
            }
        }
        _ => {
            let limit = query.limit.unwrap_or(50).clamp(1, MAX_LIMIT);
            let listing = dlq::list(&mut conn, keys, &filter, query.cursor, limit, SCAN_PER_REQUEST)
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(json(
                StatusCode::OK,
                serde_json::json!({
                    "queue": queue.name(),
                    "total": listing.total,
                    "items": listing.letters.iter().map(dlq::Letter::to_json).collect::<Vec<_>>(),
                    "next_cursor": listing.next,
                }),
            ))
        }
    }
}

/// A POST call's body and the filter it sends, or what is wrong with them.
pub(crate) fn read_act(body: &[u8], now: chrono::DateTime<chrono::Utc>) -> Result<(Act, Filter), String> {
    let act: Act = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    let mut filter = act.filter.parse(now)?;
    filter.ids.extend(act.ids.iter().filter(|i| !i.is_empty()).cloned());
    if filter.is_empty() && !act.all {
        return Err("refusing to act on every dead letter: send a filter or ids, \
                    or \"all\": true"
            .into());
    }
    if !filter.is_empty() && act.all {
        return Err("\"all\" and a filter contradict each other".into());
    }
    if act.rate.is_some_and(|r| !dlq::usable_rate(r)) {
        return Err("rate: a number of dead letters per second of at least 1e-18, \
                    such as 50"
            .into());
    }
    Ok((act, filter))
}

/// A GET call's query string and the filter it sends, or what is wrong with them.
pub(crate) fn read_query(query: &str, now: chrono::DateTime<chrono::Utc>) -> Result<(Query, Filter), String> {
    let query = serde_urlencoded(query)?;
    let filter = FilterText {
        reason: query.reason.clone(),
        status: query.status.clone(),
        since: query.since.clone(),
        until: query.until.clone(),
        grep: query.grep.clone(),
        ids: Vec::new(),
    }
    .parse(now)?;
    Ok((query, filter))
}

/// The query string, each parameter percent-decoded (`+` as a space).
fn serde_urlencoded(query: &str) -> Result<Query, String> {
    let mut map = serde_json::Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| "the query is not UTF-8".to_string())
        };
        let (key, value) = (decode(key)?, decode(value)?);
        let value = match key.as_str() {
            "limit" | "cursor" | "position" => serde_json::Value::from(
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{key}: {value:?} is not a whole number"))?,
            ),
            _ => serde_json::Value::from(value),
        };
        map.insert(key, value);
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| format!("query: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!same(b"", b"0123456789abcdef"));
    }

    #[test]
    fn queries_decode_and_name_the_bad_parameter() {
        let q = serde_urlencoded("reason=rejected%2Cexhausted&grep=a+b&limit=5").unwrap();
        assert_eq!(q.reason.as_deref(), Some("rejected,exhausted"));
        assert_eq!(q.grep.as_deref(), Some("a b"));
        assert_eq!(q.limit, Some(5));
        assert!(serde_urlencoded("limit=x").is_err());
        assert!(serde_urlencoded("bogus=1").is_err());
        assert!(serde_urlencoded("grep=%ff").is_err());
    }
}
