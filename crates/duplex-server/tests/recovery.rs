//! History and gapless recovery against a real server.

use duplex_server::hub::namespace::Namespaces;
use duplex_testkit::{TestServer, WsClient};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn namespaces(history_size: usize) -> Namespaces {
    duplex_testkit::namespaces(&format!(
        "[feed]\npublish = \"anyone\"\nhistory_size = {history_size}\nhistory_ttl = \"10m\"\n"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_since_the_last_offset_under_a_full_speed_publisher_misses_nothing() {
    // A queue that can hold everything, so the slow-consumer policy (which would show as gaps
    // in offsets, the test's other failure) stays out of what this test measures.
    let server = TestServer::start_with(|c| {
        c.namespaces = namespaces(100_000);
        c.sockets.queue_size = 100_000;
        // The publisher is meant to go flat out, past the default per-connection rate limit.
        c.sockets.publish_rate = 1_000_000;
        c.sockets.publish_burst = 1_000_000;
    })
    .await;
    let total: u64 = 5_000;

    let mut subscriber = server.ws().await;
    let reply = subscriber.subscribe("feed:live", 1).await;
    let epoch = reply["result"]["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(reply["result"]["offset"], 0);

    // A publisher that never waits: every frame pipelined, replies drained elsewhere.
    let (publisher, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("connect");
    let (mut sink, mut replies) = publisher.split();
    let publishing = tokio::spawn(async move {
        for i in 0..total {
            let frame =
                json!({"type": "publish", "id": i, "channel": "feed:live", "data": {"i": i}});
            sink.feed(Message::text(frame.to_string()))
                .await
                .expect("send");
        }
        sink.flush().await.expect("flush");
        let mut acknowledged = 0;
        while acknowledged < total {
            match replies.next().await {
                Some(Ok(Message::Text(text))) if text.contains("\"reply\"") => acknowledged += 1,
                Some(Ok(_)) => {}
                other => panic!("publisher connection ended: {other:?}"),
            }
        }
        sink
    });

    let mut seen: Vec<u64> = Vec::new();
    let mut reconnects = 0;
    let mut batch = 37;
    while seen.last().copied().unwrap_or(0) < total {
        // Read a while, then drop the connection without a close and come back.
        for _ in 0..batch {
            let message = subscriber.next_json().await;
            assert_eq!(message["type"], "message", "{message}");
            let offset = message["offset"].as_u64().expect("offset");
            assert_eq!(message["data"]["i"], offset - 1);
            seen.push(offset);
            if offset == total {
                break;
            }
        }
        if seen.last() == Some(&total) {
            break;
        }
        drop(subscriber);
        reconnects += 1;
        batch = 37 + (reconnects * 53) % 400;
        subscriber = server.ws().await;
        let last = *seen.last().expect("read at least one");
        let reply = subscriber
            .request(
                json!({"type": "subscribe", "channel": "feed:live", "since": {"offset": last, "epoch": epoch}}),
                1,
            )
            .await;
        assert_eq!(reply["type"], "reply", "{reply}");
        assert_eq!(reply["result"]["recovered"], true, "{reply}");
        assert_eq!(reply["result"]["epoch"], epoch.as_str());
        let missed = reply["result"]["missed"].as_u64().expect("missed");
        assert_eq!(
            missed,
            reply["result"]["offset"].as_u64().expect("offset") - last
        );
    }
    let _sink = publishing.await.expect("publisher");
    assert!(reconnects >= 10, "only {reconnects} reconnects");
    assert_eq!(
        seen,
        (1..=total).collect::<Vec<_>>(),
        "every offset exactly once, in order"
    );
}

#[tokio::test]
async fn a_changed_epoch_or_lost_history_is_said_plainly() {
    let server = TestServer::start_with(|c| c.namespaces = namespaces(5)).await;
    let mut client = server.ws().await;
    let mut epoch = String::new();
    for i in 0..20 {
        let reply = client
            .request(
                json!({"type": "publish", "channel": "feed:short", "data": i}),
                i,
            )
            .await;
        epoch = reply["result"]["epoch"].as_str().expect("epoch").to_owned();
    }
    let cases = [
        (
            json!({"offset": 18, "epoch": "not-the-epoch"}),
            "epoch_changed",
        ),
        (json!({"offset": 2, "epoch": epoch}), "history_trimmed"),
        (json!({"offset": 99, "epoch": epoch}), "offset_ahead"),
        (json!({"offset": 18}), "epoch_required"),
    ];
    for (i, (since, reason)) in cases.into_iter().enumerate() {
        let mut subscriber = server.ws().await;
        let reply = subscriber
            .request(
                json!({"type": "subscribe", "channel": "feed:short", "since": since}),
                i as u64,
            )
            .await;
        assert_eq!(reply["result"]["recovered"], false, "{reply}");
        assert_eq!(reply["result"]["reason"], reason, "{reply}");
        assert_eq!(reply["result"]["offset"], 20 + i as u64);
        // The subscription is live anyway: the next publication arrives.
        client
            .request(
                json!({"type": "publish", "channel": "feed:short", "data": "live"}),
                100 + i as u64,
            )
            .await;
        let message = subscriber.next_json().await;
        assert_eq!(message["data"], "live");
    }

    // Recovery from the start of what is kept works.
    let mut subscriber = server.ws().await;
    let reply = subscriber
        .request(
            json!({"type": "subscribe", "channel": "feed:short", "since": {"offset": 20, "epoch": epoch}}),
            1,
        )
        .await;
    assert_eq!(reply["result"]["recovered"], true);
    assert_eq!(reply["result"]["missed"], 4);
    for offset in 21..=24 {
        assert_eq!(subscriber.next_json().await["offset"], offset);
    }
}

#[tokio::test]
async fn history_is_readable_over_the_socket_and_http() {
    let server = TestServer::start_with(|c| c.namespaces = namespaces(10)).await;
    let mut client: WsClient = server.ws().await;
    for i in 1..=15 {
        client
            .request(
                json!({"type": "publish", "channel": "feed:h", "data": {"n": i}}),
                i,
            )
            .await;
    }
    let reply = client
        .request(
            json!({"type": "history", "channel": "feed:h", "limit": 3}),
            100,
        )
        .await;
    let offsets = |result: &Value| -> Vec<u64> {
        result["publications"]
            .as_array()
            .expect("publications")
            .iter()
            .map(|p| p["offset"].as_u64().expect("offset"))
            .collect()
    };
    assert_eq!(offsets(&reply["result"]), vec![13, 14, 15]);
    assert_eq!(reply["result"]["offset"], 15);
    assert_eq!(reply["result"]["publications"][0]["data"]["n"], 13);

    let reply = client
        .request(
            json!({"type": "history", "channel": "feed:h", "since": 9, "limit": 2}),
            101,
        )
        .await;
    assert_eq!(offsets(&reply["result"]), vec![10, 11]);
    assert_eq!(reply["result"]["recovered"], true);
    let reply = client
        .request(
            json!({"type": "history", "channel": "feed:h", "since": 2}),
            102,
        )
        .await;
    assert_eq!(reply["result"]["recovered"], false);
    assert_eq!(reply["result"]["reason"], "history_trimmed");
    assert_eq!(offsets(&reply["result"]), (6..=15).collect::<Vec<_>>());
    let error = client
        .request(
            json!({"type": "history", "channel": "feed:h", "limit": 0}),
            103,
        )
        .await;
    assert_eq!(error["code"], "bad_request");

    let http = reqwest::Client::new();
    let body: Value = http
        .get(server.url("/api/channels/feed:h/history?since=12&limit=2"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(offsets(&body), vec![13, 14]);
    assert_eq!(body["epoch"], reply["result"]["epoch"]);
    let body: Value = http
        .get(server.url(&format!(
            "/api/channels/feed:h/history?since=12&epoch={}",
            "wrong"
        )))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(body["recovered"], false);
    assert_eq!(body["reason"], "epoch_changed");
    for (query, code) in [
        ("since=abc", "invalid_query"),
        ("limit=100000", "invalid_query"),
        ("limit=0", "invalid_query"),
        ("epoch=x", "invalid_query"),
        ("color=red", "invalid_query"),
    ] {
        let response = http
            .get(server.url(&format!("/api/channels/feed:h/history?{query}")))
            .send()
            .await
            .expect("request");
        assert_eq!(
            response.status(),
            reqwest::StatusCode::BAD_REQUEST,
            "{query}"
        );
        let problem: Value = response.json().await.expect("json");
        assert_eq!(problem["code"], code);
    }
    let response = http
        .get(server.url("/api/channels/nocolon/history"))
        .send()
        .await
        .expect("request");
    let problem: Value = response.json().await.expect("json");
    assert_eq!(problem["code"], "invalid_channel");
}

#[tokio::test]
async fn record_channels_keep_history_so_a_returning_client_learns_what_changed() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let mut client = server.ws().await;
    let reply = client.subscribe("records:notes", 1).await;
    let epoch = reply["result"]["epoch"].as_str().expect("epoch").to_owned();
    let create = |title: &'static str| {
        http.post(server.url("/api/collections/notes/records"))
            .json(&json!({"title": title}))
            .send()
    };
    create("one").await.expect("request");
    let first = client.next_json().await;
    let seen = first["offset"].as_u64().expect("offset");
    drop(client);
    create("two").await.expect("request");
    create("three").await.expect("request");
    let mut client = server.ws().await;
    let reply = client
        .request(
            json!({"type": "subscribe", "channel": "records:notes", "since": {"offset": seen, "epoch": epoch}}),
            1,
        )
        .await;
    assert_eq!(reply["result"]["recovered"], true);
    for title in ["two", "three"] {
        let message = client.next_json().await;
        assert_eq!(message["data"]["op"], "created");
        assert_eq!(message["data"]["record"]["title"], title);
    }
}

#[tokio::test]
async fn a_server_restart_changes_the_epoch_so_clients_are_told_to_refetch() {
    let server = TestServer::start().await;
    let mut client = server.ws().await;
    let reply = client
        .request(
            json!({"type": "publish", "channel": "chat:lobby", "data": "before"}),
            1,
        )
        .await;
    let epoch = reply["result"]["epoch"].as_str().expect("epoch").to_owned();
    drop(client);
    server.stop().await.expect("stop");

    let restarted = TestServer::start().await;
    let mut client = restarted.ws().await;
    let reply = client
        .request(
            json!({"type": "subscribe", "channel": "chat:lobby", "since": {"offset": 1, "epoch": epoch}}),
            1,
        )
        .await;
    assert_eq!(reply["result"]["recovered"], false);
    assert_eq!(reply["result"]["reason"], "epoch_changed");
    assert_ne!(reply["result"]["epoch"], epoch.as_str());
    assert_eq!(
        reply["result"]["missed"], 0,
        "the new epoch is whole: {reply}"
    );
}

/// A client that comes back from an epoch that is gone is told so (`recovered: false`), and
/// the new epoch, when its history still starts at offset 1, follows the reply whole: what was
/// published since the restart is not skipped. A new epoch that lost its start is not replayed.
#[tokio::test]
async fn a_new_epoch_kept_whole_is_replayed_from_its_first_offset() {
    let server = TestServer::start_with(|c| c.namespaces = namespaces(5)).await;
    let mut publisher = server.ws().await;
    for i in 0..2 {
        publisher
            .request(
                json!({"type": "publish", "channel": "feed:whole", "data": i}),
                i,
            )
            .await;
    }
    for i in 0..8 {
        publisher
            .request(
                json!({"type": "publish", "channel": "feed:trimmed", "data": i}),
                10 + i,
            )
            .await;
    }
    let mut client = server.ws().await;
    let reply = client
        .request(
            json!({"type": "subscribe", "channel": "feed:whole", "since": {"offset": 40, "epoch": "gone"}}),
            1,
        )
        .await;
    assert_eq!(reply["result"]["recovered"], false, "{reply}");
    assert_eq!(reply["result"]["reason"], "epoch_changed");
    assert_eq!(reply["result"]["offset"], 2);
    assert_eq!(reply["result"]["missed"], 2, "{reply}");
    for (offset, data) in [(1, 0), (2, 1)] {
        let message = client.next_json().await;
        assert_eq!(message["type"], "message", "{message}");
        assert_eq!(
            (message["offset"].as_u64(), &message["data"]),
            (Some(offset), &json!(data))
        );
    }
    publisher
        .request(
            json!({"type": "publish", "channel": "feed:whole", "data": "live"}),
            20,
        )
        .await;
    let live = client.next_json().await;
    assert_eq!(
        (live["offset"].as_u64(), &live["data"]),
        (Some(3), &json!("live"))
    );

    // feed keeps 5: offsets 4 to 8 are left of 8, so this epoch cannot be given whole.
    let reply = client
        .request(
            json!({"type": "subscribe", "channel": "feed:trimmed", "since": {"offset": 40, "epoch": "gone"}}),
            2,
        )
        .await;
    assert_eq!(reply["result"]["recovered"], false, "{reply}");
    assert_eq!(reply["result"]["reason"], "epoch_changed");
    assert!(reply["result"].get("missed").is_none(), "{reply}");
    publisher
        .request(
            json!({"type": "publish", "channel": "feed:trimmed", "data": "live"}),
            21,
        )
        .await;
    let live = client.next_json().await;
    assert_eq!(
        (live["offset"].as_u64(), &live["data"]),
        (Some(9), &json!("live"))
    );
}
