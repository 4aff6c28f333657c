//! payments: authorizes an amount per order, up to a fixed limit, and voids the authorization
//! when the order is called off (the `place-order` saga's compensation of `authorize-payment`).

use std::process::ExitCode;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_shop::{
    BoxError, Db, JsonBody, PathParam, Problem, QueryParam, exit_code, from_cents, idempotent,
    located, new_id, serve, to_cents,
};
use rusqlite::{Connection, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

const SERVICE: &str = "payments";

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS authorizations (
        seq          INTEGER PRIMARY KEY,
        id           TEXT NOT NULL UNIQUE,
        order_id     TEXT NOT NULL UNIQUE,
        amount_cents INTEGER NOT NULL,
        status       TEXT NOT NULL
    );
";

/// The largest amount authorized, in currency units. The catalog sells one product above it, so
/// a declined payment is easy to provoke.
const LIMIT: i64 = 1000;

/// An authorization's life: `authorized`, then possibly `voided`, for good.
const AUTHORIZED: &str = "authorized";
const VOIDED: &str = "voided";

/// The most authorizations one listing returns.
const LIST_LIMIT: i64 = 100;

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(SERVICE, run().await)
}

async fn run() -> Result<(), BoxError> {
    let db = Db::open("payments.db", SCHEMA)?;
    serve(SERVICE, router(db)?).await
}

fn router(db: Db) -> Result<Router, BoxError> {
    let routes = Router::new()
        .route("/authorizations", get(list).post(authorize))
        .route("/authorizations/{id}", get(get_authorization))
        .route("/authorizations/{id}/void", post(void))
        .with_state(db.clone());
    idempotent(routes, &db)
}

#[derive(Debug, Deserialize)]
struct NewAuthorization {
    order_id: String,
    amount: f64,
}

#[derive(Debug, Serialize)]
struct Authorization {
    id: String,
    order_id: String,
    amount: f64,
    status: String,
}

/// 201 with a new authorization, 200 with the existing one when the order already has one, 402
/// above the limit (nothing is stored, so a corrected retry may pass).
async fn authorize(
    State(db): State<Db>,
    JsonBody(req): JsonBody<NewAuthorization>,
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
    let (status, authorization) = db
        .call(move |conn| authorize_amount(conn, req.order_id, cents))
        .await?;
    let location = format!("/authorizations/{}", authorization.id);
    Ok(located(status, location, authorization))
}

fn authorize_amount(
    conn: &mut Connection,
    order_id: String,
    cents: i64,
) -> Result<(StatusCode, Authorization), Problem> {
    // Immediate, so that two replicas handling a retried request cannot both insert.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(existing) = find(&tx, By::OrderId, &order_id)?.pop() {
        return Ok((StatusCode::OK, existing));
    }
    if cents > LIMIT * 100 {
        return Err(Problem::new(
            StatusCode::PAYMENT_REQUIRED,
            format!("payment declined: amount exceeds the limit of {LIMIT}"),
        ));
    }
    let authorization = Authorization {
        id: new_id("auth"),
        order_id,
        amount: from_cents(cents),
        status: AUTHORIZED.to_owned(),
    };
    tx.execute(
        "INSERT INTO authorizations (id, order_id, amount_cents, status) VALUES (?1, ?2, ?3, ?4)",
        params![
            authorization.id,
            authorization.order_id,
            cents,
            authorization.status
        ],
    )?;
    tx.commit()?;
    Ok((StatusCode::CREATED, authorization))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    order_id: Option<String>,
}

/// `?order_id=X`: the order's authorization, if any (a list of zero or one); without it, the
/// latest authorizations, most recent first.
async fn list(
    State(db): State<Db>,
    QueryParam(query): QueryParam<ListQuery>,
) -> Result<Json<Vec<Authorization>>, Problem> {
    let authorizations = db
        .call(move |conn| {
            Ok(match query.order_id {
                Some(order_id) => find(conn, By::OrderId, &order_id)?,
                None => find(conn, By::Latest, "")?,
            })
        })
        .await?;
    Ok(Json(authorizations))
}

async fn get_authorization(
    State(db): State<Db>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Authorization>, Problem> {
    let authorization = db
        .call(move |conn| find(conn, By::Id, &id)?.pop().ok_or_else(|| not_found(&id)))
        .await?;
    Ok(Json(authorization))
}

/// Releases the authorized amount: `authorized` -> `voided`. Voiding again changes nothing and
/// answers the same, so the saga may retry its compensation freely.
async fn void(
    State(db): State<Db>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Authorization>, Problem> {
    let authorization = db
        .call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut authorization = find(&tx, By::Id, &id)?
                .pop()
                .ok_or_else(|| not_found(&id))?;
            if authorization.status != VOIDED {
                tx.execute(
                    "UPDATE authorizations SET status = ?2 WHERE id = ?1",
                    params![id, VOIDED],
                )?;
                tx.commit()?;
                authorization.status = VOIDED.to_owned();
            }
            Ok(authorization)
        })
        .await?;
    Ok(Json(authorization))
}

enum By {
    Id,
    OrderId,
    Latest,
}

fn find(conn: &Connection, by: By, key: &str) -> rusqlite::Result<Vec<Authorization>> {
    const COLUMNS: &str = "SELECT id, order_id, amount_cents, status FROM authorizations";
    let mut stmt = match by {
        By::Id => conn.prepare_cached(&format!("{COLUMNS} WHERE id = ?1"))?,
        By::OrderId => conn.prepare_cached(&format!("{COLUMNS} WHERE order_id = ?1"))?,
        By::Latest => conn.prepare_cached(&format!(
            "{COLUMNS} WHERE ?1 = '' ORDER BY seq DESC LIMIT {LIST_LIMIT}"
        ))?,
    };
    stmt.query_map([key], |row| {
        Ok(Authorization {
            id: row.get(0)?,
            order_id: row.get(1)?,
            amount: from_cents(row.get(2)?),
            status: row.get(3)?,
        })
    })?
    .collect()
}

fn not_found(id: &str) -> Problem {
    Problem::not_found(format!("no authorization {id}"))
}
