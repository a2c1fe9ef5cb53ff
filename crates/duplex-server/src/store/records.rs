//! The record logic every backend shares: server fields, versions and preconditions, merge
//! patch, the document clients receive, paging. [`RecordStore`] implements [`Store`] over any
//! [`Backend`], which only moves rows.

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use super::backend::{Backend, Committed, Current, Inserted, Listed, NewRow, Next, Outboxed};
use super::history::{Delivery, LogTo, Logged, RecordHistory};
use super::{
    Change, CollectionSummary, Cursor, ListQuery, Page, Precondition, Record, RecordEvent,
    RecordOp, SERVER_FIELDS, Store, StoreError,
};

/// Records over a [`Backend`].
#[derive(Debug)]
pub(crate) struct RecordStore<B> {
    backend: B,
    /// Where committed writes are announced, in commit order.
    events: mpsc::UnboundedSender<RecordEvent>,
    /// The record events the webhooks want, written with each write.
    webhooks: Option<RecordWebhooks>,
    /// Which collections' events go into the store's channel history, with their write.
    history: Option<RecordHistory>,
}

/// Which record events go to the webhook outbox (in the write's own transaction), for which
/// node, and whom to wake once one is in.
#[derive(Debug, Clone)]
pub(crate) struct RecordWebhooks {
    /// The node that delivers them.
    pub(crate) node: String,
    /// `record.created`, `record.updated`, `record.deleted`.
    pub(crate) ops: [bool; 3],
    /// Woken after a write that appended an event.
    pub(crate) wake: std::sync::Arc<tokio::sync::Notify>,
    /// The node's outbox bound.
    pub(crate) budget: std::sync::Arc<crate::webhooks::Budget>,
    pub(crate) metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl RecordWebhooks {
    fn event(&self, collection: &str, op: RecordOp, record: &Record) -> Option<Outboxed> {
        let wanted = match op {
            RecordOp::Created => self.ops[0],
            RecordOp::Updated => self.ops[1],
            RecordOp::Deleted => self.ops[2],
        };
        if !wanted || !self.budget.take(&self.metrics) {
            return None;
        }
        self.metrics.webhook_queued.inc();
        let at_us = now_micros();
        let document = std::str::from_utf8(&record.document).expect("documents are UTF-8 JSON");
        let fields = format!(
            "\"collection\":{},\"record\":{document}",
            serde_json::Value::String(collection.to_owned())
        );
        let body = crate::webhooks::event_body(
            &format!("record.{}", op.as_str()),
            at_us,
            &self.node,
            None,
            None,
            &fields,
        );
        Some(Outboxed {
            node: self.node.clone(),
            event: super::outbox::NewEvent { at_us, body },
        })
    }
}

impl<B: Backend> RecordStore<B> {
    pub(crate) fn new(
        backend: B,
        events: mpsc::UnboundedSender<RecordEvent>,
        webhooks: Option<RecordWebhooks>,
        history: Option<RecordHistory>,
    ) -> Self {
        RecordStore {
            backend,
            events,
            webhooks,
            history,
        }
    }

    /// Wakes the webhook delivery after a write that appended an event.
    fn woke(&self, appended: bool) {
        if appended && let Some(webhooks) = &self.webhooks {
            webhooks.wake.notify_one();
        }
    }

    /// What the backend does once a write committed: the event goes out in commit order, and
    /// the receiver hears when it was announced. When the store keeps the collection's channel
    /// history, the backend appends the event in the write's own transaction and it goes to the
    /// hub with its offset; otherwise it is published as it comes.
    fn announce(&self, collection: &str, op: RecordOp) -> (Committed, oneshot::Receiver<()>) {
        let (announced, heard) = oneshot::channel();
        let events = self.events.clone();
        let channel = format!("records:{collection}");
        let history = self.history.as_ref().and_then(|history| {
            (history.retention)(&channel).map(|retention| (history.deliveries.clone(), retention))
        });
        let (log, deliveries) = match history {
            Some((deliveries, retention)) => (
                Some(LogTo {
                    channel: channel.clone(),
                    retention,
                    op,
                }),
                Some(deliveries),
            ),
            None => (None, None),
        };
        let collection = collection.to_owned();
        let tell = Box::new(move |record: &Record, logged: Option<Logged>| {
            // Nobody listening (a store used alone) is fine: there is nobody to tell.
            match (logged, deliveries) {
                (Some((offset, epoch, payload)), Some(deliveries)) => {
                    let _ = deliveries.send(Delivery {
                        channel: channel.into(),
                        offset,
                        epoch,
                        payload,
                        told: None,
                        delivered: Some(announced),
                        place: None,
                    });
                }
                _ => {
                    let _ = events.send(RecordEvent {
                        collection,
                        op,
                        record: record.clone(),
                        announced,
                    });
                }
            }
        });
        (Committed { log, tell }, heard)
    }

    /// Version 1 of a record; `precondition` is `None` (a fresh id) or `Absent` (the client's).
    async fn insert(
        &self,
        collection: &str,
        id: &str,
        mut fields: Map<String, Value>,
        precondition: Precondition,
    ) -> Result<Record, StoreError> {
        strip_server_fields(&mut fields);
        let now = now_micros();
        let record = Record {
            id: id.to_owned(),
            version: 1,
            document: render_document(id, 1, now, now, fields),
        };
        let outbox = self
            .webhooks
            .as_ref()
            .and_then(|w| w.event(collection, RecordOp::Created, &record));
        let appended = outbox.is_some();
        let row = NewRow {
            collection: collection.to_owned(),
            at_us: now,
            record: record.clone(),
            outbox,
        };
        let (committed, announced) = self.announce(collection, RecordOp::Created);
        match self.backend.insert(row, committed).await? {
            Inserted::Yes => {
                let _ = announced.await;
                self.woke(appended);
                Ok(record)
            }
            Inserted::Taken if precondition == Precondition::Absent => {
                let current = self.backend.get(collection, id).await?;
                Err(StoreError::PreconditionFailed {
                    current: current.map(|record| record.version),
                })
            }
            Inserted::Taken => Err(StoreError::Conflict),
        }
    }
}

#[async_trait]
impl<B: Backend> Store for RecordStore<B> {
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
        self.backend.get(collection, id).await
    }

    async fn update(
        &self,
        collection: &str,
        id: &str,
        change: Change,
        precondition: &Precondition,
    ) -> Result<Record, StoreError> {
        let (precondition, owned_id) = (precondition.clone(), id.to_owned());
        let (webhooks, owned_collection) = (self.webhooks.clone(), collection.to_owned());
        let decide = Box::new(move |current: Option<Current>| {
            let current = precondition.admit(current, |c| c.version)?;
            let mut next = next_version(&owned_id, &current, change)?;
            next.outbox =
                webhooks.and_then(|w| w.event(&owned_collection, RecordOp::Updated, &next.record));
            Ok(next)
        });
        let (committed, announced) = self.announce(collection, RecordOp::Updated);
        let record = self
            .backend
            .update(collection, id, decide, committed)
            .await?;
        let _ = announced.await;
        self.woke(self.webhooks.as_ref().is_some_and(|w| w.ops[1]));
        Ok(record)
    }

    async fn delete(
        &self,
        collection: &str,
        id: &str,
        precondition: &Precondition,
    ) -> Result<Record, StoreError> {
        let precondition = precondition.clone();
        let (webhooks, owned_collection) = (self.webhooks.clone(), collection.to_owned());
        let admit = Box::new(move |record: Option<Record>| {
            let record = precondition.admit(record, |r| r.version)?;
            let outbox =
                webhooks.and_then(|w| w.event(&owned_collection, RecordOp::Deleted, &record));
            Ok((record, outbox))
        });
        let (committed, announced) = self.announce(collection, RecordOp::Deleted);
        let record = self
            .backend
            .delete(collection, id, admit, committed)
            .await?;
        let _ = announced.await;
        self.woke(self.webhooks.as_ref().is_some_and(|w| w.ops[2]));
        Ok(record)
    }

    async fn list(&self, collection: &str, query: &ListQuery) -> Result<Page, StoreError> {
        let rows = self
            .backend
            .list(collection, query, i64::from(query.limit) + 1)
            .await?;
        Ok(page_from_rows(rows, query))
    }

    async fn collections(&self) -> Result<Vec<CollectionSummary>, StoreError> {
        self.backend.collections().await
    }

    async fn secret(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.backend.keep_secret(name, new_secret()).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.backend.ping().await
    }

    async fn close(&self) {
        self.backend.close().await;
    }
}

/// The record after `change`: the next version, `updated` never running backwards even if the
/// clock does.
fn next_version(id: &str, current: &Current, change: Change) -> Result<Next, StoreError> {
    let fields = apply_change(client_fields(current.document.as_bytes())?, change)?;
    let updated_us = now_micros().max(current.updated_us);
    let version = current.version + 1;
    let document = render_document(id, version, current.created_us, updated_us, fields);
    Ok(Next {
        record: Record {
            id: id.to_owned(),
            version,
            document,
        },
        updated_us,
        outbox: None,
    })
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

/// One page from the rows a listing fetched (`limit + 1` of them at most): the first `limit`,
/// and a cursor when there was one more.
fn page_from_rows(rows: Vec<Listed>, query: &ListQuery) -> Page {
    let limit = query.limit as usize;
    let mut items = Vec::with_capacity(limit.min(64));
    let mut last = None;
    let mut more = false;
    for (document, key, seq) in rows {
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(document);
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
    Page { items, next }
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
    use crate::store::is_valid_id;
    use serde_json::json;

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
