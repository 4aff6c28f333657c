//! Field selections (`fields = "id,items(sku,qty),/payment/status"`) applied to a part's JSON.
//!
//! The result is written as JSON text straight away rather than built as a [`Value`]: members
//! come out in the order the selection names them, which a `serde_json` map (sorted by key)
//! would lose, and nothing is copied twice.

use flotilla_manifest::ProjectedField;
use serde_json::Value;

/// Writes `value` cut down to `fields` into `out`.
///
/// A selection applies to an object, or to each element of an array; other values (strings,
/// numbers, `null`) have nothing to select from and are written as they are. A selected member
/// or pointer that is missing from the data is left out: services omit empty fields, and a
/// client is better served by a smaller object than by an error.
pub fn project(value: &Value, fields: &[ProjectedField], out: &mut Vec<u8>) {
    match value {
        Value::Object(_) => {
            out.push(b'{');
            let mut first = true;
            for field in fields {
                let (name, selected, nested) = match field {
                    ProjectedField::Member { name, nested } => {
                        (name.as_str(), value.get(name), nested.as_deref())
                    }
                    ProjectedField::Pointer { tokens } => (
                        tokens.last().map_or("", String::as_str),
                        pointer(value, tokens),
                        None,
                    ),
                };
                let Some(selected) = selected else {
                    continue;
                };
                if !std::mem::take(&mut first) {
                    out.push(b',');
                }
                // A string always serializes, and a Vec always takes the bytes.
                let _ = serde_json::to_writer(&mut *out, name);
                out.push(b':');
                match nested {
                    Some(nested) => project(selected, nested, out),
                    None => write(selected, out),
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                project(item, fields, out);
            }
            out.push(b']');
        }
        other => write(other, out),
    }
}

/// The value under decoded RFC 6901 `tokens`: members of objects, indices of arrays (decimal,
/// no leading zeros; `-`, past the end, names nothing).
fn pointer<'v>(mut value: &'v Value, tokens: &[String]) -> Option<&'v Value> {
    for token in tokens {
        value = match value {
            Value::Object(members) => members.get(token)?,
            Value::Array(items) => {
                let canonical = token == "0" || !token.starts_with('0');
                if !canonical || !token.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                items.get(token.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(value)
}

fn write(value: &Value, out: &mut Vec<u8>) {
    // A `Value` always serializes (its keys are strings) and a Vec always takes the bytes.
    let _ = serde_json::to_writer(&mut *out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn member(name: &str) -> ProjectedField {
        ProjectedField::Member {
            name: name.into(),
            nested: None,
        }
    }

    fn nested(name: &str, fields: Vec<ProjectedField>) -> ProjectedField {
        ProjectedField::Member {
            name: name.into(),
            nested: Some(fields),
        }
    }

    fn pointer(tokens: &[&str]) -> ProjectedField {
        ProjectedField::Pointer {
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn text(value: &Value, fields: &[ProjectedField]) -> String {
        let mut out = Vec::new();
        project(value, fields, &mut out);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn members_in_selection_order_missing_ones_left_out() {
        let order = json!({"id": "o-1", "status": "confirmed", "total": 12.5, "customer": "c"});
        assert_eq!(
            text(&order, &[member("total"), member("id"), member("gone")]),
            r#"{"total":12.5,"id":"o-1"}"#
        );
        assert_eq!(text(&order, &[member("gone")]), "{}");
    }

    #[test]
    fn nested_selections_apply_to_objects_and_to_each_element() {
        let order = json!({
            "id": "o-1",
            "items": [{"sku": "TEA", "qty": 2, "price": 3}, {"sku": "MUG", "price": 9}, "odd"],
            "customer": {"name": "Ada", "email": "ada@example.com"},
        });
        let fields = [
            nested("items", vec![member("sku"), member("qty")]),
            nested("customer", vec![member("name")]),
        ];
        assert_eq!(
            text(&order, &fields),
            r#"{"items":[{"sku":"TEA","qty":2},{"sku":"MUG"},"odd"],"customer":{"name":"Ada"}}"#
        );
        // A top-level selection on a list (a lookup by query) applies to each element.
        let list = json!([{"id": "s-1", "status": "created", "address": "x"}]);
        assert_eq!(
            text(&list, &[member("status")]),
            r#"[{"status":"created"}]"#
        );
        // Scalars and null have nothing to select from.
        assert_eq!(text(&json!(null), &[member("status")]), "null");
        assert_eq!(
            text(&json!({"items": 3}), &[nested("items", vec![member("a")])]),
            r#"{"items":3}"#
        );
    }

    #[test]
    fn pointers_take_the_value_under_their_last_token() {
        let value = json!({
            "payment": {"status": "authorized", "card": {"last4": "4242"}},
            "items": [{"sku": "TEA"}, {"sku": "MUG"}],
            "a/b": {"~c": 1},
        });
        assert_eq!(
            text(
                &value,
                &[
                    pointer(&["payment", "status"]),
                    pointer(&["items", "1", "sku"]),
                    pointer(&["a/b", "~c"]),
                    pointer(&["payment", "card"]),
                ]
            ),
            r#"{"status":"authorized","sku":"MUG","~c":1,"card":{"last4":"4242"}}"#
        );
        for missing in [
            &["payment", "nope"][..],
            &["items", "2"],
            &["items", "01"],
            &["items", "-"],
            &["payment", "status", "x"],
        ] {
            assert_eq!(text(&value, &[pointer(missing)]), "{}", "{missing:?}");
        }
    }

    #[test]
    fn names_are_escaped_as_json() {
        let value = json!({"say \"hi\"": 1});
        assert_eq!(text(&value, &[member("say \"hi\"")]), r#"{"say \"hi\"":1}"#);
    }
}
