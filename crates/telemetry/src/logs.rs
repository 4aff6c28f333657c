//! The centralized log: a bounded ring of recent lines plus a broadcast for followers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::level::{Level, classify};
use crate::span::TraceId;
use tokio::sync::broadcast;

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
    /// Written by Flotilla itself about the instance (started, exited, restarting).
    System,
}

/// One captured line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord {
    #[serde(with = "crate::wire::rfc3339")]
    pub time: SystemTime,
    pub service: Arc<str>,
    pub instance: Arc<str>,
    /// The version of the service the instance runs, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Arc<str>>,
    pub stream: Stream,
    pub line: String,
    /// Read from the line (see [`classify`]) when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    /// The trace of the request the line is about, when the line names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<TraceId>,
}

impl LogRecord {
    /// A line captured now, its level and trace id read from it.
    pub fn new(service: Arc<str>, instance: Arc<str>, stream: Stream, line: String) -> Self {
        let (level, trace_id) = classify(&line);
        Self {
            time: SystemTime::now(),
            service,
            instance,
            version: None,
            stream,
            level,
            trace_id,
            line,
        }
    }
}

/// Which records to return.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub service: Option<String>,
    pub instance: Option<String>,
    /// Only records at or after this time.
    pub since: Option<SystemTime>,
    /// At most this many, the newest ones (still returned oldest first).
    pub limit: Option<usize>,
    /// Only lines at this level or above (lines without a level are left out).
    pub level: Option<Level>,
    /// Only lines containing this text, ignoring ASCII case.
    pub grep: Option<String>,
    /// Only lines of this trace.
    pub trace: Option<TraceId>,
}

impl LogQuery {
    pub fn matches(&self, record: &LogRecord) -> bool {
        self.service
            .as_deref()
            .is_none_or(|s| *record.service == *s)
            && self
                .instance
                .as_deref()
                .is_none_or(|i| *record.instance == *i)
            && self.since.is_none_or(|since| record.time >= since)
            && self
                .level
                .is_none_or(|level| record.level.is_some_and(|l| l >= level))
            && self
                .trace
                .is_none_or(|trace| record.trace_id == Some(trace))
            && self
                .grep
                .as_deref()
                .is_none_or(|needle| contains_ignoring_case(&record.line, needle))
    }
}

fn contains_ignoring_case(haystack: &str, needle: &str) -> bool {
    needle.is_empty()
        || haystack
            .as_bytes()
            .windows(needle.len())
            .any(|window| window.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Recent log lines of the whole fleet, bounded in memory.
pub struct LogStore {
    ring: Mutex<VecDeque<Arc<LogRecord>>>,
    capacity: usize,
    followers: broadcast::Sender<Arc<LogRecord>>,
    /// Lines pushed out of the ring to make room.
    evicted: AtomicU64,
    /// Where every line also goes, synchronously and without blocking (the durable store's and
    /// the exporter's queues): a broadcast follower could lag and lose lines under a burst.
    sink: std::sync::OnceLock<LogSink>,
}

/// Receives every pushed record; must not block.
pub type LogSink = Box<dyn Fn(&Arc<LogRecord>) + Send + Sync>;

impl LogStore {
    /// Keeps the newest `capacity` lines.
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
            followers: broadcast::channel(1024).0,
            evicted: AtomicU64::new(0),
            sink: std::sync::OnceLock::new(),
        }
    }

    /// Sends every record pushed from now on to `sink` as well; only the first sink set counts.
    pub fn set_sink(&self, sink: LogSink) -> bool {
        self.sink.set(sink).is_ok()
    }

    pub fn push(&self, record: LogRecord) {
        let record = Arc::new(record);
        {
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            if ring.len() == self.capacity {
                ring.pop_front();
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
            ring.push_back(record.clone());
        }
        if let Some(sink) = self.sink.get() {
            sink(&record);
        }
        // No follower is not an error; a slow follower lags and is told so by the channel.
        let _ = self.followers.send(record);
    }

    /// The matching records, oldest first.
    pub fn query(&self, query: &LogQuery) -> Vec<Arc<LogRecord>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let limit = query.limit.unwrap_or(usize::MAX);
        let mut newest_first: Vec<_> = ring
            .iter()
            .rev()
            .filter(|r| query.matches(r))
            .take(limit)
            .cloned()
            .collect();
        newest_first.reverse();
        newest_first
    }

    /// Every record pushed from now on.
    pub fn follow(&self) -> broadcast::Receiver<Arc<LogRecord>> {
        self.followers.subscribe()
    }

    /// How many lines were dropped from memory to stay within capacity.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(service: &str, line: &str, time: SystemTime) -> LogRecord {
        LogRecord {
            time,
            ..LogRecord::new(
                service.into(),
                format!("{service}-1").into(),
                Stream::Stdout,
                line.into(),
            )
        }
    }

    #[test]
    fn lines_are_found_by_level_text_and_trace() {
        let store = LogStore::new(10);
        let now = SystemTime::now();
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        store.push(record(
            "orders",
            &format!("INFO took order trace_id={id}"),
            now,
        ));
        store.push(record("orders", "ERROR payments down", now));
        store.push(record(
            "catalog",
            &format!("GET /products 200 1ms trace_id={id}"),
            now,
        ));
        store.push(record("catalog", "debug cache warm", now));
        let lines = |query: LogQuery| -> Vec<String> {
            store.query(&query).iter().map(|r| r.line.clone()).collect()
        };
        assert_eq!(
            lines(LogQuery {
                level: Some(Level::Info),
                ..LogQuery::default()
            }),
            [
                format!("INFO took order trace_id={id}"),
                "ERROR payments down".into()
            ]
        );
        assert_eq!(
            lines(LogQuery {
                grep: Some("PAYMENTS".into()),
                ..LogQuery::default()
            }),
            ["ERROR payments down"]
        );
        let trace = TraceId::parse(id);
        assert_eq!(
            lines(LogQuery {
                trace,
                ..LogQuery::default()
            })
            .len(),
            2,
            "one request's lines across services"
        );
    }

    #[test]
    fn keeps_the_newest_lines_within_capacity() {
        let store = LogStore::new(3);
        let now = SystemTime::now();
        for i in 0..5 {
            store.push(record("a", &i.to_string(), now));
        }
        let lines: Vec<_> = store
            .query(&LogQuery::default())
            .iter()
            .map(|r| r.line.clone())
            .collect();
        assert_eq!(lines, ["2", "3", "4"]);
        assert_eq!(store.evicted(), 2);
    }

    #[test]
    fn filters_by_service_since_and_limit() {
        let store = LogStore::new(100);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        store.push(record("a", "old", t0));
        store.push(record("b", "other", t0 + Duration::from_secs(5)));
        store.push(record("a", "new", t0 + Duration::from_secs(10)));
        store.push(record("a", "newest", t0 + Duration::from_secs(20)));
        let query = LogQuery {
            service: Some("a".into()),
            since: Some(t0 + Duration::from_secs(1)),
            limit: Some(1),
            ..LogQuery::default()
        };
        let lines: Vec<_> = store.query(&query).iter().map(|r| r.line.clone()).collect();
        assert_eq!(lines, ["newest"]);
    }

    #[test]
    fn records_round_trip_through_json() {
        let original = record(
            "a",
            "hello",
            SystemTime::UNIX_EPOCH + Duration::from_micros(1_500_000),
        );
        let json = serde_json::to_string(&original).expect("serialize");
        assert!(
            json.contains("\"time\":\"1970-01-01T00:00:01.500000Z\""),
            "{json}"
        );
        let back: LogRecord = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back.time, original.time);
        assert_eq!(back.line, "hello");
    }

    #[tokio::test]
    async fn followers_see_new_lines() {
        let store = LogStore::new(10);
        let mut follower = store.follow();
        store.push(record("a", "live", SystemTime::now()));
        assert_eq!(follower.recv().await.expect("a line").line, "live");
    }
}
