//! Hooks: a real HTTP backend (an axum server in the test) decides who connects, subscribes and
//! publishes, rewrites publications, answers `rpc`, and the server keeps each connection's
//! frames in order while it waits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use duplex_server::hooks::{Hook, HooksConfig, OnError};
use duplex_testkit::{TestServer, hs256_token, namespaces};
use duplex_testkit::{WsClient, WsEvent, wait_for};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// One hook call the backend received.
#[derive(Debug, Clone)]
struct Seen {
    signature: Option<String>,
    body: Bytes,
    json: Value,
}

/// What the backend does with a call.
enum Reaction {
    Json(Value),
    /// Waits for the test to release it, then answers.
    Held(Arc<Notify>, Value),
    Sleep(Duration, Value),
    Status(u16),
}

type Respond = Arc<dyn Fn(&Value) -> Reaction + Send + Sync>;

#[derive(Clone)]
struct BackendState {
    seen: Arc<Mutex<Vec<Seen>>>,
    respond: Respond,
}

/// The application's backend.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    async fn start(respond: impl Fn(&Value) -> Reaction + Send + Sync + 'static) -> Backend {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = BackendState {
            seen: seen.clone(),
            respond: Arc::new(respond),
        };
        let app = axum::Router::new()
            .route("/hooks", axum::routing::post(hook))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the backend");
        let addr = listener.local_addr().expect("backend address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Backend { addr, seen }
    }

    fn hooks(&self, events: &[Hook]) -> HooksConfig {
        HooksConfig {
            url: format!("http://{}/hooks", self.addr),
            events: events.to_vec(),
            timeout: Some("2s".into()),
            on_error: OnError::Deny,
            secret: None,
            headers: Vec::new(),
            cookies: Vec::new(),
        }
    }

    /// The calls of one hook so far.
    fn calls(&self, hook: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .iter()
            .filter(|s| s.json["hook"] == hook)
            .cloned()
            .collect()
    }
}

async fn hook(State(state): State<BackendState>, headers: HeaderMap, body: Bytes) -> Response {
    let json: Value = serde_json::from_slice(&body).expect("duplex POSTs JSON");
    state.seen.lock().push(Seen {
        signature: headers
            .get("duplex-signature")
            .map(|v| v.to_str().expect("ASCII").to_owned()),
        body: body.clone(),
        json: json.clone(),
    });
    match (state.respond)(&json) {
        Reaction::Json(answer) => axum::Json(answer).into_response(),
        Reaction::Held(release, answer) => {
            release.notified().await;
            axum::Json(answer).into_response()
        }
        Reaction::Sleep(time, answer) => {
            tokio::time::sleep(time).await;
            axum::Json(answer).into_response()
        }
        Reaction::Status(code) => StatusCode::from_u16(code)
            .expect("a status")
            .into_response(),
    }
}

async fn server_with(hooks: HooksConfig, tables: &str) -> TestServer {
    let settings = hooks.settings().expect("valid hooks");
    let tables = tables.to_owned();
    TestServer::start_with(move |config| {
        config.hooks = Some(settings);
        config.namespaces = namespaces(&tables);
        config.jwt_secret = Some("a-secret-of-sixteen-chars".into());
    })
    .await
}

/// Sends a request and returns its answer, skipping other frames.
async fn ask(client: &mut WsClient, mut frame: Value, id: u64) -> Value {
    frame["id"] = id.into();
    client.request(frame, id).await
}

#[tokio::test]
async fn the_backend_decides_who_connects_with_the_user_grants_and_meta_it_sets() {
    let backend = Backend::start(|call| match call["hook"].as_str() {
        Some("connect") if call["cookies"]["session"] == "good" => Reaction::Json(json!({
            "allow": true,
            "user": "ana",
            "channels": ["secret:ana"],
            "meta": {"name": "Ana"},
        })),
        Some("connect") => Reaction::Json(json!({
            "allow": false, "code": "bad_session", "message": "log in first",
        })),
        Some("subscribe") if call["channel"] == "chat:closed" => Reaction::Json(json!({
            "allow": false, "code": "room_closed", "message": "this room is closed",
        })),
        Some("subscribe") => Reaction::Json(json!({"allow": true, "meta": {"role": "host"}})),
        _ => Reaction::Status(500),
    })
    .await;
    let mut hooks = backend.hooks(&[Hook::Connect, Hook::Subscribe]);
    hooks.secret = Some("hook-secret".into());
    hooks.cookies = vec!["session".into()];
    hooks.headers = vec!["X-App".into()];
    let server = server_with(hooks, "[secret]\nsubscribe = \"token_channels\"").await;

    // Without a session: nothing before connect, and connect is refused with the backend's code.
    let mut stranger = server.ws().await;
    assert_eq!(stranger.connected["connect_required"], true);
    let early = ask(
        &mut stranger,
        json!({"type": "subscribe", "channel": "chat:room"}),
        1,
    )
    .await;
    assert_eq!(early["code"], "not_connected", "{early}");
    let refused = ask(&mut stranger, json!({"type": "connect"}), 2).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "bad_session");
    assert_eq!(refused["message"], "log in first");
    let still = ask(
        &mut stranger,
        json!({"type": "subscribe", "channel": "chat:room"}),
        3,
    )
    .await;
    assert_eq!(still["code"], "not_connected", "{still}");

    // With the session cookie: the backend names the user, the grants and the meta.
    let mut ana = WsClient::connect_with_headers(
        &server.ws_url(),
        &[("Cookie", "other=1; session=good"), ("X-App", "web")],
    )
    .await;
    let connected = ask(
        &mut ana,
        json!({"type": "connect", "meta": {"name": "x"}}),
        1,
    )
    .await;
    assert_eq!(connected["type"], "reply", "{connected}");
    assert_eq!(connected["result"]["user"], "ana");
    let asked = backend
        .calls("connect")
        .into_iter()
        .find(|c| c.json["cookies"]["session"] == "good")
        .expect("the backend was asked");
    assert_eq!(asked.json["transport"], "websocket");
    assert_eq!(asked.json["headers"], json!({"x-app": "web"}));
    assert_eq!(asked.json["cookies"], json!({"session": "good"}));
    assert_eq!(asked.json["meta"], json!({"name": "x"}));
    assert_eq!(asked.json["client"], connected["result"]["client"]);
    assert!(
        asked.json["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    );

    // The grants work like a token's: secret:ana is listed, secret:bob is not (and the
    // backend is not asked about what the namespace's rule already refuses).
    let own = try_subscribe(&mut ana, "secret:ana", 2).await;
    assert_eq!(own["type"], "reply", "{own}");
    let other = try_subscribe(&mut ana, "secret:bob", 3).await;
    assert_eq!(other["code"], "permission_denied", "{other}");
    assert!(
        backend
            .calls("subscribe")
            .iter()
            .all(|c| c.json["channel"] != "secret:bob")
    );
    let closed = try_subscribe(&mut ana, "chat:closed", 4).await;
    assert_eq!(closed["code"], "room_closed", "{closed}");
    let room = try_subscribe(&mut ana, "chat:room", 5).await;
    assert_eq!(room["type"], "reply", "{room}");
    let subscribed = backend
        .calls("subscribe")
        .into_iter()
        .find(|c| c.json["channel"] == "chat:room")
        .expect("asked about chat:room");
    assert_eq!(subscribed.json["user"], "ana");

    // Presence shows the subscribe hook's meta in that channel.
    let present = ask(
        &mut ana,
        json!({"type": "presence", "channel": "chat:room"}),
        6,
    )
    .await;
    assert_eq!(
        present["result"]["clients"][0]["meta"],
        json!({"role": "host"}),
        "{present}"
    );

    // Every call is signed: sha256=HMAC of the body under the secret.
    let seen = backend.seen.lock().clone();
    assert!(seen.len() >= 5);
    for call in seen {
        assert_eq!(
            call.signature.as_deref(),
            Some(duplex_server::hooks::signature(b"hook-secret", &call.body).as_str()),
        );
    }
}

#[tokio::test]
async fn a_websocket_opened_with_a_token_is_asked_about_and_closed_when_refused() {
    let backend = Backend::start(|call| {
        Reaction::Json(json!({"allow": call["user"] == "ana", "code": "not_today"}))
    })
    .await;
    let server = server_with(backend.hooks(&[Hook::Connect]), "").await;
    let token = |user: &str| {
        hs256_token(
            "a-secret-of-sixteen-chars",
            &json!({"sub": user, "exp": 4_000_000_000u64}),
        )
    };
    let mut ana = WsClient::connect(&format!("{}?token={}", server.ws_url(), token("ana"))).await;
    let room = try_subscribe(&mut ana, "chat:room", 1).await;
    assert_eq!(room["type"], "reply", "{room}");

    let mut bob = WsClient::connect(&format!("{}?token={}", server.ws_url(), token("bob"))).await;
    let refused = bob.next_json().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "not_today");
    let goodbye = bob.next_json().await;
    assert_eq!(goodbye["type"], "disconnect");
    assert_eq!(goodbye["code"], "connect_refused");
    assert_eq!(goodbye["reconnect"], false);
    loop {
        match bob.next_event().await {
            Some(WsEvent::Close(code)) => {
                assert_eq!(code, Some(4008));
                break;
            }
            None => break,
            Some(_) => continue,
        }
    }
}

#[tokio::test]
async fn the_backend_rewrites_or_refuses_publications_and_namespaces_narrow_the_hooks() {
    let backend = Backend::start(|call| {
        let data = &call["data"];
        if call["encoding"] == "base64" {
            // "bytes" → "BYTES"
            assert_eq!(data, "Ynl0ZXM=");
            return Reaction::Json(json!({"allow": true, "data": "QllURVM="}));
        }
        match data["text"].as_str() {
            Some("spam") => Reaction::Json(json!({
                "allow": false, "code": "spam", "message": "not here",
            })),
            Some(text) => Reaction::Json(json!({
                "allow": true,
                "data": {"text": text.replace("darn", "****"), "checked": true},
            })),
            None => Reaction::Json(json!({"allow": true})),
        }
    })
    .await;
    let server = server_with(
        backend.hooks(&[Hook::Publish, Hook::Subscribe]),
        "[raw]\npublish = \"anyone\"\nhooks = [\"subscribe\"]\n[silent]\npublish = \"anyone\"\nhooks = []",
    )
    .await;
    let mut reader = server.ws().await;
    for (id, channel) in [(1, "chat:room"), (2, "raw:room"), (3, "stream:cam")] {
        let reply = try_subscribe(&mut reader, channel, id).await;
        assert_eq!(reply["type"], "reply", "{reply}");
    }
    let mut writer = server.ws().await;

    let rewritten = ask(
        &mut writer,
        json!({"type": "publish", "channel": "chat:room", "data": {"text": "darn it"}}),
        1,
    )
    .await;
    assert_eq!(rewritten["type"], "reply", "{rewritten}");
    let message = reader.next_json().await;
    assert_eq!(message["channel"], "chat:room");
    assert_eq!(message["data"], json!({"text": "**** it", "checked": true}));
    let call = backend.calls("publish").pop().expect("asked");
    assert_eq!(call.json["channel"], "chat:room");
    assert_eq!(call.json["data"], json!({"text": "darn it"}));
    assert_eq!(call.json["client"], writer.connected["client"]);

    let spam = ask(
        &mut writer,
        json!({"type": "publish", "channel": "chat:room", "data": {"text": "spam"}}),
        2,
    )
    .await;
    assert_eq!(spam["code"], "spam", "{spam}");
    assert_eq!(spam["message"], "not here");

    // Binary publications go to the backend in base64 and may be replaced the same way.
    let frame = duplex_proto::binary::encode_publish(3, "stream:cam", b"bytes");
    writer
        .send(tokio_tungstenite::tungstenite::Message::binary(frame))
        .await;
    let reply = wait_for_answer(&mut writer, 3).await;
    assert_eq!(reply["type"], "reply", "{reply}");
    let delivered = loop {
        match reader.next_event().await {
            Some(WsEvent::Binary(bytes)) => break bytes,
            Some(_) => continue,
            None => panic!("the reader closed"),
        }
    };
    let message = duplex_proto::binary::decode_message(&delivered).expect("a message frame");
    assert_eq!(message.payload, b"BYTES");

    // raw: only subscribe is hooked there, so the publication passes untouched and unasked.
    let asked_before = backend.calls("publish").len();
    let plain = ask(
        &mut writer,
        json!({"type": "publish", "channel": "raw:room", "data": {"text": "darn"}}),
        4,
    )
    .await;
    assert_eq!(plain["type"], "reply", "{plain}");
    let message = reader.next_json().await;
    assert_eq!(message["channel"], "raw:room");
    assert_eq!(message["data"], json!({"text": "darn"}));
    assert_eq!(backend.calls("publish").len(), asked_before);
    assert!(
        backend
            .calls("subscribe")
            .iter()
            .any(|c| c.json["channel"] == "raw:room")
    );

    // silent: no hook at all.
    let quiet = ask(
        &mut writer,
        json!({"type": "publish", "channel": "silent:x", "data": {"text": "spam"}}),
        5,
    )
    .await;
    assert_eq!(quiet["type"], "reply", "{quiet}");
    assert_eq!(backend.calls("publish").len(), asked_before);
}

/// Subscribes, returning the reply or the error.
async fn try_subscribe(client: &mut WsClient, channel: &str, id: u64) -> Value {
    ask(client, json!({"type": "subscribe", "channel": channel}), id).await
}

/// The reply or error with `id`, skipping other frames.
async fn wait_for_answer(client: &mut WsClient, id: u64) -> Value {
    loop {
        let frame = client.next_json().await;
        if frame["id"] == id {
            return frame;
        }
    }
}

#[tokio::test]
async fn rpc_calls_reach_the_backend_and_its_results_and_errors_come_back() {
    let backend = Backend::start(|call| match call["method"].as_str() {
        Some("add") => {
            let sum =
                call["data"]["a"].as_i64().unwrap_or(0) + call["data"]["b"].as_i64().unwrap_or(0);
            Reaction::Json(json!({"result": {"sum": sum}}))
        }
        Some("fail") => Reaction::Json(json!({
            "error": {"code": "no_such_item", "message": "nothing there"},
        })),
        Some("odd") => Reaction::Json(json!({"error": {"code": "Not A Code"}})),
        Some("refuse") => Reaction::Json(json!({"allow": false})),
        _ => Reaction::Status(503),
    })
    .await;
    let server = server_with(backend.hooks(&[Hook::Rpc]), "").await;
    let mut client = server.ws().await;
    let sum = ask(
        &mut client,
        json!({"type": "rpc", "method": "add", "data": {"a": 2, "b": 40}}),
        1,
    )
    .await;
    assert_eq!(sum["type"], "reply", "{sum}");
    assert_eq!(sum["result"], json!({"sum": 42}));
    let call = backend.calls("rpc").pop().expect("asked");
    assert_eq!(call.json["method"], "add");
    assert_eq!(call.json["client"], client.connected["client"]);

    let failed = ask(&mut client, json!({"type": "rpc", "method": "fail"}), 2).await;
    assert_eq!(
        (failed["code"].as_str(), failed["message"].as_str()),
        (Some("no_such_item"), Some("nothing there"))
    );
    let odd = ask(&mut client, json!({"type": "rpc", "method": "odd"}), 3).await;
    assert_eq!(odd["code"], "rpc_failed", "{odd}");
    let refused = ask(&mut client, json!({"type": "rpc", "method": "refuse"}), 4).await;
    assert_eq!(refused["code"], "permission_denied", "{refused}");
    let down = ask(&mut client, json!({"type": "rpc", "method": "down"}), 5).await;
    assert_eq!(down["code"], "unavailable", "{down}");
    let nameless = ask(&mut client, json!({"type": "rpc"}), 6).await;
    assert_eq!(nameless["code"], "bad_request", "{nameless}");
    let long = ask(
        &mut client,
        json!({"type": "rpc", "method": "m".repeat(257)}),
        7,
    )
    .await;
    assert_eq!(long["code"], "bad_request", "{long}");
    assert_eq!(
        backend.calls("rpc").len(),
        5,
        "refused before the backend is asked"
    );

    // The Rust client calls the same way.
    let connection =
        duplex_client::Connection::connect(duplex_client::ConnectOptions::new(&server.ws_url()))
            .await
            .expect("the Rust client connects");
    let sum = connection
        .rpc("add", &json!({"a": 1, "b": 2}))
        .await
        .expect("answered");
    assert_eq!(sum, json!({"sum": 3}));
    let error = connection
        .rpc("fail", &json!(null))
        .await
        .expect_err("the backend's error");
    assert_eq!(error.code(), Some("no_such_item"));

    // Without the rpc hook, rpc is refused as unsupported.
    let plain = TestServer::start().await;
    let mut client = plain.ws().await;
    let unsupported = ask(&mut client, json!({"type": "rpc", "method": "add"}), 1).await;
    assert_eq!(unsupported["code"], "unsupported", "{unsupported}");
}

#[tokio::test]
async fn a_failed_hook_denies_or_allows_as_on_error_says() {
    let backend = Backend::start(|call| match call["hook"].as_str() {
        Some("connect") => Reaction::Sleep(Duration::from_secs(5), json!({"allow": true})),
        _ => Reaction::Status(500),
    })
    .await;
    for on_error in [OnError::Deny, OnError::Allow] {
        let mut hooks = backend.hooks(&[Hook::Connect, Hook::Publish]);
        hooks.timeout = Some("200ms".into());
        hooks.on_error = on_error;
        let server = server_with(hooks, "").await;
        let mut client = server.ws().await;
        let connect = ask(&mut client, json!({"type": "connect"}), 1).await;
        let publish = json!({"type": "publish", "channel": "chat:a", "data": 1});
        match on_error {
            OnError::Deny => {
                assert_eq!(connect["code"], "unavailable", "{connect}");
                let message = connect["message"].as_str().expect("a message");
                assert!(message.contains("did not answer within"), "{message}");
                assert_eq!(
                    server
                        .metric(
                            "duplex_hook_calls_total{hook=\"connect\",result=\"failed_denied\"}"
                        )
                        .await,
                    1.0
                );
            }
            OnError::Allow => {
                assert_eq!(connect["type"], "reply", "{connect}");
                assert_eq!(connect["result"]["user"], Value::Null);
                // A 500 from the backend on publish: the publication goes on.
                let published = ask(&mut client, publish, 2).await;
                assert_eq!(published["type"], "reply", "{published}");
                assert_eq!(
                    server
                        .metric(
                            "duplex_hook_calls_total{hook=\"publish\",result=\"failed_allowed\"}"
                        )
                        .await,
                    1.0
                );
            }
        }
    }
}

#[tokio::test]
async fn a_slow_hook_holds_its_own_connection_in_order_and_no_other() {
    let release = Arc::new(Notify::new());
    let held = release.clone();
    let backend = Backend::start(move |call| {
        if call["data"] == "slow" {
            Reaction::Held(held.clone(), json!({"allow": true}))
        } else {
            Reaction::Json(json!({"allow": true}))
        }
    })
    .await;
    let server = server_with(backend.hooks(&[Hook::Publish]), "").await;
    let mut slow = server.ws().await;
    let mut other = server.ws().await;
    slow.send_json(json!({"type": "publish", "id": 1, "channel": "chat:a", "data": "slow"}))
        .await;
    slow.send_json(json!({"type": "unsubscribe", "id": 2, "channel": "chat:none"}))
        .await;
    wait_for("the backend holds the slow publish", || async {
        (!backend.calls("publish").is_empty()).then_some(())
    })
    .await;
    // Another connection is answered while the first waits on the backend.
    let fast = ask(
        &mut other,
        json!({"type": "publish", "channel": "chat:a", "data": "fast"}),
        7,
    )
    .await;
    assert_eq!(fast["type"], "reply", "{fast}");
    release.notify_one();
    // The first connection's answers come in the order of its requests.
    let first = slow.next_json().await;
    assert_eq!(
        (first["type"].as_str(), first["id"].as_u64()),
        (Some("reply"), Some(1)),
        "{first}"
    );
    let second = slow.next_json().await;
    assert_eq!(
        (second["code"].as_str(), second["id"].as_u64()),
        (Some("not_subscribed"), Some(2)),
        "{second}"
    );
}

#[tokio::test]
async fn refresh_renews_a_connection_through_the_backend() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let backend = Backend::start(move |call| match call["hook"].as_str() {
        Some("connect") => Reaction::Json(json!({
            "allow": true, "user": "ana", "expires_at": now + 60, "channels": ["secret:a"],
        })),
        Some("refresh") if call["token"] == "stale" => Reaction::Json(json!({
            "allow": false, "code": "session_ended",
        })),
        Some("refresh") => Reaction::Json(json!({
            "allow": true, "expires_at": now + 3600, "channels": [],
        })),
        _ => Reaction::Status(500),
    })
    .await;
    let server = TestServer::start_with({
        let settings = backend
            .hooks(&[Hook::Connect, Hook::Refresh])
            .settings()
            .expect("valid");
        move |config| {
            config.hooks = Some(settings);
            config.namespaces = namespaces("[secret]\nsubscribe = \"token_channels\"");
        }
    })
    .await;
    let mut client = server.ws().await;
    let connected = ask(&mut client, json!({"type": "connect"}), 1).await;
    assert_eq!(connected["result"]["user"], "ana", "{connected}");
    let secret = try_subscribe(&mut client, "secret:a", 2).await;
    assert_eq!(secret["type"], "reply", "{secret}");
    // Without a JWT key the token goes to the backend as it is.
    let stale = ask(&mut client, json!({"type": "refresh", "token": "stale"}), 3).await;
    assert_eq!(stale["code"], "session_ended", "{stale}");
    let renewed = ask(&mut client, json!({"type": "refresh"}), 4).await;
    assert_eq!(renewed["result"]["expires_at"], now + 3600, "{renewed}");
    let call = backend.calls("refresh").pop().expect("asked");
    assert_eq!(call.json["user"], "ana");
    // The renewed grants no longer list secret:a: that subscription ends.
    let ended = client.next_json().await;
    assert_eq!(ended["type"], "unsubscribed", "{ended}");
    assert_eq!(ended["channel"], "secret:a");
}

#[tokio::test]
async fn the_clients_connect_first_when_the_server_asks_its_backend() {
    let backend = Backend::start(|call| match call["hook"].as_str() {
        Some("connect") => Reaction::Json(json!({"allow": true, "user": "from-backend"})),
        _ => Reaction::Status(500),
    })
    .await;
    let server = server_with(backend.hooks(&[Hook::Connect]), "").await;

    // A raw TCP client that does not connect is refused, and told why.
    let mut tcp = server.tcp().await;
    assert_eq!(tcp.connected["connect_required"], true);
    let early = tcp
        .request(
            json!({"type": "subscribe", "id": 1, "channel": "chat:a"}),
            1,
        )
        .await;
    assert_eq!(early["code"], "not_connected", "{early}");
    let connected = tcp.request(json!({"type": "connect", "id": 2}), 2).await;
    assert_eq!(connected["result"]["user"], "from-backend", "{connected}");
    let subscribed = tcp
        .request(
            json!({"type": "subscribe", "id": 3, "channel": "chat:a"}),
            3,
        )
        .await;
    assert_eq!(subscribed["type"], "reply", "{subscribed}");
    let call = backend.calls("connect").pop().expect("asked");
    assert_eq!(call.json["transport"], "tcp");

    // The Rust client sends connect by itself, with no token or meta of its own.
    let connection =
        duplex_client::Connection::connect(duplex_client::ConnectOptions::new(&server.ws_url()))
            .await
            .expect("the Rust client connects");
    connection
        .subscribe("chat:a")
        .await
        .expect("subscribed after its connect");
    let present = connection.presence("chat:a").await.expect("presence");
    assert!(
        present
            .iter()
            .any(|p| p.user.as_deref() == Some("from-backend"))
    );
}

#[tokio::test]
async fn an_answer_that_is_not_a_hook_answer_is_a_failed_hook() {
    let backend = Backend::start(|call| match call["channel"].as_str() {
        Some("chat:no-allow") => Reaction::Json(json!({"ok": true})),
        Some("chat:not-an-object") => Reaction::Json(json!(["allow"])),
        Some("chat:too-long") => Reaction::Json(json!({"allow": true, "pad": "x".repeat(1 << 20)})),
        _ => Reaction::Json(json!({"allow": true})),
    })
    .await;
    let server = server_with(backend.hooks(&[Hook::Subscribe]), "").await;
    let mut client = server.ws().await;
    for (id, channel) in [
        (1, "chat:no-allow"),
        (2, "chat:not-an-object"),
        (3, "chat:too-long"),
    ] {
        let refused = try_subscribe(&mut client, channel, id).await;
        assert_eq!(refused["code"], "unavailable", "{refused}");
        let message = refused["message"].as_str().expect("a message");
        assert!(message.contains("not a hook answer"), "{message}");
    }
    let fine = try_subscribe(&mut client, "chat:fine", 4).await;
    assert_eq!(fine["type"], "reply", "{fine}");
    assert_eq!(
        server
            .metric("duplex_hook_calls_total{hook=\"subscribe\",result=\"failed_denied\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn the_expiry_the_backend_sets_is_enforced() {
    // The backend reads the clock when it is asked, and gives whole seconds: "now + 2" is
    // between one and two seconds ahead. ("now + 1" read once at the start could already
    // have passed when a slow machine got to the connect.)
    let backend = Backend::start(move |call| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let expires_at = if call["meta"]["past"] == true {
            now - 10
        } else {
            now + 2
        };
        Reaction::Json(json!({"allow": true, "user": "ana", "expires_at": expires_at}))
    })
    .await;
    let server = server_with(backend.hooks(&[Hook::Connect]), "").await;

    // An expiry already past refuses the connect.
    let mut late = server.ws().await;
    let refused = ask(
        &mut late,
        json!({"type": "connect", "meta": {"past": true}}),
        1,
    )
    .await;
    assert_eq!(refused["code"], "token_expired", "{refused}");

    // One a second or two ahead ends the connection when it passes, unless it is refreshed.
    let mut client = server.ws().await;
    let connected = ask(&mut client, json!({"type": "connect"}), 1).await;
    assert_eq!(connected["result"]["user"], "ana", "{connected}");
    let goodbye = loop {
        let frame = client.next_json().await;
        if frame["type"] == "disconnect" {
            break frame;
        }
    };
    assert_eq!(goodbye["code"], "token_expired", "{goodbye}");
}
