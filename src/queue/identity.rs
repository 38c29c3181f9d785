//! Who a worker is to Redis: the token a process registers its worker id with (host, pid,
//! start, boot and PID namespace), the holder of an id as `register` reads it back, and the
//! live workers as the live set holds them.

use std::time::Duration;

/// Who holds a worker id, from `register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The host name it registered from.
    pub host: String,
    /// Its process id on that host (0 when the token did not say).
    pub pid: u32,
    /// The boot and PID namespace the holder runs in (`this_machine`); empty when it did not
    /// say (an older courier).
    pub machine: String,
    /// Its whole token: `host|pid|started|machine`.
    pub token: String,
    /// Its last heartbeat, as Redis holds it: the value a watcher sees change or not.
    pub heartbeat: String,
    /// How old that heartbeat is by Redis's clock.
    pub heartbeat_age: Duration,
}

impl Holder {
    /// A holder from `register`'s answer: its token, heartbeat and the heartbeat's age in ms.
    pub(super) fn parse(token: String, heartbeat: String, age_ms: i64) -> Holder {
        let mut parts = token.splitn(4, '|');
        let host = parts.next().unwrap_or_default().to_string();
        let pid = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let machine = parts.nth(1).unwrap_or_default().to_string();
        Holder {
            host,
            pid,
            machine,
            token,
            heartbeat,
            heartbeat_age: Duration::from_millis(u64::try_from(age_ms).unwrap_or(0)),
        }
    }

    /// Whether the holder runs on this machine, in this boot and PID namespace, so that its
    /// pid can be looked up here. A host name alone is not enough: containers and cloned VMs
    /// share them.
    pub fn on_this_machine(&self) -> bool {
        !self.machine.is_empty() && self.host == this_host() && self.machine == this_machine()
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on host {} (heartbeat {:.1} s ago)",
            self.pid,
            self.host,
            self.heartbeat_age.as_secs_f64()
        )
    }
}

/// A live worker as the queue's live set holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveWorker {
    /// Its worker id.
    pub id: String,
    /// Its last heartbeat, as Redis holds it (ms since the epoch, in Redis's clock).
    pub heartbeat: String,
    /// How old that heartbeat is by Redis's clock: for display only, never to judge liveness.
    pub age: Duration,
}

/// The token identifying this handle against its worker id: host, pid, start time, and a
/// counter so that two handles made in the same millisecond still differ.
pub fn process_token() -> String {
    static HANDLES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = HANDLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!(
        "{}|{}|{started}.{n}|{}",
        this_host(),
        std::process::id(),
        this_machine()
    )
}

/// This boot of this machine and this process's PID namespace, e.g.
/// `6f1c…-boot/pid:[4026531836]`: two processes see each other's pids only when this is the
/// same. Empty where it cannot be told (then no holder counts as on this machine).
pub fn this_machine() -> String {
    #[cfg(target_os = "linux")]
    {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let namespace = std::fs::read_link("/proc/self/ns/pid").unwrap_or_default();
        let (boot, namespace) = (boot.trim(), namespace.to_string_lossy());
        if boot.is_empty() || namespace.is_empty() {
            return String::new();
        }
        format!("{boot}/{namespace}").replace('|', "_")
    }
    #[cfg(not(target_os = "linux"))]
    {
        String::new()
    }
}

/// This machine's host name.
pub fn this_host() -> String {
    gethostname::gethostname().to_string_lossy().replace('|', "_")
}
