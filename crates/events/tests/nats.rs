//! The JetStream backend against a real NATS server with JetStream enabled.
//!
//! Runs only when `FLOTILLA_TEST_NATS_URL` names the server (CI: `nats://127.0.0.1:4222`);
//! otherwise each test says it was skipped and passes. Every test works under its own random
//! stream prefix and deletes its streams at the end, since the server is shared.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use flotilla_events::nats::JetStream;
use flotilla_events::{Broker, BrokerError, Consumer, Delivery, TopicConfig, partition_for};
use futures_util::StreamExt;

/// A test that hangs is a failed test, not a stuck CI job.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Long enough for a delivery on a loaded machine, far shorter than the 60 s redelivery wait
/// that a lost delivery would cost.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

fn server_url() -> Option<String> {
    match std::env::var("FLOTILLA_TEST_NATS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("SKIPPED: FLOTILLA_TEST_NATS_URL is not set");
            None
        }
    }
}

/// Where a test's streams are, for tests that look behind the broker.
#[derive(Clone)]
struct Server {
    url: String,
    prefix: String,
}

impl Server {
    /// The configuration of the stream that holds `topic`, found by its recorded name.
    async fn stream_config(&self, topic: &str) -> async_nats::jetstream::stream::Config {
        let client = async_nats::connect(&self.url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let mut names = js.stream_names();
        while let Some(name) = names.next().await {
            let name = name.expect("list streams");
            if !name.starts_with(&format!("{}_", self.prefix)) {
                continue;
            }
            let config = js
                .get_stream(&name)
                .await
                .expect("stream info")
                .cached_info()
                .config
                .clone();
            let description: serde_json::Value =
                serde_json::from_str(config.description.as_deref().unwrap_or("null")).unwrap();
            if description["flotilla_topic"] == topic {
                return config;
            }
        }
        panic!("no stream holds topic {topic}");
    }
}

/// Runs `body` against a broker with a fresh stream prefix, then deletes every stream under that
/// prefix, whether `body` passed or panicked.
async fn with_broker<F, Fut>(body: F)
where
    F: FnOnce(Arc<JetStream>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    with_server(|broker, _| body(broker)).await;
}

async fn with_server<F, Fut>(body: F)
where
    F: FnOnce(Arc<JetStream>, Server) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(url) = server_url() else {
        return;
    };
    let prefix = format!("FLTEST{:08x}", fastrand::u32(..));
    let broker = Arc::new(
        JetStream::connect(&url, &prefix)
            .await
            .expect("connect to the test NATS server"),
    );
    let server = Server {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    let outcome = tokio::spawn(tokio::time::timeout(TEST_TIMEOUT, body(broker, server))).await;
    delete_streams(&url, &prefix).await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("the test did not finish within {TEST_TIMEOUT:?}"),
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}

async fn delete_streams(url: &str, prefix: &str) {
    let client = async_nats::connect(url).await.expect("connect for cleanup");
    let js = async_nats::jetstream::new(client);
    let mut names = js.stream_names();
    let mut ours = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.expect("list streams");
        if name.starts_with(&format!("{prefix}_")) {
            ours.push(name);
        }
    }
    for name in ours {
        js.delete_stream(&name).await.expect("delete a test stream");
    }
}

fn topic(name: &str, partitions: u32) -> TopicConfig {
    TopicConfig {
        name: name.to_owned(),
        partitions,
        retention: Some(Duration::from_secs(3600)),
        max_bytes: Some(64 * 1024 * 1024),
    }
}

fn event(key: &str, n: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "specversion": "1.0",
            "id": format!("{key}-{n}"),
            "source": "/services/test",
            "type": "test.event",
            "data": {"key": key, "n": n},
        })
        .to_string(),
    )
}

fn event_id(event: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(event).expect("stored events are JSON");
    value["id"].as_str().expect("events have ids").to_owned()
}

async fn next(consumer: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(DELIVERY_TIMEOUT, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("a delivery")
}

#[tokio::test(flavor = "multi_thread")]
async fn no_server_is_unavailable() {
    // Needs no server: nothing listens on port 1.
    let started = Instant::now();
    match JetStream::connect("nats://127.0.0.1:1", "FLOTILLA").await {
        Err(BrokerError::Unavailable(message)) => assert!(message.contains("127.0.0.1:1")),
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("connected to nothing"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_then_read_round_trip() {
    with_broker(|broker| async move {
        broker
            .create_topic(&topic("orders.placed", 1))
            .await
            .unwrap();
        let before = SystemTime::now() - Duration::from_secs(5);
        let mut published = Vec::new();
        for n in 0..3 {
            let at = broker
                .publish("orders.placed", Some("order-1"), event("order-1", n))
                .await
                .unwrap();
            assert_eq!(at.partition, 0);
            published.push(at.offset);
        }
        assert!(published.windows(2).all(|pair| pair[0] < pair[1]));

        let records = broker.read("orders.placed", 0, 0, 10).await.unwrap();
        assert_eq!(records.len(), 3);
        for (n, record) in records.iter().enumerate() {
            assert_eq!(record.partition, 0);
            assert_eq!(record.offset, published[n]);
            assert_eq!(record.event, event("order-1", n));
            assert!(
                record.time >= before && record.time <= SystemTime::now() + Duration::from_secs(5)
            );
        }

        let from_second = broker
            .read("orders.placed", 0, published[1], 10)
            .await
            .unwrap();
        assert_eq!(from_second.len(), 2);
        assert_eq!(from_second[0].offset, published[1]);
        let one = broker.read("orders.placed", 0, 0, 1).await.unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].offset, published[0]);
        let past_end = broker
            .read("orders.placed", 0, published[2] + 1, 10)
            .await
            .unwrap();
        assert!(past_end.is_empty());
        assert!(
            broker
                .read("orders.placed", 0, 0, 0)
                .await
                .unwrap()
                .is_empty()
        );

        match broker.read("orders.placed", 1, 0, 10).await {
            Err(BrokerError::UnknownPartition { partition: 1, .. }) => {}
            other => panic!("expected UnknownPartition, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn records_keep_their_order_per_key() {
    with_broker(|broker| async move {
        broker.create_topic(&topic("payments", 4)).await.unwrap();
        let keys: Vec<String> = (0..6).map(|k| format!("account-{k}")).collect();
        for n in 0..10 {
            for key in &keys {
                let at = broker
                    .publish("payments", Some(key), event(key, n))
                    .await
                    .unwrap();
                assert_eq!(at.partition, partition_for(key, 4));
            }
        }
        let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
        for partition in 0..4 {
            let records = broker.read("payments", partition, 0, 1000).await.unwrap();
            assert!(
                records
                    .windows(2)
                    .all(|pair| pair[0].offset < pair[1].offset)
            );
            for record in records {
                let value: serde_json::Value = serde_json::from_slice(&record.event).unwrap();
                let key = value["data"]["key"].as_str().unwrap().to_owned();
                assert_eq!(partition_for(&key, 4), partition);
                let n = value["data"]["n"].as_u64().unwrap() as usize;
                seen.entry(key).or_default().push(n);
            }
        }
        assert_eq!(seen.len(), keys.len());
        for (key, ns) in seen {
            assert_eq!(ns, (0..10).collect::<Vec<_>>(), "order of {key}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_group_gets_every_record() {
    with_broker(|broker| async move {
        broker.create_topic(&topic("signups", 1)).await.unwrap();
        let mut offsets = Vec::new();
        for n in 0..5 {
            offsets.push(
                broker
                    .publish("signups", None, event("u", n))
                    .await
                    .unwrap()
                    .offset,
            );
        }
        for group in ["mailer", "billing"] {
            let mut consumer = broker.subscribe("signups", group, 0, 5).await.unwrap();
            for (n, offset) in offsets.iter().enumerate() {
                let delivery = next(&mut consumer).await;
                assert_eq!(delivery.attempt, 1, "{group}");
                assert_eq!(delivery.record.offset, *offset, "{group}");
                assert_eq!(delivery.record.event, event("u", n), "{group}");
                consumer.ack().await.unwrap();
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_waits_for_the_next_record() {
    with_broker(|broker| async move {
        broker.create_topic(&topic("late", 1)).await.unwrap();
        let mut consumer = broker.subscribe("late", "waiter", 0, 5).await.unwrap();
        let publisher = broker.clone();
        let publish = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            publisher
                .publish("late", None, event("late", 0))
                .await
                .unwrap()
        });
        let delivery = next(&mut consumer).await;
        let published = publish.await.unwrap();
        assert_eq!(delivery.record.offset, published.offset);
        consumer.ack().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_keeps_waiting_past_a_pull_expiry() {
    with_broker(|broker| async move {
        broker.create_topic(&topic("rare", 1)).await.unwrap();
        let mut consumer = broker.subscribe("rare", "patient", 0, 5).await.unwrap();
        let publisher = broker.clone();
        // Longer than one pull request lives on the server (10 s).
        let publish = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(12)).await;
            publisher
                .publish("rare", None, event("rare", 0))
                .await
                .unwrap()
        });
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a delivery in time")
            .unwrap();
        assert_eq!(delivery.record.offset, publish.await.unwrap().offset);
        assert_eq!(delivery.attempt, 1);
        consumer.ack().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nack_redelivers_after_the_delay_and_holds_back_the_rest() {
    with_broker(|broker| async move {
        broker.create_topic(&topic("invoices", 1)).await.unwrap();
        let first = broker
            .publish("invoices", None, event("i", 0))
            .await
            .unwrap();
        let second = broker
            .publish("invoices", None, event("i", 1))
            .await
            .unwrap();
        let mut consumer = broker.subscribe("invoices", "printer", 0, 5).await.unwrap();

        let delivery = next(&mut consumer).await;
        assert_eq!(
            (delivery.record.offset, delivery.attempt),
            (first.offset, 1)
        );
        let delay = Duration::from_millis(1500);
        let refused = Instant::now();
        consumer.nack(delay).await.unwrap();

        // Nothing, not even the next record, while the refused one waits.
        let early = tokio::time::timeout(Duration::from_millis(800), consumer.next()).await;
        assert!(early.is_err(), "delivered during the delay: {early:?}");

        let again = next(&mut consumer).await;
        assert!(refused.elapsed() >= delay - Duration::from_millis(100));
        assert_eq!((again.record.offset, again.attempt), (first.offset, 2));
        assert_eq!(again.record.event, event("i", 0));
        consumer.ack().await.unwrap();

        let after = next(&mut consumer).await;
        assert_eq!((after.record.offset, after.attempt), (second.offset, 1));
        consumer.ack().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn next_without_settling_hands_the_record_out_again() {
    with_broker(|broker| async move {
        broker.create_topic(&topic("unsettled", 1)).await.unwrap();
        let first = broker
            .publish("unsettled", None, event("u", 0))
            .await
            .unwrap();
        broker
            .publish("unsettled", None, event("u", 1))
            .await
            .unwrap();
        let mut consumer = broker
            .subscribe("unsettled", "forgetful", 0, 5)
            .await
            .unwrap();
        let delivery = next(&mut consumer).await;
        assert_eq!(
            (delivery.record.offset, delivery.attempt),
            (first.offset, 1)
        );
        let again = next(&mut consumer).await;
        assert_eq!((again.record.offset, again.attempt), (first.offset, 2));
        consumer.ack().await.unwrap();
        // A second ack of the same delivery is a no-op.
        consumer.ack().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_consumer_resumes_after_the_last_ack() {
    with_broker(|broker| async move {
        broker.create_topic(&topic("shipments", 1)).await.unwrap();
        let mut offsets = Vec::new();
        for n in 0..4 {
            offsets.push(
                broker
                    .publish("shipments", None, event("s", n))
                    .await
                    .unwrap()
                    .offset,
            );
        }
        {
            let mut consumer = broker
                .subscribe("shipments", "tracker", 0, 5)
                .await
                .unwrap();
            for offset in &offsets[..2] {
                assert_eq!(next(&mut consumer).await.record.offset, *offset);
                consumer.ack().await.unwrap();
            }
        }
        let mut resumed = broker
            .subscribe("shipments", "tracker", 0, 5)
            .await
            .unwrap();
        let delivery = next(&mut resumed).await;
        assert_eq!((delivery.record.offset, delivery.attempt), (offsets[2], 1));
        resumed.ack().await.unwrap();
        assert_eq!(next(&mut resumed).await.record.offset, offsets[3]);
        resumed.ack().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_dropped_while_waiting_loses_nothing() {
    with_broker(|broker| async move {
        broker.create_topic(&topic("quiet", 1)).await.unwrap();
        {
            let mut waiting = broker.subscribe("quiet", "reader", 0, 5).await.unwrap();
            let nothing = tokio::time::timeout(Duration::from_millis(300), waiting.next()).await;
            assert!(nothing.is_err());
        }
        let published = broker.publish("quiet", None, event("q", 0)).await.unwrap();
        let mut consumer = broker.subscribe("quiet", "reader", 0, 5).await.unwrap();
        // A pull request the dropped consumer left on the server may have taken the record; it
        // comes back within the pull expiry, not the 60 s acknowledgement wait.
        let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("the record, without waiting out the acknowledgement wait")
            .unwrap();
        assert_eq!(delivery.record.offset, published.offset);
        consumer.ack().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn seek_replays_from_an_offset() {
    with_broker(|broker| async move {
        broker.create_topic(&topic("audit", 1)).await.unwrap();
        let mut offsets = Vec::new();
        for n in 0..5 {
            offsets.push(
                broker
                    .publish("audit", None, event("a", n))
                    .await
                    .unwrap()
                    .offset,
            );
        }
        {
            let mut consumer = broker.subscribe("audit", "archive", 0, 5).await.unwrap();
            for offset in &offsets {
                assert_eq!(next(&mut consumer).await.record.offset, *offset);
                consumer.ack().await.unwrap();
            }
        }
        broker
            .seek("audit", "archive", 0, offsets[1])
            .await
            .unwrap();
        let mut replay = broker.subscribe("audit", "archive", 0, 5).await.unwrap();
        for (n, offset) in offsets.iter().enumerate().skip(1) {
            let delivery = next(&mut replay).await;
            assert_eq!((delivery.record.offset, delivery.attempt), (*offset, 1));
            assert_eq!(delivery.record.event, event("a", n));
            replay.ack().await.unwrap();
        }
        drop(replay);

        // From before the oldest record: everything again.
        broker.seek("audit", "archive", 0, 0).await.unwrap();
        let mut again = broker.subscribe("audit", "archive", 0, 5).await.unwrap();
        assert_eq!(next(&mut again).await.record.offset, offsets[0]);

        // Another group is not moved.
        let mut other = broker.subscribe("audit", "other", 0, 5).await.unwrap();
        assert_eq!(next(&mut other).await.record.offset, offsets[0]);

        match broker.seek("audit", "archive", 3, 0).await {
            Err(BrokerError::UnknownPartition { partition: 3, .. }) => {}
            other => panic!("expected UnknownPartition, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn offset_at_finds_the_first_record_at_or_after_a_time() {
    with_broker(|broker| async move {
        broker.create_topic(&topic("clicks", 2)).await.unwrap();
        let start = SystemTime::now() - Duration::from_secs(1);
        let first = broker
            .publish("clicks", Some("k"), event("k", 0))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let middle = SystemTime::now();
        let second = broker
            .publish("clicks", Some("k"), event("k", 1))
            .await
            .unwrap();
        let partition = first.partition;

        assert_eq!(
            broker.offset_at("clicks", partition, start).await.unwrap(),
            first.offset
        );
        assert_eq!(
            broker.offset_at("clicks", partition, middle).await.unwrap(),
            second.offset
        );
        let end = broker.stats("clicks").await.unwrap().partitions[partition as usize].end_offset;
        let later = SystemTime::now() + Duration::from_secs(60);
        assert_eq!(
            broker.offset_at("clicks", partition, later).await.unwrap(),
            end
        );
        // The other partition holds nothing at all.
        let empty = 1 - partition;
        assert_eq!(broker.offset_at("clicks", empty, start).await.unwrap(), end);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_show_offsets_and_lag_falls_to_zero_after_acks() {
    with_broker(|broker| async move {
        broker.create_topic(&topic("metrics", 2)).await.unwrap();
        let key = "host-1";
        let partition = partition_for(key, 2);
        let mut offsets = Vec::new();
        for n in 0..3 {
            offsets.push(
                broker
                    .publish("metrics", Some(key), event(key, n))
                    .await
                    .unwrap()
                    .offset,
            );
        }
        let mut consumer = broker
            .subscribe("metrics", "dashboard", partition, 5)
            .await
            .unwrap();

        let stats = broker.stats("metrics").await.unwrap();
        assert_eq!(stats.topic, "metrics");
        assert_eq!(stats.partitions.len(), 2);
        let held = &stats.partitions[partition as usize];
        assert_eq!(held.partition, partition);
        assert_eq!(held.records, 3);
        assert_eq!(held.start_offset, offsets[0]);
        assert_eq!(held.end_offset, offsets[2] + 1);
        assert!(held.bytes > 0);
        let empty = &stats.partitions[1 - partition as usize];
        assert_eq!(empty.records, 0);
        assert_eq!(empty.start_offset, empty.end_offset);
        assert_eq!(stats.groups.len(), 1);
        let group = &stats.groups[0];
        assert_eq!(
            (group.group.as_str(), group.partition),
            ("dashboard", partition)
        );
        assert_eq!((group.next_offset, group.lag), (offsets[0], 3));

        assert_eq!(next(&mut consumer).await.record.offset, offsets[0]);
        let in_flight = broker.stats("metrics").await.unwrap().groups[0].clone();
        assert_eq!((in_flight.next_offset, in_flight.lag), (offsets[0], 3));
        consumer.ack().await.unwrap();
        let one_done = broker.stats("metrics").await.unwrap().groups[0].clone();
        assert_eq!((one_done.next_offset, one_done.lag), (offsets[1], 2));

        for offset in &offsets[1..] {
            assert_eq!(next(&mut consumer).await.record.offset, *offset);
            consumer.ack().await.unwrap();
        }
        let stats = broker.stats("metrics").await.unwrap();
        let caught_up = &stats.groups[0];
        assert_eq!(caught_up.lag, 0);
        assert_eq!(
            caught_up.next_offset,
            stats.partitions[partition as usize].end_offset
        );

        // A seek shows in the stats before anyone subscribes again.
        broker
            .seek("metrics", "dashboard", partition, offsets[1])
            .await
            .unwrap();
        let rewound = broker.stats("metrics").await.unwrap().groups[0].clone();
        assert_eq!((rewound.next_offset, rewound.lag), (offsets[1], 2));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_topic_is_reported_as_such() {
    with_broker(|broker| async move {
        fn is_unknown<T: std::fmt::Debug>(result: Result<T, BrokerError>) {
            match result {
                Err(BrokerError::UnknownTopic(name)) => assert_eq!(name, "nowhere"),
                other => panic!("expected UnknownTopic, got {other:?}"),
            }
        }
        is_unknown(broker.publish("nowhere", None, event("n", 0)).await);
        is_unknown(broker.read("nowhere", 0, 0, 10).await);
        is_unknown(broker.subscribe("nowhere", "g", 0, 5).await.map(|_| ()));
        is_unknown(broker.seek("nowhere", "g", 0, 0).await);
        is_unknown(broker.offset_at("nowhere", 0, SystemTime::now()).await);
        is_unknown(broker.stats("nowhere").await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_topic_is_idempotent_and_refuses_a_changed_partition_count() {
    with_server(|broker, server| async move {
        let config = topic("users.created", 3);
        broker.create_topic(&config).await.unwrap();
        broker.create_topic(&config).await.unwrap();
        broker.create_topic(&config.dead_letters()).await.unwrap();
        let stored = server.stream_config("users.created").await;
        assert_eq!(stored.max_age, Duration::from_secs(3600));
        // The topic's limit is per partition; the stream holds all three.
        assert_eq!(stored.max_bytes, 3 * 64 * 1024 * 1024);
        assert_eq!(stored.subjects.len(), 3);
        assert_eq!(
            stored.storage,
            async_nats::jetstream::stream::StorageType::File
        );

        // A changed retention is applied, not refused.
        let longer = TopicConfig {
            retention: Some(Duration::from_secs(7200)),
            max_bytes: None,
            ..config.clone()
        };
        broker.create_topic(&longer).await.unwrap();
        broker.create_topic(&longer).await.unwrap();
        let stored = server.stream_config("users.created").await;
        assert_eq!(stored.max_age, Duration::from_secs(7200));
        assert!(stored.max_bytes <= 0, "no limit: {}", stored.max_bytes);

        match broker.create_topic(&topic("users.created", 5)).await {
            Err(BrokerError::PartitionsChanged {
                topic,
                existing,
                wanted,
            }) => {
                assert_eq!((topic.as_str(), existing, wanted), ("users.created", 3, 5));
            }
            other => panic!("expected PartitionsChanged, got {other:?}"),
        }

        // Names that map to the same characters stay apart.
        broker
            .create_topic(&topic("users created", 2))
            .await
            .unwrap();
        let here = broker
            .publish("users created", Some("k"), event("k", 0))
            .await
            .unwrap();
        let records = broker
            .read("users created", here.partition, 0, 10)
            .await
            .unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(
            broker
                .stats("users.created")
                .await
                .unwrap()
                .partitions
                .len(),
            3
        );
        assert!(
            broker
                .stats("users.created")
                .await
                .unwrap()
                .partitions
                .iter()
                .all(|p| p.records == 0)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_publishes_are_all_acked_and_readable() {
    with_broker(|broker| async move {
        const TASKS: usize = 16;
        const EVENTS: usize = 1000;
        broker.create_topic(&topic("firehose", 4)).await.unwrap();
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let broker = broker.clone();
            tasks.push(tokio::spawn(async move {
                let mut published = Vec::new();
                for n in (task..EVENTS).step_by(TASKS) {
                    let key = format!("key-{}", n % 37);
                    let at = broker
                        .publish("firehose", Some(&key), event(&key, n))
                        .await
                        .unwrap();
                    published.push((at, format!("{key}-{n}")));
                }
                published
            }));
        }
        let mut expected = HashMap::new();
        for task in tasks {
            for (at, id) in task.await.unwrap() {
                assert!(expected.insert((at.partition, at.offset), id).is_none());
            }
        }
        assert_eq!(expected.len(), EVENTS);

        let mut read = 0;
        let mut offsets = HashSet::new();
        for partition in 0..4 {
            let records = broker
                .read("firehose", partition, 0, EVENTS * 2)
                .await
                .unwrap();
            assert!(
                records
                    .windows(2)
                    .all(|pair| pair[0].offset < pair[1].offset)
            );
            for record in records {
                let id = event_id(&record.event);
                assert_eq!(expected.get(&(partition, record.offset)), Some(&id));
                assert!(offsets.insert(record.offset));
                read += 1;
            }
        }
        assert_eq!(read, EVENTS);
        let stats = broker.stats("firehose").await.unwrap();
        assert_eq!(
            stats.partitions.iter().map(|p| p.records).sum::<u64>(),
            EVENTS as u64
        );
    })
    .await;
}

// ---- The shared, backend-agnostic suite: the same properties as the embedded log ----

mod suite;

#[tokio::test(flavor = "multi_thread")]
async fn shared_suite() {
    with_broker(|broker| async move {
        let prefix = format!("suite{:08x}", fastrand::u32(..));
        suite::run_all(broker, &prefix).await;
    })
    .await;
}
