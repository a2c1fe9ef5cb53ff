//! Webhooks against a real receiver: every event signed and named in `Duplex-Delivery`, in
//! order per connection; a receiver that is down for a while loses nothing; the outbox bound
//! and `max_age` drop what they must without holding publishing up. On SQLite, and on
//! PostgreSQL when `DUPLEX_TEST_POSTGRES` is set.

use std::time::Duration;

use duplex_server::webhooks::{EventKind, WebhooksConfig};
use duplex_testkit::{TestServer, WebhookReceiver, hs256_token, postgres_store, wait_for};
use serde_json::{Value, json};

const SECRET: &str = "a-secret-of-sixteen-chars";

fn webhooks(receiver: &WebhookReceiver, events: &[EventKind]) -> WebhooksConfig {
    WebhooksConfig {
        url: receiver.url(),
        secret: Some("webhook-secret".into()),
        events: events.to_vec(),
        max_age: None,
        max_events: None,
        batch: Some(7),
        timeout: Some("2s".into()),
        node_expiry: None,
    }
}

const ALL: [EventKind; 8] = [
    EventKind::Connected,
    EventKind::Disconnected,
    EventKind::Subscribed,
    EventKind::Unsubscribed,
    EventKind::Published,
    EventKind::RecordCreated,
    EventKind::RecordUpdated,
    EventKind::RecordDeleted,
];

async fn server(config: WebhooksConfig, store: Option<String>) -> TestServer {
    let settings = config.settings().expect("valid webhooks");
    TestServer::start_with(move |c| {
        c.webhooks = Some(settings);
        c.jwt_secret = Some(SECRET.into());
        c.store = store;
    })
    .await
}

/// The events of one kind once there are at least `n`.
async fn at_least(receiver: &WebhookReceiver, kind: &str, n: usize) -> Vec<Value> {
    wait_for(&format!("{n} {kind} events"), || async {
        let found = receiver.of(kind);
        (found.len() >= n).then_some(found)
    })
    .await
}

async fn every_event_is_delivered_signed_and_in_order(store: Option<String>) {
    let receiver = WebhookReceiver::start(Some("webhook-secret")).await;
    let server = server(webhooks(&receiver, &ALL), store).await;
    let http = reqwest::Client::new();

    let token = hs256_token(SECRET, &json!({"sub": "ana", "exp": 4_000_000_000u64}));
    let mut ana = server.ws().await;
    let client = ana.connected["client"]
        .as_str()
        .expect("client id")
        .to_owned();
    let connected = ana
        .request(json!({"type": "connect", "id": 1, "token": token}), 1)
        .await;
    assert_eq!(connected["result"]["user"], "ana", "{connected}");
    ana.subscribe("chat:hooks", 2).await;
    let published = ana
        .request(
            json!({"type": "publish", "id": 3, "channel": "chat:hooks", "data": {"text": "hi"}}),
            3,
        )
        .await;
    assert_eq!(published["result"]["offset"], 1, "{published}");
    // Answered after the event is in the outbox: a restart now could not lose it.
    let unsubscribed = ana
        .request(
            json!({"type": "unsubscribe", "id": 4, "channel": "chat:hooks"}),
            4,
        )
        .await;
    assert_eq!(unsubscribed["type"], "reply");
    drop(ana);

    // The server API's publications and the record writes are told too.
    let response = http
        .post(server.url("/api/channels/chat:hooks/publish"))
        .json(&json!({"from": "server"}))
        .send()
        .await
        .expect("publish");
    assert!(response.status().is_success());
    let records = server.url("/api/collections/notes/records");
    let created: Value = http
        .post(&records)
        .json(&json!({"title": "first"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("JSON");
    let id = created["id"].as_str().expect("id");
    let patched = http
        .patch(format!("{records}/{id}"))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"title":"second"}"#)
        .send()
        .await
        .expect("patch");
    assert!(patched.status().is_success());
    let deleted = http
        .delete(format!("{records}/{id}"))
        .send()
        .await
        .expect("delete");
    assert!(deleted.status().is_success());

    at_least(&receiver, "disconnected", 1).await;
    at_least(&receiver, "record.deleted", 1).await;
    at_least(&receiver, "published", 2).await;
    assert_eq!(receiver.problems(), Vec::<String>::new());

    // One connection's events, in the order they happened.
    let mine = receiver.of_client(&client);
    let kinds: Vec<&str> = mine.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "connected",
            "subscribed",
            "published",
            "unsubscribed",
            "disconnected"
        ],
        "{mine:#?}"
    );
    assert_eq!(mine[0]["transport"], "websocket");
    assert!(
        mine[0]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    );
    assert_eq!(mine[1]["channel"], "chat:hooks");
    assert_eq!(mine[1]["user"], "ana");
    assert_eq!(mine[2]["data"], json!({"text": "hi"}));
    assert_eq!(mine[2]["offset"], 1);
    assert_eq!(mine[3]["reason"], "client");
    assert_eq!(mine[4]["reason"], "closed");
    assert_eq!(mine[4]["user"], "ana");
    for event in &mine {
        assert!(event["id"].as_str().is_some_and(|id| id.len() == 32));
        assert!(event["at"].as_str().is_some_and(|at| at.ends_with('Z')));
        assert!(event["node"].as_str().is_some());
    }

    let by_server = receiver
        .of("published")
        .into_iter()
        .find(|e| e["data"] == json!({"from": "server"}))
        .expect("the server API's publication");
    assert_eq!(
        (&by_server["client"], by_server["offset"].as_u64()),
        (&Value::Null, Some(2))
    );

    let record_events: Vec<Value> = receiver
        .events()
        .into_iter()
        .filter(|e| {
            e["event"]
                .as_str()
                .is_some_and(|k| k.starts_with("record."))
        })
        .collect();
    let ops: Vec<(&str, i64)> = record_events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or(""),
                e["record"]["version"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("record.created", 1),
            ("record.updated", 2),
            ("record.deleted", 2)
        ]
    );
    assert!(record_events.iter().all(|e| e["collection"] == "notes"));
    assert_eq!(record_events[1]["record"]["title"], "second");

    // Delivered events leave the outbox.
    wait_for("an empty outbox", || async {
        (server.metric("duplex_webhook_outbox_events").await == 0.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn every_event_is_delivered_signed_and_in_order_on_sqlite() {
    every_event_is_delivered_signed_and_in_order(None).await;
}

#[tokio::test]
async fn every_event_is_delivered_signed_and_in_order_on_postgres() {
    let Some(store) = postgres_store() else {
        eprintln!("skipped: DUPLEX_TEST_POSTGRES is not set");
        return;
    };
    every_event_is_delivered_signed_and_in_order(Some(store)).await;
}

#[tokio::test]
async fn a_receiver_down_for_a_while_gets_every_event_once_it_is_back() {
    let receiver = WebhookReceiver::start(Some("webhook-secret")).await;
    receiver.set_down(true);
    let server = server(
        webhooks(&receiver, &[EventKind::Connected, EventKind::Disconnected]),
        None,
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let client = server.ws().await;
        clients.push(client.connected["client"].as_str().expect("id").to_owned());
        drop(client);
    }
    wait_for("deliveries refused while down", || async {
        (receiver.refused() >= 2).then_some(())
    })
    .await;
    assert!(server.metric("duplex_webhook_events_retried_total").await >= 7.0);
    receiver.set_down(false);
    let disconnected = at_least(&receiver, "disconnected", 20).await;
    assert_eq!(disconnected.len(), 20);
    assert_eq!(receiver.of("connected").len(), 20);
    for client in &clients {
        let kinds: Vec<Value> = receiver
            .of_client(client)
            .into_iter()
            .map(|e| e["event"].clone())
            .collect();
        assert_eq!(
            kinds,
            [json!("connected"), json!("disconnected")],
            "{client}"
        );
    }
    assert_eq!(receiver.problems(), Vec::<String>::new());
}

#[tokio::test]
async fn a_full_outbox_drops_new_events_and_publishing_goes_on() {
    let receiver = WebhookReceiver::start(None).await;
    receiver.set_down(true);
    let mut config = webhooks(&receiver, &[EventKind::Published]);
    config.max_events = Some(3);
    let server = server(config, None).await;
    let http = reqwest::Client::new();
    for i in 0..10 {
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            http.post(server.url("/api/channels/chat:full/publish"))
                .json(&json!({"i": i}))
                .send(),
        )
        .await
        .expect("publishing is not held up")
        .expect("publish");
        assert!(response.status().is_success());
    }
    assert_eq!(
        server
            .metric("duplex_webhook_events_dropped_total{reason=\"full\"}")
            .await,
        7.0
    );
    receiver.set_down(false);
    let published = at_least(&receiver, "published", 3).await;
    let kept: Vec<Value> = published.iter().map(|e| e["data"]["i"].clone()).collect();
    assert_eq!(kept, [json!(0), json!(1), json!(2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_s_publications_are_told_in_its_order() {
    let receiver = WebhookReceiver::start(None).await;
    let server = server(webhooks(&receiver, &[EventKind::Published]), None).await;
    let mut publishers = Vec::new();
    for p in 0..4 {
        let mut client = server.ws().await;
        publishers.push(tokio::spawn(async move {
            // Each sends its next publication without waiting for the answer to the last.
            for i in 0..25u64 {
                let id = i + 1;
                client
                    .send_json(json!({"type": "publish", "id": id, "channel": "chat:race", "data": {"p": p, "i": i}}))
                    .await;
            }
            for _ in 0..25 {
                let answer = client.next_json().await;
                assert_eq!(answer["type"], "reply", "{answer}");
            }
        }));
    }
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    let published = at_least(&receiver, "published", 100).await;
    let offsets: Vec<u64> = published
        .iter()
        .filter_map(|e| e["offset"].as_u64())
        .collect();
    assert_eq!(offsets, (1..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_full_outbox_keeps_every_pair_whole() {
    let receiver = WebhookReceiver::start(None).await;
    receiver.set_down(true);
    let mut config = webhooks(&receiver, &[EventKind::Connected, EventKind::Disconnected]);
    config.max_events = Some(2);
    let server = server(config, None).await;
    let mut ids = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let client = server.ws().await;
        ids.push(client.connected["client"].as_str().expect("id").to_owned());
        clients.push(client);
    }
    // Two `connected` fill the outbox; the two `disconnected` they are owed go past it.
    drop(clients);
    wait_for("every connection closed", || async {
        (server
            .metric("duplex_connections{transport=\"websocket\"}")
            .await
            == 0.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        server
            .metric("duplex_webhook_events_dropped_total{reason=\"full\"}")
            .await,
        1.0,
        "the third connection is not told about at all"
    );
    receiver.set_down(false);
    at_least(&receiver, "disconnected", 2).await;
    for (i, id) in ids.iter().enumerate() {
        let kinds: Vec<Value> = receiver
            .of_client(id)
            .into_iter()
            .map(|e| e["event"].clone())
            .collect();
        if i < 2 {
            assert_eq!(kinds, [json!("connected"), json!("disconnected")], "{id}");
        } else {
            assert!(kinds.is_empty(), "{kinds:?}");
        }
    }
}

#[tokio::test]
async fn events_older_than_max_age_are_dropped_undelivered() {
    let receiver = WebhookReceiver::start(None).await;
    receiver.set_down(true);
    let mut config = webhooks(&receiver, &[EventKind::Published]);
    config.max_age = Some("1s".into());
    let server = server(config, None).await;
    let http = reqwest::Client::new();
    for i in 0..3 {
        http.post(server.url("/api/channels/chat:old/publish"))
            .json(&json!({"i": i}))
            .send()
            .await
            .expect("publish");
    }
    wait_for("events dropped by age", || async {
        (server
            .metric("duplex_webhook_events_dropped_total{reason=\"age\"}")
            .await
            == 3.0)
            .then_some(())
    })
    .await;
    receiver.set_down(false);
    http.post(server.url("/api/channels/chat:old/publish"))
        .json(&json!({"i": "fresh"}))
        .send()
        .await
        .expect("publish");
    let published = at_least(&receiver, "published", 1).await;
    assert_eq!(published.len(), 1);
    assert_eq!(published[0]["data"]["i"], "fresh");
}
