//! `flotilla publish` and `flotilla events`: the topics as the control API shows them.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use flotilla_control::events::{PublishedEvent, Redriven, ReplayRequest, StoredEvent};
use flotilla_events::engine::TopicOverview;
use flotilla_events::{Published, dead_letter_topic};
use serde_json::Value;

use crate::cli::{EventsArgs, EventsCommand, PublishArgs};
use crate::client::{Control, encode};
use crate::output;

pub async fn publish(args: PublishArgs) -> Result<ExitCode> {
    let control = Control::locate(&args.target.dir, args.target.control.as_deref())?;
    let value: Value = serde_json::from_str(&args.json)
        .with_context(|| format!("the event is not JSON: {}", args.json))?;
    // A whole CloudEvent is sent as it is; anything else is the data of a new one.
    let event = if value.get("specversion").is_some() {
        value
    } else {
        let mut event = serde_json::json!({
            "specversion": "1.0",
            "type": args.kind,
            "source": "/cli",
            "datacontenttype": "application/json",
            "data": value,
        });
        if let Some(subject) = &args.subject {
            event["subject"] = Value::String(subject.clone());
        }
        event
    };
    let published: PublishedEvent = control
        .post_body(
            &format!("/v1/topics/{}/events", encode(&args.topic)),
            flotilla_events::cloudevent::STRUCTURED,
            serde_json::to_vec(&event)?,
        )
        .await?;
    println!(
        "published {} to {} partition {} offset {}",
        published.id, published.topic, published.partition, published.offset
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn run(args: EventsArgs) -> Result<ExitCode> {
    let control = Control::locate(&args.target.dir, args.target.control.as_deref())?;
    match args.command {
        None => overview(&control, args.json).await,
        Some(EventsCommand::Tail {
            topic,
            partition,
            last,
            no_follow,
        }) => tail(&control, &topic, partition, last, !no_follow, args.json).await,
        Some(EventsCommand::Replay {
            topic,
            service,
            from,
        }) => {
            let request = ReplayRequest {
                service,
                from_offset: from.parse().ok(),
                from_time: from.parse::<u64>().is_err().then_some(from),
            };
            let positions: Vec<Published> = control
                .post_body(
                    &format!("/v1/topics/{}/replay", encode(&topic)),
                    "application/json",
                    serde_json::to_vec(&request)?,
                )
                .await?;
            for position in positions {
                println!(
                    "{} will receive {topic} partition {} from offset {}",
                    request.service, position.partition, position.offset
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(EventsCommand::Redrive { topic }) => {
            if !topic.ends_with(".dlq") {
                bail!(
                    "redrive a dead-letter topic: `{}`",
                    dead_letter_topic(&topic)
                );
            }
            let done: Redriven = control
                .post_body(
                    &format!("/v1/topics/{}/redrive", encode(&topic)),
                    "application/json",
                    Vec::new(),
                )
                .await?;
            println!("redrove {} events of {}", done.redriven, done.topic);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn overview(control: &Control, json: bool) -> Result<ExitCode> {
    let topics: Vec<TopicOverview> = control.get("/v1/topics").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&topics)?);
        return Ok(ExitCode::SUCCESS);
    }
    if topics.is_empty() {
        println!("no topics; declare them as [topics.\"NAME\"] in flotilla.toml");
        return Ok(ExitCode::SUCCESS);
    }
    let colour = output::stdout_is_terminal();
    let mut rows = Vec::new();
    for topic in &topics {
        let ends: Vec<String> = topic
            .partitions
            .iter()
            .map(|p| p.end_offset.to_string())
            .collect();
        let dead = if topic.dead_letters > 0 {
            output::red(&topic.dead_letters.to_string(), colour)
        } else {
            "0".to_owned()
        };
        rows.push(vec![
            topic.topic.clone(),
            topic.partitions.len().to_string(),
            ends.join(","),
            topic
                .partitions
                .iter()
                .map(|p| p.records)
                .sum::<u64>()
                .to_string(),
            dead,
        ]);
    }
    print!(
        "{}",
        output::table(
            &[
                "TOPIC",
                "PARTITIONS",
                "END OFFSETS",
                "EVENTS",
                "DEAD LETTERS"
            ],
            &rows
        )
    );
    let mut subscribers = Vec::new();
    for topic in &topics {
        for s in &topic.subscribers {
            subscribers.push(vec![
                topic.topic.clone(),
                s.service.clone(),
                s.path.clone(),
                s.lag.to_string(),
                s.delivered.to_string(),
                s.dead_lettered.to_string(),
            ]);
        }
    }
    if !subscribers.is_empty() {
        println!();
        print!(
            "{}",
            output::table(
                &[
                    "TOPIC",
                    "SUBSCRIBER",
                    "PATH",
                    "LAG",
                    "DELIVERED",
                    "DEAD-LETTERED"
                ],
                &subscribers
            )
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// How often `tail` looks for new events.
const TAIL_EVERY: Duration = Duration::from_millis(250);

async fn tail(
    control: &Control,
    topic: &str,
    partition: Option<u32>,
    last: u64,
    follow: bool,
    json: bool,
) -> Result<ExitCode> {
    let overview: TopicOverview = control
        .get(&format!("/v1/topics/{}", encode(topic)))
        .await?;
    let mut next: BTreeMap<u32, u64> = overview
        .partitions
        .iter()
        .filter(|p| partition.is_none_or(|only| only == p.partition))
        .map(|p| {
            let from = p.end_offset.saturating_sub(last).max(p.start_offset);
            (p.partition, from)
        })
        .collect();
    if next.is_empty() {
        bail!(
            "topic `{topic}` has no partition {}",
            partition.unwrap_or(0)
        );
    }
    let stdout = std::io::stdout();
    loop {
        let mut any = false;
        for (partition, from) in next.iter_mut() {
            let events: Vec<StoredEvent> = control
                .get(&format!(
                    "/v1/topics/{}/events?partition={partition}&from={from}&limit=500",
                    encode(topic)
                ))
                .await?;
            let mut out = stdout.lock();
            for stored in &events {
                any = true;
                *from = stored.offset + 1;
                let line = if json {
                    serde_json::to_string(stored)?
                } else {
                    format!(
                        "{} p{}@{}  {}  {}",
                        humantime::format_rfc3339_millis(stored.time),
                        stored.partition,
                        stored.offset,
                        stored.event["type"].as_str().unwrap_or("?"),
                        stored
                            .event
                            .get("data")
                            .map(Value::to_string)
                            .unwrap_or_default()
                    )
                };
                if let Err(e) = writeln!(out, "{line}")
                    && e.kind() == std::io::ErrorKind::BrokenPipe
                {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            let _ = out.flush();
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        if !any {
            tokio::time::sleep(TAIL_EVERY).await;
        }
    }
}
