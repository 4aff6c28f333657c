//! The validated manifest: the only types the rest of Flotilla sees.
//!
//! Everything here has already passed `validate()`: names are resolved, durations parsed,
//! services sorted so that every service comes after the services it depends on.

use std::collections::BTreeMap;
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
    /// In dependency order: every service comes after all of its `depends_on`.
    pub services: Vec<Service>,
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
    /// Sorted longest prefix first, so the first match is the longest match.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Path prefix, always starting with `/`; matches whole segments (`/api` matches `/api/x`, not `/apix`).
    pub prefix: String,
    /// The service that serves it (known to exist).
    pub service: Arc<str>,
    /// When set, the matched prefix is replaced by this before the request goes upstream.
    pub rewrite: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// `[control] listen`, default `127.0.0.1:4400`.
    pub listen: SocketAddr,
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
    /// Extra environment, on top of what Flotilla sets.
    pub env: BTreeMap<String, String>,
    /// Services that must be healthy before this one starts.
    pub depends_on: Vec<Arc<str>>,
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
