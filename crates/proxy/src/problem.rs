use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::ProxyBody;
use crate::request_id::X_REQUEST_ID;

/// `content-type` of every error response.
pub const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// An RFC 7807 problem+json response with `type` `about:blank`, so `title` should be the status's
/// reason phrase. `request_id` becomes the `request_id` extension member and the `x-request-id`
/// header.
pub fn problem(
    status: StatusCode,
    title: &str,
    detail: &str,
    request_id: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    build("about:blank", status, title, detail, request_id)
}

pub(crate) fn build(
    kind: &str,
    status: StatusCode,
    title: &str,
    detail: &str,
    request_id: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    let mut body = serde_json::json!({
        "type": kind,
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Some(id), Some(members)) = (
        request_id.and_then(|id| id.to_str().ok()),
        body.as_object_mut(),
    ) {
        members.insert("request_id".into(), id.into());
    }
    // Serializing a `Value` of strings and a number cannot fail; an empty body would still be a
    // well-formed response should it ever.
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut response = Response::new(
        Full::new(Bytes::from(bytes))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, PROBLEM_JSON);
    // An error about one request says nothing about the next.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(id) = request_id {
        headers.insert(X_REQUEST_ID, id.clone());
    }
    response
}
