//! Push delivery: every subscription gets every event of its topic, partition by partition and
//! in order, POSTed to the subscribing service; a 2xx acknowledges, anything else is retried with
//! exponential backoff, and after `max_attempts` the event goes to the topic's dead-letter topic
//! with the reason.
//!
//! One task per subscription and partition, so a subscriber that is down holds up only its own
//! partitions' queues, never another subscriber's or another partition's. How an event reaches a
//! service is the [`Pusher`]'s business: the binary sends it through the proxy stack, so the
//! callee's policy, breakers and traces apply to deliveries like to any call.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::cloudevent::Event;
use crate::{
    BoxFuture, Broker, BrokerError, PartitionStats, Published, Record, TopicConfig,
    dead_letter_topic,
};

/// One `[[subscriptions]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    pub topic: String,
    /// The subscribing service: also its consumer group.
    pub service: String,
    pub path: String,
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

/// Hands one event to one service.
pub trait Pusher: Send + Sync + 'static {
    /// POSTs `event` (structured-mode JSON) to `path` of `service`, continuing `traceparent`.
    /// `Ok` only for a 2xx answer; `Err` says why not, for the dead letter.
    fn push<'a>(
        &'a self,
        service: &'a str,
        path: &'a str,
        event: Bytes,
        traceparent: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    Offset(u64),
    Time(SystemTime),
}

/// A topic as `flotilla events` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicOverview {
    pub topic: String,
    pub partitions: Vec<PartitionStats>,
    pub subscribers: Vec<SubscriberLag>,
    /// Events in the dead-letter topic.
    pub dead_letters: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriberLag {
    pub service: String,
    pub path: String,
    /// Events stored and not yet acknowledged by the service, over all partitions.
    pub lag: u64,
    /// Events delivered (acknowledged) and dead-lettered since the fleet started.
    pub delivered: u64,
    pub dead_lettered: u64,
}

/// Extension attributes a dead letter carries besides the original event's.
pub const DEAD_LETTER_REASON: &str = "deadletterreason";
pub const DEAD_LETTER_ATTEMPTS: &str = "deadletterattempts";
pub const DEAD_LETTER_SUBSCRIBER: &str = "deadlettersubscriber";
pub const DEAD_LETTER_TOPIC: &str = "deadlettertopic";

/// The group that remembers how far a dead-letter topic has been redriven.
const REDRIVE_GROUP: &str = "flotilla-redrive";

#[derive(Default)]
struct Counters {
    delivered: u64,
    dead_lettered: u64,
}

/// The topics, their subscriptions and the delivery tasks.
pub struct Events {
    broker: Arc<dyn Broker>,
    topics: Vec<TopicConfig>,
    subscribers: Vec<Subscriber>,
    pusher: Arc<dyn Pusher>,
    max_event_size: usize,
    /// Bumped per (topic, service) to make its tasks subscribe again (after a replay's seek).
    generations: BTreeMap<(String, String), watch::Sender<u64>>,
    counters: Mutex<BTreeMap<(String, String), Counters>>,
    /// The latest [`Events::overview`], refreshed every few seconds, for `/metrics` (which is
    /// rendered synchronously and must not wait on the broker).
    snapshot: Mutex<Vec<TopicOverview>>,
    stop: watch::Sender<bool>,
}

impl Events {
    /// Creates every topic and its dead-letter topic, then starts delivering.
    pub async fn start(
        broker: Arc<dyn Broker>,
        topics: Vec<TopicConfig>,
        subscribers: Vec<Subscriber>,
        pusher: Arc<dyn Pusher>,
        max_event_size: usize,
    ) -> Result<Arc<Self>, BrokerError> {
        for topic in &topics {
            broker.create_topic(topic).await?;
            broker.create_topic(&topic.dead_letters()).await?;
        }
        let generations = subscribers
            .iter()
            .map(|s| ((s.topic.clone(), s.service.clone()), watch::channel(0).0))
            .collect();
        let events = Arc::new(Self {
            broker,
            topics,
            subscribers,
            pusher,
            max_event_size,
            generations,
            counters: Mutex::default(),
            snapshot: Mutex::default(),
            stop: watch::channel(false).0,
        });
        tokio::spawn(refresh_snapshot(Arc::downgrade(&events)));
        for subscriber in &events.subscribers {
            let Some(partitions) = events.partitions(&subscriber.topic) else {
                continue;
            };
            for partition in 0..partitions {
                tokio::spawn(deliver(events.clone(), subscriber.clone(), partition));
            }
        }
        Ok(events)
    }

    /// Stops the delivery tasks (each finishes the push it is in).
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Topics, lag and dead letters as of a few seconds ago.
    pub fn snapshot(&self) -> Vec<TopicOverview> {
        self.snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn max_event_size(&self) -> usize {
        self.max_event_size
    }

    pub fn topics(&self) -> &[TopicConfig] {
        &self.topics
    }

    pub fn subscribers(&self) -> &[Subscriber] {
        &self.subscribers
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Partitions of a declared topic or of a declared topic's dead-letter topic.
    pub fn partitions(&self, topic: &str) -> Option<u32> {
        if let Some(config) = self.topics.iter().find(|t| t.name == topic) {
            return Some(config.partitions);
        }
        let base = topic.strip_suffix(".dlq")?;
        self.topics.iter().any(|t| t.name == base).then_some(1)
    }

    /// Stores `event` in `topic`: durable when this returns `Ok`.
    pub async fn publish(&self, topic: &str, event: &Event) -> Result<Published, PublishError> {
        if self.partitions(topic).is_none() {
            return Err(PublishError::UnknownTopic(topic.to_owned()));
        }
        Ok(self
            .broker
            .publish(topic, event.partition_key.as_deref(), event.json.clone())
            .await?)
    }

    /// Every declared topic with its offsets, subscribers' lag and dead letters.
    pub async fn overview(&self) -> Result<Vec<TopicOverview>, BrokerError> {
        let mut overview = Vec::with_capacity(self.topics.len());
        for topic in &self.topics {
            overview.push(self.topic_overview(&topic.name).await?);
        }
        Ok(overview)
    }

    pub async fn topic_overview(&self, topic: &str) -> Result<TopicOverview, BrokerError> {
        let stats = self.broker.stats(topic).await?;
        let dead = self.broker.stats(&dead_letter_topic(topic)).await?;
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let subscribers = self
            .subscribers
            .iter()
            .filter(|s| s.topic == topic)
            .map(|s| {
                let key = (s.topic.clone(), s.service.clone());
                let (delivered, dead_lettered) = counters
                    .get(&key)
                    .map_or((0, 0), |c| (c.delivered, c.dead_lettered));
                // A group that never acknowledged anything has no position yet: all of it is lag.
                let lag = stats
                    .partitions
                    .iter()
                    .map(|p| {
                        stats
                            .groups
                            .iter()
                            .find(|g| g.group == s.service && g.partition == p.partition)
                            .map_or(p.records, |g| g.lag)
                    })
                    .sum();
                SubscriberLag {
                    service: s.service.clone(),
                    path: s.path.clone(),
                    lag,
                    delivered,
                    dead_lettered,
                }
            })
            .collect();
        Ok(TopicOverview {
            topic: topic.to_owned(),
            partitions: stats.partitions,
            subscribers,
            dead_letters: dead.partitions.iter().map(|p| p.records).sum(),
        })
    }

    /// Up to `limit` events of a partition from `from` on.
    pub async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, PublishError> {
        if self.partitions(topic).is_none() {
            return Err(PublishError::UnknownTopic(topic.to_owned()));
        }
        Ok(self.broker.read(topic, partition, from, limit).await?)
    }

    /// Makes `service` receive `topic` again from an offset (in every partition) or a time.
    pub async fn replay(
        &self,
        topic: &str,
        service: &str,
        from: ReplayFrom,
    ) -> Result<Vec<Published>, PublishError> {
        let partitions = self
            .partitions(topic)
            .ok_or_else(|| PublishError::UnknownTopic(topic.to_owned()))?;
        let key = (topic.to_owned(), service.to_owned());
        let Some(generation) = self.generations.get(&key) else {
            return Err(PublishError::Broker(BrokerError::Unavailable(format!(
                "`{service}` does not subscribe to `{topic}`"
            ))));
        };
        let mut positions = Vec::with_capacity(partitions as usize);
        for partition in 0..partitions {
            let offset = match from {
                ReplayFrom::Offset(offset) => offset,
                ReplayFrom::Time(time) => self.broker.offset_at(topic, partition, time).await?,
            };
            self.broker.seek(topic, service, partition, offset).await?;
            positions.push(Published { partition, offset });
        }
        generation.send_modify(|n| *n += 1);
        Ok(positions)
    }

    /// Delivers every dead letter of `dlq_topic` not redriven yet to the subscriber it failed
    /// at, with that subscription's retries; one that fails again becomes a new dead letter.
    /// Returns how many were redriven.
    pub async fn redrive(&self, dlq_topic: &str) -> Result<u64, PublishError> {
        let Some(topic) = dlq_topic.strip_suffix(".dlq") else {
            return Err(PublishError::UnknownTopic(dlq_topic.to_owned()));
        };
        if self.partitions(dlq_topic).is_none() {
            return Err(PublishError::UnknownTopic(dlq_topic.to_owned()));
        }
        // Only what was dead before the redrive began: what fails again is appended after it
        // and waits for the next redrive.
        let stats = self.broker.stats(dlq_topic).await?;
        let Some(partition) = stats.partitions.first().copied() else {
            return Ok(0);
        };
        let mut next = stats
            .groups
            .iter()
            .find(|g| g.group == REDRIVE_GROUP)
            .map_or(partition.start_offset, |g| g.next_offset);
        let mut redriven = 0;
        while next < partition.end_offset {
            let records = self.broker.read(dlq_topic, 0, next, 256).await?;
            let Some(last) = records.last().map(|r| r.offset) else {
                break;
            };
            for record in records.iter().filter(|r| r.offset < partition.end_offset) {
                let (subscriber_name, original) = strip_dead_letter(&record.event);
                let subscriber = self.subscribers.iter().find(|s| {
                    s.topic == topic && Some(s.service.as_str()) == subscriber_name.as_deref()
                });
                match subscriber {
                    Some(subscriber) => {
                        let record = Record {
                            event: original,
                            ..record.clone()
                        };
                        push_until_done(self, subscriber, &record).await;
                        redriven += 1;
                    }
                    None => tracing::warn!(
                        topic = dlq_topic,
                        offset = record.offset,
                        "a dead letter names no current subscriber; skipped"
                    ),
                }
            }
            next = last + 1;
            // The cursor moves as it goes, so an interrupted redrive does not start over.
            self.broker
                .seek(dlq_topic, REDRIVE_GROUP, 0, next.min(partition.end_offset))
                .await?;
        }
        Ok(redriven)
    }

    fn count(&self, subscriber: &Subscriber, delivered: bool) {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let entry = counters
            .entry((subscriber.topic.clone(), subscriber.service.clone()))
            .or_default();
        if delivered {
            entry.delivered += 1;
        } else {
            entry.dead_lettered += 1;
        }
    }

    /// Moves a record that exhausted its attempts to the dead-letter topic, with why.
    async fn dead_letter(
        &self,
        subscriber: &Subscriber,
        record: &Record,
        attempts: u32,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let event = match Event::from_stored(record.event.clone()) {
            Ok(event) => event.with_extensions(&[
                (DEAD_LETTER_REASON, Value::String(reason.to_owned())),
                (DEAD_LETTER_ATTEMPTS, Value::from(attempts)),
                (
                    DEAD_LETTER_SUBSCRIBER,
                    Value::String(subscriber.service.clone()),
                ),
                (DEAD_LETTER_TOPIC, Value::String(subscriber.topic.clone())),
            ]),
            Err(_) => record.event.clone(),
        };
        self.broker
            .publish(&dead_letter_topic(&subscriber.topic), None, event)
            .await?;
        self.count(subscriber, false);
        tracing::warn!(
            topic = %subscriber.topic,
            subscriber = %subscriber.service,
            offset = record.offset,
            attempts,
            "event dead-lettered: {reason}"
        );
        Ok(())
    }
}

/// How stale `/metrics`' event figures may be.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(2);

async fn refresh_snapshot(events: std::sync::Weak<Events>) {
    loop {
        let Some(strong) = events.upgrade() else {
            return;
        };
        if *strong.stop.borrow() {
            return;
        }
        if let Ok(overview) = strong.overview().await {
            *strong.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = overview;
        }
        drop(strong);
        tokio::time::sleep(SNAPSHOT_EVERY).await;
    }
}

/// The dead letter's subscriber and the event as it was before it died.
fn strip_dead_letter(json: &Bytes) -> (Option<String>, Bytes) {
    match serde_json::from_slice::<Value>(json) {
        Ok(Value::Object(mut object)) => {
            let subscriber = match object.remove(DEAD_LETTER_SUBSCRIBER) {
                Some(Value::String(s)) => Some(s),
                _ => None,
            };
            for key in [DEAD_LETTER_REASON, DEAD_LETTER_ATTEMPTS, DEAD_LETTER_TOPIC] {
                object.remove(key);
            }
            let original = serde_json::to_vec(&Value::Object(object))
                .map(Bytes::from)
                .unwrap_or_else(|_| json.clone());
            (subscriber, original)
        }
        _ => (None, json.clone()),
    }
}

/// The delay before attempt `attempt + 1`: `backoff` doubling, capped, with ±25% jitter so
/// subscribers recovering together are not hit in lockstep.
fn backoff(subscriber: &Subscriber, attempt: u32) -> Duration {
    let doubled = subscriber
        .backoff
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = doubled.min(subscriber.max_backoff);
    capped.mul_f64(0.75 + fastrand::f64() * 0.5)
}

/// Pushes one record with the subscription's retries, outside a consumer (redrive); dead-letters
/// it again when every attempt fails.
async fn push_until_done(events: &Events, subscriber: &Subscriber, record: &Record) {
    let traceparent = Event::from_stored(record.event.clone())
        .ok()
        .and_then(|e| e.traceparent);
    let mut attempt = 1;
    loop {
        let result = events
            .pusher
            .push(
                &subscriber.service,
                &subscriber.path,
                record.event.clone(),
                traceparent.as_deref(),
            )
            .await;
        match result {
            Ok(()) => {
                events.count(subscriber, true);
                return;
            }
            Err(reason) if attempt >= subscriber.max_attempts => {
                if let Err(e) = events
                    .dead_letter(subscriber, record, attempt, &reason)
                    .await
                {
                    tracing::error!("cannot dead-letter a redriven event: {e}");
                }
                return;
            }
            Err(_) => {
                tokio::time::sleep(backoff(subscriber, attempt)).await;
                attempt += 1;
            }
        }
    }
}

/// The task of one subscription × partition.
async fn deliver(events: Arc<Events>, subscriber: Subscriber, partition: u32) {
    let mut stop = events.stop.subscribe();
    let Some(generation) = events
        .generations
        .get(&(subscriber.topic.clone(), subscriber.service.clone()))
    else {
        return;
    };
    let mut generation = generation.subscribe();
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        generation.mark_unchanged();
        let consumer = events
            .broker
            .subscribe(
                &subscriber.topic,
                &subscriber.service,
                partition,
                subscriber.max_attempts,
            )
            .await;
        let mut consumer = match consumer {
            Ok(consumer) => consumer,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(
                        topic = %subscriber.topic,
                        subscriber = %subscriber.service,
                        partition,
                        "cannot subscribe: {e}; retrying"
                    );
                }
                let pause = Duration::from_millis(200).saturating_mul(failures.min(50));
                tokio::select! {
                    () = tokio::time::sleep(pause) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        failures = 0;
        loop {
            let delivery = tokio::select! {
                delivery = consumer.next() => delivery,
                _ = generation.changed() => break,
                _ = stop.changed() => return,
            };
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(e) => {
                    tracing::warn!(
                        topic = %subscriber.topic,
                        subscriber = %subscriber.service,
                        partition,
                        "reading the next event failed: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            };
            let traceparent = Event::from_stored(delivery.record.event.clone())
                .ok()
                .and_then(|e| e.traceparent);
            let result = events
                .pusher
                .push(
                    &subscriber.service,
                    &subscriber.path,
                    delivery.record.event.clone(),
                    traceparent.as_deref(),
                )
                .await;
            let settled = match result {
                Ok(()) => {
                    events.count(&subscriber, true);
                    consumer.ack().await
                }
                Err(reason) if delivery.attempt >= subscriber.max_attempts => {
                    match events
                        .dead_letter(&subscriber, &delivery.record, delivery.attempt, &reason)
                        .await
                    {
                        Ok(()) => consumer.ack().await,
                        // Not acknowledged: the event is delivered again rather than lost.
                        Err(e) => consumer
                            .nack(backoff(&subscriber, delivery.attempt))
                            .await
                            .and(Err(e)),
                    }
                }
                Err(_) => consumer.nack(backoff(&subscriber, delivery.attempt)).await,
            };
            if let Err(e) = settled {
                tracing::warn!(
                    topic = %subscriber.topic,
                    subscriber = %subscriber.service,
                    partition,
                    "settling a delivery failed: {e}"
                );
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber() -> Subscriber {
        Subscriber {
            topic: "t".into(),
            service: "s".into(),
            path: "/e".into(),
            max_attempts: 8,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        }
    }

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        let s = subscriber();
        for (attempt, base) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (30, 1000),
        ] {
            let delay = backoff(&s, attempt).as_millis() as u64;
            assert!(
                (base * 3 / 4..=base * 5 / 4).contains(&delay),
                "attempt {attempt}: {delay} ms"
            );
        }
    }

    #[test]
    fn dead_letters_lose_their_marks_when_redriven() {
        let event = Event::from_structured(
            br#"{"specversion":"1.0","type":"t","id":"1","source":"/s"}"#,
            &Default::default(),
            1 << 20,
        )
        .expect("event");
        let dead = event.with_extensions(&[
            (DEAD_LETTER_REASON, Value::String("503".into())),
            (DEAD_LETTER_ATTEMPTS, Value::from(8)),
            (DEAD_LETTER_SUBSCRIBER, Value::String("shipping".into())),
            (DEAD_LETTER_TOPIC, Value::String("t".into())),
        ]);
        let (subscriber, original) = strip_dead_letter(&dead);
        assert_eq!(subscriber.as_deref(), Some("shipping"));
        let original: Value = serde_json::from_slice(&original).expect("json");
        let before: Value = serde_json::from_slice(&event.json).expect("json");
        assert_eq!(original, before);
    }
}
