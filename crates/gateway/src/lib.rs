//! The gateway: the app's public HTTP entrance.
//!
//! It is the shared data plane ([`flotilla_proxy`]) with one thing added at the edge: a
//! [`Router`] that maps the request path to a service by the manifest's `[[gateway.routes]]`
//! (longest prefix, whole segments, optional rewrite). Everything after that — request id,
//! forwarded headers, hop-by-hop stripping, rewrite, round-robin over healthy instances, the pooled
//! upstream client, problem+json errors — is the proxy stack, the same one every sidecar runs.
//! [`serve`] runs it on a listener (HTTP/1.1 and h2c) until shutdown, then drains.

pub mod access_log;
pub mod cors;

use std::sync::Arc;

use flotilla_manifest::Route;
use flotilla_proxy::resilience::ResilienceLayer;
use flotilla_proxy::{Edge, Error, ProxySettings, Resilience, Target};
use flotilla_registry::Discovery;
use http::Request;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Paths echoed in a 404 are cut to this many bytes: they come from the client.
const MAX_ECHOED_PATH: usize = 256;

/// Longest-prefix router over the manifest's routes. Prefixes match whole path segments: `/api`
/// matches `/api` and `/api/x` but not `/apix`; the route `/` matches everything.
#[derive(Debug, Clone)]
pub struct Router {
    /// Longest prefix first, so the first match is the longest.
    routes: Box<[(Box<str>, Target)]>,
}

impl Router {
    pub fn new(routes: &[Route]) -> Self {
        let mut routes: Vec<(Box<str>, Target)> = routes
            .iter()
            .map(|route| {
                // Matching ignores a trailing slash, so `/api/` and `/api` behave alike and the
                // root route becomes the empty prefix, which every path starts with.
                let prefix: Box<str> = route.prefix.trim_end_matches('/').into();
                let target = Target {
                    service: route.service.clone(),
                    // A route without rewrite passes the path through untouched.
                    strip_prefix: route
                        .rewrite
                        .as_ref()
                        .map(|_| Arc::from(route.prefix.as_str())),
                    rewrite: route.rewrite.as_deref().map(Arc::from),
                    retry_non_idempotent: route.retry_non_idempotent,
                    fallback: route.fallback.clone().map(Arc::new),
                };
                (prefix, target)
            })
            .collect();
        // The manifest sorts already; sorting again keeps the router correct on its own.
        routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Self {
            routes: routes.into(),
        }
    }

    /// The target of the longest route matching `path`, if any.
    pub fn route(&self, path: &str) -> Option<&Target> {
        self.routes
            .iter()
            .find(|(prefix, _)| {
                path.strip_prefix(&**prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .map(|(_, target)| target)
    }
}

impl Edge for Router {
    fn target<B>(&self, request: &Request<B>) -> Result<Target, Error> {
        let path = request.uri().path();
        self.route(path).cloned().ok_or_else(|| Error::NoRoute {
            path: truncate(path, MAX_ECHOED_PATH).into(),
        })
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The gateway's resilience layer: it calls services as the caller `gateway`.
pub fn resilience<D: Discovery>(discovery: Arc<D>, resilience: Resilience) -> ResilienceLayer<D> {
    ResilienceLayer::new(discovery, resilience, CALLER)
}

/// The caller name of the gateway's breakers.
pub const CALLER: &str = "gateway";

/// Serves the gateway on `listener` until `shutdown` is cancelled, then stops accepting and gives
/// in-flight requests [`flotilla_proxy::DEFAULT_DRAIN_TIMEOUT`] to finish.
///
/// `resilience` is the gateway's view of the callees (see [`resilience`]).
pub async fn serve<D: Discovery>(
    listener: TcpListener,
    routes: &[Route],
    resilience: ResilienceLayer<D>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let stack =
        flotilla_proxy::stack_with_edge(resilience, ProxySettings::gateway(), Router::new(routes));
    flotilla_proxy::serve_connections(
        listener,
        stack,
        shutdown,
        flotilla_proxy::DEFAULT_DRAIN_TIMEOUT,
    )
    .await
}

/// Serves like [`serve`], on `threads` threads that each run their own single-threaded runtime
/// and accept from the same listening socket (as nginx's workers do).
///
/// A connection then lives on one thread from accept to upstream: the client connection, the
/// pooled upstream connection and their tasks never hand work to another thread. With tokio's
/// work-stealing runtime the upstream connection task and the client's often sit on different
/// threads, and the cross-thread wake-ups cost more than the proxying itself.
/// The returned handle finishes when every thread has drained.
pub fn serve_threaded<D: Discovery>(
    listener: std::net::TcpListener,
    threads: std::num::NonZeroUsize,
    routes: &[Route],
    resilience: ResilienceLayer<D>,
    shutdown: CancellationToken,
) -> std::io::Result<ThreadedGateway> {
    listener.set_nonblocking(true)?;
    let mut handles = Vec::with_capacity(threads.get());
    for n in 0..threads.get() {
        let listener = listener.try_clone()?;
        let routes = routes.to_vec();
        // One set of breakers for all threads: the gateway is one caller.
        let resilience = resilience.clone();
        let shutdown = shutdown.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = std::thread::Builder::new()
            .name(format!("gateway-{n}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    serve(listener, &routes, resilience, shutdown).await
                })
            })?;
        handles.push(handle);
    }
    Ok(ThreadedGateway { handles })
}

/// The threads of [`serve_threaded`].
pub struct ThreadedGateway {
    handles: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl ThreadedGateway {
    /// Waits (without blocking the caller's runtime) until every thread has finished; the first
    /// error wins.
    pub async fn wait(self) -> std::io::Result<()> {
        let joined = tokio::task::spawn_blocking(move || {
            let mut first_error = Ok(());
            for handle in self.handles {
                let result = handle
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a gateway thread panicked")));
                if first_error.is_ok() {
                    first_error = result;
                }
            }
            first_error
        });
        joined.await.map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, service: &str, rewrite: Option<&str>) -> Route {
        Route {
            rewrite: rewrite.map(Into::into),
            ..Route::new(prefix, service)
        }
    }

    fn service<'a>(router: &'a Router, path: &str) -> Option<&'a str> {
        router.route(path).map(|t| &*t.service)
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
        match router.target(&request) {
            Err(Error::NoRoute { path }) => assert!(path.len() <= MAX_ECHOED_PATH),
            other => panic!("expected NoRoute, got {other:?}"),
        }
        assert_eq!(truncate("aé", 2), "a");
    }

    fn urlencode(s: &str) -> String {
        s.bytes().map(|b| format!("%{b:02X}")).collect()
    }
}
