//! Requests sent once more without spending an attempt, against the worker over real mutual
//! TLS. HTTP/2 servers going away: a main server written frame by frame, so that a GOAWAY's
//! last stream id and a REFUSED_STREAM reset land exactly where the test says; a request the
//! server never processed goes once more on a new connection, with no "queued" status PUT, and
//! is counted. 421 Misdirected Request: once more on a new connection, then rejected as the
//! misconfiguration it is.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::common::*;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;

/// `:status 200` (HPACK static table entry 8) and `:status 503` (a literal with the indexed
/// name `:status`, not indexed).
const STATUS_200: &[u8] = &[0x88];
const STATUS_503: &[u8] = &[0x08, 0x03, b'5', b'0', b'3'];
const STATUS_421: &[u8] = &[0x08, 0x03, b'4', b'2', b'1'];

/// A request as the server received it, whole.
#[derive(Debug, Clone)]
struct Seen {
    /// The connection, numbered from 0 as accepted.
    connection: usize,
    stream: u32,
    body: serde_json::Value,
}

impl Seen {
    /// The delivery's message id, or None for a status PUT (its body has a `status`).
    fn delivery(&self) -> Option<&str> {
        self.body
            .get("status")
            .is_none()
            .then(|| self.body["message_id"].as_str())?
    }

    fn status_put(&self) -> Option<&str> {
        self.body["status"].as_str()
    }
}

/// What the server does with a whole request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    Ok,
    Unavailable,
    Refuse,
    Misdirected,
    /// Answer nothing yet: the connection's `goaway_at`-th held request sends the GOAWAY.
    Hold,
}

/// A TLS server speaking HTTP/2 from hand-written frames.
struct FrameServer {
    url: String,
    seen: watch::Receiver<Vec<Seen>>,
}

impl FrameServer {
    /// `script` decides for each request, given what the server has seen before it. When a
    /// connection holds `goaway_at` requests, the server answers the first with 200 and sends
    /// GOAWAY with its stream as the last one processed: the others it never processed.
    async fn start(pki: &Pki, goaway_at: usize, script: fn(&Seen, &[Seen]) -> Act) -> FrameServer {
        let config = pki.sink_tls().server_config().expect("server TLS");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (record, seen) = watch::channel(Vec::new());
        let record = Arc::new(record);
        tokio::spawn(async move {
            for connection in 0.. {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, record) = (acceptor.clone(), record.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    assert_eq!(
                        tls.get_ref().1.alpn_protocol(),
                        Some(&b"h2"[..]),
                        "the worker offers h2"
                    );
                    let _ = serve(tls, connection, goaway_at, script, &record).await;
                });
            }
        });
        FrameServer {
            url: format!("https://localhost:{port}/"),
            seen,
        }
    }

    /// Waits until what the server has seen satisfies `done`.
    async fn wait_for(&self, done: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let mut seen = self.seen.clone();
        let result = tokio::time::timeout(WAIT, seen.wait_for(|s| done(s))).await;
        let seen = self.seen.borrow().clone();
        assert!(
            matches!(result, Ok(Ok(_))),
            "the server did not see what was expected: {seen:#?}"
        );
        seen
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).expect("a small frame").to_be_bytes();
    let mut out = vec![length[1], length[2], length[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// One connection: the preface, settings, and each request answered as the script says.
async fn serve(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    connection: usize,
    goaway_at: usize,
    script: fn(&Seen, &[Seen]) -> Act,
    record: &watch::Sender<Vec<Seen>>,
) -> std::io::Result<()> {
    let mut preface = [0u8; 24];
    tls.read_exact(&mut preface).await?;
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    let mut bodies: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    let mut held: Vec<u32> = Vec::new();
    // The writes of one frame's answer go out together.
    let (out, mut to_send) = mpsc::unbounded_channel::<Vec<u8>>();
    loop {
        let mut head = [0u8; 9];
        tokio::select! {
            read = tls.read_exact(&mut head) => { read?; }
            Some(bytes) = to_send.recv() => { tls.write_all(&bytes).await?; continue; }
        }
        let length = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; length];
        tls.read_exact(&mut payload).await?;
        let mut whole = false;
        match kind {
            SETTINGS if flags & ACK == 0 => tls.write_all(&frame(SETTINGS, ACK, 0, &[])).await?,
            PING if flags & ACK == 0 => tls.write_all(&frame(PING, ACK, 0, &payload)).await?,
            HEADERS => {
                bodies.entry(stream).or_default();
                whole = flags & END_STREAM != 0;
            }
            DATA => {
                bodies.entry(stream).or_default().extend_from_slice(&payload);
                if length > 0 {
                    // Gives the connection's window back, so that thousands of bodies fit.
                    let increment = u32::try_from(length).expect("a small frame").to_be_bytes();
                    tls.write_all(&frame(WINDOW_UPDATE, 0, 0, &increment)).await?;
                }
                whole = flags & END_STREAM != 0;
            }
            _ => {}
        }
        if !whole {
            continue;
        }
        let body = bodies.remove(&stream).unwrap_or_default();
        let request = Seen {
            connection,
            stream,
            body: serde_json::from_slice(&body).unwrap_or_default(),
        };
        let mut act = Act::Ok;
        record.send_modify(|seen| {
            act = script(&request, seen);
            seen.push(request);
        });
        let answer = match act {
            Act::Ok => frame(HEADERS, END_HEADERS | END_STREAM, stream, STATUS_200),
            Act::Unavailable => frame(HEADERS, END_HEADERS | END_STREAM, stream, STATUS_503),
            Act::Misdirected => frame(HEADERS, END_HEADERS | END_STREAM, stream, STATUS_421),
            Act::Refuse => frame(RST_STREAM, 0, stream, &REFUSED_STREAM.to_be_bytes()),
            Act::Hold => {
                held.push(stream);
                if held.len() < goaway_at {
                    continue;
                }
                held.sort_unstable();
                let first = held[0];
                let mut bytes = frame(HEADERS, END_HEADERS | END_STREAM, first, STATUS_200);
                let mut goaway = first.to_be_bytes().to_vec();
                goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
                bytes.extend(frame(GOAWAY, 0, 0, &goaway));
                bytes
            }
        };
        let _ = out.send(answer);
    }
}

/// A counter's value in the worker's metrics, by its full series name.
async fn metric(worker: &InProcess, series: &str) -> f64 {
    let (_, text) = get(&worker.url("/metrics")).await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} in /metrics"))
}

fn resent(reason: &str) -> String {
    format!("worker_requests_resent_total{{reason=\"{reason}\",worker_id=\"w-h2\"}}")
}

async fn worker_for(redis: &RedisServer, server: &FrameServer, pki: &Pki) -> InProcess {
    let vars = env(
        redis,
        &server.url,
        pki,
        "w-h2",
        &[
            ("MAIN_SERVER_HTTP2", "true"),
            ("WORKER_CONCURRENCY", "4"),
            ("WORKER_RETRY_INTERVAL", "60"),
        ],
    );
    start_worker(&vars).await
}

/// Four deliveries in flight on the first connection; the server answers the first and sends
/// GOAWAY naming it as the last it processed. The other three go once more on a new
/// connection, as the same attempt, with no "queued" status PUT, and are counted.
#[tokio::test]
async fn requests_past_a_goaway_go_again_on_a_new_connection_without_an_attempt() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let server = FrameServer::start(&pki, 4, |request, _| match request.connection {
        0 => Act::Hold,
        _ => Act::Ok,
    })
    .await;
    let ids: Vec<String> = (0..4).map(|n| format!("ga-{n}")).collect();
    enqueue(&redis, Q, &ids.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
    let worker = worker_for(&redis, &server, &pki).await;
    let seen = server
        .wait_for(|seen| {
            seen.iter()
                .filter(|s| s.connection == 1 && s.delivery().is_some())
                .count()
                == 3
        })
        .await;
    eventually(|| async { len(&redis, Q).await == 0 && len(&redis, &keys().processing("w-h2")).await == 0 }).await;
    assert_eq!(metric(&worker, &resent("goaway")).await, 3.0);
    assert_eq!(metric(&worker, &resent("refused_stream")).await, 0.0);
    worker.stop().await;

    let first: Vec<&Seen> = seen.iter().filter(|s| s.connection == 0).collect();
    assert_eq!(first.len(), 4, "four on the first connection: {seen:#?}");
    let processed = first.iter().min_by_key(|s| s.stream).expect("one");
    for again in seen.iter().filter(|s| s.connection == 1) {
        assert_ne!(
            again.delivery(),
            processed.delivery(),
            "the processed one is not sent again"
        );
        assert_eq!(again.body["attempt"], 1, "no attempt spent: {again:?}");
    }
    assert!(
        seen.iter().all(|s| s.status_put().is_none()),
        "no status PUT for a request the server never processed: {seen:#?}"
    );
    assert!(dead_letters(&redis, Q).await.is_empty());
    assert_eq!(len(&redis, &keys().retry).await, 0, "nothing waits for a retry");
}

/// A REFUSED_STREAM reset, to a delivery and to a status PUT: each goes once more and is
/// answered; the delivery spends no attempt, the PUT is not lost.
#[tokio::test]
async fn refused_streams_go_again_for_deliveries_and_status_puts() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let server = FrameServer::start(&pki, usize::MAX, |request, before| {
        let times = |what: &dyn Fn(&Seen) -> bool| before.iter().filter(|s| what(s)).count();
        match (request.delivery(), request.status_put()) {
            // "refused" is refused once; "busy" answered 503 once, its PUT refused once.
            (Some("refused"), _) if times(&|s| s.delivery() == Some("refused")) == 0 => Act::Refuse,
            (Some("busy"), _) if times(&|s| s.delivery() == Some("busy")) == 0 => Act::Unavailable,
            (_, Some(_)) if times(&|s| s.status_put().is_some()) == 0 => Act::Refuse,
            _ => Act::Ok,
        }
    })
    .await;
    enqueue(&redis, Q, &[message("refused"), message("busy")]).await;
    let worker = worker_for(&redis, &server, &pki).await;
    let seen = server
        .wait_for(|seen| seen.iter().filter(|s| s.status_put().is_some()).count() == 2)
        .await;
    eventually(|| async { len(&redis, Q).await == 0 && len(&redis, &keys().retry).await == 1 }).await;
    assert_eq!(metric(&worker, &resent("refused_stream")).await, 2.0);
    assert_eq!(
        metric(&worker, "worker_status_updates_total{result=\"ok\",worker_id=\"w-h2\"}").await,
        1.0
    );
    worker.stop().await;

    let refused: Vec<&Seen> = seen.iter().filter(|s| s.delivery() == Some("refused")).collect();
    assert_eq!(refused.len(), 2, "sent once more: {seen:#?}");
    assert!(
        refused.iter().all(|s| s.body["attempt"] == 1),
        "no attempt spent: {refused:?}"
    );
    let puts: Vec<&Seen> = seen.iter().filter(|s| s.status_put().is_some()).collect();
    assert!(
        puts.iter()
            .all(|s| s.status_put() == Some("queued") && s.body["attempt_count"] == 1),
        "both PUTs are busy's first failure, queued: {puts:?}"
    );
    let retry = ids_in(&redis, &keys().retry).await;
    assert_eq!(retry.len(), 1, "busy waits for its retry: {retry:?}");
    assert!(dead_letters(&redis, Q).await.is_empty());
}

/// 421 over HTTP/2: "once" is answered 421 on the shared connection and delivered on a
/// connection of its own, as the same attempt; "always" comes back 421 there too and is
/// rejected with a line that names the misconfiguration.
#[tokio::test]
async fn a_421_goes_once_more_on_a_new_connection_then_is_rejected_as_a_misconfiguration() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let server = FrameServer::start(&pki, usize::MAX, |request, before| {
        let earlier = before.iter().any(|s| s.delivery() == request.delivery());
        match request.delivery() {
            Some("always") => Act::Misdirected,
            Some("once") if !earlier => Act::Misdirected,
            _ => Act::Ok,
        }
    })
    .await;
    enqueue(&redis, Q, &[message("once")]).await;
    let worker = worker_for(&redis, &server, &pki).await;
    server
        .wait_for(|seen| seen.iter().filter(|s| s.delivery() == Some("once")).count() == 2)
        .await;
    enqueue(&redis, Q, &[message("always")]).await;
    // The rejected one's "failed" status PUT ends it.
    let seen = server
        .wait_for(|seen| seen.iter().any(|s| s.status_put() == Some("failed")))
        .await;
    eventually(|| async { len(&redis, &keys().dead).await == 1 }).await;
    assert_eq!(metric(&worker, &resent("misdirected")).await, 2.0);
    worker.stop().await;

    for id in ["once", "always"] {
        let tries: Vec<&Seen> = seen.iter().filter(|s| s.delivery() == Some(id)).collect();
        assert_eq!(tries.len(), 2, "{id}: twice, no more: {seen:#?}");
        assert_ne!(tries[0].connection, tries[1].connection, "{id}: on a new connection");
        assert!(
            tries.iter().all(|s| s.body["attempt"] == 1),
            "{id}: one attempt: {tries:?}"
        );
    }
    let dead = dead_letters(&redis, Q).await;
    assert_eq!(dead[0]["reason"], "rejected", "{dead:?}");
    let error = dead[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("421") && error.contains("misconfiguration") && error.contains("host name"),
        "{error}"
    );
    let puts: Vec<&Seen> = seen.iter().filter(|s| s.status_put().is_some()).collect();
    assert_eq!(puts.len(), 1, "one PUT, \"failed\", for the rejected one: {puts:?}");
    assert_eq!(puts[0].body["attempt_count"], 1, "{puts:?}");
}

/// 421 over HTTP/1.1 (the reference main server): the same, once more and then rejected.
#[tokio::test]
async fn a_421_over_http1_goes_once_more_then_is_rejected() {
    use courier::devtools::sink::{Endpoint, Reply};
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    let sink = start_sink(
        &pki,
        Arc::new(move |call| {
            let first = seen.lock().unwrap().insert(call.message_id.clone());
            match (call.endpoint, call.message_id.as_str()) {
                (Endpoint::Deliver, "always") => Reply::status(421),
                (Endpoint::Deliver, "once") if first => Reply::status(421),
                _ => Reply::status(200),
            }
        }),
    )
    .await;
    enqueue(&redis, Q, &[message("once"), message("always")]).await;
    let worker = worker_on(&redis, &sink, &pki, "w-h2", &[("WORKER_RETRY_INTERVAL", "60")]).await;
    eventually(|| async { len(&redis, Q).await == 0 && len(&redis, &keys().dead).await == 1 }).await;
    assert_eq!(metric(&worker, &resent("misdirected")).await, 2.0);
    worker.stop().await;
    let deliveries = sink.record.deliveries();
    for id in ["once", "always"] {
        let tries: Vec<_> = deliveries.iter().filter(|c| c.message_id == id).collect();
        assert_eq!(tries.len(), 2, "{id}: twice: {deliveries:?}");
        assert!(tries.iter().all(|c| c.attempt == 1), "{id}: one attempt");
    }
    assert_eq!(sink.record.delivered(), ["once"]);
    let dead = dead_letters(&redis, Q).await;
    assert!(
        dead[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("misconfiguration"),
        "{dead:?}"
    );
}
