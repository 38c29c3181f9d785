//! TLS material: the worker's client certificate and key and the CA it trusts, read from PEM
//! files, checked (readable, key matches certificate, certificate in its validity period) and
//! turned into a rustls client configuration that trusts only that CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsSettings;

/// Why the TLS material was refused; each names the setting and the file, and keeps the
/// underlying error, if any, as its `source()`.
#[derive(Debug, thiserror::Error)]
#[error("{setting} = {path}: {problem}")]
pub struct TlsError {
    setting: &'static str,
    path: String,
    problem: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl TlsError {
    fn new(setting: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
        TlsError {
            setting,
            path: path.display().to_string(),
            problem: problem.into(),
            source: None,
        }
    }

    /// A file that could not be read at all.
    pub fn unreadable(setting: &'static str, path: &Path, source: std::io::Error) -> TlsError {
        TlsError::caused(setting, path, "cannot be read", source)
    }

    fn caused(
        setting: &'static str,
        path: &Path,
        problem: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> TlsError {
        TlsError {
            source: Some(Box::new(source)),
            ..TlsError::new(setting, path, problem)
        }
    }
}

/// A certificate that x509-parser cannot read.
#[derive(Debug, thiserror::Error)]
#[error("not an X.509 certificate")]
pub struct NotX509(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>);

const CERT: &str = "tls.cert_file (WORKER_CERT_PATH)";
const KEY: &str = "tls.key_file (WORKER_KEY_PATH)";
const CA: &str = "tls.ca_file (CA_CERT_PATH)";

/// A checked set of client TLS files and the configuration built from them.
#[derive(Clone)]
pub struct ClientTls {
    pub config: ClientConfig,
    /// When the client certificate expires.
    pub not_after: SystemTime,
    /// The client certificate's subject, for logs.
    pub subject: String,
    pub files: [PathBuf; 3],
    /// The files' contents when this set was loaded, to notice when they change.
    pub snapshot: Vec<Vec<u8>>,
}

/// The crypto provider courier uses everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default provider, for clients built without our own TLS
/// configuration (plain-HTTP test servers, the admin scrapes of `courier bench`). Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads every certificate in a PEM file.
pub fn read_certs(setting: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::caused(setting, path, "not a PEM certificate file", e))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            setting,
            path,
            "holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(setting: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(setting, path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| TlsError::caused(setting, path, "holds no usable PEM private key", e))
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => {
                "file not found; make one with `courier certs` or \
                 point the setting at it"
            }
            std::io::ErrorKind::PermissionDenied => "permission denied; let the worker's user read it",
            _ => "cannot be read",
        };
        TlsError::caused(setting, path, hint, e)
    })
}

/// The validity period of a DER certificate, as (not_before, not_after, subject).
pub fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime, String), NotX509> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(NotX509)?;
    let at = |t: x509_parser::time::ASN1Time| {
        // A certificate may claim any year; one this machine cannot represent counts as the
        // epoch (before) or the far future (after), never a panic.
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .unwrap_or(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)))
    };
    let validity = cert.validity();
    Ok((
        at(validity.not_before),
        at(validity.not_after),
        cert.subject().to_string(),
    ))
}

impl ClientTls {
    /// Loads and checks the files named in `settings`.
    pub fn load(settings: &TlsSettings) -> Result<ClientTls, TlsError> {
        let TlsSettings {
            cert_file,
            key_file,
            ca_file,
            ..
        } = settings;
        let provider = provider();
        // Taken first: a change while loading shows up as a difference at the next check.
        let snapshot = snapshot(settings);

        let mut roots = RootCertStore::empty();
        for ca in read_certs(CA, ca_file)? {
            roots.add(ca).map_err(|e| {
                TlsError::new(
                    CA,
                    ca_file,
                    format!("holds a certificate that cannot be used as a CA ({e})"),
                )
            })?;
        }

        let chain = read_certs(CERT, cert_file)?;
        let (not_before, not_after, subject) =
            validity(&chain[0]).map_err(|e| TlsError::caused(CERT, cert_file, "cannot be read", e))?;
        let now = SystemTime::now();
        if now > not_after {
            return Err(TlsError::new(
                CERT,
                cert_file,
                format!("certificate expired on {}; issue a new one", rfc3339(not_after)),
            ));
        }
        if now < not_before {
            return Err(TlsError::new(
                CERT,
                cert_file,
                format!(
                    "certificate is not valid before {}; check the clock",
                    rfc3339(not_before)
                ),
            ));
        }

        let key = read_key(KEY, key_file)?;
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::caused(KEY, key_file, "unsupported private key", e))?;
        CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|_| {
                TlsError::new(
                    KEY,
                    key_file,
                    format!("private key does not match the certificate in {}", cert_file.display()),
                )
            })?;

        // ALPN is the HTTP client's business: `delivery::Client::new` sets it.
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::caused(CA, ca_file, "not a usable CA certificate", e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::caused(CERT, cert_file, "cannot be used as a client certificate", e))?;

        Ok(ClientTls {
            config,
            not_after,
            subject,
            files: [cert_file.clone(), key_file.clone(), ca_file.clone()],
            snapshot,
        })
    }
}

/// The current contents of the three files (empty where unreadable), to notice a change.
pub fn snapshot(settings: &TlsSettings) -> Vec<Vec<u8>> {
    [&settings.cert_file, &settings.key_file, &settings.ca_file]
        .iter()
        .map(|path| std::fs::read(path).unwrap_or_default())
        .collect()
}

/// A time as RFC 3339 UTC, for messages.
pub fn rfc3339(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
