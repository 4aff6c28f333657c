//! `flotilla saga start|show|list`: sagas as the control API shows them.

use std::io::Read;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use flotilla_control::sagas::{SagaItem, SagaView, StartedSaga};
use flotilla_saga::Status;
use flotilla_saga::engine::CallView;
use serde_json::Value;

use crate::cli::{SagaArgs, SagaCommand};
use crate::client::{Control, encode};
use crate::output;

pub async fn run(args: SagaArgs) -> Result<ExitCode> {
    let control = Control::locate(&args.target.dir, args.target.control.as_deref())?;
    match args.command {
        SagaCommand::Start {
            name,
            input,
            key,
            wait,
        } => start(&control, &name, input.as_deref(), key, wait, args.json).await,
        SagaCommand::Show { id, wait } => {
            let saga = fetch(&control, &id, wait).await?;
            print(&saga, args.json)?;
            Ok(ExitCode::SUCCESS)
        }
        SagaCommand::List {
            status,
            name,
            limit,
        } => {
            let mut path = format!("/v1/sagas?limit={limit}");
            if let Some(status) = status {
                path.push_str(&format!("&status={}", status.as_str()));
            }
            if let Some(name) = name {
                path.push_str(&format!("&name={}", encode(&name)));
            }
            let sagas: Vec<SagaItem> = control.get(&path).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&sagas)?);
            } else {
                print!("{}", list_table(&sagas, output::stdout_is_terminal()));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The input as given: a file, stdin, or JSON on the command line.
fn read_input(input: Option<&str>) -> Result<Value> {
    let text = match input {
        None => return Ok(Value::Object(Default::default())),
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the input from stdin")?;
            text
        }
        Some(arg) if std::path::Path::new(arg).is_file() => std::fs::read_to_string(arg)
            .with_context(|| format!("cannot read the input file {arg}"))?,
        Some(arg) if arg.trim_start().starts_with(['{', '[']) => arg.to_owned(),
        Some(arg) => bail!(
            "no file {arg}\n  help: give the input as a JSON file, `-` for stdin, or JSON like '{{\"order_id\": \"o1\"}}'"
        ),
    };
    serde_json::from_str(&text).context("the input is not JSON")
}

async fn start(
    control: &Control,
    name: &str,
    input: Option<&str>,
    key: Option<String>,
    wait: Option<Duration>,
    json: bool,
) -> Result<ExitCode> {
    let input = read_input(input)?;
    let started: StartedSaga = control
        .post_with_headers(
            &format!("/v1/sagas/{}", encode(name)),
            "application/json",
            serde_json::to_vec(&input)?,
            key.as_deref().map(|k| ("idempotency-key", k)),
        )
        .await?;
    let Some(wait) = wait else {
        if json {
            println!("{}", serde_json::to_string_pretty(&started)?);
        } else if started.created {
            println!("started saga {} ({name})", started.id);
        } else {
            println!(
                "saga {} ({name}) was already started with this key; it is {}",
                started.id, started.status
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    let saga = fetch(control, &started.id, Some(wait)).await?;
    print(&saga, json)?;
    Ok(if saga.item.status == Status::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn fetch(control: &Control, id: &str, wait: Option<Duration>) -> Result<SagaView> {
    let mut path = format!("/v1/sagas/{}", encode(id));
    if let Some(wait) = wait {
        // The API holds a wait to a minute at most; longer waits ask again.
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let chunk = left.min(Duration::from_secs(60));
            let saga: SagaView = control
                .get(&format!("{path}?wait={}ms", chunk.as_millis().max(1)))
                .await?;
            if saga.item.status.is_final() || left <= chunk {
                return Ok(saga);
            }
        }
    }
    path.shrink_to_fit();
    control.get(&path).await
}

fn print(saga: &SagaView, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(saga)?);
    } else {
        print!("{}", timeline(saga, output::stdout_is_terminal()));
    }
    Ok(())
}

fn status_word(status: Status, colour: bool) -> String {
    match status {
        Status::Completed | Status::Compensated => output::green(status.as_str(), colour),
        Status::Running | Status::Compensating => output::yellow(status.as_str(), colour),
        Status::Failed => output::red(status.as_str(), colour),
    }
}

fn elapsed(from: SystemTime, to: SystemTime) -> String {
    output::duration(to.duration_since(from).unwrap_or_default())
}

/// The saga's head, then a line per call: the steps in order, each with its compensation.
pub fn timeline(saga: &SagaView, colour: bool) -> String {
    let item = &saga.item;
    let mut out = format!(
        "saga {}  {}  {}  started {}, {} {}\n",
        item.id,
        item.name,
        status_word(item.status, colour),
        output::local_time(item.created_at),
        if item.status.is_final() {
            "took"
        } else {
            "running for"
        },
        elapsed(
            item.created_at,
            if item.status.is_final() {
                item.updated_at
            } else {
                SystemTime::now()
            }
        ),
    );
    if let Some(error) = &item.error {
        let status = error.status.map(|s| format!(" ({s})")).unwrap_or_default();
        let line = format!("{}: {}{status}", error.step, error.message);
        let label = if item.status == Status::Failed {
            "NOT UNDONE"
        } else {
            "why"
        };
        out.push_str(&format!("{label}: {}\n", output::red(&line, colour)));
    }
    out.push('\n');
    let mut rows = Vec::new();
    for (index, step) in saga.steps.iter().enumerate() {
        rows.push(call_row(
            format!("{}", index + 1),
            &step.name,
            "action",
            &step.action,
            colour,
        ));
        if let Some(compensate) = &step.compensate
            && compensate.status != "pending"
        {
            rows.push(call_row(
                String::new(),
                "",
                "compensate",
                compensate,
                colour,
            ));
        }
    }
    out.push_str(&output::table(
        &[
            "#", "STEP", "CALL", "STATUS", "HTTP", "TRIES", "TOOK", "ERROR",
        ],
        &rows,
    ));
    out
}

fn call_row(number: String, step: &str, phase: &str, call: &CallView, colour: bool) -> Vec<String> {
    let status = match call.status.as_str() {
        "succeeded" => output::green(&call.status, colour),
        "failed" => output::red(&call.status, colour),
        "running" | "retrying" => output::yellow(&call.status, colour),
        other => other.to_owned(),
    };
    vec![
        number,
        step.to_owned(),
        phase.to_owned(),
        status,
        call.http_status.map(|s| s.to_string()).unwrap_or_default(),
        if call.attempts == 0 {
            String::new()
        } else {
            call.attempts.to_string()
        },
        call.duration_ms
            .map(|ms| output::millis(ms as f64))
            .unwrap_or_default(),
        call.error.clone().unwrap_or_default(),
    ]
}

fn list_table(sagas: &[SagaItem], colour: bool) -> String {
    if sagas.is_empty() {
        return "no sagas\n".into();
    }
    let rows: Vec<Vec<String>> = sagas
        .iter()
        .map(|saga| {
            vec![
                saga.id.clone(),
                saga.name.clone(),
                status_word(saga.status, colour),
                output::local_time(saga.created_at),
                elapsed(saga.created_at, saga.updated_at),
                saga.error
                    .as_ref()
                    .map(|e| format!("{}: {}", e.step, e.message))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    output::table(&["ID", "SAGA", "STATUS", "STARTED", "TOOK", "ERROR"], &rows)
}
