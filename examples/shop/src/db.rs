//! SQLite storage under the service's data directory.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use std::{env, fs};

use rusqlite::Connection;

use crate::{BoxError, Problem};

/// How long a statement waits for another connection's write lock. Replicas of one service share
/// their data directory, hence their database file, so brief contention is normal.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The service's own storage directory: `$FLOTILLA_DATA_DIR`, or `./data` when run by hand.
pub fn data_dir() -> PathBuf {
    env::var_os("FLOTILLA_DATA_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| PathBuf::from("data"), PathBuf::from)
}

/// Opens (creating it and its directory if needed) `file_name` in the data directory, in WAL mode
/// so that readers never block the writer.
pub fn open_db(file_name: &str) -> Result<Connection, BoxError> {
    let dir = data_dir();
    fs::create_dir_all(&dir)
        .map_err(|err| format!("cannot create data directory {}: {err}", dir.display()))?;
    let path = dir.join(file_name);
    let conn = Connection::open(&path)
        .map_err(|err| format!("cannot open database {}: {err}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("database {} refused WAL mode (got {mode})", path.display()).into());
    }
    // With WAL, NORMAL stays consistent across crashes and avoids an fsync per commit.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// A connection shared by a service's handlers.
///
/// Queries are quick but blocking, and may wait on another replica's lock, so they run on the
/// blocking pool; the mutex is only ever held inside [`Db::call`], never across an `.await`.
#[derive(Clone)]
pub struct Db(Arc<Mutex<Connection>>);

impl Db {
    /// Opens `file_name` (see [`open_db`]) and applies `schema`, a batch of idempotent
    /// statements (`CREATE TABLE IF NOT EXISTS ...`).
    pub fn open(file_name: &str, schema: &str) -> Result<Self, BoxError> {
        let conn = open_db(file_name)?;
        conn.execute_batch(schema)?;
        Ok(Self(Arc::new(Mutex::new(conn))))
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, Problem>
    where
        F: FnOnce(&mut Connection) -> Result<T, Problem> + Send + 'static,
        T: Send + 'static,
    {
        let conn = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || {
            // A panic cannot leave the connection half-way: an open transaction rolls back on drop.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await
        .unwrap_or_else(|err| {
            eprintln!("database task failed: {err}");
            Err(Problem::internal())
        })
    }

    /// Runs `f` synchronously; for start-up work such as seeding, before the server runs.
    pub fn blocking<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let mut conn = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut conn)
    }
}

impl From<rusqlite::Error> for Problem {
    fn from(err: rusqlite::Error) -> Self {
        eprintln!("database error: {err}");
        if err.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) {
            // Another replica held the lock past the busy timeout: worth retrying, not a bug.
            return Problem::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "the database is busy; retry shortly",
            );
        }
        Problem::internal()
    }
}
