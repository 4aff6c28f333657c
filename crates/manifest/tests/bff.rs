//! `[bff.NAME]` facades: what valid ones turn into, and where and how invalid ones are reported.

mod common;
use common::*;

use std::path::Path;

use flotilla_manifest::{Bff, ProjectedField, TemplatePart, TemplateRef, parse};

/// Services and a gateway route; facades are appended by each test. Six lines.
const BASE: &str = r#"app = "shop"
[services.orders]
run = "orders"
[services.payments]
run = "payments"
[services.shipping]
run = "shipping"
[[gateway.routes]]
prefix = "/api/v1/orders"
service = "orders"
"#;

fn with(facades: &str) -> String {
    format!("{BASE}{facades}")
}

/// Lines 11 onwards.
const WEB: &str = r#"[bff.web]
[[bff.web.routes]]
path = "/orders/{id}"
[bff.web.routes.parts.order]
call = "GET orders /orders/{{path.id}}"
[bff.web.routes.parts.payment]
call = "GET payments /authorizations?order_id={{path.id}}"
optional = true
[bff.web.routes.parts.shipment]
call = "GET shipping /shipments?order_id={{ path.id }}&user={{query.user}}"
optional = true
fields = "id, status,carrier"

[bff.mobile]
prefix = "/m/"
[[bff.mobile.routes]]
path = "/orders/{id}/"
method = "POST"
[bff.mobile.routes.parts.order]
call = "GET orders /orders/{{path.id}}"
fields = "id,status,total,items(sku,qty),/customer/name"
"#;

fn member(name: &str) -> ProjectedField {
    ProjectedField::Member {
        name: name.into(),
        nested: None,
    }
}

#[test]
fn facades_in_file_order_with_defaults() {
    let manifest = ok(&with(WEB));
    let names: Vec<&str> = manifest.bffs.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["web", "mobile"]);
    let web: &Bff = &manifest.bffs[0];
    assert_eq!(web.prefix, "/web");
    let route = &web.routes[0];
    assert_eq!(
        (route.method.as_str(), route.path.as_str()),
        ("GET", "/orders/{id}")
    );
    assert_eq!(route.auth, None);
    let parts: Vec<(&str, &str, bool)> = route
        .parts
        .iter()
        .map(|p| (p.name.as_str(), &*p.service, p.optional))
        .collect();
    assert_eq!(
        parts,
        [
            ("order", "orders", false),
            ("payment", "payments", true),
            ("shipment", "shipping", true)
        ]
    );
    assert_eq!(
        route.parts[0].path.parts,
        [
            TemplatePart::Literal("/orders/".into()),
            TemplatePart::Expr(TemplateRef::Path("id".into())),
        ]
    );
    assert_eq!(
        route.parts[2].path.to_string(),
        "/shipments?order_id={{path.id}}&user={{query.user}}"
    );
    assert_eq!(route.parts[0].fields, None);
    let fields = route.parts[2].fields.as_ref().expect("fields");
    assert_eq!(fields.text, "id, status,carrier");
    assert_eq!(
        fields.fields,
        [member("id"), member("status"), member("carrier")]
    );

    let mobile = &manifest.bffs[1];
    assert_eq!(mobile.prefix, "/m");
    assert_eq!(mobile.routes[0].method, "POST");
    assert_eq!(mobile.routes[0].path, "/orders/{id}");
    let fields = &mobile.routes[0].parts[0]
        .fields
        .as_ref()
        .expect("fields")
        .fields;
    assert_eq!(
        fields[3],
        ProjectedField::Member {
            name: "items".into(),
            nested: Some(vec![member("sku"), member("qty")]),
        }
    );
    assert_eq!(
        fields[4],
        ProjectedField::Pointer {
            tokens: vec!["customer".into(), "name".into()],
        }
    );
}

#[test]
fn the_shop_declares_both_facades() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop");
    let manifest = match flotilla_manifest::load(&path) {
        Ok(manifest) => manifest,
        Err(diagnostics) => panic!("{diagnostics}"),
    };
    let routes: Vec<String> = manifest
        .bffs
        .iter()
        .flat_map(|b| {
            b.routes
                .iter()
                .map(move |r| format!("{} {}{}", r.method, b.prefix, r.path))
        })
        .collect();
    assert_eq!(routes, ["GET /web/orders/{id}", "GET /mobile/orders/{id}"]);
}

#[test]
fn unknown_service_in_a_part_is_suggested() {
    let source = with(
        r#"[bff.web]
[[bff.web.routes]]
path = "/orders/{id}"
[bff.web.routes.parts.order]
call = "GET ordres /orders/{{path.id}}"
"#,
    );
    let error = single_error(&source, 15, 13, "unknown service `ordres` in `call`");
    assert!(
        help(&error).starts_with("did you mean `orders`?"),
        "{error}"
    );
    let source = with(
        r#"[bff.web]
[[bff.web.routes]]
path = "/"
[bff.web.routes.parts.me]
call = "GET gateway /me"
"#,
    );
    let error = single_error(
        &source,
        15,
        13,
        "`gateway` is part of Flotilla, not a service a facade can call",
    );
    assert!(
        help(&error).starts_with("a part calls a service"),
        "{error}"
    );
}

#[test]
fn unknown_path_parameter_lists_the_placeholders() {
    let source = with(
        r#"[bff.web]
[[bff.web.routes]]
path = "/customers/{customer}/orders/{id}"
[bff.web.routes.parts.order]
call = "GET orders /orders/{{path.order}}"
"#,
    );
    let error = single_error(
        &source,
        15,
        28,
        "unknown path parameter `order` in `{{path.order}}`",
    );
    assert_eq!(
        help(&error),
        "the placeholders of `/customers/{customer}/orders/{id}` are: customer, id"
    );
    let source = with(
        r#"[bff.web]
[[bff.web.routes]]
path = "/orders"
[bff.web.routes.parts.order]
call = "GET orders /orders/{{path.id}}"
"#,
    );
    let error = single_error(
        &source,
        15,
        28,
        "unknown path parameter `id` in `{{path.id}}`",
    );
    assert!(help(&error).contains("has no placeholders"), "{error}");
}

#[test]
fn saga_expressions_are_refused_in_parts_and_facade_ones_in_sagas() {
    let source = with(
        r#"[bff.web]
[[bff.web.routes]]
path = "/orders/{id}"
[bff.web.routes.parts.order]
call = "GET orders /orders/{{input.id}}"
"#,
    );
    single_error(&source, 15, 28, "`{{input.id}}` is only known in a saga");
    let source = with(
        r#"[sagas.x]
[[sagas.x.steps]]
name = "a"
action = { call = "GET orders /orders/{{path.id}}" }
"#,
    );
    single_error(
        &source,
        14,
        39,
        "`{{path.id}}` is only known in a facade's part",
    );
}

#[test]
fn single_braces_in_a_part_are_caught() {
    let source = with(
        r#"[bff.web]
[[bff.web.routes]]
path = "/orders/{id}"
[bff.web.routes.parts.order]
call = "GET orders /orders/{id}"
"#,
    );
    let error = single_error(
        &source,
        15,
        28,
        "a single brace in a part's path is text, not a placeholder",
    );
    assert!(help(&error).starts_with("write \"{{path.id}}\""), "{error}");
}

#[test]
fn placeholders_are_whole_segments_and_unique() {
    let route = |path: &str| {
        with(&format!(
            r#"[bff.web]
[[bff.web.routes]]
path = "{path}"
[bff.web.routes.parts.order]
call = "GET orders /orders"
"#
        ))
    };
    single_error(
        &route("/orders/o-{id}"),
        13,
        19,
        "a placeholder must be a whole segment, in \"/orders/o-{id}\"",
    );
    single_error(
        &route("/a/{id}/b/{id}"),
        13,
        19,
        "the placeholder `{id}` appears twice in \"/a/{id}/b/{id}\"",
    );
    single_error(&route("/a/{i d}"), 13, 12, "invalid placeholder `{i d}`");
    single_error(
        &route("orders"),
        13,
        9,
        "the path must start with `/`, found \"orders\"",
    );
}

#[test]
fn duplicate_routes_in_one_facade() {
    let source = with(
        r#"[bff.web]
[[bff.web.routes]]
path = "/orders/{id}"
[bff.web.routes.parts.order]
call = "GET orders /orders/{{path.id}}"
[[bff.web.routes]]
path = "/orders/{key}/"
[bff.web.routes.parts.order]
call = "GET orders /orders/{{path.key}}"
[[bff.web.routes]]
path = "/orders/{key}"
method = "DELETE"
[bff.web.routes.parts.order]
call = "DELETE orders /orders/{{path.key}}"
"#,
    );
    let error = single_error(
        &source,
        17,
        8,
        "duplicate route `GET /orders/{key}` in facade `web`",
    );
    assert_eq!(
        help(&error),
        "the route on line 13 already serves it; remove one of the two"
    );
}

#[test]
fn prefixes_collide_with_facades_and_gateway_routes() {
    let facade = |name: &str, prefix: &str| {
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("prefix = \"{prefix}\"\n")
        };
        format!(
            "[bff.{name}]\n{prefix}[[bff.{name}.routes]]\npath = \"/\"\n\
             [bff.{name}.routes.parts.x]\ncall = \"GET orders /orders\"\n"
        )
    };
    let source = with(&format!(
        "{}{}",
        facade("web", ""),
        facade("app", "/web/v2")
    ));
    let error = single_error(
        &source,
        17,
        10,
        "the prefix `/web/v2` of facade `app` lies below the prefix `/web` of facade `web`",
    );
    assert!(help(&error).contains("declared on line 11"), "{error}");
    let source = with(&format!(
        "{}{}",
        facade("app", "/web/v2"),
        facade("web", "")
    ));
    single_error(
        &source,
        17,
        6,
        "the prefix `/web` of facade `web` holds the prefix `/web/v2` of facade `app`",
    );
    let source = with(&facade("web", "/api/v1/orders/"));
    let error = single_error(
        &source,
        12,
        10,
        "the prefix `/api/v1/orders` of facade `web` is also a gateway route's",
    );
    assert!(help(&error).contains("the route to `orders`"), "{error}");
    let source = with(&facade("web", "/api"));
    single_error(
        &source,
        12,
        10,
        "the prefix `/api` of facade `web` holds the gateway route `/api/v1/orders`",
    );
    // Below a gateway route is fine: the facade takes its part of the route's paths.
    ok(&with(&facade("web", "/api/v1/orders/web")));
    single_error(
        &with(&facade("web", "/")),
        12,
        10,
        "a facade cannot take the whole gateway (`/`)",
    );
}

#[test]
fn field_selection_mistakes_point_inside_the_string() {
    let fields = |text: &str| {
        with(&format!(
            r#"[bff.web]
[[bff.web.routes]]
path = "/orders/{{id}}"
[bff.web.routes.parts.order]
call = "GET orders /orders/{{{{path.id}}}}"
fields = "{text}"
"#
        ))
    };
    //        fields = "id,items(sku,qty"
    //                  ^ column 11 is the first character of the selection
    let error = single_error(
        &fields("id,items(sku,qty"),
        16,
        19,
        "the `(` after `items` is never closed",
    );
    assert!(help(&error).contains("close"), "{error}");
    single_error(&fields("id,,status"), 16, 14, "a field is missing here");
    single_error(
        &fields("/order/~2"),
        16,
        18,
        "invalid escape in the pointer `/order/~2`",
    );
    single_error(
        &fields("id status"),
        16,
        14,
        "expected `,` between fields, found 's'",
    );
    single_error(&fields("id,id"), 16, 14, "`id` is selected twice");
}

#[test]
fn a_route_needs_parts_and_a_part_needs_a_call() {
    let source = with(
        r#"[bff.web]
[[bff.web.routes]]
path = "/orders/{id}"
"#,
    );
    single_error(&source, 12, 1, "a facade route needs at least one part");
    let source = with(
        r#"[bff.web]
[[bff.web.routes]]
path = "/orders/{id}"
[bff.web.routes.parts.order]
optional = true
"#,
    );
    single_error(
        &source,
        14,
        23,
        "missing required key `call` in part `order`",
    );
    let source = with(
        r#"[bff.web]
[[bff.web.routes]]
path = "/orders/{id}"
parts = {}
"#,
    );
    single_error(&source, 14, 9, "a facade route needs at least one part");
    single_error(&with("[bff.web]\n"), 11, 6, "facade `web` has no routes");
}

#[test]
fn unknown_keys_methods_and_names() {
    let source = with(
        r#"[bff.web]
[[bff.web.routes]]
path = "/orders/{id}"
method = "get"
auth = "users"
[bff.web.routes.parts."order summary"]
call = "GET orders /orders/{{path.id}}"
optinal = true
"#,
    );
    let found = match parse(&source, Path::new("flotilla.toml")) {
        Ok(_) => panic!("expected errors"),
        Err(diagnostics) => diagnostics.0,
    };
    let found: Vec<(usize, usize, &str)> = found
        .iter()
        .map(|d| (d.line, d.column, d.message.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (14, 10, "HTTP method `get` must be upper-case"),
            // Facade routes take `auth` like gateway routes; this one names none declared.
            (15, 8, "unknown authenticator `users` in [[bff.web.routes]]"),
            (
                16,
                23,
                "invalid part name \"order summary\": only letters, digits, `-` and `_` are allowed"
            ),
            (
                18,
                1,
                "unknown key `optinal` in [bff.web.routes.parts.order summary]"
            ),
        ]
    );
}

#[test]
fn facade_routes_take_auth_like_gateway_routes() {
    let manifest = ok(&with(
        r#"[gateway.auth.users]
secret_env = "SHOP_JWT_SECRET"
[bff.web]
[[bff.web.routes]]
path = "/orders/{id}"
auth = "users"
scopes = ["orders:read"]
[bff.web.routes.parts.order]
call = "GET orders /orders/{{path.id}}"
"#,
    ));
    let auth = manifest.bffs[0].routes[0].auth.clone().expect("auth");
    assert_eq!(auth.authenticators, ["users"]);
    assert_eq!(auth.scopes, ["orders:read"]);
}
