//! Channel history kept in the store, for the namespaces with `history_storage = "store"` on a
//! node without a broker: a channel's epoch, its last offset and its recent publications live
//! in the database, so after a restart the channel goes on from its last offset in the same
//! epoch and clients recover across the restart.
//!
//! The store is the channel's [`ChannelLog`](crate::broker::ChannelLog), as a broker is with
//! one: a publication gets its offset inside the transaction that appends it (group commit on
//! SQLite), and once that transaction committed it is handed, in commit order, to the hub as a
//! [`Delivery`]. A publisher is answered once its publication committed, as a broker answers
//! once it has a publication (history reads go to the store, so whoever is answered finds it
//! there; a subscriber that reads it from history is not sent it again live); a record write
//! is answered after its event was fanned out, as without store history. A publication whose
//! transaction did not commit was never given an offset anyone saw, and one that committed is
//! in history even if the process dies before fanning it out.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::model::Payload;

/// A committed publication on its way to the hub.
pub struct Delivery {
    /// Its channel.
    pub channel: Arc<str>,
    /// Its offset.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: Arc<str>,
    /// What it carries.
    pub payload: Arc<Payload>,
    /// Called with its offset before it is fanned out, in commit order.
    pub told: Option<crate::broker::Told>,
    /// Told once the hub fanned it out (a record write answers after that).
    pub delivered: Option<oneshot::Sender<()>>,
    /// A publication's place among those committed and not yet fanned out (see
    /// [`Undelivered`]); freed when the delivery is dropped, after its fan-out.
    pub(crate) place: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("channel", &self.channel)
            .field("offset", &self.offset)
            .field("epoch", &self.epoch)
            .field("told", &self.told.is_some())
            .finish_non_exhaustive()
    }
}

/// Committed publications in commit order. Unbounded, yet bounded by what sends into it: a
/// record write waits for its own delivery before it is answered, and a publisher (answered at
/// commit) first takes a place among at most [`UNDELIVERED`] publications not yet fanned out.
pub type Deliveries = mpsc::UnboundedReceiver<Delivery>;

/// Publications committed and not yet fanned out, at most: past this, publishers wait for the
/// fan-out to catch up instead of the queue growing.
pub(crate) const UNDELIVERED: usize = 4096;

/// The places of publications committed and not yet fanned out.
#[derive(Debug, Clone)]
pub(crate) struct Undelivered(Arc<tokio::sync::Semaphore>);

impl Undelivered {
    pub(crate) fn new(places: usize) -> Undelivered {
        Undelivered(Arc::new(tokio::sync::Semaphore::new(places)))
    }

    /// Waits for a place; it travels with the publication's [`Delivery`].
    pub(crate) async fn place(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.0
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

/// Where committed publications go.
pub(crate) type DeliverySender = mpsc::UnboundedSender<Delivery>;

/// Every how many appends a channel of `size` is trimmed back to its window: an eighth of the
/// window, from 1 to 256. Between two trims the entries that left the window stay stored (up to
/// a step less one), unread.
///
/// Trimming one entry with every append touched the oldest pages of the entries' three B-trees
/// in every transaction, on top of the newest; a step deletes a run of neighbours together
/// (their pages once) every few transactions instead.
pub(crate) fn trim_step(size: u64) -> u64 {
    (size / 8).clamp(1, 256)
}

/// Offsets at or below this are outside a channel's window: the last `size` offsets up to
/// `top` (entries there may wait for the next trim step; reads skip them).
pub(crate) fn window_floor(top: u64, size: usize) -> u64 {
    top.saturating_sub(size.max(1) as u64)
}

/// A store that keeps channel history.
#[async_trait::async_trait]
pub(crate) trait HistoryStore: crate::broker::ChannelLog {
    /// Deletes up to `limit` entries past their expiry; returns how many it deleted.
    async fn expire(&self, limit: usize) -> Result<usize, super::StoreError>;

    /// Whether record events go into the history with their write, in its transaction; when
    /// not, `records:` channels keep their history in memory (an event appended after its
    /// write could be lost to a crash between the two, a gap nobody would be told of).
    fn keeps_record_events(&self) -> bool;
}

/// The channel history of an opened store, and what it committed, to hand to the hub.
#[derive(Debug)]
pub(crate) struct OpenedHistory {
    /// The history.
    pub store: Arc<dyn HistoryStore>,
    /// Its committed publications, in commit order.
    pub deliveries: Deliveries,
}

/// Where a record write appends its event, in its own transaction.
#[derive(Debug, Clone)]
pub(crate) struct LogTo {
    /// `records:{collection}`.
    pub(crate) channel: String,
    /// The channel's bounds.
    pub(crate) retention: crate::broker::Retention,
    /// What the write does.
    pub(crate) op: super::RecordOp,
}

/// A record event appended with its write: its offset, the channel's epoch, what it carries.
pub(crate) type Logged = (u64, Arc<str>, Arc<Payload>);

/// The publication of a record event: `{"op": "created" | "updated" | "deleted", "record": …}`.
pub(crate) fn record_event(
    op: super::RecordOp,
    document: &[u8],
) -> Result<Payload, super::StoreError> {
    let corrupt = |e: String| super::StoreError::Corrupt(e);
    let document = std::str::from_utf8(document).map_err(|e| corrupt(e.to_string()))?;
    let mut data = String::with_capacity(document.len() + 32);
    data.push_str("{\"op\":\"");
    data.push_str(op.as_str());
    data.push_str("\",\"record\":");
    data.push_str(document);
    data.push('}');
    let data =
        serde_json::value::RawValue::from_string(data).map_err(|e| corrupt(e.to_string()))?;
    Ok(Payload::Json(data))
}

/// Which collections' record events go into the store's channel history, and within what
/// bounds (from the `records` namespaces), with where committed events go.
#[derive(Clone)]
pub(crate) struct RecordHistory {
    /// The bounds of `records:{collection}` when its history is in the store.
    pub(crate) retention: super::HistoryBounds,
    /// Where committed events go, in commit order.
    pub(crate) deliveries: DeliverySender,
}

impl std::fmt::Debug for RecordHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordHistory").finish_non_exhaustive()
    }
}

/// What the history stores' tests share.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::Duration;

    use serde_json::value::RawValue;

    use crate::broker::Retention;
    use crate::model::Payload;

    /// Bounds of `size` publications and `bytes` bytes, kept an hour.
    pub(crate) fn retention(size: usize, bytes: usize) -> Retention {
        Retention {
            size,
            ttl: Duration::from_secs(3600),
            bytes,
        }
    }

    /// A JSON payload of `text`.
    pub(crate) fn json(text: &str) -> Payload {
        Payload::Json(RawValue::from_string(text.to_owned()).expect("json"))
    }
}
