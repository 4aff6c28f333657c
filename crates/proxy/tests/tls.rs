//! HTTPS at the edge: the generated development certificate, clear errors for bad PEM files,
//! and real TLS clients negotiating HTTP/2 and HTTP/1.1 by ALPN.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_proxy::tls::{TlsError, dev_certificate, server_config};
use flotilla_proxy::{BoxError, ProxyBody, ServeSettings};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

/// Serves HTTPS with the certificate in `dir`; every response says which HTTP version the
/// request came in with.
async fn https_server(dir: &Path, header_timeout: Duration) -> SocketAddr {
    let (cert, key) = dev_certificate(dir).expect("dev certificate");
    let tls = server_config(&cert, &key).expect("server config");
    let settings = ServeSettings {
        header_timeout,
        tls: Some(tls),
        ..ServeSettings::default()
    };
    let service = tower::service_fn(|request: Request<Incoming>| async move {
        let body: ProxyBody = Full::new(Bytes::from(format!("{:?}", request.version())))
            .map_err(|never| -> BoxError { match never {} })
            .boxed_unsync();
        Ok::<_, Infallible>(Response::new(body))
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(flotilla_proxy::serve_connections_with(
        listener,
        service,
        CancellationToken::new(),
        settings,
    ));
    addr
}

/// A client that trusts only the development certificate in `dir`, offering `alpn`.
fn connector(dir: &Path, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for cert in flotilla_proxy::tls::certificates(&dir.join("cert.pem")).expect("certificate") {
        roots.add(cert).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(flotilla_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    addr: SocketAddr,
    dir: &Path,
    alpn: &[&[u8]],
    name: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    connector(dir, alpn)
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

async fn text(response: Response<Incoming>) -> String {
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn alpn_negotiates_http2_with_clients_that_offer_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = https_server(dir.path(), Duration::from_secs(10)).await;
    let stream = tls_connect(addr, dir.path(), &[b"h2", b"http/1.1"], "localhost").await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let request = Request::builder()
        .uri(format!("https://localhost:{}/", addr.port()))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(text(response).await, "HTTP/2.0");
}

#[tokio::test]
async fn http11_clients_are_served_too_and_ip_names_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = https_server(dir.path(), Duration::from_secs(10)).await;
    for name in ["127.0.0.1", "localhost"] {
        let stream = tls_connect(addr, dir.path(), &[b"http/1.1"], name).await;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("h1 handshake");
        tokio::spawn(connection);
        let request = Request::builder()
            .uri("/")
            .header("host", name)
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        assert_eq!(text(response).await, "HTTP/1.1");
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = https_server(dir.path(), Duration::from_millis(500)).await;
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buffer))
        .await
        .expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}

#[test]
fn the_dev_certificate_is_made_once_with_a_private_key_and_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join(".flotilla/tls");
    let (cert, key) = dev_certificate(&tls).expect("made");
    assert_eq!(cert, tls.join("cert.pem"));
    assert_eq!(key, tls.join("key.pem"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key mode {mode:o}");
    }
    let first = std::fs::read(&cert).expect("cert");
    dev_certificate(&tls).expect("reused");
    assert_eq!(std::fs::read(&cert).expect("cert"), first, "made again");

    // A damaged certificate is replaced.
    std::fs::write(&cert, "not a certificate").expect("damage");
    dev_certificate(&tls).expect("made again");
    let again = std::fs::read(&cert).expect("cert");
    assert_ne!(again, first);
    server_config(&cert, &key).expect("usable");
}

#[test]
fn bad_pem_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_a, key_a) = dev_certificate(&dir.path().join("a")).expect("a");
    let (_, key_b) = dev_certificate(&dir.path().join("b")).expect("b");

    let missing = dir.path().join("missing.pem");
    let error = server_config(&missing, &key_a).expect_err("missing");
    assert!(matches!(error, TlsError::Read { .. }), "{error:?}");
    assert!(error.to_string().contains("missing.pem"), "{error}");

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no PEM here\n").expect("write");
    let error = server_config(&empty, &key_a).expect_err("no certificate");
    assert!(matches!(error, TlsError::NoCertificate { .. }), "{error:?}");
    assert!(error.to_string().contains("empty.pem"), "{error}");

    // A certificate where the key should be.
    let error = server_config(&cert_a, &cert_a).expect_err("no key");
    assert!(matches!(error, TlsError::NoKey { .. }), "{error:?}");

    let error = server_config(&cert_a, &key_b).expect_err("mismatch");
    assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("b/key.pem") && message.contains("a/cert.pem"),
        "{message}"
    );
}
