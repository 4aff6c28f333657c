//! CORS for routes with `cors = { ... }`: the gateway answers browsers' preflight requests
//! itself and adds the `Access-Control-*` headers to actual responses.
//!
//! A [`CorsPolicy`] is built once per route, with every header value it can send already made,
//! so answering a request allocates nothing beyond the response itself.
//!
//! A disallowed origin gets no `Access-Control-Allow-Origin` on an actual request: the request
//! still reaches the service (a browser sends simple requests without asking first), but the
//! browser withholds the response from the page. Preflights from a disallowed origin, or for a
//! method or header the route does not allow, are answered 403 and never reach the service.

use bytes::Bytes;
use flotilla_manifest::Cors;
use flotilla_proxy::{Error, ProxyBody, Refusal};
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};

/// The problem type of a refused preflight.
pub const CORS_REFUSED: &str = "urn:flotilla:problem:cors-origin";

/// Client-sent values echoed in a 403 are cut to this many bytes.
const MAX_ECHOED: usize = 128;

/// One route's `cors`, ready to answer.
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    /// `origins = ["*"]`.
    any_origin: bool,
    /// Exact origins, compared ignoring ASCII case (scheme and host are case-insensitive).
    origins: Box<[Box<str>]>,
    methods: Box<[Box<str>]>,
    /// Lower-case.
    headers: Box<[Box<str>]>,
    credentials: bool,
    allow_methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: HeaderValue,
    /// The methods and headers, for the 403's detail.
    methods_list: Box<str>,
    headers_list: Box<str>,
}

const TRUE: HeaderValue = HeaderValue::from_static("true");
const ANY: HeaderValue = HeaderValue::from_static("*");
const VARY_ORIGIN: HeaderValue = HeaderValue::from_static("origin");
/// A preflight's answer depends on what it asks for, too.
const VARY_PREFLIGHT: HeaderValue = HeaderValue::from_static(
    "origin, access-control-request-method, access-control-request-headers",
);

impl CorsPolicy {
    /// The policy for a route's validated `cors` (names are tokens, so the header values are
    /// valid; anything that is not is left out rather than failing).
    pub fn new(cors: &Cors) -> Self {
        let any_origin = cors.origins.iter().any(|origin| origin == "*");
        let methods_list = cors.methods.join(", ");
        let headers_list = cors.headers.join(", ");
        let list = |items: &[String]| {
            (!items.is_empty())
                .then(|| HeaderValue::from_str(&items.join(", ")).ok())
                .flatten()
        };
        Self {
            any_origin,
            origins: cors
                .origins
                .iter()
                .filter(|origin| *origin != "*")
                .map(|origin| origin.as_str().into())
                .collect(),
            methods: cors.methods.iter().map(|m| m.as_str().into()).collect(),
            headers: cors
                .headers
                .iter()
                .map(|h| h.to_ascii_lowercase().into())
                .collect(),
            credentials: cors.credentials,
            allow_methods: HeaderValue::from_str(&methods_list)
                .unwrap_or(HeaderValue::from_static("GET, HEAD, POST")),
            allow_headers: list(&cors.headers),
            expose: list(&cors.expose),
            max_age: HeaderValue::from(cors.max_age.as_secs()),
            methods_list: methods_list.into(),
            headers_list: headers_list.into(),
        }
    }

    fn allows_origin(&self, origin: &HeaderValue) -> bool {
        self.any_origin
            || self
                .origins
                .iter()
                .any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
    }

    /// The `Access-Control-Allow-Origin` for an allowed `origin`: `*` when any origin may call
    /// without credentials (the same for everyone, so caches need not vary), else the origin
    /// itself.
    fn allow_origin(&self, origin: &HeaderValue) -> HeaderValue {
        if self.any_origin && !self.credentials {
            ANY
        } else {
            origin.clone()
        }
    }

    /// Answers a preflight: `None` when `request` is not one (it goes on to the service), else
    /// a 204 with the allow headers, or a 403 [`Error::Refused`] saying what is not allowed.
    ///
    /// A preflight is an `OPTIONS` with both `Origin` and `Access-Control-Request-Method`; a
    /// plain `OPTIONS` is the service's business.
    pub fn preflight<B>(&self, request: &Request<B>) -> Option<Result<Response<ProxyBody>, Error>> {
        if request.method() != Method::OPTIONS {
            return None;
        }
        let headers = request.headers();
        let origin = headers.get(ORIGIN)?;
        let method = headers.get(ACCESS_CONTROL_REQUEST_METHOD)?;
        Some(self.answer_preflight(origin, method, headers))
    }

    fn answer_preflight(
        &self,
        origin: &HeaderValue,
        method: &HeaderValue,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, Error> {
        if !self.allows_origin(origin) {
            return Err(refused(format!(
                "origin `{}` may not call this route from a browser",
                echo(origin)
            )));
        }
        // Methods are case-sensitive tokens (fetch normalises the usual ones to upper case).
        if !self
            .methods
            .iter()
            .any(|allowed| allowed.as_bytes() == method.as_bytes())
        {
            return Err(refused(format!(
                "method `{}` is not allowed from browsers on this route (allowed: {})",
                echo(method),
                self.methods_list
            )));
        }
        for requested in headers.get_all(ACCESS_CONTROL_REQUEST_HEADERS) {
            let Ok(requested) = requested.to_str() else {
                return Err(refused("the requested headers are not valid".to_owned()));
            };
            for name in requested.split(',').map(str::trim) {
                if name.is_empty() {
                    continue;
                }
                if !self
                    .headers
                    .iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(name))
                {
                    let allowed = if self.headers_list.is_empty() {
                        "none".into()
                    } else {
                        self.headers_list.to_string()
                    };
                    return Err(refused(format!(
                        "header `{}` is not allowed from browsers on this route (allowed: {allowed})",
                        cut(name)
                    )));
                }
            }
        }

        let mut response = Response::new(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *response.status_mut() = StatusCode::NO_CONTENT;
        let out = response.headers_mut();
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, self.allow_origin(origin));
        out.insert(ACCESS_CONTROL_ALLOW_METHODS, self.allow_methods.clone());
        if let Some(allow_headers) = &self.allow_headers {
            out.insert(ACCESS_CONTROL_ALLOW_HEADERS, allow_headers.clone());
        }
        if self.credentials {
            out.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE);
        }
        out.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        out.append(VARY, VARY_PREFLIGHT);
        Ok(response)
    }

    /// Adds the CORS headers to the response of an actual (non-preflight) request that came
    /// with `origin`. They replace any the service set itself. A disallowed origin gets none:
    /// the browser then keeps the response from the page.
    pub fn decorate(&self, origin: Option<&HeaderValue>, response_headers: &mut HeaderMap) {
        let varies = !self.any_origin || self.credentials;
        if varies {
            // Whatever the origin, the answer depends on it: a cache must not hand one
            // origin's answer to another (or to a request without one).
            response_headers.append(VARY, VARY_ORIGIN);
        }
        let Some(origin) = origin.filter(|origin| self.allows_origin(origin)) else {
            return;
        };
        response_headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, self.allow_origin(origin));
        if self.credentials {
            response_headers.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE);
        }
        if let Some(expose) = &self.expose {
            response_headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}

fn refused(detail: String) -> Error {
    Refusal::new(
        StatusCode::FORBIDDEN,
        CORS_REFUSED,
        "CORS request not allowed",
        detail,
    )
    .into()
}

fn echo(value: &HeaderValue) -> &str {
    cut(value.to_str().unwrap_or("(not text)"))
}

fn cut(text: &str) -> &str {
    if text.len() <= MAX_ECHOED {
        return text;
    }
    let mut end = MAX_ECHOED;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
