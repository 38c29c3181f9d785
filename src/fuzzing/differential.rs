//! courier's HTTP/1.1 client (`delivery::h1`) against hyper's on the same answers, over a
//! stream that releases each answer when its request is written: the differences allowed are
//! listed on `http_differential`, and only `allowed` lets them through.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;
use hyper::http::uri::PathAndQuery;
use hyper::{HeaderMap, Method};
use hyper_util::rt::TokioIo;
use tokio::time::timeout;

use super::{End, Script, Stream};
use crate::delivery::h1::{parse_head, AnswerError, BodyReader, Connection, Failure, Limits};
use crate::delivery::h1::{Outgoing, Parsed};

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
const STALL: Duration = Duration::from_secs(10);

/// The limits small enough for a fuzzer's inputs to reach.
const SMALL: Limits = Limits {
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
    let limits = if config & 0x20 != 0 { SMALL } else { Limits::DEFAULT };
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
                let shown = answers.iter().map(|a| a.escape_ascii().to_string());
                let shown: Vec<String> = shown.collect();
                panic!(
                    "answer {n} of {shown:?} (reads of {piece}, HEAD {to_head}, {end:?}, \
                     {limits:?}):\n courier {ours:?}\n hyper   {theirs:?}"
                )
            }
        }
    }
    let closed = matches!(ours.last(), Some(Seen::Answered { reusable: false, .. }));
    assert!(
        ours.len() == theirs.len() || closed,
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

/// What `allowed` makes of one answer as the two clients read it.
enum Verdict {
    Same,
    /// A listed difference: what follows on the connection is not compared.
    StopHere,
    Differ,
}

/// Whether courier's reading of one answer may differ from hyper's, by the list in
/// `http_differential`.
fn allowed(ours: &Seen, theirs: &Seen, answer: &[u8], to_head: bool, limits: &Limits) -> Verdict {
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
    let switched = refusal == Some(AnswerError::SwitchedProtocols);
    let cut_short = matches!(ours, Seen::Failed(_) | Seen::Answered { complete: false, .. });
    match (ours, theirs) {
        (Seen::Failed(_), Seen::Answered { status: 101, .. }) if switched => Verdict::StopHere,
        _ if cut_short && own_bound => Verdict::StopHere,
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
fn courier_refusal(answer: &[u8], to_head: bool, limits: &Limits) -> Option<AnswerError> {
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
                    && HeaderValue::from_bytes(h.value).is_ok_and(|v| v.to_str().is_err())
            });
    }
}

/// The request both clients send: a POST of `{}`, or a HEAD with no body.
fn differential_request(to_head: bool) -> (Method, Bytes) {
    if to_head {
        (Method::HEAD, Bytes::new())
    } else {
        (Method::POST, Bytes::from_static(b"{}"))
    }
}

/// What courier's client (`delivery::h1::Connection`) makes of each answer of `script`.
async fn courier_reads(script: Script, to_head: bool, limits: Limits) -> Vec<Seen> {
    let answers = script.answers.len();
    let mut connection = Connection::with_limits(Stream(script), limits);
    let path = PathAndQuery::from_static("/internal/messages/deliver");
    let headers = HeaderMap::new();
    let host = HeaderValue::from_static("main");
    let mut seen = Vec::new();
    for _ in 0..answers {
        let (method, body) = differential_request(to_head);
        let request = Outgoing {
            method,
            path: &path,
            headers: &headers,
            extra: &[],
            trace: None,
            body,
        };
        let mut arrived = None;
        let exchange = connection.exchange(&request, &host, &mut arrived);
        let result = timeout(STALL, exchange).await;
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
            Ok(Err(Failure::Unanswered(e) | Failure::Broken(e))) => {
                let kind = format!("{:?}", e.kind());
                (Seen::Failed(kind), false)
            }
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

/// What hyper's client (`hyper::client::conn::http1`) makes of each answer of `script`.
async fn hyper_reads(script: Script, to_head: bool) -> Vec<Seen> {
    let answers = script.answers.len();
    let mut seen = Vec::new();
    let handshake = hyper::client::conn::http1::Builder::new()
        .allow_obsolete_multiline_headers_in_responses(true)
        .handshake::<_, Full<Bytes>>(TokioIo::new(Stream(script)))
        .await;
    let Ok((mut sender, connection)) = handshake else {
        return vec![Seen::Failed("handshake".into())];
    };
    tokio::spawn(connection);
    for _ in 0..answers {
        let (method, body) = differential_request(to_head);
        let request = hyper::Request::builder()
            .method(method)
            .uri("/internal/messages/deliver")
            .header(hyper::header::HOST, "main")
            .body(Full::new(body))
            .expect("a request");
        let response = match timeout(STALL, sender.send_request(request)).await {
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
            match timeout(STALL, body.frame()).await {
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
        tokio::time::sleep(Duration::from_millis(1)).await;
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
