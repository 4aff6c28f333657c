use reqwest::StatusCode;
use serde_json::json;

use crate::common::{Service, client, data_dir, json, post_raw, problem};

#[tokio::test]
async fn creates_and_cancels_shipments() {
    let data = data_dir();
    let shipping = Service::start("shipping", data.path(), &[]).await;
    let client = client();

    let body = json!({ "order_id": "ord_1", "address": "1 Harbour Road" });
    let response = client
        .post(shipping.url("/shipments"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let (status, shipment) = json(response).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = shipment["id"].as_str().expect("an id").to_owned();
    assert_eq!(location, format!("/shipments/{id}"));
    assert_eq!(shipment["order_id"], "ord_1");
    assert_eq!(shipment["status"], "created");

    let response = client
        .post(shipping.url("/shipments"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, again) = json(response).await;
    assert_eq!((status, &again), (StatusCode::OK, &shipment));

    let url = shipping.url(&format!("/shipments/{id}"));
    let (status, cancelled) = json(client.delete(&url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cancelled["status"], "cancelled");
    let (status, again) = json(client.delete(&url).send().await.unwrap()).await;
    assert_eq!((status, &again), (StatusCode::OK, &cancelled));
    let (status, fetched) = json(client.get(&url).send().await.unwrap()).await;
    assert_eq!((status, &fetched), (StatusCode::OK, &cancelled));

    let url = shipping.url("/shipments?order_id=ord_1");
    let (status, listed) = json(client.get(url).send().await.unwrap()).await;
    assert_eq!((status, listed), (StatusCode::OK, json!([cancelled])));
    let url = shipping.url("/shipments?order_id=ord_none");
    let (status, listed) = json(client.get(url).send().await.unwrap()).await;
    assert_eq!((status, listed), (StatusCode::OK, json!([])));

    // The address is optional.
    let response = client
        .post(shipping.url("/shipments"))
        .json(&json!({ "order_id": "ord_2" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn rejects_bad_requests() {
    let data = data_dir();
    let shipping = Service::start("shipping", data.path(), &[]).await;
    let client = client();

    for body in [
        json!({}),
        json!({ "order_id": "" }),
        json!({ "order_id": "o", "address": 7 }),
    ] {
        let response = client
            .post(shipping.url("/shipments"))
            .json(&body)
            .send()
            .await
            .unwrap();
        problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let response = post_raw(&client, shipping.url("/shipments"), "{").await;
    problem(response, StatusCode::BAD_REQUEST).await;

    for response in [
        client.get(shipping.url("/shipments/shp_nope")).send().await,
        client
            .delete(shipping.url("/shipments/shp_nope"))
            .send()
            .await,
    ] {
        problem(response.unwrap(), StatusCode::NOT_FOUND).await;
    }
}
