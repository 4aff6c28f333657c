//! The embedded saga store: one SQLite file in WAL mode with `synchronous=FULL`, so that a
//! transition is on disk when its write returns.
//!
//! A durable commit costs an fsync, and a saga makes a few per step. One writer thread therefore
//! takes every write that is waiting — from all the sagas in flight — and commits them together:
//! under load, hundreds of transitions share one fsync, while an idle store still commits a lone
//! write at once. Each write runs in a savepoint of its own, so one that fails (a lost lease)
//! leaves the others of its batch intact. Reads use a second connection and never wait for the
//! writer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::queued::{Op, Reply};
use crate::{
    Append, BoxFuture, Created, Entry, EntryKind, ListFilter, NewSaga, Phase, SagaError,
    SagaRecord, SagaStore, SagaSummary, Status, StatusCount, StoreError, StoreStats,
};

/// The file [`SqliteStore::open`] creates in its directory.
pub const DB_FILE: &str = "sagas.db";

/// Writes waiting for the writer; a full queue makes writers wait, which is the back-pressure a
/// saga engine needs (a transition must not be dropped).
const QUEUE_CAPACITY: usize = 8_192;

/// Most writes in one commit, so a huge backlog still commits in reasonable slices.
const BATCH_MAX: usize = 2_048;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sagas (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    start_key      TEXT,
    status         TEXT NOT NULL,
    input          TEXT NOT NULL,
    traceparent    TEXT,
    deadline_ms    INTEGER,
    created_ms     INTEGER NOT NULL,
    updated_ms     INTEGER NOT NULL,
    error          TEXT,
    owner          TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS sagas_key ON sagas (name, start_key) WHERE start_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS sagas_created ON sagas (created_ms);
CREATE INDEX IF NOT EXISTS sagas_status_created ON sagas (status, created_ms);
-- Recovery looks only at unfinished sagas: a partial index stays as small as they are few.
CREATE INDEX IF NOT EXISTS sagas_unfinished ON sagas (lease_until_ms)
    WHERE status IN ('running', 'compensating');
CREATE TABLE IF NOT EXISTS saga_log (
    saga_id     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    step        INTEGER NOT NULL,
    phase       TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    http_status INTEGER,
    detail      TEXT,
    PRIMARY KEY (saga_id, seq)
) WITHOUT ROWID;
";

/// A finished write, answered only once its commit is durable.
enum Done {
    Created(Reply<Created>, Result<Created, StoreError>),
    Appended(Reply<()>, Result<(), StoreError>),
    Renewed(Reply<Vec<String>>, Result<Vec<String>, StoreError>),
    Claimed(Reply<Vec<SagaRecord>>, Result<Vec<SagaRecord>, StoreError>),
}

impl Done {
    fn send(self, commit: &Result<(), String>) {
        // A failed commit turns every write of its batch into that failure.
        fn settle<T>(reply: Reply<T>, result: Result<T, StoreError>, commit: &Result<(), String>) {
            let result = match commit {
                Ok(()) => result,
                Err(err) => Err(StoreError::Backend(err.clone())),
            };
            let _ = reply.send(result);
        }
        match self {
            Done::Created(reply, result) => settle(reply, result, commit),
            Done::Appended(reply, result) => settle(reply, result, commit),
            Done::Renewed(reply, result) => settle(reply, result, commit),
            Done::Claimed(reply, result) => settle(reply, result, commit),
        }
    }
}

/// The embedded [`SagaStore`].
pub struct SqliteStore {
    queue: Mutex<Option<SyncSender<Op>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    reader: Arc<Mutex<Connection>>,
    counters: Arc<Counters>,
    path: PathBuf,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    writes: AtomicU64,
}

impl SqliteStore {
    /// Opens (creating it if needed) `dir/sagas.db`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|err| {
            StoreError::Backend(format!("cannot create {}: {err}", dir.display()))
        })?;
        let path = dir.join(DB_FILE);
        let writer_conn = connect(&path)?;
        writer_conn.execute_batch(SCHEMA)?;
        let reader = connect(&path)?;
        let (queue, ops) = mpsc::sync_channel(QUEUE_CAPACITY);
        let counters = Arc::new(Counters::default());
        let writer = std::thread::Builder::new()
            .name("saga-store".into())
            .spawn({
                let counters = Arc::clone(&counters);
                move || write_loop(writer_conn, ops, &counters)
            })
            .map_err(|err| StoreError::Backend(format!("cannot start the writer: {err}")))?;
        Ok(Self {
            queue: Mutex::new(Some(queue)),
            writer: Mutex::new(Some(writer)),
            reader: Arc::new(Mutex::new(reader)),
            counters,
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn submit<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(closed)?;
        match queue.try_send(op(reply)) {
            Ok(()) => {}
            // The queue is bounded: when the writer falls behind, writers wait (off the runtime's
            // threads) rather than the store growing without bound.
            Err(TrySendError::Full(op)) => {
                tokio::task::spawn_blocking(move || queue.send(op).map_err(|_| closed()))
                    .await
                    .map_err(|err| StoreError::Backend(err.to_string()))??;
            }
            Err(TrySendError::Disconnected(_)) => return Err(closed()),
        }
        answer.await.map_err(|_| closed())?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(PoisonError::into_inner);
            f(&conn)
        })
        .await
        .map_err(|err| StoreError::Backend(err.to_string()))?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has committed what was queued.
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = writer.join();
        }
    }
}

fn closed() -> StoreError {
    StoreError::Backend("the saga store is closed".into())
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)
        .map_err(|err| StoreError::Backend(format!("cannot open {}: {err}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Backend(format!(
            "{} refused WAL mode ({mode})",
            path.display()
        )));
    }
    // FULL: a commit returns once the WAL is fsynced. That is the write-ahead promise.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

fn write_loop(mut conn: Connection, ops: Receiver<Op>, counters: &Counters) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    while let Ok(first) = ops.recv() {
        batch.push(first);
        while batch.len() < BATCH_MAX {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let writes = batch.len() as u64;
        let mut done = Vec::with_capacity(batch.len());
        let commit = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(mut tx) => {
                for op in batch.drain(..) {
                    done.push(apply(&mut tx, op));
                }
                tx.commit().map_err(|err| err.to_string())
            }
            Err(err) => {
                let err = err.to_string();
                for op in batch.drain(..) {
                    done.push(refuse(op, &err));
                }
                Err(err)
            }
        };
        if commit.is_ok() {
            counters.commits.fetch_add(1, Ordering::Relaxed);
            counters.writes.fetch_add(writes, Ordering::Relaxed);
        } else if let Err(err) = &commit {
            tracing::warn!("saga store: a commit failed: {err}");
        }
        for done in done {
            done.send(&commit);
        }
    }
}

fn refuse(op: Op, err: &str) -> Done {
    let err = || StoreError::Backend(err.to_owned());
    match op {
        Op::Create { reply, .. } => Done::Created(reply, Err(err())),
        Op::Append { reply, .. } => Done::Appended(reply, Err(err())),
        Op::Renew { reply, .. } => Done::Renewed(reply, Err(err())),
        Op::Claim { reply, .. } => Done::Claimed(reply, Err(err())),
        Op::Release { reply, .. } => Done::Appended(reply, Err(err())),
    }
}

/// Runs one write in a savepoint of its own.
fn apply(tx: &mut Transaction<'_>, op: Op) -> Done {
    fn scoped<T>(
        tx: &mut Transaction<'_>,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let savepoint = tx.savepoint()?;
        let result = f(&savepoint);
        if result.is_ok() {
            savepoint.commit()?;
        }
        // Dropping an uncommitted savepoint rolls it back.
        result
    }
    match op {
        Op::Create {
            saga,
            first,
            owner,
            lease_until_ms,
            reply,
        } => Done::Created(
            reply,
            scoped(tx, |c| create(c, &saga, &first, &owner, lease_until_ms)),
        ),
        Op::Append { append, reply } => Done::Appended(reply, scoped(tx, |c| write(c, &append))),
        Op::Renew {
            owner,
            ids,
            lease_until_ms,
            reply,
        } => Done::Renewed(
            reply,
            scoped(tx, |c| renew(c, &owner, &ids, lease_until_ms)),
        ),
        Op::Claim {
            owner,
            now_ms,
            lease_until_ms,
            limit,
            reply,
        } => Done::Claimed(
            reply,
            scoped(tx, |c| claim(c, &owner, now_ms, lease_until_ms, limit)),
        ),
        Op::Release { owner, ids, reply } => {
            Done::Appended(reply, scoped(tx, |c| release(c, &owner, &ids)))
        }
    }
}

fn create(
    conn: &Connection,
    saga: &NewSaga,
    first: &[Entry],
    owner: &str,
    lease_until_ms: i64,
) -> Result<Created, StoreError> {
    if let Some(key) = &saga.key {
        let existing: Option<String> = conn
            .prepare_cached("SELECT id FROM sagas WHERE name = ?1 AND start_key = ?2")?
            .query_row(params![saga.name, key], |row| row.get(0))
            .optional()?;
        if let Some(id) = existing {
            return Ok(Created::Existing(id));
        }
    }
    conn.prepare_cached(
        "INSERT INTO sagas (id, name, start_key, status, input, traceparent, deadline_ms,
                            created_ms, updated_ms, owner, lease_until_ms)
         VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?7, ?8, ?9)",
    )?
    .execute(params![
        saga.id,
        saga.name,
        saga.key,
        saga.input.to_string(),
        saga.traceparent,
        saga.deadline_ms,
        saga.created_ms,
        owner,
        lease_until_ms,
    ])?;
    insert_entries(conn, &saga.id, first)?;
    Ok(Created::New)
}

fn insert_entries(conn: &Connection, id: &str, entries: &[Entry]) -> Result<(), StoreError> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO saga_log (saga_id, seq, at_ms, step, phase, attempt, kind, http_status, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for entry in entries {
        insert.execute(params![
            id,
            entry.seq,
            entry.at_ms,
            entry.step,
            entry.phase.as_str(),
            entry.attempt,
            entry.kind.as_str(),
            entry.http_status,
            entry.detail.as_ref().map(Value::to_string),
        ])?;
    }
    Ok(())
}

fn write(conn: &Connection, append: &Append) -> Result<(), StoreError> {
    let now = entries_time(&append.entries);
    // The lease check and the write are one statement: nothing is written without the lease.
    let held = match &append.status {
        Some((status, error)) => conn
            .prepare_cached(
                "UPDATE sagas SET status = ?3, error = ?4, updated_ms = ?5, lease_until_ms = ?6
                 WHERE id = ?1 AND owner = ?2",
            )?
            .execute(params![
                append.id,
                append.owner,
                status.as_str(),
                error.as_ref().map(error_json),
                now,
                append.lease_until_ms,
            ])?,
        None => conn
            .prepare_cached(
                "UPDATE sagas SET updated_ms = ?3, lease_until_ms = ?4 WHERE id = ?1 AND owner = ?2",
            )?
            .execute(params![
                append.id,
                append.owner,
                now,
                append.lease_until_ms
            ])?,
    };
    if held == 0 {
        return Err(StoreError::LeaseLost(append.id.clone()));
    }
    insert_entries(conn, &append.id, &append.entries)
}

fn entries_time(entries: &[Entry]) -> i64 {
    entries
        .iter()
        .map(|e| e.at_ms)
        .max()
        .unwrap_or_else(crate::now_ms)
}

fn error_json(error: &SagaError) -> String {
    serde_json::to_string(error).unwrap_or_default()
}

fn renew(
    conn: &Connection,
    owner: &str,
    ids: &[String],
    lease_until_ms: i64,
) -> Result<Vec<String>, StoreError> {
    let mut update =
        conn.prepare_cached("UPDATE sagas SET lease_until_ms = ?3 WHERE id = ?1 AND owner = ?2")?;
    let mut lost = Vec::new();
    for id in ids {
        if update.execute(params![id, owner, lease_until_ms])? == 0 {
            lost.push(id.clone());
        }
    }
    Ok(lost)
}

fn claim(
    conn: &Connection,
    owner: &str,
    now_ms: i64,
    lease_until_ms: i64,
    limit: u32,
) -> Result<Vec<SagaRecord>, StoreError> {
    let ids: Vec<String> = conn
        .prepare_cached(
            "SELECT id FROM sagas
             WHERE status IN ('running', 'compensating') AND lease_until_ms < ?1
             ORDER BY lease_until_ms LIMIT ?2",
        )?
        .query_map(params![now_ms, limit], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut update =
        conn.prepare_cached("UPDATE sagas SET owner = ?2, lease_until_ms = ?3 WHERE id = ?1")?;
    let mut claimed = Vec::with_capacity(ids.len());
    for id in ids {
        update.execute(params![id, owner, lease_until_ms])?;
        if let Some(record) = load(conn, &id)? {
            claimed.push(record);
        }
    }
    Ok(claimed)
}

fn release(conn: &Connection, owner: &str, ids: &[String]) -> Result<(), StoreError> {
    let mut update = conn.prepare_cached(
        "UPDATE sagas SET owner = NULL, lease_until_ms = 0 WHERE id = ?1 AND owner = ?2",
    )?;
    for id in ids {
        update.execute(params![id, owner])?;
    }
    Ok(())
}

const SUMMARY_COLUMNS: &str = "id, name, status, created_ms, updated_ms, error";

fn summary_from_row(row: &Row<'_>) -> rusqlite::Result<SagaSummary> {
    let status: String = row.get(2)?;
    let error: Option<String> = row.get(5)?;
    Ok(SagaSummary {
        id: row.get(0)?,
        name: row.get(1)?,
        // Only this code writes the column; an unknown value would be a corrupt file.
        status: Status::parse(&status).unwrap_or(Status::Failed),
        created_ms: row.get(3)?,
        updated_ms: row.get(4)?,
        error: error.and_then(|e| serde_json::from_str(&e).ok()),
    })
}

fn load(conn: &Connection, id: &str) -> Result<Option<SagaRecord>, StoreError> {
    let Some((summary, input, key, traceparent, deadline_ms)) = conn
        .prepare_cached(&format!(
            "SELECT {SUMMARY_COLUMNS}, input, start_key, traceparent, deadline_ms
             FROM sagas WHERE id = ?1"
        ))?
        .query_row([id], |row| {
            let input: String = row.get(6)?;
            Ok((
                summary_from_row(row)?,
                input,
                row.get::<_, Option<String>>(7)?,
                row.get::<_, Option<String>>(8)?,
                row.get::<_, Option<i64>>(9)?,
            ))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let log = conn
        .prepare_cached(
            "SELECT seq, at_ms, step, phase, attempt, kind, http_status, detail
             FROM saga_log WHERE saga_id = ?1 ORDER BY seq",
        )?
        .query_map([id], entry_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(SagaRecord {
        summary,
        input: serde_json::from_str(&input).unwrap_or(Value::Null),
        key,
        traceparent,
        deadline_ms,
        log,
    }))
}

fn entry_from_row(row: &Row<'_>) -> rusqlite::Result<Entry> {
    let phase: String = row.get(3)?;
    let kind: String = row.get(5)?;
    let detail: Option<String> = row.get(7)?;
    Ok(Entry {
        seq: row.get(0)?,
        at_ms: row.get(1)?,
        step: row.get(2)?,
        phase: Phase::parse(&phase).unwrap_or(Phase::Action),
        attempt: row.get(4)?,
        kind: EntryKind::parse(&kind).unwrap_or(EntryKind::Failed),
        http_status: row.get(6)?,
        detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
    })
}

impl SagaStore for SqliteStore {
    fn create<'a>(
        &'a self,
        saga: &'a NewSaga,
        first: &'a [Entry],
        owner: &'a str,
        lease_until_ms: i64,
    ) -> BoxFuture<'a, Result<Created, StoreError>> {
        Box::pin(self.submit(Op::create(saga, first, owner, lease_until_ms)))
    }

    fn append<'a>(&'a self, append: Append) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.submit(Op::append(append)))
    }

    fn renew<'a>(
        &'a self,
        owner: &'a str,
        ids: &'a [String],
        lease_until_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(self.submit(Op::renew(owner, ids, lease_until_ms)))
    }

    fn claim<'a>(
        &'a self,
        owner: &'a str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SagaRecord>, StoreError>> {
        Box::pin(self.submit(Op::claim(owner, now_ms, lease_until_ms, limit)))
    }

    fn release<'a>(
        &'a self,
        owner: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.submit(Op::release(owner, ids)))
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SagaRecord>, StoreError>> {
        let id = id.to_owned();
        Box::pin(self.read(move |conn| load(conn, &id)))
    }

    fn list<'a>(
        &'a self,
        filter: &'a ListFilter,
    ) -> BoxFuture<'a, Result<Vec<SagaSummary>, StoreError>> {
        let filter = filter.clone();
        Box::pin(self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS} FROM sagas
                 WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR name = ?2)
                   AND (?3 IS NULL OR created_ms < ?3)
                 ORDER BY created_ms DESC, id DESC LIMIT ?4"
            ))?;
            let rows = stmt.query_map(
                params![
                    filter.status.map(Status::as_str),
                    filter.name,
                    filter.before_ms,
                    filter.limit
                ],
                summary_from_row,
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        }))
    }

    fn counts(&self) -> BoxFuture<'_, Result<Vec<StatusCount>, StoreError>> {
        Box::pin(self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT name, status, COUNT(*) FROM sagas GROUP BY name, status ORDER BY name, status",
            )?;
            let rows = stmt.query_map([], |row| {
                let status: String = row.get(1)?;
                Ok(StatusCount {
                    name: row.get(0)?,
                    status: Status::parse(&status).unwrap_or(Status::Failed),
                    count: row.get::<_, i64>(2)?.try_into().unwrap_or(0),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        }))
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            writes: self.counters.writes.load(Ordering::Relaxed),
        }
    }
}
