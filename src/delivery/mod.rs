//! HTTP to the main server: the delivery POST and the status PUT over one keep-alive client
//! (`client`, with HTTP/1.1 exchanges of its own in `h1`), and what each answer amounts to:
//! delivered, or a `DeliveryError` that `policy` turns into retry or reject.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, StatusCode};
use url::Url;

mod client;
pub(crate) mod h1;

pub use client::{path_of, Client, Resend, ResendHook};
pub use h1::{Answer, Outgoing};

use crate::config::MainServerSettings;
use crate::message::Envelope;
use crate::tls::ClientTls;
use crate::trace::{TraceContext, TraceHeaders};

/// The underlying error of a failed request, kept as the `source()`; shared, so that the
/// error stays cheap to clone.
pub type Cause = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why an attempt did not deliver. Render it with `telemetry::one_line` to include the cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    #[error("cannot connect to the main server")]
    Connect(#[source] Cause),
    #[error("TLS with the main server failed")]
    Tls(#[source] Cause),
    #[error("main server did not answer in time")]
    Timeout(#[source] Cause),
    #[error("main server answered HTTP {status}: {body}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: String,
    },
    #[error("request to the main server failed")]
    Other(#[source] Cause),
}

impl DeliveryError {
    /// A bounded label for the failure metric.
    pub fn label(&self) -> &'static str {
        match self {
            DeliveryError::Connect(_) => "connect",
            DeliveryError::Tls(_) => "tls",
            DeliveryError::Timeout(_) => "timeout",
            DeliveryError::Other(_) => "other",
            DeliveryError::Status { status, .. } => match *status {
                429 => "http_429",
                500..=599 => "http_5xx",
                400..=499 => "http_4xx",
                _ => "http_other",
            },
        }
    }

    /// The HTTP status class, when the server answered at all.
    pub fn status_class(&self) -> Option<&'static str> {
        match self {
            DeliveryError::Status { status, .. } => Some(status_class(*status)),
            _ => None,
        }
    }
}

/// `2xx`, `4xx`, ...: the bounded label for responses.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The rustls error anywhere in an error's chain, so callers can tell TLS failures apart by
/// variant rather than by message text.
pub fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    find_cause(error, &mut |e| e.downcast_ref::<rustls::Error>())
}

/// The first error in the chain, `error` included, for which `pick` answers. Looks inside the
/// two wrappers whose `source()` skips what they wrap: a shared `Cause` and an `io::Error`.
pub fn find_cause<'a, T: 'a>(
    error: &'a (dyn std::error::Error + 'static),
    pick: &mut dyn FnMut(&'a (dyn std::error::Error + 'static)) -> Option<T>,
) -> Option<T> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = pick(e) {
            return Some(found);
        }
        let wrapped: Option<&'a (dyn std::error::Error + 'static)> = match e.downcast_ref::<Cause>() {
            Some(shared) => Some(&**shared),
            None => e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
        };
        if let Some(found) = wrapped.and_then(|inner| find_cause(inner, pick)) {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// One attempt's result and timing.
#[derive(Debug)]
pub struct Attempt {
    pub result: Result<(), DeliveryError>,
    pub elapsed: Duration,
}

/// The status a message is reported in after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Will be tried again.
    Queued,
    /// Given up: dead-lettered.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Failed => "failed",
        }
    }
}

/// The client side of the main-server API.
pub struct Deliverer {
    client: RwLock<Arc<Client>>,
    base: Url,
    /// `/internal/messages/deliver` under the base path, and the headers every delivery and
    /// status update carries, made once and shared: a delivery adds only its Idempotency-Key
    /// and body.
    deliver_path: PathAndQuery,
    deliver_headers: HeaderMap,
    worker_id_json: String,
    settings: MainServerSettings,
    pool_size: usize,
    resent: Option<ResendHook>,
    /// Send `traceparent` and `tracestate` (MAIN_SERVER_TRACE_CONTEXT).
    trace_context: bool,
}

impl Deliverer {
    /// A deliverer with a connection pool sized for `pool_size` concurrent requests. `tls` is
    /// `None` only when TLS is disabled (plain-HTTP test servers).
    pub fn new(
        settings: &MainServerSettings,
        tls: Option<&ClientTls>,
        worker_id: &str,
        pool_size: usize,
    ) -> Result<Deliverer, DeliveryError> {
        let base = settings.url.clone();
        let deliver_url = endpoint(&base, &["internal", "messages", "deliver"]);
        let deliver_path =
            PathAndQuery::try_from(path_of(&deliver_url)).map_err(|e| DeliveryError::Other(Arc::new(e)))?;
        Ok(Deliverer {
            client: RwLock::new(Arc::new(Client::new(settings, tls, pool_size)?)),
            base,
            deliver_path,
            deliver_headers: json_headers(),
            worker_id_json: serde_json::to_string(worker_id).unwrap_or_else(|_| "\"\"".into()),
            settings: settings.clone(),
            pool_size,
            resent: None,
            trace_context: settings.trace_context,
        })
    }

    /// The same deliverer, telling `hook` of every request its clients send again
    /// (`Resend`), the clients that later TLS files make included.
    #[must_use]
    pub fn with_resend_hook(mut self, hook: ResendHook) -> Deliverer {
        let client = self.client.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Nothing else holds the client of a deliverer being built.
        if let Some(client) = Arc::get_mut(client) {
            client.set_resend_hook(Some(hook.clone()));
        }
        self.resent = Some(hook);
        self
    }

    /// Starts using new TLS material for new connections; requests under way finish on theirs.
    pub fn replace_tls(&self, tls: &ClientTls) -> Result<(), DeliveryError> {
        let client =
            Arc::new(Client::new(&self.settings, Some(tls), self.pool_size)?.with_resend_hook(self.resent.clone()));
        *crate::sync::write(&self.client) = client;
        Ok(())
    }

    /// Closes the kept connections the main server has closed or that waited too long
    /// (`Client::close_idle`); the heartbeat calls it.
    pub fn close_idle(&self) {
        self.client().close_idle();
    }

    fn client(&self) -> Arc<Client> {
        crate::sync::read(&self.client).clone()
    }

    /// The trace context a request carries (a new parent id each time), unless
    /// MAIN_SERVER_TRACE_CONTEXT is off.
    fn trace_headers<'t>(&self, trace: &'t TraceContext) -> Option<TraceHeaders<'t>> {
        self.trace_context.then(|| trace.headers())
    }

    /// POSTs one message to `/internal/messages/deliver`.
    pub async fn deliver(&self, envelope: &Envelope) -> Attempt {
        let started = Instant::now();
        let key = [(&IDEMPOTENCY_KEY, idempotency_key(envelope.message_id()))];
        let request = Outgoing {
            method: Method::POST,
            path: &self.deliver_path,
            headers: &self.deliver_headers,
            extra: &key,
            trace: self.trace_headers(envelope.trace()),
            body: Bytes::from(envelope.delivery_body(&self.worker_id_json)),
        };
        let result = self.client().send(&request).await.and_then(outcome);
        Attempt {
            result,
            elapsed: started.elapsed(),
        }
    }

    /// PUTs a message's status to `/internal/messages/{id}/status`, in the message's trace.
    pub async fn update_status(
        &self,
        message_id: &str,
        status: Status,
        attempt_count: u32,
        error: &str,
        trace: &TraceContext,
    ) -> Result<(), DeliveryError> {
        let url = status_url(&self.base, message_id);
        let path = PathAndQuery::try_from(path_of(&url)).map_err(|e| DeliveryError::Other(Arc::new(e)))?;
        let body = serde_json::json!({
            "status": status.as_str(),
            "attempt_count": attempt_count,
            "error_message": error,
        });
        let request = Outgoing {
            method: Method::PUT,
            path: &path,
            headers: &self.deliver_headers,
            extra: &[],
            trace: self.trace_headers(trace),
            body: Bytes::from(body.to_string()),
        };
        self.client().send(&request).await.and_then(outcome)
    }
}

/// The headers of every request with a JSON body.
fn json_headers() -> HeaderMap {
    let mut headers = user_agent();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers
}

fn user_agent() -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(4);
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("courier/", env!("CARGO_PKG_VERSION"))),
    );
    headers
}

/// A GET of the base URL, for `courier check`: any answer proves the connection and the TLS
/// handshake both ways.
pub async fn probe(client: &Client, url: &Url) -> Result<Answer, DeliveryError> {
    let path = PathAndQuery::try_from(path_of(url)).map_err(|e| DeliveryError::Other(Arc::new(e)))?;
    let headers = user_agent();
    let request = Outgoing {
        method: Method::GET,
        path: &path,
        headers: &headers,
        extra: &[],
        trace: None,
        body: Bytes::new(),
    };
    client.send(&request).await
}

/// What an answer means for the request: 2xx delivered; anything else an error carrying the
/// status, Retry-After and one clean line of the body (a redirect names where it pointed).
fn outcome(answer: Answer) -> Result<(), DeliveryError> {
    let Answer {
        status,
        headers,
        body,
        complete,
    } = answer;
    if status.is_success() {
        return Ok(());
    }
    let retry_after = headers.get(RETRY_AFTER).and_then(parse_retry_after);
    let mut text = error_text(&body);
    if let (true, Some(location)) = (status.is_redirection(), headers.get(LOCATION)) {
        text = format!("redirect to {}; check MAIN_SERVER_URL", error_text(location.as_bytes()));
    }
    if text.is_empty() {
        text = status.canonical_reason().unwrap_or("no reason given").to_string();
    }
    if status == StatusCode::MISDIRECTED_REQUEST {
        // Asked twice, on two connections (`Client` sends a 421 once more): not the moment.
        text = format!(
            "misdirected request, again on a new connection: the server does not serve \
             MAIN_SERVER_URL's host name on its TLS connections, a misconfiguration; use a host \
             name its certificate and virtual host answer to (servers that choose their \
             client-certificate policy by SNI need a host name, not an IP address); it said: {text}"
        );
    }
    if !complete {
        // What arrived of it, said as it is (RFC 9112 9.8: a cut body is not the whole).
        text.push_str(" (answer incomplete)");
    }
    Err(DeliveryError::Status {
        status: status.as_u16(),
        retry_after,
        body: text,
    })
}

/// An error body as one short line: the first 200 characters, control characters replaced,
/// so a hostile answer can neither break a log line nor reach a terminal as escape codes.
pub fn error_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text: String = text
        .trim()
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    text.trim().to_string()
}

/// The header carrying the message id, so the main server can drop a repeated delivery.
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The message id as a header value; `Envelope::parse` refused control characters already.
pub fn idempotency_key(id: &str) -> HeaderValue {
    HeaderValue::from_bytes(id.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// `{base}/internal/messages/{message_id}/status`, the id percent-encoded as one segment.
pub fn status_url(base: &Url, message_id: &str) -> Url {
    endpoint(base, &["internal", "messages", message_id, "status"])
}

/// `base` with path segments appended, each percent-encoded.
fn endpoint(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// `Retry-After` as seconds or an HTTP date (one in the past is zero). What it means for the
/// message, and how long courier honours it, `policy` decides.
pub fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    let after = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(text).ok()?;
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .unwrap_or_default()
        }
    };
    Some(after)
}

/// Shared by the worker's tasks.
pub type SharedDeliverer = Arc<Deliverer>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("120")),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("99999")),
            Some(Duration::from_secs(99_999))
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn a_plain_http_client_builds_without_tls_material() {
        let settings = MainServerSettings {
            url: Url::parse("http://main:8000").unwrap(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            http2: true,
            trace_context: true,
        };
        assert!(Client::new(&settings, None, 4).is_ok());
        assert!(Deliverer::new(&settings, None, "w", 4).is_ok());
    }

    #[test]
    fn error_texts_are_one_short_clean_line() {
        assert_eq!(error_text(b"  {\"detail\":\"bad\"}\n"), "{\"detail\":\"bad\"}");
        assert_eq!(error_text(b"a\x1b[31mred\r\nb"), "a [31mred  b");
        assert_eq!(error_text("é".repeat(500).as_bytes()).chars().count(), 200);
        assert_eq!(error_text(b"\xff\xfe"), "\u{fffd}\u{fffd}");
    }

    #[test]
    fn endpoints_keep_a_base_path_and_encode_ids() {
        let base = Url::parse("https://main:8000/api/").unwrap();
        assert_eq!(
            endpoint(&base, &["internal", "messages", "a/b c", "status"]).as_str(),
            "https://main:8000/api/internal/messages/a%2Fb%20c/status"
        );
        let base = Url::parse("https://main:8000").unwrap();
        assert_eq!(
            endpoint(&base, &["internal", "messages", "deliver"]).as_str(),
            "https://main:8000/internal/messages/deliver"
        );
        for (id, segment) in [
            ("...", "..."),
            ("%2e%2e", "%252e%252e"),
            ("a?b#c", "a%3Fb%23c"),
            ("a\\b", "a%5Cb"),
        ] {
            let url = endpoint(&base, &["internal", "messages", id, "status"]);
            assert_eq!(url.path(), format!("/internal/messages/{segment}/status"), "{id}");
        }
    }
}
