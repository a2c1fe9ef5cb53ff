//! The embedded default store: SQLite in WAL mode through rusqlite.
//!
//! - **Reads** run on the calling thread, on a read-only connection taken from a small pool
//!   (WAL lets readers run beside the writer), with cached prepared statements: a read by id
//!   or a page in index order costs microseconds and no thread hop. A listing with filters,
//!   which may scan, and the collection counts run on the blocking pool instead.
//! - **Hot records** read by id are kept in memory ([`hot`]), exact because the writer keeps
//!   them so before it answers.
//! - **Writes** go to one writer thread that gathers those waiting into one transaction
//!   ([`writer`]): group commit, answered after `COMMIT`.
//!
//! `synchronous = NORMAL` in WAL mode makes a committed transaction survive a crash of the
//! process (`kill -9`); a power loss may lose the last transactions, which
//! `DUPLEX_SQLITE_SYNCHRONOUS=full` prevents at the cost of an fsync per commit (per group of
//! writes, not per write).

mod checkpoint;
mod history;
mod hot;
mod migrate;
mod outbox;
mod pages;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, Row};

use super::backend::{Admit, Backend, Committed, Current, Decide, Inserted, Listed, NewRow};
use super::history::Logged;
use super::{CollectionSummary, ListQuery, Record, StoreError};
use checkpoint::Checkpointer;
use hot::HotRecords;
use pages::FirstPages;
use writer::Writer;

/// Idle read connections kept for the next reads.
const IDLE_READERS: usize = 8;

/// How long a statement waits for a lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of recently read records kept in memory ([`hot`]).
const HOT_BYTES: usize = 32 << 20;

/// Bytes of first pages of listings kept in memory ([`pages`]).
const PAGE_BYTES: usize = 8 << 20;

/// Prepared statements each connection keeps (listings vary with their filters).
const STATEMENT_CACHE: usize = 64;

const GET: &str = "SELECT id, version, doc FROM records WHERE collection = ?1 AND id = ?2";

/// Records in a SQLite file.
#[derive(Debug)]
pub(crate) struct SqliteBackend {
    /// The epoch of every channel whose history this file keeps (see `history.rs`).
    history_epoch: Arc<str>,
    readers: Arc<Readers>,
    writer: Arc<Writer>,
    checkpointer: Checkpointer,
    hot: Arc<HotRecords>,
    pages: Arc<FirstPages>,
}

/// Read-only connections to the file, opened when none is idle.
///
/// Each read runs in a snapshot (a read transaction) that the connection keeps open after it,
/// for as long as nothing was committed since it began: the next read on that connection reuses
/// it instead of beginning another. Beginning and ending a read transaction costs SQLite two
/// `fcntl` locks on the file and its VFS-wide mutex, which two threads reading at full speed
/// contend for (about a fifth of the server's CPU during a listing run, measured with `perf`);
/// a snapshot no commit has passed is exactly what a new one would see, since every write goes
/// through the writer, which counts a commit before answering it. A snapshot made stale by a
/// commit ends at its connection's next read; the checkpointer ends idle ones before each pass
/// (when commits moved), so they never hold the log back for long.
#[derive(Debug)]
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Reader>>,
    /// The writer's count of commits.
    commits: Arc<std::sync::atomic::AtomicU64>,
}

/// A read connection, and the commit count its open snapshot is current for.
#[derive(Debug)]
struct Reader {
    connection: Connection,
    snapshot: Option<u64>,
}

impl Reader {
    /// Ends the snapshot (a read transaction: nothing to commit).
    fn end_snapshot(&mut self) {
        if self.snapshot.take().is_some() && !self.connection.is_autocommit() {
            let _ = self.connection.execute_batch("COMMIT");
        }
    }
}

impl Readers {
    /// Runs `read` on an idle connection (or a new one) in a snapshot that has every commit
    /// acknowledged so far, then keeps the connection.
    fn read<T>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let idle = self.idle.lock().pop();
        let mut reader = match idle {
            Some(reader) => reader,
            None => Reader {
                connection: self.open()?,
                snapshot: None,
            },
        };
        // Read before the snapshot begins (at its first statement), so it has at least these.
        let commits = self.commits.load(std::sync::atomic::Ordering::Acquire);
        if reader.snapshot.is_some_and(|at| at != commits) {
            reader.end_snapshot();
        }
        if reader.snapshot.is_none() {
            reader.connection.prepare_cached("BEGIN")?.execute([])?;
            reader.snapshot = Some(commits);
        }
        let result = read(&reader.connection);
        if reader.connection.is_autocommit() {
            // An error ended the transaction.
            reader.snapshot = None;
        }
        let mut idle = self.idle.lock();
        if idle.len() < IDLE_READERS {
            idle.push(reader);
        }
        Ok(result?)
    }

    /// Ends the snapshots idle connections keep, so that none holds the checkpointer back
    /// from the end of the log (which it must reach for the log to start again).
    fn release_idle(&self) {
        for reader in self.idle.lock().iter_mut() {
            reader.end_snapshot();
        }
    }

    fn open(&self) -> Result<Connection, StoreError> {
        let connection = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        tune(&connection)?;
        Ok(connection)
    }
}

/// What every connection sets: the lock wait, the statement cache, and the query planner's
/// stability guarantee. Without it SQLite (3.50) marks a statement whose `LIMIT` is a bound
/// parameter to be prepared again whenever that parameter is bound, so every listing was
/// compiled anew; the plans here do not depend on the values bound.
fn tune(connection: &Connection) -> rusqlite::Result<()> {
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    connection.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// The `synchronous` setting: `DUPLEX_SQLITE_SYNCHRONOUS` (`off`, `normal`, `full`, `extra`),
/// `normal` by default.
fn synchronous() -> Result<String, StoreError> {
    parse_synchronous(std::env::var("DUPLEX_SQLITE_SYNCHRONOUS").ok())
}

fn parse_synchronous(value: Option<String>) -> Result<String, StoreError> {
    let Some(value) = value else {
        return Ok("NORMAL".into());
    };
    let upper = value.to_ascii_uppercase();
    if ["OFF", "NORMAL", "FULL", "EXTRA"].contains(&upper.as_str()) {
        Ok(upper)
    } else {
        Err(StoreError::Schema(format!(
            "DUPLEX_SQLITE_SYNCHRONOUS={value:?}: expected off, normal, full or extra"
        )))
    }
}

/// Opens (creating if needed) the database file at `path`, migrates it and starts its writer.
pub(crate) async fn open(path: impl AsRef<Path>) -> Result<SqliteBackend, StoreError> {
    let path = path.as_ref().to_owned();
    tokio::task::spawn_blocking(move || open_blocking(path))
        .await
        .map_err(|e| StoreError::Unavailable(format!("opening the store stopped: {e}")))?
}

fn open_blocking(path: PathBuf) -> Result<SqliteBackend, StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| StoreError::Schema(format!("cannot create {}: {e}", parent.display())))?;
    }
    let mut connection = Connection::open(&path)?;
    tune(&connection)?;
    let mode: String = connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Schema(format!(
            "{} cannot use write-ahead logging (journal mode {mode})",
            path.display()
        )));
    }
    connection.pragma_update(None, "synchronous", synchronous()?)?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    // Checkpoints run on their own thread (`checkpoint.rs`), not inside a commit.
    connection.pragma_update(None, "wal_autocheckpoint", 0)?;
    migrate::run(&mut connection)?;
    let history_epoch = history::store_epoch(&connection)?;
    let writer = Writer::start(connection)
        .map_err(|e| StoreError::Unavailable(format!("cannot start the writer thread: {e}")))?;
    let readers = Arc::new(Readers {
        path: path.clone(),
        idle: Mutex::new(Vec::new()),
        commits: writer.commit_count(),
    });
    let release = {
        let readers = Arc::downgrade(&readers);
        Box::new(move || {
            if let Some(readers) = readers.upgrade() {
                readers.release_idle();
            }
        })
    };
    let checkpointer = Checkpointer::start(
        &path,
        BUSY_TIMEOUT,
        writer.commit_count(),
        writer.restart_flag(),
        checkpoint::WRAP_FRAMES,
        release,
    )?;
    Ok(SqliteBackend {
        history_epoch,
        checkpointer,
        hot: Arc::new(HotRecords::new(HOT_BYTES)),
        pages: Arc::new(FirstPages::new(PAGE_BYTES)),
        readers,
        writer: Arc::new(writer),
    })
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        id: row.get(0)?,
        version: row.get(1)?,
        document: Bytes::from(row.get::<_, String>(2)?),
    })
}

/// The SQL of a listing: the order's key, then `(key, seq)` after the cursor, the filters (the
/// field's JSON text, which `->` gives, is one of the filter's two JSON candidates), and the
/// limit; with the values to bind in order.
fn list_sql(
    collection: &str,
    query: &ListQuery,
    rows: i64,
) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let (key, direction, comparison) = query.order.sql();
    // Only static fragments and numbered placeholders go into the text; every value is bound.
    let mut sql = format!("SELECT doc, {key}, seq FROM records WHERE collection = ?1");
    let mut values = vec![Value::Text(collection.to_owned())];
    if let Some(after) = &query.after {
        sql.push_str(&format!(
            " AND ({key}, seq) {comparison} (?{}, ?{})",
            values.len() + 1,
            values.len() + 2
        ));
        values.extend([Value::Integer(after.key), Value::Integer(after.seq)]);
    }
    for filter in &query.filters {
        let (as_string, as_scalar) = filter.json_candidates();
        sql.push_str(&format!(
            " AND (doc -> ?{}) IN (?{}, ?{})",
            values.len() + 1,
            values.len() + 2,
            values.len() + 3
        ));
        values.extend([
            Value::Text(format!("$.\"{}\"", filter.field)),
            Value::Text(as_string),
            Value::Text(as_scalar),
        ]);
    }
    sql.push_str(&format!(
        " ORDER BY {key} {direction}, seq {direction} LIMIT ?{}",
        values.len() + 1
    ));
    values.push(Value::Integer(rows));
    (sql, values)
}

fn list_rows(
    connection: &Connection,
    sql: &str,
    values: Vec<rusqlite::types::Value>,
) -> rusqlite::Result<Vec<Listed>> {
    let mut statement = connection.prepare_cached(sql)?;
    let rows = statement.query_map(rusqlite::params_from_iter(values), |row| {
        // The stored text as it is: the writer stored serde_json's UTF-8, so no need to check it.
        let document = Bytes::copy_from_slice(row.get_ref(0)?.as_bytes()?);
        Ok((document, row.get(1)?, row.get(2)?))
    })?;
    rows.collect()
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn insert(&self, row: NewRow, committed: Committed) -> Result<Inserted, StoreError> {
        let Committed { log, tell } = committed;
        let epoch = self.history_epoch.clone();
        let (pages, changed) = (self.pages.clone(), row.collection.clone());
        self.writer
            .write(
                move |connection| {
                    let document =
                        std::str::from_utf8(&row.record.document).expect("serde_json writes UTF-8");
                    let mut statement = connection.prepare_cached(
                        "INSERT INTO records (collection, id, version, created_us, updated_us, doc) \
                         VALUES (?1, ?2, 1, ?3, ?3, ?4) ON CONFLICT (collection, id) DO NOTHING",
                    )?;
                    let inserted = statement.execute((
                        &row.collection,
                        &row.record.id,
                        row.at_us,
                        document,
                    ))?;
                    if inserted == 0 {
                        return Ok((Inserted::Taken, None));
                    }
                    if let Some(outboxed) = &row.outbox {
                        outbox::append_one(connection, outboxed)?;
                    }
                    let logged = history::log_event(connection, log.as_ref(), &row.record, &epoch)?;
                    Ok((Inserted::Yes, Some((row.record, logged))))
                },
                move |(_, written): &(Inserted, Option<(Record, Option<Logged>)>)| {
                    if let Some((record, logged)) = written {
                        pages.written(&changed);
                        tell(record, logged.clone());
                    }
                },
            )
            .await
            .map(|(inserted, _)| inserted)
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>, StoreError> {
        let ticket = match self.hot.get(collection, id) {
            Ok(record) => return Ok(Some(record)),
            Err(ticket) => ticket,
        };
        let record = self.readers.read(|connection| {
            connection
                .prepare_cached(GET)?
                .query_row((collection, id), record_from_row)
                .optional()
        })?;
        if let Some(record) = &record {
            self.hot.offer(ticket, collection, record);
        }
        Ok(record)
    }

    async fn update(
        &self,
        collection: &str,
        id: &str,
        decide: Decide,
        committed: Committed,
    ) -> Result<Record, StoreError> {
        let (collection, id) = (collection.to_owned(), id.to_owned());
        let (hot, pages, written) = (self.hot.clone(), self.pages.clone(), collection.clone());
        let Committed { log, tell } = committed;
        let epoch = self.history_epoch.clone();
        self.writer
            .write(
                move |connection| {
                    let current = connection
                        .prepare_cached(
                            "SELECT version, created_us, updated_us, doc FROM records \
                             WHERE collection = ?1 AND id = ?2",
                        )?
                        .query_row((&collection, &id), |row| {
                            Ok(Current {
                                version: row.get(0)?,
                                created_us: row.get(1)?,
                                updated_us: row.get(2)?,
                                document: row.get(3)?,
                            })
                        })
                        .optional()?;
                    let next = decide(current)?;
                    let document = std::str::from_utf8(&next.record.document)
                        .expect("serde_json writes UTF-8");
                    connection
                        .prepare_cached(
                            "UPDATE records SET version = ?1, updated_us = ?2, doc = ?3 \
                             WHERE collection = ?4 AND id = ?5",
                        )?
                        .execute((
                            next.record.version,
                            next.updated_us,
                            document,
                            &collection,
                            &id,
                        ))?;
                    if let Some(outboxed) = &next.outbox {
                        outbox::append_one(connection, outboxed)?;
                    }
                    let logged =
                        history::log_event(connection, log.as_ref(), &next.record, &epoch)?;
                    Ok((next.record, logged))
                },
                move |(record, logged): &(Record, Option<Logged>)| {
                    hot.written(&written, record);
                    pages.written(&written);
                    tell(record, logged.clone());
                },
            )
            .await
            .map(|(record, _)| record)
    }

    async fn delete(
        &self,
        collection: &str,
        id: &str,
        admit: Admit,
        committed: Committed,
    ) -> Result<Record, StoreError> {
        let (collection, id) = (collection.to_owned(), id.to_owned());
        let (hot, pages, deleted) = (self.hot.clone(), self.pages.clone(), collection.clone());
        let Committed { log, tell } = committed;
        let epoch = self.history_epoch.clone();
        self.writer
            .write(
                move |connection| {
                    let record = connection
                        .prepare_cached(GET)?
                        .query_row((&collection, &id), record_from_row)
                        .optional()?;
                    let (record, outboxed) = admit(record)?;
                    connection
                        .prepare_cached("DELETE FROM records WHERE collection = ?1 AND id = ?2")?
                        .execute((&collection, &id))?;
                    if let Some(outboxed) = &outboxed {
                        outbox::append_one(connection, outboxed)?;
                    }
                    let logged = history::log_event(connection, log.as_ref(), &record, &epoch)?;
                    Ok((record, logged))
                },
                move |(record, logged): &(Record, Option<Logged>)| {
                    hot.deleted(&deleted, &record.id);
                    pages.written(&deleted);
                    tell(record, logged.clone());
                },
            )
            .await
            .map(|(record, _)| record)
    }

    async fn list(
        &self,
        collection: &str,
        query: &ListQuery,
        rows: i64,
    ) -> Result<Vec<Listed>, StoreError> {
        let ticket = match self.pages.get(collection, query, rows) {
            Ok(page) => return Ok(page),
            Err(ticket) => ticket,
        };
        let (sql, values) = list_sql(collection, query, rows);
        let page = if query.filters.is_empty() {
            // A walk along an index that stops after `rows`: as cheap as a read by id.
            self.readers
                .read(|connection| list_rows(connection, &sql, values))?
        } else {
            let readers = self.readers.clone();
            tokio::task::spawn_blocking(move || {
                readers.read(|connection| list_rows(connection, &sql, values))
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("the listing stopped: {e}")))??
        };
        if let Some(ticket) = ticket {
            self.pages.offer(ticket, collection, query, rows, &page);
        }
        Ok(page)
    }

    async fn collections(&self) -> Result<Vec<CollectionSummary>, StoreError> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            readers.read(|connection| {
                let mut statement = connection.prepare_cached(
                    "SELECT collection, COUNT(*) FROM records \
                     GROUP BY collection ORDER BY collection",
                )?;
                let rows = statement.query_map([], |row| {
                    Ok(CollectionSummary {
                        name: row.get(0)?,
                        records: u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
                    })
                })?;
                rows.collect()
            })
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("counting collections stopped: {e}")))?
    }

    async fn keep_secret(&self, name: &str, candidate: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let name = name.to_owned();
        self.writer
            .write(
                move |connection| {
                    connection.execute(
                        "INSERT OR IGNORE INTO secrets (name, value) VALUES (?1, ?2)",
                        (&name, &candidate),
                    )?;
                    Ok(connection.query_row(
                        "SELECT value FROM secrets WHERE name = ?1",
                        [&name],
                        |row| row.get(0),
                    )?)
                },
                |_: &Vec<u8>| {},
            )
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.readers
            .read(|connection| connection.query_row("SELECT 1", [], |_| Ok(())))
    }

    async fn close(&self) {
        self.writer.close().await;
        self.checkpointer.close().await;
        self.readers.idle.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::{list_rows, list_sql, open_blocking, parse_synchronous};
    use crate::store::{ListQuery, StoreError};
    use rusqlite::StatementStatus;

    /// A read never misses a committed write, though idle connections keep their snapshot:
    /// the snapshot is reused while no commit passed it, and ended at the next read once one
    /// did (or by the checkpointer, for idle ones).
    #[tokio::test]
    async fn reads_reuse_a_snapshot_only_while_nothing_was_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = open_blocking(dir.path().join("data.db")).expect("open");
        let count = |backend: &super::SqliteBackend| {
            backend
                .readers
                .read(|c| {
                    c.query_row("SELECT COUNT(*) FROM secrets", [], |row| {
                        row.get::<_, i64>(0)
                    })
                })
                .expect("read")
        };
        let kept = |backend: &super::SqliteBackend| {
            let idle = backend.readers.idle.lock();
            assert_eq!(idle.len(), 1, "one connection, reused");
            (idle[0].snapshot, idle[0].connection.is_autocommit())
        };
        let before = count(&backend);
        let (snapshot, autocommit) = kept(&backend);
        assert!(snapshot.is_some() && !autocommit, "the snapshot stays open");
        assert_eq!(count(&backend), before);
        assert_eq!(kept(&backend).0, snapshot, "reused: nothing was committed");

        backend
            .writer
            .write(
                |c| Ok(c.execute("INSERT INTO secrets (name, value) VALUES ('x', x'00')", [])?),
                |_: &usize| {},
            )
            .await
            .expect("committed");
        assert_eq!(count(&backend), before + 1, "the commit is seen");
        assert_ne!(kept(&backend).0, snapshot, "a new snapshot");

        backend.readers.release_idle();
        assert_eq!(
            kept(&backend),
            (None, true),
            "released: no transaction open"
        );
        assert_eq!(count(&backend), before + 1);
    }

    /// A record write whose event cannot be appended (a stray entry in its place, as a damaged
    /// file could hold) fails whole: neither the record nor the channel's next offset is
    /// committed, and nobody is told of it; the next write, once the way is clear, takes
    /// that offset.
    #[tokio::test]
    async fn a_record_write_whose_event_is_refused_leaves_nothing() {
        use crate::store::backend::{Backend as _, Committed, Inserted, NewRow};
        use crate::store::history::LogTo;
        use crate::store::{Record, RecordOp};

        let dir = tempfile::tempdir().expect("tempdir");
        let backend = open_blocking(dir.path().join("data.db")).expect("open");
        let stray = |sql: &'static str| {
            let writer = backend.writer.clone();
            async move {
                writer
                    .write(move |c| Ok(c.execute(sql, [])?), |_: &usize| {})
                    .await
                    .expect("committed")
            }
        };
        stray(
            "INSERT INTO channel_log_entries (channel, seq, expires_us, is_binary, payload) \
             VALUES ('records:posts', 1, 0, 0, x'00')",
        )
        .await;
        // The offsets the writes that committed were told of.
        let told = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let create = |id: &str| {
            let told = told.clone();
            let row = NewRow {
                collection: "posts".into(),
                at_us: 1,
                record: Record {
                    id: id.into(),
                    version: 1,
                    document: bytes::Bytes::from(format!("{{\"id\":\"{id}\"}}")),
                },
                outbox: None,
            };
            let committed = Committed {
                log: Some(LogTo {
                    channel: "records:posts".into(),
                    retention: crate::broker::Retention {
                        size: 100,
                        ttl: std::time::Duration::from_secs(60),
                        bytes: 1 << 20,
                    },
                    op: RecordOp::Created,
                }),
                tell: Box::new(
                    move |_: &Record, logged: Option<crate::store::history::Logged>| {
                        told.lock().push(logged.map(|(offset, _, _)| offset));
                    },
                ),
            };
            (row, committed)
        };
        let (row, committed) = create("a");
        let refused = backend.insert(row, committed).await;
        assert!(matches!(refused, Err(StoreError::Sqlite(_))), "{refused:?}");
        let (records, logs): (i64, i64) = backend
            .readers
            .read(|c| {
                Ok((
                    c.query_row("SELECT COUNT(*) FROM records", [], |row| row.get(0))?,
                    c.query_row("SELECT COUNT(*) FROM channel_logs", [], |row| row.get(0))?,
                ))
            })
            .expect("read");
        assert_eq!(
            (records, logs),
            (0, 0),
            "nothing of the write was committed"
        );
        assert!(told.lock().is_empty(), "nobody is told of it");

        stray("DELETE FROM channel_log_entries").await;
        let (row, committed) = create("b");
        assert_eq!(
            backend.insert(row, committed).await.expect("created"),
            Inserted::Yes
        );
        assert_eq!(
            *told.lock(),
            vec![Some(1)],
            "the next write takes the first offset"
        );
        backend.close().await;
    }

    #[test]
    fn a_listing_runs_its_prepared_statement_without_compiling_it_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_blocking(dir.path().join("db")).expect("store");
        let query = ListQuery::default();
        let (sql, _) = list_sql("c", &query, 20);
        let reprepared = store
            .readers
            .read(|connection| {
                for _ in 0..5 {
                    let (_, values) = list_sql("c", &query, 20);
                    list_rows(connection, &sql, values)?;
                }
                let statement = connection.prepare_cached(&sql)?;
                Ok(statement.get_status(StatementStatus::RePrepare))
            })
            .expect("listed");
        assert_eq!(reprepared, 0, "{sql}");
    }

    #[test]
    fn the_synchronous_setting_is_normal_by_default_and_checked() {
        assert_eq!(parse_synchronous(None).expect("default"), "NORMAL");
        assert_eq!(
            parse_synchronous(Some("full".into())).expect("full"),
            "FULL"
        );
        let error = parse_synchronous(Some("fast".into())).expect_err("refused");
        assert!(
            matches!(&error, StoreError::Schema(why) if why.contains("\"fast\"")),
            "{error:?}"
        );
    }
}
