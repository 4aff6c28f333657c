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
    // The test owns the checkout's shop state: stock sold by earlier runs would run out.
    let _ = std::fs::remove_dir_all(shop_dir().join(".flotilla"));
    // The first build of the shop's Rust services is a release build of its own: give it time.
    let mut fleet = Fleet::start(&shop_dir(), &[]);
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
    facades_compose_the_order(&fleet, &id);

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

    declined_order_is_compensated(&fleet, &api, &products);

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
    fleet = crash_in_the_middle_of_sagas(fleet, &products);
    drop(fleet);
}

/// The web facade gives the whole order with its payment and shipment in one answer; the mobile
/// facade the few fields a phone shows.
fn facades_compose_the_order(fleet: &Fleet, id: &str) {
    let web: Value = get(&format!("{}/web/orders/{id}", fleet.gateway))
        .json()
        .expect("web order");
    assert_eq!(web["order"]["id"], id, "{web:#}");
    assert_eq!(web["order"]["status"], "confirmed", "{web:#}");
    assert_eq!(web["payment"][0]["order_id"], id, "{web:#}");
    assert_eq!(web["shipment"][0]["order_id"], id, "{web:#}");
    let mobile = get(&format!("{}/mobile/orders/{id}", fleet.gateway));
    assert!(mobile.headers().get("flotilla-degraded").is_none());
    let mobile: Value = mobile.json().expect("mobile order");
    let order = mobile["order"].as_object().expect("order object");
    let mut keys: Vec<&str> = order.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["id", "status", "total"], "{mobile:#}");
    let shipment = mobile["shipment"][0].as_object().expect("shipment object");
    assert_eq!(
        shipment.keys().map(String::as_str).collect::<Vec<_>>(),
        ["status"],
        "{mobile:#}"
    );
    let unknown = get(&format!("{}/web/orders/ord_doesnotexist", fleet.gateway));
    assert_eq!(unknown.status(), 404);
}

/// The catalog's expensive product is over the payments limit: the saga reserves the stock,
/// payments declines (402), the stock is released and the order ends `cancelled`.
fn declined_order_is_compensated(fleet: &Fleet, api: &str, products: &[Value]) {
    let expensive = products
        .iter()
        .find(|p| p["price"].as_f64().is_some_and(|price| price > 1000.0))
        .and_then(|p| p["sku"].as_str())
        .expect("an expensive product");
    let declined = post_json(
        &format!("{api}/orders"),
        &json!({"customer": "rich", "items": [{"sku": expensive, "qty": 1}]}),
    );
    assert_eq!(declined.status(), 402);
    let problem: Value = declined.json().expect("problem+json");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("declined"), "{detail}");

    let sagas: Vec<Value> = get(&format!(
        "{}/v1/sagas?name=place-order&status=compensated",
        fleet.control
    ))
    .json()
    .expect("sagas");
    let saga = sagas
        .iter()
        .find(|s| s["error"]["status"] == 402)
        .expect("the declined order's saga, compensated");
    let id = saga["id"].as_str().expect("id");
    let saga: Value = get(&format!("{}/v1/sagas/{id}", fleet.control))
        .json()
        .expect("the saga");
    let order_id = saga["input"]["order_id"]
        .as_str()
        .expect("order id")
        .to_owned();
    let steps = saga["steps"].as_array().expect("steps");
    assert_eq!(steps[0]["name"], "reserve-stock");
    assert_eq!(steps[0]["action"]["status"], "succeeded");
    assert_eq!(steps[0]["compensate"]["status"], "succeeded");
    assert_eq!(steps[1]["name"], "authorize-payment");
    assert_eq!(steps[1]["action"]["status"], "failed");
    assert_eq!(steps[1]["action"]["http_status"], 402);
    assert_eq!(steps[2]["action"]["status"], "pending");

    let order: Value = get(&format!("{api}/orders/{order_id}"))
        .json()
        .expect("order");
    assert_eq!(order["status"], "cancelled");
    let reservations = on_service(
        fleet,
        "inventory",
        &format!("/reservations?order_id={order_id}"),
    );
    assert_eq!(reservations[0]["status"], "released", "{reservations}");

    // The CLI shows the same timeline.
    let shown = run(&["saga", "show", id, "--control", &fleet.control]);
    let text = text(&shown.stdout);
    assert!(shown.status.success(), "{}", self::text(&shown.stderr));
    assert!(
        text.contains("compensated") && text.contains("reserve-stock"),
        "{text}"
    );
    assert!(text.contains("402"), "{text}");
}

/// A GET straight to one instance of a service the gateway does not route.
fn on_service(fleet: &Fleet, service: &str, path: &str) -> Value {
    let port = fleet
        .instances()
        .into_iter()
        .find(|i| i["service"] == service && i["health"] == "healthy")
        .and_then(|i| i["port"].as_u64())
        .unwrap_or_else(|| panic!("a healthy {service} instance"));
    get(&format!("http://127.0.0.1:{port}{path}"))
        .json()
        .expect("json")
}

/// `kill -9` of Flotilla while orders are in the middle of their sagas: after a restart every
/// saga ends completed or compensated, and the services agree with it — no stock held, no
/// payment authorized and no shipment left for a cancelled order.
fn crash_in_the_middle_of_sagas(mut fleet: Fleet, products: &[Value]) -> Fleet {
    let api = format!("{}/api/v1", fleet.gateway);
    let faults = format!("{}/v1/services/payments/faults", fleet.control);
    // Slow payments keep many sagas between two steps at the moment of the crash.
    let set = client()
        .put(&faults)
        .json(&json!({"delay": "800ms"}))
        .send()
        .expect("PUT faults");
    assert_eq!(set.status(), 200);
    let cheap = products[1]["sku"].as_str().expect("sku").to_owned();
    let expensive = products
        .iter()
        .find(|p| p["price"].as_f64().is_some_and(|price| price > 1000.0))
        .and_then(|p| p["sku"].as_str())
        .expect("expensive")
        .to_owned();
    let orders: Vec<_> = (0..24)
        .map(|i| {
            let api = api.clone();
            let sku = if i % 4 == 3 { expensive.clone() } else { cheap.clone() };
            std::thread::spawn(move || {
                let _ = client()
                    .post(format!("{api}/orders"))
                    .json(&json!({"customer": format!("crash-{i}"), "items": [{"sku": sku, "qty": 1}]}))
                    .send();
            })
        })
        .collect();
    wait_until("sagas in flight", Duration::from_secs(20), || {
        get_json(&format!("{}/v1/sagas?status=running", fleet.control))
            .and_then(|v| v.as_array().map(Vec::len))
            .is_some_and(|n| n >= 5)
    });
    fleet.child.kill().expect("kill -9 flotilla");
    let _ = fleet.child.wait();
    for order in orders {
        let _ = order.join();
    }
    drop(fleet);

    let fleet = Fleet::start(&shop_dir(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(120));
    // The fault was the old process's; the new one calls payments at full speed.
    wait_until("every saga to end", Duration::from_secs(90), || {
        ["running", "compensating"].iter().all(|status| {
            get_json(&format!("{}/v1/sagas?status={status}", fleet.control))
                .and_then(|v| v.as_array().map(Vec::is_empty))
                .unwrap_or(false)
        })
    });
    assert!(
        fleet.output().contains("unfinished sagas"),
        "the restart resumed the sagas the crash interrupted:\n{}",
        fleet.output()
    );
    let sagas: Vec<Value> = get(&format!(
        "{}/v1/sagas?name=place-order&limit=1000",
        fleet.control
    ))
    .json()
    .expect("sagas");
    let mut seen = std::collections::BTreeMap::new();
    for saga in &sagas {
        let status = saga["status"].as_str().expect("status").to_owned();
        assert!(
            status == "completed" || status == "compensated",
            "saga {} ended {status}",
            saga["id"]
        );
        *seen.entry(status.clone()).or_insert(0) += 1;
        let detail: Value = get(&format!(
            "{}/v1/sagas/{}",
            fleet.control,
            saga["id"].as_str().unwrap()
        ))
        .json()
        .expect("saga");
        let order_id = detail["input"]["order_id"]
            .as_str()
            .expect("order id")
            .to_owned();
        let reservations = on_service(
            &fleet,
            "inventory",
            &format!("/reservations?order_id={order_id}"),
        );
        let authorizations = on_service(
            &fleet,
            "payments",
            &format!("/authorizations?order_id={order_id}"),
        );
        let shipments = on_service(
            &fleet,
            "shipping",
            &format!("/shipments?order_id={order_id}"),
        );
        let statuses = |list: &Value| -> Vec<String> {
            list.as_array()
                .expect("list")
                .iter()
                .map(|r| r["status"].as_str().unwrap_or_default().to_owned())
                .collect()
        };
        if status == "completed" {
            assert_eq!(statuses(&reservations), ["reserved"], "{order_id}");
            assert_eq!(statuses(&authorizations), ["authorized"], "{order_id}");
            assert_eq!(shipments.as_array().map(Vec::len), Some(1), "{order_id}");
            let order: Value = get(&format!("{}/api/v1/orders/{order_id}", fleet.gateway))
                .json()
                .expect("order");
            assert_eq!(order["status"], "confirmed", "{order_id}");
        } else {
            assert!(
                statuses(&reservations).iter().all(|s| s == "released"),
                "{order_id}: {reservations}"
            );
            assert!(
                statuses(&authorizations).iter().all(|s| s == "voided"),
                "{order_id}: {authorizations}"
            );
            assert!(
                statuses(&shipments).iter().all(|s| s == "cancelled"),
                "{order_id}: {shipments}"
            );
            let order_url = format!("{}/api/v1/orders/{order_id}", fleet.gateway);
            wait_until(
                "the compensated order cancelled",
                Duration::from_secs(20),
                || get_json(&order_url).is_some_and(|o| o["status"] == "cancelled"),
            );
        }
    }
    assert!(seen.get("completed").copied().unwrap_or(0) > 0, "{seen:?}");
    assert!(
        seen.get("compensated").copied().unwrap_or(0) > 0,
        "{seen:?}"
    );
    fleet
}

/// Payments hangs. Orders still answers within its wait (202: the saga goes on without the
/// client); Flotilla's breaker for payments opens, so the saga's tries fail fast; the catalog
/// keeps its latency and nothing piles up. The authorization's outcome is unknown, so the saga
/// keeps compensating until payments answers again: then the authorization is asked for again
/// with the same key and voided, the stock released, the order cancelled, and new orders succeed.
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

    let started = Instant::now();
    // Longer than orders' own wait for its saga (10 s).
    let answer = client()
        .post(format!("{api}/orders"))
        .json(&order)
        .send()
        .expect("POST order");
    let took = started.elapsed();
    assert_eq!(answer.status(), 202, "the order waits for payments");
    assert!(took < Duration::from_secs(13), "answered in {took:?}");
    let pending: Value = answer.json().expect("order");
    assert_eq!(pending["status"], "pending");
    let order_id = pending["id"].as_str().expect("id").to_owned();

    wait_until(
        "Flotilla's breaker for payments to open",
        Duration::from_secs(30),
        || {
            get_json(&format!("{}/v1/breakers", fleet.control))
                .and_then(|b| b.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .any(|b| {
                    b["caller"] == "flotilla" && b["service"] == "payments" && b["state"] == "open"
                })
        },
    );
    let saga_of_order = || {
        get_json(&format!(
            "{}/v1/sagas?name=place-order&limit=20",
            fleet.control
        ))
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .find_map(|s| {
            let detail = get_json(&format!("{}/v1/sagas/{}", fleet.control, s["id"].as_str()?))?;
            (detail["input"]["order_id"] == order_id.as_str()).then_some(detail)
        })
    };
    wait_until("the saga to compensate", Duration::from_secs(30), || {
        saga_of_order().is_some_and(|s| s["status"] == "compensating")
    });

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

    // Payments recovers: the saga learns what became of the authorization and undoes it all.
    let cleared = client().delete(&faults).send().expect("DELETE faults");
    assert_eq!(cleared.status(), 204);
    wait_until(
        "the saga to end compensated",
        Duration::from_secs(60),
        || saga_of_order().is_some_and(|s| s["status"] == "compensated"),
    );
    let authorizations = on_service(
        fleet,
        "payments",
        &format!("/authorizations?order_id={order_id}"),
    );
    assert!(
        authorizations
            .as_array()
            .expect("list")
            .iter()
            .all(|a| a["status"] == "voided"),
        "{authorizations}"
    );
    let reservations = on_service(
        fleet,
        "inventory",
        &format!("/reservations?order_id={order_id}"),
    );
    assert_eq!(reservations[0]["status"], "released", "{reservations}");
    wait_until("the order cancelled", Duration::from_secs(20), || {
        get_json(&format!("{api}/orders/{order_id}")).is_some_and(|o| o["status"] == "cancelled")
    });
    wait_until("orders to succeed again", Duration::from_secs(30), || {
        client()
            .post(format!("{api}/orders"))
            .json(&order)
            .send()
            .is_ok_and(|answer| answer.status() == 201)
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
    let catalog = find("orders", "client", "catalog");
    assert_eq!(catalog["parent_span_id"], orders["span_id"]);
    let served = find("catalog", "server", "orders");
    assert_eq!(served["parent_span_id"], catalog["span_id"]);
    // Orders starts the place-order saga through its sidecar; Flotilla makes the saga's calls,
    // each in the trace of the start.
    let start = spans
        .iter()
        .find(|s| {
            s["service"] == "orders"
                && s["kind"] == "client"
                && s["http"]["peer_service"] == "flotilla"
                && s["http"]["method"] == "POST"
        })
        .unwrap_or_else(|| panic!("orders starting the saga: {spans:#?}"));
    assert_eq!(start["parent_span_id"], orders["span_id"]);
    let received = spans
        .iter()
        .find(|s| {
            s["service"] == "flotilla"
                && s["kind"] == "server"
                && s["parent_span_id"] == start["span_id"]
        })
        .unwrap_or_else(|| panic!("Flotilla receiving the start: {spans:#?}"));
    for callee in ["inventory", "payments", "shipping", "orders"] {
        let call = find("flotilla", "client", callee);
        assert_eq!(
            call["parent_span_id"], received["span_id"],
            "flotilla → {callee} continues the saga's start"
        );
        let served = find(callee, "server", "flotilla");
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
