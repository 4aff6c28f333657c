//! shipping: creates a shipment per order, and cancels it; dispatches it once the order is
//! confirmed, which it learns from the `order.confirmed` event (pushed by Flotilla).

use std::process::ExitCode;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_shop::{
    BoxError, Db, JsonBody, PathParam, Problem, QueryParam, exit_code, idempotent, located, new_id,
    serve,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

const SERVICE: &str = "shipping";

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS shipments (
        id       TEXT PRIMARY KEY,
        order_id TEXT NOT NULL UNIQUE,
        address  TEXT,
        status   TEXT NOT NULL
    );
";

const CREATED: &str = "created";
const CANCELLED: &str = "cancelled";
const DISPATCHED: &str = "dispatched";

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(SERVICE, run().await)
}

async fn run() -> Result<(), BoxError> {
    let db = Db::open("shipping.db", SCHEMA)?;
    serve(SERVICE, router(db)?).await
}

fn router(db: Db) -> Result<Router, BoxError> {
    let routes = Router::new()
        .route("/shipments", get(list_shipments).post(create))
        .route("/shipments/{id}", get(get_shipment).delete(cancel))
        .route("/events/order-confirmed", post(order_confirmed))
        .with_state(db.clone());
    idempotent(routes, &db)
}

#[derive(Debug, Deserialize)]
struct NewShipment {
    order_id: String,
    #[serde(default)]
    address: Option<String>,
}

#[derive(Debug, Serialize)]
struct Shipment {
    id: String,
    order_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    status: String,
}

/// 201 with a new shipment, 200 with the existing one when the order already has one.
async fn create(
    State(db): State<Db>,
    JsonBody(req): JsonBody<NewShipment>,
) -> Result<Response, Problem> {
    if req.order_id.trim().is_empty() {
        return Err(Problem::unprocessable("order_id must not be empty"));
    }
    let (status, shipment) = db
        .call(move |conn| {
            // Immediate, so that two replicas handling a retried request cannot both insert.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some(existing) = find_shipment(&tx, By::OrderId, &req.order_id)? {
                return Ok((StatusCode::OK, existing));
            }
            let shipment = Shipment {
                id: new_id("shp"),
                order_id: req.order_id,
                address: req.address,
                status: CREATED.to_owned(),
            };
            tx.execute(
                "INSERT INTO shipments (id, order_id, address, status) VALUES (?1, ?2, ?3, ?4)",
                params![
                    shipment.id,
                    shipment.order_id,
                    shipment.address,
                    shipment.status
                ],
            )?;
            tx.commit()?;
            Ok((StatusCode::CREATED, shipment))
        })
        .await?;
    let location = format!("/shipments/{}", shipment.id);
    Ok(located(status, location, shipment))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    order_id: String,
}

/// `?order_id=X`: the order's shipment as a list of zero or one.
async fn list_shipments(
    State(db): State<Db>,
    QueryParam(query): QueryParam<ListQuery>,
) -> Result<Json<Vec<Shipment>>, Problem> {
    let shipments = db
        .call(move |conn| Ok(find_shipment(conn, By::OrderId, &query.order_id)?))
        .await?;
    Ok(Json(shipments.into_iter().collect()))
}

async fn get_shipment(
    State(db): State<Db>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Shipment>, Problem> {
    let shipment = db
        .call(move |conn| find_shipment(conn, By::Id, &id)?.ok_or_else(|| no_shipment(&id)))
        .await?;
    Ok(Json(shipment))
}

/// Cancelling again changes nothing and answers the same.
async fn cancel(
    State(db): State<Db>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Shipment>, Problem> {
    let shipment = db
        .call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut shipment = find_shipment(&tx, By::Id, &id)?.ok_or_else(|| no_shipment(&id))?;
            if shipment.status != CANCELLED {
                tx.execute(
                    "UPDATE shipments SET status = ?2 WHERE id = ?1",
                    params![id, CANCELLED],
                )?;
                tx.commit()?;
                shipment.status = CANCELLED.to_owned();
            }
            Ok(shipment)
        })
        .await?;
    Ok(Json(shipment))
}

/// The CloudEvent Flotilla pushes, structured mode; only the order id matters here.
#[derive(Debug, Deserialize)]
struct OrderEvent {
    id: String,
    data: OrderData,
}

#[derive(Debug, Deserialize)]
struct OrderData {
    order: String,
}

/// `order.confirmed`: the order's shipment goes out. Delivered at least once, so a repeat (or a
/// replay) changes nothing; an order without a shipment is acknowledged too, since retrying
/// cannot create one. Anything but a 2xx makes Flotilla deliver it again.
async fn order_confirmed(
    State(db): State<Db>,
    JsonBody(event): JsonBody<OrderEvent>,
) -> Result<Json<serde_json::Value>, Problem> {
    let order = event.data.order;
    let outcome = db
        .call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(shipment) = find_shipment(&tx, By::OrderId, &order)? else {
                return Ok(None);
            };
            if shipment.status == CREATED {
                tx.execute(
                    "UPDATE shipments SET status = ?2 WHERE id = ?1",
                    params![shipment.id, DISPATCHED],
                )?;
                tx.commit()?;
            }
            Ok(Some(shipment.id))
        })
        .await?;
    match &outcome {
        Some(shipment) => println!(
            "dispatched {shipment} for confirmed order (event {})",
            event.id
        ),
        None => println!(
            "level=warn order.confirmed for an order without a shipment (event {})",
            event.id
        ),
    }
    Ok(Json(serde_json::json!({ "shipment": outcome })))
}

enum By {
    Id,
    OrderId,
}

fn find_shipment(conn: &Connection, by: By, key: &str) -> rusqlite::Result<Option<Shipment>> {
    let sql = match by {
        By::Id => "SELECT id, order_id, address, status FROM shipments WHERE id = ?1",
        By::OrderId => "SELECT id, order_id, address, status FROM shipments WHERE order_id = ?1",
    };
    conn.query_row(sql, [key], |row| {
        Ok(Shipment {
            id: row.get(0)?,
            order_id: row.get(1)?,
            address: row.get(2)?,
            status: row.get(3)?,
        })
    })
    .optional()
}

fn no_shipment(id: &str) -> Problem {
    Problem::not_found(format!("no shipment {id}"))
}
