//! A main server a round trip away, for `courier bench --rtt-ms`: on loopback every request
//! answers within microseconds, which hides what concurrency and HTTP/2 are for.
//!
//! The real thing is a network namespace holding the main server, joined to this one by a
//! veth pair with `tc netem` delaying each direction by half the round trip (needs root, the
//! `ip` and `tc` commands of iproute2, and a kernel with sch_netem). Where that cannot be made,
//! a delay proxy stands in: it holds every chunk of bytes for half the round trip in each
//! direction, in order, at the cost of its own CPU on the same machine.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The main server's address inside the namespace (the bench's server certificate names it).
pub(super) const SERVER_IP: &str = "10.201.0.2";
const HOST_IP: &str = "10.201.0.1";

/// A network namespace behind a delayed veth pair; removed (with the pair) when dropped.
pub(super) struct Namespace {
    name: String,
}

impl Namespace {
    /// Makes the namespace and the delayed link, or says why it cannot.
    pub(super) fn create(rtt: Duration) -> anyhow::Result<Namespace> {
        let id = std::process::id();
        let namespace = Namespace {
            name: format!("courier-bench-{id}"),
        };
        let (host, peer) = (format!("cb{id}h"), format!("cb{id}p"));
        let half = format!("{}us", rtt.as_micros() / 2);
        let (host_net, server_net) = (format!("{HOST_IP}/24"), format!("{SERVER_IP}/24"));
        let inside = ["ip", "netns", "exec", namespace.name.as_str()];
        let steps: Vec<Vec<&str>> = vec![
            vec!["ip", "netns", "add", &namespace.name],
            vec!["ip", "link", "add", &host, "type", "veth", "peer", "name", &peer],
            vec!["ip", "link", "set", &peer, "netns", &namespace.name],
            vec!["ip", "addr", "add", &host_net, "dev", &host],
            vec!["ip", "link", "set", &host, "up"],
            [&inside[..], &["ip", "addr", "add", &server_net, "dev", &peer]].concat(),
            [&inside[..], &["ip", "link", "set", &peer, "up"]].concat(),
            [&inside[..], &["ip", "link", "set", "lo", "up"]].concat(),
            vec![
                "tc", "qdisc", "add", "dev", &host, "root", "netem", "delay", &half, "limit", "100000",
            ],
            [
                &inside[..],
                &[
                    "tc", "qdisc", "add", "dev", &peer, "root", "netem", "delay", &half, "limit", "100000",
                ],
            ]
            .concat(),
        ];
        for step in steps {
            let output = Command::new(step[0])
                .args(&step[1..])
                .output()
                .with_context(|| format!("cannot run {} (install iproute2)", step[0]))?;
            if !output.status.success() {
                // `namespace` is dropped here, which removes what was made so far.
                bail!(
                    "`{}` failed: {}",
                    step.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
        Ok(namespace)
    }

    /// The command prefix that runs a program inside the namespace.
    pub(super) fn exec(&self) -> [&str; 4] {
        ["ip", "netns", "exec", self.name.as_str()]
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Listens on 127.0.0.1 and forwards every connection to `target`, each direction delayed by
/// half of `rtt`. Returns the port; the proxy runs until the runtime ends.
pub(super) async fn delay_proxy(target: std::net::SocketAddr, rtt: Duration) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let half = rtt / 2;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(delayed(client_read, server_write, half));
                delayed(server_read, client_write, half).await;
            });
        }
    });
    Ok(port)
}

/// Copies `from` to `to`, each chunk written `delay` after it was read, in order.
async fn delayed(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((read_at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(read_at + delay).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buffer).await {
        if n == 0 || tx.send((Instant::now(), buffer[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
