//! The PostgreSQL store: the shared suite, each store in a schema of its own, plus what only a
//! shared database has to show — two stores (two connections, as two processes would have)
//! under two orchestrators share the abandoned sagas without running any twice.
//!
//! Runs against the database in `FLOTILLA_TEST_POSTGRES_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); without it, each test says it is skipped.

mod suite;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flotilla_saga::postgres::PostgresStore;
use flotilla_saga::{
    Append, BoxFuture, Created, Entry, EntryKind, ListFilter, NewSaga, Phase, SagaRecord,
    SagaStore, SagaSummary, Status, StatusCount, StoreError, StoreStats, now_ms,
};
use serde_json::json;
use suite::{Factory, Services, fast_config, finished, harness_with};

const URL_VAR: &str = "FLOTILLA_TEST_POSTGRES_URL";

fn url() -> Option<String> {
    let url = std::env::var(URL_VAR).ok().filter(|u| !u.is_empty());
    if url.is_none() {
        // Straight to stderr, past the test harness's capture, so that a skip is seen.
        let _ = writeln!(std::io::stderr(), "skipped: {URL_VAR} is not set");
    }
    url
}

/// The schemas a test made, dropped when it ends.
#[derive(Clone, Default)]
struct Schemas(Arc<Mutex<Vec<String>>>);

impl Schemas {
    fn fresh(&self) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "saga_test_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        self.0.lock().unwrap().push(name.clone());
        name
    }

    /// Best effort: a schema left behind is only clutter.
    async fn drop_all(&self, url: &str) {
        let names = std::mem::take(&mut *self.0.lock().unwrap());
        let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
        else {
            eprintln!("could not connect to drop the test schemas {names:?}");
            return;
        };
        let connection = tokio::spawn(connection);
        for name in names {
            if let Err(err) = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                .await
            {
                eprintln!("could not drop schema {name}: {err:?}");
            }
        }
        drop(client);
        let _ = connection.await;
    }
}

fn factory(url: String, schemas: Schemas) -> Factory {
    Arc::new(move || {
        let url = url.clone();
        let schema = schemas.fresh();
        Box::pin(async move {
            Arc::new(
                PostgresStore::connect(&url, Some(&schema))
                    .await
                    .expect("connect"),
            ) as Arc<dyn SagaStore>
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_suite() {
    let Some(url) = url() else { return };
    let schemas = Schemas::default();
    suite::run_all(factory(url.clone(), schemas.clone())).await;
    schemas.drop_all(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_url_or_an_unreachable_server_is_a_clear_error() {
    let Some(_) = url() else { return };
    let Err(err) = PostgresStore::connect("postgres://nobody@127.0.0.1:1/none", None).await else {
        panic!("connected to port 1");
    };
    let text = err.to_string();
    assert!(text.contains("cannot connect to PostgreSQL"), "{text}");
    let Err(err) = PostgresStore::connect("this is not a url=", None).await else {
        panic!("parsed a bad url");
    };
    assert!(err.to_string().contains("PostgreSQL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_a_clear_error() {
    let Some(url) = url() else { return };
    let schemas = Schemas::default();
    let name = format!(
        "flotilla_lost_{}_{:08x}",
        std::process::id(),
        fastrand::u32(..)
    );
    let separator = if url.contains('?') { '&' } else { '?' };
    let store = PostgresStore::connect(
        &format!("{url}{separator}application_name={name}"),
        Some(&schemas.fresh()),
    )
    .await
    .expect("connect");
    assert!(store.get("sg_nope").await.expect("get").is_none());
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("admin");
    let connection = tokio::spawn(connection);
    let ended = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await
        .expect("terminate");
    assert_eq!(ended.len(), 2, "the writer's and the reader's connections");
    drop(admin);
    let _ = connection.await;
    // The server's word reaches the client a moment later.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let read = store.get("sg_nope").await.expect_err("the reader is gone");
    assert!(
        read.to_string().contains("connection (reader) was lost"),
        "{read}"
    );
    let write = store
        .append(Append {
            id: "sg_nope".into(),
            owner: "me".into(),
            lease_until_ms: 0,
            entries: vec![],
            status: None,
        })
        .await
        .expect_err("the writer is gone");
    assert!(
        write.to_string().contains("connection (writer) was lost"),
        "{write}"
    );
    drop(store);
    schemas.drop_all(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_write_leaves_the_rest_of_its_batch_intact() {
    let Some(url) = url() else { return };
    let schemas = Schemas::default();
    let store = PostgresStore::connect(&url, Some(&schemas.fresh()))
        .await
        .expect("connect");
    let lease = now_ms() + 60_000;
    let mut ids = Vec::new();
    for i in 0..50 {
        let saga = NewSaga {
            id: format!("sg_batch_{i:03}"),
            name: "three".into(),
            input: json!({"order": i}),
            key: None,
            traceparent: None,
            created_ms: now_ms(),
            deadline_ms: None,
        };
        store
            .create(&saga, &[started(0)], "me", lease)
            .await
            .expect("create");
        ids.push(saga.id);
    }
    let commits = store.stats().commits;
    // All at once, so they share commits; every fifth repeats seq 0, which the log's primary
    // key refuses.
    let appends = ids.iter().enumerate().map(|(i, id)| {
        let seq = if i % 5 == 0 { 0 } else { 1 };
        store.append(Append {
            id: id.clone(),
            owner: "me".into(),
            lease_until_ms: lease,
            entries: vec![Entry { seq, ..started(1) }],
            status: Some((Status::Compensating, None)),
        })
    });
    let results = futures_util::future::join_all(appends).await;
    assert!(
        store.stats().commits - commits < 50,
        "the appends shared commits"
    );
    for (i, (id, result)) in ids.iter().zip(results).enumerate() {
        let record = store.get(id).await.expect("get").expect("stored");
        if i % 5 == 0 {
            assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
            assert_eq!(record.summary.status, Status::Running, "rolled back whole");
            assert_eq!(record.log.len(), 1);
        } else {
            result.expect("append");
            assert_eq!(record.summary.status, Status::Compensating);
            assert_eq!(record.log.len(), 2);
        }
    }
    drop(store);
    schemas.drop_all(&url).await;
}

/// A store that counts the sagas it claimed for its orchestrator.
struct Counting {
    inner: Arc<dyn SagaStore>,
    claimed: AtomicU64,
}

impl SagaStore for Counting {
    fn create<'a>(
        &'a self,
        saga: &'a NewSaga,
        first: &'a [Entry],
        owner: &'a str,
        lease_until_ms: i64,
    ) -> BoxFuture<'a, Result<Created, StoreError>> {
        self.inner.create(saga, first, owner, lease_until_ms)
    }

    fn append<'a>(&'a self, append: Append) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.append(append)
    }

    fn renew<'a>(
        &'a self,
        owner: &'a str,
        ids: &'a [String],
        lease_until_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        self.inner.renew(owner, ids, lease_until_ms)
    }

    fn claim<'a>(
        &'a self,
        owner: &'a str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SagaRecord>, StoreError>> {
        Box::pin(async move {
            let claimed = self
                .inner
                .claim(owner, now_ms, lease_until_ms, limit)
                .await?;
            self.claimed
                .fetch_add(claimed.len() as u64, Ordering::Relaxed);
            Ok(claimed)
        })
    }

    fn release<'a>(
        &'a self,
        owner: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.release(owner, ids)
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SagaRecord>, StoreError>> {
        self.inner.get(id)
    }

    fn list<'a>(
        &'a self,
        filter: &'a ListFilter,
    ) -> BoxFuture<'a, Result<Vec<SagaSummary>, StoreError>> {
        self.inner.list(filter)
    }

    fn counts(&self) -> BoxFuture<'_, Result<Vec<StatusCount>, StoreError>> {
        self.inner.counts()
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

fn started(step: u32) -> Entry {
    Entry {
        seq: 0,
        at_ms: now_ms(),
        step,
        phase: Phase::Action,
        attempt: 1,
        kind: EntryKind::Started,
        http_status: None,
        detail: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_under_two_orchestrators_never_run_a_saga_twice() {
    let Some(url) = url() else { return };
    let schemas = Schemas::default();
    let schema = schemas.fresh();
    let a_store: Arc<dyn SagaStore> = Arc::new(
        PostgresStore::connect(&url, Some(&schema))
            .await
            .expect("connect a"),
    );
    let b_store: Arc<dyn SagaStore> = Arc::new(
        PostgresStore::connect(&url, Some(&schema))
            .await
            .expect("connect b"),
    );
    // Sagas stored by orchestrators that died: half of them long ago, half with leases that
    // run out over the next second and a half, so that the survivors race for them at once and
    // then again and again.
    let began = now_ms();
    let mut ids = Vec::new();
    for i in 0..200_i64 {
        let lease = if i % 2 == 0 { 1 } else { began + 500 + i * 5 };
        let saga = NewSaga {
            id: format!("sg_pg_{began:x}_{i:04}"),
            name: "three".into(),
            input: json!({"order": i}),
            key: None,
            traceparent: None,
            created_ms: began,
            deadline_ms: None,
        };
        let created = a_store
            .create(&saga, &[started(0)], "dead", lease)
            .await
            .expect("create");
        assert_eq!(created, Created::New);
        ids.push(saga.id);
    }
    let services = Services::default();
    let addr = services.start().await;
    let a = Arc::new(Counting {
        inner: Arc::clone(&a_store),
        claimed: AtomicU64::new(0),
    });
    let b = Arc::new(Counting {
        inner: Arc::clone(&b_store),
        claimed: AtomicU64::new(0),
    });
    // Claim periods that drift apart, so neither always comes first.
    let a_orchestrator = harness_with(
        a.clone(),
        "a",
        services.clone(),
        addr,
        suite_config("a", 100),
    );
    let b_orchestrator = harness_with(
        b.clone(),
        "b",
        services.clone(),
        addr,
        suite_config("b", 70),
    );
    for id in &ids {
        let record = finished(&a_orchestrator, id).await;
        assert_eq!(record.summary.status, Status::Completed, "{id}");
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (_, _, key) in services.calls() {
        *counts.entry(key).or_default() += 1;
    }
    for id in &ids {
        for step in ["first", "second", "third"] {
            let key = format!("{id}/{step}/action");
            let count = counts.get(&key).copied().unwrap_or(0);
            assert_eq!(count, 1, "{key} was called {count} times");
        }
    }
    let (by_a, by_b) = (
        a.claimed.load(Ordering::Relaxed),
        b.claimed.load(Ordering::Relaxed),
    );
    eprintln!("claimed by a: {by_a}, by b: {by_b}");
    assert_eq!(by_a + by_b, 200, "each saga claimed exactly once");
    assert!(
        by_a > 0 && by_b > 0,
        "both shared the work: {by_a} / {by_b}"
    );
    a_orchestrator.orchestrator.shutdown().await;
    b_orchestrator.orchestrator.shutdown().await;
    drop((a_orchestrator, b_orchestrator, a, b, a_store, b_store));
    schemas.drop_all(&url).await;
}

fn suite_config(owner: &str, claim_every_ms: u64) -> flotilla_saga::engine::Config {
    flotilla_saga::engine::Config {
        claim_every: std::time::Duration::from_millis(claim_every_ms),
        ..fast_config(owner)
    }
}
