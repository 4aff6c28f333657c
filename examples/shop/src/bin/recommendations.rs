//! recommendations: "customers who bought this also bought", as a gRPC service.
//!
//! ```proto
//! syntax = "proto3";
//! package shop.recommendations.v1;
//!
//! service Recommendations {
//!   rpc Recommend(RecommendRequest) returns (RecommendResponse);
//! }
//! message RecommendRequest { string product_id = 1; uint32 limit = 2; }
//! message RecommendResponse { repeated Recommendation recommendations = 1; }
//! message Recommendation { string product_id = 1; double score = 2; }
//! ```
//!
//! A product's recommendations are the products bought with it in the baskets this service knows,
//! scored by how often: the share of baskets holding the product that hold the other one too.
//! `limit` 0 means [`DEFAULT_LIMIT`]. An unknown product is NOT_FOUND, an empty one
//! INVALID_ARGUMENT.
//!
//! The messages are written out with prost's derive and the service with tonic's server parts,
//! so building needs no `protoc`. gRPC and `/healthz` share the port: the server speaks HTTP/1.1
//! and HTTP/2 without TLS (h2c) alike, which is how Flotilla's proxies call a `protocol = "grpc"`
//! service and probe its health.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::Request;
use axum::http::Response;
use flotilla_shop::{BoxError, exit_code, serve};
use tonic::Status;
use tonic::server::NamedService;
use tonic_prost::ProstCodec;

const SERVICE: &str = "recommendations";

/// Recommendations per call when the request asks for none (`limit` 0), and the most it gets.
const DEFAULT_LIMIT: usize = 3;
const MAX_LIMIT: usize = 20;

/// Past orders' baskets, by SKU (the catalog's products). A real service would learn them from
/// `order.confirmed` events; a fixed history keeps the example's answers the same everywhere.
const BASKETS: &[&[&str]] = &[
    &["TEA-001", "MUG-002"],
    &["TEA-001", "MUG-002", "KETTLE-003"],
    &["TEA-001", "KETTLE-003"],
    &["MUG-002", "BEANS-006"],
    &["GRINDER-004", "BEANS-006"],
    &["GRINDER-004", "BEANS-006", "MUG-002"],
    &["ESPRESSO-005", "GRINDER-004", "BEANS-006"],
    &["ESPRESSO-005", "BEANS-006"],
    &["ESPRESSO-005", "MUG-002"],
    &["KETTLE-003", "BEANS-006", "GRINDER-004"],
    &["TEA-001"],
    &["BEANS-006"],
];

#[derive(Clone, PartialEq, prost::Message)]
pub struct RecommendRequest {
    #[prost(string, tag = "1")]
    pub product_id: String,
    #[prost(uint32, tag = "2")]
    pub limit: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RecommendResponse {
    #[prost(message, repeated, tag = "1")]
    pub recommendations: Vec<Recommendation>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Recommendation {
    #[prost(string, tag = "1")]
    pub product_id: String,
    /// In (0, 1]: the share of the product's baskets that also hold this one.
    #[prost(double, tag = "2")]
    pub score: f64,
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(SERVICE, run().await)
}

async fn run() -> Result<(), BoxError> {
    let recommendations = Recommendations(Arc::new(Recommender::new(BASKETS)));
    let app = Router::new().route_service(
        &format!("/{}/{{*method}}", Recommendations::NAME),
        recommendations,
    );
    serve(SERVICE, app).await
}

/// Every product's recommendations, best first, computed once at start.
struct Recommender {
    by_product: BTreeMap<&'static str, Vec<Recommendation>>,
}

impl Recommender {
    fn new(baskets: &[&[&'static str]]) -> Self {
        let mut holding: BTreeMap<&str, u32> = BTreeMap::new();
        let mut together: BTreeMap<(&str, &str), u32> = BTreeMap::new();
        for basket in baskets {
            // A product twice in one basket is still one basket.
            let products: BTreeSet<&'static str> = basket.iter().copied().collect();
            for &product in &products {
                *holding.entry(product).or_default() += 1;
                for &other in &products {
                    if other != product {
                        *together.entry((product, other)).or_default() += 1;
                    }
                }
            }
        }
        let mut by_product: BTreeMap<&'static str, Vec<Recommendation>> = holding
            .keys()
            .map(|&product| (product, Vec::new()))
            .collect();
        for ((product, other), count) in together {
            let score = f64::from(count) / f64::from(holding[product]);
            if let Some(list) = by_product.get_mut(product) {
                list.push(Recommendation {
                    product_id: other.to_owned(),
                    score,
                });
            }
        }
        for list in by_product.values_mut() {
            // Best first; ties by SKU, so the order never depends on the map's.
            list.sort_by(|a, b| {
                b.score
                    .total_cmp(&a.score)
                    .then_with(|| a.product_id.cmp(&b.product_id))
            });
        }
        Self { by_product }
    }

    fn recommend(&self, request: &RecommendRequest) -> Result<RecommendResponse, Status> {
        let product = request.product_id.trim();
        if product.is_empty() {
            return Err(Status::invalid_argument(
                "product_id is required, e.g. \"TEA-001\"",
            ));
        }
        let Some(list) = self.by_product.get(product) else {
            return Err(Status::not_found(format!("no product with sku {product}")));
        };
        let limit = match usize::try_from(request.limit).unwrap_or(MAX_LIMIT) {
            0 => DEFAULT_LIMIT,
            limit => limit.min(MAX_LIMIT),
        };
        Ok(RecommendResponse {
            recommendations: list.iter().take(limit).cloned().collect(),
        })
    }
}

/// The gRPC service: `/shop.recommendations.v1.Recommendations/<method>`.
#[derive(Clone)]
struct Recommendations(Arc<Recommender>);

impl NamedService for Recommendations {
    const NAME: &'static str = "shop.recommendations.v1.Recommendations";
}

type Call = Pin<Box<dyn Future<Output = Result<Response<tonic::body::Body>, Infallible>> + Send>>;

impl tower::Service<Request> for Recommendations {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Call;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Call {
        let recommender = self.0.clone();
        Box::pin(async move {
            let method = request
                .uri()
                .path()
                .rsplit_once('/')
                .map_or("", |(_, method)| method);
            if method != "Recommend" {
                let status =
                    Status::unimplemented(format!("{} has no method {method:?}", Self::NAME));
                return Ok(status.into_http());
            }
            let recommend = tower::service_fn(move |call: tonic::Request<RecommendRequest>| {
                let answer = recommender
                    .recommend(call.get_ref())
                    .map(tonic::Response::new);
                std::future::ready(answer)
            });
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<
                RecommendResponse,
                RecommendRequest,
            >::default());
            Ok(grpc.unary(recommend, request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(product: &str, limit: u32) -> Result<Vec<(String, f64)>, Status> {
        let recommender = Recommender::new(BASKETS);
        let response = recommender.recommend(&RecommendRequest {
            product_id: product.into(),
            limit,
        })?;
        Ok(response
            .recommendations
            .into_iter()
            .map(|r| (r.product_id, r.score))
            .collect())
    }

    #[test]
    fn products_bought_together_come_first() {
        // Tea is in four baskets: twice with the mug, twice with the kettle.
        assert_eq!(
            ask("TEA-001", 0).expect("known"),
            [("KETTLE-003".into(), 0.5), ("MUG-002".into(), 0.5)]
        );
        let espresso = ask("ESPRESSO-005", 1).expect("known");
        assert_eq!(espresso, [("BEANS-006".into(), 2.0 / 3.0)]);
    }

    #[test]
    fn limit_caps_the_list() {
        assert_eq!(ask("BEANS-006", 0).expect("known").len(), DEFAULT_LIMIT);
        assert_eq!(ask("BEANS-006", 2).expect("known").len(), 2);
        // Beans were bought with four other products; asking for more gives all four.
        assert_eq!(ask("BEANS-006", 100).expect("known").len(), 4);
    }

    #[test]
    fn unknown_and_missing_products_are_refused() {
        let status = ask("NOPE-000", 3).expect_err("unknown");
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "no product with sku NOPE-000");
        let status = ask(" ", 3).expect_err("empty");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
