//! Where the data plane reports: every stack (the gateway and each in-process sidecar) hands its
//! spans to the fleet's trace store and its calls to the fleet's metrics, which the control API
//! serves as `/v1/traces`, `/v1/map` and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proxy::Observer;
use flotilla_telemetry::{Metrics, Span, TraceStore};

/// Spans kept in memory for `flotilla traces` and the map: every proxied call records two, so
/// this is the last 50,000 calls, a few tens of megabytes at most.
pub const TRACE_CAPACITY: usize = 100_000;

/// The fleet's telemetry stores behind the proxy's [`Observer`].
#[derive(Clone)]
pub struct Telemetry {
    pub traces: Arc<TraceStore>,
    pub metrics: Arc<Metrics>,
}

impl Telemetry {
    pub fn new() -> Self {
        Self {
            traces: Arc::new(TraceStore::new(TRACE_CAPACITY)),
            metrics: Arc::new(Metrics::new()),
        }
    }
}

impl Observer for Telemetry {
    fn span(&self, span: Span) {
        self.traces.record(span);
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
