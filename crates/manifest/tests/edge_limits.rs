//! `[gateway]` limits, `[gateway.tls]` and a route's `cors`: what valid ones turn into, and
//! where and how invalid ones are reported.

mod common;
use common::*;

use std::path::PathBuf;
use std::time::Duration;

use flotilla_manifest::{Cors, EdgeLimits, TlsSettings};

/// A manifest whose `[gateway]` holds `gateway` (its keys, then any sub-tables).
fn with_gateway(gateway: &str) -> String {
    format!("app = \"shop\"\n[services.orders]\nrun = \"orders\"\n[gateway]\n{gateway}")
}

/// A manifest with one route `/api` to `orders` that has `cors = { CORS }`. The `cors` value
/// starts on line 7, column 8.
fn with_cors(cors: &str) -> String {
    format!(
        "app = \"shop\"\n[services.orders]\nrun = \"orders\"\n[gateway]\n[[gateway.routes]]\nprefix = \"/api\"\ncors = {{ {cors} }}\nservice = \"orders\"\n"
    )
}

/// The column at which `needle` starts on the cors line of [`with_cors`].
fn column(cors: &str, needle: &str) -> usize {
    "cors = { ".len() + cors.find(needle).expect("needle") + 1
}

#[test]
fn the_full_example_parses() {
    let manifest = ok(r#"app = "shop"
[services.orders]
run = "orders"

[gateway]
listen = "127.0.0.1:8080"
max_body = "8MiB"
max_headers = "64KiB"
header_timeout = "10s"
idle_timeout = "60s"
body_timeout = "30s"
access_log = false

[gateway.tls]
cert = "tls/cert.pem"
key = "tls/key.pem"

[[gateway.routes]]
prefix = "/api"
service = "orders"
cors = { origins = ["https://Shop.Example"], methods = ["GET", "POST"], headers = ["Content-Type", "authorization"], expose = ["x-request-id"], credentials = true, max_age = "10m" }
"#);
    assert_eq!(
        manifest.gateway.limits,
        EdgeLimits {
            max_body: 8 << 20,
            max_headers: 64 << 10,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            access_log: false,
        }
    );
    assert_eq!(
        manifest.gateway.tls,
        Some(TlsSettings {
            cert: PathBuf::from("tls/cert.pem"),
            key: PathBuf::from("tls/key.pem"),
        })
    );
    assert_eq!(
        manifest.gateway.routes[0].cors,
        Some(Cors {
            origins: vec!["https://shop.example".into()],
            methods: vec!["GET".into(), "POST".into()],
            headers: vec!["content-type".into(), "authorization".into()],
            expose: vec!["x-request-id".into()],
            credentials: true,
            max_age: Duration::from_secs(600),
        })
    );
}

#[test]
fn defaults_apply_when_nothing_is_said() {
    let manifest = ok(&with_gateway("listen = \"127.0.0.1:8080\"\n"));
    assert_eq!(manifest.gateway.limits, EdgeLimits::default());
    assert_eq!(manifest.gateway.tls, None);

    let manifest = ok(&with_cors("origins = [\"*\"]"));
    assert_eq!(
        manifest.gateway.routes[0].cors,
        Some(Cors {
            origins: vec!["*".into()],
            methods: vec!["GET".into(), "HEAD".into(), "POST".into()],
            headers: vec!["content-type".into()],
            expose: Vec::new(),
            credentials: false,
            max_age: Duration::from_secs(600),
        })
    );
}

#[test]
fn sizes_must_be_sizes_and_max_headers_at_least_8kib() {
    let error = single_error(
        &with_gateway("max_body = \"8 parsecs\"\n"),
        5,
        12,
        "invalid `max_body`: unknown unit \"parsecs\" (use B, KB, MB, GB, KiB, MiB or GiB)",
    );
    assert!(help(&error).contains("512MiB"), "{error}");

    single_error(
        &with_gateway("max_body = 0\n"),
        5,
        12,
        "`max_body` must be larger than zero",
    );

    let error = single_error(
        &with_gateway("max_headers = \"4KiB\"\n"),
        5,
        15,
        "`max_headers` must be at least 8KiB (8192 bytes), found \"4KiB\"",
    );
    assert!(help(&error).contains("\"64KiB\""), "{error}");
    ok(&with_gateway("max_headers = 8192\n"));
}

#[test]
fn timeouts_must_be_longer_than_zero() {
    for key in ["header_timeout", "idle_timeout", "body_timeout"] {
        let error = single_error(
            &with_gateway(&format!("{key} = \"0s\"\n")),
            5,
            key.len() + 4,
            &format!("`{key}` must be longer than zero"),
        );
        assert!(help(&error).contains("\"2s\""), "{error}");
    }
    single_error(
        &with_gateway("idle_timeout = \"soon\"\n"),
        5,
        16,
        "invalid duration \"soon\" for `idle_timeout`: expected number at 0",
    );
}

#[test]
fn access_log_is_a_boolean() {
    let error = single_error(
        &with_gateway("access_log = \"yes\"\n"),
        5,
        14,
        "`access_log` must be a boolean, found a string",
    );
    assert!(help(&error).contains("access_log = true"), "{error}");
}

#[test]
fn an_unknown_gateway_key_suggests_the_close_one() {
    let error = single_error(
        &with_gateway("max_bdy = \"1MiB\"\n"),
        5,
        1,
        "unknown key `max_bdy` in [gateway]",
    );
    assert!(
        help(&error).starts_with("did you mean `max_body`?"),
        "{error}"
    );
}

#[test]
fn tls_needs_both_files() {
    let error = single_error(
        &with_gateway("[gateway.tls]\ncert = \"tls/cert.pem\"\n"),
        5,
        1,
        "missing required key `key` in [gateway.tls]",
    );
    assert!(help(&error).contains("key = \"tls/key.pem\""), "{error}");

    single_error(
        &with_gateway("[gateway.tls]\ncert = \"\"\nkey = \"k.pem\"\n"),
        6,
        8,
        "`cert` must not be empty",
    );
    let error = single_error(
        &with_gateway("[gateway.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nca = \"ca.pem\"\n"),
        8,
        1,
        "unknown key `ca` in [gateway.tls]",
    );
    assert_eq!(help(&error), "allowed keys in [gateway.tls] are: cert, key");
    single_error(
        &with_gateway("tls = true\n"),
        5,
        7,
        "`tls` must be a table, found a boolean",
    );
    // The files need not exist yet: they are opened when the gateway starts.
    ok(&with_gateway(
        "[gateway.tls]\ncert = \"nowhere/cert.pem\"\nkey = \"/abs/key.pem\"\n",
    ));
}

#[test]
fn origins_are_scheme_host_and_port_only() {
    let cors = "origins = [\"https://shop.example/\"]";
    let error = single_error(
        &with_cors(cors),
        7,
        column(cors, "\"https"),
        "invalid origin \"https://shop.example/\"",
    );
    assert!(
        help(&error).contains("write \"https://shop.example\""),
        "{error}"
    );

    let cors = "origins = [\"shop.example\"]";
    let error = single_error(
        &with_cors(cors),
        7,
        column(cors, "\"shop"),
        "invalid origin \"shop.example\"",
    );
    assert!(help(&error).contains("scheme://host"), "{error}");

    let cors = "origins = [\"http://localhost:0\"]";
    single_error(
        &with_cors(cors),
        7,
        column(cors, "\"http"),
        "invalid origin \"http://localhost:0\"",
    );

    let cors = "methods = [\"GET\"]";
    let error = single_error(
        &with_cors(cors),
        7,
        8,
        "missing required key `origins` in `cors`",
    );
    assert!(
        help(&error).contains("origins = [\"https://shop.example\"]"),
        "{error}"
    );

    let cors = "origins = []";
    single_error(
        &with_cors(cors),
        7,
        column(cors, "[]"),
        "`origins` must list at least one origin",
    );

    let cors = "origins = \"https://shop.example\"";
    single_error(
        &with_cors(cors),
        7,
        column(cors, "\"https"),
        "`origins` must be an array of strings, found a string",
    );

    let cors = "origins = [\"*\", \"https://shop.example\"]";
    single_error(
        &with_cors(cors),
        7,
        column(cors, "\"*\""),
        "`\"*\"` allows every origin, so the other `origins` say nothing",
    );

    ok(&with_cors(
        "origins = [\"http://localhost:3000\", \"http://[::1]:3000\", \"https://shop.example\"]",
    ));
}

#[test]
fn credentials_are_refused_with_any_origin() {
    let cors = "origins = [\"*\"], credentials = true";
    let error = single_error(
        &with_cors(cors),
        7,
        column(cors, "true"),
        "`credentials = true` cannot be combined with `origins = [\"*\"]`",
    );
    assert!(help(&error).contains("browsers refuse"), "{error}");
    ok(&with_cors("origins = [\"*\"], credentials = false"));
}

#[test]
fn methods_are_upper_case_tokens() {
    let cors = "origins = [\"*\"], methods = [\"GET\", \"post\"]";
    let error = single_error(
        &with_cors(cors),
        7,
        column(cors, "\"post\""),
        "method \"post\" must be upper case",
    );
    assert!(help(&error).starts_with("write \"POST\""), "{error}");

    let cors = "origins = [\"*\"], methods = [\"GET POST\"]";
    single_error(
        &with_cors(cors),
        7,
        column(cors, "\"GET POST\""),
        "invalid method \"GET POST\"",
    );

    let cors = "origins = [\"*\"], methods = [\"GET\", 1]";
    single_error(
        &with_cors(cors),
        7,
        column(cors, "1]"),
        "`methods` must hold strings, found an integer",
    );
}

#[test]
fn header_names_are_tokens_and_stored_lower_case() {
    let cors = "origins = [\"*\"], headers = [\"content type\"]";
    single_error(
        &with_cors(cors),
        7,
        column(cors, "\"content type\""),
        "invalid header name \"content type\" in `headers`",
    );
    let cors = "origins = [\"*\"], expose = [\"*\"]";
    let error = single_error(
        &with_cors(cors),
        7,
        column(cors, "expose = [") + "expose = [".len(),
        "invalid header name \"*\" in `expose`",
    );
    assert!(help(&error).contains("not supported"), "{error}");

    let manifest = ok(&with_cors(
        "origins = [\"*\"], headers = [\"X-Tenant\", \"x-tenant\"], expose = [\"ETag\"]",
    ));
    let cors = manifest.gateway.routes[0].cors.as_ref().expect("cors");
    assert_eq!(cors.headers, ["x-tenant"]);
    assert_eq!(cors.expose, ["etag"]);
}

#[test]
fn max_age_may_be_zero_but_must_be_a_duration() {
    let cors = "origins = [\"*\"], max_age = \"ten minutes\"";
    single_error(
        &with_cors(cors),
        7,
        column(cors, "\"ten"),
        "invalid duration \"ten minutes\" for `max_age`: expected number at 0",
    );
    let manifest = ok(&with_cors("origins = [\"*\"], max_age = \"0s\""));
    assert_eq!(
        manifest.gateway.routes[0].cors.as_ref().map(|c| c.max_age),
        Some(Duration::ZERO)
    );
}

#[test]
fn an_unknown_cors_key_suggests_the_close_one() {
    let cors = "origins = [\"*\"], origin = \"x\"";
    let error = single_error(
        &with_cors(cors),
        7,
        column(cors, "origin ="),
        "unknown key `origin` in [gateway.routes.cors]",
    );
    assert!(
        help(&error).starts_with("did you mean `origins`?"),
        "{error}"
    );
}
