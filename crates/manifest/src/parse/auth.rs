//! `[gateway.auth.NAME]`: the authenticators — JWT verifiers (`jwks` or `secret_env`) and API key
//! lists (`keys`) — and a route's `auth` and `scopes`, which name them.
//!
//! The kind of an authenticator follows from its keys, so most mistakes are a key of the wrong
//! kind; those get a message that says which kind the table is, not just "unknown key".

use std::time::Duration;

use toml::de::{DeTable, DeValue};

use super::{Checker, Span, Value, a_type};
use crate::edge::{
    ApiKey, ApiKeySettings, AuthKind, Authenticator, JwtAlgorithm, JwtKeys, JwtSettings, RouteAuth,
};
use crate::suggest::closest;

const JWT_KEYS: &[&str] = &[
    "jwks",
    "refresh",
    "secret_env",
    "issuer",
    "audience",
    "algorithms",
    "leeway",
    "claims",
];
const API_KEY_KEYS: &[&str] = &["header", "keys"];
const KEY_ENTRY_KEYS: &[&str] = &["name", "sha256", "scopes"];
const DEFAULT_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Fetching a JWKS more often than this is a load on the identity provider, not a fresher key:
/// rotations are picked up at once through an unknown `kid` anyway.
const MIN_REFRESH: Duration = Duration::from_secs(1);
const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Clocks that disagree by more than this are broken; a larger leeway stretches every token's
/// lifetime by as much.
const MAX_LEEWAY: Duration = Duration::from_secs(5 * 60);
const DEFAULT_API_KEY_HEADER: &str = "x-api-key";
const MAX_NAME: usize = 64;
const MAX_SCOPE: usize = 200;
/// Headers a claim may not be forwarded as: the gateway's own, and ones that change how the
/// request is framed, routed or authenticated.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "content-type",
    "cookie",
    "forwarded",
    "host",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "traceparent",
    "tracestate",
    "x-request-id",
];
const AUTH_HELP: &str = "an authenticator verifies JWTs (`jwks = \"URL or file\"` or \
                         `secret_env = \"VARIABLE\"`) or API keys (`keys = [...]`)";
const SHA256_HELP: &str = "write the key's SHA-256 digest as 64 hexadecimal digits; \
                           `flotilla hash-key KEY` prints it";
const SCOPE_HELP: &str = "a scope is one word without spaces, quotes or backslashes, like \
                          \"orders:read\"";

/// Why `name` cannot name an authenticator, if it cannot.
fn name_error(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Some(format!("it must be 1 to {MAX_NAME} characters long"));
    }
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b);
    (!name.bytes().all(allowed))
        .then(|| "only lower-case letters, digits, `-` and `_` are allowed".into())
}

/// Why `name` cannot be an HTTP header name as written, if it cannot.
fn header_name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a header name cannot be empty".into());
    }
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(token) {
        return Some("a header name is one word of letters, digits and `-`".into());
    }
    name.bytes().any(|b| b.is_ascii_uppercase()).then(|| {
        format!(
            "write header names in lower case, like \"{}\"",
            name.to_ascii_lowercase()
        )
    })
}

/// Why `text` cannot be an `issuer` or `audience` value, if it cannot.
fn claim_text_error(text: &str) -> Option<&'static str> {
    if text.is_empty() {
        Some("it is empty")
    } else if text.trim() != text {
        Some("it starts or ends with whitespace, which no token's claim would")
    } else if text.chars().any(char::is_control) {
        Some("it contains control characters")
    } else {
        None
    }
}

/// Why `scope` is not an OAuth scope token (RFC 6749 §3.3), if it is not.
fn scope_error(scope: &str) -> Option<&'static str> {
    let allowed = |b: u8| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b);
    if scope.is_empty() || scope.len() > MAX_SCOPE {
        Some("it must be 1 to 200 characters long")
    } else if !scope.bytes().all(allowed) {
        Some("it contains a space, a quote, a backslash or a non-ASCII character")
    } else {
        None
    }
}

/// Why `name` cannot name an environment variable, if it cannot.
fn variable_error(name: &str) -> Option<&'static str> {
    let mut bytes = name.bytes();
    match bytes.next() {
        None => Some("it is empty"),
        Some(b) if b.is_ascii_digit() => Some("it starts with a digit"),
        Some(first) => (!std::iter::once(first)
            .chain(bytes)
            .all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then_some("only letters, digits and `_` are allowed"),
    }
}

/// The 32 bytes of a hex SHA-256 digest.
fn sha256_hex(text: &str) -> Result<[u8; 32], String> {
    if text.len() != 64 {
        return Err(format!(
            "a SHA-256 digest is 64 hexadecimal digits, this one has {}",
            text.chars().count()
        ));
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(text.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).ok();
        *byte = pair
            .and_then(|pair| u8::from_str_radix(pair, 16).ok())
            .ok_or_else(|| "it contains characters that are not hexadecimal digits".to_owned())?;
    }
    Ok(digest)
}

fn algorithm_list() -> String {
    let names: Vec<&str> = JwtAlgorithm::ALL.iter().map(|a| a.as_str()).collect();
    names.join(", ")
}

/// Where an authenticator's JWT keys come from, as written, before the rest is read.
enum KeySource<'v> {
    Jwks(&'v Value<'v>),
    Secret(&'v Value<'v>),
}

impl Checker<'_> {
    /// `[gateway.auth]`: every `[gateway.auth.NAME]`, in file order.
    pub(super) fn authenticators(&mut self, value: &Value<'_>) -> Vec<Authenticator> {
        let DeValue::Table(table) = value.get_ref() else {
            self.wrong_type(
                value,
                "auth",
                "a table of authenticators",
                Some(format!(
                    "declare each authenticator as a [gateway.auth.NAME] section; {AUTH_HELP}; \
                     routes then name them with `auth = \"NAME\"`"
                )),
            );
            return Vec::new();
        };
        let mut entries: Vec<_> = table.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        let mut authenticators = Vec::new();
        for (key, value) in entries {
            let name: &str = key.get_ref();
            if let Some(reason) = name_error(name) {
                self.error(
                    &key.span(),
                    format!("invalid authenticator name {name:?}: {reason}"),
                    Some("name authenticators like `users` or `partner-keys`".into()),
                );
            }
            let DeValue::Table(body) = value.get_ref() else {
                self.error(
                    &value.span(),
                    format!(
                        "authenticator `{name}` must be a table, found {}",
                        a_type(value.get_ref())
                    ),
                    Some(format!(
                        "write it as a [gateway.auth.{name}] section; {AUTH_HELP}"
                    )),
                );
                continue;
            };
            let kind = self.authenticator(name, &key.span(), body);
            authenticators.push(Authenticator {
                name: name.to_owned(),
                kind,
            });
        }
        authenticators
    }

    fn authenticator(&mut self, name: &str, span: &Span, body: &DeTable<'_>) -> AuthKind {
        let header = format!("[gateway.auth.{name}]");
        let jwks = body.get("jwks");
        let secret = body.get("secret_env");
        let api_keys = body.get("keys");
        if let (Some(_), Some(secret)) = (jwks, secret) {
            self.error(
                &secret.span(),
                format!("authenticator `{name}` sets both `jwks` and `secret_env`"),
                Some(
                    "use `jwks` for public keys (RS256, ES256, EdDSA, ...) or `secret_env` for a \
                     shared HS256 secret; for both kinds of token, declare two authenticators \
                     and list both in the route's `auth`"
                        .into(),
                ),
            );
        }
        let source = match (jwks, secret) {
            (Some(jwks), _) => Some(KeySource::Jwks(jwks)),
            (None, Some(secret)) => Some(KeySource::Secret(secret)),
            (None, None) => None,
        };
        match (source, api_keys) {
            (Some(source), Some(keys)) => {
                let jwt_key = if jwks.is_some() { "jwks" } else { "secret_env" };
                self.error(
                    &keys.span(),
                    format!(
                        "authenticator `{name}` mixes JWT keys (`{jwt_key}`) and API keys (`keys`)"
                    ),
                    Some(format!(
                        "an authenticator is of one kind: keep `{jwt_key}` here, move `keys` to an \
                         authenticator of its own, like [gateway.auth.{name}-keys], and list both \
                         in the route's `auth`"
                    )),
                );
                self.jwt(name, &header, body, source)
            }
            (Some(source), None) => self.jwt(name, &header, body, source),
            (None, Some(keys)) => self.api_keys(name, &header, body, keys),
            (None, None) => {
                self.error(
                    span,
                    format!("authenticator `{name}` says nothing about how to check credentials"),
                    Some(format!("{AUTH_HELP}; add one of these to {header}")),
                );
                AuthKind::ApiKeys(ApiKeySettings {
                    header: DEFAULT_API_KEY_HEADER.into(),
                    keys: Vec::new(),
                })
            }
        }
    }

    /// Reports the keys of `body` that are not in `allowed`, pointing out the ones that belong to
    /// the other kind of authenticator.
    fn authenticator_keys(
        &mut self,
        body: &DeTable<'_>,
        header: &str,
        allowed: &[&str],
        (other_kind, other_keys): (&str, &[&str]),
        this_kind: &str,
    ) {
        for key in body.keys() {
            let written: &str = key.get_ref();
            if allowed.contains(&written) || (other_keys.contains(&written) && written == "keys") {
                // `keys` next to JWT settings is reported as mixing kinds.
                continue;
            }
            if other_keys.contains(&written) {
                self.error(
                    &key.span(),
                    format!("`{written}` is a setting of {other_kind}, and {header} {this_kind}"),
                    Some(format!(
                        "remove it, or move it to an authenticator of its own; settings here are: {}",
                        allowed.join(", ")
                    )),
                );
                continue;
            }
            let list = allowed.join(", ");
            let help = match closest(written, allowed.iter().copied()) {
                Some(guess) => {
                    format!("did you mean `{guess}`? allowed keys in {header} are: {list}")
                }
                None => format!("allowed keys in {header} are: {list}"),
            };
            self.error(
                &key.span(),
                format!("unknown key `{written}` in {header}"),
                Some(help),
            );
        }
    }

    fn jwt(
        &mut self,
        name: &str,
        header: &str,
        body: &DeTable<'_>,
        source: KeySource<'_>,
    ) -> AuthKind {
        self.authenticator_keys(
            body,
            header,
            JWT_KEYS,
            ("API-key authenticators", API_KEY_KEYS),
            "verifies JWTs",
        );
        let mut refresh = DEFAULT_REFRESH;
        let uses_secret = matches!(source, KeySource::Secret(_));
        if uses_secret {
            if let Some(value) = body.get("refresh") {
                self.error(
                    &value.span(),
                    format!("`refresh` does not apply to `secret_env` in {header}"),
                    Some(
                        "the secret is read once when the gateway starts; `refresh` is how often \
                         a `jwks` is fetched again — remove it"
                            .into(),
                    ),
                );
            }
        } else if self.set_duration(body, "refresh", false, &mut refresh) && refresh < MIN_REFRESH {
            self.error(
                &body.get("refresh").map(|v| v.span()).unwrap_or(0..0),
                "`refresh` must be at least 1s",
                Some(
                    "keys are fetched again at once when a token names an unknown `kid`, so a \
                     long refresh like \"5m\" still picks up rotations"
                        .into(),
                ),
            );
        }
        let keys = match source {
            KeySource::Jwks(value) => self.jwks(value, refresh),
            KeySource::Secret(value) => self.secret_env(value),
        };
        let issuer = body.get("issuer").and_then(|value| {
            let text = self.string(value, "issuer")?;
            self.claim_text(value, "issuer", text)
        });
        let audience = match body.get("audience") {
            Some(value) => self.audience(value),
            None => Vec::new(),
        };
        let algorithms = match body.get("algorithms") {
            Some(value) => self.algorithms(value, uses_secret),
            None if uses_secret => vec![JwtAlgorithm::Hs256],
            None => vec![
                JwtAlgorithm::Rs256,
                JwtAlgorithm::Es256,
                JwtAlgorithm::EdDsa,
            ],
        };
        let mut leeway = DEFAULT_LEEWAY;
        if self.set_duration(body, "leeway", true, &mut leeway) && leeway > MAX_LEEWAY {
            self.error(
                &body.get("leeway").map(|v| v.span()).unwrap_or(0..0),
                format!(
                    "`leeway` must be at most 5m, found {}",
                    humantime::format_duration(leeway)
                ),
                Some(
                    "leeway allows for clocks that disagree; a long one keeps expired tokens \
                     valid — keep it to seconds, like \"30s\""
                        .into(),
                ),
            );
        }
        let forward_claims = match body.get("claims") {
            Some(value) => self.forward_claims(name, value),
            None => Vec::new(),
        };
        AuthKind::Jwt(JwtSettings {
            keys,
            issuer,
            audience,
            algorithms,
            leeway,
            forward_claims,
        })
    }

    fn jwks(&mut self, value: &Value<'_>, refresh: Duration) -> JwtKeys {
        let placeholder = JwtKeys::JwksFile {
            path: Default::default(),
            refresh,
        };
        let help = "use the identity provider's JWKS URL, like \
                    \"https://id.example/.well-known/jwks.json\", or a JSON file relative to the \
                    manifest, like \"keys/jwks.json\"";
        let Some(text) = self.string_with_help(value, "jwks", "a string", help) else {
            return placeholder;
        };
        if let Some((scheme, rest)) = text.split_once("://") {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            let problem = if !matches!(scheme, "http" | "https") {
                Some(format!("`{scheme}://` URLs are not supported"))
            } else if host.is_empty() {
                Some("the URL names no host".into())
            } else if text.contains(char::is_whitespace) {
                Some("the URL contains whitespace".into())
            } else {
                None
            };
            return match problem {
                Some(problem) => {
                    self.error(
                        &value.span(),
                        format!("invalid JWKS URL {text:?}: {problem}"),
                        Some(help.into()),
                    );
                    placeholder
                }
                None => JwtKeys::JwksUrl {
                    url: text.to_owned(),
                    refresh,
                },
            };
        }
        if text.trim().is_empty() {
            self.error(&value.span(), "`jwks` must not be empty", Some(help.into()));
            return placeholder;
        }
        JwtKeys::JwksFile {
            path: text.into(),
            refresh,
        }
    }

    fn secret_env(&mut self, value: &Value<'_>) -> JwtKeys {
        let help = "name the environment variable that holds the shared secret, like \
                    `secret_env = \"SHOP_JWT_SECRET\"`; the secret itself never goes in the \
                    manifest";
        let Some(text) = self.string_with_help(value, "secret_env", "a string", help) else {
            return JwtKeys::SecretEnv {
                variable: String::new(),
            };
        };
        if let Some(problem) = variable_error(text) {
            self.error(
                &value.span(),
                format!("invalid environment variable name {text:?}: {problem}"),
                Some(help.into()),
            );
        }
        JwtKeys::SecretEnv {
            variable: text.to_owned(),
        }
    }

    /// `text` when it can be an issuer or an audience.
    fn claim_text(&mut self, value: &Value<'_>, key: &str, text: &str) -> Option<String> {
        match claim_text_error(text) {
            None => Some(text.to_owned()),
            Some(problem) => {
                self.error(
                    &value.span(),
                    format!("invalid `{key}` {text:?}: {problem}"),
                    Some(format!(
                        "write `{key}` exactly as the tokens' `{}` claim has it, like \"{}\"",
                        if key == "issuer" { "iss" } else { "aud" },
                        if key == "issuer" {
                            "https://id.example/"
                        } else {
                            "shop"
                        }
                    )),
                );
                None
            }
        }
    }

    fn audience(&mut self, value: &Value<'_>) -> Vec<String> {
        let help = "write one audience, like `audience = \"shop\"`, or several, like \
                    `audience = [\"shop\", \"shop-admin\"]`";
        let items: Vec<&Value<'_>> = match value.get_ref() {
            DeValue::String(_) => vec![value],
            DeValue::Array(items) if items.is_empty() => {
                self.error(
                    &value.span(),
                    "`audience` must not be an empty list",
                    Some(format!("{help}, or leave `audience` out to accept any")),
                );
                return Vec::new();
            }
            DeValue::Array(items) => items.iter().collect(),
            _ => {
                self.wrong_type(
                    value,
                    "audience",
                    "a string or a list of strings",
                    Some(help.into()),
                );
                return Vec::new();
            }
        };
        let mut audience: Vec<String> = Vec::new();
        for item in items {
            let Some(text) = self.string_with_help(item, "audience", "a string", help) else {
                continue;
            };
            if audience.iter().any(|a| a == text) {
                self.error(
                    &item.span(),
                    format!("audience {text:?} is listed twice"),
                    Some("remove the second one".into()),
                );
                continue;
            }
            if let Some(text) = self.claim_text(item, "audience", text) {
                audience.push(text);
            }
        }
        audience
    }

    fn algorithms(&mut self, value: &Value<'_>, uses_secret: bool) -> Vec<JwtAlgorithm> {
        let fallback = if uses_secret {
            vec![JwtAlgorithm::Hs256]
        } else {
            vec![JwtAlgorithm::Rs256]
        };
        let example = if uses_secret {
            "`algorithms = [\"HS256\"]`"
        } else {
            "`algorithms = [\"RS256\", \"ES256\"]`"
        };
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                value,
                "algorithms",
                "a list of strings",
                Some(format!("write it like {example}")),
            );
            return fallback;
        };
        if items.is_empty() {
            self.error(
                &value.span(),
                "`algorithms` must not be an empty list",
                Some(format!(
                    "list the algorithms tokens are signed with, like {example}, or leave \
                     `algorithms` out for the default"
                )),
            );
            return fallback;
        }
        let mut algorithms = Vec::new();
        for item in items.iter() {
            let Some(text) = self.string_with_help(item, "algorithms", "a string", example) else {
                continue;
            };
            let Some(algorithm) = JwtAlgorithm::from_name(text) else {
                let (message, help) = if text.eq_ignore_ascii_case("none") {
                    (
                        "the JWT algorithm `none` is never accepted".to_owned(),
                        format!(
                            "a token with `alg: none` carries no signature, so anyone could \
                             write one with any claims; list signing algorithms, like {example}"
                        ),
                    )
                } else {
                    let names: Vec<&str> = JwtAlgorithm::ALL.iter().map(|a| a.as_str()).collect();
                    let list = algorithm_list();
                    let help = match closest(text, names) {
                        Some(guess) => {
                            format!("did you mean `{guess}`? valid algorithms are: {list}")
                        }
                        None => format!("valid algorithms are: {list}"),
                    };
                    (format!("unknown JWT algorithm {text:?}"), help)
                };
                self.error(&item.span(), message, Some(help));
                continue;
            };
            if algorithms.contains(&algorithm) {
                self.error(
                    &item.span(),
                    format!("`{text}` is listed twice in `algorithms`"),
                    Some("remove the second one".into()),
                );
                continue;
            }
            if algorithm.is_hmac() && !uses_secret {
                self.error(
                    &item.span(),
                    format!("`{text}` cannot be used with `jwks`"),
                    Some(
                        "HS algorithms verify with a shared secret; accepting them next to a \
                         JWKS of public keys invites algorithm confusion (a token signed with \
                         the public key as HMAC secret); put HS256 in an authenticator of its \
                         own with `secret_env`, and list only RS, PS, ES or EdDSA algorithms here"
                            .into(),
                    ),
                );
                continue;
            }
            if !algorithm.is_hmac() && uses_secret {
                self.error(
                    &item.span(),
                    format!("`{text}` cannot be used with `secret_env`"),
                    Some(
                        "a shared secret only verifies HS256, HS384 or HS512; public-key \
                         algorithms need `jwks` (in an authenticator of their own)"
                            .into(),
                    ),
                );
                continue;
            }
            algorithms.push(algorithm);
        }
        if algorithms.is_empty() {
            fallback
        } else {
            algorithms
        }
    }

    fn forward_claims(&mut self, name: &str, value: &Value<'_>) -> Vec<(String, String)> {
        let example = "`claims = { \"x-tenant\" = \"tenant\" }` (header = claim)";
        let DeValue::Table(table) = value.get_ref() else {
            self.wrong_type(
                value,
                "claims",
                "a table",
                Some(format!("map request headers to claims, like {example}")),
            );
            return Vec::new();
        };
        let mut entries: Vec<_> = table.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        let mut claims = Vec::new();
        for (key, claim) in entries {
            let header: &str = key.get_ref();
            if let Some(problem) = header_name_error(header) {
                self.error(
                    &key.span(),
                    format!("invalid header name {header:?} in the claims of `{name}`: {problem}"),
                    Some(format!("map request headers to claims, like {example}")),
                );
                continue;
            }
            if header.starts_with("x-flotilla-") || RESERVED_HEADERS.contains(&header) {
                self.error(
                    &key.span(),
                    format!("a claim cannot be forwarded as `{header}`"),
                    Some(
                        "`x-flotilla-*` headers are set by Flotilla itself (the subject, scopes \
                         and authenticator are forwarded already) and standard headers keep \
                         their meaning; pick a header of your own, like \"x-tenant\""
                            .into(),
                    ),
                );
                continue;
            }
            let Some(text) = self.string_with_help(claim, header, "a claim name", example) else {
                continue;
            };
            if text.is_empty() {
                self.error(
                    &claim.span(),
                    format!("the claim forwarded as `{header}` has an empty name"),
                    Some(format!("name the token's claim, like {example}")),
                );
                continue;
            }
            claims.push((header.to_owned(), text.to_owned()));
        }
        claims
    }

    fn api_keys(
        &mut self,
        name: &str,
        header: &str,
        body: &DeTable<'_>,
        keys: &Value<'_>,
    ) -> AuthKind {
        self.authenticator_keys(
            body,
            header,
            API_KEY_KEYS,
            ("JWT authenticators", JWT_KEYS),
            "checks API keys",
        );
        let mut settings = ApiKeySettings {
            header: DEFAULT_API_KEY_HEADER.into(),
            keys: Vec::new(),
        };
        if let Some(value) = body.get("header")
            && let Some(text) = self.string(value, "header")
        {
            if let Some(problem) = header_name_error(text) {
                self.error(
                    &value.span(),
                    format!("invalid header name {text:?}: {problem}"),
                    Some("name the header clients send the key in, like \"x-api-key\"".into()),
                );
            } else if text.starts_with("x-flotilla-") || RESERVED_HEADERS.contains(&text) {
                self.error(
                    &value.span(),
                    format!("API keys cannot be read from `{text}`"),
                    Some(
                        "`Authorization` carries bearer tokens and `x-flotilla-*` headers are \
                         Flotilla's own; use a header of your own, like \"x-api-key\""
                            .into(),
                    ),
                );
            } else {
                settings.header = text.to_owned();
            }
        }
        let entry_header = format!("[[gateway.auth.{name}.keys]]");
        let DeValue::Array(items) = keys.get_ref() else {
            self.wrong_type(
                keys,
                "keys",
                "a list of tables",
                Some(format!(
                    "write each key as its own {entry_header} section with `name` and `sha256`"
                )),
            );
            return AuthKind::ApiKeys(settings);
        };
        if items.is_empty() {
            self.error(
                &keys.span(),
                format!("authenticator `{name}` has no keys"),
                Some(format!(
                    "add keys like `keys = [{{ name = \"acme\", sha256 = \"...\" }}]`; {SHA256_HELP}"
                )),
            );
        }
        for item in items.iter() {
            let Some(entry) = self.table(item, "keys entry") else {
                continue;
            };
            self.unknown_keys(entry, KEY_ENTRY_KEYS, &format!("in {entry_header}"));
            let key_name = match entry.get("name") {
                Some(value) => self.key_name(value, &settings.keys),
                None => {
                    self.error(
                        &item.span(),
                        format!("missing required key `name` in {entry_header}"),
                        Some(
                            "name who holds the key, like `name = \"acme\"`; it is forwarded as \
                             `x-flotilla-subject`"
                                .into(),
                        ),
                    );
                    None
                }
            };
            let sha256 = match entry.get("sha256") {
                Some(value) => self.key_digest(value, &settings.keys),
                None => {
                    self.error(
                        &item.span(),
                        format!("missing required key `sha256` in {entry_header}"),
                        Some(SHA256_HELP.into()),
                    );
                    None
                }
            };
            let scopes = match entry.get("scopes") {
                Some(value) => self.scopes(value),
                None => Vec::new(),
            };
            if let (Some(name), Some(sha256)) = (key_name, sha256) {
                settings.keys.push(ApiKey {
                    name,
                    sha256,
                    scopes,
                });
            }
        }
        AuthKind::ApiKeys(settings)
    }

    fn key_name(&mut self, value: &Value<'_>, earlier: &[ApiKey]) -> Option<String> {
        let text = self.string(value, "name")?;
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-_.@".contains(&b);
        if text.is_empty() || text.len() > MAX_NAME || !text.bytes().all(allowed) {
            self.error(
                &value.span(),
                format!("invalid API key name {text:?}"),
                Some(format!(
                    "use 1 to {MAX_NAME} letters, digits, `-`, `_`, `.` or `@`, like \"acme\"; \
                     the name is forwarded as `x-flotilla-subject`"
                )),
            );
            return None;
        }
        if earlier.iter().any(|key| key.name == text) {
            self.error(
                &value.span(),
                format!("API key name `{text}` is used twice"),
                Some(
                    "each key names who holds it; give the second key its own name (one holder \
                     may have several keys, like \"acme-2\")"
                        .into(),
                ),
            );
            return None;
        }
        Some(text.to_owned())
    }

    fn key_digest(&mut self, value: &Value<'_>, earlier: &[ApiKey]) -> Option<[u8; 32]> {
        let text = self.string_with_help(value, "sha256", "a string", SHA256_HELP)?;
        let digest = match sha256_hex(text) {
            Ok(digest) => digest,
            Err(problem) => {
                self.error(
                    &value.span(),
                    format!("invalid `sha256`: {problem}"),
                    Some(SHA256_HELP.into()),
                );
                return None;
            }
        };
        if let Some(holder) = earlier.iter().find(|key| key.sha256 == digest) {
            self.error(
                &value.span(),
                format!("this key is already listed for `{}`", holder.name),
                Some("a key identifies one holder; remove one of the two entries".into()),
            );
            return None;
        }
        Some(digest)
    }

    fn scopes(&mut self, value: &Value<'_>) -> Vec<String> {
        let example = "`scopes = [\"orders:read\", \"orders:write\"]`";
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                value,
                "scopes",
                "a list of strings",
                Some(format!("write it like {example}")),
            );
            return Vec::new();
        };
        let mut scopes: Vec<String> = Vec::new();
        for item in items.iter() {
            let Some(text) = self.string_with_help(item, "scopes", "a string", example) else {
                continue;
            };
            if let Some(problem) = scope_error(text) {
                self.error(
                    &item.span(),
                    format!("invalid scope {text:?}: {problem}"),
                    Some(SCOPE_HELP.into()),
                );
                continue;
            }
            if scopes.iter().any(|s| s == text) {
                self.error(
                    &item.span(),
                    format!("scope `{text}` is listed twice"),
                    Some("remove the second one".into()),
                );
                continue;
            }
            scopes.push(text.to_owned());
        }
        scopes
    }

    /// A route's `auth` and `scopes` (in `place`, like "[[gateway.routes]]"), resolved against
    /// the declared authenticators; `None` when the route is public.
    pub(super) fn route_auth(
        &mut self,
        table: &DeTable<'_>,
        place: &str,
        authenticators: &[Authenticator],
    ) -> Option<RouteAuth> {
        let Some(value) = table.get("auth") else {
            if let Some(scopes) = table.get("scopes") {
                self.error(
                    &scopes.span(),
                    format!("`scopes` without `auth` in {place}"),
                    Some(
                        "scopes are checked on a verified credential; add `auth = \"NAME\"` \
                         naming a [gateway.auth.NAME] authenticator, or remove `scopes`"
                            .into(),
                    ),
                );
            }
            return None;
        };
        let known: Vec<&str> = authenticators.iter().map(|a| a.name.as_str()).collect();
        let example = "`auth = \"users\"` or `auth = [\"users\", \"partners\"]`";
        let items: Vec<&Value<'_>> = match value.get_ref() {
            DeValue::String(_) => vec![value],
            DeValue::Array(items) if items.is_empty() => {
                self.error(
                    &value.span(),
                    format!("`auth` must not be an empty list in {place}"),
                    Some(format!(
                        "name the authenticators that may admit a request, like {example}, or \
                         remove `auth` to make the route public"
                    )),
                );
                return None;
            }
            DeValue::Array(items) => items.iter().collect(),
            _ => {
                self.wrong_type(
                    value,
                    "auth",
                    "a string or a list of strings",
                    Some(format!("write it like {example}")),
                );
                return None;
            }
        };
        let mut names: Vec<String> = Vec::new();
        let mut valid = true;
        for item in items {
            let Some(name) = self.string_with_help(item, "auth", "a string", example) else {
                valid = false;
                continue;
            };
            if names.iter().any(|n| n == name) {
                self.error(
                    &item.span(),
                    format!("authenticator `{name}` is listed twice in `auth`"),
                    Some("remove the second one".into()),
                );
                continue;
            }
            if !known.contains(&name) {
                let list = if known.is_empty() {
                    "no authenticators are declared; add a [gateway.auth.NAME] section".to_owned()
                } else {
                    format!("declared authenticators are: {}", known.join(", "))
                };
                let help = match closest(name, known.iter().copied()) {
                    Some(guess) => format!("did you mean `{guess}`? {list}"),
                    None => list,
                };
                self.error(
                    &item.span(),
                    format!("unknown authenticator `{name}` in {place}"),
                    Some(help),
                );
                valid = false;
                continue;
            }
            names.push(name.to_owned());
        }
        let scopes = match table.get("scopes") {
            Some(value) => self.scopes(value),
            None => Vec::new(),
        };
        valid.then_some(RouteAuth {
            authenticators: names,
            scopes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_64_hex_digits_in_either_case() {
        let lower = "ab".repeat(32);
        assert_eq!(sha256_hex(&lower), Ok([0xab; 32]));
        assert_eq!(sha256_hex(&lower.to_uppercase()), Ok([0xab; 32]));
        assert!(sha256_hex(&"ab".repeat(31)).is_err());
        assert!(sha256_hex(&format!("{}zz", "ab".repeat(31))).is_err());
        // Multi-byte characters must not be split into a "pair" that happens to parse.
        assert!(sha256_hex(&format!("{}é", "a".repeat(62))).is_err());
    }

    #[test]
    fn scope_tokens_follow_rfc_6749() {
        assert_eq!(scope_error("orders:read"), None);
        assert!(scope_error("orders read").is_some());
        assert!(scope_error("a\"b").is_some());
        assert!(scope_error("a\\b").is_some());
        assert!(scope_error("").is_some());
    }

    #[test]
    fn variable_names() {
        assert_eq!(variable_error("SHOP_JWT_SECRET"), None);
        assert_eq!(variable_error("_x1"), None);
        assert!(variable_error("1X").is_some());
        assert!(variable_error("A-B").is_some());
        assert!(variable_error("").is_some());
    }
}
