//! The one [`Backend`] over SQL: every statement runs from here, generic over the database; a
//! database ([`super::sqlite`], [`super::postgres`]) brings its [`Dialect`] (the statements in
//! its SQL, its placeholders and how it filters on a JSON field) and how it opens its pools.

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::{
    AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool,
    Type,
};

use super::backend::{Admit, Backend, Current, Decide, Inserted, Listed, NewRow};
use super::{CollectionSummary, FieldFilter, ListQuery, Record, StoreError};

/// The statements of [`SqlBackend`], each with its placeholders numbered as listed.
#[derive(Debug)]
pub(crate) struct Statements {
    /// collection, id, at_us, document; returns `id` when the row went in and nothing when the
    /// id was taken.
    pub(crate) insert: &'static str,
    /// collection, id → `id`, `version`, `doc`.
    pub(crate) get: &'static str,
    /// collection, id → `version`, `created_us`, `updated_us`, `doc`, locked until the end of
    /// the transaction where the database locks rows.
    pub(crate) lock_current: &'static str,
    /// version, updated_us, document, collection, id.
    pub(crate) update: &'static str,
    /// collection, id → `id`, `version`, `doc`, locked as `lock_current` is.
    pub(crate) lock_record: &'static str,
    /// collection, id.
    pub(crate) delete: &'static str,
    /// → `collection`, `records`, by name.
    pub(crate) collections: &'static str,
    /// name, value; keeps a secret unless one by that name is kept.
    pub(crate) keep_secret: &'static str,
    /// name → `value`.
    pub(crate) read_secret: &'static str,
}

/// What a database brings to [`SqlBackend`].
pub(crate) trait Dialect: Database {
    /// Its statements.
    const STATEMENTS: Statements;

    /// The `n`th (from 1) placeholder of a statement built at run time.
    fn placeholder(n: usize) -> String;

    /// The condition that `filter` matches, its placeholders numbered from `first`, and the
    /// values they bind, in order.
    fn filter(filter: &FieldFilter, first: usize) -> (String, Vec<String>);
}

/// Records in a SQL database: writes go through `writer` (SQLite's one connection, or the
/// pool), reads through `readers` (which may be the same pool).
#[derive(Debug)]
pub(crate) struct SqlBackend<DB: Database> {
    pub(crate) writer: Pool<DB>,
    pub(crate) readers: Pool<DB>,
}

#[derive(FromRow)]
struct RecordRow {
    id: String,
    version: i64,
    doc: String,
}

impl From<RecordRow> for Record {
    fn from(row: RecordRow) -> Record {
        Record {
            id: row.id,
            version: row.version,
            document: Bytes::from(row.doc),
        }
    }
}

#[derive(FromRow)]
struct CurrentRow {
    version: i64,
    created_us: i64,
    updated_us: i64,
    doc: String,
}

#[derive(FromRow)]
struct ListedRow {
    doc: String,
    sort_key: i64,
    seq: i64,
}

#[derive(FromRow)]
struct CollectionRow {
    collection: String,
    records: i64,
}

/// The SQL of a listing: the order's key, then `(key, seq)` after the cursor, the filters, and
/// the limit; with the filters' values to bind after the collection and cursor.
fn list_sql<DB: Dialect>(query: &ListQuery) -> (String, Vec<String>) {
    let (key, direction, comparison) = query.order.sql();
    let p = DB::placeholder;
    // Only static fragments and placeholders go into the text; every value is bound.
    let mut sql = format!(
        "SELECT seq, {key} AS sort_key, doc FROM records WHERE collection = {}",
        p(1)
    );
    let mut n = 1;
    if query.after.is_some() {
        sql.push_str(&format!(
            " AND ({key}, seq) {comparison} ({}, {})",
            p(n + 1),
            p(n + 2)
        ));
        n += 2;
    }
    let mut values = Vec::new();
    for filter in &query.filters {
        let (condition, bound) = DB::filter(filter, n + 1);
        sql.push_str(" AND ");
        sql.push_str(&condition);
        n += bound.len();
        values.extend(bound);
    }
    sql.push_str(&format!(
        " ORDER BY {key} {direction}, seq {direction} LIMIT {}",
        p(n + 1)
    ));
    (sql, values)
}

#[async_trait]
impl<DB> Backend for SqlBackend<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> &'t [u8]: Encode<'t, DB> + Type<DB>,
    for<'t> String: Encode<'t, DB> + Decode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Decode<'t, DB> + Type<DB>,
    for<'t> Vec<u8>: Decode<'t, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
    usize: ColumnIndex<DB::Row>,
{
    async fn insert(&self, row: NewRow<'_>) -> Result<Inserted, StoreError> {
        let inserted: Option<String> = sqlx::query_scalar(DB::STATEMENTS.insert)
            .bind(row.collection)
            .bind(row.id)
            .bind(row.at_us)
            .bind(row.document)
            .fetch_optional(&self.writer)
            .await?;
        Ok(match inserted {
            Some(_) => Inserted::Yes,
            None => Inserted::Taken,
        })
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>, StoreError> {
        let row: Option<RecordRow> = sqlx::query_as(DB::STATEMENTS.get)
            .bind(collection)
            .bind(id)
            .fetch_optional(&self.readers)
            .await?;
        Ok(row.map(Record::from))
    }

    async fn update(
        &self,
        collection: &str,
        id: &str,
        decide: Decide<'_>,
    ) -> Result<Record, StoreError> {
        let mut tx = self.writer.begin().await?;
        let row: Option<CurrentRow> = sqlx::query_as(DB::STATEMENTS.lock_current)
            .bind(collection)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let next = decide(row.map(|row| Current {
            version: row.version,
            created_us: row.created_us,
            updated_us: row.updated_us,
            document: row.doc,
        }))?;
        let text = std::str::from_utf8(&next.record.document).expect("serde_json writes UTF-8");
        sqlx::query(DB::STATEMENTS.update)
            .bind(next.record.version)
            .bind(next.updated_us)
            .bind(text)
            .bind(collection)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(next.record)
    }

    async fn delete(
        &self,
        collection: &str,
        id: &str,
        admit: Admit<'_>,
    ) -> Result<Record, StoreError> {
        let mut tx = self.writer.begin().await?;
        let row: Option<RecordRow> = sqlx::query_as(DB::STATEMENTS.lock_record)
            .bind(collection)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let record = admit(row.map(Record::from))?;
        sqlx::query(DB::STATEMENTS.delete)
            .bind(collection)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn list(
        &self,
        collection: &str,
        query: &ListQuery,
        rows: i64,
    ) -> Result<Vec<Listed>, StoreError> {
        let (sql, values) = list_sql::<DB>(query);
        let mut statement = sqlx::query_as(AssertSqlSafe(sql)).bind(collection);
        if let Some(after) = &query.after {
            statement = statement.bind(after.key).bind(after.seq);
        }
        for value in values {
            statement = statement.bind(value);
        }
        let found: Vec<ListedRow> = statement.bind(rows).fetch_all(&self.readers).await?;
        Ok(found
            .into_iter()
            .map(|row| (row.doc, row.sort_key, row.seq))
            .collect())
    }

    async fn collections(&self) -> Result<Vec<CollectionSummary>, StoreError> {
        let rows: Vec<CollectionRow> = sqlx::query_as(DB::STATEMENTS.collections)
            .fetch_all(&self.readers)
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| CollectionSummary {
                name: row.collection,
                records: u64::try_from(row.records).unwrap_or(0),
            })
            .collect())
    }

    async fn keep_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        sqlx::query(DB::STATEMENTS.keep_secret)
            .bind(name)
            .bind(candidate)
            .execute(&self.writer)
            .await?;
        let value: Vec<u8> = sqlx::query_scalar(DB::STATEMENTS.read_secret)
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
