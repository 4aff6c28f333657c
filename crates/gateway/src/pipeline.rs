//! What the gateway does to a request before the shared proxy stack takes it: pick the route
//! (a facade's, else the longest prefix and the API version asked for), then the route's edge
//! checks — CORS preflight, authentication, rate limit — then hand it to the stack below the
//! edge with its [`Target`]; on the way back, the route's response headers.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use flotilla_manifest::{Bff, GatewaySettings};
use flotilla_proxy::{BoxError, ClientAddr, ProxyBody, X_REQUEST_ID};
use http::header::ORIGIN;
use http::{Request, Response};
use http_body_util::Empty;
use tokio_util::sync::CancellationToken;
use tower::Service;
use tower::util::ServiceExt;

use crate::access_log::{ACCESS_LOG_PATH, AccessLog};
use crate::auth::{Auth, Identity};
use crate::bff::{self, Facades};
use crate::cors::CorsPolicy;
use crate::rate_limit::{Decision, Quota, RateLimiter};
use crate::router::{RouteEntry, Router};

/// Everything the gateway knows besides the proxy stack: routes, facades, authenticators and
/// rate-limit counters, and the edge's limits.
pub struct Gateway {
    router: Router,
    facades: Facades,
    auth: Arc<Auth>,
    /// `None` when no route is rate limited: no store to connect to.
    limiter: Option<Arc<RateLimiter>>,
    pub(crate) settings: GatewaySettings,
    /// HTTPS when `[gateway.tls]` (or `up --tls`) gives a certificate.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// `access_log = true`: `.flotilla/logs/gateway-access.log`.
    pub(crate) access_log: Option<Arc<AccessLog>>,
}

impl Gateway {
    /// A gateway with `routes` and nothing else: no facades, no authenticators, limits kept in
    /// memory, every edge default.
    pub fn from_routes(routes: &[flotilla_manifest::Route]) -> Self {
        let mut settings = GatewaySettings::new(([127, 0, 0, 1], 0).into());
        settings.routes = routes.to_vec();
        settings.limits.access_log = false;
        Self {
            router: Router::new(routes),
            facades: Facades::default(),
            auth: Auth::none(),
            limiter: None,
            settings,
            tls: None,
            access_log: None,
        }
    }

    /// The gateway of a manifest: loads the authenticators' keys (fetching JWKS URLs), connects
    /// to the rate-limit store when a route is limited, and resolves every route's checks once.
    /// Background work (JWKS refreshes) stops with `shutdown`.
    pub async fn start(
        app: &str,
        settings: &GatewaySettings,
        bffs: &[Bff],
        manifest_dir: &Path,
        shutdown: CancellationToken,
    ) -> Result<Self, String> {
        let auth = Auth::start(&settings.auth, manifest_dir, shutdown).await?;
        let router = Router::with_auth(&settings.routes, &auth)?;
        let facades = Facades::new(bffs);
        for bff in bffs {
            for route in &bff.routes {
                if let Some(route_auth) = &route.auth {
                    auth.guard(route_auth).map_err(|e| {
                        format!("facade `{}` route `{}`: {e}", bff.name, route.path)
                    })?;
                }
            }
        }
        let limiter = if settings.routes.iter().any(|r| r.rate_limit.is_some()) {
            Some(RateLimiter::start(&settings.rate_limit_store, app).await?)
        } else {
            None
        };
        let tls = match &settings.tls {
            Some(tls) => Some(
                flotilla_proxy::tls::server_config(
                    &manifest_dir.join(&tls.cert),
                    &manifest_dir.join(&tls.key),
                )
                .map_err(|e| format!("[gateway.tls]: {e}"))?,
            ),
            None => None,
        };
        let access_log = if settings.limits.access_log {
            let path = manifest_dir.join(ACCESS_LOG_PATH);
            let log = AccessLog::open(&path)
                .map_err(|e| format!("cannot open the access log {}: {e}", path.display()))?;
            Some(Arc::new(log))
        } else {
            None
        };
        Ok(Self {
            router,
            facades,
            auth,
            limiter,
            settings: settings.clone(),
            tls,
            access_log,
        })
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn rate_limiter(&self) -> Option<&Arc<RateLimiter>> {
        self.limiter.as_ref()
    }

    pub fn settings(&self) -> &GatewaySettings {
        &self.settings
    }

    /// Whether the gateway serves HTTPS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Access log lines dropped because the writer fell behind.
    pub fn access_log_dropped(&self) -> u64 {
        self.access_log.as_ref().map_or(0, |log| log.dropped())
    }
}

/// The gateway's service: [`Gateway`] in front of `inner`, the stack below the edge, and
/// `parts`, the same stack (same breakers) for the bodiless calls of facade parts.
pub struct Pipeline<S, P> {
    gateway: Arc<Gateway>,
    inner: S,
    parts: P,
}

impl<S, P> Pipeline<S, P> {
    pub fn new(gateway: Arc<Gateway>, inner: S, parts: P) -> Self {
        Self {
            gateway,
            inner,
            parts,
        }
    }
}

impl<S: Clone, P: Clone> Clone for Pipeline<S, P> {
    fn clone(&self) -> Self {
        Self {
            gateway: self.gateway.clone(),
            inner: self.inner.clone(),
            parts: self.parts.clone(),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a facade part is sent with: no body.
pub type PartBody = Empty<Bytes>;

impl<S, P, B> Service<Request<B>> for Pipeline<S, P>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    P: Service<Request<PartBody>, Response = Response<ProxyBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    P::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<ProxyBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness of the stack below is awaited per request (`oneshot`), after the edge checks
        // that may themselves wait.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let gateway = self.gateway.clone();
        let inner = self.inner.clone();
        let parts = self.parts.clone();
        Box::pin(async move {
            // Identity headers come from the gateway only: whatever a client sent goes.
            gateway.auth.strip_identity_headers(request.headers_mut());
            if !gateway.facades.is_empty()
                && let Some(found) = gateway
                    .facades
                    .route(request.method(), request.uri().path())
            {
                let found = found?;
                // Parts are sent without a body: the client's is not read.
                let (mut client, _) = request.into_parts();
                if let Some(route_auth) = found.auth() {
                    let guard = gateway.auth.guard(route_auth)?;
                    let identity = guard
                        .check(&client.headers)
                        .await
                        .map_err(flotilla_proxy::Error::from)?;
                    identity.apply(&mut client.headers);
                }
                return Ok(bff::compose(&found, &client, parts).await?);
            }

            let entry: Arc<RouteEntry> = gateway.router.select(&request)?.clone();
            let origin = match &entry.cors {
                Some(cors) => {
                    if let Some(answer) = cors.preflight(&request) {
                        return Ok(answer?);
                    }
                    request.headers().get(ORIGIN).cloned()
                }
                None => None,
            };
            // A browser page only sees an answer with CORS headers, refusals included: those
            // become responses here rather than in the rescue layer above (gRPC calls, which
            // are never a browser's, keep their gRPC errors).
            let cors_refusals = match (&entry.cors, &origin) {
                (Some(cors), Some(_)) if !flotilla_proxy::grpc::is_grpc(request.headers()) => {
                    Some((cors, request.headers().get(X_REQUEST_ID).cloned()))
                }
                _ => None,
            };
            // The body waits apart while the checks (which may wait themselves) read the head.
            let (mut head, body) = request.into_parts();
            let answered = async {
                let identity = match &entry.guard {
                    Some(guard) => {
                        let identity = guard
                            .check(&head.headers)
                            .await
                            .map_err(flotilla_proxy::Error::from)?;
                        identity.apply(&mut head.headers);
                        Some(identity)
                    }
                    None => None,
                };
                let decision = match (&entry.quota, &gateway.limiter) {
                    (Some(quota), Some(limiter)) => {
                        Some(limit(limiter, quota, &head, identity.as_ref()).await?)
                    }
                    _ => None,
                };
                head.extensions.insert(entry.target.clone());
                let request = Request::from_parts(head, body);
                let response = inner.oneshot(request).await?;
                Ok::<_, BoxError>((response, decision))
            }
            .await;
            let (mut response, decision) = match (answered, cors_refusals) {
                (Ok(answered), _) => answered,
                (Err(error), Some((cors, request_id))) => {
                    let error = error.downcast::<flotilla_proxy::Error>()?;
                    let mut response = error.to_response(request_id.as_ref());
                    cors.decorate(origin.as_ref(), response.headers_mut());
                    return Ok(response);
                }
                (Err(error), None) => return Err(error),
            };
            let headers = response.headers_mut();
            for (name, value) in entry.deprecation.iter() {
                headers.append(name, value.clone());
            }
            if let Some(cors) = &entry.cors {
                cors.decorate(origin.as_ref(), headers);
            }
            if let Some(decision) = decision {
                decision.apply_headers(headers);
            }
            Ok(response)
        })
    }
}

/// Counts the request against the route's quota; a refusal when over it.
async fn limit(
    limiter: &RateLimiter,
    quota: &Quota,
    request: &http::request::Parts,
    identity: Option<&Identity>,
) -> Result<Decision, BoxError> {
    let peer = request
        .extensions
        .get::<ClientAddr>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |client| client.0.ip());
    let client = quota.client(
        peer,
        &request.headers,
        identity.and_then(Identity::api_key),
        identity.and_then(Identity::subject),
    );
    let decision = limiter.check(quota, client).await;
    if decision.allowed {
        Ok(decision)
    } else {
        Err(flotilla_proxy::Error::from(decision.refusal()).into())
    }
}

/// A route's prepared CORS policy and quota live on its [`RouteEntry`].
pub(crate) fn prepare(route: &flotilla_manifest::Route) -> (Option<CorsPolicy>, Option<Quota>) {
    (
        route.cors.as_ref().map(CorsPolicy::new),
        Quota::for_route(route),
    )
}
