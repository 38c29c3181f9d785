//! Redis: every key name and every script lives here. Each move of a message between keys is one
//! command or one Lua script, so a crash at any instant leaves every message in exactly one key
//! (or, around a crash, two: a duplicate, never a loss). Every script is safe to run twice.
//!
//! The parts: `handle` (a worker's `Queue`, every move it makes) and `acks` (its gathered
//! acknowledgements); `scripts` (all the Lua); `keys` (every key name); `connect` (one
//! server, Sentinel or a cluster, behind one `Conn`); `error` (`QueueError` and the one
//! reading of "Redis is unavailable"); `identity` (who holds a worker id); `info` (the
//! server's version and INFO); `ops` and `dead` (the command line's and the admin port's
//! operator work: enqueue, snapshot, the dead-letter list by position); `locate` (where a
//! message is); `acl` (the permissions courier needs); `time` (Redis times as ms).

mod acks;
pub mod acl;
mod connect;
mod dead;
mod error;
mod handle;
mod identity;
mod info;
mod keys;
mod locate;
mod ops;
mod scripts;
mod time;

pub use self::acks::Acks;
pub use self::connect::{Conn, Connector};
#[cfg(feature = "fuzzing")]
pub(crate) use self::dead::parse_page;
pub use self::dead::{
    dead_page, drop_dead_at, move_dead_many, purge_dead, requeue_dead_at, sweep_dead, DeadMove, DeadPage, DeadSlot,
    PageRequest,
};
pub(crate) use self::error::unavailable;
pub use self::error::QueueError;
pub use self::handle::{Claimed, Depths, Promoted, Queue};
pub use self::identity::{process_token, this_host, this_machine, Holder, LiveWorker};
pub use self::info::{info_texts, server_version, supported_version, MIN_REDIS};
pub use self::keys::{cluster_safe_name, hash_tag, slot_part, Keys};
pub use self::locate::{locate, Place};
pub use self::ops::{connect_once, enqueue, snapshot, wait_replicas, Snapshot};
pub use self::scripts::DLQ_TOMBSTONE;
