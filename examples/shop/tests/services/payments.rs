use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::common::{Service, client, data_dir, json, post_raw, problem};

async fn pay(client: &Client, payments: &Service, body: Value) -> reqwest::Response {
    client
        .post(payments.url("/authorizations"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn authorizes_and_voids() {
    let data = data_dir();
    let payments = Service::start("payments", data.path(), &[]).await;
    let client = client();

    let body = json!({ "order_id": "ord_1", "amount": 43.5 });
    let response = pay(&client, &payments, body.clone()).await;
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let (status, payment) = json(response).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = payment["id"].as_str().expect("an id").to_owned();
    assert_eq!(location, format!("/authorizations/{id}"));
    assert!(id.starts_with("auth_"), "{id}");
    assert_eq!(
        payment,
        json!({ "id": id, "order_id": "ord_1", "amount": 43.5, "status": "authorized" })
    );

    let (status, again) = json(pay(&client, &payments, body).await).await;
    assert_eq!((status, &again), (StatusCode::OK, &payment));

    let void_url = payments.url(&format!("/authorizations/{id}/void"));
    let (status, voided) = json(client.post(&void_url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(voided["status"], "voided");
    assert_eq!(voided["amount"], json!(43.5));

    let (status, again) = json(client.post(&void_url).send().await.unwrap()).await;
    assert_eq!((status, &again), (StatusCode::OK, &voided));

    let url = payments.url(&format!("/authorizations/{id}"));
    let (status, fetched) = json(client.get(url).send().await.unwrap()).await;
    assert_eq!((status, &fetched), (StatusCode::OK, &voided));

    let url = payments.url("/authorizations?order_id=ord_1");
    let (status, listed) = json(client.get(url).send().await.unwrap()).await;
    assert_eq!((status, listed), (StatusCode::OK, json!([voided])));
    let url = payments.url("/authorizations?order_id=ord_none");
    let (status, listed) = json(client.get(url).send().await.unwrap()).await;
    assert_eq!((status, listed), (StatusCode::OK, json!([])));
}

#[tokio::test]
async fn replays_the_first_answer_to_a_repeated_key() {
    let data = data_dir();
    let payments = Service::start("payments", data.path(), &[]).await;
    let client = client();
    let authorize = |key: &str, body: Value| {
        client
            .post(payments.url("/authorizations"))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };

    // Two replicas of the saga's call racing: one authorization, one answer.
    let key = "sg_1/authorize-payment/action";
    let body = json!({ "order_id": "ord_1", "amount": 10 });
    let (first, second) = tokio::join!(authorize(key, body.clone()), authorize(key, body));
    let (first, second) = (json(first.unwrap()).await, json(second.unwrap()).await);
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    assert_eq!(first, second);
    let (_, listed) = json(
        client
            .get(payments.url("/authorizations"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(listed, json!([first.1]));

    // A refusal is an answer too: replayed, even when the body now asks for less.
    let key = "sg_2/authorize-payment/action";
    let declined = authorize(key, json!({ "order_id": "ord_2", "amount": 5000 }));
    problem(declined.await.unwrap(), StatusCode::PAYMENT_REQUIRED).await;
    let again = authorize(key, json!({ "order_id": "ord_2", "amount": 50 }))
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    problem(again, StatusCode::PAYMENT_REQUIRED).await;
    // A new key is a new request.
    let other = authorize(
        "sg_3/authorize-payment/action",
        json!({ "order_id": "ord_2", "amount": 50 }),
    );
    assert_eq!(other.await.unwrap().status(), StatusCode::CREATED);

    let long = "k".repeat(256);
    let response = authorize(&long, json!({ "order_id": "ord_3", "amount": 1 }))
        .await
        .unwrap();
    problem(response, StatusCode::BAD_REQUEST).await;
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

    let response = post_raw(&client, payments.url("/authorizations"), "not json").await;
    problem(response, StatusCode::BAD_REQUEST).await;

    let response = client
        .post(payments.url("/authorizations/auth_nope/void"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND).await;
    let response = client
        .get(payments.url("/authorizations/auth_nope"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND).await;
    let response = client
        .get(payments.url("/authorizations/auth_nope/void"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::METHOD_NOT_ALLOWED).await;
}
