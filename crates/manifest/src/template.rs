//! The `{{...}}` syntax of saga calls and facade parts: text turned into a [`Template`], or an
//! error located inside that text.
//!
//! Only the syntax is checked here. Whether a `steps.NAME` reference names a step that has run
//! by then, or a `path.NAME` a placeholder of the route, depends on the saga or facade around
//! the template, which the caller knows.

use std::ops::Range;

use crate::model::{PathSegment, Template, TemplatePart, TemplateRef};
use crate::suggest::closest;

const ROOTS: [&str; 3] = ["input", "steps", "saga"];
const FACADE_ROOTS: [&str; 2] = ["path", "query"];
const ROOTS_HELP: &str = "an expression starts with `input`, `steps.NAME.response` or `saga.id`";
const FACADE_ROOTS_HELP: &str = "an expression is `path.NAME` (a `{NAME}` of the route's path) or \
                                 `query.NAME` (a query parameter of the client's request)";
const SEGMENT_HELP: &str = "an expression is words of letters, digits, `_` and `-` separated by \
                            single dots, like `input.items.0.sku`";

/// A mistake in a template, with the byte range of the text it concerns.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TemplateError {
    pub range: Range<usize>,
    pub message: String,
    pub help: String,
}

/// Where a template is written, which decides what its expressions may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// A saga step's call: `input`, `steps.NAME.response`, `saga.id`.
    Saga,
    /// A Backend-for-Frontend part's call: `path.NAME`, `query.NAME`.
    Facade,
}

/// Parses `text` as a saga template, returning the template and the byte range of each
/// `{{...}}`, in the order of the template's expressions.
///
/// There is no escape: `{{` always opens an expression and a `}}` outside one is an error, so
/// neither can appear literally.
#[cfg(test)]
pub(crate) fn parse(text: &str) -> Result<(Template, Vec<Range<usize>>), TemplateError> {
    parse_in(text, Dialect::Saga)
}

/// Parses `text` like [`parse`], with the expressions `dialect` allows.
pub(crate) fn parse_in(
    text: &str,
    dialect: Dialect,
) -> Result<(Template, Vec<Range<usize>>), TemplateError> {
    let mut parts = Vec::new();
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        let open = rest.find("{{");
        let close = rest.find("}}");
        let Some(open) = open.filter(|&open| close.is_none_or(|close| open < close)) else {
            if let Some(close) = close {
                return Err(TemplateError {
                    range: pos + close..pos + close + 2,
                    message: "stray `}}` in template".into(),
                    help: "`}}` closes an expression opened with `{{`, like \"{{input.id}}\"; \
                           remove it or add the missing `{{`"
                        .into(),
                });
            }
            parts.push(TemplatePart::Literal(rest.to_owned()));
            break;
        };
        if open > 0 {
            parts.push(TemplatePart::Literal(rest[..open].to_owned()));
        }
        let start = pos + open;
        let inner_start = start + 2;
        let Some(length) = text[inner_start..].find("}}") else {
            return Err(TemplateError {
                range: start..text.len(),
                message: "unclosed `{{` in template".into(),
                help: "close the expression with `}}`, like \"{{input.id}}\"".into(),
            });
        };
        let end = inner_start + length + 2;
        let reference = expression(&text[inner_start..inner_start + length], dialect).map_err(
            |(message, help)| TemplateError {
                range: start..end,
                message,
                help,
            },
        )?;
        parts.push(TemplatePart::Expr(reference));
        ranges.push(start..end);
        pos = end;
    }
    Ok((Template { parts }, ranges))
}

/// What one `{{...}}` names; the error is a message and a help.
fn expression(inner: &str, dialect: Dialect) -> Result<TemplateRef, (String, String)> {
    let written = inner.trim();
    let quoted = format!("`{{{{{written}}}}}`");
    if written.is_empty() {
        return Err((
            "empty expression `{{}}`".into(),
            "write what to insert between the braces, like \"{{input.order_id}}\"".into(),
        ));
    }
    let segments: Vec<&str> = written.split('.').collect();
    for segment in &segments {
        if segment.is_empty() {
            return Err((format!("empty segment in {quoted}"), SEGMENT_HELP.into()));
        }
        if let Some(c) = segment
            .chars()
            .find(|&c| !(c.is_alphanumeric() || c == '_' || c == '-'))
        {
            return Err((
                format!("invalid character {c:?} in {quoted}"),
                SEGMENT_HELP.into(),
            ));
        }
    }
    if dialect == Dialect::Facade {
        return facade_expression(&segments, &quoted);
    }
    match segments[0] {
        "path" | "query" => Err((
            format!("{quoted} is only known in a facade's part"),
            format!("in a saga, {ROOTS_HELP}"),
        )),
        "input" => Ok(TemplateRef::Input(path(&segments[1..], &quoted)?)),
        "steps" => step(&segments, &quoted),
        "saga" if segments[1..] == ["id"] => Ok(TemplateRef::SagaId),
        "saga" => Err((
            format!("unknown saga field in {quoted}"),
            "the only saga field is `saga.id`".into(),
        )),
        root => {
            let help = match closest(root, ROOTS) {
                Some(guess) => format!("did you mean `{guess}`? {ROOTS_HELP}"),
                None => ROOTS_HELP.into(),
            };
            Err((format!("unknown root `{root}` in {quoted}"), help))
        }
    }
}

/// `path.NAME` or `query.NAME`: one parameter each, as text, so nothing follows the name.
fn facade_expression(segments: &[&str], quoted: &str) -> Result<TemplateRef, (String, String)> {
    let root = segments[0];
    let reference: fn(String) -> TemplateRef = match root {
        "path" => TemplateRef::Path,
        "query" => TemplateRef::Query,
        "input" | "steps" | "saga" => {
            return Err((
                format!("{quoted} is only known in a saga"),
                format!("in a facade's part, {FACADE_ROOTS_HELP}"),
            ));
        }
        _ => {
            let help = match closest(root, FACADE_ROOTS) {
                Some(guess) => format!("did you mean `{guess}`? {FACADE_ROOTS_HELP}"),
                None => FACADE_ROOTS_HELP.into(),
            };
            return Err((format!("unknown root `{root}` in {quoted}"), help));
        }
    };
    match &segments[1..] {
        [name] => Ok(reference((*name).to_owned())),
        [] => Err((
            format!("{quoted} names no parameter"),
            format!("{FACADE_ROOTS_HELP}, like \"{{{{{root}.id}}}}\""),
        )),
        [name, ..] => Err((
            format!("a {root} parameter is text and has no fields, in {quoted}"),
            format!("write \"{{{{{root}.{name}}}}}\""),
        )),
    }
}

/// `steps.NAME.response...`. Step names may hold dots, so the name runs up to the first
/// `response` segment.
fn step(segments: &[&str], quoted: &str) -> Result<TemplateRef, (String, String)> {
    const RESULT_HELP: &str = "a step's result is `steps.NAME.response`";
    let Some(&first) = segments.get(1) else {
        return Err((
            format!("{quoted} names no step"),
            format!("{RESULT_HELP}, like \"{{{{steps.reserve-stock.response}}}}\""),
        ));
    };
    let Some(response) = segments
        .iter()
        .skip(2)
        .position(|&s| s == "response")
        .map(|i| i + 2)
    else {
        let fixed = [&segments[..2], &["response"], &segments[2..]]
            .concat()
            .join(".");
        let message = match segments.get(2) {
            None => format!("{quoted} needs `.response`"),
            Some(field) => format!("unknown field `{field}` of step `{first}` in {quoted}"),
        };
        return Err((message, format!("{RESULT_HELP}, like \"{{{{{fixed}}}}}\"")));
    };
    Ok(TemplateRef::Step {
        step: segments[1..response].join("."),
        path: path(&segments[response + 1..], quoted)?,
    })
}

fn path(segments: &[&str], quoted: &str) -> Result<Vec<PathSegment>, (String, String)> {
    segments
        .iter()
        .map(|&segment| {
            if !segment.bytes().all(|b| b.is_ascii_digit()) {
                return Ok(PathSegment::Key(segment.to_owned()));
            }
            segment.parse().map(PathSegment::Index).map_err(|_| {
                (
                    format!("index `{segment}` in {quoted} is too large"),
                    "an all-digit segment indexes an array".into(),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> PathSegment {
        PathSegment::Key(s.into())
    }

    fn parts(text: &str) -> Vec<TemplatePart> {
        parse(text).expect("valid template").0.parts
    }

    #[track_caller]
    fn error(text: &str) -> TemplateError {
        parse(text).expect_err("invalid template")
    }

    #[test]
    fn literals_and_expressions() {
        assert_eq!(parts(""), []);
        assert_eq!(
            parts("/items/{{ input.items.0.sku }}/x"),
            [
                TemplatePart::Literal("/items/".into()),
                TemplatePart::Expr(TemplateRef::Input(vec![
                    key("items"),
                    PathSegment::Index(0),
                    key("sku")
                ])),
                TemplatePart::Literal("/x".into()),
            ]
        );
        assert_eq!(
            parts("{{input}}{{saga.id}}"),
            [
                TemplatePart::Expr(TemplateRef::Input(vec![])),
                TemplatePart::Expr(TemplateRef::SagaId),
            ]
        );
        // A lone brace is text, and so is the one left over after an expression.
        assert_eq!(
            parts("{a} {{input.a}}}"),
            [
                TemplatePart::Literal("{a} ".into()),
                TemplatePart::Expr(TemplateRef::Input(vec![key("a")])),
                TemplatePart::Literal("}".into()),
            ]
        );
    }

    #[test]
    fn step_names_may_hold_dots() {
        assert_eq!(
            parts("{{steps.charge.card.response.id}}"),
            [TemplatePart::Expr(TemplateRef::Step {
                step: "charge.card".into(),
                path: vec![key("id")],
            })]
        );
        assert_eq!(
            parts("{{steps.response.response}}"),
            [TemplatePart::Expr(TemplateRef::Step {
                step: "response".into(),
                path: vec![],
            })]
        );
    }

    #[test]
    fn ranges_cover_the_braces() {
        let (_, ranges) = parse("ab{{input}}c{{ saga.id }}").expect("valid");
        assert_eq!(ranges, [2..11, 12..25]);
    }

    #[test]
    fn mistakes() {
        assert_eq!(error("/a/{{input.id").range, 3..13);
        assert_eq!(error("/a/{{input.id").message, "unclosed `{{` in template");
        assert_eq!(error("x}}{{input}}").range, 1..3);
        assert_eq!(error("x}}").message, "stray `}}` in template");
        assert_eq!(error("{{ }}").message, "empty expression `{{}}`");
        assert_eq!(
            error("{{input..a}}").message,
            "empty segment in `{{input..a}}`"
        );
        assert_eq!(
            error("{{input a}}").message,
            "invalid character ' ' in `{{input a}}`"
        );
        let unknown = error("{{inptu.id}}");
        assert_eq!(unknown.message, "unknown root `inptu` in `{{inptu.id}}`");
        assert!(unknown.help.starts_with("did you mean `input`?"));
        assert_eq!(error("{{steps}}").message, "`{{steps}}` names no step");
        assert_eq!(
            error("{{steps.a}}").message,
            "`{{steps.a}}` needs `.response`"
        );
        let field = error("{{steps.a.foo}}");
        assert_eq!(
            field.message,
            "unknown field `foo` of step `a` in `{{steps.a.foo}}`"
        );
        assert_eq!(
            field.help,
            "a step's result is `steps.NAME.response`, like \"{{steps.a.response.foo}}\""
        );
        assert_eq!(
            error("{{saga.name}}").message,
            "unknown saga field in `{{saga.name}}`"
        );
        assert_eq!(
            error("{{saga}}").message,
            "unknown saga field in `{{saga}}`"
        );
        assert!(
            error("{{input.99999999999999999999999}}")
                .message
                .contains("too large")
        );
    }

    #[test]
    fn facade_expressions() {
        let parts = |text| parse_in(text, Dialect::Facade).expect("valid").0.parts;
        let error = |text| parse_in(text, Dialect::Facade).expect_err("invalid");
        assert_eq!(
            parts("/orders/{{ path.id }}?user={{query.user-id}}"),
            [
                TemplatePart::Literal("/orders/".into()),
                TemplatePart::Expr(TemplateRef::Path("id".into())),
                TemplatePart::Literal("?user=".into()),
                TemplatePart::Expr(TemplateRef::Query("user-id".into())),
            ]
        );
        assert_eq!(error("{{path}}").message, "`{{path}}` names no parameter");
        assert_eq!(
            error("{{query.a.b}}").message,
            "a query parameter is text and has no fields, in `{{query.a.b}}`"
        );
        assert_eq!(error("{{query.a.b}}").help, "write \"{{query.a}}\"");
        assert_eq!(
            error("{{input.id}}").message,
            "`{{input.id}}` is only known in a saga"
        );
        let typo = error("{{pth.id}}");
        assert_eq!(typo.message, "unknown root `pth` in `{{pth.id}}`");
        assert!(
            typo.help.starts_with("did you mean `path`?"),
            "{}",
            typo.help
        );
    }

    #[test]
    fn sagas_refuse_facade_expressions() {
        assert_eq!(
            error("/orders/{{path.id}}").message,
            "`{{path.id}}` is only known in a facade's part"
        );
        assert_eq!(
            error("{{query.x}}").message,
            "`{{query.x}}` is only known in a facade's part"
        );
    }
}
