//! Renders the manifest's checked templates against a saga's data.
//!
//! The language is deliberately tiny — references, no logic — so a template can only read the
//! saga's input, earlier responses and the saga id, and the manifest check catches every name
//! that cannot exist. What it cannot know in advance (a field missing from an actual response)
//! fails the step at run time with a message naming the path.

use std::collections::HashMap;
use std::fmt::Write;

use flotilla_manifest::{BodyTemplate, PathSegment, Template, TemplatePart, TemplateRef};
use serde_json::{Map, Number, Value};

/// What templates may refer to.
pub struct Context<'a> {
    pub saga_id: &'a str,
    pub input: &'a Value,
    /// The responses of the steps that succeeded so far, by step name.
    pub responses: &'a HashMap<String, Value>,
}

impl Context<'_> {
    fn resolve(&self, reference: &TemplateRef) -> Result<Value, String> {
        match reference {
            TemplateRef::SagaId => Ok(Value::String(self.saga_id.to_owned())),
            TemplateRef::Input(path) => walk(self.input, path)
                .cloned()
                .ok_or_else(|| format!("the input has no {}", describe("input", path))),
            TemplateRef::Step { step, path } => {
                let response = self
                    .responses
                    .get(step)
                    .ok_or_else(|| format!("step `{step}` has no response"))?;
                walk(response, path).cloned().ok_or_else(|| {
                    format!(
                        "the response of `{step}` has no {}",
                        describe(&format!("steps.{step}.response"), path)
                    )
                })
            }
            // The manifest refuses them in sagas; a facade's part renders them itself.
            TemplateRef::Path(_) | TemplateRef::Query(_) => Err(format!(
                "{} is not known in a saga",
                describe_ref(reference)
            )),
        }
    }
}

fn walk<'v>(mut value: &'v Value, path: &[PathSegment]) -> Option<&'v Value> {
    for segment in path {
        value = match (segment, value) {
            (PathSegment::Key(key), Value::Object(map)) => map.get(key)?,
            (PathSegment::Index(i), Value::Array(items)) => items.get(*i)?,
            // `items.0` on an object whose key is "0".
            (PathSegment::Index(i), Value::Object(map)) => map.get(&i.to_string())?,
            _ => return None,
        };
    }
    Some(value)
}

fn describe(root: &str, path: &[PathSegment]) -> String {
    let mut text = format!("`{root}");
    for segment in path {
        match segment {
            PathSegment::Key(key) => {
                let _ = write!(text, ".{key}");
            }
            PathSegment::Index(i) => {
                let _ = write!(text, ".{i}");
            }
        }
    }
    text.push('`');
    text
}

/// A value as text inside a string: strings as they are, everything else as JSON.
fn as_text(value: &Value, out: &mut String) {
    match value {
        Value::String(text) => out.push_str(text),
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

/// The path of a call: literal parts as written, each value percent-encoded so that it stays
/// within its segment whatever it holds (`/`, `?`, `#`, spaces…).
pub fn render_path(template: &Template, context: &Context<'_>) -> Result<String, String> {
    let mut path = String::new();
    for part in &template.parts {
        match part {
            TemplatePart::Literal(text) => path.push_str(text),
            TemplatePart::Expr(reference) => {
                let mut text = String::new();
                as_text(&context.resolve(reference)?, &mut text);
                if text.is_empty() {
                    return Err(format!(
                        "{} is empty, and a path segment cannot be",
                        describe_ref(reference)
                    ));
                }
                percent_encode(&text, &mut path);
            }
        }
    }
    Ok(path)
}

fn describe_ref(reference: &TemplateRef) -> String {
    match reference {
        TemplateRef::SagaId => "`saga.id`".into(),
        TemplateRef::Input(path) => describe("input", path),
        TemplateRef::Step { step, path } => describe(&format!("steps.{step}.response"), path),
        TemplateRef::Path(_) | TemplateRef::Query(_) => format!("`{reference}`"),
    }
}

/// RFC 3986 unreserved characters stay; every other byte is escaped.
fn percent_encode(text: &str, out: &mut String) {
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

/// A call's JSON body.
pub fn render_body(template: &BodyTemplate, context: &Context<'_>) -> Result<Value, String> {
    Ok(match template {
        BodyTemplate::Null => Value::Null,
        BodyTemplate::Bool(b) => Value::Bool(*b),
        BodyTemplate::Integer(i) => Value::Number((*i).into()),
        BodyTemplate::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        BodyTemplate::String(template) => match template.single() {
            // A lone reference keeps the value's type: `"{{input.items}}"` is the array.
            Some(reference) => context.resolve(reference)?,
            None => {
                let mut text = String::new();
                for part in &template.parts {
                    match part {
                        TemplatePart::Literal(literal) => text.push_str(literal),
                        TemplatePart::Expr(reference) => {
                            as_text(&context.resolve(reference)?, &mut text);
                        }
                    }
                }
                Value::String(text)
            }
        },
        BodyTemplate::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| render_body(item, context))
                .collect::<Result<_, _>>()?,
        ),
        BodyTemplate::Object(fields) => {
            let mut map = Map::with_capacity(fields.len());
            for (key, value) in fields {
                map.insert(key.clone(), render_body(value, context)?);
            }
            Value::Object(map)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(k: &str) -> PathSegment {
        PathSegment::Key(k.into())
    }

    #[test]
    fn references_keep_their_type_alone_and_become_text_inside_strings() {
        let input = json!({"items": [{"sku": "A/1", "qty": 2}], "total": 12.5});
        let mut responses = HashMap::new();
        responses.insert("reserve".to_owned(), json!({"id": "res 1"}));
        let context = Context {
            saga_id: "sg_1",
            input: &input,
            responses: &responses,
        };
        let items = BodyTemplate::String(Template {
            parts: vec![TemplatePart::Expr(TemplateRef::Input(vec![key("items")]))],
        });
        assert_eq!(
            render_body(&items, &context).unwrap(),
            json!([{"sku": "A/1", "qty": 2}])
        );
        let text = BodyTemplate::String(Template {
            parts: vec![
                TemplatePart::Literal("total ".into()),
                TemplatePart::Expr(TemplateRef::Input(vec![key("total")])),
                TemplatePart::Literal(" for ".into()),
                TemplatePart::Expr(TemplateRef::SagaId),
            ],
        });
        assert_eq!(
            render_body(&text, &context).unwrap(),
            json!("total 12.5 for sg_1")
        );
        let path = Template {
            parts: vec![
                TemplatePart::Literal("/reservations/".into()),
                TemplatePart::Expr(TemplateRef::Step {
                    step: "reserve".into(),
                    path: vec![key("id")],
                }),
                TemplatePart::Literal("/items/".into()),
                TemplatePart::Expr(TemplateRef::Input(vec![
                    key("items"),
                    PathSegment::Index(0),
                    key("sku"),
                ])),
            ],
        };
        assert_eq!(
            render_path(&path, &context).unwrap(),
            "/reservations/res%201/items/A%2F1"
        );
    }

    #[test]
    fn a_missing_value_names_its_path() {
        let input = json!({"order_id": "o1"});
        let responses = HashMap::new();
        let context = Context {
            saga_id: "sg_1",
            input: &input,
            responses: &responses,
        };
        let missing = Template {
            parts: vec![TemplatePart::Expr(TemplateRef::Input(vec![
                key("customer"),
                key("name"),
            ]))],
        };
        let err = render_path(&missing, &context).unwrap_err();
        assert_eq!(err, "the input has no `input.customer.name`");
    }
}
