//! The main server a drain delivers to: the reference one (`courier sink`, started for the
//! run, with the network in front of it) or an external one the bench did not start.

use std::path::Path;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::rig::signal;
use super::{BenchOptions, External};
use crate::devtools::harness::{free_port, Pki};
use crate::devtools::netem;

/// The main server a drain delivers to.
pub(super) struct Server {
    pub(super) url: String,
    /// Its process, when the bench started it: its CPU time is counted.
    pub(super) pid: Option<u32>,
    pub(super) ca: PathBuf,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

impl Server {
    /// A reference main server the bench started, reached with the bench's own PKI.
    fn reference(sink: &SinkProcess, pki: &Pki) -> Server {
        Server {
            url: sink.url.clone(),
            pid: sink.child.id(),
            ca: pki.ca_file.clone(),
            cert: pki.cert_file.clone(),
            key: pki.key_file.clone(),
        }
    }

    /// A main server the bench did not start, reached with the files given for it.
    fn external(external: &External) -> Server {
        let External { url, ca, cert, key } = external;
        Server {
            url: url.trim_end_matches('/').to_string(),
            pid: None,
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }
    }
}

/// The main servers of a run: the one the measured drains deliver to, and the reference
/// servers the bench started (which stop when this is dropped).
pub(super) struct MainServers {
    /// Where the measured drains deliver.
    pub(super) server: Server,
    /// The reference main server behind `server`; none with --main-server.
    sink: Option<SinkProcess>,
    /// With --paired and a failing share, a clean reference main server for the clean drain
    /// of each pair.
    clean: Option<SinkProcess>,
    /// Where the clean drains deliver.
    pub(super) clean_server: Option<Server>,
}

impl MainServers {
    /// The external main server when one is given, else a reference one answering
    /// `fail_share` of attempts with 503; and a clean one when pairs are asked for.
    pub(super) async fn start(
        options: &BenchOptions,
        exe: &Path,
        pki: &Pki,
        network: &Network,
    ) -> anyhow::Result<MainServers> {
        let (sink, server) = match &options.main_server {
            Some(external) => (None, Server::external(external)),
            None => {
                let sink = SinkProcess::start(exe, pki, options.fail_share, network).await?;
                let server = Server::reference(&sink, pki);
                (Some(sink), server)
            }
        };
        let clean = match options.paired && options.fail_share > 0.0 {
            true => Some(SinkProcess::start(exe, pki, 0.0, network).await?),
            false => None,
        };
        let clean_server = clean.as_ref().map(|sink| Server::reference(sink, pki));
        Ok(MainServers {
            server,
            sink,
            clean,
            clean_server,
        })
    }

    /// Whether the bench started the main server: only the reference one reads the payloads'
    /// timestamps and measures enqueue-to-delivery latency.
    pub(super) fn measures_latency(&self) -> bool {
        self.sink.is_some()
    }

    /// Stops the reference main servers; returns the fields of the last `latency_us` line
    /// the measured one printed as it stopped, if any.
    pub(super) async fn stop(self) -> anyhow::Result<Option<String>> {
        let MainServers { sink, clean, .. } = self;
        let mut latency = None;
        if let Some(mut sink) = sink {
            signal(&sink.child, "INT")?;
            while let Ok(Some(line)) = sink.lines.next_line().await {
                if let Some(rest) = line.strip_prefix("latency_us ") {
                    latency = Some(rest.to_string());
                }
            }
            let _ = sink.child.wait().await;
        }
        drop(clean);
        Ok(latency)
    }
}

/// A reference main server process.
struct SinkProcess {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// Where the worker reaches it.
    url: String,
}

impl SinkProcess {
    /// Starts `courier sink` behind `network`, answering `fail_share` of attempts with 503,
    /// and waits until it listens.
    async fn start(exe: &Path, pki: &Pki, fail_share: f64, network: &Network) -> anyhow::Result<SinkProcess> {
        let port = free_port()?;
        let (mut command, host) = match network {
            Network::Netem(namespace, _) => {
                let [ip, netns, exec, name] = namespace.exec();
                let mut command = Command::new(ip);
                command.args([netns, exec, name]).arg(exe);
                (command, netem::SERVER_IP)
            }
            _ => (Command::new(exe), "127.0.0.1"),
        };
        let mut child = command
            .args([
                "sink",
                "--quiet",
                "--report-latency",
                "--listen",
                &format!("{host}:{port}"),
            ])
            .arg("--cert")
            .arg(&pki.server_cert_file)
            .arg("--key")
            .arg(&pki.server_key_file)
            .arg("--client-ca")
            .arg(&pki.ca_file)
            .args(["--fail-share", &fail_share.to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the reference main server")?;
        let mut lines = BufReader::new(child.stdout.take().context("sink output")?).lines();
        while let Some(line) = lines.next_line().await? {
            if line.contains("listening") {
                break;
            }
        }
        let url = match network {
            Network::Loopback => format!("https://localhost:{port}"),
            Network::Netem(..) => format!("https://{host}:{port}"),
            Network::Proxy(rtt) => {
                let proxy = netem::delay_proxy(([127, 0, 0, 1], port).into(), *rtt).await?;
                format!("https://localhost:{proxy}")
            }
        };
        Ok(SinkProcess { child, lines, url })
    }
}

/// What lies between the worker and the reference main server.
pub(super) enum Network {
    Loopback,
    /// A network namespace behind a veth pair with netem delay.
    Netem(netem::Namespace, Duration),
    /// A delay proxy in this process, where netem could not be set up.
    Proxy(Duration),
}

impl Network {
    /// Netem when it can be set up, else the delay proxy (saying why); loopback without `rtt`.
    pub(super) fn new(rtt: Option<Duration>) -> Network {
        let Some(rtt) = rtt else {
            return Network::Loopback;
        };
        match netem::Namespace::create(rtt) {
            Ok(namespace) => Network::Netem(namespace, rtt),
            Err(e) => {
                println!("netem is not available here ({e:#}); using a delay proxy instead");
                Network::Proxy(rtt)
            }
        }
    }

    /// For the report: loopback, or the round trip and how it is made.
    pub(super) fn describe(&self) -> String {
        let ms = |rtt: &Duration| rtt.as_secs_f64() * 1000.0;
        match self {
            Network::Loopback => "loopback".to_string(),
            Network::Netem(_, rtt) => format!("{:.1} ms round trip (netem)", ms(rtt)),
            Network::Proxy(rtt) => format!("{:.1} ms round trip (delay proxy)", ms(rtt)),
        }
    }

    /// The round trip put in front of the reference main server, if any.
    pub(super) fn rtt(&self) -> Option<Duration> {
        match self {
            Network::Loopback => None,
            Network::Netem(_, rtt) | Network::Proxy(rtt) => Some(*rtt),
        }
    }
}
