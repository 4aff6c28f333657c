//! Backend-for-Frontend facades: one client request, several services called at once, one JSON
//! answer holding just what that client shows.
//!
//! [`Facades`] is the manifest's `[bff.NAME]` tables compiled for matching: [`Facades::route`]
//! finds the route of a request under a facade's prefix and reads its `{placeholders}`.
//! [`compose`] then calls every part of the route concurrently through the proxy stack below the
//! edge — so each callee's resilience policy applies and each call is traced and counted like
//! any other — and merges the answers into one object, a member per part in file order, each cut
//! down by its `fields` ([`project`]).
//!
//! A part that fails (no answer, a non-2xx status, something that is not JSON) fails the whole
//! response when it is required: 404 when it answered 404 (what the client asked for does not
//! exist), else 502. An optional part that fails becomes `null`, and the response names it in
//! `Flotilla-Degraded`.

mod projection;

use std::sync::Arc;

use bytes::Bytes;
use flotilla_manifest::{Bff, ProjectedField, RouteAuth, TemplatePart, TemplateRef};
use flotilla_proxy::{
    BoxError, ClientAddr, Error, ProxyBody, Refusal, TRACEPARENT, Target, X_REQUEST_ID,
};
use futures_util::future::join_all;
use http::header::{ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

pub use projection::project;

/// The response header listing the optional parts that failed and are `null`.
pub const FLOTILLA_DEGRADED: HeaderName = HeaderName::from_static("flotilla-degraded");
/// The problem type of a response failed by a required part.
pub const COMPOSITION_FAILED: &str = "urn:flotilla:problem:composition-failed";
/// The most a part's answer may hold: a part is a piece of one screen, so a larger answer is a
/// mistake, and reading it whole could exhaust the gateway's memory.
pub const MAX_PART_BODY: usize = 8 << 20;

const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// Identity headers the gateway's authentication sets from verified credentials.
const IDENTITY_PREFIX: &str = "x-flotilla-";
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Every facade of the manifest, ready to match requests.
#[derive(Debug, Clone, Default)]
pub struct Facades {
    facades: Box<[Facade]>,
}

#[derive(Debug, Clone)]
struct Facade {
    name: Arc<str>,
    /// Without a trailing slash; never `/`.
    prefix: Box<str>,
    /// The more literal a route's path, the earlier: `/orders/recent` is tried before
    /// `/orders/{id}`.
    routes: Box<[FacadeRoute]>,
}

#[derive(Debug, Clone)]
struct FacadeRoute {
    method: Method,
    /// As declared, for logs.
    path: Box<str>,
    segments: Box<[Segment]>,
    auth: Option<RouteAuth>,
    parts: Box<[Part]>,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(Box<str>),
    Placeholder,
}

#[derive(Debug, Clone)]
struct Part {
    name: Box<str>,
    method: Method,
    target: Target,
    path: Box<[Piece]>,
    optional: bool,
    fields: Option<Box<[ProjectedField]>>,
}

/// A piece of a part's path.
#[derive(Debug, Clone)]
enum Piece {
    Literal(Box<str>),
    /// The route's placeholder with this index.
    Path(usize),
    /// The client's query parameter of this name.
    Query(Box<str>),
}

impl Facades {
    /// Compiles the manifest's facades, which it has checked: prefixes apart, paths well formed,
    /// every `path.NAME` a placeholder of its route.
    pub fn new(bffs: &[Bff]) -> Self {
        let facades = bffs
            .iter()
            .map(|bff| {
                let mut routes: Vec<FacadeRoute> =
                    bff.routes.iter().map(FacadeRoute::new).collect();
                // Stable: among equally literal routes (other methods) file order stays.
                routes.sort_by_cached_key(|route| {
                    route
                        .segments
                        .iter()
                        .map(|s| matches!(s, Segment::Placeholder))
                        .collect::<Vec<bool>>()
                });
                Facade {
                    name: bff.name.as_str().into(),
                    prefix: bff.prefix.trim_end_matches('/').into(),
                    routes: routes.into(),
                }
            })
            .collect();
        Self { facades }
    }

    pub fn is_empty(&self) -> bool {
        self.facades.is_empty()
    }

    /// The route of a request under a facade's prefix, with its path parameters; `None` when the
    /// path is under no facade's prefix (then it is the gateway routes' business). Under a
    /// prefix, a path no route has is [`Error::NoRoute`] (404), and a path whose routes take
    /// other methods a 405 with `Allow`.
    ///
    /// A path under no prefix costs one comparison per facade and allocates nothing.
    pub fn route(&self, method: &Method, path: &str) -> Option<Result<Match<'_>, Error>> {
        self.facades.iter().find_map(|facade| {
            let rest = path.strip_prefix(&*facade.prefix)?;
            (rest.is_empty() || rest.starts_with('/')).then(|| facade.route(method, path, rest))
        })
    }
}

impl Facade {
    fn route<'f>(&'f self, method: &Method, path: &str, rest: &str) -> Result<Match<'f>, Error> {
        // `/web/orders/7/` is `/web/orders/7`, and `/web/` the facade's root.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let segments: Vec<&str> = match rest.strip_prefix('/') {
            Some(rest) => rest.split('/').collect(),
            None => Vec::new(),
        };
        let mut allowed: Vec<&str> = Vec::new();
        for route in &self.routes {
            if !route.matches(&segments) {
                continue;
            }
            if route.method == *method {
                let params = route
                    .segments
                    .iter()
                    .zip(&segments)
                    .filter(|(segment, _)| matches!(segment, Segment::Placeholder))
                    .map(|(_, raw)| percent_decode(raw))
                    .collect();
                return Ok(Match {
                    facade: self,
                    route,
                    params,
                });
            }
            if !allowed.contains(&route.method.as_str()) {
                allowed.push(route.method.as_str());
            }
        }
        if allowed.is_empty() {
            return Err(Error::NoRoute {
                path: crate::router::truncate(path, crate::router::MAX_ECHOED_PATH).into(),
            });
        }
        let allow = allowed.join(", ");
        let refusal = Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "urn:flotilla:problem:method-not-allowed",
            "Method not allowed",
            format!("this path of facade `{}` answers {allow}", self.name),
        );
        Err(match HeaderValue::from_str(&allow) {
            Ok(value) => refusal.with_header(ALLOW, value),
            Err(_) => refusal,
        }
        .into())
    }
}

impl FacadeRoute {
    fn new(route: &flotilla_manifest::BffRoute) -> Self {
        let mut placeholders: Vec<&str> = Vec::new();
        let segments = route
            .path
            .split('/')
            .filter(|segment| !segment.is_empty())
            .map(
                |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => {
                        placeholders.push(name);
                        Segment::Placeholder
                    }
                    None => Segment::Literal(segment.into()),
                },
            )
            .collect();
        let parts = route
            .parts
            .iter()
            .map(|part| Part {
                name: part.name.as_str().into(),
                method: method(&part.method),
                target: Target::service(part.service.clone()),
                path: part
                    .path
                    .parts
                    .iter()
                    .map(|piece| match piece {
                        TemplatePart::Literal(text) => Piece::Literal(text.as_str().into()),
                        // The manifest checked the name; should it ever be missing, the index
                        // past the end fails the part instead of panicking.
                        TemplatePart::Expr(TemplateRef::Path(name)) => Piece::Path(
                            placeholders
                                .iter()
                                .position(|p| p == name)
                                .unwrap_or(usize::MAX),
                        ),
                        TemplatePart::Expr(TemplateRef::Query(name)) => {
                            Piece::Query(name.as_str().into())
                        }
                        // Refused by the manifest in a facade: renders as nothing.
                        TemplatePart::Expr(_) => Piece::Literal("".into()),
                    })
                    .collect(),
                optional: part.optional,
                fields: part.fields.as_ref().map(|p| p.fields.clone().into()),
            })
            .collect();
        Self {
            method: method(&route.method),
            path: route.path.as_str().into(),
            segments,
            auth: route.auth.clone(),
            parts,
        }
    }

    fn matches(&self, segments: &[&str]) -> bool {
        self.segments.len() == segments.len()
            && self
                .segments
                .iter()
                .zip(segments)
                .all(|(segment, raw)| match segment {
                    Segment::Literal(literal) => **literal == **raw,
                    Segment::Placeholder => !raw.is_empty(),
                })
    }
}

/// A method the manifest has checked (GET, POST, PUT, PATCH, DELETE).
fn method(name: &str) -> Method {
    Method::from_bytes(name.as_bytes()).unwrap_or_default()
}

/// A request's facade route, with the values of its path's placeholders.
#[derive(Debug)]
pub struct Match<'a> {
    facade: &'a Facade,
    route: &'a FacadeRoute,
    /// Percent-decoded, in the order of the path's placeholders.
    params: Vec<Vec<u8>>,
}

impl Match<'_> {
    /// The facade's name (`web`).
    pub fn facade(&self) -> &str {
        &self.facade.name
    }

    /// The route's path as declared below the facade's prefix (`/orders/{id}`), for logs and
    /// metrics: one value per route, whatever the ids.
    pub fn path(&self) -> &str {
        &self.route.path
    }

    /// Who may call the route (`auth`, `scopes`), checked by the edge before [`compose`].
    pub fn auth(&self) -> Option<&RouteAuth> {
        self.route.auth.as_ref()
    }
}

/// Why a part has no JSON to give.
#[derive(Debug)]
enum Failure {
    /// A `{{query.NAME}}` the client did not send.
    MissingQuery(Box<str>),
    /// The rendered path is not a URI path (cannot happen with a checked manifest).
    InvalidPath,
    /// The proxy could not get an answer: the problem's detail.
    Unanswered(String),
    Status(StatusCode),
    TooLarge,
    Broken,
    NotJson,
}

impl Failure {
    fn describe(&self, service: &str) -> String {
        match self {
            Failure::MissingQuery(name) => format!("the query parameter `{name}` is missing"),
            Failure::InvalidPath => "its path could not be built".into(),
            Failure::Unanswered(detail) => detail.clone(),
            Failure::Status(status) => format!("`{service}` answered {status}"),
            Failure::TooLarge => {
                format!("`{service}` answered more than {} MiB", MAX_PART_BODY >> 20)
            }
            Failure::Broken => format!("`{service}` broke off its answer"),
            Failure::NotJson => format!("`{service}` answered something that is not JSON"),
        }
    }
}

/// Calls every part of `route` concurrently through `inner` and merges their answers.
///
/// `inner` is the proxy stack below the edge ([`flotilla_proxy::below_edge`]). Each part's
/// request carries its [`Target`], the client's [`ClientAddr`] and, from `client`'s headers,
/// `traceparent`/`tracestate` (so the calls join the client's trace), `x-request-id`, `host`
/// and the `x-flotilla-*` identity headers, which the edge's authentication must have set (and
/// stripped from what the client sent) before this is called; nothing else of the client's
/// request, its body included, reaches the services. Parts ask for `accept: application/json`
/// and carry no body: `B` is the stack's request body type, built with [`Default`] (`Empty`,
/// `Full` or the boxed body).
///
/// The answer is `200 application/json`, or a problem as an [`Error`]: 404 when a required part
/// answered 404, 502 ([`COMPOSITION_FAILED`]) when a required part failed otherwise, 400 when a
/// required part needs a query parameter the client did not send. Dropping the future cancels
/// every call still running.
pub async fn compose<S, B>(
    route: &Match<'_>,
    client: &http::request::Parts,
    inner: S,
) -> Result<Response<ProxyBody>, Error>
where
    S: Service<Request<B>, Response = Response<ProxyBody>> + Clone,
    S::Error: Into<BoxError>,
    B: Default,
{
    let headers = part_headers(client);
    let client_addr = client.extensions.get::<ClientAddr>().copied();
    let query = client.uri.query();
    let parts = &route.route.parts;
    let mut calls = Vec::with_capacity(parts.len());
    for part in parts.iter() {
        let request = render(part, &route.params, query).map(|uri| {
            let mut request = Request::new(B::default());
            *request.method_mut() = part.method.clone();
            *request.uri_mut() = uri;
            *request.headers_mut() = headers.clone();
            request.extensions_mut().insert(part.target.clone());
            if let Some(addr) = client_addr {
                request.extensions_mut().insert(addr);
            }
            request
        });
        calls.push(fetch(part, request, inner.clone()));
    }
    let outcomes = join_all(calls).await;

    // What the client asked for does not exist: that, rather than a failure, is the answer.
    let missing = parts.iter().zip(&outcomes).find(|(part, outcome)| {
        !part.optional && matches!(outcome, Err(Failure::Status(StatusCode::NOT_FOUND)))
    });
    if let Some((part, Err(failure))) = missing {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "urn:flotilla:problem:not-found",
            "Not found",
            format!(
                "part `{}`: {}",
                part.name,
                failure.describe(&part.target.service)
            ),
        )
        .into());
    }
    let failed = parts
        .iter()
        .zip(&outcomes)
        .find(|(part, outcome)| !part.optional && outcome.is_err());
    if let Some((part, Err(failure))) = failed {
        let detail = format!(
            "part `{}` failed: {}",
            part.name,
            failure.describe(&part.target.service)
        );
        return Err(match failure {
            Failure::MissingQuery(_) => Refusal::new(
                StatusCode::BAD_REQUEST,
                "urn:flotilla:problem:missing-parameter",
                "Missing parameter",
                detail,
            ),
            _ => Refusal::new(
                StatusCode::BAD_GATEWAY,
                COMPOSITION_FAILED,
                "Composition failed",
                detail,
            ),
        }
        .into());
    }

    let size: usize = outcomes
        .iter()
        .map(|outcome| outcome.as_ref().map_or(4, Vec::len))
        .sum();
    let mut body = Vec::with_capacity(size + parts.len() * 16 + 2);
    let mut degraded: Vec<&str> = Vec::new();
    body.push(b'{');
    for (i, (part, outcome)) in parts.iter().zip(&outcomes).enumerate() {
        if i > 0 {
            body.push(b',');
        }
        // Part names are letters, digits, `-` and `_`: nothing to escape.
        body.push(b'"');
        body.extend_from_slice(part.name.as_bytes());
        body.extend_from_slice(b"\":");
        match outcome {
            Ok(json) => body.extend_from_slice(json),
            Err(failure) => {
                tracing::debug!(
                    facade = %route.facade.name,
                    route = %route.route.path,
                    part = %part.name,
                    reason = %failure.describe(&part.target.service),
                    "optional part degraded to null"
                );
                body.extend_from_slice(b"null");
                degraded.push(&part.name);
            }
        }
    }
    body.push(b'}');

    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, APPLICATION_JSON);
    if !degraded.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&degraded.join(", ")) {
            headers.insert(FLOTILLA_DEGRADED, value);
        }
        // A partial answer should not be served again from a cache once the part is back.
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    Ok(response)
}

/// The headers every part's request carries, taken from the client's.
fn part_headers(client: &http::request::Parts) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(8);
    for (name, value) in &client.headers {
        let passed = name == TRACEPARENT
            || name == TRACESTATE
            || name == X_REQUEST_ID
            || name == HOST
            || name.as_str().starts_with(IDENTITY_PREFIX);
        if passed {
            headers.append(name.clone(), value.clone());
        }
    }
    // HTTP/2 clients name the host in the URI instead.
    if !headers.contains_key(HOST)
        && let Some(authority) = client.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(HOST, host);
    }
    headers.insert(ACCEPT, APPLICATION_JSON);
    headers
}

/// The part's path with the parameters in place, each percent-encoded so that it stays within
/// its segment (or query value) whatever it holds.
fn render(part: &Part, params: &[Vec<u8>], query: Option<&str>) -> Result<Uri, Failure> {
    let mut path = String::with_capacity(64);
    for piece in &part.path {
        match piece {
            Piece::Literal(text) => path.push_str(text),
            Piece::Path(index) => {
                percent_encode(params.get(*index).ok_or(Failure::InvalidPath)?, &mut path)
            }
            Piece::Query(name) => {
                let value = query
                    .and_then(|query| query_value(query, name))
                    .ok_or_else(|| Failure::MissingQuery(name.clone()))?;
                percent_encode(&value, &mut path);
            }
        }
    }
    Uri::try_from(path).map_err(|_| Failure::InvalidPath)
}

/// One part's call: its JSON, projected, or why there is none.
async fn fetch<S, B>(
    part: &Part,
    request: Result<Request<B>, Failure>,
    inner: S,
) -> Result<Vec<u8>, Failure>
where
    S: Service<Request<B>, Response = Response<ProxyBody>>,
    S::Error: Into<BoxError>,
{
    let response = match inner.oneshot(request?).await {
        Ok(response) => response,
        Err(error) => return Err(unanswered(part, error.into())),
    };
    let (head, body) = response.into_parts();
    if !head.status.is_success() {
        return Err(Failure::Status(head.status));
    }
    let bytes = read_bounded(body).await?;
    let json = bytes.trim_ascii();
    // 204, or an empty 200: there is nothing, which JSON says as `null`.
    if json.is_empty() {
        return Ok(b"null".to_vec());
    }
    match &part.fields {
        // Passed on as the service wrote it, once known to be JSON: its member order is kept.
        None => match serde_json::from_slice::<serde::de::IgnoredAny>(json) {
            Ok(_) => Ok(json.to_vec()),
            Err(_) => Err(Failure::NotJson),
        },
        Some(fields) => {
            let value: serde_json::Value =
                serde_json::from_slice(json).map_err(|_| Failure::NotJson)?;
            let mut out = Vec::with_capacity(json.len().min(4096));
            project(&value, fields, &mut out);
            Ok(out)
        }
    }
}

/// The whole body, up to [`MAX_PART_BODY`]; a larger one is refused as soon as it is known to
/// be larger, from its `content-length` or from what came so far.
///
/// By hand rather than with `http_body_util::Limited`: its generic error conversion makes the
/// compiler unable to prove a future holding it `Send`.
async fn read_bounded(mut body: ProxyBody) -> Result<Vec<u8>, Failure> {
    let hint = body.size_hint();
    if hint.lower() > MAX_PART_BODY as u64 {
        return Err(Failure::TooLarge);
    }
    let mut bytes = Vec::with_capacity(hint.exact().map_or(1024, |n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Failure::Broken)?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_PART_BODY {
                return Err(Failure::TooLarge);
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

fn unanswered(part: &Part, error: BoxError) -> Failure {
    Failure::Unanswered(match error.downcast_ref::<Error>() {
        Some(error) => error.to_string(),
        // Not one of the proxy's own errors: it may say too much to show a client.
        None => format!(
            "the call to `{}` could not be delivered",
            part.target.service
        ),
    })
}

/// The first value of the query parameter `name`, decoded as a form (`+` is a space).
fn query_value(query: &str, name: &str) -> Option<Vec<u8>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(key) == name.as_bytes()).then(|| form_decode(value))
    })
}

fn form_decode(text: &str) -> Vec<u8> {
    if text.contains('+') {
        percent_decode(&text.replace('+', " "))
    } else {
        percent_decode(text)
    }
}

/// `%XX` escapes decoded; a `%` not followed by two hex digits is kept as it is.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| Some(hex(*bytes.get(i + 1)?)? << 4 | hex(*bytes.get(i + 2)?)?))
            .flatten();
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|d| d as u8)
}

/// RFC 3986 unreserved characters stay; every other byte is escaped.
fn percent_encode(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xF)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_manifest::{BffPart, BffRoute, Template};

    fn part(name: &str, path: Vec<TemplatePart>) -> BffPart {
        BffPart {
            name: name.into(),
            method: "GET".into(),
            service: "orders".into(),
            path: Template { parts: path },
            optional: false,
            fields: None,
        }
    }

    fn route(method: &str, path: &str) -> BffRoute {
        BffRoute {
            method: method.into(),
            path: path.into(),
            auth: None,
            parts: vec![part(
                "order",
                vec![
                    TemplatePart::Literal("/orders/".into()),
                    TemplatePart::Expr(TemplateRef::Path("id".into())),
                ],
            )],
        }
    }

    fn facades() -> Facades {
        Facades::new(&[Bff {
            name: "web".into(),
            prefix: "/web".into(),
            routes: vec![
                route("GET", "/orders/{id}"),
                route("DELETE", "/orders/{id}"),
                route("GET", "/orders/recent"),
                route("GET", "/"),
            ],
        }])
    }

    fn found(facades: &Facades, method: Method, path: &str) -> Result<(String, Vec<Vec<u8>>), u16> {
        match facades.route(&method, path) {
            None => Err(0),
            Some(Ok(m)) => Ok((m.path().to_owned(), m.params)),
            Some(Err(error)) => Err(error.status().as_u16()),
        }
    }

    #[test]
    fn routes_match_by_prefix_segments_and_method() {
        let facades = facades();
        assert_eq!(
            found(&facades, Method::GET, "/web/orders/7"),
            Ok(("/orders/{id}".into(), vec![b"7".to_vec()]))
        );
        assert_eq!(
            found(&facades, Method::GET, "/web/orders/a%2Fb%20c/"),
            Ok(("/orders/{id}".into(), vec![b"a/b c".to_vec()]))
        );
        // Literal segments win over placeholders, whatever the file order.
        assert_eq!(
            found(&facades, Method::GET, "/web/orders/recent"),
            Ok(("/orders/recent".into(), vec![]))
        );
        assert_eq!(
            found(&facades, Method::DELETE, "/web/orders/recent"),
            Ok(("/orders/{id}".into(), vec![b"recent".to_vec()]))
        );
        assert_eq!(
            found(&facades, Method::GET, "/web"),
            Ok(("/".into(), vec![]))
        );
        assert_eq!(
            found(&facades, Method::GET, "/web/"),
            Ok(("/".into(), vec![]))
        );
        assert_eq!(found(&facades, Method::GET, "/webx/orders/7"), Err(0));
        assert_eq!(found(&facades, Method::GET, "/api"), Err(0));
        assert_eq!(found(&facades, Method::GET, "/web/orders"), Err(404));
        assert_eq!(found(&facades, Method::GET, "/web/orders//"), Err(404));
        assert_eq!(found(&facades, Method::POST, "/web/orders/7"), Err(405));
    }

    #[test]
    fn method_not_allowed_lists_the_methods() {
        let facades = facades();
        let Some(Err(error)) = facades.route(&Method::PUT, "/web/orders/7") else {
            panic!("expected a refusal");
        };
        let response = error.to_response(None);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET, DELETE");
    }

    #[test]
    fn rendering_encodes_values() {
        let facades = facades();
        let Some(Ok(m)) = facades.route(&Method::GET, "/web/orders/%C3%A9%3F%23x+y") else {
            panic!("expected a match");
        };
        let uri = render(&m.route.parts[0], &m.params, None).expect("uri");
        assert_eq!(uri, "/orders/%C3%A9%3F%23x%2By");
        let part = Part {
            path: vec![
                Piece::Literal("/s?user=".into()),
                Piece::Query("user".into()),
            ]
            .into(),
            ..m.route.parts[0].clone()
        };
        assert_eq!(
            render(&part, &[], Some("a=1&user=J%C3%B6+D%26s&user=2"))
                .expect("uri")
                .to_string(),
            "/s?user=J%C3%B6%20D%26s"
        );
        assert!(matches!(
            render(&part, &[], Some("users=1")),
            Err(Failure::MissingQuery(_))
        ));
        assert_eq!(
            render(&part, &[], Some("user")).expect("uri").to_string(),
            "/s?user="
        );
    }

    #[test]
    fn percent_decoding_keeps_stray_percents() {
        assert_eq!(percent_decode("a%2fb%zz%4"), b"a/b%zz%4");
        assert_eq!(form_decode("a+b%2B"), b"a b+");
    }
}
