//! Walks the spanned TOML tree into a validated [`Manifest`].
//!
//! The walk never stops at the first problem: every check reports into a [`Checker`] and carries
//! on with a placeholder value, so `flotilla check` can list everything wrong in one run. A
//! `Manifest` is only handed out when nothing was reported.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::command::split_words;
use crate::diagnostic::{Diagnostic, Diagnostics, LineIndex};
use crate::model::{
    BreakerPolicy, BulkheadPolicy, ControlSettings, EventBackend, EventSettings, Fallback, Fsync,
    GatewaySettings, HealthSettings, LoadBalancer, Manifest, OutlierPolicy, Policy,
    RestartSettings, RetryPolicy, Route, SagaSettings, Service, Subscription, TelemetrySettings,
    TelemetryStorage, Topic,
};
use crate::suggest::closest;

mod auth;
mod bff;
mod edge_limits;
mod protocol;
mod rate_limit;
mod sagas;
mod versions;

type Value<'i> = Spanned<DeValue<'i>>;
type Span = Range<usize>;

const DURATION_HELP: &str = "use a number with a unit, like \"500ms\", \"2s\" or \"1m\"";
const LISTEN_HELP: &str = "use an IP address and a port, like \"127.0.0.1:8080\" (host names such as `localhost` are not resolved)";
const MAX_REPLICAS: u32 = 64;
const MAX_SERVICE_NAME: usize = 63;
const DEFAULT_GATEWAY_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    8080,
));
const DEFAULT_CONTROL_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    4400,
));
const DEFAULT_VERSION: &str = "0.0.0";
const DEFAULT_FALLBACK_STATUS: u16 = 200;
const DEFAULT_FALLBACK_CONTENT_TYPE: &str = "application/json";
/// Any positive count.
const AT_LEAST_ONE: RangeInclusive<u32> = 1..=u32::MAX;

const TOP_KEYS: &[&str] = &[
    "app",
    "gateway",
    "control",
    "telemetry",
    "events",
    "topics",
    "subscriptions",
    "sagas",
    "services",
    "bff",
];
const EVENTS_KEYS: &[&str] = &["backend", "url", "fsync", "max_event_size"];
const TOPIC_KEYS: &[&str] = &["partitions", "retention", "max_bytes"];
const SUBSCRIPTION_KEYS: &[&str] = &[
    "topic",
    "service",
    "path",
    "max_attempts",
    "backoff",
    "max_backoff",
];
const DEFAULT_MAX_ATTEMPTS: u32 = 8;
const DEFAULT_EVENT_BACKOFF: Duration = Duration::from_millis(200);
const DEFAULT_EVENT_MAX_BACKOFF: Duration = Duration::from_secs(30);
const TELEMETRY_KEYS: &[&str] = &[
    "enabled",
    "otlp_listen",
    "otlp_endpoint",
    "storage",
    "retention",
    "max_storage",
    "stored_spans_per_second",
];
const SIZE_HELP: &str = "use a number of bytes or a number with a unit, like \"512MiB\" or \"1GB\"";
const GATEWAY_KEYS: &[&str] = &[
    "listen",
    "routes",
    "max_body",
    "max_headers",
    "header_timeout",
    "idle_timeout",
    "body_timeout",
    "access_log",
    "tls",
    "auth",
    "rate_limit",
];
const ROUTE_KEYS: &[&str] = &[
    "prefix",
    "service",
    "rewrite",
    "retry_non_idempotent",
    "fallback",
    "version",
    "default_version",
    "deprecated",
    "sunset",
    "deprecation_link",
    "auth",
    "scopes",
    "rate_limit",
    "cors",
];
const CONTROL_KEYS: &[&str] = &["listen"];
const SERVICE_KEYS: &[&str] = &[
    "build",
    "run",
    "version",
    "replicas",
    "env",
    "depends_on",
    "health",
    "restart",
    "policy",
    "protocol",
];
const HEALTH_KEYS: &[&str] = &[
    "path",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "startup_timeout",
];
const RESTART_KEYS: &[&str] = &[
    "backoff_initial",
    "backoff_max",
    "crash_loop_threshold",
    "crash_loop_window",
    "stop_grace",
];
const POLICY_KEYS: &[&str] = &[
    "timeout",
    "deadline",
    "load_balancer",
    "failure_on",
    "retries",
    "breaker",
    "outlier",
    "bulkhead",
    "fallback",
];
const RETRY_KEYS: &[&str] = &[
    "attempts",
    "backoff",
    "max_backoff",
    "retry_on",
    "budget_percent",
    "budget_min_per_second",
    "budget_window",
];
const BREAKER_KEYS: &[&str] = &[
    "enabled",
    "consecutive_failures",
    "failure_rate",
    "min_calls",
    "window",
    "open_timeout",
    "half_open_probes",
];
const OUTLIER_KEYS: &[&str] = &[
    "enabled",
    "consecutive_failures",
    "base_ejection",
    "max_ejection",
    "max_ejected_percent",
];
const BULKHEAD_KEYS: &[&str] = &["max_concurrent", "max_queue"];
const FALLBACK_KEYS: &[&str] = &["status", "body", "content_type"];

pub(crate) fn parse(source: &str, path: &Path) -> Result<Manifest, Diagnostics> {
    let mut checker = Checker {
        source,
        file: path,
        lines: LineIndex::new(source),
        found: Vec::new(),
    };
    let (root, syntax_errors) = DeTable::parse_recoverable(source);
    if !syntax_errors.is_empty() {
        checker.syntax_errors(syntax_errors);
        return checker.finish(None);
    }
    let manifest = checker.manifest(root.get_ref());
    checker.finish(Some(manifest))
}

/// Humantime's reason for rejecting `s`, without restating the input.
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| e.to_string())
}

/// A size like `512MiB`, `1GB` or `4096`: SI units are powers of 1000, IEC ones of 1024.
pub(crate) fn byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit {other:?} (use B, KB, MB, GB, KiB, MiB or GiB)"
            ));
        }
    };
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

/// Topic names go into file paths and NATS subjects: a safe alphabet, and `.dlq` is reserved.
pub(crate) fn topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err("it must be 1 to 200 characters long".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err("only lower-case letters, digits, `.`, `-` and `_` are allowed".into());
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err("dots separate words: not at the start or end, not two in a row".into());
    }
    if name.ends_with(".dlq") {
        return Err("`.dlq` names the dead-letter topic Flotilla makes for each topic".into());
    }
    Ok(())
}

/// An OTLP/HTTP base URL: plain `http://` for now (TLS arrives with the gateway edge).
fn otlp_endpoint(text: &str) -> Result<String, String> {
    let url = text.trim().trim_end_matches('/');
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(if url.starts_with("https://") {
            "https is not supported yet; use a collector's plain http:// OTLP port".into()
        } else {
            "expected an http:// URL".into()
        });
    };
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err("the URL names no host".into());
    }
    Ok(url.to_owned())
}

/// Where a `listen` address came from, to tell a real clash from one caused by an earlier error.
enum Listen {
    Default,
    Given(Span),
    Invalid,
}

/// What one `[services.NAME]` table turned into, before dependencies are resolved.
struct ServiceDraft {
    service: Service,
    /// `depends_on` entries as written, each with where it was written.
    depends_on: Vec<(String, Span)>,
}

/// Collects diagnostics while the tree is walked.
struct Checker<'s> {
    source: &'s str,
    file: &'s Path,
    lines: LineIndex<'s>,
    /// Each diagnostic with its byte offset, so the final list can be put in source order.
    found: Vec<(usize, Diagnostic)>,
}

impl Checker<'_> {
    fn error(&mut self, span: &Span, message: impl Into<String>, help: Option<String>) {
        let (line, column) = self.lines.line_column(span.start);
        self.found.push((
            span.start,
            Diagnostic {
                file: self.file.to_path_buf(),
                line,
                column,
                message: message.into(),
                help,
            },
        ));
    }

    fn finish(mut self, manifest: Option<Manifest>) -> Result<Manifest, Diagnostics> {
        // Stable, so problems found at one spot keep the order they were found in.
        self.found.sort_by_key(|(offset, _)| *offset);
        match manifest {
            Some(manifest) if self.found.is_empty() => Ok(manifest),
            _ => Err(Diagnostics(
                self.found.into_iter().map(|(_, d)| d).collect(),
            )),
        }
    }

    fn syntax_errors(&mut self, mut errors: Vec<toml::de::Error>) {
        errors.sort_by_key(|e| e.span().map_or(0, |span| span.start));
        let source_lines: Vec<&str> = self.source.lines().collect();
        let is_header = |line: usize| {
            source_lines
                .get(line.wrapping_sub(1))
                .is_some_and(|text| text.trim_start().starts_with('['))
        };
        // Lines of table headers that repeat an earlier one.
        let mut repeated_headers = HashSet::new();
        for error in errors {
            let span = error.span().unwrap_or(0..0);
            if !error.message().starts_with("duplicate key") {
                // What the parser reports after recovering from real broken syntax is often
                // an echo of the first mistake, so only that first one is worth showing.
                self.error(&span, format!("invalid TOML: {}", error.message()), None);
                break;
            }
            let key = self.source.get(span.clone()).unwrap_or_default();
            let (line, _) = self.lines.line_column(span.start);
            let help = if is_header(line) {
                repeated_headers.insert(line);
                "this table is already defined earlier in the file; merge the two sections or \
                 rename one"
                    .to_owned()
            } else {
                // The parser files the keys under a repeated header into the first one, so
                // every key the two share comes back as a duplicate too; the header says it all.
                let section = (1..line).rev().find(|&l| is_header(l));
                if section.is_some_and(|l| repeated_headers.contains(&l)) {
                    continue;
                }
                format!("`{key}` is already set earlier in the same table; remove one of the two")
            };
            self.error(&span, format!("duplicate key `{key}`"), Some(help));
        }
    }

    fn manifest(&mut self, root: &DeTable<'_>) -> Manifest {
        self.unknown_keys(root, TOP_KEYS, "at the top level");

        let app = match root.get("app") {
            Some(value) => self.app(value),
            None => {
                self.error(
                    &(0..0),
                    "missing required key `app`",
                    Some("add `app = \"<name>\"` at the top of the file".into()),
                );
                String::new()
            }
        };

        let drafts = match root.get("services") {
            Some(value) => self.service_drafts(value),
            None => Vec::new(),
        };
        let services = self.resolve_dependencies(drafts);

        let (gateway, gateway_listen) = match root.get("gateway") {
            Some(value) => self.gateway(value, &services),
            None => (
                GatewaySettings::new(DEFAULT_GATEWAY_LISTEN),
                Listen::Default,
            ),
        };
        let (control, control_listen) = match root.get("control") {
            Some(value) => self.control(value),
            None => (
                ControlSettings {
                    listen: DEFAULT_CONTROL_LISTEN,
                },
                Listen::Default,
            ),
        };
        let mut telemetry = TelemetrySettings::default();
        if let Some(table) = root
            .get("telemetry")
            .and_then(|value| self.table(value, "telemetry"))
        {
            self.telemetry(table, &mut telemetry);
        }
        let events = match root
            .get("events")
            .and_then(|value| self.table(value, "events"))
        {
            Some(table) => self.events(table),
            None => EventSettings::default(),
        };
        let topics = match root.get("topics") {
            Some(value) => self.topics(value),
            None => Vec::new(),
        };
        let subscriptions = match root.get("subscriptions") {
            Some(value) => self.subscriptions(value, &topics, &services),
            None => Vec::new(),
        };
        let sagas = match root.get("sagas") {
            Some(value) => self.sagas(value, &topics, &services),
            None => SagaSettings::default(),
        };
        let bffs = match root.get("bff") {
            Some(value) => self.bffs(value, &services, &gateway.routes, &gateway.auth),
            None => Vec::new(),
        };
        let blamed = match (control_listen, gateway_listen) {
            (Listen::Invalid, _) | (_, Listen::Invalid) => None,
            (Listen::Given(span), _) | (_, Listen::Given(span)) => Some(span),
            (Listen::Default, Listen::Default) => None,
        };
        if let Some(otlp) = telemetry.otlp_listen
            && otlp.port() != 0
            && (otlp == gateway.listen || otlp == control.listen)
            && let Some(value) = root
                .get("telemetry")
                .and_then(|t| t.get_ref().as_table())
                .and_then(|t| t.get("otlp_listen"))
        {
            self.error(
                &value.span(),
                format!("the OTLP receiver and another server both listen on {otlp}"),
                Some(
                    "give [telemetry] otlp_listen a port of its own, like \"127.0.0.1:4318\""
                        .into(),
                ),
            );
        }
        // Port 0 asks the OS for a free port, so two of them never clash.
        if gateway.listen == control.listen && gateway.listen.port() != 0 {
            if let Some(span) = blamed {
                self.error(
                    &span,
                    format!(
                        "the gateway and the control API both listen on {}",
                        gateway.listen
                    ),
                    Some("give [gateway] and [control] different ports".into()),
                );
            }
        }

        let dir = match self.file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Manifest {
            app,
            path: self.file.to_path_buf(),
            dir,
            gateway,
            control,
            telemetry,
            events,
            topics,
            subscriptions,
            sagas,
            services,
            bffs,
        }
    }

    fn app(&mut self, value: &Value<'_>) -> String {
        let Some(app) = self.string(value, "app") else {
            return String::new();
        };
        if app.trim().is_empty() {
            self.error(
                &value.span(),
                "`app` must not be empty",
                Some("name the application, like `app = \"shop\"`".into()),
            );
        }
        app.to_owned()
    }

    // ---- [gateway] and [control] ----

    fn gateway(&mut self, value: &Value<'_>, services: &[Service]) -> (GatewaySettings, Listen) {
        let mut settings = GatewaySettings::new(DEFAULT_GATEWAY_LISTEN);
        let Some(table) = self.table(value, "gateway") else {
            return (settings, Listen::Invalid);
        };
        self.unknown_keys(table, GATEWAY_KEYS, "in [gateway]");
        let listen = self.listen(table, &mut settings.listen);
        settings.limits = self.edge_limits(table);
        settings.tls = self.gateway_tls(table);
        if let Some(value) = table.get("auth") {
            settings.auth = self.authenticators(value);
        }
        if let Some(value) = table.get("routes") {
            settings.routes = self.routes(value, services, &settings.auth);
        }
        settings.rate_limit_store = self.rate_limit_store(table);
        (settings, listen)
    }

    fn control(&mut self, value: &Value<'_>) -> (ControlSettings, Listen) {
        let mut settings = ControlSettings {
            listen: DEFAULT_CONTROL_LISTEN,
        };
        let Some(table) = self.table(value, "control") else {
            return (settings, Listen::Invalid);
        };
        self.unknown_keys(table, CONTROL_KEYS, "in [control]");
        let listen = self.listen(table, &mut settings.listen);
        (settings, listen)
    }

    fn telemetry(&mut self, table: &DeTable<'_>, telemetry: &mut TelemetrySettings) {
        self.unknown_keys(table, TELEMETRY_KEYS, "in [telemetry]");
        self.set_bool(table, "enabled", &mut telemetry.enabled);
        if let Some(value) = table.get("otlp_listen")
            && let Some(text) = self.string(value, "otlp_listen")
        {
            if text == "off" {
                telemetry.otlp_listen = None;
            } else {
                match text.parse() {
                    Ok(addr) => telemetry.otlp_listen = Some(addr),
                    Err(_) => self.error(
                        &value.span(),
                        format!("invalid listen address {text:?} for `otlp_listen`"),
                        Some(format!("{LISTEN_HELP}, or \"off\" for no receiver")),
                    ),
                }
            }
        }
        if let Some(value) = table.get("otlp_endpoint")
            && let Some(text) = self.string(value, "otlp_endpoint")
        {
            match otlp_endpoint(text) {
                Ok(url) => telemetry.otlp_endpoint = Some(url),
                Err(reason) => self.error(
                    &value.span(),
                    format!("invalid `otlp_endpoint` {text:?}: {reason}"),
                    Some(
                        "give the collector's OTLP/HTTP base URL, like \"http://127.0.0.1:4318\""
                            .into(),
                    ),
                ),
            }
        }
        if let Some(value) = table.get("storage")
            && let Some(text) = self.string(value, "storage")
        {
            match text {
                "sqlite" => telemetry.storage = TelemetryStorage::Sqlite,
                "memory" => telemetry.storage = TelemetryStorage::Memory,
                other => {
                    let help = match closest(other, ["sqlite", "memory"]) {
                        Some(near) => format!("did you mean \"{near}\"?"),
                        None => {
                            "use \"sqlite\" (kept under .flotilla/telemetry/) or \"memory\"".into()
                        }
                    };
                    self.error(
                        &value.span(),
                        format!("unknown telemetry storage {other:?}"),
                        Some(help),
                    );
                }
            }
        }
        self.set_duration(table, "retention", false, &mut telemetry.retention);
        self.set_size(table, "max_storage", &mut telemetry.max_storage);
        self.set_integer(
            table,
            "stored_spans_per_second",
            AT_LEAST_ONE,
            &mut telemetry.stored_spans_per_second,
        );
    }

    /// Overwrites `slot` when `key` is present and a size: a number of bytes or a string with a
    /// unit (`"512MiB"`), larger than zero.
    fn set_size(&mut self, table: &DeTable<'_>, key: &str, slot: &mut u64) -> bool {
        let Some(value) = table.get(key) else {
            return true;
        };
        let parsed = match value.get_ref() {
            DeValue::Integer(integer) => i64::from_str_radix(integer.as_str(), integer.radix())
                .ok()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| "expected a positive number of bytes".to_owned()),
            DeValue::String(text) => byte_size(text),
            _ => Err("expected a size".to_owned()),
        };
        match parsed {
            Ok(0) => self.error(
                &value.span(),
                format!("`{key}` must be larger than zero"),
                Some(SIZE_HELP.into()),
            ),
            Ok(bytes) => {
                *slot = bytes;
                return true;
            }
            Err(reason) => self.error(
                &value.span(),
                format!("invalid `{key}`: {reason}"),
                Some(SIZE_HELP.into()),
            ),
        }
        false
    }

    // ---- [events], [topics.*], [[subscriptions]] ----

    fn events(&mut self, table: &DeTable<'_>) -> EventSettings {
        let mut settings = EventSettings::default();
        self.unknown_keys(table, EVENTS_KEYS, "in [events]");
        let url = table.get("url").and_then(|value| {
            self.string(value, "url")
                .map(|u| (u.to_owned(), value.span()))
        });
        match table.get("backend") {
            None => {}
            Some(value) => match self.string(value, "backend") {
                Some("embedded") => {}
                Some("nats") => match &url {
                    Some((url, _)) if url.starts_with("nats://") || url.starts_with("tls://") => {
                        settings.backend = EventBackend::Nats { url: url.clone() };
                    }
                    Some((url, span)) => self.error(
                        span,
                        format!("invalid NATS url {url:?}"),
                        Some("write it like \"nats://127.0.0.1:4222\"".into()),
                    ),
                    None => self.error(
                        &value.span(),
                        "the nats backend needs `url`",
                        Some("add `url = \"nats://127.0.0.1:4222\"` to [events]".into()),
                    ),
                },
                Some(other) => {
                    let help = match closest(other, ["embedded", "nats"]) {
                        Some(near) => format!("did you mean \"{near}\"?"),
                        None => "use \"embedded\" (a log under .flotilla/events/) or \"nats\" with `url`".into(),
                    };
                    self.error(
                        &value.span(),
                        format!("unknown events backend {other:?}"),
                        Some(help),
                    );
                }
                None => {}
            },
        }
        if let Some(value) = table.get("fsync")
            && let Some(text) = self.string(value, "fsync")
        {
            if text == "always" {
                settings.fsync = Fsync::Always;
            } else {
                match duration(text) {
                    Ok(every) if !every.is_zero() => settings.fsync = Fsync::Interval(every),
                    _ => self.error(
                        &value.span(),
                        format!("invalid `fsync` {text:?}"),
                        Some("use \"always\" (every acknowledged event is on disk) or an interval like \"100ms\"".into()),
                    ),
                }
            }
        }
        self.set_size(table, "max_event_size", &mut settings.max_event_size);
        settings
    }

    fn topics(&mut self, value: &Value<'_>) -> Vec<Topic> {
        let Some(table) = self.table(value, "topics") else {
            return Vec::new();
        };
        let mut entries: Vec<_> = table.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        let mut topics = Vec::new();
        for (key, value) in entries {
            let name: &str = key.get_ref();
            if let Err(reason) = topic_name(name) {
                self.error(
                    &key.span(),
                    format!("invalid topic name {name:?}: {reason}"),
                    Some(
                        "use lower-case letters, digits, `.`, `-` and `_`, like `order.placed`"
                            .into(),
                    ),
                );
                continue;
            }
            let Some(body) = self.table(value, &format!("topics.\"{name}\"")) else {
                continue;
            };
            self.unknown_keys(body, TOPIC_KEYS, &format!("in [topics.\"{name}\"]"));
            let mut topic = Topic {
                name: name.to_owned(),
                partitions: 1,
                retention: None,
                max_bytes: None,
            };
            self.set_integer(body, "partitions", 1..=1024, &mut topic.partitions);
            let mut retention = Duration::ZERO;
            if body.contains_key("retention")
                && self.set_duration(body, "retention", false, &mut retention)
            {
                topic.retention = Some(retention);
            }
            let mut max_bytes = 0;
            if body.contains_key("max_bytes") && self.set_size(body, "max_bytes", &mut max_bytes) {
                topic.max_bytes = Some(max_bytes);
            }
            topics.push(topic);
        }
        topics
    }

    fn subscriptions(
        &mut self,
        value: &Value<'_>,
        topics: &[Topic],
        services: &[Service],
    ) -> Vec<Subscription> {
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                value,
                "subscriptions",
                "an array of tables",
                Some("write each subscription as its own [[subscriptions]] section".into()),
            );
            return Vec::new();
        };
        let mut known: Vec<&str> = services.iter().map(|s| &*s.name).collect();
        known.sort_unstable();
        let topic_names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut subscriptions = Vec::new();
        for item in items.iter() {
            let Some(table) = self.table(item, "[[subscriptions]] entry") else {
                continue;
            };
            self.unknown_keys(table, SUBSCRIPTION_KEYS, "in [[subscriptions]]");
            let missing = |checker: &mut Self, key: &str, help: String| {
                checker.error(
                    &item.span(),
                    format!("missing required key `{key}` in [[subscriptions]]"),
                    Some(help),
                );
            };
            let topic = match table.get("topic") {
                None => {
                    missing(
                        self,
                        "topic",
                        "name a topic declared as [topics.\"NAME\"]".into(),
                    );
                    None
                }
                Some(value) => self.declared_topic(value, &topic_names, "subscription"),
            };
            let service = match table.get("service") {
                None => {
                    missing(self, "service", known_services_help(None, &known));
                    None
                }
                Some(value) => self.route_service(value, services, &known),
            };
            let path = match table.get("path") {
                None => {
                    missing(
                        self,
                        "path",
                        "add the path events are POSTed to, like `path = \"/events/order-placed\"`"
                            .into(),
                    );
                    None
                }
                Some(value) => self.absolute_path(value, "path"),
            };
            let mut max_attempts = DEFAULT_MAX_ATTEMPTS;
            self.set_integer(table, "max_attempts", 1..=1000, &mut max_attempts);
            let mut backoff = DEFAULT_EVENT_BACKOFF;
            let mut max_backoff = DEFAULT_EVENT_MAX_BACKOFF;
            let valid = self.set_duration(table, "backoff", false, &mut backoff)
                & self.set_duration(table, "max_backoff", false, &mut max_backoff);
            self.not_shorter(
                table,
                valid,
                ("backoff", backoff),
                ("max_backoff", max_backoff),
                "the delay between attempts doubles from `backoff` up to `max_backoff`",
            );
            if let (Some(topic), Some(service), Some(path)) = (topic, service, path) {
                if !seen.insert((topic.clone(), service.to_string())) {
                    self.error(
                        &item.span(),
                        format!("`{service}` subscribes to `{topic}` twice"),
                        Some(
                            "one consumer group per service and topic: keep one of the two".into(),
                        ),
                    );
                    continue;
                }
                subscriptions.push(Subscription {
                    topic,
                    service,
                    path,
                    max_attempts,
                    backoff,
                    max_backoff,
                });
            }
        }
        subscriptions
    }

    /// The name of a declared topic or of its dead-letter topic; `place` is where it is named,
    /// for the message.
    fn declared_topic(
        &mut self,
        value: &Value<'_>,
        topic_names: &[&str],
        place: &str,
    ) -> Option<String> {
        let name = self.string(value, "topic")?;
        // A dead-letter topic exists for every declared topic.
        let base = name.strip_suffix(".dlq").unwrap_or(name);
        if topic_names.contains(&base) {
            return Some(name.to_owned());
        }
        let help = match closest(name, topic_names.iter().copied()) {
            Some(near) => format!("did you mean `{near}`? declare topics as [topics.\"NAME\"]"),
            None if topic_names.is_empty() => {
                "no topics are declared; add a [topics.\"NAME\"] section".into()
            }
            None => format!("declared topics are: {}", topic_names.join(", ")),
        };
        self.error(
            &value.span(),
            format!("unknown topic `{name}` in {place}"),
            Some(help),
        );
        None
    }

    /// Overwrites `slot` with the table's valid `listen` address, if it has one.
    fn listen(&mut self, table: &DeTable<'_>, slot: &mut SocketAddr) -> Listen {
        let Some(value) = table.get("listen") else {
            return Listen::Default;
        };
        let Some(text) = self.string(value, "listen") else {
            return Listen::Invalid;
        };
        match text.parse() {
            Ok(addr) => {
                *slot = addr;
                Listen::Given(value.span())
            }
            Err(_) => {
                self.error(
                    &value.span(),
                    format!("invalid listen address {text:?}: expected IP:PORT"),
                    Some(LISTEN_HELP.into()),
                );
                Listen::Invalid
            }
        }
    }

    fn routes(
        &mut self,
        value: &Value<'_>,
        services: &[Service],
        authenticators: &[crate::Authenticator],
    ) -> Vec<Route> {
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                value,
                "routes",
                "an array of tables",
                Some("write each route as its own [[gateway.routes]] section".into()),
            );
            return Vec::new();
        };
        let mut known: Vec<&str> = services.iter().map(|s| &*s.name).collect();
        known.sort_unstable();

        let mut routes: Vec<(Route, Span)> = Vec::new();
        // Prefix -> line and service (as written) of the route that used it first.
        let mut claimed: HashMap<String, (usize, Option<String>)> = HashMap::new();
        for item in items.iter() {
            let Some(table) = self.table(item, "[[gateway.routes]] entry") else {
                continue;
            };
            self.unknown_keys(table, ROUTE_KEYS, "in [[gateway.routes]]");

            let written_service = table
                .get("service")
                .and_then(|value| value.get_ref().as_str());
            let versioned = table.contains_key("version");
            let prefix = match table.get("prefix") {
                Some(value) if versioned => self.absolute_path(value, "prefix").map(|raw| {
                    let trimmed = raw.trim_end_matches('/');
                    if trimmed.is_empty() { "/" } else { trimmed }.to_owned()
                }),
                Some(value) => self.route_prefix(value, written_service, &mut claimed),
                None => {
                    self.error(
                        &item.span(),
                        "missing required key `prefix` in [[gateway.routes]]",
                        Some(
                            "add the path prefix this route serves, like `prefix = \"/api\"`"
                                .into(),
                        ),
                    );
                    None
                }
            };
            let service = match table.get("service") {
                Some(value) => self.route_target(value, services, &known),
                None => {
                    self.error(
                        &item.span(),
                        "missing required key `service` in [[gateway.routes]]",
                        Some(known_services_help(None, &known)),
                    );
                    None
                }
            };
            let rewrite = table
                .get("rewrite")
                .and_then(|value| self.absolute_path(value, "rewrite"));
            let mut retry_non_idempotent = false;
            self.set_bool(table, "retry_non_idempotent", &mut retry_non_idempotent);
            let fallback = self
                .section(table, "gateway.routes", "fallback", FALLBACK_KEYS)
                .map(|table| self.fallback(table));
            let auth = self.route_auth(table, "[[gateway.routes]]", authenticators);
            let rate_limit = self.route_rate_limit(table);
            let cors = table.get("cors").and_then(|value| {
                let section =
                    self.section(table, "gateway.routes", "cors", edge_limits::CORS_KEYS)?;
                self.cors(section, &value.span())
            });

            let version = self.route_version(table);
            let deprecation = self.route_deprecation(table);

            if let (Some(prefix), Some((service, service_version))) = (prefix, service) {
                let route = Route {
                    rewrite,
                    retry_non_idempotent,
                    fallback,
                    service_version,
                    version,
                    deprecation,
                    auth,
                    rate_limit,
                    cors,
                    ..Route::new(prefix, service)
                };
                routes.push((route, item.span()));
            }
        }
        self.check_route_versions(&routes);
        let mut routes: Vec<Route> = routes.into_iter().map(|(route, _)| route).collect();
        // Longest first, so the first prefix that matches a request is the most specific one;
        // the sort is stable, so the versions of one prefix keep their file order.
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        routes
    }

    /// The normalised prefix, unless it is invalid or already used by an earlier route.
    fn route_prefix(
        &mut self,
        value: &Value<'_>,
        service: Option<&str>,
        claimed: &mut HashMap<String, (usize, Option<String>)>,
    ) -> Option<String> {
        let raw = self.absolute_path(value, "prefix")?;
        let trimmed = raw.trim_end_matches('/');
        let prefix = if trimmed.is_empty() { "/" } else { trimmed }.to_owned();
        if let Some((line, first_service)) = claimed.get(&prefix) {
            let first = match first_service {
                Some(service) => {
                    format!("`{prefix}` is already routed to `{service}` on line {line}")
                }
                None => format!("`{prefix}` is already used by the route on line {line}"),
            };
            self.error(
                &value.span(),
                format!("duplicate route prefix `{prefix}`"),
                Some(format!("{first}; remove one of the two routes")),
            );
            return None;
        }
        let (line, _) = self.lines.line_column(value.span().start);
        claimed.insert(prefix.clone(), (line, service.map(String::from)));
        Some(prefix)
    }

    /// The route's service and, for `service = "orders@2"`, the version of it that serves.
    fn route_target(
        &mut self,
        value: &Value<'_>,
        services: &[Service],
        known: &[&str],
    ) -> Option<(Arc<str>, Option<String>)> {
        let written = self.string(value, "service")?;
        let Some((_, version)) = written.split_once('@') else {
            return self
                .route_service(value, services, known)
                .map(|service| (service, None));
        };
        if version.is_empty() || version.contains(['@', ' ', '/']) {
            self.error(
                &value.span(),
                format!("invalid service version in {written:?}"),
                Some("write the service and the version it runs, like \"orders@2\"".into()),
            );
            return None;
        }
        let version = version.to_owned();
        self.route_service(value, services, known)
            .map(|service| (service, Some(version)))
    }

    fn route_service(
        &mut self,
        value: &Value<'_>,
        services: &[Service],
        known: &[&str],
    ) -> Option<Arc<str>> {
        let written = self.string(value, "service")?;
        let name = written.split_once('@').map_or(written, |(name, _)| name);
        if let Some(service) = services.iter().find(|s| &*s.name == name) {
            return Some(service.name.clone());
        }
        self.error(
            &value.span(),
            format!("unknown service `{name}` in route"),
            Some(known_services_help(
                closest(name, known.iter().copied()),
                known,
            )),
        );
        None
    }

    /// A string that must be an absolute URL path, like a route prefix.
    fn absolute_path(&mut self, value: &Value<'_>, key: &str) -> Option<String> {
        let text = self.string(value, key)?;
        if !text.starts_with('/') {
            self.error(
                &value.span(),
                format!("`{key}` must start with `/`, found {text:?}"),
                Some(format!("write it as \"/{}\"", text.trim_start_matches('/'))),
            );
            return None;
        }
        Some(text.to_owned())
    }

    // ---- [services.*] ----

    fn service_drafts(&mut self, value: &Value<'_>) -> Vec<ServiceDraft> {
        let Some(table) = self.table(value, "services") else {
            return Vec::new();
        };
        // The TOML map is sorted by name; the file order is what users expect to be kept.
        let mut entries: Vec<_> = table.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);

        let mut drafts = Vec::new();
        for (key, value) in entries {
            let name: &str = key.get_ref();
            self.service_name(name, &key.span());
            let DeValue::Table(body) = value.get_ref() else {
                self.error(
                    &value.span(),
                    format!(
                        "service `{name}` must be a table, found {}",
                        a_type(value.get_ref())
                    ),
                    Some(format!(
                        "define it as a [services.{name}] section with a `run` command"
                    )),
                );
                continue;
            };
            drafts.push(self.service(name, &value.span(), body));
        }
        drafts
    }

    fn service_name(&mut self, name: &str, span: &Span) {
        let mut chars = name.chars();
        let well_formed = chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !well_formed {
            self.error(
                span,
                format!("invalid service name `{name}`"),
                Some(
                    "service names start with a lowercase letter and hold only lowercase \
                     letters, digits and `-`, like `order-history`"
                        .into(),
                ),
            );
        } else if name.len() > MAX_SERVICE_NAME {
            self.error(
                span,
                format!(
                    "service name `{name}` is {} characters long; the limit is {MAX_SERVICE_NAME}",
                    name.len()
                ),
                Some("service names are used as DNS labels; pick a shorter name".into()),
            );
        } else if name == "flotilla" || name == "gateway" {
            self.error(
                span,
                format!("the service name `{name}` is reserved"),
                Some(format!(
                    "`{name}` names Flotilla's own {} in calls, spans and the map; pick another name",
                    if name == "gateway" { "gateway" } else { "API (events, sagas)" }
                )),
            );
        }
    }

    fn service(&mut self, name: &str, span: &Span, body: &DeTable<'_>) -> ServiceDraft {
        let place = format!("in [services.{name}]");
        self.unknown_keys(body, SERVICE_KEYS, &place);

        let build = body.get("build").and_then(|value| {
            let text = self.string(value, "build")?;
            if text.trim().is_empty() {
                self.error(
                    &value.span(),
                    "`build` must not be empty",
                    Some("remove the `build` key if the service needs no build step".into()),
                );
            }
            Some(text.to_owned())
        });
        let run = match body.get("run") {
            Some(value) => self.run_command(value),
            None => {
                self.error(
                    span,
                    format!("missing required key `run` {place}"),
                    Some(
                        "add the command that starts the service, like `run = \"python3 app.py\"`"
                            .into(),
                    ),
                );
                Vec::new()
            }
        };
        let version = match body.get("version") {
            Some(value) => self.version(value),
            None => DEFAULT_VERSION.to_owned(),
        };
        let replicas = body
            .get("replicas")
            .and_then(|value| self.integer(value, "replicas", 1..=MAX_REPLICAS, "`replicas = 2`"))
            .and_then(NonZeroU32::new)
            .unwrap_or(NonZeroU32::MIN);
        let env = match body.get("env") {
            Some(value) => self.env(value),
            None => BTreeMap::new(),
        };
        let depends_on = match body.get("depends_on") {
            Some(value) => self.depends_on(value),
            None => Vec::new(),
        };
        let path = format!("services.{name}");
        let health = self
            .section(body, &path, "health", HEALTH_KEYS)
            .map(|table| self.health(table))
            .unwrap_or_default();
        let restart = self
            .section(body, &path, "restart", RESTART_KEYS)
            .map(|table| self.restart(table))
            .unwrap_or_default();
        let policy = self
            .section(body, &path, "policy", POLICY_KEYS)
            .map(|table| self.policy(table, &path))
            .unwrap_or_default();
        let protocol = body
            .get("protocol")
            .map(|value| self.protocol(value))
            .unwrap_or_default();

        ServiceDraft {
            service: Service {
                name: name.into(),
                build,
                run,
                version,
                replicas,
                health,
                restart,
                policy,
                env,
                depends_on: Vec::new(),
                protocol,
            },
            depends_on,
        }
    }

    fn run_command(&mut self, value: &Value<'_>) -> Vec<String> {
        let Some(text) = self.string(value, "run") else {
            return Vec::new();
        };
        let words = match split_words(text) {
            Ok(words) => words,
            Err(reason) => {
                self.error(
                    &value.span(),
                    format!("cannot split `run` into arguments: {reason}"),
                    Some("close the quote, or escape the character with a backslash".into()),
                );
                return Vec::new();
            }
        };
        if words.is_empty() {
            self.error(
                &value.span(),
                "`run` must not be empty",
                Some(
                    "give the command that starts the service, like `run = \"python3 app.py\"`"
                        .into(),
                ),
            );
        }
        if let Some(operator) = words.iter().find(|w| w.is_shell_operator()) {
            self.error(
                &value.span(),
                format!(
                    "`run` is executed without a shell, so `{}` would reach the program as a plain argument",
                    operator.text
                ),
                Some(format!(
                    "to use shell syntax, run a shell: `run = \"sh -c '...'\"`; to pass `{}` as an argument, quote it",
                    operator.text
                )),
            );
        }
        words.into_iter().map(|w| w.text).collect()
    }

    fn version(&mut self, value: &Value<'_>) -> String {
        let Some(text) = self.string(value, "version") else {
            return DEFAULT_VERSION.to_owned();
        };
        if text.trim().is_empty() {
            self.error(
                &value.span(),
                "`version` must not be empty",
                Some(format!(
                    "remove it to use the default \"{DEFAULT_VERSION}\", or write one like \"1.0.0\""
                )),
            );
        }
        text.to_owned()
    }

    fn env(&mut self, value: &Value<'_>) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let Some(table) = self.table(value, "env") else {
            return env;
        };
        for (key, value) in table.iter() {
            let name: &str = key.get_ref();
            let mut chars = name.chars();
            let valid = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                self.error(
                    &key.span(),
                    format!("invalid environment variable name `{name}`"),
                    Some(
                        "use letters, digits and `_`, not starting with a digit, like `LOG_LEVEL`"
                            .into(),
                    ),
                );
            }
            match value.get_ref() {
                DeValue::String(text) => {
                    env.insert(name.to_owned(), text.to_string());
                }
                other => {
                    // Echo the value back quoted, so the fix can be copied as it stands.
                    let written = self.source.get(value.span()).unwrap_or_default();
                    self.error(
                        &value.span(),
                        format!(
                            "environment variable `{name}` must be a string, found {}",
                            a_type(other)
                        ),
                        Some(format!("quote it: `{name} = \"{written}\"`")),
                    );
                }
            }
        }
        env
    }

    fn depends_on(&mut self, value: &Value<'_>) -> Vec<(String, Span)> {
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                value,
                "depends_on",
                "an array of service names",
                Some("write it like `depends_on = [\"inventory\"]`".into()),
            );
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|item| {
                let name = self.string(item, "depends_on entry")?;
                Some((name.to_owned(), item.span()))
            })
            .collect()
    }

    fn health(&mut self, table: &DeTable<'_>) -> HealthSettings {
        let mut health = HealthSettings::default();
        if let Some(path) = table
            .get("path")
            .and_then(|value| self.absolute_path(value, "path"))
        {
            health.path = path;
        }
        self.set_duration(table, "interval", false, &mut health.interval);
        self.set_duration(table, "timeout", false, &mut health.timeout);
        self.set_duration(table, "startup_timeout", false, &mut health.startup_timeout);
        self.set_integer(
            table,
            "healthy_threshold",
            AT_LEAST_ONE,
            &mut health.healthy_threshold,
        );
        self.set_integer(
            table,
            "unhealthy_threshold",
            AT_LEAST_ONE,
            &mut health.unhealthy_threshold,
        );
        health
    }

    fn restart(&mut self, table: &DeTable<'_>) -> RestartSettings {
        let mut restart = RestartSettings::default();
        // An immediate restart or an immediate SIGKILL is a legitimate choice, so zero is fine there.
        let initial_ok =
            self.set_duration(table, "backoff_initial", true, &mut restart.backoff_initial);
        let max_ok = self.set_duration(table, "backoff_max", true, &mut restart.backoff_max);
        self.set_duration(
            table,
            "crash_loop_window",
            false,
            &mut restart.crash_loop_window,
        );
        self.set_duration(table, "stop_grace", true, &mut restart.stop_grace);
        self.set_integer(
            table,
            "crash_loop_threshold",
            AT_LEAST_ONE,
            &mut restart.crash_loop_threshold,
        );
        self.not_shorter(
            table,
            initial_ok && max_ok,
            ("backoff_initial", restart.backoff_initial),
            ("backoff_max", restart.backoff_max),
            "the backoff starts at `backoff_initial` and grows up to `backoff_max`",
        );
        restart
    }

    // ---- [services.*.policy] ----

    /// `path` is the service's, like `services.orders`.
    fn policy(&mut self, table: &DeTable<'_>, path: &str) -> Policy {
        let mut policy = Policy::default();
        let timeout_ok = self.set_duration(table, "timeout", false, &mut policy.timeout);
        let deadline_ok = self.set_duration(table, "deadline", false, &mut policy.deadline);
        self.not_shorter(
            table,
            timeout_ok && deadline_ok,
            ("timeout", policy.timeout),
            ("deadline", policy.deadline),
            "`timeout` limits each try and `deadline` all tries together, so the deadline must \
             be at least the timeout",
        );
        if let Some(balancer) = table
            .get("load_balancer")
            .and_then(|value| self.load_balancer(value))
        {
            policy.load_balancer = balancer;
        }
        if let Some(statuses) = table
            .get("failure_on")
            .and_then(|value| self.statuses(value, "failure_on", "`failure_on = [500, 502, 504]`"))
        {
            policy.failure_on = statuses;
        }

        let path = format!("{path}.policy");
        if let Some(table) = self.section(table, &path, "retries", RETRY_KEYS) {
            policy.retries = self.retries(table);
        }
        if let Some(table) = self.section(table, &path, "breaker", BREAKER_KEYS) {
            policy.breaker = self.breaker(table);
        }
        if let Some(table) = self.section(table, &path, "outlier", OUTLIER_KEYS) {
            policy.outlier = self.outlier(table);
        }
        if let Some(table) = self.section(table, &path, "bulkhead", BULKHEAD_KEYS) {
            policy.bulkhead = self.bulkhead(table);
        }
        policy.fallback = self
            .section(table, &path, "fallback", FALLBACK_KEYS)
            .map(|table| self.fallback(table));
        policy
    }

    fn load_balancer(&mut self, value: &Value<'_>) -> Option<LoadBalancer> {
        const CHOICES: [LoadBalancer; 2] = [LoadBalancer::P2cEwma, LoadBalancer::RoundRobin];
        let names = CHOICES.map(LoadBalancer::as_str);
        let list = names.join(", ");
        let text = self.string_with_help(
            value,
            "load_balancer",
            "a string",
            &format!("write it like `load_balancer = \"round-robin\"`; the choices are: {list}"),
        )?;
        if let Some(balancer) = CHOICES.into_iter().find(|c| c.as_str() == text) {
            return Some(balancer);
        }
        let help = match closest(text, names) {
            Some(guess) => format!("did you mean `{guess}`? `load_balancer` is one of: {list}"),
            None => format!("`load_balancer` is one of: {list}"),
        };
        self.error(
            &value.span(),
            format!("unknown load balancer {text:?}"),
            Some(help),
        );
        None
    }

    fn retries(&mut self, table: &DeTable<'_>) -> RetryPolicy {
        let mut retries = RetryPolicy::default();
        self.set_integer(table, "attempts", 1..=10, &mut retries.attempts);
        // No backoff at all is a legitimate choice (the retry budget still bounds the load).
        let backoff_ok = self.set_duration(table, "backoff", true, &mut retries.backoff);
        let max_ok = self.set_duration(table, "max_backoff", true, &mut retries.max_backoff);
        self.not_shorter(
            table,
            backoff_ok && max_ok,
            ("backoff", retries.backoff),
            ("max_backoff", retries.max_backoff),
            "the backoff starts at `backoff` and doubles up to `max_backoff`",
        );
        if let Some(statuses) = table
            .get("retry_on")
            .and_then(|value| self.statuses(value, "retry_on", "`retry_on = [502, 503, 504]`"))
        {
            retries.retry_on = statuses;
        }
        self.set_integer(
            table,
            "budget_percent",
            0..=1000,
            &mut retries.budget_percent,
        );
        self.set_integer(
            table,
            "budget_min_per_second",
            0..=100_000,
            &mut retries.budget_min_per_second,
        );
        self.set_duration(table, "budget_window", false, &mut retries.budget_window);
        retries
    }

    /// `retry_on`, `failure_on`: 5xx statuses, each listed once.
    fn statuses(&mut self, value: &Value<'_>, key: &str, example: &str) -> Option<Vec<u16>> {
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                value,
                key,
                "an array of status codes",
                Some(format!("write it like {example}")),
            );
            return None;
        };
        let entry = format!("{key} entry");
        let mut statuses = Vec::with_capacity(items.len());
        for item in items.iter() {
            let Some(status) = self
                .integer(item, &entry, 500..=599, example)
                .and_then(|n| u16::try_from(n).ok())
            else {
                continue;
            };
            if statuses.contains(&status) {
                self.error(
                    &item.span(),
                    format!("`{status}` is listed twice in `{key}`"),
                    Some("remove the second entry".into()),
                );
            } else {
                statuses.push(status);
            }
        }
        Some(statuses)
    }

    fn breaker(&mut self, table: &DeTable<'_>) -> BreakerPolicy {
        let mut breaker = BreakerPolicy::default();
        self.set_bool(table, "enabled", &mut breaker.enabled);
        self.set_integer(
            table,
            "consecutive_failures",
            AT_LEAST_ONE,
            &mut breaker.consecutive_failures,
        );
        self.set_integer(table, "failure_rate", 1..=100, &mut breaker.failure_rate);
        self.set_integer(table, "min_calls", AT_LEAST_ONE, &mut breaker.min_calls);
        self.set_duration(table, "window", false, &mut breaker.window);
        self.set_duration(table, "open_timeout", false, &mut breaker.open_timeout);
        self.set_integer(
            table,
            "half_open_probes",
            1..=1000,
            &mut breaker.half_open_probes,
        );
        breaker
    }

    fn outlier(&mut self, table: &DeTable<'_>) -> OutlierPolicy {
        let mut outlier = OutlierPolicy::default();
        self.set_bool(table, "enabled", &mut outlier.enabled);
        self.set_integer(
            table,
            "consecutive_failures",
            AT_LEAST_ONE,
            &mut outlier.consecutive_failures,
        );
        let base_ok = self.set_duration(table, "base_ejection", false, &mut outlier.base_ejection);
        let max_ok = self.set_duration(table, "max_ejection", false, &mut outlier.max_ejection);
        self.not_shorter(
            table,
            base_ok && max_ok,
            ("base_ejection", outlier.base_ejection),
            ("max_ejection", outlier.max_ejection),
            "each ejection lasts longer than the one before, from `base_ejection` up to \
             `max_ejection`",
        );
        self.set_integer(
            table,
            "max_ejected_percent",
            0..=100,
            &mut outlier.max_ejected_percent,
        );
        outlier
    }

    fn bulkhead(&mut self, table: &DeTable<'_>) -> BulkheadPolicy {
        let mut bulkhead = BulkheadPolicy::default();
        self.set_integer(
            table,
            "max_concurrent",
            1..=100_000,
            &mut bulkhead.max_concurrent,
        );
        self.set_integer(table, "max_queue", 0..=100_000, &mut bulkhead.max_queue);
        bulkhead
    }

    /// A `fallback` table, of a policy or of a gateway route.
    fn fallback(&mut self, table: &DeTable<'_>) -> Fallback {
        let mut status = DEFAULT_FALLBACK_STATUS;
        self.set_integer(table, "status", 100..=599, &mut status);
        let body = table
            .get("body")
            .and_then(|value| {
                self.string_with_help(
                    value,
                    "body",
                    "a string",
                    "quote it; single quotes keep JSON readable, like `body = '{\"items\": []}'`",
                )
            })
            .unwrap_or_default()
            .to_owned();
        let content_type = table
            .get("content_type")
            .and_then(|value| self.content_type(value))
            .unwrap_or_else(|| DEFAULT_FALLBACK_CONTENT_TYPE.to_owned());
        Fallback {
            status,
            body,
            content_type,
        }
    }

    /// A `content_type` that can be sent as an HTTP header value as it stands.
    fn content_type(&mut self, value: &Value<'_>) -> Option<String> {
        const EXAMPLE: &str = "`content_type = \"text/plain; charset=utf-8\"`";
        let text = self.string_with_help(
            value,
            "content_type",
            "a string",
            &format!("write a media type, like {EXAMPLE}"),
        )?;
        let valid =
            !text.trim().is_empty() && text.chars().all(|c| c == ' ' || c.is_ascii_graphic());
        if !valid {
            self.error(
                &value.span(),
                format!("`content_type` {text:?} is not a valid header value"),
                Some(format!(
                    "use printable ASCII characters and spaces only, like {EXAMPLE}"
                )),
            );
            return None;
        }
        Some(text.to_owned())
    }

    // ---- typed settings in a table ----

    /// Overwrites `slot` when `key` is present and valid; false when it is present but invalid.
    fn set_duration(
        &mut self,
        table: &DeTable<'_>,
        key: &str,
        allow_zero: bool,
        slot: &mut Duration,
    ) -> bool {
        let Some(value) = table.get(key) else {
            return true;
        };
        let Some(text) = self.string_with_help(value, key, "a duration", DURATION_HELP) else {
            return false;
        };
        match duration(text) {
            Ok(parsed) if parsed.is_zero() && !allow_zero => {
                self.error(
                    &value.span(),
                    format!("`{key}` must be longer than zero"),
                    Some(DURATION_HELP.into()),
                );
                false
            }
            Ok(parsed) => {
                *slot = parsed;
                true
            }
            Err(reason) => {
                self.error(
                    &value.span(),
                    format!("invalid duration {text:?} for `{key}`: {reason}"),
                    Some(DURATION_HELP.into()),
                );
                false
            }
        }
    }

    /// Overwrites `slot` when `key` is present and an integer in `range` (which must fit `T`).
    /// The value already in `slot`, the default, is the example given when the type is wrong.
    fn set_integer<T>(
        &mut self,
        table: &DeTable<'_>,
        key: &str,
        range: RangeInclusive<u32>,
        slot: &mut T,
    ) where
        T: Copy + Into<u32> + TryFrom<u32>,
    {
        let Some(value) = table.get(key) else {
            return;
        };
        let example = format!("`{key} = {}`", (*slot).into());
        if let Some(number) = self
            .integer(value, key, range, &example)
            .and_then(|n| T::try_from(n).ok())
        {
            *slot = number;
        }
    }

    /// Overwrites `slot` when `key` is present and a boolean.
    fn set_bool(&mut self, table: &DeTable<'_>, key: &str, slot: &mut bool) {
        let Some(value) = table.get(key) else {
            return;
        };
        match value.get_ref() {
            DeValue::Boolean(flag) => *slot = *flag,
            _ => self.wrong_type(
                value,
                key,
                "a boolean",
                Some(format!(
                    "write `{key} = true` or `{key} = false`, without quotes"
                )),
            ),
        }
    }

    /// Reports the duration `high` being shorter than `low` when both were read without error
    /// (`valid`); the error points at `high` if it was written, else at `low`.
    fn not_shorter(
        &mut self,
        table: &DeTable<'_>,
        valid: bool,
        (low_key, low): (&str, Duration),
        (high_key, high): (&str, Duration),
        why: &str,
    ) {
        if !valid || high >= low {
            return;
        }
        let blamed = table
            .get(high_key)
            .or_else(|| table.get(low_key))
            .map(|v| v.span())
            .unwrap_or(0..0);
        self.error(
            &blamed,
            format!(
                "`{high_key}` ({}) is shorter than `{low_key}` ({})",
                humantime::format_duration(high),
                humantime::format_duration(low)
            ),
            Some(why.into()),
        );
    }

    // ---- dependencies ----

    /// Checks every `depends_on`, reports cycles, and returns the services in dependency order.
    fn resolve_dependencies(&mut self, drafts: Vec<ServiceDraft>) -> Vec<Service> {
        let index: HashMap<&str, usize> = drafts
            .iter()
            .enumerate()
            .map(|(i, d)| (&*d.service.name, i))
            .collect();
        let mut known: Vec<&str> = index.keys().copied().collect();
        known.sort_unstable();

        // For every service, the services it depends on, with where each was named.
        let mut edges: Vec<Vec<(usize, Span)>> = Vec::with_capacity(drafts.len());
        for draft in &drafts {
            let name = &*draft.service.name;
            let mut out: Vec<(usize, Span)> = Vec::new();
            let mut seen = HashSet::new();
            for (dependency, span) in &draft.depends_on {
                match index.get(dependency.as_str()) {
                    _ if dependency == name => self.error(
                        span,
                        format!("service `{name}` depends on itself"),
                        Some(format!("remove \"{name}\" from its `depends_on`")),
                    ),
                    Some(&target) if !seen.insert(target) => self.error(
                        span,
                        format!("`{dependency}` is listed twice in `depends_on`"),
                        Some("remove the second entry".into()),
                    ),
                    Some(&target) => out.push((target, span.clone())),
                    None => self.error(
                        span,
                        format!("unknown service `{dependency}` in `depends_on`"),
                        Some(known_services_help(
                            closest(dependency, known.iter().copied()),
                            &known,
                        )),
                    ),
                }
            }
            edges.push(out);
        }

        let targets: Vec<Vec<usize>> = edges
            .iter()
            .map(|out| out.iter().map(|(target, _)| *target).collect())
            .collect();
        for cycle in find_cycles(&targets) {
            let names: Vec<&str> = cycle.iter().map(|&i| &*drafts[i].service.name).collect();
            let span = match cycle.as_slice() {
                [first, second, ..] => edges[*first]
                    .iter()
                    .find(|(target, _)| target == second)
                    .map(|(_, span)| span.clone()),
                _ => None,
            };
            self.error(
                &span.unwrap_or(0..0),
                format!("dependency cycle: {}", names.join(" -> ")),
                Some(
                    "a service cannot wait for itself, even through others; remove one of \
                     these `depends_on` entries"
                        .into(),
                ),
            );
        }

        let order = dependency_order(&targets);
        let names: Vec<Arc<str>> = drafts.iter().map(|d| d.service.name.clone()).collect();
        let mut slots: Vec<Option<ServiceDraft>> = drafts.into_iter().map(Some).collect();
        order
            .into_iter()
            .filter_map(|i| {
                let mut service = slots[i].take()?.service;
                service.depends_on = targets[i].iter().map(|&t| names[t].clone()).collect();
                Some(service)
            })
            .collect()
    }

    // ---- typed access ----

    fn unknown_keys(&mut self, table: &DeTable<'_>, allowed: &[&str], place: &str) {
        for key in table.keys() {
            let name: &str = key.get_ref();
            if allowed.contains(&name) {
                continue;
            }
            let list = allowed.join(", ");
            let help = match closest(name, allowed.iter().copied()) {
                Some(guess) => format!("did you mean `{guess}`? allowed keys {place} are: {list}"),
                None => format!("allowed keys {place} are: {list}"),
            };
            self.error(
                &key.span(),
                format!("unknown key `{name}` {place}"),
                Some(help),
            );
        }
    }

    fn wrong_type(&mut self, value: &Value<'_>, key: &str, expected: &str, help: Option<String>) {
        self.error(
            &value.span(),
            format!(
                "`{key}` must be {expected}, found {}",
                a_type(value.get_ref())
            ),
            help,
        );
    }

    fn string<'v>(&mut self, value: &'v Value<'_>, key: &str) -> Option<&'v str> {
        match value.get_ref() {
            DeValue::String(text) => Some(text.as_ref()),
            _ => {
                self.wrong_type(value, key, "a string", None);
                None
            }
        }
    }

    fn string_with_help<'v>(
        &mut self,
        value: &'v Value<'_>,
        key: &str,
        expected: &str,
        help: &str,
    ) -> Option<&'v str> {
        match value.get_ref() {
            DeValue::String(text) => Some(text.as_ref()),
            _ => {
                self.wrong_type(value, key, expected, Some(help.into()));
                None
            }
        }
    }

    fn table<'v, 'i>(&mut self, value: &'v Value<'i>, key: &str) -> Option<&'v DeTable<'i>> {
        match value.get_ref() {
            DeValue::Table(table) => Some(table),
            _ => {
                self.wrong_type(value, key, "a table", None);
                None
            }
        }
    }

    /// An integer in `range`. `example` shows the key written correctly, for when the type is
    /// wrong.
    fn integer(
        &mut self,
        value: &Value<'_>,
        key: &str,
        range: RangeInclusive<u32>,
        example: &str,
    ) -> Option<u32> {
        let number = match value.get_ref() {
            DeValue::Integer(integer) => {
                i64::from_str_radix(integer.as_str(), integer.radix()).ok()
            }
            DeValue::String(_) => {
                self.wrong_type(
                    value,
                    key,
                    "an integer",
                    Some(format!("write the number without quotes, like {example}")),
                );
                return None;
            }
            _ => {
                self.wrong_type(
                    value,
                    key,
                    "an integer",
                    Some(format!("write a whole number, like {example}")),
                );
                return None;
            }
        };
        let found = number
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| range.contains(n));
        if found.is_none() {
            let written = self.source.get(value.span()).unwrap_or_default();
            let (min, max) = range.into_inner();
            let message = if max == u32::MAX {
                format!("`{key}` must be at least {min}, found {written}")
            } else {
                format!("`{key}` must be between {min} and {max}, found {written}")
            };
            self.error(&value.span(), message, None);
        }
        found
    }

    /// The sub-table `key` of the table at `path` — a `[path.key]` section or an inline table —
    /// with its unknown keys reported; `None` when it is absent or not a table.
    fn section<'v, 'i>(
        &mut self,
        table: &'v DeTable<'i>,
        path: &str,
        key: &str,
        allowed: &[&str],
    ) -> Option<&'v DeTable<'i>> {
        let value = table.get(key)?;
        let header = format!("[{path}.{key}]");
        let DeValue::Table(section) = value.get_ref() else {
            self.wrong_type(
                value,
                key,
                "a table",
                Some(format!(
                    "write it as a {header} section, or inline like `{key} = {{ ... }}`"
                )),
            );
            return None;
        };
        self.unknown_keys(section, allowed, &format!("in {header}"));
        Some(section)
    }
}

fn known_services_help(guess: Option<&str>, known: &[&str]) -> String {
    let list = if known.is_empty() {
        "no services are defined yet; add a [services.NAME] section".to_owned()
    } else {
        format!("known services are: {}", known.join(", "))
    };
    match guess {
        Some(guess) => format!("did you mean `{guess}`? {list}"),
        None => list,
    }
}

/// The type of a value with its article, for "expected ..., found a string".
fn a_type(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Every cycle reachable by following dependencies, each written as `a, b, ..., a`.
fn find_cycles(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Unvisited,
        OnPath,
        Finished,
    }

    fn visit(
        node: usize,
        edges: &[Vec<usize>],
        state: &mut [State],
        path: &mut Vec<usize>,
        cycles: &mut Vec<Vec<usize>>,
    ) {
        state[node] = State::OnPath;
        path.push(node);
        for &next in &edges[node] {
            match state[next] {
                State::Unvisited => visit(next, edges, state, path, cycles),
                State::OnPath => {
                    if let Some(start) = path.iter().position(|&n| n == next) {
                        let mut cycle = path[start..].to_vec();
                        cycle.push(next);
                        cycles.push(cycle);
                    }
                }
                State::Finished => {}
            }
        }
        path.pop();
        state[node] = State::Finished;
    }

    let mut state = vec![State::Unvisited; edges.len()];
    let mut cycles = Vec::new();
    for node in 0..edges.len() {
        if state[node] == State::Unvisited {
            visit(node, edges, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    cycles
}

/// Indices in an order where every node comes after its dependencies, taking the earliest ready
/// node each time so that independent services keep their file order.
///
/// Nodes on or behind a cycle have no such place; they go last, in file order, so that later
/// checks (such as route targets) still find them. The cycle itself is reported separately.
fn dependency_order(edges: &[Vec<usize>]) -> Vec<usize> {
    let mut placed = vec![false; edges.len()];
    let mut order = Vec::with_capacity(edges.len());
    while let Some(next) =
        (0..edges.len()).find(|&i| !placed[i] && edges[i].iter().all(|&dep| placed[dep]))
    {
        placed[next] = true;
        order.push(next);
    }
    order.extend((0..edges.len()).filter(|&i| !placed[i]));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependency_order_keeps_file_order_among_independent_nodes() {
        // 0 depends on 2, 1 is free, 2 is free, 3 depends on 0 and 1.
        let edges = vec![vec![2], vec![], vec![], vec![0, 1]];
        assert_eq!(dependency_order(&edges), [1, 2, 0, 3]);
    }

    #[test]
    fn dependency_order_puts_cycles_last() {
        let edges = vec![vec![1], vec![0], vec![]];
        assert_eq!(dependency_order(&edges), [2, 0, 1]);
    }

    #[test]
    fn cycles_are_found_once_each() {
        let edges = vec![vec![1], vec![2], vec![0], vec![3], vec![]];
        assert_eq!(find_cycles(&edges), [vec![0, 1, 2, 0], vec![3, 3]]);
        assert!(find_cycles(&[vec![1], vec![2], vec![]]).is_empty());
    }
}
