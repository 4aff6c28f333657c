//! `[bff.NAME]`: Backend-for-Frontend facades. Each route of a facade calls several services
//! (its parts, written like saga calls) and answers with their JSON merged into one object, each
//! part cut down to the `fields` the client needs.

use std::collections::HashMap;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::sagas::{CALL_HELP, CallScope, METHODS, next_word};
use super::{Checker, Span, Value, a_type};
use crate::edge::{Authenticator, Bff, BffPart, BffRoute, ProjectedField, Projection};
use crate::model::{Route, Service, TemplateRef};
use crate::suggest::closest;
use crate::template::Dialect;

const FACADE_KEYS: &[&str] = &["prefix", "routes"];
const ROUTE_KEYS: &[&str] = &["path", "method", "parts", "auth", "scopes"];
const PART_KEYS: &[&str] = &["call", "optional", "fields"];
const MAX_NAME: usize = 64;
/// Deeper field selections are refused: nobody writes them, and parsing recurses.
const MAX_NESTING: usize = 16;
const PREFIX_HELP: &str = "a facade prefix is a path like \"/web\" or \"/mobile/v2\": segments of \
                           letters, digits, `-`, `.`, `_` and `~`";
const PATH_HELP: &str = "write the route's path below the facade's prefix, like \
                         \"/orders/{id}\": segments of letters, digits, `-`, `.`, `_` and `~`, or \
                         a `{name}` placeholder for a whole segment";
const FIELDS_HELP: &str = "list members separated by commas, like \"id,status,items(sku,qty)\"; \
                           `name(a,b)` selects within a member (within each element of an \
                           array), and `/a/b` takes the value under a JSON pointer";

/// One segment of a route's path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Literal(String),
    Placeholder(String),
}

/// A facade part's call: its templates may name `path.NAME` for the route's placeholders and any
/// `query.NAME`.
struct PartScope<'a> {
    /// The route's path as written, for messages.
    path: &'a str,
    /// Its placeholders; `None` when the path itself was invalid (already reported), so that
    /// nothing is reported twice.
    placeholders: Option<&'a [String]>,
}

impl CallScope for PartScope<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Facade
    }

    fn caller(&self) -> &'static str {
        "a facade"
    }

    fn holder(&self) -> &'static str {
        "a part"
    }

    fn check(&self, reference: &TemplateRef) -> Result<(), (String, String)> {
        let (TemplateRef::Path(name), Some(placeholders)) = (reference, self.placeholders) else {
            return Ok(());
        };
        if placeholders.contains(name) {
            return Ok(());
        }
        let path = self.path;
        let help = if placeholders.is_empty() {
            format!(
                "the route's path `{path}` has no placeholders; add one for a whole segment, \
                 like `{path}/{{{name}}}`"
            )
        } else {
            let list = format!(
                "the placeholders of `{path}` are: {}",
                placeholders.join(", ")
            );
            match closest(name, placeholders.iter().map(String::as_str)) {
                Some(guess) => format!("did you mean `path.{guess}`? {list}"),
                None => list,
            }
        };
        Err((
            format!("unknown path parameter `{name}` in `{{{{path.{name}}}}}`"),
            help,
        ))
    }
}

/// Why `name` cannot name a facade or a part, if it cannot. Part names become JSON members and
/// entries of the `Flotilla-Degraded` header, so they stay plain.
fn name_error(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Some(format!("it must be 1 to {MAX_NAME} characters long"));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    (!name.bytes().all(allowed)).then(|| "only letters, digits, `-` and `_` are allowed".into())
}

/// A literal path character that needs no escaping in a facade's prefix or route.
fn plain_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// Whether the path `inner` is `outer` or lies below it, by whole segments.
fn within(inner: &str, outer: &str) -> bool {
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Checker<'_> {
    /// Every `[bff.NAME]`, in file order; `routes` are the gateway's, whose prefixes a facade
    /// must leave alone.
    pub(super) fn bffs(
        &mut self,
        value: &Value<'_>,
        services: &[Service],
        routes: &[Route],
        authenticators: &[Authenticator],
    ) -> Vec<Bff> {
        let Some(table) = self.table(value, "bff") else {
            return Vec::new();
        };
        let mut entries: Vec<_> = table.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        let mut facades = Vec::new();
        // Each valid prefix with its facade and the line it was given on.
        let mut claimed: Vec<(String, String, usize)> = Vec::new();
        for (key, value) in entries {
            let name: &str = key.get_ref();
            if let Some(reason) = name_error(name) {
                self.error(
                    &key.span(),
                    format!("invalid facade name {name:?}: {reason}"),
                    Some("name facades after their clients, like `web` or `mobile`".into()),
                );
            }
            let DeValue::Table(body) = value.get_ref() else {
                self.error(
                    &value.span(),
                    format!(
                        "facade `{name}` must be a table, found {}",
                        a_type(value.get_ref())
                    ),
                    Some(format!(
                        "define it as a [bff.{name}] section with [[bff.{name}.routes]]"
                    )),
                );
                continue;
            };
            let path = format!("bff.{name}");
            self.unknown_keys(body, FACADE_KEYS, &format!("in [{path}]"));
            let prefix = self.facade_prefix(name, &key.span(), body, &mut claimed, routes);
            let routes = match body.get("routes") {
                Some(value) => self.facade_routes(name, value, services, authenticators),
                None => {
                    self.error(
                        &key.span(),
                        format!("facade `{name}` has no routes"),
                        Some(format!(
                            "add a [[{path}.routes]] section with a `path` and its parts"
                        )),
                    );
                    Vec::new()
                }
            };
            if let Some(prefix) = prefix {
                facades.push(Bff {
                    name: name.to_owned(),
                    prefix,
                    routes,
                });
            }
        }
        facades
    }

    /// The facade's prefix (default `/NAME`) without a trailing slash, unless it is invalid or
    /// collides with another facade's or a gateway route.
    fn facade_prefix(
        &mut self,
        name: &str,
        name_span: &Span,
        body: &DeTable<'_>,
        claimed: &mut Vec<(String, String, usize)>,
        routes: &[Route],
    ) -> Option<String> {
        let (prefix, span) = match body.get("prefix") {
            Some(value) => {
                let text = self.string_with_help(value, "prefix", "a string", PREFIX_HELP)?;
                (text.to_owned(), value.span())
            }
            None => (format!("/{name}"), name_span.clone()),
        };
        let written = &prefix;
        let prefix = prefix.trim_end_matches('/');
        let mistake = if !written.starts_with('/') {
            Some(format!("the prefix must start with `/`, found {written:?}"))
        } else if prefix.is_empty() {
            Some("a facade cannot take the whole gateway (`/`)".to_owned())
        } else if prefix.split('/').skip(1).any(str::is_empty) {
            Some(format!("the prefix {written:?} has an empty segment"))
        } else {
            prefix
                .bytes()
                .find(|&b| b != b'/' && !plain_path_byte(b))
                .map(|_| format!("invalid character in the prefix {written:?}"))
        };
        if let Some(message) = mistake {
            self.error(&span, message, Some(PREFIX_HELP.into()));
            return None;
        }
        let (line, _) = self.lines.line_column(span.start);
        for (other_prefix, other, other_line) in claimed.iter() {
            if within(prefix, other_prefix) || within(other_prefix, prefix) {
                let relation = if prefix == other_prefix {
                    "is also the prefix"
                } else if within(prefix, other_prefix) {
                    "lies below the prefix"
                } else {
                    "holds the prefix"
                };
                self.error(
                    &span,
                    format!(
                        "the prefix `{prefix}` of facade `{name}` {relation} `{other_prefix}` of \
                         facade `{other}`"
                    ),
                    Some(format!(
                        "facade `{other}` is declared on line {other_line}; each facade needs a \
                         prefix of its own, neither inside the other"
                    )),
                );
                return None;
            }
        }
        // A gateway route at or below the prefix would never be reached: the facade answers
        // everything under its prefix, a 404 for what it has no route for. A route above it
        // (`/` or `/api` around `/api/web`) keeps the rest of its paths.
        if let Some(route) = routes.iter().find(|r| within(&r.prefix, prefix)) {
            let route_prefix = &route.prefix;
            let message = if route_prefix == prefix {
                format!("the prefix `{prefix}` of facade `{name}` is also a gateway route's")
            } else {
                format!(
                    "the prefix `{prefix}` of facade `{name}` holds the gateway route \
                     `{route_prefix}`"
                )
            };
            self.error(
                &span,
                message,
                Some(format!(
                    "the facade answers every path under `{prefix}`, so the route to `{}` \
                     would never be reached; give the facade another prefix, like \
                     `prefix = \"/bff/{name}\"`",
                    route.service
                )),
            );
            return None;
        }
        claimed.push((prefix.to_owned(), name.to_owned(), line));
        Some(prefix.to_owned())
    }

    fn facade_routes(
        &mut self,
        facade: &str,
        value: &Value<'_>,
        services: &[Service],
        authenticators: &[Authenticator],
    ) -> Vec<BffRoute> {
        let header = format!("[[bff.{facade}.routes]]");
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                value,
                "routes",
                "an array of tables",
                Some(format!("write each route as its own {header} section")),
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.error(
                &value.span(),
                format!("facade `{facade}` has no routes"),
                Some(format!(
                    "add a {header} section with a `path` and its parts"
                )),
            );
        }
        let mut routes = Vec::new();
        // Method and path shape of each route so far, with its line.
        let mut served: HashMap<(String, Vec<Segment>), usize> = HashMap::new();
        for item in items.iter() {
            let DeValue::Table(table) = item.get_ref() else {
                self.error(
                    &item.span(),
                    format!("a route must be a table, found {}", a_type(item.get_ref())),
                    Some(format!("write each route as its own {header} section")),
                );
                continue;
            };
            self.unknown_keys(table, ROUTE_KEYS, &format!("in {header}"));
            let method = match table.get("method") {
                Some(value) => self.route_method(value),
                None => Some("GET".to_owned()),
            };
            let path = match table.get("path") {
                Some(value) => self.route_path(value),
                None => {
                    self.error(
                        &item.span(),
                        format!("missing required key `path` in {header}"),
                        Some(PATH_HELP.into()),
                    );
                    None
                }
            };
            if let (Some(method), Some((text, segments, span))) = (&method, &path) {
                // Placeholders match any segment, so their names don't tell routes apart.
                let shape: Vec<Segment> = segments
                    .iter()
                    .map(|segment| match segment {
                        Segment::Literal(_) => segment.clone(),
                        Segment::Placeholder(_) => Segment::Placeholder(String::new()),
                    })
                    .collect();
                let (line, _) = self.lines.line_column(span.start);
                if let Some(first) = served.get(&(method.clone(), shape.clone())) {
                    self.error(
                        span,
                        format!("duplicate route `{method} {text}` in facade `{facade}`"),
                        Some(format!(
                            "the route on line {first} already serves it; remove one of the two"
                        )),
                    );
                } else {
                    served.insert((method.clone(), shape), line);
                }
            }
            let placeholders: Option<Vec<String>> = path.as_ref().map(|(_, segments, _)| {
                segments
                    .iter()
                    .filter_map(|segment| match segment {
                        Segment::Placeholder(name) => Some(name.clone()),
                        Segment::Literal(_) => None,
                    })
                    .collect()
            });
            let scope = PartScope {
                path: path.as_ref().map_or("", |(text, _, _)| text),
                placeholders: placeholders.as_deref(),
            };
            let parts = self.route_parts(facade, &item.span(), table, &scope, services);
            let auth = self.route_auth(table, &header, authenticators);
            if let (Some(method), Some((text, _, _)), Some(parts)) = (method, path, parts) {
                routes.push(BffRoute {
                    method,
                    path: text,
                    auth,
                    parts,
                });
            }
        }
        routes
    }

    fn route_method(&mut self, value: &Value<'_>) -> Option<String> {
        let method = self.string_with_help(
            value,
            "method",
            "a string",
            "write the HTTP method, like `method = \"GET\"`",
        )?;
        if METHODS.contains(&method) {
            return Some(method.to_owned());
        }
        let upper = method.to_ascii_uppercase();
        let (message, help) = if METHODS.contains(&upper.as_str()) {
            (
                format!("HTTP method `{method}` must be upper-case"),
                format!("write `method = \"{upper}\"`"),
            )
        } else {
            let list = format!("the methods are: {}", METHODS.join(", "));
            let help = match closest(method, METHODS) {
                Some(guess) => format!("did you mean `{guess}`? {list}"),
                None => list,
            };
            (format!("unknown HTTP method `{method}`"), help)
        };
        self.error(&value.span(), message, Some(help));
        None
    }

    /// The path as written (without a trailing slash), its segments and where it was written.
    fn route_path(&mut self, value: &Value<'_>) -> Option<(String, Vec<Segment>, Span)> {
        let text = self.string_with_help(value, "path", "a string", PATH_HELP)?;
        match route_segments(text) {
            Ok(segments) => {
                let trimmed = text.trim_end_matches('/');
                let path = if trimmed.is_empty() { "/" } else { trimmed };
                Some((path.to_owned(), segments, value.span()))
            }
            Err((range, message, help)) => {
                let span = self.span_in(value, text, range);
                self.error(&span, message, Some(help));
                None
            }
        }
    }

    /// The route's parts in file order, or `None` when there are none (reported) or one is
    /// invalid.
    fn route_parts(
        &mut self,
        facade: &str,
        route_span: &Span,
        route: &DeTable<'_>,
        scope: &PartScope<'_>,
        services: &[Service],
    ) -> Option<Vec<BffPart>> {
        let header = format!("[bff.{facade}.routes.parts.NAME]");
        let Some(value) = route.get("parts") else {
            self.error(
                route_span,
                "a facade route needs at least one part",
                Some(format!(
                    "add a {header} section per service call, like \
                     `call = \"GET orders /orders/{{{{path.id}}}}\"`"
                )),
            );
            return None;
        };
        let DeValue::Table(table) = value.get_ref() else {
            self.wrong_type(
                value,
                "parts",
                "a table",
                Some(format!("write each part as its own {header} section")),
            );
            return None;
        };
        if table.is_empty() {
            self.error(
                &value.span(),
                "a facade route needs at least one part",
                Some(format!("add a {header} section per service call")),
            );
            return None;
        }
        let mut entries: Vec<_> = table.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        let mut parts = Vec::new();
        let mut valid = true;
        for (key, value) in entries {
            match self.route_part(facade, key.get_ref(), &key.span(), value, scope, services) {
                Some(part) => parts.push(part),
                None => valid = false,
            }
        }
        valid.then_some(parts)
    }

    fn route_part(
        &mut self,
        facade: &str,
        name: &str,
        name_span: &Span,
        value: &Value<'_>,
        scope: &PartScope<'_>,
        services: &[Service],
    ) -> Option<BffPart> {
        let named = match name_error(name) {
            Some(reason) => {
                self.error(
                    name_span,
                    format!("invalid part name {name:?}: {reason}"),
                    Some(
                        "the name is the part's member in the response, like `order` or \
                         `shipment`"
                            .into(),
                    ),
                );
                false
            }
            None => true,
        };
        let header = format!("[bff.{facade}.routes.parts.{name}]");
        let DeValue::Table(table) = value.get_ref() else {
            self.wrong_type(
                value,
                name,
                "a table",
                Some(format!(
                    "write the part as a {header} section with `call = \"METHOD SERVICE /PATH\"`"
                )),
            );
            return None;
        };
        self.unknown_keys(table, PART_KEYS, &format!("in {header}"));
        let call = match table.get("call") {
            Some(value) => self
                .call(value, scope, services)
                .filter(|_| self.call_literals(value)),
            None => {
                self.error(
                    name_span,
                    format!("missing required key `call` in part `{name}`"),
                    Some(CALL_HELP.into()),
                );
                None
            }
        };
        let mut optional = false;
        self.set_bool(table, "optional", &mut optional);
        let fields = table.get("fields").map(|value| self.fields(value));
        let call = call?;
        let fields = match fields {
            Some(fields) => Some(fields?),
            None => None,
        };
        named.then(|| BffPart {
            name: name.to_owned(),
            method: call.method,
            service: call.service,
            path: call.path,
            optional,
            fields,
        })
    }

    /// Whether the literal text of a part's path (outside `{{...}}`) can go into a request as
    /// it stands; reports what cannot.
    fn call_literals(&mut self, value: &Value<'_>) -> bool {
        let Some(text) = value.get_ref().as_str() else {
            return true;
        };
        let Some(mistake) = literal_mistake(text) else {
            return true;
        };
        let (range, message, help) = mistake;
        let span = self.span_in(value, text, range);
        self.error(&span, message, Some(help));
        false
    }

    fn fields(&mut self, value: &Value<'_>) -> Option<Projection> {
        let text = self.string_with_help(value, "fields", "a string", FIELDS_HELP)?;
        match projection(text) {
            Ok(fields) => Some(Projection {
                text: text.to_owned(),
                fields,
            }),
            Err((range, message, help)) => {
                let span = self.span_in(value, text, range);
                self.error(&span, message, Some(help));
                None
            }
        }
    }
}

/// A mistake in a route's path: where in the text, a message and a help.
type PathMistake = (Range<usize>, String, String);

/// The segments of a route's path: literal text or a `{name}` placeholder, each name once.
fn route_segments(text: &str) -> Result<Vec<Segment>, PathMistake> {
    if !text.starts_with('/') {
        return Err((
            0..text.len(),
            format!("the path must start with `/`, found {text:?}"),
            format!("write it as \"/{}\"", text.trim_start_matches('/')),
        ));
    }
    let trimmed = text.trim_end_matches('/');
    let mut segments = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    let mut start = 1;
    // The root path `/` has no segments.
    if trimmed.is_empty() {
        return Ok(segments);
    }
    for segment in trimmed[1..].split('/') {
        let range = start..start + segment.len();
        start = range.end + 1;
        if segment.is_empty() {
            return Err((
                range.start - 1..range.start + 1,
                format!("the path {text:?} has an empty segment"),
                PATH_HELP.into(),
            ));
        }
        let braced = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}'));
        if let Some(name) = braced {
            let well_formed = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !well_formed {
                return Err((
                    range,
                    format!("invalid placeholder `{segment}`"),
                    "a placeholder is `{name}` with a name of letters, digits, `_` and `-`, \
                     like `{id}`"
                        .into(),
                ));
            }
            if names.contains(&name) {
                return Err((
                    range,
                    format!("the placeholder `{{{name}}}` appears twice in {text:?}"),
                    "each placeholder names one segment; rename one of them".into(),
                ));
            }
            names.push(name);
            segments.push(Segment::Placeholder(name.to_owned()));
            continue;
        }
        if let Some(at) = segment.find(['{', '}']) {
            let at = range.start + at;
            return Err((
                at..at + 1,
                format!("a placeholder must be a whole segment, in {text:?}"),
                "write it between slashes, like \"/orders/{id}\"; a part of a segment cannot \
                 be a placeholder"
                    .into(),
            ));
        }
        if let Some(at) = segment.bytes().position(|b| !plain_path_byte(b)) {
            let at = range.start + at;
            let end = at + text[at..].chars().next().map_or(1, char::len_utf8);
            return Err((
                at..end,
                format!("invalid character in the path {text:?}"),
                PATH_HELP.into(),
            ));
        }
        segments.push(Segment::Literal(segment.to_owned()));
    }
    Ok(segments)
}

/// The first character of a part's call path, outside its `{{...}}` expressions, that cannot be
/// sent as it stands. The call's syntax and templates are already checked.
fn literal_mistake(text: &str) -> Option<PathMistake> {
    let method = next_word(text, 0)?;
    let service = next_word(text, method.end)?;
    let start = service.end + text[service.end..].find(|c: char| !c.is_whitespace())?;
    let end = text.trim_end().len();
    let mut at = start;
    while at < end {
        let rest = &text[at..end];
        if rest.starts_with("{{") {
            // Checked already: every `{{` is closed.
            at += rest.find("}}").map_or(rest.len(), |close| close + 2);
            continue;
        }
        let c = rest.chars().next()?;
        let range = at..at + c.len_utf8();
        match c {
            '{' | '}' => {
                let word: String = rest
                    .chars()
                    .skip(1)
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                    .collect();
                let name = if word.is_empty() { "id" } else { &word };
                return Some((
                    range,
                    "a single brace in a part's path is text, not a placeholder".into(),
                    format!(
                        "write \"{{{{path.{name}}}}}\" for the route's `{{{name}}}`, or \
                         \"{{{{query.{name}}}}}\" for a query parameter"
                    ),
                ));
            }
            '%' => {
                let escape = rest.as_bytes().get(1..3);
                if !escape.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
                    return Some((
                        range,
                        "`%` must start an escape of two hex digits, like `%20`".into(),
                        "write a literal `%` as `%25`".into(),
                    ));
                }
            }
            '#' => {
                return Some((
                    range,
                    "a part's path cannot hold a fragment (`#`)".into(),
                    "remove it: fragments are never sent to a server".into(),
                ));
            }
            c if c.is_ascii_graphic() && !"\"<>\\^`|".contains(c) => {}
            _ => {
                return Some((
                    range,
                    format!("{c:?} cannot appear in a URL as it is"),
                    "percent-encode it, like `%7C` for `|`".into(),
                ));
            }
        }
        at = range.end;
    }
    None
}

/// A mistake in a field selection: where in the text, a message and a help.
type FieldMistake = (Range<usize>, String, String);

/// Parses a field selection: members separated by commas, `name(sub,fields)` to select within a
/// member, `/json/pointer` (RFC 6901) for a value deeper down, named by its last token. Spaces
/// around the punctuation are allowed.
pub(crate) fn projection(text: &str) -> Result<Vec<ProjectedField>, FieldMistake> {
    let mut parser = FieldParser { text, at: 0 };
    let fields = parser.list(None)?;
    Ok(fields)
}

struct FieldParser<'t> {
    text: &'t str,
    at: usize,
}

impl FieldParser<'_> {
    fn peek(&self) -> Option<char> {
        self.text[self.at..].chars().next()
    }

    fn skip_spaces(&mut self) {
        let rest = &self.text[self.at..];
        self.at += rest.len() - rest.trim_start().len();
    }

    fn here(&self) -> Range<usize> {
        let width = self.peek().map_or(0, char::len_utf8);
        self.at..self.at + width
    }

    fn mistake(&self, message: impl Into<String>, help: impl Into<String>) -> FieldMistake {
        (self.here(), message.into(), help.into())
    }

    /// Fields up to the end (top level) or the `)` closing the `(` at `open`, which is consumed.
    fn list(
        &mut self,
        open: Option<(usize, &str, usize)>,
    ) -> Result<Vec<ProjectedField>, FieldMistake> {
        let mut fields: Vec<ProjectedField> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        loop {
            self.skip_spaces();
            let start = self.at;
            let field = self.field(open.map_or(0, |(_, _, depth)| depth))?;
            let name = match &field {
                ProjectedField::Member { name, .. } => name.clone(),
                ProjectedField::Pointer { tokens } => tokens.last().cloned().unwrap_or_default(),
            };
            if names.contains(&name) {
                return Err((
                    start..self.at,
                    format!("`{name}` is selected twice"),
                    "each member of the result has one name, and a pointer is named by its last \
                     token; remove one of the two"
                        .into(),
                ));
            }
            names.push(name);
            fields.push(field);
            self.skip_spaces();
            match (self.peek(), open) {
                (Some(','), _) => self.at += 1,
                (Some(')'), Some(_)) => {
                    self.at += 1;
                    return Ok(fields);
                }
                (None, None) => return Ok(fields),
                (None, Some((at, name, _))) => {
                    return Err((
                        at..at + 1,
                        format!("the `(` after `{name}` is never closed"),
                        "close the nested selection with `)`, like \"items(sku,qty)\"".into(),
                    ));
                }
                (Some(')'), None) => {
                    return Err(self.mistake(
                        "unmatched `)`",
                        "a `)` closes the nested selection of a member, like \"items(sku,qty)\"",
                    ));
                }
                (Some(c), _) => {
                    return Err(self.mistake(
                        format!("expected `,` between fields, found {c:?}"),
                        FIELDS_HELP,
                    ));
                }
            }
        }
    }

    fn field(&mut self, depth: usize) -> Result<ProjectedField, FieldMistake> {
        match self.peek() {
            Some('/') => self.pointer(),
            None | Some(',') | Some(')') => Err(self.mistake(
                if self.at == 0 && self.peek().is_none() {
                    "the field selection is empty".to_owned()
                } else {
                    "a field is missing here".to_owned()
                },
                FIELDS_HELP,
            )),
            Some('(') => Err(self.mistake("`(` must follow a member name", FIELDS_HELP)),
            Some(_) => self.member(depth),
        }
    }

    fn member(&mut self, depth: usize) -> Result<ProjectedField, FieldMistake> {
        let text = self.text;
        let start = self.at;
        let rest = &text[start..];
        let length = rest
            .find(|c: char| c.is_whitespace() || ",()/~".contains(c))
            .unwrap_or(rest.len());
        self.at += length;
        let name = &text[start..self.at];
        if self.peek() == Some('~') || self.peek() == Some('/') {
            return Err(self.mistake(
                format!(
                    "{:?} cannot appear in a member name",
                    self.peek().unwrap_or('~')
                ),
                "a name with `/` or `~` is reached with a JSON pointer, escaped as `~1` and \
                 `~0`: \"/a~1b\"",
            ));
        }
        self.skip_spaces();
        if self.peek() != Some('(') {
            return Ok(ProjectedField::Member {
                name: name.to_owned(),
                nested: None,
            });
        }
        if depth + 1 >= MAX_NESTING {
            return Err(self.mistake(
                format!("field selections nest at most {MAX_NESTING} levels deep"),
                "select fewer levels, or reach deep values with a JSON pointer",
            ));
        }
        let open = self.at;
        self.at += 1;
        let nested = self.list(Some((open, name, depth + 1)))?;
        Ok(ProjectedField::Member {
            name: name.to_owned(),
            nested: Some(nested),
        })
    }

    /// `/a/b~1c`, up to a space, `,`, `(` or `)`.
    fn pointer(&mut self) -> Result<ProjectedField, FieldMistake> {
        let start = self.at;
        let rest = &self.text[start..];
        let length = rest
            .find(|c: char| c.is_whitespace() || ",()".contains(c))
            .unwrap_or(rest.len());
        let written = &rest[..length];
        let mut tokens = Vec::new();
        let mut offset = start + 1;
        for raw in written[1..].split('/') {
            if raw.is_empty() {
                let at = offset.saturating_sub(1);
                return Err((
                    at..at + 1,
                    format!("the pointer `{written}` has an empty token"),
                    "a pointer names a member or an index per `/`, like \"/payment/status\"".into(),
                ));
            }
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.char_indices();
            while let Some((i, c)) = chars.next() {
                if c != '~' {
                    token.push(c);
                    continue;
                }
                match chars.next() {
                    Some((_, '0')) => token.push('~'),
                    Some((_, '1')) => token.push('/'),
                    _ => {
                        let at = offset + i;
                        return Err((
                            at..at + 1,
                            format!("invalid escape in the pointer `{written}`"),
                            "in a JSON pointer `~` is written `~0` and `/` inside a name `~1`"
                                .into(),
                        ));
                    }
                }
            }
            tokens.push(token);
            offset += raw.len() + 1;
        }
        self.at += length;
        self.skip_spaces();
        if self.peek() == Some('(') {
            return Err(self.mistake(
                format!("the pointer `{written}` cannot have a nested selection"),
                "a pointer takes one value whole; select inside it with more pointers, like \
                 \"/a/b,/a/c\"",
            ));
        }
        Ok(ProjectedField::Pointer { tokens })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str) -> ProjectedField {
        ProjectedField::Member {
            name: name.into(),
            nested: None,
        }
    }

    fn pointer(tokens: &[&str]) -> ProjectedField {
        ProjectedField::Pointer {
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[track_caller]
    fn mistake(text: &str) -> (Range<usize>, String) {
        let (range, message, _) = projection(text).expect_err("invalid selection");
        (range, message)
    }

    #[test]
    fn selections() {
        assert_eq!(
            projection("id, status ,total").expect("valid"),
            [member("id"), member("status"), member("total")]
        );
        assert_eq!(
            projection("id,items( sku , qty ),/payment/status,/a~1b/~0c/0").expect("valid"),
            [
                member("id"),
                ProjectedField::Member {
                    name: "items".into(),
                    nested: Some(vec![member("sku"), member("qty")]),
                },
                pointer(&["payment", "status"]),
                pointer(&["a/b", "~c", "0"]),
            ]
        );
        assert_eq!(
            projection("a(b(c,/d/e))").expect("valid"),
            [ProjectedField::Member {
                name: "a".into(),
                nested: Some(vec![ProjectedField::Member {
                    name: "b".into(),
                    nested: Some(vec![member("c"), pointer(&["d", "e"])]),
                }]),
            }]
        );
    }

    #[test]
    fn mistakes_point_at_the_character() {
        assert_eq!(mistake("").1, "the field selection is empty");
        assert_eq!(mistake("id,,x"), (3..4, "a field is missing here".into()));
        assert_eq!(mistake("id,"), (3..3, "a field is missing here".into()));
        assert_eq!(
            mistake("id,items(sku"),
            (8..9, "the `(` after `items` is never closed".into())
        );
        assert_eq!(mistake("items()"), (6..7, "a field is missing here".into()));
        assert_eq!(mistake("id)"), (2..3, "unmatched `)`".into()));
        assert_eq!(
            mistake("id status"),
            (3..4, "expected `,` between fields, found 's'".into())
        );
        assert_eq!(
            mistake("/a/~2"),
            (3..4, "invalid escape in the pointer `/a/~2`".into())
        );
        assert_eq!(
            mistake("x,/a//b"),
            (4..5, "the pointer `/a//b` has an empty token".into())
        );
        assert_eq!(
            mistake("/a/"),
            (2..3, "the pointer `/a/` has an empty token".into())
        );
        assert_eq!(
            mistake("/a(b)"),
            (
                2..3,
                "the pointer `/a` cannot have a nested selection".into()
            )
        );
        assert_eq!(mistake("id,/x/id"), (3..8, "`id` is selected twice".into()));
        assert_eq!(
            mistake("(a)"),
            (0..1, "`(` must follow a member name".into())
        );
        assert_eq!(
            mistake("a~b"),
            (1..2, "'~' cannot appear in a member name".into())
        );
        let deep = format!("{}x{}", "a(".repeat(20), ")".repeat(20));
        assert!(mistake(&deep).1.contains("nest at most"));
    }

    #[test]
    fn route_paths() {
        use Segment::*;
        assert_eq!(route_segments("/"), Ok(vec![]));
        assert_eq!(
            route_segments("/orders/{id}/"),
            Ok(vec![Literal("orders".into()), Placeholder("id".into())])
        );
        let error = |text| route_segments(text).expect_err("invalid").0;
        assert_eq!(error("orders"), 0..6);
        assert_eq!(error("/a//b"), 2..4);
        assert_eq!(error("/orders/x{id}"), 9..10);
        assert_eq!(error("/orders/{}"), 8..10);
        assert_eq!(error("/a/{id}/{id}"), 8..12);
        assert_eq!(error("/a b"), 2..3);
    }

    #[test]
    fn part_path_literals() {
        let mistake = |text| literal_mistake(text).map(|(range, _, _)| range);
        assert_eq!(
            mistake("GET orders /orders/{{path.id}}?x={{ query.x }}&y=1"),
            None
        );
        assert_eq!(mistake("GET orders /orders/{id}"), Some(19..20));
        assert_eq!(mistake("GET orders /a%2"), Some(13..14));
        assert_eq!(mistake("GET orders /a%2F#x"), Some(16..17));
        assert_eq!(mistake("GET orders /a|b"), Some(13..14));
        assert_eq!(mistake("GET orders /é"), Some(12..14));
    }
}
