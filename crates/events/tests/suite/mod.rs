//! The contract every [`Broker`] backend keeps, as tests any backend's test crate runs with
//! `mod suite;`: either [`run_all`] or the properties one by one.
//!
//! Nothing here assumes offsets are contiguous or start anywhere in particular (JetStream's are
//! stream sequences with gaps): only that they increase strictly within a partition, and that
//! what `publish` returned is where the record is. Every topic name starts with the caller's
//! `prefix`, so runs against a shared server do not meet; a prefix must be unique per run, as
//! topics are never deleted here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flotilla_events::{
    Broker, BrokerError, Consumer, Delivery, Published, Record, TopicConfig, partition_for,
};
use serde_json::{Value, json};

/// How long a delivery that must come may take.
const DUE: Duration = Duration::from_secs(10);
/// How long to watch for a delivery that must not come.
const QUIET: Duration = Duration::from_millis(300);

/// Every property, one after the other.
pub async fn run_all(broker: Arc<dyn Broker>, prefix: &str) {
    round_trip(broker.clone(), prefix).await;
    keys_keep_partition_and_order(broker.clone(), prefix).await;
    every_group_gets_every_record(broker.clone(), prefix).await;
    a_group_gets_each_record_once(broker.clone(), prefix).await;
    nack_redelivers_the_same_record_first(broker.clone(), prefix).await;
    a_new_consumer_resumes_after_the_last_ack(broker.clone(), prefix).await;
    seek_replays(broker.clone(), prefix).await;
    offset_at_finds_records_by_time(broker.clone(), prefix).await;
    stats_show_offsets_and_lag(broker.clone(), prefix).await;
    unknown_topics_and_partitions_are_errors(broker.clone(), prefix).await;
    create_topic_is_idempotent(broker.clone(), prefix).await;
    concurrent_publishes_are_all_stored(broker, prefix).await;
}

pub fn topic(prefix: &str, name: &str, partitions: u32) -> TopicConfig {
    TopicConfig {
        name: format!("{prefix}-{name}"),
        partitions,
        retention: None,
        max_bytes: None,
    }
}

/// A structured-mode CloudEvent with `id` and some data.
pub fn event(id: &str, data: Value) -> Bytes {
    let event = json!({
        "specversion": "1.0",
        "id": id,
        "source": "/suite",
        "type": "suite.tested",
        "datacontenttype": "application/json",
        "data": data,
    });
    Bytes::from(serde_json::to_vec(&event).expect("serialisable"))
}

pub fn id_of(record: &Record) -> String {
    let value: Value = serde_json::from_slice(&record.event).expect("stored events are JSON");
    value["id"].as_str().expect("events have ids").to_owned()
}

async fn publish(broker: &dyn Broker, topic: &str, key: Option<&str>, id: &str) -> Published {
    broker
        .publish(topic, key, event(id, json!({ "key": key })))
        .await
        .unwrap_or_else(|e| panic!("publishing {id} to {topic}: {e}"))
}

async fn subscribe(
    broker: &dyn Broker,
    topic: &str,
    group: &str,
    partition: u32,
) -> Box<dyn Consumer> {
    match broker.subscribe(topic, group, partition, 5).await {
        Ok(consumer) => consumer,
        Err(e) => panic!("subscribing {group} to {topic}/{partition}: {e}"),
    }
}

/// The next delivery, which must come.
pub async fn next(consumer: &mut dyn Consumer) -> Delivery {
    match tokio::time::timeout(DUE, consumer.next()).await {
        Ok(Ok(delivery)) => delivery,
        Ok(Err(e)) => panic!("next delivery failed: {e}"),
        Err(_) => panic!("no delivery within {DUE:?}"),
    }
}

/// Asserts nothing is delivered for a while.
pub async fn nothing_more(consumer: &mut dyn Consumer) {
    if let Ok(delivered) = tokio::time::timeout(QUIET, consumer.next()).await {
        match delivered {
            Ok(delivery) => panic!(
                "nothing more was due, got offset {} (attempt {})",
                delivery.record.offset, delivery.attempt
            ),
            Err(e) => panic!("waiting for nothing failed: {e}"),
        }
    }
}

async fn ack(consumer: &mut dyn Consumer) {
    consumer.ack().await.expect("ack");
}

/// Every record of a partition, oldest first, read in pages.
pub async fn read_all(broker: &dyn Broker, topic: &str, partition: u32) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    let mut from = 0;
    loop {
        let page = broker
            .read(topic, partition, from, 100)
            .await
            .unwrap_or_else(|e| panic!("reading {topic}/{partition} from {from}: {e}"));
        let Some(last) = page.last() else { break };
        from = last.offset + 1;
        out.extend(page);
    }
    assert_strictly_increasing(&out);
    out
}

fn assert_strictly_increasing(records: &[Record]) {
    for pair in records.windows(2) {
        assert!(
            pair[0].offset < pair[1].offset,
            "offsets must increase strictly: {} then {}",
            pair[0].offset,
            pair[1].offset
        );
    }
}

/// Published records come back byte for byte, at the offsets publish returned, in order.
pub async fn round_trip(broker: Arc<dyn Broker>, prefix: &str) {
    let config = topic(prefix, "round-trip", 1);
    broker.create_topic(&config).await.expect("create");
    let before = SystemTime::now();
    let bodies = vec![
        event("small", json!(1)),
        event(
            "unicode",
            json!({ "text": "grüße, 世界, 🚢", "escaped": "\"\\\n\t" }),
        ),
        event("empty-data", json!({})),
        event("large", json!({ "blob": "x".repeat(100_000) })),
        // Not a CloudEvent at all: the broker stores bytes, it does not parse them.
        Bytes::from_static(b"{\"id\":\"raw\",\"odd\":[1,2,3]}"),
    ];
    let mut published = Vec::new();
    for body in &bodies {
        let at = broker
            .publish(&config.name, None, body.clone())
            .await
            .expect("publish");
        assert_eq!(at.partition, 0);
        published.push(at);
    }
    for pair in published.windows(2) {
        assert!(pair[0].offset < pair[1].offset, "{published:?}");
    }

    let records = broker
        .read(&config.name, 0, published[0].offset, 100)
        .await
        .expect("read");
    assert_eq!(records.len(), bodies.len());
    for ((record, body), at) in records.iter().zip(&bodies).zip(&published) {
        assert_eq!(
            &record.event, body,
            "the stored bytes are the published bytes"
        );
        assert_eq!(record.offset, at.offset);
        assert_eq!(record.partition, 0);
        let skew = Duration::from_secs(3600);
        assert!(record.time + skew >= before && record.time <= SystemTime::now() + skew);
    }

    // From the middle, a page at a time, and past the end.
    let middle = broker
        .read(&config.name, 0, published[2].offset, 2)
        .await
        .expect("read");
    let offsets: Vec<u64> = middle.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![published[2].offset, published[3].offset]);
    let past = published[4].offset + 1;
    assert!(
        broker
            .read(&config.name, 0, past, 10)
            .await
            .expect("read")
            .is_empty()
    );
    assert!(
        broker
            .read(&config.name, 0, published[0].offset, 0)
            .await
            .expect("read")
            .is_empty()
    );
    // From before the first: from the oldest held.
    let all = read_all(&*broker, &config.name, 0).await;
    assert_eq!(all, records);
}

/// A key always lands on `partition_for(key)`, and its records keep their publish order.
pub async fn keys_keep_partition_and_order(broker: Arc<dyn Broker>, prefix: &str) {
    let config = topic(prefix, "orders.placed", 4);
    broker.create_topic(&config).await.expect("create");
    let keys: Vec<String> = (0..8).map(|k| format!("order-{k}")).collect();
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for n in 0..25 {
        for key in &keys {
            let id = format!("{key}/{n}");
            let at = publish(&*broker, &config.name, Some(key), &id).await;
            assert_eq!(
                at.partition,
                partition_for(key, 4),
                "{key} left its partition"
            );
            sent.entry(key.clone()).or_default().push(id);
        }
    }
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for partition in 0..4 {
        for record in read_all(&*broker, &config.name, partition).await {
            assert_eq!(record.partition, partition);
            let id = id_of(&record);
            let key = id.split('/').next().expect("key/n").to_owned();
            assert_eq!(partition_for(&key, 4), partition);
            seen.entry(key).or_default().push(id);
        }
    }
    assert_eq!(
        seen, sent,
        "each key's records, all of them, in publish order"
    );
}

/// Drains `count` deliveries from a consumer, acknowledging each.
async fn drain(consumer: &mut dyn Consumer, count: usize) -> Vec<Record> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let delivery = next(consumer).await;
        assert_eq!(delivery.attempt, 1);
        out.push(delivery.record);
        ack(consumer).await;
    }
    assert_strictly_increasing(&out);
    out
}

fn per_partition(published: &[(Published, String)]) -> BTreeMap<u32, Vec<(u64, String)>> {
    let mut out: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
    for (at, id) in published {
        out.entry(at.partition)
            .or_default()
            .push((at.offset, id.clone()));
    }
    out
}

async fn publish_keyed(
    broker: &dyn Broker,
    topic: &str,
    count: usize,
    label: &str,
) -> Vec<(Published, String)> {
    let mut out = Vec::with_capacity(count);
    for n in 0..count {
        let id = format!("{label}-{n}");
        let key = format!("key-{}", n % 7);
        out.push((publish(broker, topic, Some(&key), &id).await, id));
    }
    out
}

/// Two groups are independent: each gets every record.
pub async fn every_group_gets_every_record(broker: Arc<dyn Broker>, prefix: &str) {
    let config = topic(prefix, "two-groups", 2);
    broker.create_topic(&config).await.expect("create");
    let published = publish_keyed(&*broker, &config.name, 20, "e").await;
    let expected = per_partition(&published);
    for group in ["billing", "shipping"] {
        for (&partition, records) in &expected {
            let mut consumer = subscribe(&*broker, &config.name, group, partition).await;
            let got = drain(&mut *consumer, records.len()).await;
            let got: Vec<(u64, String)> = got.iter().map(|r| (r.offset, id_of(r))).collect();
            assert_eq!(&got, records, "{group} in partition {partition}");
            nothing_more(&mut *consumer).await;
        }
    }
}

/// Within a group, each partition's consumer gets each of its records once, in order, when
/// every one is acknowledged.
pub async fn a_group_gets_each_record_once(broker: Arc<dyn Broker>, prefix: &str) {
    let config = topic(prefix, "once", 3);
    broker.create_topic(&config).await.expect("create");
    let mut consumers = Vec::new();
    for partition in 0..3 {
        consumers.push(subscribe(&*broker, &config.name, "worker", partition).await);
    }
    // Published after subscribing: consumers waiting at the end are woken.
    let published = publish_keyed(&*broker, &config.name, 30, "o").await;
    let expected = per_partition(&published);
    let mut delivered = BTreeSet::new();
    for (partition, consumer) in consumers.iter_mut().enumerate() {
        let partition = partition as u32;
        let want = expected.get(&partition).cloned().unwrap_or_default();
        let got = drain(&mut **consumer, want.len()).await;
        for record in &got {
            assert_eq!(record.partition, partition);
            assert!(
                delivered.insert((partition, record.offset)),
                "offset {} delivered twice",
                record.offset
            );
        }
        let got: Vec<(u64, String)> = got.iter().map(|r| (r.offset, id_of(r))).collect();
        assert_eq!(got, want);
        nothing_more(&mut **consumer).await;
    }
    assert_eq!(delivered.len(), 30);
}

/// After a nack the same record comes again, attempt + 1, not before the delay, and nothing
/// after it comes in between.
pub async fn nack_redelivers_the_same_record_first(broker: Arc<dyn Broker>, prefix: &str) {
    let config = topic(prefix, "nack", 1);
    broker.create_topic(&config).await.expect("create");
    let first = publish(&*broker, &config.name, Some("k"), "first").await;
    let second = publish(&*broker, &config.name, Some("k"), "second").await;
    let mut consumer = subscribe(&*broker, &config.name, "retrier", 0).await;

    let delivery = next(&mut *consumer).await;
    assert_eq!(
        (delivery.record.offset, delivery.attempt),
        (first.offset, 1)
    );
    let delay = Duration::from_millis(300);
    let nacked = Instant::now();
    consumer.nack(delay).await.expect("nack");
    let again = next(&mut *consumer).await;
    assert!(
        nacked.elapsed() >= delay - Duration::from_millis(20),
        "redelivered after {:?}, before the {delay:?} delay",
        nacked.elapsed()
    );
    assert_eq!((again.record.offset, again.attempt), (first.offset, 2));
    assert_eq!(again.record.event, delivery.record.event);

    consumer.nack(Duration::ZERO).await.expect("nack");
    let third = next(&mut *consumer).await;
    assert_eq!((third.record.offset, third.attempt), (first.offset, 3));
    ack(&mut *consumer).await;

    let after = next(&mut *consumer).await;
    assert_eq!((after.record.offset, after.attempt), (second.offset, 1));
    ack(&mut *consumer).await;
    nothing_more(&mut *consumer).await;
}

/// A new consumer of a group (a restart) starts right after the last acknowledged record: the
/// delivered but unacknowledged one comes again, acknowledged ones do not.
pub async fn a_new_consumer_resumes_after_the_last_ack(broker: Arc<dyn Broker>, prefix: &str) {
    let config = topic(prefix, "resume", 1);
    broker.create_topic(&config).await.expect("create");
    let mut offsets = Vec::new();
    for n in 0..5 {
        offsets.push(
            publish(&*broker, &config.name, None, &format!("r{n}"))
                .await
                .offset,
        );
    }
    {
        let mut consumer = subscribe(&*broker, &config.name, "restarting", 0).await;
        drain(&mut *consumer, 2).await;
        let unacked = next(&mut *consumer).await;
        assert_eq!(unacked.record.offset, offsets[2]);
    }
    {
        let mut consumer = subscribe(&*broker, &config.name, "restarting", 0).await;
        let again = next(&mut *consumer).await;
        assert_eq!(
            again.record.offset, offsets[2],
            "the unacknowledged record first"
        );
        ack(&mut *consumer).await;
        let rest = drain(&mut *consumer, 2).await;
        assert_eq!(
            rest.iter().map(|r| r.offset).collect::<Vec<_>>(),
            offsets[3..]
        );
    }
    let mut consumer = subscribe(&*broker, &config.name, "restarting", 0).await;
    nothing_more(&mut *consumer).await;
    let later = publish(&*broker, &config.name, None, "later").await;
    let delivery = next(&mut *consumer).await;
    assert_eq!(
        (delivery.record.offset, delivery.attempt),
        (later.offset, 1)
    );
    ack(&mut *consumer).await;
}

/// `seek` moves a group back (or forward) for consumers subscribed afterwards.
pub async fn seek_replays(broker: Arc<dyn Broker>, prefix: &str) {
    let config = topic(prefix, "seek", 1);
    broker.create_topic(&config).await.expect("create");
    let published = publish_keyed(&*broker, &config.name, 5, "s").await;
    let offsets: Vec<u64> = published.iter().map(|(at, _)| at.offset).collect();
    {
        let mut consumer = subscribe(&*broker, &config.name, "replayer", 0).await;
        drain(&mut *consumer, 5).await;
    }
    broker
        .seek(&config.name, "replayer", 0, offsets[0])
        .await
        .expect("seek");
    {
        let mut consumer = subscribe(&*broker, &config.name, "replayer", 0).await;
        let replayed = drain(&mut *consumer, 5).await;
        assert_eq!(
            replayed.iter().map(|r| r.offset).collect::<Vec<_>>(),
            offsets
        );
        nothing_more(&mut *consumer).await;
    }
    broker
        .seek(&config.name, "replayer", 0, offsets[3])
        .await
        .expect("seek");
    let mut consumer = subscribe(&*broker, &config.name, "replayer", 0).await;
    let replayed = drain(&mut *consumer, 2).await;
    assert_eq!(
        replayed.iter().map(|r| r.offset).collect::<Vec<_>>(),
        offsets[3..]
    );
    nothing_more(&mut *consumer).await;
}

/// `offset_at` gives the first record at or after a time, the end when there is none.
pub async fn offset_at_finds_records_by_time(broker: Arc<dyn Broker>, prefix: &str) {
    let config = topic(prefix, "by-time", 1);
    broker.create_topic(&config).await.expect("create");
    let early = publish(&*broker, &config.name, None, "early").await;
    // Margins either side of the cut, for clock granularity (and a server's clock).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cut = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = publish(&*broker, &config.name, None, "late").await;
    publish(&*broker, &config.name, None, "later").await;

    let at = |time| {
        let broker = broker.clone();
        let name = config.name.clone();
        async move { broker.offset_at(&name, 0, time).await.expect("offset_at") }
    };
    assert_eq!(at(UNIX_EPOCH).await, early.offset);
    assert_eq!(at(cut).await, late.offset);
    let end = broker.stats(&config.name).await.expect("stats").partitions[0].end_offset;
    assert!(end > late.offset);
    assert_eq!(at(SystemTime::now() + Duration::from_secs(3600)).await, end);
}

/// Stats show where each partition ends and how far behind each group is, down to 0.
pub async fn stats_show_offsets_and_lag(broker: Arc<dyn Broker>, prefix: &str) {
    let config = topic(prefix, "stats", 2);
    broker.create_topic(&config).await.expect("create");
    let mut consumers = Vec::new();
    for partition in 0..2 {
        consumers.push(subscribe(&*broker, &config.name, "laggard", partition).await);
    }
    let published = publish_keyed(&*broker, &config.name, 10, "l").await;
    let expected = per_partition(&published);

    let stats = broker.stats(&config.name).await.expect("stats");
    assert_eq!(stats.topic, config.name);
    assert_eq!(stats.partitions.len(), 2);
    for partition in &stats.partitions {
        let held = expected
            .get(&partition.partition)
            .cloned()
            .unwrap_or_default();
        if let Some(&(last, _)) = held.last() {
            assert!(partition.end_offset > last, "{partition:?}");
            assert!(partition.start_offset <= held[0].0, "{partition:?}");
        }
        assert_eq!(partition.records, held.len() as u64, "{partition:?}");
        let group = stats
            .groups
            .iter()
            .find(|g| g.group == "laggard" && g.partition == partition.partition)
            .unwrap_or_else(|| panic!("no lag for partition {}", partition.partition));
        assert_eq!(group.lag, held.len() as u64, "{group:?}");
    }

    for (partition, consumer) in consumers.iter_mut().enumerate() {
        let count = expected
            .get(&(partition as u32))
            .map_or(0, |records| records.len());
        drain(&mut **consumer, count).await;
    }
    let stats = broker.stats(&config.name).await.expect("stats");
    for partition in &stats.partitions {
        let group = stats
            .groups
            .iter()
            .find(|g| g.group == "laggard" && g.partition == partition.partition)
            .unwrap_or_else(|| panic!("no lag for partition {}", partition.partition));
        assert_eq!(group.lag, 0, "{group:?}");
        assert_eq!(group.next_offset, partition.end_offset, "{group:?}");
    }
}

/// Naming a topic that does not exist, or a partition it does not have, is an error saying so.
pub async fn unknown_topics_and_partitions_are_errors(broker: Arc<dyn Broker>, prefix: &str) {
    let missing = format!("{prefix}-missing");
    let unknown_topic = |result: Result<(), BrokerError>, what: &str| match result {
        Err(BrokerError::UnknownTopic(name)) => assert_eq!(name, missing, "{what}"),
        other => panic!("{what}: {other:?}"),
    };
    unknown_topic(
        broker
            .publish(&missing, None, event("x", json!(null)))
            .await
            .map(drop),
        "publish",
    );
    unknown_topic(broker.read(&missing, 0, 0, 10).await.map(drop), "read");
    unknown_topic(
        broker.subscribe(&missing, "g", 0, 5).await.map(drop),
        "subscribe",
    );
    unknown_topic(broker.seek(&missing, "g", 0, 0).await, "seek");
    unknown_topic(
        broker.offset_at(&missing, 0, UNIX_EPOCH).await.map(drop),
        "offset_at",
    );
    unknown_topic(broker.stats(&missing).await.map(drop), "stats");

    let config = topic(prefix, "two-partitions", 2);
    broker.create_topic(&config).await.expect("create");
    let unknown_partition = |result: Result<(), BrokerError>, what: &str| match result {
        Err(BrokerError::UnknownPartition { topic, partition }) => {
            assert_eq!(
                (topic.as_str(), partition),
                (config.name.as_str(), 2),
                "{what}"
            );
        }
        other => panic!("{what}: {other:?}"),
    };
    unknown_partition(broker.read(&config.name, 2, 0, 10).await.map(drop), "read");
    unknown_partition(
        broker.subscribe(&config.name, "g", 2, 5).await.map(drop),
        "subscribe",
    );
    unknown_partition(broker.seek(&config.name, "g", 2, 0).await, "seek");
    unknown_partition(
        broker
            .offset_at(&config.name, 2, UNIX_EPOCH)
            .await
            .map(drop),
        "offset_at",
    );
}

/// Creating a topic again is fine (a changed retention is taken); changing its partition
/// count is refused, and the topic stays as it was.
pub async fn create_topic_is_idempotent(broker: Arc<dyn Broker>, prefix: &str) {
    let mut config = topic(prefix, "idempotent", 2);
    broker.create_topic(&config).await.expect("create");
    let at = publish(&*broker, &config.name, Some("k"), "kept").await;
    broker.create_topic(&config).await.expect("create again");
    config.retention = Some(Duration::from_secs(7 * 24 * 3600));
    config.max_bytes = Some(1 << 30);
    broker
        .create_topic(&config)
        .await
        .expect("a changed retention is applied");

    let changed = TopicConfig {
        partitions: 3,
        ..config.clone()
    };
    match broker.create_topic(&changed).await {
        Err(BrokerError::PartitionsChanged {
            topic,
            existing,
            wanted,
        }) => assert_eq!((topic, existing, wanted), (config.name.clone(), 2, 3)),
        other => panic!("a changed partition count must be refused: {other:?}"),
    }
    let stats = broker.stats(&config.name).await.expect("stats");
    assert_eq!(stats.partitions.len(), 2);
    let held = read_all(&*broker, &config.name, at.partition).await;
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].offset, at.offset);
}

/// 1,000 publishes from 16 tasks at once: every one acknowledged, each at its own place, all
/// readable there.
pub async fn concurrent_publishes_are_all_stored(broker: Arc<dyn Broker>, prefix: &str) {
    let config = topic(prefix, "concurrent", 4);
    broker.create_topic(&config).await.expect("create");
    let total = 1000;
    let tasks = 16;
    let mut handles = Vec::new();
    for task in 0..tasks {
        let broker = broker.clone();
        let name = config.name.clone();
        handles.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in (task..total).step_by(tasks) {
                let id = format!("c{n}");
                // Keyed and unkeyed both.
                let key = (n % 3 != 0).then(|| format!("key-{}", n % 40));
                let at = broker
                    .publish(&name, key.as_deref(), event(&id, json!({ "n": n })))
                    .await
                    .unwrap_or_else(|e| panic!("publishing {id}: {e}"));
                acked.push((at, id));
            }
            acked
        }));
    }
    let mut acked: HashMap<(u32, u64), String> = HashMap::new();
    for handle in handles {
        for (at, id) in handle.await.expect("publisher task") {
            let previous = acked.insert((at.partition, at.offset), id.clone());
            assert!(
                previous.is_none(),
                "{id} acknowledged at a taken place {at:?}"
            );
        }
    }
    assert_eq!(acked.len(), total);
    let mut stored = HashMap::new();
    for partition in 0..4 {
        for record in read_all(&*broker, &config.name, partition).await {
            stored.insert((partition, record.offset), id_of(&record));
        }
    }
    assert_eq!(stored, acked);
}
