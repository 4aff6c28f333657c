//! API versions of gateway routes: several routes per prefix, `service@version`, deprecation.

mod common;
use common::*;

use std::time::{Duration, UNIX_EPOCH};

const SERVICES: &str = r#"
[services.orders]
run = "orders"
[services.legacy]
run = "legacy"
"#;

#[test]
fn routes_share_a_prefix_per_version_in_file_order() {
    let manifest = ok(&format!(
        r#"app = "a"
[[gateway.routes]]
prefix = "/api/orders"
service = "legacy"
version = "1"
deprecated = 2026-06-01T00:00:00Z
sunset = "2027-01-01T00:00:00Z"
deprecation_link = "https://docs.example.com/v1"

[[gateway.routes]]
prefix = "/api/orders"
service = "orders@2"
version = "2"
default_version = true

[[gateway.routes]]
prefix = "/api"
service = "orders"
{SERVICES}"#
    ));
    let routes = &manifest.gateway.routes;
    assert_eq!(routes.len(), 3);
    let v1 = &routes[0];
    assert_eq!(v1.version.as_ref().map(|v| v.name.as_str()), Some("1"));
    assert!(!v1.version.as_ref().expect("version").default);
    let deprecation = v1.deprecation.as_ref().expect("deprecated");
    assert_eq!(
        deprecation.since,
        Some(UNIX_EPOCH + Duration::from_secs(1_780_272_000))
    );
    assert_eq!(
        deprecation.sunset,
        Some(UNIX_EPOCH + Duration::from_secs(1_798_761_600))
    );
    assert_eq!(
        deprecation.link.as_deref(),
        Some("https://docs.example.com/v1")
    );
    let v2 = &routes[1];
    assert_eq!(&*v2.service, "orders");
    assert_eq!(v2.service_version.as_deref(), Some("2"));
    assert!(v2.version.as_ref().expect("version").default);
    assert!(v2.deprecation.is_none());
    assert_eq!(routes[2].prefix, "/api");
}

#[test]
fn deprecated_without_a_date() {
    let manifest = ok(&format!(
        r#"app = "a"
[[gateway.routes]]
prefix = "/old"
service = "legacy"
deprecated = true
{SERVICES}"#
    ));
    let deprecation = manifest.gateway.routes[0]
        .deprecation
        .clone()
        .expect("deprecated");
    assert_eq!(deprecation.since, None);
}

#[test]
fn a_shared_prefix_needs_a_version_on_each_route() {
    let error = single_error(
        &format!(
            r#"app = "a"
[[gateway.routes]]
prefix = "/api"
service = "legacy"
version = "1"
[[gateway.routes]]
prefix = "/api"
service = "orders"
{SERVICES}"#
        ),
        6,
        1,
        "several routes for `/api`, and this one has no `version`",
    );
    assert!(error.help.as_deref().unwrap_or("").contains("version"));
}

#[test]
fn a_version_is_routed_once() {
    single_error(
        &format!(
            r#"app = "a"
[[gateway.routes]]
prefix = "/api"
service = "legacy"
version = "1"
[[gateway.routes]]
prefix = "/api"
service = "orders"
version = "1"
{SERVICES}"#
        ),
        6,
        1,
        "version `1` of `/api` is routed twice",
    );
}

#[test]
fn one_default_version() {
    single_error(
        &format!(
            r#"app = "a"
[[gateway.routes]]
prefix = "/api"
service = "legacy"
version = "1"
default_version = true
[[gateway.routes]]
prefix = "/api"
service = "orders"
version = "2"
default_version = true
{SERVICES}"#
        ),
        7,
        1,
        "two default versions of `/api`",
    );
}

#[test]
fn bad_values_are_pointed_at() {
    single_error(
        &format!(
            r#"app = "a"
[[gateway.routes]]
prefix = "/api"
service = "orders"
version = "two words"
{SERVICES}"#
        ),
        5,
        11,
        "invalid API version \"two words\"",
    );
    single_error(
        &format!(
            r#"app = "a"
[[gateway.routes]]
prefix = "/api"
service = "orders@"
{SERVICES}"#
        ),
        4,
        11,
        "invalid service version in \"orders@\"",
    );
    single_error(
        &format!(
            r#"app = "a"
[[gateway.routes]]
prefix = "/api"
service = "order@2"
{SERVICES}"#
        ),
        4,
        11,
        "unknown service `order` in route",
    );
    single_error(
        &format!(
            r#"app = "a"
[[gateway.routes]]
prefix = "/api"
service = "orders"
deprecated = "soon"
{SERVICES}"#
        ),
        5,
        14,
        "invalid date-time \"soon\" for `deprecated`",
    );
    single_error(
        &format!(
            r#"app = "a"
[[gateway.routes]]
prefix = "/api"
service = "orders"
deprecated = 2027-01-01T00:00:00Z
sunset = 2026-01-01T00:00:00Z
{SERVICES}"#
        ),
        6,
        10,
        "`sunset` is before `deprecated`",
    );
    single_error(
        &format!(
            r#"app = "a"
[[gateway.routes]]
prefix = "/api"
service = "orders"
default_version = true
{SERVICES}"#
        ),
        5,
        19,
        "`default_version` without `version`",
    );
    single_error(
        &format!(
            r#"app = "a"
[[gateway.routes]]
prefix = "/api"
service = "orders"
deprecated = true
deprecation_link = "docs"
{SERVICES}"#
        ),
        6,
        20,
        "`deprecation_link` must be an http(s) URL, found \"docs\"",
    );
}
