//! Reaching Redis in each of its shapes: one server, a master watched by Sentinel (followed
//! through failovers), or a Redis Cluster. Everything above this module talks to a `Conn`,
//! which is one of the three and runs commands and scripts the same way.
//!
//! Here: `Conn`, its links and the `Connector` that makes them; `links` (which server the links
//! go to, and the links themselves, pure and tested); `sentinel` (asking the sentinels,
//! following the master); `tls` (the files for TLS to Redis, and a client per server).

mod links;
mod sentinel;
mod tls;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisFuture, Value};

use self::links::{Links, Server};
use self::sentinel::Sentinel;
use self::tls::{client_for, tls_files};
use super::QueueError;
use crate::config::{RedisSettings, Topology};

/// How long connecting to any Redis node or sentinel may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
        let closed = self.hub.write_links().close(self.index);
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
        // `index` is only ever handed out for a link in the list, the list never shrinks,
        // and a link is closed only when the last handle on it goes: never while one exists.
        crate::sync::read(&self.0.hub.links)
            .get(self.0.index)
            .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Client, "this Redis connection was closed")))
    }

    /// After a failed command under Sentinel: one that fails as if the master were gone
    /// (`super::unavailable`: refused, reset, READONLY because it became a replica, NOREPLICAS
    /// because it was cut off from them) makes the hub ask the sentinels, so the caller's
    /// retry reaches the new master.
    async fn after<T>(&self, result: &Result<T, redis::RedisError>) {
        let Err(e) = result else {
            return;
        };
        if matches!(self.0.hub.topology, Shape::Sentinel(_)) && super::unavailable(e) {
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
    /// A master the sentinels name, followed through failovers (`sentinel.rs`).
    Sentinel(Sentinel),
    Cluster {
        seeds: Vec<redis::ConnectionInfo>,
    },
}

/// Everything a connector's connections share: the settings, the TLS material in use, and
/// every link it has made, so that all of them can be moved together.
struct Hub {
    settings: RedisSettings,
    topology: Shape,
    /// The CA and client certificate in use; replaced by `reload_tls`.
    tls: RwLock<Option<redis::TlsCertificates>>,
    /// Which server the links go to, and the links.
    links: RwLock<Links<Link>>,
    /// Held while links are being replaced or added; when the sentinels were last asked.
    asking: tokio::sync::Mutex<Option<Instant>>,
}

impl Connector {
    /// A connector for `settings`, with the TLS files read and every client built once, so a
    /// setting that cannot make one fails here. Connects to nothing yet.
    pub fn new(settings: &RedisSettings) -> Result<Connector, QueueError> {
        let tls = tls_files(settings)?;
        let topology = match &settings.topology {
            Topology::Single => Shape::Single,
            Topology::Sentinel { master, .. } => Shape::Sentinel(Sentinel::new(master)),
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
            links: RwLock::new(Links::new(server)),
            asking: tokio::sync::Mutex::new(None),
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
        if matches!(hub.topology, Shape::Sentinel(_)) && hub.current_server().is_none() {
            hub.find_master().await?;
        }
        let link = hub.link(hub.current_server().as_ref(), response_timeout).await?;
        let index = hub.write_links().add(response_timeout, link);
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
        if let Shape::Sentinel(sentinel) = &hub.topology {
            // The next question to a sentinel goes on a connection made with the new files.
            sentinel.forget_kept();
        }
        let previous = std::mem::replace(&mut *crate::sync::write(&hub.tls), tls);
        let server = hub.current_server();
        if let Err(e) = hub.replace_links(server.as_ref()).await {
            *crate::sync::write(&hub.tls) = previous;
            return Err(e);
        }
        Ok(())
    }
}

fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
        .set_response_timeout(Some(response_timeout))
}

impl Hub {
    fn write_links(&self) -> std::sync::RwLockWriteGuard<'_, Links<Link>> {
        crate::sync::write(&self.links)
    }

    fn current_server(&self) -> Option<Server> {
        crate::sync::read(&self.links).server().cloned()
    }

    fn certificates(&self) -> Option<redis::TlsCertificates> {
        crate::sync::read(&self.tls).clone()
    }

    /// A client for the Redis at `server`, with courier's user and database.
    fn server_client(&self, (host, port): &Server) -> Result<Client, QueueError> {
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

    /// A new link to `server` (or to the cluster).
    async fn link(&self, server: Option<&Server>, response_timeout: Duration) -> Result<Link, QueueError> {
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
    async fn replace_links(&self, server: Option<&Server>) -> Result<(), QueueError> {
        let open = crate::sync::read(&self.links).open();
        let mut links = Vec::with_capacity(open.len());
        for (index, timeout) in open {
            links.push((index, self.link(server, timeout).await?));
        }
        self.write_links().switch(server.cloned(), links);
        Ok(())
    }
}
