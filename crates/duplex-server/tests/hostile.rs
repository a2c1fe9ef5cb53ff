//! Hostile clients against a real server: what the server holds for them is bounded in bytes
//! per connection and in total, channels are capped, and tokens mean exactly what they say.

use std::time::Duration;

use duplex_testkit::{TestServer, WsClient, hs256_token, wait_for};
use reqwest::StatusCode;
use serde_json::{Value, json};

const KIB: usize = 1024;
const SECRET: &str = "a-test-secret-for-hostile-clients";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn token(claims: Value) -> String {
    hs256_token(SECRET, &claims)
}

/// Publishes `count` JSON publications of about `bytes` each on `channel`, pipelined, and
/// waits for every reply.
async fn publish_padded(publisher: &mut WsClient, channel: &str, count: u64, bytes: usize) {
    let pad = "x".repeat(bytes);
    for i in 0..count {
        publisher
            .send_json(json!({"id": i + 1, "type": "publish", "channel": channel, "data": {"i": i, "pad": pad}}))
            .await;
    }
    for _ in 0..count {
        let reply = publisher.next_json().await;
        assert_eq!(reply["type"], "reply", "{reply}");
    }
}

/// The connection `client` as `GET /api/connections` lists it.
async fn listed_connection(server: &TestServer, client: &str) -> Value {
    let page: Value = reqwest::get(server.url("/api/connections?limit=1000"))
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|c| c["client"] == client)
        .cloned()
        .expect("the connection is listed")
}

#[tokio::test]
async fn a_subscriber_that_never_reads_holds_at_most_queue_bytes() {
    let server = TestServer::start_with(|c| {
        c.sockets.queue_bytes = 256 * KIB;
        c.sockets.max_frame = 1 << 20;
    })
    .await;
    // Subscribes, then never reads again: the kernel's buffers fill, then its queue.
    let mut stalled = server.tcp().await;
    stalled.subscribe("stream:s1", 1).await;
    let client = stalled.connected["client"].as_str().expect("id").to_owned();
    let mut publisher = server.ws().await;
    // 600 × 16 KiB: far more than the socket buffers and the queue hold, well within the
    // queue's 1,024 publications (the count alone let this grow to 16 MB).
    publish_padded(&mut publisher, "stream:s1", 600, 16 * KIB).await;

    let listed = listed_connection(&server, &client).await;
    let queued = listed["queued_bytes"].as_u64().expect("queued_bytes") as usize;
    assert!(queued <= 256 * KIB + 17 * KIB, "queued {queued}");
    assert!(server.metric("duplex_dropped_total").await > 0.0);
    // The whole server: that queue plus the batch its writer is stuck on.
    let held = server.metric("duplex_queued_bytes").await as usize;
    assert!(held <= 512 * KIB, "held {held}");
    // The publisher is unharmed.
    publisher.send_json(json!({"type": "ping", "id": 9})).await;
    assert_eq!(publisher.next_json().await["type"], "pong");
    drop(stalled);
}

#[tokio::test]
async fn when_the_queue_budget_is_over_the_fullest_queues_pay_and_a_fast_one_misses_nothing() {
    let server = TestServer::start_with(|c| {
        c.sockets.queue_bytes = 4 * 1024 * KIB;
        c.sockets.queue_size = 100_000;
        c.sockets.max_frame = 1 << 20;
        c.hub.max_queued_bytes = 1024 * KIB;
    })
    .await;
    let mut stalled = Vec::new();
    for i in 0..4 {
        let mut client = server.tcp().await;
        client.subscribe(&format!("stream:slow-{i}"), 1).await;
        stalled.push(client);
    }
    let mut fast = server.ws().await;
    fast.subscribe("stream:fast", 1).await;
    let rounds = 200u64;
    let reader = tokio::spawn(async move {
        let mut offsets = Vec::new();
        while offsets.len() < rounds as usize {
            let frame = fast.next_json().await;
            if frame["type"] == "message" {
                offsets.push(frame["offset"].as_u64().expect("offset"));
            }
        }
        offsets
    });
    let mut publisher = server.ws().await;
    // 6.4 MB per slow subscriber: more than the kernel's socket buffers take.
    let pad = "x".repeat(32 * KIB);
    let mut id = 0;
    for round in 0..rounds {
        for i in 0..4 {
            id += 1;
            publisher
                .send_json(json!({"id": id, "type": "publish", "channel": format!("stream:slow-{i}"), "data": {"pad": pad}}))
                .await;
        }
        id += 1;
        publisher
            .send_json(json!({"id": id, "type": "publish", "channel": "stream:fast", "data": {"round": round}}))
            .await;
    }
    for _ in 0..id {
        assert_eq!(publisher.next_json().await["type"], "reply");
    }
    let offsets = tokio::time::timeout(duplex_testkit::EVENT_TIMEOUT, reader)
        .await
        .expect("the fast subscriber gets every publication")
        .expect("no panic");
    assert_eq!(offsets, (1..=rounds).collect::<Vec<_>>(), "nothing missed");
    // Without the budget the four slow queues would hold about 20 MB: the fullest shed (as
    // they grow, or by the enforcer).
    assert!(server.metric("duplex_dropped_total").await > 0.0);
    wait_for("the queue budget to be kept", || async {
        (server.metric("duplex_queued_bytes").await as usize <= 1024 * KIB).then_some(())
    })
    .await;
    drop(stalled);
}

#[tokio::test]
async fn history_is_bounded_per_channel_in_bytes_and_in_total_oldest_first() {
    let server = TestServer::start_with(|c| {
        c.namespaces = duplex_testkit::namespaces(
            "[hist]\npublish = \"anyone\"\nhistory_size = 1000\nhistory_bytes = \"64KiB\"\nhistory_ttl = \"1h\"",
        );
        c.hub.max_history_bytes = 512 * KIB;
        c.sockets.max_frame = 1 << 20;
    })
    .await;
    let mut publisher = server.ws().await;
    let history = |channel: &str, query: &str| {
        let url = server.url(&format!("/api/channels/{channel}/history?{query}"));
        async move {
            reqwest::get(url)
                .await
                .expect("request")
                .json::<Value>()
                .await
                .expect("json")
        }
    };

    // One channel: 20 × 8 KiB against 64 KiB, the newest kept.
    publish_padded(&mut publisher, "hist:one", 20, 8 * KIB).await;
    let page = history("hist:one", "limit=1000").await;
    let kept: Vec<u64> = page["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["offset"].as_u64().expect("offset"))
        .collect();
    assert!(!kept.is_empty() && kept.len() <= 7, "{kept:?}");
    assert_eq!(kept.last(), Some(&20));
    let page = history("hist:one", "since=0").await;
    assert_eq!(page["recovered"], false);
    assert_eq!(page["reason"], "history_trimmed");

    // Many channels: 20 more of 48 KiB each against 512 KiB in total; the oldest goes first.
    for i in 0..20 {
        publish_padded(&mut publisher, &format!("hist:n{i:02}"), 6, 8 * KIB).await;
    }
    wait_for("the history budget to be kept", || async {
        (server.metric("duplex_history_bytes").await as usize <= 512 * KIB).then_some(())
    })
    .await;
    assert!(server.metric("duplex_history_evictions_total").await > 0.0);
    let oldest = history("hist:one", "limit=1000").await;
    assert_eq!(
        oldest["publications"].as_array().map(Vec::len),
        Some(0),
        "the oldest history went first"
    );
    let newest = history("hist:n19", "since=0").await;
    assert_eq!(newest["recovered"], true, "{}", newest["reason"]);
    assert_eq!(newest["publications"].as_array().map(Vec::len), Some(6));
}

#[tokio::test]
async fn channels_are_capped_and_channels_nobody_uses_are_not_kept() {
    let server = TestServer::start_with(|c| c.hub.max_channels = 3).await;
    let http = reqwest::Client::new();
    // Publications to nobody in a namespace without history make no channel.
    for i in 0..10 {
        let response = http
            .post(server.url(&format!("/api/channels/stream:nobody-{i}/publish")))
            .json(&json!({"i": i}))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(server.metric("duplex_channels").await, 0.0);

    let mut client = server.ws().await;
    for (id, channel) in ["chat:a", "chat:b", "chat:c"].iter().enumerate() {
        let reply = client.subscribe(channel, id as u64 + 1).await;
        assert_eq!(reply["type"], "reply", "{reply}");
    }
    let refused = client
        .request(json!({"type": "subscribe", "channel": "chat:d"}), 10)
        .await;
    assert_eq!(refused["code"], "too_many_channels", "{refused}");
    let response = http
        .post(server.url("/api/channels/news:z/publish"))
        .json(&json!({"x": 1}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let problem: Value = response.json().await.expect("json");
    assert_eq!(problem["code"], "too_many_channels");
    assert!(server.metric("duplex_channel_refusals_total").await >= 2.0);

    // A channel given up makes room.
    let reply = client
        .request(json!({"type": "unsubscribe", "channel": "chat:a"}), 11)
        .await;
    assert_eq!(reply["type"], "reply");
    let reply = client.subscribe("chat:d", 12).await;
    assert_eq!(reply["type"], "reply", "{reply}");
}

#[tokio::test]
async fn the_channel_list_is_paginated_and_searchable() {
    let server = TestServer::start().await;
    let mut client = server.ws().await;
    for i in 0..5 {
        client.subscribe(&format!("chat:room-{i}"), i + 1).await;
    }
    client.subscribe("news:other", 9).await;
    let get = |query: &str| {
        let url = server.url(&format!("/api/channels?{query}"));
        async move { reqwest::get(url).await.expect("request") }
    };
    let page: Value = get("limit=2").await.json().await.expect("json");
    let names: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|c| c["channel"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["chat:room-0", "chat:room-1"]);
    assert_eq!(page["next"], "chat:room-1");
    let rest: Value = get("limit=10&cursor=chat:room-1")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(rest["items"].as_array().map(Vec::len), Some(4));
    assert!(rest["next"].is_null());
    let found: Value = get("search=other").await.json().await.expect("json");
    assert_eq!(found["items"][0]["channel"], "news:other");
    assert_eq!(found["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(get("limit=0").await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        get("cursor=nonsense").await.status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn tokens_not_valid_yet_or_without_a_user_are_refused_everywhere() {
    let server = TestServer::start_with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let tomorrow = token(json!({
        "sub": "mallory", "exp": now() + 172_800, "nbf": now() + 86_400,
        "channels": ["private:*"],
    }));
    let mut client = server.ws().await;
    let error = client
        .request(json!({"type": "connect", "token": tomorrow}), 1)
        .await;
    assert_eq!(error["code"], "token_not_yet_valid", "{error}");
    // Refused, so it grants nothing.
    let refused = client
        .request(json!({"type": "subscribe", "channel": "private:x"}), 2)
        .await;
    assert_eq!(refused["code"], "permission_denied");

    let http = reqwest::Client::new();
    let check = |response: reqwest::Response| async move {
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let problem: Value = response.json().await.expect("json");
        assert_eq!(problem["code"], "token_not_yet_valid", "{problem}");
        assert!(
            !problem["detail"]
                .as_str()
                .expect("detail")
                .contains("ImmatureSignature"),
            "our words, not the library's"
        );
    };
    check(
        http.get(server.url(&format!("/ws?token={tomorrow}")))
            .send()
            .await
            .expect("request"),
    )
    .await;
    check(
        http.get(server.url("/api/collections/posts/records"))
            .bearer_auth(&tomorrow)
            .send()
            .await
            .expect("request"),
    )
    .await;
    check(
        http.get(server.url(&format!("/api/channels/private:x/poll?token={tomorrow}")))
            .send()
            .await
            .expect("request"),
    )
    .await;

    let nobody = token(json!({"sub": "", "exp": now() + 3600}));
    let error = client
        .request(json!({"type": "connect", "token": nobody}), 3)
        .await;
    assert_eq!(error["code"], "invalid_token");
    assert_eq!(error["message"], "the token is not valid: its sub is empty");
}

#[tokio::test]
async fn a_connection_connects_once_and_a_refused_connect_keeps_nothing() {
    let server = TestServer::start_with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let ana = token(json!({"sub": "ana", "exp": now() + 3600}));
    let bo = token(json!({"sub": "bo", "exp": now() + 3600}));

    let mut client = server.ws().await;
    let refused = client
        .request(
            json!({"type": "connect", "token": "forged", "meta": {"name": "x"}}),
            1,
        )
        .await;
    assert_eq!(refused["code"], "invalid_token");
    let reply = client
        .request(json!({"type": "connect", "token": ana}), 2)
        .await;
    assert_eq!(reply["result"]["user"], "ana", "{reply}");
    for (id, frame) in [
        (3, json!({"type": "connect", "token": bo})),
        (4, json!({"type": "connect"})),
    ] {
        let error = client.request(frame, id).await;
        assert_eq!(error["code"], "already_connected", "{error}");
    }
    let listed = listed_connection(&server, client.connected["client"].as_str().expect("id")).await;
    assert_eq!(listed["user"], "ana");

    // A token at the upgrade is the connection's connect.
    let mut upgraded = WsClient::connect(&format!("{}?token={ana}", server.ws_url())).await;
    let error = upgraded
        .request(json!({"type": "connect", "token": bo}), 1)
        .await;
    assert_eq!(error["code"], "already_connected");

    // An anonymous connection has no token to refresh: it connects instead.
    let mut anonymous = server.ws().await;
    let error = anonymous
        .request(json!({"type": "refresh", "token": ana}), 1)
        .await;
    assert_eq!(error["code"], "bad_request", "{error}");
    let listed =
        listed_connection(&server, anonymous.connected["client"].as_str().expect("id")).await;
    assert!(listed["user"].is_null(), "refresh did not connect it");
}

#[tokio::test]
async fn a_refresh_that_narrows_the_token_ends_what_it_no_longer_allows() {
    let server = TestServer::start_with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let both =
        token(json!({"sub": "ana", "exp": now() + 3600, "channels": ["private:a", "private:b"]}));
    let narrow = token(json!({"sub": "ana", "exp": now() + 3600, "channels": ["private:a"]}));
    let mut client = server.ws().await;
    client
        .request(json!({"type": "connect", "token": both}), 1)
        .await;
    for (id, channel) in [(2, "private:a"), (3, "private:b")] {
        let reply = client.subscribe(channel, id).await;
        assert_eq!(reply["type"], "reply", "{reply}");
    }
    let reply = client
        .request(json!({"type": "refresh", "token": narrow}), 4)
        .await;
    assert_eq!(reply["type"], "reply", "{reply}");
    let pushed = client.next_json().await;
    assert_eq!(
        pushed,
        json!({"type": "unsubscribed", "channel": "private:b", "code": "permission_denied"})
    );
    let http = reqwest::Client::new();
    for channel in ["private:b", "private:a"] {
        let response = http
            .post(server.url(&format!("/api/channels/{channel}/publish")))
            .json(&json!({"on": channel}))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK);
    }
    // Only private:a's publication arrives.
    let message = client.next_json().await;
    assert_eq!(message["channel"], "private:a", "{message}");
    let listed = listed_connection(&server, client.connected["client"].as_str().expect("id")).await;
    assert_eq!(listed["subscriptions"], json!(["private:a"]));

    // The Rust client ends the subscription's stream with the code, and does not resubscribe.
    let connection = duplex_client::Connection::connect(
        duplex_client::ConnectOptions::new(&server.ws_url()).token(&both),
    )
    .await
    .expect("connect");
    let mut kept = connection.subscribe("private:a").await.expect("subscribe");
    let mut ended = connection.subscribe("private:b").await.expect("subscribe");
    connection.refresh(&narrow).await.expect("refresh");
    let event = tokio::time::timeout(Duration::from_secs(10), ended.next())
        .await
        .expect("an event in time");
    match event {
        Some(duplex_client::Event::Ended { code }) => assert_eq!(code, "permission_denied"),
        other => panic!("expected Ended, got {other:?}"),
    }
    http.post(server.url("/api/channels/private:a/publish"))
        .json(&json!("still here"))
        .send()
        .await
        .expect("request");
    let event = tokio::time::timeout(Duration::from_secs(10), kept.next())
        .await
        .expect("an event in time");
    assert!(
        matches!(event, Some(duplex_client::Event::Message(_))),
        "{event:?}"
    );
}

#[tokio::test]
async fn null_data_is_refused_over_http_as_over_sockets() {
    let server = TestServer::start().await;
    let response = reqwest::Client::new()
        .post(server.url("/api/channels/chat:x/publish"))
        .header("content-type", "application/json")
        .body("null")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = response.json().await.expect("json");
    assert_eq!(problem["code"], "validation_failed");
    let mut client = server.ws().await;
    let error = client
        .request(
            json!({"type": "publish", "channel": "chat:x", "data": null}),
            1,
        )
        .await;
    assert_eq!(error["code"], "bad_request");
    let history: Value = reqwest::get(server.url("/api/channels/chat:x/history"))
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(history["offset"], 0, "nothing was published");
}

#[tokio::test]
async fn a_header_with_a_control_byte_is_refused_and_the_server_carries_on() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server = TestServer::start().await;
    let mut stream = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-evil: a\x01b\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(
        duplex_testkit::EVENT_TIMEOUT,
        stream.read_to_end(&mut response),
    )
    .await
    .expect("answered in time")
    .expect("read");
    // hyper refuses a malformed head itself, before any handler: a bare 400 (documented).
    assert!(
        response.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    let healthy = reqwest::get(server.url("/healthz")).await.expect("request");
    assert_eq!(healthy.status(), StatusCode::OK);
}
