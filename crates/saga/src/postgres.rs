//! The shared saga store: PostgreSQL, for several orchestrators (several processes, several
//! machines) sharing their sagas through leases.
//!
//! Same semantics as the embedded [`crate::sqlite::SqliteStore`], and the same shape: one writer
//! task owns a connection of its own and commits every write waiting in its bounded queue — from
//! all the sagas in flight — in one transaction (group commit), each write in a savepoint so that
//! one failing write leaves the others of its batch intact; every caller is answered once the
//! commit is done. Reads use a second connection and never wait for the writer.
//!
//! Claims run in the writer's transaction with `FOR UPDATE SKIP LOCKED`: two orchestrators
//! claiming at once — in this process or another — never get the same saga.
//!
//! JSON (inputs, responses, errors) is stored as `text`, exactly as serialized: `jsonb` would
//! refuse a body holding `\u0000` and would leave the saga stuck on a write that cannot succeed.
//!
//! The connections are not re-established: when one is lost, every call fails with an error
//! that says so, and the process should be restarted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::join;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, NoTls, Row, Statement};

use crate::queued::{Op, Reply};
use crate::{
    Append, BoxFuture, Created, Entry, EntryKind, ListFilter, NewSaga, Phase, SagaError,
    SagaRecord, SagaStore, SagaSummary, Status, StatusCount, StoreError, StoreStats,
};

/// Writes waiting for the writer; a full queue makes writers wait, which is the back-pressure a
/// saga engine needs (a transition must not be dropped).
const QUEUE_CAPACITY: usize = 8_192;

/// Most writes in one transaction, so a huge backlog still commits in reasonable slices.
const BATCH_MAX: usize = 2_048;

/// Serializes the schema's creation among processes starting at once (`IF NOT EXISTS` alone
/// races on the catalogue). An arbitrary constant: "flotilla-saga" in ASCII, truncated.
const SCHEMA_LOCK: i64 = 0x666c_6f74_696c_6c61;

/// `id`, `name` and `status` sort bytewise (`COLLATE "C"`), as in SQLite, so listings page the
/// same on both stores whatever the database's locale.
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sagas (
    id             text COLLATE "C" PRIMARY KEY,
    name           text COLLATE "C" NOT NULL,
    start_key      text,
    status         text COLLATE "C" NOT NULL,
    input          text NOT NULL,
    traceparent    text,
    deadline_ms    bigint,
    created_ms     bigint NOT NULL,
    updated_ms     bigint NOT NULL,
    error          text,
    owner          text,
    lease_until_ms bigint NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS sagas_key ON sagas (name, start_key) WHERE start_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS sagas_created ON sagas (created_ms);
CREATE INDEX IF NOT EXISTS sagas_status_created ON sagas (status, created_ms);
-- Claims look only at unfinished sagas: a partial index stays as small as they are few.
CREATE INDEX IF NOT EXISTS sagas_unfinished ON sagas (lease_until_ms)
    WHERE status IN ('running', 'compensating');
CREATE TABLE IF NOT EXISTS saga_log (
    saga_id     text COLLATE "C" NOT NULL,
    seq         bigint NOT NULL,
    at_ms       bigint NOT NULL,
    step        bigint NOT NULL,
    phase       text NOT NULL,
    attempt     bigint NOT NULL,
    kind        text NOT NULL,
    http_status integer,
    detail      text,
    PRIMARY KEY (saga_id, seq)
);
"#;

/// The log columns after `saga_id`, as arrays: a whole batch of entries is one statement.
const ENTRY_ARRAYS: &str = "UNNEST($8::bigint[], $9::bigint[], $10::bigint[], $11::text[],
                                    $12::bigint[], $13::text[], $14::integer[], $15::text[])";

/// Stores a saga and its first entries — or nothing, when its start key was used: then it
/// returns no row.
fn create_sql() -> String {
    format!(
        "WITH created AS (
             INSERT INTO sagas (id, name, start_key, status, input, traceparent, deadline_ms,
                                created_ms, updated_ms, owner, lease_until_ms)
             VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $7, $16, $17)
             ON CONFLICT (name, start_key) WHERE start_key IS NOT NULL DO NOTHING
             RETURNING id
         ), logged AS (
             INSERT INTO saga_log (saga_id, seq, at_ms, step, phase, attempt, kind, http_status,
                                   detail)
             SELECT created.id, e.* FROM created, {ENTRY_ARRAYS} AS e
         )
         SELECT id FROM created"
    )
}

/// The lease check and the write are one statement: nothing is written without the lease. It
/// returns a row only when the lease was held.
fn append_sql() -> String {
    // Parameters $2..$7 line up with ENTRY_ARRAYS starting at $8.
    format!(
        "WITH held AS (
             UPDATE sagas SET
                 status = CASE WHEN $3 THEN $4 ELSE status END,
                 error = CASE WHEN $3 THEN $5 ELSE error END,
                 updated_ms = $6, lease_until_ms = $7
             WHERE id = $1 AND owner = $2
             RETURNING id
         ), logged AS (
             INSERT INTO saga_log (saga_id, seq, at_ms, step, phase, attempt, kind, http_status,
                                   detail)
             SELECT held.id, e.* FROM held, {ENTRY_ARRAYS} AS e
         )
         SELECT id FROM held"
    )
}

const EXISTING_SQL: &str = "SELECT id FROM sagas WHERE name = $1 AND start_key = $2";

const RENEW_SQL: &str =
    "UPDATE sagas SET lease_until_ms = $3 WHERE id = ANY($1) AND owner = $2 RETURNING id";

const CLAIMABLE_SQL: &str = "SELECT id FROM sagas
     WHERE status IN ('running', 'compensating') AND lease_until_ms < $1
     ORDER BY lease_until_ms LIMIT $2
     FOR UPDATE SKIP LOCKED";

const TAKE_SQL: &str = "UPDATE sagas SET owner = $2, lease_until_ms = $3 WHERE id = ANY($1)";

const RELEASE_SQL: &str =
    "UPDATE sagas SET owner = NULL, lease_until_ms = 0 WHERE id = ANY($1) AND owner = $2";

const LOAD_SQL: &str = "SELECT id, name, status, created_ms, updated_ms, error,
            input, start_key, traceparent, deadline_ms
     FROM sagas WHERE id = ANY($1)";

const LOG_SQL: &str = "SELECT saga_id, seq, at_ms, step, phase, attempt, kind, http_status, detail
     FROM saga_log WHERE saga_id = ANY($1) ORDER BY saga_id, seq";

const LIST_SQL: &str = "SELECT id, name, status, created_ms, updated_ms, error FROM sagas
     WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR name = $2)
       AND ($3::bigint IS NULL OR created_ms < $3)
     ORDER BY created_ms DESC, id DESC LIMIT $4";

const COUNTS_SQL: &str =
    "SELECT name, status, COUNT(*) FROM sagas GROUP BY name, status ORDER BY name, status";

/// A finished write, answered only once its transaction is committed.
enum Done {
    Created(Reply<Created>, Result<Created, StoreError>),
    Unit(Reply<()>, Result<(), StoreError>),
    Renewed(Reply<Vec<String>>, Result<Vec<String>, StoreError>),
    Claimed(Reply<Vec<SagaRecord>>, Result<Vec<SagaRecord>, StoreError>),
}

impl Done {
    /// A failure of the statement itself (not a lost lease): its savepoint must be rolled back.
    fn broke(&self) -> bool {
        fn broke<T>(result: &Result<T, StoreError>) -> bool {
            matches!(result, Err(StoreError::Backend(_)))
        }
        match self {
            Done::Created(_, r) => broke(r),
            Done::Unit(_, r) => broke(r),
            Done::Renewed(_, r) => broke(r),
            Done::Claimed(_, r) => broke(r),
        }
    }

    fn refused(self, err: &str) -> Done {
        let err = || StoreError::Backend(err.to_owned());
        match self {
            Done::Created(reply, _) => Done::Created(reply, Err(err())),
            Done::Unit(reply, _) => Done::Unit(reply, Err(err())),
            Done::Renewed(reply, _) => Done::Renewed(reply, Err(err())),
            Done::Claimed(reply, _) => Done::Claimed(reply, Err(err())),
        }
    }

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
            Done::Unit(reply, result) => settle(reply, result, commit),
            Done::Renewed(reply, result) => settle(reply, result, commit),
            Done::Claimed(reply, result) => settle(reply, result, commit),
        }
    }
}

/// One connection, and why it ended once it has.
struct Conn {
    client: Client,
    role: &'static str,
    ended: Arc<Mutex<Option<String>>>,
}

impl Conn {
    async fn open(config: &tokio_postgres::Config, role: &'static str) -> Result<Self, StoreError> {
        let (client, connection) = config.connect(NoTls).await.map_err(|err| {
            StoreError::Backend(format!(
                "cannot connect to PostgreSQL ({role}): {}",
                describe(&err)
            ))
        })?;
        let ended = Arc::new(Mutex::new(None));
        // The connection's I/O runs until the client is dropped (the store is) or the server
        // goes away; then it records why, for the errors that follow.
        tokio::spawn({
            let ended = Arc::clone(&ended);
            async move {
                let why = match connection.await {
                    Ok(()) => "closed".to_owned(),
                    Err(err) => {
                        let why = describe(&err);
                        tracing::warn!(
                            "saga store: the PostgreSQL connection ({role}) ended: {why}"
                        );
                        why
                    }
                };
                *ended.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
            }
        });
        Ok(Self {
            client,
            role,
            ended,
        })
    }

    /// A clear error: a lost connection says so (and why), others say what the server said.
    fn error(&self, err: &tokio_postgres::Error) -> StoreError {
        if self.client.is_closed() {
            let why = self
                .ended
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .unwrap_or_else(|| describe(err));
            return StoreError::Backend(format!(
                "the PostgreSQL connection ({}) was lost ({why}); restart to reconnect",
                self.role
            ));
        }
        StoreError::Backend(describe(err))
    }

    async fn prepare(&self, sql: &str) -> Result<Statement, StoreError> {
        self.client
            .prepare(sql)
            .await
            .map_err(|err| self.error(&err))
    }
}

fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return db.to_string();
    }
    match std::error::Error::source(err) {
        Some(source) => format!("{err}: {source}"),
        None => err.to_string(),
    }
}

/// The writer's prepared statements.
struct WriteStatements {
    create: Statement,
    existing: Statement,
    append: Statement,
    renew: Statement,
    claimable: Statement,
    take: Statement,
    release: Statement,
    load: Statement,
    log: Statement,
}

/// The reader's prepared statements.
struct ReadStatements {
    load: Statement,
    log: Statement,
    list: Statement,
    counts: Statement,
}

struct Reader {
    conn: Conn,
    statements: ReadStatements,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    writes: AtomicU64,
}

/// The shared [`SagaStore`].
pub struct PostgresStore {
    queue: mpsc::Sender<Op>,
    reader: Reader,
    counters: Arc<Counters>,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db`, or `host=… user=…`; no TLS) and
    /// creates the tables if they are missing. With `schema`, the tables live in that schema
    /// (created if needed): stores with different schemas share nothing.
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|err| {
            StoreError::Backend(format!("invalid PostgreSQL URL: {}", describe(&err)))
        })?;
        if config.get_application_name().is_none() {
            config.application_name("flotilla-saga");
        }
        let writer = Conn::open(&config, "writer").await?;
        let reader = Conn::open(&config, "reader").await?;
        if let Some(schema) = schema {
            let path = format!("SET search_path TO {}", quote_ident(schema));
            for conn in [&writer, &reader] {
                conn.client
                    .batch_execute(&path)
                    .await
                    .map_err(|err| conn.error(&err))?;
            }
        }
        let create_schema = schema
            .map(|s| format!("CREATE SCHEMA IF NOT EXISTS {};", quote_ident(s)))
            .unwrap_or_default();
        writer
            .client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); {create_schema} {SCHEMA} COMMIT;"
            ))
            .await
            .map_err(|err| {
                StoreError::Backend(format!(
                    "cannot create the saga tables: {}",
                    describe(&err)
                ))
            })?;
        let statements = WriteStatements {
            create: writer.prepare(&create_sql()).await?,
            existing: writer.prepare(EXISTING_SQL).await?,
            append: writer.prepare(&append_sql()).await?,
            renew: writer.prepare(RENEW_SQL).await?,
            claimable: writer.prepare(CLAIMABLE_SQL).await?,
            take: writer.prepare(TAKE_SQL).await?,
            release: writer.prepare(RELEASE_SQL).await?,
            load: writer.prepare(LOAD_SQL).await?,
            log: writer.prepare(LOG_SQL).await?,
        };
        let reader = Reader {
            statements: ReadStatements {
                load: reader.prepare(LOAD_SQL).await?,
                log: reader.prepare(LOG_SQL).await?,
                list: reader.prepare(LIST_SQL).await?,
                counts: reader.prepare(COUNTS_SQL).await?,
            },
            conn: reader,
        };
        let (queue, ops) = mpsc::channel(QUEUE_CAPACITY);
        let counters = Arc::new(Counters::default());
        // The writer ends once the store is dropped (its queue closes) and what was queued is
        // committed; its connection closes with it.
        tokio::spawn(write_loop(writer, statements, ops, Arc::clone(&counters)));
        Ok(Self {
            queue,
            reader,
            counters,
        })
    }

    async fn submit<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        // Bounded: when the writer falls behind, writers wait rather than the queue growing.
        self.queue.send(op(reply)).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

fn closed() -> StoreError {
    StoreError::Backend("the saga store is closed".into())
}

/// `"name"`, with inner quotes doubled: any schema name is taken literally.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn write_loop(
    conn: Conn,
    statements: WriteStatements,
    mut ops: mpsc::Receiver<Op>,
    counters: Arc<Counters>,
) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    while ops.recv_many(&mut batch, BATCH_MAX).await > 0 {
        let writes = batch.len() as u64;
        let mut done = Vec::with_capacity(batch.len());
        let commit = transaction(&conn, &statements, &mut batch, &mut done).await;
        match &commit {
            Ok(()) => {
                counters.commits.fetch_add(1, Ordering::Relaxed);
                counters.writes.fetch_add(writes, Ordering::Relaxed);
            }
            Err(err) => tracing::warn!("saga store: a commit failed: {err}"),
        }
        for done in done {
            done.send(&commit);
        }
    }
}

/// Runs the whole batch in one transaction, each write in the savepoint `op`: established before
/// the first write, rolled back to after a write that failed, and re-established (released and
/// set again) before each next write — sent together with that write, so it costs no round trip.
///
/// Row locks are held until the commit. A write that needs a row another orchestrator's batch
/// holds waits for it (claims skip such rows instead); in the rare case of two batches waiting on
/// each other, PostgreSQL cancels one write as a deadlock: that write fails alone, like any other.
async fn transaction(
    conn: &Conn,
    statements: &WriteStatements,
    batch: &mut Vec<Op>,
    done: &mut Vec<Done>,
) -> Result<(), String> {
    let mut before = "BEGIN; SAVEPOINT op";
    let mut broken: Option<String> = None;
    for op in batch.drain(..) {
        if let Some(err) = &broken {
            done.push(refuse(op, err));
            continue;
        }
        // Pipelined: the savepoint and the write's first statement go out together (`join`
        // polls, and so sends, in order), so a savepoint costs no round trip of its own.
        let (savepoint, result) = join(
            conn.client.batch_execute(before),
            apply(conn, statements, op),
        )
        .await;
        if let Err(err) = savepoint {
            // The write ran without its savepoint (or failed with it): the batch is lost.
            let err = error_text(conn, &err);
            done.push(result.refused(&err));
            broken = Some(err);
            continue;
        }
        before = "RELEASE SAVEPOINT op; SAVEPOINT op";
        if result.broke() {
            if let Err(err) = conn.client.batch_execute("ROLLBACK TO SAVEPOINT op").await {
                broken = Some(error_text(conn, &err));
            }
        }
        done.push(result);
    }
    if let Some(err) = broken {
        // A transaction in error would COMMIT as a silent rollback: end it explicitly and fail
        // the whole batch.
        let _ = conn.client.batch_execute("ROLLBACK").await;
        return Err(err);
    }
    conn.client
        .batch_execute("COMMIT")
        .await
        .map_err(|err| error_text(conn, &err))
}

fn error_text(conn: &Conn, err: &tokio_postgres::Error) -> String {
    match conn.error(err) {
        StoreError::Backend(text) | StoreError::LeaseLost(text) => text,
    }
}

fn refuse(op: Op, err: &str) -> Done {
    let err = || StoreError::Backend(err.to_owned());
    match op {
        Op::Create { reply, .. } => Done::Created(reply, Err(err())),
        Op::Append { reply, .. } => Done::Unit(reply, Err(err())),
        Op::Renew { reply, .. } => Done::Renewed(reply, Err(err())),
        Op::Claim { reply, .. } => Done::Claimed(reply, Err(err())),
        Op::Release { reply, .. } => Done::Unit(reply, Err(err())),
    }
}

async fn apply(conn: &Conn, st: &WriteStatements, op: Op) -> Done {
    match op {
        Op::Create {
            saga,
            first,
            owner,
            lease_until_ms,
            reply,
        } => Done::Created(
            reply,
            create(conn, st, &saga, &first, &owner, lease_until_ms).await,
        ),
        Op::Append { append, reply } => Done::Unit(reply, write(conn, st, &append).await),
        Op::Renew {
            owner,
            ids,
            lease_until_ms,
            reply,
        } => Done::Renewed(reply, renew(conn, st, &owner, &ids, lease_until_ms).await),
        Op::Claim {
            owner,
            now_ms,
            lease_until_ms,
            limit,
            reply,
        } => Done::Claimed(
            reply,
            claim(conn, st, &owner, now_ms, lease_until_ms, limit).await,
        ),
        Op::Release { owner, ids, reply } => {
            let result = conn
                .client
                .execute(&st.release, &[&ids, &owner])
                .await
                .map(drop)
                .map_err(|err| conn.error(&err));
            Done::Unit(reply, result)
        }
    }
}

/// Entries as column arrays, for [`ENTRY_ARRAYS`].
struct EntryColumns {
    seq: Vec<i64>,
    at_ms: Vec<i64>,
    step: Vec<i64>,
    phase: Vec<&'static str>,
    attempt: Vec<i64>,
    kind: Vec<&'static str>,
    http_status: Vec<Option<i32>>,
    detail: Vec<Option<String>>,
}

impl EntryColumns {
    fn new(entries: &[Entry]) -> Self {
        Self {
            seq: entries.iter().map(|e| i64::from(e.seq)).collect(),
            at_ms: entries.iter().map(|e| e.at_ms).collect(),
            step: entries.iter().map(|e| i64::from(e.step)).collect(),
            phase: entries.iter().map(|e| e.phase.as_str()).collect(),
            attempt: entries.iter().map(|e| i64::from(e.attempt)).collect(),
            kind: entries.iter().map(|e| e.kind.as_str()).collect(),
            http_status: entries
                .iter()
                .map(|e| e.http_status.map(i32::from))
                .collect(),
            detail: entries
                .iter()
                .map(|e| e.detail.as_ref().map(serde_json::Value::to_string))
                .collect(),
        }
    }
}

async fn create(
    conn: &Conn,
    st: &WriteStatements,
    saga: &NewSaga,
    first: &[Entry],
    owner: &str,
    lease_until_ms: i64,
) -> Result<Created, StoreError> {
    let e = EntryColumns::new(first);
    let input = saga.input.to_string();
    let stored = conn
        .client
        .query_opt(
            &st.create,
            &[
                &saga.id,
                &saga.name,
                &saga.key,
                &input,
                &saga.traceparent,
                &saga.deadline_ms,
                &saga.created_ms,
                &e.seq,
                &e.at_ms,
                &e.step,
                &e.phase,
                &e.attempt,
                &e.kind,
                &e.http_status,
                &e.detail,
                &owner,
                &lease_until_ms,
            ],
        )
        .await
        .map_err(|err| conn.error(&err))?;
    if stored.is_some() {
        return Ok(Created::New);
    }
    // The key was taken (the insert waited for a concurrent one to commit, if it had to).
    let existing = conn
        .client
        .query_opt(&st.existing, &[&saga.name, &saga.key])
        .await
        .map_err(|err| conn.error(&err))?;
    match existing {
        Some(row) => Ok(Created::Existing(get(&row, 0)?)),
        None => Err(StoreError::Backend(format!(
            "saga {}: its start key is taken, but by no saga",
            saga.id
        ))),
    }
}

async fn write(conn: &Conn, st: &WriteStatements, append: &Append) -> Result<(), StoreError> {
    let now = entries_time(&append.entries);
    let e = EntryColumns::new(&append.entries);
    let (set_status, status, error) = match &append.status {
        Some((status, error)) => (true, Some(status.as_str()), error.as_ref().map(error_json)),
        None => (false, None, None),
    };
    let held = conn
        .client
        .query_opt(
            &st.append,
            &[
                &append.id,
                &append.owner,
                &set_status,
                &status,
                &error,
                &now,
                &append.lease_until_ms,
                &e.seq,
                &e.at_ms,
                &e.step,
                &e.phase,
                &e.attempt,
                &e.kind,
                &e.http_status,
                &e.detail,
            ],
        )
        .await
        .map_err(|err| conn.error(&err))?;
    match held {
        Some(_) => Ok(()),
        None => Err(StoreError::LeaseLost(append.id.clone())),
    }
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

async fn renew(
    conn: &Conn,
    st: &WriteStatements,
    owner: &str,
    ids: &[String],
    lease_until_ms: i64,
) -> Result<Vec<String>, StoreError> {
    let held = conn
        .client
        .query(&st.renew, &[&ids, &owner, &lease_until_ms])
        .await
        .map_err(|err| conn.error(&err))?;
    let held = held
        .iter()
        .map(|row| get::<String>(row, 0))
        .collect::<Result<std::collections::HashSet<_>, _>>()?;
    Ok(ids
        .iter()
        .filter(|id| !held.contains(*id))
        .cloned()
        .collect())
}

async fn claim(
    conn: &Conn,
    st: &WriteStatements,
    owner: &str,
    now_ms: i64,
    lease_until_ms: i64,
    limit: u32,
) -> Result<Vec<SagaRecord>, StoreError> {
    // Rows another transaction is claiming (or writing) are skipped, not waited for; the rows
    // selected stay locked until this transaction commits.
    let ids = conn
        .client
        .query(&st.claimable, &[&now_ms, &i64::from(limit)])
        .await
        .map_err(|err| conn.error(&err))?
        .iter()
        .map(|row| get::<String>(row, 0))
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    conn.client
        .execute(&st.take, &[&ids, &owner, &lease_until_ms])
        .await
        .map_err(|err| conn.error(&err))?;
    let mut records = load(conn, &st.load, &st.log, &ids).await?;
    // Oldest lease first, as selected.
    Ok(ids.iter().filter_map(|id| records.remove(id)).collect())
}

/// The sagas among `ids`, with their logs.
async fn load(
    conn: &Conn,
    load: &Statement,
    log: &Statement,
    ids: &[String],
) -> Result<HashMap<String, SagaRecord>, StoreError> {
    // Both queries go out at once: one round trip.
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
    let (sagas, entries) = tokio::try_join!(
        conn.client.query(load, &params),
        conn.client.query(log, &params),
    )
    .map_err(|err| conn.error(&err))?;
    let mut records = HashMap::with_capacity(sagas.len());
    for row in &sagas {
        let summary = summary_from_row(row)?;
        let input: String = get(row, 6)?;
        records.insert(
            summary.id.clone(),
            SagaRecord {
                summary,
                input: serde_json::from_str(&input).unwrap_or(serde_json::Value::Null),
                key: get(row, 7)?,
                traceparent: get(row, 8)?,
                deadline_ms: get(row, 9)?,
                log: Vec::new(),
            },
        );
    }
    for row in &entries {
        let id: String = get(row, 0)?;
        if let Some(record) = records.get_mut(&id) {
            record.log.push(entry_from_row(row)?);
        }
    }
    Ok(records)
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    idx: usize,
) -> Result<T, StoreError> {
    row.try_get(idx)
        .map_err(|err| StoreError::Backend(describe(&err)))
}

fn summary_from_row(row: &Row) -> Result<SagaSummary, StoreError> {
    let status: String = get(row, 2)?;
    let error: Option<String> = get(row, 5)?;
    Ok(SagaSummary {
        id: get(row, 0)?,
        name: get(row, 1)?,
        // Only this code writes the column; an unknown value would be a corrupt table.
        status: Status::parse(&status).unwrap_or(Status::Failed),
        created_ms: get(row, 3)?,
        updated_ms: get(row, 4)?,
        error: error.and_then(|e| serde_json::from_str(&e).ok()),
    })
}

/// A log row: `saga_id` first, then the entry.
fn entry_from_row(row: &Row) -> Result<Entry, StoreError> {
    let number = |idx: usize| -> Result<u32, StoreError> {
        let value: i64 = get(row, idx)?;
        u32::try_from(value)
            .map_err(|_| StoreError::Backend(format!("saga log: {value} is out of range")))
    };
    let phase: String = get(row, 4)?;
    let kind: String = get(row, 6)?;
    let http_status: Option<i32> = get(row, 7)?;
    let detail: Option<String> = get(row, 8)?;
    Ok(Entry {
        seq: number(1)?,
        at_ms: get(row, 2)?,
        step: number(3)?,
        phase: Phase::parse(&phase).unwrap_or(Phase::Action),
        attempt: number(5)?,
        kind: EntryKind::parse(&kind).unwrap_or(EntryKind::Failed),
        http_status: http_status.and_then(|s| u16::try_from(s).ok()),
        detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
    })
}

impl SagaStore for PostgresStore {
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
        Box::pin(async move {
            let r = &self.reader;
            let ids = [id.to_owned()];
            let mut records = load(&r.conn, &r.statements.load, &r.statements.log, &ids).await?;
            Ok(records.remove(id))
        })
    }

    fn list<'a>(
        &'a self,
        filter: &'a ListFilter,
    ) -> BoxFuture<'a, Result<Vec<SagaSummary>, StoreError>> {
        Box::pin(async move {
            let r = &self.reader;
            let rows = r
                .conn
                .client
                .query(
                    &r.statements.list,
                    &[
                        &filter.status.map(Status::as_str),
                        &filter.name,
                        &filter.before_ms,
                        &i64::from(filter.limit),
                    ],
                )
                .await
                .map_err(|err| r.conn.error(&err))?;
            rows.iter().map(summary_from_row).collect()
        })
    }

    fn counts(&self) -> BoxFuture<'_, Result<Vec<StatusCount>, StoreError>> {
        Box::pin(async move {
            let r = &self.reader;
            let rows = r
                .conn
                .client
                .query(&r.statements.counts, &[])
                .await
                .map_err(|err| r.conn.error(&err))?;
            rows.iter()
                .map(|row| {
                    let status: String = get(row, 1)?;
                    let count: i64 = get(row, 2)?;
                    Ok(StatusCount {
                        name: get(row, 0)?,
                        status: Status::parse(&status).unwrap_or(Status::Failed),
                        count: count.try_into().unwrap_or(0),
                    })
                })
                .collect()
        })
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            writes: self.counters.writes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::quote_ident;

    #[test]
    fn schema_names_are_quoted_literally() {
        assert_eq!(quote_ident("saga_test_1"), "\"saga_test_1\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
