//! Prometheus metrics: the proxy's per-edge counters and a writer for the text exposition format.
//!
//! The proxy records every call, so [`Metrics::record_call`] is a read lock and a handful of
//! relaxed atomic adds once an edge (caller, callee) has been seen; only an edge's first call takes
//! the write lock to intern it. [`Exposition`] is the writer: the binary renders these metrics into
//! it next to families of its own, and [`Exposition::finish`] yields text that `promtool check
//! metrics` accepts.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::traces::TraceStore;

/// Upper bounds (inclusive) of the latency buckets, in nanoseconds; `+Inf` follows.
const BUCKET_NANOS: [u64; 13] = [
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// `le` of each bucket, the same bounds in seconds.
const BUCKET_LABELS: [&str; 14] = [
    "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5",
    "10", "+Inf",
];

/// `class` of a call: its status class, or `error` when no (valid) response came.
const CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "error"];

/// Edges kept before new ones are only counted in `flotilla_calls_unrecorded_total`: callers and
/// callees are meant to be the manifest's services, and this keeps a bug that passes request
/// data as a name from growing memory and the exposition without bound.
const MAX_EDGES: usize = 10_000;

/// The proxy's counters, per edge (caller, callee).
pub struct Metrics {
    edges: RwLock<Edges>,
    max_edges: usize,
    /// Calls not counted because `max_edges` edges already existed.
    unrecorded: AtomicU64,
}

#[derive(Default)]
struct Edges {
    by_caller: HashMap<Arc<str>, HashMap<Arc<str>, Arc<Edge>>>,
    count: usize,
}

impl Edges {
    fn get(&self, caller: &str, callee: &str) -> Option<&Arc<Edge>> {
        self.by_caller.get(caller)?.get(callee)
    }
}

struct Edge {
    caller: Arc<str>,
    callee: Arc<str>,
    /// Indexed like [`CLASSES`].
    requests: [AtomicU64; 5],
    /// Indexed like [`BUCKET_LABELS`], each call counted in its own bucket only: one add per call,
    /// made cumulative when rendered.
    buckets: [AtomicU64; 14],
    /// Microseconds: at 60,000 one-second calls a second this still takes ten years to wrap.
    sum_micros: AtomicU64,
    retries: AtomicU64,
    in_flight: AtomicI64,
}

impl Edge {
    fn new(caller: &str, callee: &str) -> Self {
        Self {
            caller: caller.into(),
            callee: callee.into(),
            requests: Default::default(),
            buckets: Default::default(),
            sum_micros: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
        }
    }

    fn record(&self, status: Option<u16>, duration: Duration, retries: u32) {
        let class = match status {
            Some(200..=299) => 0,
            Some(300..=399) => 1,
            Some(400..=499) => 2,
            Some(500..=599) => 3,
            // No response, or a status no final response can have.
            _ => 4,
        };
        self.requests[class].fetch_add(1, Relaxed);
        let nanos = duration.as_nanos();
        let bucket = BUCKET_NANOS.partition_point(|&bound| u128::from(bound) < nanos);
        self.buckets[bucket].fetch_add(1, Relaxed);
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Relaxed);
        if retries > 0 {
            self.retries.fetch_add(u64::from(retries), Relaxed);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_max_edges(MAX_EDGES)
    }

    fn with_max_edges(max_edges: usize) -> Self {
        Self {
            edges: RwLock::default(),
            max_edges,
            unrecorded: AtomicU64::new(0),
        }
    }

    /// Counts one finished call from `caller` to `callee`: `status` is the response's, `None`
    /// when none came (transport error, timeout, open breaker); `duration` is the whole call as
    /// the caller saw it; `retries` are the tries after the first.
    pub fn record_call(
        &self,
        caller: &str,
        callee: &str,
        status: Option<u16>,
        duration: Duration,
        retries: u32,
    ) {
        let recorded = self.with_edge(caller, callee, |edge| {
            edge.record(status, duration, retries);
        });
        if !recorded {
            self.unrecorded.fetch_add(1, Relaxed);
        }
    }

    /// Changes the calls in flight from `caller` to `callee` by `delta`: +1 when one starts, -1
    /// when it ends. For callers that cannot hold a guard across the call.
    pub fn add_in_flight(&self, caller: &str, callee: &str, delta: i64) {
        self.with_edge(caller, callee, |edge| {
            edge.in_flight.fetch_add(delta as _, Relaxed);
        });
    }

    /// The meter of the edge from `caller` to `callee`, interning it if new; `None` when there is
    /// no room for another edge (its calls are then counted as unrecorded).
    pub fn meter(&self, caller: &str, callee: &str) -> Option<EdgeMeter> {
        let mut meter = None;
        self.with_edge(caller, callee, |edge| {
            meter = Some(EdgeMeter { edge: edge.clone() });
        });
        if meter.is_none() {
            self.unrecorded.fetch_add(1, Relaxed);
        }
        meter
    }

    /// Counts a call as in flight until the guard is dropped.
    pub fn in_flight(&self, caller: &str, callee: &str) -> InFlightGuard {
        let mut guard = InFlightGuard { edge: None };
        self.with_edge(caller, callee, |edge| {
            edge.in_flight.fetch_add(1, Relaxed);
            guard.edge = Some(edge.clone());
        });
        guard
    }

    /// Runs `f` on the edge, interning it first if new; false when there is no room for it.
    fn with_edge(&self, caller: &str, callee: &str, f: impl FnOnce(&Arc<Edge>)) -> bool {
        // A panic elsewhere cannot leave the map half-built (inserts finish or do not happen), so
        // poisoning is ignored rather than taking the proxy down with it.
        {
            let edges = self.edges.read().unwrap_or_else(|e| e.into_inner());
            if let Some(edge) = edges.get(caller, callee) {
                f(edge);
                return true;
            }
        }
        let mut edges = self.edges.write().unwrap_or_else(|e| e.into_inner());
        if let Some(edge) = edges.get(caller, callee) {
            f(edge); // interned by another call in between
            return true;
        }
        if edges.count >= self.max_edges {
            return false;
        }
        let edge = Arc::new(Edge::new(caller, callee));
        f(&edge);
        edges
            .by_caller
            .entry(edge.caller.clone())
            .or_default()
            .insert(edge.callee.clone(), edge);
        edges.count += 1;
        true
    }

    /// Writes the `flotilla_requests_total`, `flotilla_request_duration_seconds`,
    /// `flotilla_requests_in_flight`, `flotilla_retries_total` and
    /// `flotilla_calls_unrecorded_total` families, edges sorted by caller then callee.
    pub fn render(&self, out: &mut Exposition) {
        let mut edges: Vec<Arc<Edge>> = {
            let edges = self.edges.read().unwrap_or_else(|e| e.into_inner());
            edges
                .by_caller
                .values()
                .flat_map(|by_callee| by_callee.values().cloned())
                .collect()
        };
        edges.sort_unstable_by(|a, b| (&a.caller, &a.callee).cmp(&(&b.caller, &b.callee)));

        out.family(
            "flotilla_requests_total",
            "Calls between services by outcome: the response's status class, or error when no \
             response came (transport error, timeout, open breaker).",
            MetricType::Counter,
        );
        for edge in &edges {
            let [caller, callee] = pair(edge);
            for (class, count) in CLASSES.iter().zip(&edge.requests) {
                let labels = [caller, callee, ("class", class)];
                out.sample("", &labels, count.load(Relaxed) as f64);
            }
        }

        out.family(
            "flotilla_request_duration_seconds",
            "Duration of calls between services as the caller saw them, retries included.",
            MetricType::Histogram,
        );
        for edge in &edges {
            let [caller, callee] = pair(edge);
            // Each bucket is read once, so the buckets are cumulative and `_count` equals `+Inf`
            // even while calls are being recorded.
            let mut cumulative = 0;
            for (le, bucket) in BUCKET_LABELS.iter().zip(&edge.buckets) {
                cumulative += bucket.load(Relaxed);
                let labels = [caller, callee, ("le", le)];
                out.sample("_bucket", &labels, cumulative as f64);
            }
            let seconds = edge.sum_micros.load(Relaxed) as f64 / 1e6;
            out.sample("_sum", &pair(edge), seconds);
            out.sample("_count", &pair(edge), cumulative as f64);
        }

        out.family(
            "flotilla_requests_in_flight",
            "Calls between services started and not yet finished.",
            MetricType::Gauge,
        );
        for edge in &edges {
            out.sample("", &pair(edge), edge.in_flight.load(Relaxed) as f64);
        }

        out.family(
            "flotilla_retries_total",
            "Tries after the first made by calls between services.",
            MetricType::Counter,
        );
        for edge in &edges {
            out.sample("", &pair(edge), edge.retries.load(Relaxed) as f64);
        }

        out.family(
            "flotilla_calls_unrecorded_total",
            "Calls left out of the per-edge metrics because too many distinct edges were seen.",
            MetricType::Counter,
        );
        out.sample("", &[], self.unrecorded.load(Relaxed) as f64);
    }
}

fn pair(edge: &Edge) -> [(&'static str, &str); 2] {
    [("caller", &*edge.caller), ("callee", &*edge.callee)]
}

/// Keeps a call counted in `flotilla_requests_in_flight` until dropped.
#[must_use = "the call stops counting as in flight when the guard is dropped"]
pub struct InFlightGuard {
    /// `None` when the edge could not be interned.
    edge: Option<Arc<Edge>>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Some(edge) = &self.edge {
            edge.in_flight.fetch_sub(1, Relaxed);
        }
    }
}

/// One edge's counters, looked up once per call rather than once per update: the proxy starts a
/// call with [`EdgeMeter::start`] and ends it with [`EdgeMeter::finish`].
#[derive(Clone)]
pub struct EdgeMeter {
    edge: Arc<Edge>,
}

impl EdgeMeter {
    /// A call starts: one more in flight.
    pub fn start(&self) {
        self.edge.in_flight.fetch_add(1, Relaxed);
    }

    /// The call [`EdgeMeter::start`] counted ended, like [`Metrics::record_call`] says.
    pub fn finish(&self, status: Option<u16>, duration: Duration, retries: u32) {
        self.edge.in_flight.fetch_sub(1, Relaxed);
        self.edge.record(status, duration, retries);
    }
}

/// Writes `flotilla_spans_dropped_total`: spans the trace store evicted to stay within capacity.
pub fn render_trace_store(traces: &TraceStore, out: &mut Exposition) {
    out.family(
        "flotilla_spans_dropped_total",
        "Spans evicted from the trace store to stay within its capacity.",
        MetricType::Counter,
    );
    out.sample("", &[], traces.dropped() as f64);
    out.family(
        "flotilla_trace_spans",
        "Spans held in memory by the trace store.",
        MetricType::Gauge,
    );
    out.sample("", &[], traces.len() as f64);
}

/// A metric family's type, as written on its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl MetricType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
            Self::Summary => "summary",
            Self::Untyped => "untyped",
        }
    }
}

/// A Prometheus text exposition (format 0.0.4) being written.
///
/// Declare a family with [`family`](Self::family), then write its samples with
/// [`sample`](Self::sample). Samples are kept with their family, so declaring a family again later
/// adds to it instead of repeating it: `# HELP` and `# TYPE` come once per family, before its
/// samples, in the order families were first declared.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
    current: Option<usize>,
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: MetricType,
    samples: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `name` the family that the following samples belong to, declaring it if new.
    pub fn family(&mut self, name: &str, help: &str, kind: MetricType) -> &mut Self {
        debug_assert!(is_name(name, true), "invalid metric name {name:?}");
        let index = match self.families.iter().position(|f| f.name == name) {
            Some(index) => {
                debug_assert_eq!(self.families[index].kind, kind, "{name} redeclared");
                index
            }
            None => {
                self.families.push(Family {
                    name: name.to_owned(),
                    help: help.to_owned(),
                    kind,
                    samples: String::new(),
                });
                self.families.len() - 1
            }
        };
        self.current = Some(index);
        self
    }

    /// Writes a sample of the current family: its name plus `suffix` (`""`, or `_bucket`, `_sum`,
    /// `_count` for histograms and summaries), the labels with their values escaped, the value.
    pub fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let Some(index) = self.current else {
            if cfg!(debug_assertions) {
                panic!("a sample written before any family");
            }
            return self;
        };
        let Family {
            name,
            kind,
            samples: out,
            ..
        } = &mut self.families[index];
        debug_assert!(
            match kind {
                MetricType::Histogram => ["_bucket", "_sum", "_count"].contains(&suffix),
                MetricType::Summary => ["", "_sum", "_count"].contains(&suffix),
                _ => suffix.is_empty(),
            },
            "suffix {suffix:?} on {kind:?} {name}"
        );
        out.push_str(name);
        out.push_str(suffix);
        for (i, (label, value)) in labels.iter().enumerate() {
            debug_assert!(is_name(label, false), "invalid label name {label:?}");
            out.push(if i == 0 { '{' } else { ',' });
            out.push_str(label);
            out.push_str("=\"");
            escape(out, value, true);
            out.push('"');
        }
        if !labels.is_empty() {
            out.push('}');
        }
        out.push(' ');
        if value.is_nan() {
            out.push_str("NaN");
        } else if value.is_infinite() {
            out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            // `Display` never uses an exponent and prints whole numbers without a fraction.
            let _ = write!(out, "{value}");
        }
        out.push('\n');
        self
    }

    /// The exposition text.
    pub fn finish(self) -> String {
        let mut out = String::with_capacity(
            self.families
                .iter()
                .map(|f| 2 * f.name.len() + f.help.len() + f.samples.len() + 32)
                .sum(),
        );
        for family in &self.families {
            out.push_str("# HELP ");
            out.push_str(&family.name);
            out.push(' ');
            escape(&mut out, &family.help, false);
            out.push_str("\n# TYPE ");
            out.push_str(&family.name);
            out.push(' ');
            out.push_str(family.kind.as_str());
            out.push('\n');
            out.push_str(&family.samples);
        }
        out
    }
}

/// Escapes as the format asks: backslash and newline everywhere, the double quote in label values.
fn escape(out: &mut String, text: &str, quote: bool) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` for metric names; label names are the same without colons.
fn is_name(name: &str, colons: bool) -> bool {
    let ok = |c: char, first: bool| {
        c == '_'
            || c.is_ascii_alphabetic()
            || (!first && c.is_ascii_digit())
            || (colons && c == ':')
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traces::tests::{span, trace_id};
    use std::collections::{HashMap, HashSet};

    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    }

    impl Sample {
        fn label(&self, name: &str) -> Option<&str> {
            self.labels
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    /// A histogram series as its buckets are read.
    #[derive(Default)]
    struct Series {
        last_le: Option<f64>,
        last: f64,
        inf: Option<f64>,
        counted: bool,
    }

    /// Checks what promtool would: each family declared once, HELP then TYPE before its samples,
    /// samples named after their family, label values correctly escaped, histogram buckets
    /// ordered, cumulative and ending in `+Inf`, `_count` equal to `+Inf`. Returns the samples,
    /// label values unescaped.
    fn validate(text: &str) -> Result<(Vec<String>, Vec<Sample>), String> {
        let mut families = Vec::new();
        let mut current: Option<(String, String)> = None;
        let mut help: Option<String> = None;
        let mut series: HashMap<String, Series> = HashMap::new();
        let mut samples = Vec::new();
        let close = |series: &mut HashMap<String, Series>| {
            let open = series.iter().find(|(_, s)| s.inf.is_none() || !s.counted);
            let result = match open {
                Some((key, _)) => Err(format!("histogram series {key} lacks +Inf or _count")),
                None => Ok(()),
            };
            series.clear();
            result
        };
        if !text.is_empty() && !text.ends_with('\n') {
            return Err("the text does not end with a newline".into());
        }
        for (number, line) in text.lines().enumerate() {
            let fail = |what: &str| format!("line {}: {what}: {line:?}", number + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default();
                if families.iter().any(|f| f == name) {
                    return Err(fail("family declared twice"));
                }
                help = Some(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| fail("no type"))?;
                if help.take().as_deref() != Some(name) {
                    return Err(fail("TYPE not right after its HELP"));
                }
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(fail("unknown type"));
                }
                close(&mut series).map_err(|e| fail(&e))?;
                families.push(name.to_owned());
                current = Some((name.to_owned(), kind.to_owned()));
            } else if line.starts_with('#') || help.is_some() {
                return Err(fail("unexpected line"));
            } else {
                let sample = parse_sample(line).map_err(|e| fail(&e))?;
                let (family, kind) = current.as_ref().ok_or_else(|| fail("sample before TYPE"))?;
                let suffix = sample
                    .name
                    .strip_prefix(family.as_str())
                    .ok_or_else(|| fail("sample outside its family"))?;
                let allowed: &[&str] = match kind.as_str() {
                    "histogram" => &["_bucket", "_sum", "_count"],
                    "summary" => &["", "_sum", "_count"],
                    _ => &[""],
                };
                if !allowed.contains(&suffix) {
                    return Err(fail("sample outside its family"));
                }
                if kind == "histogram" {
                    let key = format!("{:?}", {
                        let mut labels = sample.labels.clone();
                        labels.retain(|(n, _)| n != "le");
                        labels.sort();
                        labels
                    });
                    let state = series.entry(key).or_default();
                    match suffix {
                        "_bucket" => {
                            let le = sample
                                .label("le")
                                .ok_or_else(|| fail("bucket without le"))?;
                            let le = parse_value(le).map_err(|e| fail(&e))?;
                            if state.inf.is_some() || state.last_le.is_some_and(|last| le <= last) {
                                return Err(fail("buckets out of order"));
                            }
                            if sample.value < state.last {
                                return Err(fail("buckets not cumulative"));
                            }
                            state.last_le = Some(le);
                            state.last = sample.value;
                            if le == f64::INFINITY {
                                state.inf = Some(sample.value);
                            }
                        }
                        "_count" => {
                            if state.inf != Some(sample.value) {
                                return Err(fail("_count differs from the +Inf bucket"));
                            }
                            state.counted = true;
                        }
                        _ => {}
                    }
                }
                samples.push(sample);
            }
        }
        if help.is_some() {
            return Err("HELP without TYPE at the end".into());
        }
        close(&mut series)?;
        Ok((families, samples))
    }

    fn parse_sample(line: &str) -> Result<Sample, String> {
        let end = line.find(['{', ' ']).ok_or("no value")?;
        let name = &line[..end];
        if !is_name(name, true) {
            return Err("bad metric name".into());
        }
        let mut rest = &line[end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices();
            loop {
                let start = chars.offset();
                let Some((eq, _)) = chars.by_ref().find(|&(_, c)| c == '=') else {
                    return Err("label without value".into());
                };
                let label = &inner[start..eq];
                if !is_name(label, false) {
                    return Err(format!("bad label name {label:?}"));
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err("label value not quoted".into());
                }
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('"') => break,
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => return Err(format!("bad escape {other:?}")),
                        },
                        Some('\n') => return Err("raw newline in label value".into()),
                        Some(c) => value.push(c),
                        None => return Err("unterminated label value".into()),
                    }
                }
                labels.push((label.to_owned(), value));
                match chars.next().map(|(_, c)| c) {
                    Some(',') => continue,
                    Some('}') => break,
                    _ => return Err("labels not closed".into()),
                }
            }
            rest = &inner[chars.offset()..];
        }
        let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
        let value = parse_value(value)?;
        Ok(Sample {
            name: name.to_owned(),
            labels,
            value,
        })
    }

    fn parse_value(text: &str) -> Result<f64, String> {
        match text {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            _ => text.parse().map_err(|_| format!("bad value {text:?}")),
        }
    }

    /// `promtool check metrics`, when it is installed; it also lints names and help.
    fn promtool_check(text: &str) {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("note: promtool is not on PATH; skipped `promtool check metrics`");
                return;
            }
            Err(e) => panic!("running promtool: {e}"),
        };
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("writing to promtool");
        let output = child.wait_with_output().expect("promtool");
        assert!(
            output.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }

    fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> &'a Sample {
        samples
            .iter()
            .find(|s| s.name == name && labels.iter().all(|(n, v)| s.label(n) == Some(v)))
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }

    #[test]
    fn rendered_metrics_are_a_valid_exposition() {
        let metrics = Metrics::new();
        let ms = Duration::from_millis;
        metrics.record_call("gateway", "orders", Some(200), ms(1), 0); // le is inclusive
        metrics.record_call("gateway", "orders", Some(201), ms(7), 0);
        metrics.record_call("gateway", "orders", Some(404), ms(30), 0);
        metrics.record_call("gateway", "orders", Some(503), ms(300), 2);
        metrics.record_call("gateway", "orders", None, Duration::from_secs(11), 1);
        metrics.record_call("orders", "stock", Some(302), ms(2), 0);
        let _held = metrics.in_flight("orders", "stock");
        drop(metrics.in_flight("gateway", "orders"));

        let store = TraceStore::new(2);
        for i in 0..5 {
            store.record(span(trace_id(i), "a", 0, 1));
        }

        let mut out = Exposition::new();
        out.family(
            "flotilla_instances",
            "Instances running.",
            MetricType::Gauge,
        )
        .sample("", &[("service", "orders")], 2.0);
        metrics.render(&mut out);
        render_trace_store(&store, &mut out);
        // The binary may come back to a family it declared: it is still written once.
        out.family(
            "flotilla_instances",
            "Instances running.",
            MetricType::Gauge,
        )
        .sample("", &[("service", "stock")], 1.0);
        let text = out.finish();

        let (families, samples) = validate(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            families,
            [
                "flotilla_instances",
                "flotilla_requests_total",
                "flotilla_request_duration_seconds",
                "flotilla_requests_in_flight",
                "flotilla_retries_total",
                "flotilla_calls_unrecorded_total",
                "flotilla_spans_dropped_total",
                "flotilla_trace_spans",
            ]
        );
        let value = |name, labels: &[(&str, &str)]| find(&samples, name, labels).value;
        let orders = [("caller", "gateway"), ("callee", "orders")];
        let stock = [("caller", "orders"), ("callee", "stock")];
        let with = |edge: [(&'static str, &'static str); 2], extra| {
            let [a, b] = edge;
            [a, b, extra]
        };
        let requests = "flotilla_requests_total";
        assert_eq!(value(requests, &with(orders, ("class", "2xx"))), 2.0);
        assert_eq!(value(requests, &with(orders, ("class", "3xx"))), 0.0);
        assert_eq!(value(requests, &with(orders, ("class", "4xx"))), 1.0);
        assert_eq!(value(requests, &with(orders, ("class", "5xx"))), 1.0);
        assert_eq!(value(requests, &with(orders, ("class", "error"))), 1.0);
        assert_eq!(value(requests, &with(stock, ("class", "3xx"))), 1.0);
        let bucket = "flotilla_request_duration_seconds_bucket";
        assert_eq!(value(bucket, &with(orders, ("le", "0.001"))), 1.0);
        assert_eq!(value(bucket, &with(orders, ("le", "0.01"))), 2.0);
        assert_eq!(value(bucket, &with(orders, ("le", "0.25"))), 3.0);
        assert_eq!(value(bucket, &with(orders, ("le", "10"))), 4.0);
        assert_eq!(value(bucket, &with(orders, ("le", "+Inf"))), 5.0);
        assert_eq!(
            value("flotilla_request_duration_seconds_count", &orders),
            5.0
        );
        let sum = value("flotilla_request_duration_seconds_sum", &orders);
        assert!((sum - 11.338).abs() < 1e-9, "{sum}");
        assert_eq!(value("flotilla_requests_in_flight", &orders), 0.0);
        assert_eq!(value("flotilla_requests_in_flight", &stock), 1.0);
        assert_eq!(value("flotilla_retries_total", &orders), 3.0);
        assert_eq!(value("flotilla_calls_unrecorded_total", &[]), 0.0);
        assert_eq!(value("flotilla_spans_dropped_total", &[]), 3.0);
        assert_eq!(value("flotilla_instances", &[("service", "stock")]), 1.0);
        // Edges are sorted.
        let callers: Vec<_> = samples
            .iter()
            .filter(|s| s.name == "flotilla_retries_total")
            .filter_map(|s| s.label("caller"))
            .collect();
        assert_eq!(callers, ["gateway", "orders"]);

        promtool_check(&text);
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let awkward = "a \"quoted\" C:\\path\nand a second line";
        let mut out = Exposition::new();
        out.family(
            "flotilla_test_info",
            "Help with a \\ and a\nnewline.",
            MetricType::Gauge,
        )
        .sample("", &[("path", awkward), ("plain", "x")], 1.0);
        let text = out.finish();
        assert_eq!(
            text,
            "# HELP flotilla_test_info Help with a \\\\ and a\\nnewline.\n\
             # TYPE flotilla_test_info gauge\n\
             flotilla_test_info{path=\"a \\\"quoted\\\" C:\\\\path\\nand a second line\",plain=\"x\"} 1\n"
        );
        let (_, samples) = validate(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(samples[0].label("path"), Some(awkward));
        promtool_check(&text);
    }

    #[test]
    fn the_validator_rejects_broken_expositions() {
        let broken = [
            // A family declared twice.
            "# HELP a_total x\n# TYPE a_total counter\na_total 1\n\
             # HELP a_total x\n# TYPE a_total counter\na_total 2\n",
            // A sample before its TYPE.
            "a_total 1\n# HELP a_total x\n# TYPE a_total counter\n",
            // Buckets not cumulative.
            "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n\
             h_sum 1\nh_count 1\n",
            // No +Inf bucket.
            "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1\nh_count 2\n",
            // _count not the +Inf bucket.
            "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
            // An unescaped quote.
            "# HELP g x\n# TYPE g gauge\ng{a=\"x\"y\"} 1\n",
        ];
        for text in broken {
            assert!(validate(text).is_err(), "accepted:\n{text}");
        }
    }

    #[test]
    fn bucket_labels_match_the_bounds() {
        for (nanos, label) in BUCKET_NANOS.iter().zip(BUCKET_LABELS) {
            let seconds: f64 = label.parse().expect("a number");
            assert_eq!((seconds * 1e9).round() as u64, *nanos, "{label}");
        }
        assert_eq!(BUCKET_LABELS.last(), Some(&"+Inf"));
    }

    #[test]
    fn concurrent_recording_loses_nothing() {
        const THREADS: u64 = 4;
        const CALLS: u64 = 20_000;
        let metrics = Metrics::new();
        let callees = ["orders", "stock", "payments"];
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let metrics = &metrics;
                scope.spawn(move || {
                    for i in 0..CALLS {
                        let callee = callees[(i % 3) as usize];
                        let _guard = metrics.in_flight("gateway", callee);
                        let status = if (i + thread) % 10 == 0 {
                            None
                        } else {
                            Some(200)
                        };
                        metrics.record_call("gateway", callee, status, Duration::from_micros(i), 1);
                    }
                });
            }
        });
        let mut out = Exposition::new();
        metrics.render(&mut out);
        let text = out.finish();
        let (_, samples) = validate(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let total = |name: &str, class: Option<&str>| -> f64 {
            samples
                .iter()
                .filter(|s| s.name == name && class.is_none_or(|c| s.label("class") == Some(c)))
                .map(|s| s.value)
                .sum()
        };
        let calls = (THREADS * CALLS) as f64;
        assert_eq!(total("flotilla_requests_total", None), calls);
        assert_eq!(
            total("flotilla_requests_total", Some("error")),
            calls / 10.0
        );
        assert_eq!(
            total("flotilla_request_duration_seconds_count", None),
            calls
        );
        assert_eq!(total("flotilla_retries_total", None), calls);
        assert_eq!(total("flotilla_requests_in_flight", None), 0.0);
        let sum = total("flotilla_request_duration_seconds_sum", None);
        let expected = (THREADS * CALLS * (CALLS - 1) / 2) as f64 / 1e6;
        assert!((sum - expected).abs() < 1e-6, "{sum} != {expected}");
    }

    #[test]
    fn edges_beyond_the_limit_are_counted_not_kept() {
        let metrics = Metrics::with_max_edges(2);
        for callee in ["a", "b", "c", "d"] {
            metrics.record_call("gateway", callee, Some(200), Duration::ZERO, 0);
        }
        metrics.record_call("gateway", "a", Some(200), Duration::ZERO, 0);
        let guard = metrics.in_flight("gateway", "e");
        drop(guard);
        let mut out = Exposition::new();
        metrics.render(&mut out);
        let (_, samples) = validate(&out.finish()).expect("valid");
        let callees: HashSet<_> = samples.iter().filter_map(|s| s.label("callee")).collect();
        assert_eq!(callees, HashSet::from(["a", "b"]));
        assert_eq!(
            find(&samples, "flotilla_calls_unrecorded_total", &[]).value,
            2.0
        );
    }
}
