//! `flotilla up` and `flotilla down`: bring a whole app up on this machine, and take it down.
//!
//! `up` binds the gateway and control API first (so a taken port is reported before anything is
//! built), builds, starts the services in dependency order with a sidecar per instance, then serves
//! until Ctrl-C, SIGTERM or `flotilla down`. `up -d` runs the same thing as a background child and
//! returns once the child reports the fleet ready (or failed).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use flotilla_control::{AppInfo, Fleet as _, Phase, ServiceView};
use flotilla_manifest::{Manifest, Service};
use flotilla_proxy::{BreakerState, Caller, Policies, Resilience};
use flotilla_registry::Registry;
use flotilla_registry::health::HealthChecker;
use flotilla_supervisor::{BuildProgress, InstanceEnv, Supervisor, SupervisorConfig};
use flotilla_telemetry::{Level, LogRecord, LogStore, Stream};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::{DownArgs, UpArgs};
use crate::client::{self, Control, FleetFile};
use crate::fleet::RunningFleet;
use crate::output;
use crate::status;
use crate::telemetry::Telemetry;

/// Lines kept in memory for `flotilla logs`.
const LOG_CAPACITY: usize = 50_000;

pub async fn run(args: UpArgs) -> Result<ExitCode> {
    let manifest = match flotilla_manifest::load(&args.dir) {
        Ok(manifest) => Arc::new(manifest),
        Err(diagnostics) => {
            eprintln!("{}", diagnostics.render(None));
            output::error("the manifest is invalid; nothing was started");
            return Ok(ExitCode::from(2));
        }
    };
    if let Some(fleet) = client::running_fleet(&manifest.dir) {
        bail!(
            "`{}` is already running from {} (pid {}, control {})\n  help: stop it with `flotilla down {}`",
            fleet.app,
            manifest.dir.display(),
            fleet.pid,
            fleet.control,
            args.dir.display()
        );
    }
    if args.detach && !args.detached_child {
        return detach(&args, &manifest).await;
    }
    serve_fleet(args, manifest).await
}

async fn serve_fleet(args: UpArgs, manifest: Arc<Manifest>) -> Result<ExitCode> {
    let began = Instant::now();
    let state_dir = client::state_dir(&manifest.dir);
    prepare_state_dir(&state_dir)?;

    let gateway_addr = args.gateway_listen.unwrap_or(manifest.gateway.listen);
    let control_addr = args.control_listen.unwrap_or(manifest.control.listen);
    let gateway_listener = bind(
        "gateway",
        gateway_addr,
        "[gateway] listen",
        "--gateway-listen",
    )
    .await?;
    let control_listener = bind(
        "control API",
        control_addr,
        "[control] listen",
        "--control-listen",
    )
    .await?;
    let mut gateway_settings = manifest.gateway.clone();
    if args.tls && gateway_settings.tls.is_none() {
        let (cert, key) = flotilla_proxy::tls::dev_certificate(&state_dir.join("tls"))
            .map_err(|e| anyhow::anyhow!("cannot make the development certificate: {e}"))?;
        gateway_settings.tls = Some(flotilla_manifest::TlsSettings { cert, key });
    }
    let scheme = if gateway_settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let gateway_url = format!("{scheme}://{}", gateway_listener.local_addr()?);
    let control_url = format!("http://{}", control_listener.local_addr()?);

    let registry = Registry::new();
    for service in &manifest.services {
        registry.declare_service(&service.name);
    }
    let logs = Arc::new(LogStore::new(LOG_CAPACITY));
    let discovery = Arc::new(registry.clone());

    // Edge servers stop first on shutdown (no new requests from outside), inner ones last (services
    // may still call each other, or be asked about, while they drain).
    let edge_stop = CancellationToken::new();
    let inner_stop = CancellationToken::new();
    let tasks = TaskTracker::new();

    let telemetry = Telemetry::open(&manifest.telemetry, &state_dir)?;
    telemetry.tap_logs(&logs);
    let otlp_listener = match args.otlp_listen.or(manifest.telemetry.otlp_listen) {
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            // Another collector on the machine is no reason to refuse to run the app.
            Err(e) => {
                output::warn(&format!(
                    "the OTLP receiver cannot listen on {addr} ({e}); services' own spans will not reach Flotilla. Set `[telemetry] otlp_listen` or `--otlp-listen` to another address"
                ));
                None
            }
        },
        None => None,
    };
    let otlp_url = match &otlp_listener {
        Some(listener) => Some(format!("http://{}", listener.local_addr()?)),
        None => None,
    };
    let mut resilience = Resilience::new(Policies::from_manifest(&manifest));
    // Set before any stack gets its clone: a stack reads the observer once, when it is built.
    if manifest.telemetry.enabled {
        resilience.observer = Some(Arc::new(telemetry.clone()));
    }
    announce_breakers(&resilience, &manifest, &logs);
    let broker = crate::events::open_broker(&manifest, &state_dir).await?;
    let triggers = Arc::new(crate::sagas::Triggers::default());
    let events = crate::events::start(
        &manifest,
        broker,
        discovery.clone(),
        resilience.clone(),
        triggers.clone(),
    )
    .await?;
    let sagas = if manifest.sagas.sagas.is_empty() {
        None
    } else {
        let (store, exclusive) = crate::sagas::open_store(&manifest, &state_dir).await?;
        let orchestrator = crate::sagas::start(
            &manifest,
            store,
            exclusive,
            crate::events::flotilla_stack(discovery.clone(), resilience.clone()),
            events.clone(),
        );
        triggers.set(orchestrator.clone());
        Some(orchestrator)
    };
    // Instances reach Flotilla's own API (publishing events) as `http://flotilla/...`.
    let sidecar_discovery = Arc::new(flotilla_sidecar::WithFlotilla::new(
        discovery.clone(),
        control_listener.local_addr()?,
    ));
    let sidecars = start_sidecars(
        &manifest,
        &sidecar_discovery,
        &resilience,
        otlp_url.as_deref(),
        &tasks,
        &inner_stop,
    )
    .await?;
    let supervisor = Supervisor::new(SupervisorConfig {
        manifest: manifest.clone(),
        state_dir: state_dir.clone(),
        registry: registry.clone(),
        health: HealthChecker::new(registry.clone()),
        logs: logs.clone(),
        extra_env: Arc::new(sidecars),
    });
    let fleet = Arc::new(RunningFleet {
        manifest: manifest.clone(),
        supervisor: supervisor.clone(),
        registry: registry.clone(),
        logs: logs.clone(),
        resilience: resilience.clone(),
        telemetry,
        events: events.clone(),
        sagas: sagas.clone(),
        gateway_url: gateway_url.clone(),
        control_url: control_url.clone(),
        started_at: SystemTime::now(),
        phase: Mutex::new(Phase::Building),
        stop: CancellationToken::new(),
    });

    let edge = flotilla_gateway::Gateway::start(
        &manifest.app,
        &gateway_settings,
        &manifest.bffs,
        &manifest.dir,
        edge_stop.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot start the gateway: {e}"))?;
    let gateway = flotilla_gateway::serve_threaded(
        gateway_listener.into_std()?,
        std::thread::available_parallelism().unwrap_or(std::num::NonZeroUsize::MIN),
        Arc::new(edge),
        flotilla_gateway::resilience(discovery.clone(), resilience.clone()),
        edge_stop.clone(),
    )
    .context("cannot start the gateway")?;
    tasks.spawn(async move {
        if let Err(e) = gateway.wait().await {
            tracing::error!("gateway stopped: {e}");
        }
    });
    tasks.spawn({
        let fleet: Arc<dyn flotilla_control::Fleet> = fleet.clone();
        let stop = inner_stop.clone();
        async move {
            if let Err(e) = flotilla_control::serve(control_listener, fleet, stop).await {
                tracing::error!("control API stopped: {e}");
            }
        }
    });
    if let Some(listener) = otlp_listener {
        let fleet: Arc<dyn flotilla_control::Fleet> = fleet.clone();
        let stop = inner_stop.clone();
        tasks.spawn(async move {
            if let Err(e) = flotilla_control::serve_otlp(listener, fleet, stop).await {
                tracing::error!("OTLP receiver stopped: {e}");
            }
        });
    }
    match StopSignals::install() {
        Ok(signals) => {
            tasks.spawn(signals.watch(fleet.stop.clone(), args.detached_child));
        }
        Err(e) => tracing::error!(
            "cannot install signal handlers ({e}); stop the fleet with `flotilla down`"
        ),
    }
    if !args.detached_child {
        tasks.spawn(print_logs(
            logs.clone(),
            inner_stop.clone(),
            label_width(&manifest),
        ));
    }

    let fleet_file = client::fleet_file_path(&manifest.dir);
    write_fleet_file(
        &fleet_file,
        &FleetFile {
            app: manifest.app.clone(),
            pid: std::process::id(),
            control: control_url.clone(),
            gateway: gateway_url.clone(),
            otlp: otlp_url.clone(),
        },
    )?;

    let outcome = bring_up(&args, &fleet, &supervisor).await;
    let code = match outcome {
        Ok(true) => {
            fleet.set_phase(Phase::Ready);
            // Sagas a crash interrupted resume now that the services they call are up.
            if let Some(sagas) = &sagas {
                sagas.resume();
            }
            // A detached fleet's summary is printed by the `up -d` that waits for it.
            if !args.detached_child {
                print_ready(&fleet.app(), &fleet_services(&fleet), began.elapsed());
            }
            fleet.stop.cancelled().await;
            ExitCode::SUCCESS
        }
        Ok(false) => ExitCode::SUCCESS, // stopped while coming up
        Err(Failure::Build(failure)) => {
            output::error(&failure);
            fleet.set_phase(Phase::Failed(failure));
            ExitCode::FAILURE
        }
        Err(Failure::Start(failure)) => {
            output::error(&failure);
            fleet.set_phase(Phase::Failed(failure));
            if args.detached_child {
                ExitCode::FAILURE
            } else {
                // In the foreground the others keep serving: the user sees the failing service
                // restart in the log stream and in `flotilla status`, and stops with Ctrl-C.
                output::note("the other services keep running; press Ctrl-C to stop");
                fleet.stop.cancelled().await;
                ExitCode::SUCCESS
            }
        }
    };

    // Also ends the signal watcher when `up` stops on its own (a failed build).
    fleet.stop.cancel();
    fleet.set_phase(Phase::Stopping);
    output::note(&format!("stopping {}...", manifest.app));
    edge_stop.cancel();
    // No new deliveries to services that are about to stop; one in flight finishes or is
    // delivered again next time.
    // Sagas stop between two transitions and give their leases up; what they were calling is
    // called again, with the same idempotency key, when the fleet next runs.
    if let Some(sagas) = &sagas {
        sagas.shutdown().await;
    }
    events.shutdown();
    supervisor.shutdown().await;
    inner_stop.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(15), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some servers did not finish draining within 15s");
    }
    // Whatever is still queued for the durable store is written before the process ends.
    if let Some(durable) = fleet.telemetry.durable.clone() {
        let _ = tokio::task::spawn_blocking(move || durable.flush()).await;
    }
    let _ = std::fs::remove_file(&fleet_file);
    output::note(&format!("{} stopped", manifest.app));
    Ok(code)
}

/// Builds and starts everything. `Ok(false)` when asked to stop meanwhile; `Err` names what failed.
/// Why the fleet did not come up.
enum Failure {
    /// Nothing runs yet: `up` stops.
    Build(String),
    /// Some service never became healthy; the others run.
    Start(String),
}

/// Builds and starts everything. `Ok(false)` when asked to stop meanwhile.
async fn bring_up(
    args: &UpArgs,
    fleet: &RunningFleet,
    supervisor: &Supervisor,
) -> Result<bool, Failure> {
    if !args.no_build {
        let progress = Progress::new();
        tokio::select! {
            () = fleet.stop.cancelled() => return Ok(false),
            built = supervisor.build(&progress) => built.map_err(|e| Failure::Build(e.to_string()))?,
        }
    }
    fleet.set_phase(Phase::Starting);
    tokio::select! {
        () = fleet.stop.cancelled() => Ok(false),
        started = supervisor.start() => started.map(|()| true).map_err(|e| Failure::Start(e.to_string())),
    }
}

fn fleet_services(fleet: &RunningFleet) -> Vec<ServiceView> {
    fleet.services()
}

fn print_ready(app: &AppInfo, services: &[ServiceView], took: Duration) {
    println!(
        "{} is up: {} services in {:.1}s\n  gateway  {}\n  control  {}\n{}",
        app.app,
        services.len(),
        took.as_secs_f64(),
        app.gateway,
        app.control,
        status::service_lines(services).trim_end()
    );
}

/// The state directory holds runtime files only; it ignores itself so no user has to.
fn prepare_state_dir(state_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(state_dir.join("data"))
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let ignore = state_dir.join(".gitignore");
    if !ignore.exists() {
        std::fs::write(&ignore, "*\n")
            .with_context(|| format!("cannot write {}", ignore.display()))?;
    }
    Ok(())
}

fn write_fleet_file(path: &Path, fleet: &FleetFile) -> Result<()> {
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, serde_json::to_vec_pretty(fleet)?)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    // Rename so a reader never sees half a file.
    std::fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))
}

async fn bind(what: &str, addr: SocketAddr, key: &str, flag: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let reason = if e.kind() == std::io::ErrorKind::AddrInUse {
            "the address is already in use".to_owned()
        } else {
            e.to_string()
        };
        anyhow::anyhow!(
            "the {what} cannot listen on {addr}: {reason}\n  help: stop whatever uses it, or choose another address with `{key}` in flotilla.toml or `{flag}`"
        )
    })
}

/// The per-instance outbound proxies, and the environment that points each instance at its own.
struct Sidecars {
    env: HashMap<String, Vec<(String, String)>>,
}

impl InstanceEnv for Sidecars {
    fn env(&self, _service: &str, instance: &str) -> Vec<(String, String)> {
        self.env.get(instance).cloned().unwrap_or_default()
    }
}

/// Every breaker state change goes to the log of the caller, so `flotilla logs orders` shows
/// orders' sidecars giving up on payments (the gateway's under the name `gateway`).
fn announce_breakers(resilience: &Resilience, manifest: &Manifest, logs: &Arc<LogStore>) {
    let services: Vec<Arc<str>> = manifest.services.iter().map(|s| s.name.clone()).collect();
    let logs = logs.clone();
    resilience.board.on_change(move |event| {
        let service = event
            .caller
            .rsplit_once('-')
            .and_then(|(service, _)| services.iter().find(|s| &***s == service))
            .cloned()
            .unwrap_or_else(|| event.caller.clone());
        let mut record = LogRecord::new(
            service,
            event.caller.clone(),
            Stream::System,
            event.to_string(),
        );
        // Opening, ejecting and probing are worth noticing; closing again is good news.
        record.level = Some(if event.to == BreakerState::Closed {
            Level::Info
        } else {
            Level::Warn
        });
        logs.push(record);
    });
}

async fn start_sidecars(
    manifest: &Manifest,
    discovery: &Arc<flotilla_sidecar::WithFlotilla<Registry>>,
    resilience: &Resilience,
    otlp_url: Option<&str>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Sidecars> {
    let mut env = HashMap::new();
    for service in &manifest.services {
        for n in 1..=service.replicas.get() {
            let instance = format!("{}-{n}", service.name);
            let listener = TcpListener::bind(("127.0.0.1", 0))
                .await
                .with_context(|| format!("cannot open a sidecar port for {instance}"))?;
            let url = format!("http://{}", listener.local_addr()?);
            let caller: Arc<str> = Arc::from(instance.as_str());
            tasks.spawn({
                let discovery = discovery.clone();
                let resilience = resilience.clone();
                let stop = stop.clone();
                let service_name = service.name.clone();
                async move {
                    let who = Caller {
                        service: service_name,
                        instance: caller.clone(),
                    };
                    if let Err(e) =
                        flotilla_sidecar::serve(listener, who, discovery, resilience, stop).await
                    {
                        tracing::error!(instance = %caller, "sidecar stopped: {e}");
                    }
                }
            });
            // Both spellings: curl and Python read the lower-case ones, many others the upper-case.
            let loopback = "localhost,127.0.0.1,::1".to_owned();
            let mut vars = vec![
                ("HTTP_PROXY".to_owned(), url.clone()),
                ("http_proxy".to_owned(), url.clone()),
                ("NO_PROXY".to_owned(), loopback.clone()),
                ("no_proxy".to_owned(), loopback),
                ("FLOTILLA_SIDECAR".to_owned(), url),
            ];
            if let Some(otlp) = otlp_url {
                vars.extend(otel_env(otlp, service, &instance));
            }
            env.insert(instance, vars);
        }
    }
    Ok(Sidecars { env })
}

/// What every OpenTelemetry SDK reads to send its spans and logs to Flotilla's receiver under
/// the service's name; a service's own `env` in the manifest still wins.
fn otel_env(otlp: &str, service: &Service, instance: &str) -> Vec<(String, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), otlp.to_owned()),
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(),
            "http/protobuf".to_owned(),
        ),
        ("OTEL_SERVICE_NAME".to_owned(), service.name.to_string()),
        (
            "OTEL_RESOURCE_ATTRIBUTES".to_owned(),
            format!(
                "service.instance.id={instance},service.version={}",
                service.version
            ),
        ),
    ]
}

/// Ctrl-C, SIGTERM and SIGHUP, caught from the moment this is made: a process installs them
/// before it tells anyone it is there, so a signal sent right after is not lost to the default
/// action (dying without cleaning up).
pub(crate) struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(crate) fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Cancels `stop` on Ctrl-C, SIGTERM or (unless `detached`) SIGHUP; returns when `stop` is
    /// cancelled either way.
    pub(crate) async fn watch(mut self, stop: CancellationToken, detached: bool) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = self.interrupt.recv() => break,
                _ = self.terminate.recv() => break,
                // A detached fleet outlives the terminal that started it.
                _ = self.hangup.recv() => if !detached { break },
            }
        }
        stop.cancel();
    }
}

fn label_width(manifest: &Manifest) -> usize {
    manifest
        .services
        .iter()
        .map(|s| 2 * s.name.len() + 2 + s.replicas.get().to_string().len())
        .max()
        .unwrap_or(10)
}

/// Streams every captured line to stdout until the fleet stops.
async fn print_logs(logs: Arc<LogStore>, stop: CancellationToken, width: usize) {
    use std::io::Write;
    use tokio::sync::broadcast::error::RecvError;
    let mut lines = logs.follow();
    loop {
        let record = tokio::select! {
            () = stop.cancelled() => return,
            record = lines.recv() => record,
        };
        match record {
            Ok(record) => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", output::log_line(&record, width, false));
            }
            Err(RecvError::Lagged(missed)) => {
                output::note(&format!(
                    "({missed} log lines skipped; see `flotilla logs`)"
                ));
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Build progress: a spinner per build command on a terminal, plain lines elsewhere.
struct Progress {
    bars: MultiProgress,
    running: Mutex<HashMap<String, ProgressBar>>,
    terminal: bool,
}

impl Progress {
    fn new() -> Self {
        Self {
            bars: MultiProgress::new(),
            running: Mutex::new(HashMap::new()),
            terminal: output::stderr_is_terminal(),
        }
    }

    fn key(services: &[Arc<str>]) -> String {
        services.iter().map(|s| &**s).collect::<Vec<_>>().join(", ")
    }
}

impl BuildProgress for Progress {
    fn started(&self, services: &[Arc<str>], command: &str) {
        let key = Self::key(services);
        if !self.terminal {
            output::note(&format!("building {key}: {command}"));
            return;
        }
        let bar = self.bars.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner:.cyan} building {prefix:.bold} [{elapsed}] {wide_msg:.dim}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(key.clone());
        bar.enable_steady_tick(Duration::from_millis(100));
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, bar);
    }

    fn output_line(&self, services: &[Arc<str>], line: &str) {
        if let Some(bar) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&Self::key(services))
        {
            bar.set_message(line.trim().chars().take(120).collect::<String>());
        }
    }

    fn finished(&self, services: &[Arc<str>], ok: bool, elapsed: Duration) {
        let key = Self::key(services);
        let verdict = if ok { "built" } else { "failed to build" };
        let message = format!("{verdict} {key} in {:.1}s", elapsed.as_secs_f64());
        match self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key)
        {
            Some(bar) => {
                bar.set_style(
                    ProgressStyle::with_template("{msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.finish_with_message(format!("{} {message}", if ok { "✓" } else { "✗" }));
            }
            None => output::note(&message),
        }
    }
}

/// `up -d`: start the fleet as a background child and wait for its verdict, showing its progress.
async fn detach(args: &UpArgs, manifest: &Manifest) -> Result<ExitCode> {
    let state_dir = client::state_dir(&manifest.dir);
    prepare_state_dir(&state_dir)?;
    let log_path = state_dir.join("flotilla.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let _ = std::fs::remove_file(client::fleet_file_path(&manifest.dir));

    let exe = std::env::current_exe().context("cannot find the flotilla executable")?;
    let mut command = tokio::process::Command::new(exe);
    command.arg("up").arg(&manifest.dir).arg("--detached-child");
    if let Some(addr) = args.gateway_listen {
        command.arg("--gateway-listen").arg(addr.to_string());
    }
    if let Some(addr) = args.control_listen {
        command.arg("--control-listen").arg(addr.to_string());
    }
    if let Some(addr) = args.otlp_listen {
        command.arg("--otlp-listen").arg(addr.to_string());
    }
    if args.tls {
        command.arg("--tls");
    }
    if args.no_build {
        command.arg("--no-build");
    }
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the terminal's Ctrl-C must not reach the background fleet.
        .process_group(0);
    let mut child = command
        .spawn()
        .context("cannot start the background fleet")?;
    let child_pid = child.id().unwrap_or_default();

    let mut shown = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        shown = echo_new_output(&log_path, shown);
        if let Some(status) = child.try_wait()? {
            echo_new_output(&log_path, shown);
            output::error(&format!(
                "the background fleet exited ({status}) before it was ready; its output is in {}",
                log_path.display()
            ));
            return Ok(ExitCode::FAILURE);
        }
        let Some(fleet) = client::running_fleet(&manifest.dir).filter(|f| f.pid == child_pid)
        else {
            continue;
        };
        let control = Control::new(&fleet.control)?;
        let Ok(app) = control.get::<AppInfo>("/v1/app").await else {
            continue;
        };
        match app.phase {
            Phase::Ready => {
                let services: Vec<ServiceView> = control.get("/v1/services").await?;
                echo_new_output(&log_path, shown);
                print_ready(
                    &app,
                    &services,
                    app.started_at.elapsed().unwrap_or_default(),
                );
                return Ok(ExitCode::SUCCESS);
            }
            Phase::Failed(_) | Phase::Stopping => {
                // The child stops its services and exits; wait for that so nothing is left behind.
                let _ = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
                echo_new_output(&log_path, shown);
                return Ok(ExitCode::FAILURE);
            }
            Phase::Building | Phase::Starting => {}
        }
    }
}

/// Copies what the background fleet wrote since `from` to stderr; returns the new offset.
fn echo_new_output(path: &Path, from: u64) -> u64 {
    let Ok(mut file) = std::fs::File::open(path) else {
        return from;
    };
    if file.seek(SeekFrom::Start(from)).is_err() {
        return from;
    }
    let mut fresh = Vec::new();
    let Ok(read) = file.read_to_end(&mut fresh) else {
        return from;
    };
    eprint!("{}", String::from_utf8_lossy(&fresh));
    from + read as u64
}

pub async fn down(args: DownArgs) -> Result<ExitCode> {
    let (control, pid) = match (&args.control, client::running_fleet(&args.dir)) {
        (Some(url), fleet) => (Control::new(url)?, fleet.map(|f| f.pid)),
        (None, Some(fleet)) => (Control::new(&fleet.control)?, Some(fleet.pid)),
        (None, None) => {
            output::note(&format!(
                "no fleet is running for {}; nothing to stop",
                args.dir.display()
            ));
            return Ok(ExitCode::SUCCESS);
        }
    };
    let app: AppInfo = control.get("/v1/app").await?;
    let pid = pid.unwrap_or(app.pid);
    control.post("/v1/shutdown").await?;
    output::note(&format!("stopping {} (pid {pid})...", app.app));
    // Every service gets its grace period; allow for the longest plus the drain of the servers.
    let deadline = Instant::now() + Duration::from_secs(120);
    while client::process_alive(pid) {
        if Instant::now() > deadline {
            bail!("{} (pid {pid}) is still running after 120s", app.app);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    output::note(&format!("{} stopped", app.app));
    Ok(ExitCode::SUCCESS)
}
