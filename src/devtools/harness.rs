//! What the demo, the benchmark and the integration tests run courier against: a private
//! redis-server on a free port, and a throwaway PKI (a CA, a server certificate for localhost
//! and a worker client certificate) written to a directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::devtools::sink::SinkTls;
use crate::pki::{write_private, Authority, Issued, Validity};

/// A port nothing listens on at the moment of asking.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A redis-server of our own on a free port, keeping its files in a directory of the caller's;
/// killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    /// A sentinel (`redis-server sentinel.conf --sentinel`) rather than a Redis.
    sentinel: Option<PathBuf>,
}

impl RedisServer {
    /// Starts redis-server with extra arguments (`--appendonly yes`, `--requirepass x`, ...).
    /// The port was free when chosen; if another process takes it before redis-server binds
    /// it, redis-server exits at once and a fresh port is tried.
    pub async fn start(dir: &Path, args: &[&str]) -> anyhow::Result<RedisServer> {
        RedisServer::start_on(dir, args, free_port).await
    }

    /// Starts redis-server on a port `choose` picks, trying again on another if it is taken.
    async fn start_on(dir: &Path, args: &[&str], choose: fn() -> std::io::Result<u16>) -> anyhow::Result<RedisServer> {
        let mut server = RedisServer {
            child: None,
            port: choose()?,
            dir: dir.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            sentinel: None,
        };
        for _ in 0..5 {
            if server.spawn().await? {
                return Ok(server);
            }
            server.port = choose()?;
        }
        bail!("redis-server did not start on five free ports");
    }

    /// Starts redis-server on `self.port`; `false` when it exited before it was ready.
    async fn spawn(&mut self) -> anyhow::Result<bool> {
        let mut command = Command::new("redis-server");
        if let Some(config) = &self.sentinel {
            command.arg(config).arg("--sentinel");
        }
        let mut child = command
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--logfile",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context(
                "redis-server could not be started; install it \
                 (Debian: apt-get install redis-server)",
            )?;
        let mut lines = BufReader::new(child.stdout.take().context("redis-server output")?).lines();
        let ready = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Ready to accept connections") || line.contains("+monitor master") {
                    return true;
                }
            }
            false
        };
        if !tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .unwrap_or(false)
        {
            return Ok(false);
        }
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        Ok(true)
    }

    /// Stops the server (SIGKILL) and waits for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port and directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        if !self.spawn().await? {
            bail!("redis-server did not start again on port {}", self.port);
        }
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// `127.0.0.1:<port>` of each server.
fn addresses(servers: &[RedisServer]) -> Vec<String> {
    servers.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect()
}

/// `dir/name`, made if missing: each node of a cluster or sentinel set keeps its files apart.
fn subdirectory(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::create_dir_all(&path).with_context(|| format!("cannot make {}", path.display()))?;
    Ok(path)
}

/// A free port for a cluster node: below 55535, with its bus port (port + 10000) free too.
pub fn free_cluster_port() -> std::io::Result<u16> {
    for _ in 0..500 {
        let port = free_port()?;
        if port < 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free port below 55535 with a free bus port"))
}

/// A Redis Cluster of `masters` nodes (no replicas), each a redis-server of its own in a
/// subdirectory, made with `redis-cli --cluster create`; killed when dropped.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    /// Starts the nodes, joins them into a cluster covering every slot, and waits until each
    /// node reports `cluster_state:ok`. `args` go to every node.
    pub async fn start(dir: &Path, masters: usize, args: &[&str]) -> anyhow::Result<Cluster> {
        let mut nodes = Vec::with_capacity(masters);
        for i in 0..masters {
            let node_dir = subdirectory(dir, &format!("node-{i}"))?;
            let mut node_args = vec!["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];
            node_args.extend_from_slice(args);
            nodes.push(RedisServer::start_on(&node_dir, &node_args, free_cluster_port).await?);
        }
        let cluster = Cluster { nodes };
        let create = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(addresses(&cluster.nodes))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .context(
                "redis-cli could not be started; install it \
                 (Debian: apt-get install redis-tools)",
            )?;
        if !create.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&create.stdout)
            );
        }
        // Nodes learn of each other by gossip: ask each until it says the cluster is whole.
        let settled = async {
            for node in &cluster.nodes {
                let client = redis::Client::open(node.url())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                loop {
                    let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn).await?;
                    if info.contains("cluster_state:ok") {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Ok::<_, redis::RedisError>(())
        };
        tokio::time::timeout(Duration::from_secs(30), settled)
            .await
            .context("the cluster did not reach cluster_state:ok within 30 s")??;
        Ok(cluster)
    }

    /// The seed list for REDIS_CLUSTER_NODES.
    pub fn seeds(&self) -> String {
        addresses(&self.nodes).join(",")
    }
}

/// A master, `replicas` replicas and `sentinels` sentinels watching the master as `mymaster`
/// (quorum 2, down after 1 s), each a process of its own; killed when dropped.
pub struct Sentinels {
    pub master: RedisServer,
    pub replicas: Vec<RedisServer>,
    pub sentinels: Vec<RedisServer>,
}

impl Sentinels {
    pub async fn start(dir: &Path, replicas: usize, sentinels: usize, args: &[&str]) -> anyhow::Result<Sentinels> {
        let master = RedisServer::start(&subdirectory(dir, "master")?, args).await?;
        let master_port = master.port.to_string();
        let mut started = Vec::with_capacity(replicas);
        for i in 0..replicas {
            let mut replica_args = vec!["--replicaof", "127.0.0.1", master_port.as_str()];
            replica_args.extend_from_slice(args);
            started.push(RedisServer::start(&subdirectory(dir, &format!("replica-{i}"))?, &replica_args).await?);
        }
        let mut watching = Vec::with_capacity(sentinels);
        for i in 0..sentinels {
            let sentinel_dir = subdirectory(dir, &format!("sentinel-{i}"))?;
            let config = sentinel_dir.join("sentinel.conf");
            std::fs::write(
                &config,
                format!(
                    "sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 4000\n\
                     sentinel parallel-syncs mymaster 1\n"
                ),
            )
            .context("sentinel.conf")?;
            let mut server = RedisServer {
                child: None,
                port: free_port()?,
                dir: sentinel_dir,
                args: Vec::new(),
                sentinel: Some(config),
            };
            if !server.spawn().await? {
                bail!("a sentinel did not start");
            }
            watching.push(server);
        }
        Ok(Sentinels {
            master,
            replicas: started,
            sentinels: watching,
        })
    }

    /// The list for REDIS_SENTINELS.
    pub fn addresses(&self) -> String {
        addresses(&self.sentinels).join(",")
    }
}

/// A throwaway PKI in a directory: `ca.crt`, `worker.crt` and `worker.key` (the worker's), and
/// `server.crt` and `server.key` (for `localhost` and `127.0.0.1`).
pub struct Pki {
    pub ca: Authority,
    pub server: Issued,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
}

impl Pki {
    /// Makes the certificates, the worker's with common name `worker`, and writes them to `dir`.
    pub fn write(dir: &Path, worker: &str) -> anyhow::Result<Pki> {
        let ca = Authority::new("courier throwaway CA")?;
        // The bench's network-namespace address too (`courier bench --rtt-ms`).
        let server = ca.issue_server(
            &["localhost", "127.0.0.1", super::netem::SERVER_IP],
            Validity::default(),
        )?;
        let client = ca.issue_client(worker, Validity::default())?;
        let path = |name: &str| dir.join(name);
        std::fs::write(path("ca.crt"), &ca.cert_pem)?;
        std::fs::write(path("worker.crt"), &client.cert_pem)?;
        write_private(&path("worker.key"), &client.key_pem)?;
        std::fs::write(path("server.crt"), &server.cert_pem)?;
        write_private(&path("server.key"), &server.key_pem)?;
        Ok(Pki {
            ca,
            server,
            ca_file: path("ca.crt"),
            cert_file: path("worker.crt"),
            key_file: path("worker.key"),
            server_cert_file: path("server.crt"),
            server_key_file: path("server.key"),
        })
    }

    /// The reference main server's TLS: the server certificate, requiring clients of this CA.
    pub fn sink_tls(&self) -> SinkTls {
        SinkTls {
            cert_pem: self.server.cert_pem.clone(),
            key_pem: self.server.key_pem.clone(),
            client_ca_pem: self.ca.cert_pem.clone(),
            http2: true,
        }
    }
}
