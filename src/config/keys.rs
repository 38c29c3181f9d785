//! The known settings: each one's key in config.yaml, the environment variable that overrides
//! it and its default (the old worker's, where it had the setting); and the refusal of any
//! other key.

use std::collections::BTreeSet;

use config::ValueKind;

use super::{ConfigError, Source};

/// One known setting: its dotted key in config.yaml, the environment variable that overrides
/// it, and the default that applies when neither sets it.
pub(super) struct Known {
    pub(super) key: &'static str,
    pub(super) env: &'static str,
    pub(super) default: &'static str,
}

/// Every setting courier reads. The first seventeen are the old worker's table, with its defaults.
pub(super) const KNOWN: &[Known] = &[
    k("redis.host", "REDIS_HOST", "localhost"),
    k("redis.port", "REDIS_PORT", "6379"),
    k("redis.db", "REDIS_DB", "0"),
    k("redis.password", "REDIS_PASSWORD", ""),
    k("main_server.url", "MAIN_SERVER_URL", "https://localhost:8000"),
    k("worker.id", "WORKER_ID", ""),
    k("worker.concurrency", "WORKER_CONCURRENCY", "4"),
    k("worker.retry_interval", "WORKER_RETRY_INTERVAL", "30"),
    k("worker.max_attempts", "WORKER_MAX_ATTEMPTS", "10000"),
    // Empty: half the concurrency, at least the old worker's 10 (`default_batch_size`).
    k("worker.batch_size", "WORKER_BATCH_SIZE", ""),
    k("metrics.enabled", "WORKER_METRICS_ENABLED", "true"),
    k("metrics.port", "WORKER_METRICS_PORT", "9100"),
    k("tls.cert_file", "WORKER_CERT_PATH", "certs/worker.crt"),
    k("tls.key_file", "WORKER_KEY_PATH", "certs/worker.key"),
    k("tls.ca_file", "CA_CERT_PATH", "certs/ca.crt"),
    k("logging.level", "LOG_LEVEL", "INFO"),
    k("logging.file_path", "LOG_FILE_PATH", "logs"),
    // courier's own additions.
    k("redis.queue_name", "REDIS_QUEUE_NAME", "message_queue"),
    k("main_server.connect_timeout", "MAIN_SERVER_CONNECT_TIMEOUT", "5"),
    k("main_server.request_timeout", "MAIN_SERVER_REQUEST_TIMEOUT", "30"),
    k("main_server.http2", "MAIN_SERVER_HTTP2", "false"),
    k("main_server.outcomes", "MAIN_SERVER_OUTCOMES", ""),
    k("worker.shutdown_grace", "WORKER_SHUTDOWN_GRACE", "25"),
    k("worker.max_message_bytes", "WORKER_MAX_MESSAGE_BYTES", "1048576"),
    k("worker.heartbeat_interval", "WORKER_HEARTBEAT_INTERVAL", "5"),
    k("worker.dead_after", "WORKER_DEAD_AFTER", "30"),
    k("worker.threads", "WORKER_THREADS", "1"),
    k("tls.enabled", "TLS_ENABLED", "true"),
    k("tls.reload_interval", "TLS_RELOAD_INTERVAL", "60"),
    k("metrics.bind", "WORKER_METRICS_BIND", "0.0.0.0"),
    k("logging.max_file_mb", "LOG_MAX_FILE_MB", "100"),
    k("redis.url", "REDIS_URL", ""),
    k("redis.username", "REDIS_USERNAME", ""),
    k("redis.tls", "REDIS_TLS", "false"),
    k("redis.ca_file", "REDIS_CA_CERT_PATH", ""),
    k("redis.cert_file", "REDIS_CERT_PATH", ""),
    k("redis.key_file", "REDIS_KEY_PATH", ""),
    k("redis.sentinels", "REDIS_SENTINELS", ""),
    k("redis.sentinel_master", "REDIS_SENTINEL_MASTER", "mymaster"),
    k("redis.sentinel_username", "REDIS_SENTINEL_USERNAME", ""),
    k("redis.sentinel_password", "REDIS_SENTINEL_PASSWORD", ""),
    k("redis.cluster_nodes", "REDIS_CLUSTER_NODES", ""),
    k("redis.queue_names", "REDIS_QUEUE_NAMES", ""),
    k("redis.queue_order", "REDIS_QUEUE_ORDER", "priority"),
    k("worker.retry_jitter", "WORKER_RETRY_JITTER", "0"),
    k("worker.retry_backoff", "WORKER_RETRY_BACKOFF", "fixed"),
    k("worker.retry_max_interval", "WORKER_RETRY_MAX_INTERVAL", "3600"),
    k("worker.max_reclaims", "WORKER_MAX_RECLAIMS", "5"),
    k("worker.breaker", "WORKER_BREAKER", "true"),
    k("worker.breaker_failure_rate", "WORKER_BREAKER_FAILURE_RATE", "1"),
    k("worker.breaker_min_attempts", "WORKER_BREAKER_MIN_ATTEMPTS", "40"),
    k("worker.breaker_window", "WORKER_BREAKER_WINDOW", "60"),
    k("worker.breaker_same_status", "WORKER_BREAKER_SAME_STATUS", "20"),
    k("worker.breaker_probe_min", "WORKER_BREAKER_PROBE_MIN", "1"),
    k("worker.breaker_probe_max", "WORKER_BREAKER_PROBE_MAX", "30"),
    k("worker.rate_limit", "WORKER_RATE_LIMIT", "0"),
    k("worker.adaptive_concurrency", "WORKER_ADAPTIVE_CONCURRENCY", "false"),
    k("main_server.trace_context", "MAIN_SERVER_TRACE_CONTEXT", "true"),
    k("logging.format", "LOG_FORMAT", "text"),
    k("metrics.admin_token", "ADMIN_TOKEN", ""),
];

const fn k(key: &'static str, env: &'static str, default: &'static str) -> Known {
    Known { key, env, default }
}

/// WORKER_BATCH_SIZE when it is not set: half the concurrency, so that at 64 deliveries a claim
/// fills 32 free slots in one round trip (10 left slots waiting for Redis: 0.58 of `ab`'s rate
/// into nginx, docs/performance.md); at least the old worker's 10, which a claim of the
/// default 4 slots never reaches anyway.
pub fn default_batch_size(concurrency: usize) -> usize {
    (concurrency / 2).clamp(10, 1_000)
}

/// The documented settings: key, environment variable and default, for `--help` and the README.
pub fn known_settings() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    KNOWN.iter().map(|k| (k.key, k.env, k.default))
}

impl Source<'_> {
    /// Refuses a key of the config file that is not a known setting, naming the known keys of
    /// its section.
    pub(super) fn refuse_unknown_keys(&self) -> Result<(), ConfigError> {
        let known: BTreeSet<&str> = KNOWN.iter().map(|k| k.key).collect();
        let sections: BTreeSet<&str> = KNOWN
            .iter()
            .filter_map(|k| k.key.split_once('.'))
            .map(|(s, _)| s)
            .collect();
        let table = self
            .merged
            .cache
            .clone()
            .into_table()
            .map_err(|e| ConfigError::Setting(format!("config file: top level must be a mapping ({e})")))?;
        for (section, value) in table {
            if !sections.contains(section.as_str()) {
                return Err(ConfigError::Setting(format!(
                    "unknown setting `{section}` in the config file; known sections: {}",
                    sections.iter().copied().collect::<Vec<_>>().join(", ")
                )));
            }
            let ValueKind::Table(entries) = value.kind else {
                return Err(ConfigError::Setting(format!(
                    "setting `{section}` must be a mapping of keys, not a single value"
                )));
            };
            for name in entries.keys() {
                let key = format!("{section}.{name}");
                if !known.contains(key.as_str()) {
                    let same_section: Vec<&str> = known
                        .iter()
                        .filter(|k| k.starts_with(&format!("{section}.")))
                        .copied()
                        .collect();
                    return Err(ConfigError::Setting(format!(
                        "unknown setting `{key}` in the config file; known in `{section}`: {}",
                        same_section.join(", ")
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::load_yaml;
    use crate::telemetry::one_line;

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = load_yaml("worker:\n  concurency: 4\n", &[])
            .map_err(|e| one_line(&e))
            .unwrap_err();
        assert!(err.contains("worker.concurency"), "{err}");
        let err = load_yaml("workers:\n  concurrency: 4\n", &[])
            .map_err(|e| one_line(&e))
            .unwrap_err();
        assert!(err.contains("`workers`"), "{err}");
    }

    #[test]
    fn every_setting_is_documented_in_the_readme_and_the_shipped_config() {
        let readme = include_str!("../../README.md");
        let shipped = include_str!("../../config.yaml");
        for (key, env, _default) in known_settings() {
            let row = format!("| `{env}` | `{key}` | ");
            assert!(readme.contains(&row), "README lacks the row for {env}");
        }
        assert!(shipped.contains("${LOG_MAX_FILE_MB:-100}"));
        let s = load_yaml(shipped, &[("LOG_MAX_FILE_MB", "2")]).unwrap();
        assert_eq!(s.logging.max_file_bytes, 2 * 1024 * 1024);
    }
}
