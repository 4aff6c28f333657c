//! Event streams: durable, at-least-once, ordered per partition key.
//!
//! A mechanism crate. Services publish [CloudEvents](cloudevent) through their sidecar; a
//! [`Broker`] makes each one durable before the publish is acknowledged and hands it, partition
//! by partition and in order, to one [`Consumer`] per subscribing service (its consumer group).
//! The delivery engine above it (in the binary) pushes each record to the subscriber through the
//! proxy stack, acknowledging on 2xx and retrying with backoff otherwise, and moves a record that
//! exhausted its attempts to the topic's dead-letter topic.
//!
//! Two backends behind the one trait, tested by one shared suite:
//! - [`log::EventLog`], the embedded default: an append-only segmented log per partition under
//!   `.flotilla/events/`, records framed with length and CRC32C, group commit for
//!   `fsync = "always"`, recovery that truncates a torn tail.
//! - [`nats::JetStream`]: NATS JetStream, topics as streams, consumer groups as durable pull
//!   consumers with explicit acknowledgement.

pub mod cloudevent;
pub mod engine;
pub mod log;
pub mod nats;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use cloudevent::{Event, EventError};

/// A boxed future, so that [`Broker`] can be used as a trait object (`Arc<dyn Broker>`): the
/// backend is chosen by the manifest at run time.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A topic as the manifest declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    pub name: String,
    /// Ordering is kept per partition; a record's partition comes from its key.
    pub partitions: u32,
    /// Records older than this may be deleted (whole segments at a time).
    pub retention: Option<Duration>,
    /// Each partition is kept under about this many bytes, oldest segments deleted first.
    pub max_bytes: Option<u64>,
}

impl TopicConfig {
    /// The dead-letter topic of `topic`: one partition, kept as long as its topic.
    pub fn dead_letters(&self) -> TopicConfig {
        TopicConfig {
            name: dead_letter_topic(&self.name),
            partitions: 1,
            retention: self.retention,
            max_bytes: self.max_bytes,
        }
    }
}

/// `order.placed` → `order.placed.dlq`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Where a published record landed. `offset` increases strictly within a partition; the embedded
/// log numbers records 0, 1, 2, …; JetStream uses its stream sequence, which may leave gaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub partition: u32,
    pub offset: u64,
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: u32,
    pub offset: u64,
    /// When the broker stored it.
    pub time: SystemTime,
    /// The event, in CloudEvents structured mode (JSON).
    pub event: Bytes,
}

/// The position of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStats {
    pub partition: u32,
    /// The oldest offset still held (retention deletes before it).
    pub start_offset: u64,
    /// The offset the next record will get: `end_offset - start_offset` records at most.
    pub end_offset: u64,
    /// Records held.
    pub records: u64,
    pub bytes: u64,
}

/// How far one consumer group is in one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStats {
    pub group: String,
    pub partition: u32,
    /// The next offset the group will receive.
    pub next_offset: u64,
    /// Records stored and not yet acknowledged by the group.
    pub lag: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicStats {
    pub topic: String,
    pub partitions: Vec<PartitionStats>,
    pub groups: Vec<GroupStats>,
}

/// What went wrong in a broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    #[error("topic `{topic}` has no partition {partition}")]
    UnknownPartition { topic: String, partition: u32 },
    #[error("topic `{topic}` exists with {existing} partitions, not {wanted}")]
    PartitionsChanged {
        topic: String,
        existing: u32,
        wanted: u32,
    },
    /// The disk is full: nothing was acknowledged that is not stored.
    #[error("no space left to store the event: {0}")]
    Full(String),
    #[error("storage failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the stored log is damaged: {0}")]
    Corrupt(String),
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
    #[error("the broker is closed")]
    Closed,
}

impl BrokerError {
    /// `std::io::Error` for a full disk becomes [`BrokerError::Full`], so the API can answer 507.
    pub fn from_io(error: std::io::Error) -> Self {
        if error.kind() == std::io::ErrorKind::StorageFull || error.raw_os_error() == Some(28) {
            BrokerError::Full(error.to_string())
        } else {
            BrokerError::Io(error)
        }
    }
}

/// One record handed to a consumer group, with the how-many-th time it is handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub record: Record,
    /// 1 on first delivery, 2 after one `nack`, …
    pub attempt: u32,
}

/// A durable event store with consumer groups.
///
/// Every method may be called concurrently from many tasks. A publish that returns `Ok` is
/// durable as the backend's durability setting defines it (for the embedded log with
/// `fsync = "always"`: on disk, surviving `kill -9` and power loss).
pub trait Broker: Send + Sync + 'static {
    /// Creates the topic, or checks an existing one has the same number of partitions (a
    /// changed retention is applied). Idempotent.
    fn create_topic<'a>(
        &'a self,
        config: &'a TopicConfig,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Appends `event` (structured-mode JSON) to the partition its `key` hashes to (see
    /// [`partition_for`]); no key spreads records over the partitions.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: Option<&'a str>,
        event: Bytes,
    ) -> BoxFuture<'a, Result<Published, BrokerError>>;

    /// Up to `max` records of a partition from offset `from` on (from the oldest held when
    /// `from` is older), in offset order; empty at the end. Does not wait.
    fn read<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Record>, BrokerError>>;

    /// The consumer of `group` for one partition of `topic`, starting at the group's committed
    /// position (the partition's start for a new group). A record not acknowledged is handed out
    /// again; the backend gives up after `max_attempts` only in the sense that it reports the
    /// attempt number: the caller decides to dead-letter and `ack`.
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        partition: u32,
        max_attempts: u32,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>, BrokerError>>;

    /// Moves `group`'s position in a partition, for replays: the next delivery is the first
    /// record at or after `offset`. Takes effect for consumers subscribed afterwards.
    fn seek<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        partition: u32,
        offset: u64,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// The first offset at or after `time` in a partition (the end offset when none is), for
    /// replays from a time.
    fn offset_at<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        time: SystemTime,
    ) -> BoxFuture<'a, Result<u64, BrokerError>>;

    /// Partitions with their offsets, and every group's position and lag.
    fn stats<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<TopicStats, BrokerError>>;
}

/// One consumer group's reader of one partition: records strictly in order, one at a time.
pub trait Consumer: Send {
    /// The next record: the one after the last acknowledged, or the same again (attempt + 1)
    /// after a `nack`, once its delay has passed. Waits for a record to be published when there
    /// is none.
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>>;

    /// The last delivered record is done with: the group's position moves past it, durably.
    fn ack(&mut self) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// The last delivered record failed: hand it out again after `delay`.
    fn nack(&mut self, delay: Duration) -> BoxFuture<'_, Result<(), BrokerError>>;
}

/// The partition a key goes to: FNV-1a, stable across processes, machines and versions, so a
/// key keeps its partition (and its order) across restarts and between backends.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

/// Where an unkeyed record goes.
pub fn any_partition(partitions: u32) -> u32 {
    fastrand::u32(..partitions.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_their_partition() {
        assert_eq!(partition_for("order-1", 4), partition_for("order-1", 4));
        let spread: std::collections::HashSet<u32> = (0..100)
            .map(|n| partition_for(&format!("order-{n}"), 4))
            .collect();
        assert_eq!(spread.len(), 4);
        assert_eq!(partition_for("anything", 1), 0);
        // Pinned: changing the hash would reorder every stored stream.
        assert_eq!(partition_for("order-42", 16), 4);
    }
}
