//! Redis Cluster: three masters made with `redis-cli --cluster create`, several queues that
//! land on different nodes, a worker killed mid-run, and nothing lost.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::common::*;
use courier::devtools::harness;
use courier::devtools::sink;
use courier::queue::Keys;
use redis::AsyncCommands;

const QUEUES: [&str; 3] = ["message_queue", "jobs.b", "jobs.c"];

struct TestCluster {
    cluster: harness::Cluster,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    async fn start() -> TestCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let cluster = harness::Cluster::start(dir.path(), 3, &["--appendonly", "no"])
            .await
            .unwrap_or_else(|e| panic!("cluster: {e:#}"));
        TestCluster { cluster, _dir: dir }
    }

    async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        let urls: Vec<String> = self.cluster.nodes.iter().map(|n| n.url()).collect();
        redis::cluster::ClusterClient::new(urls)
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("cluster connection")
    }

    /// Every key on every node.
    async fn all_keys(&self) -> Vec<String> {
        let mut all = Vec::new();
        for node in &self.cluster.nodes {
            let mut conn = redis::Client::open(node.url())
                .expect("url")
                .get_multiplexed_async_connection()
                .await
                .expect("node");
            let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.expect("KEYS");
            all.extend(keys);
        }
        all.sort();
        all
    }

    /// The port of the node serving `key`'s slot.
    async fn node_of(&self, key: &str) -> u16 {
        let mut conn = redis::Client::open(self.cluster.nodes[0].url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("node");
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("KEYSLOT");
        let ranges: Vec<(u16, u16, (String, u16))> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Vec<redis::Value>>(&mut conn)
            .await
            .expect("SLOTS")
            .into_iter()
            .filter_map(|range| redis::from_redis_value::<(u16, u16, (String, u16))>(strip_ids(range)).ok())
            .collect();
        ranges
            .into_iter()
            .find(|(from, to, _)| (*from..=*to).contains(&slot))
            .map(|(_, _, (_, port))| port)
            .expect("slot served")
    }
}

/// `CLUSTER SLOTS` entries carry node ids after host and port; keep the first three fields.
fn strip_ids(range: redis::Value) -> redis::Value {
    match range {
        redis::Value::Array(mut parts) => {
            parts.truncate(3);
            if let Some(redis::Value::Array(node)) = parts.get_mut(2) {
                node.truncate(2);
            }
            redis::Value::Array(parts)
        }
        other => other,
    }
}

fn cluster_env(cluster: &TestCluster, sink_url: &str, pki: &Pki, worker_id: &str) -> HashMap<String, String> {
    let seeds = cluster.cluster.seeds();
    env_at(
        1,
        sink_url,
        pki,
        worker_id,
        &[
            ("REDIS_CLUSTER_NODES", &seeds),
            ("REDIS_QUEUE_NAMES", &QUEUES.join(",")),
            ("REDIS_QUEUE_ORDER", "round_robin"),
            ("WORKER_CONCURRENCY", "16"),
        ],
    )
}

async fn len_cluster(conn: &mut redis::cluster_async::ClusterConnection, key: &str) -> usize {
    conn.llen(key).await.expect("LLEN")
}

/// The README's cluster user, exactly, on every node: the worker (whose cluster client asks
/// each node for the slot map) delivers through it, and `courier check` passes with it.
#[tokio::test]
async fn the_documented_cluster_user_delivers() {
    let (cluster, pki) = (TestCluster::start().await, Pki::new());
    for node in &cluster.cluster.nodes {
        set_acl_user(node.port, "courier", &readme_acl("cluster", "cluster-pw")).await;
    }
    let sink = start_sink(&pki, sink::fail_first(1, 503)).await;
    let ids: BTreeSet<String> = (0..30).map(|i| format!("cluster-acl-{i}")).collect();
    let items: Vec<String> = ids.iter().map(|id| message(id)).collect();
    let _: () = cluster.conn().await.lpush(Q, &items).await.expect("LPUSH");
    let seeds = cluster.cluster.seeds();
    let vars = env_at(
        1,
        &sink.url(),
        &pki,
        "w-cluster-acl",
        &[
            ("REDIS_CLUSTER_NODES", &seeds),
            ("REDIS_USERNAME", "courier"),
            ("REDIS_PASSWORD", "cluster-pw"),
            ("WORKER_BREAKER", "false"),
        ],
    );
    let worker = start_worker(&vars).await;
    let delivered = sink
        .wait_for(WAIT, |r| {
            let seen: BTreeSet<String> = r.delivered().into_iter().collect();
            seen == ids
        })
        .await;
    assert!(delivered, "every message delivered through the documented user");

    let check = run_courier(&vars, pki.dir.path(), &["check"]).await;
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(report.contains("OK    redis acl      user courier may run"), "{report}");
    assert!(report.contains("OK    redis cluster  state ok"), "{report}");
    worker.stop().await;
    let left: Vec<String> = cluster
        .all_keys()
        .await
        .into_iter()
        .filter(|k| *k != Keys::clustered(Q).clock)
        .collect();
    assert!(left.is_empty(), "every key but the queue's clock ends empty: {left:?}");
}

/// A cluster with a master down (and `cluster-require-full-coverage yes`, the default): a
/// queue on a node still up meets CLUSTERDOWN, one on the node that is gone meets no
/// connection at all. Both are Redis being unavailable, not a refusal.
#[tokio::test]
async fn a_cluster_with_a_master_down_is_unavailable() {
    let mut cluster = TestCluster::start().await;
    let pki = Pki::new();
    // Two queues on different nodes: one on the node to be killed, one on another.
    let mut homes: Vec<(u16, &str)> = Vec::new();
    for queue in ["message_queue", "jobs.b", "jobs.c", "jobs.d", "jobs.e"] {
        let home = cluster.node_of(queue).await;
        if homes.iter().all(|(h, _)| *h != home) {
            homes.push((home, queue));
        }
    }
    assert!(homes.len() >= 2, "{homes:?}");
    let ((down, lost_queue), (up, kept_queue)) = (homes[0], homes[1]);
    let vars = env_at(
        1,
        "https://127.0.0.1:1",
        &pki,
        "w-down",
        &[("REDIS_CLUSTER_NODES", &cluster.cluster.seeds())],
    );
    let settings = settings(&vars);
    let connector = courier::queue::Connector::new(&settings.redis).expect("connector");
    let conn = courier::queue::Queue::shared_connection(&connector)
        .await
        .expect("connect");
    let on = |name: &'static str| {
        let (connector, conn) = (connector.clone(), conn.clone());
        async move {
            courier::queue::Queue::connect(&connector, &conn, name, "w-down")
                .await
                .expect("queue")
        }
    };
    let (lost, kept) = (on(lost_queue).await, on(kept_queue).await);
    let node = cluster
        .cluster
        .nodes
        .iter_mut()
        .find(|n| n.port == down)
        .expect("the node");
    node.kill().await;
    // The others mark the cluster failed after the node timeout (2 s).
    let mut survivor = redis::Client::open(format!("redis://127.0.0.1:{up}/"))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("node");
    eventually(|| {
        let mut survivor = survivor.clone();
        async move {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut survivor)
                .await
                .expect("CLUSTER INFO");
            info.contains("cluster_state:fail")
        }
    })
    .await;
    let error = kept.claim(1, 1 << 20, 5).await.expect_err("the cluster is down");
    assert!(
        matches!(&error, courier::queue::QueueError::Redis(e) if e.code() == Some("CLUSTERDOWN")),
        "{error}"
    );
    assert!(error.is_unavailable(), "CLUSTERDOWN is an outage: {error}");
    let error = lost.claim(1, 1 << 20, 5).await.expect_err("the node is gone");
    assert!(
        error.is_unavailable(),
        "a node the client cannot reach is an outage: {error}"
    );
    let _: () = redis::cmd("PING").query_async(&mut survivor).await.expect("PING");
}

/// Whole runs of thousands of messages, seconds each: `--skip slow::` leaves them out.
mod slow {
    use super::*;

    #[tokio::test]
    async fn a_worker_killed_mid_run_on_a_three_master_cluster_loses_nothing() {
        let (cluster, pki) = (TestCluster::start().await, Pki::new());
        // Every derived key sits with its queue; the queues themselves spread over the nodes.
        let mut nodes = BTreeSet::new();
        for queue in QUEUES {
            let home = cluster.node_of(queue).await;
            nodes.insert(home);
            for key in Keys::clustered(queue).all("worker-a") {
                assert_eq!(cluster.node_of(&key).await, home, "{key} lives with {queue}");
            }
        }
        assert!(nodes.len() >= 2, "the queues live on different nodes: {nodes:?}");

        // Slow enough answers that the worker holds a good number of messages when it dies.
        let sink = start_sink(&pki, sink::delayed(Duration::from_millis(5))).await;
        let mut conn = cluster.conn().await;
        let mut all = BTreeSet::new();
        for queue in QUEUES {
            let items: Vec<String> = (0..500)
                .map(|i| {
                    let id = format!("{queue}-{i}");
                    all.insert(id.clone());
                    message(&id)
                })
                .collect();
            // Producers push to the plain queue name, as they always have.
            let _: () = conn.lpush(queue, &items).await.expect("LPUSH");
        }

        let dir = pki.dir.path();
        let mut first = spawn_worker(&cluster_env(&cluster, &sink.url(), &pki, "worker-a"), dir);
        assert!(sink.wait_for(WAIT, |r| r.delivered().len() >= 200).await);
        first.kill().await.expect("SIGKILL");
        let mut held = 0;
        for queue in QUEUES {
            held += len_cluster(&mut conn, &Keys::clustered(queue).processing("worker-a")).await;
        }
        assert!(held > 0, "the killed worker held messages");

        // A second worker reaps the first's processing lists and delivers everything.
        let second = spawn_worker(&cluster_env(&cluster, &sink.url(), &pki, "worker-b"), dir);
        let delivered_all = sink
            .wait_for(Duration::from_secs(60), |r| {
                let seen: BTreeSet<String> = r.delivered().into_iter().collect();
                all.is_subset(&seen)
            })
            .await;
        assert!(delivered_all, "every message delivered at least once");
        // When the first worker had delivered all it held before it died, the second delivers
        // everything before its reaper comes round: wait for that to empty the first's lists.
        eventually(|| async {
            let mut conn = cluster.conn().await;
            let mut held = 0;
            for queue in QUEUES {
                held += len_cluster(&mut conn, &Keys::clustered(queue).processing("worker-a")).await;
            }
            held == 0
        })
        .await;

        // The operator commands work against the cluster too.
        let vars = cluster_env(&cluster, &sink.url(), &pki, "cli");
        let stats = run_courier(&vars, dir, &["stats", "--json", "--queue", "jobs.b"]).await;
        assert!(stats.status.success(), "{}", String::from_utf8_lossy(&stats.stderr));
        let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("JSON");
        assert_eq!(stats["ready"], 0);
        let check = run_courier(&vars, dir, &["check"]).await;
        let report = String::from_utf8_lossy(&check.stdout);
        assert!(
            report.contains("redis cluster") && report.contains("state ok"),
            "{report}"
        );

        stop_worker(second).await;
        // The reaped messages' reclaim counts went with their delivery; each queue's clock stays.
        let clocks: Vec<String> = QUEUES.iter().map(|q| Keys::clustered(q).clock).collect();
        let left: Vec<String> = cluster
            .all_keys()
            .await
            .into_iter()
            .filter(|k| !clocks.contains(k))
            .collect();
        assert!(left.is_empty(), "every key of every queue ends empty: {left:?}");
    }
}
