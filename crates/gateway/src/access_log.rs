//! The gateway's access log: one JSON line per request, written by a background thread.
//!
//! Requests never wait for the disk, nor wake anything: a line is formatted on the request's
//! thread and appended to a shared buffer; the writer thread takes the buffer every
//! [`FLUSH_EVERY`] and writes it with one system call. Woken per line, a writer thread costs
//! each request a futex wake, a write and a context switch — more than the proxying itself.
//! When the buffer is full (the disk cannot keep up) lines are dropped and counted instead
//! ([`AccessLog::dropped`]).
//!
//! ```json
//! {"time":"2026-05-01T12:00:00.123Z","client":"127.0.0.1","method":"GET","path":"/api/orders?page=2","status":200,"bytes":512,"duration_ms":3.2,"request_id":"5f0c…","user_agent":"curl/8.5.0"}
//! ```

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use flotilla_proxy::{ClientAddr, ProxyBody, X_REQUEST_ID};
use http::{HeaderValue, Method, Request, Response, Uri, header};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Where `flotilla up` keeps the log, relative to the app directory.
pub const ACCESS_LOG_PATH: &str = ".flotilla/logs/gateway-access.log";

/// Bytes waiting for the writer; lines beyond this are dropped.
const MAX_PENDING: usize = 4 << 20;
/// How often the writer takes what is pending: a line reaches the file this late at most.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// The path (with its query) is cut to this many bytes.
const MAX_PATH: usize = 2048;
const MAX_USER_AGENT: usize = 256;
const MAX_REQUEST_ID: usize = 128;

/// One request, as the log records it.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// When the request arrived.
    pub time: SystemTime,
    /// The TCP peer.
    pub client: Option<IpAddr>,
    pub method: &'a str,
    /// Path and query as the client sent them.
    pub path: &'a str,
    pub status: u16,
    /// The response body's length, when it was declared.
    pub bytes: Option<u64>,
    /// From the request's arrival to its response head.
    pub duration: Duration,
    pub request_id: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

/// A JSON-lines access log file with its writer thread. Dropping it writes what is queued and
/// stops the thread.
pub struct AccessLog {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

/// What the requests and the writer share.
struct Shared {
    pending: Mutex<Vec<u8>>,
    dropped: AtomicU64,
    closed: AtomicBool,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Opens `path` for appending (making its directory) and starts the writer.
    pub fn open(path: &Path) -> io::Result<AccessLog> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(64 << 10)),
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let writer = std::thread::Builder::new()
            .name("gateway-access-log".into())
            .spawn({
                let shared = shared.clone();
                move || write_lines(&shared, file)
            })?;
        Ok(AccessLog {
            shared,
            writer: Some(writer),
        })
    }

    /// Adds the line for `entry` to what the writer takes next; never blocks on the disk.
    pub fn record(&self, entry: Entry<'_>) {
        let line = line(&entry);
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if pending.len() + line.len() > MAX_PENDING {
            drop(pending);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.extend_from_slice(line.as_bytes());
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // The writer takes what is pending once more, writes it and stops.
        self.shared.closed.store(true, Ordering::Release);
        if let Some(writer) = self.writer.take() {
            writer.thread().unpark();
            let _ = writer.join();
        }
    }
}

fn write_lines(shared: &Shared, mut file: File) {
    let mut failing = false;
    let mut batch: Vec<u8> = Vec::with_capacity(64 << 10);
    loop {
        let closing = shared.closed.load(Ordering::Acquire);
        {
            let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *pending, &mut batch);
        }
        if !batch.is_empty() {
            match file.write_all(&batch) {
                Err(error) if !failing => {
                    tracing::warn!(%error, "cannot write the gateway access log");
                    failing = true;
                }
                Err(_) => {}
                Ok(()) => failing = false,
            }
            batch.clear();
        }
        if closing {
            return;
        }
        std::thread::park_timeout(FLUSH_EVERY);
    }
}

/// The JSON line for `entry`, newline included.
fn line(entry: &Entry<'_>) -> String {
    let mut out = String::with_capacity(192 + entry.path.len().min(MAX_PATH));
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "{{\"time\":\"{}\"",
        humantime::format_rfc3339_millis(entry.time)
    );
    out.push_str(",\"client\":");
    match entry.client {
        Some(ip) => {
            let _ = write!(out, "\"{ip}\"");
        }
        None => out.push_str("null"),
    }
    out.push_str(",\"method\":");
    json_string(&mut out, cut(entry.method, 32));
    out.push_str(",\"path\":");
    json_string(&mut out, cut(entry.path, MAX_PATH));
    let _ = write!(out, ",\"status\":{}", entry.status);
    if let Some(bytes) = entry.bytes {
        let _ = write!(out, ",\"bytes\":{bytes}");
    }
    let _ = write!(
        out,
        ",\"duration_ms\":{:.3}",
        entry.duration.as_secs_f64() * 1000.0
    );
    out.push_str(",\"request_id\":");
    optional_string(&mut out, entry.request_id.map(|id| cut(id, MAX_REQUEST_ID)));
    out.push_str(",\"user_agent\":");
    optional_string(&mut out, entry.user_agent.map(|ua| cut(ua, MAX_USER_AGENT)));
    out.push_str("}\n");
    out
}

fn optional_string(out: &mut String, value: Option<&str>) {
    match value {
        Some(value) => json_string(out, value),
        None => out.push_str("null"),
    }
}

/// `value` as a JSON string: quotes, backslashes and control characters escaped.
fn json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Records every request that passes through in an [`AccessLog`]. Place it outermost (above
/// the request id layer), so it sees every answer, problems included, with its request id.
#[derive(Clone, Debug)]
pub struct AccessLogLayer {
    log: Arc<AccessLog>,
}

impl AccessLogLayer {
    pub fn new(log: Arc<AccessLog>) -> Self {
        Self { log }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLogged<S>;

    fn layer(&self, inner: S) -> AccessLogged<S> {
        AccessLogged {
            inner,
            log: self.log.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AccessLogged<S> {
    inner: S,
    log: Arc<AccessLog>,
}

/// What the log needs of a request, kept until its response: reference-counted or inline
/// copies, no allocation.
struct Arrived {
    log: Arc<AccessLog>,
    time: SystemTime,
    started: Instant,
    client: Option<IpAddr>,
    method: Method,
    uri: Uri,
    user_agent: Option<HeaderValue>,
}

impl<S, B> Service<Request<B>> for AccessLogged<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>>,
{
    type Response = Response<ProxyBody>;
    type Error = S::Error;
    type Future = AccessLoggedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let arrived = Arrived {
            log: self.log.clone(),
            time: SystemTime::now(),
            started: Instant::now(),
            client: request
                .extensions()
                .get::<ClientAddr>()
                .map(|client| client.0.ip()),
            method: request.method().clone(),
            uri: request.uri().clone(),
            user_agent: request.headers().get(header::USER_AGENT).cloned(),
        };
        AccessLoggedFuture {
            inner: self.inner.call(request),
            arrived: Some(arrived),
        }
    }
}

pin_project! {
    pub struct AccessLoggedFuture<F> {
        #[pin]
        inner: F,
        arrived: Option<Arrived>,
    }
}

impl<F, E> Future for AccessLoggedFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let (Some(arrived), Ok(response)) = (this.arrived.take(), &result) {
            let headers = response.headers();
            let path = arrived
                .uri
                .path_and_query()
                .map_or_else(|| arrived.uri.path(), |pq| pq.as_str());
            arrived.log.record(Entry {
                time: arrived.time,
                client: arrived.client,
                method: arrived.method.as_str(),
                path,
                status: response.status().as_u16(),
                bytes: headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
                duration: arrived.started.elapsed(),
                request_id: headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()),
                user_agent: arrived.user_agent.as_ref().and_then(|v| v.to_str().ok()),
            });
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_escapes_and_cuts() {
        let long = format!("/x?{}", "q".repeat(5000));
        let entry = Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_500),
            client: Some(IpAddr::from([127, 0, 0, 1])),
            method: "GET",
            path: &long,
            status: 200,
            bytes: None,
            duration: Duration::from_micros(1500),
            request_id: Some("abc"),
            user_agent: Some("evil\"agent\n\u{1}"),
        };
        let text = line(&entry);
        assert!(text.ends_with('\n'));
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value["time"], "1970-01-01T00:00:01.500Z");
        assert_eq!(value["client"], "127.0.0.1");
        assert_eq!(value["path"].as_str().map(str::len), Some(MAX_PATH));
        assert_eq!(value["duration_ms"], 1.5);
        assert_eq!(value["user_agent"], "evil\"agent\n\u{1}");
        assert!(value.get("bytes").is_none());
    }

    #[tokio::test]
    async fn the_layer_writes_one_line_per_request_with_its_fields() {
        use bytes::Bytes;
        use http_body_util::{BodyExt, Full};
        use tower::ServiceExt;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("logs/gateway-access.log");
        let log = Arc::new(AccessLog::open(&path).expect("open"));
        let service =
            AccessLogLayer::new(log.clone()).layer(tower::service_fn(|_: Request<()>| async {
                let mut response = Response::new(
                    Full::new(Bytes::from_static(b"hello"))
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                );
                *response.status_mut() = http::StatusCode::CREATED;
                response
                    .headers_mut()
                    .insert(X_REQUEST_ID, HeaderValue::from_static("req-1"));
                response
                    .headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(5));
                Ok::<_, std::convert::Infallible>(response)
            }));
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/api/orders?page=2")
            .header(header::USER_AGENT, "test-agent/1")
            .body(())
            .expect("request");
        request
            .extensions_mut()
            .insert(ClientAddr(([192, 0, 2, 7], 50_000).into()));
        let before = SystemTime::now();
        let response = service.oneshot(request).await.expect("response");
        assert_eq!(response.status(), 201);
        assert_eq!(log.dropped(), 0);
        // Dropping the last handle writes what is queued.
        drop(log);

        let text = fs::read_to_string(&path).expect("log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let value: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
        assert_eq!(value["client"], "192.0.2.7");
        assert_eq!(value["method"], "POST");
        assert_eq!(value["path"], "/api/orders?page=2");
        assert_eq!(value["status"], 201);
        assert_eq!(value["bytes"], 5);
        assert_eq!(value["request_id"], "req-1");
        assert_eq!(value["user_agent"], "test-agent/1");
        assert!(value["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
        let time =
            humantime::parse_rfc3339(value["time"].as_str().expect("time")).expect("rfc3339");
        assert!(
            time + Duration::from_millis(1) >= before,
            "{time:?} {before:?}"
        );
    }
}
