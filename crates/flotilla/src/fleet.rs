//! The running fleet as the control API sees it: the supervisor, registry, log store, the
//! telemetry stores and the data plane's resilience (breakers, injected faults) behind the
//! `Fleet` trait.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use flotilla_control::{
    AppInfo, BreakerView, FaultError, Faults, Fleet, InstanceView, Phase, ServiceView,
};
use flotilla_manifest::Manifest;
use flotilla_proxy::Resilience;
use flotilla_registry::Registry;
use flotilla_supervisor::Supervisor;
use flotilla_telemetry::store::TelemetryDb;
use flotilla_telemetry::{Exposition, LogQuery, LogRecord, LogStore, Metrics, Span, TraceStore};

use crate::telemetry::Telemetry;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub struct RunningFleet {
    pub manifest: Arc<Manifest>,
    pub supervisor: Supervisor,
    pub registry: Registry,
    pub logs: Arc<LogStore>,
    /// Shared with the gateway and every in-process sidecar: their breakers and the faults they
    /// inject.
    pub resilience: Resilience,
    /// The spans and call counters every stack records, shared with them through
    /// `resilience.observer`, with the durable tier and the exporter behind them.
    pub telemetry: Telemetry,
    /// Topics, subscriptions and their deliveries.
    pub events: Arc<flotilla_events::engine::Events>,
    /// The saga orchestrator, when the app declares sagas.
    pub sagas: Option<flotilla_saga::engine::Orchestrator>,
    pub gateway_url: String,
    pub control_url: String,
    pub started_at: SystemTime,
    pub phase: Mutex<Phase>,
    /// Cancelled to stop the whole fleet (Ctrl-C, SIGTERM, `flotilla down`).
    pub stop: CancellationToken,
}

impl RunningFleet {
    pub fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    fn known(&self, service: &str) -> Result<(), FaultError> {
        if self.manifest.services.iter().any(|s| &*s.name == service) {
            Ok(())
        } else {
            Err(FaultError::UnknownService(service.to_owned()))
        }
    }
}

impl Fleet for RunningFleet {
    fn app(&self) -> AppInfo {
        AppInfo {
            app: self.manifest.app.clone(),
            dir: self.manifest.dir.display().to_string(),
            pid: std::process::id(),
            gateway: self.gateway_url.clone(),
            control: self.control_url.clone(),
            started_at: self.started_at,
            phase: self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    fn services(&self) -> Vec<ServiceView> {
        let statuses = self.supervisor.status();
        let now = SystemTime::now();
        self.manifest
            .services
            .iter()
            .map(|service| {
                let instances: Vec<InstanceView> = statuses
                    .iter()
                    .filter(|s| s.service == service.name)
                    .map(|s| {
                        let registered = self.registry.instance(&s.service, &s.instance);
                        InstanceView {
                            service: s.service.to_string(),
                            instance: s.instance.to_string(),
                            pid: s.pid,
                            port: s.port,
                            state: enum_text(&s.state),
                            health: s.health.to_string(),
                            restarts: s.restarts,
                            version: s.version.clone(),
                            uptime_seconds: s
                                .started_at
                                .filter(|_| s.pid.is_some())
                                .and_then(|t| now.duration_since(t).ok())
                                .map(|d| d.as_secs()),
                            last_exit: s.last_exit.clone(),
                            last_error: registered.and_then(|r| r.last_error),
                        }
                    })
                    .collect();
                ServiceView {
                    name: service.name.to_string(),
                    version: service.version.clone(),
                    replicas: service.replicas.get(),
                    healthy: instances.iter().filter(|i| i.health == "healthy").count() as u32,
                    instances,
                }
            })
            .collect()
    }

    fn logs(&self, query: &LogQuery) -> Vec<Arc<LogRecord>> {
        self.logs.query(query)
    }

    fn follow_logs(&self) -> broadcast::Receiver<Arc<LogRecord>> {
        self.logs.follow()
    }

    fn shutdown(&self) {
        self.stop.cancel();
    }

    fn breakers(&self) -> Vec<BreakerView> {
        self.resilience.board.snapshot()
    }

    fn faults(&self) -> Vec<(String, Faults)> {
        self.resilience
            .faults
            .all()
            .into_iter()
            .map(|(service, faults)| (service.to_string(), faults))
            .collect()
    }

    fn set_faults(&self, service: &str, faults: Faults) -> Result<(), FaultError> {
        self.known(service)?;
        faults.validate().map_err(FaultError::Invalid)?;
        self.resilience.faults.set(service, faults);
        Ok(())
    }

    fn clear_faults(&self, service: &str) -> Result<bool, FaultError> {
        self.known(service)?;
        Ok(self.resilience.faults.clear(service))
    }

    fn trace_store(&self) -> &TraceStore {
        &self.telemetry.traces
    }

    fn metrics(&self) -> &Metrics {
        &self.telemetry.metrics
    }

    fn durable(&self) -> Option<TelemetryDb> {
        self.telemetry.durable.clone()
    }

    fn ingest_spans(&self, spans: Vec<Span>) {
        for span in spans {
            self.telemetry.record_span(span);
        }
    }

    fn ingest_logs(&self, records: Vec<LogRecord>) {
        for record in records {
            self.logs.push(record);
        }
    }

    fn render_pipeline_metrics(&self, out: &mut Exposition) {
        self.telemetry.render(out);
        render_events(&self.events.snapshot(), out);
        if let Some(sagas) = &self.sagas {
            render_sagas(&sagas.metrics(), out);
        }
    }

    fn events(&self) -> Option<Arc<flotilla_events::engine::Events>> {
        Some(self.events.clone())
    }

    fn sagas(&self) -> Option<flotilla_saga::engine::Orchestrator> {
        self.sagas.clone()
    }

    fn dependencies(&self) -> Vec<(String, String)> {
        self.manifest
            .services
            .iter()
            .flat_map(|s| {
                s.depends_on
                    .iter()
                    .map(|callee| (s.name.to_string(), callee.to_string()))
            })
            .collect()
    }

    fn routed_services(&self) -> Vec<String> {
        self.manifest
            .gateway
            .routes
            .iter()
            .map(|r| r.service.to_string())
            .collect()
    }
}

/// The serde name of a unit enum variant (`crash-loop`), so the API and JSON agree.
fn enum_text<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

/// Event streams in `/metrics`: per subscriber, lag and what was delivered or dead-lettered; per
/// topic, the events stored and waiting in the dead-letter topic.
fn render_events(topics: &[flotilla_events::engine::TopicOverview], out: &mut Exposition) {
    use flotilla_events::engine::SubscriberLag;
    use flotilla_telemetry::MetricType;
    type PerSubscriber = fn(&SubscriberLag) -> u64;
    let per_subscriber: [(&str, &str, MetricType, PerSubscriber); 3] = [
        (
            "flotilla_event_lag",
            "Events stored and not yet acknowledged by a subscriber, over all partitions.",
            MetricType::Gauge,
            |s| s.lag,
        ),
        (
            "flotilla_events_delivered_total",
            "Events a subscriber acknowledged since the fleet started.",
            MetricType::Counter,
            |s| s.delivered,
        ),
        (
            "flotilla_events_dead_lettered_total",
            "Events moved to the dead-letter topic after a subscriber's last attempt failed.",
            MetricType::Counter,
            |s| s.dead_lettered,
        ),
    ];
    for (name, help, kind, value) in per_subscriber {
        out.family(name, help, kind);
        for topic in topics {
            for s in &topic.subscribers {
                let labels = [
                    ("topic", topic.topic.as_str()),
                    ("subscriber", s.service.as_str()),
                ];
                out.sample("", &labels, value(s) as f64);
            }
        }
    }
    type PerTopic = fn(&flotilla_events::engine::TopicOverview) -> u64;
    let per_topic: [(&str, &str, PerTopic); 2] = [
        (
            "flotilla_event_records",
            "Events held by a topic, over all partitions.",
            |t| t.partitions.iter().map(|p| p.records).sum(),
        ),
        (
            "flotilla_event_dead_letters",
            "Events waiting in a topic's dead-letter topic.",
            |t| t.dead_letters,
        ),
    ];
    for (name, help, value) in per_topic {
        out.family(name, help, MetricType::Gauge);
        for topic in topics {
            out.sample("", &[("topic", topic.topic.as_str())], value(topic) as f64);
        }
    }
}

fn render_sagas(metrics: &flotilla_saga::engine::SagaMetrics, out: &mut Exposition) {
    use flotilla_telemetry::MetricType;
    out.family(
        "flotilla_sagas_started_total",
        "Sagas this orchestrator started.",
        MetricType::Counter,
    );
    for (saga, count) in &metrics.started {
        out.sample("", &[("saga", saga.as_str())], *count as f64);
    }
    out.family(
        "flotilla_sagas_finished_total",
        "Sagas this orchestrator finished, by final status.",
        MetricType::Counter,
    );
    for (saga, status, count) in &metrics.finished {
        out.sample(
            "",
            &[("saga", saga.as_str()), ("status", status.as_str())],
            *count as f64,
        );
    }
    out.family(
        "flotilla_sagas_in_progress",
        "Sagas this orchestrator is driving now, by status.",
        MetricType::Gauge,
    );
    for (status, count) in &metrics.in_progress {
        out.sample("", &[("status", status.as_str())], *count as f64);
    }
    out.family(
        "flotilla_saga_step_calls_total",
        "Calls made by saga steps, by outcome (succeeded, failed: may be retried, refused: will not).",
        MetricType::Counter,
    );
    for (saga, step, phase, outcome, count) in &metrics.calls {
        out.sample(
            "",
            &[
                ("saga", saga.as_str()),
                ("step", step.as_str()),
                ("phase", phase.as_str()),
                ("outcome", outcome.as_str()),
            ],
            *count as f64,
        );
    }
}
