//! TLS to Redis: the CA and client certificate read and checked once (a bad file is one line
//! naming its setting), and a client for one server or sentinel, over TLS when asked for.

use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};

use crate::config::RedisSettings;
use crate::queue::QueueError;

const REDIS_CA: &str = "redis.ca_file (REDIS_CA_CERT_PATH)";
const REDIS_CERT: &str = "redis.cert_file (REDIS_CERT_PATH)";
const REDIS_KEY: &str = "redis.key_file (REDIS_KEY_PATH)";

/// The CA and client certificate for TLS to Redis, read and checked; `None` without TLS.
pub(super) fn tls_files(settings: &RedisSettings) -> Result<Option<redis::TlsCertificates>, QueueError> {
    let Some(tls) = &settings.tls else {
        return Ok(None);
    };
    crate::tls::install_default_provider();
    let read = |setting: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| crate::tls::TlsError::unreadable(setting, path, e))
    };
    let root_cert = match &tls.ca_file {
        Some(path) => {
            crate::tls::read_certs(REDIS_CA, path)?;
            Some(read(REDIS_CA, path)?)
        }
        None => None,
    };
    let client_tls = match &tls.client {
        Some((cert, key)) => {
            crate::tls::read_certs(REDIS_CERT, cert)?;
            crate::tls::read_key(REDIS_KEY, key)?;
            Some(redis::ClientTlsConfig {
                client_cert: read(REDIS_CERT, cert)?,
                client_key: read(REDIS_KEY, key)?,
            })
        }
        None => None,
    };
    Ok(Some(redis::TlsCertificates { client_tls, root_cert }))
}

/// A client for one server (a Redis or a sentinel) with the given credentials, over TLS when
/// the settings ask for it.
pub(super) fn client_for(
    settings: &RedisSettings,
    host: &str,
    port: u16,
    (username, password): (&str, &str),
    db: i64,
    tls: Option<&redis::TlsCertificates>,
) -> Result<Client, QueueError> {
    let mut redis = RedisConnectionInfo::default().set_db(db);
    if !username.is_empty() {
        redis = redis.set_username(username);
    }
    if !password.is_empty() {
        redis = redis.set_password(password);
    }
    let (Some(_), Some(certificates)) = (&settings.tls, tls) else {
        let info = ConnectionAddr::Tcp(host.to_string(), port)
            .into_connection_info()?
            .set_redis_settings(redis);
        return Ok(Client::open(info)?);
    };
    let info = ConnectionAddr::TcpTls {
        host: host.to_string(),
        port,
        insecure: false,
        tls_params: None,
    }
    .into_connection_info()?
    .set_redis_settings(redis);
    Ok(Client::build_with_tls(info, certificates.clone())?)
}
