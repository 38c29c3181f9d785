//! The queue's one error type, and the one reading of "Redis is unavailable" (`unavailable`)
//! that the settle retry, `/ready`, `courier check` and the Sentinel re-ask all go by.

/// A failed Redis call, with the question the caller asks of it answered.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis, or the way to it, failed the call.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// The files for TLS to Redis could not be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl QueueError {
    /// True when the error is about reaching Redis (down, restarting, cut off, timed out, or
    /// not able to take writes right now) rather than about the command: the same call will
    /// succeed once Redis is back. See `unavailable`.
    pub fn is_unavailable(&self) -> bool {
        match self {
            QueueError::Redis(e) => unavailable(e),
            QueueError::Tls(_) => false,
        }
    }

    /// True when Redis refused our credentials: a configuration problem, not an outage.
    pub fn is_auth(&self) -> bool {
        let QueueError::Redis(e) = self else {
            return false;
        };
        matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
            || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    }

    /// True when the TLS files for Redis are at fault: a configuration problem.
    pub fn is_tls_files(&self) -> bool {
        matches!(self, QueueError::Tls(_))
    }
}

/// Server error codes that mean "not now": loading its data (`LOADING`), a script running
/// too long (`BUSY`), a slot moving or the cluster incomplete (`TRYAGAIN`, `CLUSTERDOWN`),
/// a replica cut off from its master or one that was a master a moment ago (`MASTERDOWN`,
/// `READONLY`), too few replicas for `min-replicas-to-write` (`NOREPLICAS`).
const UNAVAILABLE_CODES: &[&str] = &[
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "NOREPLICAS",
];

/// The one reading of "Redis is unavailable": the settle is held and tried again, `/ready`
/// answers 503, and under Sentinel the master is looked up again. redis-rs's own reading comes
/// first (I/O, a cluster node it cannot reach, `retry_method` wait-and-retry or refresh-slots);
/// then the codes it does not know (`NOREPLICAS`, `BUSY`), in every command of a failed
/// pipeline, and the code Redis 6.2 wraps inside a script's error
/// (`ERR Error running script … -READONLY …`).
pub(crate) fn unavailable(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, RetryMethod};
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        return true;
    }
    if matches!(e.kind(), ErrorKind::ClusterConnectionNotFound)
        || matches!(
            e.retry_method(),
            RetryMethod::WaitAndRetry | RetryMethod::RefreshSlotsAndRetry
        )
    {
        return true;
    }
    e.clone().into_server_errors().is_some_and(|errors| {
        errors
            .iter()
            .any(|(_, error)| unavailable_code(error.code(), error.details()))
    })
}

fn unavailable_code(code: &str, details: Option<&str>) -> bool {
    UNAVAILABLE_CODES.contains(&code)
        || (code == "ERR"
            && details
                .and_then(wrapped_code)
                .is_some_and(|c| UNAVAILABLE_CODES.contains(&c)))
}

/// The code of the error a Redis 6.2 script met, from the text it wraps it in:
/// `Error running script (call to f_…): @user_script:1: -READONLY You can't write …`.
fn wrapped_code(details: &str) -> Option<&str> {
    if !details.starts_with("Error running script") {
        return None;
    }
    details
        .split_whitespace()
        .filter_map(|word| word.strip_prefix('-'))
        .find(|code| !code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_error_that_wraps_an_outage_is_an_outage() {
        let error = |reply: &str| match redis::parse_redis_value(reply.as_bytes()) {
            Ok(redis::Value::ServerError(e)) => QueueError::Redis(e.into()),
            other => panic!("{other:?}"),
        };
        // Redis 6.2's words for a write inside a script on a replica, and on too few replicas.
        for wrapped in [
            "-ERR Error running script (call to f_8144b9d19a9245450524fb3d7cc9251f67976e88): \
             @user_script:1: @user_script: 1: -READONLY You can't write against a read only \
             replica.\r\n",
            "-ERR Error running script (call to f_1): @user_script:5: -NOREPLICAS Not enough good \
             replicas to write.\r\n",
        ] {
            assert!(error(wrapped).is_unavailable(), "{wrapped}");
        }
        for refused in [
            "-ERR Error running script (call to f_1): @user_script:1: -WRONGTYPE Operation against \
             a key holding the wrong kind of value\r\n",
            "-NOPERM this user has no permissions to run the 'expire' command\r\n",
            "-ERR Error running script: -1 is not a count\r\n",
            "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        ] {
            assert!(!error(refused).is_unavailable(), "{refused}");
        }
        for code in UNAVAILABLE_CODES {
            assert!(error(&format!("-{code} now\r\n")).is_unavailable(), "{code}");
        }
    }
}
