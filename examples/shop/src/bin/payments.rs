//! payments: authorizes a payment per order, up to a fixed limit, and refunds it.

use std::process::ExitCode;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_shop::{
    BoxError, Db, JsonBody, PathParam, Problem, exit_code, from_cents, located, new_id, serve,
    to_cents,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

const SERVICE: &str = "payments";

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS payments (
        id           TEXT PRIMARY KEY,
        order_id     TEXT NOT NULL UNIQUE,
        amount_cents INTEGER NOT NULL,
        status       TEXT NOT NULL
    );
";

/// The largest amount authorized, in currency units. The catalog sells one product above it, so
/// a declined payment is easy to provoke.
const LIMIT: i64 = 1000;

const AUTHORIZED: &str = "authorized";
const REFUNDED: &str = "refunded";

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(SERVICE, run().await)
}

async fn run() -> Result<(), BoxError> {
    let db = Db::open("payments.db", SCHEMA)?;
    serve(SERVICE, router(db)).await
}

fn router(db: Db) -> Router {
    Router::new()
        .route("/payments", post(authorize))
        .route("/payments/{id}", get(get_payment))
        .route("/payments/{id}/refund", post(refund))
        .with_state(db)
}

#[derive(Debug, Deserialize)]
struct NewPayment {
    order_id: String,
    amount: f64,
}

#[derive(Debug, Serialize)]
struct Payment {
    id: String,
    order_id: String,
    amount: f64,
    status: String,
}

/// 201 with a new authorization, 200 with the existing one when the order already has one, 402
/// above the limit (nothing is stored, so a corrected retry may pass).
async fn authorize(
    State(db): State<Db>,
    JsonBody(req): JsonBody<NewPayment>,
) -> Result<Response, Problem> {
    if req.order_id.trim().is_empty() {
        return Err(Problem::unprocessable("order_id must not be empty"));
    }
    // The smallest amount is one cent; anything less would be stored as nothing.
    if req.amount.is_nan() || req.amount < 0.01 {
        return Err(Problem::unprocessable(format!(
            "amount must be at least 0.01, not {}",
            req.amount
        )));
    }
    // Only an absurdly large amount has no cents value, and the limit declines it all the same.
    let cents = to_cents(req.amount).unwrap_or(i64::MAX);
    let (status, payment) = db
        .call(move |conn| authorize_payment(conn, req.order_id, cents))
        .await?;
    let location = format!("/payments/{}", payment.id);
    Ok(located(status, location, payment))
}

fn authorize_payment(
    conn: &mut Connection,
    order_id: String,
    cents: i64,
) -> Result<(StatusCode, Payment), Problem> {
    // Immediate, so that two replicas handling a retried request cannot both insert.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(existing) = find_payment(&tx, By::OrderId, &order_id)? {
        return Ok((StatusCode::OK, existing));
    }
    if cents > LIMIT * 100 {
        return Err(Problem::new(
            StatusCode::PAYMENT_REQUIRED,
            format!("payment declined: amount exceeds the limit of {LIMIT}"),
        ));
    }
    let payment = Payment {
        id: new_id("pay"),
        order_id,
        amount: from_cents(cents),
        status: AUTHORIZED.to_owned(),
    };
    tx.execute(
        "INSERT INTO payments (id, order_id, amount_cents, status) VALUES (?1, ?2, ?3, ?4)",
        params![payment.id, payment.order_id, cents, payment.status],
    )?;
    tx.commit()?;
    Ok((StatusCode::CREATED, payment))
}

async fn get_payment(
    State(db): State<Db>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Payment>, Problem> {
    let payment = db
        .call(move |conn| find_payment(conn, By::Id, &id)?.ok_or_else(|| no_payment(&id)))
        .await?;
    Ok(Json(payment))
}

/// Refunding again changes nothing and answers the same.
async fn refund(
    State(db): State<Db>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Payment>, Problem> {
    let payment = db
        .call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut payment = find_payment(&tx, By::Id, &id)?.ok_or_else(|| no_payment(&id))?;
            if payment.status != REFUNDED {
                tx.execute(
                    "UPDATE payments SET status = ?2 WHERE id = ?1",
                    params![id, REFUNDED],
                )?;
                tx.commit()?;
                payment.status = REFUNDED.to_owned();
            }
            Ok(payment)
        })
        .await?;
    Ok(Json(payment))
}

enum By {
    Id,
    OrderId,
}

fn find_payment(conn: &Connection, by: By, key: &str) -> rusqlite::Result<Option<Payment>> {
    let sql = match by {
        By::Id => "SELECT id, order_id, amount_cents, status FROM payments WHERE id = ?1",
        By::OrderId => {
            "SELECT id, order_id, amount_cents, status FROM payments WHERE order_id = ?1"
        }
    };
    conn.query_row(sql, [key], |row| {
        Ok(Payment {
            id: row.get(0)?,
            order_id: row.get(1)?,
            amount: from_cents(row.get(2)?),
            status: row.get(3)?,
        })
    })
    .optional()
}

fn no_payment(id: &str) -> Problem {
    Problem::not_found(format!("no payment {id}"))
}
