use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;
use tower::util::{Oneshot, ServiceExt};

use crate::{ClientAddr, ProxyBody};

/// How long in-flight requests get to finish after shutdown before their connections are closed.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// After an accept error such as EMFILE, retrying at once would spin; a short pause lets
/// connections close and free descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The accept loop both edges run: HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same
/// port, each request tagged with its [`ClientAddr`] and handed to `service`.
///
/// When `shutdown` is cancelled the listener is closed at once, idle connections are closed,
/// in-flight requests get `drain_timeout` to finish, and whatever is left is then dropped.
pub async fn serve_connections<S>(
    listener: TcpListener,
    service: S,
    shutdown: CancellationToken,
    drain_timeout: Duration,
) -> io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The timers enable hyper's header-read timeout (a slow client cannot hold a connection
    // forever before sending a request) and HTTP/2 keep-alive.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    let abandon = CancellationToken::new();
    tracing::debug!(addr = ?listener.local_addr().ok(), "serving");

    loop {
        let (stream, peer) = tokio::select! {
            // Shutdown first: once cancelled, no new connection is taken even if some are queued.
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if per_connection(&error) => continue,
                Err(error) => {
                    tracing::warn!(%error, "accept failed; retrying shortly");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %peer, "could not set TCP_NODELAY");
        }
        let service = PerConnection {
            inner: service.clone(),
            client: ClientAddr(peer),
        };
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let abandon = abandon.clone();
        connections.spawn(async move {
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = watcher.watch(connection) => {
                    // Clients going away mid-request are routine, not worth more than debug.
                    if let Err(error) = result {
                        tracing::debug!(%peer, error = %error, "connection ended with an error");
                    }
                }
                () = abandon.cancelled() => {}
            }
        });
    }

    drop(listener);
    connections.close();
    let open = graceful.count();
    if open > 0 {
        tracing::debug!(open, "draining connections");
    }
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain_timeout,
            "requests still in flight after the drain timeout; closing their connections"
        );
        abandon.cancel();
    }
    connections.wait().await;
    Ok(())
}

/// Errors that concern one connection that never got going, not the listener.
fn per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// The service as one connection sees it: every request carries the connection's peer address.
#[derive(Clone)]
struct PerConnection<S> {
    inner: S,
    client: ClientAddr,
}

impl<S> hyper::service::Service<Request<Incoming>> for PerConnection<S>
where
    S: Service<Request<Incoming>> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Oneshot<S, Request<Incoming>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.client);
        // `oneshot` waits for readiness, so a layer that applies backpressure (a bulkhead) works.
        self.inner.clone().oneshot(request)
    }
}
