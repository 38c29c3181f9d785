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
}

impl RedisServer {
    /// Starts redis-server with extra arguments (`--appendonly yes`, `--requirepass x`, ...).
    /// The port was free when chosen; if another process takes it before redis-server binds
    /// it, redis-server exits at once and a fresh port is tried.
    pub async fn start(dir: &Path, args: &[&str]) -> anyhow::Result<RedisServer> {
        let mut server = RedisServer {
            child: None,
            port: free_port()?,
            dir: dir.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        for _ in 0..5 {
            if server.spawn().await? {
                return Ok(server);
            }
            server.port = free_port()?;
        }
        bail!("redis-server did not start on five free ports");
    }

    /// Starts redis-server on `self.port`; `false` when it exited before it was ready.
    async fn spawn(&mut self) -> anyhow::Result<bool> {
        let mut child = Command::new("redis-server")
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
            .context("redis-server could not be started; install it (Debian: apt-get install redis-server)")?;
        let mut lines = BufReader::new(child.stdout.take().context("redis-server output")?).lines();
        let ready = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Ready to accept connections") {
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
        let server = ca.issue_server(&["localhost", "127.0.0.1"], Validity::default())?;
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
