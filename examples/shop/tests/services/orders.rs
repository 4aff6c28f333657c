//! orders takes an order through catalog, inventory, payments and shipping: against the real
//! services (each its own process), and against fakes for what real ones cannot be made to do
//! (an open breaker, a hang, a broken answer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::common::{Service, client, data_dir, free_port, json, post_raw, problem};

/// The services orders calls, and the variable that points orders at each.
const DEPENDENCIES: [(&str, &str); 4] = [
    ("catalog", "CATALOG_URL"),
    ("inventory", "INVENTORY_URL"),
    ("payments", "PAYMENTS_URL"),
    ("shipping", "SHIPPING_URL"),
];

/// How long orders may take to answer that a dependency is down.
const PROMPTLY: Duration = Duration::from_secs(5);

/// orders, and a real process of every dependency that a test did not replace.
struct Shop {
    orders: Service,
    real: HashMap<&'static str, Service>,
    _data: tempfile::TempDir,
}

impl Shop {
    /// Every service real.
    async fn start() -> Self {
        Self::with(&[], &[]).await
    }

    /// Every dependency replaced by the fake at `url` (it answers for all of them).
    async fn faked(url: &str, env: &[(&str, &str)]) -> Self {
        let replaced = DEPENDENCIES.map(|(name, _)| (name, url));
        Self::with(&replaced, env).await
    }

    /// Real services, except that orders reaches each dependency named in `replaced` at the URL
    /// given instead (a fake, or a port nobody listens on). `env` goes to orders.
    async fn with(replaced: &[(&str, &str)], env: &[(&str, &str)]) -> Self {
        let data = data_dir();
        let mut real = HashMap::new();
        let mut urls = Vec::new();
        for (name, var) in DEPENDENCIES {
            let url = match replaced.iter().find(|(replaced, _)| *replaced == name) {
                Some((_, url)) => (*url).to_owned(),
                None => {
                    let service = Service::start(name, &data.path().join(name), &[]).await;
                    let url = format!("http://127.0.0.1:{}", service.port());
                    real.insert(name, service);
                    url
                }
            };
            urls.push((var, url));
        }
        let mut orders_env: Vec<(&str, &str)> =
            urls.iter().map(|(var, url)| (*var, url.as_str())).collect();
        orders_env.extend_from_slice(env);
        let orders = Service::start("orders", &data.path().join("orders"), &orders_env).await;
        Self {
            orders,
            real,
            _data: data,
        }
    }

    fn real(&self, name: &str) -> &Service {
        self.real
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not real in this test"))
    }

    async fn place(&self, client: &Client, body: Value) -> reqwest::Response {
        client
            .post(self.orders.url("/orders"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Every order stored, most recent first.
    async fn orders(&self, client: &Client) -> Value {
        let response = client.get(self.orders.url("/orders")).send().await.unwrap();
        let (status, list) = json(response).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        list
    }

    /// `(available, reserved)` of `sku` at the real inventory.
    async fn stock(&self, client: &Client, sku: &str) -> (i64, i64) {
        let url = self.real("inventory").url(&format!("/stock/{sku}"));
        let (status, body) = json(client.get(url).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            body["available"].as_i64().expect("available"),
            body["reserved"].as_i64().expect("reserved"),
        )
    }

    /// POSTs `body` again to a real dependency's idempotent `path`: the answer is what was created
    /// for the order the first time (200), or a new resource (201) when there was none.
    async fn again(&self, client: &Client, name: &str, path: &str, body: Value) -> (u16, Value) {
        let response = client
            .post(self.real(name).url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, body) = json(response).await;
        (status.as_u16(), body)
    }
}

fn tea(qty: i64) -> Value {
    json!({ "customer": "ada", "items": [{ "sku": "TEA-001", "qty": qty }] })
}

#[tokio::test]
async fn confirms_orders_through_every_service() {
    let shop = Shop::start().await;
    let client = client();

    let body = json!({
        "customer": "ada",
        "items": [{ "sku": "TEA-001", "qty": 2 }, { "sku": "MUG-002", "qty": 1 }],
    });
    let response = shop.place(&client, body).await;
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let (status, order) = json(response).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");

    let id = order["id"].as_str().expect("an id").to_owned();
    let hex = id.strip_prefix("ord_").expect("an ord_ prefix");
    assert!(
        hex.len() == 16 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(location, format!("/orders/{id}"));
    assert_eq!(order["customer"], "ada");
    assert_eq!(order["status"], "confirmed");
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

    // The other services hold their part of the order: asked again for the same order, each
    // answers with what it created the first time.
    assert_eq!(shop.stock(&client, "TEA-001").await, (98, 2));
    assert_eq!(shop.stock(&client, "MUG-002").await, (99, 1));
    let items = json!([{ "sku": "TEA-001", "qty": 2 }, { "sku": "MUG-002", "qty": 1 }]);
    let (status, reservation) = shop
        .again(
            &client,
            "inventory",
            "/reservations",
            json!({ "order_id": id, "items": items }),
        )
        .await;
    assert_eq!(status, 200, "{reservation}");
    assert_eq!(reservation["status"], "reserved");
    assert_eq!(reservation["items"], items);
    let (status, payment) = shop
        .again(
            &client,
            "payments",
            "/payments",
            json!({ "order_id": id, "amount": 43.0 }),
        )
        .await;
    assert_eq!(status, 200, "{payment}");
    assert_eq!(payment["status"], "authorized");
    assert_eq!(payment["amount"].as_f64(), Some(43.0));
    let (status, shipment) = shop
        .again(&client, "shipping", "/shipments", json!({ "order_id": id }))
        .await;
    assert_eq!(status, 200, "{shipment}");
    assert_eq!(shipment["status"], "created");
    assert_eq!(
        shop.stock(&client, "TEA-001").await,
        (98, 2),
        "nothing more held"
    );

    let url = shop.orders.url(&location);
    let (status, fetched) = json(client.get(url).send().await.unwrap()).await;
    assert_eq!((status, &fetched), (StatusCode::OK, &order));

    let body = json!({ "customer": "grace", "items": [{ "sku": "BEANS-006", "qty": 3 }] });
    let (status, second) = json(shop.place(&client, body).await).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_eq!(second["total"].as_f64(), Some(74.7));
    assert_eq!(second["status"], "confirmed");

    assert_eq!(
        shop.orders(&client).await,
        json!([second, order]),
        "most recent first"
    );

    let stdout = shop.orders.stdout();
    assert!(
        stdout
            .iter()
            .any(|line| line.starts_with("POST /orders 201 ")),
        "{stdout:#?}"
    );
}

#[tokio::test]
async fn declines_above_the_payment_limit_and_releases_the_stock() {
    let shop = Shop::start().await;
    let client = client();

    // One espresso machine costs 1,499, above the payments limit of 1,000.
    let body = json!({ "customer": "ada", "items": [{ "sku": "ESPRESSO-005", "qty": 1 }] });
    let detail = problem(
        shop.place(&client, body).await,
        StatusCode::PAYMENT_REQUIRED,
    )
    .await;
    assert_eq!(detail, "payment declined: amount exceeds the limit of 1000");
    assert_eq!(shop.stock(&client, "ESPRESSO-005").await, (5, 0));
    assert_eq!(shop.orders(&client).await, json!([]));
}

#[tokio::test]
async fn answers_409_when_out_of_stock() {
    let shop = Shop::start().await;
    let client = client();

    let body = json!({
        "customer": "ada",
        "items": [{ "sku": "TEA-001", "qty": 1 }, { "sku": "ESPRESSO-005", "qty": 6 }],
    });
    let detail = problem(shop.place(&client, body).await, StatusCode::CONFLICT).await;
    assert_eq!(
        detail,
        "insufficient stock for ESPRESSO-005 (requested 6, available 5)"
    );
    assert_eq!(shop.stock(&client, "TEA-001").await, (100, 0));
    assert_eq!(shop.stock(&client, "ESPRESSO-005").await, (5, 0));
    assert_eq!(shop.orders(&client).await, json!([]));
}

#[tokio::test]
async fn rejects_bad_orders() {
    let shop = Shop::start().await;
    let client = client();
    let orders = &shop.orders;

    let response = post_raw(&client, orders.url("/orders"), "{\"customer\": \"ada\",").await;
    problem(response, StatusCode::BAD_REQUEST).await;

    let response = shop.place(&client, json!({ "customer": "ada" })).await;
    let detail = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(detail.contains("items"), "{detail}");

    let body = json!({
        "customer": "ada",
        "items": [{ "sku": "TEA-001", "qty": 1 }, { "sku": "NOPE-404", "qty": 1 }],
    });
    let detail = problem(
        shop.place(&client, body).await,
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
        let response = shop.place(&client, body.clone()).await;
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

    // Nothing above was stored or held.
    assert_eq!(shop.orders(&client).await, json!([]));
    assert_eq!(shop.stock(&client, "TEA-001").await, (100, 0));
}

#[tokio::test]
async fn answers_503_naming_a_dependency_that_is_down() {
    let client = client();
    for (down, _) in DEPENDENCIES {
        let nowhere = format!("http://127.0.0.1:{}", free_port());
        let shop = Shop::with(&[(down, &nowhere)], &[]).await;

        let started = Instant::now();
        let response = shop.place(&client, tea(2)).await;
        let detail = problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
        assert!(started.elapsed() < PROMPTLY, "took {:?}", started.elapsed());
        assert_eq!(
            detail,
            format!("{down} unavailable: {down} could not be reached")
        );

        if down != "inventory" {
            assert_eq!(shop.stock(&client, "TEA-001").await, (100, 0), "{down}");
        }
        assert_eq!(shop.orders(&client).await, json!([]), "{down}");
        let stderr = shop.orders.stderr();
        assert!(
            !stderr.iter().any(|line| line.contains("could not undo")),
            "{stderr:#?}"
        );
    }
}

#[tokio::test]
async fn passes_on_the_sidecars_problem_and_releases_the_stock() {
    let (fake_payments, _log) = fake(|method, path| match (method.as_str(), path) {
        ("POST", "/payments") => Answer::Problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "circuit breaker `payments` is open",
        ),
        _ => healthy(method, path),
    })
    .await;
    let shop = Shop::with(&[("payments", &fake_payments)], &[]).await;
    let client = client();

    let detail = problem(
        shop.place(&client, tea(2)).await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(
        detail,
        "payments unavailable: circuit breaker `payments` is open"
    );
    assert_eq!(shop.stock(&client, "TEA-001").await, (100, 0));
    assert_eq!(shop.orders(&client).await, json!([]));
}

#[tokio::test]
async fn gives_up_on_a_dependency_that_hangs() {
    let (fake_payments, log) = fake(|method, path| match (method.as_str(), path) {
        ("POST", "/payments") => Answer::Hang,
        _ => healthy(method, path),
    })
    .await;
    let shop = Shop::with(
        &[("payments", &fake_payments)],
        &[("DEPENDENCY_TIMEOUT", "300ms")],
    )
    .await;
    let client = client();

    let started = Instant::now();
    let detail = problem(
        shop.place(&client, tea(2)).await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    let took = started.elapsed();
    assert!(
        (Duration::from_millis(300)..PROMPTLY).contains(&took),
        "took {took:?}"
    );
    assert_eq!(
        detail,
        "payments unavailable: payments did not answer within 300ms"
    );
    assert_eq!(log.requests().len(), 1);
    assert_eq!(shop.stock(&client, "TEA-001").await, (100, 0));
    assert_eq!(shop.orders(&client).await, json!([]));
}

#[tokio::test]
async fn refunds_and_releases_when_shipping_fails() {
    let (fake_shipping, log) = fake(|method, path| match (method.as_str(), path) {
        ("POST", "/shipments") => Answer::Status(StatusCode::INTERNAL_SERVER_ERROR),
        _ => healthy(method, path),
    })
    .await;
    let shop = Shop::with(&[("shipping", &fake_shipping)], &[]).await;
    let client = client();

    let detail = problem(
        shop.place(&client, tea(2)).await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(
        detail,
        "shipping unavailable: shipping answered 500 Internal Server Error"
    );

    let requests = log.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    let order_id = requests[0].body["order_id"].as_str().expect("order_id");
    // The payment the order took was refunded, and the stock it held is back.
    let (status, payment) = shop
        .again(
            &client,
            "payments",
            "/payments",
            json!({ "order_id": order_id, "amount": 25.0 }),
        )
        .await;
    assert_eq!(status, 200, "{payment}");
    assert_eq!(payment["status"], "refunded");
    assert_eq!(shop.stock(&client, "TEA-001").await, (100, 0));
    assert_eq!(shop.orders(&client).await, json!([]));
}

#[tokio::test]
async fn goes_through_the_sidecar_and_forwards_trace_headers() {
    let (proxy, log) = fake(healthy).await;
    let data = data_dir();
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

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = client
        .post(orders.url("/orders"))
        .header("x-request-id", "req-42")
        .header("traceparent", traceparent)
        .json(&tea(3))
        .send()
        .await
        .unwrap();
    let (status, order) = json(response).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["status"], "confirmed");
    // 0.1 * 3 in floating point is 0.30000000000000004; in cents it is exact.
    assert_eq!(order["total"], json!(0.3));
    let id = &order["id"];

    let (published, requests) = announcements(log.requests());
    assert_eq!(
        published,
        [
            ("order.placed".to_owned(), id.clone()),
            ("order.confirmed".to_owned(), id.clone())
        ],
        "announced through the sidecar, keyed by the order"
    );
    let calls: Vec<_> = requests
        .iter()
        .map(|seen| (seen.method.as_str(), seen.target.as_str(), &seen.body))
        .collect();
    assert_eq!(
        calls,
        [
            ("GET", "http://catalog/products/TEA-001", &Value::Null),
            (
                "POST",
                "http://inventory/reservations",
                &json!({ "order_id": id, "items": [{ "sku": "TEA-001", "qty": 3 }] }),
            ),
            (
                "POST",
                "http://payments/payments",
                &json!({ "order_id": id, "amount": 0.3 }),
            ),
            (
                "POST",
                "http://shipping/shipments",
                &json!({ "order_id": id })
            ),
        ]
    );
    for seen in &requests {
        let host = seen.target.split('/').nth(2).unwrap();
        assert_eq!(seen.headers["host"], host);
        assert_eq!(seen.headers["x-request-id"], "req-42", "{}", seen.target);
        assert_eq!(seen.headers["traceparent"], traceparent, "{}", seen.target);
    }
}

#[tokio::test]
async fn undoes_done_steps_in_reverse_forwarding_trace_headers() {
    let (proxy, log) = fake(|method, path| match (method.as_str(), path) {
        ("POST", "/shipments") => Answer::Problem(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream `shipping` did not answer within 1s",
        ),
        _ => healthy(method, path),
    })
    .await;
    let data = data_dir();
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

    let response = client
        .post(orders.url("/orders"))
        .header("x-request-id", "req-7")
        .json(&tea(1))
        .send()
        .await
        .unwrap();
    let detail = problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(
        detail,
        "shipping unavailable: upstream `shipping` did not answer within 1s"
    );

    let (published, requests) = announcements(log.requests());
    let topics: Vec<&str> = published.iter().map(|(topic, _)| topic.as_str()).collect();
    assert_eq!(topics, ["order.placed", "order.cancelled"]);
    let calls: Vec<_> = requests
        .iter()
        .map(|seen| format!("{} {}", seen.method, seen.target))
        .collect();
    assert_eq!(
        calls,
        [
            "GET http://catalog/products/TEA-001",
            "POST http://inventory/reservations",
            "POST http://payments/payments",
            "POST http://shipping/shipments",
            "POST http://payments/payments/pay_fake/refund",
            "DELETE http://inventory/reservations/res_fake",
        ]
    );
    for seen in &requests {
        assert_eq!(seen.headers["x-request-id"], "req-7", "{}", seen.target);
    }
}

#[tokio::test]
async fn maps_broken_dependencies_to_502_and_unavailable_ones_to_503() {
    let (url, _log) = fake(|method, path| match (method.as_str(), path) {
        ("POST", "/payments") => Answer::Text(StatusCode::CREATED, "not a payment"),
        _ => healthy(method, path),
    })
    .await;
    let shop = Shop::faked(&url, &[]).await;
    let client = client();

    for (sku, status, expected) in [
        (
            "BROKEN-500",
            StatusCode::SERVICE_UNAVAILABLE,
            "catalog unavailable: catalog answered 500 Internal Server Error",
        ),
        (
            "BUSY-503",
            StatusCode::SERVICE_UNAVAILABLE,
            "catalog unavailable: the database is busy; retry shortly",
        ),
        (
            "GARBAGE-200",
            StatusCode::BAD_GATEWAY,
            "catalog unavailable: catalog answered with an unusable body",
        ),
        (
            "NEGATIVE-200",
            StatusCode::BAD_GATEWAY,
            "catalog unavailable: catalog answered with an invalid price",
        ),
        (
            "TEA-001",
            StatusCode::BAD_GATEWAY,
            "payments unavailable: payments answered with an unusable body",
        ),
    ] {
        let body = json!({ "customer": "ada", "items": [{ "sku": sku, "qty": 1 }] });
        let detail = problem(shop.place(&client, body).await, status).await;
        assert_eq!(detail, expected, "for {sku}");
    }
    assert_eq!(shop.orders(&client).await, json!([]));
}

#[tokio::test]
async fn finishes_in_flight_requests_on_sigterm() {
    let (url, log) = fake(healthy).await;
    let mut shop = Shop::faked(&url, &[]).await;

    let client = client();
    let url = shop.orders.url("/orders");
    let in_flight = tokio::spawn(async move {
        let body = json!({ "customer": "ada", "items": [{ "sku": "SLOW-1", "qty": 2 }] });
        client.post(url).json(&body).send().await
    });
    // Stop only once the order is waiting on the catalog.
    while log.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = shop.orders.terminate().await;
    assert!(status.success(), "orders exited with {status}");

    let response = in_flight.await.unwrap().expect("an answer before exiting");
    let (status, order) = json(response).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["total"], json!(5.0));
    assert_eq!(log.requests().len(), 4, "every step ran before exiting");
}

/// How long the fake catalog takes to price `SLOW-1`.
const SLOW_ANSWER: Duration = Duration::from_millis(800);

/// How a fake answers one request.
enum Answer {
    Json(StatusCode, Value),
    /// problem+json with this detail.
    Problem(StatusCode, &'static str),
    /// No body at all.
    Status(StatusCode),
    /// A body that is not JSON.
    Text(StatusCode, &'static str),
    /// The JSON after [`SLOW_ANSWER`].
    Slow(Value),
    /// Nothing, for far longer than any test runs.
    Hang,
}

impl Answer {
    async fn respond(self) -> Response {
        match self {
            Answer::Json(status, body) => (status, axum::Json(body)).into_response(),
            Answer::Problem(status, detail) => {
                let body = json!({
                    "type": "urn:flotilla:problem:test",
                    "title": "Test",
                    "status": status.as_u16(),
                    "detail": detail,
                });
                let content_type = [(header::CONTENT_TYPE, "application/problem+json")];
                (status, content_type, body.to_string()).into_response()
            }
            Answer::Status(status) => status.into_response(),
            Answer::Text(status, text) => (status, text).into_response(),
            Answer::Slow(body) => {
                tokio::time::sleep(SLOW_ANSWER).await;
                axum::Json(body).into_response()
            }
            Answer::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                StatusCode::NO_CONTENT.into_response()
            }
        }
    }
}

/// What every dependency answers when all is well, by method and path, plus catalog SKUs that
/// misbehave in chosen ways.
fn healthy(method: &Method, path: &str) -> Answer {
    let product = |sku: &str, price: f64| json!({ "sku": sku, "name": sku, "price": price });
    match (method.as_str(), path) {
        ("GET", "/products/TEA-001") => Answer::Json(StatusCode::OK, product("TEA-001", 0.1)),
        ("GET", "/products/SLOW-1") => Answer::Slow(product("SLOW-1", 2.5)),
        ("GET", "/products/NEGATIVE-200") => {
            Answer::Json(StatusCode::OK, product("NEGATIVE-200", -1.0))
        }
        ("GET", "/products/GARBAGE-200") => Answer::Text(StatusCode::OK, "not a product"),
        ("GET", "/products/BROKEN-500") => Answer::Status(StatusCode::INTERNAL_SERVER_ERROR),
        ("GET", "/products/BUSY-503") => Answer::Problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is busy; retry shortly",
        ),
        ("POST", "/reservations") => Answer::Json(
            StatusCode::CREATED,
            json!({ "id": "res_fake", "status": "reserved" }),
        ),
        ("POST", "/payments") => Answer::Json(
            StatusCode::CREATED,
            json!({ "id": "pay_fake", "status": "authorized" }),
        ),
        ("POST", "/shipments") => Answer::Json(
            StatusCode::CREATED,
            json!({ "id": "shp_fake", "status": "created" }),
        ),
        ("DELETE", "/reservations/res_fake")
        | ("POST", "/payments/pay_fake/refund")
        | ("DELETE", "/shipments/shp_fake") => Answer::Json(StatusCode::OK, json!({})),
        // Flotilla's own API behind the sidecar: publishing an event.
        ("POST", path) if path.starts_with("/v1/topics/") => Answer::Json(
            StatusCode::ACCEPTED,
            json!({ "id": "evt_fake", "partition": 0, "offset": 0 }),
        ),
        _ => Answer::Problem(StatusCode::NOT_FOUND, "no such thing"),
    }
}

/// Splits what a fake sidecar saw into the events published through it (topic and subject, each
/// checked to be a CloudEvent 1.0 of its topic's type) and the calls to other services.
fn announcements(requests: Vec<Seen>) -> (Vec<(String, Value)>, Vec<Seen>) {
    let (events, calls): (Vec<Seen>, Vec<Seen>) = requests
        .into_iter()
        .partition(|seen| seen.target.starts_with("http://flotilla/"));
    let published = events
        .iter()
        .map(|seen| {
            let topic = seen
                .target
                .strip_prefix("http://flotilla/v1/topics/")
                .and_then(|rest| rest.strip_suffix("/events"))
                .unwrap_or_else(|| panic!("a publish, not {}", seen.target));
            assert_eq!(seen.method, Method::POST);
            assert_eq!(seen.body["specversion"], "1.0");
            assert_eq!(seen.body["type"], topic);
            (topic.to_owned(), seen.body["subject"].clone())
        })
        .collect();
    (published, calls)
}

/// One request a fake received.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    /// The request target: a path, or an absolute URL when the fake serves as a proxy.
    target: String,
    headers: HeaderMap,
    /// The JSON body, or null.
    body: Value,
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn requests(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
}

/// A fake that stands in for any of orders' dependencies, or for its sidecar (an absolute-form
/// request target routes by its path like any other): it records each request and answers as
/// `answer` says. Returns its base URL.
async fn fake(answer: fn(&Method, &str) -> Answer) -> (String, Log) {
    let log = Log::default();
    let seen = log.clone();
    let app = Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                let request = Seen {
                    method: method.clone(),
                    target: uri.to_string(),
                    headers,
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                };
                seen.0.lock().unwrap().push(request);
                answer(&method, uri.path()).respond().await
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), log)
}
