//! Tracing and metrics of each call, with W3C Trace Context propagation.
//!
//! Per call from a caller (the gateway, or a service through its sidecar) to a callee, the layer
//! records two spans: a CLIENT span at the caller's side and a SERVER span at the callee's side,
//! its child. The callee gets a `traceparent` naming that server span, so the calls it makes in
//! turn — its sidecar sees the `traceparent` it passes on — become its children: one request
//! through gateway → orders → inventory is one trace of nested hops. A request without a valid
//! `traceparent` starts a trace; one whose flags say "not sampled" is passed on, unrecorded.
//!
//! Without an [`Observer`] the layer does nothing at all.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use flotilla_telemetry::{EdgeMeter, HttpHop, Span, SpanId, SpanKind, SpanStatus, TraceId};
use http::{HeaderName, HeaderValue, Method, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::resilience::Served;
use crate::{BoxError, Error, ProxyBody, Target};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Where the layer reports: spans for the trace store, calls for the metrics.
pub trait Observer: Send + Sync + 'static {
    fn span(&self, span: Span);
    /// A call ended: its answer's status (`None` when there was none), how long it took and how
    /// many retries it needed.
    fn call(
        &self,
        caller: &str,
        callee: &str,
        status: Option<u16>,
        duration: Duration,
        retries: u32,
    );
    /// Calls from `caller` to `callee` in flight changed by `delta`.
    fn in_flight(&self, caller: &str, callee: &str, delta: i64);
    /// The edge's meter, when the observer keeps one: then a call is counted through it
    /// ([`EdgeMeter::start`], [`EdgeMeter::finish`]) instead of `in_flight` and `call`, one
    /// lookup per call instead of three.
    fn meter(&self, _caller: &str, _callee: &str) -> Option<EdgeMeter> {
        None
    }
    /// The two spans of one call (the server span when an instance answered); by default one
    /// `span` each.
    fn call_spans(&self, server: Option<Span>, client: Span) {
        if let Some(server) = server {
            self.span(server);
        }
        self.span(client);
    }
}

/// Who makes the calls going through a stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The calling service (`orders`), or `gateway`.
    pub service: Arc<str>,
    /// The calling instance (`orders-2`): names the caller's breakers.
    pub instance: Arc<str>,
}

impl From<&str> for Caller {
    fn from(name: &str) -> Self {
        let name: Arc<str> = Arc::from(name);
        Self {
            service: name.clone(),
            instance: name,
        }
    }
}

/// The incoming trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent: SpanId,
    pub sampled: bool,
}

impl TraceParent {
    /// Version `00` as W3C Trace Context defines it; later versions are read by the same prefix,
    /// as the spec asks. Anything invalid is ignored (a new trace starts).
    pub fn parse(value: &HeaderValue) -> Option<Self> {
        let text = value.to_str().ok()?.trim();
        let mut parts = text.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || version == "ff" || flags.len() != 2 {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id: TraceId::parse(trace)?,
            parent: SpanId::parse(parent)?,
            sampled: flags & 1 == 1,
        })
    }

    /// `00-<trace id>-<span id>-<flags>`, written by hand: this runs on every call, and going
    /// through `fmt` costs more than the rest of the header handling together.
    fn header(trace_id: TraceId, span_id: SpanId, sampled: bool) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let hex = |out: &mut [u8], bytes: &[u8]| {
            for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
                pair[0] = HEX[usize::from(b >> 4)];
                pair[1] = HEX[usize::from(b & 15)];
            }
        };
        let mut text = [0u8; 55];
        text[..3].copy_from_slice(b"00-");
        hex(&mut text[3..35], &trace_id.0);
        text[35] = b'-';
        hex(&mut text[36..52], &span_id.0);
        text[52..].copy_from_slice(if sampled { b"-01" } else { b"-00" });
        // Hex digits and dashes only: always a valid header value.
        HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static(""))
    }
}

#[derive(Clone)]
pub struct TraceLayer {
    observer: Option<Arc<dyn Observer>>,
    caller: Caller,
}

impl TraceLayer {
    pub fn new(observer: Option<Arc<dyn Observer>>, caller: Caller) -> Self {
        Self { observer, caller }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            observer: self.observer.clone(),
            caller: self.caller.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Trace<S> {
    inner: S,
    observer: Option<Arc<dyn Observer>>,
    caller: Caller,
}

impl<S, B> Service<Request<B>> for Trace<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Some(observer) = &self.observer else {
            return TraceFuture {
                inner: self.inner.call(request),
                call: None,
            };
        };
        let Some(callee) = request
            .extensions()
            .get::<Target>()
            .map(|t| t.service.clone())
        else {
            return TraceFuture {
                inner: self.inner.call(request),
                call: None,
            };
        };
        let incoming = request
            .headers()
            .get(TRACEPARENT)
            .and_then(TraceParent::parse);
        let trace_id = incoming.map_or_else(TraceId::random, |p| p.trace_id);
        let sampled = incoming.is_none_or(|p| p.sampled);
        let client = SpanId::random();
        let server = SpanId::random();
        request
            .headers_mut()
            .insert(TRACEPARENT, TraceParent::header(trace_id, server, sampled));
        let meter = observer.meter(&self.caller.service, &callee);
        match &meter {
            Some(meter) => meter.start(),
            None => observer.in_flight(&self.caller.service, &callee, 1),
        }
        let call = Call {
            observer: observer.clone(),
            meter,
            caller: self.caller.clone(),
            callee,
            trace_id,
            parent: incoming.map(|p| p.parent),
            client,
            server,
            sampled,
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            start: SystemTime::now(),
            started: Instant::now(),
            done: false,
        };
        TraceFuture {
            inner: self.inner.call(request),
            call: Some(call),
        }
    }
}

/// One call being traced; reports exactly once, as cancelled when dropped unfinished (the client
/// went away), so the in-flight gauge never drifts.
struct Call {
    observer: Arc<dyn Observer>,
    meter: Option<EdgeMeter>,
    caller: Caller,
    callee: Arc<str>,
    trace_id: TraceId,
    parent: Option<SpanId>,
    client: SpanId,
    server: SpanId,
    sampled: bool,
    method: Method,
    path: String,
    start: SystemTime,
    started: Instant,
    done: bool,
}

/// How a call ended, as far as the spans care.
struct Ending<'a> {
    status: Option<u16>,
    served: Option<&'a Served>,
    error: Option<String>,
}

impl Call {
    fn finish(&mut self, ending: Ending<'_>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let duration = self.started.elapsed();
        let observer = &self.observer;
        let attempts = ending.served.map(|s| s.attempts);
        let retries = attempts.unwrap_or(1).saturating_sub(1);
        match &self.meter {
            Some(meter) => meter.finish(ending.status, duration, retries),
            None => {
                observer.in_flight(&self.caller.service, &self.callee, -1);
                observer.call(
                    &self.caller.service,
                    &self.callee,
                    ending.status,
                    duration,
                    retries,
                );
            }
        }
        if !self.sampled {
            return;
        }
        let method: Cow<'static, str> = match self.method.as_str() {
            "GET" => Cow::Borrowed("GET"),
            "POST" => Cow::Borrowed("POST"),
            "PUT" => Cow::Borrowed("PUT"),
            "DELETE" => Cow::Borrowed("DELETE"),
            "PATCH" => Cow::Borrowed("PATCH"),
            other => Cow::Owned(other.to_owned()),
        };
        // A 4xx is the callee answering as designed; only failures to answer count, so error
        // rates in the map and `--errors` mean the same on both sides of a hop.
        let client_failed = ending.error.is_some() || ending.status.is_some_and(|s| s >= 500);
        let client = Span {
            trace_id: self.trace_id,
            span_id: self.client,
            parent_span_id: self.parent,
            service: self.caller.service.clone(),
            instance: (self.caller.instance != self.caller.service)
                .then(|| self.caller.instance.clone()),
            name: method.clone(),
            kind: SpanKind::Client,
            start: self.start,
            duration,
            status: if client_failed {
                SpanStatus::Error
            } else {
                SpanStatus::Unset
            },
            status_message: ending.error.clone(),
            http: HttpHop {
                method: Some(method.clone()),
                // The path is on the server span; the client span names the peer instead.
                path: None,
                status: ending.status,
                peer_service: Some(self.callee.clone()),
                attempts,
                breaker: ending.served.map(|s| Cow::Borrowed(s.breaker.as_str())),
            },
            attributes: Vec::new(),
        };
        // Only a call an instance answered has a server side to show.
        let server = ending
            .served
            .filter(|s| s.instance.is_some())
            .map(|served| {
                let server_failed = ending.status.is_some_and(|s| s >= 500);
                Span {
                    trace_id: self.trace_id,
                    span_id: self.server,
                    parent_span_id: Some(self.client),
                    service: self.callee.clone(),
                    instance: served.instance.clone(),
                    name: method.clone(),
                    kind: SpanKind::Server,
                    start: self.start,
                    duration,
                    status: if server_failed {
                        SpanStatus::Error
                    } else {
                        SpanStatus::Unset
                    },
                    status_message: None,
                    http: HttpHop {
                        method: Some(method),
                        path: Some(std::mem::take(&mut self.path)),
                        status: ending.status,
                        peer_service: Some(self.caller.service.clone()),
                        attempts: None,
                        breaker: None,
                    },
                    attributes: Vec::new(),
                }
            });
        observer.call_spans(server, client);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Ending {
            status: None,
            served: None,
            error: Some("the caller went away".into()),
        });
    }
}

pin_project! {
    pub struct TraceFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F> Future for TraceFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(call) = this.call.as_mut() {
            match &result {
                Ok(response) => call.finish(Ending {
                    status: Some(response.status().as_u16()),
                    served: response.extensions().get::<Served>(),
                    error: None,
                }),
                Err(error) => {
                    let (status, message) = match error.downcast_ref::<Error>() {
                        Some(error) => (Some(error.status().as_u16()), error.to_string()),
                        None => (None, error.to_string()),
                    };
                    call.finish(Ending {
                        status,
                        served: None,
                        error: Some(message),
                    });
                }
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_and_written_per_w3c() {
        let header =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let parent = TraceParent::parse(&header).expect("valid");
        assert_eq!(
            parent.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parent.parent.to_string(), "00f067aa0ba902b7");
        assert!(parent.sampled);
        let written = TraceParent::header(parent.trace_id, parent.parent, true);
        assert_eq!(written, header);
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(
                TraceParent::parse(&HeaderValue::from_static(bad)),
                None,
                "{bad}"
            );
        }
        // A later version with more fields is read by its known prefix.
        let future =
            HeaderValue::from_static("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x");
        assert!(
            !TraceParent::parse(&future)
                .expect("forward compatible")
                .sampled
        );
    }
}
