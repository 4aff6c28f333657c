//! The fleet's event streams: the broker the manifest chooses, and deliveries sent through the
//! proxy stack under the caller name `flotilla`, so the callee's policy, breakers, spans and the
//! map's `flotilla → service` edges apply to them like to any call.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use flotilla_events::engine::{Events, Pusher, Subscriber};
use flotilla_events::log::{EventLog, FsyncPolicy, LogConfig};
use flotilla_events::nats::JetStream;
use flotilla_events::{BoxFuture, Broker, TopicConfig};
use flotilla_manifest::{EventBackend, Fsync, Manifest};
use flotilla_proxy::resilience::ResilienceLayer;
use flotilla_proxy::{Caller, PresetTarget, ProxySettings, Resilience, Target};
use flotilla_registry::Discovery;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;

/// The name deliveries come from, in spans, metrics and on the map.
pub const BROKER_CALLER: &str = "flotilla";

/// The broker `[events]` asks for.
pub async fn open_broker(manifest: &Manifest, state_dir: &Path) -> Result<Arc<dyn Broker>> {
    Ok(match &manifest.events.backend {
        EventBackend::Embedded => {
            let dir = state_dir.join("events");
            let config = LogConfig {
                fsync: match manifest.events.fsync {
                    Fsync::Always => FsyncPolicy::Always,
                    Fsync::Interval(every) => FsyncPolicy::Interval(every),
                },
                ..LogConfig::default()
            };
            Arc::new(
                EventLog::open(&dir, config)
                    .await
                    .with_context(|| format!("cannot open the event log in {}", dir.display()))?,
            )
        }
        EventBackend::Nats { url } => {
            // One app's topics are its own, even when several apps share a NATS server.
            let prefix: String = format!("FLOTILLA_{}", manifest.app)
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            Arc::new(
                JetStream::connect(url, &prefix)
                    .await
                    .with_context(|| format!("cannot reach NATS JetStream at {url}"))?,
            )
        }
    })
}

/// Creates the topics and starts delivering to the subscriptions (and to the sagas' triggers).
pub async fn start<D: Discovery>(
    manifest: &Manifest,
    broker: Arc<dyn Broker>,
    discovery: Arc<D>,
    resilience: Resilience,
    triggers: Arc<crate::sagas::Triggers>,
) -> Result<Arc<Events>> {
    let mut topics: Vec<TopicConfig> = manifest
        .topics
        .iter()
        .map(|topic| TopicConfig {
            name: topic.name.clone(),
            partitions: topic.partitions,
            retention: topic.retention,
            max_bytes: topic.max_bytes,
        })
        .collect();
    // Sagas announce their outcomes whether or not the manifest declares those topics.
    if !manifest.sagas.sagas.is_empty() {
        for name in crate::sagas::OUTCOME_TOPICS {
            if !topics.iter().any(|t| t.name == name) {
                topics.push(TopicConfig {
                    name: name.to_owned(),
                    partitions: 1,
                    retention: Some(std::time::Duration::from_secs(7 * 24 * 3600)),
                    max_bytes: None,
                });
            }
        }
    }
    let mut subscribers: Vec<Subscriber> = manifest
        .subscriptions
        .iter()
        .map(|s| Subscriber {
            topic: s.topic.clone(),
            service: s.service.to_string(),
            path: s.path.clone(),
            max_attempts: s.max_attempts,
            backoff: s.backoff,
            max_backoff: s.max_backoff,
        })
        .collect();
    subscribers.extend(crate::sagas::trigger_subscribers(manifest));
    let pusher = Arc::new(ProxyPusher::new(discovery, resilience, triggers));
    Events::start(
        broker,
        topics,
        subscribers,
        pusher,
        usize::try_from(manifest.events.max_event_size).unwrap_or(usize::MAX),
    )
    .await
    .context("cannot create the topics")
}

/// The proxy stack Flotilla's own calls to services go through (event deliveries, saga steps).
pub type FlotillaStack = tower::util::BoxCloneSyncService<
    Request<Full<Bytes>>,
    http::Response<flotilla_proxy::ProxyBody>,
    std::convert::Infallible,
>;

/// Calls from Flotilla itself, under the caller name `flotilla`, with the callee's policy.
pub fn flotilla_stack<D: Discovery>(discovery: Arc<D>, resilience: Resilience) -> FlotillaStack {
    let caller = Caller {
        service: BROKER_CALLER.into(),
        instance: BROKER_CALLER.into(),
    };
    let layer = ResilienceLayer::new(discovery, resilience, caller);
    let stack = flotilla_proxy::stack_with_edge(layer, ProxySettings::sidecar(), PresetTarget);
    tower::util::BoxCloneSyncService::new(stack)
}

/// Deliveries through the shared proxy stack; deliveries to `flotilla` itself (saga triggers)
/// are handed to the orchestrator in process.
struct ProxyPusher {
    stack: FlotillaStack,
    triggers: Arc<crate::sagas::Triggers>,
}

impl ProxyPusher {
    fn new<D: Discovery>(
        discovery: Arc<D>,
        resilience: Resilience,
        triggers: Arc<crate::sagas::Triggers>,
    ) -> Self {
        Self {
            stack: flotilla_stack(discovery, resilience),
            triggers,
        }
    }
}

/// How much of a refusal's body goes into the dead letter's reason.
const REASON_BYTES: usize = 300;

impl Pusher for ProxyPusher {
    fn push<'a>(
        &'a self,
        service: &'a str,
        path: &'a str,
        event: Bytes,
        traceparent: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if crate::sagas::Triggers::is_trigger(service) {
                return self.triggers.deliver(path, &event, traceparent).await;
            }
            let mut request = Request::post(path)
                .header(
                    header::CONTENT_TYPE,
                    flotilla_events::cloudevent::STRUCTURED,
                )
                .body(Full::new(event))
                .map_err(|e| format!("cannot build the request: {e}"))?;
            if let Some(traceparent) = traceparent.and_then(|t| t.parse().ok()) {
                request.headers_mut().insert("traceparent", traceparent);
            }
            request
                .extensions_mut()
                .insert(Target::service(Arc::from(service)));
            let response = self
                .stack
                .clone()
                .oneshot(request)
                .await
                .unwrap_or_else(|never| match never {});
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&body[..body.len().min(REASON_BYTES)]);
            Err(format!("{service} answered {status}: {}", text.trim()))
        })
    }
}
