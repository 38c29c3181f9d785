//! The HTTP client for the one main server: keep-alive HTTP/1.1 connections from a pool, each
//! exchange written and read by the task that sends it (`h1`), or every request on one HTTP/2
//! connection (hyper's) when the server takes h2 in the TLS handshake. No redirects, no proxy,
//! no cookies, no per-request URL parsing: a request costs its head, its body and a write. Every
//! exchange, connecting included, is bounded by the request timeout; every answer's body is read
//! up to `h1::MAX_RESPONSE_BODY`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http2, TrySendError};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use url::{Position, Url};

use super::h1::{Answer, Connection, Exchanged, Failure, KeptBody, Outgoing};
use super::{find_cause, rustls_error, DeliveryError};
use crate::config::MainServerSettings;
use crate::tls::ClientTls;
use crate::trace::{TRACEPARENT, TRACESTATE};

/// A request body on the HTTP/2 connection: always whole.
type Body = Full<bytes::Bytes>;

/// How long an unused keep-alive connection may wait in the pool before it is closed rather
/// than reused: servers close theirs after a minute or so (nginx 75 s), and a request sent as
/// the server closes is one that fails.
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// The most times one request is sent again because the HTTP/2 server proved it never
/// processed it (GOAWAY, REFUSED_STREAM, closed before sending); after that the failure stands.
/// Four was too few: Go's server, draining on every seventh answer's `Connection: close`, past
/// the last stream id of five connections in a row sent one request of 2,000 on a loaded
/// machine (the interop test). Each resend costs a new connection, never an attempt.
const MAX_RESENDS: u8 = 8;

/// A request that took longer than its limit.
#[derive(Debug, thiserror::Error)]
#[error("{what} took longer than {limit:?}")]
pub(super) struct Elapsed {
    what: &'static str,
    limit: Duration,
}

impl Elapsed {
    /// `what` took longer than `limit`, as the delivery error it is.
    fn error(what: &'static str, limit: Duration) -> DeliveryError {
        DeliveryError::Timeout(Arc::new(Elapsed { what, limit }))
    }
}

/// Where requests go and how: resolved from MAIN_SERVER_URL once.
struct Target {
    /// The host to connect to, without IPv6 brackets.
    host: String,
    port: u16,
    /// `host[:port]` as the Host header (HTTP/1.1) and `:authority` (HTTP/2) carry it.
    host_header: HeaderValue,
    authority: Authority,
    scheme: Scheme,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    http2: bool,
    connect_timeout: Duration,
    request_timeout: Duration,
}

/// An HTTP/1.1 connection waiting for its next request.
struct Idle {
    connection: Connection,
    since: Instant,
}

/// A connection ready for one request: an HTTP/1.1 one of this request's own (back to the pool
/// after the answer) or a handle on an HTTP/2 connection: the shared one, with its number, or
/// (`None`) one made for this request alone.
enum Sender {
    H1(Connection),
    H2(http2::SendRequest<Body>, Option<u64>),
}

/// The shared HTTP/2 connection and its number, so that a task that saw it go away forgets it
/// only if no other task has replaced it already.
struct Shared {
    sender: http2::SendRequest<Body>,
    number: u64,
}

/// Why a request was sent once more, on a new connection, without counting as an attempt:
/// each is a request the server provably never processed, or (421) one it asks to be sent on
/// another connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// A kept connection closed as the request went out, before any byte of an answer
    /// (HTTP/1.1), or the HTTP/2 connection closed before hyper sent the request.
    CloseRace,
    /// The HTTP/2 server sent GOAWAY with a last stream id below the request's stream
    /// (RFC 9113 §6.8).
    GoAway,
    /// The HTTP/2 server reset the request's stream with REFUSED_STREAM (RFC 9113 §8.7). The
    /// connection itself stays: the request goes again on the shared one (a new one only if
    /// it has closed), rather than every refusal under load costing a TLS handshake.
    RefusedStream,
    /// 421 Misdirected Request (RFC 9110 §15.5.20): the server asks for a new connection.
    Misdirected,
}

impl Resend {
    /// Every reason, for the metric's label values.
    pub const ALL: [Resend; 4] = [
        Resend::CloseRace,
        Resend::GoAway,
        Resend::RefusedStream,
        Resend::Misdirected,
    ];

    /// The bounded label of `worker_requests_resent_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Resend::CloseRace => "close_race",
            Resend::GoAway => "goaway",
            Resend::RefusedStream => "refused_stream",
            Resend::Misdirected => "misdirected",
        }
    }
}

/// Told of every request sent again (the worker counts them in its metrics).
pub type ResendHook = Arc<dyn Fn(Resend) + Send + Sync>;

/// Keep-alive connections to the main server. Cheap to share; built again (and the old one
/// dropped once its requests finish) when the TLS files change.
pub struct Client {
    target: Target,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    /// The HTTP/2 connection, when the server took h2.
    shared: Mutex<Option<Shared>>,
    /// The number of the last HTTP/2 connection made.
    connections: AtomicU64,
    /// Held while the HTTP/2 connection is made, so that 64 tasks starting at once make one.
    connecting: tokio::sync::Mutex<()>,
    /// The server answered the handshake with HTTP/1.1 although h2 was offered.
    h1_only: AtomicBool,
    resent: Option<ResendHook>,
}

impl Client {
    /// A client for `settings.url`, keeping up to `pool_size` idle HTTP/1.1 connections.
    /// `tls` is `None` only for plain-HTTP test servers (`http://`).
    pub fn new(
        settings: &MainServerSettings,
        tls: Option<&ClientTls>,
        pool_size: usize,
    ) -> Result<Client, DeliveryError> {
        let url = &settings.url;
        let invalid = |what: &str| DeliveryError::Other(Arc::new(InvalidUrl(format!("{url}: {what}"))));
        let host = match url.host() {
            Some(url::Host::Domain(name)) => name.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(invalid("no host")),
        };
        let port = url.port_or_known_default().ok_or_else(|| invalid("no port"))?;
        let host_port = &url[Position::BeforeHost..Position::AfterPort];
        let authority = Authority::try_from(host_port).map_err(|_| invalid("not a host and port"))?;
        let host_header = HeaderValue::from_str(host_port).map_err(|_| invalid("not a host and port"))?;
        let tls = match tls {
            Some(tls) => {
                crate::tls::install_default_provider();
                let mut config = tls.config.clone();
                config.alpn_protocols = if settings.http2 {
                    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
                } else {
                    vec![b"http/1.1".to_vec()]
                };
                let name = ServerName::try_from(host.clone()).map_err(|_| invalid("not a TLS server name"))?;
                Some((TlsConnector::from(Arc::new(config)), name))
            }
            None => None,
        };
        Ok(Client {
            target: Target {
                host,
                port,
                host_header,
                authority,
                scheme: if tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP },
                http2: settings.http2 && tls.is_some(),
                tls,
                connect_timeout: settings.connect_timeout,
                request_timeout: settings.request_timeout,
            },
            idle: Mutex::new(Vec::with_capacity(pool_size.max(1))),
            max_idle: pool_size.max(1),
            shared: Mutex::new(None),
            connections: AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
            h1_only: AtomicBool::new(false),
            resent: None,
        })
    }

    /// The same client, telling `hook` of every request it sends again.
    #[must_use]
    pub fn with_resend_hook(mut self, hook: Option<ResendHook>) -> Client {
        self.set_resend_hook(hook);
        self
    }

    pub(super) fn set_resend_hook(&mut self, hook: Option<ResendHook>) {
        self.resent = hook;
    }

    /// Sends a request and reads the answer, all within the request timeout. An answer whose
    /// head arrived in time is that answer: a body still coming at the deadline is cut there,
    /// the answer marked incomplete and its connection closed (a 2xx is delivered).
    pub async fn send(&self, request: &Outgoing<'_>) -> Result<Answer, DeliveryError> {
        let limit = self.target.request_timeout;
        let mut arrived = None;
        {
            // Polled where they lie rather than moved into a `Timeout`: each move of the
            // exchange's state is a copy.
            let exchange = self.exchange(request, &mut arrived);
            let deadline = tokio::time::sleep(limit);
            tokio::pin!(exchange, deadline);
            tokio::select! {
                biased;
                answer = &mut exchange => return answer,
                () = &mut deadline => {}
            }
        }
        match arrived {
            Some(answer) => {
                tracing::debug!(
                    status = %answer.status,
                    "main server's answer stalled after its head"
                );
                Ok(answer)
            }
            None => Err(Elapsed::error("the request", limit)),
        }
    }

    /// One request, sent again within the same time limit when the server provably never
    /// processed it (`Resend`) or answered 421, on a new connection (for REFUSED_STREAM, on the
    /// shared HTTP/2 one). A 421 and an HTTP/1.1 close race go once more, and the second try's
    /// result stands; HTTP/2's proofs are taken up to `MAX_RESENDS` times.
    async fn exchange(&self, request: &Outgoing<'_>, arrived: &mut Option<Answer>) -> Result<Answer, DeliveryError> {
        let mut next = self.reuse();
        let mut reused = next.is_some();
        // Resends so far: a 421 and an HTTP/1.1 close race go again only on the first try; an
        // HTTP/2 request the server proved it never processed goes again each time it proves
        // so, up to `MAX_RESENDS` (a server that drains every few requests refuses some resends
        // too, and none of them is an attempt).
        let mut resends = 0u8;
        loop {
            let sender = match next.take() {
                Some(sender) => sender,
                // Boxed: connecting (TLS handshake state included) is rare and large, and
                // would otherwise make every delivery task's future large.
                None => Box::pin(self.connect()).await?,
            };
            let again = match sender {
                Sender::H1(mut connection) => {
                    match connection.exchange(request, &self.target.host_header, arrived).await {
                        // The connection is the wrong one for this host: not kept.
                        Ok(Exchanged { answer, .. })
                            if answer.status == StatusCode::MISDIRECTED_REQUEST && resends == 0 =>
                        {
                            Resend::Misdirected
                        }
                        Ok(Exchanged { answer, reusable }) => {
                            if reusable {
                                self.keep(connection);
                            }
                            return Ok(answer);
                        }
                        // A kept connection that closed as the request went out (the server's
                        // keep-alive ran out just then): the server cannot have answered it.
                        Err(Failure::Unanswered(_)) if reused && resends == 0 => Resend::CloseRace,
                        Err(Failure::Unanswered(e) | Failure::Broken(e)) => return Err(from_io(e)),
                        Err(Failure::Answer(e)) => return Err(DeliveryError::Other(Arc::new(e))),
                    }
                }
                Sender::H2(h2, number) => match send_h2(h2, request, &self.target).await {
                    Ok(response) if response.status() == StatusCode::MISDIRECTED_REQUEST && resends == 0 => {
                        Resend::Misdirected
                    }
                    Ok(response) => return finish_h2(response, arrived).await,
                    // The connection closed before the request went out (hyper handed it
                    // back), or the server said it never processed the stream.
                    Err((error, unsent)) if resends < MAX_RESENDS => match (unsent, unprocessed(&error)) {
                        (true, _) => {
                            self.forget(number);
                            Resend::CloseRace
                        }
                        (false, Some(Resend::GoAway)) => {
                            self.forget(number);
                            Resend::GoAway
                        }
                        (false, Some(reason)) => reason,
                        (false, None) => return Err(error),
                    },
                    Err((error, _)) => return Err(error),
                },
            };
            resends += 1;
            reused = false;
            tracing::debug!(
                reason = again.label(),
                method = %request.method,
                path = %request.path,
                "Sending the request again on a new connection: the main server did not process it"
            );
            if let Some(hook) = &self.resent {
                hook(again);
            }
            // 421 asks for a connection other than the shared one: one of this request's own.
            if again == Resend::Misdirected {
                next = Some(Box::pin(self.target.connect()).await?);
            }
        }
    }

    /// Forgets the shared HTTP/2 connection numbered `number`, which went away, unless another
    /// task has replaced it already; requests under way on it finish there.
    fn forget(&self, number: Option<u64>) {
        let mut shared = lock(&self.shared);
        if number.is_some() && shared.as_ref().map(|s| s.number) == number {
            *shared = None;
        }
    }

    /// A kept connection that is still open: the HTTP/2 one, or the newest idle HTTP/1.1 one.
    /// Idle connections past `IDLE_LIMIT` or closed are dropped on the way; the heartbeat's
    /// `close_idle` takes care of those at the bottom of the pool.
    fn reuse(&self) -> Option<Sender> {
        if self.target.http2 && !self.h1_only.load(Ordering::Relaxed) {
            let shared = lock(&self.shared);
            if let Some(Shared { sender, number }) = shared.as_ref().filter(|s| !s.sender.is_closed()) {
                return Some(Sender::H2(sender.clone(), Some(*number)));
            }
        }
        let mut idle = lock(&self.idle);
        while let Some(Idle { mut connection, since }) = idle.pop() {
            if since.elapsed() < IDLE_LIMIT && connection.is_open() {
                return Some(Sender::H1(connection));
            }
        }
        None
    }

    /// Closes the idle connections the server has closed or that waited past `IDLE_LIMIT`, so
    /// that a worker with nothing to deliver does not hold sockets the server let go of.
    /// Looking costs no system call for a connection on which nothing arrived.
    pub fn close_idle(&self) {
        lock(&self.idle).retain_mut(|idle| idle.since.elapsed() < IDLE_LIMIT && idle.connection.is_open());
    }

    /// Puts an HTTP/1.1 connection whose answer was read to the end back in the pool.
    fn keep(&self, connection: Connection) {
        let mut idle = lock(&self.idle);
        if idle.len() < self.max_idle {
            idle.push(Idle {
                connection,
                since: Instant::now(),
            });
        }
    }

    /// Opens a connection. Offering h2, tasks wait for one another, so that one connection is
    /// made and shared; an HTTP/1.1 connection is each task's own.
    async fn connect(&self) -> Result<Sender, DeliveryError> {
        if !self.target.http2 || self.h1_only.load(Ordering::Relaxed) {
            return self.target.connect().await;
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(Shared { sender, number }) = lock(&self.shared).as_ref().filter(|s| !s.sender.is_closed()) {
            return Ok(Sender::H2(sender.clone(), Some(*number)));
        }
        match self.target.connect().await? {
            Sender::H2(sender, _) => {
                let number = self.connections.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
                *lock(&self.shared) = Some(Shared {
                    sender: sender.clone(),
                    number,
                });
                Ok(Sender::H2(sender, Some(number)))
            }
            Sender::H1(connection) => {
                self.h1_only.store(true, Ordering::Relaxed);
                Ok(Sender::H1(connection))
            }
        }
    }
}

/// Sends one request on the HTTP/2 connection. On failure, whether it was never sent.
async fn send_h2(
    mut sender: http2::SendRequest<Body>,
    outgoing: &Outgoing<'_>,
    target: &Target,
) -> Result<Response<Incoming>, (DeliveryError, bool)> {
    // HTTP/2 carries scheme and authority as pseudo-headers, taken from the URI.
    let mut parts = hyper::http::uri::Parts::default();
    parts.scheme = Some(target.scheme.clone());
    parts.authority = Some(target.authority.clone());
    parts.path_and_query = Some(outgoing.path.clone());
    let uri = Uri::from_parts(parts).map_err(|e| (DeliveryError::Other(Arc::new(e)), false))?;
    let mut request = Request::new(Full::new(outgoing.body.clone()));
    *request.method_mut() = outgoing.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = outgoing.headers.clone();
    for (name, value) in outgoing.extra {
        request.headers_mut().insert(*name, value.clone());
    }
    if let Some(trace) = &outgoing.trace {
        request.headers_mut().insert(&TRACEPARENT, trace.parent_value());
        if let Some(state) = trace.state {
            request.headers_mut().insert(&TRACESTATE, state.clone());
        }
    }
    if let Err(e) = sender.ready().await {
        return Err((from_hyper(e), true));
    }
    sender.try_send_request(request).await.map_err(not_sent)
}

/// Reads an HTTP/2 answer's body, as much of it as `KeptBody` takes, into `arrived` (where a
/// deadline finds it).
async fn finish_h2(response: Response<Incoming>, arrived: &mut Option<Answer>) -> Result<Answer, DeliveryError> {
    let (head, mut body) = response.into_parts();
    let mut kept = KeptBody::new(head.status);
    let headers = if head.status.is_success() {
        HeaderMap::new()
    } else {
        head.headers
    };
    let answer = arrived.insert(Answer::new(head.status, headers));
    answer.complete = loop {
        match body.frame().await {
            None => break true,
            Some(Err(e)) => {
                // The answer's head arrived: a body that breaks off does not change it.
                tracing::debug!(error = %e, "main server's answer broke off");
                break false;
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if !kept.take(&mut answer.body, &data) {
                        break true;
                    }
                }
            }
        }
    };
    Ok(arrived
        .take()
        .unwrap_or_else(|| Answer::new(head.status, HeaderMap::new())))
}

impl Target {
    /// TCP (no delay), then TLS, then the HTTP handshake the server chose, within the connect
    /// timeout; the connection's own task is spawned and ends when the connection closes.
    async fn connect(&self) -> Result<Sender, DeliveryError> {
        let limit = self.connect_timeout;
        match tokio::time::timeout(limit, self.open()).await {
            Ok(sender) => sender,
            Err(_) => Err(Elapsed::error("connecting", limit)),
        }
    }

    async fn open(&self) -> Result<Sender, DeliveryError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| DeliveryError::Connect(Arc::new(e)))?;
        // Requests are whole when written: waiting to coalesce them only adds latency.
        let _ = tcp.set_nodelay(true);
        let Some((connector, name)) = &self.tls else {
            return Ok(Sender::H1(Connection::new(tcp)));
        };
        let stream = connector.connect(name.clone(), tcp).await.map_err(|e| {
            if rustls_error(&e).is_some() {
                DeliveryError::Tls(Arc::new(e))
            } else {
                DeliveryError::Connect(Arc::new(e))
            }
        })?;
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .handshake(TokioIo::new(stream))
                .await
                .map_err(from_hyper)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "HTTP/2 connection to the main server closed");
                }
            });
            return Ok(Sender::H2(sender, None));
        }
        Ok(Sender::H1(Connection::new(stream)))
    }
}

/// A failed send as its error and whether hyper never sent it.
fn not_sent(mut error: TrySendError<Request<Body>>) -> (DeliveryError, bool) {
    let unsent = error.take_message().is_some();
    (from_hyper(error.into_error()), unsent)
}

/// Whether an HTTP/2 request's failure proves the server never processed it: a GOAWAY the
/// server sent whose last stream id is below the request's (h2 fails exactly those streams with
/// the GOAWAY's error; the streams at or below it fail otherwise if the connection then ends),
/// or a REFUSED_STREAM reset the server sent.
fn unprocessed(error: &DeliveryError) -> Option<Resend> {
    let DeliveryError::Other(cause) = error else {
        return None;
    };
    find_cause(&**cause, &mut |e| {
        let h2 = e.downcast_ref::<h2::Error>()?;
        if !h2.is_remote() {
            None
        } else if h2.is_go_away() {
            Some(Resend::GoAway)
        } else if h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
            Some(Resend::RefusedStream)
        } else {
            None
        }
    })
}

/// A read or write that failed as the delivery error it amounts to: TLS when rustls is behind
/// it (a server refusing the client's certificate says so in an alert after the handshake).
fn from_io(error: std::io::Error) -> DeliveryError {
    if rustls_error(&error).is_some() {
        DeliveryError::Tls(Arc::new(error))
    } else {
        DeliveryError::Other(Arc::new(error))
    }
}

/// A hyper error as the delivery error it amounts to: TLS when rustls is behind it.
fn from_hyper(error: hyper::Error) -> DeliveryError {
    if rustls_error(&error).is_some() {
        DeliveryError::Tls(Arc::new(error))
    } else if error.is_timeout() {
        DeliveryError::Timeout(Arc::new(error))
    } else {
        DeliveryError::Other(Arc::new(error))
    }
}

/// MAIN_SERVER_URL cannot be used for requests (config checks prevent this; kept as an error
/// rather than a panic for callers that build settings themselves).
#[derive(Debug, thiserror::Error)]
#[error("cannot send requests to {0}")]
pub(super) struct InvalidUrl(String);

/// The pool's locks guard plain data; a panic elsewhere while one was held leaves nothing
/// half-changed, so a poisoned lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The URL's path and query, for a request's URI (origin form).
pub fn path_of(url: &Url) -> &str {
    &url[Position::BeforePath..Position::AfterQuery]
}
