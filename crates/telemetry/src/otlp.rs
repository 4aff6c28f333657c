//! OTLP: the OpenTelemetry protocol in and out.
//!
//! - **In.** [`decode_traces`] and [`decode_logs`] turn the body of an OTLP/HTTP export request
//!   (protobuf or JSON, see [`Encoding`]) into [`Span`]s and [`LogRecord`]s, and
//!   [`encode_success`] / [`encode_failure`] write the answer a receiver owes its client. A
//!   request with anything malformed in it is rejected whole, so nothing half-valid is stored.
//! - **Out.** [`encode_traces`] and [`encode_logs`] write protobuf export requests, and
//!   [`OtlpExporter`] ships spans and logs to a collector from a background task without ever
//!   making the caller wait.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::logs::v1 as proto_logs;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1 as proto_trace;
use prost::Message;
use tokio::sync::mpsc;

use crate::level::Level;
use crate::logs::{LogRecord, Stream};
use crate::span::{AttributeValue, HttpHop, Span, SpanId, SpanKind, SpanStatus, TraceId};

/// Attributes kept per decoded span besides the HTTP ones, which have fields of their own.
///
/// With [`MAX_TEXT`] this keeps any one span small whatever a sender puts in it: the store
/// budgets memory by span count, so a span must not be able to weigh megabytes.
pub const MAX_ATTRIBUTES: usize = 128;

/// Longest text kept in a decoded span (name, status message, attribute key or value) and in a
/// service or instance name, in bytes; longer text is cut and ends in `…`.
pub const MAX_TEXT: usize = 4 * 1024;

/// Longest decoded log line, in bytes: the limit the supervisor applies to captured output.
pub const MAX_LINE: usize = 64 * 1024;

/// How an OTLP/HTTP body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Binary protobuf, `application/x-protobuf`.
    Protobuf,
    /// OTLP/JSON, `application/json`: the protobuf JSON mapping with hex trace and span ids.
    Json,
}

impl Encoding {
    /// The encoding a `Content-Type` names, ignoring case and parameters (`; charset=utf-8`);
    /// `None` for anything OTLP/HTTP does not define.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if essence.eq_ignore_ascii_case("application/x-protobuf")
            || essence.eq_ignore_ascii_case("application/protobuf")
        {
            Some(Encoding::Protobuf)
        } else if essence.eq_ignore_ascii_case("application/json") {
            Some(Encoding::Json)
        } else {
            None
        }
    }

    /// The `Content-Type` to send a body in this encoding with.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// The kinds of telemetry OTLP carries that Flotilla speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Logs,
}

impl Signal {
    /// The OTLP/HTTP path the signal is posted to: `/v1/traces` or `/v1/logs`.
    pub fn path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Logs => "/v1/logs",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Signal::Traces => "spans",
            Signal::Logs => "log records",
        }
    }
}

/// Why an OTLP body, endpoint or configuration was refused; the message says what is wrong and,
/// for a body, where (`resourceSpans[0].scopeSpans[1].spans[3]: traceId must be 16 bytes, got 3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpError {
    message: String,
}

impl OtlpError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message, as [`Display`](fmt::Display) writes it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for OtlpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OtlpError {}

/// Where in a request an item sits, named by the OTLP/JSON field names so a sender can find it
/// whichever encoding it used. Only formatted when something is wrong.
struct Place {
    signal: Signal,
    resource: usize,
    scope: usize,
    item: usize,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Place {
            resource,
            scope,
            item,
            ..
        } = self;
        match self.signal {
            Signal::Traces => {
                write!(
                    f,
                    "resourceSpans[{resource}].scopeSpans[{scope}].spans[{item}]"
                )
            }
            Signal::Logs => write!(
                f,
                "resourceLogs[{resource}].scopeLogs[{scope}].logRecords[{item}]"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// In
// ---------------------------------------------------------------------------------------------

/// The spans of an OTLP `ExportTraceServiceRequest`.
///
/// Each span takes its service from the resource's `service.name` (`unknown_service` without
/// one, as the OpenTelemetry spec says) and its instance from `service.instance.id`. The HTTP
/// attributes the proxy records itself, under their current or legacy semantic-convention names,
/// fill [`HttpHop`]; up to [`MAX_ATTRIBUTES`] others are kept, arrays, maps and bytes as JSON
/// text. Trace and span ids must be valid (16 and 8 bytes, not all zero), the parent empty or 8
/// bytes, and the end no earlier than the start: any violation rejects the whole request.
pub fn decode_traces(body: &[u8], encoding: Encoding) -> Result<Vec<Span>, OtlpError> {
    let request: ExportTraceServiceRequest = match encoding {
        Encoding::Protobuf => ExportTraceServiceRequest::decode(body).map_err(|e| {
            OtlpError::new(format!(
                "body is not a protobuf ExportTraceServiceRequest: {e}"
            ))
        })?,
        Encoding::Json => from_json(body, "ExportTraceServiceRequest")?,
    };
    let total = request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    let mut spans = Vec::with_capacity(total);
    for (r, resource_spans) in request.resource_spans.into_iter().enumerate() {
        let origin = Origin::of(resource_spans.resource.as_ref());
        for (s, scope_spans) in resource_spans.scope_spans.into_iter().enumerate() {
            for (i, span) in scope_spans.spans.into_iter().enumerate() {
                let span = span_from_proto(span, &origin).map_err(|what| {
                    let place = Place {
                        signal: Signal::Traces,
                        resource: r,
                        scope: s,
                        item: i,
                    };
                    OtlpError::new(format!("{place}: {what}"))
                })?;
                spans.push(span);
            }
        }
    }
    Ok(spans)
}

/// The log records of an OTLP `ExportLogsServiceRequest`, as lines on stdout (stderr when the
/// record's `log.iostream` attribute says so).
///
/// Service and instance come from the resource (`service.name`, `service.instance.id`, the
/// instance falling back to the service). The time is the record's time, else its observed time,
/// else now; the line is the body, text as is and anything else as JSON text, cut at
/// [`MAX_LINE`]; the level comes from the severity number, else from the severity text. A trace
/// id must be empty or 16 bytes, or the whole request is rejected.
pub fn decode_logs(body: &[u8], encoding: Encoding) -> Result<Vec<LogRecord>, OtlpError> {
    let request: ExportLogsServiceRequest = match encoding {
        Encoding::Protobuf => ExportLogsServiceRequest::decode(body).map_err(|e| {
            OtlpError::new(format!(
                "body is not a protobuf ExportLogsServiceRequest: {e}"
            ))
        })?,
        Encoding::Json => from_json(body, "ExportLogsServiceRequest")?,
    };
    let total = request
        .resource_logs
        .iter()
        .flat_map(|r| &r.scope_logs)
        .map(|s| s.log_records.len())
        .sum();
    let mut records = Vec::with_capacity(total);
    let now = SystemTime::now();
    for (r, resource_logs) in request.resource_logs.into_iter().enumerate() {
        let origin = Origin::of(resource_logs.resource.as_ref());
        let instance = origin
            .instance
            .clone()
            .unwrap_or_else(|| origin.service.clone());
        for (s, scope_logs) in resource_logs.scope_logs.into_iter().enumerate() {
            for (i, record) in scope_logs.log_records.into_iter().enumerate() {
                let record = log_from_proto(record, &origin, &instance, now).map_err(|what| {
                    let place = Place {
                        signal: Signal::Logs,
                        resource: r,
                        scope: s,
                        item: i,
                    };
                    OtlpError::new(format!("{place}: {what}"))
                })?;
                records.push(record);
            }
        }
    }
    Ok(records)
}

/// Parses OTLP/JSON, first strictly with opentelemetry-proto's serde, then, only if that fails,
/// again after [`relax`] has rewritten what the protobuf JSON mapping allows and that serde
/// refuses. Conforming bodies (all that OpenTelemetry SDKs send) pay for one parse only.
fn from_json<T: serde::de::DeserializeOwned>(body: &[u8], message: &str) -> Result<T, OtlpError> {
    let strict = match serde_json::from_slice(body) {
        Ok(request) => return Ok(request),
        Err(e) => e,
    };
    if !strict.is_data() {
        return Err(OtlpError::new(format!("body is not valid JSON: {strict}")));
    }
    let refused =
        |e: &dyn fmt::Display| OtlpError::new(format!("body is not an OTLP/JSON {message}: {e}"));
    let mut value: serde_json::Value = serde_json::from_slice(body).map_err(|e| refused(&e))?;
    if !relax(&mut value) {
        // Nothing to forgive: the strict error stands, with its line and column.
        return Err(refused(&strict));
    }
    // What is still wrong after relaxing, which may not be what the strict parse tripped on.
    serde_json::from_value(value).map_err(|e| refused(&e))
}

/// Rewrites, in place, what the protobuf JSON mapping allows but opentelemetry-proto 0.33's serde
/// rejects; says whether it changed anything:
///
/// - `null` for any field (the mapping reads it as the field's default);
/// - `arrayValue` / `kvlistValue` without `values` (an absent repeated field is empty);
/// - `doubleValue` as a string: a number in quotes becomes the number, and `"NaN"`,
///   `"Infinity"` and `"-Infinity"`, which a JSON tree cannot hold as numbers, become text values;
/// - URL-safe or unpadded base64 in `bytesValue`;
/// - enums by name (`"SPAN_KIND_SERVER"`) and 32-bit integers in quotes. OTLP asks senders for
///   plain integers, but the mapping has receivers accept both.
///
/// Object keys in an OTLP request are always field names (attribute keys are values of `key`),
/// so rewriting by key cannot touch a sender's data. Depth is bounded by serde_json's recursion
/// limit on the parse that built the tree.
fn relax(value: &mut serde_json::Value) -> bool {
    use serde_json::Value as J;
    let mut changed = false;
    match value {
        J::Object(fields) => {
            let before = fields.len();
            fields.retain(|_, field| !field.is_null());
            changed |= fields.len() != before;
            if let Some(J::String(text)) = fields.get("doubleValue") {
                if let Some(number) = text.parse().ok().and_then(serde_json::Number::from_f64) {
                    fields.insert("doubleValue".into(), J::Number(number));
                    changed = true;
                } else if matches!(text.as_str(), "NaN" | "Infinity" | "-Infinity") {
                    if let Some(text) = fields.remove("doubleValue") {
                        fields.insert("stringValue".into(), text);
                    }
                    changed = true;
                }
            }
            for (key, field) in fields.iter_mut() {
                changed |= match (key.as_str(), &mut *field) {
                    ("arrayValue" | "kvlistValue", J::Object(list))
                        if !list.contains_key("values") =>
                    {
                        list.insert("values".into(), J::Array(Vec::new()));
                        true
                    }
                    ("bytesValue", J::String(text)) => standard_base64(text),
                    (
                        "kind"
                        | "code"
                        | "severityNumber"
                        | "flags"
                        | "droppedAttributesCount"
                        | "droppedEventsCount"
                        | "droppedLinksCount",
                        J::String(text),
                    ) => match enum_number(text) {
                        Some(number) => {
                            *field = J::from(number);
                            true
                        }
                        None => false,
                    },
                    _ => false,
                };
                changed |= relax(field);
            }
        }
        J::Array(items) => {
            for item in items {
                changed |= relax(item);
            }
        }
        _ => {}
    }
    changed
}

/// An enum value given by name, or an integer given as text.
fn enum_number(text: &str) -> Option<i64> {
    if let Ok(number) = text.trim().parse::<i64>() {
        return Some(number);
    }
    let value = proto_trace::span::SpanKind::from_str_name(text)
        .map(|kind| kind as i32)
        .or_else(|| proto_trace::status::StatusCode::from_str_name(text).map(|code| code as i32))
        .or_else(|| proto_logs::SeverityNumber::from_str_name(text).map(|n| n as i32))?;
    Some(i64::from(value))
}

/// Turns URL-safe or unpadded base64 into the padded standard alphabet; says whether it did.
fn standard_base64(text: &mut String) -> bool {
    let unpadded = text.len() % 4 != 0;
    if !unpadded && !text.contains(['-', '_']) {
        return false;
    }
    *text = text.replace('-', "+").replace('_', "/");
    while text.len() % 4 != 0 {
        text.push('=');
    }
    true
}

/// Who sent the items of one resource.
struct Origin {
    service: Arc<str>,
    instance: Option<Arc<str>>,
    version: Option<Arc<str>>,
}

impl Origin {
    fn of(resource: Option<&Resource>) -> Self {
        let text = |key: &str| {
            resource
                .into_iter()
                .flat_map(|r| &r.attributes)
                .filter(|attribute| attribute.key == key)
                .find_map(
                    |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(text) if !text.is_empty() => {
                            Some(Arc::<str>::from(prefix(text, MAX_TEXT)))
                        }
                        _ => None,
                    },
                )
        };
        Self {
            service: text("service.name").unwrap_or_else(|| Arc::from("unknown_service")),
            instance: text("service.instance.id"),
            version: text("service.version"),
        }
    }
}

fn span_from_proto(span: proto_trace::Span, origin: &Origin) -> Result<Span, String> {
    let trace_id = TraceId(id("traceId", &span.trace_id)?);
    let span_id = SpanId(id("spanId", &span.span_id)?);
    let parent_span_id = match span.parent_span_id.as_slice() {
        [] => None,
        // All zeros is no span: some senders write it for a root rather than leaving it empty.
        bytes if bytes.iter().all(|&b| b == 0) && bytes.len() == 8 => None,
        bytes => Some(SpanId(id("parentSpanId", bytes)?)),
    };
    let (start_nanos, end_nanos) = (span.start_time_unix_nano, span.end_time_unix_nano);
    if start_nanos == 0 {
        return Err("startTimeUnixNano is missing".into());
    }
    if end_nanos == 0 {
        return Err("endTimeUnixNano is missing".into());
    }
    let duration = end_nanos.checked_sub(start_nanos).ok_or_else(|| {
        format!("endTimeUnixNano {end_nanos} is before startTimeUnixNano {start_nanos}")
    })?;
    let start = time_of(start_nanos).ok_or("startTimeUnixNano is out of range")?;
    use proto_trace::span::SpanKind as Kind;
    let kind = match Kind::try_from(span.kind) {
        Ok(Kind::Server) => SpanKind::Server,
        Ok(Kind::Client) => SpanKind::Client,
        Ok(Kind::Producer) => SpanKind::Producer,
        Ok(Kind::Consumer) => SpanKind::Consumer,
        // Unspecified, internal, or a kind newer than this code: the neutral choice.
        Ok(Kind::Internal | Kind::Unspecified) | Err(_) => SpanKind::Internal,
    };
    let (status, status_message) = match span.status {
        None => (SpanStatus::Unset, None),
        Some(status) => {
            use proto_trace::status::StatusCode as Code;
            let code = match Code::try_from(status.code) {
                Ok(Code::Ok) => SpanStatus::Ok,
                Ok(Code::Error) => SpanStatus::Error,
                Ok(Code::Unset) | Err(_) => SpanStatus::Unset,
            };
            let message = (!status.message.is_empty()).then(|| cap(status.message, MAX_TEXT));
            (code, message)
        }
    };
    let (http, attributes) = sort_attributes(span.attributes);
    Ok(Span {
        trace_id,
        span_id,
        parent_span_id,
        service: origin.service.clone(),
        instance: origin.instance.clone(),
        name: interned(span.name, &METHODS),
        kind,
        start,
        duration: Duration::from_nanos(duration),
        status,
        status_message,
        http,
        attributes,
    })
}

/// A trace or span id: exactly `N` bytes, not all zero.
fn id<const N: usize>(field: &str, bytes: &[u8]) -> Result<[u8; N], String> {
    let id: [u8; N] = bytes
        .try_into()
        .map_err(|_| format!("{field} must be {N} bytes, got {}", bytes.len()))?;
    if id == [0; N] {
        return Err(format!("{field} must not be all zeros"));
    }
    Ok(id)
}

const METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
];
const BREAKER_STATES: [&str; 3] = ["closed", "open", "half-open"];

/// The usual values as `'static` text: spans are cloned on their way to the store and to
/// exporters, and a borrowed name costs those clones nothing.
fn interned(text: String, known: &[&'static str]) -> Cow<'static, str> {
    match known.iter().find(|k| **k == text) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(cap(text, MAX_TEXT)),
    }
}

/// Splits a span's attributes into the HTTP fields the proxy records for its own spans and the
/// rest. Current semantic-convention names win over the legacy ones whatever their order. A
/// well-known key with a value of an unexpected type stays an ordinary attribute rather than
/// being lost.
fn sort_attributes(attributes: Vec<KeyValue>) -> (HttpHop, Vec<(String, AttributeValue)>) {
    let mut http = HttpHop::default();
    let mut legacy = HttpHop::default();
    let mut rest = Vec::new();
    for KeyValue { key, value, .. } in attributes {
        let Some(value) = value.and_then(|v| v.value) else {
            continue;
        };
        let value = match (key.as_str(), value) {
            ("http.request.method", Value::StringValue(method)) => {
                http.method = Some(interned(method, &METHODS));
                continue;
            }
            ("http.method", Value::StringValue(method)) => {
                legacy.method = Some(interned(method, &METHODS));
                continue;
            }
            ("url.path", Value::StringValue(path)) => {
                http.path = Some(cap(path, MAX_TEXT));
                continue;
            }
            ("http.target", Value::StringValue(mut target)) => {
                if let Some(end) = target.find(['?', '#']) {
                    target.truncate(end);
                }
                legacy.path = Some(cap(target, MAX_TEXT));
                continue;
            }
            ("http.response.status_code" | "http.status_code", value) => {
                match status_code(&value) {
                    Some(code) => {
                        if key == "http.response.status_code" {
                            http.status = Some(code);
                        } else {
                            legacy.status = Some(code);
                        }
                        continue;
                    }
                    None => value,
                }
            }
            ("peer.service", Value::StringValue(peer)) if !peer.is_empty() => {
                http.peer_service = Some(Arc::from(prefix(&peer, MAX_TEXT)));
                continue;
            }
            ("flotilla.retry.attempts", Value::IntValue(n)) if u32::try_from(n).is_ok() => {
                http.attempts = u32::try_from(n).ok();
                continue;
            }
            ("flotilla.breaker.state", Value::StringValue(state)) => {
                http.breaker = Some(interned(state, &BREAKER_STATES));
                continue;
            }
            (_, value) => value,
        };
        if rest.len() < MAX_ATTRIBUTES {
            if let Some(value) = attribute_value(value) {
                rest.push((cap(key, MAX_TEXT), value));
            }
        }
    }
    http.method = http.method.or(legacy.method);
    http.path = http.path.or(legacy.path);
    http.status = http.status.or(legacy.status);
    (http, rest)
}

/// An HTTP status code, sent as an integer or (by some SDKs) as text.
fn status_code(value: &Value) -> Option<u16> {
    match value {
        Value::IntValue(n) => u16::try_from(*n).ok(),
        Value::StringValue(text) => text.parse().ok(),
        _ => None,
    }
}

fn attribute_value(value: Value) -> Option<AttributeValue> {
    Some(match value {
        Value::StringValue(text) => AttributeValue::Text(cap(text, MAX_TEXT)),
        Value::BoolValue(b) => AttributeValue::Bool(b),
        Value::IntValue(n) => AttributeValue::Int(n),
        Value::DoubleValue(x) => AttributeValue::Float(x),
        Value::BytesValue(bytes) => AttributeValue::Text(base64(&bytes, MAX_TEXT)),
        // An index into a profile's string table: meaningless without the table.
        Value::StringValueStrindex(_) => return None,
        nested => AttributeValue::Text(cap(json_text(&nested, MAX_TEXT), MAX_TEXT)),
    })
}

/// An AnyValue as JSON text the way OpenTelemetry maps attributes to non-OTLP formats: bytes as
/// base64, non-finite doubles as text, maps as objects in the sender's order. Writing stops soon
/// after `max` bytes (the caller cuts there), so a huge value costs no more than a capped one.
/// Depth is bounded by the decoder that built the value (prost and serde_json limit recursion).
fn json_text(value: &Value, max: usize) -> String {
    let mut text = String::new();
    write_json(Some(value), &mut text, max);
    text
}

fn write_json(value: Option<&Value>, out: &mut String, max: usize) {
    use fmt::Write as _;
    let Some(room) = max.checked_sub(out.len()) else {
        return;
    };
    // Writing to a String cannot fail.
    let _ = match value {
        None => write!(out, "null"),
        Some(Value::StringValue(text)) => write!(out, "{}", JsonString(prefix(text, room))),
        Some(Value::BoolValue(b)) => write!(out, "{b}"),
        Some(Value::IntValue(n)) => write!(out, "{n}"),
        Some(Value::StringValueStrindex(n)) => write!(out, "{n}"),
        Some(Value::DoubleValue(x)) => match serde_json::Number::from_f64(*x) {
            Some(number) => write!(out, "{number}"),
            // The protobuf JSON mapping's names for what JSON numbers cannot hold.
            None if x.is_nan() => write!(out, "\"NaN\""),
            None if *x > 0.0 => write!(out, "\"Infinity\""),
            None => write!(out, "\"-Infinity\""),
        },
        Some(Value::BytesValue(bytes)) => write!(out, "\"{}\"", base64(bytes, room)),
        Some(Value::ArrayValue(array)) => {
            out.push('[');
            for (i, item) in array.values.iter().enumerate() {
                if out.len() > max {
                    break;
                }
                if i > 0 {
                    out.push(',');
                }
                write_json(item.value.as_ref(), out, max);
            }
            write!(out, "]")
        }
        Some(Value::KvlistValue(list)) => {
            out.push('{');
            for (i, kv) in list.values.iter().enumerate() {
                if out.len() > max {
                    break;
                }
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{}:", JsonString(&kv.key));
                write_json(kv.value.as_ref().and_then(|v| v.value.as_ref()), out, max);
            }
            write!(out, "}}")
        }
    };
}

/// Text as a JSON string literal, quotes included.
struct JsonString<'a>(&'a str);

impl fmt::Display for JsonString<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        f.write_char('"')?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if u32::from(c) < 0x20 => write!(f, "\\u{:04x}", u32::from(c))?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

fn log_from_proto(
    record: proto_logs::LogRecord,
    origin: &Origin,
    instance: &Arc<str>,
    now: SystemTime,
) -> Result<LogRecord, String> {
    let trace_id = match record.trace_id.as_slice() {
        [] => None,
        bytes => {
            let id: [u8; 16] = bytes
                .try_into()
                .map_err(|_| format!("traceId must be 16 bytes or empty, got {}", bytes.len()))?;
            // All zeros is "no trace", as for a span's parent.
            (id != [0; 16]).then_some(TraceId(id))
        }
    };
    let time = [record.time_unix_nano, record.observed_time_unix_nano]
        .into_iter()
        .find(|&nanos| nanos != 0)
        .and_then(time_of)
        .unwrap_or(now);
    let level = match record.severity_number {
        1..=4 => Some(Level::Trace),
        5..=8 => Some(Level::Debug),
        9..=12 => Some(Level::Info),
        13..=16 => Some(Level::Warn),
        17..=24 => Some(Level::Error),
        _ => Level::parse(&record.severity_text),
    };
    let stderr = record.attributes.iter().any(|attribute| {
        attribute.key == "log.iostream"
            && matches!(
                attribute.value.as_ref().and_then(|v| v.value.as_ref()),
                Some(Value::StringValue(stream)) if stream == "stderr"
            )
    });
    let line = match record.body.and_then(|body| body.value) {
        None => cap(record.event_name, MAX_LINE),
        Some(Value::StringValue(text)) => cap(text, MAX_LINE),
        Some(Value::BytesValue(bytes)) => base64(&bytes, MAX_LINE),
        Some(other) => cap(json_text(&other, MAX_LINE), MAX_LINE),
    };
    Ok(LogRecord {
        time,
        service: origin.service.clone(),
        instance: instance.clone(),
        version: origin.version.clone(),
        stream: if stderr {
            Stream::Stderr
        } else {
            Stream::Stdout
        },
        line,
        level,
        trace_id,
    })
}

// ---------------------------------------------------------------------------------------------
// Out
// ---------------------------------------------------------------------------------------------

/// A protobuf `ExportTraceServiceRequest` holding `spans`: one `ResourceSpans` per (service,
/// instance) in order of first appearance, with `service.name` and `service.instance.id`
/// resource attributes and one scope named `flotilla`. [`HttpHop`] fields become attributes
/// under their semantic-convention names, ahead of the span's other attributes.
pub fn encode_traces(spans: &[Span]) -> Vec<u8> {
    let mut groups: Vec<(&str, Option<&str>, Vec<proto_trace::Span>)> = Vec::new();
    for span in spans {
        let instance = span.instance.as_deref();
        // Linear: a batch comes from a handful of services, and this keeps their order.
        let at = match groups
            .iter()
            .position(|(s, i, _)| *s == &*span.service && *i == instance)
        {
            Some(at) => at,
            None => {
                groups.push((&span.service, instance, Vec::new()));
                groups.len() - 1
            }
        };
        groups[at].2.push(span_to_proto(span));
    }
    let resource_spans = groups
        .into_iter()
        .map(|(service, instance, spans)| proto_trace::ResourceSpans {
            resource: Some(resource(service, instance)),
            scope_spans: vec![proto_trace::ScopeSpans {
                scope: Some(scope()),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }.encode_to_vec()
}

/// A protobuf `ExportLogsServiceRequest` holding `records`, grouped by (service, instance) like
/// [`encode_traces`]; each carries its level as severity number and text, its trace id, and
/// `log.iostream` for stdout and stderr lines.
pub fn encode_logs(records: &[Arc<LogRecord>]) -> Vec<u8> {
    let mut groups: Vec<(&str, &str, Vec<proto_logs::LogRecord>)> = Vec::new();
    for record in records {
        let at = match groups
            .iter()
            .position(|(s, i, _)| *s == &*record.service && *i == &*record.instance)
        {
            Some(at) => at,
            None => {
                groups.push((&record.service, &record.instance, Vec::new()));
                groups.len() - 1
            }
        };
        groups[at].2.push(log_to_proto(record));
    }
    let resource_logs = groups
        .into_iter()
        .map(
            |(service, instance, log_records)| proto_logs::ResourceLogs {
                resource: Some(resource(service, Some(instance))),
                scope_logs: vec![proto_logs::ScopeLogs {
                    scope: Some(scope()),
                    log_records,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            },
        )
        .collect();
    ExportLogsServiceRequest { resource_logs }.encode_to_vec()
}

fn resource(service: &str, instance: Option<&str>) -> Resource {
    let mut attributes = vec![text_attribute("service.name", service)];
    if let Some(instance) = instance {
        attributes.push(text_attribute("service.instance.id", instance));
    }
    Resource {
        attributes,
        ..Resource::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "flotilla".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..InstrumentationScope::default()
    }
}

fn attribute(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn text_attribute(key: &str, value: &str) -> KeyValue {
    attribute(key, Value::StringValue(value.into()))
}

fn span_to_proto(span: &Span) -> proto_trace::Span {
    use proto_trace::span::SpanKind as Kind;
    use proto_trace::status::StatusCode as Code;
    let http = &span.http;
    let mut attributes = Vec::with_capacity(6 + span.attributes.len());
    if let Some(method) = &http.method {
        attributes.push(text_attribute("http.request.method", method));
    }
    if let Some(path) = &http.path {
        attributes.push(text_attribute("url.path", path));
    }
    if let Some(status) = http.status {
        attributes.push(attribute(
            "http.response.status_code",
            Value::IntValue(status.into()),
        ));
    }
    if let Some(peer) = &http.peer_service {
        attributes.push(text_attribute("peer.service", peer));
    }
    if let Some(attempts) = http.attempts {
        attributes.push(attribute(
            "flotilla.retry.attempts",
            Value::IntValue(attempts.into()),
        ));
    }
    if let Some(breaker) = &http.breaker {
        attributes.push(text_attribute("flotilla.breaker.state", breaker));
    }
    attributes.extend(span.attributes.iter().map(|(key, value)| {
        let value = match value {
            AttributeValue::Bool(b) => Value::BoolValue(*b),
            AttributeValue::Int(n) => Value::IntValue(*n),
            AttributeValue::Float(x) => Value::DoubleValue(*x),
            AttributeValue::Text(text) => Value::StringValue(text.clone()),
        };
        attribute(key, value)
    }));
    let start = nanos_of(span.start);
    let status = match (span.status, &span.status_message) {
        (SpanStatus::Unset, None) => None,
        (code, message) => Some(proto_trace::Status {
            code: match code {
                SpanStatus::Unset => Code::Unset,
                SpanStatus::Ok => Code::Ok,
                SpanStatus::Error => Code::Error,
            } as i32,
            message: message.clone().unwrap_or_default(),
        }),
    };
    proto_trace::Span {
        trace_id: span.trace_id.0.to_vec(),
        span_id: span.span_id.0.to_vec(),
        parent_span_id: span
            .parent_span_id
            .map(|parent| parent.0.to_vec())
            .unwrap_or_default(),
        name: span.name.to_string(),
        kind: match span.kind {
            SpanKind::Internal => Kind::Internal,
            SpanKind::Server => Kind::Server,
            SpanKind::Client => Kind::Client,
            SpanKind::Producer => Kind::Producer,
            SpanKind::Consumer => Kind::Consumer,
        } as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start
            .saturating_add(u64::try_from(span.duration.as_nanos()).unwrap_or(u64::MAX)),
        attributes,
        status,
        ..proto_trace::Span::default()
    }
}

fn log_to_proto(record: &LogRecord) -> proto_logs::LogRecord {
    use proto_logs::SeverityNumber as Severity;
    let (severity, text) = match record.level {
        None => (Severity::Unspecified, ""),
        Some(Level::Trace) => (Severity::Trace, "TRACE"),
        Some(Level::Debug) => (Severity::Debug, "DEBUG"),
        Some(Level::Info) => (Severity::Info, "INFO"),
        Some(Level::Warn) => (Severity::Warn, "WARN"),
        Some(Level::Error) => (Severity::Error, "ERROR"),
    };
    let stream = match record.stream {
        Stream::Stdout => Some("stdout"),
        Stream::Stderr => Some("stderr"),
        Stream::System => None,
    };
    let time = nanos_of(record.time);
    proto_logs::LogRecord {
        time_unix_nano: time,
        observed_time_unix_nano: time,
        severity_number: severity as i32,
        severity_text: text.into(),
        body: Some(AnyValue {
            value: Some(Value::StringValue(record.line.clone())),
        }),
        attributes: stream
            .map(|stream| vec![text_attribute("log.iostream", stream)])
            .unwrap_or_default(),
        trace_id: record.trace_id.map(|id| id.0.to_vec()).unwrap_or_default(),
        ..proto_logs::LogRecord::default()
    }
}

/// `google.rpc.Status`, which OTLP/HTTP answers a failed request with; `details` is left out
/// (an absent repeated field), which keeps it out of opentelemetry-proto's reach.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// gRPC's `INVALID_ARGUMENT`, the code for a request that must not be retried as it is.
const INVALID_ARGUMENT: i32 = 3;

/// The body of a `200 OK` answer to an OTLP/HTTP export: an empty export response (no partial
/// success) in `encoding`.
pub fn encode_success(encoding: Encoding, signal: Signal) -> Vec<u8> {
    match (encoding, signal) {
        (Encoding::Json, _) => b"{}".to_vec(),
        (Encoding::Protobuf, Signal::Traces) => {
            ExportTraceServiceResponse::default().encode_to_vec()
        }
        (Encoding::Protobuf, Signal::Logs) => ExportLogsServiceResponse::default().encode_to_vec(),
    }
}

/// The body of a `400 Bad Request` answer: a `google.rpc.Status` with code 3
/// (`INVALID_ARGUMENT`) and `message`, in `encoding`.
pub fn encode_failure(encoding: Encoding, message: &str) -> Vec<u8> {
    match encoding {
        Encoding::Json => serde_json::json!({ "code": INVALID_ARGUMENT, "message": message })
            .to_string()
            .into_bytes(),
        Encoding::Protobuf => RpcStatus {
            code: INVALID_ARGUMENT,
            message: message.into(),
        }
        .encode_to_vec(),
    }
}

// ---------------------------------------------------------------------------------------------
// Exporter
// ---------------------------------------------------------------------------------------------

/// How an [`OtlpExporter`] queues and ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// Spans, and separately log records, waiting to be shipped; more are dropped and counted.
    pub queue: usize,
    /// Most items per request.
    pub batch: usize,
    /// Longest an item waits for its batch to fill before it is shipped anyway.
    pub interval: Duration,
    /// Longest one request may take, connecting and reading the answer included.
    pub timeout: Duration,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            queue: 8192,
            batch: 512,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// What an [`OtlpExporter`] has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Accepted by the collector.
    pub exported_spans: u64,
    pub exported_logs: u64,
    /// Never delivered: the queue was full, the batch failed, or the collector rejected them.
    pub dropped_spans: u64,
    pub dropped_logs: u64,
    /// Batches given up on (after retries, where retrying made sense).
    pub failed_batches: u64,
}

#[derive(Debug, Default)]
struct Counters {
    exported_spans: AtomicU64,
    exported_logs: AtomicU64,
    dropped_spans: AtomicU64,
    dropped_logs: AtomicU64,
    failed_batches: AtomicU64,
}

impl Counters {
    fn exported(&self, signal: Signal) -> &AtomicU64 {
        match signal {
            Signal::Traces => &self.exported_spans,
            Signal::Logs => &self.exported_logs,
        }
    }

    fn dropped(&self, signal: Signal) -> &AtomicU64 {
        match signal {
            Signal::Traces => &self.dropped_spans,
            Signal::Logs => &self.dropped_logs,
        }
    }
}

/// Ships spans and log records to an OTLP/HTTP collector (protobuf) from one background task.
///
/// Recording never blocks or waits: items go into bounded queues and are dropped, and counted,
/// when those are full. Whatever the collector does (refuse, fail, or accept connections and
/// never answer) memory stays within the queues plus the batch being built and the one in
/// flight, which [`ExportConfig::timeout`] bounds in time. Cloning is cheap and shares the
/// queues; the task ships what is left and ends once every clone is dropped.
#[derive(Debug, Clone)]
pub struct OtlpExporter {
    spans: mpsc::Sender<Span>,
    logs: mpsc::Sender<Arc<LogRecord>>,
    counters: Arc<Counters>,
}

impl OtlpExporter {
    /// Starts exporting to the collector at `endpoint`, a base URL such as
    /// `http://collector:4318` (spans go to `{endpoint}/v1/traces`, logs to `{endpoint}/v1/logs`).
    ///
    /// Must be called inside a tokio runtime, on which the task is spawned. Fails on an endpoint
    /// that is not an `http://` URL (`https://` is not supported yet), on a zero in `config` or
    /// an interval or timeout over an hour, and outside a runtime.
    pub fn spawn(endpoint: &str, config: ExportConfig) -> Result<Self, OtlpError> {
        let traces = signal_uri(endpoint, Signal::Traces)?;
        let logs = signal_uri(endpoint, Signal::Logs)?;
        // Out of these ranges tokio panics (a zero or oversized channel, an interval whose next
        // tick overflows `Instant`), and a panic in the task would silently end all export.
        let wait = Duration::from_nanos(1)..=MAX_WAIT;
        for (fine, problem) in [
            (
                (1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&config.queue),
                "queue must be at least 1",
            ),
            (config.batch >= 1, "batch must be at least 1"),
            (
                wait.contains(&config.interval),
                "interval must be above zero and at most an hour",
            ),
            (
                wait.contains(&config.timeout),
                "timeout must be above zero and at most an hour",
            ),
        ] {
            if !fine {
                return Err(OtlpError::new(format!("OTLP export {problem}")));
            }
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            OtlpError::new("OtlpExporter::spawn must be called inside a tokio runtime")
        })?;
        let (spans, span_queue) = mpsc::channel(config.queue);
        let (log_sender, log_queue) = mpsc::channel(config.queue);
        let counters = Arc::new(Counters::default());
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        let shipper = Shipper {
            client: Client::builder(TokioExecutor::new()).build(connector),
            traces,
            logs,
            config,
            counters: counters.clone(),
            warned: None,
            unreported: 0,
        };
        runtime.spawn(shipper.run(span_queue, log_queue));
        Ok(Self {
            spans,
            logs: log_sender,
            counters,
        })
    }

    /// Queues a copy of `span` for export, or drops and counts it if the queue is full.
    pub fn export_span(&self, span: &Span) {
        // Reserving first means a full queue costs no clone.
        match self.spans.try_reserve() {
            Ok(permit) => permit.send(span.clone()),
            Err(_) => {
                self.counters.dropped_spans.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues `record` for export, or drops and counts it if the queue is full.
    pub fn export_log(&self, record: &Arc<LogRecord>) {
        if self.logs.try_send(record.clone()).is_err() {
            self.counters.dropped_logs.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far.
    pub fn stats(&self) -> ExportStats {
        let c = &*self.counters;
        ExportStats {
            exported_spans: c.exported_spans.load(Ordering::Relaxed),
            exported_logs: c.exported_logs.load(Ordering::Relaxed),
            dropped_spans: c.dropped_spans.load(Ordering::Relaxed),
            dropped_logs: c.dropped_logs.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
        }
    }
}

fn signal_uri(endpoint: &str, signal: Signal) -> Result<http::Uri, OtlpError> {
    let base = endpoint.trim().trim_end_matches('/');
    let refuse = |why: &str| OtlpError::new(format!("OTLP endpoint {endpoint:?}: {why}"));
    let uri: http::Uri = base
        .parse()
        .map_err(|e| refuse(&format!("not a URL ({e})")))?;
    match uri.scheme_str() {
        Some(scheme) if scheme.eq_ignore_ascii_case("http") => {}
        Some(scheme) if scheme.eq_ignore_ascii_case("https") => {
            return Err(refuse("https is not supported yet; use http://"));
        }
        _ => {
            return Err(refuse(
                "must be an http:// URL such as http://collector:4318",
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(refuse("names no host"));
    }
    if uri.query().is_some() {
        return Err(refuse("must not have a query string"));
    }
    format!("{base}{}", signal.path())
        .parse()
        .map_err(|e| refuse(&format!("not a URL ({e})")))
}

/// Longest [`ExportConfig::interval`] and [`ExportConfig::timeout`].
const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Tries per batch: the first and two retries.
const ATTEMPTS: u32 = 3;
/// Wait before the first retry, doubled for each further one.
const BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between tries, also for a collector's `Retry-After`: a batch waiting longer
/// would only grow the number of items dropped behind it.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Least time between two warnings about failed exports, so a collector that is down does not
/// flood the log it may be meant to receive.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Most of a collector's answer read; it is small unless the collector is broken.
const MAX_ANSWER: usize = 64 * 1024;

/// The background task: batches the queues and posts them.
struct Shipper {
    client: Client<HttpConnector, Full<Bytes>>,
    traces: http::Uri,
    logs: http::Uri,
    config: ExportConfig,
    counters: Arc<Counters>,
    /// When the last warning was written.
    warned: Option<Instant>,
    /// Failed batches since then.
    unreported: u64,
}

/// Why a try failed, and whether another may succeed.
struct Failure {
    reason: String,
    retry: bool,
    retry_after: Option<Duration>,
}

impl Shipper {
    async fn run(
        mut self,
        mut span_queue: mpsc::Receiver<Span>,
        mut log_queue: mpsc::Receiver<Arc<LogRecord>>,
    ) {
        let batch = self.config.batch;
        let mut spans = Vec::with_capacity(batch.min(1024));
        let mut logs = Vec::with_capacity(batch.min(1024));
        let (mut spans_open, mut logs_open) = (true, true);
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while spans_open || logs_open {
            let mut due = false;
            // Each buffer is shipped below as soon as it holds a batch, so each room is >= 1.
            let (span_room, log_room) = (batch - spans.len(), batch - logs.len());
            tokio::select! {
                received = span_queue.recv_many(&mut spans, span_room), if spans_open => {
                    spans_open = received > 0;
                }
                received = log_queue.recv_many(&mut logs, log_room), if logs_open => {
                    logs_open = received > 0;
                }
                _ = tick.tick() => due = true,
            }
            if spans.len() >= batch || (!spans.is_empty() && (due || !spans_open)) {
                let body = encode_traces(&spans);
                let count = spans.len();
                spans.clear();
                self.ship(Signal::Traces, body, count).await;
            }
            if logs.len() >= batch || (!logs.is_empty() && (due || !logs_open)) {
                let body = encode_logs(&logs);
                let count = logs.len();
                logs.clear();
                self.ship(Signal::Logs, body, count).await;
            }
        }
    }

    /// Posts one batch, retrying what may succeed later, and counts the outcome.
    async fn ship(&mut self, signal: Signal, body: Vec<u8>, count: usize) {
        let count = u64::try_from(count).unwrap_or(u64::MAX);
        let body = Bytes::from(body);
        let mut attempt = 1;
        let failure = loop {
            match self.post(signal, body.clone(), count).await {
                Ok(rejected) => {
                    let counters = &self.counters;
                    counters
                        .exported(signal)
                        .fetch_add(count - rejected, Ordering::Relaxed);
                    counters
                        .dropped(signal)
                        .fetch_add(rejected, Ordering::Relaxed);
                    return;
                }
                Err(failure) if failure.retry && attempt < ATTEMPTS => {
                    let backoff = BACKOFF * 2u32.pow(attempt - 1);
                    // Jitter, so exporters that failed together do not all retry together.
                    let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
                    let wait = failure.retry_after.unwrap_or(backoff + jitter);
                    tokio::time::sleep(wait.min(MAX_BACKOFF)).await;
                    attempt += 1;
                }
                Err(failure) => break failure,
            }
        };
        self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
        self.counters
            .dropped(signal)
            .fetch_add(count, Ordering::Relaxed);
        self.unreported += 1;
        let now = Instant::now();
        if self
            .warned
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
        {
            let uri = self.uri(signal);
            let earlier = self.unreported - 1;
            tracing::warn!(
                endpoint = %uri,
                "OTLP export failed, dropped {count} {}: {}{}",
                signal.noun(),
                failure.reason,
                if earlier > 0 {
                    format!(" ({earlier} more batches failed since the last warning)")
                } else {
                    String::new()
                }
            );
            self.warned = Some(now);
            self.unreported = 0;
        }
    }

    fn uri(&self, signal: Signal) -> &http::Uri {
        match signal {
            Signal::Traces => &self.traces,
            Signal::Logs => &self.logs,
        }
    }

    /// One try: how many of the `count` items the collector rejected, or why it failed.
    async fn post(&self, signal: Signal, body: Bytes, count: u64) -> Result<u64, Failure> {
        let request = http::Request::post(self.uri(signal).clone())
            .header(
                http::header::CONTENT_TYPE,
                Encoding::Protobuf.content_type(),
            )
            .header(
                http::header::USER_AGENT,
                concat!("flotilla-otlp/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| Failure {
                reason: format!("cannot build the request: {e}"),
                retry: false,
                retry_after: None,
            })?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| Failure {
                reason: format!("cannot reach the collector: {}", root_cause(&e)),
                retry: true,
                retry_after: None,
            })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
                .map(Duration::from_secs);
            // Read to the end so the connection can be reused; an unreadable answer only costs
            // the detail it would have given.
            let answer = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map(|body| body.to_bytes())
                .unwrap_or_default();
            if status.is_success() {
                return Ok(rejected(signal, &answer).min(count));
            }
            let detail = RpcStatus::decode(answer)
                .ok()
                .filter(|s| !s.message.is_empty())
                .map(|s| format!(": {}", prefix(&s.message, 200)))
                .unwrap_or_default();
            Err(Failure {
                reason: format!("the collector answered {status}{detail}"),
                retry: matches!(status.as_u16(), 429 | 502 | 503 | 504),
                retry_after,
            })
        };
        tokio::time::timeout(self.config.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(Failure {
                    reason: format!(
                        "no answer within {}",
                        humantime::format_duration(self.config.timeout)
                    ),
                    retry: true,
                    retry_after: None,
                })
            })
    }
}

/// How many items a successful answer says were rejected (OTLP's partial success).
fn rejected(signal: Signal, answer: &[u8]) -> u64 {
    let rejected = match signal {
        Signal::Traces => ExportTraceServiceResponse::decode(answer)
            .ok()
            .and_then(|r| r.partial_success)
            .map(|p| p.rejected_spans),
        Signal::Logs => ExportLogsServiceResponse::decode(answer)
            .ok()
            .and_then(|r| r.partial_success)
            .map(|p| p.rejected_log_records),
    };
    rejected.map_or(0, |n| u64::try_from(n).unwrap_or(0))
}

/// The innermost cause: hyper's outer errors only say that a request failed.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn time_of(nanos: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_nanos(nanos))
}

fn nanos_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn prefix(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `text` cut to at most `max` bytes, ending in `…` when cut. Gives the memory back when cut, so
/// a huge value does not stay allocated behind a short one.
fn cap(mut text: String, max: usize) -> String {
    if text.len() > max {
        let keep = prefix(&text, max.saturating_sub('…'.len_utf8())).len();
        text.truncate(keep);
        text.push('…');
        text.shrink_to_fit();
    }
    text
}

/// Standard, padded base64 of `bytes`, cut to at most `max` bytes of text; only the input that
/// fits is encoded.
fn base64(bytes: &[u8], max: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let fits = bytes.len().min(max / 4 * 3);
    let mut text = String::with_capacity(fits.div_ceil(3) * 4);
    for chunk in bytes[..fits].chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let triple = byte(0) << 16 | byte(1) << 8 | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(char::from(ALPHABET[(triple >> (18 - 6 * i)) as usize & 63]));
            } else {
                text.push('=');
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b"", usize::MAX), "");
        assert_eq!(base64(b"f", usize::MAX), "Zg==");
        assert_eq!(base64(b"fo", usize::MAX), "Zm8=");
        assert_eq!(base64(b"foo", usize::MAX), "Zm9v");
        assert_eq!(base64(b"foobar", usize::MAX), "Zm9vYmFy");
        assert_eq!(base64(b"\xff\xfe", usize::MAX), "//4=");
        assert_eq!(base64(b"foobar", 4), "Zm9v");
    }

    #[test]
    fn cut_text_ends_on_a_character_and_says_so() {
        assert_eq!(cap("short".into(), 10), "short");
        let cut = cap("aé".repeat(10), 8);
        assert!(cut.len() <= 8, "{cut}");
        assert!(cut.ends_with('…'), "{cut}");
        assert_eq!(prefix("aé", 2), "a");
    }

    #[test]
    fn nested_values_are_json_in_the_senders_order() {
        let text = |value: Value| Value::StringValue(text_of(value));
        fn text_of(value: Value) -> String {
            json_text(&value, usize::MAX)
        }
        let kv = |key: &str, value: Value| KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..KeyValue::default()
        };
        let list = Value::KvlistValue(opentelemetry_proto::tonic::common::v1::KeyValueList {
            values: vec![
                kv(
                    "z",
                    Value::StringValue("quote \" and \\ and \n and \u{1}".into()),
                ),
                kv("a", Value::DoubleValue(f64::INFINITY)),
                kv("m", Value::BytesValue(b"hi".to_vec())),
                KeyValue {
                    key: "empty".into(),
                    ..KeyValue::default()
                },
            ],
        });
        let expected =
            r#"{"z":"quote \" and \\ and \n and \u0001","a":"Infinity","m":"aGk=","empty":null}"#;
        assert_eq!(text_of(list.clone()), expected);
        let parsed: serde_json::Value = serde_json::from_str(expected).expect("valid JSON");
        assert_eq!(parsed["z"], "quote \" and \\ and \n and \u{1}");
        let array = Value::ArrayValue(opentelemetry_proto::tonic::common::v1::ArrayValue {
            values: vec![
                AnyValue {
                    value: Some(Value::IntValue(-3)),
                },
                AnyValue {
                    value: Some(Value::BoolValue(true)),
                },
                AnyValue {
                    value: Some(Value::DoubleValue(0.25)),
                },
                AnyValue {
                    value: Some(text(Value::ArrayValue(Default::default()))),
                },
            ],
        });
        assert_eq!(text_of(array), r#"[-3,true,0.25,"[]"]"#);
        let huge = Value::ArrayValue(opentelemetry_proto::tonic::common::v1::ArrayValue {
            values: vec![
                AnyValue {
                    value: Some(Value::StringValue("x".repeat(1_000_000))),
                };
                100
            ],
        });
        assert!(
            json_text(&huge, 100).len() < 200,
            "writing stops at the cap"
        );
    }

    #[test]
    fn failures_are_google_rpc_status() {
        let body = encode_failure(Encoding::Protobuf, "traceId must be 16 bytes");
        let status = RpcStatus::decode(body.as_slice()).expect("a google.rpc.Status");
        assert_eq!(status.code, 3);
        assert_eq!(status.message, "traceId must be 16 bytes");
    }

    #[test]
    fn relaxing_leaves_conforming_json_alone() {
        let mut value = serde_json::json!({"resourceSpans": [{"scopeSpans": []}]});
        assert!(!relax(&mut value));
        let mut value =
            serde_json::json!({"value": {"arrayValue": {}}, "kind": "SPAN_KIND_CLIENT"});
        assert!(relax(&mut value));
        assert_eq!(
            value,
            serde_json::json!({"value": {"arrayValue": {"values": []}}, "kind": 3})
        );
    }
}
