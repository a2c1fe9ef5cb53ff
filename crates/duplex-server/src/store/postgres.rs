//! Records in PostgreSQL (`--store postgres://…`), for several nodes sharing one database.
//!
//! The same layout and semantics as SQLite (versions, ETags, keyset cursors, filters): `doc` holds
//! the served document as text, `doc_json` the same document as JSONB for filtering. Writes run in
//! a transaction that locks the row (`SELECT … FOR UPDATE`), so concurrent writers on any node
//! see each other's versions. `?options[search_path]=NAME` puts the tables in schema NAME (created
//! if missing), which is how tests get a database of their own.

use serde_json::Value;
use sqlx::Postgres;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions as _};
use std::str::FromStr as _;

use super::sql::{Dialect, SqlBackend, Statements};
use super::{FieldFilter, StoreError};

/// Connections per node.
const POOL_SIZE: u32 = 16;

/// The schema named by `options[search_path]=…` in a URL, if any.
fn search_path(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        let key = key.replace("%5B", "[").replace("%5D", "]");
        (key == "options[search_path]").then(|| value.to_owned())
    })
}

/// Connects to the database at `url` and migrates it.
pub(crate) async fn open(url: &str) -> Result<SqlBackend<Postgres>, StoreError> {
    let options = PgConnectOptions::from_str(url)?.log_statements(tracing::log::LevelFilter::Trace);
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
    Ok(SqlBackend {
        writer: pool.clone(),
        readers: pool,
    })
}

impl Dialect for Postgres {
    const STATEMENTS: Statements = Statements {
        insert: "INSERT INTO records (collection, id, version, created_us, updated_us, doc, doc_json) \
                 VALUES ($1, $2, 1, $3, $3, $4, $4::jsonb) ON CONFLICT (collection, id) DO NOTHING \
                 RETURNING id",
        get: "SELECT id, version, doc FROM records WHERE collection = $1 AND id = $2",
        lock_current: "SELECT version, created_us, updated_us, doc FROM records \
                       WHERE collection = $1 AND id = $2 FOR UPDATE",
        update: "UPDATE records SET version = $1, updated_us = $2, doc = $3, doc_json = $3::jsonb \
                 WHERE collection = $4 AND id = $5",
        lock_record: "SELECT id, version, doc FROM records \
                      WHERE collection = $1 AND id = $2 FOR UPDATE",
        delete: "DELETE FROM records WHERE collection = $1 AND id = $2",
        collections: "SELECT collection, COUNT(*) AS records FROM records \
                      GROUP BY collection ORDER BY collection",
        keep_secret: "INSERT INTO secrets (name, value) VALUES ($1, $2) \
                      ON CONFLICT (name) DO NOTHING",
        read_secret: "SELECT value FROM secrets WHERE name = $1",
    };

    fn placeholder(n: usize) -> String {
        format!("${n}")
    }

    /// The document contains `{field: candidate}` for one of the two JSON candidates (a GIN
    /// index on `doc_json` can answer it).
    fn filter(filter: &FieldFilter, first: usize) -> (String, Vec<String>) {
        let (as_string, as_scalar) = filter.json_candidates();
        let contains = |json: &str| format!("{{{}:{json}}}", Value::String(filter.field.clone()));
        let condition = format!(
            "(doc_json @> ${}::jsonb OR doc_json @> ${}::jsonb)",
            first,
            first + 1
        );
        (condition, vec![contains(&as_string), contains(&as_scalar)])
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
