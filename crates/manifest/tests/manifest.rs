//! End-to-end tests of `parse` and `load`: what valid manifests turn into, and exactly where and
//! how invalid ones are reported.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_manifest::{
    BodyTemplate, BreakerPolicy, BulkheadPolicy, DEFAULT_OTLP_LISTEN, Diagnostics, EventBackend,
    EventSettings, Fallback, Fsync, HealthSettings, LoadBalancer, Manifest, OutlierPolicy,
    PathSegment, Policy, RestartSettings, RetryPolicy, SagaSettings, SagaStoreKind, SagaTrigger,
    StepRetry, Subscription, TelemetrySettings, TelemetryStorage, TemplatePart, TemplateRef, Topic,
    load, parse,
};

const DURATION_HELP: &str = "use a number with a unit, like \"500ms\", \"2s\" or \"1m\"";

fn names(manifest: &Manifest) -> Vec<&str> {
    manifest.services.iter().map(|s| &*s.name).collect()
}

const FULL: &str = r#"app = "shop"

[gateway]
listen = "0.0.0.0:9000"

[[gateway.routes]]
prefix = "/api/"
service = "catalog"

[[gateway.routes]]
prefix = "/api/v1/orders/"
service = "orders"
rewrite = "/orders"

[[gateway.routes]]
prefix = "/"
service = "web"

[control]
listen = "[::1]:4500"

[services.web]
run = "python3 -m http.server"
depends_on = ["orders", "catalog"]

[services.orders]
build = "cargo build --release"
run = "./target/release/orders --name 'the orders' \"a b\""
version = "1.2.3"
replicas = 3
env = { LOG_LEVEL = "debug", _DB_URL2 = "sqlite://orders.db" }
depends_on = ["catalog"]

[services.orders.health]
path = "/health"
interval = "500ms"
timeout = "2s"
healthy_threshold = 2
unhealthy_threshold = 5
startup_timeout = "1m30s"

[services.orders.restart]
backoff_initial = "1s"
backoff_max = "1m"
crash_loop_threshold = 10
crash_loop_window = "5m"
stop_grace = "0s"

[services.catalog]
run = "python3 catalog/catalog.py"
"#;

#[test]
fn full_manifest_round_trip() {
    let manifest = match parse(FULL, Path::new("examples/shop/flotilla.toml")) {
        Ok(manifest) => manifest,
        Err(diagnostics) => panic!("{diagnostics}"),
    };
    assert_eq!(manifest.app, "shop");
    assert_eq!(manifest.path, Path::new("examples/shop/flotilla.toml"));
    assert_eq!(manifest.dir, Path::new("examples/shop"));
    assert_eq!(manifest.gateway.listen, "0.0.0.0:9000".parse().unwrap());
    assert_eq!(manifest.control.listen, "[::1]:4500".parse().unwrap());

    let routes: Vec<(&str, &str, Option<&str>)> = manifest
        .gateway
        .routes
        .iter()
        .map(|r| (r.prefix.as_str(), &*r.service, r.rewrite.as_deref()))
        .collect();
    assert_eq!(
        routes,
        [
            ("/api/v1/orders", "orders", Some("/orders")),
            ("/api", "catalog", None),
            ("/", "web", None),
        ]
    );

    assert_eq!(names(&manifest), ["catalog", "orders", "web"]);

    let catalog = manifest.service("catalog").expect("catalog");
    assert_eq!(catalog.run, ["python3", "catalog/catalog.py"]);
    assert_eq!(catalog.build, None);
    assert_eq!(catalog.version, "0.0.0");
    assert_eq!(catalog.replicas, NonZeroU32::MIN);
    assert_eq!(catalog.health, HealthSettings::default());
    assert_eq!(catalog.restart, RestartSettings::default());
    assert!(catalog.env.is_empty());
    assert!(catalog.depends_on.is_empty());

    let orders = manifest.service("orders").expect("orders");
    assert_eq!(orders.build.as_deref(), Some("cargo build --release"));
    assert_eq!(
        orders.run,
        ["./target/release/orders", "--name", "the orders", "a b"]
    );
    assert_eq!(orders.version, "1.2.3");
    assert_eq!(orders.replicas.get(), 3);
    assert_eq!(
        orders.env,
        BTreeMap::from([
            ("LOG_LEVEL".to_owned(), "debug".to_owned()),
            ("_DB_URL2".to_owned(), "sqlite://orders.db".to_owned()),
        ])
    );
    let depends: Vec<&str> = orders.depends_on.iter().map(|d| &**d).collect();
    assert_eq!(depends, ["catalog"]);
    assert_eq!(
        orders.health,
        HealthSettings {
            path: "/health".into(),
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(2),
            healthy_threshold: NonZeroU32::new(2).unwrap(),
            unhealthy_threshold: NonZeroU32::new(5).unwrap(),
            startup_timeout: Duration::from_secs(90),
        }
    );
    assert_eq!(
        orders.restart,
        RestartSettings {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            crash_loop_threshold: NonZeroU32::new(10).unwrap(),
            crash_loop_window: Duration::from_secs(300),
            stop_grace: Duration::ZERO,
        }
    );

    let web = manifest.service("web").expect("web");
    let depends: Vec<&str> = web.depends_on.iter().map(|d| &**d).collect();
    assert_eq!(depends, ["orders", "catalog"]);
}

#[test]
fn minimal_manifest_gets_defaults() {
    let manifest = ok("app = \"shop\"\n[services.web]\nrun = \"./web\"\n");
    assert_eq!(manifest.dir, Path::new("."));
    assert_eq!(manifest.gateway.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(manifest.control.listen, "127.0.0.1:4400".parse().unwrap());
    assert!(manifest.gateway.routes.is_empty());
    assert_eq!(names(&manifest), ["web"]);

    let bare = ok("app = \"empty\"\n");
    assert!(bare.services.is_empty());
}

#[test]
fn inline_tables_work_like_sections() {
    let manifest = ok(r#"app = "shop"
gateway = { routes = [{ prefix = "/a", service = "a" }] }
services.a = { run = "a", health = { interval = "5s" } }
"#);
    assert_eq!(manifest.gateway.routes[0].prefix, "/a");
    assert_eq!(manifest.services[0].health.interval, Duration::from_secs(5));
}

#[test]
fn services_come_in_dependency_order_keeping_file_order_otherwise() {
    let manifest = ok(r#"app = "shop"
[services.gateway-ui]
run = "ui"
depends_on = ["orders", "catalog"]
[services.orders]
run = "orders"
depends_on = ["payments", "inventory"]
[services.zeta]
run = "zeta"
[services.payments]
run = "payments"
[services.catalog]
run = "catalog"
depends_on = ["inventory"]
[services.inventory]
run = "inventory"
[services.alpha]
run = "alpha"
"#);
    assert_eq!(
        names(&manifest),
        [
            "zeta",
            "payments",
            "inventory",
            "orders",
            "catalog",
            "gateway-ui",
            "alpha"
        ]
    );
    for (position, service) in manifest.services.iter().enumerate() {
        for dependency in &service.depends_on {
            let before = &manifest.services[..position];
            assert!(before.iter().any(|s| s.name == *dependency));
        }
    }
}

#[test]
fn route_prefix_trailing_slashes_are_removed_except_for_root() {
    let manifest = ok(r#"app = "shop"
[[gateway.routes]]
prefix = "/"
service = "a"
[[gateway.routes]]
prefix = "/b/"
service = "a"
[[gateway.routes]]
prefix = "/cc"
service = "a"
[services.a]
run = "a"
"#);
    let prefixes: Vec<&str> = manifest
        .gateway
        .routes
        .iter()
        .map(|r| r.prefix.as_str())
        .collect();
    assert_eq!(prefixes, ["/cc", "/b", "/"]);
}

// ---- one test per kind of error ----

#[test]
fn unknown_top_level_key() {
    let error = single_error(
        "app = \"shop\"\ncolour = \"blue\"\n",
        2,
        1,
        "unknown key `colour` at the top level",
    );
    assert_eq!(
        help(&error),
        "allowed keys at the top level are: app, gateway, control, telemetry, events, topics, \
         subscriptions, sagas, services, bff"
    );

    let error = single_error(
        "app = \"shop\"\n[servics.web]\nrun = \"x\"\n",
        2,
        2,
        "unknown key `servics` at the top level",
    );
    assert!(
        help(&error).starts_with("did you mean `services`?"),
        "{error}"
    );
}

#[test]
fn unknown_key_in_service() {
    let error = single_error(
        "app = \"shop\"\n\n[services.web]\nrun = \"x\"\nreplica = 2\n",
        5,
        1,
        "unknown key `replica` in [services.web]",
    );
    assert_eq!(
        help(&error),
        "did you mean `replicas`? allowed keys in [services.web] are: build, run, version, \
         replicas, env, depends_on, health, restart, policy, protocol"
    );
}

#[test]
fn unknown_key_in_health() {
    let error = single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\n[services.web.health]\n  intervall = \"2s\"\n",
        5,
        3,
        "unknown key `intervall` in [services.web.health]",
    );
    assert!(help(&error).starts_with("did you mean `interval`?"));
}

#[test]
fn unknown_keys_in_other_tables() {
    single_error(
        "app = \"a\"\n[gateway]\nlisten = \"127.0.0.1:1\"\nport = 2\n",
        4,
        1,
        "unknown key `port` in [gateway]",
    );
    single_error(
        "app = \"a\"\n[control]\nlisen = \"127.0.0.1:1\"\n",
        3,
        1,
        "unknown key `lisen` in [control]",
    );
    single_error(
        "app = \"a\"\n[[gateway.routes]]\nprefix = \"/\"\nservice = \"a\"\nstrip = true\n[services.a]\nrun = \"a\"\n",
        5,
        1,
        "unknown key `strip` in [[gateway.routes]]",
    );
    single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\n[services.a.restart]\nbackoff = \"1s\"\n",
        5,
        1,
        "unknown key `backoff` in [services.a.restart]",
    );
}

#[test]
fn route_to_unknown_service() {
    let error = single_error(
        r#"app = "shop"
[[gateway.routes]]
prefix = "/api"
service = "ordrs"
[services.orders]
run = "x"
[services.catalog]
run = "y"
"#,
        4,
        11,
        "unknown service `ordrs` in route",
    );
    assert_eq!(
        help(&error),
        "did you mean `orders`? known services are: catalog, orders"
    );
}

#[test]
fn duplicate_service_name() {
    let error = single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\n[services.web]\nrun = \"y\"\n",
        4,
        11,
        "duplicate key `web`",
    );
    assert!(help(&error).contains("already defined earlier"), "{error}");

    // Every duplicate is reported, not only the first.
    let found = errors("app = \"a\"\napp = \"b\"\n[services.a]\nrun = \"x\"\nrun = \"y\"\n");
    let at: Vec<(usize, usize, &str)> = found
        .iter()
        .map(|e| (e.line, e.column, e.message.as_str()))
        .collect();
    assert_eq!(
        at,
        [(2, 1, "duplicate key `app`"), (5, 1, "duplicate key `run`")]
    );
}

#[test]
fn dependency_cycle() {
    let error = single_error(
        r#"app = "shop"
[services.orders]
run = "x"
depends_on = ["payments"]
[services.payments]
run = "y"
depends_on = ["orders"]
[services.free]
run = "z"
"#,
        4,
        15,
        "dependency cycle: orders -> payments -> orders",
    );
    assert!(help(&error).contains("remove one of these `depends_on` entries"));

    // Services on a cycle are still known to the rest of the checks.
    let found = errors(
        r#"app = "shop"
[[gateway.routes]]
prefix = "/"
service = "ordrs"
[services.orders]
run = "x"
depends_on = ["orders2"]
[services.orders2]
run = "y"
depends_on = ["orders"]
"#,
    );
    assert_eq!(found.len(), 2, "{}", Diagnostics(found));
    assert!(
        help(&found[0]).starts_with("did you mean `orders`?"),
        "{}",
        found[0]
    );

    single_error(
        r#"app = "shop"
[services.a]
run = "a"
depends_on = ["c"]
[services.b]
run = "b"
depends_on = ["a"]
[services.c]
run = "c"
depends_on = ["free", "b"]
[services.free]
run = "free"
"#,
        4,
        15,
        "dependency cycle: a -> c -> b -> a",
    );
}

#[test]
fn bad_duration() {
    let error = single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\n[services.web.health]\ninterval = \"2x\"\n",
        5,
        12,
        "invalid duration \"2x\" for `interval`: unknown time unit \"x\", supported units: ns, \
         us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)",
    );
    assert_eq!(help(&error), DURATION_HELP);

    let error = single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\nrestart = { stop_grace = 10 }\n",
        4,
        26,
        "`stop_grace` must be a duration, found an integer",
    );
    assert_eq!(help(&error), DURATION_HELP);

    single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\nhealth.startup_timeout = \"60\"\n",
        4,
        26,
        "invalid duration \"60\" for `startup_timeout`: time unit needed, for example 60sec or 60ms",
    );
}

#[test]
fn zero_durations() {
    let error = single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\n[services.web.health]\ntimeout = \"0s\"\n",
        5,
        11,
        "`timeout` must be longer than zero",
    );
    assert_eq!(help(&error), DURATION_HELP);
    single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\n[services.web.health]\ninterval = \"0ms\"\n",
        5,
        12,
        "`interval` must be longer than zero",
    );
}

#[test]
fn zero_replicas() {
    single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\nreplicas = 0\n",
        4,
        12,
        "`replicas` must be between 1 and 64, found 0",
    );
    single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\nreplicas = -2\n",
        4,
        12,
        "`replicas` must be between 1 and 64, found -2",
    );
    single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\nreplicas = 65\n",
        4,
        12,
        "`replicas` must be between 1 and 64, found 65",
    );
    single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\nhealth = { healthy_threshold = 0 }\n",
        4,
        32,
        "`healthy_threshold` must be at least 1, found 0",
    );
}

#[test]
fn bad_listen_address() {
    let error = single_error(
        "app = \"shop\"\n[gateway]\nlisten = \"localhost:8080\"\n",
        3,
        10,
        "invalid listen address \"localhost:8080\": expected IP:PORT",
    );
    assert!(help(&error).contains("\"127.0.0.1:8080\""));
    single_error(
        "app = \"shop\"\n[control]\nlisten = \"127.0.0.1\"\n",
        3,
        10,
        "invalid listen address \"127.0.0.1\": expected IP:PORT",
    );
}

#[test]
fn gateway_and_control_must_not_share_an_address() {
    single_error(
        "app = \"shop\"\n[control]\nlisten = \"127.0.0.1:8080\"\n",
        3,
        10,
        "the gateway and the control API both listen on 127.0.0.1:8080",
    );
    // Port 0 means "any free port", so it is never a clash.
    ok("app = \"shop\"\ngateway.listen = \"127.0.0.1:0\"\ncontrol.listen = \"127.0.0.1:0\"\n");
}

#[test]
fn missing_run() {
    let error = single_error(
        "app = \"shop\"\n\n[services.web]\nversion = \"1.0.0\"\n",
        3,
        1,
        "missing required key `run` in [services.web]",
    );
    assert_eq!(
        help(&error),
        "add the command that starts the service, like `run = \"python3 app.py\"`"
    );
}

#[test]
fn missing_app() {
    let error = single_error(
        "[services.web]\nrun = \"x\"\n",
        1,
        1,
        "missing required key `app`",
    );
    assert!(help(&error).contains("app = \"<name>\""));
    single_error("app = \"  \"\n", 1, 7, "`app` must not be empty");
}

#[test]
fn wrong_type() {
    let error = single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\nreplicas = \"two\"\n",
        4,
        12,
        "`replicas` must be an integer, found a string",
    );
    assert_eq!(
        help(&error),
        "write the number without quotes, like `replicas = 2`"
    );
    single_error(
        "app = \"shop\"\n[services.web]\nrun = [\"x\"]\n",
        3,
        7,
        "`run` must be a string, found an array",
    );
    single_error(
        "app = 3\n",
        1,
        7,
        "`app` must be a string, found an integer",
    );
    single_error(
        "app = \"shop\"\nservices = \"web\"\n",
        2,
        12,
        "`services` must be a table, found a string",
    );
    single_error(
        "app = \"shop\"\n[services]\nweb = \"python3 web.py\"\n",
        3,
        7,
        "service `web` must be a table, found a string",
    );
    single_error(
        "app = \"shop\"\n[gateway]\nroutes = { prefix = \"/\" }\n",
        3,
        10,
        "`routes` must be an array of tables, found a table",
    );
    single_error(
        "app = \"shop\"\n[services.web]\nrun = \"x\"\ndepends_on = \"db\"\n",
        4,
        14,
        "`depends_on` must be an array of service names, found a string",
    );
}

#[test]
fn syntax_error_reports_where_it_is() {
    let found = errors("app = \"shop\"\n[services.web]\nrun = = \"x\"\nreplicas = 0\n");
    assert_eq!(found.len(), 1, "{}", Diagnostics(found));
    assert_eq!((found[0].line, found[0].column), (3, 7));
    assert!(
        found[0].message.starts_with("invalid TOML: "),
        "{}",
        found[0]
    );

    // An unterminated string is reported where it starts going wrong, not where recovery
    // stumbled later on.
    let found = errors("app = \"shop\n[services.web]\nrun = \"x\"\n");
    assert_eq!(found.len(), 1, "{}", Diagnostics(found));
    assert_eq!(found[0].line, 1);
}

// ---- other checks ----

#[test]
fn route_checks() {
    let error = single_error(
        "app = \"a\"\n[[gateway.routes]]\nprefix = \"api\"\nservice = \"a\"\n[services.a]\nrun = \"a\"\n",
        3,
        10,
        "`prefix` must start with `/`, found \"api\"",
    );
    assert_eq!(help(&error), "write it as \"/api\"");
    single_error(
        "app = \"a\"\n[[gateway.routes]]\nprefix = \"/x\"\nservice = \"a\"\nrewrite = \"y\"\n[services.a]\nrun = \"a\"\n",
        5,
        11,
        "`rewrite` must start with `/`, found \"y\"",
    );
    single_error(
        "app = \"a\"\n[[gateway.routes]]\nservice = \"a\"\n[services.a]\nrun = \"a\"\n",
        2,
        1,
        "missing required key `prefix` in [[gateway.routes]]",
    );
    let error = single_error(
        "app = \"a\"\n[[gateway.routes]]\nprefix = \"/\"\n",
        2,
        1,
        "missing required key `service` in [[gateway.routes]]",
    );
    assert!(help(&error).contains("no services are defined"));
}

#[test]
fn duplicate_route_prefix() {
    let error = single_error(
        r#"app = "a"
[[gateway.routes]]
prefix = "/api"
service = "a"
[[gateway.routes]]
prefix = "/api/"
service = "b"
[services.a]
run = "a"
[services.b]
run = "b"
"#,
        6,
        10,
        "duplicate route prefix `/api`",
    );
    assert_eq!(
        help(&error),
        "`/api` is already routed to `a` on line 3; remove one of the two routes"
    );
}

#[test]
fn depends_on_checks() {
    let error = single_error(
        "app = \"a\"\n[services.api]\nrun = \"a\"\ndepends_on = [\"db\", \"cahce\"]\n[services.cache]\nrun = \"c\"\n[services.db]\nrun = \"d\"\n",
        4,
        21,
        "unknown service `cahce` in `depends_on`",
    );
    assert_eq!(
        help(&error),
        "did you mean `cache`? known services are: api, cache, db"
    );
    single_error(
        "app = \"a\"\n[services.api]\nrun = \"a\"\ndepends_on = [\"api\"]\n",
        4,
        15,
        "service `api` depends on itself",
    );
    single_error(
        "app = \"a\"\n[services.api]\nrun = \"a\"\ndepends_on = [\"db\", \"db\"]\n[services.db]\nrun = \"d\"\n",
        4,
        21,
        "`db` is listed twice in `depends_on`",
    );
}

#[test]
fn service_name_rules() {
    let error = single_error(
        "app = \"a\"\n[services.Web_1]\nrun = \"a\"\n",
        2,
        11,
        "invalid service name `Web_1`",
    );
    assert!(help(&error).contains("lowercase"));
    single_error(
        "app = \"a\"\n[services.1web]\nrun = \"a\"\n",
        2,
        11,
        "invalid service name `1web`",
    );
    let long = "a".repeat(64);
    single_error(
        &format!("app = \"a\"\n[services.{long}]\nrun = \"a\"\n"),
        2,
        11,
        &format!("service name `{long}` is 64 characters long; the limit is 63"),
    );
    ok(&format!(
        "app = \"a\"\n[services.{}]\nrun = \"a\"\n[services.a-0-b]\nrun = \"b\"\n",
        "a".repeat(63)
    ));
}

#[test]
fn run_command_checks() {
    single_error(
        "app = \"a\"\n[services.a]\nrun = \"\"\n",
        3,
        7,
        "`run` must not be empty",
    );
    single_error(
        "app = \"a\"\n[services.a]\nrun = \"echo 'hi\"\n",
        3,
        7,
        "cannot split `run` into arguments: unterminated single quote",
    );
    let error = single_error(
        "app = \"a\"\n[services.a]\nrun = \"python3 app.py > app.log\"\n",
        3,
        7,
        "`run` is executed without a shell, so `>` would reach the program as a plain argument",
    );
    assert!(help(&error).contains("sh -c"));
    let manifest = ok("app = \"a\"\n[services.a]\nrun = \"grep '>' in.txt\"\n");
    assert_eq!(manifest.services[0].run, ["grep", ">", "in.txt"]);
}

#[test]
fn env_checks() {
    single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\nenv = { MY-VAR = \"1\" }\n",
        4,
        9,
        "invalid environment variable name `MY-VAR`",
    );
    let error = single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\n[services.a.env]\nPORT = 8080\n",
        5,
        8,
        "environment variable `PORT` must be a string, found an integer",
    );
    assert_eq!(help(&error), "quote it: `PORT = \"8080\"`");
}

#[test]
fn backoff_max_must_not_be_below_backoff_initial() {
    single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\n[services.a.restart]\nbackoff_initial = \"1m\"\nbackoff_max = \"5s\"\n",
        6,
        15,
        "`backoff_max` (5s) is shorter than `backoff_initial` (1m)",
    );
    // Against the default maximum of 30s.
    single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\n[services.a.restart]\nbackoff_initial = \"1m\"\n",
        5,
        19,
        "`backoff_max` (30s) is shorter than `backoff_initial` (1m)",
    );
}

#[test]
fn all_independent_errors_are_reported_together_in_source_order() {
    let found = errors(
        r#"app = "shop"
colour = "blue"

[[gateway.routes]]
prefix = "/api"
service = "ordrs"

[services.orders]
run = "python3 orders.py"

[services.orders.health]
interval = "fast"
"#,
    );
    let at: Vec<(usize, usize, &str)> = found
        .iter()
        .map(|e| (e.line, e.column, e.message.as_str()))
        .collect();
    assert_eq!(at.len(), 3, "{}", Diagnostics(found.clone()));
    assert_eq!(at[0], (2, 1, "unknown key `colour` at the top level"));
    assert_eq!(at[1], (6, 11, "unknown service `ordrs` in route"));
    assert_eq!((at[2].0, at[2].1), (12, 12));
    assert!(
        at[2]
            .2
            .starts_with("invalid duration \"fast\" for `interval`")
    );
}

#[test]
fn many_errors_in_one_service_are_all_reported() {
    let found = errors(
        "app = \"a\"\n[services.a]\nreplicas = 0\nversion = 1\nhealth = { path = \"x\", timeout = \"0s\" }\n",
    );
    let lines: Vec<usize> = found.iter().map(|e| e.line).collect();
    // Missing `run` (at the header), replicas, version, health.path, health.timeout.
    assert_eq!(lines, [2, 3, 4, 5, 5], "{}", Diagnostics(found));
}

#[test]
fn display_formats_every_diagnostic() {
    let source = "app = \"shop\"\n[[gateway.routes]]\nprefix = \"/\"\nservice = \"ordrs\"\n[services.orders]\nrun = \"x\"\n";
    let diagnostics = match parse(source, Path::new("examples/shop/flotilla.toml")) {
        Ok(_) => panic!("the route is broken"),
        Err(diagnostics) => diagnostics,
    };
    assert_eq!(
        diagnostics.to_string(),
        "examples/shop/flotilla.toml:4:11: error: unknown service `ordrs` in route\n  \
         help: did you mean `orders`? known services are: orders"
    );
    assert_eq!(
        diagnostics.render(Some(source)),
        "examples/shop/flotilla.toml:4:11: error: unknown service `ordrs` in route\n  \
         |\n\
         4 | service = \"ordrs\"\n  \
         |           ^\n  \
         help: did you mean `orders`? known services are: orders"
    );
    let _: &dyn std::error::Error = &diagnostics;
}

// ---- resilience policy ----

/// A manifest with one service `a`, routed at `/a`; `extra` starts on line 6.
fn with_service(extra: &str) -> String {
    format!("app = \"a\"\n[services.a]\nrun = \"a\"\n[[gateway.routes]]\nprefix = \"/a\"\n{extra}")
}

#[test]
fn full_policy_is_parsed() {
    let manifest = ok(r#"app = "shop"
[services.payments]
run = "payments"

[services.payments.policy]
timeout = "1s"
deadline = "3s"
load_balancer = "round-robin"
failure_on = [500, 504]

[services.payments.policy.retries]
attempts = 4
backoff = "0s"
max_backoff = "250ms"
retry_on = [502, 503, 504, 599]
budget_percent = 1000
budget_min_per_second = 0
budget_window = "20s"

[services.payments.policy.breaker]
enabled = false
consecutive_failures = 7
failure_rate = 100
min_calls = 1
window = "30s"
open_timeout = "2s"
half_open_probes = 1000

[services.payments.policy.outlier]
enabled = false
consecutive_failures = 2
base_ejection = "1s"
max_ejection = "1s"
max_ejected_percent = 0

[services.payments.policy.bulkhead]
max_concurrent = 100000
max_queue = 0

[services.payments.policy.fallback]
status = 200
body = '{"items": []}'
content_type = "application/json; charset=utf-8"
"#);
    assert_eq!(
        manifest.services[0].policy,
        Policy {
            timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(3),
            load_balancer: LoadBalancer::RoundRobin,
            failure_on: vec![500, 504],
            retries: RetryPolicy {
                attempts: NonZeroU32::new(4).unwrap(),
                backoff: Duration::ZERO,
                max_backoff: Duration::from_millis(250),
                retry_on: vec![502, 503, 504, 599],
                budget_percent: 1000,
                budget_min_per_second: 0,
                budget_window: Duration::from_secs(20),
            },
            breaker: BreakerPolicy {
                enabled: false,
                consecutive_failures: NonZeroU32::new(7).unwrap(),
                failure_rate: 100,
                min_calls: NonZeroU32::MIN,
                window: Duration::from_secs(30),
                open_timeout: Duration::from_secs(2),
                half_open_probes: NonZeroU32::new(1000).unwrap(),
            },
            outlier: OutlierPolicy {
                enabled: false,
                consecutive_failures: NonZeroU32::new(2).unwrap(),
                base_ejection: Duration::from_secs(1),
                max_ejection: Duration::from_secs(1),
                max_ejected_percent: 0,
            },
            bulkhead: BulkheadPolicy {
                max_concurrent: NonZeroU32::new(100_000).unwrap(),
                max_queue: 0,
            },
            fallback: Some(Fallback {
                status: 200,
                body: r#"{"items": []}"#.into(),
                content_type: "application/json; charset=utf-8".into(),
            }),
        }
    );
}

#[test]
fn policy_defaults_when_absent() {
    let manifest = ok(&with_service("service = \"a\"\n"));
    assert_eq!(manifest.services[0].policy, Policy::default());
    let route = &manifest.gateway.routes[0];
    assert!(!route.retry_non_idempotent);
    assert_eq!(route.fallback, None);

    // Empty sections change nothing; a partial one keeps the defaults of the keys it leaves out.
    let manifest = ok(&with_service(
        "service = \"a\"\n[services.a.policy]\n[services.a.policy.breaker]\n\
         [services.a.policy.retries]\nattempts = 1\n",
    ));
    assert_eq!(
        manifest.services[0].policy,
        Policy {
            retries: RetryPolicy {
                attempts: NonZeroU32::MIN,
                ..RetryPolicy::default()
            },
            ..Policy::default()
        }
    );
    assert_eq!(
        ok("app = \"a\"\n[services.a]\nrun = \"a\"\npolicy = { load_balancer = \"p2c-ewma\" }\n")
            .services[0]
            .policy,
        Policy::default()
    );
}

#[test]
fn route_fallback_and_retry_non_idempotent() {
    let manifest = ok(r#"app = "shop"
[[gateway.routes]]
prefix = "/api/v1/orders"
service = "orders"
retry_non_idempotent = true
fallback = { status = 503, body = "try later" }

[[gateway.routes]]
prefix = "/api/v1/catalog"
service = "orders"
retry_non_idempotent = false
[gateway.routes.fallback]
content_type = "text/plain"

[services.orders]
run = "orders"
"#);
    let routes: Vec<(&str, bool, Option<&Fallback>)> = manifest
        .gateway
        .routes
        .iter()
        .map(|r| {
            (
                r.prefix.as_str(),
                r.retry_non_idempotent,
                r.fallback.as_ref(),
            )
        })
        .collect();
    assert_eq!(
        routes,
        [
            (
                "/api/v1/catalog",
                false,
                Some(&Fallback {
                    status: 200,
                    body: String::new(),
                    content_type: "text/plain".into(),
                })
            ),
            (
                "/api/v1/orders",
                true,
                Some(&Fallback {
                    status: 503,
                    body: "try later".into(),
                    content_type: "application/json".into(),
                })
            ),
        ]
    );
    // A route's fallback is its own: the service's policy is untouched.
    assert_eq!(manifest.services[0].policy.fallback, None);
}

#[test]
fn policy_values_of_the_wrong_type() {
    let error = single_error(
        &with_service("service = \"a\"\n[services.a.policy]\ntimeout = 5\n"),
        8,
        11,
        "`timeout` must be a duration, found an integer",
    );
    assert_eq!(help(&error), DURATION_HELP);
    let error = single_error(
        &with_service("service = \"a\"\n[services.a.policy.breaker]\nenabled = \"yes\"\n"),
        8,
        11,
        "`enabled` must be a boolean, found a string",
    );
    assert_eq!(
        help(&error),
        "write `enabled = true` or `enabled = false`, without quotes"
    );
    let error = single_error(
        &with_service("service = \"a\"\n[services.a.policy.retries]\nretry_on = 503\n"),
        8,
        12,
        "`retry_on` must be an array of status codes, found an integer",
    );
    assert_eq!(help(&error), "write it like `retry_on = [502, 503, 504]`");
    let error = single_error(
        &with_service("service = \"a\"\nretry_non_idempotent = 1\n"),
        7,
        24,
        "`retry_non_idempotent` must be a boolean, found an integer",
    );
    assert!(help(&error).contains("`retry_non_idempotent = true`"));

    // Integers get the default as their example.
    let error = single_error(
        &with_service("service = \"a\"\n[services.a.policy.retries]\nattempts = \"3\"\n"),
        8,
        12,
        "`attempts` must be an integer, found a string",
    );
    assert_eq!(
        help(&error),
        "write the number without quotes, like `attempts = 3`"
    );
    let error = single_error(
        &with_service("service = \"a\"\n[services.a.policy.bulkhead]\nmax_queue = 1.5\n"),
        8,
        13,
        "`max_queue` must be an integer, found a float",
    );
    assert_eq!(help(&error), "write a whole number, like `max_queue = 100`");

    let error = single_error(
        &with_service("service = \"a\"\n[services.a.policy]\nload_balancer = 2\n"),
        8,
        17,
        "`load_balancer` must be a string, found an integer",
    );
    assert!(help(&error).starts_with("write it like `load_balancer = \"round-robin\"`"));
    let error = single_error(
        &with_service("service = \"a\"\nfallback = \"sorry\"\n"),
        7,
        12,
        "`fallback` must be a table, found a string",
    );
    assert_eq!(
        help(&error),
        "write it as a [gateway.routes.fallback] section, or inline like `fallback = { ... }`"
    );
    let error = single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\npolicy.retries = 3\n",
        4,
        18,
        "`retries` must be a table, found an integer",
    );
    assert!(
        help(&error).contains("[services.a.policy.retries]"),
        "{error}"
    );
    let error = single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\npolicy.fallback = { body = 5 }\n",
        4,
        28,
        "`body` must be a string, found an integer",
    );
    assert!(help(&error).starts_with("quote it"), "{error}");
}

#[test]
fn policy_integers_out_of_range() {
    let cases = [
        (
            "retries",
            "attempts = 11",
            "`attempts` must be between 1 and 10, found 11",
        ),
        (
            "retries",
            "attempts = 0",
            "`attempts` must be between 1 and 10, found 0",
        ),
        (
            "retries",
            "budget_percent = 1001",
            "`budget_percent` must be between 0 and 1000, found 1001",
        ),
        (
            "retries",
            "budget_min_per_second = -1",
            "`budget_min_per_second` must be between 0 and 100000, found -1",
        ),
        (
            "breaker",
            "failure_rate = 0",
            "`failure_rate` must be between 1 and 100, found 0",
        ),
        (
            "breaker",
            "consecutive_failures = 0",
            "`consecutive_failures` must be at least 1, found 0",
        ),
        (
            "breaker",
            "min_calls = 0",
            "`min_calls` must be at least 1, found 0",
        ),
        (
            "breaker",
            "half_open_probes = 1001",
            "`half_open_probes` must be between 1 and 1000, found 1001",
        ),
        (
            "outlier",
            "max_ejected_percent = 101",
            "`max_ejected_percent` must be between 0 and 100, found 101",
        ),
        (
            "bulkhead",
            "max_concurrent = 0",
            "`max_concurrent` must be between 1 and 100000, found 0",
        ),
        (
            "bulkhead",
            "max_queue = 100001",
            "`max_queue` must be between 0 and 100000, found 100001",
        ),
        (
            "fallback",
            "status = 99",
            "`status` must be between 100 and 599, found 99",
        ),
        (
            "fallback",
            "status = 600",
            "`status` must be between 100 and 599, found 600",
        ),
    ];
    for (section, line, message) in cases {
        let column = line.find('=').unwrap() + 3;
        single_error(
            &with_service(&format!(
                "service = \"a\"\n[services.a.policy.{section}]\n{line}\n"
            )),
            8,
            column,
            message,
        );
    }
    single_error(
        &with_service("service = \"a\"\nfallback = { status = 0x258 }\n"),
        7,
        23,
        "`status` must be between 100 and 599, found 0x258",
    );
}

#[test]
fn policy_zero_durations() {
    for key in ["timeout", "deadline"] {
        single_error(
            &format!("app = \"a\"\n[services.a]\nrun = \"a\"\npolicy.{key} = \"0s\"\n"),
            4,
            key.len() + 11,
            &format!("`{key}` must be longer than zero"),
        );
    }
    for (section, key) in [
        ("retries", "budget_window"),
        ("breaker", "window"),
        ("breaker", "open_timeout"),
        ("outlier", "base_ejection"),
    ] {
        single_error(
            &format!(
                "app = \"a\"\n[services.a.policy.{section}]\n{key} = \"0ms\"\n[services.a]\nrun = \"a\"\n"
            ),
            3,
            key.len() + 4,
            &format!("`{key}` must be longer than zero"),
        );
    }
    // Retrying without any wait is allowed.
    let manifest = ok(
        "app = \"a\"\n[services.a]\nrun = \"a\"\npolicy.retries = { backoff = \"0s\", max_backoff = \"0s\" }\n",
    );
    assert_eq!(
        manifest.services[0].policy.retries.max_backoff,
        Duration::ZERO
    );
}

#[test]
fn deadline_must_not_be_shorter_than_timeout() {
    let error = single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\n[services.a.policy]\ndeadline = \"2s\"\ntimeout = \"5s\"\n",
        5,
        12,
        "`deadline` (2s) is shorter than `timeout` (5s)",
    );
    assert!(help(&error).contains("all tries together"), "{error}");
    // Against the default deadline of 30s, the timeout is to blame.
    single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\n[services.a.policy]\ntimeout = \"1m\"\n",
        5,
        11,
        "`deadline` (30s) is shorter than `timeout` (1m)",
    );
    // Equal is fine.
    ok(
        "app = \"a\"\n[services.a]\nrun = \"a\"\npolicy = { timeout = \"3s\", deadline = \"3s\" }\n",
    );
    single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\npolicy = { timeout = \"1 hour\", deadline = \"1s\" }\n",
        4,
        43,
        "`deadline` (1s) is shorter than `timeout` (1h)",
    );
    // An invalid timeout is reported alone, not compared.
    single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\npolicy = { timeout = \"soon\", deadline = \"1s\" }\n",
        4,
        22,
        "invalid duration \"soon\" for `timeout`: expected number at 0",
    );
}

#[test]
fn longest_backoff_and_ejection_must_not_be_below_the_first() {
    let error = single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\n[services.a.policy.retries]\nbackoff = \"1s\"\nmax_backoff = \"100ms\"\n",
        6,
        15,
        "`max_backoff` (100ms) is shorter than `backoff` (1s)",
    );
    assert_eq!(
        help(&error),
        "the backoff starts at `backoff` and doubles up to `max_backoff`"
    );
    single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\n[services.a.policy.outlier]\nbase_ejection = \"10m\"\n",
        5,
        17,
        "`max_ejection` (5m) is shorter than `base_ejection` (10m)",
    );
}

#[test]
fn unknown_load_balancer() {
    let error = single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\n[services.a.policy]\nload_balancer = \"round-robbin\"\n",
        5,
        17,
        "unknown load balancer \"round-robbin\"",
    );
    assert_eq!(
        help(&error),
        "did you mean `round-robin`? `load_balancer` is one of: p2c-ewma, round-robin"
    );
    let error = single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\npolicy.load_balancer = \"random\"\n",
        4,
        24,
        "unknown load balancer \"random\"",
    );
    assert_eq!(
        help(&error),
        "`load_balancer` is one of: p2c-ewma, round-robin"
    );
}

#[test]
fn unknown_keys_in_policy_tables() {
    let error = single_error(
        "app = \"a\"\n[services.a]\nrun = \"a\"\n[services.a.policy]\ntimout = \"1s\"\n",
        5,
        1,
        "unknown key `timout` in [services.a.policy]",
    );
    assert_eq!(
        help(&error),
        "did you mean `timeout`? allowed keys in [services.a.policy] are: timeout, deadline, \
         load_balancer, failure_on, retries, breaker, outlier, bulkhead, fallback"
    );
    let cases = [
        ("[services.a.policy]", "retry", "retries"),
        ("[services.a.policy.retries]", "attempt", "attempts"),
        (
            "[services.a.policy.breaker]",
            "half_open_probe",
            "half_open_probes",
        ),
        (
            "[services.a.policy.outlier]",
            "max_ejected_pct",
            "max_ejected_percent",
        ),
        (
            "[services.a.policy.bulkhead]",
            "max_concurent",
            "max_concurrent",
        ),
        (
            "[services.a.policy.fallback]",
            "content-type",
            "content_type",
        ),
    ];
    for (header, typo, guess) in cases {
        let error = single_error(
            &format!("app = \"a\"\n[services.a]\nrun = \"a\"\n{header}\n{typo} = 1\n"),
            5,
            1,
            &format!("unknown key `{typo}` in {header}"),
        );
        assert!(
            help(&error).starts_with(&format!("did you mean `{guess}`?")),
            "{error}"
        );
    }

    let found = errors(&with_service(
        "service = \"a\"\nfallback = { stauts = 503 }\nretry_idempotent = true\n",
    ));
    let at: Vec<(usize, usize, &str)> = found
        .iter()
        .map(|e| (e.line, e.column, e.message.as_str()))
        .collect();
    assert_eq!(
        at,
        [
            (7, 14, "unknown key `stauts` in [gateway.routes.fallback]"),
            (8, 1, "unknown key `retry_idempotent` in [[gateway.routes]]"),
        ]
    );
    assert!(help(&found[0]).starts_with("did you mean `status`?"));
    assert!(help(&found[1]).starts_with("did you mean `retry_non_idempotent`?"));
}

#[test]
fn bad_retry_on_entries() {
    let found = errors(
        "app = \"a\"\n[services.a]\nrun = \"a\"\n[services.a.policy.retries]\nretry_on = [503, 404, \"502\", 503]\n",
    );
    let at: Vec<(usize, usize, &str)> = found
        .iter()
        .map(|e| (e.line, e.column, e.message.as_str()))
        .collect();
    assert_eq!(
        at,
        [
            (
                5,
                18,
                "`retry_on entry` must be between 500 and 599, found 404"
            ),
            (5, 23, "`retry_on entry` must be an integer, found a string"),
            (5, 30, "`503` is listed twice in `retry_on`"),
        ]
    );
    assert_eq!(
        help(&found[1]),
        "write the number without quotes, like `retry_on = [502, 503, 504]`"
    );
    // An empty list retries only what never reached the service.
    let manifest = ok("app = \"a\"\n[services.a]\nrun = \"a\"\npolicy.retries.retry_on = []\n");
    assert!(manifest.services[0].policy.retries.retry_on.is_empty());
}

#[test]
fn fallback_content_type_must_be_a_header_value() {
    let error = single_error(
        &with_service("service = \"a\"\nfallback = { content_type = \"text/plain\\n\" }\n"),
        7,
        29,
        "`content_type` \"text/plain\\n\" is not a valid header value",
    );
    assert!(help(&error).starts_with("use printable ASCII"), "{error}");
    single_error(
        &with_service("service = \"a\"\nfallback = { content_type = \"\" }\n"),
        7,
        29,
        "`content_type` \"\" is not a valid header value",
    );
    single_error(
        &with_service(
            "service = \"a\"\nfallback = { content_type = \"text/plain; charset=\u{e9}\" }\n",
        ),
        7,
        29,
        "`content_type` \"text/plain; charset=\u{e9}\" is not a valid header value",
    );
}

// ---- load ----

#[test]
fn load_reads_a_directory_or_a_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("flotilla.toml");
    std::fs::write(&file, "app = \"shop\"\n[services.web]\nrun = \"./web\"\n").expect("write");

    let from_dir = load(dir.path()).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(from_dir.path, file);
    assert_eq!(from_dir.dir, dir.path().canonicalize().unwrap());
    assert!(from_dir.dir.is_absolute());

    let from_file = load(&file).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(from_file.app, "shop");
    assert_eq!(from_file.dir, from_dir.dir);
}

#[test]
fn load_reports_errors_with_the_file_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("flotilla.toml");
    std::fs::write(&file, "app = \"shop\"\nextra = 1\n").expect("write");
    let diagnostics = load(dir.path()).expect_err("invalid");
    assert_eq!(diagnostics.len(), 1);
    assert_eq!(diagnostics.0[0].file, file);
    assert!(diagnostics.render(None).contains("2 | extra = 1"));
}

#[test]
fn load_on_a_missing_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let diagnostics = load(dir.path()).expect_err("nothing there");
    let expected_file: PathBuf = dir.path().join("flotilla.toml");
    assert_eq!(diagnostics.len(), 1);
    let error = &diagnostics.0[0];
    assert_eq!(error.file, expected_file);
    assert_eq!((error.line, error.column), (1, 1));
    assert!(
        error
            .message
            .starts_with(&format!("cannot read {}: ", expected_file.display())),
        "{error}"
    );
    assert_eq!(
        help(error),
        "run `flotilla check DIR` on a directory that holds a flotilla.toml"
    );
}

#[test]
fn telemetry_can_be_switched_off() {
    assert!(ok("app = \"a\"\n").telemetry.enabled);
    let off = ok("app = \"a\"\n[telemetry]\nenabled = false\n");
    assert!(!off.telemetry.enabled);
    single_error(
        "app = \"a\"\n[telemetry]\nenabeld = false\n",
        3,
        1,
        "unknown key `enabeld` in [telemetry]",
    );
}

#[test]
fn telemetry_receiver_storage_and_export() {
    let defaults = ok("app = \"a\"\n").telemetry;
    assert_eq!(defaults.otlp_listen, Some(DEFAULT_OTLP_LISTEN));
    assert_eq!(defaults.otlp_endpoint, None);
    assert_eq!(defaults.storage, TelemetryStorage::Sqlite);
    assert_eq!(defaults.retention, Duration::from_secs(86_400));
    assert_eq!(defaults.max_storage, 256 << 20);

    let set = ok(
        "app = \"a\"\n[telemetry]\notlp_listen = \"127.0.0.1:14318\"\n\
         otlp_endpoint = \"http://collector:4318/\"\nstorage = \"memory\"\n\
         retention = \"7d\"\nmax_storage = \"1GB\"\n",
    )
    .telemetry;
    assert_eq!(set.otlp_listen, Some("127.0.0.1:14318".parse().unwrap()));
    assert_eq!(set.otlp_endpoint.as_deref(), Some("http://collector:4318"));
    assert_eq!(set.storage, TelemetryStorage::Memory);
    assert_eq!(set.retention, Duration::from_secs(7 * 86_400));
    assert_eq!(set.max_storage, 1_000_000_000);
    assert_eq!(
        ok("app = \"a\"\n[telemetry]\nmax_storage = 4096\notlp_listen = \"off\"\n").telemetry,
        TelemetrySettings {
            max_storage: 4096,
            otlp_listen: None,
            ..TelemetrySettings::default()
        }
    );
    assert_eq!(
        ok("app = \"a\"\n[telemetry]\nmax_storage = \"512MiB\"\n")
            .telemetry
            .max_storage,
        512 << 20
    );

    let error = single_error(
        "app = \"a\"\n[telemetry]\notlp_endpoint = \"https://collector:4318\"\n",
        3,
        17,
        "invalid `otlp_endpoint` \"https://collector:4318\": https is not supported yet; use a \
         collector's plain http:// OTLP port",
    );
    assert!(help(&error).contains("http://127.0.0.1:4318"), "{error}");
    let error = single_error(
        "app = \"a\"\n[telemetry]\nstorage = \"sqlit\"\n",
        3,
        11,
        "unknown telemetry storage \"sqlit\"",
    );
    assert_eq!(help(&error), "did you mean \"sqlite\"?");
    single_error(
        "app = \"a\"\n[telemetry]\nmax_storage = \"12 parsecs\"\n",
        3,
        15,
        "invalid `max_storage`: unknown unit \"parsecs\" (use B, KB, MB, GB, KiB, MiB or GiB)",
    );
    single_error(
        "app = \"a\"\n[telemetry]\notlp_listen = \"localhost:4318\"\n",
        3,
        15,
        "invalid listen address \"localhost:4318\" for `otlp_listen`",
    );
    single_error(
        "app = \"a\"\n[telemetry]\notlp_listen = \"127.0.0.1:4400\"\n",
        3,
        15,
        "the OTLP receiver and another server both listen on 127.0.0.1:4400",
    );
}

const EVENTFUL: &str = r#"app = "shop"

[services.orders]
run = "orders"

[services.shipping]
run = "shipping"

[topics."order.placed"]
partitions = 4
retention = "7d"
max_bytes = "1GiB"

[topics."order.cancelled"]

[[subscriptions]]
topic = "order.placed"
service = "shipping"
path = "/events/order-placed"
max_attempts = 3
backoff = "50ms"
"#;

#[test]
fn topics_and_subscriptions() {
    let manifest = ok(EVENTFUL);
    assert_eq!(manifest.events, EventSettings::default());
    assert_eq!(
        manifest.topics,
        [
            Topic {
                name: "order.placed".into(),
                partitions: 4,
                retention: Some(Duration::from_secs(7 * 86_400)),
                max_bytes: Some(1 << 30),
            },
            Topic {
                name: "order.cancelled".into(),
                partitions: 1,
                retention: None,
                max_bytes: None,
            },
        ]
    );
    assert_eq!(
        manifest.subscriptions,
        [Subscription {
            topic: "order.placed".into(),
            service: "shipping".into(),
            path: "/events/order-placed".into(),
            max_attempts: 3,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(30),
        }]
    );
    let nats = ok(&format!(
        "{EVENTFUL}\n[events]\nbackend = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nfsync = \"100ms\"\nmax_event_size = \"64KiB\"\n"
    ));
    assert_eq!(
        nats.events,
        EventSettings {
            backend: EventBackend::Nats {
                url: "nats://127.0.0.1:4222".into()
            },
            fsync: Fsync::Interval(Duration::from_millis(100)),
            max_event_size: 64 << 10,
        }
    );
}

#[test]
fn event_mistakes_are_pointed_at() {
    let error = single_error(
        &EVENTFUL.replace("topic = \"order.placed\"", "topic = \"order.plcaed\""),
        17,
        9,
        "unknown topic `order.plcaed` in subscription",
    );
    assert!(
        help(&error).starts_with("did you mean `order.placed`?"),
        "{error}"
    );
    single_error(
        &EVENTFUL.replace("service = \"shipping\"", "service = \"shiping\""),
        18,
        11,
        "unknown service `shiping` in route",
    );
    let error = single_error(
        &EVENTFUL.replace(
            "[topics.\"order.cancelled\"]",
            "[topics.\"Order Cancelled\"]",
        ),
        14,
        9,
        "invalid topic name \"Order Cancelled\": only lower-case letters, digits, `.`, `-` and `_` are allowed",
    );
    assert!(help(&error).contains("order.placed"));
    single_error(
        &EVENTFUL.replace("[topics.\"order.cancelled\"]", "[topics.\"x.dlq\"]"),
        14,
        9,
        "invalid topic name \"x.dlq\": `.dlq` names the dead-letter topic Flotilla makes for each topic",
    );
    single_error(
        &format!("{EVENTFUL}\n[events]\nbackend = \"nats\"\n"),
        24,
        11,
        "the nats backend needs `url`",
    );
    single_error(
        &format!("{EVENTFUL}\n[events]\nfsync = \"sometimes\"\n"),
        24,
        9,
        "invalid `fsync` \"sometimes\"",
    );
    single_error(
        &format!(
            "{EVENTFUL}\n[[subscriptions]]\ntopic = \"order.placed\"\nservice = \"shipping\"\npath = \"/again\"\n"
        ),
        23,
        1,
        "`shipping` subscribes to `order.placed` twice",
    );
    single_error(
        &EVENTFUL.replace("partitions = 4", "partitions = 0"),
        10,
        14,
        "`partitions` must be between 1 and 1024, found 0",
    );
}

#[test]
fn flotillas_own_names_are_reserved() {
    let error = single_error(
        "app = \"a\"\n[services.flotilla]\nrun = \"x\"\n",
        2,
        11,
        "the service name `flotilla` is reserved",
    );
    assert!(help(&error).contains("events"), "{error}");
    single_error(
        "app = \"a\"\n[services.gateway]\nrun = \"x\"\n",
        2,
        11,
        "the service name `gateway` is reserved",
    );
}

// ---- [sagas] ----

const SAGAS: &str = r#"app = "shop"

[services.inventory]
run = "inventory"

[services.payments]
run = "payments"

[topics."order.placed"]

[sagas]
store = "sqlite"

[sagas.place-order]
timeout = "30s"
trigger = { topic = "order.placed" }

[[sagas.place-order.steps]]
name = "reserve-stock"
action = { call = "POST inventory /reservations", body = "{{input.items}}" }
compensate = { call = "DELETE inventory /reservations/{{steps.reserve-stock.response.id}}" }
retry = { attempts = 5, backoff = "200ms", max_backoff = "10s" }

[[sagas.place-order.steps]]
name = "authorize-payment"
action = { call = "POST payments /authorizations", body = { order = "{{input.order_id}}", amount = "{{input.total}}", flags = [1, true, "x{{saga.id}}"] } }
compensate = { call = "POST payments /authorizations/{{steps.authorize-payment.response.id}}/void" }
"#;

/// `SAGAS` with `from` replaced by `to`, which must occur exactly once.
#[track_caller]
fn saga_with(from: &str, to: &str) -> String {
    assert_eq!(SAGAS.matches(from).count(), 1, "{from:?} must occur once");
    SAGAS.replace(from, to)
}

fn key(name: &str) -> PathSegment {
    PathSegment::Key(name.into())
}

#[test]
fn sagas_parse_into_steps_calls_and_templates() {
    let manifest = ok(SAGAS);
    let sagas = &manifest.sagas;
    assert_eq!(sagas.store, SagaStoreKind::Sqlite);
    assert_eq!(sagas.sagas.len(), 1);
    let saga = sagas.saga("place-order").expect("declared");
    assert_eq!(saga.timeout, Some(Duration::from_secs(30)));
    assert_eq!(
        saga.trigger,
        Some(SagaTrigger {
            topic: "order.placed".into()
        })
    );
    let [reserve, authorize] = saga.steps.as_slice() else {
        panic!("two steps expected: {:#?}", saga.steps);
    };

    assert_eq!(reserve.name, "reserve-stock");
    assert_eq!(reserve.action.method, "POST");
    assert_eq!(&*reserve.action.service, "inventory");
    assert_eq!(reserve.action.text, "POST inventory /reservations");
    assert_eq!(
        reserve.action.path.parts,
        [TemplatePart::Literal("/reservations".into())]
    );
    let Some(BodyTemplate::String(items)) = &reserve.action.body else {
        panic!("a template body expected: {:?}", reserve.action.body);
    };
    assert_eq!(
        items.single(),
        Some(&TemplateRef::Input(vec![key("items")]))
    );
    let undo = reserve.compensate.as_ref().expect("compensate");
    assert_eq!(undo.method, "DELETE");
    assert_eq!(
        undo.path.parts,
        [
            TemplatePart::Literal("/reservations/".into()),
            TemplatePart::Expr(TemplateRef::Step {
                step: "reserve-stock".into(),
                path: vec![key("id")],
            }),
        ]
    );
    assert_eq!(undo.path.single(), None);
    assert_eq!(undo.body, None);
    assert_eq!(
        reserve.retry,
        StepRetry {
            attempts: 5,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    );

    assert_eq!(authorize.retry, StepRetry::default());
    let template = |text: &str| {
        let Some(BodyTemplate::String(template)) = string_body(text) else {
            unreachable!()
        };
        template
    };
    // Keys keep the file's order, not TOML's sorted one.
    assert_eq!(
        authorize.action.body,
        Some(BodyTemplate::Object(vec![
            ("order".into(), string_body("{{input.order_id}}").unwrap()),
            ("amount".into(), string_body("{{input.total}}").unwrap()),
            (
                "flags".into(),
                BodyTemplate::Array(vec![
                    BodyTemplate::Integer(1),
                    BodyTemplate::Bool(true),
                    string_body("x{{saga.id}}").unwrap(),
                ])
            ),
        ]))
    );
    assert_eq!(
        template("x{{saga.id}}").parts,
        [
            TemplatePart::Literal("x".into()),
            TemplatePart::Expr(TemplateRef::SagaId)
        ]
    );
    assert_eq!(template("x{{saga.id}}").single(), None);
    // A compensation may read its own step's response; templates display as written.
    let void = authorize.compensate.as_ref().expect("compensate");
    assert_eq!(
        void.path.to_string(),
        "/authorizations/{{steps.authorize-payment.response.id}}/void"
    );
}

/// The body template `text` turns into, read through a one-step saga.
fn string_body(text: &str) -> Option<BodyTemplate> {
    let source = format!(
        "app = \"a\"\n[services.s]\nrun = \"s\"\n[[sagas.x.steps]]\nname = \"a\"\n\
         action = {{ call = \"POST s /\", body = \"{text}\" }}\n"
    );
    ok(&source).sagas.sagas[0].steps[0].action.body.clone()
}

#[test]
fn saga_settings_and_options() {
    let manifest = ok(
        "app = \"a\"\n[services.s]\nrun = \"s\"\n[sagas]\nstore = \"postgresql://u@db:5432/sagas\"\n\
         [sagas.\"b.second\"]\nsteps = [{ name = \"only.one\", action = { call = \"GET s /{{ input.ids.3 }}\", body = [1.5, { a = false }] } }]\n\
         [sagas.a-first]\nsteps = [{ name = \"one\", action = { call = \"PUT s /x\" } }]\n",
    );
    assert_eq!(
        manifest.sagas.store,
        SagaStoreKind::Postgres {
            url: "postgresql://u@db:5432/sagas".into()
        }
    );
    let names: Vec<&str> = manifest
        .sagas
        .sagas
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["b.second", "a-first"]);
    let saga = &manifest.sagas.sagas[0];
    assert_eq!((saga.timeout, &saga.trigger), (None, &None));
    let action = &saga.steps[0].action;
    assert_eq!(
        action.path.parts[1],
        TemplatePart::Expr(TemplateRef::Input(vec![key("ids"), PathSegment::Index(3)]))
    );
    assert_eq!(
        action.body,
        Some(BodyTemplate::Array(vec![
            BodyTemplate::Float(1.5),
            BodyTemplate::Object(vec![("a".into(), BodyTemplate::Bool(false))]),
        ]))
    );
    assert_eq!(ok("app = \"a\"\n").sagas, SagaSettings::default());
}

#[test]
fn saga_call_mistakes() {
    let error = single_error(
        &saga_with(
            "call = \"POST payments /authorizations\", body",
            "call = \"POST paymnts /authorizations\", body",
        ),
        26,
        25,
        "unknown service `paymnts` in `call`",
    );
    assert_eq!(
        help(&error),
        "did you mean `payments`? known services are: inventory, payments"
    );
    let error = single_error(
        &saga_with(
            "\"POST inventory /reservations\"",
            "\"post inventory /reservations\"",
        ),
        20,
        20,
        "HTTP method `post` must be upper-case",
    );
    assert_eq!(help(&error), "write `POST`");
    let error = single_error(
        &saga_with(
            "\"POST inventory /reservations\"",
            "\"PTCH inventory /reservations\"",
        ),
        20,
        20,
        "unknown HTTP method `PTCH` in `call`",
    );
    assert_eq!(
        help(&error),
        "did you mean `PATCH`? the methods are: GET, POST, PUT, PATCH, DELETE"
    );
    let error = single_error(
        &saga_with(
            "\"POST inventory /reservations\"",
            "\"POST gateway /reservations\"",
        ),
        20,
        25,
        "`gateway` is part of Flotilla, not a service a saga can call",
    );
    assert!(help(&error).contains("inventory, payments"), "{error}");
    single_error(
        &saga_with("\"POST inventory /reservations\"", "\"POST inventory\""),
        20,
        19,
        "`call` must be \"METHOD SERVICE /PATH\", found \"POST inventory\"",
    );
    single_error(
        &saga_with(
            "\"POST inventory /reservations\"",
            "\"POST inventory reservations\"",
        ),
        20,
        35,
        "the path in `call` must start with `/`, found \"reservations\"",
    );
    single_error(
        &saga_with(
            "\"POST inventory /reservations\"",
            "\"POST inventory /a b\"",
        ),
        20,
        37,
        "the path in `call` contains whitespace",
    );
    single_error(
        &saga_with(
            "action = { call = \"POST inventory /reservations\", ",
            "action = { ",
        ),
        20,
        10,
        "missing required key `call` in the `action` of `reserve-stock`",
    );
    single_error(
        &saga_with("body = \"{{input.items}}\"", "body = 2026-01-01"),
        20,
        58,
        "a date-time has no JSON form",
    );
}

#[test]
fn saga_template_mistakes() {
    let error = single_error(
        &saga_with(
            "{{steps.reserve-stock.response.id}}",
            "{{steps.reserve-stok.response.id}}",
        ),
        21,
        55,
        "unknown step `reserve-stok` in saga `place-order`",
    );
    assert_eq!(
        help(&error),
        "did you mean `reserve-stock`? the steps of `place-order` are: reserve-stock, \
         authorize-payment"
    );
    let error = single_error(
        &saga_with(
            "\"{{input.items}}\"",
            "\"{{ steps.authorize-payment.response }}\"",
        ),
        20,
        59,
        "step `authorize-payment` has not run yet when `reserve-stock` runs",
    );
    assert_eq!(
        help(&error),
        "`reserve-stock` runs first, so its action can only use `input` and `saga.id`"
    );
    // Its own response: not in its action, though its compensation may (as SAGAS does).
    let error = single_error(
        &saga_with(
            "{{input.total}}",
            "{{steps.authorize-payment.response.total}}",
        ),
        26,
        101,
        "step `authorize-payment` has not run yet when `authorize-payment` runs",
    );
    assert_eq!(
        help(&error),
        "the action of `authorize-payment` can use the responses of the steps before it: \
         reserve-stock; its `compensate` may use `steps.authorize-payment.response`"
    );
    single_error(
        &saga_with(
            "{{steps.reserve-stock.response.id}}",
            "{{steps.authorize-payment.response.id}}",
        ),
        21,
        55,
        "step `authorize-payment` runs after `reserve-stock`, so its response may not exist \
         when `reserve-stock` is compensated",
    );
    let error = single_error(
        &saga_with(
            "{{steps.reserve-stock.response.id}}\"",
            "{{steps.reserve-stock.response.id\"",
        ),
        21,
        55,
        "unclosed `{{` in template",
    );
    assert_eq!(
        help(&error),
        "close the expression with `}}`, like \"{{input.id}}\""
    );
    single_error(
        &saga_with("\"x{{saga.id}}\"", "\"x}}\""),
        26,
        139,
        "stray `}}` in template",
    );
    let error = single_error(
        &saga_with("{{input.items}}", "{{inputs.items}}"),
        20,
        59,
        "unknown root `inputs` in `{{inputs.items}}`",
    );
    assert!(help(&error).starts_with("did you mean `input`?"), "{error}");
    let error = single_error(
        &saga_with(
            "{{steps.reserve-stock.response.id}}",
            "{{steps.reserve-stock.id}}",
        ),
        21,
        55,
        "unknown field `id` of step `reserve-stock` in `{{steps.reserve-stock.id}}`",
    );
    assert_eq!(
        help(&error),
        "a step's result is `steps.NAME.response`, like \
         \"{{steps.reserve-stock.response.id}}\""
    );
    single_error(
        &saga_with("\"x{{saga.id}}\"", "\"{{saga.name}}\""),
        26,
        138,
        "unknown saga field in `{{saga.name}}`",
    );
    single_error(
        &saga_with("{{input.items}}", "{{}}"),
        20,
        59,
        "empty expression `{{}}`",
    );
    // With an escape in the string, columns inside it are unknown: the string itself is blamed.
    single_error(
        &saga_with("\"{{input.items}}\"", "\"\\u0041{{inputs}}\""),
        20,
        58,
        "unknown root `inputs` in `{{inputs}}`",
    );
}

#[test]
fn saga_structure_mistakes() {
    let error = single_error(
        &format!(
            "{SAGAS}\n[[sagas.place-order.steps]]\nname = \"reserve-stock\"\naction = {{ call = \"GET inventory /x\" }}\n"
        ),
        30,
        8,
        "duplicate step name `reserve-stock` in saga `place-order`",
    );
    assert!(help(&error).contains("line 19"), "{error}");
    let error = single_error(
        "app = \"a\"\n[services.s]\nrun = \"s\"\n[sagas.store]\nsteps = [{ name = \"a\", action = { call = \"GET s /\" } }]\n",
        4,
        8,
        "a saga cannot be named `store`",
    );
    assert!(help(&error).contains("another name"), "{error}");
    let error = single_error(
        &saga_with("store = \"sqlite\"", "store = \"mysql://db\""),
        12,
        9,
        "unsupported saga store \"mysql://db\"",
    );
    assert!(help(&error).contains("postgres://"), "{error}");
    let error = single_error(
        &saga_with("store = \"sqlite\"", "store = \"sqlit\""),
        12,
        9,
        "unsupported saga store \"sqlit\"",
    );
    assert!(
        help(&error).starts_with("did you mean \"sqlite\"?"),
        "{error}"
    );
    let error = single_error(
        &saga_with("store = \"sqlite\"", "stor = \"sqlite\""),
        12,
        1,
        "unknown key `stor` in [sagas]",
    );
    assert!(help(&error).starts_with("did you mean `store`?"), "{error}");
    let error = single_error(
        &saga_with("retry = {", "retyr = {"),
        22,
        1,
        "unknown key `retyr` in [[sagas.place-order.steps]]",
    );
    assert_eq!(
        help(&error),
        "did you mean `retry`? allowed keys in [[sagas.place-order.steps]] are: name, action, \
         compensate, retry"
    );
    let error = single_error(
        &saga_with("timeout = \"30s\"", "timout = \"30s\""),
        15,
        1,
        "unknown key `timout` in [sagas.place-order]",
    );
    assert!(
        help(&error).starts_with("did you mean `timeout`?"),
        "{error}"
    );
    let error = single_error(
        &saga_with("topic = \"order.placed\" }", "topic = \"order.plcaed\" }"),
        16,
        21,
        "unknown topic `order.plcaed` in saga trigger",
    );
    assert!(
        help(&error).starts_with("did you mean `order.placed`?"),
        "{error}"
    );
    // The dead-letter topic of a declared topic can trigger a saga too.
    ok(&saga_with("\"order.placed\" }", "\"order.placed.dlq\" }"));
    single_error(
        &saga_with("attempts = 5", "attempts = 0"),
        22,
        22,
        "`attempts` must be between 1 and 100, found 0",
    );
    single_error(
        &saga_with("max_backoff = \"10s\"", "max_backoff = \"100ms\""),
        22,
        58,
        "`max_backoff` (100ms) is shorter than `backoff` (200ms)",
    );
    single_error(
        &format!(
            "{SAGAS}\n[[sagas.place-order.steps]]\nname = \"Ship It\"\naction = {{ call = \"GET inventory /x\" }}\n"
        ),
        30,
        8,
        "invalid step name \"Ship It\": only lower-case letters, digits, `-`, `_` and `.` are \
         allowed",
    );
    single_error(
        "app = \"a\"\n[sagas.empty]\ntimeout = \"1s\"\n",
        2,
        8,
        "saga `empty` has no steps",
    );
    single_error(
        "app = \"a\"\n[sagas.empty]\nsteps = []\n",
        3,
        9,
        "saga `empty` has no steps",
    );
}
