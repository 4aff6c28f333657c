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

/// Creates the topics and starts delivering to the subscriptions.
pub async fn start<D: Discovery>(
    manifest: &Manifest,
    broker: Arc<dyn Broker>,
    discovery: Arc<D>,
    resilience: Resilience,
) -> Result<Arc<Events>> {
    let topics = manifest
        .topics
        .iter()
        .map(|topic| TopicConfig {
            name: topic.name.clone(),
            partitions: topic.partitions,
            retention: topic.retention,
            max_bytes: topic.max_bytes,
        })
        .collect();
    let subscribers = manifest
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
    let pusher = Arc::new(ProxyPusher::new(discovery, resilience));
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

type PushStack = tower::util::BoxCloneSyncService<
    Request<Full<Bytes>>,
    http::Response<flotilla_proxy::ProxyBody>,
    std::convert::Infallible,
>;

/// Deliveries through the shared proxy stack.
struct ProxyPusher {
    stack: PushStack,
}

impl ProxyPusher {
    fn new<D: Discovery>(discovery: Arc<D>, resilience: Resilience) -> Self {
        let caller = Caller {
            service: BROKER_CALLER.into(),
            instance: BROKER_CALLER.into(),
        };
        let layer = ResilienceLayer::new(discovery, resilience, caller);
        let stack = flotilla_proxy::stack_with_edge(layer, ProxySettings::sidecar(), PresetTarget);
        Self {
            stack: tower::util::BoxCloneSyncService::new(stack),
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
