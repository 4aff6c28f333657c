//! The gateway: the app's public HTTP entrance.
//!
//! It is the shared data plane ([`flotilla_proxy`]) with the edge in front: a [`Router`] that
//! maps the request path (longest prefix, whole segments) and the API version it asks for to a
//! route of the manifest's `[[gateway.routes]]`, and the route's checks. Everything after that —
//! forwarded headers, hop-by-hop stripping, rewrite, the callee's resilience policy, the pooled
//! upstream client — is the proxy stack below the edge, the same one every sidecar runs; request
//! ids and problem+json errors wrap both. [`serve`] runs it on a listener (HTTP/1.1 and h2c)
//! until shutdown, then drains.

mod pipeline;
mod router;

pub mod auth;

pub mod bff;

pub mod rate_limit;

pub mod access_log;
pub mod cors;

use std::sync::Arc;

use flotilla_proxy::resilience::ResilienceLayer;
use flotilla_proxy::{
    BodyLimitLayer, ProxySettings, RequestIdLayer, RescueLayer, Resilience, ServeSettings,
    serve_connections_with,
};
use flotilla_registry::Discovery;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::{Layer, ServiceBuilder};

use crate::access_log::AccessLogLayer;

pub use pipeline::{Gateway, PartBody, Pipeline};
pub use router::{ACCEPT_VERSION, DEPRECATION, RouteEntry, Router, SUNSET, requested_version};

/// The gateway's resilience layer: it calls services as the caller `gateway`.
pub fn resilience<D: Discovery>(discovery: Arc<D>, resilience: Resilience) -> ResilienceLayer<D> {
    ResilienceLayer::new(discovery, resilience, CALLER)
}

/// The caller name of the gateway's breakers.
pub const CALLER: &str = "gateway";

/// Serves the gateway on `listener` until `shutdown` is cancelled, then stops accepting and gives
/// in-flight requests [`flotilla_proxy::DEFAULT_DRAIN_TIMEOUT`] to finish.
///
/// `resilience` is the gateway's view of the callees (see [`resilience`]).
pub async fn serve<D: Discovery>(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    resilience: ResilienceLayer<D>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let proxy = ProxySettings::gateway();
    // One resilience layer for both: a facade's parts and proxied requests share the breakers.
    let below = flotilla_proxy::below_edge(resilience.clone(), proxy.clone());
    let parts = flotilla_proxy::below_edge::<D, PartBody>(resilience, proxy);
    let limits = &gateway.settings.limits;
    let serve = ServeSettings::edge(limits, gateway.tls.clone());
    let stack = ServiceBuilder::new()
        // Outermost, so that every response carries the id, the edge's refusals included.
        .layer(RequestIdLayer::new())
        // Every error below, the edge's refusals among them, becomes a problem response.
        .layer(RescueLayer::new())
        // Before anything reads the body: an oversized one is refused by its declared length,
        // a chunked one as soon as it passes the limit.
        .layer(BodyLimitLayer::edge(limits))
        .service(Pipeline::new(gateway.clone(), below, parts));
    match gateway.access_log.clone() {
        // Outside the request id and the rescue, so the line has the id and the final status.
        Some(log) => {
            let logged = AccessLogLayer::new(log).layer(stack);
            serve_connections_with(listener, logged, shutdown, serve).await
        }
        None => serve_connections_with(listener, stack, shutdown, serve).await,
    }
}

/// Serves like [`serve`], on `threads` threads that each run their own single-threaded runtime
/// and accept from the same listening socket (as nginx's workers do).
///
/// A connection then lives on one thread from accept to upstream: the client connection, the
/// pooled upstream connection and their tasks never hand work to another thread. With tokio's
/// work-stealing runtime the upstream connection task and the client's often sit on different
/// threads, and the cross-thread wake-ups cost more than the proxying itself.
/// The returned handle finishes when every thread has drained.
pub fn serve_threaded<D: Discovery>(
    listener: std::net::TcpListener,
    threads: std::num::NonZeroUsize,
    gateway: Arc<Gateway>,
    resilience: ResilienceLayer<D>,
    shutdown: CancellationToken,
) -> std::io::Result<ThreadedGateway> {
    listener.set_nonblocking(true)?;
    let mut handles = Vec::with_capacity(threads.get());
    for n in 0..threads.get() {
        let listener = listener.try_clone()?;
        let gateway = gateway.clone();
        // One set of breakers for all threads: the gateway is one caller.
        let resilience = resilience.clone();
        let shutdown = shutdown.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = std::thread::Builder::new()
            .name(format!("gateway-{n}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    serve(listener, gateway, resilience, shutdown).await
                })
            })?;
        handles.push(handle);
    }
    Ok(ThreadedGateway { handles })
}

/// The threads of [`serve_threaded`].
pub struct ThreadedGateway {
    handles: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl ThreadedGateway {
    /// Waits (without blocking the caller's runtime) until every thread has finished; the first
    /// error wins.
    pub async fn wait(self) -> std::io::Result<()> {
        let joined = tokio::task::spawn_blocking(move || {
            let mut first_error = Ok(());
            for handle in self.handles {
                let result = handle
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a gateway thread panicked")));
                if first_error.is_ok() {
                    first_error = result;
                }
            }
            first_error
        });
        joined.await.map_err(std::io::Error::other)?
    }
}
