//! The client against a real server: records, gapless streams across forced disconnects, the
//! server asking the client, and TLS.

use std::time::Duration;

use duplex_client::{
    Client, ConnectOptions, Connection, Event, ListOptions, Payload, RequestError, Status,
};
use duplex_testkit::{EVENT_TIMEOUT, TcpProxy, TestServer};
use futures_util::StreamExt as _;
use serde_json::{Value, json};

async fn next_event(subscription: &mut duplex_client::Subscription) -> Event {
    tokio::time::timeout(EVENT_TIMEOUT, subscription.next())
        .await
        .expect("an event in time")
        .expect("the subscription is open")
}

/// The next event that is not presence (namespaces with presence on announce joins and leaves).
async fn next_non_presence(subscription: &mut duplex_client::Subscription) -> Event {
    loop {
        match next_event(subscription).await {
            Event::Join(_) | Event::Leave(_) => continue,
            other => return other,
        }
    }
}

#[tokio::test]
async fn records_round_trip_with_typed_errors_and_paging() {
    let server = TestServer::start().await;
    let client = Client::new(&server.url("")).expect("client");
    let notes = client.records("notes");
    let created = notes
        .create(&json!({"title": "first", "tags": ["a"]}))
        .await
        .expect("create");
    assert_eq!(created.version, 1);
    assert_eq!(created.fields["title"], "first");
    let fetched = notes.get(&created.id).await.expect("get");
    assert_eq!(fetched, created);

    let replaced = notes
        .replace(&created.id, &json!({"title": "second"}), Some(1))
        .await
        .expect("replace at version 1");
    assert_eq!(replaced.version, 2);
    let stale = notes
        .replace(&created.id, &json!({"title": "lost update"}), Some(1))
        .await
        .expect_err("version 1 is gone");
    assert_eq!(stale.code(), Some("precondition_failed"));
    let patched = notes
        .patch(&created.id, &json!({"title": null, "done": true}), None)
        .await
        .expect("patch");
    assert_eq!(patched.fields.get("title"), None);
    assert_eq!(patched.fields["done"], true);

    for i in 0..6 {
        notes.create(&json!({"i": i})).await.expect("create");
    }
    let options = ListOptions {
        limit: Some(2),
        sort: Some("created".into()),
        ..ListOptions::default()
    };
    let first_page = notes.list(&options).await.expect("list");
    assert_eq!(first_page.items.len(), 2);
    assert!(first_page.next.is_some());
    let all: Vec<_> = notes
        .stream(options)
        .map(|r| r.expect("page"))
        .collect()
        .await;
    assert_eq!(all.len(), 7, "every record once, across four pages");
    assert_eq!(all[0].id, created.id);

    notes.delete(&created.id, Some(3)).await.expect("delete");
    let gone = notes.get(&created.id).await.expect_err("deleted");
    assert_eq!(gone.code(), Some("not_found"));
    let bad = client
        .records("Not Valid")
        .list(&ListOptions::default())
        .await;
    assert_eq!(bad.expect_err("invalid").code(), Some("invalid_collection"));

    let down = Client::new("http://127.0.0.1:1").expect("client");
    let error = down
        .records("notes")
        .get("x")
        .await
        .expect_err("nothing listens");
    assert!(
        matches!(error, duplex_client::Error::Unreachable(_)),
        "{error:?}"
    );
}

/// A server whose `feed` namespace keeps a long history and whose publishers are not limited.
async fn feed_server() -> TestServer {
    TestServer::start_with(|c| {
        c.namespaces = duplex_testkit::namespaces(
            "[feed]\npublish = \"anyone\"\nhistory_size = 100000\nhistory_ttl = \"10m\"\n",
        );
        c.sockets.publish_rate = 1_000_000;
        c.sockets.publish_burst = 1_000_000;
    })
    .await
}

/// Publishes `count` messages as fast as the server answers, while `proxy` is cut every
/// `cut_every` messages; the subscriber behind the proxy must see 1..=count exactly once, in
/// order.
async fn gapless_across_cuts(scheme: &str) {
    let server = feed_server().await;
    let target = if scheme == "tcp" {
        server.tcp_addr
    } else {
        server.http_addr
    };
    let proxy = TcpProxy::start(target).await;
    let url = match scheme {
        "tcp" => format!("tcp://{}", proxy.addr),
        _ => format!("ws://{}/ws", proxy.addr),
    };
    let subscriber = Connection::connect(
        ConnectOptions::new(&url).backoff(Duration::from_millis(10), Duration::from_millis(100)),
    )
    .await
    .expect("connect through the proxy");
    let mut feed = subscriber.subscribe("feed:live").await.expect("subscribe");

    let publisher = Connection::connect(ConnectOptions::new(&server.ws_url()))
        .await
        .expect("publisher");
    const COUNT: u64 = 3000;
    let publishing = tokio::spawn(async move {
        for i in 1..=COUNT {
            let published = publisher
                .publish("feed:live", &json!({"i": i}))
                .await
                .expect("publish");
            assert_eq!(published.offset, i);
            if i % 40 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });

    let mut seen = Vec::new();
    let mut cuts = 0;
    while seen.last() != Some(&COUNT) {
        match next_event(&mut feed).await {
            Event::Message(message) => {
                assert_eq!(message.data, Payload::Json(json!({"i": message.offset})));
                seen.push(message.offset);
                if message.offset % 700 == 0 {
                    proxy.cut();
                    cuts += 1;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    publishing.await.expect("publisher");
    assert_eq!(
        seen,
        (1..=COUNT).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    assert!(cuts >= 4);
    // Not one reconnection per cut: a cut that lands while the client is between connections
    // (it may still be reading what it had buffered) cuts nothing (seen once in CI).
    assert!(
        proxy.forwarded() > 1,
        "the client reconnected after the cuts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_subscription_has_no_gaps_across_forced_disconnects() {
    gapless_across_cuts("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_tcp_subscription_has_no_gaps_across_forced_disconnects() {
    gapless_across_cuts("tcp").await;
}

#[tokio::test]
async fn lost_history_is_an_explicit_gap_not_a_silent_one() {
    let server = TestServer::start().await;
    let proxy = TcpProxy::start(server.http_addr).await;
    let subscriber = Connection::connect(
        ConnectOptions::new(&format!("ws://{}/ws", proxy.addr))
            .backoff(Duration::from_millis(10), Duration::from_millis(50)),
    )
    .await
    .expect("connect");
    // `stream` keeps no history: what is published while the client is away is gone. A second
    // viewer keeps the channel (and its epoch) alive meanwhile.
    let mut cam = subscriber.subscribe("stream:cam").await.expect("subscribe");
    let viewer = Connection::connect(ConnectOptions::new(&server.ws_url()))
        .await
        .expect("viewer");
    let _watching = viewer.subscribe("stream:cam").await.expect("subscribe");
    let client = Client::new(&server.url("")).expect("client");
    client
        .publish("stream:cam", &json!(1))
        .await
        .expect("publish");
    assert!(matches!(next_non_presence(&mut cam).await, Event::Message(m) if m.offset == 1));

    proxy.set_down(true);
    proxy.cut();
    let mut status = subscriber.status();
    tokio::time::timeout(
        EVENT_TIMEOUT,
        status.wait_for(|s| matches!(s, Status::Reconnecting(n) if *n >= 2)),
    )
    .await
    .expect("reconnecting in time")
    .expect("status");
    client
        .publish("stream:cam", &json!(2))
        .await
        .expect("publish");
    client
        .publish("stream:cam", &json!(3))
        .await
        .expect("publish");
    proxy.set_down(false);

    match next_non_presence(&mut cam).await {
        Event::Gap {
            reason,
            last_seen,
            resumed_at,
            ..
        } => {
            assert_eq!(reason, "history_trimmed");
            assert_eq!((last_seen, resumed_at), (1, 3));
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    client
        .publish("stream:cam", &json!(4))
        .await
        .expect("publish");
    assert!(matches!(next_non_presence(&mut cam).await, Event::Message(m) if m.offset == 4));
}

/// A restart of the server is, for a subscription on a channel whose history is kept in the
/// store (`chat`), just a reconnect: the same epoch, what was published while the server was
/// away and after it came back, nothing twice, no gap.
#[tokio::test]
async fn a_server_restart_is_just_a_reconnect_for_store_history() {
    let server = TestServer::start().await;
    let proxy = TcpProxy::start(server.http_addr).await;
    let subscriber = Connection::connect(
        ConnectOptions::new(&format!("ws://{}/ws", proxy.addr))
            .backoff(Duration::from_millis(10), Duration::from_millis(50)),
    )
    .await
    .expect("connect");
    let mut room = subscriber
        .subscribe("chat:restart")
        .await
        .expect("subscribe");
    let epoch = room.subscribed().epoch.clone();
    let client = Client::new(&server.url("")).expect("client");
    for i in 1..=3 {
        client
            .publish("chat:restart", &json!(i))
            .await
            .expect("publish");
    }
    for i in 1..=3u64 {
        match next_non_presence(&mut room).await {
            Event::Message(m) => assert_eq!((m.offset, m.data), (i, Payload::Json(json!(i)))),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    // Down, published to while the client cannot reach it, restarted on a new port.
    proxy.set_down(true);
    proxy.cut();
    client
        .publish("chat:restart", &json!(4))
        .await
        .expect("publish");
    let server = server.restart().await;
    proxy.retarget(server.http_addr);
    let client = Client::new(&server.url("")).expect("client");
    client
        .publish("chat:restart", &json!(5))
        .await
        .expect("publish");
    proxy.set_down(false);

    for i in 4..=6u64 {
        if i == 6 {
            client
                .publish("chat:restart", &json!(6))
                .await
                .expect("publish");
        }
        match next_non_presence(&mut room).await {
            Event::Message(m) => {
                assert_eq!((m.offset, m.data), (i, Payload::Json(json!(i))));
                assert_eq!(m.epoch, epoch, "the same epoch");
            }
            other => panic!("expected message {i}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_server_asks_and_the_handler_answers() {
    let server = TestServer::start().await;
    let connection = Connection::connect(ConnectOptions::new(&server.ws_url()).on_request(
        |data: Value| async move {
            match data["question"].as_str() {
                Some("ready?") => Ok(json!({"ready": true})),
                _ => Err(RequestError {
                    code: "unknown_question".into(),
                    message: "ask me if I am ready".into(),
                }),
            }
        },
    ))
    .await
    .expect("connect");
    let id = connection.client_id().expect("connected");
    let client = Client::new(&server.url("")).expect("client");
    let answer = client
        .request_connection(&id, &json!({"question": "ready?"}), Duration::from_secs(5))
        .await
        .expect("answered");
    assert_eq!(answer, json!({"ready": true}));
    let refused = client
        .request_connection(&id, &json!({"question": "why?"}), Duration::from_secs(5))
        .await
        .expect_err("declined");
    assert_eq!(refused.code(), Some("client_error"));
    let unknown = client
        .request_connection("0000000000000000", &json!({}), Duration::from_secs(1))
        .await
        .expect_err("no such connection");
    assert_eq!(unknown.code(), Some("not_found"));
}

#[tokio::test]
async fn a_disconnect_that_says_do_not_reconnect_is_honoured() {
    let server = TestServer::start().await;
    let connection = Connection::connect(ConnectOptions::new(&server.ws_url()))
        .await
        .expect("connect");
    let mut lobby = connection.subscribe("chat:lobby").await.expect("subscribe");
    // Twenty bad requests in a row: the server closes with too_many_errors, reconnect: false.
    for _ in 0..20 {
        let answer = connection.request(json!({"type": "launch"})).await;
        if let Err(error) = answer {
            assert!(
                matches!(error.code(), Some("unknown_type"))
                    || matches!(
                        error,
                        duplex_client::Error::ConnectionLost | duplex_client::Error::Closed(_)
                    ),
                "{error:?}"
            );
        }
    }
    assert_eq!(
        next_event(&mut lobby).await,
        Event::Ended {
            code: "too_many_errors".into()
        }
    );
    assert_eq!(lobby.next().await, None);
    let mut status = connection.status();
    let closed = tokio::time::timeout(
        EVENT_TIMEOUT,
        status.wait_for(|s| matches!(s, Status::Closed(_))),
    )
    .await
    .expect("closed in time")
    .expect("status")
    .clone();
    assert_eq!(closed, Status::Closed(Some("too_many_errors".into())));
    let error = connection
        .publish("chat:lobby", &json!(1))
        .await
        .expect_err("closed for good");
    assert!(
        matches!(error, duplex_client::Error::Closed(_)),
        "{error:?}"
    );
}

#[tokio::test]
async fn binary_publications_travel_as_bytes_on_both_transports() {
    let server = TestServer::start().await;
    let ws = Connection::connect(ConnectOptions::new(&server.ws_url()))
        .await
        .expect("ws");
    let tcp = Connection::connect(ConnectOptions::new(&format!("tcp://{}", server.tcp_addr)))
        .await
        .expect("tcp");
    let mut on_ws = ws.subscribe("stream:bytes").await.expect("subscribe");
    let mut on_tcp = tcp.subscribe("stream:bytes").await.expect("subscribe");
    let payload = bytes::Bytes::from_static(&[0, 1, 2, 255, b'\n', 0]);
    tcp.publish_bytes("stream:bytes", payload.clone())
        .await
        .expect("publish over tcp");
    for subscription in [&mut on_ws, &mut on_tcp] {
        match next_non_presence(subscription).await {
            Event::Message(message) => assert_eq!(message.data, Payload::Binary(payload.clone())),
            other => panic!("unexpected {other:?}"),
        }
    }
    let refused = ws
        .publish_bytes("chat:lobby", payload)
        .await
        .expect_err("chat takes no bytes");
    assert_eq!(refused.code(), Some("binary_not_allowed"));
}

#[tokio::test]
async fn https_wss_and_tcps_work_with_a_trusted_certificate() {
    let certificate = duplex_testkit::TestCertificate::localhost();
    let server = TestServer::start_with(|c| c.tls = certificate.config()).await;
    let pem = certificate.pem.clone().into_bytes();

    let https = format!("https://localhost:{}", server.http_addr.port());
    let client = Client::builder(&https)
        .ca_cert_pem(pem.clone())
        .build()
        .expect("client");
    let note = client
        .records("notes")
        .create(&json!({"secure": true}))
        .await
        .expect("create over https");
    let connection = client.connect().await.expect("wss");
    let mut events = connection
        .subscribe("records:notes")
        .await
        .expect("subscribe");
    client
        .records("notes")
        .patch(&note.id, &json!({"seen": true}), Some(1))
        .await
        .expect("patch");
    assert!(matches!(next_event(&mut events).await, Event::Message(m) if m.offset >= 1));

    let tcps = Connection::connect(
        ConnectOptions::new(&format!("tcps://localhost:{}", server.tcp_addr.port()))
            .ca_cert_pem(pem),
    )
    .await
    .expect("tcps");
    let published = tcps
        .publish("chat:tls", &json!("over tls"))
        .await
        .expect("publish over tcps");
    assert_eq!(published.offset, 1);

    // Without trusting the certificate, the handshake is refused.
    let untrusted = Client::new(&https).expect("client");
    let error = untrusted
        .records("notes")
        .get(&note.id)
        .await
        .expect_err("untrusted certificate");
    assert!(
        matches!(error, duplex_client::Error::Unreachable(_)),
        "{error:?}"
    );
}

/// `openssl req -x509` marks its certificate a CA, which WebPKI refuses as a server's own: the
/// client accepts it when it is exactly the certificate given (pinned), and no other.
#[tokio::test]
async fn a_self_signed_certificate_made_by_openssl_is_accepted_when_given() {
    let certificate = duplex_testkit::TestCertificate::openssl_localhost();
    let server = TestServer::start_with(|c| c.tls = certificate.config()).await;
    for host in ["localhost", "127.0.0.1"] {
        let https = format!("https://{host}:{}", server.http_addr.port());
        let client = Client::builder(&https)
            .ca_cert_pem(certificate.pem.clone().into_bytes())
            .build()
            .expect("client");
        client
            .records("notes")
            .create(&json!({"over": "pinned https"}))
            .await
            .expect("create over https");
        let connection = client.connect().await.expect("wss");
        connection
            .subscribe("chat:pinned")
            .await
            .expect("subscribe over wss");
    }
    let tcps = Connection::connect(
        ConnectOptions::new(&format!("tcps://localhost:{}", server.tcp_addr.port()))
            .ca_cert_pem(certificate.pem.clone().into_bytes()),
    )
    .await
    .expect("tcps");
    tcps.publish("chat:pinned", &json!(1))
        .await
        .expect("publish over tcps");

    // Another certificate made the same way is not the server's: refused.
    let other = duplex_testkit::TestCertificate::openssl_localhost();
    let client = Client::builder(&format!("https://localhost:{}", server.http_addr.port()))
        .ca_cert_pem(other.pem.clone().into_bytes())
        .build()
        .expect("client");
    let error = client
        .records("notes")
        .create(&json!({}))
        .await
        .expect_err("not the server's certificate");
    assert!(
        matches!(error, duplex_client::Error::Unreachable(_)),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_a_buffer_behind_catches_up_without_gaps() {
    let server = feed_server().await;
    let connection = Connection::connect(ConnectOptions::new(&server.ws_url()))
        .await
        .expect("connect");
    let mut feed = connection.subscribe("feed:burst").await.expect("subscribe");
    // Publish on the same connection without reading: far more than the subscription buffers.
    // The connection keeps answering (it never waits on the reader) ...
    const COUNT: u64 = 5000;
    for i in 1..=COUNT {
        connection
            .publish("feed:burst", &json!(i))
            .await
            .expect("publish while the reader sleeps");
    }
    // ... and the reader, once it reads, gets every publication once, in order.
    let mut seen = Vec::new();
    while seen.last() != Some(&COUNT) {
        match next_event(&mut feed).await {
            Event::Message(message) => seen.push(message.offset),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, (1..=COUNT).collect::<Vec<_>>());
}

#[tokio::test]
async fn history_and_presence_over_http_and_the_socket() {
    let server = TestServer::start().await;
    let client = Client::new(&server.url("")).expect("client");
    let connection =
        Connection::connect(ConnectOptions::new(&server.ws_url()).meta(json!({"name": "ana"})))
            .await
            .expect("connect");
    let _room = connection.subscribe("chat:room").await.expect("subscribe");
    let mut first = None;
    for i in 1..=3 {
        let published = connection
            .publish("chat:room", &json!({"i": i}))
            .await
            .expect("publish");
        first.get_or_insert(published);
    }
    let first = first.expect("published");

    let history = client
        .history("chat:room", Some((1, &first.epoch)), None)
        .await
        .expect("history over http");
    assert_eq!(history.recovered, Some(true));
    let offsets: Vec<u64> = history
        .publications
        .iter()
        .map(|p| p["offset"].as_u64().expect("offset"))
        .collect();
    assert_eq!(offsets, [2, 3]);
    let over_socket = connection
        .history("chat:room", None, Some(2))
        .await
        .expect("history over the socket");
    assert_eq!(
        over_socket["publications"].as_array().map(Vec::len),
        Some(2)
    );

    let present = client
        .presence("chat:room")
        .await
        .expect("presence over http");
    assert_eq!(present.len(), 1);
    assert_eq!(present[0].meta, Some(json!({"name": "ana"})));
    let same = connection
        .presence("chat:room")
        .await
        .expect("presence over the socket");
    assert_eq!(same, present);
    let refused = client
        .presence("news:none")
        .await
        .expect_err("no presence in the default namespace");
    assert_eq!(refused.code(), Some("presence_disabled"));
}

#[tokio::test]
async fn requests_made_while_reconnecting_wait_for_the_next_connection() {
    let server = TestServer::start().await;
    let proxy = TcpProxy::start(server.http_addr).await;
    let connection = Connection::connect(
        ConnectOptions::new(&format!("ws://{}/ws", proxy.addr))
            .backoff(Duration::from_millis(20), Duration::from_millis(50)),
    )
    .await
    .expect("connect");
    proxy.set_down(true);
    proxy.cut();
    let mut status = connection.status();
    tokio::time::timeout(
        EVENT_TIMEOUT,
        status.wait_for(|s| matches!(s, Status::Reconnecting(n) if *n >= 2)),
    )
    .await
    .expect("reconnecting in time")
    .expect("status");
    let waiting = {
        let connection = connection.clone();
        tokio::spawn(async move { connection.publish("chat:later", &json!("queued")).await })
    };
    proxy.set_down(false);
    let published = tokio::time::timeout(EVENT_TIMEOUT, waiting)
        .await
        .expect("published in time")
        .expect("task")
        .expect("published on the new connection");
    assert_eq!(published.offset, 1);

    // close() while reconnecting ends the connection for good.
    proxy.set_down(true);
    proxy.cut();
    tokio::time::timeout(
        EVENT_TIMEOUT,
        status.wait_for(|s| matches!(s, Status::Reconnecting(_))),
    )
    .await
    .expect("reconnecting in time")
    .expect("status");
    tokio::time::timeout(EVENT_TIMEOUT, connection.clone().close())
        .await
        .expect("closed in time");
    let error = connection
        .publish("chat:later", &json!(1))
        .await
        .expect_err("closed");
    assert!(
        matches!(error, duplex_client::Error::Closed(_)),
        "{error:?}"
    );
}
