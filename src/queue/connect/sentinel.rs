//! Following a master that Sentinel watches: asking the sentinels where it is (on the link to
//! the one that answered last, kept), checking that the address they give is a master yet,
//! moving every link when it moved, and listening for `+switch-master` to move at once.

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{Client, Value};
use tokio::sync::watch;
use tracing::{info, warn};

use super::links::Server;
use super::tls::client_for;
use super::{Connector, Hub, Shape, CONNECT_TIMEOUT};
use crate::config::Topology;
use crate::queue::QueueError;
use crate::sync::lock;

/// Asking the sentinels again after a failure waits at least this long since the last asking,
/// so a burst of failed commands costs one round of questions.
const FOLLOW_GAP: Duration = Duration::from_millis(250);

/// What a connector keeps under Sentinel, beside its links.
pub(super) struct Sentinel {
    /// The master's name as the sentinels know it.
    master_name: String,
    /// The connection to the sentinel that answered last, asked first next time: the
    /// heartbeat asks the sentinels every interval, and a connection each time would be a
    /// TCP (and TLS) handshake each time.
    kept: std::sync::Mutex<Option<MultiplexedConnection>>,
    /// Counts moves to a new master.
    changes: watch::Sender<u64>,
}

impl Sentinel {
    /// Following the master named `master_name`, not asked yet.
    pub(super) fn new(master_name: &str) -> Sentinel {
        Sentinel {
            master_name: master_name.to_string(),
            kept: std::sync::Mutex::new(None),
            changes: watch::channel(0).0,
        }
    }

    /// Drops the kept connection to a sentinel: the next question makes a new one.
    pub(super) fn forget_kept(&self) {
        *self.kept() = None;
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        lock(&self.kept)
    }
}

impl Connector {
    /// Under Sentinel: a counter that goes up each time the worker follows the master to a new
    /// address. Whatever this worker wrote to the old master and the failover did not carry
    /// over is found again by sweeping its processing lists when it changes.
    pub fn master_changes(&self) -> Option<watch::Receiver<u64>> {
        match &self.hub.topology {
            Shape::Sentinel(sentinel) => Some(sentinel.changes.subscribe()),
            _ => None,
        }
    }

    /// Under Sentinel: asks the sentinels now whether the master has moved, and follows it.
    /// The heartbeat calls this, so a master that was replaced while still answering (cut off
    /// from the sentinels, not down) is left within one heartbeat.
    pub async fn check_master(&self) -> Result<(), QueueError> {
        match self.hub.topology {
            Shape::Sentinel(_) => self.hub.check(true).await,
            _ => Ok(()),
        }
    }

    /// Under Sentinel: the master's address as the sentinels give it now, without following.
    pub async fn sentinel_master(&self) -> Option<Result<(String, u16), QueueError>> {
        match self.hub.topology {
            Shape::Sentinel(_) => Some(self.hub.ask().await),
            _ => None,
        }
    }

    /// Under Sentinel: how many replicas the sentinels see up for the master.
    pub async fn sentinel_replicas(&self) -> Option<Result<usize, QueueError>> {
        let Shape::Sentinel(sentinel) = &self.hub.topology else {
            return None;
        };
        let mut replicas = redis::cmd("SENTINEL");
        replicas.arg("REPLICAS").arg(&sentinel.master_name);
        type Replicas = Vec<std::collections::HashMap<String, String>>;
        let up = |replicas: Replicas| {
            Ok(replicas
                .iter()
                .filter(|r| {
                    let flags = r.get("flags").map_or("", String::as_str);
                    !flags.contains("s_down") && !flags.contains("o_down") && !flags.contains("disconnected")
                })
                .count())
        };
        Some(self.hub.ask_sentinels(sentinel, &replicas, up).await)
    }

    /// Under Sentinel: listens for `+switch-master` on the sentinels (one at a time, the next
    /// when one goes away) and follows at once, until `stop`.
    pub async fn listen_for_switches(&self, stop: tokio_util::sync::CancellationToken) {
        let Shape::Sentinel(sentinel) = &self.hub.topology else {
            return;
        };
        let master_name = &sentinel.master_name;
        let mut backoff = crate::backoff::Backoff::default();
        loop {
            // Built afresh each round: a TLS reload may have replaced the files.
            let sentinels = self.hub.sentinel_clients().unwrap_or_default();
            for (address, client) in &sentinels {
                let listened = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe("+switch-master").await?;
                    let mut messages = pubsub.on_message();
                    while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
                        let text: String = message.get_payload().unwrap_or_default();
                        // `<master name> <old ip> <old port> <new ip> <new port>`
                        if text.split(' ').next() == Some(master_name.as_str()) {
                            info!(sentinel = %address, switch = %text, "Sentinel announced a new master");
                            let _ = self.hub.check(true).await;
                        }
                    }
                    Ok::<_, redis::RedisError>(())
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = listened => {}
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next()) => {}
            }
        }
    }
}

/// A connection for questions to a sentinel (kept while it answers) or one to a candidate
/// master: quick to give up.
async fn short_connection(client: &Client) -> Result<MultiplexedConnection, redis::RedisError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(Duration::from_secs(2)));
    client.get_multiplexed_async_connection_with_config(&config).await
}

impl Hub {
    /// A client for each sentinel, with the sentinels' own credentials (none without Sentinel).
    pub(super) fn sentinel_clients(&self) -> Result<Vec<(String, Client)>, QueueError> {
        let Topology::Sentinel {
            sentinels,
            username,
            password,
            ..
        } = &self.settings.topology
        else {
            return Ok(Vec::new());
        };
        let tls = self.certificates();
        sentinels
            .iter()
            .map(|(host, port)| {
                let client = client_for(
                    &self.settings,
                    host,
                    *port,
                    (username, password.expose()),
                    0,
                    tls.as_ref(),
                )?;
                Ok((format!("{host}:{port}"), client))
            })
            .collect()
    }

    /// Runs `cmd` on the sentinel that answered last, then on each sentinel in turn; the
    /// first answer `take` accepts wins, and its connection is kept for next time. Else the
    /// last error.
    async fn ask_sentinels<T, R>(
        &self,
        sentinel: &Sentinel,
        cmd: &redis::Cmd,
        take: impl Fn(T) -> Result<R, redis::RedisError>,
    ) -> Result<R, QueueError>
    where
        T: redis::FromRedisValue,
    {
        let kept = sentinel.kept().clone();
        if let Some(mut conn) = kept {
            if let Ok(taken) = cmd.query_async::<T>(&mut conn).await.and_then(&take) {
                return Ok(taken);
            }
            sentinel.forget_kept();
        }
        let mut last = None;
        for (_, client) in self.sentinel_clients()? {
            let answer = async {
                let mut conn = short_connection(&client).await?;
                let answer = cmd.query_async::<T>(&mut conn).await?;
                take(answer).map(|taken| (conn, taken))
            };
            match answer.await {
                Ok((conn, taken)) => {
                    *sentinel.kept() = Some(conn);
                    return Ok(taken);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(QueueError::Redis(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Client, "no sentinels are configured"))
        })))
    }

    /// Asks the sentinels for the master's address; the first that knows it wins.
    async fn ask(&self) -> Result<Server, QueueError> {
        let Shape::Sentinel(sentinel) = &self.topology else {
            return Err(QueueError::Redis(redis::RedisError::from((
                redis::ErrorKind::Client,
                "no sentinels are configured",
            ))));
        };
        let master_name = &sentinel.master_name;
        let mut ask = redis::cmd("SENTINEL");
        ask.arg("GET-MASTER-ADDR-BY-NAME").arg(master_name);
        let known = |address: Option<Server>| {
            address.ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "the sentinels do not know this master name; \
                     check redis.sentinel_master (REDIS_SENTINEL_MASTER)",
                    master_name.clone(),
                ))
            })
        };
        self.ask_sentinels(sentinel, &ask, known).await
    }

    /// Checks that `address` is a master: a sentinel's answer can run ahead of the promotion.
    /// `ROLE` is an `@admin` command that courier's ACL user need not have: when it is denied,
    /// `INFO replication` (which the user has) says the same, as redis-rs's own Sentinel
    /// client does.
    async fn master_client(&self, address: &Server) -> Result<(), QueueError> {
        let mut conn = short_connection(&self.server_client(address)?).await?;
        let is_master = match redis::cmd("ROLE").query_async::<Vec<Value>>(&mut conn).await {
            Ok(role) => matches!(role.first(), Some(Value::BulkString(role)) if role.as_slice() == b"master"),
            Err(e) if e.code() == Some("NOPERM") => {
                let info: String = redis::cmd("INFO").arg("replication").query_async(&mut conn).await?;
                info.lines().any(|line| line.trim() == "role:master")
            }
            Err(e) => return Err(e.into()),
        };
        match is_master {
            true => Ok(()),
            false => Err(QueueError::Redis(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the address the sentinels gave is not a master (yet); asking again",
                format!("{}:{}", address.0, address.1),
            )))),
        }
    }

    /// The first master: asks the sentinels, checks that it is one, and sends new links there.
    /// The caller holds `asking` and has no link yet.
    pub(super) async fn find_master(&self) -> Result<(), QueueError> {
        let master = self.ask().await?;
        self.master_client(&master).await?;
        info!(master = %format!("{}:{}", master.0, master.1), "Sentinel: following master");
        self.write_links().set_server(master);
        Ok(())
    }

    /// Asks the sentinels where the master is and, when it has moved, moves every link there.
    /// `now`: ask even if the sentinels were asked a moment ago.
    pub(super) async fn check(&self, now: bool) -> Result<(), QueueError> {
        let mut asked = self.asking.lock().await;
        if !now && asked.is_some_and(|at| at.elapsed() < FOLLOW_GAP) {
            return Ok(());
        }
        *asked = Some(Instant::now());
        let address = self.ask().await?;
        let old = self.current_server();
        if old.as_ref() == Some(&address) {
            return Ok(());
        }
        self.master_client(&address).await?;
        self.replace_links(Some(&address)).await?;
        warn!(
            old = %old.map(|(h, p)| format!("{h}:{p}")).unwrap_or_default(),
            new = %format!("{}:{}", address.0, address.1),
            "Redis master changed (Sentinel); following it. This worker's processing lists will \
             be swept for messages the failover did not carry over"
        );
        if let Shape::Sentinel(sentinel) = &self.topology {
            sentinel.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }
}
