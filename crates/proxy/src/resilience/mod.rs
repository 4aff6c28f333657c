//! Resilience: what the stack does so that one failing service cannot take down its callers.
//!
//! Per callee service, and separately for every caller (the gateway, each sidecar), a [`Callee`]
//! holds the circuit breaker, the retry budget, the bulkhead and each instance's latency and
//! outlier record; [`ResilienceLayer`] applies them to every call (see [`call`] for the order).
//! Process-wide parts — the policies from the manifest, the injected faults, the board that lists
//! every breaker — live in one [`Resilience`] that every stack of the process shares.

pub mod breaker;
pub mod budget;
mod bulkhead;
mod call;
mod callee;
pub mod faults;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use flotilla_manifest::{Manifest, Policy, Protocol};
use serde::{Deserialize, Serialize};

pub use breaker::BreakerState;
pub use call::{Deadline, MAX_REPLAY_BODY, ReplayBody, ResilienceLayer, ResilienceService};
pub(crate) use callee::Callee;
pub use faults::{FaultTable, Faults};

/// Each service's policy, with the default for services the manifest gives none, and how its
/// instances are spoken to.
#[derive(Debug, Default)]
pub struct Policies {
    by_service: HashMap<Arc<str>, Arc<Policy>>,
    default: Arc<Policy>,
    /// Read once per callee, when its breakers are set up; absent means HTTP/1.1.
    protocols: HashMap<Arc<str>, Protocol>,
}

/// `orders` of `orders@2`: discovery resolves the version's instances, but policies, faults and
/// breakers' settings belong to the service.
pub fn base_service(callee: &str) -> &str {
    callee
        .split_once('@')
        .map_or(callee, |(service, _)| service)
}

impl Policies {
    pub fn new(by_service: impl IntoIterator<Item = (Arc<str>, Policy)>) -> Self {
        Self {
            by_service: by_service
                .into_iter()
                .map(|(s, p)| (s, Arc::new(p)))
                .collect(),
            default: Arc::default(),
            protocols: HashMap::new(),
        }
    }

    /// Sets how the proxies speak to each listed service (unlisted ones: HTTP/1.1).
    pub fn with_protocols(
        mut self,
        protocols: impl IntoIterator<Item = (Arc<str>, Protocol)>,
    ) -> Self {
        self.protocols.extend(protocols);
        self
    }

    pub fn from_manifest(manifest: &Manifest) -> Self {
        Self::new(
            manifest
                .services
                .iter()
                .map(|s| (s.name.clone(), s.policy.clone())),
        )
        .with_protocols(
            manifest
                .services
                .iter()
                .map(|s| (s.name.clone(), s.protocol)),
        )
    }

    /// The policy of `service`; a version of a service (`orders@2`) has the service's policy.
    pub fn get(&self, service: &str) -> Arc<Policy> {
        self.by_service
            .get(service)
            .or_else(|| self.by_service.get(base_service(service)))
            .unwrap_or(&self.default)
            .clone()
    }

    /// How the proxies speak to `service`'s instances. A versioned target (`orders@1`, some of
    /// the service's instances) speaks as its service does.
    pub fn protocol(&self, service: &str) -> Protocol {
        let name = service.split_once('@').map_or(service, |(name, _)| name);
        self.protocols.get(name).copied().unwrap_or_default()
    }
}

/// The process-wide parts every stack shares. Cheap to clone.
#[derive(Clone, Default)]
pub struct Resilience {
    pub policies: Arc<Policies>,
    pub faults: Arc<FaultTable>,
    pub board: Arc<Board>,
    /// Where every stack reports spans and calls; none in tests that do not look.
    pub observer: Option<Arc<dyn crate::trace::Observer>>,
}

impl Resilience {
    pub fn new(policies: Policies) -> Self {
        Self {
            policies: Arc::new(policies),
            ..Self::default()
        }
    }
}

/// What became of a call that got an answer, as a response extension for the trace layer.
#[derive(Debug, Clone)]
pub struct Served {
    /// The instance that answered; `None` for a fallback.
    pub instance: Option<Arc<str>>,
    /// Tries made.
    pub attempts: u32,
    /// The caller's breaker for the callee afterwards.
    pub breaker: BreakerState,
}

/// A breaker changed state, or an instance was ejected or came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerEvent {
    pub caller: Arc<str>,
    pub service: Arc<str>,
    /// Set for an instance's outlier ejection; `None` for the service's breaker.
    pub instance: Option<Arc<str>>,
    pub from: BreakerState,
    pub to: BreakerState,
    pub reason: String,
}

impl std::fmt::Display for BreakerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.instance {
            None => write!(
                f,
                "circuit breaker {} → {}: {} -> {} ({})",
                self.caller, self.service, self.from, self.to, self.reason
            ),
            Some(instance) => write!(
                f,
                "outlier {} → {}: {} ({})",
                self.caller,
                instance,
                if self.to == BreakerState::Open {
                    "ejected"
                } else {
                    "returned"
                },
                self.reason
            ),
        }
    }
}

type Listener = Box<dyn Fn(&BreakerEvent) + Send + Sync>;

/// Every breaker of the process, for `GET /v1/breakers` and `flotilla status`, and where their
/// state changes are announced.
#[derive(Default)]
pub struct Board {
    callees: Mutex<Vec<Weak<Callee>>>,
    listener: OnceLock<Listener>,
}

impl Board {
    /// Calls `listener` on every state change from now on (once per process; a second call is
    /// ignored and returns false).
    pub fn on_change(&self, listener: impl Fn(&BreakerEvent) + Send + Sync + 'static) -> bool {
        self.listener.set(Box::new(listener)).is_ok()
    }

    pub(crate) fn enrol(&self, callee: &Arc<Callee>) {
        let mut callees = self.callees.lock().unwrap_or_else(|e| e.into_inner());
        callees.retain(|c| c.strong_count() > 0);
        callees.push(Arc::downgrade(callee));
    }

    pub(crate) fn announce(&self, event: BreakerEvent) {
        if event.to == BreakerState::Closed {
            tracing::info!("{event}");
        } else {
            tracing::warn!("{event}");
        }
        if let Some(listener) = self.listener.get() {
            listener(&event);
        }
    }

    /// Every breaker and every instance record, sorted by caller, service and instance.
    pub fn snapshot(&self) -> Vec<BreakerView> {
        let callees: Vec<Arc<Callee>> = {
            let callees = self.callees.lock().unwrap_or_else(|e| e.into_inner());
            callees.iter().filter_map(Weak::upgrade).collect()
        };
        let mut views: Vec<BreakerView> = callees.iter().flat_map(|c| c.views()).collect();
        views.sort_by(|a, b| {
            (&a.caller, &a.service, &a.instance).cmp(&(&b.caller, &b.service, &b.instance))
        });
        views
    }
}

/// One breaker as `GET /v1/breakers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerView {
    /// Who calls: `gateway` or a service instance's sidecar (`orders-1`).
    pub caller: String,
    /// The callee service.
    pub service: String,
    /// Set for an instance's outlier record (open means ejected); absent for the service's breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub state: BreakerState,
    /// Milliseconds in the current state.
    pub state_for_ms: u64,
    pub consecutive_failures: u32,
    /// Calls and failures in the breaker's sliding window (service breakers only).
    pub window_calls: u32,
    pub window_failures: u32,
    /// Calls to the service in flight now (service breakers only): the bulkhead's occupancy.
    #[serde(default)]
    pub in_flight: u32,
    /// How often it opened (or the instance was ejected).
    pub times_opened: u64,
    /// While open: milliseconds until probes are let through (or the instance returns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

/// Idempotent by RFC 9110: repeating them has the effect of doing them once.
pub(crate) fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_by_service_and_versioned_target() {
        let policies = Policies::new([]).with_protocols([
            (Arc::from("recommendations"), Protocol::Grpc),
            (Arc::from("orders"), Protocol::Http),
        ]);
        assert_eq!(policies.protocol("recommendations"), Protocol::Grpc);
        assert_eq!(policies.protocol("recommendations@2"), Protocol::Grpc);
        assert_eq!(policies.protocol("orders"), Protocol::Http);
        assert_eq!(policies.protocol("unlisted"), Protocol::Http);
    }
}
