use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::common::{Service, client, data_dir, free_port, json, post_raw, problem};

/// Starts the real catalog and an orders service that reaches it directly.
async fn shop(data: &tempfile::TempDir) -> (Service, Service) {
    let catalog = Service::start("catalog", &data.path().join("catalog"), &[]).await;
    let catalog_url = format!("http://127.0.0.1:{}", catalog.port());
    let orders = Service::start(
        "orders",
        &data.path().join("orders"),
        &[("CATALOG_URL", &catalog_url)],
    )
    .await;
    (catalog, orders)
}

async fn place(client: &Client, orders: &Service, body: Value) -> reqwest::Response {
    client
        .post(orders.url("/orders"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn creates_and_reads_back_orders() {
    let data = data_dir();
    let (_catalog, orders) = shop(&data).await;
    let client = client();

    let body = json!({
        "customer": "ada",
        "items": [{ "sku": "TEA-001", "qty": 2 }, { "sku": "MUG-002", "qty": 1 }],
    });
    let response = place(&client, &orders, body).await;
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let (status, order) = json(response).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");

    let id = order["id"].as_str().expect("an id");
    let hex = id.strip_prefix("ord_").expect("an ord_ prefix");
    assert!(
        hex.len() == 16 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(location, format!("/orders/{id}"));
    assert_eq!(order["customer"], "ada");
    assert_eq!(order["status"], "pending");
    assert_eq!(
        order["items"],
        json!([
            { "sku": "TEA-001", "qty": 2, "price": 12.5 },
            { "sku": "MUG-002", "qty": 1, "price": 18.0 },
        ])
    );
    assert_eq!(order["total"].as_f64(), Some(43.0));
    let created_at = order["created_at"].as_str().expect("created_at");
    assert!(humantime::parse_rfc3339(created_at).is_ok(), "{created_at}");

    let (status, fetched) = json(client.get(orders.url(&location)).send().await.unwrap()).await;
    assert_eq!((status, &fetched), (StatusCode::OK, &order));

    let body = json!({ "customer": "grace", "items": [{ "sku": "BEANS-006", "qty": 3 }] });
    let (status, second) = json(place(&client, &orders, body).await).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(second["total"].as_f64(), Some(74.7));

    let (status, list) = json(client.get(orders.url("/orders")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list, json!([second, order]), "most recent first");

    let stdout = orders.stdout();
    assert!(
        stdout
            .iter()
            .any(|line| line.starts_with("POST /orders 201 ")),
        "{stdout:#?}"
    );
}

#[tokio::test]
async fn rejects_bad_orders() {
    let data = data_dir();
    let (_catalog, orders) = shop(&data).await;
    let client = client();

    let response = post_raw(&client, orders.url("/orders"), "{\"customer\": \"ada\",").await;
    problem(response, StatusCode::BAD_REQUEST).await;

    let response = place(&client, &orders, json!({ "customer": "ada" })).await;
    let detail = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(detail.contains("items"), "{detail}");

    let body = json!({
        "customer": "ada",
        "items": [{ "sku": "TEA-001", "qty": 1 }, { "sku": "NOPE-404", "qty": 1 }],
    });
    let detail = problem(
        place(&client, &orders, body).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(detail, "unknown sku: NOPE-404");

    for body in [
        json!({ "customer": "", "items": [{ "sku": "TEA-001", "qty": 1 }] }),
        json!({ "customer": "   ", "items": [{ "sku": "TEA-001", "qty": 1 }] }),
        json!({ "customer": 7, "items": [{ "sku": "TEA-001", "qty": 1 }] }),
        json!({ "customer": "ada", "items": [] }),
        json!({ "customer": "ada", "items": [{ "sku": "TEA-001", "qty": 0 }] }),
        json!({ "customer": "ada", "items": [{ "sku": "TEA-001", "qty": 1001 }] }),
        json!({ "customer": "ada", "items": [{ "sku": "TEA-001", "qty": 1.5 }] }),
        json!({ "customer": "ada", "items": [{ "sku": "TEA-001" }] }),
        json!({ "customer": "ada", "items": [{ "sku": "../healthz", "qty": 1 }] }),
        json!({ "customer": "ada", "items": [{ "sku": "", "qty": 1 }] }),
        json!("ada"),
    ] {
        let response = place(&client, &orders, body.clone()).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "for {body}"
        );
        problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    }

    let response = client
        .post(orders.url("/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;

    let response = client
        .get(orders.url("/orders/ord_0000000000000000"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND).await;

    let response = client.delete(orders.url("/orders")).send().await.unwrap();
    problem(response, StatusCode::METHOD_NOT_ALLOWED).await;

    // Nothing above was stored.
    let (_, list) = json(client.get(orders.url("/orders")).send().await.unwrap()).await;
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn answers_503_when_the_catalog_is_unreachable() {
    let data = data_dir();
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let orders = Service::start("orders", data.path(), &[("CATALOG_URL", &nowhere)]).await;
    let client = client();

    let body = json!({ "customer": "ada", "items": [{ "sku": "TEA-001", "qty": 1 }] });
    let detail = problem(
        place(&client, &orders, body).await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert!(detail.starts_with("catalog unavailable"), "{detail}");
}

/// How long the fake catalog takes to price `SLOW-1`.
const SLOW_ANSWER: Duration = Duration::from_millis(800);

/// What a fake catalog was asked: the request target and its headers.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, HeaderMap)>>>);

impl Seen {
    fn requests(&self) -> Vec<(String, HeaderMap)> {
        self.0.lock().unwrap().clone()
    }
}

/// A catalog whose answers tests choose by SKU; it also stands in for a sidecar proxy, since an
/// absolute-form request target routes like any other.
async fn fake_catalog() -> (SocketAddr, Seen) {
    async fn product(
        State(seen): State<Seen>,
        Path(sku): Path<String>,
        uri: Uri,
        headers: HeaderMap,
    ) -> Response {
        seen.0.lock().unwrap().push((uri.to_string(), headers));
        match sku.as_str() {
            "TEA-001" => Json(json!({ "sku": sku, "name": "Tea", "price": 0.1 })).into_response(),
            "BROKEN-500" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            "BUSY-503" => StatusCode::SERVICE_UNAVAILABLE.into_response(),
            "GARBAGE-200" => "not a product".into_response(),
            "SLOW-1" => {
                tokio::time::sleep(SLOW_ANSWER).await;
                Json(json!({ "sku": sku, "name": "Slow", "price": 2.5 })).into_response()
            }
            _ => StatusCode::NOT_FOUND.into_response(),
        }
    }

    let seen = Seen::default();
    let app = Router::new()
        .route("/products/{sku}", get(product))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

#[tokio::test]
async fn prices_in_cents_and_forwards_trace_headers() {
    let (addr, seen) = fake_catalog().await;
    let data = data_dir();
    let catalog_url = format!("http://{addr}");
    let orders = Service::start("orders", data.path(), &[("CATALOG_URL", &catalog_url)]).await;
    let client = client();

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = client
        .post(orders.url("/orders"))
        .header("x-request-id", "req-42")
        .header("traceparent", traceparent)
        .json(&json!({ "customer": "ada", "items": [{ "sku": "TEA-001", "qty": 3 }] }))
        .send()
        .await
        .unwrap();
    let (status, order) = json(response).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    // 0.1 * 3 in floating point is 0.30000000000000004; in cents it is exact.
    assert_eq!(order["total"], json!(0.3));

    let requests = seen.requests();
    assert_eq!(requests.len(), 1);
    let (target, headers) = &requests[0];
    assert_eq!(target, "/products/TEA-001");
    assert_eq!(headers["x-request-id"], "req-42");
    assert_eq!(headers["traceparent"], traceparent);
}

#[tokio::test]
async fn maps_catalog_failures_to_502_and_503() {
    let (addr, _seen) = fake_catalog().await;
    let data = data_dir();
    let catalog_url = format!("http://{addr}");
    let orders = Service::start("orders", data.path(), &[("CATALOG_URL", &catalog_url)]).await;
    let client = client();

    for (sku, status) in [
        ("BROKEN-500", StatusCode::BAD_GATEWAY),
        ("GARBAGE-200", StatusCode::BAD_GATEWAY),
        ("BUSY-503", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let body = json!({ "customer": "ada", "items": [{ "sku": sku, "qty": 1 }] });
        let detail = problem(place(&client, &orders, body).await, status).await;
        assert!(detail.starts_with("catalog unavailable"), "{detail}");
    }
}

#[tokio::test]
async fn reaches_the_catalog_through_http_proxy_by_default() {
    let (addr, seen) = fake_catalog().await;
    let data = data_dir();
    let proxy = format!("http://{addr}");
    let orders = Service::start(
        "orders",
        data.path(),
        &[
            ("HTTP_PROXY", &proxy),
            ("NO_PROXY", "localhost,127.0.0.1,::1"),
        ],
    )
    .await;
    let client = client();

    let body = json!({ "customer": "ada", "items": [{ "sku": "TEA-001", "qty": 1 }] });
    assert_eq!(
        place(&client, &orders, body).await.status(),
        StatusCode::CREATED
    );
    let requests = seen.requests();
    let (target, headers) = &requests[0];
    assert_eq!(target, "http://catalog/products/TEA-001");
    assert_eq!(headers["host"], "catalog");
}

#[tokio::test]
async fn finishes_in_flight_requests_on_sigterm() {
    let (addr, seen) = fake_catalog().await;
    let data = data_dir();
    let catalog_url = format!("http://{addr}");
    let mut orders = Service::start("orders", data.path(), &[("CATALOG_URL", &catalog_url)]).await;

    let client = client();
    let url = orders.url("/orders");
    let in_flight = tokio::spawn(async move {
        let body = json!({ "customer": "ada", "items": [{ "sku": "SLOW-1", "qty": 2 }] });
        client.post(url).json(&body).send().await
    });
    // Stop only once the order is waiting on the catalog.
    while seen.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = orders.terminate().await;
    assert!(status.success(), "orders exited with {status}");

    let response = in_flight.await.unwrap().expect("an answer before exiting");
    let (status, order) = json(response).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["total"], json!(5.0));
}
