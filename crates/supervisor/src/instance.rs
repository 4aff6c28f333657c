//! One instance's life: spawn its process, capture its output, restart it when it exits on its
//! own, stop it when told.
//!
//! Each launched instance is driven by one task ([`supervise`]) that owns its current process;
//! shutdown reaches it through the instance's `stop` token and learns that it is done through
//! its `finished` token.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use flotilla_registry::Health;
use flotilla_telemetry::{LogRecord, Stream};
use tokio::io::AsyncRead;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{self, CrashHistory};
use crate::lines::LineReader;
use crate::{Error, Inner, InstanceState, Result, describe_exit, short_duration, sys};

/// How long an exited process's log readers get to pass on its last words (a traceback, a panic
/// message) before the "exited" line is written: long enough for a closed pipe to drain, short
/// enough not to delay a restart when something else still holds the pipe open.
const DRAIN: Duration = Duration::from_millis(500);

/// How often to look whether a stopping process group is gone once its leader has exited.
const GROUP_POLL: Duration = Duration::from_millis(20);

pub(crate) struct Instance {
    pub(crate) service_index: usize,
    pub(crate) service: Arc<str>,
    /// `<service>-<n>`.
    pub(crate) name: Arc<str>,
    /// Cancelled to stop the instance for good.
    pub(crate) stop: CancellationToken,
    /// Cancelled once its task has ended: no process left, deregistered.
    pub(crate) finished: CancellationToken,
    data: Mutex<InstanceData>,
}

/// What [`crate::Supervisor::status`] reports, kept up to date by the instance's task.
#[derive(Debug, Clone)]
pub(crate) struct InstanceData {
    /// Whether its task was started (it is started at most once).
    pub(crate) launched: bool,
    pub(crate) pid: Option<u32>,
    pub(crate) port: Option<u16>,
    pub(crate) state: InstanceState,
    pub(crate) restarts: u32,
    pub(crate) started_at: Option<SystemTime>,
    pub(crate) last_exit: Option<String>,
}

impl Instance {
    pub(crate) fn new(
        service_index: usize,
        service: Arc<str>,
        name: Arc<str>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            service_index,
            service,
            name,
            stop,
            finished: CancellationToken::new(),
            data: Mutex::new(InstanceData {
                launched: false,
                pid: None,
                port: None,
                state: InstanceState::Stopped,
                restarts: 0,
                started_at: None,
                last_exit: None,
            }),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, InstanceData> {
        // Every update is a handful of field assignments: a panic cannot leave them inconsistent
        // enough to matter for a status page.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts the instance's task unless it already has one. The receiver gets the result of the
/// first attempt to spawn its process.
pub(crate) fn launch(
    inner: &Arc<Inner>,
    instance: &Arc<Instance>,
) -> Option<oneshot::Receiver<Result<()>>> {
    {
        let mut data = instance.lock();
        if data.launched {
            return None;
        }
        data.launched = true;
    }
    let (first_spawn, receiver) = oneshot::channel();
    // An ordinary async task, so the processes are forked on a runtime worker thread, which lives
    // as long as the runtime: see `sys::die_with_parent` for why that matters.
    inner
        .tasks
        .spawn(supervise(inner.clone(), instance.clone(), first_spawn));
    Some(receiver)
}

/// A running process of an instance and everything attached to it.
struct Process {
    child: Child,
    /// Also its process group id.
    pid: u32,
    started: Instant,
    /// Stops this process's health watcher.
    watch: CancellationToken,
    watcher: JoinHandle<()>,
    readers: Vec<JoinHandle<()>>,
    /// Once the child is reaped its pid may be reused: no more group signals after that, except
    /// for leftovers of a group that still exists.
    reaped: bool,
}

impl Drop for Process {
    fn drop(&mut self) {
        self.watch.cancel();
        if !self.reaped {
            // Only when the task is torn down mid-flight (the runtime shutting down): take the
            // whole group with it, not just the leader `kill_on_drop` reaches.
            let _ = sys::signal_group(self.pid, libc::SIGKILL);
        }
    }
}

/// How a process ended.
enum End {
    /// On its own: `last_exit` for the status, and the start of the log line.
    Exited { last_exit: String, line: String },
    /// Because we stopped it.
    Stopped,
}

/// Runs the instance until its `stop` token is cancelled: spawn, wait, restart with backoff.
async fn supervise(
    inner: Arc<Inner>,
    instance: Arc<Instance>,
    first_spawn: oneshot::Sender<Result<()>>,
) {
    // However this task ends, shutdown must hear of it.
    let _finished = instance.finished.clone().drop_guard();
    let settings = &inner.config.manifest.services[instance.service_index].restart;
    let mut first_spawn = Some(first_spawn);
    let mut history = CrashHistory::new();
    let mut crash_looping = false;

    while !instance.stop.is_cancelled() {
        let spawned_at = Instant::now();
        let end = match spawn(&inner, &instance, crash_looping) {
            Ok(process) => {
                if let Some(first) = first_spawn.take() {
                    let _ = first.send(Ok(()));
                }
                run(&inner, &instance, process).await
            }
            Err(error) => {
                let reason = match &error {
                    Error::Spawn {
                        program, source, ..
                    } => crate::spawn_reason(program, source),
                    other => other.to_string(),
                };
                let last_exit = format!("cannot start: {reason}");
                tracing::warn!(instance = %instance.name, "{last_exit}");
                if let Some(first) = first_spawn.take() {
                    let _ = first.send(Err(error));
                }
                End::Exited {
                    line: last_exit.clone(),
                    last_exit,
                }
            }
        };
        let End::Exited { last_exit, line } = end else {
            break;
        };
        if instance.stop.is_cancelled() {
            break;
        }

        let verdict = history.crashed(
            settings,
            Instant::now(),
            spawned_at.elapsed(),
            backoff::jitter(),
        );
        // Whole milliseconds, so the delay we log is the delay we wait.
        let delay = Duration::from_millis(verdict.delay.as_millis().try_into().unwrap_or(u64::MAX));
        let entering_crash_loop = verdict.crash_looping && !crash_looping;
        crash_looping = verdict.crash_looping;
        {
            let mut data = instance.lock();
            data.state = if crash_looping {
                InstanceState::CrashLoop
            } else {
                InstanceState::Backoff
            };
            data.last_exit = Some(last_exit);
        }
        if entering_crash_loop {
            let message = format!(
                "crash loop: {} crashes within {}",
                verdict.recent,
                short_duration(settings.crash_loop_window)
            );
            tracing::warn!(instance = %instance.name, "{message}");
            inner.log(&instance, message);
        }
        inner.log(
            &instance,
            format!("{line}; restarting in {}", short_duration(delay)),
        );

        tokio::select! {
            () = instance.stop.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
        instance.lock().restarts += 1;
    }

    let mut data = instance.lock();
    data.state = InstanceState::Stopped;
    data.pid = None;
    data.port = None;
}

/// Starts one process of the instance: port, environment, spawn, registration, health watcher,
/// log readers.
fn spawn(inner: &Arc<Inner>, instance: &Instance, crash_looping: bool) -> Result<Process> {
    let config = &inner.config;
    let service = &config.manifest.services[instance.service_index];
    let program_arg = service.run.first().map_or("", String::as_str);
    let spawn_error = |source: io::Error| Error::Spawn {
        service: instance.service.clone(),
        instance: instance.name.clone(),
        program: program_arg.to_owned(),
        source,
    };
    if program_arg.is_empty() {
        return Err(spawn_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the run command is empty",
        )));
    }

    let data_dir = data_dir(&config.state_dir, &service.name)?;
    let port = free_port()?;
    let mut command = Command::new(resolve_program(&config.manifest.dir, program_arg));
    command
        .args(&service.run[1..])
        .current_dir(&config.manifest.dir)
        .env("PORT", port.to_string())
        .env("FLOTILLA_SERVICE", &*service.name)
        .env("FLOTILLA_INSTANCE", &*instance.name)
        .env("FLOTILLA_VERSION", &service.version)
        .env("FLOTILLA_DATA_DIR", &data_dir)
        .envs(config.extra_env.env(&service.name, &instance.name))
        .envs(&service.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a Ctrl-C in the terminal reaches only Flotilla, which then stops
        // the services in order; and stopping an instance reaches everything it started.
        .process_group(0);
    sys::die_with_parent(&mut command);
    let mut child = command.spawn().map_err(spawn_error)?;
    let Some(pid) = child.id() else {
        return Err(spawn_error(io::Error::other(
            "the process vanished at once",
        )));
    };
    let started = Instant::now();

    let mut readers = Vec::with_capacity(2);
    if let Some(stdout) = child.stdout.take() {
        readers.push(read_logs(inner, instance, Stream::Stdout, stdout));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(read_logs(inner, instance, Stream::Stderr, stderr));
    }

    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    config
        .registry
        .register(&service.name, &instance.name, addr, &service.version);
    let watch = instance.stop.child_token();
    let watcher = inner.tasks.spawn({
        let health = config.health.clone();
        let settings = service.health.clone();
        let service = instance.service.clone();
        let name = instance.name.clone();
        let watch = watch.clone();
        async move {
            health
                .watch_instance(&service, &name, addr, &settings, watch)
                .await;
        }
    });

    {
        let mut data = instance.lock();
        data.pid = Some(pid);
        data.port = Some(port);
        data.started_at = Some(SystemTime::now());
        // A crash-looping instance stays flagged until it proves itself healthy.
        data.state = if crash_looping {
            InstanceState::CrashLoop
        } else {
            InstanceState::Starting
        };
    }
    inner.log(instance, format!("started pid {pid} on port {port}"));

    Ok(Process {
        child,
        pid,
        started,
        watch,
        watcher,
        readers,
        reaped: false,
    })
}

/// Waits until the process exits or the instance is told to stop.
async fn run(inner: &Arc<Inner>, instance: &Instance, mut process: Process) -> End {
    let mut changes = inner.config.registry.subscribe();
    let mut registry_alive = true;
    loop {
        tokio::select! {
            // Stopping wins a tie with an exit: an instance exiting during shutdown is not a crash.
            biased;
            () = instance.stop.cancelled() => {
                stop(inner, instance, process).await;
                return End::Stopped;
            }
            status = process.child.wait() => {
                let last_exit = match status {
                    Ok(status) => {
                        process.reaped = true;
                        describe_exit(status)
                    }
                    Err(e) => format!("lost track of the process: {e}"),
                };
                // The leader is gone; whatever else is left in its group is an orphan now.
                let _ = sys::signal_group(process.pid, libc::SIGKILL);
                let uptime = process.started.elapsed();
                finish(inner, instance, process).await;
                tracing::warn!(
                    instance = %instance.name,
                    "exited after {}: {last_exit}",
                    short_duration(uptime)
                );
                return End::Exited { line: format!("exited: {last_exit}"), last_exit };
            }
            changed = changes.changed(), if registry_alive => {
                if changed.is_err() {
                    registry_alive = false;
                } else if inner.health(instance) == Health::Healthy {
                    let mut data = instance.lock();
                    if matches!(data.state, InstanceState::Starting | InstanceState::CrashLoop) {
                        data.state = InstanceState::Running;
                    }
                }
            }
        }
    }
}

/// SIGTERM to the process group, SIGKILL after the grace period if anything in it is left.
async fn stop(inner: &Arc<Inner>, instance: &Instance, mut process: Process) {
    let grace = inner.config.manifest.services[instance.service_index]
        .restart
        .stop_grace;
    instance.lock().state = InstanceState::Stopping;
    inner.log(instance, "stopping (SIGTERM)".to_owned());
    let _ = sys::signal_group(process.pid, libc::SIGTERM);

    let deadline = Instant::now() + grace;
    let mut status = tokio::select! {
        status = process.child.wait() => Some(status),
        () = tokio::time::sleep_until(deadline) => None,
    };
    if let Some(Ok(_)) = status {
        process.reaped = true;
        // The leader is done; helpers it started get the rest of the same grace period.
        while group_exists(process.pid) && Instant::now() < deadline {
            tokio::time::sleep(GROUP_POLL).await;
        }
    }
    if status.is_none() || group_exists(process.pid) {
        let _ = sys::signal_group(process.pid, libc::SIGKILL);
        inner.log(
            instance,
            format!("killed after {} grace", short_duration(grace)),
        );
        if status.is_none() {
            status = Some(process.child.wait().await);
            process.reaped = true;
        }
    }
    finish(inner, instance, process).await;
    let how = match status {
        Some(Ok(status)) => describe_exit(status),
        Some(Err(e)) => format!("lost track of the process: {e}"),
        None => "unknown".to_owned(),
    };
    instance.lock().last_exit = Some(how.clone());
    inner.log(instance, format!("stopped: {how}"));
}

fn group_exists(pgid: u32) -> bool {
    match sys::signal_group(pgid, 0) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() == Some(libc::EPERM),
    }
}

/// Tidies up after a process that has exited: no more health checks, out of the registry, and
/// its last output captured.
async fn finish(inner: &Arc<Inner>, instance: &Instance, mut process: Process) {
    process.watch.cancel();
    // Awaited before deregistering, so a verdict still in flight cannot land on the next process.
    let _ = (&mut process.watcher).await;
    inner
        .config
        .registry
        .deregister(&instance.service, &instance.name);
    let readers = std::mem::take(&mut process.readers);
    let drained = tokio::time::timeout(DRAIN, async move {
        for reader in readers {
            let _ = reader.await;
        }
    });
    let _ = drained.await;
    let mut data = instance.lock();
    data.pid = None;
    data.port = None;
}

/// Forwards every line of one of the process's pipes to the log store until the pipe closes.
fn read_logs<R>(inner: &Arc<Inner>, instance: &Instance, stream: Stream, pipe: R) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let logs = inner.config.logs.clone();
    // Not the instance's stop token: a stopping service's last words matter. The pipe closes when
    // its process group is gone; the root token covers anything that escaped the group.
    let stop = inner.root.clone();
    let service = instance.service.clone();
    let name = instance.name.clone();
    let version: Arc<str> = Arc::from(
        inner.config.manifest.services[instance.service_index]
            .version
            .as_str(),
    );
    inner.tasks.spawn(async move {
        let mut reader = LineReader::new(pipe);
        loop {
            let line = tokio::select! {
                () = stop.cancelled() => return,
                line = reader.next_line() => line,
            };
            let (stream, line) = match line {
                Ok(Some(line)) => (stream, line),
                Ok(None) => return,
                Err(e) => (Stream::System, format!("cannot read {stream:?}: {e}")),
            };
            let ended = stream == Stream::System;
            let mut record = LogRecord::new(service.clone(), name.clone(), stream, line);
            record.version = Some(version.clone());
            logs.push(record);
            if ended {
                return;
            }
        }
    })
}

/// A program path with a `/` is relative to the manifest's directory; a bare name is looked up
/// in `PATH`.
fn resolve_program(dir: &Path, program: &str) -> PathBuf {
    let path = Path::new(program);
    if program.contains('/') && path.is_relative() {
        dir.join(path)
    } else {
        path.to_owned()
    }
}

/// `state_dir/data/<service>`, created, absolute: the service may change its own directory.
fn data_dir(state_dir: &Path, service: &str) -> io::Result<PathBuf> {
    let dir = std::path::absolute(state_dir.join("data").join(service))?;
    std::fs::create_dir_all(&dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot create the data directory {}: {e}", dir.display()),
        )
    })?;
    Ok(dir)
}

/// A port nothing listens on right now. The instance binds it a moment later; the gap is small,
/// and a lost race only costs a crash and a restart on a fresh port.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot find a free port: {e}")))?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_with_a_slash_are_relative_to_the_manifest() {
        let dir = Path::new("/apps/shop");
        assert_eq!(
            resolve_program(dir, "../../target/release/orders"),
            Path::new("/apps/shop/../../target/release/orders")
        );
        assert_eq!(resolve_program(dir, "python3"), Path::new("python3"));
        assert_eq!(
            resolve_program(dir, "/usr/bin/env"),
            Path::new("/usr/bin/env")
        );
    }

    #[test]
    fn exits_are_described_like_a_shell_would() {
        use std::os::unix::process::ExitStatusExt;
        use std::process::ExitStatus;
        assert_eq!(describe_exit(ExitStatus::from_raw(1 << 8)), "exit status 1");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "killed by signal 9");
    }
}
