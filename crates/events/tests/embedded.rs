//! The embedded log: the shared broker suite, and what only a log on disk has to show —
//! restarts, torn tails, segments, retention, `kill -9`, a full disk, group commit.

mod suite;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use flotilla_events::log::{EventLog, FsyncPolicy, LogConfig};
use flotilla_events::{Broker, BrokerError, TopicConfig};
use serde_json::json;

/// Set in the environment of a child process re-running this binary: `<mode>:<dir>`.
const CHILD: &str = "FLOTILLA_EVLOG_CHILD";

async fn open(dir: &Path, config: LogConfig) -> EventLog {
    EventLog::open(dir, config).await.expect("open the log")
}

async fn fresh() -> (tempfile::TempDir, Arc<dyn Broker>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), LogConfig::default()).await;
    (dir, Arc::new(log))
}

fn small(segment_bytes: u64, index_interval_bytes: u64) -> LogConfig {
    LogConfig {
        fsync: FsyncPolicy::Always,
        segment_bytes,
        index_interval_bytes,
    }
}

fn topic(name: &str, partitions: u32) -> TopicConfig {
    TopicConfig {
        name: name.to_owned(),
        partitions,
        retention: None,
        max_bytes: None,
    }
}

fn segment_files(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("partition directory")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files
}

async fn publish_n(log: &EventLog, topic: &str, key: Option<&str>, range: std::ops::Range<u64>) {
    for n in range {
        log.publish(
            topic,
            key,
            suite::event(&format!("e{n}"), json!({ "n": n })),
        )
        .await
        .expect("publish");
    }
}

fn ids(records: &[flotilla_events::Record]) -> Vec<String> {
    records.iter().map(suite::id_of).collect()
}

fn expected_ids(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|n| format!("e{n}")).collect()
}

// The shared suite, a property per test.

macro_rules! suite_tests {
    ($($property:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $property() {
                let (_dir, broker) = fresh().await;
                suite::$property(broker, "suite").await;
            }
        )*
    };
}

suite_tests!(
    round_trip,
    keys_keep_partition_and_order,
    every_group_gets_every_record,
    a_group_gets_each_record_once,
    nack_redelivers_the_same_record_first,
    a_new_consumer_resumes_after_the_last_ack,
    seek_replays,
    offset_at_finds_records_by_time,
    stats_show_offsets_and_lag,
    unknown_topics_and_partitions_are_errors,
    create_topic_is_idempotent,
    concurrent_publishes_are_all_stored,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_suite_in_one_log() {
    let (_dir, broker) = fresh().await;
    suite::run_all(broker, "all").await;
}

// Embedded only.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_keeps_records_and_group_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small(2048, 256);
    {
        let log = open(dir.path(), config.clone()).await;
        log.create_topic(&topic("orders", 2)).await.expect("create");
        publish_n(&log, "orders", Some("a"), 0..30).await;
        publish_n(&log, "orders", None, 30..50).await;
        let partition = flotilla_events::partition_for("a", 2);
        let mut consumer = log
            .subscribe("orders", "billing", partition, 5)
            .await
            .expect("subscribe");
        for _ in 0..3 {
            consumer.next().await.expect("next");
            consumer.ack().await.expect("ack");
        }
        // Delivered, not acknowledged: comes again after the restart.
        consumer.next().await.expect("next");
        log.seek("orders", "audit", 1 - partition, 5)
            .await
            .expect("seek");
    }
    let log = open(dir.path(), config).await;
    // Known without creating it again.
    let stats = log.stats("orders").await.expect("stats");
    assert_eq!(stats.partitions.len(), 2);
    assert_eq!(stats.partitions.iter().map(|p| p.records).sum::<u64>(), 50);
    let partition = flotilla_events::partition_for("a", 2);
    let billing = stats
        .groups
        .iter()
        .find(|g| g.group == "billing" && g.partition == partition)
        .expect("billing kept");
    assert_eq!(billing.next_offset, 3);
    let audit = stats
        .groups
        .iter()
        .find(|g| g.group == "audit" && g.partition == 1 - partition)
        .expect("audit kept");
    assert_eq!(audit.next_offset, 5);

    let records = suite::read_all(&log, "orders", partition).await;
    assert_eq!(ids(&records[..30]), expected_ids(0..30));
    let mut consumer = log
        .subscribe("orders", "billing", partition, 5)
        .await
        .expect("subscribe");
    let delivery = consumer.next().await.expect("next");
    assert_eq!((delivery.record.offset, delivery.attempt), (3, 1));

    // Offsets go on from where they were.
    let end = stats.partitions[partition as usize].end_offset;
    let at = log
        .publish("orders", Some("a"), suite::event("after", json!(null)))
        .await
        .expect("publish");
    assert_eq!(at.offset, end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small(1 << 20, 64);
    {
        let log = open(dir.path(), config.clone()).await;
        log.create_topic(&topic("torn", 1)).await.expect("create");
        publish_n(&log, "torn", None, 0..10).await;
    }
    let partition = dir.path().join("torn").join("0");
    let segment = segment_files(&partition, "log").pop().expect("a segment");
    let whole = std::fs::metadata(&segment).expect("metadata").len();

    // Garbage after the last record, then zeros (what a crash can leave past the last write).
    for tail in [vec![0xAB; 37], vec![0; 4096]] {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&segment)
            .expect("open segment");
        file.write_all(&tail).expect("append garbage");
        drop(file);
        let log = open(dir.path(), config.clone()).await;
        assert_eq!(std::fs::metadata(&segment).expect("metadata").len(), whole);
        let records = suite::read_all(&log, "torn", 0).await;
        assert_eq!(ids(&records), expected_ids(0..10));
    }

    // The last record cut short: it goes, its predecessors stay, offsets go on from there.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .expect("open segment");
    file.set_len(whole - 5).expect("truncate");
    drop(file);
    let log = open(dir.path(), config.clone()).await;
    let records = suite::read_all(&log, "torn", 0).await;
    assert_eq!(ids(&records), expected_ids(0..9));
    let at = log
        .publish("torn", None, suite::event("e9-again", json!(null)))
        .await
        .expect("publish after recovery");
    assert_eq!(at.offset, 9);
    publish_n(&log, "torn", None, 10..20).await;
    drop(log);

    let log = open(dir.path(), config).await;
    let records = suite::read_all(&log, "torn", 0).await;
    assert_eq!(records.len(), 20);
    assert_eq!(suite::id_of(&records[9]), "e9-again");
    assert_eq!(ids(&records[10..]), expected_ids(10..20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_missing_index_is_rebuilt_and_costs_no_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small(1 << 20, 100);
    {
        let log = open(dir.path(), config.clone()).await;
        log.create_topic(&topic("indexed", 1))
            .await
            .expect("create");
        publish_n(&log, "indexed", None, 0..200).await;
    }
    let partition = dir.path().join("indexed").join("0");
    let index = segment_files(&partition, "index").pop().expect("an index");
    let good = std::fs::read(&index).expect("read index");
    assert!(good.len() >= 16 * 50, "an entry about every 100 bytes");

    let mut garbage = good.clone();
    for (i, byte) in garbage.iter_mut().enumerate().skip(good.len() / 2) {
        *byte = (i * 7919 % 251) as u8;
    }
    for damage in [garbage, Vec::new(), good[..good.len() - 7].to_vec()] {
        std::fs::write(&index, &damage).expect("damage the index");
        let log = open(dir.path(), config.clone()).await;
        assert_eq!(std::fs::read(&index).expect("read index"), good, "rebuilt");
        for from in [0, 1, 57, 133, 199] {
            let records = log.read("indexed", 0, from, 3).await.expect("read");
            let want: Vec<u64> = (from..(from + 3).min(200)).collect();
            assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), want);
            assert_eq!(ids(&records), expected_ids(from..(from + 3).min(200)));
        }
    }
    std::fs::remove_file(&index).expect("remove the index");
    let log = open(dir.path(), config).await;
    assert_eq!(std::fs::read(&index).expect("read index"), good, "rebuilt");
    assert_eq!(suite::read_all(&log, "indexed", 0).await.len(), 200);
}

/// Damaged files are reported and worked around, never a panic, and never stop the log from
/// opening: a damaged `topic.json` hides its topic until it is created again, damaged group
/// offsets start the group over, a damaged record in a sealed segment is an error for reads
/// that reach it (a seek gets a group past it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_files_are_reported_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small(1024, 64);
    {
        let log = open(dir.path(), config.clone()).await;
        log.create_topic(&topic("a", 1)).await.expect("create");
        log.create_topic(&topic("b", 1)).await.expect("create");
        publish_n(&log, "a", None, 0..30).await;
        publish_n(&log, "b", None, 0..5).await;
        log.seek("a", "g", 0, 5).await.expect("seek");
    }
    std::fs::write(dir.path().join("b").join("topic.json"), "{not json").expect("damage");
    std::fs::write(
        dir.path().join("a").join("groups").join("g.json"),
        [0xff; 9],
    )
    .expect("damage");
    std::fs::write(dir.path().join("a").join("0").join("notes.txt"), "hi").expect("stray file");
    std::fs::write(dir.path().join("stray-file"), "hi").expect("stray file");
    let segments = segment_files(&dir.path().join("a").join("0"), "log");
    let first = &segments[0];
    let mut bytes = std::fs::read(first).expect("segment");
    bytes[200] ^= 0x55;
    std::fs::write(first, bytes).expect("damage a sealed segment");

    let log = open(dir.path(), config).await;
    assert!(matches!(
        log.stats("b").await,
        Err(BrokerError::UnknownTopic(_))
    ));
    log.create_topic(&topic("b", 1)).await.expect("adopt");
    assert_eq!(
        ids(&suite::read_all(&log, "b", 0).await),
        expected_ids(0..5)
    );

    let stats = log.stats("a").await.expect("stats");
    assert!(stats.groups.is_empty(), "{stats:?}");
    match log.read("a", 0, 0, 100).await {
        Err(BrokerError::Corrupt(why)) => assert!(why.contains(".log"), "{why}"),
        other => panic!("reading over a damaged record: {other:?}"),
    }
    let second = segments[1]
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse::<u64>().ok())
        .expect("base offset");
    let mut consumer = log.subscribe("a", "g", 0, 5).await.expect("subscribe");
    assert!(matches!(
        consumer.next().await,
        Err(BrokerError::Corrupt(_))
    ));
    log.seek("a", "g", 0, second).await.expect("seek past");
    let mut consumer = log.subscribe("a", "g", 0, 5).await.expect("subscribe");
    let delivery = suite::next(&mut *consumer).await;
    assert_eq!(delivery.record.offset, second);
    let records = log.read("a", 0, second, 100).await.expect("read");
    assert_eq!(ids(&records), expected_ids(second..30));
}

/// After a power loss with `FsyncPolicy::Interval` a group's file can name an offset the log
/// no longer reaches; records appended from there on must still reach the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_offset_past_the_end_is_brought_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = open(dir.path(), LogConfig::default()).await;
        log.create_topic(&topic("lost", 1)).await.expect("create");
        publish_n(&log, "lost", None, 0..10).await;
        log.seek("lost", "ahead", 0, 10).await.expect("seek");
    }
    let file = dir.path().join("lost").join("groups").join("ahead.json");
    let stored = std::fs::read_to_string(&file).expect("group file");
    std::fs::write(&file, stored.replace("10", "100")).expect("pretend a lost tail");

    let log = open(dir.path(), LogConfig::default()).await;
    let stats = log.stats("lost").await.expect("stats");
    assert_eq!(stats.groups[0].next_offset, 10);
    assert!(
        std::fs::read_to_string(&file)
            .expect("group file")
            .contains("10")
    );
    let mut consumer = log
        .subscribe("lost", "ahead", 0, 5)
        .await
        .expect("subscribe");
    publish_n(&log, "lost", None, 10..11).await;
    let delivery = suite::next(&mut *consumer).await;
    assert_eq!(delivery.record.offset, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_roll_and_reads_cross_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small(1024, 128);
    let log = open(dir.path(), config.clone()).await;
    log.create_topic(&topic("rolling", 1))
        .await
        .expect("create");
    let started = SystemTime::now();
    publish_n(&log, "rolling", None, 0..100).await;
    let partition = dir.path().join("rolling").join("0");
    let segments = segment_files(&partition, "log");
    assert!(segments.len() >= 10, "{} segments", segments.len());
    for segment in &segments {
        assert!(std::fs::metadata(segment).expect("metadata").len() <= 1024);
    }
    // Named by their first offset.
    let first = segments[1]
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("name");
    assert_eq!(first.len(), 20);
    assert!(first.parse::<u64>().expect("digits") > 0);

    for (from, max) in [(0, 100), (37, 20), (95, 10), (99, 1), (100, 5)] {
        let records = log.read("rolling", 0, from, max).await.expect("read");
        let end = (from + max as u64).min(100);
        assert_eq!(ids(&records), expected_ids(from..end), "from {from}");
    }
    assert_eq!(
        log.offset_at("rolling", 0, started)
            .await
            .expect("offset_at"),
        0
    );

    // One record larger than a segment gets a segment of its own.
    let big = suite::event("big", json!({ "blob": "b".repeat(5000) }));
    let at = log
        .publish("rolling", None, big.clone())
        .await
        .expect("big");
    publish_n(&log, "rolling", None, 101..105).await;
    drop(log);

    let log = open(dir.path(), config).await;
    let records = suite::read_all(&log, "rolling", 0).await;
    assert_eq!(records.len(), 105);
    assert_eq!(records[at.offset as usize].event, big);
    assert_eq!(ids(&records[101..]), expected_ids(101..105));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_segments_never_the_active_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), small(512, 64)).await;
    let mut config = topic("expiring", 1);
    config.retention = Some(Duration::from_millis(400));
    log.create_topic(&config).await.expect("create");
    publish_n(&log, "expiring", None, 0..20).await;
    let mut consumer = log
        .subscribe("expiring", "slow", 0, 5)
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(600)).await;
    publish_n(&log, "expiring", None, 20..30).await;

    let deleted = log.enforce_retention().await.expect("retention");
    assert!(deleted > 0);
    let stats = log.stats("expiring").await.expect("stats");
    let partition = stats.partitions[0];
    // Old records go a whole segment at a time: one sharing a segment with a young one stays.
    assert!(partition.start_offset > 0, "{partition:?}");
    assert!(
        partition.start_offset <= 20,
        "the young records stay: {partition:?}"
    );
    assert_eq!(partition.end_offset, 30);
    let records = suite::read_all(&log, "expiring", 0).await;
    assert_eq!(records[0].offset, partition.start_offset);
    assert_eq!(
        ids(&records),
        expected_ids(partition.start_offset..30),
        "reads from before the start begin at the oldest held"
    );
    // The group was at 0: it goes on from the oldest record held.
    let slow = &stats.groups[0];
    assert_eq!(slow.next_offset, partition.start_offset);
    assert_eq!(slow.lag, 30 - partition.start_offset);
    let delivery = consumer.next().await.expect("next");
    assert_eq!(delivery.record.offset, partition.start_offset);

    // Everything expired: all but the active segment go.
    tokio::time::sleep(Duration::from_millis(600)).await;
    log.enforce_retention().await.expect("retention");
    let partition_dir = dir.path().join("expiring").join("0");
    assert_eq!(segment_files(&partition_dir, "log").len(), 1);
    assert_eq!(segment_files(&partition_dir, "index").len(), 1);
    let stats = log.stats("expiring").await.expect("stats");
    assert_eq!(stats.partitions[0].end_offset, 30);
    let held = suite::read_all(&log, "expiring", 0).await;
    assert_eq!(held.last().map(|r| r.offset), Some(29));
    drop(log);

    // The start survives a restart.
    let log = open(dir.path(), small(512, 64)).await;
    let after = log.stats("expiring").await.expect("stats").partitions[0];
    assert_eq!(after, stats.partitions[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_deletes_the_oldest_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), small(512, 64)).await;
    let mut config = topic("bounded", 1);
    log.create_topic(&config).await.expect("create");
    publish_n(&log, "bounded", None, 0..100).await;
    assert_eq!(log.enforce_retention().await.expect("retention"), 0);
    // Set by creating the topic again.
    config.max_bytes = Some(2048);
    log.create_topic(&config).await.expect("create again");
    assert!(log.enforce_retention().await.expect("retention") > 0);
    let stats = log.stats("bounded").await.expect("stats").partitions[0];
    assert!(stats.bytes <= 2048, "{stats:?}");
    assert!(stats.bytes > 1024, "{stats:?}");
    assert_eq!(stats.end_offset, 100);
    let records = suite::read_all(&log, "bounded", 0).await;
    assert_eq!(ids(&records), expected_ids(stats.start_offset..100));
    let json =
        std::fs::read_to_string(dir.path().join("bounded").join("topic.json")).expect("topic.json");
    assert!(json.contains("2048"), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_cannot_be_directories_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("events");
    let log = open(&root, LogConfig::default()).await;
    for name in [
        "../escape",
        "a/b",
        "..",
        ".",
        "",
        ".hidden",
        "tab\there",
        "nul\0",
    ] {
        match log.create_topic(&topic(name, 1)).await {
            Err(BrokerError::UnknownTopic(refused)) => assert_eq!(refused, name),
            other => panic!("{name:?}: {other:?}"),
        }
    }
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
    assert_eq!(std::fs::read_dir(&root).expect("dir").count(), 0);
    // Dots in the middle are how topics are named.
    log.create_topic(&topic("order.placed.dlq", 1))
        .await
        .expect("create");
    // Group names are free-form: they are encoded into file names.
    log.seek("order.placed.dlq", "../../odd group", 0, 0)
        .await
        .expect("seek");
    let groups = root.join("order.placed.dlq").join("groups");
    assert_eq!(std::fs::read_dir(&groups).expect("groups").count(), 1);
    drop(log);
    let log = open(&root, LogConfig::default()).await;
    let stats = log.stats("order.placed.dlq").await.expect("stats");
    assert_eq!(stats.groups[0].group, "../../odd group");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_fsync_acknowledges_writes_and_syncs_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        fsync: FsyncPolicy::Interval(Duration::from_millis(50)),
        ..LogConfig::default()
    };
    let log = open(dir.path(), config.clone()).await;
    log.create_topic(&topic("relaxed", 2))
        .await
        .expect("create");
    publish_n(&log, "relaxed", Some("k"), 0..100).await;
    let counters = log.counters();
    assert_eq!(counters.records, 100);
    assert!(counters.fsyncs <= 2, "{counters:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(log.counters().fsyncs >= 1, "{:?}", log.counters());
    log.flush().await.expect("flush");
    drop(log);
    let log = open(dir.path(), config).await;
    let partition = flotilla_events::partition_for("k", 2);
    assert_eq!(suite::read_all(&log, "relaxed", partition).await.len(), 100);
}

/// Group commit, shown without timing: on a current-thread runtime all 16 publishers enqueue
/// before the writer runs, so a batch holds what everyone had waiting.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_publishers_share_fsyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), LogConfig::default()).await;
    log.create_topic(&topic("grouped", 1))
        .await
        .expect("create");

    // One publisher at a time: an fsync per record.
    publish_n(&log, "grouped", None, 0..20).await;
    let alone = log.counters();
    assert_eq!((alone.records, alone.fsyncs), (20, 20));

    let mut tasks = Vec::new();
    for task in 0..16u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let start = 1000 + task * 100;
            publish_n(&log, "grouped", None, start..start + 50).await;
        }));
    }
    for task in tasks {
        task.await.expect("publisher");
    }
    let counters = log.counters();
    let records = counters.records - alone.records;
    let fsyncs = counters.fsyncs - alone.fsyncs;
    assert_eq!(records, 800);
    assert!(
        fsyncs * 4 <= records,
        "800 records from 16 publishers took {fsyncs} fsyncs"
    );
    assert_eq!(
        suite::read_all(&log, "grouped", 0).await.len(),
        820,
        "and every one is stored"
    );
}

/// Lines of a child's stdout, read on a thread so that a stalled child cannot hang the test.
fn lines_of(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn child_command(mode: &str, dir: &Path) -> Command {
    let exe = std::env::current_exe().expect("the test binary");
    let mut command = Command::new(exe);
    command
        .args([
            "child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, format!("{mode}:{}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
}

/// A child publishes as fast as it can with `fsync = always`, printing each acknowledged record;
/// it is killed with SIGKILL mid-stream; every record it reported is then where it was reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = child_command("crash", dir.path())
        .spawn()
        .expect("spawn the child");
    let lines = lines_of(child.stdout.take().expect("stdout"));

    let mut acked = Vec::new();
    let mut committed = 0u64;
    let mut take = |line: String, acked: &mut Vec<(u32, u64, String)>| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["ACK", partition, offset, id] => acked.push((
                partition.parse().expect("partition"),
                offset.parse().expect("offset"),
                (*id).to_owned(),
            )),
            ["COMMIT", next] => committed = committed.max(next.parse().expect("offset")),
            _ => {}
        }
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30)
        && (acked.len() < 3000 || started.elapsed() < Duration::from_secs(1))
    {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => take(line, &mut acked),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(status) = child.try_wait().expect("child status") {
                    panic!("the child exited on its own: {status}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the child closed stdout"),
        }
    }
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    // What it printed before dying was acknowledged too.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        take(line, &mut acked);
    }
    assert!(acked.len() >= 100, "only {} acknowledged", acked.len());

    let root = dir.path().join("events");
    let before = log_bytes(&root.join("crash"));
    let log = open(&root, small(64 << 10, 1024)).await;
    let cut = before - log_bytes(&root.join("crash"));
    for (partition, offset, id) in &acked {
        let records = log
            .read("crash", *partition, *offset, 1)
            .await
            .expect("read");
        let record = records
            .first()
            .unwrap_or_else(|| panic!("{id} acknowledged at {partition}/{offset} is gone"));
        assert_eq!(record.offset, *offset);
        assert_eq!(&suite::id_of(record), id);
    }
    let stats = log.stats("crash").await.expect("stats");
    let group = stats
        .groups
        .iter()
        .find(|g| g.group == "tail" && g.partition == 0)
        .expect("the group survived");
    assert!(group.next_offset >= committed, "{group:?} < {committed}");
    // And the log takes appends again.
    for key in ["a", "b", "c", "d"] {
        let at = log
            .publish("crash", Some(key), suite::event("after", json!(null)))
            .await
            .expect("publish after the crash");
        let read = log
            .read("crash", at.partition, at.offset, 1)
            .await
            .expect("read");
        assert_eq!(suite::id_of(&read[0]), "after");
    }
    eprintln!(
        "kill -9 after {} acknowledged records; recovery cut {cut} bytes",
        acked.len()
    );
}

/// The bytes of every segment of a topic.
fn log_bytes(topic: &Path) -> u64 {
    let mut total = 0;
    for partition in std::fs::read_dir(topic).expect("topic directory") {
        let partition = partition.expect("entry").path();
        if partition.is_dir() && !partition.ends_with("groups") {
            for segment in segment_files(&partition, "log") {
                total += std::fs::metadata(segment).expect("metadata").len();
            }
        }
    }
    total
}

/// A full disk: publishes fail with `Full`, what was acknowledged stays readable, nothing
/// half-written remains (a reopen finds exactly the acknowledged records), and appends work
/// again once there is room. Needs a small tmpfs, so it runs in a child in its own mount
/// namespace, and is skipped where that is not allowed.
#[test]
fn a_full_disk_refuses_publishes_and_leaves_the_log_consistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("the test binary");
    let script = r#"mount -t tmpfs -o size=600k flotilla-full "$1" || exit 97
exec "$0" child_process --exact --nocapture --test-threads=1"#;
    let output = Command::new("unshare")
        .args(["--mount", "sh", "-c", script])
        .arg(&exe)
        .arg(dir.path())
        .env(CHILD, format!("full:{}", dir.path().display()))
        .stderr(Stdio::inherit())
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) => {
            eprintln!("skipped: no unshare ({e})");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !stdout.contains("running 1 test") {
        eprintln!(
            "skipped: cannot mount a small tmpfs here ({})",
            output.status
        );
        return;
    }
    let Some(report) = stdout.lines().find(|line| line.starts_with("FULL-OK")) else {
        panic!("the child failed ({}):\n{stdout}", output.status);
    };
    eprintln!("{report}");
}

/// Not a test of its own: the body of the child processes above, selected by [`CHILD`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    // The harness has printed `test child_process ... ` without a newline: end that line, so
    // the parent gets ours whole.
    say("");
    let (mode, dir) = spec.split_once(':').expect("mode:dir");
    match mode {
        "crash" => crash_child(Path::new(dir)).await,
        "full" => full_child(Path::new(dir)).await,
        other => panic!("unknown child mode {other}"),
    }
}

fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    // The parent reading is the point: a line it cannot get is a line it never relies on.
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

async fn crash_child(dir: &Path) {
    let log = open(&dir.join("events"), small(64 << 10, 1024)).await;
    log.create_topic(&topic("crash", 4)).await.expect("create");
    let mut consumer = log
        .subscribe("crash", "tail", 0, 5)
        .await
        .expect("subscribe");
    tokio::spawn(async move {
        loop {
            let delivery = consumer.next().await.expect("next");
            consumer.ack().await.expect("ack");
            say(&format!("COMMIT {}", delivery.record.offset + 1));
        }
    });
    let mut tasks = Vec::new();
    for task in 0..8 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0u64.. {
                let id = format!("t{task}-{n}");
                let key = format!("k{}", n % 13);
                let body = suite::event(&id, json!({ "pad": "p".repeat((n % 50) as usize * 20) }));
                let at = log
                    .publish("crash", Some(&key), body)
                    .await
                    .expect("publish");
                say(&format!("ACK {} {} {id}", at.partition, at.offset));
            }
        }));
    }
    for task in tasks {
        task.await.expect("publisher");
    }
}

async fn full_child(mount: &Path) {
    let root = mount.join("events");
    let config = small(64 << 10, 1024);
    let log = open(&root, config.clone()).await;
    log.create_topic(&topic("full", 2)).await.expect("create");
    // Room to give back once the disk is full.
    let filler = mount.join("filler");
    std::fs::write(&filler, vec![1u8; 128 << 10]).expect("filler");

    let mut acked: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    let mut refused = 0;
    for n in 0..20_000 {
        let id = format!("f{n}");
        let body = suite::event(&id, json!({ "pad": "x".repeat(900) }));
        match log.publish("full", Some(&format!("k{n}")), body).await {
            Ok(at) => {
                assert_eq!(at.offset, acked[at.partition as usize].len() as u64);
                acked[at.partition as usize].push(id);
            }
            Err(BrokerError::Full(_)) => {
                refused += 1;
                if refused == 20 {
                    break;
                }
            }
            Err(other) => panic!("a full disk must say Full, not {other}"),
        }
    }
    assert_eq!(refused, 20, "the disk never filled");
    let check = |log: EventLog, acked: Vec<Vec<String>>| async move {
        for (partition, want) in acked.iter().enumerate() {
            let held = suite::read_all(&log, "full", partition as u32).await;
            assert_eq!(&ids(&held), want, "partition {partition}");
        }
        log
    };
    let log = check(log, acked.clone()).await;
    drop(log);
    let log = check(open(&root, config).await, acked.clone()).await;

    std::fs::remove_file(&filler).expect("free room");
    for n in 0..10 {
        let at = log
            .publish(
                "full",
                Some(&format!("after{n}")),
                suite::event("after", json!(null)),
            )
            .await
            .expect("publish once there is room");
        assert_eq!(at.offset, acked[at.partition as usize].len() as u64);
        acked[at.partition as usize].push("after".to_owned());
    }
    check(log, acked.clone()).await;
    say(&format!(
        "FULL-OK {} records acknowledged before the disk filled",
        acked.iter().map(Vec::len).sum::<usize>() - 10
    ));
}
