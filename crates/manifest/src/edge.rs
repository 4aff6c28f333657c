//! The gateway as an edge: what `[gateway]` says beyond its routes — limits, TLS, who may call
//! (`[gateway.auth.NAME]`), how often (`rate_limit`), from which browser origins (`cors`) and
//! which API versions exist — and the Backend-for-Frontend facades of `[bff.NAME]`.
//!
//! Like the rest of the model, everything here has passed validation: names resolve, durations
//! and sizes are parsed, secrets' environment variable names are well formed (their values are
//! read when the gateway starts, not here).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::Template;

/// `[gateway]` limits and timeouts that protect the edge from clients (slowloris, huge bodies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeLimits {
    /// `max_body`, default 8 MiB: larger request bodies get 413, refused without reading them all.
    pub max_body: u64,
    /// `max_headers`, default 64 KiB: a larger request head gets 431.
    pub max_headers: u64,
    /// `header_timeout`, default 10s: a client must send a whole request head within this.
    pub header_timeout: Duration,
    /// `idle_timeout`, default 60s: a keep-alive connection with no request is closed after this.
    pub idle_timeout: Duration,
    /// `body_timeout`, default 30s: the longest pause between two pieces of a request body.
    pub body_timeout: Duration,
    /// `access_log`, default true: one line per request (method, path, status, duration, client,
    /// request id) to `.flotilla/logs/gateway-access.log`.
    pub access_log: bool,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            max_body: 8 << 20,
            max_headers: 64 << 10,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            access_log: true,
        }
    }
}

/// `[gateway.tls]`: the gateway serves HTTPS (HTTP/2 and HTTP/1.1 by ALPN) instead of plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// `cert`: PEM certificate chain, relative to the manifest directory.
    pub cert: PathBuf,
    /// `key`: PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[gateway.auth.NAME]`: one way of proving who the caller is; routes name the ones they accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticator {
    pub name: String,
    pub kind: AuthKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthKind {
    Jwt(JwtSettings),
    ApiKeys(ApiKeySettings),
}

/// A bearer JWT (`Authorization: Bearer ...`), verified by signature and claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    /// Where the verification keys come from.
    pub keys: JwtKeys,
    /// `issuer`: the `iss` claim must equal it when set.
    pub issuer: Option<String>,
    /// `audience` (a string or a list): `aud` must contain one of them when set.
    pub audience: Vec<String>,
    /// `algorithms`: accepted `alg` values. Default: RS256, ES256 and EdDSA for JWKS keys, HS256
    /// for a secret. `none` is never accepted; a key is only used with its own algorithm family.
    pub algorithms: Vec<JwtAlgorithm>,
    /// `leeway`, default 30s: clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// `claims = { "x-tenant" = "tenant" }`: verified claims forwarded as request headers, on top
    /// of `sub` as `x-flotilla-subject` and `scope` as `x-flotilla-scopes`.
    pub forward_claims: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKeys {
    /// `jwks = "https://issuer/.well-known/jwks.json"`: fetched at start, cached, fetched again
    /// every `refresh` (default 5m) and at once (at most every 10s) for an unknown `kid`.
    JwksUrl { url: String, refresh: Duration },
    /// `jwks = "keys/jwks.json"` (relative to the manifest): read again when it changes.
    JwksFile { path: PathBuf, refresh: Duration },
    /// `secret_env = "JWT_SECRET"`: an HS256 secret from the gateway's environment.
    SecretEnv { variable: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    Hs256,
    Hs384,
    Hs512,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Es256,
    Es384,
    EdDsa,
}

impl JwtAlgorithm {
    pub const ALL: [JwtAlgorithm; 10] = [
        Self::Hs256,
        Self::Hs384,
        Self::Hs512,
        Self::Rs256,
        Self::Rs384,
        Self::Rs512,
        Self::Ps256,
        Self::Es256,
        Self::Es384,
        Self::EdDsa,
    ];

    /// The `alg` header value (RFC 7518).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Hs384 => "HS384",
            Self::Hs512 => "HS512",
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Ps256 => "PS256",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::EdDsa => "EdDSA",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|alg| alg.as_str() == name)
    }

    /// Signed with a shared secret (as opposed to a public key).
    pub fn is_hmac(self) -> bool {
        matches!(self, Self::Hs256 | Self::Hs384 | Self::Hs512)
    }
}

/// API keys sent in a header; only their SHA-256 digests are in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeySettings {
    /// `header`, default `x-api-key`.
    pub header: String,
    /// `[[gateway.auth.NAME.keys]]`.
    pub keys: Vec<ApiKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// `name`: who holds the key; forwarded as `x-flotilla-subject`.
    pub name: String,
    /// `sha256`: the key's SHA-256 digest, lower-case hex (`flotilla hash-key KEY` prints it).
    pub sha256: [u8; 32],
    /// `scopes`: what the key may do (checked against a route's `scopes`).
    pub scopes: Vec<String>,
}

/// A route's `auth = "NAME"` or `auth = ["users", "partners"]`: any one of them must accept the
/// request; `scopes`: the credential must carry every one of them (else 403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAuth {
    pub authenticators: Vec<String>,
    pub scopes: Vec<String>,
}

/// `[gateway.rate_limit]`: where the counters live.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RateLimitStore {
    /// In the gateway's memory (one gateway).
    #[default]
    Memory,
    /// `store = "redis://127.0.0.1:6379"`: shared by every gateway using that Redis.
    Redis { url: String },
}

/// A route's `rate_limit = { rate = "100/s", burst = 20, key = "ip" }` (GCRA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// `rate`: `N/s`, `N/m` or `N/h` — requests per period, as an emission interval of
    /// period / N.
    pub requests: u32,
    pub per: Duration,
    /// `burst`, default 1: how many requests may come at once above the steady rate.
    pub burst: u32,
    /// `key`, default `ip`: whose requests are counted together.
    pub key: RateLimitKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKey {
    /// The client address (after trusted `Forwarded` handling: the TCP peer).
    ClientIp,
    /// The API key's name (requests without one are counted by IP).
    ApiKey,
    /// The verified JWT `sub` or API key name (requests without one are counted by IP).
    Subject,
    /// `header:x-tenant`: the value of that request header, lower-case name (absent: counted by
    /// IP).
    Header(String),
    /// `route`: everyone together.
    Route,
}

/// A route's `cors = { origins = [...], ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// `origins`: exact origins (`https://shop.example`) or `"*"`.
    pub origins: Vec<String>,
    /// `methods`, default GET, HEAD, POST.
    pub methods: Vec<String>,
    /// `headers`: request headers a browser may send (lower-case); default `content-type`.
    pub headers: Vec<String>,
    /// `expose`: response headers scripts may read.
    pub expose: Vec<String>,
    /// `credentials`, default false (and never together with `"*"`).
    pub credentials: bool,
    /// `max_age`, default 10m: how long a browser may cache a preflight answer.
    pub max_age: Duration,
}

/// The API version a route serves, when several routes share one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteVersion {
    /// `version = "2"`: served to requests asking for it by `Accept-Version: 2` or a media-type
    /// parameter (`Accept: application/json; version=2`). Requests asking for none get the
    /// route of the prefix marked `default_version = true`, else the first declared.
    pub name: String,
    pub default: bool,
}

/// A deprecated route (RFC 9745 `Deprecation`, RFC 8594 `Sunset`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deprecation {
    /// `deprecated = "2026-06-01T00:00:00Z"` (or `true`: deprecated, no date).
    pub since: Option<SystemTime>,
    /// `sunset = "2027-01-01T00:00:00Z"`: when the route stops answering.
    pub sunset: Option<SystemTime>,
    /// `deprecation_link = "https://..."`: sent as `Link: <...>; rel="deprecation"`.
    pub link: Option<String>,
}

/// `[bff.NAME]`: a facade for one kind of client (mobile, web) whose routes compose several
/// services' answers into one.
#[derive(Debug, Clone, PartialEq)]
pub struct Bff {
    pub name: String,
    /// `prefix`, default `/NAME`.
    pub prefix: String,
    /// `[[bff.NAME.routes]]`.
    pub routes: Vec<BffRoute>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BffRoute {
    /// `method`, default GET.
    pub method: String,
    /// `path` below the facade's prefix, with `{name}` placeholders for whole segments
    /// (`/orders/{id}`).
    pub path: String,
    /// `auth`, `scopes`: as on a gateway route.
    pub auth: Option<RouteAuth>,
    /// `[bff.NAME.routes.parts.PART]`, fetched concurrently; the response is an object with one
    /// member per part, in file order.
    pub parts: Vec<BffPart>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BffPart {
    pub name: String,
    /// `call = "GET orders /orders/{{path.id}}"`: templates may name `path.NAME` and
    /// `query.NAME`.
    pub method: String,
    pub service: Arc<str>,
    pub path: Template,
    /// `optional`, default false: a failing optional part becomes `null` and the response gets a
    /// `Flotilla-Degraded` header; a failing required part fails the response (502 problem).
    pub optional: bool,
    /// `fields`: what of the part's JSON the client gets (see [`Projection`]); default all.
    pub fields: Option<Projection>,
}

/// A field selection: `"id,status,total"`, nested `"items(sku,quantity)"` (applied to each
/// element of an array), or JSON pointers `"/payment/status"` (the value under its last token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    /// As written, for messages.
    pub text: String,
    pub fields: Vec<ProjectedField>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectedField {
    /// `name` or `name(sub,fields)`.
    Member {
        name: String,
        nested: Option<Vec<ProjectedField>>,
    },
    /// `/a/b/0/c` (RFC 6901, `~0`/`~1` already decoded), kept as the last token's name.
    Pointer { tokens: Vec<String> },
}
