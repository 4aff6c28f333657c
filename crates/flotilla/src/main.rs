//! `flotilla`: the command line. Parses arguments, sets up logging and the runtime, and hands
//! over to one module per command; the real work lives in the crates under `crates/`.

mod chaos;
mod check;
mod cli;
mod client;
mod events;
mod fleet;
mod logs;
mod map;
mod output;
mod saga_cli;
mod sagas;
mod sidecar;
mod status;
mod telemetry;
mod topics;
mod traces;
mod up;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Down(args) => up::down(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Logs(args) => logs::run(args).await,
            Command::Check(args) => check::run(args),
            Command::Chaos(args) => chaos::run(args).await,
            Command::Traces(args) => traces::list(args).await,
            Command::Trace(args) => traces::show(args).await,
            Command::Map(args) => map::run(args).await,
            Command::Sidecar(args) => sidecar::run(args).await,
            Command::Publish(args) => topics::publish(args).await,
            Command::Events(args) => topics::run(args).await,
            Command::Saga(args) => saga_cli::run(args).await,
            Command::HashKey { key } => hash_key(key),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            output::error(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Flotilla's own diagnostics go to stderr, so stdout stays data (service logs, listings).
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FLOTILLA_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .compact()
        .init();
}

/// `flotilla hash-key`: the digest the manifest holds instead of the key itself.
fn hash_key(key: Option<String>) -> anyhow::Result<ExitCode> {
    let key = match key {
        Some(key) => key,
        None => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if key.is_empty() {
        anyhow::bail!("the key is empty\n  help: pass it as an argument or on stdin");
    }
    println!("{}", flotilla_gateway::auth::hash_key(&key));
    Ok(ExitCode::SUCCESS)
}
