//! The Redis keys of one queue, and the one rule that keeps them together in a cluster.

pub use crate::config::{cluster_safe_name, hash_tag};

/// The Redis keys of one queue. On one Redis (or a Sentinel-watched master) they are the queue
/// name and `name:suffix`, the names courier has always used. In a cluster every derived key
/// carries the queue name as a hash tag (`{name}:retry`), so it hashes to the same slot as
/// the queue itself and producers keep pushing to the plain name; a name that already has a
/// hash tag keeps `name:suffix`, which hashes to its tag.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The queue's name as configured.
    pub name: String,
    pub ready: String,
    pub retry: String,
    pub dead: String,
    pub workers: String,
    /// Worker id -> the process holding it (`host|pid|started_ms`).
    pub owners: String,
    /// SHA-1 of an item -> how often it was returned to the queue from a dead worker's hands.
    pub reclaims: String,
    /// The queue's clock for retry due times: `offset` (ms added to Redis TIME after it
    /// stepped back) and `last` (the furthest it has read).
    pub clock: String,
    processing_prefix: String,
}

impl Keys {
    /// The keys of `queue` on one Redis.
    pub fn new(queue: &str) -> Keys {
        Keys::with_prefix(queue, queue)
    }

    /// The keys of `queue` in a Redis Cluster: all in the queue's slot.
    pub fn clustered(queue: &str) -> Keys {
        if hash_tag(queue).is_some() {
            Keys::new(queue)
        } else {
            Keys::with_prefix(queue, &format!("{{{queue}}}"))
        }
    }

    /// `clustered` or `new`.
    pub fn for_topology(queue: &str, clustered: bool) -> Keys {
        if clustered {
            Keys::clustered(queue)
        } else {
            Keys::new(queue)
        }
    }

    fn with_prefix(queue: &str, prefix: &str) -> Keys {
        Keys {
            name: queue.to_string(),
            ready: queue.to_string(),
            retry: format!("{prefix}:retry"),
            dead: format!("{prefix}:dead"),
            workers: format!("{prefix}:workers"),
            owners: format!("{prefix}:owners"),
            reclaims: format!("{prefix}:reclaims"),
            clock: format!("{prefix}:clock"),
            processing_prefix: format!("{prefix}:processing:"),
        }
    }

    /// Every key of this queue that a worker with this id writes.
    pub fn all(&self, worker_id: &str) -> Vec<String> {
        vec![
            self.ready.clone(),
            self.retry.clone(),
            self.dead.clone(),
            self.workers.clone(),
            self.owners.clone(),
            self.reclaims.clone(),
            self.clock.clone(),
            self.processing(worker_id),
        ]
    }

    /// The list of messages a worker has claimed and not yet settled.
    pub fn processing(&self, worker_id: &str) -> String {
        format!("{}{worker_id}", self.processing_prefix)
    }
}

/// The part of a key Redis Cluster hashes to find its slot.
pub fn slot_part(key: &str) -> &str {
    hash_tag(key).unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_redis_keeps_the_names_courier_has_always_used() {
        let keys = Keys::new("message_queue");
        assert_eq!(keys.ready, "message_queue");
        assert_eq!(keys.retry, "message_queue:retry");
        assert_eq!(keys.processing("w-1"), "message_queue:processing:w-1");
    }

    #[test]
    fn in_a_cluster_every_key_of_a_queue_hashes_like_the_queue() {
        for name in ["message_queue", "jobs.high", "{tenant-a}.jobs", "x{y}z"] {
            let keys = Keys::clustered(name);
            assert_eq!(keys.ready, name, "producers keep pushing to the plain name");
            for key in keys.all("worker-1") {
                assert_eq!(slot_part(&key), slot_part(name), "{key} vs {name}");
            }
        }
        assert_eq!(Keys::clustered("message_queue").retry, "{message_queue}:retry");
        assert_eq!(Keys::clustered("{t}q").retry, "{t}q:retry");
    }

    #[test]
    fn stray_braces_are_not_a_hash_tag() {
        assert_eq!(hash_tag("a{}b"), None);
        assert_eq!(hash_tag("a}b{"), None);
        assert_eq!(hash_tag("{a}{b}"), Some("a"));
        assert!(!cluster_safe_name("a{}b"));
        assert!(!cluster_safe_name("a}b"));
        assert!(cluster_safe_name("plain"));
        assert!(cluster_safe_name("{t}rest"));
    }
}
