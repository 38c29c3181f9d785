//! `courier check`: validates a configuration the way `run` would use it, one line per check
//! with a fix on failure: config, TLS files, key match, chain, expiry, key permissions, Redis
//! (reachable, password, version) and a real mutual-TLS request to the main server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::UnixTime;

use crate::config::{ProcessEnv, Settings, Topology};
use crate::delivery::{probe, rustls_error, Client, DeliveryError};
use crate::telemetry::one_line;
use crate::tls::{self, ClientTls};

/// One check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Passes, with something to know.
    Warn,
    Fail,
}

/// One line of `courier check`.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Warn,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// `OK    name   detail`, and a `fix:` line under a failure.
    pub fn render(&self) -> String {
        let label = match self.verdict {
            Verdict::Pass => "OK  ",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        let mut line = format!("{label}  {:<14} {}", self.name, self.detail);
        if let Some(fix) = &self.fix {
            line.push_str(&format!("\n      fix: {fix}"));
        }
        line
    }
}

/// `courier check`: prints one line per check; exits 0 only when all pass.
pub(super) fn command(file: Option<PathBuf>) -> ExitCode {
    let runtime = match super::runtime(0) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let checks = runtime.block_on(run(file.as_deref()));
    for check in &checks {
        println!("{}", check.render());
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    if failed == 0 {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("{failed} check(s) failed");
        ExitCode::FAILURE
    }
}

/// Runs every check that can run; later checks that depend on a failed one are skipped.
pub async fn run(file: Option<&Path>) -> Vec<Check> {
    let mut checks = Vec::new();
    let settings = match Settings::load(file, &ProcessEnv) {
        Ok(settings) => {
            let source = file.map_or("defaults and environment (no config file)".to_string(), |f| {
                f.display().to_string()
            });
            checks.push(Check::pass("config", format!("loaded {source}")));
            settings
        }
        Err(e) => {
            checks.push(Check::fail("config", one_line(&e), "correct the setting named above"));
            return checks;
        }
    };

    let tls = if settings.tls.enabled {
        tls_checks(&settings, &mut checks)
    } else {
        None
    };
    checks.extend(redis_checks(&settings).await);
    if settings.tls.enabled {
        match &tls {
            Some(tls) => checks.push(main_server_check(&settings, tls).await),
            None => checks.push(Check::fail(
                "main server",
                "not tried: the TLS files are not usable",
                "fix the TLS checks above first",
            )),
        }
    }
    checks
}

/// File, key, chain, expiry and permission checks; the loaded set when they pass.
fn tls_checks(settings: &Settings, checks: &mut Vec<Check>) -> Option<ClientTls> {
    let t = &settings.tls;
    let mut files_ok = true;
    let certs = tls::read_certs("tls.cert_file (WORKER_CERT_PATH)", &t.cert_file);
    let cas = tls::read_certs("tls.ca_file (CA_CERT_PATH)", &t.ca_file);
    let key = tls::read_key("tls.key_file (WORKER_KEY_PATH)", &t.key_file);
    for (name, result, fix) in [
        (
            "certificate",
            certs
                .as_ref()
                .map(|c| format!("{} ({} in chain)", t.cert_file.display(), c.len()))
                .map_err(|e| one_line(e)),
            "point WORKER_CERT_PATH at the worker's PEM certificate",
        ),
        (
            "CA",
            cas.as_ref()
                .map(|c| format!("{} ({} certificates)", t.ca_file.display(), c.len()))
                .map_err(|e| one_line(e)),
            "point CA_CERT_PATH at the PEM CA that signed the main server's certificate",
        ),
        (
            "key",
            key.as_ref()
                .map(|_| t.key_file.display().to_string())
                .map_err(|e| one_line(e)),
            "point WORKER_KEY_PATH at the worker's PEM private key",
        ),
    ] {
        match result {
            Ok(detail) => checks.push(Check::pass(name, format!("readable: {detail}"))),
            Err(e) => {
                files_ok = false;
                checks.push(Check::fail(name, e, fix));
            }
        }
    }
    checks.push(key_permissions(&t.key_file));
    if !files_ok {
        return None;
    }

    let loaded = match ClientTls::load(t) {
        Ok(loaded) => {
            checks.push(Check::pass("key match", "the private key matches the certificate"));
            loaded
        }
        Err(e) => {
            checks.push(Check::fail(
                "key match",
                one_line(&e),
                "install the key that belongs to this certificate, or issue a new pair",
            ));
            return None;
        }
    };

    if let (Ok(certs), Ok(cas)) = (&certs, &cas) {
        checks.push(chain_check(certs, cas));
    }

    let left = loaded.not_after.duration_since(SystemTime::now()).unwrap_or_default();
    let days = left.as_secs() / 86_400;
    let expires = format!(
        "expires {} ({days} days left); {}",
        tls::rfc3339(loaded.not_after),
        loaded.subject
    );
    checks.push(if left < Duration::from_secs(14 * 86_400) {
        Check {
            name: "expiry",
            verdict: Verdict::Warn,
            detail: expires,
            fix: Some("issue a new certificate, replace the files and send SIGHUP".into()),
        }
    } else {
        Check::pass("expiry", expires)
    });
    Some(loaded)
}

/// Whether the worker's certificate chains to the configured CA. A main server with a
/// separate client CA would fail this and still accept the worker: the fix says so.
fn chain_check(
    certs: &[rustls_pki_types::CertificateDer<'static>],
    cas: &[rustls_pki_types::CertificateDer<'static>],
) -> Check {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        let _ = roots.add(ca.clone());
    }
    let verified = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider())
        .build()
        .map_err(|e| e.to_string())
        .and_then(|verifier| {
            verifier
                .verify_client_cert(&certs[0], &certs[1..], UnixTime::now())
                .map_err(|e| e.to_string())
        });
    match verified {
        Ok(_) => Check::pass("chain", "the certificate verifies against CA_CERT_PATH"),
        Err(e) => Check::fail(
            "chain",
            format!("the certificate does not verify against CA_CERT_PATH ({e})"),
            "issue the worker certificate from the main server's CA (or, if the main server trusts a separate client CA, check with that one)",
        ),
    }
}

/// The key may be read by its owner, and by its group (the README installs it 0640
/// root:courier, so the service reads it through its group and cannot change it); never by
/// anyone else, and never changed by anyone but its owner.
#[cfg(unix)]
fn key_permissions(path: &Path) -> Check {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o037 != 0 {
                Check::fail(
                    "key access",
                    format!("mode {mode:o}: other users can read or change the private key"),
                    format!(
                        "chmod 600 {path} (or chmod 640 {path} with the service's own group)",
                        path = path.display()
                    ),
                )
            } else if mode & 0o040 != 0 {
                Check::pass(
                    "key access",
                    format!(
                        "mode {mode:o}: its owner and group {} can read it; keep that group to the service",
                        meta.gid()
                    ),
                )
            } else {
                Check::pass("key access", format!("mode {mode:o}: only its owner can read it"))
            }
        }
        Err(e) => Check::fail(
            "key access",
            format!("cannot stat {} ({e})", path.display()),
            "see the key check",
        ),
    }
}

#[cfg(not(unix))]
fn key_permissions(path: &Path) -> Check {
    // Windows ACLs are not mode bits; NSSM services run as a dedicated account whose ACLs the
    // install script sets.
    Check::pass(
        "key access",
        format!("{}: not checked on this platform (use NTFS ACLs)", path.display()),
    )
}

/// Reachable with the credentials and new enough; under Sentinel, the master and its replicas;
/// in a cluster, its state; then, for each queue, the user's permissions, and whether Redis
/// keeps what it is given.
async fn redis_checks(settings: &Settings) -> Vec<Check> {
    let r = &settings.redis;
    let mut checks = Vec::new();
    let connector = match crate::queue::Connector::new(r) {
        Ok(connector) => connector,
        Err(e) => return vec![Check::fail("redis", one_line(&e), "correct the file the line names")],
    };
    if let Some(master) = connector.sentinel_master().await {
        match master {
            Ok((host, port)) => checks.push(Check::pass(
                "redis sentinel",
                format!("{} names {host}:{port} as the master", r.describe()),
            )),
            Err(e) => {
                checks.push(Check::fail(
                    "redis sentinel",
                    format!("{}: {}", r.describe(), one_line(&e)),
                    "start the sentinels, or correct REDIS_SENTINELS, REDIS_SENTINEL_MASTER and the sentinels' credentials",
                ));
                return checks;
            }
        }
        if let Some(Ok(replicas)) = connector.sentinel_replicas().await {
            checks.push(if replicas == 0 {
                Check {
                    name: "redis replicas",
                    verdict: Verdict::Warn,
                    detail: "the master has no healthy replica: a failover has nowhere to go, and whatever the master loses is lost".into(),
                    fix: Some("add a replica (replicaof) and let the sentinels see it".into()),
                }
            } else {
                Check::pass("redis replicas", format!("{replicas} healthy replica(s)"))
            });
        }
    }
    let (mut conn, _) = match super::connect(r).await {
        Ok(conn) => conn,
        Err(e) => {
            checks.push(Check::fail(
                "redis",
                e.to_string(),
                format!(
                    "start Redis or correct {}, REDIS_USERNAME and REDIS_PASSWORD",
                    r.where_settings()
                ),
            ));
            return checks;
        }
    };
    let reachable = redis_check(r, &mut conn).await;
    let passed = reachable.verdict == Verdict::Pass;
    checks.push(reachable);
    if !passed {
        return checks;
    }
    if connector.clustered() {
        checks.push(cluster_check(&mut conn).await);
    }
    let keys: Vec<crate::queue::Keys> = r
        .queues
        .iter()
        .map(|name| crate::queue::Keys::for_topology(name, connector.clustered()))
        .collect();
    checks.push(acl_check(&mut conn, &keys, &r.topology).await);
    checks.push(data_safety(&mut conn).await);
    checks
}

/// The cluster's own view of itself: `cluster_state:ok` and every slot served.
async fn cluster_check(conn: &mut crate::queue::Conn) -> Check {
    let texts = crate::queue::info_texts(conn, "CLUSTER", "INFO").await;
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
            .map(|v| v.trim().to_string())
    };
    match texts.first() {
        Some(text) if field(text, "cluster_state").as_deref() == Some("ok") => Check::pass(
            "redis cluster",
            format!(
                "state ok, {} slots served by {} masters",
                field(text, "cluster_slots_ok").unwrap_or_default(),
                field(text, "cluster_size").unwrap_or_default()
            ),
        ),
        Some(text) => Check::fail(
            "redis cluster",
            format!(
                "cluster_state is {}, {} of 16384 slots ok",
                field(text, "cluster_state").unwrap_or_default(),
                field(text, "cluster_slots_ok").unwrap_or_default()
            ),
            "bring the failed nodes back or fail over to their replicas (redis-cli --cluster check)",
        ),
        None => Check::fail(
            "redis cluster",
            "CLUSTER INFO gave no answer",
            "check REDIS_CLUSTER_NODES",
        ),
    }
}

/// Whether the Redis user may run every command courier uses on the queues' keys, asked of
/// Redis itself with `ACL DRYRUN` (Redis 7) through the list `run` checks at start. A user
/// that may not ask is told so, not failed.
async fn acl_check(conn: &mut crate::queue::Conn, keys: &[crate::queue::Keys], topology: &Topology) -> Check {
    use crate::queue::acl::Permissions;
    let readme = "README, \"The Redis courier runs on\", lists what it needs";
    match crate::queue::acl::check(conn, keys, topology).await {
        Permissions::Granted { user, commands } => Check::pass(
            "redis acl",
            format!("user {user} may run the {commands} commands courier uses on the queues' keys"),
        ),
        Permissions::Denied { user, missing } => Check::fail(
            "redis acl",
            format!("user {user} may not run {}", missing.join("; ")),
            "grant them (README, \"The Redis courier runs on\", has the ACL SETUSER line for each topology)",
        ),
        Permissions::Unknown { reason } => Check::warn("redis acl", format!("not verified: {reason}; {readme}")),
    }
}

/// Whether Redis could drop queued messages: an eviction policy other than `noeviction`, or
/// no persistence at all. Read from `INFO` (which managed services allow) and `CONFIG GET
/// save` where permitted. Warnings, not failures: a cache-only Redis may be a choice.
async fn data_safety(conn: &mut crate::queue::Conn) -> Check {
    // A cluster answers INFO for every master: all of them count.
    let memory = crate::queue::info_texts(conn, "INFO", "memory").await.join("\n");
    let persistence = crate::queue::info_texts(conn, "INFO", "persistence").await.join("\n");
    let save: Option<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async::<Vec<String>>(conn)
        .await
        .ok()
        .and_then(|reply| reply.get(1).cloned());
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    let policies: Vec<String> = memory
        .lines()
        .filter_map(|l| l.strip_prefix("maxmemory_policy:"))
        .map(|v| v.trim().to_string())
        .collect();
    match policies.iter().find(|p| p.as_str() != "noeviction") {
        None => {}
        Some(policy) => {
            problems.push(format!(
                "maxmemory-policy {policy} lets Redis evict queued messages when memory runs short"
            ));
            fixes.push("set maxmemory-policy noeviction".to_string());
        }
    }
    let aof = !persistence.is_empty()
        && persistence
            .lines()
            .filter(|l| l.starts_with("aof_enabled:"))
            .all(|l| l.trim() == "aof_enabled:1");
    if !aof && save.as_deref().is_some_and(|s| s.trim().is_empty()) {
        problems
            .push("persistence is off (no AOF, no RDB snapshots): a Redis restart loses every queued message".into());
        fixes.push("set appendonly yes (or RDB save points)".to_string());
    }
    if problems.is_empty() {
        return Check::pass(
            "redis data",
            "no eviction; persistence on (or not readable with this user)",
        );
    }
    Check {
        name: "redis data",
        verdict: Verdict::Warn,
        detail: problems.join("; "),
        fix: Some(fixes.join("; ")),
    }
}

async fn redis_check(r: &crate::config::RedisSettings, conn: &mut crate::queue::Conn) -> Check {
    match crate::queue::server_version(conn).await {
        Ok(version) => {
            if crate::queue::supported_version(&version) {
                Check::pass(
                    "redis",
                    format!("{} answers, version {version}, database {}", r.describe(), r.db),
                )
            } else {
                Check::fail(
                    "redis",
                    format!("{} runs Redis {version}", r.describe()),
                    "upgrade to Redis 6.2 or newer (courier uses LMOVE and BLMOVE)",
                )
            }
        }
        Err(e) => Check::fail(
            "redis",
            format!("{}: {e}", r.describe()),
            "check REDIS_PASSWORD and the user's permissions",
        ),
    }
}

/// A real request over mutual TLS: any HTTP answer proves the handshake (both ways) works.
async fn main_server_check(settings: &Settings, tls: &ClientTls) -> Check {
    let url = &settings.main_server.url;
    let client = match Client::new(&settings.main_server, Some(tls), 1) {
        Ok(client) => client,
        Err(e) => return Check::fail("main server", one_line(&e), "see the TLS checks above"),
    };
    // A server that refuses the worker's certificate says so in an alert after the TLS 1.3
    // handshake; the client may see the connection close before it reads that alert. A few
    // tries give the alert its chance to be read and named.
    let mut failed = None;
    for _ in 0..3 {
        match probe(&client, url).await {
            Ok(answer) => {
                return Check::pass(
                    "main server",
                    format!(
                        "mutual TLS with {url} works (HTTP {} for GET /)",
                        answer.status.as_u16()
                    ),
                )
            }
            Err(e) => {
                let named = rustls_error(&e).is_some();
                failed = Some(e);
                if named {
                    break;
                }
            }
        }
    }
    let Some(error) = failed else {
        return Check::fail("main server", "no answer", "check MAIN_SERVER_URL");
    };
    let tls = rustls_error(&error).map(|tls| tls_fix(tls, url.host_str().unwrap_or("")));
    let closed = closed_without_answer(&error);
    let fix = match (tls, &error) {
        (Some(fix), _) => fix,
        (None, DeliveryError::Connect(_)) => "start the main server or correct MAIN_SERVER_URL".to_string(),
        (None, DeliveryError::Timeout(_)) => {
            "the main server did not answer in time: check the host, port and firewall".to_string()
        }
        (None, _) if closed => "the main server closed the connection without answering: it most likely refused the worker certificate; check that it trusts the CA that issued WORKER_CERT_PATH, and MAIN_SERVER_URL".to_string(),
        (None, _) => "check MAIN_SERVER_URL".to_string(),
    };
    Check::fail("main server", one_line(&error), fix)
}

/// Whether the connection closed before any answer came: what a TLS 1.3 server that refuses
/// the client certificate looks like when its alert is not read in time.
fn closed_without_answer(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::delivery::find_cause(error, &mut |e| {
        let hyper_closed = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_canceled() || h.is_incomplete_message() || h.is_closed());
        let io_closed = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
            matches!(
                io.kind(),
                BrokenPipe | ConnectionAborted | ConnectionReset | UnexpectedEof
            )
        });
        (hyper_closed || io_closed).then_some(())
    })
    .is_some()
}

/// What to do about a failed handshake with the main server, by what rustls says went wrong.
fn tls_fix(error: &rustls::Error, host: &str) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    match error {
        Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
            "the main server's certificate is not signed by CA_CERT_PATH: point CA_CERT_PATH at its CA".to_string()
        }
        Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => format!(
            "the main server's certificate does not name {host}: use the name it was issued for in MAIN_SERVER_URL, or reissue it with {host} as a subject alternative name"
        ),
        Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "the main server's certificate has expired: renew it on the main server (or check this machine's clock)"
                .to_string()
        }
        Error::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            "the main server's certificate is not valid yet: check the clocks of both machines".to_string()
        }
        Error::InvalidCertificate(other) => {
            format!("the main server's certificate was refused ({other:?}): reissue it from the CA in CA_CERT_PATH")
        }
        Error::AlertReceived(
            Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateRequired
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::UnsupportedCertificate
            | Alert::AccessDenied
            | Alert::DecryptError,
        ) => "the main server refused the worker certificate: check that it trusts the CA that issued WORKER_CERT_PATH and that the certificate is current".to_string(),
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
            "the main server does not speak TLS on that port: check MAIN_SERVER_URL's port, or whether it serves plain HTTP"
                .to_string()
        }
        Error::NoApplicationProtocol | Error::PeerIncompatible(_) => {
            "the main server and courier share no TLS version, cipher or protocol: it needs TLS 1.2 or 1.3 and HTTP/1.1 or HTTP/2".to_string()
        }
        other => format!("the TLS handshake with the main server failed ({other}): check both sides' certificates"),
    }
}
