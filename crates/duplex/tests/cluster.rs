//! A node killed with `kill -9` leaves the cluster: its clients drop out of presence (with a
//! `leave` to the others) and the node out of `/api/nodes` within the presence expiry. On Redis
//! and on NATS; each skips (with a note) without `DUPLEX_TEST_REDIS` / `DUPLEX_TEST_NATS`, which
//! CI sets.

mod common;

use std::time::Duration;

use duplex_testkit::{WsClient, nats_broker, redis_broker, wait_for};
use serde_json::{Value, json};
use tokio::process::Child;

/// Spawns `duplex serve` on port 0 in the cluster and returns it with its HTTP address.
async fn spawn_node(broker: &str, id: &str, data: &std::path::Path) -> (Child, String) {
    let args = ["--broker", broker, "--node-id", id, "--presence-ttl", "2s"];
    common::spawn_serve(data, &args).await
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url)
        .await
        .expect("GET")
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn a_killed_node_leaves_presence_and_the_registry_on_redis() {
    match redis_broker() {
        Some(broker) => a_killed_node_leaves_presence_and_the_registry(&broker).await,
        None => eprintln!("skipped: set DUPLEX_TEST_REDIS (redis://127.0.0.1:6379) to run"),
    }
}

#[tokio::test]
async fn a_killed_node_leaves_presence_and_the_registry_on_nats() {
    match nats_broker() {
        Some(broker) => a_killed_node_leaves_presence_and_the_registry(&broker).await,
        None => eprintln!("skipped: set DUPLEX_TEST_NATS (nats://127.0.0.1:4222) to run"),
    }
}

async fn a_killed_node_leaves_presence_and_the_registry(broker: &str) {
    let data_a = tempfile::tempdir().expect("tempdir");
    let data_b = tempfile::tempdir().expect("tempdir");
    let (_a, url_a) = spawn_node(broker, "node-a", data_a.path()).await;
    let (mut b, url_b) = spawn_node(broker, "node-b", data_b.path()).await;
    let ws = |url: &str| format!("{}/ws", url.replacen("http://", "ws://", 1));

    let mut alice = WsClient::connect(&ws(&url_a)).await;
    alice.subscribe("chat:room", 1).await;
    let mut bob = WsClient::connect(&ws(&url_b)).await;
    bob.request(
        json!({"id": 1, "type": "connect", "meta": {"name": "bob"}}),
        1,
    )
    .await;
    bob.subscribe("chat:room", 2).await;
    let bob_id = bob.connected["client"].as_str().expect("id").to_owned();
    let join = alice.next_json().await;
    assert_eq!(join["type"], "join");
    assert_eq!(join["client"], bob_id.as_str());
    let presence = get_json(&format!("{url_a}/api/channels/chat:room/presence")).await;
    assert_eq!(presence["clients"].as_array().map(Vec::len), Some(2));
    wait_for("both nodes registered", || async {
        let nodes = get_json(&format!("{url_a}/api/nodes")).await;
        (nodes["items"].as_array().map(Vec::len) == Some(2)).then_some(())
    })
    .await;

    // kill -9: B says nothing to anyone.
    b.kill().await.expect("kill -9");
    let started = std::time::Instant::now();
    let leave = loop {
        let frame = alice.next_json().await;
        if frame["type"] == "leave" {
            break frame;
        }
    };
    assert_eq!(leave["client"], bob_id.as_str());
    // The expiry is 2 s and live nodes sweep every third of it: the leave is due within about
    // 2.7 s; the bound leaves room for two busy shared cores, and still tells an expiry from a
    // leave that never came on its own (`next_json` would have timed out).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "left after {:?}",
        started.elapsed()
    );
    let presence = get_json(&format!("{url_a}/api/channels/chat:room/presence")).await;
    let clients = presence["clients"].as_array().expect("clients");
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0]["client"], alice.connected["client"]);
    wait_for("B out of the registry", || async {
        let nodes = get_json(&format!("{url_a}/api/nodes")).await;
        let ids: Vec<&str> = nodes["items"]
            .as_array()?
            .iter()
            .filter_map(|n| n["id"].as_str())
            .collect();
        (ids == ["node-a"]).then_some(())
    })
    .await;
}
