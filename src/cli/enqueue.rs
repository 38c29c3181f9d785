//! `courier enqueue`: messages in the documented format, pushed in order.

use std::time::SystemTime;

use anyhow::{bail, Context as _};

use super::connect;
use crate::config::RedisSettings;
use crate::queue;

/// `courier enqueue`: one message with `id`, or `count` generated ones named `prefix-N`.
/// How many replicas must have the messages before `enqueue` reports success.
pub(super) struct Replicas {
    pub(super) count: u32,
    pub(super) timeout_ms: u64,
}

pub(super) async fn enqueue(
    settings: &RedisSettings,
    id: Option<String>,
    count: Option<usize>,
    prefix: &str,
    payload: Option<&str>,
    replicas: Replicas,
) -> anyhow::Result<usize> {
    let payload = match payload {
        Some(text) => Some(serde_json::from_str::<serde_json::Value>(text).with_context(|| {
            format!(
                "--payload is not valid JSON: {text:?}; quote it for the shell, \
                 e.g. --payload '{{\"k\":1}}'"
            )
        })?),
        None => None,
    };
    let ids: Vec<String> = match (id, count) {
        (Some(id), None) => vec![id],
        (None, Some(n)) => (0..n).map(|i| format!("{prefix}-{i}")).collect(),
        _ => bail!("give either --id ID or --count N"),
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let items: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            let mut message = serde_json::json!({"message_id": id, "queued_at": now});
            if let Some(payload) = &payload {
                message["payload"] = payload.clone();
            }
            message.to_string().into_bytes()
        })
        .collect();
    let (mut conn, keys) = connect(settings).await?;
    let n = queue::enqueue(&mut conn, &keys, &items).await?;
    if replicas.count > 0 {
        // Redis replicates asynchronously: a push the master acknowledged but no replica has
        // yet is lost if the master fails now. WAIT blocks until enough replicas have it.
        let acked = queue::wait_replicas(&mut conn, &keys, replicas.count, replicas.timeout_ms).await?;
        if acked < u64::from(replicas.count) {
            bail!(
                "enqueued {n} message(s) on the master, but only {acked} of {} replica(s) \
                 acknowledged them within {} ms; they could be lost in a failover until replicated",
                replicas.count,
                replicas.timeout_ms
            );
        }
    }
    Ok(n)
}
