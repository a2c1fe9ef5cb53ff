//! Committed record writes become publications on `records:{collection}`, in the order they
//! were committed: `{"op": "created" | "updated" | "deleted", "record": {…}}`.

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::hub::Hub;
use crate::hub::namespace::Caller;
use crate::hub::publication::Payload;
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
    let op = event.op.as_str();
    let document = &event.record.document;
    let mut data = Vec::with_capacity(document.len() + 32);
    data.extend_from_slice(b"{\"op\":\"");
    data.extend_from_slice(op.as_bytes());
    data.extend_from_slice(b"\",\"record\":");
    data.extend_from_slice(document);
    data.push(b'}');
    let data = String::from_utf8(data).expect("stored documents are UTF-8 JSON");
    let data = match RawValue::from_string(data) {
        Ok(data) => data,
        Err(error) => {
            tracing::error!(%error, collection = event.collection, "cannot publish a record event");
            return;
        }
    };
    let channel = format!("records:{}", event.collection);
    if let Err(error) = hub
        .publish(&channel, Payload::Json(data), Caller::Server)
        .await
    {
        tracing::error!(%error, channel, "cannot publish a record event");
    }
}
