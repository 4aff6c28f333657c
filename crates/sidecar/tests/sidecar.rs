//! The sidecar end to end: a real upstream registered healthy, the sidecar on loopback, and a
//! client that talks to it the way an HTTP_PROXY-aware client does (absolute-form requests).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use flotilla_proxy::Caller;
use flotilla_registry::{Health, Registry};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Answers with the URI it saw and its request headers.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let mut text = format!("{}\n", request.uri());
                    for (key, value) in request.headers() {
                        text.push_str(&format!("{key}: {}\n", value.to_str().unwrap_or("?")));
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn sidecar() -> SocketAddr {
    let registry = Registry::new();
    registry.register("inventory", "inventory-1", upstream().await, "1.0.0");
    registry.set_health("inventory", "inventory-1", Health::Healthy, None);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(flotilla_sidecar::serve(
        listener,
        "orders-1".into(),
        Arc::new(registry),
        Default::default(),
        CancellationToken::new(),
    ));
    addr
}

/// Sends one request over a fresh HTTP/1.1 connection exactly as given: an absolute URI goes
/// out in absolute form, as clients configured with HTTP_PROXY send it.
async fn send(proxy: SocketAddr, request: Request<Empty<Bytes>>) -> (StatusCode, String) {
    let stream = TcpStream::connect(proxy).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn proxied(method: Method, url: &str, host: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .header(header::HOST, host)
        .body(Empty::new())
        .expect("request")
}

#[tokio::test]
async fn absolute_form_request_reaches_the_service() {
    let proxy = sidecar().await;
    let (status, body) = send(
        proxy,
        proxied(
            Method::GET,
            "http://inventory/stock?sku=TEA-001",
            "inventory",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("/stock?sku=TEA-001\n"), "{body}");
    assert!(body.contains("host: inventory\n"), "{body}");
    assert!(body.contains("x-request-id: "), "{body}");
    assert!(
        !body.contains("x-forwarded-for"),
        "internal calls carry no forwarded headers"
    );
}

#[tokio::test]
async fn the_absolute_uri_alone_names_the_service() {
    let proxy = sidecar().await;
    // No Host header: only the request target says where the call goes.
    let request = Request::get("http://inventory/stock")
        .body(Empty::new())
        .expect("request");
    let (status, body) = send(proxy, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("/stock\n"), "{body}");
    assert!(body.contains("host: inventory\n"), "{body}");
}

#[tokio::test]
async fn unknown_host_is_502_naming_it() {
    let proxy = sidecar().await;
    let (status, body) = send(proxy, proxied(Method::GET, "http://nosuch/", "nosuch")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let problem: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(problem["detail"], "unknown service `nosuch`");
}

#[tokio::test]
async fn connect_is_refused() {
    let proxy = sidecar().await;
    let (status, _) = send(
        proxy,
        proxied(Method::CONNECT, "inventory:443", "inventory:443"),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn the_reserved_host_reaches_flotilla_naming_the_caller() {
    // Flotilla's API stands in as an upstream that echoes what it received.
    let flotilla = upstream().await;
    let registry = Arc::new(Registry::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = listener.local_addr().expect("addr");
    tokio::spawn(flotilla_sidecar::serve(
        listener,
        Caller {
            service: "orders".into(),
            instance: "orders-1".into(),
        },
        Arc::new(flotilla_sidecar::WithFlotilla::new(registry, flotilla)),
        Default::default(),
        CancellationToken::new(),
    ));
    let mut request = proxied(Method::GET, "http://flotilla/v1/topics", "flotilla");
    // A service cannot pose as another.
    request
        .headers_mut()
        .insert("x-flotilla-caller", "payments".parse().expect("value"));
    let (status, body) = send(proxy, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("x-flotilla-caller: orders"), "{body}");
    assert!(!body.contains("payments"), "{body}");
}
