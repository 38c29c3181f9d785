//! The Redis that production runs: ACL users, connection URLs, and `courier check`'s warnings
//! about a Redis that could drop queued messages.

use crate::common::*;
use courier::devtools::sink;

const PASSWORD: &str = "s3cret:pw";

/// Creates `name` with the permissions the README documents for one Redis.
async fn acl_user(redis: &RedisServer, name: &str) {
    set_acl_user(redis.port, name, &readme_acl("single", PASSWORD)).await;
}

#[tokio::test]
async fn an_acl_user_with_only_the_documented_permissions_delivers() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    acl_user(&redis, "courier").await;
    // Every first attempt fails: claims, retries, promotions and status updates all run.
    let sink = start_sink(&pki, sink::fail_first(1, 503)).await;
    let ids: Vec<String> = (0..50).map(|i| format!("acl-{i}")).collect();
    enqueue(&redis, Q, &ids.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
    // The URL names the user, a password with a percent-encoded colon, and the real port; the
    // REDIS_PORT beside it is wrong, so only the URL can have been used.
    let url = format!("redis://courier:s3cret%3Apw@127.0.0.1:{}/0", redis.port);
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-acl",
        // Every first attempt fails, which the breaker would take for an outage.
        &[("REDIS_URL", &url), ("REDIS_PORT", "1"), ("WORKER_BREAKER", "false")],
    )
    .await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == ids.len()).await,
        "all delivered through the ACL user"
    );
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut redis.conn().await)
        .await
        .expect("CLIENT LIST");
    assert!(clients.contains("user=courier"), "{clients}");
    worker.stop().await;
    for key in [Q.to_string(), keys().retry, keys().processing("w-acl"), keys().workers] {
        assert_eq!(len(&redis, &key).await, 0, "{key} ends empty");
    }
}

/// For each command the worker needs, a user denied exactly that one: `courier run` exits 78
/// with one line naming it, before it has touched the queue.
#[tokio::test]
async fn a_user_denied_any_one_command_is_refused_at_start_and_nothing_moves() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let ids: Vec<String> = (0..5).map(|i| format!("kept-{i}")).collect();
    let items: Vec<String> = ids.iter().map(|id| message(id)).collect();
    enqueue(&redis, Q, &items).await;
    let documented = readme_acl("single", PASSWORD);
    let required = courier::queue::acl::required_commands(&keys(), &courier::config::Topology::Single);
    let mut names: Vec<String> = required.into_iter().map(|r| r.name).collect();
    names.dedup();
    assert!(names.len() > 25, "{names:?}");
    for name in names {
        // `SCRIPT LOAD` is the ACL rule `script|load`.
        let denied = format!("-{}", name.to_lowercase().replace(' ', "|"));
        let mut rules = documented.clone();
        rules.push(denied.clone());
        set_acl_user(redis.port, "courier", &rules).await;
        let vars = env(
            &redis,
            "https://localhost:1",
            &pki,
            "w-denied",
            &[("REDIS_USERNAME", "courier"), ("REDIS_PASSWORD", PASSWORD)],
        );
        let out = run_courier(&vars, pki.dir.path(), &["run"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{denied}: {stderr}");
        let line = stderr.trim();
        assert_eq!(line.lines().count(), 1, "{denied}: {stderr}");
        assert!(
            line.contains("REDIS_USERNAME") && line.contains(&format!("denies this user {name} on {Q}")),
            "{denied}: {line}"
        );
        let mut conn = redis.conn().await;
        let held: Vec<String> = redis::AsyncCommands::lrange(&mut conn, Q, 0, -1).await.expect("LRANGE");
        assert_eq!(
            held,
            items.iter().rev().cloned().collect::<Vec<_>>(),
            "{denied}: the queue is untouched"
        );
        let keys: Vec<String> = redis::AsyncCommands::keys(&mut conn, "*").await.expect("KEYS");
        assert_eq!(keys, [Q], "{denied}: nothing else written");
    }
}

#[tokio::test]
async fn a_wrong_acl_password_is_a_configuration_error_naming_the_user_setting() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    acl_user(&redis, "courier").await;
    let vars = env(
        &redis,
        "https://localhost:1",
        &pki,
        "w-acl-bad",
        &[("REDIS_USERNAME", "courier"), ("REDIS_PASSWORD", "wrong")],
    );
    let out = run_courier(&vars, pki.dir.path(), &["run"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("REDIS_USERNAME") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
}

#[tokio::test]
async fn check_warns_about_a_redis_that_can_drop_queued_messages() {
    let pki = Pki::new();
    let sink = start_sink(&pki, sink::always_ok()).await;
    let run_check = |redis: &RedisServer| {
        let vars = env(redis, &sink.url(), &pki, "w-check-data", &[]);
        let dir = pki.dir.path().to_path_buf();
        async move {
            let out = run_courier(&vars, &dir, &["check"]).await;
            (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
        }
    };

    let risky = RedisServer::start_with(&["--appendonly", "no", "--maxmemory-policy", "allkeys-lru"]).await;
    let (passed, stdout) = run_check(&risky).await;
    assert!(passed, "warnings do not fail the check:\n{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("WARN  redis data"))
        .unwrap_or_else(|| panic!("a warning:\n{stdout}"));
    assert!(
        line.contains("allkeys-lru") && line.contains("persistence is off"),
        "{line}"
    );
    assert!(
        stdout.contains("maxmemory-policy noeviction"),
        "the fix is named:\n{stdout}"
    );

    let safe = RedisServer::start_with(&["--appendonly", "yes", "--maxmemory-policy", "noeviction"]).await;
    let (passed, stdout) = run_check(&safe).await;
    assert!(passed, "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("OK    redis data")), "{stdout}");
}

/// A redis-server that speaks only TLS on `tls_port` to clients with a certificate from the
/// test CA (its plain port stays open for the test's own inspection).
async fn tls_redis(pki: &Pki, tls_port: u16) -> RedisServer {
    let path = |p: &std::path::Path| p.display().to_string();
    let (port, cert, key, ca) = (
        tls_port.to_string(),
        path(&pki.server_cert_file),
        path(&pki.server_key_file),
        path(&pki.ca_file),
    );
    RedisServer::start_with(&[
        "--appendonly",
        "no",
        "--tls-port",
        &port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "yes",
    ])
    .await
}

#[tokio::test]
async fn delivers_over_tls_to_redis_with_a_client_certificate_and_a_private_ca() {
    let pki = Pki::new();
    let tls_port = free_port();
    let redis = tls_redis(&pki, tls_port).await;
    let sink = start_sink(&pki, sink::fail_first(1, 503)).await;
    let ids: Vec<String> = (0..30).map(|i| format!("tls-{i}")).collect();
    enqueue(&redis, Q, &ids.iter().map(|id| message(id)).collect::<Vec<_>>()).await;
    let ca = pki.ca_file.display().to_string();
    let cert = pki.cert_file.display().to_string();
    let key = pki.key_file.display().to_string();
    let url = format!("rediss://localhost:{tls_port}/0");
    let worker = worker_on(
        &redis,
        &sink,
        &pki,
        "w-tls",
        &[
            ("REDIS_URL", &url),
            ("REDIS_CA_CERT_PATH", &ca),
            ("REDIS_CERT_PATH", &cert),
            ("REDIS_KEY_PATH", &key),
            ("WORKER_BREAKER", "false"),
        ],
    )
    .await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().len() == ids.len()).await,
        "all delivered over TLS"
    );
    worker.stop().await;
    for key in [Q.to_string(), keys().retry, keys().processing("w-tls"), keys().workers] {
        assert_eq!(len(&redis, &key).await, 0, "{key} ends empty");
    }

    // The same server refuses a client without a certificate, and one that does not trust
    // the server's CA never completes the handshake: `courier stats` says which.
    let mut vars = env(&redis, &sink.url(), &pki, "w-tls-cli", &[("REDIS_URL", &url)]);
    vars.insert("REDIS_CA_CERT_PATH".into(), ca.clone());
    let out = run_courier(&vars, pki.dir.path(), &["stats"]).await;
    assert!(!out.status.success(), "no client certificate, no entry");
    vars.insert("REDIS_CERT_PATH".into(), cert.clone());
    vars.insert("REDIS_KEY_PATH".into(), key.clone());
    let out = run_courier(&vars, pki.dir.path(), &["stats"]).await;
    assert!(out.status.success(), "{out:?}");
    vars.insert("REDIS_CA_CERT_PATH".into(), pki.cert_file.display().to_string());
    let out = run_courier(&vars, pki.dir.path(), &["stats"]).await;
    assert!(
        !out.status.success(),
        "a CA that did not sign the server is not trusted"
    );
}

#[tokio::test]
async fn bad_redis_tls_settings_are_one_line_naming_the_setting() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[("REDIS_TLS", "true"), ("REDIS_CERT_PATH", "/x.crt")],
            "REDIS_KEY_PATH",
        ),
        (&[("REDIS_CA_CERT_PATH", "/x.crt")], "REDIS_TLS"),
        (
            &[("REDIS_TLS", "true"), ("REDIS_CA_CERT_PATH", "/nonexistent/ca.crt")],
            "REDIS_CA_CERT_PATH",
        ),
    ];
    for (extra, named) in cases {
        let vars = env(&redis, "https://localhost:1", &pki, "w-tls-bad", extra);
        let out = run_courier(&vars, pki.dir.path(), &["run"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(named) && stderr.trim().lines().count() == 1,
            "{extra:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn check_names_the_commands_an_acl_user_may_not_run() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    // Everything courier needs but hashes.
    let documented = readme_acl("single", PASSWORD);
    let limited: Vec<String> = documented.iter().filter(|r| *r != "+@hash").cloned().collect();
    set_acl_user(redis.port, "limited", &limited).await;
    acl_user(&redis, "courier").await;
    // And one that may not ask Redis about its own permissions.
    let unasking: Vec<String> = documented.iter().filter(|r| *r != "+acl|dryrun").cloned().collect();
    set_acl_user(redis.port, "unasking", &unasking).await;
    let check = |extra: Vec<(&'static str, &'static str)>| {
        let vars = env(&redis, &sink.url(), &pki, "w-acl-check", &extra);
        let dir = pki.dir.path().to_path_buf();
        async move {
            let out = run_courier(&vars, &dir, &["check"]).await;
            (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
        }
    };

    let (passed, stdout) = check(vec![]).await;
    assert!(passed, "{stdout}");
    assert!(stdout.contains("OK    redis acl      user default may run"), "{stdout}");

    let (passed, stdout) = check(vec![("REDIS_USERNAME", "limited"), ("REDIS_PASSWORD", "s3cret:pw")]).await;
    assert!(!passed, "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("FAIL  redis acl"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("HGET, HSET, HDEL"), "{line}");
    assert!(!line.contains("RPOP"), "only what is missing is named: {line}");

    // The documented user may ask, and may run everything.
    let (passed, stdout) = check(vec![("REDIS_USERNAME", "courier"), ("REDIS_PASSWORD", "s3cret:pw")]).await;
    assert!(passed, "{stdout}");
    assert!(stdout.contains("OK    redis acl      user courier may run"), "{stdout}");

    // A user that may not ask: not verified, not failed.
    let (passed, stdout) = check(vec![("REDIS_USERNAME", "unasking"), ("REDIS_PASSWORD", "s3cret:pw")]).await;
    assert!(passed, "{stdout}");
    assert!(stdout.contains("WARN  redis acl      not verified"), "{stdout}");
}

#[tokio::test]
async fn enqueue_waits_for_replicas_and_says_when_too_few_have_the_messages() {
    let master = RedisServer::start().await;
    let port = master.port.to_string();
    let replica = RedisServer::start_with(&["--appendonly", "no", "--replicaof", "127.0.0.1", &port]).await;
    // The replica is in sync once the master counts it as connected.
    eventually(|| async {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut master.conn().await)
            .await
            .expect("INFO");
        info.contains("connected_slaves:1") && info.contains("state=online")
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let vars = std::collections::HashMap::from([
        ("REDIS_HOST".to_string(), "127.0.0.1".to_string()),
        ("REDIS_PORT".to_string(), port.clone()),
    ]);
    let run = |args: &'static [&'static str]| {
        let vars = vars.clone();
        let dir = dir.path().to_path_buf();
        async move { run_courier(&vars, &dir, args).await }
    };
    let out = run(&["enqueue", "--count", "20", "--wait-replicas", "1"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(len(&replica, Q).await, 20, "the replica has them when enqueue returns");

    let out = run(&[
        "enqueue",
        "--id",
        "x",
        "--wait-replicas",
        "2",
        "--wait-timeout-ms",
        "200",
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("only 1 of 2 replica(s)"), "{stderr}");
}

#[tokio::test]
async fn sighup_reloads_the_tls_files_for_redis() {
    let (pki, next) = (Pki::new(), Pki::new());
    let dir = pki.dir.path();
    let copy = |from: &std::path::Path, name: &str| {
        let to = dir.join(name);
        std::fs::copy(from, &to).expect("copy");
        to.display().to_string()
    };
    // Redis's files and the worker's files for Redis, apart from the main server's.
    let server_cert = copy(&pki.server_cert_file, "redis-server.crt");
    let server_key = copy(&pki.server_key_file, "redis-server.key");
    let server_ca = copy(&pki.ca_file, "redis-server-ca.crt");
    let ca = copy(&pki.ca_file, "redis-ca.crt");
    let cert = copy(&pki.cert_file, "redis-client.crt");
    let key = copy(&pki.key_file, "redis-client.key");
    let tls_port = free_port();
    let port = tls_port.to_string();
    let mut redis = RedisServer::start_with(&[
        "--appendonly",
        "no",
        "--tls-port",
        &port,
        "--tls-cert-file",
        &server_cert,
        "--tls-key-file",
        &server_key,
        "--tls-ca-cert-file",
        &server_ca,
        "--tls-auth-clients",
        "yes",
    ])
    .await;
    let sink = start_sink(&pki, sink::always_ok()).await;
    let url = format!("rediss://localhost:{tls_port}/0");
    let vars = env(
        &redis,
        &sink.url(),
        &pki,
        "w-redis-hup",
        &[
            ("REDIS_URL", &url),
            ("REDIS_CA_CERT_PATH", &ca),
            ("REDIS_CERT_PATH", &cert),
            ("REDIS_KEY_PATH", &key),
        ],
    );
    let mut worker = spawn_worker(&vars, dir);
    let mut out = Lines::new(&mut worker);
    out.wait_for("Connected to Redis").await;
    enqueue(&redis, Q, &[message("before")]).await;
    assert!(sink.wait_for(WAIT, |r| r.delivered().len() == 1).await);

    // Redis moves to a new CA; so do the worker's files for it, and a SIGHUP says so.
    for (from, to) in [
        (&next.server_cert_file, &server_cert),
        (&next.server_key_file, &server_key),
        (&next.ca_file, &server_ca),
        (&next.ca_file, &ca),
        (&next.cert_file, &cert),
        (&next.key_file, &key),
    ] {
        std::fs::copy(from, to).expect("replace");
    }
    redis.restart().await;
    signal(&worker, "HUP");
    out.wait_for("Reloaded the TLS files for Redis").await;
    enqueue(&redis, Q, &[message("after")]).await;
    assert!(
        sink.wait_for(WAIT, |r| r.delivered().contains(&"after".to_string()))
            .await,
        "delivered through connections made with the new files"
    );
    stop_worker(worker).await;
}

/// A REDIS_URL with anything courier does not read (a query, a fragment) is refused at start
/// with one line naming REDIS_URL, instead of being silently ignored; the same URL without it
/// runs.
#[tokio::test]
async fn a_redis_url_with_a_query_or_fragment_is_refused_and_a_plain_one_runs() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let base = format!("redis://127.0.0.1:{}/0", redis.port);
    for tail in [
        "#insecure",
        "?insecure=true",
        "?insecure",
        "?protocol=resp3",
        "?db=1",
        "?",
    ] {
        let url = format!("{base}{tail}");
        let vars = env(&redis, "https://localhost:1", &pki, "w-url", &[("REDIS_URL", &url)]);
        let out = run_courier(&vars, pki.dir.path(), &["run"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{url}: {stderr}");
        let line = stderr.trim();
        assert_eq!(line.lines().count(), 1, "{url}: {stderr}");
        assert!(
            line.contains("REDIS_URL") && line.contains("query") && line.contains("remove it"),
            "{url}: {line}"
        );
    }
    let sink = start_sink(&pki, sink::always_ok()).await;
    let vars = env(
        &redis,
        &sink.url(),
        &pki,
        "w-url",
        &[("REDIS_URL", &base), ("REDIS_PORT", "1")],
    );
    let mut worker = spawn_worker(&vars, pki.dir.path());
    Lines::new(&mut worker).wait_for("Connected to Redis").await;
    stop_worker(worker).await;
}

/// Sentinels and cluster nodes announce IP addresses, so Redis's certificate must name the IP
/// (docs/scaling.md): `courier certs issue --server` takes one, and courier connects to
/// `rediss://<ip>` with it; a certificate naming only a host name is refused for the IP.
#[tokio::test]
async fn a_redis_certificate_issued_for_an_ip_address_verifies_for_that_address() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let none = std::collections::HashMap::new();
    for args in [
        vec!["certs", "init", "--out", "pki"],
        vec![
            "certs",
            "issue",
            "--ca",
            "pki",
            "--server",
            "127.0.0.1",
            "--out",
            "by-ip",
        ],
        vec![
            "certs",
            "issue",
            "--ca",
            "pki",
            "--server",
            "localhost",
            "--out",
            "by-name",
        ],
    ] {
        let out = run_courier(&none, d, &args).await;
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    let path = |p: &str| d.join(p).display().to_string();
    for (issued, verifies) in [("by-ip", true), ("by-name", false)] {
        let tls_port = free_port();
        let (port, cert, key, ca) = (
            tls_port.to_string(),
            path(&format!("{issued}/server.crt")),
            path(&format!("{issued}/server.key")),
            path("pki/ca.crt"),
        );
        let _redis = RedisServer::start_with(&[
            "--appendonly",
            "no",
            "--tls-port",
            &port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ])
        .await;
        let vars = std::collections::HashMap::from([
            ("REDIS_URL".to_string(), format!("rediss://127.0.0.1:{tls_port}/0")),
            ("REDIS_CA_CERT_PATH".to_string(), ca.clone()),
        ]);
        let out = run_courier(&vars, d, &["stats"]).await;
        assert_eq!(out.status.success(), verifies, "{issued}: {out:?}");
    }
}
