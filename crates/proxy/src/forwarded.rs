use std::io::Write as _;
use std::net::IpAddr;
use std::task::{Context, Poll};

use bytes::{BufMut, BytesMut};
use http::header::{FORWARDED, HOST, HeaderName};
use http::{HeaderMap, HeaderValue, Request};
use tower::{Layer, Service};

use crate::{ClientAddr, Secure};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The edge serves plain HTTP; TLS termination, when it comes, sets this per connection.
const HTTP: HeaderValue = HeaderValue::from_static("http");
const HTTPS: HeaderValue = HeaderValue::from_static("https");

/// Tells the instance who the client was: appends the peer to `x-forwarded-for`, sets
/// `x-forwarded-proto` and `x-forwarded-host`, and appends an RFC 7239 `forwarded` element.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardedLayer;

impl ForwardedLayer {
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for ForwardedLayer {
    type Service = Forwarded<S>;

    fn layer(&self, inner: S) -> Forwarded<S> {
        Forwarded { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Forwarded<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Forwarded<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let client = request.extensions().get::<ClientAddr>().map(|c| c.0.ip());
        // HTTP/2 clients send `:authority` instead of Host.
        let host = match request.headers().get(HOST) {
            Some(host) => Some(host.clone()),
            None => request
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let secure = request.extensions().get::<Secure>().is_some();
        add_forwarded(request.headers_mut(), client, host, secure);
        self.inner.call(request)
    }
}

fn add_forwarded(
    headers: &mut HeaderMap,
    client: Option<IpAddr>,
    host: Option<HeaderValue>,
    secure: bool,
) {
    if let Some(ip) = client {
        // One line, earlier hops first, as most frameworks read only the first line.
        let mut value = BytesMut::with_capacity(64);
        for previous in headers.get_all(X_FORWARDED_FOR) {
            value.put_slice(previous.as_bytes());
            value.put_slice(b", ");
        }
        // Writing to a BytesMut cannot fail.
        let _ = write!((&mut value).writer(), "{ip}");
        if let Ok(value) = HeaderValue::from_maybe_shared(value.freeze()) {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    headers.insert(X_FORWARDED_PROTO, if secure { HTTPS } else { HTTP });

    let mut element = BytesMut::with_capacity(96);
    match client {
        // RFC 7239: IPv6 is bracketed and, having colons, quoted.
        Some(IpAddr::V6(ip)) => {
            let _ = write!((&mut element).writer(), "for=\"[{ip}]\"");
        }
        Some(IpAddr::V4(ip)) => {
            let _ = write!((&mut element).writer(), "for={ip}");
        }
        None => element.put_slice(b"for=unknown"),
    }
    element.put_slice(if secure {
        b";proto=https"
    } else {
        b";proto=http"
    });
    if let Some(host) = &host {
        put_host(&mut element, host.as_bytes());
    }
    if let Ok(element) = HeaderValue::from_maybe_shared(element.freeze()) {
        // A separate line is the same list as a comma-joined one, and keeps earlier hops intact.
        headers.append(FORWARDED, element);
    }
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// `;host=` as a token when it is one, else as a quoted-string (a port's colon needs quoting);
/// left out when it could be neither.
fn put_host(element: &mut BytesMut, host: &[u8]) {
    let is_tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if host.is_empty() {
        return;
    }
    if host.iter().all(is_tchar) {
        element.put_slice(b";host=");
        element.put_slice(host);
    } else if host
        .iter()
        .all(|b| b.is_ascii_graphic() && *b != b'"' && *b != b'\\')
    {
        element.put_slice(b";host=\"");
        element.put_slice(host);
        element.put_u8(b'"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(headers: &HeaderMap) -> Vec<&str> {
        headers
            .get_all(FORWARDED)
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect()
    }

    #[test]
    fn first_hop() {
        let mut headers = HeaderMap::new();
        add_forwarded(
            &mut headers,
            Some("10.0.0.7".parse().expect("ip")),
            Some(HeaderValue::from_static("shop.example")),
            false,
        );
        assert_eq!(headers[X_FORWARDED_FOR], "10.0.0.7");
        assert_eq!(headers[X_FORWARDED_PROTO], "http");
        assert_eq!(headers[X_FORWARDED_HOST], "shop.example");
        assert_eq!(
            forwarded(&headers),
            ["for=10.0.0.7;proto=http;host=shop.example"]
        );
    }

    #[test]
    fn later_hop_appends_and_quotes() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        headers.insert(FORWARDED, HeaderValue::from_static("for=1.1.1.1"));
        add_forwarded(
            &mut headers,
            Some("::1".parse().expect("ip")),
            Some(HeaderValue::from_static("localhost:8080")),
            false,
        );
        assert_eq!(headers[X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, ::1");
        assert_eq!(
            forwarded(&headers),
            [
                "for=1.1.1.1",
                "for=\"[::1]\";proto=http;host=\"localhost:8080\""
            ]
        );
    }

    #[test]
    fn without_client_or_host() {
        let mut headers = HeaderMap::new();
        add_forwarded(&mut headers, None, None, false);
        assert!(!headers.contains_key(X_FORWARDED_FOR));
        assert!(!headers.contains_key(X_FORWARDED_HOST));
        assert_eq!(forwarded(&headers), ["for=unknown;proto=http"]);
    }

    #[test]
    fn over_tls_the_proto_is_https() {
        let mut headers = HeaderMap::new();
        add_forwarded(&mut headers, None, None, true);
        assert_eq!(headers[X_FORWARDED_PROTO], "https");
        assert_eq!(forwarded(&headers), ["for=unknown;proto=https"]);
    }
}
