//! The validated manifest: the only types the rest of Flotilla sees.
//!
//! Everything here has already passed `validate()`: names are resolved, durations parsed,
//! services sorted so that every service comes after the services it depends on.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A whole application, as described by one `flotilla.toml`.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// `app`: the application's name.
    pub app: String,
    /// The manifest file itself.
    pub path: PathBuf,
    /// The directory holding the manifest; `build` and `run` commands run from here.
    pub dir: PathBuf,
    pub gateway: GatewaySettings,
    pub control: ControlSettings,
    pub telemetry: TelemetrySettings,
    /// `[events]`: where topics are stored.
    pub events: EventSettings,
    /// `[topics."NAME"]`, in file order.
    pub topics: Vec<Topic>,
    /// `[[subscriptions]]`, in file order.
    pub subscriptions: Vec<Subscription>,
    /// `[sagas]`: where saga logs are kept, and the sagas declared as `[sagas.NAME]`.
    pub sagas: SagaSettings,
    /// In dependency order: every service comes after all of its `depends_on`.
    pub services: Vec<Service>,
    /// `[bff.NAME]`, in file order.
    pub bffs: Vec<crate::Bff>,
}

impl GatewaySettings {
    /// A gateway on `listen` with no routes and every edge default.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            routes: Vec::new(),
            limits: crate::EdgeLimits::default(),
            tls: None,
            auth: Vec::new(),
            rate_limit_store: crate::RateLimitStore::Memory,
        }
    }
}

impl Route {
    /// A route of `prefix` to `service` with nothing else set.
    pub fn new(prefix: impl Into<String>, service: impl Into<Arc<str>>) -> Self {
        Self {
            prefix: prefix.into(),
            service: service.into(),
            rewrite: None,
            retry_non_idempotent: false,
            fallback: None,
            service_version: None,
            version: None,
            deprecation: None,
            auth: None,
            rate_limit: None,
            cors: None,
        }
    }
}

impl Manifest {
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| &*s.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// `[gateway] listen`, default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Sorted longest prefix first, so the first match is the longest match; routes sharing a
    /// prefix (one per API version) keep their file order.
    pub routes: Vec<Route>,
    /// `max_body`, `max_headers`, the timeouts and `access_log`.
    pub limits: crate::EdgeLimits,
    /// `[gateway.tls]`; `flotilla up --tls` sets a generated development certificate.
    pub tls: Option<crate::TlsSettings>,
    /// `[gateway.auth.NAME]`, in file order.
    pub auth: Vec<crate::Authenticator>,
    /// `[gateway.rate_limit] store`.
    pub rate_limit_store: crate::RateLimitStore,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Path prefix, always starting with `/`; matches whole segments (`/api` matches `/api/x`, not `/apix`).
    pub prefix: String,
    /// The service that serves it (known to exist).
    pub service: Arc<str>,
    /// When set, the matched prefix is replaced by this before the request goes upstream.
    pub rewrite: Option<String>,
    /// `retry_non_idempotent`, default false: also retry POST and PATCH on this route (the
    /// service promises they are safe to repeat, e.g. through an idempotency key).
    pub retry_non_idempotent: bool,
    /// `[gateway.routes.fallback]` (or inline `fallback = { ... }`): answered instead of a 503
    /// while the service's breaker is open.
    pub fallback: Option<Fallback>,
    /// `service = "orders@2"`: only instances running that version serve the route.
    pub service_version: Option<String>,
    /// `version`, `default_version`: the API version this route serves under its prefix.
    pub version: Option<crate::RouteVersion>,
    /// `deprecated`, `sunset`, `deprecation_link`.
    pub deprecation: Option<crate::Deprecation>,
    /// `auth`, `scopes`.
    pub auth: Option<crate::RouteAuth>,
    /// `rate_limit = { ... }`.
    pub rate_limit: Option<crate::RateLimit>,
    /// `cors = { ... }`.
    pub cors: Option<crate::Cors>,
}

/// A static response served while a breaker is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// `status`, default 200; 100–599.
    pub status: u16,
    /// `body`, default empty.
    pub body: String,
    /// `content_type`, default `application/json`; printable ASCII and spaces, since it is sent
    /// as the `Content-Type` header as it stands.
    pub content_type: String,
}

#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// `[control] listen`, default `127.0.0.1:4400`.
    pub listen: SocketAddr,
}

/// `[telemetry]`: what the proxies record about the calls they carry, where services send their
/// own spans, where it is all kept and where it is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetrySettings {
    /// `enabled`, default true: spans per hop, the trace store, `/metrics`' call families and the
    /// application map. Off, the proxies only propagate nothing and record nothing.
    pub enabled: bool,
    /// `otlp_listen`, default `127.0.0.1:4318` (the OTLP/HTTP port every SDK defaults to);
    /// `"off"` runs no receiver. Services get `OTEL_EXPORTER_OTLP_ENDPOINT` pointing here.
    pub otlp_listen: Option<SocketAddr>,
    /// `otlp_endpoint`: an OTLP/HTTP collector (`http://collector:4318`) that every span and log
    /// line is forwarded to, in batches.
    pub otlp_endpoint: Option<String>,
    /// `storage`, default `sqlite` (under `.flotilla/telemetry/`); `memory` keeps only the
    /// bounded in-memory window.
    pub storage: TelemetryStorage,
    /// `retention`, default 24h: spans and log lines older than this are deleted.
    pub retention: Duration,
    /// `max_storage`, default 256 MiB: the oldest data goes first once the store is larger.
    pub max_storage: u64,
    /// `stored_spans_per_second`, default 2,000: above this rate whole traces are sampled for
    /// the durable store (errors always kept); memory and export still see every span.
    pub stored_spans_per_second: u32,
}

/// `[events]`: the broker behind the topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSettings {
    /// `backend`, default `embedded` (a log under `.flotilla/events/`); `nats` with `url`.
    pub backend: EventBackend,
    /// `fsync`, default `always` (an acknowledged event survives power loss; concurrent
    /// publishers share each fsync); or an interval like `"100ms"`. Embedded backend only.
    pub fsync: Fsync,
    /// `max_event_size`, default 1 MiB: larger events are refused with 413.
    pub max_event_size: u64,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            backend: EventBackend::Embedded,
            fsync: Fsync::Always,
            max_event_size: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBackend {
    Embedded,
    /// NATS JetStream at this URL (`nats://127.0.0.1:4222`).
    Nats {
        url: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    Always,
    Interval(Duration),
}

/// `[topics."order.placed"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    /// Lower-case letters, digits, `.`, `-` and `_`; `NAME.dlq` is its dead-letter topic.
    pub name: String,
    /// `partitions`, default 1: ordering is kept per partition key.
    pub partitions: u32,
    /// `retention`: events older than this may be deleted.
    pub retention: Option<Duration>,
    /// `max_bytes` per partition: the oldest events go first beyond it.
    pub max_bytes: Option<u64>,
}

/// `[[subscriptions]]`: one consumer group per subscribing service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub topic: String,
    pub service: Arc<str>,
    /// `path` the events are POSTed to, structured-mode CloudEvents.
    pub path: String,
    /// `max_attempts`, default 8: then the event goes to `TOPIC.dlq` with the reason.
    pub max_attempts: u32,
    /// `backoff`, default 200ms, doubling per attempt up to `max_backoff` (default 30s).
    pub backoff: Duration,
    pub max_backoff: Duration,
}

/// Where telemetry is kept beyond the in-memory window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelemetryStorage {
    Sqlite,
    Memory,
}

/// The port OpenTelemetry SDKs send OTLP/HTTP to by default.
pub const DEFAULT_OTLP_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4318);

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            otlp_listen: Some(DEFAULT_OTLP_LISTEN),
            otlp_endpoint: None,
            storage: TelemetryStorage::Sqlite,
            retention: Duration::from_secs(24 * 3600),
            max_storage: 256 << 20,
            stored_spans_per_second: 2_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: Arc<str>,
    /// Shell command run (via `sh -c`) from the manifest directory before starting; `None` when absent.
    pub build: Option<String>,
    /// The program and its arguments, split like a POSIX shell would (quotes honoured), run without a shell.
    pub run: Vec<String>,
    /// `version`, default `"0.0.0"`.
    pub version: String,
    /// `replicas`, default 1.
    pub replicas: NonZeroU32,
    pub health: HealthSettings,
    pub restart: RestartSettings,
    /// `[services.X.policy]`: how every caller (gateway and sidecars) treats calls to this service.
    pub policy: Policy,
    /// Extra environment, on top of what Flotilla sets.
    pub env: BTreeMap<String, String>,
    /// Services that must be healthy before this one starts.
    pub depends_on: Vec<Arc<str>>,
    /// `protocol`, default `http`: `grpc` services are called over HTTP/2 (h2c) by every proxy.
    pub protocol: Protocol,
}

/// How the proxies talk to a service's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1 (pooled keep-alive connections).
    #[default]
    Http,
    /// gRPC: HTTP/2 with prior knowledge (h2c), trailers passed through.
    Grpc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// HTTP path probed with GET; 2xx is healthy. Default `/healthz`.
    pub path: String,
    /// Default 2s.
    pub interval: Duration,
    /// Default 1s.
    pub timeout: Duration,
    /// Consecutive successes to become healthy. Default 1.
    pub healthy_threshold: NonZeroU32,
    /// Consecutive failures to become unhealthy. Default 3.
    pub unhealthy_threshold: NonZeroU32,
    /// How long `up` waits for the first healthy check before giving up. Default 60s.
    pub startup_timeout: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            path: "/healthz".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_threshold: NonZeroU32::MIN,
            unhealthy_threshold: NonZeroU32::new(3).expect("non-zero"),
            startup_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartSettings {
    /// First delay after a crash. Default 200ms.
    pub backoff_initial: Duration,
    /// Delay cap. Default 30s.
    pub backoff_max: Duration,
    /// This many crashes within `crash_loop_window` mark the instance crash-looping. Default 5.
    pub crash_loop_threshold: NonZeroU32,
    /// Default 60s.
    pub crash_loop_window: Duration,
    /// How long after SIGTERM before SIGKILL. Default 10s.
    pub stop_grace: Duration,
}

impl Default for RestartSettings {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            crash_loop_threshold: NonZeroU32::new(5).expect("non-zero"),
            crash_loop_window: Duration::from_secs(60),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// `[services.X.policy]`: the resilience policy every caller applies to calls to one service.
///
/// Failures, for breakers and outlier ejection, are transport errors, timeouts and the
/// `failure_on` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `timeout`: per try, until the response headers arrive. Default 15s; more than zero.
    pub timeout: Duration,
    /// `deadline`: over all tries and backoffs together. Default 30s; at least `timeout`.
    pub deadline: Duration,
    /// `load_balancer = "p2c-ewma" | "round-robin"`. Default p2c-ewma.
    pub load_balancer: LoadBalancer,
    /// `failure_on`: the answers that count as failures for the breaker and outlier ejection,
    /// besides transport errors and timeouts. Default [500, 502, 503, 504]; each 500–599.
    pub failure_on: Vec<u16>,
    /// `[services.X.policy.retries]`.
    pub retries: RetryPolicy,
    /// `[services.X.policy.breaker]`.
    pub breaker: BreakerPolicy,
    /// `[services.X.policy.outlier]`: per-instance breakers.
    pub outlier: OutlierPolicy,
    /// `[services.X.policy.bulkhead]`.
    pub bulkhead: BulkheadPolicy,
    /// `[services.X.policy.fallback]`: served to every caller while the breaker is open (a
    /// gateway route's own fallback wins over it).
    pub fallback: Option<Fallback>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(15),
            deadline: Duration::from_secs(30),
            load_balancer: LoadBalancer::default(),
            failure_on: vec![500, 502, 503, 504],
            retries: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
            outlier: OutlierPolicy::default(),
            bulkhead: BulkheadPolicy::default(),
            fallback: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency (weighted by requests in flight).
    #[default]
    P2cEwma,
    RoundRobin,
}

impl LoadBalancer {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalancer::P2cEwma => "p2c-ewma",
            LoadBalancer::RoundRobin => "round-robin",
        }
    }
}

/// Retries of failed tries. Idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) are
/// retried on a transport error, a per-try timeout or a `retry_on` status; any method is
/// retried when the connection was refused (the request never left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `attempts`: tries in total, the first included; 1 turns retries off. Default 3, max 10.
    pub attempts: NonZeroU32,
    /// `backoff`: the first retry waits up to this (full jitter), doubling each time. Default 25ms;
    /// may be zero.
    pub backoff: Duration,
    /// `max_backoff`: the cap of that doubling. Default 250ms; at least `backoff`.
    pub max_backoff: Duration,
    /// `retry_on`: response statuses worth another try, each 500–599. Default [502, 503, 504].
    pub retry_on: Vec<u16>,
    /// `budget_percent`: retries may add at most this percentage of the calls. Default 20, 0–1000.
    pub budget_percent: u32,
    /// `budget_min_per_second`: retries always allowed per second whatever the ratio. Default 10,
    /// 0–100000.
    pub budget_min_per_second: u32,
    /// `budget_window`: how long a call counts towards the budget. Default 10s.
    pub budget_window: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: NonZeroU32::new(3).expect("non-zero"),
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            retry_on: vec![502, 503, 504],
            budget_percent: 20,
            budget_min_per_second: 10,
            budget_window: Duration::from_secs(10),
        }
    }
}

/// The circuit breaker of one callee service, per caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// `enabled`, default true.
    pub enabled: bool,
    /// `consecutive_failures`: opens after this many failures in a row. Default 5.
    pub consecutive_failures: NonZeroU32,
    /// `failure_rate`: opens when at least this percentage of the calls in `window` failed…
    /// Default 50, 1–100.
    pub failure_rate: u32,
    /// `min_calls`: …and the window holds at least this many calls. Default 20.
    pub min_calls: NonZeroU32,
    /// `window`: the sliding window of the failure rate. Default 10s.
    pub window: Duration,
    /// `open_timeout`: how long it stays open before letting probes through. Default 5s.
    pub open_timeout: Duration,
    /// `half_open_probes`: calls let through while half-open; all must succeed to close. Default 1,
    /// at most 1000.
    pub half_open_probes: NonZeroU32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: NonZeroU32::new(5).expect("non-zero"),
            failure_rate: 50,
            min_calls: NonZeroU32::new(20).expect("non-zero"),
            window: Duration::from_secs(10),
            open_timeout: Duration::from_secs(5),
            half_open_probes: NonZeroU32::MIN,
        }
    }
}

/// Outlier ejection: a breaker per instance. An ejected instance gets no calls while the others
/// serve; each ejection lasts longer than the one before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// `enabled`, default true.
    pub enabled: bool,
    /// `consecutive_failures`: ejects an instance after this many failures in a row. Default 5.
    pub consecutive_failures: NonZeroU32,
    /// `base_ejection`: the first ejection's length; the n-th lasts n times as long. Default 10s.
    pub base_ejection: Duration,
    /// `max_ejection`: the cap of that growth. Default 5m; at least `base_ejection`.
    pub max_ejection: Duration,
    /// `max_ejected_percent`: never eject more than this share of the instances (always at
    /// least one may be ejected when there are two or more). Default 50, 0–100.
    pub max_ejected_percent: u32,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: NonZeroU32::new(5).expect("non-zero"),
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// A concurrency limit per callee and caller, with a bounded queue in front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkheadPolicy {
    /// `max_concurrent`: calls in flight at once. Default 100, at most 100000.
    pub max_concurrent: NonZeroU32,
    /// `max_queue`: calls waiting for a slot (at most the per-try timeout); past it, 503. Default
    /// 100, 0–100000.
    pub max_queue: u32,
}

impl Default for BulkheadPolicy {
    fn default() -> Self {
        Self {
            max_concurrent: NonZeroU32::new(100).expect("non-zero"),
            max_queue: 100,
        }
    }
}

/// `[sagas]`: the store, plus every `[sagas.NAME]` table in file order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SagaSettings {
    /// `store`: `"sqlite"` (default: `.flotilla/sagas.db`) or a `postgres://` URL.
    pub store: SagaStoreKind,
    pub sagas: Vec<Saga>,
}

impl SagaSettings {
    pub fn saga(&self, name: &str) -> Option<&Saga> {
        self.sagas.iter().find(|s| s.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SagaStoreKind {
    #[default]
    Sqlite,
    Postgres {
        url: String,
    },
}

/// `[sagas.NAME]`: steps run in order; on a permanent failure, the completed steps' compensations
/// run in reverse.
#[derive(Debug, Clone, PartialEq)]
pub struct Saga {
    /// Lower-case letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// `timeout`: past it, the saga stops going forward and compensates. `None` when absent.
    pub timeout: Option<Duration>,
    /// `trigger = { topic = "order.placed" }`: every event of that topic starts one saga, its
    /// `data` as the input.
    pub trigger: Option<SagaTrigger>,
    /// `[[sagas.NAME.steps]]`, at least one, names unique.
    pub steps: Vec<SagaStep>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaTrigger {
    /// A declared topic (or its `.dlq`).
    pub topic: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SagaStep {
    pub name: String,
    pub action: SagaCall,
    /// `compensate`: undoes a completed action; `None` when the step needs no undoing.
    pub compensate: Option<SagaCall>,
    pub retry: StepRetry,
}

/// `retry = { attempts = 5, backoff = "200ms", max_backoff = "10s" }` of a step's action.
/// Compensations use the same backoff but retry until they succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRetry {
    /// Tries in total, the first included. Default 3, 1–100.
    pub attempts: u32,
    /// First delay, doubling per attempt. Default 200ms.
    pub backoff: Duration,
    /// Cap of the doubling. Default 10s; at least `backoff`.
    pub max_backoff: Duration,
}

impl Default for StepRetry {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// `{ call = "POST inventory /reservations", body = ... }`.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaCall {
    /// Upper-case: GET, POST, PUT, PATCH or DELETE.
    pub method: String,
    /// A declared service.
    pub service: Arc<str>,
    /// Starts with `/`; an expression's value is percent-encoded as (part of) one path segment.
    pub path: Template,
    /// `body`: a template string or a table/array whose strings are templates; sent as JSON.
    pub body: Option<BodyTemplate>,
    /// The `call` text as written, for messages.
    pub text: String,
}

/// A JSON body whose strings may hold `{{...}}` expressions. A string that is exactly one
/// expression takes the referenced value whatever its type (`"{{input.items}}"` is an array);
/// any other string is text with the values interpolated.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyTemplate {
    Null,
    Bool(bool),
    Integer(i64),
    Float(f64),
    String(Template),
    Array(Vec<BodyTemplate>),
    Object(Vec<(String, BodyTemplate)>),
}

/// Text with `{{...}}` expressions, parsed and checked.
///
/// An expression is `input` or `steps.NAME.response`, each followed by any number of
/// `.key` or `.0` (array index) segments, or `saga.id`; in a facade's part, `path.NAME` or
/// `query.NAME`. Spaces inside the braces are allowed. There is no escape: `{{` always opens an expression and a `}}` outside one is refused, so
/// neither can be written literally. Displays back as template text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub parts: Vec<TemplatePart>,
}

impl Template {
    /// The template is exactly one expression (then a body takes the value's own type).
    pub fn single(&self) -> Option<&TemplateRef> {
        match self.parts.as_slice() {
            [TemplatePart::Expr(expr)] => Some(expr),
            _ => None,
        }
    }

    /// The expressions, in order.
    pub fn refs(&self) -> impl Iterator<Item = &TemplateRef> {
        self.parts.iter().filter_map(|part| match part {
            TemplatePart::Expr(expr) => Some(expr),
            TemplatePart::Literal(_) => None,
        })
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                TemplatePart::Literal(text) => f.write_str(text)?,
                TemplatePart::Expr(expr) => write!(f, "{{{{{expr}}}}}")?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    Expr(TemplateRef),
}

/// What an expression names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateRef {
    /// `{{input}}`, `{{input.a.b}}`, `{{input.items.0.sku}}`.
    Input(Vec<PathSegment>),
    /// `{{steps.NAME.response}}`, `{{steps.NAME.response.id}}`: the JSON the step's action
    /// answered. Only earlier steps (and, in a compensation, the step itself) may be named.
    Step {
        step: String,
        path: Vec<PathSegment>,
    },
    /// `{{saga.id}}`.
    SagaId,
    /// `{{path.NAME}}`, in a facade's part only: the `{NAME}` segment of the client's path.
    Path(String),
    /// `{{query.NAME}}`, in a facade's part only: the client's query parameter `NAME`.
    Query(String),
}

/// Displays as written, without braces: `steps.reserve-stock.response.id`.
impl fmt::Display for TemplateRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = match self {
            TemplateRef::Input(path) => {
                f.write_str("input")?;
                path
            }
            TemplateRef::Step { step, path } => {
                write!(f, "steps.{step}.response")?;
                path
            }
            TemplateRef::SagaId => return f.write_str("saga.id"),
            TemplateRef::Path(name) => return write!(f, "path.{name}"),
            TemplateRef::Query(name) => return write!(f, "query.{name}"),
        };
        path.iter().try_for_each(|segment| write!(f, ".{segment}"))
    }
}

/// One `.key` or `.0` after an expression's root; an all-digit segment is an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    Key(String),
    Index(usize),
}

impl fmt::Display for PathSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathSegment::Key(key) => f.write_str(key),
            PathSegment::Index(index) => write!(f, "{index}"),
        }
    }
}
