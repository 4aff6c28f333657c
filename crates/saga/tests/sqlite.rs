//! The embedded store: the shared suite, plus what only a file on disk has to show — a reopened
//! store keeps everything, and concurrent sagas share commits.

mod suite;

use std::sync::Arc;

use flotilla_saga::sqlite::SqliteStore;
use flotilla_saga::{SagaStore, Status};
use suite::Factory;

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
async fn a_reopened_store_keeps_what_was_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn SagaStore> = Arc::new(SqliteStore::open(dir.path()).expect("open"));
    let ids = suite::concurrent_sagas_share_commits(store).await;

    let reopened = SqliteStore::open(dir.path()).expect("reopen");
    let record = reopened.get(&ids[0]).await.expect("get").expect("kept");
    assert_eq!(record.summary.status, Status::Completed);
    assert_eq!(record.log.len(), 6);
}
