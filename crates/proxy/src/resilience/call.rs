//! The resilience layer: everything between "this request goes to service X" and "send it to
//! instance Y", in this order:
//!
//! ```text
//! deadline ┬ try 1: breaker admits? → bulkhead slot → pick instance → faults → send (per-try timeout)
//!          ├ retry budget allows? backoff with jitter
//!          └ try 2 … up to `attempts`, never past the deadline
//! ```
//!
//! The breaker is asked per try, so a breaker that opens during the retries stops them. The body
//! of a request that may be retried is buffered (up to [`MAX_REPLAY_BODY`]) so each try can send
//! it again; a larger or unknown-length body gets one try.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use flotilla_manifest::Fallback;
use flotilla_registry::{Discovery, Endpoint, Resolution};
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::breaker::Admission;
use super::bulkhead::Refusal;
use super::callee::{Callee, Outcome};
use super::{Resilience, Served, is_idempotent};
use crate::balance::Picked;
use crate::problem::build;
use crate::trace::{Caller, TraceLayer};
use crate::{BoxError, Error, ProxyBody, Target};

/// Request bodies up to this size are kept for a retry; larger ones are streamed once.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// Marks a response that a fallback or an injected fault produced, not the service.
const X_FLOTILLA_FALLBACK: &str = "x-flotilla-fallback";
const X_FLOTILLA_FAULT: &str = "x-flotilla-fault";

/// A request's own deadline, as a request extension: the call ends at the earlier of it and the
/// callee policy's `deadline`, and no try outlives it. gRPC clients set one with `grpc-timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    /// What the client asked for, for the error when it passes.
    pub timeout: Duration,
}

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self {
            at: Instant::now() + timeout,
            timeout,
        }
    }
}

/// Applies the callee's policy to each request; `caller` names the breakers it keeps.
pub struct ResilienceLayer<D> {
    shared: Arc<Shared<D>>,
}

struct Shared<D> {
    discovery: Arc<D>,
    resilience: Resilience,
    caller: Caller,
    callees: RwLock<HashMap<Arc<str>, Arc<Callee>>>,
}

impl<D> Clone for ResilienceLayer<D> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<D: Discovery> ResilienceLayer<D> {
    pub fn new(discovery: Arc<D>, resilience: Resilience, caller: impl Into<Caller>) -> Self {
        let caller = caller.into();
        Self {
            shared: Arc::new(Shared {
                discovery,
                resilience,
                caller,
                callees: RwLock::default(),
            }),
        }
    }
}

impl<D> ResilienceLayer<D> {
    pub fn caller(&self) -> &Caller {
        &self.shared.caller
    }

    /// The trace layer that reports this stack's calls.
    pub fn trace_layer(&self) -> TraceLayer {
        TraceLayer::new(
            self.shared.resilience.observer.clone(),
            self.shared.caller.clone(),
        )
    }
}

impl<S, D> Layer<S> for ResilienceLayer<D> {
    type Service = ResilienceService<S, D>;

    fn layer(&self, inner: S) -> Self::Service {
        ResilienceService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

pub struct ResilienceService<S, D> {
    inner: S,
    shared: Arc<Shared<D>>,
}

impl<S: Clone, D> Clone for ResilienceService<S, D> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

type CallFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, BoxError>> + Send>>;

impl<S, D, B> Service<Request<B>> for ResilienceService<S, D>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ProxyBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    D: Discovery,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each try clones the inner service and waits in the bulkhead, not here: one slow callee
        // must not hold up calls to the others.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        let inner = self.inner.clone();
        Box::pin(async move { shared.call(inner, request).await })
    }
}

impl<D: Discovery> Shared<D> {
    fn callee(&self, service: &Arc<str>) -> Arc<Callee> {
        if let Some(callee) = self
            .callees
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
        {
            return callee.clone();
        }
        let mut callees = self.callees.write().unwrap_or_else(|e| e.into_inner());
        callees
            .entry(service.clone())
            .or_insert_with(|| {
                Callee::new(
                    self.caller.instance.clone(),
                    service.clone(),
                    self.resilience.policies.get(service),
                    self.resilience.policies.protocol(service),
                    self.resilience.board.clone(),
                )
            })
            .clone()
    }

    async fn call<S, B>(
        self: Arc<Self>,
        mut inner: S,
        request: Request<B>,
    ) -> Result<Response<ProxyBody>, BoxError>
    where
        S: Service<Request<ReplayBody<B>>, Response = Response<ProxyBody>, Error = BoxError>,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let target = request
            .extensions()
            .get::<Target>()
            .ok_or(Error::NoTarget)?;
        let endpoints = match self.discovery.resolve(&target.service) {
            // Known services only get a callee, so invented host names cannot grow the table.
            Resolution::Unknown => return Err(Error::UnknownService(target.service.clone()).into()),
            Resolution::Endpoints(endpoints) => endpoints,
        };
        let retry_any_method = target.retry_non_idempotent;
        let route_fallback = target.fallback.clone();
        let callee = self.callee(&target.service);
        let policy = callee.policy.clone();

        let start = Instant::now();
        let mut deadline = start + policy.deadline;
        // Set when the request's own deadline is the earlier one: its timeout, for the error.
        let mut requested_timeout = None;
        if let Some(requested) = request.extensions().get::<Deadline>() {
            if requested.at < deadline {
                deadline = requested.at;
                requested_timeout = Some(requested.timeout);
            }
        }
        let idempotent = retry_any_method || is_idempotent(request.method());
        let attempts = policy.retries.attempts.get();
        let (parts, body) = request.into_parts();
        let mut body = ReplayBody::new(body, attempts > 1).await?;
        let mut parts = Some(parts);
        let mut avoid: Option<Arc<str>> = None;

        for attempt in 1..=attempts {
            let now = Instant::now();
            let ticket = match callee.admit(attempt == 1, now) {
                Admission::Allowed(ticket) => ticket,
                Admission::Rejected { retry_in } => {
                    let fallback = route_fallback.as_deref().or(policy.fallback.as_ref());
                    return match fallback {
                        Some(fallback) => {
                            served(Ok(fallback_response(fallback)), None, attempt - 1, &callee)
                        }
                        None => Err(Error::BreakerOpen {
                            service: callee.service.clone(),
                            caller: callee.caller.clone(),
                            retry_in,
                        }
                        .into()),
                    };
                }
            };
            if endpoints.is_empty() {
                callee.finish(
                    &callee.service,
                    ticket,
                    Outcome::Abandoned,
                    Duration::ZERO,
                    now,
                );
                return Err(Error::NoHealthyInstance(callee.service.clone()).into());
            }
            let try_until = (now + policy.timeout).min(deadline);
            let gives_up_after = match requested_timeout {
                Some(requested) if try_until == deadline => requested,
                _ => policy.timeout,
            };
            let last = attempt == attempts || !body.replayable();
            let request_parts = match (last, parts.as_ref()) {
                (false, Some(template)) => copy_parts(template),
                _ => match parts.take() {
                    Some(parts) => parts,
                    None => break,
                },
            };
            let request = Request::from_parts(request_parts, body.replay());
            let result = self
                .attempt(
                    &callee,
                    &mut inner,
                    request,
                    &endpoints,
                    avoid.as_deref(),
                    ticket,
                    (try_until, gives_up_after),
                )
                .await;
            let (result, instance) = result;

            let retryable = match &result {
                Ok(response) => {
                    idempotent
                        && policy
                            .retries
                            .retry_on
                            .contains(&response.status().as_u16())
                }
                Err(error) => {
                    let never_sent = error.downcast_ref::<Error>().is_some_and(Error::never_sent);
                    never_sent || idempotent
                }
            };
            if !retryable || last {
                return served(result, instance, attempt, &callee);
            }
            let backoff = jittered_backoff(&policy.retries, attempt);
            let now = Instant::now();
            if now + backoff >= deadline {
                return served(result, instance, attempt, &callee);
            }
            if !callee.withdraw(now) {
                tracing::debug!(
                    caller = &*callee.caller,
                    service = &*callee.service,
                    "retry budget spent; not retrying"
                );
                return served(result, instance, attempt, &callee);
            }
            tracing::debug!(
                caller = &*callee.caller,
                service = &*callee.service,
                attempt,
                ?backoff,
                "retrying"
            );
            avoid = instance;
            tokio::time::sleep(backoff).await;
        }
        Err(Error::NoTarget.into())
    }

    /// One try: bulkhead, instance, faults, send, all within `until`, a timeout reported as
    /// `after`. Returns the result and the instance tried.
    #[allow(clippy::too_many_arguments)]
    async fn attempt<S, B>(
        &self,
        callee: &Arc<Callee>,
        inner: &mut S,
        mut request: Request<B>,
        endpoints: &[Endpoint],
        avoid: Option<&str>,
        ticket: super::breaker::Ticket,
        (until, after): (Instant, Duration),
    ) -> (Result<Response<ProxyBody>, BoxError>, Option<Arc<str>>)
    where
        S: Service<Request<B>, Response = Response<ProxyBody>, Error = BoxError>,
    {
        let mut guard = Try {
            callee,
            ticket,
            instance: None,
            started: Instant::now(),
            done: false,
        };
        let _slot = match callee.bulkhead.enter(until).await {
            Ok(slot) => slot,
            Err(refusal) => {
                guard.finish(Outcome::Abandoned);
                let error = match refusal {
                    Refusal::Full {
                        max_concurrent,
                        max_queue,
                    } => Error::BulkheadFull {
                        service: callee.service.clone(),
                        max_concurrent,
                        max_queue,
                    },
                    Refusal::TimedOut => Error::Timeout {
                        service: callee.service.clone(),
                        after,
                    },
                };
                return (Err(error.into()), None);
            }
        };
        let endpoint = callee.pick(endpoints, avoid, Instant::now());
        guard.instance = Some(endpoint.instance.clone());
        let instance = endpoint.instance.clone();

        let injection = self
            .resilience
            .faults
            .get(&callee.service)
            .map(|faults| faults.roll())
            .unwrap_or_default();
        let result = if let Some(delay) = injection.delay {
            let delayed_until = Instant::now() + delay;
            if delayed_until >= until {
                tokio::time::sleep_until(until).await;
                Err(timeout(callee, after))
            } else {
                tokio::time::sleep_until(delayed_until).await;
                Ok(())
            }
        } else {
            Ok(())
        };
        let result = match (result, injection.abort) {
            (Err(error), _) => Err(error),
            (Ok(()), Some(status)) => Ok(fault_response(status, &callee.service)),
            (Ok(()), None) => {
                request.extensions_mut().insert(Picked {
                    service: callee.service.clone(),
                    endpoint,
                    protocol: callee.protocol,
                });
                match tokio::time::timeout_at(until, inner.call(request)).await {
                    Ok(result) => result,
                    Err(_) => Err(timeout(callee, after)),
                }
            }
        };
        let failed = match &result {
            Ok(response) => callee
                .policy
                .failure_on
                .contains(&response.status().as_u16()),
            Err(_) => true,
        };
        guard.finish(if failed {
            Outcome::Failed
        } else {
            Outcome::Succeeded
        });
        (result, Some(instance))
    }
}

/// Tags an answer with what the trace layer above reports about the call.
fn served(
    result: Result<Response<ProxyBody>, BoxError>,
    instance: Option<Arc<str>>,
    attempts: u32,
    callee: &Callee,
) -> Result<Response<ProxyBody>, BoxError> {
    result.map(|mut response| {
        response.extensions_mut().insert(Served {
            instance,
            attempts,
            breaker: callee.breaker_state(),
        });
        response
    })
}

fn timeout(callee: &Callee, after: Duration) -> BoxError {
    Error::Timeout {
        service: callee.service.clone(),
        after,
    }
    .into()
}

/// Reports a try's outcome exactly once, as abandoned when the future is dropped midway (the
/// client went away), so in-flight counts and half-open probe slots are never leaked.
struct Try<'a> {
    callee: &'a Callee,
    ticket: super::breaker::Ticket,
    instance: Option<Arc<str>>,
    started: Instant,
    done: bool,
}

impl Try<'_> {
    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let now = Instant::now();
        let instance = self
            .instance
            .clone()
            .unwrap_or_else(|| self.callee.service.clone());
        self.callee
            .finish(&instance, self.ticket, outcome, now - self.started, now);
    }
}

impl Drop for Try<'_> {
    fn drop(&mut self) {
        self.finish(Outcome::Abandoned);
    }
}

/// Full jitter: a random wait up to `backoff × 2^(attempt-1)`, capped at `max_backoff`.
fn jittered_backoff(policy: &flotilla_manifest::RetryPolicy, attempt: u32) -> Duration {
    let ceiling = policy
        .backoff
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(policy.max_backoff);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// What a try sends, leaving the extensions behind: below this layer only [`Picked`] is read.
fn copy_parts(template: &Parts) -> Parts {
    let mut request = Request::new(());
    *request.method_mut() = template.method.clone();
    *request.uri_mut() = template.uri.clone();
    *request.version_mut() = template.version;
    *request.headers_mut() = template.headers.clone();
    request.into_parts().0
}

fn fallback_response(fallback: &Fallback) -> Response<ProxyBody> {
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(fallback.body.clone()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = StatusCode::from_u16(fallback.status).unwrap_or(StatusCode::OK);
    if let Ok(content_type) = HeaderValue::from_str(&fallback.content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, content_type);
    }
    response.headers_mut().insert(
        X_FLOTILLA_FALLBACK,
        HeaderValue::from_static("breaker-open"),
    );
    response
}

fn fault_response(status: StatusCode, service: &str) -> Response<ProxyBody> {
    let mut response = build(
        "urn:flotilla:problem:fault-injected",
        status,
        "Fault injected",
        &format!("`flotilla chaos` made this call to `{service}` fail"),
        None,
    );
    response
        .headers_mut()
        .insert(X_FLOTILLA_FAULT, HeaderValue::from_static("abort"));
    response
}

/// A request body that can be sent again: kept in memory when small, streamed once otherwise.
pub enum ReplayBody<B> {
    Buffered(Option<Bytes>),
    Streaming(B),
    /// Taken by an earlier try, with nothing kept to send again.
    Spent,
}

impl<B> ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Buffers `body` when `keep` and it is small enough, else leaves it streaming.
    async fn new(body: B, keep: bool) -> Result<Self, Error> {
        if body.is_end_stream() {
            return Ok(Self::Buffered(None));
        }
        let small = body
            .size_hint()
            .upper()
            .is_some_and(|upper| upper <= MAX_REPLAY_BODY);
        if !keep || !small {
            return Ok(Self::Streaming(body));
        }
        let collected = body
            .collect()
            .await
            .map_err(|_| Error::BadRequest("the request body could not be read"))?;
        let bytes = collected.to_bytes();
        Ok(Self::Buffered((!bytes.is_empty()).then_some(bytes)))
    }

    fn replayable(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }

    /// The body for the next try.
    fn replay(&mut self) -> Self {
        match self {
            Self::Buffered(bytes) => Self::Buffered(bytes.clone()),
            _ => std::mem::replace(self, Self::Spent),
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Streaming(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Spent => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Buffered(bytes) => bytes.is_none(),
            Self::Streaming(body) => body.is_end_stream(),
            Self::Spent => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Self::Streaming(body) => body.size_hint(),
            Self::Spent => SizeHint::with_exact(0),
        }
    }
}
