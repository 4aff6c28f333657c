//! Calls to other services: one [`Dependency`] per service called, and [`CallError`] to tell an
//! answer about the request (out of stock) from a dependency that cannot answer at all.

use std::env;
use std::error::Error as _;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, Method, StatusCode};
use reqwest::{Client, RequestBuilder, Url, redirect};
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{BoxError, Problem};

/// Tracing headers passed on to every call, so that one request can be followed across services.
const TRACE_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("traceparent"),
];

/// How much of a dependency's problem detail is passed on to our own client, in characters.
const MAX_DETAIL: usize = 300;

/// The tracing headers of an incoming request, to pass on with every call it causes.
pub fn trace_headers(incoming: &HeaderMap) -> HeaderMap {
    TRACE_HEADERS
        .iter()
        .filter_map(|name| Some((name.clone(), incoming.get(name)?.clone())))
        .collect()
}

/// Another service, as seen from here: its name, its base URL and an HTTP client with a timeout.
///
/// Every call takes the headers to send along: the tracing headers of the request that caused it
/// ([`trace_headers`]), plus any of the call's own such as an `Idempotency-Key`.
///
/// The client keeps reqwest's default of honouring `HTTP_PROXY`, which is how a call to
/// `http://inventory/...` reaches the sidecar; cloning is cheap enough to hand one to a task.
#[derive(Clone)]
pub struct Dependency {
    name: Arc<str>,
    client: Client,
    base: Url,
    timeout: Duration,
}

impl Dependency {
    /// `http://<name>` (through the sidecar), or the URL in the environment variable `var` when it
    /// is set, as tests do to reach a service directly. Every call, body included, must finish
    /// within `timeout`.
    pub fn from_env(name: &str, var: &str, timeout: Duration) -> Result<Self, BoxError> {
        let raw = env::var(var)
            .ok()
            .filter(|url| !url.trim().is_empty())
            .unwrap_or_else(|| format!("http://{name}"));
        let base = Url::parse(raw.trim())
            .ok()
            .filter(|url| url.scheme() == "http" && !url.cannot_be_a_base())
            .ok_or_else(|| format!("{var} must be an http:// URL, not {raw:?}"))?;
        let client = Client::builder()
            .timeout(timeout)
            // A redirect is not part of any service's contract here: it is answered as unusable.
            .redirect(redirect::Policy::none())
            .build()?;
        Ok(Self {
            name: name.into(),
            client,
            base,
            timeout,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base URL with `segments` appended, each percent-encoded as one path segment.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        // `from_env` only accepts URLs that can be a base, so the segments are always there.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// `GET` the JSON resource at `segments`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        trace: &HeaderMap,
    ) -> Result<T, CallError> {
        self.call(Method::GET, segments, trace, |request| request)
            .await
    }

    /// `GET` the JSON resource at `segments` with the query string `query`, such as
    /// `?wait=10s` on a long poll (the dependency's timeout must exceed the wait).
    pub async fn get_query<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
        trace: &HeaderMap,
    ) -> Result<T, CallError> {
        self.call(Method::GET, segments, trace, |request| request.query(query))
            .await
    }

    /// `POST` `body` as JSON to `segments`.
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &(impl Serialize + ?Sized),
        trace: &HeaderMap,
    ) -> Result<T, CallError> {
        self.call(Method::POST, segments, trace, |request| request.json(body))
            .await
    }

    /// `POST` without a body to `segments`, e.g. an action such as `/payments/{id}/refund`.
    pub async fn post<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        trace: &HeaderMap,
    ) -> Result<T, CallError> {
        self.call(Method::POST, segments, trace, |request| request)
            .await
    }

    /// `DELETE` the resource at `segments`.
    pub async fn delete<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        trace: &HeaderMap,
    ) -> Result<T, CallError> {
        self.call(Method::DELETE, segments, trace, |request| request)
            .await
    }

    /// Sends the request and sorts the outcome: a 2xx JSON body is the answer, another 4xx is a
    /// refusal for the caller to judge, and anything else means the dependency cannot answer.
    /// Every failure but a refusal is logged here with its cause, which the client never sees.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        trace: &HeaderMap,
        build: impl FnOnce(RequestBuilder) -> RequestBuilder,
    ) -> Result<T, CallError> {
        let url = self.url(segments);
        let request =
            build(self.client.request(method.clone(), url.clone())).headers(trace.clone());
        let response = request.send().await.map_err(|err| {
            eprintln!("{method} {url} failed: {}", error_chain(&err));
            self.unreachable(&err)
        })?;
        let status = response.status();
        if status.is_success() {
            return response.json().await.map_err(|err| {
                eprintln!("{method} {url}: unusable answer: {}", error_chain(&err));
                if err.is_timeout() {
                    self.unreachable(&err)
                } else {
                    self.unavailable(
                        StatusCode::BAD_GATEWAY,
                        format!("{} answered with an unusable body", self.name),
                    )
                }
            });
        }
        let detail = problem_detail(response).await;
        if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
            return Err(CallError::Refused {
                dependency: Arc::clone(&self.name),
                status,
                detail: detail.unwrap_or_else(|| format!("answered {status}")),
            });
        }
        eprintln!(
            "{method} {url} answered {status}: {}",
            detail.as_deref().unwrap_or("(no problem detail)")
        );
        // A 5xx, or the sidecar's problem such as an open breaker or a timeout: a retry later
        // may succeed. A redirect or an informational status is a broken answer instead.
        let ours = if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::BAD_GATEWAY
        };
        let why = detail.unwrap_or_else(|| format!("{} answered {status}", self.name));
        Err(self.unavailable(ours, why))
    }

    fn unreachable(&self, err: &reqwest::Error) -> CallError {
        let why = if err.is_timeout() {
            format!(
                "{} did not answer within {}",
                self.name,
                humantime::format_duration(self.timeout)
            )
        } else {
            format!("{} could not be reached", self.name)
        };
        self.unavailable(StatusCode::SERVICE_UNAVAILABLE, why)
    }

    fn unavailable(&self, status: StatusCode, why: String) -> CallError {
        CallError::Unavailable(Problem::new(
            status,
            format!("{} unavailable: {why}", self.name),
        ))
    }
}

/// Why a call to a [`Dependency`] gave no answer.
#[derive(Debug)]
pub enum CallError {
    /// The dependency answered a 4xx of its own about this request, such as 409 out of stock or
    /// 402 declined; [`CallError::passing`] decides which ones the caller's client gets to see.
    Refused {
        dependency: Arc<str>,
        status: StatusCode,
        /// The dependency's problem detail, or the status when it gave none.
        detail: String,
    },
    /// The dependency could not answer usefully: the 503 (unreachable, timed out, 5xx, the
    /// sidecar's own problem) or 502 (a broken answer) to give the client, naming the dependency
    /// and passing on its problem's detail.
    Unavailable(Problem),
}

impl CallError {
    /// The problem for the client: a refusal with one of `statuses` is passed on as it is, with
    /// the dependency's status and detail; anything else as by `From<CallError> for Problem`.
    pub fn passing(self, statuses: &[StatusCode]) -> Problem {
        match self {
            CallError::Refused { status, detail, .. } if statuses.contains(&status) => {
                Problem::new(status, detail)
            }
            other => other.into(),
        }
    }

    /// The status the dependency refused with, if it did.
    pub fn refused_with(&self) -> Option<StatusCode> {
        match self {
            CallError::Refused { status, .. } => Some(*status),
            CallError::Unavailable(_) => None,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Refused {
                dependency,
                status,
                detail,
            } => write!(f, "{dependency} refused the call ({status}): {detail}"),
            CallError::Unavailable(problem) => write!(f, "{problem}"),
        }
    }
}

impl std::error::Error for CallError {}

/// A refusal the caller did not expect means we broke the dependency's contract, or it broke
/// ours: a 502, which the client cannot fix by retrying.
impl From<CallError> for Problem {
    fn from(err: CallError) -> Self {
        match err {
            CallError::Refused { .. } => {
                eprintln!("{err}");
                Problem::new(StatusCode::BAD_GATEWAY, err.to_string())
            }
            CallError::Unavailable(problem) => problem,
        }
    }
}

/// The `detail` of an error answer in problem+json (or any JSON object with a string `detail`),
/// shortened to [`MAX_DETAIL`] characters.
async fn problem_detail(response: reqwest::Response) -> Option<String> {
    #[derive(Deserialize)]
    struct Body {
        detail: String,
    }
    let bytes = response.bytes().await.ok()?;
    let body: Body = serde_json::from_slice(&bytes).ok()?;
    let detail = body.detail.trim();
    (!detail.is_empty()).then(|| detail.chars().take(MAX_DETAIL).collect())
}

/// The error and its causes on one line: reqwest's own message rarely says what went wrong.
fn error_chain(err: &reqwest::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A variable nobody sets, so that `from_env` falls back to its default.
    const UNSET: &str = "FLOTILLA_SHOP_TEST_UNSET_URL";

    #[test]
    fn defaults_to_the_service_name_through_the_sidecar() {
        let dep = Dependency::from_env("inventory", UNSET, Duration::from_secs(1)).unwrap();
        assert_eq!(dep.name(), "inventory");
        assert_eq!(
            dep.url(&["reservations", "res_1"]).as_str(),
            "http://inventory/reservations/res_1"
        );
    }

    #[test]
    fn appends_each_segment_as_one_encoded_segment() {
        let dep = Dependency {
            base: Url::parse("http://127.0.0.1:9/base/").unwrap(),
            ..Dependency::from_env("catalog", UNSET, Duration::from_secs(1)).unwrap()
        };
        assert_eq!(
            dep.url(&["products", "a/b c"]).as_str(),
            "http://127.0.0.1:9/base/products/a%2Fb%20c"
        );
    }

    #[test]
    fn copies_only_the_trace_headers() {
        let mut incoming = HeaderMap::new();
        incoming.insert("x-request-id", "req-1".parse().unwrap());
        incoming.insert("traceparent", "00-abc-def-01".parse().unwrap());
        incoming.insert("authorization", "Bearer secret".parse().unwrap());
        let trace = trace_headers(&incoming);
        assert_eq!(trace.len(), 2);
        assert_eq!(trace["x-request-id"], "req-1");
        assert!(!trace.contains_key("authorization"));
    }

    #[test]
    fn passes_on_only_the_expected_refusals() {
        let refused = || CallError::Refused {
            dependency: "inventory".into(),
            status: StatusCode::CONFLICT,
            detail: "insufficient stock for TEA-001".into(),
        };
        let passed = refused().passing(&[StatusCode::CONFLICT]);
        assert_eq!(passed, Problem::conflict("insufficient stock for TEA-001"));
        let unexpected = refused().passing(&[StatusCode::UNPROCESSABLE_ENTITY]);
        assert_eq!(unexpected.status, StatusCode::BAD_GATEWAY);
        assert!(unexpected.detail.starts_with("inventory refused the call"));
    }
}
