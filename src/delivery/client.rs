//! The HTTP client for the one main server: keep-alive HTTP/1.1 connections from a pool, each
//! exchange written and read by the task that sends it (`h1`), or every request on one HTTP/2
//! connection (hyper's) when the server takes h2 in the TLS handshake. No redirects, no proxy,
//! no cookies, no per-request URL parsing: a request costs its head, its body and a write. Every
//! exchange, connecting included, is bounded by the request timeout; every answer's body is read
//! up to `h1::MAX_RESPONSE_BODY`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http2, TrySendError};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use url::{Position, Url};

use super::h1::{Answer, Connection, Exchanged, Failure, KeptBody, Outgoing};
use super::{rustls_error, DeliveryError};
use crate::config::MainServerSettings;
use crate::tls::ClientTls;

/// A request body on the HTTP/2 connection: always whole.
type Body = Full<bytes::Bytes>;

/// How long an unused keep-alive connection may wait in the pool before it is closed rather
/// than reused: servers close theirs after a minute or so (nginx 75 s), and a request sent as
/// the server closes is one that fails.
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// A request that took longer than its limit.
#[derive(Debug, thiserror::Error)]
#[error("{what} took longer than {limit:?}")]
pub struct Elapsed {
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
/// after the answer) or a handle on the shared HTTP/2 connection.
enum Sender {
    H1(Connection),
    H2(http2::SendRequest<Body>),
}

/// Keep-alive connections to the main server. Cheap to share; built again (and the old one
/// dropped once its requests finish) when the TLS files change.
pub struct Client {
    target: Target,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    /// The HTTP/2 connection, when the server took h2.
    shared: Mutex<Option<http2::SendRequest<Body>>>,
    /// Held while the HTTP/2 connection is made, so that 64 tasks starting at once make one.
    connecting: tokio::sync::Mutex<()>,
    /// The server answered the handshake with HTTP/1.1 although h2 was offered.
    h1_only: AtomicBool,
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
            connecting: tokio::sync::Mutex::new(()),
            h1_only: AtomicBool::new(false),
        })
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
                tracing::debug!(status = %answer.status, "main server's answer stalled after its head");
                Ok(answer)
            }
            None => Err(Elapsed::error("the request", limit)),
        }
    }

    async fn exchange(&self, request: &Outgoing<'_>, arrived: &mut Option<Answer>) -> Result<Answer, DeliveryError> {
        let mut sender = self.reuse();
        let mut reused = sender.is_some();
        let host = &self.target.host_header;
        loop {
            let sender = match sender.take() {
                Some(sender) => sender,
                // Boxed: connecting (TLS handshake state included) is rare and large, and
                // would otherwise make every delivery task's future large.
                None => Box::pin(self.connect()).await?,
            };
            match sender {
                Sender::H1(mut connection) => match connection.exchange(request, host, arrived).await {
                    Ok(Exchanged { answer, reusable }) => {
                        if reusable {
                            self.keep(connection);
                        }
                        return Ok(answer);
                    }
                    // A kept connection that closed as the request went out (the server's
                    // keep-alive ran out just then): the server cannot have answered it, so it
                    // goes once more, on a new connection. A new connection's failure stands.
                    Err(Failure::Unanswered(_)) if reused => reused = false,
                    Err(Failure::Unanswered(e) | Failure::Broken(e)) => return Err(from_io(e)),
                    Err(Failure::Answer(e)) => return Err(DeliveryError::Other(Arc::new(e))),
                },
                Sender::H2(shared) => match send_h2(shared, request, &self.target).await {
                    Ok(response) => return finish_h2(response, arrived).await,
                    // The shared connection closed before the request went out: forgotten,
                    // and the request goes once more on a new one.
                    Err((_, true)) if reused => {
                        *lock(&self.shared) = None;
                        reused = false;
                    }
                    Err((error, _)) => return Err(error),
                },
            }
        }
    }

    /// A kept connection that is still open: the HTTP/2 one, or the newest idle HTTP/1.1 one.
    /// Idle connections past `IDLE_LIMIT` or closed are dropped on the way; the heartbeat's
    /// `close_idle` takes care of those at the bottom of the pool.
    fn reuse(&self) -> Option<Sender> {
        if self.target.http2 && !self.h1_only.load(Ordering::Relaxed) {
            let shared = lock(&self.shared);
            if let Some(sender) = shared.as_ref().filter(|s| !s.is_closed()) {
                return Some(Sender::H2(sender.clone()));
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
        if let Some(sender) = lock(&self.shared).as_ref().filter(|s| !s.is_closed()) {
            return Ok(Sender::H2(sender.clone()));
        }
        let sender = self.target.connect().await?;
        match &sender {
            Sender::H2(shared) => *lock(&self.shared) = Some(shared.clone()),
            Sender::H1(_) => self.h1_only.store(true, Ordering::Relaxed),
        }
        Ok(sender)
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
    if let Some((name, value)) = &outgoing.extra {
        request.headers_mut().insert(*name, value.clone());
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
            return Ok(Sender::H2(sender));
        }
        Ok(Sender::H1(Connection::new(stream)))
    }
}

/// A failed send as its error and whether hyper never sent it.
fn not_sent(mut error: TrySendError<Request<Body>>) -> (DeliveryError, bool) {
    let unsent = error.take_message().is_some();
    (from_hyper(error.into_error()), unsent)
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
pub struct InvalidUrl(String);

/// The pool's locks guard plain data; a panic elsewhere while one was held leaves nothing
/// half-changed, so a poisoned lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The URL's path and query, for a request's URI (origin form).
pub fn path_of(url: &Url) -> &str {
    &url[Position::BeforePath..Position::AfterQuery]
}
