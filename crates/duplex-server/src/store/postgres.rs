//! Records in PostgreSQL (`--store postgres://…`), for several nodes sharing one database.
//!
//! The same layout and semantics as SQLite (versions, ETags, keyset cursors, filters): `doc` holds
//! the served document as text, `doc_json` the same document as JSONB for filtering. Writes run in
//! a transaction that locks the row (`SELECT … FOR UPDATE`), so concurrent writers on any node
//! see each other's versions. `?options[search_path]=NAME` puts the tables in schema NAME (created
//! if missing), which is how tests get a database of their own.

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, ConnectOptions as _, Row};
use std::str::FromStr as _;

use super::{
    Change, CollectionSummary, Current, ListQuery, Page, Precondition, Record, Store, StoreError,
    new_record_id, next_version, now_micros, page_from_rows, render_document,
};

/// Connections per node.
const POOL_SIZE: u32 = 16;

/// Records in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

/// The schema named by `options[search_path]=…` in a URL, if any.
fn search_path(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        let key = key.replace("%5B", "[").replace("%5D", "]");
        (key == "options[search_path]").then(|| value.to_owned())
    })
}

impl PostgresStore {
    /// Connects to the database at `url` and migrates it.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options =
            PgConnectOptions::from_str(url)?.log_statements(tracing::log::LevelFilter::Trace);
        if let Some(schema) = search_path(url) {
            if !schema
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(StoreError::UnsupportedUrl(format!(
                    "search_path {schema:?}: use letters, digits and _"
                )));
            }
            let mut connection = options.connect().await?;
            sqlx::query(AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
            )))
            .execute(&mut connection)
            .await?;
        }
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PostgresStore { pool })
    }
}

fn record_from_row(row: &PgRow) -> Result<Record, StoreError> {
    let document: String = row.try_get("doc")?;
    Ok(Record {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        document: Bytes::from(document),
    })
}

impl PostgresStore {
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
        let inserted = sqlx::query(
            "INSERT INTO records (collection, id, version, created_us, updated_us, doc, doc_json) \
             VALUES ($1, $2, 1, $3, $3, $4, $4::jsonb) ON CONFLICT (collection, id) DO NOTHING",
        )
        .bind(collection)
        .bind(id)
        .bind(now)
        .bind(text)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            if precondition == Precondition::Absent {
                let current: Option<i64> = sqlx::query_scalar(
                    "SELECT version FROM records WHERE collection = $1 AND id = $2",
                )
                .bind(collection)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
                return Err(StoreError::PreconditionFailed { current });
            }
            return Err(StoreError::Conflict);
        }
        Ok(Record {
            id: id.to_owned(),
            version: 1,
            document,
        })
    }
}

#[async_trait]
impl Store for PostgresStore {
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
            sqlx::query("SELECT id, version, doc FROM records WHERE collection = $1 AND id = $2")
                .bind(collection)
                .bind(id)
                .fetch_optional(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT version, created_us, updated_us, doc FROM records \
             WHERE collection = $1 AND id = $2 FOR UPDATE",
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
            "UPDATE records SET version = $1, updated_us = $2, doc = $3, doc_json = $3::jsonb \
             WHERE collection = $4 AND id = $5",
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
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT id, version, doc FROM records WHERE collection = $1 AND id = $2 FOR UPDATE",
        )
        .bind(collection)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let record = row.as_ref().map(record_from_row).transpose()?;
        let record = precondition.admit(record, |r| r.version)?;
        sqlx::query("DELETE FROM records WHERE collection = $1 AND id = $2")
            .bind(collection)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn list(&self, collection: &str, query: &ListQuery) -> Result<Page, StoreError> {
        let (key, direction, comparison) = query.order.sql();
        // Only the static fragments above and numbered placeholders go into the text.
        let mut sql =
            format!("SELECT seq, {key} AS sort_key, doc FROM records WHERE collection = $1");
        let mut n = 1;
        if query.after.is_some() {
            sql.push_str(&format!(
                " AND ({key}, seq) {comparison} (${}, ${})",
                n + 1,
                n + 2
            ));
            n += 2;
        }
        for _ in &query.filters {
            sql.push_str(&format!(
                " AND (doc_json @> ${}::jsonb OR doc_json @> ${}::jsonb)",
                n + 1,
                n + 2
            ));
            n += 2;
        }
        sql.push_str(&format!(
            " ORDER BY {key} {direction}, seq {direction} LIMIT ${}",
            n + 1
        ));

        let mut statement = sqlx::query(AssertSqlSafe(sql)).bind(collection);
        if let Some(after) = &query.after {
            statement = statement.bind(after.key).bind(after.seq);
        }
        for filter in &query.filters {
            let (as_string, as_scalar) = filter.json_candidates();
            let contains =
                |json: &str| format!("{{{}:{json}}}", Value::String(filter.field.clone()));
            statement = statement
                .bind(contains(&as_string))
                .bind(contains(&as_scalar));
        }
        let limit = i64::from(query.limit);
        let rows = statement.bind(limit + 1).fetch_all(&self.pool).await?;

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
        .fetch_all(&self.pool)
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
        sqlx::query(
            "INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(super::new_secret())
        .execute(&self.pool)
        .await?;
        let value: Vec<u8> = sqlx::query_scalar("SELECT value FROM secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(value)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::search_path;

    #[test]
    fn the_schema_comes_from_the_url() {
        assert_eq!(
            search_path("postgres://u@h/db?options[search_path]=t_1"),
            Some("t_1".into())
        );
        assert_eq!(
            search_path("postgres://u@h/db?sslmode=disable&options%5Bsearch_path%5D=x"),
            Some("x".into())
        );
        assert_eq!(search_path("postgres://u@h/db"), None);
    }
}
