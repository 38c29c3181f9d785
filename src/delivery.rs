//! HTTP to the main server: the delivery POST and the status PUT over one pooled keep-alive
//! client, and the classification of every result into delivered, retry or reject.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, Url};

use crate::config::MainServerSettings;
use crate::message::Envelope;
use crate::tls::ClientTls;

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

    /// Classifies a failed request: TLS, timeout, connect, or other.
    pub fn classify(error: reqwest::Error) -> DeliveryError {
        let kind = if is_tls(&error) {
            DeliveryError::Tls
        } else if error.is_timeout() {
            DeliveryError::Timeout
        } else if error.is_connect() {
            DeliveryError::Connect
        } else {
            DeliveryError::Other
        };
        kind(std::sync::Arc::new(error))
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

/// True when a rustls error sits anywhere in the chain.
fn is_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    rustls_error(error).is_some()
}

/// The rustls error anywhere in an error's chain (io errors hide theirs behind `get_ref`), so
/// callers can tell TLS failures apart by variant rather than by message text.
pub fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(tls) = rustls_error(inner) {
                return Some(tls);
            }
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
    client: RwLock<Client>,
    base: Url,
    deliver_url: Url,
    worker_id_json: String,
    settings: MainServerSettings,
    pool_size: usize,
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
        Ok(Deliverer {
            client: RwLock::new(build_client(settings, tls, pool_size)?),
            base,
            deliver_url,
            worker_id_json: serde_json::to_string(worker_id).unwrap_or_else(|_| "\"\"".into()),
            settings: settings.clone(),
            pool_size,
        })
    }

    /// Starts using new TLS material for new connections; requests under way finish on theirs.
    pub fn replace_tls(&self, tls: &ClientTls) -> Result<(), DeliveryError> {
        let client = build_client(&self.settings, Some(tls), self.pool_size)?;
        *self.client.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = client;
        Ok(())
    }

    fn client(&self) -> Client {
        self.client
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// POSTs one message to `/internal/messages/deliver`.
    pub async fn deliver(&self, envelope: &Envelope) -> Attempt {
        let started = Instant::now();
        let request = self
            .client()
            .post(self.deliver_url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("Idempotency-Key", idempotency_key(envelope.message_id()))
            .body(envelope.delivery_body(&self.worker_id_json));
        let result = send(request).await;
        Attempt {
            result,
            elapsed: started.elapsed(),
        }
    }

    /// PUTs a message's status to `/internal/messages/{id}/status`.
    pub async fn update_status(
        &self,
        message_id: &str,
        status: Status,
        attempt_count: u32,
        error: &str,
    ) -> Result<(), DeliveryError> {
        let url = status_url(&self.base, message_id);
        let body = serde_json::json!({
            "status": status.as_str(),
            "attempt_count": attempt_count,
            "error_message": error,
        });
        let request = self
            .client()
            .put(url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body.to_string());
        send(request).await
    }
}

/// Sends a request and reads the answer up to `MAX_RESPONSE_BODY` (a whole small answer lets
/// the connection go back to the pool; a larger one is cut off by closing the connection).
async fn send(request: reqwest::RequestBuilder) -> Result<(), DeliveryError> {
    let mut response = request.send().await.map_err(DeliveryError::classify)?;
    let status = response.status();
    if status.is_success() {
        // The server has recorded the message; a broken or oversized body changes nothing.
        let _ = read_capped(&mut response).await;
        return Ok(());
    }
    let retry_after = response.headers().get(RETRY_AFTER).and_then(parse_retry_after);
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = read_capped(&mut response).await;
    let mut text = error_text(&body);
    if let (true, Some(location)) = (status.is_redirection(), location) {
        text = format!("redirect to {location}; check MAIN_SERVER_URL");
    }
    if text.is_empty() {
        text = status.canonical_reason().unwrap_or("no reason given").to_string();
    }
    Err(DeliveryError::Status {
        status: status.as_u16(),
        retry_after,
        body: text,
    })
}

/// The most of a response body courier reads. Only an error's text is of use, and the first
/// 200 characters of it at that: a main server that answers with megabytes costs 64 KiB.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Reads at most `MAX_RESPONSE_BODY` bytes of the body. Dropping the response with the rest
/// unread closes that connection, so nothing more is received.
async fn read_capped(response: &mut reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_RESPONSE_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() >= room {
            break;
        }
    }
    body
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

/// The pooled client: trusts only the configured CA, presents the worker's certificate, keeps
/// connections alive, never follows redirects and never uses a proxy. With `http2` it offers
/// HTTP/2 in the handshake: a server that takes it gets every request on one connection, many
/// per write, which halves the system calls per message; any other server gets HTTP/1.1.
pub fn build_client(
    settings: &MainServerSettings,
    tls: Option<&ClientTls>,
    pool_size: usize,
) -> Result<Client, DeliveryError> {
    crate::tls::install_default_provider();
    let mut builder = Client::builder()
        .user_agent(concat!("courier/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        .pool_max_idle_per_host(pool_size.max(1))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if let Some(tls) = tls {
        let mut config = tls.config.clone();
        config.alpn_protocols = if settings.http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        builder = builder.tls_backend_preconfigured(config).https_only(true);
    }
    if !settings.http2 {
        builder = builder.http1_only();
    }
    builder
        .build()
        .map_err(|e| DeliveryError::Other(std::sync::Arc::new(e)))
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
        };
        assert!(build_client(&settings, None, 4).is_ok());
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
