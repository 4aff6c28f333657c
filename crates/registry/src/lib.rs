//! The registry: where every service instance is, and whether it is healthy.
//!
//! The supervisor [`Registry::register`]s each instance it starts and deregisters it when it
//! stops; [`health::watch_instance`] probes an instance and records the verdict. The data plane
//! only ever asks one question, through the [`Discovery`] trait: which healthy endpoints does a
//! service have right now? That answer is a pre-built `Arc<[Endpoint]>` snapshot, rebuilt on every
//! change, so the hot path clones one `Arc` and never walks the instance table.

pub mod health;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::watch;

/// Whether an instance may receive traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Registered, not yet checked: receives no traffic.
    Unknown,
    Healthy,
    Unhealthy,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        })
    }
}

/// One address that may receive a request for a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub instance: Arc<str>,
    pub addr: SocketAddr,
}

/// The healthy endpoints of one service, shared cheaply with every request.
pub type Endpoints = Arc<[Endpoint]>;

/// What the data plane learns about a service name.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// The name is not a service of this app.
    Unknown,
    /// The service exists; these of its instances are healthy (possibly none).
    Endpoints(Endpoints),
}

/// How the proxy finds endpoints: the registry in one process, a control-plane watch elsewhere.
pub trait Discovery: Send + Sync + 'static {
    fn resolve(&self, service: &str) -> Resolution;
}

/// A snapshot of one instance, for status pages and the control API.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    pub service: Arc<str>,
    pub instance: Arc<str>,
    pub addr: SocketAddr,
    pub version: String,
    pub health: Health,
    /// When the last health check finished.
    #[serde(with = "rfc3339_opt")]
    pub last_check: Option<SystemTime>,
    /// Why the last failing check failed.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Table {
    /// Declared services, in manifest order, each with its instances in registration order.
    services: Vec<(Arc<str>, Vec<InstanceInfo>)>,
    /// Healthy endpoints per service, rebuilt whenever `services` changes.
    healthy: HashMap<Arc<str>, Endpoints>,
}

impl Table {
    fn instances_mut(&mut self, service: &str) -> Option<&mut Vec<InstanceInfo>> {
        self.services
            .iter_mut()
            .find(|(name, _)| &**name == service)
            .map(|(_, instances)| instances)
    }

    fn rebuild(&mut self, service: &str) {
        let Some((name, instances)) = self.services.iter().find(|(n, _)| &**n == service) else {
            return;
        };
        let healthy = |version: Option<&str>| -> Endpoints {
            instances
                .iter()
                .filter(|i| i.health == Health::Healthy && version.is_none_or(|v| v == i.version))
                .map(|i| Endpoint {
                    instance: i.instance.clone(),
                    addr: i.addr,
                })
                .collect()
        };
        // Each version is also a name of its own (`orders@2`), so a route or a canary can send
        // traffic to one version only.
        let mut versioned: Vec<(Arc<str>, Endpoints)> = Vec::new();
        for instance in instances {
            let key = format!("{name}@{}", instance.version);
            if !versioned.iter().any(|(k, _)| **k == key) {
                versioned.push((key.into(), healthy(Some(&instance.version))));
            }
        }
        let all = healthy(None);
        let name = name.clone();
        let prefix_len = name.len() + 1;
        self.healthy.retain(|key, _| {
            !(key.len() > prefix_len
                && key.starts_with(&*name)
                && key.as_bytes()[name.len()] == b'@')
        });
        self.healthy.insert(name, all);
        self.healthy.extend(versioned);
    }
}

/// The instance table. Cloning shares it.
#[derive(Clone)]
pub struct Registry {
    table: Arc<RwLock<Table>>,
    /// Bumped on every change, so watchers (status pages, `up` waiting for health) wake up.
    changes: Arc<watch::Sender<u64>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self {
            table: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
        }
    }

    /// Makes a service known, so requests for it get "no healthy instance" rather than "unknown service".
    pub fn declare_service(&self, service: &str) {
        let mut table = self.write();
        if table.instances_mut(service).is_none() {
            table.services.push((Arc::from(service), Vec::new()));
            table.rebuild(service);
        }
        drop(table);
        self.notify();
    }

    /// Adds (or replaces) an instance; it receives no traffic until a health check passes.
    pub fn register(&self, service: &str, instance: &str, addr: SocketAddr, version: &str) {
        self.declare_service(service);
        let mut table = self.write();
        let service_name: Arc<str> = table
            .services
            .iter()
            .find(|(n, _)| &**n == service)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| Arc::from(service));
        let info = InstanceInfo {
            service: service_name,
            instance: Arc::from(instance),
            addr,
            version: version.to_owned(),
            health: Health::Unknown,
            last_check: None,
            last_error: None,
        };
        if let Some(instances) = table.instances_mut(service) {
            match instances.iter_mut().find(|i| &*i.instance == instance) {
                Some(existing) => *existing = info,
                None => instances.push(info),
            }
        }
        table.rebuild(service);
        drop(table);
        self.notify();
    }

    /// Removes an instance; in-flight requests to it finish, new ones go elsewhere.
    pub fn deregister(&self, service: &str, instance: &str) {
        let mut table = self.write();
        if let Some(instances) = table.instances_mut(service) {
            instances.retain(|i| &*i.instance != instance);
        }
        table.rebuild(service);
        drop(table);
        self.notify();
    }

    /// Records a health verdict. Returns the previous health, or `None` if the instance is gone.
    pub fn set_health(
        &self,
        service: &str,
        instance: &str,
        health: Health,
        error: Option<String>,
    ) -> Option<Health> {
        let mut table = self.write();
        let info = table
            .instances_mut(service)?
            .iter_mut()
            .find(|i| &*i.instance == instance)?;
        let previous = info.health;
        info.health = health;
        info.last_check = Some(SystemTime::now());
        info.last_error = error;
        if previous != health {
            table.rebuild(service);
        }
        drop(table);
        if previous != health {
            self.notify();
        }
        Some(previous)
    }

    /// Every instance of every service, services in declaration order.
    pub fn instances(&self) -> Vec<InstanceInfo> {
        let table = self.read();
        table
            .services
            .iter()
            .flat_map(|(_, instances)| instances.iter().cloned())
            .collect()
    }

    pub fn instance(&self, service: &str, instance: &str) -> Option<InstanceInfo> {
        let table = self.read();
        table
            .services
            .iter()
            .find(|(n, _)| &**n == service)?
            .1
            .iter()
            .find(|i| &*i.instance == instance)
            .cloned()
    }

    /// The declared service names, in declaration order.
    pub fn services(&self) -> Vec<Arc<str>> {
        self.read()
            .services
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// A receiver that changes whenever anything in the table changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn notify(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-written (every mutation is a
        // single assignment or rebuild), so a poisoned lock is still safe to use.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Discovery for Registry {
    fn resolve(&self, service: &str) -> Resolution {
        let table = self.read();
        match table.healthy.get(service) {
            Some(endpoints) => Resolution::Endpoints(endpoints.clone()),
            // A version no instance runs (yet) of a declared service: nothing to send to.
            None => match service.split_once('@') {
                Some((base, _)) if table.healthy.contains_key(base) => {
                    Resolution::Endpoints(Endpoints::default())
                }
                _ => Resolution::Unknown,
            },
        }
    }
}

mod rfc3339_opt {
    use serde::Serializer;
    use std::time::SystemTime;

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<SystemTime>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(t) => serializer.collect_str(&humantime::format_rfc3339_millis(*t)),
            None => serializer.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn endpoints(registry: &Registry, service: &str) -> Vec<SocketAddr> {
        match registry.resolve(service) {
            Resolution::Endpoints(e) => e.iter().map(|e| e.addr).collect(),
            Resolution::Unknown => panic!("{service} unknown"),
        }
    }

    #[test]
    fn each_version_resolves_on_its_own() {
        let registry = Registry::new();
        registry.declare_service("orders");
        let v1: SocketAddr = "127.0.0.1:1001".parse().expect("addr");
        let v2: SocketAddr = "127.0.0.1:1002".parse().expect("addr");
        registry.register("orders", "orders-1", v1, "1");
        registry.register("orders", "orders-2", v2, "2");
        registry.set_health("orders", "orders-1", Health::Healthy, None);
        registry.set_health("orders", "orders-2", Health::Healthy, None);
        assert_eq!(endpoints(&registry, "orders"), [v1, v2]);
        assert_eq!(endpoints(&registry, "orders@1"), [v1]);
        assert_eq!(endpoints(&registry, "orders@2"), [v2]);
        // A version nobody runs is known but empty; a version of an unknown service is unknown.
        assert!(endpoints(&registry, "orders@3").is_empty());
        assert!(matches!(registry.resolve("nosuch@1"), Resolution::Unknown));
        registry.set_health("orders", "orders-2", Health::Unhealthy, None);
        assert!(endpoints(&registry, "orders@2").is_empty());
        registry.deregister("orders", "orders-2");
        assert_eq!(endpoints(&registry, "orders"), [v1]);
        assert!(endpoints(&registry, "orders@2").is_empty());
    }

    #[test]
    fn unknown_and_declared_services_differ() {
        let registry = Registry::new();
        assert!(matches!(registry.resolve("nosuch"), Resolution::Unknown));
        registry.declare_service("orders");
        assert!(endpoints(&registry, "orders").is_empty());
    }

    #[test]
    fn only_healthy_instances_receive_traffic() {
        let registry = Registry::new();
        registry.register("orders", "orders-1", addr(1001), "1.0");
        registry.register("orders", "orders-2", addr(1002), "1.0");
        assert!(
            endpoints(&registry, "orders").is_empty(),
            "unchecked instances get nothing"
        );

        registry.set_health("orders", "orders-1", Health::Healthy, None);
        registry.set_health("orders", "orders-2", Health::Healthy, None);
        assert_eq!(endpoints(&registry, "orders"), vec![addr(1001), addr(1002)]);

        registry.set_health(
            "orders",
            "orders-1",
            Health::Unhealthy,
            Some("timeout".into()),
        );
        assert_eq!(endpoints(&registry, "orders"), vec![addr(1002)]);

        registry.deregister("orders", "orders-2");
        assert!(endpoints(&registry, "orders").is_empty());
        assert_eq!(registry.instances().len(), 1);
    }

    #[test]
    fn re_registering_resets_health_and_address() {
        let registry = Registry::new();
        registry.register("orders", "orders-1", addr(1001), "1.0");
        registry.set_health("orders", "orders-1", Health::Healthy, None);
        registry.register("orders", "orders-1", addr(2001), "1.1");
        assert!(endpoints(&registry, "orders").is_empty());
        let info = registry.instance("orders", "orders-1").expect("registered");
        assert_eq!((info.addr, info.version.as_str()), (addr(2001), "1.1"));
    }

    #[test]
    fn changes_are_announced() {
        let registry = Registry::new();
        let mut rx = registry.subscribe();
        registry.register("orders", "orders-1", addr(1001), "1.0");
        assert!(rx.has_changed().expect("sender alive"));
        rx.mark_unchanged();
        registry.set_health("orders", "orders-1", Health::Unknown, None);
        assert!(
            !rx.has_changed().expect("sender alive"),
            "no change, no wake-up"
        );
    }
}
