//! `[gateway.rate_limit]` (where the counters live) and a route's `rate_limit = { rate, burst,
//! key }` (how often whose requests may come).

use std::time::Duration;

use toml::de::{DeTable, DeValue};

use super::{Checker, Value};
use crate::edge::{RateLimit, RateLimitKey, RateLimitStore};
use crate::suggest::closest;

const STORE_KEYS: &[&str] = &["store"];
/// Keys of a route's `rate_limit`; also recognised when misplaced in `[gateway.rate_limit]`.
const LIMIT_KEYS: &[&str] = &["rate", "burst", "key"];
const KEY_KINDS: [&str; 4] = ["ip", "api_key", "subject", "route"];
const RATE_HELP: &str = "write requests per second, minute or hour, like \"100/s\", \"600/m\" or \
                         \"5000/h\"";
const STORE_HELP: &str = "use \"memory\" (one gateway) or a Redis URL shared by every gateway, \
                          like \"redis://127.0.0.1:6379\" (or rediss:// for TLS)";
const KEY_HELP: &str = "use \"ip\" (the default), \"api_key\", \"subject\", \"route\" (everyone \
                        together) or \"header:NAME\", like \"header:x-tenant\"";
const DEFAULT_BURST: u32 = 1;
/// Bursts beyond this are no limit at all, and would make counters live for years.
const MAX_BURST: u32 = 1_000_000;
/// The Redis store counts whole microseconds between requests: at this rate (10µs apart) that
/// rounding costs at most 5%, and the fastest limit a single client key needs is far below it.
const MAX_PER_SECOND: u64 = 100_000;
/// Headers whose values are credentials: counting by them would keep secrets as counter keys.
const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

/// Why a `rate` string is wrong: the message and the fix.
type Refusal = (String, String);

/// `N/s`, `N/m` or `N/h`, as requests per period.
fn parse_rate(text: &str) -> Result<(u32, Duration), Refusal> {
    let trimmed = text.trim();
    let Some((count, unit)) = trimmed.split_once('/') else {
        let help = match trimmed.parse::<u64>() {
            Ok(n) => format!(
                "say per what: write it as \"{n}/s\" (or \"{n}/m\", \"{n}/h\" for per minute or hour)"
            ),
            Err(_) => RATE_HELP.to_owned(),
        };
        return Err((format!("invalid `rate` {text:?}: it has no period"), help));
    };
    let (count, unit) = (count.trim(), unit.trim());
    let per = match unit {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => {
            let near = match other.to_ascii_lowercase().as_str() {
                "sec" | "secs" | "second" | "seconds" | "1s" => Some("s"),
                "min" | "mins" | "minute" | "minutes" | "1m" => Some("m"),
                "hr" | "hrs" | "hour" | "hours" | "1h" => Some("h"),
                "d" | "day" | "days" => {
                    return Err((
                        format!("unknown period `{other}` in `rate` {text:?}"),
                        "periods are s, m and h: count a day's requests per hour, like \
                         \"1000/h\""
                            .into(),
                    ));
                }
                _ => None,
            };
            let help = match near {
                Some(unit) => format!("did you mean \"{count}/{unit}\"? {RATE_HELP}"),
                None => format!("periods are s, m and h: {RATE_HELP}"),
            };
            return Err((format!("unknown period `{other}` in `rate` {text:?}"), help));
        }
    };
    let requests: u64 = match count.parse() {
        Ok(n) => n,
        Err(_) => {
            let help = match count.parse::<f64>() {
                Ok(fraction) if fraction > 0.0 && fraction.is_finite() && unit != "h" => {
                    let slower = if unit == "s" { "m" } else { "h" };
                    format!(
                        "count per a longer period instead, like \"{}/{slower}\"",
                        (fraction * 60.0).round()
                    )
                }
                _ => RATE_HELP.to_owned(),
            };
            return Err((
                format!("invalid `rate` {text:?}: `{count}` is not a whole number of requests"),
                help,
            ));
        }
    };
    if requests == 0 {
        return Err((
            format!("`rate` {text:?} allows no request at all"),
            "allow at least one request per period, like \"1/s\", or remove `rate_limit` to \
             leave the route unlimited"
                .into(),
        ));
    }
    if requests > MAX_PER_SECOND * per.as_secs() {
        return Err((
            format!("`rate` {text:?} is faster than the limiter can measure"),
            format!("the fastest rate is \"{MAX_PER_SECOND}/s\""),
        ));
    }
    // Within u32: at most 100,000 a second, over an hour at most.
    let requests = u32::try_from(requests).unwrap_or(u32::MAX);
    Ok((requests, per))
}

/// True for an HTTP field name (RFC 9110 `token`).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `ip`, `api_key`, `subject`, `route` or `header:NAME`.
fn parse_key(text: &str) -> Result<RateLimitKey, Refusal> {
    match text {
        "ip" => return Ok(RateLimitKey::ClientIp),
        "api_key" => return Ok(RateLimitKey::ApiKey),
        "subject" => return Ok(RateLimitKey::Subject),
        "route" => return Ok(RateLimitKey::Route),
        _ => {}
    }
    if let Some(name) = text.strip_prefix("header:") {
        let name = name.trim();
        if name.is_empty() {
            return Err((
                format!("`key` {text:?} names no header"),
                "write the header's name after `header:`, like \"header:x-tenant\"".into(),
            ));
        }
        if !is_header_name(name) {
            return Err((
                format!("invalid header name {name:?} in `key`"),
                "header names are letters, digits and `-` (no spaces or `:`), like \
                 \"header:x-tenant\""
                    .into(),
            ));
        }
        // Field names are case-insensitive; requests are matched by the lower-case form.
        let name = name.to_ascii_lowercase();
        if CREDENTIAL_HEADERS.contains(&name.as_str()) {
            return Err((
                format!("`key` must not count requests by the `{name}` header"),
                "its value is a credential, which would be kept as a counter key; use \
                 key = \"subject\" to count by the verified caller instead"
                    .into(),
            ));
        }
        return Ok(RateLimitKey::Header(name));
    }
    let message = format!("unknown rate limit key {text:?}");
    if text == "header" {
        return Err((
            "`key = \"header\"` needs the header's name".into(),
            "write it like \"header:x-tenant\"".into(),
        ));
    }
    if let Some(near) = closest(text, KEY_KINDS) {
        return Err((message, format!("did you mean \"{near}\"? {KEY_HELP}")));
    }
    // `key = "x-tenant"`: a header name where a kind was expected.
    if text.contains('-') && is_header_name(text) {
        let name = text.to_ascii_lowercase();
        return Err((
            message,
            format!("to count by a request header, write \"header:{name}\""),
        ));
    }
    Err((message, KEY_HELP.into()))
}

/// Checks a `redis://` or `rediss://` URL far enough to catch typos: a host, a numeric port,
/// a numeric database.
fn parse_redis_url(text: &str) -> Result<String, Refusal> {
    let help = || "write it like \"redis://127.0.0.1:6379\", or \"redis://:PASSWORD@HOST:6379/0\"";
    let rest = text
        .strip_prefix("redis://")
        .or_else(|| text.strip_prefix("rediss://"))
        .ok_or_else(|| {
            (
                format!("unsupported rate limit store {text:?}"),
                format!("a Redis URL starts with redis:// (or rediss:// for TLS); {STORE_HELP}"),
            )
        })?;
    if text.contains(char::is_whitespace) {
        return Err((
            format!("invalid Redis URL {text:?}: it contains spaces"),
            help().into(),
        ));
    }
    let (authority, database) = match rest.split_once('/') {
        Some((authority, database)) => (authority, database),
        None => (rest, ""),
    };
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        // [::1]:6379
        match bracketed.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => ("", None),
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err((
            format!("invalid Redis URL {text:?}: it names no host"),
            help().into(),
        ));
    }
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err((
            format!("invalid Redis URL {text:?}: `{port}` is not a port"),
            help().into(),
        ));
    }
    if !database.is_empty() && database.parse::<u32>().is_err() {
        return Err((
            format!("invalid Redis URL {text:?}: the path must be a database number"),
            "write the database as a number after the host, like \"redis://127.0.0.1:6379/0\""
                .into(),
        ));
    }
    Ok(text.to_owned())
}

impl Checker<'_> {
    /// `[gateway.rate_limit]`: the store, default memory.
    pub(super) fn rate_limit_store(&mut self, gateway: &DeTable<'_>) -> RateLimitStore {
        let Some(value) = gateway.get("rate_limit") else {
            return RateLimitStore::Memory;
        };
        let DeValue::Table(table) = value.get_ref() else {
            self.wrong_type(
                value,
                "rate_limit",
                "a table",
                Some(
                    "[gateway.rate_limit] holds `store = \"...\"`; a route's limit goes on the \
                     route, like `rate_limit = { rate = \"100/s\" }`"
                        .into(),
                ),
            );
            return RateLimitStore::Memory;
        };
        for key in table.keys() {
            let name: &str = key.get_ref();
            if STORE_KEYS.contains(&name) {
                continue;
            }
            let help = if LIMIT_KEYS.contains(&name) {
                format!(
                    "`{name}` is set per route: write `rate_limit = {{ rate = \"100/s\", ... }}` \
                     in the [[gateway.routes]] entry; [gateway.rate_limit] only holds `store`"
                )
            } else {
                match closest(name, STORE_KEYS.iter().copied()) {
                    Some(guess) => format!(
                        "did you mean `{guess}`? allowed keys in [gateway.rate_limit] are: store"
                    ),
                    None => "allowed keys in [gateway.rate_limit] are: store".into(),
                }
            };
            self.error(
                &key.span(),
                format!("unknown key `{name}` in [gateway.rate_limit]"),
                Some(help),
            );
        }
        let Some(value) = table.get("store") else {
            return RateLimitStore::Memory;
        };
        let Some(text) = self.string_with_help(value, "store", "a string", STORE_HELP) else {
            return RateLimitStore::Memory;
        };
        if text == "memory" {
            return RateLimitStore::Memory;
        }
        let refusal = if text == "redis" {
            (
                "`store = \"redis\"` needs the server's URL".to_owned(),
                "write it like \"redis://127.0.0.1:6379\"".to_owned(),
            )
        } else if text.contains("://") {
            match parse_redis_url(text) {
                Ok(url) => return RateLimitStore::Redis { url },
                Err(refusal) => refusal,
            }
        } else {
            let help = match closest(text, ["memory"]) {
                Some(guess) => format!("did you mean \"{guess}\"? {STORE_HELP}"),
                None => STORE_HELP.to_owned(),
            };
            (format!("unknown rate limit store {text:?}"), help)
        };
        self.error(&value.span(), refusal.0, Some(refusal.1));
        RateLimitStore::Memory
    }

    /// A route's `rate_limit`, inline or as a `[gateway.routes.rate_limit]` section.
    pub(super) fn route_rate_limit(&mut self, route: &DeTable<'_>) -> Option<RateLimit> {
        let span = route.get("rate_limit")?.span();
        let table = self.section(route, "gateway.routes", "rate_limit", LIMIT_KEYS)?;
        let rate = match table.get("rate") {
            Some(value) => self.rate(value),
            None => {
                self.error(
                    &span,
                    "missing required key `rate` in `rate_limit`",
                    Some(format!("add how often requests may come: {RATE_HELP}")),
                );
                None
            }
        };
        let burst = match table.get("burst") {
            None => Some(DEFAULT_BURST),
            Some(value) => self.burst(value),
        };
        let key = match table.get("key") {
            None => Some(RateLimitKey::ClientIp),
            Some(value) => self.rate_limit_key(value),
        };
        let ((requests, per), burst, key) = (rate?, burst?, key?);
        Some(RateLimit {
            requests,
            per,
            burst,
            key,
        })
    }

    fn rate(&mut self, value: &Value<'_>) -> Option<(u32, Duration)> {
        let text = match value.get_ref() {
            DeValue::String(text) => text.as_ref(),
            DeValue::Integer(integer) => {
                let written = integer.as_str();
                self.wrong_type(
                    value,
                    "rate",
                    "a string",
                    Some(format!(
                        "say per what, in quotes: write it as \"{written}/s\" (or \"{written}/m\", \
                         \"{written}/h\")"
                    )),
                );
                return None;
            }
            _ => {
                self.wrong_type(value, "rate", "a string", Some(RATE_HELP.into()));
                return None;
            }
        };
        match parse_rate(text) {
            Ok(rate) => Some(rate),
            Err((message, help)) => {
                self.error(&value.span(), message, Some(help));
                None
            }
        }
    }

    fn burst(&mut self, value: &Value<'_>) -> Option<u32> {
        let written = self.source.get(value.span()).unwrap_or_default();
        let help = match value.get_ref() {
            DeValue::Integer(integer) => {
                match i64::from_str_radix(integer.as_str(), integer.radix()) {
                    Ok(n) if n < 1 => Some(
                        "`burst = 1` (the default) lets requests through one at a time at the \
                         steady rate; larger values let that many come at once",
                    ),
                    Ok(n) if n > i64::from(MAX_BURST) => {
                        Some("a burst this large is no limit at all; raise `rate` instead")
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(help) = help {
            self.error(
                &value.span(),
                format!("`burst` must be between 1 and {MAX_BURST}, found {written}"),
                Some(help.into()),
            );
            return None;
        }
        self.integer(value, "burst", 1..=MAX_BURST, "`burst = 20`")
    }

    fn rate_limit_key(&mut self, value: &Value<'_>) -> Option<RateLimitKey> {
        let text = self.string_with_help(value, "key", "a string", KEY_HELP)?;
        match parse_key(text) {
            Ok(key) => Some(key),
            Err((message, help)) => {
                self.error(&value.span(), message, Some(help));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_requests_per_period() {
        assert_eq!(parse_rate("100/s"), Ok((100, Duration::from_secs(1))));
        assert_eq!(parse_rate(" 5 / m "), Ok((5, Duration::from_secs(60))));
        assert_eq!(parse_rate("1/h"), Ok((1, Duration::from_secs(3600))));
        assert_eq!(
            parse_rate("360000000/h"),
            Ok((360_000_000, Duration::from_secs(3600)))
        );
        assert!(parse_rate("360000001/h").is_err());
        assert!(parse_rate("100001/s").is_err());
        assert!(parse_rate("99999999999999999999/h").is_err());
    }

    #[test]
    fn header_names_are_tokens() {
        assert!(is_header_name("x-tenant"));
        assert!(!is_header_name("x tenant"));
        assert!(!is_header_name("x:tenant"));
        assert!(!is_header_name(""));
    }
}
