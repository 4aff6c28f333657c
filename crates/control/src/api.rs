//! The control API's wire types, shared by the server and the CLI that reads them.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// `GET /v1/breakers` (one per caller and callee service, and per instance outlier record) and
/// the body of `PUT /v1/services/{name}/faults`: the data plane's own wire types, so the two
/// cannot drift apart.
pub use flotilla_proxy::{BreakerState, BreakerView, Faults};

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
