//! Records in PostgreSQL (`--store postgres://…`), for several nodes sharing one database.
//!
//! The same layout and semantics as SQLite (versions, ETags, keyset cursors, filters): `doc` holds
//! the served document as text, `doc_json` the same document as JSONB for filtering. Writes run in
//! a transaction that locks the row (`SELECT … FOR UPDATE`), so concurrent writers on any node
//! see each other's versions; PostgreSQL itself gathers the commits of concurrent writers into
//! shared WAL flushes, so writes run concurrently on the pool rather than through one writer.
//! Each write runs in a task of its own: a caller that stops waiting cannot cut it between its
//! commit and its announcement. Announcements keep the order in which rows were locked
//! ([`CommitOrder`]), so two writes to one record are announced in the order they committed. `?options[search_path]=NAME` puts the tables in schema NAME (created
//! if missing), which is how tests get a database of their own.

use std::str::FromStr as _;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions as _, FromRow};
use tokio::sync::{mpsc, oneshot};

use super::backend::{
    Admit, Backend, Committed, Current, Decide, Inserted, Listed, NewRow, Outboxed,
};
use super::outbox::{Live, Lost, NewEvent, Outbox, Pending, TakenOver};
use super::{CollectionSummary, FieldFilter, ListQuery, Record, StoreError};

/// Records in PostgreSQL.
#[derive(Debug)]
pub(crate) struct PgBackend {
    pool: PgPool,
    order: CommitOrder,
}

/// A committed write waiting to be announced.
type Announcement = (Committed, Record);

/// Announces writes in the order they took their place. An update or delete takes it while it
/// holds its row's lock, and an insert before it runs (a write that meets the new row waits for
/// its commit), so a later write to the same record always comes after; the places are filled
/// after `COMMIT`, and a write that did not commit leaves its place empty. The line holds one
/// place per write in flight (the pool and each caller waiting bound them), so it needs no bound
/// of its own.
#[derive(Debug, Clone)]
struct CommitOrder(mpsc::UnboundedSender<oneshot::Receiver<Announcement>>);

impl CommitOrder {
    fn start() -> CommitOrder {
        let (places, mut queue) = mpsc::unbounded_channel::<oneshot::Receiver<Announcement>>();
        tokio::spawn(async move {
            while let Some(place) = queue.recv().await {
                if let Ok((committed, record)) = place.await {
                    // PostgreSQL keeps no channel history: the event is published as it goes.
                    (committed.tell)(&record, None);
                }
            }
        });
        CommitOrder(places)
    }

    /// The next place in line; send it the announcement once the write committed.
    fn take_place(&self) -> oneshot::Sender<Announcement> {
        let (fill, place) = oneshot::channel();
        let _ = self.0.send(place);
        fill
    }
}

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

impl PgBackend {
    /// Its connections.
    pub(crate) fn pool(&self) -> PgPool {
        self.pool.clone()
    }
}

/// Connects to the database at `url` and migrates it.
pub(crate) async fn open(url: &str) -> Result<PgBackend, StoreError> {
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
    Ok(PgBackend {
        pool,
        order: CommitOrder::start(),
    })
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

/// Runs a write in a task of its own, so that it reaches its commit and its announcement even
/// if the caller stops waiting.
async fn detached<T: Send + 'static>(
    write: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::spawn(write)
        .await
        .map_err(|e| StoreError::Unavailable(format!("the write stopped: {e}")))?
}

/// The SQL of a listing: the order's key, then `(key, seq)` after the cursor, the filters (the
/// document contains `{field: candidate}` for one of the filter's two JSON candidates, which a
/// GIN index on `doc_json` can answer), and the limit.
fn list_sql(query: &ListQuery) -> (String, Vec<String>) {
    let (key, direction, comparison) = query.order.sql();
    // Only static fragments and numbered placeholders go into the text; every value is bound.
    let mut sql = format!("SELECT seq, {key} AS sort_key, doc FROM records WHERE collection = $1");
    let mut n = 1;
    if query.after.is_some() {
        sql.push_str(&format!(
            " AND ({key}, seq) {comparison} (${}, ${})",
            n + 1,
            n + 2
        ));
        n += 2;
    }
    let mut values = Vec::new();
    for filter in &query.filters {
        sql.push_str(&format!(
            " AND (doc_json @> ${}::jsonb OR doc_json @> ${}::jsonb)",
            n + 1,
            n + 2
        ));
        n += 2;
        values.extend(contains(filter));
    }
    sql.push_str(&format!(
        " ORDER BY {key} {direction}, seq {direction} LIMIT ${}",
        n + 1
    ));
    (sql, values)
}

/// `{field: candidate}` for both JSON candidates of a filter.
fn contains(filter: &FieldFilter) -> [String; 2] {
    let (as_string, as_scalar) = filter.json_candidates();
    let field = Value::String(filter.field.clone());
    [
        format!("{{{field}:{as_string}}}"),
        format!("{{{field}:{as_scalar}}}"),
    ]
}

#[async_trait]
impl Backend for PgBackend {
    async fn insert(&self, row: NewRow, committed: Committed) -> Result<Inserted, StoreError> {
        let pool = self.pool.clone();
        let place = self.order.take_place();
        detached(async move {
            let text = std::str::from_utf8(&row.record.document).expect("serde_json writes UTF-8");
            // With a webhook event, one statement inserts both (or neither).
            let sql = match row.outbox {
                None => {
                    "INSERT INTO records (collection, id, version, created_us, updated_us, doc, doc_json) \
                     VALUES ($1, $2, 1, $3, $3, $4, $4::jsonb) ON CONFLICT (collection, id) DO NOTHING \
                     RETURNING id"
                }
                Some(_) => {
                    "WITH inserted AS (INSERT INTO records \
                     (collection, id, version, created_us, updated_us, doc, doc_json) \
                     VALUES ($1, $2, 1, $3, $3, $4, $4::jsonb) ON CONFLICT (collection, id) DO NOTHING \
                     RETURNING id), \
                     outboxed AS (INSERT INTO webhook_outbox (node, at_us, body) \
                     SELECT $5, $6, $7 FROM inserted) \
                     SELECT id FROM inserted"
                }
            };
            let mut statement = sqlx::query_scalar(sql)
                .bind(&row.collection)
                .bind(&row.record.id)
                .bind(row.at_us)
                .bind(text);
            if let Some(outboxed) = &row.outbox {
                statement = statement
                    .bind(&outboxed.node)
                    .bind(outboxed.event.at_us)
                    .bind(&outboxed.event.body);
            }
            let inserted: Option<String> = statement.fetch_optional(&pool).await?;
            Ok(match inserted {
                Some(_) => {
                    let _ = place.send((committed, row.record));
                    Inserted::Yes
                }
                None => Inserted::Taken,
            })
        })
        .await
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>, StoreError> {
        let row: Option<RecordRow> = sqlx::query_as(
            "SELECT id, version, doc FROM records WHERE collection = $1 AND id = $2",
        )
        .bind(collection)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Record::from))
    }

    async fn update(
        &self,
        collection: &str,
        id: &str,
        decide: Decide,
        committed: Committed,
    ) -> Result<Record, StoreError> {
        let (pool, collection, id) = (self.pool.clone(), collection.to_owned(), id.to_owned());
        let order = self.order.clone();
        detached(async move {
            let mut tx = pool.begin().await?;
            let row: Option<CurrentRow> = sqlx::query_as(
                "SELECT version, created_us, updated_us, doc FROM records \
                 WHERE collection = $1 AND id = $2 FOR UPDATE",
            )
            .bind(&collection)
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
            let next = decide(row.map(|row| Current {
                version: row.version,
                created_us: row.created_us,
                updated_us: row.updated_us,
                document: row.doc,
            }))?;
            let text = std::str::from_utf8(&next.record.document).expect("serde_json writes UTF-8");
            sqlx::query(
                "UPDATE records SET version = $1, updated_us = $2, doc = $3, doc_json = $3::jsonb \
                 WHERE collection = $4 AND id = $5",
            )
            .bind(next.record.version)
            .bind(next.updated_us)
            .bind(text)
            .bind(&collection)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            if let Some(outboxed) = &next.outbox {
                append_outboxed(&mut tx, outboxed).await?;
            }
            let place = order.take_place();
            tx.commit().await?;
            let _ = place.send((committed, next.record.clone()));
            Ok(next.record)
        })
        .await
    }

    async fn delete(
        &self,
        collection: &str,
        id: &str,
        admit: Admit,
        committed: Committed,
    ) -> Result<Record, StoreError> {
        let (pool, collection, id) = (self.pool.clone(), collection.to_owned(), id.to_owned());
        let order = self.order.clone();
        detached(async move {
            let mut tx = pool.begin().await?;
            let row: Option<RecordRow> = sqlx::query_as(
                "SELECT id, version, doc FROM records WHERE collection = $1 AND id = $2 FOR UPDATE",
            )
            .bind(&collection)
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
            let (record, outboxed) = admit(row.map(Record::from))?;
            sqlx::query("DELETE FROM records WHERE collection = $1 AND id = $2")
                .bind(&collection)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            if let Some(outboxed) = &outboxed {
                append_outboxed(&mut tx, outboxed).await?;
            }
            let place = order.take_place();
            tx.commit().await?;
            let _ = place.send((committed, record.clone()));
            Ok(record)
        })
        .await
    }

    async fn list(
        &self,
        collection: &str,
        query: &ListQuery,
        rows: i64,
    ) -> Result<Vec<Listed>, StoreError> {
        let (sql, values) = list_sql(query);
        let mut statement = sqlx::query_as(AssertSqlSafe(sql)).bind(collection);
        if let Some(after) = &query.after {
            statement = statement.bind(after.key).bind(after.seq);
        }
        for value in values {
            statement = statement.bind(value);
        }
        let found: Vec<ListedRow> = statement.bind(rows).fetch_all(&self.pool).await?;
        Ok(found
            .into_iter()
            .map(|row| (Bytes::from(row.doc), row.sort_key, row.seq))
            .collect())
    }

    async fn collections(&self) -> Result<Vec<CollectionSummary>, StoreError> {
        let rows: Vec<CollectionRow> = sqlx::query_as(
            "SELECT collection, COUNT(*) AS records FROM records \
             GROUP BY collection ORDER BY collection",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| CollectionSummary {
                name: row.collection,
                records: u64::try_from(row.records).unwrap_or(0),
            })
            .collect())
    }

    async fn keep_secret(&self, name: &str, candidate: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        sqlx::query(
            "INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(candidate)
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

/// Appends a record write's webhook event in the write's transaction.
async fn append_outboxed(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    outboxed: &Outboxed,
) -> Result<(), StoreError> {
    append_events(tx, &outboxed.node, std::slice::from_ref(&outboxed.event)).await
}

/// Appends events for `node` in a transaction.
async fn append_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    node: &str,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let at: Vec<i64> = events.iter().map(|e| e.at_us).collect();
    let bodies: Vec<&str> = events.iter().map(|e| e.body.as_str()).collect();
    // One statement for the batch; `WITH ORDINALITY` keeps their order in `seq`.
    sqlx::query(
        "INSERT INTO webhook_outbox (node, at_us, body) \
         SELECT $1, e.at_us, e.body FROM UNNEST($2::BIGINT[], $3::TEXT[]) \
         WITH ORDINALITY AS e(at_us, body, n) ORDER BY e.n",
    )
    .bind(node)
    .bind(&at)
    .bind(&bodies)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The webhook outbox in PostgreSQL, shared by every node of the database.
#[derive(Debug, Clone)]
pub(crate) struct PgOutbox {
    pool: PgPool,
}

impl PgBackend {
    /// Its webhook outbox.
    pub(crate) fn outbox(&self) -> PgOutbox {
        PgOutbox {
            pool: self.pool.clone(),
        }
    }
}

#[derive(FromRow)]
struct PendingRow {
    seq: i64,
    at_us: i64,
    body: String,
}

#[async_trait]
impl Outbox for PgOutbox {
    async fn append(
        &self,
        node: &str,
        events: Vec<NewEvent>,
        live: Vec<Live>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        append_events(&mut tx, node, &events).await?;
        for change in &live {
            match change {
                Live::Open { client, info } => {
                    sqlx::query(
                        "INSERT INTO webhook_live (node, client, info) VALUES ($1, $2, $3) \
                         ON CONFLICT (node, client) DO UPDATE SET info = EXCLUDED.info",
                    )
                    .bind(node)
                    .bind(client)
                    .bind(info)
                    .execute(&mut *tx)
                    .await?;
                }
                Live::Closed { client } => {
                    sqlx::query("DELETE FROM webhook_live WHERE node = $1 AND client = $2")
                        .bind(node)
                        .bind(client)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn beat(&self, node: &str, now_us: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO webhook_nodes (node, seen_us) VALUES ($1, $2) \
             ON CONFLICT (node) DO UPDATE SET seen_us = EXCLUDED.seen_us",
        )
        .bind(node)
        .bind(now_us)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn take_over(
        &self,
        node: &str,
        cutoff_us: i64,
        restarted: bool,
        lost: Lost,
    ) -> Result<TakenOver, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Deleting a node's row is the claim: of several takers, one deletes it, the others
        // wait on its lock and find it gone.
        let mut stopped: Vec<String> = sqlx::query_scalar(
            "DELETE FROM webhook_nodes WHERE seen_us < $1 AND node <> $2 RETURNING node",
        )
        .bind(cutoff_us)
        .bind(node)
        .fetch_all(&mut *tx)
        .await?;
        let mut taken = TakenOver {
            nodes: stopped.len(),
            connections: 0,
        };
        if restarted {
            stopped.push(node.to_owned());
        }
        for other in &stopped {
            let infos: Vec<String> =
                sqlx::query_scalar("DELETE FROM webhook_live WHERE node = $1 RETURNING info")
                    .bind(other)
                    .fetch_all(&mut *tx)
                    .await?;
            sqlx::query("UPDATE webhook_outbox SET node = $1 WHERE node = $2")
                .bind(node)
                .bind(other)
                .execute(&mut *tx)
                .await?;
            let events: Vec<NewEvent> = infos.iter().map(|info| lost(info)).collect();
            append_events(&mut tx, node, &events).await?;
            taken.connections += events.len();
        }
        tx.commit().await?;
        Ok(taken)
    }

    async fn pending(&self, node: &str, limit: usize) -> Result<Vec<Pending>, StoreError> {
        let rows: Vec<PendingRow> = sqlx::query_as(
            "SELECT seq, at_us, body FROM webhook_outbox WHERE node = $1 ORDER BY seq LIMIT $2",
        )
        .bind(node)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| Pending {
                seq: row.seq,
                at_us: row.at_us,
                body: row.body,
            })
            .collect())
    }

    async fn remove(&self, seqs: Vec<i64>) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM webhook_outbox WHERE seq = ANY($1)")
            .bind(&seqs)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn expire(&self, node: &str, before_us: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM webhook_outbox WHERE node = $1 AND at_us < $2")
            .bind(node)
            .bind(before_us)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn count(&self, node: &str) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_outbox WHERE node = $1")
            .bind(node)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }
}
