//! Sagas: multi-service transactions as a sequence of steps, each undone by a compensation when
//! a later step fails for good.
//!
//! The [`engine::Orchestrator`] runs the sagas the manifest declares. It calls services through a
//! [`engine::StepCaller`] (in the binary: the shared proxy stack, so policies, breakers and spans
//! apply) and writes every transition to a [`SagaStore`] *before* the next call is made. After a
//! crash, another start (or another orchestrator sharing the store) reads the log back and
//! resumes each unfinished saga where it stopped; a call whose outcome was never recorded is
//! made again with the same `Idempotency-Key`, which is what makes that safe.
//!
//! Two stores behind the one trait, tested by one shared suite:
//! - [`sqlite::SqliteStore`], the embedded default, under `.flotilla/`: WAL, a single writer that
//!   commits the transitions of all concurrent sagas together (group commit), so a durable commit
//!   per transition does not cost an fsync per transition.
//! - [`postgres::PostgresStore`], where several orchestrators (processes, machines) share the
//!   sagas through leases: the same single writer and group commit, with claims that skip the
//!   rows another orchestrator is claiming (`FOR UPDATE SKIP LOCKED`).
//!
//! Ownership is a lease: the orchestrator that creates or claims a saga holds it until
//! `lease_until`, renews it while it works, and every write is conditional on still holding it.
//! An orchestrator that stalls past its lease therefore cannot write again once another has
//! claimed the saga; at worst it repeats a call the new owner also makes, under the same
//! idempotency key.

pub mod direct;
pub mod engine;
pub mod postgres;
mod queued;
pub mod sqlite;
pub mod template;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A boxed future, so that [`SagaStore`] can be a trait object: the store is chosen by the
/// manifest at run time.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Going forward, step by step.
    Running,
    /// A step failed for good (or the saga timed out): undoing the completed steps, newest first.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Every completed step was undone.
    Compensated,
    /// A compensation was refused (4xx): something stays done that should not. Needs a human.
    Failed,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Running,
        Status::Compensating,
        Status::Completed,
        Status::Compensated,
        Status::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Compensating => "compensating",
            Status::Completed => "completed",
            Status::Compensated => "compensated",
            Status::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Compensated | Status::Failed
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which call of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Action,
    Compensate,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Compensate => "compensate",
        }
    }

    pub fn parse(text: &str) -> Option<Phase> {
        match text {
            "action" => Some(Phase::Action),
            "compensate" => Some(Phase::Compensate),
            _ => None,
        }
    }
}

/// What one log entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// Written before the call is made: a `started` without an outcome after it is a call whose
    /// outcome is unknown.
    Started,
    Succeeded,
    /// May be retried: a transport error, a timeout, a 5xx, 408, 425 or 429.
    Failed,
    /// Will not be retried: any other 4xx, or a request that cannot be built.
    Refused,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Started => "started",
            EntryKind::Succeeded => "succeeded",
            EntryKind::Failed => "failed",
            EntryKind::Refused => "refused",
        }
    }

    pub fn parse(text: &str) -> Option<EntryKind> {
        [
            EntryKind::Started,
            EntryKind::Succeeded,
            EntryKind::Failed,
            EntryKind::Refused,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}

/// One line of a saga's write-ahead log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the saga's log, from 0, without gaps.
    pub seq: u32,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Index of the step in the saga's definition.
    pub step: u32,
    pub phase: Phase,
    /// 1 for the first try.
    pub attempt: u32,
    pub kind: EntryKind,
    /// The HTTP status answered, when there was an answer.
    pub http_status: Option<u16>,
    /// `succeeded`: the response body (JSON, or a string when it was not JSON); `failed` and
    /// `refused`: the reason, as a string.
    pub detail: Option<Value>,
}

/// Why a saga did not complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaError {
    /// The step that failed (or, for `failed`, whose compensation was refused).
    pub step: String,
    /// What its service answered, or `None` for a transport error, a timeout or a template.
    pub status: Option<u16>,
    pub message: String,
}

/// A saga as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaSummary {
    pub id: String,
    pub name: String,
    pub status: Status,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub error: Option<SagaError>,
}

/// A saga with everything needed to resume it or show its timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaRecord {
    #[serde(flatten)]
    pub summary: SagaSummary,
    pub input: Value,
    /// The start's idempotency key, if it had one.
    pub key: Option<String>,
    /// The trace the saga continues (W3C `traceparent` of what started it).
    pub traceparent: Option<String>,
    /// When it stops going forward and compensates, in ms since the epoch.
    pub deadline_ms: Option<i64>,
    pub log: Vec<Entry>,
}

/// A saga about to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSaga {
    pub id: String,
    pub name: String,
    pub input: Value,
    pub key: Option<String>,
    pub traceparent: Option<String>,
    pub created_ms: i64,
    pub deadline_ms: Option<i64>,
}

/// What [`SagaStore::create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// Stored, leased to the caller.
    New,
    /// A saga of that name was already started with that key: its id.
    Existing(String),
}

/// One conditional write: the entries and the new status are stored only while `owner` holds
/// the saga's lease, and the lease is extended to `lease_until_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    pub id: String,
    pub owner: String,
    pub lease_until_ms: i64,
    pub entries: Vec<Entry>,
    /// The saga's new status, with its error (or `None` to clear it).
    pub status: Option<(Status, Option<SagaError>)>,
}

/// What [`SagaStore::list`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub status: Option<Status>,
    pub name: Option<String>,
    /// Only sagas created strictly before this time (paging, newest first).
    pub before_ms: Option<i64>,
    pub limit: u32,
}

/// Sagas per name and status, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCount {
    pub name: String,
    pub status: Status,
    pub count: u64,
}

/// What a store has done since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Durable commits (each one an fsync for SQLite with `synchronous=FULL`).
    pub commits: u64,
    /// Writes (creates, appends, claims) those commits carried.
    pub writes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another orchestrator holds the saga now (or it is gone): stop working on it.
    #[error("the lease on saga {0} is held by another orchestrator")]
    LeaseLost(String),
    #[error("saga store: {0}")]
    Backend(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Backend(err.to_string())
    }
}

/// Durable saga state. Every method is safe to call from many tasks at once; implementations
/// batch concurrent writes into shared commits where they can.
pub trait SagaStore: Send + Sync + 'static {
    /// Stores a new saga, with its first log entries, leased to `owner` until `lease_until_ms`
    /// and with status `running`. When `saga.key` is set and a saga of that name was already
    /// created with it, stores nothing and returns that saga's id.
    fn create<'a>(
        &'a self,
        saga: &'a NewSaga,
        first: &'a [Entry],
        owner: &'a str,
        lease_until_ms: i64,
    ) -> BoxFuture<'a, Result<Created, StoreError>>;

    /// Applies one conditional write ([`Append`]); [`StoreError::LeaseLost`] when `owner` no
    /// longer holds the saga, and then nothing is written.
    fn append<'a>(&'a self, append: Append) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Extends the leases `owner` still holds among `ids`; returns the ids it no longer holds.
    fn renew<'a>(
        &'a self,
        owner: &'a str,
        ids: &'a [String],
        lease_until_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>>;

    /// Takes over up to `limit` unfinished sagas whose lease ended before `now_ms`, oldest lease
    /// first, leasing them to `owner`. Two orchestrators claiming at once never get the same saga.
    fn claim<'a>(
        &'a self,
        owner: &'a str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SagaRecord>, StoreError>>;

    /// Gives up `owner`'s leases on `ids` (on a clean shutdown), so others may claim them at once.
    fn release<'a>(
        &'a self,
        owner: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SagaRecord>, StoreError>>;

    /// Newest first.
    fn list<'a>(
        &'a self,
        filter: &'a ListFilter,
    ) -> BoxFuture<'a, Result<Vec<SagaSummary>, StoreError>>;

    fn counts(&self) -> BoxFuture<'_, Result<Vec<StatusCount>, StoreError>>;

    fn stats(&self) -> StoreStats;
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
