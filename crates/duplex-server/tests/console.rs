//! The web console in a real headless Chromium against real servers (tests/browser/
//! console.test.mjs drives the pages; this side plays the other people: raw WebSocket clients,
//! a Rust client that subscribes and publishes, one that answers the server's requests and one
//! that never does, and a writer that changes a record behind the page's back).

mod web;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use duplex_client::{ConnectOptions, Connection, Event, Subscription};
use duplex_server::api_keys::{ApiKey, Scope};
use duplex_testkit::{TestServer, WsClient};
use serde_json::{Value, json};
use tokio::sync::Mutex;

const ADMIN_KEY: &str = "console-admin-key-0123456789";
const RECORDS_KEY: &str = "console-records-key-0123456789";

/// The people the harness plays.
#[derive(Default)]
struct Others {
    sockets: HashMap<String, WsClient>,
    rust: Option<Connection>,
    subscriptions: HashMap<String, Subscription>,
    answerers: Vec<Connection>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_and_drives_a_running_server() {
    if !web::available() {
        return;
    }
    let server = Arc::new(TestServer::start().await);
    let keyed = TestServer::start_with(|c| {
        c.api_key = Some(ADMIN_KEY.into());
        c.api_keys = vec![ApiKey {
            name: Some("records-only".into()),
            key: RECORDS_KEY.into(),
            scopes: vec![Scope::Records],
        }];
    })
    .await;
    let others = Arc::new(Mutex::new(Others::default()));
    let mut env = vec![
        ("DUPLEX_URL", server.url("")),
        ("DUPLEX_KEYED_URL", keyed.url("")),
        ("DUPLEX_ADMIN_KEY", ADMIN_KEY.to_owned()),
        ("DUPLEX_RECORDS_KEY", RECORDS_KEY.to_owned()),
    ];
    if let Ok(folder) = std::env::var("DUPLEX_SCREENSHOTS") {
        env.push(("DUPLEX_SCREENSHOTS", folder));
    }
    web::run_script(
        "console.test.mjs",
        &env,
        Duration::from_secs(180),
        |name, argument| {
            let server = server.clone();
            let others = others.clone();
            Box::pin(async move { play(&server, &others, &name, &argument).await })
        },
    )
    .await;
}

async fn play(server: &TestServer, others: &Mutex<Others>, name: &str, arg: &Value) -> Value {
    let mut others = others.lock().await;
    let text = |key: &str| arg[key].as_str().unwrap_or_default().to_owned();
    match name {
        "ws_open" => {
            let client = server.ws().await;
            let id = client.connected["client"].as_str().expect("id").to_owned();
            others.sockets.insert(id.clone(), client);
            json!({"id": id})
        }
        "ws_close" => {
            others.sockets.remove(&text("id"));
            json!({})
        }
        "rust_subscribe" => {
            let connection = rust(server, &mut others).await;
            let subscription = connection
                .subscribe(&text("channel"))
                .await
                .expect("subscribe");
            others.subscriptions.insert(text("channel"), subscription);
            json!({})
        }
        "rust_next" => {
            let subscription = others
                .subscriptions
                .get_mut(&text("channel"))
                .expect("subscribed first");
            loop {
                let event = tokio::time::timeout(Duration::from_secs(10), subscription.next())
                    .await
                    .expect("a publication in time")
                    .expect("the subscription is open");
                if let Event::Message(message) = event {
                    let data = match message.data {
                        duplex_client::Payload::Json(value) => value,
                        duplex_client::Payload::Binary(bytes) => json!(bytes.to_vec()),
                    };
                    return json!({"offset": message.offset, "data": data});
                }
            }
        }
        "rust_publish" => {
            let connection = rust(server, &mut others).await;
            let published = connection
                .publish(&text("channel"), &arg["data"])
                .await
                .expect("publish");
            json!({"offset": published.offset})
        }
        "rust_publish_bytes" => {
            let connection = rust(server, &mut others).await;
            let bytes: Vec<u8> = serde_json::from_value(arg["bytes"].clone()).expect("bytes");
            let published = connection
                .publish_bytes(&text("channel"), bytes.into())
                .await
                .expect("publish bytes");
            json!({"offset": published.offset})
        }
        "record_patch" => {
            let response = reqwest::Client::new()
                .patch(server.url(&format!(
                    "/api/collections/{}/records/{}",
                    text("collection"),
                    text("id")
                )))
                .json(&arg["fields"])
                .send()
                .await
                .expect("patch");
            assert!(response.status().is_success(), "{}", response.status());
            response.json().await.expect("json")
        }
        "answerer_open" => {
            let connection = Connection::connect(
                ConnectOptions::new(&server.ws_url())
                    .on_request(|data| async move { Ok(json!({"ready": true, "asked": data})) }),
            )
            .await
            .expect("connect");
            let id = connection.client_id().expect("connected");
            others.answerers.push(connection);
            json!({"id": id})
        }
        "silent_open" => {
            // Reads nothing until asked how it was disconnected: never answers a request.
            let client = server.ws().await;
            let id = client.connected["client"].as_str().expect("id").to_owned();
            others.sockets.insert(id.clone(), client);
            json!({"id": id})
        }
        "silent_disconnect_code" => {
            let client = others.sockets.get_mut(&text("id")).expect("opened");
            loop {
                let frame = client.next_json().await;
                if frame["type"] == "disconnect" {
                    return json!({"code": frame["code"], "reconnect": frame["reconnect"]});
                }
            }
        }
        "traffic" => {
            // A few subscribers and a steady stream, so the overview's charts have something.
            let mut ids: Vec<String> = others.sockets.keys().cloned().collect();
            ids.sort();
            for (n, id) in ids.iter().enumerate() {
                let client = others.sockets.get_mut(id).expect("open");
                client
                    .send_json(
                        json!({"id": 1000 + n, "type": "subscribe", "channel": "chat:traffic"}),
                    )
                    .await;
            }
            let connection = rust(server, &mut others).await;
            let seconds = arg["seconds"].as_u64().unwrap_or(3);
            let http = reqwest::Client::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
            let mut n = 0u64;
            while tokio::time::Instant::now() < until {
                n += 1;
                connection
                    .publish("chat:traffic", &json!({"n": n}))
                    .await
                    .expect("publish");
                if n.is_multiple_of(5) {
                    http.get(server.url("/api/collections"))
                        .send()
                        .await
                        .expect("request");
                }
                // Busier and quieter spells, as real traffic comes.
                let pause = if (n / 150).is_multiple_of(2) { 8 } else { 30 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            json!({"published": n})
        }
        other => panic!("unknown command {other}"),
    }
}

/// The Rust client connection the harness publishes and subscribes with.
async fn rust<'a>(server: &TestServer, others: &'a mut Others) -> &'a Connection {
    if others.rust.is_none() {
        let connection = Connection::connect(ConnectOptions::new(&server.ws_url()))
            .await
            .expect("connect");
        others.rust = Some(connection);
    }
    others.rust.as_ref().expect("made above")
}

#[tokio::test]
async fn the_pages_are_served_with_deep_links_and_can_be_turned_off() {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let server = TestServer::start().await;
    let root = client.get(server.url("/")).send().await.expect("request");
    assert_eq!(root.status(), 303);
    assert_eq!(root.headers()["location"], "/console/");
    for path in [
        "/console/",
        "/console/channels/chat:lobby.v2",
        "/console/records/posts",
        "/console/connections",
    ] {
        let page = client.get(server.url(path)).send().await.expect("request");
        assert_eq!(page.status(), 200, "{path}");
        assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
        assert!(
            page.text().await.expect("body").contains("/console/app.js"),
            "{path}"
        );
    }
    let script = client
        .get(server.url("/console/app.js"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        script.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let etag = script.headers()["etag"].clone();
    let again = client
        .get(server.url("/console/app.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .expect("request");
    assert_eq!(again.status(), 304);
    for missing in [
        "/console/nope.js",
        "/console/../Cargo.toml",
        "/console/pages/../../Cargo.toml",
    ] {
        let response = client
            .get(server.url(missing))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 404, "{missing}");
    }

    let off = TestServer::start_with(|c| {
        c.console = false;
        c.examples = false;
    })
    .await;
    for path in ["/", "/console/", "/console/app.js", "/examples/"] {
        let response = client.get(off.url(path)).send().await.expect("request");
        assert_eq!(response.status(), 404, "{path}");
    }
}
