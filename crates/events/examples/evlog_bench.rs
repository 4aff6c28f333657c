//! Publish throughput of the embedded log, informally: N producers publishing back to back to
//! one topic for a few seconds, with `fsync = always` (group commit) and with an interval.
//!
//! `cargo run --release -p flotilla-events --example evlog_bench -- [DIR] [SECONDS]`
//! (DIR defaults to a temporary directory: put it on the disk you care about.)

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_events::log::{EventLog, FsyncPolicy, LogConfig};
use flotilla_events::{Broker, TopicConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let scratch = tempfile::tempdir()?;
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.path().to_owned());
    let seconds: u64 = args.next().map_or(Ok(3), |s| s.parse())?;
    let payload = Bytes::from(format!(
        "{{\"specversion\":\"1.0\",\"id\":\"x\",\"source\":\"/bench\",\"type\":\"bench\",\
         \"data\":\"{}\"}}",
        "x".repeat(400)
    ));
    println!(
        "{} byte events, {seconds} s per run, in {}",
        payload.len(),
        dir.display()
    );
    let policies = [
        ("always", FsyncPolicy::Always),
        (
            "interval 100ms",
            FsyncPolicy::Interval(Duration::from_millis(100)),
        ),
    ];
    for (label, fsync) in policies {
        for (partitions, producers) in [(1, 1), (1, 16), (4, 16), (4, 64)] {
            let run = dir.join(format!(
                "run-{}-{partitions}-{producers}",
                label.replace(' ', "-")
            ));
            let log = EventLog::open(
                &run,
                LogConfig {
                    fsync,
                    ..LogConfig::default()
                },
            )
            .await?;
            log.create_topic(&TopicConfig {
                name: "bench".into(),
                partitions,
                retention: None,
                max_bytes: None,
            })
            .await?;
            let stop = Arc::new(AtomicBool::new(false));
            let done = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for producer in 0..producers {
                let (log, stop, done, payload) =
                    (log.clone(), stop.clone(), done.clone(), payload.clone());
                tasks.push(tokio::spawn(async move {
                    let key = format!("producer-{producer}");
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(e) = log.publish("bench", Some(&key), payload.clone()).await {
                            eprintln!("publish failed: {e}");
                            return;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            stop.store(true, Ordering::Relaxed);
            for task in tasks {
                task.await?;
            }
            let elapsed = started.elapsed().as_secs_f64();
            let counters = log.counters();
            println!(
                "fsync {label:<14} {partitions} partition(s) {producers:>2} producer(s): \
                 {:>8.0} publishes/s, {:>6.0} fsyncs/s, {:>5.1} records per write",
                done.load(Ordering::Relaxed) as f64 / elapsed,
                counters.fsyncs as f64 / elapsed,
                counters.records as f64 / counters.commits.max(1) as f64,
            );
            drop(log);
            std::fs::remove_dir_all(&run)?;
        }
    }
    Ok(())
}
