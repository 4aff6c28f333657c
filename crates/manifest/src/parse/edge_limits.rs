//! The edge's hygiene in `[gateway]`: body and head limits, timeouts, the access log, TLS
//! files (`[gateway.tls]`), and a route's `cors = { ... }`.

use std::time::Duration;

use toml::de::{DeTable, DeValue};

use super::{Checker, Span, Value, a_type};
use crate::edge::{Cors, EdgeLimits, TlsSettings};

const TLS_KEYS: &[&str] = &["cert", "key"];
pub(super) const CORS_KEYS: &[&str] = &[
    "origins",
    "methods",
    "headers",
    "expose",
    "credentials",
    "max_age",
];

/// hyper's smallest HTTP/1 read buffer; a request head must fit in it.
const MIN_MAX_HEADERS: u64 = 8 << 10;
const DEFAULT_CORS_METHODS: [&str; 3] = ["GET", "HEAD", "POST"];
const DEFAULT_CORS_HEADERS: [&str; 1] = ["content-type"];
const DEFAULT_CORS_MAX_AGE: Duration = Duration::from_secs(600);
const ORIGIN_HELP: &str = "write an origin as scheme://host or scheme://host:port, like \
                           \"https://shop.example\" or \"http://localhost:3000\", or \"*\" for any";

impl Checker<'_> {
    /// `max_body`, `max_headers`, the three timeouts and `access_log` of `[gateway]`.
    pub(super) fn edge_limits(&mut self, table: &DeTable<'_>) -> EdgeLimits {
        let mut limits = EdgeLimits::default();
        self.set_size(table, "max_body", &mut limits.max_body);
        let mut max_headers = limits.max_headers;
        if self.set_size(table, "max_headers", &mut max_headers) {
            if max_headers < MIN_MAX_HEADERS {
                let span = table.get("max_headers").map(|v| v.span()).unwrap_or(0..0);
                let written = self.source.get(span.clone()).unwrap_or_default().to_owned();
                self.error(
                    &span,
                    format!("`max_headers` must be at least 8KiB (8192 bytes), found {written}"),
                    Some(
                        "the HTTP server reads a request head into a buffer of at least 8 KiB; \
                         use \"8KiB\" or more, like \"64KiB\""
                            .into(),
                    ),
                );
            } else {
                limits.max_headers = max_headers;
            }
        }
        self.set_duration(table, "header_timeout", false, &mut limits.header_timeout);
        self.set_duration(table, "idle_timeout", false, &mut limits.idle_timeout);
        self.set_duration(table, "body_timeout", false, &mut limits.body_timeout);
        self.set_bool(table, "access_log", &mut limits.access_log);
        limits
    }

    /// `[gateway.tls]`: the certificate and key files, as written (relative paths are relative
    /// to the manifest's directory). Whether they exist is checked when the gateway starts.
    pub(super) fn gateway_tls(&mut self, table: &DeTable<'_>) -> Option<TlsSettings> {
        let span = table.get("tls")?.span();
        let tls = self.section(table, "gateway", "tls", TLS_KEYS)?;
        let file = |checker: &mut Self, key: &str, example: &str, what: &str| {
            let Some(value) = tls.get(key) else {
                checker.error(
                    &span,
                    format!("missing required key `{key}` in [gateway.tls]"),
                    Some(format!(
                        "add `{key} = \"{example}\"`: {what}, relative to the manifest's directory"
                    )),
                );
                return None;
            };
            let path = checker.string(value, key)?;
            if path.trim().is_empty() {
                checker.error(
                    &value.span(),
                    format!("`{key}` must not be empty"),
                    Some(format!("give the path of {what}, like \"{example}\"")),
                );
                return None;
            }
            Some(path.into())
        };
        let cert = file(self, "cert", "tls/cert.pem", "the PEM certificate chain");
        let key = file(self, "key", "tls/key.pem", "the PEM private key");
        Some(TlsSettings {
            cert: cert?,
            key: key?,
        })
    }

    /// A route's `cors = { ... }`.
    pub(super) fn cors(&mut self, table: &DeTable<'_>, span: &Span) -> Option<Cors> {
        let mut valid = true;
        let mut cors = Cors {
            origins: Vec::new(),
            methods: DEFAULT_CORS_METHODS.map(String::from).to_vec(),
            headers: DEFAULT_CORS_HEADERS.map(String::from).to_vec(),
            expose: Vec::new(),
            credentials: false,
            max_age: DEFAULT_CORS_MAX_AGE,
        };
        let mut star = None;
        match table.get("origins") {
            None => {
                self.error(
                    span,
                    "missing required key `origins` in `cors`",
                    Some(
                        "list the browser origins that may call this route, like \
                         `origins = [\"https://shop.example\"]`"
                            .into(),
                    ),
                );
                valid = false;
            }
            Some(value) => {
                let items = self.strings(value, "origins", "[\"https://shop.example\"]");
                if items.as_ref().is_some_and(Vec::is_empty) {
                    self.error(
                        &value.span(),
                        "`origins` must list at least one origin",
                        Some(ORIGIN_HELP.into()),
                    );
                }
                for (origin, span) in items.unwrap_or_default() {
                    if origin == "*" {
                        star = Some(span);
                        cors.origins.push(origin);
                        continue;
                    }
                    match normalise_origin(&origin) {
                        Ok(normal) => cors.origins.push(normal),
                        Err(help) => {
                            self.error(&span, format!("invalid origin {origin:?}"), Some(help));
                            valid = false;
                        }
                    }
                }
            }
        }
        if let Some(star) = &star
            && cors.origins.len() > 1
        {
            self.error(
                star,
                "`\"*\"` allows every origin, so the other `origins` say nothing",
                Some("keep either \"*\" or the list of exact origins".into()),
            );
            valid = false;
        }
        if let Some(value) = table.get("methods") {
            let mut methods = Vec::new();
            for (method, span) in self
                .strings(value, "methods", "[\"GET\", \"POST\"]")
                .unwrap_or_default()
            {
                if !is_token(&method) {
                    self.error(
                        &span,
                        format!("invalid method {method:?}"),
                        Some("write HTTP method names, like \"GET\" or \"POST\"".into()),
                    );
                    valid = false;
                } else if method.bytes().any(|b| b.is_ascii_lowercase()) {
                    self.error(
                        &span,
                        format!("method {method:?} must be upper case"),
                        Some(format!(
                            "write \"{}\": browsers send method names upper case and compare \
                             them exactly",
                            method.to_ascii_uppercase()
                        )),
                    );
                    valid = false;
                } else if !methods.contains(&method) {
                    methods.push(method);
                }
            }
            cors.methods = methods;
        }
        for (key, slot) in [("headers", &mut cors.headers), ("expose", &mut cors.expose)] {
            let Some(value) = table.get(key) else {
                continue;
            };
            let mut names = Vec::new();
            for (name, span) in self
                .strings(value, key, "[\"content-type\", \"authorization\"]")
                .unwrap_or_default()
            {
                if name == "*" || !is_token(&name) {
                    self.error(
                        &span,
                        format!("invalid header name {name:?} in `{key}`"),
                        Some(
                            "list header names, like \"content-type\" or \"x-request-id\" \
                             (`*` is not supported)"
                                .into(),
                        ),
                    );
                    valid = false;
                    continue;
                }
                let name = name.to_ascii_lowercase();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            *slot = names;
        }
        self.set_bool(table, "credentials", &mut cors.credentials);
        if cors.credentials
            && let Some(star) = &star
        {
            let blamed = table.get("credentials").map_or(star.clone(), |v| v.span());
            self.error(
                &blamed,
                "`credentials = true` cannot be combined with `origins = [\"*\"]`",
                Some(
                    "browsers refuse credentialed responses allowed for any origin; list the \
                     exact origins instead, like `origins = [\"https://shop.example\"]`"
                        .into(),
                ),
            );
            valid = false;
        }
        // Zero is meaningful: browsers ask again before every request.
        valid &= self.set_duration(table, "max_age", true, &mut cors.max_age);
        valid.then_some(cors)
    }

    /// An array of strings, each with its span; `None` (reported) when it is not one.
    fn strings(
        &mut self,
        value: &Value<'_>,
        key: &str,
        example: &str,
    ) -> Option<Vec<(String, Span)>> {
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                value,
                key,
                "an array of strings",
                Some(format!("write it like `{key} = {example}`")),
            );
            return None;
        };
        let mut strings = Vec::with_capacity(items.len());
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(text) => strings.push((text.to_string(), item.span())),
                other => self.error(
                    &item.span(),
                    format!("`{key}` must hold strings, found {}", a_type(other)),
                    Some(format!("write it like `{key} = {example}`")),
                ),
            }
        }
        Some(strings)
    }
}

/// An RFC 6454 origin, `scheme://host[:port]`, lower-cased; the error is the help to show.
fn normalise_origin(origin: &str) -> Result<String, String> {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Err(ORIGIN_HELP.into());
    };
    let valid_scheme = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !valid_scheme {
        return Err(ORIGIN_HELP.into());
    }
    if let Some(at) = rest.find(['/', '?', '#']) {
        let trimmed = format!("{scheme}://{}", &rest[..at]);
        return Err(format!(
            "an origin has no path, query or trailing slash: write \"{trimmed}\""
        ));
    }
    if rest.contains('@') {
        return Err(format!("an origin has no user name: {ORIGIN_HELP}"));
    }
    let (host, port) = match rest.rsplit_once(':') {
        // `[::1]` holds colons of its own.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (rest, None),
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(ORIGIN_HELP.into());
    }
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(format!(
            "the port {port:?} is not a port number: {ORIGIN_HELP}"
        ));
    }
    Ok(origin.to_ascii_lowercase())
}

/// An RFC 9110 token: method and header names.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert_eq!(
            normalise_origin("HTTPS://Shop.Example").as_deref(),
            Ok("https://shop.example")
        );
        assert!(normalise_origin("http://localhost:3000").is_ok());
        assert!(normalise_origin("http://[::1]:3000").is_ok());
        assert!(normalise_origin("http://[::1]").is_ok());
        assert!(normalise_origin("shop.example").is_err());
        assert!(normalise_origin("https://shop.example/").is_err());
        assert!(normalise_origin("https://shop.example/app").is_err());
        assert!(normalise_origin("https://").is_err());
        assert!(normalise_origin("https://shop.example:99999").is_err());
        assert!(normalise_origin("https://user@shop.example").is_err());
    }

    #[test]
    fn tokens() {
        assert!(is_token("GET"));
        assert!(is_token("x-request-id"));
        assert!(!is_token("x request"));
        assert!(!is_token(""));
        assert!(!is_token("a:b"));
    }
}
