//! End-to-end: `flotilla up examples/shop` builds and boots the reference app with the real
//! binary on free ports, takes an order through the gateway, and survives a killed instance.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn shop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop")
}

#[test]
fn the_shop_takes_an_order_through_the_gateway() {
    // The first build of the shop's Rust services is a release build of its own: give it time.
    let fleet = Fleet::start(&shop_dir(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(900));
    let api = format!("{}/api/v1", fleet.gateway);

    let products: Vec<Value> = get(&format!("{api}/products")).json().expect("products");
    assert!(products.len() >= 3);
    assert!(
        products
            .iter()
            .any(|p| p["price"].as_f64().is_some_and(|price| price > 1000.0))
    );
    let sku = products[0]["sku"].as_str().expect("sku").to_owned();
    let product: Value = get(&format!("{api}/products/{sku}"))
        .json()
        .expect("product");
    assert_eq!(product["sku"], sku.as_str());
    let missing = get(&format!("{api}/products/NOPE-000"));
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );

    let created = post_json(
        &format!("{api}/orders"),
        &json!({"customer": "ada", "items": [{"sku": sku, "qty": 2}]}),
    );
    assert_eq!(created.status(), 201);
    let order: Value = created.json().expect("order");
    assert_eq!(order["status"], "confirmed");
    assert_eq!(order["customer"], "ada");
    let id = order["id"].as_str().expect("id").to_owned();
    let read: Value = get(&format!("{api}/orders/{id}"))
        .json()
        .expect("read back");
    assert_eq!(read["id"], id.as_str());
    assert_eq!(read["items"][0]["qty"], 2);
    one_trace_through_every_service(&fleet, &api, &sku);

    // Bad input is a 4xx problem, never a 500.
    let bad = post_raw(&format!("{api}/orders"), "{not json");
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.headers()["content-type"], "application/problem+json");
    let unknown_sku = post_json(
        &format!("{api}/orders"),
        &json!({"customer": "ada", "items": [{"sku": "NOPE-000", "qty": 1}]}),
    );
    assert_eq!(unknown_sku.status(), 422);
    assert_eq!(get(&format!("{api}/orders/ord_doesnotexist")).status(), 404);

    // Kill an orders instance: it comes back, and the gateway keeps taking orders meanwhile.
    let victim = fleet
        .instances()
        .into_iter()
        .find(|i| i["instance"] == "orders-1")
        .expect("orders-1");
    let old_pid = victim["pid"].as_u64().expect("pid") as u32;
    send_signal(old_pid, libc::SIGKILL);
    // Once the supervisor has seen the death, the registry routes around the dead instance. (A
    // request racing the death itself gets a 502 until retries on connection failure arrive.)
    wait_until(
        "the supervisor to notice orders-1 died",
        Duration::from_secs(10),
        || {
            fleet.instances().iter().any(|i| {
                i["instance"] == "orders-1" && i["pid"].as_u64() != Some(u64::from(old_pid))
            })
        },
    );
    let during = post_json(
        &format!("{api}/orders"),
        &json!({"customer": "bob", "items": [{"sku": sku, "qty": 1}]}),
    );
    assert_eq!(
        during.status(),
        201,
        "orders-2 serves while orders-1 restarts"
    );
    wait_until(
        "orders-1 to restart healthy",
        Duration::from_secs(30),
        || {
            fleet.instances().iter().any(|i| {
                i["instance"] == "orders-1"
                    && i["health"] == "healthy"
                    && i["restarts"].as_u64() >= Some(1)
                    && i["pid"].as_u64().is_some_and(|p| p as u32 != old_pid)
            })
        },
    );
    // The order taken before the crash is still there: each service keeps its own storage.
    let read: Value = get(&format!("{api}/orders/{id}"))
        .json()
        .expect("read back after restart");
    assert_eq!(read["id"], id.as_str());

    cascade(&fleet, &api, &sku);
}

/// Payments hangs: orders keeps answering within its deadline, first with timeouts and then,
/// once the breaker opens, at once; the catalog keeps its latency; nothing piles up; and when
/// payments recovers, a probe closes the breaker again.
fn cascade(fleet: &Fleet, api: &str, sku: &str) {
    let order = json!({"customer": "cascade", "items": [{"sku": sku, "qty": 1}]});
    let catalog_before = slowest_of(10, || {
        assert_eq!(get(&format!("{api}/products")).status(), 200);
    });
    let pid = fleet.child.id();
    let open_files_before = open_files(pid);

    let faults = format!("{}/v1/services/payments/faults", fleet.control);
    let set = client()
        .put(&faults)
        .json(&json!({"delay": "30s"}))
        .send()
        .expect("PUT faults");
    assert_eq!(set.status(), 200, "{}", set.text().unwrap_or_default());

    // Orders answers every call within the payments deadline (2 s) plus its own work.
    let mut fast_fails = 0;
    for attempt in 0..30 {
        let started = Instant::now();
        let answer = post_json(&format!("{api}/orders"), &order);
        let took = started.elapsed();
        assert_eq!(answer.status(), 503, "attempt {attempt}");
        let problem: Value = answer.json().expect("problem+json");
        let detail = problem["detail"].as_str().unwrap_or_default().to_owned();
        assert!(detail.starts_with("payments unavailable"), "{detail}");
        assert!(
            took < Duration::from_secs(4),
            "answered in {took:?}: {detail}"
        );
        if detail.contains("circuit breaker") {
            assert!(
                took < Duration::from_millis(500),
                "an open breaker fails fast: {took:?}"
            );
            fast_fails += 1;
            if fast_fails == 3 {
                break;
            }
        }
    }
    assert_eq!(fast_fails, 3, "the breaker opened within 30 orders");
    let breakers: Vec<Value> = get(&format!("{}/v1/breakers", fleet.control))
        .json()
        .expect("breakers");
    assert!(
        breakers.iter().any(|b| b["service"] == "payments"
            && b["state"] == "open"
            && b["caller"]
                .as_str()
                .is_some_and(|c| c.starts_with("orders-"))),
        "{breakers:?}"
    );

    // The catalog does not notice.
    let catalog_during = slowest_of(10, || {
        assert_eq!(get(&format!("{api}/products")).status(), 200);
    });
    assert!(
        catalog_during < catalog_before + Duration::from_millis(200),
        "catalog slowed from {catalog_before:?} to {catalog_during:?}"
    );
    // Timed-out calls do not leave connections behind.
    let open_files_during = open_files(pid);
    assert!(
        open_files_during < open_files_before + 40,
        "open files grew from {open_files_before} to {open_files_during}"
    );

    // Payments recovers: after the open timeout a probe goes through and orders succeed again.
    let cleared = client().delete(&faults).send().expect("DELETE faults");
    assert_eq!(cleared.status(), 204);
    wait_until("orders to succeed again", Duration::from_secs(30), || {
        post_json(&format!("{api}/orders"), &order).status() == 201
    });
}

/// An order taken with a known `traceparent` is one trace: the gateway's call to orders, and
/// under orders' server span its calls to catalog, inventory, payments and shipping.
fn one_trace_through_every_service(fleet: &Fleet, api: &str, sku: &str) {
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let created = client()
        .post(format!("{api}/orders"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"customer": "tracy", "items": [{"sku": sku, "qty": 1}]}))
        .send()
        .expect("POST order");
    assert_eq!(created.status(), 201);
    let trace: Value = get(&format!("{}/v1/traces/{trace_id}", fleet.control))
        .json()
        .expect("the trace");
    let spans = trace["spans"].as_array().expect("spans");
    let find = |service: &str, kind: &str, peer: &str| {
        spans
            .iter()
            .find(|s| {
                s["service"] == service && s["kind"] == kind && s["http"]["peer_service"] == peer
            })
            .unwrap_or_else(|| panic!("a {kind} span of {service} with {peer}: {spans:#?}"))
    };
    let gateway = find("gateway", "client", "orders");
    assert_eq!(gateway["parent_span_id"], "00f067aa0ba902b7");
    let orders = find("orders", "server", "gateway");
    assert_eq!(orders["parent_span_id"], gateway["span_id"]);
    for callee in ["catalog", "inventory", "payments", "shipping"] {
        let call = find("orders", "client", callee);
        assert_eq!(
            call["parent_span_id"], orders["span_id"],
            "orders → {callee}"
        );
        let served = find(callee, "server", "orders");
        assert_eq!(
            served["parent_span_id"], call["span_id"],
            "{callee} under its caller"
        );
    }
    assert!(spans.iter().all(|s| s["trace_id"] == trace_id));

    // The services log the trace id with each request, so one request's lines can be found
    // across all of them.
    wait_until(
        "every service's line of the traced order",
        Duration::from_secs(10),
        || {
            let lines: Vec<Value> = get(&format!("{}/v1/logs?trace={trace_id}", fleet.control))
                .json()
                .expect("log lines");
            ["catalog", "orders", "inventory", "payments", "shipping"]
                .iter()
                .all(|service| lines.iter().any(|l| l["service"] == *service))
        },
    );

    // Orders announced the confirmation; the broker pushed it to notifications in the same
    // trace, so the customer's notification is one of the order's lines too.
    wait_until(
        "the confirmation notified in the order's trace",
        Duration::from_secs(15),
        || {
            let lines: Vec<Value> = get(&format!(
                "{}/v1/logs?service=notifications&trace={trace_id}",
                fleet.control
            ))
            .json()
            .expect("log lines");
            lines.iter().any(|l| {
                l["line"]
                    .as_str()
                    .is_some_and(|l| l.contains("tracy: order") && l.contains("confirmed"))
            })
        },
    );
    // Shipping subscribes too: the confirmation sends the shipment out.
    wait_until("the shipment dispatched", Duration::from_secs(15), || {
        let lines: Vec<Value> = get(&format!(
            "{}/v1/logs?service=shipping&grep=dispatched",
            fleet.control
        ))
        .json()
        .expect("log lines");
        !lines.is_empty()
    });
    let trace: Value = get(&format!("{}/v1/traces/{trace_id}", fleet.control))
        .json()
        .expect("the trace");
    let spans = trace["spans"].as_array().expect("spans");
    for (service, kind, peer) in [
        ("orders", "client", "flotilla"),
        ("flotilla", "client", "notifications"),
        ("flotilla", "client", "shipping"),
    ] {
        assert!(
            spans.iter().any(|s| s["service"] == service
                && s["kind"] == kind
                && s["http"]["peer_service"] == peer),
            "{service} → {peer} in the order's trace: {spans:#?}"
        );
    }
}

fn slowest_of(times: usize, mut call: impl FnMut()) -> Duration {
    (0..times)
        .map(|_| {
            let started = Instant::now();
            call();
            started.elapsed()
        })
        .max()
        .unwrap_or_default()
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}
