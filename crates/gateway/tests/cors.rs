//! CORS as a browser sees it: preflights answered by the gateway, headers on actual responses.

use std::time::Duration;

use flotilla_gateway::cors::{CORS_REFUSED, CorsPolicy};
use flotilla_manifest::Cors;
use flotilla_proxy::{Error, Refusal};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};

fn shop() -> Cors {
    Cors {
        origins: vec!["https://shop.example".into()],
        methods: vec!["GET".into(), "POST".into()],
        headers: vec!["content-type".into(), "authorization".into()],
        expose: vec!["x-request-id".into()],
        credentials: true,
        max_age: Duration::from_secs(600),
    }
}

/// The refusal inside a refused preflight.
#[track_caller]
fn refused(answer: Option<Result<http::Response<flotilla_proxy::ProxyBody>, Error>>) -> Refusal {
    match answer {
        Some(Err(Error::Refused(refusal))) => *refusal,
        Some(Err(other)) => panic!("expected a refusal, got {other:?}"),
        Some(Ok(response)) => panic!("expected a refusal, got {}", response.status()),
        None => panic!("expected a refusal, not a pass-through"),
    }
}

fn preflight(origin: &str, method: &str, headers: Option<&str>) -> Request<()> {
    let mut request = Request::builder()
        .method(Method::OPTIONS)
        .uri("/api/orders")
        .header("origin", origin)
        .header("access-control-request-method", method);
    if let Some(headers) = headers {
        request = request.header("access-control-request-headers", headers);
    }
    request.body(()).expect("request")
}

#[test]
fn an_allowed_preflight_is_answered_204_with_the_allow_headers() {
    let policy = CorsPolicy::new(&shop());
    let request = preflight(
        "https://shop.example",
        "POST",
        Some("Content-Type, authorization"),
    );
    let response = policy
        .preflight(&request)
        .expect("a preflight")
        .expect("allowed");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let headers = response.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert_eq!(headers["access-control-allow-methods"], "GET, POST");
    assert_eq!(
        headers["access-control-allow-headers"],
        "content-type, authorization"
    );
    assert_eq!(headers["access-control-allow-credentials"], "true");
    assert_eq!(headers["access-control-max-age"], "600");
    assert!(
        headers["vary"]
            .to_str()
            .expect("vary")
            .contains("access-control-request-method")
    );
}

#[test]
fn a_preflight_from_another_origin_is_refused_403() {
    let policy = CorsPolicy::new(&shop());
    for origin in [
        "https://evil.example",
        "http://shop.example",
        "https://shop.example:8443",
    ] {
        let refusal = refused(policy.preflight(&preflight(origin, "GET", None)));
        assert_eq!(refusal.status, StatusCode::FORBIDDEN);
        assert_eq!(refusal.kind, CORS_REFUSED);
        assert!(refusal.detail.contains(origin), "{}", refusal.detail);
    }
    // Scheme and host are case-insensitive.
    assert!(matches!(
        policy.preflight(&preflight("HTTPS://Shop.Example", "GET", None)),
        Some(Ok(_))
    ));
}

#[test]
fn a_preflight_for_a_method_or_header_the_route_does_not_allow_is_refused() {
    let policy = CorsPolicy::new(&shop());
    let refusal = refused(policy.preflight(&preflight("https://shop.example", "DELETE", None)));
    assert_eq!(refusal.status, StatusCode::FORBIDDEN);
    assert!(
        refusal.detail.contains("`DELETE`") && refusal.detail.contains("GET, POST"),
        "{}",
        refusal.detail
    );

    let refusal = refused(policy.preflight(&preflight(
        "https://shop.example",
        "POST",
        Some("content-type, x-debug"),
    )));
    assert!(refusal.detail.contains("`x-debug`"), "{}", refusal.detail);
}

#[test]
fn requests_that_are_not_preflights_go_on_to_the_service() {
    let policy = CorsPolicy::new(&shop());
    // A plain OPTIONS (no Access-Control-Request-Method) is the service's business.
    let plain = Request::builder()
        .method(Method::OPTIONS)
        .uri("/api/orders")
        .header("origin", "https://shop.example")
        .body(())
        .expect("request");
    assert!(policy.preflight(&plain).is_none());
    let get = Request::builder()
        .uri("/api/orders")
        .header("origin", "https://shop.example")
        .body(())
        .expect("request");
    assert!(policy.preflight(&get).is_none());
}

#[test]
fn actual_responses_get_the_origin_credentials_and_exposed_headers() {
    let policy = CorsPolicy::new(&shop());
    let mut headers = HeaderMap::new();
    headers.insert("vary", HeaderValue::from_static("accept-encoding"));
    // The service's own CORS header is replaced.
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    let origin = HeaderValue::from_static("https://shop.example");
    policy.decorate(Some(&origin), &mut headers);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert_eq!(headers["access-control-allow-credentials"], "true");
    assert_eq!(headers["access-control-expose-headers"], "x-request-id");
    let vary: Vec<_> = headers.get_all("vary").iter().collect();
    assert_eq!(vary, ["accept-encoding", "origin"]);
}

#[test]
fn a_disallowed_or_missing_origin_gets_no_cors_headers_but_vary() {
    let policy = CorsPolicy::new(&shop());
    let mut headers = HeaderMap::new();
    let evil = HeaderValue::from_static("https://evil.example");
    policy.decorate(Some(&evil), &mut headers);
    assert!(headers.get("access-control-allow-origin").is_none());
    assert!(headers.get("access-control-allow-credentials").is_none());
    assert_eq!(headers["vary"], "origin");

    let mut headers = HeaderMap::new();
    policy.decorate(None, &mut headers);
    assert!(headers.get("access-control-allow-origin").is_none());
    assert_eq!(headers["vary"], "origin");
}

#[test]
fn any_origin_without_credentials_is_answered_with_a_star() {
    let policy = CorsPolicy::new(&Cors {
        origins: vec!["*".into()],
        credentials: false,
        expose: Vec::new(),
        ..shop()
    });
    let response = policy
        .preflight(&preflight("https://anyone.example", "GET", None))
        .expect("a preflight")
        .expect("allowed");
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    assert!(
        response
            .headers()
            .get("access-control-allow-credentials")
            .is_none()
    );

    let mut headers = HeaderMap::new();
    let origin = HeaderValue::from_static("https://anyone.example");
    policy.decorate(Some(&origin), &mut headers);
    assert_eq!(headers["access-control-allow-origin"], "*");
    // The same answer for everyone: nothing to vary on.
    assert!(headers.get("vary").is_none());
    assert!(headers.get("access-control-expose-headers").is_none());
}
