//! `/v1/topics`: publishing (what services reach as `http://flotilla/v1/topics/{topic}/events`
//! through their sidecar), the topics' offsets and subscribers' lag, reading a topic, replays and
//! dead-letter redrives.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_events::cloudevent::{Defaults, STRUCTURED};
use flotilla_events::engine::{Events, PublishError, ReplayFrom, TopicOverview};
use flotilla_events::{BrokerError, Event, EventError};
use serde::{Deserialize, Serialize};

use crate::{Fleet, Params, Problem, read_query, unknown_service};

/// The header the sidecar sets on calls to Flotilla: the publishing service.
const CALLER_HEADER: &str = "x-flotilla-caller";

fn events_of(fleet: &dyn Fleet) -> Result<Arc<Events>, Problem> {
    fleet.events().ok_or_else(|| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "events are not running",
            "the event broker is not running in this fleet; see `flotilla logs` for why",
        )
    })
}

fn unknown_topic(topic: &str, events: &Events) -> Problem {
    let known: Vec<&str> = events.topics().iter().map(|t| t.name.as_str()).collect();
    let known = if known.is_empty() {
        "no topics are declared; add a [topics.\"NAME\"] section to flotilla.toml".to_owned()
    } else {
        format!("declared topics are: {}", known.join(", "))
    };
    Problem::new(
        StatusCode::NOT_FOUND,
        "unknown topic",
        format!("this app has no topic `{topic}`; {known}"),
    )
}

fn broker_problem(error: BrokerError) -> Problem {
    match error {
        BrokerError::UnknownTopic(topic) => Problem::new(
            StatusCode::NOT_FOUND,
            "unknown topic",
            format!("this app has no topic `{topic}`"),
        ),
        BrokerError::UnknownPartition { topic, partition } => Problem::new(
            StatusCode::NOT_FOUND,
            "unknown partition",
            format!("topic `{topic}` has no partition {partition}"),
        ),
        BrokerError::Full(detail) => Problem::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "no space left",
            format!("the event was not stored: {detail}"),
        ),
        other => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker unavailable",
            other.to_string(),
        ),
    }
}

fn publish_problem(error: PublishError, events: &Events) -> Problem {
    match error {
        PublishError::UnknownTopic(topic) => unknown_topic(&topic, events),
        PublishError::Broker(error) => broker_problem(error),
    }
}

pub(crate) async fn topics(
    State(fleet): State<Arc<dyn Fleet>>,
) -> Result<Json<Vec<TopicOverview>>, Problem> {
    let events = events_of(&*fleet)?;
    events.overview().await.map(Json).map_err(broker_problem)
}

pub(crate) async fn topic(
    State(fleet): State<Arc<dyn Fleet>>,
    Path(topic): Path<String>,
) -> Result<Json<TopicOverview>, Problem> {
    let events = events_of(&*fleet)?;
    if events.partitions(&topic).is_none() || topic.ends_with(".dlq") {
        return Err(unknown_topic(&topic, &events));
    }
    events
        .topic_overview(&topic)
        .await
        .map(Json)
        .map_err(broker_problem)
}

/// What a publish answers: where the event is, durably.
#[derive(Debug, Serialize, Deserialize)]
pub struct PublishedEvent {
    pub id: String,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

pub(crate) async fn publish(
    State(fleet): State<Arc<dyn Fleet>>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let events = events_of(&*fleet)?;
    if events.partitions(&topic).is_none() || topic.ends_with(".dlq") {
        return Err(unknown_topic(&topic, &events));
    }
    let limit = events.max_event_size();
    // Refused before reading when the length is declared, and while reading otherwise: an
    // oversized body is never buffered whole.
    let too_large = |size: Option<usize>| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "event too large",
            match size {
                Some(size) => format!(
                    "the event is {size} bytes; the limit is {limit} (`[events] max_event_size`)"
                ),
                None => format!(
                    "the event is over the limit of {limit} bytes (`[events] max_event_size`)"
                ),
            },
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(size) = declared.filter(|size| *size > limit) {
        return Err(too_large(Some(size)));
    }
    // Some slack over the limit: the filled-in attributes count too, checked after parsing.
    let body = axum::body::to_bytes(body, limit + 1)
        .await
        .map_err(|_| too_large(None))?;

    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let defaults = Defaults {
        publisher: text(CALLER_HEADER),
        traceparent: text("traceparent"),
    };
    let content_type = text(header::CONTENT_TYPE.as_str());
    let media_type = content_type
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let binary = headers.contains_key("ce-specversion");
    let parsed = if media_type == "application/cloudevents-batch+json" {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "batches are not supported",
            "publish one event per request (application/cloudevents+json, or binary mode with ce-* headers)",
        ));
    } else if binary && media_type != STRUCTURED {
        let pairs = headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
        Event::from_binary(pairs, content_type, &body, &defaults, limit)
    } else if media_type == STRUCTURED || media_type == "application/json" || media_type.is_empty()
    {
        Event::from_structured(&body, &defaults, limit)
    } else {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not a CloudEvent",
            format!(
                "a {media_type} body without ce-* headers is not a CloudEvent: send application/cloudevents+json, or binary mode with ce-specversion, ce-type (and ce-id, ce-source) headers"
            ),
        ));
    };
    let event = parsed.map_err(|error| match error {
        EventError::TooLarge { size, .. } => too_large(Some(size)),
        other => Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid CloudEvent",
            other.to_string(),
        ),
    })?;
    let published = events
        .publish(&topic, &event)
        .await
        .map_err(|e| publish_problem(e, &events))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(PublishedEvent {
            id: event.id,
            topic,
            partition: published.partition,
            offset: published.offset,
        }),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadParams {
    #[serde(default)]
    partition: u32,
    #[serde(default)]
    from: u64,
    limit: Option<usize>,
}

/// One stored event as `/v1/topics/{topic}/events` lists it.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredEvent {
    pub partition: u32,
    pub offset: u64,
    #[serde(with = "humantime_serde_compat")]
    pub time: SystemTime,
    /// The CloudEvent, structured mode.
    pub event: serde_json::Value,
}

/// RFC 3339 on the wire, as every time in this API.
mod humantime_serde_compat {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(*time))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

const MAX_READ: usize = 1_000;

pub(crate) async fn read(
    State(fleet): State<Arc<dyn Fleet>>,
    Path(topic): Path<String>,
    query: Params<ReadParams>,
) -> Result<Json<Vec<StoredEvent>>, Problem> {
    let params = read_query(query)?;
    let events = events_of(&*fleet)?;
    let records = events
        .read(
            &topic,
            params.partition,
            params.from,
            params.limit.unwrap_or(100).min(MAX_READ),
        )
        .await
        .map_err(|e| publish_problem(e, &events))?;
    Ok(Json(
        records
            .into_iter()
            .map(|record| StoredEvent {
                partition: record.partition,
                offset: record.offset,
                time: record.time,
                event: serde_json::from_slice(&record.event)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&record.event).into()),
            })
            .collect(),
    ))
}

/// `POST /v1/topics/{topic}/replay`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// The subscribing service to deliver to again.
    pub service: String,
    /// From this offset in every partition…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_offset: Option<u64>,
    /// …or from this time (RFC 3339, or a duration back from now like `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_time: Option<String>,
}

pub(crate) async fn replay(
    State(fleet): State<Arc<dyn Fleet>>,
    Path(topic): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, Problem> {
    let events = events_of(&*fleet)?;
    let request: ReplayRequest = serde_json::from_slice(&body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "bad replay",
            format!("expected {{\"service\": ..., \"from_offset\": N or \"from_time\": ...}}: {e}"),
        )
    })?;
    if events.partitions(&topic).is_none() || topic.ends_with(".dlq") {
        return Err(unknown_topic(&topic, &events));
    }
    if !fleet.services().iter().any(|s| s.name == request.service) {
        return Err(unknown_service(request.service));
    }
    if !events
        .subscribers()
        .iter()
        .any(|s| s.topic == topic && s.service == request.service)
    {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "not a subscriber",
            format!(
                "`{}` does not subscribe to `{topic}`; add a [[subscriptions]] entry",
                request.service
            ),
        ));
    }
    let from = match (request.from_offset, request.from_time.as_deref()) {
        (Some(offset), None) => ReplayFrom::Offset(offset),
        (None, Some(time)) => {
            ReplayFrom::Time(crate::since_param(Some(time))?.unwrap_or(SystemTime::UNIX_EPOCH))
        }
        _ => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "bad replay",
                "give exactly one of `from_offset` and `from_time`",
            ));
        }
    };
    let positions = events
        .replay(&topic, &request.service, from)
        .await
        .map_err(|e| publish_problem(e, &events))?;
    Ok((StatusCode::ACCEPTED, Json(positions)).into_response())
}

/// What a redrive did.
#[derive(Debug, Serialize, Deserialize)]
pub struct Redriven {
    pub topic: String,
    pub redriven: u64,
}

pub(crate) async fn redrive(
    State(fleet): State<Arc<dyn Fleet>>,
    Path(topic): Path<String>,
) -> Result<Json<Redriven>, Problem> {
    let events = events_of(&*fleet)?;
    if !topic.ends_with(".dlq") {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "not a dead-letter topic",
            format!("redrive a dead-letter topic: `{topic}.dlq`"),
        ));
    }
    if events.partitions(&topic).is_none() {
        return Err(unknown_topic(&topic, &events));
    }
    let redriven = events
        .redrive(&topic)
        .await
        .map_err(|e| publish_problem(e, &events))?;
    Ok(Json(Redriven { topic, redriven }))
}
