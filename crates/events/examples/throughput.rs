//! Publish throughput and publish-ack latency of a broker, for `bench/events.sh`.
//!
//!     throughput BACKEND FSYNC PRODUCERS EVENTS SIZE
//!
//! BACKEND is `embedded:DIR` or `nats:URL`; FSYNC is `always` or an interval (`100ms`, embedded
//! only). Every producer publishes EVENTS/PRODUCERS events of SIZE bytes of data to one topic of
//! one partition (so concurrent appends share a partition, and with `always` its fsyncs: group
//! commit), waiting for each acknowledgement; then everything is read back in batches of 1,000.
//! Prints one line of `key=value` figures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_events::log::{EventLog, FsyncPolicy, LogConfig};
use flotilla_events::nats::JetStream;
use flotilla_events::{Broker, TopicConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [backend, fsync, producers, events, size] = args.as_slice() else {
        return Err("usage: throughput BACKEND FSYNC PRODUCERS EVENTS SIZE".into());
    };
    let producers: usize = producers.parse()?;
    let events: usize = events.parse()?;
    let size: usize = size.parse()?;
    let broker: Arc<dyn Broker> = match backend.split_once(':') {
        Some(("embedded", dir)) => {
            let fsync = match fsync.as_str() {
                "always" => FsyncPolicy::Always,
                every => FsyncPolicy::Interval(humantime::parse_duration(every)?),
            };
            Arc::new(
                EventLog::open(
                    std::path::Path::new(dir),
                    LogConfig {
                        fsync,
                        ..LogConfig::default()
                    },
                )
                .await?,
            )
        }
        Some(("nats", url)) => Arc::new(JetStream::connect(url, "FLOTILLABENCH").await?),
        _ => return Err(format!("unknown backend {backend}").into()),
    };
    let topic = format!("bench.{}", fastrand::u32(..));
    broker
        .create_topic(&TopicConfig {
            name: topic.clone(),
            partitions: 1,
            retention: None,
            max_bytes: None,
        })
        .await?;
    let payload = format!(
        r#"{{"specversion":"1.0","type":"bench","source":"/bench","id":"x","data":"{}"}}"#,
        "x".repeat(size)
    );
    let payload = Bytes::from(payload);

    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let broker = broker.clone();
        let topic = topic.clone();
        let payload = payload.clone();
        let per = events / producers;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per);
            for _ in 0..per {
                let sent = Instant::now();
                broker.publish(&topic, None, payload.clone()).await?;
                latencies.push(sent.elapsed());
            }
            Ok::<_, flotilla_events::BrokerError>(latencies)
        }));
    }
    let mut latencies: Vec<Duration> = Vec::with_capacity(events);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let publish_secs = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let p = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];

    let consumed_at = Instant::now();
    let mut next = 0;
    let mut read = 0;
    while read < latencies.len() {
        let batch = broker.read(&topic, 0, next, 1_000).await?;
        let Some(last) = batch.last() else { break };
        next = last.offset + 1;
        read += batch.len();
    }
    let consume_secs = consumed_at.elapsed().as_secs_f64();
    println!(
        "published={} publish_per_s={:.0} p50_us={} p99_us={} consume_per_s={:.0}",
        latencies.len(),
        latencies.len() as f64 / publish_secs,
        p(0.50).as_micros(),
        p(0.99).as_micros(),
        latencies.len() as f64 / consume_secs,
    );
    Ok(())
}
