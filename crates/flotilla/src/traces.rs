//! `flotilla traces` and `flotilla trace ID`: recent requests as the proxies saw them, and one of
//! them as a waterfall of its hops.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use flotilla_control::TraceDetail;
use flotilla_control::api::{Span, TraceSummary};

use crate::cli::{TraceArgs, TracesArgs};
use crate::client::{Control, encode};
use crate::output;

pub async fn list(args: TracesArgs) -> Result<ExitCode> {
    let control = Control::locate(&args.target.dir, args.target.control.as_deref())?;
    let mut query = Vec::new();
    if let Some(service) = &args.service {
        query.push(format!("service={}", encode(service)));
    }
    if args.errors {
        query.push("errors=true".into());
    }
    if let Some(n) = args.slowest {
        query.push(format!("slowest={n}"));
    }
    if let Some(since) = &args.since {
        query.push(format!("since={}", encode(since)));
    }
    if let Some(limit) = args.limit {
        query.push(format!("limit={limit}"));
    }
    let traces: Vec<TraceSummary> = control
        .get(&format!("/v1/traces?{}", query.join("&")))
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&traces)?);
    } else if traces.is_empty() {
        output::note("no traces match: each request through the gateway makes one");
    } else {
        print!(
            "{}",
            trace_table(&traces, output::stdout_is_terminal(), output::local_time)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show(args: TraceArgs) -> Result<ExitCode> {
    let control = Control::locate(&args.target.dir, args.target.control.as_deref())?;
    let trace: TraceDetail = control
        .get(&format!("/v1/traces/{}", encode(args.id.trim())))
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&trace)?);
    } else {
        print!(
            "{}",
            waterfall(&trace, output::stdout_is_terminal(), output::local_time)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per trace; `time` formats the start (the local time zone, outside tests).
fn trace_table(
    traces: &[TraceSummary],
    colour: bool,
    time: impl Fn(SystemTime) -> String,
) -> String {
    let rows: Vec<Vec<String>> = traces
        .iter()
        .map(|t| {
            vec![
                t.trace_id.to_string(),
                time(t.start),
                output::duration(t.duration),
                t.spans.to_string(),
                t.services.join(","),
                format!("{}: {}", t.root_service, t.root_name),
                if t.error {
                    output::red("error", colour)
                } else {
                    "ok".into()
                },
            ]
        })
        .collect();
    output::table(
        &[
            "TRACE", "START", "DURATION", "SPANS", "SERVICES", "ROOT", "STATUS",
        ],
        &rows,
    )
}

/// Columns the bars are drawn on: the whole trace, from its first start to its last end.
const BAR_WIDTH: usize = 40;

/// The trace as a waterfall: a header, then one line per span, children indented under their
/// parents in start order, each with a bar placed and sized on the trace's timeline and its
/// duration; failed spans in red (when `colour`) with why they failed.
fn waterfall(trace: &TraceDetail, colour: bool, time: impl Fn(SystemTime) -> String) -> String {
    let spans = &trace.spans;
    let Some(first) = spans.iter().map(|s| s.start).min() else {
        return format!("trace {} has no spans\n", trace.trace_id);
    };
    let last = spans.iter().map(Span::end).max().unwrap_or(first);
    let extent = last.duration_since(first).unwrap_or_default();
    let mut services: Vec<&str> = spans.iter().map(|s| &*s.service).collect();
    services.sort_unstable();
    services.dedup();
    let mut out = format!(
        "trace {}  {}  {}  {} spans  {}\n",
        trace.trace_id,
        time(first),
        output::duration(extent),
        spans.len(),
        services.join(", "),
    );

    let lines: Vec<(String, &Span)> = tree(spans)
        .into_iter()
        .map(|(depth, span)| {
            let who = match &span.instance {
                Some(instance) => format!("{}/{instance}", span.service),
                None => span.service.to_string(),
            };
            (
                format!("{:indent$}{who}  {}", "", span.title(), indent = 2 * depth),
                span,
            )
        })
        .collect();
    let width = lines
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    for (label, span) in lines {
        let mut line = format!(
            "{label:<width$}  |{}|  {}",
            bar(span, first, extent),
            output::duration(span.duration)
        );
        if span.is_error() {
            let _ = write!(line, "  {}", failure(span));
            line = output::red(&line, colour);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The span's stretch of the timeline `[first, first + extent]`, as `BAR_WIDTH` columns: at
/// least one column filled, so the shortest span still shows where it happened.
fn bar(span: &Span, first: SystemTime, extent: Duration) -> String {
    let (from, to) = if extent.is_zero() {
        (0, BAR_WIDTH)
    } else {
        let column = |t: SystemTime| {
            let offset = t.duration_since(first).unwrap_or_default();
            let share = offset.as_secs_f64() / extent.as_secs_f64();
            ((share * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH)
        };
        let from = column(span.start).min(BAR_WIDTH - 1);
        (from, column(span.end()).max(from + 1))
    };
    (0..BAR_WIDTH)
        .map(|i| if (from..to).contains(&i) { '█' } else { ' ' })
        .collect()
}

/// `error 503: upstream timed out`, from whatever the span knows.
fn failure(span: &Span) -> String {
    let mut text = "error".to_owned();
    if let Some(status) = span.http.status {
        let _ = write!(text, " {status}");
    }
    if let Some(message) = &span.status_message {
        let _ = write!(text, ": {message}");
    }
    text
}

/// The spans in tree order with their depth: each root (no parent, or a parent not held) in start
/// order, followed by its children in start order, recursively. Spans caught in a parent cycle
/// (only spans sent from outside could be) are shown as roots rather than lost.
fn tree(spans: &[Span]) -> Vec<(usize, &Span)> {
    let index: HashMap<_, usize> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| (s.span_id, i))
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); spans.len()];
    let mut roots = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        match span.parent_span_id.and_then(|p| index.get(&p)) {
            Some(&parent) if parent != i => children[parent].push(i),
            _ => roots.push(i),
        }
    }
    // Stable: spans that start together keep the order the store gave (parents first).
    let by_start = |list: &mut Vec<usize>| list.sort_by_key(|&i| spans[i].start);
    by_start(&mut roots);
    children.iter_mut().for_each(by_start);

    let mut ordered = Vec::with_capacity(spans.len());
    let mut seen = vec![false; spans.len()];
    // After the roots, every span again: those not yet seen hang in a cycle and start its tree.
    for top in roots.into_iter().chain(0..spans.len()) {
        // Depth first, children pushed in reverse so the earliest comes out first.
        let mut stack = vec![(top, 0)];
        while let Some((i, depth)) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            ordered.push((depth, &spans[i]));
            stack.extend(children[i].iter().rev().map(|&c| (c, depth + 1)));
        }
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_control::api::TraceId;
    use flotilla_telemetry::{HttpHop, SpanId, SpanKind, SpanStatus};

    fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
    }

    fn span(parent: Option<&Span>, service: &str, name: &str, start_ms: u64, ms: u64) -> Span {
        Span {
            trace_id: TraceId::parse("4bf92f3577b34da6a3ce929d0e0e4736").expect("id"),
            span_id: SpanId::random(),
            parent_span_id: parent.map(|p| p.span_id),
            service: service.into(),
            instance: None,
            name: name.to_owned().into(),
            kind: SpanKind::Server,
            start: t(start_ms),
            duration: Duration::from_millis(ms),
            status: SpanStatus::Unset,
            status_message: None,
            http: HttpHop::default(),
            attributes: Vec::new(),
        }
    }

    /// gateway → orders → (stock, then payments failing), 100 ms in all.
    fn trace() -> TraceDetail {
        let root = span(None, "gateway", "GET orders", 0, 100);
        let orders = Span {
            instance: Some("orders-1".into()),
            ..span(Some(&root), "orders", "GET /orders", 0, 100)
        };
        let stock = span(Some(&orders), "orders", "GET stock", 25, 50);
        let mut payments = span(Some(&orders), "orders", "POST payments", 80, 10);
        payments.status = SpanStatus::Error;
        payments.http.status = Some(503);
        payments.status_message = Some("no healthy instance".into());
        let stock_server = Span {
            instance: Some("stock-2".into()),
            ..span(Some(&stock), "stock", "GET /stock", 25, 50)
        };
        TraceDetail {
            trace_id: root.trace_id,
            // Not in tree order: the waterfall must put children under their parents.
            spans: vec![root, orders, stock, payments, stock_server],
        }
    }

    fn at(_: SystemTime) -> String {
        "12:00:00.000".into()
    }

    #[test]
    fn the_waterfall_nests_children_under_parents_with_proportional_bars() {
        let text = waterfall(&trace(), false, at);
        let blocks = |n: usize| "█".repeat(n);
        let spaces = |n: usize| " ".repeat(n);
        let want = [
            "trace 4bf92f3577b34da6a3ce929d0e0e4736  12:00:00.000  100ms  5 spans  gateway, orders, stock".to_owned(),
            format!("gateway  GET orders              |{}|  100ms", blocks(40)),
            format!("  orders/orders-1  GET /orders   |{}|  100ms", blocks(40)),
            format!(
                "    orders  GET stock            |{}{}{}|  50ms",
                spaces(10),
                blocks(20),
                spaces(10)
            ),
            format!(
                "      stock/stock-2  GET /stock  |{}{}{}|  50ms",
                spaces(10),
                blocks(20),
                spaces(10)
            ),
            format!(
                "    orders  POST payments        |{}{}{}|  10ms  error 503: no healthy instance",
                spaces(32),
                blocks(4),
                spaces(4)
            ),
        ];
        let got: Vec<&str> = text.lines().collect();
        assert_eq!(got, want, "\n{text}");
    }

    #[test]
    fn errors_are_red_only_with_colour() {
        let plain = waterfall(&trace(), false, at);
        assert!(!plain.contains('\x1b'), "{plain}");
        let coloured = waterfall(&trace(), true, at);
        let red: Vec<&str> = coloured.lines().filter(|l| l.contains('\x1b')).collect();
        assert_eq!(red.len(), 1, "{coloured}");
        assert!(
            red[0].starts_with("\x1b[31m    orders  POST payments"),
            "{coloured}"
        );
        assert!(red[0].ends_with("\x1b[0m"));
    }

    #[test]
    fn short_and_instant_spans_still_show() {
        let root = span(None, "gateway", "GET a", 0, 1_000);
        let blip = span(Some(&root), "a", "GET /", 999, 0);
        let line = |detail: &TraceDetail| {
            waterfall(detail, false, at)
                .lines()
                .last()
                .map(str::to_owned)
        };
        let both = TraceDetail {
            trace_id: root.trace_id,
            spans: vec![root.clone(), blip.clone()],
        };
        assert!(
            line(&both).is_some_and(|l| l.contains(&format!("|{}█|", " ".repeat(39)))),
            "{:?}",
            line(&both)
        );
        let alone = TraceDetail {
            trace_id: root.trace_id,
            spans: vec![blip],
        };
        assert!(line(&alone).is_some_and(|l| l.contains(&"█".repeat(40))));
    }

    #[test]
    fn orphans_and_cycles_are_shown_not_lost() {
        let mut a = span(None, "a", "x", 0, 10);
        let mut b = span(None, "b", "y", 1, 5);
        a.parent_span_id = Some(b.span_id);
        b.parent_span_id = Some(a.span_id);
        let orphan = Span {
            parent_span_id: Some(SpanId::random()),
            ..span(None, "c", "z", 2, 1)
        };
        let spans = [a, b, orphan];
        let order: Vec<(usize, &str)> = tree(&spans)
            .into_iter()
            .map(|(d, s)| (d, &*s.service))
            .collect();
        assert_eq!(order, [(0, "c"), (0, "a"), (1, "b")]);
    }

    #[test]
    fn the_trace_table_marks_errors() {
        let summary = |error| TraceSummary {
            trace_id: TraceId::parse("4bf92f3577b34da6a3ce929d0e0e4736").expect("id"),
            root_service: "gateway".into(),
            root_name: "GET orders".into(),
            start: t(0),
            duration: Duration::from_micros(14_200),
            spans: 4,
            services: vec!["gateway".into(), "orders".into()],
            error,
        };
        let table = trace_table(&[summary(false), summary(true)], false, at);
        assert_eq!(
            table,
            "TRACE                             START         DURATION  SPANS  SERVICES        ROOT                 STATUS\n\
             4bf92f3577b34da6a3ce929d0e0e4736  12:00:00.000  14ms      4      gateway,orders  gateway: GET orders  ok\n\
             4bf92f3577b34da6a3ce929d0e0e4736  12:00:00.000  14ms      4      gateway,orders  gateway: GET orders  error\n"
        );
        let coloured = trace_table(&[summary(true)], true, at);
        assert!(coloured.contains("\x1b[31merror\x1b[0m"), "{coloured}");
    }
}
