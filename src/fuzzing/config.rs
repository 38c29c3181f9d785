//! Configuration from outside: a config file's text, the numeric worker settings and the
//! outcome table as environment variables, and a REDIS_URL.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::breaker::{Breaker, Verdict};
use crate::config::Settings;
use crate::delivery::DeliveryError;
use crate::policy::{Kind, Outcomes, Policy, MAX_RETRY_AFTER};
use crate::telemetry::one_line;

/// A config file's text, with a few variables set: loads or is refused with one line.
pub fn config_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| match name {
        "REDIS_PASSWORD" => Some("p\"q\\ # ${X}".to_string()),
        "SOME_VAR" => Some("value".to_string()),
        _ => None,
    };
    if let Err(e) = Settings::from_text(Some((Path::new("fuzz.yaml"), text)), &env) {
        let line = one_line(&e);
        assert!(!line.is_empty());
        assert!(!line.contains("p\"q"), "the password never shows in an error: {line}");
    }
}

/// The same bytes as each numeric worker setting and as `MAIN_SERVER_OUTCOMES`: refused with
/// one line naming the setting, or loaded as a value the code can use (the rate limit's wait,
/// the retry waits and the breaker's clock arithmetic never panic; a 2xx is always delivered).
pub fn worker_numbers(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for name in [
        "WORKER_RATE_LIMIT",
        "WORKER_RETRY_INTERVAL",
        "WORKER_RETRY_JITTER",
        "WORKER_RETRY_MAX_INTERVAL",
        "WORKER_MAX_ATTEMPTS",
        "WORKER_CONCURRENCY",
        "WORKER_BATCH_SIZE",
        "WORKER_BREAKER_FAILURE_RATE",
        "WORKER_BREAKER_MIN_ATTEMPTS",
        "WORKER_BREAKER_WINDOW",
        "WORKER_BREAKER_PROBE_MIN",
        "WORKER_BREAKER_PROBE_MAX",
        "WORKER_BREAKER_SAME_STATUS",
        "MAIN_SERVER_OUTCOMES",
    ] {
        let env = |var: &str| match var {
            "WORKER_RETRY_BACKOFF" => Some("exponential".to_string()),
            _ if var == name => Some(text.to_string()),
            _ => None,
        };
        let worker = match Settings::from_text(None, &env) {
            Ok(settings) => settings.worker,
            Err(e) => {
                let line = one_line(&e);
                assert!(line.contains(name) && !line.contains('\n'), "{line}");
                continue;
            }
        };
        if worker.rate_limit > 0.0 {
            assert!(Duration::try_from_secs_f64(1.0 / worker.rate_limit).is_ok());
        }
        let policy = Policy {
            max_attempts: worker.max_attempts,
            retry_interval: worker.retry_interval,
            max_retry_after: MAX_RETRY_AFTER,
            backoff: worker.retry_backoff,
            jitter: worker.retry_jitter,
        };
        for failures in [1, 2, 40, u32::MAX] {
            let _ = policy.interval(failures, 0.999);
        }
        let now = Instant::now();
        let mut breaker = Breaker::new(worker.breaker, now);
        for i in 0..200u64 {
            let at = now + Duration::from_millis(i);
            let verdict = match i % 3 {
                0 => Verdict::ServerFault,
                1 => Verdict::Rejected(404),
                _ => Verdict::Success,
            };
            breaker.record(verdict, i % 2 == 0, at);
            let _ = breaker.admit(worker.concurrency, at + Duration::from_secs(86_400));
        }
        for status in 100..600u16 {
            let answer = Err(DeliveryError::Status {
                status,
                retry_after: None,
                body: String::new(),
            });
            let outcome = Outcomes::from(&worker.outcomes).classify(&answer);
            if (200..300).contains(&status) {
                assert_eq!(outcome.kind, Kind::Delivered, "{status}");
            }
        }
    }
}

/// A REDIS_URL: loaded only when it is `redis[s]://[user[:password]@]host[:port][/db]` with
/// nothing after (a query or fragment would be ignored, so it is refused); refused with one
/// line naming REDIS_URL that never repeats the URL's password.
pub fn redis_url(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| match name {
        "REDIS_URL" => Some(text.to_string()),
        _ => None,
    };
    match Settings::from_text(None, &env) {
        Ok(settings) => {
            let url = url::Url::parse(text.trim()).expect("a URL that loaded parses");
            assert!(url.query().is_none() && url.fragment().is_none(), "{text:?}");
            assert_eq!(
                url.password().is_some(),
                !settings.redis.password.is_empty(),
                "{text:?}"
            );
        }
        Err(e) => {
            let line = one_line(&e);
            assert!(line.contains("REDIS_URL") && !line.contains('\n'), "{line}");
            if let Some(password) = url::Url::parse(text.trim())
                .ok()
                .and_then(|u| u.password().map(str::to_string))
            {
                assert!(
                    password.len() < 4 || !line.contains(&password),
                    "the password shows: {line}"
                );
            }
        }
    }
}
