//! orders takes an order and hands it to the `place-order` saga: against the real catalog, and a
//! fake of Flotilla's API (sidecar) that records what orders asks of it — starting sagas,
//! publishing events — and acknowledges it. Running the saga itself is the orchestrator's part,
//! tested end to end with the platform.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::common::{Service, client, data_dir, free_port, json, post_raw, problem};

/// How long orders may take to answer that a dependency is down, or to publish an event.
const PROMPTLY: Duration = Duration::from_secs(5);

/// orders, the real catalog, and the fake of Flotilla's API.
struct Shop {
    orders: Service,
    _catalog: Service,
    flotilla: Log,
    _data: tempfile::TempDir,
}

impl Shop {
    /// Flotilla's API answering as [`healthy`] does.
    async fn start() -> Self {
        let (url, log) = fake(healthy).await;
        Self::with(&url, log, &[]).await
    }

    /// orders reaching Flotilla's API at `flotilla` (recorded in `log`), with `env`.
    async fn with(flotilla: &str, log: Log, env: &[(&str, &str)]) -> Self {
        let data = data_dir();
        let catalog = Service::start("catalog", &data.path().join("catalog"), &[]).await;
        let catalog_url = format!("http://127.0.0.1:{}", catalog.port());
        let mut orders_env = vec![
            ("CATALOG_URL", catalog_url.as_str()),
            ("FLOTILLA_URL", flotilla),
        ];
        orders_env.extend_from_slice(env);
        let orders = Service::start("orders", &data.path().join("orders"), &orders_env).await;
        Self {
            orders,
            _catalog: catalog,
            flotilla: log,
            _data: data,
        }
    }

    async fn place(&self, client: &Client, body: Value) -> reqwest::Response {
        client
            .post(self.orders.url("/orders"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Places `body`, which must come back pending (202): its id.
    async fn pending(&self, client: &Client, body: Value) -> String {
        let (status, order) = json(self.place(client, body).await).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{order}");
        assert_eq!(order["status"], "pending");
        order["id"].as_str().expect("an id").to_owned()
    }

    async fn post(&self, client: &Client, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = client.post(self.orders.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        json(request.send().await.unwrap()).await
    }

    async fn order(&self, client: &Client, id: &str) -> Value {
        let url = self.orders.url(&format!("/orders/{id}"));
        let (status, order) = json(client.get(url).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{order}");
        order
    }

    /// Every order stored, most recent first.
    async fn orders(&self, client: &Client) -> Value {
        let response = client.get(self.orders.url("/orders")).send().await.unwrap();
        let (status, list) = json(response).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        list
    }

    /// The events published so far, waiting until there are at least `count`.
    async fn published(&self, count: usize) -> Vec<Seen> {
        published(&self.flotilla, count).await
    }
}

/// The events `log` saw published, waiting (bounded) until there are at least `count`.
async fn published(log: &Log, count: usize) -> Vec<Seen> {
    let deadline = Instant::now() + PROMPTLY;
    loop {
        let events: Vec<Seen> = log
            .requests()
            .into_iter()
            .filter(|seen| seen.target.contains("/v1/topics/"))
            .collect();
        if events.len() >= count || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `(type, subject)` of each event, dropping repeats of one id (delivery is at least once).
fn topics(events: &[Seen]) -> Vec<(String, String)> {
    let mut seen_ids = Vec::new();
    let mut out = Vec::new();
    for event in events {
        let id = event.body["id"].clone();
        if seen_ids.contains(&id) {
            continue;
        }
        seen_ids.push(id);
        out.push((
            event.body["type"].as_str().unwrap_or_default().to_owned(),
            event.body["subject"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ));
    }
    out
}

fn tea(qty: i64) -> Value {
    json!({ "customer": "ada", "items": [{ "sku": "TEA-001", "qty": qty }] })
}

fn saga_event(status: &str, order_id: &str, message: &str) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("evt-{status}-{order_id}"),
        "type": format!("saga.{status}"),
        "source": "/flotilla/sagas",
        "data": {
            "id": "sg_fake",
            "name": "place-order",
            "status": status,
            "input": { "order_id": order_id, "customer": "ada", "items": [], "total": 25.0 },
            "error": { "step": "authorize-payment", "status": 402, "message": message },
        },
    })
}

#[tokio::test]
async fn stores_the_order_pending_and_starts_its_saga() {
    let shop = Shop::start().await;
    let client = client();

    let body = json!({
        "customer": "ada",
        "items": [{ "sku": "TEA-001", "qty": 2 }, { "sku": "MUG-002", "qty": 1 }],
    });
    let response = shop.place(&client, body).await;
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let (status, order) = json(response).await;
    // The fake's saga is still running after the wait: the order is taken, not yet confirmed.
    assert_eq!(status, StatusCode::ACCEPTED, "{order}");

    let id = order["id"].as_str().expect("an id").to_owned();
    let hex = id.strip_prefix("ord_").expect("an ord_ prefix");
    assert!(
        hex.len() == 16 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(location, format!("/orders/{id}"));
    assert_eq!(order["customer"], "ada");
    assert_eq!(order["status"], "pending");
    assert!(order.get("reason").is_none(), "{order}");
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
    assert_eq!(shop.order(&client, &id).await, order);

    // The saga was started once, keyed by the order, with the order as its input, then polled.
    let calls: Vec<Seen> = shop
        .flotilla
        .requests()
        .into_iter()
        .filter(|seen| seen.target.contains("/v1/sagas"))
        .collect();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert_eq!(
        (calls[0].method.as_str(), calls[0].target.as_str()),
        ("POST", "/v1/sagas/place-order")
    );
    assert_eq!(calls[0].headers["idempotency-key"], id.as_str());
    assert_eq!(
        calls[0].body,
        json!({
            "order_id": id,
            "customer": "ada",
            "items": [{ "sku": "TEA-001", "qty": 2 }, { "sku": "MUG-002", "qty": 1 }],
            "total": 43.0,
        })
    );
    assert_eq!(
        (calls[1].method.as_str(), calls[1].target.as_str()),
        ("GET", "/v1/sagas/sg_fake?wait=10s")
    );

    let events = shop.published(1).await;
    assert_eq!(topics(&events), [("order.placed".to_owned(), id.clone())]);
    assert_eq!(
        events[0].body["data"],
        json!({
            "order": id,
            "customer": "ada",
            "total": 43.0,
            "items": [{ "sku": "TEA-001", "qty": 2 }, { "sku": "MUG-002", "qty": 1 }],
        })
    );

    let stdout = shop.orders.stdout();
    assert!(
        stdout
            .iter()
            .any(|line| line.starts_with("POST /orders 202 ")),
        "{stdout:#?}"
    );
}

#[tokio::test]
async fn confirms_and_cancels_once_and_for_good() {
    let shop = Shop::start().await;
    let client = client();
    let first = shop.pending(&client, tea(1)).await;
    let second = shop.pending(&client, tea(2)).await;

    // The saga's last step; a retry answers the same.
    let path = format!("/orders/{first}/confirm");
    let (status, confirmed) = shop.post(&client, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(confirmed["status"], "confirmed");
    assert_eq!(
        shop.post(&client, &path, None).await,
        (StatusCode::OK, confirmed.clone())
    );
    let response = client
        .post(shop.orders.url(&format!("/orders/{first}/cancel")))
        .send()
        .await
        .unwrap();
    let detail = problem(response, StatusCode::CONFLICT).await;
    assert_eq!(
        detail,
        format!("order {first} is confirmed; it cannot be cancelled")
    );

    let path = format!("/orders/{second}/cancel");
    let reason = json!({ "reason": "changed my mind" });
    let (status, cancelled) = shop.post(&client, &path, Some(reason)).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["reason"], "changed my mind");
    // Cancelling again keeps the first reason.
    let (status, again) = shop.post(&client, &path, None).await;
    assert_eq!((status, &again), (StatusCode::OK, &cancelled));
    let response = client
        .post(shop.orders.url(&format!("/orders/{second}/confirm")))
        .send()
        .await
        .unwrap();
    let detail = problem(response, StatusCode::CONFLICT).await;
    assert_eq!(
        detail,
        format!("order {second} is cancelled (changed my mind); it cannot be confirmed")
    );

    assert_eq!(
        shop.orders(&client).await,
        json!([cancelled, confirmed]),
        "most recent first"
    );

    for path in [
        "/orders/ord_0000000000000000/confirm",
        "/orders/ord_0000000000000000/cancel",
    ] {
        let response = client.post(shop.orders.url(path)).send().await.unwrap();
        problem(response, StatusCode::NOT_FOUND).await;
    }
    let response = post_raw(&client, shop.orders.url(&path), "{\"reason\": ").await;
    problem(response, StatusCode::BAD_REQUEST).await;
    let response = post_raw(&client, shop.orders.url(&path), "{\"reason\": 7}").await;
    problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;

    // One event per change, each order's in order.
    let events = shop.published(4).await;
    let mut by_order = topics(&events);
    by_order.sort_by_key(|(_, subject)| subject.clone());
    let mut expected = vec![
        ("order.placed".to_owned(), first.clone()),
        ("order.confirmed".to_owned(), first.clone()),
        ("order.placed".to_owned(), second.clone()),
        ("order.cancelled".to_owned(), second.clone()),
    ];
    expected.sort_by_key(|(_, subject)| subject.clone());
    assert_eq!(by_order, expected);
    let cancelled_event = events
        .iter()
        .find(|seen| seen.body["type"] == "order.cancelled")
        .expect("order.cancelled");
    assert_eq!(cancelled_event.body["data"]["reason"], "changed my mind");
    assert_eq!(cancelled_event.body["data"]["order"], second.as_str());
}

#[tokio::test]
async fn cancels_the_order_of_a_saga_that_gave_up() {
    let shop = Shop::start().await;
    let client = client();
    let id = shop.pending(&client, tea(1)).await;

    let reason = "payment declined: amount exceeds the limit of 1000";
    let event = saga_event("compensated", &id, reason);
    let (status, body) = shop
        .post(&client, "/events/saga-finished", Some(event.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let order = shop.order(&client, &id).await;
    assert_eq!(order["status"], "cancelled");
    assert_eq!(order["reason"], reason);

    // Delivered again, or failed after compensated: nothing changes, and Flotilla is told so.
    let (status, _) = shop
        .post(&client, "/events/saga-finished", Some(event))
        .await;
    assert_eq!(status, StatusCode::OK);
    let failed = saga_event("failed", &id, "another reason");
    let (status, _) = shop
        .post(&client, "/events/saga-finished", Some(failed))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shop.order(&client, &id).await, order);

    // Orders it does not know, and other sagas, are acknowledged and ignored.
    let unknown = saga_event("compensated", "ord_0000000000000000", "whatever");
    let (status, _) = shop
        .post(&client, "/events/saga-finished", Some(unknown))
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut other = saga_event("compensated", &id, "whatever");
    other["data"]["name"] = json!("restock");
    let (status, _) = shop
        .post(&client, "/events/saga-finished", Some(other))
        .await;
    assert_eq!(status, StatusCode::OK);

    let url = shop.orders.url("/events/saga-finished");
    for malformed in [
        "not json",
        "{}",
        "{\"id\": \"e\", \"data\": {\"name\": \"place-order\", \"status\": \"failed\"}}",
    ] {
        let response = post_raw(&client, url.clone(), malformed).await;
        problem(response, StatusCode::BAD_REQUEST).await;
    }

    let events = shop.published(2).await;
    assert_eq!(
        topics(&events),
        [
            ("order.placed".to_owned(), id.clone()),
            ("order.cancelled".to_owned(), id.clone())
        ]
    );
}

#[tokio::test]
async fn answers_503_and_cancels_the_order_when_flotilla_is_unreachable() {
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let shop = Shop::with(&nowhere, Log::default(), &[]).await;
    let client = client();

    let started = Instant::now();
    let response = shop.place(&client, tea(2)).await;
    let detail = problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(started.elapsed() < PROMPTLY, "took {:?}", started.elapsed());
    assert_eq!(
        detail,
        "flotilla unavailable: flotilla could not be reached"
    );

    let orders = shop.orders(&client).await;
    let orders = orders.as_array().expect("a list");
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(orders[0]["status"], "cancelled");
    assert_eq!(
        orders[0]["reason"],
        "the order could not be fulfilled: flotilla unavailable: flotilla could not be reached"
    );
    let stderr = shop.orders.stderr();
    assert!(
        stderr
            .iter()
            .any(|line| line.contains("could not start the place-order saga")),
        "{stderr:#?}"
    );
}

#[tokio::test]
async fn publishes_the_outbox_again_until_flotilla_takes_it() {
    // Flotilla refuses the first three publishes, as when its broker is restarting.
    let refusals = Arc::new(AtomicUsize::new(0));
    let (url, log) = fake(move |method, path| {
        if path.starts_with("/v1/topics/") && refusals.fetch_add(1, Ordering::SeqCst) < 3 {
            return Answer::Problem(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable");
        }
        healthy(method, path)
    })
    .await;
    let shop = Shop::with(&url, log, &[]).await;
    let client = client();
    let id = shop.pending(&client, tea(1)).await;
    let path = format!("/orders/{id}/confirm");
    assert_eq!(shop.post(&client, &path, None).await.0, StatusCode::OK);

    let events = shop.published(5).await;
    assert_eq!(
        events.len(),
        5,
        "three refused, then both taken: {events:#?}"
    );
    // Every attempt at the first event carried the same id, so consumers can drop repeats.
    let ids: Vec<&Value> = events.iter().map(|seen| &seen.body["id"]).collect();
    assert!(ids[..4].iter().all(|event| *event == ids[0]), "{ids:?}");
    assert_ne!(ids[4], ids[0]);
    assert_eq!(
        topics(&events),
        [
            ("order.placed".to_owned(), id.clone()),
            ("order.confirmed".to_owned(), id.clone())
        ]
    );
    // Taken events are gone from the outbox: nothing is published again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(published(&shop.flotilla, 6).await.len(), 5);
}

#[tokio::test]
async fn answers_a_repeated_order_with_its_first_answer() {
    let shop = Shop::start().await;
    let client = client();
    let place = |key: &'static str| {
        client
            .post(shop.orders.url("/orders"))
            .header("idempotency-key", key)
            .json(&tea(1))
            .send()
    };

    let first = place("order-1").await.unwrap();
    assert!(first.headers().get("idempotent-replayed").is_none());
    let location = first.headers()["location"].clone();
    let (status, order) = json(first).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{order}");

    let again = place("order-1").await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["location"], location);
    assert_eq!(json(again).await, (StatusCode::ACCEPTED, order.clone()));
    assert_eq!(shop.orders(&client).await, json!([order]), "one order only");

    let (status, other) = json(place("order-2").await.unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_ne!(other["id"], order["id"]);

    // The key of an order, reused to confirm it, is a mistake of the client's.
    let response = client
        .post(shop.orders.url(&format!(
            "/orders/{}/confirm",
            order["id"].as_str().unwrap()
        )))
        .header("idempotency-key", "order-1")
        .send()
        .await
        .unwrap();
    let detail = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(detail.contains("already used for POST /orders"), "{detail}");
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

    // Nothing above was stored, nor any saga started.
    assert_eq!(shop.orders(&client).await, json!([]));
    let sagas = shop.flotilla.requests();
    assert!(
        !sagas.iter().any(|seen| seen.target.contains("/v1/sagas")),
        "{sagas:#?}"
    );
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
    assert_eq!(status, StatusCode::ACCEPTED, "{order}");
    // 0.1 * 3 in floating point is 0.30000000000000004; in cents it is exact.
    assert_eq!(order["total"], json!(0.3));
    let id = order["id"].as_str().unwrap().to_owned();

    let events = published(&log, 1).await;
    let (announced, requests) = announcements(log.requests());
    assert_eq!(
        announced,
        [("order.placed".to_owned(), json!(id))],
        "announced through the sidecar, keyed by the order"
    );
    assert_eq!(
        events[0].target,
        "http://flotilla/v1/topics/order.placed/events"
    );
    // The event joins the trace of the request that placed the order.
    assert_eq!(events[0].body["traceparent"], traceparent);
    let calls: Vec<_> = requests
        .iter()
        .map(|seen| (seen.method.as_str(), seen.target.as_str()))
        .collect();
    assert_eq!(
        calls,
        [
            ("GET", "http://catalog/products/TEA-001"),
            ("POST", "http://flotilla/v1/sagas/place-order"),
            ("GET", "http://flotilla/v1/sagas/sg_fake?wait=10s"),
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
async fn maps_a_broken_catalog_to_502_and_an_unavailable_one_to_503() {
    let (url, _log) = fake(healthy).await;
    let data = data_dir();
    let orders = Service::start(
        "orders",
        data.path(),
        &[("CATALOG_URL", &url), ("FLOTILLA_URL", &url)],
    )
    .await;
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
    ] {
        let body = json!({ "customer": "ada", "items": [{ "sku": sku, "qty": 1 }] });
        let response = client
            .post(orders.url("/orders"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let detail = problem(response, status).await;
        assert_eq!(detail, expected, "for {sku}");
    }
    let (status, list) = json(client.get(orders.url("/orders")).send().await.unwrap()).await;
    assert_eq!((status, list), (StatusCode::OK, json!([])));
}

#[tokio::test]
async fn finishes_in_flight_requests_on_sigterm() {
    let (url, log) = fake(healthy).await;
    let data = data_dir();
    let mut orders = Service::start(
        "orders",
        data.path(),
        &[("CATALOG_URL", &url), ("FLOTILLA_URL", &url)],
    )
    .await;

    let client = client();
    let place = orders.url("/orders");
    let in_flight = tokio::spawn(async move {
        let body = json!({ "customer": "ada", "items": [{ "sku": "SLOW-1", "qty": 2 }] });
        client.post(place).json(&body).send().await
    });
    // Stop only once the order is waiting on the catalog.
    while log.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = orders.terminate().await;
    assert!(status.success(), "orders exited with {status}");

    let response = in_flight.await.unwrap().expect("an answer before exiting");
    let (status, order) = json(response).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{order}");
    assert_eq!(order["total"], json!(5.0));
    let sagas = log.requests();
    assert!(
        sagas
            .iter()
            .any(|seen| seen.target == "/v1/sagas/place-order"),
        "the saga was started before exiting: {sagas:#?}"
    );
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
        // Flotilla's saga API, acknowledging: the saga is started and still running. Running
        // sagas is the orchestrator's job, tested with it; orders' part ends at this answer.
        ("POST", "/v1/sagas/place-order") => Answer::Json(
            StatusCode::ACCEPTED,
            json!({ "id": "sg_fake", "name": "place-order", "status": "running" }),
        ),
        ("GET", "/v1/sagas/sg_fake") => Answer::Json(
            StatusCode::OK,
            json!({ "id": "sg_fake", "name": "place-order", "status": "running", "error": null }),
        ),
        // Flotilla's own API behind the sidecar: publishing an event.
        ("POST", path) if path.starts_with("/v1/topics/") => Answer::Json(
            StatusCode::ACCEPTED,
            json!({ "id": "evt_fake", "partition": 0, "offset": 0 }),
        ),
        _ => Answer::Problem(StatusCode::NOT_FOUND, "no such thing"),
    }
}

/// Splits what a fake saw into the events published through it (topic and subject, each
/// checked to be a CloudEvent 1.0 of its topic's type, with an id) and the other calls.
fn announcements(requests: Vec<Seen>) -> (Vec<(String, Value)>, Vec<Seen>) {
    let (events, calls): (Vec<Seen>, Vec<Seen>) = requests
        .into_iter()
        .partition(|seen| seen.target.contains("/v1/topics/"));
    let published = events
        .iter()
        .map(|seen| {
            let topic = seen
                .target
                .split_once("/v1/topics/")
                .map(|(_, rest)| rest)
                .and_then(|rest| rest.strip_suffix("/events"))
                .unwrap_or_else(|| panic!("a publish, not {}", seen.target));
            assert_eq!(seen.method, Method::POST);
            assert_eq!(seen.body["specversion"], "1.0");
            assert_eq!(seen.body["type"], topic);
            let id = seen.body["id"].as_str().expect("an event id");
            assert!(id.starts_with("evt_"), "{id}");
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
async fn fake(
    answer: impl Fn(&Method, &str) -> Answer + Clone + Send + Sync + 'static,
) -> (String, Log) {
    let log = Log::default();
    let seen = log.clone();
    let app = Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            let answer = answer.clone();
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
