//! The Redis permissions courier needs, in one table, and asking Redis whether the configured
//! user has them (`ACL DRYRUN`, Redis 7 or newer). `run` asks at start and refuses to begin
//! without them (a script stopped by a denied command halfway is what loses messages);
//! `courier check` reports the same answer. The README's ACL lists are tested against a
//! worker that runs with exactly them.

use redis::FromRedisValue;

use super::{Conn, Keys, Queue};
use crate::config::Topology;

/// What an argument of a checked command stands for: one of the queue's keys, or literal text.
#[derive(Debug, Clone, Copy)]
enum Arg {
    Ready,
    Processing,
    Retry,
    Dead,
    Workers,
    Owners,
    Reclaims,
    Clock,
    Text(&'static str),
}

use Arg::{Clock, Dead, Owners, Processing, Ready, Reclaims, Retry, Text, Workers};

const SHA: Arg = Text("0000000000000000000000000000000000000000");

/// Every command the worker sends on a queue's keys, its scripts' commands included, with
/// arguments shaped like the real ones so that `ACL DRYRUN` checks the key patterns as well.
/// A script that starts using a command adds it here; the README tests then say whether the
/// documented lists still cover it.
const COMMANDS: &[(&str, &[Arg])] = &[
    ("LRANGE", &[Processing, Text("0"), Text("-1")]),
    ("LINDEX", &[Ready, Text("-1")]),
    // The admin port's /dlq requeue and purge (`dlq_requeue`, `dlq_drop`).
    ("LSET", &[Dead, Text("-1"), Text("m")]),
    ("LPOS", &[Processing, Text("m")]),
    ("LLEN", &[Ready]),
    ("LPUSH", &[Processing, Text("m")]),
    ("RPUSH", &[Ready, Text("m")]),
    ("LREM", &[Processing, Text("-1"), Text("m")]),
    ("LTRIM", &[Processing, Text("0"), Text("-1")]),
    ("RPOP", &[Ready, Text("1")]),
    ("LMOVE", &[Ready, Processing, Text("RIGHT"), Text("LEFT")]),
    ("BLMOVE", &[Ready, Ready, Text("RIGHT"), Text("RIGHT"), Text("1")]),
    ("ZADD", &[Retry, Text("1"), Text("m")]),
    ("ZREM", &[Retry, Text("m")]),
    ("ZRANGE", &[Retry, Text("0"), Text("0")]),
    ("ZRANGEBYSCORE", &[Retry, Text("-inf"), Text("1")]),
    ("ZSCORE", &[Workers, Text("w")]),
    ("ZCARD", &[Retry]),
    ("ZREVRANGE", &[Workers, Text("0"), Text("-1")]),
    ("HGET", &[Owners, Text("w")]),
    ("HSET", &[Owners, Text("w"), Text("v")]),
    ("HDEL", &[Owners, Text("w")]),
    ("HINCRBY", &[Reclaims, Text("h"), Text("1")]),
    ("HLEN", &[Reclaims]),
    ("HEXISTS", &[Reclaims, Text("h")]),
    ("HMGET", &[Clock, Text("offset"), Text("last")]),
    ("HKEYS", &[Owners]),
    ("EXISTS", &[Reclaims]),
    ("EXPIRE", &[Reclaims, Text("60")]),
    ("DEL", &[Dead]),
    ("TIME", &[]),
    ("INFO", &[Text("server")]),
    ("EVALSHA", &[SHA, Text("1"), Ready]),
    ("EVAL", &[Text("return 1"), Text("1"), Ready]),
    ("SCRIPT", &[Text("LOAD"), Text("return 1")]),
];

/// Under Sentinel: whether a master the sentinels name is one (`ROLE` needs `@admin`, so the
/// worker falls back to this).
const SENTINEL_COMMANDS: &[(&str, &[Arg])] = &[("INFO", &[Text("replication")])];

/// In a cluster: what redis-rs's cluster client sends itself (the slot map, a ping on each new
/// node connection).
const CLUSTER_COMMANDS: &[(&str, &[Arg])] = &[("CLUSTER", &[Text("SLOTS")]), ("PING", &[])];

/// Commands whose first argument is a subcommand, named with it (`SCRIPT LOAD`).
const CONTAINERS: &[&str] = &["SCRIPT", "CLUSTER"];

/// One command to ask about, with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Required {
    /// The command as an operator names it: `EXPIRE`, `SCRIPT LOAD`, `CLUSTER SLOTS`.
    pub name: String,
    command: &'static str,
    args: Vec<String>,
}

/// Every command the worker needs on `keys` in `topology`, with arguments naming `keys`.
pub fn required_commands(keys: &Keys, topology: &Topology) -> Vec<Required> {
    let processing = keys.processing("courier-acl-check");
    let extra = match topology {
        Topology::Single => &[][..],
        Topology::Sentinel { .. } => SENTINEL_COMMANDS,
        Topology::Cluster { .. } => CLUSTER_COMMANDS,
    };
    COMMANDS
        .iter()
        .chain(extra)
        .map(|(command, args)| {
            let args: Vec<String> = args
                .iter()
                .map(|arg| match arg {
                    Ready => keys.ready.clone(),
                    Processing => processing.clone(),
                    Retry => keys.retry.clone(),
                    Dead => keys.dead.clone(),
                    Workers => keys.workers.clone(),
                    Owners => keys.owners.clone(),
                    Reclaims => keys.reclaims.clone(),
                    Clock => keys.clock.clone(),
                    Text(text) => (*text).to_string(),
                })
                .collect();
            let name = match args.first() {
                Some(sub) if CONTAINERS.contains(command) => format!("{command} {sub}"),
                _ => (*command).to_string(),
            };
            Required { name, command, args }
        })
        .collect()
}

/// What Redis says of the user's permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permissions {
    /// The user may run every command asked about.
    Granted { user: String, commands: usize },
    /// The user may not run these: one `COMMAND, COMMAND on queue` for each queue.
    Denied { user: String, missing: Vec<String> },
    /// Redis could not be asked: older than 7 (no `ACL DRYRUN`), or the user may not ask.
    Unknown { reason: String },
}

/// Asks Redis, for each queue, whether the connected user may run everything the worker needs
/// on that queue's keys. In a cluster each queue's node is asked (ACLs are per node).
pub async fn check(conn: &mut Conn, queues: &[Keys], topology: &Topology) -> Permissions {
    let mut user = String::new();
    let mut missing = Vec::new();
    let mut asked = 0;
    for keys in queues {
        let whoami = redis::cmd("ACL").arg("WHOAMI").clone();
        user = match conn.query_on_node_of::<String>(&keys.ready, &whoami).await {
            Ok(user) => user,
            Err(e) => {
                return Permissions::Unknown {
                    reason: format!("ACL WHOAMI failed ({e})"),
                }
            }
        };
        let mut denied = Vec::new();
        for required in required_commands(keys, topology) {
            let dryrun = redis::cmd("ACL")
                .arg("DRYRUN")
                .arg(&user)
                .arg(required.command)
                .arg(&required.args)
                .clone();
            match conn.query_on_node_of::<String>(&keys.ready, &dryrun).await {
                Ok(answer) if answer == "OK" => {}
                Ok(_) => denied.push(required.name),
                Err(e) => {
                    return Permissions::Unknown {
                        reason: format!(
                            "user {user} may not run ACL DRYRUN, or this Redis has none \
                             (older than 7): {e}"
                        ),
                    }
                }
            }
            asked += 1;
        }
        if !denied.is_empty() {
            missing.push(format!("{} on {}", denied.join(", "), keys.name));
        }
    }
    match missing.is_empty() {
        true => Permissions::Granted { user, commands: asked },
        false => Permissions::Denied { user, missing },
    }
}

/// `check` for a worker's queue handles (which share one connection).
pub async fn check_queues(queues: &[Queue], topology: &Topology) -> Permissions {
    let Some(first) = queues.first() else {
        return Permissions::Unknown {
            reason: "no queue to check".to_string(),
        };
    };
    let keys: Vec<Keys> = queues.iter().map(|q| q.keys().clone()).collect();
    check(&mut first.connection(), &keys, topology).await
}

impl Conn {
    /// Runs `cmd` on the node that serves `key` in a cluster (a keyless command would go to
    /// any node), or on the one server otherwise.
    pub(super) async fn query_on_node_of<T: FromRedisValue>(
        &mut self,
        key: &str,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        match self.cluster() {
            Some(mut cluster) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let node = Route::with_key(key, SlotAddr::Master);
                let reply = cluster
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(node)),
                    )
                    .await?;
                redis::from_redis_value(reply).map_err(redis::RedisError::from)
            }
            None => cmd.query_async(self).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_names_the_queues_own_keys() {
        let keys = Keys::clustered("q");
        let cluster = Topology::Cluster {
            nodes: vec![("h".into(), 1)],
        };
        let required = required_commands(&keys, &cluster);
        let names: Vec<&str> = required.iter().map(|r| r.name.as_str()).collect();
        assert!(
            names.contains(&"SCRIPT LOAD") && names.contains(&"CLUSTER SLOTS"),
            "{names:?}"
        );
        for r in &required {
            for arg in &r.args {
                assert!(
                    !arg.contains(':') || arg.starts_with("{q}:"),
                    "{} names a key outside the queue's slot: {arg}",
                    r.name
                );
            }
        }
        let single: Vec<String> = required_commands(&Keys::new("q"), &Topology::Single)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert!(!single.iter().any(|n| n.starts_with("CLUSTER")), "{single:?}");
    }
}
