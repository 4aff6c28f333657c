//! What the platform relies on from every Rust service: health, logs, and a clean stop.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{Service, client, data_dir, json, problem};

async fn check_contract(name: &'static str) {
    let data = data_dir();
    let mut service = Service::start(name, data.path(), &[]).await;
    let client = client();

    let (status, body) = json(client.get(service.url("/healthz")).send().await.unwrap()).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "status": "ok" })));

    let response = client
        .get(service.url("/no/such/path"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND).await;
    let response = client.delete(service.url("/healthz")).send().await.unwrap();
    assert!(response.headers().contains_key("allow"));
    problem(response, StatusCode::METHOD_NOT_ALLOWED).await;

    let status = service.terminate().await;
    assert!(status.success(), "{name} exited with {status}");

    let stdout = service.stdout();
    assert_eq!(
        stdout[0],
        format!("{name} listening on 127.0.0.1:{}", service.port())
    );
    assert!(
        !stdout
            .iter()
            .any(|line| line.starts_with("GET /healthz 200")),
        "passing health probes are not logged: {stdout:#?}"
    );
    for expected in ["GET /no/such/path 404 ", "DELETE /healthz 405 "] {
        assert!(
            stdout
                .iter()
                .any(|line| line.starts_with(expected) && line.ends_with("ms")),
            "no {expected:?} line in {stdout:#?}"
        );
    }
}

#[tokio::test]
async fn inventory_keeps_the_service_contract() {
    check_contract("inventory").await;
}

#[tokio::test]
async fn payments_keeps_the_service_contract() {
    check_contract("payments").await;
}

#[tokio::test]
async fn shipping_keeps_the_service_contract() {
    check_contract("shipping").await;
}

#[tokio::test]
async fn orders_keeps_the_service_contract() {
    check_contract("orders").await;
}

#[tokio::test]
async fn creates_a_missing_data_directory() {
    let data = data_dir();
    let nested = data.path().join("not/yet/there");
    let _inventory = Service::start("inventory", &nested, &[]).await;
    assert!(nested.join("inventory.db").exists());
}
