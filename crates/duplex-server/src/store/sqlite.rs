//! The embedded default store: SQLite in WAL mode through sqlx.
//!
//! SQLite allows one writer at a time, so writes go through a pool of exactly one connection
//! (they queue in the pool instead of failing with `SQLITE_BUSY`), while reads use a separate
//! pool of read-only connections that WAL lets run beside the writer. `synchronous = NORMAL` in
//! WAL mode makes a committed transaction survive a crash of the process (`kill -9`); a power
//! loss may lose the last transactions, which `DUPLEX_SQLITE_SYNCHRONOUS=full` prevents at the
//! cost of an fsync per write.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row};

use super::{
    Change, CollectionSummary, Current, ListQuery, Page, Precondition, Record, Store, StoreError,
    new_record_id, next_version, now_micros, page_from_rows, render_document,
};

/// How many read connections run beside the writer.
const READERS: u32 = 4;

/// How long a statement waits for a lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Records in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    readers: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and migrates it.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
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
        Ok(SqliteStore { writer, readers })
    }
}

fn record_from_row(row: &SqliteRow) -> Result<Record, StoreError> {
    let document: String = row.try_get("doc")?;
    Ok(Record {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        document: Bytes::from(document),
    })
}

fn unique_violation_is_conflict(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
        _ => StoreError::Database(error),
    }
}

impl SqliteStore {
    async fn insert(
        &self,
        collection: &str,
        id: &str,
        fields: Map<String, Value>,
        precondition: Precondition,
    ) -> Result<Record, StoreError> {
        let mut fields = fields;
        super::strip_server_fields(&mut fields);
        let now = now_micros();
        let document = render_document(id, 1, now, now, fields);
        let text = std::str::from_utf8(&document).expect("serde_json writes UTF-8");
        let mut tx = self.writer.begin().await?;
        if precondition == Precondition::Absent {
            let existing: Option<i64> =
                sqlx::query_scalar("SELECT version FROM records WHERE collection = ? AND id = ?")
                    .bind(collection)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if existing.is_some() {
                return Err(StoreError::PreconditionFailed { current: existing });
            }
        }
        sqlx::query(
            "INSERT INTO records (collection, id, version, created_us, updated_us, doc) \
             VALUES (?, ?, 1, ?, ?, ?)",
        )
        .bind(collection)
        .bind(id)
        .bind(now)
        .bind(now)
        .bind(text)
        .execute(&mut *tx)
        .await
        .map_err(unique_violation_is_conflict)?;
        tx.commit().await?;
        Ok(Record {
            id: id.to_owned(),
            version: 1,
            document,
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create(
        &self,
        collection: &str,
        fields: Map<String, Value>,
    ) -> Result<Record, StoreError> {
        self.insert(collection, &new_record_id(), fields, Precondition::None)
            .await
    }

    async fn create_with_id(
        &self,
        collection: &str,
        id: &str,
        fields: Map<String, Value>,
    ) -> Result<Record, StoreError> {
        self.insert(collection, id, fields, Precondition::Absent)
            .await
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>, StoreError> {
        let row =
            sqlx::query("SELECT id, version, doc FROM records WHERE collection = ? AND id = ?")
                .bind(collection)
                .bind(id)
                .fetch_optional(&self.readers)
                .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    async fn update(
        &self,
        collection: &str,
        id: &str,
        change: Change,
        precondition: &Precondition,
    ) -> Result<Record, StoreError> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "SELECT version, created_us, updated_us, doc FROM records \
             WHERE collection = ? AND id = ?",
        )
        .bind(collection)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let current = row
            .map(|row| {
                Ok::<_, StoreError>(Current {
                    version: row.try_get("version")?,
                    created_us: row.try_get("created_us")?,
                    updated_us: row.try_get("updated_us")?,
                    document: row.try_get("doc")?,
                })
            })
            .transpose()?;
        let current = precondition.admit(current, |c| c.version)?;
        let (record, updated_us) = next_version(id, &current, change)?;
        let text = std::str::from_utf8(&record.document).expect("serde_json writes UTF-8");
        sqlx::query(
            "UPDATE records SET version = ?, updated_us = ?, doc = ? \
             WHERE collection = ? AND id = ?",
        )
        .bind(record.version)
        .bind(updated_us)
        .bind(text)
        .bind(collection)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn delete(
        &self,
        collection: &str,
        id: &str,
        precondition: &Precondition,
    ) -> Result<Record, StoreError> {
        let mut tx = self.writer.begin().await?;
        let row =
            sqlx::query("SELECT id, version, doc FROM records WHERE collection = ? AND id = ?")
                .bind(collection)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let record = row.as_ref().map(record_from_row).transpose()?;
        let record = precondition.admit(record, |r| r.version)?;
        sqlx::query("DELETE FROM records WHERE collection = ? AND id = ?")
            .bind(collection)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn list(&self, collection: &str, query: &ListQuery) -> Result<Page, StoreError> {
        let (key, direction, comparison) = query.order.sql();
        // Only the static fragments above and placeholders go into the text; every value is bound.
        let mut sql =
            format!("SELECT seq, {key} AS sort_key, doc FROM records WHERE collection = ?");
        if query.after.is_some() {
            sql.push_str(&format!(" AND ({key}, seq) {comparison} (?, ?)"));
        }
        for _ in &query.filters {
            sql.push_str(" AND (doc -> ?) IN (?, ?)");
        }
        sql.push_str(&format!(
            " ORDER BY {key} {direction}, seq {direction} LIMIT ?"
        ));

        let mut statement = sqlx::query(AssertSqlSafe(sql)).bind(collection);
        if let Some(after) = &query.after {
            statement = statement.bind(after.key).bind(after.seq);
        }
        for filter in &query.filters {
            let (as_string, as_scalar) = filter.json_candidates();
            statement = statement
                .bind(format!("$.\"{}\"", filter.field))
                .bind(as_string)
                .bind(as_scalar);
        }
        let limit = i64::from(query.limit);
        let rows = statement.bind(limit + 1).fetch_all(&self.readers).await?;

        page_from_rows(
            rows.iter().map(|row| {
                Ok((
                    row.try_get::<String, _>("doc")?,
                    row.try_get::<i64, _>("sort_key")?,
                    row.try_get::<i64, _>("seq")?,
                ))
            }),
            query,
        )
    }

    async fn collections(&self) -> Result<Vec<CollectionSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT collection, COUNT(*) AS records FROM records \
             GROUP BY collection ORDER BY collection",
        )
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(CollectionSummary {
                    name: row.try_get("collection")?,
                    records: u64::try_from(row.try_get::<i64, _>("records")?).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn secret(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        sqlx::query("INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)")
            .bind(name)
            .bind(super::new_secret())
            .execute(&self.writer)
            .await?;
        let value: Vec<u8> = sqlx::query_scalar("SELECT value FROM secrets WHERE name = ?")
            .bind(name)
            .fetch_one(&self.writer)
            .await?;
        Ok(value)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    async fn close(&self) {
        self.readers.close().await;
        self.writer.close().await;
    }
}
