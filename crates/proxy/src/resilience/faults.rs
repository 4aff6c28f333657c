//! Fault injection (chaos): delays and aborts for calls to one service, set at run time.
//!
//! Faults belong to the callee, not to a caller: every stack of the process consults one
//! [`FaultTable`], so the gateway and every sidecar see the same misbehaving service, as they
//! would if the service itself were slow or failing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest delay that may be injected: long enough for any timeout experiment, short enough
/// that a typo cannot park calls for a day.
pub const MAX_FAULT_DELAY: Duration = Duration::from_secs(3600);

/// What to do to calls to one service. The wire form of `PUT /v1/services/{name}/faults`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Hold a call this long before sending it (`"300ms"`, `"5s"`).
    #[serde(
        default,
        with = "duration_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub delay: Option<Duration>,
    /// Share of calls delayed, 0–100. Default 100.
    #[serde(default = "all")]
    pub delay_percent: u32,
    /// Answer with this status instead of calling the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<u16>,
    /// Share of calls aborted, 0–100. Default 100.
    #[serde(default = "all")]
    pub abort_percent: u32,
}

fn all() -> u32 {
    100
}

/// What injecting faults into one call decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Injection {
    pub delay: Option<Duration>,
    pub abort: Option<http::StatusCode>,
}

impl Faults {
    /// Checks the values a client sent; the error says which one is wrong and why.
    pub fn validate(&self) -> Result<(), String> {
        if self.delay.is_none() && self.abort.is_none() {
            return Err("give a `delay`, an `abort` status, or both".into());
        }
        if self.delay_percent > 100 || self.abort_percent > 100 {
            return Err("`delay_percent` and `abort_percent` are percentages: 0 to 100".into());
        }
        if let Some(delay) = self.delay {
            if delay > MAX_FAULT_DELAY {
                return Err(format!(
                    "`delay` may be at most {}",
                    humantime::format_duration(MAX_FAULT_DELAY)
                ));
            }
        }
        if let Some(status) = self.abort {
            if !(400..=599).contains(&status) {
                return Err(format!(
                    "`abort` must be an error status from 400 to 599, not {status}"
                ));
            }
        }
        Ok(())
    }

    /// Rolls the dice for one call.
    pub fn roll(&self) -> Injection {
        let hit = |percent: u32| percent >= 100 || (percent > 0 && fastrand::u32(0..100) < percent);
        Injection {
            delay: self.delay.filter(|_| hit(self.delay_percent)),
            abort: self
                .abort
                .filter(|_| hit(self.abort_percent))
                .and_then(|status| http::StatusCode::from_u16(status).ok()),
        }
    }
}

/// The faults in force, by service. Reads are the hot path (every call checks), writes are rare.
#[derive(Debug, Default)]
pub struct FaultTable {
    by_service: RwLock<HashMap<Arc<str>, Arc<Faults>>>,
}

impl FaultTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the faults of `service`. The caller has checked that the service exists and
    /// that `faults` passed [`Faults::validate`].
    pub fn set(&self, service: &str, faults: Faults) {
        tracing::warn!(service, ?faults, "fault injection set");
        self.write().insert(Arc::from(service), Arc::new(faults));
    }

    /// Removes the faults of `service`; false when there were none.
    pub fn clear(&self, service: &str) -> bool {
        let removed = self.write().remove(service).is_some();
        if removed {
            tracing::warn!(service, "fault injection cleared");
        }
        removed
    }

    /// Replaces the whole table, e.g. with the control plane's view in a separate sidecar.
    pub fn replace(&self, all: impl IntoIterator<Item = (Arc<str>, Faults)>) {
        let fresh = all.into_iter().map(|(s, f)| (s, Arc::new(f))).collect();
        *self.write() = fresh;
    }

    pub fn get(&self, service: &str) -> Option<Arc<Faults>> {
        let table = self.by_service.read().unwrap_or_else(|e| e.into_inner());
        if table.is_empty() {
            return None;
        }
        table
            .get(service)
            .or_else(|| table.get(super::base_service(service)))
            .cloned()
    }

    /// Every service with faults, sorted by name.
    pub fn all(&self) -> Vec<(Arc<str>, Faults)> {
        let table = self.by_service.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = table
            .iter()
            .map(|(s, f)| (s.clone(), Faults::clone(f)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Arc<str>, Arc<Faults>>> {
        // Entries are inserted and removed whole, so a poisoned table is still consistent.
        self.by_service.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Durations on the wire as text (`"300ms"`), like everywhere else in Flotilla.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        flotilla_manifest::parse_duration(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("invalid delay {text:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_round_trips_and_defaults_to_every_call() {
        let faults: Faults =
            serde_json::from_str(r#"{"delay":"300ms","abort":503,"abort_percent":20}"#)
                .expect("parse");
        assert_eq!(faults.delay, Some(Duration::from_millis(300)));
        assert_eq!(faults.delay_percent, 100);
        assert_eq!(faults.abort_percent, 20);
        assert!(faults.validate().is_ok());
        let text = serde_json::to_string(&faults).expect("serialize");
        assert_eq!(
            serde_json::from_str::<Faults>(&text).expect("again"),
            faults
        );
    }

    #[test]
    fn bad_faults_are_explained() {
        let parse = |s: &str| serde_json::from_str::<Faults>(s);
        assert!(parse(r#"{"delay":"soon"}"#).is_err());
        assert!(parse(r#"{"dealy":"1s"}"#).is_err());
        let none = parse("{}").expect("parse");
        assert!(none.validate().unwrap_err().contains("delay"));
        let percent = parse(r#"{"abort":503,"abort_percent":120}"#).expect("parse");
        assert!(percent.validate().unwrap_err().contains("0 to 100"));
        let status = parse(r#"{"abort":200}"#).expect("parse");
        assert!(status.validate().unwrap_err().contains("400 to 599"));
    }

    #[test]
    fn percentages_decide_how_often() {
        let faults = Faults {
            delay: Some(Duration::from_millis(1)),
            delay_percent: 0,
            abort: Some(503),
            abort_percent: 100,
        };
        for _ in 0..100 {
            let roll = faults.roll();
            assert_eq!(roll.delay, None);
            assert_eq!(roll.abort, Some(http::StatusCode::SERVICE_UNAVAILABLE));
        }
        let half = Faults {
            abort_percent: 50,
            ..faults
        };
        let aborted = (0..10_000).filter(|_| half.roll().abort.is_some()).count();
        assert!((4000..6000).contains(&aborted), "{aborted}");
    }

    #[test]
    fn table_sets_clears_and_lists() {
        let table = FaultTable::new();
        assert!(table.get("payments").is_none());
        let faults = Faults {
            delay: Some(Duration::from_secs(5)),
            delay_percent: 100,
            abort: None,
            abort_percent: 100,
        };
        table.set("payments", faults.clone());
        assert_eq!(table.get("payments").as_deref(), Some(&faults));
        assert_eq!(table.all().len(), 1);
        assert!(table.clear("payments"));
        assert!(!table.clear("payments"));
        assert!(table.all().is_empty());
    }
}
