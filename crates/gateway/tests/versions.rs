//! API versions through a real gateway: two versions of one service running side by side, picked
//! by path, by `Accept-Version` or by a media-type parameter; deprecation headers on the old one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use flotilla_manifest::{Deprecation, Route, RouteVersion};
use flotilla_registry::{Health, Registry};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// An instance that answers every request with its name and the path it saw.
async fn instance(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let text = format!("{name} {}", request.uri().path());
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn versioned(prefix: &str, service: &str, version: &str, default: bool) -> Route {
    Route {
        version: Some(RouteVersion {
            name: version.into(),
            default,
        }),
        service_version: Some(version.into()),
        ..Route::new(prefix, service)
    }
}

async fn gateway() -> (SocketAddr, CancellationToken) {
    let registry = Registry::new();
    registry.register("orders", "orders-1", instance("v1").await, "1");
    registry.register("orders", "orders-2", instance("v2").await, "2");
    registry.set_health("orders", "orders-1", Health::Healthy, None);
    registry.set_health("orders", "orders-2", Health::Healthy, None);
    let routes = [
        Route {
            deprecation: Some(Deprecation {
                since: Some(UNIX_EPOCH + Duration::from_secs(1_780_272_000)),
                sunset: Some(UNIX_EPOCH + Duration::from_secs(1_798_761_600)),
                link: Some("https://docs.example.com/v1".into()),
            }),
            ..versioned("/api/orders", "orders", "1", false)
        },
        versioned("/api/orders", "orders", "2", true),
        // Versions by path: the same two instances under /api/v1 and /api/v2.
        Route {
            service_version: Some("1".into()),
            rewrite: Some("/api/orders".into()),
            ..Route::new("/api/v1/orders", "orders")
        },
        Route {
            service_version: Some("2".into()),
            rewrite: Some("/api/orders".into()),
            ..Route::new("/api/v2/orders", "orders")
        },
    ];
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let resilience = flotilla_gateway::resilience(Arc::new(registry), Default::default());
    tokio::spawn(flotilla_gateway::serve(
        listener,
        Arc::new(flotilla_gateway::Gateway::from_routes(&routes)),
        resilience,
        shutdown.clone(),
    ));
    (addr, shutdown)
}

async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = Request::get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client
        .request(request.body(Empty::new()).expect("request"))
        .await
        .expect("response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn old_and_new_clients_are_served_side_by_side() {
    let (addr, shutdown) = gateway().await;

    let (status, headers, body) = get(addr, "/api/orders/7", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "v2 /api/orders/7")
    );
    assert!(headers.get("deprecation").is_none());

    let (status, headers, body) = get(addr, "/api/orders/7", &[("accept-version", "1")]).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "v1 /api/orders/7")
    );
    assert_eq!(headers["deprecation"], "@1780272000");
    assert_eq!(headers["sunset"], "Fri, 01 Jan 2027 00:00:00 GMT");
    assert_eq!(
        headers["link"],
        "<https://docs.example.com/v1>; rel=\"deprecation\""
    );

    let (_, _, body) = get(
        addr,
        "/api/orders/7",
        &[("accept", "application/vnd.shop+json; version=1")],
    )
    .await;
    assert_eq!(body, "v1 /api/orders/7");

    let (_, _, body) = get(addr, "/api/v1/orders/7", &[]).await;
    assert_eq!(body, "v1 /api/orders/7");
    let (_, _, body) = get(addr, "/api/v2/orders/7", &[]).await;
    assert_eq!(body, "v2 /api/orders/7");

    let (status, headers, body) = get(addr, "/api/orders/7", &[("accept-version", "9")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(problem["type"], "urn:flotilla:problem:unknown-api-version");
    assert_eq!(
        problem["detail"],
        "version `9` of `/api/orders` does not exist; available: 1, 2"
    );
    assert!(problem["request_id"].is_string());
    shutdown.cancel();
}
