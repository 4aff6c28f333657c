//! A [`StepCaller`] that reaches services at fixed addresses over plain HTTP/1.1, without the
//! proxy stack: for this crate's tests and benchmarks, and for tools that run sagas against
//! services they started themselves. `flotilla up` calls through the proxy stack instead.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::BoxFuture;
use crate::engine::{StepCaller, StepRequest, StepResponse};

pub struct DirectCaller {
    services: HashMap<String, SocketAddr>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl DirectCaller {
    pub fn new(services: impl IntoIterator<Item = (String, SocketAddr)>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            services: services.into_iter().collect(),
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

impl StepCaller for DirectCaller {
    fn call<'a>(&'a self, request: StepRequest<'a>) -> BoxFuture<'a, StepResponse> {
        Box::pin(async move {
            let Some(addr) = self.services.get(request.service) else {
                return StepResponse::NoAnswer(format!("unknown service {}", request.service));
            };
            let mut builder = Request::builder()
                .method(request.method)
                .uri(format!("http://{addr}{}", request.path))
                .header("idempotency-key", request.idempotency_key);
            if let Some(traceparent) = request.traceparent {
                builder = builder.header("traceparent", traceparent);
            }
            if request.body.is_some() {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
            }
            let http_request = match builder.body(Full::new(request.body.unwrap_or_default())) {
                Ok(r) => r,
                Err(err) => return StepResponse::NoAnswer(format!("invalid request: {err}")),
            };
            let exchange = async {
                let response = self
                    .client
                    .request(http_request)
                    .await
                    .map_err(|err| err.to_string())?;
                let status = response.status().as_u16();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|err| err.to_string())?
                    .to_bytes();
                Ok::<_, String>(StepResponse::Answered { status, body })
            };
            match tokio::time::timeout(request.timeout, exchange).await {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => StepResponse::NoAnswer(err),
                Err(_) => StepResponse::NoAnswer(format!("no answer within {:?}", request.timeout)),
            }
        })
    }
}
