//! The embedded default store: SQLite in WAL mode through sqlx.
//!
//! SQLite allows one writer at a time, so writes go through a pool of exactly one connection
//! (they queue in the pool instead of failing with `SQLITE_BUSY`), which also keeps other
//! writers out between a write's read and its write; reads use a separate pool of read-only
//! connections that WAL lets run beside the writer. `synchronous = NORMAL` in WAL mode makes a
//! committed transaction survive a crash of the process (`kill -9`); a power loss may lose the
//! last transactions, which `DUPLEX_SQLITE_SYNCHRONOUS=full` prevents at the cost of an fsync
//! per write.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Sqlite;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::sql::{Dialect, SqlBackend, Statements};
use super::{FieldFilter, StoreError};

/// How many read connections run beside the writer.
const READERS: u32 = 4;

/// How long a statement waits for a lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens (creating if needed) the database file at `path` and migrates it.
pub(crate) async fn open(path: impl AsRef<Path>) -> Result<SqlBackend<Sqlite>, StoreError> {
    let path = path.as_ref();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| {
            StoreError::Database(sqlx::Error::Configuration(
                format!("cannot create {}: {e}", parent.display()).into(),
            ))
        })?;
    }
    let synchronous = match std::env::var("DUPLEX_SQLITE_SYNCHRONOUS").as_deref() {
        Ok(value) => SqliteSynchronous::from_str(value).map_err(|e| {
            StoreError::Database(sqlx::Error::Configuration(
                format!("DUPLEX_SQLITE_SYNCHRONOUS: {e}").into(),
            ))
        })?,
        Err(_) => SqliteSynchronous::Normal,
    };
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true);
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await?;
    sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
    let readers = SqlitePoolOptions::new()
        .max_connections(READERS)
        .connect_with(options.read_only(true))
        .await?;
    Ok(SqlBackend { writer, readers })
}

impl Dialect for Sqlite {
    const STATEMENTS: Statements = Statements {
        insert: "INSERT INTO records (collection, id, version, created_us, updated_us, doc) \
                 VALUES (?1, ?2, 1, ?3, ?3, ?4) ON CONFLICT (collection, id) DO NOTHING \
                 RETURNING id",
        get: "SELECT id, version, doc FROM records WHERE collection = ?1 AND id = ?2",
        lock_current: "SELECT version, created_us, updated_us, doc FROM records \
                       WHERE collection = ?1 AND id = ?2",
        update: "UPDATE records SET version = ?1, updated_us = ?2, doc = ?3 \
                 WHERE collection = ?4 AND id = ?5",
        lock_record: "SELECT id, version, doc FROM records WHERE collection = ?1 AND id = ?2",
        delete: "DELETE FROM records WHERE collection = ?1 AND id = ?2",
        collections: "SELECT collection, COUNT(*) AS records FROM records \
                      GROUP BY collection ORDER BY collection",
        keep_secret: "INSERT OR IGNORE INTO secrets (name, value) VALUES (?1, ?2)",
        read_secret: "SELECT value FROM secrets WHERE name = ?1",
    };

    fn placeholder(n: usize) -> String {
        format!("?{n}")
    }

    /// The field's JSON text (`->` gives it) is one of the filter's two JSON candidates.
    fn filter(filter: &FieldFilter, first: usize) -> (String, Vec<String>) {
        let (as_string, as_scalar) = filter.json_candidates();
        let condition = format!("(doc -> ?{}) IN (?{}, ?{})", first, first + 1, first + 2);
        let path = format!("$.\"{}\"", filter.field);
        (condition, vec![path, as_string, as_scalar])
    }
}
