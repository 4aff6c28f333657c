//! orders: takes orders and prices them through the catalog service.

use std::collections::{BTreeSet, HashMap};
use std::env;
use std::error::Error as _;
use std::process::ExitCode;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use flotilla_shop::{
    BoxError, Db, JsonBody, PathParam, Problem, exit_code, located, new_id, now_rfc3339,
    serialize_cents, serve, to_cents,
};
use reqwest::Url;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

const SERVICE: &str = "orders";

/// Through the sidecar named in `HTTP_PROXY`, a service is reached by its name alone.
const DEFAULT_CATALOG_URL: &str = "http://catalog";

const CATALOG_TIMEOUT: Duration = Duration::from_secs(5);

/// Tracing headers passed on to the catalog so that one request can be followed across services.
const FORWARDED: [HeaderName; 2] = [
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("traceparent"),
];

const MAX_CUSTOMER_LEN: usize = 200;
const MAX_ITEMS: usize = 100;
const MAX_QTY: i64 = 1000;
const MAX_SKU_LEN: usize = 64;
const LIST_LIMIT: i64 = 100;

const PENDING: &str = "pending";

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
    let catalog = Catalog::from_env()?;
    let db = Db::open("orders.db", SCHEMA)?;
    serve(SERVICE, router(App { db, catalog })).await
}

#[derive(Clone)]
struct App {
    db: Db,
    catalog: Catalog,
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

/// 201 with the new order, priced item by item by the catalog, and its `Location`.
async fn create_order(
    State(app): State<App>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<NewOrder>,
) -> Result<Response, Problem> {
    validate(&req)?;
    let skus = req.items.iter().map(|item| item.sku.clone()).collect();
    let prices = app.catalog.prices(skus, forwarded(&headers)).await?;

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
        status: PENDING.to_owned(),
        created_at: now_rfc3339(),
    };
    let order = app.db.call(move |conn| insert_order(conn, order)).await?;
    let location = format!("/orders/{}", order.id);
    Ok(located(StatusCode::CREATED, location, order))
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

fn forwarded(incoming: &HeaderMap) -> HeaderMap {
    FORWARDED
        .iter()
        .filter_map(|name| Some((name.clone(), incoming.get(name)?.clone())))
        .collect()
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

/// The catalog service, as seen from here.
#[derive(Clone)]
struct Catalog {
    client: reqwest::Client,
    base: Url,
}

#[derive(Debug, Deserialize)]
struct Product {
    price: f64,
}

impl Catalog {
    /// Reads `CATALOG_URL`. The client keeps reqwest's default of honouring `HTTP_PROXY`, which is
    /// how calls to `http://catalog` reach the sidecar.
    fn from_env() -> Result<Self, BoxError> {
        let raw = env::var("CATALOG_URL")
            .ok()
            .filter(|url| !url.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_CATALOG_URL.to_owned());
        let base = Url::parse(raw.trim())
            .ok()
            .filter(|url| url.scheme() == "http" && !url.cannot_be_a_base())
            .ok_or_else(|| format!("CATALOG_URL must be an http:// URL, not {raw:?}"))?;
        let client = reqwest::Client::builder()
            .timeout(CATALOG_TIMEOUT)
            .build()?;
        Ok(Self { client, base })
    }

    fn product_url(&self, sku: &str) -> Url {
        let mut url = self.base.clone();
        // `from_env` only accepts URLs that can be a base, so the segments are always there.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push("products").push(sku);
        }
        url
    }

    /// The price in cents of each SKU, looked up concurrently. Unknown SKUs are a 422 naming
    /// them all; a catalog that cannot answer is a 502 or 503, never a 500.
    async fn prices(
        &self,
        skus: BTreeSet<String>,
        headers: HeaderMap,
    ) -> Result<HashMap<String, i64>, Problem> {
        let mut lookups = JoinSet::new();
        for sku in skus {
            let catalog = self.clone();
            let headers = headers.clone();
            lookups.spawn(async move {
                let price = catalog.price(&sku, headers).await;
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
    async fn price(&self, sku: &str, headers: HeaderMap) -> Result<Option<i64>, Problem> {
        let url = self.product_url(sku);
        let response = self
            .client
            .get(url.clone())
            .headers(headers)
            .send()
            .await
            .map_err(|err| {
                eprintln!("GET {url} failed: {}", error_chain(&err));
                let why = if err.is_timeout() {
                    "timed out"
                } else {
                    "could not be reached"
                };
                unavailable(StatusCode::SERVICE_UNAVAILABLE, why)
            })?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            status if status.is_success() => {
                let product: Product = response.json().await.map_err(|err| {
                    eprintln!("GET {url}: unusable product: {}", error_chain(&err));
                    unavailable(StatusCode::BAD_GATEWAY, "answered with an unusable product")
                })?;
                to_cents(product.price).map(Some).ok_or_else(|| {
                    eprintln!("GET {url}: invalid price {}", product.price);
                    unavailable(StatusCode::BAD_GATEWAY, "answered with an invalid price")
                })
            }
            status => {
                eprintln!("GET {url} answered {status}");
                // The sidecar says 503/504 when no catalog instance can take the call: a retry
                // may succeed, unlike after a broken answer.
                let ours = match status {
                    StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
                    | StatusCode::TOO_MANY_REQUESTS => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::BAD_GATEWAY,
                };
                Err(unavailable(ours, &format!("answered {status}")))
            }
        }
    }
}

fn unavailable(status: StatusCode, why: &str) -> Problem {
    Problem::new(status, format!("catalog unavailable: the catalog {why}"))
}

/// The error and its causes on one line: reqwest's own message rarely says what went wrong.
fn error_chain(err: &reqwest::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
