//! The fleet's sagas: the store the manifest chooses, steps called through the proxy stack under
//! the caller name `flotilla` (so policies, breakers, spans and the map's `flotilla → service`
//! edges apply), outcomes announced on the `saga.*` topics, and sagas started by events.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use flotilla_events::cloudevent::Defaults;
use flotilla_events::engine::{Events, Subscriber};
use flotilla_events::{BoxFuture, Event};
use flotilla_manifest::{Manifest, SagaStoreKind};
use flotilla_proxy::Target;
use flotilla_saga::SagaStore;
use flotilla_saga::engine::{
    Config, Orchestrator, SagaEvents, StepCaller, StepRequest, StepResponse,
};
use flotilla_saga::sqlite::SqliteStore;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::events::{BROKER_CALLER, FlotillaStack};

/// Where sagas announce how they ended.
pub const OUTCOME_TOPICS: [&str; 3] = ["saga.completed", "saga.compensated", "saga.failed"];

/// The consumer group (and subscriber name) of saga `name`'s trigger: one per saga, so two sagas
/// triggered by one topic each get every event.
fn trigger_group(name: &str) -> String {
    format!("{BROKER_CALLER}:saga:{name}")
}

/// A subscription per triggered saga, delivered in process (see [`Triggers`]).
pub fn trigger_subscribers(manifest: &Manifest) -> Vec<Subscriber> {
    manifest
        .sagas
        .sagas
        .iter()
        .filter_map(|saga| {
            let trigger = saga.trigger.as_ref()?;
            Some(Subscriber {
                topic: trigger.topic.clone(),
                service: trigger_group(&saga.name),
                path: format!("/v1/sagas/{}", saga.name),
                max_attempts: 8,
                backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(30),
            })
        })
        .collect()
}

/// Starts sagas from trigger deliveries. The event engine exists before the orchestrator (which
/// announces through it), so the orchestrator is set once both run.
#[derive(Default)]
pub struct Triggers {
    orchestrator: OnceLock<Orchestrator>,
}

impl Triggers {
    pub fn set(&self, orchestrator: Orchestrator) {
        let _ = self.orchestrator.set(orchestrator);
    }

    /// Whether `service` is a trigger's subscriber name.
    pub fn is_trigger(service: &str) -> bool {
        service
            .strip_prefix(BROKER_CALLER)
            .is_some_and(|rest| rest.starts_with(":saga:"))
    }

    /// Starts the saga `path` names with the event's `data` as input. The event's source and id
    /// are the start's idempotency key, so a redelivered event starts nothing new.
    pub async fn deliver(
        &self,
        path: &str,
        event: &Bytes,
        traceparent: Option<&str>,
    ) -> Result<(), String> {
        let name = path
            .strip_prefix("/v1/sagas/")
            .ok_or_else(|| format!("no saga at {path}"))?;
        let orchestrator = self
            .orchestrator
            .get()
            .ok_or("the saga orchestrator is not running")?;
        let event: Value =
            serde_json::from_slice(event).map_err(|err| format!("not a CloudEvent: {err}"))?;
        let text = |field: &str| event.get(field).and_then(Value::as_str).unwrap_or_default();
        let key = format!("event:{}:{}", text("source"), text("id"));
        let input = event.get("data").cloned().unwrap_or(Value::Null);
        orchestrator
            .start_saga(name, input, Some(key), traceparent.map(str::to_owned))
            .await
            .map(|_| ())
            .map_err(|err| err.to_string())
    }
}

/// The store `[sagas] store` names: SQLite under the state directory (this process its only
/// user), or PostgreSQL (shared with other orchestrators). The flag says which.
pub async fn open_store(
    manifest: &Manifest,
    state_dir: &Path,
) -> Result<(Arc<dyn SagaStore>, bool)> {
    Ok(match &manifest.sagas.store {
        SagaStoreKind::Sqlite => {
            let dir = state_dir.join("sagas");
            let store = SqliteStore::open(&dir)
                .with_context(|| format!("cannot open the saga store in {}", dir.display()))?;
            (Arc::new(store), true)
        }
        SagaStoreKind::Postgres { url } => {
            // A schema per app: apps sharing a database never see (or claim) each other's sagas.
            let schema = format!(
                "flotilla_{}",
                manifest
                    .app
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '_'
                    })
                    .collect::<String>()
            );
            let store = flotilla_saga::postgres::PostgresStore::connect(url, Some(&schema))
                .await
                .with_context(|| format!("cannot open the saga store at {}", redact(url)))?;
            (Arc::new(store), false)
        }
    })
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Starts the orchestrator when the manifest declares sagas.
pub fn start(
    manifest: &Manifest,
    store: Arc<dyn SagaStore>,
    exclusive: bool,
    stack: FlotillaStack,
    events: Arc<Events>,
) -> Orchestrator {
    let owner = format!(
        "{}-{}-{:08x}",
        manifest.app,
        std::process::id(),
        fastrand::u32(..)
    );
    let config = Config {
        takeover_on_start: exclusive,
        ..Config::new(owner)
    };
    Orchestrator::start(
        store,
        &manifest.sagas.sagas,
        Arc::new(ProxyCaller { stack }),
        Some(Arc::new(Announcer { events })),
        config,
    )
}

/// Saga steps through the shared proxy stack.
struct ProxyCaller {
    stack: FlotillaStack,
}

/// How much of an answer is kept: a step's response is stored in the saga's log.
const MAX_RESPONSE: usize = 1 << 20;

impl StepCaller for ProxyCaller {
    fn call<'a>(&'a self, step: StepRequest<'a>) -> BoxFuture<'a, StepResponse> {
        Box::pin(async move {
            let mut builder = Request::builder()
                .method(step.method)
                .uri(step.path.to_owned())
                .header("idempotency-key", step.idempotency_key);
            if let Some(traceparent) = step.traceparent {
                builder = builder.header("traceparent", traceparent);
            }
            if step.body.is_some() {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
            }
            let mut request = match builder.body(Full::new(step.body.unwrap_or_default())) {
                Ok(request) => request,
                Err(err) => return StepResponse::NoAnswer(format!("invalid request: {err}")),
            };
            request
                .extensions_mut()
                .insert(Target::service(Arc::from(step.service)));
            let exchange = exchange(self.stack.clone(), request, step.service);
            match tokio::time::timeout(step.timeout, exchange).await {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => StepResponse::NoAnswer(err),
                Err(_) => StepResponse::NoAnswer(format!(
                    "{} gave no answer within {:?}",
                    step.service, step.timeout
                )),
            }
        })
    }
}

async fn exchange(
    stack: FlotillaStack,
    request: Request<Full<Bytes>>,
    service: &str,
) -> Result<StepResponse, String> {
    let response = stack
        .oneshot(request)
        .await
        .unwrap_or_else(|never| match never {});
    let status = response.status().as_u16();
    let body = match response.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            return Err(format!(
                "{service} answered {status} but its body failed: {err}"
            ));
        }
    };
    if body.len() > MAX_RESPONSE {
        // Stored in the saga's log and rendered into later calls: refused rather than kept.
        return Ok(StepResponse::Answered {
            status: 502,
            body: Bytes::from(format!(
                "{service} answered {status} with {} bytes; a step's response is kept only up to {MAX_RESPONSE}",
                body.len()
            )),
        });
    }
    Ok(StepResponse::Answered { status, body })
}

/// Outcomes as CloudEvents on the `saga.*` topics.
struct Announcer {
    events: Arc<Events>,
}

impl SagaEvents for Announcer {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        id: &'a str,
        subject: &'a str,
        data: Value,
        traceparent: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let body = json!({
                "specversion": "1.0",
                "id": id,
                "source": "/flotilla/sagas",
                "type": topic,
                "subject": subject,
                "datacontenttype": "application/json",
                "data": data,
            });
            let bytes = serde_json::to_vec(&body).map_err(|err| err.to_string())?;
            let defaults = Defaults {
                publisher: Some(BROKER_CALLER),
                traceparent,
            };
            let event = Event::from_structured(&bytes, &defaults, usize::MAX)
                .map_err(|err| err.to_string())?;
            self.events
                .publish(topic, &event)
                .await
                .map(|_| ())
                .map_err(|err| err.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://app:secret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
    }

    #[test]
    fn trigger_groups_are_recognised() {
        assert!(Triggers::is_trigger(&trigger_group("place-order")));
        assert!(!Triggers::is_trigger("flotilla"));
        assert!(!Triggers::is_trigger("orders"));
    }
}
