use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::grpc;
use crate::problem::build;
use crate::request_id::X_REQUEST_ID;
use crate::{BoxError, Error, ProxyBody};

/// Turns every error from the layers below into a problem+json response, so the service above
/// never fails and a connection is never torn down because one request could not be proxied.
///
/// A gRPC call gets a gRPC answer instead (a trailers-only response with `grpc-status`, see
/// [`crate::grpc`]), and its `grpc-timeout` becomes the call's [`crate::resilience::Deadline`]:
/// here, at the top, so the time the edge takes counts too.
#[derive(Clone, Copy, Debug, Default)]
pub struct RescueLayer;

impl RescueLayer {
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue {
            inner,
            not_ready: None,
        }
    }
}

#[derive(Debug)]
pub struct Rescue<S> {
    inner: S,
    /// A readiness failure below (a later bulkhead or breaker may report one), answered on the
    /// next call instead of failing the connection.
    not_ready: Option<BoxError>,
}

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            not_ready: None,
        }
    }
}

impl<S, B> Service<Request<B>> for Rescue<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = RescueFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.not_ready.is_none() {
            if let Err(error) = ready!(self.inner.poll_ready(cx)) {
                self.not_ready = Some(error.into());
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let request_id = request.headers().get(X_REQUEST_ID).cloned();
        // The one thing other requests pay for gRPC: a content-type lookup.
        let grpc = grpc::is_grpc(request.headers());
        if grpc {
            grpc::set_deadline(&mut request);
        }
        match self.not_ready.take() {
            Some(error) => RescueFuture::Failed {
                error: Some(error),
                request_id,
                grpc,
            },
            None => RescueFuture::Called {
                inner: self.inner.call(request),
                request_id,
                grpc,
            },
        }
    }
}

pin_project! {
    #[project = RescueProj]
    pub enum RescueFuture<F> {
        Called { #[pin] inner: F, request_id: Option<HeaderValue>, grpc: bool },
        Failed { error: Option<BoxError>, request_id: Option<HeaderValue>, grpc: bool },
    }
}

impl<F, E> Future for RescueFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (error, request_id, grpc) = match self.project() {
            RescueProj::Called {
                inner,
                request_id,
                grpc,
            } => match ready!(inner.poll(cx)) {
                Ok(response) => return Poll::Ready(Ok(response)),
                Err(error) => (Some(error.into()), request_id, *grpc),
            },
            RescueProj::Failed {
                error,
                request_id,
                grpc,
            } => (error.take(), request_id, *grpc),
        };
        Poll::Ready(Ok(to_problem(error, request_id.as_ref(), grpc)))
    }
}

fn to_problem(
    error: Option<BoxError>,
    request_id: Option<&HeaderValue>,
    grpc: bool,
) -> Response<ProxyBody> {
    match error.map(|e| e.downcast::<Error>()) {
        Some(Ok(error)) => {
            tracing::debug!(request_id = ?request_id, "{error}");
            if grpc {
                grpc::error_response(&error, request_id)
            } else {
                error.to_response(request_id)
            }
        }
        // Something below that is not ours (a tower layer, a bug): log it whole, tell the client
        // only that the request was not delivered.
        Some(Err(error)) => {
            tracing::warn!(request_id = ?request_id, error = %error, "proxy error");
            proxy_error(request_id, grpc)
        }
        None => proxy_error(request_id, grpc),
    }
}

fn proxy_error(request_id: Option<&HeaderValue>, grpc: bool) -> Response<ProxyBody> {
    if grpc {
        return grpc::status_response(
            grpc::Code::Internal,
            "the request could not be delivered",
            request_id,
        );
    }
    build(
        "urn:flotilla:problem:proxy-error",
        StatusCode::BAD_GATEWAY,
        "Proxy error",
        "the request could not be delivered",
        request_id,
    )
}
