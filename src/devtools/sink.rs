//! A reference main server: mutual TLS with a required client certificate, the two endpoints
//! of the contract, scripted replies (status, Retry-After, delay, cut connection) and a record
//! of every call that callers can wait on. The tests drive courier against it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Which endpoint a call hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Deliver,
    Status,
}

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Call {
    pub endpoint: Endpoint,
    pub message_id: String,
    /// The delivery's `attempt` (1-based), or the status update's `attempt_count`.
    pub attempt: u64,
    pub body: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub content_type: Option<String>,
    /// The W3C trace context headers, when sent.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// The client certificate's subject.
    pub client: String,
    /// The status the sink answered (0: it cut the connection).
    pub answered: u16,
    /// When the request arrived (before any scripted delay).
    pub arrived: std::time::Instant,
    /// HTTP/1.1 or HTTP/2.
    pub version: hyper::Version,
    /// The request path exactly as it arrived (percent-encoding kept).
    pub path: String,
}

/// How the sink answers a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub delay: Duration,
    /// Close the connection without answering.
    pub cut: bool,
    /// Answer with a body of this many bytes instead of the usual JSON (0: the usual).
    pub body_len: usize,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            retry_after: None,
            delay: Duration::ZERO,
            cut: false,
            body_len: 0,
        }
    }

    pub fn cut() -> Reply {
        Reply {
            cut: true,
            ..Reply::status(0)
        }
    }
}

/// Decides each reply from the call (its endpoint, message id, attempt and body).
pub type Behaviour = Arc<dyn Fn(&Call) -> Reply + Send + Sync>;

/// Answers every call 200.
pub fn always_ok() -> Behaviour {
    Arc::new(|_| Reply::status(200))
}

/// Answers every call 200 after `delay`: a main server that takes its time.
pub fn delayed(delay: Duration) -> Behaviour {
    Arc::new(move |_| Reply {
        delay,
        ..Reply::status(200)
    })
}

/// Answers a message's first `n` delivery attempts with `status`, then 200.
pub fn fail_first(n: u64, status: u16) -> Behaviour {
    Arc::new(move |call| match call.endpoint {
        Endpoint::Deliver if call.attempt <= n => Reply::status(status),
        _ => Reply::status(200),
    })
}

/// Everything the sink has seen.
#[derive(Default)]
pub struct Record {
    /// Whether to keep each call; a long benchmark only counts them.
    keep_calls: bool,
    served: AtomicU64,
    calls: Mutex<Vec<Call>>,
    handshake_failures: Mutex<Vec<String>>,
    changes: AtomicU64,
    notify: Option<watch::Sender<u64>>,
}

impl Record {
    fn push(&self, call: Call) {
        self.served.fetch_add(1, Ordering::Relaxed);
        if self.keep_calls {
            crate::sync::lock(&self.calls).push(call);
            self.changed();
        }
    }

    /// Calls answered so far (kept or not).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn changed(&self) {
        let n = self.changes.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(notify) = &self.notify {
            notify.send_replace(n);
        }
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        crate::sync::lock(&self.calls).clone()
    }

    /// Delivery calls so far.
    pub fn deliveries(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.endpoint == Endpoint::Deliver)
            .collect()
    }

    /// Status updates so far.
    pub fn statuses(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.endpoint == Endpoint::Status)
            .collect()
    }

    /// Message ids of deliveries answered 2xx, in order, duplicates included.
    pub fn delivered(&self) -> Vec<String> {
        crate::sync::lock(&self.calls)
            .iter()
            .filter(|c| c.endpoint == Endpoint::Deliver && (200..300).contains(&c.answered))
            .map(|c| c.message_id.clone())
            .collect()
    }

    /// TLS handshakes the sink refused, with the reason.
    pub fn handshake_failures(&self) -> Vec<String> {
        crate::sync::lock(&self.handshake_failures).clone()
    }
}

/// A running sink.
pub struct Sink {
    pub addr: SocketAddr,
    pub record: Arc<Record>,
    changes: watch::Receiver<u64>,
    stop: CancellationToken,
    tls: Arc<Mutex<Served>>,
}

/// The TLS the sink serves new connections with, and the token that closes the connections
/// made under it.
struct Served {
    acceptor: TlsAcceptor,
    connections: CancellationToken,
}

/// The sink's TLS material, PEM.
pub struct SinkTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// Client certificates must chain to this CA.
    pub client_ca_pem: String,
    /// Offer HTTP/2 in the handshake (as well as HTTP/1.1), like most TLS front ends.
    pub http2: bool,
}

/// Why the reference main server could not start.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("client CA: not a usable PEM certificate")]
    ClientCaPem(#[source] rustls_pki_types::pem::Error),
    #[error("client CA: not usable for verifying clients")]
    ClientCa(#[source] rustls::Error),
    #[error("client CA: no verifier can be built from it")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("server certificate or key: not PEM")]
    ServerPem(#[source] rustls_pki_types::pem::Error),
    #[error("server certificate or key: not usable")]
    Server(#[source] rustls::Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl SinkTls {
    /// The rustls server configuration: this certificate, clients verified against the CA.
    pub fn server_config(&self) -> Result<ServerConfig, SinkError> {
        let provider = crate::tls::provider();
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.client_ca_pem.as_bytes()) {
            roots
                .add(ca.map_err(SinkError::ClientCaPem)?)
                .map_err(SinkError::ClientCa)?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(SinkError::Verifier)?;
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(SinkError::ServerPem)?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(SinkError::ServerPem)?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(SinkError::Server)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(SinkError::Server)?;
        config.alpn_protocols = if self.http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        Ok(config)
    }
}

impl Sink {
    /// Starts serving on `addr` (port 0 picks a free one) until stopped or dropped.
    pub async fn start(addr: SocketAddr, tls: &SinkTls, behaviour: Behaviour) -> Result<Sink, SinkError> {
        Self::start_with(addr, tls, behaviour, true).await
    }

    /// Like `start`; with `keep_calls` false the record only counts calls (for long runs).
    pub async fn start_with(
        addr: SocketAddr,
        tls: &SinkTls,
        behaviour: Behaviour,
        keep_calls: bool,
    ) -> Result<Sink, SinkError> {
        let acceptor = TlsAcceptor::from(Arc::new(tls.server_config()?));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SinkError::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| SinkError::Listen { addr, source })?;
        let (notify, changes) = watch::channel(0);
        let record = Arc::new(Record {
            notify: Some(notify),
            keep_calls,
            ..Record::default()
        });
        let stop = CancellationToken::new();
        let served = Arc::new(Mutex::new(Served {
            acceptor,
            connections: stop.child_token(),
        }));
        tokio::spawn(accept(
            listener,
            served.clone(),
            record.clone(),
            behaviour,
            stop.clone(),
        ));
        Ok(Sink {
            addr,
            record,
            changes,
            stop,
            tls: served,
        })
    }

    /// Serves new connections with `tls` from now on and closes every open connection, so
    /// only clients that pass the new checks get through.
    pub fn replace_tls(&self, tls: &SinkTls) -> Result<(), SinkError> {
        let acceptor = TlsAcceptor::from(Arc::new(tls.server_config()?));
        let mut served = crate::sync::lock(&self.tls);
        served.connections.cancel();
        *served = Served {
            acceptor,
            connections: self.stop.child_token(),
        };
        Ok(())
    }

    /// The base URL to give courier as MAIN_SERVER_URL.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// Waits until `done` holds for the record, or `timeout` passes (then returns false).
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&Record) -> bool) -> bool {
        let mut changes = self.changes.clone();
        let wait = async {
            loop {
                if done(&self.record) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok() && done(&self.record)
    }

    /// Stops accepting and closes connections.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(
    listener: TcpListener,
    served: Arc<Mutex<Served>>,
    record: Arc<Record>,
    behaviour: Behaviour,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, closed) = {
            let served = crate::sync::lock(&served);
            (served.acceptor.clone(), served.connections.clone())
        };
        let (record, behaviour) = (record.clone(), behaviour.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(tls) => tls,
                Err(e) => {
                    crate::sync::lock(&record.handshake_failures).push(e.to_string());
                    record.changed();
                    return;
                }
            };
            let client = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| crate::tls::validity(cert).ok())
                .map(|(_, _, subject)| subject)
                .unwrap_or_default();
            let service = service_fn(move |request| {
                let (record, behaviour, client) = (record.clone(), behaviour.clone(), client.clone());
                async move { handle(request, &record, &behaviour, client).await }
            });
            // HTTP/2 when the handshake chose it, else HTTP/1.1.
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            // Closing wins over serving: once its TLS set is replaced a connection serves no more.
            tokio::select! {
                biased;
                _ = closed.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

/// An error that makes hyper drop the connection without answering.
#[derive(Debug)]
struct Cut;

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection cut on purpose")
    }
}

impl std::error::Error for Cut {}

async fn handle(
    request: Request<Incoming>,
    record: &Record,
    behaviour: &Behaviour,
    client: String,
) -> Result<Response<Full<Bytes>>, Cut> {
    let arrived = std::time::Instant::now();
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let idempotency_key = header("idempotency-key");
    let content_type = header("content-type");
    let (traceparent, tracestate) = (header("traceparent"), header("tracestate"));
    let method = request.method().clone();
    let version = request.version();
    let path = request.uri().path().to_string();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Err(Cut),
    };
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);

    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (endpoint, message_id, attempt) = match (&method, segments.as_slice()) {
        (&Method::POST, ["internal", "messages", "deliver"]) => (
            Endpoint::Deliver,
            json["message_id"].as_str().unwrap_or_default().to_string(),
            json["attempt"].as_u64().unwrap_or(0),
        ),
        (&Method::PUT, ["internal", "messages", id, "status"]) => (
            Endpoint::Status,
            percent_encoding::percent_decode_str(id)
                .decode_utf8_lossy()
                .into_owned(),
            json["attempt_count"].as_u64().unwrap_or(0),
        ),
        _ => return Ok(respond(StatusCode::NOT_FOUND, None, r#"{"detail":"not found"}"#)),
    };
    if endpoint == Endpoint::Deliver && (message_id.is_empty() || json["worker_id"].as_str().is_none()) {
        return Ok(respond(
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
            r#"{"detail":"message_id and worker_id are required"}"#,
        ));
    }
    let mut call = Call {
        endpoint,
        message_id,
        attempt,
        body: json,
        idempotency_key,
        content_type,
        traceparent,
        tracestate,
        client,
        answered: 0,
        arrived,
        version,
        path: path.clone(),
    };
    let reply = behaviour(&call);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    call.answered = if reply.cut { 0 } else { reply.status };
    record.push(call);
    if reply.cut {
        return Err(Cut);
    }
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if reply.body_len > 0 {
        let mut response = respond(status, reply.retry_after, "");
        *response.body_mut() = Full::new(Bytes::from(vec![b'x'; reply.body_len]));
        return Ok(response);
    }
    let body = match (endpoint, status.is_success()) {
        (Endpoint::Deliver, true) => format!(
            r#"{{"status":"success","delivered_at":"{}"}}"#,
            chrono::Utc::now().to_rfc3339()
        ),
        (Endpoint::Status, true) => r#"{"status":"updated"}"#.to_string(),
        (_, false) => format!(r#"{{"detail":"injected {}"}}"#, status.as_u16()),
    };
    Ok(respond(status, reply.retry_after, &body))
}

fn respond(status: StatusCode, retry_after: Option<u64>, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, seconds.into());
    }
    response
}
