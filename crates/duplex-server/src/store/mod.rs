//! Record storage: the [`Store`] trait the HTTP layer talks to, and its backends.
//!
//! A record is a JSON object in a named collection. The store owns the server fields (`id`,
//! `created`, `updated`, `version`) and keeps each record as the full JSON document clients
//! receive, so reading a record sends stored bytes without decoding them.
//!
//! Everything that is the same for every database (server fields, versions and preconditions,
//! merge patch, document layout, paging) is [`RecordStore`] in [`records`]; a database is a
//! [`backend::Backend`] that only moves rows: [`sqlite`] (rusqlite: reads on the calling thread,
//! writes gathered by one writer thread into group commits) and [`postgres`] (sqlx).
//!
//! Every committed write is announced, in commit order, as a [`RecordEvent`] on the channel
//! [`open`] returns; the server publishes them on `records:{collection}`.

mod backend;
mod cursor;
pub(crate) mod history;
mod numbers;
pub mod outbox;
mod pg_history;
mod postgres;
mod records;
mod sqlite;

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

pub use cursor::CursorKey;
pub use history::{Deliveries, Delivery};
pub use numbers::check_numbers;
pub use outbox::Outbox;
use records::RecordStore;
pub(crate) use records::RecordWebhooks;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use records::{apply_change, render_document};
pub(crate) use records::{now_micros, rfc3339 as rfc3339_micros};

/// The fields the server owns; a client's values for them are ignored.
pub const SERVER_FIELDS: [&str; 4] = ["id", "created", "updated", "version"];

/// Longest collection name, record id or filter field name.
pub const MAX_NAME_LEN: usize = 64;

/// One stored record.
#[derive(Debug, Clone)]
pub struct Record {
    /// The record's id, unique within its collection.
    pub id: String,
    /// Starts at 1 and grows by one with every write.
    pub version: i64,
    /// The whole JSON document, server fields first.
    pub document: Bytes,
}

impl Record {
    /// The strong entity tag of this version of the record.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.version)
    }
}

/// How a write is conditioned on the record's current version (`If-Match` / `If-None-Match`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Precondition {
    /// Write whatever the current version is.
    #[default]
    None,
    /// `If-Match: *`: the record must exist.
    Exists,
    /// `If-Match: "3", "4"`: the current version must be one of these.
    VersionIn(Vec<i64>),
    /// `If-None-Match: *`: the record must not exist (create with a chosen id).
    Absent,
}

impl Precondition {
    /// The record a write may go ahead on: `PreconditionFailed` (with the current version) when
    /// the precondition does not hold, `NotFound` when it holds but there is no record.
    pub(crate) fn admit<T>(
        &self,
        current: Option<T>,
        version: impl Fn(&T) -> i64,
    ) -> Result<T, StoreError> {
        let current_version = current.as_ref().map(&version);
        if !self.holds(current_version) {
            return Err(StoreError::PreconditionFailed {
                current: current_version,
            });
        }
        current.ok_or(StoreError::NotFound)
    }

    /// Whether a record at `current` (None when absent) satisfies this precondition.
    pub fn holds(&self, current: Option<i64>) -> bool {
        match self {
            Precondition::None => true,
            Precondition::Exists => current.is_some(),
            Precondition::VersionIn(versions) => current.is_some_and(|v| versions.contains(&v)),
            Precondition::Absent => current.is_none(),
        }
    }
}

/// What a write does to a record's fields.
#[derive(Debug, Clone)]
pub enum Change {
    /// Replace every client field (`PUT`).
    Replace(Map<String, Value>),
    /// Apply an RFC 7396 JSON merge patch (`PATCH`).
    MergePatch(Value),
}

/// The order of a listing; every order ends with the insertion sequence, so it is total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SortOrder {
    /// Oldest first.
    #[default]
    CreatedAscending,
    /// Newest first.
    CreatedDescending,
    /// Least recently updated first.
    UpdatedAscending,
    /// Most recently updated first.
    UpdatedDescending,
}

impl SortOrder {
    /// Parses the `sort` query parameter.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "created" => SortOrder::CreatedAscending,
            "-created" => SortOrder::CreatedDescending,
            "updated" => SortOrder::UpdatedAscending,
            "-updated" => SortOrder::UpdatedDescending,
            _ => return None,
        })
    }

    /// The `sort` parameter that names this order.
    pub fn as_str(self) -> &'static str {
        match self {
            SortOrder::CreatedAscending => "created",
            SortOrder::CreatedDescending => "-created",
            SortOrder::UpdatedAscending => "updated",
            SortOrder::UpdatedDescending => "-updated",
        }
    }

    /// The SQL of this order: the sort column, the direction, and the comparison that finds the
    /// rows after a cursor. Static text only; both backends build their listing from it.
    pub(crate) fn sql(self) -> (&'static str, &'static str, &'static str) {
        match self {
            SortOrder::CreatedAscending => ("created_us", "ASC", ">"),
            SortOrder::CreatedDescending => ("created_us", "DESC", "<"),
            SortOrder::UpdatedAscending => ("updated_us", "ASC", ">"),
            SortOrder::UpdatedDescending => ("updated_us", "DESC", "<"),
        }
    }

    /// Whether the order is descending.
    pub fn descending(self) -> bool {
        matches!(
            self,
            SortOrder::CreatedDescending | SortOrder::UpdatedDescending
        )
    }
}

/// Where a page starts: just after the record with this sort key and sequence number.
///
/// Keyset pagination: a record inserted while a client pages gets a larger sequence number, so it
/// never shifts the records already listed; nothing is skipped or repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cursor {
    /// The order the cursor was issued for.
    pub order: SortOrder,
    /// The sort key (microseconds since the epoch) of the last record on the previous page.
    pub key: i64,
    /// The insertion sequence of that record, which breaks ties.
    pub seq: i64,
}

/// An equality filter on a top-level field: `?filter.author=ana`.
///
/// The value matches a string field equal to it, or a number, boolean or null field whose JSON
/// text is exactly it (`?filter.stars=5` matches `"stars": 5`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldFilter {
    /// The top-level field name.
    pub field: String,
    /// The value as the client wrote it.
    pub value: String,
}

impl FieldFilter {
    /// The JSON texts a matching field may have.
    pub(crate) fn json_candidates(&self) -> (String, String) {
        let as_string = Value::String(self.value.clone()).to_string();
        let as_scalar = match serde_json::from_str::<Value>(&self.value) {
            Ok(Value::Number(n)) => n.to_string(),
            Ok(Value::Bool(b)) => b.to_string(),
            Ok(Value::Null) => "null".to_owned(),
            _ => as_string.clone(),
        };
        (as_string, as_scalar)
    }
}

/// A listing request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ListQuery {
    /// At most this many records.
    pub limit: u32,
    /// The order.
    pub order: SortOrder,
    /// Start after this position.
    pub after: Option<Cursor>,
    /// Every filter must match.
    pub filters: Vec<FieldFilter>,
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct Page {
    /// The records' documents, in order.
    pub items: Vec<Bytes>,
    /// Where the next page starts, when there may be one.
    pub next: Option<Cursor>,
}

/// A collection and how many records it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionSummary {
    /// The collection's name.
    pub name: String,
    /// How many records it holds.
    pub records: u64,
}

/// What went wrong in the store; the HTTP layer maps each variant to a status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No record with that id in that collection.
    #[error("record not found")]
    NotFound,
    /// A precondition did not hold; `current` is the record's version (None when absent).
    #[error("precondition failed")]
    PreconditionFailed {
        /// The record's current version, if it exists.
        current: Option<i64>,
    },
    /// A concurrent write claimed the same id first.
    #[error("a record with this id already exists")]
    Conflict,
    /// A merge patch would leave something other than a JSON object.
    #[error("the patched record is not a JSON object")]
    NotAnObject,
    /// The configured store URL is not one this build understands.
    #[error("unsupported store URL {0:?}: expected sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// SQLite failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The store is closed or its writer stopped.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The database file or its schema cannot be used.
    #[error("{0}")]
    Schema(String),
    /// The schema could not be brought up to date.
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A stored document could not be read back.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// Where records live. One implementation per database; the HTTP layer sees only this.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Creates a record with a fresh id.
    async fn create(
        &self,
        collection: &str,
        fields: Map<String, Value>,
    ) -> Result<Record, StoreError>;

    /// Creates a record with the id the client chose; [`StoreError::PreconditionFailed`] if it
    /// exists.
    async fn create_with_id(
        &self,
        collection: &str,
        id: &str,
        fields: Map<String, Value>,
    ) -> Result<Record, StoreError>;

    /// Reads one record.
    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>, StoreError>;

    /// Changes a record if the precondition holds.
    async fn update(
        &self,
        collection: &str,
        id: &str,
        change: Change,
        precondition: &Precondition,
    ) -> Result<Record, StoreError>;

    /// Deletes a record if the precondition holds, returning what was deleted.
    async fn delete(
        &self,
        collection: &str,
        id: &str,
        precondition: &Precondition,
    ) -> Result<Record, StoreError>;

    /// Lists one page of a collection.
    async fn list(&self, collection: &str, query: &ListQuery) -> Result<Page, StoreError>;

    /// Lists collections that hold at least one record, by name.
    async fn collections(&self) -> Result<Vec<CollectionSummary>, StoreError>;

    /// The server secret called `name`: made at random the first time it is asked for, then
    /// kept in the store, so every node sharing the store gets the same one.
    async fn secret(&self, name: &str) -> Result<Vec<u8>, StoreError>;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Finishes pending work and closes connections.
    async fn close(&self);
}

/// A committed write, for `records:{collection}`.
#[derive(Debug)]
pub struct RecordEvent {
    /// The record's collection.
    pub collection: String,
    /// What happened to it.
    pub op: RecordOp,
    /// The record as written (or as it was, when deleted).
    pub record: Record,
    /// Told once the event went out; the write's caller waits for it, so a client that got its
    /// answer finds the event published.
    pub announced: oneshot::Sender<()>,
}

/// What a write did to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOp {
    /// `created`
    Created,
    /// `updated`
    Updated,
    /// `deleted`
    Deleted,
}

impl RecordOp {
    /// The `op` of the event.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordOp::Created => "created",
            RecordOp::Updated => "updated",
            RecordOp::Deleted => "deleted",
        }
    }
}

/// Committed writes in commit order, from [`open`]. Unbounded, yet never longer than the writes
/// in flight: each write waits for its own event to be announced before it answers, and the
/// SQLite writer's queue and the HTTP connection limits bound those.
pub type RecordEvents = mpsc::UnboundedReceiver<RecordEvent>;

/// The bounds of a channel whose history the store keeps; `None` for the others.
pub(crate) type HistoryBounds =
    std::sync::Arc<dyn Fn(&str) -> Option<crate::broker::Retention> + Send + Sync>;

/// What a store is made of: its records, its webhook outbox, its channel history (SQLite).
type Parts = (
    std::sync::Arc<dyn Store>,
    std::sync::Arc<dyn Outbox>,
    Option<std::sync::Arc<dyn history::HistoryStore>>,
);

/// Opens the store a URL names, with the stream of its committed writes.
///
/// `history` gives the bounds of each channel whose history this store keeps (none with a
/// broker); the SQLite store keeps them, and appends a collection's record events to
/// `records:{collection}`'s history in the write's own transaction.
pub(crate) async fn open(
    url: &str,
    webhooks: Option<RecordWebhooks>,
    history: Option<HistoryBounds>,
) -> Result<Opened, StoreError> {
    let (events, receiver) = mpsc::unbounded_channel();
    let (deliver, deliveries) = mpsc::unbounded_channel();
    let (store, outbox, history): Parts = if let Some(path) = url.strip_prefix("sqlite://") {
        let backend = sqlite::open(path).await?;
        let outbox = std::sync::Arc::new(backend.outbox());
        let records = history.map(|retention| history::RecordHistory {
            retention,
            deliveries: deliver.clone(),
        });
        let history = std::sync::Arc::new(backend.history(deliver));
        (
            std::sync::Arc::new(RecordStore::new(backend, events, webhooks, records)),
            outbox,
            Some(history),
        )
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let backend = postgres::open(url).await?;
        let outbox = std::sync::Arc::new(backend.outbox());
        let epoch = backend::Backend::keep_secret(
            &backend,
            "channel-epoch",
            crate::broker::bus::new_epoch().into_bytes(),
        )
        .await?;
        let epoch = String::from_utf8(epoch)
            .map_err(|_| StoreError::Corrupt("the channel epoch is not text".into()))?;
        let history = std::sync::Arc::new(pg_history::PgHistory::start(
            backend.pool(),
            epoch.into(),
            deliver,
        ));
        (
            std::sync::Arc::new(RecordStore::new(backend, events, webhooks, None)),
            outbox,
            Some(history),
        )
    } else {
        return Err(StoreError::UnsupportedUrl(url.to_owned()));
    };
    Ok(Opened {
        store,
        events: receiver,
        outbox,
        history: history.map(|store| history::OpenedHistory { store, deliveries }),
        single_node: url.starts_with("sqlite://"),
    })
}

/// An opened store: its records, the announcements of their writes, its webhook outbox.
#[derive(Debug)]
pub(crate) struct Opened {
    /// The records.
    pub store: std::sync::Arc<dyn Store>,
    /// Committed writes, in commit order.
    pub events: RecordEvents,
    /// The webhook outbox.
    pub outbox: std::sync::Arc<dyn Outbox>,
    /// Channel history kept in the store, where the store keeps it.
    pub history: Option<history::OpenedHistory>,
    /// Whether one server alone uses it (a SQLite file), so that whatever another node left in
    /// it is from a node that stopped.
    pub single_node: bool,
}

/// Whether `name` is a valid collection name: `[a-z0-9_-]{1,64}`.
pub fn is_valid_collection(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Whether `id` is a valid record id: `[A-Za-z0-9_-]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_NAME_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `field` may be filtered on: `[A-Za-z0-9_]{1,64}`.
pub fn is_valid_field(field: &str) -> bool {
    !field.is_empty()
        && field.len() <= MAX_NAME_LEN
        && field
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names_follow_the_documented_pattern() {
        assert!(is_valid_collection("posts"));
        assert!(is_valid_collection("a-b_c-9"));
        assert!(is_valid_collection(&"x".repeat(64)));
        assert!(!is_valid_collection(""));
        assert!(!is_valid_collection(&"x".repeat(65)));
        assert!(!is_valid_collection("Posts"));
        assert!(!is_valid_collection("po sts"));
        assert!(!is_valid_collection("posts/1"));
        assert!(!is_valid_collection("pöst"));
    }

    #[test]
    fn preconditions_compare_versions() {
        assert!(Precondition::None.holds(None));
        assert!(Precondition::Exists.holds(Some(1)));
        assert!(!Precondition::Exists.holds(None));
        assert!(Precondition::VersionIn(vec![2, 3]).holds(Some(3)));
        assert!(!Precondition::VersionIn(vec![2]).holds(Some(3)));
        assert!(!Precondition::VersionIn(vec![2]).holds(None));
        assert!(Precondition::Absent.holds(None));
        assert!(!Precondition::Absent.holds(Some(1)));
    }

    #[test]
    fn filters_match_strings_and_scalars_by_json_text() {
        let f = |v: &str| {
            FieldFilter {
                field: "x".into(),
                value: v.into(),
            }
            .json_candidates()
        };
        assert_eq!(f("ana"), ("\"ana\"".into(), "\"ana\"".into()));
        assert_eq!(f("5"), ("\"5\"".into(), "5".into()));
        assert_eq!(f("true"), ("\"true\"".into(), "true".into()));
        assert_eq!(f("null"), ("\"null\"".into(), "null".into()));
    }
}
