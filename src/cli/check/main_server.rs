//! The last check of `courier check`: a real request to the main server over mutual TLS, and
//! on failure a fix named by what went wrong.

use super::tls::tls_fix;
use super::Check;
use crate::config::Settings;
use crate::delivery::{probe, rustls_error, Client, DeliveryError};
use crate::telemetry::one_line;
use crate::tls::ClientTls;

/// A real request over mutual TLS: any HTTP answer proves the handshake (both ways) works.
pub(super) async fn main_server_check(settings: &Settings, tls: &ClientTls) -> Check {
    let url = &settings.main_server.url;
    let client = match Client::new(&settings.main_server, Some(tls), 1) {
        Ok(client) => client,
        Err(e) => return Check::fail("main server", one_line(&e), "see the TLS checks above"),
    };
    // A server that refuses the worker's certificate says so in an alert after the TLS 1.3
    // handshake; the client may see the connection close before it reads that alert. A few
    // tries give the alert its chance to be read and named.
    let mut failed = None;
    for _ in 0..3 {
        match probe(&client, url).await {
            Ok(answer) => {
                return Check::pass(
                    "main server",
                    format!(
                        "mutual TLS with {url} works (HTTP {} for GET /)",
                        answer.status.as_u16()
                    ),
                )
            }
            Err(e) => {
                let named = rustls_error(&e).is_some();
                failed = Some(e);
                if named {
                    break;
                }
            }
        }
    }
    let Some(error) = failed else {
        return Check::fail("main server", "no answer", "check MAIN_SERVER_URL");
    };
    let tls = rustls_error(&error).map(|tls| tls_fix(tls, url.host_str().unwrap_or("")));
    let closed = closed_without_answer(&error);
    let fix = match (tls, &error) {
        (Some(fix), _) => fix,
        (None, DeliveryError::Connect(_)) => "start the main server or correct MAIN_SERVER_URL".to_string(),
        (None, DeliveryError::Timeout(_)) => {
            "the main server did not answer in time: check the host, port and firewall".to_string()
        }
        (None, _) if closed => "the main server closed the connection without answering: it \
                                most likely refused the worker certificate; check that it \
                                trusts the CA that issued WORKER_CERT_PATH, and MAIN_SERVER_URL"
            .to_string(),
        (None, _) => "check MAIN_SERVER_URL".to_string(),
    };
    Check::fail("main server", one_line(&error), fix)
}

/// Whether the connection closed before any answer came: what a TLS 1.3 server that refuses
/// the client certificate looks like when its alert is not read in time.
fn closed_without_answer(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::delivery::find_cause(error, &mut |e| {
        let hyper_closed = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_canceled() || h.is_incomplete_message() || h.is_closed());
        let io_closed = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
            matches!(
                io.kind(),
                BrokenPipe | ConnectionAborted | ConnectionReset | UnexpectedEof
            )
        });
        (hyper_closed || io_closed).then_some(())
    })
    .is_some()
}
