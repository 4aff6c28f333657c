//! The durable tier against real SQLite files: it must answer as the in-memory stores do.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_telemetry::store::{Retention, StoreError, TelemetryDb};
use flotilla_telemetry::{
    AttributeValue, HttpHop, Level, LogQuery, LogRecord, LogStore, Span, SpanId, SpanKind,
    SpanStatus, Stream, TraceId, TraceQuery, TraceStore,
};

/// Keeps everything the tests write: they choose their times freely.
fn keep_all() -> Retention {
    Retention {
        max_age: Duration::from_secs(365 * 24 * 60 * 60),
        max_bytes: 1 << 30,
    }
}

fn open(dir: &Path) -> TelemetryDb {
    TelemetryDb::open(dir, keep_all()).expect("open")
}

/// Six hours ago, in whole seconds, so every time derived from it by whole milliseconds is
/// stored exactly.
fn base() -> SystemTime {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    UNIX_EPOCH + Duration::from_secs(now - 6 * 60 * 60)
}

fn at(ms: u64) -> SystemTime {
    base() + Duration::from_millis(ms)
}

fn trace_id(n: u128) -> TraceId {
    TraceId((n + 1).to_be_bytes())
}

fn span(trace: TraceId, service: &str, start: SystemTime, ms: u64) -> Span {
    Span {
        trace_id: trace,
        span_id: SpanId::random(),
        parent_span_id: None,
        service: service.into(),
        instance: None,
        name: Cow::Borrowed("GET"),
        kind: SpanKind::Server,
        start,
        duration: Duration::from_millis(ms),
        status: SpanStatus::Unset,
        status_message: None,
        http: HttpHop {
            path: Some(format!("/{service}")),
            ..HttpHop::default()
        },
        attributes: Vec::new(),
    }
}

fn child(parent: &Span, service: &str, start: SystemTime, ms: u64) -> Span {
    Span {
        parent_span_id: Some(parent.span_id),
        ..span(parent.trace_id, service, start, ms)
    }
}

fn ids(spans: &[Span]) -> Vec<SpanId> {
    spans.iter().map(|s| s.span_id).collect()
}

#[test]
fn spans_round_trip_in_order_across_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = trace_id(7);
    let root = span(id, "gateway", at(0), 50);
    let client = Span {
        kind: SpanKind::Client,
        instance: Some("gateway-1".into()),
        http: HttpHop {
            method: Some("POST".into()),
            path: Some("/orders".into()),
            status: Some(503),
            peer_service: Some("orders".into()),
            attempts: Some(3),
            breaker: Some("open".into()),
        },
        status: SpanStatus::Error,
        status_message: Some("upstream \"orders\" failed".into()),
        attributes: vec![
            ("retry".into(), AttributeValue::Bool(true)),
            ("bytes".into(), AttributeValue::Int(-12)),
            ("ratio".into(), AttributeValue::Float(0.25)),
            ("note".into(), AttributeValue::Text("ünïcode ✓".into())),
        ],
        // Starts with its parent: the parent must still come first.
        ..child(&root, "gateway", at(0), 40)
    };
    let server = child(&client, "orders", at(5), 30);
    let later = child(&server, "orders", at(20), 5);
    let memory = TraceStore::new(100);
    {
        let db = open(dir.path());
        db.record_span(span(trace_id(8), "other", at(0), 1));
        for s in [&later, &server, &client, &root] {
            db.record_span(s.clone());
            memory.record(s.clone());
        }
        db.flush();
        let stored = db.trace(id).expect("trace");
        assert_eq!(
            ids(&stored),
            [root.span_id, client.span_id, server.span_id, later.span_id]
        );
        assert_eq!(stored, memory.trace(id), "exactly what went in");
        assert!(db.trace(trace_id(9)).expect("trace").is_empty());

        // Not flushed: dropping the last handle must write it all the same.
        db.record_span(span(trace_id(10), "late", at(100), 1));
    }
    let db = open(dir.path());
    assert_eq!(db.trace(id).expect("trace"), memory.trace(id));
    assert_eq!(db.trace(trace_id(10)).expect("trace").len(), 1);
    assert_eq!(db.stats().spans_written, 0, "counters start at open");
}

/// Traces of every shape the summaries care about, spread over six hours with a burst at the
/// end, so that listings need the window to widen.
fn fleet() -> Vec<Span> {
    let mut rng = fastrand::Rng::with_seed(7);
    let services = ["gateway", "orders", "payments", "stock", "catalog"];
    let mut spans = Vec::new();
    for n in 0..400u128 {
        let id = trace_id(n);
        let start = if n < 300 {
            rng.u64(..6 * 60 * 60 * 1000 - 60_000)
        } else {
            6 * 60 * 60 * 1000 - rng.u64(..30_000)
        };
        // Some traces start together, and some last as long as others: ties need the same
        // tie-breaks as memory.
        let start = if n % 37 == 0 { 1_000_000 } else { start };
        let ms = if n % 41 == 0 { 777 } else { rng.u64(1..2_000) };
        let service = services[rng.usize(..services.len())];
        let mut root = span(id, service, at(start), ms);
        match n % 5 {
            // The root was never sent: summarized from the earliest span and the extent.
            0 => root.parent_span_id = Some(SpanId::random()),
            // Clock skew: a child starting before its root.
            1 => {
                let skewed = child(
                    &root,
                    services[rng.usize(..5)],
                    at(start.saturating_sub(3)),
                    2,
                );
                spans.push(skewed);
            }
            _ => {}
        }
        for _ in 0..rng.usize(0..4) {
            let offset = rng.u64(..ms.max(1));
            let mut hop = child(&root, services[rng.usize(..5)], at(start + offset), 1);
            if rng.u8(..10) == 0 {
                hop.http.status = Some(502);
            }
            if rng.u8(..20) == 0 {
                hop.status = SpanStatus::Error;
            }
            spans.push(hop);
        }
        if n % 43 == 0 {
            // Two roots: the earliest one is the trace's root.
            spans.push(span(id, "cron", at(start + 1), ms / 2));
        }
        spans.push(root);
    }
    spans
}

#[test]
fn traces_agree_with_the_memory_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let memory = TraceStore::new(100_000);
    for span in fleet() {
        memory.record(span.clone());
        db.record_span(span);
    }
    db.flush();

    let mut queries = vec![TraceQuery::default()];
    for limit in [1, 5, 10, 50, 399, 1_000] {
        queries.push(TraceQuery {
            limit: Some(limit),
            ..TraceQuery::default()
        });
    }
    for service in ["gateway", "stock", "cron", "nobody"] {
        for limit in [None, Some(3), Some(30)] {
            queries.push(TraceQuery {
                service: Some(service.into()),
                limit,
                ..TraceQuery::default()
            });
        }
    }
    for since_ms in [
        0,
        60 * 60 * 1000,
        5 * 60 * 60 * 1000,
        6 * 60 * 60 * 1000 - 10_000,
    ] {
        for limit in [None, Some(7)] {
            queries.push(TraceQuery {
                since: Some(at(since_ms)),
                limit,
                ..TraceQuery::default()
            });
            queries.push(TraceQuery {
                since: Some(at(since_ms)),
                errors: true,
                service: Some("payments".into()),
                limit,
                ..TraceQuery::default()
            });
        }
    }
    for errors in [false, true] {
        queries.push(TraceQuery {
            errors,
            limit: Some(20),
            ..TraceQuery::default()
        });
        for slowest in [1, 10, 100, 1_000] {
            queries.push(TraceQuery {
                errors,
                slowest: Some(slowest),
                ..TraceQuery::default()
            });
            queries.push(TraceQuery {
                errors,
                slowest: Some(slowest),
                limit: Some(4),
                service: Some("orders".into()),
                since: Some(at(2 * 60 * 60 * 1000)),
            });
        }
    }
    queries.push(TraceQuery {
        limit: Some(0),
        ..TraceQuery::default()
    });

    for query in &queries {
        let expected = memory.traces(query);
        let stored = db.traces(query).expect("traces");
        assert_eq!(stored, expected, "{query:?}");
    }
    // Not all vacuous.
    assert_eq!(
        db.traces(&TraceQuery::default()).expect("traces").len(),
        400
    );
    let errors = TraceQuery {
        errors: true,
        ..TraceQuery::default()
    };
    assert!(!db.traces(&errors).expect("traces").is_empty());
}

fn record(time: SystemTime, service: &str, instance: u8, line: &str) -> LogRecord {
    LogRecord {
        time,
        version: Some(format!("1.{instance}.0").into()),
        ..LogRecord::new(
            service.into(),
            format!("{service}-{instance}").into(),
            Stream::Stdout,
            line.into(),
        )
    }
}

type Key = (
    SystemTime,
    String,
    String,
    Stream,
    String,
    Option<Level>,
    Option<TraceId>,
    Option<String>,
);

fn key(r: &LogRecord) -> Key {
    (
        r.time,
        r.service.to_string(),
        r.instance.to_string(),
        r.stream,
        r.line.clone(),
        r.level,
        r.trace_id,
        r.version.as_deref().map(str::to_owned),
    )
}

fn keys<'a>(records: impl IntoIterator<Item = &'a LogRecord>) -> Vec<Key> {
    records.into_iter().map(key).collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn logs_fleet() -> Vec<LogRecord> {
    let mut records = Vec::new();
    for i in 0..200u64 {
        let service = ["orders", "payments", "catalog"][(i % 3) as usize];
        let line = match i % 7 {
            0 => format!("ERROR payment {i} declined trace_id={TRACE}"),
            1 => format!("WARN slow query took {i}ms"),
            2 => format!("INFO GET /orders/{i} 200"),
            3 => format!("debug cache warm {i}"),
            4 => format!(r#"{{"level":"info","msg":"Connection REFUSED by db-{i}"}}"#),
            5 => format!("plain line {i} without level"),
            _ => format!("trace level={} n={i}", "trace"),
        };
        // Several lines share a time: order among them is the order they were written.
        records.push(record(at(i / 2 * 1_000), service, (i % 2) as u8, &line));
    }
    records
}

#[test]
fn log_queries_agree_with_the_memory_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let memory = LogStore::new(10_000);
    for r in logs_fleet() {
        db.record_log(Arc::new(r.clone()));
        memory.push(r);
    }
    db.flush();

    let trace = TraceId::parse(TRACE);
    let mut queries = vec![LogQuery::default()];
    for limit in [None, Some(1), Some(10)] {
        let q = |q: LogQuery| LogQuery { limit, ..q };
        queries.extend([
            q(LogQuery::default()),
            q(LogQuery {
                service: Some("payments".into()),
                ..LogQuery::default()
            }),
            q(LogQuery {
                service: Some("orders".into()),
                instance: Some("orders-1".into()),
                ..LogQuery::default()
            }),
            q(LogQuery {
                level: Some(Level::Warn),
                ..LogQuery::default()
            }),
            q(LogQuery {
                level: Some(Level::Trace),
                ..LogQuery::default()
            }),
            q(LogQuery {
                trace,
                ..LogQuery::default()
            }),
            q(LogQuery {
                since: Some(at(50_000)),
                service: Some("catalog".into()),
                ..LogQuery::default()
            }),
            q(LogQuery {
                grep: Some("refused".into()),
                level: Some(Level::Info),
                since: Some(at(10_000)),
                ..LogQuery::default()
            }),
        ]);
    }
    for query in &queries {
        let expected: Vec<Key> = memory.query(query).iter().map(|r| key(r)).collect();
        let stored = db.logs(query, None).expect("logs");
        assert_eq!(keys(&stored), expected, "{query:?}");
    }
    let warn = LogQuery {
        level: Some(Level::Warn),
        ..LogQuery::default()
    };
    assert!(!db.logs(&warn, None).expect("logs").is_empty());

    // Paging back: each page is the newest `limit` strictly older than the oldest shown.
    let everything: Vec<Key> = memory
        .query(&LogQuery::default())
        .iter()
        .map(|r| key(r))
        .collect();
    let page = LogQuery {
        limit: Some(9),
        ..LogQuery::default()
    };
    let mut before = None;
    let mut pages = Vec::new();
    loop {
        let records = db.logs(&page, before).expect("logs");
        let Some(oldest) = records.first() else { break };
        before = Some(oldest.time);
        let newest = records.last().expect("a record").time;
        assert!(
            pages.last().is_none_or(|(t, _)| newest < *t),
            "strictly older"
        );
        pages.push((oldest.time, keys(&records)));
    }
    // Lines share times two by two, and a page may end between two of them: `before` then
    // skips the other, as a strict bound must. Every time is still seen.
    let mut times: Vec<SystemTime> = pages
        .iter()
        .rev()
        .flat_map(|(_, page)| page.iter().map(|k| k.0))
        .collect();
    times.dedup();
    let mut all_times: Vec<SystemTime> = everything.iter().map(|k| k.0).collect();
    all_times.dedup();
    assert_eq!(times, all_times);
}

#[test]
fn grep_finds_substrings_like_the_memory_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let memory = LogStore::new(100);
    let lines = [
        "Connection REFUSED by payments-db",
        r#"say "hi" OR -x*y please"#,
        "OR alone, and NOT this",
        "ÄÖÜ café au lait",
        "a - b",
        "nothing to see",
        "xx",
    ];
    for (i, line) in lines.iter().enumerate() {
        let r = record(at(i as u64), "svc", 0, line);
        db.record_log(Arc::new(r.clone()));
        memory.push(r);
    }
    db.flush();
    let grep = |needle: &str| {
        let query = LogQuery {
            grep: Some(needle.into()),
            ..LogQuery::default()
        };
        let stored: Vec<String> = db
            .logs(&query, None)
            .expect("logs")
            .into_iter()
            .map(|r| r.line)
            .collect();
        let expected: Vec<String> = memory
            .query(&query)
            .iter()
            .map(|r| r.line.clone())
            .collect();
        assert_eq!(stored, expected, "grep {needle:?}");
        stored
    };
    // In the middle of a word, ignoring case.
    assert_eq!(grep("fuse"), ["Connection REFUSED by payments-db"]);
    assert_eq!(
        grep("ReFuSeD bY PAY"),
        ["Connection REFUSED by payments-db"]
    );
    // Too short for trigrams: the fallback, just as correct.
    assert_eq!(grep("ym"), ["Connection REFUSED by payments-db"]);
    assert_eq!(grep("XX"), ["xx"]);
    assert_eq!(grep("x").len(), 2);
    assert_eq!(grep("").len(), lines.len());
    // FTS5 syntax is text.
    assert_eq!(grep(r#""hi""#), [r#"say "hi" OR -x*y please"#]);
    assert_eq!(grep(r#""hi" OR -x*"#), [r#"say "hi" OR -x*y please"#]);
    assert_eq!(grep("-x*y"), [r#"say "hi" OR -x*y please"#]);
    assert_eq!(grep(" OR ").len(), 1);
    assert_eq!(grep("OR ").len(), 2);
    assert_eq!(grep("NOT this"), ["OR alone, and NOT this"]);
    assert_eq!(grep(" - "), ["a - b"]);
    assert_eq!(grep("\"").len(), 1);
    assert_eq!(grep("*").len(), 1);
    assert_eq!(grep("payments-db*").len(), 0);
    // Case is ignored for ASCII only, as in memory, though the index folds more.
    assert_eq!(grep("CAFÉ").len(), 0);
    assert_eq!(grep("CAFé AU"), ["ÄÖÜ café au lait"]);
    assert_eq!(grep("äöü").len(), 0);

    // The index is what answers: with it emptied, long needles find nothing; short ones do not
    // use it.
    let conn = rusqlite::Connection::open(dir.path().join("telemetry.db")).expect("open");
    conn.execute("INSERT INTO logs_fts (logs_fts) VALUES ('delete-all')", [])
        .expect("empty the index");
    let query = |needle: &str| LogQuery {
        grep: Some(needle.into()),
        ..LogQuery::default()
    };
    assert!(db.logs(&query("fuse"), None).expect("logs").is_empty());
    assert_eq!(db.logs(&query("ym"), None).expect("logs").len(), 1);
}

fn integrity_check(dir: &Path) {
    let conn = rusqlite::Connection::open(dir.join("telemetry.db")).expect("open");
    conn.execute(
        "INSERT INTO logs_fts (logs_fts, rank) VALUES ('integrity-check', 1)",
        [],
    )
    .expect("the full-text index matches the lines");
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .expect("integrity_check");
    assert_eq!(ok, "ok");
}

#[test]
fn retention_deletes_what_is_too_old_and_counts_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let retention = Retention {
        max_age: Duration::from_secs(60 * 60),
        ..Retention::default()
    };
    let db = TelemetryDb::open(dir.path(), retention).expect("open");
    let now = SystemTime::now();
    let old = now - Duration::from_secs(2 * 60 * 60);
    for n in 0..30 {
        db.record_span(span(trace_id(n), "old", old, 1));
    }
    for n in 100..110 {
        db.record_span(span(trace_id(n), "new", now, 1));
    }
    for i in 0..20 {
        db.record_log(Arc::new(record(
            old,
            "old",
            0,
            &format!("ancient line {i}"),
        )));
    }
    for i in 0..5 {
        db.record_log(Arc::new(record(now, "new", 0, &format!("fresh line {i}"))));
    }
    db.flush();
    assert_eq!(db.stats().deleted_by_retention, 0);
    db.enforce_retention().expect("retention");

    let stats = db.stats();
    assert_eq!(stats.deleted_by_retention, 50);
    assert_eq!((stats.spans_written, stats.logs_written), (40, 25));
    assert!(db.trace(trace_id(0)).expect("trace").is_empty());
    assert_eq!(db.trace(trace_id(100)).expect("trace").len(), 1);
    let listed = db.traces(&TraceQuery::default()).expect("traces");
    assert_eq!(listed.len(), 10);
    assert!(listed.iter().all(|t| t.root_service == "new"));
    let all = db.logs(&LogQuery::default(), None).expect("logs");
    assert_eq!(all.len(), 5);
    let ancient = LogQuery {
        grep: Some("ancient".into()),
        ..LogQuery::default()
    };
    assert!(db.logs(&ancient, None).expect("logs").is_empty());
    integrity_check(dir.path());

    db.enforce_retention().expect("retention");
    assert_eq!(
        db.stats().deleted_by_retention,
        50,
        "nothing more to delete"
    );
}

#[test]
fn retention_keeps_the_data_under_its_size_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let max_bytes = 512 * 1024;
    let retention = Retention {
        max_bytes,
        ..Retention::default()
    };
    let db = TelemetryDb::open(dir.path(), retention).expect("open");
    let start = SystemTime::now() - Duration::from_secs(60 * 60);
    let filler = "lorem ipsum dolor sit amet ".repeat(6);
    // Several megabytes: ten times the bound.
    for n in 0..3_000u64 {
        let time = start + Duration::from_millis(n);
        let mut s = span(trace_id(u128::from(n)), "svc", time, 1);
        s.status_message = Some(filler.clone());
        db.record_span(s);
        db.record_log(Arc::new(record(
            time,
            "svc",
            0,
            &format!("{n:05} {filler}"),
        )));
    }
    db.flush();
    db.enforce_retention().expect("retention");

    let stats = db.stats();
    assert_eq!(stats.dropped, 0);
    assert_eq!((stats.spans_written, stats.logs_written), (3_000, 3_000));
    assert!(
        stats.size_bytes <= max_bytes,
        "{} bytes over a bound of {max_bytes}",
        stats.size_bytes
    );
    assert!(stats.deleted_by_retention > 3_000, "{stats:?}");
    // The oldest went, the newest stayed.
    assert!(db.trace(trace_id(0)).expect("trace").is_empty());
    assert_eq!(db.trace(trace_id(2_999)).expect("trace").len(), 1);
    let newest = db
        .logs(
            &LogQuery {
                limit: Some(1),
                ..LogQuery::default()
            },
            None,
        )
        .expect("logs");
    assert!(newest[0].line.starts_with("02999 "));
    let first = LogQuery {
        grep: Some("00000 lorem".into()),
        ..LogQuery::default()
    };
    assert!(db.logs(&first, None).expect("logs").is_empty());
    integrity_check(dir.path());

    // The file itself shrank, not just the pages in use.
    drop(db);
    let file = std::fs::metadata(dir.path().join("telemetry.db"))
        .expect("file")
        .len();
    assert!(file <= max_bytes, "the file is {file} bytes");
}

#[test]
fn a_flood_never_blocks_and_every_span_is_accounted_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let template = span(trace_id(1), "flood", at(0), 1);
    const PUSHED: u64 = 200_000;
    let started = Instant::now();
    for n in 0..PUSHED {
        db.record_span(Span {
            trace_id: trace_id(u128::from(n / 4)),
            span_id: SpanId::random(),
            ..template.clone()
        });
    }
    let pushing = started.elapsed();
    db.flush();
    let stats = db.stats();
    assert_eq!(stats.spans_written + stats.dropped, PUSHED, "{stats:?}");
    // The writer cannot keep up with a tight loop: had recording waited for it, nothing would
    // have been dropped.
    assert!(stats.dropped > 0, "{stats:?}");
    assert!(
        pushing < Duration::from_secs(10),
        "pushing took {pushing:?}"
    );
}

#[test]
fn a_newer_schema_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = open(dir.path());
        db.record_span(span(trace_id(1), "a", at(0), 1));
    }
    let path = dir.path().join("telemetry.db");
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.pragma_update(None, "user_version", 99)
        .expect("user_version");
    drop(conn);

    let Err(error) = TelemetryDb::open(dir.path(), keep_all()) else {
        panic!("a newer schema was opened");
    };
    assert!(
        matches!(
            error,
            StoreError::NewerSchema {
                found: 99,
                supported: 2
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("left untouched"), "{error}");
    let conn = rusqlite::Connection::open(&path).expect("open");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .expect("user_version");
    let spans: i64 = conn
        .query_row("SELECT count(*) FROM spans", [], |row| row.get(0))
        .expect("count");
    assert_eq!((version, spans), (99, 1));
}

#[test]
fn a_file_that_is_not_a_database_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("telemetry.db");
    let junk = vec![0x5a; 8192];
    std::fs::write(&path, &junk).expect("write");
    let Err(error) = TelemetryDb::open(dir.path(), keep_all()) else {
        panic!("junk was opened");
    };
    assert!(matches!(error, StoreError::Sqlite(_)), "{error}");
    assert_eq!(std::fs::read(&path).expect("read"), junk);
}

#[test]
fn open_creates_the_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nested = dir.path().join(".flotilla").join("telemetry");
    let db = TelemetryDb::open(&nested, keep_all()).expect("open");
    db.record_span(span(trace_id(1), "a", at(0), 1));
    db.flush();
    assert_eq!(db.stats().spans_written, 1);
    assert!(db.stats().size_bytes > 0);
    assert!(nested.join("telemetry.db").exists());
}

/// A file written by the first schema (no version column) is brought forward on open, keeping
/// its lines.
#[test]
fn a_version_1_file_is_migrated_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(flotilla_telemetry::store::DB_FILE);
    {
        let conn = rusqlite::Connection::open(&path).expect("create");
        // A minute ago: within the default retention, which runs on open.
        let then = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_micros()
            - 60_000_000;
        conn.execute_batch(&format!(
            "CREATE TABLE spans (trace_id BLOB NOT NULL, span_id BLOB NOT NULL, parent BLOB,
                service TEXT NOT NULL, start_us INTEGER NOT NULL, duration_us INTEGER NOT NULL,
                error INTEGER NOT NULL, span TEXT NOT NULL);
             CREATE TABLE logs (id INTEGER PRIMARY KEY, time_us INTEGER NOT NULL,
                service TEXT NOT NULL, instance TEXT NOT NULL, stream TEXT NOT NULL,
                level INTEGER, trace_id BLOB, line TEXT NOT NULL);
             CREATE VIRTUAL TABLE logs_fts USING fts5 (line, content = 'logs',
                content_rowid = 'id', tokenize = 'trigram case_sensitive 0');
             INSERT INTO logs (time_us, service, instance, stream, line)
                VALUES ({then}, 'orders', 'orders-1', 'stdout', 'from before');
             INSERT INTO logs_fts (rowid, line) VALUES (1, 'from before');
             PRAGMA user_version = 1;"
        ))
        .expect("a version 1 file");
    }
    let db = TelemetryDb::open(dir.path(), Retention::default()).expect("opened and migrated");
    let mut new = record(SystemTime::now(), "orders", 2, "from after");
    new.version = Some("2.0.0".into());
    db.record_log(Arc::new(new));
    db.flush();
    let lines = db.logs(&LogQuery::default(), None).expect("query");
    let seen: Vec<(&str, Option<&str>)> = lines
        .iter()
        .map(|r| (r.line.as_str(), r.version.as_deref()))
        .collect();
    assert_eq!(seen, [("from before", None), ("from after", Some("2.0.0"))]);
}
