//! API versions of gateway routes: `version`/`default_version` (several routes may share one
//! prefix, one per version), `service = "orders@2"` (a route served by one version of a
//! service), and `deprecated`/`sunset`/`deprecation_link`.

use std::collections::HashMap;
use std::time::SystemTime;

use toml::de::{DeTable, DeValue};

use super::{Checker, Span, Value};
use crate::edge::{Deprecation, RouteVersion};
use crate::model::Route;

const DATE_HELP: &str =
    "write an RFC 3339 date-time in UTC, like `2027-01-01T00:00:00Z` (with or without quotes)";
const MAX_VERSION: usize = 32;

impl Checker<'_> {
    /// `version` and `default_version` of a route.
    pub(super) fn route_version(&mut self, table: &DeTable<'_>) -> Option<RouteVersion> {
        let value = table.get("version");
        let name = value.and_then(|value| {
            let text = self.string(value, "version")?;
            if text.is_empty()
                || text.len() > MAX_VERSION
                || !text
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                self.error(
                    &value.span(),
                    format!("invalid API version {text:?}"),
                    Some(format!(
                        "use up to {MAX_VERSION} letters, digits, `.`, `-` or `_`, like \
                         `version = \"2\"` or `version = \"2024-06-01\"`"
                    )),
                );
                return None;
            }
            Some(text.to_owned())
        });
        let mut default = false;
        self.set_bool(table, "default_version", &mut default);
        if default && value.is_none() {
            let span = table
                .get("default_version")
                .map(|v| v.span())
                .unwrap_or(0..0);
            self.error(
                &span,
                "`default_version` without `version`",
                Some(
                    "give the route the version it serves, like `version = \"1\"`, or remove \
                     `default_version`"
                        .into(),
                ),
            );
        }
        name.map(|name| RouteVersion { name, default })
    }

    /// `deprecated`, `sunset` and `deprecation_link` of a route; `None` when none is set.
    pub(super) fn route_deprecation(&mut self, table: &DeTable<'_>) -> Option<Deprecation> {
        let deprecated = table.get("deprecated");
        let sunset_value = table.get("sunset");
        let link_value = table.get("deprecation_link");
        if deprecated.is_none() && sunset_value.is_none() && link_value.is_none() {
            return None;
        }
        let mut is_deprecated = deprecated.is_some();
        let since = match deprecated.map(|value| (value, value.get_ref())) {
            Some((_, DeValue::Boolean(flag))) => {
                is_deprecated = *flag;
                None
            }
            Some((value, _)) => self.date(value, "deprecated"),
            None => None,
        };
        let sunset = sunset_value.and_then(|value| self.date(value, "sunset"));
        let link = link_value.and_then(|value| {
            let text = self.string(value, "deprecation_link")?;
            if !(text.starts_with("https://") || text.starts_with("http://"))
                || text.contains(['<', '>', ' ', '"'])
            {
                self.error(
                    &value.span(),
                    format!("`deprecation_link` must be an http(s) URL, found {text:?}"),
                    Some(
                        "link to the page that explains the deprecation, like \
                         \"https://docs.example.com/api/v1-sunset\""
                            .into(),
                    ),
                );
                return None;
            }
            Some(text.to_owned())
        });
        if let (Some(since), Some(sunset), Some(value)) = (since, sunset, sunset_value)
            && sunset < since
        {
            self.error(
                &value.span(),
                "`sunset` is before `deprecated`",
                Some("a route is deprecated first and removed later; swap the two dates".into()),
            );
        }
        if !is_deprecated && (sunset.is_some() || link.is_some()) {
            let span = deprecated.map(|v| v.span()).unwrap_or(0..0);
            self.error(
                &span,
                "`sunset` or `deprecation_link` on a route that is not deprecated",
                Some("set `deprecated = true` or the date it was deprecated".into()),
            );
        }
        (is_deprecated || sunset.is_some()).then_some(Deprecation {
            since,
            sunset,
            link,
        })
    }

    /// An RFC 3339 date-time, written as a TOML date-time or a string.
    fn date(&mut self, value: &Value<'_>, key: &str) -> Option<SystemTime> {
        let text = match value.get_ref() {
            DeValue::Datetime(datetime) => datetime.to_string(),
            DeValue::String(text) => text.to_string(),
            _ => {
                self.wrong_type(value, key, "a date-time", Some(DATE_HELP.into()));
                return None;
            }
        };
        match humantime::parse_rfc3339_weak(text.trim_end_matches('Z')) {
            Ok(time) if text.ends_with('Z') || !text.contains(['+']) => Some(time),
            _ => {
                self.error(
                    &value.span(),
                    format!("invalid date-time {text:?} for `{key}`"),
                    Some(DATE_HELP.into()),
                );
                None
            }
        }
    }

    /// Routes that share a prefix must each name a different version, and at most one of them
    /// may be the default.
    pub(super) fn check_route_versions(&mut self, routes: &[(Route, Span)]) {
        let mut groups: HashMap<&str, Vec<&(Route, Span)>> = HashMap::new();
        for entry in routes {
            groups.entry(&entry.0.prefix).or_default().push(entry);
        }
        // A group where no route has a version is a plain duplicate, reported with the prefix.
        let mut groups: Vec<_> = groups
            .into_iter()
            .filter(|(_, group)| group.len() > 1 && group.iter().any(|(r, _)| r.version.is_some()))
            .collect();
        groups.sort_by_key(|(_, group)| group[0].1.start);
        for (prefix, group) in groups {
            let mut seen: HashMap<&str, usize> = HashMap::new();
            let mut defaults = 0;
            for (route, span) in group {
                let Some(version) = &route.version else {
                    self.error(
                        span,
                        format!("several routes for `{prefix}`, and this one has no `version`"),
                        Some(
                            "routes may share a prefix only to serve different API versions: \
                             give each a `version = \"...\"`, or change the prefix"
                                .into(),
                        ),
                    );
                    continue;
                };
                if let Some(line) = seen.get(version.name.as_str()) {
                    self.error(
                        span,
                        format!("version `{}` of `{prefix}` is routed twice", version.name),
                        Some(format!(
                            "the route on line {line} already serves it; remove one of the two"
                        )),
                    );
                }
                let (line, _) = self.lines.line_column(span.start);
                seen.insert(&version.name, line);
                if version.default {
                    defaults += 1;
                    if defaults == 2 {
                        self.error(
                            span,
                            format!("two default versions of `{prefix}`"),
                            Some(
                                "requests that name no version go to one route: keep \
                                 `default_version = true` on one of them"
                                    .into(),
                            ),
                        );
                    }
                }
            }
        }
    }
}
