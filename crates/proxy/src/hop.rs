use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::{
    CONNECTION, HeaderName, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const TRAILERS: HeaderValue = HeaderValue::from_static("trailers");

/// Removes hop-by-hop headers (RFC 9110 §7.6.1) in both directions: they describe one
/// connection, and the proxy opens its own on each side.
#[derive(Clone, Copy, Debug, Default)]
pub struct HopByHopLayer;

impl HopByHopLayer {
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for HopByHopLayer {
    type Service = HopByHop<S>;

    fn layer(&self, inner: S) -> HopByHop<S> {
        HopByHop { inner }
    }
}

#[derive(Clone, Debug)]
pub struct HopByHop<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for HopByHop<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = HopByHopFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        strip(request.headers_mut());
        HopByHopFuture {
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    pub struct HopByHopFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, RB, E> Future for HopByHopFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = ready!(self.project().inner.poll(cx))?;
        strip(response.headers_mut());
        Poll::Ready(Ok(response))
    }
}

/// The headers that are hop-by-hop whatever Connection says.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes the hop-by-hop headers, keeping `te: trailers`: it is end-to-end in meaning (gRPC
/// needs it) and the only TE value HTTP/2 allows.
pub(crate) fn strip(headers: &mut HeaderMap) {
    // Most requests carry none of them (HTTP/1.1 keep-alive is the default); one pass over the
    // few headers present is cheaper than nine removals.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }

    // Headers named by Connection go first, while Connection is still there to name them. The
    // list is usually "keep-alive" or "close", so the Vec rarely allocates.
    let mut named = Vec::new();
    for value in headers.get_all(CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',') {
            let token = token.trim();
            if token.is_empty()
                || token.eq_ignore_ascii_case("keep-alive")
                || token.eq_ignore_ascii_case("close")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in named {
        headers.remove(name);
    }

    let wants_trailers = headers.get_all(TE).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            })
        })
    });
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if wants_trailers {
        headers.insert(TE, TRAILERS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        map
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut map = headers(&[
            ("connection", "keep-alive, X-Secret, Upgrade"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic Zm9v"),
            ("proxy-authenticate", "Basic"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("content-type", "text/plain"),
            ("x-kept", "yes"),
        ]);
        strip(&mut map);
        let mut left: Vec<_> = map.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-kept"]);
    }

    #[test]
    fn keeps_te_trailers_only() {
        let mut map = headers(&[("te", "gzip, trailers;q=1")]);
        strip(&mut map);
        assert_eq!(map[TE], "trailers");
    }
}
