//! The HTTP server every service runs: port, health check, request log, graceful stop.

use std::env;
use std::fmt::Arguments;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::time::Instant;

use axum::extract::Request;
use axum::http::{Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::{BoxError, Problem};

/// Serves `app` on `127.0.0.1:$PORT` until SIGTERM or SIGINT, then lets in-flight requests
/// finish and returns.
///
/// Adds what every service shares: `GET /healthz`, problem+json for unknown paths (404) and
/// methods (405), and one stdout line per request such as `POST /orders 201 3ms`. Without `PORT`
/// it takes any free port; the start-up line says which.
pub async fn serve(service: &str, app: Router) -> Result<(), BoxError> {
    let port = port()?;
    // Handlers go in before the socket opens: the platform may send SIGTERM as soon as we are
    // healthy, and the default action would kill us mid-request with a non-zero status.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|err| format!("cannot listen on 127.0.0.1:{port}: {err}"))?;

    // The 405 fallback only reaches routes that exist when it is set, so it comes after them all.
    let app = app
        .route("/healthz", get(healthz))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn(log_request));

    log(format_args!(
        "{service} listening on {}",
        listener.local_addr()?
    ));
    let name = service.to_owned();
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        log(format_args!("{name} shutting down"));
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    log(format_args!("{service} stopped"));
    Ok(())
}

fn port() -> Result<u16, BoxError> {
    match env::var("PORT") {
        Ok(port) => port
            .trim()
            .parse()
            .map_err(|_| format!("PORT must be a port number, not {port:?}").into()),
        Err(env::VarError::NotPresent) => Ok(0),
        Err(env::VarError::NotUnicode(port)) => {
            Err(format!("PORT must be a port number, not {port:?}").into())
        }
    }
}

/// Writes one line to stdout.
///
/// Rust's stdout flushes at each newline even into a pipe, which is what the platform's log
/// capture needs. Unlike `println!`, a closed stdout is ignored rather than a panic.
fn log(line: Arguments<'_>) {
    let _ = writeln!(io::stdout().lock(), "{line}");
}

async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // The trace id from W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), so Flotilla can
    // put this line next to the others of the same request.
    let trace_id = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|id| format!(" trace_id={id}"))
        .unwrap_or_default();
    let started = Instant::now();
    let response = next.run(req).await;
    // Probes arrive every few seconds per instance; logging them would bury the real traffic.
    if path == "/healthz" && response.status().is_success() {
        return response;
    }
    log(format_args!(
        "{method} {path} {} {}ms{trace_id}",
        response.status().as_u16(),
        started.elapsed().as_millis()
    ));
    response
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn not_found(method: Method, uri: Uri) -> Problem {
    Problem::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Problem {
    Problem::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
