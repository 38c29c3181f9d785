//! The Redis checks of `courier check`: reachable (through Sentinel or a cluster when so
//! configured) with the credentials, new enough, the user's permissions on the queues' keys,
//! and whether Redis keeps what it is given.

use super::{Check, Verdict};
use crate::config::{Settings, Topology};
use crate::queue::{Conn, Keys};
use crate::telemetry::one_line;

/// Reachable with the credentials and new enough; under Sentinel, the master and its replicas;
/// in a cluster, its state; then, for each queue, the user's permissions, and whether Redis
/// keeps what it is given.
pub(super) async fn redis_checks(settings: &Settings) -> Vec<Check> {
    let r = &settings.redis;
    let mut checks = Vec::new();
    let connector = match crate::queue::Connector::new(r) {
        Ok(connector) => connector,
        Err(e) => return vec![Check::fail("redis", one_line(&e), "correct the file the line names")],
    };
    if let Some(master) = connector.sentinel_master().await {
        match master {
            Ok((host, port)) => checks.push(Check::pass(
                "redis sentinel",
                format!("{} names {host}:{port} as the master", r.describe()),
            )),
            Err(e) => {
                checks.push(Check::fail(
                    "redis sentinel",
                    format!("{}: {}", r.describe(), one_line(&e)),
                    "start the sentinels, or correct REDIS_SENTINELS, REDIS_SENTINEL_MASTER and \
                     the sentinels' credentials",
                ));
                return checks;
            }
        }
        if let Some(Ok(replicas)) = connector.sentinel_replicas().await {
            checks.push(if replicas == 0 {
                Check {
                    name: "redis replicas",
                    verdict: Verdict::Warn,
                    detail: "the master has no healthy replica: a failover has nowhere to go, and \
                             whatever the master loses is lost"
                        .into(),
                    fix: Some("add a replica (replicaof) and let the sentinels see it".into()),
                }
            } else {
                Check::pass("redis replicas", format!("{replicas} healthy replica(s)"))
            });
        }
    }
    let (mut conn, _) = match crate::cli::connect(r).await {
        Ok(conn) => conn,
        Err(e) => {
            checks.push(Check::fail(
                "redis",
                e.to_string(),
                format!(
                    "start Redis or correct {}, REDIS_USERNAME and REDIS_PASSWORD",
                    r.where_settings()
                ),
            ));
            return checks;
        }
    };
    let reachable = redis_check(r, &mut conn).await;
    let passed = reachable.verdict == Verdict::Pass;
    checks.push(reachable);
    if !passed {
        return checks;
    }
    if connector.clustered() {
        checks.push(cluster_check(&mut conn).await);
    }
    let keys: Vec<Keys> = r
        .queues
        .iter()
        .map(|name| Keys::for_topology(name, connector.clustered()))
        .collect();
    checks.push(acl_check(&mut conn, &keys, &r.topology).await);
    checks.push(data_safety(&mut conn).await);
    checks
}

/// The cluster's own view of itself: `cluster_state:ok` and every slot served.
async fn cluster_check(conn: &mut Conn) -> Check {
    let texts = crate::queue::info_texts(conn, "CLUSTER", "INFO").await;
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
            .map(|v| v.trim().to_string())
    };
    match texts.first() {
        Some(text) if field(text, "cluster_state").as_deref() == Some("ok") => Check::pass(
            "redis cluster",
            format!(
                "state ok, {} slots served by {} masters",
                field(text, "cluster_slots_ok").unwrap_or_default(),
                field(text, "cluster_size").unwrap_or_default()
            ),
        ),
        Some(text) => Check::fail(
            "redis cluster",
            format!(
                "cluster_state is {}, {} of 16384 slots ok",
                field(text, "cluster_state").unwrap_or_default(),
                field(text, "cluster_slots_ok").unwrap_or_default()
            ),
            "bring the failed nodes back or fail over to their replicas \
             (redis-cli --cluster check)",
        ),
        None => Check::fail(
            "redis cluster",
            "CLUSTER INFO gave no answer",
            "check REDIS_CLUSTER_NODES",
        ),
    }
}

/// Whether the Redis user may run every command courier uses on the queues' keys, asked of
/// Redis itself with `ACL DRYRUN` (Redis 7) through the list `run` checks at start. A user
/// that may not ask is told so, not failed.
async fn acl_check(conn: &mut Conn, keys: &[Keys], topology: &Topology) -> Check {
    use crate::queue::acl::Permissions;
    let readme = "README, \"The Redis courier runs on\", lists what it needs";
    match crate::queue::acl::check(conn, keys, topology).await {
        Permissions::Granted { user, commands } => Check::pass(
            "redis acl",
            format!("user {user} may run the {commands} commands courier uses on the queues' keys"),
        ),
        Permissions::Denied { user, missing } => Check::fail(
            "redis acl",
            format!("user {user} may not run {}", missing.join("; ")),
            "grant them (README, \"The Redis courier runs on\", has the ACL SETUSER line for each \
             topology)",
        ),
        Permissions::Unknown { reason } => Check::warn("redis acl", format!("not verified: {reason}; {readme}")),
    }
}

/// Whether Redis could drop queued messages: an eviction policy other than `noeviction`, or
/// no persistence at all. Read from `INFO` (which managed services allow) and `CONFIG GET
/// save` where permitted. Warnings, not failures: a cache-only Redis may be a choice.
async fn data_safety(conn: &mut Conn) -> Check {
    // A cluster answers INFO for every master: all of them count.
    let memory = crate::queue::info_texts(conn, "INFO", "memory").await.join("\n");
    let persistence = crate::queue::info_texts(conn, "INFO", "persistence").await.join("\n");
    let save: Option<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async::<Vec<String>>(conn)
        .await
        .ok()
        .and_then(|reply| reply.get(1).cloned());
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    let policies: Vec<String> = memory
        .lines()
        .filter_map(|l| l.strip_prefix("maxmemory_policy:"))
        .map(|v| v.trim().to_string())
        .collect();
    match policies.iter().find(|p| p.as_str() != "noeviction") {
        None => {}
        Some(policy) => {
            problems.push(format!(
                "maxmemory-policy {policy} lets Redis evict queued messages when memory runs short"
            ));
            fixes.push("set maxmemory-policy noeviction".to_string());
        }
    }
    let aof = !persistence.is_empty()
        && persistence
            .lines()
            .filter(|l| l.starts_with("aof_enabled:"))
            .all(|l| l.trim() == "aof_enabled:1");
    if !aof && save.as_deref().is_some_and(|s| s.trim().is_empty()) {
        problems.push(
            "persistence is off (no AOF, no RDB snapshots): a Redis restart loses every queued \
             message"
                .into(),
        );
        fixes.push("set appendonly yes (or RDB save points)".to_string());
    }
    if problems.is_empty() {
        return Check::pass(
            "redis data",
            "no eviction; persistence on (or not readable with this user)",
        );
    }
    Check {
        name: "redis data",
        verdict: Verdict::Warn,
        detail: problems.join("; "),
        fix: Some(fixes.join("; ")),
    }
}

async fn redis_check(r: &crate::config::RedisSettings, conn: &mut Conn) -> Check {
    match crate::queue::server_version(conn).await {
        Ok(version) => {
            if crate::queue::supported_version(&version) {
                Check::pass(
                    "redis",
                    format!("{} answers, version {version}, database {}", r.describe(), r.db),
                )
            } else {
                Check::fail(
                    "redis",
                    format!("{} runs Redis {version}", r.describe()),
                    "upgrade to Redis 6.2 or newer (courier uses LMOVE and BLMOVE)",
                )
            }
        }
        Err(e) => Check::fail(
            "redis",
            format!("{}: {e}", r.describe()),
            "check REDIS_PASSWORD and the user's permissions",
        ),
    }
}
