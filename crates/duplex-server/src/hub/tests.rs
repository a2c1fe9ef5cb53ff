//! Unit tests of the hub: ordering, recovery, namespace rules, presence, channel lifetimes.

use std::collections::VecDeque;

use serde_json::value::RawValue;

use super::namespace::ClientAuth;
use super::queue::{Outgoing, OutgoingQueue};
use super::*;
use duplex_proto::frames::Since;

fn json(text: &str) -> Payload {
    Payload::Json(RawValue::from_string(text.into()).expect("json"))
}

fn hub() -> Hub {
    Hub::new(Namespaces::default(), Metrics::new())
}

fn connection(id: u64) -> Arc<ConnectionHandle> {
    let queue = Arc::new(OutgoingQueue::new(100));
    Arc::new(ConnectionHandle::new(ConnectionId(id), "test", None, queue))
}

async fn drain(connection: &ConnectionHandle) -> VecDeque<Outgoing> {
    let mut batch = VecDeque::new();
    connection.queue.next_batch(&mut batch).await;
    batch
}

fn offsets(batch: &VecDeque<Outgoing>) -> Vec<u64> {
    batch
        .iter()
        .filter_map(|item| match item {
            Outgoing::Publication(p) => Some(p.offset()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn subscribers_get_every_publication_in_offset_order_after_the_reply() {
    let hub = hub();
    let subscriber = connection(1);
    hub.subscribe("chat:a", &subscriber, 7, None)
        .await
        .expect("subscribe");
    for i in 0..3 {
        let outcome = hub
            .publish(
                "chat:a",
                json(&i.to_string()),
                Caller::Client(&ClientAuth::default()),
            )
            .await
            .expect("publish");
        assert_eq!(outcome.offset, i + 1);
    }
    let batch = drain(&subscriber).await;
    assert!(
        matches!(&batch[0], Outgoing::Control(reply) if reply.starts_with(b"{\"type\":\"reply\",\"id\":7"))
    );
    assert_eq!(offsets(&batch), vec![1, 2, 3]);
}

#[tokio::test]
async fn since_replays_missed_publications_after_the_reply() {
    let hub = hub();
    let epoch = hub
        .publish("chat:a", json("1"), Caller::Client(&ClientAuth::default()))
        .await
        .expect("publish")
        .epoch;
    for i in 2..=5 {
        hub.publish(
            "chat:a",
            json(&i.to_string()),
            Caller::Client(&ClientAuth::default()),
        )
        .await
        .expect("publish");
    }
    let subscriber = connection(1);
    let since = Since::Position {
        offset: 2,
        epoch: Some(epoch.to_string()),
    };
    hub.subscribe("chat:a", &subscriber, 1, Some(&since))
        .await
        .expect("subscribe");
    let batch = drain(&subscriber).await;
    let Outgoing::Control(reply) = &batch[0] else {
        panic!("reply first");
    };
    let reply: serde_json::Value = serde_json::from_slice(reply).expect("json");
    assert_eq!(reply["result"]["recovered"], true);
    assert_eq!(reply["result"]["missed"], 3);
    assert_eq!(offsets(&batch), vec![3, 4, 5]);
}

#[tokio::test]
async fn recovery_is_refused_with_a_reason() {
    let hub = hub();
    let epoch = hub
        .publish("chat:a", json("1"), Caller::Client(&ClientAuth::default()))
        .await
        .expect("publish")
        .epoch
        .to_string();
    let state_of = |since: Since| {
        let channel = hub.channel("chat:a").expect("a channel");
        let state = channel.state.lock();
        state.recoverable(&since)
    };
    assert_eq!(
        state_of(Since::Position {
            offset: 1,
            epoch: Some("other".into())
        }),
        Err(NotRecovered::EpochChanged)
    );
    assert_eq!(state_of(Since::Offset(1)), Err(NotRecovered::EpochRequired));
    assert_eq!(
        state_of(Since::Position {
            offset: 9,
            epoch: Some(epoch.clone())
        }),
        Err(NotRecovered::OffsetAhead)
    );
    assert_eq!(
        state_of(Since::Position {
            offset: 0,
            epoch: Some(epoch.clone())
        }),
        Ok(())
    );
    // A namespace without history cannot recover anything but "nothing missed".
    let stream = hub
        .publish(
            "stream:a",
            Payload::Binary(Bytes::from_static(b"x")),
            Caller::Client(&ClientAuth::default()),
        )
        .await
        .expect("publish");
    assert_eq!(stream.offset, 1);
}

#[tokio::test]
async fn namespace_rules_are_enforced() {
    let hub = hub();
    assert_eq!(
        hub.publish(
            "records:posts",
            json("1"),
            Caller::Client(&ClientAuth::default())
        )
        .await,
        Err(HubError::PermissionDenied(
            "only the server publishes in this namespace"
        ))
    );
    assert!(
        hub.publish("records:posts", json("1"), Caller::Server)
            .await
            .is_ok()
    );
    assert_eq!(
        hub.publish(
            "chat:a",
            Payload::Binary(Bytes::from_static(b"x")),
            Caller::Client(&ClientAuth::default())
        )
        .await,
        Err(HubError::BinaryNotAllowed)
    );
    assert!(
        hub.publish(
            "stream:a",
            Payload::Binary(Bytes::from_static(b"x")),
            Caller::Client(&ClientAuth::default())
        )
        .await
        .is_ok()
    );
    assert_eq!(
        hub.publish("nocolon", json("1"), Caller::Client(&ClientAuth::default()))
            .await,
        Err(HubError::InvalidChannel)
    );
    let big = format!("\"{}\"", "x".repeat(70 * 1024));
    assert!(matches!(
        hub.publish("chat:a", json(&big), Caller::Client(&ClientAuth::default()))
            .await,
        Err(HubError::MessageTooLarge { .. })
    ));
    assert_eq!(
        hub.presence("news:a", Caller::Server)
            .await
            .map(|p| p.len()),
        Err(HubError::PresenceDisabled)
    );
}

#[tokio::test]
async fn channels_without_subscribers_or_history_are_removed() {
    let hub = hub();
    let subscriber = connection(1);
    hub.subscribe("stream:a", &subscriber, 1, None)
        .await
        .expect("subscribe");
    assert_eq!(hub.channel_count(), 1);
    assert_eq!(
        hub.subscribe("stream:a", &subscriber, 2, None).await,
        Err(HubError::AlreadySubscribed)
    );
    hub.unsubscribe("stream:a", &subscriber)
        .expect("unsubscribe");
    assert_eq!(hub.channel_count(), 0);
    assert_eq!(
        hub.unsubscribe("stream:a", &subscriber),
        Err(HubError::NotSubscribed)
    );
    // A channel with history stays until the history expires.
    hub.publish("chat:a", json("1"), Caller::Client(&ClientAuth::default()))
        .await
        .expect("publish");
    assert_eq!(hub.channel_count(), 1);
}

#[tokio::test]
async fn presence_lists_subscribers_and_announces_joins_and_leaves() {
    let hub = hub();
    let first = connection(1);
    let second = connection(2);
    hub.subscribe("chat:room", &first, 1, None)
        .await
        .expect("subscribe");
    hub.subscribe("chat:room", &second, 1, None)
        .await
        .expect("subscribe");
    let ids: Vec<String> = hub
        .presence("chat:room", Caller::Server)
        .await
        .expect("presence")
        .into_iter()
        .map(|c| c.client)
        .collect();
    assert_eq!(
        ids,
        vec![ConnectionId(1).to_string(), ConnectionId(2).to_string()]
    );
    hub.deregister(&second);
    let batch = drain(&first).await;
    let frames: Vec<serde_json::Value> = batch
        .iter()
        .filter_map(|item| match item {
            Outgoing::Control(bytes) => serde_json::from_slice(bytes).ok(),
            _ => None,
        })
        .collect();
    assert_eq!(frames[1]["type"], "join");
    assert_eq!(frames[1]["client"], ConnectionId(2).to_string());
    assert_eq!(frames[2]["type"], "leave");
    assert_eq!(
        hub.presence("chat:room", Caller::Server)
            .await
            .expect("presence")
            .len(),
        1
    );
}
