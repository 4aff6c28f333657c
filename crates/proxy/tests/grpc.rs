//! gRPC through the stack over real sockets: a tonic client speaks h2c to the proxy, which speaks
//! h2c to a tonic server; HTTP/1.1 services behind the same proxy are untouched.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_manifest::Protocol;
use flotilla_proxy::resilience::ResilienceLayer;
use flotilla_proxy::{Edge, Error, Policies, ProxySettings, Resilience, Target};
use flotilla_registry::{Discovery, Endpoint, Resolution};
use http::{Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

const SAY: &str = "/test.greeter.v1.Greeter/Say";

#[derive(Clone, PartialEq, prost::Message)]
struct SayRequest {
    #[prost(string, tag = "1")]
    name: String,
    /// How long the handler takes.
    #[prost(uint32, tag = "2")]
    delay_ms: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SayReply {
    #[prost(string, tag = "1")]
    message: String,
    /// The HTTP version the server was called with.
    #[prost(string, tag = "2")]
    version: String,
    /// The request's `te` header, which gRPC servers may insist on.
    #[prost(string, tag = "3")]
    te: String,
}

/// A tonic server for `Say` on 127.0.0.1 (HTTP/1.1 and h2c), built from tonic's server parts
/// without generated code: `nobody` is NOT_FOUND, any other name is greeted after `delay_ms`.
async fn greeter() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    Ok::<_, Infallible>(say(request).await)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn say(request: Request<Incoming>) -> Response<tonic::body::Body> {
    if request.uri().path() != SAY {
        return Status::unimplemented(format!("no method {}", request.uri().path())).into_http();
    }
    let version = format!("{:?}", request.version());
    let te = request
        .headers()
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let handler = tower::service_fn(move |call: tonic::Request<SayRequest>| {
        let (version, te) = (version.clone(), te.clone());
        async move {
            let SayRequest { name, delay_ms } = call.into_inner();
            tokio::time::sleep(Duration::from_millis(u64::from(delay_ms))).await;
            if name == "nobody" {
                return Err(Status::not_found("no one called «nobody» here: 100% sure"));
            }
            Ok(tonic::Response::new(SayReply {
                message: format!("hello, {name}"),
                version,
                te,
            }))
        }
    });
    tonic::server::Grpc::new(ProstCodec::<SayReply, SayRequest>::default())
        .unary(handler, request)
        .await
}

/// An HTTP/1.1 service: answers with the version it was called with.
async fn plain() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let body = format!("{:?} {}", request.version(), request.uri().path());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[derive(Default)]
struct Fixed(HashMap<&'static str, Vec<Endpoint>>);

impl Discovery for Fixed {
    fn resolve(&self, service: &str) -> Resolution {
        match self.0.get(service) {
            Some(endpoints) => Resolution::Endpoints(endpoints.clone().into()),
            None => Resolution::Unknown,
        }
    }
}

/// Routes by the first path segment, like a gateway with one route per service:
/// `/test.greeter.v1.Greeter/…` → greeter, `/down.v1.Down/…` → down, `/plain/…` → plain.
struct FirstSegment;

impl Edge for FirstSegment {
    fn target<B>(&self, request: &Request<B>) -> Result<Target, Error> {
        let path = request.uri().path();
        let first = path.split('/').nth(1).unwrap_or("");
        let service = match first {
            "test.greeter.v1.Greeter" => "greeter",
            "down.v1.Down" => "down",
            "plain" => "plain",
            _ => return Err(Error::NoRoute { path: path.into() }),
        };
        Ok(Target::service(service.into()))
    }
}

/// The proxy, serving on 127.0.0.1 until the token is cancelled: greeter (gRPC), down (gRPC, no
/// healthy instance) and plain (HTTP/1.1) behind it.
async fn proxy() -> (SocketAddr, CancellationToken) {
    let greeter = greeter().await;
    let plain = plain().await;
    let endpoint = |service: &str, addr| Endpoint {
        instance: format!("{service}-1").into(),
        addr,
    };
    let discovery = Fixed(HashMap::from([
        ("greeter", vec![endpoint("greeter", greeter)]),
        ("down", Vec::new()),
        ("plain", vec![endpoint("plain", plain)]),
    ]));
    let policies = Policies::new([]).with_protocols([
        (Arc::from("greeter"), Protocol::Grpc),
        (Arc::from("down"), Protocol::Grpc),
        (Arc::from("plain"), Protocol::Http),
    ]);
    let layer = ResilienceLayer::new(Arc::new(discovery), Resilience::new(policies), "gateway");
    let stack = flotilla_proxy::stack_with_edge(layer, ProxySettings::gateway(), FirstSegment);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(flotilla_proxy::serve_connections(
        listener,
        stack,
        shutdown.clone(),
        Duration::from_secs(1),
    ));
    (addr, shutdown)
}

/// A tonic client over h2c to `addr`.
async fn client(addr: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    tonic::client::Grpc::new(channel)
}

async fn call(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &'static str,
    request: tonic::Request<SayRequest>,
) -> Result<tonic::Response<SayReply>, Status> {
    grpc.ready().await.expect("ready");
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(path),
        ProstCodec::<SayRequest, SayReply>::default(),
    )
    .await
}

fn hello(name: &str, delay_ms: u32) -> tonic::Request<SayRequest> {
    tonic::Request::new(SayRequest {
        name: name.into(),
        delay_ms,
    })
}

#[tokio::test]
async fn unary_call_goes_through_over_http2_with_trailers() {
    let (addr, _shutdown) = proxy().await;
    let mut grpc = client(addr).await;
    let reply = call(&mut grpc, SAY, hello("ada", 0))
        .await
        .expect("call")
        .into_inner();
    assert_eq!(reply.message, "hello, ada");
    // The proxy called the instance over HTTP/2 and kept `te: trailers`.
    assert_eq!(reply.version, "HTTP/2.0");
    assert_eq!(reply.te, "trailers");

    // The same call by hand: the status comes as a trailers frame after the message.
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let mut message = Vec::new();
    prost::Message::encode(
        &SayRequest {
            name: "grace".into(),
            delay_ms: 0,
        },
        &mut message,
    )
    .expect("encode");
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).expect("len").to_be_bytes());
    framed.extend_from_slice(&message);
    let request = Request::post(format!("http://{addr}{SAY}"))
        .version(Version::HTTP_2)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .body(Full::new(Bytes::from(framed)))
        .expect("request");
    let response = h2.request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/grpc");
    assert!(response.headers().contains_key("x-request-id"));
    assert!(!response.headers().contains_key("grpc-status"));
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    let body = collected.to_bytes();
    let reply: SayReply = prost::Message::decode(&body[5..]).expect("reply");
    assert_eq!(reply.message, "hello, grace");
}

#[tokio::test]
async fn the_servers_status_arrives_intact() {
    let (addr, _shutdown) = proxy().await;
    let mut grpc = client(addr).await;
    let status = call(&mut grpc, SAY, hello("nobody", 0))
        .await
        .expect_err("not found");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no one called «nobody» here: 100% sure");
}

#[tokio::test]
async fn grpc_timeout_shorter_than_the_handler_is_deadline_exceeded() {
    let (addr, _shutdown) = proxy().await;
    // tonic's Channel gives up by itself when the deadline passes; over a bare HTTP/2 client it
    // does not, so the status the test sees can only be the proxy's.
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let origin: http::Uri = format!("http://{addr}").parse().expect("origin");
    let mut grpc = tonic::client::Grpc::with_origin(h2, origin);
    let mut request = hello("slow", 3_000);
    request.set_timeout(Duration::from_millis(150));
    let started = Instant::now();
    grpc.ready().await.expect("ready");
    let status = grpc
        .unary(
            request,
            http::uri::PathAndQuery::from_static(SAY),
            ProstCodec::<SayRequest, SayReply>::default(),
        )
        .await
        .expect_err("deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(status.message(), "`greeter` did not answer within 150ms");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // A deadline longer than the handler changes nothing.
    let mut grpc = client(addr).await;
    let mut request = hello("patient", 50);
    request.set_timeout(Duration::from_secs(5));
    let reply = call(&mut grpc, SAY, request).await.expect("in time");
    assert_eq!(reply.into_inner().message, "hello, patient");
}

#[tokio::test]
async fn proxy_errors_are_trailers_only_grpc_statuses() {
    let (addr, _shutdown) = proxy().await;
    let mut grpc = client(addr).await;

    let status = call(&mut grpc, "/down.v1.Down/Say", hello("ada", 0))
        .await
        .expect_err("down");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "no healthy instance of `down`");

    let status = call(&mut grpc, "/nowhere.v1.Nothing/Say", hello("ada", 0))
        .await
        .expect_err("no route");
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(
        status.message(),
        "no route matches `/nowhere.v1.Nothing/Say`"
    );

    // By hand: HTTP 200, the status in the headers, and nothing after them.
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let request = Request::post(format!("http://{addr}/down.v1.Down/Say"))
        .header(header::CONTENT_TYPE, "application/grpc+proto")
        .header(header::TE, "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .expect("request");
    let response = h2.request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers[header::CONTENT_TYPE], "application/grpc");
    assert_eq!(headers["grpc-status"], "14");
    assert_eq!(headers["grpc-message"], "no healthy instance of `down`");
    assert!(headers.contains_key("x-request-id"));
    let collected = response.into_body().collect().await.expect("body");
    assert!(collected.trailers().is_none());
    assert!(collected.to_bytes().is_empty());
}

#[tokio::test]
async fn http1_services_are_untouched() {
    let (addr, _shutdown) = proxy().await;
    // An HTTP/1.1 client, and an h2c one: the instance is called over HTTP/1.1 either way.
    let http1 = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    for client in [&http1, &h2] {
        let request = Request::get(format!("http://{addr}/plain/stock"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = client.request(request).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"HTTP/1.1 /plain/stock");
    }

    // Errors for anything but gRPC are still problem+json.
    let request = Request::get(format!("http://{addr}/nowhere"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = http1.request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    assert!(!response.headers().contains_key("grpc-status"));
}
