//! Every `connected` gets its `disconnected`, even when the node that held the connection is
//! killed: `kill -9` of `duplex serve` with connections open, then a restart on the same data
//! (SQLite) sends their `disconnected` with `reason: "node_lost"`; with two nodes on Redis and
//! PostgreSQL, the surviving node sends them once the killed one's sign of life expires.

mod common;

use std::time::Duration;

use duplex_testkit::{WebhookReceiver, WsClient, postgres_store, redis_broker, wait_for};
use serde_json::Value;

/// A `duplex.toml` with `[webhooks]` to `receiver` in `dir`; returns its path.
fn config(dir: &std::path::Path, receiver: &WebhookReceiver, expiry: &str) -> String {
    let path = dir.join("duplex.toml");
    std::fs::write(
        &path,
        format!(
            "[webhooks]\nurl = \"{}\"\nevents = [\"connected\", \"disconnected\"]\nnode_expiry = \"{expiry}\"\n",
            receiver.url()
        ),
    )
    .expect("write duplex.toml");
    path.to_str().expect("a UTF-8 path").to_owned()
}

/// Opens `n` WebSocket connections to `url`; returns them with their ids.
async fn open(url: &str, n: usize) -> (Vec<WsClient>, Vec<String>) {
    let ws = format!("{}/ws", url.replacen("http://", "ws://", 1));
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let client = WsClient::connect(&ws).await;
        ids.push(
            client.connected["client"]
                .as_str()
                .expect("client id")
                .to_owned(),
        );
        clients.push(client);
    }
    (clients, ids)
}

/// Waits until every client in `ids` has a `connected` delivered (its row is then committed).
async fn connected(receiver: &WebhookReceiver, ids: &[String]) {
    wait_for("every connected delivered", || async {
        let delivered = receiver.of("connected");
        ids.iter()
            .all(|id| delivered.iter().any(|e| e["client"] == id.as_str()))
            .then_some(())
    })
    .await;
}

/// The `disconnected` events of `ids`, once each has one.
async fn disconnected(receiver: &WebhookReceiver, ids: &[String]) -> Vec<Value> {
    wait_for("every connection's disconnected", || async {
        let found: Vec<Value> = receiver
            .of("disconnected")
            .into_iter()
            .filter(|e| ids.iter().any(|id| e["client"] == id.as_str()))
            .collect();
        (found.len() >= ids.len()).then_some(found)
    })
    .await
}

#[tokio::test]
async fn a_node_killed_with_connections_open_sends_their_disconnected_when_it_restarts() {
    let receiver = WebhookReceiver::start(None).await;
    let data = tempfile::tempdir().expect("tempdir");
    let config = config(data.path(), &receiver, "30s");
    let args = ["--config", config.as_str()];
    let (mut child, url) = common::spawn_serve(data.path(), &args).await;
    let (clients, ids) = open(&url, 3).await;
    connected(&receiver, &ids).await;

    child.kill().await.expect("SIGKILL");
    drop(clients);
    assert!(
        receiver.of("disconnected").is_empty(),
        "a killed node says nothing"
    );

    let (_child, _url) = common::spawn_serve(data.path(), &args).await;
    let lost = disconnected(&receiver, &ids).await;
    assert_eq!(lost.len(), 3, "exactly one each: {lost:#?}");
    for event in &lost {
        assert_eq!(event["reason"], "node_lost", "{event}");
        assert_eq!(event["transport"], "websocket");
    }
    // The first node's connections only: the new node's own are none of them.
    let nodes: Vec<&Value> = lost.iter().map(|e| &e["node"]).collect();
    assert!(nodes.iter().all(|n| *n == nodes[0]));
    assert_ne!(lost[0]["taken_over_by"], lost[0]["node"]);
}

#[tokio::test]
async fn a_node_killed_in_a_cluster_is_taken_over_by_the_other_after_the_expiry() {
    let (Some(store), Some(broker)) = (postgres_store(), redis_broker()) else {
        eprintln!("skipped: DUPLEX_TEST_POSTGRES and DUPLEX_TEST_REDIS are not both set");
        return;
    };
    let receiver = WebhookReceiver::start(None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), &receiver, "2s");
    let (data_a, data_b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let args = |node: &'static str| {
        vec![
            "--config".to_owned(),
            config.clone(),
            "--store".to_owned(),
            store.clone(),
            "--broker".to_owned(),
            broker.clone(),
            "--node-id".to_owned(),
            node.to_owned(),
        ]
    };
    let args_a = args("node-a");
    let args_b = args("node-b");
    let (mut a, url_a) = common::spawn_serve(
        data_a.path(),
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let (_b, url_b) = common::spawn_serve(
        data_b.path(),
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let (on_a, ids_a) = open(&url_a, 3).await;
    let (on_b, ids_b) = open(&url_b, 1).await;
    connected(&receiver, &ids_a).await;
    connected(&receiver, &ids_b).await;

    let killed = std::time::Instant::now();
    a.kill().await.expect("SIGKILL");
    drop(on_a);
    let lost = disconnected(&receiver, &ids_a).await;
    let took = killed.elapsed();
    assert_eq!(lost.len(), 3, "exactly one each: {lost:#?}");
    for event in &lost {
        assert_eq!(event["reason"], "node_lost", "{event}");
        assert_eq!(event["node"], "node-a");
        assert_eq!(event["taken_over_by"], "node-b");
    }
    assert!(
        took >= Duration::from_secs(1),
        "not before the sign of life expired ({took:?})"
    );
    // node-b's own connection is untouched.
    assert!(
        receiver
            .of("disconnected")
            .iter()
            .all(|e| e["client"] != ids_b[0].as_str())
    );
    drop(on_b);
}
