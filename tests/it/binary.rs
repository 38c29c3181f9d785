//! The real `courier` binary: TLS trust in both directions, SIGTERM under load, configuration
//! errors and the log format.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use courier::devtools::sink::{self, Reply, Sink, SinkTls};
use courier::pki::{Authority, Validity};

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused_and_the_message_kept() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    // The server's certificate comes from a CA the worker does not trust.
    let rogue = Authority::new("rogue CA").expect("CA");
    let rogue_server = rogue
        .issue_server(&["localhost", "127.0.0.1"], Validity::default())
        .expect("cert");
    let tls = SinkTls {
        cert_pem: rogue_server.cert_pem,
        key_pem: rogue_server.key_pem,
        client_ca_pem: pki.ca.cert_pem.clone(),
        http2: true,
    };
    let sink = Sink::start("127.0.0.1:0".parse().unwrap(), &tls, sink::always_ok())
        .await
        .expect("sink");
    enqueue(&redis, Q, &[message("guarded")]).await;

    let vars = env(&redis, &sink.url(), &pki, "w-rogue", &[]);
    let mut child = spawn_worker(&vars, pki.dir.path());
    let mut out = Lines::new(&mut child);
    let line = out.wait_for("Delivery failed; will retry").await;
    assert!(line.contains(" - WARNING - [w-rogue] - "), "{line}");
    assert!(
        line.contains("TLS") && line.contains("UnknownIssuer"),
        "the error names the TLS failure: {line}"
    );

    stop_worker(child).await;
    assert!(sink.record.calls().is_empty(), "nothing reached the untrusted server");
    assert!(
        !sink.record.handshake_failures().is_empty(),
        "the worker aborted the handshake"
    );
    let retry = keys().retry;
    let kept: BTreeSet<String> = ids_in(&redis, &retry)
        .await
        .into_iter()
        .chain(ids_in(&redis, Q).await)
        .collect();
    assert_eq!(
        kept,
        BTreeSet::from(["guarded".to_string()]),
        "the message waits for another attempt"
    );
}

#[tokio::test]
async fn the_test_server_refuses_a_client_without_a_certificate() {
    let pki = Pki::new();
    let sink = start_sink(&pki, sink::always_ok()).await;
    let ca = reqwest::Certificate::from_pem(pki.ca.cert_pem.as_bytes()).expect("CA");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let anonymous = reqwest::Client::builder()
        .tls_certs_only([ca.clone()])
        .build()
        .expect("client");
    let refused = anonymous
        .post(format!("{}/internal/messages/deliver", sink.url()))
        .body("{}")
        .send()
        .await;
    assert!(refused.is_err(), "a client without a certificate must be refused");
    assert!(sink.wait_for(WAIT, |r| !r.handshake_failures().is_empty()).await);
    assert!(
        sink.record.handshake_failures()[0]
            .to_lowercase()
            .contains("certificate"),
        "{:?}",
        sink.record.handshake_failures()
    );
    assert!(sink.record.calls().is_empty());

    // The same client with the worker's certificate gets through, so the refusal was about it.
    let identity = reqwest::Identity::from_pem(
        format!(
            "{}{}",
            std::fs::read_to_string(&pki.cert_file).unwrap(),
            std::fs::read_to_string(&pki.key_file).unwrap()
        )
        .as_bytes(),
    )
    .expect("identity");
    let worker = reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(identity)
        .build()
        .expect("client");
    let body = r#"{"message_id":"m","worker_id":"w","attempt":1}"#;
    let accepted = worker
        .post(format!("{}/internal/messages/deliver", sink.url()))
        .body(body)
        .send()
        .await
        .expect("accepted");
    assert_eq!(accepted.status(), 200);
}

#[tokio::test]
async fn log_level_debug_shows_each_delivery() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    enqueue(&redis, Q, &[message("chatty")]).await;
    let vars = env(&redis, &sink.url(), &pki, "w-debug", &[("LOG_LEVEL", "DEBUG")]);
    let mut child = spawn_worker(&vars, pki.dir.path());
    let mut out = Lines::new(&mut child);
    let line = out.wait_for("Message chatty delivered successfully").await;
    assert!(line.contains(" - DEBUG - [w-debug] - "), "{line}");
    signal(&child, "INT");
    assert!(tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits")
        .expect("status")
        .success());
}

/// Runs the binary expecting a configuration error; returns its stderr.
async fn refused(vars: &std::collections::HashMap<String, String>, dir: &std::path::Path, args: &[&str]) -> String {
    let args: Vec<&str> = std::iter::once("run").chain(args.iter().copied()).collect();
    let output = run_courier(vars, dir, &args).await;
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(78), "exit 78 (EX_CONFIG); stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[tokio::test]
async fn bad_configuration_stops_the_start_with_one_line_naming_the_setting() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let base = env(
        &redis,
        "https://localhost:1",
        &pki,
        "w-config",
        &[("REDIS_PASSWORD", "hunter2")],
    );
    let with = |extra: &[(&str, &str)]| {
        let mut vars = base.clone();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        vars
    };
    let dir = pki.dir.path();

    let yaml = pki.write("bad.yaml", "worker:\n  concurency: 4\n");
    let err = refused(&base, dir, &["--config", yaml.to_str().unwrap()]).await;
    assert!(err.contains("worker.concurency"), "{err}");

    let err = refused(&with(&[("WORKER_CONCURRENCY", "lots")]), dir, &[]).await;
    assert!(
        err.contains("WORKER_CONCURRENCY") && err.contains("whole number"),
        "{err}"
    );

    let err = refused(&with(&[("WORKER_CERT_PATH", "/nonexistent/worker.crt")]), dir, &[]).await;
    assert!(err.contains("WORKER_CERT_PATH") && err.contains("not found"), "{err}");

    let other = Authority::new("other")
        .unwrap()
        .issue_client("x", Validity::default())
        .unwrap();
    let wrong_key = pki.write("wrong.key", &other.key_pem);
    let err = refused(&with(&[("WORKER_KEY_PATH", wrong_key.to_str().unwrap())]), dir, &[]).await;
    assert!(
        err.contains("WORKER_KEY_PATH") && err.contains("does not match"),
        "{err}"
    );

    let expired = pki
        .ca
        .issue_client(
            "old",
            Validity {
                starts_ago: 10 * 86_400,
                lasts: Duration::from_secs(86_400),
            },
        )
        .unwrap();
    let (cert, key) = (
        pki.write("old.crt", &expired.cert_pem),
        pki.write("old.key", &expired.key_pem),
    );
    let err = refused(
        &with(&[
            ("WORKER_CERT_PATH", cert.to_str().unwrap()),
            ("WORKER_KEY_PATH", key.to_str().unwrap()),
        ]),
        dir,
        &[],
    )
    .await;
    assert!(err.contains("WORKER_CERT_PATH") && err.contains("expired"), "{err}");

    let err = refused(&with(&[("MAIN_SERVER_URL", "http://localhost:8000")]), dir, &[]).await;
    assert!(err.contains("MAIN_SERVER_URL") && err.contains("https://"), "{err}");

    let missing = dir.join("absent.yaml");
    let err = refused(&base, dir, &["--config", missing.to_str().unwrap()]).await;
    assert!(err.contains("absent.yaml"), "{err}");

    assert!(!err.contains("hunter2"));
    let err = refused(&with(&[("REDIS_PORT", "not-a-port")]), dir, &[]).await;
    assert!(!err.contains("hunter2") && err.contains("REDIS_PORT"), "{err}");

    // Numbers the code could not use are refused at load, not met by a panic at the first
    // claim (a rate of 1e-20 a second made a wait of 1e20 seconds).
    for rate in ["1e-20", "-1", "NaN", "inf"] {
        let err = refused(&with(&[("WORKER_RATE_LIMIT", rate)]), dir, &[]).await;
        assert!(
            err.contains("WORKER_RATE_LIMIT") && err.contains("0.001"),
            "{rate}: {err}"
        );
    }
    let err = refused(&with(&[("MAIN_SERVER_OUTCOMES", "404=later")]), dir, &[]).await;
    assert!(
        err.contains("MAIN_SERVER_OUTCOMES") && err.contains("delivered, retry or reject"),
        "{err}"
    );
    let err = refused(&with(&[("MAIN_SERVER_OUTCOMES", "200=retry")]), dir, &[]).await;
    assert!(err.contains("MAIN_SERVER_OUTCOMES") && err.contains("2xx"), "{err}");
}

#[tokio::test]
async fn a_wrong_redis_password_is_a_configuration_error() {
    let redis = RedisServer::start_with(&["--requirepass", "right-password"]).await;
    let pki = Pki::new();
    let vars = env(
        &redis,
        "https://localhost:1",
        &pki,
        "w-auth",
        &[("REDIS_PASSWORD", "wrong-password")],
    );
    let output = run_courier(&vars, pki.dir.path(), &["run"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("REDIS_PASSWORD") && !stderr.contains("wrong-password"),
        "{stderr}"
    );
}

/// The next sd_notify datagram.
#[cfg(unix)]
async fn notification(socket: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .expect("a notification")
        .expect("recv");
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[cfg(unix)]
#[tokio::test]
async fn under_systemd_it_reports_ready_status_and_stopping_and_instance_n_sets_id_and_port() {
    let (redis, pki) = (RedisServer::start().await, Pki::new());
    let sink = start_sink(&pki, sink::always_ok()).await;
    let socket_path = pki.dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("notify socket");
    let mut vars = env(&redis, &sink.url(), &pki, "unused", &[]);
    // What `worker@4242` gets: no WORKER_ID or port of its own, only the instance number.
    vars.remove("WORKER_ID");
    vars.remove("WORKER_METRICS_PORT");
    vars.insert("NOTIFY_SOCKET".into(), socket_path.display().to_string());
    let mut child = courier(&vars, pki.dir.path())
        .args(["run", "--instance", "4242"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = Lines::new(&mut child);

    let ready = notification(&socket).await;
    assert!(ready.contains("READY=1") && ready.contains("as worker-4242"), "{ready}");
    let status = notification(&socket).await;
    assert!(status.starts_with("STATUS=ready "), "{status}");
    out.wait_for("metrics server started on port 13341").await;

    signal(&child, "TERM");
    while !notification(&socket).await.contains("STOPPING=1") {}
    assert!(tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits")
        .expect("status")
        .success());
}

/// Whole runs of thousands of messages, the demo and the benchmark: the bulk of the suite's
/// time. `cargo test --test it -- --skip slow::` leaves them out.
mod slow {
    use super::*;

    #[tokio::test]
    async fn sigterm_mid_load_loses_nothing_and_exits_zero() {
        let (redis, pki) = (RedisServer::start().await, Pki::new());
        // Slow enough that SIGTERM lands mid-run; one message in ten fails its first attempt.
        let behaviour: sink::Behaviour = Arc::new(|call| {
            let n: u64 = call.message_id.trim_start_matches("load-").parse().unwrap_or(0);
            let status = if n % 10 == 0 && call.attempt == 1 { 503 } else { 200 };
            Reply {
                delay: Duration::from_millis(2),
                ..Reply::status(status)
            }
        });
        let sink = start_sink(&pki, behaviour).await;
        let all: Vec<String> = (0..3000).map(|i| format!("load-{i}")).collect();
        enqueue(&redis, Q, &all.iter().map(|id| message(id)).collect::<Vec<_>>()).await;

        let vars = env(
            &redis,
            &sink.url(),
            &pki,
            "w-term",
            &[("WORKER_CONCURRENCY", "16"), ("WORKER_RETRY_INTERVAL", "30")],
        );
        let mut child = spawn_worker(&vars, pki.dir.path());
        let mut out = Lines::new(&mut child);
        assert!(
            sink.wait_for(WAIT, |r| r.delivered().len() >= 300).await,
            "deliveries under way"
        );
        signal(&child, "TERM");
        let status = tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("exits within the grace")
            .expect("status");
        out.rest().await;
        assert!(status.success(), "exit status {status}");

        let delivered: BTreeSet<String> = sink.record.delivered().into_iter().collect();
        let ready = ids_in(&redis, Q).await;
        let retry = ids_in(&redis, &keys().retry).await;
        assert!(
            delivered.len() < 3000,
            "SIGTERM landed before the end ({} delivered)",
            delivered.len()
        );
        assert!(!retry.is_empty(), "some messages were waiting for a retry");
        let accounted: BTreeSet<String> = delivered.iter().chain(&ready).chain(&retry).cloned().collect();
        let expected: BTreeSet<String> = all.into_iter().collect();
        assert_eq!(accounted, expected, "Q + retry + delivered = everything enqueued");
        assert_eq!(
            len(&redis, &keys().processing("w-term")).await,
            0,
            "nothing left claimed"
        );
        assert_eq!(len(&redis, &keys().workers).await, 0, "the worker deregistered");

        // The log file has the seed's format, and INFO hides the per-message DEBUG lines.
        let logs: Vec<_> = std::fs::read_dir(pki.dir.path().join("logs"))
            .expect("log dir")
            .flatten()
            .collect();
        assert_eq!(logs.len(), 1);
        let name = logs[0].file_name().to_string_lossy().to_string();
        assert!(name.starts_with("worker.") && name.ends_with(".log"), "{name}");
        let text = std::fs::read_to_string(logs[0].path()).expect("log file");
        let first = text.lines().next().expect("a line");
        let (stamp, rest) = first.split_at(23);
        assert!(
            chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S,%3f").is_ok(),
            "{first}"
        );
        assert!(rest.starts_with(" - worker - INFO - [w-term] - "), "{first}");
        assert!(
            text.contains("Worker w-term starting...") && text.contains("Worker w-term stopped"),
            "{text}"
        );
        assert!(!text.contains(" - DEBUG - "));
        assert!(
            out.seen.iter().any(|l| l.contains("Shutdown requested")),
            "stdout carries the same lines"
        );
    }
}
