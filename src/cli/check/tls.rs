//! The TLS checks of `courier check`: the worker's certificate, CA and key are readable, the
//! key matches and may be read by no one else, the certificate chains to the CA and is not
//! about to expire; and what to do when the handshake with the main server fails.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::UnixTime;

use super::{Check, Verdict};
use crate::config::Settings;
use crate::telemetry::one_line;
use crate::tls::{self, ClientTls};

/// File, key, chain, expiry and permission checks; the loaded set when they pass.
pub(super) fn tls_checks(settings: &Settings, checks: &mut Vec<Check>) -> Option<ClientTls> {
    let t = &settings.tls;
    let mut files_ok = true;
    let certs = tls::read_certs("tls.cert_file (WORKER_CERT_PATH)", &t.cert_file);
    let cas = tls::read_certs("tls.ca_file (CA_CERT_PATH)", &t.ca_file);
    let key = tls::read_key("tls.key_file (WORKER_KEY_PATH)", &t.key_file);
    for (name, result, fix) in [
        (
            "certificate",
            certs
                .as_ref()
                .map(|c| format!("{} ({} in chain)", t.cert_file.display(), c.len()))
                .map_err(|e| one_line(e)),
            "point WORKER_CERT_PATH at the worker's PEM certificate",
        ),
        (
            "CA",
            cas.as_ref()
                .map(|c| format!("{} ({} certificates)", t.ca_file.display(), c.len()))
                .map_err(|e| one_line(e)),
            "point CA_CERT_PATH at the PEM CA that signed the main server's certificate",
        ),
        (
            "key",
            key.as_ref()
                .map(|_| t.key_file.display().to_string())
                .map_err(|e| one_line(e)),
            "point WORKER_KEY_PATH at the worker's PEM private key",
        ),
    ] {
        match result {
            Ok(detail) => checks.push(Check::pass(name, format!("readable: {detail}"))),
            Err(e) => {
                files_ok = false;
                checks.push(Check::fail(name, e, fix));
            }
        }
    }
    checks.push(key_permissions(&t.key_file));
    if !files_ok {
        return None;
    }

    let loaded = match ClientTls::load(t) {
        Ok(loaded) => {
            checks.push(Check::pass("key match", "the private key matches the certificate"));
            loaded
        }
        Err(e) => {
            checks.push(Check::fail(
                "key match",
                one_line(&e),
                "install the key that belongs to this certificate, or issue a new pair",
            ));
            return None;
        }
    };

    if let (Ok(certs), Ok(cas)) = (&certs, &cas) {
        checks.push(chain_check(certs, cas));
    }

    let left = loaded.not_after.duration_since(SystemTime::now()).unwrap_or_default();
    let days = left.as_secs() / 86_400;
    let expires = format!(
        "expires {} ({days} days left); {}",
        tls::rfc3339(loaded.not_after),
        loaded.subject
    );
    checks.push(if left < Duration::from_secs(14 * 86_400) {
        Check {
            name: "expiry",
            verdict: Verdict::Warn,
            detail: expires,
            fix: Some("issue a new certificate, replace the files and send SIGHUP".into()),
        }
    } else {
        Check::pass("expiry", expires)
    });
    Some(loaded)
}

/// Whether the worker's certificate chains to the configured CA. A main server with a
/// separate client CA would fail this and still accept the worker: the fix says so.
fn chain_check(
    certs: &[rustls_pki_types::CertificateDer<'static>],
    cas: &[rustls_pki_types::CertificateDer<'static>],
) -> Check {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        let _ = roots.add(ca.clone());
    }
    let verified = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider())
        .build()
        .map_err(|e| e.to_string())
        .and_then(|verifier| {
            verifier
                .verify_client_cert(&certs[0], &certs[1..], UnixTime::now())
                .map_err(|e| e.to_string())
        });
    match verified {
        Ok(_) => Check::pass("chain", "the certificate verifies against CA_CERT_PATH"),
        Err(e) => Check::fail(
            "chain",
            format!("the certificate does not verify against CA_CERT_PATH ({e})"),
            "issue the worker certificate from the main server's CA (or, if the main server \
             trusts a separate client CA, check with that one)",
        ),
    }
}

/// The key may be read by its owner, and by its group (the README installs it 0640
/// root:courier, so the service reads it through its group and cannot change it); never by
/// anyone else, and never changed by anyone but its owner.
#[cfg(unix)]
fn key_permissions(path: &Path) -> Check {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o037 != 0 {
                Check::fail(
                    "key access",
                    format!("mode {mode:o}: other users can read or change the private key"),
                    format!(
                        "chmod 600 {path} (or chmod 640 {path} with the service's own group)",
                        path = path.display()
                    ),
                )
            } else if mode & 0o040 != 0 {
                Check::pass(
                    "key access",
                    format!(
                        "mode {mode:o}: its owner and group {} can read it; keep that group to \
                         the service",
                        meta.gid()
                    ),
                )
            } else {
                Check::pass("key access", format!("mode {mode:o}: only its owner can read it"))
            }
        }
        Err(e) => Check::fail(
            "key access",
            format!("cannot stat {} ({e})", path.display()),
            "see the key check",
        ),
    }
}

#[cfg(not(unix))]
fn key_permissions(path: &Path) -> Check {
    // Windows ACLs are not mode bits; NSSM services run as a dedicated account whose ACLs the
    // install script sets.
    Check::pass(
        "key access",
        format!("{}: not checked on this platform (use NTFS ACLs)", path.display()),
    )
}

/// What to do about a failed handshake with the main server, by what rustls says went wrong.
pub(super) fn tls_fix(error: &rustls::Error, host: &str) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    match error {
        Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
            "the main server's certificate is not signed by CA_CERT_PATH: point CA_CERT_PATH at \
             its CA"
                .to_string()
        }
        Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => format!(
            "the main server's certificate does not name {host}: use the name it was issued for \
             in MAIN_SERVER_URL, or reissue it with {host} as a subject alternative name"
        ),
        Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "the main server's certificate has expired: renew it on the main server (or check \
             this machine's clock)"
                .to_string()
        }
        Error::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            "the main server's certificate is not valid yet: check the clocks of both machines".to_string()
        }
        Error::InvalidCertificate(other) => {
            format!(
                "the main server's certificate was refused ({other:?}): reissue it from the CA in \
                 CA_CERT_PATH"
            )
        }
        Error::AlertReceived(
            Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateRequired
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::UnsupportedCertificate
            | Alert::AccessDenied
            | Alert::DecryptError,
        ) => "the main server refused the worker certificate: check that it trusts the CA that \
              issued WORKER_CERT_PATH and that the certificate is current"
            .to_string(),
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
            "the main server does not speak TLS on that port: check MAIN_SERVER_URL's port, or \
             whether it serves plain HTTP"
                .to_string()
        }
        Error::NoApplicationProtocol | Error::PeerIncompatible(_) => {
            "the main server and courier share no TLS version, cipher or protocol: it needs TLS \
             1.2 or 1.3 and HTTP/1.1 or HTTP/2"
                .to_string()
        }
        other => format!(
            "the TLS handshake with the main server failed ({other}): check both sides' \
             certificates"
        ),
    }
}
