use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::common::{Service, client, data_dir, json, post_raw, problem};

async fn pay(client: &Client, payments: &Service, body: Value) -> reqwest::Response {
    client
        .post(payments.url("/payments"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn authorizes_and_refunds() {
    let data = data_dir();
    let payments = Service::start("payments", data.path(), &[]).await;
    let client = client();

    let body = json!({ "order_id": "ord_1", "amount": 43.5 });
    let response = pay(&client, &payments, body.clone()).await;
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let (status, payment) = json(response).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = payment["id"].as_str().expect("an id").to_owned();
    assert_eq!(location, format!("/payments/{id}"));
    assert_eq!(
        payment,
        json!({ "id": id, "order_id": "ord_1", "amount": 43.5, "status": "authorized" })
    );

    let (status, again) = json(pay(&client, &payments, body).await).await;
    assert_eq!((status, &again), (StatusCode::OK, &payment));

    let refund_url = payments.url(&format!("/payments/{id}/refund"));
    let (status, refunded) = json(client.post(&refund_url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(refunded["status"], "refunded");
    assert_eq!(refunded["amount"], json!(43.5));

    let (status, again) = json(client.post(&refund_url).send().await.unwrap()).await;
    assert_eq!((status, &again), (StatusCode::OK, &refunded));

    let url = payments.url(&format!("/payments/{id}"));
    let (status, fetched) = json(client.get(url).send().await.unwrap()).await;
    assert_eq!((status, fetched), (StatusCode::OK, refunded));
}

#[tokio::test]
async fn declines_amounts_above_the_limit() {
    let data = data_dir();
    let payments = Service::start("payments", data.path(), &[]).await;
    let client = client();

    let body = json!({ "order_id": "ord_espresso", "amount": 1499.0 });
    let detail = problem(
        pay(&client, &payments, body).await,
        StatusCode::PAYMENT_REQUIRED,
    )
    .await;
    assert_eq!(detail, "payment declined: amount exceeds the limit of 1000");

    let body = json!({ "order_id": "ord_cent_over", "amount": 1000.01 });
    problem(
        pay(&client, &payments, body).await,
        StatusCode::PAYMENT_REQUIRED,
    )
    .await;

    let body = json!({ "order_id": "ord_huge", "amount": 1e300 });
    problem(
        pay(&client, &payments, body).await,
        StatusCode::PAYMENT_REQUIRED,
    )
    .await;

    let body = json!({ "order_id": "ord_at_limit", "amount": 1000 });
    assert_eq!(
        pay(&client, &payments, body).await.status(),
        StatusCode::CREATED
    );

    // A declined payment is not stored, so the order may pay a corrected amount.
    let body = json!({ "order_id": "ord_espresso", "amount": 999.0 });
    assert_eq!(
        pay(&client, &payments, body).await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn rejects_bad_requests() {
    let data = data_dir();
    let payments = Service::start("payments", data.path(), &[]).await;
    let client = client();

    for body in [
        json!({ "order_id": "o", "amount": 0 }),
        json!({ "order_id": "o", "amount": -5 }),
        json!({ "order_id": "o", "amount": 0.001 }),
        json!({ "order_id": "o", "amount": "12" }),
        json!({ "order_id": "o" }),
        json!({ "order_id": " ", "amount": 5 }),
        json!({ "amount": 5 }),
    ] {
        let response = pay(&client, &payments, body.clone()).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "for {body}"
        );
        problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    }

    let response = post_raw(&client, payments.url("/payments"), "not json").await;
    problem(response, StatusCode::BAD_REQUEST).await;

    let response = client
        .post(payments.url("/payments/pay_nope/refund"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND).await;
    let response = client
        .get(payments.url("/payments/pay_nope"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND).await;
    let response = client
        .get(payments.url("/payments/pay_nope/refund"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::METHOD_NOT_ALLOWED).await;
}
