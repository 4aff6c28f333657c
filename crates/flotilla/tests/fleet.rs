//! End-to-end: the real `flotilla` binary running small Python fleets on ephemeral ports.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const TWO_SERVICES: &str = r#"
app = "pair"

[[gateway.routes]]
prefix = "/front"
service = "front"
rewrite = "/"

[[gateway.routes]]
prefix = "/back"
service = "back"

[services.back]
run = "python3 echo.py"
version = "2.1.0"
replicas = 2
env = { GREETING = "hello" }
health = { interval = "200ms" }

[services.front]
run = "python3 echo.py"
depends_on = ["back"]
health = { interval = "200ms" }
"#;

#[test]
fn up_routes_reports_and_stops_cleanly() {
    let app = App::new(TWO_SERVICES);
    let mut fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));

    // Longest prefix wins, the prefix is rewritten, and proxy headers are added.
    let echoed: Value = get(&format!("{}/front/items?x=1", fleet.gateway))
        .json()
        .expect("json");
    assert_eq!(echoed["service"], "front");
    assert_eq!(echoed["path"], "/items?x=1");
    let request_id = echoed["headers"]["x-request-id"]
        .as_str()
        .expect("request id set");
    assert!(!request_id.is_empty());
    assert!(
        echoed["headers"]["x-forwarded-for"]
            .as_str()
            .is_some_and(|v| v.contains("127.0.0.1"))
    );
    assert!(
        echoed["proxy"]
            .as_str()
            .is_some_and(|p| p.starts_with("http://127.0.0.1:")),
        "sidecar handed over"
    );
    assert!(
        echoed["data_dir"]
            .as_str()
            .is_some_and(|d| d.ends_with(".flotilla/data/front"))
    );

    // Round-robin across both healthy replicas.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let echoed: Value = get(&format!("{}/back/x", fleet.gateway))
            .json()
            .expect("json");
        assert_eq!(echoed["path"], "/back/x", "no rewrite configured");
        seen.insert(echoed["instance"].as_str().expect("instance").to_owned());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["back-1", "back-2"]);

    // Unknown routes are problems, with the request id passed back.
    let response = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(format!("{}/nowhere", fleet.gateway))
        .header("x-request-id", "test-123")
        .send()
        .expect("request");
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(response.headers()["x-request-id"], "test-123");

    // status --json: one object per instance with the promised fields.
    let status = run(&["status", "--json", "--dir", app.path_str()]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let instances: Vec<Value> = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(instances.len(), 3);
    for instance in &instances {
        for field in [
            "service", "instance", "pid", "port", "state", "health", "restarts", "version",
        ] {
            assert!(
                instance.get(field).is_some(),
                "{field} missing in {instance}"
            );
        }
        assert_eq!(instance["state"], "running");
        assert_eq!(instance["health"], "healthy");
    }
    assert_eq!(instances[0]["service"], "back", "dependencies first");
    assert_eq!(instances[0]["version"], "2.1.0");
    let table = run(&["status", "--dir", app.path_str()]);
    assert!(
        text(&table.stdout).contains("back-2"),
        "{}",
        text(&table.stdout)
    );

    // Logs were captured per service.
    let logs = run(&["logs", "front", "--dir", app.path_str(), "--json"]);
    assert!(logs.status.success(), "{}", text(&logs.stderr));
    let lines: Vec<Value> = text(&logs.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert!(lines.iter().all(|l| l["service"] == "front"));
    assert!(
        lines.iter().any(|l| l["line"]
            .as_str()
            .is_some_and(|t| t.contains("GET /items?x=1 200"))),
        "{lines:?}"
    );
    let unknown = run(&["logs", "nosuch", "--dir", app.path_str()]);
    assert!(!unknown.status.success());

    // `down` stops the fleet and every service process with it.
    let pids: Vec<u32> = instances
        .iter()
        .map(|i| i["pid"].as_u64().expect("pid") as u32)
        .collect();
    let down = run(&["down", app.path_str()]);
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert_eq!(
        fleet.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        fleet.output()
    );
    for pid in pids {
        assert!(!alive(pid), "service process {pid} survived `down`");
    }
    assert!(!app.path().join(".flotilla/fleet.json").exists());
    assert!(
        std::fs::read_to_string(app.path().join(".flotilla/.gitignore"))
            .is_ok_and(|s| s.trim() == "*")
    );
}

#[test]
fn killing_flotilla_leaves_no_orphans() {
    let app = App::new(TWO_SERVICES);
    let mut fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let pids: Vec<u32> = fleet
        .instances()
        .iter()
        .map(|i| i["pid"].as_u64().expect("pid") as u32)
        .collect();
    assert_eq!(pids.len(), 3);
    fleet.signal(libc::SIGKILL);
    fleet.wait_exit(Duration::from_secs(5));
    wait_until(
        "every service process to die with flotilla",
        Duration::from_secs(10),
        || pids.iter().all(|&pid| !alive(pid)),
    );
}

#[test]
fn a_killed_instance_is_restarted() {
    let app = App::new(TWO_SERVICES);
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let victim = fleet
        .instances()
        .into_iter()
        .find(|i| i["instance"] == "front-1")
        .expect("front-1");
    let old_pid = victim["pid"].as_u64().expect("pid") as u32;
    send_signal(old_pid, libc::SIGKILL);
    wait_until(
        "front-1 to come back healthy with a new pid",
        Duration::from_secs(30),
        || {
            fleet.instances().iter().any(|i| {
                i["instance"] == "front-1"
                    && i["health"] == "healthy"
                    && i["restarts"] == 1
                    && i["pid"].as_u64().is_some_and(|p| p as u32 != old_pid)
            })
        },
    );
    let echoed: Value = get(&format!("{}/front/", fleet.gateway))
        .json()
        .expect("json");
    assert_eq!(echoed["instance"], "front-1");
}

#[test]
fn ctrl_c_stops_everything_gracefully() {
    let app = App::new(TWO_SERVICES);
    let mut fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let pids: Vec<u32> = fleet
        .instances()
        .iter()
        .map(|i| i["pid"].as_u64().expect("pid") as u32)
        .collect();
    fleet.signal(libc::SIGINT);
    assert_eq!(
        fleet.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        fleet.output()
    );
    for pid in pids {
        assert!(!alive(pid), "service process {pid} survived Ctrl-C");
    }
    let output = fleet.output();
    assert!(
        output
            .lines()
            .any(|l| l.starts_with("back/back-1 ") && l.ends_with("| stopped")),
        "services saw SIGTERM and stopped on their own:\n{output}"
    );
}

#[test]
fn a_crash_looping_service_does_not_stop_the_others() {
    let app = App::new(
        r#"
app = "flaky"

[[gateway.routes]]
prefix = "/ok"
service = "steady"

[services.steady]
run = "python3 echo.py"

[services.flaky]
run = "python3 echo.py"
env = { MODE = "crash" }
health = { startup_timeout = "3s" }
restart = { backoff_initial = "50ms", backoff_max = "200ms", crash_loop_threshold = 3 }
"#,
    );
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("failed", Duration::from_secs(60));
    assert!(fleet.output().contains("flaky"), "{}", fleet.output());
    assert_eq!(
        get(&format!("{}/ok", fleet.gateway)).status(),
        200,
        "steady keeps serving"
    );
    wait_until(
        "flaky to be marked crash-looping",
        Duration::from_secs(10),
        || {
            fleet
                .instances()
                .iter()
                .any(|i| i["instance"] == "flaky-1" && i["state"] == "crash-loop")
        },
    );
    let flaky = fleet
        .instances()
        .into_iter()
        .find(|i| i["instance"] == "flaky-1")
        .expect("flaky-1");
    assert!(flaky["restarts"].as_u64().expect("restarts") >= 3);
    assert!(
        flaky["last_exit"].as_str().is_some_and(|e| e.contains('3')),
        "{flaky}"
    );
}

#[test]
fn detached_up_names_the_service_that_never_became_healthy() {
    let app = App::new(
        r#"
app = "sick"

[services.sick]
run = "python3 echo.py"
env = { MODE = "unhealthy" }
health = { interval = "100ms", startup_timeout = "2s" }
"#,
    );
    let output = flotilla()
        .args([
            "up",
            app.path_str(),
            "-d",
            "--gateway-listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run up -d");
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("sick-1"), "names the instance: {stderr}");
    assert!(
        stderr.contains("starting in mode 'unhealthy'"),
        "shows its last log lines: {stderr}"
    );
    wait_until(
        "the failed fleet to clean up",
        Duration::from_secs(20),
        || !app.path().join(".flotilla/fleet.json").exists(),
    );
}

#[test]
fn detached_up_returns_when_ready_and_down_stops_it() {
    let app = App::new(TWO_SERVICES);
    let output = flotilla()
        .args([
            "up",
            app.path_str(),
            "-d",
            "--gateway-listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run up -d");
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(stdout.contains("pair is up"), "{stdout}");
    assert!(stdout.contains("gateway  http://127.0.0.1:"), "{stdout}");
    let status = run(&["status", "--json", "--dir", app.path_str()]);
    let instances: Vec<Value> = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert!(instances.iter().all(|i| i["health"] == "healthy"));
    let again = run(&["up", app.path_str(), "-d"]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already running"),
        "{}",
        text(&again.stderr)
    );
    let down = run(&["down", app.path_str()]);
    assert!(down.status.success(), "{}", text(&down.stderr));
    for instance in instances {
        assert!(!alive(instance["pid"].as_u64().expect("pid") as u32));
    }
}

#[test]
fn a_taken_port_is_reported_by_name() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let app = App::new(TWO_SERVICES);
    let output = run(&[
        "up",
        app.path_str(),
        "--gateway-listen",
        &addr,
        "--control-listen",
        "127.0.0.1:0",
    ]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("gateway cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("already in use"), "{stderr}");
}

#[test]
fn check_reports_every_error_and_starts_nothing() {
    let app = App::new(
        r#"
app = "broken"

[[gateway.routes]]
prefix = "/x"
service = "nosuch"

[services.a]
run = "python3 echo.py"
replicas = 0
colour = "blue"
"#,
    );
    let output = run(&["check", app.path_str()]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    let manifest = app.path().join("flotilla.toml");
    for location in ["6:11", "10:12", "11:1"] {
        assert!(
            stderr.contains(&format!("{}:{location}", manifest.display())),
            "{location} in:\n{stderr}"
        );
    }
    let up = run(&[
        "up",
        app.path_str(),
        "--gateway-listen",
        "127.0.0.1:0",
        "--control-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(up.status.code(), Some(2));
    assert!(
        !app.path().join(".flotilla").exists(),
        "nothing was started"
    );

    let good = App::new(TWO_SERVICES);
    let output = run(&["check", good.path_str()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("2 services"));
}

#[test]
fn a_failed_build_stops_up_with_its_output() {
    let app = App::new(
        r#"
app = "unbuildable"

[services.broken]
build = "echo compiling; echo 'error: expected one of `;` at src/main.rs:3:7' >&2; exit 4"
run = "python3 echo.py"

[services.fine]
run = "python3 echo.py"
"#,
    );
    let output = run(&[
        "up",
        app.path_str(),
        "--gateway-listen",
        "127.0.0.1:0",
        "--control-listen",
        "127.0.0.1:0",
    ]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("broken"), "names the service: {stderr}");
    assert!(
        stderr.contains("error: expected one of `;` at src/main.rs:3:7"),
        "shows the build output: {stderr}"
    );
    assert!(
        !text(&output.stdout).contains("fine-1"),
        "nothing was started"
    );
}

#[test]
fn logs_follow_streams_new_lines() {
    use std::io::{BufRead, BufReader};
    let app = App::new(TWO_SERVICES);
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let mut follower = flotilla()
        .args(["logs", "front", "-f", "--json", "-C", app.path_str()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn logs -f");
    let stdout = follower.stdout.take().expect("stdout");
    let (found_tx, found_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let record: Value = serde_json::from_str(&line).expect("one JSON record per line");
            assert_eq!(record["service"], "front", "only the asked-for service");
            if record["line"]
                .as_str()
                .is_some_and(|l| l.contains("GET /follow-me"))
            {
                let _ = found_tx.send(());
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        get(&format!("{}/front/follow-me", fleet.gateway)).status(),
        200
    );
    let found = found_rx.recv_timeout(Duration::from_secs(10));
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(found.is_ok(), "the new line was streamed to `logs -f`");
}
