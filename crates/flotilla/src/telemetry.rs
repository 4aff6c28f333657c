//! Where the data plane reports: every stack (the gateway and each in-process sidecar) hands its
//! spans to the fleet's trace store and its calls to the fleet's metrics, which the control API
//! serves as `/v1/traces`, `/v1/map` and `/metrics`. Spans that services send over OTLP take the
//! same way. Beyond memory, every span and log line also goes (without blocking) to the durable
//! SQLite tier and to an OTLP collector when `[telemetry]` names one.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use flotilla_manifest::{TelemetrySettings, TelemetryStorage};
use flotilla_proxy::Observer;
use flotilla_telemetry::otlp::{ExportConfig, OtlpExporter};
use flotilla_telemetry::store::{Retention, TelemetryDb};
use flotilla_telemetry::{EdgeMeter, Exposition, LogStore, MetricType, Metrics, Span, TraceStore};

/// Spans kept in memory for `flotilla traces` and the map: every proxied call records two, so
/// this is the last 4,096 calls, about 3 MiB: a working set that stays warm in the caches of the
/// request path, where each span recorded evicts the oldest (a profile showed those evictions,
/// cache misses all, as the largest cost of tracing at 20,000). Older traces are read from the
/// durable tier.
pub const TRACE_CAPACITY: usize = 8_192;

/// The fleet's telemetry stores behind the proxy's [`Observer`].
#[derive(Clone)]
pub struct Telemetry {
    pub traces: Arc<TraceStore>,
    pub metrics: Arc<Metrics>,
    /// `.flotilla/telemetry/telemetry.db`, unless `storage = "memory"`.
    pub durable: Option<TelemetryDb>,
    /// `[telemetry] otlp_endpoint`.
    pub export: Option<OtlpExporter>,
    /// Which spans the durable tier gets under load.
    pub sampler: Arc<StoreSampler>,
}

impl Telemetry {
    /// Memory only.
    pub fn new() -> Self {
        Self {
            traces: Arc::new(TraceStore::new(TRACE_CAPACITY)),
            metrics: Arc::new(Metrics::new()),
            durable: None,
            export: None,
            sampler: Arc::new(StoreSampler::new(u32::MAX)),
        }
    }

    /// The stores `[telemetry]` asks for. Call within the runtime: the exporter spawns its task.
    pub fn open(settings: &TelemetrySettings, state_dir: &Path) -> Result<Self> {
        let mut telemetry = Self::new();
        telemetry.sampler = Arc::new(StoreSampler::new(settings.stored_spans_per_second));
        if settings.storage == TelemetryStorage::Sqlite {
            let dir = state_dir.join("telemetry");
            let retention = Retention {
                max_age: settings.retention,
                max_bytes: settings.max_storage,
            };
            telemetry.durable = Some(TelemetryDb::open(&dir, retention).with_context(|| {
                format!("cannot open the telemetry store in {}", dir.display())
            })?);
        }
        if let Some(endpoint) = &settings.otlp_endpoint {
            telemetry.export = Some(
                OtlpExporter::spawn(endpoint, ExportConfig::default())
                    .with_context(|| format!("cannot export to {endpoint}"))?,
            );
        }
        Ok(telemetry)
    }

    /// Memory, the durable tier and the exporter, in that order of importance; never blocks.
    pub fn record_span(&self, span: Span) {
        if let Some(export) = &self.export {
            export.export_span(&span);
        }
        if let Some(durable) = &self.durable
            && self.sampler.keep(&span)
        {
            durable.record_span(span.clone());
        }
        self.traces.record(span);
    }

    /// Like [`Telemetry::record_span`] for the two spans of one call, which share a trace: one
    /// sampling decision and one lock of the trace store.
    pub fn record_pair(&self, first: Span, second: Span) {
        if let Some(export) = &self.export {
            export.export_span(&first);
            export.export_span(&second);
        }
        if let Some(durable) = &self.durable {
            // One trace, one decision; errors are kept whatever the trace's lot.
            let keep = self.sampler.keep_spans(&first, 2);
            if keep || second.is_error() {
                durable.record_span(second.clone());
            }
            if keep {
                durable.record_span(first.clone());
            }
        }
        self.traces.record_pair(first, second);
    }

    /// Every line `logs` stores from now on also goes to the durable tier and the exporter.
    pub fn tap_logs(&self, logs: &LogStore) {
        if self.durable.is_none() && self.export.is_none() {
            return;
        }
        let durable = self.durable.clone();
        let export = self.export.clone();
        logs.set_sink(Box::new(move |record| {
            if let Some(durable) = &durable {
                durable.record_log(record.clone());
            }
            if let Some(export) = &export {
                export.export_log(record);
            }
        }));
    }

    /// The pipeline's own counters for `/metrics`: what the durable tier and the exporter wrote
    /// and what they had to drop to stay off the request path.
    pub fn render(&self, out: &mut Exposition) {
        if let Some(durable) = &self.durable {
            let stats = durable.stats();
            out.family(
                "flotilla_telemetry_stored_total",
                "Spans and log lines written to the durable telemetry store.",
                MetricType::Counter,
            );
            out.sample("", &[("signal", "spans")], stats.spans_written as f64);
            out.sample("", &[("signal", "logs")], stats.logs_written as f64);
            out.family(
                "flotilla_telemetry_store_dropped_total",
                "Spans and log lines not stored because the store's queue was full.",
                MetricType::Counter,
            );
            out.sample("", &[], stats.dropped as f64);
            out.family(
                "flotilla_telemetry_store_sampled_out_total",
                "Spans not stored because their trace was sampled out above `stored_spans_per_second`.",
                MetricType::Counter,
            );
            out.sample("", &[], self.sampler.sampled_out() as f64);
            out.family(
                "flotilla_telemetry_store_bytes",
                "Size of the durable telemetry store.",
                MetricType::Gauge,
            );
            out.sample("", &[], stats.size_bytes as f64);
        }
        if let Some(export) = &self.export {
            let stats = export.stats();
            out.family(
                "flotilla_otlp_exported_total",
                "Spans and log records delivered to the OTLP collector.",
                MetricType::Counter,
            );
            out.sample("", &[("signal", "spans")], stats.exported_spans as f64);
            out.sample("", &[("signal", "logs")], stats.exported_logs as f64);
            out.family(
                "flotilla_otlp_dropped_total",
                "Spans and log records dropped instead of delaying requests (queue full or the collector failing).",
                MetricType::Counter,
            );
            out.sample("", &[("signal", "spans")], stats.dropped_spans as f64);
            out.sample("", &[("signal", "logs")], stats.dropped_logs as f64);
            out.family(
                "flotilla_otlp_failed_batches_total",
                "Export batches the collector did not accept after retries.",
                MetricType::Counter,
            );
            out.sample("", &[], stats.failed_batches as f64);
        }
    }
}

/// Keeps the durable tier's span rate near a budget by sampling whole traces: each span's trace
/// id decides, so a trace is stored with all its spans or not at all (as head sampling would,
/// but decided here, where the rate is known). Errors are always kept: they are what one looks
/// for later. Memory and the exporter are not sampled. The keep ratio for each second follows
/// the rate offered in the second before, so a steady load settles at the budget.
pub struct StoreSampler {
    budget: u32,
    /// Spans offered in the current second, and which second that is.
    offered: AtomicU64,
    second: AtomicU64,
    /// Traces kept per 65,536 of them.
    keep_per_65536: AtomicU32,
    sampled_out: AtomicU64,
}

impl StoreSampler {
    pub fn new(budget: u32) -> Self {
        Self {
            budget,
            offered: AtomicU64::new(0),
            second: AtomicU64::new(0),
            keep_per_65536: AtomicU32::new(65_536),
            sampled_out: AtomicU64::new(0),
        }
    }

    pub fn keep(&self, span: &Span) -> bool {
        self.keep_spans(span, 1)
    }

    /// The decision for `spans` spans of `span`'s trace, counted as offered together.
    pub fn keep_spans(&self, span: &Span, spans: u64) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.keep_at(span, now, spans)
    }

    fn keep_at(&self, span: &Span, now: u64, spans: u64) -> bool {
        let second = self.second.load(Ordering::Relaxed);
        if now != second
            && self
                .second
                .compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // One thread per second turns last second's count into this second's ratio.
            let offered = self.offered.swap(0, Ordering::Relaxed).max(1);
            let ratio = if now == second + 1 {
                (u64::from(self.budget) * 65_536 / offered).min(65_536)
            } else {
                // After a quiet spell, start by keeping everything again.
                65_536
            };
            self.keep_per_65536.store(ratio as u32, Ordering::Relaxed);
        }
        self.offered.fetch_add(spans, Ordering::Relaxed);
        // The trace id's last two bytes are random in every id scheme in use (128-bit, or 64-bit
        // padded on the left).
        let bucket = u32::from(u16::from_le_bytes([
            span.trace_id.0[14],
            span.trace_id.0[15],
        ]));
        if span.is_error() || bucket < self.keep_per_65536.load(Ordering::Relaxed) {
            true
        } else {
            self.sampled_out.fetch_add(spans, Ordering::Relaxed);
            false
        }
    }

    pub fn sampled_out(&self) -> u64 {
        self.sampled_out.load(Ordering::Relaxed)
    }
}

impl Observer for Telemetry {
    fn span(&self, span: Span) {
        self.record_span(span);
    }

    fn call(
        &self,
        caller: &str,
        callee: &str,
        status: Option<u16>,
        duration: Duration,
        retries: u32,
    ) {
        self.metrics
            .record_call(caller, callee, status, duration, retries);
    }

    fn in_flight(&self, caller: &str, callee: &str, delta: i64) {
        self.metrics.add_in_flight(caller, callee, delta);
    }

    fn meter(&self, caller: &str, callee: &str) -> Option<EdgeMeter> {
        self.metrics.meter(caller, callee)
    }

    fn call_spans(&self, server: Option<Span>, client: Span) {
        match server {
            Some(server) => self.record_pair(server, client),
            None => self.record_span(client),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_telemetry::{Exposition, HttpHop, SpanId, SpanKind, SpanStatus, TraceId};
    use std::time::SystemTime;

    #[test]
    fn the_gateway_goes_by_one_name() {
        // The control API finds the gateway's spans and edges by this name.
        assert_eq!(flotilla_control::GATEWAY, flotilla_gateway::CALLER);
    }

    fn span_of(trace_id: TraceId, status: SpanStatus) -> Span {
        Span {
            trace_id,
            span_id: SpanId::random(),
            parent_span_id: None,
            service: "gateway".into(),
            instance: None,
            name: "GET".into(),
            kind: SpanKind::Client,
            start: SystemTime::now(),
            duration: Duration::from_millis(1),
            status,
            status_message: None,
            http: HttpHop::default(),
            attributes: Vec::new(),
        }
    }

    #[test]
    fn the_store_sampler_keeps_whole_traces_near_the_budget() {
        let sampler = StoreSampler::new(100);
        let kept = |second: u64, n: usize| {
            (0..n)
                .filter(|_| {
                    sampler.keep_at(&span_of(TraceId::random(), SpanStatus::Unset), second, 1)
                })
                .count()
        };
        assert_eq!(
            kept(1_000, 10_000),
            10_000,
            "everything until a rate is known"
        );
        let settled = kept(1_001, 10_000);
        assert!(
            (40..=250).contains(&settled),
            "{settled} kept of 10,000 for a budget of 100"
        );
        // A trace is stored whole or not at all; errors always.
        let trace = TraceId::random();
        let first = sampler.keep_at(&span_of(trace, SpanStatus::Unset), 1_001, 1);
        assert!(
            (0..20).all(|_| sampler.keep_at(&span_of(trace, SpanStatus::Unset), 1_001, 1) == first)
        );
        assert!((0..50).all(|_| sampler.keep_at(
            &span_of(TraceId::random(), SpanStatus::Error),
            1_001,
            1
        )));
        assert!(sampler.sampled_out() > 9_000);
        // After a quiet spell everything is kept again.
        assert_eq!(kept(1_005, 50), 50);
    }

    #[test]
    fn reports_land_in_the_shared_stores() {
        let telemetry = Telemetry::new();
        let observer: Arc<dyn Observer> = Arc::new(telemetry.clone());
        let trace_id = TraceId::random();
        observer.span(Span {
            trace_id,
            span_id: SpanId::random(),
            parent_span_id: None,
            service: "gateway".into(),
            instance: None,
            name: "GET orders".into(),
            kind: SpanKind::Client,
            start: SystemTime::now(),
            duration: Duration::from_millis(2),
            status: SpanStatus::Unset,
            status_message: None,
            http: HttpHop::default(),
            attributes: Vec::new(),
        });
        observer.in_flight("gateway", "orders", 1);
        observer.call("gateway", "orders", Some(503), Duration::from_millis(2), 2);
        observer.in_flight("gateway", "orders", -1);

        assert_eq!(telemetry.traces.trace(trace_id).len(), 1);
        let mut out = Exposition::new();
        telemetry.metrics.render(&mut out);
        let text = out.finish();
        for line in [
            r#"flotilla_requests_total{caller="gateway",callee="orders",class="5xx"} 1"#,
            r#"flotilla_retries_total{caller="gateway",callee="orders"} 2"#,
            r#"flotilla_requests_in_flight{caller="gateway",callee="orders"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line}:\n{text}");
        }
    }
}
