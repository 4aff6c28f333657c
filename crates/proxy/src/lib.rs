//! The data plane: everything that happens to a request on its way to a service instance.
//!
//! Gateway and sidecar are two compositions of this one stack. Each brings an [`Edge`] — the
//! gateway matches path routes, the sidecar reads the host name — that decides the [`Target`] of a
//! request; everything after that is shared and lives here as tower layers:
//!
//! ```text
//! request id → rescue → edge → hop-by-hop strip → forwarded headers → path rewrite
//!            → balance over Discovery → upstream client (HTTP/1.1, h2c for gRPC) → instance
//! ```
//!
//! [`stack_with_edge`] builds it (see there for why each layer sits where it does), [`stack`] is
//! the same with the target set by the caller, and [`serve_connections`] is the accept loop (HTTP/1.1
//! and h2c on one port, graceful drain) both edges run it under. The stack never fails: every error
//! below the rescue layer is a typed [`Error`] that becomes an RFC 7807 [`problem`] response carrying
//! the request's `x-request-id`.
//!
//! The edge's hygiene lives here too, for both edges to use: [`ServeSettings`] (request head size,
//! header and idle timeouts, HTTPS via [`tls`]) for [`serve_connections_with`], and
//! [`BodyLimitLayer`] (413 for large bodies, 408 for stalled ones, never buffering).
//!
//! The callee's resilience policy — deadline, retries within a budget, per-try timeout, circuit
//! breaker, bulkhead, P2C over peak-EWMA with outlier ejection, injected faults — is one layer,
//! [`resilience::ResilienceLayer`], right above the upstream client.

pub mod balance;
mod edge;
mod error;
mod forwarded;
mod future;
pub mod grpc;
mod hop;
mod limit;
mod problem;
mod request_id;
mod rescue;
pub mod resilience;
mod rewrite;
mod serve;
pub mod tls;
pub mod trace;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_manifest::Fallback;
use flotilla_registry::Discovery;
use http::{Request, Response};
use tower::{Service, ServiceBuilder};

pub use edge::{Edge, EdgeLayer, EdgeService, PresetTarget};
pub use error::{Error, Refusal};
pub use forwarded::{
    Forwarded, ForwardedLayer, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};
pub use hop::{HopByHop, HopByHopLayer};
pub use limit::{
    BODY_TIMEOUT, BODY_TOO_LARGE, BodyLimit, BodyLimitError, BodyLimitFuture, BodyLimitLayer,
    LimitedBody,
};
pub use problem::{PROBLEM_JSON, problem};
pub use request_id::{RequestId, RequestIdLayer, X_REQUEST_ID};
pub use rescue::{Rescue, RescueLayer};
pub use resilience::{BreakerEvent, BreakerState, BreakerView, Faults, Policies, Resilience};
pub use rewrite::{Rewrite, RewriteLayer, rewrite_path};
pub use serve::{
    DEFAULT_DRAIN_TIMEOUT, MIN_MAX_HEADERS, ServeSettings, serve_connections,
    serve_connections_with,
};
pub use trace::{Caller, Observer, TRACEPARENT, TraceParent};
pub use upstream::Upstream;

/// The error type inside the stack, below the rescue layer; tower's own layers use it too.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the stack returns.
///
/// Boxed so that an upstream's streaming body and a locally built problem share one type; `Unsync`
/// because hyper only needs `Send` and the upstream body is not `Sync`. One allocation per response.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Which service a request goes to and how its path is rewritten.
///
/// The [`Edge`] sets it as a request extension; the layers after it read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub service: Arc<str>,
    /// When set and the path starts with it (on a segment boundary), that prefix is replaced by
    /// [`Target::rewrite`] (or removed when there is none).
    pub strip_prefix: Option<Arc<str>>,
    pub rewrite: Option<Arc<str>>,
    /// The route allows retrying POST and PATCH too.
    pub retry_non_idempotent: bool,
    /// The route's answer while the callee's breaker is open.
    pub fallback: Option<Arc<Fallback>>,
}

impl Target {
    /// A target that sends the path unchanged.
    pub fn service(service: Arc<str>) -> Self {
        Self {
            service,
            strip_prefix: None,
            rewrite: None,
            retry_non_idempotent: false,
            fallback: None,
        }
    }
}

/// The peer address of the connection a request came in on; [`serve_connections`] inserts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// The request came in over TLS (the forwarded headers then say `proto=https`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Secure;

/// How the shared stack behaves; the gateway and the sidecar differ only in `forwarded`.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// How long to wait for an instance to accept a TCP connection before answering 504.
    pub connect_timeout: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per instance.
    pub pool_max_idle_per_instance: usize,
    /// Add `x-forwarded-*` and `forwarded` (the gateway does: it is the edge; the sidecar does not:
    /// its traffic is internal).
    pub forwarded: bool,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self::gateway()
    }
}

impl ProxySettings {
    /// Settings for the public edge: forwarded headers on.
    pub fn gateway() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_instance: 1024,
            forwarded: true,
        }
    }

    /// Settings for an instance's outbound proxy: internal traffic, no forwarded headers.
    pub fn sidecar() -> Self {
        Self {
            forwarded: false,
            ..Self::gateway()
        }
    }
}

/// The stack with the target set by the caller: requests must carry a [`Target`] extension
/// (one without gets a 500 problem). Every callee gets the default policy.
pub fn stack<D, B>(
    discovery: Arc<D>,
    settings: ProxySettings,
) -> impl Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible, Future: Send + 'static>
+ Clone
+ Send
+ Sync
+ 'static
where
    D: Discovery,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let resilience = resilience::ResilienceLayer::new(discovery, Resilience::default(), "gateway");
    stack_with_edge(resilience, settings, PresetTarget)
}

/// The shared stack behind an edge. Returns a cheap-to-clone service that never fails: every
/// error becomes a problem+json response.
///
/// `resilience` carries the discovery, the policies and the caller's breakers; stacks that share
/// one (the gateway's threads) share its breakers.
pub fn stack_with_edge<D, E, B>(
    resilience: resilience::ResilienceLayer<D>,
    settings: ProxySettings,
    edge: E,
) -> impl Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible, Future: Send + 'static>
+ Clone
+ Send
+ Sync
+ 'static
where
    D: Discovery,
    E: Edge,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    ServiceBuilder::new()
        // Outermost, so that every response leaving the stack carries the id, problems included,
        // and every layer below (and the instance) sees the same id.
        .layer(RequestIdLayer::new())
        // Below this line failure is an `Err` with a typed [`Error`]; here it becomes a problem
        // response. Nothing past this point can fail the connection.
        .layer(RescueLayer::new())
        // Where the request goes: path routes (gateway) or host name (sidecar). Under the rescue
        // layer, so a rejection (404, 405, …) is an ordinary problem with the request id.
        .layer(EdgeLayer::new(edge))
        .service(below_edge(resilience, settings))
}

/// The part of the stack below the edge: requests must carry their [`Target`]. An edge that
/// does more than pick a target (the gateway: auth, rate limits, composition) wraps this in its
/// own layer under [`RequestIdLayer`] and [`RescueLayer`], and may call it several times per
/// request (a Backend-for-Frontend route calls one target per part).
pub fn below_edge<D, B>(
    resilience: resilience::ResilienceLayer<D>,
    settings: ProxySettings,
) -> impl Service<Request<B>, Response = Response<ProxyBody>, Error = BoxError, Future: Send + 'static>
+ Clone
+ Send
+ Sync
+ 'static
where
    D: Discovery,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    ServiceBuilder::new()
        // Before the forwarded headers: a client's `Connection: x-forwarded-for` must remove the
        // client's copy, not the one we are about to add.
        .layer(HopByHopLayer::new())
        // Describes the client as the edge saw it: original Host, peer address.
        .option_layer(settings.forwarded.then(ForwardedLayer::new))
        // Once per request, not per attempt: a later retry layer below re-sends the rewritten path.
        .layer(RewriteLayer::new())
        // A client span for the caller and a server span for the callee per call, and the
        // `traceparent` that makes the callee's own calls their children. Above the retries: one
        // call, however many tries it took.
        .layer(resilience.trace_layer())
        // The callee's policy: deadline, retries, breaker, bulkhead, instance choice, faults.
        // Below the rewrite, so a retry re-sends the rewritten request; right above the client,
        // so each try picks an instance afresh.
        .layer(resilience)
        // Pooled keep-alive HTTP/1.1 to the picked instance (h2c to gRPC services), bodies and
        // trailers streamed both ways.
        .service(Upstream::new(&settings))
}
