//! What the fleet says about itself: traces, Prometheus metrics, health rolled up to the app, and
//! the application map.
//!
//! Everything here reads stores the data plane fills (the trace store, the call metrics) and the
//! views the other routes serve (services, breakers), so the numbers in `/metrics`, `/v1/health`
//! and `/v1/map` agree with `/v1/services` and `/v1/breakers`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_telemetry::{Exposition, MetricType, TraceId, TraceQuery, render_trace_store};
use serde::Deserialize;

use crate::api::{AppHealth, AppMap, Dependency, MapEdge, MapNode, TraceDetail, TraceSummary};
use crate::health::app_health;
use crate::{
    BreakerState, Fleet, GATEWAY, Params, Problem, read_query, since_param, unknown_service,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TraceParams {
    /// Only traces with a span of this service (or `gateway`).
    service: Option<String>,
    /// Only traces with a failed span.
    #[serde(default)]
    errors: bool,
    /// The N longest traces instead of the newest.
    slowest: Option<usize>,
    /// A duration back from now (`5m`) or an RFC 3339 time.
    since: Option<String>,
    limit: Option<usize>,
}

/// Traces listed when the query does not say.
const DEFAULT_TRACE_LIMIT: usize = 50;
/// Upper bound on one listing: each summary walks its trace's spans under a store lock.
const MAX_TRACE_LIMIT: usize = 1_000;

pub(crate) async fn traces(
    State(fleet): State<Arc<dyn Fleet>>,
    query: Params<TraceParams>,
) -> Result<Json<Vec<TraceSummary>>, Problem> {
    let params = read_query(query)?;
    let since = since_param(params.since.as_deref())?;
    // An unknown name is far more likely a typo than a service without traffic: say so rather
    // than answer an empty list.
    if let Some(service) = &params.service
        && service != GATEWAY
        && !fleet.services().iter().any(|s| &s.name == service)
    {
        return Err(unknown_service(service.clone()));
    }
    let query = TraceQuery {
        service: params.service,
        errors: params.errors,
        slowest: params.slowest.map(|n| n.min(MAX_TRACE_LIMIT)),
        since,
        limit: Some(
            params
                .limit
                .unwrap_or(DEFAULT_TRACE_LIMIT)
                .min(MAX_TRACE_LIMIT),
        ),
    };
    let mut listed = fleet.trace_store().traces(&query);
    let limit = query
        .limit
        .unwrap_or(usize::MAX)
        .min(query.slowest.unwrap_or(usize::MAX));
    // Memory holds the newest spans; older traces (and a previous run's) are in the durable tier.
    if listed.len() < limit
        && let Some(durable) = fleet.durable()
    {
        match tokio::task::spawn_blocking(move || durable.traces(&query)).await {
            Ok(Ok(older)) => {
                let held: BTreeSet<TraceId> = listed.iter().map(|t| t.trace_id).collect();
                listed.extend(older.into_iter().filter(|t| !held.contains(&t.trace_id)));
                if params.slowest.is_some() {
                    listed.sort_by(|a, b| b.duration.cmp(&a.duration).then(b.start.cmp(&a.start)));
                } else {
                    listed.sort_by_key(|t| std::cmp::Reverse(t.start));
                }
                listed.truncate(limit);
            }
            Ok(Err(e)) => tracing::warn!("durable trace listing failed: {e}"),
            Err(e) => tracing::warn!("durable trace listing panicked: {e}"),
        }
    }
    Ok(Json(listed))
}

pub(crate) async fn trace(
    State(fleet): State<Arc<dyn Fleet>>,
    Path(id): Path<String>,
) -> Result<Json<TraceDetail>, Problem> {
    let Some(trace_id) = TraceId::parse(&id) else {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "bad trace id",
            format!("`{id}` is not a trace id: 32 hexadecimal digits, not all zero"),
        ));
    };
    let store = fleet.trace_store();
    let mut spans = store.trace(trace_id);
    if spans.is_empty()
        && let Some(durable) = fleet.durable()
    {
        match tokio::task::spawn_blocking(move || durable.trace(trace_id)).await {
            Ok(Ok(found)) => spans = found,
            Ok(Err(e)) => tracing::warn!("durable trace lookup failed: {e}"),
            Err(e) => tracing::warn!("durable trace lookup panicked: {e}"),
        }
    }
    if spans.is_empty() {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown trace",
            format!(
                "no span of trace {trace_id} is held; the store keeps the newest {} spans",
                store.capacity()
            ),
        ));
    }
    Ok(Json(TraceDetail { trace_id, spans }))
}

pub(crate) async fn health(State(fleet): State<Arc<dyn Fleet>>) -> Json<AppHealth> {
    Json(app_health(&fleet.services()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MapParams {
    /// How far back calls count, as a duration (`30s`, `5m`).
    window: Option<String>,
}

const DEFAULT_MAP_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Shorter, and a rate per second would rest on a handful of calls.
const MIN_MAP_WINDOW: Duration = Duration::from_secs(1);
/// The store holds the newest spans only, so a longer window would mostly divide the same calls
/// by more seconds; a day is already far past what it can hold under load.
const MAX_MAP_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

pub(crate) async fn map(
    State(fleet): State<Arc<dyn Fleet>>,
    query: Params<MapParams>,
) -> Result<Json<AppMap>, Problem> {
    let params = read_query(query)?;
    let window = match params.window.as_deref().map(humantime::parse_duration) {
        None => DEFAULT_MAP_WINDOW,
        Some(Ok(window)) if (MIN_MAP_WINDOW..=MAX_MAP_WINDOW).contains(&window) => window,
        Some(_) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "bad `window`",
                "`window` is a duration from 1s to 24h, like `30s` or `5m`",
            ));
        }
    };
    Ok(Json(app_map(&*fleet, window, SystemTime::now())))
}

/// The services with their health, the calls seen within `window` before `now`, and the
/// declared dependencies nobody exercised.
fn app_map(fleet: &dyn Fleet, window: Duration, now: SystemTime) -> AppMap {
    let services = fleet.services();
    let health = app_health(&services);
    // The gateway runs in the process that answers this request: if it answers, it is up.
    let mut nodes = vec![MapNode {
        name: GATEWAY.to_owned(),
        health: crate::HealthStatus::Healthy,
        instances: 1,
        healthy: 1,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }];
    nodes.extend(
        services
            .iter()
            .zip(&health.services)
            .map(|(service, health)| MapNode {
                name: service.name.clone(),
                health: health.status,
                instances: service.replicas,
                healthy: service.healthy,
                version: service.version.clone(),
            }),
    );

    let dependencies: BTreeSet<(String, String)> = fleet.dependencies().into_iter().collect();
    let routed: BTreeSet<String> = fleet.routed_services().into_iter().collect();
    let edges: Vec<MapEdge> = fleet
        .trace_store()
        .edges(window, now)
        .into_iter()
        .map(|stats| {
            let declared = if stats.caller == GATEWAY {
                routed.contains(&stats.callee)
            } else {
                dependencies.contains(&(stats.caller.clone(), stats.callee.clone()))
            };
            MapEdge { stats, declared }
        })
        .collect();
    let observed: BTreeSet<(&str, &str)> = edges
        .iter()
        .map(|e| (e.stats.caller.as_str(), e.stats.callee.as_str()))
        .collect();
    let unused = dependencies
        .iter()
        .filter(|(caller, callee)| !observed.contains(&(caller.as_str(), callee.as_str())))
        .map(|(caller, callee)| Dependency {
            caller: caller.clone(),
            callee: callee.clone(),
        })
        .collect();
    AppMap {
        window_seconds: window.as_secs_f64(),
        nodes,
        edges,
        unused,
    }
}

pub(crate) async fn metrics(State(fleet): State<Arc<dyn Fleet>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        exposition(&*fleet),
    )
        .into_response()
}

/// The whole `/metrics` text: the data plane's call families, then what the control plane knows
/// of breakers and instances, then the trace store's losses.
fn exposition(fleet: &dyn Fleet) -> String {
    let mut out = Exposition::new();
    fleet.metrics().render(&mut out);

    out.family(
        "flotilla_breaker_state",
        "State of each caller's circuit breaker for a callee service: 0 closed, 1 half-open, 2 open.",
        MetricType::Gauge,
    );
    // Instance outlier records are left out: their caller and service labels alone would
    // collide with the service breaker's series.
    for breaker in fleet.breakers().iter().filter(|b| b.instance.is_none()) {
        let state = match breaker.state {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        };
        let labels = [
            ("caller", breaker.caller.as_str()),
            ("service", breaker.service.as_str()),
        ];
        out.sample("", &labels, state);
    }

    let services = fleet.services();
    let instances = || services.iter().flat_map(|s| &s.instances);
    out.family(
        "flotilla_instance_restarts_total",
        "Times an instance was restarted after exiting on its own.",
        MetricType::Counter,
    );
    for i in instances() {
        let labels = [
            ("service", i.service.as_str()),
            ("instance", i.instance.as_str()),
        ];
        out.sample("", &labels, f64::from(i.restarts));
    }
    out.family(
        "flotilla_instance_up",
        "Whether an instance passes its health checks (1) or not (0).",
        MetricType::Gauge,
    );
    for i in instances() {
        let labels = [
            ("service", i.service.as_str()),
            ("instance", i.instance.as_str()),
        ];
        out.sample("", &labels, if i.health == "healthy" { 1.0 } else { 0.0 });
    }

    render_trace_store(fleet.trace_store(), &mut out);
    fleet.render_pipeline_metrics(&mut out);
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{FakeFleet, call, fleet, orders};
    use crate::{InstanceView, ServiceView};
    use flotilla_telemetry::{HttpHop, Span, SpanId, SpanKind, SpanStatus};

    /// One proxied call as the trace layer records it: the caller's CLIENT span (a child of
    /// `parent`) and the callee's SERVER span under it, `ms` long, starting `at_ms` after `t0`.
    fn hop(
        trace: TraceId,
        parent: Option<SpanId>,
        (caller, callee): (&str, &str),
        t0: SystemTime,
        at_ms: u64,
        ms: u64,
    ) -> (Span, Span) {
        let client = Span {
            trace_id: trace,
            span_id: SpanId::random(),
            parent_span_id: parent,
            service: caller.into(),
            instance: None,
            name: format!("GET {callee}").into(),
            kind: SpanKind::Client,
            start: t0 + Duration::from_millis(at_ms),
            duration: Duration::from_millis(ms),
            status: SpanStatus::Unset,
            status_message: None,
            http: HttpHop {
                status: Some(200),
                peer_service: Some(callee.into()),
                ..HttpHop::default()
            },
            attributes: Vec::new(),
        };
        let server = Span {
            span_id: SpanId::random(),
            parent_span_id: Some(client.span_id),
            service: callee.into(),
            instance: Some(format!("{callee}-1").into()),
            name: "GET /".into(),
            kind: SpanKind::Server,
            http: HttpHop {
                status: Some(200),
                peer_service: Some(caller.into()),
                ..HttpHop::default()
            },
            ..client.clone()
        };
        (client, server)
    }

    /// gateway → orders → stock, recorded into the fleet's store; returns its spans in order.
    fn record_chain(fleet: &FakeFleet, t0: SystemTime) -> Vec<Span> {
        let trace = TraceId::random();
        let (a, b) = hop(trace, None, (GATEWAY, "orders"), t0, 0, 40);
        let (c, d) = hop(trace, Some(b.span_id), ("orders", "stock"), t0, 10, 20);
        let spans = vec![a, b, c, d];
        // Out of order, as sidecars finish before the gateway does.
        for span in spans.iter().rev() {
            fleet.traces.record(span.clone());
        }
        spans
    }

    fn json<T: serde::de::DeserializeOwned>(body: &str) -> T {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    #[tokio::test]
    async fn traces_are_listed_and_filtered() {
        let fleet = fleet();
        let t0 = SystemTime::now() - Duration::from_secs(60);
        let chain = record_chain(&fleet, t0);
        // A failing call, newer.
        let (mut failed, _) = hop(TraceId::random(), None, (GATEWAY, "orders"), t0, 5_000, 3);
        failed.status = SpanStatus::Error;
        failed.http.status = Some(503);
        fleet.traces.record(failed.clone());
        let stock = ServiceView {
            name: "stock".into(),
            ..orders()
        };
        fleet.services.lock().expect("services").push(stock);

        let list = |uri: &'static str| {
            let fleet = fleet.clone();
            async move {
                let (status, content_type, body) = call(fleet, "GET", uri).await;
                assert_eq!(status, StatusCode::OK, "{uri}: {body}");
                assert_eq!(content_type, "application/json");
                json::<Vec<TraceSummary>>(&body)
            }
        };
        let all = list("/v1/traces").await;
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].trace_id, failed.trace_id, "newest first");
        let chained = &all[1];
        assert_eq!(chained.trace_id, chain[0].trace_id);
        assert_eq!(chained.spans, 4);
        assert_eq!(chained.services, ["gateway", "orders", "stock"]);
        assert_eq!(
            (chained.root_service.as_str(), chained.root_name.as_str()),
            ("gateway", "GET orders")
        );
        assert!(all[0].error && !chained.error);

        assert_eq!(list("/v1/traces?service=stock").await.len(), 1);
        assert_eq!(list("/v1/traces?service=gateway").await.len(), 2);
        let errors = list("/v1/traces?errors=true").await;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].trace_id, failed.trace_id);
        let slowest = list("/v1/traces?slowest=1").await;
        assert_eq!(slowest[0].trace_id, chained.trace_id, "40ms beats 3ms");
        assert_eq!(list("/v1/traces?limit=1").await.len(), 1);
        assert!(list("/v1/traces?since=10s").await.is_empty());
    }

    #[tokio::test]
    async fn traces_are_limited_to_50_by_default() {
        let fleet = fleet();
        let t0 = SystemTime::now();
        for _ in 0..60 {
            record_chain(&fleet, t0);
        }
        let (_, _, body) = call(fleet.clone(), "GET", "/v1/traces").await;
        assert_eq!(json::<Vec<TraceSummary>>(&body).len(), 50);
        let (_, _, body) = call(fleet, "GET", "/v1/traces?limit=100000").await;
        assert_eq!(json::<Vec<TraceSummary>>(&body).len(), 60);
    }

    #[tokio::test]
    async fn bad_trace_queries_are_problems() {
        for (uri, want) in [
            ("/v1/traces?service=nosuch", StatusCode::NOT_FOUND),
            ("/v1/traces?since=yesterday", StatusCode::BAD_REQUEST),
            ("/v1/traces?limit=-1", StatusCode::BAD_REQUEST),
            ("/v1/traces?slowest=many", StatusCode::BAD_REQUEST),
            ("/v1/traces?errors=maybe", StatusCode::BAD_REQUEST),
            ("/v1/traces?colour=red", StatusCode::BAD_REQUEST),
            ("/v1/traces/xyz", StatusCode::BAD_REQUEST),
            (
                "/v1/traces/00000000000000000000000000000000",
                StatusCode::BAD_REQUEST,
            ),
            (
                "/v1/traces/4bf92f3577b34da6a3ce929d0e0e4736",
                StatusCode::NOT_FOUND,
            ),
        ] {
            let (status, content_type, body) = call(fleet(), "GET", uri).await;
            assert_eq!(status, want, "{uri}: {body}");
            assert_eq!(content_type, "application/problem+json", "{uri}");
            let problem: serde_json::Value = json(&body);
            assert_eq!(problem["status"], want.as_u16(), "{uri}");
        }
    }

    #[tokio::test]
    async fn one_trace_is_its_spans_parents_first() {
        let fleet = fleet();
        let chain = record_chain(&fleet, SystemTime::now());
        let id = chain[0].trace_id;
        let (status, content_type, body) =
            call(fleet.clone(), "GET", &format!("/v1/traces/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(content_type, "application/json");
        let detail: TraceDetail = json(&body);
        assert_eq!(detail.trace_id, id);
        let ids: Vec<SpanId> = detail.spans.iter().map(|s| s.span_id).collect();
        let want: Vec<SpanId> = chain.iter().map(|s| s.span_id).collect();
        assert_eq!(ids, want);
        // Upper-case ids are the same id.
        let upper = id.to_string().to_uppercase();
        let (status, _, _) = call(fleet, "GET", &format!("/v1/traces/{upper}")).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn health_rolls_instances_up_to_the_app() {
        let fleet = fleet();
        let (status, _, body) = call(fleet.clone(), "GET", "/v1/health").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json::<serde_json::Value>(&body),
            serde_json::json!({
                "status": "healthy",
                "services": [{
                    "name": "orders", "status": "healthy", "healthy": 1, "replicas": 1,
                    "reason": "1 of 1 instances healthy"
                }]
            })
        );

        let refused = InstanceView {
            instance: "orders-2".into(),
            health: "unhealthy".into(),
            last_error: Some("connection refused".into()),
            ..orders().instances[0].clone()
        };
        let mut two = orders();
        two.replicas = 2;
        two.instances.push(refused);
        let stock = ServiceView {
            name: "stock".into(),
            healthy: 0,
            instances: vec![],
            ..orders()
        };
        *fleet.services.lock().expect("services") = vec![two, stock];
        let (status, _, body) = call(fleet, "GET", "/v1/health").await;
        assert_eq!(status, StatusCode::OK);
        let health: AppHealth = json(&body);
        assert_eq!(health.status, crate::HealthStatus::Degraded, "{body}");
        assert_eq!(
            health.services[0].reason,
            "1 of 2 instances healthy (orders-2: connection refused)"
        );
        assert_eq!(health.services[1].status, crate::HealthStatus::Down);
    }

    #[tokio::test]
    async fn the_map_shows_observed_edges_and_unused_dependencies() {
        let fleet = fleet();
        let now = SystemTime::now();
        record_chain(&fleet, now - Duration::from_secs(10));
        record_chain(&fleet, now - Duration::from_secs(5));
        // Outside a 1m window.
        record_chain(&fleet, now - Duration::from_secs(120));
        // A call nobody declared.
        let (client, _) = hop(TraceId::random(), None, ("orders", "audit"), now, 0, 1);
        fleet.traces.record(Span {
            start: now - Duration::from_secs(1),
            ..client
        });

        let (status, content_type, body) = call(fleet.clone(), "GET", "/v1/map?window=1m").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(content_type, "application/json");
        let map: AppMap = json(&body);
        assert_eq!(map.window_seconds, 60.0);
        let nodes: Vec<&str> = map.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(nodes, ["gateway", "orders"]);
        assert_eq!(map.nodes[1].health, crate::HealthStatus::Healthy);
        assert_eq!((map.nodes[1].instances, map.nodes[1].healthy), (1, 1));
        let edges: Vec<(&str, &str, u64, bool)> = map
            .edges
            .iter()
            .map(|e| {
                (
                    &*e.stats.caller,
                    &*e.stats.callee,
                    e.stats.requests,
                    e.declared,
                )
            })
            .collect();
        assert_eq!(
            edges,
            [
                ("gateway", "orders", 2, true),
                ("orders", "audit", 1, false),
                ("orders", "stock", 2, true),
            ]
        );
        assert_eq!(map.edges[0].stats.p50_ms, 40.0);
        assert_eq!(
            map.unused,
            [Dependency {
                caller: "orders".into(),
                callee: "payments".into()
            }]
        );
        // EdgeStats' fields sit beside `declared`, not under a key of their own.
        let raw: serde_json::Value = json(&body);
        assert_eq!(raw["edges"][0]["requests_per_second"], 2.0 / 60.0);
        assert_eq!(raw["edges"][0]["declared"], true);

        // The default window, five minutes, takes in the older chain too.
        let (_, _, body) = call(fleet, "GET", "/v1/map").await;
        let map: AppMap = json(&body);
        assert_eq!(map.window_seconds, 300.0);
        assert_eq!(map.edges[0].stats.requests, 3);
    }

    #[tokio::test]
    async fn bad_map_windows_are_400_problems() {
        for uri in [
            "/v1/map?window=soon",
            "/v1/map?window=0s",
            "/v1/map?window=500ms",
            "/v1/map?window=48h",
            "/v1/map?colour=red",
        ] {
            let (status, content_type, body) = call(fleet(), "GET", uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
            assert_eq!(content_type, "application/problem+json", "{uri}");
        }
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_with_every_family() {
        let fleet = fleet();
        fleet
            .metrics
            .record_call(GATEWAY, "orders", Some(200), Duration::from_millis(3), 1);
        fleet.metrics.add_in_flight("orders", "stock", 1);
        let (status, content_type, body) = call(fleet, "GET", "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        for line in [
            r#"flotilla_requests_total{caller="gateway",callee="orders",class="2xx"} 1"#,
            r#"flotilla_retries_total{caller="gateway",callee="orders"} 1"#,
            r#"flotilla_requests_in_flight{caller="orders",callee="stock"} 1"#,
            r#"flotilla_request_duration_seconds_count{caller="gateway",callee="orders"} 1"#,
            "# TYPE flotilla_breaker_state gauge",
            r#"flotilla_breaker_state{caller="gateway",service="orders"} 2"#,
            "# TYPE flotilla_instance_restarts_total counter",
            r#"flotilla_instance_restarts_total{service="orders",instance="orders-1"} 2"#,
            "# TYPE flotilla_instance_up gauge",
            r#"flotilla_instance_up{service="orders",instance="orders-1"} 1"#,
            "flotilla_spans_dropped_total 0",
        ] {
            assert!(body.lines().any(|l| l == line), "{line} missing:\n{body}");
        }
        // Each sample follows its own family's TYPE line.
        let mut family = "";
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap_or_default();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(family), "{line} outside {family}");
            }
        }
    }
}
