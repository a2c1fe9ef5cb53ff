//! Presence, the server asking clients, and the server API for backends, against a real server.

use std::time::Duration;

use duplex_proto::binary;
use duplex_server::hub::namespace::Namespaces;
use duplex_testkit::{TestServer, WsEvent, wait_for};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn problem(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    response.json().await.expect("problem json")
}

#[tokio::test]
async fn presence_spans_websocket_and_tcp_and_a_silent_connection_leaves() {
    let server = TestServer::start_with(|c| {
        c.sockets.idle_timeout = Duration::from_millis(500);
        c.sockets.ping_interval = Duration::from_millis(100);
    })
    .await;
    let mut ana = server.ws().await;
    ana.request(json!({"type": "connect", "meta": {"name": "ana"}}), 1)
        .await;
    ana.subscribe("chat:room", 2).await;
    let ana_id = ana.connected["client"].as_str().expect("id").to_owned();

    let mut bo = server.tcp().await;
    bo.request(json!({"type": "connect", "meta": {"name": "bo"}}), 1)
        .await;
    bo.subscribe("chat:room", 2).await;
    let bo_id = bo.connected["client"].as_str().expect("id").to_owned();

    let join = ana.next_json().await;
    assert_eq!(join["type"], "join");
    assert_eq!(join["channel"], "chat:room");
    assert_eq!(join["client"], bo_id.as_str());
    assert_eq!(join["meta"]["name"], "bo");

    let reply = bo
        .request(json!({"type": "presence", "channel": "chat:room"}), 3)
        .await;
    let names: Vec<&str> = reply["result"]["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| c["meta"]["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, vec!["ana", "bo"]);
    let http: Value = reqwest::get(server.url("/api/channels/chat:room/presence"))
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(http["clients"].as_array().map(Vec::len), Some(2));
    assert_eq!(http["clients"][0]["client"], ana_id.as_str());

    // Bo goes silent (no close, no answers to pings): gone within the idle timeout.
    let leave = ana.next_json().await;
    assert_eq!(leave["type"], "leave");
    assert_eq!(leave["client"], bo_id.as_str());
    let http: Value = reqwest::get(server.url("/api/channels/chat:room/presence"))
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(http["clients"].as_array().map(Vec::len), Some(1));
    drop(bo);

    // A killed connection leaves at once.
    let mut cy = server.ws().await;
    cy.subscribe("chat:room", 1).await;
    assert_eq!(ana.next_json().await["type"], "join");
    drop(cy);
    assert_eq!(ana.next_json().await["type"], "leave");

    // Namespaces without presence say so.
    let error = ana
        .request(json!({"type": "presence", "channel": "news:x"}), 9)
        .await;
    assert_eq!(error["code"], "permission_denied");
    let response = reqwest::get(server.url("/api/channels/news:x/presence"))
        .await
        .expect("request");
    assert_eq!(
        problem(response, StatusCode::FORBIDDEN).await["code"],
        "presence_disabled"
    );
}

/// Starts `POST /api/connections/{id}/request` in the background.
fn ask(
    server: &TestServer,
    id: &str,
    query: &str,
    body: Value,
) -> tokio::task::JoinHandle<reqwest::Response> {
    let url = server.url(&format!("/api/connections/{id}/request{query}"));
    tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .expect("request")
    })
}

#[tokio::test]
async fn the_server_asks_a_client_over_either_transport_and_gets_its_reply() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    let ws_id = ws.connected["client"].as_str().expect("id").to_owned();
    let pending = ask(&server, &ws_id, "", json!({"question": "ready?"}));
    let request = ws.next_json().await;
    assert_eq!(request["type"], "request");
    assert_eq!(request["data"], json!({"question": "ready?"}));
    ws.send_json(json!({"type": "reply", "id": request["id"], "result": {"ready": true}}))
        .await;
    let response = pending.await.expect("task");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.expect("json"),
        json!({"ready": true})
    );

    let mut tcp = server.tcp().await;
    let tcp_id = tcp.connected["client"].as_str().expect("id").to_owned();
    let pending = ask(&server, &tcp_id, "?timeout=2s", json!([1, 2, 3]));
    let request = tcp.next_json().await;
    assert_eq!(request["data"], json!([1, 2, 3]));
    tcp.send_json(json!({"type": "reply", "id": request["id"], "result": 6}))
        .await;
    let response = pending.await.expect("task");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.expect("text"), "6");

    // The client declines: 502 with what it said.
    let pending = ask(&server, &ws_id, "", json!("do it"));
    let request = ws.next_json().await;
    ws.send_json(
        json!({"type": "error", "id": request["id"], "code": "busy", "message": "not now"}),
    )
    .await;
    let body = problem(pending.await.expect("task"), StatusCode::BAD_GATEWAY).await;
    assert_eq!(body["code"], "client_error");
    assert_eq!(
        body["client_error"],
        json!({"code": "busy", "message": "not now"})
    );
}

#[tokio::test]
async fn timeouts_late_and_stray_replies_are_handled() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    let id = ws.connected["client"].as_str().expect("id").to_owned();
    let pending = ask(&server, &id, "?timeout=200ms", json!("anyone?"));
    let request = ws.next_json().await;
    let body = problem(pending.await.expect("task"), StatusCode::GATEWAY_TIMEOUT).await;
    assert_eq!(body["code"], "timeout");

    // The answer comes too late, then twice, then for an id never asked: counted, harmless.
    for stray in [request["id"].clone(), request["id"].clone(), json!(987_654)] {
        ws.send_json(json!({"type": "reply", "id": stray, "result": "late"}))
            .await;
    }
    ws.send_json(json!({"type": "error", "id": 123_456, "code": "x"}))
        .await;
    wait_for("stray answers to be counted", || async {
        (server.metric("duplex_unmatched_answers_total").await == 4.0).then_some(())
    })
    .await;
    ws.send_json(json!({"type": "ping", "id": 1})).await;
    assert_eq!(ws.next_json().await["type"], "pong");

    // A client that disconnects while asked: the caller hears at once.
    let pending = ask(&server, &id, "?timeout=30s", json!("still there?"));
    assert_eq!(ws.next_json().await["type"], "request");
    drop(ws);
    let response = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("answered before the timeout")
        .expect("task");
    assert_eq!(
        problem(response, StatusCode::NOT_FOUND).await["code"],
        "not_found"
    );
}

#[tokio::test]
async fn requests_to_nobody_or_with_bad_input_are_refused() {
    let server = TestServer::start().await;
    let ws = server.ws().await;
    let id = ws.connected["client"].as_str().expect("id").to_owned();
    let http = reqwest::Client::new();
    let post = |path: String| http.post(server.url(&path));
    let cases = [
        (
            post("/api/connections/00000000000000ff/request".into()).json(&json!(1)),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            post("/api/connections/not-an-id/request".into()).json(&json!(1)),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            post(format!("/api/connections/{id}/request?timeout=0s")).json(&json!(1)),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            post(format!("/api/connections/{id}/request?timeout=61s")).json(&json!(1)),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            post(format!("/api/connections/{id}/request?timeout=soon")).json(&json!(1)),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            post(format!("/api/connections/{id}/request"))
                .header("content-type", "application/json")
                .body("{nope"),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            post(format!("/api/connections/{id}/request")).body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post("/api/users/ana/request".into()).json(&json!(1)),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.expect("request");
        assert_eq!(problem(response, status).await["code"], code);
    }
}

#[tokio::test]
async fn backends_publish_json_and_bytes_and_bad_input_is_refused() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    ws.subscribe("news:today", 1).await;
    ws.subscribe("stream:cam", 2).await;
    let http = reqwest::Client::new();

    let response = http
        .post(server.url("/api/channels/news:today/publish"))
        .json(&json!({"headline": "hello"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let published: Value = response.json().await.expect("json");
    assert_eq!(published["offset"], 1);
    let message = ws.next_json().await;
    assert_eq!(message["data"]["headline"], "hello");

    let response = http
        .post(server.url("/api/channels/stream:cam/publish"))
        .header("content-type", "application/octet-stream")
        .body(vec![0u8, 1, 2, 255])
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let Some(WsEvent::Binary(frame)) = ws.next_event().await else {
        panic!("expected a binary frame");
    };
    assert_eq!(
        binary::decode_message(&frame).expect("valid").payload,
        &[0, 1, 2, 255]
    );

    // The server may publish where clients may not.
    let response = http
        .post(server.url("/api/channels/records:custom/publish"))
        .json(&json!({"op": "note"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);

    let big = format!("\"{}\"", "x".repeat(70 * 1024));
    let cases = [
        (
            http.post(server.url("/api/channels/nocolon/publish"))
                .json(&json!(1)),
            StatusCode::BAD_REQUEST,
            "invalid_channel",
        ),
        (
            http.post(server.url("/api/channels/news:x/publish"))
                .header("content-type", "application/json")
                .body("{oops"),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            http.post(server.url("/api/channels/news:x/publish"))
                .header("content-type", "text/plain")
                .body("hi"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            http.post(server.url("/api/channels/news:x/publish"))
                .header("content-type", "application/octet-stream")
                .body("hi"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "binary_not_allowed",
        ),
        (
            http.post(server.url("/api/channels/news:x/publish"))
                .header("content-type", "application/json")
                .body(big),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.expect("request");
        assert_eq!(problem(response, status).await["code"], code);
    }

    let channels: Value = http
        .get(server.url("/api/channels"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let news = channels["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|c| c["channel"] == "news:today")
        .expect("news:today listed");
    assert_eq!(news["subscribers"], 1);
    assert_eq!(news["offset"], 1);
}

#[tokio::test]
async fn connections_are_listed_page_by_page() {
    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = server.ws().await;
        ws.subscribe("news:a", 1).await;
        clients.push(ws);
    }
    for _ in 0..2 {
        clients.push(server.ws().await);
    }
    let _tcp = server.tcp().await;
    let http = reqwest::Client::new();
    let mut seen = Vec::new();
    let mut query = "limit=2".to_owned();
    loop {
        let page: Value = http
            .get(server.url(&format!("/api/connections?{query}")))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        for item in page["items"].as_array().expect("items") {
            assert!(
                item["remote"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("127.0.0.1:"))
            );
            assert!(item["connected"].as_str().is_some());
            seen.push(item.clone());
        }
        match page["next"].as_str() {
            Some(cursor) => query = format!("limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6);
    let ids: Vec<&str> = seen
        .iter()
        .map(|c| c["client"].as_str().expect("id"))
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "in id order, none twice");
    assert_eq!(
        seen.iter()
            .filter(|c| c["subscriptions"] == json!(["news:a"]))
            .count(),
        3
    );
    assert_eq!(seen.iter().filter(|c| c["transport"] == "tcp").count(), 1);
    for query in ["limit=0", "cursor=zz", "sort=x"] {
        let response = http
            .get(server.url(&format!("/api/connections?{query}")))
            .send()
            .await
            .expect("request");
        assert_eq!(
            problem(response, StatusCode::BAD_REQUEST).await["code"],
            "invalid_query"
        );
    }
}

#[tokio::test]
async fn the_api_key_guards_the_server_api_only() {
    let server = TestServer::start_with(|c| c.api_key = Some("s3cret".into())).await;
    let http = reqwest::Client::new();
    let endpoints = [
        http.get(server.url("/api/channels")),
        http.get(server.url("/api/connections")),
        http.get(server.url("/api/channels/news:a/history")),
        http.post(server.url("/api/channels/news:a/publish"))
            .json(&json!(1)),
    ];
    for request in endpoints {
        let request = request.build().expect("request");
        let anonymous = http
            .execute(request.try_clone().expect("clone"))
            .await
            .expect("response");
        assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
        assert_eq!(
            problem(anonymous, StatusCode::UNAUTHORIZED).await["code"],
            "unauthorized"
        );

        let mut wrong = request.try_clone().expect("clone");
        wrong
            .headers_mut()
            .insert("authorization", "Bearer guess".parse().expect("header"));
        let response = http.execute(wrong).await.expect("response");
        assert_eq!(
            problem(response, StatusCode::FORBIDDEN).await["code"],
            "forbidden"
        );

        let mut right = request;
        right
            .headers_mut()
            .insert("authorization", "Bearer s3cret".parse().expect("header"));
        let response = http.execute(right).await.expect("response");
        assert!(response.status().is_success(), "{}", response.status());
    }
    // Records, health and metrics are not the server API.
    for path in ["/api/collections", "/healthz", "/metrics"] {
        let response = http.get(server.url(path)).send().await.expect("request");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}

const SECRET: &str = "a-test-secret-of-some-length";

fn token_for(user: &str, expires_in: i64) -> String {
    let exp = jsonwebtoken::get_current_timestamp() as i64 + expires_in;
    duplex_testkit::hs256_token(SECRET, &json!({"sub": user, "exp": exp}))
}

#[tokio::test]
async fn tokens_name_users_whom_the_server_can_ask_on_every_connection() {
    let server = TestServer::start_with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let mut phone = server.ws().await;
    let reply = phone
        .request(
            json!({"type": "connect", "token": token_for("ana", 3600)}),
            1,
        )
        .await;
    assert_eq!(reply["result"]["user"], "ana");
    let mut laptop = server.tcp().await;
    laptop
        .request(
            json!({"type": "connect", "token": token_for("ana", 3600)}),
            1,
        )
        .await;
    let mut other = server.ws().await;
    other
        .request(
            json!({"type": "connect", "token": token_for("bo", 3600)}),
            1,
        )
        .await;

    // Presence shows the user.
    phone.subscribe("chat:family", 2).await;
    let presence = phone
        .request(json!({"type": "presence", "channel": "chat:family"}), 3)
        .await;
    assert_eq!(presence["result"]["clients"][0]["user"], "ana");

    let pending = tokio::spawn({
        let url = server.url("/api/users/ana/request?timeout=5s");
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"sync": true}))
                .send()
                .await
                .expect("request")
        }
    });
    let request = phone.next_json().await;
    assert_eq!(request["type"], "request");
    phone
        .send_json(json!({"type": "reply", "id": request["id"], "result": "phone ok"}))
        .await;
    let request = laptop.next_json().await;
    laptop
        .send_json(json!({"type": "error", "id": request["id"], "code": "asleep", "message": "lid closed"}))
        .await;
    let response = pending.await.expect("task");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    let replies = body["replies"].as_array().expect("replies");
    assert_eq!(replies.len(), 2, "bo is not asked");
    assert!(replies.iter().any(|r| r["result"] == "phone ok"));
    assert!(replies.iter().any(|r| r["error"]["code"] == "asleep"));

    // Bad tokens are refused with a code, and the connection stays anonymous.
    let mut stranger = server.ws().await;
    for (token, code) in [
        (token_for("eve", -10), "token_expired"),
        ("not.a.token".to_owned(), "invalid_token"),
        (
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &json!({"sub": "eve", "exp": jsonwebtoken::get_current_timestamp() + 60}),
                &jsonwebtoken::EncodingKey::from_secret(b"a-different-secret-entirely"),
            )
            .expect("encode"),
            "invalid_token",
        ),
    ] {
        let error = stranger
            .request(json!({"type": "connect", "token": token}), 9)
            .await;
        assert_eq!(error["code"], code);
    }
    let response = reqwest::Client::new()
        .post(server.url("/api/users/eve/request"))
        .json(&json!(1))
        .send()
        .await
        .expect("request");
    assert_eq!(
        problem(response, StatusCode::NOT_FOUND).await["code"],
        "not_found"
    );
}

#[tokio::test]
async fn a_server_without_a_secret_refuses_tokens() {
    let server = TestServer::start().await;
    let mut client = server.ws().await;
    let error = client
        .request(json!({"type": "connect", "token": token_for("ana", 60)}), 1)
        .await;
    assert_eq!(error["code"], "invalid_token");
}

fn token_with_channels(user: &str, channels: &[&str]) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    duplex_testkit::hs256_token(
        SECRET,
        &json!({"sub": user, "exp": exp, "channels": channels}),
    )
}

#[tokio::test]
async fn anonymous_clients_publish_only_where_a_namespace_says_so() {
    // The production defaults, without the test kit's open namespaces.
    let server = TestServer::start_with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.namespaces = Namespaces::default();
    })
    .await;
    let mut ws = server.ws().await;
    let mut tcp = server.tcp().await;
    for (i, channel) in ["news:today", "anything:else"].into_iter().enumerate() {
        let frame = json!({"type": "publish", "channel": channel, "data": 1});
        let id = i as u64 + 1;
        assert_eq!(
            ws.request(frame.clone(), id).await["code"],
            "permission_denied"
        );
        assert_eq!(tcp.request(frame, id).await["code"], "permission_denied");
    }
    for (i, channel) in ["chat:lobby", "stream:cam1", "game:arena"]
        .into_iter()
        .enumerate()
    {
        let frame = json!({"type": "publish", "channel": channel, "data": 1});
        let id = i as u64 + 10;
        assert_eq!(
            ws.request(frame.clone(), id).await["type"],
            "reply",
            "{channel}"
        );
        assert_eq!(tcp.request(frame, id).await["type"], "reply", "{channel}");
    }
    // A token is enough for the default namespace; the server API always may.
    let token = token_with_channels("ana", &[]);
    ws.request(json!({"type": "connect", "token": token}), 20)
        .await;
    let published = ws
        .request(
            json!({"type": "publish", "channel": "news:today", "data": 2}),
            21,
        )
        .await;
    assert_eq!(published["type"], "reply");
    let response = reqwest::Client::new()
        .post(server.url("/api/channels/anything:else/publish"))
        .json(&json!({"data": 3}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn namespace_rules_allow_and_deny_on_every_transport() {
    let server = TestServer::start_with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.namespaces = duplex_testkit::namespaces(
            "[members]\npublish = \"authenticated\"\nread_history = \"server\"",
        );
    })
    .await;
    let ana_token = token_with_channels("ana", &["private:ana-*"]);

    // Anonymous sockets.
    let mut anonymous = server.tcp().await;
    let denied = anonymous
        .request(
            json!({"type": "publish", "channel": "members:x", "data": 1}),
            1,
        )
        .await;
    assert_eq!(denied["code"], "permission_denied");
    let denied = anonymous
        .request(
            json!({"type": "subscribe", "channel": "private:ana-inbox"}),
            2,
        )
        .await;
    assert_eq!(denied["code"], "permission_denied");

    // Ana's token lists her private channels and authenticates her.
    let mut ana = server.ws().await;
    ana.request(json!({"type": "connect", "token": ana_token}), 1)
        .await;
    ana.subscribe("private:ana-inbox", 2).await;
    let denied = ana
        .request(
            json!({"type": "subscribe", "channel": "private:bo-inbox"}),
            3,
        )
        .await;
    assert_eq!(denied["code"], "permission_denied");
    let published = ana
        .request(
            json!({"type": "publish", "channel": "members:x", "data": "hi"}),
            4,
        )
        .await;
    assert_eq!(published["type"], "reply");
    let denied = ana
        .request(json!({"type": "history", "channel": "members:x"}), 5)
        .await;
    assert_eq!(denied["code"], "permission_denied");
    let (status, history) = {
        let response = reqwest::get(server.url("/api/channels/members:x/history"))
            .await
            .expect("request");
        (
            response.status(),
            response.json::<Value>().await.expect("json"),
        )
    };
    assert_eq!(status, StatusCode::OK, "the server API may read it");
    assert_eq!(history["publications"][0]["data"], "hi");

    // HTTP transports take the token as a bearer header or ?token=.
    let http = reqwest::Client::new();
    let poll = "/api/channels/private:ana-inbox/poll";
    let response = http.get(server.url(poll)).send().await.expect("request");
    assert_eq!(
        problem(response, StatusCode::FORBIDDEN).await["code"],
        "forbidden"
    );
    let response = http
        .get(server.url(&format!("{poll}?token={ana_token}")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let response = http
        .get(server.url(poll))
        .bearer_auth(&ana_token)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let response = http
        .get(server.url(&format!("{poll}?token=forged")))
        .send()
        .await
        .expect("request");
    assert_eq!(
        problem(response, StatusCode::UNAUTHORIZED).await["code"],
        "invalid_token"
    );
    let response = http
        .get(server.url(&format!(
            "/api/channels/private:ana-inbox/events?token={ana_token}"
        )))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let response = http
        .get(server.url("/api/channels/private:bo-inbox/events"))
        .bearer_auth(&ana_token)
        .send()
        .await
        .expect("request");
    assert_eq!(
        problem(response, StatusCode::FORBIDDEN).await["code"],
        "forbidden"
    );
}

#[tokio::test]
async fn browser_origins_are_checked_for_sockets_streams_and_cors() {
    let server = TestServer::start_with(|c| {
        c.allowed_origins = vec!["https://app.example".into()];
        c.max_body = 1024;
    })
    .await;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let handshake = |origin: Option<String>| {
        let mut request = server.ws_url().into_client_request().expect("request");
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().expect("header"));
        }
        tokio_tungstenite::connect_async(request)
    };
    let same_origin = format!("http://{}", server.http_addr);
    for allowed in [
        None,
        Some("https://app.example".to_owned()),
        Some(same_origin),
    ] {
        assert!(handshake(allowed.clone()).await.is_ok(), "{allowed:?}");
    }
    match handshake(Some("https://evil.example".into())).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let http = reqwest::Client::new();
    let response = http
        .get(server.url("/api/channels/news:x/events"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("request");
    assert_eq!(
        problem(response, StatusCode::FORBIDDEN).await["code"],
        "forbidden"
    );

    // CORS: the allowed origin gets the headers, another does not.
    let preflight = |origin: &'static str| {
        http.request(
            reqwest::Method::OPTIONS,
            server.url("/api/collections/posts/records"),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
    };
    let allowed = preflight("https://app.example").await.expect("request");
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let refused = preflight("https://evil.example").await.expect("request");
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    // A body refused before any handler runs is still answered with the CORS headers, so the
    // page can read why.
    let too_large = http
        .post(server.url("/api/collections/posts/records"))
        .header("origin", "https://app.example")
        .header("content-type", "application/json")
        .body(format!(r#"{{"text": "{}"}}"#, "x".repeat(4096)))
        .send()
        .await
        .expect("request");
    assert_eq!(
        too_large.headers().get("access-control-allow-origin"),
        Some(&reqwest::header::HeaderValue::from_static(
            "https://app.example"
        ))
    );
    assert_eq!(
        problem(too_large, StatusCode::PAYLOAD_TOO_LARGE).await["code"],
        "payload_too_large"
    );
}

fn token_expiring_in(user: &str, seconds: u64) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + seconds;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

#[tokio::test]
async fn expiring_tokens_disconnect_unless_refreshed() {
    let server = TestServer::start_with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let short = token_expiring_in("ana", 2);
    let mut stays = server.ws().await;
    stays
        .request(json!({"type": "connect", "token": short}), 1)
        .await;
    let mut expires = server.tcp().await;
    expires
        .request(json!({"type": "connect", "token": short}), 1)
        .await;

    // Refreshing with another user's token, or with none, is refused.
    let error = stays
        .request(
            json!({"type": "refresh", "token": token_expiring_in("bo", 3600)}),
            2,
        )
        .await;
    assert_eq!(error["code"], "invalid_token");
    let error = stays.request(json!({"type": "refresh"}), 3).await;
    assert_eq!(error["code"], "bad_request");
    let refreshed = stays
        .request(
            json!({"type": "refresh", "token": token_expiring_in("ana", 3600)}),
            4,
        )
        .await;
    assert!(refreshed["result"]["expires_at"].as_u64().is_some());

    // The connection that did not refresh is told, and closed.
    let disconnect = expires.next_json().await;
    assert_eq!(disconnect["type"], "disconnect");
    assert_eq!(disconnect["code"], "token_expired");
    assert_eq!(disconnect["reconnect"], true);
    // The refreshed one, past the same moment, still answers.
    stays.send_json(json!({"type": "ping", "id": 5})).await;
    assert_eq!(stays.next_json().await["type"], "pong");
}

#[tokio::test]
async fn a_websocket_can_carry_its_token_in_the_url() {
    let server = TestServer::start_with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let url = format!("{}?token={}", server.ws_url(), token_for("ana", 3600));
    let mut ana = duplex_testkit::WsClient::connect(&url).await;
    ana.subscribe("chat:url", 1).await;
    let presence = ana
        .request(json!({"type": "presence", "channel": "chat:url"}), 2)
        .await;
    assert_eq!(presence["result"]["clients"][0]["user"], "ana");
    let refused =
        tokio_tungstenite::connect_async(format!("{}?token=forged", server.ws_url())).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
        }
        other => panic!("expected a 401, got {other:?}"),
    }
}

#[tokio::test]
async fn es256_tokens_are_checked_against_a_configured_public_key() {
    let pair = rcgen::KeyPair::generate().expect("a P-256 key pair");
    let dir = tempfile::tempdir().expect("tempdir");
    let public_key = dir.path().join("jwt.pub.pem");
    std::fs::write(&public_key, pair.public_key_pem()).expect("write");
    let server = TestServer::start_with(|c| c.jwt_public_key = Some(public_key.clone())).await;
    let claims = json!({"sub": "ana", "exp": jsonwebtoken::get_current_timestamp() + 3600});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("key"),
    )
    .expect("encode");
    let mut client = server.ws().await;
    let reply = client
        .request(json!({"type": "connect", "token": token}), 1)
        .await;
    assert_eq!(reply["result"]["user"], "ana");
    // An HS256 token "signed" with the public key is refused.
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(pair.public_key_pem().as_bytes()),
    )
    .expect("encode");
    // On a new connection: this one has connected, and keeps who it is.
    let mut other = server.ws().await;
    let error = other
        .request(json!({"type": "connect", "token": confused}), 2)
        .await;
    assert_eq!(error["code"], "invalid_token");
}
