//! Reading the merged configuration key by key: typed readers (numbers, seconds, flags,
//! paths, log levels) whose errors name the setting, its variable and the offending value, the
//! error type of the whole load, and `Secret`, which keeps a password out of logs.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use config::{Config, Value, ValueKind};

use super::keys::KNOWN;
use super::{Env, ExpandError};

/// Why the configuration was refused. Each names the setting or the file; a cause, where
/// there is one, is the `source()` (render the whole with `telemetry::one_line`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {}: cannot read it; pass an existing file to --config", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not YAML (or its values do not merge).
    #[error("config file {}: not valid YAML", path.display())]
    Yaml {
        path: PathBuf,
        #[source]
        source: config::ConfigError,
    },
    /// A `${VAR}` in the value of `key` could not be expanded.
    #[error("config file {}: `{key}`", path.display())]
    Expand {
        path: PathBuf,
        key: String,
        #[source]
        source: ExpandError,
    },
    /// A setting is unknown, wrong or in conflict with another: the line says which.
    #[error("{0}")]
    Setting(String),
}

/// A password: kept out of `Debug` output and logs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub(super) String);

impl Secret {
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// True when no password is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// The merged configuration, read key by key with errors that name the key and its variable.
pub(super) struct Source<'a> {
    pub(super) merged: &'a Config,
    pub(super) env: &'a dyn Env,
}

impl Source<'_> {
    /// The setting's text, or an error naming it.
    pub(super) fn text(&self, key: &str) -> Result<String, ConfigError> {
        let value: Value = self.merged.get(key).map_err(|e| self.invalid(key, &e.to_string()))?;
        match value.kind {
            ValueKind::Table(_) | ValueKind::Array(_) => {
                Err(self.invalid(key, "expected a single value, found a list or mapping"))
            }
            ValueKind::Nil => Ok(String::new()),
            _ => value.into_string().map_err(|e| self.invalid(key, &e.to_string())),
        }
    }

    /// One line naming the setting, its variable, the offending value (never a password's) and
    /// what was expected.
    pub(super) fn invalid(&self, key: &str, expected: &str) -> ConfigError {
        let known = KNOWN.iter().find(|k| k.key == key);
        let env = known.map(|k| k.env).unwrap_or("");
        // A password never shows, nor a URL, which may carry one.
        let value = if key.ends_with("password") || key.ends_with("token") || key == "redis.url" {
            String::new()
        } else {
            match self.merged.get_string(key) {
                Ok(v) => format!(" = {v:?}"),
                Err(_) => String::new(),
            }
        };
        let origin = match self.env.var(env) {
            Some(_) => format!(" (from environment variable {env})"),
            None => format!(" (environment variable {env})"),
        };
        ConfigError::Setting(format!("invalid setting {key}{value}{origin}: {expected}"))
    }

    /// The setting parsed as a `T`; otherwise refused with `expected`.
    pub(super) fn parse<T: std::str::FromStr>(&self, key: &str, expected: &str) -> Result<T, ConfigError> {
        self.text(key)?.trim().parse().map_err(|_| self.invalid(key, expected))
    }

    /// A whole number from `min` to `max`.
    pub(super) fn number<T>(&self, key: &str, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let expected = format!("expected a whole number from {min} to {max}");
        let value: T = self.parse(key, &expected)?;
        if value < min || value > max {
            return Err(self.invalid(key, &expected));
        }
        Ok(value)
    }

    /// A number for which `fits` holds; otherwise refused with `expected`.
    pub(super) fn real(&self, key: &str, expected: &str, fits: impl Fn(f64) -> bool) -> Result<f64, ConfigError> {
        let value: f64 = self.parse(key, expected)?;
        if !fits(value) {
            return Err(self.invalid(key, expected));
        }
        Ok(value)
    }

    /// A duration in seconds; fractions allowed (`0.5`).
    pub(super) fn seconds(&self, key: &str, min: f64, max: f64) -> Result<Duration, ConfigError> {
        let expected = format!("expected a number of seconds from {min} to {max}");
        let value = self.real(key, &expected, |value| (min..=max).contains(&value))?;
        Ok(Duration::from_secs_f64(value))
    }

    /// true/false, 1/0, yes/no or on/off.
    pub(super) fn flag(&self, key: &str) -> Result<bool, ConfigError> {
        match self.text(key)?.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(self.invalid(key, "expected true or false")),
        }
    }

    /// A file or directory path, which may not be empty.
    pub(super) fn path(&self, key: &str) -> Result<PathBuf, ConfigError> {
        let text = self.text(key)?;
        if text.trim().is_empty() {
            return Err(self.invalid(key, "expected a file path, found nothing"));
        }
        Ok(PathBuf::from(text.trim()))
    }

    /// Two settings that cannot go together: one line naming both.
    pub(super) fn conflict(&self, first: &str, second: &str, why: &str) -> ConfigError {
        let env = |key: &str| KNOWN.iter().find(|k| k.key == key).map(|k| k.env).unwrap_or("");
        ConfigError::Setting(format!(
            "conflicting settings {first} ({}) and {second} ({}): {why}",
            env(first),
            env(second)
        ))
    }
}

/// Python's level names as the old worker took them, plus TRACE and WARN.
pub(super) fn parse_level(text: &str) -> Option<tracing::Level> {
    match text.trim().to_ascii_uppercase().as_str() {
        "TRACE" => Some(tracing::Level::TRACE),
        "DEBUG" => Some(tracing::Level::DEBUG),
        "INFO" => Some(tracing::Level::INFO),
        "WARNING" | "WARN" => Some(tracing::Level::WARN),
        "ERROR" | "CRITICAL" => Some(tracing::Level::ERROR),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::load_yaml;
    use crate::telemetry::one_line;

    #[test]
    fn bad_numbers_name_the_setting_and_the_variable() {
        let err = load_yaml("", &[("WORKER_CONCURRENCY", "many")])
            .map_err(|e| one_line(&e))
            .unwrap_err();
        assert!(
            err.contains("worker.concurrency") && err.contains("WORKER_CONCURRENCY") && err.contains("\"many\""),
            "{err}"
        );
        let err = load_yaml("redis:\n  port: 70000\n", &[])
            .map_err(|e| one_line(&e))
            .unwrap_err();
        assert!(err.contains("redis.port") && err.contains("70000"), "{err}");
        let err = load_yaml("", &[("WORKER_CONCURRENCY", "0")])
            .map_err(|e| one_line(&e))
            .unwrap_err();
        assert!(err.contains("from 1 to"), "{err}");
    }

    #[test]
    fn passwords_never_appear_in_errors_or_debug_output() {
        let s = load_yaml("", &[("REDIS_PASSWORD", "hunter2")]).unwrap();
        assert_eq!(s.redis.password.expose(), "hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        let err = load_yaml("redis:\n  password:\n    nested: hunter2\n", &[])
            .map_err(|e| one_line(&e))
            .unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
