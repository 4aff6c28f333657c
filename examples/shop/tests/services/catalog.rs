use reqwest::StatusCode;
use serde_json::json;

use crate::common::{Service, client, data_dir, json, problem};

#[tokio::test]
async fn serves_the_seeded_products() {
    let data = data_dir();
    let catalog = Service::start("catalog", data.path(), &[]).await;
    let client = client();

    let (status, products) = json(client.get(catalog.url("/products")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let skus: Vec<_> = products
        .as_array()
        .expect("a list")
        .iter()
        .map(|product| product["sku"].as_str().expect("a sku"))
        .collect();
    for sku in [
        "TEA-001",
        "MUG-002",
        "KETTLE-003",
        "GRINDER-004",
        "ESPRESSO-005",
        "BEANS-006",
    ] {
        assert!(skus.contains(&sku), "{sku} missing from {products}");
    }

    let (status, espresso) = json(
        client
            .get(catalog.url("/products/ESPRESSO-005"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(espresso["price"], json!(1499.0));
    let (_, tea) = json(
        client
            .get(catalog.url("/products/TEA-001"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(tea["price"], json!(12.5));
    assert!(data.path().join("catalog.db").exists());
}

#[tokio::test]
async fn answers_errors_as_problems() {
    let data = data_dir();
    let catalog = Service::start("catalog", data.path(), &[]).await;
    let client = client();

    let response = client
        .get(catalog.url("/products/NOPE-999"))
        .send()
        .await
        .unwrap();
    let detail = problem(response, StatusCode::NOT_FOUND).await;
    assert!(detail.contains("NOPE-999"), "{detail}");

    let response = client.get(catalog.url("/nowhere")).send().await.unwrap();
    problem(response, StatusCode::NOT_FOUND).await;

    let response = client
        .post(catalog.url("/products"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["allow"], "GET, HEAD");
    problem(response, StatusCode::METHOD_NOT_ALLOWED).await;
}

#[tokio::test]
async fn logs_one_line_per_request() {
    let data = data_dir();
    let mut catalog = Service::start("catalog", data.path(), &[]).await;
    let client = client();
    client
        .get(catalog.url("/products/TEA-001"))
        .send()
        .await
        .unwrap();
    client
        .get(catalog.url("/products/NOPE"))
        .send()
        .await
        .unwrap();
    assert!(catalog.terminate().await.success());

    let stdout = catalog.stdout();
    assert_eq!(
        stdout[0],
        format!("catalog listening on 127.0.0.1:{}", catalog.port())
    );
    for expected in ["GET /products/TEA-001 200 ", "GET /products/NOPE 404 "] {
        assert!(
            stdout
                .iter()
                .any(|line| line.starts_with(expected) && line.ends_with("ms")),
            "no {expected:?} line in {stdout:#?}"
        );
    }
}
