use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use crate::future::Checked;
use crate::{BoxError, Error, Target};

/// What makes a composition of the stack a gateway or a sidecar: the decision where a request
/// goes. Called once per request, synchronously; it must not block.
pub trait Edge: Send + Sync + 'static {
    /// The request's target, or why it is refused (404 no route, 405 CONNECT, …).
    fn target<B>(&self, request: &Request<B>) -> Result<Target, Error>;
}

/// For callers that set the [`Target`] extension themselves before the stack.
#[derive(Clone, Copy, Debug, Default)]
pub struct PresetTarget;

impl Edge for PresetTarget {
    fn target<B>(&self, request: &Request<B>) -> Result<Target, Error> {
        request
            .extensions()
            .get::<Target>()
            .cloned()
            .ok_or(Error::NoTarget)
    }
}

/// Applies an [`Edge`]: inserts the [`Target`] extension or rejects the request.
#[derive(Debug)]
pub struct EdgeLayer<E> {
    edge: Arc<E>,
}

impl<E> EdgeLayer<E> {
    pub fn new(edge: E) -> Self {
        Self {
            edge: Arc::new(edge),
        }
    }
}

impl<E> Clone for EdgeLayer<E> {
    fn clone(&self) -> Self {
        Self {
            edge: self.edge.clone(),
        }
    }
}

impl<S, E> Layer<S> for EdgeLayer<E> {
    type Service = EdgeService<S, E>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeService {
            inner,
            edge: self.edge.clone(),
        }
    }
}

#[derive(Debug)]
pub struct EdgeService<S, E> {
    inner: S,
    edge: Arc<E>,
}

impl<S: Clone, E> Clone for EdgeService<S, E> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            edge: self.edge.clone(),
        }
    }
}

impl<S, E, B> Service<Request<B>> for EdgeService<S, E>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    E: Edge,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Checked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match self.edge.target(&request) {
            Ok(target) => {
                request.extensions_mut().insert(target);
                Checked::called(self.inner.call(request))
            }
            Err(error) => Checked::rejected(error),
        }
    }
}
