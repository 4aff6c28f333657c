//! Durable telemetry: spans and log lines in SQLite.
