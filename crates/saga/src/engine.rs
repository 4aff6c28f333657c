//! The orchestrator: runs each saga step by step, writing ahead every transition.
//!
//! A saga is driven by one task of the orchestrator that holds its lease. The task's state is
//! nothing but the saga's log replayed, so a task started after a crash (here or in another
//! orchestrator) continues exactly where the log ends:
//!
//! - a call is preceded by a `started` entry, durable before the request leaves;
//! - its outcome is written with the next `started` (one commit per step on the happy path), or
//!   at once when it ends the saga or starts a retry;
//! - a `started` without an outcome is a call whose outcome is unknown; it is made again with
//!   the same `Idempotency-Key`, and the service answers what it answered the first time.
//!
//! Forward, an action is tried up to its `retry.attempts`. A refusal (4xx other than 408, 425,
//! 429), exhausted retries or the saga's timeout turn the saga to `compensating`: the completed
//! steps are undone newest first, each compensation retried until it succeeds. A step whose
//! outcome stayed unknown may have happened, so it is settled first by repeating its action
//! (same key) until the service gives a definite answer, and compensated if it did happen. A
//! compensation the service refuses cannot succeed by retrying: the saga ends `failed`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use flotilla_manifest::{Saga, SagaCall, SagaStep};
use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::template::{self, Context};
use crate::{
    Append, BoxFuture, Created, Entry, EntryKind, ListFilter, NewSaga, Phase, SagaError,
    SagaRecord, SagaStore, SagaSummary, Status, StoreError, now_ms,
};

/// One call a step makes.
#[derive(Debug)]
pub struct StepRequest<'a> {
    pub service: &'a str,
    pub method: Method,
    pub path: &'a str,
    /// JSON, when the call has a body.
    pub body: Option<Bytes>,
    /// `<saga id>/<step>/<action|compensate>`.
    pub idempotency_key: &'a str,
    /// The trace of what started the saga.
    pub traceparent: Option<&'a str>,
    /// The caller gives up after this long (the outcome is then unknown).
    pub timeout: Duration,
}

/// What a call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResponse {
    Answered {
        status: u16,
        body: Bytes,
    },
    /// No answer: the connection failed or the timeout passed. The call may have happened.
    NoAnswer(String),
}

/// How the orchestrator reaches services. The binary's implementation sends through the proxy
/// stack, so the callee's policy, breakers and spans apply as for any other caller.
pub trait StepCaller: Send + Sync + 'static {
    fn call<'a>(&'a self, request: StepRequest<'a>) -> BoxFuture<'a, StepResponse>;
}

/// Where `saga.completed`, `saga.compensated` and `saga.failed` go.
pub trait SagaEvents: Send + Sync + 'static {
    /// `id` is stable per saga and outcome, so a repeat after a crash can be recognised.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        id: &'a str,
        subject: &'a str,
        data: Value,
        traceparent: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// How an orchestrator behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// This orchestrator's name in the store's leases; unique among those sharing a store.
    pub owner: String,
    /// How long a saga stays with this orchestrator without a word from it.
    pub lease: Duration,
    /// How often unfinished sagas whose lease ended are looked for.
    pub claim_every: Duration,
    /// Longest wait for one call's answer.
    pub call_timeout: Duration,
    /// Take over every unfinished saga at start, leases or not: right when this orchestrator is
    /// the store's only user (the embedded store), wrong when others share it.
    pub takeover_on_start: bool,
}

impl Config {
    pub fn new(owner: impl Into<String>) -> Self {
        Self {
            owner: owner.into(),
            lease: Duration::from_secs(30),
            claim_every: Duration::from_secs(2),
            call_timeout: Duration::from_secs(30),
            takeover_on_start: false,
        }
    }
}

/// A saga that could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no saga named `{0}` is declared")]
    Unknown(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A started saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Started {
    pub id: String,
    /// False when the start's idempotency key had already started it.
    pub created: bool,
}

/// Runs the declared sagas.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn SagaStore>,
    definitions: HashMap<String, Arc<Saga>>,
    caller: Arc<dyn StepCaller>,
    events: Option<Arc<dyn SagaEvents>>,
    config: Config,
    /// The sagas this orchestrator drives now.
    driving: Mutex<HashMap<String, Driving>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    metrics: Metrics,
    resuming: std::sync::atomic::AtomicBool,
}

struct Driving {
    cancel: CancellationToken,
    status: watch::Sender<Progress>,
}

/// What waiters see of a saga driven here: its status and, once final, the whole record, so a
/// waiter needs no read from the store.
#[derive(Clone)]
struct Progress {
    status: Status,
    finished: Option<Arc<SagaRecord>>,
}

#[derive(Default)]
struct Metrics {
    started: Mutex<HashMap<String, u64>>,
    finished: Mutex<HashMap<(String, Status), u64>>,
    /// (saga, step, phase, outcome).
    calls: Mutex<HashMap<(String, String, Phase, EntryKind), u64>>,
}

fn bump<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, u64>>, key: K) {
    *map.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(key)
        .or_default() += 1;
}

impl Orchestrator {
    /// Starts the background work: resuming unfinished sagas, renewing leases, claiming sagas
    /// other orchestrators abandoned.
    pub fn start(
        store: Arc<dyn SagaStore>,
        sagas: &[Saga],
        caller: Arc<dyn StepCaller>,
        events: Option<Arc<dyn SagaEvents>>,
        config: Config,
    ) -> Self {
        let definitions = sagas
            .iter()
            .map(|saga| (saga.name.clone(), Arc::new(saga.clone())))
            .collect();
        let inner = Arc::new(Inner {
            store,
            definitions,
            caller,
            events,
            config,
            driving: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            metrics: Metrics::default(),
            resuming: std::sync::atomic::AtomicBool::new(false),
        });
        inner.tasks.spawn(renewals(Arc::clone(&inner)));
        Self { inner }
    }

    /// Starts resuming unfinished sagas (all of them at once when `takeover_on_start`, then
    /// whichever another orchestrator abandons). Separate from [`Orchestrator::start`] so that a
    /// fleet resumes its sagas once the services they call are up, not before.
    pub fn resume(&self) {
        if !self
            .inner
            .resuming
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            self.inner.tasks.spawn(claims(Arc::clone(&self.inner)));
        }
    }

    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.inner.store
    }

    pub fn definition(&self, name: &str) -> Option<&Saga> {
        self.inner.definitions.get(name).map(|d| &**d)
    }

    /// The declared sagas, by name.
    pub fn definitions(&self) -> Vec<&Saga> {
        let mut all: Vec<&Saga> = self.inner.definitions.values().map(|d| &**d).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Starts saga `name` with `input`. With a `key`, a second start with the same key returns
    /// the first saga instead of starting another.
    pub async fn start_saga(
        &self,
        name: &str,
        input: Value,
        key: Option<String>,
        traceparent: Option<String>,
    ) -> Result<Started, StartError> {
        let definition = self
            .inner
            .definitions
            .get(name)
            .cloned()
            .ok_or_else(|| StartError::Unknown(name.to_owned()))?;
        let created_ms = now_ms();
        let saga = NewSaga {
            id: new_saga_id(created_ms),
            name: name.to_owned(),
            input,
            key,
            traceparent,
            created_ms,
            deadline_ms: definition.timeout.map(|t| created_ms + duration_ms(t)),
        };
        // The first call's `started` goes with the saga itself: one commit less per saga.
        let first = [Entry {
            seq: 0,
            at_ms: created_ms,
            step: 0,
            phase: Phase::Action,
            attempt: 1,
            kind: EntryKind::Started,
            http_status: None,
            detail: None,
        }];
        let inner = &self.inner;
        match inner
            .store
            .create(&saga, &first, &inner.config.owner, inner.lease_until())
            .await?
        {
            Created::Existing(id) => Ok(Started { id, created: false }),
            Created::New => {
                bump(&inner.metrics.started, saga.name.clone());
                let record = SagaRecord {
                    summary: SagaSummary {
                        id: saga.id.clone(),
                        name: saga.name,
                        status: Status::Running,
                        created_ms,
                        updated_ms: created_ms,
                        error: None,
                    },
                    input: saga.input,
                    key: saga.key,
                    traceparent: saga.traceparent,
                    deadline_ms: saga.deadline_ms,
                    log: first.to_vec(),
                };
                Inner::drive(inner, record, true);
                Ok(Started {
                    id: saga.id,
                    created: true,
                })
            }
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<SagaRecord>, StoreError> {
        self.inner.store.get(id).await
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaSummary>, StoreError> {
        self.inner.store.list(filter).await
    }

    /// The saga once it is final, or as it is when `timeout` has passed.
    pub async fn wait(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<SagaRecord>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let local = self
            .inner
            .driving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .map(|d| d.status.subscribe());
        if let Some(mut progress) = local {
            let waited =
                tokio::time::timeout_at(deadline, progress.wait_for(|p| p.status.is_final())).await;
            if let Ok(Ok(progress)) = waited
                && let Some(record) = &progress.finished
            {
                return Ok(Some(SagaRecord::clone(record)));
            }
        }
        // Driven elsewhere, already done, or no longer driven here: ask the store until it is
        // final.
        loop {
            let record = self.inner.store.get(id).await?;
            let done = record.as_ref().is_none_or(|r| r.summary.status.is_final());
            if done || tokio::time::Instant::now() >= deadline {
                return Ok(record);
            }
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + POLL_EVERY)).await;
        }
    }

    /// How many sagas this orchestrator is driving now.
    pub fn driving(&self) -> usize {
        self.inner
            .driving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Stops every saga task between two transitions (a call in flight is abandoned: its outcome
    /// is unknown and it will be made again), gives up their leases, and waits for the tasks.
    pub async fn shutdown(&self) {
        // Taken before the tasks stop, since each task forgets its saga as it ends.
        let ids: Vec<String> = self
            .inner
            .driving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        if !ids.is_empty()
            && let Err(err) = self
                .inner
                .store
                .release(&self.inner.config.owner, &ids)
                .await
        {
            tracing::warn!("sagas: could not release {} leases: {err}", ids.len());
        }
    }

    /// Counters for the metrics endpoint, every declared saga included (at zero).
    pub fn metrics(&self) -> SagaMetrics {
        let metrics = &self.inner.metrics;
        let mut names: Vec<String> = self.inner.definitions.keys().cloned().collect();
        names.sort();
        let started = {
            let started = metrics
                .started
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            names
                .iter()
                .map(|name| (name.clone(), started.get(name).copied().unwrap_or(0)))
                .collect()
        };
        let finished = {
            let finished = metrics
                .finished
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            names
                .iter()
                .flat_map(|name| {
                    [Status::Completed, Status::Compensated, Status::Failed].map(|status| {
                        let count = finished.get(&(name.clone(), status)).copied().unwrap_or(0);
                        (name.clone(), status, count)
                    })
                })
                .collect()
        };
        let mut in_progress = vec![(Status::Running, 0), (Status::Compensating, 0)];
        for driving in self
            .inner
            .driving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            let status = driving.status.borrow().status;
            if let Some(slot) = in_progress.iter_mut().find(|(s, _)| *s == status) {
                slot.1 += 1;
            }
        }
        let mut calls: Vec<_> = metrics
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|((saga, step, phase, outcome), count)| {
                (saga.clone(), step.clone(), *phase, *outcome, *count)
            })
            .collect();
        calls.sort_by(|a, b| {
            (&a.0, &a.1, a.2.as_str(), a.3.as_str()).cmp(&(&b.0, &b.1, b.2.as_str(), b.3.as_str()))
        });
        SagaMetrics {
            started,
            finished,
            in_progress,
            calls,
        }
    }
}

/// What [`Orchestrator::metrics`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaMetrics {
    /// Sagas started here, per saga.
    pub started: Vec<(String, u64)>,
    /// Sagas finished here, per saga and final status.
    pub finished: Vec<(String, Status, u64)>,
    /// Sagas driven here now, per status.
    pub in_progress: Vec<(Status, u64)>,
    /// Calls made by steps: saga, step, phase, outcome.
    pub calls: Vec<(String, String, Phase, EntryKind, u64)>,
}

const POLL_EVERY: Duration = Duration::from_millis(100);

/// Most sagas taken over per claim.
const CLAIM_BATCH: u32 = 256;

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn new_saga_id(now_ms: i64) -> String {
    // Time first, so ids sort by creation; 64 random bits keep concurrent starts apart.
    format!("sg_{now_ms:011x}{:016x}", fastrand::u64(..))
}

impl Inner {
    fn lease_until(&self) -> i64 {
        now_ms() + duration_ms(self.config.lease)
    }

    /// Starts the task that drives `record` to its end.
    fn drive(self: &Arc<Self>, record: SagaRecord, fresh: bool) {
        let Some(definition) = self.definitions.get(&record.summary.name).cloned() else {
            tracing::error!(
                "saga {} is a `{}`, which the manifest no longer declares; it stays {} until the manifest declares it again",
                record.summary.id,
                record.summary.name,
                record.summary.status
            );
            return;
        };
        let cancel = self.shutdown.child_token();
        let (status, _) = watch::channel(Progress {
            status: record.summary.status,
            finished: None,
        });
        {
            let mut driving = self.driving.lock().unwrap_or_else(PoisonError::into_inner);
            if driving.contains_key(&record.summary.id) {
                return;
            }
            driving.insert(
                record.summary.id.clone(),
                Driving {
                    cancel: cancel.clone(),
                    status: status.clone(),
                },
            );
        }
        let run = Run::replay(Arc::clone(self), definition, record, fresh, cancel, status);
        self.tasks.spawn(run.drive());
    }

    fn forget(&self, id: &str) {
        self.driving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

/// Keeps the leases of the sagas driven here alive.
async fn renewals(inner: Arc<Inner>) {
    let renew_every = (inner.config.lease / 3).max(Duration::from_millis(10));
    let mut renew = tokio::time::interval(renew_every);
    loop {
        tokio::select! {
            () = inner.shutdown.cancelled() => return,
            _ = renew.tick() => renew_leases(&inner).await,
        }
    }
}

/// Resumes what is unfinished, then keeps taking over sagas whose lease ran out.
async fn claims(inner: Arc<Inner>) {
    if inner.config.takeover_on_start {
        // The store is ours alone: whatever is unfinished was ours before a crash.
        claim(&inner, i64::MAX).await;
    }
    let mut claims = tokio::time::interval(inner.config.claim_every);
    loop {
        tokio::select! {
            () = inner.shutdown.cancelled() => return,
            _ = claims.tick() => claim(&inner, now_ms()).await,
        }
    }
}

async fn renew_leases(inner: &Arc<Inner>) {
    let ids: Vec<String> = inner
        .driving
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .keys()
        .cloned()
        .collect();
    if ids.is_empty() {
        return;
    }
    match inner
        .store
        .renew(&inner.config.owner, &ids, inner.lease_until())
        .await
    {
        Ok(lost) => {
            let driving = inner.driving.lock().unwrap_or_else(PoisonError::into_inner);
            for id in lost {
                if let Some(d) = driving.get(&id) {
                    tracing::warn!("saga {id}: another orchestrator took it over");
                    d.cancel.cancel();
                }
            }
        }
        Err(err) => tracing::warn!("sagas: could not renew leases: {err}"),
    }
}

async fn claim(inner: &Arc<Inner>, older_than_ms: i64) {
    loop {
        let claimed = match inner
            .store
            .claim(
                &inner.config.owner,
                older_than_ms,
                inner.lease_until(),
                CLAIM_BATCH,
            )
            .await
        {
            Ok(claimed) => claimed,
            Err(err) => {
                tracing::warn!("sagas: could not look for unfinished sagas: {err}");
                return;
            }
        };
        let full = claimed.len() == CLAIM_BATCH as usize;
        if !claimed.is_empty() {
            // Worth a line whatever the log level: a crash or a lost orchestrator left these.
            tracing::warn!("resuming {} unfinished sagas", claimed.len());
        }
        for record in claimed {
            tracing::info!(
                "saga {} ({}): resuming, {}",
                record.summary.id,
                record.summary.name,
                record.summary.status
            );
            inner.drive(record, false);
        }
        if !full {
            return;
        }
    }
}

/// Where one call of a step stands, replayed from the log.
#[derive(Debug, Clone, Default)]
struct CallState {
    attempts: u32,
    outcome: Outcome,
}

#[derive(Debug, Clone, Default)]
enum Outcome {
    #[default]
    NotStarted,
    /// Started, no outcome recorded: it may or may not have happened.
    Unknown,
    Succeeded(Value),
    /// May be retried; may have happened (a timeout, a 5xx).
    Failed(SagaError),
    /// Did not happen and will not.
    Refused(SagaError),
}

#[derive(Debug, Clone, Default)]
struct StepState {
    action: CallState,
    compensate: CallState,
}

/// Why a saga task stopped before the saga ended.
enum Halt {
    /// Shutting down, or the lease went to another orchestrator.
    Stopped,
}

/// One saga being driven.
struct Run {
    inner: Arc<Inner>,
    definition: Arc<Saga>,
    id: String,
    input: Value,
    traceparent: Option<String>,
    deadline_ms: Option<i64>,
    status: Status,
    error: Option<SagaError>,
    steps: Vec<StepState>,
    next_seq: u32,
    /// Outcomes not yet written: they go with the next write, which comes before the next call.
    unwritten: Vec<Entry>,
    /// The last `started` in the log was written by `start_saga` and its call not made yet.
    fresh: bool,
    cancel: CancellationToken,
    watch: watch::Sender<Progress>,
    /// The record as stored: what waiters get once the saga is final.
    history: SagaRecord,
}

impl Run {
    fn replay(
        inner: Arc<Inner>,
        definition: Arc<Saga>,
        record: SagaRecord,
        fresh: bool,
        cancel: CancellationToken,
        watch: watch::Sender<Progress>,
    ) -> Self {
        let mut steps = vec![StepState::default(); definition.steps.len()];
        let mut next_seq = 0;
        for entry in &record.log {
            next_seq = next_seq.max(entry.seq + 1);
            let Some(state) = steps.get_mut(entry.step as usize) else {
                continue;
            };
            let call = match entry.phase {
                Phase::Action => &mut state.action,
                Phase::Compensate => &mut state.compensate,
            };
            let step_name = &definition.steps[entry.step as usize].name;
            call.attempts = call.attempts.max(entry.attempt);
            call.outcome = match entry.kind {
                EntryKind::Started => Outcome::Unknown,
                EntryKind::Succeeded => {
                    Outcome::Succeeded(entry.detail.clone().unwrap_or(Value::Null))
                }
                EntryKind::Failed => Outcome::Failed(entry_error(step_name, entry)),
                EntryKind::Refused => Outcome::Refused(entry_error(step_name, entry)),
            };
        }
        Self {
            inner,
            definition,
            id: record.summary.id.clone(),
            input: record.input.clone(),
            traceparent: record.traceparent.clone(),
            deadline_ms: record.deadline_ms,
            status: record.summary.status,
            error: record.summary.error.clone(),
            history: record,
            steps,
            next_seq,
            unwritten: Vec::new(),
            fresh,
            cancel,
            watch,
        }
    }

    async fn drive(mut self) {
        let outcome = self.run().await;
        self.inner.forget(&self.id);
        if let Err(Halt::Stopped) = outcome {
            tracing::debug!("saga {}: stopped at {}", self.id, self.status);
        }
    }

    async fn run(&mut self) -> Result<(), Halt> {
        if self.status == Status::Running {
            let steps = self.definition.steps.len();
            let mut failure = None;
            for index in 0..steps {
                if let Err(error) = self.forward(index).await? {
                    failure = Some(error);
                    break;
                }
            }
            match failure {
                None => return self.finish(Status::Completed, None).await,
                Some(error) => {
                    tracing::warn!(
                        "saga {} ({}): {} failed ({}); compensating",
                        self.id,
                        self.definition.name,
                        error.step,
                        error.message
                    );
                    self.write(Some((Status::Compensating, Some(error))))
                        .await?;
                }
            }
        }
        if self.status == Status::Compensating {
            self.compensate().await?;
        }
        Ok(())
    }

    /// Runs step `index`'s action to success (`Ok(Ok)`) or permanent failure (`Ok(Err)`).
    async fn forward(&mut self, index: usize) -> Result<Result<(), SagaError>, Halt> {
        let definition = Arc::clone(&self.definition);
        let step = &definition.steps[index];
        let retry = step.retry;
        loop {
            let state = &self.steps[index].action;
            match &state.outcome {
                Outcome::Succeeded(_) => return Ok(Ok(())),
                Outcome::Refused(error) => return Ok(Err(error.clone())),
                Outcome::NotStarted | Outcome::Unknown | Outcome::Failed(_) => {}
            }
            let attempts = state.attempts;
            let resuming_unknown = matches!(state.outcome, Outcome::Unknown) && !self.fresh;
            if self.timed_out() {
                return Ok(Err(self.timeout_error(index)));
            }
            // An unknown outcome found in the log is retried even past the attempts: it may
            // have been the success.
            if attempts >= retry.attempts && !resuming_unknown && !self.fresh {
                let error = match &state.outcome {
                    Outcome::Failed(error) => error.clone(),
                    _ => SagaError {
                        step: step.name.clone(),
                        status: None,
                        message: "no answer".into(),
                    },
                };
                return Ok(Err(SagaError {
                    message: format!("{} (after {attempts} attempts)", error.message),
                    ..error
                }));
            }
            if attempts > 0 && !self.fresh && matches!(state.outcome, Outcome::Failed(_)) {
                let delay = backoff(retry.backoff, retry.max_backoff, attempts);
                self.sleep(delay, true).await?;
                if self.timed_out() {
                    return Ok(Err(self.timeout_error(index)));
                }
            }
            let attempt = if self.fresh || resuming_unknown {
                attempts.max(1)
            } else {
                attempts + 1
            };
            self.call(index, Phase::Action, attempt).await?;
        }
    }

    /// Undoes what was done, newest first.
    async fn compensate(&mut self) -> Result<(), Halt> {
        let mut refused: Option<SagaError> = None;
        let definition = Arc::clone(&self.definition);
        for index in (0..definition.steps.len()).rev() {
            let step = &definition.steps[index];
            if step.compensate.is_none() {
                continue;
            }
            // A step whose outcome is unknown may have happened: ask again (same key) until the
            // service says whether it did.
            loop {
                let action = &self.steps[index].action;
                match action.outcome {
                    Outcome::Unknown | Outcome::Failed(_) => {}
                    _ => break,
                }
                let attempt = action.attempts + 1;
                if matches!(action.outcome, Outcome::Failed(_)) {
                    let retry = step.retry;
                    self.sleep(backoff(retry.backoff, retry.max_backoff, attempt), false)
                        .await?;
                }
                self.call(index, Phase::Action, attempt).await?;
            }
            if !matches!(self.steps[index].action.outcome, Outcome::Succeeded(_)) {
                continue;
            }
            loop {
                let state = &self.steps[index].compensate;
                match &state.outcome {
                    Outcome::Succeeded(_) => break,
                    Outcome::Refused(error) => {
                        refused.get_or_insert_with(|| error.clone());
                        break;
                    }
                    Outcome::NotStarted | Outcome::Unknown | Outcome::Failed(_) => {}
                }
                let attempts = state.attempts;
                if matches!(state.outcome, Outcome::Failed(_)) {
                    let retry = step.retry;
                    self.sleep(backoff(retry.backoff, retry.max_backoff, attempts), false)
                        .await?;
                }
                let attempt = if matches!(state.outcome, Outcome::Unknown) {
                    attempts
                } else {
                    attempts + 1
                };
                self.call(index, Phase::Compensate, attempt).await?;
            }
        }
        match refused {
            Some(error) => {
                tracing::error!(
                    "saga {} ({}) FAILED: the compensation of {} was refused ({}); what that step did stays done and needs a person",
                    self.id,
                    self.definition.name,
                    error.step,
                    error.message
                );
                self.finish(Status::Failed, Some(error)).await
            }
            None => {
                let error = self.error.clone();
                self.finish(Status::Compensated, error).await
            }
        }
    }

    /// Makes one call (writing its `started` first) and records its outcome in memory; the
    /// outcome is written with the next write.
    async fn call(&mut self, index: usize, phase: Phase, attempt: u32) -> Result<(), Halt> {
        let definition = Arc::clone(&self.definition);
        let step: &SagaStep = &definition.steps[index];
        let step_name = &step.name;
        // `start_saga` wrote the first call's `started` with the saga itself.
        let prewritten = std::mem::take(&mut self.fresh);
        let Some(spec) = (match phase {
            Phase::Action => Some(&step.action),
            Phase::Compensate => step.compensate.as_ref(),
        })
        .cloned() else {
            return Ok(());
        };
        let request = match self.render(&spec) {
            Ok(request) => request,
            Err(message) => {
                // A template that cannot be filled will not be filled by retrying.
                let error = SagaError {
                    step: step_name.clone(),
                    status: None,
                    message,
                };
                self.record(index, phase, attempt, EntryKind::Refused, None, {
                    Some(Value::String(error.message.clone()))
                });
                self.write(None).await?;
                return Ok(());
            }
        };
        if !prewritten {
            self.record(index, phase, attempt, EntryKind::Started, None, None);
            self.write(None).await?;
        }
        let key = format!("{}/{}/{}", self.id, step_name, phase.as_str());
        let timeout = match (phase, self.deadline_ms) {
            // Forward calls stop at the saga's deadline; compensations never do.
            (Phase::Action, Some(deadline)) if self.status == Status::Running => {
                let left = u64::try_from(deadline - now_ms()).unwrap_or(0);
                self.inner
                    .config
                    .call_timeout
                    .min(Duration::from_millis(left.max(1)))
            }
            _ => self.inner.config.call_timeout,
        };
        let call = self.inner.caller.call(StepRequest {
            service: &spec.service,
            method: request.0,
            path: &request.1,
            body: request.2,
            idempotency_key: &key,
            traceparent: self.traceparent.as_deref(),
            timeout,
        });
        let response = tokio::select! {
            // Abandoned mid-call: the `started` without an outcome makes the next owner repeat it.
            () = self.cancel.cancelled() => return Err(Halt::Stopped),
            response = call => response,
        };
        let (kind, http_status, detail) = classify(response);
        bump(
            &self.inner.metrics.calls,
            (definition.name.clone(), step_name.clone(), phase, kind),
        );
        self.record(index, phase, attempt, kind, http_status, Some(detail));
        if kind != EntryKind::Succeeded {
            // Failures are written at once: the timeline shows them while the retries wait.
            self.write(None).await?;
        }
        Ok(())
    }

    fn render(&self, spec: &SagaCall) -> Result<(Method, String, Option<Bytes>), String> {
        let responses: HashMap<String, Value> = self
            .definition
            .steps
            .iter()
            .zip(&self.steps)
            .filter_map(|(step, state)| match &state.action.outcome {
                Outcome::Succeeded(response) => Some((step.name.clone(), response.clone())),
                _ => None,
            })
            .collect();
        let context = Context {
            saga_id: &self.id,
            input: &self.input,
            responses: &responses,
        };
        let method = Method::from_bytes(spec.method.as_bytes())
            .map_err(|_| format!("invalid method {}", spec.method))?;
        let path = template::render_path(&spec.path, &context)?;
        let body = match &spec.body {
            Some(body) => Some(Bytes::from(
                serde_json::to_vec(&template::render_body(body, &context)?)
                    .map_err(|err| err.to_string())?,
            )),
            None => None,
        };
        Ok((method, path, body))
    }

    fn record(
        &mut self,
        index: usize,
        phase: Phase,
        attempt: u32,
        kind: EntryKind,
        http_status: Option<u16>,
        detail: Option<Value>,
    ) {
        let step_name = self.definition.steps[index].name.clone();
        let entry = self.entry(index, phase, attempt, kind, http_status, detail);
        let state = &mut self.steps[index];
        let call = match phase {
            Phase::Action => &mut state.action,
            Phase::Compensate => &mut state.compensate,
        };
        call.attempts = call.attempts.max(attempt);
        call.outcome = match kind {
            EntryKind::Started => Outcome::Unknown,
            EntryKind::Succeeded => Outcome::Succeeded(entry.detail.unwrap_or(Value::Null)),
            EntryKind::Failed => Outcome::Failed(entry_error(&step_name, &entry)),
            EntryKind::Refused => Outcome::Refused(entry_error(&step_name, &entry)),
        };
    }

    /// Queues a log entry for the next write.
    fn entry(
        &mut self,
        index: usize,
        phase: Phase,
        attempt: u32,
        kind: EntryKind,
        http_status: Option<u16>,
        detail: Option<Value>,
    ) -> Entry {
        let entry = Entry {
            seq: self.next_seq,
            at_ms: now_ms(),
            step: u32::try_from(index).unwrap_or(u32::MAX),
            phase,
            attempt,
            kind,
            http_status,
            detail,
        };
        self.next_seq += 1;
        self.unwritten.push(entry.clone());
        entry
    }

    /// Writes the queued entries (and a new status), conditional on the lease.
    async fn write(&mut self, status: Option<(Status, Option<SagaError>)>) -> Result<(), Halt> {
        let append = Append {
            id: self.id.clone(),
            owner: self.inner.config.owner.clone(),
            lease_until_ms: self.inner.lease_until(),
            entries: std::mem::take(&mut self.unwritten),
            status: status.clone(),
        };
        let written_at = append.entries.iter().map(|e| e.at_ms).max();
        let mut delay = Duration::from_millis(50);
        loop {
            match self.inner.store.append(append.clone()).await {
                Ok(()) => break,
                Err(StoreError::LeaseLost(_)) => {
                    tracing::warn!(
                        "saga {}: another orchestrator holds it now; leaving it",
                        self.id
                    );
                    return Err(Halt::Stopped);
                }
                Err(err) => {
                    // Nothing happens until the transition is durable: wait for the store.
                    tracing::warn!(
                        "saga {}: cannot write to the store ({err}); retrying",
                        self.id
                    );
                    tokio::select! {
                        () = self.cancel.cancelled() => return Err(Halt::Stopped),
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.history.log.extend(append.entries);
        if let Some(at) = written_at {
            self.history.summary.updated_ms = at;
        }
        if let Some((status, error)) = status {
            self.status = status;
            self.error = error.clone();
            self.history.summary.status = status;
            self.history.summary.error = error;
            if status.is_final() {
                self.history.summary.updated_ms = now_ms();
            }
            let finished = status.is_final().then(|| Arc::new(self.history.clone()));
            self.watch.send_replace(Progress { status, finished });
        }
        Ok(())
    }

    async fn finish(&mut self, status: Status, error: Option<SagaError>) -> Result<(), Halt> {
        // Announced before the final write: a crash in between announces it again (same event
        // id) rather than never.
        self.announce(status, error.as_ref()).await;
        self.write(Some((status, error))).await?;
        bump(
            &self.inner.metrics.finished,
            (self.definition.name.clone(), status),
        );
        tracing::info!("saga {} ({}): {status}", self.id, self.definition.name);
        Ok(())
    }

    async fn announce(&self, status: Status, error: Option<&SagaError>) {
        let Some(events) = &self.inner.events else {
            return;
        };
        let topic = format!("saga.{status}");
        let event_id = format!("{}/{status}", self.id);
        let data = json!({
            "id": self.id,
            "name": self.definition.name,
            "status": status,
            "input": self.input,
            "error": error,
        });
        for attempt in 1..=3u32 {
            match events
                .publish(
                    &topic,
                    &event_id,
                    &self.id,
                    data.clone(),
                    self.traceparent.as_deref(),
                )
                .await
            {
                Ok(()) => return,
                Err(err) if attempt == 3 => {
                    tracing::warn!("saga {}: could not publish {topic}: {err}", self.id);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100 << attempt)).await,
            }
        }
    }

    fn timed_out(&self) -> bool {
        self.deadline_ms
            .is_some_and(|deadline| now_ms() >= deadline)
    }

    fn timeout_error(&self, index: usize) -> SagaError {
        SagaError {
            step: self.definition.steps[index].name.clone(),
            status: None,
            message: format!(
                "the saga timed out after {}",
                self.definition
                    .timeout
                    .map(|t| format!("{t:?}"))
                    .unwrap_or_default()
            ),
        }
    }

    /// Waits before a retry; forward waits end at the deadline.
    async fn sleep(&self, delay: Duration, forward: bool) -> Result<(), Halt> {
        let delay = match (forward, self.deadline_ms) {
            (true, Some(deadline)) => delay.min(Duration::from_millis(
                u64::try_from(deadline - now_ms()).unwrap_or(0),
            )),
            _ => delay,
        };
        tokio::select! {
            () = self.cancel.cancelled() => Err(Halt::Stopped),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }
}

fn entry_error(step: &str, entry: &Entry) -> SagaError {
    SagaError {
        step: step.to_owned(),
        status: entry.http_status,
        message: match &entry.detail {
            Some(Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
            None => "no answer".into(),
        },
    }
}

/// How much of an error body goes into the log.
const REASON_BYTES: usize = 300;

fn classify(response: StepResponse) -> (EntryKind, Option<u16>, Value) {
    match response {
        StepResponse::NoAnswer(reason) => (EntryKind::Failed, None, Value::String(reason)),
        StepResponse::Answered { status, body } => {
            if (200..300).contains(&status) {
                let value = if body.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&body).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&body).into_owned())
                    })
                };
                return (EntryKind::Succeeded, Some(status), value);
            }
            let kind = if status >= 500 || matches!(status, 408 | 425 | 429) {
                EntryKind::Failed
            } else {
                EntryKind::Refused
            };
            (kind, Some(status), Value::String(reason(status, &body)))
        }
    }
}

/// A problem+json's `detail` (or `title`), else the start of the body, else the status.
fn reason(status: u16, body: &[u8]) -> String {
    if let Ok(Value::Object(problem)) = serde_json::from_slice::<Value>(body) {
        for field in ["detail", "title", "message", "error"] {
            if let Some(Value::String(text)) = problem.get(field) {
                return text.clone();
            }
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(REASON_BYTES)]);
    let text = text.trim();
    if text.is_empty() {
        format!("answered {status}")
    } else {
        text.to_owned()
    }
}

/// Exponential from `base`, capped, with jitter over the upper half so retries of many sagas
/// spread out without ever waiting much less than intended.
fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1 << attempt.saturating_sub(1).min(20));
    let delay = exp.min(max);
    let half = delay / 2;
    half + half.mul_f64(fastrand::f64())
}

/// One call of a step as the timeline shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallView {
    /// pending, running, retrying, succeeded, failed.
    pub status: String,
    pub attempts: u32,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub duration_ms: Option<i64>,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    /// The action's response, once it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
}

/// One step of a saga's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    pub name: String,
    pub call: String,
    pub action: CallView,
    /// `None` when the step declares no compensation.
    pub compensate: Option<CallView>,
}

/// The timeline of a saga: its steps in order, each with its action and compensation.
pub fn timeline(definition: &Saga, record: &SagaRecord) -> Vec<StepView> {
    definition
        .steps
        .iter()
        .enumerate()
        .map(|(index, step)| {
            let step_index = u32::try_from(index).unwrap_or(u32::MAX);
            let view = |phase: Phase| {
                call_view(
                    record
                        .log
                        .iter()
                        .filter(|e| e.step == step_index && e.phase == phase),
                    phase == Phase::Action,
                    record.summary.status,
                )
            };
            StepView {
                name: step.name.clone(),
                call: step.action.text.clone(),
                action: view(Phase::Action),
                compensate: step.compensate.as_ref().map(|_| view(Phase::Compensate)),
            }
        })
        .collect()
}

fn call_view<'e>(
    entries: impl Iterator<Item = &'e Entry>,
    keep_response: bool,
    saga: Status,
) -> CallView {
    let mut status = "pending";
    let mut view = CallView {
        status: String::new(),
        attempts: 0,
        started_ms: None,
        finished_ms: None,
        duration_ms: None,
        http_status: None,
        error: None,
        response: None,
    };
    for entry in entries {
        view.attempts = view.attempts.max(entry.attempt);
        match entry.kind {
            EntryKind::Started => {
                view.started_ms.get_or_insert(entry.at_ms);
                status = "running";
            }
            EntryKind::Succeeded => {
                status = "succeeded";
                view.http_status = entry.http_status;
                view.finished_ms = Some(entry.at_ms);
                view.error = None;
                if keep_response {
                    view.response = entry.detail.clone();
                }
            }
            EntryKind::Failed | EntryKind::Refused => {
                status = if entry.kind == EntryKind::Refused {
                    "failed"
                } else {
                    "retrying"
                };
                view.http_status = entry.http_status;
                view.finished_ms = Some(entry.at_ms);
                view.error = entry.detail.as_ref().map(|d| match d {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                });
            }
        }
    }
    // Once the saga moved on, a call left retrying gave up.
    if status == "retrying" && saga != Status::Running && saga != Status::Compensating {
        status = "failed";
    }
    view.status = status.to_owned();
    view.duration_ms = view
        .started_ms
        .zip(view.finished_ms)
        .map(|(start, end)| end - start);
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_in_the_upper_half() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for _ in 0..100 {
            let first = backoff(base, max, 1);
            assert!(first >= Duration::from_millis(50) && first <= base);
            let third = backoff(base, max, 3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = backoff(base, max, 40);
            assert!(late >= max / 2 && late <= max);
        }
    }

    #[test]
    fn answers_are_classified_by_whether_a_retry_can_help() {
        let ok = classify(StepResponse::Answered {
            status: 201,
            body: Bytes::from_static(br#"{"id":"r1"}"#),
        });
        assert_eq!(ok, (EntryKind::Succeeded, Some(201), json!({"id": "r1"})));
        let declined = classify(StepResponse::Answered {
            status: 402,
            body: Bytes::from_static(br#"{"title":"Payment Required","detail":"declined"}"#),
        });
        assert_eq!(declined, (EntryKind::Refused, Some(402), json!("declined")));
        for status in [408, 425, 429, 500, 503] {
            assert_eq!(
                classify(StepResponse::Answered {
                    status,
                    body: Bytes::new()
                })
                .0,
                EntryKind::Failed
            );
        }
        assert_eq!(
            classify(StepResponse::NoAnswer("timed out".into())).0,
            EntryKind::Failed
        );
    }
}
