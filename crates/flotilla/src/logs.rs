//! `flotilla logs`: the services' captured lines, optionally followed.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use flotilla_telemetry::LogRecord;

use crate::cli::LogsArgs;
use crate::client::{Control, encode};
use crate::output;

pub async fn run(args: LogsArgs) -> Result<ExitCode> {
    let control = Control::locate(&args.target.dir, args.target.control.as_deref())?;
    let mut query = Vec::new();
    if let Some(service) = &args.service {
        query.push(format!("service={}", encode(service)));
    }
    if let Some(since) = &args.since {
        query.push(format!("since={}", encode(since)));
    }
    if let Some(limit) = args.limit {
        query.push(format!("limit={limit}"));
    }
    for (key, value) in [
        ("grep", &args.grep),
        ("level", &args.level),
        ("trace", &args.trace),
    ] {
        if let Some(value) = value {
            query.push(format!("{key}={}", encode(value)));
        }
    }
    if args.follow {
        query.push("follow=true".into());
    }
    let path = format!("/v1/logs?{}", query.join("&"));
    let width = 20;
    let stdout = std::io::stdout();
    if !args.follow {
        let records: Vec<LogRecord> = control.get(&path).await?;
        let mut out = stdout.lock();
        for record in &records {
            print_record(&mut out, record, args.json, width)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut response = control.stream(&path).await?;
    let mut pending = Vec::new();
    while let Some(chunk) = response.chunk().await.context("the log stream broke off")? {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let record: LogRecord =
                serde_json::from_slice(&line).context("the control API sent a bad log record")?;
            let mut out = stdout.lock();
            print_record(&mut out, &record, args.json, width)?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_record(out: &mut impl Write, record: &LogRecord, json: bool, width: usize) -> Result<()> {
    let result = if json {
        writeln!(out, "{}", serde_json::to_string(record)?)
    } else {
        writeln!(out, "{}", output::log_line(record, width, true))
    };
    match result {
        // A closed pipe (`flotilla logs | head`) is the reader saying it has enough.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => Ok(other?),
    }
}
