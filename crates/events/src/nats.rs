//! The NATS JetStream backend.
//!
//! A topic is one stream, `<PREFIX>_<topic>_<hash>`, whose subjects are
//! `<prefix>.<topic>_<hash>.<partition>`: the topic's characters that NATS does not allow in names
//! become `_`, and the hash of the real name keeps topics apart that map to the same characters.
//! The stream's description records the real topic name and the partition count, so that a
//! changed count is refused instead of silently reshuffling keys.
//!
//! Offsets are stream sequences, shared by all partitions of a topic: a partition's offsets
//! increase strictly but leave gaps where the other partitions' records are.
//!
//! A consumer group's reader of one partition is a durable pull consumer named from the group and
//! the partition, filtered to the partition's subject, acknowledging explicitly, with one record
//! in flight at a time so that the partition's order holds across retries.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::pull::{self, Batch};
use async_nats::jetstream::consumer::{
    self as js_consumer, AckPolicy, DeliverPolicy, PullConsumer,
};
use async_nats::jetstream::context::{
    ContextBuilder, CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind,
    PublishError, PublishErrorKind, RequestError, RequestErrorKind,
};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{
    self as js_stream, ConsumerError, ConsumerErrorKind, DiscardPolicy, RawMessageError,
    RawMessageErrorKind, StorageType,
};
use async_nats::jetstream::{self, AckKind, ErrorCode};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{
    BoxFuture, Broker, BrokerError, Consumer, Delivery, GroupStats, PartitionStats, Published,
    Record, TopicConfig, TopicStats, any_partition, partition_for,
};

/// A delivered record not acknowledged within this is handed out again. Generous, because the
/// delivery engine acknowledges only after the subscriber answered, retries included.
const ACK_WAIT: Duration = Duration::from_secs(60);

/// How long one pull request waits on the server for a record. A consumer dropped while waiting
/// leaves its request behind; a record delivered to it in that window waits [`ACK_WAIT`] before
/// it is handed out again, so this is kept short.
const PULL_EXPIRES: Duration = Duration::from_secs(10);

/// Bounds every JetStream API request and publish acknowledgement.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Sanitized names are cut here; the hash keeps them apart.
const MAX_NAME_CHARS: usize = 48;

/// The NATS JetStream broker. Cheap to share: the connection multiplexes every caller.
pub struct JetStream {
    js: jetstream::Context,
    prefix: String,
    /// Topics seen, so a publish costs one round trip instead of two.
    topics: Mutex<HashMap<String, Arc<Topic>>>,
}

/// What the backend knows about one topic.
#[derive(Debug)]
struct Topic {
    name: String,
    stream: String,
    /// Partition `n`'s subject is `<subjects>.<n>`.
    subjects: String,
    partitions: u32,
}

impl Topic {
    fn subject(&self, partition: u32) -> String {
        format!("{}.{partition}", self.subjects)
    }

    fn check_partition(&self, partition: u32) -> Result<(), BrokerError> {
        if partition < self.partitions {
            Ok(())
        } else {
            Err(BrokerError::UnknownPartition {
                topic: self.name.clone(),
                partition,
            })
        }
    }
}

/// Kept as the stream's description: the stream name is lossy, this is not.
#[derive(Debug, Serialize, Deserialize)]
struct StreamMeta {
    flotilla_topic: String,
    partitions: u32,
}

/// Kept as a durable consumer's description, so stats can name the group.
#[derive(Debug, Serialize, Deserialize)]
struct ConsumerMeta {
    flotilla_group: String,
    partition: u32,
}

impl JetStream {
    /// Connects to the NATS server at `url` (e.g. `nats://127.0.0.1:4222`) and checks that
    /// JetStream is enabled for the account. Streams are named `<stream_prefix>_…` and subjects
    /// `<stream_prefix in lower case>.…`.
    pub async fn connect(url: &str, stream_prefix: &str) -> Result<Self, BrokerError> {
        let client = async_nats::ConnectOptions::new()
            .name("flotilla-events")
            .connect(url)
            .await
            .map_err(|err| BrokerError::Unavailable(format!("connecting to {url}: {err}")))?;
        let js = ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            // Many tasks publish at once; waiting for room is better than failing the publish.
            .backpressure_on_inflight(true)
            .build(client);
        // The raw account info, not `query_account`: its typed answer follows the newest
        // server's fields, and any answer at all means JetStream is there.
        let account: serde_json::Value =
            js.request("INFO", &serde_json::json!({}))
                .await
                .map_err(|err| {
                    BrokerError::Unavailable(format!("JetStream is not available at {url}: {err}"))
                })?;
        if let Some(error) = account.get("error") {
            return Err(BrokerError::Unavailable(format!(
                "JetStream is not available at {url}: {error}"
            )));
        }
        let prefix = sanitize(stream_prefix);
        Ok(JetStream {
            js,
            prefix: if prefix.is_empty() {
                "FLOTILLA".to_owned()
            } else {
                prefix
            },
            topics: Mutex::new(HashMap::new()),
        })
    }

    fn names(&self, topic: &str) -> (String, String) {
        let token = format!("{}_{}", sanitize(topic), short_hash(topic));
        (
            format!("{}_{token}", self.prefix),
            format!("{}.{token}", self.prefix.to_ascii_lowercase()),
        )
    }

    fn cached(&self, topic: &str) -> Option<Arc<Topic>> {
        self.topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
            .cloned()
    }

    fn remember(&self, topic: Topic) -> Arc<Topic> {
        let topic = Arc::new(topic);
        self.topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(topic.name.clone(), topic.clone());
        topic
    }

    /// A topic found missing is forgotten, so that a stream created again (by another process,
    /// perhaps with another partition count) is looked up afresh.
    fn unless_gone<T>(
        &self,
        topic: &str,
        result: Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        if let Err(BrokerError::UnknownTopic(_)) = &result {
            self.forget(topic);
        }
        result
    }

    fn forget(&self, topic: &str) {
        self.topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(topic);
    }

    /// The topic's stream as the server has it, or `UnknownTopic`.
    async fn topic(&self, topic: &str) -> Result<Arc<Topic>, BrokerError> {
        if let Some(known) = self.cached(topic) {
            return Ok(known);
        }
        let (stream, subjects) = self.names(topic);
        let handle = self
            .js
            .get_stream(&stream)
            .await
            .map_err(|err| get_stream_error(topic, err))?;
        let meta = stream_meta(topic, &handle.cached_info().config)?;
        Ok(self.remember(Topic {
            name: topic.to_owned(),
            stream,
            subjects,
            partitions: meta.partitions,
        }))
    }

    fn stream_config(&self, config: &TopicConfig, partitions: u32) -> js_stream::Config {
        let (stream, subjects) = self.names(&config.name);
        let meta = StreamMeta {
            flotilla_topic: config.name.clone(),
            partitions,
        };
        js_stream::Config {
            name: stream,
            description: serde_json::to_string(&meta).ok(),
            subjects: (0..partitions).map(|p| format!("{subjects}.{p}")).collect(),
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            max_age: config.retention.unwrap_or_default(),
            max_bytes: stream_max_bytes(config.max_bytes, partitions),
            max_messages: -1,
            max_messages_per_subject: -1,
            max_consumers: -1,
            num_replicas: 1,
            ..Default::default()
        }
    }

    async fn create(&self, config: &TopicConfig) -> Result<(), BrokerError> {
        let topic = config.name.as_str();
        let wanted = config.partitions.max(1);
        let desired = self.stream_config(config, wanted);
        // A second round only when another process created the stream between our look and
        // our create.
        for _ in 0..2 {
            match self.js.get_stream(&desired.name).await {
                Ok(handle) => {
                    // `get_stream` fetched the stream's info already.
                    let info = handle.cached_info();
                    let meta = stream_meta(topic, &info.config)?;
                    if meta.partitions != wanted {
                        return Err(BrokerError::PartitionsChanged {
                            topic: topic.to_owned(),
                            existing: meta.partitions,
                            wanted,
                        });
                    }
                    let current = &info.config;
                    if current.max_age != desired.max_age
                        || normalize_limit(current.max_bytes) != desired.max_bytes
                    {
                        let mut updated = current.clone();
                        updated.max_age = desired.max_age;
                        updated.max_bytes = desired.max_bytes;
                        self.js
                            .update_stream(&updated)
                            .await
                            .map_err(|err| create_stream_error(topic, err))?;
                    }
                    self.remember_config(config, wanted);
                    return Ok(());
                }
                Err(err) if is_stream_not_found(&err) => {
                    match self.js.create_stream(desired.clone()).await {
                        Ok(_) => {
                            self.remember_config(config, wanted);
                            return Ok(());
                        }
                        Err(err) if is_name_in_use(&err) => continue,
                        Err(err) => return Err(create_stream_error(topic, err)),
                    }
                }
                Err(err) => return Err(get_stream_error(topic, err)),
            }
        }
        Err(BrokerError::Unavailable(format!(
            "the stream of topic `{topic}` keeps changing while it is created"
        )))
    }

    fn remember_config(&self, config: &TopicConfig, partitions: u32) {
        let (stream, subjects) = self.names(&config.name);
        self.remember(Topic {
            name: config.name.clone(),
            stream,
            subjects,
            partitions,
        });
    }

    async fn publish_to(
        &self,
        topic: &str,
        key: Option<&str>,
        event: Bytes,
    ) -> Result<Published, BrokerError> {
        let known = self.topic(topic).await?;
        let partition = match key {
            Some(key) => partition_for(key, known.partitions),
            None => any_partition(known.partitions),
        };
        let acked = match self.js.publish(known.subject(partition), event).await {
            Ok(pending) => pending.await,
            Err(err) => Err(err),
        };
        match acked {
            Ok(ack) => Ok(Published {
                partition,
                offset: ack.sequence,
            }),
            Err(err) if err.kind() == PublishErrorKind::StreamNotFound => {
                // No responders: either the stream is gone or JetStream is down; only a fresh
                // look tells which.
                self.forget(topic);
                match self.topic(topic).await {
                    Ok(_) => Err(BrokerError::Unavailable(format!(
                        "publishing to `{topic}`: {err}"
                    ))),
                    Err(looked) => Err(looked),
                }
            }
            Err(err) => Err(publish_error(topic, err)),
        }
    }

    async fn read_from(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, BrokerError> {
        let known = self.topic(topic).await?;
        known.check_partition(partition)?;
        let stream = self.stream_handle(&known).await?;
        let subject = known.subject(partition);
        let mut records = Vec::new();
        // Sequences start at 1; `0` means the oldest held, as does anything older than it.
        let mut next = from.max(1);
        while records.len() < max {
            let message = match stream
                .raw_message_builder()
                .next_by_subject(subject.clone())
                .sequence(next)
                .send()
                .await
            {
                Ok(message) => message,
                Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(err) => return Err(raw_message_error(topic, err)),
            };
            next = message.sequence.saturating_add(1);
            records.push(stored_record(partition, message));
            if next == u64::MAX {
                break;
            }
        }
        Ok(records)
    }

    async fn stream_handle(&self, known: &Topic) -> Result<js_stream::Stream<()>, BrokerError> {
        // No round trip: the stream was looked up with the topic.
        self.js
            .get_stream_no_info(&known.stream)
            .await
            .map_err(|err| get_stream_error(&known.name, err))
    }

    fn consumer_config(
        &self,
        known: &Topic,
        group: &str,
        partition: u32,
        deliver_policy: DeliverPolicy,
    ) -> pull::Config {
        let meta = ConsumerMeta {
            flotilla_group: group.to_owned(),
            partition,
        };
        pull::Config {
            durable_name: Some(consumer_name(group, partition)),
            description: serde_json::to_string(&meta).ok(),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            // Unlimited: the delivery engine decides when a record has had enough attempts and
            // dead-letters it. A server-side limit would drop a record silently whenever the
            // engine could not finish the dead-lettering (crash, full dead-letter topic).
            max_deliver: -1,
            filter_subject: known.subject(partition),
            // The partition's order holds only with one record in flight.
            max_ack_pending: 1,
            ..Default::default()
        }
    }

    async fn subscribe_to(
        &self,
        topic: &str,
        group: &str,
        partition: u32,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        let known = self.topic(topic).await?;
        known.check_partition(partition)?;
        let stream = self.stream_handle(&known).await?;
        let name = consumer_name(group, partition);
        let config = self.consumer_config(&known, group, partition, DeliverPolicy::All);
        let consumer: PullConsumer = stream
            .get_or_create_consumer(&name, config)
            .await
            .map_err(|err| consumer_error(topic, err))?;
        Ok(Box::new(JetStreamConsumer {
            topic: topic.to_owned(),
            partition,
            consumer,
            pull: None,
            current: None,
        }))
    }

    async fn seek_to(
        &self,
        topic: &str,
        group: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), BrokerError> {
        let known = self.topic(topic).await?;
        known.check_partition(partition)?;
        let stream = self.stream_handle(&known).await?;
        let name = consumer_name(group, partition);
        // A durable consumer's start cannot be changed in place: it is replaced, and with it
        // its acknowledgement state, which is what a replay means.
        match stream.delete_consumer(&name).await {
            Ok(_) => {}
            Err(err) if consumer_error_code(&err) == Some(ErrorCode::CONSUMER_NOT_FOUND) => {}
            Err(err) => return Err(consumer_error(topic, err)),
        }
        let start = DeliverPolicy::ByStartSequence {
            start_sequence: offset.max(1),
        };
        let config = self.consumer_config(&known, group, partition, start);
        stream
            .create_consumer(config)
            .await
            .map_err(|err| consumer_error(topic, err))?;
        Ok(())
    }

    async fn offset_at_time(
        &self,
        topic: &str,
        partition: u32,
        time: SystemTime,
    ) -> Result<u64, BrokerError> {
        let known = self.topic(topic).await?;
        known.check_partition(partition)?;
        let stream = self.stream_handle(&known).await?;
        let nanos = time
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_nanos())
            .unwrap_or(0);
        let start_time = i128::try_from(nanos)
            .map_err(|err| Box::new(err) as async_nats::Error)
            .and_then(async_nats::datetime::from_nanos)
            .map_err(|err| {
                BrokerError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{time:?} is out of range: {err}"),
                ))
            })?;
        // The server knows where a time falls; an ephemeral consumer asks it without leaving
        // anything behind (it is deleted, and expires on its own should the delete be lost).
        let probe: PullConsumer = stream
            .create_consumer(pull::Config {
                filter_subject: known.subject(partition),
                deliver_policy: DeliverPolicy::ByStartTime { start_time },
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|err| consumer_error(topic, err))?;
        let first = async {
            let mut batch = probe
                .fetch()
                .max_messages(1)
                .messages()
                .await
                .map_err(|err| unavailable("probing the partition", err))?;
            match batch.next().await {
                Some(Ok(message)) => message
                    .info()
                    .map(|info| Some(info.stream_sequence))
                    .map_err(|err| BrokerError::Corrupt(format!("a delivery's metadata: {err}"))),
                Some(Err(err)) => Err(unavailable("probing the partition", err)),
                None => Ok(None),
            }
        }
        .await;
        let probe_name = probe.cached_info().name.clone();
        if let Err(err) = stream.delete_consumer(&probe_name).await {
            tracing::debug!(topic, %err, "the offset probe is left to expire");
        }
        match first? {
            Some(offset) => Ok(offset),
            None => Ok(self.end_offset(&known).await?),
        }
    }

    async fn end_offset(&self, known: &Topic) -> Result<u64, BrokerError> {
        let info = self
            .stream_handle(known)
            .await?
            .get_info()
            .await
            .map_err(|err| request_error(&known.name, "reading the stream", err))?;
        Ok(info.state.last_sequence.saturating_add(1))
    }

    /// The sequence of the partition's first record at or after `from`, if any.
    async fn first_at_or_after(
        &self,
        known: &Topic,
        stream: &js_stream::Stream<()>,
        partition: u32,
        from: u64,
    ) -> Result<Option<u64>, BrokerError> {
        match stream
            .raw_message_builder()
            .next_by_subject(known.subject(partition))
            .sequence(from.max(1))
            .send()
            .await
        {
            Ok(message) => Ok(Some(message.sequence)),
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(raw_message_error(&known.name, err)),
        }
    }

    async fn topic_stats(&self, topic: &str) -> Result<TopicStats, BrokerError> {
        let known = self.topic(topic).await?;
        let stream = self.stream_handle(&known).await?;
        let mut with_subjects = stream
            .info_builder()
            .subjects(format!("{}.*", known.subjects))
            .fetch()
            .await
            .map_err(|err| request_error(topic, "reading the stream", err))?;
        let state = with_subjects.info.state.clone();
        let mut counts: HashMap<String, u64> = HashMap::new();
        while let Some(entry) = with_subjects.next().await {
            let (subject, count) =
                entry.map_err(|err| request_error(topic, "reading the stream", err))?;
            counts.insert(subject, u64::try_from(count).unwrap_or(u64::MAX));
        }
        let end_offset = state.last_sequence.saturating_add(1);

        let mut partitions = Vec::with_capacity(known.partitions as usize);
        for partition in 0..known.partitions {
            let records = counts.get(&known.subject(partition)).copied().unwrap_or(0);
            let start_offset = if records == 0 {
                end_offset
            } else {
                self.first_at_or_after(&known, &stream, partition, state.first_sequence)
                    .await?
                    .unwrap_or(end_offset)
            };
            partitions.push(PartitionStats {
                partition,
                start_offset,
                end_offset,
                records,
                bytes: share(state.bytes, records, state.messages),
            });
        }

        let mut groups = Vec::new();
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let info =
                info.map_err(|err| chain_error(topic, "listing the consumer groups", &err))?;
            let Some(meta) = info
                .config
                .description
                .as_deref()
                .and_then(|description| serde_json::from_str::<ConsumerMeta>(description).ok())
            else {
                continue;
            };
            if meta.partition >= known.partitions {
                continue;
            }
            let lag = info
                .num_pending
                .saturating_add(u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX));
            let next_offset = if lag == 0 {
                end_offset
            } else {
                let from = next_candidate(&info);
                self.first_at_or_after(&known, &stream, meta.partition, from)
                    .await?
                    .unwrap_or(end_offset)
            };
            groups.push(GroupStats {
                group: meta.flotilla_group,
                partition: meta.partition,
                next_offset,
                lag,
            });
        }
        groups.sort_by(|a, b| (&a.group, a.partition).cmp(&(&b.group, b.partition)));

        Ok(TopicStats {
            topic: topic.to_owned(),
            partitions,
            groups,
        })
    }
}

impl Broker for JetStream {
    fn create_topic<'a>(
        &'a self,
        config: &'a TopicConfig,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.create(config))
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: Option<&'a str>,
        event: Bytes,
    ) -> BoxFuture<'a, Result<Published, BrokerError>> {
        Box::pin(async move {
            let result = self.publish_to(topic, key, event).await;
            self.unless_gone(topic, result)
        })
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Record>, BrokerError>> {
        Box::pin(async move {
            let result = self.read_from(topic, partition, from, max).await;
            self.unless_gone(topic, result)
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        partition: u32,
        _max_attempts: u32,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>, BrokerError>> {
        // `max_attempts` is the engine's to enforce (see `consumer_config`): nothing to pass on.
        Box::pin(async move {
            let result = self.subscribe_to(topic, group, partition).await;
            self.unless_gone(topic, result)
        })
    }

    fn seek<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        partition: u32,
        offset: u64,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let result = self.seek_to(topic, group, partition, offset).await;
            self.unless_gone(topic, result)
        })
    }

    fn offset_at<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        time: SystemTime,
    ) -> BoxFuture<'a, Result<u64, BrokerError>> {
        Box::pin(async move {
            let result = self.offset_at_time(topic, partition, time).await;
            self.unless_gone(topic, result)
        })
    }

    fn stats<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<TopicStats, BrokerError>> {
        Box::pin(async move {
            let result = self.topic_stats(topic).await;
            self.unless_gone(topic, result)
        })
    }
}

/// One group's reader of one partition.
struct JetStreamConsumer {
    topic: String,
    partition: u32,
    consumer: PullConsumer,
    /// The pull request waiting for a record, kept across cancelled `next` calls so that a
    /// record it brings is not lost to an abandoned inbox.
    pull: Option<Batch>,
    /// Delivered and neither acknowledged nor refused yet.
    current: Option<jetstream::Message>,
}

impl JetStreamConsumer {
    async fn next_delivery(&mut self) -> Result<Delivery, BrokerError> {
        if let Some(unfinished) = self.current.take() {
            // `next` without `ack` or `nack`: the record is handed out again at once rather
            // than after the acknowledgement wait.
            self.settle(&unfinished, AckKind::Nak(None)).await?;
        }
        loop {
            let batch = match self.pull.as_mut() {
                Some(batch) => batch,
                None => {
                    let batch = self
                        .consumer
                        .batch()
                        .max_messages(1)
                        .expires(PULL_EXPIRES)
                        .messages()
                        .await
                        .map_err(|err| self.pull_error(err))?;
                    self.pull.insert(batch)
                }
            };
            match batch.next().await {
                Some(Ok(message)) => {
                    self.pull = None;
                    let delivery = self.delivery(&message)?;
                    self.current = Some(message);
                    return Ok(delivery);
                }
                Some(Err(err)) => {
                    self.pull = None;
                    return Err(self.pull_error(err));
                }
                // The request expired with nothing to deliver: ask again.
                None => self.pull = None,
            }
        }
    }

    fn delivery(&self, message: &jetstream::Message) -> Result<Delivery, BrokerError> {
        let info = message.info().map_err(|err| {
            BrokerError::Corrupt(format!(
                "a delivery of `{}` has no JetStream metadata: {err}",
                self.topic
            ))
        })?;
        Ok(Delivery {
            record: Record {
                partition: self.partition,
                offset: info.stream_sequence,
                time: system_time(info.published),
                event: message.payload.clone(),
            },
            attempt: u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
        })
    }

    fn pull_error(&self, err: impl Display) -> BrokerError {
        BrokerError::Unavailable(format!(
            "waiting for records of `{}` partition {}: {err}",
            self.topic, self.partition
        ))
    }

    /// Sends the acknowledgement and waits for the server to confirm it: an `ack` that
    /// returned is a position the group keeps after a crash.
    async fn settle(&self, message: &jetstream::Message, kind: AckKind) -> Result<(), BrokerError> {
        message.double_ack_with(kind).await.map_err(|err| {
            BrokerError::Unavailable(format!(
                "acknowledging a record of `{}` partition {}: {err}",
                self.topic, self.partition
            ))
        })
    }

    async fn finish(&mut self, kind: AckKind) -> Result<(), BrokerError> {
        // Nothing delivered, nothing to settle: a repeated `ack` is harmless.
        let Some(message) = self.current.take() else {
            return Ok(());
        };
        if let Err(err) = self.settle(&message, kind).await {
            // Unconfirmed: keep the record so a retried `ack`/`nack` can reach the server.
            self.current = Some(message);
            return Err(err);
        }
        Ok(())
    }
}

/// A consumer dropped with a record out (the delivery task restarting, a replay) hands it back
/// at once, so the group's next consumer gets it without waiting out the acknowledgement wait.
/// After a crash nothing runs here, and JetStream redelivers after `ack_wait` instead.
impl Drop for JetStreamConsumer {
    fn drop(&mut self) {
        let Some(message) = self.current.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
                    tracing::debug!("handing back an unsettled record failed: {err}");
                }
            });
        }
    }
}

impl Consumer for JetStreamConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>> {
        Box::pin(self.next_delivery())
    }

    fn ack(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(self.finish(AckKind::Ack))
    }

    fn nack(&mut self, delay: Duration) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(self.finish(AckKind::Nak(Some(delay))))
    }
}

/// Characters NATS allows in stream and consumer names and subject tokens, everything else `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .take(MAX_NAME_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// FNV-1a, folded to 32 bits: stable across processes and versions, since it is part of the
/// names stored on the server.
fn short_hash(name: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:08x}", (hash ^ (hash >> 32)) as u32)
}

fn consumer_name(group: &str, partition: u32) -> String {
    format!("{}_{}_{partition}", sanitize(group), short_hash(group))
}

/// The topic's limit is per partition, JetStream's per stream: the stream holds the sum, so a
/// busy partition may use more than its share while others are small.
fn stream_max_bytes(per_partition: Option<u64>, partitions: u32) -> i64 {
    match per_partition {
        Some(bytes) => {
            i64::try_from(bytes.saturating_mul(u64::from(partitions))).unwrap_or(i64::MAX)
        }
        None => -1,
    }
}

/// The server reports "no limit" as -1 or 0 depending on how the stream was made.
fn normalize_limit(limit: i64) -> i64 {
    if limit <= 0 { -1 } else { limit }
}

fn stream_meta(topic: &str, config: &js_stream::Config) -> Result<StreamMeta, BrokerError> {
    let meta = config
        .description
        .as_deref()
        .and_then(|description| serde_json::from_str::<StreamMeta>(description).ok())
        .ok_or_else(|| {
            BrokerError::Corrupt(format!(
                "stream `{}` exists but was not made by Flotilla for topic `{topic}`",
                config.name
            ))
        })?;
    if meta.flotilla_topic != topic {
        return Err(BrokerError::Corrupt(format!(
            "stream `{}` holds topic `{}`, not `{topic}`",
            config.name, meta.flotilla_topic
        )));
    }
    Ok(meta)
}

/// Where a group's next record is at or after. With one record in flight, an unacknowledged
/// record is the one after the acknowledged floor; otherwise the next is past the last
/// delivered, or past the start a seek set.
fn next_candidate(info: &js_consumer::Info) -> u64 {
    let after = if info.num_ack_pending > 0 {
        info.ack_floor.stream_sequence
    } else {
        info.delivered.stream_sequence
    };
    let start = match info.config.deliver_policy {
        DeliverPolicy::ByStartSequence { start_sequence } => start_sequence,
        _ => 1,
    };
    after.saturating_add(1).max(start)
}

/// JetStream counts bytes per stream only: a partition is given the share its record count
/// has.
fn share(total: u64, part: u64, whole: u64) -> u64 {
    if whole == 0 {
        return 0;
    }
    let share = u128::from(total) * u128::from(part) / u128::from(whole);
    u64::try_from(share).unwrap_or(u64::MAX)
}

fn stored_record(partition: u32, message: StreamMessage) -> Record {
    Record {
        partition,
        offset: message.sequence,
        time: system_time(message.time),
        event: message.payload,
    }
}

fn system_time(time: async_nats::datetime::DateTime) -> SystemTime {
    u64::try_from(time.unix_timestamp_nanos())
        .ok()
        .and_then(|nanos| UNIX_EPOCH.checked_add(Duration::from_nanos(nanos)))
        .unwrap_or(UNIX_EPOCH)
}

fn unavailable(what: &str, err: impl Display) -> BrokerError {
    BrokerError::Unavailable(format!("{what}: {err}"))
}

/// What a JetStream API error means to a caller.
fn api_error(topic: &str, what: &str, err: &jetstream::Error) -> BrokerError {
    let code = err.error_code();
    if code == ErrorCode::STREAM_NOT_FOUND {
        BrokerError::UnknownTopic(topic.to_owned())
    } else if [
        ErrorCode::STORAGE_RESOURCES_EXCEEDED,
        ErrorCode::INSUFFICIENT_RESOURCES,
        ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
        ErrorCode::MEMORY_RESOURCES_EXCEEDED,
    ]
    .contains(&code)
        || (code == ErrorCode::STREAM_STORE_FAILED && mentions_full(&err.to_string()))
    {
        BrokerError::Full(format!("{what} `{topic}`: {err}"))
    } else if [
        ErrorCode::JETSTREAM_NOT_ENABLED,
        ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
        ErrorCode::CLUSTER_NOT_AVAILABLE,
        ErrorCode::CLUSTER_NOT_LEADER,
        ErrorCode::STREAM_OFFLINE,
        ErrorCode::CONSUMER_OFFLINE,
    ]
    .contains(&code)
    {
        BrokerError::Unavailable(format!("{what} `{topic}`: {err}"))
    } else {
        BrokerError::Io(std::io::Error::other(format!(
            "{what} `{topic}`: JetStream refused: {err}"
        )))
    }
}

fn mentions_full(description: &str) -> bool {
    let description = description.to_ascii_lowercase();
    ["no space", "space left", "resources", "disk full", "quota"]
        .iter()
        .any(|needle| description.contains(needle))
}

/// For errors that carry the JetStream API error, if any, as a source.
fn chain_error(topic: &str, what: &str, err: &(dyn std::error::Error + 'static)) -> BrokerError {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if let Some(api) = current.downcast_ref::<jetstream::Error>() {
            return api_error(topic, what, api);
        }
        cause = current.source();
    }
    unavailable(&format!("{what} `{topic}`"), err)
}

fn request_error(topic: &str, what: &str, err: RequestError) -> BrokerError {
    match err.kind() {
        RequestErrorKind::Other => chain_error(topic, what, &err),
        _ => unavailable(&format!("{what} `{topic}`"), err),
    }
}

fn is_stream_not_found(err: &GetStreamError) -> bool {
    matches!(err.kind(), GetStreamErrorKind::JetStream(api) if api.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

fn get_stream_error(topic: &str, err: GetStreamError) -> BrokerError {
    match err.kind() {
        GetStreamErrorKind::JetStream(api) => api_error(topic, "looking up the stream of", &api),
        GetStreamErrorKind::Request => unavailable(&format!("looking up topic `{topic}`"), err),
        GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => {
            BrokerError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("topic `{topic}` has no valid stream name: {err}"),
            ))
        }
    }
}

fn is_name_in_use(err: &CreateStreamError) -> bool {
    matches!(err.kind(), CreateStreamErrorKind::JetStream(api) if api.error_code() == ErrorCode::STREAM_NAME_EXIST)
}

fn create_stream_error(topic: &str, err: CreateStreamError) -> BrokerError {
    match err.kind() {
        CreateStreamErrorKind::JetStream(api) => api_error(topic, "creating the stream of", &api),
        CreateStreamErrorKind::NotFound => BrokerError::UnknownTopic(topic.to_owned()),
        CreateStreamErrorKind::JetStreamUnavailable
        | CreateStreamErrorKind::TimedOut
        | CreateStreamErrorKind::Response
        | CreateStreamErrorKind::ResponseParse => {
            unavailable(&format!("creating the stream of `{topic}`"), err)
        }
        CreateStreamErrorKind::EmptyStreamName
        | CreateStreamErrorKind::InvalidStreamName
        | CreateStreamErrorKind::DomainAndExternalSet => BrokerError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("creating the stream of `{topic}`: {err}"),
        )),
    }
}

fn publish_error(topic: &str, err: PublishError) -> BrokerError {
    match err.kind() {
        PublishErrorKind::StreamNotFound => BrokerError::UnknownTopic(topic.to_owned()),
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => unavailable(&format!("publishing to `{topic}`"), err),
        PublishErrorKind::MaxPayloadExceeded => BrokerError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("publishing to `{topic}`: {err}"),
        )),
        PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence
        | PublishErrorKind::Other => chain_error(topic, "publishing to", &err),
    }
}

fn raw_message_error(topic: &str, err: RawMessageError) -> BrokerError {
    match err.kind() {
        RawMessageErrorKind::JetStream(api) => api_error(topic, "reading", &api),
        RawMessageErrorKind::NoMessageFound
        | RawMessageErrorKind::InvalidSubject
        | RawMessageErrorKind::Other => chain_error(topic, "reading", &err),
    }
}

fn consumer_error_code(err: &ConsumerError) -> Option<ErrorCode> {
    match err.kind() {
        ConsumerErrorKind::JetStream(api) => Some(api.error_code()),
        _ => None,
    }
}

fn consumer_error(topic: &str, err: ConsumerError) -> BrokerError {
    match err.kind() {
        ConsumerErrorKind::JetStream(api) => api_error(topic, "a consumer group of", &api),
        ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => {
            unavailable(&format!("a consumer group of `{topic}`"), err)
        }
        ConsumerErrorKind::InvalidConsumerType
        | ConsumerErrorKind::InvalidName
        | ConsumerErrorKind::Other => chain_error(topic, "a consumer group of", &err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_and_apart() {
        assert_eq!(sanitize("order.placed"), "order_placed");
        assert_eq!(sanitize("a b*c>d"), "a_b_c_d");
        assert_ne!(short_hash("a.b"), short_hash("a_b"));
        // Pinned: the hash is part of the names stored on the server.
        assert_eq!(short_hash("order.placed"), "d808fe8d");
        assert_eq!(short_hash(""), "4fd0bfc1");
        assert_eq!(consumer_name("billing", 3).rsplit('_').next(), Some("3"));
        assert!(!consumer_name("a.b c", 0).contains(['.', ' ', '*', '>']));
    }

    #[test]
    fn limits() {
        assert_eq!(stream_max_bytes(None, 4), -1);
        assert_eq!(stream_max_bytes(Some(100), 4), 400);
        assert_eq!(stream_max_bytes(Some(u64::MAX), 4), i64::MAX);
        assert_eq!(normalize_limit(0), -1);
        assert_eq!(share(1000, 1, 4), 250);
        assert_eq!(share(1000, 0, 0), 0);
    }
}
