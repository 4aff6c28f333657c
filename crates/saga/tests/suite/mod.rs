//! The contract every [`SagaStore`] keeps, and the orchestrator's semantics on top of it, as
//! tests any store's test crate runs with `mod suite;`: [`run_all`] with a factory of empty stores.
//!
//! The orchestrator tests call real HTTP services on 127.0.0.1 (one axum server playing the
//! services `a`, `b` and `c`, honouring `Idempotency-Key` like the shop's services do), through
//! [`DirectCaller`].

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use flotilla_saga::direct::DirectCaller;
use flotilla_saga::engine::{Config, Orchestrator, SagaEvents};
use flotilla_saga::{
    Append, BoxFuture, Created, Entry, EntryKind, ListFilter, NewSaga, Phase, SagaRecord,
    SagaStore, Status, StoreError, now_ms,
};
use serde_json::{Value, json};

pub type Factory = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn SagaStore>>>> + Send + Sync>;

/// Every property, each on a fresh store.
pub async fn run_all(fresh: Factory) {
    create_get_and_start_keys(fresh().await).await;
    appends_need_the_lease(fresh().await).await;
    claims_take_expired_leases_only_and_never_twice(fresh().await).await;
    renew_reports_lost_leases_and_release_frees(fresh().await).await;
    list_filters_and_pages_newest_first(fresh().await).await;
    happy_path_runs_every_step_once_with_keys(fresh().await).await;
    failure_at_each_step_compensates_exactly_the_done_ones_in_reverse(&fresh).await;
    a_compensation_failing_twice_is_retried_until_it_succeeds(fresh().await).await;
    a_refused_compensation_fails_the_saga_loudly(fresh().await).await;
    a_timeout_compensates(fresh().await).await;
    a_lost_response_is_retried_with_the_same_key(fresh().await).await;
    a_restart_resumes_unfinished_sagas(fresh().await).await;
    two_orchestrators_never_run_a_saga_twice(fresh().await).await;
    concurrent_sagas_share_commits(fresh().await).await;
}

// ---------------------------------------------------------------------------------------------
// The store contract.

fn new_saga(name: &str, key: Option<&str>) -> NewSaga {
    let created_ms = now_ms();
    NewSaga {
        id: format!("sg_{created_ms:x}{:016x}", fastrand_u64()),
        name: name.to_owned(),
        input: json!({"order": 1}),
        key: key.map(str::to_owned),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        created_ms,
        deadline_ms: None,
    }
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms() as u64);
    h.finish()
}

fn started(seq: u32, step: u32) -> Entry {
    Entry {
        seq,
        at_ms: now_ms(),
        step,
        phase: Phase::Action,
        attempt: 1,
        kind: EntryKind::Started,
        http_status: None,
        detail: None,
    }
}

fn succeeded(seq: u32, step: u32, response: Value) -> Entry {
    Entry {
        kind: EntryKind::Succeeded,
        http_status: Some(201),
        detail: Some(response),
        ..started(seq, step)
    }
}

pub async fn create_get_and_start_keys(store: Arc<dyn SagaStore>) {
    let saga = new_saga("order", Some("k1"));
    let first = [started(0, 0)];
    let created = store
        .create(&saga, &first, "me", now_ms() + 10_000)
        .await
        .expect("create");
    assert_eq!(created, Created::New);
    let record = store.get(&saga.id).await.expect("get").expect("stored");
    assert_eq!(record.summary.status, Status::Running);
    assert_eq!(record.summary.name, "order");
    assert_eq!(record.input, json!({"order": 1}));
    assert_eq!(record.key.as_deref(), Some("k1"));
    assert_eq!(record.traceparent, saga.traceparent);
    assert_eq!(record.log, first);

    // The same key starts nothing new; another saga name may use it.
    let again = new_saga("order", Some("k1"));
    assert_eq!(
        store
            .create(&again, &first, "me", now_ms() + 10_000)
            .await
            .expect("again"),
        Created::Existing(saga.id.clone())
    );
    assert!(store.get(&again.id).await.expect("get").is_none());
    let other = new_saga("refund", Some("k1"));
    assert_eq!(
        store
            .create(&other, &first, "me", now_ms() + 10_000)
            .await
            .expect("other"),
        Created::New
    );
    assert!(store.get("sg_nope").await.expect("get").is_none());
}

pub async fn appends_need_the_lease(store: Arc<dyn SagaStore>) {
    let saga = new_saga("order", None);
    store
        .create(&saga, &[started(0, 0)], "me", now_ms() + 10_000)
        .await
        .expect("create");
    let response = json!({"id": "r1", "nested": {"ok": true}});
    store
        .append(Append {
            id: saga.id.clone(),
            owner: "me".into(),
            lease_until_ms: now_ms() + 10_000,
            entries: vec![succeeded(1, 0, response.clone()), started(2, 1)],
            status: None,
        })
        .await
        .expect("append");
    let thief = store
        .append(Append {
            id: saga.id.clone(),
            owner: "someone-else".into(),
            lease_until_ms: now_ms() + 10_000,
            entries: vec![succeeded(3, 1, json!({}))],
            status: Some((Status::Completed, None)),
        })
        .await;
    assert!(matches!(thief, Err(StoreError::LeaseLost(_))), "{thief:?}");
    let error = flotilla_saga::SagaError {
        step: "pay".into(),
        status: Some(402),
        message: "declined".into(),
    };
    store
        .append(Append {
            id: saga.id.clone(),
            owner: "me".into(),
            lease_until_ms: now_ms() + 10_000,
            entries: vec![],
            status: Some((Status::Compensating, Some(error.clone()))),
        })
        .await
        .expect("status only");
    let record = store.get(&saga.id).await.expect("get").expect("stored");
    assert_eq!(record.summary.status, Status::Compensating);
    assert_eq!(record.summary.error, Some(error));
    assert_eq!(record.log.len(), 3, "the thief wrote nothing");
    assert_eq!(record.log[1].detail, Some(response));
    assert_eq!(record.log[2].kind, EntryKind::Started);
    let unknown = store
        .append(Append {
            id: "sg_missing".into(),
            owner: "me".into(),
            lease_until_ms: 0,
            entries: vec![],
            status: None,
        })
        .await;
    assert!(matches!(unknown, Err(StoreError::LeaseLost(_))));
}

pub async fn claims_take_expired_leases_only_and_never_twice(store: Arc<dyn SagaStore>) {
    let mut expired = BTreeSet::new();
    for i in 0..60 {
        let saga = new_saga("order", Some(&format!("c{i}")));
        // Half of them abandoned long ago, half still held.
        let lease = if i % 2 == 0 { 1 } else { now_ms() + 60_000 };
        store
            .create(&saga, &[started(0, 0)], "dead", lease)
            .await
            .expect("create");
        if i % 2 == 0 {
            expired.insert(saga.id);
        }
    }
    let finished = new_saga("order", Some("done"));
    store
        .create(&finished, &[], "dead", 1)
        .await
        .expect("create");
    store
        .append(Append {
            id: finished.id.clone(),
            owner: "dead".into(),
            lease_until_ms: 1,
            entries: vec![],
            status: Some((Status::Completed, None)),
        })
        .await
        .expect("complete");

    // Two claimers at once, in small batches: together they get each expired saga exactly once.
    let claimer = |owner: &'static str| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = store
                    .claim(owner, now_ms(), now_ms() + 60_000, 4)
                    .await
                    .expect("claim");
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.into_iter().map(|r| r.summary.id));
            }
        })
    };
    let (a, b) = (claimer("a"), claimer("b"));
    let (a, b) = (a.await.expect("a"), b.await.expect("b"));
    let all: BTreeSet<String> = a.iter().chain(&b).cloned().collect();
    assert_eq!(a.len() + b.len(), all.len(), "a saga was claimed twice");
    assert_eq!(all, expired);
    // Claimed records come with their log, ready to resume.
    let record = store
        .get(a.first().or(b.first()).expect("some"))
        .await
        .expect("get")
        .expect("some");
    assert_eq!(record.log.len(), 1);
}

pub async fn renew_reports_lost_leases_and_release_frees(store: Arc<dyn SagaStore>) {
    let mine = new_saga("order", None);
    let stolen = new_saga("order", None);
    for saga in [&mine, &stolen] {
        store.create(saga, &[], "me", 1).await.expect("create");
    }
    // `stolen`'s lease ran out and another took it.
    let taken = store
        .claim("other", now_ms(), now_ms() + 60_000, 10)
        .await
        .expect("claim");
    assert_eq!(taken.len(), 2);
    store
        .release("other", std::slice::from_ref(&mine.id))
        .await
        .expect("release");
    let back = store
        .claim("me", now_ms(), now_ms() + 60_000, 10)
        .await
        .expect("claim");
    assert_eq!(back.len(), 1, "a released saga is claimable at once");
    assert_eq!(back[0].summary.id, mine.id);
    let lost = store
        .renew(
            "me",
            &[mine.id.clone(), stolen.id.clone()],
            now_ms() + 60_000,
        )
        .await
        .expect("renew");
    assert_eq!(lost, vec![stolen.id.clone()]);
}

pub async fn list_filters_and_pages_newest_first(store: Arc<dyn SagaStore>) {
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut saga = new_saga(if i % 2 == 0 { "order" } else { "refund" }, None);
        saga.created_ms = 1_000 + i;
        store
            .create(&saga, &[], "me", now_ms() + 60_000)
            .await
            .expect("create");
        ids.push(saga.id);
    }
    store
        .append(Append {
            id: ids[4].clone(),
            owner: "me".into(),
            lease_until_ms: now_ms() + 60_000,
            entries: vec![],
            status: Some((Status::Compensated, None)),
        })
        .await
        .expect("compensated");
    let all = store
        .list(&ListFilter {
            limit: 10,
            ..ListFilter::default()
        })
        .await
        .expect("list");
    let listed: Vec<_> = all.iter().map(|s| s.id.clone()).collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    let orders = store
        .list(&ListFilter {
            name: Some("order".into()),
            limit: 10,
            ..ListFilter::default()
        })
        .await
        .expect("by name");
    assert_eq!(orders.len(), 3);
    let compensated = store
        .list(&ListFilter {
            status: Some(Status::Compensated),
            limit: 10,
            ..ListFilter::default()
        })
        .await
        .expect("by status");
    assert_eq!(compensated.len(), 1);
    assert_eq!(compensated[0].id, ids[4]);
    let page = store
        .list(&ListFilter {
            before_ms: Some(1_003),
            limit: 2,
            ..ListFilter::default()
        })
        .await
        .expect("page");
    assert_eq!(
        page.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        vec![ids[2].clone(), ids[1].clone()]
    );
    let counts = store.counts().await.expect("counts");
    let running_orders = counts
        .iter()
        .find(|c| c.name == "order" && c.status == Status::Running)
        .map(|c| c.count);
    assert_eq!(running_orders, Some(2));
}

// ---------------------------------------------------------------------------------------------
// The orchestrator on top of the store, against real HTTP services.

/// One HTTP server playing services `a`, `b` and `c` (by path: `/a/...`), honouring
/// `Idempotency-Key`: the first answer per key is replayed to every repeat.
#[derive(Clone, Default)]
pub struct Services {
    state: Arc<Mutex<ServiceState>>,
}

#[derive(Default)]
struct ServiceState {
    /// Every request: (method, path, key).
    calls: Vec<(String, String, String)>,
    /// Keys whose request took effect, in order.
    effects: Vec<String>,
    answers: HashMap<String, (u16, Value)>,
    /// Planned answers per "METHOD /path-prefix", used up in order before the default.
    script: HashMap<String, VecDeque<Plan>>,
    next_id: u64,
}

/// What the next matching request gets.
#[derive(Clone, Debug)]
pub enum Plan {
    /// Answer this status; 2xx and 4xx take effect (and are remembered for the key).
    Status(u16),
    /// Take effect, then hold the answer this long (the caller times out: a lost response).
    CommitThenHang(Duration),
    /// Hold the request this long, then answer normally.
    Delay(Duration),
}

impl Services {
    pub fn plan(&self, route: &str, plans: impl IntoIterator<Item = Plan>) {
        self.state
            .lock()
            .unwrap()
            .script
            .entry(route.to_owned())
            .or_default()
            .extend(plans);
    }

    pub fn calls(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn effects(&self) -> Vec<String> {
        self.state.lock().unwrap().effects.clone()
    }

    pub async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().fallback(handle).with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }
}

async fn handle(
    State(services): State<Services>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    _body: Bytes,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|k| k.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let path = uri.path().to_owned();
    let plan = {
        let mut state = services.state.lock().unwrap();
        state
            .calls
            .push((method.to_string(), path.clone(), key.clone()));
        if let Some((status, body)) = state.answers.get(&key) {
            return answer(*status, body.clone());
        }
        let route = format!("{method} {path}");
        state
            .script
            .iter_mut()
            .filter(|(prefix, plans)| route.starts_with(prefix.as_str()) && !plans.is_empty())
            .max_by_key(|(prefix, _)| prefix.len())
            .and_then(|(_, plans)| plans.pop_front())
    };
    let status = match plan {
        Some(Plan::Status(status)) => status,
        Some(Plan::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            201
        }
        Some(Plan::CommitThenHang(hang)) => {
            commit(&services, &key, &path, 201);
            tokio::time::sleep(hang).await;
            return answer(201, json!({}));
        }
        None => 201,
    };
    if status >= 500 || matches!(status, 408 | 429) {
        return answer(status, json!({"detail": format!("planned {status}")}));
    }
    let (status, body) = commit(&services, &key, &path, status);
    answer(status, body)
}

/// Takes effect once per key and remembers the answer.
fn commit(services: &Services, key: &str, path: &str, status: u16) -> (u16, Value) {
    let mut state = services.state.lock().unwrap();
    if let Some(existing) = state.answers.get(key) {
        return existing.clone();
    }
    state.next_id += 1;
    let body = if status < 300 {
        json!({"id": format!("r{}", state.next_id), "path": path})
    } else {
        json!({"title": "refused", "detail": format!("planned {status} for {path}")})
    };
    state.effects.push(key.to_owned());
    state.answers.insert(key.to_owned(), (status, body.clone()));
    (status, body)
}

fn answer(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).expect("status");
    (status, axum::Json(body)).into_response()
}

/// Sagas `three` (steps a, b, c, each compensated), `timed` (a, then b; 1 s timeout) and
/// `refusing` (a, then b whose compensation path is planned to be refused).
pub fn definitions() -> Vec<flotilla_manifest::Saga> {
    let source = r#"
app = "suite"
[services.a]
run = "true"
[services.b]
run = "true"
[services.c]
run = "true"

[sagas.three]
[[sagas.three.steps]]
name = "first"
action = { call = "POST a /a/things", body = { order = "{{input.order}}", saga = "{{saga.id}}" } }
compensate = { call = "DELETE a /a/things/{{steps.first.response.id}}" }
retry = { attempts = 3, backoff = "10ms" }
[[sagas.three.steps]]
name = "second"
action = { call = "POST b /b/things", body = { after = "{{steps.first.response.id}}" } }
compensate = { call = "POST b /b/things/{{steps.second.response.id}}/undo" }
retry = { attempts = 3, backoff = "10ms" }
[[sagas.three.steps]]
name = "third"
action = { call = "POST c /c/things" }
compensate = { call = "DELETE c /c/things/{{steps.third.response.id}}" }
retry = { attempts = 3, backoff = "10ms" }

[sagas.timed]
timeout = "1s"
[[sagas.timed.steps]]
name = "first"
action = { call = "POST a /a/things" }
compensate = { call = "DELETE a /a/things/{{steps.first.response.id}}" }
retry = { attempts = 2, backoff = "10ms" }
[[sagas.timed.steps]]
name = "slow"
action = { call = "POST b /b/slow" }
retry = { attempts = 100, backoff = "100ms", max_backoff = "100ms" }
"#;
    flotilla_manifest::parse(source, Path::new("suite.toml"))
        .expect("the suite's manifest is valid")
        .sagas
        .sagas
}

/// A recorder of announced outcomes.
#[derive(Default)]
pub struct Announced(pub Mutex<Vec<(String, String, Value)>>);

impl SagaEvents for Announced {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        id: &'a str,
        _subject: &'a str,
        data: Value,
        _traceparent: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>> {
        self.0
            .lock()
            .unwrap()
            .push((topic.to_owned(), id.to_owned(), data));
        Box::pin(async { Ok(()) })
    }
}

pub struct Harness {
    pub services: Services,
    pub orchestrator: Orchestrator,
    pub announced: Arc<Announced>,
    pub caller: Arc<DirectCaller>,
}

pub async fn harness(store: Arc<dyn SagaStore>, owner: &str) -> Harness {
    let services = Services::default();
    let addr = services.start().await;
    harness_with(store, owner, services, addr, fast_config(owner))
}

pub fn fast_config(owner: &str) -> Config {
    Config {
        lease: Duration::from_secs(5),
        claim_every: Duration::from_millis(100),
        call_timeout: Duration::from_secs(2),
        ..Config::new(owner)
    }
}

pub fn harness_with(
    store: Arc<dyn SagaStore>,
    owner: &str,
    services: Services,
    addr: SocketAddr,
    config: Config,
) -> Harness {
    let _ = owner;
    let caller = Arc::new(DirectCaller::new(
        ["a", "b", "c"].map(|name| (name.to_owned(), addr)),
    ));
    let announced = Arc::new(Announced::default());
    let orchestrator = Orchestrator::start(
        store,
        &definitions(),
        caller.clone(),
        Some(announced.clone()),
        config,
    );
    orchestrator.resume();
    Harness {
        services,
        orchestrator,
        announced,
        caller,
    }
}

pub async fn finished(h: &Harness, id: &str) -> SagaRecord {
    let record = h
        .orchestrator
        .wait(id, Duration::from_secs(20))
        .await
        .expect("wait")
        .expect("saga exists");
    assert!(
        record.summary.status.is_final(),
        "saga {id} still {:?}: {:?}",
        record.summary.status,
        record.log
    );
    record
}

/// The (method, path) of each call, with the idempotency key's phase.
fn calls_of(h: &Harness, id: &str) -> Vec<String> {
    h.services
        .calls()
        .into_iter()
        .filter(|(_, _, key)| key.starts_with(id))
        .map(|(method, path, key)| format!("{method} {path} {}", key.trim_start_matches(id)))
        .collect()
}

pub async fn happy_path_runs_every_step_once_with_keys(store: Arc<dyn SagaStore>) {
    let h = harness(store, "happy").await;
    let started = h
        .orchestrator
        .start_saga("three", json!({"order": 7}), Some("order-7".into()), None)
        .await
        .expect("start");
    assert!(started.created);
    let record = finished(&h, &started.id).await;
    assert_eq!(record.summary.status, Status::Completed);
    assert_eq!(
        calls_of(&h, &started.id),
        vec![
            "POST /a/things /first/action",
            "POST /b/things /second/action",
            "POST /c/things /third/action",
        ]
    );
    // A repeated start with the same key is the same saga, not a second one.
    let again = h
        .orchestrator
        .start_saga("three", json!({"order": 7}), Some("order-7".into()), None)
        .await
        .expect("start again");
    assert_eq!(again.id, started.id);
    assert!(!again.created);
    let announced = h.announced.0.lock().unwrap().clone();
    assert_eq!(announced.len(), 1);
    assert_eq!(announced[0].0, "saga.completed");
    assert_eq!(announced[0].2["input"], json!({"order": 7}));
    // The happy path writes one transition per step (plus the final one); the log holds a
    // started and a succeeded per step.
    let kinds: Vec<_> = record.log.iter().map(|e| (e.step, e.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (0, EntryKind::Started),
            (0, EntryKind::Succeeded),
            (1, EntryKind::Started),
            (1, EntryKind::Succeeded),
            (2, EntryKind::Started),
            (2, EntryKind::Succeeded),
        ]
    );
    h.orchestrator.shutdown().await;
}

pub async fn failure_at_each_step_compensates_exactly_the_done_ones_in_reverse(fresh: &Factory) {
    let expectations: [(&str, &[&str]); 3] = [
        ("POST /a/things", &["POST /a/things /first/action"]),
        (
            "POST /b/things",
            &[
                "POST /a/things /first/action",
                "POST /b/things /second/action",
                "DELETE /a/things/r1 /first/compensate",
            ],
        ),
        (
            "POST /c/things",
            &[
                "POST /a/things /first/action",
                "POST /b/things /second/action",
                "POST /c/things /third/action",
                "POST /b/things/r2/undo /second/compensate",
                "DELETE /a/things/r1 /first/compensate",
            ],
        ),
    ];
    for (failing, expected) in expectations {
        let h = harness(fresh().await, "fail").await;
        h.services.plan(failing, [Plan::Status(409)]);
        let started = h
            .orchestrator
            .start_saga("three", json!({"order": 1}), None, None)
            .await
            .expect("start");
        let record = finished(&h, &started.id).await;
        assert_eq!(record.summary.status, Status::Compensated, "{failing}");
        let error = record.summary.error.expect("error");
        assert_eq!(error.status, Some(409));
        assert!(error.message.contains("planned 409"), "{}", error.message);
        assert_eq!(calls_of(&h, &started.id), expected, "failing {failing}");
        let announced = h.announced.0.lock().unwrap().clone();
        assert_eq!(announced[0].0, "saga.compensated");
        h.orchestrator.shutdown().await;
    }
}

pub async fn a_compensation_failing_twice_is_retried_until_it_succeeds(store: Arc<dyn SagaStore>) {
    let h = harness(store, "retry").await;
    h.services.plan("POST /b/things", [Plan::Status(402)]);
    h.services
        .plan("DELETE /a/things", [Plan::Status(503), Plan::Status(500)]);
    let started = h
        .orchestrator
        .start_saga("three", json!({"order": 1}), None, None)
        .await
        .expect("start");
    let record = finished(&h, &started.id).await;
    assert_eq!(record.summary.status, Status::Compensated);
    let compensations: Vec<_> = calls_of(&h, &started.id)
        .into_iter()
        .filter(|c| c.ends_with("compensate"))
        .collect();
    assert_eq!(compensations.len(), 3, "{compensations:?}");
    let definition = h.orchestrator.definition("three").expect("three").clone();
    let timeline = flotilla_saga::engine::timeline(&definition, &record);
    let first = timeline[0].compensate.as_ref().expect("compensated");
    assert_eq!(first.status, "succeeded");
    assert_eq!(first.attempts, 3);
    assert_eq!(timeline[1].action.status, "failed");
    assert_eq!(timeline[1].action.http_status, Some(402));
    assert_eq!(timeline[2].action.status, "pending");
    h.orchestrator.shutdown().await;
}

pub async fn a_refused_compensation_fails_the_saga_loudly(store: Arc<dyn SagaStore>) {
    let h = harness(store, "refused").await;
    h.services.plan("POST /c/things", [Plan::Status(422)]);
    h.services.plan("POST /b/things/", [Plan::Status(404)]);
    let started = h
        .orchestrator
        .start_saga("three", json!({"order": 1}), None, None)
        .await
        .expect("start");
    let record = finished(&h, &started.id).await;
    assert_eq!(record.summary.status, Status::Failed);
    let error = record.summary.error.expect("error");
    assert_eq!(error.step, "second");
    assert_eq!(error.status, Some(404));
    // The other compensations still ran: only the refused one stays undone.
    assert!(
        calls_of(&h, &started.id).contains(&"DELETE /a/things/r1 /first/compensate".to_owned())
    );
    let announced = h.announced.0.lock().unwrap().clone();
    assert_eq!(announced[0].0, "saga.failed");
    h.orchestrator.shutdown().await;
}

pub async fn a_timeout_compensates(store: Arc<dyn SagaStore>) {
    let h = harness(store, "timeout").await;
    // `slow` keeps failing; the saga's 1 s timeout ends the retries and undoes `first`.
    h.services
        .plan("POST /b/slow", std::iter::repeat_n(Plan::Status(503), 1000));
    let started = h
        .orchestrator
        .start_saga("timed", json!({}), None, None)
        .await
        .expect("start");
    let began = std::time::Instant::now();
    let record = h
        .orchestrator
        .wait(&started.id, Duration::from_secs(20))
        .await
        .expect("wait")
        .expect("exists");
    // `slow` has no compensation, so its unknown outcome needs no settling.
    assert_eq!(
        record.summary.status,
        Status::Compensated,
        "{:?}",
        record.log
    );
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    let error = record.summary.error.expect("error");
    assert!(error.message.contains("timed out"), "{}", error.message);
    assert!(
        calls_of(&h, &started.id).contains(&"DELETE /a/things/r1 /first/compensate".to_owned())
    );
    h.orchestrator.shutdown().await;
}

pub async fn a_lost_response_is_retried_with_the_same_key(store: Arc<dyn SagaStore>) {
    let services = Services::default();
    let addr = services.start().await;
    let config = Config {
        call_timeout: Duration::from_millis(300),
        ..fast_config("lost")
    };
    let h = harness_with(store, "lost", services, addr, config);
    // `second` takes effect, but its answer never arrives in time.
    h.services.plan(
        "POST /b/things",
        [Plan::CommitThenHang(Duration::from_secs(2))],
    );
    let started = h
        .orchestrator
        .start_saga("three", json!({"order": 1}), None, None)
        .await
        .expect("start");
    let record = finished(&h, &started.id).await;
    assert_eq!(record.summary.status, Status::Completed);
    let second: Vec<_> = calls_of(&h, &started.id)
        .into_iter()
        .filter(|c| c.contains("/second/"))
        .collect();
    assert_eq!(second.len(), 2, "retried once: {second:?}");
    let effects: Vec<_> = h
        .services
        .effects()
        .into_iter()
        .filter(|k| k.ends_with("/second/action"))
        .collect();
    assert_eq!(effects.len(), 1, "the retry did not take effect twice");
    h.orchestrator.shutdown().await;
}

pub async fn a_restart_resumes_unfinished_sagas(store: Arc<dyn SagaStore>) {
    let services = Services::default();
    let addr = services.start().await;
    // Every `second` is held long: the orchestrator stops with all sagas at that step.
    services.plan(
        "POST /b/things",
        std::iter::repeat_n(Plan::Delay(Duration::from_secs(30)), 20),
    );
    let first = harness_with(
        Arc::clone(&store),
        "first",
        services.clone(),
        addr,
        fast_config("first"),
    );
    let mut ids = Vec::new();
    for i in 0..20 {
        let started = first
            .orchestrator
            .start_saga("three", json!({"order": i}), None, None)
            .await
            .expect("start");
        ids.push(started.id);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.orchestrator.shutdown().await;
    for id in &ids {
        let record = store.get(id).await.expect("get").expect("exists");
        assert_eq!(record.summary.status, Status::Running);
        assert_eq!(
            record.log.last().map(|e| (e.step, e.kind)),
            Some((1, EntryKind::Started))
        );
    }
    // The plans are used up by the abandoned calls: the second orchestrator's calls succeed.
    services.state.lock().unwrap().script.clear();
    let second = harness_with(
        Arc::clone(&store),
        "second",
        services.clone(),
        addr,
        fast_config("second"),
    );
    for id in &ids {
        let record = finished(&second, id).await;
        assert_eq!(record.summary.status, Status::Completed, "{id}");
        let firsts = services
            .calls()
            .iter()
            .filter(|(_, _, key)| key == &format!("{id}/first/action"))
            .count();
        assert_eq!(
            firsts, 1,
            "a step whose outcome was recorded is not repeated"
        );
    }
    second.orchestrator.shutdown().await;
}

pub async fn two_orchestrators_never_run_a_saga_twice(store: Arc<dyn SagaStore>) {
    // Sagas stored by an orchestrator that died at once: both survivors race to claim them.
    let definitions = definitions();
    let three = definitions
        .iter()
        .find(|s| s.name == "three")
        .expect("three");
    assert_eq!(three.steps.len(), 3);
    let mut ids = Vec::new();
    for i in 0..100 {
        let saga = NewSaga {
            input: json!({"order": i}),
            ..new_saga("three", None)
        };
        store
            .create(&saga, &[started(0, 0)], "dead", 1)
            .await
            .expect("create");
        ids.push(saga.id);
    }
    let services = Services::default();
    let addr = services.start().await;
    let a = harness_with(
        Arc::clone(&store),
        "a",
        services.clone(),
        addr,
        fast_config("a"),
    );
    let b = harness_with(
        Arc::clone(&store),
        "b",
        services.clone(),
        addr,
        fast_config("b"),
    );
    for id in &ids {
        let record = finished(&a, id).await;
        assert_eq!(record.summary.status, Status::Completed);
    }
    let calls = services.calls();
    for id in &ids {
        for step in ["first", "second", "third"] {
            let key = format!("{id}/{step}/action");
            let count = calls.iter().filter(|(_, _, k)| *k == key).count();
            assert_eq!(count, 1, "{key} was called {count} times");
        }
    }
    a.orchestrator.shutdown().await;
    b.orchestrator.shutdown().await;
}

/// 300 sagas started at once all complete, in four writes each, and share the store's commits.
/// Returns their ids.
pub async fn concurrent_sagas_share_commits(store: Arc<dyn SagaStore>) -> Vec<String> {
    let h = harness(Arc::clone(&store), "one").await;
    let began = std::time::Instant::now();
    let starts = (0..300).map(|i| {
        let orchestrator = &h.orchestrator;
        async move {
            orchestrator
                .start_saga("three", json!({"order": i}), None, None)
                .await
                .expect("start")
                .id
        }
    });
    let ids = futures_util::future::join_all(starts).await;
    for id in &ids {
        assert_eq!(finished(&h, id).await.summary.status, Status::Completed);
    }
    let stats = store.stats();
    eprintln!(
        "300 concurrent sagas in {:?}: {} writes in {} commits",
        began.elapsed(),
        stats.writes,
        stats.commits
    );
    // Four writes per 3-step saga: created (with the first call's start), two steps' outcome
    // with the next start, the last outcome with the final status. Lease renewals and claims
    // add a few of their own.
    assert!(
        (300 * 4..300 * 4 + 100).contains(&stats.writes),
        "{} writes",
        stats.writes
    );
    assert!(
        stats.commits * 2 < stats.writes,
        "concurrent sagas share commits"
    );
    h.orchestrator.shutdown().await;
    ids
}
