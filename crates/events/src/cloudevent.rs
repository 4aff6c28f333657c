//! CloudEvents 1.0: the envelope every event travels in.
//!
//! Publishers may send structured mode (`application/cloudevents+json`, the whole event one JSON
//! object) or binary mode (attributes as `ce-*` headers, the body is `data`). Either way the
//! broker stores and delivers structured mode, so a record is self-describing on disk and on the
//! wire to subscribers. Attributes the publisher leaves out that Flotilla can fill are filled:
//! `id` (random), `source` (`/services/<publisher>`), `time` (now) and the `traceparent`
//! extension (the publishing request's trace), so a delivery joins the trace that caused it.

use std::time::SystemTime;

use bytes::Bytes;
use serde_json::{Map, Value};

/// The only version this speaks.
pub const SPEC_VERSION: &str = "1.0";
/// Structured mode's media type.
pub const STRUCTURED: &str = "application/cloudevents+json";

/// Attributes the specification defines; anything else is an extension.
const CONTEXT_ATTRIBUTES: [&str; 8] = [
    "id",
    "source",
    "specversion",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
];

/// Why a body is not an acceptable CloudEvent; each names what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the event is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("the body is not a CloudEvent in structured mode: {0}")]
    NotJson(String),
    #[error("the event has no `{0}`; CloudEvents 1.0 requires it")]
    Missing(&'static str),
    #[error("`specversion` is {0:?}; only \"1.0\" is supported")]
    Version(String),
    #[error("attribute `{name}` is invalid: {reason}")]
    Invalid { name: String, reason: String },
}

/// What Flotilla fills when the publisher did not say.
#[derive(Debug, Clone, Default)]
pub struct Defaults<'a> {
    /// The publishing service, for `source` = `/services/<name>`.
    pub publisher: Option<&'a str>,
    /// The publishing request's W3C `traceparent`.
    pub traceparent: Option<&'a str>,
}

/// A validated CloudEvent, kept as its structured-mode JSON plus the attributes routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub source: String,
    pub kind: String,
    pub subject: Option<String>,
    /// The `partitionkey` extension, else the subject: what keeps order.
    pub partition_key: Option<String>,
    pub traceparent: Option<String>,
    /// The whole event, structured mode.
    pub json: Bytes,
}

impl Event {
    /// A structured-mode body (`application/cloudevents+json`, or `application/json` holding one
    /// event object).
    pub fn from_structured(
        body: &[u8],
        defaults: &Defaults<'_>,
        limit: usize,
    ) -> Result<Self, EventError> {
        check_size(body.len(), limit)?;
        let value: Value =
            serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))?;
        let Value::Object(object) = value else {
            return Err(EventError::NotJson("expected one JSON object".into()));
        };
        Self::from_attributes(object, defaults, limit)
    }

    /// A binary-mode request: `ce-*` headers (names in any case), its content type and body.
    pub fn from_binary<'h>(
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        content_type: Option<&str>,
        body: &[u8],
        defaults: &Defaults<'_>,
        limit: usize,
    ) -> Result<Self, EventError> {
        check_size(body.len(), limit)?;
        let mut object = Map::new();
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            if let Some(attribute) = name.strip_prefix("ce-") {
                object.insert(attribute.to_owned(), Value::String(value.to_owned()));
            }
        }
        if let Some(content_type) = content_type {
            object.insert("datacontenttype".into(), content_type.into());
        }
        if !body.is_empty() {
            let is_json = content_type.is_none_or(|t| {
                let t = t.split(';').next().unwrap_or("").trim();
                t == "application/json" || t.ends_with("+json") || t == "text/json"
            });
            let data = match (is_json, serde_json::from_slice::<Value>(body)) {
                (true, Ok(value)) => ("data", value),
                (true, Err(e)) => {
                    return Err(EventError::Invalid {
                        name: "data".into(),
                        reason: format!("the content type says JSON but the body is not: {e}"),
                    });
                }
                (false, _) => match std::str::from_utf8(body) {
                    Ok(text) if content_type.is_some_and(|t| t.starts_with("text/")) => {
                        ("data", Value::String(text.to_owned()))
                    }
                    _ => ("data_base64", Value::String(base64(body))),
                },
            };
            object.insert(data.0.into(), data.1);
        }
        Self::from_attributes(object, defaults, limit)
    }

    /// A stored record's event, trusted to be valid (the broker stored it after validation).
    pub fn from_stored(json: Bytes) -> Result<Self, EventError> {
        let value: Value =
            serde_json::from_slice(&json).map_err(|e| EventError::NotJson(e.to_string()))?;
        let Value::Object(object) = value else {
            return Err(EventError::NotJson("expected one JSON object".into()));
        };
        let text = |name: &str| object.get(name).and_then(Value::as_str).map(str::to_owned);
        Ok(Self {
            id: text("id").ok_or(EventError::Missing("id"))?,
            source: text("source").ok_or(EventError::Missing("source"))?,
            kind: text("type").ok_or(EventError::Missing("type"))?,
            subject: text("subject"),
            partition_key: text("partitionkey").or_else(|| text("subject")),
            traceparent: text("traceparent"),
            json,
        })
    }

    fn from_attributes(
        mut object: Map<String, Value>,
        defaults: &Defaults<'_>,
        limit: usize,
    ) -> Result<Self, EventError> {
        match object.get("specversion") {
            None => return Err(EventError::Missing("specversion")),
            Some(Value::String(v)) if v == SPEC_VERSION => {}
            Some(other) => {
                return Err(EventError::Version(match other {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                }));
            }
        }
        let kind = required_text(&object, "type")?.ok_or(EventError::Missing("type"))?;
        for name in [
            "id",
            "source",
            "subject",
            "datacontenttype",
            "dataschema",
            "time",
        ] {
            required_text(&object, name)?;
        }
        if let Some(Value::String(time)) = object.get("time")
            && humantime::parse_rfc3339_weak(time).is_err()
        {
            return Err(EventError::Invalid {
                name: "time".into(),
                reason: format!("{time:?} is not an RFC 3339 timestamp"),
            });
        }
        if object.contains_key("data") && object.contains_key("data_base64") {
            return Err(EventError::Invalid {
                name: "data_base64".into(),
                reason: "an event carries `data` or `data_base64`, not both".into(),
            });
        }
        for (name, value) in &object {
            if CONTEXT_ATTRIBUTES.contains(&name.as_str())
                || name == "data"
                || name == "data_base64"
            {
                continue;
            }
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            {
                return Err(EventError::Invalid {
                    name: name.clone(),
                    reason: "extension names are lower-case letters and digits only".into(),
                });
            }
            if matches!(value, Value::Object(_) | Value::Array(_) | Value::Null) {
                return Err(EventError::Invalid {
                    name: name.clone(),
                    reason: "an extension is a string, number or boolean".into(),
                });
            }
        }

        if !object.contains_key("id") {
            object.insert("id".into(), Value::String(random_id()));
        }
        if !object.contains_key("source") {
            let source = match defaults.publisher {
                Some(publisher) => format!("/services/{publisher}"),
                None => "/flotilla".to_owned(),
            };
            object.insert("source".into(), Value::String(source));
        }
        if !object.contains_key("time") {
            let now = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
            object.insert("time".into(), Value::String(now));
        }
        if !object.contains_key("traceparent")
            && let Some(traceparent) = defaults.traceparent
        {
            object.insert("traceparent".into(), Value::String(traceparent.to_owned()));
        }
        let text = |name: &str| object.get(name).and_then(Value::as_str).map(str::to_owned);
        let id = text("id").unwrap_or_default();
        let source = text("source").unwrap_or_default();
        let subject = text("subject");
        let partition_key = text("partitionkey").or_else(|| subject.clone());
        let traceparent = text("traceparent");
        let json = serde_json::to_vec(&Value::Object(object))
            .map_err(|e| EventError::NotJson(e.to_string()))?;
        // Filling attributes can push an event just under the limit over it.
        check_size(json.len(), limit)?;
        Ok(Self {
            id,
            source,
            kind,
            subject,
            partition_key,
            traceparent,
            json: Bytes::from(json),
        })
    }

    /// The event with extra extension attributes (for dead letters: why and after how many
    /// attempts), as structured JSON.
    pub fn with_extensions(&self, extensions: &[(&str, Value)]) -> Bytes {
        match serde_json::from_slice::<Value>(&self.json) {
            Ok(Value::Object(mut object)) => {
                for (name, value) in extensions {
                    object.insert((*name).to_owned(), value.clone());
                }
                serde_json::to_vec(&Value::Object(object))
                    .map(Bytes::from)
                    .unwrap_or_else(|_| self.json.clone())
            }
            _ => self.json.clone(),
        }
    }
}

fn check_size(size: usize, limit: usize) -> Result<(), EventError> {
    if size > limit {
        Err(EventError::TooLarge { size, limit })
    } else {
        Ok(())
    }
}

/// A string attribute's value if present; an error if present but not a non-empty string.
fn required_text(object: &Map<String, Value>, name: &str) -> Result<Option<String>, EventError> {
    match object.get(name) {
        None => Ok(None),
        Some(Value::String(text)) if !text.is_empty() => Ok(Some(text.clone())),
        Some(_) => Err(EventError::Invalid {
            name: name.into(),
            reason: "expected a non-empty string".into(),
        }),
    }
}

/// 128 random bits as 32 hex digits: unique without coordination.
fn random_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    fn defaults() -> Defaults<'static> {
        Defaults {
            publisher: Some("orders"),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        }
    }

    #[test]
    fn structured_events_get_their_missing_attributes_filled() {
        let event = Event::from_structured(
            br#"{"specversion":"1.0","type":"order.placed","subject":"ord_1","data":{"total":12}}"#,
            &defaults(),
            LIMIT,
        )
        .expect("valid");
        assert_eq!(event.kind, "order.placed");
        assert_eq!(event.source, "/services/orders");
        assert_eq!(event.id.len(), 32);
        assert_eq!(event.partition_key.as_deref(), Some("ord_1"));
        let stored: Value = serde_json::from_slice(&event.json).expect("json");
        assert_eq!(stored["data"]["total"], 12);
        assert_eq!(
            stored["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert!(humantime::parse_rfc3339_weak(stored["time"].as_str().expect("time")).is_ok());
        assert_eq!(
            Event::from_stored(event.json.clone()).expect("stored"),
            event
        );
    }

    #[test]
    fn what_the_publisher_set_is_kept() {
        let event = Event::from_structured(
            br#"{"specversion":"1.0","type":"t","id":"e-1","source":"/mine","partitionkey":"k","subject":"s","time":"2026-01-01T00:00:00Z"}"#,
            &defaults(),
            LIMIT,
        )
        .expect("valid");
        assert_eq!((event.id.as_str(), event.source.as_str()), ("e-1", "/mine"));
        assert_eq!(event.partition_key.as_deref(), Some("k"));
    }

    #[test]
    fn binary_mode_becomes_structured() {
        let headers = [
            ("Ce-Specversion", "1.0"),
            ("ce-type", "order.cancelled"),
            ("ce-subject", "ord_2"),
            ("ce-partitionkey", "customer-9"),
            ("content-length", "11"),
        ];
        let event = Event::from_binary(
            headers,
            Some("application/json"),
            br#"{"why":"x"}"#,
            &defaults(),
            LIMIT,
        )
        .expect("valid");
        let stored: Value = serde_json::from_slice(&event.json).expect("json");
        assert_eq!(stored["type"], "order.cancelled");
        assert_eq!(stored["data"]["why"], "x");
        assert_eq!(stored["datacontenttype"], "application/json");
        assert!(
            stored.get("length").is_none(),
            "only ce-* headers are attributes"
        );
        assert_eq!(event.partition_key.as_deref(), Some("customer-9"));

        let binary = Event::from_binary(
            [("ce-specversion", "1.0"), ("ce-type", "blob")],
            Some("application/octet-stream"),
            &[0, 1, 2, 250],
            &defaults(),
            LIMIT,
        )
        .expect("valid");
        let stored: Value = serde_json::from_slice(&binary.json).expect("json");
        assert_eq!(stored["data_base64"], "AAEC+g==");
    }

    #[test]
    fn bad_events_say_what_is_wrong() {
        let cases: [(&[u8], EventError); 7] = [
            (b"not json", EventError::NotJson(String::new())),
            (b"[1]", EventError::NotJson(String::new())),
            (br#"{"type":"t"}"#, EventError::Missing("specversion")),
            (br#"{"specversion":"1.0"}"#, EventError::Missing("type")),
            (
                br#"{"specversion":"0.3","type":"t"}"#,
                EventError::Version("0.3".into()),
            ),
            (
                br#"{"specversion":"1.0","type":"t","time":"yesterday"}"#,
                EventError::Invalid {
                    name: "time".into(),
                    reason: String::new(),
                },
            ),
            (
                br#"{"specversion":"1.0","type":"t","Bad-Name":"x"}"#,
                EventError::Invalid {
                    name: "Bad-Name".into(),
                    reason: String::new(),
                },
            ),
        ];
        for (body, want) in cases {
            let got = Event::from_structured(body, &defaults(), LIMIT).expect_err("invalid");
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{}: {got}",
                String::from_utf8_lossy(body)
            );
        }
        let big = format!(
            r#"{{"specversion":"1.0","type":"t","data":"{}"}}"#,
            "x".repeat(2000)
        );
        assert_eq!(
            Event::from_structured(big.as_bytes(), &defaults(), 1000),
            Err(EventError::TooLarge {
                size: big.len(),
                limit: 1000
            })
        );
    }
}
