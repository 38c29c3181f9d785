//! The HTTP/1.1 client (`delivery::h1`) against a main server that answers with hand-written
//! bytes over real mutual TLS: chunked bodies, interim answers, bodies read to the close, a
//! kept connection that closes as the next request arrives, and answers courier must refuse.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier::config::{MainServerSettings, TlsSettings};
use courier::delivery::{Deliverer, DeliveryError};
use courier::message::Envelope;
use courier::telemetry::one_line;
use courier::tls::ClientTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::common::*;

/// What the server does with a request.
#[derive(Clone, Copy)]
enum Then {
    Answer(&'static str),
    AnswerAndClose(&'static str),
    /// Answer, then shut the server's side (as a keep-alive timeout would, later) and wait for
    /// the client to close its own.
    AnswerThenShutdown(&'static str),
    /// Close the connection without answering.
    Close,
    /// Answer, then neither send more nor close until the client does (a body that stalls).
    AnswerThenStall(&'static str),
    /// Answer, then end the TCP connection without TLS `close_notify` (cut on the way).
    AnswerThenCut(&'static str),
}

/// A request as the server saw it: which connection (numbered from 0 as accepted), and the
/// message id in its body.
#[derive(Debug, Clone)]
struct Seen {
    connection: usize,
    message_id: String,
}

/// A TLS server on a free port that answers each request as `script` says, given the request's
/// number overall and on its connection (both from 0).
struct RawServer {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The connections the client closed, by number, and whether it said so in TLS
    /// (`close_notify`) before the connection ended.
    closed: Arc<Mutex<Vec<(usize, bool)>>>,
}

impl RawServer {
    async fn start(pki: &Pki, script: fn(usize, usize) -> Then) -> RawServer {
        let config = pki.sink_tls().server_config().expect("server TLS");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let closed: Arc<Mutex<Vec<(usize, bool)>>> = Arc::default();
        let (record, closes) = (seen.clone(), closed.clone());
        tokio::spawn(async move {
            for connection in 0.. {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, record, closes) = (acceptor.clone(), record.clone(), closes.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    for on_connection in 0.. {
                        let body = match read_request(&mut tls).await {
                            Ok(body) => body,
                            Err(clean) => {
                                closes.lock().unwrap().push((connection, clean));
                                return;
                            }
                        };
                        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                        let message_id = json["message_id"].as_str().unwrap_or_default().to_string();
                        let overall = {
                            let mut seen = record.lock().unwrap();
                            seen.push(Seen { connection, message_id });
                            seen.len() - 1
                        };
                        let then = script(overall, on_connection);
                        let answer = match then {
                            Then::Answer(text)
                            | Then::AnswerAndClose(text)
                            | Then::AnswerThenShutdown(text)
                            | Then::AnswerThenStall(text)
                            | Then::AnswerThenCut(text) => text,
                            Then::Close => "",
                        };
                        if tls.write_all(answer.as_bytes()).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                        match then {
                            Then::Answer(_) => {}
                            Then::AnswerThenShutdown(_) => {
                                let _ = tls.shutdown().await;
                                let mut rest = Vec::new();
                                let clean = tls.read_to_end(&mut rest).await.is_ok();
                                closes.lock().unwrap().push((connection, clean));
                                return;
                            }
                            Then::AnswerAndClose(_) | Then::Close => {
                                let _ = tls.shutdown().await;
                                return;
                            }
                            Then::AnswerThenStall(_) => {
                                let mut rest = Vec::new();
                                let clean = tls.read_to_end(&mut rest).await.is_ok();
                                closes.lock().unwrap().push((connection, clean));
                                return;
                            }
                            Then::AnswerThenCut(_) => {
                                let _ = tls.get_mut().0.shutdown().await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawServer {
            url: format!("https://localhost:{port}/"),
            seen,
            closed,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn closed_by_client(&self) -> Vec<usize> {
        self.closed
            .lock()
            .unwrap()
            .iter()
            .map(|(connection, _)| *connection)
            .collect()
    }

    /// Whether every connection the client closed, it closed with a TLS `close_notify`.
    fn all_closed_cleanly(&self) -> bool {
        self.closed.lock().unwrap().iter().all(|(_, clean)| *clean)
    }
}

/// Reads one request (head, then a body of its Content-Length): its body, or, where the client
/// ended the connection, whether it did so cleanly (TLS `close_notify` before the end).
async fn read_request(tls: &mut (impl AsyncReadExt + Unpin)) -> Result<Vec<u8>, bool> {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        match tls.read(&mut chunk).await {
            Ok(0) => return Err(buf.is_empty()),
            Err(_) => return Err(false),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .map_or(0, |n| n.trim().parse().unwrap());
    let mut body = buf.split_off(end);
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        match tls.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(false),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(body)
}

fn deliverer_to(pki: &Pki, url: &str) -> Deliverer {
    deliverer_within(pki, url, Duration::from_secs(5))
}

fn deliverer_within(pki: &Pki, url: &str, request_timeout: Duration) -> Deliverer {
    let tls = ClientTls::load(&TlsSettings {
        enabled: true,
        reload_interval: Duration::from_secs(60),
        cert_file: pki.cert_file.clone(),
        key_file: pki.key_file.clone(),
        ca_file: pki.ca_file.clone(),
    })
    .expect("client TLS");
    let settings = MainServerSettings {
        url: url.parse().expect("url"),
        connect_timeout: Duration::from_secs(5),
        request_timeout,
        http2: false,
        trace_context: true,
    };
    Deliverer::new(&settings, Some(&tls), "w-raw", 4).expect("deliverer")
}

async fn deliver(deliverer: &Deliverer, id: &str) -> Result<(), DeliveryError> {
    let envelope = Envelope::parse(message(id).into_bytes(), 1 << 20).expect("a valid message");
    deliverer.deliver(&envelope).await.result
}

const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";

#[tokio::test]
async fn chunked_interim_and_close_delimited_answers_are_read_on_kept_connections() {
    let pki = Pki::new();
    let server = RawServer::start(&pki, |overall, _| match overall {
        0 => Then::Answer(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;x=y\r\nhello\r\n0\r\nTrailer: t\r\n\r\n",
        ),
        1 => Then::Answer("HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy"),
        2 => Then::AnswerAndClose("HTTP/1.1 500 Internal Server Error\r\n\r\nread to the close"),
        _ => Then::Answer(OK),
    })
    .await;
    let deliverer = deliverer_to(&pki, &server.url);

    deliver(&deliverer, "chunked")
        .await
        .expect("a chunked 200 after a 100 delivers");
    match deliver(&deliverer, "busy").await {
        Err(DeliveryError::Status {
            status: 503,
            retry_after,
            body,
        }) => assert_eq!((retry_after, body.as_str()), (Some(Duration::from_secs(7)), "busy")),
        other => panic!("503 with Retry-After: {other:?}"),
    }
    match deliver(&deliverer, "to-close").await {
        Err(DeliveryError::Status { status: 500, body, .. }) => assert_eq!(body, "read to the close"),
        other => panic!("500 read to the close: {other:?}"),
    }
    deliver(&deliverer, "after")
        .await
        .expect("delivered on a new connection");

    let connections: Vec<usize> = server.seen().iter().map(|s| s.connection).collect();
    assert_eq!(
        connections,
        [0, 0, 0, 1],
        "the first three on one kept connection, the fourth on a new one after the close"
    );
}

#[tokio::test]
async fn a_kept_connection_closing_as_a_request_arrives_costs_no_attempt() {
    let pki = Pki::new();
    // The first connection takes one request, then closes on the next without answering (a
    // keep-alive timeout running out just as it arrives); later connections always answer.
    let server = RawServer::start(&pki, |overall, on_connection| match (overall, on_connection) {
        (1, 1) => Then::Close,
        _ => Then::Answer(OK),
    })
    .await;
    let deliverer = deliverer_to(&pki, &server.url);
    deliver(&deliverer, "first").await.expect("first");
    deliver(&deliverer, "second")
        .await
        .expect("sent again on a new connection, not failed");
    let seen: Vec<(usize, String)> = server
        .seen()
        .into_iter()
        .map(|s| (s.connection, s.message_id))
        .collect();
    let expected = [(0, "first"), (0, "second"), (1, "second")].map(|(c, id)| (c, id.to_string()));
    assert_eq!(seen, expected, "the second sent again, once, on a new connection");

    // A new connection that closes without answering fails the attempt: sent once, not again.
    let cutting = RawServer::start(&pki, |_, _| Then::Close).await;
    let fresh = deliverer_to(&pki, &cutting.url);
    let error = deliver(&fresh, "cut").await.expect_err("no answer");
    assert!(matches!(error, DeliveryError::Other(_)), "{error:?}");
    assert!(
        one_line(&error).contains("closed the connection"),
        "{}",
        one_line(&error)
    );
    assert_eq!(cutting.seen().len(), 1, "one request: no retry on a new connection");
}

#[tokio::test]
async fn answers_courier_cannot_read_fail_the_attempt_naming_what_is_wrong() {
    let pki = Pki::new();
    // What the one-line error must name, for the script's answers 0 to 4.
    let named = [
        "Content-Length",
        "switched protocols",
        "interim",
        "not HTTP/1.1",
        "larger than",
    ];
    let server = RawServer::start(&pki, |overall, _| {
        const TOO_MANY_INTERIM: &str = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\
            HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\
            HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\
            HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        static HUGE_HEAD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        match overall {
            0 => Then::Answer("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}"),
            1 => Then::Answer("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"),
            2 => Then::Answer(TOO_MANY_INTERIM),
            3 => Then::Answer("SMTP ready\r\n\r\n"),
            4 => Then::Answer(HUGE_HEAD.get_or_init(|| format!("HTTP/1.1 200 OK\r\nX: {}\r\n", "y".repeat(70_000)))),
            // A 200 whose chunked body is broken: delivered (the head said so), the connection
            // not kept.
            5 => Then::Answer("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            _ => Then::Answer(OK),
        }
    })
    .await;
    let deliverer = deliverer_to(&pki, &server.url);
    for (n, needle) in named.iter().enumerate() {
        let error = deliver(&deliverer, &format!("bad-{n}")).await.expect_err("refused");
        let line = one_line(&error);
        assert!(matches!(error, DeliveryError::Other(_)), "case {n}: {line}");
        assert!(line.contains(needle), "case {n}: {line}");
    }
    deliver(&deliverer, "broken-body")
        .await
        .expect("a 200 whose body breaks off delivers");
    deliver(&deliverer, "after").await.expect("delivered");
    let connections: Vec<usize> = server.seen().iter().map(|s| s.connection).collect();
    assert_eq!(
        connections,
        [0, 1, 2, 3, 4, 5, 6],
        "no connection that carried an unreadable answer is used again"
    );
}

#[tokio::test]
async fn the_heartbeat_sweep_closes_kept_connections_the_server_closed_and_only_those() {
    let pki = Pki::new();
    // The second request to arrive is answered and its connection shut; the other stays open.
    let server = RawServer::start(&pki, |overall, _| match overall {
        1 => Then::AnswerThenShutdown(OK),
        _ => Then::Answer(OK),
    })
    .await;
    let deliverer = deliverer_to(&pki, &server.url);
    // Two at once, so that each has a connection of its own.
    let (a, b) = tokio::join!(deliver(&deliverer, "a"), deliver(&deliverer, "b"));
    a.and(b).expect("both delivered");

    // The connection that carried the second request to arrive is the one the server shut.
    let shut = server.seen()[1].connection;
    let kept = 1 - shut;

    // Without the sweep the worker would hold its end of that connection until its next request.
    eventually(|| async {
        deliverer.close_idle();
        server.closed_by_client().contains(&shut)
    })
    .await;
    deliver(&deliverer, "c").await.expect("delivered");
    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].connection, kept, "the connection the server kept is still used");
    assert_eq!(server.closed_by_client(), [shut], "and was not closed");
    assert!(server.all_closed_cleanly(), "the worker said goodbye in TLS");

    // Dropping the client closes the connection it kept, cleanly too.
    drop(deliverer);
    eventually(|| async { server.closed_by_client().contains(&kept) }).await;
    assert!(server.all_closed_cleanly(), "closed with a close_notify");
}

/// The status and error text of an attempt the main server answered with an error.
fn status_of(result: Result<(), DeliveryError>) -> (u16, String) {
    match result {
        Err(DeliveryError::Status { status, body, .. }) => (status, body),
        other => panic!("an error status: {other:?}"),
    }
}

#[tokio::test]
async fn chunk_lines_hyper_refuses_are_refused_and_folded_headers_read_as_one() {
    let pki = Pki::new();
    let server = RawServer::start(&pki, |overall, _| match overall {
        // No hex digit: once taken as the last chunk, the connection kept.
        0 => Then::Answer("HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n\r\n\r\n"),
        // A bare LF inside an extension: once it swallowed the next line.
        1 => Then::Answer("HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n4;a\nb\r\nbusy\r\n0\r\n\r\n"),
        // obs-fold (RFC 9112 5.2): read as a space, the answer kept.
        2 => Then::Answer("HTTP/1.1 503 Busy\r\nRetry-After:\r\n 7\r\nContent-Length: 4\r\n\r\nbusy"),
        _ => Then::Answer(OK),
    })
    .await;
    let deliverer = deliverer_to(&pki, &server.url);
    for id in ["no-digit", "bare-lf"] {
        let (status, text) = status_of(deliver(&deliverer, id).await);
        assert_eq!(status, 503, "{id}: the head decides");
        assert!(text.ends_with("(answer incomplete)"), "{id}: {text}");
    }
    match deliver(&deliverer, "folded").await {
        Err(DeliveryError::Status {
            status: 503,
            retry_after,
            body,
        }) => assert_eq!((retry_after, body.as_str()), (Some(Duration::from_secs(7)), "busy")),
        other => panic!("a 503 with a folded Retry-After: {other:?}"),
    }
    deliver(&deliverer, "after").await.expect("delivered");
    let connections: Vec<usize> = server.seen().iter().map(|s| s.connection).collect();
    assert_eq!(
        connections,
        [0, 1, 2, 2],
        "no connection kept after a chunk line refused; kept after the folded header"
    );
}

#[tokio::test]
async fn an_answer_whose_body_stalls_is_what_its_head_says_and_its_connection_is_dropped() {
    let pki = Pki::new();
    let server = RawServer::start(&pki, |overall, _| match overall {
        0 => Then::AnswerThenStall("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"),
        1 => Then::AnswerThenStall("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100\r\n\r\nbusy"),
        _ => Then::Answer(OK),
    })
    .await;
    let deliverer = deliverer_within(&pki, &server.url, Duration::from_millis(400));
    deliver(&deliverer, "accepted")
        .await
        .expect("a 200 whose body stalls past the timeout is delivered");
    let (status, text) = status_of(deliver(&deliverer, "busy").await);
    assert_eq!((status, text.as_str()), (503, "busy (answer incomplete)"));
    deliver(&deliverer, "after").await.expect("delivered");
    let connections: Vec<usize> = server.seen().iter().map(|s| s.connection).collect();
    assert_eq!(connections, [0, 1, 2], "a stalled connection is not used again");
    eventually(|| async { server.closed_by_client().len() == 2 }).await;
}

#[tokio::test]
async fn a_body_read_to_a_close_without_close_notify_is_marked_incomplete() {
    let pki = Pki::new();
    let server = RawServer::start(&pki, |overall, _| match overall {
        0 => Then::AnswerThenCut("HTTP/1.1 500 Internal Server Error\r\n\r\npartial text"),
        _ => Then::AnswerAndClose("HTTP/1.1 500 Internal Server Error\r\n\r\nwhole text"),
    })
    .await;
    let deliverer = deliverer_to(&pki, &server.url);
    let (status, text) = status_of(deliver(&deliverer, "cut").await);
    assert_eq!((status, text.as_str()), (500, "partial text (answer incomplete)"));
    let (status, text) = status_of(deliver(&deliverer, "clean").await);
    assert_eq!(
        (status, text.as_str()),
        (500, "whole text"),
        "close_notify ends it whole"
    );
}

#[tokio::test]
async fn an_early_answer_to_a_large_body_is_read_not_lost_to_the_write() {
    let pki = Pki::new();
    let config = pki.sink_tls().server_config().expect("server TLS");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let release = Arc::new(tokio::sync::Notify::new());
    let held = release.clone();
    // Reads the request's head only, answers 413, says goodbye in TLS and shuts its side, and
    // then reads nothing more: the client's body has nowhere to go.
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.expect("TLS");
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 1024];
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        let answer = "HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 8\r\n\r\ntoo big!";
        tls.write_all(answer.as_bytes()).await.expect("answer");
        let _ = tls.shutdown().await;
        held.notified().await;
    });
    let deliverer = deliverer_within(&pki, &format!("https://localhost:{port}/"), Duration::from_secs(3));
    // 4 MiB: more than loopback's socket buffers take while the server reads nothing (1 MiB
    // fitted in them here, so its write ended and the 413 was read either way).
    let big = format!(r#"{{"message_id":"big","payload":"{}"}}"#, "x".repeat(4 << 20));
    let envelope = Envelope::parse(big.into_bytes(), 8 << 20).expect("a valid message");
    let result = deliverer.deliver(&envelope).await.result;
    release.notify_one();
    let (status, text) = status_of(result);
    assert_eq!((status, text.as_str()), (413, "too big!"));
}
