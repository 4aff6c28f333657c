//! `[gateway.rate_limit]` and routes' `rate_limit`: what valid settings become, and where and how
//! every bad value is reported.

mod common;
use common::*;

use std::path::Path;
use std::time::Duration;

use flotilla_manifest::{Diagnostic, Manifest, RateLimit, RateLimitKey, RateLimitStore, parse};

#[track_caller]
fn help_contains(error: &Diagnostic, wanted: &str) {
    let help = error.help.as_deref().unwrap_or("");
    assert!(help.contains(wanted), "help {help:?} lacks {wanted:?}");
}

/// A manifest whose one route (line 5) has `rate_limit = { LIMIT }`; `LIMIT` starts at column 16.
fn route_with(limit: &str) -> String {
    format!(
        "app = \"shop\"\n\n[[gateway.routes]]\nprefix = \"/api\"\nrate_limit = {{ {limit} }}\nservice = \"orders\"\n\n[services.orders]\nrun = \"orders\"\n"
    )
}

/// The error of a route whose `rate_limit` is `{ LIMIT }`, expected on line 5 at `column`.
#[track_caller]
fn limit_error(limit: &str, column: usize, message: &str) -> Diagnostic {
    single_error(&route_with(limit), 5, column, message)
}

/// A manifest with `[gateway.rate_limit]` holding `SETTING` on line 4.
fn store_with(setting: &str) -> String {
    format!("app = \"shop\"\n\n[gateway.rate_limit]\n{setting}\n")
}

fn limit_of(manifest: &Manifest) -> &RateLimit {
    manifest.gateway.routes[0]
        .rate_limit
        .as_ref()
        .expect("a rate limit")
}

#[test]
fn defaults_are_memory_and_no_limit() {
    let manifest = ok(
        "app = \"shop\"\n[[gateway.routes]]\nprefix = \"/\"\nservice = \"web\"\n[services.web]\nrun = \"web\"\n",
    );
    assert_eq!(manifest.gateway.rate_limit_store, RateLimitStore::Memory);
    assert_eq!(manifest.gateway.routes[0].rate_limit, None);
}

#[test]
fn a_full_limit_is_read() {
    let manifest = ok(&route_with(r#"rate = "100/s", burst = 20, key = "ip""#));
    assert_eq!(
        limit_of(&manifest),
        &RateLimit {
            requests: 100,
            per: Duration::from_secs(1),
            burst: 20,
            key: RateLimitKey::ClientIp,
        }
    );
}

#[test]
fn burst_defaults_to_one_and_key_to_ip() {
    let manifest = ok(&route_with(r#"rate = "30/m""#));
    assert_eq!(
        limit_of(&manifest),
        &RateLimit {
            requests: 30,
            per: Duration::from_secs(60),
            burst: 1,
            key: RateLimitKey::ClientIp,
        }
    );
}

#[test]
fn every_key_kind_is_read() {
    for (written, kind) in [
        ("ip", RateLimitKey::ClientIp),
        ("api_key", RateLimitKey::ApiKey),
        ("subject", RateLimitKey::Subject),
        ("route", RateLimitKey::Route),
        ("header:x-tenant", RateLimitKey::Header("x-tenant".into())),
        // Field names are case-insensitive: matched by their lower-case form.
        ("header:X-Tenant", RateLimitKey::Header("x-tenant".into())),
    ] {
        let manifest = ok(&route_with(&format!(r#"rate = "5/h", key = "{written}""#)));
        assert_eq!(limit_of(&manifest).key, kind, "{written}");
        assert_eq!(limit_of(&manifest).per, Duration::from_secs(3600));
    }
}

#[test]
fn a_limit_may_be_a_section_of_its_own() {
    let manifest = ok(r#"app = "shop"

[[gateway.routes]]
prefix = "/api"
service = "orders"

[gateway.routes.rate_limit]
rate = "10/s"
burst = 5
key = "route"

[services.orders]
run = "orders"
"#);
    let limit = limit_of(&manifest);
    assert_eq!((limit.requests, limit.burst), (10, 5));
    assert_eq!(limit.key, RateLimitKey::Route);
}

#[test]
fn stores_are_read() {
    let manifest = ok(&store_with(r#"store = "redis://127.0.0.1:6379""#));
    assert_eq!(
        manifest.gateway.rate_limit_store,
        RateLimitStore::Redis {
            url: "redis://127.0.0.1:6379".into()
        }
    );
    for url in [
        "rediss://cache.example:6380/2",
        "redis://:secret@10.0.0.5",
        "redis://[::1]:6379",
    ] {
        let manifest = ok(&store_with(&format!("store = \"{url}\"")));
        assert_eq!(
            manifest.gateway.rate_limit_store,
            RateLimitStore::Redis { url: url.into() }
        );
    }
    let manifest = ok(&store_with(r#"store = "memory""#));
    assert_eq!(manifest.gateway.rate_limit_store, RateLimitStore::Memory);
}

#[test]
fn a_rate_without_period_is_refused_with_the_fix() {
    let error = limit_error(
        r#"rate = "100""#,
        23,
        r#"invalid `rate` "100": it has no period"#,
    );
    help_contains(&error, r#"write it as "100/s""#);
}

#[test]
fn a_bare_number_rate_is_refused_with_the_fix() {
    let error = limit_error(
        "rate = 100",
        23,
        "`rate` must be a string, found an integer",
    );
    help_contains(&error, r#""100/s""#);
}

#[test]
fn unknown_periods_are_refused() {
    let error = limit_error(
        r#"rate = "100/sec""#,
        23,
        r#"unknown period `sec` in `rate` "100/sec""#,
    );
    help_contains(&error, r#"did you mean "100/s"?"#);
    let error = limit_error(
        r#"rate = "5/minute""#,
        23,
        r#"unknown period `minute` in `rate` "5/minute""#,
    );
    help_contains(&error, r#"did you mean "5/m"?"#);
    let error = limit_error(
        r#"rate = "100/d""#,
        23,
        r#"unknown period `d` in `rate` "100/d""#,
    );
    help_contains(&error, "per hour");
    let error = limit_error(
        r#"rate = "100/ms""#,
        23,
        r#"unknown period `ms` in `rate` "100/ms""#,
    );
    help_contains(&error, "periods are s, m and h");
}

#[test]
fn counts_must_be_whole_and_positive() {
    let error = limit_error(
        r#"rate = "0/s""#,
        23,
        r#"`rate` "0/s" allows no request at all"#,
    );
    help_contains(&error, "remove `rate_limit`");
    let error = limit_error(
        r#"rate = "1.5/s""#,
        23,
        r#"invalid `rate` "1.5/s": `1.5` is not a whole number of requests"#,
    );
    help_contains(&error, r#""90/m""#);
    let error = limit_error(
        r#"rate = "-1/s""#,
        23,
        r#"invalid `rate` "-1/s": `-1` is not a whole number of requests"#,
    );
    help_contains(&error, "\"100/s\"");
    let error = limit_error(
        r#"rate = "2000000/s""#,
        23,
        r#"`rate` "2000000/s" is faster than the limiter can measure"#,
    );
    help_contains(&error, "\"100000/s\"");
}

#[test]
fn rate_is_required() {
    let error = limit_error(
        "burst = 5",
        14,
        "missing required key `rate` in `rate_limit`",
    );
    help_contains(&error, "\"100/s\"");
}

#[test]
fn burst_must_be_a_positive_integer() {
    let error = limit_error(
        r#"rate = "1/s", burst = 0"#,
        38,
        "`burst` must be between 1 and 1000000, found 0",
    );
    help_contains(&error, "`burst = 1`");
    let error = limit_error(
        r#"rate = "1/s", burst = 2000000"#,
        38,
        "`burst` must be between 1 and 1000000, found 2000000",
    );
    help_contains(&error, "raise `rate`");
    let error = limit_error(
        r#"rate = "1/s", burst = "20""#,
        38,
        "`burst` must be an integer, found a string",
    );
    help_contains(&error, "without quotes");
}

#[test]
fn unknown_key_kinds_get_suggestions() {
    let error = limit_error(
        r#"rate = "1/s", key = "apikey""#,
        36,
        r#"unknown rate limit key "apikey""#,
    );
    help_contains(&error, r#"did you mean "api_key"?"#);
    let error = limit_error(
        r#"rate = "1/s", key = "client""#,
        36,
        r#"unknown rate limit key "client""#,
    );
    help_contains(&error, r#""header:NAME""#);
    let error = limit_error(
        r#"rate = "1/s", key = "x-tenant""#,
        36,
        r#"unknown rate limit key "x-tenant""#,
    );
    help_contains(&error, r#"write "header:x-tenant""#);
    let error = limit_error(
        r#"rate = "1/s", key = "header""#,
        36,
        r#"`key = "header"` needs the header's name"#,
    );
    help_contains(&error, r#""header:x-tenant""#);
    let error = limit_error(
        r#"rate = "1/s", key = 1"#,
        36,
        "`key` must be a string, found an integer",
    );
    help_contains(&error, r#""api_key""#);
}

#[test]
fn bad_header_names_are_refused() {
    let error = limit_error(
        r#"rate = "1/s", key = "header:""#,
        36,
        r#"`key` "header:" names no header"#,
    );
    help_contains(&error, r#""header:x-tenant""#);
    let error = limit_error(
        r#"rate = "1/s", key = "header:x tenant""#,
        36,
        r#"invalid header name "x tenant" in `key`"#,
    );
    help_contains(&error, "letters, digits and `-`");
    let error = limit_error(
        r#"rate = "1/s", key = "header:Authorization""#,
        36,
        "`key` must not count requests by the `authorization` header",
    );
    help_contains(&error, r#"key = "subject""#);
}

#[test]
fn unknown_keys_in_a_limit_are_refused() {
    let error = limit_error(
        r#"rate = "1/s", brust = 3"#,
        30,
        "unknown key `brust` in [gateway.routes.rate_limit]",
    );
    help_contains(&error, "did you mean `burst`?");
}

#[test]
fn a_limit_must_be_a_table() {
    let source = route_with("").replace("rate_limit = {  }", "rate_limit = \"100/s\"");
    let error = single_error(
        &source,
        5,
        14,
        "`rate_limit` must be a table, found a string",
    );
    help_contains(&error, "rate_limit = { ... }");
}

#[test]
fn several_bad_values_are_all_reported() {
    let source = route_with(r#"rate = "100", burst = 0, key = "ipp""#);
    let found = parse(&source, Path::new("flotilla.toml")).expect_err("invalid");
    let columns: Vec<usize> = found.0.iter().map(|d| d.column).collect();
    assert_eq!(columns, [23, 38, 47], "{found}");
}

#[test]
fn bad_stores_are_refused_with_the_fix() {
    let error = single_error(
        &store_with(r#"store = "redis""#),
        4,
        9,
        "`store = \"redis\"` needs the server's URL",
    );
    help_contains(&error, "redis://127.0.0.1:6379");
    let error = single_error(
        &store_with(r#"store = "memroy""#),
        4,
        9,
        r#"unknown rate limit store "memroy""#,
    );
    help_contains(&error, r#"did you mean "memory"?"#);
    let error = single_error(
        &store_with(r#"store = "http://127.0.0.1:6379""#),
        4,
        9,
        r#"unsupported rate limit store "http://127.0.0.1:6379""#,
    );
    help_contains(&error, "redis:// (or rediss:// for TLS)");
    let error = single_error(
        &store_with(r#"store = "redis://""#),
        4,
        9,
        r#"invalid Redis URL "redis://": it names no host"#,
    );
    help_contains(&error, "redis://127.0.0.1:6379");
    let error = single_error(
        &store_with(r#"store = "redis://127.0.0.1:redis""#),
        4,
        9,
        r#"invalid Redis URL "redis://127.0.0.1:redis": `redis` is not a port"#,
    );
    help_contains(&error, "redis://127.0.0.1:6379");
    let error = single_error(
        &store_with(r#"store = "redis://127.0.0.1:6379/cache""#),
        4,
        9,
        r#"invalid Redis URL "redis://127.0.0.1:6379/cache": the path must be a database number"#,
    );
    help_contains(&error, "/0");
    let error = single_error(
        &store_with("store = 6379"),
        4,
        9,
        "`store` must be a string, found an integer",
    );
    help_contains(&error, "\"memory\"");
}

#[test]
fn misplaced_and_unknown_store_keys_are_refused() {
    let error = single_error(
        &store_with(r#"rate = "100/s""#),
        4,
        1,
        "unknown key `rate` in [gateway.rate_limit]",
    );
    help_contains(&error, "is set per route");
    let error = single_error(
        &store_with(r#"stroe = "memory""#),
        4,
        1,
        "unknown key `stroe` in [gateway.rate_limit]",
    );
    help_contains(&error, "did you mean `store`?");
    let error = single_error(
        "app = \"shop\"\n[gateway]\nrate_limit = \"redis://127.0.0.1:6379\"\n",
        3,
        14,
        "`rate_limit` must be a table, found a string",
    );
    help_contains(&error, "store = ");
}
