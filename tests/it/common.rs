//! Test harness: `courier::devtools::harness` (a private redis-server per test, certificates
//! made at test time) in temp dirs, the reference mTLS main server, and ways to run the worker
//! in-process or as the real binary.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use courier::config::Settings;
use courier::devtools::harness;
use courier::devtools::sink::{Behaviour, Sink};
use courier::tls::ClientTls;
use courier::worker::{RunError, Worker};
use redis::AsyncCommands;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(30);

/// The queue every test uses (each test has a Redis of its own).
pub const Q: &str = "message_queue";

/// The Redis keys of `Q`, named as the worker names them.
pub fn keys() -> courier::queue::Keys {
    courier::queue::Keys::new(Q)
}

pub fn free_port() -> u16 {
    harness::free_port().expect("a free port")
}

/// A redis-server of the test's own (the harness the demo and bench use too), on a free port,
/// in a temp dir; killed on drop.
pub struct RedisServer {
    server: harness::RedisServer,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for RedisServer {
    type Target = harness::RedisServer;
    fn deref(&self) -> &harness::RedisServer {
        &self.server
    }
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::start_with(&["--appendonly", "no"]).await
    }

    /// Starts with extra arguments (e.g. `--appendonly yes`, `--requirepass x`).
    pub async fn start_with(args: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = harness::RedisServer::start(dir.path(), args)
            .await
            .unwrap_or_else(|e| panic!("redis-server: {e:#}"));
        RedisServer { server, _dir: dir }
    }

    /// Stops the server (SIGKILL) and waits for it to be gone.
    pub async fn kill(&mut self) {
        self.server.kill().await;
    }

    /// Starts the server again on the same port and directory.
    pub async fn restart(&mut self) {
        self.server
            .restart()
            .await
            .unwrap_or_else(|e| panic!("redis-server: {e:#}"));
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis")
    }
}

/// A throwaway PKI (the harness's) in a temp dir of its own, which tests also use for logs and
/// other files.
pub struct Pki {
    pki: harness::Pki,
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for Pki {
    type Target = harness::Pki;
    fn deref(&self) -> &harness::Pki {
        &self.pki
    }
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = harness::Pki::write(dir.path(), "worker-test").expect("PKI");
        Pki { pki, dir }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    }
}

pub async fn start_sink(pki: &Pki, behaviour: Behaviour) -> Sink {
    Sink::start("127.0.0.1:0".parse().expect("addr"), &pki.sink_tls(), behaviour)
        .await
        .expect("sink starts")
}

/// The environment a test worker runs with: everything pointed at the test's own parts.
pub fn env(
    redis: &RedisServer,
    sink_url: &str,
    pki: &Pki,
    worker_id: &str,
    extra: &[(&str, &str)],
) -> HashMap<String, String> {
    env_at(redis.port, sink_url, pki, worker_id, extra)
}

/// `env` for a Redis on `port` that is not one `RedisServer` (a cluster or sentinels then come
/// in `extra`).
pub fn env_at(
    port: u16,
    sink_url: &str,
    pki: &Pki,
    worker_id: &str,
    extra: &[(&str, &str)],
) -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = [
        ("REDIS_HOST", "127.0.0.1".to_string()),
        ("REDIS_PORT", port.to_string()),
        ("MAIN_SERVER_URL", sink_url.to_string()),
        ("WORKER_ID", worker_id.to_string()),
        ("WORKER_CERT_PATH", pki.cert_file.display().to_string()),
        ("WORKER_KEY_PATH", pki.key_file.display().to_string()),
        ("CA_CERT_PATH", pki.ca_file.display().to_string()),
        ("WORKER_METRICS_PORT", "0".to_string()),
        ("WORKER_METRICS_BIND", "127.0.0.1".to_string()),
        ("WORKER_RETRY_INTERVAL", "0.2".to_string()),
        ("WORKER_HEARTBEAT_INTERVAL", "0.2".to_string()),
        ("WORKER_DEAD_AFTER", "2".to_string()),
        ("LOG_FILE_PATH", pki.dir.path().join("logs").display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    vars
}

pub fn settings(vars: &HashMap<String, String>) -> Settings {
    let lookup = |name: &str| vars.get(name).cloned();
    Settings::load(None, &lookup).unwrap_or_else(|e| panic!("test settings: {e}"))
}

/// A worker running in this process.
pub struct InProcess {
    pub shutdown: CancellationToken,
    pub admin: Option<SocketAddr>,
    pub task: tokio::task::JoinHandle<Result<(), RunError>>,
}

/// A worker in this process on the test's Redis and main server, with `extra` settings.
pub async fn worker_on(
    redis: &RedisServer,
    sink: &Sink,
    pki: &Pki,
    worker_id: &str,
    extra: &[(&str, &str)],
) -> InProcess {
    start_worker(&env(redis, &sink.url(), pki, worker_id, extra)).await
}

pub async fn start_worker(vars: &HashMap<String, String>) -> InProcess {
    let settings = settings(vars);
    let tls = ClientTls::load(&settings.tls).unwrap_or_else(|e| panic!("test TLS: {e}"));
    let shutdown = CancellationToken::new();
    let worker = Worker::start(settings, Some(tls), shutdown.clone())
        .await
        .expect("worker starts");
    let admin = courier::admin::open(worker.settings(), courier::admin::Served::of(&worker))
        .await
        .expect("admin port opens");
    InProcess {
        shutdown,
        admin,
        task: tokio::spawn(worker.run()),
    }
}

impl InProcess {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("worker stops in time")
            .expect("worker task");
        result.expect("worker ran cleanly");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin.expect("admin port enabled"))
    }
}

/// GET over plain HTTP (the admin port).
pub async fn get(url: &str) -> (u16, String) {
    // Plain reqwest clients need a process-wide crypto provider even for http://.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::get(url).await.expect("admin port answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// A number from a section of Redis's `INFO` (`connected_clients` under `clients`, say).
pub async fn info_number(conn: &mut redis::aio::MultiplexedConnection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg(section).query_async(conn).await.expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in INFO {section}"))
}

/// Waits for a condition on state that announces no event (Redis contents), checking every
/// 20 ms until WAIT runs out.
pub async fn eventually<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A message in the documented format.
pub fn message(id: &str) -> String {
    format!(
        r#"{{"message_id":"{id}","payload":{{"n":"{id}"}},"queued_at":{}}}"#,
        chrono::Utc::now().timestamp()
    )
}

/// LPUSHes items in order (so the first is delivered first).
pub async fn enqueue(redis: &RedisServer, queue: &str, items: &[String]) {
    let mut conn = redis.conn().await;
    for chunk in items.chunks(1000) {
        let _: () = conn.lpush(queue, chunk).await.expect("LPUSH");
    }
}

/// Message ids found in a list or sorted set of messages.
pub async fn ids_in(redis: &RedisServer, key: &str) -> BTreeSet<String> {
    let mut conn = redis.conn().await;
    let kind: String = redis::cmd("TYPE").arg(key).query_async(&mut conn).await.expect("TYPE");
    let items: Vec<String> = match kind.as_str() {
        "list" => conn.lrange(key, 0, -1).await.expect("LRANGE"),
        "zset" => conn.zrange(key, 0, -1).await.expect("ZRANGE"),
        _ => Vec::new(),
    };
    items
        .iter()
        .filter_map(|item| serde_json::from_str::<serde_json::Value>(item).ok())
        .filter_map(|v| v["message_id"].as_str().map(str::to_string))
        .collect()
}

/// The SHA-1 Redis computes for `item`: the key of its reclaim count in `Q:reclaims`.
pub async fn redis_sha1(conn: &mut redis::aio::MultiplexedConnection, item: &str) -> String {
    redis::cmd("EVAL")
        .arg("return redis.sha1hex(ARGV[1])")
        .arg(0)
        .arg(item)
        .query_async(conn)
        .await
        .expect("sha1")
}

pub async fn len(redis: &RedisServer, key: &str) -> usize {
    let mut conn = redis.conn().await;
    let kind: String = redis::cmd("TYPE").arg(key).query_async(&mut conn).await.expect("TYPE");
    match kind.as_str() {
        "list" => conn.llen(key).await.expect("LLEN"),
        "zset" => conn.zcard(key).await.expect("ZCARD"),
        "hash" => conn.hlen(key).await.expect("HLEN"),
        _ => 0,
    }
}

/// Dead-letter records, newest first: each record's header fields, with the original item
/// under `message` (lossily as text; `raw_dead_letters` has the bytes).
pub async fn dead_letters(redis: &RedisServer, queue: &str) -> Vec<serde_json::Value> {
    raw_dead_letters(redis, queue)
        .await
        .into_iter()
        .map(|record| {
            assert!(record.fields.is_object(), "courier wrote this record: {record:?}");
            let mut fields = record.fields;
            fields["message"] = String::from_utf8_lossy(&record.message).into_owned().into();
            fields
        })
        .collect()
}

/// Dead-letter records, newest first, read as `courier dlq` reads them.
pub async fn raw_dead_letters(redis: &RedisServer, queue: &str) -> Vec<courier::message::DeadRecord> {
    let mut conn = redis.conn().await;
    let items: Vec<Vec<u8>> = conn
        .lrange(courier::queue::Keys::new(queue).dead, 0, -1)
        .await
        .expect("LRANGE");
    items.iter().map(|i| courier::message::parse_dead_letter(i)).collect()
}

/// The real binary, with only the given environment and a working directory of its own.
pub fn courier(vars: &HashMap<String, String>, cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_courier"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs the real binary with `args` to completion; panics if it takes longer than WAIT.
pub async fn run_courier(vars: &HashMap<String, String>, dir: &Path, args: &[&str]) -> std::process::Output {
    tokio::time::timeout(WAIT, courier(vars, dir).args(args).output())
        .await
        .expect("exits in time")
        .expect("runs")
}

/// Starts `courier run` as its own process, stdout piped for `Lines`.
pub fn spawn_worker(vars: &HashMap<String, String>, dir: &Path) -> Child {
    courier(vars, dir)
        .arg("run")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn courier")
}

/// SIGTERM, then asserts a clean exit (0) within WAIT.
pub async fn stop_worker(mut child: Child) {
    signal(&child, "TERM");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status}");
}

/// Sends a signal to a child process by pid.
pub fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("child still running");
    let status = std::process::Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -s {name} {pid}");
}

/// Reads a child's stdout line by line, keeping every line, until `done` matches one.
pub struct Lines {
    pub seen: Vec<String>,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Lines {
    pub fn new(child: &mut Child) -> Lines {
        Lines {
            seen: Vec::new(),
            lines: BufReader::new(child.stdout.take().expect("stdout piped")).lines(),
        }
    }

    /// Waits for a line containing `needle`; returns it.
    pub async fn wait_for(&mut self, needle: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                self.seen.push(line.clone());
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!("no line containing {needle:?}; saw:\n{}", self.seen.join("\n")),
        }
    }

    /// Reads the rest of the output.
    pub async fn rest(&mut self) {
        let _ = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                self.seen.push(line);
            }
        })
        .await;
    }
}

/// The ACL rules README.md documents for one topology (`single`, `sentinel`, `sentinel-user`,
/// `cluster`): the `ACL SETUSER` line in the fenced block right under `<!-- acl:NAME -->`,
/// without `ACL SETUSER <user>`, its `>PASSWORD` replaced with `>password`. The tests create
/// users from these, so the README and what is tested cannot drift apart.
pub fn readme_acl(topology: &str, password: &str) -> Vec<String> {
    let readme = include_str!("../../README.md");
    let marker = format!("<!-- acl:{topology} -->");
    let mut found = readme.split(marker.as_str());
    let after = found.nth(1).unwrap_or_else(|| panic!("README.md has no {marker}"));
    assert!(found.next().is_none(), "README.md has {marker} twice");
    let mut lines = after.lines().map(str::trim).filter(|l| !l.is_empty());
    assert_eq!(lines.next(), Some("```"), "a fenced block right under {marker}");
    let line = lines.next().unwrap_or_default();
    let rules = line
        .strip_prefix("ACL SETUSER ")
        .unwrap_or_else(|| panic!("an ACL SETUSER line under {marker}: {line}"));
    rules
        .split_whitespace()
        .skip(1)
        .map(|rule| match rule.starts_with('>') {
            true => format!(">{password}"),
            false => rule.to_string(),
        })
        .collect()
}

/// Creates (or replaces) the ACL user `name` with `rules` on the Redis at `port`.
pub async fn set_acl_user(port: u16, name: &str, rules: &[String]) {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(name)
        .arg("reset")
        .arg(rules)
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("ACL SETUSER {name} {rules:?}: {e}"));
}
