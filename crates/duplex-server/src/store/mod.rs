//! Record storage: the [`Store`] trait the HTTP layer talks to, and its backends.
//!
//! A record is a JSON object in a named collection. The store owns the server fields (`id`,
//! `created`, `updated`, `version`) and keeps each record as the full JSON document clients
//! receive, so reading a record sends stored bytes without decoding them. Everything that is the
//! same for every backend (validation, merge patch, cursors, document layout) lives here; a
//! backend only moves rows.

mod cursor;
mod numbers;
mod postgres;
mod sqlite;

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};
use time::OffsetDateTime;

pub use cursor::CursorKey;
pub use numbers::check_numbers;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
    /// rows after a cursor. Static text only; both stores build their listing from it.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, Default)]
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

/// Opens the store a URL names.
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        return Ok(std::sync::Arc::new(SqliteStore::open(path).await?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(std::sync::Arc::new(PostgresStore::open(url).await?));
    }
    Err(StoreError::UnsupportedUrl(url.to_owned()))
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

/// 32 random bytes for a new secret.
pub(crate) fn new_secret() -> Vec<u8> {
    let mut secret = Vec::with_capacity(32);
    for _ in 0..2 {
        secret.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    secret
}

/// A new record id: time-ordered (UUID v7), 32 lowercase hex digits.
pub(crate) fn new_record_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Removes the server fields a client sent; they are the server's to set.
pub(crate) fn strip_server_fields(fields: &mut Map<String, Value>) {
    for key in SERVER_FIELDS {
        fields.remove(key);
    }
}

/// The client fields of a stored document.
pub(crate) fn client_fields(document: &[u8]) -> Result<Map<String, Value>, StoreError> {
    let mut fields: Map<String, Value> =
        serde_json::from_slice(document).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    strip_server_fields(&mut fields);
    Ok(fields)
}

/// Applies a change to a record's client fields.
pub(crate) fn apply_change(
    current: Map<String, Value>,
    change: Change,
) -> Result<Map<String, Value>, StoreError> {
    let mut fields = match change {
        Change::Replace(fields) => fields,
        Change::MergePatch(patch) => {
            let mut document = Value::Object(current);
            json_patch::merge(&mut document, &patch);
            match document {
                Value::Object(fields) => fields,
                _ => return Err(StoreError::NotAnObject),
            }
        }
    };
    strip_server_fields(&mut fields);
    Ok(fields)
}

/// Microseconds since the Unix epoch: the precision timestamps are kept at.
pub(crate) fn now_micros() -> i64 {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000).expect("the clock is within ±292,000 years of 1970")
}

/// RFC 3339 text of a microsecond timestamp.
pub(crate) fn rfc3339(micros: i64) -> String {
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .expect("microsecond timestamps from now_micros are in range");
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 can format every in-range UTC time")
}

/// One page from the rows a listing fetched (`limit + 1` of them at most, each its document,
/// sort key and sequence): the first `limit`, and a cursor when there was one more.
pub(crate) fn page_from_rows(
    rows: impl IntoIterator<Item = Result<(String, i64, i64), StoreError>>,
    query: &ListQuery,
) -> Result<Page, StoreError> {
    let limit = query.limit as usize;
    let mut items = Vec::with_capacity(limit.min(64));
    let mut last = None;
    let mut more = false;
    for row in rows {
        if items.len() == limit {
            more = true;
            break;
        }
        let (document, key, seq) = row?;
        items.push(Bytes::from(document));
        last = Some((key, seq));
    }
    let next = match (more, last) {
        (true, Some((key, seq))) => Some(Cursor {
            order: query.order,
            key,
            seq,
        }),
        _ => None,
    };
    Ok(Page { items, next })
}

/// A stored record as it is before a write.
pub(crate) struct Current {
    pub(crate) version: i64,
    pub(crate) created_us: i64,
    pub(crate) updated_us: i64,
    pub(crate) document: String,
}

/// The record after `change`: the next version, `updated` never running backwards even if the
/// clock does; returns it and its `updated` time for the row.
pub(crate) fn next_version(
    id: &str,
    current: &Current,
    change: Change,
) -> Result<(Record, i64), StoreError> {
    let fields = apply_change(client_fields(current.document.as_bytes())?, change)?;
    let updated_us = now_micros().max(current.updated_us);
    let version = current.version + 1;
    let document = render_document(id, version, current.created_us, updated_us, fields);
    Ok((
        Record {
            id: id.to_owned(),
            version,
            document,
        },
        updated_us,
    ))
}

/// Builds the document clients receive: server fields first, then the client's.
pub(crate) fn render_document(
    id: &str,
    version: i64,
    created_us: i64,
    updated_us: i64,
    fields: Map<String, Value>,
) -> Bytes {
    let mut document = Map::with_capacity(fields.len() + SERVER_FIELDS.len());
    document.insert("id".into(), Value::String(id.to_owned()));
    document.insert("created".into(), Value::String(rfc3339(created_us)));
    document.insert("updated".into(), Value::String(rfc3339(updated_us)));
    document.insert("version".into(), Value::from(version));
    document.extend(fields);
    Bytes::from(
        serde_json::to_vec(&Value::Object(document))
            .expect("a JSON object with string keys always serialises"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn record_ids_follow_the_documented_pattern() {
        assert!(is_valid_id(&new_record_id()));
        assert!(is_valid_id("Abc-1_2"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a.b"));
        assert!(!is_valid_id(&"x".repeat(65)));
    }

    #[test]
    fn merge_patch_follows_rfc_7396_and_keeps_server_fields_out() {
        let current = json!({"title": "a", "tags": ["x"], "meta": {"a": 1, "b": 2}});
        let Value::Object(current) = current else {
            unreachable!()
        };
        let patch = json!({"title": "b", "meta": {"a": null, "c": 3}, "tags": null, "id": "evil"});
        let patched = apply_change(current, Change::MergePatch(patch)).expect("object");
        assert_eq!(
            Value::Object(patched),
            json!({"title": "b", "meta": {"b": 2, "c": 3}})
        );
    }

    #[test]
    fn merge_patch_that_is_not_an_object_is_refused() {
        let err = apply_change(Map::new(), Change::MergePatch(json!([1, 2])));
        assert!(matches!(err, Err(StoreError::NotAnObject)));
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

    #[test]
    fn documents_put_server_fields_first() {
        let mut fields = Map::new();
        fields.insert("title".into(), json!("hi"));
        let doc = render_document("abc", 2, 0, 1_000_000, fields);
        let text = std::str::from_utf8(&doc).expect("utf-8");
        assert_eq!(
            text,
            r#"{"id":"abc","created":"1970-01-01T00:00:00Z","updated":"1970-01-01T00:00:01Z","version":2,"title":"hi"}"#
        );
    }
}
