//! The seam between the record logic ([`super::RecordStore`]) and a database: a [`Backend`]
//! moves rows in its own SQL and maps its own errors, and decides nothing about records.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;

use super::{CollectionSummary, ListQuery, Record, StoreError};

/// A record's row as a write finds it.
#[derive(Debug, Clone)]
pub(crate) struct Current {
    pub(crate) version: i64,
    pub(crate) created_us: i64,
    pub(crate) updated_us: i64,
    pub(crate) document: String,
}

/// The row a write leaves: the record and its `updated` time in microseconds, and the webhook
/// event that goes with it.
#[derive(Debug, Clone)]
pub(crate) struct Next {
    pub(crate) record: Record,
    pub(crate) updated_us: i64,
    pub(crate) outbox: Option<Outboxed>,
}

/// A webhook event a record write appends to the outbox in its own transaction.
#[derive(Debug, Clone)]
pub(crate) struct Outboxed {
    /// The node that delivers it.
    pub(crate) node: String,
    pub(crate) event: super::outbox::NewEvent,
}

/// A new record's row: version 1, created and updated at `at_us`.
#[derive(Debug, Clone)]
pub(crate) struct NewRow {
    pub(crate) collection: String,
    pub(crate) at_us: i64,
    pub(crate) record: Record,
    pub(crate) outbox: Option<Outboxed>,
}

/// What an insert found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inserted {
    /// The row is in.
    Yes,
    /// A row with that collection and id was there already; nothing changed.
    Taken,
}

/// One row of a listing: the document, its sort key and its insertion sequence.
pub(crate) type Listed = (Bytes, i64, i64);

/// Decides, from the row as it is (`None` when there is none), the row a write leaves.
pub(crate) type Decide = Box<dyn FnOnce(Option<Current>) -> Result<Next, StoreError> + Send>;

/// Decides, from the record as it is, whether it may be deleted (and returns it, with the
/// webhook event of its deletion).
pub(crate) type Admit =
    Box<dyn FnOnce(Option<Record>) -> Result<(Record, Option<Outboxed>), StoreError> + Send>;

/// What a write does once committed: where its record event is appended in its own
/// transaction (the records channel's history, when the store keeps it), and whom to tell.
pub(crate) struct Committed {
    /// The channel history the write's event goes into, in the write's transaction; `None`
    /// when history is not in this store, or the backend keeps none.
    pub(crate) log: Option<super::history::LogTo>,
    /// Told with the record written (or deleted), and the event's place in history when the
    /// backend appended it. A backend calls these in the order its writes commit, and never
    /// for a write that did not.
    pub(crate) tell: Tell,
}

/// See [`Committed::tell`].
pub(crate) type Tell = Box<dyn FnOnce(&Record, Option<super::history::Logged>) + Send>;

impl fmt::Debug for Committed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Committed")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

/// A database under [`super::RecordStore`]: its queries and its error mapping, nothing else.
///
/// `update` and `delete` read the row and write it in one transaction that no other writer can
/// interleave with, calling the record logic in between; when it says no, nothing is written.
/// A write that was handed to the database goes on to its commit (or its failure) even when the
/// caller stops waiting, so a write is never half done and a committed one is always announced.
#[async_trait]
pub(crate) trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Inserts a row unless its collection and id are taken.
    async fn insert(&self, row: NewRow, committed: Committed) -> Result<Inserted, StoreError>;

    /// Reads one record.
    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>, StoreError>;

    /// Reads the row, has `decide` make the next one, writes it.
    async fn update(
        &self,
        collection: &str,
        id: &str,
        decide: Decide,
        committed: Committed,
    ) -> Result<Record, StoreError>;

    /// Reads the record, has `admit` allow it, deletes it.
    async fn delete(
        &self,
        collection: &str,
        id: &str,
        admit: Admit,
        committed: Committed,
    ) -> Result<Record, StoreError>;

    /// Up to `rows` rows of a collection in the query's order, after its cursor, matching its
    /// filters.
    async fn list(
        &self,
        collection: &str,
        query: &ListQuery,
        rows: i64,
    ) -> Result<Vec<Listed>, StoreError>;

    /// Collections with at least one record and how many, by name.
    async fn collections(&self) -> Result<Vec<CollectionSummary>, StoreError>;

    /// Keeps `candidate` as the secret `name` unless one is kept already; returns the kept one.
    async fn keep_secret(&self, name: &str, candidate: Vec<u8>) -> Result<Vec<u8>, StoreError>;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Finishes the writes handed over and closes the connections.
    async fn close(&self);
}
