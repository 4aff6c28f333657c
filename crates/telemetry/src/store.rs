//! Durable telemetry: spans and log lines in SQLite.
//!
//! The in-memory [`TraceStore`](crate::TraceStore) and [`LogStore`](crate::LogStore) are the hot
//! tier: bounded, newest only, gone on restart. [`TelemetryDb`] is the durable tier behind them,
//! one `telemetry.db` file (embedded, by default under `.flotilla/telemetry/`) that the control API
//! falls back to for older data, for full-text log search and after a restart.
//!
//! - **Writes never block the request path.** Recording is a `try_send` into a bounded queue; a
//!   single writer thread drains it and commits whatever has piled up in one transaction, so an
//!   idle fleet sees its data within milliseconds and a busy one gets large, cheap batches. When
//!   the queue is full the item is dropped and counted, never waited for.
//! - **Reads run beside the writer.** The database is in WAL mode, and reads use a connection of
//!   their own, so a query never waits for a batch to commit (nor a batch for a query).
//! - **Bounded on disk.** Rows older than [`Retention::max_age`] are deleted, and when the data
//!   outgrows [`Retention::max_bytes`] the oldest rows go until it is back under 90% of it; the
//!   file is created with `auto_vacuum=INCREMENTAL`, so freed pages are given back to the file
//!   system instead of lingering in it.
//! - **`grep` is indexed.** Log lines are indexed by an FTS5 table with the `trigram` tokenizer,
//!   the one tokenizer that answers substring queries (in the middle of a word too) rather than
//!   word queries, so `grep` keeps the meaning it has in memory: a case-insensitive substring.
//!
//! Times are kept to the microsecond, the precision they have on the wire.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, ToSql, TransactionBehavior, params};
use serde::Serialize;

use crate::level::Level;
use crate::logs::{LogQuery, LogRecord, Stream};
use crate::span::{AttributeValue, Span, TraceId};
use crate::traces::{TraceQuery, TraceSummary, depths, summarize};

/// The file [`TelemetryDb::open`] creates in its directory.
pub const DB_FILE: &str = "telemetry.db";

/// The layout this code reads and writes, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 2;

/// Items waiting for the writer. The queue is the only buffer between the request path and the
/// disk, and it is bounded: a span is a few hundred bytes, so a full queue holds a few MiB plus
/// the strings its items point to, whatever the load. Past that, items are dropped and counted.
const QUEUE_CAPACITY: usize = 16_384;

/// Most items the writer commits in one transaction: large enough that batching amortises the
/// commit under load, small enough that a flush or a retention request queued behind a burst is
/// not kept waiting long.
const BATCH_MAX: usize = 4_096;

/// How often the writer applies the retention policy on its own.
const RETENTION_EVERY: Duration = Duration::from_secs(30);

/// Rows deleted per statement by retention, so that no single transaction (and no WAL) grows with
/// the size of the backlog.
const DELETE_CHUNK: u64 = 5_000;

/// Rounds of "delete the oldest, measure again" before a size pass gives up until next time.
const SHRINK_ROUNDS: usize = 8;

/// How long a connection waits for a lock (another process on the same file, a checkpoint)
/// before reporting busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The WAL is truncated back to this after a checkpoint, so one large retention pass does not
/// leave a WAL file as large as what it deleted.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// The first window [`TelemetryDb::traces`] looks in for the newest traces, in microseconds.
const FIRST_WINDOW_US: i64 = 60_000_000;

/// Least time between two warnings from the writer, which could otherwise log a warning per
/// batch when the disk is full.
const WARN_EVERY: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE spans (
    trace_id BLOB NOT NULL,
    span_id BLOB NOT NULL,
    parent BLOB,
    service TEXT NOT NULL,
    start_us INTEGER NOT NULL,
    duration_us INTEGER NOT NULL,
    error INTEGER NOT NULL,
    span TEXT NOT NULL
);
CREATE INDEX spans_trace ON spans (trace_id);
CREATE INDEX spans_service_start ON spans (service, start_us);
CREATE INDEX spans_start ON spans (start_us);

CREATE TABLE logs (
    id INTEGER PRIMARY KEY,
    time_us INTEGER NOT NULL,
    service TEXT NOT NULL,
    instance TEXT NOT NULL,
    stream TEXT NOT NULL,
    level INTEGER,
    trace_id BLOB,
    line TEXT NOT NULL,
    version TEXT
);
CREATE INDEX logs_time ON logs (time_us);
CREATE INDEX logs_service_time ON logs (service, time_us);
-- Most lines name no trace: a partial index does not pay for them.
CREATE INDEX logs_trace ON logs (trace_id) WHERE trace_id IS NOT NULL;

-- External content: the lines are stored once, in `logs`; the triggers keep the index in step,
-- retention's deletes included. `detail=full` (the default) because a substring of more than
-- three characters is a phrase of trigrams, and only full detail answers phrase queries.
CREATE VIRTUAL TABLE logs_fts USING fts5 (
    line,
    content = 'logs',
    content_rowid = 'id',
    tokenize = 'trigram case_sensitive 0'
);
CREATE TRIGGER logs_fts_insert AFTER INSERT ON logs BEGIN
    INSERT INTO logs_fts (rowid, line) VALUES (new.id, new.line);
END;
CREATE TRIGGER logs_fts_delete AFTER DELETE ON logs BEGIN
    INSERT INTO logs_fts (logs_fts, rowid, line) VALUES ('delete', old.id, old.line);
END;
CREATE TRIGGER logs_fts_update AFTER UPDATE OF line ON logs BEGIN
    INSERT INTO logs_fts (logs_fts, rowid, line) VALUES ('delete', old.id, old.line);
    INSERT INTO logs_fts (rowid, line) VALUES (new.id, new.line);
END;
";

const INSERT_SPAN: &str = "INSERT INTO spans \
    (trace_id, span_id, parent, service, start_us, duration_us, error, span) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

const INSERT_LOG: &str = "INSERT INTO logs \
    (time_us, service, instance, stream, level, trace_id, line, version) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

const SPANS_OF_TRACE: &str = "SELECT span FROM spans WHERE trace_id = ?1 ORDER BY rowid";

/// How long telemetry is kept, and how much of it.
///
/// Both bounds apply: age is what an operator asks for ("the last day"), size is what keeps a
/// chatty fleet from filling the disk of a laptop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Rows older than this are deleted.
    pub max_age: Duration,
    /// When the data outgrows this many bytes, the oldest rows are deleted until it is back
    /// under 90% of it (so that a full database is not trimmed again after every batch). Counts
    /// the pages in use, not the WAL beside the file.
    pub max_bytes: u64,
}

impl Default for Retention {
    /// A day, and 256 MiB: enough to look back at yesterday's incident on a development fleet.
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(24 * 60 * 60),
            max_bytes: 256 << 20,
        }
    }
}

/// What the durable tier has done since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Spans committed to the database.
    pub spans_written: u64,
    /// Log lines committed to the database.
    pub logs_written: u64,
    /// Items that were not written: the queue was full (the writer could not keep up), a batch
    /// failed to commit (disk full, say), or a span could not be encoded.
    pub dropped: u64,
    /// Spans and log lines deleted by the retention policy.
    pub deleted_by_retention: u64,
    /// Bytes of the database in use: pages minus free pages.
    pub size_bytes: u64,
}

/// Why the durable tier could not do what was asked.
#[derive(Debug)]
pub enum StoreError {
    /// The directory could not be created, or the writer thread could not be started.
    Io(std::io::Error),
    /// SQLite failed: the file is not a database, the disk is full, a lock was held too long.
    Sqlite(rusqlite::Error),
    /// The file was written by a newer Flotilla. It is left exactly as it was.
    NewerSchema { found: i64, supported: i64 },
    /// The writer thread is gone (it only ends when the last handle is dropped, or on a bug).
    Closed,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io(error) => write!(f, "telemetry database: {error}"),
            StoreError::Sqlite(error) => write!(f, "telemetry database: {error}"),
            StoreError::NewerSchema { found, supported } => write!(
                f,
                "the telemetry database has schema version {found}, newer than the {supported} \
                 this Flotilla understands; it was left untouched (upgrade Flotilla, or move the \
                 file away to start afresh)"
            ),
            StoreError::Closed => f.write_str("the telemetry database writer has stopped"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io(error) => Some(error),
            StoreError::Sqlite(error) => Some(error),
            StoreError::NewerSchema { .. } | StoreError::Closed => None,
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(error: std::io::Error) -> Self {
        StoreError::Io(error)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::Sqlite(error)
    }
}

/// Spans and log lines in a SQLite file, written in the background.
///
/// Cheap to clone (an `Arc` inside). Recording never blocks; reads block on SQLite, so async
/// callers wrap them in `spawn_blocking`. Dropping the last handle writes what is still queued
/// and waits for the writer thread to finish, which makes it a clean shutdown.
#[derive(Clone)]
pub struct TelemetryDb {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` only while dropping: closing the queue is what ends the writer.
    queue: Option<SyncSender<Item>>,
    writer: Option<JoinHandle<()>>,
    /// One connection for all reads: reads are occasional (an operator's queries), and a single
    /// connection keeps its prepared statements warm.
    reader: Mutex<Connection>,
    counters: Arc<Counters>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::warn!("the telemetry database writer panicked");
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    spans_written: AtomicU64,
    logs_written: AtomicU64,
    dropped: AtomicU64,
    deleted: AtomicU64,
    size_bytes: AtomicU64,
}

#[allow(
    clippy::large_enum_variant,
    reason = "spans are nearly every item: boxing them would add an allocation per span on the \
              request path and save no memory when the queue is full"
)]
enum Item {
    Span(Span),
    Log(Arc<LogRecord>),
    /// Answered once everything queued before it is committed.
    Flush(SyncSender<()>),
    /// Answered with the outcome of a retention pass, run after everything queued before it.
    Retain(SyncSender<Result<(), StoreError>>),
}

impl fmt::Debug for TelemetryDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryDb")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl TelemetryDb {
    /// Opens `dir/telemetry.db`, creating the directory, the file and the schema as needed, and
    /// starts the writer thread, which applies the retention policy straight away and then every
    /// 30 seconds.
    ///
    /// A file written by a newer Flotilla (a higher schema version) is refused with
    /// [`StoreError::NewerSchema`] and left untouched, rather than read wrongly or overwritten.
    pub fn open(dir: &Path, retention: Retention) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(DB_FILE);

        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        prepare_schema(&mut conn)?;
        let counters = Arc::new(Counters::default());
        counters
            .size_bytes
            .store(used_bytes(&conn)?, Ordering::Relaxed);

        let reader = Connection::open(&path)?;
        reader.busy_timeout(BUSY_TIMEOUT)?;
        reader.pragma_update(None, "query_only", true)?;
        // Log queries are built from the filters given, so there are a few dozen shapes of them.
        reader.set_prepared_statement_cache_capacity(64);

        let (queue, items) = mpsc::sync_channel(QUEUE_CAPACITY);
        let writer = Writer {
            conn,
            counters: counters.clone(),
            retention,
            records: Vec::with_capacity(BATCH_MAX),
            fts_deleted: 0,
            last_warning: None,
        };
        let writer = std::thread::Builder::new()
            .name("telemetry-db".into())
            .spawn(move || writer.run(items))?;

        Ok(Self {
            inner: Arc::new(Inner {
                queue: Some(queue),
                writer: Some(writer),
                reader: Mutex::new(reader),
                counters,
            }),
        })
    }

    /// Queues a span for writing. Never blocks: when the writer is behind and the queue is full,
    /// the span is dropped and counted in [`StoreStats::dropped`].
    pub fn record_span(&self, span: Span) {
        self.enqueue(Item::Span(span));
    }

    /// Queues a log line for writing, like [`TelemetryDb::record_span`]. Takes an `Arc`, like
    /// those the [`LogStore`](crate::LogStore) hands its followers, so a shared line is not
    /// copied to be recorded.
    pub fn record_log(&self, record: Arc<LogRecord>) {
        self.enqueue(Item::Log(record));
    }

    fn enqueue(&self, item: Item) {
        let queued = self
            .inner
            .queue
            .as_ref()
            .is_some_and(|queue| queue.try_send(item).is_ok());
        if !queued {
            self.inner.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns once everything queued before the call is committed (or dropped): for tests and
    /// shutdown. Blocks, unlike recording: it waits for room in the queue and for the writer.
    pub fn flush(&self) {
        let (done, committed) = mpsc::sync_channel(1);
        if let Some(queue) = &self.inner.queue {
            if queue.send(Item::Flush(done)).is_ok() {
                // An error means the writer is gone, and there is nothing left to wait for.
                let _ = committed.recv();
            }
        }
    }

    /// Every span stored for a trace, in the order of [`TraceStore::trace`](crate::TraceStore::trace):
    /// by start time, a parent before its children when they start together.
    pub fn trace(&self, id: TraceId) -> Result<Vec<Span>, StoreError> {
        let spans = load_trace(&self.reader(), id)?;
        Ok(in_trace_order(spans))
    }

    /// Summaries of the matching traces, newest first (or longest first with `slowest`), with the
    /// semantics of [`TraceStore::traces`](crate::TraceStore::traces).
    ///
    /// Traces are picked in SQL from per-trace aggregates, and only the picked ones are loaded
    /// and summarized. The newest traces are looked for in a window of recent spans that widens
    /// until it holds enough of them, so a listing does not aggregate a whole day of spans;
    /// `slowest` has no such shortcut and aggregates every trace since `since`.
    pub fn traces(&self, query: &TraceQuery) -> Result<Vec<TraceSummary>, StoreError> {
        let mut limit = query.limit.unwrap_or(usize::MAX);
        if let Some(n) = query.slowest {
            limit = limit.min(n);
        }
        if limit == 0 {
            return Ok(Vec::new());
        }
        let since = query.since.map(to_us);
        let mut conn = self.reader();
        // One snapshot for picking and loading, so a retention pass in between cannot make a
        // picked trace disappear or change.
        let snapshot = conn.transaction()?;
        let ids = if query.slowest.is_some() || limit == usize::MAX {
            pick_traces(&snapshot, query, since, limit)?
        } else {
            newest_traces(&snapshot, query, since, limit)?
        };
        let mut summaries = Vec::with_capacity(ids.len());
        for id in ids {
            let spans = load_trace(&snapshot, id)?;
            summaries.extend(summarize(id, spans.iter()));
        }
        Ok(summaries)
    }

    /// The newest `limit` records matching `query` that are strictly older than `before`,
    /// returned oldest first: [`LogStore::query`](crate::LogStore::query) over the durable tier,
    /// with `before` to page back from the oldest record already shown.
    ///
    /// Without a `limit`, every matching record is returned: the control API should always set
    /// one.
    ///
    /// Records that share the time of the oldest one returned but did not fit in `limit` are
    /// skipped by a next page asked for with `before` set to that time, since `before` is strict.
    ///
    /// `grep` is answered by the trigram index when the needle has at least three characters
    /// (a trigram index has nothing to look up for fewer) and confirmed on the line itself, so
    /// the result is exactly the in-memory one: a substring, ignoring ASCII case.
    pub fn logs(
        &self,
        query: &LogQuery,
        before: Option<SystemTime>,
    ) -> Result<Vec<LogRecord>, StoreError> {
        if query.limit == Some(0) {
            return Ok(Vec::new());
        }
        let mut sql = String::from(
            "SELECT time_us, service, instance, stream, level, trace_id, line, version FROM logs WHERE 1",
        );
        let mut values: Vec<Value> = Vec::new();
        let mut and = |clause: &str, value: Value| {
            sql.push_str(" AND ");
            sql.push_str(clause);
            values.push(value);
        };
        if let Some(service) = &query.service {
            and("service = ?", Value::Text(service.clone()));
        }
        if let Some(instance) = &query.instance {
            and("instance = ?", Value::Text(instance.clone()));
        }
        if let Some(since) = query.since {
            and("time_us >= ?", Value::Integer(to_us(since)));
        }
        if let Some(before) = before {
            and("time_us < ?", Value::Integer(to_us(before)));
        }
        if let Some(level) = query.level {
            and("level >= ?", Value::Integer(level_code(level)));
        }
        if let Some(trace) = query.trace {
            and("trace_id = ?", Value::Blob(trace.0.to_vec()));
        }
        if let Some(needle) = query.grep.as_deref().filter(|needle| !needle.is_empty()) {
            if needle.chars().count() >= 3 {
                and(
                    "id IN (SELECT rowid FROM logs_fts WHERE logs_fts MATCH ?)",
                    Value::Text(fts_phrase(needle)),
                );
            }
            // SQLite's `lower` folds ASCII only, which is what the in-memory grep ignores too;
            // it also removes the trigram index's wider (Unicode) case folding from the result.
            and(
                "instr(lower(line), lower(?)) > 0",
                Value::Text(needle.to_owned()),
            );
        }
        sql.push_str(" ORDER BY time_us DESC, id DESC");
        if let Some(limit) = query.limit {
            sql.push_str(" LIMIT ?");
            values.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        }

        let conn = self.reader();
        let mut statement = conn.prepare_cached(&sql)?;
        let rows = statement.query_map(rusqlite::params_from_iter(values), decode_log)?;
        let mut records = Vec::new();
        for record in rows {
            records.extend(record?);
        }
        records.reverse();
        Ok(records)
    }

    /// Counters since open, and the size of the data now.
    pub fn stats(&self) -> StoreStats {
        let counters = &self.inner.counters;
        StoreStats {
            spans_written: counters.spans_written.load(Ordering::Relaxed),
            logs_written: counters.logs_written.load(Ordering::Relaxed),
            dropped: counters.dropped.load(Ordering::Relaxed),
            deleted_by_retention: counters.deleted.load(Ordering::Relaxed),
            size_bytes: counters.size_bytes.load(Ordering::Relaxed),
        }
    }

    /// Applies the retention policy now, after everything already queued is written. The writer
    /// also does this on its own every 30 seconds and whenever a batch takes the data over
    /// [`Retention::max_bytes`]; this is for tests and for an operator who wants space back.
    pub fn enforce_retention(&self) -> Result<(), StoreError> {
        let queue = self.inner.queue.as_ref().ok_or(StoreError::Closed)?;
        let (done, outcome) = mpsc::sync_channel(1);
        queue
            .send(Item::Retain(done))
            .map_err(|_| StoreError::Closed)?;
        outcome.recv().map_err(|_| StoreError::Closed)?
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        // A panic while reading leaves nothing half-done in the connection.
        self.inner
            .reader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Brings a new file to the current schema, and checks an existing one is not newer.
fn prepare_schema(conn: &mut Connection) -> Result<(), StoreError> {
    let found = user_version(conn)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found == 0 {
        // Only possible before the first table is created, so it comes first.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
    }
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            mode,
            "the telemetry database could not use WAL; reads will wait for writes"
        );
    }
    // In WAL mode, NORMAL loses at most the last commits on power loss, never consistency, and
    // saves an fsync per batch.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = NORMAL; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"
    ))?;

    // Immediate: another process opening the same file at once waits, then finds the schema.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    match user_version(&tx)? {
        0 => {
            tx.execute_batch(SCHEMA)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        // Version 1 stored no service version with log lines.
        1 => {
            tx.execute_batch("ALTER TABLE logs ADD COLUMN version TEXT")?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        SCHEMA_VERSION => {}
        found => {
            return Err(StoreError::NewerSchema {
                found,
                supported: SCHEMA_VERSION,
            });
        }
    }
    tx.commit()?;
    Ok(())
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// Bytes of the database in use. Free pages are left out: they are about to be returned to the
/// file system, and counting them would make a size pass chase its own tail.
fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |row| row.get(0))?;
    let free: i64 = conn.pragma_query_value(None, "freelist_count", |row| row.get(0))?;
    let page_size: i64 = conn.pragma_query_value(None, "page_size", |row| row.get(0))?;
    Ok(u64::try_from(pages.saturating_sub(free).saturating_mul(page_size)).unwrap_or(0))
}

fn to_us(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
    }
}

fn from_us(us: i64) -> Option<SystemTime> {
    let offset = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    }
}

/// Levels as stored: ascending with severity, so "at least" is `>=`. Part of the file format.
fn level_code(level: Level) -> i64 {
    match level {
        Level::Trace => 0,
        Level::Debug => 1,
        Level::Info => 2,
        Level::Warn => 3,
        Level::Error => 4,
    }
}

fn level_from_code(code: i64) -> Option<Level> {
    Some(match code {
        0 => Level::Trace,
        1 => Level::Debug,
        2 => Level::Info,
        3 => Level::Warn,
        4 => Level::Error,
        _ => return None,
    })
}

fn stream_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
        Stream::System => "system",
    }
}

fn stream_from_name(name: &str) -> Option<Stream> {
    Some(match name {
        "stdout" => Stream::Stdout,
        "stderr" => Stream::Stderr,
        "system" => Stream::System,
        _ => return None,
    })
}

/// The needle as one FTS5 phrase: quoted, so that `OR`, `-`, `*`, `:` and the like are text
/// rather than query syntax, with embedded quotes doubled as FTS5 escapes them.
fn fts_phrase(needle: &str) -> String {
    format!("\"{}\"", needle.replace('"', "\"\""))
}

fn trace_id_of(row: &Row<'_>, column: usize) -> rusqlite::Result<Option<TraceId>> {
    Ok(row
        .get_ref(column)?
        .as_blob_or_null()
        .ok()
        .flatten()
        .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
        .map(TraceId))
}

/// A stored log row, or `None` (with a warning) for a row this code did not write.
fn decode_log(row: &Row<'_>) -> rusqlite::Result<Option<LogRecord>> {
    let decoded = (|| {
        Some(LogRecord {
            time: from_us(row.get(0).ok()?)?,
            service: row.get::<_, String>(1).ok()?.into(),
            instance: row.get::<_, String>(2).ok()?.into(),
            stream: stream_from_name(row.get_ref(3).ok()?.as_str().ok()?)?,
            level: row.get::<_, Option<i64>>(4).ok()?.and_then(level_from_code),
            trace_id: trace_id_of(row, 5).ok()?,
            line: row.get(6).ok()?,
            version: row.get::<_, Option<String>>(7).ok()?.map(Into::into),
        })
    })();
    if decoded.is_none() {
        tracing::warn!("skipping a stored log line that does not decode");
    }
    Ok(decoded)
}

fn decode_span(text: Option<&str>) -> Option<Span> {
    match text.map(serde_json::from_str::<Span>) {
        Some(Ok(span)) => Some(span),
        Some(Err(error)) => {
            tracing::warn!(%error, "skipping a stored span that does not decode");
            None
        }
        None => {
            tracing::warn!("skipping a stored span that is not text");
            None
        }
    }
}

/// A trace's spans in the order they were written, which is the order the in-memory store
/// keeps them in (and what breaks its ties).
fn load_trace(conn: &Connection, id: TraceId) -> rusqlite::Result<Vec<Span>> {
    let mut statement = conn.prepare_cached(SPANS_OF_TRACE)?;
    let rows = statement.query_map([&id.0[..]], |row| {
        Ok(decode_span(row.get_ref(0)?.as_str().ok()))
    })?;
    let mut spans = Vec::new();
    for span in rows {
        spans.extend(span?);
    }
    Ok(spans)
}

/// As [`TraceStore::trace`](crate::TraceStore::trace) orders them: by start, then by depth.
fn in_trace_order(spans: Vec<Span>) -> Vec<Span> {
    let mut keyed: Vec<_> = depths(&spans)
        .into_iter()
        .zip(spans)
        .map(|(depth, span)| ((span.start, depth), span))
        .collect();
    keyed.sort_by_key(|(key, _)| *key);
    keyed.into_iter().map(|(_, span)| span).collect()
}

/// The newest matching traces, looked for in widening windows of recent spans.
///
/// A trace's start (its root's, or its earliest span's) is the start of one of its spans, so
/// every trace starting in `[floor, ∞)` has a span there. Aggregating just the traces with a span
/// in the window therefore finds every trace starting in it; if at least `limit` of them match,
/// they are the newest `limit` overall, since any trace not found starts before `floor`.
fn newest_traces(
    conn: &Connection,
    query: &TraceQuery,
    since: Option<i64>,
    limit: usize,
) -> rusqlite::Result<Vec<TraceId>> {
    // Two statements, because SQLite answers a lone min() or max() from the index.
    let oldest: Option<i64> =
        conn.query_row("SELECT min(start_us) FROM spans", [], |row| row.get(0))?;
    let newest: Option<i64> =
        conn.query_row("SELECT max(start_us) FROM spans", [], |row| row.get(0))?;
    let (Some(oldest), Some(newest)) = (oldest, newest) else {
        return Ok(Vec::new());
    };
    let mut width = FIRST_WINDOW_US;
    loop {
        let window = newest.saturating_sub(width);
        let (floor, last) = match since {
            Some(since) if since >= window => (Some(since), true),
            _ if window <= oldest => (since, true),
            _ => (Some(window), false),
        };
        let ids = pick_traces(conn, query, floor, limit)?;
        if last || ids.len() >= limit {
            return Ok(ids);
        }
        width = width.saturating_mul(16);
    }
}

/// Up to `limit` matching traces starting at or after `floor`, ordered as
/// [`TraceStore::traces`](crate::TraceStore::traces) orders them.
///
/// Per trace, the aggregate holds what [`summarize`] derives its start and duration from: the
/// earliest root's start (and, for `slowest`, that root's duration, the first written among roots
/// starting together), or the trace's extent when no root is stored.
fn pick_traces(
    conn: &Connection,
    query: &TraceQuery,
    floor: Option<i64>,
    limit: usize,
) -> rusqlite::Result<Vec<TraceId>> {
    let slowest = query.slowest.is_some();
    let mut named: Vec<(&str, Value)> = Vec::new();
    let mut sql = String::from(
        "WITH agg AS (SELECT trace_id, min(start_us) AS first_us, \
         max(start_us + duration_us) AS last_us, max(error) AS error, \
         min(CASE WHEN parent IS NULL THEN start_us END) AS root_us FROM spans",
    );
    // Which traces to aggregate at all: those with a span in the window, or else (when there is
    // no window) those with a span of the service asked for; each is a range of an index.
    let service_picks = floor.is_none() && query.service.is_some();
    if let Some(floor) = floor {
        sql.push_str(" WHERE trace_id IN (SELECT trace_id FROM spans WHERE start_us >= :floor)");
        named.push((":floor", Value::Integer(floor)));
    } else if service_picks {
        sql.push_str(" WHERE trace_id IN (SELECT trace_id FROM spans WHERE service = :service)");
    }
    sql.push_str(
        " GROUP BY trace_id), \
         top AS (SELECT trace_id, coalesce(root_us, first_us) AS start_us, root_us, first_us, \
         last_us, error FROM agg) \
         SELECT trace_id",
    );
    if slowest {
        sql.push_str(
            ", CASE WHEN root_us IS NULL THEN last_us - first_us \
             ELSE (SELECT r.duration_us FROM spans r WHERE r.trace_id = top.trace_id \
             AND r.parent IS NULL AND r.start_us = top.root_us ORDER BY r.rowid LIMIT 1) \
             END AS duration_us",
        );
    }
    sql.push_str(" FROM top WHERE 1");
    if floor.is_some() {
        sql.push_str(" AND start_us >= :floor");
    }
    if query.errors {
        sql.push_str(" AND error = 1");
    }
    if let Some(service) = &query.service {
        // The unary `+` keeps the service index out of it: a trace's few spans are the ones to
        // look through, not all of a service's.
        if !service_picks {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM spans s \
                 WHERE s.trace_id = top.trace_id AND +s.service = :service)",
            );
        }
        named.push((":service", Value::Text(service.clone())));
    }
    sql.push_str(if slowest {
        " ORDER BY duration_us DESC, start_us DESC, trace_id ASC"
    } else {
        " ORDER BY start_us DESC, trace_id ASC"
    });
    sql.push_str(" LIMIT :limit");
    named.push((
        ":limit",
        Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)),
    ));

    let mut statement = conn.prepare_cached(&sql)?;
    let named: Vec<(&str, &dyn ToSql)> = named
        .iter()
        .map(|(name, value)| (*name, value as &dyn ToSql))
        .collect();
    let rows = statement.query_map(named.as_slice(), |row| trace_id_of(row, 0))?;
    let mut ids = Vec::new();
    for id in rows {
        ids.extend(id?);
    }
    Ok(ids)
}

/// The one thread that writes: it owns the write connection, so batches, retention and FTS
/// maintenance never contend with each other.
struct Writer {
    conn: Connection,
    counters: Arc<Counters>,
    retention: Retention,
    /// Spans and log lines of the batch being assembled (kept to reuse its allocation).
    records: Vec<Item>,
    /// Log lines deleted since the full-text index was last compacted (see
    /// [`Writer::compact_fts`]).
    fts_deleted: u64,
    last_warning: Option<Instant>,
}

#[derive(Default)]
struct Written {
    spans: u64,
    logs: u64,
    skipped: u64,
}

/// How long the writer waits for more after the first item of a batch. A commit per span costs
/// tens of microseconds of WAL work, which at a steady trickle of spans (each arriving to an idle
/// writer) made the writer thread one of the fleet's larger CPU users; lingering this long makes
/// one commit carry everything of the moment. Memory answers for anything this recent anyway.
const LINGER: Duration = Duration::from_millis(50);

/// How often the writer looks for more while it lingers. It is not woken per item: a thread
/// blocked in `recv` is woken (a futex call and a context switch) by every span sent to it,
/// which at thousands of spans a second cost more than writing them.
const LINGER_STEP: Duration = Duration::from_millis(5);

/// Adds to `batch` what arrives within [`LINGER`], up to [`BATCH_MAX`]; a flush or retention
/// request ends the wait within [`LINGER_STEP`], since someone is waiting for it.
fn collect_batch(items: &Receiver<Item>, batch: &mut Vec<Item>) {
    let urgent = |item: &Item| matches!(item, Item::Flush(_) | Item::Retain(_));
    let deadline = Instant::now() + LINGER;
    loop {
        let room = BATCH_MAX.saturating_sub(batch.len());
        batch.extend(items.try_iter().take(room));
        if batch.len() >= BATCH_MAX || batch.iter().any(urgent) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(LINGER_STEP));
    }
}

impl Writer {
    fn run(mut self, items: Receiver<Item>) {
        self.retain_or_warn();
        let mut next_retention = Instant::now() + RETENTION_EVERY;
        let mut batch = Vec::with_capacity(BATCH_MAX);
        loop {
            let wait = next_retention.saturating_duration_since(Instant::now());
            match items.recv_timeout(wait) {
                Ok(first) => {
                    batch.push(first);
                    collect_batch(&items, &mut batch);
                    self.handle(&mut batch);
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Every handle is gone and the queue is empty: all is written.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= next_retention {
                self.retain_or_warn();
                next_retention = Instant::now() + RETENTION_EVERY;
            }
        }
    }

    /// Writes a batch; a flush or retention request in it first commits what came before it.
    fn handle(&mut self, batch: &mut Vec<Item>) {
        let mut records = std::mem::take(&mut self.records);
        for item in batch.drain(..) {
            match item {
                Item::Flush(done) => {
                    self.write(&mut records);
                    let _ = done.send(());
                }
                Item::Retain(done) => {
                    self.write(&mut records);
                    let _ = done.send(self.retain());
                }
                record => records.push(record),
            }
        }
        self.write(&mut records);
        self.records = records;
    }

    fn write(&mut self, records: &mut Vec<Item>) {
        if records.is_empty() {
            return;
        }
        let count = records.len() as u64;
        match insert(&mut self.conn, records) {
            Ok(written) => {
                let counters = &self.counters;
                counters
                    .spans_written
                    .fetch_add(written.spans, Ordering::Relaxed);
                counters
                    .logs_written
                    .fetch_add(written.logs, Ordering::Relaxed);
                counters
                    .dropped
                    .fetch_add(written.skipped, Ordering::Relaxed);
            }
            Err(error) => {
                self.counters.dropped.fetch_add(count, Ordering::Relaxed);
                self.warn("could not write telemetry to the database", &error);
            }
        }
        records.clear();
        match used_bytes(&self.conn) {
            Ok(size) => {
                self.counters.size_bytes.store(size, Ordering::Relaxed);
                // Waiting for the next periodic pass could let a busy fleet write far past the
                // bound.
                if size > self.retention.max_bytes {
                    self.retain_or_warn();
                }
            }
            Err(error) => self.warn("could not measure the telemetry database", &error),
        }
    }

    fn retain_or_warn(&mut self) {
        if let Err(error) = self.retain() {
            self.warn("telemetry retention failed", &error);
        }
    }

    /// Deletes what is too old, then the oldest until the data fits, and gives the space back.
    fn retain(&mut self) -> Result<(), StoreError> {
        let result = self.retain_inner();
        if let Ok(size) = used_bytes(&self.conn) {
            self.counters.size_bytes.store(size, Ordering::Relaxed);
        }
        result
    }

    fn retain_inner(&mut self) -> Result<(), StoreError> {
        if let Some(cutoff) = SystemTime::now().checked_sub(self.retention.max_age) {
            let cutoff = to_us(cutoff);
            loop {
                let n = self.conn.execute(
                    "DELETE FROM spans WHERE rowid IN \
                     (SELECT rowid FROM spans WHERE start_us < ?1 LIMIT ?2)",
                    params![cutoff, DELETE_CHUNK],
                )? as u64;
                self.deleted(n, 0);
                if n < DELETE_CHUNK {
                    break;
                }
            }
            loop {
                let n = self.conn.execute(
                    "DELETE FROM logs WHERE id IN \
                     (SELECT id FROM logs WHERE time_us < ?1 LIMIT ?2)",
                    params![cutoff, DELETE_CHUNK],
                )? as u64;
                self.deleted(0, n);
                if n < DELETE_CHUNK {
                    break;
                }
            }
            self.compact_fts(false)?;
        }
        if used_bytes(&self.conn)? > self.retention.max_bytes {
            self.shrink()?;
        }
        // Pages are freed by deletes, and by FTS5 merging its segments as lines arrive.
        let free: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |row| row.get(0))?;
        if free > 0 {
            // Each step returns one page to the file system; it must be stepped to the end.
            let mut vacuum = self.conn.prepare("PRAGMA incremental_vacuum")?;
            let mut steps = vacuum.query([])?;
            while steps.next()?.is_some() {}
        }
        Ok(())
    }

    /// Deletes the oldest rows until the data is under 90% of the bound.
    ///
    /// Each round estimates how many rows make up the excess (rows are not all the same size,
    /// and index pages do not empty in step with their tables), deletes them oldest first,
    /// compacts the full-text index and measures again. It aims at 85%, so that an estimate a
    /// little short does not cost another round, each of which rewrites the full-text index.
    fn shrink(&mut self) -> Result<(), StoreError> {
        let target = self.retention.max_bytes / 10 * 9;
        let aim = self.retention.max_bytes / 20 * 17;
        for _ in 0..SHRINK_ROUNDS {
            let used = used_bytes(&self.conn)?;
            if used <= target {
                break;
            }
            let rows = self.approx_rows()?;
            if rows == 0 {
                break;
            }
            let excess = (used - aim) as f64 / used as f64;
            let mut left = ((rows as f64 * excess).ceil() as u64).max(1);
            while left > 0 {
                let n = self.delete_oldest(left.min(DELETE_CHUNK))?;
                if n == 0 {
                    break;
                }
                left = left.saturating_sub(n);
            }
            self.compact_fts(true)?;
        }
        Ok(())
    }

    /// Rows in both tables, from the ends of their rowid ranges: no scan, and exact enough for
    /// tables that are deleted from the old end.
    fn approx_rows(&self) -> rusqlite::Result<u64> {
        let count = |sql: &str| -> rusqlite::Result<u64> {
            let n: i64 = self.conn.query_row(sql, [], |row| row.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        Ok(
            count("SELECT coalesce(max(rowid) - min(rowid) + 1, 0) FROM spans")?
                + count("SELECT coalesce(max(id) - min(id) + 1, 0) FROM logs")?,
        )
    }

    /// Deletes about `n` of the oldest rows, spans and log lines together: those no newer than
    /// the `n`-th oldest of both tables, so time decides which table gives way.
    fn delete_oldest(&mut self, n: u64) -> rusqlite::Result<u64> {
        // A compound ORDER BY merges the two index scans, reading only the first `n` entries.
        let cut: Option<i64> = self
            .conn
            .query_row(
                "SELECT start_us FROM spans UNION ALL SELECT time_us FROM logs \
                 ORDER BY 1 LIMIT 1 OFFSET ?1",
                [n - 1],
                |row| row.get(0),
            )
            .optional()?;
        // Fewer than `n` rows: all of them.
        let cut = cut.unwrap_or(i64::MAX);
        // The limits only matter when many rows share the cut's time.
        let spans = self.conn.execute(
            "DELETE FROM spans WHERE rowid IN \
             (SELECT rowid FROM spans WHERE start_us <= ?1 ORDER BY start_us LIMIT ?2)",
            params![cut, n],
        )? as u64;
        let logs = self.conn.execute(
            "DELETE FROM logs WHERE id IN \
             (SELECT id FROM logs WHERE time_us <= ?1 ORDER BY time_us LIMIT ?2)",
            params![cut, n],
        )? as u64;
        self.deleted(spans, logs);
        Ok(spans + logs)
    }

    fn deleted(&mut self, spans: u64, logs: u64) {
        self.counters
            .deleted
            .fetch_add(spans + logs, Ordering::Relaxed);
        self.fts_deleted += logs;
    }

    /// Merges the full-text index into one segment, which is what actually removes deleted lines
    /// from it.
    ///
    /// FTS5 deletes by adding "delete" entries that cancel the originals only when the two meet
    /// in a merge, and the originals of the oldest lines sit in the oldest, largest segments that
    /// incremental merging rarely reaches: deleting the oldest lines makes the index grow. So the
    /// index is merged whole once the deleted lines are an eighth of what it holds (a cost in
    /// proportion to what was deleted), and after every size pass, which must see space come
    /// back. FTS5's alternatives to this were measured and rejected: `secure-delete` and
    /// `contentless_delete` delete in place but over 10 times slower per line.
    fn compact_fts(&mut self, force: bool) -> rusqlite::Result<()> {
        if self.fts_deleted == 0 {
            return Ok(());
        }
        let held: i64 = self.conn.query_row(
            "SELECT coalesce(max(id) - min(id) + 1, 0) FROM logs",
            [],
            |row| row.get(0),
        )?;
        let held = u64::try_from(held).unwrap_or(0);
        if force || self.fts_deleted.saturating_mul(8) >= held {
            self.conn
                .execute("INSERT INTO logs_fts (logs_fts) VALUES ('optimize')", [])?;
            self.fts_deleted = 0;
        }
        Ok(())
    }

    fn warn(&mut self, what: &str, error: &dyn fmt::Display) {
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
        {
            self.last_warning = Some(now);
            tracing::warn!(%error, "{what}");
        }
    }
}

/// Writes spans and log lines in one transaction with cached statements. A span that cannot be
/// encoded is skipped; a database error abandons the whole batch.
fn insert(conn: &mut Connection, records: &mut [Item]) -> rusqlite::Result<Written> {
    let tx = conn.transaction()?;
    let mut written = Written::default();
    {
        let mut insert_span = tx.prepare_cached(INSERT_SPAN)?;
        let mut insert_log = tx.prepare_cached(INSERT_LOG)?;
        for record in records.iter_mut() {
            match record {
                Item::Span(span) => {
                    let Some(json) = encode_span(span) else {
                        written.skipped += 1;
                        continue;
                    };
                    insert_span.execute(params![
                        &span.trace_id.0[..],
                        &span.span_id.0[..],
                        span.parent_span_id.as_ref().map(|parent| &parent.0[..]),
                        &*span.service,
                        to_us(span.start),
                        i64::try_from(span.duration.as_micros()).unwrap_or(i64::MAX),
                        span.is_error(),
                        json,
                    ])?;
                    written.spans += 1;
                }
                Item::Log(log) => {
                    insert_log.execute(params![
                        to_us(log.time),
                        &*log.service,
                        &*log.instance,
                        stream_name(log.stream),
                        log.level.map(level_code),
                        log.trace_id.as_ref().map(|trace| &trace.0[..]),
                        &log.line,
                        log.version.as_deref(),
                    ])?;
                    written.logs += 1;
                }
                Item::Flush(_) | Item::Retain(_) => {}
            }
        }
    }
    tx.commit()?;
    Ok(written)
}

/// The span as stored, or `None` for one that cannot be stored faithfully.
fn encode_span(span: &mut Span) -> Option<String> {
    // RFC 3339, the span's time encoding, has no form for times before 1970.
    if span.start < UNIX_EPOCH {
        return None;
    }
    // JSON has no NaN or infinity: serde_json writes `null`, which would not decode back into an
    // attribute and would lose the whole span. Their names keep what they said.
    for (_, value) in &mut span.attributes {
        if let AttributeValue::Float(f) = value {
            if !f.is_finite() {
                *value = AttributeValue::Text(f.to_string());
            }
        }
    }
    serde_json::to_string(span).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_microseconds() {
        for us in [0, 1, 1_700_000_000_123_456, -5_000_001] {
            assert_eq!(from_us(us).map(to_us), Some(us));
        }
        // Out of the platform's range is `None`, not a panic.
        let _ = from_us(i64::MIN);
        let _ = from_us(i64::MAX);
    }

    #[test]
    fn needles_become_one_quoted_phrase() {
        assert_eq!(fts_phrase(r#"say "hi" OR -x*"#), r#""say ""hi"" OR -x*""#);
    }

    #[test]
    fn level_codes_keep_severity_order() {
        let levels = [
            Level::Trace,
            Level::Debug,
            Level::Info,
            Level::Warn,
            Level::Error,
        ];
        for pair in levels.windows(2) {
            assert!(level_code(pair[0]) < level_code(pair[1]));
        }
        for level in levels {
            assert_eq!(level_from_code(level_code(level)), Some(level));
        }
        assert_eq!(level_from_code(9), None);
    }
}
