//! Authentication at the edge: the manifest's `[gateway.auth.NAME]` authenticators, checked on
//! the routes that name them with `auth`.
//!
//! [`Auth::start`] loads every authenticator's keys once (JWKS files and URLs, secrets from the
//! environment) and keeps JWKS fresh in the background. The router asks [`Auth::guard`] once per
//! route for a [`Guard`], and the guard checks each request: a bearer JWT (signature, `exp`,
//! `nbf`, `iss`, `aud`) or an API key, then the route's `scopes`. An accepted request carries an
//! [`Identity`], which [`Identity::apply`] forwards to the service as `x-flotilla-*` headers;
//! [`Auth::strip_identity_headers`] removes those headers from every request that comes from
//! outside, so a client cannot claim to be someone by sending them itself.
//!
//! Refusals are [`Refusal`]s (problem+json): 401 `unauthenticated` without credentials, 401
//! `invalid-credentials` with bad ones, 403 `insufficient-scope`, each with the
//! `WWW-Authenticate` challenge RFC 6750 asks for; 503 `auth-unavailable` while a JWKS URL has
//! never answered.

mod api_key;
mod jwks;
mod jwt;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_manifest::{AuthKind, Authenticator, JwtAlgorithm, JwtKeys, RouteAuth};
use flotilla_proxy::Refusal;
use http::header::{AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use api_key::ApiKeys;
use jwks::{KeySet, RemoteKeys, Source, VerificationKey};
use jwt::{JwtAuthenticator, Keys, Token};

/// The verified subject: the JWT's `sub`, or the API key's `name`.
pub const X_FLOTILLA_SUBJECT: HeaderName = HeaderName::from_static("x-flotilla-subject");
/// The credential's scopes, space-separated.
pub const X_FLOTILLA_SCOPES: HeaderName = HeaderName::from_static("x-flotilla-scopes");
/// The name of the authenticator that accepted the request.
pub const X_FLOTILLA_AUTH: HeaderName = HeaderName::from_static("x-flotilla-auth");

pub const PROBLEM_UNAUTHENTICATED: &str = "urn:flotilla:problem:unauthenticated";
pub const PROBLEM_INVALID_CREDENTIALS: &str = "urn:flotilla:problem:invalid-credentials";
pub const PROBLEM_INSUFFICIENT_SCOPE: &str = "urn:flotilla:problem:insufficient-scope";
pub const PROBLEM_AUTH_UNAVAILABLE: &str = "urn:flotilla:problem:auth-unavailable";

/// Knobs of [`Auth::start_with`]; [`Auth::start`] uses the defaults.
#[derive(Debug, Clone)]
pub struct Options {
    /// A token naming an unknown `kid` makes the JWKS be fetched again, but not sooner than
    /// this after the previous fetch. Default 10s.
    pub min_refetch: Duration,
    /// How long one JWKS fetch may take. Default 10s.
    pub fetch_timeout: Duration,
    /// Reads the variables `secret_env` names. Default: the gateway's environment; an embedder
    /// with a secret store of its own (or a test, which must not change the process
    /// environment while other threads read it) passes another.
    pub env: fn(&str) -> Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            min_refetch: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(10),
            env: |name| std::env::var(name).ok(),
        }
    }
}

/// The gateway's authenticators, with their keys loaded.
pub struct Auth {
    authenticators: HashMap<String, Arc<Named>>,
    /// The `claims` headers of every authenticator: forwarded from verified tokens only.
    claim_headers: Box<[HeaderName]>,
    tasks: TaskTracker,
}

/// One authenticator, ready to check requests.
struct Named {
    name: Arc<str>,
    /// `x-flotilla-auth`.
    via_header: HeaderValue,
    check: Check,
}

enum Check {
    Jwt(JwtAuthenticator),
    ApiKeys(ApiKeys),
}

impl Auth {
    /// No authenticators: for gateways whose routes have no `auth` (identity headers are
    /// still stripped from every request).
    pub fn none() -> Arc<Auth> {
        Arc::new(Auth {
            authenticators: HashMap::new(),
            claim_headers: Box::new([]),
            tasks: TaskTracker::new(),
        })
    }

    /// [`Auth::start_with`] the default [`Options`].
    pub async fn start(
        authenticators: &[Authenticator],
        manifest_dir: &Path,
        shutdown: CancellationToken,
    ) -> Result<Arc<Auth>, String> {
        Self::start_with(authenticators, manifest_dir, shutdown, Options::default()).await
    }

    /// Loads every authenticator's keys and starts keeping JWKS fresh until `shutdown`.
    ///
    /// A secret that is missing or too short, or a JWKS file that cannot be read or holds no
    /// usable key, is an error: the manifest names something that is not there. A JWKS URL
    /// that does not answer is not: the identity provider may start after the gateway, so the
    /// gateway warns, answers 503 to bearer tokens of that authenticator and tries again every
    /// `min_refetch` until it has keys.
    pub async fn start_with(
        authenticators: &[Authenticator],
        manifest_dir: &Path,
        shutdown: CancellationToken,
        options: Options,
    ) -> Result<Arc<Auth>, String> {
        let tasks = TaskTracker::new();
        let mut client = None;
        let mut by_name = HashMap::new();
        let mut claim_headers: Vec<HeaderName> = Vec::new();
        for authenticator in authenticators {
            let name: Arc<str> = authenticator.name.as_str().into();
            let fail = |reason: String| format!("authenticator `{name}`: {reason}");
            let via_header = HeaderValue::try_from(authenticator.name.as_str())
                .map_err(|_| fail("its name cannot be a header value".into()))?;
            let check = match &authenticator.kind {
                AuthKind::Jwt(settings) => {
                    let mut forward = Vec::with_capacity(settings.forward_claims.len());
                    for (header, claim) in &settings.forward_claims {
                        let header = HeaderName::try_from(header.as_str())
                            .map_err(|_| fail(format!("`{header}` is not a header name")))?;
                        if !claim_headers.contains(&header) {
                            claim_headers.push(header.clone());
                        }
                        forward.push((header, claim.as_str().into()));
                    }
                    let keys = match &settings.keys {
                        JwtKeys::SecretEnv { variable } => {
                            let secret = secret(options.env, variable, &settings.algorithms)
                                .map_err(fail)?;
                            let key =
                                VerificationKey::secret(secret.as_bytes(), &settings.algorithms);
                            Keys::Fixed(Arc::new(KeySet { keys: vec![key] }))
                        }
                        JwtKeys::JwksFile { path, refresh } => {
                            let remote = Arc::new(RemoteKeys::new(
                                name.clone(),
                                Source::File(manifest_dir.join(path)),
                                settings.algorithms.clone(),
                                *refresh,
                                options.min_refetch,
                            ));
                            remote.load().await.map_err(fail)?;
                            tasks.spawn(remote.clone().refresh_until(shutdown.clone()));
                            Keys::Remote(remote)
                        }
                        JwtKeys::JwksUrl { url, refresh } => {
                            let client = match &client {
                                Some(client) => client,
                                None => client.insert(
                                    reqwest::Client::builder()
                                        .timeout(options.fetch_timeout)
                                        .user_agent("flotilla-gateway")
                                        .build()
                                        .map_err(|e| fail(format!("no HTTP client: {e}")))?,
                                ),
                            };
                            let remote = Arc::new(RemoteKeys::new(
                                name.clone(),
                                Source::Url {
                                    url: url.clone(),
                                    client: client.clone(),
                                },
                                settings.algorithms.clone(),
                                *refresh,
                                options.min_refetch,
                            ));
                            if let Err(error) = remote.load().await {
                                tracing::warn!(
                                    authenticator = %name,
                                    "{error}; its tokens get 503 until the JWKS can be fetched"
                                );
                            }
                            tasks.spawn(remote.clone().refresh_until(shutdown.clone()));
                            Keys::Remote(remote)
                        }
                    };
                    Check::Jwt(JwtAuthenticator::new(keys, settings, forward.into()))
                }
                AuthKind::ApiKeys(settings) => {
                    let header = HeaderName::try_from(settings.header.as_str())
                        .map_err(|_| fail(format!("`{}` is not a header name", settings.header)))?;
                    let mut keys = Vec::with_capacity(settings.keys.len());
                    for key in &settings.keys {
                        let subject = HeaderValue::try_from(key.name.as_str()).map_err(|_| {
                            fail(format!("key name {:?} is not a header value", key.name))
                        })?;
                        let scopes: Vec<String> = key.scopes.clone();
                        let identity = Identity::new(
                            Some((key.name.as_str().into(), subject)),
                            scopes,
                            name.clone(),
                            via_header.clone(),
                            Credential::ApiKey,
                            Vec::new(),
                        )
                        .map_err(|_| {
                            fail(format!(
                                "the scopes of key `{}` are not header-safe",
                                key.name
                            ))
                        })?;
                        keys.push((key.sha256, identity));
                    }
                    Check::ApiKeys(ApiKeys::new(header, keys))
                }
            };
            by_name.insert(
                authenticator.name.clone(),
                Arc::new(Named {
                    name,
                    via_header,
                    check,
                }),
            );
        }
        tasks.close();
        Ok(Arc::new(Auth {
            authenticators: by_name,
            claim_headers: claim_headers.into(),
            tasks,
        }))
    }

    /// The check for a route's `auth`, built once when the router is built.
    pub fn guard(&self, route: &RouteAuth) -> Result<Guard, String> {
        let mut authenticators = Vec::with_capacity(route.authenticators.len());
        for name in &route.authenticators {
            let named = self
                .authenticators
                .get(name)
                .ok_or_else(|| format!("the route names unknown authenticator `{name}`"))?;
            authenticators.push(named.clone());
        }
        Guard::new(authenticators, &route.scopes)
    }

    /// Removes every header a verified identity is forwarded in: the `x-flotilla-*` identity
    /// headers and every authenticator's `claims` headers. Call it on every request from
    /// outside, whether or not its route has `auth`, before [`Identity::apply`].
    pub fn strip_identity_headers(&self, headers: &mut HeaderMap) {
        for name in [X_FLOTILLA_SUBJECT, X_FLOTILLA_SCOPES, X_FLOTILLA_AUTH] {
            remove_all(headers, name);
        }
        for name in &self.claim_headers {
            remove_all(headers, name.clone());
        }
    }

    /// Waits until the background JWKS refreshes have stopped (after `shutdown`).
    pub async fn stopped(&self) {
        self.tasks.wait().await;
    }
}

/// `HeaderMap::remove` takes every value of the name, not just the first.
fn remove_all(headers: &mut HeaderMap, name: HeaderName) {
    headers.remove(name);
}

/// The shared secret from the environment, checked to be long enough for the HS algorithms it
/// verifies (RFC 7518 §3.2: at least the hash size).
fn secret(
    env: fn(&str) -> Option<String>,
    variable: &str,
    algorithms: &[JwtAlgorithm],
) -> Result<String, String> {
    let secret = env(variable).ok_or_else(|| {
        format!(
            "environment variable {variable} is not set (or not UTF-8); it must hold the HS \
             secret"
        )
    })?;
    let needed = algorithms
        .iter()
        .map(|alg| match alg {
            JwtAlgorithm::Hs384 => 48,
            JwtAlgorithm::Hs512 => 64,
            _ => 32,
        })
        .max()
        .unwrap_or(32);
    if secret.len() < needed {
        return Err(format!(
            "the secret in {variable} has {} bytes; the algorithms listed need at least {needed} \
             (RFC 7518 §3.2) — generate one with `openssl rand -base64 48`",
            secret.len()
        ));
    }
    Ok(secret)
}

/// Lower-case hex SHA-256 of an API key: the `sha256` that goes in the manifest.
pub fn hash_key(key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest.as_ref() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// How an identity was proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Jwt,
    ApiKey,
}

/// Who a request comes from, as verified by an authenticator.
#[derive(Debug, Clone)]
pub struct Identity {
    subject: Option<(Arc<str>, HeaderValue)>,
    scopes: Arc<[Box<str>]>,
    scopes_header: Option<HeaderValue>,
    via: Arc<str>,
    via_header: HeaderValue,
    credential: Credential,
    claims: Vec<(HeaderName, HeaderValue)>,
}

impl Identity {
    fn new(
        subject: Option<(Arc<str>, HeaderValue)>,
        scopes: Vec<String>,
        via: Arc<str>,
        via_header: HeaderValue,
        credential: Credential,
        claims: Vec<(HeaderName, HeaderValue)>,
    ) -> Result<Self, ()> {
        let scopes_header = if scopes.is_empty() {
            None
        } else {
            Some(HeaderValue::try_from(scopes.join(" ")).map_err(|_| ())?)
        };
        Ok(Self {
            subject,
            scopes: scopes.into_iter().map(Into::into).collect(),
            scopes_header,
            via,
            via_header,
            credential,
            claims,
        })
    }

    fn from_claims(
        claims: jwt::Claims,
        via: Arc<str>,
        via_header: HeaderValue,
    ) -> Result<Self, Rejection> {
        let subject = match claims.sub {
            Some(sub) => {
                let header = HeaderValue::try_from(sub.as_str()).map_err(|_| {
                    Rejection::claims("the token's subject (`sub`) cannot be forwarded")
                })?;
                Some((sub.into(), header))
            }
            None => None,
        };
        Identity::new(
            subject,
            claims.scopes,
            via,
            via_header,
            Credential::Jwt,
            claims.forwarded,
        )
        .map_err(|()| Rejection::claims("the token's scopes cannot be forwarded"))
    }

    /// The JWT's `sub` or the API key's name; a JWT without `sub` has none.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_ref().map(|(subject, _)| &**subject)
    }

    /// The API key's holder, when the identity comes from an API key (for rate limits per key).
    pub fn api_key(&self) -> Option<&str> {
        match self.credential {
            Credential::ApiKey => self.subject(),
            Credential::Jwt => None,
        }
    }

    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scopes.iter().map(|scope| &**scope)
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| **s == *scope)
    }

    /// The authenticator that accepted the request.
    pub fn via(&self) -> &str {
        &self.via
    }

    pub fn credential(&self) -> Credential {
        self.credential
    }

    /// Sets `x-flotilla-subject`, `x-flotilla-scopes`, `x-flotilla-auth` and the authenticator's
    /// `claims` headers on a request going to a service.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let Some((_, subject)) = &self.subject {
            headers.insert(X_FLOTILLA_SUBJECT, subject.clone());
        }
        if let Some(scopes) = &self.scopes_header {
            headers.insert(X_FLOTILLA_SCOPES, scopes.clone());
        }
        headers.insert(X_FLOTILLA_AUTH, self.via_header.clone());
        for (name, value) in &self.claims {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// How far a credential got before it was refused: when every authenticator of a route
/// refuses, the client hears the reason of the one that got furthest (an expired token of the
/// second authenticator says more than "wrong algorithm" from the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Depth {
    /// Not well formed, or not for this authenticator (algorithm, key).
    Format,
    /// A key was found but the signature or the API key does not match.
    Signature,
    /// Signed by this authenticator's key, but the claims say no.
    Claims,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Bearer,
    ApiKey,
}

/// Why an authenticator refused a credential; the description goes to the client and so never
/// contains the credential.
#[derive(Debug, Clone)]
pub(crate) struct Rejection {
    depth: Depth,
    scheme: Scheme,
    description: Cow<'static, str>,
    /// No key with the token's `kid`: worth fetching the JWKS again.
    unknown_key: bool,
    /// The authenticator has no keys at all yet.
    unavailable: bool,
}

impl Rejection {
    fn bearer(depth: Depth, description: impl Into<Cow<'static, str>>) -> Self {
        Self {
            depth,
            scheme: Scheme::Bearer,
            description: description.into(),
            unknown_key: false,
            unavailable: false,
        }
    }

    pub(crate) fn format(description: &'static str) -> Self {
        Self::bearer(Depth::Format, description)
    }

    pub(crate) fn format_owned(description: String) -> Self {
        Self::bearer(Depth::Format, description)
    }

    pub(crate) fn unknown_key() -> Self {
        Self {
            unknown_key: true,
            ..Self::bearer(
                Depth::Format,
                "the token's signing key (`kid`) is not known",
            )
        }
    }

    pub(crate) fn unavailable() -> Self {
        Self {
            unavailable: true,
            ..Self::bearer(Depth::Format, "the signing keys could not be fetched yet")
        }
    }

    pub(crate) fn signature(description: &'static str) -> Self {
        Self::bearer(Depth::Signature, description)
    }

    pub(crate) fn claims(description: &'static str) -> Self {
        Self::bearer(Depth::Claims, description)
    }

    pub(crate) fn claims_owned(description: String) -> Self {
        Self::bearer(Depth::Claims, description)
    }

    fn api_key() -> Self {
        Self {
            scheme: Scheme::ApiKey,
            ..Self::bearer(Depth::Signature, "the API key is not valid")
        }
    }
}

/// A route's authentication: its authenticators (any one may admit a request) and the scopes
/// the credential must carry. Cheap to clone.
#[derive(Clone)]
pub struct Guard {
    inner: Arc<GuardInner>,
}

struct GuardInner {
    authenticators: Box<[Arc<Named>]>,
    scopes: Box<[Box<str>]>,
    /// Some authenticator reads `Authorization: Bearer`.
    bearer: bool,
    /// The challenges of a 401 without credentials: one per scheme (and API key header).
    challenges: Box<[HeaderValue]>,
    /// `scope="..."`, the required scopes for a 403's challenge.
    scope_attribute: Box<str>,
    /// The first API key header, for the 401 challenge of an invalid key.
    api_key_challenge: Option<HeaderValue>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.inner.authenticators.iter().map(|a| &*a.name).collect();
        f.debug_struct("Guard")
            .field("authenticators", &names)
            .field("scopes", &self.inner.scopes)
            .finish()
    }
}

const BEARER_CHALLENGE: &str = "Bearer realm=\"flotilla\"";

impl Guard {
    fn new(authenticators: Vec<Arc<Named>>, scopes: &[String]) -> Result<Self, String> {
        let bearer = authenticators
            .iter()
            .any(|a| matches!(a.check, Check::Jwt(_)));
        let mut challenges = Vec::new();
        if bearer {
            challenges.push(HeaderValue::from_static(BEARER_CHALLENGE));
        }
        let mut api_key_challenge = None;
        for named in &authenticators {
            if let Check::ApiKeys(keys) = &named.check {
                let value = HeaderValue::try_from(format!("ApiKey header=\"{}\"", keys.header))
                    .map_err(|_| format!("bad API key header `{}`", keys.header))?;
                if !challenges.contains(&value) {
                    challenges.push(value.clone());
                }
                api_key_challenge.get_or_insert(value);
            }
        }
        let scope_attribute = format!("scope=\"{}\"", scopes.join(" "));
        HeaderValue::try_from(scope_attribute.as_str())
            .map_err(|_| "the route's scopes are not header-safe".to_owned())?;
        Ok(Self {
            inner: Arc::new(GuardInner {
                authenticators: authenticators.into(),
                scopes: scopes.iter().map(|s| s.as_str().into()).collect(),
                bearer,
                challenges: challenges.into(),
                scope_attribute: scope_attribute.into(),
                api_key_challenge,
            }),
        })
    }

    /// Who the request comes from, if one of the route's authenticators accepts its credential
    /// and the credential has every scope the route needs.
    pub async fn check(&self, headers: &HeaderMap) -> Result<Identity, Refusal> {
        let inner = &*self.inner;
        let token = if inner.bearer {
            headers
                .get(AUTHORIZATION)
                .and_then(Token::from_authorization)
        } else {
            None
        };
        let mut rejected: Option<Rejection> = None;
        let mut unavailable = false;
        let mut insufficient: Option<Identity> = None;
        for named in inner.authenticators.iter() {
            let attempt = match (&named.check, &token) {
                (Check::Jwt(_), None) => continue,
                (Check::Jwt(_), Some(Err(rejection))) => Err(rejection.clone()),
                (Check::Jwt(jwt), Some(Ok(token))) => {
                    jwt.verify(token, &named.name, &named.via_header).await
                }
                (Check::ApiKeys(keys), _) => match keys.check(headers) {
                    Some(attempt) => attempt,
                    None => continue,
                },
            };
            match attempt {
                Ok(identity) if inner.scopes.iter().all(|s| identity.has_scope(s)) => {
                    return Ok(identity);
                }
                Ok(identity) => {
                    insufficient.get_or_insert(identity);
                }
                Err(rejection) if rejection.unavailable => unavailable = true,
                Err(rejection) => {
                    if rejected
                        .as_ref()
                        .is_none_or(|best| rejection.depth > best.depth)
                    {
                        rejected = Some(rejection);
                    }
                }
            }
        }
        if let Some(identity) = insufficient {
            return Err(self.insufficient_scope(&identity));
        }
        match rejected {
            // The token may well be for the authenticator that has no keys yet.
            Some(rejection) if !unavailable || rejection.depth == Depth::Claims => {
                Err(self.invalid(&rejection))
            }
            _ if unavailable => Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                PROBLEM_AUTH_UNAVAILABLE,
                "Authentication unavailable",
                "the keys that verify this route's tokens could not be fetched yet; try again \
                 shortly",
            )
            .with_header(RETRY_AFTER, HeaderValue::from_static("10"))),
            _ => Err(self.unauthenticated()),
        }
    }

    fn unauthenticated(&self) -> Refusal {
        let inner = &*self.inner;
        let detail = match (inner.bearer, &inner.api_key_challenge) {
            (true, None) => "this route needs a bearer token: `Authorization: Bearer <JWT>`".into(),
            (false, _) => format!(
                "this route needs an API key in the `{}` header",
                self.api_key_headers()
            ),
            (true, Some(_)) => format!(
                "this route needs a bearer token (`Authorization: Bearer <JWT>`) or an API key \
                 in the `{}` header",
                self.api_key_headers()
            ),
        };
        let mut refusal = Refusal::new(
            StatusCode::UNAUTHORIZED,
            PROBLEM_UNAUTHENTICATED,
            "Unauthenticated",
            detail,
        );
        for challenge in inner.challenges.iter() {
            refusal = refusal.with_header(WWW_AUTHENTICATE, challenge.clone());
        }
        refusal
    }

    fn api_key_headers(&self) -> String {
        let names: Vec<&str> = self
            .inner
            .authenticators
            .iter()
            .filter_map(|a| match &a.check {
                Check::ApiKeys(keys) => Some(keys.header.as_str()),
                Check::Jwt(_) => None,
            })
            .collect();
        names.join("` or `")
    }

    fn invalid(&self, rejection: &Rejection) -> Refusal {
        let challenge = match rejection.scheme {
            Scheme::Bearer => HeaderValue::try_from(format!(
                "{BEARER_CHALLENGE}, error=\"invalid_token\", error_description=\"{}\"",
                rejection.description
            ))
            .unwrap_or(HeaderValue::from_static(
                "Bearer realm=\"flotilla\", error=\"invalid_token\"",
            )),
            Scheme::ApiKey => self
                .inner
                .api_key_challenge
                .clone()
                .unwrap_or(HeaderValue::from_static("ApiKey")),
        };
        Refusal::new(
            StatusCode::UNAUTHORIZED,
            PROBLEM_INVALID_CREDENTIALS,
            "Invalid credentials",
            rejection.description.clone(),
        )
        .with_header(WWW_AUTHENTICATE, challenge)
    }

    fn insufficient_scope(&self, identity: &Identity) -> Refusal {
        let inner = &*self.inner;
        let missing: Vec<&str> = inner
            .scopes
            .iter()
            .map(|s| &**s)
            .filter(|s| !identity.has_scope(s))
            .collect();
        let scheme = match identity.credential {
            Credential::Jwt => BEARER_CHALLENGE.to_owned(),
            Credential::ApiKey => inner
                .api_key_challenge
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("ApiKey")
                .to_owned(),
        };
        let challenge = HeaderValue::try_from(format!(
            "{scheme}, error=\"insufficient_scope\", {}",
            inner.scope_attribute
        ))
        .unwrap_or(HeaderValue::from_static(
            "Bearer error=\"insufficient_scope\"",
        ));
        Refusal::new(
            StatusCode::FORBIDDEN,
            PROBLEM_INSUFFICIENT_SCOPE,
            "Insufficient scope",
            format!(
                "this route needs the scopes {}; the credential lacks {}",
                inner.scopes.join(" "),
                missing.join(" ")
            ),
        )
        .with_header(WWW_AUTHENTICATE, challenge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_is_lower_case_hex_sha256() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
