//! The shared stack, layer by layer without sockets, then against real upstreams on loopback.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use flotilla_proxy::Resilience;
use flotilla_proxy::resilience::ResilienceLayer;
use flotilla_proxy::{
    ClientAddr, HopByHopLayer, ProxyBody, ProxySettings, RequestIdLayer, Target, X_REQUEST_ID,
};
use flotilla_registry::{Discovery, Endpoint, Resolution};
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt, service_fn};

/// Discovery from a fixed table: names absent from it are unknown services.
#[derive(Default)]
struct Fixed(HashMap<&'static str, Vec<Endpoint>>);

impl Fixed {
    fn with(mut self, service: &'static str, addrs: &[SocketAddr]) -> Self {
        let endpoints = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| Endpoint {
                instance: format!("{service}-{}", i + 1).into(),
                addr: *addr,
            })
            .collect();
        self.0.insert(service, endpoints);
        self
    }
}

impl Discovery for Fixed {
    fn resolve(&self, service: &str) -> Resolution {
        match self.0.get(service) {
            Some(endpoints) => Resolution::Endpoints(endpoints.clone().into()),
            None => Resolution::Unknown,
        }
    }
}

fn request_to(service: &str, path: &str) -> Request<Full<Bytes>> {
    let mut request = Request::builder()
        .uri(path)
        .header(header::HOST, "shop.example")
        .body(Full::new(Bytes::new()))
        .expect("request");
    request
        .extensions_mut()
        .insert(Target::service(service.into()));
    request
        .extensions_mut()
        .insert(ClientAddr(SocketAddr::from(([10, 0, 0, 9], 50000))));
    request
}

async fn json(response: Response<ProxyBody>) -> serde_json::Value {
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    serde_json::from_slice(&bytes).expect("json body")
}

// ---- layers, no sockets ----

#[tokio::test]
async fn request_id_is_added_passed_on_and_returned() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let seen_inner = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(RequestIdLayer::new())
        .service(service_fn(move |request: Request<()>| {
            *seen_inner.lock().expect("lock") = request.headers().get(X_REQUEST_ID).cloned();
            async { Ok::<_, Infallible>(Response::new(())) }
        }));

    let response = svc
        .clone()
        .oneshot(Request::new(()))
        .await
        .expect("infallible");
    let returned = response.headers()[X_REQUEST_ID].clone();
    assert_eq!(returned.len(), 32);
    assert_eq!(seen.lock().expect("lock").as_ref(), Some(&returned));

    let request = Request::builder()
        .header(X_REQUEST_ID, "abc-123")
        .body(())
        .expect("request");
    let response = svc.oneshot(request).await.expect("infallible");
    assert_eq!(response.headers()[X_REQUEST_ID], "abc-123");
    assert_eq!(
        seen.lock().expect("lock").as_ref().map(|v| v.as_bytes()),
        Some(&b"abc-123"[..])
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let svc = ServiceBuilder::new()
        .layer(HopByHopLayer::new())
        .service(service_fn(|request: Request<()>| async move {
            let names: Vec<String> = request.headers().keys().map(|k| k.to_string()).collect();
            let mut response = Response::new(names);
            let headers = response.headers_mut();
            headers.insert(header::CONNECTION, "keep-alive".parse().expect("value"));
            headers.insert("keep-alive", "timeout=5".parse().expect("value"));
            headers.insert(header::TRANSFER_ENCODING, "chunked".parse().expect("value"));
            headers.insert(header::CONTENT_TYPE, "text/plain".parse().expect("value"));
            Ok::<_, Infallible>(response)
        }));
    let request = Request::builder()
        .header(header::CONNECTION, "close, x-internal")
        .header("x-internal", "1")
        .header(header::UPGRADE, "h2c")
        .header(header::TE, "trailers")
        .header("x-end-to-end", "1")
        .body(())
        .expect("request");
    let response = svc.oneshot(request).await.expect("infallible");
    let mut upstream_saw = response.body().clone();
    upstream_saw.sort();
    assert_eq!(upstream_saw, ["te", "x-end-to-end"]);
    let left: Vec<_> = response.headers().keys().map(|k| k.as_str()).collect();
    assert_eq!(left, ["content-type"]);
}

#[tokio::test]
async fn unknown_service_is_502_problem() {
    let stack = flotilla_proxy::stack(Arc::new(Fixed::default()), ProxySettings::gateway());
    let response = stack
        .oneshot(request_to("nosuch", "/x"))
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let id = response.headers()[X_REQUEST_ID]
        .to_str()
        .expect("ascii")
        .to_owned();
    let body = json(response).await;
    assert_eq!(body["status"], 502);
    assert_eq!(body["title"], "Unknown service");
    assert_eq!(body["detail"], "unknown service `nosuch`");
    assert_eq!(body["request_id"], id.as_str());
}

#[tokio::test]
async fn no_healthy_instance_is_503_with_retry_after() {
    let discovery = Fixed::default().with("orders", &[]);
    let stack = flotilla_proxy::stack(Arc::new(discovery), ProxySettings::gateway());
    let response = stack
        .oneshot(request_to("orders", "/orders"))
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let body = json(response).await;
    assert_eq!(body["detail"], "no healthy instance of `orders`");
}

#[tokio::test]
async fn a_request_without_target_is_a_problem_not_a_panic() {
    let stack = flotilla_proxy::stack(Arc::new(Fixed::default()), ProxySettings::gateway());
    let response = stack
        .oneshot(Request::new(Full::new(Bytes::new())))
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn problem_is_rfc7807() {
    let id = http::HeaderValue::from_static("req-1");
    let response = flotilla_proxy::problem(
        StatusCode::NOT_FOUND,
        "Not Found",
        "no route matches `/x`",
        Some(&id),
    );
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.headers()[X_REQUEST_ID], "req-1");
    let body = json(response).await;
    assert_eq!(
        body,
        serde_json::json!({
            "type": "about:blank",
            "title": "Not Found",
            "status": 404,
            "detail": "no route matches `/x`",
            "request_id": "req-1",
        })
    );
}

// ---- against real upstreams ----

/// A tiny upstream: `/echo` streams the request body back, `/hang` takes a minute; everything
/// answers with its name, the path it saw and the headers it got.
async fn upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<Incoming>| async move {
                        if request.uri().path() == "/hang" {
                            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                        }
                        if request.uri().path() == "/echo" {
                            let body = request.into_body().map_err(BoxErr::from).boxed_unsync();
                            return Ok::<_, Infallible>(Response::new(body));
                        }
                        let text = describe(name, &request);
                        Ok(Response::new(
                            Full::new(Bytes::from(text))
                                .map_err(|never| match never {})
                                .boxed_unsync(),
                        ))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

fn describe(name: &str, request: &Request<Incoming>) -> String {
    let mut text = format!("{name} {}\n", request.uri());
    for (key, value) in request.headers() {
        text.push_str(&format!("{key}: {}\n", value.to_str().unwrap_or("?")));
    }
    text
}

/// The resilience layer with default policies, calling as `gateway`.
fn layer<D: Discovery>(discovery: D) -> ResilienceLayer<D> {
    ResilienceLayer::new(Arc::new(discovery), Resilience::default(), "gateway")
}

/// Serves `stack` on loopback with the shared accept loop, as the gateway does.
async fn serve_stack<D: Discovery>(discovery: D) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stack = flotilla_proxy::stack_with_edge(
        layer(discovery),
        ProxySettings::gateway(),
        OneService("svc"),
    );
    tokio::spawn(flotilla_proxy::serve_connections(
        listener,
        stack,
        tokio_util::sync::CancellationToken::new(),
        flotilla_proxy::DEFAULT_DRAIN_TIMEOUT,
    ));
    addr
}

/// An edge that sends everything to one service.
struct OneService(&'static str);

impl flotilla_proxy::Edge for OneService {
    fn target<B>(&self, _: &Request<B>) -> Result<Target, flotilla_proxy::Error> {
        Ok(Target::service(self.0.into()))
    }
}

type TestClient<B> =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, B>;

fn client<B>() -> TestClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

async fn get(client: &TestClient<Empty<Bytes>>, url: String) -> (StatusCode, HeaderMap, String) {
    let response = client
        .get(url.parse().expect("url"))
        .await
        .expect("response");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

#[tokio::test]
async fn requests_are_balanced_and_headers_reach_upstream() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let proxy = serve_stack(Fixed::default().with("svc", &[a, b])).await;
    let client = client();

    let mut names = std::collections::HashSet::new();
    for _ in 0..20 {
        let (status, headers, body) = get(&client, format!("http://{proxy}/hello?x=1")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.contains_key(X_REQUEST_ID));
        let first_line = body.lines().next().unwrap_or_default().to_owned();
        assert!(first_line.ends_with(" /hello?x=1"), "{first_line}");
        names.insert(first_line[..1].to_owned());
        // The upstream got the same id the client got back, the original Host and the client.
        let id = headers[X_REQUEST_ID].to_str().expect("ascii");
        assert!(body.contains(&format!("x-request-id: {id}\n")), "{body}");
        assert!(body.contains(&format!("host: {proxy}\n")), "{body}");
        assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
        assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
    }
    assert_eq!(names.len(), 2, "both instances served: {names:?}");
}

/// A request body of `remaining` bytes in 64 KiB chunks of a repeating pattern, length unknown
/// up front (so it goes chunked all the way).
struct Pattern {
    sent: usize,
    total: usize,
}

const CHUNK: usize = 64 * 1024;

fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

impl http_body::Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent >= self.total {
            return Poll::Ready(None);
        }
        let n = CHUNK.min(self.total - self.sent);
        let chunk: Vec<u8> = (self.sent..self.sent + n).map(pattern_byte).collect();
        self.sent += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    const TOTAL: usize = 8 * 1024 * 1024;
    let echo = upstream("echo").await;
    let proxy = serve_stack(Fixed::default().with("svc", &[echo])).await;
    let request = Request::post(format!("http://{proxy}/echo"))
        .body(Pattern {
            sent: 0,
            total: TOTAL,
        })
        .expect("request");
    let response = client().request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("frame");
        if let Some(data) = frame.data_ref() {
            for (offset, byte) in data.iter().enumerate() {
                assert_eq!(
                    *byte,
                    pattern_byte(received + offset),
                    "at {}",
                    received + offset
                );
            }
            received += data.len();
        }
    }
    assert_eq!(received, TOTAL);
}

#[tokio::test]
async fn refused_upstream_is_502_problem() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    };
    let proxy = serve_stack(Fixed::default().with("svc", &[closed])).await;
    let (status, headers, body) = get(&client(), format!("http://{proxy}/")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        body["detail"],
        "upstream `svc` instance `svc-1` failed: connection refused"
    );
    assert_eq!(
        body["request_id"],
        headers[X_REQUEST_ID].to_str().expect("ascii")
    );
}

#[tokio::test]
async fn connect_timeout_is_504_problem() {
    // A listener that never accepts, its backlog filled: Linux then drops further SYNs, so the
    // proxy's connect can only time out.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let full = socket.local_addr().expect("addr");
    let _listener = socket.listen(1).expect("listen");
    let mut held = Vec::new();
    let mut filled = false;
    for _ in 0..16 {
        let connect = tokio::net::TcpStream::connect(full);
        match tokio::time::timeout(std::time::Duration::from_millis(200), connect).await {
            Ok(Ok(stream)) => held.push(stream),
            _ => {
                filled = true;
                break;
            }
        }
    }
    if !filled {
        eprintln!("skipped: this kernel never stopped accepting into the backlog");
        return;
    }

    let discovery = Fixed::default().with("svc", &[full]);
    let settings = ProxySettings {
        connect_timeout: std::time::Duration::from_millis(200),
        ..ProxySettings::gateway()
    };
    let stack = flotilla_proxy::stack(Arc::new(discovery), settings);
    let response = stack
        .oneshot(request_to("svc", "/"))
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let body = json(response).await;
    assert_eq!(body["title"], "Upstream timed out");
    assert_eq!(
        body["detail"],
        "upstream `svc` instance `svc-1` did not accept a connection in time"
    );
}

#[tokio::test]
async fn drain_timeout_closes_what_is_still_in_flight() {
    let slow = upstream("slow").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = listener.local_addr().expect("addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stack = flotilla_proxy::stack_with_edge(
        layer(Fixed::default().with("svc", &[slow])),
        ProxySettings::gateway(),
        OneService("svc"),
    );
    let server = tokio::spawn(flotilla_proxy::serve_connections(
        listener,
        stack,
        shutdown.clone(),
        std::time::Duration::from_millis(200),
    ));
    let hanging = tokio::spawn(async move {
        client::<Empty<Bytes>>()
            .get(format!("http://{proxy}/hang").parse().expect("url"))
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(2), server)
        .await
        .expect("stopped after the drain timeout")
        .expect("joined")
        .expect("served");
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(2), hanging)
        .await
        .expect("the client is not left waiting")
        .expect("joined");
    assert!(
        outcome.is_err(),
        "the abandoned request fails rather than hangs"
    );
}
