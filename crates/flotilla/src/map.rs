//! `flotilla map`: the application map — the services with their health and the calls between
//! them observed over a window — for the terminal, Graphviz, Mermaid or as JSON.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use flotilla_control::{AppMap, EdgeStats, HealthStatus, MapNode};

use crate::cli::{MapArgs, MapFormat};
use crate::client::{Control, encode};
use crate::output;

pub async fn run(args: MapArgs) -> Result<ExitCode> {
    let control = Control::locate(&args.target.dir, args.target.control.as_deref())?;
    let map: AppMap = control
        .get(&format!("/v1/map?window={}", encode(&args.window)))
        .await?;
    let format = if args.json {
        MapFormat::Json
    } else {
        args.format
    };
    match format {
        MapFormat::Text => print!("{}", text(&map, output::stdout_is_terminal())),
        MapFormat::Dot => print!("{}", dot(&map)),
        MapFormat::Mermaid => print!("{}", mermaid(&map)),
        MapFormat::Json => println!("{}", serde_json::to_string_pretty(&map)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// The window as the user would write it: `5m`, `30s`.
fn window(map: &AppMap) -> String {
    let window = Duration::try_from_secs_f64(map.window_seconds).unwrap_or_default();
    humantime::format_duration(window).to_string()
}

/// An edge's numbers, worded the same in every format.
struct Figures {
    rate: String,
    errors: String,
    p50: String,
    p99: String,
}

impl Figures {
    fn of(stats: &EdgeStats) -> Self {
        let rate = stats.requests_per_second;
        // Two decimals below one a second, so a trickle does not read as `0.0`.
        let rate = if rate < 1.0 {
            format!("{rate:.2} req/s")
        } else {
            format!("{rate:.1} req/s")
        };
        Self {
            rate,
            errors: format!("{:.1}% errors", stats.error_rate * 100.0),
            p50: format!("p50 {}", output::millis(stats.p50_ms)),
            p99: format!("p99 {}", output::millis(stats.p99_ms)),
        }
    }
}

/// A node's title (`orders v1.0.0`) and its instances (`1/2 healthy`).
fn caption(node: &MapNode) -> (String, String) {
    (
        format!("{} v{}", node.name, node.version),
        format!("{}/{} healthy", node.healthy, node.instances),
    )
}

/// For a terminal: the nodes as a table, then one line per edge, then the unused dependencies.
fn text(map: &AppMap, colour: bool) -> String {
    let window = window(map);
    let nodes: Vec<Vec<String>> = map
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                output::health(n.health, colour),
                format!("{}/{}", n.healthy, n.instances),
                n.version.clone(),
            ]
        })
        .collect();
    let mut out = output::table(&["SERVICE", "HEALTH", "HEALTHY", "VERSION"], &nodes);

    out.push_str(&format!("\ncalls in the last {window}:\n"));
    if map.edges.is_empty() {
        out.push_str("  none\n");
    }
    let edges: Vec<Vec<String>> = map
        .edges
        .iter()
        .map(|e| {
            let figures = Figures::of(&e.stats);
            let errors = if e.stats.errors > 0 {
                output::red(&figures.errors, colour)
            } else {
                figures.errors
            };
            vec![
                format!("  {} → {}", e.stats.caller, e.stats.callee),
                figures.rate,
                errors,
                figures.p50,
                figures.p99,
                if e.declared { "" } else { "undeclared" }.to_owned(),
            ]
        })
        .collect();
    out.push_str(&output::columns(&edges));

    if !map.unused.is_empty() {
        out.push_str(&format!(
            "\ndeclared in depends_on, no calls in the last {window}:\n"
        ));
        for d in &map.unused {
            out.push_str(&format!("  {} → {}\n", d.caller, d.callee));
        }
    }
    out
}

/// A Graphviz digraph: nodes outlined by health, edges labelled with their figures, undeclared
/// calls bold orange, unused dependencies dashed grey.
fn dot(map: &AppMap) -> String {
    let mut out = String::from(
        "digraph flotilla {\n  rankdir=LR;\n  node [shape=box, style=rounded, fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n",
    );
    for node in &map.nodes {
        let (title, healthy) = caption(node);
        let colour = match node.health {
            HealthStatus::Healthy => "darkgreen",
            HealthStatus::Degraded => "orange",
            HealthStatus::Down => "red",
        };
        // The outline's colour says the health; in words only when it needs a look.
        let mut lines = vec![title.as_str(), healthy.as_str()];
        if node.health != HealthStatus::Healthy {
            lines.push(node.health.as_str());
        }
        out.push_str(&format!(
            "  {} [label={}, color={colour}];\n",
            dot_id(&node.name),
            dot_label(&lines)
        ));
    }
    for edge in &map.edges {
        let f = Figures::of(&edge.stats);
        let p = format!("{}  {}", f.p50, f.p99);
        let mut attributes = Vec::new();
        if edge.declared {
            attributes.push(format!("label={}", dot_label(&[&f.rate, &f.errors, &p])));
        } else {
            let label = dot_label(&["undeclared", &f.rate, &f.errors, &p]);
            attributes.push(format!("label={label}, style=bold, color=orange"));
        }
        if edge.stats.errors > 0 {
            attributes.push("fontcolor=red".into());
        }
        out.push_str(&format!(
            "  {} -> {} [{}];\n",
            dot_id(&edge.stats.caller),
            dot_id(&edge.stats.callee),
            attributes.join(", ")
        ));
    }
    for d in &map.unused {
        out.push_str(&format!(
            "  {} -> {} [label=\"unused\", style=dashed, color=gray, fontcolor=gray];\n",
            dot_id(&d.caller),
            dot_id(&d.callee)
        ));
    }
    out.push_str("}\n");
    out
}

/// A quoted DOT id: any text, with `"` and `\` escaped.
fn dot_id(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A quoted DOT label of several lines (`\n` is DOT's own line break inside a label).
fn dot_label(lines: &[&str]) -> String {
    let escaped: Vec<String> = lines
        .iter()
        .map(|l| l.replace('\\', "\\\\").replace('"', "\\\""))
        .collect();
    format!("\"{}\"", escaped.join("\\n"))
}

/// A Mermaid flowchart (`graph LR`): renders in GitHub and GitLab Markdown.
fn mermaid(map: &AppMap) -> String {
    let mut out = String::from("graph LR\n");
    for node in &map.nodes {
        let (title, healthy) = caption(node);
        out.push_str(&format!(
            "  {}[\"{}<br/>{}\"]:::{}\n",
            mermaid_id(&node.name),
            mermaid_text(&title),
            mermaid_text(&healthy),
            node.health.as_str()
        ));
    }
    for edge in &map.edges {
        let f = Figures::of(&edge.stats);
        let figures = format!("{}, {}<br/>{}, {}", f.rate, f.errors, f.p50, f.p99);
        // A thick arrow for a call nobody declared, so it stands out.
        let (arrow, label) = if edge.declared {
            ("-->", figures)
        } else {
            ("==>", format!("undeclared<br/>{figures}"))
        };
        out.push_str(&format!(
            "  {} {arrow}|\"{}\"| {}\n",
            mermaid_id(&edge.stats.caller),
            mermaid_text(&label),
            mermaid_id(&edge.stats.callee)
        ));
    }
    for d in &map.unused {
        out.push_str(&format!(
            "  {} -.->|unused| {}\n",
            mermaid_id(&d.caller),
            mermaid_id(&d.callee)
        ));
    }
    out.push_str(
        "  classDef healthy stroke:#2e7d32,stroke-width:2px\n  \
         classDef degraded stroke:#f9a825,stroke-width:2px\n  \
         classDef down stroke:#c62828,stroke-width:2px\n",
    );
    out
}

/// Words Mermaid reads as statements at the start of a line, or as the end of a block.
const MERMAID_KEYWORDS: &[&str] = &[
    "end",
    "graph",
    "flowchart",
    "subgraph",
    "style",
    "class",
    "classDef",
    "click",
    "linkStyle",
    "direction",
    "default",
];

/// A Mermaid node id for a service name: `-` is read as part of an arrow, and keywords break the
/// chart, so `order-history` becomes `order_history` and `end` becomes `end_`. Service names hold
/// no `_`, so no two names meet.
fn mermaid_id(name: &str) -> String {
    let id: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if MERMAID_KEYWORDS.contains(&id.as_str()) {
        format!("{id}_")
    } else {
        id
    }
}

/// Text inside a quoted Mermaid label: a `"` would end it, so it goes as an entity.
fn mermaid_text(text: &str) -> String {
    text.replace('"', "#quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_control::{Dependency, MapEdge};

    fn node(name: &str, health: HealthStatus, healthy: u32, instances: u32) -> MapNode {
        MapNode {
            name: name.into(),
            health,
            instances,
            healthy,
            version: "1.0.0".into(),
        }
    }

    fn edge(caller: &str, callee: &str, rps: f64, error_rate: f64, declared: bool) -> MapEdge {
        MapEdge {
            stats: EdgeStats {
                caller: caller.into(),
                callee: callee.into(),
                requests: (rps * 300.0) as u64,
                errors: (rps * 300.0 * error_rate) as u64,
                requests_per_second: rps,
                error_rate,
                p50_ms: 3.0,
                p99_ms: 12.4,
            },
            declared,
        }
    }

    fn map() -> AppMap {
        AppMap {
            window_seconds: 300.0,
            nodes: vec![
                node("gateway", HealthStatus::Healthy, 1, 1),
                node("orders", HealthStatus::Degraded, 1, 2),
                node("order-history", HealthStatus::Down, 0, 1),
            ],
            edges: vec![
                edge("gateway", "orders", 12.0, 0.005, true),
                edge("orders", "order-history", 0.05, 0.0, false),
            ],
            unused: vec![Dependency {
                caller: "orders".into(),
                callee: "payments".into(),
            }],
        }
    }

    #[test]
    fn text_lists_nodes_edges_and_unused_dependencies() {
        assert_eq!(
            text(&map(), false),
            "SERVICE        HEALTH    HEALTHY  VERSION\n\
             gateway        healthy   1/1      1.0.0\n\
             orders         degraded  1/2      1.0.0\n\
             order-history  down      0/1      1.0.0\n\
             \n\
             calls in the last 5m:\n  \
             gateway → orders        12.0 req/s  0.5% errors  p50 3ms  p99 12ms\n  \
             orders → order-history  0.05 req/s  0.0% errors  p50 3ms  p99 12ms  undeclared\n\
             \n\
             declared in depends_on, no calls in the last 5m:\n  \
             orders → payments\n"
        );
        let quiet = AppMap {
            edges: vec![],
            unused: vec![],
            ..map()
        };
        assert!(text(&quiet, false).ends_with("calls in the last 5m:\n  none\n"));
        let coloured = text(&map(), true);
        assert!(coloured.contains("\x1b[31mdown\x1b[0m"), "{coloured}");
        assert!(!text(&map(), false).contains('\x1b'));
    }

    #[test]
    fn dot_is_a_digraph_of_quoted_ids() {
        let graph = dot(&map());
        assert!(graph.starts_with("digraph flotilla {\n"), "{graph}");
        assert!(graph.ends_with("}\n"));
        for line in [
            r#"  "orders" [label="orders v1.0.0\n1/2 healthy\ndegraded", color=orange];"#,
            r#"  "gateway" [label="gateway v1.0.0\n1/1 healthy", color=darkgreen];"#,
            r#"  "gateway" -> "orders" [label="12.0 req/s\n0.5% errors\np50 3ms  p99 12ms", fontcolor=red];"#,
            r#"  "orders" -> "order-history" [label="undeclared\n0.05 req/s\n0.0% errors\np50 3ms  p99 12ms", style=bold, color=orange];"#,
            r#"  "orders" -> "payments" [label="unused", style=dashed, color=gray, fontcolor=gray];"#,
        ] {
            assert!(graph.lines().any(|l| l == line), "{line} missing:\n{graph}");
        }
        // Every statement ends its line; braces balance; quotes pair up.
        for line in graph.lines().skip(1).filter(|l| *l != "}") {
            assert!(line.ends_with(';'), "{line}");
            assert_eq!(
                line.replace("\\\"", "").matches('"').count() % 2,
                0,
                "{line}"
            );
        }
        assert_eq!(dot_id("a\"b\\c"), r#""a\"b\\c""#);
    }

    #[test]
    fn mermaid_is_a_flowchart_with_safe_ids_and_labelled_edges() {
        let chart = mermaid(&map());
        let lines: Vec<&str> = chart.lines().collect();
        assert_eq!(lines[0], "graph LR");
        for line in [
            r#"  gateway["gateway v1.0.0<br/>1/1 healthy"]:::healthy"#,
            r#"  order_history["order-history v1.0.0<br/>0/1 healthy"]:::down"#,
            r#"  gateway -->|"12.0 req/s, 0.5% errors<br/>p50 3ms, p99 12ms"| orders"#,
            r#"  orders ==>|"undeclared<br/>0.05 req/s, 0.0% errors<br/>p50 3ms, p99 12ms"| order_history"#,
            "  orders -.->|unused| payments",
            "  classDef down stroke:#c62828,stroke-width:2px",
        ] {
            assert!(lines.contains(&line), "{line} missing:\n{chart}");
        }
        assert_eq!(mermaid_id("end"), "end_");
        assert_eq!(mermaid_text("v\"2\""), "v#quot;2#quot;");
    }
}
