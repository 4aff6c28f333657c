//! The control plane's HTTP API: what `flotilla status`, `logs`, `chaos`, `traces`, `trace`,
//! `map`, `down`, a separate `flotilla sidecar` and a Prometheus scraper talk to.
//!
//! It sits above the roles and sees them only through the [`Fleet`] trait, which the `flotilla`
//! binary implements over the supervisor, registry, log store, trace store, call metrics and the
//! data plane's resilience board and fault table. [`router`] builds the axum
//! router (tested without sockets), [`serve`] runs it on a listener until shutdown. The wire types
//! live in [`api`], shared with the CLI. Errors are RFC 7807 problem+json. What the fleet says
//! about itself — traces, `/metrics`, health rolled up to the app, the application map — is
//! served by the `observe` module.

pub mod api;
pub mod events;
mod health;
mod observe;
mod openapi;
mod otlp;
pub mod sagas;

pub use otlp::{otlp_router, serve_otlp};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flotilla_telemetry::store::TelemetryDb;
use flotilla_telemetry::{
    Exposition, Level, LogQuery, LogRecord, Metrics, Span, TraceId, TraceStore,
};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use api::{
    AppHealth, AppInfo, AppMap, BreakerState, BreakerView, Dependency, EdgeStats, Faults,
    HealthStatus, InstanceView, MapEdge, MapNode, Phase, ServiceHealth, ServiceView, TraceDetail,
};

/// The name the gateway goes by as a caller: in spans, metrics and on the map. The gateway's own
/// `flotilla_gateway::CALLER`, repeated because roles do not depend on each other; the binary,
/// which sees both, tests that they agree.
pub const GATEWAY: &str = "gateway";

/// What the control API can see and do; implemented by the process that runs the fleet.
pub trait Fleet: Send + Sync + 'static {
    fn app(&self) -> AppInfo;
    fn services(&self) -> Vec<ServiceView>;
    fn logs(&self, query: &LogQuery) -> Vec<Arc<LogRecord>>;
    fn follow_logs(&self) -> broadcast::Receiver<Arc<LogRecord>>;
    /// Asks the fleet to stop gracefully; returns at once.
    fn shutdown(&self);
    /// Every circuit breaker and instance outlier record of the fleet's data plane.
    fn breakers(&self) -> Vec<BreakerView>;
    /// The faults in force, by service.
    fn faults(&self) -> Vec<(String, Faults)>;
    /// Injects `faults` into every call to `service`, replacing what was there.
    fn set_faults(&self, service: &str, faults: Faults) -> Result<(), FaultError>;
    /// Stops injecting faults into `service`; false when none were injected.
    fn clear_faults(&self, service: &str) -> Result<bool, FaultError>;
    /// The recent spans of every hop: `/v1/traces` and the map's edges.
    fn trace_store(&self) -> &TraceStore;
    /// The data plane's per-edge call counters, the core of `/metrics`.
    fn metrics(&self) -> &Metrics;
    /// Every `(caller, callee)` that a service's `depends_on` declares.
    fn dependencies(&self) -> Vec<(String, String)>;
    /// The services the gateway's routes lead to: the calls the gateway is expected to make.
    fn routed_services(&self) -> Vec<String>;
    /// The durable tier behind the in-memory stores, when the fleet keeps one: queries reach
    /// into it for what memory no longer holds (older lines and traces, a previous run's).
    fn durable(&self) -> Option<TelemetryDb> {
        None
    }
    /// Spans from outside the proxies (services' own OpenTelemetry SDKs, through the OTLP
    /// receiver), recorded like the proxies' own.
    fn ingest_spans(&self, spans: Vec<Span>);
    /// Log records from outside the supervisor's pipes (OTLP), stored like captured lines.
    fn ingest_logs(&self, records: Vec<LogRecord>);
    /// Families of the fleet's own telemetry pipeline for `/metrics` (export and storage
    /// counters); nothing by default.
    fn render_pipeline_metrics(&self, _out: &mut Exposition) {}
    /// Topics, subscriptions and the broker, when the fleet runs them.
    fn events(&self) -> Option<Arc<flotilla_events::engine::Events>> {
        None
    }
    /// The saga orchestrator, when the app declares sagas.
    fn sagas(&self) -> Option<flotilla_saga::engine::Orchestrator> {
        None
    }
}

/// Why faults could not be set or cleared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("this app has no service named `{0}`")]
    UnknownService(String),
    /// The faults failed [`Faults::validate`]; the message names the field.
    #[error("{0}")]
    Invalid(String),
}

/// The API's routes over a fleet.
pub fn router(fleet: Arc<dyn Fleet>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/app", get(app))
        .route("/v1/services", get(services))
        .route("/v1/services/{name}", get(service))
        .route(
            "/v1/services/{name}/faults",
            get(service_faults)
                .put(set_service_faults)
                .delete(clear_service_faults),
        )
        .route("/v1/breakers", get(breakers))
        .route("/v1/faults", get(faults))
        .route("/v1/logs", get(logs))
        .route("/v1/logs/stream", get(log_events))
        .route("/v1/topics", get(events::topics))
        .route("/v1/topics/{topic}", get(events::topic))
        .route(
            "/v1/topics/{topic}/events",
            post(events::publish).get(events::read),
        )
        .route("/v1/topics/{topic}/replay", post(events::replay))
        .route("/v1/topics/{topic}/redrive", post(events::redrive))
        .route("/v1/sagas", get(sagas::list))
        .route("/v1/sagas/{key}", get(sagas::get).post(sagas::start))
        .route("/v1/traces", get(observe::traces))
        .route("/v1/traces/{id}", get(observe::trace))
        .route("/v1/health", get(observe::health))
        .route("/v1/map", get(observe::map))
        .route("/metrics", get(observe::metrics))
        .route("/v1/shutdown", post(shutdown))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(fleet)
}

/// Serves the API until `shutdown` is cancelled, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    fleet: Arc<dyn Fleet>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(fleet))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        openapi::DOCUMENT,
    )
        .into_response()
}

async fn app(State(fleet): State<Arc<dyn Fleet>>) -> Json<AppInfo> {
    Json(fleet.app())
}

async fn services(State(fleet): State<Arc<dyn Fleet>>) -> Json<Vec<ServiceView>> {
    Json(fleet.services())
}

async fn service(State(fleet): State<Arc<dyn Fleet>>, Path(name): Path<String>) -> Response {
    match fleet.services().into_iter().find(|s| s.name == name) {
        Some(found) => Json(found).into_response(),
        None => unknown_service(name).into_response(),
    }
}

async fn breakers(State(fleet): State<Arc<dyn Fleet>>) -> Json<Vec<BreakerView>> {
    Json(fleet.breakers())
}

/// An object rather than the trait's list, so a client looks a service up by name.
async fn faults(State(fleet): State<Arc<dyn Fleet>>) -> Json<BTreeMap<String, Faults>> {
    Json(fleet.faults().into_iter().collect())
}

async fn service_faults(State(fleet): State<Arc<dyn Fleet>>, Path(name): Path<String>) -> Response {
    if let Some((_, faults)) = fleet.faults().into_iter().find(|(s, _)| *s == name) {
        return Json(faults).into_response();
    }
    if fleet.services().iter().any(|s| s.name == name) {
        no_faults(&name)
    } else {
        unknown_service(name).into_response()
    }
}

async fn set_service_faults(
    State(fleet): State<Arc<dyn Fleet>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(e) => return problem(e.status(), "unreadable body", &e.body_text()),
    };
    // Parsed by hand rather than with the `Json` extractor so that a client that forgets the
    // content type (`curl -d`) is not refused; the rejection still names the offending field.
    let faults = match Json::<Faults>::from_bytes(&body) {
        Ok(Json(faults)) => faults,
        Err(e) => {
            let title = if e.status() == StatusCode::UNPROCESSABLE_ENTITY {
                "invalid faults"
            } else {
                "malformed JSON"
            };
            return problem(e.status(), title, &e.body_text());
        }
    };
    match fleet.set_faults(&name, faults.clone()) {
        Ok(()) => Json(faults).into_response(),
        Err(e) => Problem::from(e).into_response(),
    }
}

async fn clear_service_faults(
    State(fleet): State<Arc<dyn Fleet>>,
    Path(name): Path<String>,
) -> Response {
    match fleet.clear_faults(&name) {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => no_faults(&name),
        Err(e) => Problem::from(e).into_response(),
    }
}

fn no_faults(service: &str) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "no faults",
        &format!("no faults are injected into `{service}`"),
    )
}

pub(crate) fn unknown_service(name: String) -> Problem {
    FaultError::UnknownService(name).into()
}

impl From<FaultError> for Problem {
    fn from(error: FaultError) -> Self {
        let (status, title) = match error {
            FaultError::UnknownService(_) => (StatusCode::NOT_FOUND, "unknown service"),
            FaultError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid faults"),
        };
        Problem::new(status, title, error.to_string())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogParams {
    service: Option<String>,
    instance: Option<String>,
    /// A duration back from now (`5m`) or an RFC 3339 time.
    since: Option<String>,
    limit: Option<usize>,
    /// Only lines at this level or above: trace, debug, info, warn, error.
    level: Option<String>,
    /// Only lines containing this text (ASCII case ignored).
    grep: Option<String>,
    /// Only lines of this trace (32 hex digits): one request across every service.
    trace: Option<String>,
    /// Keep the response open and stream new lines as NDJSON.
    #[serde(default)]
    follow: bool,
}

/// Upper bound on one logs answer, so a careless query cannot build a huge response.
const MAX_LOG_LIMIT: usize = 10_000;

/// A query string as `T`, or the 400 problem naming what was wrong with it (an unknown
/// parameter, a value of the wrong type).
pub(crate) type Params<T> = Result<Query<T>, QueryRejection>;

pub(crate) fn read_query<T>(query: Params<T>) -> Result<T, Problem> {
    query
        .map(|Query(p)| p)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "bad query", e.body_text()))
}

/// `since` as a time, or the 400 problem explaining the forms it takes.
pub(crate) fn since_param(since: Option<&str>) -> Result<Option<SystemTime>, Problem> {
    since
        .map(parse_since)
        .transpose()
        .map_err(|detail| Problem::new(StatusCode::BAD_REQUEST, "bad `since`", detail))
}

/// The query a `/v1/logs` request asks, or the 400 problem with it.
fn log_query(fleet: &dyn Fleet, params: LogParams) -> Result<LogQuery, Problem> {
    let since = since_param(params.since.as_deref())?;
    let level = params
        .level
        .as_deref()
        .map(|text| {
            Level::parse(text).ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "bad `level`",
                    format!("`{text}` is not a level; use trace, debug, info, warn or error"),
                )
            })
        })
        .transpose()?;
    let trace = params
        .trace
        .as_deref()
        .map(|text| {
            TraceId::parse(text).ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "bad `trace`",
                    format!("`{text}` is not a trace id: 32 hex digits, not all zero"),
                )
            })
        })
        .transpose()?;
    let query = LogQuery {
        service: params.service,
        instance: params.instance,
        since,
        limit: Some(params.limit.unwrap_or(1_000).min(MAX_LOG_LIMIT)),
        level,
        grep: params.grep.filter(|g| !g.is_empty()),
        trace,
    };
    if let Some(service) = &query.service
        && !fleet.services().iter().any(|s| &s.name == service)
    {
        return Err(unknown_service(service.clone()));
    }
    Ok(query)
}

/// The newest matching lines, oldest first: memory's, topped up from the durable tier with older
/// ones when memory holds fewer than asked for (evicted, or logged before a restart).
async fn matching_logs(fleet: &dyn Fleet, query: &LogQuery) -> Vec<Arc<LogRecord>> {
    let mut records = fleet.logs(query);
    let limit = query.limit.unwrap_or(usize::MAX);
    let Some(durable) = fleet.durable() else {
        return records;
    };
    if records.len() >= limit {
        return records;
    }
    // Memory returned every match it holds, so anything older than its oldest match is not in
    // the answer yet; the durable tier is asked for exactly that.
    let before = records.first().map(|record| record.time);
    let older_query = LogQuery {
        limit: Some(limit - records.len()),
        ..query.clone()
    };
    let older = tokio::task::spawn_blocking(move || durable.logs(&older_query, before)).await;
    match older {
        Ok(Ok(older)) if !older.is_empty() => {
            let mut merged: Vec<Arc<LogRecord>> = older.into_iter().map(Arc::new).collect();
            merged.append(&mut records);
            merged
        }
        Ok(Ok(_)) => records,
        Ok(Err(e)) => {
            tracing::warn!("durable log query failed: {e}");
            records
        }
        Err(e) => {
            tracing::warn!("durable log query panicked: {e}");
            records
        }
    }
}

/// The backlog then every new matching line, for as long as the client listens. Subscribes
/// before reading the backlog so no line falls between the two.
async fn backlog_then_live(
    fleet: &dyn Fleet,
    query: LogQuery,
) -> impl futures_util::Stream<Item = Arc<LogRecord>> + use<> {
    let live = fleet.follow_logs();
    let backlog = matching_logs(fleet, &query).await;
    let filter = LogQuery {
        since: None,
        limit: None,
        ..query
    };
    let live = futures_util::stream::unfold(live, move |mut rx| {
        let filter = filter.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(record) if filter.matches(&record) => return Some((record, rx)),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    futures_util::stream::iter(backlog).chain(live)
}

async fn logs(
    State(fleet): State<Arc<dyn Fleet>>,
    query: Params<LogParams>,
) -> Result<Response, Problem> {
    let mut params = read_query(query)?;
    let follow = std::mem::take(&mut params.follow);
    let query = log_query(&*fleet, params)?;
    if !follow {
        return Ok(Json(matching_logs(&*fleet, &query).await).into_response());
    }
    let lines = backlog_then_live(&*fleet, query).await.map(|record| {
        let mut line = serde_json::to_vec(&*record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        Ok::<_, std::io::Error>(line)
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

/// How often an idle event stream says it is alive, so proxies and browsers keep it open.
const SSE_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// `/v1/logs/stream`: the same lines as server-sent events (`event: log`, the record as JSON in
/// `data`), for browsers' `EventSource` and anything else that speaks SSE.
async fn log_events(
    State(fleet): State<Arc<dyn Fleet>>,
    query: Params<LogParams>,
) -> Result<Response, Problem> {
    let mut params = read_query(query)?;
    if params.follow {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "bad query",
            "`follow` is implied by /v1/logs/stream; leave it out",
        ));
    }
    params.limit = Some(params.limit.unwrap_or(100));
    let query = log_query(&*fleet, params)?;
    let events = backlog_then_live(&*fleet, query).await.map(|record| {
        let json = serde_json::to_string(&*record).map_err(std::io::Error::other)?;
        // JSON has no raw newlines, so one `data:` line carries the record.
        Ok::<_, std::io::Error>(format!("event: log\ndata: {json}\n\n"))
    });
    let keep_alive = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(SSE_KEEP_ALIVE).await;
        Some((Ok(": keep-alive\n\n".to_owned()), ()))
    });
    let stream = futures_util::stream::select(events, keep_alive);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

fn parse_since(text: &str) -> Result<SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(SystemTime::now()
            .checked_sub(ago)
            .unwrap_or(SystemTime::UNIX_EPOCH));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!("`{text}` is neither a duration like `5m` nor an RFC 3339 time like `2026-01-02T03:04:05Z`")
    })
}

async fn shutdown(State(fleet): State<Arc<dyn Fleet>>) -> Response {
    fleet.shutdown();
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "status": "stopping" })),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "not found",
        &format!(
            "no control API resource at `{}`; see /v1/openapi.json",
            uri.path()
        ),
    )
}

async fn method_not_allowed() -> Response {
    problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed",
        "this resource does not support that method; see /v1/openapi.json",
    )
}

/// An error answer on its way out, so handlers can return `Result<_, Problem>` and use `?`;
/// it becomes problem+json through [`problem`] (and stays small, unlike a `Response`).
#[derive(Debug)]
pub(crate) struct Problem {
    status: StatusCode,
    title: &'static str,
    detail: String,
}

impl Problem {
    pub(crate) fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            title,
            detail: detail.into(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        problem(self.status, self.title, &self.detail)
    }
}

/// The one place control API errors become RFC 7807 problem+json.
pub fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        )],
        body.to_string(),
    )
        .into_response()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use flotilla_telemetry::{LogStore, Stream};
    use http_body_util::BodyExt;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use tower::ServiceExt;

    pub(crate) struct FakeFleet {
        logs: LogStore,
        stopped: AtomicBool,
        faults: Mutex<BTreeMap<String, Faults>>,
        pub(crate) traces: TraceStore,
        pub(crate) metrics: Metrics,
        /// What `services` answers.
        pub(crate) services: Mutex<Vec<ServiceView>>,
        pub(crate) durable: Mutex<Option<TelemetryDb>>,
    }

    impl FakeFleet {
        fn check(&self, service: &str) -> Result<(), FaultError> {
            if self.services().iter().any(|s| s.name == service) {
                Ok(())
            } else {
                Err(FaultError::UnknownService(service.into()))
            }
        }
    }

    impl Fleet for FakeFleet {
        fn app(&self) -> AppInfo {
            AppInfo {
                app: "shop".into(),
                dir: "/tmp/shop".into(),
                pid: 1,
                gateway: "http://127.0.0.1:8080".into(),
                control: "http://127.0.0.1:4400".into(),
                started_at: SystemTime::UNIX_EPOCH,
                phase: Phase::Ready,
            }
        }
        fn services(&self) -> Vec<ServiceView> {
            self.services.lock().expect("services").clone()
        }
        fn logs(&self, query: &LogQuery) -> Vec<Arc<LogRecord>> {
            self.logs.query(query)
        }
        fn follow_logs(&self) -> broadcast::Receiver<Arc<LogRecord>> {
            self.logs.follow()
        }
        fn shutdown(&self) {
            self.stopped.store(true, Ordering::SeqCst);
        }
        fn breakers(&self) -> Vec<BreakerView> {
            vec![BreakerView {
                caller: "gateway".into(),
                service: "orders".into(),
                instance: None,
                state: BreakerState::Open,
                state_for_ms: 1_200,
                consecutive_failures: 5,
                window_calls: 9,
                window_failures: 6,
                in_flight: 0,
                times_opened: 1,
                retry_in_ms: Some(3_800),
            }]
        }
        fn faults(&self) -> Vec<(String, Faults)> {
            let faults = self.faults.lock().expect("faults");
            faults.iter().map(|(s, f)| (s.clone(), f.clone())).collect()
        }
        fn set_faults(&self, service: &str, faults: Faults) -> Result<(), FaultError> {
            self.check(service)?;
            faults.validate().map_err(FaultError::Invalid)?;
            let mut table = self.faults.lock().expect("faults");
            table.insert(service.into(), faults);
            Ok(())
        }
        fn clear_faults(&self, service: &str) -> Result<bool, FaultError> {
            self.check(service)?;
            Ok(self
                .faults
                .lock()
                .expect("faults")
                .remove(service)
                .is_some())
        }
        fn trace_store(&self) -> &TraceStore {
            &self.traces
        }
        fn metrics(&self) -> &Metrics {
            &self.metrics
        }
        fn dependencies(&self) -> Vec<(String, String)> {
            vec![
                ("orders".into(), "stock".into()),
                ("orders".into(), "payments".into()),
            ]
        }
        fn routed_services(&self) -> Vec<String> {
            vec!["orders".into()]
        }
        fn durable(&self) -> Option<TelemetryDb> {
            self.durable.lock().expect("durable").clone()
        }
        fn ingest_spans(&self, spans: Vec<Span>) {
            for span in spans {
                self.traces.record(span);
            }
        }
        fn ingest_logs(&self, records: Vec<LogRecord>) {
            for record in records {
                self.logs.push(record);
            }
        }
    }

    /// One healthy instance of `orders`.
    pub(crate) fn orders() -> ServiceView {
        ServiceView {
            name: "orders".into(),
            version: "1.0.0".into(),
            replicas: 1,
            healthy: 1,
            instances: vec![InstanceView {
                service: "orders".into(),
                instance: "orders-1".into(),
                pid: Some(4242),
                port: Some(9001),
                state: "running".into(),
                health: "healthy".into(),
                restarts: 2,
                version: "1.0.0".into(),
                uptime_seconds: Some(60),
                last_exit: Some("exit status 1".into()),
                last_error: None,
            }],
        }
    }

    pub(crate) fn fleet() -> Arc<FakeFleet> {
        let fleet = Arc::new(FakeFleet {
            logs: LogStore::new(100),
            stopped: AtomicBool::new(false),
            faults: Mutex::default(),
            traces: TraceStore::new(1_000),
            metrics: Metrics::new(),
            services: Mutex::new(vec![orders()]),
            durable: Mutex::new(None),
        });
        for (service, line) in [
            ("orders", "one"),
            ("catalog", "two"),
            ("orders", "three"),
            (
                "catalog",
                "WARN slow GET /products trace_id=4bf92f3577b34da6a3ce929d0e0e4736",
            ),
            (
                "orders",
                "ERROR payments down trace_id=4bf92f3577b34da6a3ce929d0e0e4736",
            ),
        ] {
            fleet.logs.push(LogRecord::new(
                service.into(),
                format!("{service}-1").into(),
                Stream::Stdout,
                line.into(),
            ));
        }
        fleet
    }

    pub(crate) async fn call(
        fleet: Arc<FakeFleet>,
        method: &str,
        uri: &str,
    ) -> (StatusCode, String, String) {
        send(fleet, method, uri, "").await
    }

    async fn send(
        fleet: Arc<FakeFleet>,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (StatusCode, String, String) {
        let response = router(fleet)
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(Body::from(body.to_owned()))
                    .expect("request"),
            )
            .await
            .expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (
            status,
            content_type,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    #[tokio::test]
    async fn lists_and_finds_services() {
        let (status, _, body) = call(fleet(), "GET", "/v1/services").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\"name\":\"orders\""), "{body}");
        let (status, _, _) = call(fleet(), "GET", "/v1/services/orders").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn unknown_things_are_404_problems() {
        for uri in [
            "/v1/services/nosuch",
            "/v1/nothing",
            "/v1/logs?service=nosuch",
        ] {
            let (status, content_type, body) = call(fleet(), "GET", uri).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(content_type, "application/problem+json", "{uri}");
            assert!(body.contains("\"status\":404"), "{body}");
        }
    }

    #[tokio::test]
    async fn bad_queries_are_400_problems() {
        for uri in [
            "/v1/logs?since=yesterday",
            "/v1/logs?limit=-1",
            "/v1/logs?colour=red",
        ] {
            let (status, content_type, _) = call(fleet(), "GET", uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            assert_eq!(content_type, "application/problem+json", "{uri}");
        }
    }

    #[tokio::test]
    async fn logs_filter_by_service_and_limit() {
        let (status, _, body) =
            call(fleet(), "GET", "/v1/logs?service=orders&limit=1&since=5m").await;
        assert_eq!(status, StatusCode::OK);
        let records: Vec<LogRecord> = serde_json::from_str(&body).expect("JSON array");
        assert_eq!(records.len(), 1);
        assert!(records[0].line.starts_with("ERROR payments down"));
    }

    #[tokio::test]
    async fn log_events_stream_backlog_then_live_lines() {
        let fleet = fleet();
        let request = Request::get("/v1/logs/stream?service=orders&level=info")
            .body(Body::empty())
            .expect("request");
        let response = router(fleet.clone())
            .oneshot(request)
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let mut body = response.into_body();
        let mut next_event = async || -> String {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("an event within 5 s")
                .expect("the stream goes on")
                .expect("frame");
            String::from_utf8(frame.into_data().expect("data").to_vec()).expect("utf-8")
        };
        // The backlog: orders' one line at info or above.
        let event = next_event().await;
        assert!(event.starts_with("event: log\ndata: {"), "{event:?}");
        assert!(event.ends_with("}\n\n"), "{event:?}");
        assert!(event.contains("payments down"), "{event:?}");
        // Then what is logged from now on, filtered the same way.
        for (service, line) in [
            ("catalog", "ERROR not for orders"),
            ("orders", "ERROR <b>new</b>"),
        ] {
            fleet.logs.push(LogRecord::new(
                service.into(),
                format!("{service}-1").into(),
                Stream::Stdout,
                line.into(),
            ));
        }
        let event = next_event().await;
        let data = event
            .strip_prefix("event: log\ndata: ")
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .expect("one data line");
        let record: LogRecord = serde_json::from_str(data).expect("a record");
        assert_eq!(record.line, "ERROR <b>new</b>");

        let (status, content_type, _) =
            call(fleet.clone(), "GET", "/v1/logs/stream?follow=true").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(content_type, "application/problem+json");
    }

    #[tokio::test]
    async fn logs_reach_into_the_durable_tier_for_what_memory_lacks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let durable = TelemetryDb::open(dir.path(), Default::default()).expect("open");
        let old = SystemTime::now() - Duration::from_secs(3600);
        for line in [
            "old one trace_id=4bf92f3577b34da6a3ce929d0e0e4736",
            "old two",
        ] {
            let mut record = LogRecord::new(
                "orders".into(),
                "orders-1".into(),
                Stream::Stdout,
                line.into(),
            );
            record.time = old;
            durable.record_log(Arc::new(record));
        }
        durable.flush();
        let fleet = fleet();
        *fleet.durable.lock().expect("durable") = Some(durable);

        let lines = |body: &str| -> Vec<String> {
            let records: Vec<LogRecord> = serde_json::from_str(body).expect("JSON array");
            records.into_iter().map(|r| r.line).collect()
        };
        let (_, _, body) = call(fleet.clone(), "GET", "/v1/logs?service=orders").await;
        assert_eq!(
            lines(&body),
            [
                "old one trace_id=4bf92f3577b34da6a3ce929d0e0e4736",
                "old two",
                "one",
                "three",
                "ERROR payments down trace_id=4bf92f3577b34da6a3ce929d0e0e4736"
            ],
            "older lines first, then memory's"
        );
        let (_, _, body) = call(fleet.clone(), "GET", "/v1/logs?service=orders&limit=2").await;
        assert_eq!(lines(&body).len(), 2, "memory alone fills a small limit");
        let (_, _, body) = call(fleet.clone(), "GET", "/v1/logs?grep=OLD%20T").await;
        assert_eq!(lines(&body), ["old two"]);
    }

    #[tokio::test]
    async fn logs_filter_by_level_text_and_trace() {
        let lines = |body: &str| -> Vec<String> {
            let records: Vec<LogRecord> = serde_json::from_str(body).expect("JSON array");
            records.into_iter().map(|r| r.line).collect()
        };
        let (status, _, body) = call(fleet(), "GET", "/v1/logs?level=error").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(lines(&body).len(), 1);
        let (_, _, body) = call(fleet(), "GET", "/v1/logs?grep=THREE").await;
        assert_eq!(lines(&body), ["three"]);
        let (_, _, body) = call(
            fleet(),
            "GET",
            "/v1/logs?trace=4bf92f3577b34da6a3ce929d0e0e4736",
        )
        .await;
        let traced = lines(&body);
        assert_eq!(traced.len(), 2, "one request's lines from both services");
        assert!(traced[0].starts_with("WARN slow"), "oldest first");
        for bad in ["/v1/logs?level=loud", "/v1/logs?trace=xyz"] {
            let (status, content_type, body) = call(fleet(), "GET", bad).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(content_type, "application/problem+json");
            assert!(
                body.contains("level") || body.contains("trace id"),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn shutdown_is_accepted_and_forwarded() {
        let fleet = fleet();
        let (status, _, _) = call(fleet.clone(), "POST", "/v1/shutdown").await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert!(fleet.stopped.load(Ordering::SeqCst));
        let (status, content_type, _) = call(fleet, "GET", "/v1/shutdown").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(content_type, "application/problem+json");
    }

    #[tokio::test]
    async fn openapi_document_is_valid_json_naming_every_route() {
        let (status, _, body) = call(fleet(), "GET", "/v1/openapi.json").await;
        assert_eq!(status, StatusCode::OK);
        let doc: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        for path in [
            "/healthz",
            "/v1/app",
            "/v1/services",
            "/v1/services/{name}",
            "/v1/logs",
            "/v1/shutdown",
            "/v1/breakers",
            "/v1/faults",
            "/v1/services/{name}/faults",
            "/v1/traces",
            "/v1/traces/{id}",
            "/v1/health",
            "/v1/map",
            "/metrics",
            "/v1/logs/stream",
            "/v1/topics",
            "/v1/topics/{topic}",
            "/v1/topics/{topic}/events",
            "/v1/topics/{topic}/replay",
            "/v1/topics/{topic}/redrive",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} undocumented");
        }
        for method in ["get", "put", "delete"] {
            assert!(
                doc["paths"]["/v1/services/{name}/faults"]
                    .get(method)
                    .is_some(),
                "{method} faults undocumented"
            );
        }
        for schema in [
            "Breaker",
            "Faults",
            "TraceSummary",
            "TraceDetail",
            "Span",
            "Health",
            "ServiceHealth",
            "Map",
            "MapNode",
            "MapEdge",
            "Dependency",
        ] {
            assert!(
                doc["components"]["schemas"].get(schema).is_some(),
                "{schema} schema missing"
            );
        }
        // Every reference points at something the document defines.
        for reference in body.split("\"$ref\": \"").skip(1) {
            let target = &reference[..reference.find('"').expect("closing quote")];
            let pointer = target.trim_start_matches('#');
            assert!(doc.pointer(pointer).is_some(), "dangling {target}");
        }
    }

    #[tokio::test]
    async fn breakers_are_listed() {
        let (status, content_type, body) = call(fleet(), "GET", "/v1/breakers").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "application/json");
        let breakers: Vec<BreakerView> = serde_json::from_str(&body).expect("breakers");
        assert_eq!(breakers.len(), 1);
        assert_eq!(breakers[0].state, BreakerState::Open);
        assert!(body.contains("\"state\":\"open\""), "{body}");
        assert!(body.contains("\"retry_in_ms\":3800"), "{body}");
    }

    #[tokio::test]
    async fn faults_are_set_listed_and_cleared() {
        let fleet = fleet();
        let uri = "/v1/services/orders/faults";
        // No content type: `curl -d` sends a form type, and that is no reason to refuse.
        let (status, content_type, body) = send(
            fleet.clone(),
            "PUT",
            uri,
            r#"{"delay":"300ms","delay_percent":50,"abort":503}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(content_type, "application/json");
        let stored: Faults = serde_json::from_str(&body).expect("faults");
        assert_eq!(stored.delay, Some(Duration::from_millis(300)));
        assert_eq!(stored.delay_percent, 50);
        assert_eq!(stored.abort, Some(503));
        assert_eq!(stored.abort_percent, 100, "defaulted and shown");

        let (status, _, body) = call(fleet.clone(), "GET", "/v1/faults").await;
        assert_eq!(status, StatusCode::OK);
        let all: BTreeMap<String, Faults> = serde_json::from_str(&body).expect("object");
        assert_eq!(all.get("orders"), Some(&stored));
        let (status, _, body) = call(fleet.clone(), "GET", uri).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(serde_json::from_str::<Faults>(&body).ok(), Some(stored));

        let (status, _, body) = call(fleet.clone(), "DELETE", uri).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(body.is_empty());
        let (status, _, body) = call(fleet.clone(), "GET", "/v1/faults").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "{}");
        for method in ["GET", "DELETE"] {
            let (status, content_type, body) = call(fleet.clone(), method, uri).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} without faults");
            assert_eq!(content_type, "application/problem+json");
            assert!(
                body.contains("no faults are injected into `orders`"),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn faults_of_unknown_services_are_404_problems() {
        let uri = "/v1/services/nosuch/faults";
        for (method, body) in [("GET", ""), ("PUT", r#"{"abort":503}"#), ("DELETE", "")] {
            let (status, content_type, body) = send(fleet(), method, uri, body).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method}");
            assert_eq!(content_type, "application/problem+json", "{method}");
            assert!(body.contains("no service named `nosuch`"), "{body}");
        }
    }

    #[tokio::test]
    async fn bad_faults_are_4xx_problems_naming_the_field() {
        for (body, want, names) in [
            ("", StatusCode::BAD_REQUEST, "EOF"),
            ("{\"abort\":", StatusCode::BAD_REQUEST, "EOF"),
            (
                "3",
                StatusCode::UNPROCESSABLE_ENTITY,
                "expected struct Faults",
            ),
            (
                r#"{"dealy":"1s"}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "dealy",
            ),
            (
                r#"{"delay":"soon"}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "delay",
            ),
            (
                r#"{"abort":503,"abort_percent":-1}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "abort_percent",
            ),
            (
                r#"{"abort":70000}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "abort",
            ),
            (
                r#"{"abort":200}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "400 to 599",
            ),
            (
                r#"{"abort":503,"abort_percent":120}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "abort_percent",
            ),
            (
                r#"{"delay":"2h"}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "at most",
            ),
            ("{}", StatusCode::UNPROCESSABLE_ENTITY, "delay"),
        ] {
            let fleet = fleet();
            let (status, content_type, problem) =
                send(fleet.clone(), "PUT", "/v1/services/orders/faults", body).await;
            assert_eq!(status, want, "{body}: {problem}");
            assert_eq!(content_type, "application/problem+json", "{body}");
            let problem: serde_json::Value = serde_json::from_str(&problem).expect("problem");
            assert_eq!(problem["status"], want.as_u16());
            let detail = problem["detail"].as_str().unwrap_or_default();
            assert!(detail.contains(names), "{body}: {detail}");
            assert!(fleet.faults().is_empty(), "{body} set nothing");
        }
    }

    #[tokio::test]
    async fn faults_resources_refuse_other_methods() {
        for (method, uri) in [
            ("POST", "/v1/services/orders/faults"),
            ("PUT", "/v1/faults"),
            ("DELETE", "/v1/breakers"),
        ] {
            let (status, content_type, _) = call(fleet(), method, uri).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
            assert_eq!(content_type, "application/problem+json");
        }
    }
}
