//! The webhook outbox in the store: events wait here until the application's backend took them
//! ([`crate::webhooks`] writes and delivers them). Each node delivers the events it wrote
//! (`node`), keeps a row per open connection (`webhook_live`) and says when it was last alive
//! (`webhook_nodes`); a node that stopped is taken over by the next one that looks: its open
//! connections become `disconnected` events (`node_lost`), its undelivered events move to the
//! taker.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use super::StoreError;

/// An event to append: when it happened and its whole JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// When it happened, microseconds since the Unix epoch.
    pub at_us: i64,
    /// The event, as delivered.
    pub body: String,
}

/// An event waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Its place in the outbox.
    pub seq: i64,
    /// When it happened, microseconds since the Unix epoch.
    pub at_us: i64,
    /// The event, as delivered.
    pub body: String,
}

/// A change to a node's table of open connections, applied with the events it comes with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// The connection is open; `info` is what its `disconnected` event needs (JSON).
    Open {
        /// The connection's id.
        client: String,
        /// What its `disconnected` event is made from.
        info: String,
    },
    /// The connection closed.
    Closed {
        /// The connection's id.
        client: String,
    },
}

/// Makes the `disconnected` event of a connection a stopped node held, from its `info`.
pub type Lost = Arc<dyn Fn(&str) -> NewEvent + Send + Sync>;

/// What [`Outbox::take_over`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TakenOver {
    /// Nodes taken over.
    pub nodes: usize,
    /// Their open connections, now `disconnected` events.
    pub connections: usize,
}

/// The outbox's rows in one database.
#[async_trait]
pub trait Outbox: Send + Sync + fmt::Debug {
    /// Appends `events` for `node` and applies `live`, in one transaction.
    async fn append(
        &self,
        node: &str,
        events: Vec<NewEvent>,
        live: Vec<Live>,
    ) -> Result<(), StoreError>;

    /// Says that `node` is alive at `now_us` (0: it stopped, take it over at once).
    async fn beat(&self, node: &str, now_us: i64) -> Result<(), StoreError>;

    /// Takes over every other node last heard from before `cutoff_us`, and the open
    /// connections `node` itself left from an earlier run when `restarted`: their connections
    /// become events made by `lost`, appended for `node`, and their undelivered events become
    /// `node`'s. A node is taken over once, even by several takers at the same time.
    async fn take_over(
        &self,
        node: &str,
        cutoff_us: i64,
        restarted: bool,
        lost: Lost,
    ) -> Result<TakenOver, StoreError>;

    /// `node`'s oldest undelivered events, at most `limit`, in order.
    async fn pending(&self, node: &str, limit: usize) -> Result<Vec<Pending>, StoreError>;

    /// Removes delivered events by their `seq`.
    async fn remove(&self, seqs: Vec<i64>) -> Result<(), StoreError>;

    /// Removes `node`'s events older than `before_us`; returns how many.
    async fn expire(&self, node: &str, before_us: i64) -> Result<u64, StoreError>;

    /// How many events `node` has waiting.
    async fn count(&self, node: &str) -> Result<u64, StoreError>;
}
