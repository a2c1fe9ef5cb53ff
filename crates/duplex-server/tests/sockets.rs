//! Channels over WebSocket and raw TCP against a real server, with real clients.

use std::time::Duration;

use duplex_proto::binary;
use duplex_proto::tcp::TcpFrame;
use duplex_server::hub::namespace::Namespaces;
use duplex_testkit::{EVENT_TIMEOUT, TestServer, WsClient, WsEvent, wait_for};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

fn publish(channel: &str, data: Value) -> Value {
    json!({"type": "publish", "channel": channel, "data": data})
}

#[tokio::test]
async fn every_connection_starts_with_connected() {
    let server = TestServer::start().await;
    let ws = server.ws().await;
    let tcp = server.tcp().await;
    for connected in [&ws.connected, &tcp.connected] {
        assert_eq!(connected["protocol"], duplex_proto::PROTOCOL_VERSION);
        assert_eq!(connected["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(connected["client"].as_str().map(str::len), Some(16));
        assert_eq!(connected["limits"]["max_frame"], 64 * 1024);
        assert_eq!(connected["limits"]["queue_bytes"], 1024 * 1024);
    }
    assert_ne!(ws.connected["client"], tcp.connected["client"]);
}

#[tokio::test]
async fn connect_and_ping_are_answered() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    let reply = ws
        .request(
            json!({"type": "connect", "meta": {"name": "ana"}, "version": 1}),
            1,
        )
        .await;
    assert_eq!(reply["result"]["client"], ws.connected["client"]);
    assert_eq!(reply["result"]["user"], Value::Null);
    let error = ws
        .request(json!({"type": "connect", "version": 99}), 2)
        .await;
    assert_eq!(error["code"], "unsupported");
    ws.send_json(json!({"type": "ping", "id": 3})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong", "id": 3}));
    let mut tcp = server.tcp().await;
    tcp.send_json(json!({"type": "ping"})).await;
    assert_eq!(tcp.next_json().await, json!({"type": "pong"}));
}

#[tokio::test]
async fn websocket_and_tcp_subscribers_see_the_same_ordered_stream() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    let mut tcp = server.tcp().await;
    let ws_reply = ws.subscribe("news:lobby", 1).await;
    let tcp_reply = tcp.subscribe("news:lobby", 1).await;
    assert_eq!(ws_reply["result"]["offset"], 0);
    assert_eq!(ws_reply["result"]["epoch"], tcp_reply["result"]["epoch"]);

    // Two publishers, one per transport, both publishing as fast as they can.
    let mut ws_publisher = server.ws().await;
    let mut tcp_publisher = server.tcp().await;
    let count = 200u64;
    for i in 0..count {
        let mut frame = publish("news:lobby", json!({"from": "ws", "i": i}));
        frame["id"] = i.into();
        ws_publisher.send_json(frame).await;
        let mut frame = publish("news:lobby", json!({"from": "tcp", "i": i}));
        frame["id"] = i.into();
        tcp_publisher.send_json(frame).await;
    }
    let mut ws_seen = Vec::new();
    let mut tcp_seen = Vec::new();
    for _ in 0..count * 2 {
        let message = ws.next_json().await;
        assert_eq!(message["type"], "message");
        assert_eq!(message["channel"], "news:lobby");
        ws_seen.push((
            message["offset"].as_u64().expect("offset"),
            message["data"].clone(),
        ));
        let message = tcp.next_json().await;
        tcp_seen.push((
            message["offset"].as_u64().expect("offset"),
            message["data"].clone(),
        ));
    }
    let offsets: Vec<u64> = ws_seen.iter().map(|(offset, _)| *offset).collect();
    assert_eq!(offsets, (1..=count * 2).collect::<Vec<_>>());
    assert_eq!(ws_seen, tcp_seen);
    // Each publisher's own messages keep their order inside the total order.
    for from in ["ws", "tcp"] {
        let own: Vec<u64> = ws_seen
            .iter()
            .filter(|(_, data)| data["from"] == from)
            .map(|(_, data)| data["i"].as_u64().expect("i"))
            .collect();
        assert_eq!(own, (0..count).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn publishers_get_offsets_and_unsubscribed_clients_get_nothing_more() {
    let server = TestServer::start().await;
    let mut subscriber = server.ws().await;
    subscriber.subscribe("news:today", 1).await;
    let mut publisher = server.tcp().await;
    let reply = publisher
        .request(publish("news:today", json!("one")), 1)
        .await;
    assert_eq!(reply["result"]["offset"], 1);
    assert_eq!(subscriber.next_json().await["data"], "one");
    let reply = subscriber
        .request(json!({"type": "unsubscribe", "channel": "news:today"}), 2)
        .await;
    assert_eq!(reply["type"], "reply");
    publisher
        .request(publish("news:today", json!("two")), 2)
        .await;
    // The next frame the subscriber gets is the pong, not "two".
    subscriber.send_json(json!({"type": "ping", "id": 3})).await;
    assert_eq!(subscriber.next_json().await["type"], "pong");
}

#[tokio::test]
async fn http_record_writes_arrive_as_records_events() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    let mut tcp = server.tcp().await;
    ws.subscribe("records:posts", 1).await;
    tcp.subscribe("records:posts", 1).await;
    let client = reqwest::Client::new();
    let created: Value = client
        .post(server.url("/api/collections/posts/records"))
        .json(&json!({"title": "live"}))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id");
    let url = server.url(&format!("/api/collections/posts/records/{id}"));
    client
        .patch(&url)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"title": "edited"}"#)
        .send()
        .await
        .expect("request");
    client.delete(&url).send().await.expect("request");
    // A write to another collection is not on this channel.
    client
        .post(server.url("/api/collections/other/records"))
        .json(&json!({}))
        .send()
        .await
        .expect("request");

    for (op, title, version) in [
        ("created", "live", 1),
        ("updated", "edited", 2),
        ("deleted", "edited", 2),
    ] {
        let ws_message = ws.next_json().await;
        let tcp_message = tcp.next_json().await;
        assert_eq!(ws_message, tcp_message);
        assert_eq!(ws_message["channel"], "records:posts");
        assert_eq!(ws_message["data"]["op"], op);
        assert_eq!(ws_message["data"]["record"]["id"], id);
        assert_eq!(ws_message["data"]["record"]["title"], title);
        assert_eq!(ws_message["data"]["record"]["version"], version);
    }
    let error = ws
        .request(publish("records:posts", json!({"op": "forged"})), 9)
        .await;
    assert_eq!(error["code"], "permission_denied");
}

#[tokio::test]
async fn binary_publications_arrive_byte_exact_on_both_transports() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    ws.subscribe("stream:cam1", 1).await;
    let mut tcp_framed = server.tcp().await;
    tcp_framed.switch_to_length_prefixed(1).await;
    tcp_framed.subscribe("stream:cam1", 2).await;
    let mut tcp_lines = server.tcp().await;
    tcp_lines.subscribe("stream:cam1", 1).await;

    let payload: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    // From a WebSocket publisher...
    let mut publisher = server.ws().await;
    publisher
        .send(Message::binary(binary::encode_publish(
            7,
            "stream:cam1",
            &payload,
        )))
        .await;
    let reply = publisher.next_json().await;
    assert_eq!(reply["type"], "reply");
    assert_eq!(reply["id"], 7);
    assert_eq!(reply["result"]["offset"], 1);
    // ...and from a raw TCP publisher in length-prefixed mode.
    let mut tcp_publisher = server.tcp().await;
    tcp_publisher.switch_to_length_prefixed(1).await;
    tcp_publisher
        .write_raw(&duplex_proto::tcp::length_prefixed_binary(
            &binary::encode_publish(8, "stream:cam1", &payload[..100]),
        ))
        .await;
    let reply = tcp_publisher.next_json().await;
    assert_eq!(reply["result"]["offset"], 2);

    for (offset, expected) in [(1u64, &payload[..]), (2, &payload[..100])] {
        // `stream` has presence on: the subscribers' joins come first, as text.
        let frame = loop {
            match ws.next_event().await {
                Some(WsEvent::Binary(frame)) => break frame,
                Some(WsEvent::Json(value)) if value["type"] == "join" => continue,
                other => panic!("expected a binary frame, got {other:?}"),
            }
        };
        let message = binary::decode_message(&frame).expect("valid binary message");
        assert_eq!((message.channel, message.offset), ("stream:cam1", offset));
        assert_eq!(message.payload, expected);

        let frame = loop {
            match tcp_framed.next_frame().await {
                Some(TcpFrame::Binary(frame)) => break frame,
                Some(TcpFrame::Text(text)) if text.windows(6).any(|w| w == b"\"join\"") => continue,
                other => panic!("expected a binary frame, got {other:?}"),
            }
        };
        let message = binary::decode_message(&frame).expect("valid binary message");
        assert_eq!(message.offset, offset);
        assert_eq!(message.payload, expected);

        let line = loop {
            let line = tcp_lines.next_json().await;
            if line["type"] != "join" {
                break line;
            }
        };
        assert_eq!(line["offset"], offset);
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(line["binary"].as_str().expect("base64"))
            .expect("valid base64");
        assert_eq!(decoded, expected);
    }

    // Binary where the namespace does not allow it.
    publisher
        .send(Message::binary(binary::encode_publish(
            9,
            "chat:lobby",
            b"x",
        )))
        .await;
    let error = publisher.next_json().await;
    assert_eq!(
        (error["id"].clone(), error["code"].clone()),
        (json!(9), json!("binary_not_allowed"))
    );
    // A binary frame that is not a publish.
    publisher.send(Message::binary(vec![0x7f, 1, 2])).await;
    assert_eq!(publisher.next_json().await["code"], "bad_frame");
}

#[tokio::test]
async fn bad_frames_get_documented_error_codes_and_the_connection_survives() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    let mut tcp = server.tcp().await;
    let cases: Vec<(&str, Option<u64>, &str)> = vec![
        ("{not json", None, "bad_frame"),
        ("[1,2]", None, "bad_frame"),
        (r#"{"id":1}"#, None, "bad_frame"),
        (r#"{"type":"launch","id":2}"#, Some(2), "unknown_type"),
        (
            r#"{"type":"subscribe","channel":"chat:a"}"#,
            None,
            "missing_id",
        ),
        (
            r#"{"type":"subscribe","id":-4,"channel":"chat:a"}"#,
            None,
            "bad_frame",
        ),
        (r#"{"type":"subscribe","id":5}"#, Some(5), "bad_request"),
        (
            r#"{"type":"subscribe","id":6,"channel":"nocolon"}"#,
            Some(6),
            "invalid_channel",
        ),
        (
            r#"{"type":"subscribe","id":7,"channel":"private:x"}"#,
            Some(7),
            "permission_denied",
        ),
        (
            r#"{"type":"publish","id":8,"channel":"chat:a"}"#,
            Some(8),
            "bad_request",
        ),
        (
            r#"{"type":"publish","id":9,"channel":"chat:a","data":null}"#,
            Some(9),
            "bad_request",
        ),
        (
            r#"{"type":"unsubscribe","id":10,"channel":"chat:a"}"#,
            Some(10),
            "not_subscribed",
        ),
        (
            r#"{"type":"framing","id":11,"mode":"morse"}"#,
            Some(11),
            "unsupported",
        ),
    ];
    for (text, id, code) in &cases {
        ws.send(Message::text(*text)).await;
        let error = ws.next_json().await;
        assert_eq!(error["type"], "error", "{text}");
        assert_eq!(error["code"], *code, "{text}");
        assert_eq!(error.get("id").and_then(Value::as_u64), *id, "{text}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));

        tcp.write_raw(format!("{text}\n").as_bytes()).await;
        let error = tcp.next_json().await;
        assert_eq!(error["code"], *code, "tcp: {text}");
    }
    // Framing is a raw TCP matter.
    let error = ws
        .request(json!({"type": "framing", "mode": "length_prefixed"}), 12)
        .await;
    assert_eq!(error["code"], "unsupported");
    // Invalid UTF-8 in a line is a bad frame on TCP.
    tcp.write_raw(b"{\"type\":\"ping\",\"x\":\"\xff\"}\n").await;
    assert_eq!(tcp.next_json().await["code"], "bad_frame");

    // Subscribing twice, then everything still works.
    ws.subscribe("chat:a", 20).await;
    let error = ws
        .request(json!({"type": "subscribe", "channel": "chat:a"}), 21)
        .await;
    assert_eq!(error["code"], "already_subscribed");
    let reply = tcp
        .request(publish("chat:a", json!("still fine")), 22)
        .await;
    assert_eq!(reply["type"], "reply");
    assert_eq!(ws.next_json().await["data"], "still fine");
}

#[tokio::test]
async fn invalid_utf8_in_a_websocket_text_frame_closes_with_protocol_error() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    ws.send(Message::Frame(Frame::message(
        vec![b'{', 0xff, b'}'],
        OpCode::Data(Data::Text),
        true,
    )))
    .await;
    let disconnect = ws.next_json().await;
    assert_eq!(disconnect["type"], "disconnect");
    assert_eq!(disconnect["code"], "protocol_error");
    assert_eq!(disconnect["reconnect"], false);
    assert_eq!(ws.next_event().await, Some(WsEvent::Close(Some(1007))));
    // The server is unharmed.
    let mut other = server.ws().await;
    other.send_json(json!({"type": "ping", "id": 1})).await;
    assert_eq!(other.next_json().await["type"], "pong");
}

#[tokio::test]
async fn oversized_frames_disconnect_with_frame_too_large() {
    let server = TestServer::start_with(|c| c.sockets.max_frame = 1024).await;
    let big = format!("{{\"type\":\"ping\",\"pad\":\"{}\"}}", "x".repeat(2048));

    let mut ws = server.ws().await;
    ws.send(Message::text(big.clone())).await;
    let disconnect = ws.next_json().await;
    assert_eq!(disconnect["code"], "frame_too_large");
    assert_eq!(ws.next_event().await, Some(WsEvent::Close(Some(1009))));

    let mut tcp = server.tcp().await;
    tcp.write_raw(big.as_bytes()).await;
    let disconnect = tcp.next_json().await;
    assert_eq!(disconnect["code"], "frame_too_large");
    assert_eq!(tcp.next_frame().await, None);

    let mut framed = server.tcp().await;
    framed.switch_to_length_prefixed(1).await;
    framed.write_raw(&u32::MAX.to_be_bytes()).await;
    assert_eq!(framed.next_json().await["code"], "frame_too_large");
}

#[tokio::test]
async fn too_many_bad_frames_in_a_row_disconnect() {
    let server = TestServer::start().await;
    let mut tcp = server.tcp().await;
    for _ in 0..20 {
        tcp.write_raw(b"nonsense\n").await;
    }
    let mut codes = Vec::new();
    loop {
        let frame = tcp.next_json().await;
        codes.push(frame["code"].as_str().expect("code").to_owned());
        if frame["type"] == "disconnect" {
            break;
        }
    }
    assert_eq!(codes.len(), 21);
    assert_eq!(codes.last().map(String::as_str), Some("too_many_errors"));
    assert_eq!(
        server
            .metric(r#"duplex_socket_errors_total{code="bad_frame"}"#)
            .await,
        20.0
    );
    assert_eq!(
        server
            .metric(r#"duplex_disconnects_total{code="too_many_errors"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn thousands_of_subscribe_calls_hit_the_subscription_limit() {
    let server = TestServer::start_with(|c| c.sockets.max_subscriptions = 100).await;
    let mut tcp = server.tcp().await;
    let mut batch = Vec::new();
    for i in 0..2000u64 {
        batch.extend_from_slice(
            format!("{{\"type\":\"subscribe\",\"id\":{i},\"channel\":\"chat:room{i}\"}}\n")
                .as_bytes(),
        );
    }
    tcp.write_raw(&batch).await;
    let mut replies = 0;
    let mut refused = 0;
    for _ in 0..2000 {
        let frame = tcp.next_json().await;
        match frame["type"].as_str() {
            Some("reply") => replies += 1,
            Some("error") => {
                assert_eq!(frame["code"], "too_many_subscriptions");
                refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((replies, refused), (100, 1900));
    assert_eq!(server.metric("duplex_subscriptions").await, 100.0);
    drop(tcp);
    wait_for("subscriptions to be released", || async {
        (server.metric("duplex_subscriptions").await == 0.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_client_that_vanishes_leaves_the_server_and_others_unharmed() {
    let server = TestServer::start().await;
    let mut survivor = server.ws().await;
    survivor.subscribe("news:x", 1).await;
    for _ in 0..5 {
        let mut ws = server.ws().await;
        ws.subscribe("news:x", 1).await;
        let mut tcp = server.tcp().await;
        tcp.subscribe("news:x", 1).await;
        // Half a frame, then gone without a close.
        tcp.write_raw(b"{\"type\":\"publ").await;
        drop(ws);
        drop(tcp);
    }
    let mut publisher = server.tcp().await;
    for i in 0..100 {
        publisher.request(publish("news:x", json!(i)), i).await;
    }
    for i in 0..100 {
        assert_eq!(survivor.next_json().await["data"], i);
    }
    wait_for("vanished connections to be cleaned up", || async {
        (server.metric("duplex_subscriptions").await == 1.0).then_some(())
    })
    .await;
}

fn slow_consumer_server_namespaces() -> Namespaces {
    let mut tables = String::new();
    for (name, policy) in [
        ("slowdrop", "drop_oldest"),
        ("slowlatest", "latest"),
        ("slowkick", "disconnect"),
    ] {
        tables.push_str(&format!(
            "[{name}]\npublish = \"anyone\"\nslow_consumer = \"{policy}\"\nhistory_size = 0\nmax_message_size = \"1MiB\"\n"
        ));
    }
    duplex_testkit::namespaces(&tables)
}

/// Publishes `count` large messages while a WebSocket subscriber reads along and a raw TCP
/// subscriber reads nothing; returns what the stalled one then reads, and what the reading one
/// got (all of it, except under conflation).
async fn publish_past_a_stalled_reader(
    server: &TestServer,
    channel: &str,
    count: u64,
) -> (Vec<Value>, Vec<u64>) {
    let mut slow = server.tcp().await;
    slow.subscribe(channel, 1).await;
    let mut fast = server.ws().await;
    fast.subscribe(channel, 1).await;
    let (seen, mut fast_saw) = tokio::sync::mpsc::unbounded_channel();
    let fast_reader = tokio::spawn(async move {
        let mut offsets = Vec::new();
        while offsets.last() != Some(&count) {
            let message = fast.next_json().await;
            let offset = message["offset"].as_u64().expect("offset");
            offsets.push(offset);
            let _ = seen.send(offset);
        }
        offsets
    });

    // Each publication waits for the fast reader to have it, so that reader keeps up however
    // busy the machine is (its queue holds 8), while the stalled one falls behind for good.
    let mut publisher = server.ws().await;
    let padding = "x".repeat(64 * 1024);
    for i in 1..=count {
        let mut frame = publish(channel, json!({"i": i, "pad": padding}));
        frame["id"] = i.into();
        publisher.send_json(frame).await;
        assert_eq!(publisher.next_json().await["type"], "reply");
        tokio::time::timeout(EVENT_TIMEOUT, async {
            while let Some(offset) = fast_saw.recv().await {
                if offset >= i {
                    return;
                }
            }
        })
        .await
        .expect("the fast reader gets each publication");
    }
    let fast_offsets = fast_reader.await.expect("fast reader");

    let mut received = Vec::new();
    loop {
        match slow.next_frame().await {
            None => break,
            Some(TcpFrame::Text(text)) => {
                let value: Value = serde_json::from_slice(&text).expect("json");
                let done = value["type"] == "disconnect"
                    || (value["type"] == "message" && value["offset"] == count);
                received.push(value);
                if done {
                    break;
                }
            }
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    (received, fast_offsets)
}

/// Publishes `count` messages of 64 KiB on `channel` and waits for every reply.
async fn publish_large(publisher: &mut WsClient, channel: &str, count: u64) {
    let padding = "x".repeat(64 * 1024);
    for i in 0..count {
        let mut frame = publish(channel, json!({"i": i, "pad": padding}));
        frame["id"] = i.into();
        publisher.send_json(frame).await;
    }
    for _ in 0..count {
        assert_eq!(publisher.next_json().await["type"], "reply");
    }
}

fn message_offsets(received: &[Value]) -> Vec<u64> {
    received
        .iter()
        .filter(|v| v["type"] == "message")
        .map(|v| v["offset"].as_u64().expect("offset"))
        .collect()
}

fn slow_server_config(config: &mut duplex_server::Config) {
    config.sockets.queue_size = 8;
    config.sockets.max_frame = 1 << 20;
    config.namespaces = slow_consumer_server_namespaces();
}

#[tokio::test]
async fn drop_oldest_keeps_a_stalled_reader_on_the_newest_messages() {
    let server = TestServer::start_with(slow_server_config).await;
    let count = 400;
    let (received, fast) = publish_past_a_stalled_reader(&server, "slowdrop:feed", count).await;
    let offsets = message_offsets(&received);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(offsets.last(), Some(&count), "the newest message arrives");
    assert!(
        (offsets.len() as u64) < count,
        "older messages were dropped"
    );
    assert!(server.metric("duplex_dropped_total").await > 0.0);
    assert_eq!(
        fast,
        (1..=count).collect::<Vec<_>>(),
        "the reader kept up and got everything"
    );
}

#[tokio::test]
async fn latest_conflates_a_stalled_reader_to_the_newest_message() {
    let server = TestServer::start_with(slow_server_config).await;
    let count = 400;
    let (received, fast) = publish_past_a_stalled_reader(&server, "slowlatest:state", count).await;
    let offsets = message_offsets(&received);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(offsets.last(), Some(&count), "the newest state arrives");
    assert!((offsets.len() as u64) < count);
    assert!(server.metric("duplex_conflated_total").await > 0.0);
    assert!(fast.windows(2).all(|w| w[0] < w[1]) && fast.last() == Some(&count));
}

#[tokio::test]
async fn disconnect_policy_cuts_off_a_stalled_reader_with_slow_consumer() {
    let server = TestServer::start_with(slow_server_config).await;
    let count = 400;
    let (received, fast) = publish_past_a_stalled_reader(&server, "slowkick:orders", count).await;
    let offsets = message_offsets(&received);
    assert!(
        offsets.windows(2).all(|w| w[0] + 1 == w[1]),
        "no gaps before the cut"
    );
    assert!((offsets.len() as u64) < count, "the reader was cut off");
    assert_eq!(
        server
            .metric("duplex_slow_consumer_disconnects_total")
            .await,
        1.0
    );
    assert_eq!(
        fast,
        (1..=count).collect::<Vec<_>>(),
        "the reader kept up and got everything"
    );
    if let Some(last) = received.last().filter(|v| v["type"] == "disconnect") {
        assert_eq!(last["code"], "slow_consumer");
        assert_eq!(last["reconnect"], true);
    }
}

#[tokio::test]
async fn a_websocket_reader_that_stalls_is_cut_off_and_its_connection_ends() {
    let server = TestServer::start_with(slow_server_config).await;
    let channel = "slowkick:ws";
    let mut slow = server.ws().await;
    slow.subscribe(channel, 1).await;
    // From here `slow` reads nothing until the server has given up on it: its socket fills,
    // and the server's writer for it stays blocked while its queue overflows.
    let mut publisher = server.ws().await;
    let count = 400;
    publish_large(&mut publisher, channel, count).await;
    wait_for("the stalled reader to be cut off", || async {
        (server
            .metric("duplex_slow_consumer_disconnects_total")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    // Its connection ends although it never read: only the publisher is left.
    wait_for("the stalled connection to end", || async {
        (server
            .metric(r#"duplex_connections{transport="websocket"}"#)
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    // What it finally reads has no gap, and then the stream ends.
    let mut offsets = Vec::new();
    while let Some(event) = slow.next_event().await {
        match event {
            WsEvent::Json(value) if value["type"] == "message" => {
                offsets.push(value["offset"].as_u64().expect("offset"));
            }
            WsEvent::Close(_) => break,
            _ => {}
        }
    }
    assert!(
        offsets.windows(2).all(|w| w[0] + 1 == w[1]),
        "no gaps before the cut"
    );
    assert!((offsets.len() as u64) < count, "the reader was cut off");
    // The server is unharmed: the publisher still gets answers.
    publisher.send_json(json!({"type": "ping", "id": 1})).await;
    assert_eq!(publisher.next_json().await["type"], "pong");
}

#[tokio::test]
async fn a_tcp_client_that_keeps_talking_but_never_reads_is_closed_after_the_write_timeout() {
    let server = TestServer::start_with(|c| {
        slow_server_config(c);
        c.write_timeout = Duration::from_millis(500);
    })
    .await;
    let mut stalled = server.tcp().await;
    stalled.subscribe("slowdrop:talk", 1).await;
    // From here it only writes: `pong` frames (answered by nothing) keep it from being idle,
    // and its queue only drops the oldest, so only the write deadline can end it.
    let talking = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(50));
        loop {
            interval.tick().await;
            if !stalled.try_write_raw(b"{\"type\":\"pong\"}\n").await {
                break;
            }
        }
    });
    let mut publisher = server.ws().await;
    publish_large(&mut publisher, "slowdrop:talk", 300).await;
    wait_for("the stalled connection to be closed", || async {
        (server
            .metric(r#"duplex_connections{transport="tcp"}"#)
            .await
            == 0.0)
            .then_some(())
    })
    .await;
    tokio::time::timeout(EVENT_TIMEOUT, talking)
        .await
        .expect("its writes fail once the server closed it")
        .expect("no panic");
    // Counted, like every disconnect the server decides.
    assert_eq!(
        server
            .metric(r#"duplex_disconnects_total{code="write_timeout"}"#)
            .await,
        1.0
    );
    // The publisher is unharmed.
    publisher.send_json(json!({"type": "ping", "id": 1})).await;
    assert_eq!(publisher.next_json().await["type"], "pong");
}

#[tokio::test]
async fn idle_connections_are_disconnected_and_live_ones_are_pinged() {
    let server = TestServer::start_with(|c| {
        c.sockets.idle_timeout = Duration::from_millis(400);
        c.sockets.ping_interval = Duration::from_millis(100);
    })
    .await;
    let mut tcp = server.tcp().await;
    // The server's keepalive ping arrives first.
    let Some(TcpFrame::Text(text)) = tcp.next_frame().await else {
        panic!("expected a ping");
    };
    assert_eq!(&text[..], br#"{"type":"ping"}"#);
    let disconnect = tcp.next_json().await;
    assert_eq!(disconnect["code"], "idle_timeout");
    assert_eq!(disconnect["reconnect"], true);

    // A WebSocket client answers pings (tungstenite does so as it reads), so it stays.
    let mut ws = server.ws().await;
    for _ in 0..8 {
        assert_eq!(ws.next_event().await, Some(WsEvent::Ping));
    }
    ws.send_json(json!({"type": "ping", "id": 1})).await;
    assert_eq!(ws.next_json().await["type"], "pong");

    // A WebSocket peer that never answers is cut off: handshake by hand, then only read.
    let mut raw = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("connect");
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nhost: {}\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
        server.http_addr
    );
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    raw.write_all(handshake.as_bytes()).await.expect("write");
    let mut received = Vec::new();
    tokio::time::timeout(
        duplex_testkit::EVENT_TIMEOUT,
        raw.read_to_end(&mut received),
    )
    .await
    .expect("the server closes the silent peer")
    .expect("read");
    let received = String::from_utf8_lossy(&received);
    assert!(received.starts_with("HTTP/1.1 101"), "{received}");
    assert!(received.contains(r#""code":"idle_timeout""#), "{received}");
}

#[tokio::test]
async fn shutdown_tells_socket_clients_to_reconnect_elsewhere() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    ws.subscribe("chat:x", 1).await;
    let mut tcp = server.tcp().await;
    let stopping = tokio::spawn(server.stop());
    let disconnect = ws.next_json().await;
    assert_eq!(disconnect["code"], "shutdown");
    assert_eq!(disconnect["reconnect"], true);
    assert_eq!(ws.next_event().await, Some(WsEvent::Close(Some(1001))));
    assert_eq!(tcp.next_json().await["code"], "shutdown");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the server stops in time")
        .expect("no panic")
        .expect("clean stop");
}

#[tokio::test]
async fn get_ws_without_an_upgrade_is_a_problem() {
    let server = TestServer::start().await;
    let response = reqwest::get(server.url("/ws")).await.expect("request");
    assert_eq!(response.status(), reqwest::StatusCode::UPGRADE_REQUIRED);
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["code"], "upgrade_required");
}

#[tokio::test]
async fn a_websocket_handshake_that_is_not_one_says_what_is_missing() {
    let server = TestServer::start().await;
    let client = reqwest::Client::new();
    let handshake = |version: &'static str| {
        client
            .get(server.url("/ws"))
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", version)
    };
    let response = handshake("12")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), reqwest::StatusCode::UPGRADE_REQUIRED);
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["code"], "upgrade_required");
    assert!(body.to_string().contains("Sec-WebSocket-Version"), "{body}");
    let response = handshake("13").send().await.expect("request");
    assert_eq!(response.status(), reqwest::StatusCode::UPGRADE_REQUIRED);
    let body: Value = response.json().await.expect("problem json");
    assert!(body.to_string().contains("Sec-WebSocket-Key"), "{body}");
    // The accept value of RFC 6455's own example, for a real handshake.
    let response = handshake("13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), reqwest::StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        response.headers()["sec-websocket-accept"],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[tokio::test]
async fn a_frame_sent_with_the_handshake_is_read_after_the_upgrade() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server = TestServer::start().await;
    let mut raw = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("connect");
    // The request and a masked `ping` frame in one write: hyper reads both, and the frame must
    // reach the connection (it comes out of hyper's read buffer, not the socket).
    let mut bytes = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.http_addr
    )
    .into_bytes();
    let payload = br#"{"type":"ping","id":7}"#;
    let mask = [9, 8, 7, 6];
    bytes.extend([0x81, 0x80 | payload.len() as u8]);
    bytes.extend(mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    raw.write_all(&bytes).await.expect("write");
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let text = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let n = raw.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&seen).into_owned();
            if text.contains(r#""type":"pong""#) {
                return text;
            }
        }
    })
    .await
    .expect("a pong in time");
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.contains(r#""type":"connected""#), "{text}");
    assert!(text.contains(r#""id":7"#), "{text}");
}

#[tokio::test]
async fn a_connection_publishing_past_its_rate_limit_is_refused_and_kept() {
    let server = TestServer::start_with(|c| {
        c.sockets.publish_rate = 1;
        c.sockets.publish_burst = 5;
    })
    .await;
    let mut subscriber = server.ws().await;
    subscriber.subscribe("news:rl", 1).await;
    let mut tcp = server.tcp().await;
    assert_eq!(tcp.connected["limits"]["publish_burst"], 5);
    let mut batch = Vec::new();
    for i in 0..20u64 {
        batch.extend_from_slice(
            format!("{{\"type\":\"publish\",\"id\":{i},\"channel\":\"news:rl\",\"data\":{i}}}\n")
                .as_bytes(),
        );
    }
    tcp.write_raw(&batch).await;
    let (mut accepted, mut limited) = (Vec::new(), 0);
    for _ in 0..20 {
        let answer = tcp.next_json().await;
        match answer["type"].as_str() {
            Some("reply") => accepted.push(answer["id"].clone()),
            Some("error") => {
                assert_eq!(answer["code"], "rate_limited");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((5..=6).contains(&accepted.len()), "{accepted:?} accepted");
    assert_eq!(accepted.len() + limited, 20);
    assert_eq!(
        server.metric("duplex_rate_limited_total").await,
        limited as f64
    );
    // The others only ever saw the accepted ones, and the connection still works.
    for id in &accepted {
        assert_eq!(&subscriber.next_json().await["data"], id);
    }
    tcp.send_json(json!({"type": "ping", "id": 99})).await;
    assert_eq!(tcp.next_json().await["type"], "pong");
}

#[tokio::test]
async fn connections_over_the_limits_are_refused_and_their_slots_come_back() {
    let server = TestServer::start_with(|c| c.sockets.max_connections_per_ip = 2).await;
    let first = server.ws().await;
    let _second = server.tcp().await;

    // A third WebSocket is refused before the upgrade.
    let refused = tokio_tungstenite::connect_async(server.ws_url()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
        }
        other => panic!("expected a 503, got {other:?}"),
    }
    // A third raw TCP connection is told why and closed.
    let mut stream = tokio::net::TcpStream::connect(server.tcp_addr)
        .await
        .expect("connect");
    let mut line = String::new();
    use tokio::io::AsyncReadExt as _;
    tokio::time::timeout(
        duplex_testkit::EVENT_TIMEOUT,
        stream.read_to_string(&mut line),
    )
    .await
    .expect("answered")
    .expect("read");
    let disconnect: Value = serde_json::from_str(line.trim()).expect("json");
    assert_eq!(disconnect["code"], "too_many_connections");
    assert_eq!(disconnect["reconnect"], true);
    // So is an event stream.
    let response = reqwest::get(server.url("/api/channels/news:x/events"))
        .await
        .expect("request");
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let problem: Value = response.json().await.expect("json");
    assert_eq!(problem["code"], "too_many_connections");
    assert_eq!(server.metric("duplex_connection_refusals_total").await, 3.0);

    // When one leaves, its slot is free again.
    drop(first);
    let mut again = wait_for("a slot to come back", || async {
        match tokio_tungstenite::connect_async(server.ws_url()).await {
            Ok((socket, _)) => Some(socket),
            Err(_) => None,
        }
    })
    .await;
    use futures_util::StreamExt as _;
    let connected = again.next().await.expect("frame").expect("ok");
    assert!(connected.to_text().expect("text").contains("\"connected\""));
}
