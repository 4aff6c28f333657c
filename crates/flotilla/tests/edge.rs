//! End-to-end: the gateway as an edge in a running fleet — API versions, JWT and API-key
//! authentication, rate limits, CORS, body and header limits, a Backend-for-Frontend facade,
//! the access log — and `up --tls` serving HTTPS with HTTP/2.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::{Value, json};

const SECRET: &str = "an-edge-test-secret-of-at-least-32-bytes!";
/// `flotilla hash-key acme-secret-key`.
const ACME_DIGEST: &str = "b81ff514581f28cf9536d9227563cf3a93e9ced7728e175b4e1d044be8a3ef29";

fn manifest() -> String {
    format!(
        r#"
app = "edge"

[gateway]
max_body = "1KiB"
max_headers = "16KiB"

[gateway.auth.users]
secret_env = "EDGE_JWT_SECRET"
issuer = "edge-test"
audience = "shop"

[gateway.auth.partners]
keys = [{{ name = "acme", sha256 = "{ACME_DIGEST}", scopes = ["things:read"] }}]

[[gateway.routes]]
prefix = "/private"
service = "echo"
auth = ["users", "partners"]
scopes = ["things:read"]
rate_limit = {{ rate = "3/m", burst = 3, key = "subject" }}
cors = {{ origins = ["https://shop.example"], headers = ["authorization"] }}

[[gateway.routes]]
prefix = "/api/things"
service = "echo"
version = "1"
deprecated = 2026-01-01T00:00:00Z
sunset = 2027-01-01T00:00:00Z

[[gateway.routes]]
prefix = "/api/things"
service = "echo"
version = "2"
default_version = true
rewrite = "/v2/things"

[[gateway.routes]]
prefix = "/"
service = "echo"

[bff.web]

[[bff.web.routes]]
path = "/things/{{id}}"

[bff.web.routes.parts.thing]
call = "GET echo /things/{{{{path.id}}}}"
fields = "service,path"

[bff.web.routes.parts.again]
call = "GET echo /again/{{{{path.id}}}}"
fields = "/headers/accept"

[[bff.web.routes]]
path = "/mine/{{id}}"
auth = "users"

[bff.web.routes.parts.thing]
call = "GET echo /mine/{{{{path.id}}}}"
fields = "/headers/x-flotilla-subject"

[services.echo]
run = "python3 echo.py"
health = {{ interval = "200ms" }}
"#
    )
}

fn token(claims: Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let input = format!("{header}.{claims}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let signature = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn valid_claims(subject: &str) -> Value {
    json!({
        "sub": subject, "iss": "edge-test", "aud": "shop",
        "exp": now() + 600, "scope": "things:read",
    })
}

fn problem(response: reqwest::blocking::Response) -> Value {
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{response:?}"
    );
    response.json().expect("problem json")
}

#[test]
fn the_gateway_is_an_edge() {
    let app = App::new(&manifest());
    let fleet = Fleet::start_with_env(app.path(), &[], &[("EDGE_JWT_SECRET", SECRET)]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    let gateway = &fleet.gateway;
    let client = Client::new();

    // API versions: the default, by header, deprecation headers on the old one.
    let v2: Value = get(&format!("{gateway}/api/things/7"))
        .json()
        .expect("json");
    assert_eq!(v2["path"], "/v2/things/7");
    let v1 = client
        .get(format!("{gateway}/api/things/7"))
        .header("accept-version", "1")
        .send()
        .expect("v1");
    assert_eq!(v1.headers()["deprecation"], "@1767225600");
    assert_eq!(v1.headers()["sunset"], "Fri, 01 Jan 2027 00:00:00 GMT");
    let v1: Value = v1.json().expect("json");
    assert_eq!(v1["path"], "/api/things/7");
    let unknown = client
        .get(format!("{gateway}/api/things/7"))
        .header("accept-version", "3")
        .send()
        .expect("v3");
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        problem(unknown)["type"],
        "urn:flotilla:problem:unknown-api-version"
    );

    // Authentication: none, expired, wrong audience, a good token, an API key.
    let private = format!("{gateway}/private/things");
    let missing = client.get(&private).send().expect("missing");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let challenge = missing.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(challenge.contains("Bearer"), "{challenge}");
    assert_eq!(
        problem(missing)["type"],
        "urn:flotilla:problem:unauthenticated"
    );
    let mut expired = valid_claims("ann");
    expired["exp"] = json!(now() - 3600);
    let mut wrong_audience = valid_claims("ann");
    wrong_audience["aud"] = json!("elsewhere");
    for claims in [expired, wrong_audience] {
        let refused = client
            .get(&private)
            .bearer_auth(token(claims))
            .send()
            .expect("refused");
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert!(
            refused.headers()["www-authenticate"]
                .to_str()
                .expect("ascii")
                .contains("invalid_token")
        );
    }
    let mut no_scope = valid_claims("ann");
    no_scope["scope"] = json!("other");
    let forbidden = client
        .get(&private)
        .bearer_auth(token(no_scope))
        .send()
        .expect("forbidden");
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);

    let ann = token(valid_claims("ann"));
    let seen: Value = client
        .get(&private)
        .bearer_auth(&ann)
        .header("x-flotilla-subject", "admin")
        .header("origin", "https://shop.example")
        .send()
        .expect("ann")
        .json()
        .expect("json");
    // The verified subject, never the one the client claimed.
    assert_eq!(seen["headers"]["x-flotilla-subject"], "ann");
    assert_eq!(seen["headers"]["x-flotilla-scopes"], "things:read");
    let by_key: Value = client
        .get(&private)
        .header("x-api-key", "acme-secret-key")
        .send()
        .expect("acme")
        .json()
        .expect("json");
    assert_eq!(by_key["headers"]["x-flotilla-subject"], "acme");
    let bad_key = client
        .get(&private)
        .header("x-api-key", "guess")
        .send()
        .expect("guess");
    assert_eq!(bad_key.status(), StatusCode::UNAUTHORIZED);

    // Rate limit per subject: ann has used one of three; two more pass, the fourth is refused.
    for _ in 0..2 {
        let ok = client.get(&private).bearer_auth(&ann).send().expect("ok");
        assert_eq!(ok.status(), StatusCode::OK);
        assert!(ok.headers().contains_key("ratelimit-remaining"));
    }
    let limited = client
        .get(&private)
        .bearer_auth(&ann)
        .send()
        .expect("limited");
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    assert_eq!(
        problem(limited)["type"],
        "urn:flotilla:problem:rate-limited"
    );
    // Another subject has a bucket of its own.
    let bob = client
        .get(&private)
        .bearer_auth(token(valid_claims("bob")))
        .send()
        .expect("bob");
    assert_eq!(bob.status(), StatusCode::OK);

    // CORS: an allowed origin's preflight, a disallowed one's refusal.
    let preflight = |origin: &str| {
        client
            .request(reqwest::Method::OPTIONS, &private)
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
            .expect("preflight")
    };
    let allowed = preflight("https://shop.example");
    assert_eq!(allowed.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let refused = preflight("https://evil.example");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(problem(refused)["type"], "urn:flotilla:problem:cors-origin");
    // A page of an allowed origin can read a refusal too (a 401 without CORS headers would be
    // a network error to it); another origin's page cannot.
    let unauthorized = client
        .get(&private)
        .header("origin", "https://shop.example")
        .send()
        .expect("401 to a page");
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        unauthorized.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    assert!(unauthorized.headers().contains_key("x-request-id"));
    assert_eq!(
        problem(unauthorized)["type"],
        "urn:flotilla:problem:unauthenticated"
    );
    let elsewhere = client
        .get(&private)
        .header("origin", "https://evil.example")
        .send()
        .expect("401 elsewhere");
    assert!(
        !elsewhere
            .headers()
            .contains_key("access-control-allow-origin")
    );

    // Limits: a body over max_body, a head over max_headers.
    let big = client
        .post(format!("{gateway}/upload"))
        .body(vec![b'x'; 4096])
        .send()
        .expect("big body");
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let huge_header = client
        .get(format!("{gateway}/x"))
        .header("x-padding", "p".repeat(20 * 1024))
        .send()
        .expect("huge header");
    assert_eq!(
        huge_header.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );

    // A facade: two parts of echo, composed and projected.
    let web: Value = get(&format!("{gateway}/web/things/a%20b"))
        .json()
        .expect("json");
    assert_eq!(
        web,
        json!({
            "thing": {"service": "echo", "path": "/things/a%20b"},
            "again": {"accept": "application/json"},
        }),
        "{web:#}"
    );

    // A facade route with `auth`: refused without a token, the subject forwarded to each part.
    let mine = format!("{gateway}/web/mine/7");
    assert_eq!(
        client.get(&mine).send().expect("mine").status(),
        StatusCode::UNAUTHORIZED
    );
    let mine: Value = client
        .get(&mine)
        .bearer_auth(token(valid_claims("cy")))
        .send()
        .expect("mine")
        .json()
        .expect("json");
    assert_eq!(mine, json!({"thing": {"x-flotilla-subject": "cy"}}));

    // Every request above is in the access log, with its status.
    let log = fleet.dir.join(".flotilla/logs/gateway-access.log");
    wait_until("access log lines", Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("\"status\":429"))
    });
    let text = std::fs::read_to_string(&log).expect("access log");
    let line: Value = serde_json::from_str(text.lines().next().expect("a line")).expect("json");
    assert!(line["request_id"].is_string(), "{line}");
    assert!(line["method"].is_string(), "{line}");
}

#[test]
fn up_tls_serves_https_with_http2() {
    let app = App::new(
        r#"
app = "tls"

[[gateway.routes]]
prefix = "/"
service = "echo"

[services.echo]
run = "python3 echo.py"
health = { interval = "200ms" }
"#,
    );
    let fleet = Fleet::start(app.path(), &["--tls"]);
    fleet.wait_phase("ready", Duration::from_secs(60));
    assert!(fleet.gateway.starts_with("https://"), "{}", fleet.gateway);
    let cert = std::fs::read(app.path().join(".flotilla/tls/cert.pem")).expect("dev cert");
    let client = Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&cert).expect("pem"))
        .build()
        .expect("client");
    let url = fleet.gateway.replace("127.0.0.1", "localhost");
    let response = client.get(format!("{url}/hello")).send().expect("https");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let seen: Value = response.json().expect("json");
    assert_eq!(seen["path"], "/hello");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    // Plain HTTP to the HTTPS port is not served.
    let plain = Client::new()
        .get(format!(
            "{}/hello",
            fleet.gateway.replace("https://", "http://")
        ))
        .send();
    assert!(
        plain.is_err() || !plain.expect("answer").status().is_success(),
        "plain HTTP must not be served on the TLS port"
    );
}
