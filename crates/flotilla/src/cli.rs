//! The command line's shape.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Run a fleet of microservices from one binary"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build and start every service of an app, with its gateway and control API
    Up(UpArgs),
    /// Stop a fleet started with `up -d`
    Down(DownArgs),
    /// Show every service and instance
    Status(StatusArgs),
    /// Show the services' captured logs
    Logs(LogsArgs),
    /// Validate a manifest without starting anything
    Check(CheckArgs),
}

/// Where to find a running fleet's control API.
#[derive(Debug, Args, Clone)]
pub struct Target {
    /// The app directory whose fleet to talk to
    #[arg(long = "dir", short = 'C', default_value = ".", value_name = "DIR")]
    pub dir: PathBuf,
    /// The control API's URL, instead of looking it up in DIR
    #[arg(long, env = "FLOTILLA_CONTROL", value_name = "URL")]
    pub control: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// The app directory holding flotilla.toml
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Run in the background; return once every service is healthy
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Listen address of the gateway, overriding `[gateway] listen` (port 0 picks a free port)
    #[arg(long, value_name = "ADDR")]
    pub gateway_listen: Option<SocketAddr>,
    /// Listen address of the control API, overriding `[control] listen` (port 0 picks a free port)
    #[arg(long, value_name = "ADDR")]
    pub control_listen: Option<SocketAddr>,
    /// Skip the services' build commands
    #[arg(long)]
    pub no_build: bool,
    /// Internal: this process is the background half of `up -d`
    #[arg(long, hide = true)]
    pub detached_child: bool,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// The app directory whose fleet to stop
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// The control API's URL, instead of looking it up in DIR
    #[arg(long, env = "FLOTILLA_CONTROL", value_name = "URL")]
    pub control: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// One JSON array of instances instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Only this service's lines
    pub service: Option<String>,
    #[command(flatten)]
    pub target: Target,
    /// Keep following new lines
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only lines newer than this (`30s`, `5m`, `2h`) or an RFC 3339 time
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// At most this many of the newest lines
    #[arg(long, short = 'n', value_name = "N")]
    pub limit: Option<usize>,
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The app directory holding flotilla.toml, or the manifest file
    #[arg(default_value = ".")]
    pub dir: PathBuf,
}
