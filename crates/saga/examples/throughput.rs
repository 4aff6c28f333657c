//! Completed 3-step sagas per second against trivial services on loopback, with durable commits:
//!
//! ```sh
//! cargo run --release -p flotilla-saga --example throughput -- sqlite 20000 512
//! cargo run --release -p flotilla-saga --example throughput -- postgres://postgres@127.0.0.1/test 20000 512
//! ```
//!
//! Arguments: the store (`sqlite` for a temporary directory, or a PostgreSQL URL), how many sagas,
//! and how many run at once. Prints sagas/s, store commits per saga (each an fsync for SQLite with
//! `synchronous=FULL`; a WAL flush for PostgreSQL) and writes per commit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{delete, post};
use flotilla_saga::SagaStore;
use flotilla_saga::direct::DirectCaller;
use flotilla_saga::engine::{Config, Orchestrator};
use flotilla_saga::postgres::PostgresStore;
use flotilla_saga::sqlite::SqliteStore;
use serde_json::json;
use tokio::sync::Semaphore;

const MANIFEST: &str = r#"
app = "bench"
[services.a]
run = "true"
[services.b]
run = "true"
[services.c]
run = "true"
[sagas.three]
[[sagas.three.steps]]
name = "one"
action = { call = "POST a /a", body = { saga = "{{saga.id}}", n = "{{input.n}}" } }
compensate = { call = "DELETE a /a/{{steps.one.response.id}}" }
[[sagas.three.steps]]
name = "two"
action = { call = "POST b /b", body = { after = "{{steps.one.response.id}}" } }
compensate = { call = "DELETE b /b/{{steps.two.response.id}}" }
[[sagas.three.steps]]
name = "three"
action = { call = "POST c /c" }
"#;

async fn services() -> SocketAddr {
    let next = Arc::new(AtomicU64::new(0));
    let created = move || {
        let id = next.fetch_add(1, Ordering::Relaxed);
        async move { (StatusCode::CREATED, axum::Json(json!({ "id": id }))) }
    };
    let app = Router::new()
        .route("/a", post(created.clone()))
        .route("/b", post(created.clone()))
        .route("/c", post(created))
        .route("/a/{id}", delete(|| async { StatusCode::NO_CONTENT }))
        .route("/b/{id}", delete(|| async { StatusCode::NO_CONTENT }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let store_arg = args.next().unwrap_or_else(|| "sqlite".into());
    let sagas: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(512);

    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn SagaStore> = if store_arg == "sqlite" {
        Arc::new(SqliteStore::open(dir.path()).expect("open sqlite"))
    } else {
        let schema = format!("saga_bench_{}", std::process::id());
        Arc::new(
            PostgresStore::connect(&store_arg, Some(&schema))
                .await
                .expect("connect to PostgreSQL"),
        )
    };
    let addr = services().await;
    let definitions = flotilla_manifest::parse(MANIFEST, std::path::Path::new("bench.toml"))
        .expect("valid")
        .sagas
        .sagas;
    let caller = Arc::new(DirectCaller::new(
        ["a", "b", "c"].map(|s| (s.to_owned(), addr)),
    ));
    let orchestrator = Orchestrator::start(
        Arc::clone(&store),
        &definitions,
        caller,
        None,
        Config {
            call_timeout: Duration::from_secs(30),
            ..Config::new("bench")
        },
    );

    let slots = Arc::new(Semaphore::new(concurrency));
    let began = Instant::now();
    let before = store.stats();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..sagas {
        let permit = Arc::clone(&slots).acquire_owned().await.expect("open");
        let orchestrator = orchestrator.clone();
        tasks.spawn(async move {
            let started = orchestrator
                .start_saga("three", json!({ "n": n }), None, None)
                .await
                .expect("start");
            let record = orchestrator
                .wait(&started.id, Duration::from_secs(60))
                .await
                .expect("wait")
                .expect("exists");
            drop(permit);
            record.summary.status
        });
    }
    let mut completed = 0usize;
    while let Some(status) = tasks.join_next().await {
        if status.expect("task") == flotilla_saga::Status::Completed {
            completed += 1;
        }
    }
    let took = began.elapsed();
    let after = store.stats();
    let commits = after.commits - before.commits;
    let writes = after.writes - before.writes;
    println!(
        "store={} sagas={sagas} concurrency={concurrency} completed={completed} took={:.2}s \
         sagas_per_s={:.0} commits={commits} commits_per_saga={:.3} writes_per_saga={:.2} writes_per_commit={:.1}",
        if store_arg == "sqlite" {
            "sqlite"
        } else {
            "postgres"
        },
        took.as_secs_f64(),
        completed as f64 / took.as_secs_f64(),
        commits as f64 / sagas as f64,
        writes as f64 / sagas as f64,
        writes as f64 / commits.max(1) as f64,
    );
    orchestrator.shutdown().await;
}
