//! Committed record writes become publications on `records:{collection}`, in the order they
//! were committed: `{"op": "created" | "updated" | "deleted", "record": {…}}`.

use std::sync::Arc;

use crate::hub::Hub;
use crate::hub::namespace::Caller;
use crate::store::{RecordEvent, RecordEvents};

/// Publishes each committed write as the store announces it, one after the other (so a
/// channel's subscribers see them in commit order), and tells the write's caller when it is out.
pub(crate) async fn announce(hub: Arc<Hub>, mut events: RecordEvents) {
    while let Some(event) = events.recv().await {
        publish(&hub, &event).await;
        let _ = event.announced.send(());
    }
}

async fn publish(hub: &Hub, event: &RecordEvent) {
    let data = match crate::store::history::record_event(event.op, &event.record.document) {
        Ok(data) => data,
        Err(error) => {
            tracing::error!(%error, collection = event.collection, "cannot publish a record event");
            return;
        }
    };
    let channel = format!("records:{}", event.collection);
    if let Err(error) = hub.publish(&channel, data, Caller::Server).await {
        tracing::error!(%error, channel, "cannot publish a record event");
    }
}
