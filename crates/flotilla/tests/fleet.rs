//! End-to-end: the real `flotilla` binary running small Python fleets on ephemeral ports.

mod common;

use std::path::Path;
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
    let instances = status_json(&status.stdout, "instances");
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
            "--otlp-listen",
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
            "--otlp-listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run up -d");
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(stdout.contains("pair is up"), "{stdout}");
    assert!(stdout.contains("gateway  http://127.0.0.1:"), "{stdout}");
    let status = run(&["status", "--json", "--dir", app.path_str()]);
    let instances = status_json(&status.stdout, "instances");
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
        "--otlp-listen",
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
        "--otlp-listen",
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
        "--otlp-listen",
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

/// One list of `flotilla status --json`: `instances` or `breakers`.
fn status_json(stdout: &[u8], list: &str) -> Vec<Value> {
    let status: Value = serde_json::from_slice(stdout).expect("status JSON");
    status[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {status}"))
        .clone()
}

/// A fleet with one service behind `/back`, for the resilience tests.
const ONE_SERVICE: &str = r#"
app = "single"

[[gateway.routes]]
prefix = "/back"
service = "back"

[services.back]
run = "python3 echo.py"
replicas = 2
health = { interval = "200ms" }
"#;

#[test]
fn chaos_disturbs_gateway_calls_until_cleared() {
    let app = App::new(TWO_SERVICES);
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let dir = app.path_str();
    let back = format!("{}/back/x", fleet.gateway);

    let set = run(&["chaos", "back", "--abort", "418", "-C", dir]);
    assert!(set.status.success(), "{}", text(&set.stderr));
    let shown = text(&set.stdout);
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("back ") && l.ends_with("418 on every call")),
        "prints what is in force:\n{shown}"
    );
    for _ in 0..5 {
        let answer = get(&back);
        assert_eq!(answer.status(), 418);
        assert_eq!(answer.headers()["content-type"], "application/problem+json");
        assert_eq!(answer.headers()["x-flotilla-fault"], "abort");
    }
    assert_eq!(
        get(&format!("{}/front/", fleet.gateway)).status(),
        200,
        "other services are untouched"
    );

    // Setting again replaces; percentages are shown as given.
    let set = run(&[
        "chaos",
        "back",
        "--delay",
        "300ms",
        "--delay-percent",
        "50",
        "--abort",
        "503",
        "--abort-percent",
        "20",
        "-C",
        dir,
    ]);
    assert!(set.status.success(), "{}", text(&set.stderr));
    let shown = text(&set.stdout);
    assert!(
        shown.contains("300ms on 50% of calls") && shown.contains("503 on 20% of calls"),
        "{shown}"
    );
    let listed = run(&["chaos", "-C", dir, "--json"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("faults JSON");
    assert_eq!(
        listed,
        serde_json::json!({"back": {"delay": "300ms", "delay_percent": 50, "abort": 503, "abort_percent": 20}})
    );

    let set = run(&["chaos", "back", "--delay", "400ms", "-C", dir]);
    assert!(set.status.success(), "{}", text(&set.stderr));
    let started = std::time::Instant::now();
    assert_eq!(get(&back).status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "delayed: {:?}",
        started.elapsed()
    );

    let clear = run(&["chaos", "back", "--clear", "-C", dir]);
    assert!(clear.status.success(), "{}", text(&clear.stderr));
    assert!(
        text(&clear.stderr).contains("no faults are injected"),
        "{}",
        text(&clear.stderr)
    );
    assert!(text(&clear.stdout).is_empty(), "{}", text(&clear.stdout));
    assert_eq!(get(&back).status(), 200);

    // Refusals by the control API print its detail and exit 1; usage errors exit 2.
    for (args, detail) in [
        (
            vec!["chaos", "back", "--clear"],
            "no faults are injected into `back`",
        ),
        (
            vec!["chaos", "nosuch", "--abort", "503"],
            "no service named `nosuch`",
        ),
        (vec!["chaos", "back", "--abort", "200"], "400 to 599"),
        (
            vec!["chaos", "back", "--abort", "503", "--abort-percent", "120"],
            "0 to 100",
        ),
    ] {
        let refused = run(&[&args[..], &["-C", dir]].concat());
        assert_eq!(refused.status.code(), Some(1), "{args:?}");
        assert!(
            text(&refused.stderr).contains(detail),
            "{args:?}: {}",
            text(&refused.stderr)
        );
    }
    for args in [
        vec!["chaos", "back"],
        vec!["chaos", "back", "--delay", "soon"],
        vec!["chaos", "back", "--clear", "--abort", "503"],
    ] {
        let usage = run(&[&args[..], &["-C", dir]].concat());
        assert_eq!(usage.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn faults_api_round_trips_and_refuses_bad_input() {
    let app = App::new(ONE_SERVICE);
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let faults = format!("{}/v1/services/back/faults", fleet.control);

    let set = put_raw(&faults, r#"{"abort": 503, "abort_percent": 100}"#);
    assert_eq!(set.status(), 200);
    let stored: Value = set.json().expect("faults");
    assert_eq!(
        stored,
        serde_json::json!({"delay_percent": 100, "abort": 503, "abort_percent": 100})
    );
    assert_eq!(
        get_json(&faults).expect("GET faults"),
        stored,
        "read back as stored"
    );
    assert_eq!(
        get_json(&format!("{}/v1/faults", fleet.control)).expect("all faults"),
        serde_json::json!({ "back": stored })
    );
    assert_eq!(get(&format!("{}/back/", fleet.gateway)).status(), 503);

    assert_eq!(delete(&faults).status(), 204);
    assert_eq!(get(&format!("{}/back/", fleet.gateway)).status(), 200);

    let nosuch = format!("{}/v1/services/nosuch/faults", fleet.control);
    for (answer, status, detail) in [
        (delete(&faults), 404, "no faults are injected into `back`"),
        (get(&faults), 404, "no faults are injected into `back`"),
        (
            put_raw(&nosuch, r#"{"abort": 503}"#),
            404,
            "no service named `nosuch`",
        ),
        (delete(&nosuch), 404, "no service named `nosuch`"),
        (put_raw(&faults, "{\"abort\": 5"), 400, "EOF"),
        (put_raw(&faults, r#"{"abort": "teapot"}"#), 422, "abort"),
        (put_raw(&faults, r#"{"dealy": "1s"}"#), 422, "dealy"),
        (
            put_raw(&faults, r#"{"delay": "1s", "delay_percent": 101}"#),
            422,
            "delay_percent",
        ),
        (put_raw(&faults, r#"{"abort": 302}"#), 422, "400 to 599"),
    ] {
        assert_eq!(answer.status(), status, "{detail}");
        assert_eq!(
            answer.headers()["content-type"],
            "application/problem+json",
            "{detail}"
        );
        let problem: Value = answer.json().expect("problem");
        assert_eq!(problem["status"], status);
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains(detail)),
            "{problem}"
        );
    }
    assert_eq!(
        get_json(&format!("{}/v1/faults", fleet.control)).expect("all faults"),
        serde_json::json!({}),
        "nothing refused was stored"
    );
}

#[test]
fn breakers_are_listed_and_shown_by_status() {
    let app = App::new(ONE_SERVICE);
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let breakers_url = format!("{}/v1/breakers", fleet.control);
    assert_eq!(
        get_json(&breakers_url),
        Some(serde_json::json!([])),
        "none before a call"
    );

    assert_eq!(get(&format!("{}/back/", fleet.gateway)).status(), 200);
    let breakers = get_json(&breakers_url).expect("breakers");
    let gateway = breakers
        .as_array()
        .expect("array")
        .iter()
        .find(|b| b["caller"] == "gateway" && b["service"] == "back" && b.get("instance").is_none())
        .cloned()
        .unwrap_or_else(|| panic!("the gateway's breaker for back: {breakers}"));
    assert_eq!(gateway["state"], "closed");
    assert_eq!(gateway["window_calls"], 1);
    assert_eq!(gateway["consecutive_failures"], 0);
    let status = run(&["status", "-C", app.path_str()]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let shown = text(&status.stdout);
    assert!(
        shown.ends_with("\n1 breaker closed, no recent failures\n"),
        "{shown}"
    );

    // Every call to back fails: the gateway's breaker opens and status says when it probes.
    let set = put_raw(
        &format!("{}/v1/services/back/faults", fleet.control),
        r#"{"abort": 503}"#,
    );
    assert_eq!(set.status(), 200);
    wait_until(
        "the gateway's breaker to open",
        Duration::from_secs(10),
        || {
            assert_eq!(get(&format!("{}/back/", fleet.gateway)).status(), 503);
            get_json(&breakers_url).is_some_and(|all| {
                all.as_array().into_iter().flatten().any(|b| {
                    b["caller"] == "gateway" && b.get("instance").is_none() && b["state"] == "open"
                })
            })
        },
    );
    let status = run(&["status", "-C", app.path_str()]);
    let shown = text(&status.stdout);
    assert!(
        shown.lines().any(|l| l.starts_with("gateway ")
            && l.contains(" back ")
            && l.contains("open, half-open in ")),
        "{shown}"
    );
    assert!(shown.contains("CALLER"), "{shown}");
    let status = run(&["status", "--json", "-C", app.path_str()]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert_eq!(status_json(&status.stdout, "instances").len(), 2);
    assert!(
        status_json(&status.stdout, "breakers")
            .iter()
            .any(|b| b["service"] == "back" && b["state"] == "open")
    );
}

/// A child process killed when the test ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn a_separate_sidecar_proxies_to_the_fleet() {
    use std::io::{BufRead, BufReader};
    let app = App::new(TWO_SERVICES);
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));

    let refused = run(&[
        "sidecar",
        "--service",
        "nosuch",
        "--control",
        &fleet.control,
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("no service named `nosuch`"),
        "{}",
        text(&refused.stderr)
    );

    let log = app.path().join("sidecar.log");
    let mut sidecar = Reaped(
        flotilla()
            .args(["sidecar", "--service", "front", "--control", &fleet.control])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn sidecar"),
    );
    let mut first = String::new();
    BufReader::new(sidecar.0.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read");
    let url = first
        .trim()
        .strip_prefix("sidecar for front listening on ")
        .unwrap_or_else(|| {
            panic!(
                "first line {first:?}; stderr:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    // Calls in absolute form, as HTTP_PROXY makes any client send them.
    let client = reqwest::blocking::Client::builder()
        .proxy(reqwest::Proxy::http(&url).expect("proxy"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let call = |target: &str| {
        client
            .get(target)
            .send()
            .unwrap_or_else(|e| panic!("GET {target} via {url}: {e}"))
    };
    let echoed: Value = call("http://back/hello?x=1").json().expect("json");
    assert_eq!(echoed["service"], "back");
    assert_eq!(echoed["path"], "/hello?x=1");
    let unknown = call("http://nosuch/");
    assert_eq!(unknown.status(), 502);
    assert_eq!(
        unknown.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = unknown.json().expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("nosuch")),
        "{problem}"
    );

    // Faults set on the fleet reach the separate sidecar with its next poll, and so does clearing.
    let faults = format!("{}/v1/services/back/faults", fleet.control);
    assert_eq!(put_raw(&faults, r#"{"abort": 418}"#).status(), 200);
    wait_until(
        "the sidecar to inject the fault",
        Duration::from_secs(5),
        || call("http://back/").status() == 418,
    );
    assert_eq!(delete(&faults).status(), 204);
    wait_until(
        "the sidecar to stop injecting it",
        Duration::from_secs(5),
        || call("http://back/").status() == 200,
    );

    send_signal(sidecar.0.id(), libc::SIGTERM);
    wait_until(
        "the sidecar to exit on SIGTERM",
        Duration::from_secs(10),
        || matches!(sidecar.0.try_wait(), Ok(Some(_))),
    );
    let status = sidecar.0.wait().expect("status");
    assert!(
        status.success(),
        "{status}:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// `front` relays every request to `back` through its sidecar and declares a dependency on
/// `spare` that it never calls.
const RELAY: &str = r#"
app = "relay"

[[gateway.routes]]
prefix = "/front"
service = "front"
rewrite = "/"

[services.back]
run = "python3 echo.py"
health = { interval = "200ms" }

[services.spare]
run = "python3 echo.py"
health = { interval = "200ms" }

[services.front]
run = "python3 relay.py"
depends_on = ["back", "spare"]
health = { interval = "200ms" }
"#;

/// A service that answers each request by calling `back` with the same path: through its
/// sidecar (urllib reads `http_proxy`), passing the `traceparent` on, as a service must for its
/// calls to join the trace of the request that caused them.
const RELAY_SERVICE: &str = r#"
import json, signal, threading, urllib.error, urllib.request
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/healthz":
            status, body = 200, b'{"status":"ok"}'
        else:
            headers = {"traceparent": self.headers["traceparent"]} if self.headers["traceparent"] else {}
            request = urllib.request.Request("http://back" + self.path, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    status, body = answer.status, answer.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
"#;

/// The one span of `spans` with this service and kind.
fn span_of<'a>(spans: &'a [Value], service: &str, kind: &str) -> &'a Value {
    let found: Vec<&Value> = spans
        .iter()
        .filter(|s| s["service"] == service && s["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} span of {service}: {spans:#?}");
    found[0]
}

#[test]
fn calls_are_traced_measured_and_mapped() {
    let app = App::new(RELAY);
    std::fs::write(app.path().join("relay.py"), RELAY_SERVICE).expect("write relay.py");
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let dir = app.path_str();

    for _ in 0..3 {
        let answer = get(&format!("{}/front/hello", fleet.gateway));
        assert_eq!(answer.status(), 200, "{}", fleet.output());
        let echoed: Value = answer.json().expect("json");
        assert_eq!(echoed["service"], "back", "relayed through front's sidecar");
        assert_eq!(echoed["path"], "/hello");
    }

    // Listed: one trace per request, each through all three hops' services.
    let mut traces = Vec::new();
    wait_until("three complete traces", Duration::from_secs(10), || {
        traces = get_json(&format!("{}/v1/traces?service=back", fleet.control))
            .and_then(|t| t.as_array().cloned())
            .unwrap_or_default();
        traces.len() == 3 && traces.iter().all(|t| t["spans"] == 4)
    });
    let summary = &traces[0];
    assert_eq!(
        summary["services"],
        serde_json::json!(["back", "front", "gateway"])
    );
    assert_eq!(summary["root_service"], "gateway");
    assert_eq!(summary["error"], false);
    let id = summary["trace_id"].as_str().expect("trace id").to_owned();

    // One trace: gateway (client) → front (server) → front (client) → back (server).
    let trace = get_json(&format!("{}/v1/traces/{id}", fleet.control)).expect("trace");
    assert_eq!(trace["trace_id"], id.as_str());
    let spans = trace["spans"].as_array().expect("spans").clone();
    assert_eq!(spans.len(), 4, "{spans:#?}");
    assert!(spans.iter().all(|s| s["trace_id"] == id.as_str()));
    let gateway = span_of(&spans, "gateway", "client");
    let front_in = span_of(&spans, "front", "server");
    let front_out = span_of(&spans, "front", "client");
    let back = span_of(&spans, "back", "server");
    assert_eq!(gateway["parent_span_id"], Value::Null, "the root");
    assert_eq!(front_in["parent_span_id"], gateway["span_id"]);
    assert_eq!(front_out["parent_span_id"], front_in["span_id"]);
    assert_eq!(back["parent_span_id"], front_out["span_id"]);
    assert_eq!(gateway["http"]["peer_service"], "front");
    assert_eq!(front_out["http"]["peer_service"], "back");
    assert_eq!(front_in["instance"], "front-1");
    assert_eq!(back["http"]["status"], 200);
    let unknown = get(&format!(
        "{}/v1/traces/4bf92f3577b34da6a3ce929d0e0e4736",
        fleet.control
    ));
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        get(&format!("{}/v1/traces/nope", fleet.control)).status(),
        400
    );

    // The CLI: a table of traces, and the waterfall with children indented under parents.
    let listed = run(&["traces", "-C", dir]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let table = text(&listed.stdout);
    assert!(table.starts_with("TRACE "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("gateway: GET front")),
        "{table}"
    );
    let slowest = run(&["traces", "-C", dir, "--slowest", "1", "--json"]);
    assert!(slowest.status.success(), "{}", text(&slowest.stderr));
    let slowest: Vec<Value> = serde_json::from_slice(&slowest.stdout).expect("json");
    assert_eq!(slowest.len(), 1);
    let refused = run(&["traces", "-C", dir, "--service", "nosuch"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("no service named `nosuch`"));

    let shown = run(&["trace", &id, "-C", dir]);
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    let waterfall = text(&shown.stdout);
    println!("{waterfall}");
    assert!(!waterfall.contains('\x1b'), "no colour off a terminal");
    let lines: Vec<&str> = waterfall.lines().collect();
    assert_eq!(lines.len(), 5, "{waterfall}");
    assert!(
        lines[0].starts_with(&format!("trace {id}  ")),
        "{waterfall}"
    );
    assert!(
        lines[0].ends_with("4 spans  back, front, gateway"),
        "{waterfall}"
    );
    for (line, start) in lines[1..].iter().zip([
        "gateway  GET front ",
        "  front/front-1  GET /hello ",
        "    front/front-1  GET back ",
        "      back/back-1  GET /hello ",
    ]) {
        assert!(line.starts_with(start), "{start:?} in\n{waterfall}");
        assert!(line.contains(" |") && line.contains("█"), "{waterfall}");
    }
    let bad = run(&["trace", "nope", "-C", dir]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("not a trace id"),
        "{}",
        text(&bad.stderr)
    );

    // Metrics: per edge and per instance, in a well-formed exposition.
    let response = get(&format!("{}/metrics", fleet.control));
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/plain; version=0.0.4")),
    );
    let metrics = response.text().expect("metrics");
    for line in [
        r#"flotilla_requests_total{caller="gateway",callee="front",class="2xx"} 3"#,
        r#"flotilla_requests_total{caller="front",callee="back",class="2xx"} 3"#,
        r#"flotilla_requests_total{caller="front",callee="back",class="5xx"} 0"#,
        r#"flotilla_request_duration_seconds_count{caller="front",callee="back"} 3"#,
        r#"flotilla_requests_in_flight{caller="gateway",callee="front"} 0"#,
        r#"flotilla_retries_total{caller="front",callee="back"} 0"#,
        r#"flotilla_breaker_state{caller="gateway",service="front"} 0"#,
        r#"flotilla_breaker_state{caller="front-1",service="back"} 0"#,
        r#"flotilla_instance_restarts_total{service="spare",instance="spare-1"} 0"#,
        r#"flotilla_instance_up{service="back",instance="back-1"} 1"#,
        "flotilla_spans_dropped_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
    assert!(metrics.contains(
        r#"flotilla_request_duration_seconds_bucket{caller="gateway",callee="front",le="+Inf"} 3"#
    ));
    check_with("promtool", &["check", "metrics"], &metrics);

    // Health: every service has its one instance healthy.
    let health = get_json(&format!("{}/v1/health", fleet.control)).expect("health");
    assert_eq!(health["status"], "healthy", "{health}");
    let services = health["services"].as_array().expect("services");
    assert_eq!(services.len(), 3);
    for service in services {
        assert_eq!(service["status"], "healthy", "{service}");
        assert_eq!(service["reason"], "1 of 1 instances healthy");
    }

    // The map: both observed edges, declared, and front's unused dependency on spare.
    let map = get_json(&format!("{}/v1/map?window=5m", fleet.control)).expect("map");
    assert_eq!(map["window_seconds"], 300.0);
    let nodes: Vec<&str> = map["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(nodes, ["gateway", "back", "spare", "front"]);
    let edges: Vec<(&str, &str, u64, bool)> = map["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| {
            (
                e["caller"].as_str().unwrap_or_default(),
                e["callee"].as_str().unwrap_or_default(),
                e["requests"].as_u64().unwrap_or_default(),
                e["declared"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        edges,
        [("front", "back", 3, true), ("gateway", "front", 3, true)]
    );
    assert_eq!(
        map["unused"],
        serde_json::json!([{"caller": "front", "callee": "spare"}])
    );
    assert_eq!(
        get(&format!("{}/v1/map?window=forever", fleet.control)).status(),
        400
    );

    let drawn = run(&["map", "-C", dir]);
    assert!(drawn.status.success(), "{}", text(&drawn.stderr));
    let drawn = text(&drawn.stdout);
    println!("{drawn}");
    assert!(
        drawn
            .lines()
            .any(|l| l.starts_with("  front → back ") && l.contains(" req/s  0.0% errors  p50 ")),
        "{drawn}"
    );
    assert!(
        drawn.ends_with("declared in depends_on, no calls in the last 5m:\n  front → spare\n"),
        "{drawn}"
    );
    let dot = run(&["map", "-C", dir, "--format", "dot"]);
    assert!(dot.status.success(), "{}", text(&dot.stderr));
    let dot = text(&dot.stdout);
    assert!(dot.starts_with("digraph flotilla {"), "{dot}");
    assert!(
        dot.contains(r#""front" -> "spare" [label="unused""#),
        "{dot}"
    );
    check_with("dot", &["-Tsvg", "-o", "/dev/null"], &dot);
    let mermaid = run(&["map", "-C", dir, "--format", "mermaid"]);
    assert!(text(&mermaid.stdout).starts_with("graph LR\n"));
    let json = run(&["map", "-C", dir, "--window", "1m", "--json"]);
    let json: Value = serde_json::from_slice(&json.stdout).expect("map json");
    assert_eq!(json["window_seconds"], 60.0);
}

/// Feeds `input` to `program ARGS` (a linter: `promtool`, Graphviz' `dot`) and asserts it is
/// accepted, when the program is installed; prints a note and checks nothing when it is not.
fn check_with(program: &str, args: &[&str], input: &str) {
    use std::io::Write;
    let child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!(
                "note: {program} is not on PATH; `{program} {}` was skipped",
                args.join(" ")
            );
            return;
        }
        Err(e) => panic!("{program}: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .unwrap_or_else(|e| panic!("write to {program}: {e}"));
    let output = child.wait_with_output().expect(program);
    assert!(
        output.status.success(),
        "{program} {} refused it:\n{}{}\n{input}",
        args.join(" "),
        text(&output.stdout),
        text(&output.stderr)
    );
}

const INSTRUMENTED: &str = r#"
app = "otel"

[[gateway.routes]]
prefix = "/tracked"
service = "tracked"
rewrite = "/"

[services.tracked]
run = "python3 tracked.py"
version = "1.2.3"
health = { interval = "200ms" }
"#;

/// A service instrumented the way users instrument theirs: the OpenTelemetry Python SDK with
/// its OTLP/HTTP exporter, configured only by the `OTEL_*` environment Flotilla sets. It
/// continues the incoming trace (W3C `traceparent`) with a SERVER span and a child of its own.
const TRACKED_SERVICE: &str = r#"
import json, os, signal, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

provider = TracerProvider(resource=Resource.create())
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("tracked")
propagator = TraceContextTextMapPropagator()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/healthz":
            body = b'{"status":"ok"}'
        else:
            carrier = {k.lower(): v for k, v in self.headers.items()}
            context = propagator.extract(carrier)
            with tracer.start_as_current_span("handle " + self.path, context=context,
                                              kind=trace.SpanKind.SERVER) as span:
                span.set_attribute("http.request.method", "GET")
                span.set_attribute("url.path", self.path)
                with tracer.start_as_current_span("compute") as inner:
                    inner.set_attribute("rows", 42)
            body = json.dumps({
                "traceparent": self.headers.get("traceparent"),
                "otel": {k: v for k, v in os.environ.items() if k.startswith("OTEL_")},
            }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
"#;

/// Whether this Python has the OpenTelemetry SDK and its OTLP/HTTP exporter (`.ci/run` installs
/// them); says why a test is skipped when it has not.
fn python_has_opentelemetry(test: &str) -> bool {
    let found = std::process::Command::new("python3")
        .args([
            "-c",
            "import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http.trace_exporter",
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        eprintln!(
            "SKIPPED {test}: python3 lacks the OpenTelemetry SDK; \
             `python3 -m pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http` \
             (as .ci/run does) to run it"
        );
    }
    found
}

fn fleet_file(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join(".flotilla/fleet.json")).expect("fleet file");
    serde_json::from_str(&text).expect("fleet file is JSON")
}

#[test]
fn spans_from_an_opentelemetry_sdk_join_the_proxies_trace() {
    if !python_has_opentelemetry("spans_from_an_opentelemetry_sdk_join_the_proxies_trace") {
        return;
    }
    let app = App::new(INSTRUMENTED);
    std::fs::write(app.path().join("tracked.py"), TRACKED_SERVICE).expect("write tracked.py");
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let otlp = fleet_file(app.path())["otlp"]
        .as_str()
        .expect("the fleet file names the OTLP receiver")
        .to_owned();

    let answer = get(&format!("{}/tracked/work", fleet.gateway));
    assert_eq!(answer.status(), 200, "{}", fleet.output());
    let seen: Value = answer.json().expect("json");
    assert_eq!(seen["otel"]["OTEL_EXPORTER_OTLP_ENDPOINT"], otlp.as_str());
    assert_eq!(seen["otel"]["OTEL_SERVICE_NAME"], "tracked");
    assert_eq!(
        seen["otel"]["OTEL_RESOURCE_ATTRIBUTES"],
        "service.instance.id=tracked-1,service.version=1.2.3"
    );
    let traceparent = seen["traceparent"].as_str().expect("a traceparent came in");
    let parts: Vec<&str> = traceparent.split('-').collect();
    let (trace_id, proxy_span) = (parts[1], parts[2]);

    let mut spans = Vec::new();
    wait_until(
        "the SDK's spans in the trace",
        Duration::from_secs(15),
        || {
            spans = get_json(&format!("{}/v1/traces/{trace_id}", fleet.control))
                .and_then(|t| t["spans"].as_array().cloned())
                .unwrap_or_default();
            spans.iter().filter(|s| s["service"] == "tracked").count() >= 3
        },
    );
    // The proxy's SERVER span is the one whose id the service received; the SDK's SERVER span
    // hangs under it and its own child under that.
    let proxy_server = spans
        .iter()
        .find(|s| s["span_id"] == proxy_span)
        .unwrap_or_else(|| panic!("the proxy span {proxy_span}: {spans:#?}"));
    assert_eq!(proxy_server["kind"], "server");
    let handle = spans
        .iter()
        .find(|s| s["name"] == "handle /work")
        .unwrap_or_else(|| panic!("the SDK's span: {spans:#?}"));
    assert_eq!(handle["service"], "tracked");
    assert_eq!(handle["instance"], "tracked-1");
    assert_eq!(handle["kind"], "server");
    assert_eq!(handle["parent_span_id"], proxy_span);
    assert_eq!(handle["trace_id"], trace_id);
    let compute = spans
        .iter()
        .find(|s| s["name"] == "compute")
        .expect("the SDK's child span");
    assert_eq!(compute["parent_span_id"], handle["span_id"]);
    assert_eq!(compute["kind"], "internal");
    assert!(
        compute["attributes"].to_string().contains("rows"),
        "{compute}"
    );
    assert!(spans.iter().any(|s| s["service"] == "gateway"));

    // A malformed payload on the real socket: refused, and nothing of it stored.
    let refused = client_post(
        &format!("{otlp}/v1/traces"),
        "application/x-protobuf",
        b"\x0a\xff\xff",
    );
    assert_eq!(refused, 400);
    let listed = get_json(&format!("{}/v1/traces?service=tracked", fleet.control))
        .and_then(|t| t.as_array().cloned())
        .unwrap_or_default();
    assert_eq!(listed.len(), 1, "{listed:#?}");
}

fn client_post(url: &str, content_type: &str, body: &[u8]) -> u16 {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .post(url)
        .header("content-type", content_type)
        .body(body.to_vec())
        .send()
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
        .status()
        .as_u16()
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS")
}

/// OTLP protobuf with `n` spans of one new trace each, as an SDK's batch would carry them.
fn otlp_batch(batch: usize, n: usize) -> Vec<u8> {
    use flotilla_telemetry::{
        AttributeValue, HttpHop, Span, SpanId, SpanKind, SpanStatus, TraceId,
    };
    let spans: Vec<Span> = (0..n)
        .map(|i| {
            let id = (batch * n + i + 1) as u64;
            let mut trace = [0u8; 16];
            trace[8..].copy_from_slice(&id.to_be_bytes());
            Span {
                trace_id: TraceId(trace),
                span_id: SpanId(id.to_be_bytes()),
                parent_span_id: None,
                service: "flood".into(),
                instance: None,
                name: format!("flood {i}").into(),
                kind: SpanKind::Server,
                start: std::time::SystemTime::now(),
                duration: Duration::from_millis(1),
                status: SpanStatus::Unset,
                status_message: None,
                http: HttpHop::default(),
                attributes: vec![("payload".into(), AttributeValue::Text("x".repeat(200)))],
            }
        })
        .collect();
    flotilla_telemetry::otlp::encode_traces(&spans)
}

#[test]
fn a_flood_of_spans_keeps_memory_bounded() {
    let app = App::new(ONE_SERVICE);
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let otlp = fleet_file(app.path())["otlp"]
        .as_str()
        .expect("otlp")
        .to_owned();
    let url = format!("{otlp}/v1/traces");
    let send = |from: usize, to: usize| {
        for batch in from..to {
            let body = otlp_batch(batch, 2_000);
            assert_eq!(client_post(&url, "application/x-protobuf", &body), 200);
        }
    };
    // Past the in-memory capacity (20,000 spans) several times, then three times as much again: what
    // memory holds must stop growing once the stores are full.
    send(0, 60);
    let full = rss_kib(fleet.child.id());
    send(60, 240);
    let after = rss_kib(fleet.child.id());
    let metrics = get(&format!("{}/metrics", fleet.control))
        .text()
        .expect("metrics");
    let held: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flotilla_trace_spans "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("flotilla_trace_spans in:\n{metrics}"));
    assert!(held <= 20_000.0, "{held} spans held");
    assert!(
        after < full + 64 * 1024,
        "memory grew from {full} KiB to {after} KiB while 360,000 more spans went through"
    );
}

#[test]
fn telemetry_outlives_a_restart_and_logs_stream_as_events() {
    use std::io::{BufRead, BufReader};
    let app = App::new(ONE_SERVICE);
    let mut fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));

    // Server-sent events: subscribed before the line is written, it arrives as one `log` event.
    let stream = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
        .get(format!("{}/v1/logs/stream?grep=remember-me", fleet.control))
        .send()
        .expect("open the event stream");
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream.headers()["content-type"].to_str().ok(),
        Some("text/event-stream")
    );
    let (event_tx, event_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut event = String::new();
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if line.is_empty() {
                let _ = event_tx.send(std::mem::take(&mut event));
            } else {
                event.push_str(&line);
                event.push('\n');
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    let answer = get(&format!("{}/back/remember-me", fleet.gateway));
    assert_eq!(answer.status(), 200);
    let echoed: Value = answer.json().expect("json");
    let traceparent = echoed["headers"]["traceparent"]
        .as_str()
        .expect("traceparent");
    let trace_id = traceparent.split('-').nth(1).expect("trace id").to_owned();

    let event = event_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a log event");
    let data = event
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("a data line in {event:?}"));
    assert!(event.starts_with("event: log\n"), "{event:?}");
    let record: Value = serde_json::from_str(data).expect("the record as JSON");
    assert_eq!(record["service"], "back");
    assert!(
        record["line"]
            .as_str()
            .unwrap_or("")
            .contains("remember-me")
    );

    wait_until("the trace", Duration::from_secs(10), || {
        get(&format!("{}/v1/traces/{trace_id}", fleet.control)).status() == 200
    });
    fleet.signal(libc::SIGTERM);
    assert_eq!(fleet.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(
        app.path().join(".flotilla/telemetry/telemetry.db").exists(),
        "the durable store is under .flotilla/telemetry/"
    );

    // A new run: memory is empty, the durable tier still answers.
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let lines = get_json(&format!("{}/v1/logs?grep=REMEMBER-me", fleet.control))
        .and_then(|l| l.as_array().cloned())
        .unwrap_or_default();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["service"], "back");
    assert_eq!(
        lines[0]["version"], "0.0.0",
        "stored with the service's version"
    );
    let by_trace = get_json(&format!("{}/v1/logs?trace={trace_id}", fleet.control))
        .and_then(|l| l.as_array().cloned())
        .unwrap_or_default();
    assert!(!by_trace.is_empty(), "the line carries the trace id");
    let trace = get_json(&format!("{}/v1/traces/{trace_id}", fleet.control))
        .unwrap_or_else(|| panic!("trace {trace_id} after the restart"));
    let spans = trace["spans"].as_array().expect("spans");
    assert!(
        spans.iter().any(|s| s["service"] == "gateway"),
        "{spans:#?}"
    );
    let listed = get_json(&format!("{}/v1/traces?service=back", fleet.control))
        .and_then(|t| t.as_array().cloned())
        .unwrap_or_default();
    assert!(listed.iter().any(|t| t["trace_id"] == trace_id.as_str()));
}

#[test]
fn spans_and_lines_are_exported_to_an_otlp_collector() {
    // The collector is another fleet's OTLP receiver: a real OTLP/HTTP endpoint.
    let collector_app = App::new(ONE_SERVICE);
    let collector = Fleet::start(collector_app.path(), &[]);
    collector.wait_phase("ready", Duration::from_secs(60));
    let endpoint = fleet_file(collector_app.path())["otlp"]
        .as_str()
        .expect("otlp")
        .to_owned();

    let app = App::new(&format!(
        "{}\n[telemetry]\notlp_endpoint = \"{endpoint}\"\n",
        ONE_SERVICE.replace("app = \"single\"", "app = \"exporting\"")
    ));
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let answer = get(&format!("{}/back/exported", fleet.gateway));
    assert_eq!(answer.status(), 200);
    let echoed: Value = answer.json().expect("json");
    let traceparent = echoed["headers"]["traceparent"]
        .as_str()
        .expect("traceparent");
    let trace_id = traceparent.split('-').nth(1).expect("trace id");

    let mut spans = Vec::new();
    wait_until(
        "the exported spans at the collector",
        Duration::from_secs(15),
        || {
            spans = get_json(&format!("{}/v1/traces/{trace_id}", collector.control))
                .and_then(|t| t["spans"].as_array().cloned())
                .unwrap_or_default();
            spans.len() >= 2
        },
    );
    assert!(
        spans
            .iter()
            .any(|s| s["service"] == "gateway" && s["kind"] == "client")
    );
    let server = spans
        .iter()
        .find(|s| s["kind"] == "server")
        .unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(server["service"], "back");
    assert_eq!(server["http"]["path"], "/back/exported");
    let mut lines = Vec::new();
    wait_until(
        "the exported log line at the collector",
        Duration::from_secs(15),
        || {
            lines = get_json(&format!("{}/v1/logs?trace={trace_id}", collector.control))
                .and_then(|l| l.as_array().cloned())
                .unwrap_or_default();
            !lines.is_empty()
        },
    );
    assert!(
        lines[0]["line"]
            .as_str()
            .unwrap_or("")
            .contains("/back/exported")
    );
    let metrics = get(&format!("{}/metrics", fleet.control))
        .text()
        .expect("metrics");
    assert!(
        metrics.contains("flotilla_otlp_exported_total{signal=\"spans\"}"),
        "{metrics}"
    );
}

const EVENTFUL: &str = r#"
app = "eventful"

[[gateway.routes]]
prefix = "/back"
service = "back"

[services.back]
run = "python3 echo.py"
health = { interval = "200ms" }

[services.shipper]
run = "python3 subscriber.py"
health = { interval = "200ms" }

[services.flaky]
run = "python3 subscriber.py"
env = { MODE = "flaky" }
health = { interval = "200ms" }

[events]
max_event_size = "2KiB"

[topics."order.placed"]
partitions = 2

[[subscriptions]]
topic = "order.placed"
service = "shipper"
path = "/events/order-placed"

[[subscriptions]]
topic = "order.placed"
service = "flaky"
path = "/events"
max_attempts = 2
backoff = "50ms"
"#;

/// Logs each event it is pushed (id, type, the traceparent it came with); in `flaky` mode it
/// refuses events whose data says `"fail": true`.
const SUBSCRIBER: &str = r#"
import json, os, signal, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

mode = os.environ.get("MODE", "")

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self, status, body=b"{}"):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.answer(200)
    def do_POST(self):
        event = json.loads(self.rfile.read(int(self.headers["content-length"])))
        failing = mode == "flaky" and (event.get("data") or {}).get("fail")
        print(f"EVENT {event['id']} {event['type']} {self.path} {self.headers.get('content-type')} "
              f"traceparent={self.headers.get('traceparent')} {'refused' if failing else 'ok'}", flush=True)
        self.answer(500 if failing else 200, b'{"error":"cannot take it"}' if failing else b"{}")
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
"#;

fn lines_of(fleet: &Fleet, service: &str, grep: &str) -> Vec<String> {
    get_json(&format!(
        "{}/v1/logs?service={service}&grep={grep}",
        fleet.control
    ))
    .and_then(|l| l.as_array().cloned())
    .unwrap_or_default()
    .iter()
    .filter_map(|r| r["line"].as_str().map(str::to_owned))
    .collect()
}

#[test]
fn events_are_published_through_the_sidecar_and_pushed_to_every_subscriber() {
    let app = App::new(EVENTFUL);
    std::fs::write(app.path().join("subscriber.py"), SUBSCRIBER).expect("write subscriber.py");
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let dir = app.path_str();

    // Publish as the `back` service does: through its sidecar, to the reserved host.
    let echoed: Value = get(&format!("{}/back/who", fleet.gateway))
        .json()
        .expect("json");
    let sidecar = echoed["proxy"].as_str().expect("back's sidecar").to_owned();
    let via_sidecar = reqwest::blocking::Client::builder()
        .proxy(reqwest::Proxy::http(&sidecar).expect("proxy"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let publish = |body: &str, content_type: &str| {
        via_sidecar
            .post("http://flotilla/v1/topics/order.placed/events")
            .header("content-type", content_type)
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .body(body.to_owned())
            .send()
            .expect("publish")
    };
    let answer = publish(
        r#"{"specversion":"1.0","type":"order.placed","subject":"ord_1","data":{"total":12}}"#,
        "application/cloudevents+json",
    );
    assert_eq!(answer.status(), 202);
    let published: Value = answer.json().expect("json");
    let id = published["id"].as_str().expect("id").to_owned();
    assert_eq!(published["topic"], "order.placed");

    // Both subscribers get it, once, as structured CloudEvents continuing the trace.
    wait_until("both deliveries", Duration::from_secs(15), || {
        !lines_of(&fleet, "shipper", &id).is_empty() && !lines_of(&fleet, "flaky", &id).is_empty()
    });
    let shipped = lines_of(&fleet, "shipper", &id);
    assert_eq!(shipped.len(), 1, "{shipped:?}");
    assert!(
        shipped[0].contains("order.placed /events/order-placed application/cloudevents+json"),
        "{shipped:?}"
    );
    assert!(
        shipped[0].contains(trace_id),
        "the delivery continues the trace: {shipped:?}"
    );
    let stored: Value = get_json(&format!(
        "{}/v1/topics/order.placed/events?partition={}&from={}&limit=1",
        fleet.control, published["partition"], published["offset"]
    ))
    .expect("stored events");
    assert_eq!(
        stored[0]["event"]["source"], "/services/back",
        "the sidecar names the publisher"
    );
    assert_eq!(stored[0]["event"]["data"]["total"], 12);

    // A refused event is retried, then dead-lettered with the reason; the other subscriber is
    // not held up.
    let answer = publish(
        r#"{"specversion":"1.0","type":"order.placed","subject":"ord_2","data":{"fail":true}}"#,
        "application/cloudevents+json",
    );
    assert_eq!(answer.status(), 202);
    let doomed: Value = answer.json().expect("json");
    let doomed_id = doomed["id"].as_str().expect("id").to_owned();
    wait_until("the dead letter", Duration::from_secs(15), || {
        get_json(&format!("{}/v1/topics/order.placed", fleet.control))
            .is_some_and(|t| t["dead_letters"] == 1)
    });
    assert_eq!(
        lines_of(&fleet, "flaky", &doomed_id).len(),
        2,
        "max_attempts = 2"
    );
    assert_eq!(lines_of(&fleet, "shipper", &doomed_id).len(), 1);
    wait_until("event figures in /metrics", Duration::from_secs(10), || {
        let metrics = get(&format!("{}/metrics", fleet.control))
            .text()
            .unwrap_or_default();
        metrics.contains("flotilla_event_dead_letters{topic=\"order.placed\"} 1")
            && metrics.contains(
                "flotilla_events_dead_lettered_total{topic=\"order.placed\",subscriber=\"flaky\"} 1",
            )
            && metrics
                .contains("flotilla_event_lag{topic=\"order.placed\",subscriber=\"shipper\"} 0")
    });
    let dead: Value = get_json(&format!(
        "{}/v1/topics/order.placed.dlq/events",
        fleet.control
    ))
    .expect("dead letters");
    assert_eq!(dead[0]["event"]["id"], doomed_id.as_str());
    assert_eq!(dead[0]["event"]["deadlettersubscriber"], "flaky");
    assert!(
        dead[0]["event"]["deadletterreason"]
            .as_str()
            .is_some_and(|r| r.contains("500")),
        "{dead:#}"
    );

    // The CLI: overview, publish, replay, redrive.
    let listed = run(&["events", "-C", dir]);
    let out = text(&listed.stdout);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert!(
        out.contains("order.placed") && out.contains("DEAD LETTERS"),
        "{out}"
    );
    assert!(
        out.contains("shipper") && out.contains("/events/order-placed"),
        "{out}"
    );
    let cli = run(&[
        "publish",
        "order.placed",
        r#"{"total": 3}"#,
        "--type",
        "order.placed",
        "-C",
        dir,
    ]);
    assert!(cli.status.success(), "{}", text(&cli.stderr));
    let cli_id = text(&cli.stdout)
        .split_whitespace()
        .nth(1)
        .expect("published ID")
        .to_owned();
    wait_until("the CLI's event delivered", Duration::from_secs(15), || {
        !lines_of(&fleet, "shipper", &cli_id).is_empty()
    });
    let replay = run(&[
        "events",
        "replay",
        "order.placed",
        "--to",
        "shipper",
        "--from",
        "0",
        "-C",
        dir,
    ]);
    assert!(replay.status.success(), "{}", text(&replay.stderr));
    wait_until("the replay", Duration::from_secs(15), || {
        lines_of(&fleet, "shipper", &id).len() == 2
    });
    assert_eq!(
        lines_of(&fleet, "flaky", &id).len(),
        1,
        "only the named subscriber replays"
    );
    let redrive = run(&["events", "redrive", "order.placed.dlq", "-C", dir]);
    assert!(redrive.status.success(), "{}", text(&redrive.stderr));
    assert!(
        text(&redrive.stdout).contains("redrove 1 events"),
        "{}",
        text(&redrive.stdout)
    );
    assert_eq!(
        lines_of(&fleet, "flaky", &doomed_id).len(),
        4,
        "two more attempts"
    );

    // Bad input loses nothing and stores nothing.
    let before = get_json(&format!("{}/v1/topics/order.placed", fleet.control)).expect("topic");
    for (body, content_type, status) in [
        ("not json", "application/cloudevents+json", 400),
        (r#"{"type":"t"}"#, "application/cloudevents+json", 400),
        (
            r#"{"specversion":"1.0"}"#,
            "application/cloudevents+json",
            400,
        ),
        ("hello", "text/plain", 415),
    ] {
        let answer = publish(body, content_type);
        assert_eq!(answer.status(), status, "{body}");
        assert_eq!(
            answer.headers()["content-type"].to_str().ok(),
            Some("application/problem+json")
        );
    }
    let big = format!(
        r#"{{"specversion":"1.0","type":"t","data":"{}"}}"#,
        "x".repeat(4096)
    );
    assert_eq!(publish(&big, "application/cloudevents+json").status(), 413);
    let unknown = via_sidecar
        .post("http://flotilla/v1/topics/nope/events")
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","type":"t"}"#)
        .send()
        .expect("publish");
    assert_eq!(unknown.status(), 404);
    let after = get_json(&format!("{}/v1/topics/order.placed", fleet.control)).expect("topic");
    assert_eq!(
        before["partitions"], after["partitions"],
        "nothing was stored"
    );

    // Deliveries are calls like any other: on the map as flotilla → subscriber.
    let map = get_json(&format!("{}/v1/map", fleet.control)).expect("map");
    let edges = map["edges"].to_string();
    assert!(edges.contains("\"flotilla\""), "{edges}");
}

#[test]
fn events_flow_through_nats_jetstream_too() {
    let Ok(url) = std::env::var("FLOTILLA_TEST_NATS_URL") else {
        eprintln!(
            "SKIPPED events_flow_through_nats_jetstream_too: FLOTILLA_TEST_NATS_URL is not set"
        );
        return;
    };
    let app_name = format!("natsy{:08x}", std::process::id());
    let manifest = EVENTFUL
        .replace("app = \"eventful\"", &format!("app = \"{app_name}\""))
        .replace(
            "[events]\n",
            &format!("[events]\nbackend = \"nats\"\nurl = \"{url}\"\n"),
        );
    let app = App::new(&manifest);
    std::fs::write(app.path().join("subscriber.py"), SUBSCRIBER).expect("write subscriber.py");
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let dir = app.path_str();
    let published = run(&[
        "publish",
        "order.placed",
        r#"{"fail": true}"#,
        "--type",
        "order.placed",
        "--subject",
        "ord_9",
        "-C",
        dir,
    ]);
    assert!(published.status.success(), "{}", text(&published.stderr));
    let id = text(&published.stdout)
        .split_whitespace()
        .nth(1)
        .expect("published ID")
        .to_owned();
    wait_until(
        "delivered, and dead-lettered at flaky",
        Duration::from_secs(20),
        || {
            !lines_of(&fleet, "shipper", &id).is_empty()
                && get_json(&format!("{}/v1/topics/order.placed", fleet.control))
                    .is_some_and(|t| t["dead_letters"] == 1)
        },
    );
    assert_eq!(lines_of(&fleet, "flaky", &id).len(), 2, "max_attempts = 2");
}
