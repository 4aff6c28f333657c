//! `[sagas]`: where saga logs are kept, and one `[sagas.NAME]` table per saga, whose steps call
//! services with `{{...}}` templates.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use toml::de::{DeTable, DeValue};

use super::{Checker, Span, Value, a_type, known_services_help};
use crate::model::{
    BodyTemplate, Saga, SagaCall, SagaSettings, SagaStep, SagaStoreKind, SagaTrigger, Service,
    StepRetry, Template, TemplateRef, Topic,
};
use crate::suggest::closest;
use crate::template::{self, Dialect};

const SETTING_KEYS: &[&str] = &["store"];
const SAGA_KEYS: &[&str] = &["timeout", "trigger", "steps"];
const TRIGGER_KEYS: &[&str] = &["topic"];
const STEP_KEYS: &[&str] = &["name", "action", "compensate", "retry"];
const CALL_KEYS: &[&str] = &["call", "body"];
const STEP_RETRY_KEYS: &[&str] = &["attempts", "backoff", "max_backoff"];
pub(super) const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
const MAX_NAME: usize = 64;
const STORE_HELP: &str = "use \"sqlite\" (kept in .flotilla/sagas.db) or a PostgreSQL URL, like \
                          \"postgres://user@127.0.0.1:5432/db\"";
pub(super) const CALL_HELP: &str = "write it as \"METHOD SERVICE /PATH\", like \
                         `call = \"POST inventory /reservations\"`";
const SAGAS_HELP: &str = "[sagas] holds the setting `store = \"...\"` and one [sagas.NAME] table \
                          per saga";

/// What a `call = "METHOD SERVICE /PATH"` belongs to — a saga's step or a facade's part — which
/// decides what its templates may name and how messages speak of it.
pub(super) trait CallScope {
    /// The expressions the call's templates are written in.
    fn dialect(&self) -> Dialect;
    /// Who makes the call, for messages: "a saga".
    fn caller(&self) -> &'static str;
    /// What holds the call, for messages: "a step".
    fn holder(&self) -> &'static str;
    /// Why the call may not use `reference` here, if it may not: a message and a help.
    fn check(&self, reference: &TemplateRef) -> Result<(), (String, String)>;
}

impl CallScope for StepScope<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Saga
    }

    fn caller(&self) -> &'static str {
        "a saga"
    }

    fn holder(&self) -> &'static str {
        "a step"
    }

    fn check(&self, reference: &TemplateRef) -> Result<(), (String, String)> {
        match reference {
            TemplateRef::Step { step, .. } => self.check_step(step),
            _ => Ok(()),
        }
    }
}

/// Whether a call is a step's action or its compensation: they may read different responses.
#[derive(Clone, Copy)]
enum Phase {
    Action,
    Compensation,
}

impl Phase {
    fn key(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Compensation => "compensate",
        }
    }
}

/// The step a call belongs to, to check the `steps.NAME` its templates read.
struct StepScope<'a> {
    saga: &'a str,
    /// Every step's name in order; `None` where the name is missing or a duplicate (already
    /// reported), so that references resolve to the first step of a name.
    names: &'a [Option<String>],
    index: usize,
    phase: Phase,
}

impl StepScope<'_> {
    /// The step, quoted, for messages; an unnamed one (already reported) by its position.
    fn this(&self) -> String {
        match &self.names[self.index] {
            Some(name) => format!("`{name}`"),
            None => format!("step {} (unnamed)", self.index + 1),
        }
    }

    /// Why this call may not read the response of `step`: a message and a help.
    fn check_step(&self, step: &str) -> Result<(), (String, String)> {
        let saga = self.saga;
        let Some(target) = self.names.iter().position(|n| n.as_deref() == Some(step)) else {
            let known: Vec<&str> = self.names.iter().flatten().map(String::as_str).collect();
            let list = format!("the steps of `{saga}` are: {}", known.join(", "));
            let help = match closest(step, known.iter().copied()) {
                Some(guess) => format!("did you mean `{guess}`? {list}"),
                None => list,
            };
            return Err((format!("unknown step `{step}` in saga `{saga}`"), help));
        };
        let this = self.this();
        match self.phase {
            Phase::Action if target < self.index => Ok(()),
            Phase::Compensation if target <= self.index => Ok(()),
            Phase::Action => {
                let earlier: Vec<&str> = self.names[..self.index]
                    .iter()
                    .flatten()
                    .map(String::as_str)
                    .collect();
                let mut help = if earlier.is_empty() {
                    format!("{this} runs first, so its action can only use `input` and `saga.id`")
                } else {
                    format!(
                        "the action of {this} can use the responses of the steps before it: {}",
                        earlier.join(", ")
                    )
                };
                if target == self.index {
                    help.push_str(&format!(
                        "; its `compensate` may use `steps.{step}.response`"
                    ));
                }
                Err((
                    format!("step `{step}` has not run yet when {this} runs"),
                    help,
                ))
            }
            Phase::Compensation => Err((
                format!(
                    "step `{step}` runs after {this}, so its response may not exist when \
                     {this} is compensated"
                ),
                "a compensation can use the responses of its own step and of the steps before it"
                    .into(),
            )),
        }
    }
}

/// Why `name` cannot name a saga or a step, if it cannot.
fn name_error(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Some(format!("it must be 1 to {MAX_NAME} characters long"));
    }
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b);
    (!name.bytes().all(allowed))
        .then(|| "only lower-case letters, digits, `-`, `_` and `.` are allowed".into())
}

/// `sagas.NAME`, quoted where TOML needs it, for headers in messages.
fn saga_path(name: &str) -> String {
    if name.contains('.') {
        format!("sagas.\"{name}\"")
    } else {
        format!("sagas.{name}")
    }
}

/// The byte range of the next word (a run of non-whitespace) at or after `from`.
pub(super) fn next_word(text: &str, from: usize) -> Option<Range<usize>> {
    let start = from + text[from..].find(|c: char| !c.is_whitespace())?;
    let end = text[start..]
        .find(char::is_whitespace)
        .map_or(text.len(), |length| start + length);
    Some(start..end)
}

impl Checker<'_> {
    pub(super) fn sagas(
        &mut self,
        value: &Value<'_>,
        topics: &[Topic],
        services: &[Service],
    ) -> SagaSettings {
        let mut settings = SagaSettings::default();
        let Some(table) = self.table(value, "sagas") else {
            return settings;
        };
        let mut entries: Vec<_> = table.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        for (key, value) in entries {
            let name: &str = key.get_ref();
            match value.get_ref() {
                DeValue::Table(_) if name == "store" => self.error(
                    &key.span(),
                    "a saga cannot be named `store`",
                    Some(
                        "`store` in [sagas] says where saga logs are kept, like \
                         `store = \"sqlite\"`; give the saga another name"
                            .into(),
                    ),
                ),
                DeValue::Table(body) => {
                    let saga = self.saga(name, &key.span(), body, topics, services);
                    settings.sagas.push(saga);
                }
                _ if name == "store" => {
                    if let Some(store) = self.saga_store(value) {
                        settings.store = store;
                    }
                }
                DeValue::String(_) => {
                    let help = match closest(name, SETTING_KEYS.iter().copied()) {
                        Some(guess) => format!("did you mean `{guess}`? {SAGAS_HELP}"),
                        None => SAGAS_HELP.into(),
                    };
                    self.error(
                        &key.span(),
                        format!("unknown key `{name}` in [sagas]"),
                        Some(help),
                    );
                }
                other => self.error(
                    &value.span(),
                    format!(
                        "`{name}` in [sagas] must be a saga table, found {}",
                        a_type(other)
                    ),
                    Some(format!(
                        "define the saga as a [{}] section with steps; {SAGAS_HELP}",
                        saga_path(name)
                    )),
                ),
            }
        }
        settings
    }

    fn saga_store(&mut self, value: &Value<'_>) -> Option<SagaStoreKind> {
        let text = self.string_with_help(value, "store", "a string", STORE_HELP)?;
        if text == "sqlite" {
            return Some(SagaStoreKind::Sqlite);
        }
        let rest = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"));
        let (message, help) = match rest {
            // An empty host is fine: libpq then uses its local socket.
            Some(rest) if !rest.is_empty() && !text.contains(char::is_whitespace) => {
                return Some(SagaStoreKind::Postgres {
                    url: text.to_owned(),
                });
            }
            Some(_) => (
                format!("invalid PostgreSQL URL {text:?} for the saga store"),
                "write it like \"postgres://user@127.0.0.1:5432/db\", without spaces".to_owned(),
            ),
            None => {
                let help = match closest(text, ["sqlite"]) {
                    Some(guess) => format!("did you mean \"{guess}\"? {STORE_HELP}"),
                    None => format!("sagas are kept in SQLite or PostgreSQL: {STORE_HELP}"),
                };
                (format!("unsupported saga store {text:?}"), help)
            }
        };
        self.error(&value.span(), message, Some(help));
        None
    }

    fn saga(
        &mut self,
        name: &str,
        span: &Span,
        body: &DeTable<'_>,
        topics: &[Topic],
        services: &[Service],
    ) -> Saga {
        if let Some(reason) = name_error(name) {
            self.error(
                span,
                format!("invalid saga name {name:?}: {reason}"),
                Some("name sagas like `place-order`".into()),
            );
        }
        let path = saga_path(name);
        self.unknown_keys(body, SAGA_KEYS, &format!("in [{path}]"));
        let mut timeout = Duration::ZERO;
        let timeout = (body.contains_key("timeout")
            && self.set_duration(body, "timeout", false, &mut timeout))
        .then_some(timeout);
        let trigger = self
            .section(body, &path, "trigger", TRIGGER_KEYS)
            .and_then(|table| {
                let Some(value) = table.get("topic") else {
                    self.error(
                        &body
                            .get("trigger")
                            .map(|v| v.span())
                            .unwrap_or(span.clone()),
                        format!("missing required key `topic` in the trigger of saga `{name}`"),
                        Some(
                            "name a topic declared as [topics.\"NAME\"], like \
                             `trigger = { topic = \"order.placed\" }`"
                                .into(),
                        ),
                    );
                    return None;
                };
                let names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
                let topic = self.declared_topic(value, &names, "saga trigger")?;
                Some(SagaTrigger { topic })
            });
        let steps = match body.get("steps") {
            Some(value) => self.saga_steps(name, &path, value, services),
            None => {
                self.error(
                    span,
                    format!("saga `{name}` has no steps"),
                    Some(format!(
                        "add one [[{path}.steps]] section per step, each with `name` and `action`"
                    )),
                );
                Vec::new()
            }
        };
        Saga {
            name: name.to_owned(),
            timeout,
            trigger,
            steps,
        }
    }

    fn saga_steps(
        &mut self,
        saga: &str,
        path: &str,
        value: &Value<'_>,
        services: &[Service],
    ) -> Vec<SagaStep> {
        let header = format!("[[{path}.steps]]");
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                value,
                "steps",
                "an array of tables",
                Some(format!("write each step as its own {header} section")),
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.error(
                &value.span(),
                format!("saga `{saga}` has no steps"),
                Some(format!(
                    "add one {header} section per step, each with `name` and `action`"
                )),
            );
            return Vec::new();
        }

        // All names first: a call may only read earlier steps, and must be told apart from a
        // call that reads a later one.
        let mut tables = Vec::with_capacity(items.len());
        let mut names: Vec<Option<String>> = Vec::with_capacity(items.len());
        let mut first_lines: Vec<(&str, usize)> = Vec::new();
        for item in items.iter() {
            let table = match item.get_ref() {
                DeValue::Table(table) => Some(table),
                other => {
                    self.error(
                        &item.span(),
                        format!("a step must be a table, found {}", a_type(other)),
                        Some(format!("write each step as its own {header} section")),
                    );
                    None
                }
            };
            tables.push(table);
            let Some(table) = table else {
                names.push(None);
                continue;
            };
            self.unknown_keys(table, STEP_KEYS, &format!("in {header}"));
            let Some(value) = table.get("name") else {
                self.error(
                    &item.span(),
                    format!("missing required key `name` in {header}"),
                    Some("name the step, like `name = \"reserve-stock\"`".into()),
                );
                names.push(None);
                continue;
            };
            let Some(name) = self.string(value, "name") else {
                names.push(None);
                continue;
            };
            // A badly formed name still names its step, so references to it aren't reported
            // a second time as unknown.
            if let Some(reason) = name_error(name) {
                self.error(
                    &value.span(),
                    format!("invalid step name {name:?}: {reason}"),
                    Some("name steps like `reserve-stock`".into()),
                );
            }
            if let Some((_, line)) = first_lines.iter().find(|(n, _)| *n == name) {
                self.error(
                    &value.span(),
                    format!("duplicate step name `{name}` in saga `{saga}`"),
                    Some(format!(
                        "step `{name}` is already defined on line {line}; step names are unique \
                         within a saga"
                    )),
                );
                names.push(None);
            } else {
                let (line, _) = self.lines.line_column(value.span().start);
                first_lines.push((name, line));
                names.push(Some(name.to_owned()));
            }
        }

        let steps_path = format!("{path}.steps");
        let mut steps = Vec::new();
        for (index, (item, table)) in items.iter().zip(tables).enumerate() {
            let Some(table) = table else {
                continue;
            };
            let scope = |phase| StepScope {
                saga,
                names: &names,
                index,
                phase,
            };
            let action = if table.contains_key("action") {
                self.step_call(table, &steps_path, &scope(Phase::Action), services)
            } else {
                self.error(
                    &item.span(),
                    format!("missing required key `action` in {header}"),
                    Some(
                        "add what the step does, like \
                         `action = { call = \"POST inventory /reservations\" }`"
                            .into(),
                    ),
                );
                None
            };
            let compensate =
                self.step_call(table, &steps_path, &scope(Phase::Compensation), services);
            let retry = self
                .section(table, &steps_path, "retry", STEP_RETRY_KEYS)
                .map(|table| self.step_retry(table))
                .unwrap_or_default();
            if let (Some(name), Some(action)) = (&names[index], action) {
                steps.push(SagaStep {
                    name: name.clone(),
                    action,
                    compensate,
                    retry,
                });
            }
        }
        steps
    }

    fn step_retry(&mut self, table: &DeTable<'_>) -> StepRetry {
        let mut retry = StepRetry::default();
        self.set_integer(table, "attempts", 1..=100, &mut retry.attempts);
        // Compensations retry until they succeed, so a zero backoff would hammer the service.
        let valid = self.set_duration(table, "backoff", false, &mut retry.backoff)
            & self.set_duration(table, "max_backoff", false, &mut retry.max_backoff);
        self.not_shorter(
            table,
            valid,
            ("backoff", retry.backoff),
            ("max_backoff", retry.max_backoff),
            "the delay between attempts doubles from `backoff` up to `max_backoff`",
        );
        retry
    }

    /// The step's `action` or `compensate` table, when present and valid.
    fn step_call(
        &mut self,
        step: &DeTable<'_>,
        steps_path: &str,
        scope: &StepScope<'_>,
        services: &[Service],
    ) -> Option<SagaCall> {
        let key = scope.phase.key();
        let table = self.section(step, steps_path, key, CALL_KEYS)?;
        let Some(value) = table.get("call") else {
            let span = step.get(key).map(|v| v.span()).unwrap_or(0..0);
            self.error(
                &span,
                format!(
                    "missing required key `call` in the `{key}` of {}",
                    scope.this()
                ),
                Some(CALL_HELP.into()),
            );
            return None;
        };
        // Both are checked before giving up, so that all mistakes are reported at once.
        let call = self.call(value, scope, services);
        let body = table
            .get("body")
            .map(|value| self.body_template(value, scope));
        let mut call = call?;
        if let Some(body) = body {
            call.body = Some(body?);
        }
        Some(call)
    }

    /// `"METHOD SERVICE /PATH"`, without a body.
    pub(super) fn call(
        &mut self,
        value: &Value<'_>,
        scope: &dyn CallScope,
        services: &[Service],
    ) -> Option<SagaCall> {
        let text = self.string_with_help(value, "call", "a string", CALL_HELP)?;
        let method = next_word(text, 0);
        let service = method.clone().and_then(|m| next_word(text, m.end));
        // The path is everything after the service, since `{{ ... }}` may hold spaces.
        let path = service.clone().and_then(|s| {
            let start = s.end + text[s.end..].find(|c: char| !c.is_whitespace())?;
            Some(start..text.trim_end().len())
        });
        let (Some(method), Some(service), Some(path)) = (method, service, path) else {
            self.error(
                &value.span(),
                format!("`call` must be \"METHOD SERVICE /PATH\", found {text:?}"),
                Some(CALL_HELP.into()),
            );
            return None;
        };
        let method = self.call_method(value, text, method);
        let service = self.call_service(value, text, service, scope, services);
        let path = self.call_path(value, text, path, scope);
        Some(SagaCall {
            method: method?,
            service: service?,
            path: path?,
            body: None,
            text: text.to_owned(),
        })
    }

    fn call_method(
        &mut self,
        value: &Value<'_>,
        text: &str,
        range: Range<usize>,
    ) -> Option<String> {
        let method = &text[range.clone()];
        if METHODS.contains(&method) {
            return Some(method.to_owned());
        }
        let upper = method.to_ascii_uppercase();
        let (message, help) = if METHODS.contains(&upper.as_str()) {
            (
                format!("HTTP method `{method}` must be upper-case"),
                format!("write `{upper}`"),
            )
        } else {
            let list = format!("the methods are: {}", METHODS.join(", "));
            let help = match closest(method, METHODS) {
                Some(guess) => format!("did you mean `{guess}`? {list}"),
                None => list,
            };
            (format!("unknown HTTP method `{method}` in `call`"), help)
        };
        let span = self.span_in(value, text, range);
        self.error(&span, message, Some(help));
        None
    }

    fn call_service(
        &mut self,
        value: &Value<'_>,
        text: &str,
        range: Range<usize>,
        scope: &dyn CallScope,
        services: &[Service],
    ) -> Option<Arc<str>> {
        let name = &text[range.clone()];
        let mut known: Vec<&str> = services.iter().map(|s| &*s.name).collect();
        known.sort_unstable();
        // These can't be declared as services, so a call to them is a misunderstanding rather
        // than a typo; say so instead of listing near misses.
        let (message, help) = if name == "flotilla" || name == "gateway" {
            (
                format!(
                    "`{name}` is part of Flotilla, not a service {} can call",
                    scope.caller()
                ),
                format!(
                    "{} calls a service declared as [services.NAME]; {}",
                    scope.holder(),
                    known_services_help(None, &known)
                ),
            )
        } else if let Some(service) = services.iter().find(|s| &*s.name == name) {
            return Some(service.name.clone());
        } else {
            (
                format!("unknown service `{name}` in `call`"),
                known_services_help(closest(name, known.iter().copied()), &known),
            )
        };
        let span = self.span_in(value, text, range);
        self.error(&span, message, Some(help));
        None
    }

    fn call_path(
        &mut self,
        value: &Value<'_>,
        text: &str,
        range: Range<usize>,
        scope: &dyn CallScope,
    ) -> Option<Template> {
        let path = &text[range.clone()];
        if !path.starts_with('/') {
            let span = self.span_in(value, text, range);
            self.error(
                &span,
                format!("the path in `call` must start with `/`, found {path:?}"),
                Some(format!("write it as \"/{}\"", path.trim_start_matches('/'))),
            );
            return None;
        }
        let (template, expressions) = self.template(value, text, range.clone(), scope)?;
        // Spaces inside `{{ }}` are fine; outside, the path itself would hold a space.
        let space = path.char_indices().find(|&(i, c)| {
            c.is_whitespace() && !expressions.iter().any(|e| e.contains(&(range.start + i)))
        });
        if let Some((i, _)) = space {
            let at = range.start + i;
            let span = self.span_in(value, text, at..at + 1);
            self.error(
                &span,
                "the path in `call` contains whitespace",
                Some("percent-encode it, like `%20` for a space".into()),
            );
            return None;
        }
        Some(template)
    }

    fn body_template(&mut self, value: &Value<'_>, scope: &StepScope<'_>) -> Option<BodyTemplate> {
        let written = self.source.get(value.span()).unwrap_or_default();
        match value.get_ref() {
            DeValue::String(text) => self
                .template(value, text, 0..text.len(), scope)
                .map(|(template, _)| BodyTemplate::String(template)),
            DeValue::Integer(integer) => {
                // TOML integers are 64-bit signed, so this holds for anything the parser accepted.
                let number = i64::from_str_radix(integer.as_str(), integer.radix()).ok();
                if number.is_none() {
                    self.error(
                        &value.span(),
                        format!("integer {written} does not fit in 64 bits"),
                        None,
                    );
                }
                number.map(BodyTemplate::Integer)
            }
            DeValue::Float(float) => {
                let number = float.as_str().parse::<f64>().ok().filter(|f| f.is_finite());
                if number.is_none() {
                    self.error(
                        &value.span(),
                        format!("`{written}` has no JSON form"),
                        Some(format!(
                            "JSON numbers are finite; quote it to send a string: \"{written}\""
                        )),
                    );
                }
                number.map(BodyTemplate::Float)
            }
            DeValue::Boolean(flag) => Some(BodyTemplate::Bool(*flag)),
            DeValue::Datetime(_) => {
                let help = format!("quote it to send it as a string: \"{written}\"");
                self.error(&value.span(), "a date-time has no JSON form", Some(help));
                None
            }
            DeValue::Array(items) => {
                // Every element is checked, so that all mistakes are reported at once.
                let elements: Vec<_> = items
                    .iter()
                    .map(|item| self.body_template(item, scope))
                    .collect();
                elements
                    .into_iter()
                    .collect::<Option<_>>()
                    .map(BodyTemplate::Array)
            }
            DeValue::Table(table) => {
                let mut entries: Vec<_> = table.iter().collect();
                entries.sort_by_key(|(key, _)| key.span().start);
                let fields: Vec<_> = entries
                    .into_iter()
                    .map(|(key, value)| {
                        let field = self.body_template(value, scope)?;
                        Some((key.get_ref().to_string(), field))
                    })
                    .collect();
                fields
                    .into_iter()
                    .collect::<Option<_>>()
                    .map(BodyTemplate::Object)
            }
        }
    }

    /// Parses the part `range` of the string `text` (the value of `value`) as a template and
    /// checks its references; also returns where each expression is, within `text`.
    fn template(
        &mut self,
        value: &Value<'_>,
        text: &str,
        range: Range<usize>,
        scope: &dyn CallScope,
    ) -> Option<(Template, Vec<Range<usize>>)> {
        let offset = range.start;
        let (template, expressions) = match template::parse_in(&text[range], scope.dialect()) {
            Ok(parsed) => parsed,
            Err(error) => {
                let at = error.range.start + offset..error.range.end + offset;
                let span = self.span_in(value, text, at);
                self.error(&span, error.message, Some(error.help));
                return None;
            }
        };
        let expressions: Vec<Range<usize>> = expressions
            .into_iter()
            .map(|e| e.start + offset..e.end + offset)
            .collect();
        let mut valid = true;
        for (reference, at) in template.refs().zip(&expressions) {
            if let Err((message, help)) = scope.check(reference) {
                let span = self.span_in(value, text, at.clone());
                self.error(&span, message, Some(help));
                valid = false;
            }
        }
        valid.then_some((template, expressions))
    }

    /// The span of `range` within the string `text` held by `value`, when the string is written
    /// so that its characters map one to one onto the source (a one-line string without
    /// escapes); otherwise the whole value's span, which is still the right line.
    pub(super) fn span_in(&self, value: &Value<'_>, text: &str, range: Range<usize>) -> Span {
        let span = value.span();
        let raw = self.source.get(span.clone()).unwrap_or_default();
        let plain = raw.len() == text.len() + 2
            && ((raw.starts_with('"') && !raw.starts_with("\"\"\"") && !raw.contains('\\'))
                || (raw.starts_with('\'') && !raw.starts_with("'''")));
        if plain {
            span.start + 1 + range.start..span.start + 1 + range.end
        } else {
            span
        }
    }
}
