//! Short polling, long polling and Server-Sent Events against a real server, with real HTTP
//! clients.

use std::time::Duration;

use duplex_testkit::{EVENT_TIMEOUT, TestServer, wait_for};
use futures_util::StreamExt as _;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn publish(server: &TestServer, channel: &str, data: Value) -> Value {
    let response = reqwest::Client::new()
        .post(server.url(&format!("/api/channels/{channel}/publish")))
        .json(&data)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("json")
}

async fn get_json(server: &TestServer, path: &str) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .get(server.url(path))
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("json"))
}

fn offsets(page: &Value) -> Vec<u64> {
    page["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["offset"].as_u64().expect("offset"))
        .collect()
}

#[tokio::test]
async fn short_polls_page_through_a_channel_in_order_and_resume() {
    let server = TestServer::start().await;
    let (_, start) = get_json(&server, "/api/channels/news:poll/poll").await;
    assert_eq!(start["offset"], 0);
    assert_eq!(start["next"], 0);
    assert_eq!(offsets(&start), Vec::<u64>::new());

    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = publish(&server, "news:poll", json!({"n": i})).await["epoch"]
            .as_str()
            .expect("epoch")
            .to_owned();
    }
    let (status, page) = get_json(
        &server,
        &format!("/api/channels/news:poll/poll?since=0&epoch={epoch}&limit=2"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(offsets(&page), vec![1, 2]);
    assert_eq!(page["next"], 2);
    assert_eq!(page["recovered"], true);
    assert_eq!(page["publications"][0]["data"]["n"], 1);
    let (_, page) = get_json(
        &server,
        &format!("/api/channels/news:poll/poll?since=2&epoch={epoch}"),
    )
    .await;
    assert_eq!(offsets(&page), vec![3, 4, 5]);
    assert_eq!(page["next"], 5);
    let (_, page) = get_json(
        &server,
        &format!("/api/channels/news:poll/poll?since=5&epoch={epoch}"),
    )
    .await;
    assert_eq!(offsets(&page), Vec::<u64>::new());
    assert_eq!(page["next"], 5);

    // A poller from another epoch is told so, and gets this epoch from its first offset (it
    // is still whole), so nothing published in it is skipped.
    let (_, page) = get_json(&server, "/api/channels/news:poll/poll?since=3&epoch=gone").await;
    assert_eq!(page["recovered"], false);
    assert_eq!(page["reason"], "epoch_changed");
    assert_eq!(offsets(&page), vec![1, 2, 3, 4, 5]);
    assert_eq!(page["next"], 5);
    let (_, page) = get_json(
        &server,
        "/api/channels/news:poll/poll?since=3&epoch=gone&limit=2",
    )
    .await;
    assert_eq!(offsets(&page), vec![1, 2]);
    assert_eq!(page["next"], 2);
    assert_eq!(page["epoch"], epoch.as_str());
}

#[tokio::test]
async fn a_long_poll_waits_for_the_next_publication() {
    let server = TestServer::start().await;
    let epoch = publish(&server, "news:lp", json!("first")).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let url = server.url(&format!(
        "/api/channels/news:lp/poll?since=1&epoch={epoch}&wait=30s"
    ));
    let waiting = tokio::spawn(async move {
        reqwest::get(url)
            .await
            .expect("request")
            .json::<Value>()
            .await
            .expect("json")
    });
    wait_for("the long poll to wait", || async {
        (server.metric("duplex_long_polls").await == 1.0).then_some(())
    })
    .await;
    publish(&server, "news:lp", json!("second")).await;
    let page = tokio::time::timeout(EVENT_TIMEOUT, waiting)
        .await
        .expect("woken by the publication")
        .expect("task");
    assert_eq!(offsets(&page), vec![2]);
    assert_eq!(page["publications"][0]["data"], "second");

    // A wait that ends without a publication answers empty, with the same next.
    let (_, page) = get_json(
        &server,
        &format!("/api/channels/news:lp/poll?since=2&epoch={epoch}&wait=100ms"),
    )
    .await;
    assert_eq!(offsets(&page), Vec::<u64>::new());
    assert_eq!(page["next"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_long_polls_are_woken_by_one_publication() {
    let server = TestServer::start().await;
    let epoch = publish(&server, "news:many", json!(0)).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let pollers = 300;
    let client = reqwest::Client::new();
    let mut waiting = Vec::new();
    for _ in 0..pollers {
        let url = server.url(&format!(
            "/api/channels/news:many/poll?since=1&epoch={epoch}&wait=30s"
        ));
        let client = client.clone();
        waiting.push(tokio::spawn(async move {
            client
                .get(url)
                .send()
                .await
                .expect("request")
                .json::<Value>()
                .await
                .expect("json")
        }));
    }
    wait_for("every long poll to wait", || async {
        (server.metric("duplex_long_polls").await == f64::from(pollers)).then_some(())
    })
    .await;
    publish(&server, "news:many", json!("wake")).await;
    for poll in waiting {
        let page = tokio::time::timeout(EVENT_TIMEOUT, poll)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(offsets(&page), vec![2]);
    }
    assert_eq!(server.metric("duplex_long_polls").await, 0.0);
}

#[tokio::test]
async fn polling_a_channel_without_history_gets_its_latest_publication() {
    let server = TestServer::start().await;
    let mut epoch = String::new();
    let mut ws = server.ws().await;
    ws.subscribe("game:arena", 1).await; // keeps the channel alive between publications
    for i in 1..=3 {
        epoch = publish(&server, "game:arena", json!({"tick": i})).await["epoch"]
            .as_str()
            .expect("epoch")
            .to_owned();
    }
    let (_, page) = get_json(
        &server,
        &format!("/api/channels/game:arena/poll?since=2&epoch={epoch}"),
    )
    .await;
    assert_eq!(offsets(&page), vec![3]);
    assert_eq!(page["recovered"], true);
    let (_, page) = get_json(
        &server,
        &format!("/api/channels/game:arena/poll?since=0&epoch={epoch}"),
    )
    .await;
    assert_eq!(page["recovered"], false);
    assert_eq!(page["reason"], "history_trimmed");
    assert_eq!(offsets(&page), vec![3], "the latest state still comes");
}

#[tokio::test]
async fn http_transports_obey_namespace_rules_and_refuse_bad_parameters() {
    let server = TestServer::start().await;
    for path in [
        "/api/channels/private:x/poll",
        "/api/channels/private:x/events",
    ] {
        let (status, body) = get_json(&server, path).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(body["code"], "forbidden");
    }
    for (path, code) in [
        ("/api/channels/nocolon/poll", "invalid_channel"),
        ("/api/channels/news:x/poll?since=x", "invalid_query"),
        ("/api/channels/news:x/poll?wait=61s", "invalid_query"),
        ("/api/channels/news:x/poll?wait=forever", "invalid_query"),
        ("/api/channels/news:x/poll?limit=0", "invalid_query"),
        ("/api/channels/news:x/poll?epoch=e", "invalid_query"),
        ("/api/channels/news:x/events?wait=1s", "invalid_query"),
        ("/api/channels/nocolon/events", "invalid_channel"),
    ] {
        let (status, body) = get_json(&server, path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(body["code"], code, "{path}");
    }
    let response = reqwest::Client::new()
        .get(server.url("/api/channels/news:x/events"))
        .header("last-event-id", "e:notanumber")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

/// A minimal Server-Sent Events reader over a real HTTP response.
struct EventReader {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

#[derive(Debug, Default, PartialEq)]
struct SseEvent {
    event: Option<String>,
    id: Option<String>,
    data: String,
}

impl EventReader {
    async fn open(server: &TestServer, path: &str, last_event_id: Option<&str>) -> EventReader {
        let mut request = reqwest::Client::new().get(server.url(path));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        EventReader {
            stream: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event, skipping comments (heartbeats); `None` when the stream ends.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                let mut any = false;
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("data:") {
                        event.data.push_str(value.trim_start());
                        any = true;
                    } else if let Some(value) = line.strip_prefix("id:") {
                        event.id = Some(value.trim_start().to_owned());
                    } else if let Some(value) = line.strip_prefix("event:") {
                        event.event = Some(value.trim_start().to_owned());
                    }
                }
                if any {
                    return Some(event);
                }
                continue;
            }
            let chunk = tokio::time::timeout(EVENT_TIMEOUT, self.stream.next())
                .await
                .expect("an event in time")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk.expect("body")).expect("utf-8"));
        }
    }
}

#[tokio::test]
async fn sse_streams_publications_and_resumes_from_last_event_id() {
    let server = TestServer::start().await;
    let mut events = EventReader::open(&server, "/api/channels/news:sse/events", None).await;
    let subscribed = events.next().await.expect("subscribed");
    assert_eq!(subscribed.event.as_deref(), Some("subscribed"));
    let position: Value = serde_json::from_str(&subscribed.data).expect("json");
    let epoch = position["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(
        subscribed.id,
        Some(format!("{epoch}:0")),
        "where it goes on from"
    );

    for i in 1..=3 {
        publish(&server, "news:sse", json!({"n": i})).await;
    }
    let mut ids = Vec::new();
    for i in 1..=3u64 {
        let event = events.next().await.expect("message");
        assert_eq!(event.event, None, "publications are plain message events");
        let message: Value = serde_json::from_str(&event.data).expect("json");
        assert_eq!(message["offset"], i);
        assert_eq!(message["data"]["n"], i);
        assert_eq!(event.id, Some(format!("{epoch}:{i}")));
        ids.push(event.id.expect("id"));
    }
    drop(events);

    // Resume after the first: the two missed come first, then live ones.
    let mut events =
        EventReader::open(&server, "/api/channels/news:sse/events", Some(&ids[0])).await;
    let subscribed = events.next().await.expect("subscribed");
    assert_eq!(subscribed.event.as_deref(), Some("subscribed"));
    // The stream goes on after offset 1, not after the newest (3): 2 and 3 follow.
    assert_eq!(subscribed.id.as_ref(), Some(&ids[0]));
    for i in 2..=3 {
        let message: Value =
            serde_json::from_str(&events.next().await.expect("message").data).expect("json");
        assert_eq!(message["offset"], i);
    }
    publish(&server, "news:sse", json!({"n": 4})).await;
    let message: Value =
        serde_json::from_str(&events.next().await.expect("message").data).expect("json");
    assert_eq!(message["offset"], 4);
    drop(events);

    // A resume that cannot be honoured says so before anything else.
    let mut events = EventReader::open(
        &server,
        "/api/channels/news:sse/events",
        Some("other-epoch:2"),
    )
    .await;
    let refused = events.next().await.expect("not_recovered");
    assert_eq!(refused.event.as_deref(), Some("not_recovered"));
    let refused: Value = serde_json::from_str(&refused.data).expect("json");
    assert_eq!(refused["reason"], "epoch_changed");
    assert_eq!(refused["offset"], 4);
    // This epoch is whole: it follows from its first offset.
    assert_eq!(refused["missed"], 4, "{refused}");
    let subscribed = events.next().await.expect("subscribed");
    assert_eq!(subscribed.event.as_deref(), Some("subscribed"));
    assert_eq!(subscribed.id, Some(format!("{epoch}:0")));
    for i in 1..=4 {
        let event = events.next().await.expect("message");
        let message: Value = serde_json::from_str(&event.data).expect("json");
        assert_eq!(message["offset"], i);
        assert_eq!(event.id, Some(format!("{epoch}:{i}")));
    }
}

/// A browser's `EventSource` sends as `Last-Event-ID` the id of the last event it got. A stream
/// lost before its first publication must resume from its subscription: without an id on
/// `subscribed` it would come back with none, subscribe afresh, and never see what was
/// published while it was away.
#[tokio::test]
async fn an_event_stream_lost_before_its_first_publication_resumes_from_its_subscription() {
    let server = TestServer::start().await;
    for i in 1..=2 {
        publish(&server, "news:quiet", json!({"n": i})).await;
    }
    let path = "/api/channels/news:quiet/events";
    let mut events = EventReader::open(&server, path, None).await;
    let subscribed = events.next().await.expect("subscribed");
    assert_eq!(subscribed.event.as_deref(), Some("subscribed"));
    let position: Value = serde_json::from_str(&subscribed.data).expect("json");
    let epoch = position["epoch"].as_str().expect("epoch");
    let last = subscribed.id.expect("subscribed has an id");
    assert_eq!(last, format!("{epoch}:2"));
    drop(events);

    for i in 3..=4 {
        publish(&server, "news:quiet", json!({"n": i})).await;
    }
    let mut events = EventReader::open(&server, path, Some(&last)).await;
    let subscribed = events.next().await.expect("subscribed");
    assert_eq!(subscribed.event.as_deref(), Some("subscribed"));
    let resumed: Value = serde_json::from_str(&subscribed.data).expect("json");
    assert_eq!(resumed["recovered"], true, "{resumed}");
    assert_eq!(resumed["missed"], 2, "{resumed}");
    for i in 3..=4u64 {
        let event = events.next().await.expect("message");
        let message: Value = serde_json::from_str(&event.data).expect("json");
        assert_eq!(
            message["offset"], i,
            "the publications made while it was away"
        );
        assert_eq!(event.id, Some(format!("{epoch}:{i}")));
    }
}

#[tokio::test]
async fn sse_streams_end_with_a_disconnect_at_shutdown() {
    let server = TestServer::start().await;
    let mut events = EventReader::open(&server, "/api/channels/news:bye/events", None).await;
    events.next().await.expect("subscribed");
    let stopping = tokio::spawn(server.stop());
    let disconnect = events.next().await.expect("disconnect");
    assert_eq!(disconnect.event.as_deref(), Some("disconnect"));
    let disconnect: Value = serde_json::from_str(&disconnect.data).expect("json");
    assert_eq!(disconnect["code"], "shutdown");
    assert_eq!(events.next().await, None, "the stream ends");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("stops in time")
        .expect("task")
        .expect("clean");
}

#[tokio::test]
async fn sse_streams_end_with_token_expired_when_their_token_runs_out() {
    let secret = "a-test-secret-of-some-length";
    let server = TestServer::start_with(|c| c.jwt_secret = Some(secret.into())).await;
    // Whole seconds: "+ 2" is one to two seconds ahead, never already past when the stream opens.
    let exp = jsonwebtoken::get_current_timestamp() + 2;
    let token = duplex_testkit::hs256_token(secret, &json!({"sub": "ana", "exp": exp}));
    let path = format!("/api/channels/news:exp/events?token={token}");
    let mut events = EventReader::open(&server, &path, None).await;
    events.next().await.expect("subscribed");
    let disconnect = events.next().await.expect("disconnect");
    assert_eq!(disconnect.event.as_deref(), Some("disconnect"));
    let disconnect: Value = serde_json::from_str(&disconnect.data).expect("json");
    assert_eq!(disconnect["code"], "token_expired");
    assert_eq!(events.next().await, None, "the stream ends");
    wait_for(
        "the expired stream to leave the connection list",
        || async {
            let (_, list) = get_json(&server, "/api/connections").await;
            (list["items"] == json!([])).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn sse_streams_are_listed_as_connections_and_cleaned_up() {
    let server = TestServer::start().await;
    let events = EventReader::open(&server, "/api/channels/news:c/events", None).await;
    let (_, list) = get_json(&server, "/api/connections").await;
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["transport"], "sse");
    assert_eq!(items[0]["subscriptions"], json!(["news:c"]));
    drop(events);
    wait_for("the stream's subscription to end", || async {
        (server.metric("duplex_subscriptions").await == 0.0).then_some(())
    })
    .await;
}

/// A long poll whose client goes away is no longer counted in flight, nor as a long poll.
#[tokio::test]
async fn a_long_poll_left_by_its_client_is_no_longer_counted() {
    let server = TestServer::start().await;
    let epoch = publish(&server, "news:gone", json!("first")).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let in_flight = "duplex_http_requests_in_flight";
    use tokio::io::AsyncWriteExt as _;
    let mut client = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("connect");
    client
        .write_all(
            format!(
                "GET /api/channels/news:gone/poll?since=1&epoch={epoch}&wait=30s HTTP/1.1\r\n\
                 Host: x\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    wait_for("the long poll to wait", || async {
        (server.metric("duplex_long_polls").await == 1.0).then_some(())
    })
    .await;
    // The scrape is in flight itself while it is answered.
    assert_eq!(server.metric(in_flight).await, 2.0);
    drop(client);
    wait_for("the long poll to end with its client", || async {
        (server.metric("duplex_long_polls").await == 0.0).then_some(())
    })
    .await;
    wait_for("the request to leave the in-flight count", || async {
        (server.metric(in_flight).await == 1.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_event_stream_whose_client_stopped_reading_is_closed_after_the_write_timeout() {
    let server = TestServer::start_with(|c| {
        c.write_timeout = Duration::from_millis(500);
        c.sockets.queue_size = 8;
        c.namespaces = duplex_testkit::namespaces(
            "[slowdrop]\npublish = \"anyone\"\nslow_consumer = \"drop_oldest\"\n\
             history_size = 0\nmax_message_size = \"1MiB\"\n",
        );
    })
    .await;
    // An event stream opened by hand and then never read: its queue only drops the oldest, so
    // nothing but the write deadline can end it.
    let mut stalled = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("connect");
    let request = format!(
        "GET /api/channels/slowdrop:feed/events HTTP/1.1\r\nhost: {}\r\n\r\n",
        server.http_addr
    );
    tokio::io::AsyncWriteExt::write_all(&mut stalled, request.as_bytes())
        .await
        .expect("request");
    let sse = r#"duplex_connections{transport="sse"}"#;
    wait_for("the stream to open", || async {
        (server.metric(sse).await == 1.0).then_some(())
    })
    .await;
    let padding = "x".repeat(64 * 1024);
    for i in 0..300 {
        publish(&server, "slowdrop:feed", json!({"i": i, "pad": padding})).await;
    }
    wait_for("the stalled stream to be closed", || async {
        (server.metric(sse).await == 0.0).then_some(())
    })
    .await;
    // A reading client is unaffected.
    let mut events = EventReader::open(&server, "/api/channels/slowdrop:feed/events", None).await;
    assert_eq!(
        events.next().await.expect("subscribed").event.as_deref(),
        Some("subscribed")
    );
}
