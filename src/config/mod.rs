//! Settings: the Python worker's defaults, an optional `config.yaml` with `${VAR}` /
//! `${VAR:-default}` expanded, and that worker's environment variables on top. Everything is
//! parsed and checked once, here; past `Settings::load` nothing re-checks.
//!
//! This file holds `Settings`, the load (defaults, then the file, then the environment) and
//! the small sections (`tls`, `main_server`, `metrics`, `logging`). The rest, a file each:
//! `keys` (every known setting, its variable and default), `env` (where variables come from),
//! `expand` (`${VAR}` in the file), `read` (the typed readers and `ConfigError`), and the
//! sections with the plain types the configured modules read: `redis`, `worker`, `outcomes`.
//! `config` imports no other module of the crate (docs/design.md, "The map of the code").

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, File, FileFormat};
use url::Url;

mod env;
mod expand;
mod keys;
mod outcomes;
mod read;
mod redis;
#[cfg(test)]
mod testing;
mod worker;

pub use env::{Env, InstanceEnv, ProcessEnv};
use expand::expand_values;
pub use expand::{expand, ExpandError};
use keys::KNOWN;
pub use keys::{default_batch_size, known_settings};
pub use outcomes::{OutcomeRules, StatusOutcome};
use read::{parse_level, Source};
pub use read::{ConfigError, Secret};
pub use redis::{cluster_safe_name, hash_tag, QueueOrder, RedisSettings, RedisTls, Topology};
pub use worker::{Backoff, BreakerSettings, WorkerSettings};

/// Everything courier needs to run, typed and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where Redis is, how to log in, and the queues.
    pub redis: RedisSettings,
    /// Where messages are delivered.
    pub main_server: MainServerSettings,
    /// The worker's id, pace, retries and breaker.
    pub worker: WorkerSettings,
    /// The worker's certificate for the main server.
    pub tls: TlsSettings,
    /// The admin port.
    pub metrics: MetricsSettings,
    /// The log files.
    pub logging: LoggingSettings,
}

/// The main server messages are delivered to (`main_server`).
#[derive(Debug, Clone)]
pub struct MainServerSettings {
    /// Its base URL: https:// while TLS is on, http:// while it is off.
    pub url: Url,
    /// TCP and TLS connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout.
    pub request_timeout: Duration,
    /// Offer HTTP/2 in the TLS handshake; HTTP/1.1 is used when the server does not take it.
    pub http2: bool,
    /// Send W3C `traceparent` (and the producer's `tracestate`) on the POST and the PUT.
    pub trace_context: bool,
}

/// Mutual TLS to the main server (`tls`): PEM files, read at start and when they change.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Off only for a plain-http:// test server.
    pub enabled: bool,
    /// How often the files are checked for changes (SIGHUP checks at once).
    pub reload_interval: Duration,
    /// The worker's client certificate (a chain allowed).
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// The only CA trusted for the main server.
    pub ca_file: PathBuf,
}

/// The admin port (`metrics`): /metrics, /health, /ready, /stats, and /dlq and /ui with a token.
#[derive(Debug, Clone)]
pub struct MetricsSettings {
    /// Off: no admin port at all.
    pub enabled: bool,
    /// The address it listens on.
    pub bind: IpAddr,
    /// Its port (0: one the system picks).
    pub port: u16,
    /// The bearer token of the admin port's `/dlq` API and `/ui` page (ADMIN_TOKEN); `None`:
    /// they are off.
    pub admin_token: Option<Secret>,
}

/// The log (`logging`).
#[derive(Debug, Clone)]
pub struct LoggingSettings {
    /// The least severe level written.
    pub level: tracing::Level,
    /// The directory of the log files.
    pub file_path: PathBuf,
    /// A log file rolls over to the next at this size (and at midnight UTC).
    pub max_file_bytes: u64,
    /// The old worker's text line, or one JSON object per line.
    pub format: LogFormat,
}

impl Settings {
    /// The file to read when `--config` is not given: `config.yaml` in the working directory,
    /// when there is one.
    pub fn default_file() -> Option<PathBuf> {
        Some(PathBuf::from("config.yaml")).filter(|p| p.is_file())
    }

    /// Loads settings: defaults, then `file` (which must exist), then the environment.
    pub fn load(file: Option<&Path>, env: &dyn Env) -> Result<Settings, ConfigError> {
        let Some(path) = file else {
            return Settings::from_text(None, env);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Settings::from_text(Some((path, &text)), env)
    }

    /// Settings from a config file's text (named by its path in errors), if any, and the
    /// environment: defaults, then the file, then the environment.
    pub fn from_text(file: Option<(&Path, &str)>, env: &dyn Env) -> Result<Settings, ConfigError> {
        let mut builder = Config::builder();
        for known in KNOWN {
            builder = builder
                .set_default(known.key, known.default)
                .map_err(|e| ConfigError::Setting(e.to_string()))?;
        }
        let file = file.map(|(path, text)| (path.to_path_buf(), text));
        if let Some((path, text)) = &file {
            // Parse first, expand after: `${VAR}` is replaced inside values only, so a value
            // may hold any character (quotes, backslashes, `#`), and comments stay comments.
            let mut parsed = Config::builder()
                .add_source(File::from_str(text, FileFormat::Yaml))
                .build()
                .map_err(|source| ConfigError::Yaml {
                    path: path.clone(),
                    source,
                })?;
            expand_values(&mut parsed.cache, "", env).map_err(|(key, source)| ConfigError::Expand {
                path: path.clone(),
                key,
                source,
            })?;
            builder = builder.add_source(parsed);
        }
        for known in KNOWN {
            if let Some(value) = env.var(known.env) {
                builder = builder
                    .set_override(known.key, value)
                    .map_err(|e| ConfigError::Setting(e.to_string()))?;
            }
        }
        let merged = builder.build().map_err(|source| match &file {
            Some((path, _)) => ConfigError::Yaml {
                path: path.clone(),
                source,
            },
            None => ConfigError::Setting(source.to_string()),
        })?;
        let source = Source { merged: &merged, env };
        source.refuse_unknown_keys()?;
        source.settings()
    }
}

impl Source<'_> {
    /// Every section, read in the order the checks have always run: of several wrong settings,
    /// the one named is the same. The main server's URL comes right after `tls`, whose
    /// `enabled` it must agree with.
    fn settings(&self) -> Result<Settings, ConfigError> {
        let tls = self.tls()?;
        let url = self.main_server_url(tls.enabled)?;
        let redis = self.redis()?;
        let worker = self.worker()?;
        let main_server = self.main_server(url)?;
        let metrics = self.metrics()?;
        let logging = self.logging()?;
        Ok(Settings {
            redis,
            main_server,
            worker,
            tls,
            metrics,
            logging,
        })
    }

    /// The `tls` section: the worker's certificate, key and CA for the main server.
    fn tls(&self) -> Result<TlsSettings, ConfigError> {
        Ok(TlsSettings {
            enabled: self.flag("tls.enabled")?,
            reload_interval: self.seconds("tls.reload_interval", 0.05, 86_400.0)?,
            cert_file: self.path("tls.cert_file")?,
            key_file: self.path("tls.key_file")?,
            ca_file: self.path("tls.ca_file")?,
        })
    }

    /// MAIN_SERVER_URL: https:// while TLS is on, http:// while it is off, with a host.
    fn main_server_url(&self, tls_enabled: bool) -> Result<Url, ConfigError> {
        let url_text = self.text("main_server.url")?;
        let url =
            Url::parse(url_text.trim()).map_err(|e| self.invalid("main_server.url", &format!("not a URL ({e})")))?;
        match (url.scheme(), tls_enabled) {
            ("https", true) | ("http", false) => {}
            ("http", true) => {
                return Err(self.invalid(
                    "main_server.url",
                    "must start with https:// while TLS is enabled \
                     (set TLS_ENABLED=false only for a plain-HTTP test server)",
                ))
            }
            ("https", false) => {
                return Err(self.invalid(
                    "main_server.url",
                    "is https:// but TLS is disabled; enable tls.enabled or use http://",
                ))
            }
            _ => return Err(self.invalid("main_server.url", "expected an https:// URL")),
        }
        if url.host_str().is_none() {
            return Err(self.invalid("main_server.url", "has no host name"));
        }
        Ok(url)
    }

    /// The rest of the `main_server` section, around its checked `url`.
    fn main_server(&self, url: Url) -> Result<MainServerSettings, ConfigError> {
        Ok(MainServerSettings {
            url,
            connect_timeout: self.seconds("main_server.connect_timeout", 0.01, 600.0)?,
            request_timeout: self.seconds("main_server.request_timeout", 0.01, 3_600.0)?,
            http2: self.flag("main_server.http2")?,
            trace_context: self.flag("main_server.trace_context")?,
        })
    }

    /// The `metrics` section: the admin port and its token.
    fn metrics(&self) -> Result<MetricsSettings, ConfigError> {
        Ok(MetricsSettings {
            enabled: self.flag("metrics.enabled")?,
            bind: self.parse("metrics.bind", "expected an IP address such as 0.0.0.0 or 127.0.0.1")?,
            port: self.number("metrics.port", 0, u16::MAX)?,
            admin_token: match self.text("metrics.admin_token")? {
                token if token.is_empty() => None,
                token if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                    return Err(self.invalid(
                        "metrics.admin_token",
                        "expected at least 16 characters without spaces, \
                         e.g. from `openssl rand -hex 32`",
                    ))
                }
                token => Some(Secret(token)),
            },
        })
    }

    /// The `logging` section.
    fn logging(&self) -> Result<LoggingSettings, ConfigError> {
        let level = parse_level(&self.text("logging.level")?)
            .ok_or_else(|| self.invalid("logging.level", "expected DEBUG, INFO, WARNING or ERROR"))?;
        let max_file_mb: u64 = self.number("logging.max_file_mb", 1, 1_000_000)?;
        Ok(LoggingSettings {
            level,
            file_path: self.path("logging.file_path")?,
            max_file_bytes: max_file_mb.saturating_mul(1024 * 1024),
            format: match self.text("logging.format")?.trim().to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(self.invalid("logging.format", "expected text or json")),
            },
        })
    }
}

/// How log lines are written (LOG_FORMAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// The old worker's line, unchanged.
    Text,
    /// One JSON object per line: `ts` (RFC 3339, UTC, milliseconds), `level` (the text
    /// line's names), `worker_id`, `message`, then each of the event's fields as its own key,
    /// numbers and booleans as such, everything else as a string.
    Json,
}

#[cfg(test)]
mod tests {
    use super::testing::{env, load_yaml};
    use super::*;
    use crate::telemetry::one_line;

    #[test]
    fn log_format_and_trace_context_are_read_and_checked() {
        let s = load_yaml("", &[]).unwrap();
        assert_eq!(s.logging.format, LogFormat::Text, "text unless asked");
        assert!(s.main_server.trace_context, "trace context on unless turned off");
        let s = load_yaml("logging:\n  format: json\n", &[("MAIN_SERVER_TRACE_CONTEXT", "false")]).unwrap();
        assert_eq!(s.logging.format, LogFormat::Json);
        assert!(!s.main_server.trace_context);
        let s = load_yaml("", &[("LOG_FORMAT", "JSON")]).unwrap();
        assert_eq!(s.logging.format, LogFormat::Json);
        let err = one_line(&load_yaml("", &[("LOG_FORMAT", "yaml")]).unwrap_err());
        assert!(err.contains("LOG_FORMAT") && err.contains("text or json"), "{err}");
        let err = one_line(&load_yaml("", &[("MAIN_SERVER_TRACE_CONTEXT", "sometimes")]).unwrap_err());
        assert!(err.contains("MAIN_SERVER_TRACE_CONTEXT"), "{err}");
    }

    #[test]
    fn the_shipped_config_yaml_loads_and_variables_still_win() {
        let shipped = include_str!("../../config.yaml");
        let s = load_yaml(shipped, &[]).unwrap_or_else(|e| panic!("config.yaml must load: {e}"));
        assert!(!s.main_server.http2, "HTTP/1.1 unless asked");
        assert_eq!((s.worker.concurrency, s.worker.batch_size), (4, 10));
        let s = load_yaml(shipped, &[("WORKER_CONCURRENCY", "64")]).unwrap();
        assert_eq!(s.worker.batch_size, 32, "the batch follows the concurrency");
        let s = load_yaml(shipped, &[("MAIN_SERVER_HTTP2", "true")]).unwrap();
        assert!(s.main_server.http2, "the variable overrides the file");
        let err = load_yaml(shipped, &[("MAIN_SERVER_HTTP2", "maybe")])
            .map_err(|e| one_line(&e))
            .unwrap_err();
        assert!(err.contains("MAIN_SERVER_HTTP2"), "{err}");
    }

    #[test]
    fn the_old_workers_defaults_apply_without_a_file_or_variables() {
        let s = Settings::load(None, &env(&[])).unwrap_or_else(|e| panic!("defaults must load: {e}"));
        assert_eq!(s.redis.host, "localhost");
        assert_eq!(s.redis.port, 6379);
        assert_eq!(s.redis.queues, ["message_queue"]);
        assert_eq!(s.main_server.url.as_str(), "https://localhost:8000/");
        assert_eq!(s.worker.concurrency, 4);
        assert_eq!(s.worker.retry_interval, Duration::from_secs(30));
        assert_eq!(s.worker.max_attempts, 10_000);
        assert_eq!(s.worker.batch_size, 10);
        let at_64 = Settings::load(None, &env(&[("WORKER_CONCURRENCY", "64")])).unwrap();
        assert_eq!(at_64.worker.batch_size, 32, "half the concurrency when not set");
        let set = env(&[("WORKER_CONCURRENCY", "64"), ("WORKER_BATCH_SIZE", "10")]);
        assert_eq!(
            Settings::load(None, &set).unwrap().worker.batch_size,
            10,
            "a set value wins"
        );
        assert_eq!(s.worker.id, format!("worker-{}", std::process::id()));
        assert_eq!(s.metrics.port, 9100);
        assert!(s.metrics.enabled);
        assert_eq!(s.tls.cert_file, PathBuf::from("certs/worker.crt"));
        assert_eq!(s.logging.level, tracing::Level::INFO);
        assert_eq!(s.logging.file_path, PathBuf::from("logs"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let s = load_yaml(
            "worker:\n  concurrency: 8\nmetrics:\n  port: 9100\n",
            &[
                ("WORKER_METRICS_PORT", "9102"),
                ("WORKER_ID", "worker-3"),
                ("LOG_LEVEL", "WARNING"),
            ],
        )
        .unwrap();
        assert_eq!(s.worker.concurrency, 8);
        assert_eq!(s.metrics.port, 9102);
        assert_eq!(s.worker.id, "worker-3");
        assert_eq!(s.logging.level, tracing::Level::WARN);
    }

    #[test]
    fn plain_http_is_refused_while_tls_is_enabled() {
        let err = load_yaml("", &[("MAIN_SERVER_URL", "http://main:8000")])
            .map_err(|e| one_line(&e))
            .unwrap_err();
        assert!(err.contains("main_server.url") && err.contains("https://"), "{err}");
        let ok = load_yaml("", &[("MAIN_SERVER_URL", "http://main:8000"), ("TLS_ENABLED", "false")]).unwrap();
        assert!(!ok.tls.enabled);
    }

    #[test]
    fn a_missing_config_file_is_named() {
        let err = Settings::load(Some(Path::new("/nonexistent/courier.yaml")), &env(&[]))
            .map_err(|e| one_line(&e))
            .unwrap_err();
        assert!(
            err.contains("/nonexistent/courier.yaml") && err.contains("--config"),
            "{err}"
        );
    }
}
