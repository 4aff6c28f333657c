//! Telemetry: what the fleet says about itself.
//!
//! A mechanism crate: the proxy (gateway and sidecars) and the supervisor feed it, the control API
//! and the binary's `/metrics` read it. Everything in it is bounded in memory and cheap to record
//! into from the request path.
//!
//! - **Logs.** Every line a service writes to stdout or stderr becomes a [`LogRecord`] tagged with
//!   service, instance and time, kept in a bounded [`LogStore`] that the control API queries and
//!   follows.
//! - **Traces.** The proxy records a CLIENT and a SERVER [`Span`] for every call between services;
//!   the [`TraceStore`] keeps the newest of them, evicting the oldest when full (counted in
//!   [`TraceStore::dropped`]), and answers [`TraceStore::trace`] and [`TraceStore::traces`] with
//!   [`TraceSummary`] listings filtered by a [`TraceQuery`].
//! - **The application map.** [`TraceStore::edges`] turns recent CLIENT spans into [`EdgeStats`]:
//!   requests, errors, rate and latency percentiles per (caller, callee).
//! - **Metrics.** [`Metrics`] holds the proxy's per-edge counters (requests by status class, a
//!   latency histogram, retries, calls in flight) and renders them into an [`Exposition`], the
//!   Prometheus text format writer that the binary also uses for families of its own.

pub mod level;
pub mod logs;
pub mod map;
pub mod metrics;
pub mod otlp;
pub mod span;
pub mod store;
pub mod traces;
mod wire;

pub use level::{Level, classify};
pub use logs::{LogQuery, LogRecord, LogSink, LogStore, Stream};
pub use map::EdgeStats;
pub use metrics::{EdgeMeter, Exposition, InFlightGuard, MetricType, Metrics, render_trace_store};
pub use span::{
    AttributeValue, HttpHop, IdHash, IdHasher, Span, SpanId, SpanKind, SpanStatus, TraceId,
};
pub use traces::{TraceQuery, TraceStore, TraceSummary};
