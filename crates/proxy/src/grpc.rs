//! gRPC at the proxy: reading a call's `grpc-timeout`, and answering a call the proxy could not
//! deliver the way gRPC clients understand.
//!
//! A gRPC client reads the outcome of a call from `grpc-status` and `grpc-message`, not from the
//! HTTP status (always 200) nor from a problem+json body it would not parse. So for a request whose
//! `content-type` is `application/grpc…`, the rescue layer answers a proxy error with a
//! *trailers-only* response: status 200, `content-type: application/grpc`, `grpc-status` and the
//! percent-encoded `grpc-message` in the headers, and no body. The status codes follow gRPC's own
//! meaning: a missing route is UNIMPLEMENTED, an unreachable service UNAVAILABLE, a passed deadline
//! DEADLINE_EXCEEDED, an edge refusal by its HTTP status (401 UNAUTHENTICATED, 429
//! RESOURCE_EXHAUSTED, ...).
//!
//! Responses from instances pass through untouched, trailers included: the upstream client speaks
//! HTTP/2 to gRPC services and the stack's bodies carry trailer frames.

use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};

use crate::request_id::X_REQUEST_ID;
use crate::resilience::Deadline;
use crate::{Error, ProxyBody};

/// The caller's deadline for the call, e.g. `100m` (100 ms) or `5S`.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

const APPLICATION_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// The gRPC status codes the proxy answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Code {
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl Code {
    /// The `grpc-status` value: a decimal number.
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Code::Unknown => "2",
            Code::InvalidArgument => "3",
            Code::DeadlineExceeded => "4",
            Code::PermissionDenied => "7",
            Code::ResourceExhausted => "8",
            Code::FailedPrecondition => "9",
            Code::Unimplemented => "12",
            Code::Internal => "13",
            Code::Unavailable => "14",
            Code::Unauthenticated => "16",
        })
    }

    /// What a call the proxy could not deliver for `error` ends with.
    pub fn of(error: &Error) -> Self {
        match error {
            Error::NoRoute { .. }
            | Error::UnknownService(_)
            | Error::MethodNotAllowed { .. }
            | Error::NotYetAvailable { .. } => Code::Unimplemented,
            Error::BadRequest(_) => Code::InvalidArgument,
            Error::NoTarget | Error::InvalidRewrite => Code::Internal,
            Error::NoHealthyInstance(_)
            | Error::UpstreamFailed { .. }
            | Error::ConnectTimeout { .. }
            | Error::BreakerOpen { .. }
            | Error::BulkheadFull { .. } => Code::Unavailable,
            Error::Timeout { .. } => Code::DeadlineExceeded,
            Error::Refused(refusal) => Code::for_refusal(refusal.status),
        }
    }

    /// An edge check's refusal, by its HTTP status.
    pub fn for_refusal(status: StatusCode) -> Self {
        match status.as_u16() {
            400 | 411 | 414 | 415 | 422 | 431 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 | 405 | 501 => Code::Unimplemented,
            408 => Code::DeadlineExceeded,
            412 | 428 => Code::FailedPrecondition,
            // Too many calls, or too large a message: a limit of the caller's, as gRPC's own
            // servers report an oversized message.
            413 | 429 => Code::ResourceExhausted,
            502..=504 => Code::Unavailable,
            500..=599 => Code::Internal,
            _ => Code::Unknown,
        }
    }
}

/// True when the request is a gRPC call (`content-type: application/grpc`, `application/grpc+proto`,
/// ...). One header lookup.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// Reads a `grpc-timeout` value: 1 to 8 digits and a unit, `H` hours, `M` minutes, `S` seconds,
/// `m` milliseconds, `u` microseconds, `n` nanoseconds. `None` when malformed.
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits
        .iter()
        .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Gives a gRPC call the deadline its `grpc-timeout` asks for, as a [`Deadline`] the resilience
/// layer honours. A malformed value is ignored, as gRPC servers do; it still reaches the instance.
pub(crate) fn set_deadline<B>(request: &mut Request<B>) {
    let timeout = request
        .headers()
        .get(GRPC_TIMEOUT)
        .and_then(|value| parse_timeout(value.as_bytes()));
    if let Some(timeout) = timeout {
        request.extensions_mut().insert(Deadline::after(timeout));
    }
}

/// The trailers-only answer for a call the proxy could not deliver.
pub fn error_response(error: &Error, request_id: Option<&HeaderValue>) -> Response<ProxyBody> {
    let mut response = status_response(Code::of(error), &error.to_string(), request_id);
    if let Error::Refused(refusal) = error {
        // `www-authenticate`, `retry-after`, `ratelimit-*`: call metadata a client may read.
        for (name, value) in &refusal.headers {
            response.headers_mut().append(name, value.clone());
        }
    }
    response
}

/// A trailers-only gRPC response: headers with `grpc-status` and `grpc-message`, end of stream.
pub fn status_response(
    code: Code,
    message: &str,
    request_id: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    let mut response = Response::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, APPLICATION_GRPC);
    headers.insert(GRPC_STATUS, code.header_value());
    if let Ok(message) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert(GRPC_MESSAGE, message);
    }
    if let Some(id) = request_id {
        headers.insert(X_REQUEST_ID, id.clone());
    }
    response
}

/// `grpc-message` encoding: printable ASCII as is except `%`, every other byte as `%XX`.
fn percent_encode(message: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut encoded = String::with_capacity(message.len());
    for &byte in message.as_bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            encoded.push('%');
            encoded.push(char::from(HEX[usize::from(byte >> 4)]));
            encoded.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Refusal;

    #[test]
    fn timeouts_in_every_unit() {
        let cases: [(&[u8], Duration); 7] = [
            (b"2H", Duration::from_secs(7200)),
            (b"3M", Duration::from_secs(180)),
            (b"5S", Duration::from_secs(5)),
            (b"100m", Duration::from_millis(100)),
            (b"250u", Duration::from_micros(250)),
            (b"99999999n", Duration::from_nanos(99_999_999)),
            (b"0m", Duration::ZERO),
        ];
        for (value, want) in cases {
            assert_eq!(parse_timeout(value), Some(want), "{value:?}");
        }
    }

    #[test]
    fn malformed_timeouts_are_none() {
        for value in [
            &b""[..],
            b"m",
            b"100",
            b"100x",
            b"123456789m",
            b"-1S",
            b"1.5S",
            b" 1S",
            b"1s",
        ] {
            assert_eq!(parse_timeout(value), None, "{value:?}");
        }
    }

    #[test]
    fn grpc_is_told_by_its_content_type() {
        let mut headers = HeaderMap::new();
        assert!(!is_grpc(&headers));
        for (value, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/json", false),
            ("application/problem+json", false),
        ] {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_grpc(&headers), grpc, "{value}");
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(
            percent_encode("no route matches `/x`"),
            "no route matches `/x`"
        );
        assert_eq!(percent_encode("100% sure"), "100%25 sure");
        assert_eq!(percent_encode("line\nbreak é"), "line%0Abreak %C3%A9");
    }

    #[test]
    fn proxy_errors_map_to_grpc_codes() {
        let service: std::sync::Arc<str> = "recommendations".into();
        let cases = [
            (Error::NoRoute { path: "/x".into() }, Code::Unimplemented),
            (Error::UnknownService(service.clone()), Code::Unimplemented),
            (Error::NoHealthyInstance(service.clone()), Code::Unavailable),
            (
                Error::BreakerOpen {
                    service: service.clone(),
                    caller: "gateway".into(),
                    retry_in: Duration::from_secs(3),
                },
                Code::Unavailable,
            ),
            (
                Error::Timeout {
                    service: service.clone(),
                    after: Duration::from_millis(100),
                },
                Code::DeadlineExceeded,
            ),
            (
                Error::ConnectTimeout {
                    service: service.clone(),
                    instance: "recommendations-1".into(),
                },
                Code::Unavailable,
            ),
            (Error::BadRequest("bad"), Code::InvalidArgument),
            (Error::NoTarget, Code::Internal),
        ];
        for (error, code) in cases {
            assert_eq!(Code::of(&error), code, "{error}");
        }
        for (status, code) in [
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (429, Code::ResourceExhausted),
            (413, Code::ResourceExhausted),
            (400, Code::InvalidArgument),
            (500, Code::Internal),
            (503, Code::Unavailable),
        ] {
            let refusal = Refusal::new(
                StatusCode::from_u16(status).expect("status"),
                "urn:flotilla:problem:test",
                "Test",
                "refused",
            );
            assert_eq!(Code::of(&refusal.into()), code, "{status}");
        }
    }

    #[test]
    fn errors_are_trailers_only() {
        let refusal = Refusal::new(
            StatusCode::UNAUTHORIZED,
            "urn:flotilla:problem:unauthorized",
            "Unauthorized",
            "a bearer token is required",
        )
        .with_header(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        let id = HeaderValue::from_static("req-1");
        let response = error_response(&refusal.into(), Some(&id));
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers[CONTENT_TYPE], "application/grpc");
        assert_eq!(headers[GRPC_STATUS], "16");
        assert_eq!(headers[GRPC_MESSAGE], "a bearer token is required");
        assert_eq!(headers[X_REQUEST_ID], "req-1");
        assert_eq!(headers[http::header::WWW_AUTHENTICATE], "Bearer");
        assert!(http_body::Body::is_end_stream(response.body()));
    }
}
