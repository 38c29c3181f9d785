//! Reaching Redis in each of its shapes: one server, a master watched by Sentinel (followed
//! through failovers), or a Redis Cluster. Everything above this module talks to a `Conn`,
//! which is one of the three and runs commands and scripts the same way.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisFuture, Value};
use tokio::sync::watch;
use tracing::{info, warn};

use super::QueueError;
use crate::config::{RedisSettings, Topology};
use crate::sync::lock;

/// How long connecting to any Redis node or sentinel may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Asking the sentinels again after a failure waits at least this long since the last asking,
/// so a burst of failed commands costs one round of questions.
const FOLLOW_GAP: Duration = Duration::from_millis(250);

const REDIS_CA: &str = "redis.ca_file (REDIS_CA_CERT_PATH)";
const REDIS_CERT: &str = "redis.cert_file (REDIS_CERT_PATH)";
const REDIS_KEY: &str = "redis.key_file (REDIS_KEY_PATH)";

/// A connection to Redis in whichever shape it has: a handle on one of its connector's links.
/// The connector can replace every link at once (the Sentinel master moved, or the TLS files
/// for Redis were reloaded); commands under way finish on the link they started on, and the
/// next ones use the new one. Cloning is cheap and shares the link. When the last clone is
/// dropped the link is closed, so a start-up attempt that failed halfway leaves no
/// connections behind.
#[derive(Clone)]
pub struct Conn(Arc<Slot>);

/// A link's place in the hub's list, held by every clone of one `Conn`.
struct Slot {
    hub: Arc<Hub>,
    index: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Taken out under the lock, closed after it.
        let closed = self
            .hub
            .write_state()
            .links
            .get_mut(self.index)
            .and_then(|link| link.1.take());
        drop(closed);
    }
}

/// One live connection: a self-reconnecting one to a single server, or a cluster client's.
#[derive(Clone)]
enum Link {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    fn link(&self) -> Result<Link, redis::RedisError> {
        let state = crate::sync::read(&self.0.hub.state);
        // `index` is only ever handed out for a link in the list, the list never shrinks,
        // and a link is closed only when the last handle on it goes: never while one exists.
        match state.links.get(self.0.index) {
            Some((_, Some(link))) => Ok(link.clone()),
            _ => Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "this Redis connection was closed",
            ))),
        }
    }

    /// After a failed command under Sentinel: one that fails as if the master were gone
    /// (`super::unavailable`: refused, reset, READONLY because it became a replica, NOREPLICAS
    /// because it was cut off from them) makes the hub ask the sentinels, so the caller's
    /// retry reaches the new master.
    async fn after<T>(&self, result: &Result<T, redis::RedisError>) {
        let Err(e) = result else {
            return;
        };
        if matches!(self.0.hub.topology, Shape::Sentinel { .. }) && super::unavailable(e) {
            let _ = self.0.hub.check(false).await;
        }
    }

    /// The cluster connection under this one, in Cluster mode (for routing a command by hand).
    pub(super) fn cluster(&self) -> Option<ClusterConnection> {
        match self.link() {
            Ok(Link::Cluster(conn)) => Some(conn),
            _ => None,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = match self.link() {
                Ok(Link::Server(mut conn)) => conn.req_packed_command(cmd).await,
                Ok(Link::Cluster(mut conn)) => conn.req_packed_command(cmd).await,
                Err(e) => Err(e),
            };
            self.after(&result).await;
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = match self.link() {
                Ok(Link::Server(mut conn)) => conn.req_packed_commands(pipeline, offset, count).await,
                Ok(Link::Cluster(mut conn)) => conn.req_packed_commands(pipeline, offset, count).await,
                Err(e) => Err(e),
            };
            self.after(&result).await;
            result
        })
    }

    fn get_db(&self) -> i64 {
        match self.link() {
            Ok(Link::Server(conn)) => conn.get_db(),
            Ok(Link::Cluster(conn)) => conn.get_db(),
            Err(_) => self.0.hub.settings.db,
        }
    }
}

/// Makes connections to Redis as the settings describe; the TLS files are read and checked
/// when it is built, so a bad file is one line naming its setting.
#[derive(Clone)]
pub struct Connector {
    hub: Arc<Hub>,
}

/// Where Redis is, as the hub reaches it.
enum Shape {
    Single,
    Sentinel { master_name: String },
    Cluster { seeds: Vec<redis::ConnectionInfo> },
}

/// Everything a connector's connections share: the settings, the TLS material in use, and
/// every link it has made, so that all of them can be moved together.
struct Hub {
    settings: RedisSettings,
    topology: Shape,
    /// The CA and client certificate in use; replaced by `reload_tls`.
    tls: RwLock<Option<redis::TlsCertificates>>,
    state: RwLock<State>,
    /// Held while links are being replaced or added; when the sentinels were last asked.
    asking: tokio::sync::Mutex<Option<Instant>>,
    /// Counts moves to a new Sentinel master.
    changes: watch::Sender<u64>,
    /// The connection to the sentinel that answered last, asked first next time: the
    /// heartbeat asks the sentinels every interval, and a connection each time would be a
    /// TCP (and TLS) handshake each time.
    sentinel: std::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

/// The server the links go to (the master under Sentinel; unused in a cluster) and the links,
/// each with the response timeout it was made with; `None` where the last handle on a link
/// was dropped (a place the next connection takes).
struct State {
    server: Option<(String, u16)>,
    links: Vec<(Duration, Option<Link>)>,
}

impl Connector {
    pub fn new(settings: &RedisSettings) -> Result<Connector, QueueError> {
        let tls = tls_files(settings)?;
        let topology = match &settings.topology {
            Topology::Single => Shape::Single,
            Topology::Sentinel { master, .. } => Shape::Sentinel {
                master_name: master.clone(),
            },
            Topology::Cluster { nodes } => Shape::Cluster {
                seeds: nodes
                    .iter()
                    .map(|(host, port)| ConnectionAddr::Tcp(host.clone(), *port).into_connection_info())
                    .collect::<Result<Vec<_>, _>>()?,
            },
        };
        let server = match topology {
            Shape::Single => Some((settings.host.clone(), settings.port)),
            _ => None,
        };
        let hub = Hub {
            settings: settings.clone(),
            topology,
            tls: RwLock::new(tls),
            state: RwLock::new(State {
                server,
                links: Vec::new(),
            }),
            asking: tokio::sync::Mutex::new(None),
            sentinel: std::sync::Mutex::new(None),
            changes: watch::channel(0).0,
        };
        // Every client is built once here, so a setting that cannot make one fails at start.
        if let Some(server) = hub.current_server() {
            hub.server_client(&server)?;
        }
        hub.sentinel_clients()?;
        Ok(Connector { hub: Arc::new(hub) })
    }

    /// Whether the queues live in a Redis Cluster (their derived keys then carry hash tags).
    pub fn clustered(&self) -> bool {
        matches!(self.hub.topology, Shape::Cluster { .. })
    }

    /// Whether Redis is reached over TLS (and `reload_tls` has files to read).
    pub fn tls(&self) -> bool {
        self.hub.settings.tls.is_some()
    }

    /// A new connection whose commands may take up to `response_timeout` to be answered.
    pub async fn connect(&self, response_timeout: Duration) -> Result<Conn, QueueError> {
        let hub = &self.hub;
        let _adding = hub.asking.lock().await;
        if matches!(hub.topology, Shape::Sentinel { .. }) && hub.current_server().is_none() {
            let master = hub.ask().await?;
            hub.master_client(&master).await?;
            info!(master = %format!("{}:{}", master.0, master.1), "Sentinel: following master");
            hub.write_state().server = Some(master);
        }
        let link = (
            response_timeout,
            Some(hub.link(hub.current_server().as_ref(), response_timeout).await?),
        );
        let mut state = hub.write_state();
        let index = match state.links.iter().position(|(_, link)| link.is_none()) {
            Some(free) => {
                state.links[free] = link;
                free
            }
            None => {
                state.links.push(link);
                state.links.len() - 1
            }
        };
        drop(state);
        Ok(Conn(Arc::new(Slot {
            hub: hub.clone(),
            index,
        })))
    }

    /// Reads the TLS files for Redis again and moves every connection onto new ones made with
    /// them. Files that do not load are refused and the connections stay as they are.
    pub async fn reload_tls(&self) -> Result<(), QueueError> {
        let hub = &self.hub;
        let tls = tls_files(&hub.settings)?;
        let _replacing = hub.asking.lock().await;
        // The next question to a sentinel goes on a connection made with the new files.
        *hub.kept_sentinel() = None;
        let previous = std::mem::replace(&mut *crate::sync::write(&hub.tls), tls);
        let server = hub.current_server();
        if let Err(e) = hub.replace_links(server.as_ref()).await {
            *crate::sync::write(&hub.tls) = previous;
            return Err(e);
        }
        Ok(())
    }

    /// Under Sentinel: a counter that goes up each time the worker follows the master to a new
    /// address. Whatever this worker wrote to the old master and the failover did not carry
    /// over is found again by sweeping its processing lists when it changes.
    pub fn master_changes(&self) -> Option<watch::Receiver<u64>> {
        match self.hub.topology {
            Shape::Sentinel { .. } => Some(self.hub.changes.subscribe()),
            _ => None,
        }
    }

    /// Under Sentinel: asks the sentinels now whether the master has moved, and follows it.
    /// The heartbeat calls this, so a master that was replaced while still answering (cut off
    /// from the sentinels, not down) is left within one heartbeat.
    pub async fn check_master(&self) -> Result<(), QueueError> {
        match self.hub.topology {
            Shape::Sentinel { .. } => self.hub.check(true).await,
            _ => Ok(()),
        }
    }

    /// Under Sentinel: the master's address as the sentinels give it now, without following.
    pub async fn sentinel_master(&self) -> Option<Result<(String, u16), QueueError>> {
        match self.hub.topology {
            Shape::Sentinel { .. } => Some(self.hub.ask().await),
            _ => None,
        }
    }
    /// Under Sentinel: how many replicas the sentinels see up for the master.
    pub async fn sentinel_replicas(&self) -> Option<Result<usize, QueueError>> {
        let Shape::Sentinel { master_name } = &self.hub.topology else {
            return None;
        };
        let mut replicas = redis::cmd("SENTINEL");
        replicas.arg("REPLICAS").arg(master_name);
        Some(
            self.hub
                .ask_sentinels(&replicas, |replicas: Vec<std::collections::HashMap<String, String>>| {
                    Ok(replicas
                        .iter()
                        .filter(|r| {
                            let flags = r.get("flags").map_or("", String::as_str);
                            !flags.contains("s_down") && !flags.contains("o_down") && !flags.contains("disconnected")
                        })
                        .count())
                })
                .await,
        )
    }

    /// Under Sentinel: listens for `+switch-master` on the sentinels (one at a time, the next
    /// when one goes away) and follows at once, until `stop`.
    pub async fn listen_for_switches(&self, stop: tokio_util::sync::CancellationToken) {
        let Shape::Sentinel { master_name } = &self.hub.topology else {
            return;
        };
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
async fn short_connection(client: &Client) -> Result<redis::aio::MultiplexedConnection, redis::RedisError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(Duration::from_secs(2)));
    client.get_multiplexed_async_connection_with_config(&config).await
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

impl Hub {
    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        crate::sync::write(&self.state)
    }

    fn current_server(&self) -> Option<(String, u16)> {
        crate::sync::read(&self.state).server.clone()
    }

    fn certificates(&self) -> Option<redis::TlsCertificates> {
        crate::sync::read(&self.tls).clone()
    }

    /// A client for the Redis at `server`, with courier's user and database.
    fn server_client(&self, (host, port): &(String, u16)) -> Result<Client, QueueError> {
        let settings = &self.settings;
        client_for(
            settings,
            host,
            *port,
            (&settings.username, settings.password.expose()),
            settings.db,
            self.certificates().as_ref(),
        )
    }

    /// A client for each sentinel, with the sentinels' own credentials (none without Sentinel).
    fn sentinel_clients(&self) -> Result<Vec<(String, Client)>, QueueError> {
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

    /// A new link to `server` (or to the cluster).
    async fn link(&self, server: Option<&(String, u16)>, response_timeout: Duration) -> Result<Link, QueueError> {
        match (&self.topology, server) {
            (Shape::Cluster { seeds }, _) => {
                let settings = &self.settings;
                let mut builder = ClusterClient::builder(seeds.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(response_timeout)
                    .retries(6)
                    .min_retry_wait(100)
                    .max_retry_wait(2_000);
                if !settings.username.is_empty() {
                    builder = builder.username(&settings.username);
                }
                if !settings.password.is_empty() {
                    builder = builder.password(settings.password.expose());
                }
                if let (Some(_), Some(tls)) = (&settings.tls, self.certificates()) {
                    builder = builder.tls(redis::TlsMode::Secure).certs(tls);
                }
                Ok(Link::Cluster(builder.build()?.get_async_connection().await?))
            }
            (_, Some(server)) => Ok(Link::Server(
                self.server_client(server)?
                    .get_connection_manager_with_config(manager_config(response_timeout))
                    .await?,
            )),
            (_, None) => Err(QueueError::Redis(redis::RedisError::from((
                redis::ErrorKind::Client,
                "no Redis server to connect to yet",
            )))),
        }
    }

    /// Replaces every link with a new one to `server`, all or none.
    /// Callers hold `asking`, so no link is added meanwhile; one whose last handle goes
    /// meanwhile stays closed.
    async fn replace_links(&self, server: Option<&(String, u16)>) -> Result<(), QueueError> {
        let open: Vec<(usize, Duration)> = crate::sync::read(&self.state)
            .links
            .iter()
            .enumerate()
            .filter(|(_, (_, link))| link.is_some())
            .map(|(i, (t, _))| (i, *t))
            .collect();
        let mut links = Vec::with_capacity(open.len());
        for (index, timeout) in open {
            links.push((index, self.link(server, timeout).await?));
        }
        let mut state = self.write_state();
        state.server = server.cloned();
        for (index, link) in links {
            if let Some((_, place @ Some(_))) = state.links.get_mut(index) {
                *place = Some(link);
            }
        }
        Ok(())
    }

    fn kept_sentinel(&self) -> std::sync::MutexGuard<'_, Option<redis::aio::MultiplexedConnection>> {
        lock(&self.sentinel)
    }

    /// Runs `cmd` on the sentinel that answered last, then on each sentinel in turn; the
    /// first answer `take` accepts wins, and its connection is kept for next time. Else the
    /// last error.
    async fn ask_sentinels<T, R>(
        &self,
        cmd: &redis::Cmd,
        take: impl Fn(T) -> Result<R, redis::RedisError>,
    ) -> Result<R, QueueError>
    where
        T: redis::FromRedisValue,
    {
        let kept = self.kept_sentinel().clone();
        if let Some(mut conn) = kept {
            if let Ok(taken) = cmd.query_async::<T>(&mut conn).await.and_then(&take) {
                return Ok(taken);
            }
            *self.kept_sentinel() = None;
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
                    *self.kept_sentinel() = Some(conn);
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
    async fn ask(&self) -> Result<(String, u16), QueueError> {
        let Shape::Sentinel { master_name } = &self.topology else {
            return Err(QueueError::Redis(redis::RedisError::from((
                redis::ErrorKind::Client,
                "no sentinels are configured",
            ))));
        };
        let mut ask = redis::cmd("SENTINEL");
        ask.arg("GET-MASTER-ADDR-BY-NAME").arg(master_name);
        self.ask_sentinels(&ask, |address: Option<(String, u16)>| {
            address.ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "the sentinels do not know this master name; check redis.sentinel_master (REDIS_SENTINEL_MASTER)",
                    master_name.clone(),
                ))
            })
        })
        .await
    }

    /// Checks that `address` is a master: a sentinel's answer can run ahead of the promotion.
    /// `ROLE` is an `@admin` command that courier's ACL user need not have: when it is denied,
    /// `INFO replication` (which the user has) says the same, as redis-rs's own Sentinel
    /// client does.
    async fn master_client(&self, address: &(String, u16)) -> Result<(), QueueError> {
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

    /// Asks the sentinels where the master is and, when it has moved, moves every link there.
    /// `now`: ask even if the sentinels were asked a moment ago.
    async fn check(&self, now: bool) -> Result<(), QueueError> {
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
            "Redis master changed (Sentinel); following it. This worker's processing lists will be swept for messages the failover did not carry over"
        );
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }
}
