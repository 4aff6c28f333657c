//! The `Idempotency-Key` contract every mutating route of the shop keeps.
//!
//! Callers that retry — the saga orchestrator above all, which sends
//! `Idempotency-Key: <saga id>/<step>/<action|compensate>` and retries 5xx and timeouts with the
//! same key — must not make a step happen twice. [`idempotent`] wraps a service's router so that
//! a `POST`, `PUT`, `PATCH` or `DELETE` carrying the header runs its handler once:
//!
//! - the first completed answer (status, `Content-Type`, `Location`, body) is stored under the
//!   key in the service's own database, table `idempotency_keys`, and a repeat is answered with
//!   it (plus `Idempotent-Replayed: true`) without running the handler again;
//! - a 5xx is not stored: it says nothing was done for sure, so the retry runs again;
//! - the key used again for another method or path is a 422: it is the caller's bug;
//! - a repeat that arrives while the first is still running waits for it (up to
//!   [`WAIT_FOR_FIRST`]), then gets a 503 with `Retry-After`, which every caller here retries
//!   (a 409 would be read by the orchestrator as a permanent failure of a step that may succeed);
//! - keys are at most [`MAX_KEY_LEN`] bytes of visible ASCII, else 400;
//! - stored answers are kept [`RETENTION`] and deleted opportunistically afterwards.
//!
//! Replicas of a service share its database file, so the claim on a key is a row inserted in an
//! immediate transaction: whichever replica inserts it first runs the handler.
//!
//! Requests without the header are passed through untouched; the services' own per-order
//! idempotency (one reservation per order, ...) still holds for them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::{BoxError, Db, Problem};

/// The request header, as the IETF draft `draft-ietf-httpapi-idempotency-key-header` names it.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Set on an answer that was replayed from the store rather than produced by the handler.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest key accepted, in bytes: a saga id, a step name and an action fit easily.
pub const MAX_KEY_LEN: usize = 255;

/// How long a stored answer is replayed. The orchestrator's retries end long before.
pub const RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a repeat waits for the first request with its key to finish.
pub const WAIT_FOR_FIRST: Duration = Duration::from_secs(10);

/// How often a waiting repeat looks at the store again.
const POLL: Duration = Duration::from_millis(50);

/// After this long a claim still `running` is taken to belong to a process that died mid-way
/// (a crash leaves the row behind), and the next request with the key runs the handler itself.
/// Every shop handler answers well within it: their calls are bounded by their timeouts.
const ABANDONED_AFTER: Duration = Duration::from_secs(60);

/// The largest answer stored; the shop's answers are a few KiB at most.
const MAX_STORED_BODY: usize = 1 << 20;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS idempotency_keys (
        key          TEXT PRIMARY KEY,
        method       TEXT NOT NULL,
        path         TEXT NOT NULL,
        -- 'running' while the first request is in its handler, then 'done'.
        state        TEXT NOT NULL,
        -- Unix seconds: when the claim was taken (running) or the answer stored (done).
        updated_at   INTEGER NOT NULL,
        status       INTEGER,
        content_type TEXT,
        location     TEXT,
        body         BLOB
    );
    CREATE INDEX IF NOT EXISTS idempotency_keys_updated_at ON idempotency_keys (updated_at);
";

const RUNNING: &str = "running";
const DONE: &str = "done";

/// Wraps `router` so that its mutating routes keep the contract above, storing answers in `db`
/// (whose `idempotency_keys` table is created here if missing).
///
/// Apply it to the service's own routes, before [`crate::serve`] adds the shared ones.
pub fn idempotent(router: Router, db: &Db) -> Result<Router, BoxError> {
    db.blocking(|conn| conn.execute_batch(SCHEMA))?;
    Ok(router.layer(middleware::from_fn_with_state(db.clone(), layer)))
}

async fn layer(State(db): State<Db>, request: Request, next: Next) -> Response {
    let mutating = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    if !mutating {
        return next.run(request).await;
    }
    let key = match key_of(request.headers()) {
        Ok(Some(key)) => key,
        Ok(None) => return next.run(request).await,
        Err(problem) => return problem.into_response(),
    };
    let target = Target {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
    };

    match wait_for_claim(&db, &key, &target).await {
        Ok(Claimed::Ours) => {}
        Ok(Claimed::Stored(stored)) => return stored.into_response(),
        Err(response) => return response,
    }
    // From here on the claim is ours; the guard gives it up should the handler never finish
    // (the client hung up and the request was dropped, or the handler panicked).
    let mut guard = ClaimGuard {
        db: db.clone(),
        key: Some(key.clone()),
    };
    let response = next.run(request).await;
    let status = response.status();
    if status.is_server_error() {
        // Nothing is known to be done: the retry must run the handler again.
        guard.release_now().await;
        return response;
    }
    let (parts, body) = response.into_parts();
    let body = match axum::body::to_bytes(body, MAX_STORED_BODY).await {
        Ok(body) => body,
        Err(err) => {
            eprintln!("idempotency key {key}: cannot read the answer to store it: {err}");
            guard.release_now().await;
            return Problem::internal().into_response();
        }
    };
    let stored = Stored {
        status,
        content_type: header_text(&parts.headers, header::CONTENT_TYPE),
        location: header_text(&parts.headers, header::LOCATION),
        body: body.clone(),
    };
    match db.call(move |conn| Ok(store(conn, &key, &stored)?)).await {
        // The answer is stored: the claim has become the record, nothing to give up.
        Ok(()) => guard.key = None,
        // The handler's work is done, so its answer still goes out; a repeat will run it again,
        // which the services' own per-order idempotency absorbs.
        Err(problem) => {
            eprintln!("could not store an idempotent answer: {problem}");
            guard.release_now().await;
        }
    }
    Response::from_parts(parts, Body::from(body))
}

/// The key of a request, if it has one; 400 when it is empty, too long or not visible ASCII.
fn key_of(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Problem::bad_request(
            "send at most one Idempotency-Key header",
        ));
    }
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|key| !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            Problem::bad_request("Idempotency-Key must be non-empty visible ASCII characters")
        })?;
    if key.len() > MAX_KEY_LEN {
        return Err(Problem::bad_request(format!(
            "Idempotency-Key must be at most {MAX_KEY_LEN} bytes, not {}",
            key.len()
        )));
    }
    Ok(Some(key.to_owned()))
}

fn header_text(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// What a key was first used for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    method: String,
    path: String,
}

/// A stored answer.
#[derive(Debug, Clone)]
struct Stored {
    status: StatusCode,
    content_type: Option<String>,
    location: Option<String>,
    body: Bytes,
}

impl IntoResponse for Stored {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body).into_response();
        let headers = response.headers_mut();
        // `(StatusCode, Bytes)` sets `application/octet-stream`: the stored type replaces it.
        headers.remove(header::CONTENT_TYPE);
        let stored = [
            (header::CONTENT_TYPE, self.content_type),
            (header::LOCATION, self.location),
        ];
        for (name, value) in stored {
            if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(name, value);
            }
        }
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        response
    }
}

enum Claimed {
    /// This request holds the key: run the handler.
    Ours,
    /// An earlier request with the key finished: answer as it did.
    Stored(Stored),
}

enum Attempt {
    Claimed(Claimed),
    /// Another request with the key is still running.
    Busy,
}

/// Claims `key`, or waits (bounded) for the request that holds it.
async fn wait_for_claim(db: &Db, key: &str, target: &Target) -> Result<Claimed, Response> {
    let deadline = tokio::time::Instant::now() + WAIT_FOR_FIRST;
    loop {
        let (key, target) = (key.to_owned(), target.clone());
        let attempt = db.call(move |conn| try_claim(conn, &key, &target)).await;
        match attempt.map_err(IntoResponse::into_response)? {
            Attempt::Claimed(claimed) => return Ok(claimed),
            Attempt::Busy if tokio::time::Instant::now() + POLL < deadline => {
                tokio::time::sleep(POLL).await;
            }
            Attempt::Busy => {
                let mut response = Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "a request with this Idempotency-Key is still in progress; retry shortly",
                )
                .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return Err(response);
            }
        }
    }
}

fn try_claim(conn: &mut Connection, key: &str, target: &Target) -> Result<Attempt, Problem> {
    let now = unix_now();
    // Immediate: between reading the key and inserting it, no other replica may insert it.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Cheap with the index, and keeps the table at a day's worth of keys.
    tx.execute(
        "DELETE FROM idempotency_keys WHERE updated_at < ?1",
        [now - RETENTION.as_secs() as i64],
    )?;
    let row = tx
        .query_row(
            "SELECT method, path, state, updated_at, status, content_type, location, body
             FROM idempotency_keys WHERE key = ?1",
            [key],
            |row| {
                Ok((
                    Target {
                        method: row.get(0)?,
                        path: row.get(1)?,
                    },
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, Option<u16>>(4)?,
                    row.get::<_, Option<String>>(5)?,
                    row.get::<_, Option<String>>(6)?,
                    row.get::<_, Option<Vec<u8>>>(7)?,
                ))
            },
        )
        .optional()?;
    let Some((used_for, state, updated_at, status, content_type, location, body)) = row else {
        tx.execute(
            "INSERT INTO idempotency_keys (key, method, path, state, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![key, target.method, target.path, RUNNING, now],
        )?;
        tx.commit()?;
        return Ok(Attempt::Claimed(Claimed::Ours));
    };
    if used_for != *target {
        return Err(Problem::unprocessable(format!(
            "this Idempotency-Key was already used for {} {}; use a new key for {} {}",
            used_for.method, used_for.path, target.method, target.path
        )));
    }
    if state == DONE {
        let status = status
            .and_then(|status| StatusCode::from_u16(status).ok())
            .ok_or_else(|| {
                eprintln!("idempotency key {key}: stored without a valid status");
                Problem::internal()
            })?;
        return Ok(Attempt::Claimed(Claimed::Stored(Stored {
            status,
            content_type,
            location,
            body: Bytes::from(body.unwrap_or_default()),
        })));
    }
    if now - updated_at > ABANDONED_AFTER.as_secs() as i64 {
        eprintln!("idempotency key {key}: taking over a claim abandoned since {updated_at}");
        tx.execute(
            "UPDATE idempotency_keys SET updated_at = ?2 WHERE key = ?1",
            params![key, now],
        )?;
        tx.commit()?;
        return Ok(Attempt::Claimed(Claimed::Ours));
    }
    Ok(Attempt::Busy)
}

fn store(conn: &Connection, key: &str, stored: &Stored) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE idempotency_keys
         SET state = ?2, updated_at = ?3, status = ?4, content_type = ?5, location = ?6, body = ?7
         WHERE key = ?1",
        params![
            key,
            DONE,
            unix_now(),
            stored.status.as_u16(),
            stored.content_type,
            stored.location,
            stored.body.as_ref(),
        ],
    )?;
    Ok(())
}

fn release(conn: &Connection, key: &str) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM idempotency_keys WHERE key = ?1 AND state = ?2",
        params![key, RUNNING],
    )?;
    Ok(())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64)
}

/// Gives up a claim whose request ends without a stored answer, so that a retry runs again.
struct ClaimGuard {
    db: Db,
    /// `None` once there is nothing left to give up.
    key: Option<String>,
}

impl ClaimGuard {
    async fn release_now(&mut self) {
        if let Some(key) = self.key.take() {
            let outcome = self.db.call(move |conn| Ok(release(conn, &key)?)).await;
            if let Err(problem) = outcome {
                eprintln!("could not give up an idempotency claim: {problem}");
            }
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        // Dropped mid-request: the release cannot be awaited here, so it runs on its own. If the
        // runtime is already gone, the claim is taken over once abandoned.
        if let Some(key) = self.key.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let db = self.db.clone();
            runtime.spawn(async move {
                let _ = db.call(move |conn| Ok(release(conn, &key)?)).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY, value.parse().unwrap());
        headers
    }

    #[test]
    fn accepts_saga_keys() {
        let key = key_of(&headers("sg_0123/reserve-stock/action")).unwrap();
        assert_eq!(key.as_deref(), Some("sg_0123/reserve-stock/action"));
        assert_eq!(key_of(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn rejects_long_empty_and_odd_keys() {
        let long = "k".repeat(MAX_KEY_LEN + 1);
        for bad in [long.as_str(), "", "   ", "a key"] {
            let problem = key_of(&headers(bad)).unwrap_err();
            assert_eq!(problem.status, StatusCode::BAD_REQUEST, "for {bad:?}");
        }
        assert!(key_of(&headers(&"k".repeat(MAX_KEY_LEN))).is_ok());
    }
}
