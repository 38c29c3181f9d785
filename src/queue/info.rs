//! What a Redis server says of itself: its version (checked against `MIN_REDIS` at start and
//! by `courier check`) and the text answers of `INFO` and `CLUSTER INFO`, one per node.

use super::{Conn, QueueError};

/// The oldest Redis courier runs on: LMOVE, BLMOVE and RPOP with a count need 6.2.
pub const MIN_REDIS: (u32, u32) = (6, 2);

/// The version a Redis server reports in `INFO server`, e.g. `7.0.15`; in a cluster (which
/// answers for every master) the oldest.
pub async fn server_version(conn: &mut impl redis::aio::ConnectionLike) -> Result<String, QueueError> {
    let info: redis::Value = redis::cmd("INFO").arg("server").query_async(conn).await?;
    let mut texts = Vec::new();
    collect_texts(&info, &mut texts);
    let version = |text: &String| {
        text.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_string()
    };
    Ok(texts
        .iter()
        .map(version)
        .min_by_key(|v| version_key(v))
        .unwrap_or_else(|| "unknown".to_string()))
}

/// The text answers of `COMMAND ARG` (e.g. `INFO memory`, `CLUSTER INFO`): one per node in a
/// cluster, where the command goes to every master. Empty when it is refused.
pub async fn info_texts(conn: &mut Conn, command: &str, arg: &str) -> Vec<String> {
    let mut texts = Vec::new();
    if let Ok(reply) = redis::cmd(command).arg(arg).query_async::<redis::Value>(conn).await {
        collect_texts(&reply, &mut texts);
    }
    texts
}

/// Every text in a reply, however nested (a cluster answers INFO with one per node).
fn collect_texts(value: &redis::Value, into: &mut Vec<String>) {
    match value {
        redis::Value::BulkString(bytes) => into.push(String::from_utf8_lossy(bytes).into_owned()),
        redis::Value::SimpleString(text) => into.push(text.clone()),
        redis::Value::VerbatimString { text, .. } => into.push(text.clone()),
        redis::Value::Array(items) | redis::Value::Set(items) => items.iter().for_each(|v| collect_texts(v, into)),
        redis::Value::Map(pairs) => pairs.iter().for_each(|(_, v)| collect_texts(v, into)),
        _ => {}
    }
}

fn version_key(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Whether `version` (`major.minor...`) is at least `MIN_REDIS`.
pub fn supported_version(version: &str) -> bool {
    version_key(version) >= MIN_REDIS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_versions_compare_numerically() {
        assert!(supported_version("7.0.15"));
        assert!(supported_version("6.2.0"));
        assert!(supported_version("10.0"));
        assert!(!supported_version("6.0.9"));
        assert!(!supported_version("5.0.7"));
        assert!(!supported_version("unknown"));
    }
}
