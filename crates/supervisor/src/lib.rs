//! The supervisor: the part of Flotilla that owns the service processes.
//!
//! `flotilla up` hands it the validated [`Manifest`] together with the
//! shared [`Registry`], [`HealthChecker`] and [`LogStore`]. From there the supervisor
//!
//! - runs the services' `build` commands ([`Supervisor::build`]), each distinct command once;
//! - starts every instance in dependency order and waits for it to turn healthy
//!   ([`Supervisor::start`]): a free port per start, the `FLOTILLA_*` environment, its own process
//!   group, registration in the registry and a health watcher;
//! - captures stdout and stderr line by line into the [`LogStore`], plus [`Stream::System`] lines
//!   about the instance's life (started, exited, restarting, stopping);
//! - restarts an instance that exits on its own, with jittered exponential backoff, and flags it
//!   [`InstanceState::CrashLoop`] when it keeps crashing;
//! - stops everything gracefully, dependents first ([`Supervisor::shutdown`]).
//!
//! The gateway and sidecars never talk to the supervisor: they only read the registry (who is
//! healthy where). The control API reads the log store, and asks [`Supervisor::status`] for
//! process-level facts (pid, restarts, last exit).
//!
//! Each instance is driven by one task (see `instance.rs`) that owns its child process; every task
//! the supervisor spawns is tracked, so [`Supervisor::shutdown`] can wait for all of them.
//!
//! [`Stream::System`]: flotilla_telemetry::Stream::System

mod backoff;
mod build;
mod instance;
mod lines;
mod sys;
#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use flotilla_manifest::Manifest;
use flotilla_registry::health::HealthChecker;
use flotilla_registry::{Health, Registry};
use flotilla_telemetry::{LogQuery, LogRecord, LogStore, Stream};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::instance::Instance;

/// How many of an instance's last log lines a [`Error::NeverHealthy`] carries.
const LAST_LINES: usize = 20;

/// Everything the supervisor needs from the rest of `flotilla up`.
pub struct SupervisorConfig {
    pub manifest: Arc<Manifest>,
    /// `DIR/.flotilla`; each service gets `state_dir/data/<service>/` as its data directory.
    pub state_dir: PathBuf,
    pub registry: Registry,
    pub health: HealthChecker,
    pub logs: Arc<LogStore>,
    /// Per-instance environment from elsewhere, e.g. `HTTP_PROXY` pointing at the instance's sidecar.
    pub extra_env: Arc<dyn InstanceEnv>,
}

/// Extra environment variables for one instance, added after Flotilla's own and before the
/// service's `env` (which wins).
pub trait InstanceEnv: Send + Sync + 'static {
    fn env(&self, service: &str, instance: &str) -> Vec<(String, String)>;
}

/// No extra environment.
impl InstanceEnv for () {
    fn env(&self, _service: &str, _instance: &str) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// Told about each build command as it runs, so the CLI can show progress.
pub trait BuildProgress: Send + Sync {
    /// `command` is about to run on behalf of `services` (several when they share the command).
    fn started(&self, services: &[Arc<str>], command: &str);
    fn finished(&self, services: &[Arc<str>], ok: bool, elapsed: Duration);
    /// One line of the command's stdout or stderr.
    fn output_line(&self, services: &[Arc<str>], line: &str) {
        let _ = (services, line);
    }
}

/// What an instance's process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Spawned, not yet healthy.
    Starting,
    /// Spawned and has been healthy (its current health is [`InstanceStatus::health`]).
    Running,
    /// Exited on its own; waiting to be restarted.
    Backoff,
    /// Crashed `crash_loop_threshold` times within `crash_loop_window`; still retried, at the
    /// longest backoff, until it turns healthy again.
    CrashLoop,
    /// Asked to stop; waiting for it to exit.
    Stopping,
    /// Not running: not started yet, or stopped by [`Supervisor::shutdown`].
    Stopped,
}

/// One instance as `flotilla status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    pub service: Arc<str>,
    pub instance: Arc<str>,
    /// The current process, if one is running.
    pub pid: Option<u32>,
    /// The port the current process was given in `PORT`.
    pub port: Option<u16>,
    pub state: InstanceState,
    /// As the registry has it; `unknown` while not registered.
    pub health: Health,
    /// How many times the instance was restarted after exiting on its own.
    pub restarts: u32,
    pub version: String,
    /// When the current (or last) process was spawned.
    #[serde(serialize_with = "rfc3339_opt")]
    pub started_at: Option<SystemTime>,
    /// How the last process ended, e.g. `exit status 1` or `killed by signal 9`.
    pub last_exit: Option<String>,
}

fn rfc3339_opt<S: serde::Serializer>(
    value: &Option<SystemTime>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    match value {
        Some(t) => serializer.collect_str(&humantime::format_rfc3339_millis(*t)),
        None => serializer.serialize_none(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A build command failed; `output` is everything it wrote, stdout and stderr interleaved.
    #[error(
        "building {} failed ({}): `{command}`{}",
        join(services),
        describe_exit(*status),
        indented_block("output", output.lines())
    )]
    Build {
        services: Vec<Arc<str>>,
        command: String,
        status: ExitStatus,
        output: String,
    },
    /// An instance did not turn healthy within its `startup_timeout`. It is left running (and
    /// restarting): the caller decides whether to stop the fleet.
    #[error(
        "`{instance}` never became healthy: {reason}{}",
        indented_block("last log lines", last_lines.iter().map(String::as_str))
    )]
    NeverHealthy {
        service: Arc<str>,
        instance: Arc<str>,
        reason: String,
        last_lines: Vec<String>,
    },
    /// The first attempt to spawn an instance's program failed. The instance keeps retrying with
    /// backoff, like after a crash.
    #[error("cannot start `{instance}`: {}", spawn_reason(program, source))]
    Spawn {
        service: Arc<str>,
        instance: Arc<str>,
        program: String,
        source: io::Error,
    },
    /// [`Supervisor::start`] was called during or after [`Supervisor::shutdown`].
    #[error("the supervisor is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn join(services: &[Arc<str>]) -> String {
    services.iter().map(|s| &**s).collect::<Vec<_>>().join(", ")
}

fn indented_block<'a>(title: &str, lines: impl Iterator<Item = &'a str>) -> String {
    let mut block = String::new();
    for line in lines {
        block.push_str("\n    ");
        block.push_str(line);
    }
    if block.is_empty() {
        block
    } else {
        format!("\n  {title}:{block}")
    }
}

fn spawn_reason(program: &str, error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => format!("program `{program}` not found"),
        io::ErrorKind::PermissionDenied => {
            format!("program `{program}` is not executable (permission denied)")
        }
        _ => format!("program `{program}`: {error}"),
    }
}

/// `exit status 1`, `killed by signal 9`.
pub(crate) fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// `400ms`, `10s`, `1.5s`: short enough for a log line, exact for the usual settings.
pub(crate) fn short_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Runs, restarts and stops the fleet's processes. Cloning shares it.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: SupervisorConfig,
    /// Every instance, in manifest order.
    pub(crate) instances: Vec<Arc<Instance>>,
    /// Cancelled at the very end of shutdown: stops whatever is still running (log readers of
    /// processes whose pipes were inherited by something that escaped the process group).
    pub(crate) root: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// Guards launching instances against a concurrent shutdown: once set, nothing new starts.
    shutting_down: Mutex<bool>,
}

impl Inner {
    pub(crate) fn log(&self, instance: &Instance, line: String) {
        let mut record = LogRecord::new(
            instance.service.clone(),
            instance.name.clone(),
            Stream::System,
            line,
        );
        record.version = Some(Arc::from(
            self.config.manifest.services[instance.service_index]
                .version
                .as_str(),
        ));
        self.config.logs.push(record);
    }

    fn health(&self, instance: &Instance) -> Health {
        self.config
            .registry
            .instance(&instance.service, &instance.name)
            .map_or(Health::Unknown, |i| i.health)
    }

    fn instances_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Arc<Instance>> {
        self.instances
            .iter()
            .filter(move |i| &*i.service == service)
    }

    fn lock_shutting_down(&self) -> MutexGuard<'_, bool> {
        self.shutting_down.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Supervisor {
    pub fn new(config: SupervisorConfig) -> Self {
        let root = CancellationToken::new();
        let mut instances = Vec::new();
        for (index, service) in config.manifest.services.iter().enumerate() {
            config.registry.declare_service(&service.name);
            for n in 1..=service.replicas.get() {
                let name: Arc<str> = Arc::from(format!("{}-{n}", service.name));
                instances.push(Arc::new(Instance::new(
                    index,
                    service.name.clone(),
                    name,
                    root.child_token(),
                )));
            }
        }
        Self {
            inner: Arc::new(Inner {
                config,
                instances,
                root,
                tasks: TaskTracker::new(),
                shutting_down: Mutex::new(false),
            }),
        }
    }

    /// Runs every service's `build` command (`sh -c`, from the manifest directory), one at a time
    /// in manifest order. Services with the same command share one run: the shop's four Rust
    /// services share one `cargo build`. Stops at the first failure.
    pub async fn build(&self, progress: &dyn BuildProgress) -> Result<()> {
        build::run_all(&self.inner.config.manifest, progress).await
    }

    /// Starts every instance, each service as soon as every instance of each of its `depends_on`
    /// services is healthy (independent services start concurrently, and so do the instances of
    /// one service), and returns once all are healthy.
    ///
    /// Fails with [`Error::Spawn`] when an instance's program cannot be spawned at all, and with
    /// [`Error::NeverHealthy`] when an instance is not healthy within its `startup_timeout`
    /// (counted from its launch). Either way nothing is stopped: failing instances keep being
    /// restarted and the rest keeps running until [`Supervisor::shutdown`].
    pub async fn start(&self) -> Result<()> {
        let mut services = JoinSet::new();
        for index in 0..self.inner.config.manifest.services.len() {
            services.spawn(start_service(self.inner.clone(), index));
        }
        // Dropping the set (on the first error, or when our caller gives up) aborts the services
        // still waiting for their dependencies, so nothing more is launched.
        while let Some(joined) = services.join_next().await {
            match joined {
                Ok(result) => result?,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return Err(Error::ShuttingDown),
            }
        }
        Ok(())
    }

    /// Every instance, in manifest order.
    pub fn status(&self) -> Vec<InstanceStatus> {
        let manifest = &self.inner.config.manifest;
        self.inner
            .instances
            .iter()
            .map(|instance| {
                let data = instance.lock().clone();
                InstanceStatus {
                    service: instance.service.clone(),
                    instance: instance.name.clone(),
                    pid: data.pid,
                    port: data.port,
                    state: data.state,
                    health: self.inner.health(instance),
                    restarts: data.restarts,
                    version: manifest.services[instance.service_index].version.clone(),
                    started_at: data.started_at,
                    last_exit: data.last_exit,
                }
            })
            .collect()
    }

    /// Stops everything, dependents before their dependencies: SIGTERM to each instance's process
    /// group, then SIGKILL after the service's `stop_grace`. Services no running service depends on
    /// stop together, then the ones only they depended on, and so on. Returns once every process
    /// is gone and every task the supervisor spawned has finished. Calling it again is harmless.
    pub async fn shutdown(&self) {
        *self.inner.lock_shutting_down() = true;
        for wave in stop_waves(&self.inner.config.manifest) {
            let instances: Vec<&Arc<Instance>> = wave
                .iter()
                .flat_map(|&index| {
                    self.inner
                        .instances
                        .iter()
                        .filter(move |i| i.service_index == index)
                })
                .collect();
            // Cancel them all before waiting on any, so the wave stops concurrently.
            for instance in &instances {
                instance.stop.cancel();
            }
            for instance in &instances {
                if instance.lock().launched {
                    instance.finished.cancelled().await;
                }
            }
        }
        self.inner.root.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// Service indices grouped by how far they are from the top of the dependency graph: first the
/// services nothing depends on, then those only the first wave depends on, and so on.
fn stop_waves(manifest: &Manifest) -> Vec<Vec<usize>> {
    let services = &manifest.services;
    let mut height = vec![0usize; services.len()];
    // Dependents come after their dependencies in the manifest, so walking backwards sees every
    // dependent's height before the services it depends on.
    for index in (0..services.len()).rev() {
        let name = &services[index].name;
        height[index] = services
            .iter()
            .enumerate()
            .skip(index + 1)
            .filter(|(_, s)| s.depends_on.contains(name))
            .map(|(j, _)| height[j] + 1)
            .max()
            .unwrap_or(0);
    }
    let mut waves = vec![Vec::new(); height.iter().max().map_or(0, |h| h + 1)];
    for (index, h) in height.into_iter().enumerate() {
        waves[h].push(index);
    }
    waves
}

async fn start_service(inner: Arc<Inner>, index: usize) -> Result<()> {
    let service = &inner.config.manifest.services[index];
    let registry = &inner.config.registry;

    let mut changes = registry.subscribe();
    loop {
        let ready = service.depends_on.iter().all(|dependency| {
            inner
                .instances_of(dependency)
                .all(|i| inner.health(i) == Health::Healthy)
        });
        if ready {
            break;
        }
        if changes.changed().await.is_err() {
            return Err(Error::ShuttingDown);
        }
    }

    let launched_at = tokio::time::Instant::now();
    let first_spawns: Vec<oneshot::Receiver<Result<()>>> = {
        let shutting_down = inner.lock_shutting_down();
        if *shutting_down {
            return Err(Error::ShuttingDown);
        }
        inner
            .instances_of(&service.name)
            .filter_map(|instance| instance::launch(&inner, instance))
            .collect()
    };
    for first_spawn in first_spawns {
        first_spawn.await.map_err(|_| Error::ShuttingDown)??;
    }

    let deadline = launched_at + service.health.startup_timeout;
    let mut changes = registry.subscribe();
    loop {
        let unhealthy = inner
            .instances_of(&service.name)
            .find(|i| inner.health(i) != Health::Healthy);
        let Some(unhealthy) = unhealthy else {
            return Ok(());
        };
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return Err(Error::ShuttingDown);
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(never_healthy(&inner, unhealthy, service.health.startup_timeout));
            }
        }
    }
}

fn never_healthy(inner: &Inner, instance: &Instance, timeout: Duration) -> Error {
    let data = instance.lock().clone();
    let registered = inner
        .config
        .registry
        .instance(&instance.service, &instance.name);
    let mut reason = format!("not healthy within {}", short_duration(timeout));
    if let Some(last_exit) = &data.last_exit {
        let crash_loop = if data.state == InstanceState::CrashLoop {
            "crash-looping, "
        } else {
            ""
        };
        reason.push_str(&format!(
            "; it keeps exiting ({crash_loop}{} restarts so far, last: {last_exit})",
            data.restarts
        ));
    }
    match registered.and_then(|info| info.last_error) {
        Some(error) => reason.push_str(&format!("; last health check: {error}")),
        None if data.last_exit.is_none() => reason.push_str("; no health check passed"),
        None => {}
    }
    let last_lines = inner
        .config
        .logs
        .query(&LogQuery {
            service: Some(instance.service.to_string()),
            instance: Some(instance.name.to_string()),
            limit: Some(LAST_LINES),
            ..LogQuery::default()
        })
        .iter()
        .map(|record| record.line.clone())
        .collect();
    Error::NeverHealthy {
        service: instance.service.clone(),
        instance: instance.name.clone(),
        reason,
        last_lines,
    }
}
