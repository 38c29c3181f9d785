//! The `redis` section: where Redis is (one server, a REDIS_URL, a Sentinel-watched master or
//! a cluster), the queues and their order, TLS to Redis, and the hash-tag rules a queue name
//! follows in a cluster.

use std::path::PathBuf;

use url::Url;

use super::{ConfigError, Secret, Source};

/// Redis (`redis`): where it is, how to log in, the queues, TLS.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// The host of a single Redis (REDIS_HOST, or REDIS_URL's).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The database number (always 0 in a cluster).
    pub db: i64,
    /// An ACL user; empty: the default user.
    pub username: String,
    /// The password of that user; empty: none.
    pub password: Secret,
    /// The queues this worker takes messages from, in priority order; never empty.
    pub queues: Vec<String>,
    /// How the worker chooses among several queues.
    pub order: QueueOrder,
    /// One Redis, a Sentinel-watched master, or a cluster.
    pub topology: Topology,
    /// TLS to Redis (and to the sentinels), when on.
    pub tls: Option<RedisTls>,
}

impl RedisSettings {
    /// The first queue: the one operator commands use unless told otherwise.
    pub fn first_queue(&self) -> &str {
        self.queues.first().map_or("message_queue", String::as_str)
    }

    /// Where Redis is, for a message: `Redis at host:port`, the sentinels or the cluster.
    pub fn describe(&self) -> String {
        let list = |a: &[(String, u16)]| a.iter().map(|(h, p)| format!("{h}:{p}")).collect::<Vec<_>>().join(",");
        match &self.topology {
            Topology::Single => format!("Redis at {}:{}", self.host, self.port),
            Topology::Sentinel { sentinels, master, .. } => {
                format!("Redis master {master} through the sentinels at {}", list(sentinels))
            }
            Topology::Cluster { nodes } => format!("the Redis Cluster at {}", list(nodes)),
        }
    }

    /// The settings that say where Redis is, for a message.
    pub fn where_settings(&self) -> &'static str {
        match self.topology {
            Topology::Single => "REDIS_URL, or REDIS_HOST and REDIS_PORT",
            Topology::Sentinel { .. } => "REDIS_SENTINELS and REDIS_SENTINEL_MASTER",
            Topology::Cluster { .. } => "REDIS_CLUSTER_NODES",
        }
    }

    /// The queues joined for a log line.
    pub fn queue_list(&self) -> String {
        self.queues.join(",")
    }
}

/// How a worker with several queues picks the next one to claim from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOrder {
    /// Always the first non-empty queue in the configured order.
    Priority,
    /// Each claim starts one queue further along: shards of one logical queue.
    RoundRobin,
}

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// `host:port` (REDIS_HOST/REDIS_PORT or REDIS_URL).
    Single,
    /// Ask these sentinels for the master named `master`, and follow it through failovers.
    Sentinel {
        sentinels: Vec<(String, u16)>,
        master: String,
        username: String,
        password: Secret,
    },
    /// A Redis Cluster, found from these seed nodes.
    Cluster { nodes: Vec<(String, u16)> },
}

/// TLS to Redis: which CA to trust (the system's when none is named) and, for a Redis with
/// `tls-auth-clients yes`, the client certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTls {
    /// The only CA trusted for Redis's certificate; `None`: the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// The client certificate and its key, when Redis asks for one.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// The hash tag of a key: the text between its first `{` and the first `}` after it, when
/// that is not empty. Redis Cluster hashes only this part of a key that has one.
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

/// Whether a queue name can be used in a cluster: no braces, or a proper hash tag. A name with
/// stray braces (`a{}b`, `a}b{`) would hash differently from its derived keys.
pub fn cluster_safe_name(name: &str) -> bool {
    hash_tag(name).is_some() || !name.contains(['{', '}'])
}

impl Source<'_> {
    /// The `redis` section: where Redis is and how to log in, the queues, and TLS.
    pub(super) fn redis(&self) -> Result<RedisSettings, ConfigError> {
        let queues = self.queue_names()?;
        let host = self.text("redis.host")?.trim().to_string();
        if host.is_empty() {
            return Err(self.invalid("redis.host", "expected a host name or address"));
        }
        let mut redis = RedisSettings {
            host,
            port: self.number("redis.port", 1, u16::MAX)?,
            db: self.number("redis.db", 0, 1_000_000)?,
            username: self.text("redis.username")?.trim().to_string(),
            password: Secret(self.text("redis.password")?),
            queues,
            order: match self.text("redis.queue_order")?.trim().to_ascii_lowercase().as_str() {
                "priority" => QueueOrder::Priority,
                "round_robin" | "round-robin" => QueueOrder::RoundRobin,
                _ => return Err(self.invalid("redis.queue_order", "expected priority or round_robin")),
            },
            topology: self.topology()?,
            tls: None,
        };
        let mut tls_on = self.flag("redis.tls")?;
        let redis_url = self.text("redis.url")?;
        if !redis_url.trim().is_empty() {
            tls_on |= self.apply_redis_url(redis_url.trim(), &mut redis)?;
        }
        redis.tls = self.redis_tls(tls_on)?;
        if let Topology::Cluster { .. } = redis.topology {
            if redis.db != 0 {
                return Err(self.conflict(
                    "redis.cluster_nodes",
                    "redis.db",
                    "a Redis Cluster has only database 0; leave REDIS_DB at 0",
                ));
            }
            if let Some(name) = redis.queues.iter().find(|q| !cluster_safe_name(q)) {
                return Err(self.invalid(
                    "redis.queue_names",
                    &format!(
                        "queue {name:?} has braces that are not a hash tag; in a cluster a queue \
                         name may contain {{...}} only as a non-empty hash tag"
                    ),
                ));
            }
        }
        Ok(redis)
    }

    /// The files for TLS to Redis, checked for consistency (present ones are read at start).
    fn redis_tls(&self, on: bool) -> Result<Option<RedisTls>, ConfigError> {
        let optional = |key: &str| -> Result<Option<PathBuf>, ConfigError> {
            let text = self.text(key)?;
            Ok(Some(text.trim()).filter(|t| !t.is_empty()).map(PathBuf::from))
        };
        let ca_file = optional("redis.ca_file")?;
        let client = match (optional("redis.cert_file")?, optional("redis.key_file")?) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(self.invalid(
                    "redis.cert_file",
                    "is set without redis.key_file (REDIS_KEY_PATH); give both, or neither",
                ))
            }
            (None, Some(_)) => {
                return Err(self.invalid(
                    "redis.key_file",
                    "is set without redis.cert_file (REDIS_CERT_PATH); give both, or neither",
                ))
            }
        };
        if !on {
            if ca_file.is_some() || client.is_some() {
                return Err(self.invalid(
                    "redis.tls",
                    "is off while REDIS_CA_CERT_PATH, REDIS_CERT_PATH or REDIS_KEY_PATH is set; \
                     set REDIS_TLS=true or use a rediss:// REDIS_URL",
                ));
            }
            return Ok(None);
        }
        Ok(Some(RedisTls { ca_file, client }))
    }

    /// Applies a Redis URL, `redis://[user[:password]@]host[:port][/db]`: replaces host, port
    /// and database, and the user and password when it names them (percent-encoded characters
    /// allowed). True when it asks for TLS (`rediss://`).
    fn apply_redis_url(&self, text: &str, redis: &mut RedisSettings) -> Result<bool, ConfigError> {
        let key = "redis.url";
        let url = Url::parse(text).map_err(|e| {
            self.invalid(
                key,
                &format!("not a URL ({e}); expected redis://[user[:password]@]host[:port][/db]"),
            )
        })?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            other => return Err(self.invalid(key, &format!("scheme {other}:// is neither redis:// nor rediss://"))),
        };
        // A query or fragment would be silently ignored (`#insecure` does not turn off
        // certificate checks, `?db=1` does not choose a database): refused instead. Its text is
        // not repeated, as it may hold a password.
        if url.query().is_some() || url.fragment().is_some() {
            return Err(self.invalid(
                key,
                "has a query (?...) or a fragment (#...), which courier does not read: remove it. \
                 The database is the path (redis://host:6379/0), TLS is rediss:// and Redis's \
                 certificate is always verified (REDIS_CA_CERT_PATH for a private CA)",
            ));
        }
        redis.host = match url.host_str() {
            // An IPv6 address comes in brackets, which a socket address does not take.
            Some(host) if !host.is_empty() => host.trim_start_matches('[').trim_end_matches(']').to_string(),
            _ => return Err(self.invalid(key, "has no host name")),
        };
        redis.port = url.port().unwrap_or(6379);
        let db = url.path().trim_start_matches('/');
        redis.db = if db.is_empty() {
            0
        } else {
            db.parse()
                .ok()
                .filter(|n| (0..=1_000_000).contains(n))
                .ok_or_else(|| self.invalid(key, "the path must be a database number, e.g. redis://host:6379/0"))?
        };
        let decode = |text: &str| {
            percent_encoding::percent_decode_str(text)
                .decode_utf8()
                .map(|t| t.into_owned())
                .map_err(|_| self.invalid(key, "the user or password is not UTF-8 after percent-decoding"))
        };
        if !url.username().is_empty() {
            redis.username = decode(url.username())?;
        }
        if let Some(password) = url.password() {
            redis.password = Secret(decode(password)?);
        }
        Ok(tls)
    }

    /// REDIS_QUEUE_NAMES when set (several queues, in priority order), else REDIS_QUEUE_NAME.
    fn queue_names(&self) -> Result<Vec<String>, ConfigError> {
        let listed = self.text("redis.queue_names")?;
        let (key, names): (&str, Vec<String>) = if listed.trim().is_empty() {
            (
                "redis.queue_name",
                vec![self.text("redis.queue_name")?.trim().to_string()],
            )
        } else {
            (
                "redis.queue_names",
                listed.split(',').map(|n| n.trim().to_string()).collect(),
            )
        };
        if names.len() > 64 {
            return Err(self.invalid(key, "expected at most 64 queues"));
        }
        for name in &names {
            if name.is_empty()
                || name.len() > 200
                || name.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',')
            {
                return Err(self.invalid(
                    key,
                    "expected non-empty names of up to 200 characters without spaces, \
                     separated by commas",
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = names.iter().find(|n| !seen.insert(n.as_str())) {
            return Err(self.invalid(key, &format!("queue {twice:?} is listed twice")));
        }
        Ok(names)
    }

    /// `host:port,host:port`: an address list (sentinels, cluster seed nodes).
    fn addresses(&self, key: &str) -> Result<Vec<(String, u16)>, ConfigError> {
        let expected = "expected host:port[,host:port...], e.g. 10.0.0.1:26379,10.0.0.2:26379";
        self.text(key)?
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|address| {
                let (host, port) = address.rsplit_once(':').ok_or_else(|| self.invalid(key, expected))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                match port.parse::<u16>() {
                    Ok(port) if port > 0 && !host.is_empty() => Ok((host.to_string(), port)),
                    _ => Err(self.invalid(key, expected)),
                }
            })
            .collect()
    }

    /// Sentinel, Cluster or a single Redis; refuses settings that contradict each other.
    fn topology(&self) -> Result<Topology, ConfigError> {
        let sentinels = self.addresses("redis.sentinels")?;
        let nodes = self.addresses("redis.cluster_nodes")?;
        let url = !self.text("redis.url")?.trim().is_empty();
        match (sentinels.is_empty(), nodes.is_empty()) {
            (false, false) => Err(self.conflict(
                "redis.sentinels",
                "redis.cluster_nodes",
                "Sentinel and Cluster exclude each other; set one",
            )),
            (false, true) if url => Err(self.conflict(
                "redis.sentinels",
                "redis.url",
                "with sentinels the master's address comes from them; put user and password \
                 in REDIS_USERNAME and REDIS_PASSWORD and unset REDIS_URL",
            )),
            (true, false) if url => Err(self.conflict(
                "redis.cluster_nodes",
                "redis.url",
                "in Cluster mode the nodes come from REDIS_CLUSTER_NODES; put user and password \
                 in REDIS_USERNAME and REDIS_PASSWORD and unset REDIS_URL",
            )),
            (false, true) => {
                let master = self.text("redis.sentinel_master")?.trim().to_string();
                if master.is_empty() || master.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(self.invalid(
                        "redis.sentinel_master",
                        "expected the master's name as the sentinels know it, e.g. mymaster",
                    ));
                }
                Ok(Topology::Sentinel {
                    sentinels,
                    master,
                    username: self.text("redis.sentinel_username")?.trim().to_string(),
                    password: Secret(self.text("redis.sentinel_password")?),
                })
            }
            (true, false) => Ok(Topology::Cluster { nodes }),
            (true, true) => Ok(Topology::Single),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::load_yaml;
    use crate::telemetry::one_line;

    #[test]
    fn a_redis_url_replaces_host_port_database_and_credentials() {
        let s = load_yaml(
            "",
            &[
                ("REDIS_URL", "redis://courier:p%40ss%3Aw@redis.internal:6380/2"),
                ("REDIS_HOST", "ignored"),
                ("REDIS_PASSWORD", "ignored"),
            ],
        )
        .unwrap();
        let r = &s.redis;
        assert_eq!((r.host.as_str(), r.port, r.db), ("redis.internal", 6380, 2));
        assert_eq!((r.username.as_str(), r.password.expose()), ("courier", "p@ss:w"));

        let s = load_yaml("", &[("REDIS_URL", "redis://[::1]"), ("REDIS_PASSWORD", "kept")]).unwrap();
        assert_eq!((s.redis.host.as_str(), s.redis.port, s.redis.db), ("::1", 6379, 0));
        assert_eq!(
            s.redis.password.expose(),
            "kept",
            "a URL without a password keeps REDIS_PASSWORD"
        );

        let s = load_yaml("", &[("REDIS_USERNAME", "acl-user")]).unwrap();
        assert_eq!(s.redis.username, "acl-user");
    }

    #[test]
    fn several_queues_sentinels_and_cluster_nodes_are_read_and_checked() {
        let s = load_yaml(
            "",
            &[
                ("REDIS_QUEUE_NAMES", "jobs.high, jobs.medium,jobs.low"),
                ("REDIS_QUEUE_NAME", "ignored"),
                ("REDIS_SENTINELS", "10.0.0.1:26379,[::1]:26380"),
                ("REDIS_SENTINEL_PASSWORD", "s3cret"),
            ],
        )
        .unwrap();
        assert_eq!(s.redis.queues, ["jobs.high", "jobs.medium", "jobs.low"]);
        assert_eq!(s.redis.order, QueueOrder::Priority);
        match &s.redis.topology {
            Topology::Sentinel {
                sentinels,
                master,
                password,
                ..
            } => {
                assert_eq!(
                    sentinels,
                    &[("10.0.0.1".to_string(), 26379), ("::1".to_string(), 26380)]
                );
                assert_eq!(master, "mymaster");
                assert_eq!(password.expose(), "s3cret");
            }
            other => panic!("{other:?}"),
        }
        let s = load_yaml(
            "",
            &[
                ("REDIS_CLUSTER_NODES", "a:7000,b:7001"),
                ("REDIS_QUEUE_ORDER", "round_robin"),
            ],
        )
        .unwrap();
        assert_eq!(s.redis.order, QueueOrder::RoundRobin);
        assert!(matches!(s.redis.topology, Topology::Cluster { ref nodes } if nodes.len() == 2));

        let refused = |vars: &[(&str, &str)], names: &[&str]| {
            let err = load_yaml("", vars).map_err(|e| one_line(&e)).unwrap_err();
            for name in names {
                assert!(err.contains(name), "{vars:?}: {err}");
            }
            assert!(!err.contains("hunter2"), "{err}");
        };
        refused(
            &[("REDIS_SENTINELS", "a:1"), ("REDIS_CLUSTER_NODES", "b:2")],
            &["REDIS_SENTINELS", "REDIS_CLUSTER_NODES"],
        );
        refused(
            &[("REDIS_SENTINELS", "a:1"), ("REDIS_URL", "redis://u:hunter2@h:1")],
            &["REDIS_SENTINELS", "REDIS_URL"],
        );
        refused(
            &[("REDIS_CLUSTER_NODES", "a:1"), ("REDIS_DB", "3")],
            &["REDIS_CLUSTER_NODES", "REDIS_DB"],
        );
        refused(&[("REDIS_SENTINELS", "a")], &["REDIS_SENTINELS", "host:port"]);
        refused(&[("REDIS_CLUSTER_NODES", "a:0")], &["REDIS_CLUSTER_NODES"]);
        refused(&[("REDIS_QUEUE_NAMES", "a,,b")], &["REDIS_QUEUE_NAMES"]);
        refused(&[("REDIS_QUEUE_NAMES", "a,b,a")], &["REDIS_QUEUE_NAMES", "twice"]);
        refused(&[("REDIS_QUEUE_ORDER", "random")], &["REDIS_QUEUE_ORDER"]);
        refused(
            &[("REDIS_CLUSTER_NODES", "a:1"), ("REDIS_QUEUE_NAMES", "ok,bad{}name")],
            &["REDIS_QUEUE_NAMES", "hash tag"],
        );
    }

    #[test]
    fn a_bad_redis_url_is_named_without_its_password() {
        for url in [
            "rediss://u:hunter2@h:6379/db",
            "redis://u:hunter2@h:6379/zero",
            "http://u:hunter2@h/",
            "redis://u:hunter2@:6379",
            "not a url hunter2",
            "redis://u:hunter2@h:6379/0#insecure",
            "redis://u:hunter2@h:6379/0?insecure=true",
            "rediss://h:6379/0?password=hunter2",
            "redis://h:6379/0?protocol=resp3",
            "redis://h:6379?db=1",
            "redis://h:6379/0?",
            "redis://h:6379/0#",
        ] {
            let err = load_yaml("", &[("REDIS_URL", url)])
                .map_err(|e| one_line(&e))
                .unwrap_err();
            assert!(err.contains("REDIS_URL") && err.contains("redis.url"), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{url}: {err}");
        }
    }
}
