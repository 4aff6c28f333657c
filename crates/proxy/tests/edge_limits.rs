//! The edge's limits against real sockets: raw TCP clients that send too much, too slowly or
//! nothing at all, in front of the real stack and a real upstream.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_proxy::resilience::ResilienceLayer;
use flotilla_proxy::{
    BodyLimitLayer, EdgeLayer, ProxySettings, RequestIdLayer, RescueLayer, Resilience,
    ServeSettings, Target,
};
use flotilla_registry::{Discovery, Endpoint, Resolution};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

struct Fixed(HashMap<&'static str, Vec<Endpoint>>);

impl Discovery for Fixed {
    fn resolve(&self, service: &str) -> Resolution {
        match self.0.get(service) {
            Some(endpoints) => Resolution::Endpoints(endpoints.clone().into()),
            None => Resolution::Unknown,
        }
    }
}

struct OneService;

impl flotilla_proxy::Edge for OneService {
    fn target<B>(&self, _: &Request<B>) -> Result<Target, flotilla_proxy::Error> {
        Ok(Target::service("svc".into()))
    }
}

/// An instance that reads the whole body and answers with its length; `seen` counts the
/// requests that reached it.
async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let length = match request.into_body().collect().await {
                            Ok(body) => body.to_bytes().len(),
                            Err(_) => 0,
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "read {length} bytes"
                        )))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// The edge as the gateway composes it, with `max_body` and `body_timeout`, served with
/// `settings`.
async fn edge(
    settings: ServeSettings,
    max_body: u64,
    body_timeout: Duration,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let (instance, seen) = upstream().await;
    let discovery = Fixed(HashMap::from([(
        "svc",
        vec![Endpoint {
            instance: "svc-1".into(),
            addr: instance,
        }],
    )]));
    let resilience = ResilienceLayer::new(Arc::new(discovery), Resilience::default(), "gateway");
    let stack = ServiceBuilder::new()
        .layer(RequestIdLayer::new())
        .layer(RescueLayer::new())
        .layer(BodyLimitLayer::new(max_body, body_timeout))
        .layer(EdgeLayer::new(OneService))
        .service(flotilla_proxy::below_edge(
            resilience,
            ProxySettings::gateway(),
        ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(flotilla_proxy::serve_connections_with(
        listener,
        stack,
        CancellationToken::new(),
        settings,
    ));
    (addr, seen)
}

fn settings() -> ServeSettings {
    ServeSettings::default()
}

/// Reads one response (head and a `Content-Length` body) from a raw connection.
async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Duration::from_secs(10);
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let read = tokio::time::timeout(deadline, stream.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(
            read > 0,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(&buffer)
        );
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let read = tokio::time::timeout(deadline, stream.read(&mut chunk))
            .await
            .expect("body in time")
            .expect("read");
        assert!(read > 0, "connection closed mid-body");
        buffer.extend_from_slice(&chunk[..read]);
    }
    let body = String::from_utf8_lossy(&buffer[head_end..head_end + length]).to_string();
    (head, body)
}

/// Waits until the server closes the connection; how long that took.
async fn closed_after(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut chunk)).await {
            Err(_) => panic!("the connection was still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_the_body_is_sent() {
    let (addr, seen) = edge(settings(), 1024, Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // Headers only: the 413 must come without the client sending a byte of the body.
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: shop.example\r\ncontent-type: application/octet-stream\r\ncontent-length: 100000000\r\n\r\n",
        )
        .await
        .expect("write");
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 413 "), "{head}");
    assert!(head.contains("application/problem+json"), "{head}");
    assert!(head.contains("x-request-id"), "{head}");
    let problem: serde_json::Value = serde_json::from_str(&body).expect("problem json");
    assert_eq!(problem["type"], "urn:flotilla:problem:body-too-large");
    assert_eq!(problem["status"], 413);
    let detail = problem["detail"].as_str().expect("detail");
    assert!(detail.contains("1024 bytes"), "{detail}");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "the instance saw the request"
    );
    // The rest of the body will never be read: the connection is closed, not reused.
    closed_after(&mut stream, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_chunked_body_crossing_the_limit_gets_413() {
    let (addr, _seen) = edge(settings(), 4096, Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: shop.example\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await
        .expect("write");
    let chunk = format!("400\r\n{}\r\n", "x".repeat(1024));
    for _ in 0..8 {
        // The edge may answer and close before all of it is written.
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 413 "), "{head}\n{body}");
    let problem: serde_json::Value = serde_json::from_str(&body).expect("problem json");
    assert_eq!(problem["type"], "urn:flotilla:problem:body-too-large");
}

#[tokio::test]
async fn a_body_within_the_limit_reaches_the_instance_whole() {
    let (addr, seen) = edge(settings(), 4096, Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let body = "y".repeat(4096);
    stream
        .write_all(
            format!(
                "POST /upload HTTP/1.1\r\nhost: shop.example\r\ncontent-length: 4096\r\n\r\n{body}"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, "read 4096 bytes");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_request_head_over_max_headers_gets_431() {
    let settings = ServeSettings {
        max_headers: 8 << 10,
        ..settings()
    };
    let (addr, seen) = edge(settings, 1024, Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let cookie = "c".repeat(16 << 10);
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nhost: shop.example\r\ncookie: {cookie}\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
    assert_eq!(seen.load(Ordering::SeqCst), 0);

    // A head just under the limit is fine.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let cookie = "c".repeat(7 << 10);
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nhost: shop.example\r\ncookie: {cookie}\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
}

#[tokio::test]
async fn a_request_head_dribbled_slowly_is_cut_off_at_the_header_timeout() {
    let settings = ServeSettings {
        header_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(30),
        ..settings()
    };
    let (addr, seen) = edge(settings, 1024, Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: shop.example\r\n")
        .await
        .expect("write");
    // One header line every 250 ms, for up to 10 s: each one is "activity", none completes
    // the head.
    let mut closed = false;
    for n in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if stream
            .write_all(format!("x-slow-{n}: 1\r\n").as_bytes())
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        let mut probe = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await
        {
            closed = true;
            break;
        }
    }
    let elapsed = started.elapsed();
    assert!(closed, "the connection stayed open for {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?}"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout() {
    let settings = ServeSettings {
        header_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(30),
        ..settings()
    };
    let (addr, _) = edge(settings, 1024, Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let after = closed_after(&mut stream, Duration::from_secs(5)).await;
    assert!(
        after >= Duration::from_millis(400),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let settings = ServeSettings {
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(1),
        ..settings()
    };
    let (addr, _) = edge(settings, 1024, Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: shop.example\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let after = closed_after(&mut stream, Duration::from_secs(5)).await;
    assert!(
        after >= Duration::from_millis(800) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn a_keep_alive_connection_outlives_the_header_timeout_while_idle() {
    // hyper's own header timer would close this connection one second after its first
    // response; the idle timeout is what counts between requests.
    let settings = ServeSettings {
        header_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(10),
        ..settings()
    };
    let (addr, seen) = edge(settings, 1024, Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    for _ in 0..2 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: shop.example\r\n\r\n")
            .await
            .expect("write");
        let (head, _) = read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_body_that_stalls_gets_408() {
    let (addr, _) = edge(settings(), 1 << 20, Duration::from_millis(500)).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: shop.example\r\ncontent-length: 10\r\n\r\nhello",
        )
        .await
        .expect("write");
    let (head, body) = read_response(&mut stream).await;
    let elapsed = started.elapsed();
    assert!(head.starts_with("HTTP/1.1 408 "), "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let problem: serde_json::Value = serde_json::from_str(&body).expect("problem json");
    assert_eq!(problem["type"], "urn:flotilla:problem:body-timeout");
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
}
