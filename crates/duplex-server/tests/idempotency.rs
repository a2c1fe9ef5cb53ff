//! Idempotent publishing on one node: a retry with the same `Idempotency-Key` (HTTP) or
//! `idempotency_key` (socket `publish`) gets the first publication's answer and publishes
//! nothing; the same key with other data is refused; malformed keys are refused. The brokers'
//! cases are in `cluster.rs`.

use duplex_testkit::{TestServer, WsClient};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn publish(
    server: &TestServer,
    channel: &str,
    key: Option<&str>,
    data: Value,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(server.url(&format!("/api/channels/{channel}/publish")))
        .json(&data);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.expect("publish")
}

/// `news` open to anonymous publishers, history in memory; `chat` keeps its history in the store.
async fn server() -> TestServer {
    TestServer::start_with(|c| {
        c.namespaces = duplex_testkit::namespaces("[news]\npublish = \"anyone\"\n");
    })
    .await
}

/// The next `message` frame's offset and data.
async fn next_message(client: &mut WsClient) -> (u64, Value) {
    loop {
        let frame = client.next_json().await;
        if frame["type"] == "message" {
            return (
                frame["offset"].as_u64().expect("offset"),
                frame["data"].clone(),
            );
        }
    }
}

/// In a namespace with history in memory (`news`) and one with history in the store (`chat`).
#[tokio::test]
async fn a_retried_publish_with_its_key_is_answered_once_and_published_once() {
    let server = server().await;
    for channel in ["news:once", "chat:once"] {
        let mut subscriber = server.ws().await;
        subscriber.subscribe(channel, 1).await;

        let first = publish(&server, channel, Some("k-1"), json!({"n": 1})).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert!(first.headers().get("idempotent-replayed").is_none());
        let first: Value = first.json().await.expect("json");
        assert_eq!(first["offset"], 1, "{first}");
        assert!(first.get("replayed").is_none(), "{first}");

        let retry = publish(&server, channel, Some("k-1"), json!({"n": 1})).await;
        assert_eq!(retry.status(), StatusCode::OK);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        let retry: Value = retry.json().await.expect("json");
        assert_eq!(
            (&retry["offset"], &retry["epoch"]),
            (&first["offset"], &first["epoch"])
        );
        assert_eq!(retry["replayed"], true);

        // The same key for other data names another publication: refused, nothing published.
        let reused = publish(&server, channel, Some("k-1"), json!({"n": 2})).await;
        assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let problem: Value = reused.json().await.expect("problem");
        assert_eq!(problem["code"], "idempotency_key_reused");

        // Over a socket, with the same key: the same answer, shared with HTTP.
        let mut publisher = server.ws().await;
        let reply = publisher
            .request(
                json!({"type": "publish", "channel": channel, "data": {"n": 1}, "idempotency_key": "k-1"}),
                7,
            )
            .await;
        assert_eq!(reply["result"]["offset"], 1, "{reply}");
        assert_eq!(reply["result"]["replayed"], true, "{reply}");
        let reply = publisher
            .request(
                json!({"type": "publish", "channel": channel, "data": {"n": 3}, "idempotency_key": "k-3"}),
                8,
            )
            .await;
        assert_eq!(reply["result"]["offset"], 2, "{reply}");
        assert!(reply["result"].get("replayed").is_none(), "{reply}");
        let reply = publisher
            .request(
                json!({"type": "publish", "channel": channel, "data": {"n": 3}, "idempotency_key": "k-3"}),
                9,
            )
            .await;
        assert_eq!(
            (&reply["result"]["offset"], &reply["result"]["replayed"]),
            (&json!(2), &json!(true))
        );
        // A key is per channel: the same one elsewhere is another publication.
        let other = publish(&server, "news:elsewhere", Some("k-1"), json!({"n": 9})).await;
        assert_eq!(other.status(), StatusCode::OK);

        // Without a key every publish publishes.
        let plain: Value = publish(&server, channel, None, json!({"n": 4}))
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(plain["offset"], 3);

        // The subscriber saw each publication once.
        for (offset, n) in [(1, 1), (2, 3), (3, 4)] {
            assert_eq!(
                next_message(&mut subscriber).await,
                (offset, json!({"n": n})),
                "{channel}"
            );
        }
    }
}

#[tokio::test]
async fn malformed_keys_are_refused_with_a_code() {
    let server = server().await;
    let long = "k".repeat(129);
    for key in ["with space", long.as_str()] {
        let response = publish(&server, "news:bad", Some(key), json!(1)).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{key}");
        let problem: Value = response.json().await.expect("problem");
        assert_eq!(problem["code"], "invalid_idempotency_key");
    }
    let response = reqwest::Client::new()
        .post(server.url("/api/channels/news:bad/publish"))
        .header(
            "Idempotency-Key",
            reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").expect("header"),
        )
        .json(&json!(1))
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let mut client = server.ws().await;
    for (id, key) in [(1, json!("")), (2, json!(long)), (3, json!("tab\t"))] {
        let reply = client
            .request(
                json!({"type": "publish", "channel": "news:bad", "data": 1, "idempotency_key": key}),
                id,
            )
            .await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "invalid_idempotency_key", "{reply}");
    }
    // Not a string: the frame itself is refused.
    client
        .send_json(json!({"type": "publish", "id": 4, "channel": "news:bad", "data": 1, "idempotency_key": 5}))
        .await;
    let refused = client.next_json().await;
    assert_eq!(refused["type"], "error", "{refused}");
    // Nothing was published by any of these.
    let history: Value = reqwest::get(server.url("/api/channels/news:bad/history"))
        .await
        .expect("history")
        .json()
        .await
        .expect("json");
    assert_eq!(history["offset"], 0, "{history}");
}

/// The Rust client's `publish_once`, over HTTP and over a socket.
#[tokio::test]
async fn the_rust_client_publishes_once_with_a_key() {
    let server = server().await;
    let http = duplex_client::Client::new(&server.url("")).expect("client");
    let first = http
        .publish_once("news:rust", &json!({"n": 1}), "rust-1")
        .await
        .expect("publish");
    let again = http
        .publish_once("news:rust", &json!({"n": 1}), "rust-1")
        .await
        .expect("retry");
    assert_eq!((first.offset, first.replayed), (1, false));
    assert_eq!(
        (again.offset, &again.epoch, again.replayed),
        (1, &first.epoch, true)
    );
    let refused = http
        .publish_once("news:rust", &json!({"n": 2}), "rust-1")
        .await
        .expect_err("other data");
    assert_eq!(refused.code(), Some("idempotency_key_reused"), "{refused}");

    let socket =
        duplex_client::Connection::connect(duplex_client::ConnectOptions::new(&server.ws_url()))
            .await
            .expect("connect");
    let over_socket = socket
        .publish_once("news:rust", &json!({"n": 1}), "rust-1")
        .await
        .expect("retry over the socket");
    assert_eq!((over_socket.offset, over_socket.replayed), (1, true));
    let new = socket
        .publish_once("news:rust", &json!({"n": 2}), "rust-2")
        .await
        .expect("publish");
    assert_eq!((new.offset, new.replayed), (2, false));
    socket.close().await;
}
