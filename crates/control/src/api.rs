//! The control API's wire types, shared by the server and the CLI that reads them.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// `GET /v1/breakers` (one per caller and callee service, and per instance outlier record) and
/// the body of `PUT /v1/services/{name}/faults`: the data plane's own wire types, so the two
/// cannot drift apart.
pub use flotilla_proxy::{BreakerState, BreakerView, Faults};

/// `GET /v1/traces` lists [`TraceSummary`]s; `GET /v1/traces/{id}` is a [`TraceDetail`] of
/// [`Span`]s; the map's edges carry [`EdgeStats`]: the telemetry crate's own wire types.
pub use flotilla_telemetry::{EdgeStats, Span, TraceId, TraceSummary};

/// `GET /v1/app`: the running fleet as a whole.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppInfo {
    pub app: String,
    /// The manifest directory.
    pub dir: String,
    /// Process id of the `flotilla up` that runs the fleet.
    pub pid: u32,
    /// `http://host:port` of the gateway.
    pub gateway: String,
    /// `http://host:port` of this API.
    pub control: String,
    #[serde(with = "rfc3339")]
    pub started_at: SystemTime,
    pub phase: Phase,
}

/// Where `flotilla up` is in bringing the fleet up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "kebab-case")]
pub enum Phase {
    Building,
    Starting,
    /// Every instance passed its health check once.
    Ready,
    /// `up` could not bring the fleet up; the detail says why.
    Failed(String),
    Stopping,
}

/// `GET /v1/services/{name}` and each entry of `GET /v1/services`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub version: String,
    /// Instances the manifest asks for.
    pub replicas: u32,
    /// Instances currently passing health checks.
    pub healthy: u32,
    pub instances: Vec<InstanceView>,
}

/// One running (or restarting) copy of a service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceView {
    pub service: String,
    pub instance: String,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    /// `starting`, `running`, `backoff`, `crash-loop`, `stopping` or `stopped`.
    pub state: String,
    /// `unknown`, `healthy` or `unhealthy`.
    pub health: String,
    pub restarts: u32,
    pub version: String,
    /// Seconds since the current process started.
    pub uptime_seconds: Option<u64>,
    /// How the previous process ended, when it did.
    pub last_exit: Option<String>,
    /// Why the last failing health check failed.
    pub last_error: Option<String>,
}

/// `GET /v1/traces/{id}`: every span held for one trace, by start time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceDetail {
    pub trace_id: TraceId,
    pub spans: Vec<Span>,
}

/// How well something serves: an instance set, a service, the whole app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Every instance asked for is healthy.
    Healthy,
    /// Some are: it serves, with less room.
    Degraded,
    /// None are: calls to it fail.
    Down,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Down => "down",
        }
    }
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /v1/health`: instance health rolled up to services and the app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppHealth {
    /// The worst of the services, except that the app is `degraded` rather than `down` while
    /// some service still serves.
    pub status: HealthStatus,
    pub services: Vec<ServiceHealth>,
}

/// One service in `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceHealth {
    pub name: String,
    pub status: HealthStatus,
    /// Instances passing health checks.
    pub healthy: u32,
    /// Instances the manifest asks for.
    pub replicas: u32,
    /// Why, in words: `1 of 2 instances healthy (orders-1: connection refused)`.
    pub reason: String,
}

/// `GET /v1/map`: the services and who called whom over a recent window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppMap {
    /// The window the edges were observed in.
    pub window_seconds: f64,
    /// The gateway first, then the services in dependency order.
    pub nodes: Vec<MapNode>,
    /// Observed calls, sorted by caller then callee.
    pub edges: Vec<MapEdge>,
    /// Dependencies the manifest declares (`depends_on`) with no call in the window.
    pub unused: Vec<Dependency>,
}

/// A service (or the gateway) on the map.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapNode {
    pub name: String,
    pub health: HealthStatus,
    /// Instances the manifest asks for.
    pub instances: u32,
    /// Instances passing health checks.
    pub healthy: u32,
    pub version: String,
}

/// Calls observed from one service to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapEdge {
    #[serde(flatten)]
    pub stats: EdgeStats,
    /// Whether the manifest expects the call: the caller's `depends_on` names the callee, or
    /// for the gateway, a route leads to it. An undeclared edge is a dependency nobody wrote
    /// down.
    pub declared: bool,
}

/// A declared dependency: `caller` lists `callee` in `depends_on`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dependency {
    pub caller: String,
    pub callee: String,
}

mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub(crate) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}
