//! End-to-end tests with real processes: a tiny Python HTTP server stands in for a service.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use flotilla_manifest::{
    ControlSettings, GatewaySettings, HealthSettings, Manifest, RestartSettings, Service,
};
use flotilla_registry::health::HealthChecker;
use flotilla_registry::{Health, Registry};
use flotilla_telemetry::{LogQuery, LogStore, Stream};
use tempfile::TempDir;

use crate::{
    BuildProgress, Error, InstanceEnv, InstanceState, InstanceStatus, Supervisor, SupervisorConfig,
    sys,
};

/// Serves `/healthz` on `$PORT` after printing its environment; knobs come from the environment.
const SERVER: &str = r#"
import http.server, os, signal, subprocess, sys, time

if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
for key in sorted(os.environ):
    if key.startswith("FLOTILLA_") or key in ("PORT", "GREETING", "SIDECAR_URL"):
        print(f"env {key}={os.environ[key]}", flush=True)
if os.environ.get("SPAWN_CHILD"):
    child = subprocess.Popen(["sleep", "60"])
    print(f"child {child.pid}", flush=True)
print("to stderr", file=sys.stderr, flush=True)
time.sleep(float(os.environ.get("START_DELAY", "0")))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
print("listening", flush=True)
server.serve_forever()
"#;

/// The real interpreter, not a version-manager shim that takes a while to pick one.
fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let output = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("these tests need python3");
        String::from_utf8(output.stdout)
            .expect("a UTF-8 path")
            .trim()
            .to_owned()
    })
}

fn service(name: &str, run: &[&str]) -> Service {
    Service {
        name: Arc::from(name),
        build: None,
        run: run.iter().map(|s| s.to_string()).collect(),
        version: "0.0.0".into(),
        replicas: NonZeroU32::MIN,
        health: HealthSettings {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            startup_timeout: Duration::from_secs(10),
            ..HealthSettings::default()
        },
        restart: RestartSettings {
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            crash_loop_threshold: NonZeroU32::new(3).expect("non-zero"),
            crash_loop_window: Duration::from_secs(10),
            stop_grace: Duration::from_secs(2),
        },
        policy: Default::default(),
        env: BTreeMap::new(),
        depends_on: Vec::new(),
        protocol: Default::default(),
    }
}

fn server(name: &str) -> Service {
    service(name, &[python(), "-u", "server.py"])
}

struct Fleet {
    dir: TempDir,
    registry: Registry,
    logs: Arc<LogStore>,
    supervisor: Supervisor,
}

fn fleet(services: Vec<Service>, extra_env: Arc<dyn InstanceEnv>) -> Fleet {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("server.py"), SERVER).expect("write server.py");
    let manifest = Manifest {
        app: "test".into(),
        path: dir.path().join("flotilla.toml"),
        dir: dir.path().to_owned(),
        gateway: GatewaySettings::new(([127, 0, 0, 1], 0).into()),
        control: ControlSettings {
            listen: ([127, 0, 0, 1], 0).into(),
        },
        telemetry: Default::default(),
        events: Default::default(),
        topics: Vec::new(),
        subscriptions: Vec::new(),
        sagas: Default::default(),
        services,
        bffs: Vec::new(),
    };
    let registry = Registry::new();
    let logs = Arc::new(LogStore::new(10_000));
    let supervisor = Supervisor::new(SupervisorConfig {
        manifest: Arc::new(manifest),
        state_dir: dir.path().join(".flotilla"),
        registry: registry.clone(),
        health: HealthChecker::new(registry.clone()),
        logs: logs.clone(),
        extra_env,
    });
    Fleet {
        dir,
        registry,
        logs,
        supervisor,
    }
}

impl Fleet {
    fn status(&self, instance: &str) -> InstanceStatus {
        self.supervisor
            .status()
            .into_iter()
            .find(|s| &*s.instance == instance)
            .unwrap_or_else(|| panic!("no instance {instance}"))
    }

    fn lines(&self, instance: &str) -> Vec<String> {
        self.logs
            .query(&LogQuery {
                instance: Some(instance.into()),
                ..LogQuery::default()
            })
            .iter()
            .map(|r| r.line.clone())
            .collect()
    }

    /// When `instance` first logged a line starting with `prefix`.
    fn logged_at(&self, instance: &str, prefix: &str) -> SystemTime {
        self.logs
            .query(&LogQuery {
                instance: Some(instance.into()),
                ..LogQuery::default()
            })
            .iter()
            .find(|r| r.line.starts_with(prefix))
            .unwrap_or_else(|| {
                panic!(
                    "{instance} never logged {prefix:?}: {:?}",
                    self.lines(instance)
                )
            })
            .time
    }

    async fn wait_for(&self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; status: {:#?}",
                self.supervisor.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn gone(pid: u32) -> bool {
    match sys::signal_process(pid, 0) {
        Err(e) => e.raw_os_error() == Some(libc::ESRCH),
        Ok(()) => false,
    }
}

/// Gone, or a zombie waiting for an init process that may not reap it.
fn dead(pid: u32) -> bool {
    gone(pid)
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

struct SidecarEnv;

impl InstanceEnv for SidecarEnv {
    fn env(&self, _service: &str, instance: &str) -> Vec<(String, String)> {
        vec![
            (
                "SIDECAR_URL".into(),
                format!("http://sidecar-of-{instance}"),
            ),
            // The service's own `env` must win over this.
            ("GREETING".into(), "from the sidecar".into()),
        ]
    }
}

#[tokio::test]
async fn replicas_get_their_own_port_and_the_flotilla_environment() {
    let mut echo = server("echo");
    echo.replicas = NonZeroU32::new(2).expect("non-zero");
    echo.version = "1.2.3".into();
    echo.env.insert("GREETING".into(), "hello".into());
    let fleet = fleet(vec![echo], Arc::new(SidecarEnv));

    fleet
        .supervisor
        .start()
        .await
        .expect("both replicas become healthy");
    fleet
        .wait_for("both running", |f| {
            f.supervisor
                .status()
                .iter()
                .all(|s| s.state == InstanceState::Running)
        })
        .await;

    let status = fleet.supervisor.status();
    let names: Vec<&str> = status.iter().map(|s| &*s.instance).collect();
    assert_eq!(names, ["echo-1", "echo-2"]);
    assert_ne!(status[0].port, status[1].port);
    let data_dir = fleet.dir.path().join(".flotilla/data/echo");
    assert!(data_dir.is_dir());
    for s in &status {
        assert_eq!(s.health, Health::Healthy);
        assert_eq!((s.restarts, s.version.as_str()), (0, "1.2.3"));
        let (pid, port) = (s.pid.expect("a pid"), s.port.expect("a port"));
        let registered = fleet
            .registry
            .instance("echo", &s.instance)
            .expect("registered");
        assert_eq!(registered.addr, ([127, 0, 0, 1], port).into());

        let lines = fleet.lines(&s.instance);
        for expected in [
            format!("started pid {pid} on port {port}"),
            format!("env PORT={port}"),
            "env FLOTILLA_SERVICE=echo".to_owned(),
            format!("env FLOTILLA_INSTANCE={}", s.instance),
            "env FLOTILLA_VERSION=1.2.3".to_owned(),
            format!("env FLOTILLA_DATA_DIR={}", data_dir.display()),
            "env GREETING=hello".to_owned(),
            format!("env SIDECAR_URL=http://sidecar-of-{}", s.instance),
            "to stderr".to_owned(),
        ] {
            assert!(lines.contains(&expected), "{expected:?} not in {lines:#?}");
        }
    }
    let streams: Vec<Stream> = fleet
        .logs
        .query(&LogQuery::default())
        .iter()
        .filter(|r| r.line == "to stderr")
        .map(|r| r.stream)
        .collect();
    assert_eq!(streams, [Stream::Stderr, Stream::Stderr]);

    fleet.supervisor.shutdown().await;
}

#[tokio::test]
async fn a_service_starts_only_after_its_dependencies_are_healthy() {
    let mut a = server("a");
    a.env.insert("START_DELAY".into(), "0.3".into());
    let mut b = server("b");
    b.depends_on = vec![Arc::from("a")];
    let fleet = fleet(vec![a, b], Arc::new(()));

    // Watch the registry: when did a-1 turn healthy, when was b-1 first registered?
    let events: Arc<Mutex<(Option<SystemTime>, Option<SystemTime>)>> = Arc::default();
    let watcher = tokio::spawn({
        let registry = fleet.registry.clone();
        let events = events.clone();
        async move {
            let mut changes = registry.subscribe();
            loop {
                let now = SystemTime::now();
                {
                    let mut events = events.lock().expect("not poisoned");
                    let a_healthy = registry.instance("a", "a-1").map(|i| i.health);
                    if a_healthy == Some(Health::Healthy) && events.0.is_none() {
                        events.0 = Some(now);
                    }
                    if registry.instance("b", "b-1").is_some() && events.1.is_none() {
                        events.1 = Some(now);
                    }
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        }
    });

    fleet.supervisor.start().await.expect("both become healthy");
    let (a_healthy, b_registered) = *events.lock().expect("not poisoned");
    let (a_healthy, b_registered) = (
        a_healthy.expect("a became healthy"),
        b_registered.expect("b was registered"),
    );
    assert!(
        a_healthy <= b_registered,
        "b registered before a was healthy"
    );
    let b_started = fleet.logged_at("b-1", "started pid");
    assert!(fleet.logged_at("a-1", "listening") <= b_started);
    assert!(a_healthy <= b_started);

    fleet.supervisor.shutdown().await;
    watcher.abort();
}

#[tokio::test]
async fn a_killed_instance_is_restarted() {
    let fleet = fleet(vec![server("victim")], Arc::new(()));
    fleet.supervisor.start().await.expect("healthy");
    let first_pid = fleet.status("victim-1").pid.expect("a pid");

    sys::signal_process(first_pid, libc::SIGKILL).expect("kill it");
    fleet
        .wait_for("a healthy replacement", |f| {
            let s = f.status("victim-1");
            s.restarts == 1
                && s.health == Health::Healthy
                && s.state == InstanceState::Running
                && s.pid.is_some_and(|pid| pid != first_pid)
        })
        .await;

    let status = fleet.status("victim-1");
    assert_eq!(status.last_exit.as_deref(), Some("killed by signal 9"));
    let lines = fleet.lines("victim-1");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("exited: killed by signal 9; restarting in ")),
        "{lines:#?}"
    );
    assert!(gone(first_pid));

    fleet.supervisor.shutdown().await;
}

#[tokio::test]
async fn a_crashing_service_crash_loops_without_disturbing_the_others() {
    let mut crasher = service(
        "crasher",
        &[
            python(),
            "-c",
            "import sys; print('giving up', file=sys.stderr); sys.exit(1)",
        ],
    );
    crasher.health.startup_timeout = Duration::from_millis(1500);
    let fleet = fleet(vec![crasher, server("steady")], Arc::new(()));

    let error = fleet
        .supervisor
        .start()
        .await
        .expect_err("crasher never becomes healthy");
    let Error::NeverHealthy {
        service,
        instance,
        reason,
        last_lines,
    } = &error
    else {
        panic!("expected NeverHealthy, got {error}");
    };
    assert_eq!((&**service, &**instance), ("crasher", "crasher-1"));
    assert!(reason.contains("exit status 1"), "{reason}");
    assert!(
        last_lines.iter().any(|l| l == "giving up"),
        "{last_lines:#?}"
    );
    assert!(last_lines.len() <= 20);
    assert!(
        error
            .to_string()
            .contains("`crasher-1` never became healthy"),
        "{error}"
    );

    let crasher = fleet.status("crasher-1");
    assert_eq!(crasher.state, InstanceState::CrashLoop);
    assert!(crasher.restarts >= 2, "{crasher:?}");
    assert_eq!(crasher.last_exit.as_deref(), Some("exit status 1"));
    assert!(
        fleet
            .lines("crasher-1")
            .contains(&"crash loop: 3 crashes within 10s".to_owned())
    );
    // Its last words come before the exit line.
    let lines = fleet.lines("crasher-1");
    let giving_up = lines.iter().position(|l| l == "giving up").expect("logged");
    assert!(lines[giving_up + 1].starts_with("exited: exit status 1; restarting in "));

    let steady = fleet.status("steady-1");
    assert_eq!((steady.health, steady.restarts), (Health::Healthy, 0));

    // It keeps retrying, still marked crash-looping.
    let restarts = crasher.restarts;
    fleet
        .wait_for("another restart", |f| {
            f.status("crasher-1").restarts > restarts
        })
        .await;
    assert_eq!(fleet.status("crasher-1").state, InstanceState::CrashLoop);

    fleet.supervisor.shutdown().await;
    assert_eq!(fleet.status("crasher-1").state, InstanceState::Stopped);
}

#[tokio::test]
async fn shutdown_stops_dependents_first_and_kills_what_ignores_sigterm() {
    let base = server("base");
    let mut stubborn = server("stubborn");
    stubborn.depends_on = vec![Arc::from("base")];
    stubborn.restart.stop_grace = Duration::from_millis(300);
    stubborn.env.insert("IGNORE_TERM".into(), "1".into());
    stubborn.env.insert("SPAWN_CHILD".into(), "1".into());
    let fleet = fleet(vec![base, stubborn], Arc::new(()));
    fleet.supervisor.start().await.expect("healthy");

    let base_pid = fleet.status("base-1").pid.expect("a pid");
    let stubborn_pid = fleet.status("stubborn-1").pid.expect("a pid");
    let grandchild: u32 = fleet
        .lines("stubborn-1")
        .iter()
        .find_map(|l| l.strip_prefix("child ")?.parse().ok())
        .expect("the grandchild's pid");
    assert!(!dead(grandchild));

    let began = tokio::time::Instant::now();
    fleet.supervisor.shutdown().await;
    assert!(began.elapsed() >= Duration::from_millis(300));

    for pid in [base_pid, stubborn_pid] {
        assert!(gone(pid), "{pid} still exists");
        assert!(
            sys::signal_group(pid, 0).is_err_and(|e| e.raw_os_error() == Some(libc::ESRCH))
                || dead(grandchild),
            "group {pid} still exists"
        );
    }
    assert!(dead(grandchild), "the grandchild outlived its service");

    let stubborn = fleet.lines("stubborn-1");
    assert!(
        stubborn.contains(&"stopping (SIGTERM)".to_owned()),
        "{stubborn:#?}"
    );
    assert!(
        stubborn.contains(&"killed after 300ms grace".to_owned()),
        "{stubborn:#?}"
    );
    assert!(
        stubborn.contains(&"stopped: killed by signal 9".to_owned()),
        "{stubborn:#?}"
    );
    let base = fleet.lines("base-1");
    assert!(
        base.contains(&"stopped: killed by signal 15".to_owned()),
        "{base:#?}"
    );
    assert!(
        !base.iter().any(|l| l.starts_with("killed after")),
        "{base:#?}"
    );
    // The dependent was gone before its dependency was asked to stop.
    assert!(fleet.logged_at("stubborn-1", "stopped:") <= fleet.logged_at("base-1", "stopping"));

    for s in fleet.supervisor.status() {
        assert_eq!(
            (s.state, s.pid, s.health),
            (InstanceState::Stopped, None, Health::Unknown)
        );
    }
    assert!(fleet.registry.instances().is_empty());

    // Idempotent, and nothing starts any more.
    tokio::time::timeout(Duration::from_secs(1), fleet.supervisor.shutdown())
        .await
        .expect("a second shutdown returns at once");
    assert!(matches!(
        fleet.supervisor.start().await,
        Err(Error::ShuttingDown)
    ));
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
}

impl BuildProgress for Recorder {
    fn started(&self, services: &[Arc<str>], command: &str) {
        self.push(format!("started {} {command}", names(services)));
    }
    fn finished(&self, services: &[Arc<str>], ok: bool, _elapsed: Duration) {
        self.push(format!("finished {} {ok}", names(services)));
    }
    fn output_line(&self, services: &[Arc<str>], line: &str) {
        self.push(format!("output {} {line}", names(services)));
    }
}

impl Recorder {
    fn push(&self, event: String) {
        self.events.lock().expect("not poisoned").push(event);
    }
}

fn names(services: &[Arc<str>]) -> String {
    services.iter().map(|s| &**s).collect::<Vec<_>>().join(",")
}

fn with_build(name: &str, build: &str) -> Service {
    let mut service = server(name);
    service.build = Some(build.into());
    service
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .expect("written")
        .lines()
        .count()
}

#[tokio::test]
async fn identical_build_commands_run_once() {
    let shared = "echo built >> count.txt && echo compiled";
    let fleet = fleet(
        vec![
            with_build("x", shared),
            server("no-build"),
            with_build("y", shared),
            with_build("z", "echo other >> other.txt"),
        ],
        Arc::new(()),
    );
    let progress = Recorder::default();
    fleet
        .supervisor
        .build(&progress)
        .await
        .expect("builds pass");

    assert_eq!(count_lines(&fleet.dir.path().join("count.txt")), 1);
    assert_eq!(count_lines(&fleet.dir.path().join("other.txt")), 1);
    let events = progress.events.lock().expect("not poisoned").clone();
    assert_eq!(
        events,
        [
            format!("started x,y {shared}"),
            "output x,y compiled".to_owned(),
            "finished x,y true".to_owned(),
            "started z echo other >> other.txt".to_owned(),
            "finished z true".to_owned(),
        ]
    );
}

#[tokio::test]
async fn a_failing_build_reports_its_output() {
    let fleet = fleet(
        vec![
            with_build("bad", "echo boom; echo oops >&2; exit 3"),
            with_build("later", "echo never >> later.txt"),
        ],
        Arc::new(()),
    );
    let progress = Recorder::default();
    let error = fleet.supervisor.build(&progress).await.expect_err("exit 3");
    let Error::Build {
        services,
        command,
        status,
        output,
    } = &error
    else {
        panic!("expected a build error, got {error}");
    };
    assert_eq!(names(services), "bad");
    assert_eq!(command, "echo boom; echo oops >&2; exit 3");
    assert_eq!(status.code(), Some(3));
    assert!(
        output.contains("boom\n") && output.contains("oops\n"),
        "{output:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("building bad failed (exit status 3)"),
        "{message}"
    );
    assert!(message.contains("boom"), "{message}");
    assert!(
        !fleet.dir.path().join("later.txt").exists(),
        "stops at the first failure"
    );
    let events = progress.events.lock().expect("not poisoned").clone();
    assert_eq!(
        events.last().map(String::as_str),
        Some("finished bad false")
    );
}

#[tokio::test]
async fn a_missing_program_is_reported_and_retried() {
    let fleet = fleet(
        vec![service("ghost", &["./no-such-program", "--flag"])],
        Arc::new(()),
    );
    let error = fleet.supervisor.start().await.expect_err("nothing to run");
    let Error::Spawn {
        service,
        instance,
        program,
        source,
    } = &error
    else {
        panic!("expected a spawn error, got {error}");
    };
    assert_eq!((&**service, &**instance), ("ghost", "ghost-1"));
    assert_eq!(program, "./no-such-program");
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        error.to_string(),
        "cannot start `ghost-1`: program `./no-such-program` not found"
    );

    // Counted like a crash: retried with backoff, and said so in the log.
    fleet
        .wait_for("two restarts", |f| f.status("ghost-1").restarts >= 2)
        .await;
    let status = fleet.status("ghost-1");
    assert_eq!(
        status.last_exit.as_deref(),
        Some("cannot start: program `./no-such-program` not found")
    );
    assert!(fleet.lines("ghost-1").iter().any(|l| {
        l.starts_with("cannot start: program `./no-such-program` not found; restarting in ")
    }));

    fleet.supervisor.shutdown().await;
    assert_eq!(fleet.status("ghost-1").state, InstanceState::Stopped);
}
