//! orders: takes orders through the other services, synchronously: prices every item at the
//! catalog, reserves the stock at inventory, authorizes the payment at payments, creates the
//! shipment at shipping, and only then stores the order as confirmed. When a step fails, the
//! steps already done are undone in reverse (best effort) and nothing is stored.
//!
//! Each step and its compensation is a small function of its own, so that the flow can move to
//! the saga coordinator as it is.

use std::collections::{BTreeSet, HashMap};
use std::env;
use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use flotilla_shop::{
    BoxError, CallError, Db, Dependency, JsonBody, PathParam, Problem, exit_code, from_cents,
    located, new_id, now_rfc3339, serialize_cents, serve, to_cents, trace_headers,
};
use rusqlite::{Connection, OptionalExtension, params};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinSet;

const SERVICE: &str = "orders";

/// How long one call to another service may take, body included, unless `DEPENDENCY_TIMEOUT`
/// says otherwise. An order makes at most seven rounds of calls in a row (the concurrent price
/// lookups, three steps, up to three compensations), so it is answered within seven of these.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

const MAX_CUSTOMER_LEN: usize = 200;
const MAX_ITEMS: usize = 100;
const MAX_QTY: i64 = 1000;
const MAX_SKU_LEN: usize = 64;
const LIST_LIMIT: i64 = 100;

const CONFIRMED: &str = "confirmed";

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS orders (
        seq         INTEGER PRIMARY KEY,
        id          TEXT NOT NULL UNIQUE,
        customer    TEXT NOT NULL,
        total_cents INTEGER NOT NULL,
        status      TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS order_items (
        order_id    TEXT NOT NULL REFERENCES orders (id),
        line        INTEGER NOT NULL,
        sku         TEXT NOT NULL,
        qty         INTEGER NOT NULL,
        price_cents INTEGER NOT NULL,
        PRIMARY KEY (order_id, line)
    );
";

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(SERVICE, run().await)
}

async fn run() -> Result<(), BoxError> {
    let deps = Arc::new(Deps::from_env()?);
    let db = Db::open("orders.db", SCHEMA)?;
    serve(SERVICE, router(App { db, deps })).await
}

#[derive(Clone)]
struct App {
    db: Db,
    deps: Arc<Deps>,
}

/// The services an order goes through.
struct Deps {
    catalog: Dependency,
    inventory: Dependency,
    payments: Dependency,
    shipping: Dependency,
    /// Flotilla's own API, for publishing the order's events.
    flotilla: Dependency,
}

impl Deps {
    /// Each is reached as `http://<name>` through the sidecar, unless `<NAME>_URL` names another
    /// base URL (tests point them at services they started).
    fn from_env() -> Result<Self, BoxError> {
        let timeout = timeout_from_env()?;
        Ok(Self {
            catalog: Dependency::from_env("catalog", "CATALOG_URL", timeout)?,
            inventory: Dependency::from_env("inventory", "INVENTORY_URL", timeout)?,
            payments: Dependency::from_env("payments", "PAYMENTS_URL", timeout)?,
            shipping: Dependency::from_env("shipping", "SHIPPING_URL", timeout)?,
            flotilla: Dependency::from_env("flotilla", "FLOTILLA_URL", timeout)?,
        })
    }
}

fn timeout_from_env() -> Result<Duration, BoxError> {
    let Some(raw) = env::var("DEPENDENCY_TIMEOUT")
        .ok()
        .filter(|raw| !raw.trim().is_empty())
    else {
        return Ok(DEFAULT_TIMEOUT);
    };
    humantime::parse_duration(raw.trim())
        .ok()
        .filter(|timeout| !timeout.is_zero())
        .ok_or_else(|| {
            format!("DEPENDENCY_TIMEOUT must be a positive duration such as 10s, not {raw:?}")
                .into()
        })
}

fn router(app: App) -> Router {
    Router::new()
        .route("/orders", get(list_orders).post(create_order))
        .route("/orders/{id}", get(get_order))
        .with_state(app)
}

#[derive(Debug, Deserialize)]
struct NewOrder {
    customer: String,
    items: Vec<NewItem>,
}

#[derive(Debug, Deserialize)]
struct NewItem {
    sku: String,
    qty: i64,
}

#[derive(Debug, Serialize)]
struct Order {
    id: String,
    customer: String,
    items: Vec<OrderItem>,
    #[serde(rename = "total", serialize_with = "serialize_cents")]
    total_cents: i64,
    status: String,
    created_at: String,
}

#[derive(Debug, Serialize)]
struct OrderItem {
    sku: String,
    qty: i64,
    #[serde(rename = "price", serialize_with = "serialize_cents")]
    price_cents: i64,
}

/// 201 with the confirmed order and its `Location`, once every service has done its part.
///
/// Failures are problems: 422 for an unknown SKU, 409 when stock is short, 402 when the payment
/// is declined, 503 when a service cannot answer (502 when its answer is unusable), each naming
/// the service; nothing is stored then, and what was done elsewhere is undone.
async fn create_order(
    State(app): State<App>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<NewOrder>,
) -> Result<Response, Problem> {
    validate(&req)?;
    let trace = trace_headers(&headers);
    let skus = req.items.iter().map(|item| item.sku.clone()).collect();
    let prices = prices(&app.deps.catalog, skus, &trace).await?;

    let items = req
        .items
        .into_iter()
        .map(|item| {
            // `prices` fails unless it priced every SKU, so a miss here is our own bug.
            let price_cents = *prices.get(&item.sku).ok_or_else(Problem::internal)?;
            Ok(OrderItem {
                sku: item.sku,
                qty: item.qty,
                price_cents,
            })
        })
        .collect::<Result<Vec<_>, Problem>>()?;
    // Bounded prices, quantities and item counts keep this sum far from overflowing.
    let total_cents = items.iter().map(|item| item.price_cents * item.qty).sum();
    let order = Order {
        id: new_id("ord"),
        customer: req.customer.trim().to_owned(),
        items,
        total_cents,
        status: CONFIRMED.to_owned(),
        created_at: now_rfc3339(),
    };
    // From the first reservation on, the order runs in a task of its own: were the client to hang
    // up, the handler would be dropped mid-way and leave stock held or a payment authorized. The
    // handler still awaits it, so a graceful stop waits for it too.
    let order = tokio::spawn(async move { take(&app, order, &trace).await })
        .await
        .unwrap_or_else(|err| {
            eprintln!("order task failed: {err}");
            Err(Problem::internal())
        })?;
    let location = format!("/orders/{}", order.id);
    Ok(located(StatusCode::CREATED, location, order))
}

/// A step of an order that is done, and how to undo it.
#[derive(Debug)]
enum Done {
    Reserved { reservation: String },
    Paid { payment: String },
    Shipped { shipment: String },
}

impl fmt::Display for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Done::Reserved { reservation } => write!(f, "reservation {reservation}"),
            Done::Paid { payment } => write!(f, "payment {payment}"),
            Done::Shipped { shipment } => write!(f, "shipment {shipment}"),
        }
    }
}

/// The resource a step created elsewhere; only its id matters here.
#[derive(Debug, Deserialize)]
struct Created {
    id: String,
}

/// Runs the steps, then stores the order; on any failure, undoes what was done and returns the
/// failure.
async fn take(app: &App, order: Order, trace: &HeaderMap) -> Result<Order, Problem> {
    let id = order.id.clone();
    publish(&app.deps, "order.placed", &id, order_data(&order), trace).await;
    let total_cents = order.total_cents;
    let mut done = Vec::new();
    let outcome = steps(app, order, trace, &mut done).await;
    match &outcome {
        Ok(order) => {
            publish(&app.deps, "order.confirmed", &id, order_data(order), trace).await;
        }
        Err(problem) => {
            if !done.is_empty() {
                eprintln!("order {id} failed ({problem}); undoing what was done");
            }
            undo(&app.deps, &id, done, trace).await;
            let data = json!({ "order": id, "total": from_cents(total_cents), "reason": problem.to_string() });
            publish(&app.deps, "order.cancelled", &id, data, trace).await;
        }
    }
    outcome
}

fn order_data(order: &Order) -> serde_json::Value {
    json!({
        "order": order.id,
        "customer": order.customer,
        "total": from_cents(order.total_cents),
        "items": order.items.iter().map(|i| json!({ "sku": i.sku, "qty": i.qty })).collect::<Vec<_>>(),
    })
}

/// Announces what happened to an order as a CloudEvent, through the sidecar; subject and
/// partition key are the order id, so one order's events stay in order. The order's answer does
/// not wait on the announcement's fate: a failure is logged (an outbox table would make it
/// exactly-once with the order's own write; the saga issue brings that).
async fn publish(
    deps: &Deps,
    topic: &str,
    order_id: &str,
    data: serde_json::Value,
    trace: &HeaderMap,
) {
    let event = json!({
        "specversion": "1.0",
        "type": topic,
        "subject": order_id,
        "datacontenttype": "application/json",
        "data": data,
    });
    let published: Result<IgnoredAny, CallError> = deps
        .flotilla
        .post_json(&["v1", "topics", topic, "events"], &event, trace)
        .await;
    if let Err(err) = published {
        eprintln!("order {order_id}: could not publish {topic}: {err}");
    }
}

async fn steps(
    app: &App,
    order: Order,
    trace: &HeaderMap,
    done: &mut Vec<Done>,
) -> Result<Order, Problem> {
    let reservation = reserve(&app.deps.inventory, &order, trace).await?;
    done.push(Done::Reserved { reservation });
    let payment = authorize(&app.deps.payments, &order, trace).await?;
    done.push(Done::Paid { payment });
    let shipment = ship(&app.deps.shipping, &order, trace).await?;
    done.push(Done::Shipped { shipment });
    app.db.call(move |conn| insert_order(conn, order)).await
}

/// Holds the stock of every item; 409 when any is short and 422 for a SKU inventory does not
/// stock pass on to the client. Idempotent per order.
async fn reserve(
    inventory: &Dependency,
    order: &Order,
    trace: &HeaderMap,
) -> Result<String, Problem> {
    let items: Vec<_> = order
        .items
        .iter()
        .map(|item| json!({ "sku": item.sku, "qty": item.qty }))
        .collect();
    let body = json!({ "order_id": order.id, "items": items });
    let created: Created = inventory
        .post_json(&["reservations"], &body, trace)
        .await
        .map_err(|err| err.passing(&[StatusCode::CONFLICT, StatusCode::UNPROCESSABLE_ENTITY]))?;
    Ok(created.id)
}

/// Authorizes the total; 402 when declined. Idempotent per order.
async fn authorize(
    payments: &Dependency,
    order: &Order,
    trace: &HeaderMap,
) -> Result<String, Problem> {
    let body = json!({ "order_id": order.id, "amount": from_cents(order.total_cents) });
    let created: Created = payments
        .post_json(&["payments"], &body, trace)
        .await
        .map_err(|err| err.passing(&[StatusCode::PAYMENT_REQUIRED]))?;
    Ok(created.id)
}

/// Creates the shipment. Idempotent per order.
async fn ship(shipping: &Dependency, order: &Order, trace: &HeaderMap) -> Result<String, Problem> {
    let body = json!({ "order_id": order.id });
    let created: Created = shipping.post_json(&["shipments"], &body, trace).await?;
    Ok(created.id)
}

/// Undoes `done` in reverse, each step independently of the others' outcome. A compensation
/// that fails is logged, never answered: the client's answer is about the step that failed.
///
/// A step whose outcome is unknown (it timed out) is not in `done`, so what it may have created
/// stays; the saga coordinator will retry such steps by their idempotent request.
async fn undo(deps: &Deps, order_id: &str, done: Vec<Done>, trace: &HeaderMap) {
    for step in done.into_iter().rev() {
        let outcome: Result<IgnoredAny, CallError> = match &step {
            Done::Reserved { reservation } => {
                deps.inventory
                    .delete(&["reservations", reservation], trace)
                    .await
            }
            Done::Paid { payment } => {
                deps.payments
                    .post(&["payments", payment, "refund"], trace)
                    .await
            }
            Done::Shipped { shipment } => {
                deps.shipping.delete(&["shipments", shipment], trace).await
            }
        };
        if let Err(err) = outcome {
            eprintln!("order {order_id}: could not undo {step}, left for repair: {err}");
        }
    }
}

fn validate(req: &NewOrder) -> Result<(), Problem> {
    let customer = req.customer.trim();
    if customer.is_empty() {
        return Err(Problem::unprocessable("customer must not be empty"));
    }
    if customer.chars().count() > MAX_CUSTOMER_LEN {
        return Err(Problem::unprocessable(format!(
            "customer must be at most {MAX_CUSTOMER_LEN} characters"
        )));
    }
    if req.items.is_empty() {
        return Err(Problem::unprocessable("items must not be empty"));
    }
    if req.items.len() > MAX_ITEMS {
        return Err(Problem::unprocessable(format!(
            "an order holds at most {MAX_ITEMS} items, not {}",
            req.items.len()
        )));
    }
    for (i, item) in req.items.iter().enumerate() {
        // The SKU becomes a path segment of the catalog URL; a plain alphabet keeps it one
        // segment, whatever the client sends.
        let sku_ok = (1..=MAX_SKU_LEN).contains(&item.sku.len())
            && item
                .sku
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !sku_ok {
            return Err(Problem::unprocessable(format!(
                "items[{i}].sku must be 1 to {MAX_SKU_LEN} letters, digits, '-' or '_', not {:?}",
                item.sku
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

fn insert_order(conn: &mut Connection, order: Order) -> Result<Order, Problem> {
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO orders (id, customer, total_cents, status, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            order.id,
            order.customer,
            order.total_cents,
            order.status,
            order.created_at
        ],
    )?;
    for (line, item) in order.items.iter().enumerate() {
        tx.execute(
            "INSERT INTO order_items (order_id, line, sku, qty, price_cents)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![order.id, line, item.sku, item.qty, item.price_cents],
        )?;
    }
    tx.commit()?;
    Ok(order)
}

async fn get_order(
    State(app): State<App>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Order>, Problem> {
    let order = app
        .db
        .call(move |conn| {
            let order = conn
                .query_row(
                    "SELECT id, customer, total_cents, status, created_at FROM orders WHERE id = ?1",
                    [&id],
                    order_from_row,
                )
                .optional()?
                .ok_or_else(|| Problem::not_found(format!("no order {id}")))?;
            Ok(with_items(conn, order)?)
        })
        .await?;
    Ok(Json(order))
}

/// The latest orders, most recent first.
async fn list_orders(State(app): State<App>) -> Result<Json<Vec<Order>>, Problem> {
    let orders = app
        .db
        .call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, customer, total_cents, status, created_at FROM orders
                 ORDER BY seq DESC LIMIT ?1",
            )?;
            let orders = stmt
                .query_map([LIST_LIMIT], order_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(orders
                .into_iter()
                .map(|order| with_items(conn, order))
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?;
    Ok(Json(orders))
}

/// An order without its items yet; see [`with_items`].
fn order_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Order> {
    Ok(Order {
        id: row.get(0)?,
        customer: row.get(1)?,
        items: Vec::new(),
        total_cents: row.get(2)?,
        status: row.get(3)?,
        created_at: row.get(4)?,
    })
}

fn with_items(conn: &Connection, mut order: Order) -> rusqlite::Result<Order> {
    let mut stmt = conn.prepare_cached(
        "SELECT sku, qty, price_cents FROM order_items WHERE order_id = ?1 ORDER BY line",
    )?;
    order.items = stmt
        .query_map([&order.id], |row| {
            Ok(OrderItem {
                sku: row.get(0)?,
                qty: row.get(1)?,
                price_cents: row.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(order)
}

#[derive(Debug, Deserialize)]
struct Product {
    price: f64,
}

/// The price in cents of each SKU, looked up concurrently. Unknown SKUs are a 422 naming them
/// all; a catalog that cannot answer is a 503 or 502, never a 500.
async fn prices(
    catalog: &Dependency,
    skus: BTreeSet<String>,
    trace: &HeaderMap,
) -> Result<HashMap<String, i64>, Problem> {
    let mut lookups = JoinSet::new();
    for sku in skus {
        let catalog = catalog.clone();
        let trace = trace.clone();
        lookups.spawn(async move {
            let price = price(&catalog, &sku, &trace).await;
            (sku, price)
        });
    }
    let mut prices = HashMap::new();
    let mut unknown = BTreeSet::new();
    while let Some(joined) = lookups.join_next().await {
        let (sku, price) = joined.map_err(|err| {
            eprintln!("catalog lookup task failed: {err}");
            Problem::internal()
        })?;
        // Returning early drops the set, which cancels the lookups still running.
        match price? {
            Some(cents) => {
                prices.insert(sku, cents);
            }
            None => {
                unknown.insert(sku);
            }
        }
    }
    if !unknown.is_empty() {
        let unknown: Vec<_> = unknown.into_iter().collect();
        return Err(Problem::unprocessable(format!(
            "unknown sku: {}",
            unknown.join(", ")
        )));
    }
    Ok(prices)
}

/// `Ok(None)` when the catalog does not know the SKU.
async fn price(catalog: &Dependency, sku: &str, trace: &HeaderMap) -> Result<Option<i64>, Problem> {
    let product: Product = match catalog.get(&["products", sku], trace).await {
        Ok(product) => product,
        Err(err) if err.refused_with() == Some(StatusCode::NOT_FOUND) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    to_cents(product.price).map(Some).ok_or_else(|| {
        eprintln!("catalog: invalid price {} for {sku}", product.price);
        Problem::new(
            StatusCode::BAD_GATEWAY,
            "catalog unavailable: catalog answered with an invalid price",
        )
    })
}
