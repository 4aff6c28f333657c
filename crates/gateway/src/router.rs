//! Path routes with API versions: the longest prefix (whole segments) picks a group of routes,
//! the version the request asks for (`Accept-Version`, or a `version` parameter of `Accept`)
//! picks one route of the group.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_manifest::{Deprecation, Route};
use flotilla_proxy::{Error, Refusal, Target};
use http::header::{ACCEPT, HeaderName, LINK};
use http::{HeaderMap, HeaderValue, Request, StatusCode};

use crate::auth::{Auth, Guard};
use crate::cors::CorsPolicy;
use crate::rate_limit::Quota;

/// Paths echoed in a 404 are cut to this many bytes: they come from the client.
pub(crate) const MAX_ECHOED_PATH: usize = 256;

/// The header clients name the API version they want with.
pub const ACCEPT_VERSION: HeaderName = HeaderName::from_static("accept-version");
/// RFC 9745.
pub const DEPRECATION: HeaderName = HeaderName::from_static("deprecation");
/// RFC 8594.
pub const SUNSET: HeaderName = HeaderName::from_static("sunset");

/// One route, ready to serve: where it goes and what the edge does on the way.
#[derive(Debug)]
pub struct RouteEntry {
    pub target: Target,
    /// Names the route in rate-limit keys and logs: the prefix, with `@version` when versioned.
    pub id: Arc<str>,
    /// The route as the manifest wrote it (auth, rate limit, CORS).
    pub route: Route,
    /// `Deprecation`, `Sunset` and `Link` headers added to every response of the route.
    pub deprecation: Box<[(HeaderName, HeaderValue)]>,
    /// The route's `auth`, resolved against the gateway's authenticators.
    pub guard: Option<Guard>,
    /// The route's `cors`, its header values prepared.
    pub cors: Option<CorsPolicy>,
    /// The route's `rate_limit`, prepared.
    pub quota: Option<Quota>,
}

#[derive(Debug)]
enum Versions {
    One(Arc<RouteEntry>),
    Several {
        /// In file order.
        routes: Box<[(Box<str>, Arc<RouteEntry>)]>,
        /// The route for requests that name no version.
        default: usize,
        /// "1, 2", for the refusal of an unknown version.
        available: Box<str>,
    },
}

/// Longest-prefix router over the manifest's routes. Prefixes match whole path segments: `/api`
/// matches `/api` and `/api/x` but not `/apix`; the route `/` matches everything.
#[derive(Debug)]
pub struct Router {
    /// Longest prefix first, so the first match is the longest.
    groups: Box<[(Box<str>, Versions)]>,
}

impl Router {
    /// A router whose routes have no `auth` (a route that has one is an error).
    pub fn new(routes: &[Route]) -> Self {
        Self::with_auth(routes, &Auth::none()).unwrap_or_else(|_| Self {
            groups: Box::new([]),
        })
    }

    /// The router of `routes`, their `auth` resolved against `auth`'s authenticators.
    pub fn with_auth(routes: &[Route], auth: &Auth) -> Result<Self, String> {
        let mut groups: Vec<(Box<str>, Vec<Arc<RouteEntry>>)> = Vec::new();
        for route in routes {
            // Matching ignores a trailing slash, so `/api/` and `/api` behave alike and the root
            // route becomes the empty prefix, which every path starts with.
            let prefix = route.prefix.trim_end_matches('/');
            let guard = match &route.auth {
                Some(route_auth) => Some(
                    auth.guard(route_auth)
                        .map_err(|e| format!("route `{}`: {e}", route.prefix))?,
                ),
                None => None,
            };
            let entry = Arc::new(entry(route, guard));
            match groups.iter_mut().find(|(p, _)| **p == *prefix) {
                Some((_, group)) => group.push(entry),
                None => groups.push((prefix.into(), vec![entry])),
            }
        }
        // The manifest sorts already; sorting again keeps the router correct on its own. Stable,
        // so versions keep their file order.
        groups.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        let groups = groups
            .into_iter()
            .map(|(prefix, mut group)| {
                let versions = if group.len() == 1 && group[0].route.version.is_none() {
                    Versions::One(group.remove(0))
                } else {
                    let default = group
                        .iter()
                        .position(|e| e.route.version.as_ref().is_some_and(|v| v.default))
                        .unwrap_or(0);
                    let routes: Box<[_]> = group
                        .into_iter()
                        .map(|entry| {
                            let name = entry.route.version.as_ref().map_or("", |v| v.name.as_str());
                            (Box::<str>::from(name), entry)
                        })
                        .collect();
                    let available = routes
                        .iter()
                        .map(|(name, _)| &**name)
                        .collect::<Vec<_>>()
                        .join(", ")
                        .into();
                    Versions::Several {
                        routes,
                        default,
                        available,
                    }
                };
                (prefix, versions)
            })
            .collect();
        Ok(Self { groups })
    }

    fn group(&self, path: &str) -> Option<(&str, &Versions)> {
        self.groups
            .iter()
            .find(|(prefix, _)| {
                path.strip_prefix(&**prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .map(|(prefix, versions)| (&**prefix, versions))
    }

    /// The target a request without a version header gets for `path`, if any route matches.
    pub fn route(&self, path: &str) -> Option<&Target> {
        self.group(path).map(|(_, versions)| match versions {
            Versions::One(entry) => &entry.target,
            Versions::Several {
                routes, default, ..
            } => &routes[*default].1.target,
        })
    }

    /// The route serving `request`: 404 when no prefix matches, 400 when the request asks for
    /// a version the prefix does not have.
    pub fn select<B>(&self, request: &Request<B>) -> Result<&Arc<RouteEntry>, Error> {
        let path = request.uri().path();
        let Some((prefix, versions)) = self.group(path) else {
            return Err(Error::NoRoute {
                path: truncate(path, MAX_ECHOED_PATH).into(),
            });
        };
        match versions {
            Versions::One(entry) => Ok(entry),
            Versions::Several {
                routes,
                default,
                available,
            } => match requested_version(request.headers()) {
                None => Ok(&routes[*default].1),
                Some(wanted) => routes
                    .iter()
                    .find(|(name, _)| **name == *wanted)
                    .map(|(_, entry)| entry)
                    .ok_or_else(|| {
                        Refusal::new(
                            StatusCode::BAD_REQUEST,
                            "urn:flotilla:problem:unknown-api-version",
                            "Unknown API version",
                            format!(
                                "version `{}` of `{}` does not exist; available: {available}",
                                truncate(wanted, 64),
                                if prefix.is_empty() { "/" } else { prefix },
                            ),
                        )
                        .into()
                    }),
            },
        }
    }
}

/// The version a request asks for: `Accept-Version: 2`, else a `version` parameter of the
/// first media type in `Accept` that has one (`application/json; version=2`).
pub fn requested_version(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(ACCEPT_VERSION).and_then(|v| v.to_str().ok()) {
        let value = value.trim();
        if !value.is_empty() {
            return Some(value);
        }
    }
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .flat_map(|media_type| media_type.split(';').skip(1))
        .find_map(|parameter| {
            let (name, value) = parameter.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("version")
                .then(|| value.trim().trim_matches('"'))
        })
        .filter(|v| !v.is_empty())
}

fn entry(route: &Route, guard: Option<Guard>) -> RouteEntry {
    let service: Arc<str> = match &route.service_version {
        Some(version) => format!("{}@{version}", route.service).into(),
        None => route.service.clone(),
    };
    let target = Target {
        service,
        // A route without rewrite passes the path through untouched.
        strip_prefix: route
            .rewrite
            .as_ref()
            .map(|_| Arc::from(route.prefix.as_str())),
        rewrite: route.rewrite.as_deref().map(Arc::from),
        retry_non_idempotent: route.retry_non_idempotent,
        fallback: route.fallback.clone().map(Arc::new),
    };
    let (cors, quota) = crate::pipeline::prepare(route);
    let id: Arc<str> = match &route.version {
        Some(version) => format!("{}@{}", route.prefix, version.name).into(),
        None => route.prefix.as_str().into(),
    };
    RouteEntry {
        target,
        id,
        deprecation: route
            .deprecation
            .as_ref()
            .map(deprecation_headers)
            .unwrap_or_default(),
        route: route.clone(),
        guard,
        cors,
        quota,
    }
}

fn deprecation_headers(deprecation: &Deprecation) -> Box<[(HeaderName, HeaderValue)]> {
    let mut headers = Vec::with_capacity(3);
    // RFC 9745: a structured-field date; deprecated with no date known reads as "since the epoch",
    // which every client treats as "deprecated now".
    let since = deprecation
        .since
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    if let Ok(value) = HeaderValue::try_from(format!("@{since}")) {
        headers.push((DEPRECATION, value));
    }
    if let Some(sunset) = deprecation.sunset {
        headers.push((SUNSET, http_date(sunset)));
    }
    if let Some(link) = &deprecation.link
        && let Ok(value) = HeaderValue::try_from(format!("<{link}>; rel=\"deprecation\""))
    {
        headers.push((LINK, value));
    }
    headers.into()
}

fn http_date(time: SystemTime) -> HeaderValue {
    HeaderValue::try_from(httpdate::fmt_http_date(time))
        .unwrap_or(HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_manifest::RouteVersion;

    fn route(prefix: &str, service: &str, rewrite: Option<&str>) -> Route {
        Route {
            rewrite: rewrite.map(Into::into),
            ..Route::new(prefix, service)
        }
    }

    fn versioned(prefix: &str, service: &str, version: &str, default: bool) -> Route {
        Route {
            version: Some(RouteVersion {
                name: version.into(),
                default,
            }),
            ..Route::new(prefix, service)
        }
    }

    fn service<'a>(router: &'a Router, path: &str) -> Option<&'a str> {
        router.route(path).map(|t| &*t.service)
    }

    fn selected(router: &Router, headers: &[(&str, &str)]) -> Result<Arc<str>, Error> {
        let mut request = Request::builder().uri("/api/orders/7");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(()).expect("request");
        router.select(&request).map(|e| e.target.service.clone())
    }

    #[test]
    fn longest_prefix_wins_whatever_the_order() {
        let router = Router::new(&[
            route("/api", "api", None),
            route("/api/v1/orders", "orders", Some("/orders")),
            route("/api/v1", "v1", None),
        ]);
        assert_eq!(service(&router, "/api/v1/orders/7"), Some("orders"));
        assert_eq!(service(&router, "/api/v1/orders"), Some("orders"));
        assert_eq!(service(&router, "/api/v1/products"), Some("v1"));
        assert_eq!(service(&router, "/api/v2"), Some("api"));
        assert_eq!(service(&router, "/other"), None);
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let router = Router::new(&[route("/api", "api", None)]);
        assert_eq!(service(&router, "/api"), Some("api"));
        assert_eq!(service(&router, "/api/"), Some("api"));
        assert_eq!(service(&router, "/api/x"), Some("api"));
        assert_eq!(service(&router, "/apix"), None);
        assert_eq!(service(&router, "/"), None);
    }

    #[test]
    fn root_route_matches_everything_last() {
        let router = Router::new(&[route("/", "web", None), route("/api", "api", None)]);
        assert_eq!(service(&router, "/"), Some("web"));
        assert_eq!(service(&router, "/apix"), Some("web"));
        assert_eq!(service(&router, "/api/x"), Some("api"));
    }

    #[test]
    fn rewrite_only_when_configured() {
        let router = Router::new(&[
            route("/api/v1/products", "catalog", Some("/products")),
            route("/static", "web", None),
        ]);
        let products = router.route("/api/v1/products/TEA-001").expect("route");
        assert_eq!(products.strip_prefix.as_deref(), Some("/api/v1/products"));
        assert_eq!(products.rewrite.as_deref(), Some("/products"));
        let web = router.route("/static/app.js").expect("route");
        assert_eq!(web.strip_prefix, None);
        assert_eq!(web.rewrite, None);
    }

    #[test]
    fn no_route_is_an_error_with_a_bounded_path() {
        let router = Router::new(&[route("/api", "api", None)]);
        let long = format!("/{}", "é".repeat(400));
        let request = Request::builder()
            .uri(format!("/x{}", urlencode(&long)))
            .body(())
            .expect("request");
        match router.select(&request) {
            Err(Error::NoRoute { path }) => assert!(path.len() <= MAX_ECHOED_PATH),
            other => panic!("expected NoRoute, got {other:?}"),
        }
        assert_eq!(truncate("aé", 2), "a");
    }

    #[test]
    fn versions_by_header_or_media_type_parameter() {
        let router = Router::new(&[
            versioned("/api/orders", "legacy", "1", false),
            Route {
                service_version: Some("2".into()),
                ..versioned("/api/orders", "orders", "2", true)
            },
            route("/api", "api", None),
        ]);
        let service = |headers: &[(&str, &str)]| selected(&router, headers).map(|s| s.to_string());
        assert_eq!(service(&[]).expect("default"), "orders@2");
        assert_eq!(service(&[("accept-version", "1")]).expect("v1"), "legacy");
        assert_eq!(
            service(&[("accept-version", " 2 ")]).expect("v2"),
            "orders@2"
        );
        assert_eq!(
            service(&[("accept", "text/html, application/json; q=0.9; version=1")]).expect("v1"),
            "legacy"
        );
        assert_eq!(
            service(&[("accept", "application/vnd.shop+json;version=\"2\"")]).expect("v2"),
            "orders@2"
        );
        // The header wins over the media type.
        assert_eq!(
            service(&[
                ("accept-version", "1"),
                ("accept", "application/json; version=2")
            ])
            .expect("v1"),
            "legacy"
        );
        match selected(&router, &[("accept-version", "3")]) {
            Err(Error::Refused(refusal)) => {
                assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
                assert_eq!(
                    refusal.detail,
                    "version `3` of `/api/orders` does not exist; available: 1, 2"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn without_a_default_the_first_version_serves() {
        let router = Router::new(&[
            versioned("/api", "one", "1", false),
            versioned("/api", "two", "2", false),
        ]);
        assert_eq!(&*selected(&router, &[]).expect("default"), "one");
    }

    #[test]
    fn deprecation_headers_follow_the_rfcs() {
        let since = UNIX_EPOCH + std::time::Duration::from_secs(1_780_272_000);
        let sunset = UNIX_EPOCH + std::time::Duration::from_secs(1_798_761_600);
        let headers = deprecation_headers(&Deprecation {
            since: Some(since),
            sunset: Some(sunset),
            link: Some("https://docs.example.com/v1".into()),
        });
        let text: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().expect("ascii").to_owned()))
            .collect();
        assert_eq!(
            text,
            [
                ("deprecation".to_owned(), "@1780272000".to_owned()),
                (
                    "sunset".to_owned(),
                    "Fri, 01 Jan 2027 00:00:00 GMT".to_owned()
                ),
                (
                    "link".to_owned(),
                    "<https://docs.example.com/v1>; rel=\"deprecation\"".to_owned()
                ),
            ]
        );
    }

    fn urlencode(s: &str) -> String {
        s.bytes().map(|b| format!("%{b:02X}")).collect()
    }
}
