//! Telemetry: what the fleet says about itself.
//!
//! For now this is the centralized log: every line a service writes to stdout or stderr becomes a
//! [`LogRecord`] tagged with service, instance and time, kept in a bounded [`LogStore`] that the
//! control API queries and follows. Traces, metrics and the application map join it later.

pub mod logs;

pub use logs::{LogQuery, LogRecord, LogStore, Stream};
