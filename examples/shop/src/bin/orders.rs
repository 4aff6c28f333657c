//! orders: takes orders, and leaves their fulfilment to the `place-order` saga that Flotilla
//! runs (declared in `flotilla.toml`): reserve the stock at inventory, authorize the payment at
//! payments, create the shipment at shipping, and confirm the order here; on a permanent failure
//! the orchestrator undoes the steps done, in reverse.
//!
//! `POST /orders` prices the items at the catalog, stores the order `pending`, starts the saga
//! (keyed by the order id, so a retry cannot start two) and long-polls it for up to `ORDER_WAIT`,
//! so that most clients get the outcome in one call: 201 confirmed, a problem when it failed, or
//! 202 with the pending order when the saga is still at work. The saga's last step confirms the
//! order (`POST /orders/{id}/confirm`); a saga that gives up is announced on `saga.compensated` or
//! `saga.failed`, which Flotilla pushes to `POST /events/saga-finished`, cancelling the order.
//!
//! Every status change writes its event (`order.placed`, `order.confirmed`, `order.cancelled`) to
//! an outbox table in the same transaction; a background task publishes the outbox through the
//! sidecar, so an event is never lost nor announced for a change that did not happen.

use std::collections::{BTreeSet, HashMap};
use std::env;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_shop::idempotency::IDEMPOTENCY_KEY;
use flotilla_shop::{
    BoxError, CallError, Db, Dependency, JsonBody, PathParam, Problem, exit_code, from_cents,
    idempotent, located, new_id, now_rfc3339, serialize_cents, serve, to_cents, trace_headers,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

const SERVICE: &str = "orders";

/// How long one call to another service may take, body included, unless `DEPENDENCY_TIMEOUT`
/// says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `POST /orders` waits for the saga's outcome, unless `ORDER_WAIT` says otherwise.
const DEFAULT_ORDER_WAIT: Duration = Duration::from_secs(10);

/// What the call that long-polls the saga may take beyond the wait itself: the orchestrator
/// answers at the end of the wait, and the answer must still have time to arrive.
const WAIT_MARGIN: Duration = Duration::from_secs(5);

/// The saga that fulfils an order, as `flotilla.toml` declares it.
const SAGA: &str = "place-order";

const MAX_CUSTOMER_LEN: usize = 200;
const MAX_ITEMS: usize = 100;
const MAX_QTY: i64 = 1000;
const MAX_SKU_LEN: usize = 64;
const MAX_REASON_LEN: usize = 500;
const LIST_LIMIT: i64 = 100;

/// An order's life: `pending` until its saga confirms it or gives up on it, then `confirmed` or
/// `cancelled` for good.
const PENDING: &str = "pending";
const CONFIRMED: &str = "confirmed";
const CANCELLED: &str = "cancelled";

/// An order still `pending` this long after it was placed may have lost its saga start: orders
/// stopped between storing it and starting the saga.
const STRANDED_AFTER: Duration = Duration::from_secs(60);
/// How often orders looks for such orders.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// The outbox drainer looks for events this often even when nobody woke it: another replica
/// sharing the database may have written them, or a publish may have failed.
const OUTBOX_POLL: Duration = Duration::from_secs(1);
/// How many events one round of the drainer reads.
const OUTBOX_BATCH: i64 = 50;
/// The drainer's pause after a failed publish: doubled at each failure in a row, up to the max.
const OUTBOX_BACKOFF_MIN: Duration = Duration::from_millis(200);
const OUTBOX_BACKOFF_MAX: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS orders (
        seq         INTEGER PRIMARY KEY,
        id          TEXT NOT NULL UNIQUE,
        customer    TEXT NOT NULL,
        total_cents INTEGER NOT NULL,
        status      TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        reason      TEXT
    );
    CREATE TABLE IF NOT EXISTS order_items (
        order_id    TEXT NOT NULL REFERENCES orders (id),
        line        INTEGER NOT NULL,
        sku         TEXT NOT NULL,
        qty         INTEGER NOT NULL,
        price_cents INTEGER NOT NULL,
        PRIMARY KEY (order_id, line)
    );
    -- Events to publish, written with the change they announce; deleted once Flotilla has them.
    CREATE TABLE IF NOT EXISTS outbox (
        seq         INTEGER PRIMARY KEY,
        id          TEXT NOT NULL UNIQUE,
        topic       TEXT NOT NULL,
        subject     TEXT NOT NULL,
        data        TEXT NOT NULL,
        time        TEXT NOT NULL,
        traceparent TEXT
    );
";

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(SERVICE, run().await)
}

async fn run() -> Result<(), BoxError> {
    let deps = Arc::new(Deps::from_env()?);
    let db = Db::open("orders.db", SCHEMA)?;
    db.blocking(migrate)?;
    let outbox = Arc::new(Notify::new());

    let (stop, stopped) = watch::channel(false);
    let drainer = tokio::spawn(drain_outbox(
        db.clone(),
        deps.flotilla.clone(),
        Arc::clone(&outbox),
        stopped,
    ));
    let reconciler = tokio::spawn(reconcile(db.clone(), Arc::clone(&deps), stop.subscribe()));
    let app = App { db, deps, outbox };
    let served = match router(app) {
        Ok(router) => serve(SERVICE, router).await,
        Err(err) => Err(err),
    };
    // In-flight requests are done: the drainer finishes the publish at hand and stops. What is
    // left in the outbox is published by the next start, or by another replica.
    let _ = stop.send(true);
    if let Err(err) = drainer.await {
        eprintln!("outbox drainer failed: {err}");
    }
    let _ = reconciler.await;
    served
}

/// Brings a database of an earlier version up to this one.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let has_reason: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('orders') WHERE name = 'reason')",
        [],
        |row| row.get(0),
    )?;
    if !has_reason {
        conn.execute("ALTER TABLE orders ADD COLUMN reason TEXT", [])?;
    }
    Ok(())
}

#[derive(Clone)]
struct App {
    db: Db,
    deps: Arc<Deps>,
    /// Wakes the outbox drainer after a commit that wrote events.
    outbox: Arc<Notify>,
}

/// What orders calls: the catalog for prices, and Flotilla for sagas and events.
struct Deps {
    catalog: Dependency,
    /// Flotilla's API, for publishing events.
    flotilla: Dependency,
    /// Flotilla's API again, with a timeout that outlasts the long poll of a saga.
    sagas: Dependency,
    /// How long `POST /orders` waits for the saga.
    wait: Duration,
}

impl Deps {
    /// Each is reached as `http://<name>` through the sidecar, unless `<NAME>_URL` names another
    /// base URL (tests point them at processes they started).
    fn from_env() -> Result<Self, BoxError> {
        let timeout = duration_from_env("DEPENDENCY_TIMEOUT", DEFAULT_TIMEOUT)?;
        let wait = duration_from_env("ORDER_WAIT", DEFAULT_ORDER_WAIT)?;
        Ok(Self {
            catalog: Dependency::from_env("catalog", "CATALOG_URL", timeout)?,
            flotilla: Dependency::from_env("flotilla", "FLOTILLA_URL", timeout)?,
            sagas: Dependency::from_env("flotilla", "FLOTILLA_URL", wait + WAIT_MARGIN)?,
            wait,
        })
    }
}

fn duration_from_env(var: &str, default: Duration) -> Result<Duration, BoxError> {
    let Some(raw) = env::var(var).ok().filter(|raw| !raw.trim().is_empty()) else {
        return Ok(default);
    };
    humantime::parse_duration(raw.trim())
        .ok()
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| format!("{var} must be a positive duration such as 10s, not {raw:?}").into())
}

fn router(app: App) -> Result<Router, BoxError> {
    let db = app.db.clone();
    let routes = Router::new()
        .route("/orders", get(list_orders).post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/confirm", post(confirm_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .route("/events/saga-finished", post(saga_finished))
        .with_state(app);
    idempotent(routes, &db)
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

#[derive(Debug, Clone, Serialize)]
struct Order {
    id: String,
    customer: String,
    items: Vec<OrderItem>,
    #[serde(rename = "total", serialize_with = "serialize_cents")]
    total_cents: i64,
    status: String,
    /// Why the order was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    created_at: String,
}

#[derive(Debug, Clone, Serialize)]
struct OrderItem {
    sku: String,
    qty: i64,
    #[serde(rename = "price", serialize_with = "serialize_cents")]
    price_cents: i64,
}

/// 201 with the confirmed order and its `Location` once the saga completed; 202 with the pending
/// order when it is still running after `ORDER_WAIT` (poll the `Location`).
///
/// Failures are problems: 422 for an unknown SKU before anything is stored; once the order is
/// stored and its saga gave up, the order is cancelled and the failing step's 402 (declined),
/// 409 (out of stock) or 422 is passed on with its service's detail, anything else is a 503
/// naming the service. A 503 too when the saga cannot be started, and the order is cancelled.
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
        status: PENDING.to_owned(),
        reason: None,
        created_at: now_rfc3339(),
    };
    // From the insert on, the order runs in a task of its own: were the client to hang up, the
    // handler would be dropped mid-way and could leave a pending order without a saga. The
    // handler still awaits it, so a graceful stop waits for it too.
    tokio::spawn(async move { place(&app, order, &trace).await })
        .await
        .unwrap_or_else(|err| {
            eprintln!("order task failed: {err}");
            Err(Problem::internal())
        })
}

/// The saga as the orchestrator describes it; only what orders needs.
#[derive(Debug, Deserialize)]
struct Saga {
    id: String,
    status: String,
    #[serde(default)]
    error: Option<SagaError>,
}

/// Why a saga gave up: the step, the status its service answered (none for a transport error or
/// a timeout), and the service's problem detail or the transport error.
#[derive(Debug, Default, Deserialize)]
struct SagaError {
    #[serde(default)]
    step: Option<String>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    message: Option<String>,
}

/// Stores the order, starts its saga and waits for the outcome.
/// The `place-order` saga's input for `order`.
fn saga_input(order: &Order) -> serde_json::Value {
    json!({
        "order_id": order.id,
        "customer": order.customer,
        "items": order.items.iter().map(|i| json!({ "sku": i.sku, "qty": i.qty })).collect::<Vec<_>>(),
        "total": from_cents(order.total_cents),
    })
}

async fn place(app: &App, order: Order, trace: &HeaderMap) -> Result<Response, Problem> {
    let id = order.id.clone();
    let input = saga_input(&order);
    let traceparent = traceparent(trace);
    let pending = app
        .db
        .call(move |conn| insert_order(conn, order, traceparent.as_deref()))
        .await?;
    app.outbox.notify_one();
    let location = format!("/orders/{id}");

    // Keyed by the order, so that a retry of this very start (ours, or the sidecar's) finds the
    // saga already started instead of fulfilling the order twice.
    let mut headers = trace.clone();
    let key = HeaderValue::from_str(&id).map_err(|_| Problem::internal())?;
    headers.insert(IDEMPOTENCY_KEY, key);
    let started: Result<Saga, CallError> = app
        .deps
        .sagas
        .post_json(&["v1", "sagas", SAGA], &input, &headers)
        .await;
    let saga = match started {
        Ok(saga) => saga,
        Err(err) => {
            eprintln!("order {id}: could not start the {SAGA} saga: {err}");
            let detail = match err {
                CallError::Unavailable(problem) => problem.detail,
                refused @ CallError::Refused { .. } => format!("flotilla unavailable: {refused}"),
            };
            let reason = format!("the order could not be fulfilled: {detail}");
            cancel(app, &id, reason, trace).await?;
            return Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE, detail));
        }
    };

    let wait = wait_param(app.deps.wait);
    let polled: Result<Saga, CallError> = app
        .deps
        .sagas
        .get_query(&["v1", "sagas", &saga.id], &[("wait", &wait)], trace)
        .await;
    let saga = match polled {
        Ok(saga) => saga,
        // The saga runs on without us; the client can follow the order at its `Location`.
        Err(err) => {
            eprintln!("order {id}: could not follow saga {}: {err}", saga.id);
            saga
        }
    };
    match saga.status.as_str() {
        "completed" => {
            let order = read_order(&app.db, id).await?;
            Ok(located(StatusCode::CREATED, location, order))
        }
        "compensated" | "failed" => {
            let problem = saga_problem(saga.error.as_ref(), &saga.status);
            let reason = saga_reason(saga.error.as_ref(), &saga.status);
            cancel(app, &id, reason, trace).await?;
            Err(problem)
        }
        _ => Ok(located(StatusCode::ACCEPTED, location, pending)),
    }
}

/// The long poll's `wait`, in a unit the orchestrator's duration parser reads (`10s`, `1500ms`).
fn wait_param(wait: Duration) -> String {
    let millis = wait.as_millis();
    if millis % 1000 == 0 {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// The service behind each step of the `place-order` saga.
fn step_service(step: &str) -> &str {
    match step {
        "reserve-stock" => "inventory",
        "authorize-payment" => "payments",
        "create-shipment" => "shipping",
        "confirm-order" => "orders",
        other => other,
    }
}

/// The client's answer to a saga that gave up: the step's own refusal when it is one the client
/// can act on (402 declined, 409 out of stock, 422 unknown SKU), else a 503 naming the service.
fn saga_problem(error: Option<&SagaError>, status: &str) -> Problem {
    let Some(error) = error else {
        return Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the {SAGA} saga {status} without saying why"),
        );
    };
    let message = error.message.as_deref().unwrap_or("no detail given");
    let passed = error
        .status
        .and_then(|status| StatusCode::from_u16(status).ok())
        .filter(|status| {
            [
                StatusCode::PAYMENT_REQUIRED,
                StatusCode::CONFLICT,
                StatusCode::UNPROCESSABLE_ENTITY,
            ]
            .contains(status)
        });
    if let Some(status) = passed {
        return Problem::new(status, message);
    }
    let service = error.step.as_deref().map_or(SAGA, step_service);
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{service} unavailable: {message}"),
    )
}

/// What a cancelled order shows as its reason.
fn saga_reason(error: Option<&SagaError>, status: &str) -> String {
    let reason = error
        .and_then(|error| error.message.clone())
        .unwrap_or_else(|| format!("the {SAGA} saga {status}"));
    reason.chars().take(MAX_REASON_LEN).collect()
}

/// `POST /orders/{id}/confirm`, the saga's last step: `pending` -> `confirmed`. Confirming again
/// answers the same; a cancelled order cannot be confirmed (409, which makes the saga compensate).
async fn confirm_order(
    State(app): State<App>,
    headers: HeaderMap,
    PathParam(id): PathParam<String>,
) -> Result<Json<Order>, Problem> {
    let traceparent = traceparent(&headers);
    let (order, changed) = app
        .db
        .call(move |conn| {
            change_status(conn, &id, Change::Confirm, traceparent.as_deref())?
                .ok_or_else(|| no_order(&id))
        })
        .await?;
    if changed {
        app.outbox.notify_one();
    }
    Ok(Json(order))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelRequest {
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /orders/{id}/cancel`, with an optional `{"reason"}`: `pending` -> `cancelled`.
/// Cancelling again answers the same (keeping the first reason); a confirmed order cannot be
/// cancelled (409). A saga still running for the order then fails to confirm it and compensates.
async fn cancel_order(
    State(app): State<App>,
    headers: HeaderMap,
    PathParam(id): PathParam<String>,
    body: Bytes,
) -> Result<Json<Order>, Problem> {
    let req: CancelRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            if err.is_data() {
                Problem::unprocessable(format!("invalid cancellation: {err}"))
            } else {
                Problem::bad_request(format!("malformed JSON: {err}"))
            }
        })?
    };
    let reason = req
        .reason
        .map(|reason| reason.trim().to_owned())
        .filter(|reason| !reason.is_empty())
        .unwrap_or_else(|| "cancelled on request".to_owned());
    if reason.chars().count() > MAX_REASON_LEN {
        return Err(Problem::unprocessable(format!(
            "reason must be at most {MAX_REASON_LEN} characters"
        )));
    }
    let order = cancel(&app, &id, reason, &headers)
        .await?
        .ok_or_else(|| no_order(&id))?;
    Ok(Json(order))
}

/// Cancels order `id` if it is pending; `None` when there is no such order.
async fn cancel(
    app: &App,
    id: &str,
    reason: String,
    headers: &HeaderMap,
) -> Result<Option<Order>, Problem> {
    let id = id.to_owned();
    let traceparent = traceparent(headers);
    let outcome = app
        .db
        .call(move |conn| change_status(conn, &id, Change::Cancel(reason), traceparent.as_deref()))
        .await?;
    if let Some((_, true)) = &outcome {
        app.outbox.notify_one();
    }
    Ok(outcome.map(|(order, _)| order))
}

/// The CloudEvent Flotilla pushes for `saga.compensated` and `saga.failed`, structured mode.
#[derive(Debug, Deserialize)]
struct SagaEvent {
    id: String,
    data: SagaEventData,
}

#[derive(Debug, Deserialize)]
struct SagaEventData {
    #[serde(default)]
    id: String,
    name: String,
    status: String,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    error: Option<SagaError>,
}

/// `POST /events/saga-finished`: a `place-order` saga gave up, so its order is cancelled with the
/// saga's error as the reason. Delivered at least once: a repeat, an order already cancelled, an
/// unknown order and other sagas' events are all acknowledged (2xx), since a retry cannot change
/// them. A malformed event is a 400.
async fn saga_finished(
    State(app): State<App>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, Problem> {
    let event: SagaEvent = serde_json::from_slice(&body)
        .map_err(|err| Problem::bad_request(format!("malformed saga event: {err}")))?;
    let data = event.data;
    if data.name != SAGA || !matches!(data.status.as_str(), "compensated" | "failed") {
        return Ok(Json(json!({ "ignored": true })));
    }
    let order_id = data
        .input
        .get("order_id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| Problem::bad_request("malformed saga event: no data.input.order_id"))?
        .to_owned();
    let reason = saga_reason(data.error.as_ref(), &data.status);
    let outcome = match cancel(&app, &order_id, reason, &headers).await {
        Ok(outcome) => outcome,
        Err(problem) if problem.status == StatusCode::CONFLICT => {
            // Confirmed is final; the saga's own record says what went wrong after that.
            println!(
                "level=warn saga {} of confirmed order {order_id} ended {} (event {})",
                data.id, data.status, event.id
            );
            return Ok(Json(json!({ "order": order_id, "status": CONFIRMED })));
        }
        Err(problem) => return Err(problem),
    };
    match outcome {
        Some(order) => Ok(Json(json!({ "order": order.id, "status": order.status }))),
        None => {
            println!(
                "level=warn {SAGA} saga {} ended {} for an unknown order {order_id} (event {})",
                data.id, data.status, event.id
            );
            Ok(Json(json!({ "ignored": true })))
        }
    }
}

fn traceparent(headers: &HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn insert_order(
    conn: &mut Connection,
    order: Order,
    traceparent: Option<&str>,
) -> Result<Order, Problem> {
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
    enqueue(&tx, "order.placed", &order, traceparent)?;
    tx.commit()?;
    Ok(order)
}

enum Change {
    Confirm,
    Cancel(String),
}

/// Applies `change` to order `id` and writes its event, in one transaction: the order and
/// whether it changed, or `None` when there is no such order. The order's final states are
/// final: confirming a cancelled order or cancelling a confirmed one is a 409.
fn change_status(
    conn: &mut Connection,
    id: &str,
    change: Change,
    traceparent: Option<&str>,
) -> Result<Option<(Order, bool)>, Problem> {
    // Immediate, so that a confirm and a cancel racing on two replicas cannot both pass.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(mut order) = find_order(&tx, id)? else {
        return Ok(None);
    };
    let (to, topic, reason) = match (&change, order.status.as_str()) {
        (Change::Confirm, CONFIRMED) | (Change::Cancel(_), CANCELLED) => {
            return Ok(Some((order, false)));
        }
        (Change::Confirm, CANCELLED) => {
            return Err(Problem::conflict(format!(
                "order {id} is cancelled ({}); it cannot be confirmed",
                order.reason.as_deref().unwrap_or("no reason given")
            )));
        }
        (Change::Cancel(_), CONFIRMED) => {
            return Err(Problem::conflict(format!(
                "order {id} is confirmed; it cannot be cancelled"
            )));
        }
        (Change::Confirm, _) => (CONFIRMED, "order.confirmed", None),
        (Change::Cancel(reason), _) => (CANCELLED, "order.cancelled", Some(reason.clone())),
    };
    tx.execute(
        "UPDATE orders SET status = ?2, reason = ?3 WHERE id = ?1",
        params![id, to, reason],
    )?;
    order.status = to.to_owned();
    order.reason = reason;
    enqueue(&tx, topic, &order, traceparent)?;
    tx.commit()?;
    Ok(Some((order, true)))
}

/// Writes `topic`'s event about `order` to the outbox, inside the caller's transaction. The data
/// keeps the shape subscribers already read: `order`, `customer`, `total`, and `items` or
/// `reason`.
fn enqueue(
    conn: &Connection,
    topic: &str,
    order: &Order,
    traceparent: Option<&str>,
) -> rusqlite::Result<()> {
    let mut data = json!({
        "order": order.id,
        "customer": order.customer,
        "total": from_cents(order.total_cents),
    });
    match &order.reason {
        Some(reason) => data["reason"] = json!(reason),
        None => {
            data["items"] = order
                .items
                .iter()
                .map(|i| json!({ "sku": i.sku, "qty": i.qty }))
                .collect();
        }
    }
    conn.execute(
        "INSERT INTO outbox (id, topic, subject, data, time, traceparent)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            new_id("evt"),
            topic,
            order.id,
            data.to_string(),
            now_rfc3339(),
            traceparent
        ],
    )?;
    Ok(())
}

/// An event waiting in the outbox.
struct Pending {
    seq: i64,
    topic: String,
    event: Value,
}

/// Publishes the outbox, oldest first, until `stop` says so: woken by `wake` after a commit, and
/// every [`OUTBOX_POLL`] anyway. A failed publish stops the round (so one order's events keep
/// their order) and is retried after a growing pause. An event is deleted only once Flotilla
/// took it, so it is published at least once; its `id` is the outbox row's, so consumers can
/// drop a repeat (two replicas draining one outbox may both publish it).
async fn drain_outbox(
    db: Db,
    flotilla: Dependency,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = OUTBOX_BACKOFF_MIN;
    loop {
        let drained = drain_round(&db, &flotilla, &stop).await;
        let pause = if drained {
            backoff = OUTBOX_BACKOFF_MIN;
            OUTBOX_POLL
        } else {
            // Jitter keeps replicas that failed together from retrying in step.
            let pause = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
            backoff = (backoff * 2).min(OUTBOX_BACKOFF_MAX);
            pause
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = wake.notified(), if drained => {}
            _ = tokio::time::sleep(pause) => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Publishes what the outbox holds; `false` when a publish (or reading the outbox) failed.
async fn drain_round(db: &Db, flotilla: &Dependency, stop: &watch::Receiver<bool>) -> bool {
    loop {
        let batch = match db.call(read_outbox).await {
            Ok(batch) => batch,
            Err(problem) => {
                eprintln!("outbox: cannot read: {problem}");
                return false;
            }
        };
        if batch.is_empty() {
            return true;
        }
        for pending in batch {
            if *stop.borrow() {
                return true;
            }
            let published: Result<IgnoredAny, CallError> = flotilla
                .post_json(
                    &["v1", "topics", &pending.topic, "events"],
                    &pending.event,
                    &HeaderMap::new(),
                )
                .await;
            if let Err(err) = published {
                eprintln!(
                    "outbox: could not publish {} {}, will retry: {err}",
                    pending.topic, pending.event["id"]
                );
                return false;
            }
            let seq = pending.seq;
            let deleted = db
                .call(move |conn| {
                    conn.execute("DELETE FROM outbox WHERE seq = ?1", [seq])?;
                    Ok(())
                })
                .await;
            if let Err(problem) = deleted {
                eprintln!("outbox: cannot delete a published event: {problem}");
                return false;
            }
        }
    }
}

fn read_outbox(conn: &mut Connection) -> Result<Vec<Pending>, Problem> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, id, topic, subject, data, time, traceparent FROM outbox
         ORDER BY seq LIMIT ?1",
    )?;
    let rows = stmt.query_map([OUTBOX_BATCH], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, String>(4)?,
            row.get::<_, String>(5)?,
            row.get::<_, Option<String>>(6)?,
        ))
    })?;
    let mut batch = Vec::new();
    for row in rows {
        let (seq, id, topic, subject, data, time, traceparent) = row?;
        let data: Value = serde_json::from_str(&data).map_err(|err| {
            eprintln!("outbox: event {id} has unreadable data: {err}");
            Problem::internal()
        })?;
        // Structured mode; `subject` is the order, which is also what keeps one order's events
        // in order on the topic's partitions.
        let mut event = json!({
            "specversion": "1.0",
            "id": id,
            "type": topic,
            "subject": subject,
            "time": time,
            "datacontenttype": "application/json",
            "data": data,
        });
        if let Some(traceparent) = traceparent {
            // The request that made the change, so the delivery joins its trace.
            event["traceparent"] = json!(traceparent);
        }
        batch.push(Pending { seq, topic, event });
    }
    Ok(batch)
}

async fn read_order(db: &Db, id: String) -> Result<Order, Problem> {
    db.call(move |conn| find_order(conn, &id)?.ok_or_else(|| no_order(&id)))
        .await
}

async fn get_order(
    State(app): State<App>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Order>, Problem> {
    Ok(Json(read_order(&app.db, id).await?))
}

fn no_order(id: &str) -> Problem {
    Problem::not_found(format!("no order {id}"))
}

const ORDER_COLUMNS: &str =
    "SELECT id, customer, total_cents, status, reason, created_at FROM orders";

fn find_order(conn: &Connection, id: &str) -> rusqlite::Result<Option<Order>> {
    let order = conn
        .query_row(
            &format!("{ORDER_COLUMNS} WHERE id = ?1"),
            [id],
            order_from_row,
        )
        .optional()?;
    order.map(|order| with_items(conn, order)).transpose()
}

/// The latest orders, most recent first.
async fn list_orders(State(app): State<App>) -> Result<Json<Vec<Order>>, Problem> {
    let orders = app
        .db
        .call(|conn| {
            let mut stmt =
                conn.prepare_cached(&format!("{ORDER_COLUMNS} ORDER BY seq DESC LIMIT ?1"))?;
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
        reason: row.get(4)?,
        created_at: row.get(5)?,
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

/// Starts the saga again for every order stranded in `pending`. The start is keyed by the order
/// id, so for an order whose saga exists this changes nothing (the existing saga is returned and
/// its own last step or its `saga.*` event settles the order); for one whose start was lost it
/// starts it now. Replicas may both do it: the key makes that harmless.
async fn reconcile(db: Db, deps: Arc<Deps>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
        let cutoff =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now() - STRANDED_AFTER)
                .to_string();
        let stranded = db
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, customer, total_cents, status, reason, created_at FROM orders
                     WHERE status = ?1 AND created_at < ?2 ORDER BY seq LIMIT 100",
                )?;
                let orders = stmt
                    .query_map(params![PENDING, cutoff], order_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(orders
                    .into_iter()
                    .map(|order| with_items(conn, order))
                    .collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await;
        let Ok(stranded) = stranded else { continue };
        for order in stranded {
            let mut headers = HeaderMap::new();
            let Ok(key) = HeaderValue::from_str(&order.id) else {
                continue;
            };
            headers.insert(IDEMPOTENCY_KEY, key);
            let started: Result<Saga, CallError> = deps
                .flotilla
                .post_json(&["v1", "sagas", SAGA], &saga_input(&order), &headers)
                .await;
            if let Err(err) = started {
                eprintln!(
                    "order {}: pending, and its saga could not be started: {err}",
                    order.id
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(step: &str, status: Option<u16>, message: &str) -> SagaError {
        SagaError {
            step: Some(step.to_owned()),
            status,
            message: Some(message.to_owned()),
        }
    }

    #[test]
    fn passes_on_the_refusals_a_client_can_act_on() {
        let declined = error("authorize-payment", Some(402), "payment declined: too much");
        assert_eq!(
            saga_problem(Some(&declined), "compensated"),
            Problem::new(StatusCode::PAYMENT_REQUIRED, "payment declined: too much")
        );
        let short = error("reserve-stock", Some(409), "insufficient stock for TEA-001");
        assert_eq!(
            saga_problem(Some(&short), "compensated"),
            Problem::conflict("insufficient stock for TEA-001")
        );
    }

    #[test]
    fn names_the_service_that_could_not_answer() {
        let down = error("create-shipment", None, "connection refused");
        assert_eq!(
            saga_problem(Some(&down), "compensated"),
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shipping unavailable: connection refused"
            )
        );
        let broken = error("reserve-stock", Some(400), "bad request");
        assert_eq!(
            saga_problem(Some(&broken), "failed").detail,
            "inventory unavailable: bad request"
        );
        let silent = saga_problem(None, "failed");
        assert_eq!(silent.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(saga_reason(None, "failed"), "the place-order saga failed");
    }

    #[test]
    fn writes_the_wait_in_whole_units() {
        assert_eq!(wait_param(Duration::from_secs(10)), "10s");
        assert_eq!(wait_param(Duration::from_millis(1500)), "1500ms");
    }
}
