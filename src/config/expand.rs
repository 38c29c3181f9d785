//! `${VAR}` and `${VAR:-default}` in the values of a config file, as the old worker's
//! config.yaml writes them.

use config::{Value, ValueKind};

use super::keys::KNOWN;
use super::Env;

/// Why a `${VAR}` in a config value could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    /// `${` with no `}` after it.
    #[error("`${{` without a closing `}}`")]
    Unclosed,
    /// Between the braces, something other than a variable's name (and a default).
    #[error("`${{{0}}}` is not a variable reference")]
    NotAReference(String),
    /// A variable that is not set, has no default and is not one of courier's.
    #[error("${{{0}}} is not set and has no default; set it or write ${{{0}:-value}}")]
    Unset(String),
}

/// Expands `${VAR}` and `${VAR:-default}` in every string value of a parsed config file;
/// on failure, the key of the value that could not be expanded and why.
pub(super) fn expand_values(value: &mut Value, key: &str, env: &dyn Env) -> Result<(), (String, ExpandError)> {
    match &mut value.kind {
        ValueKind::String(text) if text.contains("${") => {
            *text = expand(text, env).map_err(|e| (key.to_string(), e))?;
        }
        ValueKind::Table(entries) => {
            for (name, entry) in entries.iter_mut() {
                let key = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}.{name}")
                };
                expand_values(entry, &key, env)?;
            }
        }
        ValueKind::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_values(item, &format!("{key}[{i}]"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expands `${VAR}` and `${VAR:-default}` in one value. An unset variable with no default
/// takes courier's default when it is one of the known variables (so the old worker's
/// `config.yaml` works unchanged); any other unset variable is an error. The variable's value
/// is inserted as it is: it is never parsed again.
pub fn expand(text: &str, env: &dyn Env) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(ExpandError::Unclosed)?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ExpandError::NotAReference(inner.to_string()));
        }
        let value = match (env.var(name).filter(|v| !v.is_empty() || default.is_none()), default) {
            (Some(value), _) => value,
            (None, Some(default)) => default.to_string(),
            (None, None) => match KNOWN.iter().find(|k| k.env == name) {
                Some(known) => known.default.to_string(),
                None => return Err(ExpandError::Unset(name.to_string())),
            },
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{env, load_yaml};
    use crate::telemetry::one_line;

    #[test]
    fn the_old_workers_config_file_loads_with_its_bare_variables_unset() {
        let old = r#"redis:
  host: "${REDIS_HOST}"
  port: ${REDIS_PORT}
  queue_name: "message_queue"
worker:
  concurrency: ${WORKER_CONCURRENCY}
  retry_interval: ${WORKER_RETRY_INTERVAL}
  max_attempts: ${WORKER_MAX_ATTEMPTS}
tls:
  enabled: true
  cert_file: "certs/worker.crt"
  key_file: "certs/worker.key"
  ca_file: "certs/ca.crt"
metrics:
  enabled: true
  port: 9100
"#;
        let s = load_yaml(old, &[("REDIS_HOST", "redis.internal")]).unwrap();
        assert_eq!(s.redis.host, "redis.internal");
        assert_eq!(s.redis.port, 6379);
        assert_eq!(s.worker.max_attempts, 10_000);
    }

    #[test]
    fn expansion_uses_defaults_and_refuses_unknown_unset_variables() {
        let e = env(&[("SET", "yes"), ("EMPTY", "")]);
        assert_eq!(
            expand("a: ${SET}\nb: ${NOPE:-x}\nc: ${EMPTY:-d}\n", &e).unwrap(),
            "a: yes\nb: x\nc: d\n"
        );
        let err = load_yaml("redis:\n  host: 1\n  db: ${NOT_A_SETTING}\n", &[])
            .map_err(|e| one_line(&e))
            .unwrap_err();
        assert!(err.contains("`redis.db`") && err.contains("NOT_A_SETTING"), "{err}");
        assert_eq!(expand("${UNCLOSED", &e), Err(ExpandError::Unclosed));
    }

    #[test]
    fn any_character_in_a_variable_works_and_comments_are_never_expanded() {
        let shipped = include_str!("../../config.yaml");
        for password in [
            "p\"q",
            "ends\\",
            "a: b # c",
            "{x}",
            "'single'",
            "multi\nline",
            "${NOT_A_VAR}",
        ] {
            let s = load_yaml(shipped, &[("REDIS_PASSWORD", password)])
                .unwrap_or_else(|e| panic!("password {password:?}: {e}"));
            assert_eq!(s.redis.password.expose(), password);
        }
        let s = load_yaml(
            "# ${UNSET_IN_A_COMMENT}\nredis:\n  host: \"${H:-h}\" # ${ALSO_UNSET}\n",
            &[],
        )
        .unwrap();
        assert_eq!(s.redis.host, "h");
    }
}
