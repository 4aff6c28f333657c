use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use flotilla_manifest::EdgeLimits;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;
use tower::util::{Oneshot, ServiceExt};

use crate::{ClientAddr, ProxyBody, Secure};

/// How long in-flight requests get to finish after shutdown before their connections are closed.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// hyper's smallest HTTP/1 read buffer: a request head limit below it would make hyper panic.
pub const MIN_MAX_HEADERS: usize = 8 << 10;

/// After an accept error such as EMFILE, retrying at once would spin; a short pause lets
/// connections close and free descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How a listener treats its clients: how large and how slow they may be, and whether they
/// speak TLS.
#[derive(Clone, Debug)]
pub struct ServeSettings {
    /// The largest request head (request line and headers), in bytes: HTTP/1.1 clients get 431
    /// beyond it, HTTP/2 streams a 431 or a reset. Raised to [`MIN_MAX_HEADERS`] if lower.
    pub max_headers: usize,
    /// A new connection must deliver its first request head within this (a TLS handshake gets
    /// as long again), and a request head that has started to arrive must be complete within
    /// this; otherwise the connection is closed (slowloris).
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// How long in-flight requests get to finish after shutdown.
    pub drain_timeout: Duration,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// How often an HTTP/2 connection is pinged to find peers that vanished without closing it;
    /// one that does not answer within the same time is closed.
    pub http2_keep_alive_interval: Duration,
    /// Serve HTTPS with this configuration (see [`crate::tls::server_config`]) instead of
    /// plain HTTP/1.1 and h2c.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServeSettings {
    /// The manifest's default [`EdgeLimits`], plain HTTP.
    fn default() -> Self {
        Self::edge(&EdgeLimits::default(), None)
    }
}

impl ServeSettings {
    /// Settings for a gateway with the manifest's `limits` and, when set, TLS.
    pub fn edge(limits: &EdgeLimits, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        Self {
            max_headers: usize::try_from(limits.max_headers).unwrap_or(usize::MAX),
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            http2_max_concurrent_streams: 256,
            http2_keep_alive_interval: Duration::from_secs(20),
            tls,
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let max_headers = self.max_headers.max(MIN_MAX_HEADERS);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // hyper's own header timer also runs while a keep-alive connection waits for its
            // next request, which would cut idle connections at `header_timeout`; the
            // connection watchdog below tells the two waits apart instead.
            .header_read_timeout(None)
            // A head that does not fit the read buffer is answered 431 by hyper.
            .max_buf_size(max_headers);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(max_headers).unwrap_or(u32::MAX))
            .max_concurrent_streams(self.http2_max_concurrent_streams)
            .keep_alive_interval(self.http2_keep_alive_interval)
            .keep_alive_timeout(self.http2_keep_alive_interval);
        builder
    }
}

/// The accept loop both edges run: HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same
/// port, each request tagged with its [`ClientAddr`] and handed to `service`, with the default
/// [`ServeSettings`] (the sidecar's and the control API's entry point).
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
    let settings = ServeSettings {
        drain_timeout,
        ..ServeSettings::default()
    };
    serve_connections_with(listener, service, shutdown, settings).await
}

/// [`serve_connections`] with explicit limits, timeouts and optionally TLS (HTTP/2 and
/// HTTP/1.1 chosen by ALPN).
pub async fn serve_connections_with<S>(
    listener: TcpListener,
    service: S,
    shutdown: CancellationToken,
    settings: ServeSettings,
) -> io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = Arc::new(settings.builder());
    let tls = settings.tls.clone().map(TlsAcceptor::from);
    let timeouts = Timeouts {
        header: settings.header_timeout,
        idle: settings.idle_timeout,
    };
    let connections = TaskTracker::new();
    let abandon = CancellationToken::new();
    tracing::debug!(addr = ?listener.local_addr().ok(), tls = tls.is_some(), "serving");

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
        let connection = Connection {
            builder: builder.clone(),
            tls: tls.clone(),
            timeouts,
            peer,
            shutdown: shutdown.clone(),
            abandon: abandon.clone(),
        };
        connections.spawn(connection.run(stream, service.clone()));
    }

    drop(listener);
    connections.close();
    if !connections.is_empty() {
        tracing::debug!(open = connections.len(), "draining connections");
    }
    if tokio::time::timeout(settings.drain_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_timeout = ?settings.drain_timeout,
            "requests still in flight after the drain timeout; closing their connections"
        );
        abandon.cancel();
        connections.wait().await;
    }
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

#[derive(Clone, Copy, Debug)]
struct Timeouts {
    header: Duration,
    idle: Duration,
}

/// One accepted connection and what it needs to be served and stopped.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<TlsAcceptor>,
    timeouts: Timeouts,
    peer: SocketAddr,
    /// Cancelled on shutdown: finish the requests in flight, then close.
    shutdown: CancellationToken,
    /// Cancelled when the drain timeout has passed: close now.
    abandon: CancellationToken,
}

impl Connection {
    async fn run<S>(self, stream: TcpStream, service: S)
    where
        S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Some(acceptor) = self.tls.clone() else {
            return self.serve(stream, service, false).await;
        };
        // A client that connects and never finishes its handshake would otherwise hold the
        // socket for as long as it likes.
        let handshake = tokio::time::timeout(self.timeouts.header, acceptor.accept(stream));
        let stream = tokio::select! {
            handshake = handshake => match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(peer = %self.peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                    return;
                }
            },
            () = self.shutdown.cancelled() => return,
        };
        self.serve(stream, service, true).await;
    }

    async fn serve<I, S>(self, io: I, service: S, secure: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let peer = self.peer;
        let activity = Arc::new(Activity::default());
        let service = PerConnection {
            inner: service,
            client: ClientAddr(peer),
            secure,
            activity: activity.clone(),
        };
        let io = TokioIo::new(Watched {
            io,
            activity: activity.clone(),
        });
        let mut connection = pin!(self.builder.serve_connection(io, service));
        let mut watchdog = pin!(activity.expired(self.timeouts));
        let mut closing = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    // Clients going away mid-request are routine, not worth more than debug.
                    if let Err(error) = result {
                        tracing::debug!(%peer, error = %error, "connection ended with an error");
                    }
                    return;
                }
                () = self.shutdown.cancelled(), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                expired = watchdog.as_mut(), if !closing => match expired {
                    // Nothing is in flight: hyper closes at once (HTTP/1) or says GOAWAY (HTTP/2).
                    Expired::Idle => {
                        tracing::debug!(%peer, "keep-alive connection idle; closing");
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    Expired::Head => {
                        tracing::debug!(%peer, "no complete request head in time; closing");
                        return;
                    }
                },
                () = self.abandon.cancelled() => return,
            }
        }
    }
}

/// What a connection is doing, as far as its timeouts care.
///
/// Requests only record what happened (a few atomics, a clock read when a wait begins); the
/// watchdog reads it when it wakes. It never needs waking early: it looks again at least every
/// shorter of the two timeouts, and a wait's deadline is counted from when the wait began, so
/// each timeout still ends exactly on time.
struct Activity {
    /// When the connection was accepted; `since_us` counts from here.
    epoch: Instant,
    /// Requests handed to the service whose response head has not been produced yet.
    in_flight: AtomicUsize,
    /// Requests handed to the service so far; a change means the connection was busy even if
    /// the watchdog never saw `in_flight` above zero.
    started: AtomicU64,
    /// Bytes arrived while no request was in flight: the next request head is on its way.
    reading: AtomicBool,
    /// HTTP/2 clients send pings and window updates between requests, so bytes arriving say
    /// nothing about a request head.
    http2: AtomicBool,
    /// When the current wait began, in microseconds since `epoch`: the connection's start,
    /// the last answer, or the first byte of a head after an idle wait.
    since_us: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            reading: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            since_us: AtomicU64::new(0),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head: the first on a new connection, or one that
    /// has started to arrive.
    Head,
    /// A request is being answered.
    Busy,
    /// Keep-alive, nothing asked.
    Idle,
}

#[derive(Debug, PartialEq, Eq)]
enum Expired {
    Head,
    Idle,
}

impl Activity {
    /// The phase, the requests started and when the wait began.
    fn phase(&self) -> (Phase, u64, u64) {
        let started = self.started.load(Ordering::Acquire);
        let since = self.since_us.load(Ordering::Acquire);
        let phase = if self.in_flight.load(Ordering::Acquire) > 0 {
            Phase::Busy
        } else if started == 0
            || (self.reading.load(Ordering::Acquire) && !self.http2.load(Ordering::Relaxed))
        {
            Phase::Head
        } else {
            Phase::Idle
        };
        (phase, started, since)
    }

    fn wait_begins(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.since_us.store(now, Ordering::Release);
    }

    /// Called on every read that returned data: only the first one after going idle counts.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && !self.reading.load(Ordering::Relaxed) {
            self.wait_begins();
            self.reading.store(true, Ordering::Release);
        }
    }

    fn request_started(&self, version: Version) {
        if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.reading.store(false, Ordering::Release);
        self.started.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    fn request_answered(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wait_begins();
        }
    }

    /// Resolves when the connection has spent too long in the head or idle phase.
    async fn expired(&self, timeouts: Timeouts) -> Expired {
        loop {
            let seen = self.phase();
            let (phase, _, since_us) = seen;
            let since = self.epoch + Duration::from_micros(since_us);
            let now = Instant::now();
            let step = timeouts.header.min(timeouts.idle);
            let (deadline, expired) = match phase {
                // Nothing can expire while a request is answered.
                Phase::Busy => (now + step, None),
                Phase::Head => (since + timeouts.header, Some(Expired::Head)),
                Phase::Idle => (since + timeouts.idle, Some(Expired::Idle)),
            };
            if let Some(expired) = expired
                && now >= deadline
                && self.phase() == seen
            {
                return expired;
            }
            // The phase may change while we sleep, to one whose deadline comes sooner (a head
            // starting during an idle wait, an answer during a head wait with a shorter idle
            // timeout); every such deadline is at least the shorter timeout after the change,
            // so looking again within it misses none.
            tokio::time::sleep_until(deadline.min(now + step)).await;
        }
    }
}

/// The connection's socket (or TLS stream), telling [`Activity`] when request bytes arrive.
struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The service as one connection sees it: every request carries the connection's peer address,
/// and the connection knows while a request is being answered.
#[derive(Clone)]
struct PerConnection<S> {
    inner: S,
    client: ClientAddr,
    /// The connection is HTTPS: requests are tagged with [`Secure`].
    secure: bool,
    activity: Arc<Activity>,
}

impl<S> hyper::service::Service<Request<Incoming>> for PerConnection<S>
where
    S: Service<Request<Incoming>> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Answering<Oneshot<S, Request<Incoming>>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.client);
        if self.secure {
            request.extensions_mut().insert(Secure);
        }
        self.activity.request_started(request.version());
        Answering {
            // `oneshot` waits for readiness, so a layer that applies backpressure (a bulkhead)
            // works.
            inner: self.inner.clone().oneshot(request),
            _in_flight: InFlight(self.activity.clone()),
        }
    }
}

/// Counts a request as in flight until its response head is ready (or it is dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_answered();
    }
}

pin_project! {
    /// A response future that keeps its request counted as in flight.
    struct Answering<F> {
        #[pin]
        inner: F,
        _in_flight: InFlight,
    }
}

impl<F: Future> Future for Answering<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_must_send_its_first_head_within_the_header_timeout() {
        let activity = Activity::default();
        let begun = Instant::now();
        assert_eq!(activity.expired(TIMEOUTS).await, Expired::Head);
        assert_eq!(begun.elapsed(), TIMEOUTS.header);
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_waits_get_the_idle_timeout_and_a_started_head_the_header_timeout() {
        let activity = Arc::new(Activity::default());
        activity.request_started(Version::HTTP_11);
        activity.request_answered();
        let begun = Instant::now();
        assert_eq!(activity.expired(TIMEOUTS).await, Expired::Idle);
        assert_eq!(begun.elapsed(), TIMEOUTS.idle);

        // Another connection: a head starts arriving 37 s into its idle wait (between two of
        // the watchdog's looks) and gets exactly the header timeout from its first byte.
        let activity = Arc::new(Activity::default());
        activity.request_started(Version::HTTP_11);
        activity.request_answered();
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move { activity.expired(TIMEOUTS).await }
        });
        tokio::time::sleep(Duration::from_secs(37)).await;
        activity.bytes_read();
        let begun = Instant::now();
        assert_eq!(watcher.await.expect("watcher"), Expired::Head);
        assert_eq!(begun.elapsed(), TIMEOUTS.header);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_shorter_than_the_header_timeout_is_kept() {
        let timeouts = Timeouts {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(1),
        };
        let activity = Arc::new(Activity::default());
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move { activity.expired(timeouts).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        activity.request_started(Version::HTTP_11);
        activity.request_answered();
        let answered = Instant::now();
        assert_eq!(watcher.await.expect("watcher"), Expired::Idle);
        assert_eq!(answered.elapsed(), timeouts.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_restarts_the_idle_wait() {
        let activity = Arc::new(Activity::default());
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move { activity.expired(TIMEOUTS).await }
        });
        // A request every 45 s for five minutes: never 60 s idle.
        for _ in 0..7 {
            activity.bytes_read();
            activity.request_started(Version::HTTP_11);
            tokio::time::sleep(Duration::from_millis(5)).await;
            activity.request_answered();
            tokio::time::sleep(Duration::from_secs(45)).await;
            assert!(!watcher.is_finished());
        }
        let last = Instant::now() - Duration::from_secs(45);
        assert_eq!(watcher.await.expect("watcher"), Expired::Idle);
        assert_eq!(Instant::now() - last, TIMEOUTS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_never_expires_and_its_idle_time_starts_afresh() {
        let activity = Arc::new(Activity::default());
        activity.request_started(Version::HTTP_2);
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move { activity.expired(TIMEOUTS).await }
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!watcher.is_finished());
        // HTTP/2 pings between requests do not count as a request head.
        activity.request_answered();
        activity.bytes_read();
        let begun = Instant::now();
        assert_eq!(watcher.await.expect("watcher"), Expired::Idle);
        assert_eq!(begun.elapsed(), TIMEOUTS.idle);
    }
}
