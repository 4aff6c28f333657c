//! The command line's shape.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

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
    /// Inject delays and errors into every call to a service, or list and clear them
    Chaos(ChaosArgs),
    /// List recent traces: one per request, with every hop it took
    Traces(TracesArgs),
    /// Show one trace as a waterfall of its hops
    Trace(TraceArgs),
    /// Show the application map: services, their health and the calls between them
    Map(MapArgs),
    /// Run one instance's sidecar as a separate process, fed by a fleet's control API
    Sidecar(SidecarArgs),
    /// Publish one event to a topic
    Publish(PublishArgs),
    /// Show topics, partitions, offsets, subscribers' lag and dead letters; tail, replay, redrive
    Events(EventsArgs),
    /// Start sagas, list them, and show a saga's timeline of steps and compensations
    Saga(SagaArgs),
    /// Print the SHA-256 digest of an API key, as `sha256` of a [gateway.auth.NAME] key
    HashKey {
        /// The key; read from stdin when absent (so it stays out of the shell's history)
        key: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct SagaArgs {
    #[command(subcommand)]
    pub command: SagaCommand,
    /// JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Subcommand)]
pub enum SagaCommand {
    /// Start a saga declared as [sagas.NAME]
    Start {
        name: String,
        /// The input: a JSON file, `-` for stdin, or JSON itself (default `{}`)
        input: Option<String>,
        /// An idempotency key: starting again with it returns the first saga
        #[arg(long)]
        key: Option<String>,
        /// Wait up to this long for the saga to finish, then show it (exit status 1 unless it
        /// completed)
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        wait: Option<Duration>,
    },
    /// Show a saga's timeline: each step and compensation with status, attempts, duration, error
    Show {
        id: String,
        /// Wait up to this long for the saga to finish first
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        wait: Option<Duration>,
    },
    /// List sagas, newest first
    List {
        /// Only sagas in this state
        #[arg(long, value_enum)]
        status: Option<SagaStatusArg>,
        /// Only sagas of this name
        #[arg(long)]
        name: Option<String>,
        /// At most this many
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SagaStatusArg {
    Running,
    Compensating,
    Completed,
    Compensated,
    Failed,
}

impl SagaStatusArg {
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatusArg::Running => "running",
            SagaStatusArg::Compensating => "compensating",
            SagaStatusArg::Completed => "completed",
            SagaStatusArg::Compensated => "compensated",
            SagaStatusArg::Failed => "failed",
        }
    }
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The topic, as declared under [topics."NAME"]
    pub topic: String,
    /// A CloudEvent as JSON (with `specversion`), or just its data (wrapped in an event of
    /// `--type`)
    pub json: String,
    /// The event type when JSON is only the data
    #[arg(long = "type", default_value = "flotilla.cli")]
    pub kind: String,
    /// The subject (and so the partition key) when JSON is only the data
    #[arg(long)]
    pub subject: Option<String>,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(subcommand)]
    pub command: Option<EventsCommand>,
    /// JSON instead of a table
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print a topic's events, oldest first, then follow new ones
    Tail {
        topic: String,
        /// Only this partition (all by default)
        #[arg(long)]
        partition: Option<u32>,
        /// Start this many events back from the end of each partition
        #[arg(long, short = 'n', default_value_t = 10)]
        last: u64,
        /// Print what is there and stop instead of following
        #[arg(long)]
        no_follow: bool,
    },
    /// Deliver a topic to one subscriber again, from an offset or a time
    Replay {
        topic: String,
        /// The subscribing service
        #[arg(long = "to", value_name = "SERVICE")]
        service: String,
        /// An offset (in every partition), an RFC 3339 time, or a duration back like `10m`
        #[arg(long, value_name = "OFFSET|TIME")]
        from: String,
    },
    /// Deliver a dead-letter topic's events to the subscribers they failed at
    Redrive {
        /// The dead-letter topic, `TOPIC.dlq`
        topic: String,
    },
}

/// Where to find a running fleet's control API.
#[derive(Debug, Args, Clone)]
pub struct Target {
    /// The app directory whose fleet to talk to
    #[arg(
        long = "dir",
        short = 'C',
        default_value = ".",
        value_name = "DIR",
        global = true
    )]
    pub dir: PathBuf,
    /// The control API's URL, instead of looking it up in DIR
    #[arg(long, env = "FLOTILLA_CONTROL", value_name = "URL", global = true)]
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
    /// Listen address of the OTLP/HTTP receiver, overriding `[telemetry] otlp_listen` (port 0
    /// picks a free port)
    #[arg(long, value_name = "ADDR")]
    pub otlp_listen: Option<SocketAddr>,
    /// Skip the services' build commands
    #[arg(long)]
    pub no_build: bool,
    /// Serve the gateway over HTTPS (HTTP/2 and HTTP/1.1) with a self-signed development
    /// certificate for localhost, made once under .flotilla/tls, unless [gateway.tls] names one
    #[arg(long)]
    pub tls: bool,
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
    /// Only lines containing this text (ASCII case ignored)
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,
    /// Only lines at this level or above: trace, debug, info, warn, error
    #[arg(long, value_name = "LEVEL")]
    pub level: Option<String>,
    /// Only the lines of one request, across every service, in time order
    #[arg(long, value_name = "TRACE_ID")]
    pub trace: Option<String>,
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

#[derive(Debug, Args)]
#[command(group = ArgGroup::new("fault").args(["delay", "abort", "clear"]).multiple(true))]
pub struct ChaosArgs {
    /// The service whose calls to disturb; without it, list the faults in force
    #[arg(requires = "fault")]
    pub service: Option<String>,
    /// Hold calls this long before sending them (`300ms`, `2s`)
    #[arg(long, value_name = "DUR", value_parser = flotilla_manifest::parse_duration, requires = "service")]
    pub delay: Option<Duration>,
    /// Percentage of calls delayed
    #[arg(long, value_name = "N", default_value_t = 100, requires = "delay")]
    pub delay_percent: u32,
    /// Answer calls with this error status (400–599) instead of calling the service
    #[arg(long, value_name = "STATUS", requires = "service")]
    pub abort: Option<u16>,
    /// Percentage of calls aborted
    #[arg(long, value_name = "N", default_value_t = 100, requires = "abort")]
    pub abort_percent: u32,
    /// Stop injecting faults into SERVICE
    #[arg(
        long,
        requires = "service",
        conflicts_with_all = ["delay", "delay_percent", "abort", "abort_percent"]
    )]
    pub clear: bool,
    #[command(flatten)]
    pub target: Target,
    /// The faults in force as one JSON object, service → faults
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TracesArgs {
    #[command(flatten)]
    pub target: Target,
    /// Only traces with a span of this service (or `gateway`)
    #[arg(long, value_name = "SERVICE")]
    pub service: Option<String>,
    /// Only traces where something failed
    #[arg(long)]
    pub errors: bool,
    /// The N longest traces, longest first, instead of the newest
    #[arg(long, value_name = "N")]
    pub slowest: Option<usize>,
    /// Only traces newer than this (`30s`, `5m`, `2h`) or an RFC 3339 time
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// At most this many traces [default: 50]
    #[arg(long, short = 'n', value_name = "N")]
    pub limit: Option<usize>,
    /// One JSON array of trace summaries
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The trace id, as `flotilla traces` lists it
    pub id: String,
    #[command(flatten)]
    pub target: Target,
    /// The spans as JSON instead of a waterfall
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MapArgs {
    #[command(flatten)]
    pub target: Target,
    /// How far back calls count (`30s`, `5m`, `1h`)
    #[arg(long, value_name = "DUR", default_value = "5m")]
    pub window: String,
    /// How to draw it: text for the terminal, dot for Graphviz, mermaid for Markdown, json
    #[arg(long, value_enum, default_value_t = MapFormat::Text)]
    pub format: MapFormat,
    /// Same as `--format json`
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MapFormat {
    Text,
    Dot,
    Mermaid,
    Json,
}

#[derive(Debug, Args)]
pub struct SidecarArgs {
    /// The service whose instance makes the calls
    #[arg(long, value_name = "NAME")]
    pub service: String,
    /// The instance's id: the caller its breakers belong to [default: NAME-sidecar]
    #[arg(long, value_name = "ID")]
    pub instance: Option<String>,
    /// The control API of the fleet whose services to call
    #[arg(long, env = "FLOTILLA_CONTROL", value_name = "URL")]
    pub control: String,
    /// Where to listen for the instance's calls (its HTTP_PROXY); port 0 picks a free port
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}
