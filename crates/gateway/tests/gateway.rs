//! The gateway end to end: a real upstream registered healthy, the gateway on loopback, hyper
//! clients speaking HTTP/1.1 and HTTP/2.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_manifest::Route;
use flotilla_registry::{Health, Registry};
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Answers with the URI it saw and its request headers; `/slow` first waits half a second.
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
                    if request.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
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

struct Gateway {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

async fn gateway() -> Gateway {
    let registry = Registry::new();
    registry.register("catalog", "catalog-1", upstream().await, "1.0.0");
    registry.set_health("catalog", "catalog-1", Health::Healthy, None);
    let routes = [
        Route {
            rewrite: Some("/products".into()),
            ..Route::new("/api/v1/products", "catalog")
        },
        Route::new("/slow", "catalog"),
    ];
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let resilience = flotilla_gateway::resilience(Arc::new(registry), Default::default());
            flotilla_gateway::serve(
                listener,
                std::sync::Arc::new(flotilla_gateway::Gateway::from_routes(&routes)),
                resilience,
                shutdown,
            )
            .await
        }
    });
    Gateway {
        addr,
        shutdown,
        task,
    }
}

fn http1() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: String,
) -> (StatusCode, HeaderMap, String) {
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
async fn routes_rewrites_and_forwards() {
    let gw = gateway().await;
    let (status, headers, body) = get(
        &http1(),
        format!("http://{}/api/v1/products/TEA-001?x=1", gw.addr),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("/products/TEA-001?x=1\n"), "{body}");
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(
        body.contains(&format!("x-forwarded-host: {}\n", gw.addr)),
        "{body}"
    );
    assert!(body.contains(&format!("host: {}\n", gw.addr)), "{body}");
    assert!(
        body.contains("forwarded: for=127.0.0.1;proto=http;host=\""),
        "{body}"
    );
    let id = headers[flotilla_proxy::X_REQUEST_ID]
        .to_str()
        .expect("ascii");
    assert!(body.contains(&format!("x-request-id: {id}\n")), "{body}");
}

#[tokio::test]
async fn unknown_route_is_404_problem() {
    let gw = gateway().await;
    let (status, headers, body) = get(&http1(), format!("http://{}/nope", gw.addr)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(problem["status"], 404);
    assert_eq!(problem["detail"], "no route matches `/nope`");
    assert_eq!(
        problem["request_id"],
        headers[flotilla_proxy::X_REQUEST_ID]
            .to_str()
            .expect("ascii")
    );
}

#[tokio::test]
async fn http2_prior_knowledge_works() {
    let gw = gateway().await;
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let response = client
        .get(
            format!("http://{}/api/v1/products", gw.addr)
                .parse()
                .expect("url"),
        )
        .await
        .expect("response");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .headers()
            .contains_key(flotilla_proxy::X_REQUEST_ID)
    );
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("/products\n"), "{body}");
    // HTTP/2 has no Host header; the upstream still sees the host the client addressed.
    assert!(body.contains(&format!("host: {}\n", gw.addr)), "{body}");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let gw = gateway().await;
    let client = http1();
    let slow = tokio::spawn({
        let client = client.clone();
        let url = format!("http://{}/slow", gw.addr);
        async move { get(&client, url).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    gw.shutdown.cancel();

    let (status, _, body) = slow.await.expect("slow request");
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("/slow\n"), "{body}");
    tokio::time::timeout(Duration::from_secs(5), gw.task)
        .await
        .expect("gateway stopped")
        .expect("joined")
        .expect("served");
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "the listener is closed"
    );
}
