//! Gateway authentication end to end: tokens signed with real keys (RSA from a test-only fixture,
//! P-256 and Ed25519 generated here, an HMAC secret), a real HTTP server on 127.0.0.1 serving the
//! JWKS, and every refusal as the problem+json response a client gets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use flotilla_gateway::auth::{Auth, Guard, Options, hash_key};
use flotilla_manifest::{
    ApiKey, ApiKeySettings, AuthKind, Authenticator, JwtAlgorithm, JwtKeys, JwtSettings, RouteAuth,
};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A test-only RSA key made with `openssl genrsa 2048` (see fixtures/README.md). It protects
/// nothing.
const TEST_RSA_KEY: &str = include_str!("fixtures/jwt-test-rsa.pem");
const ISSUER: &str = "https://id.example/";
const SECRET_VARIABLE: &str = "FLOTILLA_TEST_JWT_SECRET";
const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";
const SHORT_SECRET_VARIABLE: &str = "FLOTILLA_TEST_SHORT_SECRET";

/// The environment the gateway sees in these tests: changing the real one while other test
/// threads read it is undefined behaviour.
fn test_env(name: &str) -> Option<String> {
    match name {
        SECRET_VARIABLE => Some(SECRET.into()),
        SHORT_SECRET_VARIABLE => Some("too-short".into()),
        _ => None,
    }
}

fn options() -> Options {
    Options {
        min_refetch: Duration::from_millis(300),
        env: test_env,
        ..Options::default()
    }
}

// ---- keys and tokens ----

struct Keys {
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
    ed: Ed25519KeyPair,
    rng: SystemRandom,
}

impl Keys {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let pem: String = TEST_RSA_KEY
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        let der = STANDARD.decode(pem).expect("PEM body");
        let rsa = RsaKeyPair::from_pkcs8(&der).expect("PKCS#8 RSA key");
        Self {
            rsa,
            ec: new_ec(&rng),
            ed: new_ed(&rng),
            rng,
        }
    }

    /// The JWKS with the RSA key as `rsa-1`, the P-256 key as `ec` and the Ed25519 key as `ed-1`.
    fn jwks(&self, ec_kid: &str) -> Value {
        json!({ "keys": [rsa_jwk(&self.rsa, "rsa-1"), ec_jwk(&self.ec, ec_kid), ed_jwk(&self.ed, "ed-1")] })
    }

    fn rs256(&self, kid: &str, claims: &Value) -> String {
        token(
            json!({"alg": "RS256", "kid": kid, "typ": "JWT"}),
            claims,
            |input| {
                let mut sig = vec![0; self.rsa.public().modulus_len()];
                self.rsa
                    .sign(&signature::RSA_PKCS1_SHA256, &self.rng, input, &mut sig)
                    .expect("RSA signature");
                sig
            },
        )
    }

    fn es256(&self, kid: &str, claims: &Value) -> String {
        es256_with(&self.ec, &self.rng, kid, claims)
    }

    fn eddsa(&self, kid: &str, claims: &Value) -> String {
        token(json!({"alg": "EdDSA", "kid": kid}), claims, |input| {
            self.ed.sign(input).as_ref().to_vec()
        })
    }
}

fn new_ec(rng: &SystemRandom) -> EcdsaKeyPair {
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, rng).expect("P-256 key");
    EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), rng).expect("P-256 key pair")
}

fn new_ed(rng: &SystemRandom) -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(rng).expect("Ed25519 key");
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("Ed25519 key pair")
}

fn es256_with(key: &EcdsaKeyPair, rng: &SystemRandom, kid: &str, claims: &Value) -> String {
    token(json!({"alg": "ES256", "kid": kid}), claims, |input| {
        key.sign(rng, input)
            .expect("ECDSA signature")
            .as_ref()
            .to_vec()
    })
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    token(json!({"alg": "HS256", "typ": "JWT"}), claims, |input| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        ring::hmac::sign(&key, input).as_ref().to_vec()
    })
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn token(header: Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

fn rsa_jwk(key: &RsaKeyPair, kid: &str) -> Value {
    let public = signature::RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
    json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(&public.n), "e": b64(&public.e)})
}

fn ec_jwk(key: &EcdsaKeyPair, kid: &str) -> Value {
    let point = key.public_key().as_ref();
    json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])})
}

fn ed_jwk(key: &Ed25519KeyPair, kid: &str) -> Value {
    json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(key.public_key().as_ref())})
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Claims the `users` authenticator accepts.
fn good_claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": ["shop", "other"],
        "sub": "user-42",
        "exp": now() + 300,
        "iat": now(),
        "scope": "orders:read orders:write",
        "tenant": "acme",
        "nested": {"ignored": [1, 2, 3]},
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

// ---- the JWKS server ----

/// Serves `document` at any path; counts the requests; answers 500 while `failing`.
struct JwksServer {
    addr: SocketAddr,
    document: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl JwksServer {
    async fn start(document: &Value) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let document = Arc::new(Mutex::new(document.to_string()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (doc, count, fail) = (document.clone(), fetches.clone(), failing.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (doc, count, fail) = (doc.clone(), count.clone(), fail.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_: Request<Incoming>| {
                        count.fetch_add(1, Ordering::SeqCst);
                        let body = doc.lock().expect("lock").clone();
                        let failing = fail.load(Ordering::SeqCst);
                        async move {
                            let mut response = Response::new(Full::new(Bytes::from(body)));
                            if failing {
                                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            document,
            fetches,
            failing,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn publish(&self, document: &Value) {
        *self.document.lock().expect("lock") = document.to_string();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

// ---- authenticators ----

fn users(jwks_url: &str, refresh: Duration) -> Authenticator {
    Authenticator {
        name: "users".into(),
        kind: AuthKind::Jwt(JwtSettings {
            keys: JwtKeys::JwksUrl {
                url: jwks_url.into(),
                refresh,
            },
            issuer: Some(ISSUER.into()),
            audience: vec!["shop".into()],
            algorithms: vec![
                JwtAlgorithm::Rs256,
                JwtAlgorithm::Es256,
                JwtAlgorithm::EdDsa,
            ],
            leeway: Duration::from_secs(30),
            forward_claims: vec![("x-tenant".into(), "tenant".into())],
        }),
    }
}

fn internal() -> Authenticator {
    Authenticator {
        name: "internal".into(),
        kind: AuthKind::Jwt(JwtSettings {
            keys: JwtKeys::SecretEnv {
                variable: SECRET_VARIABLE.into(),
            },
            issuer: Some("shop".into()),
            audience: Vec::new(),
            algorithms: vec![JwtAlgorithm::Hs256],
            leeway: Duration::from_secs(30),
            forward_claims: Vec::new(),
        }),
    }
}

const ACME_KEY: &str = "acme-secret-key-0123456789";
const GLOBEX_KEY: &str = "globex-secret-key-9876543210";

fn partners() -> Authenticator {
    let digest = |key: &str| -> [u8; 32] {
        let hex = hash_key(key);
        let mut out = [0; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
        }
        out
    };
    Authenticator {
        name: "partners".into(),
        kind: AuthKind::ApiKeys(ApiKeySettings {
            header: "x-api-key".into(),
            keys: vec![
                ApiKey {
                    name: "acme".into(),
                    sha256: digest(ACME_KEY),
                    scopes: vec!["orders:read".into()],
                },
                ApiKey {
                    name: "globex".into(),
                    sha256: digest(GLOBEX_KEY),
                    scopes: vec!["orders:read".into(), "orders:write".into()],
                },
            ],
        }),
    }
}

fn route(authenticators: &[&str], scopes: &[&str]) -> RouteAuth {
    RouteAuth {
        authenticators: authenticators.iter().map(|s| s.to_string()).collect(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

struct Fixture {
    keys: Keys,
    jwks: JwksServer,
    auth: Arc<Auth>,
    shutdown: CancellationToken,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn fixture(refresh: Duration) -> Fixture {
    let keys = Keys::new();
    let jwks = JwksServer::start(&keys.jwks("ec-1")).await;
    let shutdown = CancellationToken::new();
    let auth = Auth::start_with(
        &[users(&jwks.url(), refresh), internal(), partners()],
        Path::new("."),
        shutdown.clone(),
        options(),
    )
    .await
    .expect("auth starts");
    Fixture {
        keys,
        jwks,
        auth,
        shutdown,
    }
}

// ---- requests ----

/// A refused request as the client sees it.
#[derive(Debug)]
struct Refused {
    status: StatusCode,
    headers: HeaderMap,
    problem: Value,
}

impl Refused {
    fn challenges(&self) -> Vec<&str> {
        self.headers
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .map(|v| v.to_str().expect("ASCII challenge"))
            .collect()
    }

    fn kind(&self) -> &str {
        self.problem["type"].as_str().unwrap_or("")
    }

    fn detail(&self) -> &str {
        self.problem["detail"].as_str().unwrap_or("")
    }
}

/// What the gateway does with a request from outside: strip client-sent identity headers,
/// check the route's guard, forward the identity; a refusal becomes the problem response.
async fn admit(auth: &Auth, guard: &Guard, mut headers: HeaderMap) -> Result<HeaderMap, Refused> {
    auth.strip_identity_headers(&mut headers);
    match guard.check(&headers).await {
        Ok(identity) => {
            identity.apply(&mut headers);
            Ok(headers)
        }
        Err(refusal) => {
            let response = flotilla_proxy::Error::from(refusal).to_response(None);
            let (parts, body) = response.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            assert_eq!(parts.headers["content-type"], "application/problem+json");
            Err(Refused {
                status: parts.status,
                headers: parts.headers,
                problem: serde_json::from_slice(&body).expect("problem JSON"),
            })
        }
    }
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::try_from(format!("Bearer {token}")).expect("header"),
    );
    headers
}

fn api_key(key: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", HeaderValue::try_from(key).expect("header"));
    headers
}

#[track_caller]
fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).map(|v| v.to_str().expect("ASCII"))
}

/// A 401 invalid-credentials whose description contains `expected` and never the token.
#[track_caller]
fn assert_invalid_token(refused: &Refused, token: &str, expected: &str) {
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    assert_eq!(refused.kind(), "urn:flotilla:problem:invalid-credentials");
    assert!(refused.detail().contains(expected), "{refused:?}");
    let challenges = refused.challenges();
    assert_eq!(challenges.len(), 1, "{challenges:?}");
    assert!(
        challenges[0].starts_with(
            "Bearer realm=\"flotilla\", error=\"invalid_token\", error_description=\""
        ),
        "{challenges:?}"
    );
    assert!(challenges[0].contains(expected), "{challenges:?}");
    let signature = token.rsplit('.').next().expect("signature");
    let everything = format!("{:?} {}", refused.headers, refused.problem);
    assert!(!everything.contains(token), "the token is echoed");
    assert!(
        signature.is_empty() || !everything.contains(signature),
        "the signature is echoed"
    );
}

// ---- tests ----

#[tokio::test]
async fn tokens_of_every_key_type_are_accepted_and_forwarded() {
    let f = fixture(Duration::from_secs(300)).await;
    let guard = f.auth.guard(&route(&["users"], &[])).expect("guard");
    let claims = good_claims();
    for token in [
        f.keys.rs256("rsa-1", &claims),
        f.keys.es256("ec-1", &claims),
        f.keys.eddsa("ed-1", &claims),
    ] {
        let headers = admit(&f.auth, &guard, bearer(&token))
            .await
            .expect("accepted");
        assert_eq!(header(&headers, "x-flotilla-subject"), Some("user-42"));
        assert_eq!(
            header(&headers, "x-flotilla-scopes"),
            Some("orders:read orders:write")
        );
        assert_eq!(header(&headers, "x-flotilla-auth"), Some("users"));
        assert_eq!(header(&headers, "x-tenant"), Some("acme"));
    }

    let guard = f.auth.guard(&route(&["internal"], &[])).expect("guard");
    let claims = json!({"iss": "shop", "sub": "orders", "exp": now() + 60, "scp": ["a", "b"]});
    let headers = admit(&f.auth, &guard, bearer(&hs256(SECRET.as_bytes(), &claims)))
        .await
        .expect("HS256 accepted");
    assert_eq!(header(&headers, "x-flotilla-subject"), Some("orders"));
    assert_eq!(header(&headers, "x-flotilla-scopes"), Some("a b"));
    assert_eq!(header(&headers, "x-flotilla-auth"), Some("internal"));
    // Another authenticator's claim headers are not set from this one's tokens.
    assert_eq!(header(&headers, "x-tenant"), None);
}

#[tokio::test]
async fn expired_future_and_misaddressed_tokens_are_refused() {
    let f = fixture(Duration::from_secs(300)).await;
    let guard = f.auth.guard(&route(&["users"], &[])).expect("guard");
    let cases = [
        (
            with(good_claims(), "exp", json!(now() - 120)),
            "the token has expired",
        ),
        (
            good_claims()
                .as_object()
                .map(|c| {
                    let mut c = c.clone();
                    c.remove("exp");
                    Value::Object(c)
                })
                .expect("object"),
            "no expiry",
        ),
        (
            with(good_claims(), "nbf", json!(now() + 600)),
            "not valid yet",
        ),
        (
            with(good_claims(), "aud", json!("someone-else")),
            "not meant for this audience",
        ),
        (
            with(good_claims(), "iss", json!("https://evil.example/")),
            "issuer is not accepted",
        ),
        (
            with(good_claims(), "exp", json!("tomorrow")),
            "claims are not valid",
        ),
    ];
    for (claims, expected) in cases {
        let token = f.keys.es256("ec-1", &claims);
        let refused = admit(&f.auth, &guard, bearer(&token))
            .await
            .expect_err(expected);
        assert_invalid_token(&refused, &token, expected);
    }
    // Within the leeway, a just-expired token and one valid in a moment still pass.
    let token = f
        .keys
        .es256("ec-1", &with(good_claims(), "exp", json!(now() - 5)));
    admit(&f.auth, &guard, bearer(&token))
        .await
        .expect("within leeway");
    let token = f
        .keys
        .es256("ec-1", &with(good_claims(), "nbf", json!(now() + 5)));
    admit(&f.auth, &guard, bearer(&token))
        .await
        .expect("within leeway");
}

#[tokio::test]
async fn a_tampered_token_is_refused() {
    let f = fixture(Duration::from_secs(300)).await;
    let guard = f.auth.guard(&route(&["users"], &[])).expect("guard");
    let token = f.keys.rs256("rsa-1", &good_claims());
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    parts[1] = b64(with(good_claims(), "sub", json!("admin"))
        .to_string()
        .as_bytes());
    let forged = parts.join(".");
    let refused = admit(&f.auth, &guard, bearer(&forged))
        .await
        .expect_err("forged");
    assert_invalid_token(&refused, &forged, "signature is not valid");

    for garbage in ["abc", "a.b", "a.b.c.d.e", "e30.e30.", "!!!.???.***"] {
        let refused = admit(&f.auth, &guard, bearer(garbage))
            .await
            .expect_err(garbage);
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refused.kind(), "urn:flotilla:problem:invalid-credentials");
    }
}

#[tokio::test]
async fn alg_none_is_refused() {
    let f = fixture(Duration::from_secs(300)).await;
    let guard = f
        .auth
        .guard(&route(&["users", "internal"], &[]))
        .expect("guard");
    for alg in ["none", "None", "NONE"] {
        let header = b64(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes());
        let claims = b64(good_claims().to_string().as_bytes());
        let token = format!("{header}.{claims}.");
        let refused = admit(&f.auth, &guard, bearer(&token))
            .await
            .expect_err("alg none");
        assert_invalid_token(&refused, &token, "alg none");
    }
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_rsa_public_key_is_refused() {
    let f = fixture(Duration::from_secs(300)).await;
    let public_der = f.keys.rsa.public().as_ref().to_vec();
    let components = signature::RsaPublicKeyComponents::<Vec<u8>>::from(f.keys.rsa.public());
    let claims = good_claims();
    let forgeries = [
        hs256(&public_der, &claims),
        hs256(&components.n, &claims),
        hs256(
            rsa_jwk(&f.keys.rsa, "rsa-1").to_string().as_bytes(),
            &claims,
        ),
    ];

    // The manifest never lets HS algorithms next to a JWKS; even when they are listed (here
    // built by hand), an RSA key never verifies an HMAC.
    let mut confused = users(&f.jwks.url(), Duration::from_secs(300));
    if let AuthKind::Jwt(settings) = &mut confused.kind {
        settings.algorithms = vec![JwtAlgorithm::Rs256, JwtAlgorithm::Hs256];
    }
    confused.name = "confused".into();
    let shutdown = CancellationToken::new();
    let auth = Auth::start_with(&[confused], Path::new("."), shutdown.clone(), options())
        .await
        .expect("auth");
    let guard = auth.guard(&route(&["confused"], &[])).expect("guard");
    for token in &forgeries {
        let token_with_kid = {
            let mut parts: Vec<&str> = token.split('.').collect();
            let header = b64(json!({"alg": "HS256", "kid": "rsa-1"})
                .to_string()
                .as_bytes());
            parts[0] = &header;
            let input = format!("{}.{}", parts[0], parts[1]);
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public_der);
            format!(
                "{input}.{}",
                b64(ring::hmac::sign(&key, input.as_bytes()).as_ref())
            )
        };
        for token in [token.clone(), token_with_kid] {
            let refused = admit(&auth, &guard, bearer(&token))
                .await
                .expect_err("confusion");
            assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
        }
    }
    shutdown.cancel();

    let guard = f.auth.guard(&route(&["users"], &[])).expect("guard");
    for token in &forgeries {
        let refused = admit(&f.auth, &guard, bearer(token))
            .await
            .expect_err("confusion");
        assert_invalid_token(&refused, token, "algorithm HS256 is not accepted here");
    }
}

#[tokio::test]
async fn an_unknown_kid_fetches_the_jwks_again_so_rotation_works() {
    let f = fixture(Duration::from_secs(3600)).await;
    let guard = f.auth.guard(&route(&["users"], &[])).expect("guard");
    assert_eq!(f.jwks.fetches(), 1, "fetched once at start");

    // Wait out the refetch interval since the start.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let new_key = new_ec(&f.keys.rng);
    let early = es256_with(&new_key, &f.keys.rng, "ec-2", &good_claims());
    let refused = admit(&f.auth, &guard, bearer(&early))
        .await
        .expect_err("unknown kid");
    assert_invalid_token(&refused, &early, "signing key (`kid`) is not known");
    assert_eq!(f.jwks.fetches(), 2, "an unknown kid fetches again");

    // A second unknown kid right away does not: refetches are rate-limited.
    let refused = admit(&f.auth, &guard, bearer(&early))
        .await
        .expect_err("unknown kid");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(f.jwks.fetches(), 2, "rate-limited");

    // The provider rotates: ec-1 is gone, ec-2 is in.
    f.jwks
        .publish(&json!({ "keys": [ec_jwk(&new_key, "ec-2")] }));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rotated = es256_with(&new_key, &f.keys.rng, "ec-2", &good_claims());
    let headers = admit(&f.auth, &guard, bearer(&rotated))
        .await
        .expect("new kid accepted");
    assert_eq!(header(&headers, "x-flotilla-subject"), Some("user-42"));
    assert_eq!(f.jwks.fetches(), 3);
    // Concurrent requests with the new key do not fetch again.
    let mut checks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (auth, guard, token) = (f.auth.clone(), guard.clone(), rotated.clone());
        checks.spawn(async move { admit(&auth, &guard, bearer(&token)).await.is_ok() });
    }
    while let Some(accepted) = checks.join_next().await {
        assert!(accepted.expect("task"));
    }
    assert_eq!(f.jwks.fetches(), 3);

    let old = f.keys.es256("ec-1", &good_claims());
    let refused = admit(&f.auth, &guard, bearer(&old))
        .await
        .expect_err("old key gone");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_failing_jwks_endpoint_keeps_the_last_good_keys() {
    let f = fixture(Duration::from_millis(100)).await;
    let guard = f.auth.guard(&route(&["users"], &[])).expect("guard");
    f.jwks.failing.store(true, Ordering::SeqCst);
    let before = f.jwks.fetches();
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(f.jwks.fetches() > before, "refreshed periodically");
    let token = f.keys.rs256("rsa-1", &good_claims());
    admit(&f.auth, &guard, bearer(&token))
        .await
        .expect("last good keys kept");
}

#[tokio::test]
async fn an_unreachable_jwks_url_answers_503_until_it_can_be_fetched() {
    let keys = Keys::new();
    // A port nothing listens on any more.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/jwks.json", closed.local_addr().expect("addr"));
    drop(closed);
    let shutdown = CancellationToken::new();
    let auth = Auth::start_with(
        &[users(&url, Duration::from_secs(300))],
        Path::new("."),
        shutdown.clone(),
        options(),
    )
    .await
    .expect("an identity provider that is down does not stop the gateway");
    let guard = auth.guard(&route(&["users"], &[])).expect("guard");
    let refused = admit(&auth, &guard, bearer(&keys.rs256("rsa-1", &good_claims())))
        .await
        .expect_err("no keys");
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.kind(), "urn:flotilla:problem:auth-unavailable");
    assert!(refused.headers.contains_key("retry-after"));
    // No token at all is still a plain 401.
    let refused = admit(&auth, &guard, HeaderMap::new())
        .await
        .expect_err("no token");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), auth.stopped())
        .await
        .expect("refresh task stops on shutdown");
}

#[tokio::test]
async fn missing_credentials_get_401_with_a_challenge_per_scheme() {
    let f = fixture(Duration::from_secs(300)).await;
    let cases: [(&[&str], &[&str]); 3] = [
        (&["users"], &["Bearer realm=\"flotilla\""]),
        (&["partners"], &["ApiKey header=\"x-api-key\""]),
        (
            &["users", "partners"],
            &["Bearer realm=\"flotilla\"", "ApiKey header=\"x-api-key\""],
        ),
    ];
    for (names, expected) in cases {
        let guard = f.auth.guard(&route(names, &[])).expect("guard");
        let refused = admit(&f.auth, &guard, HeaderMap::new())
            .await
            .expect_err("no credentials");
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refused.kind(), "urn:flotilla:problem:unauthenticated");
        assert_eq!(refused.problem["status"], 401);
        assert_eq!(refused.challenges(), expected);
    }
    // Another scheme in `Authorization` is no bearer token.
    let guard = f.auth.guard(&route(&["users"], &[])).expect("guard");
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_static("Basic dXNlcjpwYXNz"),
    );
    let refused = admit(&f.auth, &guard, headers).await.expect_err("basic");
    assert_eq!(refused.kind(), "urn:flotilla:problem:unauthenticated");
}

#[tokio::test]
async fn insufficient_scope_gets_403() {
    let f = fixture(Duration::from_secs(300)).await;
    let guard = f
        .auth
        .guard(&route(&["users", "partners"], &["orders:write"]))
        .expect("guard");
    let token = f
        .keys
        .eddsa("ed-1", &with(good_claims(), "scope", json!("orders:read")));
    let refused = admit(&f.auth, &guard, bearer(&token))
        .await
        .expect_err("scope");
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.kind(), "urn:flotilla:problem:insufficient-scope");
    assert_eq!(
        refused.challenges(),
        ["Bearer realm=\"flotilla\", error=\"insufficient_scope\", scope=\"orders:write\""]
    );
    // The same with an API key whose scopes fall short.
    let refused = admit(&f.auth, &guard, api_key(ACME_KEY))
        .await
        .expect_err("scope");
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(
        refused.challenges(),
        ["ApiKey header=\"x-api-key\", error=\"insufficient_scope\", scope=\"orders:write\""]
    );
    // A credential with the scope passes.
    let token = f.keys.eddsa("ed-1", &good_claims());
    admit(&f.auth, &guard, bearer(&token))
        .await
        .expect("scope present");
    admit(&f.auth, &guard, api_key(GLOBEX_KEY))
        .await
        .expect("scope present");
}

#[tokio::test]
async fn api_keys_valid_invalid_and_missing() {
    let f = fixture(Duration::from_secs(300)).await;
    let guard = f
        .auth
        .guard(&route(&["partners"], &["orders:read"]))
        .expect("guard");
    let headers = admit(&f.auth, &guard, api_key(ACME_KEY))
        .await
        .expect("valid key");
    assert_eq!(header(&headers, "x-flotilla-subject"), Some("acme"));
    assert_eq!(header(&headers, "x-flotilla-scopes"), Some("orders:read"));
    assert_eq!(header(&headers, "x-flotilla-auth"), Some("partners"));

    for wrong in [
        "acme-secret-key-012345678",
        "",
        "ACME-SECRET-KEY-0123456789",
    ] {
        let refused = admit(&f.auth, &guard, api_key(wrong))
            .await
            .expect_err("invalid key");
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refused.kind(), "urn:flotilla:problem:invalid-credentials");
        assert_eq!(refused.detail(), "the API key is not valid");
        assert_eq!(refused.challenges(), ["ApiKey header=\"x-api-key\""]);
    }
    let refused = admit(&f.auth, &guard, HeaderMap::new())
        .await
        .expect_err("missing");
    assert_eq!(refused.kind(), "urn:flotilla:problem:unauthenticated");
    assert_eq!(refused.challenges(), ["ApiKey header=\"x-api-key\""]);
}

#[tokio::test]
async fn the_most_telling_refusal_wins_when_every_authenticator_refuses() {
    let f = fixture(Duration::from_secs(300)).await;
    let guard = f
        .auth
        .guard(&route(&["users", "internal"], &[]))
        .expect("guard");
    // `users` cannot use HS256 at all; `internal` verifies the signature and finds it expired.
    let claims = json!({"iss": "shop", "sub": "orders", "exp": now() - 600});
    let token = hs256(SECRET.as_bytes(), &claims);
    let refused = admit(&f.auth, &guard, bearer(&token))
        .await
        .expect_err("expired");
    assert_invalid_token(&refused, &token, "the token has expired");
    // And a good internal token passes the route although `users` refuses it.
    let claims = json!({"iss": "shop", "sub": "orders", "exp": now() + 60});
    let headers = admit(&f.auth, &guard, bearer(&hs256(SECRET.as_bytes(), &claims)))
        .await
        .expect("internal token");
    assert_eq!(header(&headers, "x-flotilla-auth"), Some("internal"));
}

#[tokio::test]
async fn spoofed_identity_headers_are_stripped() {
    let f = fixture(Duration::from_secs(300)).await;
    let spoofed = || {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-flotilla-subject", "admin"),
            ("x-flotilla-subject", "root"),
            ("x-flotilla-scopes", "everything"),
            ("x-flotilla-auth", "users"),
            ("x-tenant", "someone-else"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        headers
    };
    // A public route: the identity headers are gone, other headers stay.
    let mut headers = spoofed();
    headers.insert("x-other", HeaderValue::from_static("kept"));
    f.auth.strip_identity_headers(&mut headers);
    for name in [
        "x-flotilla-subject",
        "x-flotilla-scopes",
        "x-flotilla-auth",
        "x-tenant",
    ] {
        assert!(!headers.contains_key(name), "{name} not stripped");
    }
    assert_eq!(header(&headers, "x-other"), Some("kept"));

    // A route with auth: the verified identity replaces what the client claimed.
    let guard = f
        .auth
        .guard(&route(&["users", "partners"], &[]))
        .expect("guard");
    let mut request = spoofed();
    request.insert("x-api-key", HeaderValue::from_static(ACME_KEY));
    let headers = admit(&f.auth, &guard, request).await.expect("valid key");
    let subjects: Vec<_> = headers.get_all("x-flotilla-subject").iter().collect();
    assert_eq!(subjects, ["acme"]);
    assert_eq!(header(&headers, "x-flotilla-auth"), Some("partners"));
    assert_eq!(header(&headers, "x-flotilla-scopes"), Some("orders:read"));
    assert!(
        !headers.contains_key("x-tenant"),
        "not a claim of an API key"
    );
}

#[tokio::test]
async fn jwks_files_secrets_and_names_are_checked_at_start() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("keys")).expect("mkdir");
    std::fs::write(
        dir.path().join("keys/jwks.json"),
        keys.jwks("ec-1").to_string(),
    )
    .expect("write");
    let from_file = |path: &str| Authenticator {
        name: "files".into(),
        kind: AuthKind::Jwt(JwtSettings {
            keys: JwtKeys::JwksFile {
                path: path.into(),
                refresh: Duration::from_millis(100),
            },
            issuer: None,
            audience: Vec::new(),
            algorithms: vec![JwtAlgorithm::Es256],
            leeway: Duration::ZERO,
            forward_claims: Vec::new(),
        }),
    };
    let shutdown = CancellationToken::new();
    let auth = Auth::start_with(
        &[from_file("keys/jwks.json")],
        dir.path(),
        shutdown.clone(),
        options(),
    )
    .await
    .expect("JWKS file relative to the manifest");
    let guard = auth.guard(&route(&["files"], &[])).expect("guard");
    let claims = json!({"exp": now() + 60});
    admit(&auth, &guard, bearer(&keys.es256("ec-1", &claims)))
        .await
        .expect("file key");

    // The file changes: the new key is picked up without a restart.
    let rotated = new_ec(&keys.rng);
    std::fs::write(
        dir.path().join("keys/jwks.json"),
        json!({"keys": [ec_jwk(&rotated, "ec-9")]}).to_string(),
    )
    .expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let token = es256_with(&rotated, &keys.rng, "ec-9", &claims);
    admit(&auth, &guard, bearer(&token))
        .await
        .expect("rotated file key");
    shutdown.cancel();

    let start = |authenticator: Authenticator| {
        let dir = dir.path().to_path_buf();
        async move {
            Auth::start_with(&[authenticator], &dir, CancellationToken::new(), options())
                .await
                .err()
                .expect("refused at start")
        }
    };
    let error = start(from_file("keys/missing.json")).await;
    assert!(
        error.contains("authenticator `files`") && error.contains("missing.json"),
        "{error}"
    );
    std::fs::write(dir.path().join("keys/empty.json"), r#"{"keys": []}"#).expect("write");
    let error = start(from_file("keys/empty.json")).await;
    assert!(error.contains("no usable signing key"), "{error}");

    let mut short = internal();
    if let AuthKind::Jwt(settings) = &mut short.kind {
        settings.keys = JwtKeys::SecretEnv {
            variable: SHORT_SECRET_VARIABLE.into(),
        };
    }
    let error = start(short).await;
    assert!(error.contains("at least 32"), "{error}");
    let mut unset = internal();
    if let AuthKind::Jwt(settings) = &mut unset.kind {
        settings.keys = JwtKeys::SecretEnv {
            variable: "FLOTILLA_TEST_UNSET".into(),
        };
    }
    let error = start(unset).await;
    assert!(error.contains("FLOTILLA_TEST_UNSET is not set"), "{error}");

    let auth = Auth::start_with(&[], dir.path(), CancellationToken::new(), options())
        .await
        .expect("no authenticators");
    let error = auth.guard(&route(&["nobody"], &[])).expect_err("unknown");
    assert!(error.contains("nobody"), "{error}");
}

#[test]
fn hash_key_matches_sha256sum() {
    // `printf %s acme-secret-key-0123456789 | sha256sum`
    assert_eq!(
        hash_key(ACME_KEY),
        "d1362ff9372236411447ef8caa436ff7540810f62a01fc4afeac55f6202a3c47"
    );
    assert_eq!(
        hash_key(""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[tokio::test]
async fn a_remembered_token_still_expires_and_goes_with_its_key() {
    let f = fixture(Duration::from_secs(3600)).await;
    // Expiry: a token 29 s past `exp` passes within the 30 s leeway, and is refused once the
    // leeway is over even though its signature was already verified.
    let internal = f.auth.guard(&route(&["internal"], &[])).expect("guard");
    let claims = json!({"iss": "shop", "sub": "svc", "exp": now() - 29});
    let token = hs256(SECRET.as_bytes(), &claims);
    admit(&f.auth, &internal, bearer(&token))
        .await
        .expect("within the leeway");
    admit(&f.auth, &internal, bearer(&token))
        .await
        .expect("remembered");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let refused = admit(&f.auth, &internal, bearer(&token))
        .await
        .expect_err("expired since");
    assert_invalid_token(&refused, &token, "expired");

    // Key rotation: once the provider drops ec-1, a token it verified before is refused.
    let users = f.auth.guard(&route(&["users"], &[])).expect("guard");
    let old = f.keys.es256("ec-1", &good_claims());
    admit(&f.auth, &users, bearer(&old)).await.expect("ec-1");
    admit(&f.auth, &users, bearer(&old))
        .await
        .expect("remembered");
    let new_key = new_ec(&f.keys.rng);
    f.jwks
        .publish(&json!({ "keys": [ec_jwk(&new_key, "ec-2")] }));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rotated = es256_with(&new_key, &f.keys.rng, "ec-2", &good_claims());
    admit(&f.auth, &users, bearer(&rotated))
        .await
        .expect("ec-2 after the refetch");
    let refused = admit(&f.auth, &users, bearer(&old))
        .await
        .expect_err("ec-1 is gone");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
}
