//! End-to-end: the shop's gRPC service under `flotilla up`, called with a tonic client through the
//! gateway and through a service's sidecar, both over h2c.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

const RECOMMEND: &str = "/shop.recommendations.v1.Recommendations/Recommend";

// The shop's messages (examples/shop/src/bin/recommendations.rs), as any client writes them from
// the .proto.
#[derive(Clone, PartialEq, prost::Message)]
struct RecommendRequest {
    #[prost(string, tag = "1")]
    product_id: String,
    #[prost(uint32, tag = "2")]
    limit: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RecommendResponse {
    #[prost(message, repeated, tag = "1")]
    recommendations: Vec<Recommendation>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Recommendation {
    #[prost(string, tag = "1")]
    product_id: String,
    #[prost(double, tag = "2")]
    score: f64,
}

/// Builds the shop's recommendations binary in debug, into the target directory this test was
/// built in, and returns its path.
fn recommendations_binary() -> PathBuf {
    // target/debug/deps/grpc-<hash> → target
    let exe = std::env::current_exe().expect("test binary");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the target directory")
        .to_owned();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "flotilla-shop", "--bin", "recommendations"])
        .current_dir(&workspace)
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "building the recommendations service failed"
    );
    target.join("debug/recommendations")
}

fn manifest(binary: &Path) -> String {
    format!(
        r#"
app = "grpc"

[[gateway.routes]]
prefix = "/shop.recommendations.v1.Recommendations"
service = "recommendations"

[[gateway.routes]]
prefix = "/front"
service = "front"

[services.recommendations]
run = "{binary}"
protocol = "grpc"
health = {{ interval = "200ms" }}

# Only here for its sidecar: the echo service tells which one it was given.
[services.front]
run = "python3 echo.py"
health = {{ interval = "200ms" }}
"#,
        binary = binary.display()
    )
}

async fn channel(endpoint: Endpoint) -> tonic::client::Grpc<Channel> {
    let channel = endpoint.connect().await.expect("connect");
    tonic::client::Grpc::new(channel)
}

async fn recommend(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    product: &str,
    limit: u32,
) -> Result<Vec<(String, f64)>, tonic::Status> {
    grpc.ready().await.expect("ready");
    let response = grpc
        .unary(
            tonic::Request::new(RecommendRequest {
                product_id: product.into(),
                limit,
            }),
            http::uri::PathAndQuery::from_static(path),
            ProstCodec::<RecommendRequest, RecommendResponse>::default(),
        )
        .await?;
    Ok(response
        .into_inner()
        .recommendations
        .into_iter()
        .map(|r| (r.product_id, r.score))
        .collect())
}

#[test]
fn grpc_calls_go_through_the_gateway_and_the_sidecars() {
    let binary = recommendations_binary();
    let app = App::new(&manifest(&binary));
    let fleet = Fleet::start(app.path(), &[]);
    fleet.wait_phase("ready", Duration::from_secs(60));

    // The sidecar front was given, as front's own HTTP_PROXY.
    let echoed: Value = get(&format!("{}/front/whoami", fleet.gateway))
        .json()
        .expect("echo");
    let sidecar = echoed["proxy"]
        .as_str()
        .expect("front's sidecar")
        .to_owned();

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // Through the gateway: its route for the gRPC service, h2c to the instance.
        let mut gateway =
            channel(Endpoint::from_shared(fleet.gateway.clone()).expect("gateway")).await;
        let tea = recommend(&mut gateway, RECOMMEND, "TEA-001", 2)
            .await
            .expect("recommendations for tea");
        assert_eq!(
            tea,
            [("KETTLE-003".to_owned(), 0.5), ("MUG-002".to_owned(), 0.5)]
        );

        // The service's own status passes through untouched.
        let status = recommend(&mut gateway, RECOMMEND, "NOPE-000", 2)
            .await
            .expect_err("unknown product");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(status.message(), "no product with sku NOPE-000");
        let status = recommend(
            &mut gateway,
            "/shop.recommendations.v1.Recommendations/Forget",
            "TEA-001",
            1,
        )
        .await
        .expect_err("no such method");
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

        // A gRPC service the gateway has no route for: the gateway answers, in gRPC.
        let status = recommend(&mut gateway, "/shop.reviews.v1.Reviews/List", "TEA-001", 1)
            .await
            .expect_err("no route");
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert_eq!(
            status.message(),
            "no route matches `/shop.reviews.v1.Reviews/List`"
        );

        // Through front's sidecar, as front would call it: `http://recommendations`.
        let mut via_sidecar = channel(
            Endpoint::from_shared(sidecar.clone())
                .expect("sidecar")
                .origin("http://recommendations".parse().expect("origin")),
        )
        .await;
        let espresso = recommend(&mut via_sidecar, RECOMMEND, "ESPRESSO-005", 1)
            .await
            .expect("recommendations for the espresso machine");
        assert_eq!(espresso.len(), 1);
        assert_eq!(espresso[0].0, "BEANS-006");
        assert!((espresso[0].1 - 2.0 / 3.0).abs() < 1e-9);

        // A service the app does not have, by host name at the sidecar.
        let mut nowhere = channel(
            Endpoint::from_shared(sidecar.clone())
                .expect("sidecar")
                .origin("http://reviews".parse().expect("origin")),
        )
        .await;
        let status = recommend(&mut nowhere, RECOMMEND, "TEA-001", 1)
            .await
            .expect_err("unknown service");
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert_eq!(status.message(), "unknown service `reviews`");
    });

    // Both calls are on the map: the gateway's and front's, to recommendations.
    wait_until(
        "the calls to recommendations on the map",
        Duration::from_secs(10),
        || {
            let Some(map) = get_json(&format!("{}/v1/map", fleet.control)) else {
                return false;
            };
            let edges = map["edges"].as_array().cloned().unwrap_or_default();
            ["gateway", "front"].iter().all(|caller| {
                edges
                    .iter()
                    .any(|e| e["caller"] == *caller && e["callee"] == "recommendations")
            })
        },
    );
}
