//! The HTTP client for the one main server, on hyper's connection API: keep-alive HTTP/1.1
//! connections from a pool, or every request on one HTTP/2 connection when the server takes h2
//! in the TLS handshake. No redirects, no proxy, no cookies, no per-request URL parsing: a
//! request costs its head, its body and a write. Every exchange, connecting included, is bounded
//! by the request timeout; every answer's body is read up to `MAX_RESPONSE_BODY`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper::header::{HeaderMap, HeaderValue, HOST};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use url::{Position, Url};

use super::{rustls_error, DeliveryError};
use crate::config::MainServerSettings;
use crate::tls::ClientTls;

/// A request body: always whole, so hyper sends it with a Content-Length in the same write as
/// the head when it fits.
pub type Body = Full<Bytes>;

/// The most of a response body courier reads. Only an error's text is of use, and the first
/// 200 characters of it at that: a main server that answers with megabytes costs 64 KiB.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// How long an unused keep-alive connection may wait in the pool before it is closed rather
/// than reused: servers close theirs after a minute or so (nginx 75 s), and a request sent as
/// the server closes is one that fails.
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// What the server answered: status, headers, and, for answers other than 2xx, the body up to
/// `MAX_RESPONSE_BODY` (a success's body is read and dropped).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

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
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// A connection ready for one request: HTTP/1.1 (one request at a time, back to the pool after
/// the answer) or a handle on the shared HTTP/2 connection.
enum Sender {
    H1(http1::SendRequest<Body>),
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

    /// Sends a request whose URI is a path (origin form) and reads the answer, all within the
    /// request timeout.
    pub async fn send(&self, request: Request<Body>) -> Result<Answer, DeliveryError> {
        let limit = self.target.request_timeout;
        // Polled where they lie rather than moved into a `Timeout`: the exchange's state is
        // 1.5 KB, and each move of it is a copy.
        let exchange = self.exchange(request);
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(exchange, deadline);
        tokio::select! {
            biased;
            answer = &mut exchange => answer,
            () = &mut deadline => Err(Elapsed::error("the request", limit)),
        }
    }

    async fn exchange(&self, mut request: Request<Body>) -> Result<Answer, DeliveryError> {
        loop {
            let (sender, reused) = match self.reuse() {
                Some(sender) => (sender, true),
                // Boxed: connecting (TLS handshake state included) is rare and large, and
                // would otherwise make every delivery task's future, copied when spawned, large.
                None => (Box::pin(self.connect()).await?, false),
            };
            let shared = matches!(sender, Sender::H2(_));
            match sender.send(request, &self.target).await {
                Ok((response, sender)) => return self.finish(response, sender).await,
                // A kept connection the server closed just now: the request was not sent, so
                // it goes again on another connection. Each try uses up that connection (an
                // HTTP/2 one is forgotten), so this ends with a new one at the latest.
                Err((_, Some(unsent))) if reused => {
                    if shared {
                        *lock(&self.shared) = None;
                    }
                    request = unsent;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// A kept connection that is still open: the HTTP/2 one, or the newest idle HTTP/1.1 one.
    fn reuse(&self) -> Option<Sender> {
        if self.target.http2 && !self.h1_only.load(Ordering::Relaxed) {
            let shared = lock(&self.shared);
            if let Some(sender) = shared.as_ref().filter(|s| !s.is_closed()) {
                return Some(Sender::H2(sender.clone()));
            }
        }
        let mut idle = lock(&self.idle);
        while let Some(Idle { sender, since }) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_LIMIT {
                return Some(Sender::H1(sender));
            }
        }
        None
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

    /// Reads the answer's body; an HTTP/1.1 connection whose answer was read to the end goes
    /// back to the pool (one cut off at the cap is dropped, which closes it).
    async fn finish(&self, response: Response<Incoming>, sender: Sender) -> Result<Answer, DeliveryError> {
        let (head, mut body) = response.into_parts();
        let keep = !head.status.is_success();
        let mut kept = Vec::new();
        let mut seen = 0usize;
        let complete = loop {
            match body.frame().await {
                None => break true,
                Some(Err(e)) => {
                    // The answer's head arrived: a body that breaks off does not change it.
                    tracing::debug!(error = %e, "main server's answer broke off");
                    break false;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let room = MAX_RESPONSE_BODY.saturating_sub(seen);
                        seen = seen.saturating_add(data.len());
                        if keep {
                            kept.extend_from_slice(&data[..data.len().min(room)]);
                        }
                        if data.len() >= room {
                            break false;
                        }
                    }
                }
            }
        };
        if let (true, Sender::H1(sender)) = (complete, sender) {
            let mut idle = lock(&self.idle);
            if idle.len() < self.max_idle {
                idle.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        }
        Ok(Answer {
            status: head.status,
            headers: head.headers,
            body: kept,
        })
    }
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
            return http1_over(TokioIo::new(tcp)).await;
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
        http1_over(TokioIo::new(stream)).await
    }
}

async fn http1_over<T>(io: T) -> Result<Sender, DeliveryError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(io).await.map_err(from_hyper)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection to the main server closed");
        }
    });
    Ok(Sender::H1(sender))
}

impl Sender {
    /// Sends one request. On failure, the request comes back when it was never sent.
    async fn send(
        self,
        mut request: Request<Body>,
        target: &Target,
    ) -> Result<(Response<Incoming>, Sender), (DeliveryError, Option<Request<Body>>)> {
        match self {
            Sender::H1(mut sender) => {
                request.headers_mut().insert(HOST, target.host_header.clone());
                // A kept connection takes the next request once its task has finished the last
                // answer; sent before that, hyper hands the request back unsent.
                if let Err(e) = sender.ready().await {
                    return Err((from_hyper(e), Some(request)));
                }
                let response = sender.try_send_request(request).await.map_err(not_sent)?;
                Ok((response, Sender::H1(sender)))
            }
            Sender::H2(mut sender) => {
                // HTTP/2 carries scheme and authority as pseudo-headers, taken from the URI.
                let mut parts = std::mem::take(request.uri_mut()).into_parts();
                parts.scheme = Some(target.scheme.clone());
                parts.authority = Some(target.authority.clone());
                match Uri::from_parts(parts) {
                    Ok(uri) => *request.uri_mut() = uri,
                    Err(e) => return Err((DeliveryError::Other(Arc::new(e)), None)),
                }
                if let Err(e) = sender.ready().await {
                    return Err((from_hyper(e), Some(request)));
                }
                let response = sender.try_send_request(request).await.map_err(not_sent)?;
                Ok((response, Sender::H2(sender)))
            }
        }
    }
}

/// A failed send as its error and, when hyper never sent it, the request to send elsewhere.
fn not_sent(mut error: TrySendError<Request<Body>>) -> (DeliveryError, Option<Request<Body>>) {
    let unsent = error.take_message();
    (from_hyper(error.into_error()), unsent)
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
