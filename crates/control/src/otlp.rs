//! The OTLP/HTTP receiver: where services' own OpenTelemetry SDKs send spans and logs
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` points every instance here), so they join the traces the
//! proxies record.
//!
//! As the OTLP specification has it: `POST /v1/traces` and `POST /v1/logs`, protobuf
//! (`application/x-protobuf`) or JSON (`application/json`), answered in the request's encoding.
//! A payload that does not decode, or holds a malformed id, is refused whole with 400 and a
//! `google.rpc.Status` naming what is wrong, so nothing half-valid is stored.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use flotilla_telemetry::otlp::{self, Encoding, Signal};

use crate::Fleet;

/// Larger than any batch an SDK sends by default (512 spans), small enough that a stream of
/// oversized requests cannot exhaust memory.
const MAX_OTLP_BODY: usize = 16 << 20;

/// The receiver's routes; served on their own listener (`[telemetry] otlp_listen`).
pub fn otlp_router(fleet: Arc<dyn Fleet>) -> axum::Router {
    axum::Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/logs", post(logs))
        .layer(DefaultBodyLimit::max(MAX_OTLP_BODY))
        .with_state(fleet)
}

/// Runs the receiver on `listener` until `shutdown`.
pub async fn serve_otlp(
    listener: tokio::net::TcpListener,
    fleet: Arc<dyn Fleet>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, otlp_router(fleet))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn traces(State(fleet): State<Arc<dyn Fleet>>, headers: HeaderMap, body: Bytes) -> Response {
    receive(&headers, &body, Signal::Traces, |encoding| {
        let spans = otlp::decode_traces(&body, encoding)?;
        fleet.ingest_spans(spans);
        Ok(())
    })
}

async fn logs(State(fleet): State<Arc<dyn Fleet>>, headers: HeaderMap, body: Bytes) -> Response {
    receive(&headers, &body, Signal::Logs, |encoding| {
        let records = otlp::decode_logs(&body, encoding)?;
        fleet.ingest_logs(records);
        Ok(())
    })
}

fn receive(
    headers: &HeaderMap,
    body: &[u8],
    signal: Signal,
    store: impl FnOnce(Encoding) -> Result<(), otlp::OtlpError>,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let Some(encoding) = Encoding::from_content_type(content_type) else {
        return answer(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Encoding::Json,
            otlp::encode_failure(
                Encoding::Json,
                &format!(
                    "unsupported content type {content_type:?}: send application/x-protobuf or application/json"
                ),
            ),
        );
    };
    // SDKs compress only when configured to; saying so beats a confusing decode error.
    if let Some(coding) = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|value| value.to_str().ok())
        .filter(|coding| !coding.eq_ignore_ascii_case("identity"))
    {
        return answer(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            encoding,
            otlp::encode_failure(
                encoding,
                &format!(
                    "content encoding {coding:?} is not supported; turn the exporter's compression off"
                ),
            ),
        );
    }
    if body.is_empty() {
        return answer(
            StatusCode::BAD_REQUEST,
            encoding,
            otlp::encode_failure(encoding, "the request body is empty"),
        );
    }
    match store(encoding) {
        Ok(()) => answer(
            StatusCode::OK,
            encoding,
            otlp::encode_success(encoding, signal),
        ),
        Err(error) => answer(
            StatusCode::BAD_REQUEST,
            encoding,
            otlp::encode_failure(encoding, &error.to_string()),
        ),
    }
}

fn answer(status: StatusCode, encoding: Encoding, body: Vec<u8>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(encoding.content_type()),
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::fleet;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const TRACE: &str = "5b8efff798038103d269b633813fc60c";

    fn json_spans(trace_id: &str) -> String {
        format!(
            r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"catalog"}}}}]}},
            "scopeSpans":[{{"scope":{{"name":"app"}},"spans":[{{"traceId":"{trace_id}","spanId":"eee19b7ec3c1b174",
            "parentSpanId":"eee19b7ec3c1b173","name":"load products","kind":1,
            "startTimeUnixNano":"1544712660000000000","endTimeUnixNano":"1544712661000000000",
            "attributes":[{{"key":"rows","value":{{"intValue":"42"}}}}]}}]}}]}}]}}"#
        )
    }

    async fn post(
        router: axum::Router,
        path: &str,
        content_type: &str,
        body: impl Into<axum::body::Body>,
    ) -> (StatusCode, String, Vec<u8>) {
        let request = axum::http::Request::post(path)
            .header(header::CONTENT_TYPE, content_type)
            .body(body.into())
            .expect("request");
        let response = router.oneshot(request).await.expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        (status, content_type, body)
    }

    #[tokio::test]
    async fn json_spans_are_stored_and_answered_in_json() {
        let fleet = fleet();
        let router = otlp_router(fleet.clone());
        let (status, content_type, _) =
            post(router, "/v1/traces", "application/json", json_spans(TRACE)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "application/json");
        let id = flotilla_telemetry::TraceId::parse(TRACE).expect("id");
        let spans = fleet.trace_store().trace(id);
        assert_eq!(spans.len(), 1);
        assert_eq!(&*spans[0].service, "catalog");
        assert_eq!(spans[0].name, "load products");
    }

    #[tokio::test]
    async fn protobuf_spans_round_trip() {
        let fleet = fleet();
        let json = json_spans(TRACE);
        let spans =
            otlp::decode_traces(json.as_bytes(), Encoding::Json).expect("the test payload decodes");
        let body = otlp::encode_traces(&spans);
        let (status, content_type, _) = post(
            otlp_router(fleet.clone()),
            "/v1/traces",
            "application/x-protobuf",
            body,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "application/x-protobuf");
        let id = flotilla_telemetry::TraceId::parse(TRACE).expect("id");
        assert_eq!(fleet.trace_store().trace(id), spans);
    }

    #[tokio::test]
    async fn malformed_payloads_are_400_and_nothing_is_stored() {
        let fleet = fleet();
        for (content_type, body) in [
            ("application/json", json_spans("5b8e")),
            ("application/json", "{\"resourceSpans\": [".to_owned()),
            ("application/x-protobuf", "\u{1}\u{2}garbage".to_owned()),
            ("application/json", String::new()),
        ] {
            let (status, answered_as, body) =
                post(otlp_router(fleet.clone()), "/v1/traces", content_type, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{content_type}");
            assert_eq!(answered_as, content_type);
            assert!(!body.is_empty(), "a Status names the problem");
        }
        let (status, _, body) = post(
            otlp_router(fleet.clone()),
            "/v1/traces",
            "text/plain",
            json_spans(TRACE),
        )
        .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(String::from_utf8_lossy(&body).contains("application/x-protobuf"));
        assert!(fleet.trace_store().is_empty());
    }

    #[tokio::test]
    async fn logs_are_stored_with_level_and_trace() {
        let fleet = fleet();
        let body = format!(
            r#"{{"resourceLogs":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"orders"}}}}]}},
            "scopeLogs":[{{"logRecords":[{{"timeUnixNano":"1544712660300000000","severityNumber":17,
            "body":{{"stringValue":"payment declined"}},"traceId":"{TRACE}"}}]}}]}}]}}"#
        );
        let (status, _, _) = post(
            otlp_router(fleet.clone()),
            "/v1/logs",
            "application/json",
            body,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let records = fleet.logs(&flotilla_telemetry::LogQuery::default());
        let record = records.last().expect("stored");
        assert_eq!(record.line, "payment declined");
        assert_eq!(record.level, Some(flotilla_telemetry::Level::Error));
        assert_eq!(
            record.trace_id.map(|t| t.to_string()).as_deref(),
            Some(TRACE)
        );
    }
}
