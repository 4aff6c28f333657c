//! How large and how slow a request body may be. The body is never buffered: it is counted as
//! it streams to the instance.
//!
//! A declared `Content-Length` above the limit is refused at once (413) — nothing is read and
//! the instance never sees the request. A body without a declared length (chunked, HTTP/2) is
//! counted frame by frame; crossing the limit fails the body, which aborts the upstream
//! request, and the client gets 413 unless the instance's response had already begun. A body
//! that pauses longer than the body timeout between two frames fails the same way with 408.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use flotilla_manifest::EdgeLimits;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::{BoxError, Error, ProxyBody, Refusal};

/// The problem type of a 413.
pub const BODY_TOO_LARGE: &str = "urn:flotilla:problem:body-too-large";
/// The problem type of a 408 for a stalled body.
pub const BODY_TIMEOUT: &str = "urn:flotilla:problem:body-timeout";

/// Limits request bodies to `max_body` bytes and `body_timeout` between frames.
///
/// Place it under the [`crate::RescueLayer`] (its refusals are errors that become problems
/// with the request id) and above everything that reads the body.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimitLayer {
    max_body: u64,
    body_timeout: Duration,
}

impl BodyLimitLayer {
    pub fn new(max_body: u64, body_timeout: Duration) -> Self {
        Self {
            max_body,
            body_timeout,
        }
    }

    /// The manifest's `max_body` and `body_timeout`.
    pub fn edge(limits: &EdgeLimits) -> Self {
        Self::new(limits.max_body, limits.body_timeout)
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            limits: *self,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BodyLimit<S> {
    inner: S,
    limits: BodyLimitLayer,
}

impl<S, B> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<LimitedBody<B>>, Response = Response<ProxyBody>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = BodyLimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limits = self.limits;
        let version = request.version();
        if declared_length(request.headers()).is_some_and(|length| length > limits.max_body) {
            return BodyLimitFuture::Refused {
                refusal: Some(too_large(limits.max_body, version)),
            };
        }
        let (parts, body) = request.into_parts();
        // A request without a body (most GETs) costs nothing more.
        let verdict = (!body.is_end_stream()).then(|| Arc::new(AtomicU8::new(FINE)));
        let body = LimitedBody {
            inner: body,
            max_body: limits.max_body,
            remaining: limits.max_body,
            body_timeout: limits.body_timeout,
            timer: None,
            armed: false,
            verdict: verdict.clone(),
        };
        BodyLimitFuture::Called {
            inner: self.inner.call(Request::from_parts(parts, body)),
            verdict,
            limits,
            version,
        }
    }
}

/// A valid `Content-Length` (hyper and h2 have already refused invalid ones).
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

const FINE: u8 = 0;
const TOO_LARGE: u8 = 1;
const TIMED_OUT: u8 = 2;

fn too_large(max_body: u64, version: Version) -> Error {
    let refusal = Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        BODY_TOO_LARGE,
        "Request body too large",
        format!(
            "the request body is larger than the limit of {} bytes ({})",
            max_body,
            human_size(max_body)
        ),
    );
    closing(refusal, version).into()
}

fn timed_out(body_timeout: Duration, version: Version) -> Error {
    let refusal = Refusal::new(
        StatusCode::REQUEST_TIMEOUT,
        BODY_TIMEOUT,
        "Request body too slow",
        format!(
            "the request body paused for longer than {}",
            humantime::format_duration(body_timeout)
        ),
    );
    closing(refusal, version).into()
}

/// The rest of the body is never read, so an HTTP/1 connection cannot carry another request.
fn closing(refusal: Refusal, version: Version) -> Refusal {
    if version <= Version::HTTP_11 {
        refusal.with_header(header::CONNECTION, HeaderValue::from_static("close"))
    } else {
        refusal
    }
}

/// `8388608` as `8 MiB`, for messages.
fn human_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (scale, unit) in UNITS {
        if bytes >= scale {
            let value = bytes as f64 / scale as f64;
            return if bytes % scale == 0 {
                format!("{} {unit}", bytes / scale)
            } else {
                format!("{value:.1} {unit}")
            };
        }
    }
    format!("{bytes} B")
}

pin_project! {
    #[project = BodyLimitProj]
    pub enum BodyLimitFuture<F> {
        Called {
            #[pin]
            inner: F,
            verdict: Option<Arc<AtomicU8>>,
            limits: BodyLimitLayer,
            version: Version,
        },
        Refused { refusal: Option<Error> },
    }
}

impl<F, E> Future for BodyLimitFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ProxyBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BodyLimitProj::Called {
                inner,
                verdict,
                limits,
                version,
            } => {
                let result = ready!(inner.poll(cx));
                // Whatever the layers below made of the failed body (a 502 from the upstream
                // client, a 400 from a retry buffer), the client's body is why.
                let refusal = match verdict.as_ref().map(|v| v.load(Ordering::Acquire)) {
                    Some(TOO_LARGE) => too_large(limits.max_body, *version),
                    Some(TIMED_OUT) => timed_out(limits.body_timeout, *version),
                    _ => return Poll::Ready(result.map_err(Into::into)),
                };
                Poll::Ready(Err(Box::new(refusal)))
            }
            BodyLimitProj::Refused { refusal } => Poll::Ready(Err(Box::new(
                refusal
                    .take()
                    .unwrap_or(Error::BadRequest("request refused")),
            ))),
        }
    }
}

/// A request body counted and timed as it streams.
pub struct LimitedBody<B> {
    inner: B,
    max_body: u64,
    remaining: u64,
    body_timeout: Duration,
    /// Made on the first wait for the client, then reset: one allocation per body that ever
    /// has to wait.
    timer: Option<Pin<Box<Sleep>>>,
    /// The timer runs for the current wait.
    armed: bool,
    /// Shared with the response future, which answers for the body; `None` for an empty body.
    verdict: Option<Arc<AtomicU8>>,
}

/// Why a [`LimitedBody`] stopped; the client sees a 413 or 408 problem instead.
#[derive(Debug, thiserror::Error)]
pub enum BodyLimitError {
    #[error("the request body exceeds {0} bytes")]
    TooLarge(u64),
    #[error("the request body paused for longer than {0:?}")]
    TimedOut(Duration),
}

impl<B> Body for LimitedBody<B>
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
        let this = self.get_mut();
        let Some(verdict) = &this.verdict else {
            return Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into);
        };
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                if let Some(data) = frame.data_ref() {
                    let length = data.len() as u64;
                    if length > this.remaining {
                        verdict.store(TOO_LARGE, Ordering::Release);
                        return Poll::Ready(Some(Err(Box::new(BodyLimitError::TooLarge(
                            this.max_body,
                        )))));
                    }
                    this.remaining -= length;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if !this.armed {
                    let deadline = Instant::now() + this.body_timeout;
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.armed = true;
                }
                if let Some(timer) = &mut this.timer
                    && timer.as_mut().poll(cx).is_ready()
                {
                    this.armed = false;
                    verdict.store(TIMED_OUT, Ordering::Release);
                    return Poll::Ready(Some(Err(Box::new(BodyLimitError::TimedOut(
                        this.body_timeout,
                    )))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(8 << 20), "8 MiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(100), "100 B");
    }
}
