use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::ProxyBody;
use crate::problem::build;

/// Why the data plane could not deliver a request. The rescue layer turns each into a problem
/// response; the `Display` text is its `detail`, so it names things but never leaks internals.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The gateway has no route for the path.
    #[error("no route matches `{path}`")]
    NoRoute { path: Box<str> },
    /// The edge refuses the method (the sidecar does not tunnel CONNECT).
    #[error("{reason}")]
    MethodNotAllowed {
        /// The `allow` header value.
        allow: &'static str,
        reason: &'static str,
    },
    /// A reserved feature, such as the sidecar's `flotilla` host, that a later version provides.
    #[error("{what} is not yet available")]
    NotYetAvailable { what: &'static str },
    /// The request itself is unusable, e.g. names no host at the sidecar.
    #[error("{0}")]
    BadRequest(&'static str),
    /// A request reached the stack without a [`crate::Target`]: a wiring bug, not the client's.
    #[error("the request has no target service")]
    NoTarget,
    /// A route's rewrite produced something that is not a URI path.
    #[error("the route's rewrite produced an invalid path")]
    InvalidRewrite,
    /// The name is not a service of this app.
    #[error("unknown service `{0}`")]
    UnknownService(Arc<str>),
    /// The service exists but none of its instances is healthy right now.
    #[error("no healthy instance of `{0}`")]
    NoHealthyInstance(Arc<str>),
    /// The instance refused, reset or otherwise failed the exchange.
    #[error("upstream `{service}` instance `{instance}` failed: {reason}")]
    UpstreamFailed {
        service: Arc<str>,
        instance: Arc<str>,
        /// Short and fixed, e.g. "connection refused"; the full error goes to the log only.
        reason: &'static str,
        /// No connection was made, so the instance never saw the request.
        connect: bool,
    },
    /// The instance did not accept a connection within the connect timeout.
    #[error("upstream `{service}` instance `{instance}` did not accept a connection in time")]
    ConnectTimeout {
        service: Arc<str>,
        instance: Arc<str>,
    },
    /// No answer within the callee's per-try `timeout`.
    #[error("`{service}` did not answer within {}", humantime::format_duration(*after))]
    Timeout { service: Arc<str>, after: Duration },
    /// The caller's breaker for the callee is open: the call was not made.
    #[error(
        "circuit breaker `{service}` of `{caller}` is open: calls fail fast for {}",
        humantime::format_duration(Duration::from_secs(retry_in.as_secs().max(1)))
    )]
    BreakerOpen {
        service: Arc<str>,
        caller: Arc<str>,
        retry_in: Duration,
    },
    /// Too many calls to the callee are in flight and waiting already.
    #[error(
        "bulkhead of `{service}` is full: {max_concurrent} calls in flight and {max_queue} waiting"
    )]
    BulkheadFull {
        service: Arc<str>,
        max_concurrent: u32,
        max_queue: u32,
    },
    /// The edge refuses the request on the client's account: no or bad credentials, too many
    /// requests, too large a body, a CORS origin it does not allow, an unknown API version.
    #[error("{}", .0.detail)]
    Refused(Box<Refusal>),
}

/// A refusal by an edge check (auth, rate limit, limits, CORS, versions): the problem's status,
/// kind and detail, and the headers the status calls for (`WWW-Authenticate` on a 401,
/// `Retry-After` and `RateLimit-*` on a 429, ...).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: StatusCode,
    /// The problem `type` (`urn:flotilla:problem:...`) and `title`.
    pub kind: &'static str,
    pub title: &'static str,
    /// Says what was wrong and, where it helps, what to do; never echoes secrets.
    pub detail: String,
    pub headers: http::HeaderMap,
}

impl Refusal {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            title,
            detail: detail.into(),
            headers: http::HeaderMap::new(),
        }
    }

    pub fn with_header(mut self, name: http::HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Self {
        Error::Refused(Box::new(refusal))
    }
}

impl Error {
    /// True when the instance cannot have seen the request, so sending it again is safe
    /// whatever its method.
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            Error::ConnectTimeout { .. } | Error::UpstreamFailed { connect: true, .. }
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::NoRoute { .. } => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::NotYetAvailable { .. } => StatusCode::NOT_IMPLEMENTED,
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::NoTarget | Error::InvalidRewrite => StatusCode::INTERNAL_SERVER_ERROR,
            Error::UnknownService(_) | Error::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            Error::NoHealthyInstance(_)
            | Error::BreakerOpen { .. }
            | Error::BulkheadFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::ConnectTimeout { .. } | Error::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::Refused(refusal) => refusal.status,
        }
    }

    /// The problem's `type` and `title`: one per kind, stable, so clients can branch on them.
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Error::NoRoute { .. } => ("urn:flotilla:problem:no-route", "No route"),
            Error::MethodNotAllowed { .. } => (
                "urn:flotilla:problem:method-not-allowed",
                "Method not allowed",
            ),
            Error::NotYetAvailable { .. } => (
                "urn:flotilla:problem:not-yet-available",
                "Not yet available",
            ),
            Error::BadRequest(_) => ("urn:flotilla:problem:bad-request", "Bad request"),
            Error::NoTarget => ("urn:flotilla:problem:no-target", "No target"),
            Error::InvalidRewrite => ("urn:flotilla:problem:invalid-rewrite", "Invalid rewrite"),
            Error::UnknownService(_) => ("urn:flotilla:problem:unknown-service", "Unknown service"),
            Error::NoHealthyInstance(_) => (
                "urn:flotilla:problem:no-healthy-instance",
                "No healthy instance",
            ),
            Error::UpstreamFailed { .. } => {
                ("urn:flotilla:problem:upstream-failed", "Upstream failed")
            }
            Error::ConnectTimeout { .. } => (
                "urn:flotilla:problem:upstream-timeout",
                "Upstream timed out",
            ),
            Error::Timeout { .. } => ("urn:flotilla:problem:timeout", "Timed out"),
            Error::BreakerOpen { .. } => {
                ("urn:flotilla:problem:breaker-open", "Circuit breaker open")
            }
            Error::BulkheadFull { .. } => ("urn:flotilla:problem:bulkhead-full", "Bulkhead full"),
            Error::Refused(refusal) => (refusal.kind, refusal.title),
        }
    }

    /// The problem+json response for this error.
    pub fn to_response(&self, request_id: Option<&HeaderValue>) -> Response<ProxyBody> {
        let (kind, title) = self.kind();
        let mut response = build(kind, self.status(), title, &self.to_string(), request_id);
        match self {
            // Nothing is healthy right now, but instances come back within a health interval.
            Error::NoHealthyInstance(_) | Error::BulkheadFull { .. } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Error::BreakerOpen { retry_in, .. } => {
                let seconds = retry_in.as_secs() + u64::from(retry_in.subsec_nanos() > 0);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            }
            // RFC 9110 requires `allow` on a 405.
            Error::MethodNotAllowed { allow, .. } => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            Error::Refused(refusal) => {
                for (name, value) in &refusal.headers {
                    response.headers_mut().append(name, value.clone());
                }
            }
            _ => {}
        }
        response
    }
}
