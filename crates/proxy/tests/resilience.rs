//! The resilience layer: breaker transitions in virtual time, then retries, budget, outlier
//! ejection, load balancing, timeouts, bulkhead, fallback, faults and the spans of each call
//! against real upstreams on loopback.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flotilla_manifest::{
    BreakerPolicy, BulkheadPolicy, Fallback, LoadBalancer, OutlierPolicy, Policy, RetryPolicy,
};
use flotilla_proxy::balance::Picked;
use flotilla_proxy::resilience::{ReplayBody, ResilienceLayer};
use flotilla_proxy::{
    BoxError, BreakerState, Error, Faults, Policies, PresetTarget, ProxyBody, ProxySettings,
    Resilience, Target,
};
use flotilla_registry::{Discovery, Endpoint, Resolution};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceExt, service_fn};

fn n(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).expect("non-zero")
}

/// No retries, no outlier ejection, a breaker that opens after 3 failures in a row for 5 s.
fn strict_policy() -> Policy {
    Policy {
        timeout: Duration::from_secs(1),
        deadline: Duration::from_secs(5),
        retries: RetryPolicy {
            attempts: n(1),
            ..RetryPolicy::default()
        },
        breaker: BreakerPolicy {
            consecutive_failures: n(3),
            open_timeout: Duration::from_secs(5),
            half_open_probes: n(1),
            ..BreakerPolicy::default()
        },
        outlier: no_ejection(),
        ..Policy::default()
    }
}

/// For tests about something else: a breaker that never opens.
fn no_breaker() -> BreakerPolicy {
    BreakerPolicy {
        enabled: false,
        ..BreakerPolicy::default()
    }
}

/// For tests about something else: instances are never ejected.
fn no_ejection() -> OutlierPolicy {
    OutlierPolicy {
        enabled: false,
        ..OutlierPolicy::default()
    }
}

fn resilience(policy: Policy) -> Resilience {
    Resilience::new(Policies::new([(Arc::from("svc"), policy)]))
}

struct Fixed(Vec<Endpoint>);

impl Fixed {
    fn of(addrs: &[SocketAddr]) -> Arc<Self> {
        Arc::new(Self(
            addrs
                .iter()
                .enumerate()
                .map(|(i, addr)| Endpoint {
                    instance: format!("svc-{}", i + 1).into(),
                    addr: *addr,
                })
                .collect(),
        ))
    }
}

impl Discovery for Fixed {
    fn resolve(&self, service: &str) -> Resolution {
        if service == "svc" {
            Resolution::Endpoints(self.0.clone().into())
        } else {
            Resolution::Unknown
        }
    }
}

fn request(method: Method, target: Target) -> Request<Full<Bytes>> {
    let mut request = Request::builder()
        .method(method)
        .uri("/thing")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    request.extensions_mut().insert(target);
    request
}

fn get() -> Request<Full<Bytes>> {
    request(Method::GET, Target::service("svc".into()))
}

fn kind(error: &BoxError) -> &Error {
    error.downcast_ref::<Error>().expect("a proxy error")
}

// ---- breaker transitions in virtual time, no sockets ----

/// An instance whose answers the test scripts; counts the calls that reach it.
#[derive(Clone, Default)]
struct Scripted {
    failing: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl Scripted {
    fn service(
        &self,
    ) -> impl Service<
        Request<ReplayBody<Full<Bytes>>>,
        Response = Response<ProxyBody>,
        Error = BoxError,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let this = self.clone();
        service_fn(move |request: Request<ReplayBody<Full<Bytes>>>| {
            let this = this.clone();
            async move {
                assert!(request.extensions().get::<Picked>().is_some());
                this.calls.fetch_add(1, Ordering::SeqCst);
                let status = if this.failing.load(Ordering::SeqCst) {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                };
                let mut response = Response::new(
                    Full::new(Bytes::new())
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                );
                *response.status_mut() = status;
                Ok::<_, BoxError>(response)
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn breaker_goes_closed_open_half_open_closed_and_reopens_on_a_failed_probe() {
    let shared = resilience(strict_policy());
    let instance = Scripted::default();
    let layer = ResilienceLayer::new(
        Fixed::of(&[SocketAddr::from(([127, 0, 0, 1], 9))]),
        shared.clone(),
        "orders-1",
    );
    let stack = layer.layer(instance.service());
    let state = || {
        shared
            .board
            .snapshot()
            .into_iter()
            .find(|b| b.instance.is_none())
            .map(|b| b.state)
    };
    let call = || {
        let stack = stack.clone();
        async move { stack.oneshot(get()).await }
    };

    // Closed → open on the third failure in a row.
    instance.failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let response = call().await.expect("the instance's own answer");
        assert_eq!(response.status(), 500);
    }
    assert_eq!(state(), Some(BreakerState::Open));
    assert_eq!(instance.calls.load(Ordering::SeqCst), 3);

    // Open fails fast, naming the breaker, without calling the instance.
    let error = call().await.expect_err("fails fast");
    assert!(matches!(kind(&error), Error::BreakerOpen { .. }));
    let detail = kind(&error).to_string();
    assert!(
        detail.contains("circuit breaker `svc` of `orders-1` is open"),
        "{detail}"
    );
    let problem = kind(&error).to_response(None);
    assert_eq!(problem.status(), 503);
    assert_eq!(problem.headers()["retry-after"], "5");
    assert_eq!(instance.calls.load(Ordering::SeqCst), 3);

    // After the open timeout one probe goes through; it fails, so the breaker re-opens.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(call().await.expect("probe").status(), 500);
    assert_eq!(instance.calls.load(Ordering::SeqCst), 4);
    assert_eq!(state(), Some(BreakerState::Open));
    assert!(call().await.is_err(), "open again");

    // Next time the probe succeeds: half-open → closed, and calls flow again.
    tokio::time::advance(Duration::from_secs(5)).await;
    instance.failing.store(false, Ordering::SeqCst);
    assert_eq!(call().await.expect("probe").status(), 200);
    assert_eq!(state(), Some(BreakerState::Closed));
    for _ in 0..5 {
        assert_eq!(call().await.expect("closed").status(), 200);
    }
    let view = shared
        .board
        .snapshot()
        .into_iter()
        .find(|b| b.instance.is_none())
        .expect("the breaker is listed");
    assert_eq!(
        (view.caller.as_str(), view.service.as_str()),
        ("orders-1", "svc")
    );
    assert_eq!(view.times_opened, 2);
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_only_the_probes_through() {
    let shared = resilience(strict_policy());
    let instance = Scripted::default();
    let stack = ResilienceLayer::new(
        Fixed::of(&[SocketAddr::from(([127, 0, 0, 1], 9))]),
        shared.clone(),
        "gateway",
    )
    .layer(instance.service());
    let events = Arc::new(Mutex::new(Vec::new()));
    shared.board.on_change({
        let events = events.clone();
        move |event| events.lock().unwrap().push((event.from, event.to))
    });
    instance.failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let _ = stack.clone().oneshot(get()).await;
    }
    tokio::time::advance(Duration::from_secs(6)).await;
    instance.failing.store(false, Ordering::SeqCst);
    assert_eq!(
        stack.clone().oneshot(get()).await.expect("probe").status(),
        200
    );
    assert_eq!(
        *events.lock().unwrap(),
        [
            (BreakerState::Closed, BreakerState::Open),
            (BreakerState::Open, BreakerState::HalfOpen),
            (BreakerState::HalfOpen, BreakerState::Closed),
        ],
        "every transition is announced"
    );
}

// ---- against real upstreams ----

type Behaviour = Arc<dyn Fn(&Request<Incoming>) -> (StatusCode, Duration) + Send + Sync>;

/// An upstream on loopback answering as `behaviour` says (after its delay); counts its calls.
async fn upstream(behaviour: Behaviour) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let behaviour = behaviour.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let (status, delay) = behaviour(&request);
                    async move {
                        tokio::time::sleep(delay).await;
                        let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                        *response.status_mut() = status;
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, calls)
}

fn answering(status: StatusCode, delay: Duration) -> Behaviour {
    Arc::new(move |_| (status, delay))
}

fn stack(
    discovery: Arc<Fixed>,
    shared: Resilience,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let layer = ResilienceLayer::new(discovery, shared, "gateway");
    flotilla_proxy::stack_with_edge(layer, ProxySettings::sidecar(), PresetTarget)
}

async fn status_of<S>(stack: &S, request: Request<Full<Bytes>>) -> StatusCode
where
    S: Service<Request<Full<Bytes>>, Response = Response<ProxyBody>, Error = Infallible> + Clone,
{
    stack
        .clone()
        .oneshot(request)
        .await
        .expect("infallible")
        .status()
}

#[tokio::test]
async fn retries_stay_within_the_budget_when_everything_fails() {
    let (addr, calls) = upstream(answering(StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO)).await;
    let policy = Policy {
        retries: RetryPolicy {
            attempts: n(3),
            backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            budget_percent: 20,
            budget_min_per_second: 1,
            budget_window: Duration::from_secs(10),
            ..RetryPolicy::default()
        },
        breaker: no_breaker(),
        outlier: no_ejection(),
        ..Policy::default()
    };
    let stack = stack(Fixed::of(&[addr]), resilience(policy));
    for _ in 0..200 {
        assert_eq!(status_of(&stack, get()).await, 503);
    }
    let received = calls.load(Ordering::SeqCst);
    // Without a budget: 600 calls. With it: 200, plus 20% of them, plus the 10-retry floor.
    assert!(received >= 200 + 40, "retries did happen: {received}");
    assert!(
        received <= 200 + 40 + 10,
        "retries amplified the outage: {received}"
    );
}

#[tokio::test]
async fn a_refused_connection_is_retried_whatever_the_method_but_a_503_only_for_idempotent_ones() {
    let (good, good_calls) = upstream(answering(StatusCode::OK, Duration::ZERO)).await;
    // A port nothing listens on: the connection is refused, the request never left.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let policy = Policy {
        load_balancer: LoadBalancer::RoundRobin,
        ..Policy::default()
    };
    let stack = stack(Fixed::of(&[closed, good]), resilience(policy));
    for _ in 0..10 {
        let post = request(Method::POST, Target::service("svc".into()));
        assert_eq!(status_of(&stack, post).await, 200);
    }
    assert_eq!(good_calls.load(Ordering::SeqCst), 10);

    let (failing, failing_calls) =
        upstream(answering(StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO)).await;
    let stack = stack_default(failing);
    let post = request(Method::POST, Target::service("svc".into()));
    assert_eq!(status_of(&stack, post).await, 503);
    assert_eq!(
        failing_calls.load(Ordering::SeqCst),
        1,
        "POST is not retried"
    );
    assert_eq!(status_of(&stack, get()).await, 503);
    assert_eq!(
        failing_calls.load(Ordering::SeqCst),
        4,
        "GET is tried three times"
    );
    let route_allows = Target {
        retry_non_idempotent: true,
        ..Target::service("svc".into())
    };
    assert_eq!(
        status_of(&stack, request(Method::POST, route_allows)).await,
        503
    );
    assert_eq!(
        failing_calls.load(Ordering::SeqCst),
        7,
        "the route allows retrying POST"
    );
}

fn stack_default(
    addr: SocketAddr,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let policy = Policy {
        breaker: no_breaker(),
        ..Policy::default()
    };
    stack(Fixed::of(&[addr]), resilience(policy))
}

#[tokio::test]
async fn a_failing_instance_is_ejected_while_the_other_serves() {
    let (good, good_calls) = upstream(answering(StatusCode::OK, Duration::ZERO)).await;
    let (bad, bad_calls) =
        upstream(answering(StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO)).await;
    let policy = Policy {
        // Round-robin makes the failing instance's share certain; P2C over latency may avoid it
        // after one fast failure, and this test is about ejection, not picking.
        load_balancer: LoadBalancer::RoundRobin,
        retries: RetryPolicy {
            attempts: n(1),
            ..RetryPolicy::default()
        },
        breaker: no_breaker(),
        outlier: OutlierPolicy {
            consecutive_failures: n(3),
            base_ejection: Duration::from_secs(30),
            ..OutlierPolicy::default()
        },
        ..Policy::default()
    };
    let shared = resilience(policy);
    let stack = stack(Fixed::of(&[good, bad]), shared.clone());
    let mut ok = 0;
    for _ in 0..200 {
        if status_of(&stack, get()).await == 200 {
            ok += 1;
        }
    }
    assert_eq!(
        bad_calls.load(Ordering::SeqCst),
        3,
        "ejected after three failures"
    );
    assert_eq!(good_calls.load(Ordering::SeqCst), 197);
    assert_eq!(ok, 197);
    let ejected = shared
        .board
        .snapshot()
        .into_iter()
        .find(|b| b.instance.as_deref() == Some("svc-2"))
        .expect("the instance's record is listed");
    assert_eq!(ejected.state, BreakerState::Open);
    assert!(ejected.retry_in_ms.is_some_and(|ms| ms > 20_000));
}

/// Sends `total` GETs, `concurrency` at a time; returns how many each upstream got.
async fn spread(load_balancer: LoadBalancer, total: usize, concurrency: usize) -> (usize, usize) {
    let (fast, fast_calls) = upstream(answering(StatusCode::OK, Duration::ZERO)).await;
    let (slow, slow_calls) = upstream(answering(StatusCode::OK, Duration::from_millis(20))).await;
    let policy = Policy {
        load_balancer,
        ..Policy::default()
    };
    let stack = stack(Fixed::of(&[fast, slow]), resilience(policy));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let stack = stack.clone();
        workers.spawn(async move {
            for _ in 0..total / concurrency {
                assert_eq!(status_of(&stack, get()).await, 200);
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.expect("worker");
    }
    (
        fast_calls.load(Ordering::SeqCst),
        slow_calls.load(Ordering::SeqCst),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_sends_a_slow_instance_markedly_less_than_round_robin() {
    let (_, rr_slow) = spread(LoadBalancer::RoundRobin, 400, 8).await;
    let (_, p2c_slow) = spread(LoadBalancer::P2cEwma, 400, 8).await;
    assert_eq!(rr_slow, 200, "round-robin splits evenly");
    assert!(
        p2c_slow * 4 < rr_slow,
        "P2C over peak-EWMA sent the slow instance {p2c_slow} of 400 calls, round-robin {rr_slow}"
    );
}

#[tokio::test]
async fn a_slow_answer_times_out_per_try_and_the_deadline_bounds_the_retries() {
    let (addr, calls) = upstream(answering(StatusCode::OK, Duration::from_secs(10))).await;
    let policy = Policy {
        timeout: Duration::from_millis(100),
        deadline: Duration::from_millis(250),
        retries: RetryPolicy {
            attempts: n(5),
            backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            ..RetryPolicy::default()
        },
        breaker: no_breaker(),
        ..Policy::default()
    };
    let stack = stack(Fixed::of(&[addr]), resilience(policy));
    let started = std::time::Instant::now();
    let response = stack.clone().oneshot(get()).await.expect("infallible");
    let took = started.elapsed();
    assert_eq!(response.status(), 504);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).expect("problem+json");
    assert_eq!(problem["type"], "urn:flotilla:problem:timeout");
    assert!(
        took >= Duration::from_millis(240) && took < Duration::from_millis(800),
        "{took:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "two full tries and a last one cut by the deadline"
    );
}

#[tokio::test]
async fn the_bulkhead_refuses_what_it_cannot_hold() {
    let (addr, _) = upstream(answering(StatusCode::OK, Duration::from_secs(2))).await;
    let policy = Policy {
        timeout: Duration::from_secs(5),
        bulkhead: BulkheadPolicy {
            max_concurrent: n(2),
            max_queue: 1,
        },
        ..Policy::default()
    };
    let stack = stack(Fixed::of(&[addr]), resilience(policy));
    let mut held = Vec::new();
    for _ in 0..3 {
        let stack = stack.clone();
        held.push(tokio::spawn(async move { status_of(&stack, get()).await }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let response = stack.clone().oneshot(get()).await.expect("infallible");
    assert_eq!(response.status(), 503);
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "refused at once"
    );
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).expect("problem+json");
    assert_eq!(problem["type"], "urn:flotilla:problem:bulkhead-full");
    for call in held {
        assert_eq!(
            call.await.expect("join"),
            200,
            "two ran, one waited its turn"
        );
    }
}

#[tokio::test]
async fn an_open_breaker_serves_the_routes_fallback() {
    let (addr, calls) = upstream(answering(StatusCode::BAD_GATEWAY, Duration::ZERO)).await;
    let stack = stack(Fixed::of(&[addr]), resilience(strict_policy()));
    for _ in 0..3 {
        assert_eq!(status_of(&stack, get()).await, 502);
    }
    let with_fallback = Target {
        fallback: Some(Arc::new(Fallback {
            status: 200,
            body: r#"{"items":[]}"#.into(),
            content_type: "application/json".into(),
        })),
        ..Target::service("svc".into())
    };
    let response = stack
        .clone()
        .oneshot(request(Method::GET, with_fallback))
        .await
        .expect("infallible");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-flotilla-fallback"], "breaker-open");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], br#"{"items":[]}"#);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the fallback does not call the service"
    );
}

#[tokio::test]
async fn injected_faults_abort_and_delay_calls() {
    let (addr, calls) = upstream(answering(StatusCode::OK, Duration::ZERO)).await;
    let policy = Policy {
        timeout: Duration::from_millis(200),
        retries: RetryPolicy {
            attempts: n(1),
            ..RetryPolicy::default()
        },
        breaker: no_breaker(),
        ..Policy::default()
    };
    let shared = resilience(policy);
    let stack = stack(Fixed::of(&[addr]), shared.clone());
    shared.faults.set(
        "svc",
        Faults {
            delay: None,
            delay_percent: 100,
            abort: Some(503),
            abort_percent: 100,
        },
    );
    let response = stack.clone().oneshot(get()).await.expect("infallible");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-flotilla-fault"], "abort");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    shared.faults.set(
        "svc",
        Faults {
            delay: Some(Duration::from_secs(5)),
            delay_percent: 100,
            abort: None,
            abort_percent: 100,
        },
    );
    let started = std::time::Instant::now();
    assert_eq!(
        status_of(&stack, get()).await,
        504,
        "the delay outlasts the timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    assert!(shared.faults.clear("svc"));
    assert_eq!(status_of(&stack, get()).await, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unknown_service_is_a_502_naming_it() {
    let (addr, _) = upstream(answering(StatusCode::OK, Duration::ZERO)).await;
    let stack = stack(Fixed::of(&[addr]), Resilience::default());
    let response = stack
        .clone()
        .oneshot(request(Method::GET, Target::service("nosuch".into())))
        .await
        .expect("infallible");
    assert_eq!(response.status(), 502);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).expect("problem+json");
    assert_eq!(problem["type"], "urn:flotilla:problem:unknown-service");
    assert_eq!(problem["detail"], "unknown service `nosuch`");
}

// ---- traces ----

/// A call as the observer hears of it: caller, callee, status, retries.
type ObservedCall = (String, String, Option<u16>, u32);

#[derive(Default)]
struct Collected {
    spans: Mutex<Vec<flotilla_telemetry::Span>>,
    calls: Mutex<Vec<ObservedCall>>,
    in_flight: std::sync::atomic::AtomicI64,
}

impl flotilla_proxy::Observer for Collected {
    fn span(&self, span: flotilla_telemetry::Span) {
        self.spans.lock().unwrap().push(span);
    }

    fn call(&self, caller: &str, callee: &str, status: Option<u16>, _: Duration, retries: u32) {
        self.calls
            .lock()
            .unwrap()
            .push((caller.into(), callee.into(), status, retries));
    }

    fn in_flight(&self, _: &str, _: &str, delta: i64) {
        self.in_flight.fetch_add(delta, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn each_call_is_a_client_and_a_server_span_and_the_callee_gets_their_context() {
    let seen = Arc::new(Mutex::new(None));
    let behaviour: Behaviour = {
        let seen = seen.clone();
        Arc::new(move |request| {
            *seen.lock().unwrap() = request
                .headers()
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_owned());
            (StatusCode::OK, Duration::ZERO)
        })
    };
    let (addr, _) = upstream(behaviour).await;
    let collected = Arc::new(Collected::default());
    let shared = Resilience {
        observer: Some(collected.clone()),
        ..Resilience::default()
    };
    let layer = ResilienceLayer::new(
        Fixed::of(&[addr]),
        shared,
        flotilla_proxy::Caller {
            service: "orders".into(),
            instance: "orders-2".into(),
        },
    );
    let stack = flotilla_proxy::stack_with_edge(layer, ProxySettings::sidecar(), PresetTarget);

    let mut traced = get();
    traced.headers_mut().insert(
        "traceparent",
        http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    assert_eq!(status_of(&stack, traced).await, 200);
    let spans = std::mem::take(&mut *collected.spans.lock().unwrap());
    let [server, client] = &spans[..] else {
        panic!("two spans, got {spans:?}")
    };
    assert_eq!(
        client.trace_id.to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        client.parent_span_id.map(|s| s.to_string()).as_deref(),
        Some("00f067aa0ba902b7")
    );
    assert_eq!(client.kind, flotilla_telemetry::SpanKind::Client);
    assert_eq!(
        (&*client.service, client.instance.as_deref()),
        ("orders", Some("orders-2"))
    );
    assert_eq!(client.http.peer_service.as_deref(), Some("svc"));
    assert_eq!(client.http.status, Some(200));
    assert_eq!(client.http.attempts, Some(1));
    assert_eq!(server.kind, flotilla_telemetry::SpanKind::Server);
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(server.parent_span_id, Some(client.span_id));
    assert_eq!(
        (&*server.service, server.instance.as_deref()),
        ("svc", Some("svc-1"))
    );
    // The callee continues the trace under its server span.
    assert_eq!(
        seen.lock().unwrap().as_deref(),
        Some(format!("00-{}-{}-01", server.trace_id, server.span_id).as_str())
    );
    assert_eq!(
        *collected.calls.lock().unwrap(),
        [("orders".to_owned(), "svc".to_owned(), Some(200), 0)]
    );
    assert_eq!(collected.in_flight.load(Ordering::SeqCst), 0);

    // Without a traceparent a trace starts here; an unknown service is a failed client span only.
    let unknown = request(Method::GET, Target::service("nosuch".into()));
    assert_eq!(status_of(&stack, unknown).await, 502);
    let spans = std::mem::take(&mut *collected.spans.lock().unwrap());
    let [client] = &spans[..] else {
        panic!("one span, got {spans:?}")
    };
    assert_eq!(client.parent_span_id, None);
    assert!(client.is_error());
    assert_eq!(
        client.status_message.as_deref(),
        Some("unknown service `nosuch`")
    );
    assert_eq!(collected.in_flight.load(Ordering::SeqCst), 0);
}
