//! End-to-end: sagas in a running fleet, started from the CLI, by an event and through the API,
//! on the embedded store and on PostgreSQL.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn manifest(store: &str) -> String {
    format!(
        r#"
app = "sagas"

[services.echo]
run = "python3 echo.py"
health = {{ interval = "200ms" }}

[topics."thing.happened"]

[sagas]
store = "{store}"

# The echo service answers every GET with what it saw: path and headers.
[sagas.fetch]
timeout = "20s"
trigger = {{ topic = "thing.happened" }}

[[sagas.fetch.steps]]
name = "one"
action = {{ call = "GET echo /things/{{{{input.id}}}}" }}

[[sagas.fetch.steps]]
name = "two"
action = {{ call = "GET echo /after/{{{{steps.one.response.instance}}}}" }}
"#
    )
}

fn saga_cli(fleet: &Fleet, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["saga"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--control", &fleet.control]);
    let out = run(&all);
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn started_from_the_cli_by_an_event_and_through_the_api(fleet: &Fleet) {
    // From the CLI, waiting for the outcome.
    let (ok, stdout, stderr) = saga_cli(
        fleet,
        &[
            "start",
            "fetch",
            r#"{"id": "a b/c"}"#,
            "--wait",
            "20s",
            "--json",
        ],
    );
    assert!(ok, "{stdout}\n{stderr}");
    let saga: Value = serde_json::from_str(&stdout).expect("saga json");
    assert_eq!(saga["status"], "completed", "{saga:#}");
    let id = saga["id"].as_str().expect("id").to_owned();
    let one = &saga["steps"][0]["action"];
    assert_eq!(one["status"], "succeeded");
    // The template's value stays inside one path segment.
    assert_eq!(one["response"]["path"], "/things/a%20b%2Fc");
    assert_eq!(
        one["response"]["headers"]["idempotency-key"],
        format!("{id}/one/action")
    );
    let two = &saga["steps"][1]["action"]["response"];
    assert_eq!(
        two["path"],
        format!("/after/{}", one["response"]["instance"].as_str().unwrap())
    );
    // Flotilla called the service through the proxy stack: the call is on the map.
    wait_until(
        "flotilla → echo on the map",
        Duration::from_secs(10),
        || {
            get_json(&format!("{}/v1/map", fleet.control)).is_some_and(|map| {
                map["edges"].as_array().is_some_and(|edges| {
                    edges
                        .iter()
                        .any(|e| e["caller"] == "flotilla" && e["callee"] == "echo")
                })
            })
        },
    );

    // By an event: the event's data is the input; the same event twice is one saga.
    let event = r#"{"specversion":"1.0","id":"evt-1","source":"/test","type":"thing.happened","data":{"id":"from-event"}}"#;
    for _ in 0..2 {
        let out = run(&[
            "publish",
            "thing.happened",
            event,
            "--control",
            &fleet.control,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    wait_until("the triggered saga", Duration::from_secs(15), || {
        get_json(&format!("{}/v1/sagas?status=completed", fleet.control))
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|sagas| sagas.len() == 2)
    });
    std::thread::sleep(Duration::from_millis(500));
    let all: Vec<Value> = get(&format!("{}/v1/sagas", fleet.control))
        .json()
        .expect("list");
    assert_eq!(
        all.len(),
        2,
        "a redelivered event starts nothing new: {all:#?}"
    );
    let triggered = all
        .iter()
        .find(|s| s["id"] != id.as_str())
        .expect("triggered");
    let triggered: Value = get(&format!(
        "{}/v1/sagas/{}",
        fleet.control,
        triggered["id"].as_str().unwrap()
    ))
    .json()
    .expect("saga");
    assert_eq!(triggered["input"], json!({"id": "from-event"}));
    assert_eq!(triggered["key"], "event:/test:evt-1");

    // Through the API, with an idempotency key: the second start is the first saga.
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let start = || {
        client
            .post(format!("{}/v1/sagas/fetch", fleet.control))
            .header("idempotency-key", "k-1")
            .json(&json!({"id": "keyed"}))
            .send()
            .expect("start")
    };
    let first = start();
    assert_eq!(first.status(), 202);
    let location = first.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let first: Value = first.json().expect("json");
    let second = start();
    assert_eq!(second.status(), 200);
    let second: Value = second.json().expect("json");
    assert_eq!(first["id"], second["id"]);
    assert!(!second["created"].as_bool().unwrap());
    let waited: Value = get(&format!("{}{location}?wait=10s", fleet.control))
        .json()
        .expect("wait");
    assert_eq!(waited["status"], "completed");

    // Bad requests are 4xx problems.
    for (status, response) in [
        (
            404,
            client
                .post(format!("{}/v1/sagas/nope", fleet.control))
                .body("{}")
                .send(),
        ),
        (
            400,
            client
                .post(format!("{}/v1/sagas/fetch", fleet.control))
                .body("{not json")
                .send(),
        ),
        (
            404,
            client
                .get(format!("{}/v1/sagas/sg_nope", fleet.control))
                .send(),
        ),
        (
            400,
            client
                .get(format!("{}/v1/sagas?status=bogus", fleet.control))
                .send(),
        ),
        (
            400,
            client
                .get(format!("{}/v1/sagas/{id}?wait=soon", fleet.control))
                .send(),
        ),
    ] {
        let response = response.expect("request");
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }

    // The CLI's list and timeline; the metrics.
    let (ok, listed, _) = saga_cli(fleet, &["list", "--status", "completed"]);
    assert!(ok);
    assert_eq!(
        listed.lines().filter(|l| l.contains("fetch")).count(),
        3,
        "{listed}"
    );
    let (ok, shown, _) = saga_cli(fleet, &["show", &id]);
    assert!(ok);
    assert!(
        shown.contains("completed") && shown.contains("one") && shown.contains("two"),
        "{shown}"
    );
    let metrics = get(&format!("{}/metrics", fleet.control))
        .text()
        .expect("metrics");
    assert!(
        metrics.contains(r#"flotilla_sagas_finished_total{saga="fetch",status="completed"} 3"#),
        "{metrics}"
    );
}

#[test]
fn sagas_run_on_the_embedded_store() {
    let app = App::new(&manifest("sqlite"));
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    started_from_the_cli_by_an_event_and_through_the_api(&fleet);
    assert!(app.path().join(".flotilla/sagas/sagas.db").is_file());
}

#[test]
fn sagas_run_on_postgresql() {
    let Ok(url) = std::env::var("FLOTILLA_TEST_POSTGRES_URL") else {
        eprintln!("skipped: FLOTILLA_TEST_POSTGRES_URL is not set");
        return;
    };
    let app = App::new(&manifest(&url));
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    // The shared tables hold other runs' sagas: this run's are told apart by their input.
    let (ok, stdout, stderr) = saga_cli(
        &fleet,
        &[
            "start",
            "fetch",
            r#"{"id": "pg"}"#,
            "--wait",
            "20s",
            "--json",
        ],
    );
    assert!(ok, "{stdout}\n{stderr}");
    let saga: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(saga["status"], "completed");
    assert_eq!(saga["steps"][0]["action"]["response"]["path"], "/things/pg");
    assert!(!app.path().join(".flotilla/sagas").exists());
}
