use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::common::{Service, client, data_dir, json, post_raw, problem};

async fn stock(client: &Client, inventory: &Service, sku: &str) -> (i64, i64) {
    let url = inventory.url(&format!("/stock/{sku}"));
    let (status, body) = json(client.get(url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (
        body["available"].as_i64().expect("available"),
        body["reserved"].as_i64().expect("reserved"),
    )
}

async fn reserve(client: &Client, inventory: &Service, body: Value) -> reqwest::Response {
    client
        .post(inventory.url("/reservations"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn reserves_and_releases_stock() {
    let data = data_dir();
    let inventory = Service::start("inventory", data.path(), &[]).await;
    let client = client();
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (5, 0));
    assert_eq!(stock(&client, &inventory, "TEA-001").await, (100, 0));

    let order = json!({
        "order_id": "ord_1",
        "items": [{ "sku": "ESPRESSO-005", "qty": 3 }, { "sku": "TEA-001", "qty": 2 }],
    });
    let response = reserve(&client, &inventory, order.clone()).await;
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let (status, reservation) = json(response).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = reservation["id"].as_str().expect("an id").to_owned();
    assert_eq!(location, format!("/reservations/{id}"));
    assert_eq!(reservation["status"], "reserved");
    assert_eq!(reservation["order_id"], "ord_1");
    assert_eq!(reservation["items"], order["items"]);
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (2, 3));
    assert_eq!(stock(&client, &inventory, "TEA-001").await, (98, 2));

    // A retry of the same order gets the same reservation and takes nothing more.
    let (status, again) = json(reserve(&client, &inventory, order).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, reservation);
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (2, 3));

    let (status, listed) = json(client.get(inventory.url("/stock")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        listed
            .as_array()
            .unwrap()
            .contains(&json!({ "sku": "ESPRESSO-005", "available": 2, "reserved": 3 })),
        "{listed}"
    );

    let url = inventory.url(&format!("/reservations/{id}"));
    let (status, released) = json(client.delete(&url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(released["status"], "released");
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (5, 0));
    assert_eq!(stock(&client, &inventory, "TEA-001").await, (100, 0));

    let (status, again) = json(client.delete(&url).send().await.unwrap()).await;
    assert_eq!((status, &again), (StatusCode::OK, &released));
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (5, 0));

    let (status, fetched) = json(client.get(&url).send().await.unwrap()).await;
    assert_eq!((status, &fetched), (StatusCode::OK, &released));

    let url = inventory.url("/reservations?order_id=ord_1");
    let (status, listed) = json(client.get(url).send().await.unwrap()).await;
    assert_eq!((status, listed), (StatusCode::OK, json!([released])));
    let url = inventory.url("/reservations?order_id=ord_none");
    let (status, listed) = json(client.get(url).send().await.unwrap()).await;
    assert_eq!((status, listed), (StatusCode::OK, json!([])));
    let response = client
        .get(inventory.url("/reservations"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn reserves_once_per_idempotency_key() {
    let data = data_dir();
    let inventory = Service::start("inventory", data.path(), &[]).await;
    let client = client();
    let send = |method: reqwest::Method, path: String, key: &'static str| {
        client
            .request(method, inventory.url(&path))
            .header("idempotency-key", key)
    };

    let order = json!({ "order_id": "ord_1", "items": [{ "sku": "ESPRESSO-005", "qty": 2 }] });
    let first = send(
        reqwest::Method::POST,
        "/reservations".into(),
        "sg_1/reserve-stock/action",
    )
    .json(&order)
    .send()
    .await
    .unwrap();
    let location = first.headers()["location"].clone();
    let (status, reservation) = json(first).await;
    assert_eq!(status, StatusCode::CREATED);

    // The saga's retry: the very first answer (201, not the 200 of a second reservation
    // request), its Location, and no more stock taken.
    let again = send(
        reqwest::Method::POST,
        "/reservations".into(),
        "sg_1/reserve-stock/action",
    )
    .json(&order)
    .send()
    .await
    .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["location"], location);
    assert_eq!(again.headers()["content-type"], "application/json");
    assert_eq!(
        json(again).await,
        (StatusCode::CREATED, reservation.clone())
    );
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (3, 2));

    // Another key is another request: another order reserves its own.
    let other = json!({ "order_id": "ord_2", "items": [{ "sku": "ESPRESSO-005", "qty": 1 }] });
    let response = send(
        reqwest::Method::POST,
        "/reservations".into(),
        "sg_2/reserve-stock/action",
    )
    .json(&other)
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (2, 3));

    // The same key for another method and path is refused, and changes nothing.
    let id = reservation["id"].as_str().unwrap();
    let response = send(
        reqwest::Method::DELETE,
        format!("/reservations/{id}"),
        "sg_1/reserve-stock/action",
    )
    .send()
    .await
    .unwrap();
    let detail = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(detail.contains("POST /reservations"), "{detail}");
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (2, 3));

    // The compensation with its own key releases once; reads ignore keys.
    for _ in 0..2 {
        let response = send(
            reqwest::Method::DELETE,
            format!("/reservations/{id}"),
            "sg_1/reserve-stock/compensate",
        )
        .send()
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (4, 1));
    let response = send(
        reqwest::Method::GET,
        "/stock/TEA-001".into(),
        "sg_1/reserve-stock/action",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn reserves_nothing_when_any_item_lacks_stock() {
    let data = data_dir();
    let inventory = Service::start("inventory", data.path(), &[]).await;
    let client = client();

    let order = json!({
        "order_id": "ord_big",
        "items": [{ "sku": "TEA-001", "qty": 1 }, { "sku": "ESPRESSO-005", "qty": 6 }],
    });
    let detail = problem(
        reserve(&client, &inventory, order).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(detail.contains("ESPRESSO-005"), "{detail}");
    assert_eq!(stock(&client, &inventory, "TEA-001").await, (100, 0));
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (5, 0));

    // Lines of one SKU count together.
    let order = json!({
        "order_id": "ord_split",
        "items": [{ "sku": "ESPRESSO-005", "qty": 3 }, { "sku": "ESPRESSO-005", "qty": 3 }],
    });
    problem(
        reserve(&client, &inventory, order).await,
        StatusCode::CONFLICT,
    )
    .await;

    // The order that failed may try again once it asks for what there is.
    let order = json!({ "order_id": "ord_big", "items": [{ "sku": "ESPRESSO-005", "qty": 5 }] });
    assert_eq!(
        reserve(&client, &inventory, order).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (0, 5));
}

#[tokio::test]
async fn rejects_bad_requests() {
    let data = data_dir();
    let inventory = Service::start("inventory", data.path(), &[]).await;
    let client = client();

    let unknown = json!({ "order_id": "o", "items": [{ "sku": "NOPE-1", "qty": 1 }] });
    let detail = problem(
        reserve(&client, &inventory, unknown).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(detail.contains("NOPE-1"), "{detail}");

    for body in [
        json!({ "order_id": "o", "items": [] }),
        json!({ "order_id": "", "items": [{ "sku": "TEA-001", "qty": 1 }] }),
        json!({ "order_id": "o", "items": [{ "sku": "TEA-001", "qty": 0 }] }),
        json!({ "order_id": "o", "items": [{ "sku": "TEA-001", "qty": -2 }] }),
        json!({ "order_id": "o", "items": [{ "sku": "TEA-001", "qty": "two" }] }),
        json!({ "order_id": "o" }),
        json!([1, 2]),
    ] {
        let response = reserve(&client, &inventory, body.clone()).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "for {body}"
        );
        problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    }

    let response = post_raw(&client, inventory.url("/reservations"), "{\"order_id\": ").await;
    problem(response, StatusCode::BAD_REQUEST).await;

    for path in ["/reservations/res_nope", "/stock/NOPE-1"] {
        let response = client.get(inventory.url(path)).send().await.unwrap();
        problem(response, StatusCode::NOT_FOUND).await;
    }
    let response = client
        .delete(inventory.url("/reservations/res_nope"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND).await;

    let response = client.put(inventory.url("/stock")).send().await.unwrap();
    problem(response, StatusCode::METHOD_NOT_ALLOWED).await;
    assert_eq!(stock(&client, &inventory, "TEA-001").await, (100, 0));
}

#[tokio::test]
async fn keeps_its_state_across_restarts() {
    let data = data_dir();
    let client = client();
    let mut inventory = Service::start("inventory", data.path(), &[]).await;
    let order = json!({ "order_id": "o", "items": [{ "sku": "ESPRESSO-005", "qty": 2 }] });
    assert_eq!(
        reserve(&client, &inventory, order).await.status(),
        StatusCode::CREATED
    );
    assert!(inventory.terminate().await.success());

    // Seeding happens on the first start only: the reservation still holds its stock.
    let inventory = Service::start("inventory", data.path(), &[]).await;
    assert_eq!(stock(&client, &inventory, "ESPRESSO-005").await, (3, 2));
}
