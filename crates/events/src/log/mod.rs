//! The embedded event log: the default [`Broker`], an append-only segmented log per partition.
//!
//! Layout under the directory it is opened on (`.flotilla/events/`):
//!
//! ```text
//! <topic>/topic.json                      partitions, retention, max_bytes
//! <topic>/<partition>/<base:020>.log      segments: framed records (see below)
//! <topic>/<partition>/<base:020>.index    sparse offset → file position index, a rebuildable hint
//! <topic>/groups/<group>.json             the group's committed offsets, replaced atomically
//! ```
//!
//! Records are framed `length u32 LE | crc32c u32 LE | offset u64 LE | time u64 LE | payload`
//! (the CRC covers everything after itself); offsets are 0, 1, 2, … per partition. A segment is
//! sealed (fsynced) and a new one started when the next write would take it past
//! `segment_bytes`.
//!
//! Durability: a publish is answered only after its record is written and, with
//! [`FsyncPolicy::Always`], `fdatasync`ed. One writer task per partition batches whatever
//! publishers are waiting into one write and one fsync (group commit), so many concurrent
//! publishers cost about one fsync per disk round trip rather than one each. Readers and
//! consumers only see records once they are durable.
//!
//! Recovery on open scans each segment from its last index entry that the log confirms; the last
//! segment is cut at the first record whose length is impossible, whose CRC fails or that is
//! truncated (a torn tail: nothing acknowledged can be there, since acknowledged records were
//! fsynced before any later write). Sealed segments are never cut.
//!
//! Consumers hand out one record at a time per group and partition, from the group's committed
//! offset. Attempt numbers are kept in memory only: after a restart the record that was not
//! acknowledged is handed out again as attempt 1.
//!
//! Two processes must not open the same directory at once: nothing here locks it.

mod consumer;
mod group;
mod partition;
mod segment;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use self::consumer::LogConsumer;
use self::group::Groups;
use self::partition::{Partition, WriterConfig};
use crate::{
    BoxFuture, Broker, BrokerError, Consumer, GroupStats, Published, Record, TopicConfig,
    TopicStats, any_partition, partition_for,
};

/// How often retention runs by itself.
const RETENTION_EVERY: Duration = Duration::from_secs(30);
/// More partitions than this are refused (and a `topic.json` asking for more is damaged): each
/// is a directory and a writer task.
const MAX_PARTITIONS: u32 = 4096;
/// Longer topic names are refused: with the partition and segment names below them they would
/// approach file system limits.
const MAX_TOPIC_NAME: usize = 200;

/// When appended records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before the publish is acknowledged; concurrent publishers to a partition share an fsync.
    Always,
    /// Every so often in the background: a publish is acknowledged once written to the OS, so a
    /// power loss (not a process crash) can lose up to this much.
    Interval(Duration),
}

/// How the log stores records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub fsync: FsyncPolicy,
    /// A segment is sealed when the next record would take it past this (a larger record gets a
    /// segment of its own). Retention deletes whole segments.
    pub segment_bytes: u64,
    /// An index entry is added whenever this many bytes were appended since the previous one:
    /// a read scans at most about this much before reaching its first record.
    pub index_interval_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            fsync: FsyncPolicy::Always,
            segment_bytes: 64 << 20,
            index_interval_bytes: 4 << 10,
        }
    }
}

/// Running totals since the log was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LogCounters {
    /// Records appended.
    pub records: u64,
    /// Writes that appended them: records / commits is the average group-commit batch.
    pub commits: u64,
    /// `fdatasync`s of segment files.
    pub fsyncs: u64,
}

#[derive(Default)]
struct Counters {
    records: AtomicU64,
    commits: AtomicU64,
    fsyncs: AtomicU64,
}

impl Counters {
    fn fsync(&self) {
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
    }

    fn committed(&self, records: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
    }
}

/// The embedded log. Cheap to clone: clones share one log. Background tasks (retention, and the
/// syncer of [`FsyncPolicy::Interval`]) stop when the last clone is dropped.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    config: LogConfig,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Serialises topic creation, which is rare and touches the disk.
    creating: tokio::sync::Mutex<()>,
    counters: Arc<Counters>,
}

struct Topic {
    dir: PathBuf,
    limits: RwLock<Limits>,
    partitions: Vec<Partition>,
    groups: Groups,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    retention: Option<Duration>,
    max_bytes: Option<u64>,
}

/// `topic.json`.
#[derive(Debug, Serialize, Deserialize)]
struct TopicFile {
    name: String,
    partitions: u32,
    /// Humantime, e.g. `"7days"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retention: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_bytes: Option<u64>,
}

impl TopicFile {
    fn new(name: &str, partitions: u32, limits: Limits) -> TopicFile {
        TopicFile {
            name: name.to_owned(),
            partitions,
            retention: limits
                .retention
                .map(|r| humantime::format_duration(r).to_string()),
            max_bytes: limits.max_bytes,
        }
    }

    fn limits(&self) -> io::Result<Limits> {
        let retention = match &self.retention {
            Some(text) => Some(
                humantime::parse_duration(text)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            ),
            None => None,
        };
        Ok(Limits {
            retention,
            max_bytes: self.max_bytes,
        })
    }
}

/// A topic read from disk, before its writers are started.
struct LoadedTopic {
    name: String,
    dir: PathBuf,
    limits: Limits,
    partitions: Vec<Vec<segment::Segment>>,
    groups: Groups,
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether a topic name can be a directory here: the binary validates names, but a name that
/// could escape the directory must not reach the file system whatever the caller.
fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains("..")
        && !name.chars().any(char::is_control)
}

/// Makes a directory's entries (created, renamed, removed files) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new contents.
fn write_atomic(path: &Path, bytes: &[u8], fsync: bool) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        if fsync {
            file.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        match path.parent() {
            Some(parent) if fsync => sync_dir(parent),
            _ => Ok(()),
        }
    })();
    if result.is_err() {
        // Best effort: a leftover temp file is ignored or removed on open.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn load_topic(
    dir: &Path,
    name: &str,
    partitions: u32,
    limits: Limits,
    config: &LogConfig,
) -> io::Result<LoadedTopic> {
    let mut loaded = Vec::with_capacity(partitions as usize);
    for partition in 0..partitions {
        loaded.push(partition::load(
            &dir.join(partition.to_string()),
            config.index_interval_bytes,
        )?);
    }
    let groups = Groups::load(&dir.join("groups"), config.fsync == FsyncPolicy::Always)?;
    let ends: Vec<u64> = loaded
        .iter()
        .map(|segments| segments.last().map_or(0, |s| s.end))
        .collect();
    groups.clamp(&ends)?;
    Ok(LoadedTopic {
        name: name.to_owned(),
        dir: dir.to_owned(),
        limits,
        partitions: loaded,
        groups,
    })
}

/// Every topic under `root`. A directory without a readable `topic.json` is reported and
/// skipped; creating the topic again adopts what it holds.
fn load_all(root: &Path, config: &LogConfig) -> io::Result<Vec<LoadedTopic>> {
    std::fs::create_dir_all(root)?;
    let mut topics = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let dir = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| valid_topic_name(n)) else {
            continue;
        };
        let described = std::fs::read(dir.join("topic.json")).and_then(|bytes| {
            let file: TopicFile = serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if file.name != name || file.partitions == 0 || file.partitions > MAX_PARTITIONS {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "describes topic `{}` with {} partitions",
                        file.name, file.partitions
                    ),
                ));
            }
            let limits = file.limits()?;
            Ok((file.partitions, limits))
        });
        match described {
            Ok((partitions, limits)) => {
                topics.push(load_topic(&dir, name, partitions, limits, config)?);
            }
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                "not opening a topic directory without a usable topic.json (creating the topic \
                 again adopts its records): {e}"
            ),
        }
    }
    Ok(topics)
}

impl EventLog {
    /// Opens (creating if need be) the log in `dir`, recovering every partition: torn tails are
    /// cut, missing or damaged indexes rebuilt. Starts the retention task (and the syncer for
    /// [`FsyncPolicy::Interval`]) on the current Tokio runtime.
    pub async fn open(dir: &Path, config: LogConfig) -> Result<Self, BrokerError> {
        let root = dir.to_owned();
        let load_config = config.clone();
        let loaded = tokio::task::spawn_blocking(move || load_all(&root, &load_config))
            .await
            .map_err(|_| BrokerError::Closed)?
            .map_err(BrokerError::from_io)?;
        let counters = Arc::new(Counters::default());
        let mut topics = HashMap::new();
        for topic in loaded {
            let (name, topic) = start_topic(topic, &config, &counters)?;
            topics.insert(name, topic);
        }
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            config,
            topics: RwLock::new(topics),
            creating: tokio::sync::Mutex::new(()),
            counters,
        });
        spawn_background(&inner);
        Ok(EventLog { inner })
    }

    /// Totals since open: records, commits (writes) and fsyncs. With [`FsyncPolicy::Always`],
    /// `fsyncs` well below `records` is group commit at work.
    pub fn counters(&self) -> LogCounters {
        let counters = &self.inner.counters;
        LogCounters {
            records: counters.records.load(Ordering::Relaxed),
            commits: counters.commits.load(Ordering::Relaxed),
            fsyncs: counters.fsyncs.load(Ordering::Relaxed),
        }
    }

    /// Deletes, in every topic, the whole segments past the topic's retention or beyond its
    /// `max_bytes`, oldest first, never a partition's active segment. Runs by itself every 30
    /// seconds; returns how many segments went.
    pub async fn enforce_retention(&self) -> Result<usize, BrokerError> {
        let now = segment::now_micros();
        let mut expired = Vec::new();
        for topic in self.topics() {
            let limits = *read_lock(&topic.limits);
            if limits.retention.is_none() && limits.max_bytes.is_none() {
                continue;
            }
            for partition in &topic.partitions {
                let gone = partition
                    .shared
                    .expire(limits.retention, limits.max_bytes, now);
                if !gone.is_empty() {
                    expired.push((partition.shared.dir.clone(), gone));
                }
            }
        }
        if expired.is_empty() {
            return Ok(0);
        }
        tokio::task::spawn_blocking(move || {
            let mut count = 0;
            for (dir, segments) in expired {
                for segment in segments {
                    count += 1;
                    tracing::info!(
                        segment = %segment.log_path.display(),
                        records = segment.end - segment.base,
                        "retention deletes a segment"
                    );
                    // The log before its index: an index left behind is removed on open, a log
                    // left behind is merely kept longer.
                    for path in [&segment.log_path, &segment.index_path] {
                        if let Err(e) = std::fs::remove_file(path) {
                            if e.kind() != io::ErrorKind::NotFound {
                                tracing::warn!(file = %path.display(), "could not delete: {e}");
                            }
                        }
                    }
                }
                if let Err(e) = sync_dir(&dir) {
                    tracing::warn!(dir = %dir.display(), "could not fsync: {e}");
                }
            }
            count
        })
        .await
        .map_err(|_| BrokerError::Closed)
    }

    /// Fsyncs whatever was written and not yet synced (for [`FsyncPolicy::Interval`]; a no-op
    /// with `Always`), e.g. before a graceful shutdown.
    pub async fn flush(&self) -> Result<(), BrokerError> {
        sync_partitions(&self.inner).await
    }

    fn topics(&self) -> Vec<Arc<Topic>> {
        read_lock(&self.inner.topics).values().cloned().collect()
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, BrokerError> {
        read_lock(&self.inner.topics)
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))
    }

    async fn create(&self, config: &TopicConfig) -> Result<(), BrokerError> {
        if !valid_topic_name(&config.name) {
            return Err(BrokerError::UnknownTopic(config.name.clone()));
        }
        if config.partitions == 0 || config.partitions > MAX_PARTITIONS {
            return Err(BrokerError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "topic `{}` asks for {} partitions: from 1 to {MAX_PARTITIONS} are possible",
                    config.name, config.partitions
                ),
            )));
        }
        let limits = Limits {
            retention: config.retention,
            max_bytes: config.max_bytes,
        };
        let _creating = self.inner.creating.lock().await;
        let existing = read_lock(&self.inner.topics).get(&config.name).cloned();
        if let Some(topic) = existing {
            let partitions = topic.partitions.len() as u32;
            if partitions != config.partitions {
                return Err(BrokerError::PartitionsChanged {
                    topic: config.name.clone(),
                    existing: partitions,
                    wanted: config.partitions,
                });
            }
            if *read_lock(&topic.limits) != limits {
                let file = TopicFile::new(&config.name, partitions, limits);
                let path = topic.dir.join("topic.json");
                write_topic_file(path, file).await?;
                *write_lock(&topic.limits) = limits;
            }
            return Ok(());
        }

        let dir = self.inner.dir.join(&config.name);
        let name = config.name.clone();
        let partitions = config.partitions;
        let log_config = self.inner.config.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            // The partitions first, `topic.json` last: a crash in between leaves a directory
            // that open skips and the next create adopts.
            let loaded = load_topic(&dir, &name, partitions, limits, &log_config)?;
            let file = TopicFile::new(&name, partitions, limits);
            let bytes = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
            write_atomic(&dir.join("topic.json"), &bytes, true)?;
            if let Some(root) = dir.parent() {
                sync_dir(root)?;
            }
            Ok::<_, io::Error>(loaded)
        })
        .await
        .map_err(|_| BrokerError::Closed)?
        .map_err(BrokerError::from_io)?;
        let (name, topic) = start_topic(loaded, &self.inner.config, &self.inner.counters)?;
        write_lock(&self.inner.topics).insert(name, topic);
        Ok(())
    }

    fn partition<'t>(
        topic: &'t Topic,
        name: &str,
        partition: u32,
    ) -> Result<&'t Partition, BrokerError> {
        topic
            .partitions
            .get(partition as usize)
            .ok_or_else(|| BrokerError::UnknownPartition {
                topic: name.to_owned(),
                partition,
            })
    }

    async fn append(
        &self,
        name: &str,
        key: Option<&str>,
        event: Bytes,
    ) -> Result<Published, BrokerError> {
        let topic = self.topic(name)?;
        if event.len() > segment::MAX_PAYLOAD {
            return Err(BrokerError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "an event of {} bytes is over the log's limit of {} bytes",
                    event.len(),
                    segment::MAX_PAYLOAD
                ),
            )));
        }
        let count = topic.partitions.len() as u32;
        let partition = match key {
            Some(key) => partition_for(key, count),
            None => any_partition(count),
        };
        let offset = Self::partition(&topic, name, partition)?
            .append(event)
            .await?;
        Ok(Published { partition, offset })
    }

    async fn read_records(
        &self,
        name: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, BrokerError> {
        let topic = self.topic(name)?;
        let shared = Arc::clone(&Self::partition(&topic, name, partition)?.shared);
        tokio::task::spawn_blocking(move || shared.read(from, max))
            .await
            .map_err(|_| BrokerError::Closed)?
    }

    async fn consumer(
        &self,
        name: &str,
        group: &str,
        partition: u32,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        let topic = self.topic(name)?;
        let shared = Arc::clone(&Self::partition(&topic, name, partition)?.shared);
        let group = topic.groups.get_or_create(group).await?;
        Ok(Box::new(LogConsumer::new(shared, group)))
    }

    async fn move_group(
        &self,
        name: &str,
        group: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), BrokerError> {
        let topic = self.topic(name)?;
        Self::partition(&topic, name, partition)?;
        let group = topic.groups.get_or_create(group).await?;
        group.commit(partition, offset).await
    }

    async fn find_offset(
        &self,
        name: &str,
        partition: u32,
        time: SystemTime,
    ) -> Result<u64, BrokerError> {
        let topic = self.topic(name)?;
        let shared = Arc::clone(&Self::partition(&topic, name, partition)?.shared);
        let micros = segment::time_to_micros(time);
        tokio::task::spawn_blocking(move || shared.offset_at(micros))
            .await
            .map_err(|_| BrokerError::Closed)?
    }

    fn topic_stats(&self, name: &str) -> Result<TopicStats, BrokerError> {
        let topic = self.topic(name)?;
        let partitions: Vec<_> = topic.partitions.iter().map(|p| p.shared.stats()).collect();
        let mut groups = Vec::new();
        for group in topic.groups.all() {
            for stats in &partitions {
                let next_offset = group
                    .committed(stats.partition)
                    .unwrap_or(stats.start_offset)
                    .max(stats.start_offset);
                groups.push(GroupStats {
                    group: group.name.clone(),
                    partition: stats.partition,
                    next_offset,
                    lag: stats.end_offset.saturating_sub(next_offset),
                });
            }
        }
        Ok(TopicStats {
            topic: name.to_owned(),
            partitions,
            groups,
        })
    }
}

async fn write_topic_file(path: PathBuf, file: TopicFile) -> Result<(), BrokerError> {
    tokio::task::spawn_blocking(move || {
        let bytes = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        write_atomic(&path, &bytes, true)
    })
    .await
    .map_err(|_| BrokerError::Closed)?
    .map_err(BrokerError::from_io)
}

fn start_topic(
    loaded: LoadedTopic,
    config: &LogConfig,
    counters: &Arc<Counters>,
) -> Result<(String, Arc<Topic>), BrokerError> {
    let mut partitions = Vec::with_capacity(loaded.partitions.len());
    for (id, segments) in loaded.partitions.into_iter().enumerate() {
        let id = id as u32;
        let partition = Partition::start(
            &loaded.name,
            id,
            loaded.dir.join(id.to_string()),
            segments,
            WriterConfig {
                fsync_always: config.fsync == FsyncPolicy::Always,
                segment_bytes: config.segment_bytes,
                index_interval: config.index_interval_bytes,
            },
            Arc::clone(counters),
        )
        .map_err(BrokerError::from_io)?;
        partitions.push(partition);
    }
    let topic = Topic {
        dir: loaded.dir,
        limits: RwLock::new(loaded.limits),
        partitions,
        groups: loaded.groups,
    };
    Ok((loaded.name, Arc::new(topic)))
}

async fn sync_partitions(inner: &Inner) -> Result<(), BrokerError> {
    let partitions: Vec<_> = read_lock(&inner.topics)
        .values()
        .flat_map(|t| t.partitions.iter().map(|p| Arc::clone(&p.shared)))
        .collect();
    let counters = Arc::clone(&inner.counters);
    tokio::task::spawn_blocking(move || {
        let mut first_error = None;
        for partition in partitions {
            if let Err(e) = partition.sync_if_dirty(&counters) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })
    .await
    .map_err(|_| BrokerError::Closed)?
    .map_err(BrokerError::from_io)
}

/// Retention every [`RETENTION_EVERY`], and the syncer of [`FsyncPolicy::Interval`]; both end
/// once the log is dropped.
fn spawn_background(inner: &Arc<Inner>) {
    let weak: Weak<Inner> = Arc::downgrade(inner);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RETENTION_EVERY).await;
            let Some(inner) = weak.upgrade() else { return };
            if let Err(e) = (EventLog { inner }).enforce_retention().await {
                tracing::warn!("event log retention failed: {e}");
            }
        }
    });
    if let FsyncPolicy::Interval(every) = inner.config.fsync {
        let weak = Arc::downgrade(inner);
        let every = every.max(Duration::from_millis(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = sync_partitions(&inner).await {
                    tracing::warn!("event log fsync failed: {e}");
                }
            }
        });
    }
}

impl Broker for EventLog {
    fn create_topic<'a>(
        &'a self,
        config: &'a TopicConfig,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.create(config))
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: Option<&'a str>,
        event: Bytes,
    ) -> BoxFuture<'a, Result<Published, BrokerError>> {
        Box::pin(self.append(topic, key, event))
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Record>, BrokerError>> {
        Box::pin(self.read_records(topic, partition, from, max))
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        partition: u32,
        _max_attempts: u32,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>, BrokerError>> {
        // The attempt number is reported with each delivery; giving up is the caller's call.
        Box::pin(self.consumer(topic, group, partition))
    }

    fn seek<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        partition: u32,
        offset: u64,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.move_group(topic, group, partition, offset))
    }

    fn offset_at<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        time: SystemTime,
    ) -> BoxFuture<'a, Result<u64, BrokerError>> {
        Box::pin(self.find_offset(topic, partition, time))
    }

    fn stats<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<TopicStats, BrokerError>> {
        Box::pin(async move { self.topic_stats(topic) })
    }
}
