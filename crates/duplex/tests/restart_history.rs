//! Channel history kept in the store survives a restart of the server process, whether it
//! stopped on SIGTERM or died of `kill -9`: a client that reconnects with `since` from before
//! the restart gets exactly what it missed, `recovered: true`, in the same epoch. Namespaces
//! that keep history in memory start a new epoch, as before.

mod common;

use std::path::Path;

use duplex_testkit::WsClient;
use serde_json::{Value, json};
use tokio::process::Child;

const CONFIG: &str = r#"
[namespaces.chat]
history_size = 1000

[namespaces.small]
publish = "anyone"
history_storage = "store"
history_size = 10

[namespaces.brief]
publish = "anyone"
history_storage = "store"
history_ttl = "1s"

[namespaces.room]
publish = "anyone"
history_storage = "memory"
history_size = 1000
"#;

#[derive(Debug, Clone, Copy)]
enum Stop {
    Term,
    Kill,
}

async fn start(data: &Path) -> (Child, String) {
    start_on(data, None).await
}

/// Starts the server on `data`, with `store` (a PostgreSQL URL) when given.
async fn start_on(data: &Path, store: Option<&str>) -> (Child, String) {
    let config = data.join("duplex.toml");
    if !config.exists() {
        std::fs::write(&config, CONFIG).expect("config");
    }
    let config = config.to_str().expect("UTF-8 path").to_owned();
    let mut args = vec!["--config", &config];
    if let Some(store) = store {
        args.extend(["--store", store]);
    }
    common::spawn_serve(data, &args).await
}

async fn stop(mut child: Child, how: Stop) {
    match how {
        Stop::Kill => child.kill().await.expect("SIGKILL"),
        Stop::Term => common::terminate(&mut child).await,
    }
}

/// Publishes `data` on `channel` over HTTP; returns the offset and epoch it got.
async fn publish(http: &reqwest::Client, url: &str, channel: &str, data: Value) -> (u64, String) {
    let response = http
        .post(format!("{url}/api/channels/{channel}/publish"))
        .json(&data)
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let published: Value = response.json().await.expect("json");
    (
        published["offset"].as_u64().expect("offset"),
        published["epoch"].as_str().expect("epoch").to_owned(),
    )
}

/// Subscribes `since` a position, as a client that reconnects does; returns the reply.
async fn resubscribe(
    client: &mut WsClient,
    channel: &str,
    offset: u64,
    epoch: &str,
    id: u64,
) -> Value {
    client
        .request(
            json!({"type": "subscribe", "channel": channel, "since": {"offset": offset, "epoch": epoch}}),
            id,
        )
        .await
}

/// GETs `url` and reads its JSON.
async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json")
}

fn ws_url(url: &str) -> String {
    format!("{}/ws", url.replacen("http://", "ws://", 1))
}

/// Reads publications until `last`, returning their offsets and `i` values.
async fn read_until(client: &mut WsClient, last: u64) -> Vec<(u64, u64)> {
    let mut seen = Vec::new();
    while seen.last().is_none_or(|(offset, _)| *offset < last) {
        let message = client.next_json().await;
        if message["type"] != "message" {
            continue;
        }
        seen.push((
            message["offset"].as_u64().expect("offset"),
            message["data"]["i"].as_u64().expect("i"),
        ));
    }
    seen
}

async fn recovers_across_a_restart(how: Stop) {
    let data = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();
    let (child, url) = start(data.path()).await;

    let mut subscriber = WsClient::connect(&ws_url(&url)).await;
    let reply = subscriber.subscribe("chat:x", 1).await;
    let epoch = reply["result"]["epoch"].as_str().expect("epoch").to_owned();
    for i in 1..=500 {
        let (offset, published_in) = publish(&http, &url, "chat:x", json!({ "i": i })).await;
        assert_eq!((offset, published_in.as_str()), (i, epoch.as_str()));
    }
    // The subscriber has seen 300 when its connection goes.
    let seen = read_until(&mut subscriber, 300).await;
    assert_eq!(seen, (1..=300).map(|i| (i, i)).collect::<Vec<_>>());
    drop(subscriber);
    // A memory channel beside it, to see that it does not survive.
    let (_, room_epoch) = publish(&http, &url, "room:x", json!({ "i": 1 })).await;

    stop(child, how).await;
    let (child, url) = start(data.path()).await;

    for i in 501..=600 {
        let (offset, published_in) = publish(&http, &url, "chat:x", json!({ "i": i })).await;
        assert_eq!(
            (offset, published_in.as_str()),
            (i, epoch.as_str()),
            "the channel goes on from its last offset in the same epoch"
        );
    }
    let mut subscriber = WsClient::connect(&ws_url(&url)).await;
    let reply = resubscribe(&mut subscriber, "chat:x", 300, &epoch, 1).await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
    assert_eq!(reply["result"]["missed"], 300, "{reply}");
    assert_eq!(reply["result"]["epoch"], epoch.as_str());
    let recovered = read_until(&mut subscriber, 600).await;
    assert_eq!(
        recovered,
        (301..=600).map(|i| (i, i)).collect::<Vec<_>>(),
        "exactly what it missed, once each, in order"
    );
    // Live publications follow, without a gap.
    publish(&http, &url, "chat:x", json!({ "i": 601 })).await;
    assert_eq!(read_until(&mut subscriber, 601).await, vec![(601, 601)]);

    // History in memory started again.
    let reply = resubscribe(&mut subscriber, "room:x", 1, &room_epoch, 2).await;
    assert_eq!(reply["result"]["recovered"], false, "{reply}");
    assert_eq!(reply["result"]["reason"], "epoch_changed", "{reply}");
    stop(child, Stop::Kill).await;
}

#[tokio::test]
async fn a_subscriber_recovers_across_sigterm() {
    recovers_across_a_restart(Stop::Term).await;
}

#[tokio::test]
async fn a_subscriber_recovers_across_kill_9() {
    recovers_across_a_restart(Stop::Kill).await;
}

/// Size bounds hold across a restart: only the last ten are kept, and a client that missed
/// more is told so.
#[tokio::test]
async fn retention_holds_after_a_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();
    let (child, url) = start(data.path()).await;
    let mut epoch = String::new();
    for i in 1..=30 {
        epoch = publish(&http, &url, "small:x", json!({ "i": i })).await.1;
    }
    stop(child, Stop::Kill).await;
    let (child, url) = start(data.path()).await;
    let history: Value = get_json(
        &http,
        &format!("{url}/api/channels/small:x/history?limit=100"),
    )
    .await;
    let offsets: Vec<u64> = history["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["offset"].as_u64().expect("offset"))
        .collect();
    assert_eq!(offsets, (21..=30).collect::<Vec<_>>(), "{history}");
    assert_eq!(history["offset"], 30);
    assert_eq!(history["epoch"], epoch.as_str());

    let mut client = WsClient::connect(&ws_url(&url)).await;
    let trimmed = resubscribe(&mut client, "small:x", 5, &epoch, 1).await;
    assert_eq!(trimmed["result"]["recovered"], false, "{trimmed}");
    assert_eq!(trimmed["result"]["reason"], "history_trimmed", "{trimmed}");
    let mut client = WsClient::connect(&ws_url(&url)).await;
    let kept = resubscribe(&mut client, "small:x", 20, &epoch, 1).await;
    assert_eq!(kept["result"]["recovered"], true, "{kept}");
    assert_eq!(
        read_until(&mut client, 30).await,
        (21..=30).map(|i| (i, i)).collect::<Vec<_>>()
    );
    stop(child, Stop::Kill).await;
}

/// Time bounds hold across a restart too: once a publication's TTL passed, it is gone from
/// history, and a client that missed it is told so; the channel's offset and epoch stay.
#[tokio::test]
async fn expiry_holds_after_a_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();
    let (child, url) = start(data.path()).await;
    let mut epoch = String::new();
    for i in 1..=3 {
        epoch = publish(&http, &url, "brief:x", json!({ "i": i })).await.1;
    }
    stop(child, Stop::Kill).await;
    let (child, url) = start(data.path()).await;
    let history_url = format!("{url}/api/channels/brief:x/history");
    let history: Value = duplex_testkit::wait_for("the history to expire", || async {
        let history: Value = get_json(&http, &history_url).await;
        history["publications"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(history)
    })
    .await;
    assert_eq!(history["offset"], 3, "{history}");
    assert_eq!(history["epoch"], epoch.as_str(), "{history}");
    let mut client = WsClient::connect(&ws_url(&url)).await;
    let expired = resubscribe(&mut client, "brief:x", 1, &epoch, 1).await;
    assert_eq!(expired["result"]["recovered"], false, "{expired}");
    assert_eq!(expired["result"]["reason"], "history_trimmed", "{expired}");
    let (offset, same) = publish(&http, &url, "brief:x", json!({ "i": 4 })).await;
    assert_eq!((offset, same), (4, epoch));
    stop(child, Stop::Kill).await;
}

/// Record events are appended to `records:{collection}` in the write's own transaction: after
/// `kill -9` in the middle of concurrent writes, every record has its `created` event in
/// history and every event its record, every acknowledged write among them, in one epoch that
/// goes on; a subscriber that saw some recovers the rest after the restart.
#[tokio::test]
async fn record_events_and_their_records_survive_kill_9_together() {
    let data = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();
    let (child, url) = start(data.path()).await;
    let mut subscriber = WsClient::connect(&ws_url(&url)).await;
    let reply = subscriber.subscribe("records:journal", 1).await;
    let epoch = reply["result"]["epoch"].as_str().expect("epoch").to_owned();

    // Four writers create records until the server dies under them.
    let mut writers = Vec::new();
    for writer in 0..4 {
        let (http, url) = (http.clone(), url.clone());
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0.. {
                let Ok(response) = http
                    .post(format!("{url}/api/collections/journal/records"))
                    .json(&json!({"writer": writer, "i": i}))
                    .send()
                    .await
                else {
                    break;
                };
                let Ok(record) = response.json::<Value>().await else {
                    break;
                };
                ids.push(record["id"].as_str().expect("id").to_owned());
            }
            ids
        }));
    }
    // The subscriber has seen the first 40 events; the server dies while writes go on.
    let mut seen = 0;
    while seen < 40 {
        let message = subscriber.next_json().await;
        if message["type"] == "message" {
            seen += 1;
            assert_eq!(message["offset"], seen);
            assert_eq!(message["data"]["op"], "created");
        }
    }
    drop(subscriber);
    stop(child, Stop::Kill).await;
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer"));
    }
    // Some writes were answered before the kill (a write is answered after its event went
    // out, so the subscriber may have seen a few more than their writers heard of).
    assert!(!acknowledged.is_empty());

    let (child, url) = start(data.path()).await;
    let mut stored: Vec<String> = Vec::new();
    let mut next = format!("{url}/api/collections/journal/records?limit=100");
    loop {
        let page: Value = get_json(&http, &next).await;
        for item in page["items"].as_array().expect("items") {
            stored.push(item["id"].as_str().expect("id").to_owned());
        }
        match page["next"].as_str() {
            Some(cursor) => {
                next = format!("{url}/api/collections/journal/records?limit=100&cursor={cursor}");
            }
            None => break,
        }
    }
    for id in &acknowledged {
        assert!(stored.contains(id), "acknowledged record {id} lost");
    }
    let created: Value = http
        .post(format!("{url}/api/collections/journal/records"))
        .json(&json!({"after": true}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    stored.push(created["id"].as_str().expect("id").to_owned());
    assert!(stored.len() > 40, "the 40 events seen have their records");

    let mut subscriber = WsClient::connect(&ws_url(&url)).await;
    let reply = resubscribe(&mut subscriber, "records:journal", 40, &epoch, 1).await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
    assert_eq!(reply["result"]["epoch"], epoch.as_str());
    assert_eq!(
        reply["result"]["offset"],
        stored.len(),
        "one event per record: {reply}"
    );
    let mut logged = Vec::new();
    while logged.len() < stored.len() - 40 {
        let message = subscriber.next_json().await;
        if message["type"] == "message" {
            assert_eq!(message["offset"], 41 + logged.len() as u64, "{message}");
            logged.push(
                message["data"]["record"]["id"]
                    .as_str()
                    .expect("id")
                    .to_owned(),
            );
        }
    }
    assert_eq!(
        logged.last(),
        created["id"].as_str().map(str::to_owned).as_ref()
    );
    // Every record has its event, every event its record.
    let history: Value = get_json(
        &http,
        &format!("{url}/api/channels/records:journal/history?limit=1000"),
    )
    .await;
    let mut logged: Vec<String> = history["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["data"]["record"]["id"].as_str().expect("id").to_owned())
        .collect();
    logged.sort();
    stored.sort();
    assert_eq!(logged, stored);
    stop(child, Stop::Kill).await;
}

/// On PostgreSQL (one node, no broker) chat history survives `kill -9` the same way; record
/// events, which PostgreSQL cannot append in their write's transaction, keep their history in
/// memory, and say so after a restart (`epoch_changed`) rather than risk a silent gap.
#[tokio::test]
async fn on_postgres_chat_recovers_across_kill_9_and_record_events_say_they_restarted() {
    let Some(store) = duplex_testkit::postgres_store() else {
        eprintln!("skipped: set DUPLEX_TEST_POSTGRES (postgres://…) to run");
        return;
    };
    let data = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();
    let (child, url) = start_on(data.path(), Some(&store)).await;

    let mut subscriber = WsClient::connect(&ws_url(&url)).await;
    let reply = subscriber.subscribe("chat:pg", 1).await;
    let epoch = reply["result"]["epoch"].as_str().expect("epoch").to_owned();
    let records = subscriber.subscribe("records:pgnotes", 2).await;
    let records_epoch = records["result"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    for i in 1..=50 {
        let (offset, published_in) = publish(&http, &url, "chat:pg", json!({ "i": i })).await;
        assert_eq!((offset, published_in.as_str()), (i, epoch.as_str()));
    }
    assert_eq!(
        read_until(&mut subscriber, 30).await,
        (1..=30).map(|i| (i, i)).collect::<Vec<_>>()
    );
    let created = http
        .post(format!("{url}/api/collections/pgnotes/records"))
        .json(&json!({"title": "before"}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), reqwest::StatusCode::CREATED);
    drop(subscriber);
    stop(child, Stop::Kill).await;

    let (child, url) = start_on(data.path(), Some(&store)).await;
    for i in 51..=60 {
        let (offset, published_in) = publish(&http, &url, "chat:pg", json!({ "i": i })).await;
        assert_eq!((offset, published_in.as_str()), (i, epoch.as_str()));
    }
    let mut subscriber = WsClient::connect(&ws_url(&url)).await;
    let reply = resubscribe(&mut subscriber, "chat:pg", 30, &epoch, 1).await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
    assert_eq!(reply["result"]["missed"], 30, "{reply}");
    assert_eq!(
        read_until(&mut subscriber, 60).await,
        (31..=60).map(|i| (i, i)).collect::<Vec<_>>()
    );
    let records = resubscribe(&mut subscriber, "records:pgnotes", 1, &records_epoch, 2).await;
    assert_eq!(records["result"]["recovered"], false, "{records}");
    assert_eq!(records["result"]["reason"], "epoch_changed", "{records}");
    stop(child, Stop::Kill).await;
}

/// `POST` with an `Idempotency-Key`: the status and the body.
async fn publish_keyed(
    http: &reqwest::Client,
    url: &str,
    channel: &str,
    key: &str,
    data: Value,
) -> (reqwest::StatusCode, Value) {
    let response = http
        .post(format!("{url}/api/channels/{channel}/publish"))
        .header("Idempotency-Key", key)
        .json(&data)
        .send()
        .await
        .expect("publish");
    let status = response.status();
    (status, response.json().await.expect("json"))
}

/// A publication whose answer was lost to a crash is retried after the restart with its key:
/// the store kept the key with the publication, so the retry is answered with it
/// (`replayed`), nothing is published twice, and other data under the key is refused.
async fn a_keyed_retry_after_a_restart_publishes_nothing(store: Option<&str>) {
    let data = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();
    let (child, url) = start_on(data.path(), store).await;
    let (status, first) = publish_keyed(&http, &url, "small:once", "lost-answer", json!(1)).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{first}");
    assert_eq!(first["offset"], 1);
    stop(child, Stop::Kill).await;

    let (child, url) = start_on(data.path(), store).await;
    let (status, retry) = publish_keyed(&http, &url, "small:once", "lost-answer", json!(1)).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{retry}");
    assert_eq!(
        (&retry["offset"], &retry["epoch"], &retry["replayed"]),
        (&first["offset"], &first["epoch"], &json!(true))
    );
    let (status, reused) = publish_keyed(&http, &url, "small:once", "lost-answer", json!(2)).await;
    assert_eq!(
        status,
        reqwest::StatusCode::UNPROCESSABLE_ENTITY,
        "{reused}"
    );
    assert_eq!(reused["code"], "idempotency_key_reused");
    assert_eq!(publish(&http, &url, "small:once", json!(3)).await.0, 2);
    let history: Value = get_json(
        &http,
        &format!("{url}/api/channels/small:once/history?limit=10"),
    )
    .await;
    assert_eq!(
        history["publications"].as_array().map(Vec::len),
        Some(2),
        "{history}"
    );
    stop(child, Stop::Kill).await;
}

#[tokio::test]
async fn a_keyed_retry_after_a_restart_publishes_nothing_on_sqlite() {
    a_keyed_retry_after_a_restart_publishes_nothing(None).await;
}

#[tokio::test]
async fn a_keyed_retry_after_a_restart_publishes_nothing_on_postgres() {
    let Some(store) = duplex_testkit::postgres_store() else {
        eprintln!("skipped: set DUPLEX_TEST_POSTGRES (postgres://…) to run");
        return;
    };
    a_keyed_retry_after_a_restart_publishes_nothing(Some(&store)).await;
}
