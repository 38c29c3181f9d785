//! Reaching Redis in each of its shapes: one server, a master watched by Sentinel (followed
//! through failovers), or a Redis Cluster. Everything above this module talks to a `Conn`,
//! which is one of the three and runs commands and scripts the same way.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisFuture, Value};
use tokio::sync::watch;
use tracing::{info, warn};

use super::QueueError;
use crate::config::{RedisSettings, Topology};

/// How long connecting to any Redis node or sentinel may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Asking the sentinels again after a failure waits at least this long since the last asking,
/// so a burst of failed commands costs one round of questions.
const FOLLOW_GAP: Duration = Duration::from_millis(250);

const REDIS_CA: &str = "redis.ca_file (REDIS_CA_CERT_PATH)";
const REDIS_CERT: &str = "redis.cert_file (REDIS_CERT_PATH)";
const REDIS_KEY: &str = "redis.key_file (REDIS_KEY_PATH)";

/// A connection to Redis in whichever shape it has. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Sentinel(Followed),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
            Conn::Sentinel(followed) => Box::pin(async move {
                let mut conn = followed.current();
                let result = conn.req_packed_command(cmd).await;
                followed.after(&result).await;
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(followed) => Box::pin(async move {
                let mut conn = followed.current();
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                followed.after(&result).await;
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
            Conn::Sentinel(followed) => followed.current().get_db(),
        }
    }
}

/// Makes connections to Redis as the settings describe; the TLS files are read and checked
/// when it is built, so a bad file is one line naming its setting.
#[derive(Clone)]
pub struct Connector {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Single(Box<Client>),
    Sentinel(Arc<Follow>),
    Cluster(Arc<ClusterSeeds>),
}

/// What a cluster client is built from (the builder itself cannot be kept and cloned).
struct ClusterSeeds {
    seeds: Vec<redis::ConnectionInfo>,
    username: String,
    password: String,
    tls: Option<redis::TlsCertificates>,
}

impl ClusterSeeds {
    fn builder(&self, response_timeout: Duration) -> ClusterClientBuilder {
        let mut builder = ClusterClient::builder(self.seeds.clone())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(response_timeout)
            .retries(6)
            .min_retry_wait(100)
            .max_retry_wait(2_000);
        if !self.username.is_empty() {
            builder = builder.username(&self.username);
        }
        if !self.password.is_empty() {
            builder = builder.password(&self.password);
        }
        if let Some(tls) = &self.tls {
            builder = builder.tls(redis::TlsMode::Secure).certs(tls.clone());
        }
        builder
    }
}

impl Connector {
    pub fn new(settings: &RedisSettings) -> Result<Connector, QueueError> {
        let tls = tls_files(settings)?;
        let kind = match &settings.topology {
            Topology::Single => Kind::Single(Box::new(client_for(
                settings,
                &settings.host,
                settings.port,
                (&settings.username, settings.password.expose()),
                settings.db,
                tls.as_ref(),
            )?)),
            Topology::Sentinel {
                sentinels,
                master,
                username,
                password,
            } => {
                let sentinels = sentinels
                    .iter()
                    .map(|(host, port)| {
                        let client = client_for(settings, host, *port, (username, password.expose()), 0, tls.as_ref())?;
                        Ok((format!("{host}:{port}"), client))
                    })
                    .collect::<Result<Vec<_>, QueueError>>()?;
                Kind::Sentinel(Arc::new(Follow {
                    settings: settings.clone(),
                    tls,
                    sentinels,
                    master_name: master.clone(),
                    state: RwLock::new(Followed::empty_state()),
                    asking: tokio::sync::Mutex::new(None),
                    changes: watch::channel(0).0,
                }))
            }
            Topology::Cluster { nodes } => {
                let seeds = nodes
                    .iter()
                    .map(|(host, port)| ConnectionAddr::Tcp(host.clone(), *port).into_connection_info())
                    .collect::<Result<Vec<_>, _>>()?;
                Kind::Cluster(Arc::new(ClusterSeeds {
                    seeds,
                    username: settings.username.clone(),
                    password: settings.password.expose().to_string(),
                    tls,
                }))
            }
        };
        Ok(Connector { kind })
    }

    /// Whether the queues live in a Redis Cluster (their derived keys then carry hash tags).
    pub fn clustered(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// A new connection whose commands may take up to `response_timeout` to be answered.
    pub async fn connect(&self, response_timeout: Duration) -> Result<Conn, QueueError> {
        match &self.kind {
            Kind::Single(client) => Ok(Conn::Single(
                client
                    .get_connection_manager_with_config(manager_config(response_timeout))
                    .await?,
            )),
            Kind::Sentinel(follow) => Ok(Conn::Sentinel(follow.clone().connect(response_timeout).await?)),
            Kind::Cluster(seeds) => Ok(Conn::Cluster(
                seeds.builder(response_timeout).build()?.get_async_connection().await?,
            )),
        }
    }

    /// Under Sentinel: a counter that goes up each time the worker follows the master to a new
    /// address. Whatever this worker wrote to the old master and the failover did not carry
    /// over is found again by sweeping its processing lists when it changes.
    pub fn master_changes(&self) -> Option<watch::Receiver<u64>> {
        match &self.kind {
            Kind::Sentinel(follow) => Some(follow.changes.subscribe()),
            _ => None,
        }
    }

    /// Under Sentinel: asks the sentinels now whether the master has moved, and follows it.
    /// The heartbeat calls this, so a master that was replaced while still answering (cut off
    /// from the sentinels, not down) is left within one heartbeat.
    pub async fn check_master(&self) -> Result<(), QueueError> {
        match &self.kind {
            Kind::Sentinel(follow) => follow.check(true).await,
            _ => Ok(()),
        }
    }

    /// Under Sentinel: the master's address as the sentinels give it now, without following.
    pub async fn sentinel_master(&self) -> Option<Result<(String, u16), QueueError>> {
        match &self.kind {
            Kind::Sentinel(follow) => Some(follow.ask().await),
            _ => None,
        }
    }

    /// Under Sentinel: how many replicas the sentinels see up for the master.
    pub async fn sentinel_replicas(&self) -> Option<Result<usize, QueueError>> {
        let Kind::Sentinel(follow) = &self.kind else {
            return None;
        };
        let mut last = None;
        for (_, client) in &follow.sentinels {
            let asked = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                let replicas: Vec<std::collections::HashMap<String, String>> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg(&follow.master_name)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, redis::RedisError>(replicas)
            };
            match asked.await {
                Ok(replicas) => {
                    let up = replicas
                        .iter()
                        .filter(|r| {
                            let flags = r.get("flags").map_or("", String::as_str);
                            !flags.contains("s_down") && !flags.contains("o_down") && !flags.contains("disconnected")
                        })
                        .count();
                    return Some(Ok(up));
                }
                Err(e) => last = Some(e),
            }
        }
        last.map(|e| Err(QueueError::Redis(e)))
    }

    /// Under Sentinel: listens for `+switch-master` on the sentinels (one at a time, the next
    /// when one goes away) and follows at once, until `stop`.
    pub async fn listen_for_switches(&self, stop: tokio_util::sync::CancellationToken) {
        let Kind::Sentinel(follow) = &self.kind else {
            return;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            for (address, client) in &follow.sentinels {
                let listened = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe("+switch-master").await?;
                    let mut messages = pubsub.on_message();
                    while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
                        let text: String = message.get_payload().unwrap_or_default();
                        // `<master name> <old ip> <old port> <new ip> <new port>`
                        if text.split(' ').next() == Some(follow.master_name.as_str()) {
                            info!(sentinel = %address, switch = %text, "Sentinel announced a new master");
                            let _ = follow.check(true).await;
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
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
        .set_response_timeout(Some(response_timeout))
}

/// The CA and client certificate for TLS to Redis, read and checked; `None` without TLS.
fn tls_files(settings: &RedisSettings) -> Result<Option<redis::TlsCertificates>, QueueError> {
    let Some(tls) = &settings.tls else {
        return Ok(None);
    };
    crate::tls::install_default_provider();
    let read = |setting: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| crate::tls::TlsError::unreadable(setting, path, e))
    };
    let root_cert = match &tls.ca_file {
        Some(path) => {
            crate::tls::read_certs(REDIS_CA, path)?;
            Some(read(REDIS_CA, path)?)
        }
        None => None,
    };
    let client_tls = match &tls.client {
        Some((cert, key)) => {
            crate::tls::read_certs(REDIS_CERT, cert)?;
            crate::tls::read_key(REDIS_KEY, key)?;
            Some(redis::ClientTlsConfig {
                client_cert: read(REDIS_CERT, cert)?,
                client_key: read(REDIS_KEY, key)?,
            })
        }
        None => None,
    };
    Ok(Some(redis::TlsCertificates { client_tls, root_cert }))
}

/// A client for one server (a Redis or a sentinel) with the given credentials, over TLS when
/// the settings ask for it.
fn client_for(
    settings: &RedisSettings,
    host: &str,
    port: u16,
    (username, password): (&str, &str),
    db: i64,
    tls: Option<&redis::TlsCertificates>,
) -> Result<Client, QueueError> {
    let mut redis = RedisConnectionInfo::default().set_db(db);
    if !username.is_empty() {
        redis = redis.set_username(username);
    }
    if !password.is_empty() {
        redis = redis.set_password(password);
    }
    let (Some(_), Some(certificates)) = (&settings.tls, tls) else {
        let info = ConnectionAddr::Tcp(host.to_string(), port)
            .into_connection_info()?
            .set_redis_settings(redis);
        return Ok(Client::open(info)?);
    };
    let info = ConnectionAddr::TcpTls {
        host: host.to_string(),
        port,
        insecure: false,
        tls_params: None,
    }
    .into_connection_info()?
    .set_redis_settings(redis);
    Ok(Client::build_with_tls(info, certificates.clone())?)
}

/// A connection that follows the Sentinel-watched master. Commands go to the current master;
/// a command that fails as if the master were gone (refused, reset, READONLY: it became a
/// replica) makes the follower ask the sentinels, and the caller's retry reaches the new one.
#[derive(Clone)]
pub struct Followed {
    follow: Arc<Follow>,
    /// This connection's place in the follower's list.
    index: usize,
}

struct Follow {
    settings: RedisSettings,
    tls: Option<redis::TlsCertificates>,
    sentinels: Vec<(String, Client)>,
    master_name: String,
    state: RwLock<State>,
    /// Held while the sentinels are asked; when they last were.
    asking: tokio::sync::Mutex<Option<Instant>>,
    changes: watch::Sender<u64>,
}

/// The master followed now and one connection manager on it per `Followed`.
struct State {
    master: Option<(String, u16)>,
    conns: Vec<(Duration, ConnectionManager)>,
}

impl Followed {
    fn empty_state() -> State {
        State {
            master: None,
            conns: Vec::new(),
        }
    }

    fn current(&self) -> ConnectionManager {
        let state = self
            .follow
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // `index` is only ever handed out for a connection already in the list.
        state.conns[self.index].1.clone()
    }

    async fn after<T>(&self, result: &Result<T, redis::RedisError>) {
        if let Err(e) = result {
            let lost = e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"));
            if lost {
                let _ = self.follow.check(false).await;
            }
        }
    }
}

impl Follow {
    /// Asks each sentinel in turn for the master's address; the first answer wins.
    async fn ask(&self) -> Result<(String, u16), QueueError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let mut last = None;
        for (_, client) in &self.sentinels {
            let answer = async {
                let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
                let address: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.master_name)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, redis::RedisError>(address)
            };
            match answer.await {
                Ok(Some(address)) => return Ok(address),
                Ok(None) => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "the sentinels do not know this master name; check redis.sentinel_master (REDIS_SENTINEL_MASTER)",
                        self.master_name.clone(),
                    )));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(QueueError::Redis(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Client, "no sentinels are configured"))
        })))
    }

    /// A connection to `address` that checks it is a master.
    async fn master_client(&self, (host, port): &(String, u16)) -> Result<Client, QueueError> {
        let settings = &self.settings;
        let client = client_for(
            settings,
            host,
            *port,
            (&settings.username, settings.password.expose()),
            settings.db,
            self.tls.as_ref(),
        )?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        match role.first() {
            Some(Value::BulkString(role)) if role.as_slice() == b"master" => Ok(client),
            _ => Err(QueueError::Redis(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the address the sentinels gave is not a master (yet); asking again",
                format!("{host}:{port}"),
            )))),
        }
    }

    /// A new connection on the current master (found first if need be).
    async fn connect(self: Arc<Self>, response_timeout: Duration) -> Result<Followed, QueueError> {
        let _asking = self.asking.lock().await;
        let master = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .master
            .clone();
        let master = match master {
            Some(master) => master,
            None => self.ask().await?,
        };
        let client = self.master_client(&master).await?;
        let manager = client
            .get_connection_manager_with_config(manager_config(response_timeout))
            .await?;
        let mut state = self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.master.as_ref() != Some(&master) {
            info!(master = %format!("{}:{}", master.0, master.1), name = %self.master_name, "Sentinel: following master");
            state.master = Some(master);
        }
        state.conns.push((response_timeout, manager));
        let index = state.conns.len() - 1;
        drop(state);
        Ok(Followed {
            follow: self.clone(),
            index,
        })
    }

    /// Asks the sentinels where the master is and, when it has moved, moves every connection
    /// there. `now`: ask even if the sentinels were asked a moment ago.
    async fn check(&self, now: bool) -> Result<(), QueueError> {
        let mut asked = self.asking.lock().await;
        if !now && asked.is_some_and(|at| at.elapsed() < FOLLOW_GAP) {
            return Ok(());
        }
        *asked = Some(Instant::now());
        let address = self.ask().await?;
        let (old, timeouts) = {
            let state = self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if state.master.as_ref() == Some(&address) {
                return Ok(());
            }
            (
                state.master.clone(),
                state.conns.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            )
        };
        let client = self.master_client(&address).await?;
        let mut conns = Vec::with_capacity(timeouts.len());
        for timeout in timeouts {
            conns.push((
                timeout,
                client
                    .get_connection_manager_with_config(manager_config(timeout))
                    .await?,
            ));
        }
        {
            let mut state = self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            state.master = Some(address.clone());
            state.conns = conns;
        }
        warn!(
            name = %self.master_name,
            old = %old.map(|(h, p)| format!("{h}:{p}")).unwrap_or_default(),
            new = %format!("{}:{}", address.0, address.1),
            "Redis master changed (Sentinel); following it. This worker's processing lists will be swept for messages the failover did not carry over"
        );
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }
}
