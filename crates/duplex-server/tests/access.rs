//! Who may do what over HTTP: scoped API keys, collection rules, and a body that never arrives.

use std::time::Duration;

use duplex_server::api_keys::{ApiKey, Scope};
use duplex_testkit::{EVENT_TIMEOUT, TestServer};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SECRET: &str = "a-test-secret-of-some-length";
const PUBLISHER: &str = "publisher-key-0123456789";
const RECORDS: &str = "records-key-0123456789ab";

fn token(user: &str, channels: &[&str]) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    duplex_testkit::hs256_token(
        SECRET,
        &json!({"sub": user, "exp": exp, "channels": channels}),
    )
}

async fn status_and_code(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.expect("response");
    let status = response.status();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body["code"].clone())
}

fn scoped_keys() -> Vec<ApiKey> {
    vec![
        ApiKey {
            name: Some("publisher".into()),
            key: PUBLISHER.into(),
            scopes: vec![Scope::ChannelsPublish],
        },
        ApiKey {
            name: Some("backend".into()),
            key: RECORDS.into(),
            scopes: vec![Scope::Records, Scope::ChannelsRead],
        },
    ]
}

#[tokio::test]
async fn scoped_api_keys_open_only_their_routes() {
    let server = TestServer::start_with(|c| {
        c.api_key = Some("the-admin-key-0123456789".into());
        c.api_keys = scoped_keys();
    })
    .await;
    let http = reqwest::Client::new();
    let publish = || {
        http.post(server.url("/api/channels/news:a/publish"))
            .json(&json!({"data": 1}))
    };
    let history = || http.get(server.url("/api/channels/news:a/history"));
    let connections = || http.get(server.url("/api/connections"));

    assert_eq!(
        publish()
            .bearer_auth(PUBLISHER)
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
    let (status, code) = status_and_code(history().bearer_auth(PUBLISHER)).await;
    assert_eq!((status, code), (StatusCode::FORBIDDEN, json!("forbidden")));
    let (status, _) = status_and_code(connections().bearer_auth(PUBLISHER)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    assert_eq!(
        history()
            .bearer_auth(RECORDS)
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
    let (status, _) = status_and_code(publish().bearer_auth(RECORDS)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    for request in [publish(), history(), connections()] {
        let (status, _) = status_and_code(request.bearer_auth("the-admin-key-0123456789")).await;
        assert!(status.is_success(), "{status}");
    }
    let (status, code) = status_and_code(connections()).await;
    assert_eq!(
        (status, code),
        (StatusCode::UNAUTHORIZED, json!("unauthorized"))
    );
    let (status, _) = status_and_code(connections().bearer_auth("a-guess")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn collection_rules_guard_records_and_their_events() {
    let server = TestServer::start_with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.api_keys = scoped_keys();
        let rules = toml::from_str(
            "[secrets]\nread = \"authenticated\"\nwrite = \"server\"\n\
             [inbox]\nread = \"token_channels\"\nwrite = \"authenticated\"",
        )
        .expect("toml");
        c.namespaces = duplex_testkit::namespaces("")
            .with_collections(&rules)
            .expect("valid rules");
    })
    .await;
    let http = reqwest::Client::new();
    let secrets = server.url("/api/collections/secrets/records");
    let ana = token("ana", &["records:inbox"]);
    let bo = token("bo", &[]);

    // Ana follows the secrets' events; an anonymous socket may not.
    let mut anonymous = server.ws().await;
    let denied = anonymous
        .request(
            json!({"type": "subscribe", "channel": "records:secrets"}),
            1,
        )
        .await;
    assert_eq!(denied["code"], "permission_denied");
    let mut follower = server.ws().await;
    follower
        .request(json!({"type": "connect", "token": ana}), 1)
        .await;
    follower.subscribe("records:secrets", 2).await;

    // Only the server (a key with the records scope) writes; a token is not enough.
    let (status, code) =
        status_and_code(http.post(&secrets).bearer_auth(&ana).json(&json!({"k": 1}))).await;
    assert_eq!((status, code), (StatusCode::FORBIDDEN, json!("forbidden")));
    let (status, _) = status_and_code(
        http.post(&secrets)
            .bearer_auth(PUBLISHER)
            .json(&json!({"k": 1})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a key without the records scope"
    );
    let created = http
        .post(&secrets)
        .bearer_auth(RECORDS)
        .json(&json!({"k": 1}))
        .send()
        .await
        .expect("send");
    assert_eq!(created.status(), StatusCode::CREATED);
    let event = follower.next_json().await;
    assert_eq!(event["data"]["op"], "created");

    // Reading needs a token; anonymous readers and forged tokens are refused.
    let (status, _) = status_and_code(http.get(&secrets)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, code) = status_and_code(http.get(&secrets).bearer_auth("forged")).await;
    assert_eq!(
        (status, code),
        (StatusCode::UNAUTHORIZED, json!("invalid_token"))
    );
    let page: Value = http
        .get(&secrets)
        .bearer_auth(&bo)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(page["items"][0]["k"], 1);

    // token_channels: the token must list records:inbox.
    let inbox = server.url("/api/collections/inbox/records");
    let (status, _) =
        status_and_code(http.post(&inbox).bearer_auth(&bo).json(&json!({"m": "hi"}))).await;
    assert_eq!(status, StatusCode::CREATED, "any token may write");
    let (status, _) = status_and_code(http.get(&inbox).bearer_auth(&bo)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = status_and_code(http.get(&inbox).bearer_auth(&ana)).await;
    assert_eq!(status, StatusCode::OK);

    // Collections nobody may read are not even listed to them.
    let names = |list: Value| -> Vec<String> {
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|c| c["name"].as_str().expect("name").to_owned())
            .collect()
    };
    let listed: Value = http
        .get(server.url("/api/collections"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(names(listed).is_empty());
    let listed: Value = http
        .get(server.url("/api/collections"))
        .bearer_auth(RECORDS)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(names(listed), ["inbox", "secrets"]);
}

#[tokio::test]
async fn a_body_that_trickles_is_cut_off_while_others_are_served() {
    let server = TestServer::start_with(|c| c.body_read_timeout = Duration::from_millis(300)).await;
    let mut slow = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("connect");
    slow.write_all(
        b"POST /api/collections/notes/records HTTP/1.1\r\nHost: x\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":",
    )
    .await
    .expect("write");

    // Others are served while the slow body hangs.
    let response = reqwest::Client::new()
        .post(server.url("/api/collections/notes/records"))
        .json(&json!({"fast": true}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::CREATED);

    let mut answer = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, async {
        let mut buf = [0u8; 4096];
        loop {
            let n = slow.read(&mut buf).await.expect("read");
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.windows(15).any(|w| w == b"request_timeout") {
                break;
            }
        }
    })
    .await
    .expect("the server answers the trickling client");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert_eq!(
        server
            .metric("duplex_http_requests_total{method=\"POST\",route=\"/api/collections/{collection}/records\",status=\"408\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn rs256_tokens_are_checked_against_an_rsa_public_key() {
    // A fixed RSA pair (tests/fixtures): generating one per run is slow and needs no coverage.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let public_key = fixtures.join("rs256-public.pem");
    let private_pem = std::fs::read(fixtures.join("rs256-private.pem")).expect("fixture");
    let public_pem = std::fs::read(&public_key).expect("fixture");
    let server = TestServer::start_with(|c| c.jwt_public_key = Some(public_key.clone())).await;
    let claims = json!({"sub": "ana", "exp": jsonwebtoken::get_current_timestamp() + 3600});
    let signed = |header: jsonwebtoken::Header, key: &jsonwebtoken::EncodingKey| {
        jsonwebtoken::encode(&header, &claims, key).expect("encode")
    };
    let rsa = jsonwebtoken::EncodingKey::from_rsa_pem(&private_pem).expect("key");
    let good = signed(
        jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &rsa,
    );
    let ps256 = signed(
        jsonwebtoken::Header::new(jsonwebtoken::Algorithm::PS256),
        &rsa,
    );
    let confused = signed(
        jsonwebtoken::Header::default(),
        &jsonwebtoken::EncodingKey::from_secret(&public_pem),
    );
    let mut client = server.ws().await;
    let reply = client
        .request(json!({"type": "connect", "token": good}), 1)
        .await;
    assert_eq!(reply["result"]["user"], "ana");
    for (i, token) in [ps256, confused].into_iter().enumerate() {
        let mut other = server.tcp().await;
        let error = other
            .request(json!({"type": "connect", "token": token}), i as u64 + 2)
            .await;
        assert_eq!(error["code"], "invalid_token");
    }
    // The same key checks tokens over HTTP.
    let response = reqwest::Client::new()
        .get(server.url("/api/channels/private:x/poll"))
        .bearer_auth(&good)
        .send()
        .await
        .expect("send");
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "a token, but not listing the channel"
    );
}

#[tokio::test]
async fn the_token_meta_claim_is_what_presence_shows() {
    let server = TestServer::start_with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let token = duplex_testkit::hs256_token(
        SECRET,
        &json!({"sub": "ana", "exp": exp, "meta": {"name": "Ana", "role": "host"}}),
    );
    let mut ana = server.ws().await;
    // The client's own meta does not override the token's.
    ana.request(
        json!({"type": "connect", "token": token, "meta": {"name": "Mallory"}}),
        1,
    )
    .await;
    ana.subscribe("chat:meta", 2).await;
    let mut guest = server.tcp().await;
    guest
        .request(json!({"type": "connect", "meta": {"name": "Guest"}}), 1)
        .await;
    guest.subscribe("chat:meta", 2).await;
    let presence: Value = reqwest::get(server.url("/api/channels/chat:meta/presence"))
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let mut metas: Vec<Value> = presence["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| c["meta"].clone())
        .collect();
    metas.sort_by_key(|m| m["name"].as_str().map(str::to_owned));
    assert_eq!(
        metas,
        [
            json!({"name": "Ana", "role": "host"}),
            json!({"name": "Guest"})
        ]
    );
}

#[tokio::test]
async fn a_body_that_breaks_off_is_a_400_and_the_record_is_not_written() {
    let server = TestServer::start().await;
    let mut broken = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("connect");
    broken
        .write_all(
            b"POST /api/collections/notes/records HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":1}",
        )
        .await
        .expect("write");
    // The client stops sending (half-close) with 93 bytes still owed.
    broken.shutdown().await.expect("half-close");
    let mut answer = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, broken.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("bad_body"), "{text}");
    let page: Value = reqwest::get(server.url("/api/collections/notes/records"))
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(page["items"], json!([]));
}
