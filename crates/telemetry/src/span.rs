//! Spans: the unit of a trace, as the proxy records them and as OTLP senders describe them.
//!
//! Ids follow W3C Trace Context (16-byte trace id, 8-byte span id, lower-case hex on the wire).
//! The HTTP attributes the proxy knows for every hop are plain fields, so recording a span on the
//! request path costs no map of strings; anything else (spans that services export themselves)
//! goes in `attributes`.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// A W3C trace id: 16 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TraceId(pub [u8; 16]);

/// Trace ids are mostly random, but not all of them: 64-bit ids (Jaeger, Zipkin, B3) arrive
/// zero-padded in the high half, and a service may send any id it likes over OTLP. So both halves
/// count, folded through one keyed 64×64→128-bit multiply: far cheaper than SipHash on every span
/// recorded, and without a per-process key no sender can aim many ids at one bucket.
impl std::hash::Hash for TraceId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (high, low) = self.0.split_at(8);
        let word = |half: &[u8]| {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(half);
            u64::from_ne_bytes(bytes)
        };
        let (key_high, key_low) = hash_keys();
        let product = u128::from(word(high) ^ key_high) * u128::from(word(low) ^ key_low);
        state.write_u64((product as u64) ^ ((product >> 64) as u64));
    }
}

/// Drawn once per process.
fn hash_keys() -> (u64, u64) {
    static KEYS: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    *KEYS.get_or_init(|| (fastrand::u64(..), fastrand::u64(..)))
}

/// A hasher for maps keyed by ids that are random already: it passes the id's bits through.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// Builds [`IdHasher`]s.
pub type IdHash = std::hash::BuildHasherDefault<IdHasher>;

/// A W3C span id: 8 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub fn random() -> Self {
        loop {
            let id = fastrand::u128(..).to_be_bytes();
            if id != [0; 16] {
                return Self(id);
            }
        }
    }

    /// Parses 32 lower- or upper-case hex digits; `None` for anything else or all zeros.
    pub fn parse(hex: &str) -> Option<Self> {
        let mut id = [0; 16];
        decode_hex(hex, &mut id)?;
        (id != [0; 16]).then_some(Self(id))
    }
}

impl SpanId {
    pub fn random() -> Self {
        loop {
            let id = fastrand::u64(..).to_be_bytes();
            if id != [0; 8] {
                return Self(id);
            }
        }
    }

    pub fn parse(hex: &str) -> Option<Self> {
        let mut id = [0; 8];
        decode_hex(hex, &mut id)?;
        (id != [0; 8]).then_some(Self(id))
    }
}

fn decode_hex(hex: &str, out: &mut [u8]) -> Option<()> {
    let bytes = hex.as_bytes();
    if bytes.len() != out.len() * 2 {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

macro_rules! hex_id {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<str>::deserialize(d)?;
                $name::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(concat!("not a valid ", stringify!($name)))
                })
            }
        }
    };
}
hex_id!(TraceId);
hex_id!(SpanId);

/// OpenTelemetry's span kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpanKind {
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

/// OpenTelemetry's span status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpanStatus {
    Unset,
    Ok,
    Error,
}

/// A span attribute's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttributeValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// What the proxy knows about one HTTP hop; every field is optional for spans from elsewhere.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpHop {
    /// `http.request.method`
    pub method: Option<http_method::Method>,
    /// `url.path`
    pub path: Option<String>,
    /// `http.response.status_code`
    pub status: Option<u16>,
    /// `peer.service`: the other side of the hop (the callee for a client span, the caller for a
    /// server span).
    pub peer_service: Option<Arc<str>>,
    /// `flotilla.retry.attempts`: tries the call took.
    pub attempts: Option<u32>,
    /// `flotilla.breaker.state` of the caller's breaker for the callee after the call.
    pub breaker: Option<std::borrow::Cow<'static, str>>,
}

/// Methods as text without pulling in the `http` crate here.
pub mod http_method {
    /// An HTTP method name (`GET`, `POST`, …).
    pub type Method = std::borrow::Cow<'static, str>;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// The service the span belongs to (`gateway` for the gateway's own).
    pub service: Arc<str>,
    /// The instance, when known (`orders-2`).
    pub instance: Option<Arc<str>>,
    /// As OpenTelemetry names HTTP spans: the method (`GET`), the route when known.
    pub name: std::borrow::Cow<'static, str>,
    pub kind: SpanKind,
    #[serde(with = "crate::wire::rfc3339")]
    pub start: SystemTime,
    #[serde(with = "crate::wire::micros")]
    pub duration: Duration,
    pub status: SpanStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    #[serde(default)]
    pub http: HttpHop,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<(String, AttributeValue)>,
}

impl Span {
    pub fn end(&self) -> SystemTime {
        self.start + self.duration
    }

    /// The name with what makes an HTTP hop recognisable, since OpenTelemetry names those by
    /// method alone: `GET /products` at the server, `GET catalog` at the client.
    pub fn title(&self) -> std::borrow::Cow<'_, str> {
        let extra = match self.kind {
            SpanKind::Server => self.http.path.as_deref(),
            SpanKind::Client => self.http.peer_service.as_deref(),
            _ => None,
        };
        match extra {
            Some(extra) if !self.name.contains(' ') => format!("{} {extra}", self.name).into(),
            _ => std::borrow::Cow::Borrowed(&self.name),
        }
    }

    /// Marked as an error, or answered with a server error: what the fleet should look at.
    pub fn is_error(&self) -> bool {
        self.status == SpanStatus::Error || self.http.status.is_some_and(|status| status >= 500)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_lower_case_hex() {
        let trace = TraceId::parse("4BF92F3577B34DA6A3CE929D0E0E4736").expect("trace id");
        assert_eq!(trace.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let span = SpanId::parse("00f067aa0ba902b7").expect("span id");
        assert_eq!(span.to_string(), "00f067aa0ba902b7");
        assert_eq!(
            TraceId::parse(&"0".repeat(32)),
            None,
            "all zeros is invalid"
        );
        assert_eq!(SpanId::parse("00f067aa0ba902b"), None);
        assert_eq!(SpanId::parse("00f067aa0ba902bz"), None);
        assert_ne!(TraceId::random(), TraceId::random());
    }

    #[test]
    fn padded_64_bit_trace_ids_spread_over_buckets() {
        use std::hash::BuildHasher;
        let hashes: std::collections::HashSet<u64> = (1..=10_000u64)
            .map(|n| {
                let mut id = [0; 16];
                id[8..].copy_from_slice(&n.to_be_bytes());
                IdHash::default().hash_one(TraceId(id))
            })
            .collect();
        assert_eq!(
            hashes.len(),
            10_000,
            "ids differing only in the low half collide"
        );
    }
}
