//! Shared plumbing for the shop's Rust services (inventory, payments, shipping, orders).
//!
//! Every service honours the same process contract — serve on `127.0.0.1:$PORT`, keep state under
//! `$FLOTILLA_DATA_DIR`, answer `/healthz`, log one line per request, stop cleanly on SIGTERM — and
//! the same error shape (RFC 7807 problem+json), so the four binaries only hold their own logic.
//! A service that calls others does so through a [`Dependency`] each, which forwards the tracing
//! headers, bounds every call in time and turns failures into problems naming the dependency.
//! Every mutating route keeps the `Idempotency-Key` contract through [`idempotent`], so that a
//! caller's retry (the saga orchestrator's above all) never does a step twice.

mod client;
mod db;
pub mod idempotency;
mod problem;
mod server;

use std::process::ExitCode;
use std::time::SystemTime;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub use client::{CallError, Dependency, trace_headers};
pub use db::{Db, data_dir, open_db};
pub use idempotency::idempotent;
pub use problem::{JsonBody, PathParam, Problem, QueryParam};
pub use server::serve;

/// The error type of start-up code, where anything that fails ends the process.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Turns the outcome of a service's `run` into its exit status, reporting a failure on stderr.
pub fn exit_code(service: &str, outcome: Result<(), BoxError>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{service}: error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// A JSON answer with a `Location` header: 201 for a new resource, or 200 when an idempotent
/// retry finds the one it created before.
pub fn located(status: StatusCode, location: String, body: impl Serialize) -> Response {
    (status, [(header::LOCATION, location)], Json(body)).into_response()
}

/// A fresh identifier such as `ord_3f9a0c1e5b7d2846`.
///
/// 64 random bits keep replicas that share one database from colliding without coordination.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

/// The current time as RFC 3339 in UTC, to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The largest amount of money accepted anywhere, in cents: ten billion currency units.
///
/// Bounding amounts keeps every sum of prices times quantities far inside `i64`.
pub const MAX_CENTS: i64 = 1_000_000_000_000;

/// Converts an amount in currency units (a JSON number such as `12.5`) to whole cents.
///
/// Money is stored and summed in integer cents so that totals never show float noise such as
/// `0.30000000000000004`. Returns `None` for NaN, infinities, negatives and amounts above
/// [`MAX_CENTS`].
pub fn to_cents(amount: f64) -> Option<i64> {
    let cents = (amount * 100.0).round();
    // The range check runs on the float so that the cast below can never saturate.
    (cents.is_finite() && (0.0..=MAX_CENTS as f64).contains(&cents)).then_some(cents as i64)
}

/// Converts whole cents back to currency units for JSON.
pub fn from_cents(cents: i64) -> f64 {
    cents as f64 / 100.0
}

/// Serializes a field held in cents as currency units: `#[serde(serialize_with = "...")]`.
pub fn serialize_cents<S: serde::Serializer>(
    cents: &i64,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(from_cents(*cents))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cents_round_trip_without_float_noise() {
        assert_eq!(to_cents(12.5), Some(1250));
        assert_eq!(to_cents(0.1 + 0.2), Some(30));
        assert_eq!(from_cents(30), 0.3);
        assert_eq!(from_cents(149_900), 1499.0);
    }

    #[test]
    fn cents_reject_nonsense() {
        assert_eq!(to_cents(f64::NAN), None);
        assert_eq!(to_cents(f64::INFINITY), None);
        assert_eq!(to_cents(-1.0), None);
        assert_eq!(to_cents(1e300), None);
    }

    #[test]
    fn ids_carry_their_prefix_and_sixteen_hex_digits() {
        let id = new_id("ord");
        let hex = id.strip_prefix("ord_").expect("prefix");
        assert_eq!(hex.len(), 16);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
