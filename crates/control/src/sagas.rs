//! `/v1/sagas`: starting sagas (what services reach as `http://flotilla/v1/sagas/{name}` through
//! their sidecar), listing them, and each saga's timeline.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_saga::engine::{Orchestrator, StartError, StepView, timeline};
use flotilla_saga::{ListFilter, SagaError, SagaRecord, SagaSummary, Status, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Fleet, Params, Problem, read_query};

/// Largest saga input accepted.
const MAX_INPUT: usize = 1 << 20;
/// Longest `Idempotency-Key`.
const MAX_KEY: usize = 255;
/// Longest `?wait=`.
const MAX_WAIT: Duration = Duration::from_secs(60);
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 1_000;

/// A saga as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SagaItem {
    pub id: String,
    pub name: String,
    pub status: Status,
    #[serde(with = "rfc3339")]
    pub created_at: SystemTime,
    #[serde(with = "rfc3339")]
    pub updated_at: SystemTime,
    pub error: Option<SagaError>,
}

/// A saga with its timeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SagaView {
    #[serde(flatten)]
    pub item: SagaItem,
    pub input: Value,
    /// The start's idempotency key.
    pub key: Option<String>,
    /// The trace the saga's calls belong to.
    pub trace_id: Option<String>,
    pub deadline: Option<String>,
    pub steps: Vec<StepView>,
}

/// What a start answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartedSaga {
    pub id: String,
    pub name: String,
    pub status: Status,
    /// False when the idempotency key had already started this saga.
    pub created: bool,
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn item(summary: &SagaSummary) -> SagaItem {
    SagaItem {
        id: summary.id.clone(),
        name: summary.name.clone(),
        status: summary.status,
        created_at: time(summary.created_ms),
        updated_at: time(summary.updated_ms),
        error: summary.error.clone(),
    }
}

fn view(orchestrator: &Orchestrator, record: &SagaRecord) -> SagaView {
    SagaView {
        item: item(&record.summary),
        input: record.input.clone(),
        key: record.key.clone(),
        trace_id: record
            .traceparent
            .as_deref()
            .and_then(|t| t.split('-').nth(1))
            .map(str::to_owned),
        deadline: record
            .deadline_ms
            .map(|ms| humantime::format_rfc3339_millis(time(ms)).to_string()),
        steps: orchestrator
            .definition(&record.summary.name)
            .map(|definition| timeline(definition, record))
            .unwrap_or_default(),
    }
}

fn orchestrator_of(fleet: &dyn Fleet) -> Result<Orchestrator, Problem> {
    fleet.sagas().ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "no sagas",
            "this app declares no sagas; add a [sagas.NAME] section to flotilla.toml",
        )
    })
}

fn store_problem(error: StoreError) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "saga store unavailable",
        error.to_string(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    status: Option<String>,
    name: Option<String>,
    limit: Option<u32>,
}

pub(crate) async fn list(
    State(fleet): State<Arc<dyn Fleet>>,
    params: Params<ListParams>,
) -> Result<Json<Vec<SagaItem>>, Problem> {
    let params = read_query(params)?;
    let orchestrator = orchestrator_of(&*fleet)?;
    let status = params
        .status
        .as_deref()
        .map(|text| {
            Status::parse(text).ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "bad `status`",
                    format!(
                        "unknown status {text:?}; use one of running, compensating, completed, compensated, failed"
                    ),
                )
            })
        })
        .transpose()?;
    let filter = ListFilter {
        status,
        name: params.name,
        before_ms: None,
        limit: params.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
    };
    let sagas = orchestrator.list(&filter).await.map_err(store_problem)?;
    Ok(Json(sagas.iter().map(item).collect()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GetParams {
    wait: Option<String>,
}

/// One saga with its timeline; `?wait=10s` holds the answer until the saga is final (or the
/// wait is over).
pub(crate) async fn get(
    State(fleet): State<Arc<dyn Fleet>>,
    Path(id): Path<String>,
    params: Params<GetParams>,
) -> Result<Json<SagaView>, Problem> {
    let params = read_query(params)?;
    let orchestrator = orchestrator_of(&*fleet)?;
    let wait = match params.wait.as_deref() {
        None => Duration::ZERO,
        Some(text) => humantime::parse_duration(text)
            .map_err(|err| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "bad `wait`",
                    format!("`wait` must be a duration like 10s, not {text:?} ({err})"),
                )
            })?
            .min(MAX_WAIT),
    };
    let record = if wait.is_zero() {
        orchestrator.get(&id).await
    } else {
        orchestrator.wait(&id, wait).await
    }
    .map_err(store_problem)?
    .ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "unknown saga",
            format!("no saga {id}"),
        )
    })?;
    Ok(Json(view(&orchestrator, &record)))
}

/// Starts saga `name` with the body as its input: 202 and its id, or 200 with the saga an
/// earlier start with the same `Idempotency-Key` created.
pub(crate) async fn start(
    State(fleet): State<Arc<dyn Fleet>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let orchestrator = orchestrator_of(&*fleet)?;
    if orchestrator.definition(&name).is_none() {
        let declared: Vec<&str> = orchestrator
            .definitions()
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown saga",
            format!(
                "this app has no saga `{name}`; declared sagas are: {}",
                declared.join(", ")
            ),
        ));
    }
    let body = axum::body::to_bytes(body, MAX_INPUT).await.map_err(|_| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "input too large",
            format!("a saga's input is at most {MAX_INPUT} bytes"),
        )
    })?;
    let input: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "input is not JSON",
                format!("the body is the saga's input and must be JSON: {err}"),
            )
        })?
    };
    let text = |name: &str| headers.get(name).map(|v| v.to_str());
    let key = match text("idempotency-key") {
        None => None,
        Some(Ok(key)) if !key.is_empty() && key.len() <= MAX_KEY => Some(key.to_owned()),
        Some(_) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "bad Idempotency-Key",
                format!("Idempotency-Key must be 1 to {MAX_KEY} visible ASCII characters"),
            ));
        }
    };
    let traceparent = text("traceparent").and_then(Result::ok).map(str::to_owned);
    let started = orchestrator
        .start_saga(&name, input, key, traceparent)
        .await
        .map_err(|err| match err {
            StartError::Unknown(name) => Problem::new(
                StatusCode::NOT_FOUND,
                "unknown saga",
                format!("this app has no saga `{name}`"),
            ),
            StartError::Store(err) => store_problem(err),
        })?;
    let status = if started.created {
        Status::Running
    } else {
        orchestrator
            .get(&started.id)
            .await
            .map_err(store_problem)?
            .map_or(Status::Running, |r| r.summary.status)
    };
    let location = format!("/v1/sagas/{}", started.id);
    let code = if started.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let answer = StartedSaga {
        id: started.id,
        name,
        status,
        created: started.created,
    };
    Ok((code, [(header::LOCATION, location)], Json(answer)).into_response())
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}
