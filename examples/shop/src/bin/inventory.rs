//! inventory: stock per SKU, and reservations that hold stock for an order until released.

use std::collections::BTreeMap;
use std::process::ExitCode;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use flotilla_shop::{
    BoxError, Db, JsonBody, PathParam, Problem, QueryParam, exit_code, idempotent, located, new_id,
    serve,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

const SERVICE: &str = "inventory";

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS stock (
        sku       TEXT PRIMARY KEY,
        available INTEGER NOT NULL CHECK (available >= 0),
        reserved  INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0)
    );
    CREATE TABLE IF NOT EXISTS reservations (
        id       TEXT PRIMARY KEY,
        order_id TEXT NOT NULL UNIQUE,
        status   TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS reservation_items (
        reservation_id TEXT NOT NULL REFERENCES reservations (id),
        line           INTEGER NOT NULL,
        sku            TEXT NOT NULL,
        qty            INTEGER NOT NULL,
        PRIMARY KEY (reservation_id, line)
    );
";

/// The catalog's products. The espresso machine is scarce on purpose, so that running out of
/// stock is easy to try.
const SEED: [(&str, i64); 6] = [
    ("TEA-001", 100),
    ("MUG-002", 100),
    ("KETTLE-003", 100),
    ("GRINDER-004", 100),
    ("ESPRESSO-005", 5),
    ("BEANS-006", 100),
];

/// Caps one line's quantity so that no sum of quantities can overflow.
const MAX_QTY: i64 = 1_000_000;

const RESERVED: &str = "reserved";
const RELEASED: &str = "released";

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(SERVICE, run().await)
}

async fn run() -> Result<(), BoxError> {
    let db = Db::open("inventory.db", SCHEMA)?;
    db.blocking(seed)?;
    serve(SERVICE, router(db)?).await
}

fn router(db: Db) -> Result<Router, BoxError> {
    let routes = Router::new()
        .route("/stock", get(list_stock))
        .route("/stock/{sku}", get(get_stock))
        .route("/reservations", get(list_reservations).post(reserve))
        .route("/reservations/{id}", get(get_reservation).delete(release))
        .with_state(db.clone());
    idempotent(routes, &db)
}

/// Stocks the shelves on the very first start only, so restocking or selling out survives
/// restarts.
fn seed(conn: &mut Connection) -> rusqlite::Result<()> {
    // Immediate, so that replicas starting together cannot both find the table empty.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let empty: bool = tx.query_row("SELECT NOT EXISTS (SELECT 1 FROM stock)", [], |row| {
        row.get(0)
    })?;
    if empty {
        for (sku, available) in SEED {
            tx.execute(
                "INSERT INTO stock (sku, available) VALUES (?1, ?2)",
                params![sku, available],
            )?;
        }
    }
    tx.commit()
}

#[derive(Debug, Serialize)]
struct Stock {
    sku: String,
    available: i64,
    reserved: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Item {
    sku: String,
    qty: i64,
}

#[derive(Debug, Deserialize)]
struct NewReservation {
    order_id: String,
    items: Vec<Item>,
}

#[derive(Debug, Serialize)]
struct Reservation {
    id: String,
    order_id: String,
    items: Vec<Item>,
    status: String,
}

async fn list_stock(State(db): State<Db>) -> Result<Json<Vec<Stock>>, Problem> {
    let stock = db
        .call(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT sku, available, reserved FROM stock ORDER BY sku")?;
            let rows = stmt.query_map([], stock_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?;
    Ok(Json(stock))
}

async fn get_stock(
    State(db): State<Db>,
    PathParam(sku): PathParam<String>,
) -> Result<Json<Stock>, Problem> {
    let stock = db
        .call(move |conn| {
            conn.query_row(
                "SELECT sku, available, reserved FROM stock WHERE sku = ?1",
                [&sku],
                stock_from_row,
            )
            .optional()?
            .ok_or_else(|| Problem::not_found(format!("no stock entry for sku {sku}")))
        })
        .await?;
    Ok(Json(stock))
}

fn stock_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Stock> {
    Ok(Stock {
        sku: row.get(0)?,
        available: row.get(1)?,
        reserved: row.get(2)?,
    })
}

/// Reserves every item or none: 201 with the new reservation, 200 with the existing one when the
/// order already has one, 409 when any item lacks stock, 422 for an unknown SKU.
async fn reserve(
    State(db): State<Db>,
    JsonBody(req): JsonBody<NewReservation>,
) -> Result<Response, Problem> {
    validate(&req)?;
    let (status, reservation) = db.call(move |conn| reserve_stock(conn, req)).await?;
    let location = format!("/reservations/{}", reservation.id);
    Ok(located(status, location, reservation))
}

fn validate(req: &NewReservation) -> Result<(), Problem> {
    if req.order_id.trim().is_empty() {
        return Err(Problem::unprocessable("order_id must not be empty"));
    }
    if req.items.is_empty() {
        return Err(Problem::unprocessable("items must not be empty"));
    }
    for (i, item) in req.items.iter().enumerate() {
        if item.sku.trim().is_empty() {
            return Err(Problem::unprocessable(format!(
                "items[{i}].sku must not be empty"
            )));
        }
        if !(1..=MAX_QTY).contains(&item.qty) {
            return Err(Problem::unprocessable(format!(
                "items[{i}].qty must be between 1 and {MAX_QTY}, not {}",
                item.qty
            )));
        }
    }
    Ok(())
}

fn reserve_stock(
    conn: &mut Connection,
    req: NewReservation,
) -> Result<(StatusCode, Reservation), Problem> {
    // Immediate takes the write lock up front: checking stock and taking it must not interleave
    // with another replica doing the same.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(existing) = find_reservation(&tx, By::OrderId, &req.order_id)? {
        return Ok((StatusCode::OK, existing));
    }

    // An order may list a SKU on several lines; stock is checked against their sum.
    let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
    for item in &req.items {
        *wanted.entry(item.sku.clone()).or_default() += item.qty;
    }
    let mut unknown = Vec::new();
    let mut short = Vec::new();
    for (sku, &qty) in &wanted {
        let available: Option<i64> = tx
            .query_row("SELECT available FROM stock WHERE sku = ?1", [sku], |row| {
                row.get(0)
            })
            .optional()?;
        match available {
            None => unknown.push(sku.as_str()),
            Some(available) if available < qty => {
                short.push(format!("{sku} (requested {qty}, available {available})"));
            }
            Some(_) => {}
        }
    }
    if !unknown.is_empty() {
        return Err(Problem::unprocessable(format!(
            "unknown sku: {}",
            unknown.join(", ")
        )));
    }
    if !short.is_empty() {
        return Err(Problem::conflict(format!(
            "insufficient stock for {}",
            short.join(", ")
        )));
    }

    for (sku, qty) in &wanted {
        tx.execute(
            "UPDATE stock SET available = available - ?2, reserved = reserved + ?2 WHERE sku = ?1",
            params![sku, qty],
        )?;
    }
    let reservation = Reservation {
        id: new_id("res"),
        order_id: req.order_id,
        items: req.items,
        status: RESERVED.to_owned(),
    };
    tx.execute(
        "INSERT INTO reservations (id, order_id, status) VALUES (?1, ?2, ?3)",
        params![reservation.id, reservation.order_id, reservation.status],
    )?;
    for (line, item) in reservation.items.iter().enumerate() {
        tx.execute(
            "INSERT INTO reservation_items (reservation_id, line, sku, qty) VALUES (?1, ?2, ?3, ?4)",
            params![reservation.id, line, item.sku, item.qty],
        )?;
    }
    tx.commit()?;
    Ok((StatusCode::CREATED, reservation))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    order_id: String,
}

/// `?order_id=X`: the order's reservation as a list of zero or one, so that "none" is an
/// ordinary answer rather than a 404.
async fn list_reservations(
    State(db): State<Db>,
    QueryParam(query): QueryParam<ListQuery>,
) -> Result<Json<Vec<Reservation>>, Problem> {
    let reservations = db
        .call(move |conn| Ok(find_reservation(conn, By::OrderId, &query.order_id)?))
        .await?;
    Ok(Json(reservations.into_iter().collect()))
}

async fn get_reservation(
    State(db): State<Db>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Reservation>, Problem> {
    let reservation = db
        .call(move |conn| find_reservation(conn, By::Id, &id)?.ok_or_else(|| no_reservation(&id)))
        .await?;
    Ok(Json(reservation))
}

/// Puts the reservation's stock back. Releasing again changes nothing and answers the same.
async fn release(
    State(db): State<Db>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Reservation>, Problem> {
    let reservation = db.call(move |conn| release_stock(conn, &id)).await?;
    Ok(Json(reservation))
}

fn release_stock(conn: &mut Connection, id: &str) -> Result<Reservation, Problem> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut reservation = find_reservation(&tx, By::Id, id)?.ok_or_else(|| no_reservation(id))?;
    if reservation.status == RESERVED {
        for item in &reservation.items {
            tx.execute(
                "UPDATE stock SET available = available + ?2, reserved = reserved - ?2 WHERE sku = ?1",
                params![item.sku, item.qty],
            )?;
        }
        tx.execute(
            "UPDATE reservations SET status = ?2 WHERE id = ?1",
            params![id, RELEASED],
        )?;
        tx.commit()?;
        reservation.status = RELEASED.to_owned();
    }
    Ok(reservation)
}

enum By {
    Id,
    OrderId,
}

fn find_reservation(conn: &Connection, by: By, key: &str) -> rusqlite::Result<Option<Reservation>> {
    let sql = match by {
        By::Id => "SELECT id, order_id, status FROM reservations WHERE id = ?1",
        By::OrderId => "SELECT id, order_id, status FROM reservations WHERE order_id = ?1",
    };
    let Some((id, order_id, status)) = conn
        .query_row(sql, [key], |row| {
            Ok((row.get::<_, String>(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT sku, qty FROM reservation_items WHERE reservation_id = ?1 ORDER BY line",
    )?;
    let items = stmt
        .query_map([&id], |row| {
            Ok(Item {
                sku: row.get(0)?,
                qty: row.get(1)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(Reservation {
        id,
        order_id,
        items,
        status,
    }))
}

fn no_reservation(id: &str) -> Problem {
    Problem::not_found(format!("no reservation {id}"))
}
