//! The embedded store: the shared suite, plus what only a file on disk has to show — a reopened
//! store keeps everything, and concurrent sagas share commits.

mod suite;

use std::sync::Arc;
use std::time::Instant;

use flotilla_saga::sqlite::SqliteStore;
use flotilla_saga::{SagaStore, Status};
use serde_json::json;
use suite::{Factory, Services, fast_config, finished, harness_with};

fn factory() -> Factory {
    Arc::new(|| {
        Box::pin(async {
            // Leaked on purpose: the directory must outlive the store, which the suite owns.
            let dir = tempfile::tempdir().expect("tempdir").keep();
            Arc::new(SqliteStore::open(&dir).expect("open")) as Arc<dyn SagaStore>
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_suite() {
    suite::run_all(factory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_store_resumes_and_concurrent_sagas_share_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let services = Services::default();
    let addr = services.start().await;
    let store: Arc<dyn SagaStore> = Arc::new(SqliteStore::open(dir.path()).expect("open"));
    let h = harness_with(
        Arc::clone(&store),
        "one",
        services.clone(),
        addr,
        fast_config("one"),
    );
    let began = Instant::now();
    let mut ids = Vec::new();
    for i in 0..300 {
        let started = h
            .orchestrator
            .start_saga("three", json!({"order": i}), None, None)
            .await
            .expect("start");
        ids.push(started.id);
    }
    for id in &ids {
        assert_eq!(finished(&h, id).await.summary.status, Status::Completed);
    }
    let stats = store.stats();
    eprintln!(
        "300 sagas in {:?}: {} writes in {} commits",
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
    drop(h);
    drop(store);

    let reopened = SqliteStore::open(dir.path()).expect("reopen");
    let record = reopened.get(&ids[0]).await.expect("get").expect("kept");
    assert_eq!(record.summary.status, Status::Completed);
    assert_eq!(record.log.len(), 6);
}
