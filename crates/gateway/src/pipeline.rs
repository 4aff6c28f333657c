//! What the gateway does to a request before the shared proxy stack takes it: pick the route
//! (prefix and API version), then the route's edge checks, then hand it to the stack below the
//! edge with its [`Target`]; on the way back, the route's response headers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use flotilla_proxy::{BoxError, ProxyBody};
use http::{Request, Response};
use tower::Service;
use tower::util::ServiceExt;

use crate::router::{RouteEntry, Router};

/// Everything the gateway knows besides the proxy stack: routes and the edge's shared state.
pub struct Gateway {
    router: Router,
}

impl Gateway {
    /// A gateway with `routes` and nothing else: no facades, no authenticators, limits kept in
    /// memory.
    pub fn from_routes(routes: &[flotilla_manifest::Route]) -> Self {
        Self {
            router: Router::new(routes),
        }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }
}

/// The gateway's service: [`Gateway`] in front of `inner`, the stack below the edge.
pub struct Pipeline<S> {
    gateway: Arc<Gateway>,
    inner: S,
}

impl<S> Pipeline<S> {
    pub fn new(gateway: Arc<Gateway>, inner: S) -> Self {
        Self { gateway, inner }
    }
}

impl<S: Clone> Clone for Pipeline<S> {
    fn clone(&self) -> Self {
        Self {
            gateway: self.gateway.clone(),
            inner: self.inner.clone(),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<Request<B>> for Pipeline<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
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
        Box::pin(async move {
            let entry: Arc<RouteEntry> = gateway.router.select(&request)?.clone();
            request.extensions_mut().insert(entry.target.clone());
            let mut response = inner.oneshot(request).await?;
            let headers = response.headers_mut();
            for (name, value) in entry.deprecation.iter() {
                headers.append(name, value.clone());
            }
            Ok(response)
        })
    }
}
