//! One partition: its segments, the writer task that appends with group commit, reads,
//! retention.
//!
//! Exactly one task writes a partition. Publishers hand it their records through a channel; it
//! takes everything waiting, writes it with one positional write, makes it durable with one
//! `fdatasync` (with `FsyncPolicy::Always`), and only then makes the records visible to readers
//! and answers every publisher. Publishers arriving during an fsync form the next batch, so the
//! fsync rate stays bounded by the disk, not by the publish rate.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::segment::{self, Scanner, Segment, Step};
use super::{Counters, sync_dir};
use crate::{BrokerError, PartitionStats, Record};

/// The most appends one batch takes, so that answering the first publishers is not held up
/// indefinitely under a flood.
const MAX_BATCH: usize = 1024;
/// Publishers waiting beyond this many appends wait to enqueue: backpressure.
const QUEUE: usize = 4096;

pub(super) struct Append {
    pub payload: Bytes,
    pub reply: oneshot::Sender<Result<u64, BrokerError>>,
}

/// What readers, consumers, retention and the syncer share with the writer.
pub(super) struct Shared {
    pub topic: String,
    pub id: u32,
    pub dir: PathBuf,
    /// Never empty; the last one is the segment the writer appends to.
    segments: RwLock<Vec<Segment>>,
    /// Written since the last fsync (`FsyncPolicy::Interval` only).
    dirty: AtomicBool,
    /// The end offset, for consumers waiting at the end. Closed when the writer stops.
    end: watch::Receiver<u64>,
}

/// A partition as its topic holds it: the way in to its writer.
pub(super) struct Partition {
    pub shared: Arc<Shared>,
    appends: mpsc::Sender<Append>,
}

pub(super) struct WriterConfig {
    pub fsync_always: bool,
    pub segment_bytes: u64,
    pub index_interval: u64,
}

/// Opens (recovering) or creates the partition directory `dir`: every segment, the last one's
/// torn tail cut. Blocking.
pub(super) fn load(dir: &Path, index_interval: u64) -> io::Result<Vec<Segment>> {
    std::fs::create_dir_all(dir)?;
    let mut bases = Vec::new();
    let mut indexes = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = segment::parse_log_file_name(name) {
            bases.push(base);
        } else if let Some(stem) = name.strip_suffix(".index") {
            indexes.push(stem.to_owned());
        }
    }
    bases.sort_unstable();
    // An index whose segment is gone (retention stopped between the two deletes) is only a hint
    // for nothing.
    for stem in indexes {
        let Some(base) = segment::parse_log_file_name(&format!("{stem}.log")) else {
            continue;
        };
        if bases.binary_search(&base).is_err() {
            if let Err(e) = std::fs::remove_file(dir.join(segment::index_file_name(base))) {
                tracing::warn!(dir = %dir.display(), "could not remove an orphaned index: {e}");
            }
        }
    }
    if bases.is_empty() {
        let (created, _) = segment::create(dir, 0)?;
        sync_dir(dir)?;
        return Ok(vec![created]);
    }
    let last = bases.len() - 1;
    let mut segments: Vec<Segment> = Vec::with_capacity(bases.len());
    for (i, &base) in bases.iter().enumerate() {
        let recovered = segment::recover(dir, base, i == last, index_interval)?;
        if let Some(previous) = segments.last() {
            if previous.end != base {
                tracing::warn!(
                    dir = %dir.display(),
                    "the segment before {base} ends at offset {}: offsets in between are not \
                     readable",
                    previous.end
                );
            }
        }
        segments.push(recovered);
    }
    Ok(segments)
}

impl Partition {
    /// Starts the writer task of a loaded partition. Needs a Tokio runtime.
    pub fn start(
        topic: &str,
        id: u32,
        dir: PathBuf,
        segments: Vec<Segment>,
        config: WriterConfig,
        counters: Arc<Counters>,
    ) -> io::Result<Partition> {
        let Some((active, active_file)) = segments
            .last()
            .and_then(|s| s.file.as_ref().map(|file| (s, Arc::clone(file))))
        else {
            return Err(io::Error::other(
                "a partition without an open active segment",
            ));
        };
        let index_file = match OpenOptions::new().write(true).open(&active.index_path) {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::warn!(
                    index = %active.index_path.display(),
                    "appending without an index (it is rebuilt on the next open): {e}"
                );
                None
            }
        };
        let (end_tx, end_rx) = watch::channel(active.end);
        let writer = Writer {
            active_base: active.base,
            active_file,
            index_len: (active.index.len() * 16) as u64,
            index_file,
            size: active.size,
            last_indexed: active.last_indexed_position(),
            next_offset: active.end,
            last_time_us: segments
                .iter()
                .rev()
                .find_map(|s| s.last_time_us)
                .unwrap_or(0),
            pending_truncate: false,
            config,
            counters,
            end_tx,
            shared: Arc::new(Shared {
                topic: topic.to_owned(),
                id,
                dir,
                segments: RwLock::new(segments),
                dirty: AtomicBool::new(false),
                end: end_rx,
            }),
        };
        let shared = Arc::clone(&writer.shared);
        let (appends, queue) = mpsc::channel(QUEUE);
        tokio::spawn(writer.run(queue));
        Ok(Partition { shared, appends })
    }

    /// Appends one record; returns its offset once it is stored as the fsync policy says.
    pub async fn append(&self, payload: Bytes) -> Result<u64, BrokerError> {
        let (reply, answer) = oneshot::channel();
        self.appends
            .send(Append { payload, reply })
            .await
            .map_err(|_| BrokerError::Closed)?;
        answer.await.map_err(|_| BrokerError::Closed)?
    }
}

/// A slice of one segment to scan for a read.
struct Slice {
    /// `None` for a sealed segment: opened for the scan.
    file: Option<Arc<File>>,
    path: PathBuf,
    base: u64,
    position: u64,
    first: u64,
    size: u64,
}

impl Shared {
    fn segments(&self) -> RwLockReadGuard<'_, Vec<Segment>> {
        self.segments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn segments_mut(&self) -> RwLockWriteGuard<'_, Vec<Segment>> {
        self.segments
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receiver of the end offset; `changed` fails once the partition's writer has stopped.
    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.clone()
    }

    pub fn start_offset(&self) -> u64 {
        self.segments().first().map_or(0, |s| s.base)
    }

    pub fn stats(&self) -> PartitionStats {
        let segments = self.segments();
        let start_offset = segments.first().map_or(0, |s| s.base);
        let end_offset = segments.last().map_or(0, |s| s.end);
        PartitionStats {
            partition: self.id,
            start_offset,
            end_offset,
            records: end_offset.saturating_sub(start_offset),
            bytes: segments.iter().map(|s| s.size).sum(),
        }
    }

    /// Up to `max` records from `from` on. Blocking: positional reads, located by the sparse
    /// index, not by scanning from the start.
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<Record>, BrokerError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let (from, slices) = {
            let segments = self.segments();
            let start = segments.first().map_or(0, |s| s.base);
            let from = from.max(start);
            let first = segments
                .partition_point(|s| s.base <= from)
                .saturating_sub(1);
            let mut slices = Vec::new();
            for segment in segments.iter().skip(first).filter(|s| s.end > from) {
                let (position, first) = if slices.is_empty() {
                    segment.seek_point(from)
                } else {
                    (0, segment.base)
                };
                slices.push(Slice {
                    file: segment.file.clone(),
                    path: segment.log_path.clone(),
                    base: segment.base,
                    position,
                    first,
                    size: segment.size,
                });
            }
            (from, slices)
        };
        for slice in slices {
            self.scan(&slice, |frame| {
                if frame.offset >= from {
                    out.push(Record {
                        partition: self.id,
                        offset: frame.offset,
                        time: segment::micros_to_time(frame.time_us),
                        event: frame.payload,
                    });
                }
                out.len() < max
            })?;
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Calls `each` on the frames of `slice` in order while it returns true.
    fn scan(
        &self,
        slice: &Slice,
        mut each: impl FnMut(segment::Frame) -> bool,
    ) -> Result<(), BrokerError> {
        let opened;
        let file = match &slice.file {
            Some(file) => &**file,
            None => match File::open(&slice.path) {
                Ok(file) => {
                    opened = file;
                    &opened
                }
                // Retention deleted it since: its records are no longer held.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(BrokerError::from_io(e)),
            },
        };
        let mut scanner = Scanner::new(file, slice.position, slice.size, slice.first);
        let mut from_index = slice.position > 0;
        let mut seen = false;
        loop {
            match scanner.next_frame().map_err(BrokerError::from_io)? {
                Step::Frame(frame) => {
                    seen = true;
                    if !each(frame) {
                        return Ok(());
                    }
                }
                Step::End => return Ok(()),
                Step::Damaged(damage) if from_index && !seen => {
                    // The index pointed at something else than it says: it is only a hint.
                    tracing::warn!(
                        segment = %slice.path.display(),
                        "index entry for offset {} is wrong ({damage}); scanning the segment",
                        slice.first
                    );
                    scanner = Scanner::new(file, 0, slice.size, slice.base);
                    from_index = false;
                }
                Step::Damaged(damage) => {
                    return Err(BrokerError::Corrupt(format!(
                        "topic `{}` partition {}: {} holds {damage} at byte {}",
                        self.topic,
                        self.id,
                        slice.path.display(),
                        scanner.position()
                    )));
                }
            }
        }
    }

    /// The first offset whose record was appended at or after `time_us`, else the end offset.
    /// Blocking.
    pub fn offset_at(&self, time_us: u64) -> Result<u64, BrokerError> {
        // Append times never decrease within a partition (the writer keeps them monotonic), so
        // the first segment whose last record is late enough holds the answer.
        let (slice, end) = {
            let segments = self.segments();
            let end = segments.last().map_or(0, |s| s.end);
            let slice = segments
                .iter()
                .find(|s| s.last_time_us.is_some_and(|t| t >= time_us))
                .map(|s| Slice {
                    file: s.file.clone(),
                    path: s.log_path.clone(),
                    base: s.base,
                    position: 0,
                    first: s.base,
                    size: s.size,
                });
            (slice, end)
        };
        let Some(slice) = slice else { return Ok(end) };
        let mut found = None;
        self.scan(&slice, |frame| {
            if frame.time_us >= time_us {
                found = Some(frame.offset);
                false
            } else {
                true
            }
        })?;
        Ok(found.unwrap_or(end))
    }

    /// Takes out of the partition the oldest segments past `retention` (by their last record's
    /// time) or beyond `max_bytes`, never the active one. The caller deletes their files.
    pub fn expire(
        &self,
        retention: Option<Duration>,
        max_bytes: Option<u64>,
        now_us: u64,
    ) -> Vec<Segment> {
        let retention_us = retention.map(|r| u64::try_from(r.as_micros()).unwrap_or(u64::MAX));
        let mut segments = self.segments_mut();
        let mut total: u64 = segments.iter().map(|s| s.size).sum();
        let mut expired = 0;
        for segment in segments.iter().take(segments.len().saturating_sub(1)) {
            let too_old = retention_us.is_some_and(|limit| {
                segment
                    .last_time_us
                    .is_some_and(|t| now_us.saturating_sub(t) > limit)
            });
            let too_big = max_bytes.is_some_and(|limit| total > limit);
            if !(too_old || too_big) {
                break;
            }
            total -= segment.size;
            expired += 1;
        }
        segments.drain(..expired).collect()
    }

    /// Fsyncs the active segment if anything was written since the last time.
    pub fn sync_if_dirty(&self, counters: &Counters) -> io::Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let Some(file) = self.segments().last().and_then(|s| s.file.clone()) else {
            return Ok(());
        };
        counters.fsync();
        file.sync_data().inspect_err(|_| {
            self.dirty.store(true, Ordering::Release);
        })
    }
}

/// The state only the writer task touches.
struct Writer {
    shared: Arc<Shared>,
    config: WriterConfig,
    counters: Arc<Counters>,
    end_tx: watch::Sender<u64>,
    active_base: u64,
    active_file: Arc<File>,
    /// `None` once an index write failed: the index is then rebuilt on the next open.
    index_file: Option<File>,
    index_len: u64,
    /// Committed bytes of the active segment: where the next write goes.
    size: u64,
    last_indexed: u64,
    next_offset: u64,
    last_time_us: u64,
    /// A failed write that could not be cut off again: nothing is appended until it is.
    pending_truncate: bool,
}

impl Writer {
    async fn run(self, mut queue: mpsc::Receiver<Append>) {
        let mut writer = self;
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return;
            }
            let appends: VecDeque<Append> = batch.drain(..).collect();
            let mut moved = writer;
            match tokio::task::spawn_blocking(move || {
                moved.commit(appends);
                moved
            })
            .await
            {
                Ok(back) => writer = back,
                Err(e) => {
                    // The publishers of the batch see `Closed`, as does everyone after them.
                    tracing::error!("the event log writer stopped: {e}");
                    return;
                }
            }
        }
    }

    /// Stores a batch and answers each publisher: as many records as fit the active segment per
    /// write, one fsync per write.
    fn commit(&mut self, mut queue: VecDeque<Append>) {
        if self.pending_truncate {
            if let Err(e) = self.active_file.set_len(self.size) {
                fail(queue, &e);
                return;
            }
            self.pending_truncate = false;
        }
        while !queue.is_empty() {
            let time_us = segment::now_micros().max(self.last_time_us);
            let mut buf = Vec::new();
            let mut chunk = Vec::new();
            let mut entries = Vec::new();
            let mut size = self.size;
            let mut last_indexed = self.last_indexed;
            loop {
                let fits = queue.front().is_some_and(|append| {
                    size == 0
                        || size + segment::frame_bytes(append.payload.len())
                            <= self.config.segment_bytes
                });
                if !fits {
                    break;
                }
                let Some(append) = queue.pop_front() else {
                    break;
                };
                let offset = self.next_offset + chunk.len() as u64;
                if size > last_indexed && size - last_indexed >= self.config.index_interval {
                    entries.push((offset, size));
                    last_indexed = size;
                }
                segment::encode(&mut buf, offset, time_us, &append.payload);
                size += segment::frame_bytes(append.payload.len());
                chunk.push(append);
            }
            if chunk.is_empty() {
                if let Err(e) = self.roll() {
                    fail(queue, &e);
                    return;
                }
                continue;
            }
            let first = self.next_offset;
            match self.append(&buf, chunk.len() as u64, entries, time_us) {
                Ok(()) => {
                    for (i, append) in chunk.into_iter().enumerate() {
                        // A publisher that went away does not need its answer.
                        let _ = append.reply.send(Ok(first + i as u64));
                    }
                }
                Err(e) => {
                    fail(chunk, &e);
                    fail(queue, &e);
                    return;
                }
            }
        }
    }

    /// Writes whole frames at the end of the active segment and makes them durable and visible,
    /// or leaves the segment as it was.
    fn append(
        &mut self,
        buf: &[u8],
        count: u64,
        entries: Vec<(u64, u64)>,
        time_us: u64,
    ) -> io::Result<()> {
        let at = self.size;
        let written = self.active_file.write_all_at(buf, at).and_then(|()| {
            if self.config.fsync_always {
                self.counters.fsync();
                self.active_file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Nothing half-written may stay: a later open would otherwise cut the log there,
            // taking every record written after it along.
            if let Err(undo) = self.active_file.set_len(at) {
                tracing::error!(
                    topic = %self.shared.topic,
                    partition = self.shared.id,
                    "could not cut a failed write off the event log ({undo}); appends are \
                     refused until it can be"
                );
                self.pending_truncate = true;
            }
            return Err(e);
        }
        self.size += buf.len() as u64;
        self.next_offset += count;
        self.last_time_us = time_us;
        if let Some(&(_, position)) = entries.last() {
            self.last_indexed = position;
        }
        self.write_index(&entries);
        {
            let mut segments = self.shared.segments_mut();
            if let Some(active) = segments.last_mut().filter(|s| s.base == self.active_base) {
                active.size = self.size;
                active.end = self.next_offset;
                active.last_time_us = Some(time_us);
                active.index.extend(entries);
            }
        }
        if !self.config.fsync_always {
            self.shared.dirty.store(true, Ordering::Release);
        }
        self.counters.committed(count);
        self.end_tx.send_replace(self.next_offset);
        Ok(())
    }

    fn write_index(&mut self, entries: &[(u64, u64)]) {
        if entries.is_empty() {
            return;
        }
        let Some(file) = &self.index_file else { return };
        let bytes = segment::encode_index(entries);
        match file.write_all_at(&bytes, self.index_len) {
            Ok(()) => self.index_len += bytes.len() as u64,
            Err(e) => {
                tracing::warn!(
                    topic = %self.shared.topic,
                    partition = self.shared.id,
                    "stopped writing the offset index ({e}); it is rebuilt on the next open"
                );
                // Best effort: recovery ignores a partial entry anyway.
                let _ = file.set_len(self.index_len);
                self.index_file = None;
            }
        }
    }

    /// Seals the active segment and starts a new one at the next offset.
    fn roll(&mut self) -> io::Result<()> {
        // Sealed segments are durable whatever the policy, so that only the active segment can
        // ever have a torn tail.
        self.counters.fsync();
        self.active_file.sync_data()?;
        if let Some(index) = &self.index_file {
            if let Err(e) = index.sync_data() {
                tracing::warn!(topic = %self.shared.topic, "could not fsync an index: {e}");
            }
        }
        let (created, index_file) = segment::create(&self.shared.dir, self.next_offset)?;
        sync_dir(&self.shared.dir)?;
        let Some(file) = created.file.clone() else {
            return Err(io::Error::other("a new segment that is not open"));
        };
        {
            let mut segments = self.shared.segments_mut();
            if let Some(sealed) = segments.last_mut().filter(|s| s.base == self.active_base) {
                sealed.file = None;
            }
            segments.push(created);
        }
        self.active_base = self.next_offset;
        self.active_file = file;
        self.index_file = Some(index_file);
        self.index_len = 0;
        self.size = 0;
        self.last_indexed = 0;
        Ok(())
    }
}

/// Answers every append with (a copy of) the error.
fn fail(appends: impl IntoIterator<Item = Append>, error: &io::Error) {
    for append in appends {
        let copy = match error.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(error.kind(), error.to_string()),
        };
        let _ = append.reply.send(Err(BrokerError::from_io(copy)));
    }
}
