use std::error::Error as StdError;
use std::future::Future;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, BytesMut};
use flotilla_manifest::Protocol;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{self, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use pin_project_lite::pin_project;
use tower::Service;

use crate::balance::Picked;
use crate::{BoxError, Error, ProxyBody, ProxySettings};

/// The innermost service: sends the request to the [`Picked`] endpoint and streams the response
/// back, over a pooled keep-alive HTTP/1.1 connection, or for gRPC services over HTTP/2 with
/// prior knowledge (h2c), trailers included.
pub struct Upstream<B> {
    /// Shared so that cloning the stack per request is one reference count, not the clients'.
    clients: Arc<Clients<B>>,
}

struct Clients<B> {
    http1: Client<HttpConnector, B>,
    /// One multiplexed connection per instance; built up front, but it connects nowhere until a
    /// gRPC service is called.
    h2c: Client<HttpConnector, B>,
}

impl<B> Clone for Upstream<B> {
    fn clone(&self) -> Self {
        Self {
            clients: self.clients.clone(),
        }
    }
}

impl<B> Upstream<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    pub fn new(settings: &ProxySettings) -> Self {
        let mut connector = HttpConnector::new();
        // Requests are small and latency matters more than packet count.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_instance)
            // Without a timer the idle timeout is never enforced.
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
        // gRPC needs HTTP/2 (trailers carry the status); instances serve it without TLS, so the
        // client starts HTTP/2 at once instead of negotiating.
        let h2c = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            clients: Arc::new(Clients { http1, h2c }),
        }
    }
}

impl<B> Service<Request<B>> for Upstream<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pool has no limit to wait for; the bulkhead above is the limit.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Some(Picked {
            service,
            endpoint,
            protocol,
        }) = request.extensions_mut().remove::<Picked>()
        else {
            return UpstreamFuture::Rejected {
                error: Some(Error::NoTarget),
            };
        };
        if let Err(error) = address(&mut request, endpoint.addr, protocol) {
            return UpstreamFuture::Rejected { error: Some(error) };
        }
        let client = match protocol {
            Protocol::Http => &self.clients.http1,
            Protocol::Grpc => &self.clients.h2c,
        };
        UpstreamFuture::Sent {
            inner: client.request(request),
            service,
            instance: endpoint.instance,
        }
    }
}

/// Points the request at `addr` in the version `protocol` calls for, keeping what the client asked
/// for: its path and, over HTTP/1.1, its Host.
fn address<B>(request: &mut Request<B>, addr: SocketAddr, protocol: Protocol) -> Result<(), Error> {
    if protocol == Protocol::Grpc {
        // Over HTTP/2 the authority travels as `:authority`, which must be the instance's address
        // here (the pool is keyed by it), and a Host that differs from it is not allowed
        // (RFC 9113 §8.3.1). The gateway's `x-forwarded-host` still tells the client's host.
        request.headers_mut().remove(HOST);
    } else if !request.headers().contains_key(HOST) {
        // The instance sees the host the client used, not its own address. HTTP/2 clients and
        // absolute-form requests carry it in the URI, which is about to be replaced.
        if let Some(host) = request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            request.headers_mut().insert(HOST, host);
        }
    }
    let mut authority = BytesMut::with_capacity(48);
    // Writing to a BytesMut cannot fail.
    let _ = write!((&mut authority).writer(), "{addr}");
    let authority =
        Authority::from_maybe_shared(authority.freeze()).map_err(|_| Error::NoTarget)?;

    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *request.uri_mut() = Uri::from_parts(parts).map_err(|_| Error::NoTarget)?;
    // What the instance speaks, whatever the client spoke to the edge.
    *request.version_mut() = match protocol {
        Protocol::Http => Version::HTTP_11,
        Protocol::Grpc => Version::HTTP_2,
    };
    Ok(())
}

pin_project! {
    #[project = UpstreamProj]
    pub enum UpstreamFuture {
        Sent {
            #[pin]
            inner: legacy::ResponseFuture,
            service: Arc<str>,
            instance: Arc<str>,
        },
        Rejected { error: Option<Error> },
    }
}

impl Future for UpstreamFuture {
    type Output = Result<Response<ProxyBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            UpstreamProj::Sent {
                inner,
                service,
                instance,
            } => Poll::Ready(match ready!(inner.poll(cx)) {
                Ok(response) => {
                    Ok(response.map(|body| body.map_err(BoxError::from).boxed_unsync()))
                }
                Err(error) => {
                    tracing::warn!(
                        service = &**service,
                        instance = &**instance,
                        error = ?error,
                        "upstream request failed"
                    );
                    Err(Box::new(failure(&error, service, instance)))
                }
            }),
            UpstreamProj::Rejected { error } => {
                Poll::Ready(Err(Box::new(error.take().unwrap_or(Error::NoTarget))))
            }
        }
    }
}

/// The client-facing error for a failed exchange: 504 for a connect timeout, else 502 with a
/// short fixed reason (the full error chain is only logged).
fn failure(error: &legacy::Error, service: &Arc<str>, instance: &Arc<str>) -> Error {
    let mut reason = None;
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            reason = match io.kind() {
                io::ErrorKind::TimedOut if error.is_connect() => {
                    return Error::ConnectTimeout {
                        service: service.clone(),
                        instance: instance.clone(),
                    };
                }
                io::ErrorKind::TimedOut => Some("timed out"),
                io::ErrorKind::ConnectionRefused => Some("connection refused"),
                io::ErrorKind::ConnectionReset => Some("connection reset"),
                io::ErrorKind::ConnectionAborted => Some("connection aborted"),
                io::ErrorKind::BrokenPipe => Some("connection closed"),
                _ => reason,
            };
            if reason.is_some() {
                break;
            }
        } else if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            let found = if hyper.is_incomplete_message() || hyper.is_canceled() {
                Some("connection closed before the response")
            } else if hyper.is_parse() {
                Some("invalid response")
            } else if hyper.is_timeout() {
                Some("timed out")
            } else if hyper.is_user() {
                // Usually the client's own request body failing mid-stream.
                Some("request body failed")
            } else {
                None
            };
            // Keep looking: an io error underneath is more precise.
            reason = reason.or(found);
        }
        source = cause.source();
    }
    Error::UpstreamFailed {
        service: service.clone(),
        instance: instance.clone(),
        reason: reason.unwrap_or(if error.is_connect() {
            "could not connect"
        } else {
            "request failed"
        }),
        connect: error.is_connect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_pointed_at_the_instance_keeping_host_and_path() {
        let mut request = Request::builder()
            .uri("http://inventory/stock?sku=TEA-001")
            .version(Version::HTTP_2)
            .body(())
            .expect("request");
        address(
            &mut request,
            SocketAddr::from(([127, 0, 0, 1], 4001)),
            Protocol::Http,
        )
        .expect("addressed");
        assert_eq!(
            request.uri().to_string(),
            "http://127.0.0.1:4001/stock?sku=TEA-001"
        );
        assert_eq!(request.headers()[HOST], "inventory");
        assert_eq!(request.version(), Version::HTTP_11);
    }

    #[test]
    fn client_host_header_wins() {
        let mut request = Request::builder()
            .uri("/x")
            .header(HOST, "shop.example")
            .body(())
            .expect("request");
        address(
            &mut request,
            SocketAddr::from(([127, 0, 0, 1], 4001)),
            Protocol::Http,
        )
        .expect("addressed");
        assert_eq!(request.headers()[HOST], "shop.example");
        assert_eq!(request.uri().to_string(), "http://127.0.0.1:4001/x");
    }

    #[test]
    fn grpc_goes_over_http2_with_the_instance_as_authority() {
        let mut request = Request::builder()
            .method("POST")
            .uri("http://recommendations/shop.recommendations.v1.Recommendations/Recommend")
            .version(Version::HTTP_2)
            .header(HOST, "recommendations")
            .body(())
            .expect("request");
        address(
            &mut request,
            SocketAddr::from(([127, 0, 0, 1], 4002)),
            Protocol::Grpc,
        )
        .expect("addressed");
        assert_eq!(
            request.uri().to_string(),
            "http://127.0.0.1:4002/shop.recommendations.v1.Recommendations/Recommend"
        );
        assert_eq!(request.version(), Version::HTTP_2);
        assert!(!request.headers().contains_key(HOST));
    }
}
