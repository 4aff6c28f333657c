//! Backend-for-Frontend facades end to end: facades parsed from a manifest, real HTTP services on
//! loopback registered healthy, the proxy stack below the edge, and a hyper client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_gateway::bff::{Facades, compose};
use flotilla_proxy::resilience::Policies;
use flotilla_proxy::{
    Observer, ProxySettings, RequestIdLayer, RescueLayer, Resilience, TRACEPARENT, X_REQUEST_ID,
};
use flotilla_registry::{Health, Registry};
use flotilla_telemetry::Span;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

/// What a test service saw of a request.
struct Seen {
    uri: String,
    headers: HeaderMap,
}

/// A test service's answer: status, body, and how long to wait before giving it.
type Answer = (u16, String, Duration);
type Handler = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

async fn service(handler: Handler) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let seen = Seen {
                        uri: request.uri().to_string(),
                        headers: request.headers().clone(),
                    };
                    let (status, body, delay) = handler(&seen);
                    async move {
                        tokio::time::sleep(delay).await;
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = StatusCode::from_u16(status).expect("status");
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn answer(status: u16, body: impl Into<String>) -> Answer {
    (status, body.into(), Duration::ZERO)
}

/// Answers `body` to every request, after `delay`.
fn fixed(status: u16, body: &'static str, delay: Duration) -> Handler {
    Arc::new(move |_| (status, body.to_owned(), delay))
}

/// Calls and spans the stack reported.
#[derive(Default)]
struct Recorder {
    spans: Mutex<Vec<Span>>,
    calls: Mutex<Vec<(String, String, Option<u16>)>>,
}

impl Observer for Recorder {
    fn span(&self, span: Span) {
        self.spans.lock().expect("lock").push(span);
    }

    fn call(&self, caller: &str, callee: &str, status: Option<u16>, _: Duration, _: u32) {
        self.calls
            .lock()
            .expect("lock")
            .push((caller.into(), callee.into(), status));
    }

    fn in_flight(&self, _: &str, _: &str, _: i64) {}
}

const SERVICES: &str = r#"app = "shop"
[services.orders]
run = "orders"
[services.payments]
run = "payments"
[services.payments.policy]
timeout = "450ms"
retries = { attempts = 1 }
[services.shipping]
run = "shipping"
"#;

const FACADES: &str = r#"
[bff.web]
[[bff.web.routes]]
path = "/orders/{id}"
[bff.web.routes.parts.order]
call = "GET orders /orders/{{path.id}}"
[bff.web.routes.parts.payment]
call = "GET payments /authorizations?order_id={{path.id}}"
optional = true
[bff.web.routes.parts.shipment]
call = "GET shipping /shipments?order_id={{path.id}}"
optional = true
fields = "id,status,carrier"

[[bff.web.routes]]
path = "/search"
[bff.web.routes.parts.orders]
call = "GET orders /orders?customer={{query.customer}}"

[bff.mobile]
[[bff.mobile.routes]]
path = "/orders/{id}"
[bff.mobile.routes.parts.order]
call = "GET orders /orders/{{path.id}}"
fields = "id, status, total, items(sku,qty), /customer/name, /items/0/price"
[bff.mobile.routes.parts.shipment]
call = "GET shipping /shipments?order_id={{path.id}}"
optional = true
fields = "status"
"#;

const ORDER: &str = r#"{"id":"o-7","customer":{"name":"Ada","email":"ada@example.com"},"items":[{"sku":"TEA","qty":2,"price":3.5},{"sku":"MUG","qty":1,"price":9}],"total":16,"status":"confirmed"}"#;
const PAYMENTS: &str = r#"[{"id":"auth-1","order_id":"o-7","amount":16,"status":"authorized"}]"#;
const SHIPMENTS: &str =
    r#"[{"id":"shp-1","order_id":"o-7","status":"created","carrier":"post","address":"x"}]"#;

struct Gateway {
    addr: SocketAddr,
    recorder: Arc<Recorder>,
    _shutdown: tokio_util::sync::DropGuard,
}

/// A gateway that serves only the facades, with `handlers` as the services (a service without
/// one is registered on a port nobody listens on).
async fn gateway(handlers: [(&str, Option<Handler>); 3]) -> Gateway {
    let manifest =
        match flotilla_manifest::parse(&format!("{SERVICES}{FACADES}"), Path::new("flotilla.toml"))
        {
            Ok(manifest) => manifest,
            Err(diagnostics) => panic!("{diagnostics}"),
        };
    let registry = Registry::new();
    for (name, handler) in handlers {
        let addr = match handler {
            Some(handler) => service(handler).await,
            None => closed_port().await,
        };
        registry.register(name, &format!("{name}-1"), addr, "1.0.0");
        registry.set_health(name, &format!("{name}-1"), Health::Healthy, None);
    }
    let recorder = Arc::new(Recorder::default());
    let resilience = Resilience {
        observer: Some(recorder.clone()),
        ..Resilience::new(Policies::from_manifest(&manifest))
    };
    let below = flotilla_proxy::below_edge::<_, Empty<Bytes>>(
        flotilla_gateway::resilience(Arc::new(registry), resilience),
        ProxySettings::gateway(),
    );
    let facades = Arc::new(Facades::new(&manifest.bffs));
    // What the gateway's edge does for a facade path, and nothing else.
    let edge = tower::service_fn(move |request: Request<Incoming>| {
        let facades = facades.clone();
        let below = below.clone();
        async move {
            let (client, _body) = request.into_parts();
            match facades.route(&client.method, client.uri.path()) {
                None => Err(flotilla_proxy::Error::NoRoute {
                    path: client.uri.path().into(),
                }),
                Some(Err(error)) => Err(error),
                Some(Ok(route)) => compose(&route, &client, below).await,
            }
        }
    });
    let stack = ServiceBuilder::new()
        .layer(RequestIdLayer::new())
        .layer(RescueLayer::new())
        .service(edge);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(flotilla_proxy::serve_connections(
        listener,
        stack,
        shutdown.clone(),
        Duration::from_secs(1),
    ));
    Gateway {
        addr,
        recorder,
        _shutdown: shutdown.drop_guard(),
    }
}

/// A loopback port with nothing listening.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

struct Answered {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Answered {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|_| panic!("not JSON: {}", self.text))
    }
}

async fn call(gateway: &Gateway, method: Method, path: &str, headers: &[(&str, &str)]) -> Answered {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gateway.addr));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client
        .request(request.body(Empty::new()).expect("request"))
        .await
        .expect("response");
    let (head, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    Answered {
        status: head.status,
        headers: head.headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn get(gateway: &Gateway, path: &str) -> Answered {
    call(gateway, Method::GET, path, &[]).await
}

#[tokio::test]
async fn parts_are_fetched_concurrently_and_merged_in_file_order() {
    let slow = Duration::from_millis(300);
    let seen_by_orders: Arc<Mutex<Vec<(String, HeaderMap)>>> = Arc::default();
    let orders: Handler = {
        let seen_by_orders = seen_by_orders.clone();
        Arc::new(move |seen: &Seen| {
            let mut seen_by_orders = seen_by_orders.lock().expect("lock");
            seen_by_orders.push((seen.uri.clone(), seen.headers.clone()));
            (200, ORDER.to_owned(), slow)
        })
    };
    let gw = gateway([
        ("orders", Some(orders)),
        ("payments", Some(fixed(200, PAYMENTS, slow))),
        ("shipping", Some(fixed(200, SHIPMENTS, slow))),
    ])
    .await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let started = Instant::now();
    let answered = call(
        &gw,
        Method::GET,
        "/web/orders/o-7",
        &[
            ("traceparent", traceparent),
            ("x-request-id", "req-42"),
            ("x-flotilla-subject", "ada"),
            ("cookie", "session=secret"),
        ],
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.text);
    assert!(
        elapsed < Duration::from_millis(600),
        "three parts of 300 ms each took {elapsed:?}: not concurrent"
    );
    assert_eq!(answered.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(answered.headers[X_REQUEST_ID], "req-42");
    assert!(!answered.headers.contains_key("flotilla-degraded"));
    // One member per part, in file order; an unprojected part exactly as the service wrote it.
    let expected_start = format!("{{\"order\":{ORDER},\"payment\":{PAYMENTS},\"shipment\":");
    assert!(
        answered.text.starts_with(&expected_start),
        "{}",
        answered.text
    );
    assert_eq!(
        answered.json()["shipment"],
        json!([{"id": "shp-1", "status": "created", "carrier": "post"}])
    );

    let seen = seen_by_orders.lock().expect("lock");
    let (uri, headers) = &seen[0];
    assert_eq!(uri, "/orders/o-7");
    assert_eq!(headers[header::ACCEPT], "application/json");
    assert_eq!(headers[X_REQUEST_ID], "req-42");
    assert_eq!(headers["x-flotilla-subject"], "ada");
    assert!(!headers.contains_key(header::COOKIE), "{headers:?}");
    let forwarded = headers[TRACEPARENT].to_str().expect("ascii");
    assert!(
        forwarded.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{forwarded}"
    );

    // Each part is a call of the gateway's like any other: counted and traced, in the client's
    // trace.
    let mut calls: Vec<String> = gw
        .recorder
        .calls
        .lock()
        .expect("lock")
        .iter()
        .map(|(caller, callee, status)| format!("{caller}->{callee} {status:?}"))
        .collect();
    calls.sort();
    assert_eq!(
        calls,
        [
            "gateway->orders Some(200)",
            "gateway->payments Some(200)",
            "gateway->shipping Some(200)"
        ]
    );
    let spans = gw.recorder.spans.lock().expect("lock");
    assert_eq!(spans.len(), 6, "a client and a server span per part");
    assert!(
        spans
            .iter()
            .all(|s| s.trace_id.to_string() == "4bf92f3577b34da6a3ce929d0e0e4736")
    );
}

#[tokio::test]
async fn projection_selects_members_nested_arrays_and_pointers() {
    let gw = gateway([
        ("orders", Some(fixed(200, ORDER, Duration::ZERO))),
        ("payments", Some(fixed(200, PAYMENTS, Duration::ZERO))),
        ("shipping", Some(fixed(200, SHIPMENTS, Duration::ZERO))),
    ])
    .await;
    let answered = get(&gw, "/mobile/orders/o-7").await;
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.text);
    assert_eq!(
        answered.text,
        r#"{"order":{"id":"o-7","status":"confirmed","total":16,"items":[{"sku":"TEA","qty":2},{"sku":"MUG","qty":1}],"name":"Ada","price":3.5},"shipment":[{"status":"created"}]}"#
    );
}

#[tokio::test]
async fn a_failing_optional_part_is_null_and_named_in_flotilla_degraded() {
    let gw = gateway([
        ("orders", Some(fixed(200, ORDER, Duration::ZERO))),
        // Slower than its policy's 450 ms timeout: the part's own policy applies.
        (
            "payments",
            Some(fixed(200, PAYMENTS, Duration::from_secs(5))),
        ),
        (
            "shipping",
            Some(fixed(200, "<html>oops</html>", Duration::ZERO)),
        ),
    ])
    .await;
    let started = Instant::now();
    let answered = get(&gw, "/web/orders/o-7").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.text);
    assert_eq!(answered.headers["flotilla-degraded"], "payment, shipment");
    assert_eq!(answered.headers[header::CACHE_CONTROL], "no-store");
    let body = answered.json();
    assert_eq!(body["payment"], Value::Null);
    assert_eq!(body["shipment"], Value::Null);
    assert_eq!(body["order"]["id"], "o-7");

    // A service that is down degrades the same way.
    let gw = gateway([
        ("orders", Some(fixed(200, ORDER, Duration::ZERO))),
        ("payments", None),
        ("shipping", Some(fixed(503, "{}", Duration::ZERO))),
    ])
    .await;
    let answered = get(&gw, "/web/orders/o-7").await;
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.text);
    assert_eq!(answered.headers["flotilla-degraded"], "payment, shipment");
}

#[tokio::test]
async fn a_failing_required_part_fails_the_response_with_a_problem() {
    for (orders, detail) in [
        (
            fixed(500, "{}", Duration::ZERO),
            "part `order` failed: `orders` answered 500 Internal Server Error",
        ),
        (
            fixed(200, "not json", Duration::ZERO),
            "part `order` failed: `orders` answered something that is not JSON",
        ),
    ] {
        let gw = gateway([
            ("orders", Some(orders)),
            ("payments", Some(fixed(200, PAYMENTS, Duration::ZERO))),
            ("shipping", Some(fixed(200, SHIPMENTS, Duration::ZERO))),
        ])
        .await;
        let answered = get(&gw, "/web/orders/o-7").await;
        assert_eq!(
            answered.status,
            StatusCode::BAD_GATEWAY,
            "{}",
            answered.text
        );
        assert_eq!(
            answered.headers[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let problem = answered.json();
        assert_eq!(problem["type"], "urn:flotilla:problem:composition-failed");
        assert_eq!(problem["status"], 502);
        assert_eq!(problem["detail"], detail);
        assert!(problem["request_id"].is_string(), "{problem}");
    }

    // Nothing listens: the proxy's own reason is the detail.
    let gw = gateway([
        ("orders", None),
        ("payments", Some(fixed(200, PAYMENTS, Duration::ZERO))),
        ("shipping", Some(fixed(200, SHIPMENTS, Duration::ZERO))),
    ])
    .await;
    let answered = get(&gw, "/web/orders/o-7").await;
    assert_eq!(
        answered.status,
        StatusCode::BAD_GATEWAY,
        "{}",
        answered.text
    );
    let detail = answered.json()["detail"].as_str().unwrap_or("").to_owned();
    assert!(
        detail.starts_with("part `order` failed: upstream `orders`"),
        "{detail}"
    );
}

#[tokio::test]
async fn a_required_part_answering_404_makes_the_response_404() {
    let gw = gateway([
        (
            "orders",
            Some(fixed(404, r#"{"detail":"no order"}"#, Duration::ZERO)),
        ),
        ("payments", Some(fixed(500, "{}", Duration::ZERO))),
        ("shipping", Some(fixed(200, SHIPMENTS, Duration::ZERO))),
    ])
    .await;
    let answered = get(&gw, "/web/orders/nope").await;
    assert_eq!(answered.status, StatusCode::NOT_FOUND, "{}", answered.text);
    let problem = answered.json();
    assert_eq!(problem["type"], "urn:flotilla:problem:not-found");
    assert_eq!(
        problem["detail"],
        "part `order`: `orders` answered 404 Not Found"
    );
}

#[tokio::test]
async fn path_parameters_are_percent_encoded_into_each_part() {
    let echo: Handler = Arc::new(|seen: &Seen| answer(200, json!({ "uri": seen.uri }).to_string()));
    let gw = gateway([
        ("orders", Some(echo.clone())),
        ("payments", Some(echo.clone())),
        ("shipping", Some(echo)),
    ])
    .await;
    let answered = get(&gw, "/web/orders/a%2Fb%20c%3Fd&e").await;
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.text);
    let body = answered.json();
    assert_eq!(body["order"]["uri"], "/orders/a%2Fb%20c%3Fd%26e");
    assert_eq!(
        body["payment"]["uri"],
        "/authorizations?order_id=a%2Fb%20c%3Fd%26e"
    );

    let answered = get(&gw, "/web/search?customer=J%C3%B6+Doe&x=1").await;
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.text);
    assert_eq!(
        answered.json()["orders"]["uri"],
        "/orders?customer=J%C3%B6%20Doe"
    );
    let answered = get(&gw, "/web/search").await;
    assert_eq!(
        answered.status,
        StatusCode::BAD_REQUEST,
        "{}",
        answered.text
    );
    assert_eq!(
        answered.json()["detail"],
        "part `orders` failed: the query parameter `customer` is missing"
    );
}

#[tokio::test]
async fn paths_under_a_facade_without_a_route_are_404_or_405() {
    let gw = gateway([
        ("orders", Some(fixed(200, ORDER, Duration::ZERO))),
        ("payments", Some(fixed(200, PAYMENTS, Duration::ZERO))),
        ("shipping", Some(fixed(200, SHIPMENTS, Duration::ZERO))),
    ])
    .await;
    let answered = get(&gw, "/web/orders/o-7/items").await;
    assert_eq!(answered.status, StatusCode::NOT_FOUND, "{}", answered.text);
    let problem = answered.json();
    assert_eq!(problem["type"], "urn:flotilla:problem:no-route");
    assert_eq!(
        problem["detail"],
        "no route matches `/web/orders/o-7/items`"
    );

    let answered = call(&gw, Method::POST, "/web/orders/o-7", &[]).await;
    assert_eq!(
        answered.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "{}",
        answered.text
    );
    assert_eq!(answered.headers[header::ALLOW], "GET");
    assert!(gw.recorder.calls.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn a_part_larger_than_the_bound_fails_it() {
    let huge: Handler = Arc::new(|_: &Seen| {
        let body = format!("\"{}\"", "x".repeat(flotilla_gateway::bff::MAX_PART_BODY));
        (200, body, Duration::ZERO)
    });
    let gw = gateway([
        ("orders", Some(huge)),
        ("payments", Some(fixed(200, PAYMENTS, Duration::ZERO))),
        ("shipping", Some(fixed(200, SHIPMENTS, Duration::ZERO))),
    ])
    .await;
    let answered = get(&gw, "/web/orders/o-7").await;
    assert_eq!(
        answered.status,
        StatusCode::BAD_GATEWAY,
        "{}",
        answered.text
    );
    assert_eq!(
        answered.json()["detail"],
        "part `order` failed: `orders` answered more than 8 MiB"
    );
}
